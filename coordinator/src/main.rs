//! `fleetmark-coordinator`: parses flags and runs the coordinator library until Ctrl-C/SIGTERM.

use std::{net::SocketAddr, time::Duration};

use anyhow::Context;
use clap::Parser;
use fleetmark_coordinator::{run_with_metrics, Config};
use fleetmark_core::logging::{init_logging, LogFormat, LogSettings};

#[derive(Debug, Parser)]
#[command(
    name = "fleetmark-coordinator",
    version,
    about = "Hands benchmark jobs to Fleetmark agents and stores results in Postgres"
)]
struct Args {
    /// Address to listen on for agents and the CLI.
    #[arg(long, env = "FLEETMARK_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Postgres URL. Migrations are applied at start-up.
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// Require this bearer token on every call.
    #[arg(long, env = "FLEETMARK_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// How long a job's lease lasts without a progress report from its agent.
    #[arg(long, env = "FLEETMARK_LEASE", default_value = "30s", value_parser = humantime::parse_duration)]
    lease: Duration,
    /// How often agents heartbeat and report progress.
    #[arg(long, env = "FLEETMARK_HEARTBEAT", default_value = "2s", value_parser = humantime::parse_duration)]
    heartbeat: Duration,
    /// How often to look for expired leases.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    reap_interval: Duration,
    /// Database connections in the pool.
    #[arg(long, default_value_t = 16)]
    db_connections: u32,
    /// Serve Prometheus metrics at http://ADDR/metrics (plain HTTP, no token: keep it private).
    #[arg(long, env = "FLEETMARK_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Log format: text (colour only on a terminal, never with NO_COLOR) or json.
    #[arg(long, env = "FLEETMARK_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
}

/// The binaries' shared logging set-up, fed from this process's environment.
fn start_logging(format: LogFormat, default_filter: &'static str) {
    init_logging(&LogSettings {
        format,
        filter: std::env::var("RUST_LOG").unwrap_or_else(|_| default_filter.to_string()),
        fallback_filter: default_filter,
        no_color: std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty()),
    });
}

fn main() -> std::process::ExitCode {
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(real_main()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The cause chain on one line; no backtrace for configuration mistakes.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn real_main() -> anyhow::Result<()> {
    let args = Args::parse();
    start_logging(args.log_format, "info,sqlx=warn");
    for (flag, d) in [
        ("--lease", args.lease),
        ("--heartbeat", args.heartbeat),
        ("--reap-interval", args.reap_interval),
    ] {
        if d.is_zero() {
            anyhow::bail!("{flag} must be longer than zero");
        }
    }
    if args.lease > Duration::from_secs(24 * 3600) || args.heartbeat > Duration::from_secs(3600) {
        anyhow::bail!("--lease is limited to a day and --heartbeat to an hour");
    }
    if args.heartbeat * 2 > args.lease {
        anyhow::bail!(
            "the lease ({}) must be at least twice the heartbeat ({}), or healthy agents lose their jobs",
            humantime::format_duration(args.lease),
            humantime::format_duration(args.heartbeat)
        );
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let metrics = match args.metrics_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for metrics on {addr}"))?,
        ),
        None => None,
    };
    let mut config = Config::new(args.database_url);
    config.token = args.token;
    config.lease = args.lease;
    config.heartbeat_interval = args.heartbeat;
    config.reap_interval = args.reap_interval;
    config.max_db_connections = args.db_connections;
    run_with_metrics(config, listener, metrics, shutdown_signal())
        .await
        .context("coordinator failed")
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install the SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}
