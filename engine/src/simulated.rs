//! A backend that sleeps instead of running the model, for exercising and benchmarking the
//! coordinator with many agents on one machine. Its results say `simulated: true` and are kept
//! out of every real comparison.

use std::time::{Duration, Instant};

use fleetmark_core::{BackendInfo, DeviceClass, JobSpec, MathMode, Precision};

use crate::{
    backend::{backend_info, Backend, ExecPath, MemoryScope, Prepared},
    EngineError, ModelWeights,
};

pub struct SimulatedBackend {
    /// Time one iteration takes at batch 1; larger batches take proportionally longer.
    pub base: Duration,
}

impl SimulatedBackend {
    pub fn new(base: Duration) -> Self {
        SimulatedBackend { base }
    }
}

impl Backend for SimulatedBackend {
    fn device(&self) -> String {
        "simulated".into()
    }

    fn hardware(&self) -> (String, String) {
        ("cpu".into(), "simulated device".into())
    }

    fn class(&self) -> DeviceClass {
        DeviceClass::Simulated
    }

    fn prepare(
        &mut self,
        job: &JobSpec,
        _weights: &ModelWeights,
    ) -> Result<Box<dyn Prepared + '_>, EngineError> {
        Ok(Box::new(SimulatedPrepared {
            latency: self.base.mul_f64(1.0 + job.batch_size as f64 / 16.0),
            batch: job.batch_size as usize,
            precision: job.precision,
        }))
    }
}

struct SimulatedPrepared {
    latency: Duration,
    batch: usize,
    precision: Precision,
}

impl Prepared for SimulatedPrepared {
    fn info(&self) -> BackendInfo {
        backend_info(
            "simulated",
            ExecPath::Simulated,
            self.math(),
            Default::default(),
        )
    }

    fn math(&self) -> MathMode {
        MathMode::plain(self.precision)
    }

    fn timed_iteration(&mut self) -> Result<Duration, EngineError> {
        let start = Instant::now();
        std::thread::sleep(self.latency);
        Ok(start.elapsed())
    }

    fn logits(&mut self) -> Result<Vec<f32>, EngineError> {
        Ok(vec![0.0; self.batch * 1000])
    }

    fn peak_memory(&mut self) -> (u64, MemoryScope) {
        (0, MemoryScope::Simulated)
    }
}
