//! Sweep specifications: the cross product of batch sizes, precisions and hardware that a user
//! submits, read from flags or from a TOML file, validated before anything is queued.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::{
    job::{validate_batch, validate_batch_area, MAX_IMAGE_SIZE, MIN_IMAGE_SIZE},
    limits::{check_name, Excerpt, MAX_ERROR_CHARS, MAX_SWEEP_TOML_BYTES},
    CoreError, EnginePath, HardwareTarget, JobSpec, MeasurementSpec, Precision, WeightsSpec,
};

/// Most jobs one sweep may expand to; a bigger one is almost certainly a typo.
pub const MAX_JOBS_PER_SWEEP: usize = 10_000;

fn default_model() -> String {
    "resnet18".into()
}
fn default_image_size() -> u32 {
    224
}
fn default_targets() -> Vec<HardwareTarget> {
    vec![HardwareTarget::Any]
}
fn default_repetitions() -> u32 {
    1
}

/// A sweep as a user writes it.
///
/// ```toml
/// name = "t4-article"
/// model = "resnet18"
/// batch_sizes = [1, 8, 16, 32]
/// precisions = ["f32", "f16"]
/// gpus = ["t4", "h100"]
///
/// [measurement]
/// warmup_iterations = 10
/// min_iterations = 50
/// min_duration = "5s"
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepSpec {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default = "default_model")]
    pub model: String,
    pub batch_sizes: Vec<u64>,
    pub precisions: Vec<Precision>,
    #[serde(default = "default_targets")]
    pub gpus: Vec<HardwareTarget>,
    #[serde(default = "default_image_size")]
    pub image_size: u32,
    #[serde(default = "default_repetitions")]
    pub repetitions: u32,
    #[serde(default)]
    pub engine: EnginePath,
    #[serde(default)]
    pub weights: WeightsSpec,
    #[serde(default)]
    pub measurement: MeasurementSpec,
}

impl SweepSpec {
    /// Parses and validates a TOML sweep file's contents.
    /// Text over [`MAX_SWEEP_TOML_BYTES`] is refused before it is parsed, and a parse error
    /// quotes at most a short excerpt of the input.
    pub fn from_toml(text: &str) -> Result<Self, CoreError> {
        if text.len() > MAX_SWEEP_TOML_BYTES {
            return Err(CoreError::MalformedSweep(format!(
                "the sweep is {} bytes; at most {MAX_SWEEP_TOML_BYTES} are allowed",
                text.len()
            )));
        }
        if text.contains('\0') {
            return Err(CoreError::MalformedSweep(
                "the sweep contains a NUL byte".into(),
            ));
        }
        let spec: SweepSpec = toml::from_str(text).map_err(|e| {
            let mut msg = e.message().to_string();
            if let Some(span) = e.span() {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                msg = format!("line {line}: {msg}");
            }
            CoreError::MalformedSweep(Excerpt::at_most(&msg, MAX_ERROR_CHARS).to_string())
        })?;
        spec.validate()?;
        Ok(spec)
    }

    pub fn validate(&self) -> Result<(), CoreError> {
        if !crate::KNOWN_MODELS.contains(&self.model.as_str()) {
            return Err(CoreError::UnknownModel {
                given: self.model.clone(),
                known: crate::KNOWN_MODELS.join(", "),
            });
        }
        if self.batch_sizes.is_empty() {
            return Err(CoreError::InvalidSweep("batch_sizes is empty".into()));
        }
        for &b in &self.batch_sizes {
            validate_batch(b)?;
        }
        if self.precisions.is_empty() {
            return Err(CoreError::InvalidSweep("precisions is empty".into()));
        }
        if self.gpus.is_empty() {
            return Err(CoreError::InvalidSweep(
                "gpus is empty (use \"any\" to run anywhere)".into(),
            ));
        }
        if !(MIN_IMAGE_SIZE..=MAX_IMAGE_SIZE).contains(&self.image_size) {
            return Err(CoreError::ImageSizeOutOfRange {
                given: self.image_size,
                min: MIN_IMAGE_SIZE,
                max: MAX_IMAGE_SIZE,
            });
        }
        for &b in &self.batch_sizes {
            validate_batch_area(b, self.image_size)?;
        }
        if self.repetitions == 0 || self.repetitions > 1000 {
            return Err(CoreError::InvalidSweep(format!(
                "repetitions must be between 1 and 1000, not {}",
                self.repetitions
            )));
        }
        if let Some(name) = &self.name {
            check_name("the sweep name", name)?;
        }
        self.weights.validate()?;
        self.measurement.validate()?;
        self.check_targets_can_run()?;
        let jobs = self.job_count();
        if jobs > MAX_JOBS_PER_SWEEP {
            return Err(CoreError::InvalidSweep(format!(
                "the sweep expands to {jobs} jobs; at most {MAX_JOBS_PER_SWEEP} are allowed"
            )));
        }
        Ok(())
    }

    /// A kind that statically cannot run a precision (bf16 on a T4, V100 or CPU) would leave
    /// its jobs pending forever: refuse the sweep instead, naming the pair.
    fn check_targets_can_run(&self) -> Result<(), CoreError> {
        for target in &self.gpus {
            let HardwareTarget::Kind(kind) = target else {
                continue;
            };
            for &p in &self.precisions {
                if let Some(why) = crate::capability::kind_refusal(kind, p) {
                    return Err(CoreError::UnsupportedPrecision(why));
                }
            }
        }
        Ok(())
    }

    fn distinct<T: Ord + Clone>(items: &[T]) -> Vec<T> {
        // Keep the user's order, drop repeats: "--batch 1,1,8" means two points, not three.
        let mut seen = BTreeSet::new();
        items
            .iter()
            .filter(|i| seen.insert((*i).clone()))
            .cloned()
            .collect()
    }

    pub fn job_count(&self) -> usize {
        Self::distinct(&self.batch_sizes).len()
            * Self::distinct(&self.precisions).len()
            * Self::distinct(&self.gpus).len()
            * self.repetitions as usize
    }

    /// The jobs this sweep stands for, in the order they should run: hardware, then precision,
    /// then batch size, so a watcher sees each curve fill from small batches up.
    pub fn expand(&self) -> Result<Vec<JobSpec>, CoreError> {
        self.validate()?;
        let mut jobs = Vec::with_capacity(self.job_count());
        for target in Self::distinct(&self.gpus) {
            for precision in Self::distinct(&self.precisions) {
                for &batch in &Self::distinct(&self.batch_sizes) {
                    for repetition in 0..self.repetitions {
                        jobs.push(JobSpec {
                            model: self.model.clone(),
                            batch_size: batch as u32,
                            precision,
                            image_size: self.image_size,
                            target: target.clone(),
                            engine: self.engine,
                            weights: self.weights.clone(),
                            measurement: self.measurement.clone(),
                            repetition,
                        });
                    }
                }
            }
        }
        Ok(jobs)
    }
}

/// Named sweeps that `fleetmark submit --preset NAME` queues.
pub const PRESETS: &[&str] = &["t4-article"];

impl SweepSpec {
    /// A named sweep. `t4-article` is the experiment Fleetmark grew out of: ResNet18 at batch 1
    /// to 32 in f32 and f16 on a T4, measured under the default rules.
    pub fn preset(name: &str) -> Result<SweepSpec, CoreError> {
        match name.trim().to_ascii_lowercase().as_str() {
            "t4-article" => Ok(SweepSpec {
                name: Some("t4-article".into()),
                model: "resnet18".into(),
                batch_sizes: vec![1, 2, 4, 8, 16, 32],
                precisions: vec![Precision::F32, Precision::F16],
                gpus: vec!["t4".parse()?],
                image_size: 224,
                repetitions: 1,
                engine: EnginePath::Auto,
                weights: WeightsSpec::default(),
                measurement: MeasurementSpec::default(),
            }),
            _ => Err(CoreError::InvalidSweep(format!(
                "unknown preset '{name}': known presets are {}",
                PRESETS.join(", ")
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "article"
batch_sizes = [1, 8, 16, 8]
precisions = ["f32", "fp16"]
gpus = ["t4", "h100"]

[measurement]
warmup_iterations = 3
min_iterations = 20
min_duration = "2s"
"#;

    #[test]
    fn parses_and_expands_a_sweep_file() {
        let spec = SweepSpec::from_toml(GOOD).unwrap();
        assert_eq!(spec.measurement.min_duration.as_secs(), 2);
        let jobs = spec.expand().unwrap();
        // 3 distinct batches x 2 precisions x 2 kinds.
        assert_eq!(jobs.len(), 12);
        assert_eq!(jobs[0].batch_size, 1);
        assert_eq!(jobs[0].target.to_string(), "t4");
        assert_eq!(jobs[11].target.to_string(), "h100");
        assert_eq!(jobs[11].precision, Precision::F16);
    }

    #[test]
    fn bf16_for_a_kind_that_cannot_run_it_is_refused_at_submit() {
        for kind in ["t4", "v100", "cpu"] {
            let text = format!(
                "batch_sizes = [1]\nprecisions = [\"f16\", \"bf16\"]\ngpus = [\"h100\", \"{kind}\"]"
            );
            let err = SweepSpec::from_toml(&text).unwrap_err();
            assert!(
                matches!(err, CoreError::UnsupportedPrecision(_)),
                "{kind}: {err:?}"
            );
            assert!(
                err.to_string()
                    .starts_with(&format!("unsupported precision: {kind} cannot run bf16")),
                "{err}"
            );
        }
        // "gpu" and "any" may still find an Ampere card, and f16 runs everywhere.
        SweepSpec::from_toml(
            "batch_sizes = [1]\nprecisions = [\"bf16\"]\ngpus = [\"gpu\", \"any\", \"a100\"]",
        )
        .unwrap();
        SweepSpec::from_toml("batch_sizes = [1]\nprecisions = [\"f16\"]\ngpus = [\"t4\", \"cpu\"]")
            .unwrap();
    }

    #[test]
    fn malformed_toml_is_reported_with_its_location() {
        let err = SweepSpec::from_toml("batch_sizes = [1, 2\nprecisions = [\"f32\"]")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("malformed sweep file"), "{err}");
        assert!(err.contains("line"), "{err}");
    }

    #[test]
    fn unknown_fields_precisions_and_kinds_are_rejected() {
        let err = SweepSpec::from_toml("batch_sizes=[1]\nprecisions=[\"f32\"]\nbatchsize=3")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `batchsize`"), "{err}");
        let err = SweepSpec::from_toml("batch_sizes=[1]\nprecisions=[\"int4\"]")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown precision 'int4'"), "{err}");
        let err = SweepSpec::from_toml("batch_sizes=[1]\nprecisions=[\"f32\"]\ngpus=[\"k80x\"]")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown GPU kind 'k80x'"), "{err}");
    }

    #[test]
    fn absurd_batches_are_rejected() {
        for b in ["0", "100000"] {
            let err = SweepSpec::from_toml(&format!("batch_sizes=[{b}]\nprecisions=[\"f32\"]"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!("batch size {b} is out of range")),
                "{err}"
            );
        }
    }

    #[test]
    fn the_t4_article_preset_is_the_articles_grid() {
        let spec = SweepSpec::preset("t4-article").unwrap();
        let jobs = spec.expand().unwrap();
        assert_eq!(jobs.len(), 12, "6 batches x 2 precisions on one kind");
        assert!(jobs.iter().all(|j| j.target.to_string() == "t4"));
        let batches: BTreeSet<u32> = jobs.iter().map(|j| j.batch_size).collect();
        assert_eq!(
            batches.into_iter().collect::<Vec<_>>(),
            [1, 2, 4, 8, 16, 32]
        );
        assert!(SweepSpec::preset("t5-article")
            .unwrap_err()
            .to_string()
            .contains("known presets are t4-article"));
        // It survives the trip through TOML that submit makes.
        let text = toml::to_string(&spec).unwrap();
        assert_eq!(SweepSpec::from_toml(&text).unwrap(), spec);
    }

    #[test]
    fn stability_settings_parse_and_bad_ones_are_refused() {
        let spec = SweepSpec::from_toml(
            "batch_sizes=[1]\nprecisions=[\"f32\"]\n[measurement]\nstability_windows = 4\n\
             stability_window = \"250ms\"\nstability_tolerance = 0.1\nmax_iterations = 500\n\
             percentile_target = { percentile = \"p99\", within = 0.05 }\n",
        )
        .unwrap();
        let m = &spec.measurement;
        assert_eq!(m.stability_windows, 4);
        assert_eq!(m.stability_window.as_millis(), 250);
        assert_eq!(m.stability_tolerance.0, 0.1);
        assert_eq!(m.max_iterations, 500);
        assert_eq!(
            m.percentile_target.unwrap().percentile,
            crate::Percentile::P99
        );
        let text = toml::to_string(&spec).unwrap();
        assert_eq!(SweepSpec::from_toml(&text).unwrap(), spec);

        for (field, msg) in [
            (
                "stability_windows = 1",
                "stability_windows must be between 2 and 100",
            ),
            ("stability_window = \"1ms\"", "shorter than 10ms"),
            ("stability_window = \"50s\"", "do not fit in max_duration"),
            (
                "stability_tolerance = 0.0",
                "stability_tolerance must be a fraction above 0",
            ),
            (
                "stability_tolerance = -1.0",
                "stability_tolerance must be a fraction above 0",
            ),
            (
                "stability_tolerance = nan",
                "stability_tolerance must be a fraction above 0",
            ),
            (
                "max_iterations = 10",
                "max_iterations must be between min_iterations (50)",
            ),
            ("max_iterations = 2000000", "max_iterations must be between"),
            (
                "percentile_target = { percentile = \"p95\", within = 0.05 }",
                "unknown percentile 'p95'",
            ),
            (
                "percentile_target = { percentile = \"p99\", within = 2.0 }",
                "percentile_target.within must be",
            ),
            // Absurd values make short errors, not 300 digits.
            (
                "stability_tolerance = -9e307",
                "stability_tolerance must be a fraction above 0",
            ),
            (
                "percentile_target = { percentile = \"p99\", within = 9e307 }",
                "percentile_target.within must be",
            ),
        ] {
            let err = SweepSpec::from_toml(&format!(
                "batch_sizes=[1]\nprecisions=[\"f32\"]\n[measurement]\n{field}\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(err.contains(msg), "{field}: {err}");
            assert!(err.len() < 200, "{field}: {} characters: {err}", err.len());
        }
    }

    #[test]
    fn too_many_jobs_is_rejected() {
        let spec = SweepSpec {
            repetitions: 1000,
            batch_sizes: (1..=20).collect(),
            ..SweepSpec::from_toml("batch_sizes=[1]\nprecisions=[\"f32\"]").unwrap()
        };
        assert!(spec
            .validate()
            .unwrap_err()
            .to_string()
            .contains("20000 jobs"));
    }
}
