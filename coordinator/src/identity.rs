//! The SQL of identity: API tokens, agent secrets bound to the token that registered them,
//! re-registration (a new incarnation that releases the previous one's jobs), and the
//! submitter's pending-job count. Kept apart from `store.rs` because it is its own concern.

use chrono::{DateTime, Utc};
use sqlx::Row;
use uuid::Uuid;

use crate::{
    auth::{new_secret, Principal, Role, AGENT_SECRET_PREFIX, TOKEN_PREFIX},
    error::{CoordinatorError, Result},
    store::{AgentRegistration, Store},
};

/// A token as listed: never its secret.
#[derive(Debug, Clone)]
pub struct TokenInfo {
    pub id: Uuid,
    pub name: String,
    pub role: Role,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// What a registration did.
#[derive(Debug, Clone)]
pub struct Registered {
    pub agent_id: Uuid,
    /// The agent's new secret, shown once.
    pub secret: String,
    pub incarnation: i32,
    /// Jobs that were leased to the previous incarnation, now pending again.
    pub released: Vec<Uuid>,
}

impl Store {
    /// Creates an API token and returns it with its secret (the only time the secret exists
    /// outside the caller's hands).
    pub async fn create_token(
        &self,
        name: &str,
        role: Role,
        expires_at: Option<DateTime<Utc>>,
        created_by: Option<Uuid>,
    ) -> Result<(TokenInfo, String)> {
        let name = name.trim();
        if name.is_empty() || name.chars().count() > 200 {
            return Err(CoordinatorError::InvalidArgument(
                "a token name must be 1 to 200 characters".into(),
            ));
        }
        let (secret, hash) = new_secret(TOKEN_PREFIX)?;
        let row = sqlx::query(
            "INSERT INTO api_tokens (id, name, role, hash, expires_at, created_by) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             RETURNING id, name, role, created_at, expires_at, revoked_at",
        )
        .bind(Uuid::new_v4())
        .bind(name)
        .bind(role)
        .bind(&hash[..])
        .bind(expires_at)
        .bind(created_by)
        .fetch_one(self.pool())
        .await?;
        Ok((token_info(&row)?, secret))
    }

    pub async fn list_tokens(&self, include_revoked: bool) -> Result<Vec<TokenInfo>> {
        let rows = sqlx::query(
            "SELECT id, name, role, created_at, expires_at, revoked_at FROM api_tokens \
             WHERE $1 OR revoked_at IS NULL ORDER BY created_at",
        )
        .bind(include_revoked)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(token_info).collect()
    }

    /// Revokes a token: `Some(true)` if it was live, `Some(false)` if already revoked, `None`
    /// if there is no such token.
    pub async fn revoke_token(&self, id: Uuid) -> Result<Option<bool>> {
        let n = sqlx::query(
            "UPDATE api_tokens SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL",
        )
        .bind(id)
        .execute(self.pool())
        .await?
        .rows_affected();
        if n == 1 {
            return Ok(Some(true));
        }
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM api_tokens WHERE id = $1)")
                .bind(id)
                .fetch_one(self.pool())
                .await?;
        Ok(exists.then_some(false))
    }

    /// Revokes every live token with this name; returns how many. The demo uses it so that a
    /// second run's agents may take over the names its first run registered.
    pub async fn revoke_tokens_named(&self, name: &str) -> Result<u64> {
        Ok(sqlx::query(
            "UPDATE api_tokens SET revoked_at = now() WHERE name = $1 AND revoked_at IS NULL",
        )
        .bind(name)
        .execute(self.pool())
        .await?
        .rows_affected())
    }

    /// The token with this hash, if it is live. Errors say why it is not.
    pub async fn token_by_hash(&self, hash: &[u8; 32]) -> Result<Principal> {
        let row = sqlx::query(
            "SELECT id, name, role, revoked_at IS NOT NULL AS revoked, \
                    coalesce(expires_at <= now(), false) AS expired \
             FROM api_tokens WHERE hash = $1",
        )
        .bind(&hash[..])
        .fetch_optional(self.pool())
        .await?
        .ok_or_else(|| {
            CoordinatorError::Unauthenticated("wrong token: check --token / FLEETMARK_TOKEN".into())
        })?;
        if row.try_get::<bool, _>("revoked")? {
            return Err(CoordinatorError::Unauthenticated(
                "this token was revoked".into(),
            ));
        }
        if row.try_get::<bool, _>("expired")? {
            return Err(CoordinatorError::Unauthenticated(
                "this token has expired".into(),
            ));
        }
        Ok(Principal::Token {
            id: row.try_get("id")?,
            name: row.try_get("name")?,
            role: row.try_get("role")?,
        })
    }

    /// The agent whose current secret has this hash, unless the token that registered it was
    /// revoked since.
    pub async fn agent_by_secret(&self, hash: &[u8; 32]) -> Result<Option<Uuid>> {
        Ok(sqlx::query_scalar(
            "SELECT a.id FROM agents a LEFT JOIN api_tokens t ON t.id = a.registered_by \
             WHERE a.secret_hash = $1 AND t.revoked_at IS NULL",
        )
        .bind(&hash[..])
        .fetch_optional(self.pool())
        .await?)
    }

    /// Registers an agent under the token `by`. A new name gets a new id. An existing name
    /// keeps its id only for the token that registered it (or when that token is revoked or
    /// expired, or the row came from an import): that starts a new incarnation, with a new
    /// secret, and the jobs leased to the previous incarnation go back to pending without
    /// counting the attempt. Any other token gets `AlreadyExists`.
    pub async fn register_agent_as(&self, reg: &AgentRegistration, by: Uuid) -> Result<Registered> {
        let (secret, hash) = new_secret(AGENT_SECRET_PREFIX)?;
        let mut tx = self.pool().begin().await?;
        let existing = sqlx::query(
            "SELECT a.id, a.registered_by, \
                    (a.registered_by IS NULL OR t.revoked_at IS NOT NULL \
                     OR coalesce(t.expires_at <= now(), false)) AS free \
             FROM agents a LEFT JOIN api_tokens t ON t.id = a.registered_by \
             WHERE a.name = $1 FOR UPDATE OF a",
        )
        .bind(&reg.name)
        .fetch_optional(&mut *tx)
        .await?;
        let (id, released) = match existing {
            None => {
                let id = Uuid::new_v4();
                sqlx::query(
                    "INSERT INTO agents (id, name, labels, price_per_hour, inventory, devices, \
                                         origin, secret_hash, registered_by, incarnation) \
                     VALUES ($1, $2, $3, $4, $5, $6, 'registered', $7, $8, 1)",
                )
                .bind(id)
                .bind(&reg.name)
                .bind(json(&reg.labels))
                .bind(reg.price_per_hour)
                .bind(json(&reg.inventory))
                .bind(json(&reg.devices))
                .bind(&hash[..])
                .bind(by)
                .execute(&mut *tx)
                .await?;
                (id, Vec::new())
            }
            Some(row) => {
                let id: Uuid = row.try_get("id")?;
                let owner: Option<Uuid> = row.try_get("registered_by")?;
                let free: bool = row.try_get("free")?;
                if owner != Some(by) && !free {
                    return Err(CoordinatorError::AlreadyExists(format!(
                        "an agent named '{}' is already registered with another token; pick \
                         another --name, or revoke that token first",
                        reg.name
                    )));
                }
                sqlx::query(
                    "UPDATE agents SET labels = $2, price_per_hour = $3, inventory = $4, \
                         devices = $5, origin = 'registered', last_seen_at = now(), \
                         secret_hash = $6, registered_by = $7, incarnation = incarnation + 1 \
                     WHERE id = $1",
                )
                .bind(id)
                .bind(json(&reg.labels))
                .bind(reg.price_per_hour)
                .bind(json(&reg.inventory))
                .bind(json(&reg.devices))
                .bind(&hash[..])
                .bind(by)
                .execute(&mut *tx)
                .await?;
                (id, release_leases(&mut tx, id).await?)
            }
        };
        let incarnation: i32 = sqlx::query_scalar("SELECT incarnation FROM agents WHERE id = $1")
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
        crate::store::record_health_checks(&mut tx, id, incarnation, &reg.devices).await?;
        if !released.is_empty() {
            sqlx::query("SELECT pg_notify($1, '')")
                .bind(crate::store::JOBS_CHANNEL)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(Registered {
            agent_id: id,
            secret,
            incarnation,
            released,
        })
    }

    /// Records who submitted a sweep.
    pub async fn set_submitter(&self, sweep: Uuid, token: Uuid) -> Result<()> {
        sqlx::query("UPDATE sweeps SET submitted_by = $2 WHERE id = $1")
            .bind(sweep)
            .bind(token)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Who submitted a sweep; `None` if there is no such sweep, `Some(None)` if nobody known.
    pub async fn sweep_submitter(&self, sweep: Uuid) -> Result<Option<Option<Uuid>>> {
        Ok(
            sqlx::query_scalar("SELECT submitted_by FROM sweeps WHERE id = $1")
                .bind(sweep)
                .fetch_optional(self.pool())
                .await?,
        )
    }

    /// Hardware kinds of every registered agent's devices.
    pub async fn registered_kinds(&self) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT DISTINCT d->>'kind' FROM agents a, jsonb_array_elements(a.devices) d \
             WHERE a.origin = 'registered' AND d->>'kind' IS NOT NULL",
        )
        .fetch_all(self.pool())
        .await?)
    }
}

/// Returns the agent's running jobs to the queue as hand-backs: the previous incarnation is
/// gone, and its end says nothing about the job, so no failure is counted (the hand-back count,
/// bounded by `max_handbacks`, keeps a job from bouncing forever).
async fn release_leases(tx: &mut sqlx::PgConnection, agent: Uuid) -> Result<Vec<Uuid>> {
    Ok(sqlx::query_scalar(
        "UPDATE jobs SET handbacks = handbacks + 1, \
             state = CASE WHEN handbacks + 1 >= max_handbacks THEN 'failed'::job_state \
                          ELSE 'pending'::job_state END, \
             finished_at = CASE WHEN handbacks + 1 >= max_handbacks THEN now() END, \
             lease_agent_id = NULL, lease_device = NULL, lease_expires_at = NULL, phase = NULL, \
             iterations = 0, fraction = 0, \
             error = 'released: its agent restarted (a hand-back, not a failure)' \
         WHERE lease_agent_id = $1 AND state = 'running' RETURNING id",
    )
    .bind(agent)
    .fetch_all(tx)
    .await?)
}

fn token_info(row: &sqlx::postgres::PgRow) -> Result<TokenInfo> {
    Ok(TokenInfo {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        role: row.try_get("role")?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        revoked_at: row.try_get("revoked_at")?,
    })
}

fn json<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).expect("domain types always serialise")
}
