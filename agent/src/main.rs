//! `fleetmark-agent`: serves jobs from a coordinator (the default), runs a sweep file standalone
//! (`run`), writes seeded weights for reference scripts (`export`), or prints what it sees
//! (`inventory`).

use std::{
    num::NonZeroUsize,
    path::PathBuf,
    sync::{atomic::AtomicBool, Arc},
    time::Duration,
};

use anyhow::Context;
use clap::{builder::BoolishValueParser, ArgAction, Args, Parser, Subcommand};
use fleetmark_agent::{parse_labels, Config};
use fleetmark_core::ComputeCapability;
use fleetmark_engine::fused::{
    options::{
        ConvApi, EpilogueChoice, LayerTiming, PlanChoice, PoolChoice, StemChannels, StemChunk,
        StemPoolChoice,
    },
    FusedOptions,
};

#[derive(Debug, Parser)]
#[command(
    name = "fleetmark-agent",
    version,
    about = "Runs Fleetmark benchmark jobs on this machine's CPU or GPUs",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    /// Log format: text (colour only on a terminal, never with NO_COLOR) or json.
    #[arg(
        long,
        global = true,
        env = "FLEETMARK_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: fleetmark_core::logging::LogFormat,
    #[command(flatten)]
    serve: ServeArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Args)]
struct DeviceArgs {
    /// Devices to serve: cpu, cuda:0, cuda:0,1 or cuda:all (one job per GPU at a time).
    #[arg(long, env = "FLEETMARK_DEVICE", default_value = "cpu")]
    device: String,
    /// This agent's name; two agents with one name are one agent to the coordinator. Defaults
    /// to the host name and the first characters of /etc/machine-id.
    #[arg(long, env = "FLEETMARK_AGENT_NAME")]
    name: Option<String>,
    /// Hourly price of this node in USD, for images per dollar in `fleetmark compare`.
    #[arg(long, env = "FLEETMARK_PRICE_PER_HOUR")]
    price_per_hour: Option<f64>,
    /// Labels, as k=v,k2=v2.
    #[arg(long, env = "FLEETMARK_LABELS", default_value = "")]
    labels: String,
    /// The only directory weights files may come from. A sweep names a file in it (or its
    /// sha256:<hex>); without this flag, jobs with file weights are refused.
    #[arg(long, env = "FLEETMARK_WEIGHTS_DIR")]
    weights_dir: Option<PathBuf>,
    /// For coordinator testing only: iteration time of the simulated device.
    #[arg(long, default_value = "2ms", value_parser = humantime::parse_duration, hide = true)]
    simulated_latency: Duration,
    /// Run the node health check (GEMM per precision, memory and host-to-device bandwidth,
    /// clocks under load, PCIe, power limit, ECC) on each device before the first job, and
    /// report it at registration (on/off).
    #[arg(long, env = "FLEETMARK_HEALTH_CHECK", default_value = "on", value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    health_check: bool,
    #[command(flatten)]
    fused: FusedArgs,
}

/// The fused GPU path's knobs (docs/performance.md says what each one is worth). Every result
/// records their values in `backend.details.fused_options`. Defaults come from
/// `FusedOptions::default()`, so `--help` and a library user see the same values.
#[derive(Debug, Args)]
struct FusedArgs {
    /// Fused path: capture the forward pass into one CUDA graph (on/off).
    #[arg(long, default_value = "on", value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    fused_cuda_graph: bool,
    /// Fused path: bias/residual/ReLU epilogue: auto (time both), api (cuDNN's fused call) or
    /// separate.
    #[arg(long, default_value_t = FusedOptions::default().epilogue, value_parser = parse_with::<EpilogueChoice>)]
    fused_epilogue: EpilogueChoice,
    /// Fused path: the stem's input layout: auto (timed), 3, 4 or 8 (channels padded to), s2d,
    /// s2d12 or s2d16 (space-to-depth, 4x4 stem over 12 or 16 channels; s2d: planner's pick).
    #[arg(long, default_value_t = FusedOptions::default().stem, value_parser = parse_with::<StemChannels>)]
    fused_stem_channels: StemChannels,
    /// Fused path: let f32 convolutions use TF32 tensor cores on sm_80 and newer (on/off).
    #[arg(long, default_value = "on", value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    fused_tf32: bool,
    /// Fused path: how many of cuDNN's ranked algorithms are timed per layer (1 to 8).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=8))]
    fused_algo_candidates: u16,
    /// Fused path: largest workspace one convolution may keep, in bytes (default: a quarter of
    /// the activation memory, at least 64 MiB).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    fused_workspace_limit: Option<u64>,
    /// Fused path: plans compared as whole forward passes: auto (timed alone when layers are
    /// timed in a CUDA graph, else both), both, timed or ranked.
    #[arg(long, default_value_t = FusedOptions::default().plan, value_parser = parse_with::<PlanChoice>)]
    fused_plan: PlanChoice,
    /// Fused path: the max pool after the stem: cudnn, kernel (the path's own, checked against
    /// cuDNN's output first) or auto (time both, keep the faster).
    #[arg(long, default_value_t = FusedOptions::default().pool, value_parser = parse_with::<PoolChoice>)]
    fused_pool: PoolChoice,
    /// Fused path: the space-to-depth stem and its max pool as one kernel of the path's own
    /// (f16 and bf16): auto (checked against cuDNN's stem and pool, timed, kept if faster),
    /// off or kernel.
    #[arg(long, default_value_t = FusedOptions::default().stem_pool, value_parser = parse_with::<StemPoolChoice>)]
    fused_stem_pool: StemPoolChoice,
    /// Fused path: how layer candidates are timed while planning: launch (launch by launch),
    /// graph (inside a CUDA graph) or auto (graph when the forward pass is one).
    #[arg(long, default_value_t = FusedOptions::default().layer_timing, value_parser = parse_with::<LayerTiming>)]
    fused_layer_timing: LayerTiming,
    /// Fused path: which cuDNN API runs the convolutions: legacy, graph (the backend API's
    /// engines, split-K variants included), auto (time both per layer, keep the faster) or
    /// 1x1 (auto for the 1x1 convolutions, legacy for the rest).
    #[arg(long, default_value_t = FusedOptions::default().conv_api, value_parser = parse_with::<ConvApi>)]
    fused_conv_api: ConvApi,
    /// Fused path: run the stem and the max pool a few images at a time, so the stem's output
    /// can stay in the L2 cache: off, auto (plan both, keep the faster) or at most N images per
    /// chunk.
    #[arg(long, default_value_t = FusedOptions::default().stem_chunk, value_parser = parse_with::<StemChunk>)]
    fused_stem_chunk: StemChunk,
    /// Fused path: time each layer on its own and record it in the result.
    #[arg(long)]
    fused_profile: bool,
    /// For testing the per-generation rules on a newer card: treat every GPU as this compute
    /// capability (such as 7.5 for a T4) when deciding what it can run. Results record it.
    #[arg(long, hide = true, value_parser = parse_capability)]
    assume_compute_capability: Option<ComputeCapability>,
}

fn parse_with<T: std::str::FromStr<Err = fleetmark_engine::EngineError>>(
    s: &str,
) -> Result<T, String> {
    s.parse()
        .map_err(|e: fleetmark_engine::EngineError| e.to_string())
}

fn parse_capability(s: &str) -> Result<ComputeCapability, String> {
    let bad = || format!("'{s}' is not a compute capability such as 7.5 or 9.0");
    let (major, minor) = s.split_once('.').ok_or_else(bad)?;
    let major: u32 = major.parse().map_err(|_| bad())?;
    let minor: u32 = minor.parse().map_err(|_| bad())?;
    if !(3..=12).contains(&major) || minor > 9 {
        return Err(bad());
    }
    Ok(ComputeCapability::new(major, minor))
}

impl FusedArgs {
    fn options(&self) -> FusedOptions {
        FusedOptions {
            cuda_graph: self.fused_cuda_graph,
            epilogue: self.fused_epilogue,
            stem: self.fused_stem_channels,
            tf32: self.fused_tf32,
            algo_candidates: NonZeroUsize::new(self.fused_algo_candidates as usize)
                .unwrap_or(NonZeroUsize::MIN),
            workspace_limit: self.fused_workspace_limit.map(|b| b as usize),
            plan: self.fused_plan,
            pool: self.fused_pool,
            stem_pool: self.fused_stem_pool,
            layer_timing: self.fused_layer_timing,
            conv_api: self.fused_conv_api,
            stem_chunk: self.fused_stem_chunk,
            profile: self.fused_profile,
        }
    }
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// The coordinator to dial, such as http://coordinator:7070. Several, comma-separated (or a
    /// name that resolves to several addresses): the agent moves to the next when one fails.
    #[arg(long, env = "FLEETMARK_COORDINATOR")]
    coordinator: Option<String>,
    /// The agent token to register with (`fleetmark token create --role agent`). Later calls
    /// use the agent's own secret, which it keeps in memory.
    #[arg(long, env = "FLEETMARK_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Deadline of each call to the coordinator (a claim's is its wait plus a margin): a hung
    /// coordinator stalls the agent no longer than this, then the next one is tried.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    call_timeout: Duration,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Debug, Args)]
struct TlsArgs {
    /// Trust this CA (PEM) for an https:// coordinator instead of the system roots.
    #[arg(long, env = "FLEETMARK_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// Client certificate (PEM) for a coordinator that requires mutual TLS.
    #[arg(long, env = "FLEETMARK_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The client certificate's key (PEM).
    #[arg(long, env = "FLEETMARK_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Allow plaintext http:// to a coordinator that is not on a loopback address. The token
    /// and everything else then cross the network unencrypted.
    #[arg(long)]
    insecure: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a sweep file here, without a coordinator, writing result records as JSON lines.
    Run {
        /// The sweep, in the same TOML format `fleetmark submit` takes.
        #[arg(long)]
        sweep: PathBuf,
        /// Where to write the records (one JSON object per line).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Write seeded ResNet18 weights (torchvision names) and an input batch as safetensors, for
    /// reference scripts.
    Export {
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        weights: PathBuf,
        /// Also write the deterministic input batch the agent benchmarks with.
        #[arg(long)]
        input: Option<PathBuf>,
        #[arg(long, default_value_t = 2)]
        batch: usize,
        #[arg(long, default_value_t = 224)]
        image_size: usize,
    },
    /// Check every path and precision against golden logits from the PyTorch reference script
    /// (same weights file, this agent's input). Exits 1 if any is outside its bound.
    Verify {
        #[arg(long)]
        weights: PathBuf,
        /// The input written by `fleetmark-agent export --input`.
        #[arg(long)]
        input: PathBuf,
        /// Golden logits from `scripts/bench/pytorch_reference.py golden`.
        #[arg(long)]
        golden: PathBuf,
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long, value_delimiter = ',', default_value = "f32,f16,bf16")]
        precision: Vec<String>,
        #[arg(long, value_delimiter = ',', default_value = "stock,fused")]
        engine: Vec<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// The fused path's knobs, as `run` and the agent take them, so the configuration a
        /// benchmark uses is the one checked.
        #[command(flatten)]
        fused: FusedArgs,
    },
    /// Print this machine's inventory and check each device opens.
    Inventory {
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Run the node health check on each device now and print it as JSON (one object per
    /// device: GEMM TFLOP/s per precision, memory and host-to-device GB/s, clocks, PCIe,
    /// power limit, ECC).
    Health {
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Print cuDNN's JSON description of one GPU (cuDNN 9.8 and later), so that the graph API's
    /// convolutions can be planned for that card on a machine without it (the engine's CI test
    /// reads such files from engine/testdata/). Needs a build with cuDNN.
    CudnnDevice {
        #[arg(long, default_value = "cuda:0")]
        device: String,
    },
}

fn config_from(
    coordinator: String,
    token: Option<String>,
    d: DeviceArgs,
) -> anyhow::Result<Config> {
    let name = match d.name {
        Some(n) => n,
        None => fleetmark_agent::default_name(),
    };
    let mut c = Config::new(coordinator, name);
    c.token = token;
    c.devices = d.device;
    c.price_per_hour = d.price_per_hour;
    c.labels = parse_labels(&d.labels)?;
    c.backend.simulated_latency = d.simulated_latency;
    if let Some(dir) = d.weights_dir {
        if !dir.is_dir() {
            anyhow::bail!("--weights-dir {} is not a directory", dir.display());
        }
        c.backend.weights_dir = Some(dir);
    }
    c.backend.fused = d.fused.options();
    c.backend.assume_capability = d.fused.assume_compute_capability;
    c.backend.health_check = d.health_check;
    // Checked once, here: a bad combination stops the agent before it registers.
    c.backend.validate()?;
    Ok(c)
}

fn main() -> std::process::ExitCode {
    match real_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    fleetmark_core::logging::init_logging(&fleetmark_core::logging::LogSettings {
        format: cli.log_format,
        filter: std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_string()),
        fallback_filter: "info",
        no_color: std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty()),
    });
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    match cli.command {
        None => {
            let coordinator = cli.serve.coordinator.ok_or_else(|| {
                anyhow::anyhow!(
                    "no coordinator: pass --coordinator URL (or set FLEETMARK_COORDINATOR), \
                     or use `fleetmark-agent run` to benchmark without one"
                )
            })?;
            if cli.serve.call_timeout.is_zero() {
                anyhow::bail!("--call-timeout must be longer than zero");
            }
            let mut config = config_from(coordinator, cli.serve.token, cli.serve.device)?;
            config.deadlines = config.deadlines.with_call(cli.serve.call_timeout);
            let t = &cli.serve.tls;
            config.tls = fleetmark_proto::secure::ClientTls::from_files(
                t.ca_cert.as_deref(),
                t.tls_cert.as_deref(),
                t.tls_key.as_deref(),
                t.insecure,
            )?;
            rt.block_on(fleetmark_agent::run(config, shutdown_signal()))?;
        }
        Some(Command::Run { sweep, out, device }) => {
            let config = config_from(String::new(), None, device)?;
            let cancel = Arc::new(AtomicBool::new(false));
            let summary = rt.block_on(async {
                let c = cancel.clone();
                tokio::spawn(async move {
                    shutdown_signal().await;
                    c.store(true, std::sync::atomic::Ordering::Relaxed);
                });
                fleetmark_agent::standalone::run_sweep(&config, &sweep, &out, cancel.clone()).await
            })?;
            eprintln!(
                "{} succeeded, {} failed, {} skipped (no matching device); records in {}",
                summary.succeeded,
                summary.failed,
                summary.skipped,
                out.display()
            );
            if cancel.load(std::sync::atomic::Ordering::Relaxed) {
                eprintln!("error: interrupted before the sweep finished");
                std::process::exit(130);
            }
            if summary.failed > 0 {
                std::process::exit(1);
            }
        }
        Some(Command::Export {
            seed,
            weights,
            input,
            batch,
            image_size,
        }) => {
            let w = fleetmark_engine::ModelWeights::seeded(seed)?;
            w.save(&weights)?;
            eprintln!("wrote {} (sha256 {})", weights.display(), w.info.sha256);
            if let Some(path) = input {
                let x = fleetmark_engine::input::input_batch(
                    fleetmark_engine::input::INPUT_SEED,
                    batch,
                    image_size,
                )?;
                let map = std::collections::HashMap::from([("input".to_string(), x)]);
                candle_safetensors_save(&map, &path)?;
                eprintln!(
                    "wrote {} ({batch}x3x{image_size}x{image_size})",
                    path.display()
                );
            }
        }
        Some(Command::Verify {
            weights,
            input,
            golden,
            device,
            precision,
            engine,
            json,
            fused,
        }) => {
            let precisions = precision
                .iter()
                .map(|p| p.parse())
                .collect::<Result<Vec<fleetmark_core::Precision>, _>>()?;
            let engines = engine
                .iter()
                .map(|e| e.parse())
                .collect::<Result<Vec<fleetmark_core::EnginePath>, _>>()?;
            let options = fleetmark_engine::device::BackendOptions {
                fused: fused.options(),
                assume_capability: fused.assume_compute_capability,
                ..Default::default()
            };
            options.validate()?;
            let checks = fleetmark_agent::verify::run(
                &weights,
                &input,
                &golden,
                &device,
                &precisions,
                &engines,
                &options,
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&checks)?);
            } else {
                println!(
                    "{:<8} {:<6} {:<5} {:<5} {:>12} {:>8} {:>9}  result",
                    "device", "path", "prec", "math", "max rel err", "top-1", "bound"
                );
                for c in &checks {
                    let k = &c.correctness;
                    println!(
                        "{:<8} {:<6} {:<5} {:<5} {:>12.3e} {:>7.0}% {:>9.1e}  {}",
                        c.device,
                        c.path,
                        c.precision,
                        c.math,
                        k.max_rel_error,
                        k.top1_agreement * 100.0,
                        k.bound,
                        match &c.error {
                            Some(e) => format!("ERROR {e}"),
                            None if k.passed => "pass".into(),
                            None => "FAIL".into(),
                        }
                    );
                }
            }
            if checks
                .iter()
                .any(|c| c.error.is_some() || !c.correctness.passed)
            {
                std::process::exit(1);
            }
        }
        Some(Command::Inventory { device }) => {
            let host = fleetmark_agent::host_inventory();
            println!("{}", serde_json::to_string_pretty(&host)?);
            let workers = fleetmark_agent::open_devices(&device, &Default::default())?;
            for w in workers {
                eprintln!("{}: ok ({} / {})", w.spec, w.kind, w.name);
            }
        }
        Some(Command::Health { device }) => {
            let opts = fleetmark_engine::device::BackendOptions {
                health_check: true,
                ..Default::default()
            };
            let workers = fleetmark_agent::open_devices(&device, &opts)?;
            let reports: Vec<serde_json::Value> = workers
                .iter()
                .map(|w| {
                    serde_json::json!({
                        "device": w.spec.to_string(), "kind": w.kind, "name": w.name,
                        "health": w.health,
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&reports)?);
            if workers.iter().any(|w| w.health.is_none()) {
                eprintln!("error: a device has no health check (see the log above)");
                std::process::exit(1);
            }
        }
        Some(Command::CudnnDevice { device }) => {
            let ordinal = match fleetmark_engine::device::parse_devices(&device)?.as_slice() {
                [fleetmark_engine::device::DeviceSpec::Cuda(i)] => *i,
                _ => anyhow::bail!("--device takes one GPU, such as cuda:0, not '{device}'"),
            };
            println!("{}", fleetmark_engine::device::cudnn_device_json(ordinal)?);
        }
    }
    Ok(())
}

fn candle_safetensors_save(
    map: &std::collections::HashMap<String, candle_core::Tensor>,
    path: &std::path::Path,
) -> anyhow::Result<()> {
    candle_core::safetensors::save(map, path)
        .with_context(|| format!("cannot write {}", path.display()))
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
