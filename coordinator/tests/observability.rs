//! The coordinator seen by operators' tools, from outside: a plain gRPC health check
//! (grpc.health.v1) and a reflection listing over a bare tonic channel, an HTTP GET of
//! /metrics whose job counts move as a sweep is submitted, claimed and cancelled, and database
//! connection failures that say what failed, at once.

use std::time::{Duration, Instant};

use fleetmark_proto::v1 as pb;
use fleetmark_testkit::{eventually, TestDb};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt},
    sync::oneshot,
};
use tonic::transport::Channel;

struct Served {
    grpc: String,
    /// An admin token, made in the database as `fleetmark-coordinator token create` does.
    admin: String,
    metrics: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    _db: TestDb,
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

async fn serve() -> Served {
    let db = TestDb::new().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc = format!("http://{}", listener.local_addr().unwrap());
    let metrics_addr = metrics.local_addr().unwrap();
    let store = fleetmark_coordinator::Store::connect(&db.url, 2)
        .await
        .expect("connect");
    store.migrate().await.expect("migrate");
    let (_, admin) = store
        .create_token(
            "observability",
            fleetmark_coordinator::auth::Role::Admin,
            None,
            None,
        )
        .await
        .expect("an admin token");
    let mut config = fleetmark_coordinator::Config::new(db.url.clone());
    config.max_db_connections = 4;
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(fleetmark_coordinator::run_with_metrics(
        config,
        listener,
        Some(metrics),
        async move {
            let _ = stopped.await;
        },
    ));
    Served {
        grpc,
        admin,
        metrics: metrics_addr,
        stop: Some(stop),
        _db: db,
    }
}

async fn channel(url: &str) -> Channel {
    Channel::from_shared(url.to_string())
        .unwrap()
        .connect_lazy()
}

/// `req` with `secret` as its bearer credential.
fn bearer<T>(req: T, secret: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(req);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {secret}").parse().expect("a header value"),
    );
    r
}

/// GET /metrics over a raw socket; returns the status line and the body.
async fn scrape(addr: std::net::SocketAddr) -> Option<(String, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    Some((head.lines().next()?.to_string(), body.to_string()))
}

/// The exposition as (name{labels}, value) pairs; panics on a line that is not a sample.
fn samples(body: &str) -> Vec<(String, f64)> {
    body.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (name, value) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("not a sample: {l}"));
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("not a number in: {l}"));
            (name.to_string(), value)
        })
        .collect()
}

fn value(samples: &[(String, f64)], name: &str) -> Option<f64> {
    samples.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
}

async fn metrics_until(
    addr: std::net::SocketAddr,
    what: &str,
    ok: impl Fn(&[(String, f64)]) -> bool,
) -> Vec<(String, f64)> {
    eventually(Duration::from_secs(30), what, || {
        let ok = &ok;
        async move {
            let (status, body) = scrape(addr).await?;
            assert!(status.contains("200"), "{status}");
            let s = samples(&body);
            ok(&s).then_some(s)
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reflection_and_metrics_answer_outsiders() {
    let served = serve().await;
    let ch = channel(&served.grpc).await;

    // grpc.health.v1, with no credential: overall and per service.
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    for service in [
        "",
        "fleetmark.v1.SweepService",
        "fleetmark.v1.AgentService",
        "fleetmark.v1.TokenService",
    ] {
        let resp = eventually(Duration::from_secs(60), "a health answer", || {
            let mut health = health.clone();
            async move {
                health
                    .check(tonic_health::pb::HealthCheckRequest {
                        service: service.into(),
                    })
                    .await
                    .ok()
            }
        })
        .await;
        assert_eq!(
            resp.into_inner().status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service}"
        );
    }
    let unknown = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .expect_err("an unknown service is NOT_FOUND");
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    // Reflection lists the services, with no credential either.
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let mut reflection = ServerReflectionClient::new(ch.clone());
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .expect("reflection answers")
        .into_inner();
    let msg = stream
        .message()
        .await
        .expect("a reply")
        .expect("one message");
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
        panic!("not a service list: {msg:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "fleetmark.v1.SweepService",
        "fleetmark.v1.AgentService",
        "grpc.health.v1.Health",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
    }

    // Metrics: parseable, with zero jobs to start with.
    let before = metrics_until(served.metrics, "metrics", |_| true).await;
    assert_eq!(
        value(&before, "fleetmark_jobs{state=\"pending\"}"),
        Some(0.0)
    );
    assert!(before
        .iter()
        .any(|(n, _)| n.starts_with("fleetmark_database_errors_total")));

    // The Fleetmark services themselves still want a credential.
    let mut sweeps = pb::sweep_service_client::SweepServiceClient::new(ch.clone());
    let refused = sweeps
        .list_sweeps(pb::ListSweepsRequest { limit: 1 })
        .await
        .expect_err("no token, no sweeps");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);

    // A sweep of three jobs: three pending.
    let admin = served.admin.clone();
    let sweep = sweeps
        .submit_sweep(bearer(pb::SubmitSweepRequest {
            spec_toml: "batch_sizes = [1, 2, 4]\nprecisions = [\"f32\"]\ngpus = [\"cpu\"]\nimage_size = 32\n".into(),
        }, &admin))
        .await
        .expect("submit")
        .into_inner();
    metrics_until(served.metrics, "three pending jobs", |s| {
        value(s, "fleetmark_jobs{state=\"pending\"}") == Some(3.0)
    })
    .await;

    // An agent claims one: one running, one dispatch observed, one agent online.
    let mut agents = pb::agent_service_client::AgentServiceClient::new(ch.clone());
    let agent = agents
        .register(bearer(
            pb::RegisterRequest {
                name: "metrics-probe".into(),
                inventory: Some(Default::default()),
                devices: vec![pb::AgentDevice {
                    device: "cpu".into(),
                    kind: "cpu".into(),
                    name: "probe cpu".into(),
                    precisions: vec![],
                    health: None,
                    health_flags: vec![],
                }],
                ..Default::default()
            },
            &admin,
        ))
        .await
        .expect("register")
        .into_inner();
    let claimed = agents
        .claim_job(bearer(
            pb::ClaimJobRequest {
                agent_id: agent.agent_id.clone(),
                device: "cpu".into(),
                wait_ms: 1000,
            },
            &agent.agent_secret,
        ))
        .await
        .expect("claim")
        .into_inner();
    assert!(claimed.job.is_some(), "a job is handed out");
    let s = metrics_until(served.metrics, "one running job", |s| {
        value(s, "fleetmark_jobs{state=\"running\"}") == Some(1.0)
    })
    .await;
    assert_eq!(value(&s, "fleetmark_jobs{state=\"pending\"}"), Some(2.0));
    assert_eq!(
        value(&s, "fleetmark_dispatch_seconds_count{kind=\"cpu\"}"),
        Some(1.0)
    );
    assert_eq!(value(&s, "fleetmark_agents{state=\"online\"}"), Some(1.0));

    // Its progress report goes through a shared statement, observed as a batch of one.
    let job = claimed.job.expect("a job");
    agents
        .report_progress(bearer(
            pb::ReportProgressRequest {
                agent_id: agent.agent_id.clone(),
                job_id: job.job_id.clone(),
                attempt: job.attempt,
                phase: "warmup".into(),
                iterations: 1,
                fraction: 0.1,
            },
            &agent.agent_secret,
        ))
        .await
        .expect("progress");
    let s = metrics_until(served.metrics, "one progress batch", |s| {
        value(s, "fleetmark_batch_items_count{statement=\"progress\"}") == Some(1.0)
    })
    .await;
    assert_eq!(
        value(&s, "fleetmark_batch_items_sum{statement=\"progress\"}"),
        Some(1.0)
    );

    // Cancelled: nothing pending or running any more.
    sweeps
        .cancel_sweep(bearer(
            pb::CancelSweepRequest {
                sweep_id: sweep.sweep_id,
            },
            &admin,
        ))
        .await
        .expect("cancel");
    metrics_until(served.metrics, "three cancelled jobs", |s| {
        value(s, "fleetmark_jobs{state=\"cancelled\"}") == Some(3.0)
            && value(s, "fleetmark_jobs{state=\"pending\"}") == Some(0.0)
    })
    .await;
}

fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn database_connection_failures_say_what_failed() {
    // Nothing listens: the error names the address and the refusal, not a pool timeout.
    let port = closed_port();
    let mut config = fleetmark_coordinator::Config::new(format!(
        "postgres://postgres@127.0.0.1:{port}/fleetmark"
    ));
    config.startup_timeout = Duration::from_secs(1);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let started = Instant::now();
    let err = fleetmark_coordinator::run(config, listener, std::future::pending())
        .await
        .expect_err("no database");
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("127.0.0.1:{port}")) && msg.contains("connection refused"),
        "{msg}"
    );
    assert!(!msg.contains("timed out"), "{msg}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );

    // A database that does not exist: no retrying, at once.
    let server = fleetmark_testkit::server_url().await;
    let opts: sqlx::postgres::PgConnectOptions = server.parse().unwrap();
    let missing = format!(
        "postgres://{}@{}:{}/fleetmark_no_such_database",
        opts.get_username(),
        opts.get_host(),
        opts.get_port()
    );
    let config = fleetmark_coordinator::Config::new(missing);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let started = Instant::now();
    let err = fleetmark_coordinator::run(config, listener, std::future::pending())
        .await
        .expect_err("no such database");
    let msg = err.to_string();
    assert!(
        msg.contains("fleetmark_no_such_database") && msg.contains("does not exist"),
        "{msg}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "at once, not after the start-up timeout: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn the_binary_logs_json_without_colour_and_names_a_refused_database_at_once() {
    let port = closed_port();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_fleetmark-coordinator"))
        .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
        .arg("--database-url")
        .arg(format!("postgres://postgres@127.0.0.1:{port}/fleetmark"))
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the coordinator");
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let started = Instant::now();
    let line = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("connection refused") {
                return line;
            }
        }
        panic!("the coordinator exited without naming the refusal");
    })
    .await
    .expect("the refusal is logged within seconds");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(!line.contains('\u{1b}'), "no colour codes: {line}");
    let v: serde_json::Value = serde_json::from_str(&line).expect("one JSON object per line");
    assert_eq!(v["level"], "WARN", "{line}");
    assert!(line.contains(&format!("127.0.0.1:{port}")), "{line}");
    child.kill().await.ok();
}
