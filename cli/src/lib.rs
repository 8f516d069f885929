//! The `fleetmark` command line. Data goes to stdout (as a table, CSV or JSON), logs and
//! progress to stderr. Every command that talks to a coordinator takes `--coordinator URL`.

pub mod compare;
pub mod demo;
pub mod output;
pub mod tokens;
pub mod watch;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};
use fleetmark_core::{
    BenchResult, EnginePath, Fraction, HardwareTarget, MeasurementSpec, Precision, SweepSpec,
    WeightsSpec,
};
use fleetmark_proto::{
    client::{sweep_client_with, Deadlines, SweepClient},
    convert::{parse_uuid, result_without_latencies},
    secure::ClientTls,
    v1 as pb,
};
use thiserror::Error;
use tonic::{Code, Status};

pub const DEFAULT_COORDINATOR: &str = "http://127.0.0.1:7070";

#[derive(Debug, Error)]
pub enum CliError {
    #[error("{0}")]
    Input(String),
    #[error("cannot reach the coordinator at {url}: {detail}. Is it running? Check --coordinator or FLEETMARK_COORDINATOR")]
    Unreachable { url: String, detail: String },
    #[error("the coordinator at {url} is up but cannot reach its database ({detail}); retry once the database is back")]
    DatabaseUnavailable { url: String, detail: String },
    #[error("the coordinator refused the request: {0}")]
    Unauthenticated(String),
    #[error("this token may not do that: {0}")]
    PermissionDenied(String),
    #[error("the coordinator is refusing more for now: {0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    NotFound(String),
    #[error("the coordinator rejected the request: {0}")]
    Rejected(String),
    #[error("coordinator error: {0}")]
    Remote(String),
    #[error("{0}")]
    Other(String),
}

impl CliError {
    pub fn from_status(url: &str, s: Status) -> Self {
        match s.code() {
            // The coordinator answered, so it is reachable: its database is not.
            Code::Unavailable if s.message().starts_with("database unavailable") => {
                CliError::DatabaseUnavailable {
                    url: url.to_string(),
                    detail: s.message().to_string(),
                }
            }
            Code::Unavailable | Code::Unknown | Code::DeadlineExceeded => CliError::Unreachable {
                url: url.to_string(),
                detail: s.message().to_string(),
            },
            Code::Unauthenticated => CliError::Unauthenticated(s.message().to_string()),
            Code::PermissionDenied => CliError::PermissionDenied(s.message().to_string()),
            Code::ResourceExhausted => CliError::ResourceExhausted(s.message().to_string()),
            Code::NotFound => CliError::NotFound(s.message().to_string()),
            Code::InvalidArgument | Code::FailedPrecondition => {
                CliError::Rejected(s.message().to_string())
            }
            _ => CliError::Remote(s.message().to_string()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
}

#[derive(Debug, Parser)]
#[command(
    name = "fleetmark",
    version,
    about = "Benchmark GPU inference across a fleet of machines"
)]
pub struct Cli {
    #[command(flatten)]
    pub conn: Connection,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Args)]
pub struct Connection {
    /// The coordinator to talk to. Several, comma-separated (or a name that resolves to
    /// several addresses): the next is tried when one cannot be reached.
    #[arg(long, global = true, env = "FLEETMARK_COORDINATOR", default_value = DEFAULT_COORDINATOR)]
    pub coordinator: String,
    /// Deadline of each call to the coordinator.
    #[arg(long, global = true, default_value = "15s", value_parser = humantime::parse_duration)]
    pub call_timeout: std::time::Duration,
    /// API token (`fleetmark-coordinator token create` / `fleetmark token create`).
    #[arg(long, global = true, env = "FLEETMARK_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Trust this CA (PEM) for an https:// coordinator instead of the system roots.
    #[arg(long, global = true, env = "FLEETMARK_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Allow plaintext http:// to a coordinator that is not on a loopback address. The token
    /// then crosses the network unencrypted.
    #[arg(long, global = true)]
    pub insecure: bool,
}

impl Connection {
    /// A connection to `url` with `token`, no CA and no `--insecure`.
    pub fn new(url: impl Into<String>, token: Option<String>) -> Self {
        Connection {
            coordinator: url.into(),
            call_timeout: fleetmark_proto::client::Deadlines::default().call,
            token,
            ca_cert: None,
            insecure: false,
        }
    }

    /// The TLS settings the flags ask for.
    pub fn tls(&self) -> Result<ClientTls, CliError> {
        ClientTls::from_files(self.ca_cert.as_deref(), None, None, self.insecure)
            .map_err(|e| CliError::Input(e.to_string()))
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a coordinator, two CPU agents and a small sweep on this machine, show the results,
    /// and shut everything down. Uses DATABASE_URL, or starts a private PostgreSQL cluster.
    Demo(demo::DemoArgs),
    /// Submit a sweep, from a TOML file or from flags. Prints the sweep id.
    Submit(SubmitArgs),
    /// Follow a sweep's jobs live until it finishes.
    Watch { sweep_id: String },
    /// A sweep's results.
    Results {
        sweep_id: String,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Compare results across hardware for the same model, precision and batch size.
    Compare(compare::CompareArgs),
    /// The agents the coordinator knows, with their hardware and state.
    Agents {
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Recent sweeps.
    Sweeps {
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Cancel a sweep's unfinished jobs.
    Cancel { sweep_id: String },
    /// API tokens (with an admin token).
    #[command(subcommand)]
    Token(tokens::TokenCommand),
    /// Load result records written by `fleetmark-agent run --out` into the database.
    Import {
        file: PathBuf,
        /// Name of the sweep the records are filed under.
        #[arg(long)]
        name: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// A sweep file (TOML). Flags below are ignored when a file is given.
    #[arg(long, short, conflicts_with = "preset")]
    pub file: Option<PathBuf>,
    /// A named sweep: `t4-article` (ResNet18, batch 1-32, f32 and f16, on t4). Only --gpu and
    /// --name change it; other sweep flags are ignored.
    #[arg(long)]
    pub preset: Option<String>,
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long, default_value = "resnet18")]
    pub model: String,
    /// Batch sizes, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub batch: Vec<u64>,
    /// Precisions: f32, f16, bf16, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "f32")]
    pub precision: Vec<String>,
    /// Hardware: any, gpu, cpu, or GPU kinds such as t4,h100 [default: any; a preset's own].
    #[arg(long, value_delimiter = ',')]
    pub gpu: Vec<String>,
    #[arg(long, default_value_t = 224)]
    pub image_size: u32,
    /// Warm-up iterations before timing.
    #[arg(long, default_value_t = 10)]
    pub warmup: u32,
    /// Warm up for at least this long, too.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    pub warmup_duration: Duration,
    #[arg(long, default_value_t = 50)]
    pub min_iterations: u32,
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub min_duration: Duration,
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub max_duration: Duration,
    /// Timing may stop once this many recent windows agree...
    #[arg(long, default_value_t = fleetmark_core::job::DEFAULT_STABILITY_WINDOWS)]
    pub stability_windows: u32,
    /// ...each window at least this long...
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub stability_window: Duration,
    /// ...and their throughputs within this fraction (max/min - 1; 0.05 = 5%).
    #[arg(long, default_value_t = fleetmark_core::job::DEFAULT_STABILITY_TOLERANCE)]
    pub stability_tolerance: f64,
    /// Stop timing after this many iterations whatever else holds.
    #[arg(long, default_value_t = fleetmark_core::job::MAX_ITERATIONS_LIMIT)]
    pub max_iterations: u32,
    /// Run each point this many times.
    #[arg(long, default_value_t = 1)]
    pub repetitions: u32,
    /// Model implementation: auto, stock or fused.
    #[arg(long, default_value = "auto")]
    pub engine: String,
    /// Seed of the deterministic weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Time the host-to-device input copy separately.
    #[arg(long)]
    pub time_input_copy: bool,
    /// Follow the sweep after submitting it.
    #[arg(long)]
    pub watch: bool,
}

impl SubmitArgs {
    /// The sweep as TOML: the file's text, or one made from the flags (validated either way,
    /// here and again by the coordinator).
    pub fn to_toml(&self) -> Result<String, CliError> {
        if let Some(path) = &self.file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| CliError::Input(format!("cannot read {}: {e}", path.display())))?;
            SweepSpec::from_toml(&text)
                .map_err(|e| CliError::Input(format!("{}: {e}", path.display())))?;
            return Ok(text);
        }
        let gpus = self
            .gpu
            .iter()
            .map(|g| g.parse::<HardwareTarget>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CliError::Input(e.to_string()))?;
        if let Some(preset) = &self.preset {
            let mut spec = SweepSpec::preset(preset).map_err(|e| CliError::Input(e.to_string()))?;
            if !gpus.is_empty() {
                spec.gpus = gpus;
            }
            if self.name.is_some() {
                spec.name = self.name.clone();
            }
            return to_toml(&spec);
        }
        let precisions = self
            .precision
            .iter()
            .map(|p| p.parse::<Precision>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CliError::Input(e.to_string()))?;
        let spec = SweepSpec {
            name: self.name.clone(),
            model: self.model.clone(),
            batch_sizes: self.batch.clone(),
            precisions,
            gpus: if gpus.is_empty() {
                vec![HardwareTarget::Any]
            } else {
                gpus
            },
            image_size: self.image_size,
            repetitions: self.repetitions,
            engine: self
                .engine
                .parse::<EnginePath>()
                .map_err(|e| CliError::Input(e.to_string()))?,
            weights: WeightsSpec::Seeded { seed: self.seed },
            measurement: MeasurementSpec {
                warmup_iterations: self.warmup,
                warmup_duration: self.warmup_duration,
                min_iterations: self.min_iterations,
                min_duration: self.min_duration,
                max_duration: self.max_duration,
                time_input_copy: self.time_input_copy,
                stability_windows: self.stability_windows,
                stability_window: self.stability_window,
                stability_tolerance: Fraction(self.stability_tolerance),
                max_iterations: self.max_iterations,
                percentile_target: None,
            },
        };
        to_toml(&spec)
    }
}

/// A validated sweep as the TOML the coordinator takes.
fn to_toml(spec: &SweepSpec) -> Result<String, CliError> {
    spec.validate()
        .map_err(|e| CliError::Input(e.to_string()))?;
    toml::to_string(spec).map_err(|e| CliError::Other(format!("cannot write the sweep: {e}")))
}

/// A connected client and the URL it talks to, for error messages.
pub struct Remote {
    pub url: String,
    pub client: SweepClient,
}

impl Remote {
    pub fn new(conn: &Connection) -> Result<Self, CliError> {
        let deadlines = Deadlines::default().with_call(conn.call_timeout);
        let client = sweep_client_with(
            &conn.coordinator,
            conn.token.as_deref(),
            deadlines,
            &conn.tls()?,
        )
        .map_err(|e| CliError::Input(e.to_string()))?;
        Ok(Remote {
            url: conn.coordinator.clone(),
            client,
        })
    }

    pub fn err(&self, s: Status) -> CliError {
        CliError::from_status(&self.url, s)
    }
}

fn check_sweep_id(id: &str) -> Result<(), CliError> {
    parse_uuid("sweep id", id.trim())
        .map(|_| ())
        .map_err(|e| CliError::Input(e.to_string()))
}

pub async fn submit(
    remote: &mut Remote,
    toml: String,
) -> Result<pb::SubmitSweepResponse, CliError> {
    remote
        .client
        .submit_sweep(pb::SubmitSweepRequest { spec_toml: toml })
        .await
        .map(|r| r.into_inner())
        .map_err(|s| remote.err(s))
}

/// A sweep's results as domain records, with their ids, fetched page by page.
pub async fn fetch_results(
    remote: &mut Remote,
    mut req: pb::ListResultsRequest,
) -> Result<Vec<(String, String, BenchResult)>, CliError> {
    let mut out = Vec::new();
    loop {
        let resp = remote
            .client
            .list_results(req.clone())
            .await
            .map_err(|s| remote.err(s))?
            .into_inner();
        for s in resp.results {
            let r = s
                .result
                .ok_or_else(|| CliError::Remote("a result without a record".into()))?;
            let r = result_without_latencies(r).map_err(|e| CliError::Remote(e.to_string()))?;
            out.push((s.result_id, s.sweep_id, r));
        }
        if resp.next_page_token.is_empty() {
            return Ok(out);
        }
        req.page_token = resp.next_page_token;
    }
}

/// Runs one command; the exit code says whether it worked.
pub async fn run(cli: Cli) -> Result<ExitCode, CliError> {
    match cli.command {
        Command::Demo(args) => demo::run(args).await,
        Command::Token(cmd) => tokens::run(&cli.conn, cmd).await,
        Command::Submit(args) => {
            let toml = args.to_toml()?;
            let mut remote = Remote::new(&cli.conn)?;
            let resp = submit(&mut remote, toml).await?;
            eprintln!("submitted sweep {} with {} jobs", resp.sweep_id, resp.jobs);
            for w in &resp.warnings {
                eprintln!("warning: {w}");
            }
            println!("{}", resp.sweep_id);
            if args.watch {
                let ok = watch::watch(&mut remote, &resp.sweep_id).await?;
                return Ok(if ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                });
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Watch { sweep_id } => {
            check_sweep_id(&sweep_id)?;
            let mut remote = Remote::new(&cli.conn)?;
            let ok = watch::watch(&mut remote, sweep_id.trim()).await?;
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Results { sweep_id, format } => {
            check_sweep_id(&sweep_id)?;
            let mut remote = Remote::new(&cli.conn)?;
            let results = fetch_results(
                &mut remote,
                pb::ListResultsRequest {
                    sweep_id: sweep_id.trim().to_string(),
                    include_simulated: true,
                    omit_latencies: format != Format::Json,
                    ..Default::default()
                },
            )
            .await?;
            if results.is_empty() {
                eprintln!("no results yet for sweep {}", sweep_id.trim());
            }
            print!("{}", output::results(&results, format));
            Ok(ExitCode::SUCCESS)
        }
        Command::Compare(args) => {
            let mut remote = Remote::new(&cli.conn)?;
            compare::run(&mut remote, args).await
        }
        Command::Agents { format } => {
            let mut remote = Remote::new(&cli.conn)?;
            let agents = remote
                .client
                .list_agents(pb::ListAgentsRequest {})
                .await
                .map_err(|s| remote.err(s))?
                .into_inner()
                .agents;
            print!("{}", output::agents(&agents, format));
            Ok(ExitCode::SUCCESS)
        }
        Command::Sweeps { limit, format } => {
            let mut remote = Remote::new(&cli.conn)?;
            let sweeps = remote
                .client
                .list_sweeps(pb::ListSweepsRequest { limit })
                .await
                .map_err(|s| remote.err(s))?
                .into_inner()
                .sweeps;
            print!("{}", output::sweeps(&sweeps, format));
            Ok(ExitCode::SUCCESS)
        }
        Command::Cancel { sweep_id } => {
            check_sweep_id(&sweep_id)?;
            let mut remote = Remote::new(&cli.conn)?;
            let n = remote
                .client
                .cancel_sweep(pb::CancelSweepRequest {
                    sweep_id: sweep_id.trim().to_string(),
                })
                .await
                .map_err(|s| remote.err(s))?
                .into_inner()
                .cancelled_jobs;
            eprintln!("cancelled {n} unfinished jobs of sweep {}", sweep_id.trim());
            Ok(ExitCode::SUCCESS)
        }
        Command::Import { file, name } => {
            let records = read_records(&file)?;
            let mut remote = Remote::new(&cli.conn)?;
            let name = name.unwrap_or_else(|| {
                format!(
                    "import of {}",
                    file.file_name()
                        .map(|f| f.to_string_lossy().into_owned())
                        .unwrap_or_default()
                )
            });
            let mut sweeps = Vec::new();
            let mut offset = 0;
            for chunk in import_chunks(&records) {
                let resp = remote
                    .client
                    .import_results(pb::ImportResultsRequest {
                        name: name.clone(),
                        results: chunk.to_vec(),
                    })
                    .await
                    .map_err(|s| remote.err(s))?
                    .into_inner();
                for o in &resp.outcomes {
                    eprintln!(
                        "record {}: {}",
                        offset + o.index as usize + 1,
                        describe_outcome(o)
                    );
                }
                offset += chunk.len();
                if !resp.sweep_id.is_empty() {
                    eprintln!(
                        "imported {} results as sweep {}",
                        resp.imported, resp.sweep_id
                    );
                    sweeps.push(resp.sweep_id);
                }
            }
            for s in sweeps {
                println!("{s}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// One line per import outcome, for stderr.
fn describe_outcome(o: &pb::ImportOutcome) -> String {
    use pb::import_outcome::Kind;
    match o.kind() {
        Kind::Imported => format!("imported (result {})", o.result_id),
        Kind::Attached => format!("attached to its job {} (result {})", o.job_id, o.result_id),
        Kind::Duplicate => "duplicate, already stored: nothing added".into(),
        Kind::Stale => format!("stale, not stored: {}", o.reason),
        Kind::Unspecified => "unknown outcome".into(),
    }
}

/// Splits records into requests that each stay well under the coordinator's message limit.
fn import_chunks(records: &[BenchResult]) -> Vec<Vec<pb::BenchResult>> {
    use prost::Message;
    const BUDGET: usize = fleetmark_core::limits::MAX_REQUEST_BYTES / 2;
    let mut chunks: Vec<Vec<pb::BenchResult>> = Vec::new();
    let mut size = 0;
    for r in records {
        let wire = pb::BenchResult::from(r);
        let len = wire.encoded_len() + 16;
        if chunks.is_empty() || size + len > BUDGET {
            chunks.push(Vec::new());
            size = 0;
        }
        size += len;
        chunks.last_mut().expect("a chunk").push(wire);
    }
    chunks
}

/// Reads JSON-lines result records, naming the line of the first bad one. Nothing is sent
/// unless every line is good.
pub fn read_records(path: &std::path::Path) -> Result<Vec<BenchResult>, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::Input(format!("cannot read {}: {e}", path.display())))?;
    parse_records(&text, &path.display().to_string())
}

/// Parses JSON-lines result records from `text`; `source` names it in errors, which quote at
/// most a short excerpt of the bad line.
pub fn parse_records(text: &str, source: &str) -> Result<Vec<BenchResult>, CliError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let r: BenchResult = serde_json::from_str(line).map_err(|e| {
            CliError::Input(format!(
                "{source} line {}: not a result record: {}",
                i + 1,
                fleetmark_core::limits::Excerpt::at_most(
                    &e.to_string(),
                    fleetmark_core::limits::MAX_ERROR_CHARS
                )
            ))
        })?;
        r.validate()
            .map_err(|e| CliError::Input(format!("{source} line {}: {e}", i + 1)))?;
        out.push(r);
    }
    if out.is_empty() {
        return Err(CliError::Input(format!("{source} holds no result records")));
    }
    Ok(out)
}
