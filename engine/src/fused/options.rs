//! The fused path's knobs as one typed, validated value. They used to be eight `FLEETMARK_*`
//! environment variables read deep inside the executor, where a bad value was silently
//! ignored; now the agent parses them once from its flags at start-up (a bad value stops it
//! there), they travel inside [`crate::device::BackendOptions`], and every result records them.

use std::{fmt, num::NonZeroUsize, str::FromStr};

pub use super::graph::{S2dChannels, StemInput, StemPad};
use crate::EngineError;

/// How a convolution's bias, residual and ReLU are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EpilogueChoice {
    /// Time both and keep the faster, per layer.
    #[default]
    Auto,
    /// cuDNN's fused conv+bias+residual+ReLU call wherever the layer has a ReLU.
    Api,
    /// Convolution, then separate bias/residual adds and ReLU.
    Separate,
}

/// Which plans are built and compared as whole forward passes. The default is `auto`: the
/// timed plan alone when layer candidates are timed inside a CUDA graph (it beat or tied
/// cuDNN's ranking at every batch and precision measured, docs/performance.md, "The defaults,
/// measured", in half the planning), both when they are timed launch by launch (there the
/// timed plan measures mostly the host at small batches and can lose to the ranking).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PlanChoice {
    /// `timed` under graph layer timing, else `both`.
    #[default]
    Auto,
    /// Both strategies; the faster whole graph wins.
    Both,
    /// Every ranked algorithm and epilogue timed layer by layer on the real buffers.
    Timed,
    /// cuDNN's own ranking, with the fused epilogue where it runs.
    Ranked,
}

/// How the stem's input is laid out (the flag keeps its old name, `--fused-stem-channels`).
/// The default is space-to-depth: it was the fastest stem at every batch and precision measured
/// once layers were timed inside a CUDA graph, and planning one or two stems instead of four
/// takes a quarter to half the time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StemChannels {
    /// Try space-to-depth and the plain paddings (s2d16, 8, 4, 3 in f16/bf16; s2d12, s2d16,
    /// 4, 3 in f32), and keep the fastest whole forward pass.
    Auto,
    /// Space-to-depth only, with the channel counts the planner picks for the precision (16 in
    /// f16/bf16; 12 and 16, timed, in f32).
    #[default]
    SpaceToDepth,
    /// Exactly this layout.
    Fixed(StemInput),
}
/// Which max pool runs after the stem. The default times both: the kernel was faster from
/// batch 16 up, cuDNN's at batch 1 (docs/performance.md, "The defaults, measured").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PoolChoice {
    /// Time cuDNN's pool and the path's own kernel on the real buffers and keep the faster;
    /// the kernel only once its output matched cuDNN's there.
    #[default]
    Auto,
    /// cuDNN's `cudnnPoolingForward`.
    Cudnn,
    /// The path's own kernel (`engine/kernels/maxpool.cu`); a plan fails if it cannot run it
    /// or its output differs from cuDNN's.
    Kernel,
}

/// Whether the space-to-depth stem and the max pool after it may run as one kernel of the
/// path's own (`engine/kernels/stem_pool.cu`), which keeps the stem's output in shared memory
/// and writes only the pooled result. On an H100 (2026-12-06, f16 batch 256) it took 0.50 ms
/// where cuDNN's stem and the pool kernel took 0.96 ms. f16 and bf16 only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StemPoolChoice {
    /// Check the kernel's output against cuDNN's stem and pool on the real buffers, time its
    /// variants against them, and keep the fastest.
    #[default]
    Auto,
    /// cuDNN's stem, then the pool `--fused-pool` picks.
    Off,
    /// The kernel; a plan fails where it cannot take the stem or its output differs.
    Kernel,
}

/// How a layer's candidate (algorithm and epilogue) is timed while planning. The default times
/// it as the forward pass will run it: inside a CUDA graph when the pass is one (launch-by-launch
/// timing counted the host's enqueue time and picked slower plans at small batches).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LayerTiming {
    /// Inside a CUDA graph when the forward pass is one, else launch by launch.
    #[default]
    Auto,
    /// Several runs captured into a CUDA graph and replayed: the GPU's time alone, as the
    /// forward pass's graph runs it.
    Graph,
    /// Launch by launch between two events: includes the host's enqueue time, which at small
    /// batches can be most of what is measured.
    Launch,
}

/// Which cuDNN API runs the convolutions. The default is `1x1`: the graph API raced against
/// the legacy calls for the four 1x1 convolutions only. Measured on an H100 (2026-12-06), it
/// was 5-6% faster than the legacy calls alone in f16 and bf16 at batches 64 and 256, 0.5-1.5%
/// elsewhere and nowhere slower, for 0.4-4 s of planning per job; `auto` (every layer) was
/// faster still at batch 1 (about 13% in f16) but took 35 and 65 s per job to plan at batches
/// 64 and 256 (docs/performance.md, "The defaults, measured" and "Layer 2's
/// downsample").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConvApi {
    /// Per layer, the legacy algorithms and the graph API's engine configurations are timed
    /// together and the fastest kept.
    Auto,
    /// `cudnnConvolutionBiasActivationForward` and friends, algorithms ranked by `FindEx`.
    Legacy,
    /// Only the graph (backend) API: each convolution with its epilogue as an operation graph,
    /// engine configurations from cuDNN's heuristics plus split-K variants, timed.
    Graph,
    /// `auto` for the 1x1 convolutions (the three downsamples and the classifier), the legacy
    /// API for the rest. On an H100 at f16 batch 256 the legacy API had only `implicit_gemm`
    /// for layer 2's downsample within the workspace cap (0.189 ms, against the graph API's
    /// 0.034 ms), while at that point no 3x3 layer ran faster through the graph API; the 3x3
    /// layers are where most of its planning time goes.
    #[default]
    OneByOne,
}

/// Whether the stem and the max pool after it run over the batch a few images at a time.
///
/// Why: the stem's output is the largest activation of the network (1.6 MB per 224-pixel image
/// in f16, 411 MB at batch 256), written once by the stem and read once by the pool. Run chunk
/// by chunk into one small buffer, it can stay in the GPU's L2 cache between the two, and the
/// buffer is reused, so neither the write nor the read need reach memory.
///
/// Off by default: measured, the chunked stem lost at every batch and precision (at batch 256
/// in f16, 3.20 ms against 2.78 ms for the whole batch; docs/performance.md, "The defaults,
/// measured").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StemChunk {
    /// The whole batch at once.
    #[default]
    Off,
    /// Plan both the whole batch and chunks whose stem output fits
    /// [`crate::fused::planner::STEM_CHUNK_BYTES`], and keep the faster whole forward pass.
    Auto,
    /// At most this many images per chunk: the largest divisor of the batch not above it (a
    /// chunk as large as the batch is no chunking).
    Images(NonZeroUsize),
}

/// Every knob of the fused GPU path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FusedOptions {
    /// Capture the forward pass into one CUDA graph and replay it.
    pub cuda_graph: bool,
    pub epilogue: EpilogueChoice,
    pub stem: StemChannels,
    /// Let f32 convolutions use TF32 tensor cores where the GPU has them (sm_80 and up).
    pub tf32: bool,
    /// How many of cuDNN's ranked algorithms are timed per layer.
    pub algo_candidates: NonZeroUsize,
    /// Largest workspace one convolution may use, in bytes; `None`: a quarter of the
    /// activation slab, at least 64 MiB.
    pub workspace_limit: Option<usize>,
    pub plan: PlanChoice,
    pub pool: PoolChoice,
    pub stem_pool: StemPoolChoice,
    pub layer_timing: LayerTiming,
    pub conv_api: ConvApi,
    pub stem_chunk: StemChunk,
    /// Time each step on its own and record it in the result (for docs/performance.md).
    pub profile: bool,
}

/// Most algorithms cuDNN ranks for one convolution.
pub const MAX_ALGO_CANDIDATES: usize = 8;

impl Default for FusedOptions {
    fn default() -> Self {
        FusedOptions {
            cuda_graph: true,
            epilogue: EpilogueChoice::default(),
            stem: StemChannels::default(),
            tf32: true,
            algo_candidates: NonZeroUsize::new(MAX_ALGO_CANDIDATES).expect("nonzero"),
            workspace_limit: None,
            plan: PlanChoice::default(),
            pool: PoolChoice::default(),
            stem_pool: StemPoolChoice::default(),
            layer_timing: LayerTiming::default(),
            conv_api: ConvApi::default(),
            stem_chunk: StemChunk::default(),
            profile: false,
        }
    }
}

impl FusedOptions {
    /// Checks the values together; the agent calls this once at start-up.
    pub fn validate(&self) -> Result<(), EngineError> {
        if self.algo_candidates.get() > MAX_ALGO_CANDIDATES {
            return Err(EngineError::Setup(format!(
                "fused algorithm candidates must be 1 to {MAX_ALGO_CANDIDATES}, not {}",
                self.algo_candidates
            )));
        }
        if self.workspace_limit == Some(0) {
            return Err(EngineError::Setup(
                "a fused workspace limit of 0 bytes leaves no algorithm for some layers; \
                 leave it unset for the default"
                    .into(),
            ));
        }
        Ok(())
    }

    /// One line for a result's details, so every number says how it was made.
    pub fn summary(&self) -> String {
        format!(
            "cuda_graph={} epilogue={} stem={} tf32={} algo_candidates={} workspace_limit={} \
             plan={} pool={} stem_pool={} layer_timing={} conv_api={} stem_chunk={} profile={}",
            on_off(self.cuda_graph),
            self.epilogue,
            self.stem,
            on_off(self.tf32),
            self.algo_candidates,
            self.workspace_limit
                .map_or_else(|| "auto".to_string(), |b| b.to_string()),
            self.plan,
            self.pool,
            self.stem_pool,
            self.layer_timing,
            self.conv_api,
            self.stem_chunk,
            on_off(self.profile),
        )
    }
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

fn bad(what: &str, given: &str, expected: &str) -> EngineError {
    EngineError::Setup(format!("unknown {what} '{given}': expected {expected}"))
}

impl FromStr for EpilogueChoice {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(EpilogueChoice::Auto),
            "api" => Ok(EpilogueChoice::Api),
            "separate" => Ok(EpilogueChoice::Separate),
            _ => Err(bad("epilogue", s, "auto, api or separate")),
        }
    }
}

impl fmt::Display for EpilogueChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EpilogueChoice::Auto => "auto",
            EpilogueChoice::Api => "api",
            EpilogueChoice::Separate => "separate",
        })
    }
}

impl FromStr for PlanChoice {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(PlanChoice::Auto),
            "both" => Ok(PlanChoice::Both),
            "timed" => Ok(PlanChoice::Timed),
            "ranked" => Ok(PlanChoice::Ranked),
            _ => Err(bad("plan", s, "auto, both, timed or ranked")),
        }
    }
}

impl fmt::Display for PlanChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PlanChoice::Auto => "auto",
            PlanChoice::Both => "both",
            PlanChoice::Timed => "timed",
            PlanChoice::Ranked => "ranked",
        })
    }
}

impl FromStr for PoolChoice {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(PoolChoice::Auto),
            "cudnn" => Ok(PoolChoice::Cudnn),
            "kernel" => Ok(PoolChoice::Kernel),
            _ => Err(bad("pool", s, "auto, cudnn or kernel")),
        }
    }
}

impl fmt::Display for PoolChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PoolChoice::Auto => "auto",
            PoolChoice::Cudnn => "cudnn",
            PoolChoice::Kernel => "kernel",
        })
    }
}

impl FromStr for StemPoolChoice {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(StemPoolChoice::Auto),
            "off" => Ok(StemPoolChoice::Off),
            "kernel" => Ok(StemPoolChoice::Kernel),
            _ => Err(bad("stem pool", s, "auto, off or kernel")),
        }
    }
}

impl fmt::Display for StemPoolChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StemPoolChoice::Auto => "auto",
            StemPoolChoice::Off => "off",
            StemPoolChoice::Kernel => "kernel",
        })
    }
}

impl FromStr for ConvApi {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(ConvApi::Auto),
            "legacy" => Ok(ConvApi::Legacy),
            "graph" => Ok(ConvApi::Graph),
            "1x1" => Ok(ConvApi::OneByOne),
            _ => Err(bad("convolution API", s, "auto, legacy, graph or 1x1")),
        }
    }
}

impl fmt::Display for ConvApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConvApi::Auto => "auto",
            ConvApi::Legacy => "legacy",
            ConvApi::Graph => "graph",
            ConvApi::OneByOne => "1x1",
        })
    }
}

impl FromStr for StemChunk {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" => Ok(StemChunk::Off),
            "auto" => Ok(StemChunk::Auto),
            _ => s
                .parse::<NonZeroUsize>()
                .map(StemChunk::Images)
                .map_err(|_| {
                    bad(
                        "stem chunk",
                        s,
                        "off, auto or a number of images (1 or more)",
                    )
                }),
        }
    }
}

impl fmt::Display for StemChunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StemChunk::Off => f.write_str("off"),
            StemChunk::Auto => f.write_str("auto"),
            StemChunk::Images(n) => write!(f, "{n}"),
        }
    }
}

impl FromStr for LayerTiming {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(LayerTiming::Auto),
            "graph" => Ok(LayerTiming::Graph),
            "launch" => Ok(LayerTiming::Launch),
            _ => Err(bad("layer timing", s, "auto, graph or launch")),
        }
    }
}

impl fmt::Display for LayerTiming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LayerTiming::Auto => "auto",
            LayerTiming::Graph => "graph",
            LayerTiming::Launch => "launch",
        })
    }
}

impl FromStr for StemChannels {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(StemChannels::Auto),
            "s2d" => Ok(StemChannels::SpaceToDepth),
            _ => s.parse().map(StemChannels::Fixed).map_err(|_| {
                bad(
                    "stem layout",
                    s,
                    "auto, 3, 4, 8 (channels padded to), s2d, s2d12 or s2d16 (space-to-depth)",
                )
            }),
        }
    }
}

impl fmt::Display for StemChannels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StemChannels::Auto => f.write_str("auto"),
            StemChannels::SpaceToDepth => f.write_str("s2d"),
            StemChannels::Fixed(stem) => fmt::Display::fmt(stem, f),
        }
    }
}

impl FromStr for StemInput {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "3" => Ok(StemInput::Padded(StemPad::C3)),
            "4" => Ok(StemInput::Padded(StemPad::C4)),
            "8" => Ok(StemInput::Padded(StemPad::C8)),
            "s2d12" => Ok(StemInput::SpaceToDepth(S2dChannels::C12)),
            "s2d16" => Ok(StemInput::SpaceToDepth(S2dChannels::C16)),
            _ => Err(bad("stem layout", s, "3, 4, 8, s2d12 or s2d16")),
        }
    }
}

/// `3`, `4` or `8` for a padded stem, `s2d12` or `s2d16` for space-to-depth: the option's
/// spelling, also used in `backend.details.stem_search`.
impl fmt::Display for StemInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StemInput::Padded(p) => write!(f, "{}", p.channels()),
            StemInput::SpaceToDepth(c) => write!(f, "s2d{}", c.channels()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_values_are_errors_not_defaults() {
        // These used to fall back silently: FLEETMARK_EPILOGUE=apii ran `auto`.
        let e = "apii".parse::<EpilogueChoice>().unwrap_err().to_string();
        assert!(e.contains("unknown epilogue 'apii'"), "{e}");
        assert!("5".parse::<StemChannels>().is_err());
        assert!("fast".parse::<PlanChoice>().is_err());
        let e = "cuDNN".parse::<PoolChoice>().unwrap_err().to_string();
        assert!(
            e.contains("unknown pool 'cuDNN'") && e.contains("kernel"),
            "{e}"
        );
        let e = "graphs".parse::<LayerTiming>().unwrap_err().to_string();
        assert!(e.contains("unknown layer timing 'graphs'"), "{e}");
        let e = "backend".parse::<ConvApi>().unwrap_err().to_string();
        assert!(
            e.contains("unknown convolution API 'backend'") && e.contains("legacy"),
            "{e}"
        );
        assert_eq!(
            "8".parse::<StemChannels>().unwrap(),
            StemChannels::Fixed(StemInput::Padded(StemPad::C8))
        );
        assert_eq!(
            "s2d16".parse::<StemChannels>().unwrap(),
            StemChannels::Fixed(StemInput::SpaceToDepth(S2dChannels::C16))
        );
        assert_eq!(
            "s2d".parse::<StemChannels>().unwrap(),
            StemChannels::SpaceToDepth
        );
        for wrong in ["s2d8", "s2d13", "S2D", "16", "12", "", "s2d 16"] {
            let e = wrong.parse::<StemChannels>().unwrap_err().to_string();
            assert!(
                e.contains(&format!("unknown stem layout '{wrong}'")) && e.contains("s2d16"),
                "{e}"
            );
        }
        for wrong in ["0", "-1", "on", "8x", ""] {
            let e = wrong.parse::<StemChunk>().unwrap_err().to_string();
            assert!(e.contains(&format!("unknown stem chunk '{wrong}'")), "{e}");
        }
        for (text, v) in [
            ("off", StemChunk::Off),
            ("auto", StemChunk::Auto),
            ("8", StemChunk::Images(NonZeroUsize::new(8).unwrap())),
        ] {
            assert_eq!(text.parse::<StemChunk>().unwrap(), v);
            assert_eq!(v.to_string(), text);
        }
        let mut o = FusedOptions {
            algo_candidates: NonZeroUsize::new(9).unwrap(),
            ..Default::default()
        };
        assert!(o.validate().is_err());
        o.algo_candidates = NonZeroUsize::new(1).unwrap();
        o.workspace_limit = Some(0);
        assert!(o.validate().is_err());
        assert!(FusedOptions::default().validate().is_ok());
    }

    #[test]
    fn every_stem_value_reads_back_as_it_prints() {
        let all = [
            StemChannels::Auto,
            StemChannels::SpaceToDepth,
            StemChannels::Fixed(StemInput::Padded(StemPad::C3)),
            StemChannels::Fixed(StemInput::Padded(StemPad::C4)),
            StemChannels::Fixed(StemInput::Padded(StemPad::C8)),
            StemChannels::Fixed(StemInput::SpaceToDepth(S2dChannels::C12)),
            StemChannels::Fixed(StemInput::SpaceToDepth(S2dChannels::C16)),
        ];
        let printed: Vec<String> = all.iter().map(|v| v.to_string()).collect();
        assert_eq!(printed, ["auto", "s2d", "3", "4", "8", "s2d12", "s2d16"]);
        for (v, p) in all.iter().zip(&printed) {
            assert_eq!(p.parse::<StemChannels>().unwrap(), *v, "{p}");
        }
        for (v, e) in [
            EpilogueChoice::Auto,
            EpilogueChoice::Api,
            EpilogueChoice::Separate,
        ]
        .iter()
        .map(|v| (v, v.to_string()))
        {
            assert_eq!(e.parse::<EpilogueChoice>().unwrap(), *v);
        }
        for (v, e) in [
            PlanChoice::Auto,
            PlanChoice::Both,
            PlanChoice::Timed,
            PlanChoice::Ranked,
        ]
        .iter()
        .map(|v| (v, v.to_string()))
        {
            assert_eq!(e.parse::<PlanChoice>().unwrap(), *v);
        }
        for v in [PoolChoice::Auto, PoolChoice::Cudnn, PoolChoice::Kernel] {
            assert_eq!(v.to_string().parse::<PoolChoice>().unwrap(), v);
        }
        for v in [
            StemPoolChoice::Auto,
            StemPoolChoice::Off,
            StemPoolChoice::Kernel,
        ] {
            assert_eq!(v.to_string().parse::<StemPoolChoice>().unwrap(), v);
        }
        let e = "on".parse::<StemPoolChoice>().unwrap_err().to_string();
        assert!(
            e.contains("unknown stem pool 'on'") && e.contains("auto, off or kernel"),
            "{e}"
        );
        for v in [
            ConvApi::Auto,
            ConvApi::Legacy,
            ConvApi::Graph,
            ConvApi::OneByOne,
        ] {
            assert_eq!(v.to_string().parse::<ConvApi>().unwrap(), v);
        }
        for v in [LayerTiming::Auto, LayerTiming::Graph, LayerTiming::Launch] {
            assert_eq!(v.to_string().parse::<LayerTiming>().unwrap(), v);
        }
    }

    #[test]
    fn every_knob_appears_in_the_summary() {
        let o = FusedOptions {
            tf32: false,
            stem: StemChannels::Fixed(StemInput::Padded(StemPad::C4)),
            ..Default::default()
        };
        assert_eq!(
            o.summary(),
            "cuda_graph=on epilogue=auto stem=4 tf32=off algo_candidates=8 \
             workspace_limit=auto plan=auto pool=auto stem_pool=auto layer_timing=auto conv_api=1x1 \
             stem_chunk=off profile=off"
        );
    }
}
