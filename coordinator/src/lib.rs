//! The Fleetmark coordinator as a library: `run(config, listener, shutdown)` serves the agent and
//! sweep APIs on an already bound listener until `shutdown` resolves. The binary and the tests
//! drive this same function.
//!
//! A coordinator keeps no state of its own. Postgres holds agents, sweeps, jobs, leases and
//! results; several coordinators can serve one database, each reaping expired leases and waking
//! its waiting claims when another one queues work (`LISTEN fleetmark_jobs`).

pub mod auth;
mod batch;
pub mod error;
mod gate;
pub mod identity;
mod limits;
pub mod metrics;
mod service;
pub mod store;
mod sweep_events;
pub mod tls;
mod wakeup;

use std::{future::Future, str::FromStr, sync::Arc, time::Duration};

use fleetmark_proto::v1::{
    agent_service_server::AgentServiceServer, sweep_service_server::SweepServiceServer,
    token_service_server::TokenServiceServer,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use error::CoordinatorError;
pub use store::Store;

/// Largest request the coordinator reads (see `fleetmark_core::limits`): a bigger one is
/// refused by tonic from its length prefix, before it is buffered.
pub const MAX_REQUEST_BYTES: usize = fleetmark_core::limits::MAX_REQUEST_BYTES;
/// Largest response the coordinator sends.
pub const MAX_RESPONSE_BYTES: usize = fleetmark_core::limits::MAX_RESPONSE_BYTES;

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
    /// How long a claimed job waits for its agent's first progress report before it returns
    /// to the queue, without costing an attempt (a claim lost on its way to the agent).
    pub claim_grace: Duration,
    /// How often the server pings each connection over HTTP/2; a peer that does not answer
    /// within `keepalive_timeout` is disconnected (a half-open or stuck connection).
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// TCP keepalive probes on every accepted socket, for peers that vanished without a FIN.
    pub tcp_keepalive: Duration,
    /// A connection that has not started its TLS or HTTP/2 handshake within this long is
    /// closed (see `gate`).
    pub preface_timeout: Duration,
    /// Connections allowed to wait for their handshake at once.
    pub max_unstarted_connections: usize,
}

impl Config {
    /// At start-up (and after losing the database) a coordinator renews the leases of agents
    /// heard from within this long before the service stopped: three heartbeats, but never
    /// more than a lease.
    pub fn renew_heard_within(&self) -> Duration {
        (self.heartbeat_interval * 3).min(self.lease)
    }
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
            claim_grace: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(20),
            keepalive_timeout: Duration::from_secs(10),
            tcp_keepalive: Duration::from_secs(60),
            preface_timeout: Duration::from_secs(10),
            max_unstarted_connections: 1024,
        }
    }
}

/// Shared by every request handler.
pub(crate) struct State {
    pub store: Store,
    pub config: Config,
    pub wakeup: Arc<tokio::sync::Notify>,
    pub sweep_events: sweep_events::SweepEvents,
    pub shutdown: CancellationToken,
    pub limits: limits::Limits,
    pub metrics: metrics::Metrics,
    /// Statements shared by concurrent requests (see `batch`).
    pub batches: batch::Batches,
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
    let tls = config
        .tls
        .as_ref()
        .map(tls::ServerTls::config)
        .transpose()?;
    let store = connect_with_retry(&config)
        .await?
        .with_claim_grace(config.claim_grace);
    store.migrate().await?;
    if !store.autovacuum_on().await? {
        warn!("postgres autovacuum is off: finished jobs' dead rows are never reclaimed and dispatch slows as they pile up; turn it on (ALTER SYSTEM SET autovacuum = on)");
    }
    let addr = listener.local_addr().ok();
    info!(addr = ?addr, lease_ms = config.lease.as_millis() as u64, tls = config.tls.is_some(),
          "coordinator listening");

    let token = CancellationToken::new();
    let metrics_registry = metrics::Metrics::new();
    let batches = batch::Batches::start(&store, config.lease, &metrics_registry.batch_items);
    let state = Arc::new(State {
        store: store.clone(),
        config: config.clone(),
        wakeup: Arc::new(tokio::sync::Notify::new()),
        sweep_events: sweep_events::SweepEvents::new(),
        shutdown: token.clone(),
        limits: limits::Limits::new(&config),
        metrics: metrics_registry,
        batches,
    });
    let mut background = vec![
        tokio::spawn(reaper(state.clone())),
        tokio::spawn(wakeup::listen(state.clone())),
        tokio::spawn(sweep_events::publish(state.clone())),
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

    // Health (grpc.health.v1) and reflection answer without a token: load balancers, probes and
    // tools such as grpcurl use them, and they reveal nothing that the published .proto does
    // not (docs/security.md).
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<AgentServiceServer<service::AgentApi>>()
        .await;
    health_reporter
        .set_serving::<SweepServiceServer<service::SweepApi>>()
        .await;
    health_reporter
        .set_serving::<TokenServiceServer<service::TokenApi>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(fleetmark_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| CoordinatorError::InvalidArgument(format!("reflection: {e}")))?;

    let agents = AgentServiceServer::new(service::AgentApi(state.clone()))
        .max_decoding_message_size(MAX_REQUEST_BYTES)
        .max_encoding_message_size(MAX_RESPONSE_BYTES);
    let sweeps = SweepServiceServer::new(service::SweepApi(state.clone()))
        .max_decoding_message_size(MAX_REQUEST_BYTES)
        .max_encoding_message_size(MAX_RESPONSE_BYTES);
    let tokens = TokenServiceServer::new(service::TokenApi(state.clone()));
    let stop = token.clone();
    // A peer that stops answering pings (a hung or vanished agent) has its connection and long
    // polls dropped.
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(config.keepalive_interval))
        .http2_keepalive_timeout(Some(config.keepalive_timeout));
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls)
            .map_err(|e| CoordinatorError::Config(format!("TLS: {e}")))?;
    }
    // Every call of the three Fleetmark services checks its own credential (`auth::authorize`);
    // health and reflection answer anyone (docs/security.md says why).
    let served = builder
        .add_service(health)
        .add_service(reflection)
        .add_service(agents)
        .add_service(sweeps)
        .add_service(tokens)
        .serve_with_incoming_shutdown(
            gate::admit(
                listener,
                gate::GateConfig {
                    preface_timeout: config.preface_timeout,
                    max_unstarted: config.max_unstarted_connections,
                    tcp_keepalive: config.tcp_keepalive,
                },
            ),
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
/// At start-up and after losing the database, the first thing the reaper does is renew the
/// leases of agents that were heard from just before the outage: they kept working but could
/// not report, and reaping them the moment the database is back would throw their work away.
/// Agents that had gone quiet before it get nothing, so a coordinator restarting in a loop
/// never keeps a dead agent's job leased. Each tick also records that a coordinator is serving
/// (`mark_alive`), which is what "before the outage" is measured from.
async fn reaper(state: Arc<State>) {
    let mut tick = tokio::time::interval(state.config.reap_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut database_was_lost = true;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = state.shutdown.cancelled() => return,
        }
        if database_was_lost {
            match renew_after_outage(&state).await {
                Ok(()) => database_was_lost = false,
                Err(e) => {
                    metrics::database_error();
                    warn!(error = %e, "database still unavailable");
                    continue;
                }
            }
        }
        if let Err(e) = state.store.mark_alive().await {
            warn!(error = %e, "lease reaper failed");
            database_was_lost = true;
            continue;
        }
        match state.store.expire_leases(None).await {
            Ok(expired) if !expired.is_empty() => {
                info!(jobs = ?expired, "leases expired or claims unacknowledged, jobs requeued");
                state.wakeup.notify_waiters();
                state.sweep_events.changed(uuid::Uuid::nil());
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

async fn renew_after_outage(state: &State) -> Result<(), CoordinatorError> {
    let n = state
        .store
        .extend_running_leases(state.config.lease, state.config.renew_heard_within())
        .await?;
    if n > 0 {
        info!(
            jobs = n,
            "running leases of recently heard agents renewed after start-up or a database outage"
        );
    }
    Ok(())
}
