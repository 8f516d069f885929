//! Errors an engine raises while preparing or running a job.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum EngineError {
    /// Candle's error is part of the message and deliberately not a `source()`: printed with
    /// its chain (`{:#}`, as the agent's command line does), it would otherwise appear twice.
    #[error("candle: {0}")]
    Candle(candle_core::Error),

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

impl From<candle_core::Error> for EngineError {
    fn from(e: candle_core::Error) -> Self {
        EngineError::Candle(e)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_candle_error_is_printed_once() {
        let e = EngineError::from(candle_core::Error::Msg("shape mismatch in conv2d".into()));
        assert!(
            std::error::Error::source(&e).is_none(),
            "no source to print again"
        );
        let shown = format!("{:#}", anyhow::Error::new(e));
        assert_eq!(
            shown.matches("shape mismatch in conv2d").count(),
            1,
            "{shown}"
        );
        assert!(shown.starts_with("candle: "), "{shown}");
    }
}
