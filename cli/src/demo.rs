//! `fleetmark demo`: the whole system on one machine with no set-up. It finds a database (or
//! starts a private PostgreSQL cluster), starts a coordinator on a loopback port and two CPU
//! agents, submits a small ResNet18 sweep, shows its progress and results, and shuts down.
//!
//! The coordinator and agents run in this process through the same `run` functions their
//! binaries call; they still talk over real gRPC on a real socket.

use std::{process::ExitCode, time::Duration};

use clap::Args;
use fleetmark_coordinator::auth::Role;
use fleetmark_core::localpg::LocalPostgres;
use fleetmark_proto::v1 as pb;
use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::{
    compare, emit, output, CliError, Connection as Conn, Format, Remote, SubmitArgs, View,
};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How many CPU agents to start.
    #[arg(long, default_value_t = 2)]
    pub agents: usize,
    /// Batch sizes, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub batch: Vec<u64>,
    /// Precisions: f32, f16, bf16, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "f32")]
    pub precision: Vec<String>,
    /// Input images are this many pixels square.
    #[arg(long, default_value_t = 224)]
    pub image_size: u32,
    /// Warm-up iterations before timing.
    #[arg(long, default_value_t = 3)]
    pub warmup: u32,
    /// Time at least this many iterations.
    #[arg(long, default_value_t = 10)]
    pub min_iterations: u32,
    /// Time for at least this long, too.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub min_duration: Duration,
    /// Where the private PostgreSQL cluster lives when DATABASE_URL is not set.
    #[arg(long)]
    pub data_dir: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub view: View,
}

/// The database to use: DATABASE_URL, or a private cluster we start (and stop afterwards).
async fn database(args: &DemoArgs) -> Result<(String, Option<LocalPostgres>), CliError> {
    if let Ok(url) = std::env::var("DATABASE_URL") {
        crate::note!("using DATABASE_URL");
        return Ok((url, None));
    }
    let dir = args
        .data_dir
        .clone()
        .unwrap_or_else(LocalPostgres::default_data_dir);
    crate::note!(
        "DATABASE_URL is not set: starting a private PostgreSQL cluster in {}",
        dir.display()
    );
    let pg = tokio::task::spawn_blocking(move || LocalPostgres::start(&dir))
        .await
        .map_err(|e| CliError::Other(e.to_string()))?
        .map_err(|e| CliError::Other(e.to_string()))?;
    // A database of our own inside the cluster.
    let mut conn = PgConnection::connect(&pg.url())
        .await
        .map_err(|e| CliError::Other(format!("cannot connect to the private cluster: {e}")))?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'fleetmark')")
            .fetch_one(&mut conn)
            .await
            .map_err(|e| CliError::Other(e.to_string()))?;
    if !exists {
        sqlx::query("CREATE DATABASE fleetmark")
            .execute(&mut conn)
            .await
            .map_err(|e| CliError::Other(e.to_string()))?;
    }
    let url = format!("postgres://postgres@127.0.0.1:{}/fleetmark", pg.port);
    Ok((url, Some(pg)))
}

pub async fn run(args: DemoArgs) -> Result<ExitCode, CliError> {
    if args.agents == 0 {
        return Err(CliError::Input("--agents must be at least 1".into()));
    }
    let (db_url, private) = database(&args).await?;
    let outcome = run_with_database(&args, &db_url).await;
    if let Some(pg) = private {
        crate::note!(
            "stopping the private PostgreSQL cluster (its data stays in {})",
            pg.data_dir.display()
        );
        let _ = tokio::task::spawn_blocking(move || pg.stop()).await;
    }
    outcome
}

/// A submitter token for the demo's CLI side and an agent token for its agents, made straight
/// in the database as `fleetmark-coordinator token create` would. They expire in a day.
async fn demo_tokens(db_url: &str) -> Result<(String, String), CliError> {
    let e = |e: fleetmark_coordinator::CoordinatorError| CliError::Other(e.to_string());
    let store = fleetmark_coordinator::Store::connect(db_url, 2)
        .await
        .map_err(e)?;
    store.migrate().await.map_err(e)?;
    let expires = Some(chrono::Utc::now() + chrono::Duration::days(1));
    // An earlier demo's agents registered these names with its token: retire it.
    for name in ["demo submitter", "demo agents"] {
        store.revoke_tokens_named(name).await.map_err(e)?;
    }
    let (_, submitter) = store
        .create_token("demo submitter", Role::Submitter, expires, None)
        .await
        .map_err(e)?;
    let (_, agent) = store
        .create_token("demo agents", Role::Agent, expires, None)
        .await
        .map_err(e)?;
    store.pool().close().await;
    Ok((submitter, agent))
}

async fn run_with_database(args: &DemoArgs, db_url: &str) -> Result<ExitCode, CliError> {
    let (submitter_token, agent_token) = demo_tokens(db_url).await?;
    let stop = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| CliError::Other(format!("cannot bind a loopback port: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| CliError::Other(e.to_string()))?;
    let url = format!("http://{addr}");
    crate::note!("coordinator on {url}");
    let coordinator = {
        let stop = stop.clone();
        let config = fleetmark_coordinator::Config::new(db_url);
        tokio::spawn(async move {
            fleetmark_coordinator::run(config, listener, async move { stop.cancelled().await })
                .await
        })
    };
    let mut agents = Vec::new();
    for i in 1..=args.agents {
        let stop = stop.clone();
        let mut config = fleetmark_agent::Config::new(url.clone(), format!("demo-cpu-{i}"));
        config.token = Some(agent_token.clone());
        config.labels.insert("demo".into(), "true".into());
        agents.push(tokio::spawn(async move {
            fleetmark_agent::run(config, async move { stop.cancelled().await }).await
        }));
    }
    crate::note!(
        "{} CPU agents started; they share this machine's cores, so their numbers are not independent",
        args.agents
    );
    let work = async {
        let conn = Conn::new(url.clone(), Some(submitter_token.clone()));
        let mut remote = Remote::new(&conn)?;
        wait_for_agents(&mut remote, args.agents).await?;
        let submit = SubmitArgs {
            file: None,
            name: Some("demo".into()),
            model: "resnet18".into(),
            batch: args.batch.clone(),
            precision: args.precision.clone(),
            gpu: vec!["any".into()],
            image_size: args.image_size,
            warmup: args.warmup,
            warmup_duration: Duration::from_millis(500),
            min_iterations: args.min_iterations,
            min_duration: args.min_duration,
            max_duration: Duration::from_secs(60),
            // Two agents share this machine's cores, so allow perf_analyzer's 10% over
            // half-second windows: the demo should finish in seconds, not at max_duration.
            stability_windows: 3,
            stability_window: Duration::from_millis(500),
            stability_tolerance: 0.10,
            max_iterations: fleetmark_core::job::MAX_ITERATIONS_LIMIT,
            preset: None,
            repetitions: 1,
            engine: "auto".into(),
            seed: 0,
            time_input_copy: false,
            watch: true,
        };
        let resp = crate::submit(&mut remote, submit.to_toml()?).await?;
        crate::note!("submitted sweep {} with {} jobs", resp.sweep_id, resp.jobs);
        let ok = crate::watch::watch(&mut remote, &resp.sweep_id).await?;
        let results = crate::fetch_results(
            &mut remote,
            pb::ListResultsRequest {
                sweep_id: resp.sweep_id.clone(),
                omit_latencies: args.view.format != Format::Json,
                ..Default::default()
            },
        )
        .await?;
        emit(&output::results(&results, args.view))?;
        if args.view.format == Format::Table {
            let records: Vec<_> = results.into_iter().map(|l| l.result).collect();
            if let Ok((cols, rows)) = compare::build(&records, None) {
                emit("Throughput by hardware (fleetmark compare):\n")?;
                emit(&compare::render(&cols, &rows, args.view))?;
            }
            crate::note!("sweep id: {}", resp.sweep_id);
        }
        Ok::<bool, CliError>(ok)
    };
    // If the coordinator dies (say, the database refused it), stop at once with its error.
    let mut coordinator = coordinator;
    let (outcome, coordinator_done) = tokio::select! {
        o = work => (o, None),
        c = &mut coordinator => (
            Err(CliError::Other(match &c {
                Ok(Err(e)) => format!("the coordinator stopped: {e}"),
                Ok(Ok(())) => "the coordinator stopped".into(),
                Err(e) => format!("the coordinator task failed: {e}"),
            })),
            Some(c),
        ),
    };
    info!("demo finished, shutting down");
    stop.cancel();
    for a in agents {
        if let Ok(Err(e)) = a.await {
            crate::note!("agent: {e}");
        }
    }
    if coordinator_done.is_none() {
        match coordinator.await {
            Ok(Err(e)) => crate::note!("coordinator: {e}"),
            Err(e) => crate::note!("coordinator task: {e}"),
            Ok(Ok(())) => {}
        }
    }
    let ok = outcome?;
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn wait_for_agents(remote: &mut Remote, n: usize) -> Result<(), CliError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match remote.client.list_agents(pb::ListAgentsRequest {}).await {
            Ok(r) => {
                let online = r
                    .into_inner()
                    .agents
                    .iter()
                    .filter(|a| a.state == "online" && a.name.starts_with("demo-cpu-"))
                    .count();
                if online >= n {
                    return Ok(());
                }
            }
            Err(s) if tokio::time::Instant::now() > deadline => return Err(remote.err(s)),
            Err(_) => {}
        }
        if tokio::time::Instant::now() > deadline {
            return Err(CliError::Other(
                "the demo agents did not register within a minute".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
