//! The result record: everything one finished job measured, with enough context (hardware,
//! versions, weights, telemetry, correctness) to trust it and compare it later.
//!
//! Agents send exactly this to the coordinator; in standalone mode they write it as one JSON
//! line per job, and `fleetmark import` loads those lines unchanged.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{CoreError, HostInventory, JobSpec, LatencyStats, StabilityReport};

/// Which implementation produced a number.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct BackendInfo {
    /// "candle-cpu", "candle-cuda" or "simulated".
    pub backend: String,
    /// "stock" or "fused".
    pub path: String,
    /// The arithmetic actually used: "f32", "tf32", "f16" or "bf16".
    pub math: String,
    /// Free-form details: cuDNN on or off, CUDA graph, layout.
    pub details: BTreeMap<String, String>,
    /// Simulated results come from a backend that sleeps instead of running the model. They are
    /// kept apart from real ones everywhere.
    pub simulated: bool,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct WeightsInfo {
    /// "seeded:<seed>" or "file:<name>".
    pub source: String,
    /// SHA-256 of the weights as loaded (of the file, or of the generated tensors).
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct MetricSummary {
    pub min: f64,
    pub mean: f64,
    pub max: f64,
}

impl MetricSummary {
    pub fn of(values: &[f64]) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        Some(MetricSummary { min, mean, max })
    }
}

/// GPU telemetry sampled during the timed window.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Telemetry {
    pub samples: u32,
    pub sm_clock_mhz: Option<MetricSummary>,
    pub memory_clock_mhz: Option<MetricSummary>,
    pub power_watts: Option<MetricSummary>,
    pub temperature_c: Option<MetricSummary>,
    pub gpu_utilization_pct: Option<MetricSummary>,
    /// Every throttle reason seen in any sample, by NVML's name.
    pub throttle_reasons: Vec<String>,
    /// True when a reason that slows the clocks (power cap, thermal, hardware slowdown) was seen.
    pub throttled: bool,
}

/// The output check run before timing: the backend's output for a small batch against a CPU
/// f32 forward pass of the same weights and input.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Correctness {
    pub reference: String,
    pub images_compared: u32,
    /// max |out - ref| / max |ref|, over all logits compared.
    pub max_rel_error: f64,
    pub max_abs_error: f64,
    /// Fraction of images whose arg-max class agrees with the reference.
    pub top1_agreement: f64,
    pub bound: f64,
    pub passed: bool,
}

/// The software a result was produced with.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Fingerprint {
    pub fleetmark_version: String,
    pub git_commit: String,
    pub candle_version: String,
    pub rustc_version: String,
    pub cuda_driver_version: String,
    pub cudnn_version: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchResult {
    pub schema: u32,
    /// The coordinator's job this answers; `None` for standalone runs until imported.
    pub job_id: Option<Uuid>,
    pub attempt: u32,
    pub agent_name: String,
    #[serde(default)]
    pub agent_labels: BTreeMap<String, String>,
    pub price_per_hour: Option<f64>,
    /// Kind (`h100`, `cpu`) and full name of the device that ran the job.
    pub hardware_kind: String,
    pub hardware_name: String,
    /// "cpu" or "cuda:N".
    pub device: String,
    pub spec: JobSpec,
    pub backend: BackendInfo,
    pub weights: WeightsInfo,
    pub latency: LatencyStats,
    pub images_per_sec: f64,
    /// Host-to-device input copy per iteration, when the job asked for it.
    pub input_copy: Option<LatencyStats>,
    pub peak_memory_bytes: u64,
    /// What `peak_memory_bytes` counts: "device-allocations" or "process-rss".
    pub memory_scope: String,
    pub warmup_iterations: u32,
    pub timed_seconds: f64,
    pub telemetry: Option<Telemetry>,
    pub correctness: Option<Correctness>,
    pub environment: Fingerprint,
    pub host: HostInventory,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    /// Every timed iteration's latency, in order.
    pub latencies_ms: Vec<f64>,
    /// Whether timing was found stable, its windows, and why it stopped. `None` in records
    /// from agents that predate the stability rule.
    #[serde(default)]
    pub stability: Option<StabilityReport>,
}

impl BenchResult {
    /// Checks that a record (from the wire or from a file) is internally consistent before it
    /// is stored.
    pub fn validate(&self) -> Result<(), CoreError> {
        let bad = |m: String| Err(CoreError::InvalidResult(m));
        if self.schema != crate::RESULT_SCHEMA_VERSION {
            return bad(format!(
                "schema version {} is not the supported {}",
                self.schema,
                crate::RESULT_SCHEMA_VERSION
            ));
        }
        self.spec.validate()?;
        if self.latencies_ms.is_empty() {
            return bad("no latencies".into());
        }
        if self.latency.count != self.latencies_ms.len() as u64 {
            return bad(format!(
                "latency count {} does not match {} raw samples",
                self.latency.count,
                self.latencies_ms.len()
            ));
        }
        if self.latencies_ms.iter().any(|x| !x.is_finite() || *x < 0.0) {
            return bad("a latency is negative or not finite".into());
        }
        let l = &self.latency;
        let summary = [
            l.mean_ms,
            l.std_ms,
            l.min_ms,
            l.max_ms,
            l.p50_ms,
            l.p90_ms,
            l.p99_ms,
            l.ci95_low_ms,
            l.ci95_high_ms,
            self.images_per_sec,
            self.timed_seconds,
        ];
        if summary.iter().any(|x| !x.is_finite()) {
            return bad("a summary statistic is not finite".into());
        }
        if self
            .price_per_hour
            .is_some_and(|p| !(p.is_finite() && p >= 0.0))
        {
            return bad("the price per hour must be a number >= 0".into());
        }
        if self.agent_name.len() > 200 {
            return bad("the agent name is over 200 characters".into());
        }
        if self.hardware_kind.is_empty() || self.agent_name.is_empty() {
            return bad("hardware kind and agent name are required".into());
        }
        if self.finished_at < self.started_at {
            return bad("finished before it started".into());
        }
        self.validate_measurement()
    }

    /// The stability report and percentile intervals (issue 11's additions) are sane.
    fn validate_measurement(&self) -> Result<(), CoreError> {
        self.latency
            .percentiles
            .validate()
            .map_err(CoreError::InvalidResult)?;
        match &self.stability {
            Some(s) => s.validate().map_err(CoreError::InvalidResult),
            None => Ok(()),
        }
    }

    /// Throughput with its 95% interval, from the latency interval.
    pub fn images_per_sec_ci(&self) -> (f64, f64) {
        let b = self.spec.batch_size as f64 * 1000.0;
        let hi = if self.latency.ci95_low_ms > 0.0 {
            b / self.latency.ci95_low_ms
        } else {
            f64::INFINITY
        };
        (b / self.latency.ci95_high_ms, hi)
    }

    /// True when the result says its timing was not found stable (records without a stability
    /// report are not called unstable: they are unknown).
    pub fn is_unstable(&self) -> bool {
        self.stability.as_ref().is_some_and(|s| !s.stable)
    }

    /// "f32 (tf32 math)" where the math differs from the storage precision.
    pub fn precision_label(&self) -> String {
        let p = self.spec.precision.as_str();
        if self.backend.math.is_empty() || self.backend.math == p {
            p.to_string()
        } else {
            format!("{p} ({} math)", self.backend.math)
        }
    }
}
