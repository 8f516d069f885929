//! `fleetmark history` and `fleetmark compare --by-node` through the real binary against a
//! coordinator over a real socket, fed by `fleetmark import` with records that differ in the
//! software that made them (history) and in the node that ran them (by node).

mod common;

use chrono::{DateTime, Duration, Utc};
use common::{fleetmark, write, Live};
use fleetmark_core::{
    BackendInfo, BenchResult, Fingerprint, GpuInfo, HostInventory, JobSpec, LatencyStats, SweepSpec,
};
use serde_json::Value;

/// A valid h100 record of batch 8, f16, at about `ms` per batch (200 samples, ± 1%), made by
/// `commit` on GPU `uuid`, finished `minutes` after noon.
fn record(commit: &str, uuid: &str, ms: f64, minutes: i64) -> String {
    let spec: JobSpec = SweepSpec::from_toml(
        "batch_sizes = [8]\nprecisions = [\"f16\"]\nimage_size = 224\ngpus = [\"h100\"]\n",
    )
    .expect("spec")
    .expand()
    .expect("jobs")
    .remove(0);
    let latencies: Vec<f64> = (0..200).map(|i| ms * (0.99 + 0.0001 * i as f64)).collect();
    let latency = LatencyStats::from_samples(&latencies).expect("stats");
    let at: DateTime<Utc> = "2026-12-01T12:00:00Z"
        .parse::<DateTime<Utc>>()
        .expect("time")
        + Duration::minutes(minutes);
    let r = BenchResult {
        schema: fleetmark_core::RESULT_SCHEMA_VERSION,
        job_id: None,
        attempt: 0,
        agent_name: format!("node-{}", &uuid[4..8]),
        agent_labels: Default::default(),
        price_per_hour: None,
        hardware_kind: "h100".into(),
        hardware_name: "NVIDIA H100 80GB HBM3".into(),
        device: "cuda:0".into(),
        images_per_sec: latency.images_per_sec(8),
        spec,
        backend: BackendInfo {
            backend: "candle-cuda".into(),
            path: "fused".into(),
            math: "f16".into(),
            details: Default::default(),
            simulated: false,
        },
        weights: Default::default(),
        latency,
        input_copy: None,
        peak_memory_bytes: 1 << 30,
        memory_scope: "device".into(),
        warmup_iterations: 10,
        timed_seconds: 1.0,
        telemetry: None,
        correctness: None,
        environment: Fingerprint {
            fleetmark_version: "0.1.0".into(),
            git_commit: commit.into(),
            cuda_driver_version: "13.0".into(),
            cudnn_version: "9.19.0".into(),
            ..Default::default()
        },
        host: HostInventory {
            hostname: format!("host-{}", &uuid[4..8]),
            gpus: vec![GpuInfo {
                index: 0,
                name: "NVIDIA H100 80GB HBM3".into(),
                uuid: uuid.into(),
                driver_version: "580.159.04".into(),
                cuda_driver_version: "13.0".into(),
                compute_capability: "9.0".into(),
                ..Default::default()
            }],
            ..Default::default()
        },
        started_at: at - Duration::seconds(2),
        finished_at: at,
        latencies_ms: latencies,
        stability: None,
    };
    r.validate().expect("the made-up record is valid");
    serde_json::to_string(&r).expect("json")
}

fn json(out: &std::process::Output, what: &str) -> Value {
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{what}: not JSON ({e})"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_flags_a_slower_commit_and_by_node_flags_a_slow_gpu() {
    let live = Live::start().await;
    let url = live.url.as_str();
    let dir = tempfile::tempdir().expect("temp dir");
    // Commit aaaa on three GPUs (the third 15% slower), then commit bbbb 20% slower on the
    // first GPU: that GPU's history sees two records and a regression at bbbb.
    let lines = [
        record("aaaa0000", "GPU-1111-aaaa-0000", 2.00, 0),
        record("aaaa0000", "GPU-1111-aaaa-0000", 2.01, 1),
        record("aaaa0000", "GPU-2222-bbbb-0000", 2.02, 2),
        record("aaaa0000", "GPU-3333-cccc-0000", 2.35, 3),
        record("bbbb0000", "GPU-1111-aaaa-0000", 2.50, 30),
        record("bbbb0000", "GPU-1111-aaaa-0000", 2.51, 31),
    ];
    let file = write(dir.path(), "runs.jsonl", &(lines.join("\n") + "\n"));
    let out = fleetmark(url, &["import", &file, "--name", "history"]).await;
    assert!(
        out.status.success(),
        "import: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let hist = json(
        &fleetmark(
            url,
            &[
                "history",
                "--gpu",
                "h100",
                "--precision",
                "f16",
                "--batch",
                "8",
                "--node",
                "GPU-1111-aaaa-0000",
                "--format",
                "json",
            ],
        )
        .await,
        "fleetmark history",
    );
    let recs = hist.as_array().expect("records");
    assert_eq!(recs.len(), 2, "{hist:#}");
    assert_eq!(recs[0]["software"]["git_commit"], "aaaa0000");
    assert_eq!(recs[0]["results"], 2);
    assert!(recs[0]["change"].is_null(), "{hist:#}");
    assert_eq!(recs[1]["software"]["git_commit"], "bbbb0000");
    assert_eq!(recs[1]["software"]["driver_version"], "580.159.04");
    assert_eq!(recs[1]["change"], "regression", "{hist:#}");
    let table = fleetmark(
        url,
        &[
            "history",
            "--gpu",
            "h100",
            "--precision",
            "f16",
            "--batch",
            "8",
            "--node",
            "GPU-1111-aaaa-0000",
            "--wide",
        ],
    )
    .await;
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("regression"), "{text}");
    // Another point has no history: said on stderr, an empty JSON array on stdout.
    let none = json(
        &fleetmark(
            url,
            &[
                "history",
                "--gpu",
                "t4",
                "--precision",
                "f16",
                "--batch",
                "8",
                "--format",
                "json",
            ],
        )
        .await,
        "fleetmark history (none)",
    );
    assert_eq!(none, Value::Array(vec![]));
    // A nonsense precision is a usage error (exit 2), not an empty answer.
    let bad = fleetmark(
        url,
        &[
            "history",
            "--gpu",
            "h100",
            "--precision",
            "f12",
            "--batch",
            "8",
        ],
    )
    .await;
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");

    // By node: three GPUs at this point; the 15%-slower one is flagged, by its UUID.
    let nodes = json(
        &fleetmark(
            url,
            &[
                "compare",
                "--by-node",
                "--until",
                "2026-12-01T12:10:00Z",
                "--format",
                "json",
            ],
        )
        .await,
        "fleetmark compare --by-node",
    );
    let point = &nodes.as_array().expect("points")[0];
    assert_eq!(point["hardware_kind"], "h100");
    assert_eq!(point["nodes"], 3, "{nodes:#}");
    let slow: Vec<&str> = point["node_cells"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["slow"] == true)
        .map(|n| n["node"].as_str().unwrap())
        .collect();
    assert_eq!(slow, ["GPU-3333-cccc-0000"], "{nodes:#}");
    let table = fleetmark(
        url,
        &[
            "compare",
            "--by-node",
            "--until",
            "2026-12-01T12:10:00Z",
            "--wide",
        ],
    )
    .await;
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("GPU-3333-ccc"), "{text}");
    // --by-node has no baseline: asking for one is a usage error.
    let bad = fleetmark(url, &["compare", "--by-node", "--baseline", "h100"]).await;
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
}
