//! The fused path's executor: it turns a [`NetGraph`] into cuDNN calls on one stream, picks an
//! algorithm and epilogue per convolution by measuring them on the real buffers (what it tries
//! is decided by [`crate::fused::planner`] from the [`FusedOptions`]), and captures the whole
//! forward pass into one CUDA graph.
//!
//! What the path does, and why (measured gains are in docs/performance.md):
//! - Batch norm is folded into each convolution on the host, in f32, once ([`NetGraph`]).
//! - Activations are NHWC and weights KRSC, the layout tensor cores read. The stem's input is
//!   stored so that it can use them too: its 3 channels zero-padded (to 4 or 8), or rearranged
//!   space-to-depth into 12 channels (padded to 16 or not), which turns the 7x7 stride-2 stem
//!   into a 4x4 stride-1 one ([`StemInput`]). Which layout runs is decided by timing.
//! - Each convolution gets a plan once, at prepare time: cuDNN's `FindEx` ranks algorithms on
//!   the real buffers, then the best few are timed together with the allowed epilogues and the
//!   fastest correct combination is kept with its descriptors and one shared workspace.
//! - The residual add and ReLU of each block ride in the second convolution's epilogue.
//! - Activation memory is one slab laid out by liveness ([`NetGraph::memory_plan`]).
//! - The forward pass is captured once into a CUDA graph and replayed.
//!
//! Ownership: every cuDNN object and device buffer is an RAII value in [`cudnn`]; addresses are
//! borrowed from their buffers for the length of one call and never stored, except inside the
//! captured CUDA graph, which is declared (and so dropped) before the buffers it points into.

mod cudnn;
mod graph_api;
mod kernels;
mod stem_pool;

use std::{
    cell::{Cell, RefCell},
    collections::{BTreeMap, HashMap},
    rc::Rc,
    sync::Arc,
    time::Duration,
};

use candle_core::cuda_backend::cudarc::{
    cudnn::sys as dnn,
    driver::{sys, CudaContext, CudaGraph, CudaStream},
};
use fleetmark_core::{BackendInfo, ComputeCapability, JobSpec, MathMode, Precision};

pub use cudnn::cudnn_version;
use cudnn::{
    check, drv, math_type, ActDesc, ConvDesc, DevPtr, DeviceBuffer, Elem, FilterDesc, Handle,
    PoolDesc, PoolWindow, TensorDesc,
};
use graph_api::{GraphCandidates, GraphPlan, PlanFor};
use kernels::Kernels;
use stem_pool::StemPoolExec;

use super::{EventTimer, PoolPeak};
use crate::{
    backend::{backend_info, ExecPath, MemoryScope, Prepared},
    fused::{
        conv_graph::{uid, ConvEpilogue, ConvGraphSpec, Filter},
        graph::{
            self, GraphConfig, Home, Location, NetGraph, Place, PoolKind, Shape, StemChunks,
            StemImageBytes, StemInput, STEM_CHUNK_STEPS,
        },
        options::{ConvApi, LayerTiming, PoolChoice, StemPoolChoice},
        planner::{self, Epilogue, MaxPoolGeometry, PlanStrategy, PoolImpl},
        FusedOptions,
    },
    input::{input_batch, INPUT_SEED},
    EngineError, ModelWeights,
};

/// A convolution's bias on the device, in the activation precision and in f32.
struct BiasBuffers {
    act: DeviceBuffer,
    f32: DeviceBuffer,
    act_desc: TensorDesc,
    f32_desc: TensorDesc,
}

/// One planned convolution with its epilogue.
struct ConvExec {
    name: String,
    x: usize,
    y: usize,
    residual: Option<usize>,
    relu: bool,
    weight: DeviceBuffer,
    bias: Option<BiasBuffers>,
    wd: FilterDesc,
    cd: ConvDesc,
    algo: dnn::cudnnConvolutionFwdAlgo_t,
    epilogue: Epilogue,
    /// Workspace bytes the algorithm needs.
    ws: usize,
    filter: Filter,
    /// A graph API plan, which then runs the convolution with its whole epilogue instead of
    /// `algo` and `epilogue`.
    graph: Option<Rc<GraphPlan>>,
}

struct PoolExec {
    name: &'static str,
    kind: PoolKind,
    x: usize,
    y: usize,
    pd: PoolDesc,
    /// Who runs it; the kernel only for a max pool it can take (`geometry` is then set).
    imp: PoolImpl,
    geometry: Option<MaxPoolGeometry>,
}

enum ExecStep {
    Conv(Box<ConvExec>),
    Pool(PoolExec),
    /// The stem and its max pool as one kernel (planned in `stem_pool.rs`).
    StemPool(Box<StemPoolExec>),
}

impl ExecStep {
    fn name(&self) -> &str {
        match self {
            ExecStep::Conv(c) => &c.name,
            ExecStep::Pool(p) => p.name,
            ExecStep::StemPool(_) => StemPoolExec::NAME,
        }
    }
}

/// Every device buffer the forward pass touches.
struct Buffers {
    slab: DeviceBuffer,
    /// Where each activation is (for a chunk, its first chunk, and the step to the next).
    locations: Vec<Location>,
    /// Which chunk of a chunked stem the [`Place::Chunk`] activations address: set only by
    /// [`FusedPrepared::run_chunk_rounds`] around each round of the chunked steps, 0 otherwise
    /// (so planning, which times and checks those steps once, works on the first chunk).
    chunk: Cell<usize>,
    input: DeviceBuffer,
    output: DeviceBuffer,
    /// The search workspace while planning, then one just big enough for the plan.
    workspace: DeviceBuffer,
    /// Bytes of `workspace` a plan may use (0 once the plan needs none).
    ws_size: usize,
}

impl Buffers {
    /// The buffer activation `a` lives in, and its byte offset there.
    fn place(&self, a: usize) -> (&DeviceBuffer, usize) {
        let loc = self.locations[a];
        // A chunk's address stays inside its whole: the graph makes chunks `count` times
        // smaller than it, and `chunk` stays below `count` (graph.rs tests the arithmetic).
        let offset = loc.at(self.chunk.get());
        match loc.home {
            Home::Input => (&self.input, offset),
            Home::Output => (&self.output, offset),
            Home::Slab => (&self.slab, offset),
        }
    }

    /// Zeroes the first `bytes` bytes of activation `a` (so a kernel that writes nothing
    /// cannot pass a check on what was there).
    fn zero_act(
        &mut self,
        a: usize,
        bytes: usize,
        stream: &Arc<CudaStream>,
    ) -> Result<(), EngineError> {
        let loc = self.locations[a];
        let offset = loc.at(self.chunk.get());
        let buf = match loc.home {
            Home::Input => &mut self.input,
            Home::Output => &mut self.output,
            Home::Slab => &mut self.slab,
        };
        let mut view = buf.slice_mut().slice_mut(offset..offset + bytes);
        drv("zero activation", stream.memset_zeros(&mut view))
    }

    /// The `bytes` bytes of activation `a`, copied to the host (for checking a kernel).
    fn act_to_host(
        &self,
        a: usize,
        bytes: usize,
        stream: &Arc<CudaStream>,
    ) -> Result<Vec<u8>, EngineError> {
        let (buf, start) = self.place(a);
        let v = drv(
            "copy activation",
            stream.clone_dtoh(&buf.slice().slice(start..start + bytes)),
        )?;
        drv("synchronize", stream.synchronize())?;
        Ok(v)
    }

    /// A new slab of `bytes` for a new memory plan's `locations`; the old one is freed first,
    /// so peak memory never holds both. Its contents are not kept: a forward pass writes every
    /// slab activation before reading it.
    fn replace_slab(
        &mut self,
        stream: &Arc<CudaStream>,
        locations: Vec<Location>,
        bytes: usize,
    ) -> Result<(), EngineError> {
        self.slab = DeviceBuffer::zeroed(stream, 1)?;
        self.slab = DeviceBuffer::zeroed(stream, bytes)?;
        self.locations = locations;
        Ok(())
    }

    fn act<'a>(&'a self, a: usize, stream: &CudaStream) -> DevPtr<'a> {
        let (buf, offset) = self.place(a);
        buf.ptr(stream).offset(offset)
    }
}

/// What a plan is made for.
#[derive(Clone, Copy)]
struct Target<'a> {
    job: &'a JobSpec,
    weights: &'a ModelWeights,
    opts: &'a FusedOptions,
    cc: ComputeCapability,
    /// The path's own kernels, or why they could not be loaded (cuDNN then does their work).
    kernels: &'a Result<Arc<Kernels>, String>,
    /// One cuDNN handle for every candidate plan, so graph API plans made with it can be
    /// shared between them.
    handle: &'a Rc<Handle>,
    graph_cache: &'a GraphCache,
}

/// Graph API plans already made, by convolution (the same shapes recur within one model and in
/// every stem candidate's plan, and making a plan can compile kernels), with what their search
/// found, or why none could be made.
#[derive(Default)]
struct GraphCache {
    entries: RefCell<HashMap<String, Result<Rc<GraphCandidates>, String>>>,
    /// Seconds spent making plans (each fused plan compiles its kernel at run time), for
    /// `backend.details.graph_api_plan_seconds`.
    seconds: std::cell::Cell<f64>,
}

/// What the algorithm search of one plan works with.
struct SearchConfig<'a> {
    opts: &'a FusedOptions,
    strategy: PlanStrategy,
    math: MathMode,
    ws_cap: usize,
    /// Graph or launch, never auto.
    timing: LayerTiming,
}

pub struct FusedPrepared {
    // Declared first, so dropped first: the graph holds the addresses of the buffers below.
    graph: Option<CudaGraph>,
    steps: Vec<ExecStep>,
    descs: Vec<TensorDesc>,
    relu: ActDesc,
    handle: Rc<Handle>,
    bufs: Buffers,
    stream: Arc<CudaStream>,
    elem: Elem,
    math: MathMode,
    host_input: Vec<u8>,
    timer: EventTimer,
    peak: PoolPeak,
    batch: usize,
    info: BackendInfo,
    /// Activation shapes, by index.
    shapes: Vec<Shape>,
    /// Whether the stem and max pool (the first [`STEM_CHUNK_STEPS`] steps) run chunk by chunk.
    stem_chunks: Option<StemChunks>,
    kernels: Option<Arc<Kernels>>,
    /// What the max pool's planning found, for `backend.details.pool_search`.
    pool_note: String,
    /// What planning the stem-and-pool kernel found, for `backend.details.stem_pool_search`.
    stem_pool_note: String,
    /// `layer: what the graph API offered`, for `backend.details.graph_api`.
    graph_notes: RefCell<Vec<String>>,
    /// With `--fused-profile`, (layer, every legacy candidate's time), for
    /// `backend.details.layer_search_ms.<layer>`: why a layer kept the algorithm it did (one
    /// detail per layer, so each stays within a detail's length).
    layer_search: RefCell<Vec<(String, String)>>,
}

/// 1.0 and 0.0 as cuDNN's host scaling factors (f32 for every data type used here).
static ONE: f32 = 1.0;
static ZERO: f32 = 0.0;

fn scale(v: &'static f32) -> *const std::ffi::c_void {
    v as *const f32 as *const std::ffi::c_void
}

impl FusedPrepared {
    /// Plans the model for `job` on a GPU of capability `cc`. The stem's input layout and the
    /// plan strategy are themselves chosen by timing: each candidate the planner allows is
    /// built and timed as a whole forward pass, and the fastest is kept. A candidate that
    /// cannot be planned (cuDNN refuses every algorithm of some layer, say) is skipped and
    /// named in `backend.details.stem_search_failures`; only if none can be planned is it an
    /// error.
    pub fn new(
        ctx: &Arc<CudaContext>,
        stream: &Arc<CudaStream>,
        job: &JobSpec,
        weights: &ModelWeights,
        opts: &FusedOptions,
        cc: ComputeCapability,
    ) -> Result<Self, EngineError> {
        let kernels = if opts.pool == PoolChoice::Cudnn && opts.stem_pool == StemPoolChoice::Off {
            Err("not asked for (--fused-pool=cudnn --fused-stem-pool=off)".to_string())
        } else {
            // The stem-and-pool module only where it can run: 16-bit values, not turned off.
            let stem_pool =
                opts.stem_pool != StemPoolChoice::Off && job.precision != Precision::F32;
            Kernels::load(ctx, stem_pool).map(Arc::new).map_err(|e| {
                tracing::warn!(error = %e, "the fused path's own kernels did not load; cuDNN runs their steps");
                e.to_string()
            })
        };
        drv("bind context", ctx.bind_to_thread())?;
        let handle = Rc::new(Handle::on_stream(stream)?);
        let graph_cache = GraphCache::default();
        let target = Target {
            job,
            weights,
            opts,
            cc,
            kernels: &kernels,
            handle: &handle,
            graph_cache: &graph_cache,
        };
        let mut best: Option<(f64, FusedPrepared)> = None;
        let mut tried = Vec::new();
        let mut failures = Vec::new();
        let mut first_error: Option<EngineError> = None;
        let (batch, size) = (job.batch_size as usize, job.image_size as usize);
        let elem_size = Elem::of(job.precision).size();
        let with_chunks = |stems: Vec<StemInput>| -> Vec<(StemInput, Option<usize>)> {
            stems
                .into_iter()
                .flat_map(|stem| {
                    let per_image = StemImageBytes::new(stem, size, elem_size);
                    planner::stem_chunks(opts.stem_chunk, batch, per_image)
                        .into_iter()
                        .map(move |chunk| (stem, chunk))
                })
                .collect()
        };
        // The fallbacks (padded stems behind the default space-to-depth) are tried only if
        // nothing in the first round could be planned.
        let rounds = [
            with_chunks(planner::stem_candidates(opts, job.precision)),
            with_chunks(planner::stem_fallbacks(opts, job.precision)),
        ];
        let candidates = rounds
            .into_iter()
            .enumerate()
            .flat_map(|(round, list)| list.into_iter().map(move |c| (round, c)));
        for (round, (stem, chunk)) in candidates {
            if round > 0 && best.is_some() {
                break;
            }
            for strategy in planner::strategies(opts) {
                let tag = match chunk {
                    Some(c) => format!("{stem}/chunk{c}/{}", strategy.as_str()),
                    None => format!("{stem}/{}", strategy.as_str()),
                };
                let timed = Self::build(ctx, stream, target, (stem, chunk), strategy)
                    .and_then(|c| Ok((c.median_forward_ms(10)?, c)));
                match timed {
                    Ok((t, candidate)) => {
                        tried.push(format!("{tag}:{t:.3}ms"));
                        if best.as_ref().is_none_or(|(bt, _)| t < *bt) {
                            // The loser is dropped here, before the next candidate is built.
                            best = Some((t, candidate));
                        }
                    }
                    Err(e) => {
                        tried.push(format!("{tag}:failed"));
                        tracing::info!(%stem, ?chunk, strategy = strategy.as_str(), error = %e,
                            "plan candidate failed; skipped");
                        failures.push(format!("{tag}: {e}"));
                        first_error.get_or_insert(e);
                    }
                }
            }
        }
        let Some((_, mut chosen)) = best else {
            return Err(EngineError::Unsupported(format!(
                "no stem layout could be planned ({}){}",
                tried.join(", "),
                first_error.map_or(String::new(), |e| format!(": {e}"))
            )));
        };
        chosen
            .info
            .details
            .insert("stem_search".into(), tried.join(" "));
        if !failures.is_empty() {
            chosen.info.details.insert(
                "stem_search_failures".into(),
                planner::failures_detail(&failures),
            );
        }
        if graph_cache.seconds.get() > 0.0 {
            chosen.info.details.insert(
                "graph_api_plan_seconds".into(),
                format!("{:.1}", graph_cache.seconds.get()),
            );
        }
        if opts.profile {
            let profile = chosen.profile(10)?;
            chosen.info.details.insert("profile_ms".into(), profile);
        }
        Ok(chosen)
    }

    /// Median of `n` timed forward passes, for choosing between plans.
    fn median_forward_ms(&self, n: usize) -> Result<f64, EngineError> {
        let v = (0..n)
            .map(|_| Ok(self.timer.time(|| self.forward())?.as_secs_f64() * 1e3))
            .collect::<Result<Vec<_>, EngineError>>()?;
        planner::median(v).ok_or_else(|| EngineError::Setup("no forward pass was timed".into()))
    }

    /// Each step timed on its own, for docs/performance.md: inside a CUDA graph when the
    /// forward pass is one (the GPU's time alone, so the steps add up to about the whole
    /// graph), else the median of `n` launches.
    fn profile(&self, n: usize) -> Result<String, EngineError> {
        let mut parts = Vec::new();
        let (chunked, rounds) = self.chunk_rounds();
        for (i, s) in self.steps.iter().enumerate() {
            let m = if self.graph.is_some() {
                self.time_candidate(LayerTiming::Graph, &|| self.run_step(s))
                    .map_or(f64::NAN, |t| t as f64 * 1e3)
            } else {
                let v = (0..n)
                    .map(|_| Ok(self.timer.time(|| self.run_step(s))?.as_secs_f64() * 1e3))
                    .collect::<Result<Vec<_>, EngineError>>()?;
                planner::median(v).unwrap_or(f64::NAN)
            };
            // A chunked step ran once, on the first chunk: its share is that times the chunks
            // (an estimate: replayed alone, the chunk's input stays in L2, which the whole
            // pass's rounds do not have).
            let m = if i < chunked { m * rounds as f64 } else { m };
            parts.push(format!("{}={m:.4}", s.name()));
        }
        Ok(parts.join(" "))
    }

    /// One complete plan for one stem layout (and chunking of the stem) and strategy.
    fn build(
        ctx: &Arc<CudaContext>,
        stream: &Arc<CudaStream>,
        target: Target<'_>,
        (stem, stem_chunk): (StemInput, Option<usize>),
        strategy: PlanStrategy,
    ) -> Result<Self, EngineError> {
        let Target {
            job,
            weights,
            opts,
            cc,
            kernels,
            handle,
            graph_cache,
        } = target;
        let elem = Elem::of(job.precision);
        let batch = job.batch_size as usize;
        let size = job.image_size as usize;
        let net = NetGraph::resnet18(
            weights,
            GraphConfig {
                batch,
                image_size: size,
                stem,
                stem_chunk,
            },
        )?;
        let mut plan = net.memory_plan(elem.size());
        let chunk_bytes = net
            .acts
            .iter()
            .filter(|a| matches!(a.place, Place::Chunk { .. }))
            .map(|a| a.shape.elems() * elem.size());
        for bytes in chunk_bytes {
            if !bytes.is_multiple_of(planner::STEM_CHUNK_ALIGN) {
                return Err(EngineError::Unsupported(format!(
                    "a stem chunk of {bytes} bytes breaks the {}-byte alignment",
                    planner::STEM_CHUNK_ALIGN
                )));
            }
        }
        // The workspace cap follows the whole-batch plan's slab, so a chunked plan (whose slab
        // is smaller) races the unchunked one under the same cap.
        let cap_slab = match stem_chunk {
            Some(_) => {
                NetGraph::resnet18(
                    weights,
                    GraphConfig {
                        batch,
                        image_size: size,
                        stem,
                        stem_chunk: None,
                    },
                )?
                .memory_plan(elem.size())
                .slab_bytes
            }
            None => plan.slab_bytes,
        };
        drv("bind context", ctx.bind_to_thread())?;
        let host_input = host_input(batch, size, stem, elem)?;
        let (free, _) = drv("mem info", ctx.mem_get_info())?;
        let search_ws = planner::search_workspace(free);
        let bufs = Buffers {
            slab: DeviceBuffer::zeroed(stream, plan.slab_bytes)?,
            locations: net.locations(&plan, elem.size()),
            chunk: Cell::new(0),
            input: DeviceBuffer::upload(stream, &host_input)?,
            output: DeviceBuffer::zeroed(stream, batch * 1000 * elem.size())?,
            workspace: DeviceBuffer::zeroed(stream, search_ws)?,
            ws_size: search_ws,
        };
        let math = planner::math(opts, job.precision, cc);
        let mut me = FusedPrepared {
            graph: None,
            steps: Vec::new(),
            descs: net
                .acts
                .iter()
                .map(|a| TensorDesc::nhwc(&a.shape, elem))
                .collect::<Result<Vec<_>, _>>()?,
            relu: ActDesc::relu()?,
            handle: handle.clone(),
            bufs,
            stream: stream.clone(),
            elem,
            math,
            host_input,
            timer: EventTimer::new(ctx, stream.clone())?,
            peak: PoolPeak::new(ctx),
            batch,
            info: BackendInfo::default(),
            shapes: net.acts.iter().map(|a| a.shape).collect(),
            stem_chunks: net.stem_chunks,
            kernels: kernels.as_ref().ok().cloned(),
            pool_note: match kernels {
                Err(e) if opts.pool != PoolChoice::Cudnn => format!("kernel unavailable: {e}"),
                _ => String::new(),
            },
            stem_pool_note: String::new(),
            graph_notes: RefCell::new(Vec::new()),
            layer_search: RefCell::new(Vec::new()),
        };
        let search = SearchConfig {
            opts,
            strategy,
            math,
            ws_cap: planner::workspace_cap(opts, cap_slab, search_ws),
            timing: planner::layer_timing(opts),
        };
        for (i, step) in net.steps.iter().enumerate() {
            let exec = match step {
                graph::Step::Pool(p) => ExecStep::Pool(me.plan_pool(p, &search)?),
                graph::Step::Conv(c) => {
                    ExecStep::Conv(Box::new(me.plan_conv(c, &search, graph_cache)?))
                }
            };
            me.steps.push(exec);
            if i + 1 == STEM_CHUNK_STEPS {
                // Planning ran the chunked steps on the first chunk; the rest of the network
                // is planned on the whole pooled output, so the other chunks are filled too.
                me.run_chunk_rounds(1)?;
                // The stem and its pool are planned: they may become one kernel.
                me.plan_stem_pool(&search)?;
                if let Some(ExecStep::StemPool(sp)) = me.steps.first() {
                    // The kernel never writes the stem's output: the slab keeps no room for
                    // it. Planned again now, so the rest of the network is planned and checked
                    // on the buffers it will run on; the kernel fills the pooled output again.
                    plan = net.memory_plan_without(elem.size(), &[sp.stem_out()]);
                    me.bufs.replace_slab(
                        stream,
                        net.locations(&plan, elem.size()),
                        plan.slab_bytes,
                    )?;
                    me.run_step(&me.steps[0])?;
                }
            }
        }
        me.shrink_workspace()?;
        let graph_note = me.check_and_capture(opts.cuda_graph)?;
        me.info = me.describe(opts, &search, stem, plan.slab_bytes, graph_note);
        Ok(me)
    }

    /// The plan is made: swap the search workspace for one just big enough.
    fn shrink_workspace(&mut self) -> Result<(), EngineError> {
        let needed = self
            .steps
            .iter()
            .map(|s| match s {
                ExecStep::Conv(c) => c.ws,
                ExecStep::Pool(_) | ExecStep::StemPool(_) => 0,
            })
            .max()
            .unwrap_or(0);
        // The search buffer is freed before the new one is taken, so peak memory never holds
        // both.
        self.bufs.workspace = DeviceBuffer::zeroed(&self.stream, 1)?;
        self.bufs.workspace = DeviceBuffer::zeroed(&self.stream, needed)?;
        self.bufs.ws_size = needed;
        Ok(())
    }

    /// One eager pass to check every step runs, then (if asked) the CUDA graph. Returns what
    /// the result says about the graph.
    fn check_and_capture(&mut self, use_graph: bool) -> Result<String, EngineError> {
        self.run_eager()?;
        drv("synchronize", self.stream.synchronize())?;
        if !use_graph {
            return Ok("off".into());
        }
        Ok(match self.capture() {
            Ok(g) => {
                self.graph = Some(g);
                "on".into()
            }
            Err(e) => {
                tracing::warn!(error = %e, "cuda graph capture failed; running eagerly");
                format!("failed: {e}")
            }
        })
    }

    fn describe(
        &self,
        opts: &FusedOptions,
        search: &SearchConfig<'_>,
        stem: StemInput,
        slab_bytes: usize,
        graph_note: String,
    ) -> BackendInfo {
        let plan_notes: Vec<String> = self
            .steps
            .iter()
            .filter_map(|s| match s {
                ExecStep::Conv(c) => Some(match &c.graph {
                    Some(g) => format!("{}:graph/{}", c.name, g.label),
                    None => format!("{}:{}/{:?}", c.name, algo_name(c.algo), c.epilogue),
                }),
                ExecStep::Pool(p) if p.geometry.is_some() => {
                    Some(format!("{}:{}", p.name, p.imp.as_str()))
                }
                ExecStep::Pool(_) => None,
                ExecStep::StemPool(sp) => Some(format!(
                    "{}:kernel/{}",
                    StemPoolExec::NAME,
                    sp.variant_name(self.elem)
                )),
            })
            .collect();
        let mut details = BTreeMap::new();
        details.insert("layout".into(), "nhwc".into());
        details.insert("batch_norm".into(), "folded".into());
        details.insert("conv".into(), format!("cudnn {}", cudnn_version()));
        details.insert("cuda_graph".into(), graph_note);
        details.insert("stem_channels".into(), stem.channels().to_string());
        details.insert("stem_layout".into(), stem.layout_name().into());
        details.insert(
            "stem_chunk".into(),
            self.stem_chunks.map_or_else(
                || "off".into(),
                |c| format!("{} images x {}", c.images, c.count),
            ),
        );
        details.insert("epilogue".into(), opts.epilogue.to_string());
        details.insert("slab_bytes".into(), slab_bytes.to_string());
        details.insert("workspace_bytes".into(), self.bufs.ws_size.to_string());
        details.insert("workspace_cap_bytes".into(), search.ws_cap.to_string());
        details.insert("plan".into(), plan_notes.join(" "));
        details.insert("layer_timing".into(), search.timing.to_string());
        details.insert("conv_api".into(), opts.conv_api.to_string());
        if !self.pool_note.is_empty() {
            details.insert("pool_search".into(), self.pool_note.clone());
        }
        if !self.stem_pool_note.is_empty() {
            details.insert("stem_pool_search".into(), self.stem_pool_note.clone());
        }
        let graph_notes = self.graph_notes.borrow();
        if !graph_notes.is_empty() {
            details.insert("graph_api".into(), graph_notes.join("; "));
        }
        for (layer, timed) in self.layer_search.borrow().iter() {
            details.insert(format!("layer_search_ms.{layer}"), timed.clone());
        }
        details.insert("fused_options".into(), opts.summary());
        backend_info("candle-cuda", ExecPath::Fused, self.math, details)
    }

    /// Plans one pooling step. A 3x3 stride-2 max pool may run on the path's own kernel: it is
    /// run on the real buffers, its output compared with cuDNN's value for value, and, if they
    /// agree, both are timed and the faster kept. What was found goes to `pool_search`.
    fn plan_pool(
        &mut self,
        p: &graph::PoolStep,
        cfg: &SearchConfig<'_>,
    ) -> Result<PoolExec, EngineError> {
        let mut exec = self.pool_exec(p)?;
        if p.kind != PoolKind::Max3x3Stride2 || cfg.opts.pool == PoolChoice::Cudnn {
            return Ok(exec);
        }
        let geometry =
            planner::maxpool_geometry(&self.shapes[p.x], &self.shapes[p.y], self.elem.size());
        exec.geometry = geometry.as_ref().ok().copied();
        let chosen = match (&self.kernels, geometry) {
            (None, _) => Err("not loaded".to_string()),
            (Some(_), Err(why)) => Err(format!("cannot take this shape: {why}")),
            (Some(_), Ok(_)) => self.choose_pool(&mut exec, cfg),
        };
        match chosen {
            Ok(imp) => exec.imp = imp,
            Err(why) if cfg.opts.pool == PoolChoice::Kernel => {
                return Err(EngineError::Unsupported(format!(
                    "the max pool kernel cannot be used: {why}"
                )));
            }
            Err(why) => {
                // cuDNN's pool stays: nothing the kernel did is kept.
                self.note_pool(format!("kernel not used: {why}"));
                let _ = self.stream.synchronize();
                exec.imp = PoolImpl::Cudnn;
            }
        }
        Ok(exec)
    }

    /// With the kernel able to take the shape: checks it against cuDNN's pool, then times the
    /// candidates and returns the faster, or why the kernel cannot be used.
    fn choose_pool(
        &mut self,
        exec: &mut PoolExec,
        cfg: &SearchConfig<'_>,
    ) -> Result<PoolImpl, String> {
        match self.pool_kernel_mismatch(exec) {
            Ok(None) => {}
            Ok(Some(at)) => return Err(format!("its output differs from cuDNN's at value {at}")),
            Err(e) => return Err(format!("it failed: {e}")),
        }
        let mut best: Option<(f32, PoolImpl)> = None;
        let mut times = Vec::new();
        for imp in planner::pool_candidates(cfg.opts, true) {
            exec.imp = imp;
            let t = self.time_candidate(cfg.timing, &|| self.run_pool(&*exec));
            times.push(format!("{}:{}", imp.as_str(), ms(t)));
            if let Some(t) = t {
                if best.is_none_or(|(bt, _)| t < bt) {
                    best = Some((t, imp));
                }
            }
        }
        self.note_pool(times.join(" "));
        best.map(|(_, imp)| imp)
            .ok_or_else(|| "no candidate could be timed".to_string())
    }

    fn note_pool(&mut self, note: String) {
        if !self.pool_note.is_empty() {
            self.pool_note.push_str("; ");
        }
        self.pool_note.push_str(&note);
    }

    /// Runs the kernel, then cuDNN's pool, on the stem's real output and compares them. The
    /// kernel runs first, so one that wrote nothing leaves the zeroed slab, not cuDNN's answer,
    /// to be compared. Returns the first value that differs (±0 count as equal).
    fn pool_kernel_mismatch(&self, exec: &mut PoolExec) -> Result<Option<usize>, EngineError> {
        let bytes = self.shapes[exec.y].elems() * self.elem.size();
        exec.imp = PoolImpl::Kernel;
        self.run_pool(exec)?;
        let mine = self.bufs.act_to_host(exec.y, bytes, &self.stream)?;
        exec.imp = PoolImpl::Cudnn;
        self.run_pool(exec)?;
        let theirs = self.bufs.act_to_host(exec.y, bytes, &self.stream)?;
        Ok(planner::first_mismatch(
            &self.elem.f32_from_bytes(&mine),
            &self.elem.f32_from_bytes(&theirs),
        ))
    }

    fn pool_exec(&self, p: &graph::PoolStep) -> Result<PoolExec, EngineError> {
        let x = &self.shapes[p.x];
        let window = match p.kind {
            PoolKind::Max3x3Stride2 => PoolWindow {
                max: true,
                window: (3, 3),
                pad: 1,
                stride: (2, 2),
            },
            PoolKind::GlobalAverage => PoolWindow {
                max: false,
                window: (x.h, x.w),
                pad: 0,
                stride: (x.h, x.w),
            },
        };
        Ok(PoolExec {
            name: p.name,
            kind: p.kind,
            x: p.x,
            y: p.y,
            pd: PoolDesc::new(&window)?,
            imp: PoolImpl::Cudnn,
            geometry: None,
        })
    }

    /// Uploads one convolution's weights and bias and makes its descriptors.
    fn conv_exec(&self, step: &graph::ConvStep, math: MathMode) -> Result<ConvExec, EngineError> {
        let e = self.elem;
        // KCRS -> KRSC, the layout the NHWC kernels read.
        let (k, c, r, s) = step.weight.dims4()?;
        let w = step.weight.permute((0, 2, 3, 1))?.contiguous()?;
        let filter = Filter {
            k,
            c,
            r,
            s,
            stride: step.stride,
            pad: step.pad,
        };
        let bias_shape = Shape {
            n: 1,
            h: 1,
            w: 1,
            c: k,
        };
        let bias = match &step.bias {
            Some(b) => Some(BiasBuffers {
                act: DeviceBuffer::upload(&self.stream, &e.bytes_of(b)?)?,
                f32: DeviceBuffer::upload(&self.stream, &Elem::F32.bytes_of(b)?)?,
                act_desc: TensorDesc::nhwc(&bias_shape, e)?,
                f32_desc: TensorDesc::nhwc(&bias_shape, Elem::F32)?,
            }),
            None => None,
        };
        Ok(ConvExec {
            name: step.name.clone(),
            x: step.x,
            y: step.y,
            residual: step.residual,
            relu: step.relu,
            weight: DeviceBuffer::upload(&self.stream, &e.bytes_of(&w)?)?,
            bias,
            wd: FilterDesc::krsc(&filter, e)?,
            cd: ConvDesc::new(&filter, math_type(math))?,
            algo: dnn::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
            epilogue: Epilogue::Separate,
            ws: 0,
            filter,
            graph: None,
        })
    }

    /// cuDNN's ranking of algorithms for `exec`, run on the real buffers: every entry cuDNN
    /// returned, those that failed included (the caller keeps those that succeeded within the
    /// workspace cap).
    fn rank_algorithms(
        &self,
        exec: &ConvExec,
    ) -> Result<Vec<dnn::cudnnConvolutionFwdAlgoPerf_t>, EngineError> {
        const MAX_ALGOS: usize = crate::fused::options::MAX_ALGO_CANDIDATES;
        // SAFETY: the perf struct is plain C data (integers, floats and enums whose 0 value is
        // a valid variant), so all-zero bytes are a valid value of it.
        let mut perf: [dnn::cudnnConvolutionFwdAlgoPerf_t; MAX_ALGOS] =
            unsafe { std::mem::zeroed() };
        let mut returned = 0i32;
        let s = &self.stream;
        let ws = self.bufs.workspace.ptr(s);
        // SAFETY: the handle and descriptors are live and describe exactly the buffers passed:
        // x and y are activations of the shapes in `self.descs`, placed inside the slab (or the
        // input/output buffers) by the memory plan; the weight buffer holds K*R*S*C elements;
        // the workspace holds `ws_size` bytes; `perf` has room for MAX_ALGOS results and cuDNN
        // writes at most that many; `returned` is a live int. All buffers outlive the call,
        // which FindEx completes synchronously.
        check(&format!("find algorithm for {}", exec.name), unsafe {
            dnn::cudnnFindConvolutionForwardAlgorithmEx(
                self.handle.0,
                self.descs[exec.x].0,
                self.bufs.act(exec.x, s).src(),
                exec.wd.0,
                exec.weight.ptr(s).src(),
                exec.cd.0,
                self.descs[exec.y].0,
                self.bufs.act(exec.y, s).dst(),
                MAX_ALGOS as i32,
                &mut returned,
                perf.as_mut_ptr(),
                ws.dst(),
                self.bufs.ws_size,
            )
        })?;
        let n = (returned.max(0) as usize).min(MAX_ALGOS);
        Ok(perf[..n].to_vec())
    }

    /// Plans one convolution: the candidates of each cuDNN API the options allow are timed on
    /// the real buffers and the fastest that runs is kept.
    fn plan_conv(
        &self,
        step: &graph::ConvStep,
        cfg: &SearchConfig<'_>,
        cache: &GraphCache,
    ) -> Result<ConvExec, EngineError> {
        let mut exec = self.conv_exec(step, cfg.math)?;
        let (use_legacy, use_graph) = planner::conv_apis(cfg.opts, &exec.filter);
        let legacy = match (use_legacy, use_graph) {
            (false, _) => None,
            (true, false) => self.search_legacy(&mut exec, cfg)?,
            // With the graph API in the race, a legacy failure (FindEx refusing the layer)
            // leaves the graph API to plan it.
            (true, true) => self.search_legacy(&mut exec, cfg).unwrap_or_else(|e| {
                tracing::info!(layer = %exec.name, error = %e, "legacy cuDNN search failed; graph API only");
                None
            }),
        };
        let graph = if use_graph {
            self.search_graph(&mut exec, cfg, cache, legacy.as_ref())?
        } else {
            None
        };
        match (legacy, graph) {
            (Some((lt, _, _)), Some((gt, plan))) if gt < lt => exec.use_graph(plan),
            (None, Some((_, plan))) => exec.use_graph(plan),
            (Some((_, perf, ep)), _) => exec.use_legacy(&perf, ep)?,
            (None, None) => {
                return Err(EngineError::Unsupported(format!(
                    "no cuDNN plan runs for {} in {:?} ({} API: every candidate failed)",
                    exec.name, self.elem, cfg.opts.conv_api
                )))
            }
        }
        // The search leaves y holding whatever ran last (perhaps a plan that was refused);
        // the next layer is searched on this layer's output, so it is made by the choice.
        self.run_conv(&exec)?;
        Ok(exec)
    }

    /// The legacy API's fastest algorithm and epilogue for `exec`: the best few of cuDNN's
    /// ranking, each with every allowed epilogue, timed on the real buffers (or, for the
    /// ranked strategy, the first that runs). `None` if none runs.
    fn search_legacy(
        &self,
        exec: &mut ConvExec,
        cfg: &SearchConfig<'_>,
    ) -> Result<Option<LegacyChoice>, EngineError> {
        let ranked = self.rank_algorithms(exec)?;
        let (usable, refused): (Vec<_>, Vec<_>) = ranked.into_iter().partition(|p| {
            p.status == dnn::cudnnStatus_t::CUDNN_STATUS_SUCCESS && p.memory <= cfg.ws_cap
        });
        let epilogues = planner::epilogues(cfg.opts.epilogue, exec.relu);
        let mut best: Option<LegacyChoice> = None;
        // What was timed, kept only for a profile: "algo/math find=<cuDNN's ms> <epilogue>=<ms>",
        // then what was not: usable but not timed ("algo/math untimed": past the candidate
        // count, or after the ranked strategy's first success), over the workspace cap
        // ("algo/math over_cap=<bytes>B") and refused by cuDNN ("algo/math refused=<status>").
        let mut timed: Vec<String> = Vec::new();
        let mut tried = 0usize;
        for cand in usable.iter().take(cfg.opts.algo_candidates.get()) {
            tried += 1;
            exec.cd.set_math(cand.mathType)?;
            if cfg.opts.profile {
                timed.push(format!("{} find={:.4}", algo_label(cand), cand.time));
            }
            for &ep in &epilogues {
                exec.algo = cand.algo;
                exec.epilogue = ep;
                exec.ws = cand.memory;
                let t = self.time_candidate(cfg.timing, &|| self.run_conv(exec));
                if cfg.opts.profile {
                    let ms = t.map_or_else(|| "-".to_string(), |t| format!("{:.4}", t * 1e3));
                    timed.push(format!("{ep:?}={ms}"));
                }
                let Some(t) = t else {
                    continue;
                };
                if best.as_ref().is_none_or(|(bt, _, _)| t < *bt) {
                    best = Some((t, *cand, ep));
                }
                if cfg.strategy == PlanStrategy::Ranked {
                    break;
                }
            }
            if cfg.strategy == PlanStrategy::Ranked && best.is_some() {
                break;
            }
        }
        if cfg.opts.profile {
            timed.extend(
                usable[tried..]
                    .iter()
                    .map(|p| format!("{} untimed", algo_label(p))),
            );
            timed.extend(refused.iter().map(|p| {
                if p.status == dnn::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
                    format!("{} over_cap={}B", algo_label(p), p.memory)
                } else {
                    let status = format!("{:?}", p.status);
                    format!(
                        "{} refused={}",
                        algo_label(p),
                        status.trim_start_matches("CUDNN_STATUS_")
                    )
                }
            }));
            self.layer_search
                .borrow_mut()
                .push((exec.name.clone(), timed.join(" ")));
        }
        Ok(best)
    }

    /// The graph API's fastest plan for `exec` within the workspace cap (for the ranked
    /// strategy, the heuristics' first that runs). Before a plan is timed, its output is
    /// compared with a reference on the real buffers ([`Self::check_graph_plan`]): the legacy
    /// winner's where there is one, else that of the first plan that runs (cuDNN's own first
    /// choice, which the split variants made here are judged against). `None` if none runs;
    /// an error only when the graph API is the only one allowed and cuDNN could not describe
    /// the convolution at all.
    fn search_graph(
        &self,
        exec: &mut ConvExec,
        cfg: &SearchConfig<'_>,
        cache: &GraphCache,
        legacy: Option<&LegacyChoice>,
    ) -> Result<Option<(f32, Rc<GraphPlan>)>, EngineError> {
        let found = match self.graph_candidates(exec, cfg, cache) {
            Ok(c) => c,
            Err(why) if cfg.opts.conv_api == ConvApi::Graph => {
                return Err(EngineError::Unsupported(format!(
                    "cuDNN's graph API cannot plan {}: {why}",
                    exec.name
                )))
            }
            Err(_) => return Ok(None),
        };
        // There is a legacy choice only where both APIs race (never with `--fused-conv-api=graph`).
        // It stands on its own: without its output as a reference the graph API's plans cannot
        // be checked, so they are left out rather than failing the layer.
        let mut reference = match legacy {
            Some((_, perf, ep)) => match exec
                .use_legacy(perf, *ep)
                .and_then(|()| self.conv_output(exec))
            {
                Ok(out) => Some(out),
                Err(e) => {
                    self.graph_notes.borrow_mut().push(format!(
                        "{}: no reference output from the legacy choice ({e}); graph API skipped",
                        exec.name
                    ));
                    return Ok(None);
                }
            },
            None => None,
        };
        let (mut wrong, mut best) = (0usize, None::<(f32, Rc<GraphPlan>)>);
        for plan in found.plans.iter().filter(|p| p.ws <= cfg.ws_cap) {
            exec.use_graph(plan.clone());
            if !self.check_graph_plan(exec, plan, &mut reference, cfg.math) {
                wrong += 1;
                continue;
            }
            let Some(t) = self.time_candidate(cfg.timing, &|| self.run_conv(exec)) else {
                continue;
            };
            if best.as_ref().is_none_or(|(bt, _)| t < *bt) {
                best = Some((t, plan.clone()));
            }
            if cfg.strategy == PlanStrategy::Ranked {
                break;
            }
        }
        exec.graph = None;
        let mut note = found.note();
        if best.is_none() && cfg.opts.conv_api == ConvApi::Graph {
            return Err(EngineError::Unsupported(format!(
                "cuDNN's graph API has no usable plan for {}: {note}{}",
                exec.name,
                if wrong > 0 {
                    format!(", {wrong} disagreed with the reference or did not run")
                } else {
                    String::new()
                }
            )));
        }
        if wrong > 0 {
            note.push_str(&format!(
                ", {wrong} disagreed with the reference or did not run"
            ));
        }
        if let Some((_, p)) = &best {
            note.push_str(&format!(", best {}", p.label));
        }
        self.graph_notes
            .borrow_mut()
            .push(format!("{}: {note}", exec.name));
        Ok(best)
    }

    /// `exec`'s output as it is configured now, run once on the real buffers.
    fn conv_output(&self, exec: &ConvExec) -> Result<Vec<f32>, EngineError> {
        self.run_conv(exec)?;
        let bytes = self.shapes[exec.y].elems() * self.elem.size();
        let v = self.bufs.act_to_host(exec.y, bytes, &self.stream)?;
        Ok(self.elem.f32_from_bytes(&v))
    }

    /// Whether graph plan `plan` (configured in `exec`) computes the convolution: its output
    /// agrees with `reference` within [`planner::plan_tolerance`]; with no reference yet, a
    /// plan that runs becomes the reference. Checked once per plan (plans are shared), and a
    /// plan that fails to run counts as wrong.
    fn check_graph_plan(
        &self,
        exec: &ConvExec,
        plan: &GraphPlan,
        reference: &mut Option<Vec<f32>>,
        math: MathMode,
    ) -> bool {
        if let Some(verdict) = plan.checked.get() {
            // A plan judged in an earlier build can still be this search's first that runs:
            // it is then the reference the unchecked plans after it are judged against.
            if verdict && reference.is_none() {
                match self.conv_output(exec) {
                    Ok(out) => *reference = Some(out),
                    Err(_) => {
                        let _ = self.stream.synchronize();
                        return false;
                    }
                }
            }
            return verdict;
        }
        let verdict = match self.conv_output(exec) {
            Err(e) => {
                tracing::debug!(plan = %plan.label, error = %e, "graph plan did not run");
                let _ = self.stream.synchronize();
                false
            }
            Ok(out) => match reference {
                None => {
                    *reference = Some(out);
                    true
                }
                Some(r) => {
                    match planner::first_disagreement(&out, r, planner::plan_tolerance(math)) {
                        None => true,
                        Some(at) => {
                            tracing::info!(layer = %exec.name, plan = %plan.label, at,
                                "graph plan's output disagrees with the reference; not used");
                            false
                        }
                    }
                }
            },
        };
        // A reference with NaN or infinity in it (a layer fed garbage) proves nothing about
        // the plan, so such a verdict is not kept for the layers that share the plan.
        if reference
            .as_ref()
            .is_some_and(|r| r.iter().all(|v| v.is_finite()))
        {
            plan.checked.set(Some(verdict));
        }
        verdict
    }

    /// The graph API's plans for `exec`'s convolution, made once per shape and reused.
    fn graph_candidates(
        &self,
        exec: &ConvExec,
        cfg: &SearchConfig<'_>,
        cache: &GraphCache,
    ) -> Result<Rc<GraphCandidates>, String> {
        let spec = ConvGraphSpec::new(
            &self.shapes[exec.x],
            &self.shapes[exec.y],
            exec.filter,
            ConvEpilogue {
                bias: exec.bias.is_some(),
                residual: exec.residual.is_some(),
                relu: exec.relu,
            },
        );
        let limit = cfg.opts.algo_candidates.get();
        let key = format!("{spec:?} {:?} {:?} {limit}", self.elem, cfg.math);
        let found = cache
            .entries
            .borrow_mut()
            .entry(key)
            .or_insert_with(|| {
                let started = std::time::Instant::now();
                let made = graph_api::candidates(
                    PlanFor::Handle(&self.handle),
                    &spec,
                    self.elem,
                    cfg.math,
                    limit,
                );
                cache
                    .seconds
                    .set(cache.seconds.get() + started.elapsed().as_secs_f64());
                made.map(Rc::new).map_err(|e| e.to_string())
            })
            .clone();
        if let Err(e) = &found {
            self.graph_notes
                .borrow_mut()
                .push(format!("{}: failed: {e}", exec.name));
        }
        found
    }

    /// The time of one run of `work` (a step as configured), or `None` if it does not run.
    /// Launch timing takes the best of three launches after a first; graph timing captures
    /// several runs into a CUDA graph and times its replays ([`Self::time_in_graph`]). A
    /// candidate that runs but cannot be captured does not run in the forward pass's graph
    /// either, so it counts as not running.
    fn time_candidate(
        &self,
        timing: LayerTiming,
        work: &dyn Fn() -> Result<(), EngineError>,
    ) -> Option<f32> {
        let mut samples = Vec::with_capacity(4);
        let launches = if timing == LayerTiming::Graph { 1 } else { 4 };
        for _ in 0..launches {
            match self.timer.time(work) {
                Ok(d) => samples.push(d.as_secs_f32()),
                Err(_) => {
                    // A cuDNN status failure leaves no sticky error; make sure nothing is
                    // pending before the next candidate.
                    let _ = self.stream.synchronize();
                    return None;
                }
            }
        }
        if timing != LayerTiming::Graph {
            return planner::layer_time(&samples);
        }
        match self.time_in_graph(planner::graph_reps(samples[0]), work) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::debug!(error = %e, "candidate could not be timed in a graph; skipped");
                let _ = self.stream.synchronize();
                None
            }
        }
    }

    /// GPU seconds per run of `work`: `reps` runs captured into one CUDA graph, replayed once
    /// to warm up, then three times between events; the best replay divided by `reps`. This is
    /// how the forward pass's own graph runs each step, without the host's enqueue time.
    fn time_in_graph(
        &self,
        reps: usize,
        work: &dyn Fn() -> Result<(), EngineError>,
    ) -> Result<f32, EngineError> {
        let graph = self.capture_graph(&|| (0..reps).try_for_each(|_| work()))?;
        drv("graph launch", graph.launch())?;
        let mut best = f32::INFINITY;
        for _ in 0..3 {
            let d = self.timer.time(|| drv("graph launch", graph.launch()))?;
            best = best.min(d.as_secs_f32());
        }
        Ok(best / reps as f32)
    }

    fn run_step(&self, s: &ExecStep) -> Result<(), EngineError> {
        match s {
            ExecStep::Conv(c) => self.run_conv(c),
            ExecStep::Pool(p) => self.run_pool(p),
            ExecStep::StemPool(sp) => self.run_stem_pool(sp),
        }
    }

    /// One convolution with its epilogue, enqueued on the stream.
    fn run_conv(&self, st: &ConvExec) -> Result<(), EngineError> {
        if let Some(plan) = &st.graph {
            return self.run_conv_graph(st, plan);
        }
        match st.epilogue {
            Epilogue::Api | Epilogue::ApiF32Bias => self.run_conv_fused(st),
            Epilogue::Separate => self.run_conv_separate(st),
        }
    }

    fn run_conv_fused(&self, st: &ConvExec) -> Result<(), EngineError> {
        let s = &self.stream;
        let b = st.bias.as_ref().ok_or_else(|| {
            EngineError::Setup(format!("{}: the fused epilogue needs a bias", st.name))
        })?;
        let (bias, bias_desc) = match st.epilogue {
            Epilogue::Api => (b.act.ptr(s), &b.act_desc),
            _ => (b.f32.ptr(s), &b.f32_desc),
        };
        let y = self.bufs.act(st.y, s);
        // Without a residual, z is y scaled by 0: cuDNN reads it but it contributes nothing.
        let (z, alpha2) = match st.residual {
            Some(z) => (self.bufs.act(z, s), scale(&ONE)),
            None => (y, scale(&ZERO)),
        };
        let yd = self.descs[st.y].0;
        // SAFETY: every descriptor is live and describes the buffer passed beside it (x, y and
        // z are planned activations of those shapes; the weight holds K*R*S*C elements; the
        // bias K elements of the descriptor's type); the workspace holds at least `st.ws`
        // bytes (the search buffer while planning, then one sized to the largest `ws`); the
        // scaling factors are host f32 statics, as cuDNN expects for these data types. The
        // call only enqueues work on our stream; every buffer lives in `self`, which outlives
        // the stream's work because `logits`/`timer` synchronize before returning.
        check("conv+bias+act", unsafe {
            dnn::cudnnConvolutionBiasActivationForward(
                self.handle.0,
                scale(&ONE),
                self.descs[st.x].0,
                self.bufs.act(st.x, s).src(),
                st.wd.0,
                st.weight.ptr(s).src(),
                st.cd.0,
                st.algo,
                self.bufs.workspace.ptr(s).dst(),
                st.ws,
                alpha2,
                yd,
                z.src(),
                bias_desc.0,
                bias.src(),
                self.relu.0,
                yd,
                y.dst(),
            )
        })
    }

    /// A graph API plan: the convolution and its whole epilogue in one execution.
    fn run_conv_graph(&self, st: &ConvExec, plan: &GraphPlan) -> Result<(), EngineError> {
        let s = &self.stream;
        let ptrs = plan
            .uids()
            .iter()
            .map(|&id| match id {
                uid::X => Ok(self.bufs.act(st.x, s)),
                uid::W => Ok(st.weight.ptr(s)),
                uid::Y => Ok(self.bufs.act(st.y, s)),
                uid::BIAS => st.bias.as_ref().map(|b| b.f32.ptr(s)).ok_or(id),
                uid::RESIDUAL => st.residual.map(|z| self.bufs.act(z, s)).ok_or(id),
                other => Err(other),
            })
            .collect::<Result<Vec<_>, i64>>()
            .map_err(|id| {
                EngineError::Setup(format!("{}: the graph plan wants tensor {id}", st.name))
            })?;
        plan.run(
            &self.handle,
            &ptrs,
            self.bufs.workspace.ptr(s),
            self.bufs.ws_size,
        )
    }

    fn run_conv_separate(&self, st: &ConvExec) -> Result<(), EngineError> {
        let s = &self.stream;
        let h = self.handle.0;
        let y = self.bufs.act(st.y, s);
        let yd = self.descs[st.y].0;
        // SAFETY: as in `run_conv_fused`: live descriptors matching their buffers, a workspace
        // of at least `st.ws` bytes, host f32 scaling factors, work enqueued on our stream over
        // buffers that `self` owns.
        check("conv", unsafe {
            dnn::cudnnConvolutionForward(
                h,
                scale(&ONE),
                self.descs[st.x].0,
                self.bufs.act(st.x, s).src(),
                st.wd.0,
                st.weight.ptr(s).src(),
                st.cd.0,
                st.algo,
                self.bufs.workspace.ptr(s).dst(),
                st.ws,
                scale(&ZERO),
                yd,
                y.dst(),
            )
        })?;
        if let Some(b) = &st.bias {
            // SAFETY: the bias descriptor (1x1x1xK) broadcasts over y's descriptor; both
            // buffers are live and match their descriptors; y is updated in place, which
            // cudnnAddTensor allows (C = alpha*A + beta*C).
            check("add bias", unsafe {
                dnn::cudnnAddTensor(
                    h,
                    scale(&ONE),
                    b.act_desc.0,
                    b.act.ptr(s).src(),
                    scale(&ONE),
                    yd,
                    y.dst(),
                )
            })?;
        }
        if let Some(z) = st.residual {
            // SAFETY: the residual has y's shape (the graph builds it so) and lives in a slab
            // region the memory plan keeps apart from y while both are alive.
            check("add residual", unsafe {
                dnn::cudnnAddTensor(
                    h,
                    scale(&ONE),
                    yd,
                    self.bufs.act(z, s).src(),
                    scale(&ONE),
                    yd,
                    y.dst(),
                )
            })?;
        }
        if st.relu {
            // SAFETY: an in-place activation over y, which cuDNN allows when x and y share a
            // descriptor; the ReLU descriptor is live.
            check("relu", unsafe {
                dnn::cudnnActivationForward(
                    h,
                    self.relu.0,
                    scale(&ONE),
                    yd,
                    y.src(),
                    scale(&ZERO),
                    yd,
                    y.dst(),
                )
            })?;
        }
        Ok(())
    }

    fn run_pool(&self, p: &PoolExec) -> Result<(), EngineError> {
        let s = &self.stream;
        if p.imp == PoolImpl::Kernel {
            let (Some(k), Some(g)) = (&self.kernels, &p.geometry) else {
                return Err(EngineError::Setup(format!(
                    "{}: the max pool kernel was chosen but is not loaded",
                    p.name
                )));
            };
            return k.maxpool(
                s,
                g,
                self.elem,
                self.bufs.act(p.x, s),
                self.bufs.act(p.y, s),
            );
        }
        // SAFETY: the pooling descriptor is live and its window fits x's shape (planned by the
        // graph); x and y are live planned activations matching their descriptors; the scaling
        // factors are host f32 statics.
        check(p.name, unsafe {
            dnn::cudnnPoolingForward(
                self.handle.0,
                p.pd.0,
                scale(&ONE),
                self.descs[p.x].0,
                self.bufs.act(p.x, s).src(),
                scale(&ZERO),
                self.descs[p.y].0,
                self.bufs.act(p.y, s).dst(),
            )
        })
    }

    /// The forward pass, launch by launch: a chunked stem's steps once per chunk, then the
    /// rest.
    fn run_eager(&self) -> Result<(), EngineError> {
        self.run_chunk_rounds(0)?;
        let (chunked, _) = self.chunk_rounds();
        self.steps[chunked..]
            .iter()
            .try_for_each(|s| self.run_step(s))
    }

    /// The chunked steps of a chunked stem for chunks `from..`, each at its own addresses;
    /// the chunk index is back at 0 afterwards, failed or not. Nothing when unchunked.
    fn run_chunk_rounds(&self, from: usize) -> Result<(), EngineError> {
        let (chunked, rounds) = self.chunk_rounds();
        for k in from..rounds {
            self.bufs.chunk.set(k);
            let round = self.steps[..chunked]
                .iter()
                .try_for_each(|s| self.run_step(s));
            if round.is_err() {
                self.bufs.chunk.set(0);
                return round;
            }
        }
        self.bufs.chunk.set(0);
        Ok(())
    }

    /// How many of the first steps repeat per chunk, and how many times (0 and 0 unchunked).
    fn chunk_rounds(&self) -> (usize, usize) {
        graph::chunk_rounds(self.stem_chunks)
    }

    /// `work`'s launches captured into a CUDA graph. The capture is always ended, so a step
    /// that fails mid-capture leaves the stream out of capture mode.
    fn capture_graph(
        &self,
        work: &dyn Fn() -> Result<(), EngineError>,
    ) -> Result<CudaGraph, EngineError> {
        drv(
            "begin capture",
            self.stream
                .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL),
        )?;
        let run = work();
        let graph = self.stream.end_capture(sys::CUgraphInstantiate_flags(0));
        run?;
        drv("end capture", graph)?
            .ok_or_else(|| EngineError::Setup("the captured graph is empty".into()))
    }

    fn capture(&self) -> Result<CudaGraph, EngineError> {
        let graph = self.capture_graph(&|| self.run_eager())?;
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

/// The legacy search's winner: its time, cuDNN's record of the algorithm, and the epilogue.
type LegacyChoice = (f32, dnn::cudnnConvolutionFwdAlgoPerf_t, Epilogue);

impl ConvExec {
    fn use_graph(&mut self, plan: Rc<GraphPlan>) {
        self.ws = plan.ws;
        self.graph = Some(plan);
    }

    fn use_legacy(
        &mut self,
        perf: &dnn::cudnnConvolutionFwdAlgoPerf_t,
        ep: Epilogue,
    ) -> Result<(), EngineError> {
        self.cd.set_math(perf.mathType)?;
        self.algo = perf.algo;
        self.epilogue = ep;
        self.ws = perf.memory;
        self.graph = None;
        Ok(())
    }
}

/// cuDNN's description of GPU `ordinal` as JSON (`CUDNN_ATTR_DEVICEPROP_JSON_REPRESENTATION`):
/// what cuDNN 9.8 and later needs to plan for that card on a machine without it. The CI test of
/// the graph API's search plans for such a description (`engine/testdata/`).
pub fn cudnn_device_json(ordinal: usize) -> Result<String, EngineError> {
    let ctx = drv("open context", CudaContext::new(ordinal))?;
    drv("bind context", ctx.bind_to_thread())?;
    let stream = ctx.default_stream();
    let handle = Handle::on_stream(&stream)?;
    let json = graph_api::DeviceProps::of_handle(&handle)?.json()?;
    String::from_utf8(json)
        .map_err(|e| EngineError::Setup(format!("cuDNN's device description is not UTF-8: {e}")))
}

/// The input batch as the stem reads it: NHWC in the `stem` layout, its 3 channels
/// zero-padded or rearranged space-to-depth ([`StemInput::arrange_nhwc`]).
///
/// This runs on the host, once, when the plan is built, and so does the upload; the timed
/// forward pass starts from the stored layout, and `timed_input_copy` times only the copy of
/// these bytes. That is the footing the channel padding has always had: a pipeline feeding
/// the model would do the padding or the space-to-depth rearrangement in its data loader (as
/// MLPerf ResNet submissions do) or in a kernel of its own, and neither is in the numbers
/// here. Per 224-pixel image the space-to-depth input holds 115x115x12 or x16 values (158,700
/// or 211,600), against 224x224x3, x4 or x8 (150,528, 200,704 or 401,408) padded.
fn host_input(
    batch: usize,
    size: usize,
    stem: StemInput,
    elem: Elem,
) -> Result<Vec<u8>, EngineError> {
    let nhwc = stem.arrange_nhwc(&input_batch(INPUT_SEED, batch, size)?)?;
    elem.bytes_of(&nhwc)
}

/// An algorithm as FindEx returned it, with its math type: FindEx can return one algorithm
/// several times, once per math type, and a profile has to tell them apart.
fn algo_label(p: &dnn::cudnnConvolutionFwdAlgoPerf_t) -> String {
    use dnn::cudnnMathType_t as M;
    let math = match p.mathType {
        M::CUDNN_DEFAULT_MATH => "default",
        M::CUDNN_TENSOR_OP_MATH => "tensor_op",
        M::CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION => "tensor_op_conversion",
        M::CUDNN_FMA_MATH => "fma",
    };
    format!("{}/{math}", algo_name(p.algo))
}

/// A candidate's time as the searches' notes show it.
fn ms(t: Option<f32>) -> String {
    t.map_or("failed".into(), |t| format!("{:.4}ms", t * 1e3))
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

    fn math(&self) -> MathMode {
        self.math
    }

    fn add_details(&mut self, details: BTreeMap<String, String>) {
        self.info.details.extend(details);
    }

    fn timed_iteration(&mut self) -> Result<Duration, EngineError> {
        self.timer.time(|| self.forward())
    }

    fn timed_input_copy(&mut self) -> Result<Option<Duration>, EngineError> {
        let FusedPrepared {
            timer,
            stream,
            host_input,
            bufs,
            ..
        } = self;
        // Into the same buffer, so the captured graph reads the new batch.
        timer
            .time(|| {
                drv(
                    "copy input",
                    stream.memcpy_htod(host_input.as_slice(), bufs.input.slice_mut()),
                )
            })
            .map(Some)
    }

    fn logits(&mut self) -> Result<Vec<f32>, EngineError> {
        self.forward()?;
        let bytes = drv(
            "copy logits",
            self.stream.clone_dtoh(self.bufs.output.slice()),
        )?;
        drv("synchronize", self.stream.synchronize())?;
        let v = self.elem.f32_from_bytes(&bytes);
        debug_assert_eq!(v.len(), self.batch * 1000);
        Ok(v)
    }

    fn reset_peak_memory(&mut self) {
        self.peak.reset();
    }

    fn peak_memory(&mut self) -> (u64, MemoryScope) {
        (self.peak.peak(), MemoryScope::DeviceAllocations)
    }
}
