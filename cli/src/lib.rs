//! The `fleetmark` command line. Data goes to stdout (as a table, CSV or JSON), logs and
//! progress to stderr. Every command that talks to a coordinator takes `--coordinator URL`.
//!
//! Every failure is a [`CliError`], and [`CliError::exit_code`] is the one place that turns it
//! into the process's exit status (documented in `fleetmark --help`, [`AFTER_HELP`]).

/// A line on stderr for people. Unlike `eprintln!` it never panics when stderr is closed.
#[macro_export]
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

pub mod by_node;
pub mod compare;
pub mod config;
pub mod demo;
pub mod history;
pub mod output;
pub mod plot;
pub mod report;
pub mod sweeps;
pub mod tokens;
pub mod watch;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use fleetmark_core::{
    BenchResult, EnginePath, Fraction, HardwareTarget, MeasurementSpec, Precision, SweepSpec,
    WeightsSpec,
};
use fleetmark_proto::{
    client::{sweep_client_with, Deadlines, SweepClient},
    convert::result_without_latencies,
    secure::ClientTls,
    v1 as pb,
};
use thiserror::Error;
use tonic::{Code, Status};

pub const DEFAULT_COORDINATOR: &str = "http://127.0.0.1:7070";

/// Exit statuses, as [`AFTER_HELP`] documents them.
pub mod exit {
    pub const OK: u8 = 0;
    pub const SWEEP_FAILED: u8 = 1;
    pub const BAD_INPUT: u8 = 2;
    pub const UNREACHABLE: u8 = 3;
    pub const AUTH: u8 = 4;
    pub const NOT_FOUND: u8 = 5;
    pub const OTHER: u8 = 6;
}

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
    /// Whoever reads our stdout has stopped reading (`fleetmark results ... | head`). Not an
    /// error to report: the process ends quietly.
    #[error("stdout was closed")]
    ClosedPipe,
}

impl CliError {
    pub fn from_status(url: &str, s: Status) -> Self {
        match s.code() {
            // The coordinator answered, so it is reachable: its database is not.
            Code::Unavailable
                if fleetmark_proto::error_code::ErrorCode::of(&s)
                    == Some(fleetmark_proto::error_code::ErrorCode::DatabaseUnavailable)
                    // Coordinators older than the typed code said it only in the message.
                    || (s.metadata().get(fleetmark_proto::error_code::METADATA_KEY).is_none()
                        && s.message().starts_with("database unavailable")) =>
            {
                CliError::DatabaseUnavailable {
                    url: url.to_string(),
                    detail: s.message().to_string(),
                }
            }
            Code::Unavailable | Code::Unknown | Code::DeadlineExceeded => CliError::Unreachable {
                url: url.to_string(),
                // A TLS handshake that fails (an untrusted certificate) surfaces as a transport
                // error too, so say where to look.
                detail: if url.starts_with("https://") {
                    format!(
                        "{} (over https this also means a certificate that is not trusted: pass \
                         --ca-cert with the CA that signed it)",
                        s.message()
                    )
                } else {
                    s.message().to_string()
                },
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

    /// The process exit status for this error: the only mapping there is.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::ClosedPipe => exit::OK,
            // A rate limit or the pending-job cap is a refusal of this request, as bad input is.
            CliError::Input(_) | CliError::Rejected(_) | CliError::ResourceExhausted(_) => {
                exit::BAD_INPUT
            }
            CliError::Unreachable { .. } | CliError::DatabaseUnavailable { .. } => {
                exit::UNREACHABLE
            }
            CliError::Unauthenticated(_) | CliError::PermissionDenied(_) => exit::AUTH,
            CliError::NotFound(_) => exit::NOT_FOUND,
            CliError::Remote(_) | CliError::Other(_) => exit::OTHER,
        }
    }
}

/// Writes command output to stdout. A reader that went away (`| head`) becomes
/// [`CliError::ClosedPipe`] instead of a panic.
pub fn emit(text: &str) -> Result<(), CliError> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::BrokenPipe => CliError::ClosedPipe,
            _ => CliError::Other(format!("cannot write to stdout: {e}")),
        })
}

/// The exit code for a finished sweep: 0 when every job succeeded, 1 otherwise.
pub fn sweep_exit(all_succeeded: bool) -> ExitCode {
    ExitCode::from(if all_succeeded {
        exit::OK
    } else {
        exit::SWEEP_FAILED
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// A table for people, fitted to the terminal.
    Table,
    /// Comma-separated values with plain numbers, for spreadsheets.
    Csv,
    /// The full records, for scripts.
    Json,
}

/// How a listing is printed: the format, and for tables whether every column is shown.
#[derive(Debug, Clone, Copy, Args)]
pub struct View {
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
    /// Tables: show every column (and do not cap the width at 80 when stdout is not a terminal).
    #[arg(long)]
    pub wide: bool,
}

#[derive(Debug, Parser)]
#[command(
    name = "fleetmark",
    version,
    about = "Benchmark GPU inference across a fleet of machines",
    after_help = AFTER_HELP
)]
pub struct Cli {
    #[command(flatten)]
    pub conn: Connection,
    /// Log format on stderr: text (colour only on a terminal, never with NO_COLOR) or json.
    #[arg(
        long,
        global = true,
        env = "FLEETMARK_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: fleetmark_core::logging::LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// `fleetmark --help`'s closing text: settings, sweep ids and exit statuses.
pub const AFTER_HELP: &str = concat!(
    "\
Settings come from flags, then FLEETMARK_* environment variables, then the config file
($XDG_CONFIG_HOME/fleetmark/config.toml, else ~/.config/fleetmark/config.toml), which may hold
`coordinator`, `token_file` and `ca_cert`.

A SWEEP_ID may be a full id, a unique prefix of one (as `fleetmark sweeps` shows), or `latest`.

",
    "Exit status:
  0  success (also when stdout is closed early, e.g. piped into `head`)
  1  the sweep finished with failed or cancelled jobs (watch, submit --watch, demo)
  2  bad input: a usage error, an invalid sweep, file or id, or a request the coordinator
     rejected (also past a rate limit or the pending-job cap)
  3  the coordinator, or its database, cannot be reached
  4  authentication failed or permission denied
  5  not found: an unknown sweep id or prefix
  6  any other error (an internal coordinator error, a file that cannot be written)"
);

#[derive(Debug, Clone, Args)]
pub struct Connection {
    /// The coordinator to talk to (also `coordinator` in the config file). Several,
    /// comma-separated (or a name that resolves to several addresses): the next is tried when
    /// one cannot be reached.
    #[arg(long, global = true, env = "FLEETMARK_COORDINATOR", default_value = DEFAULT_COORDINATOR)]
    pub coordinator: String,
    /// Deadline of each call to the coordinator.
    #[arg(long, global = true, default_value = "15s", value_parser = humantime::parse_duration)]
    pub call_timeout: std::time::Duration,
    /// API token (`fleetmark-coordinator token create` / `fleetmark token create`).
    #[arg(long, global = true, env = "FLEETMARK_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A file whose first line is the API token; used instead of --token when given (also
    /// `token_file` in the config file).
    #[arg(long, global = true, env = "FLEETMARK_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Trust this CA (PEM) for an https:// coordinator instead of the system roots (also
    /// `ca_cert` in the config file).
    #[arg(long, global = true, env = "FLEETMARK_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Allow plaintext http:// to a coordinator that is not on a loopback address. The token
    /// then crosses the network unencrypted.
    #[arg(long, global = true)]
    pub insecure: bool,
    /// The config file to read instead of the default one.
    #[arg(long, global = true, env = "FLEETMARK_CONFIG")]
    pub config: Option<PathBuf>,
}

impl Connection {
    /// A connection to `url` with `token`, no CA, no `--insecure` and no config file.
    pub fn new(url: impl Into<String>, token: Option<String>) -> Self {
        Connection {
            coordinator: url.into(),
            call_timeout: fleetmark_proto::client::Deadlines::default().call,
            token,
            token_file: None,
            ca_cert: None,
            insecure: false,
            config: None,
        }
    }

    /// The TLS settings the flags ask for.
    pub fn tls(&self) -> Result<ClientTls, CliError> {
        ClientTls::from_files(self.ca_cert.as_deref(), None, None, self.insecure)
            .map_err(|e| CliError::Input(e.to_string()))
    }

    /// The token to send: the token file's, when one is named, else `--token`'s.
    pub fn token(&self) -> Result<Option<String>, CliError> {
        match &self.token_file {
            Some(path) => read_token_file(path).map(Some),
            None => Ok(self.token.clone()),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a coordinator, two CPU agents and a small sweep on this machine, show the results,
    /// and shut everything down. Uses DATABASE_URL, or starts a private PostgreSQL cluster.
    Demo(demo::DemoArgs),
    /// Submit a sweep, from a TOML file or from flags. Prints the sweep id.
    Submit(SubmitArgs),
    /// Follow a sweep's jobs live until it finishes. Exits 1 if any job failed or was cancelled.
    Watch {
        /// The sweep: a full id, a unique prefix, or `latest`.
        sweep_id: String,
    },
    /// A sweep's results, one row per job (repetitions are numbered).
    Results {
        /// The sweep: a full id, a unique prefix, or `latest`.
        sweep_id: String,
        #[command(flatten)]
        view: View,
    },
    /// Compare results across hardware for the same model, precision and batch size.
    Compare(compare::CompareArgs),
    /// How one point (kind, precision, batch) moved across commits, drivers and dates, with
    /// regressions and improvements larger than the 95% intervals flagged.
    History(history::HistoryArgs),
    /// Draw throughput and latency against batch size, and speed-up bars, as PNG and SVG.
    Plot(plot::PlotArgs),
    /// Write one self-contained HTML page about a sweep: charts, results, correctness gate,
    /// telemetry and fingerprints.
    Report(report::ReportArgs),
    /// The agents the coordinator knows, with their hardware and state.
    Agents {
        #[command(subcommand)]
        action: Option<AgentsAction>,
        #[command(flatten)]
        view: View,
    },
    /// Recent sweeps, newest first.
    Sweeps {
        /// How many sweeps to list (at most 1000).
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[command(flatten)]
        view: View,
    },
    /// Cancel a sweep's unfinished jobs.
    Cancel {
        /// The sweep: a full id, a unique prefix, or `latest`.
        sweep_id: String,
    },
    /// API tokens (with an admin token).
    #[command(subcommand)]
    Token(tokens::TokenCommand),
    /// Load result records written by `fleetmark-agent run --out` into the database.
    Import {
        /// A JSON-lines file of result records.
        file: PathBuf,
        /// Name of the sweep the records are filed under.
        #[arg(long)]
        name: Option<String>,
    },
    /// Print a shell completion script, e.g. `fleetmark completions bash > ~/.local/share/bash-completion/completions/fleetmark`.
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
pub enum AgentsAction {
    /// Retire agents that have been offline for good: they leave `fleetmark agents`, their
    /// results stay, and one that registers again comes back. Prints the names retired.
    Prune {
        /// Only agents not heard from for at least this long (at least 1m).
        #[arg(long, default_value = "7days", value_parser = humantime::parse_duration)]
        offline_for: Duration,
        /// Only list the agents that would be retired.
        #[arg(long)]
        dry_run: bool,
    },
    /// Stored node health checks, newest first: every check an agent ran before its first job
    /// (`fleetmark-agent health`), with its flags against the median of its kind. The check
    /// marked "in force" is the one new results are linked to.
    Checks {
        /// Only this agent's checks (its name).
        #[arg(long)]
        agent: Option<String>,
        /// Only this hardware kind (h100, cpu, ...).
        #[arg(long)]
        gpu: Option<String>,
        /// At most this many (at most 1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[command(flatten)]
        view: View,
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
    /// A name for the sweep, shown by `fleetmark sweeps`.
    #[arg(long)]
    pub name: Option<String>,
    /// The model to run (resnet18).
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
    /// Input images are this many pixels square.
    #[arg(long, default_value_t = 224)]
    pub image_size: u32,
    /// Warm-up iterations before timing.
    #[arg(long, default_value_t = 10)]
    pub warmup: u32,
    /// Warm up for at least this long, too.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    pub warmup_duration: Duration,
    /// Time at least this many iterations.
    #[arg(long, default_value_t = 50)]
    pub min_iterations: u32,
    /// Time for at least this long, too.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub min_duration: Duration,
    /// Stop timing after this long even if --min-iterations is not reached.
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
            conn.token()?.as_deref(),
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

/// The first line of a token file, trimmed.
fn read_token_file(path: &std::path::Path) -> Result<String, CliError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        CliError::Input(format!(
            "cannot read the token file {}: {e}",
            path.display()
        ))
    })?;
    match text.lines().next().map(str::trim) {
        Some(t) if !t.is_empty() => Ok(t.to_string()),
        _ => Err(CliError::Input(format!(
            "the token file {} is empty",
            path.display()
        ))),
    }
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

/// A stored result as a listing shows it.
#[derive(Debug, Clone)]
pub struct Listed {
    pub result_id: String,
    pub sweep_id: String,
    pub result: BenchResult,
    /// The flags of the health check in force on the result's device when it was stored
    /// (empty: healthy); `None` when that device declared no check.
    pub health: Option<Vec<String>>,
}

/// A sweep's results as domain records, with their ids, fetched page by page.
pub async fn fetch_results(
    remote: &mut Remote,
    mut req: pb::ListResultsRequest,
) -> Result<Vec<Listed>, CliError> {
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
            out.push(Listed {
                result_id: s.result_id,
                sweep_id: s.sweep_id,
                result: r,
                health: (s.health_check_id != 0).then_some(s.health_flags),
            });
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
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "fleetmark", &mut script);
            emit(&String::from_utf8_lossy(&script))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Submit(args) => {
            let toml = args.to_toml()?;
            let mut remote = Remote::new(&cli.conn)?;
            let resp = submit(&mut remote, toml).await?;
            note!("submitted sweep {} with {} jobs", resp.sweep_id, resp.jobs);
            for w in &resp.warnings {
                note!("warning: {w}");
            }
            // The id is printed for scripts; a reader that is gone does not stop the watch.
            match emit(&format!("{}\n", resp.sweep_id)) {
                Ok(()) | Err(CliError::ClosedPipe) => {}
                Err(e) => return Err(e),
            }
            if args.watch {
                let ok = watch::watch(&mut remote, &resp.sweep_id).await?;
                return Ok(sweep_exit(ok));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Watch { sweep_id } => {
            let mut remote = Remote::new(&cli.conn)?;
            let id = sweeps::resolve(&mut remote, &sweep_id).await?;
            let ok = watch::watch(&mut remote, &id).await?;
            Ok(sweep_exit(ok))
        }
        Command::Results { sweep_id, view } => {
            let mut remote = Remote::new(&cli.conn)?;
            let id = sweeps::resolve(&mut remote, &sweep_id).await?;
            let results = fetch_results(
                &mut remote,
                pb::ListResultsRequest {
                    sweep_id: id.clone(),
                    include_simulated: true,
                    omit_latencies: view.format != Format::Json,
                    ..Default::default()
                },
            )
            .await?;
            if results.is_empty() {
                note!("no results yet for sweep {id}");
            }
            emit(&output::results(&results, view))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Compare(args) => {
            let mut remote = Remote::new(&cli.conn)?;
            compare::run(&mut remote, args).await
        }
        Command::History(args) => {
            let mut remote = Remote::new(&cli.conn)?;
            history::run(&mut remote, args).await
        }
        Command::Plot(args) => {
            let mut remote = Remote::new(&cli.conn)?;
            plot::run(&mut remote, args).await
        }
        Command::Report(args) => {
            let mut remote = Remote::new(&cli.conn)?;
            report::run(&mut remote, args).await
        }
        Command::Agents {
            action:
                Some(AgentsAction::Prune {
                    offline_for,
                    dry_run,
                }),
            ..
        } => {
            let mut remote = Remote::new(&cli.conn)?;
            let names = remote
                .client
                .prune_agents(pb::PruneAgentsRequest {
                    offline_for_seconds: offline_for.as_secs(),
                    dry_run,
                })
                .await
                .map_err(|s| remote.err(s))?
                .into_inner()
                .names;
            note!(
                "{} {} agents offline for at least {}",
                if dry_run { "would retire" } else { "retired" },
                names.len(),
                humantime::format_duration(offline_for)
            );
            emit(&names.iter().map(|n| format!("{n}\n")).collect::<String>())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Agents {
            action:
                Some(AgentsAction::Checks {
                    agent,
                    gpu,
                    limit,
                    view,
                }),
            ..
        } => {
            let mut remote = Remote::new(&cli.conn)?;
            let checks = remote
                .client
                .list_health_checks(pb::ListHealthChecksRequest {
                    agent_name: agent.unwrap_or_default(),
                    kind: gpu.unwrap_or_default(),
                    limit,
                })
                .await
                .map_err(|s| remote.err(s))?
                .into_inner()
                .checks;
            if checks.is_empty() {
                note!(
                    "no health checks stored (agents run one at start unless --health-check off)"
                );
            }
            emit(&output::health_checks(&checks, view))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Agents { action: None, view } => {
            let mut remote = Remote::new(&cli.conn)?;
            let agents = remote
                .client
                .list_agents(pb::ListAgentsRequest {})
                .await
                .map_err(|s| remote.err(s))?
                .into_inner()
                .agents;
            emit(&output::agents(&agents, view))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Sweeps { limit, view } => {
            let mut remote = Remote::new(&cli.conn)?;
            let sweeps = remote
                .client
                .list_sweeps(pb::ListSweepsRequest { limit })
                .await
                .map_err(|s| remote.err(s))?
                .into_inner()
                .sweeps;
            emit(&output::sweeps(&sweeps, view))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Cancel { sweep_id } => {
            let mut remote = Remote::new(&cli.conn)?;
            let id = sweeps::resolve(&mut remote, &sweep_id).await?;
            let n = remote
                .client
                .cancel_sweep(pb::CancelSweepRequest {
                    sweep_id: id.clone(),
                })
                .await
                .map_err(|s| remote.err(s))?
                .into_inner()
                .cancelled_jobs;
            note!("cancelled {n} unfinished jobs of sweep {id}");
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
                    note!(
                        "record {}: {}",
                        offset + o.index as usize + 1,
                        describe_outcome(o)
                    );
                }
                offset += chunk.len();
                if !resp.sweep_id.is_empty() {
                    note!(
                        "imported {} results as sweep {}",
                        resp.imported,
                        resp.sweep_id
                    );
                    sweeps.push(resp.sweep_id);
                }
            }
            emit(&sweeps.iter().map(|s| format!("{s}\n")).collect::<String>())?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every flag and positional of every subcommand explains itself in `--help`.
    #[test]
    fn every_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if matches!(id, "help" | "version") {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() && sub.get_name() != "help" {
                    missing.push(format!("{path} {} (the subcommand)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut cmd = Cli::command();
        cmd.build();
        let mut missing = Vec::new();
        walk(&cmd, "fleetmark", &mut missing);
        assert!(missing.is_empty(), "arguments without help: {missing:?}");
        Cli::command().debug_assert();
    }

    #[test]
    fn every_error_has_its_documented_exit_status() {
        let cases = [
            (CliError::Input("x".into()), 2),
            (CliError::Rejected("x".into()), 2),
            (CliError::ResourceExhausted("x".into()), 2),
            (
                CliError::Unreachable {
                    url: "u".into(),
                    detail: "d".into(),
                },
                3,
            ),
            (
                CliError::DatabaseUnavailable {
                    url: "u".into(),
                    detail: "d".into(),
                },
                3,
            ),
            (CliError::Unauthenticated("x".into()), 4),
            (CliError::PermissionDenied("x".into()), 4),
            (CliError::NotFound("x".into()), 5),
            (CliError::Remote("x".into()), 6),
            (CliError::Other("x".into()), 6),
            (CliError::ClosedPipe, 0),
        ];
        for (e, code) in cases {
            assert_eq!(e.exit_code(), code, "{e:?}");
            assert!(
                AFTER_HELP.contains(&format!("\n  {code}  ")),
                "exit status {code} is documented"
            );
        }
        for (code, grpc) in [
            (4, Code::PermissionDenied),
            (4, Code::Unauthenticated),
            (5, Code::NotFound),
            (2, Code::InvalidArgument),
            (2, Code::ResourceExhausted),
            (3, Code::Unavailable),
            (6, Code::Internal),
        ] {
            let e = CliError::from_status("http://x", Status::new(grpc, "m"));
            assert_eq!(e.exit_code(), code, "{grpc:?}");
        }
    }
}
