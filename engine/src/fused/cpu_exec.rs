//! The CPU executor of the fused path: runs a [`NetGraph`] in f32 without Candle's ops.
//!
//! Why it exists: Candle's CPU convolution works in NCHW, builds a fresh im2col matrix and output
//! tensor on every call, runs one matrix product per image, and applies bias, residual and ReLU as
//! separate tensor ops, each allocating again. On a small machine that put ResNet18 at a fraction
//! of PyTorch's CPU speed. This executor runs the same graph the GPU path runs (batch norm folded,
//! NHWC, residual and ReLU riding on the convolution) with the pieces prepared once:
//!
//! - activations live in one slab laid out by [`NetGraph::memory_plan`]; the input, the logits and
//!   one im2col buffer (sized for the largest convolution) are allocated at construction, and a
//!   forward pass allocates nothing of its own (the `gemm` crate keeps its packing buffers);
//! - weights are packed once as `[R*S*C, K]` row-major, so each convolution is ONE `gemm` call
//!   over `[N*Ho*Wo, R*S*C] x [R*S*C, K]`, straight into the output activation;
//! - 1x1 stride-1 convolutions (and the fully connected layer) read their NHWC input directly as
//!   the left matrix; the others fill im2col rows with one contiguous copy per kernel row, since in
//!   NHWC the `S` taps of a kernel row are `S*C` consecutive values;
//! - bias, residual and ReLU are one pass over the output after the product;
//! - max and average pooling are plain loops over channel vectors;
//! - threads: `gemm` runs on rayon with [`CpuExecConfig::threads`] threads (the host's cores by
//!   default), and the memory-bound passes are split over the same pool in row blocks.

use std::ops::Range;

use candle_core::{DType, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::graph::{ConvStep, NetGraph, Place, PoolKind, PoolStep, Shape, Step};
use crate::EngineError;

/// How the executor runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuExecConfig {
    /// Threads `gemm` may use, and the split of the memory-bound passes.
    pub threads: usize,
}

impl CpuExecConfig {
    /// One thread per logical core of this host (rayon's `RAYON_NUM_THREADS` wins if set, as it
    /// does for Candle).
    pub fn for_host() -> Self {
        CpuExecConfig {
            threads: candle_core::utils::get_num_threads().max(1),
        }
    }
}

/// Rows handed to one rayon task in the memory-bound passes: large enough that the split costs
/// little, small enough to balance two to a few dozen threads.
const ROWS_PER_TASK: usize = 256;

/// Where an activation's elements are.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Loc {
    Input,
    Output,
    /// Element range in the slab.
    Slab(Range<usize>),
}

/// A convolution, ready to run.
struct ConvOp {
    x: Loc,
    y: Loc,
    residual: Option<Loc>,
    xs: Shape,
    ys: Shape,
    /// Kernel height and width.
    r: usize,
    s: usize,
    stride: usize,
    pad: usize,
    /// `[R*S*C, K]` row-major: row `(r*S + s)*C + c`, column `k`.
    weight: Vec<f32>,
    /// `[K]`; zeros for a convolution without bias.
    bias: Vec<f32>,
    has_residual_or_bias: bool,
    relu: bool,
}

impl ConvOp {
    /// Columns of the left matrix: one kernel window.
    fn depth(&self) -> usize {
        self.r * self.s * self.xs.c
    }

    /// Rows of the product: one per output pixel.
    fn rows(&self) -> usize {
        self.ys.n * self.ys.h * self.ys.w
    }

    /// Whether the NHWC input already is the left matrix.
    fn reads_input_directly(&self) -> bool {
        self.r == 1 && self.s == 1 && self.stride == 1 && self.pad == 0
    }

    /// Elements of im2col buffer this convolution needs.
    fn col_elems(&self) -> usize {
        if self.reads_input_directly() {
            0
        } else {
            self.rows() * self.depth()
        }
    }
}

struct PoolOp {
    kind: PoolKind,
    x: Loc,
    y: Loc,
    xs: Shape,
    ys: Shape,
}

enum Op {
    Conv(ConvOp),
    Pool(PoolOp),
}

/// ResNet18 (or any [`NetGraph`]) on the CPU in f32, NHWC, with every buffer made up front.
pub struct CpuExecutor {
    ops: Vec<Op>,
    input_shape: Shape,
    output_shape: Shape,
    input: Vec<f32>,
    output: Vec<f32>,
    slab: Vec<f32>,
    col: Vec<f32>,
    config: CpuExecConfig,
}

impl CpuExecutor {
    /// Packs the graph's weights and allocates the slab, the input, the output and the im2col
    /// buffer.
    pub fn new(graph: &NetGraph, config: CpuExecConfig) -> Result<Self, EngineError> {
        const F32_BYTES: usize = 4;
        if graph.stem_chunks.is_some() {
            // Chunking keeps the stem's output in a GPU's L2 cache; the CPU path has no use for
            // it and runs every step over the whole batch.
            return Err(EngineError::Unsupported(
                "the CPU executor runs the stem over the whole batch, not in chunks".into(),
            ));
        }
        let plan = graph.memory_plan(F32_BYTES);
        let loc = |a: usize| -> Loc {
            let act = &graph.acts[a];
            match act.place {
                Place::Input => Loc::Input,
                Place::Output => Loc::Output,
                Place::Chunk { .. } => unreachable!("chunked graphs are refused above"),
                Place::Slab => {
                    let start =
                        plan.offsets[a].expect("slab activations have an offset") / F32_BYTES;
                    Loc::Slab(start..start + act.shape.elems())
                }
            }
        };
        let mut ops = Vec::with_capacity(graph.steps.len());
        for step in &graph.steps {
            ops.push(match step {
                Step::Conv(c) => Op::Conv(conv_op(graph, c, &loc)?),
                Step::Pool(p) => Op::Pool(pool_op(graph, p, &loc)),
            });
        }
        let col_elems = ops
            .iter()
            .map(|op| match op {
                Op::Conv(c) => c.col_elems(),
                Op::Pool(_) => 0,
            })
            .max()
            .unwrap_or(0);
        let input_shape = graph.acts[graph.input].shape;
        let output_shape = graph.acts[graph.output].shape;
        Ok(CpuExecutor {
            ops,
            input_shape,
            output_shape,
            input: vec![0.0; input_shape.elems()],
            output: vec![0.0; output_shape.elems()],
            slab: vec![0.0; plan.slab_bytes / F32_BYTES],
            col: vec![0.0; col_elems],
            config,
        })
    }

    pub fn config(&self) -> CpuExecConfig {
        self.config
    }

    /// Bytes of the buffers the executor allocated (weights not counted).
    pub fn buffer_bytes(&self) -> usize {
        (self.input.len() + self.output.len() + self.slab.len() + self.col.len())
            * std::mem::size_of::<f32>()
    }

    /// Copies an NCHW batch (3 or the stem's channels) into the NHWC input buffer, zero-padding
    /// the channels up to the stem's.
    pub fn set_input_nchw(&mut self, x: &Tensor) -> Result<(), EngineError> {
        let (n, c, h, w) = x.dims4()?;
        let s = self.input_shape;
        if n != s.n || h != s.h || w != s.w || c > s.c {
            return Err(EngineError::Unsupported(format!(
                "input {n}x{c}x{h}x{w} (NCHW) does not fit the graph's {}x{}x{}x{} (NHWC)",
                s.n, s.h, s.w, s.c
            )));
        }
        let nhwc = x
            .to_dtype(DType::F32)?
            .permute((0, 2, 3, 1))?
            .pad_with_zeros(3, 0, s.c - c)?
            .contiguous()?
            .flatten_all()?
            .to_vec1::<f32>()?;
        self.input.copy_from_slice(&nhwc);
        Ok(())
    }

    /// One forward pass over the resident input.
    pub fn forward(&mut self) {
        let threads = self.config.threads;
        for op in &self.ops {
            match op {
                Op::Conv(c) => run_conv(
                    c,
                    &self.input,
                    &mut self.output,
                    &mut self.slab,
                    &mut self.col,
                    threads,
                ),
                Op::Pool(p) => run_pool(p, &self.input, &mut self.output, &mut self.slab),
            }
        }
    }

    /// The logits of the last forward pass, `[N, classes]` row-major.
    pub fn output(&self) -> &[f32] {
        &self.output
    }

    pub fn output_shape(&self) -> (usize, usize) {
        (self.output_shape.n, self.output_shape.c)
    }
}

fn conv_op(
    graph: &NetGraph,
    c: &ConvStep,
    loc: &impl Fn(usize) -> Loc,
) -> Result<ConvOp, EngineError> {
    let (k, wc, r, s) = c.weight.dims4()?;
    let xs = graph.acts[c.x].shape;
    let ys = graph.acts[c.y].shape;
    if wc != xs.c || k != ys.c {
        return Err(EngineError::Unsupported(format!(
            "{}: weight {k}x{wc}x{r}x{s} does not match input channels {} and output channels {}",
            c.name, xs.c, ys.c
        )));
    }
    // KCRS -> RSCK: row (r*S + s)*C + c of a [R*S*C, K] matrix.
    let weight = c
        .weight
        .to_dtype(DType::F32)?
        .permute((2, 3, 1, 0))?
        .contiguous()?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let bias = match &c.bias {
        Some(b) => b.to_dtype(DType::F32)?.to_vec1::<f32>()?,
        None => vec![0.0; k],
    };
    Ok(ConvOp {
        x: loc(c.x),
        y: loc(c.y),
        residual: c.residual.map(loc),
        xs,
        ys,
        r,
        s,
        stride: c.stride,
        pad: c.pad,
        weight,
        bias,
        has_residual_or_bias: c.bias.is_some() || c.residual.is_some(),
        relu: c.relu,
    })
}

fn pool_op(graph: &NetGraph, p: &PoolStep, loc: &impl Fn(usize) -> Loc) -> PoolOp {
    PoolOp {
        kind: p.kind,
        x: loc(p.x),
        y: loc(p.y),
        xs: graph.acts[p.x].shape,
        ys: graph.acts[p.y].shape,
    }
}

/// The step's output as a mutable slice and the activations it reads, all borrowed from the
/// executor's buffers at once. The memory plan never places an activation that is read over the
/// one being written (they are alive together); that is checked here, so a wrong plan panics
/// instead of computing garbage.
struct Views<'a> {
    y: &'a mut [f32],
    input: &'a [f32],
    below: &'a [f32],
    above: &'a [f32],
    /// Slab elements before `above` starts (`below` starts at 0).
    above_start: usize,
}

impl<'a> Views<'a> {
    fn new(input: &'a [f32], output: &'a mut [f32], slab: &'a mut [f32], y: &Loc) -> Self {
        match y {
            Loc::Output => Views {
                y: output,
                input,
                below: slab,
                above: &[],
                above_start: usize::MAX,
            },
            Loc::Slab(range) => {
                let (below, rest) = slab.split_at_mut(range.start);
                let (y, above) = rest.split_at_mut(range.len());
                Views {
                    y,
                    input,
                    below,
                    above,
                    above_start: range.end,
                }
            }
            Loc::Input => panic!("no step writes the input"),
        }
    }

    fn read(&self, at: &Loc) -> &'a [f32] {
        match at {
            Loc::Input => self.input,
            Loc::Output => panic!("no step reads the output"),
            Loc::Slab(r) if r.end <= self.below.len() => &self.below[r.clone()],
            Loc::Slab(r) if r.start >= self.above_start => {
                &self.above[r.start - self.above_start..r.end - self.above_start]
            }
            Loc::Slab(r) => panic!("activation at {r:?} overlaps the step's output"),
        }
    }
}

fn run_conv(
    op: &ConvOp,
    input: &[f32],
    output: &mut [f32],
    slab: &mut [f32],
    col: &mut [f32],
    threads: usize,
) {
    let views = Views::new(input, output, slab, &op.y);
    let x = views.read(&op.x);
    let residual = op.residual.as_ref().map(|r| views.read(r));
    let y = views.y;
    let lhs: &[f32] = if op.reads_input_directly() {
        x
    } else {
        let col = &mut col[..op.col_elems()];
        im2col(op, x, col, threads);
        col
    };
    matmul(
        MatMul {
            rows: op.rows(),
            depth: op.depth(),
            cols: op.ys.c,
            threads,
        },
        lhs,
        &op.weight,
        y,
    );
    epilogue(op, y, residual, threads);
}

/// `dst[rows, cols] = lhs[rows, depth] * rhs[depth, cols]`, all row-major and dense.
#[derive(Debug, Clone, Copy)]
struct MatMul {
    rows: usize,
    depth: usize,
    cols: usize,
    threads: usize,
}

fn matmul(mm: MatMul, lhs: &[f32], rhs: &[f32], dst: &mut [f32]) {
    assert_eq!(lhs.len(), mm.rows * mm.depth, "left matrix size");
    assert_eq!(rhs.len(), mm.depth * mm.cols, "right matrix size");
    assert_eq!(dst.len(), mm.rows * mm.cols, "output size");
    let parallelism = if mm.threads > 1 {
        Parallelism::Rayon(mm.threads)
    } else {
        Parallelism::None
    };
    // SAFETY: the three slices are exactly the dense row-major matrices the strides describe
    // (checked above): element (i, j) of dst is at i*cols + j (row stride cols, column stride
    // 1) < rows*cols = dst.len(); of lhs at i*depth + l < rows*depth = lhs.len(); of rhs at
    // l*cols + j < depth*cols = rhs.len(). dst is a `&mut` slice, so it aliases neither input;
    // gemm only reads lhs and rhs (the `*const` arguments), and does not read dst because
    // read_dst is false (alpha, its factor, is then unused). All three stay borrowed until the
    // call returns, and gemm's rayon workers finish before it does.
    unsafe {
        gemm::gemm(
            mm.rows,
            mm.cols,
            mm.depth,
            dst.as_mut_ptr(),
            1,
            mm.cols as isize,
            false,
            lhs.as_ptr(),
            1,
            mm.depth as isize,
            rhs.as_ptr(),
            1,
            mm.cols as isize,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Fills the im2col matrix: row `(n, oh, ow)` holds the kernel window at that output pixel,
/// `R*S*C` values ordered like the packed weight's rows, with zeros where the window hangs over
/// the padding.
fn im2col(op: &ConvOp, x: &[f32], col: &mut [f32], threads: usize) {
    let depth = op.depth();
    let rows_per_task = ROWS_PER_TASK.max(op.rows().div_ceil(threads * 4));
    let task = |(t, chunk): (usize, &mut [f32])| {
        for (i, row) in chunk.chunks_exact_mut(depth).enumerate() {
            im2col_row(op, x, t * rows_per_task + i, row);
        }
    };
    if threads > 1 {
        col.par_chunks_mut(rows_per_task * depth)
            .enumerate()
            .for_each(task);
    } else {
        col.chunks_mut(rows_per_task * depth)
            .enumerate()
            .for_each(task);
    }
}

fn im2col_row(op: &ConvOp, x: &[f32], row: usize, dst: &mut [f32]) {
    let (xs, ys) = (op.xs, op.ys);
    let (ow, oh, n) = (row % ys.w, (row / ys.w) % ys.h, row / (ys.w * ys.h));
    let c = xs.c;
    let tap_row = op.s * c;
    // Input columns the kernel row covers: [w0, w0 + S), of which [lo, hi) lie in the image.
    let w0 = (ow * op.stride) as isize - op.pad as isize;
    let lo = w0.max(0) as usize;
    let hi = ((w0 + op.s as isize).min(xs.w as isize)).max(lo as isize) as usize;
    let skip = (lo as isize - w0) as usize;
    for (r, seg) in dst.chunks_exact_mut(tap_row).enumerate() {
        let ih = (oh * op.stride + r) as isize - op.pad as isize;
        if ih < 0 || ih >= xs.h as isize || hi == lo {
            seg.fill(0.0);
            continue;
        }
        let base = ((n * xs.h + ih as usize) * xs.w) * c;
        let (before, rest) = seg.split_at_mut(skip * c);
        let (inside, after) = rest.split_at_mut((hi - lo) * c);
        before.fill(0.0);
        inside.copy_from_slice(&x[base + lo * c..base + hi * c]);
        after.fill(0.0);
    }
}

/// `y = act(y + bias + residual)`, in place, row by row.
fn epilogue(op: &ConvOp, y: &mut [f32], residual: Option<&[f32]>, threads: usize) {
    if !op.has_residual_or_bias && !op.relu {
        return;
    }
    let k = op.ys.c;
    let rows_per_task = ROWS_PER_TASK.max(op.rows().div_ceil(threads * 4));
    let task = |(t, chunk): (usize, &mut [f32])| {
        let start = t * rows_per_task * k;
        let res = residual.map(|r| &r[start..start + chunk.len()]);
        epilogue_rows(chunk, &op.bias, res, op.relu);
    };
    if threads > 1 && op.rows() > rows_per_task {
        y.par_chunks_mut(rows_per_task * k)
            .enumerate()
            .for_each(task);
    } else {
        y.chunks_mut(rows_per_task * k).enumerate().for_each(task);
    }
}

fn epilogue_rows(y: &mut [f32], bias: &[f32], residual: Option<&[f32]>, relu: bool) {
    let floor = if relu { 0.0 } else { f32::NEG_INFINITY };
    match residual {
        Some(res) => {
            for (yr, rr) in y
                .chunks_exact_mut(bias.len())
                .zip(res.chunks_exact(bias.len()))
            {
                for ((v, b), r) in yr.iter_mut().zip(bias).zip(rr) {
                    *v = (*v + b + r).max(floor);
                }
            }
        }
        None => {
            for yr in y.chunks_exact_mut(bias.len()) {
                for (v, b) in yr.iter_mut().zip(bias) {
                    *v = (*v + b).max(floor);
                }
            }
        }
    }
}

fn run_pool(op: &PoolOp, input: &[f32], output: &mut [f32], slab: &mut [f32]) {
    let views = Views::new(input, output, slab, &op.y);
    let x = views.read(&op.x);
    match op.kind {
        PoolKind::Max3x3Stride2 => max_pool_3x3_s2(op.xs, op.ys, x, views.y),
        PoolKind::GlobalAverage => global_average(op.xs, x, views.y),
    }
}

/// 3x3 max pooling, stride 2, padding 1 (padding never wins: every window holds a real pixel).
fn max_pool_3x3_s2(xs: Shape, ys: Shape, x: &[f32], y: &mut [f32]) {
    const K: usize = 3;
    const STRIDE: usize = 2;
    const PAD: usize = 1;
    let c = xs.c;
    // One task per output row of one image.
    y.par_chunks_mut(ys.w * c)
        .enumerate()
        .for_each(|(row, out_row)| {
            let (oh, n) = (row % ys.h, row / ys.h);
            out_row.fill(f32::NEG_INFINITY);
            for kh in 0..K {
                let ih = (oh * STRIDE + kh) as isize - PAD as isize;
                if ih < 0 || ih >= xs.h as isize {
                    continue;
                }
                let in_row = &x[((n * xs.h + ih as usize) * xs.w) * c..][..xs.w * c];
                for (ow, out) in out_row.chunks_exact_mut(c).enumerate() {
                    for kw in 0..K {
                        let iw = (ow * STRIDE + kw) as isize - PAD as isize;
                        if iw < 0 || iw >= xs.w as isize {
                            continue;
                        }
                        let px = &in_row[iw as usize * c..][..c];
                        for (o, v) in out.iter_mut().zip(px) {
                            *o = o.max(*v);
                        }
                    }
                }
            }
        });
}

/// Mean over H and W of each image and channel.
fn global_average(xs: Shape, x: &[f32], y: &mut [f32]) {
    let c = xs.c;
    let pixels = xs.h * xs.w;
    let scale = 1.0 / pixels as f32;
    for (img, out) in x.chunks_exact(pixels * c).zip(y.chunks_exact_mut(c)) {
        out.fill(0.0);
        for px in img.chunks_exact(c) {
            for (o, v) in out.iter_mut().zip(px) {
                *o += v;
            }
        }
        for o in out.iter_mut() {
            *o *= scale;
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Module};
    use candle_nn::VarBuilder;

    use super::*;
    use crate::{
        fused::graph::{Activation, GraphConfig, StemInput},
        input::{input_batch, INPUT_SEED},
        resnet::ResNet18,
        ModelWeights,
    };

    fn resnet(batch: usize, size: usize) -> (ModelWeights, NetGraph) {
        let w = ModelWeights::seeded(0).unwrap();
        let g = NetGraph::resnet18(
            &w,
            GraphConfig {
                batch,
                image_size: size,
                stem: StemInput::PLAIN,
                stem_chunk: None,
            },
        )
        .unwrap();
        (w, g)
    }

    fn run(g: &NetGraph, x: &Tensor, threads: usize) -> Vec<f32> {
        let mut exec = CpuExecutor::new(g, CpuExecConfig { threads }).unwrap();
        exec.set_input_nchw(x).unwrap();
        exec.forward();
        exec.output().to_vec()
    }

    /// max |got - want| / max |want|.
    fn rel_err(got: &[f32], want: &[f32]) -> f32 {
        assert_eq!(got.len(), want.len());
        let err = got
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        let scale = want.iter().map(|v| v.abs()).fold(0.0, f32::max);
        assert!(scale > 0.0, "reference is all zeros");
        err / scale
    }

    fn to_vec(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn logits_match_the_graph_interpreted_by_candle() {
        for (batch, size) in [(1, 32), (3, 32), (1, 64), (3, 64)] {
            let (_, g) = resnet(batch, size);
            let x = input_batch(INPUT_SEED, batch, size).unwrap();
            let want = to_vec(&g.forward_cpu(&x).unwrap());
            let got = run(&g, &x, 2);
            let e = rel_err(&got, &want);
            assert!(e < 1e-5, "batch {batch}, {size}px: relative error {e}");
        }
    }

    #[test]
    fn logits_match_the_unfolded_candle_model() {
        let (batch, size) = (3, 64);
        let (w, g) = resnet(batch, size);
        let vb = VarBuilder::from_tensors(w.tensors.clone(), DType::F32, &Device::Cpu);
        let reference = ResNet18::load(vb, false).unwrap();
        let x = input_batch(INPUT_SEED, batch, size).unwrap();
        let want = to_vec(&reference.forward(&x).unwrap());
        let got = run(&g, &x, 2);
        let e = rel_err(&got, &want);
        assert!(e < 1e-4, "relative error {e}");
    }

    #[test]
    fn one_thread_and_several_agree() {
        let (batch, size) = (3, 32);
        let (_, g) = resnet(batch, size);
        let x = input_batch(INPUT_SEED, batch, size).unwrap();
        let e = rel_err(&run(&g, &x, 1), &run(&g, &x, 3));
        assert!(e < 1e-5, "relative error {e}");
    }

    #[test]
    fn a_forward_leaves_no_state_behind() {
        let (batch, size) = (3, 32);
        let (_, g) = resnet(batch, size);
        let a = input_batch(INPUT_SEED, batch, size).unwrap();
        let b = input_batch(INPUT_SEED + 1, batch, size).unwrap();
        let mut exec = CpuExecutor::new(&g, CpuExecConfig { threads: 2 }).unwrap();
        exec.set_input_nchw(&a).unwrap();
        exec.forward();
        let first = exec.output().to_vec();
        exec.forward();
        assert_eq!(exec.output(), &first[..], "a second forward differs");
        // Another input in between changes the output, and leaves nothing behind.
        exec.set_input_nchw(&b).unwrap();
        exec.forward();
        assert_ne!(exec.output(), &first[..]);
        exec.set_input_nchw(&a).unwrap();
        exec.forward();
        assert_eq!(
            exec.output(),
            &first[..],
            "output after another input differs"
        );
    }

    /// A one-convolution graph, `x[N, C, H, W]` -> `y`, with residual and ReLU.
    fn single_conv(x: Shape, weight: Tensor, stride: usize, pad: usize) -> NetGraph {
        let (k, _, r, _) = weight.dims4().unwrap();
        let out = |d: usize| (d + 2 * pad - r) / stride + 1;
        let ys = Shape {
            n: x.n,
            h: out(x.h),
            w: out(x.w),
            c: k,
        };
        let act = |shape, place| Activation {
            shape,
            place,
            first_use: 0,
            last_use: 1,
        };
        NetGraph {
            acts: vec![
                act(x, Place::Input),
                act(ys, Place::Slab),
                act(ys, Place::Slab),
                act(ys, Place::Output),
            ],
            steps: vec![
                Step::Conv(ConvStep {
                    name: "a".into(),
                    weight: weight.clone(),
                    bias: Some(Tensor::arange(0f32, k as f32, &Device::Cpu).unwrap()),
                    stride,
                    pad,
                    x: 0,
                    y: 1,
                    residual: None,
                    relu: false,
                }),
                Step::Conv(ConvStep {
                    name: "b".into(),
                    weight: Tensor::eye(k, DType::F32, &Device::Cpu)
                        .unwrap()
                        .reshape((k, k, 1, 1))
                        .unwrap(),
                    bias: None,
                    stride: 1,
                    pad: 0,
                    x: 1,
                    y: 3,
                    residual: Some(1),
                    relu: true,
                }),
            ],
            input: 0,
            output: 3,
            stem_chunks: None,
        }
    }

    #[test]
    fn strided_padded_convolutions_match_candle_on_odd_sizes() {
        let dev = &Device::Cpu;
        for (c, k, r, stride, pad, hw) in
            [(3, 5, 7, 2, 3, 13), (4, 6, 3, 1, 1, 7), (5, 3, 1, 2, 0, 9)]
        {
            let n = 2;
            let x = Tensor::randn(0f32, 1.0, (n, c, hw, hw + 2), dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (k, c, r, r), dev).unwrap();
            let mut shape = Shape {
                n,
                h: hw,
                w: hw + 2,
                c,
            };
            let g = single_conv(shape, w.clone(), stride, pad);
            shape = g.acts[3].shape;
            let bias = Tensor::arange(0f32, k as f32, dev)
                .unwrap()
                .reshape((1, k, 1, 1))
                .unwrap();
            let a = x
                .conv2d(&w, pad, stride, 1, 1)
                .unwrap()
                .broadcast_add(&bias)
                .unwrap();
            // y = relu(a + a), NHWC.
            let want = to_vec(
                &(&a + &a)
                    .unwrap()
                    .relu()
                    .unwrap()
                    .permute((0, 2, 3, 1))
                    .unwrap(),
            );
            let mut exec = CpuExecutor::new(&g, CpuExecConfig { threads: 2 }).unwrap();
            exec.set_input_nchw(&x).unwrap();
            exec.forward();
            assert_eq!(exec.output().len(), shape.elems());
            let e = rel_err(exec.output(), &want);
            assert!(
                e < 1e-5,
                "c{c} k{k} r{r} s{stride} p{pad} {hw}px: relative error {e}"
            );
        }
    }

    #[test]
    fn an_input_that_does_not_fit_is_refused() {
        let (_, g) = resnet(2, 32);
        let mut exec = CpuExecutor::new(&g, CpuExecConfig { threads: 1 }).unwrap();
        let x = input_batch(INPUT_SEED, 1, 32).unwrap();
        assert!(exec.set_input_nchw(&x).is_err());
    }
}
