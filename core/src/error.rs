//! Errors raised while reading or validating user input (sweep files, flags, records).

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum CoreError {
    #[error("unknown precision '{given}': expected one of f32, f16, bf16")]
    UnknownPrecision { given: String },

    #[error("unknown GPU kind '{given}': expected 'any', 'gpu', 'cpu' or one of {known}")]
    UnknownHardware { given: String, known: String },

    #[error("unknown model '{given}': this Fleetmark knows {known}")]
    UnknownModel { given: String, known: String },

    #[error("unknown engine path '{given}': expected auto, stock or fused")]
    UnknownEnginePath { given: String },

    #[error("batch size {given} is out of range: it must be between 1 and {max}")]
    BatchOutOfRange { given: u64, max: u32 },

    #[error("image size {given} is out of range: it must be between {min} and {max}")]
    ImageSizeOutOfRange { given: u32, min: u32, max: u32 },

    #[error("invalid sweep: {0}")]
    InvalidSweep(String),

    #[error("malformed sweep file: {0}")]
    MalformedSweep(String),

    #[error("invalid duration '{given}': {reason}")]
    InvalidDuration { given: String, reason: String },

    #[error("invalid result record: {0}")]
    InvalidResult(String),

    #[error("unknown log format '{given}': use text or json")]
    UnknownLogFormat { given: String },
}
