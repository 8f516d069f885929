//! The seam between the measurement loop and a device.
//!
//! A [`Backend`] is one device (the CPU, one GPU, or the simulator). It prepares a job into a
//! [`Prepared`] model: weights loaded in the job's precision, an input batch resident where the
//! model runs, buffers and plans made. The loop then asks the prepared model to run timed
//! iterations, and the prepared model answers with durations measured by the device's own clock.

use std::time::Duration;

use fleetmark_core::{BackendInfo, JobSpec, Telemetry};

use crate::{EngineError, ModelWeights};

pub trait Backend {
    /// "cpu", "cuda:0", "simulated".
    fn device(&self) -> String;

    /// The hardware kind jobs are matched against ("cpu", "h100") and its full name.
    fn hardware(&self) -> (String, String);

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
}

pub trait Prepared {
    fn info(&self) -> BackendInfo;

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
    fn peak_memory(&mut self) -> (u64, &'static str);
}

/// Starts telemetry samplers for one device.
pub trait TelemetrySource {
    fn start(&self) -> Box<dyn TelemetrySampler>;
}

/// Samples telemetry on its own thread until stopped.
pub trait TelemetrySampler: Send {
    fn stop(self: Box<Self>) -> Telemetry;
}
