//! Standalone round trip: `fleetmark-agent run` benchmarks a sweep file with no coordinator and
//! writes JSON lines; `fleetmark import` loads them; `fleetmark compare` shows them.

use std::collections::BTreeSet;

use fleetmark_core::BenchResult;
use fleetmark_e2e::*;
use serde_json::Value;

#[tokio::test]
async fn standalone_results_import_and_compare() {
    let dir = scratch();
    let sweep_file = dir.path().join("standalone.toml");
    let out_file = dir.path().join("results.jsonl");
    std::fs::write(&sweep_file, sweep_toml("standalone", &[1, 2], 32, "100ms")).expect("write");

    // Run it with no coordinator anywhere.
    let mut run = tokio::process::Command::from(command("fleetmark-agent"));
    run.arg("run")
        .arg("--sweep")
        .arg(&sweep_file)
        .arg("--out")
        .arg(&out_file)
        .args([
            "--device",
            "cpu",
            "--name",
            "offline-box",
            "--price-per-hour",
            "2",
        ])
        .kill_on_drop(true);
    let out = tokio::time::timeout(SWEEP_TIMEOUT, run.output())
        .await
        .expect("the standalone run finishes")
        .expect("run fleetmark-agent");
    assert_success(&out, "fleetmark-agent run");
    assert!(
        stderr(&out).contains("2 succeeded, 0 failed"),
        "{}",
        stderr(&out)
    );

    // One self-contained record per job.
    let text = std::fs::read_to_string(&out_file).expect("the results file");
    let records: Vec<BenchResult> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line ({e}): {l}")))
        .collect();
    assert_eq!(records.len(), 2, "{text}");
    for r in &records {
        r.validate().expect("a consistent record");
        assert_eq!(
            r.job_id, None,
            "standalone records belong to no coordinator job"
        );
        assert_eq!(r.agent_name, "offline-box");
        assert_eq!(r.price_per_hour, Some(2.0));
        assert_eq!(r.hardware_kind, "cpu");
        assert_eq!(r.spec.image_size, 32);
        assert!(r.images_per_sec > 0.0);
        assert!(r.correctness.as_ref().is_some_and(|c| c.passed));
    }
    let batches: BTreeSet<u32> = records.iter().map(|r| r.spec.batch_size).collect();
    assert_eq!(batches, BTreeSet::from([1, 2]));

    // Import into a running coordinator.
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
    let path = out_file.to_str().expect("utf-8 path");
    let out = cli(url, None, &["import", path, "--name", "offline"]).await;
    assert_success(&out, "fleetmark import");
    let sweep = parse_id(&out);
    assert!(
        stderr(&out).contains("imported 2 results"),
        "{}",
        stderr(&out)
    );

    let pool = pool(&db.url).await;
    assert_eq!(sweep_state(&pool, sweep).await.expect("state"), "imported");
    let js = jobs(&pool, sweep).await.expect("jobs");
    assert_eq!(js.len(), 2);
    assert!(js.iter().all(|j| j.state == "succeeded" && j.attempt == 1));
    let stored = results(&pool, sweep).await.expect("results");
    assert_eq!(stored.len(), 2);
    for s in &stored {
        let r = records
            .iter()
            .find(|r| r.spec.batch_size as i32 == s.batch_size)
            .expect("a record for this batch");
        assert_eq!(s.latencies, r.latencies_ms.len(), "raw latencies kept");
        assert!((s.images_per_sec - r.images_per_sec).abs() < 1e-9 * r.images_per_sec);
    }
    let (name, origin): (String, String) = sqlx::query_as(
        "SELECT name, origin FROM agents a JOIN results r ON r.agent_id = a.id LIMIT 1",
    )
    .fetch_one(&pool)
    .await
    .expect("the imported agent");
    assert_eq!(
        (name.as_str(), origin.as_str()),
        ("imported/offline-box", "imported")
    );

    // `compare` shows them in a cpu column, with images per dollar from the recorded price.
    let out = cli(
        url,
        None,
        &["compare", "--format", "json", "--image-size", "32"],
    )
    .await;
    assert_success(&out, "fleetmark compare");
    let rows: Value = serde_json::from_str(&stdout(&out)).expect("JSON rows");
    let rows = rows.as_array().expect("an array");
    assert_eq!(rows.len(), 2, "{rows:#?}");
    for row in rows {
        let b = row["batch_size"].as_u64().expect("batch") as u32;
        let r = records
            .iter()
            .find(|r| r.spec.batch_size == b)
            .expect("record");
        let cpu = &row["hardware"]["cpu"];
        let ips = cpu["images_per_sec"].as_f64().expect("a cpu column");
        assert!((ips - r.images_per_sec).abs() < 1e-9 * ips, "{row:#}");
        let per_dollar = cpu["images_per_dollar"].as_f64().expect("priced");
        assert!(
            (per_dollar - ips * 3600.0 / 2.0).abs() < 1e-6 * per_dollar,
            "{row:#}"
        );
    }

    // The imported agent is listed as such, not as an online agent.
    let out = cli(url, None, &["agents", "--format", "json"]).await;
    assert_success(&out, "fleetmark agents");
    let agents: Value = serde_json::from_str(&stdout(&out)).expect("JSON agents");
    assert_eq!(agents[0]["name"], "imported/offline-box");
    assert_eq!(agents[0]["state"], "imported");

    // Importing the same file again adds nothing: each record is reported as a duplicate.
    let out = cli(url, None, &["import", path]).await;
    assert_success(&out, "second fleetmark import");
    assert!(
        stdout(&out).trim().is_empty(),
        "no new sweep: {}",
        stdout(&out)
    );
    assert_eq!(
        stderr(&out).matches("duplicate").count(),
        2,
        "{}",
        stderr(&out)
    );
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM results")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(total, 2);
}

/// Records a real CUDA agent wrote (the committed H100 run of 2026-12-06: 12 fused results,
/// each with a plan detail of about 850 characters) import through a running coordinator whole,
/// their long details kept. Until details had their own limit, `fleetmark import` refused them
/// at line 1 and the coordinator would have refused them from an agent.
#[tokio::test]
async fn real_gpu_records_import_with_their_long_details() {
    let records = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/benchmarks/h100-2026-12-06/candle.jsonl"
    );
    let Stack { coord, db, .. } = Stack::start().await;
    let out = cli(
        coord.url.as_str(),
        None,
        &["import", records, "--name", "h100"],
    )
    .await;
    assert_success(&out, "fleetmark import");
    assert!(
        stderr(&out).contains("imported 12 results"),
        "{}",
        stderr(&out)
    );
    let sweep = parse_id(&out);
    let pool = pool(&db.url).await;
    assert_eq!(results(&pool, sweep).await.expect("results").len(), 12);
    let longest: i32 = sqlx::query_scalar(
        "SELECT max(length(record -> 'backend' -> 'details' ->> 'plan'))::int FROM results",
    )
    .fetch_one(&pool)
    .await
    .expect("stored details");
    assert!(longest > 512, "the plan detail is kept whole: {longest}");
}

/// A malformed sweep file stops `fleetmark-agent run` with one line that says what is wrong
/// once (the cause used to be printed twice, once in the message and once as its source).
#[tokio::test]
async fn a_malformed_sweep_file_is_named_once() {
    let dir = scratch();
    let sweep_file = dir.path().join("bad.toml");
    std::fs::write(&sweep_file, "batch_sizes = [1\n").expect("write");
    let never = dir.path().join("never.jsonl");
    let out = run_on_cpu(&sweep_file, &never, &[]).await;
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert_eq!(err.matches("unclosed array").count(), 1, "said once: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(!never.exists(), "no job ran");
}

/// A misspelt fused-path option stops the agent at start-up with one short line naming the
/// value and what is accepted, before any job runs (these used to be environment variables
/// whose bad values fell back silently).
#[tokio::test]
async fn a_bad_fused_option_stops_the_agent_with_one_line() {
    let dir = scratch();
    let sweep_file = dir.path().join("s.toml");
    std::fs::write(&sweep_file, sweep_toml("bad-flag", &[1], 32, "100ms")).expect("write");
    for (flag, value, accepted) in [
        ("--fused-conv-api", "backend", "auto, legacy, graph or 1x1"),
        ("--fused-pool", "cuDNN", "auto, cudnn or kernel"),
        ("--fused-stem-pool", "on", "auto, off or kernel"),
        ("--fused-layer-timing", "graphs", "auto, graph or launch"),
        (
            "--fused-stem-chunk",
            "many",
            "off, auto or a number of images",
        ),
    ] {
        let never = dir.path().join("never.jsonl");
        let out = run_on_cpu(&sweep_file, &never, &[&format!("{flag}={value}")]).await;
        let err = stderr(&out);
        assert!(!out.status.success(), "{flag}={value} was accepted: {err}");
        assert!(
            err.contains(value) && err.contains(accepted) && err.contains(flag),
            "{flag}={value}: {err}"
        );
        assert!(
            err.len() < 400,
            "a short error, not {} bytes: {err}",
            err.len()
        );
        assert!(
            !dir.path().join("never.jsonl").exists(),
            "no job ran for {flag}={value}"
        );
    }
}

/// `fleetmark-agent verify` takes the fused knobs `run` takes, so a lever configuration is
/// checked as it is benchmarked: a bad value stops it in one line naming the flag; good ones are
/// accepted and the check runs and judges (golden logits of zeros: the CPU path's real logits
/// are far from them, so it reports a failure and exits 1); golden files that are not what the
/// PyTorch script writes are refused clearly.
#[tokio::test]
async fn verify_takes_the_fused_knobs_and_judges_against_the_golden_file() {
    let dir = scratch();
    let weights = dir.path().join("w.safetensors");
    let input = dir.path().join("x.safetensors");
    let out = agent_output(&[
        "export".as_ref(),
        "--weights".as_ref(),
        weights.as_os_str(),
        "--input".as_ref(),
        input.as_os_str(),
        "--batch".as_ref(),
        "2".as_ref(),
        "--image-size".as_ref(),
        "64".as_ref(),
    ])
    .await;
    assert!(out.status.success(), "export: {}", stderr(&out));
    let zeros = dir.path().join("zeros.json");
    let row = vec![0.0f32; 1000];
    std::fs::write(
        &zeros,
        serde_json::json!({ "logits": [row, row] }).to_string(),
    )
    .expect("write");
    let binary = dir.path().join("binary.json");
    std::fs::write(&binary, b"\x00\xff\xfe").expect("write");
    let not_json = dir.path().join("not.json");
    std::fs::write(&not_json, "{ logits: oops").expect("write");
    let short = dir.path().join("short.json");
    std::fs::write(&short, r#"{"logits": [[1.0, 2.0]]}"#).expect("write");

    let verify = |golden: &std::path::Path, extra: &[&str]| {
        let mut args: Vec<std::ffi::OsString> = [
            "verify",
            "--precision",
            "f32",
            "--engine",
            "stock",
            "--json",
        ]
        .iter()
        .map(Into::into)
        .collect();
        for (flag, path) in [("--weights", &weights), ("--input", &input)] {
            args.push(flag.into());
            args.push(path.into());
        }
        args.push("--golden".into());
        args.push(golden.into());
        args.extend(extra.iter().map(Into::into));
        async move {
            let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
            agent_output(&refs).await
        }
    };

    let out = verify(&zeros, &["--fused-stem-chunk=many"]).await;
    let err = stderr(&out);
    assert!(!out.status.success(), "a bad knob was accepted: {err}");
    assert!(
        err.contains("--fused-stem-chunk") && err.contains("many"),
        "{err}"
    );
    assert!(stdout(&out).is_empty(), "nothing checked: {}", stdout(&out));

    let out = verify(
        &zeros,
        &[
            "--fused-stem-chunk=8",
            "--fused-pool=auto",
            "--fused-plan=timed",
        ],
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "far from zeros: {}",
        stderr(&out)
    );
    let checks: Value = serde_json::from_str(&stdout(&out)).expect("verify --json prints JSON");
    let check = &checks[0];
    assert_eq!(check["path"], "stock", "{checks}");
    assert_eq!(check["correctness"]["passed"], false, "{checks}");
    assert!(
        check["correctness"]["max_abs_error"]
            .as_f64()
            .unwrap_or(0.0)
            > 0.0,
        "{checks}"
    );

    for (golden, expect) in [
        (&binary, "valid UTF-8"),
        (&not_json, "not JSON"),
        (&short, "rows of 1000 logits"),
    ] {
        let out = verify(golden, &[]).await;
        let err = stderr(&out);
        assert!(!out.status.success(), "{}: {err}", golden.display());
        assert_eq!(err.matches(expect).count(), 1, "said once: {err}");
        assert!(err.len() < 400, "a short error: {err}");
    }
}

/// `fleetmark-agent cudnn-device` on a build without cuDNN (this test's, a CPU build) says so
/// in one line and fails; given something that is not one GPU, it says what it takes.
#[tokio::test]
async fn cudnn_device_refuses_clearly_where_it_cannot_run() {
    for (args, expect) in [
        (
            vec!["cudnn-device", "--device", "cuda:0"],
            "built without cuDNN",
        ),
        (vec!["cudnn-device", "--device", "cpu"], "takes one GPU"),
    ] {
        let os_args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
        let out = agent_output(&os_args).await;
        let err = stderr(&out);
        assert!(!out.status.success(), "{args:?} succeeded: {err}");
        assert!(err.contains(expect), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: one line: {err}");
        assert!(stdout(&out).is_empty(), "{args:?}: nothing on stdout");
    }
}

/// `fleetmark-agent run --sweep SWEEP --out OUT --device cpu EXTRA...`, run to its end.
async fn run_on_cpu(
    sweep: &std::path::Path,
    out: &std::path::Path,
    extra: &[&str],
) -> std::process::Output {
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "run".as_ref(),
        "--sweep".as_ref(),
        sweep.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
        "--device".as_ref(),
        "cpu".as_ref(),
    ];
    args.extend(extra.iter().map(|a| std::ffi::OsStr::new(*a)));
    agent_output(&args).await
}

/// `fleetmark-agent ARGS`, run to its end (within the sweep timeout), and what it printed.
async fn agent_output(args: &[&std::ffi::OsStr]) -> std::process::Output {
    let mut cmd = tokio::process::Command::from(command("fleetmark-agent"));
    cmd.args(args).kill_on_drop(true);
    tokio::time::timeout(SWEEP_TIMEOUT, cmd.output())
        .await
        .expect("the agent exits")
        .expect("run fleetmark-agent")
}
