//! The Candle model against itself: folding batch norm must not change the function, and the
//! measurement loop must produce consistent records on the CPU backend.

use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, Module};
use candle_nn::VarBuilder;
use fleetmark_core::{EnginePath, JobSpec, MeasurementSpec, Precision};
use fleetmark_engine::{
    correctness::compare,
    cpu::CpuBackend,
    input::{input_batch, INPUT_SEED},
    measure::{run_job, AgentIdentity, JobContext},
    resnet::ResNet18,
    ModelWeights,
};

fn logits(weights: &ModelWeights, fold: bool, batch: usize, size: usize) -> Vec<f32> {
    let vb = VarBuilder::from_tensors(weights.tensors.clone(), DType::F32, &Device::Cpu);
    let model = ResNet18::load(vb, fold).unwrap();
    let x = input_batch(INPUT_SEED, batch, size).unwrap();
    model
        .forward(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn folding_batch_norm_keeps_the_function() {
    let w = ModelWeights::seeded(3).unwrap();
    let plain = logits(&w, false, 2, 64);
    let folded = logits(&w, true, 2, 64);
    assert_eq!(plain.len(), 2000);
    let c = compare(&folded, &plain, 1e-4);
    assert!(c.passed, "{c:?}");
    assert!(
        c.max_rel_error > 0.0,
        "folding changes rounding, so exact equality means it did not fold"
    );
    // Images are independent of the batch they sit in.
    let single = logits(&w, false, 1, 64);
    assert!(compare(&single, &plain[..1000], 1e-5).passed);
}

#[test]
fn cpu_job_produces_a_consistent_record() {
    let w = ModelWeights::seeded(0).unwrap();
    let job = JobSpec {
        model: "resnet18".into(),
        batch_size: 2,
        precision: Precision::F32,
        image_size: 64,
        target: "cpu".parse().unwrap(),
        engine: EnginePath::Auto,
        weights: Default::default(),
        measurement: MeasurementSpec {
            warmup_iterations: 1,
            warmup_duration: std::time::Duration::ZERO,
            min_iterations: 5,
            min_duration: std::time::Duration::from_millis(50),
            // This test is about the record, not the stability rule: accept any spread.
            stability_window: std::time::Duration::from_millis(10),
            stability_tolerance: fleetmark_core::Fraction(10.0),
            ..Default::default()
        },
        repetition: 0,
    };
    let mut backend = CpuBackend::new();
    let mut phases = Vec::new();
    let r = run_job(
        &mut backend,
        &w,
        &job,
        &AgentIdentity {
            name: "test".into(),
            ..Default::default()
        },
        &JobContext::default(),
        &AtomicBool::new(false),
        &mut |p| phases.push(p.phase),
    )
    .unwrap();
    r.validate().unwrap();
    assert!(r.latencies_ms.len() >= 5);
    assert_eq!(r.latency.count as usize, r.latencies_ms.len());
    assert!(r.latency.p50_ms > 0.0 && r.latency.p99_ms >= r.latency.p50_ms);
    assert!(r.correctness.as_ref().unwrap().passed);
    assert_eq!(r.backend.path, "fused");
    // f32 on the fused path runs the NHWC executor, and the record says so.
    assert_eq!(r.backend.details["executor"], "nhwc-gemm");
    assert!(r.peak_memory_bytes > 0);
    assert_eq!(phases.first().map(|p| p.as_str()), Some("loading"));
    assert!(phases.iter().any(|p| p.as_str() == "timing"));
    // The stability report answers the rule it ran under.
    let s = r.stability.as_ref().expect("a stability report");
    assert_eq!(s.stop_reason, fleetmark_core::StopReason::Stable, "{s:?}");
    assert!(s.stable && s.windows.len() >= 3, "{s:?}");
    let in_windows: u32 = s.windows.iter().map(|w| w.iterations).sum();
    assert!(in_windows as usize <= r.latencies_ms.len());
}

#[test]
fn the_loop_stops_at_max_iterations_and_says_why() {
    let w = ModelWeights::seeded(0).unwrap();
    let mut job: JobSpec = serde_json::from_value(serde_json::json!({
        "model": "resnet18", "batch_size": 1, "precision": "f32", "image_size": 32, "target": "any"
    }))
    .unwrap();
    let m = &mut job.measurement;
    (m.warmup_iterations, m.warmup_duration) = (1, std::time::Duration::ZERO);
    (m.min_iterations, m.max_iterations) = (4, 4);
    m.min_duration = std::time::Duration::ZERO;
    let r = run_job(
        &mut CpuBackend::new(),
        &w,
        &job,
        &AgentIdentity {
            name: "test".into(),
            ..Default::default()
        },
        &JobContext::default(),
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .unwrap();
    r.validate().unwrap();
    assert_eq!(r.latencies_ms.len(), 4);
    let s = r.stability.as_ref().unwrap();
    assert_eq!(s.stop_reason, fleetmark_core::StopReason::MaxIterations);
    assert!(!s.stable, "4 short iterations close no 1 s window: {s:?}");
    // Four samples support no percentile interval.
    assert_eq!(r.latency.percentiles, Default::default());
}

#[test]
fn a_cancelled_job_stops() {
    let w = ModelWeights::seeded(0).unwrap();
    let mut job: JobSpec = serde_json::from_value(serde_json::json!({
        "model": "resnet18", "batch_size": 1, "precision": "f32", "image_size": 32, "target": "any"
    }))
    .unwrap();
    job.measurement.min_duration = std::time::Duration::from_secs(60);
    let err = run_job(
        &mut CpuBackend::new(),
        &w,
        &job,
        &AgentIdentity::default(),
        &JobContext::default(),
        &AtomicBool::new(true),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(
        matches!(err, fleetmark_engine::EngineError::Cancelled),
        "{err}"
    );
}

#[test]
fn a_cpu_refuses_bf16_in_one_line_and_permanently() {
    // It used to accept the job, fail it three times and store a multi-screen backtrace.
    let w = ModelWeights::seeded(0).unwrap();
    let job: JobSpec = serde_json::from_value(serde_json::json!({
        "model": "resnet18", "batch_size": 1, "precision": "bf16", "image_size": 32, "target": "any"
    }))
    .unwrap();
    let err = run_job(
        &mut CpuBackend::new(),
        &w,
        &job,
        &AgentIdentity::default(),
        &JobContext::default(),
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(err.is_permanent(), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.starts_with("unsupported: bf16 is not supported on the CPU"),
        "{msg}"
    );
    assert_eq!(msg.lines().count(), 1, "{msg}");
}
