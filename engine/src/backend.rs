//! The seam between the measurement loop and a device.
//!
//! A [`Backend`] is one device (the CPU, one GPU, or the simulator). It prepares a job into a
//! [`Prepared`] model: weights loaded in the job's precision, an input batch resident where the
//! model runs, buffers and plans made. The loop then asks the prepared model to run timed
//! iterations, and the prepared model answers with durations measured by the device's own clock.

use std::time::Duration;

use fleetmark_core::{BackendInfo, DeviceClass, JobSpec, MathMode, Telemetry};

use crate::{EngineError, ModelWeights};

/// Which implementation of the model ran: candle-nn's layers as they come, the optimised path,
/// or the simulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecPath {
    Stock,
    Fused,
    Simulated,
}

impl ExecPath {
    pub fn as_str(self) -> &'static str {
        match self {
            ExecPath::Stock => "stock",
            ExecPath::Fused => "fused",
            ExecPath::Simulated => "simulated",
        }
    }
}

/// What a peak-memory number counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryScope {
    /// Every allocation of this process on the device (weights, activations, workspaces).
    DeviceAllocations,
    /// The process's peak resident set on the host.
    ProcessRss,
    /// Nothing: the simulator allocates nothing.
    Simulated,
}

impl MemoryScope {
    pub fn as_str(self) -> &'static str {
        match self {
            MemoryScope::DeviceAllocations => "device-allocations",
            MemoryScope::ProcessRss => "process-rss",
            MemoryScope::Simulated => "simulated",
        }
    }
}

/// The backend description a result records, built from typed parts: the strings appear only
/// here, at the edge where the record is serialised.
pub fn backend_info(
    backend: &str,
    path: ExecPath,
    math: MathMode,
    details: std::collections::BTreeMap<String, String>,
) -> BackendInfo {
    BackendInfo {
        backend: backend.into(),
        path: path.as_str().into(),
        math: math.as_str().into(),
        details,
        simulated: path == ExecPath::Simulated,
    }
}

pub trait Backend {
    /// "cpu", "cuda:0", "simulated".
    fn device(&self) -> String;

    /// The hardware kind jobs are matched against ("cpu", "h100") and its full name.
    fn hardware(&self) -> (String, String);

    /// What generation of device this is, for the precisions it can run.
    fn class(&self) -> DeviceClass;

    /// Loads `weights` for `job` and makes everything the timed loop needs.
    fn prepare(
        &mut self,
        job: &JobSpec,
        weights: &ModelWeights,
    ) -> Result<Box<dyn Prepared + '_>, EngineError>;

    /// Where to sample device telemetry from; `None` where the device has none.
    fn telemetry_source(&self) -> Option<Box<dyn TelemetrySource>> {
        None
    }

    /// Driver and library versions to put into the result's fingerprint.
    fn driver_versions(&self) -> (String, String) {
        (String::new(), String::new())
    }

    /// Runs the node health check on this device (see [`crate::health`]); `None` where there
    /// is nothing real to check (the simulated device).
    fn health_check(&mut self) -> Option<Result<fleetmark_core::DeviceHealth, EngineError>> {
        None
    }
}

pub trait Prepared {
    fn info(&self) -> BackendInfo;

    /// The arithmetic this model runs in; it decides the correctness bound.
    fn math(&self) -> MathMode;

    /// Adds what the backend knows beyond the prepared model (kernel code, capability) to the
    /// details the result records.
    fn add_details(&mut self, _details: std::collections::BTreeMap<String, String>) {}

    /// One forward pass over the resident input batch, timed by the device: it returns only
    /// once the device has finished, with the device's measure of how long it took.
    fn timed_iteration(&mut self) -> Result<Duration, EngineError>;

    /// Copies one input batch from host memory to the device and returns how long that took;
    /// `None` for backends where the input already lives in host memory.
    fn timed_input_copy(&mut self) -> Result<Option<Duration>, EngineError> {
        Ok(None)
    }

    /// Logits [batch, 1000] of the resident input, as f32 on the host, for the correctness gate.
    fn logits(&mut self) -> Result<Vec<f32>, EngineError>;

    /// Resets the peak-memory counter, so the peak covers only what follows.
    fn reset_peak_memory(&mut self) {}

    /// Peak memory since the last reset, and what it counts.
    fn peak_memory(&mut self) -> (u64, MemoryScope);
}

/// Starts telemetry samplers for one device.
pub trait TelemetrySource {
    fn start(&self) -> Box<dyn TelemetrySampler>;
}

/// Samples telemetry on its own thread until stopped.
pub trait TelemetrySampler: Send {
    fn stop(self: Box<Self>) -> Telemetry;
}
