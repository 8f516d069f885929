//! Property tests (bounded, a few seconds each): sweep TOML parsing and result validation never
//! panic or hang, whatever the input, and their errors stay short.

use std::collections::BTreeMap;

use chrono::Utc;
use fleetmark_core::{
    limits::MAX_ERROR_CHARS, BackendInfo, BenchResult, Correctness, LatencyStats, MetricSummary,
    SweepSpec, Telemetry,
};
use proptest::prelude::*;

const GOOD_SWEEP: &str = "name = \"p\"\nbatch_sizes = [1, 8]\nprecisions = [\"f32\"]\n\
    gpus = [\"any\"]\nimage_size = 32\n[measurement]\nmin_iterations = 3\nmin_duration = \"1s\"\n";

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        max_shrink_iters: 200,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn check_sweep(text: &str) {
    if let Err(e) = SweepSpec::from_toml(text) {
        let msg = e.to_string();
        assert!(
            msg.chars().count() < MAX_ERROR_CHARS + 100,
            "a {}-character error",
            msg.chars().count()
        );
    }
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn any_text_is_a_sweep_or_a_short_error(text in ".{0,400}") {
        check_sweep(&text);
    }

    #[test]
    fn mutated_sweeps_are_handled(
        cut in 0usize..GOOD_SWEEP.len(),
        insert in "[\\[\\]{}=\"'0-9a-z\\n ,.\\\\-]{0,20}",
    ) {
        let mut text = GOOD_SWEEP.to_string();
        text.insert_str(cut, &insert);
        check_sweep(&text);
        check_sweep(&GOOD_SWEEP[..cut]);
    }

    #[test]
    fn sweep_fields_take_any_values(
        batch in any::<i64>(),
        size in any::<i64>(),
        reps in any::<i64>(),
        name in "\\PC{0,300}",
        weights in "\\PC{0,80}",
        duration in "[0-9a-z ]{0,12}",
    ) {
        let text = format!(
            "name = {name:?}\nbatch_sizes = [{batch}]\nprecisions = [\"f16\"]\nimage_size = {size}\n\
             repetitions = {reps}\nweights = {{ kind = \"file\", path = {weights:?} }}\n\
             [measurement]\nmin_duration = {duration:?}\n"
        );
        check_sweep(&text);
    }
}

fn good_result() -> BenchResult {
    let spec = SweepSpec::from_toml(GOOD_SWEEP)
        .unwrap()
        .expand()
        .unwrap()
        .remove(0);
    let latencies = vec![2.0, 3.0, 4.0, 5.0];
    let latency = LatencyStats::from_samples(&latencies).unwrap();
    let now = Utc::now();
    BenchResult {
        schema: fleetmark_core::RESULT_SCHEMA_VERSION,
        job_id: None,
        attempt: 1,
        agent_name: "a".into(),
        agent_labels: BTreeMap::new(),
        price_per_hour: Some(1.0),
        hardware_kind: "cpu".into(),
        hardware_name: "cpu".into(),
        device: "cpu".into(),
        images_per_sec: latency.images_per_sec(spec.batch_size),
        spec,
        backend: BackendInfo::default(),
        weights: Default::default(),
        latency,
        input_copy: None,
        peak_memory_bytes: 1,
        memory_scope: "process-rss".into(),
        warmup_iterations: 1,
        timed_seconds: 0.02,
        telemetry: Some(Telemetry {
            samples: 1,
            power_watts: Some(MetricSummary {
                min: 1.0,
                mean: 2.0,
                max: 3.0,
            }),
            ..Default::default()
        }),
        correctness: Some(Correctness {
            max_rel_error: 1e-6,
            top1_agreement: 1.0,
            bound: 1e-4,
            passed: true,
            ..Default::default()
        }),
        environment: Default::default(),
        host: Default::default(),
        started_at: now,
        finished_at: now,
        latencies_ms: latencies,
        stability: None,
    }
}

fn number() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<f64>(),
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(-1.0),
        Just(0.0),
        Just(1e308),
        0.0f64..100.0,
    ]
}

proptest! {
    #![proptest_config(config(1024))]

    #[test]
    fn a_valid_record_stays_valid_only_if_consistent(
        field in 0usize..16,
        x in number(),
        raw in proptest::collection::vec(number(), 0..20),
    ) {
        good_result().validate().unwrap();
        let mut r = good_result();
        match field {
            0 => r.images_per_sec = x,
            1 => r.latency.mean_ms = x,
            2 => r.latency.min_ms = x,
            3 => r.latency.max_ms = x,
            4 => r.latency.p50_ms = x,
            5 => r.latency.p90_ms = x,
            6 => r.latency.p99_ms = x,
            7 => r.latency.ci95_low_ms = x,
            8 => r.latency.ci95_high_ms = x,
            9 => r.latency.std_ms = x,
            10 => r.correctness.as_mut().unwrap().max_rel_error = x,
            11 => r.correctness.as_mut().unwrap().top1_agreement = x,
            12 => r.telemetry.as_mut().unwrap().power_watts.as_mut().unwrap().mean = x,
            13 => r.price_per_hour = Some(x),
            14 => r.timed_seconds = x,
            _ => {
                r.latency = LatencyStats::from_samples(&raw).unwrap_or(r.latency);
                r.latencies_ms = raw;
                r.images_per_sec = r.latency.images_per_sec(r.spec.batch_size);
            }
        }
        match r.validate() {
            Ok(()) => {
                // Whatever passed is sane: finite, ordered, consistent throughput.
                let l = &r.latency;
                let le = |a: f64, b: f64| a <= b + 1e-9 * a.abs().max(b.abs());
                prop_assert!(r.images_per_sec.is_finite() && r.images_per_sec >= 0.0);
                prop_assert!(le(l.min_ms, l.p50_ms) && le(l.p50_ms, l.p90_ms));
                prop_assert!(le(l.p90_ms, l.p99_ms) && le(l.p99_ms, l.max_ms));
                prop_assert!(le(l.min_ms, l.mean_ms) && le(l.mean_ms, l.max_ms));
                let expected = l.images_per_sec(r.spec.batch_size);
                prop_assert!((r.images_per_sec - expected).abs() <= 0.01 * expected);
                prop_assert!(r.latencies_ms.iter().all(|x| x.is_finite() && *x >= 0.0));
            }
            Err(e) => prop_assert!(e.to_string().len() < 300, "{e}"),
        }
    }

    #[test]
    fn any_json_record_is_handled(json in "\\PC{0,300}", field in "[a-z_]{1,20}", value in "\\PC{0,20}") {
        let _ = serde_json::from_str::<BenchResult>(&json).map(|r| r.validate());
        let mut v = serde_json::to_value(good_result()).unwrap();
        v[field] = serde_json::Value::String(value);
        let _ = serde_json::from_value::<BenchResult>(v).map(|r| r.validate());
    }
}
