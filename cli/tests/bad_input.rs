//! Bad input to the `fleetmark` binary: every case exits 2 with one clear `error:` message on
//! stderr, never a panic, and queues or imports nothing.
//!
//! The coordinator runs in this process (the same `run` its binary calls) on a loopback port,
//! on a fresh database per test; the CLI is the real binary.

use std::{path::Path, process::Output, time::Duration};

use fleetmark_core::{BackendInfo, BenchResult, JobSpec, LatencyStats, SweepSpec};
use fleetmark_proto::{client::sweep_client, v1 as pb};
use fleetmark_testkit::{eventually, TestDb};
use sqlx::PgPool;
use tokio::sync::oneshot;
use tonic::Code;

/// One admin token for every coordinator of this test process, written into each test's
/// database by its hash, as `fleetmark-coordinator token create` would.
fn token() -> &'static str {
    static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TOKEN.get_or_init(|| {
        fleetmark_coordinator::auth::new_secret(fleetmark_coordinator::auth::TOKEN_PREFIX)
            .expect("randomness")
            .0
    })
}

/// A coordinator served from this process, stopped when dropped.
struct Live {
    url: String,
    pool: PgPool,
    stop: Option<oneshot::Sender<()>>,
    _db: TestDb,
}

impl Live {
    async fn start() -> Live {
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

    async fn count(&self, table: &str) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
            .fetch_one(&self.pool)
            .await
            .expect("count")
    }

    /// Nothing was queued, imported or registered.
    async fn assert_empty(&self) {
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

async fn fleetmark(coordinator: &str, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_fleetmark"));
    cmd.env("FLEETMARK_TOKEN", token())
        .env_remove("FLEETMARK_COORDINATOR")
        .env_remove("DATABASE_URL")
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

/// Exit code 2, `error: ...` on stderr mentioning every needle, no panic, nothing on stdout.
#[track_caller]
fn assert_bad(out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    let std_out = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "exit code; stderr:\n{err}");
    assert!(
        err.starts_with("error:"),
        "stderr starts with `error:`:\n{err}"
    );
    for n in needles {
        assert!(err.contains(n), "expected {n:?} in:\n{err}");
    }
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        std_out.trim().is_empty(),
        "nothing on stdout, got:\n{std_out}"
    );
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p.to_str().expect("utf-8 path").to_string()
}

/// Flags for a small valid sweep, to which each case adds one bad value.
const SMALL: &[&str] = &[
    "--image-size",
    "32",
    "--warmup",
    "1",
    "--min-iterations",
    "1",
    "--min-duration",
    "10ms",
];

async fn submit(url: &str, extra: &[&str]) -> Output {
    let mut args = vec!["submit"];
    args.extend_from_slice(SMALL);
    args.extend_from_slice(extra);
    fleetmark(url, &args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sweeps_are_refused_clearly_and_queue_nothing() {
    let live = Live::start().await;
    let url = live.url.as_str();
    let dir = tempfile::tempdir().expect("temp dir");

    let malformed = write(
        dir.path(),
        "malformed.toml",
        "batch_sizes = [1, 2\nprecisions = [\"f32\"]\n",
    );
    assert_bad(
        &fleetmark(url, &["submit", "--file", &malformed]).await,
        &[&malformed, "malformed", "line"],
    );
    let typo = write(
        dir.path(),
        "typo.toml",
        "batch_sizes = [1]\nprecisions = [\"f32\"]\nbatchsize = 3\n",
    );
    assert_bad(
        &fleetmark(url, &["submit", "--file", &typo]).await,
        &[&typo, "unknown field `batchsize`"],
    );
    let int8 = write(
        dir.path(),
        "int8.toml",
        "batch_sizes = [1]\nprecisions = [\"int8\"]\n",
    );
    assert_bad(
        &fleetmark(url, &["submit", "--file", &int8]).await,
        &[&int8, "unknown precision 'int8'"],
    );
    let missing = dir.path().join("no-such.toml");
    let missing = missing.to_str().expect("utf-8");
    assert_bad(
        &fleetmark(url, &["submit", "--file", missing]).await,
        &["cannot read", missing],
    );

    assert_bad(
        &submit(url, &["--precision", "int8"]).await,
        &["unknown precision 'int8'", "f32, f16, bf16"],
    );
    assert_bad(
        &submit(url, &["--gpu", "h1000"]).await,
        &["unknown GPU kind 'h1000'", "h100"],
    );
    assert_bad(
        &submit(url, &["--batch", "0"]).await,
        &["batch size 0 is out of range"],
    );
    assert_bad(
        &submit(url, &["--batch", "1,100000"]).await,
        &["batch size 100000 is out of range", "4096"],
    );
    assert_bad(
        &submit(url, &["--batch", "abc"]).await,
        &["invalid value 'abc'"],
    );
    assert_bad(
        &fleetmark(url, &["submit", "--batch", "1", "--image-size", "8"]).await,
        &["image size 8 is out of range"],
    );
    assert_bad(
        &fleetmark(
            url,
            &["submit", "--min-duration", "10s", "--max-duration", "1s"],
        )
        .await,
        &["shorter than min_duration"],
    );
    assert_bad(
        &submit(url, &["--model", "vgg16"]).await,
        &["unknown model 'vgg16'"],
    );

    // The coordinator applies the same rules to whatever reaches it, CLI or not.
    let mut client = sweep_client(url, Some(token())).expect("client");
    for toml in [
        "batch_sizes = [1, 2\n",
        "batch_sizes = [0]\nprecisions = [\"f32\"]\n",
        "batch_sizes = [1]\nprecisions = [\"int8\"]\n",
        "batch_sizes = [1]\nprecisions = [\"f32\"]\ngpus = [\"h1000\"]\n",
    ] {
        let err = client
            .submit_sweep(pb::SubmitSweepRequest {
                spec_toml: toml.into(),
            })
            .await
            .expect_err("a bad sweep is refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{toml}: {err:?}");
    }
    live.assert_empty().await;

    // A good one still goes through (so the cases above failed for their own reasons).
    let out = submit(url, &["--batch", "1"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(live.count("sweeps").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_malformed_sweep_ids_are_clear_errors() {
    let live = Live::start().await;
    let url = live.url.as_str();
    let unknown = uuid::Uuid::new_v4().to_string();
    for cmd in ["results", "watch", "cancel"] {
        assert_bad(
            &fleetmark(url, &[cmd, &unknown]).await,
            &["no sweep", &unknown],
        );
        assert_bad(
            &fleetmark(url, &[cmd, "not-a-uuid"]).await,
            &["'not-a-uuid' is not a valid sweep id"],
        );
    }
    assert_bad(
        &fleetmark(url, &["results", &unknown, "--format", "json"]).await,
        &["no sweep", &unknown],
    );
    live.assert_empty().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_coordinator_is_a_clear_error() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let dir = tempfile::tempdir().expect("temp dir");
    let records = write(dir.path(), "good.jsonl", &format!("{}\n", record_line(1)));
    let id = uuid::Uuid::new_v4().to_string();
    let cases: Vec<Vec<&str>> = vec![
        vec!["sweeps"],
        vec!["agents"],
        vec!["submit", "--batch", "1", "--image-size", "32"],
        vec!["results", &id],
        vec!["watch", &id],
        vec!["cancel", &id],
        vec!["compare"],
        vec!["import", &records],
    ];
    for args in cases {
        assert_bad(
            &fleetmark(&url, &args).await,
            &["cannot reach the coordinator", &url],
        );
    }
    assert_bad(
        &fleetmark("http://bad host:7070", &["sweeps"]).await,
        &["invalid coordinator URL"],
    );
}

/// A well-formed standalone result record, as one JSON line.
fn record_line(batch: u32) -> String {
    let spec: JobSpec = SweepSpec::from_toml(&format!(
        "batch_sizes = [{batch}]\nprecisions = [\"f32\"]\nimage_size = 32\n"
    ))
    .expect("spec")
    .expand()
    .expect("jobs")
    .remove(0);
    let latencies = vec![3.0, 4.0, 5.0];
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_import_names_the_bad_line_and_imports_nothing() {
    let live = Live::start().await;
    let url = live.url.as_str();
    let dir = tempfile::tempdir().expect("temp dir");

    // Line 2 is not JSON; the good line 1 must not be imported either.
    let garbage = write(
        dir.path(),
        "garbage.jsonl",
        &format!(
            "{}\n{{\"schema\": 1, oops\n{}\n",
            record_line(1),
            record_line(2)
        ),
    );
    assert_bad(
        &fleetmark(url, &["import", &garbage]).await,
        &[&garbage, "line 2", "not a result record"],
    );

    // Line 3 (after a blank line 2, which is skipped but counted) is JSON but an inconsistent
    // record: its count disagrees with its latencies.
    let mut bad: serde_json::Value = serde_json::from_str(&record_line(4)).expect("json");
    bad["latency"]["count"] = 7.into();
    let inconsistent = write(
        dir.path(),
        "inconsistent.jsonl",
        &format!("{}\n\n{}\n{}\n", record_line(1), bad, record_line(2)),
    );
    assert_bad(
        &fleetmark(url, &["import", &inconsistent]).await,
        &[&inconsistent, "line 3", "latency count 7"],
    );

    let empty = write(dir.path(), "empty.jsonl", "\n\n");
    assert_bad(
        &fleetmark(url, &["import", &empty]).await,
        &["holds no result records"],
    );
    let missing = dir.path().join("missing.jsonl");
    let missing = missing.to_str().expect("utf-8");
    assert_bad(
        &fleetmark(url, &["import", missing]).await,
        &["cannot read", missing],
    );
    live.assert_empty().await;

    // The good lines alone import fine.
    let good = write(
        dir.path(),
        "good.jsonl",
        &format!("{}\n{}\n", record_line(1), record_line(2)),
    );
    let out = fleetmark(url, &["import", &good]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(live.count("results").await, 2);
}
