//! Errors raised while reading or validating user input (sweep files, flags, records).

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum CoreError {
    #[error("unknown precision '{}': expected one of f32, f16, bf16", crate::limits::Excerpt::of(.given))]
    UnknownPrecision { given: String },

    #[error("unknown GPU kind '{}': expected 'any', 'gpu', 'cpu' or one of {known}", crate::limits::Excerpt::of(.given))]
    UnknownHardware { given: String, known: String },

    #[error("unknown model '{}': this Fleetmark knows {known}", crate::limits::Excerpt::of(.given))]
    UnknownModel { given: String, known: String },

    #[error("unknown engine path '{}': expected auto, stock or fused", crate::limits::Excerpt::of(.given))]
    UnknownEnginePath { given: String },

    #[error("batch size {given} is out of range: it must be between 1 and {max}")]
    BatchOutOfRange { given: u64, max: u32 },

    #[error("image size {given} is out of range: it must be between {min} and {max}")]
    ImageSizeOutOfRange { given: u32, min: u32, max: u32 },

    /// The sweep names a hardware kind that can never run one of its precisions.
    #[error("unsupported precision: {0}")]
    UnsupportedPrecision(String),

    #[error("invalid sweep: {0}")]
    InvalidSweep(String),

    #[error("malformed sweep file: {0}")]
    MalformedSweep(String),

    #[error("invalid duration '{}': {reason}", crate::limits::Excerpt::of(.given))]
    InvalidDuration { given: String, reason: String },

    #[error("invalid result record: {0}")]
    InvalidResult(#[from] crate::result::ResultError),

    #[error("{0}")]
    Limit(#[from] crate::limits::LimitError),

    #[error("invalid weights: {0}")]
    InvalidWeights(String),

    #[error("unknown log format '{given}': use text or json")]
    UnknownLogFormat { given: String },
}
