//! One benchmark job: a single (model, batch, precision, hardware) point of a sweep, and the
//! measurement rules it runs under.

use std::{fmt, str::FromStr, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{CoreError, HardwareTarget, Percentile, Precision};

/// Largest batch a job may ask for. ResNet18 at 224x224 needs about 0.6 MB of f32 input per
/// image; 4096 is already past what any card in the fleet benefits from.
pub const MAX_BATCH: u32 = 4096;
pub const MIN_IMAGE_SIZE: u32 = 32;
pub const MAX_IMAGE_SIZE: u32 = 1024;
/// Largest batch × image area: batch 4096 at 224x224. Past this the input alone is gigabytes
/// and activations tens of gigabytes, enough to take down the agent that claims the job.
pub const MAX_PIXELS_PER_BATCH: u64 = 4096 * 224 * 224;

/// Which implementation of the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum EnginePath {
    /// The fastest path the agent's backend has (fused on CUDA, folded batch norm on the CPU).
    #[default]
    Auto,
    /// Stock candle-nn layers, batch norm kept as its own op.
    Stock,
    /// The optimised path: batch norm folded into the convolutions; on CUDA, cuDNN with cached
    /// plans, NHWC tensors, fused epilogues and a captured CUDA graph.
    Fused,
}

impl EnginePath {
    pub fn as_str(self) -> &'static str {
        match self {
            EnginePath::Auto => "auto",
            EnginePath::Stock => "stock",
            EnginePath::Fused => "fused",
        }
    }
}

impl fmt::Display for EnginePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EnginePath {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(EnginePath::Auto),
            "stock" => Ok(EnginePath::Stock),
            "fused" | "optimised" | "optimized" => Ok(EnginePath::Fused),
            _ => Err(CoreError::UnknownEnginePath {
                given: s.to_string(),
            }),
        }
    }
}

impl TryFrom<String> for EnginePath {
    type Error = CoreError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<EnginePath> for String {
    fn from(p: EnginePath) -> Self {
        p.as_str().to_string()
    }
}

/// Where the model's weights come from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum WeightsSpec {
    /// Deterministic random initialisation from a seed: the same on every agent.
    Seeded { seed: u64 },
    /// A safetensors file with torchvision's `state_dict` names, in the directory the agent's
    /// operator allows (`--weights-dir`): a plain file name there, or `sha256:<hex>` for the
    /// file in it with that content hash. Never a path: see [`WeightsRef`].
    File { path: String },
}

/// What a file-weights spec may name: a plain file name inside the agent's weights directory,
/// or the content hash of a file in it. Anything else (a path, `..`, a separator) is refused
/// when the sweep is validated, so no sweep can point an agent outside that directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightsRef {
    Name(String),
    Sha256(String),
}

/// Longest weights file name, in characters.
pub const MAX_WEIGHTS_NAME_CHARS: usize = 255;

impl WeightsRef {
    pub fn parse(s: &str) -> Result<Self, CoreError> {
        let bad = |why: &str| {
            Err(CoreError::InvalidWeights(format!(
                "'{}' {why}: name a file in the agent's --weights-dir, or sha256:<64 hex digits>",
                crate::limits::Excerpt::of(s)
            )))
        };
        if let Some(hex) = s.strip_prefix("sha256:") {
            if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Ok(WeightsRef::Sha256(hex.to_ascii_lowercase()));
            }
            return bad("is not a SHA-256 hash");
        }
        if s.is_empty() || s.chars().count() > MAX_WEIGHTS_NAME_CHARS {
            return bad("is not a file name");
        }
        if s == "." || s == ".." || s.contains(['/', '\\', '\0']) {
            return bad("is a path, not a file name");
        }
        if s.starts_with('.') {
            return bad("is a hidden file");
        }
        Ok(WeightsRef::Name(s.to_string()))
    }
}

impl WeightsSpec {
    pub fn validate(&self) -> Result<(), CoreError> {
        match self {
            WeightsSpec::Seeded { .. } => Ok(()),
            WeightsSpec::File { path } => WeightsRef::parse(path).map(|_| ()),
        }
    }
}

impl Default for WeightsSpec {
    fn default() -> Self {
        WeightsSpec::Seeded { seed: 0 }
    }
}

/// How a job is measured. Timing stops once both the iteration count and the duration minimum
/// are met **and** the stability rule holds (the last `stability_windows` windows agree within
/// `stability_tolerance`, and the percentile target, if any, is met), or at `max_duration` or
/// `max_iterations`, whichever comes first. See `docs/measurement.md`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeasurementSpec {
    pub warmup_iterations: u32,
    #[serde(with = "humantime_serde")]
    pub warmup_duration: Duration,
    pub min_iterations: u32,
    #[serde(with = "humantime_serde")]
    pub min_duration: Duration,
    #[serde(with = "humantime_serde")]
    pub max_duration: Duration,
    /// Time the host-to-device copy of each input batch separately.
    pub time_input_copy: bool,
    /// How many of the most recent windows must agree before timing may stop (k).
    pub stability_windows: u32,
    /// The least timed (device) time in one window.
    #[serde(with = "humantime_serde")]
    pub stability_window: Duration,
    /// How far the windows' throughputs may differ: max/min - 1 at most this (0.05 = 5%).
    pub stability_tolerance: Fraction,
    /// Timing stops after this many iterations whatever else holds.
    pub max_iterations: u32,
    /// Optionally, a percentile whose 95% interval must be this tight before timing stops.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub percentile_target: Option<PercentileTarget>,
}

/// Defaults of the stability rule: three windows of at least one second within 5%.
pub const DEFAULT_STABILITY_WINDOWS: u32 = 3;
pub const DEFAULT_STABILITY_WINDOW: Duration = Duration::from_secs(1);
pub const DEFAULT_STABILITY_TOLERANCE: f64 = 0.05;
/// 8 MB of raw latencies per result at most.
pub const MAX_ITERATIONS_LIMIT: u32 = 1_000_000;
/// Shortest window allowed: below this a window is one iteration of noise.
pub const MIN_STABILITY_WINDOW: Duration = Duration::from_millis(10);
/// Most windows one job may close (max_duration / stability_window): bounds the record size.
pub const MAX_WINDOWS: u128 = 100_000;

impl Default for MeasurementSpec {
    fn default() -> Self {
        MeasurementSpec {
            warmup_iterations: 10,
            warmup_duration: Duration::from_millis(500),
            min_iterations: 50,
            min_duration: Duration::from_secs(5),
            max_duration: Duration::from_secs(120),
            time_input_copy: false,
            stability_windows: DEFAULT_STABILITY_WINDOWS,
            stability_window: DEFAULT_STABILITY_WINDOW,
            stability_tolerance: Fraction(DEFAULT_STABILITY_TOLERANCE),
            max_iterations: MAX_ITERATIONS_LIMIT,
            percentile_target: None,
        }
    }
}

/// A non-negative fraction (0.05 = 5%) that can live in `Eq + Hash` specs: compared by its bits.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Fraction(pub f64);

impl PartialEq for Fraction {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_bits() == other.0.to_bits()
    }
}

impl Eq for Fraction {}

impl std::hash::Hash for Fraction {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.to_bits().hash(state);
    }
}

/// "Run until the 95% interval of `percentile` is within `within` of its estimate", as
/// LoadGen's early stopping runs until a percentile can be claimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PercentileTarget {
    pub percentile: Percentile,
    /// Largest allowed relative half-width of the interval: 0.05 = within 5%.
    pub within: Fraction,
}

impl MeasurementSpec {
    pub fn validate(&self) -> Result<(), CoreError> {
        if self.min_iterations == 0 {
            return Err(CoreError::InvalidSweep(
                "min_iterations must be at least 1".into(),
            ));
        }
        if self.min_iterations > 1_000_000 {
            return Err(CoreError::InvalidSweep(format!(
                "min_iterations {} is absurd: at most 1000000",
                self.min_iterations
            )));
        }
        if self.warmup_iterations > 100_000 {
            return Err(CoreError::InvalidSweep(format!(
                "warmup_iterations {} is absurd: at most 100000",
                self.warmup_iterations
            )));
        }
        if self.max_duration < self.min_duration {
            return Err(CoreError::InvalidSweep(format!(
                "max_duration ({}) is shorter than min_duration ({})",
                humantime::format_duration(self.max_duration),
                humantime::format_duration(self.min_duration)
            )));
        }
        if self.max_duration > Duration::from_secs(3600) {
            return Err(CoreError::InvalidSweep(
                "max_duration is over an hour per job".into(),
            ));
        }
        self.validate_stability()
    }

    fn validate_stability(&self) -> Result<(), CoreError> {
        let bad = |m: String| Err(CoreError::InvalidSweep(m));
        if !(2..=100).contains(&self.stability_windows) {
            return bad(format!(
                "stability_windows must be between 2 and 100, not {}",
                self.stability_windows
            ));
        }
        if self.stability_window < MIN_STABILITY_WINDOW {
            return bad(format!(
                "stability_window ({}) is shorter than {}",
                humantime::format_duration(self.stability_window),
                humantime::format_duration(MIN_STABILITY_WINDOW)
            ));
        }
        if !self.stability_window.subsec_nanos().is_multiple_of(1000) {
            return bad("stability_window must be a whole number of microseconds".into());
        }
        if self.stability_window * self.stability_windows > self.max_duration {
            return bad(format!(
                "{} stability windows of {} do not fit in max_duration ({}): timing could never \
                 be found stable",
                self.stability_windows,
                humantime::format_duration(self.stability_window),
                humantime::format_duration(self.max_duration)
            ));
        }
        if self.max_duration.as_nanos() / self.stability_window.as_nanos() > MAX_WINDOWS {
            return bad(format!(
                "max_duration / stability_window is over {MAX_WINDOWS} windows: use a longer \
                 stability_window"
            ));
        }
        let tol = self.stability_tolerance.0;
        if !(tol.is_finite() && tol > 0.0 && tol <= 10.0) {
            return bad(format!(
                "stability_tolerance must be a fraction above 0 and at most 10 (0.05 = 5%), not \
                 {}",
                crate::limits::Num(tol)
            ));
        }
        if self.max_iterations < self.min_iterations || self.max_iterations > MAX_ITERATIONS_LIMIT {
            return bad(format!(
                "max_iterations must be between min_iterations ({}) and {MAX_ITERATIONS_LIMIT}, \
                 not {}",
                self.min_iterations, self.max_iterations
            ));
        }
        if let Some(t) = &self.percentile_target {
            let w = t.within.0;
            if !(w.is_finite() && w > 0.0 && w <= 1.0) {
                return bad(format!(
                    "percentile_target.within must be a fraction above 0 and at most 1 (0.05 = \
                     5%), not {}",
                    crate::limits::Num(w)
                ));
            }
        }
        Ok(())
    }
}

/// One point of a sweep, as an agent receives it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub model: String,
    pub batch_size: u32,
    pub precision: Precision,
    pub image_size: u32,
    pub target: HardwareTarget,
    #[serde(default)]
    pub engine: EnginePath,
    #[serde(default)]
    pub weights: WeightsSpec,
    #[serde(default)]
    pub measurement: MeasurementSpec,
    /// Which repetition of this point (0-based) when a sweep repeats points.
    #[serde(default)]
    pub repetition: u32,
}

impl JobSpec {
    pub fn validate(&self) -> Result<(), CoreError> {
        if !crate::KNOWN_MODELS.contains(&self.model.as_str()) {
            return Err(CoreError::UnknownModel {
                given: self.model.clone(),
                known: crate::KNOWN_MODELS.join(", "),
            });
        }
        validate_batch(self.batch_size as u64)?;
        if !(MIN_IMAGE_SIZE..=MAX_IMAGE_SIZE).contains(&self.image_size) {
            return Err(CoreError::ImageSizeOutOfRange {
                given: self.image_size,
                min: MIN_IMAGE_SIZE,
                max: MAX_IMAGE_SIZE,
            });
        }
        validate_batch_area(self.batch_size as u64, self.image_size)?;
        self.weights.validate()?;
        self.measurement.validate()
    }

    /// A one-line label for logs and progress bars.
    pub fn label(&self) -> String {
        format!(
            "{} b{} {} {} {}px",
            self.model, self.batch_size, self.precision, self.target, self.image_size
        )
    }
}

/// Batch and image size together must stay within [`MAX_PIXELS_PER_BATCH`].
pub fn validate_batch_area(batch: u64, image_size: u32) -> Result<(), CoreError> {
    let pixels = batch.saturating_mul(image_size as u64 * image_size as u64);
    if pixels > MAX_PIXELS_PER_BATCH {
        let max_batch = MAX_PIXELS_PER_BATCH / (image_size as u64 * image_size as u64);
        return Err(CoreError::InvalidSweep(format!(
            "batch {batch} at {image_size}x{image_size} is too large: at that image size the \
             largest batch is {max_batch}"
        )));
    }
    Ok(())
}

pub fn validate_batch(batch: u64) -> Result<u32, CoreError> {
    if batch == 0 || batch > MAX_BATCH as u64 {
        return Err(CoreError::BatchOutOfRange {
            given: batch,
            max: MAX_BATCH,
        });
    }
    Ok(batch as u32)
}

/// Where a job is in its life. The database enforces the same transitions (see the
/// `jobs_check_transition` trigger); this enum exists so code can name the states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Pending,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "pending" => JobState::Pending,
            "running" => JobState::Running,
            "succeeded" => JobState::Succeeded,
            "failed" => JobState::Failed,
            "cancelled" => JobState::Cancelled,
            other => return Err(format!("unknown job state '{other}'")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_limits() {
        assert!(validate_batch(0).is_err());
        assert!(validate_batch(100_000)
            .unwrap_err()
            .to_string()
            .contains("batch size 100000 is out of range"));
        assert_eq!(validate_batch(256).unwrap(), 256);
    }

    #[test]
    fn large_images_limit_the_batch() {
        assert!(validate_batch_area(4096, 224).is_ok());
        let e = validate_batch_area(4096, 1024).unwrap_err().to_string();
        assert!(e.contains("largest batch is 196"), "{e}");
        assert!(validate_batch_area(196, 1024).is_ok());
    }

    #[test]
    fn measurement_rejects_inverted_durations() {
        let m = MeasurementSpec {
            min_duration: Duration::from_secs(10),
            max_duration: Duration::from_secs(1),
            ..Default::default()
        };
        assert!(m
            .validate()
            .unwrap_err()
            .to_string()
            .contains("shorter than min_duration"));
    }
}
