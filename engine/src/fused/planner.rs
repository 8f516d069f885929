//! The fused path's decisions, as pure functions of the [`FusedOptions`], the job and the
//! device: which stem layouts and plan strategies are tried, which epilogues each layer may
//! use, how much workspace an algorithm may take, and the math the result reports. The
//! executor measures; this module decides what it measures and how the winner is picked.

use fleetmark_core::{capability::cuda_math, ComputeCapability, MathMode, Precision};

use super::{
    conv_graph::Filter,
    graph::{S2dChannels, Shape, StemImageBytes, StemInput, StemPad},
    options::{
        ConvApi, EpilogueChoice, FusedOptions, LayerTiming, PlanChoice, PoolChoice, StemChannels,
        StemChunk,
    },
};

/// How each layer's algorithm is picked. Timing single layers launch by launch measures launch
/// overhead too, which a CUDA graph removes, so at small batches it can mislead; cuDNN's own
/// ranking times kernels alone. Where layers are timed launch by launch, both plans are built
/// and the whole graphs compared ([`strategies`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanStrategy {
    /// The fastest of every ranked algorithm and epilogue, timed on the real buffers.
    Timed,
    /// cuDNN's fastest algorithm, with the fused epilogue where it runs.
    Ranked,
}

impl PlanStrategy {
    pub fn as_str(self) -> &'static str {
        match self {
            PlanStrategy::Timed => "timed",
            PlanStrategy::Ranked => "ranked",
        }
    }
}

/// How one convolution's bias, residual and ReLU are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Epilogue {
    /// `cudnnConvolutionBiasActivationForward`, bias in the activation precision.
    Api,
    /// The same call with an f32 bias (some cuDNN configurations want that).
    ApiF32Bias,
    /// Convolution, then `cudnnAddTensor` for bias and residual, then an in-place ReLU.
    Separate,
}

/// Stem layouts to plan and time, best guess first. Space-to-depth (a 4x4 stride-1 stem over
/// 12 channels, [`StemInput::SpaceToDepth`]) skips most of the padding's wasted work: with 16
/// channels it suits f16/bf16 tensor cores (multiples of 8), with 12 already TF32's (multiples
/// of 4). Of the plain paddings, 8 channels suit f16/bf16 tensor cores, 4 suit TF32, 3 moves the
/// fewest bytes. Every candidate is built and timed as a whole graph; one that cuDNN cannot plan
/// is skipped.
pub fn stem_candidates(opts: &FusedOptions, precision: Precision) -> Vec<StemInput> {
    match opts.stem {
        StemChannels::Fixed(stem) => vec![stem],
        StemChannels::SpaceToDepth => s2d_candidates(precision),
        StemChannels::Auto => {
            let mut v = s2d_candidates(precision);
            v.extend(padded_candidates(precision));
            v
        }
    }
}

/// Stem layouts to try only when none of [`stem_candidates`] could be planned: with
/// `--fused-stem-channels=s2d` (the default) the padded layouts, so a card or cuDNN that cannot
/// plan a space-to-depth stem still runs the job (and `stem_search_failures` says why).
pub fn stem_fallbacks(opts: &FusedOptions, precision: Precision) -> Vec<StemInput> {
    match opts.stem {
        StemChannels::SpaceToDepth => padded_candidates(precision),
        StemChannels::Auto | StemChannels::Fixed(_) => Vec::new(),
    }
}

fn s2d_candidates(precision: Precision) -> Vec<StemInput> {
    let s2d = StemInput::SpaceToDepth;
    match precision {
        Precision::F32 => vec![s2d(S2dChannels::C12), s2d(S2dChannels::C16)],
        Precision::F16 | Precision::Bf16 => vec![s2d(S2dChannels::C16)],
    }
}

fn padded_candidates(precision: Precision) -> Vec<StemInput> {
    let pad = StemInput::Padded;
    match precision {
        Precision::F32 => vec![pad(StemPad::C4), pad(StemPad::C3)],
        Precision::F16 | Precision::Bf16 => {
            vec![pad(StemPad::C8), pad(StemPad::C4), pad(StemPad::C3)]
        }
    }
}

/// Most bytes of stem output one chunk may hold when the planner sizes the chunks
/// ([`StemChunk::Auto`]): a third of an H100's or H200's 50 MB L2 cache, which leaves room for
/// the input and the pool's output passing through it.
pub const STEM_CHUNK_BYTES: usize = 16 << 20;

/// Alignment every chunk of a chunked stem keeps: the slab's, which cuDNN's vectorized kernels
/// and the graph API's declared 16-byte alignment rely on.
pub const STEM_CHUNK_ALIGN: usize = 256;

/// Images per chunk of the stem and max pool to plan (`None`: the whole batch), for a batch of
/// `batch` images of the sizes `per_image` gives. A chunk size always divides the batch, is
/// smaller than it, and keeps every chunk [`STEM_CHUNK_ALIGN`]-aligned (at some odd image
/// sizes an image's input is not); where none does, the batch runs whole.
pub fn stem_chunks(
    choice: StemChunk,
    batch: usize,
    per_image: StemImageBytes,
) -> Vec<Option<usize>> {
    let fits = |d: usize| {
        batch.is_multiple_of(d)
            && [per_image.input, per_image.stem_out, per_image.pooled]
                .iter()
                .all(|b| (d * b).is_multiple_of(STEM_CHUNK_ALIGN))
    };
    let chunk = |most: usize| {
        (1..=most.min(batch))
            .rev()
            .find(|&d| fits(d))
            .filter(|&d| d < batch)
    };
    match choice {
        StemChunk::Off => vec![None],
        StemChunk::Images(n) => vec![chunk(n.get())],
        StemChunk::Auto => match chunk(STEM_CHUNK_BYTES / per_image.stem_out.max(1)) {
            Some(d) => vec![None, Some(d)],
            None => vec![None],
        },
    }
}

/// The plan strategies built and compared whole. `auto` builds the timed plan alone where its
/// layers are timed inside a CUDA graph, and both where they are timed launch by launch.
pub fn strategies(opts: &FusedOptions) -> Vec<PlanStrategy> {
    match opts.plan {
        PlanChoice::Auto if layer_timing(opts) == LayerTiming::Graph => vec![PlanStrategy::Timed],
        PlanChoice::Auto | PlanChoice::Both => vec![PlanStrategy::Timed, PlanStrategy::Ranked],
        PlanChoice::Timed => vec![PlanStrategy::Timed],
        PlanChoice::Ranked => vec![PlanStrategy::Ranked],
    }
}

/// Epilogues a layer may use. cuDNN's fused call needs a ReLU for most algorithms, so a layer
/// without one always goes separate.
pub fn epilogues(choice: EpilogueChoice, relu: bool) -> Vec<Epilogue> {
    match (choice, relu) {
        (_, false) | (EpilogueChoice::Separate, true) => vec![Epilogue::Separate],
        (EpilogueChoice::Api, true) => vec![Epilogue::Api, Epilogue::ApiF32Bias],
        (EpilogueChoice::Auto, true) => {
            vec![Epilogue::Api, Epilogue::ApiF32Bias, Epilogue::Separate]
        }
    }
}

/// Workspace for the algorithm search: generous, freed once the plan is made.
pub fn search_workspace(free_device_bytes: usize) -> usize {
    (free_device_bytes / 4).min(1 << 30)
}

/// Largest workspace a chosen algorithm may keep. Capped relative to the activations, so a
/// slightly faster algorithm cannot buy its speed with more memory than the activations take.
/// (Half the slab was tried on 2026-12-06 for layer 2's downsample, whose
/// `implicit_precomp_gemm` needs 154 MB at f16 batch 256 on an H100: allowed, it ran in 0.296
/// ms against `implicit_gemm`'s 0.190, so the cap was not what held that layer back.)
pub fn workspace_cap(opts: &FusedOptions, slab_bytes: usize, search_ws: usize) -> usize {
    opts.workspace_limit
        .unwrap_or((slab_bytes / 4).max(64 << 20))
        .min(search_ws)
}

/// The arithmetic the fused path runs `precision` in on a GPU of `cc`.
pub fn math(opts: &FusedOptions, precision: Precision, cc: ComputeCapability) -> MathMode {
    cuda_math(precision, cc, opts.tf32)
}

/// A layer's time from its timed runs: the best after the first (which pays for warm-up).
pub fn layer_time(samples: &[f32]) -> Option<f32> {
    samples.iter().skip(1).copied().reduce(f32::min)
}

/// How layer candidates are timed: [`LayerTiming::Graph`] or [`LayerTiming::Launch`], never
/// `Auto`. Launch-by-launch timing counts the host's enqueue time (a cuDNN call costs the host
/// several microseconds), which the forward pass's graph removes; at small batches that time is
/// most of what it measures, and the timed plan then loses to cuDNN's own ranking.
pub fn layer_timing(opts: &FusedOptions) -> LayerTiming {
    match opts.layer_timing {
        LayerTiming::Auto if opts.cuda_graph => LayerTiming::Graph,
        LayerTiming::Auto => LayerTiming::Launch,
        fixed => fixed,
    }
}

/// GPU time a graph-timed candidate's graph should take, so the replay's own launch cost
/// (a few microseconds) stays a small share of it.
pub const GRAPH_TIMING_TARGET_SECS: f32 = 0.5e-3;

/// How many runs of a candidate to capture into one graph for timing, from the time of one
/// launch-by-launch run (an overestimate of its GPU time): enough to fill
/// [`GRAPH_TIMING_TARGET_SECS`], at least 2 and at most 20.
pub fn graph_reps(one_run_secs: f32) -> usize {
    if !(one_run_secs.is_finite() && one_run_secs > 0.0) {
        return 20;
    }
    ((GRAPH_TIMING_TARGET_SECS / one_run_secs).ceil() as usize).clamp(2, 20)
}

/// Which cuDNN APIs the candidates of a convolution with `filter` come from: (legacy, graph).
pub fn conv_apis(opts: &FusedOptions, filter: &Filter) -> (bool, bool) {
    match opts.conv_api {
        ConvApi::Legacy => (true, false),
        ConvApi::Graph => (false, true),
        ConvApi::Auto => (true, true),
        ConvApi::OneByOne => (true, filter.r == 1 && filter.s == 1),
    }
}

/// What cuDNN says about an engine's arithmetic (its numerical notes), as far as the choice
/// of engine cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineNote {
    /// Runs on tensor cores (for f32 data: TF32).
    TensorCore,
    /// Converts inputs to a narrower type before multiplying.
    DownConvertInputs,
    /// Accumulates in less than f32.
    ReducedPrecisionReduction,
    /// Anything else (FFT, Winograd, nondeterministic, ...), which the legacy path allows too.
    Other,
}

/// Whether an engine with `notes` computes in `math`: f32 math admits no tensor cores (that
/// would be TF32 under an `f32` label), no math admits converting inputs to a narrower type,
/// and nothing accumulates in less than f32, which is what the legacy path asks of cuDNN (f32
/// compute type).
pub fn engine_allowed(math: MathMode, notes: &[EngineNote]) -> bool {
    notes.iter().all(|n| match n {
        EngineNote::ReducedPrecisionReduction => false,
        // For f32 data this note marks engines that convert inputs to f16, which neither f32
        // nor TF32 math allows (the legacy path forbids it too); f16/bf16 inputs have nothing
        // narrower to go to. TF32 engines carry the tensor-core note instead.
        EngineNote::DownConvertInputs => false,
        EngineNote::TensorCore => math != MathMode::F32,
        EngineNote::Other => true,
    })
}

/// How many of the heuristics' best engine configurations also get split-K variants. Each plan
/// of a fused convolution is compiled at run time (NVRTC; about half a second each on the
/// development machine), so variants cost planning time.
pub const SPLIT_CONFIGS: usize = 1;

/// Split factors to try for a split knob whose range is `min..=max` in steps of `stride`,
/// besides `current` (the heuristics' own choice): 2, 4 and 8 where the range holds them
/// (cuDNN 9.19's fused-convolution engines offer `SPLIT_K_SLC` from 1 to 128). Splitting the reduction lets a layer with few output tiles (the 7x7 layers at batch
/// 1, which fill a handful of an H100's 132 SMs) keep more of the GPU busy.
pub fn split_values(min: i64, max: i64, stride: i64, current: Option<i64>) -> Vec<i64> {
    let stride = stride.max(1);
    [2, 4, 8]
        .into_iter()
        .filter(|&v| v >= min && v <= max && (v - min) % stride == 0 && Some(v) != current)
        .collect()
}

/// Which max pools to time after the stem: the path's own kernel only where it can take the
/// shape (`kernel_fits`).
pub fn pool_candidates(opts: &FusedOptions, kernel_fits: bool) -> Vec<PoolImpl> {
    match (opts.pool, kernel_fits) {
        (PoolChoice::Cudnn, _) | (PoolChoice::Auto, false) => vec![PoolImpl::Cudnn],
        (PoolChoice::Auto, true) => vec![PoolImpl::Cudnn, PoolImpl::Kernel],
        (PoolChoice::Kernel, _) => vec![PoolImpl::Kernel],
    }
}

/// Who runs a max pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolImpl {
    Cudnn,
    Kernel,
}

impl PoolImpl {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolImpl::Cudnn => "cudnn",
            PoolImpl::Kernel => "kernel",
        }
    }
}

/// The launch of the path's own 3x3 stride-2 max pool (padding 1) for one shape: the kernel's
/// integer arguments and its grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxPoolGeometry {
    /// n, h, w, 16-byte vectors per pixel, output h, output w (the kernel's `int` arguments).
    pub dims: [i32; 6],
    /// Blocks of [`MAXPOOL_BLOCK`] threads, one thread per output vector; capped, since the
    /// kernel loops over any remainder.
    pub blocks: u32,
}

/// Threads per block of the max pool kernel: a multiple of the 8 threads that share one
/// 64-channel f16 pixel.
pub const MAXPOOL_BLOCK: u32 = 256;

/// The kernel's launch for pooling `x` into `y` with `elem_size`-byte values, or why it
/// cannot take them (cuDNN's pool is then the only candidate).
pub fn maxpool_geometry(x: &Shape, y: &Shape, elem_size: usize) -> Result<MaxPoolGeometry, String> {
    let row = x.c * elem_size;
    if x.c != y.c || x.n != y.n || !row.is_multiple_of(16) {
        return Err(format!(
            "{} channels of {elem_size} bytes are not whole 16-byte vectors",
            x.c
        ));
    }
    let pooled = |d: usize| (d + 2 - 3) / 2 + 1;
    if x.h == 0 || x.w == 0 || y.h != pooled(x.h) || y.w != pooled(x.w) {
        return Err(format!(
            "{}x{} -> {}x{} is not a 3x3 stride-2 pool with padding 1",
            x.h, x.w, y.h, y.w
        ));
    }
    let vecs = row / 16;
    let small = |v: usize| i32::try_from(v).map_err(|_| format!("{v} does not fit an i32"));
    let dims = [
        small(x.n)?,
        small(x.h)?,
        small(x.w)?,
        small(vecs)?,
        small(y.h)?,
        small(y.w)?,
    ];
    let total =
        x.n.checked_mul(y.h * y.w * vecs)
            .ok_or_else(|| "the output is too large".to_string())?;
    let blocks = total.div_ceil(MAXPOOL_BLOCK as usize).clamp(1, 1 << 20) as u32;
    Ok(MaxPoolGeometry { dims, blocks })
}

/// One compiled variant of the stem-and-pool kernel (`engine/kernels/stem_pool.cu`), named
/// `r<pooled rows per tile>_n<16-channel fragments per warp>_g<conv rows per warp pass>`; the
/// fields are what the host needs (shared memory, tiles). The executor times every variant
/// the GPU can launch against cuDNN's stem and pool and keeps the fastest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StemPoolVariant {
    /// The kernel's name after `stem_pool_<precision>_`.
    pub name: &'static str,
    pub pooled_rows: usize,
    pub row_group: usize,
}

/// The variants the kernel file compiles. On an H100 (2026-12-06, f16 batch 256, alone):
/// `r7_n1_g4` 0.50 ms, `r14_n2_g4` 0.58 ms, `r7_n2_g4` 0.63 ms, against 0.96 ms for cuDNN's
/// stem and the pool kernel in the engine's profile.
pub const STEM_POOL_VARIANTS: [StemPoolVariant; 3] = [
    StemPoolVariant {
        name: "r7_n1_g4",
        pooled_rows: 7,
        row_group: 4,
    },
    StemPoolVariant {
        name: "r7_n2_g4",
        pooled_rows: 7,
        row_group: 4,
    },
    StemPoolVariant {
        name: "r14_n2_g4",
        pooled_rows: 14,
        row_group: 4,
    },
];

/// Threads per block of the stem-and-pool kernel.
pub const STEM_POOL_THREADS: u32 = 256;
/// Pooled columns per tile, and conv columns computed per tile (one 16-pixel fragment).
const STEM_POOL_TILE_W: usize = 7;
const STEM_POOL_CONV_COLS: usize = 16;
/// Input channels and filter side of the space-to-depth stem the kernel computes.
const STEM_POOL_CIN: usize = 16;
const STEM_POOL_KS: usize = 4;
const STEM_POOL_COUT: usize = 64;

impl StemPoolVariant {
    /// Dynamic shared memory per block, as the kernel's `Tile::SMEM` computes it: two input
    /// tiles of 16-bit values and the f32 conv tile with 72 floats per pixel. The kernel checks
    /// what it was given and writes nothing with less.
    pub fn smem_bytes(&self) -> usize {
        let conv_rows = 2 * self.pooled_rows + 1;
        let computed = conv_rows.div_ceil(self.row_group) * self.row_group;
        let in_rows = computed + STEM_POOL_KS - 1;
        let in_cols = STEM_POOL_CONV_COLS + STEM_POOL_KS - 1;
        let input = in_rows * in_cols * STEM_POOL_CIN * 2;
        let out = conv_rows * STEM_POOL_CONV_COLS * (STEM_POOL_COUT + 8) * 4;
        2 * input + out
    }

    /// The kernel's name for 16-bit values of `precision` (`f16` or `bf16`).
    pub fn function(&self, precision: &str) -> String {
        format!("stem_pool_{precision}_{}", self.name)
    }

    /// Tiles of the pooled output: each block loops over them.
    pub fn tiles(&self, g: &StemPoolGeometry) -> usize {
        let [hs, ws, n] = g.args.map(|v| v as usize);
        let pooled = |d: usize| (d - STEM_POOL_KS) / 2 + 1;
        pooled(ws).div_ceil(STEM_POOL_TILE_W) * pooled(hs).div_ceil(self.pooled_rows) * n
    }
}

/// The stem-and-pool kernel's arguments for one shape: the input's height and width and the
/// batch (`int hs, int ws, int n`; the kernel derives the rest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StemPoolGeometry {
    pub args: [i32; 3],
}

/// Whether the stem-and-pool kernel computes this stem (`filter` over `x`, into `stem_out`)
/// and 3x3 stride-2 max pool (into `pooled`) with `elem_size`-byte values, and its arguments;
/// or why not (cuDNN's stem and the pool then stay).
pub fn stem_pool_geometry(
    x: &Shape,
    filter: &Filter,
    stem_out: &Shape,
    pooled: &Shape,
    elem_size: usize,
) -> Result<StemPoolGeometry, String> {
    if elem_size != 2 {
        return Err(format!(
            "it computes 16-bit values, not {elem_size}-byte ones"
        ));
    }
    let want = (
        STEM_POOL_COUT,
        STEM_POOL_CIN,
        STEM_POOL_KS,
        STEM_POOL_KS,
        1,
        0,
    );
    let got = (
        filter.k,
        filter.c,
        filter.r,
        filter.s,
        filter.stride,
        filter.pad,
    );
    if got != want || x.c != STEM_POOL_CIN {
        return Err(format!(
            "it computes the 16-channel space-to-depth stem (64 outputs, 4x4, stride 1, no \
             padding), not {} outputs from {} channels {}x{} stride {} pad {}",
            filter.k, x.c, filter.r, filter.s, filter.stride, filter.pad
        ));
    }
    let conv = |d: usize| d.checked_sub(STEM_POOL_KS - 1).filter(|&o| o > 0);
    let (Some(oh), Some(ow)) = (conv(x.h), conv(x.w)) else {
        return Err(format!(
            "a {}x{} input is smaller than the filter",
            x.h, x.w
        ));
    };
    let pool = |d: usize| (d - 1) / 2 + 1;
    let expected_out = Shape {
        n: x.n,
        h: oh,
        w: ow,
        c: STEM_POOL_COUT,
    };
    let expected_pooled = Shape {
        n: x.n,
        h: pool(oh),
        w: pool(ow),
        c: STEM_POOL_COUT,
    };
    if *stem_out != expected_out || *pooled != expected_pooled {
        return Err(format!(
            "{:?} -> {:?} -> {:?} is not the stem and its 3x3 stride-2 pool",
            x, stem_out, pooled
        ));
    }
    let small = |v: usize| i32::try_from(v).map_err(|_| format!("{v} does not fit an i32"));
    let g = StemPoolGeometry {
        args: [small(x.h)?, small(x.w)?, small(x.n)?],
    };
    // The kernel numbers tiles with an int: the smallest tiles give the most.
    let most = STEM_POOL_VARIANTS
        .iter()
        .map(|v| v.tiles(&g))
        .max()
        .unwrap_or(0);
    // The kernel also steps its tile index by the grid (at most STEM_POOL_MAX_GRID blocks).
    small(most + STEM_POOL_MAX_GRID as usize)
        .map_err(|_| format!("{most} tiles do not fit the kernel's int"))?;
    Ok(g)
}

/// Blocks to launch: every SM filled as far as the kernel's occupancy allows, never more than
/// there are tiles (each block loops over its share).
pub fn stem_pool_grid(tiles: usize, sms: u32, blocks_per_sm: u32) -> u32 {
    let resident = (sms.max(1) as usize) * (blocks_per_sm.max(1) as usize);
    tiles.clamp(1, resident.min(STEM_POOL_MAX_GRID as usize)) as u32
}

/// Most blocks a stem-and-pool launch uses (far above any GPU's resident blocks).
pub const STEM_POOL_MAX_GRID: u32 = 1 << 16;

/// The first index where two outputs differ as values (±0 are equal, and so are two NaNs), or
/// `None` if they agree everywhere and have the same length. A kernel is used only where its
/// output and cuDNN's agree like this on the real buffers.
pub fn first_mismatch(a: &[f32], b: &[f32]) -> Option<usize> {
    let same = |x: f32, y: f32| x == y || (x.is_nan() && y.is_nan());
    a.iter()
        .zip(b)
        .position(|(&x, &y)| !same(x, y))
        .or((a.len() != b.len()).then(|| a.len().min(b.len())))
}

/// Largest difference, relative to the output's scale, allowed between two plans of one
/// convolution in `math` (they may sum in a different order, or split the sum). A plan that
/// drops the bias, the residual or the ReLU, or writes nothing, misses by far more.
pub fn plan_tolerance(math: MathMode) -> f32 {
    match math {
        MathMode::F32 => 1e-4,
        MathMode::Tf32 => 1e-2,
        MathMode::F16 => 2e-2,
        MathMode::Bf16 => 6e-2,
    }
}

/// The first index where `a` differs from the reference `b` by more than `tol` times the
/// larger of |b| there and b's root mean square (so values near zero are judged on the
/// tensor's scale), or `None` if they agree. A NaN anywhere in `a` that `b` does not have, or a
/// length difference, is a mismatch.
pub fn first_disagreement(a: &[f32], b: &[f32], tol: f32) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    let n = b.len().max(1) as f64;
    let rms = (b.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / n).sqrt() as f32;
    a.iter().zip(b).position(|(&x, &y)| {
        if x.is_nan() || y.is_nan() {
            return x.is_nan() != y.is_nan();
        }
        (x - y).abs() > tol * y.abs().max(rms)
    })
}

/// Median of whole-forward times, for choosing between plans.
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

/// The failed candidates of a plan search as one result detail (`stem_search_failures`): the
/// messages joined, cut to the length a result's detail may have (longer ones would get the
/// whole result refused), with "…" where cut.
pub fn failures_detail(failures: &[String]) -> String {
    fleetmark_core::limits::clip_text(
        &failures.join("; "),
        fleetmark_core::limits::MAX_DETAIL_CHARS,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: Vec<StemInput>) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn stem_chunks_divide_the_batch_and_fit_the_cache() {
        use std::num::NonZeroUsize;
        let images = |n| StemChunk::Images(NonZeroUsize::new(n).unwrap());
        // 224-pixel images: the stem's output is 112x112x64, 1.6 MB in f16, 3.2 MB in f32.
        let s2d16 = StemInput::SpaceToDepth(S2dChannels::C16);
        let f16 = StemImageBytes::new(s2d16, 224, 2);
        let f32 = StemImageBytes::new(s2d16, 224, 4);
        assert_eq!(
            (f16.stem_out, f32.stem_out),
            (112 * 112 * 64 * 2, 112 * 112 * 64 * 4)
        );
        let big = StemImageBytes {
            stem_out: STEM_CHUNK_BYTES + 256,
            ..f16
        };
        assert_eq!(stem_chunks(StemChunk::Off, 256, f16), [None]);
        assert_eq!(stem_chunks(StemChunk::Auto, 256, f16), [None, Some(8)]);
        assert_eq!(stem_chunks(StemChunk::Auto, 256, f32), [None, Some(4)]);
        assert_eq!(stem_chunks(StemChunk::Auto, 64, f16), [None, Some(8)]);
        assert_eq!(stem_chunks(StemChunk::Auto, 16, f16), [None, Some(8)]);
        // A space-to-depth image is 115x115x16 f16 values, 32 bytes past a multiple of 256:
        // only chunks of 8 images stay aligned, and 12 has no such divisor.
        assert_eq!(f16.input % STEM_CHUNK_ALIGN, 32);
        assert_eq!(stem_chunks(StemChunk::Auto, 12, f16), [None]);
        assert_eq!(stem_chunks(StemChunk::Auto, 6, f16), [None]);
        // A batch that already fits is not cut; neither is one image too big for the cache.
        assert_eq!(stem_chunks(StemChunk::Auto, 8, f16), [None]);
        assert_eq!(stem_chunks(StemChunk::Auto, 1, f16), [None]);
        assert_eq!(stem_chunks(StemChunk::Auto, 4, big), [None]);
        // Asked for: the largest divisor not above it, and never the whole batch.
        assert_eq!(stem_chunks(images(10), 256, f16), [Some(8)]);
        // Every size of a padded 8-channel image is a multiple of 256 bytes: any divisor fits.
        let pad8 = StemImageBytes::new(StemInput::Padded(StemPad::C8), 224, 2);
        assert_eq!(stem_chunks(images(4), 6, pad8), [Some(3)]);
        assert_eq!(stem_chunks(images(4), 7, pad8), [Some(1)]);
        assert_eq!(stem_chunks(images(256), 256, f16), [None]);
        assert_eq!(stem_chunks(images(300), 256, f16), [None]);
        assert_eq!(stem_chunks(images(1), 1, f16), [None]);
        // 225 pixels, 3 channels in f16: 303,750 bytes an image, 2-byte aligned, so only
        // chunks of a multiple of 128 images stay 256-byte aligned.
        let odd = StemImageBytes::new(StemInput::Padded(StemPad::C3), 225, 2);
        assert_eq!(odd.input, 225 * 225 * 3 * 2);
        assert_eq!(stem_chunks(images(6), 12, odd), [None]);
        assert_eq!(stem_chunks(images(200), 256, odd), [Some(128)]);
        for (batch, d) in [(256, Some(8)), (24, Some(8)), (12, None), (6, None)] {
            let got = stem_chunks(StemChunk::Auto, batch, f16);
            assert_eq!(got.last().copied().flatten(), d, "batch {batch}");
            if let Some(d) = d {
                for b in [f16.input, f16.stem_out, f16.pooled] {
                    assert_eq!(d * b % STEM_CHUNK_ALIGN, 0);
                }
            }
        }
    }

    #[test]
    fn the_options_decide_what_is_tried() {
        let mut o = FusedOptions::default();
        let tried = |o: &FusedOptions, p| names(stem_candidates(o, p));
        assert_eq!(
            tried(&o, Precision::F16),
            ["s2d16"],
            "space-to-depth by default"
        );
        assert_eq!(tried(&o, Precision::F32), ["s2d12", "s2d16"]);
        let fallbacks = |o: &FusedOptions, p| names(stem_fallbacks(o, p));
        assert_eq!(
            fallbacks(&o, Precision::F16),
            ["8", "4", "3"],
            "if none plans"
        );
        assert_eq!(fallbacks(&o, Precision::F32), ["4", "3"]);
        assert_eq!(
            strategies(&o),
            vec![PlanStrategy::Timed],
            "timed alone by default, layers being timed in the graph"
        );
        o.cuda_graph = false;
        assert_eq!(
            strategies(&o),
            vec![PlanStrategy::Timed, PlanStrategy::Ranked],
            "both where layers are timed launch by launch"
        );
        o.cuda_graph = true;
        o.stem = StemChannels::Auto;
        o.plan = PlanChoice::Both;
        assert_eq!(tried(&o, Precision::F16), ["s2d16", "8", "4", "3"]);
        assert!(fallbacks(&o, Precision::F16).is_empty());
        assert_eq!(tried(&o, Precision::Bf16), ["s2d16", "8", "4", "3"]);
        assert_eq!(tried(&o, Precision::F32), ["s2d12", "s2d16", "4", "3"]);
        o.stem = StemChannels::SpaceToDepth;
        assert_eq!(tried(&o, Precision::F16), ["s2d16"]);
        assert_eq!(tried(&o, Precision::F32), ["s2d12", "s2d16"]);
        o.stem = StemChannels::Fixed(StemInput::SpaceToDepth(S2dChannels::C12));
        assert_eq!(tried(&o, Precision::F16), ["s2d12"]);
        o.stem = StemChannels::Fixed(StemInput::Padded(StemPad::C3));
        assert_eq!(tried(&o, Precision::Bf16), ["3"]);
        assert_eq!(strategies(&o).len(), 2);
        o.plan = PlanChoice::Ranked;
        assert_eq!(strategies(&o), vec![PlanStrategy::Ranked]);
        assert_eq!(
            epilogues(EpilogueChoice::Api, false),
            vec![Epilogue::Separate]
        );
        assert_eq!(epilogues(EpilogueChoice::Auto, true).len(), 3);
        assert_eq!(
            epilogues(EpilogueChoice::Separate, true),
            vec![Epilogue::Separate]
        );
    }

    #[test]
    fn tf32_follows_the_generation_and_the_switch() {
        let mut o = FusedOptions::default();
        let t4 = ComputeCapability::new(7, 5);
        let h100 = ComputeCapability::new(9, 0);
        assert_eq!(math(&o, Precision::F32, h100), MathMode::Tf32);
        assert_eq!(math(&o, Precision::F32, t4), MathMode::F32);
        o.tf32 = false;
        assert_eq!(math(&o, Precision::F32, h100), MathMode::F32);
    }

    #[test]
    fn workspace_and_timing_rules() {
        let mut o = FusedOptions::default();
        assert_eq!(workspace_cap(&o, 1 << 30, 1 << 40), 1 << 28);
        assert_eq!(workspace_cap(&o, 1 << 20, 1 << 40), 64 << 20);
        assert_eq!(workspace_cap(&o, 1 << 30, 1 << 20), 1 << 20);
        o.workspace_limit = Some(4096);
        assert_eq!(workspace_cap(&o, 1 << 30, 1 << 40), 4096);
        assert_eq!(search_workspace(16 << 30), 1 << 30);
        assert_eq!(layer_time(&[9.0, 2.0, 3.0, 1.5]), Some(1.5));
        assert_eq!(layer_time(&[9.0]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
    }

    #[test]
    fn conv_apis_follow_the_option() {
        let f = |r: usize, stride: usize| Filter {
            k: 128,
            c: 64,
            r,
            s: r,
            stride,
            pad: r / 2,
        };
        let (three, ds) = (f(3, 1), f(1, 2));
        let mut o = FusedOptions::default();
        assert_eq!(o.conv_api, ConvApi::OneByOne, "the default");
        assert_eq!(conv_apis(&o, &three), (true, false), "3x3: legacy only");
        assert_eq!(conv_apis(&o, &ds), (true, true), "a downsample races both");
        assert_eq!(conv_apis(&o, &f(1, 1)), (true, true), "the classifier too");
        o.conv_api = ConvApi::Legacy;
        assert_eq!(conv_apis(&o, &ds), (true, false));
        o.conv_api = ConvApi::Graph;
        assert_eq!(conv_apis(&o, &three), (false, true));
        o.conv_api = ConvApi::Auto;
        assert_eq!(conv_apis(&o, &three), (true, true));
    }

    #[test]
    fn f32_math_refuses_tensor_core_engines_and_nothing_accumulates_narrow() {
        use EngineNote::*;
        assert!(!engine_allowed(MathMode::F32, &[TensorCore]));
        assert!(engine_allowed(MathMode::F32, &[Other]));
        assert!(engine_allowed(MathMode::F32, &[]));
        assert!(engine_allowed(MathMode::Tf32, &[TensorCore]));
        assert!(engine_allowed(MathMode::F16, &[TensorCore]));
        for m in [MathMode::F32, MathMode::Tf32, MathMode::F16, MathMode::Bf16] {
            assert!(!engine_allowed(m, &[Other, DownConvertInputs]), "{m:?}");
        }
        for m in [MathMode::F32, MathMode::Tf32, MathMode::F16, MathMode::Bf16] {
            assert!(!engine_allowed(m, &[TensorCore, ReducedPrecisionReduction]));
        }
    }

    #[test]
    fn plans_agree_within_the_maths_rounding_and_a_wrong_epilogue_does_not() {
        let reference: Vec<f32> = (0..1000)
            .map(|i| ((i * 37) % 101) as f32 / 10.0 - 2.0)
            .collect();
        let relu = |v: &[f32]| v.iter().map(|x| x.max(0.0)).collect::<Vec<_>>();
        let y = relu(&reference);
        for m in [MathMode::F32, MathMode::Tf32, MathMode::F16, MathMode::Bf16] {
            let tol = plan_tolerance(m);
            // Rounding of a tenth of the tolerance passes.
            let close: Vec<f32> = y.iter().map(|x| x * (1.0 + tol / 10.0)).collect();
            assert_eq!(first_disagreement(&close, &y, tol), None, "{m:?}");
            // Without the ReLU, without the bias (a shift of 0.5), or nothing written: caught.
            assert!(first_disagreement(&reference, &y, tol).is_some(), "{m:?}");
            let shifted: Vec<f32> = y.iter().map(|x| x - 0.5).collect();
            assert!(first_disagreement(&shifted, &y, tol).is_some(), "{m:?}");
            assert!(
                first_disagreement(&vec![0.0; y.len()], &y, tol).is_some(),
                "{m:?}"
            );
        }
        let mut nan = y.clone();
        nan[7] = f32::NAN;
        assert_eq!(first_disagreement(&nan, &y, 0.1), Some(7));
        assert_eq!(first_disagreement(&y[1..], &y, 0.1), Some(999));
    }

    #[test]
    fn split_values_stay_in_the_knobs_range() {
        assert_eq!(split_values(1, 128, 1, None), vec![2, 4, 8]);
        assert_eq!(split_values(1, 128, 1, Some(4)), vec![2, 8]);
        assert_eq!(split_values(1, 128, 1, Some(-1)), vec![2, 4, 8]);
        assert_eq!(split_values(0, 5, 1, None), vec![2, 4]);
        // A stride of 2 from 1 reaches only odd values: no power of two.
        assert!(split_values(1, 16, 2, None).is_empty());
        assert_eq!(split_values(0, 16, 4, None), vec![4, 8]);
        assert!(
            split_values(1, 1, 1, None).is_empty(),
            "a knob that cannot split"
        );
        assert_eq!(
            split_values(2, 8, 0, None),
            vec![2, 4, 8],
            "a zero stride counts as 1"
        );
    }

    #[test]
    fn layer_timing_follows_the_graph() {
        let mut o = FusedOptions::default();
        assert_eq!(
            layer_timing(&o),
            LayerTiming::Graph,
            "by default, as the forward pass's CUDA graph runs it"
        );
        assert_eq!(o.layer_timing, LayerTiming::Auto);
        o.cuda_graph = false;
        assert_eq!(layer_timing(&o), LayerTiming::Launch);
        o.layer_timing = LayerTiming::Graph;
        assert_eq!(layer_timing(&o), LayerTiming::Graph);
        o.cuda_graph = true;
        o.layer_timing = LayerTiming::Launch;
        assert_eq!(layer_timing(&o), LayerTiming::Launch);
        // A 20 us layer (batch 1) is captured 20 times; a 150 us one 4 times; a slow one twice.
        assert_eq!(graph_reps(20e-6), 20);
        assert_eq!(graph_reps(150e-6), 4);
        assert_eq!(graph_reps(0.1), 2);
        assert_eq!(graph_reps(0.0), 20);
        assert_eq!(graph_reps(f32::NAN), 20);
    }

    #[test]
    fn the_pool_kernel_is_a_candidate_only_where_it_fits() {
        let mut o = FusedOptions::default();
        assert_eq!(
            pool_candidates(&o, true),
            [PoolImpl::Cudnn, PoolImpl::Kernel],
            "both timed by default"
        );
        assert_eq!(pool_candidates(&o, false), [PoolImpl::Cudnn]);
        o.pool = PoolChoice::Cudnn;
        assert_eq!(pool_candidates(&o, true), [PoolImpl::Cudnn]);
        o.pool = PoolChoice::Kernel;
        assert_eq!(pool_candidates(&o, false), [PoolImpl::Kernel]);
    }

    #[test]
    fn outputs_agree_value_for_value() {
        assert_eq!(
            first_mismatch(&[1.0, 0.0, f32::NAN], &[1.0, -0.0, f32::NAN]),
            None
        );
        assert_eq!(first_mismatch(&[1.0, 2.0], &[1.0, 2.5]), Some(1));
        assert_eq!(first_mismatch(&[1.0, f32::NAN], &[1.0, 0.0]), Some(1));
        assert_eq!(first_mismatch(&[1.0, 2.0], &[1.0]), Some(1));
        assert_eq!(first_mismatch(&[], &[]), None);
    }

    fn shape(n: usize, h: usize, w: usize, c: usize) -> Shape {
        Shape { n, h, w, c }
    }

    #[test]
    fn the_stem_pool_geometry_in_every_precision() {
        for (size, vecs) in [(2, 8), (4, 16)] {
            let g =
                maxpool_geometry(&shape(256, 112, 112, 64), &shape(256, 56, 56, 64), size).unwrap();
            assert_eq!(g.dims, [256, 112, 112, vecs, 56, 56]);
            let threads = 256 * 56 * 56 * vecs as u32;
            assert_eq!(g.blocks, threads.div_ceil(MAXPOOL_BLOCK));
        }
        // Odd sizes pool as cuDNN's padding-1 window does: 33 -> 17, 31 -> 16.
        let g = maxpool_geometry(&shape(1, 33, 31, 64), &shape(1, 17, 16, 64), 2).unwrap();
        assert_eq!(g.dims, [1, 33, 31, 8, 17, 16]);
        assert_eq!(g.blocks, 9); // 17*16*8 = 2176 threads
    }

    #[test]
    fn shapes_the_pool_kernel_cannot_take_are_refused() {
        // 3 f16 channels are 6 bytes a pixel, not whole 16-byte vectors.
        assert!(maxpool_geometry(&shape(1, 8, 8, 3), &shape(1, 4, 4, 3), 2).is_err());
        // A wrong output shape, changed channels, an empty input.
        assert!(maxpool_geometry(&shape(1, 112, 112, 64), &shape(1, 55, 56, 64), 2).is_err());
        assert!(maxpool_geometry(&shape(1, 112, 112, 64), &shape(1, 56, 56, 32), 2).is_err());
        assert!(maxpool_geometry(&shape(1, 0, 112, 64), &shape(1, 1, 56, 64), 2).is_err());
        // Sizes past an i32.
        let huge = 1usize << 32;
        assert!(maxpool_geometry(&shape(huge, 3, 3, 64), &shape(huge, 2, 2, 64), 2).is_err());
    }

    #[test]
    fn the_stem_pool_kernel_takes_only_the_s2d16_stem_and_its_pool() {
        let f = |k, c, r, stride, pad| Filter {
            k,
            c,
            r,
            s: r,
            stride,
            pad,
        };
        let stem = f(64, 16, 4, 1, 0);
        let (x, out, pooled) = (
            shape(256, 115, 115, 16),
            shape(256, 112, 112, 64),
            shape(256, 56, 56, 64),
        );
        let g = stem_pool_geometry(&x, &stem, &out, &pooled, 2).unwrap();
        assert_eq!(g.args, [115, 115, 256]);
        // 8 x 8 tiles of 7x7 pooled pixels per image; 8 x 4 of 14 rows.
        assert_eq!(STEM_POOL_VARIANTS[0].tiles(&g), 64 * 256);
        assert_eq!(STEM_POOL_VARIANTS[2].tiles(&g), 32 * 256);
        // Odd sides: 33 pixels -> s2d 20 -> conv 17 -> pooled 9 (cuDNN's padding-1 window).
        let g = stem_pool_geometry(
            &shape(2, 20, 20, 16),
            &stem,
            &shape(2, 17, 17, 64),
            &shape(2, 9, 9, 64),
            2,
        )
        .unwrap();
        assert_eq!(STEM_POOL_VARIANTS[0].tiles(&g), 2 * 2 * 2);
        // Not f32, not the 12-channel or padded stems, not a wrong pool.
        assert!(stem_pool_geometry(&x, &stem, &out, &pooled, 4).is_err());
        let x12 = shape(256, 115, 115, 12);
        assert!(stem_pool_geometry(&x12, &f(64, 12, 4, 1, 0), &out, &pooled, 2).is_err());
        let plain = shape(256, 224, 224, 8);
        assert!(stem_pool_geometry(&plain, &f(64, 8, 7, 2, 3), &out, &pooled, 2).is_err());
        let wrong = shape(256, 55, 56, 64);
        assert!(stem_pool_geometry(&x, &stem, &out, &wrong, 2).is_err());
        assert!(stem_pool_geometry(&shape(1, 3, 3, 16), &stem, &out, &pooled, 2).is_err());
        let huge = 1 << 26;
        let e = stem_pool_geometry(
            &shape(huge, 115, 115, 16),
            &stem,
            &shape(huge, 112, 112, 64),
            &shape(huge, 56, 56, 64),
            2,
        )
        .unwrap_err();
        assert!(e.contains("int"), "{e}");
    }

    #[test]
    fn stem_pool_shared_memory_and_grid_follow_the_kernel() {
        // The kernel's Tile<TPH, RG>::SMEM: 2 x (input rows x 19 x 32 B) + conv rows x 16 x
        // 72 x 4 B. 7 pooled rows: 15 conv rows, 16 computed, 19 input rows.
        let v = |name| STEM_POOL_VARIANTS.iter().find(|v| v.name == name).unwrap();
        assert_eq!(
            v("r7_n1_g4").smem_bytes(),
            2 * 19 * 19 * 32 + 15 * 16 * 72 * 4
        );
        assert_eq!(
            v("r14_n2_g4").smem_bytes(),
            2 * 35 * 19 * 32 + 29 * 16 * 72 * 4
        );
        // Every variant fits an H100's 227 KiB a block.
        assert!(STEM_POOL_VARIANTS
            .iter()
            .all(|v| v.smem_bytes() <= 227 * 1024));
        assert_eq!(v("r7_n1_g4").function("bf16"), "stem_pool_bf16_r7_n1_g4");
        assert_eq!(stem_pool_grid(16384, 132, 2), 264);
        assert_eq!(stem_pool_grid(64, 132, 2), 64);
        assert_eq!(stem_pool_grid(0, 132, 2), 1);
        assert_eq!(stem_pool_grid(100, 0, 0), 1);
        assert_eq!(stem_pool_grid(1 << 30, 1 << 20, 64), STEM_POOL_MAX_GRID);
    }

    #[test]
    fn failures_detail_fits_a_result_detail() {
        let one = vec!["s2d16/timed: unsupported: no plan".to_string()];
        assert_eq!(failures_detail(&one), "s2d16/timed: unsupported: no plan");
        let many: Vec<String> = (0..30)
            .map(|i| format!("cand{i}: {}", "é".repeat(200)))
            .collect();
        let d = failures_detail(&many);
        assert_eq!(d.chars().count(), fleetmark_core::limits::MAX_DETAIL_CHARS);
        assert!(d.ends_with('…') && d.starts_with("cand0: "));
        let mut details = std::collections::BTreeMap::new();
        details.insert("stem_search_failures".to_string(), d);
        fleetmark_core::limits::check_text(
            "a backend detail",
            &details["stem_search_failures"],
            fleetmark_core::limits::MAX_DETAIL_CHARS,
        )
        .expect("fits");
    }
}
