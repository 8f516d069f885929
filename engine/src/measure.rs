//! The measurement loop: prepare, check the output against the reference, warm up, then time
//! iterations until the minimum count and duration are reached and the stability rule holds
//! (or a maximum is reached), sampling telemetry over exactly the timed window. When to stop is
//! decided by `fleetmark_core::stability::Timing`, pure logic tested on synthetic series.

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use chrono::Utc;
use fleetmark_core::{
    BenchResult, HostInventory, JobSpec, LatencyStats, MeasurementSpec, StopReason, Timing,
    RESULT_SCHEMA_VERSION,
};
use uuid::Uuid;

use crate::{
    backend::Backend,
    correctness::{bound_for, compare, reference_logits, GATE_IMAGES},
    EngineError, ModelWeights,
};

/// Who ran a job, copied into every result.
#[derive(Debug, Clone, Default)]
pub struct AgentIdentity {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub price_per_hour: Option<f64>,
    pub host: HostInventory,
}

/// Which coordinator job (and attempt) a run answers; empty for standalone runs.
#[derive(Debug, Clone, Default)]
pub struct JobContext {
    pub job_id: Option<Uuid>,
    pub attempt: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Loading,
    Checking,
    Warmup,
    Timing,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Loading => "loading",
            Phase::Checking => "checking",
            Phase::Warmup => "warmup",
            Phase::Timing => "timing",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub phase: Phase,
    pub iterations: u32,
    /// Estimated fraction of the job done, 0..1.
    pub fraction: f64,
}

/// How often progress is reported while iterating; often enough for a live bar, rare enough to
/// cost nothing next to an iteration.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

fn check_cancel(cancel: &AtomicBool) -> Result<(), EngineError> {
    if cancel.load(Ordering::Relaxed) {
        Err(EngineError::Cancelled)
    } else {
        Ok(())
    }
}

/// Runs `job` on `backend` and returns its result record.
pub fn run_job(
    backend: &mut dyn Backend,
    weights: &ModelWeights,
    job: &JobSpec,
    identity: &AgentIdentity,
    ctx: &JobContext,
    cancel: &AtomicBool,
    on_progress: &mut dyn FnMut(Progress),
) -> Result<BenchResult, EngineError> {
    job.validate()
        .map_err(|e| EngineError::Unsupported(e.to_string()))?;
    // A device that cannot run the precision refuses before touching it, in one line: this is
    // deterministic, so the job fails permanently instead of being retried.
    fleetmark_core::capability::check_precision(backend.class(), job.precision)
        .map_err(EngineError::Unsupported)?;
    let started_at = Utc::now();
    let m = &job.measurement;
    on_progress(Progress {
        phase: Phase::Loading,
        iterations: 0,
        fraction: 0.0,
    });
    let device = backend.device();
    let (hardware_kind, hardware_name) = backend.hardware();
    let (cuda_driver_version, cudnn_version) = backend.driver_versions();
    // `prepare` borrows the backend for as long as the prepared model lives, so take the
    // telemetry source first.
    let telemetry_source = backend.telemetry_source();
    let mut prepared = backend.prepare(job, weights)?;
    let info = prepared.info();
    check_cancel(cancel)?;

    // The gate: a wrong answer fast is not a result.
    let correctness = if info.simulated {
        None
    } else {
        on_progress(Progress {
            phase: Phase::Checking,
            iterations: 0,
            fraction: 0.05,
        });
        let images = (job.batch_size as usize).min(GATE_IMAGES);
        let reference = reference_logits(weights, images, job.image_size as usize)?;
        let candidate = prepared.logits()?;
        let bound = bound_for(prepared.math());
        let c = compare(&candidate, &reference, bound);
        if !c.passed {
            return Err(EngineError::Correctness(format!(
                "{} {} output differs from the CPU f32 reference: max relative error {:.3e} \
                 over the bound {:.1e} (top-1 agreement {:.0}%)",
                info.path,
                info.math,
                c.max_rel_error,
                c.bound,
                c.top1_agreement * 100.0
            )));
        }
        Some(c)
    };
    check_cancel(cancel)?;

    // Warm-up: caches, allocator pools, autotuners and clocks settle before anything counts.
    let warmup_start = Instant::now();
    let mut warmup_iterations = 0u32;
    let mut last_report = Instant::now();
    while warmup_iterations < m.warmup_iterations || warmup_start.elapsed() < m.warmup_duration {
        prepared.timed_iteration()?;
        warmup_iterations += 1;
        check_cancel(cancel)?;
        if last_report.elapsed() >= PROGRESS_EVERY {
            last_report = Instant::now();
            on_progress(Progress {
                phase: Phase::Warmup,
                iterations: warmup_iterations,
                fraction: 0.1,
            });
        }
        if warmup_start.elapsed() >= m.max_duration {
            break;
        }
    }

    on_progress(Progress {
        phase: Phase::Timing,
        iterations: 0,
        fraction: 0.1,
    });
    prepared.reset_peak_memory();
    let sampler = telemetry_source.as_ref().map(|t| t.start());
    let mut timing = Timing::new(m, job.batch_size);
    let mut copies = Vec::new();
    let timing_start = Instant::now();
    let outcome: Result<StopReason, EngineError> = (|| loop {
        if m.time_input_copy {
            if let Some(d) = prepared.timed_input_copy()? {
                copies.push(d.as_secs_f64() * 1e3);
            }
        }
        let d = prepared.timed_iteration()?;
        let elapsed = timing_start.elapsed();
        if let Some(reason) = timing.record(d.as_secs_f64() * 1e3, elapsed) {
            return Ok(reason);
        }
        check_cancel(cancel)?;
        if last_report.elapsed() >= PROGRESS_EVERY {
            last_report = Instant::now();
            on_progress(Progress {
                phase: Phase::Timing,
                iterations: timing.iterations(),
                fraction: 0.1 + 0.9 * timing_fraction(m, &timing, elapsed),
            });
        }
    })();
    let timed_seconds = timing_start.elapsed().as_secs_f64();
    let telemetry = sampler.map(|s| s.stop());
    let stop_reason = outcome?;
    let (latencies, stability) = timing.finish(stop_reason);
    let (peak_memory_bytes, memory_scope) = prepared.peak_memory();
    drop(prepared);

    let latency = LatencyStats::from_samples(&latencies)
        .ok_or_else(|| EngineError::Unsupported("no iteration completed".into()))?;
    let images_per_sec = latency.images_per_sec(job.batch_size);
    let mut environment = crate::versions::fingerprint();
    environment.cuda_driver_version = cuda_driver_version;
    environment.cudnn_version = cudnn_version;
    // A detail longer than a result may carry would get the whole result refused by the
    // coordinator and by `fleetmark import`: cut it instead, marked with "…".
    let mut info = info;
    for v in info.details.values_mut() {
        *v = fleetmark_core::limits::clip_text(v, fleetmark_core::limits::MAX_DETAIL_CHARS);
    }
    Ok(BenchResult {
        schema: RESULT_SCHEMA_VERSION,
        job_id: ctx.job_id,
        attempt: ctx.attempt,
        agent_name: identity.name.clone(),
        agent_labels: identity.labels.clone(),
        price_per_hour: identity.price_per_hour,
        hardware_kind,
        hardware_name,
        device,
        spec: job.clone(),
        backend: info,
        weights: weights.info.clone(),
        latency,
        images_per_sec,
        input_copy: LatencyStats::from_samples(&copies),
        peak_memory_bytes,
        memory_scope: memory_scope.as_str().into(),
        warmup_iterations,
        timed_seconds,
        telemetry,
        correctness,
        environment,
        host: identity.host.clone(),
        started_at,
        finished_at: Utc::now(),
        latencies_ms: latencies,
        stability: Some(stability),
    })
}

/// An estimate of how far timing is, 0..1: the minimums, then the stability windows (which
/// may take until `max_duration`, so the estimate is only a guide for progress bars).
fn timing_fraction(m: &MeasurementSpec, timing: &Timing, elapsed: Duration) -> f64 {
    let minimums = (timing.iterations() as f64 / m.min_iterations.max(1) as f64)
        .min(elapsed.as_secs_f64() / m.min_duration.as_secs_f64().max(1e-9))
        .min(1.0);
    let windows = timing.windows().len() as f64 / m.stability_windows.max(1) as f64;
    let by_rule = minimums.min(windows.min(1.0));
    let by_limit = elapsed.as_secs_f64() / m.max_duration.as_secs_f64().max(1e-9);
    by_rule.max(by_limit).min(0.99)
}
