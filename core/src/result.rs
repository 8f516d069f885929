//! The result record: everything one finished job measured, with enough context (hardware,
//! versions, weights, telemetry, correctness) to trust it and compare it later.
//!
//! Agents send exactly this to the coordinator; in standalone mode they write it as one JSON
//! line per job, and `fleetmark import` loads those lines unchanged.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::{
    limits::{
        check_count, check_inventory, check_labels, check_name, check_text, LimitError,
        MAX_DETAILS, MAX_DETAIL_CHARS, MAX_LATENCY_SAMPLES, MAX_TEXT_CHARS, MAX_THROTTLE_REASONS,
    },
    CoreError, HostInventory, JobSpec, LatencyStats, StabilityReport,
};

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

/// Why a result record cannot be stored. Every check says which field broke which rule, and
/// never quotes more than a short excerpt of the record.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum ResultError {
    #[error("schema version {got} is not the supported {want}")]
    Schema { got: u32, want: u32 },
    #[error("spec: {0}")]
    Spec(Box<CoreError>),
    #[error("no latencies")]
    NoLatencies,
    #[error("{got} latencies; at most {max} are allowed")]
    TooManyLatencies { got: u64, max: usize },
    #[error("latency count {count} does not match {raw} raw samples")]
    CountMismatch { count: u64, raw: usize },
    #[error("{field} is not a finite number")]
    NotFinite { field: &'static str },
    #[error("{field} is negative")]
    Negative { field: &'static str },
    #[error("{field} must be between 0 and 1")]
    NotAFraction { field: &'static str },
    #[error("the latency statistics are out of order: {rule} does not hold")]
    Order { rule: &'static str },
    #[error(
        "images/s {reported:.4e} does not match batch x 1000 / mean = {expected:.4e} (within 1%)"
    )]
    Throughput { reported: f64, expected: f64 },
    #[error("a raw latency is negative or not finite")]
    BadSample,
    #[error("raw latencies do not agree with the reported {field}")]
    RawMismatch { field: &'static str },
    #[error("finished before it started")]
    FinishedBeforeStart,
    /// The stability report or the percentile intervals do not hold together.
    #[error("{0}")]
    Measurement(String),
    #[error("{0}")]
    Limit(#[from] LimitError),
}

/// Relative tolerance for numbers reported alongside the samples they summarise.
const THROUGHPUT_TOLERANCE: f64 = 0.01;
/// Relative slack for orderings: the mean of identical samples can exceed them by an ulp.
const ORDER_SLACK: f64 = 1e-9;

/// `a <= b`, up to floating-point rounding.
fn le(a: f64, b: f64) -> bool {
    a <= b + ORDER_SLACK * a.abs().max(b.abs())
}

fn finite(field: &'static str, x: f64) -> Result<(), ResultError> {
    if !x.is_finite() {
        return Err(ResultError::NotFinite { field });
    }
    Ok(())
}

fn non_negative(field: &'static str, x: f64) -> Result<(), ResultError> {
    finite(field, x)?;
    if x < 0.0 {
        return Err(ResultError::Negative { field });
    }
    Ok(())
}

fn fraction(field: &'static str, x: f64) -> Result<(), ResultError> {
    non_negative(field, x)?;
    if x > 1.0 {
        return Err(ResultError::NotAFraction { field });
    }
    Ok(())
}

/// Checks one set of latency statistics: finite, non-negative, ordered, bounded count.
pub fn validate_stats(l: &LatencyStats) -> Result<(), ResultError> {
    for (field, x) in [
        ("mean", l.mean_ms),
        ("std", l.std_ms),
        ("min", l.min_ms),
        ("max", l.max_ms),
        ("p50", l.p50_ms),
        ("p90", l.p90_ms),
        ("p99", l.p99_ms),
        ("ci95 high", l.ci95_high_ms),
    ] {
        non_negative(field, x)?;
    }
    // Student's t gives a negative lower bound for short, noisy runs: finite is all it can be.
    finite("ci95 low", l.ci95_low_ms)?;
    if l.count == 0 {
        return Err(ResultError::NoLatencies);
    }
    if l.count > MAX_LATENCY_SAMPLES as u64 {
        return Err(ResultError::TooManyLatencies {
            got: l.count,
            max: MAX_LATENCY_SAMPLES,
        });
    }
    let ordered = [l.min_ms, l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms];
    if ordered.windows(2).any(|w| !le(w[0], w[1])) {
        return Err(ResultError::Order {
            rule: "min <= p50 <= p90 <= p99 <= max",
        });
    }
    if !(le(l.min_ms, l.mean_ms) && le(l.mean_ms, l.max_ms)) {
        return Err(ResultError::Order {
            rule: "min <= mean <= max",
        });
    }
    if !(le(l.ci95_low_ms, l.mean_ms) && le(l.mean_ms, l.ci95_high_ms)) {
        return Err(ResultError::Order {
            rule: "ci95 low <= mean <= ci95 high",
        });
    }
    Ok(())
}

fn validate_metric(field: &'static str, m: &Option<MetricSummary>) -> Result<(), ResultError> {
    if let Some(m) = m {
        for x in [m.min, m.mean, m.max] {
            non_negative(field, x)?;
        }
        if !(le(m.min, m.mean) && le(m.mean, m.max)) {
            return Err(ResultError::Order {
                rule: "telemetry min <= mean <= max",
            });
        }
    }
    Ok(())
}

impl BenchResult {
    /// Checks that a record (from the wire or from a file) is internally consistent and within
    /// every limit before it is stored. The raw latencies must be present.
    pub fn validate(&self) -> Result<(), CoreError> {
        self.validate_summary()?;
        let raw = self.latencies_ms.len();
        if raw == 0 {
            return Err(ResultError::NoLatencies.into());
        }
        if raw > MAX_LATENCY_SAMPLES {
            return Err(ResultError::TooManyLatencies {
                got: raw as u64,
                max: MAX_LATENCY_SAMPLES,
            }
            .into());
        }
        if self.latency.count != raw as u64 {
            return Err(ResultError::CountMismatch {
                count: self.latency.count,
                raw,
            }
            .into());
        }
        if self.latencies_ms.iter().any(|x| !x.is_finite() || *x < 0.0) {
            return Err(ResultError::BadSample.into());
        }
        let (lo, hi) = self
            .latencies_ms
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
                (lo.min(x), hi.max(x))
            });
        if lo != self.latency.min_ms {
            return Err(ResultError::RawMismatch { field: "min" }.into());
        }
        if hi != self.latency.max_ms {
            return Err(ResultError::RawMismatch { field: "max" }.into());
        }
        self.validate_measurement()
    }

    /// The stability report and percentile intervals (issue 11's additions) are sane.
    fn validate_measurement(&self) -> Result<(), CoreError> {
        self.latency
            .percentiles
            .validate()
            .map_err(ResultError::Measurement)?;
        match &self.stability {
            Some(s) => s
                .validate()
                .map_err(|e| CoreError::from(ResultError::Measurement(e))),
            None => Ok(()),
        }
    }

    /// Every check that does not need the raw latencies: what a listing that omits them can
    /// still verify of a stored row.
    pub fn validate_summary(&self) -> Result<(), CoreError> {
        if self.schema != crate::RESULT_SCHEMA_VERSION {
            return Err(ResultError::Schema {
                got: self.schema,
                want: crate::RESULT_SCHEMA_VERSION,
            }
            .into());
        }
        self.spec
            .validate()
            .map_err(|e| ResultError::Spec(Box::new(e)))?;
        self.validate_numbers().map_err(CoreError::from)?;
        self.validate_text().map_err(ResultError::from)?;
        if self.finished_at < self.started_at {
            return Err(ResultError::FinishedBeforeStart.into());
        }
        Ok(())
    }

    fn validate_numbers(&self) -> Result<(), ResultError> {
        validate_stats(&self.latency)?;
        if let Some(c) = &self.input_copy {
            validate_stats(c)?;
        }
        non_negative("images/s", self.images_per_sec)?;
        non_negative("timed seconds", self.timed_seconds)?;
        if let Some(p) = self.price_per_hour {
            non_negative("price per hour", p)?;
        }
        let expected = self.latency.images_per_sec(self.spec.batch_size);
        if self.latency.mean_ms <= 0.0
            || (self.images_per_sec - expected).abs() > THROUGHPUT_TOLERANCE * expected
        {
            return Err(ResultError::Throughput {
                reported: self.images_per_sec,
                expected,
            });
        }
        if let Some(c) = &self.correctness {
            non_negative("correctness max_rel_error", c.max_rel_error)?;
            non_negative("correctness max_abs_error", c.max_abs_error)?;
            non_negative("correctness bound", c.bound)?;
            fraction("correctness top1_agreement", c.top1_agreement)?;
        }
        if let Some(t) = &self.telemetry {
            validate_metric("telemetry sm clock", &t.sm_clock_mhz)?;
            validate_metric("telemetry memory clock", &t.memory_clock_mhz)?;
            validate_metric("telemetry power", &t.power_watts)?;
            validate_metric("telemetry temperature", &t.temperature_c)?;
            validate_metric("telemetry utilisation", &t.gpu_utilization_pct)?;
        }
        Ok(())
    }

    fn validate_text(&self) -> Result<(), LimitError> {
        check_name("agent name", &self.agent_name)?;
        check_labels(self.agent_labels.iter())?;
        check_name("hardware kind", &self.hardware_kind)?;
        for (field, s) in [
            ("hardware name", &self.hardware_name),
            ("device", &self.device),
            ("backend", &self.backend.backend),
            ("backend path", &self.backend.path),
            ("backend math", &self.backend.math),
            ("weights source", &self.weights.source),
            ("weights sha256", &self.weights.sha256),
            ("memory scope", &self.memory_scope),
            ("fleetmark version", &self.environment.fleetmark_version),
            ("git commit", &self.environment.git_commit),
            ("candle version", &self.environment.candle_version),
            ("rustc version", &self.environment.rustc_version),
            ("cuda driver version", &self.environment.cuda_driver_version),
            ("cudnn version", &self.environment.cudnn_version),
        ] {
            check_text(field, s, MAX_TEXT_CHARS)?;
        }
        check_count("backend details", self.backend.details.len(), MAX_DETAILS)?;
        for (k, v) in &self.backend.details {
            check_text("a backend detail", k, MAX_TEXT_CHARS)?;
            check_text("a backend detail", v, MAX_DETAIL_CHARS)?;
        }
        if let Some(c) = &self.correctness {
            check_text("correctness reference", &c.reference, MAX_TEXT_CHARS)?;
        }
        if let Some(t) = &self.telemetry {
            check_count(
                "throttle reasons",
                t.throttle_reasons.len(),
                MAX_THROTTLE_REASONS,
            )?;
            for r in &t.throttle_reasons {
                check_text("a throttle reason", r, MAX_TEXT_CHARS)?;
            }
        }
        check_inventory(&self.host)
    }

    /// SHA-256 of the record as sent (every field, raw latencies included), hex. Two imports of
    /// the same record have the same hash, so the database can refuse the second.
    pub fn content_hash(&self) -> String {
        let bytes = serde_json::to_vec(self).expect("a result record always serialises");
        hex::encode(Sha256::digest(&bytes))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Records a real CUDA agent wrote (committed benchmark runs) are valid results: a fused
    /// plan's detail names every layer's algorithm (about 850 characters), and until details
    /// had their own limit such records were refused by the coordinator and by import.
    #[test]
    fn real_gpu_records_validate_and_an_overlong_detail_does_not() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/benchmarks");
        let mut seen = 0;
        for file in [
            "h100-2026-12-06/candle.jsonl",
            "h200-2026-12-05-smoke/smoke-3.jsonl",
        ] {
            let text = std::fs::read_to_string(format!("{dir}/{file}")).expect("committed records");
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                let r: BenchResult = serde_json::from_str(line).expect("a record");
                r.validate().unwrap_or_else(|e| panic!("{file}: {e}"));
                seen += 1;
            }
        }
        assert!(seen >= 14, "{seen} records");
        let text = std::fs::read_to_string(format!("{dir}/h100-2026-12-06/candle.jsonl"))
            .expect("committed records");
        let mut r: BenchResult =
            serde_json::from_str(text.lines().next().expect("a line")).expect("a record");
        assert!(r.backend.details["plan"].chars().count() > MAX_TEXT_CHARS);
        r.backend
            .details
            .insert("plan".into(), "x".repeat(MAX_DETAIL_CHARS + 1));
        let e = r.validate().expect_err("too long").to_string();
        assert!(e.contains("a backend detail") && e.contains("4096"), "{e}");
    }

    #[test]
    fn the_mean_of_identical_samples_is_within_them() {
        let l = LatencyStats::from_samples(&[0.1, 0.1, 0.1]).unwrap();
        assert!(l.mean_ms > l.max_ms, "rounding puts the mean an ulp above");
        validate_stats(&l).unwrap();
    }
}
