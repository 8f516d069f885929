//! All of the coordinator's SQL, as small named queries over the schema in `migrations/`.
//!
//! The rules that matter for correctness live in the database, not here: job state transitions
//! are checked by a trigger, a result is accepted only from the current lease holder by another,
//! and claims use `FOR UPDATE SKIP LOCKED` so any number of coordinators can share one database.

use std::{collections::BTreeMap, time::Duration};

use chrono::{DateTime, Utc};
use fleetmark_core::{BenchResult, HostInventory, JobSpec, JobState, SweepSpec};
use serde::{Deserialize, Serialize};
use sqlx::{
    postgres::{PgPoolOptions, PgRow},
    FromRow, PgPool, Row,
};
use tracing::warn;
use uuid::Uuid;

use crate::error::{CoordinatorError, Result};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// The Postgres channel coordinators use to wake each other's waiting claims.
pub const JOBS_CHANNEL: &str = "fleetmark_jobs";

/// One device an agent serves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentDevice {
    pub device: String,
    pub kind: String,
    pub name: String,
    /// Precisions the device can run; `None` from agents that declare none (all offered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precisions: Option<Vec<String>>,
    /// The health check the agent ran before its first job, validated at registration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<fleetmark_core::DeviceHealth>,
}

#[derive(Debug, Clone)]
pub struct AgentRegistration {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub price_per_hour: Option<f64>,
    pub inventory: HostInventory,
    pub devices: Vec<AgentDevice>,
}

#[derive(Debug, Clone)]
pub struct AgentRow {
    pub id: Uuid,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub price_per_hour: Option<f64>,
    pub inventory: HostInventory,
    pub devices: Vec<AgentDevice>,
    pub origin: String,
    pub last_seen_at: DateTime<Utc>,
    pub online: bool,
    pub running_jobs: Vec<Uuid>,
}

#[derive(Debug, Clone)]
pub struct SweepRow {
    pub id: Uuid,
    pub name: String,
    pub spec_toml: String,
    pub state: String,
    pub created_at: DateTime<Utc>,
    pub jobs: i64,
    pub finished: i64,
}

impl<'r> FromRow<'r, PgRow> for SweepRow {
    fn from_row(row: &'r PgRow) -> sqlx::Result<Self> {
        Ok(SweepRow {
            id: row.try_get("id")?,
            name: row.try_get("name")?,
            spec_toml: row.try_get("spec_toml")?,
            state: row.try_get("state")?,
            created_at: row.try_get("created_at")?,
            jobs: row.try_get("jobs")?,
            finished: row.try_get("finished")?,
        })
    }
}

#[derive(Debug, Clone)]
pub struct JobRow {
    pub id: Uuid,
    pub sweep_id: Uuid,
    pub seq: i32,
    pub spec: JobSpec,
    pub state: JobState,
    pub attempt: i32,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub agent_name: Option<String>,
    pub device: Option<String>,
    pub phase: Option<String>,
    pub iterations: i32,
    pub fraction: f64,
    pub error: Option<String>,
    pub images_per_sec: Option<f64>,
}

impl<'r> FromRow<'r, PgRow> for JobRow {
    fn from_row(row: &'r PgRow) -> sqlx::Result<Self> {
        let spec: serde_json::Value = row.try_get("spec")?;
        let state: String = row.try_get("state")?;
        Ok(JobRow {
            id: row.try_get("id")?,
            sweep_id: row.try_get("sweep_id")?,
            seq: row.try_get("seq")?,
            spec: serde_json::from_value(spec).map_err(|e| sqlx::Error::Decode(e.into()))?,
            state: state
                .parse()
                .map_err(|e: String| sqlx::Error::Decode(e.into()))?,
            attempt: row.try_get("attempt")?,
            lease_expires_at: row.try_get("lease_expires_at")?,
            agent_name: row.try_get("agent_name")?,
            device: row.try_get("device")?,
            phase: row.try_get("phase")?,
            iterations: row.try_get("iterations")?,
            fraction: row.try_get("fraction")?,
            error: row.try_get("error")?,
            images_per_sec: row.try_get("images_per_sec")?,
        })
    }
}

/// A `health_checks` row as read: id, agent name, device, kind, incarnation, the report, its
/// flags, and whether it is in force.
type HealthCheckDbRow = (
    i64,
    String,
    String,
    String,
    i32,
    serde_json::Value,
    Vec<String>,
    bool,
);

/// One stored health check (see `Store::list_health_checks`).
#[derive(Debug, Clone)]
pub struct HealthCheckRow {
    pub id: i64,
    pub agent_name: String,
    pub device: String,
    pub kind: String,
    pub incarnation: i32,
    pub health: fleetmark_core::DeviceHealth,
    pub flags: Vec<String>,
    /// The device's latest check.
    pub in_force: bool,
}

/// A stored result with its ids.
#[derive(Debug, Clone)]
pub struct StoredResult {
    pub id: Uuid,
    pub sweep_id: Uuid,
    pub result: BenchResult,
    /// Who imported it; `None` for results an agent delivered itself.
    pub imported_by: Option<String>,
    /// The health check in force on its device when it was stored, and that check's flags
    /// (empty: healthy). `None` when the device declared no check.
    pub health: Option<(i64, Vec<String>)>,
}

/// A listing of results, with how many stored rows were left out because they could not be
/// read back as valid results.
#[derive(Debug, Clone, Default)]
pub struct ResultListing {
    pub results: Vec<StoredResult>,
    pub skipped: usize,
}

/// What an import did with one record.
#[derive(Debug, Clone, PartialEq)]
pub enum ImportOutcome {
    /// Filed under the import's own sweep.
    Imported { result: Uuid },
    /// Completed its own running job, as `submit_result` would have.
    Attached { job: Uuid, result: Uuid },
    /// The same record is already stored.
    Duplicate { result: Option<Uuid> },
    /// Its job has moved on; nothing stored.
    Stale { job: Uuid, reason: String },
}

/// What an import did.
#[derive(Debug, Clone, Default)]
pub struct ImportReport {
    /// The imported sweep, when at least one record was filed under it.
    pub sweep: Option<Uuid>,
    pub outcomes: Vec<ImportOutcome>,
}

/// Imported agents are named `imported/<name>`: registered names cannot contain '/', so an
/// import never borrows a registered agent's name or row.
pub const IMPORTED_AGENT_PREFIX: &str = "imported/";

/// Checks that a result's hardware is what its agent registered for that device: kind and
/// name, and the GPU's UUID where the registration knows it.
pub fn check_hardware(
    result: &BenchResult,
    devices: &[AgentDevice],
    inventory: &HostInventory,
) -> std::result::Result<(), String> {
    let device = devices
        .iter()
        .find(|d| d.device == result.device)
        .ok_or_else(|| {
            format!(
                "the agent did not register device '{}'",
                fleetmark_core::limits::Excerpt::of(&result.device)
            )
        })?;
    if device.kind != result.hardware_kind || device.name != result.hardware_name {
        return Err(format!(
            "the result claims {} '{}' on {}, but the agent registered {} '{}' there",
            fleetmark_core::limits::Excerpt::of(&result.hardware_kind),
            fleetmark_core::limits::Excerpt::of(&result.hardware_name),
            device.device,
            device.kind,
            device.name
        ));
    }
    let index = result
        .device
        .strip_prefix("cuda:")
        .and_then(|i| i.parse::<u32>().ok());
    if let Some(index) = index {
        let registered = inventory
            .gpus
            .iter()
            .find(|g| g.index == index && !g.uuid.is_empty());
        if let Some(registered) = registered {
            let claimed = result.host.gpus.iter().find(|g| g.index == index);
            if claimed.map(|g| g.uuid.as_str()) != Some(registered.uuid.as_str()) {
                return Err(format!(
                    "the result's GPU on {} is not the one the agent registered ({})",
                    result.device, registered.uuid
                ));
            }
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Default)]
pub struct ResultFilter {
    pub sweep_id: Option<Uuid>,
    pub model: Option<String>,
    pub precision: Option<String>,
    pub batch_size: Option<i32>,
    /// Only this hardware kind.
    pub hardware_kind: Option<String>,
    pub include_simulated: bool,
    pub omit_latencies: bool,
    /// Only results after this one in the listing order (paging).
    pub after: Option<Uuid>,
    /// At most this many (all when `None`).
    pub limit: Option<i64>,
}

/// What `compare` asks for: non-simulated results of one model, optionally narrowed.
#[derive(Debug, Clone, Default)]
pub struct CompareFilter {
    pub model: String,
    pub precisions: Vec<String>,
    pub batch_sizes: Vec<i32>,
    pub image_size: Option<i32>,
    /// Only this sweep's results.
    pub sweep_id: Option<Uuid>,
    /// Only results from the agent with this name (as the result records it).
    pub agent_name: Option<String>,
    /// Only results whose agent carried all of these labels.
    pub labels: BTreeMap<String, String>,
    /// Only results finished at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Only results finished before this time.
    pub until: Option<DateTime<Utc>>,
    /// One cell per node (GPU UUID, else host/device) as well.
    pub by_node: bool,
}

/// One comparison cell, aggregated in SQL.
#[derive(Debug, Clone, PartialEq, FromRow)]
pub struct CompareCell {
    pub model: String,
    pub precision: String,
    pub batch_size: i32,
    pub image_size: i32,
    pub hardware_kind: String,
    pub path: String,
    pub results: i64,
    pub images_per_sec: f64,
    pub p50_ms: f64,
    pub math: String,
    pub peak_memory_bytes: i64,
    pub price_per_hour: Option<f64>,
    /// Mean and sample standard deviation of the cell's throughputs (0 for one result), for
    /// the confidence interval across results.
    pub images_per_sec_mean: f64,
    pub images_per_sec_std: f64,
    /// The 95% interval of the mean latency of one of the cell's results: the cell's interval
    /// when it holds only that one.
    pub ci95_low_ms: f64,
    pub ci95_high_ms: f64,
    /// The slowest and fastest result of the cell.
    pub min_images_per_sec: f64,
    pub max_images_per_sec: f64,
    /// Results whose timing was not found stable, and results with no stability record.
    pub unstable: i64,
    pub unknown_stability: i64,
    /// Results from a device whose health check in force was flagged (more than 10% below its
    /// kind's median on some metric, or ECC off).
    pub health_flagged: i64,
    /// With [`CompareFilter::by_node`]: the node and the agents that ran on it; else empty.
    pub node: String,
    pub agents: String,
}

impl CompareCell {
    /// The 95% confidence interval of the cell's throughput (see
    /// [`fleetmark_core::stats::throughput_ci95`]).
    pub fn images_per_sec_ci95(&self) -> Option<(f64, f64)> {
        fleetmark_core::stats::throughput_ci95(
            self.results.max(0) as u64,
            self.images_per_sec_mean,
            self.images_per_sec_std,
            self.batch_size.max(0) as u32,
            (self.ci95_low_ms, self.ci95_high_ms),
        )
    }
}

/// What happened to a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailOutcome {
    Retried,
    Failed,
}

#[derive(Clone)]
pub struct Store {
    pool: PgPool,
    /// How long a claimed job waits for its agent's first progress report before it returns to
    /// the queue (without costing an attempt). `None`: a claim holds the job for its lease.
    claim_grace: Option<Duration>,
}

/// The columns of `JobRow`, joined with the agent's name and the result's throughput, followed
/// by a clause. A macro, so every query stays a `&'static str`.
macro_rules! job_select {
    ($clause:literal) => {
        concat!(
            "SELECT j.id, j.sweep_id, j.seq, j.spec, j.state::text AS state, j.attempt, \
             j.lease_expires_at, a.name AS agent_name, coalesce(j.lease_device, j.last_device) AS device, \
             j.phase, j.iterations, j.fraction, j.error, r.images_per_sec \
             FROM jobs j \
             LEFT JOIN agents a ON a.id = coalesce(j.lease_agent_id, j.last_agent_id) \
             LEFT JOIN results r ON r.job_id = j.id ",
            $clause
        )
    };
}

impl Store {
    /// Connects to `url`. The pool reconnects by itself when the database comes back after a
    /// restart; until then calls fail after `acquire_timeout` and map to UNAVAILABLE.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect(url)
            .await?;
        Ok(Store::from_pool(pool))
    }

    pub fn from_pool(pool: PgPool) -> Self {
        Store {
            pool,
            claim_grace: None,
        }
    }

    /// Claims must be acknowledged within `grace` (see [`Store::claim_job`]).
    pub fn with_claim_grace(mut self, grace: Duration) -> Self {
        self.claim_grace = Some(grace);
        self
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies the migrations. Safe to run from several coordinators at once: sqlx holds an
    /// advisory lock while migrating.
    pub async fn migrate(&self) -> Result<()> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    /// Whether the server runs autovacuum. Without it every job transition leaves a dead row
    /// that nothing reclaims, and dispatch slows as they pile up (a 10-minute soak fell by 65%:
    /// docs/reliability.md).
    pub async fn autovacuum_on(&self) -> Result<bool> {
        let v: String = sqlx::query_scalar("SELECT current_setting('autovacuum')")
            .fetch_one(&self.pool)
            .await?;
        Ok(v == "on")
    }

    // ---- agents ----

    /// Registers an agent, or updates the one with the same name (a restarted agent keeps its
    /// id and its history).
    pub async fn register_agent(&self, reg: &AgentRegistration) -> Result<Uuid> {
        let devices: Vec<AgentDevice> = reg
            .devices
            .iter()
            .map(|d| AgentDevice {
                kind: fleetmark_core::normalize_kind(&d.kind),
                ..d.clone()
            })
            .collect();
        let id: Uuid = sqlx::query_scalar(
            "INSERT INTO agents (id, name, labels, price_per_hour, inventory, devices, origin) \
             VALUES ($1, $2, $3, $4, $5, $6, 'registered') \
             ON CONFLICT (name) DO UPDATE SET labels = EXCLUDED.labels, \
                 price_per_hour = EXCLUDED.price_per_hour, inventory = EXCLUDED.inventory, \
                 devices = EXCLUDED.devices, origin = 'registered', last_seen_at = now() \
             RETURNING id",
        )
        .bind(Uuid::new_v4())
        .bind(&reg.name)
        .bind(json(&reg.labels))
        .bind(reg.price_per_hour)
        .bind(json(&reg.inventory))
        .bind(json(&devices))
        .fetch_one(&self.pool)
        .await?;
        Ok(id)
    }

    /// Marks the agent as seen; false when no such agent exists.
    /// An agent that is heard from is no longer stopping (a restarted one, say).
    /// Committed without waiting for the WAL flush (see [`ASYNC_COMMIT`]).
    pub async fn touch_agent(&self, id: Uuid) -> Result<bool> {
        let n = sqlx::query(
            "UPDATE agents SET last_seen_at = now(), stopping_since = NULL \
             WHERE id = $1 AND set_config('synchronous_commit', 'off', true) = 'off'",
        )
        .bind(id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    /// [`Store::touch_agent`] for the agent whose current secret has this hash (see
    /// `Store::agent_by_secret`), authenticating the caller in the same statement: its id, or
    /// `None` for a secret that matches no live agent.
    pub async fn touch_agent_by_secret(&self, secret_hash: &[u8; 32]) -> Result<Option<Uuid>> {
        Ok(sqlx::query_scalar(
            "UPDATE agents a SET last_seen_at = now(), stopping_since = NULL \
             WHERE a.secret_hash = $1 \
               AND NOT EXISTS (SELECT 1 FROM api_tokens t \
                               WHERE t.id = a.registered_by AND t.revoked_at IS NOT NULL) \
               AND set_config('synchronous_commit', 'off', true) = 'off' \
             RETURNING a.id",
        )
        .bind(&secret_hash[..])
        .fetch_optional(&self.pool)
        .await?)
    }

    /// A heartbeat by an agent secret in one statement: authenticates the caller, marks it
    /// seen (as [`Store::touch_agent_by_secret`]) and reads which of the `running` (job,
    /// attempt) pairs it reports it still holds the lease of. `None` for a secret that is not a
    /// live agent's; otherwise the agent and the pairs it no longer holds (as
    /// [`Store::stale_running`] says them).
    pub async fn heartbeat_by_secret(
        &self,
        secret_hash: &[u8; 32],
        running: &[(Uuid, i32)],
    ) -> Result<Option<(Uuid, Vec<(Uuid, i32)>)>> {
        let ids: Vec<Uuid> = running.iter().map(|(j, _)| *j).collect();
        let rows: Vec<(Uuid, Option<Uuid>, Option<i32>)> = sqlx::query_as(
            "WITH seen AS (UPDATE agents a SET last_seen_at = now(), stopping_since = NULL \
                 WHERE a.secret_hash = $1 \
                   AND NOT EXISTS (SELECT 1 FROM api_tokens t \
                                   WHERE t.id = a.registered_by AND t.revoked_at IS NOT NULL) \
                   AND set_config('synchronous_commit', 'off', true) = 'off' \
                 RETURNING a.id) \
             SELECT seen.id, j.id, j.attempt FROM seen \
             LEFT JOIN jobs j ON j.id = ANY($2) AND j.state = 'running' \
                             AND j.lease_agent_id = seen.id",
        )
        .bind(&secret_hash[..])
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?;
        let Some(agent) = rows.first().map(|r| r.0) else {
            return Ok(None);
        };
        let held: Vec<(Uuid, i32)> = rows
            .into_iter()
            .filter_map(|(_, j, a)| Some((j?, a?)))
            .collect();
        let stale = running
            .iter()
            .filter(|r| !held.contains(r))
            .copied()
            .collect();
        Ok(Some((agent, stale)))
    }

    /// Records that an agent's operator is stopping it: leases it cannot hand back before it
    /// goes expire without costing their jobs an attempt.
    pub async fn mark_agent_stopping(&self, id: Uuid) -> Result<()> {
        sqlx::query("UPDATE agents SET last_seen_at = now(), stopping_since = now() WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Marks the agent as seen and returns the kind of one of its devices, in one statement
    /// (the start of every claim). The row is written only when the agent was last seen more
    /// than a second ago (or was stopping): an agent claiming many short jobs in a row does not
    /// rewrite its row for every claim, and `last_seen_at` is never more than a second behind.
    /// Committed without waiting for the WAL flush (see [`ASYNC_COMMIT`]).
    pub async fn touch_device_kind(&self, agent: Uuid, device: &str) -> Result<String> {
        let devices: Option<serde_json::Value> = sqlx::query_scalar(
            "WITH seen AS (UPDATE agents SET last_seen_at = now(), stopping_since = NULL \
                 WHERE id = $1 \
                   AND (last_seen_at < now() - interval '1 second' OR stopping_since IS NOT NULL) \
                   AND set_config('synchronous_commit', 'off', true) = 'off' \
                 RETURNING 1) \
             SELECT devices FROM agents WHERE id = $1",
        )
        .bind(agent)
        .fetch_optional(&self.pool)
        .await?;
        device_kind_in(agent, device, devices)
    }

    /// [`Store::touch_device_kind`] for the agent whose current secret has this hash (see
    /// `Store::agent_by_secret`), authenticating the caller in the same statement: its id and
    /// the device's kind, `None` for a secret that matches no live agent.
    pub async fn touch_device_kind_by_secret(
        &self,
        secret_hash: &[u8; 32],
        device: &str,
    ) -> Result<Option<(Uuid, String)>> {
        let row: Option<(Uuid, serde_json::Value)> = sqlx::query_as(
            "WITH me AS (SELECT a.id, a.devices, a.last_seen_at, a.stopping_since \
                 FROM agents a LEFT JOIN api_tokens t ON t.id = a.registered_by \
                 WHERE a.secret_hash = $1 AND t.revoked_at IS NULL), \
             seen AS (UPDATE agents SET last_seen_at = now(), stopping_since = NULL FROM me \
                 WHERE agents.id = me.id \
                   AND (me.last_seen_at < now() - interval '1 second' \
                        OR me.stopping_since IS NOT NULL) \
                   AND set_config('synchronous_commit', 'off', true) = 'off' \
                 RETURNING 1) \
             SELECT id, devices FROM me",
        )
        .bind(&secret_hash[..])
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some((id, devices)) => Ok(Some((id, device_kind_in(id, device, Some(devices))?))),
            None => Ok(None),
        }
    }

    /// The kind of one of an agent's devices, as it registered it.
    pub async fn device_kind(&self, agent: Uuid, device: &str) -> Result<String> {
        let devices: Option<serde_json::Value> =
            sqlx::query_scalar("SELECT devices FROM agents WHERE id = $1")
                .bind(agent)
                .fetch_optional(&self.pool)
                .await?;
        device_kind_in(agent, device, devices)
    }

    /// Agents, with `online` meaning seen within `online_window`.
    pub async fn list_agents(&self, online_window: Duration) -> Result<Vec<AgentRow>> {
        let rows = sqlx::query(
            "SELECT a.id, a.name, a.labels, a.price_per_hour, a.inventory, a.devices, a.origin, \
                    a.last_seen_at, (a.last_seen_at > now() - $1 * interval '1 millisecond') AS online, \
                    coalesce(array_agg(j.id) FILTER (WHERE j.id IS NOT NULL), '{}') AS running \
             FROM agents a LEFT JOIN jobs j ON j.lease_agent_id = a.id AND j.state = 'running' \
             WHERE a.retired_at IS NULL OR a.last_seen_at > a.retired_at \
             GROUP BY a.id ORDER BY a.name",
        )
        .bind(online_window.as_millis() as f64)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                let origin: String = r.try_get("origin")?;
                let online: bool = r.try_get("online")?;
                Ok(AgentRow {
                    id: r.try_get("id")?,
                    name: r.try_get("name")?,
                    labels: from_json(r.try_get("labels")?),
                    price_per_hour: r.try_get("price_per_hour")?,
                    inventory: from_json(r.try_get("inventory")?),
                    devices: from_json(r.try_get("devices")?),
                    online: online && origin == "registered",
                    origin,
                    last_seen_at: r.try_get("last_seen_at")?,
                    running_jobs: r.try_get("running")?,
                })
            })
            .collect::<sqlx::Result<_>>()
            .map_err(Into::into)
    }

    /// Stored health checks, newest first, optionally of one agent (by name) or one kind.
    pub async fn list_health_checks(
        &self,
        agent_name: Option<&str>,
        kind: Option<&str>,
        limit: i64,
    ) -> Result<Vec<HealthCheckRow>> {
        let rows: Vec<HealthCheckDbRow> = sqlx::query_as(
            "SELECT h.id, a.name, h.device, h.kind, h.incarnation, h.health, h.flags, \
                        (h.incarnation = a.incarnation \
                         AND NOT EXISTS (SELECT 1 FROM health_checks n \
                                         WHERE n.agent_id = h.agent_id \
                                           AND n.device = h.device AND n.id > h.id)) AS in_force \
                 FROM health_checks h JOIN agents a ON a.id = h.agent_id \
                 WHERE ($1::text IS NULL OR a.name = $1) AND ($2::text IS NULL OR h.kind = $2) \
                 ORDER BY h.id DESC LIMIT $3",
        )
        .bind(agent_name)
        .bind(kind)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(
                |(id, agent_name, device, kind, incarnation, health, flags, in_force)| {
                    Some(HealthCheckRow {
                        id,
                        agent_name,
                        device,
                        kind,
                        incarnation,
                        health: decoded_check(id, health)?,
                        flags,
                        in_force,
                    })
                },
            )
            .collect())
    }

    /// Retires registered agents silent for at least `offline_for` and holding no lease; with
    /// `dry_run`, only names them. Returns their names.
    ///
    /// A retired agent's checks leave the set each kind's health flags are judged against, so
    /// the flags of every kind it had a device of are recomputed in the same transaction (as a
    /// registration does): a slow node retired no longer drags its kind's median down, and a
    /// node flagged against retired peers is judged again without them.
    pub async fn prune_agents(&self, offline_for: Duration, dry_run: bool) -> Result<Vec<String>> {
        let offline_ms = offline_for.as_millis() as f64;
        if dry_run {
            let mut names: Vec<String> = sqlx::query_scalar(
                "SELECT name FROM agents a \
                 WHERE origin = 'registered' \
                   AND last_seen_at < now() - $1 * interval '1 millisecond' \
                   AND (retired_at IS NULL OR last_seen_at > retired_at) \
                   AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.lease_agent_id = a.id) \
                 ORDER BY name",
            )
            .bind(offline_ms)
            .fetch_all(&self.pool)
            .await?;
            names.sort();
            return Ok(names);
        }
        let mut tx = self.pool.begin().await?;
        let retired: Vec<(Uuid, String)> = sqlx::query_as(
            "UPDATE agents a SET retired_at = now() \
             WHERE origin = 'registered' AND last_seen_at < now() - $1 * interval '1 millisecond' \
               AND (retired_at IS NULL OR last_seen_at > retired_at) \
               AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.lease_agent_id = a.id) \
             RETURNING id, name",
        )
        .bind(offline_ms)
        .fetch_all(&mut *tx)
        .await?;
        let ids: Vec<Uuid> = retired.iter().map(|(id, _)| *id).collect();
        let mut kinds: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT h.kind FROM health_checks h JOIN agents a ON a.id = h.agent_id \
             WHERE h.agent_id = ANY($1) AND h.incarnation = a.incarnation",
        )
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        // One order for the per-kind locks, as registrations take one kind at a time.
        kinds.sort();
        for kind in &kinds {
            reflag_kind(&mut tx, kind).await?;
        }
        tx.commit().await?;
        let mut names: Vec<String> = retired.into_iter().map(|(_, name)| name).collect();
        names.sort();
        Ok(names)
    }

    /// Jobs per state, for metrics.
    pub async fn job_counts(&self) -> Result<Vec<(String, i64)>> {
        Ok(
            sqlx::query_as("SELECT state::text, count(*) FROM jobs GROUP BY state ORDER BY state")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    // ---- sweeps ----

    /// Validates the sweep, then queues its jobs in one transaction: all or nothing. Nobody is
    /// recorded as its submitter (tools and benches); the service uses `create_sweep_for`.
    pub async fn create_sweep(&self, spec: &SweepSpec, spec_toml: &str) -> Result<(Uuid, usize)> {
        self.create_sweep_for(spec, spec_toml, None).await
    }

    /// Queues a sweep in one transaction, recording its submitter and, when there is one,
    /// refusing it (RESOURCE_EXHAUSTED) if it would take that submitter past its cap of pending
    /// jobs. The count and the insert are serialized per submitter by a transaction-scoped
    /// advisory lock, so concurrent submits (through any coordinator) cannot overshoot the cap.
    pub async fn create_sweep_for(
        &self,
        spec: &SweepSpec,
        spec_toml: &str,
        submitter: Option<Submitter>,
    ) -> Result<(Uuid, usize)> {
        let jobs = spec.expand()?;
        // Random, unlike job and result ids: users type a sweep's first 8 characters (the CLI
        // shows them), which for a time-ordered id would be the same for every sweep of a minute.
        let id = Uuid::new_v4();
        let name = spec
            .name
            .clone()
            .unwrap_or_else(|| format!("sweep-{}", &id.to_string()[..8]));
        let mut tx = self.pool.begin().await?;
        if let Some(submitter) = submitter {
            check_pending_cap(&mut tx, submitter, jobs.len()).await?;
        }
        sqlx::query(
            "INSERT INTO sweeps (id, name, spec, spec_toml, submitted_by) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id)
        .bind(&name)
        .bind(json(spec))
        .bind(spec_toml)
        .bind(submitter.map(|s| s.token))
        .execute(&mut *tx)
        .await?;
        // One statement for all jobs: a 10,000-job sweep is one round trip, not 10,000.
        let ids: Vec<Uuid> = jobs.iter().map(|_| row_id()).collect();
        let seqs: Vec<i32> = (0..jobs.len() as i32).collect();
        let specs: Vec<serde_json::Value> = jobs.iter().map(json).collect();
        let targets: Vec<String> = jobs.iter().map(|j| j.target.to_string()).collect();
        sqlx::query(
            "INSERT INTO jobs (id, sweep_id, seq, spec, target) \
             SELECT u.id, $1, u.seq, u.spec, u.target \
             FROM unnest($2::uuid[], $3::int[], $4::jsonb[], $5::text[]) AS u(id, seq, spec, target)",
        )
        .bind(id)
        .bind(&ids)
        .bind(&seqs)
        .bind(&specs)
        .bind(&targets)
        .execute(&mut *tx)
        .await?;
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(JOBS_CHANNEL)
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok((id, jobs.len()))
    }

    pub async fn get_sweep(&self, id: Uuid) -> Result<SweepRow> {
        sqlx::query_as::<_, SweepRow>(
            "SELECT s.id, s.name, s.spec_toml, s.state, s.created_at, \
                    count(j.id) AS jobs, \
                    count(j.id) FILTER (WHERE j.state IN ('succeeded', 'failed', 'cancelled')) AS finished \
             FROM sweeps s LEFT JOIN jobs j ON j.sweep_id = s.id \
             WHERE s.id = $1 GROUP BY s.id",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| CoordinatorError::NotFound(format!("no sweep {id}")))
    }

    pub async fn list_sweeps(&self, limit: i64) -> Result<Vec<SweepRow>> {
        Ok(sqlx::query_as::<_, SweepRow>(
            "SELECT s.id, s.name, s.spec_toml, s.state, s.created_at, \
                    count(j.id) AS jobs, \
                    count(j.id) FILTER (WHERE j.state IN ('succeeded', 'failed', 'cancelled')) AS finished \
             FROM sweeps s LEFT JOIN jobs j ON j.sweep_id = s.id \
             GROUP BY s.id ORDER BY s.created_at DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Sweeps whose id starts with `prefix` (already checked to be hex digits and dashes),
    /// newest first.
    pub async fn find_sweeps(&self, prefix: &str, limit: i64) -> Result<Vec<SweepRow>> {
        Ok(sqlx::query_as::<_, SweepRow>(
            "SELECT s.id, s.name, s.spec_toml, s.state, s.created_at, \
                    count(j.id) AS jobs, \
                    count(j.id) FILTER (WHERE j.state IN ('succeeded', 'failed', 'cancelled')) AS finished \
             FROM sweeps s LEFT JOIN jobs j ON j.sweep_id = s.id \
             WHERE s.id::text LIKE $1 || '%' \
             GROUP BY s.id ORDER BY s.created_at DESC LIMIT $2",
        )
        .bind(prefix)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn sweep_jobs(&self, sweep: Uuid) -> Result<Vec<JobRow>> {
        Ok(
            sqlx::query_as::<_, JobRow>(job_select!("WHERE j.sweep_id = $1 ORDER BY j.seq"))
                .bind(sweep)
                .fetch_all(&self.pool)
                .await?,
        )
    }

    pub async fn get_job(&self, job: Uuid) -> Result<JobRow> {
        sqlx::query_as::<_, JobRow>(job_select!("WHERE j.id = $1"))
            .bind(job)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| CoordinatorError::NotFound(format!("no job {job}")))
    }

    /// Cancels a sweep's unfinished jobs; `None` if the sweep does not exist. Running jobs lose
    /// their lease, so their agents stop at the next progress report or heartbeat.
    pub async fn cancel_sweep(&self, sweep: Uuid) -> Result<Option<u64>> {
        let mut tx = self.pool.begin().await?;
        let exists: Option<String> =
            sqlx::query_scalar("SELECT state FROM sweeps WHERE id = $1 FOR UPDATE")
                .bind(sweep)
                .fetch_optional(&mut *tx)
                .await?;
        if exists.is_none() {
            return Ok(None);
        }
        let n = sqlx::query(
            "UPDATE jobs SET state = 'cancelled', lease_agent_id = NULL, lease_device = NULL, \
                 lease_expires_at = NULL, finished_at = now(), error = 'cancelled by user' \
             WHERE sweep_id = $1 AND finished_at IS NULL",
        )
        .bind(sweep)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        sqlx::query(
            "UPDATE sweeps SET state = 'cancelled', finished_at = now() \
             WHERE id = $1 AND state = 'active'",
        )
        .bind(sweep)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(n))
    }

    /// Marks the sweep completed once none of its jobs can run any more. Called after the
    /// transaction that finished a job has committed: two last jobs finishing at the same time
    /// each commit first, so the later check sees both finished (inside the transactions,
    /// each would still see the other running and the sweep would stay active). It also keeps
    /// the sweep row out of the job transactions, so they never lock it in the opposite order
    /// from `cancel_sweep`.
    async fn complete_sweep_if_done(&self, sweep: Uuid) -> Result<()> {
        sqlx::query(
            "UPDATE sweeps SET state = 'completed', finished_at = now() \
             WHERE id = $1 AND state = 'active' AND NOT EXISTS \
                 (SELECT 1 FROM jobs WHERE sweep_id = $1 AND finished_at IS NULL)",
        )
        .bind(sweep)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Completes every active sweep whose jobs are all finished. A backstop the reaper runs, so
    /// a completion check lost to a crash between commit and check is made up for.
    pub async fn complete_finished_sweeps(&self) -> Result<u64> {
        Ok(sqlx::query(
            "UPDATE sweeps s SET state = 'completed', finished_at = now() \
             WHERE s.state = 'active' AND NOT EXISTS \
                 (SELECT 1 FROM jobs j WHERE j.sweep_id = s.id AND j.finished_at IS NULL)",
        )
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    // ---- jobs ----

    /// Claims the oldest pending job this device can run, starting a new attempt with a lease.
    /// A job whose last run was on this very device goes behind the others, so a retry lands
    /// on another card when one is free. Rows another coordinator is claiming right now are
    /// skipped, not waited for. With a claim grace set, the claim must be acknowledged by the
    /// agent's first progress report within it.
    pub async fn claim_job(
        &self,
        agent: Uuid,
        device: &str,
        kind: &str,
        lease: Duration,
    ) -> Result<Option<JobRow>> {
        let grace = self.claim_grace.map(|g| g.as_millis() as f64);
        let row = sqlx::query(CLAIM_SQL)
            .bind(agent)
            .bind(device)
            .bind(lease.as_millis() as f64)
            .bind(grace)
            .bind(kind)
            .fetch_one(&self.pool)
            .await?;
        Ok(claim_row(&row)?.2)
    }

    /// [`Store::claim_job`] for the agent whose current secret has this hash, authenticating
    /// it and marking it seen in the same statement (see [`CLAIM_BY_SECRET_SQL`]). `None` when
    /// the secret is not a live agent's, the agent is not `body_agent` (when given), or it
    /// registered no such device: nothing was claimed, and the caller takes the full path,
    /// which says which. Otherwise the agent, the device's kind, and the job claimed, if any.
    pub async fn claim_job_by_secret(
        &self,
        secret_hash: &[u8; 32],
        body_agent: Option<Uuid>,
        device: &str,
        lease: Duration,
    ) -> Result<Option<(Uuid, String, Option<JobRow>)>> {
        let grace = self.claim_grace.map(|g| g.as_millis() as f64);
        let row = sqlx::query(CLAIM_BY_SECRET_SQL)
            .bind(&secret_hash[..])
            .bind(device)
            .bind(lease.as_millis() as f64)
            .bind(grace)
            .bind(body_agent)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        Ok(match claim_row(&row)? {
            (agent, Some(kind), job) => Some((agent, kind, job)),
            (_, None, _) => None,
        })
    }

    /// Records progress (which also acknowledges the claim) and extends the lease. Returns the
    /// new expiry and the job's sweep; `None` when the caller no longer holds the lease of this
    /// attempt. No indexed column changes, so the update is HOT; committed without waiting for
    /// the WAL flush (see [`ASYNC_COMMIT`]).
    #[allow(clippy::too_many_arguments)]
    pub async fn report_progress(
        &self,
        agent: Uuid,
        job: Uuid,
        attempt: i32,
        phase: &str,
        iterations: i32,
        fraction: f64,
        lease: Duration,
    ) -> Result<Option<(DateTime<Utc>, Uuid)>> {
        Ok(sqlx::query_as(
            "UPDATE jobs SET phase = $4, iterations = $5, fraction = $6, \
                 lease_expires_at = now() + $7 * interval '1 millisecond', claim_ack_by = NULL \
             WHERE id = $2 AND attempt = $3 AND lease_agent_id = $1 AND state = 'running' \
               AND set_config('synchronous_commit', 'off', true) = 'off' \
             RETURNING lease_expires_at, sweep_id",
        )
        .bind(agent)
        .bind(job)
        .bind(attempt)
        .bind(phase)
        .bind(iterations)
        .bind(fraction.clamp(0.0, 1.0))
        .bind(lease.as_millis() as f64)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// [`Store::report_progress`] for many reports by agent secret in one statement (see
    /// `crate::batch`), each authenticating its caller. Answers each item in order: `Some` when its update was made, `None`
    /// when it was not (a stale lease, a wrong credential, a second report of the same run in
    /// the batch), which the caller then sends through the single-item path. An error fails
    /// the whole batch and nothing was updated.
    pub async fn report_progress_batch(
        &self,
        items: &[ProgressBySecret],
        lease: Duration,
    ) -> Result<Vec<Option<(DateTime<Utc>, Uuid)>>> {
        let hashes: Vec<Vec<u8>> = column(items, |i| i.secret_hash.to_vec());
        let bodies: Vec<Option<Uuid>> = column(items, |i| i.body_agent);
        let jobs: Vec<Uuid> = column(items, |i| i.job);
        let attempts: Vec<i32> = column(items, |i| i.attempt);
        let phases: Vec<String> = column(items, |i| i.phase.clone());
        let iterations: Vec<i32> = column(items, |i| i.iterations);
        let fractions: Vec<f64> = column(items, |i| i.fraction.clamp(0.0, 1.0));
        let rows: Vec<(i64, DateTime<Utc>, Uuid)> = sqlx::query_as(PROGRESS_BATCH_SQL)
            .bind(hashes)
            .bind(bodies)
            .bind(jobs)
            .bind(attempts)
            .bind(phases)
            .bind(iterations)
            .bind(fractions)
            .bind(lease.as_millis() as f64)
            .fetch_all(&self.pool)
            .await?;
        let mut out = vec![None; items.len()];
        for (i, expires, sweep) in rows {
            if let Some(slot) = usize::try_from(i - 1).ok().and_then(|i| out.get_mut(i)) {
                *slot = Some((expires, sweep));
            }
        }
        Ok(out)
    }

    /// Stores a result and finishes its job, atomically. The insert trigger refuses a result
    /// whose (job, attempt, agent) is not the running lease; that surfaces as `StaleLease`.
    pub async fn submit_result(&self, agent: Uuid, result: &BenchResult) -> Result<Uuid> {
        let job = result
            .job_id
            .ok_or_else(|| CoordinatorError::InvalidArgument("the result has no job id".into()))?;
        // The job and the agent's registration in one read. Outside a transaction: the spec
        // never changes, and the write re-checks the lease itself.
        let row: Option<JobAndAgentRow> = sqlx::query_as(
            "SELECT j.sweep_id, j.spec, a.devices, a.inventory \
                 FROM jobs j LEFT JOIN agents a ON a.id = $2 WHERE j.id = $1",
        )
        .bind(job)
        .bind(agent)
        .fetch_optional(&self.pool)
        .await?;
        let (sweep, spec, devices, inventory) =
            row.ok_or_else(|| CoordinatorError::NotFound(format!("no job {job}")))?;
        let (Some(devices), Some(inventory)) = (devices, inventory) else {
            return Err(CoordinatorError::NotFound(format!("unknown agent {agent}")));
        };
        let submission = Submission {
            agent,
            job,
            sweep,
            spec,
            devices,
            inventory,
        };
        self.store_result(submission, result).await
    }

    /// The part of a result submission after the first read: the checks, then one statement
    /// that inserts the result and finishes its job (see [`STORE_RESULT_SQL`]), then the sweep's
    /// completion when no job of it was pending.
    async fn store_result(&self, s: Submission, result: &BenchResult) -> Result<Uuid> {
        check_submission(&s, result)?;
        let Submission {
            agent, job, sweep, ..
        } = s;
        let id = row_id();
        let row = bind_result(
            sqlx::query(STORE_RESULT_SQL),
            ResultRowIds {
                id,
                job,
                sweep,
                agent,
                hash: &result.content_hash(),
                imported_by: None,
            },
            result,
        )
        .bind(result.latencies_ms.len() as i32)
        .fetch_one(&self.pool)
        .await?;
        // Stored and committed: from here on nothing may turn into an error, or the agent
        // would be told its stored result was refused. A missed completion check is made up by
        // the reaper's backstop (`complete_finished_sweeps`).
        if !row.try_get::<bool, _>("pending_left").unwrap_or(true) {
            self.complete_sweep_after_commit(sweep).await;
        }
        Ok(id)
    }

    /// [`Store::complete_sweep_if_done`] after a result was committed: a failure is logged,
    /// not returned, and left to the reaper's backstop.
    async fn complete_sweep_after_commit(&self, sweep: Uuid) {
        if let Err(e) = self.complete_sweep_if_done(sweep).await {
            warn!(sweep_id = %sweep, error = %e,
                  "sweep completion check failed; the reaper will complete it");
        }
    }

    /// Many agents' results in two statements (see `crate::batch`): one read that
    /// authenticates every item and fetches its job, then, for the items that pass the same
    /// checks as [`Store::submit_result`], one statement that inserts them all and
    /// finishes their jobs (flushed once). Answers each item in order: `Some(id)` when stored,
    /// `None` when not, and the caller then sends it through the single-item path, which says
    /// why. The write is all or nothing: one stale item (its lease moved on meanwhile) fails it,
    /// and every item then takes the single path.
    pub async fn submit_results_batch(
        &self,
        items: &[ResultBySecret],
    ) -> Result<Vec<Option<Uuid>>> {
        let mut out = vec![None; items.len()];
        let reads = self.read_results_batch(items).await?;
        let mut accepted: Vec<(usize, Submission)> = Vec::with_capacity(items.len());
        for (i, read) in reads.into_iter().enumerate() {
            let Some(s) = read else { continue };
            if items[i].body_agent.is_some_and(|b| b != s.agent) {
                continue;
            }
            if check_submission(&s, &items[i].result).is_ok() {
                accepted.push((i, s));
            }
        }
        if accepted.is_empty() {
            return Ok(out);
        }
        let mut cols = ResultColumns::default();
        let mut ids = Vec::with_capacity(accepted.len());
        for (i, s) in &accepted {
            let id = row_id();
            cols.push(id, s, &items[*i].result);
            ids.push(id);
        }
        let row = cols
            .bind(sqlx::query(STORE_RESULTS_BATCH_SQL))
            .bind(accepted.len() as i64)
            .fetch_one(&self.pool)
            .await?;
        // Committed: every accepted item is stored, whatever happens next (see `store_result`).
        for ((i, _), id) in accepted.iter().zip(ids) {
            out[*i] = Some(id);
        }
        let settled: Vec<Uuid> = row.try_get("settled").unwrap_or_default();
        for sweep in settled {
            self.complete_sweep_after_commit(sweep).await;
        }
        Ok(out)
    }

    /// The first statement of [`Store::submit_results_batch`]: per item, the live agent holding
    /// its secret, that agent's registration, and the job it names (`None`: no such agent, or
    /// no such job).
    async fn read_results_batch(
        &self,
        items: &[ResultBySecret],
    ) -> Result<Vec<Option<Submission>>> {
        let hashes: Vec<Vec<u8>> = column(items, |i| i.secret_hash.to_vec());
        let jobs: Vec<Option<Uuid>> = column(items, |i| i.result.job_id);
        let rows: Vec<BatchReadRow> = sqlx::query_as(
            "SELECT u.i, a.id, a.devices, a.inventory, j.sweep_id, j.spec \
             FROM unnest($1::bytea[], $2::uuid[]) WITH ORDINALITY AS u(hash, job, i) \
                  JOIN agents a ON a.secret_hash = u.hash \
                  LEFT JOIN api_tokens t ON t.id = a.registered_by \
                  JOIN jobs j ON j.id = u.job \
             WHERE t.revoked_at IS NULL",
        )
        .bind(hashes)
        .bind(jobs)
        .fetch_all(&self.pool)
        .await?;
        let mut out: Vec<Option<Submission>> = (0..items.len()).map(|_| None).collect();
        for (i, agent, devices, inventory, sweep, spec) in rows {
            let Some(at) = usize::try_from(i - 1).ok().filter(|&at| at < items.len()) else {
                continue;
            };
            let Some(job) = items[at].result.job_id else {
                continue;
            };
            out[at] = Some(Submission {
                agent,
                job,
                sweep,
                spec,
                devices,
                inventory,
            });
        }
        Ok(out)
    }
}

/// The checks a result passes before it is stored: it answers its job's spec, on hardware the
/// job allows and the agent registered.
fn check_submission(s: &Submission, result: &BenchResult) -> Result<()> {
    let job = s.job;
    let spec = JobSpec::deserialize(&s.spec)
        .map_err(|e| CoordinatorError::InvalidArgument(format!("stored job spec: {e}")))?;
    if result.spec != spec {
        return Err(CoordinatorError::InvalidArgument(format!(
            "the result's spec ({}) is not job {job}'s ({})",
            result.spec.label(),
            spec.label()
        )));
    }
    if !spec.target.matches_name(&result.hardware_kind) {
        return Err(CoordinatorError::InvalidArgument(format!(
            "job {job} targets {} but the result comes from {}",
            spec.target,
            fleetmark_core::limits::Excerpt::of(&result.hardware_kind)
        )));
    }
    let devices = Vec::<AgentDevice>::deserialize(&s.devices).unwrap_or_default();
    let inventory = HostInventory::deserialize(&s.inventory).unwrap_or_default();
    check_hardware(result, &devices, &inventory).map_err(CoordinatorError::InvalidArgument)
}

impl Store {
    /// Ends an attempt that could not produce a result. It is retried unless the failure is
    /// permanent or the job is out of attempts. `None` when the caller no longer held the lease.
    pub async fn fail_job(
        &self,
        agent: Uuid,
        job: Uuid,
        attempt: i32,
        reason: &str,
        permanent: bool,
    ) -> Result<Option<FailOutcome>> {
        let release = if permanent {
            Release::Permanent
        } else {
            Release::Failure
        };
        self.release(agent, job, attempt, reason, release).await
    }

    /// Returns a job its agent could not finish through no fault of the job (the agent is
    /// stopping): the queue takes it back without using an attempt. Hand-backs are counted and
    /// bounded too, so a job cannot bounce forever. `None` when the caller no longer held the
    /// lease.
    pub async fn hand_back(
        &self,
        agent: Uuid,
        job: Uuid,
        attempt: i32,
        reason: &str,
    ) -> Result<Option<FailOutcome>> {
        self.release(agent, job, attempt, reason, Release::HandBack)
            .await
    }

    async fn release(
        &self,
        agent: Uuid,
        job: Uuid,
        attempt: i32,
        reason: &str,
        release: Release,
    ) -> Result<Option<FailOutcome>> {
        let mut tx = self.pool.begin().await?;
        let row: Option<(String, Uuid)> = sqlx::query_as(
            "UPDATE jobs SET \
                 failures = failures + (NOT $6)::int, handbacks = handbacks + $6::int, \
                 state = CASE WHEN $5 OR (NOT $6 AND failures + 1 >= max_attempts) \
                                 OR ($6 AND handbacks + 1 >= max_handbacks) \
                              THEN 'failed'::job_state ELSE 'pending'::job_state END, \
                 finished_at = CASE WHEN $5 OR (NOT $6 AND failures + 1 >= max_attempts) \
                                 OR ($6 AND handbacks + 1 >= max_handbacks) THEN now() END, \
                 error = CASE WHEN $6 AND handbacks + 1 >= max_handbacks \
                              THEN $4 || ' (handed back ' || (handbacks + 1) || ' times: giving up)' \
                              ELSE $4 END, \
                 lease_agent_id = NULL, lease_device = NULL, lease_expires_at = NULL \
             WHERE id = $2 AND attempt = $3 AND lease_agent_id = $1 AND state = 'running' \
             RETURNING state::text, sweep_id",
        )
        .bind(agent)
        .bind(job)
        .bind(attempt)
        .bind(reason)
        .bind(release == Release::Permanent)
        .bind(release == Release::HandBack)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((state, sweep)) = row else {
            return Ok(None);
        };
        let outcome = if state == "failed" {
            FailOutcome::Failed
        } else {
            notify(&mut tx).await?;
            FailOutcome::Retried
        };
        tx.commit().await?;
        if outcome == FailOutcome::Failed {
            self.complete_sweep_if_done(sweep).await?;
        }
        Ok(Some(outcome))
    }

    /// Returns expired leases to the queue (or fails jobs out of attempts). A lease that
    /// expired because its agent's operator stopped it, and a claim never acknowledged within
    /// its grace, are hand-backs, not failures. `now` defaults to the database's clock; tests
    /// pass a later time instead of sleeping.
    pub async fn expire_leases(&self, now: Option<DateTime<Utc>>) -> Result<Vec<Uuid>> {
        let mut tx = self.pool.begin().await?;
        let rows: Vec<(Uuid, Uuid, String)> = sqlx::query_as(EXPIRE_SQL)
            .bind(now)
            .fetch_all(&mut *tx)
            .await?;
        if rows.iter().any(|(_, _, state)| state != "failed") {
            notify(&mut tx).await?;
        }
        tx.commit().await?;
        for (_, sweep, state) in &rows {
            if state == "failed" {
                self.complete_sweep_if_done(*sweep).await?;
            }
        }
        Ok(rows.into_iter().map(|(id, _, _)| id).collect())
    }

    /// Gives the running leases of agents that were heard from shortly before the service
    /// stopped (within `heard_within` of the last moment any coordinator served, see
    /// [`Store::mark_alive`]) at least `lease` from now: they kept working but could not report
    /// meanwhile. Leases of agents that had already gone quiet are left to expire, so a
    /// coordinator that restarts in a loop never keeps a dead agent's job.
    pub async fn extend_running_leases(
        &self,
        lease: Duration,
        heard_within: Duration,
    ) -> Result<u64> {
        Ok(sqlx::query(
            "UPDATE jobs j SET \
                 lease_expires_at = greatest(j.lease_expires_at, now() + $1 * interval '1 millisecond'), \
                 claim_ack_by = CASE WHEN j.claim_ack_by IS NOT NULL \
                     THEN greatest(j.claim_ack_by, now() + $2 * interval '1 millisecond') END \
             FROM agents a \
             WHERE a.id = j.lease_agent_id AND j.state = 'running' \
               AND a.last_seen_at >= coalesce((SELECT alive_at FROM service_clock), now()) \
                                     - $2 * interval '1 millisecond'",
        )
        .bind(lease.as_millis() as f64)
        .bind(heard_within.as_millis() as f64)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    /// Records that a coordinator is serving now (every reaper tick): the start of the next
    /// outage, as far as lease renewal is concerned.
    pub async fn mark_alive(&self) -> Result<()> {
        sqlx::query(
            "INSERT INTO service_clock (id, alive_at) VALUES (true, now()) \
             ON CONFLICT (id) DO UPDATE SET alive_at = greatest(service_clock.alive_at, now())",
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Of the (job, attempt) pairs an agent says it runs, those it should stop: no longer
    /// leased to it for that attempt.
    pub async fn stale_running(
        &self,
        agent: Uuid,
        running: &[(Uuid, i32)],
    ) -> Result<Vec<(Uuid, i32)>> {
        if running.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = running.iter().map(|(j, _)| *j).collect();
        let held: Vec<(Uuid, i32)> = sqlx::query_as(
            "SELECT id, attempt FROM jobs \
             WHERE id = ANY($1) AND state = 'running' AND lease_agent_id = $2",
        )
        .bind(&ids)
        .bind(agent)
        .fetch_all(&self.pool)
        .await?;
        Ok(running
            .iter()
            .filter(|r| !held.contains(r))
            .copied()
            .collect())
    }

    // ---- results ----

    /// Results matching `f`. Rows are decoded one by one: a row that cannot be read back as a
    /// valid result (stored before validation existed, or damaged) is logged and skipped, and
    /// counted in `skipped`; it never fails the listing.
    pub async fn list_results(&self, f: &ResultFilter) -> Result<ResultListing> {
        let rows = sqlx::query(
            "SELECT id, sweep_id, record, imported_by, \
                    CASE WHEN $6 THEN '{}'::double precision[] ELSE latencies_ms END AS latencies_ms, \
                    health_check_id, \
                    (SELECT h.flags FROM health_checks h WHERE h.id = health_check_id) AS health_flags \
             FROM results \
             WHERE ($1::uuid IS NULL OR sweep_id = $1) \
               AND ($2::text IS NULL OR model = $2) \
               AND ($3::text IS NULL OR precision = $3) \
               AND ($4::int IS NULL OR batch_size = $4) \
               AND ($5 OR NOT simulated) \
               AND ($9::text IS NULL OR hardware_kind = $9) \
               AND ($7::uuid IS NULL OR (hardware_kind, model, precision, batch_size, finished_at, id) > \
                    (SELECT hardware_kind, model, precision, batch_size, finished_at, id \
                     FROM results WHERE id = $7)) \
             ORDER BY hardware_kind, model, precision, batch_size, finished_at, id \
             LIMIT $8",
        )
        .bind(f.sweep_id)
        .bind(&f.model)
        .bind(&f.precision)
        .bind(f.batch_size)
        .bind(f.include_simulated)
        .bind(f.omit_latencies)
        .bind(f.after)
        .bind(f.limit)
        .bind(&f.hardware_kind)
        .fetch_all(&self.pool)
        .await?;
        let mut listing = ResultListing::default();
        for row in rows {
            match decode_result(&row) {
                Ok(r) => listing.results.push(r),
                Err(e) => {
                    let id: Option<Uuid> = row.try_get("id").ok();
                    warn!(result_id = ?id, error = %e, "stored result skipped: it does not read back as a valid result");
                    listing.skipped += 1;
                }
            }
        }
        Ok(listing)
    }

    /// Non-simulated results grouped by (model, precision, batch size, image size, hardware
    /// kind, path), with medians computed by the database: the answer grows with the number
    /// of cells, never with the number of results. Every filter is applied in SQL.
    pub async fn compare(&self, f: &CompareFilter) -> Result<Vec<CompareCell>> {
        Ok(sqlx::query_as::<_, CompareCell>(
            "SELECT model, precision, batch_size, image_size, hardware_kind, path, \
                    count(*) AS results, \
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY images_per_sec) AS images_per_sec, \
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY p50_ms) AS p50_ms, \
                    string_agg(DISTINCT math, '+' ORDER BY math) AS math, \
                    max(peak_memory_bytes) AS peak_memory_bytes, \
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY price_per_hour) AS price_per_hour, \
                    avg(images_per_sec) AS images_per_sec_mean, \
                    coalesce(stddev_samp(images_per_sec), 0) AS images_per_sec_std, \
                    min(ci95_low_ms) AS ci95_low_ms, \
                    min(ci95_high_ms) AS ci95_high_ms, \
                    min(images_per_sec) AS min_images_per_sec, \
                    max(images_per_sec) AS max_images_per_sec, \
                    count(*) FILTER (WHERE stable IS FALSE) AS unstable, \
                    count(*) FILTER (WHERE stable IS NULL) AS unknown_stability, \
                    count(*) FILTER (WHERE health_flagged) AS health_flagged, \
                    node, string_agg(DISTINCT agent, '+' ORDER BY agent) AS agents \
             FROM (SELECT r.*, \
                          CASE WHEN $10 THEN record->>'agent_name' ELSE '' END AS agent, \
                          CASE WHEN $10 THEN coalesce( \
                              (SELECT g->>'uuid' FROM jsonb_array_elements( \
                                   CASE WHEN jsonb_typeof(record->'host'->'gpus') = 'array' \
                                        THEN record->'host'->'gpus' ELSE '[]'::jsonb END) g \
                               WHERE device = 'cuda:' || (g->>'index') \
                                 AND coalesce(g->>'uuid', '') <> '' LIMIT 1), \
                              nullif(record->'host'->>'hostname', '') || '/' || device, \
                              (record->>'agent_name') || '/' || device) \
                          ELSE '' END AS node, \
                          coalesce((SELECT cardinality(h.flags) > 0 FROM health_checks h \
                                    WHERE h.id = r.health_check_id), false) AS health_flagged \
                   FROM results r) results \
             WHERE NOT simulated AND model = $1 \
               AND (cardinality($2::text[]) = 0 OR precision = ANY($2)) \
               AND (cardinality($3::int[]) = 0 OR batch_size = ANY($3)) \
               AND ($4::int IS NULL OR image_size = $4) \
               AND ($5::uuid IS NULL OR sweep_id = $5) \
               AND ($6::text IS NULL OR record->>'agent_name' = $6) \
               AND (coalesce(record->'agent_labels', '{}'::jsonb) @> $7::jsonb) \
               AND ($8::timestamptz IS NULL OR finished_at >= $8) \
               AND ($9::timestamptz IS NULL OR finished_at < $9) \
             GROUP BY model, precision, batch_size, image_size, hardware_kind, path, node \
             ORDER BY model, precision, batch_size, image_size, hardware_kind, path, node",
        )
        .bind(&f.model)
        .bind(&f.precisions)
        .bind(&f.batch_sizes)
        .bind(f.image_size)
        .bind(f.sweep_id)
        .bind(&f.agent_name)
        .bind(json(&f.labels))
        .bind(f.since)
        .bind(f.until)
        .bind(f.by_node)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Loads result records produced elsewhere, each with its own outcome (see
    /// [`ImportOutcome`]): a record for a job still running on that attempt completes it as
    /// `submit_result` would; one for a job that moved on is stale; one already stored is a
    /// duplicate; the rest are filed under a new imported sweep named `name`, under agents
    /// named `imported/<name>`. Every record must be valid, or nothing is stored; all records
    /// are stored in one transaction. `imported_by` is the importing credential's identity.
    pub async fn import(
        &self,
        name: &str,
        imported_by: &str,
        results: &[BenchResult],
    ) -> Result<ImportReport> {
        if results.is_empty() {
            return Err(CoordinatorError::InvalidArgument(
                "nothing to import: no result records".into(),
            ));
        }
        for (i, r) in results.iter().enumerate() {
            r.validate()
                .map_err(|e| CoordinatorError::InvalidArgument(format!("record {}: {e}", i + 1)))?;
        }
        let mut tx = self.pool.begin().await?;
        let mut report = ImportReport::default();
        let mut seen = std::collections::HashSet::new();
        let mut attached_sweeps = Vec::new();
        let mut filed = 0usize;
        for r in results {
            let hash = r.content_hash();
            let existing: Option<Uuid> =
                sqlx::query_scalar("SELECT id FROM results WHERE content_sha256 = $1")
                    .bind(&hash)
                    .fetch_optional(&mut *tx)
                    .await?;
            if existing.is_some() || !seen.insert(hash) {
                report
                    .outcomes
                    .push(ImportOutcome::Duplicate { result: existing });
                continue;
            }
            if let Some(job) = r.job_id {
                if let Some(outcome) = attach_spooled(&mut tx, job, r, imported_by).await? {
                    if let ImportOutcome::Attached { .. } = outcome {
                        attached_sweeps.push(job);
                    }
                    report.outcomes.push(outcome);
                    continue;
                }
            }
            let sweep = match report.sweep {
                Some(s) => s,
                None => {
                    let s = create_imported_sweep(&mut tx, name).await?;
                    report.sweep = Some(s);
                    s
                }
            };
            let result = file_imported(&mut tx, sweep, filed as i32, r, imported_by).await?;
            filed += 1;
            report.outcomes.push(ImportOutcome::Imported { result });
        }
        tx.commit().await?;
        for job in attached_sweeps {
            let sweep: Uuid = sqlx::query_scalar("SELECT sweep_id FROM jobs WHERE id = $1")
                .bind(job)
                .fetch_one(&self.pool)
                .await?;
            self.complete_sweep_if_done(sweep).await?;
        }
        Ok(report)
    }
}

/// Stores the health checks declared with a registration (one per device that ran one) as
/// `incarnation`'s, then recomputes the flags of the checks in force for those devices' kinds:
/// each device's latest check, of agents not retired, against the median of them all (the same
/// set and rule as `ListAgents`). Serialised per kind, so two registrations never flag against
/// each other's stale view. Called inside the registration's transaction.
pub(crate) async fn record_health_checks(
    conn: &mut sqlx::PgConnection,
    agent: Uuid,
    incarnation: i32,
    devices: &[AgentDevice],
) -> Result<()> {
    let mut kinds = std::collections::BTreeSet::new();
    for d in devices {
        let Some(h) = &d.health else { continue };
        sqlx::query(
            "INSERT INTO health_checks (agent_id, incarnation, device, kind, checked_at, health) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(agent)
        .bind(incarnation)
        .bind(&d.device)
        .bind(&d.kind)
        .bind(h.measured_at)
        .bind(json(h))
        .execute(&mut *conn)
        .await?;
        kinds.insert(d.kind.as_str());
    }
    for kind in kinds {
        reflag_kind(conn, kind).await?;
    }
    Ok(())
}

/// A stored health check's report, or `None` (with a warning naming the row) when it cannot be
/// decoded, such as one written by a coordinator whose report had other fields. Such a row is
/// left out of listings and of the kind's median rather than failing them.
fn decoded_check(id: i64, health: serde_json::Value) -> Option<fleetmark_core::DeviceHealth> {
    serde_json::from_value(health)
        .map_err(|e| {
            tracing::warn!(check = id, error = %e, "stored health check cannot be decoded; left out");
        })
        .ok()
}

/// Recomputes and stores the flags of `kind`'s checks in force (see [`record_health_checks`]).
async fn reflag_kind(conn: &mut sqlx::PgConnection, kind: &str) -> Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 11))")
        .bind(kind)
        .execute(&mut *conn)
        .await?;
    let rows: Vec<(i64, serde_json::Value, Vec<String>)> = sqlx::query_as(
        "SELECT DISTINCT ON (h.agent_id, h.device) h.id, h.health, h.flags \
         FROM health_checks h JOIN agents a ON a.id = h.agent_id \
         WHERE h.kind = $1 AND h.incarnation = a.incarnation \
           AND (a.retired_at IS NULL OR a.last_seen_at > a.retired_at) \
         ORDER BY h.agent_id, h.device, h.id DESC",
    )
    .bind(kind)
    .fetch_all(&mut *conn)
    .await?;
    let checks: Vec<(i64, fleetmark_core::DeviceHealth, Vec<String>)> = rows
        .into_iter()
        .filter_map(|(id, h, flags)| Some((id, decoded_check(id, h)?, flags)))
        .collect();
    let peers: Vec<&fleetmark_core::DeviceHealth> = checks.iter().map(|(_, h, _)| h).collect();
    let medians = fleetmark_core::health::KindMedians::of(&peers);
    for (id, h, old) in &checks {
        let now: Vec<String> = medians.flags(h).iter().map(ToString::to_string).collect();
        if now != *old {
            sqlx::query("UPDATE health_checks SET flags = $2, flags_at = now() WHERE id = $1")
                .bind(id)
                .bind(&now)
                .execute(&mut *conn)
                .await?;
        }
    }
    Ok(())
}

fn device_kind_in(agent: Uuid, device: &str, devices: Option<serde_json::Value>) -> Result<String> {
    let devices =
        devices.ok_or_else(|| CoordinatorError::NotFound(format!("unknown agent {agent}")))?;
    let devices: Vec<AgentDevice> = serde_json::from_value(devices).unwrap_or_default();
    devices
        .into_iter()
        .find(|d| d.device == device)
        .map(|d| d.kind)
        .ok_or_else(|| {
            CoordinatorError::InvalidArgument(format!(
                "agent {agent} did not register device '{device}'"
            ))
        })
}

/// What `submit_result` reads first: the job's sweep and spec, the agent's devices and
/// inventory (`None` for an unknown agent).
type JobAndAgentRow = (
    Uuid,
    serde_json::Value,
    Option<serde_json::Value>,
    Option<serde_json::Value>,
);

/// What a result submission read first: the submitting agent's registration and the job.
struct Submission {
    agent: Uuid,
    job: Uuid,
    sweep: Uuid,
    spec: serde_json::Value,
    devices: serde_json::Value,
    inventory: serde_json::Value,
}

/// How a run that produced no result ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Release {
    /// The job failed; it is retried while attempts remain.
    Failure,
    /// The job failed in a way a retry cannot fix.
    Permanent,
    /// Not the job's fault (the agent is stopping): no attempt is used.
    HandBack,
}

/// Transitions whose loss in a Postgres crash is harmless commit without waiting for the WAL
/// flush: the claim, the progress report (the claim's acknowledgement and lease extension) and
/// the agent's "last seen" mark. Each statement sets `synchronous_commit = off` for its own
/// implicit transaction with `set_config('synchronous_commit', 'off', true)` in its `WHERE`
/// clause, so it costs no extra round trip. What such a commit risks is being rolled back by a
/// Postgres crash within a fraction of a second of it (never by a coordinator crash), and the
/// WAL is replayed in order, so nothing later survives without it:
///
/// - a lost claim puts the job back to pending on its previous attempt; the agent that got it
///   holds no lease in the database, so its reports are refused (it stops) and its result is
///   refused by `results_check_lease`, unless the same agent claims that job again on the same
///   attempt, in which case one of its runs delivers the one result (the job's row allows one);
/// - a lost acknowledgement leaves `claim_ack_by` set: the claim returns to the queue after its
///   grace as a hand-back, without costing an attempt; a lost lease extension shortens the lease
///   to the one before it (the coordinator renews leases of agents heard from after an outage);
/// - a lost "last seen" mark makes an agent look a second or two older.
///
/// Results (`SubmitResult`), failures, hand-backs, registrations, sweeps and cancellations
/// commit synchronously: an agent is told its result is stored only once it is on disk, and the
/// flush of that commit also flushes every earlier transition of the job.
pub const ASYNC_COMMIT: &str = "set_config('synchronous_commit', 'off', true)";

/// One claim, one statement: the two oldest pending jobs of each target this device can run
/// (`any`, its own kind, and `gpu` unless it is a CPU), each found by a short probe of
/// `jobs_pending_by_target` and locked with SKIP LOCKED; of those few, the oldest whose last run
/// was not on this very device (so a retry lands on another card when one is free), else the
/// oldest. The claimed row comes back in `JobRow`'s shape, so no second query is needed.
///
/// A device that declared its precisions at registration (`devices[].precisions`) is offered
/// only jobs of those precisions; the filter sits inside each probe, before its LIMIT, so jobs
/// this device cannot run never hide the ones it can. A device that declared none (an agent
/// older than the field) is offered every precision.
///
/// `$me` is a CTE named `me` giving the claiming agent's `id`, the device's `kind` and its
/// declared precisions `p`, one row (none: no claim). Shared parameters: $2 the device, $3 the
/// lease and $4 the claim grace in milliseconds. The statement always returns `me`'s row, with
/// the claimed job's columns (NULL when nothing was claimed).
macro_rules! claim_sql {
    ($me:expr) => {
        concat!(
            "WITH ",
            $me,
            ", \
             c_any AS (SELECT id, created_at, seq, last_agent_id, last_device FROM jobs \
                WHERE state = 'pending' AND target = 'any' \
                  AND EXISTS (SELECT 1 FROM me WHERE me.kind IS NOT NULL) \
                  AND coalesce((SELECT p FROM me) ? (spec->>'precision'), true) \
                ORDER BY created_at, seq LIMIT 2 FOR UPDATE SKIP LOCKED), \
             c_kind AS (SELECT id, created_at, seq, last_agent_id, last_device FROM jobs \
                WHERE state = 'pending' AND target = (SELECT kind FROM me) \
                  AND coalesce((SELECT p FROM me) ? (spec->>'precision'), true) \
                ORDER BY created_at, seq LIMIT 2 FOR UPDATE SKIP LOCKED), \
             c_gpu AS (SELECT id, created_at, seq, last_agent_id, last_device FROM jobs \
                WHERE state = 'pending' AND target = 'gpu' AND (SELECT kind FROM me) <> 'cpu' \
                  AND coalesce((SELECT p FROM me) ? (spec->>'precision'), true) \
                ORDER BY created_at, seq LIMIT 2 FOR UPDATE SKIP LOCKED), \
             pick AS (SELECT id FROM (SELECT * FROM c_any UNION ALL SELECT * FROM c_kind \
                                      UNION ALL SELECT * FROM c_gpu) u \
                      ORDER BY (u.last_agent_id IS NOT DISTINCT FROM (SELECT id FROM me) \
                                AND u.last_device IS NOT DISTINCT FROM $2), u.created_at, u.seq \
                      LIMIT 1), \
             claimed AS (UPDATE jobs SET state = 'running', attempt = jobs.attempt + 1, \
                lease_agent_id = me.id, lease_device = $2, \
                lease_expires_at = now() + $3 * interval '1 millisecond', \
                claim_ack_by = now() + $4 * interval '1 millisecond', \
                last_agent_id = me.id, last_device = $2, \
                started_at = coalesce(jobs.started_at, now()), \
                phase = 'assigned', iterations = 0, fraction = 0 \
              FROM pick, me WHERE jobs.id = pick.id \
                AND set_config('synchronous_commit', 'off', true) = 'off' \
              RETURNING jobs.*) \
        SELECT me.id AS claiming_agent, me.kind AS claiming_kind, \
               c.id, c.sweep_id, c.seq, c.spec, c.state::text AS state, c.attempt, \
               c.lease_expires_at, NULL::text AS agent_name, c.lease_device AS device, c.phase, \
               c.iterations, c.fraction, c.error, NULL::float8 AS images_per_sec \
        FROM me LEFT JOIN claimed c ON true"
        )
    };
}

/// A claim by an agent already authenticated: $1 its id, $5 the device's kind.
///
/// Public so that its plan can be checked (`EXPLAIN`) by tests and operators.
pub const CLAIM_SQL: &str = claim_sql!(
    "me AS (SELECT $1::uuid AS id, $5::text AS kind, \
        (SELECT d->'precisions' FROM agents a CROSS JOIN jsonb_array_elements(a.devices) d \
         WHERE a.id = $1 AND d->>'device' = $2 \
           AND jsonb_typeof(d->'precisions') = 'array' LIMIT 1) AS p)"
);

/// A claim that also authenticates: $1 the hash of an agent secret, $5 the agent id the body
/// names (NULL: none). `me` is the live agent holding that secret (no row: no claim), marked
/// as seen as [`Store::touch_device_kind_by_secret`] does; its `kind` is NULL when it
/// registered no such device (nothing is claimed then either).
pub const CLAIM_BY_SECRET_SQL: &str = claim_sql!(
    "agent AS (SELECT a.id, a.devices, a.last_seen_at, a.stopping_since \
        FROM agents a LEFT JOIN api_tokens t ON t.id = a.registered_by \
        WHERE a.secret_hash = $1 AND t.revoked_at IS NULL AND ($5::uuid IS NULL OR a.id = $5)), \
     seen AS (UPDATE agents SET last_seen_at = now(), stopping_since = NULL FROM agent \
        WHERE agents.id = agent.id \
          AND (agent.last_seen_at < now() - interval '1 second' \
               OR agent.stopping_since IS NOT NULL) \
          AND set_config('synchronous_commit', 'off', true) = 'off' \
        RETURNING 1), \
     me AS (SELECT agent.id, \
        (SELECT d->>'kind' FROM jsonb_array_elements(agent.devices) d \
         WHERE d->>'device' = $2 LIMIT 1) AS kind, \
        (SELECT d->'precisions' FROM jsonb_array_elements(agent.devices) d \
         WHERE d->>'device' = $2 AND jsonb_typeof(d->'precisions') = 'array' LIMIT 1) AS p \
        FROM agent)"
);

/// One field of every item of a batch, as the array a statement unnests.
fn column<T, U>(items: &[T], field: impl Fn(&T) -> U) -> Vec<U> {
    items.iter().map(field).collect()
}

/// One progress report of [`Store::report_progress_batch`], from the agent holding this secret.
#[derive(Debug, Clone)]
pub struct ProgressBySecret {
    pub secret_hash: [u8; 32],
    /// The agent id the request's body names, if any: it must be the secret's agent.
    pub body_agent: Option<Uuid>,
    pub job: Uuid,
    pub attempt: i32,
    pub phase: String,
    pub iterations: i32,
    pub fraction: f64,
}

/// Many progress reports in one statement: each item is authenticated by its secret and must
/// hold its run's lease, exactly as in [`Store::report_progress`]; the statement
/// returns the position (from 1) of each item it applied. When two items name the same job only
/// one is applied, and the other takes the single-item path. Committed without waiting for the
/// WAL flush, like the single report. $8: the lease in milliseconds.
const PROGRESS_BATCH_SQL: &str = "\
    UPDATE jobs j SET phase = u.phase, iterations = u.iterations, fraction = u.fraction, \
        lease_expires_at = now() + $8 * interval '1 millisecond', claim_ack_by = NULL \
    FROM unnest($1::bytea[], $2::uuid[], $3::uuid[], $4::int4[], $5::text[], $6::int4[], \
                $7::float8[]) WITH ORDINALITY AS u(hash, body, job, attempt, phase, iterations, \
                                                   fraction, i) \
         JOIN agents a ON a.secret_hash = u.hash \
         LEFT JOIN api_tokens t ON t.id = a.registered_by \
    WHERE t.revoked_at IS NULL AND (u.body IS NULL OR a.id = u.body) \
      AND j.id = u.job AND j.attempt = u.attempt AND j.lease_agent_id = a.id \
      AND j.state = 'running' \
      AND set_config('synchronous_commit', 'off', true) = 'off' \
    RETURNING u.i, j.lease_expires_at, j.sweep_id";

/// What a claim statement returns: the claiming agent, its device's kind, and the job claimed.
fn claim_row(row: &PgRow) -> sqlx::Result<(Uuid, Option<String>, Option<JobRow>)> {
    let agent: Uuid = row.try_get("claiming_agent")?;
    let kind: Option<String> = row.try_get("claiming_kind")?;
    let id: Option<Uuid> = row.try_get("id")?;
    let job = match id {
        Some(_) => Some(JobRow::from_row(row)?),
        None => None,
    };
    Ok((agent, kind, job))
}

/// Ends runs whose lease expired or whose claim was not acknowledged in time. The conditions
/// are on the updated row itself, so a reaper that waited for another's lock re-checks them
/// against the row as it is now (a job requeued and claimed again meanwhile is left alone).
const EXPIRE_SQL: &str = "\
    UPDATE jobs j SET \
        failures = j.failures + f.fault::int, handbacks = j.handbacks + (NOT f.fault)::int, \
        state = CASE WHEN (f.fault AND j.failures + 1 >= j.max_attempts) \
                       OR (NOT f.fault AND j.handbacks + 1 >= j.max_handbacks) \
                     THEN 'failed'::job_state ELSE 'pending'::job_state END, \
        finished_at = CASE WHEN (f.fault AND j.failures + 1 >= j.max_attempts) \
                       OR (NOT f.fault AND j.handbacks + 1 >= j.max_handbacks) THEN now() END, \
        error = CASE WHEN f.unacked \
                       THEN 'the claim of attempt ' || j.attempt || ' was not acknowledged in time' \
                     WHEN NOT f.fault \
                       THEN 'lease expired on attempt ' || j.attempt || ': its agent was stopped' \
                     ELSE 'lease expired on attempt ' || j.attempt || ': the agent stopped reporting' END \
             || CASE WHEN NOT f.fault AND j.handbacks + 1 >= j.max_handbacks \
                     THEN ' (handed back ' || (j.handbacks + 1) || ' times: giving up)' ELSE '' END, \
        lease_agent_id = NULL, lease_device = NULL, lease_expires_at = NULL \
    FROM (SELECT j2.id, \
                 coalesce(j2.claim_ack_by < coalesce($1, now()), false) AS unacked, \
                 NOT coalesce(j2.claim_ack_by < coalesce($1, now()), false) \
                     AND a.stopping_since IS NULL AS fault \
          FROM jobs j2 JOIN agents a ON a.id = j2.lease_agent_id \
          WHERE j2.state = 'running' \
            AND (j2.lease_expires_at < coalesce($1, now()) OR j2.claim_ack_by < coalesce($1, now()))) f \
    WHERE j.id = f.id AND j.state = 'running' \
      AND (j.lease_expires_at < coalesce($1, now()) OR j.claim_ack_by < coalesce($1, now())) \
    RETURNING j.id, j.sweep_id, j.state::text";

impl Store {
    /// Announces changed sweeps to other coordinators' watchers (see `sweep_events`).
    pub(crate) async fn notify_sweeps(&self, payload: &str) -> Result<()> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(crate::sweep_events::SWEEPS_CHANNEL)
            .bind(payload)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

/// Reads one stored result row back, validating what a listing can see.
fn decode_result(row: &PgRow) -> std::result::Result<StoredResult, String> {
    let record: serde_json::Value = row.try_get("record").map_err(|e| e.to_string())?;
    let mut result: BenchResult =
        serde_json::from_value(record).map_err(|e| format!("undecodable record: {e}"))?;
    result.latencies_ms = row.try_get("latencies_ms").map_err(|e| e.to_string())?;
    result.validate_summary().map_err(|e| e.to_string())?;
    Ok(StoredResult {
        id: row.try_get("id").map_err(|e| e.to_string())?,
        sweep_id: row.try_get("sweep_id").map_err(|e| e.to_string())?,
        imported_by: row.try_get("imported_by").map_err(|e| e.to_string())?,
        health: health_of(row).map_err(|e| e.to_string())?,
        result,
    })
}

/// A listed result's health check and its flags (see [`StoredResult::health`]).
fn health_of(row: &PgRow) -> sqlx::Result<Option<(i64, Vec<String>)>> {
    let id: Option<i64> = row.try_get("health_check_id")?;
    let flags: Option<Vec<String>> = row.try_get("health_flags")?;
    Ok(id.map(|id| (id, flags.unwrap_or_default())))
}

/// The hardware check of [`check_hardware`] against the agent's registration in the database.
async fn check_registered_hardware(
    tx: &mut sqlx::PgConnection,
    agent: Uuid,
    result: &BenchResult,
) -> Result<()> {
    let row: Option<(serde_json::Value, serde_json::Value)> =
        sqlx::query_as("SELECT devices, inventory FROM agents WHERE id = $1")
            .bind(agent)
            .fetch_optional(&mut *tx)
            .await?;
    let (devices, inventory) =
        row.ok_or_else(|| CoordinatorError::NotFound(format!("unknown agent {agent}")))?;
    let devices: Vec<AgentDevice> = from_json(devices);
    let inventory: HostInventory = from_json(inventory);
    check_hardware(result, &devices, &inventory).map_err(CoordinatorError::InvalidArgument)
}

/// A spooled record (an agent's undelivered result) for `job`: attached to the job if that job
/// is still running on the record's attempt, under the record's agent, else stale. `None` when
/// no such job exists here (the record is then imported like a standalone one).
/// What `attach_spooled` reads of a job: sweep, state, attempt, lease holder (id and name), spec
/// and the sweep's state.
type SpooledJobRow = (
    Uuid,
    String,
    i32,
    Option<Uuid>,
    Option<String>,
    serde_json::Value,
    String,
);

async fn attach_spooled(
    tx: &mut sqlx::PgConnection,
    job: Uuid,
    r: &BenchResult,
    imported_by: &str,
) -> Result<Option<ImportOutcome>> {
    let row: Option<SpooledJobRow> = sqlx::query_as(
        "SELECT j.sweep_id, j.state::text, j.attempt, j.lease_agent_id, a.name, j.spec, s.state \
             FROM jobs j JOIN sweeps s ON s.id = j.sweep_id \
             LEFT JOIN agents a ON a.id = j.lease_agent_id \
             WHERE j.id = $1 FOR UPDATE OF j",
    )
    .bind(job)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((sweep, state, attempt, lease_agent, lease_name, spec, sweep_state)) = row else {
        return Ok(None);
    };
    let stale = |reason: String| Ok(Some(ImportOutcome::Stale { job, reason }));
    if sweep_state == "imported" {
        return stale(format!("job {job} belongs to an imported sweep"));
    }
    if state != "running" || attempt != r.attempt as i32 {
        return stale(format!(
            "job {job} is {state} on attempt {attempt}; the record is from attempt {}",
            r.attempt
        ));
    }
    let (Some(agent), Some(agent_name)) = (lease_agent, lease_name) else {
        return stale(format!("job {job} has no lease"));
    };
    if agent_name != r.agent_name {
        return stale(format!(
            "job {job} attempt {attempt} runs on another agent than the record's"
        ));
    }
    let spec: JobSpec = serde_json::from_value(spec)
        .map_err(|e| CoordinatorError::InvalidArgument(format!("stored job spec: {e}")))?;
    if r.spec != spec {
        return stale(format!("the record's spec is not job {job}'s"));
    }
    check_registered_hardware(&mut *tx, agent, r).await?;
    let result = insert_result(&mut *tx, sweep, job, agent, r, Some(imported_by)).await?;
    finish_job(&mut *tx, job, r).await?;
    Ok(Some(ImportOutcome::Attached { job, result }))
}

/// Marks a running job succeeded by the result of its current attempt.
async fn finish_job(tx: &mut sqlx::PgConnection, job: Uuid, r: &BenchResult) -> Result<()> {
    let done = sqlx::query(
        "UPDATE jobs SET state = 'succeeded', lease_agent_id = NULL, lease_device = NULL, \
             lease_expires_at = NULL, finished_at = now(), fraction = 1, phase = 'done', \
             iterations = $3, error = NULL \
         WHERE id = $1 AND attempt = $2 AND state = 'running'",
    )
    .bind(job)
    .bind(r.attempt as i32)
    .bind(r.latencies_ms.len() as i32)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if done != 1 {
        return Err(CoordinatorError::StaleLease(format!(
            "job {job} attempt {} is no longer running",
            r.attempt
        )));
    }
    Ok(())
}

async fn create_imported_sweep(tx: &mut sqlx::PgConnection, name: &str) -> Result<Uuid> {
    let sweep = Uuid::new_v4(); // random, as in create_sweep_for: users type its prefix
    sqlx::query(
        "INSERT INTO sweeps (id, name, spec, spec_toml, state, finished_at) \
         VALUES ($1, $2, '{\"imported\": true}', '', 'imported', now())",
    )
    .bind(sweep)
    .bind(name)
    .execute(&mut *tx)
    .await?;
    Ok(sweep)
}

/// Files a standalone record under the imported sweep, as a finished job of an imported agent.
async fn file_imported(
    tx: &mut sqlx::PgConnection,
    sweep: Uuid,
    seq: i32,
    r: &BenchResult,
    imported_by: &str,
) -> Result<Uuid> {
    let agent_name = format!("{IMPORTED_AGENT_PREFIX}{}", r.agent_name);
    let devices = vec![AgentDevice {
        device: r.device.clone(),
        kind: r.hardware_kind.clone(),
        name: r.hardware_name.clone(),
        precisions: None,
        health: None,
    }];
    // Only ever an imported agent's row: a registered agent's is never borrowed.
    let agent: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO agents (id, name, labels, price_per_hour, inventory, devices, origin, last_seen_at) \
         VALUES ($1, $2, $3, $4, $5, $6, 'imported', $7) \
         ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name WHERE agents.origin = 'imported' \
         RETURNING id",
    )
    .bind(Uuid::new_v4())
    .bind(&agent_name)
    .bind(json(&r.agent_labels))
    .bind(r.price_per_hour)
    .bind(json(&r.host))
    .bind(json(&devices))
    .bind(r.finished_at)
    .fetch_optional(&mut *tx)
    .await?;
    let agent = agent.ok_or_else(|| {
        CoordinatorError::InvalidArgument(format!(
            "agent name '{}' belongs to a registered agent",
            fleetmark_core::limits::Excerpt::of(&agent_name)
        ))
    })?;
    let job = row_id();
    sqlx::query(
        "INSERT INTO jobs (id, sweep_id, seq, spec, target, state, attempt, last_agent_id, \
                           last_device, phase, fraction, started_at, finished_at) \
         VALUES ($1, $2, $3, $4, $5, 'succeeded', 1, $6, $7, 'done', 1, $8, $9)",
    )
    .bind(job)
    .bind(sweep)
    .bind(seq)
    .bind(json(&r.spec))
    .bind(r.spec.target.to_string())
    .bind(agent)
    .bind(&r.device)
    .bind(r.started_at)
    .bind(r.finished_at)
    .execute(&mut *tx)
    .await?;
    // The content hash is of the record as sent; the stored copy answers its new job, under
    // the imported agent's name.
    let mut stored = r.clone();
    stored.job_id = Some(job);
    stored.attempt = 1;
    stored.agent_name = agent_name;
    insert_result_hashed(
        &mut *tx,
        sweep,
        job,
        agent,
        &stored,
        &r.content_hash(),
        Some(imported_by),
    )
    .await
}

async fn notify(tx: &mut sqlx::PgConnection) -> Result<()> {
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(JOBS_CHANNEL)
        .execute(tx)
        .await?;
    Ok(())
}

async fn insert_result(
    tx: &mut sqlx::PgConnection,
    sweep: Uuid,
    job: Uuid,
    agent: Uuid,
    r: &BenchResult,
    imported_by: Option<&str>,
) -> Result<Uuid> {
    insert_result_hashed(tx, sweep, job, agent, r, &r.content_hash(), imported_by).await
}

/// Inserts a result row; `hash` is the content hash of the record as it was sent.
async fn insert_result_hashed(
    tx: &mut sqlx::PgConnection,
    sweep: Uuid,
    job: Uuid,
    agent: Uuid,
    r: &BenchResult,
    hash: &str,
    imported_by: Option<&str>,
) -> Result<Uuid> {
    let id = row_id();
    let ids = ResultRowIds {
        id,
        job,
        sweep,
        agent,
        hash,
        imported_by,
    };
    bind_result(sqlx::query(INSERT_RESULT_SQL), ids, r)
        .execute(&mut *tx)
        .await?;
    Ok(id)
}

/// The columns of a result row, in the order [`bind_result`] binds them ($1 to $35).
/// `health_check_id` is the check in force on the result's device: the latest that its agent
/// declared for it (none for imported results, whose agents never registered).
/// The columns a result row is inserted with, in the order of [`result_insert!`]'s values.
macro_rules! result_columns {
    () => {
        "id, job_id, sweep_id, agent_id, attempt, model, batch_size, \
         precision, image_size, hardware_kind, hardware_name, device, backend, path, math, \
         simulated, throttled, mean_ms, std_ms, p50_ms, p90_ms, p99_ms, ci95_low_ms, \
         ci95_high_ms, images_per_sec, peak_memory_bytes, price_per_hour, latencies_ms, \
         record, finished_at, content_sha256, imported_by, stable, stop_reason, \
         window_spread, health_check_id"
    };
}

macro_rules! result_insert {
    () => {
        concat!(
            "INSERT INTO results (",
            result_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, \
                 $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28, $29, $30, $31, $32, \
                 $33, CAST($34::text AS stop_reason), $35, \
                 (SELECT h.id FROM health_checks h JOIN agents a ON a.id = h.agent_id \
                  WHERE h.agent_id = $4 AND h.device = $12 AND h.incarnation = a.incarnation \
                  ORDER BY h.id DESC LIMIT 1))"
        )
    };
}

/// One result row, on its own (imports, inside their transaction).
const INSERT_RESULT_SQL: &str = result_insert!();

/// A delivered result in one statement, so one round trip and one flushed commit: the insert
/// (whose trigger locks the job and refuses a stale lease), the job's finish, which reads the
/// insert so it runs after it, and whether any job of the sweep is still pending, which decides
/// whether the sweep's completion is checked afterwards. `fleetmark_assert` aborts the whole
/// statement, insert included, if the job did not finish ($36: its iteration count).
///
/// The pending test is taken from the statement's snapshot. A sweep whose last two jobs finish
/// at the same moment can have both see the other as unfinished; neither is pending by then,
/// so both check afterwards. Only a job claimed and finished entirely while this statement ran
/// could leave the check to the reaper's backstop (`complete_finished_sweeps`).
const STORE_RESULT_SQL: &str = concat!(
    "WITH ins AS (",
    result_insert!(),
    " RETURNING id, job_id, sweep_id), \
     done AS (UPDATE jobs SET state = 'succeeded', lease_agent_id = NULL, lease_device = NULL, \
                  lease_expires_at = NULL, finished_at = now(), fraction = 1, phase = 'done', \
                  iterations = $36, error = NULL \
              FROM ins WHERE jobs.id = ins.job_id AND jobs.attempt = $5 \
                AND jobs.state = 'running' \
              RETURNING jobs.id) \
     SELECT fleetmark_assert((SELECT count(*) FROM done) = 1, \
                'job ' || $2::text || ' attempt ' || $5::text || ' is no longer running') AS ok, \
            EXISTS (SELECT 1 FROM jobs WHERE sweep_id = $3 AND finished_at IS NULL \
                      AND state = 'pending') AS pending_left"
);

/// One agent's result for [`Store::submit_results_batch`], from the agent holding this secret.
#[derive(Debug, Clone)]
pub struct ResultBySecret {
    pub secret_hash: [u8; 32],
    /// The agent id the request's body names, if any: it must be the secret's agent.
    pub body_agent: Option<Uuid>,
    pub result: BenchResult,
}

/// A row of the batch read: the item's position (from 1), the agent, its devices and
/// inventory, the job's sweep and spec.
type BatchReadRow = (
    i64,
    Uuid,
    serde_json::Value,
    serde_json::Value,
    Uuid,
    serde_json::Value,
);

/// Many delivered results in one statement: [`STORE_RESULT_SQL`] over arrays, one element per
/// result ($1 to $35 as in [`result_insert!`], but `imported_by`, $32, is one value for all:
/// NULL, as for every agent's own result; $28 is every result's latencies end to end, cut by $36 offsets and $37
/// lengths; $38 the iteration counts; $39 how many results). Every insert passes the lease
/// trigger, and `fleetmark_assert` aborts the statement, all inserts included, unless every
/// job finished. Returns the sweeps that have no pending job left, whose completion is checked
/// afterwards.
const STORE_RESULTS_BATCH_SQL: &str = concat!(
    "WITH u AS (SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::uuid[], \
        $5::int4[], $6::text[], $7::int4[], $8::text[], $9::int4[], $10::text[], $11::text[], \
        $12::text[], $13::text[], $14::text[], $15::text[], $16::bool[], $17::bool[], \
        $18::float8[], $19::float8[], $20::float8[], $21::float8[], $22::float8[], \
        $23::float8[], $24::float8[], $25::float8[], $26::int8[], $27::float8[], \
        $29::jsonb[], $30::timestamptz[], $31::text[], $33::bool[], $34::text[], \
        $35::float8[], $36::int4[], $37::int4[], $38::int4[]) \
        AS u(id, job_id, sweep_id, agent_id, attempt, model, batch_size, precision, \
             image_size, hardware_kind, hardware_name, device, backend, path, math, simulated, \
             throttled, mean_ms, std_ms, p50_ms, p90_ms, p99_ms, ci95_low_ms, ci95_high_ms, \
             images_per_sec, peak_memory_bytes, price_per_hour, record, finished_at, \
             content_sha256, stable, stop_reason, window_spread, lat_off, lat_len, \
             iterations)), \
     ins AS (INSERT INTO results (",
    result_columns!(),
    ") SELECT u.id, u.job_id, u.sweep_id, u.agent_id, u.attempt, u.model, u.batch_size, \
             u.precision, u.image_size, u.hardware_kind, u.hardware_name, u.device, \
             u.backend, u.path, u.math, u.simulated, u.throttled, u.mean_ms, u.std_ms, \
             u.p50_ms, u.p90_ms, u.p99_ms, u.ci95_low_ms, u.ci95_high_ms, u.images_per_sec, \
             u.peak_memory_bytes, u.price_per_hour, \
             coalesce(($28::float8[])[u.lat_off + 1 : u.lat_off + u.lat_len], '{}'), \
             u.record, u.finished_at, u.content_sha256, $32::text, u.stable, \
             CAST(u.stop_reason AS stop_reason), u.window_spread, \
             (SELECT h.id FROM health_checks h JOIN agents a ON a.id = h.agent_id \
              WHERE h.agent_id = u.agent_id AND h.device = u.device \
                AND h.incarnation = a.incarnation ORDER BY h.id DESC LIMIT 1) \
        FROM u RETURNING id, job_id, attempt), \
     done AS (UPDATE jobs SET state = 'succeeded', lease_agent_id = NULL, lease_device = NULL, \
                  lease_expires_at = NULL, finished_at = now(), fraction = 1, phase = 'done', \
                  iterations = u.iterations, error = NULL \
              FROM ins JOIN u ON u.id = ins.id \
              WHERE jobs.id = ins.job_id AND jobs.attempt = ins.attempt \
                AND jobs.state = 'running' \
              RETURNING jobs.id, jobs.sweep_id) \
     SELECT fleetmark_assert((SELECT count(*) FROM done) = $39, \
                'a job of the batch is no longer running') AS ok, \
            ARRAY(SELECT DISTINCT d.sweep_id FROM done d \
                  WHERE NOT EXISTS (SELECT 1 FROM jobs WHERE sweep_id = d.sweep_id \
                                      AND finished_at IS NULL AND state = 'pending')) AS settled"
);

/// The columns of [`STORE_RESULTS_BATCH_SQL`], one vector per column.
#[derive(Default)]
struct ResultColumns {
    id: Vec<Uuid>,
    job: Vec<Uuid>,
    sweep: Vec<Uuid>,
    agent: Vec<Uuid>,
    attempt: Vec<i32>,
    model: Vec<String>,
    batch_size: Vec<i32>,
    precision: Vec<&'static str>,
    image_size: Vec<i32>,
    hardware_kind: Vec<String>,
    hardware_name: Vec<String>,
    device: Vec<String>,
    backend: Vec<String>,
    path: Vec<String>,
    math: Vec<String>,
    simulated: Vec<bool>,
    throttled: Vec<bool>,
    latency: [Vec<f64>; 7],
    images_per_sec: Vec<f64>,
    peak_memory_bytes: Vec<i64>,
    price_per_hour: Vec<Option<f64>>,
    latencies: Vec<f64>,
    record: Vec<serde_json::Value>,
    finished_at: Vec<DateTime<Utc>>,
    hash: Vec<String>,
    stable: Vec<Option<bool>>,
    stop_reason: Vec<Option<String>>,
    spread: Vec<Option<f64>>,
    lat_off: Vec<i32>,
    lat_len: Vec<i32>,
    iterations: Vec<i32>,
}

impl ResultColumns {
    /// Adds one result, as [`bind_result`] binds a single one.
    fn push(&mut self, id: Uuid, s: &Submission, r: &BenchResult) {
        let l = &r.latency;
        self.id.push(id);
        self.job.push(s.job);
        self.sweep.push(s.sweep);
        self.agent.push(s.agent);
        self.attempt.push(r.attempt as i32);
        self.model.push(r.spec.model.clone());
        self.batch_size.push(r.spec.batch_size as i32);
        self.precision.push(r.spec.precision.as_str());
        self.image_size.push(r.spec.image_size as i32);
        self.hardware_kind.push(r.hardware_kind.clone());
        self.hardware_name.push(r.hardware_name.clone());
        self.device.push(r.device.clone());
        self.backend.push(r.backend.backend.clone());
        self.path.push(r.backend.path.clone());
        self.math.push(r.backend.math.clone());
        self.simulated.push(r.backend.simulated);
        self.throttled
            .push(r.telemetry.as_ref().is_some_and(|t| t.throttled));
        let stats = [
            l.mean_ms,
            l.std_ms,
            l.p50_ms,
            l.p90_ms,
            l.p99_ms,
            l.ci95_low_ms,
            l.ci95_high_ms,
        ];
        for (col, v) in self.latency.iter_mut().zip(stats) {
            col.push(v);
        }
        self.images_per_sec.push(r.images_per_sec);
        self.peak_memory_bytes
            .push(r.peak_memory_bytes.min(i64::MAX as u64) as i64);
        self.price_per_hour.push(r.price_per_hour);
        self.lat_off.push(self.latencies.len() as i32);
        self.lat_len.push(r.latencies_ms.len() as i32);
        self.latencies.extend_from_slice(&r.latencies_ms);
        self.record.push(record_json(r));
        self.finished_at.push(r.finished_at);
        self.hash.push(r.content_hash());
        self.stable.push(r.stability.as_ref().map(|s| s.stable));
        self.stop_reason.push(
            r.stability
                .as_ref()
                .map(|s| s.stop_reason.as_str().to_string()),
        );
        self.spread
            .push(r.stability.as_ref().and_then(|s| s.spread));
        self.iterations.push(r.latencies_ms.len() as i32);
    }

    /// Binds $1 to $38 of [`STORE_RESULTS_BATCH_SQL`] ($32, `imported_by`, NULL).
    fn bind(
        self,
        q: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments> {
        let [mean, std, p50, p90, p99, lo, hi] = self.latency;
        q.bind(self.id)
            .bind(self.job)
            .bind(self.sweep)
            .bind(self.agent)
            .bind(self.attempt)
            .bind(self.model)
            .bind(self.batch_size)
            .bind(self.precision)
            .bind(self.image_size)
            .bind(self.hardware_kind)
            .bind(self.hardware_name)
            .bind(self.device)
            .bind(self.backend)
            .bind(self.path)
            .bind(self.math)
            .bind(self.simulated)
            .bind(self.throttled)
            .bind(mean)
            .bind(std)
            .bind(p50)
            .bind(p90)
            .bind(p99)
            .bind(lo)
            .bind(hi)
            .bind(self.images_per_sec)
            .bind(self.peak_memory_bytes)
            .bind(self.price_per_hour)
            .bind(self.latencies)
            .bind(self.record)
            .bind(self.finished_at)
            .bind(self.hash)
            .bind(None::<String>)
            .bind(self.stable)
            .bind(self.stop_reason)
            .bind(self.spread)
            .bind(self.lat_off)
            .bind(self.lat_len)
            .bind(self.iterations)
    }
}

/// The row-identifying values of a result insert.
struct ResultRowIds<'a> {
    id: Uuid,
    job: Uuid,
    sweep: Uuid,
    agent: Uuid,
    hash: &'a str,
    imported_by: Option<&'a str>,
}

/// Binds $1 to $35 of [`result_insert!`]: the ids and the record. The raw latencies have their
/// own column, so the JSON copy goes without them.
fn bind_result<'q>(
    q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ids: ResultRowIds<'q>,
    r: &'q BenchResult,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    let l = &r.latency;
    q.bind(ids.id)
        .bind(ids.job)
        .bind(ids.sweep)
        .bind(ids.agent)
        .bind(r.attempt as i32)
        .bind(&r.spec.model)
        .bind(r.spec.batch_size as i32)
        .bind(r.spec.precision.as_str())
        .bind(r.spec.image_size as i32)
        .bind(&r.hardware_kind)
        .bind(&r.hardware_name)
        .bind(&r.device)
        .bind(&r.backend.backend)
        .bind(&r.backend.path)
        .bind(&r.backend.math)
        .bind(r.backend.simulated)
        .bind(r.telemetry.as_ref().is_some_and(|t| t.throttled))
        .bind(l.mean_ms)
        .bind(l.std_ms)
        .bind(l.p50_ms)
        .bind(l.p90_ms)
        .bind(l.p99_ms)
        .bind(l.ci95_low_ms)
        .bind(l.ci95_high_ms)
        .bind(r.images_per_sec)
        .bind(r.peak_memory_bytes.min(i64::MAX as u64) as i64)
        .bind(r.price_per_hour)
        .bind(&r.latencies_ms)
        .bind(record_json(r))
        .bind(r.finished_at)
        .bind(ids.hash)
        .bind(ids.imported_by)
        .bind(r.stability.as_ref().map(|s| s.stable))
        .bind(r.stability.as_ref().map(|s| s.stop_reason.as_str()))
        .bind(r.stability.as_ref().and_then(|s| s.spread))
}

/// A result's JSON copy, as stored in `results.record`: everything but the raw latencies,
/// which have their own column.
fn record_json(r: &BenchResult) -> serde_json::Value {
    let mut record = r.clone();
    record.latencies_ms = Vec::new();
    json(&record)
}

/// A new id for a job or result row: a UUIDv7, whose leading bits are the time, so rows
/// created one after another land next to each other in the primary-key and `results.job_id`
/// indexes instead of on a random page of each. Over a ten-minute soak those indexes grow by
/// half a million entries; with random ids every insert touches a page anywhere in them, which
/// must be in shared buffers and is written whole to the WAL after each checkpoint (measured
/// over a soak, docs/reliability.md: WAL per completion 7.1 KB with random ids, 6.6 KB with
/// these). The 74 random bits left are far beyond guessing, and an id grants nothing alone.
fn row_id() -> Uuid {
    Uuid::now_v7()
}

fn json<T: Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).expect("domain types always serialise")
}

fn from_json<T: for<'de> Deserialize<'de> + Default>(v: serde_json::Value) -> T {
    serde_json::from_value(v).unwrap_or_default()
}

/// Who submits a sweep, and how many pending jobs they may have queued at once.
#[derive(Debug, Clone, Copy)]
pub struct Submitter {
    pub token: Uuid,
    pub max_pending_jobs: u64,
}

/// Inside the submitting transaction: locks the submitter's advisory lock, counts its pending
/// jobs, and refuses a sweep that would go past its cap.
async fn check_pending_cap(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    submitter: Submitter,
    adding: usize,
) -> Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1::text, 7))")
        .bind(submitter.token)
        .execute(&mut **tx)
        .await?;
    let pending: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM jobs j JOIN sweeps s ON s.id = j.sweep_id \
         WHERE s.submitted_by = $1 AND s.state = 'active' AND j.state = 'pending'",
    )
    .bind(submitter.token)
    .fetch_one(&mut **tx)
    .await?;
    let pending = pending.max(0) as u64;
    let cap = submitter.max_pending_jobs;
    if pending + adding as u64 > cap {
        return Err(CoordinatorError::ResourceExhausted(format!(
            "this token has {pending} pending jobs and the sweep adds {adding}, over the cap of \
             {cap} pending jobs per submitter; wait for some to run or cancel a sweep"
        )));
    }
    Ok(())
}
