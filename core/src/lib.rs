//! Fleetmark's domain: what a sweep asks for, what a job is, what a result records, and the
//! statistics that turn raw latencies into numbers that can be compared across machines.
//!
//! Everything here is plain data with validation. The wire format (protobuf) and the storage
//! format (Postgres) both map to and from these types at their own edges, so the rules live once.

pub mod capability;
pub mod error;
pub mod hardware;
pub mod health;
pub mod inventory;
pub mod job;
pub mod limits;
pub mod localpg;
pub mod logging;
pub mod precision;
pub mod quantile;
pub mod result;
pub mod significance;
pub mod stability;
pub mod stats;
pub mod sweep;
#[cfg(test)]
mod testseries;

pub use capability::{ComputeCapability, DeviceClass, KernelCode, MathMode};
pub use error::CoreError;
pub use hardware::{normalize_kind, HardwareKind, HardwareTarget};
pub use health::{DeviceHealth, HealthFlag};
pub use inventory::{GpuInfo, HostInventory};
pub use job::{
    EnginePath, Fraction, JobSpec, JobState, MeasurementSpec, PercentileTarget, WeightsRef,
    WeightsSpec,
};
pub use limits::LimitError;
pub use precision::Precision;
pub use quantile::{Percentile, PercentileCis, PercentileEstimate};
pub use result::{
    BackendInfo, BenchResult, Correctness, Fingerprint, MetricSummary, ResultError, Telemetry,
    WeightsInfo,
};
pub use significance::{RatioEstimate, RepetitionSummary};
pub use stability::{StabilityReport, StopReason, Timing, Window};
pub use stats::LatencyStats;
pub use sweep::SweepSpec;

/// The models an agent knows how to run.
pub const KNOWN_MODELS: &[&str] = &["resnet18"];

/// Version of the result record layout, written into every record so an importer can tell what
/// it is reading.
pub const RESULT_SCHEMA_VERSION: u32 = 1;

/// Fleetmark's own version, as built.
pub const FLEETMARK_VERSION: &str = env!("CARGO_PKG_VERSION");
