//! The stem and its max pool as one kernel of the path's own (`engine/kernels/stem_pool.cu`),
//! planned after cuDNN's stem and the pool are: the kernel's output is compared with theirs on
//! the real buffers, every variant that agrees is timed against the two steps together, and
//! the fastest wins. When a variant wins, the two steps become one, which keeps the stem's
//! weights and bias (the kernel reads them) and never runs cuDNN's stem again.

use std::sync::Arc;

use super::{
    kernels::{Kernels, StemPoolFn},
    ms, ConvExec, ExecStep, FusedPrepared, PoolExec, SearchConfig,
};
use crate::{
    fused::{
        graph::{Home, PoolKind},
        options::StemPoolChoice,
        planner::{self, StemPoolGeometry},
    },
    EngineError,
};

/// The stem and its max pool, run by one variant of the kernel.
pub(super) struct StemPoolExec {
    /// The stem as planned for cuDNN: its input, weights and f32 bias feed the kernel.
    conv: Box<ConvExec>,
    /// The pool it replaces: its output is the kernel's.
    pool: PoolExec,
    kernel: Arc<Kernels>,
    /// Which of `kernel`'s variants for the precision runs.
    variant: usize,
    geometry: StemPoolGeometry,
}

impl StemPoolExec {
    pub(super) const NAME: &'static str = "stem+maxpool";

    fn function(&self, elem: super::Elem) -> Option<&StemPoolFn> {
        self.kernel.stem_pool_fns(elem).0.get(self.variant)
    }

    /// The stem's output activation, which the kernel never writes.
    pub(super) fn stem_out(&self) -> usize {
        self.conv.y
    }

    /// The variant's name, for the plan in results.
    pub(super) fn variant_name(&self, elem: super::Elem) -> &'static str {
        self.function(elem).map_or("?", |f| f.variant.name)
    }
}

/// What the search settled on: a variant (its index), or `None` for cuDNN's two steps (what
/// was measured is in `stem_pool_note`).
struct Found {
    variant: Option<usize>,
    geometry: StemPoolGeometry,
}

impl FusedPrepared {
    /// With the stem and the max pool planned (the first two steps), tries the kernel in
    /// their place as `--fused-stem-pool` asks; a winning variant replaces both steps.
    pub(super) fn plan_stem_pool(&mut self, cfg: &SearchConfig<'_>) -> Result<(), EngineError> {
        let choice = cfg.opts.stem_pool;
        if choice == StemPoolChoice::Off {
            return Ok(());
        }
        match self.search_stem_pool(cfg) {
            Ok(Found {
                variant: Some(variant),
                geometry,
            }) => self.fuse_stem_pool(variant, geometry),
            Ok(Found { variant: None, .. }) => Ok(()),
            Err(why) if choice == StemPoolChoice::Kernel => Err(EngineError::Unsupported(format!(
                "the stem-and-pool kernel cannot be used: {why}"
            ))),
            Err(why) => {
                self.stem_pool_note = format!("not used: {why}");
                let _ = self.stream.synchronize();
                Ok(())
            }
        }
    }

    /// Checks and times the variants; `Err` says why none could be tried.
    fn search_stem_pool(&mut self, cfg: &SearchConfig<'_>) -> Result<Found, String> {
        if self.stem_chunks.is_some() {
            return Err("the stem runs in chunks".into());
        }
        let kernels = self.kernels.clone().ok_or("the kernels are not loaded")?;
        let (ExecStep::Conv(stem), ExecStep::Pool(pool)) = (&self.steps[0], &self.steps[1]) else {
            return Err("the first steps are not the stem and its pool".into());
        };
        // What the kernel computes, and nothing else: bias, ReLU, no residual, then the 3x3
        // stride-2 max pool of exactly that output.
        if stem.bias.is_none() || !stem.relu || stem.residual.is_some() {
            return Err("the stem is not a convolution with bias and ReLU alone".into());
        }
        if pool.kind != PoolKind::Max3x3Stride2 || pool.x != stem.y {
            return Err("the step after the stem is not its 3x3 stride-2 max pool".into());
        }
        let (x, y) = (stem.x, pool.y);
        // The kernel reads x while it writes y: they must not share bytes.
        let homes = (self.bufs.locations[x].home, self.bufs.locations[y].home);
        if homes != (Home::Input, Home::Slab) {
            return Err(format!(
                "the stem's input and the pool's output live in {homes:?}, not the input \
                 buffer and the slab"
            ));
        }
        let geometry = planner::stem_pool_geometry(
            &self.shapes[x],
            &stem.filter,
            &self.shapes[stem.y],
            &self.shapes[y],
            self.elem.size(),
        )?;
        let (fns, missing) = kernels.stem_pool_fns(self.elem);
        if fns.is_empty() {
            return Err(if missing.is_empty() {
                format!("no variant for {:?}", self.elem)
            } else {
                format!("no variant loaded ({missing})")
            });
        }
        let failed = |what: &str, e: EngineError| format!("{what} failed: {e}");
        // cuDNN's answer, and its time, on the real input.
        let bytes = self.shapes[y].elems() * self.elem.size();
        self.run_stem_then_pool()
            .map_err(|e| failed("the stem and pool", e))?;
        let theirs = self
            .bufs
            .act_to_host(y, bytes, &self.stream)
            .map_err(|e| failed("reading the pool", e))?;
        let theirs = self.elem.f32_from_bytes(&theirs);
        let t_cudnn = self.time_candidate(cfg.timing, &|| self.run_stem_then_pool());
        let mut notes = vec![format!("cudnn:{}", ms(t_cudnn))];
        let tol = planner::plan_tolerance(self.math);
        let mut best: Option<(f32, usize)> = None;
        for (i, f) in fns.iter().enumerate() {
            let name = f.variant.name;
            match self.check_stem_pool(&kernels, f, &geometry, y, bytes, &theirs, tol) {
                Ok(None) => {}
                Ok(Some(at)) => {
                    notes.push(format!("{name}:differs at value {at}"));
                    continue;
                }
                Err(e) => {
                    notes.push(format!("{name}:failed ({e})"));
                    let _ = self.stream.synchronize();
                    continue;
                }
            }
            let stem = match &self.steps[0] {
                ExecStep::Conv(c) => c,
                _ => return Err("the stem step moved".into()),
            };
            let t = self.time_candidate(cfg.timing, &|| {
                self.launch_stem_pool(&kernels, f, &geometry, stem, y)
            });
            notes.push(format!("{name}:{}", ms(t)));
            if let Some(t) = t {
                if best.is_none_or(|(bt, _)| t < bt) {
                    best = Some((t, i));
                }
            }
        }
        self.stem_pool_note = notes.join(" ");
        // The variants left their own output (or zeros) in y: the layers planned next are
        // checked and timed on it, so it gets cuDNN's answer back whatever is decided.
        self.run_stem_then_pool()
            .map_err(|e| failed("the stem and pool", e))?;
        let Some((t_kernel, variant)) = best else {
            return Err(format!(
                "no variant agreed and ran ({})",
                self.stem_pool_note
            ));
        };
        let wins =
            cfg.opts.stem_pool == StemPoolChoice::Kernel || t_cudnn.is_none_or(|t| t_kernel < t);
        Ok(Found {
            variant: wins.then_some(variant),
            geometry,
        })
    }

    /// cuDNN's stem, then the pool as planned (the first two steps).
    fn run_stem_then_pool(&self) -> Result<(), EngineError> {
        self.steps[..2].iter().try_for_each(|s| self.run_step(s))
    }

    /// Runs variant `f` into a zeroed `y` and compares its output with cuDNN's (`theirs`):
    /// the first value outside the math's tolerance, or `None`.
    #[allow(clippy::too_many_arguments)]
    fn check_stem_pool(
        &mut self,
        kernels: &Kernels,
        f: &StemPoolFn,
        geometry: &StemPoolGeometry,
        y: usize,
        bytes: usize,
        theirs: &[f32],
        tol: f32,
    ) -> Result<Option<usize>, EngineError> {
        // Zeroed first: a kernel that wrote nothing must not pass on cuDNN's answer.
        self.bufs.zero_act(y, bytes, &self.stream)?;
        let ExecStep::Conv(stem) = &self.steps[0] else {
            return Err(EngineError::Setup("the stem step moved".into()));
        };
        self.launch_stem_pool(kernels, f, geometry, stem, y)?;
        let mine = self.bufs.act_to_host(y, bytes, &self.stream)?;
        Ok(planner::first_disagreement(
            &self.elem.f32_from_bytes(&mine),
            theirs,
            tol,
        ))
    }

    fn launch_stem_pool(
        &self,
        kernels: &Kernels,
        f: &StemPoolFn,
        geometry: &StemPoolGeometry,
        stem: &ConvExec,
        y: usize,
    ) -> Result<(), EngineError> {
        let s = &self.stream;
        let bias = stem
            .bias
            .as_ref()
            .ok_or_else(|| EngineError::Setup("the stem has no bias".into()))?;
        kernels.stem_pool(
            s,
            f,
            geometry,
            self.bufs.act(stem.x, s),
            stem.weight.ptr(s),
            bias.f32.ptr(s),
            self.bufs.act(y, s),
        )
    }

    /// Replaces the first two steps (the stem and its pool) by the kernel's `variant`.
    fn fuse_stem_pool(
        &mut self,
        variant: usize,
        geometry: StemPoolGeometry,
    ) -> Result<(), EngineError> {
        let kernel = self
            .kernels
            .clone()
            .ok_or_else(|| EngineError::Setup("the kernels are not loaded".into()))?;
        if !matches!(
            self.steps.get(..2),
            Some([ExecStep::Conv(_), ExecStep::Pool(_)])
        ) {
            return Err(EngineError::Setup(
                "the first steps are not the stem and its pool".into(),
            ));
        }
        if !self.pool_note.is_empty() {
            self.pool_note = format!(
                "not run, the stem-and-pool kernel replaced it: {}",
                self.pool_note
            );
        }
        let mut first: Vec<ExecStep> = self.steps.drain(..2).collect();
        match (first.pop(), first.pop()) {
            (Some(ExecStep::Pool(pool)), Some(ExecStep::Conv(conv))) => {
                self.steps.insert(
                    0,
                    ExecStep::StemPool(Box::new(StemPoolExec {
                        conv,
                        pool,
                        kernel,
                        variant,
                        geometry,
                    })),
                );
                Ok(())
            }
            _ => Err(EngineError::Setup(
                "the first steps are not the stem and its pool".into(),
            )),
        }
    }

    pub(super) fn run_stem_pool(&self, sp: &StemPoolExec) -> Result<(), EngineError> {
        let f = sp.function(self.elem).ok_or_else(|| {
            EngineError::Setup(format!(
                "{}: the planned variant is gone",
                StemPoolExec::NAME
            ))
        })?;
        self.launch_stem_pool(&sp.kernel, f, &sp.geometry, &sp.conv, sp.pool.y)
    }
}
