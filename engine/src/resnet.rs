//! ResNet18 as a function over a `VarBuilder` whose paths are torchvision's `state_dict` keys,
//! built from candle-nn layers. This is the "stock" path and the CPU f32 reference that every
//! other path is checked against.
//!
//! With `fold_batch_norm`, each batch norm is absorbed into the convolution before it at load
//! time (inference-only arithmetic: `w' = w * gamma / sqrt(var + eps)`, `b' = beta - mean * that`),
//! which removes a full pass over every activation.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::{batch_norm, conv2d_no_bias, linear, BatchNorm, Conv2d, Conv2dConfig, VarBuilder};

/// torchvision's BatchNorm2d default.
pub const BN_EPS: f64 = 1e-5;

/// A convolution followed by a batch norm, either kept apart or folded together.
#[derive(Debug, Clone)]
pub enum ConvBn {
    Separate(Conv2d, BatchNorm),
    Folded(Conv2d),
}

impl ConvBn {
    fn load(
        vb: &VarBuilder,
        conv_name: &str,
        bn_name: &str,
        (in_c, out_c, k, stride, padding): (usize, usize, usize, usize, usize),
        fold: bool,
    ) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding,
            stride,
            ..Default::default()
        };
        let conv = conv2d_no_bias(in_c, out_c, k, cfg, vb.pp(conv_name))?;
        let bn = batch_norm(out_c, BN_EPS, vb.pp(bn_name))?;
        Ok(if fold {
            ConvBn::Folded(conv.absorb_bn(&bn)?)
        } else {
            ConvBn::Separate(conv, bn)
        })
    }

    pub fn conv(&self) -> &Conv2d {
        match self {
            ConvBn::Separate(c, _) | ConvBn::Folded(c) => c,
        }
    }

    /// The folded form: (weight [K, C, R, S], bias [K]). Folds on the fly if kept separate.
    pub fn folded(&self) -> Result<(Tensor, Tensor)> {
        let c = match self {
            ConvBn::Folded(c) => c.clone(),
            ConvBn::Separate(c, bn) => c.absorb_bn(bn)?,
        };
        let bias = c.bias().cloned().expect("absorb_bn always produces a bias");
        Ok((c.weight().clone(), bias))
    }
}

impl Module for ConvBn {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            ConvBn::Separate(conv, bn) => x.apply(conv)?.apply_t(bn, false),
            ConvBn::Folded(conv) => x.apply(conv),
        }
    }
}

#[derive(Debug, Clone)]
pub struct BasicBlock {
    pub conv1: ConvBn,
    pub conv2: ConvBn,
    pub downsample: Option<ConvBn>,
}

impl BasicBlock {
    fn load(vb: &VarBuilder, in_c: usize, out_c: usize, stride: usize, fold: bool) -> Result<Self> {
        let conv1 = ConvBn::load(vb, "conv1", "bn1", (in_c, out_c, 3, stride, 1), fold)?;
        let conv2 = ConvBn::load(vb, "conv2", "bn2", (out_c, out_c, 3, 1, 1), fold)?;
        let downsample = if stride != 1 || in_c != out_c {
            Some(ConvBn::load(
                vb,
                "downsample.0",
                "downsample.1",
                (in_c, out_c, 1, stride, 0),
                fold,
            )?)
        } else {
            None
        };
        Ok(BasicBlock {
            conv1,
            conv2,
            downsample,
        })
    }
}

impl Module for BasicBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let out = x.apply(&self.conv1)?.relu()?.apply(&self.conv2)?;
        let identity = match &self.downsample {
            Some(ds) => x.apply(ds)?,
            None => x.clone(),
        };
        (out + identity)?.relu()
    }
}

#[derive(Debug, Clone)]
pub struct ResNet18 {
    pub stem: ConvBn,
    /// layer1..layer4, two blocks each.
    pub layers: Vec<[BasicBlock; 2]>,
    pub fc: candle_nn::Linear,
}

impl ResNet18 {
    /// Builds the model from `vb`, whose dtype and device decide where and how it runs.
    pub fn load(vb: VarBuilder, fold_batch_norm: bool) -> Result<Self> {
        let stem = ConvBn::load(&vb, "conv1", "bn1", (3, 64, 7, 2, 3), fold_batch_norm)?;
        let mut layers = Vec::with_capacity(4);
        let mut in_c = 64;
        for (i, out_c) in [64usize, 128, 256, 512].into_iter().enumerate() {
            let stride = if i == 0 { 1 } else { 2 };
            let lvb = vb.pp(format!("layer{}", i + 1));
            let b0 = BasicBlock::load(&lvb.pp("0"), in_c, out_c, stride, fold_batch_norm)?;
            let b1 = BasicBlock::load(&lvb.pp("1"), out_c, out_c, 1, fold_batch_norm)?;
            layers.push([b0, b1]);
            in_c = out_c;
        }
        let fc = linear(512, 1000, vb.pp("fc"))?;
        Ok(ResNet18 { stem, layers, fc })
    }
}

/// 3x3 max pool, stride 2, padding 1, as torchvision's. Candle's pool has no padding, so pad
/// with zeros first: exact here because the input comes out of a ReLU and is never negative.
pub fn stem_max_pool(x: &Tensor) -> Result<Tensor> {
    x.pad_with_zeros(2, 1, 1)?
        .pad_with_zeros(3, 1, 1)?
        .max_pool2d_with_stride(3, 2)
}

impl Module for ResNet18 {
    /// `x` is NCHW; returns logits [N, 1000].
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = stem_max_pool(&x.apply(&self.stem)?.relu()?)?;
        for layer in &self.layers {
            for block in layer {
                x = x.apply(block)?;
            }
        }
        // Global average pool over H and W.
        let x = x.mean(D::Minus1)?.mean(D::Minus1)?;
        x.apply(&self.fc)
    }
}
