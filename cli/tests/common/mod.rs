//! Shared by the CLI's integration tests: a coordinator served in-process on a loopback port
//! with a fresh database, the real `fleetmark` binary, and well-formed result records.

#![allow(dead_code)]

use std::{path::Path, process::Output, time::Duration};

use fleetmark_core::{BackendInfo, BenchResult, JobSpec, LatencyStats, SweepSpec};
use fleetmark_proto::{client::sweep_client, v1 as pb};
use fleetmark_testkit::{eventually, TestDb};
use sqlx::PgPool;
use tokio::sync::oneshot;

/// One admin token for every coordinator of this test process, written into each test's
/// database by its hash, as `fleetmark-coordinator token create` would.
pub fn token() -> &'static str {
    static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TOKEN.get_or_init(|| {
        fleetmark_coordinator::auth::new_secret(fleetmark_coordinator::auth::TOKEN_PREFIX)
            .expect("randomness")
            .0
    })
}

/// A coordinator served from this process, stopped when dropped.
pub struct Live {
    pub url: String,
    pub pool: PgPool,
    stop: Option<oneshot::Sender<()>>,
    _db: TestDb,
}

impl Live {
    pub async fn start() -> Live {
        let db = TestDb::new().await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let store = fleetmark_coordinator::Store::connect(&db.url, 2)
            .await
            .expect("connect");
        store.migrate().await.expect("migrate");
        sqlx::query(
            "INSERT INTO api_tokens (id, name, role, hash) VALUES ($1, 'test', 'admin', $2)",
        )
        .bind(uuid::Uuid::new_v4())
        .bind(&fleetmark_coordinator::auth::hash_secret(token())[..])
        .execute(store.pool())
        .await
        .expect("insert the test token");
        let mut config = fleetmark_coordinator::Config::new(db.url.clone());
        config.max_db_connections = 4;
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(fleetmark_coordinator::run(config, listener, async move {
            let _ = stopped.await;
        }));
        let client = sweep_client(&url, Some(token())).expect("client");
        eventually(Duration::from_secs(60), "the coordinator to answer", || {
            let mut client = client.clone();
            async move {
                client
                    .list_sweeps(pb::ListSweepsRequest { limit: 1 })
                    .await
                    .ok()
                    .map(|_| ())
            }
        })
        .await;
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(&db.url)
            .await
            .expect("connect to the test database");
        Live {
            url,
            pool,
            stop: Some(stop),
            _db: db,
        }
    }

    pub async fn count(&self, table: &str) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
            .fetch_one(&self.pool)
            .await
            .expect("count")
    }

    /// Nothing was queued, imported or registered.
    pub async fn assert_empty(&self) {
        for table in ["sweeps", "jobs", "results", "agents"] {
            assert_eq!(self.count(table).await, 0, "{table} must stay empty");
        }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

pub async fn fleetmark(coordinator: &str, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_fleetmark"));
    cmd.env("FLEETMARK_TOKEN", token())
        .env_remove("FLEETMARK_COORDINATOR")
        .env_remove("DATABASE_URL")
        .env_remove("FLEETMARK_CONFIG")
        .env_remove("FLEETMARK_TOKEN_FILE")
        .env("XDG_CONFIG_HOME", "/nonexistent/fleetmark-test-config")
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .arg("--coordinator")
        .arg(coordinator)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("`fleetmark {}` hung", args.join(" ")))
        .expect("run fleetmark")
}

pub fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p.to_str().expect("utf-8 path").to_string()
}

/// A well-formed standalone result record, as one JSON line.
pub fn record_line(batch: u32) -> String {
    record(batch, 0, 3)
}

/// A well-formed record for repetition `rep` (0-based) with `samples` timed iterations.
pub fn record(batch: u32, rep: u32, samples: usize) -> String {
    let spec: JobSpec = SweepSpec::from_toml(&format!(
        "batch_sizes = [{batch}]\nprecisions = [\"f32\"]\nimage_size = 32\n"
    ))
    .expect("spec")
    .expand()
    .expect("jobs")
    .remove(0);
    let spec = JobSpec {
        repetition: rep,
        ..spec
    };
    let latencies: Vec<f64> = (0..samples).map(|i| 3.0 + (i % 3) as f64).collect();
    let latency = LatencyStats::from_samples(&latencies).expect("stats");
    let now = chrono::Utc::now();
    let r = BenchResult {
        schema: fleetmark_core::RESULT_SCHEMA_VERSION,
        job_id: None,
        attempt: 0,
        agent_name: "offline".into(),
        agent_labels: Default::default(),
        price_per_hour: None,
        hardware_kind: "cpu".into(),
        hardware_name: "test cpu".into(),
        device: "cpu".into(),
        images_per_sec: latency.images_per_sec(batch),
        spec,
        backend: BackendInfo {
            backend: "candle-cpu".into(),
            path: "fused".into(),
            math: "f32".into(),
            details: Default::default(),
            simulated: false,
        },
        weights: Default::default(),
        latency,
        input_copy: None,
        peak_memory_bytes: 0,
        memory_scope: "process-rss".into(),
        warmup_iterations: 1,
        timed_seconds: 0.012,
        telemetry: None,
        correctness: None,
        environment: Default::default(),
        host: Default::default(),
        started_at: now,
        finished_at: now,
        latencies_ms: latencies,
        stability: None,
    };
    r.validate().expect("the made-up record is valid");
    serde_json::to_string(&r).expect("json")
}
