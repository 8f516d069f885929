//! The Fleetmark coordinator as a library: `run(config, listener, shutdown)` serves the agent and
//! sweep APIs on an already bound listener until `shutdown` resolves. The binary and the tests
//! drive this same function.
//!
//! A coordinator keeps no state of its own. Postgres holds agents, sweeps, jobs, leases and
//! results; several coordinators can serve one database, each reaping expired leases and waking
//! its waiting claims when another one queues work (`LISTEN fleetmark_jobs`).

pub mod auth;
pub mod error;
pub mod identity;
mod limits;
mod service;
pub mod store;
pub mod tls;
mod wakeup;

use std::{future::Future, sync::Arc, time::Duration};

use fleetmark_proto::v1::{
    agent_service_server::AgentServiceServer, sweep_service_server::SweepServiceServer,
    token_service_server::TokenServiceServer,
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
    /// Serve TLS with this certificate (and require agents' client certificates if it has a
    /// client CA). Plaintext when `None`.
    pub tls: Option<tls::ServerTls>,
    /// Registrations each token may make per minute (per coordinator).
    pub register_per_minute: u32,
    /// Sweeps each token may submit per minute (per coordinator).
    pub submit_per_minute: u32,
    /// Pending jobs one submitter token may have queued at once.
    pub max_pending_jobs: u64,
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
            tls: None,
            register_per_minute: 60,
            submit_per_minute: 60,
            max_pending_jobs: 100_000,
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
    pub limits: limits::Limits,
}

/// Connects, migrates, and serves until `shutdown` resolves.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), CoordinatorError> {
    let tls = config
        .tls
        .as_ref()
        .map(tls::ServerTls::config)
        .transpose()?;
    let store = connect_with_retry(&config).await?;
    store.migrate().await?;
    let addr = listener.local_addr().ok();
    info!(addr = ?addr, lease_ms = config.lease.as_millis() as u64, tls = config.tls.is_some(),
          "coordinator listening");

    let token = CancellationToken::new();
    let state = Arc::new(State {
        store: store.clone(),
        config: config.clone(),
        wakeup: Arc::new(tokio::sync::Notify::new()),
        shutdown: token.clone(),
        limits: limits::Limits::new(&config),
    });
    let background = [
        tokio::spawn(reaper(state.clone())),
        tokio::spawn(wakeup::listen(state.clone())),
    ];

    let agents = AgentServiceServer::new(service::AgentApi(state.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let sweeps = SweepServiceServer::new(service::SweepApi(state.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let tokens = TokenServiceServer::new(service::TokenApi(state.clone()));
    let stop = token.clone();
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls)
            .map_err(|e| CoordinatorError::Config(format!("TLS: {e}")))?;
    }
    let served = builder
        .add_service(agents)
        .add_service(sweeps)
        .add_service(tokens)
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

async fn connect_with_retry(config: &Config) -> Result<Store, CoordinatorError> {
    let deadline = tokio::time::Instant::now() + config.startup_timeout;
    let mut delay = Duration::from_millis(200);
    loop {
        match Store::connect(&config.database_url, config.max_db_connections).await {
            Ok(store) => return Ok(store),
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
