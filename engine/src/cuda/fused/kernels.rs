//! The fused path's own CUDA kernels, for the steps where cuDNN's call leaves speed behind.
//! Their source is `engine/kernels/*.cu`; `build.rs` compiles it to PTX for the build's compute
//! capability, as candle-kernels does for Candle's, and the driver loads it here. Each kernel
//! is a candidate the planner times against cuDNN's call on the real buffers, and is used only
//! after its output matched cuDNN's on them.

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::{
    driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg},
    nvrtc::Ptx,
};

use super::cudnn::{drv, DevPtr, Elem};
use crate::{
    fused::planner::{MaxPoolGeometry, MAXPOOL_BLOCK},
    EngineError,
};

mod ptx {
    include!(concat!(env!("OUT_DIR"), "/kernels_ptx.rs"));
}

/// The loaded kernels, one set per executor.
pub(super) struct Kernels {
    maxpool_b16: CudaFunction,
    maxpool_b32: CudaFunction,
}

impl Kernels {
    pub(super) fn load(ctx: &Arc<CudaContext>) -> Result<Self, EngineError> {
        let module = drv("load kernels", ctx.load_module(Ptx::from_src(ptx::MAXPOOL)))?;
        Ok(Kernels {
            maxpool_b16: drv(
                "kernel maxpool b16",
                module.load_function("maxpool3s2_nhwc_b16"),
            )?,
            maxpool_b32: drv(
                "kernel maxpool b32",
                module.load_function("maxpool3s2_nhwc_b32"),
            )?,
        })
    }

    /// The 3x3 stride-2 max pool (padding 1) of `geometry` over `elem` values, from `x` to
    /// `y`, enqueued on `stream`.
    pub(super) fn maxpool(
        &self,
        stream: &CudaStream,
        geometry: &MaxPoolGeometry,
        elem: Elem,
        x: DevPtr<'_>,
        y: DevPtr<'_>,
    ) -> Result<(), EngineError> {
        let f = match elem {
            Elem::F32 => &self.maxpool_b32,
            Elem::F16 | Elem::Bf16 => &self.maxpool_b16,
        };
        let (xa, ya) = (x.addr(), y.addr());
        if !xa.is_multiple_of(16) || !ya.is_multiple_of(16) {
            return Err(EngineError::Setup(format!(
                "the max pool kernel needs 16-byte aligned buffers (x at {xa:#x}, y at {ya:#x})"
            )));
        }
        let [n, h, w, vecs, oh, ow] = &geometry.dims;
        let config = LaunchConfig {
            grid_dim: (geometry.blocks, 1, 1),
            block_dim: (MAXPOOL_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut args = stream.launch_builder(f);
        args.arg(&xa)
            .arg(&ya)
            .arg(n)
            .arg(h)
            .arg(w)
            .arg(vecs)
            .arg(oh)
            .arg(ow);
        // SAFETY: the kernel's parameters are (const uint4*, uint4*, int x6), matched here by
        // two u64 addresses and six i32 values pushed in that order, each living until the
        // launch returns. `maxpool_geometry` derived the six from the two shapes the caller
        // planned for x and y (it refuses shapes whose pixels are not whole 16-byte vectors or
        // whose sizes pass an i32), so x holds n*h*w pixels and y n*oh*ow pixels of `vecs`
        // vectors, and the kernel indexes no further (its loop stops at n*oh*ow*vecs). Both
        // addresses are 16-byte aligned (checked above). x and y are alive at the same step, so the
        // memory plan keeps them apart and the kernel's reads never see its writes. The work
        // is enqueued on the executor's stream, which is synchronized before the buffers drop.
        drv("launch maxpool", unsafe { args.launch(config) })?;
        Ok(())
    }
}
