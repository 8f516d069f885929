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

/// What the graph is built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GraphConfig {
    pub batch: usize,
    pub image_size: usize,
    /// Channels of the input as stored: 3, or 3 zero-padded to 4 or 8 for tensor cores.
    pub stem_channels: usize,
}

/// The network as a list of steps over activations.
#[derive(Debug, Clone)]
pub struct NetGraph {
    pub acts: Vec<Activation>,
    pub steps: Vec<Step>,
    pub input: usize,
    pub output: usize,
}

/// Where each slab activation sits, and how big the slab is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryPlan {
    /// Byte offset in the slab of each activation; `None` for the input and output.
    pub offsets: Vec<Option<usize>>,
    pub slab_bytes: usize,
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
}

fn out_dim(input: usize, kernel: usize, stride: usize, pad: usize) -> usize {
    (input + 2 * pad - kernel) / stride + 1
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
            let act = &mut self.acts[a];
            act.first_use = act.first_use.min(at);
            act.last_use = act.last_use.max(at);
        }
        self.steps.push(step);
    }

    fn conv(&mut self, cfg: ConvConfig<'_>) -> Result<usize, EngineError> {
        let (mut weight, folded_bias) = cfg.layer.folded()?;
        let conv = cfg.layer.conv().config();
        let (k, c, r, _) = weight.dims4()?;
        let x = self.acts[cfg.x].shape;
        if x.c > c {
            // The stem's input is zero-padded; pad its weight to match.
            weight = weight.pad_with_zeros(1, 0, x.c - c)?;
        }
        let y = self.act(
            Shape {
                n: x.n,
                h: out_dim(x.h, r, conv.stride, conv.padding),
                w: out_dim(x.w, r, conv.stride, conv.padding),
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
            stride: conv.stride,
            pad: conv.padding,
            x: cfg.x,
            y,
            residual: cfg.residual,
            relu: cfg.relu,
        }));
        Ok(y)
    }

    fn pool(&mut self, name: &'static str, kind: PoolKind, x: usize) -> usize {
        let s = self.acts[x].shape;
        let shape = match kind {
            PoolKind::Max3x3Stride2 => Shape {
                h: out_dim(s.h, 3, 2, 1),
                w: out_dim(s.w, 3, 2, 1),
                ..s
            },
            PoolKind::GlobalAverage => Shape { h: 1, w: 1, ..s },
        };
        let y = self.act(shape, Place::Slab);
        self.push(Step::Pool(PoolStep { name, kind, x, y }));
        y
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
        })
    }
}

impl NetGraph {
    /// ResNet18 with `weights`, batch norm folded on the host in f32.
    pub fn resnet18(weights: &ModelWeights, cfg: GraphConfig) -> Result<Self, EngineError> {
        if cfg.stem_channels < 3 {
            return Err(EngineError::Unsupported(format!(
                "the stem needs at least 3 input channels, not {}",
                cfg.stem_channels
            )));
        }
        let vb = VarBuilder::from_tensors(weights.tensors.clone(), DType::F32, &Device::Cpu);
        let model = ResNet18::load(vb, true)?;
        let mut b = Builder::default();
        let input = b.act(
            Shape {
                n: cfg.batch,
                h: cfg.image_size,
                w: cfg.image_size,
                c: cfg.stem_channels,
            },
            Place::Input,
        );
        let stem = b.conv(ConvConfig {
            name: "stem".into(),
            layer: &model.stem,
            x: input,
            residual: None,
            relu: true,
            bias: BiasSource::Folded,
        })?;
        let mut x = b.pool("maxpool", PoolKind::Max3x3Stride2, stem);
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
        Ok(NetGraph {
            acts: b.acts,
            steps: b.steps,
            input,
            output,
        })
    }

    /// Lays the slab activations out by liveness, for elements of `elem_bytes` bytes.
    pub fn memory_plan(&self, elem_bytes: usize) -> MemoryPlan {
        let slab: Vec<usize> = (0..self.acts.len())
            .filter(|&i| self.acts[i].place == Place::Slab)
            .collect();
        let sizes: Vec<(usize, usize, usize)> = slab
            .iter()
            .map(|&i| {
                let a = &self.acts[i];
                (a.shape.elems() * elem_bytes, a.first_use, a.last_use)
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

    /// Runs the steps with Candle's CPU ops in f32, NCHW: the same arithmetic the GPU executor
    /// does, for checking the graph itself. `x` is NCHW with the stem's (padded) channels.
    pub fn forward_cpu(&self, x: &Tensor) -> Result<Tensor, EngineError> {
        let mut vals: Vec<Option<Tensor>> = vec![None; self.acts.len()];
        vals[self.input] = Some(x.clone());
        let get = |vals: &[Option<Tensor>], i: usize| {
            vals[i].clone().ok_or_else(|| {
                EngineError::Unsupported(format!("activation {i} read before written"))
            })
        };
        for step in &self.steps {
            match step {
                Step::Conv(c) => {
                    let mut y = get(&vals, c.x)?.conv2d(&c.weight, c.pad, c.stride, 1, 1)?;
                    if let Some(b) = &c.bias {
                        y = y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?)?;
                    }
                    if let Some(r) = c.residual {
                        y = (y + get(&vals, r)?)?;
                    }
                    if c.relu {
                        y = y.relu()?;
                    }
                    vals[c.y] = Some(y);
                }
                Step::Pool(p) => {
                    let x = get(&vals, p.x)?;
                    vals[p.y] = Some(match p.kind {
                        PoolKind::Max3x3Stride2 => stem_max_pool(&x)?,
                        PoolKind::GlobalAverage => {
                            x.mean_keepdim(D::Minus1)?.mean_keepdim(D::Minus2)?
                        }
                    });
                }
            }
        }
        Ok(get(&vals, self.output)?.flatten_from(1)?)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Module;

    use super::*;
    use crate::input::{input_batch, INPUT_SEED};

    fn graph(batch: usize, size: usize, stem: usize) -> NetGraph {
        let w = ModelWeights::seeded(0).unwrap();
        NetGraph::resnet18(
            &w,
            GraphConfig {
                batch,
                image_size: size,
                stem_channels: stem,
            },
        )
        .unwrap()
    }

    #[test]
    fn shapes_follow_resnet18() {
        let g = graph(4, 224, 8);
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
        let g = graph(1, 224, 4);
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

    #[test]
    fn the_slab_holds_the_largest_live_set_and_never_overlaps_live_tensors() {
        let g = graph(8, 224, 8);
        let elem = 2;
        let plan = g.memory_plan(elem);
        let aligned = |b: usize| b.div_ceil(256) * 256;
        let slab: Vec<usize> = (0..g.acts.len())
            .filter(|&i| g.acts[i].place == Place::Slab)
            .collect();
        let bytes = |i: usize| g.acts[i].shape.elems() * elem;
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
        assert_eq!(plan.offsets[g.input], None);
        assert_eq!(plan.offsets[g.output], None);
    }

    #[test]
    fn the_folded_graph_computes_what_the_unfolded_model_does() {
        let w = ModelWeights::seeded(0).unwrap();
        let vb = VarBuilder::from_tensors(w.tensors.clone(), DType::F32, &Device::Cpu);
        let reference = ResNet18::load(vb, false).unwrap();
        let (batch, size) = (2, 64);
        let x = input_batch(INPUT_SEED, batch, size).unwrap();
        let want = reference.forward(&x).unwrap();
        for stem in [3, 4, 8] {
            let g = NetGraph::resnet18(
                &w,
                GraphConfig {
                    batch,
                    image_size: size,
                    stem_channels: stem,
                },
            )
            .unwrap();
            let padded = x.pad_with_zeros(1, 0, stem - 3).unwrap();
            let got = g.forward_cpu(&padded).unwrap();
            assert_eq!(got.dims(), &[batch, 1000]);
            let err = (&got - &want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let scale = want
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                err / scale < 1e-4,
                "stem {stem}: relative error {}",
                err / scale
            );
        }
    }
}
