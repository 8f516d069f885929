//! The CUDA backend: ResNet18 on one GPU through Candle's CUDA device.
//!
//! Two paths run here. `stock` is candle-nn's layers as they come, on the device. `fused` (the
//! default, with the `cudnn` feature) is the optimised path in [`fused`]: batch norm folded into
//! the convolutions, NHWC tensors, cuDNN with a plan picked once per layer by timing, fused
//! bias/residual/ReLU epilogues, preallocated buffers and one CUDA graph for the whole forward.
//!
//! Timing uses CUDA events recorded on the model's stream around each iteration; the loop waits
//! for the end event before the next iteration, so every sample is one complete forward pass.
//! Peak memory is the high-water mark of the device's stream-ordered memory pool, which every
//! allocation of this process goes through: it counts weights, input, activations and
//! workspaces, not the CUDA context or other processes.
//!
//! Opening a device checks, before any job, that the driver is new enough for the toolkit the
//! agent was built with, that the GPU is the generation the kernels were compiled for, and that
//! Candle's kernels actually load; each failure is a clear error at start-up.

#[cfg(feature = "cudnn")]
pub mod fused;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use candle_core::{
    cuda_backend::cudarc::driver::{result as cu, sys, CudaContext, CudaEvent, CudaStream},
    DType, Device, Module, Tensor,
};
use candle_nn::VarBuilder;
use fleetmark_core::{
    BackendInfo, ComputeCapability, DeviceClass, EnginePath, HardwareKind, JobSpec, KernelCode,
    MathMode,
};
use nvml_wrapper::Nvml;

use crate::{
    backend::{backend_info, Backend, ExecPath, MemoryScope, Prepared, TelemetrySource},
    cpu::dtype_of,
    device::BackendOptions,
    fused::FusedOptions,
    gpucheck::{check_driver, check_generation, check_ordinal, cuda_version_string},
    gpuinfo::NvmlTelemetry,
    input::{input_batch, INPUT_SEED},
    resnet::ResNet18,
    EngineError, ModelWeights,
};

fn setup<E: std::fmt::Debug>(what: &str) -> impl FnOnce(E) -> EngineError + '_ {
    move |e| EngineError::Setup(format!("{what}: {e:?}"))
}

/// Number of GPUs the driver reports.
pub fn device_count() -> Result<usize, EngineError> {
    CudaContext::device_count()
        .map(|n| n.max(0) as usize)
        .map_err(|e| EngineError::Setup(format!("the CUDA driver failed to initialise: {e:?}")))
}

/// Checks that this build can run on GPU `ordinal`, before any job is accepted.
fn preflight(ordinal: usize) -> Result<(i32, (i32, i32)), EngineError> {
    let mut driver = 0i32;
    // SAFETY: cuDriverGetVersion only writes the int it is given.
    unsafe { sys::cuDriverGetVersion(&mut driver) }
        .result()
        .map_err(|e| {
            EngineError::Setup(format!(
                "the NVIDIA driver did not answer ({e:?}): is the driver installed and a GPU present?"
            ))
        })?;
    check_driver(driver, crate::versions::CUDA_BUILD_VERSION).map_err(EngineError::Setup)?;
    check_ordinal(ordinal, device_count()?).map_err(EngineError::Setup)?;
    let ctx = CudaContext::new(ordinal).map_err(setup("cannot create a CUDA context"))?;
    let (major, minor) = ctx
        .compute_capability()
        .map_err(setup("cannot read the compute capability"))?;
    check_generation(
        (major, minor),
        crate::versions::CUDA_COMPUTE_CAP,
        ordinal,
        &ctx.name().unwrap_or_default(),
    )
    .map_err(EngineError::Setup)?;
    Ok((driver, (major, minor)))
}

/// The memory pool every stream-ordered allocation on this device comes from.
fn mem_pool(ctx: &Arc<CudaContext>) -> Option<sys::CUmemoryPool> {
    ctx.bind_to_thread().ok()?;
    // SAFETY: the device handle is valid for the context's lifetime.
    unsafe { cu::device::get_mem_pool(ctx.cu_device()) }.ok()
}

fn pool_attr(pool: sys::CUmemoryPool, attr: sys::CUmemPool_attribute) -> u64 {
    let mut v: u64 = 0;
    // SAFETY: the *_MEM_* attributes are cuuint64_t values.
    let _ = unsafe { cu::mem_pool::get_attribute(pool, attr, &mut v as *mut u64 as *mut _) };
    v
}

fn set_pool_attr(pool: sys::CUmemoryPool, attr: sys::CUmemPool_attribute, mut v: u64) {
    // SAFETY: as above; USED_MEM_HIGH only accepts 0 (a reset), RELEASE_THRESHOLD any value.
    let _ = unsafe { cu::mem_pool::set_attribute(pool, attr, &mut v as *mut u64 as *mut _) };
}

/// One GPU, opened for jobs.
pub struct CudaBackend {
    ordinal: usize,
    device: Device,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    name: String,
    uuid: String,
    driver: i32,
    nvml: Option<Arc<Nvml>>,
    /// The capability the card reports.
    real_cc: ComputeCapability,
    /// The capability it is treated as (`--assume-compute-capability` for testing, else real).
    cc: ComputeCapability,
    fused: FusedOptions,
}

fn format_uuid(u: &sys::CUuuid) -> String {
    let b: Vec<u8> = u.bytes.iter().map(|c| *c as u8).collect();
    format!(
        "GPU-{}-{}-{}-{}-{}",
        hex::encode(&b[0..4]),
        hex::encode(&b[4..6]),
        hex::encode(&b[6..8]),
        hex::encode(&b[8..10]),
        hex::encode(&b[10..16])
    )
}

impl CudaBackend {
    /// Opens GPU `ordinal` on the calling thread, after the start-up checks.
    pub fn open(ordinal: usize, opts: &BackendOptions) -> Result<Self, EngineError> {
        let (driver, (major, minor)) = preflight(ordinal)?;
        let real_cc = ComputeCapability::new(major as u32, minor as u32);
        // A stream of our own (not the legacy default stream), so the fused path can capture it
        // into a CUDA graph.
        let device = Device::new_cuda_with_stream(ordinal)
            .map_err(|e| EngineError::Setup(format!("cannot open cuda:{ordinal}: {e}")))?;
        let cuda = device.as_cuda_device()?.clone();
        let stream = cuda.cuda_stream();
        let ctx = stream.context().clone();
        // Only one stream ever touches our buffers, so cudarc's per-allocation events buy
        // nothing and cost two event records per kernel argument.
        // SAFETY: no allocation exists yet that relies on tracking.
        unsafe { cuda.disable_event_tracking() };
        if let Some(pool) = mem_pool(&ctx) {
            // Keep freed memory in the pool instead of returning it to the driver at every
            // synchronize (a caching allocator, as PyTorch has): otherwise the stock path maps
            // and unmaps memory on every iteration.
            set_pool_attr(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                u64::MAX,
            );
        }
        // Load Candle's kernels now: a PTX/driver mismatch must fail here, not mid-job.
        let probe = (|| -> candle_core::Result<f32> {
            let x = Tensor::arange(0f32, 64f32, &device)?.reshape((1, 1, 8, 8))?;
            let w = Tensor::ones((2, 1, 3, 3), DType::F32, &device)?;
            let y = x
                .conv2d(&w, 1, 1, 1, 1)?
                .relu()?
                .max_pool2d(2)?
                .mean_all()?;
            y.to_dtype(DType::F16)?
                .to_dtype(DType::F32)?
                .to_scalar::<f32>()
        })();
        let probe = probe.map_err(|e| {
            EngineError::Setup(format!(
                "Candle's CUDA kernels failed to run on cuda:{ordinal}: {e}. The usual cause is a \
                 toolkit newer than the driver, or a build for another GPU generation"
            ))
        })?;
        if !probe.is_finite() {
            return Err(EngineError::Setup("the CUDA probe computed garbage".into()));
        }
        let name = ctx.name().unwrap_or_else(|_| format!("cuda:{ordinal}"));
        let uuid = ctx.uuid().map(|u| format_uuid(&u)).unwrap_or_default();
        let nvml = crate::gpuinfo::open_nvml().ok();
        Ok(CudaBackend {
            ordinal,
            device,
            ctx,
            stream,
            name,
            uuid,
            driver,
            nvml,
            real_cc,
            cc: opts.assume_capability.unwrap_or(real_cc),
            fused: opts.fused,
        })
    }

    /// What a result records about how the kernels reached this card and what it was taken
    /// for: an sm_75 build on an H200 runs through the driver's PTX compiler and says so.
    fn generation_details(&self) -> BTreeMap<String, String> {
        let mut d = BTreeMap::new();
        let built = crate::versions::CUDA_COMPUTE_CAP
            .parse::<u32>()
            .map(ComputeCapability::from_sm);
        if let Ok(built) = built {
            d.insert(
                "kernel_code".into(),
                KernelCode::of(built, self.real_cc).to_string(),
            );
        }
        d.insert("compute_capability".into(), self.real_cc.to_string());
        if self.cc != self.real_cc {
            d.insert("assumed_compute_capability".into(), self.cc.to_string());
        }
        d
    }

    fn timer(&self) -> Result<EventTimer, EngineError> {
        EventTimer::new(&self.ctx, self.stream.clone())
    }
}

/// Two timing events on the model's stream.
pub(crate) struct EventTimer {
    start: CudaEvent,
    end: CudaEvent,
    stream: Arc<CudaStream>,
}

impl EventTimer {
    pub(crate) fn new(
        ctx: &Arc<CudaContext>,
        stream: Arc<CudaStream>,
    ) -> Result<Self, EngineError> {
        let make = || {
            ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(setup("cannot create a CUDA event"))
        };
        Ok(EventTimer {
            start: make()?,
            end: make()?,
            stream,
        })
    }

    /// Times `work` on the device: records an event before and after it and waits for the end.
    pub(crate) fn time(
        &self,
        work: impl FnOnce() -> Result<(), EngineError>,
    ) -> Result<Duration, EngineError> {
        self.start
            .record(&self.stream)
            .map_err(setup("event record"))?;
        work()?;
        self.end
            .record(&self.stream)
            .map_err(setup("event record"))?;
        let ms = self.start.elapsed_ms(&self.end).map_err(|e| {
            EngineError::Setup(format!("the GPU failed during the iteration: {e:?}"))
        })?;
        Ok(Duration::from_secs_f64(ms as f64 / 1e3))
    }
}

/// Peak-memory bookkeeping on the device's memory pool.
pub(crate) struct PoolPeak(Option<sys::CUmemoryPool>);

impl PoolPeak {
    pub(crate) fn new(ctx: &Arc<CudaContext>) -> Self {
        PoolPeak(mem_pool(ctx))
    }

    pub(crate) fn reset(&self) {
        if let Some(p) = self.0 {
            set_pool_attr(
                p,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                0,
            );
        }
    }

    pub(crate) fn peak(&self) -> u64 {
        self.0
            .map(|p| pool_attr(p, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH))
            .unwrap_or(0)
    }
}

impl Backend for CudaBackend {
    fn device(&self) -> String {
        format!("cuda:{}", self.ordinal)
    }

    fn hardware(&self) -> (String, String) {
        (
            HardwareKind::from_gpu_name(&self.name).to_string(),
            self.name.clone(),
        )
    }

    fn class(&self) -> DeviceClass {
        DeviceClass::Cuda(self.cc)
    }

    fn prepare(
        &mut self,
        job: &JobSpec,
        weights: &ModelWeights,
    ) -> Result<Box<dyn Prepared + '_>, EngineError> {
        let mut prepared: Box<dyn Prepared + '_> = match job.engine {
            EnginePath::Stock => Box::new(self.prepare_stock(job, weights)?),
            #[cfg(feature = "cudnn")]
            EnginePath::Auto | EnginePath::Fused => Box::new(fused::FusedPrepared::new(
                &self.ctx,
                &self.stream,
                job,
                weights,
                &self.fused,
                self.cc,
            )?),
            #[cfg(not(feature = "cudnn"))]
            EnginePath::Auto => Box::new(self.prepare_stock(job, weights)?),
            #[cfg(not(feature = "cudnn"))]
            EnginePath::Fused => {
                return Err(EngineError::Unsupported(
                    "the fused GPU path needs an agent built with the cudnn feature".into(),
                ))
            }
        };
        prepared.add_details(self.generation_details());
        Ok(prepared)
    }

    fn health_check(&mut self) -> Option<Result<fleetmark_core::DeviceHealth, EngineError>> {
        let facts = self
            .nvml
            .as_ref()
            .and_then(|n| n.device_by_uuid(self.uuid.as_str()).ok())
            .map(|d| crate::health::DeviceFacts {
                pcie_link_gen: d.current_pcie_link_gen().ok(),
                pcie_link_width: d.current_pcie_link_width().ok(),
                power_limit_watts: d.enforced_power_limit().ok().map(|mw| mw as f64 / 1000.0),
                ecc_enabled: d.is_ecc_enabled().ok().map(|e| e.currently_enabled),
            })
            .unwrap_or_default();
        let precisions = fleetmark_core::capability::precisions_for(self.class());
        let telemetry = self.telemetry_source();
        Some(crate::health::check(
            &self.device,
            &precisions,
            crate::health::HealthOptions::GPU,
            facts,
            telemetry.as_deref(),
        ))
    }

    fn telemetry_source(&self) -> Option<Box<dyn TelemetrySource>> {
        let nvml = self.nvml.clone()?;
        Some(Box::new(NvmlTelemetry {
            nvml,
            uuid: self.uuid.clone(),
            interval: Duration::from_millis(100),
        }))
    }

    fn driver_versions(&self) -> (String, String) {
        #[cfg(feature = "cudnn")]
        let cudnn = fused::cudnn_version();
        #[cfg(not(feature = "cudnn"))]
        let cudnn = String::new();
        (cuda_version_string(self.driver), cudnn)
    }
}

impl CudaBackend {
    fn prepare_stock(
        &self,
        job: &JobSpec,
        weights: &ModelWeights,
    ) -> Result<StockPrepared, EngineError> {
        let dtype = dtype_of(job.precision);
        let vb = VarBuilder::from_tensors(weights.tensors.clone(), dtype, &self.device);
        let model = ResNet18::load(vb, false)?;
        let host_input = input_batch(INPUT_SEED, job.batch_size as usize, job.image_size as usize)?
            .to_dtype(dtype)?;
        let input = host_input.to_device(&self.device)?;
        let mut details = BTreeMap::new();
        details.insert("layout".into(), "nchw".into());
        details.insert("batch_norm".into(), "separate".into());
        details.insert(
            "conv".into(),
            if cfg!(feature = "candle-cudnn") {
                "candle cudnn"
            } else {
                "candle im2col+cublas"
            }
            .into(),
        );
        details.insert("cuda_graph".into(), "false".into());
        // Candle's own kernels compute f32 in f32; cuBLAS matmuls default to no TF32.
        let math = MathMode::plain(job.precision);
        Ok(StockPrepared {
            model,
            input,
            host_input,
            timer: self.timer()?,
            peak: PoolPeak::new(&self.ctx),
            math,
            info: backend_info("candle-cuda", ExecPath::Stock, math, details),
        })
    }
}

struct StockPrepared {
    model: ResNet18,
    input: Tensor,
    host_input: Tensor,
    timer: EventTimer,
    peak: PoolPeak,
    math: MathMode,
    info: BackendInfo,
}

impl Prepared for StockPrepared {
    fn info(&self) -> BackendInfo {
        self.info.clone()
    }

    fn math(&self) -> MathMode {
        self.math
    }

    fn add_details(&mut self, details: BTreeMap<String, String>) {
        self.info.details.extend(details);
    }

    fn timed_iteration(&mut self) -> Result<Duration, EngineError> {
        let mut out = None;
        let d = self.timer.time(|| {
            out = Some(self.model.forward(&self.input)?);
            Ok(())
        })?;
        drop(out);
        Ok(d)
    }

    fn timed_input_copy(&mut self) -> Result<Option<Duration>, EngineError> {
        let device = self.input.device().clone();
        let mut copied = None;
        let d = self.timer.time(|| {
            copied = Some(self.host_input.to_device(&device)?);
            Ok(())
        })?;
        if let Some(c) = copied {
            self.input = c;
        }
        Ok(Some(d))
    }

    fn logits(&mut self) -> Result<Vec<f32>, EngineError> {
        let out = self.model.forward(&self.input)?;
        Ok(out.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    }

    fn reset_peak_memory(&mut self) {
        self.peak.reset();
    }

    fn peak_memory(&mut self) -> (u64, MemoryScope) {
        (self.peak.peak(), MemoryScope::DeviceAllocations)
    }
}
