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

/// A stored result with its ids.
#[derive(Debug, Clone)]
pub struct StoredResult {
    pub id: Uuid,
    pub sweep_id: Uuid,
    pub result: BenchResult,
}

#[derive(Debug, Clone, Default)]
pub struct ResultFilter {
    pub sweep_id: Option<Uuid>,
    pub model: Option<String>,
    pub precision: Option<String>,
    pub batch_size: Option<i32>,
    pub include_simulated: bool,
    pub omit_latencies: bool,
    /// Only results from the agent with this name.
    pub agent_name: Option<String>,
    /// Only results whose agent carried all of these labels.
    pub labels: BTreeMap<String, String>,
    /// Only results finished at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Only results finished before this time.
    pub until: Option<DateTime<Utc>>,
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
        Ok(Store { pool })
    }

    pub fn from_pool(pool: PgPool) -> Self {
        Store { pool }
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

    // ---- agents ----

    /// Registers an agent, or updates the one with the same name (a restarted agent keeps its
    /// id and its history).
    pub async fn register_agent(&self, reg: &AgentRegistration) -> Result<Uuid> {
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
        .bind(json(&reg.devices))
        .fetch_one(&self.pool)
        .await?;
        Ok(id)
    }

    /// Marks the agent as seen; false when no such agent exists.
    pub async fn touch_agent(&self, id: Uuid) -> Result<bool> {
        let n = sqlx::query("UPDATE agents SET last_seen_at = now() WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(n == 1)
    }

    /// The kind of one of an agent's devices, as it registered it.
    pub async fn device_kind(&self, agent: Uuid, device: &str) -> Result<String> {
        let devices: Option<serde_json::Value> =
            sqlx::query_scalar("SELECT devices FROM agents WHERE id = $1")
                .bind(agent)
                .fetch_optional(&self.pool)
                .await?;
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

    /// Retires registered agents silent for at least `offline_for` and holding no lease; with
    /// `dry_run`, only names them. Returns their names.
    pub async fn prune_agents(&self, offline_for: Duration, dry_run: bool) -> Result<Vec<String>> {
        let sql = if dry_run {
            "SELECT name FROM agents a \
             WHERE origin = 'registered' AND last_seen_at < now() - $1 * interval '1 millisecond' \
               AND (retired_at IS NULL OR last_seen_at > retired_at) \
               AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.lease_agent_id = a.id) \
             ORDER BY name"
        } else {
            "UPDATE agents a SET retired_at = now() \
             WHERE origin = 'registered' AND last_seen_at < now() - $1 * interval '1 millisecond' \
               AND (retired_at IS NULL OR last_seen_at > retired_at) \
               AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.lease_agent_id = a.id) \
             RETURNING name"
        };
        let mut names: Vec<String> = sqlx::query_scalar(sql)
            .bind(offline_for.as_millis() as f64)
            .fetch_all(&self.pool)
            .await?;
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

    /// Validates the sweep, then queues its jobs in one transaction: all or nothing.
    pub async fn create_sweep(&self, spec: &SweepSpec, spec_toml: &str) -> Result<(Uuid, usize)> {
        let jobs = spec.expand()?;
        let id = Uuid::new_v4();
        let name = spec
            .name
            .clone()
            .unwrap_or_else(|| format!("sweep-{}", &id.to_string()[..8]));
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO sweeps (id, name, spec, spec_toml) VALUES ($1, $2, $3, $4)")
            .bind(id)
            .bind(&name)
            .bind(json(spec))
            .bind(spec_toml)
            .execute(&mut *tx)
            .await?;
        // One statement for all jobs: a 10,000-job sweep is one round trip, not 10,000.
        let ids: Vec<Uuid> = jobs.iter().map(|_| Uuid::new_v4()).collect();
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
             WHERE sweep_id = $1 AND state IN ('pending', 'running')",
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
                 (SELECT 1 FROM jobs WHERE sweep_id = $1 AND state IN ('pending', 'running'))",
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
                 (SELECT 1 FROM jobs j WHERE j.sweep_id = s.id AND j.state IN ('pending', 'running'))",
        )
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    // ---- jobs ----

    /// Claims the oldest pending job this device can run, starting a new attempt with a lease.
    /// A job whose last attempt failed on this very device goes behind the others, so a retry
    /// lands on another card when one is free. Rows another coordinator is claiming right now
    /// are skipped, not waited for.
    pub async fn claim_job(
        &self,
        agent: Uuid,
        device: &str,
        kind: &str,
        lease: Duration,
    ) -> Result<Option<JobRow>> {
        let claimed: Option<Uuid> = sqlx::query_scalar(
            "WITH candidate AS ( \
                 SELECT j.id FROM jobs j JOIN sweeps s ON s.id = j.sweep_id \
                 WHERE j.state = 'pending' AND s.state = 'active' \
                   AND (j.target = 'any' OR j.target = $3 OR (j.target = 'gpu' AND $3 <> 'cpu')) \
                 ORDER BY (j.last_agent_id IS NOT DISTINCT FROM $1 \
                           AND j.last_device IS NOT DISTINCT FROM $2) , j.created_at, j.seq \
                 LIMIT 1 \
                 FOR UPDATE OF j SKIP LOCKED) \
             UPDATE jobs SET state = 'running', attempt = jobs.attempt + 1, \
                 lease_agent_id = $1, lease_device = $2, \
                 lease_expires_at = now() + $4 * interval '1 millisecond', \
                 last_agent_id = $1, last_device = $2, \
                 started_at = coalesce(jobs.started_at, now()), \
                 phase = 'assigned', iterations = 0, fraction = 0 \
             FROM candidate WHERE jobs.id = candidate.id \
             RETURNING jobs.id",
        )
        .bind(agent)
        .bind(device)
        .bind(kind)
        .bind(lease.as_millis() as f64)
        .fetch_optional(&self.pool)
        .await?;
        match claimed {
            Some(id) => Ok(Some(self.get_job(id).await?)),
            None => Ok(None),
        }
    }

    /// Records progress and extends the lease. `None` when the caller no longer holds the
    /// lease of this attempt.
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
    ) -> Result<Option<DateTime<Utc>>> {
        Ok(sqlx::query_scalar(
            "UPDATE jobs SET phase = $4, iterations = $5, fraction = $6, \
                 lease_expires_at = now() + $7 * interval '1 millisecond' \
             WHERE id = $2 AND attempt = $3 AND lease_agent_id = $1 AND state = 'running' \
             RETURNING lease_expires_at",
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

    /// Stores a result and finishes its job, atomically. The insert trigger refuses a result
    /// whose (job, attempt, agent) is not the running lease; that surfaces as `StaleLease`.
    pub async fn submit_result(&self, agent: Uuid, result: &BenchResult) -> Result<Uuid> {
        let job = result
            .job_id
            .ok_or_else(|| CoordinatorError::InvalidArgument("the result has no job id".into()))?;
        let mut tx = self.pool.begin().await?;
        let row: Option<(Uuid, serde_json::Value)> =
            sqlx::query_as("SELECT sweep_id, spec FROM jobs WHERE id = $1")
                .bind(job)
                .fetch_optional(&mut *tx)
                .await?;
        let (sweep, spec) =
            row.ok_or_else(|| CoordinatorError::NotFound(format!("no job {job}")))?;
        // The result must answer this job, on hardware the job allows.
        let spec: JobSpec = serde_json::from_value(spec)
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
                spec.target, result.hardware_kind
            )));
        }
        let id = insert_result(&mut tx, sweep, job, agent, result).await?;
        let done = sqlx::query(
            "UPDATE jobs SET state = 'succeeded', lease_agent_id = NULL, lease_device = NULL, \
                 lease_expires_at = NULL, finished_at = now(), fraction = 1, phase = 'done', \
                 iterations = $3, error = NULL \
             WHERE id = $1 AND attempt = $2 AND state = 'running'",
        )
        .bind(job)
        .bind(result.attempt as i32)
        .bind(result.latencies_ms.len() as i32)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if done != 1 {
            return Err(CoordinatorError::StaleLease(format!(
                "job {job} attempt {} is no longer running",
                result.attempt
            )));
        }
        tx.commit().await?;
        self.complete_sweep_if_done(sweep).await?;
        Ok(id)
    }

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
        let mut tx = self.pool.begin().await?;
        let row: Option<(String, Uuid)> = sqlx::query_as(
            "UPDATE jobs SET \
                 state = CASE WHEN $5 OR attempt >= max_attempts THEN 'failed'::job_state \
                              ELSE 'pending'::job_state END, \
                 finished_at = CASE WHEN $5 OR attempt >= max_attempts THEN now() END, \
                 error = $4, lease_agent_id = NULL, lease_device = NULL, lease_expires_at = NULL \
             WHERE id = $2 AND attempt = $3 AND lease_agent_id = $1 AND state = 'running' \
             RETURNING state::text, sweep_id",
        )
        .bind(agent)
        .bind(job)
        .bind(attempt)
        .bind(reason)
        .bind(permanent)
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

    /// Returns expired leases to the queue (or fails jobs out of attempts). `now` defaults to
    /// the database's clock; tests pass a later time instead of sleeping.
    pub async fn expire_leases(&self, now: Option<DateTime<Utc>>) -> Result<Vec<Uuid>> {
        let mut tx = self.pool.begin().await?;
        let rows: Vec<(Uuid, Uuid, String)> = sqlx::query_as(
            "UPDATE jobs SET \
                 state = CASE WHEN attempt >= max_attempts THEN 'failed'::job_state \
                              ELSE 'pending'::job_state END, \
                 finished_at = CASE WHEN attempt >= max_attempts THEN now() END, \
                 error = 'lease expired on attempt ' || attempt || ': the agent stopped reporting', \
                 lease_agent_id = NULL, lease_device = NULL, lease_expires_at = NULL \
             WHERE state = 'running' AND lease_expires_at < coalesce($1, now()) \
             RETURNING id, sweep_id, state::text",
        )
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

    /// Pushes every running lease to at least `lease` from now. Used after this coordinator
    /// lost the database: agents could not report progress meanwhile, and their leases should
    /// not be judged by reports that could not be made.
    pub async fn extend_running_leases(&self, lease: Duration) -> Result<u64> {
        Ok(sqlx::query(
            "UPDATE jobs SET lease_expires_at = greatest(lease_expires_at, \
                 now() + $1 * interval '1 millisecond') \
             WHERE state = 'running'",
        )
        .bind(lease.as_millis() as f64)
        .execute(&self.pool)
        .await?
        .rows_affected())
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

    pub async fn list_results(&self, f: &ResultFilter) -> Result<Vec<StoredResult>> {
        let rows = sqlx::query(
            "SELECT id, sweep_id, record, \
                    CASE WHEN $6 THEN '{}'::double precision[] ELSE latencies_ms END AS latencies_ms \
             FROM results \
             WHERE ($1::uuid IS NULL OR sweep_id = $1) \
               AND ($2::text IS NULL OR model = $2) \
               AND ($3::text IS NULL OR precision = $3) \
               AND ($4::int IS NULL OR batch_size = $4) \
               AND ($5 OR NOT simulated) \
               AND ($7::text IS NULL OR record->>'agent_name' = $7) \
               AND (coalesce(record->'agent_labels', '{}'::jsonb) @> $8::jsonb) \
               AND ($9::timestamptz IS NULL OR finished_at >= $9) \
               AND ($10::timestamptz IS NULL OR finished_at < $10) \
             ORDER BY hardware_kind, model, precision, batch_size, finished_at",
        )
        .bind(f.sweep_id)
        .bind(&f.model)
        .bind(&f.precision)
        .bind(f.batch_size)
        .bind(f.include_simulated)
        .bind(f.omit_latencies)
        .bind(&f.agent_name)
        .bind(json(&f.labels))
        .bind(f.since)
        .bind(f.until)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                let record: serde_json::Value = r.try_get("record")?;
                let mut result: BenchResult =
                    serde_json::from_value(record).map_err(|e| sqlx::Error::Decode(e.into()))?;
                result.latencies_ms = r.try_get("latencies_ms")?;
                Ok(StoredResult {
                    id: r.try_get("id")?,
                    sweep_id: r.try_get("sweep_id")?,
                    result,
                })
            })
            .collect::<sqlx::Result<_>>()
            .map_err(Into::into)
    }

    /// Loads results produced elsewhere (standalone agents) as a new, already finished sweep.
    /// Their agents are recorded as imported, keyed by name. All or nothing.
    pub async fn import(&self, name: &str, results: &[BenchResult]) -> Result<(Uuid, usize)> {
        if results.is_empty() {
            return Err(CoordinatorError::InvalidArgument(
                "nothing to import: no result records".into(),
            ));
        }
        for (i, r) in results.iter().enumerate() {
            r.validate()
                .map_err(|e| CoordinatorError::InvalidArgument(format!("record {}: {e}", i + 1)))?;
        }
        let sweep = Uuid::new_v4();
        let mut tx = self.pool.begin().await?;
        let spec = serde_json::json!({ "imported": results.len() });
        sqlx::query(
            "INSERT INTO sweeps (id, name, spec, spec_toml, state, finished_at) \
             VALUES ($1, $2, $3, '', 'imported', now())",
        )
        .bind(sweep)
        .bind(name)
        .bind(spec)
        .execute(&mut *tx)
        .await?;
        for (seq, r) in results.iter().enumerate() {
            let devices = vec![AgentDevice {
                device: r.device.clone(),
                kind: r.hardware_kind.clone(),
                name: r.hardware_name.clone(),
            }];
            let agent: Uuid = sqlx::query_scalar(
                "INSERT INTO agents (id, name, labels, price_per_hour, inventory, devices, origin, last_seen_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, 'imported', $7) \
                 ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name \
                 RETURNING id",
            )
            .bind(Uuid::new_v4())
            .bind(&r.agent_name)
            .bind(json(&r.agent_labels))
            .bind(r.price_per_hour)
            .bind(json(&r.host))
            .bind(json(&devices))
            .bind(r.finished_at)
            .fetch_one(&mut *tx)
            .await?;
            let job = Uuid::new_v4();
            sqlx::query(
                "INSERT INTO jobs (id, sweep_id, seq, spec, target, state, attempt, last_agent_id, \
                                   last_device, phase, fraction, started_at, finished_at) \
                 VALUES ($1, $2, $3, $4, $5, 'succeeded', 1, $6, $7, 'done', 1, $8, $9)",
            )
            .bind(job)
            .bind(sweep)
            .bind(seq as i32)
            .bind(json(&r.spec))
            .bind(r.spec.target.to_string())
            .bind(agent)
            .bind(&r.device)
            .bind(r.started_at)
            .bind(r.finished_at)
            .execute(&mut *tx)
            .await?;
            let mut r = r.clone();
            r.job_id = Some(job);
            r.attempt = 1;
            insert_result(&mut tx, sweep, job, agent, &r).await?;
        }
        tx.commit().await?;
        Ok((sweep, results.len()))
    }
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
) -> Result<Uuid> {
    let id = Uuid::new_v4();
    // The raw latencies have their own column; keep them out of the JSON copy.
    let mut record = r.clone();
    record.latencies_ms = Vec::new();
    let l = &r.latency;
    sqlx::query(
        "INSERT INTO results (id, job_id, sweep_id, agent_id, attempt, model, batch_size, precision, \
             image_size, hardware_kind, hardware_name, device, backend, path, math, simulated, \
             throttled, mean_ms, std_ms, p50_ms, p90_ms, p99_ms, ci95_low_ms, ci95_high_ms, \
             images_per_sec, peak_memory_bytes, price_per_hour, latencies_ms, record, finished_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, \
                 $19, $20, $21, $22, $23, $24, $25, $26, $27, $28, $29, $30)",
    )
    .bind(id)
    .bind(job)
    .bind(sweep)
    .bind(agent)
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
    .bind(json(&record))
    .bind(r.finished_at)
    .execute(&mut *tx)
    .await?;
    Ok(id)
}

fn json<T: Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).expect("domain types always serialise")
}

fn from_json<T: for<'de> Deserialize<'de> + Default>(v: serde_json::Value) -> T {
    serde_json::from_value(v).unwrap_or_default()
}
