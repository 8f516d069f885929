//! The agent's errors.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum AgentError {
    /// A device cannot be used; the message says why and what to do.
    #[error("{0}")]
    Device(String),

    #[error("invalid configuration: {0}")]
    Config(String),

    /// The coordinator refused our token. Retrying cannot help.
    #[error("the coordinator refused this agent: {0}")]
    Unauthenticated(String),

    /// The coordinator refused the registration itself.
    #[error("the coordinator rejected the registration: {0}")]
    Rejected(String),

    /// The cause is part of the message and deliberately not a `source()`: printed with its
    /// chain (`{:#}`), it would otherwise appear twice.
    #[error("{context}: {cause}")]
    Io {
        context: String,
        cause: std::io::Error,
    },

    /// As with `Io`, the cause is in the message and not a `source()`, so it is printed once.
    #[error("sweep file: {0}")]
    Sweep(fleetmark_core::CoreError),
}

impl From<fleetmark_core::CoreError> for AgentError {
    fn from(e: fleetmark_core::CoreError) -> Self {
        AgentError::Sweep(e)
    }
}

impl From<fleetmark_engine::EngineError> for AgentError {
    fn from(e: fleetmark_engine::EngineError) -> Self {
        AgentError::Device(e.to_string())
    }
}
