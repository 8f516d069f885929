//! The whole system, as users run it: a coordinator process, two CPU agent processes running
//! real ResNet18 forward passes, and the `fleetmark` CLI, over gRPC on loopback.

use std::collections::{BTreeSet, HashMap};

use fleetmark_core::BenchResult;
use fleetmark_e2e::*;
use serde_json::Value;
use uuid::Uuid;

fn json(out: &std::process::Output, what: &str) -> Value {
    assert_success(out, what);
    serde_json::from_str(&stdout(out))
        .unwrap_or_else(|e| panic!("{what} printed no JSON ({e}):\n{}", stdout(out)))
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs())
}

#[tokio::test]
async fn a_sweep_runs_on_two_cpu_agents_and_its_results_reach_the_cli_and_postgres() {
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
    let _a = start_agent(
        "e2e-cpu-1",
        dir.path(),
        url,
        "cpu",
        &["--price-per-hour", "0.5", "--labels", "zone=test"],
    );
    let _b = start_agent("e2e-cpu-2", dir.path(), url, "cpu", &[]);
    wait_agents_online(&coord.client(), &["e2e-cpu-1", "e2e-cpu-2"]).await;

    // `agents`: both online, with their device, price and labels.
    let agents = json(
        &cli(url, None, &["agents", "--format", "json"]).await,
        "fleetmark agents",
    );
    let agents = agents.as_array().expect("an array of agents");
    assert_eq!(agents.len(), 2, "{agents:#?}");
    for a in agents {
        assert_eq!(a["state"], "online", "{a:#?}");
        assert_eq!(a["devices"][0]["device"], "cpu", "{a:#?}");
        assert_eq!(a["devices"][0]["kind"], "cpu", "{a:#?}");
        assert!(
            Uuid::parse_str(a["agent_id"].as_str().unwrap_or_default()).is_ok(),
            "{a:#?}"
        );
    }
    let one = agents
        .iter()
        .find(|a| a["name"] == "e2e-cpu-1")
        .expect("e2e-cpu-1 listed");
    assert_eq!(one["price_per_hour"], 0.5);
    assert_eq!(one["labels"]["zone"], "test");

    // Submit from flags, then follow it to the end.
    let out = cli(
        url,
        None,
        &[
            "submit",
            "--name",
            "e2e",
            "--batch",
            "1,2,3,4",
            "--precision",
            "f32",
            "--gpu",
            "any",
            "--image-size",
            "32",
            "--warmup",
            "1",
            "--min-iterations",
            "3",
            "--min-duration",
            "100ms",
            "--stability-window",
            "10ms",
            "--stability-tolerance",
            "10",
        ],
    )
    .await;
    assert_success(&out, "fleetmark submit");
    let sweep = parse_id(&out);
    let sweep_s = sweep.to_string();

    let out = cli(url, None, &["watch", &sweep_s]).await;
    assert_success(&out, "fleetmark watch");
    assert!(
        stderr(&out).contains("4 of 4 jobs succeeded"),
        "watch summary:\n{}",
        stderr(&out)
    );

    // `results --format json`: one row per job, whole records with raw latencies.
    let rows = json(
        &cli(url, None, &["results", &sweep_s, "--format", "json"]).await,
        "fleetmark results",
    );
    let rows = rows.as_array().expect("an array of results");
    assert_eq!(rows.len(), 4, "{rows:#?}");
    let mut cli_results: HashMap<Uuid, BenchResult> = HashMap::new();
    for row in rows {
        assert_eq!(row["sweep_id"], sweep_s.as_str());
        let id = Uuid::parse_str(row["result_id"].as_str().expect("result_id")).expect("uuid");
        let r: BenchResult = serde_json::from_value(row["result"].clone())
            .unwrap_or_else(|e| panic!("not a result record ({e}): {row:#}"));
        r.validate().expect("a consistent record");
        assert_eq!(
            r.latency.count as usize,
            r.latencies_ms.len(),
            "count == raw latencies"
        );
        assert!(
            r.latencies_ms.len() >= 3,
            "min_iterations honoured: {}",
            r.latencies_ms.len()
        );
        assert!(
            r.latency.p50_ms > 0.0 && r.latency.p50_ms <= r.latency.p99_ms,
            "{:?}",
            r.latency
        );
        assert!(r.latency.min_ms <= r.latency.p50_ms && r.latency.p99_ms <= r.latency.max_ms);
        assert!(r.images_per_sec > 0.0 && r.images_per_sec.is_finite());
        let gate = r
            .correctness
            .as_ref()
            .expect("a real CPU run checks correctness");
        assert!(gate.passed, "correctness gate: {gate:?}");
        assert!(!r.backend.simulated);
        assert_eq!(r.hardware_kind, "cpu");
        assert_eq!(r.spec.image_size, 32);
        assert_eq!(r.attempt, 1);
        assert!(r.job_id.is_some());
        assert!(["e2e-cpu-1", "e2e-cpu-2"].contains(&r.agent_name.as_str()));
        cli_results.insert(id, r);
    }
    let batches: BTreeSet<u32> = cli_results.values().map(|r| r.spec.batch_size).collect();
    assert_eq!(batches, BTreeSet::from([1, 2, 3, 4]));

    // The same rows are in Postgres, one per job, from the agent and attempt the job names.
    let pool = pool(&db.url).await;
    let (jobs, stored) = assert_sweep_complete_once(&pool, sweep, 4).await;
    for s in &stored {
        let r = cli_results
            .get(&s.id)
            .unwrap_or_else(|| panic!("stored result {} missing from the CLI output", s.id));
        assert_eq!(r.job_id, Some(s.job_id));
        assert_eq!(r.spec.batch_size as i32, s.batch_size);
        assert_eq!(r.latencies_ms.len(), s.latencies);
        // The record travels as JSON (jsonb in Postgres, then the CLI's output), whose float
        // parsing may differ from the summary column in the last bit.
        assert!(
            close(r.images_per_sec, s.images_per_sec),
            "{} vs {}",
            r.images_per_sec,
            s.images_per_sec
        );
        assert!(
            close(r.latency.p50_ms, s.p50_ms),
            "{} vs {}",
            r.latency.p50_ms,
            s.p50_ms
        );
        assert_eq!(s.hardware_kind, "cpu");
        assert!(!s.simulated);
    }
    assert!(jobs.iter().all(|j| j.attempt == 1), "no retries: {jobs:#?}");
    // Both agents took work.
    let ran: BTreeSet<Uuid> = stored.iter().map(|s| s.agent_id).collect();
    assert_eq!(
        ran.len(),
        2,
        "both agents should have run jobs: {stored:#?}"
    );

    // `sweeps`: the sweep is listed as completed, 4 of 4.
    let sweeps = json(
        &cli(url, None, &["sweeps", "--format", "json"]).await,
        "fleetmark sweeps",
    );
    let listed = sweeps
        .as_array()
        .expect("array")
        .iter()
        .find(|s| s["sweep_id"] == sweep_s.as_str())
        .expect("the sweep is listed")
        .clone();
    assert_eq!(listed["state"], "completed");
    assert_eq!(listed["jobs"], 4);
    assert_eq!(listed["finished"], 4);

    // `compare`: one row per batch size with a cpu column, the baseline of itself.
    let rows = json(
        &cli(
            url,
            None,
            &["compare", "--format", "json", "--image-size", "32"],
        )
        .await,
        "fleetmark compare",
    );
    let rows = rows.as_array().expect("array of rows");
    assert_eq!(rows.len(), 4, "{rows:#?}");
    for row in rows {
        let b = row["batch_size"].as_u64().expect("batch_size") as u32;
        let cpu = &row["hardware"]["cpu"];
        let ips = cpu["images_per_sec"].as_f64().expect("a cpu column");
        let expected = cli_results
            .values()
            .find(|r| r.spec.batch_size == b)
            .expect("a result for this batch")
            .images_per_sec;
        assert!(
            close(ips, expected),
            "compare shows the stored throughput: {row:#}"
        );
        assert_eq!(cpu["results"], 1);
        assert_eq!(cpu["speedup"], 1.0);
        assert_eq!(row["precision"], "f32");
        assert_eq!(row["image_size"], 32);
    }

    // The table renderings work too (the agent column is among --wide's).
    let out = cli(url, None, &["results", &sweep_s, "--wide"]).await;
    assert_success(&out, "fleetmark results (table)");
    assert!(stdout(&out).contains("e2e-cpu-"), "{}", stdout(&out));
}
