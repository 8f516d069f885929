//! The fused path's decisions, as pure functions of the [`FusedOptions`], the job and the
//! device: which stem layouts and plan strategies are tried, which epilogues each layer may
//! use, how much workspace an algorithm may take, and the math the result reports. The
//! executor measures; this module decides what it measures and how the winner is picked.

use fleetmark_core::{capability::cuda_math, ComputeCapability, MathMode, Precision};

use super::{
    graph::{S2dChannels, StemInput, StemPad},
    options::{EpilogueChoice, FusedOptions, PlanChoice, StemChannels},
};

/// How each layer's algorithm is picked. Timing single layers launch by launch measures launch
/// overhead too, which a CUDA graph removes, so at small batches it can mislead; cuDNN's own
/// ranking times kernels alone. Both plans are built and the whole graphs compared.
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

pub fn strategies(opts: &FusedOptions) -> Vec<PlanStrategy> {
    match opts.plan {
        PlanChoice::Both => vec![PlanStrategy::Timed, PlanStrategy::Ranked],
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
    let joined = failures.join("; ");
    let max = fleetmark_core::limits::MAX_TEXT_CHARS;
    if joined.chars().count() <= max {
        return joined;
    }
    let mut cut: String = joined.chars().take(max - 1).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: Vec<StemInput>) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_options_decide_what_is_tried() {
        let mut o = FusedOptions::default();
        let tried = |o: &FusedOptions, p| names(stem_candidates(o, p));
        assert_eq!(tried(&o, Precision::F16), ["s2d16", "8", "4", "3"]);
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
    fn failures_detail_fits_a_result_detail() {
        let one = vec!["s2d16/timed: unsupported: no plan".to_string()];
        assert_eq!(failures_detail(&one), "s2d16/timed: unsupported: no plan");
        let many: Vec<String> = (0..8)
            .map(|i| format!("cand{i}: {}", "é".repeat(200)))
            .collect();
        let d = failures_detail(&many);
        assert_eq!(d.chars().count(), fleetmark_core::limits::MAX_TEXT_CHARS);
        assert!(d.ends_with('…') && d.starts_with("cand0: "));
        let mut details = std::collections::BTreeMap::new();
        details.insert("stem_search_failures".to_string(), d);
        fleetmark_core::limits::check_text(
            "a backend detail",
            &details["stem_search_failures"],
            fleetmark_core::limits::MAX_TEXT_CHARS,
        )
        .expect("fits");
    }
}
