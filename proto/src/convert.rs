//! The edge between wire types and domain types. Everything that crosses gRPC is converted here,
//! once, for the coordinator, the agent and the CLI alike. Conversions from the wire validate:
//! a malformed message becomes a [`WireError`] naming the field, never a panic.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use fleetmark_core as core;
use uuid::Uuid;

use crate::v1 as pb;

/// A wire message that does not make a valid domain value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct WireError(pub String);

impl From<WireError> for tonic::Status {
    fn from(e: WireError) -> Self {
        tonic::Status::invalid_argument(e.0)
    }
}

fn missing(field: &str) -> WireError {
    WireError(format!("missing field '{field}'"))
}

fn core_err(e: core::CoreError) -> WireError {
    WireError(e.to_string())
}

pub fn parse_uuid(field: &str, s: &str) -> Result<Uuid, WireError> {
    Uuid::parse_str(s).map_err(|_| {
        WireError(format!(
            "'{}' is not a valid {field}",
            core::limits::Excerpt::of(s)
        ))
    })
}

pub fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

pub fn from_timestamp(t: Option<prost_types::Timestamp>) -> DateTime<Utc> {
    t.and_then(|t| Utc.timestamp_opt(t.seconds, t.nanos.max(0) as u32).single())
        .unwrap_or_default()
}

// ---- job spec ----

impl From<&core::JobSpec> for pb::JobSpec {
    fn from(s: &core::JobSpec) -> Self {
        let m = &s.measurement;
        pb::JobSpec {
            model: s.model.clone(),
            batch_size: s.batch_size,
            precision: s.precision.to_string(),
            image_size: s.image_size,
            target: s.target.to_string(),
            engine: s.engine.to_string(),
            weights: Some(pb::Weights {
                source: Some(match &s.weights {
                    core::WeightsSpec::Seeded { seed } => pb::weights::Source::Seed(*seed),
                    core::WeightsSpec::File { path } => pb::weights::Source::Path(path.clone()),
                }),
            }),
            measurement: Some(pb::Measurement {
                warmup_iterations: m.warmup_iterations,
                warmup_duration_ms: m.warmup_duration.as_millis() as u64,
                min_iterations: m.min_iterations,
                min_duration_ms: m.min_duration.as_millis() as u64,
                max_duration_ms: m.max_duration.as_millis() as u64,
                time_input_copy: m.time_input_copy,
                stability_windows: Some(m.stability_windows),
                stability_window_us: Some(m.stability_window.as_micros() as u64),
                stability_tolerance: Some(m.stability_tolerance.0),
                max_iterations: Some(m.max_iterations),
                percentile_target: m.percentile_target.map(|t| pb::PercentileTarget {
                    percentile: percentile_to_wire(t.percentile) as i32,
                    within: t.within.0,
                }),
            }),
            repetition: s.repetition,
        }
    }
}

impl TryFrom<pb::JobSpec> for core::JobSpec {
    type Error = WireError;
    fn try_from(s: pb::JobSpec) -> Result<Self, WireError> {
        let m = s.measurement.ok_or_else(|| missing("spec.measurement"))?;
        let defaults = core::MeasurementSpec::default();
        let weights = match s.weights.and_then(|w| w.source) {
            Some(pb::weights::Source::Seed(seed)) => core::WeightsSpec::Seeded { seed },
            Some(pb::weights::Source::Path(path)) => core::WeightsSpec::File { path },
            None => core::WeightsSpec::default(),
        };
        let spec = core::JobSpec {
            model: s.model,
            batch_size: s.batch_size,
            precision: s.precision.parse().map_err(core_err)?,
            image_size: s.image_size,
            target: s.target.parse().map_err(core_err)?,
            engine: s.engine.parse().map_err(core_err)?,
            weights,
            measurement: core::MeasurementSpec {
                warmup_iterations: m.warmup_iterations,
                warmup_duration: Duration::from_millis(m.warmup_duration_ms),
                min_iterations: m.min_iterations,
                min_duration: Duration::from_millis(m.min_duration_ms),
                max_duration: Duration::from_millis(m.max_duration_ms),
                time_input_copy: m.time_input_copy,
                stability_windows: m.stability_windows.unwrap_or(defaults.stability_windows),
                stability_window: m
                    .stability_window_us
                    .map(Duration::from_micros)
                    .unwrap_or(defaults.stability_window),
                stability_tolerance: m
                    .stability_tolerance
                    .map(core::Fraction)
                    .unwrap_or(defaults.stability_tolerance),
                max_iterations: m.max_iterations.unwrap_or(defaults.max_iterations),
                percentile_target: m
                    .percentile_target
                    .map(|t| {
                        Ok::<_, WireError>(core::PercentileTarget {
                            percentile: percentile_from_wire(t.percentile)?,
                            within: core::Fraction(t.within),
                        })
                    })
                    .transpose()?,
            },
            repetition: s.repetition,
        };
        spec.validate().map_err(core_err)?;
        Ok(spec)
    }
}

// ---- inventory ----

impl From<&core::GpuInfo> for pb::GpuInfo {
    fn from(g: &core::GpuInfo) -> Self {
        pb::GpuInfo {
            index: g.index,
            name: g.name.clone(),
            uuid: g.uuid.clone(),
            memory_bytes: g.memory_bytes,
            compute_capability: g.compute_capability.clone(),
            driver_version: g.driver_version.clone(),
            cuda_driver_version: g.cuda_driver_version.clone(),
            pcie_link_gen: g.pcie_link_gen,
            pcie_link_width: g.pcie_link_width,
            power_limit_watts: g.power_limit_watts,
        }
    }
}

impl From<pb::GpuInfo> for core::GpuInfo {
    fn from(g: pb::GpuInfo) -> Self {
        core::GpuInfo {
            index: g.index,
            name: g.name,
            uuid: g.uuid,
            memory_bytes: g.memory_bytes,
            compute_capability: g.compute_capability,
            driver_version: g.driver_version,
            cuda_driver_version: g.cuda_driver_version,
            pcie_link_gen: g.pcie_link_gen,
            pcie_link_width: g.pcie_link_width,
            power_limit_watts: g.power_limit_watts,
        }
    }
}

impl From<&core::HostInventory> for pb::HostInventory {
    fn from(h: &core::HostInventory) -> Self {
        pb::HostInventory {
            hostname: h.hostname.clone(),
            os: h.os.clone(),
            kernel: h.kernel.clone(),
            cpu_model: h.cpu_model.clone(),
            physical_cores: h.physical_cores,
            logical_cores: h.logical_cores,
            memory_bytes: h.memory_bytes,
            fleetmark_version: h.fleetmark_version.clone(),
            candle_version: h.candle_version.clone(),
            rustc_version: h.rustc_version.clone(),
            cuda_build: h.cuda_build.clone(),
            gpus: h.gpus.iter().map(Into::into).collect(),
        }
    }
}

impl From<pb::HostInventory> for core::HostInventory {
    fn from(h: pb::HostInventory) -> Self {
        core::HostInventory {
            hostname: h.hostname,
            os: h.os,
            kernel: h.kernel,
            cpu_model: h.cpu_model,
            physical_cores: h.physical_cores,
            logical_cores: h.logical_cores,
            memory_bytes: h.memory_bytes,
            fleetmark_version: h.fleetmark_version,
            candle_version: h.candle_version,
            rustc_version: h.rustc_version,
            cuda_build: h.cuda_build,
            gpus: h.gpus.into_iter().map(Into::into).collect(),
        }
    }
}

// ---- results ----

impl From<&core::LatencyStats> for pb::LatencyStats {
    fn from(s: &core::LatencyStats) -> Self {
        pb::LatencyStats {
            count: s.count,
            mean_ms: s.mean_ms,
            std_ms: s.std_ms,
            min_ms: s.min_ms,
            max_ms: s.max_ms,
            p50_ms: s.p50_ms,
            p90_ms: s.p90_ms,
            p99_ms: s.p99_ms,
            ci95_low_ms: s.ci95_low_ms,
            ci95_high_ms: s.ci95_high_ms,
            p50_ci: s.percentiles.p50.map(estimate_to_wire),
            p90_ci: s.percentiles.p90.map(estimate_to_wire),
            p99_ci: s.percentiles.p99.map(estimate_to_wire),
        }
    }
}

fn estimate_to_wire(e: core::PercentileEstimate) -> pb::PercentileEstimate {
    pb::PercentileEstimate {
        ms: e.ms,
        ci95_low_ms: e.ci95_low_ms,
        ci95_high_ms: e.ci95_high_ms,
    }
}

fn estimate_from_wire(e: pb::PercentileEstimate) -> core::PercentileEstimate {
    core::PercentileEstimate {
        ms: e.ms,
        ci95_low_ms: e.ci95_low_ms,
        ci95_high_ms: e.ci95_high_ms,
    }
}

fn percentile_to_wire(p: core::Percentile) -> pb::Percentile {
    match p {
        core::Percentile::P50 => pb::Percentile::P50,
        core::Percentile::P90 => pb::Percentile::P90,
        core::Percentile::P99 => pb::Percentile::P99,
    }
}

fn percentile_from_wire(p: i32) -> Result<core::Percentile, WireError> {
    match pb::Percentile::try_from(p) {
        Ok(pb::Percentile::P50) => Ok(core::Percentile::P50),
        Ok(pb::Percentile::P90) => Ok(core::Percentile::P90),
        Ok(pb::Percentile::P99) => Ok(core::Percentile::P99),
        _ => Err(WireError(format!(
            "spec.measurement.percentile_target.percentile {p} is not p50, p90 or p99"
        ))),
    }
}

fn stop_reason_to_wire(r: core::StopReason) -> pb::StopReason {
    match r {
        core::StopReason::Stable => pb::StopReason::Stable,
        core::StopReason::MaxDuration => pb::StopReason::MaxDuration,
        core::StopReason::MaxIterations => pb::StopReason::MaxIterations,
    }
}

fn stop_reason_from_wire(r: i32) -> Result<core::StopReason, WireError> {
    match pb::StopReason::try_from(r) {
        Ok(pb::StopReason::Stable) => Ok(core::StopReason::Stable),
        Ok(pb::StopReason::MaxDuration) => Ok(core::StopReason::MaxDuration),
        Ok(pb::StopReason::MaxIterations) => Ok(core::StopReason::MaxIterations),
        _ => Err(WireError(format!(
            "result.stability.stop_reason {r} is not stable, max_duration or max_iterations"
        ))),
    }
}

fn stability_to_wire(s: &core::StabilityReport) -> pb::Stability {
    pb::Stability {
        stable: s.stable,
        stop_reason: stop_reason_to_wire(s.stop_reason) as i32,
        spread: s.spread,
        windows: s
            .windows
            .iter()
            .map(|w| pb::MeasurementWindow {
                iterations: w.iterations,
                seconds: w.seconds,
                images_per_sec: w.images_per_sec,
            })
            .collect(),
        required_windows: s.required_windows,
        window_seconds: s.window_seconds,
        tolerance: s.tolerance,
        percentile_target_met: s.percentile_target_met,
    }
}

fn stability_from_wire(s: pb::Stability) -> Result<core::StabilityReport, WireError> {
    Ok(core::StabilityReport {
        stable: s.stable,
        stop_reason: stop_reason_from_wire(s.stop_reason)?,
        spread: s.spread,
        windows: s
            .windows
            .into_iter()
            .map(|w| core::Window {
                iterations: w.iterations,
                seconds: w.seconds,
                images_per_sec: w.images_per_sec,
            })
            .collect(),
        required_windows: s.required_windows,
        window_seconds: s.window_seconds,
        tolerance: s.tolerance,
        percentile_target_met: s.percentile_target_met,
    })
}

impl From<pb::LatencyStats> for core::LatencyStats {
    fn from(s: pb::LatencyStats) -> Self {
        core::LatencyStats {
            count: s.count,
            mean_ms: s.mean_ms,
            std_ms: s.std_ms,
            min_ms: s.min_ms,
            max_ms: s.max_ms,
            p50_ms: s.p50_ms,
            p90_ms: s.p90_ms,
            p99_ms: s.p99_ms,
            ci95_low_ms: s.ci95_low_ms,
            ci95_high_ms: s.ci95_high_ms,
            percentiles: core::PercentileCis {
                p50: s.p50_ci.map(estimate_from_wire),
                p90: s.p90_ci.map(estimate_from_wire),
                p99: s.p99_ci.map(estimate_from_wire),
            },
        }
    }
}

fn metric(m: &Option<core::MetricSummary>) -> Option<pb::MetricSummary> {
    m.as_ref().map(|m| pb::MetricSummary {
        min: m.min,
        mean: m.mean,
        max: m.max,
    })
}

fn from_metric(m: Option<pb::MetricSummary>) -> Option<core::MetricSummary> {
    m.map(|m| core::MetricSummary {
        min: m.min,
        mean: m.mean,
        max: m.max,
    })
}

impl From<&core::BenchResult> for pb::BenchResult {
    fn from(r: &core::BenchResult) -> Self {
        pb::BenchResult {
            schema: r.schema,
            job_id: r.job_id.map(|j| j.to_string()).unwrap_or_default(),
            attempt: r.attempt,
            agent_name: r.agent_name.clone(),
            agent_labels: r.agent_labels.clone().into_iter().collect(),
            price_per_hour: r.price_per_hour,
            hardware_kind: r.hardware_kind.clone(),
            hardware_name: r.hardware_name.clone(),
            device: r.device.clone(),
            spec: Some((&r.spec).into()),
            backend: Some(pb::BackendInfo {
                backend: r.backend.backend.clone(),
                path: r.backend.path.clone(),
                math: r.backend.math.clone(),
                details: r.backend.details.clone().into_iter().collect(),
                simulated: r.backend.simulated,
            }),
            weights_source: r.weights.source.clone(),
            weights_sha256: r.weights.sha256.clone(),
            latency: Some((&r.latency).into()),
            images_per_sec: r.images_per_sec,
            input_copy: r.input_copy.as_ref().map(Into::into),
            peak_memory_bytes: r.peak_memory_bytes,
            memory_scope: r.memory_scope.clone(),
            warmup_iterations: r.warmup_iterations,
            timed_seconds: r.timed_seconds,
            telemetry: r.telemetry.as_ref().map(|t| pb::Telemetry {
                samples: t.samples,
                sm_clock_mhz: metric(&t.sm_clock_mhz),
                memory_clock_mhz: metric(&t.memory_clock_mhz),
                power_watts: metric(&t.power_watts),
                temperature_c: metric(&t.temperature_c),
                gpu_utilization_pct: metric(&t.gpu_utilization_pct),
                throttle_reasons: t.throttle_reasons.clone(),
                throttled: t.throttled,
            }),
            correctness: r.correctness.as_ref().map(|c| pb::Correctness {
                reference: c.reference.clone(),
                images_compared: c.images_compared,
                max_rel_error: c.max_rel_error,
                max_abs_error: c.max_abs_error,
                top1_agreement: c.top1_agreement,
                bound: c.bound,
                passed: c.passed,
            }),
            environment: Some(pb::Fingerprint {
                fleetmark_version: r.environment.fleetmark_version.clone(),
                git_commit: r.environment.git_commit.clone(),
                candle_version: r.environment.candle_version.clone(),
                rustc_version: r.environment.rustc_version.clone(),
                cuda_driver_version: r.environment.cuda_driver_version.clone(),
                cudnn_version: r.environment.cudnn_version.clone(),
            }),
            host: Some((&r.host).into()),
            started_at: Some(timestamp(r.started_at)),
            finished_at: Some(timestamp(r.finished_at)),
            latencies_ms: r.latencies_ms.clone(),
            stability: r.stability.as_ref().map(stability_to_wire),
        }
    }
}

impl TryFrom<pb::BenchResult> for core::BenchResult {
    type Error = WireError;

    /// Converts and validates. With `omit_latencies` listings the raw samples are absent; use
    /// [`result_without_latencies`] for those.
    fn try_from(r: pb::BenchResult) -> Result<Self, WireError> {
        let result = result_without_latencies(r)?;
        result
            .validate()
            .map_err(|e| WireError(format!("result: {e}")))?;
        Ok(result)
    }
}

/// Converts a result without insisting that its raw latencies are present.
pub fn result_without_latencies(r: pb::BenchResult) -> Result<core::BenchResult, WireError> {
    let job_id = if r.job_id.is_empty() {
        None
    } else {
        Some(parse_uuid("job id", &r.job_id)?)
    };
    let backend = r.backend.ok_or_else(|| missing("result.backend"))?;
    let env = r.environment.unwrap_or_default();
    Ok(core::BenchResult {
        schema: r.schema,
        job_id,
        attempt: r.attempt,
        agent_name: r.agent_name,
        agent_labels: r.agent_labels.into_iter().collect(),
        price_per_hour: r.price_per_hour,
        hardware_kind: core::normalize_kind(&r.hardware_kind),
        hardware_name: r.hardware_name,
        device: r.device,
        spec: r.spec.ok_or_else(|| missing("result.spec"))?.try_into()?,
        backend: core::BackendInfo {
            backend: backend.backend,
            path: backend.path,
            math: backend.math,
            details: backend.details.into_iter().collect(),
            simulated: backend.simulated,
        },
        weights: core::WeightsInfo {
            source: r.weights_source,
            sha256: r.weights_sha256,
        },
        latency: r.latency.ok_or_else(|| missing("result.latency"))?.into(),
        images_per_sec: r.images_per_sec,
        input_copy: r.input_copy.map(Into::into),
        peak_memory_bytes: r.peak_memory_bytes,
        memory_scope: r.memory_scope,
        warmup_iterations: r.warmup_iterations,
        timed_seconds: r.timed_seconds,
        telemetry: r.telemetry.map(|t| core::Telemetry {
            samples: t.samples,
            sm_clock_mhz: from_metric(t.sm_clock_mhz),
            memory_clock_mhz: from_metric(t.memory_clock_mhz),
            power_watts: from_metric(t.power_watts),
            temperature_c: from_metric(t.temperature_c),
            gpu_utilization_pct: from_metric(t.gpu_utilization_pct),
            throttle_reasons: t.throttle_reasons,
            throttled: t.throttled,
        }),
        correctness: r.correctness.map(|c| core::Correctness {
            reference: c.reference,
            images_compared: c.images_compared,
            max_rel_error: c.max_rel_error,
            max_abs_error: c.max_abs_error,
            top1_agreement: c.top1_agreement,
            bound: c.bound,
            passed: c.passed,
        }),
        environment: core::Fingerprint {
            fleetmark_version: env.fleetmark_version,
            git_commit: env.git_commit,
            candle_version: env.candle_version,
            rustc_version: env.rustc_version,
            cuda_driver_version: env.cuda_driver_version,
            cudnn_version: env.cudnn_version,
        },
        host: r.host.unwrap_or_default().into(),
        started_at: from_timestamp(r.started_at),
        finished_at: from_timestamp(r.finished_at),
        latencies_ms: r.latencies_ms,
        stability: r.stability.map(stability_from_wire).transpose()?,
    })
}

impl From<&fleetmark_core::DeviceHealth> for pb::DeviceHealth {
    fn from(h: &fleetmark_core::DeviceHealth) -> Self {
        pb::DeviceHealth {
            measured_at: Some(timestamp(h.measured_at)),
            gemm_tflops: h
                .gemm_tflops
                .iter()
                .map(|(p, v)| (p.as_str().to_string(), *v))
                .collect(),
            gemm_n: h.gemm_n,
            memory_gbps: h.memory_gbps,
            host_to_device_gbps: h.host_to_device_gbps,
            pcie_link_gen: h.pcie_link_gen,
            pcie_link_width: h.pcie_link_width,
            sm_clock_under_load_mhz: h.sm_clock_under_load_mhz,
            power_limit_watts: h.power_limit_watts,
            ecc_enabled: h.ecc_enabled,
            seconds: h.seconds,
        }
    }
}

impl TryFrom<pb::DeviceHealth> for fleetmark_core::DeviceHealth {
    type Error = fleetmark_core::health::HealthError;

    /// The report as sent, then [`fleetmark_core::DeviceHealth::validate`]d.
    fn try_from(h: pb::DeviceHealth) -> Result<Self, Self::Error> {
        use fleetmark_core::health::HealthError;
        if h.gemm_tflops.len() > 3 {
            return Err(HealthError("more than three GEMM precisions".into()));
        }
        let gemm_tflops = h
            .gemm_tflops
            .into_iter()
            .map(|(p, v)| {
                p.parse::<fleetmark_core::Precision>()
                    .map(|p| (p, v))
                    .map_err(|_| HealthError("a GEMM of an unknown precision".into()))
            })
            .collect::<Result<_, _>>()?;
        let out = fleetmark_core::DeviceHealth {
            measured_at: from_timestamp(h.measured_at),
            gemm_tflops,
            gemm_n: h.gemm_n,
            memory_gbps: h.memory_gbps,
            host_to_device_gbps: h.host_to_device_gbps,
            pcie_link_gen: h.pcie_link_gen,
            pcie_link_width: h.pcie_link_width,
            sm_clock_under_load_mhz: h.sm_clock_under_load_mhz,
            power_limit_watts: h.power_limit_watts,
            ecc_enabled: h.ecc_enabled,
            seconds: h.seconds,
        };
        out.validate()?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_bad_id_makes_a_short_error() {
        let e = parse_uuid("job id", &"x".repeat(1 << 20)).unwrap_err().0;
        assert!(e.len() < 200 && e.ends_with("is not a valid job id"), "{e}");
    }

    #[test]
    fn job_spec_round_trips_and_bad_precision_is_rejected() {
        let spec: core::JobSpec = core::SweepSpec::from_toml(
            "batch_sizes=[8]\nprecisions=[\"bf16\"]\ngpus=[\"h100\"]\nweights={kind=\"file\", path=\"w.safetensors\"}",
        )
        .unwrap()
        .expand()
        .unwrap()
        .remove(0);
        let wire = pb::JobSpec::from(&spec);
        let back = core::JobSpec::try_from(wire.clone()).unwrap();
        assert_eq!(back, spec);

        let mut bad = wire;
        bad.precision = "fp8".into();
        let err = core::JobSpec::try_from(bad).unwrap_err().to_string();
        assert!(err.contains("unknown precision 'fp8'"), "{err}");
    }
}
