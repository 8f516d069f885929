//! Typed error details carried beside a gRPC status, so clients branch on a code rather than
//! on message text. The coordinator sets the `fleetmark-error` metadata key on statuses whose
//! gRPC code alone is ambiguous (UNAVAILABLE: the coordinator itself, or its database?); the
//! CLI and agents read it back with [`ErrorCode::of`].

use tonic::Status;

/// The metadata key of a status's [`ErrorCode`].
pub const METADATA_KEY: &str = "fleetmark-error";

/// What went wrong, beyond the gRPC code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The coordinator answered but cannot reach its database; retrying later can help.
    DatabaseUnavailable,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::DatabaseUnavailable => "database-unavailable",
        }
    }

    /// The code a status carries, if any (an unknown value reads as none).
    pub fn of(status: &Status) -> Option<ErrorCode> {
        match status.metadata().get(METADATA_KEY)?.to_str().ok()? {
            "database-unavailable" => Some(ErrorCode::DatabaseUnavailable),
            _ => None,
        }
    }

    /// `status` with this code attached.
    pub fn attach(self, mut status: Status) -> Status {
        status.metadata_mut().insert(
            METADATA_KEY,
            tonic::metadata::MetadataValue::from_static(self.as_str()),
        );
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_code_survives_attach_and_read_and_text_alone_means_nothing() {
        let s = ErrorCode::DatabaseUnavailable.attach(Status::unavailable("whatever it says"));
        assert_eq!(ErrorCode::of(&s), Some(ErrorCode::DatabaseUnavailable));
        assert_eq!(
            ErrorCode::of(&Status::unavailable("database unavailable: but no code")),
            None
        );
    }
}
