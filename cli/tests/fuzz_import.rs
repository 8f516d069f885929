//! Property tests for `fleetmark import`'s reader: any text is a list of valid records or one
//! short error naming the line; never a panic.

use fleetmark::parse_records;
use proptest::prelude::*;

/// One valid record as a JSON line.
fn record() -> String {
    use fleetmark_core::{BenchResult, LatencyStats, SweepSpec};
    let spec = SweepSpec::from_toml("batch_sizes = [2]\nprecisions = [\"f32\"]\nimage_size = 32")
        .expect("spec")
        .expand()
        .expect("jobs")
        .remove(0);
    let latencies = vec![3.0, 4.0, 5.0];
    let latency = LatencyStats::from_samples(&latencies).expect("stats");
    let now = chrono::Utc::now();
    let r = BenchResult {
        schema: fleetmark_core::RESULT_SCHEMA_VERSION,
        job_id: None,
        attempt: 0,
        agent_name: "offline".into(),
        agent_labels: Default::default(),
        price_per_hour: Some(1.5),
        hardware_kind: "cpu".into(),
        hardware_name: "test cpu".into(),
        device: "cpu".into(),
        images_per_sec: latency.images_per_sec(spec.batch_size),
        spec,
        backend: Default::default(),
        weights: Default::default(),
        latency,
        input_copy: None,
        peak_memory_bytes: 0,
        memory_scope: "process-rss".into(),
        warmup_iterations: 1,
        timed_seconds: 0.012,
        telemetry: None,
        correctness: None,
        environment: Default::default(),
        host: Default::default(),
        started_at: now,
        finished_at: now,
        latencies_ms: latencies,
        stability: None,
    };
    serde_json::to_string(&r).expect("json")
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 1024,
        max_shrink_iters: 200,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_text_parses_or_fails_cleanly(text in "\\PC{0,400}") {
        if let Err(e) = parse_records(&text, "fuzz.jsonl") {
            prop_assert!(e.to_string().len() < 600, "{e}");
        }
    }

    #[test]
    fn mutated_records_parse_or_fail_cleanly(
        at in any::<usize>(),
        insert in "[\\[\\]{}:,\"0-9a-zA-Z.eE+\\-\\n ]{0,12}",
    ) {
        let good = record();
        let good = good.as_str();
        prop_assert_eq!(parse_records(good, "good").map(|r| r.len()).ok(), Some(1));
        let mut boundary = at % good.len();
        while !good.is_char_boundary(boundary) {
            boundary -= 1;
        }
        let mut text = good.to_string();
        text.insert_str(boundary, &insert);
        for t in [text.as_str(), &good[..boundary]] {
            match parse_records(t, "fuzz.jsonl") {
                Ok(rs) => for r in rs { prop_assert!(r.validate().is_ok()) },
                Err(e) => prop_assert!(e.to_string().len() < 600, "{e}"),
            }
        }
    }
}
