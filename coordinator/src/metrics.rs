//! Prometheus metrics for the coordinator, served over plain HTTP at `/metrics` on their own
//! address (`--metrics-listen`), apart from the gRPC port.
//!
//! Counts that live in the database (agents by state, jobs by state) are read at scrape time, so
//! every coordinator sharing a database reports the same numbers and nothing drifts. Events
//! (dispatches, results ingested, database errors) are counted by this coordinator as they
//! happen.

use std::{sync::Arc, sync::LazyLock, time::Duration};

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::store::Store;

/// Database errors seen by any handler in this process. It lives outside [`Metrics`] because
/// errors are counted where they are mapped to a gRPC status, which has no handle on state.
static DATABASE_ERRORS: LazyLock<IntCounter> = LazyLock::new(|| {
    IntCounter::new(
        "fleetmark_database_errors_total",
        "Database errors met while answering calls (this process).",
    )
    .expect("a valid metric")
});

/// Counts one database error; called from the error mapping.
pub(crate) fn database_error() {
    DATABASE_ERRORS.inc();
}

/// Dispatch latency buckets, in seconds: a claim statement takes milliseconds when healthy.
const DISPATCH_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

pub struct Metrics {
    registry: Registry,
    agents: IntGaugeVec,
    jobs: IntGaugeVec,
    pub(crate) dispatch: HistogramVec,
    pub(crate) results: IntCounterVec,
    /// Items per shared statement (`batch`), by kind of statement.
    pub(crate) batch_items: HistogramVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let agents = IntGaugeVec::new(
            Opts::new(
                "fleetmark_agents",
                "Agents by state (online, offline, imported).",
            ),
            &["state"],
        )
        .expect("a valid metric");
        let jobs = IntGaugeVec::new(Opts::new("fleetmark_jobs", "Jobs by state."), &["state"])
            .expect("a valid metric");
        let dispatch = HistogramVec::new(
            HistogramOpts::new(
                "fleetmark_dispatch_seconds",
                "Time to pick and lease a job in the database, for claims that got one.",
            )
            .buckets(DISPATCH_BUCKETS.to_vec()),
            &["kind"],
        )
        .expect("a valid metric");
        let results = IntCounterVec::new(
            Opts::new(
                "fleetmark_results_ingested_total",
                "Results stored by this coordinator, by source (agent, import).",
            ),
            &["source"],
        )
        .expect("a valid metric");
        let batch_items = HistogramVec::new(
            HistogramOpts::new(
                "fleetmark_batch_items",
                "Requests per shared database statement (progress reports, results).",
            )
            .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]),
            &["statement"],
        )
        .expect("a valid metric");
        for c in [
            Box::new(agents.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(batch_items.clone()),
            Box::new(jobs.clone()),
            Box::new(dispatch.clone()),
            Box::new(results.clone()),
            Box::new(DATABASE_ERRORS.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Metrics {
            registry,
            agents,
            jobs,
            dispatch,
            results,
            batch_items,
        }
    }

    /// Reads the database-held counts, then renders every metric in the text exposition format.
    pub async fn render(&self, store: &Store, online_window: Duration) -> String {
        match store.job_counts().await {
            Ok(counts) => {
                self.jobs.reset();
                for state in ["pending", "running", "succeeded", "failed", "cancelled"] {
                    let n = counts.iter().find(|(s, _)| s == state).map_or(0, |c| c.1);
                    self.jobs.with_label_values(&[state]).set(n);
                }
            }
            Err(e) => {
                database_error();
                warn!(error = %e, "metrics: cannot count jobs");
            }
        }
        match store.list_agents(online_window).await {
            Ok(agents) => {
                let count = |f: &dyn Fn(&crate::store::AgentRow) -> bool| {
                    agents.iter().filter(|a| f(a)).count() as i64
                };
                let imported = count(&|a| a.origin == "imported");
                let online = count(&|a| a.origin != "imported" && a.online);
                let offline = agents.len() as i64 - imported - online;
                self.agents.with_label_values(&["online"]).set(online);
                self.agents.with_label_values(&["offline"]).set(offline);
                self.agents.with_label_values(&["imported"]).set(imported);
            }
            Err(e) => {
                database_error();
                warn!(error = %e, "metrics: cannot count agents");
            }
        }
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            warn!(error = %e, "metrics: cannot encode");
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Serves `GET /metrics` on `listener` until `stop` fires.
pub(crate) async fn serve(
    listener: TcpListener,
    state: Arc<crate::State>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    use axum::{extract::State as AxState, routing::get, Router};
    async fn metrics(
        AxState(state): AxState<Arc<crate::State>>,
    ) -> impl axum::response::IntoResponse {
        let window = crate::online_window(&state.config);
        let body = state.metrics.render(&state.store, window).await;
        (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            body,
        )
    }
    let app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
}
