//! The CPU backend, timed with a host clock around a synchronous forward. The stock path runs
//! candle-nn's layers on Candle's CPU ops; the fused path in f32 runs the folded NHWC graph on
//! [`CpuExecutor`] (one `gemm` per convolution, no allocation per forward); the fused path in
//! f16/bf16 runs Candle's ops with batch norm folded.

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use fleetmark_core::{BackendInfo, DeviceClass, EnginePath, JobSpec, MathMode, Precision};

use crate::{
    backend::{backend_info, Backend, ExecPath, MemoryScope, Prepared},
    fused::{
        cpu_exec::{CpuExecConfig, CpuExecutor},
        graph::{GraphConfig, NetGraph, StemInput},
    },
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
        let input = input_batch(INPUT_SEED, job.batch_size as usize, job.image_size as usize)?;
        let mut details = std::collections::BTreeMap::new();
        details.insert(
            "batch_norm".into(),
            if fold { "folded" } else { "separate" }.into(),
        );
        let model = if fold && dtype == DType::F32 {
            let exec = nhwc_executor(job, weights, &input)?;
            details.insert("threads".into(), exec.config().threads.to_string());
            details.insert("executor".into(), "nhwc-gemm".into());
            details.insert("layout".into(), "nhwc".into());
            CpuModel::Nhwc(Box::new(exec))
        } else {
            let vb = VarBuilder::from_tensors(weights.tensors.clone(), dtype, &Device::Cpu);
            details.insert(
                "threads".into(),
                candle_core::utils::get_num_threads().to_string(),
            );
            details.insert("executor".into(), "candle-ops".into());
            details.insert("layout".into(), "nchw".into());
            CpuModel::Candle {
                model: ResNet18::load(vb, fold)?,
                input: input.to_dtype(dtype)?,
            }
        };
        Ok(Box::new(CpuPrepared {
            model,
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

/// The folded graph on the NHWC executor, with the job's input batch already in place.
fn nhwc_executor(
    job: &JobSpec,
    weights: &ModelWeights,
    input: &Tensor,
) -> Result<CpuExecutor, EngineError> {
    let graph = NetGraph::resnet18(
        weights,
        GraphConfig {
            batch: job.batch_size as usize,
            image_size: job.image_size as usize,
            stem: StemInput::PLAIN,
            stem_chunk: None,
        },
    )?;
    let mut exec = CpuExecutor::new(&graph, CpuExecConfig::for_host())?;
    exec.set_input_nchw(input)?;
    Ok(exec)
}

/// What runs a forward pass.
enum CpuModel {
    /// candle-nn's layers on Candle's CPU ops (stock, or folded in f16/bf16), NCHW.
    Candle { model: ResNet18, input: Tensor },
    /// The fused graph on the NHWC executor (f32).
    Nhwc(Box<CpuExecutor>),
}

impl CpuModel {
    /// One forward pass, for timing: Candle returns its output (dropped by the caller after the
    /// clock stops); the executor keeps its own in place.
    fn forward(&mut self) -> Result<Option<Tensor>, EngineError> {
        match self {
            CpuModel::Candle { model, input } => Ok(Some(model.forward(input)?)),
            CpuModel::Nhwc(exec) => {
                exec.forward();
                Ok(None)
            }
        }
    }

    /// One forward pass, and its logits as f32.
    fn logits(&mut self) -> Result<Vec<f32>, EngineError> {
        match self {
            CpuModel::Candle { model, input } => {
                let out = model.forward(input)?;
                Ok(out.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
            }
            CpuModel::Nhwc(exec) => {
                exec.forward();
                Ok(exec.output().to_vec())
            }
        }
    }
}

struct CpuPrepared {
    model: CpuModel,
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
        let out = self.model.forward()?;
        let elapsed = start.elapsed();
        // The CPU backend computes eagerly; dropping here keeps freeing out of the next sample.
        drop(out);
        Ok(elapsed)
    }

    fn logits(&mut self) -> Result<Vec<f32>, EngineError> {
        self.model.logits()
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

#[cfg(test)]
mod tests {
    use fleetmark_core::MeasurementSpec;

    use super::*;

    fn job(engine: EnginePath, precision: Precision) -> JobSpec {
        JobSpec {
            model: "resnet18".into(),
            batch_size: 3,
            precision,
            image_size: 32,
            target: fleetmark_core::HardwareTarget::Any,
            engine,
            weights: Default::default(),
            measurement: MeasurementSpec::default(),
            repetition: 0,
        }
    }

    fn prepared(
        engine: EnginePath,
        precision: Precision,
        weights: &ModelWeights,
    ) -> (BackendInfo, Vec<f32>) {
        let mut backend = CpuBackend::new();
        let mut p = backend.prepare(&job(engine, precision), weights).unwrap();
        p.timed_iteration().unwrap();
        (p.info(), p.logits().unwrap())
    }

    #[test]
    fn the_fused_f32_path_runs_the_nhwc_executor_and_agrees_with_stock() {
        let w = ModelWeights::seeded(0).unwrap();
        let (stock_info, stock) = prepared(EnginePath::Stock, Precision::F32, &w);
        assert_eq!(stock_info.path, "stock");
        assert_eq!(stock_info.details["executor"], "candle-ops");
        for engine in [EnginePath::Auto, EnginePath::Fused] {
            let (info, fused) = prepared(engine, Precision::F32, &w);
            assert_eq!(info.path, "fused");
            assert_eq!(info.details["executor"], "nhwc-gemm");
            assert_eq!(info.details["batch_norm"], "folded");
            let threads: usize = info.details["threads"].parse().unwrap();
            assert!(threads >= 1);
            let c = crate::correctness::compare(&fused, &stock, 1e-4);
            assert!(c.passed, "{c:?}");
            assert_eq!(fused.len(), 3 * 1000);
        }
    }

    #[test]
    fn the_fused_f16_path_stays_on_candle_ops() {
        let w = ModelWeights::seeded(0).unwrap();
        let (info, logits) = prepared(EnginePath::Fused, Precision::F16, &w);
        assert_eq!(info.details["executor"], "candle-ops");
        assert_eq!(logits.len(), 3 * 1000);
    }
}
