//! The Fleetmark coordinator as a library: `run(config, listener, shutdown)` serves the agent and
//! sweep APIs on an already bound listener until `shutdown` resolves. The binary and the tests
//! drive this same function.
//!
//! A coordinator keeps no state of its own. Postgres holds agents, sweeps, jobs, leases and
//! results; several coordinators can serve one database, each reaping expired leases and waking
//! its waiting claims when another one queues work (`LISTEN fleetmark_jobs`).

pub mod auth;
pub mod error;
pub mod metrics;
mod service;
pub mod store;
mod wakeup;

use std::{future::Future, str::FromStr, sync::Arc, time::Duration};

use fleetmark_proto::v1::{
    agent_service_server::AgentServiceServer, sweep_service_server::SweepServiceServer,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use error::CoordinatorError;
pub use store::Store;

/// Largest message either side may send: a result with a long run of raw latencies, or an
/// import of many results, is several megabytes.
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;

#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: String,
    /// When set, every call must carry `authorization: Bearer <token>`.
    pub token: Option<String>,
    /// How long a job's lease lasts without a progress report.
    pub lease: Duration,
    /// How often agents should heartbeat and report progress.
    pub heartbeat_interval: Duration,
    /// How often this coordinator looks for expired leases.
    pub reap_interval: Duration,
    pub max_db_connections: u32,
    /// How long start-up waits for the database to accept connections.
    pub startup_timeout: Duration,
}

impl Config {
    pub fn new(database_url: impl Into<String>) -> Self {
        Config {
            database_url: database_url.into(),
            token: None,
            lease: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(2),
            reap_interval: Duration::from_secs(1),
            max_db_connections: 16,
            startup_timeout: Duration::from_secs(30),
        }
    }
}

/// Shared by every request handler.
pub(crate) struct State {
    pub store: Store,
    pub config: Config,
    pub wakeup: Arc<tokio::sync::Notify>,
    pub shutdown: CancellationToken,
    pub metrics: metrics::Metrics,
}

/// An agent heard from within this window counts as online.
pub(crate) fn online_window(config: &Config) -> Duration {
    config.heartbeat_interval * 3 + Duration::from_secs(2)
}

/// Connects, migrates, and serves until `shutdown` resolves.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), CoordinatorError> {
    run_with_metrics(config, listener, None, shutdown).await
}

/// [`run`], also serving Prometheus metrics at `/metrics` on `metrics` when given.
pub async fn run_with_metrics(
    config: Config,
    listener: TcpListener,
    metrics: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), CoordinatorError> {
    let store = connect_with_retry(&config).await?;
    store.migrate().await?;
    let addr = listener.local_addr().ok();
    info!(addr = ?addr, lease_ms = config.lease.as_millis() as u64, "coordinator listening");

    let token = CancellationToken::new();
    let state = Arc::new(State {
        store: store.clone(),
        config: config.clone(),
        wakeup: Arc::new(tokio::sync::Notify::new()),
        shutdown: token.clone(),
        metrics: metrics::Metrics::new(),
    });
    let mut background = vec![
        tokio::spawn(reaper(state.clone())),
        tokio::spawn(wakeup::listen(state.clone())),
    ];
    if let Some(listener) = metrics {
        info!(addr = ?listener.local_addr().ok(), "metrics at /metrics");
        let (state, stop) = (state.clone(), token.clone());
        background.push(tokio::spawn(async move {
            if let Err(e) = metrics::serve(listener, state, stop).await {
                warn!(error = %e, "metrics server stopped");
            }
        }));
    }

    // Health (grpc.health.v1) and reflection answer without a token: probes and tools such as
    // grpcurl use them, and they reveal nothing that the published .proto does not.
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<AgentServiceServer<service::AgentApi>>()
        .await;
    health_reporter
        .set_serving::<SweepServiceServer<service::SweepApi>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(fleetmark_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| CoordinatorError::InvalidArgument(format!("reflection: {e}")))?;

    let auth = auth::Auth::new(config.token.clone());
    let agents = AgentServiceServer::new(service::AgentApi(state.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let sweeps = SweepServiceServer::new(service::SweepApi(state.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let stop = token.clone();
    let served = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection)
        .add_service(tonic::service::interceptor::InterceptedService::new(
            agents,
            auth.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            sweeps, auth,
        ))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            async move {
                shutdown.await;
                // Long polls and watch streams end when this fires, so the server can drain.
                stop.cancel();
            },
        )
        .await;
    token.cancel();
    for task in background {
        task.abort();
    }
    store.pool().close().await;
    info!("coordinator stopped");
    served.map_err(|e| CoordinatorError::InvalidArgument(format!("server: {e}")))
}

/// Connects at start-up. One plain connection is tried first, so that a failure names its
/// cause at once (connection refused to host:port, authentication failed, no such database)
/// instead of surfacing as a pool timeout. Causes that waiting cannot fix end start-up at once;
/// the others (the server is not up yet) are retried until `startup_timeout`.
async fn connect_with_retry(config: &Config) -> Result<Store, CoordinatorError> {
    let options =
        sqlx::postgres::PgConnectOptions::from_str(&config.database_url).map_err(|e| {
            CoordinatorError::DatabaseConnect {
                target: "the database".into(),
                reason: format!("invalid database URL: {e}"),
                permanent: true,
            }
        })?;
    let target = format!(
        "{}:{} (database {})",
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or("postgres")
    );
    let deadline = tokio::time::Instant::now() + config.startup_timeout;
    let mut delay = Duration::from_millis(200);
    loop {
        let probe = sqlx::ConnectOptions::connect(&options).await;
        let outcome = match probe {
            Ok(conn) => {
                let _ = sqlx::Connection::close(conn).await;
                Store::connect(&config.database_url, config.max_db_connections).await
            }
            Err(e) => Err(error::connect_error(&target, e)),
        };
        match outcome {
            Ok(store) => return Ok(store),
            Err(
                e @ CoordinatorError::DatabaseConnect {
                    permanent: true, ..
                },
            ) => return Err(e),
            Err(e) if tokio::time::Instant::now() + delay < deadline => {
                warn!(error = %e, "database not reachable yet, retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Returns expired leases to the queue. Every coordinator runs one; the update is idempotent, so
/// several racing is harmless.
///
/// At start-up and after losing the database, the first thing the reaper does is give every
/// running lease a fresh term: agents kept working but could not report, and reaping them the moment the
/// database is back would throw their work away. Another coordinator that kept its connection
/// may still reap them; that costs a re-run, never a wrong result.
async fn reaper(state: Arc<State>) {
    let mut tick = tokio::time::interval(state.config.reap_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A coordinator that starts is a coordinator that was down, or a new one: either way the
    // agents may not have been able to report, so the first tick renews every running lease.
    let mut database_was_lost = true;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = state.shutdown.cancelled() => return,
        }
        if database_was_lost {
            match state.store.extend_running_leases(state.config.lease).await {
                Ok(n) => {
                    if n > 0 {
                        info!(
                            jobs = n,
                            "running leases renewed after start-up or a database outage"
                        );
                    }
                    database_was_lost = false;
                }
                Err(e) => {
                    metrics::database_error();
                    warn!(error = %e, "database still unavailable");
                    continue;
                }
            }
        }
        match state.store.expire_leases(None).await {
            Ok(expired) if !expired.is_empty() => {
                info!(jobs = ?expired, "leases expired, jobs requeued");
                state.wakeup.notify_waiters();
            }
            Ok(_) => {}
            Err(e) => {
                metrics::database_error();
                warn!(error = %e, "lease reaper failed");
                database_was_lost = true;
                continue;
            }
        }
        if let Err(e) = state.store.complete_finished_sweeps().await {
            warn!(error = %e, "sweep completion check failed");
        }
    }
}
