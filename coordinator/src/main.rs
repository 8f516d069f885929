//! `fleetmark-coordinator`: parses flags and runs the coordinator library until Ctrl-C/SIGTERM;
//! `tls init` makes a private CA and certificates; `token create` makes the first admin token
//! from the database side.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context;
use clap::{Parser, Subcommand};
use fleetmark_coordinator::{auth::Role, run_with_metrics, tls::ServerTls, Config, Store};
use fleetmark_core::logging::{init_logging, LogFormat, LogSettings};

#[derive(Debug, Parser)]
#[command(
    name = "fleetmark-coordinator",
    version,
    about = "Hands benchmark jobs to Fleetmark agents and stores results in Postgres",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(flatten)]
    serve: Args,
    /// Log format on stderr: text (colour only on a terminal, never with NO_COLOR) or json.
    #[arg(
        long,
        global = true,
        env = "FLEETMARK_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// TLS set-up.
    #[command(subcommand)]
    Tls(TlsCommand),
    /// API tokens, straight in the database (for the first admin token; afterwards use
    /// `fleetmark token` with an admin token).
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Debug, Subcommand)]
enum TlsCommand {
    /// Write a private CA, a server certificate and an agent client certificate into DIR.
    Init {
        dir: PathBuf,
        /// Names and addresses the coordinator is reached by (repeat the flag).
        #[arg(long = "host", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        hosts: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a token and print its secret (shown once) on stdout.
    Create {
        #[arg(long, value_parser = parse_role)]
        role: Role,
        #[arg(long)]
        name: Option<String>,
        /// Lifetime, such as 30d or 12h. Without it the token lasts until revoked.
        #[arg(long, value_parser = humantime::parse_duration)]
        expires: Option<Duration>,
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
    },
}

fn parse_role(s: &str) -> Result<Role, String> {
    s.parse()
}

#[derive(Debug, clap::Args)]
struct Args {
    /// Address to listen on for agents and the CLI.
    #[arg(long, env = "FLEETMARK_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Postgres URL. Migrations are applied at start-up.
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// Serve TLS with this certificate (PEM). Needs --tls-key.
    #[arg(long, env = "FLEETMARK_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, env = "FLEETMARK_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require agents to present a client certificate signed by this CA (mutual TLS).
    #[arg(long, env = "FLEETMARK_CLIENT_CA", requires = "tls_cert")]
    client_ca: Option<PathBuf>,
    /// Registrations each token may make per minute.
    #[arg(long, default_value_t = 60)]
    register_per_minute: u32,
    /// Sweeps each token may submit per minute.
    #[arg(long, default_value_t = 60)]
    submit_per_minute: u32,
    /// Pending jobs one submitter token may have queued at once.
    #[arg(long, default_value_t = 100_000)]
    max_pending_jobs: u64,
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
    /// How long a pinged connection may take to answer before it is closed.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    keepalive_timeout: Duration,
    /// A connection that has not begun its TLS or HTTP/2 handshake within this long is closed.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    preface_timeout: Duration,
    /// Serve Prometheus metrics at http://ADDR/metrics (plain HTTP, no token: keep it private).
    #[arg(long, env = "FLEETMARK_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
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
    let cli = Cli::parse();
    start_logging(cli.log_format, "info,sqlx=warn");
    match cli.command {
        None => serve(cli.serve).await,
        Some(Command::Tls(TlsCommand::Init { dir, hosts })) => tls_init(&dir, &hosts),
        Some(Command::Token(TokenCommand::Create {
            role,
            name,
            expires,
            database_url,
        })) => token_create(role, name, expires, &database_url).await,
    }
}

fn tls_init(dir: &Path, hosts: &[String]) -> anyhow::Result<()> {
    let out = fleetmark_coordinator::tls::init(dir, hosts)?;
    eprintln!(
        "wrote a private CA ({}), a server certificate for {} ({}) and an agent client \
         certificate ({}).",
        out.ca_cert.display(),
        hosts.join(", "),
        out.server_cert.display(),
        out.agent_cert.display()
    );
    eprintln!(
        "keep {} offline; it signs everything.",
        out.ca_key.display()
    );
    eprintln!("coordinator:");
    eprintln!(
        "  fleetmark-coordinator --listen 0.0.0.0:7070 --tls-cert {} --tls-key {} [--client-ca {}]",
        out.server_cert.display(),
        out.server_key.display(),
        out.ca_cert.display()
    );
    eprintln!("agents (copy ca.crt, and agent.crt/agent.key for --client-ca) and the CLI:");
    eprintln!(
        "  fleetmark-agent --coordinator https://{}:7070 --ca-cert ca.crt [--tls-cert agent.crt --tls-key agent.key] --token <agent token>",
        hosts[0]
    );
    eprintln!(
        "  fleetmark --coordinator https://{}:7070 --ca-cert ca.crt --token <token> sweeps",
        hosts[0]
    );
    Ok(())
}

async fn token_create(
    role: Role,
    name: Option<String>,
    expires: Option<Duration>,
    database_url: &str,
) -> anyhow::Result<()> {
    let store = Store::connect(database_url, 2)
        .await
        .context("cannot connect to the database")?;
    store.migrate().await.context("migrations")?;
    let expires_at = expires
        .map(|d| chrono::Duration::from_std(d).map(|d| chrono::Utc::now() + d))
        .transpose()
        .context("--expires is too long")?;
    let name = name.unwrap_or_else(|| format!("{role} token"));
    let (info, secret) = store.create_token(&name, role, expires_at, None).await?;
    eprintln!(
        "created {role} token {} ('{}'){}; its secret is below and is shown only this once",
        info.id,
        info.name,
        info.expires_at
            .map(|t| format!(", expiring {}", t.to_rfc3339()))
            .unwrap_or_default()
    );
    println!("{secret}");
    Ok(())
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let database_url = args
        .database_url
        .clone()
        .ok_or_else(|| anyhow::anyhow!("no database: pass --database-url (or set DATABASE_URL)"))?;
    for (flag, d) in [
        ("--lease", args.lease),
        ("--heartbeat", args.heartbeat),
        ("--reap-interval", args.reap_interval),
        ("--claim-grace", args.claim_grace),
        ("--keepalive-interval", args.keepalive_interval),
        ("--keepalive-timeout", args.keepalive_timeout),
        ("--preface-timeout", args.preface_timeout),
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
    let mut config = Config::new(database_url);
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        config.tls = Some(ServerTls::from_files(cert, key, args.client_ca.as_deref())?);
    } else if !args.listen.ip().is_loopback() {
        tracing::warn!(listen = %args.listen,
            "serving plaintext on a non-loopback address: tokens cross the network readable; use --tls-cert/--tls-key");
    }
    config.register_per_minute = args.register_per_minute;
    config.submit_per_minute = args.submit_per_minute;
    config.max_pending_jobs = args.max_pending_jobs;
    config.lease = args.lease;
    config.heartbeat_interval = args.heartbeat;
    config.reap_interval = args.reap_interval;
    config.max_db_connections = args.db_connections;
    config.claim_grace = args.claim_grace;
    config.keepalive_interval = args.keepalive_interval;
    config.keepalive_timeout = args.keepalive_timeout;
    config.preface_timeout = args.preface_timeout;
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
