//! One convolution and its epilogue as cuDNN's graph (backend) API describes them: the tensors
//! (ids, dimensions, strides, whether they live in memory) and the operations that join them.
//!
//! It exists apart from the executor so that the wiring, the only part of the graph API path
//! that can be got wrong without a GPU, is a unit test in every CI run: the executor
//! (`crate::cuda::fused::graph_api`) only turns a [`ConvGraphSpec`] into descriptors.
//!
//! The graph API names dimensions in N, C, H, W order whatever the layout; the layout is in the
//! strides. Activations are NHWC and weights KRSC, as in the legacy path, so no data moves.
//! A convolution with an epilogue is a chain: the convolution writes a virtual f32 tensor, then
//! pointwise operations add the bias, add the residual and apply ReLU, each into the next
//! virtual tensor, and the last writes the real output in the activation precision. That is
//! the arithmetic of the legacy fused call (f32 accumulation and f32 epilogue), written as a
//! graph, so cuDNN can pick engines (and split the reduction) that the legacy call cannot.

use super::graph::Shape;

/// Ids of the tensors that live in memory (the variant pack passes their addresses).
pub mod uid {
    pub const X: i64 = 1;
    pub const W: i64 = 2;
    pub const Y: i64 = 3;
    pub const BIAS: i64 = 4;
    pub const RESIDUAL: i64 = 5;
    /// Virtual intermediates are numbered from here.
    pub const FIRST_VIRTUAL: i64 = 100;
}

/// A tensor's element type: the activation precision, or f32 (the bias and the intermediates).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TensorType {
    Act,
    F32,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TensorSpec {
    pub uid: i64,
    /// N, C, H, W (K, C, R, S for a weight).
    pub dims: [i64; 4],
    pub strides: [i64; 4],
    pub ty: TensorType,
    /// Only between two operations of the graph; never in memory.
    pub is_virtual: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PointwiseMode {
    Add,
    Relu,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PointwiseOp {
    pub mode: PointwiseMode,
    pub x: i64,
    /// The second operand (for `Add`).
    pub b: Option<i64>,
    pub y: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConvOp {
    pub x: i64,
    pub w: i64,
    pub y: i64,
    pub stride: i64,
    pub pad: i64,
}

/// What rides in a convolution's epilogue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvEpilogue {
    pub bias: bool,
    pub residual: bool,
    pub relu: bool,
}

/// A convolution's filter: K output channels over C input channels, R x S, with its stride and
/// padding. The legacy descriptors are made from it too (`cuda/fused/cudnn.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Filter {
    pub k: usize,
    pub c: usize,
    pub r: usize,
    pub s: usize,
    pub stride: usize,
    pub pad: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConvGraphSpec {
    pub tensors: Vec<TensorSpec>,
    pub conv: ConvOp,
    /// In execution order; each reads the previous one's output.
    pub pointwise: Vec<PointwiseOp>,
}

/// N, C, H, W dimensions and strides of an NHWC activation.
fn nhwc(s: &Shape) -> ([i64; 4], [i64; 4]) {
    let (n, h, w, c) = (s.n as i64, s.h as i64, s.w as i64, s.c as i64);
    ([n, c, h, w], [h * w * c, 1, w * c, c])
}

impl ConvGraphSpec {
    /// The graph for a convolution from `x` to `y` with filter `f` and epilogue `epi`.
    pub fn new(x: &Shape, y: &Shape, f: Filter, epi: ConvEpilogue) -> Self {
        let (xd, xs) = nhwc(x);
        let (yd, ys) = nhwc(y);
        let (k, c, r, s) = (f.k as i64, f.c as i64, f.r as i64, f.s as i64);
        let real = |uid, dims, strides, ty| TensorSpec {
            uid,
            dims,
            strides,
            ty,
            is_virtual: false,
        };
        let mut tensors = vec![
            real(uid::X, xd, xs, TensorType::Act),
            real(
                uid::W,
                [k, c, r, s],
                [r * s * c, 1, s * c, c],
                TensorType::Act,
            ),
        ];
        // The chain's operands, in order; the last operation writes the real output.
        let mut ops: Vec<(PointwiseMode, Option<i64>)> = Vec::new();
        if epi.bias {
            tensors.push(real(uid::BIAS, [1, k, 1, 1], [k, 1, k, k], TensorType::F32));
            ops.push((PointwiseMode::Add, Some(uid::BIAS)));
        }
        if epi.residual {
            tensors.push(real(uid::RESIDUAL, yd, ys, TensorType::Act));
            ops.push((PointwiseMode::Add, Some(uid::RESIDUAL)));
        }
        if epi.relu {
            ops.push((PointwiseMode::Relu, None));
        }
        let mut next_virtual = uid::FIRST_VIRTUAL;
        let mut intermediate = |tensors: &mut Vec<TensorSpec>| {
            let id = next_virtual;
            next_virtual += 1;
            tensors.push(TensorSpec {
                uid: id,
                dims: yd,
                strides: ys,
                ty: TensorType::F32,
                is_virtual: true,
            });
            id
        };
        let conv_y = if ops.is_empty() {
            uid::Y
        } else {
            intermediate(&mut tensors)
        };
        let mut pointwise = Vec::with_capacity(ops.len());
        let mut cur = conv_y;
        for (i, (mode, b)) in ops.iter().enumerate() {
            let out = if i + 1 == ops.len() {
                uid::Y
            } else {
                intermediate(&mut tensors)
            };
            pointwise.push(PointwiseOp {
                mode: *mode,
                x: cur,
                b: *b,
                y: out,
            });
            cur = out;
        }
        tensors.push(real(uid::Y, yd, ys, TensorType::Act));
        ConvGraphSpec {
            tensors,
            conv: ConvOp {
                x: uid::X,
                w: uid::W,
                y: conv_y,
                stride: f.stride as i64,
                pad: f.pad as i64,
            },
            pointwise,
        }
    }

    /// The ids of the tensors in memory, in the order the tensors were declared.
    pub fn real_uids(&self) -> Vec<i64> {
        self.tensors
            .iter()
            .filter(|t| !t.is_virtual)
            .map(|t| t.uid)
            .collect()
    }

    pub fn tensor(&self, uid: i64) -> Option<&TensorSpec> {
        self.tensors.iter().find(|t| t.uid == uid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(n: usize, h: usize, w: usize, c: usize) -> Shape {
        Shape { n, h, w, c }
    }

    const F: Filter = Filter {
        k: 64,
        c: 64,
        r: 3,
        s: 3,
        stride: 1,
        pad: 1,
    };

    fn full() -> ConvGraphSpec {
        let s = shape(2, 56, 56, 64);
        ConvGraphSpec::new(
            &s,
            &s,
            F,
            ConvEpilogue {
                bias: true,
                residual: true,
                relu: true,
            },
        )
    }

    #[test]
    fn a_bare_convolution_writes_the_output_itself() {
        let x = shape(1, 56, 56, 64);
        let y = shape(1, 28, 28, 128);
        let f = Filter {
            k: 128,
            r: 1,
            s: 1,
            stride: 2,
            pad: 0,
            ..F
        };
        let g = ConvGraphSpec::new(
            &x,
            &y,
            f,
            ConvEpilogue {
                bias: false,
                residual: false,
                relu: false,
            },
        );
        assert_eq!(g.conv.y, uid::Y);
        assert!(g.pointwise.is_empty());
        assert_eq!(g.real_uids(), vec![uid::X, uid::W, uid::Y]);
        assert_eq!(g.tensor(uid::Y).unwrap().dims, [1, 128, 28, 28]);
        assert_eq!(g.tensor(uid::W).unwrap().dims, [128, 64, 1, 1]);
        assert_eq!((g.conv.stride, g.conv.pad), (2, 0));
    }

    #[test]
    fn the_epilogue_is_a_connected_chain_ending_in_the_output() {
        let g = full();
        let modes: Vec<_> = g.pointwise.iter().map(|p| p.mode).collect();
        assert_eq!(
            modes,
            [PointwiseMode::Add, PointwiseMode::Add, PointwiseMode::Relu]
        );
        assert_eq!(g.pointwise[0].x, g.conv.y);
        assert_eq!(g.pointwise[0].b, Some(uid::BIAS));
        assert_eq!(g.pointwise[1].b, Some(uid::RESIDUAL));
        assert_eq!(g.pointwise[2].b, None);
        for pair in g.pointwise.windows(2) {
            assert_eq!(pair[1].x, pair[0].y, "each operation reads the one before");
        }
        assert_eq!(g.pointwise.last().unwrap().y, uid::Y);
        // The convolution and every intermediate are virtual f32 tensors of y's shape.
        let y = g.tensor(uid::Y).unwrap().clone();
        for id in std::iter::once(g.conv.y).chain(g.pointwise[..2].iter().map(|p| p.y)) {
            let t = g.tensor(id).unwrap();
            assert!(t.is_virtual && t.ty == TensorType::F32, "{t:?}");
            assert_eq!((t.dims, t.strides), (y.dims, y.strides));
        }
        assert_eq!(
            g.real_uids(),
            vec![uid::X, uid::W, uid::BIAS, uid::RESIDUAL, uid::Y]
        );
    }

    #[test]
    fn ids_are_unique_and_every_operand_is_declared() {
        let g = full();
        let mut ids: Vec<_> = g.tensors.iter().map(|t| t.uid).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), g.tensors.len());
        let operands = [g.conv.x, g.conv.w, g.conv.y].into_iter().chain(
            g.pointwise
                .iter()
                .flat_map(|p| [Some(p.x), p.b, Some(p.y)].into_iter().flatten()),
        );
        for id in operands {
            assert!(g.tensor(id).is_some(), "operand {id} is not declared");
        }
    }

    #[test]
    fn a_bias_alone_is_one_add_and_the_bias_is_f32_per_channel() {
        let x = shape(4, 1, 1, 512);
        let y = shape(4, 1, 1, 1000);
        let f = Filter {
            k: 1000,
            c: 512,
            r: 1,
            s: 1,
            stride: 1,
            pad: 0,
        };
        let g = ConvGraphSpec::new(
            &x,
            &y,
            f,
            ConvEpilogue {
                bias: true,
                residual: false,
                relu: false,
            },
        );
        assert_eq!(g.pointwise.len(), 1);
        assert_eq!(g.pointwise[0].y, uid::Y);
        let b = g.tensor(uid::BIAS).unwrap();
        assert_eq!((b.dims, b.ty), ([1, 1000, 1, 1], TensorType::F32));
    }

    /// The strides say NHWC (and KRSC): element (n, c, h, w) sits where the executor's buffers
    /// put it.
    #[test]
    fn strides_address_nhwc_and_krsc() {
        let x = shape(3, 5, 7, 8);
        let f = Filter {
            k: 16,
            c: 8,
            r: 3,
            s: 2,
            stride: 1,
            pad: 0,
        };
        let g = ConvGraphSpec::new(
            &x,
            &x,
            f,
            ConvEpilogue {
                bias: false,
                residual: false,
                relu: true,
            },
        );
        let at = |t: &TensorSpec, i: [i64; 4]| -> i64 { (0..4).map(|d| i[d] * t.strides[d]).sum() };
        let xt = g.tensor(uid::X).unwrap();
        // n=2, c=5, h=4, w=6 in NHWC: ((n*H + h)*W + w)*C + c
        assert_eq!(at(xt, [2, 5, 4, 6]), ((2 * 5 + 4) * 7 + 6) * 8 + 5);
        let wt = g.tensor(uid::W).unwrap();
        // k=9, c=3, r=2, s=1 in KRSC: ((k*R + r)*S + s)*C + c
        assert_eq!(at(wt, [9, 3, 2, 1]), ((9 * 3 + 2) * 2 + 1) * 8 + 3);
    }
}
