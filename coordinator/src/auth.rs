//! Who is calling, and may they? Every handler starts with [`authorize`], which reads the
//! bearer credential, looks it up in Postgres (by its SHA-256; secrets are never stored) and
//! checks it against the call's [`Permission`].
//!
//! Two kinds of credentials:
//! - API tokens (`fmt_…`), each with a [`Role`]: made by `fleetmark-coordinator token create`
//!   (from the database side, for the first admin) or through `TokenService` by an admin.
//! - Agent secrets (`fma_…`), returned by `Register` and bound to one agent id. Every agent call
//!   after `Register` authenticates as that agent; ids in request bodies are never trusted.
//!
//! There is no cache: a lookup is one indexed `SELECT` (the agent calls that already touched
//! the agent row do it in the same statement), so revocation and secret rotation take effect on
//! the very next call, on every coordinator.

use std::{fmt, str::FromStr};

use sha2::{Digest, Sha256};
use tonic::{Request, Status};
use uuid::Uuid;

use crate::{error::CoordinatorError, State};

/// Prefix of API tokens.
pub const TOKEN_PREFIX: &str = "fmt_";
/// Prefix of agent secrets.
pub const AGENT_SECRET_PREFIX: &str = "fma_";
/// Random bytes in a secret: 256 bits.
const SECRET_BYTES: usize = 32;

/// What an API token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, sqlx::Type)]
#[sqlx(type_name = "token_role", rename_all = "lowercase")]
pub enum Role {
    /// Register agents, nothing else.
    Agent,
    /// Read sweeps, results and agents.
    Reader,
    /// Reader, plus submit and import, and cancel its own sweeps.
    Submitter,
    /// Everything, including tokens.
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Agent, Role::Reader, Role::Submitter, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Reader => "reader",
            Role::Submitter => "submitter",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown role '{s}': use agent, reader, submitter or admin"))
    }
}

impl From<Role> for fleetmark_proto::v1::Role {
    fn from(r: Role) -> Self {
        use fleetmark_proto::v1::Role as W;
        match r {
            Role::Agent => W::Agent,
            Role::Reader => W::Reader,
            Role::Submitter => W::Submitter,
            Role::Admin => W::Admin,
        }
    }
}

impl TryFrom<fleetmark_proto::v1::Role> for Role {
    type Error = CoordinatorError;
    fn try_from(r: fleetmark_proto::v1::Role) -> Result<Self, CoordinatorError> {
        use fleetmark_proto::v1::Role as W;
        match r {
            W::Agent => Ok(Role::Agent),
            W::Reader => Ok(Role::Reader),
            W::Submitter => Ok(Role::Submitter),
            W::Admin => Ok(Role::Admin),
            W::Unspecified => Err(CoordinatorError::InvalidArgument(
                "a token needs a role: agent, reader, submitter or admin".into(),
            )),
        }
    }
}

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// `Register`: an agent token (or admin).
    Register,
    /// Every other agent call: an agent's own secret.
    AgentSession,
    /// Reading sweeps, results and agents.
    Read,
    /// Submitting, importing and cancelling (own sweeps; admins any).
    Submit,
    /// Token management.
    Admin,
}

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Token { id: Uuid, name: String, role: Role },
    Agent { id: Uuid },
}

impl Principal {
    /// The token id, for API tokens.
    pub fn token_id(&self) -> Option<Uuid> {
        match self {
            Principal::Token { id, .. } => Some(*id),
            Principal::Agent { .. } => None,
        }
    }

    pub fn is_admin(&self) -> bool {
        matches!(
            self,
            Principal::Token {
                role: Role::Admin,
                ..
            }
        )
    }
}

/// A fresh random secret with `prefix`, and its hash. 256 bits from the OS.
pub fn new_secret(prefix: &str) -> Result<(String, [u8; 32]), CoordinatorError> {
    let mut bytes = [0u8; SECRET_BYTES];
    getrandom::fill(&mut bytes).map_err(|e| {
        CoordinatorError::InvalidArgument(format!("no randomness from the OS: {e}"))
    })?;
    let secret = format!("{prefix}{}", hex::encode(bytes));
    let hash = hash_secret(&secret);
    Ok((secret, hash))
}

/// The SHA-256 stored for a secret. Secrets are 256 random bits, so a fast hash is enough: there
/// is nothing to brute-force.
pub fn hash_secret(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Whether `p` may make a call that needs `need`; the error says why not.
pub fn permits(p: &Principal, need: Permission) -> Result<(), CoordinatorError> {
    let role = match p {
        Principal::Agent { .. } => {
            return if need == Permission::AgentSession {
                Ok(())
            } else {
                Err(CoordinatorError::PermissionDenied(
                    "an agent's secret is only good for agent calls".into(),
                ))
            }
        }
        Principal::Token { role, .. } => *role,
    };
    let allowed = match need {
        Permission::Register => matches!(role, Role::Agent | Role::Admin),
        Permission::AgentSession => {
            return Err(CoordinatorError::PermissionDenied(
                "agent calls after Register take the agent's own secret, not a token".into(),
            ))
        }
        Permission::Read => matches!(role, Role::Reader | Role::Submitter | Role::Admin),
        Permission::Submit => matches!(role, Role::Submitter | Role::Admin),
        Permission::Admin => role == Role::Admin,
    };
    if allowed {
        Ok(())
    } else {
        Err(CoordinatorError::PermissionDenied(format!(
            "a {role} token may not make this call"
        )))
    }
}

/// Authenticates the caller of `req` and checks it may do `need`. UNAUTHENTICATED for a
/// missing, unknown, expired or revoked credential (and for an agent without a client
/// certificate when the coordinator requires one); PERMISSION_DENIED for the wrong kind.
pub(crate) async fn authorize<T>(
    state: &State,
    req: &Request<T>,
    need: Permission,
) -> Result<Principal, Status> {
    let agent_call = matches!(need, Permission::Register | Permission::AgentSession);
    if agent_call {
        require_client_cert(state, req)?;
    }
    let secret = bearer(req)?;
    let principal = if secret.starts_with(AGENT_SECRET_PREFIX) {
        let id = state
            .store
            .agent_by_secret(&hash_secret(secret))
            .await?
            .ok_or_else(unknown_agent_secret)?;
        Principal::Agent { id }
    } else if secret.starts_with(TOKEN_PREFIX) {
        state.store.token_by_hash(&hash_secret(secret)).await?
    } else {
        return Err(CoordinatorError::Unauthenticated(
            "wrong token: check --token / FLEETMARK_TOKEN".into(),
        )
        .into());
    };
    permits(&principal, need)?;
    Ok(principal)
}

/// UNAUTHENTICATED when the coordinator requires agents to present a client certificate and
/// this caller did not.
fn require_client_cert<T>(state: &State, req: &Request<T>) -> Result<(), Status> {
    if state
        .config
        .tls
        .as_ref()
        .is_some_and(|t| t.client_ca_pem.is_some())
        && req.peer_certs().is_none_or(|c| c.is_empty())
    {
        return Err(CoordinatorError::Unauthenticated(
            "this coordinator requires agents to present a client certificate (--tls-cert/--tls-key)"
                .into(),
        )
        .into());
    }
    Ok(())
}

/// For an agent call whose first statement reads the agent's row anyway (a claim): the hash of
/// the caller's agent secret, after the checks that need no database, so that statement can
/// look the secret up itself. `None` when the credential is not an agent secret at all; the
/// caller then goes through [`authorize`], which says precisely what is wrong.
pub(crate) fn agent_secret_hash<T>(
    state: &State,
    req: &Request<T>,
) -> Result<Option<[u8; 32]>, Status> {
    require_client_cert(state, req)?;
    let secret = bearer(req)?;
    Ok(secret
        .starts_with(AGENT_SECRET_PREFIX)
        .then(|| hash_secret(secret)))
}

/// What an agent secret that matches no live agent is told.
pub(crate) fn unknown_agent_secret() -> CoordinatorError {
    CoordinatorError::Unauthenticated(
        "unknown agent secret: the agent registered again elsewhere, or its token was revoked"
            .into(),
    )
}

fn bearer<T>(req: &Request<T>) -> Result<&str, CoordinatorError> {
    let value = req.metadata().get("authorization").ok_or_else(|| {
        CoordinatorError::Unauthenticated(
            "this coordinator requires a token: pass --token or set FLEETMARK_TOKEN".into(),
        )
    })?;
    value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            CoordinatorError::Unauthenticated(
                "wrong token: the authorization header must be 'Bearer <token>'".into(),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip_and_secrets_are_random() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
        }
        let (a, ha) = new_secret(TOKEN_PREFIX).unwrap();
        let (b, _) = new_secret(TOKEN_PREFIX).unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), TOKEN_PREFIX.len() + 64);
        assert_eq!(hash_secret(&a), ha);
    }

    #[test]
    fn the_role_matrix() {
        use Permission::*;
        let token = |role| Principal::Token {
            id: Uuid::nil(),
            name: "t".into(),
            role,
        };
        let agent = Principal::Agent { id: Uuid::nil() };
        let table = [
            (Role::Agent, [true, false, false, false, false]),
            (Role::Reader, [false, false, true, false, false]),
            (Role::Submitter, [false, false, true, true, false]),
            (Role::Admin, [true, false, true, true, true]),
        ];
        for (role, row) in table {
            for (need, ok) in [Register, AgentSession, Read, Submit, Admin]
                .into_iter()
                .zip(row)
            {
                assert_eq!(permits(&token(role), need).is_ok(), ok, "{role} {need:?}");
            }
        }
        assert!(permits(&agent, AgentSession).is_ok());
        assert!(permits(&agent, Read).is_err());
        assert!(permits(&agent, Register).is_err());
    }
}
