//! The coordinator's errors and their single mapping to gRPC status codes.

use thiserror::Error;
use tonic::Status;

/// SQLSTATE raised by the schema's triggers for an illegal job transition.
pub const SQLSTATE_ILLEGAL_TRANSITION: &str = "FM001";
/// SQLSTATE raised when a result comes from a lease that is no longer current.
pub const SQLSTATE_STALE_LEASE: &str = "FM002";

#[derive(Debug, Error)]
pub enum CoordinatorError {
    #[error("{0}")]
    InvalidArgument(String),

    #[error("{0}")]
    NotFound(String),

    /// The caller's lease on a job is gone: expired and reassigned, cancelled, or finished.
    #[error("{0}")]
    StaleLease(String),

    #[error("{0}")]
    Unauthenticated(String),

    /// The caller is known but its credential does not allow this call.
    #[error("{0}")]
    PermissionDenied(String),

    /// A rate limit or a quota: retry later, or free some of the quota.
    #[error("{0}")]
    ResourceExhausted(String),

    #[error("{0}")]
    AlreadyExists(String),

    /// Start-up configuration that cannot work (TLS files, for example).
    #[error("{0}")]
    Config(String),

    #[error("database: {0}")]
    Database(sqlx::Error),

    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),

    /// Start-up could not connect to the database; `reason` says why in plain words.
    #[error("cannot connect to the database at {target}: {reason}")]
    DatabaseConnect {
        target: String,
        reason: String,
        /// Waiting will not help (wrong password, no such database, a bad URL).
        permanent: bool,
    },
}

/// Names the cause of a failed connection attempt to `target` (host:port and database).
pub fn connect_error(target: &str, e: sqlx::Error) -> CoordinatorError {
    let (reason, permanent) = match &e {
        sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => (
            "connection refused (is PostgreSQL running there?)".to_string(),
            false,
        ),
        sqlx::Error::Io(io) => (io.to_string(), false),
        sqlx::Error::Database(db) => match db.code().as_deref() {
            Some("28P01") | Some("28000") => {
                (format!("authentication failed: {}", db.message()), true)
            }
            Some("3D000") => (db.message().to_string(), true),
            Some(c) if c.starts_with("57P") => (db.message().to_string(), false),
            _ => (db.message().to_string(), true),
        },
        sqlx::Error::Configuration(c) => (format!("invalid database URL: {c}"), true),
        sqlx::Error::Tls(t) => (format!("TLS: {t}"), true),
        other => (other.to_string(), false),
    };
    CoordinatorError::DatabaseConnect {
        target: target.to_string(),
        reason,
        permanent,
    }
}

impl From<sqlx::Error> for CoordinatorError {
    fn from(e: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &e {
            match db.code().as_deref() {
                Some(SQLSTATE_STALE_LEASE) => {
                    return CoordinatorError::StaleLease(db.message().to_string())
                }
                Some(SQLSTATE_ILLEGAL_TRANSITION) => {
                    return CoordinatorError::StaleLease(db.message().to_string())
                }
                // The database keeps hardware kinds in one spelling (migration
                // 20261204000015); a caller of the store that did not normalise one is refused
                // as a bad argument, not as a database failure.
                Some("23514")
                    if db
                        .constraint()
                        .is_some_and(|c| c.ends_with("_kind_lowercase")) =>
                {
                    return CoordinatorError::InvalidArgument(
                        "hardware kinds are stored in lowercase (see normalize_kind)".into(),
                    )
                }
                _ => {}
            }
        }
        CoordinatorError::Database(e)
    }
}

impl From<fleetmark_proto::convert::WireError> for CoordinatorError {
    fn from(e: fleetmark_proto::convert::WireError) -> Self {
        CoordinatorError::InvalidArgument(e.0)
    }
}

impl From<fleetmark_core::CoreError> for CoordinatorError {
    fn from(e: fleetmark_core::CoreError) -> Self {
        CoordinatorError::InvalidArgument(e.to_string())
    }
}

impl From<CoordinatorError> for Status {
    fn from(e: CoordinatorError) -> Self {
        match e {
            CoordinatorError::InvalidArgument(m) => Status::invalid_argument(m),
            CoordinatorError::NotFound(m) => Status::not_found(m),
            CoordinatorError::StaleLease(m) => Status::failed_precondition(m),
            CoordinatorError::Unauthenticated(m) => Status::unauthenticated(m),
            CoordinatorError::PermissionDenied(m) => Status::permission_denied(m),
            CoordinatorError::ResourceExhausted(m) => Status::resource_exhausted(m),
            CoordinatorError::AlreadyExists(m) => Status::already_exists(m),
            CoordinatorError::Config(m) => Status::internal(m),
            CoordinatorError::Database(e) => {
                crate::metrics::database_error();
                tracing::warn!(error = %e, "database error");
                match e {
                    sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::Io(_)
                    | sqlx::Error::Tls(_)
                    | sqlx::Error::Protocol(_) => {
                        database_unavailable(format!("database unavailable: {e}"))
                    }
                    sqlx::Error::Database(ref db)
                        if db
                            .code()
                            .is_some_and(|c| c == "40001" || c == "40P01" || c == "23505") =>
                    {
                        // Serialization failure, deadlock, or a unique key taken by a concurrent call (two
                        // imports of one record): the whole call can simply be retried.
                        Status::aborted(format!("database conflict, retry: {e}"))
                    }
                    sqlx::Error::Database(ref db)
                        if db.code().is_some_and(|c| c.starts_with("57P")) =>
                    {
                        // 57P01 admin_shutdown and friends: the server is restarting.
                        database_unavailable(format!("database unavailable: {e}"))
                    }
                    other => Status::internal(format!("database error: {other}")),
                }
            }
            CoordinatorError::Migrate(e) => Status::internal(format!("migrations: {e}")),
            e @ CoordinatorError::DatabaseConnect { .. } => {
                crate::metrics::database_error();
                database_unavailable(format!("database unavailable: {e}"))
            }
        }
    }
}

/// UNAVAILABLE with the typed code that tells a client it is the database, not this process.
fn database_unavailable(message: String) -> Status {
    fleetmark_proto::error_code::ErrorCode::DatabaseUnavailable.attach(Status::unavailable(message))
}

pub type Result<T, E = CoordinatorError> = std::result::Result<T, E>;
