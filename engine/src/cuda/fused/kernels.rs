//! The fused path's own CUDA kernels, for the steps where cuDNN's call leaves speed behind:
//! the max pool after the stem, and the stem with its max pool in one kernel. Their source is
//! `engine/kernels/*.cu`; `build.rs` compiles it to PTX for the build's compute capability, as
//! candle-kernels does for Candle's, and the driver loads it here. Each kernel is a candidate
//! the executor times against cuDNN's calls on the real buffers, and is used only after its
//! output matched cuDNN's on them.

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::{
    driver::{sys, CudaContext, CudaFunction, CudaModule, CudaStream, LaunchConfig, PushKernelArg},
    nvrtc::Ptx,
};

use super::cudnn::{drv, DevPtr, Elem};
use crate::{
    fused::planner::{
        self, MaxPoolGeometry, StemPoolGeometry, StemPoolVariant, MAXPOOL_BLOCK, STEM_POOL_THREADS,
        STEM_POOL_VARIANTS,
    },
    EngineError,
};

mod ptx {
    include!(concat!(env!("OUT_DIR"), "/kernels_ptx.rs"));
}

/// The loaded kernels, one set per executor.
pub(super) struct Kernels {
    maxpool_b16: CudaFunction,
    maxpool_b32: CudaFunction,
    stem_pool_f16: Vec<StemPoolFn>,
    stem_pool_bf16: Vec<StemPoolFn>,
    /// Why some stem-and-pool variants are missing (empty when all loaded).
    stem_pool_note: String,
    /// Streaming multiprocessors of the device, for sizing the stem-and-pool grid.
    sms: u32,
}

/// One variant of the stem-and-pool kernel, ready to launch: its shared memory allowed and
/// its occupancy known.
pub(super) struct StemPoolFn {
    pub(super) variant: StemPoolVariant,
    f: CudaFunction,
    blocks_per_sm: u32,
}

impl Kernels {
    /// The max pool kernels, and the stem-and-pool variants if `stem_pool` (whose failure to
    /// load leaves only a note: the max pool does not depend on them).
    pub(super) fn load(ctx: &Arc<CudaContext>, stem_pool: bool) -> Result<Self, EngineError> {
        let module = drv("load kernels", ctx.load_module(Ptx::from_src(ptx::MAXPOOL)))?;
        let sms = drv(
            "multiprocessor count",
            ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT),
        )?;
        let mut notes = Vec::new();
        let module_sp = stem_pool.then(|| ctx.load_module(Ptx::from_src(ptx::STEM_POOL)));
        let (stem_pool_f16, stem_pool_bf16) = match module_sp {
            Some(Ok(m)) => (
                load_stem_pool(&m, "f16", &mut notes),
                load_stem_pool(&m, "bf16", &mut notes),
            ),
            Some(Err(e)) => {
                notes.push(format!("module did not load: {e:?}"));
                (Vec::new(), Vec::new())
            }
            None => {
                notes.push("not loaded for this job".into());
                (Vec::new(), Vec::new())
            }
        };
        Ok(Kernels {
            maxpool_b16: drv(
                "kernel maxpool b16",
                module.load_function("maxpool3s2_nhwc_b16"),
            )?,
            maxpool_b32: drv(
                "kernel maxpool b32",
                module.load_function("maxpool3s2_nhwc_b32"),
            )?,
            stem_pool_f16,
            stem_pool_bf16,
            stem_pool_note: notes.join("; "),
            sms: u32::try_from(sms).unwrap_or(1),
        })
    }

    /// The stem-and-pool variants for `elem` values (none for f32), and why any are missing.
    pub(super) fn stem_pool_fns(&self, elem: Elem) -> (&[StemPoolFn], &str) {
        let fns = match elem {
            Elem::F16 => &self.stem_pool_f16[..],
            Elem::Bf16 => &self.stem_pool_bf16[..],
            Elem::F32 => &[],
        };
        (fns, &self.stem_pool_note)
    }

    /// The stem (16-channel space-to-depth input `x`, KRSC weight `w`, f32 `bias`) and its max
    /// pool into `y`, by variant `k`, enqueued on `stream`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn stem_pool(
        &self,
        stream: &CudaStream,
        k: &StemPoolFn,
        g: &StemPoolGeometry,
        x: DevPtr<'_>,
        w: DevPtr<'_>,
        bias: DevPtr<'_>,
        y: DevPtr<'_>,
    ) -> Result<(), EngineError> {
        let (xa, wa, ba, ya) = (x.addr(), w.addr(), bias.addr(), y.addr());
        if !xa.is_multiple_of(32)
            || !wa.is_multiple_of(32)
            || !ba.is_multiple_of(8)
            || !ya.is_multiple_of(4)
        {
            return Err(EngineError::Setup(format!(
                "the stem-and-pool kernel needs x and w 32-byte, bias 8-byte and y 4-byte \
                 aligned (x at {xa:#x}, w at {wa:#x}, bias at {ba:#x}, y at {ya:#x})"
            )));
        }
        let config = LaunchConfig {
            grid_dim: (
                planner::stem_pool_grid(k.variant.tiles(g), self.sms, k.blocks_per_sm),
                1,
                1,
            ),
            block_dim: (STEM_POOL_THREADS, 1, 1),
            shared_mem_bytes: k.variant.smem_bytes() as u32,
        };
        let [hs, ws, n] = &g.args;
        let mut args = stream.launch_builder(&k.f);
        args.arg(&xa)
            .arg(&wa)
            .arg(&ba)
            .arg(&ya)
            .arg(hs)
            .arg(ws)
            .arg(n);
        // SAFETY: the kernel's parameters are (const T*, const T*, const float*, T*, int x3),
        // matched by four u64 addresses and three i32 values pushed in that order, each living
        // until the launch returns. `stem_pool_geometry` derived (hs, ws, n) from the shapes the
        // executor planned for x, the stem's output and y, refusing any other filter, shape or
        // element size (and the executor checked, before calling here, that the pool is the
        // 3x3 stride-2 max pool of the stem's output); the kernel derives every other size from
        // those three, so it reads n*hs*ws pixels of 16 values from x (each bounds-checked),
        // 64*4*4*16 weights and 64 biases (the stem's own buffers, uploaded for exactly that
        // filter), and writes n*ph*pw pixels of 64 values to y. The alignments it relies on
        // are checked above. The dynamic shared memory is the variant's `smem_bytes`, which
        // `load_stem_pool` allowed for this function; a block given less writes nothing (the
        // kernel checks). x lives in the input buffer and y in the activation slab (the
        // executor checked both homes), so the reads never see the writes the kernel's
        // `__restrict__` promises away. The work is enqueued on the executor's stream, which
        // is synchronized before the buffers drop.
        drv("launch stem_pool", unsafe { args.launch(config) })?;
        Ok(())
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

/// Each stem-and-pool variant for `precision` that the device can run: its function, with the
/// dynamic shared memory it needs allowed, and its occupancy. What fails goes to `notes`.
fn load_stem_pool(
    m: &Arc<CudaModule>,
    precision: &str,
    notes: &mut Vec<String>,
) -> Vec<StemPoolFn> {
    let mut out = Vec::new();
    for variant in STEM_POOL_VARIANTS {
        let name = variant.function(precision);
        let smem = variant.smem_bytes();
        let loaded = m.load_function(&name).and_then(|f| {
            f.set_attribute(
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )?;
            let blocks =
                f.occupancy_max_active_blocks_per_multiprocessor(STEM_POOL_THREADS, smem, None)?;
            Ok((f, blocks))
        });
        match loaded {
            Ok((f, blocks_per_sm)) if blocks_per_sm > 0 => out.push(StemPoolFn {
                variant,
                f,
                blocks_per_sm,
            }),
            Ok(_) => notes.push(format!("{name}: no block fits an SM")),
            Err(e) => notes.push(format!("{name}: {e:?}")),
        }
    }
    out
}
