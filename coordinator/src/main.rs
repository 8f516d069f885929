//! `fleetmark-coordinator`: parses flags and runs the coordinator library until Ctrl-C/SIGTERM.

use std::{net::SocketAddr, time::Duration};

use anyhow::Context;
use clap::Parser;
use fleetmark_coordinator::{run, Config};

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
    /// How long a claimed job waits for its agent's first progress report before it returns to
    /// the queue without costing an attempt (a claim lost on the way to the agent).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    claim_grace: Duration,
    /// Database connections in the pool.
    #[arg(long, default_value_t = 16)]
    db_connections: u32,
    /// How often to ping each client connection; one that does not answer within
    /// --keepalive-timeout is closed.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    keepalive_interval: Duration,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    keepalive_timeout: Duration,
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    for (flag, d) in [
        ("--lease", args.lease),
        ("--heartbeat", args.heartbeat),
        ("--reap-interval", args.reap_interval),
        ("--claim-grace", args.claim_grace),
        ("--keepalive-interval", args.keepalive_interval),
        ("--keepalive-timeout", args.keepalive_timeout),
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
    let mut config = Config::new(args.database_url);
    config.token = args.token;
    config.lease = args.lease;
    config.heartbeat_interval = args.heartbeat;
    config.reap_interval = args.reap_interval;
    config.max_db_connections = args.db_connections;
    config.claim_grace = args.claim_grace;
    config.keepalive_interval = args.keepalive_interval;
    config.keepalive_timeout = args.keepalive_timeout;
    run(config, listener, shutdown_signal())
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
