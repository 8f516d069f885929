//! `fleetmark-loadgen`: measures how fast a coordinator dispatches. Many simulated agents live in
//! this one process, each with its own connection, speaking the real agent protocol (register,
//! claim, acknowledge with a progress report, submit a result) to a real coordinator over real
//! sockets. Jobs are near-zero: a result is made up the moment a job is claimed, so what is
//! measured is the coordinator and Postgres, not a model.
//!
//! With `--database-url` it also reads what the completions cost Postgres (transactions, rows,
//! WAL bytes, trigger calls) from the statistics views, and the queue wait of every job from
//! the database clock.
//!
//!     fleetmark-loadgen --coordinator http://127.0.0.1:7070 --database-url postgres://... \
//!         --agents 100 --jobs 10000

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::Parser;
use fleetmark_core::{BackendInfo, BenchResult, JobSpec, LatencyStats};
use fleetmark_proto::v1::{
    self as pb, agent_service_client::AgentServiceClient, sweep_service_client::SweepServiceClient,
};
use serde::Serialize;
use sqlx::{postgres::PgPoolOptions, PgPool, Row};
use tonic::transport::{Channel, Endpoint};

/// The largest sweep the coordinator accepts; bigger loads are several sweeps.
const SWEEP_CHUNK: usize = 10_000;
/// How long the statistics collector may lag behind the backends' work.
const STATS_SETTLE: Duration = Duration::from_millis(1500);

#[derive(Debug, Parser)]
#[command(
    name = "fleetmark-loadgen",
    about = "Dispatch load generator for a Fleetmark coordinator"
)]
struct Args {
    /// The coordinator under load.
    #[arg(long)]
    coordinator: String,
    /// The coordinator's database, for the Postgres cost per completion and queue waits.
    #[arg(long)]
    database_url: Option<String>,
    /// An admin token (`fleetmark-coordinator token create --role admin`): agents register with
    /// it and the sweeps are submitted with it; each agent then uses its own secret.
    #[arg(long, env = "FLEETMARK_TOKEN")]
    token: String,
    /// Simulated agents (one connection and one device each).
    #[arg(long, default_value_t = 100)]
    agents: usize,
    /// Near-zero jobs to complete.
    #[arg(long, default_value_t = 10_000)]
    jobs: usize,
    /// Pending jobs for a GPU kind (h100) that no agent here can run, queued first.
    #[arg(long, default_value_t = 0)]
    unmatched: usize,
    /// How long one claim waits at the coordinator.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    claim_wait: Duration,
    /// Soak mode: keep the queue fed for this long instead of completing `--jobs` once.
    #[arg(long, value_parser = humantime::parse_duration)]
    soak: Option<Duration>,
    /// Stop after this long even if not every job is done (the rate is of those completed):
    /// the rate with a long queue, without waiting for all of it to drain.
    #[arg(long, value_parser = humantime::parse_duration)]
    max_time: Option<Duration>,
    /// Sample this process's resident memory (the coordinator) during the run.
    #[arg(long)]
    rss_pid: Option<u32>,
    /// Length of the windows the completion rate is reported over.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    window: Duration,
}

#[derive(Debug, Default, Serialize)]
struct Report {
    agents: usize,
    jobs: u64,
    unmatched: usize,
    seconds: f64,
    completions_per_sec: f64,
    /// Completions per window, in order.
    window_rates: Vec<f64>,
    queue_wait_p50_ms: Option<f64>,
    queue_wait_p99_ms: Option<f64>,
    per_completion: Option<PgCost>,
    coordinator_rss_mb: Vec<f64>,
    errors: u64,
}

/// What one completion cost Postgres, averaged over the run.
#[derive(Debug, Default, Serialize, Clone)]
struct PgCost {
    transactions: f64,
    rows_returned: f64,
    rows_fetched: f64,
    rows_inserted: f64,
    rows_updated: f64,
    jobs_hot_update_share: f64,
    /// Cluster-wide: includes any other database's writes during the run.
    wal_bytes: f64,
    trigger_calls: f64,
    trigger_ms: f64,
}

#[derive(Debug, Default, Clone)]
struct PgSnapshot {
    xact: i64,
    returned: i64,
    fetched: i64,
    inserted: i64,
    updated: i64,
    jobs_upd: i64,
    jobs_hot: i64,
    wal: f64,
    trig_calls: i64,
    trig_ms: f64,
}

async fn snapshot(pool: &PgPool) -> anyhow::Result<PgSnapshot> {
    tokio::time::sleep(STATS_SETTLE).await;
    let mut c = pool.acquire().await?;
    sqlx::query("SELECT pg_stat_clear_snapshot()")
        .execute(&mut *c)
        .await?;
    let d = sqlx::query(
        "SELECT xact_commit + xact_rollback AS xact, tup_returned, tup_fetched, tup_inserted, \
                tup_updated, pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::float8 AS wal \
         FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(&mut *c)
    .await?;
    let t = sqlx::query(
        "SELECT coalesce(sum(n_tup_upd), 0)::bigint AS upd, coalesce(sum(n_tup_hot_upd), 0)::bigint AS hot \
         FROM pg_stat_user_tables WHERE relname = 'jobs'",
    )
    .fetch_one(&mut *c)
    .await?;
    let f = sqlx::query(
        "SELECT coalesce(sum(calls), 0)::bigint AS calls, coalesce(sum(total_time), 0)::float8 AS ms \
         FROM pg_stat_user_functions",
    )
    .fetch_one(&mut *c)
    .await?;
    Ok(PgSnapshot {
        xact: d.try_get("xact")?,
        returned: d.try_get("tup_returned")?,
        fetched: d.try_get("tup_fetched")?,
        inserted: d.try_get("tup_inserted")?,
        updated: d.try_get("tup_updated")?,
        wal: d.try_get("wal")?,
        jobs_upd: t.try_get("upd")?,
        jobs_hot: t.try_get("hot")?,
        trig_calls: f.try_get("calls")?,
        trig_ms: f.try_get("ms")?,
    })
}

fn cost(a: &PgSnapshot, b: &PgSnapshot, n: u64) -> PgCost {
    let n = n.max(1) as f64;
    let upd = (b.jobs_upd - a.jobs_upd) as f64;
    PgCost {
        transactions: (b.xact - a.xact) as f64 / n,
        rows_returned: (b.returned - a.returned) as f64 / n,
        rows_fetched: (b.fetched - a.fetched) as f64 / n,
        rows_inserted: (b.inserted - a.inserted) as f64 / n,
        rows_updated: (b.updated - a.updated) as f64 / n,
        jobs_hot_update_share: if upd > 0.0 {
            (b.jobs_hot - a.jobs_hot) as f64 / upd
        } else {
            0.0
        },
        wal_bytes: (b.wal - a.wal) / n,
        trigger_calls: (b.trig_calls - a.trig_calls) as f64 / n,
        trigger_ms: (b.trig_ms - a.trig_ms) / n,
    }
}

/// A sweep of `n` near-zero jobs for `target` (at most [`SWEEP_CHUNK`]).
fn sweep_toml(name: &str, n: usize, target: &str) -> String {
    // 10 batch sizes x repetitions; the remainder as a second sweep would complicate things,
    // so `n` is rounded up to a multiple of 10.
    let reps = n.div_ceil(10).max(1);
    format!(
        "name = \"{name}\"\nmodel = \"resnet18\"\nbatch_sizes = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n\
         precisions = [\"f32\"]\ngpus = [\"{target}\"]\nimage_size = 32\nrepetitions = {reps}\n\n\
         [measurement]\nwarmup_iterations = 1\nwarmup_duration = \"0s\"\nmin_iterations = 3\n\
         min_duration = \"0s\"\n"
    )
}

/// A well-formed, simulated result for `spec`, made up at once.
fn made_up(job: &pb::Job, agent: &str, spec: JobSpec) -> BenchResult {
    let latencies = vec![1.0, 1.1, 1.2];
    let latency = LatencyStats::from_samples(&latencies).expect("stats of three samples");
    let now = chrono::Utc::now();
    BenchResult {
        schema: fleetmark_core::RESULT_SCHEMA_VERSION,
        job_id: uuid::Uuid::parse_str(&job.job_id).ok(),
        attempt: job.attempt,
        agent_name: agent.into(),
        agent_labels: Default::default(),
        price_per_hour: None,
        hardware_kind: "cpu".into(),
        hardware_name: "loadgen cpu".into(),
        device: "cpu".into(),
        images_per_sec: latency.images_per_sec(spec.batch_size),
        spec,
        backend: BackendInfo {
            backend: "simulated".into(),
            path: "loadgen".into(),
            math: "f32".into(),
            details: Default::default(),
            simulated: true,
        },
        weights: Default::default(),
        latency,
        input_copy: None,
        peak_memory_bytes: 0,
        memory_scope: "none".into(),
        warmup_iterations: 1,
        timed_seconds: 0.003,
        telemetry: None,
        correctness: None,
        environment: Default::default(),
        host: Default::default(),
        started_at: now,
        finished_at: now,
        latencies_ms: latencies,
        stability: None,
    }
}

/// `msg` as a request carrying `secret` as its bearer credential.
fn authed<T>(msg: T, secret: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {secret}")
            .parse()
            .expect("secrets are ASCII"),
    );
    req
}

struct Shared {
    done: AtomicU64,
    errors: AtomicU64,
    stop: AtomicBool,
    /// Completion instants, for windowed rates.
    times: Mutex<Vec<Instant>>,
    claim_wait: Duration,
}

/// One simulated agent: claim, acknowledge, submit, until told to stop.
async fn agent_loop(
    mut client: AgentServiceClient<Channel>,
    id: String,
    secret: String,
    name: String,
    s: Arc<Shared>,
) {
    while !s.stop.load(Ordering::Relaxed) {
        let claim = client
            .claim_job(authed(
                pb::ClaimJobRequest {
                    agent_id: id.clone(),
                    device: "cpu".into(),
                    wait_ms: s.claim_wait.as_millis() as u32,
                },
                &secret,
            ))
            .await;
        let job = match claim {
            Ok(r) => match r.into_inner().job {
                Some(j) => j,
                None => continue,
            },
            Err(_) => {
                s.errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let ack = client
            .report_progress(authed(
                pb::ReportProgressRequest {
                    agent_id: id.clone(),
                    job_id: job.job_id.clone(),
                    attempt: job.attempt,
                    phase: "timing".into(),
                    iterations: 1,
                    fraction: 0.5,
                },
                &secret,
            ))
            .await;
        if ack.is_err() {
            s.errors.fetch_add(1, Ordering::Relaxed);
        }
        let Some(spec) = job.spec.clone().and_then(|w| JobSpec::try_from(w).ok()) else {
            s.errors.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let result = made_up(&job, &name, spec);
        match client
            .submit_result(authed(
                pb::SubmitResultRequest {
                    agent_id: id.clone(),
                    result: Some((&result).into()),
                },
                &secret,
            ))
            .await
        {
            Ok(_) => {
                s.done.fetch_add(1, Ordering::Relaxed);
                s.times.lock().expect("times").push(Instant::now());
            }
            Err(_) => {
                s.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

async fn connect(url: &str) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(url.to_string())?
        .tcp_nodelay(true)
        .connect()
        .await?)
}

async fn submit(
    sweeps: &mut SweepServiceClient<Channel>,
    token: &str,
    name: &str,
    n: usize,
    target: &str,
) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::new();
    let mut left = n;
    let mut k = 0;
    while left > 0 {
        let chunk = left.min(SWEEP_CHUNK);
        let r = sweeps
            .submit_sweep(authed(
                pb::SubmitSweepRequest {
                    spec_toml: sweep_toml(&format!("{name}-{k}"), chunk, target),
                },
                token,
            ))
            .await
            .context("submit a sweep")?
            .into_inner();
        ids.push(r.sweep_id);
        left = left.saturating_sub(r.jobs as usize);
        k += 1;
    }
    Ok(ids)
}

fn rss_mb(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

async fn queue_waits(pool: &PgPool, sweeps: &[String]) -> anyhow::Result<(f64, f64)> {
    let ids: Vec<uuid::Uuid> = sweeps.iter().filter_map(|s| s.parse().ok()).collect();
    let r = sqlx::query(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY w) AS p50, \
                percentile_cont(0.99) WITHIN GROUP (ORDER BY w) AS p99 \
         FROM (SELECT extract(epoch FROM started_at - created_at) * 1000 AS w \
               FROM jobs WHERE sweep_id = ANY($1) AND started_at IS NOT NULL) x",
    )
    .bind(&ids)
    .fetch_one(pool)
    .await?;
    Ok((r.try_get::<f64, _>("p50")?, r.try_get::<f64, _>("p99")?))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let pool = match &args.database_url {
        Some(url) => Some(
            PgPoolOptions::new()
                .max_connections(2)
                .connect(url)
                .await
                .context("connect to the database")?,
        ),
        None => None,
    };
    let mut sweeps = SweepServiceClient::new(connect(&args.coordinator).await?);
    if args.unmatched > 0 {
        submit(
            &mut sweeps,
            &args.token,
            "loadgen-unmatched",
            args.unmatched,
            "h100",
        )
        .await?;
        eprintln!("queued {} jobs no agent here can run", args.unmatched);
    }

    let shared = Arc::new(Shared {
        done: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        times: Mutex::new(Vec::new()),
        claim_wait: args.claim_wait,
    });
    let mut tasks = Vec::new();
    for i in 0..args.agents {
        let mut client = AgentServiceClient::new(connect(&args.coordinator).await?);
        let name = format!("loadgen-{i}");
        let registered = client
            .register(authed(
                pb::RegisterRequest {
                    name: name.clone(),
                    devices: vec![pb::AgentDevice {
                        device: "cpu".into(),
                        kind: "cpu".into(),
                        name: "loadgen cpu".into(),
                        precisions: vec![],
                        health: None,
                        health_flags: vec![],
                    }],
                    ..Default::default()
                },
                &args.token,
            ))
            .await
            .context("register")?
            .into_inner();
        tasks.push(tokio::spawn(agent_loop(
            client,
            registered.agent_id,
            registered.agent_secret,
            name,
            shared.clone(),
        )));
    }
    eprintln!("{} agents connected", args.agents);

    let before = match &pool {
        Some(p) => Some(snapshot(p).await?),
        None => None,
    };
    let start = Instant::now();
    let mut submitted = args.jobs;
    let mut ids = submit(&mut sweeps, &args.token, "loadgen", args.jobs, "any").await?;
    let mut rss = Vec::new();
    let mut last_rss = Instant::now() - Duration::from_secs(60);
    loop {
        let done = shared.done.load(Ordering::Relaxed) as usize;
        if let Some(pid) = args.rss_pid {
            if last_rss.elapsed() >= args.window {
                rss.extend(rss_mb(pid));
                last_rss = Instant::now();
            }
        }
        match args.soak {
            Some(d) if start.elapsed() >= d => break,
            // Keep about a chunk queued.
            Some(_) if submitted - done < SWEEP_CHUNK / 2 => {
                ids.extend(
                    submit(
                        &mut sweeps,
                        &args.token,
                        "loadgen-soak",
                        SWEEP_CHUNK / 2,
                        "any",
                    )
                    .await?,
                );
                submitted += SWEEP_CHUNK / 2;
            }
            Some(_) => {}
            None if done >= args.jobs => break,
            None if args.max_time.is_some_and(|d| start.elapsed() >= d) => break,
            None => {}
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shared.stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed();
    let done = shared.done.load(Ordering::Relaxed);
    let times = shared.times.lock().expect("times").clone();
    let mut window_rates = Vec::new();
    let windows = (elapsed.as_secs_f64() / args.window.as_secs_f64()).floor() as usize;
    for w in 0..windows {
        let lo = start + args.window * w as u32;
        let hi = lo + args.window;
        let n = times.iter().filter(|t| **t >= lo && **t < hi).count();
        window_rates.push(n as f64 / args.window.as_secs_f64());
    }
    for t in tasks {
        t.abort();
    }
    let mut report = Report {
        agents: args.agents,
        jobs: done,
        unmatched: args.unmatched,
        seconds: elapsed.as_secs_f64(),
        completions_per_sec: done as f64 / elapsed.as_secs_f64(),
        window_rates,
        coordinator_rss_mb: rss,
        errors: shared.errors.load(Ordering::Relaxed),
        ..Default::default()
    };
    if let (Some(p), Some(b)) = (&pool, before) {
        let after = snapshot(p).await?;
        report.per_completion = Some(cost(&b, &after, done));
        if args.soak.is_none() {
            let (p50, p99) = queue_waits(p, &ids).await?;
            report.queue_wait_p50_ms = Some(p50);
            report.queue_wait_p99_ms = Some(p99);
        }
    }
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
