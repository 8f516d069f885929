//! The measurement rules end to end (issue 11): a real coordinator, a real CPU agent running
//! ResNet18, and the `fleetmark` CLI. Results show whether timing was stable, why it stopped,
//! percentiles with their 95% intervals, and "not enough samples" where the count is too small
//! for one; hostile stability reports are refused at the wire.

use fleetmark_core::BenchResult;
use fleetmark_e2e::*;
use fleetmark_proto::v1 as pb;
use serde_json::Value;
use sqlx::Row;

fn json(out: &std::process::Output, what: &str) -> Value {
    assert_success(out, what);
    serde_json::from_str(&stdout(out))
        .unwrap_or_else(|e| panic!("{what} printed no JSON ({e}):\n{}", stdout(out)))
}

/// A one-point sweep at 32x32 with short windows, so the stability rule decides in well under a
/// second on an idle machine and within `max_duration` on a loaded one.
fn sweep(name: &str, repetitions: u32, extra: &str) -> String {
    format!(
        "name = \"{name}\"\nbatch_sizes = [1]\nprecisions = [\"f32\"]\nimage_size = 32\n\
         repetitions = {repetitions}\n\n[measurement]\nwarmup_iterations = 2\n\
         warmup_duration = \"0s\"\nmin_iterations = 3\nmin_duration = \"0s\"\n\
         max_duration = \"20s\"\nstability_windows = 3\nstability_window = \"50ms\"\n\
         stability_tolerance = 0.5\n{extra}"
    )
}

#[tokio::test]
async fn results_show_stability_stop_reasons_and_percentile_intervals() {
    let dir = scratch();
    let db = TestDb::new().await;
    let coord = Coordinator::start(
        "coordinator",
        dir.path(),
        &db.url,
        free_port(),
        &CoordinatorOpts::default(),
    )
    .await;
    let url = coord.url.as_str();
    let _agent = start_agent("measure-cpu", dir.path(), url, "cpu", &[]);
    wait_agents_online(&coord.client(), &["measure-cpu"]).await;
    let pool = pool(&db.url).await;

    // The agent ran its health check before its first job and declared it at registration.
    let agents = json(
        &cli(url, None, &["agents", "--format", "json"]).await,
        "fleetmark agents --format json",
    );
    let health = &agents[0]["devices"][0]["health"];
    assert!(
        health["gemm_tflops"]["f32"].as_f64().unwrap_or(0.0) > 0.0,
        "a GEMM measured: {agents:#}"
    );
    assert!(
        health["memory_gbps"].as_f64().unwrap_or(0.0) > 0.0,
        "{agents:#}"
    );
    assert_eq!(
        agents[0]["devices"][0]["health_flags"],
        serde_json::json!([])
    );

    // 1. Windows of 50 ms: two repetitions, each stopped by the rule (or, on a machine too busy
    //    for three windows to agree within 50%, by max_duration, and then marked unstable).
    let windowed = submit_file(url, None, dir.path(), "windowed", &sweep("windowed", 2, "")).await;
    wait_sweep_finished(&pool, windowed, SWEEP_TIMEOUT).await;
    let id = windowed.to_string();
    let rows = json(
        &cli(url, None, &["results", &id, "--format", "json"]).await,
        "fleetmark results --format json",
    );
    let rows = rows.as_array().expect("an array of results");
    assert_eq!(rows.len(), 2, "{rows:#?}");
    for row in rows {
        let r = &row["result"];
        let s = &r["stability"];
        let reason = s["stop_reason"].as_str().expect("a stop reason");
        let stable = s["stable"].as_bool().expect("stable is a bool");
        assert!(
            matches!(reason, "stable" | "max_duration"),
            "a 20 s limit and 1,000,000 iterations: {s:#}"
        );
        assert_eq!(reason == "stable", stable, "no target set: {s:#}");
        let windows = s["windows"].as_array().expect("windows");
        assert!(windows.len() >= 3, "{s:#}");
        for w in windows {
            assert!(w["seconds"].as_f64().unwrap() >= 0.05, "{w:#}");
            assert!(w["images_per_sec"].as_f64().unwrap() > 0.0, "{w:#}");
        }
        let spread = s["spread"]
            .as_f64()
            .expect("a spread once 3 windows closed");
        assert_eq!(spread <= 0.5, stable, "{s:#}");
        assert_eq!(s["required_windows"], 3);
        assert_eq!(s["tolerance"], 0.5);

        // At least 150 ms of ~ms iterations: p50 and p90 have intervals; p99 (368 samples)
        // only if the machine was fast enough, and is null exactly when it was not.
        let l = &r["latency"];
        let count = l["count"].as_u64().unwrap();
        let p50 = &l["percentiles"]["p50"];
        let (lo, est, hi) = (
            p50["ci95_low_ms"].as_f64().expect("a p50 interval"),
            p50["ms"].as_f64().unwrap(),
            p50["ci95_high_ms"].as_f64().unwrap(),
        );
        assert!(lo <= est && est <= hi, "{p50:#}");
        assert_eq!(l["percentiles"]["p99"].is_null(), count < 368, "{l:#}");
    }

    // The summary columns agree with the records.
    let stored = sqlx::query(
        "SELECT stable, stop_reason::text AS stop_reason, window_spread FROM results \
         WHERE sweep_id = $1",
    )
    .bind(windowed)
    .fetch_all(&pool)
    .await
    .expect("results rows");
    assert_eq!(stored.len(), 2);
    for row in &stored {
        let stable: Option<bool> = row.get("stable");
        let reason: Option<String> = row.get("stop_reason");
        let spread: Option<f64> = row.get("window_spread");
        assert!(
            stable.is_some() && spread.is_some(),
            "summary columns filled"
        );
        assert_eq!(reason.as_deref() == Some("stable"), stable == Some(true));
    }

    // `compare` aggregates the two repetitions: their mean and spread.
    let cmp = json(
        &cli(url, None, &["compare", "--format", "json"]).await,
        "fleetmark compare --format json",
    );
    let cell = &cmp[0]["hardware"]["cpu"];
    assert_eq!(cell["results"], 2, "{cmp:#}");
    let rep = &cell["repetitions"];
    assert_eq!(rep["results"], 2, "{cell:#}");
    let (min, mean, max) = (
        rep["min_images_per_sec"].as_f64().unwrap(),
        rep["mean_images_per_sec"].as_f64().unwrap(),
        rep["max_images_per_sec"].as_f64().unwrap(),
    );
    assert!(min <= mean && mean <= max, "{rep:#}");
    assert!((rep["spread"].as_f64().unwrap() - (max - min) / mean).abs() < 1e-9);

    // `compare --by-node`: both repetitions ran on one node, this host's CPU, named
    // host/device, by this agent; one node is never flagged.
    let nodes = json(
        &cli(url, None, &["compare", "--by-node", "--format", "json"]).await,
        "fleetmark compare --by-node --format json",
    );
    let point = &nodes[0];
    assert_eq!(point["nodes"], 1, "{nodes:#}");
    let node = &point["node_cells"][0];
    assert!(node["node"].as_str().unwrap().ends_with("/cpu"), "{node:#}");
    assert_eq!(node["agents"], "measure-cpu", "{node:#}");
    assert_eq!(node["results"], 2, "{node:#}");
    assert_eq!(node["slow"], false, "{node:#}");
    // `history` of that point: one build made both, so one record of two results, no change.
    let hist = json(
        &cli(
            url,
            None,
            &[
                "history",
                "--gpu",
                "cpu",
                "--precision",
                "f32",
                "--batch",
                "1",
                "--format",
                "json",
            ],
        )
        .await,
        "fleetmark history --format json",
    );
    assert_eq!(hist.as_array().map(Vec::len), Some(1), "{hist:#}");
    assert_eq!(hist[0]["results"], 2, "{hist:#}");
    assert!(hist[0]["change"].is_null(), "{hist:#}");

    // 2. Five iterations and no more: stopped by max_iterations, no window closed, not stable,
    //    and no percentile can be claimed from five samples.
    let short = submit_file(
        url,
        None,
        dir.path(),
        "short",
        &sweep("short", 1, "max_iterations = 5\n")
            .replace("min_iterations = 3", "min_iterations = 5"),
    )
    .await;
    wait_sweep_finished(&pool, short, SWEEP_TIMEOUT).await;
    let id = short.to_string();
    let rows = json(
        &cli(url, None, &["results", &id, "--format", "json"]).await,
        "fleetmark results --format json",
    );
    let record: BenchResult =
        serde_json::from_value(rows[0]["result"].clone()).expect("a result record");
    assert_eq!(record.latencies_ms.len(), 5);
    let s = record.stability.as_ref().expect("a stability report");
    assert_eq!(s.stop_reason, fleetmark_core::StopReason::MaxIterations);
    assert!(!s.stable && s.spread.is_none(), "{s:?}");
    assert_eq!(
        rows[0]["result"]["latency"]["percentiles"]["p99"],
        Value::Null
    );
    assert_eq!(
        rows[0]["result"]["latency"]["percentiles"]["p50"],
        Value::Null
    );

    // The table says so in words, and marks the throughput unstable.
    let out = cli(url, None, &["results", &id, "--wide"]).await;
    assert_success(&out, "fleetmark results");
    let table = stdout(&out);
    assert!(
        table.contains("n/a*") && table.contains("not enough samples"),
        "{table}"
    );
    assert!(table.contains("(unstable)"), "{table}");
    // CSV carries the verdict as plain fields.
    let out = cli(url, None, &["results", &id, "--format", "csv"]).await;
    assert_success(&out, "fleetmark results --format csv");
    let csv = stdout(&out);
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let values: Vec<&str> = csv.lines().nth(1).unwrap().split(',').collect();
    // Counted from the end: the CPU's name, early in the row, may hold a quoted comma.
    let field = |name: &str| {
        let from_end = header.len() - header.iter().position(|h| *h == name).unwrap();
        values[values.len() - from_end]
    };
    assert_eq!(field("stable"), "false");
    assert_eq!(field("stop_reason"), "max_iterations");
    assert_eq!(field("p99_ci_ms"), "");
}

/// A stability report whose verdict does not follow from its own windows, or names no stop
/// reason, is refused at the wire by a plain gRPC client, and nothing is stored.
#[tokio::test]
async fn hostile_stability_reports_are_refused_and_nothing_is_stored() {
    let dir = scratch();
    let db = TestDb::new().await;
    let coord = Coordinator::start(
        "coordinator",
        dir.path(),
        &db.url,
        free_port(),
        &CoordinatorOpts::default(),
    )
    .await;
    let channel = tonic::transport::Channel::from_shared(coord.url.clone())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut client = pb::sweep_service_client::SweepServiceClient::new(channel);
    let admin = admin_token(&coord.url);

    let spec: fleetmark_core::JobSpec =
        fleetmark_core::SweepSpec::from_toml("batch_sizes=[1]\nprecisions=[\"f32\"]")
            .unwrap()
            .expand()
            .unwrap()
            .remove(0);
    let good = made_up_result(None, 1, "outsider", spec);
    let window = pb::MeasurementWindow {
        iterations: 10,
        seconds: 1.0,
        images_per_sec: 10.0,
    };
    let honest = pb::Stability {
        stable: false,
        stop_reason: pb::StopReason::MaxDuration as i32,
        spread: Some(0.5),
        windows: vec![window, window, window],
        required_windows: 3,
        window_seconds: 1.0,
        tolerance: 0.05,
        percentile_target_met: None,
    };
    let cases: Vec<(&str, pb::Stability)> = vec![
        (
            "claims stable with a spread over its tolerance",
            pb::Stability {
                stable: true,
                stop_reason: pb::StopReason::Stable as i32,
                ..honest.clone()
            },
        ),
        (
            "stopped as stable but is not",
            pb::Stability {
                spread: Some(0.01),
                stable: false,
                stop_reason: pb::StopReason::Stable as i32,
                ..honest.clone()
            },
        ),
        (
            "no stop reason",
            pb::Stability {
                stop_reason: 0,
                ..honest.clone()
            },
        ),
        (
            "an unknown stop reason",
            pb::Stability {
                stop_reason: 42,
                ..honest.clone()
            },
        ),
        (
            "a window with no iterations",
            pb::Stability {
                windows: vec![pb::MeasurementWindow {
                    iterations: 0,
                    ..window
                }],
                ..honest.clone()
            },
        ),
        (
            "a negative spread",
            pb::Stability {
                spread: Some(-1.0),
                ..honest.clone()
            },
        ),
    ];
    for (what, stability) in cases {
        let mut wire = pb::BenchResult::from(&good);
        wire.stability = Some(stability);
        let status = client
            .import_results(bearer(
                pb::ImportResultsRequest {
                    name: "hostile".into(),
                    results: vec![wire],
                },
                &admin,
            ))
            .await
            .expect_err(what);
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{what}: {status:?}"
        );
        assert!(status.message().contains("stability"), "{what}: {status:?}");
    }
    // A p99 interval out of order is refused too.
    let mut wire = pb::BenchResult::from(&good);
    wire.latency.as_mut().unwrap().p99_ci = Some(pb::PercentileEstimate {
        ms: 5.0,
        ci95_low_ms: 6.0,
        ci95_high_ms: 4.0,
    });
    let status = client
        .import_results(bearer(
            pb::ImportResultsRequest {
                name: "hostile".into(),
                results: vec![wire],
            },
            &admin,
        ))
        .await
        .expect_err("a reversed interval");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("p99"), "{status:?}");

    let pool = pool(&db.url).await;
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM results")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(stored, 0, "nothing stored");

    // The honest report is accepted and its columns are filled.
    let mut wire = pb::BenchResult::from(&good);
    wire.stability = Some(honest);
    client
        .import_results(bearer(
            pb::ImportResultsRequest {
                name: "honest".into(),
                results: vec![wire],
            },
            &admin,
        ))
        .await
        .expect("an honest report is accepted");
    let (stable, reason): (Option<bool>, Option<String>) =
        sqlx::query_as("SELECT stable, stop_reason::text FROM results")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        (stable, reason.as_deref()),
        (Some(false), Some("max_duration"))
    );
}
