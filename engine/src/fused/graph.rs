//! ResNet18 as the fused path runs it: a list of steps over NHWC activations, with batch norm
//! folded into every convolution, each block's residual add and ReLU riding on its second
//! convolution, and every activation's liveness, from which [`NetGraph::memory_plan`] lays them
//! out in one slab.
//!
//! This is plain data with no CUDA in it, so CI checks it on every run: the shapes, the
//! liveness, the slab size, and (through [`NetGraph::forward_cpu`], which interprets the same
//! steps with Candle's CPU ops) that the folded graph computes what the unfolded model does.

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;

use crate::{
    memplan::plan_slab,
    resnet::{stem_max_pool, ConvBn, ResNet18},
    EngineError, ModelWeights,
};

/// An activation's shape, NHWC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
}

impl Shape {
    pub fn elems(&self) -> usize {
        self.n * self.h * self.w * self.c
    }
}

/// Where an activation lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// The input batch, in a buffer of its own (the host copies into it).
    Input,
    /// The logits, in a buffer of their own (the host reads them).
    Output,
    /// In the shared slab, at the offset the memory plan gives it.
    Slab,
    /// One chunk of activation `of` (see [`StemChunks`]): its shape is the chunk's, and chunk
    /// `k` lies `k` times its size past the start of `of`.
    Chunk { of: usize },
}

/// The stem and the max pool run over the batch `images` at a time, `count` times: steps
/// `0..STEM_CHUNK_STEPS` are repeated with every [`Place::Chunk`] activation moved on by one
/// chunk, and the stem's output, sized for one chunk, is reused by each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StemChunks {
    pub images: usize,
    pub count: usize,
}

/// How many of the graph's first steps a chunked stem repeats: the stem and the max pool.
pub const STEM_CHUNK_STEPS: usize = 2;

/// How many of the first steps repeat per chunk, and how many times: `(0, 0)` unchunked.
pub fn chunk_rounds(chunks: Option<StemChunks>) -> (usize, usize) {
    chunks.map_or((0, 0), |ch| (STEM_CHUNK_STEPS, ch.count))
}

/// One activation and the steps that use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Activation {
    pub shape: Shape,
    pub place: Place,
    /// Index of the first and last step that reads or writes it (inclusive).
    pub first_use: usize,
    pub last_use: usize,
}

/// A convolution with its epilogue: `y = act(conv(x, w) + b + residual)`.
#[derive(Debug, Clone)]
pub struct ConvStep {
    pub name: String,
    /// Folded weight, KCRS, f32. The stem's input channels are zero-padded to the input's.
    pub weight: Tensor,
    /// Folded bias [K], f32; a downsample's bias is moved into the block's second convolution.
    pub bias: Option<Tensor>,
    pub stride: usize,
    pub pad: usize,
    pub x: usize,
    pub y: usize,
    pub residual: Option<usize>,
    pub relu: bool,
}

/// The two pools of ResNet18.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolKind {
    /// 3x3 window, stride 2, padding 1 (after the stem).
    Max3x3Stride2,
    /// Global average over H and W.
    GlobalAverage,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStep {
    pub name: &'static str,
    pub kind: PoolKind,
    pub x: usize,
    pub y: usize,
}

#[derive(Debug, Clone)]
pub enum Step {
    Conv(ConvStep),
    Pool(PoolStep),
}

impl Step {
    pub fn name(&self) -> &str {
        match self {
            Step::Conv(c) => &c.name,
            Step::Pool(p) => p.name,
        }
    }

    /// Every activation the step reads or writes.
    pub fn uses(&self) -> Vec<usize> {
        match self {
            Step::Conv(c) => [Some(c.x), Some(c.y), c.residual]
                .into_iter()
                .flatten()
                .collect(),
            Step::Pool(p) => vec![p.x, p.y],
        }
    }
}

/// Channels the stem's 3-channel input is zero-padded to in the plain layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StemPad {
    C3,
    C4,
    C8,
}

impl StemPad {
    pub fn channels(self) -> usize {
        match self {
            StemPad::C3 => 3,
            StemPad::C4 => 4,
            StemPad::C8 => 8,
        }
    }
}

/// Channels of the space-to-depth stem input: its 12 real ones, or those zero-padded to 16.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum S2dChannels {
    C12,
    C16,
}

impl S2dChannels {
    pub fn channels(self) -> usize {
        match self {
            S2dChannels::C12 => 12,
            S2dChannels::C16 => 16,
        }
    }
}

/// How the input batch is stored for the stem, and so which convolution the stem is. Both
/// layouts compute the same stem output (`out x out x 64` with `out = (H - 1) / 2 + 1`); the
/// rest of the network does not see the difference.
///
/// The rearrangement of the input ([`StemInput::arrange_nchw`]) is host work on the batch, like
/// the channel padding has always been: the executors do it once when the batch is prepared,
/// and the timed forward pass starts from the stored layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StemInput {
    /// NHWC at the image's size, the 3 channels zero-padded to 3, 4 or 8; the stem is ResNet's
    /// 7x7 stride-2 convolution with padding 3.
    Padded(StemPad),
    /// Block-2 space-to-depth: the image is zero-padded by 4 at the top and left and by 2 or 3
    /// at the bottom and right to `2 * (out + 3)` a side, then every 2x2 block becomes one
    /// pixel of 12 channels in the order `(r_h, r_w, c)`: `S[m][(r_h*2 + r_w)*3 + c] =
    /// P[c][2m + r]`. The stem is then a 4x4 stride-1 convolution without padding over
    /// `(out + 3) x (out + 3) x 12` (channels zero-padded to 16 if asked), whose weight is the
    /// 7x7 one grown to 8x8 by a zero row and column at index 0 and rearranged the same way:
    /// `W[o][(r_h*2 + r_w)*3 + c][j_h][j_w] = w'[o][c][2j_h + r_h][2j_w + r_w]`. Per 224-pixel
    /// image that is 154 M multiply-adds with 12 channels (the real 118 M plus the 8x8 kernel's
    /// zero taps) and 206 M with 16, against 315 M for the 7x7 stem padded to 8 channels.
    SpaceToDepth(S2dChannels),
}

/// ResNet's stem, the one convolution [`StemInput::SpaceToDepth`] knows how to rewrite.
const STEM_KERNEL: usize = 7;
const STEM_STRIDE: usize = 2;
const STEM_PAD: usize = 3;
/// Zeros above and left of the image in the space-to-depth layout: the stem's padding plus the
/// zero row/column that grows the 7x7 kernel to 8x8.
const S2D_LEAD: usize = STEM_PAD + 1;

/// The stem as a convolution over a [`StemInput`]'s layout.
#[derive(Debug, Clone)]
pub struct StemConv {
    /// KCRS, with as many input channels as the layout stores.
    pub weight: Tensor,
    pub stride: usize,
    pub pad: usize,
}

impl StemInput {
    /// The layout every CPU path uses: 3 channels, nothing rearranged.
    pub const PLAIN: StemInput = StemInput::Padded(StemPad::C3);

    /// Channels of the stored input.
    pub fn channels(self) -> usize {
        match self {
            StemInput::Padded(p) => p.channels(),
            StemInput::SpaceToDepth(c) => c.channels(),
        }
    }

    /// `padded` or `s2d`, for results.
    pub fn layout_name(self) -> &'static str {
        match self {
            StemInput::Padded(_) => "padded",
            StemInput::SpaceToDepth(_) => "s2d",
        }
    }

    /// Height (or width) of the stored input for images of `size` pixels a side.
    pub fn input_size(self, size: usize) -> usize {
        match self {
            StemInput::Padded(_) => size,
            StemInput::SpaceToDepth(_) => s2d_blocks(size),
        }
    }

    /// The batch `x` (NCHW, f32, 3 channels; for [`StemInput::Padded`] also up to its channel
    /// count) as this layout stores it, still NCHW.
    pub fn arrange_nchw(self, x: &Tensor) -> Result<Tensor, EngineError> {
        let (n, c, h, w) = x.dims4()?;
        let want = self.channels();
        match self {
            StemInput::Padded(_) => {
                if c > want {
                    return Err(EngineError::Unsupported(format!(
                        "a {c}-channel input does not fit a stem padded to {want} channels"
                    )));
                }
                Ok(x.pad_with_zeros(1, 0, want - c)?)
            }
            StemInput::SpaceToDepth(_) => {
                if c != 3 {
                    return Err(EngineError::Unsupported(format!(
                        "the space-to-depth stem rearranges a 3-channel image, not {c} channels"
                    )));
                }
                let (mh, mw) = (s2d_blocks(h), s2d_blocks(w));
                // P: S2D_LEAD zeros before, enough after for 2*M a side (2 or 3).
                let p = x
                    .pad_with_zeros(2, S2D_LEAD, 2 * mh - S2D_LEAD - h)?
                    .pad_with_zeros(3, S2D_LEAD, 2 * mw - S2D_LEAD - w)?;
                // [n, c, m_h, r_h, m_w, r_w] -> [n, r_h, r_w, c, m_h, m_w] -> 4c channels.
                let s = p
                    .reshape((n, c, mh, 2, mw, 2))?
                    .permute((0, 3, 5, 1, 2, 4))?
                    .reshape((n, 4 * c, mh, mw))?;
                Ok(s.pad_with_zeros(1, 0, want - 4 * c)?)
            }
        }
    }

    /// The same as [`StemInput::arrange_nchw`], NHWC and contiguous: what the executors store.
    pub fn arrange_nhwc(self, x: &Tensor) -> Result<Tensor, EngineError> {
        Ok(self.arrange_nchw(x)?.permute((0, 2, 3, 1))?.contiguous()?)
    }

    /// The stem convolution (weight `w`, KCRS, and its stride and padding) rewritten to read
    /// this layout.
    pub fn stem_conv(self, w: &Tensor, stride: usize, pad: usize) -> Result<StemConv, EngineError> {
        let (k, c, r, s) = w.dims4()?;
        let want = self.channels();
        match self {
            StemInput::Padded(_) => {
                if c > want {
                    return Err(EngineError::Unsupported(format!(
                        "a stem of {c} input channels does not fit a padding to {want}"
                    )));
                }
                Ok(StemConv {
                    weight: w.pad_with_zeros(1, 0, want - c)?,
                    stride,
                    pad,
                })
            }
            StemInput::SpaceToDepth(_) => {
                if (c, r, s, stride, pad) != (3, STEM_KERNEL, STEM_KERNEL, STEM_STRIDE, STEM_PAD) {
                    return Err(EngineError::Unsupported(format!(
                        "the space-to-depth stem rewrites a 3-channel 7x7 stride-2 pad-3 \
                         convolution, not {c} channels {r}x{s} stride {stride} pad {pad}"
                    )));
                }
                let k8 = STEM_KERNEL + 1;
                // w'[k'] = w[k' - 1], w'[0] = 0, in both spatial dimensions.
                let grown = w.pad_with_zeros(2, 1, 0)?.pad_with_zeros(3, 1, 0)?;
                // [k, c, j_h, r_h, j_w, r_w] -> [k, r_h, r_w, c, j_h, j_w] -> 4c channels.
                let weight = grown
                    .reshape((k, c, k8 / 2, 2, k8 / 2, 2))?
                    .permute((0, 3, 5, 1, 2, 4))?
                    .reshape((k, 4 * c, k8 / 2, k8 / 2))?
                    .pad_with_zeros(1, 0, want - 4 * c)?;
                Ok(StemConv {
                    weight,
                    stride: 1,
                    pad: 0,
                })
            }
        }
    }
}

/// Channels of the stem's output in ResNet18.
const STEM_OUT_CHANNELS: usize = 64;

/// Bytes per image, in elements of `elem_bytes`, of what a chunked stem cuts into chunks, for
/// images of `size` pixels a side stored as `stem` lays them out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StemImageBytes {
    /// The stored input: chunks of it are views.
    pub input: usize,
    /// The stem's output (the same for every layout): one chunk of it is kept.
    pub stem_out: usize,
    /// The max pool's output: chunks of it are views.
    pub pooled: usize,
}

impl StemImageBytes {
    pub fn new(stem: StemInput, size: usize, elem_bytes: usize) -> Self {
        let side = stem.input_size(size);
        let out = out_dim(size, STEM_KERNEL, STEM_STRIDE, STEM_PAD);
        let pooled = out_dim(out, 3, 2, 1);
        StemImageBytes {
            input: side * side * stem.channels() * elem_bytes,
            stem_out: out * out * STEM_OUT_CHANNELS * elem_bytes,
            pooled: pooled * pooled * STEM_OUT_CHANNELS * elem_bytes,
        }
    }
}

/// Side of the space-to-depth input for an image side of `size`: the stem's output side plus
/// the 4x4 kernel's 3.
fn s2d_blocks(size: usize) -> usize {
    out_dim(size, STEM_KERNEL, STEM_STRIDE, STEM_PAD) + 3
}

/// What the graph is built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GraphConfig {
    pub batch: usize,
    pub image_size: usize,
    /// How the input is stored for the stem. The CPU paths use [`StemInput::PLAIN`].
    pub stem: StemInput,
    /// Images per chunk of the stem and max pool ([`StemChunks`]); `None` runs the batch at
    /// once. It must divide the batch and be smaller than it.
    pub stem_chunk: Option<usize>,
}

impl GraphConfig {
    /// The chunking asked for, checked against the batch.
    fn chunks(&self) -> Result<Option<StemChunks>, EngineError> {
        match self.stem_chunk {
            None => Ok(None),
            Some(c) if c > 0 && c < self.batch && self.batch.is_multiple_of(c) => {
                Ok(Some(StemChunks {
                    images: c,
                    count: self.batch / c,
                }))
            }
            Some(c) => Err(EngineError::Unsupported(format!(
                "a stem chunk of {c} images must be smaller than the batch of {} and divide it",
                self.batch
            ))),
        }
    }
}

/// The network as a list of steps over activations.
#[derive(Debug, Clone)]
pub struct NetGraph {
    pub acts: Vec<Activation>,
    pub steps: Vec<Step>,
    pub input: usize,
    pub output: usize,
    /// Whether the first [`STEM_CHUNK_STEPS`] steps run chunk by chunk.
    pub stem_chunks: Option<StemChunks>,
}

/// Where each slab activation sits, and how big the slab is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryPlan {
    /// Byte offset in the slab of each activation; `None` for the input and output.
    pub offsets: Vec<Option<usize>>,
    pub slab_bytes: usize,
}

/// The buffer an activation's bytes are in: a [`Place`] less the chunk, which is always in its
/// whole's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Home {
    Input,
    Output,
    Slab,
}

/// Where an activation's bytes are, for an executor: its buffer and its byte offset there,
/// which for a chunk moves on by `chunk_stride` per chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub home: Home,
    pub offset: usize,
    /// Bytes between one chunk and the next (the chunk's own size); 0 for whole activations.
    pub chunk_stride: usize,
}

impl Location {
    /// The byte offset in `home` for chunk `chunk` of a chunked stem (any chunk for a whole
    /// activation).
    pub fn at(&self, chunk: usize) -> usize {
        self.offset + chunk * self.chunk_stride
    }
}

/// Where a convolution's bias comes from.
enum BiasSource<'a> {
    /// No bias: a downsample, whose bias moves to the block's second convolution.
    None,
    Folded,
    /// The folded bias plus another (the downsample's).
    FoldedPlus(&'a Tensor),
}

/// One convolution of the model as it enters the graph, named field by field.
struct ConvConfig<'a> {
    name: String,
    layer: &'a ConvBn,
    x: usize,
    residual: Option<usize>,
    relu: bool,
    bias: BiasSource<'a>,
    /// The stem: its convolution is rewritten for the input's layout.
    stem: Option<StemInput>,
}

fn out_dim(input: usize, kernel: usize, stride: usize, pad: usize) -> usize {
    (input + 2 * pad - kernel) / stride + 1
}

fn pool_shape(kind: PoolKind, s: Shape) -> Shape {
    match kind {
        PoolKind::Max3x3Stride2 => Shape {
            h: out_dim(s.h, 3, 2, 1),
            w: out_dim(s.w, 3, 2, 1),
            ..s
        },
        PoolKind::GlobalAverage => Shape { h: 1, w: 1, ..s },
    }
}

#[derive(Default)]
struct Builder {
    acts: Vec<Activation>,
    steps: Vec<Step>,
}

impl Builder {
    fn act(&mut self, shape: Shape, place: Place) -> usize {
        self.acts.push(Activation {
            shape,
            place,
            first_use: usize::MAX,
            last_use: 0,
        });
        self.acts.len() - 1
    }

    fn push(&mut self, step: Step) {
        let at = self.steps.len();
        for a in step.uses() {
            // A chunk's use is a use of the whole activation: it must stay put while any of
            // its chunks is read or written.
            let whole = match self.acts[a].place {
                Place::Chunk { of } => Some(of),
                _ => None,
            };
            for a in std::iter::once(a).chain(whole) {
                let act = &mut self.acts[a];
                act.first_use = act.first_use.min(at);
                act.last_use = act.last_use.max(at);
            }
        }
        self.steps.push(step);
    }

    fn conv(&mut self, cfg: ConvConfig<'_>) -> Result<usize, EngineError> {
        let (weight, folded_bias) = cfg.layer.folded()?;
        let conv = cfg.layer.conv().config();
        let StemConv {
            weight,
            stride,
            pad,
        } = match cfg.stem {
            Some(stem) => stem.stem_conv(&weight, conv.stride, conv.padding)?,
            None => StemConv {
                weight,
                stride: conv.stride,
                pad: conv.padding,
            },
        };
        let (k, c, r, s) = weight.dims4()?;
        let x = self.acts[cfg.x].shape;
        if x.c != c {
            return Err(EngineError::Unsupported(format!(
                "{}: a weight of {c} input channels over an input of {}",
                cfg.name, x.c
            )));
        }
        let y = self.act(
            Shape {
                n: x.n,
                h: out_dim(x.h, r, stride, pad),
                w: out_dim(x.w, s, stride, pad),
                c: k,
            },
            Place::Slab,
        );
        let bias = match cfg.bias {
            BiasSource::None => None,
            BiasSource::Folded => Some(folded_bias),
            BiasSource::FoldedPlus(extra) => Some((folded_bias + extra)?),
        };
        self.push(Step::Conv(ConvStep {
            name: cfg.name,
            weight,
            bias,
            stride,
            pad,
            x: cfg.x,
            y,
            residual: cfg.residual,
            relu: cfg.relu,
        }));
        Ok(y)
    }

    fn pool(&mut self, name: &'static str, kind: PoolKind, x: usize) -> usize {
        let y = self.act(pool_shape(kind, self.acts[x].shape), Place::Slab);
        self.push(Step::Pool(PoolStep { name, kind, x, y }));
        y
    }

    /// A pool over one chunk of the batch, writing its chunk of a whole-batch output of
    /// `batch` images, which is returned.
    fn chunked_pool(
        &mut self,
        name: &'static str,
        kind: PoolKind,
        x: usize,
        batch: usize,
    ) -> usize {
        let part = pool_shape(kind, self.acts[x].shape);
        let whole = self.act(Shape { n: batch, ..part }, Place::Slab);
        let y = self.act(part, Place::Chunk { of: whole });
        self.push(Step::Pool(PoolStep { name, kind, x, y }));
        whole
    }

    /// One basic block: conv1+ReLU, then conv2 with the residual, the downsample's bias and
    /// the final ReLU in its epilogue.
    fn block(
        &mut self,
        prefix: &str,
        block: &crate::resnet::BasicBlock,
        x: usize,
    ) -> Result<usize, EngineError> {
        let ds_bias = match &block.downsample {
            Some(ds) => Some(ds.folded()?.1),
            None => None,
        };
        let residual = match &block.downsample {
            Some(ds) => self.conv(ConvConfig {
                name: format!("{prefix}.ds"),
                layer: ds,
                x,
                residual: None,
                relu: false,
                bias: BiasSource::None,
                stem: None,
            })?,
            None => x,
        };
        let y1 = self.conv(ConvConfig {
            name: format!("{prefix}.c1"),
            layer: &block.conv1,
            x,
            residual: None,
            relu: true,
            bias: BiasSource::Folded,
            stem: None,
        })?;
        self.conv(ConvConfig {
            name: format!("{prefix}.c2"),
            layer: &block.conv2,
            x: y1,
            residual: Some(residual),
            relu: true,
            bias: match &ds_bias {
                Some(b) => BiasSource::FoldedPlus(b),
                None => BiasSource::Folded,
            },
            stem: None,
        })
    }
}

impl NetGraph {
    /// ResNet18 with `weights`, batch norm folded on the host in f32.
    pub fn resnet18(weights: &ModelWeights, cfg: GraphConfig) -> Result<Self, EngineError> {
        let vb = VarBuilder::from_tensors(weights.tensors.clone(), DType::F32, &Device::Cpu);
        let model = ResNet18::load(vb, true)?;
        let stem_chunks = cfg.chunks()?;
        let mut b = Builder::default();
        let input_shape = Shape {
            n: cfg.batch,
            h: cfg.stem.input_size(cfg.image_size),
            w: cfg.stem.input_size(cfg.image_size),
            c: cfg.stem.channels(),
        };
        let input = b.act(input_shape, Place::Input);
        let stem_x = match stem_chunks {
            Some(ch) => b.act(
                Shape {
                    n: ch.images,
                    ..input_shape
                },
                Place::Chunk { of: input },
            ),
            None => input,
        };
        // The stem's output has its input's batch: one chunk's when chunked.
        let stem = b.conv(ConvConfig {
            name: "stem".into(),
            layer: &model.stem,
            x: stem_x,
            residual: None,
            relu: true,
            bias: BiasSource::Folded,
            stem: Some(cfg.stem),
        })?;
        let mut x = match stem_chunks {
            Some(_) => b.chunked_pool("maxpool", PoolKind::Max3x3Stride2, stem, cfg.batch),
            None => b.pool("maxpool", PoolKind::Max3x3Stride2, stem),
        };
        for (li, layer) in model.layers.iter().enumerate() {
            for (bi, block) in layer.iter().enumerate() {
                x = b.block(&format!("l{}.{}", li + 1, bi), block, x)?;
            }
        }
        let avg = b.pool("avgpool", PoolKind::GlobalAverage, x);
        let classes = model.fc.weight().dim(0)?;
        let output = b.act(
            Shape {
                n: cfg.batch,
                h: 1,
                w: 1,
                c: classes,
            },
            Place::Output,
        );
        let fc_in = model.fc.weight().dim(1)?;
        b.push(Step::Conv(ConvStep {
            name: "fc".into(),
            weight: model.fc.weight().reshape((classes, fc_in, 1, 1))?,
            bias: model.fc.bias().cloned(),
            stride: 1,
            pad: 0,
            x: avg,
            y: output,
            residual: None,
            relu: false,
        }));
        let mut acts = b.acts;
        if stem_chunks.is_some() {
            // The chunked steps run again and again: whatever they touch is live through all
            // of them, so no activation they use shares memory with another they use.
            for a in acts.iter_mut().filter(|a| a.first_use < STEM_CHUNK_STEPS) {
                a.first_use = 0;
                a.last_use = a.last_use.max(STEM_CHUNK_STEPS - 1);
            }
        }
        Ok(NetGraph {
            acts,
            steps: b.steps,
            input,
            output,
            stem_chunks,
        })
    }

    /// Lays the slab activations out by liveness, for elements of `elem_bytes` bytes.
    pub fn memory_plan(&self, elem_bytes: usize) -> MemoryPlan {
        self.memory_plan_without(elem_bytes, &[])
    }

    /// [`Self::memory_plan`] with the activations in `unstored` taking no bytes: steps fused
    /// together never write them (the stem's output, when one kernel does the stem and the
    /// max pool). They keep an offset, which nothing may read or write.
    pub fn memory_plan_without(&self, elem_bytes: usize, unstored: &[usize]) -> MemoryPlan {
        let slab: Vec<usize> = (0..self.acts.len())
            .filter(|&i| self.acts[i].place == Place::Slab)
            .collect();
        let sizes: Vec<(usize, usize, usize)> = slab
            .iter()
            .map(|&i| {
                let a = &self.acts[i];
                let bytes = if unstored.contains(&i) {
                    0
                } else {
                    a.shape.elems() * elem_bytes
                };
                (bytes, a.first_use, a.last_use)
            })
            .collect();
        let (placed, slab_bytes) = plan_slab(&sizes);
        let mut offsets = vec![None; self.acts.len()];
        for (k, &i) in slab.iter().enumerate() {
            offsets[i] = Some(placed[k]);
        }
        MemoryPlan {
            offsets,
            slab_bytes,
        }
    }

    /// Every activation's [`Location`] under `plan`, for elements of `elem_bytes` bytes.
    pub fn locations(&self, plan: &MemoryPlan, elem_bytes: usize) -> Vec<Location> {
        let base = |a: usize| match self.acts[a].place {
            Place::Slab => (
                Home::Slab,
                plan.offsets[a].expect("the memory plan places every slab activation"),
            ),
            Place::Input => (Home::Input, 0),
            Place::Output => (Home::Output, 0),
            Place::Chunk { .. } => unreachable!("a chunk's whole is never itself a chunk"),
        };
        self.acts
            .iter()
            .enumerate()
            .map(|(a, act)| {
                // The builder makes every chunk's whole a whole activation.
                let (whole, chunk_stride) = match act.place {
                    Place::Chunk { of } => (of, act.shape.elems() * elem_bytes),
                    _ => (a, 0),
                };
                let (home, offset) = base(whole);
                Location {
                    home,
                    offset,
                    chunk_stride,
                }
            })
            .collect()
    }

    /// Runs the steps with Candle's CPU ops in f32, NCHW: the same arithmetic the GPU executor
    /// does, for checking the graph itself. `x` is NCHW in the stem's layout (see
    /// [`StemInput::arrange_nchw`]).
    pub fn forward_cpu(&self, x: &Tensor) -> Result<Tensor, EngineError> {
        let mut vals: Vec<Option<Tensor>> = vec![None; self.acts.len()];
        vals[self.input] = Some(x.clone());
        let (chunked, rounds) = chunk_rounds(self.stem_chunks);
        // The chunked steps, chunk by chunk: a chunk read is cut from its whole activation, a
        // chunk written is gathered and joined into it afterwards.
        let chunks: Vec<(usize, usize, bool)> = self
            .acts
            .iter()
            .enumerate()
            .filter_map(|(a, act)| match act.place {
                Place::Chunk { of } => Some((a, of, vals[of].is_some())),
                _ => None,
            })
            .collect();
        let mut parts: Vec<Vec<Tensor>> = vec![Vec::new(); self.acts.len()];
        for k in 0..rounds {
            for &(a, of, read) in &chunks {
                if read {
                    let n = self.acts[a].shape.n;
                    vals[a] = Some(get_val(&vals, of)?.narrow(0, k * n, n)?);
                }
            }
            for step in &self.steps[..chunked] {
                self.step_cpu(step, &mut vals)?;
            }
            for &(a, of, read) in &chunks {
                if !read {
                    parts[of].push(get_val(&vals, a)?);
                }
            }
        }
        for (a, p) in parts.iter().enumerate() {
            if !p.is_empty() {
                vals[a] = Some(Tensor::cat(p, 0)?);
            }
        }
        for step in &self.steps[chunked..] {
            self.step_cpu(step, &mut vals)?;
        }
        Ok(get_val(&vals, self.output)?.flatten_from(1)?)
    }

    /// One step of [`NetGraph::forward_cpu`].
    fn step_cpu(&self, step: &Step, vals: &mut [Option<Tensor>]) -> Result<(), EngineError> {
        match step {
            Step::Conv(c) => {
                let mut y = get_val(vals, c.x)?.conv2d(&c.weight, c.pad, c.stride, 1, 1)?;
                if let Some(b) = &c.bias {
                    y = y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?)?;
                }
                if let Some(r) = c.residual {
                    y = (y + get_val(vals, r)?)?;
                }
                if c.relu {
                    y = y.relu()?;
                }
                vals[c.y] = Some(y);
            }
            Step::Pool(p) => {
                let x = get_val(vals, p.x)?;
                vals[p.y] = Some(match p.kind {
                    PoolKind::Max3x3Stride2 => stem_max_pool(&x)?,
                    PoolKind::GlobalAverage => {
                        x.mean_keepdim(D::Minus1)?.mean_keepdim(D::Minus2)?
                    }
                });
            }
        }
        Ok(())
    }
}

fn get_val(vals: &[Option<Tensor>], i: usize) -> Result<Tensor, EngineError> {
    vals[i]
        .clone()
        .ok_or_else(|| EngineError::Unsupported(format!("activation {i} read before written")))
}

#[cfg(test)]
mod tests {
    use candle_core::Module;

    use super::*;
    use crate::input::{input_batch, INPUT_SEED};

    const PAD3: StemInput = StemInput::Padded(StemPad::C3);
    const PAD4: StemInput = StemInput::Padded(StemPad::C4);
    const PAD8: StemInput = StemInput::Padded(StemPad::C8);
    const S2D12: StemInput = StemInput::SpaceToDepth(S2dChannels::C12);
    const S2D16: StemInput = StemInput::SpaceToDepth(S2dChannels::C16);

    fn graph(batch: usize, size: usize, stem: StemInput) -> NetGraph {
        graph_chunked(batch, size, stem, None)
    }

    fn graph_chunked(batch: usize, size: usize, stem: StemInput, chunk: Option<usize>) -> NetGraph {
        let w = ModelWeights::seeded(0).unwrap();
        NetGraph::resnet18(
            &w,
            GraphConfig {
                batch,
                image_size: size,
                stem,
                stem_chunk: chunk,
            },
        )
        .unwrap()
    }

    /// Largest absolute difference over the largest absolute value of `want`.
    fn rel_err(got: &Tensor, want: &Tensor) -> f32 {
        assert_eq!(got.dims(), want.dims());
        let max = |t: &Tensor| {
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        max(&(got - want).unwrap()) / max(want)
    }

    #[test]
    fn shapes_follow_resnet18() {
        let g = graph(4, 224, PAD8);
        let shape = |name: &str| {
            let s = g.steps.iter().find(|s| s.name() == name).unwrap();
            let y = match s {
                Step::Conv(c) => c.y,
                Step::Pool(p) => p.y,
            };
            let s = g.acts[y].shape;
            (s.n, s.h, s.w, s.c)
        };
        assert_eq!(g.acts[g.input].shape.c, 8);
        assert_eq!(shape("stem"), (4, 112, 112, 64));
        assert_eq!(shape("maxpool"), (4, 56, 56, 64));
        assert_eq!(shape("l1.1.c2"), (4, 56, 56, 64));
        assert_eq!(shape("l2.0.ds"), (4, 28, 28, 128));
        assert_eq!(shape("l4.1.c2"), (4, 7, 7, 512));
        assert_eq!(shape("avgpool"), (4, 1, 1, 512));
        assert_eq!(shape("fc"), (4, 1, 1, 1000));
        // 1 stem + 16 block convolutions + 3 downsamples + fc, and 2 pools.
        let convs = g
            .steps
            .iter()
            .filter(|s| matches!(s, Step::Conv(_)))
            .count();
        assert_eq!((convs, g.steps.len()), (21, 23));
        // The stem's weight is padded to the input's channels; the others are untouched.
        let Step::Conv(stem) = &g.steps[0] else {
            panic!()
        };
        assert_eq!(stem.weight.dims4().unwrap(), (64, 8, 7, 7));
        // Downsamples carry no bias: theirs rides on the block's second convolution.
        for s in &g.steps {
            if let Step::Conv(c) = s {
                assert_eq!(c.bias.is_none(), c.name.ends_with(".ds"), "{}", c.name);
                assert_eq!(c.residual.is_some(), c.name.ends_with(".c2"), "{}", c.name);
            }
        }
    }

    #[test]
    fn every_activation_is_alive_exactly_from_its_writer_to_its_last_reader() {
        let g = graph(1, 224, PAD4);
        for (i, a) in g.acts.iter().enumerate() {
            let users: Vec<usize> = (0..g.steps.len())
                .filter(|&s| g.steps[s].uses().contains(&i))
                .collect();
            assert_eq!(a.first_use, users[0], "activation {i}");
            assert_eq!(a.last_use, *users.last().unwrap(), "activation {i}");
            if i != g.input {
                // Written by its first user.
                let writer = match &g.steps[a.first_use] {
                    Step::Conv(c) => c.y,
                    Step::Pool(p) => p.y,
                };
                assert_eq!(writer, i, "activation {i} is read before it is written");
            }
        }
        // A residual stays alive across the block's first convolution.
        let c2 = g.steps.iter().position(|s| s.name() == "l1.0.c2").unwrap();
        let Step::Conv(c) = &g.steps[c2] else {
            panic!()
        };
        assert_eq!(g.acts[c.residual.unwrap()].last_use, c2);
    }

    /// Checks that every slab activation of `g` fits `plan`'s slab with its `bytes`, and that no
    /// two live at the same step share a byte; returns the slab activations.
    fn assert_live_activations_apart(
        g: &NetGraph,
        plan: &MemoryPlan,
        bytes: &dyn Fn(usize) -> usize,
    ) -> Vec<usize> {
        let slab: Vec<usize> = (0..g.acts.len())
            .filter(|&i| g.acts[i].place == Place::Slab)
            .collect();
        for (n, &i) in slab.iter().enumerate() {
            let oi = plan.offsets[i].unwrap();
            assert!(oi + bytes(i) <= plan.slab_bytes);
            for &j in &slab[..n] {
                let (a, b) = (&g.acts[i], &g.acts[j]);
                let together = a.first_use <= b.last_use && b.first_use <= a.last_use;
                let oj = plan.offsets[j].unwrap();
                let apart = oi + bytes(i) <= oj || oj + bytes(j) <= oi;
                assert!(!together || apart, "activations {i} and {j} overlap");
            }
        }
        slab
    }

    #[test]
    fn an_unstored_stem_output_leaves_the_slab_to_the_other_activations() {
        let g = graph(256, 224, S2D16);
        let stem_out = match &g.steps[0] {
            Step::Conv(c) => c.y,
            _ => panic!("the stem is the first step"),
        };
        let whole = g.memory_plan(2);
        let plan = g.memory_plan_without(2, &[stem_out]);
        // 256 x 112 x 112 x 64 f16 no longer sits beside the pooled 256 x 56 x 56 x 64.
        assert_eq!(whole.slab_bytes, 256 * (112 * 112 + 56 * 56) * 64 * 2);
        // What is left is layer 1's widest moment: its block input, the first convolution's
        // output and the block's output, each 256 x 56 x 56 x 64.
        assert_eq!(plan.slab_bytes, 3 * 256 * 56 * 56 * 64 * 2);
        // Every other activation still has its own bytes while it is live.
        let bytes = |i: usize| {
            if i == stem_out {
                0
            } else {
                g.acts[i].shape.elems() * 2
            }
        };
        let slab = assert_live_activations_apart(&g, &plan, &bytes);
        // The fused kernel writes the pooled output at the stem's step, a step before its own
        // first use: nothing else in the slab may be live there (the stem's input is in the
        // input buffer, and the stem's output is not stored).
        let pooled = match &g.steps[1] {
            Step::Pool(p) => p.y,
            _ => panic!("the max pool is the second step"),
        };
        let (po, pb) = (plan.offsets[pooled].unwrap(), bytes(pooled));
        for &i in &slab {
            let a = &g.acts[i];
            if i == pooled || a.first_use > 1 {
                continue;
            }
            let oi = plan.offsets[i].unwrap();
            assert!(
                oi + bytes(i) <= po || po + pb <= oi,
                "activation {i} overlaps the pooled output while the kernel writes it"
            );
        }
    }

    #[test]
    fn the_slab_holds_the_largest_live_set_and_never_overlaps_live_tensors() {
        let g = graph(8, 224, PAD8);
        let elem = 2;
        let plan = g.memory_plan(elem);
        let aligned = |b: usize| b.div_ceil(256) * 256;
        let bytes = |i: usize| g.acts[i].shape.elems() * elem;
        let slab = assert_live_activations_apart(&g, &plan, &bytes);
        let live_at = |s: usize| {
            slab.iter()
                .filter(|&&i| g.acts[i].first_use <= s && s <= g.acts[i].last_use)
                .map(|&i| aligned(bytes(i)))
                .sum::<usize>()
        };
        let floor = (0..g.steps.len()).map(live_at).max().unwrap();
        let sum: usize = slab.iter().map(|&i| aligned(bytes(i))).sum();
        assert!(plan.slab_bytes >= floor, "{} < {floor}", plan.slab_bytes);
        assert!(
            plan.slab_bytes < sum / 2,
            "{} vs sum {sum}",
            plan.slab_bytes
        );
        // The largest live set is the stem output with the max pool's output: 8 images of
        // 112x112x64 and 56x56x64 in f16.
        assert_eq!(floor, 8 * (112 * 112 + 56 * 56) * 64 * 2);
        assert_eq!(
            plan.slab_bytes, floor,
            "the greedy plan reaches the floor here"
        );
        assert_eq!(plan.offsets[g.input], None);
        assert_eq!(plan.offsets[g.output], None);
    }

    #[test]
    fn the_folded_graph_computes_what_the_unfolded_model_does() {
        let w = ModelWeights::seeded(0).unwrap();
        let vb = VarBuilder::from_tensors(w.tensors.clone(), DType::F32, &Device::Cpu);
        let reference = ResNet18::load(vb, false).unwrap();
        let batch = 2;
        // 64 as before; 33 is odd, so the space-to-depth padding differs at the bottom/right.
        for size in [64, 33] {
            let x = input_batch(INPUT_SEED, batch, size).unwrap();
            let want = reference.forward(&x).unwrap();
            for stem in [PAD3, PAD4, PAD8, S2D12, S2D16] {
                let g = NetGraph::resnet18(
                    &w,
                    GraphConfig {
                        batch,
                        image_size: size,
                        stem,
                        stem_chunk: None,
                    },
                )
                .unwrap();
                let got = g.forward_cpu(&stem.arrange_nchw(&x).unwrap()).unwrap();
                assert_eq!(got.dims(), &[batch, 1000]);
                let err = rel_err(&got, &want);
                assert!(err < 1e-4, "stem {stem:?}, {size} px: relative error {err}");
            }
        }
    }

    fn chunked(batch: usize, size: usize, stem: StemInput, chunk: usize) -> NetGraph {
        graph_chunked(batch, size, stem, Some(chunk))
    }

    #[test]
    fn a_chunked_stem_computes_what_the_whole_batch_does() {
        let batch = 4;
        for size in [64, 33] {
            let x = input_batch(INPUT_SEED, batch, size).unwrap();
            for stem in [PAD8, S2D16] {
                let x = stem.arrange_nchw(&x).unwrap();
                let want = graph(batch, size, stem).forward_cpu(&x).unwrap();
                for chunk in [1, 2] {
                    let g = chunked(batch, size, stem, chunk);
                    assert_eq!(
                        g.stem_chunks,
                        Some(StemChunks {
                            images: chunk,
                            count: batch / chunk
                        })
                    );
                    let got = g.forward_cpu(&x).unwrap();
                    let err = rel_err(&got, &want);
                    assert!(err < 1e-6, "{stem:?} {size} px, chunk {chunk}: {err}");
                }
            }
        }
    }

    #[test]
    fn a_chunked_stem_keeps_one_chunk_of_its_output_and_the_pool_output_whole() {
        let (batch, chunk) = (8, 2);
        let whole = graph(batch, 224, PAD8);
        let g = chunked(batch, 224, PAD8, chunk);
        let Step::Conv(stem) = &g.steps[0] else {
            panic!()
        };
        let Step::Pool(pool) = &g.steps[1] else {
            panic!()
        };
        let x = g.acts[stem.x];
        assert_eq!(x.place, Place::Chunk { of: g.input });
        assert_eq!((x.shape.n, g.acts[stem.y].shape.n), (chunk, chunk));
        assert_eq!(g.acts[stem.y].place, Place::Slab);
        let Place::Chunk { of: pooled } = g.acts[pool.y].place else {
            panic!("the pool writes a chunk")
        };
        assert_eq!(g.acts[pool.y].shape.n, chunk);
        assert_eq!(g.acts[pooled].shape.n, batch);
        // The whole pooled output is live from the first chunk's stem to layer 1's last read.
        assert_eq!(g.acts[pooled].first_use, 0);
        let Step::Conv(next) = &g.steps[2] else {
            panic!()
        };
        assert_eq!(next.x, pooled);
        // ... so the memory plan keeps it apart from the stem's output, and the slab shrinks:
        // the stem's output is a quarter of what it was.
        let plan = g.memory_plan(2);
        let (a, b) = (stem.y, pooled);
        let (oa, ob) = (plan.offsets[a].unwrap(), plan.offsets[b].unwrap());
        let bytes = |i: usize| g.acts[i].shape.elems() * 2;
        assert!(oa + bytes(a) <= ob || ob + bytes(b) <= oa);
        let before = whole.memory_plan(2).slab_bytes;
        assert!(
            plan.slab_bytes < before * 3 / 4,
            "{} vs {before}",
            plan.slab_bytes
        );
        // Chunks are views: the slab holds only their whole activations.
        assert_eq!((plan.offsets[stem.x], plan.offsets[pool.y]), (None, None));
    }

    #[test]
    fn the_stem_byte_counts_are_the_graphs() {
        for (size, stem) in [(224, PAD8), (224, S2D16), (33, S2D12), (225, PAD3)] {
            let g = graph(1, size, stem);
            let (Step::Conv(c), Step::Pool(p)) = (&g.steps[0], &g.steps[1]) else {
                panic!()
            };
            let bytes = |a: usize| g.acts[a].shape.elems() * 2;
            let want = StemImageBytes {
                input: bytes(c.x),
                stem_out: bytes(c.y),
                pooled: bytes(p.y),
            };
            assert_eq!(StemImageBytes::new(stem, size, 2), want, "{stem:?} {size}");
        }
    }

    #[test]
    fn every_chunk_lies_inside_its_whole_and_the_chunks_tile_it() {
        let (batch, chunk, elem) = (8, 2, 2);
        let g = chunked(batch, 224, S2D16, chunk);
        let plan = g.memory_plan(elem);
        let locs = g.locations(&plan, elem);
        let bytes = |a: usize| g.acts[a].shape.elems() * elem;
        let count = batch / chunk;
        let mut chunks_seen = 0;
        for (a, act) in g.acts.iter().enumerate() {
            let Place::Chunk { of } = act.place else {
                // Whole activations stay put, slab ones where the plan put them.
                assert_eq!(locs[a].chunk_stride, 0);
                assert_eq!(locs[a].at(3), locs[a].at(0));
                if act.place == Place::Slab {
                    assert_eq!(
                        (locs[a].home, Some(locs[a].at(0))),
                        (Home::Slab, plan.offsets[a])
                    );
                }
                continue;
            };
            chunks_seen += 1;
            let whole = locs[of];
            assert_eq!(locs[a].home, whole.home);
            assert_eq!(bytes(a) * count, bytes(of));
            // Chunk k is the k-th slice of the whole, end to end.
            for k in 0..count {
                let start = locs[a].at(k);
                assert_eq!(
                    start,
                    whole.at(0) + k * bytes(a),
                    "activation {a}, chunk {k}"
                );
                assert!(start + bytes(a) <= whole.at(0) + bytes(of));
            }
        }
        // The stem's input and the pool's output.
        assert_eq!(chunks_seen, 2);
        let Step::Conv(stem) = &g.steps[0] else {
            panic!()
        };
        assert_eq!((locs[stem.x].home, locs[stem.x].offset), (Home::Input, 0));
    }

    #[test]
    fn a_stem_chunk_must_divide_the_batch_and_be_smaller() {
        let w = ModelWeights::seeded(0).unwrap();
        for chunk in [0, 3, 8, 16] {
            let e = NetGraph::resnet18(
                &w,
                GraphConfig {
                    batch: 8,
                    image_size: 32,
                    stem: PAD8,
                    stem_chunk: Some(chunk),
                },
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains(&format!("stem chunk of {chunk} images")), "{e}");
        }
    }

    #[test]
    fn the_space_to_depth_stem_computes_the_plain_stem() {
        let w = ModelWeights::seeded(0).unwrap();
        let vb = VarBuilder::from_tensors(w.tensors.clone(), DType::F32, &Device::Cpu);
        let model = ResNet18::load(vb, true).unwrap();
        let (weight, bias) = model.stem.folded().unwrap();
        let bias = bias.reshape((1, 64, 1, 1)).unwrap();
        for (batch, size) in [(1, 224), (2, 32), (2, 33), (2, 31)] {
            let x = input_batch(INPUT_SEED ^ size as u64, batch, size).unwrap();
            let want = x
                .conv2d(&weight, 3, 2, 1, 1)
                .unwrap()
                .broadcast_add(&bias)
                .unwrap();
            let out = (size - 1) / 2 + 1;
            assert_eq!(want.dims(), &[batch, 64, out, out]);
            for stem in [S2D12, S2D16] {
                let c = stem.channels();
                let s = stem.arrange_nchw(&x).unwrap();
                assert_eq!(s.dims(), &[batch, c, out + 3, out + 3], "{size} px");
                assert_eq!(stem.input_size(size), out + 3);
                let conv = stem.stem_conv(&weight, 2, 3).unwrap();
                assert_eq!(conv.weight.dims(), &[64, c, 4, 4]);
                assert_eq!((conv.stride, conv.pad), (1, 0));
                let got = s
                    .conv2d(&conv.weight, conv.pad, conv.stride, 1, 1)
                    .unwrap()
                    .broadcast_add(&bias)
                    .unwrap();
                let err = rel_err(&got, &want);
                assert!(err < 1e-5, "{stem:?}, {size} px: relative error {err}");
                // The executors store it NHWC.
                let nhwc = stem.arrange_nhwc(&x).unwrap();
                assert_eq!(nhwc.dims(), &[batch, out + 3, out + 3, c]);
                assert_eq!(
                    rel_err(
                        &nhwc,
                        &s.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap()
                    ),
                    0.0
                );
            }
        }
    }

    /// The layout element by element, straight from its definition: `S[m][(r_h*2 + r_w)*3 + c]
    /// = P[c][2m + r]`, with P the image behind 4 zeros at the top and left.
    #[test]
    fn the_space_to_depth_layout_is_the_documented_one() {
        for size in [7, 8] {
            let x = input_batch(5, 1, size).unwrap();
            let img = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let p = |c: usize, h: usize, w: usize| {
                let (h, w) = (h.wrapping_sub(4), w.wrapping_sub(4));
                if h < size && w < size {
                    img[(c * size + h) * size + w]
                } else {
                    0.0
                }
            };
            let m = (size - 1) / 2 + 1 + 3;
            let s = S2D16
                .arrange_nhwc(&x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(s.len(), m * m * 16);
            for mh in 0..m {
                for mw in 0..m {
                    for ch in 0..16 {
                        let want = if ch < 12 {
                            let (rh, rw, c) = (ch / 6, (ch / 3) % 2, ch % 3);
                            p(c, 2 * mh + rh, 2 * mw + rw)
                        } else {
                            0.0
                        };
                        assert_eq!(s[(mh * m + mw) * 16 + ch], want, "{size}: {mh},{mw},{ch}");
                    }
                }
            }
        }
    }

    #[test]
    fn the_space_to_depth_graph_reads_a_4x4_stem_over_12_or_16_channels() {
        let g = graph(4, 224, S2D16);
        assert_eq!(
            g.acts[g.input].shape,
            Shape {
                n: 4,
                h: 115,
                w: 115,
                c: 16
            }
        );
        let Step::Conv(stem) = &g.steps[0] else {
            panic!()
        };
        assert_eq!(stem.weight.dims4().unwrap(), (64, 16, 4, 4));
        assert_eq!((stem.stride, stem.pad), (1, 0));
        assert_eq!(
            g.acts[stem.y].shape,
            Shape {
                n: 4,
                h: 112,
                w: 112,
                c: 64
            }
        );
        // Everything after the stem is the plain graph's.
        let plain = graph(4, 224, PAD3);
        assert_eq!(g.steps.len(), plain.steps.len());
        assert_eq!(
            g.acts[1..].iter().map(|a| a.shape).collect::<Vec<_>>(),
            plain.acts[1..].iter().map(|a| a.shape).collect::<Vec<_>>()
        );
        assert_eq!(g.memory_plan(2), plain.memory_plan(2));
        assert_eq!(graph(1, 31, S2D12).acts[0].shape.h, 19);
        // Only ResNet's stem can be rewritten.
        let w = Tensor::zeros((64, 3, 3, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(S2D12.stem_conv(&w, 1, 1).is_err());
    }
}
