//! The optimised GPU path for ResNet18 ("fused"), built on Candle's CUDA device with cuDNN
//! called through cudarc where Candle has no equivalent.
//!
//! What it does, and why (measured gains are in docs/performance.md):
//! - Batch norm is folded into each convolution on the host, in f32, once: inference needs only
//!   `conv(x, w') + b'`.
//! - Activations are NHWC and weights KRSC, the layout tensor cores read. The stem's 3 input
//!   channels are padded with zeros (to 8 for f16/bf16, 4 for f32) so it can use them too.
//! - Each convolution gets a plan once, at prepare time: cuDNN's `FindEx` ranks algorithms on
//!   the real buffers, then the best few are timed together with two epilogues (cuDNN's fused
//!   conv+bias+residual+ReLU call, or conv followed by separate bias/add/ReLU ops) and the fastest
//!   correct combination is kept with its descriptors and one shared workspace.
//! - The residual add and ReLU of each block ride in the second convolution's epilogue; a
//!   downsample's bias is moved into that epilogue's bias too, so the downsample is a bare conv.
//! - Activation memory is one slab, laid out by liveness, so peak memory is what the largest
//!   live set needs, not the sum of all activations.
//! - The whole forward pass is captured once into a CUDA graph and replayed, which removes the
//!   host from the timed loop.
//!
//! Knobs for experiments (documented in docs/performance.md): `FLEETMARK_CUDA_GRAPH=0`,
//! `FLEETMARK_EPILOGUE=api|separate|auto`, `FLEETMARK_STEM_PAD=3|4|8`, `FLEETMARK_TF32=0`,
//! `FLEETMARK_ALGO_CANDIDATES=N`, `FLEETMARK_WORKSPACE_LIMIT=bytes`, `FLEETMARK_PLAN=timed|ranked`,
//! `FLEETMARK_PROFILE=1`.

use std::{collections::BTreeMap, ffi::c_void, ptr::null_mut, sync::Arc, time::Duration};

use candle_core::{
    cuda_backend::cudarc::{
        cudnn::sys as dnn,
        driver::{sys, CudaContext, CudaGraph, CudaSlice, CudaStream, DevicePtr},
    },
    DType, Device, Tensor,
};
use candle_nn::VarBuilder;
use fleetmark_core::{BackendInfo, JobSpec, Precision};

use super::{EventTimer, PoolPeak};
use crate::{
    backend::Prepared,
    input::{input_batch, INPUT_SEED},
    resnet::{ConvBn, ResNet18},
    EngineError, ModelWeights,
};

pub fn cudnn_version() -> String {
    // SAFETY: a pure query.
    let v = unsafe { dnn::cudnnGetVersion() };
    format!("{}.{}.{}", v / 10000, (v % 10000) / 100, v % 100)
}

fn env_str(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|s| !s.is_empty())
}

fn check(what: &str, s: dnn::cudnnStatus_t) -> Result<(), EngineError> {
    if s == dnn::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(EngineError::Setup(format!("cuDNN {what}: {s:?}")))
    }
}

fn drv<T>(what: &str, r: Result<T, impl std::fmt::Debug>) -> Result<T, EngineError> {
    r.map_err(|e| EngineError::Setup(format!("CUDA {what}: {e:?}")))
}

// ---- RAII wrappers for cuDNN objects ----

struct Handle(dnn::cudnnHandle_t);
impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: created by cudnnCreate, destroyed once.
        unsafe { dnn::cudnnDestroy(self.0) };
    }
}

struct TensorDesc(dnn::cudnnTensorDescriptor_t);
impl Drop for TensorDesc {
    fn drop(&mut self) {
        // SAFETY: created by cudnnCreateTensorDescriptor, destroyed once.
        unsafe { dnn::cudnnDestroyTensorDescriptor(self.0) };
    }
}

struct FilterDesc(dnn::cudnnFilterDescriptor_t);
impl Drop for FilterDesc {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { dnn::cudnnDestroyFilterDescriptor(self.0) };
    }
}

struct ConvDesc(dnn::cudnnConvolutionDescriptor_t);
impl Drop for ConvDesc {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { dnn::cudnnDestroyConvolutionDescriptor(self.0) };
    }
}

struct ActDesc(dnn::cudnnActivationDescriptor_t);
impl Drop for ActDesc {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { dnn::cudnnDestroyActivationDescriptor(self.0) };
    }
}

struct PoolDesc(dnn::cudnnPoolingDescriptor_t);
impl Drop for PoolDesc {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { dnn::cudnnDestroyPoolingDescriptor(self.0) };
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Elem {
    F32,
    F16,
    Bf16,
}

impl Elem {
    fn of(p: Precision) -> Self {
        match p {
            Precision::F32 => Elem::F32,
            Precision::F16 => Elem::F16,
            Precision::Bf16 => Elem::Bf16,
        }
    }
    fn size(self) -> usize {
        match self {
            Elem::F32 => 4,
            _ => 2,
        }
    }
    fn dnn(self) -> dnn::cudnnDataType_t {
        match self {
            Elem::F32 => dnn::cudnnDataType_t::CUDNN_DATA_FLOAT,
            Elem::F16 => dnn::cudnnDataType_t::CUDNN_DATA_HALF,
            Elem::Bf16 => dnn::cudnnDataType_t::CUDNN_DATA_BFLOAT16,
        }
    }
    fn dtype(self) -> DType {
        match self {
            Elem::F32 => DType::F32,
            Elem::F16 => DType::F16,
            Elem::Bf16 => DType::BF16,
        }
    }
}

/// Host bytes of a tensor in `e`'s precision, little-endian.
fn bytes_of(t: &Tensor, e: Elem) -> Result<Vec<u8>, EngineError> {
    let t = t.to_dtype(e.dtype())?.flatten_all()?;
    Ok(match e {
        Elem::F32 => t
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        Elem::F16 => t
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        Elem::Bf16 => t
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
    })
}

fn f32_from_bytes(b: &[u8], e: Elem) -> Vec<f32> {
    match e {
        Elem::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Elem::F16 => b
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Elem::Bf16 => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    }
}

/// An NHWC activation: its shape and where it lives.
#[derive(Debug, Clone, Copy)]
struct Act {
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    place: Place,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Place {
    Input,
    Output,
    /// Index into the slab plan.
    Slab(usize),
}

impl Act {
    fn elems(&self) -> usize {
        self.n * self.h * self.w * self.c
    }
}

fn tensor_desc(a: &Act, e: Elem) -> Result<TensorDesc, EngineError> {
    let mut d = null_mut();
    // SAFETY: out-pointer for a new descriptor, then set with valid dimensions.
    unsafe {
        check("create tensor", dnn::cudnnCreateTensorDescriptor(&mut d))?;
        let t = TensorDesc(d);
        check(
            "set tensor",
            dnn::cudnnSetTensor4dDescriptor(
                t.0,
                dnn::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC,
                e.dnn(),
                a.n as i32,
                a.c as i32,
                a.h as i32,
                a.w as i32,
            ),
        )?;
        Ok(t)
    }
}

/// How each layer's algorithm is picked. Timing single layers launch by launch measures launch
/// overhead too, which a CUDA graph removes, so at small batches it can mislead; cuDNN's own
/// ranking times kernels alone. Both plans are built and the whole graphs compared.
#[derive(Debug, Clone, Copy, PartialEq)]
enum PlanStrategy {
    /// The fastest of every ranked algorithm and epilogue, timed on the real buffers.
    Timed,
    /// cuDNN's fastest algorithm, with the fused epilogue where it runs.
    Ranked,
}

impl PlanStrategy {
    fn as_str(self) -> &'static str {
        match self {
            PlanStrategy::Timed => "timed",
            PlanStrategy::Ranked => "ranked",
        }
    }
}

/// How a convolution's bias, residual and ReLU are applied.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Epilogue {
    /// `cudnnConvolutionBiasActivationForward`, bias in the activation precision.
    Api,
    /// The same call with an f32 bias (some cuDNN configurations want that).
    ApiF32Bias,
    /// Convolution, then `cudnnAddTensor` for bias and residual, then an in-place ReLU.
    Separate,
}

struct ConvStep {
    name: String,
    x: usize,
    y: usize,
    z: Option<usize>,
    relu: bool,
    // Kept alive for the raw pointers below.
    _w: CudaSlice<u8>,
    _b: Option<(CudaSlice<u8>, CudaSlice<u8>)>,
    w_ptr: u64,
    /// Bias in the activation precision, and in f32.
    b_ptrs: Option<(u64, u64)>,
    wd: FilterDesc,
    cd: ConvDesc,
    bd: Option<(TensorDesc, TensorDesc)>,
    algo: dnn::cudnnConvolutionFwdAlgo_t,
    epilogue: Epilogue,
    ws: usize,
}

enum Step {
    Conv(Box<ConvStep>),
    Pool {
        name: &'static str,
        x: usize,
        y: usize,
        pd: PoolDesc,
    },
}

struct Planner {
    acts: Vec<Act>,
    /// (first op, last op) using each activation.
    uses: Vec<(usize, usize)>,
    ops: usize,
}

impl Planner {
    fn act(&mut self, n: usize, h: usize, w: usize, c: usize, place: Place) -> usize {
        self.acts.push(Act { n, h, w, c, place });
        self.uses.push((usize::MAX, 0));
        self.acts.len() - 1
    }
    fn touch(&mut self, a: usize) {
        let op = self.ops;
        let u = &mut self.uses[a];
        u.0 = u.0.min(op);
        u.1 = u.1.max(op);
    }
}

/// One convolution's parameters before planning.
struct ConvSpec {
    name: String,
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    pad: usize,
    x: usize,
    y: usize,
    z: Option<usize>,
    relu: bool,
}

enum Pending {
    Conv(ConvSpec),
    Pool {
        name: &'static str,
        x: usize,
        y: usize,
        max: bool,
    },
}

pub struct FusedPrepared {
    handle: Handle,
    stream: Arc<CudaStream>,
    elem: Elem,
    acts: Vec<Act>,
    steps: Vec<Step>,
    descs: Vec<TensorDesc>,
    relu: ActDesc,
    _slab: Option<CudaSlice<u8>>,
    slab_ptr: u64,
    slab_offsets: Vec<usize>,
    input: CudaSlice<u8>,
    input_ptr: u64,
    host_input: Vec<u8>,
    output: CudaSlice<u8>,
    output_ptr: u64,
    _workspace: Option<CudaSlice<u8>>,
    ws_ptr: u64,
    ws_size: usize,
    /// Largest workspace a plan may use.
    ws_cap: usize,
    graph: Option<CudaGraph>,
    timer: EventTimer,
    peak: PoolPeak,
    batch: usize,
    info: BackendInfo,
}

fn ptr_of(s: &CudaSlice<u8>, stream: &CudaStream) -> u64 {
    // Event tracking is off and one stream uses these buffers, so the guard does nothing; the
    // pointer stays valid as long as the slice lives in the same struct.
    let (p, _guard) = s.device_ptr(stream);
    p
}

fn upload(stream: &Arc<CudaStream>, bytes: &[u8]) -> Result<(CudaSlice<u8>, u64), EngineError> {
    let s = drv("upload", stream.clone_htod(bytes))?;
    let p = ptr_of(&s, stream);
    Ok((s, p))
}

fn alloc(stream: &Arc<CudaStream>, bytes: usize) -> Result<(CudaSlice<u8>, u64), EngineError> {
    let s = drv("alloc", stream.alloc_zeros::<u8>(bytes.max(1)))?;
    let p = ptr_of(&s, stream);
    Ok((s, p))
}

impl FusedPrepared {
    /// Plans the model for `job`. The stem's input padding is itself chosen by timing: each
    /// candidate (3, 4 or 8 channels; fewer bytes against better tensor-core kernels) is
    /// planned and timed as a whole forward pass, and the fastest is kept.
    pub fn new(
        device: &Device,
        ctx: &Arc<CudaContext>,
        stream: &Arc<CudaStream>,
        job: &JobSpec,
        weights: &ModelWeights,
    ) -> Result<Self, EngineError> {
        let pads: Vec<usize> = match env_str("FLEETMARK_STEM_PAD").and_then(|s| s.parse().ok()) {
            Some(p) => vec![p],
            None if job.precision == Precision::F32 => vec![4, 3],
            None => vec![8, 4, 3],
        };
        let strategies: Vec<PlanStrategy> = match env_str("FLEETMARK_PLAN").as_deref() {
            Some("timed") => vec![PlanStrategy::Timed],
            Some("ranked") => vec![PlanStrategy::Ranked],
            _ => vec![PlanStrategy::Timed, PlanStrategy::Ranked],
        };
        let mut best: Option<(f64, FusedPrepared)> = None;
        let mut tried = Vec::new();
        let mut first_error: Option<EngineError> = None;
        for pad in pads {
            for &strategy in &strategies {
                let tag = format!("{pad}/{}", strategy.as_str());
                let candidate =
                    match Self::with_stem_pad(device, ctx, stream, job, weights, pad, strategy) {
                        Ok(c) => c,
                        Err(e) => {
                            tried.push(format!("{tag}:failed"));
                            tracing::debug!(pad, error = %e, "plan candidate failed");
                            first_error.get_or_insert(e);
                            continue;
                        }
                    };
                let t = match candidate.median_forward_ms(10) {
                    Ok(t) => t,
                    Err(e) => {
                        tried.push(format!("{tag}:failed"));
                        first_error.get_or_insert(e);
                        continue;
                    }
                };
                tried.push(format!("{tag}:{t:.3}ms"));
                if best.as_ref().is_none_or(|(bt, _)| t < *bt) {
                    // The loser is dropped here, before the next candidate is built.
                    best = Some((t, candidate));
                }
            }
        }
        let (_, mut chosen) = best.ok_or_else(|| {
            EngineError::Unsupported(format!(
                "no stem padding could be planned ({})",
                tried.join(", ")
            ))
        })?;
        chosen
            .info
            .details
            .insert("stem_search".into(), tried.join(" "));
        if env_str("FLEETMARK_PROFILE").as_deref() == Some("1") {
            let profile = chosen.profile(10)?;
            chosen.info.details.insert("profile_ms".into(), profile);
        }
        Ok(chosen)
    }

    /// Median of `n` timed forward passes, for choosing between plans.
    fn median_forward_ms(&self, n: usize) -> Result<f64, EngineError> {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(self.timer.time(|| self.forward())?.as_secs_f64() * 1e3);
        }
        v.sort_by(f64::total_cmp);
        Ok(v[n / 2])
    }

    /// Each step timed on its own (median of `n`), for docs/performance.md.
    fn profile(&self, n: usize) -> Result<String, EngineError> {
        let mut parts = Vec::new();
        for s in &self.steps {
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                let d = self.timer.time(|| match s {
                    Step::Conv(c) => self.run_conv(c),
                    Step::Pool { name, x, y, pd } => self.run_pool(*x, *y, pd, name),
                })?;
                v.push(d.as_secs_f64() * 1e3);
            }
            v.sort_by(f64::total_cmp);
            let name = match s {
                Step::Conv(c) => c.name.clone(),
                Step::Pool { name, .. } => name.to_string(),
            };
            parts.push(format!("{name}={:.4}", v[n / 2]));
        }
        Ok(parts.join(" "))
    }

    fn with_stem_pad(
        _device: &Device,
        ctx: &Arc<CudaContext>,
        stream: &Arc<CudaStream>,
        job: &JobSpec,
        weights: &ModelWeights,
        stem_pad: usize,
        strategy: PlanStrategy,
    ) -> Result<Self, EngineError> {
        let elem = Elem::of(job.precision);
        let batch = job.batch_size as usize;
        let size = job.image_size as usize;
        // TF32 exists from Ampere (compute capability 8.0) on; older cards compute f32 in f32.
        let (cc_major, _) = drv("compute capability", ctx.compute_capability())?;
        let tf32 = env_str("FLEETMARK_TF32").as_deref() != Some("0") && cc_major >= 8;
        let stem_pad = stem_pad.max(3);
        let use_graph = env_str("FLEETMARK_CUDA_GRAPH").as_deref() != Some("0");
        let epilogue_choice = env_str("FLEETMARK_EPILOGUE").unwrap_or_else(|| "auto".into());
        let candidates = env_str("FLEETMARK_ALGO_CANDIDATES")
            .and_then(|s| s.parse::<usize>().ok())
            .unwrap_or(8)
            .max(1);

        // Fold batch norm on the host in f32: the folded weights are what every precision uses.
        let vb = VarBuilder::from_tensors(weights.tensors.clone(), DType::F32, &Device::Cpu);
        let model = ResNet18::load(vb, true)?;

        // Describe the network as a list of steps over NHWC activations.
        let mut p = Planner {
            acts: Vec::new(),
            uses: Vec::new(),
            ops: 0,
        };
        let out_dim = |h: usize, k: usize, s: usize, pad: usize| (h + 2 * pad - k) / s + 1;
        let input = p.act(batch, size, size, stem_pad, Place::Input);
        let mut pending = Vec::new();
        let conv = |p: &mut Planner,
                    pending: &mut Vec<Pending>,
                    name: String,
                    cb: &ConvBn,
                    x: usize,
                    z: Option<usize>,
                    relu: bool,
                    extra_bias: Option<&Tensor>,
                    with_bias: bool|
         -> Result<usize, EngineError> {
            let (w, b) = cb.folded()?;
            let cfg = cb.conv().config();
            let (k, r) = (w.dim(0)?, w.dim(2)?);
            let xa = p.acts[x];
            let h = out_dim(xa.h, r, cfg.stride, cfg.padding);
            let wd = out_dim(xa.w, r, cfg.stride, cfg.padding);
            let y = p.act(xa.n, h, wd, k, Place::Slab(0));
            let bias = match (with_bias, extra_bias) {
                (false, _) => None,
                (true, Some(e)) => Some((b + e)?),
                (true, None) => Some(b),
            };
            p.touch(x);
            p.touch(y);
            if let Some(z) = z {
                p.touch(z);
            }
            p.ops += 1;
            pending.push(Pending::Conv(ConvSpec {
                name,
                weight: w,
                bias,
                stride: cfg.stride,
                pad: cfg.padding,
                x,
                y,
                z,
                relu,
            }));
            Ok(y)
        };
        let stem = conv(
            &mut p,
            &mut pending,
            "stem".into(),
            &model.stem,
            input,
            None,
            true,
            None,
            true,
        )?;
        let sa = p.acts[stem];
        let pooled = p.act(
            batch,
            out_dim(sa.h, 3, 2, 1),
            out_dim(sa.w, 3, 2, 1),
            sa.c,
            Place::Slab(0),
        );
        p.touch(stem);
        p.touch(pooled);
        p.ops += 1;
        pending.push(Pending::Pool {
            name: "maxpool",
            x: stem,
            y: pooled,
            max: true,
        });
        let mut x = pooled;
        for (li, layer) in model.layers.iter().enumerate() {
            for (bi, block) in layer.iter().enumerate() {
                let prefix = format!("l{}.{}", li + 1, bi);
                let (residual, ds_bias) = match &block.downsample {
                    Some(ds) => {
                        let (_, dsb) = ds.folded()?;
                        let r = conv(
                            &mut p,
                            &mut pending,
                            format!("{prefix}.ds"),
                            ds,
                            x,
                            None,
                            false,
                            None,
                            false,
                        )?;
                        (r, Some(dsb))
                    }
                    None => (x, None),
                };
                let y1 = conv(
                    &mut p,
                    &mut pending,
                    format!("{prefix}.c1"),
                    &block.conv1,
                    x,
                    None,
                    true,
                    None,
                    true,
                )?;
                x = conv(
                    &mut p,
                    &mut pending,
                    format!("{prefix}.c2"),
                    &block.conv2,
                    y1,
                    Some(residual),
                    true,
                    ds_bias.as_ref(),
                    true,
                )?;
            }
        }
        let la = p.acts[x];
        let avg = p.act(batch, 1, 1, la.c, Place::Slab(0));
        p.touch(x);
        p.touch(avg);
        p.ops += 1;
        pending.push(Pending::Pool {
            name: "avgpool",
            x,
            y: avg,
            max: false,
        });
        let output = p.act(batch, 1, 1, 1000, Place::Output);
        p.touch(avg);
        p.touch(output);
        p.ops += 1;
        let fc_w = model.fc.weight().reshape((1000, 512, 1, 1))?;
        let fc_b = model.fc.bias().cloned();
        pending.push(Pending::Conv(ConvSpec {
            name: "fc".into(),
            weight: fc_w,
            bias: fc_b,
            stride: 1,
            pad: 0,
            x: avg,
            y: output,
            z: None,
            relu: false,
        }));

        // Lay out the slab by liveness.
        let slab_ids: Vec<usize> = (0..p.acts.len())
            .filter(|&i| matches!(p.acts[i].place, Place::Slab(_)))
            .collect();
        let sizes: Vec<(usize, usize, usize)> = slab_ids
            .iter()
            .map(|&i| (p.acts[i].elems() * elem.size(), p.uses[i].0, p.uses[i].1))
            .collect();
        let (offsets, slab_bytes) = crate::memplan::plan_slab(&sizes);
        for (k, &i) in slab_ids.iter().enumerate() {
            p.acts[i].place = Place::Slab(k);
        }

        // Allocate everything the forward pass touches, once.
        ctx.bind_to_thread()
            .map_err(|e| EngineError::Setup(format!("{e:?}")))?;
        let (slab, slab_ptr) = alloc(stream, slab_bytes)?;
        let host_nchw = input_batch(INPUT_SEED, batch, size)?;
        let nhwc = host_nchw.permute((0, 2, 3, 1))?.contiguous()?;
        let nhwc = if stem_pad > 3 {
            nhwc.pad_with_zeros(3, 0, stem_pad - 3)?
        } else {
            nhwc
        };
        let host_input = bytes_of(&nhwc, elem)?;
        let (input_buf, input_ptr) = upload(stream, &host_input)?;
        let (output_buf, output_ptr) = alloc(stream, batch * 1000 * elem.size())?;

        let mut handle = null_mut();
        // SAFETY: creates a handle on the current context and binds it to our stream.
        unsafe {
            check("create", dnn::cudnnCreate(&mut handle))?;
        }
        let handle = Handle(handle);
        // SAFETY: the handle is valid and the stream outlives it (both live in `Self`).
        unsafe {
            check(
                "set stream",
                dnn::cudnnSetStream(handle.0, stream.cu_stream() as dnn::cudaStream_t),
            )?;
        }
        let descs = p
            .acts
            .iter()
            .map(|a| tensor_desc(a, elem))
            .collect::<Result<Vec<_>, _>>()?;
        let mut relu = null_mut();
        // SAFETY: new activation descriptor, set to ReLU.
        unsafe {
            check(
                "create activation",
                dnn::cudnnCreateActivationDescriptor(&mut relu),
            )?;
        }
        let relu = ActDesc(relu);
        // SAFETY: valid descriptor.
        unsafe {
            check(
                "set activation",
                dnn::cudnnSetActivationDescriptor(
                    relu.0,
                    dnn::cudnnActivationMode_t::CUDNN_ACTIVATION_RELU,
                    dnn::cudnnNanPropagation_t::CUDNN_PROPAGATE_NAN,
                    0.0,
                ),
            )?;
        }

        // A generous workspace for the search, freed once the plans are chosen.
        let (free, _) = drv("mem info", ctx.mem_get_info())?;
        let search_ws = (free / 4).min(1 << 30);
        // Workspaces are capped relative to the activations, so a slightly faster algorithm
        // cannot buy its speed with more memory than the activations themselves.
        let ws_cap = env_str("FLEETMARK_WORKSPACE_LIMIT")
            .and_then(|s| s.parse::<usize>().ok())
            .unwrap_or((slab_bytes / 4).max(64 << 20))
            .min(search_ws);
        let (search_buf, search_ptr) = alloc(stream, search_ws)?;

        let mut me = FusedPrepared {
            handle,
            stream: stream.clone(),
            elem,
            acts: p.acts.clone(),
            steps: Vec::new(),
            descs,
            relu,
            _slab: Some(slab),
            slab_ptr,
            slab_offsets: offsets,
            input: input_buf,
            input_ptr,
            host_input,
            output: output_buf,
            output_ptr,
            _workspace: None,
            ws_ptr: search_ptr,
            ws_size: search_ws,
            ws_cap,
            graph: None,
            timer: EventTimer::new(ctx, stream.clone())?,
            peak: PoolPeak::new(ctx),
            batch,
            info: BackendInfo::default(),
        };

        let mut plan_notes = Vec::new();
        for step in pending {
            match step {
                Pending::Pool { name, x, y, max } => {
                    let xa = me.acts[x];
                    let mut pd = null_mut();
                    // SAFETY: new pooling descriptor with valid window parameters.
                    unsafe {
                        check("create pooling", dnn::cudnnCreatePoolingDescriptor(&mut pd))?;
                    }
                    let pd = PoolDesc(pd);
                    let (mode, win, pad, stride) = if max {
                        (
                            dnn::cudnnPoolingMode_t::CUDNN_POOLING_MAX,
                            (3, 3),
                            1,
                            (2, 2),
                        )
                    } else {
                        (
                            dnn::cudnnPoolingMode_t::CUDNN_POOLING_AVERAGE_COUNT_INCLUDE_PADDING,
                            (xa.h as i32, xa.w as i32),
                            0,
                            (xa.h as i32, xa.w as i32),
                        )
                    };
                    // SAFETY: valid descriptor.
                    unsafe {
                        check(
                            "set pooling",
                            dnn::cudnnSetPooling2dDescriptor(
                                pd.0,
                                mode,
                                dnn::cudnnNanPropagation_t::CUDNN_PROPAGATE_NAN,
                                win.0,
                                win.1,
                                pad,
                                pad,
                                stride.0,
                                stride.1,
                            ),
                        )?;
                    }
                    me.steps.push(Step::Pool { name, x, y, pd });
                }
                Pending::Conv(spec) => {
                    let step =
                        me.plan_conv(spec, tf32, stem_pad, &epilogue_choice, candidates, strategy)?;
                    plan_notes.push(format!(
                        "{}:{}/{:?}",
                        step.name,
                        algo_name(step.algo),
                        step.epilogue
                    ));
                    me.steps.push(Step::Conv(Box::new(step)));
                }
            }
        }
        // The plan is made: swap the search workspace for one just big enough.
        let ws_needed = me
            .steps
            .iter()
            .map(|s| match s {
                Step::Conv(c) => c.ws,
                _ => 0,
            })
            .max()
            .unwrap_or(0);
        drop(search_buf);
        if ws_needed > 0 {
            let (ws, ws_ptr) = alloc(stream, ws_needed)?;
            me._workspace = Some(ws);
            me.ws_ptr = ws_ptr;
        } else {
            me.ws_ptr = 0;
        }
        me.ws_size = ws_needed;

        // One eager pass to check every step runs, then capture the graph.
        me.run_eager()?;
        drv("synchronize", stream.synchronize())?;
        let mut graph_note = "off".to_string();
        if use_graph {
            match me.capture() {
                Ok(g) => {
                    me.graph = Some(g);
                    graph_note = "on".into();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cuda graph capture failed; running eagerly");
                    graph_note = format!("failed: {e}");
                }
            }
        }

        let mut details = BTreeMap::new();
        details.insert("layout".into(), "nhwc".into());
        details.insert("batch_norm".into(), "folded".into());
        details.insert("conv".into(), format!("cudnn {}", cudnn_version()));
        details.insert("cuda_graph".into(), graph_note);
        details.insert("stem_channels".into(), stem_pad.to_string());
        details.insert("epilogue".into(), epilogue_choice);
        details.insert("slab_bytes".into(), slab_bytes.to_string());
        details.insert("workspace_bytes".into(), ws_needed.to_string());
        details.insert("workspace_cap_bytes".into(), me.ws_cap.to_string());
        details.insert("plan".into(), plan_notes.join(" "));
        let math = match elem {
            // cuDNN's default math lets f32 convolutions use TF32 tensor cores, as PyTorch's
            // default does; say so.
            Elem::F32 if tf32 => "tf32",
            Elem::F32 => "f32",
            Elem::F16 => "f16",
            Elem::Bf16 => "bf16",
        };
        me.info = BackendInfo {
            backend: "candle-cuda".into(),
            path: "fused".into(),
            math: math.into(),
            details,
            simulated: false,
        };
        Ok(me)
    }

    fn act_ptr(&self, a: usize) -> u64 {
        match self.acts[a].place {
            Place::Input => self.input_ptr,
            Place::Output => self.output_ptr,
            Place::Slab(k) => self.slab_ptr + self.slab_offsets[k] as u64,
        }
    }

    fn plan_conv(
        &mut self,
        spec: ConvSpec,
        tf32: bool,
        stem_pad: usize,
        epilogue_choice: &str,
        candidates: usize,
        strategy: PlanStrategy,
    ) -> Result<ConvStep, EngineError> {
        let e = self.elem;
        let (k, c, r, s) = spec.weight.dims4()?;
        // KCRS -> KRSC, padding the stem's input channels to match its padded input.
        let mut w = spec.weight.permute((0, 2, 3, 1))?.contiguous()?;
        let mut c_eff = c;
        if spec.name == "stem" && stem_pad > c {
            w = w.pad_with_zeros(3, 0, stem_pad - c)?;
            c_eff = stem_pad;
        }
        let (w_buf, w_ptr) = upload(&self.stream, &bytes_of(&w, e)?)?;
        let bias = match &spec.bias {
            Some(b) => {
                let (bt, bt_ptr) = upload(&self.stream, &bytes_of(b, e)?)?;
                let (bf, bf_ptr) = upload(&self.stream, &bytes_of(b, Elem::F32)?)?;
                let bias_act = Act {
                    n: 1,
                    h: 1,
                    w: 1,
                    c: k,
                    place: Place::Output,
                };
                let dt = tensor_desc(&bias_act, e)?;
                let df = tensor_desc(&bias_act, Elem::F32)?;
                Some(((bt, bf), (bt_ptr, bf_ptr), (dt, df)))
            }
            None => None,
        };

        let mut wd = null_mut();
        let mut cd = null_mut();
        // SAFETY: new descriptors set with valid parameters.
        unsafe {
            check("create filter", dnn::cudnnCreateFilterDescriptor(&mut wd))?;
            check(
                "create conv",
                dnn::cudnnCreateConvolutionDescriptor(&mut cd),
            )?;
        }
        let wd = FilterDesc(wd);
        let cd = ConvDesc(cd);
        let math = match (e, tf32) {
            (Elem::F32, false) => dnn::cudnnMathType_t::CUDNN_FMA_MATH,
            (Elem::F32, true) => dnn::cudnnMathType_t::CUDNN_DEFAULT_MATH,
            _ => dnn::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
        };
        // SAFETY: valid descriptors.
        unsafe {
            check(
                "set filter",
                dnn::cudnnSetFilter4dDescriptor(
                    wd.0,
                    e.dnn(),
                    dnn::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC,
                    k as i32,
                    c_eff as i32,
                    r as i32,
                    s as i32,
                ),
            )?;
            check(
                "set conv",
                dnn::cudnnSetConvolution2dDescriptor(
                    cd.0,
                    spec.pad as i32,
                    spec.pad as i32,
                    spec.stride as i32,
                    spec.stride as i32,
                    1,
                    1,
                    dnn::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                    dnn::cudnnDataType_t::CUDNN_DATA_FLOAT,
                ),
            )?;
            check("set math", dnn::cudnnSetConvolutionMathType(cd.0, math))?;
        }

        let (b_store, b_ptrs, bd) = match bias {
            Some((store, ptrs, descs)) => (Some(store), Some(ptrs), Some(descs)),
            None => (None, None, None),
        };
        let mut step = ConvStep {
            name: spec.name,
            x: spec.x,
            y: spec.y,
            z: spec.z,
            relu: spec.relu,
            _w: w_buf,
            _b: b_store,
            w_ptr,
            b_ptrs,
            wd,
            cd,
            bd,
            algo: dnn::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
            epilogue: Epilogue::Separate,
            ws: 0,
        };

        // Rank algorithms on the real buffers.
        const MAX_ALGOS: usize = 8;
        // SAFETY: zeroed perf structs are valid (every enum has a 0 variant).
        let mut perf: [dnn::cudnnConvolutionFwdAlgoPerf_t; MAX_ALGOS] =
            unsafe { std::mem::zeroed() };
        let mut returned = 0i32;
        // SAFETY: all descriptors and pointers are valid and sized for this convolution; the
        // search workspace is at least `ws_size` bytes.
        unsafe {
            check(
                &format!("find algorithm for {}", step.name),
                dnn::cudnnFindConvolutionForwardAlgorithmEx(
                    self.handle.0,
                    self.descs[step.x].0,
                    self.act_ptr(step.x) as *const c_void,
                    step.wd.0,
                    step.w_ptr as *const c_void,
                    step.cd.0,
                    self.descs[step.y].0,
                    self.act_ptr(step.y) as *mut c_void,
                    MAX_ALGOS as i32,
                    &mut returned,
                    perf.as_mut_ptr(),
                    self.ws_ptr as *mut c_void,
                    self.ws_size,
                ),
            )?;
        }
        let ranked: Vec<dnn::cudnnConvolutionFwdAlgoPerf_t> = perf[..returned.max(0) as usize]
            .iter()
            .filter(|p| {
                p.status == dnn::cudnnStatus_t::CUDNN_STATUS_SUCCESS && p.memory <= self.ws_cap
            })
            .copied()
            .collect();
        if ranked.is_empty() {
            return Err(EngineError::Unsupported(format!(
                "cuDNN has no algorithm for {} in {:?}",
                step.name, e
            )));
        }

        // Time the best few with each epilogue on the real buffers; keep the fastest that runs.
        let epilogues: Vec<Epilogue> = match (epilogue_choice, step.relu) {
            // The fused call needs ReLU for most algorithms; without it we go separate.
            (_, false) => vec![Epilogue::Separate],
            ("api", true) => vec![Epilogue::Api, Epilogue::ApiF32Bias],
            ("separate", true) => vec![Epilogue::Separate],
            _ => vec![Epilogue::Api, Epilogue::ApiF32Bias, Epilogue::Separate],
        };
        let mut best: Option<(f32, dnn::cudnnConvolutionFwdAlgoPerf_t, Epilogue)> = None;
        for cand in ranked.iter().take(candidates) {
            // SAFETY: valid descriptor.
            unsafe {
                check(
                    "set math",
                    dnn::cudnnSetConvolutionMathType(step.cd.0, cand.mathType),
                )?;
            }
            for &ep in &epilogues {
                step.algo = cand.algo;
                step.epilogue = ep;
                step.ws = cand.memory;
                let mut times = Vec::new();
                let mut ok = true;
                for _ in 0..4 {
                    match self.timer.time(|| self.run_conv(&step)) {
                        Ok(d) => times.push(d.as_secs_f32()),
                        Err(_) => {
                            ok = false;
                            break;
                        }
                    }
                }
                if !ok {
                    // A failed launch leaves no sticky error for cuDNN status failures; make
                    // sure nothing is pending before the next candidate.
                    let _ = self.stream.synchronize();
                    continue;
                }
                let t = times[1..].iter().copied().fold(f32::INFINITY, f32::min);
                if best.as_ref().is_none_or(|(bt, _, _)| t < *bt) {
                    best = Some((t, *cand, ep));
                }
                if strategy == PlanStrategy::Ranked {
                    break;
                }
            }
            if strategy == PlanStrategy::Ranked && best.is_some() {
                break;
            }
        }
        let (_, perf, ep) = best.ok_or_else(|| {
            EngineError::Unsupported(format!(
                "no cuDNN plan runs for {} in {:?} (every algorithm and epilogue failed)",
                step.name, e
            ))
        })?;
        // SAFETY: valid descriptor.
        unsafe {
            check(
                "set math",
                dnn::cudnnSetConvolutionMathType(step.cd.0, perf.mathType),
            )?;
        }
        step.algo = perf.algo;
        step.epilogue = ep;
        step.ws = perf.memory;
        Ok(step)
    }

    /// One convolution with its epilogue, enqueued on the stream.
    fn run_conv(&self, st: &ConvStep) -> Result<(), EngineError> {
        let one = 1f32;
        let zero = 0f32;
        let h = self.handle.0;
        let x = self.act_ptr(st.x) as *const c_void;
        let y = self.act_ptr(st.y) as *mut c_void;
        let xd = self.descs[st.x].0;
        let yd = self.descs[st.y].0;
        let ws = self.ws_ptr as *mut c_void;
        let one_p = &one as *const f32 as *const c_void;
        let zero_p = &zero as *const f32 as *const c_void;
        // SAFETY: every pointer is a live device buffer of the size its descriptor states, the
        // workspace holds at least `st.ws` bytes, and scalars are host f32 as cuDNN expects for
        // these data types.
        unsafe {
            match st.epilogue {
                Epilogue::Api | Epilogue::ApiF32Bias => {
                    let (bt, bf) = st.b_ptrs.expect("fused epilogues have a bias");
                    let (dt, df) = st.bd.as_ref().expect("bias descriptors");
                    let (b, bdesc) = if st.epilogue == Epilogue::Api {
                        (bt, dt.0)
                    } else {
                        (bf, df.0)
                    };
                    let (z, alpha2) = match st.z {
                        Some(z) => (self.act_ptr(z) as *const c_void, one_p),
                        None => (y as *const c_void, zero_p),
                    };
                    check(
                        "conv+bias+act",
                        dnn::cudnnConvolutionBiasActivationForward(
                            h,
                            one_p,
                            xd,
                            x,
                            st.wd.0,
                            st.w_ptr as *const c_void,
                            st.cd.0,
                            st.algo,
                            ws,
                            st.ws,
                            alpha2,
                            yd,
                            z,
                            bdesc,
                            b as *const c_void,
                            self.relu.0,
                            yd,
                            y,
                        ),
                    )
                }
                Epilogue::Separate => {
                    check(
                        "conv",
                        dnn::cudnnConvolutionForward(
                            h,
                            one_p,
                            xd,
                            x,
                            st.wd.0,
                            st.w_ptr as *const c_void,
                            st.cd.0,
                            st.algo,
                            ws,
                            st.ws,
                            zero_p,
                            yd,
                            y,
                        ),
                    )?;
                    if let (Some((bt, _)), Some((dt, _))) = (st.b_ptrs, st.bd.as_ref()) {
                        check(
                            "add bias",
                            dnn::cudnnAddTensor(h, one_p, dt.0, bt as *const c_void, one_p, yd, y),
                        )?;
                    }
                    if let Some(z) = st.z {
                        check(
                            "add residual",
                            dnn::cudnnAddTensor(
                                h,
                                one_p,
                                yd,
                                self.act_ptr(z) as *const c_void,
                                one_p,
                                yd,
                                y,
                            ),
                        )?;
                    }
                    if st.relu {
                        check(
                            "relu",
                            dnn::cudnnActivationForward(
                                h,
                                self.relu.0,
                                one_p,
                                yd,
                                y as *const c_void,
                                zero_p,
                                yd,
                                y,
                            ),
                        )?;
                    }
                    Ok(())
                }
            }
        }
    }

    fn run_pool(&self, x: usize, y: usize, pd: &PoolDesc, name: &str) -> Result<(), EngineError> {
        let one = 1f32;
        let zero = 0f32;
        // SAFETY: as in run_conv.
        unsafe {
            check(
                name,
                dnn::cudnnPoolingForward(
                    self.handle.0,
                    pd.0,
                    &one as *const f32 as *const c_void,
                    self.descs[x].0,
                    self.act_ptr(x) as *const c_void,
                    &zero as *const f32 as *const c_void,
                    self.descs[y].0,
                    self.act_ptr(y) as *mut c_void,
                ),
            )
        }
    }

    /// The forward pass, launch by launch.
    fn run_eager(&self) -> Result<(), EngineError> {
        for s in &self.steps {
            match s {
                Step::Conv(c) => self.run_conv(c)?,
                Step::Pool { name, x, y, pd } => self.run_pool(*x, *y, pd, name)?,
            }
        }
        Ok(())
    }

    fn capture(&self) -> Result<CudaGraph, EngineError> {
        drv(
            "begin capture",
            self.stream
                .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL),
        )?;
        let run = self.run_eager();
        let graph = self.stream.end_capture(sys::CUgraphInstantiate_flags(0));
        run?;
        let graph = drv("end capture", graph)?
            .ok_or_else(|| EngineError::Setup("the captured graph is empty".into()))?;
        drv("graph upload", graph.upload())?;
        // Replay once and check it ran.
        drv("graph launch", graph.launch())?;
        drv("synchronize", self.stream.synchronize())?;
        Ok(graph)
    }

    fn forward(&self) -> Result<(), EngineError> {
        match &self.graph {
            Some(g) => drv("graph launch", g.launch()),
            None => self.run_eager(),
        }
    }
}

fn algo_name(a: dnn::cudnnConvolutionFwdAlgo_t) -> &'static str {
    use dnn::cudnnConvolutionFwdAlgo_t::*;
    match a {
        CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM => "implicit_gemm",
        CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM => "implicit_precomp_gemm",
        CUDNN_CONVOLUTION_FWD_ALGO_GEMM => "gemm",
        CUDNN_CONVOLUTION_FWD_ALGO_DIRECT => "direct",
        CUDNN_CONVOLUTION_FWD_ALGO_FFT => "fft",
        CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING => "fft_tiling",
        CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD => "winograd",
        CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED => "winograd_nonfused",
        _ => "other",
    }
}

impl Prepared for FusedPrepared {
    fn info(&self) -> BackendInfo {
        self.info.clone()
    }

    fn timed_iteration(&mut self) -> Result<Duration, EngineError> {
        self.timer.time(|| self.forward())
    }

    fn timed_input_copy(&mut self) -> Result<Option<Duration>, EngineError> {
        let FusedPrepared {
            timer,
            stream,
            host_input,
            input,
            ..
        } = self;
        // Into the same buffer, so the captured graph reads the new batch.
        timer
            .time(|| {
                drv(
                    "copy input",
                    stream.memcpy_htod(host_input.as_slice(), input),
                )
            })
            .map(Some)
    }

    fn logits(&mut self) -> Result<Vec<f32>, EngineError> {
        self.forward()?;
        let bytes = drv("copy logits", self.stream.clone_dtoh(&self.output))?;
        drv("synchronize", self.stream.synchronize())?;
        let v = f32_from_bytes(&bytes, self.elem);
        debug_assert_eq!(v.len(), self.batch * 1000);
        Ok(v)
    }

    fn reset_peak_memory(&mut self) {
        self.peak.reset();
    }

    fn peak_memory(&mut self) -> (u64, &'static str) {
        (self.peak.peak(), "device-allocations")
    }
}
