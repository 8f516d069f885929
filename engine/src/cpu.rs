//! The CPU backend: Candle's CPU ops, timed with a host clock around a synchronous forward.

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use fleetmark_core::{BackendInfo, DeviceClass, EnginePath, JobSpec, MathMode, Precision};

use crate::{
    backend::{backend_info, Backend, ExecPath, MemoryScope, Prepared},
    input::{input_batch, INPUT_SEED},
    resnet::ResNet18,
    EngineError, ModelWeights,
};

pub fn dtype_of(p: Precision) -> DType {
    match p {
        Precision::F32 => DType::F32,
        Precision::F16 => DType::F16,
        Precision::Bf16 => DType::BF16,
    }
}

pub struct CpuBackend {
    name: String,
}

impl CpuBackend {
    pub fn new() -> Self {
        let name = fleetmark_core::HostInventory::collect_host().cpu_model;
        CpuBackend { name }
    }
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl Backend for CpuBackend {
    fn device(&self) -> String {
        "cpu".into()
    }

    fn hardware(&self) -> (String, String) {
        ("cpu".into(), self.name.clone())
    }

    fn class(&self) -> DeviceClass {
        DeviceClass::Cpu
    }

    fn prepare(
        &mut self,
        job: &JobSpec,
        weights: &ModelWeights,
    ) -> Result<Box<dyn Prepared + '_>, EngineError> {
        let dtype = dtype_of(job.precision);
        let fold = !matches!(job.engine, EnginePath::Stock);
        let vb = VarBuilder::from_tensors(weights.tensors.clone(), dtype, &Device::Cpu);
        let model = ResNet18::load(vb, fold)?;
        let input = input_batch(INPUT_SEED, job.batch_size as usize, job.image_size as usize)?
            .to_dtype(dtype)?;
        let mut details = std::collections::BTreeMap::new();
        details.insert(
            "threads".into(),
            candle_core::utils::get_num_threads().to_string(),
        );
        details.insert(
            "batch_norm".into(),
            if fold { "folded" } else { "separate" }.into(),
        );
        Ok(Box::new(CpuPrepared {
            model,
            input,
            math: MathMode::plain(job.precision),
            info: backend_info(
                "candle-cpu",
                if fold {
                    ExecPath::Fused
                } else {
                    ExecPath::Stock
                },
                MathMode::plain(job.precision),
                details,
            ),
        }))
    }

    fn health_check(&mut self) -> Option<Result<fleetmark_core::DeviceHealth, EngineError>> {
        Some(crate::health::check(
            &Device::Cpu,
            &[Precision::F32],
            crate::health::HealthOptions::CPU,
            crate::health::DeviceFacts::default(),
            None,
        ))
    }
}

struct CpuPrepared {
    model: ResNet18,
    input: Tensor,
    math: MathMode,
    info: BackendInfo,
}

impl Prepared for CpuPrepared {
    fn info(&self) -> BackendInfo {
        self.info.clone()
    }

    fn math(&self) -> MathMode {
        self.math
    }

    fn timed_iteration(&mut self) -> Result<Duration, EngineError> {
        let start = Instant::now();
        let out = self.model.forward(&self.input)?;
        let elapsed = start.elapsed();
        // The CPU backend computes eagerly; dropping here keeps freeing out of the next sample.
        drop(out);
        Ok(elapsed)
    }

    fn logits(&mut self) -> Result<Vec<f32>, EngineError> {
        let out = self.model.forward(&self.input)?;
        Ok(out.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    }

    fn reset_peak_memory(&mut self) {
        // Linux resets the process's peak resident set when "5" is written to clear_refs.
        let _ = std::fs::write("/proc/self/clear_refs", "5");
    }

    fn peak_memory(&mut self) -> (u64, MemoryScope) {
        (process_peak_rss().unwrap_or(0), MemoryScope::ProcessRss)
    }
}

/// The process's peak resident set (VmHWM) in bytes.
pub fn process_peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
