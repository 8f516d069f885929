//! Errors an engine raises while preparing or running a job.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum EngineError {
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),

    /// The device cannot run this job at all (precision, model, size): retrying won't help.
    #[error("unsupported: {0}")]
    Unsupported(String),

    /// The output did not match the CPU f32 reference within the precision's bound.
    #[error("correctness gate failed: {0}")]
    Correctness(String),

    #[error("weights: {0}")]
    Weights(String),

    /// The device is not usable: missing driver or GPU, wrong build for this card.
    #[error("device setup: {0}")]
    Setup(String),

    #[error("the job was cancelled")]
    Cancelled,
}

impl EngineError {
    /// Whether running the job again (on this agent or another) could succeed.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            EngineError::Unsupported(_) | EngineError::Correctness(_) | EngineError::Weights(_)
        )
    }
}
