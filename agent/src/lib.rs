//! The Fleetmark agent as a library. [`run`] registers this machine's devices with a coordinator
//! and serves jobs until shutdown; [`standalone::run_sweep`] runs a sweep file with no
//! coordinator at all and writes the same result records to a file.
//!
//! Agents always dial out: rented GPU nodes sit behind NAT, and the coordinator never connects
//! to them. Every call is retried through coordinator restarts and database outages; a job in
//! flight keeps running and its result is delivered when the coordinator is back, as long as the
//! lease is still ours.

pub mod error;
pub mod standalone;
pub mod verify;
pub mod worker;

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use fleetmark_core::{BenchResult, HostInventory, JobSpec};
use fleetmark_engine::{
    device::{parse_devices, BackendOptions},
    AgentIdentity, EngineError, JobContext, Progress,
};
use fleetmark_proto::{
    client::{agent_client_with, is_transient, AgentClient, Deadlines},
    convert::parse_uuid,
    secure::{bearer, ClientTls},
    v1 as pb,
};
use tokio::sync::{mpsc, RwLock};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Status};
use tracing::{debug, info, warn};

pub use error::AgentError;
use worker::DeviceWorker;

#[derive(Debug, Clone)]
pub struct Config {
    pub coordinator: String,
    /// The agent token `Register` takes. Every later call uses the agent's own secret, which
    /// `Register` returns and which lives only in this process's memory.
    pub token: Option<String>,
    /// TLS settings for `https://` coordinators (and the plaintext policy).
    pub tls: ClientTls,
    pub name: String,
    /// `cpu`, `cuda:0`, `cuda:0,1`, `cuda:all` or `simulated`.
    pub devices: String,
    pub price_per_hour: Option<f64>,
    pub labels: BTreeMap<String, String>,
    pub backend: BackendOptions,
    /// How long one claim waits at the coordinator for work.
    pub claim_wait: Duration,
    /// Longest pause between retries while the coordinator is unreachable.
    pub max_backoff: Duration,
    /// Deadlines of calls and keepalives of connections to the coordinators.
    pub deadlines: Deadlines,
}

impl Config {
    pub fn new(coordinator: impl Into<String>, name: impl Into<String>) -> Self {
        Config {
            coordinator: coordinator.into(),
            token: None,
            tls: ClientTls::default(),
            name: name.into(),
            devices: "cpu".into(),
            price_per_hour: None,
            labels: BTreeMap::new(),
            backend: BackendOptions::default(),
            claim_wait: Duration::from_secs(10),
            max_backoff: Duration::from_secs(2),
            deadlines: Deadlines::default(),
        }
    }
}

/// Parses `k=v,k2=v2`.
pub fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, AgentError> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').ok_or_else(|| {
            AgentError::Config(format!("label '{part}' is not of the form key=value"))
        })?;
        out.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(out)
}

/// A default agent name that differs between machines even when their host names do not
/// (cloud images often all call themselves `ubuntu`): host name plus the start of the machine id.
pub fn default_name() -> String {
    let host = HostInventory::collect_host().hostname;
    let host = if host.is_empty() {
        "agent".to_string()
    } else {
        host
    };
    match std::fs::read_to_string("/etc/machine-id") {
        Ok(id) if id.trim().len() >= 8 => format!("{host}-{}", &id.trim()[..8]),
        _ => host,
    }
}

/// This machine as the coordinator should see it.
pub fn host_inventory() -> HostInventory {
    let mut host = HostInventory::collect_host();
    host.candle_version = fleetmark_engine::versions::CANDLE_VERSION.into();
    host.rustc_version = fleetmark_engine::versions::RUSTC_VERSION.into();
    host.cuda_build = fleetmark_engine::versions::cuda_build();
    host.gpus = fleetmark_engine::gpuinfo::detect_gpus();
    host
}

/// Opens every configured device, each on its own thread.
pub fn open_devices(
    devices: &str,
    opts: &BackendOptions,
) -> Result<Vec<Arc<DeviceWorker>>, AgentError> {
    let specs = parse_devices(devices)?;
    specs
        .into_iter()
        .map(|s| {
            DeviceWorker::start(s, opts.clone())
                .map(Arc::new)
                .map_err(|e| AgentError::Device(format!("{s}: {e}")))
        })
        .collect()
}

struct Running {
    attempt: u32,
    cancel: Arc<AtomicBool>,
}

struct Shared {
    config: Config,
    client: AgentClient,
    identity: AgentIdentity,
    devices: Vec<pb::AgentDevice>,
    agent_id: RwLock<String>,
    /// This incarnation's secret, from `Register`.
    secret: RwLock<String>,
    heartbeat: RwLock<Duration>,
    running: Mutex<HashMap<String, Running>>,
    shutdown: CancellationToken,
}

/// Registers and serves jobs until `shutdown` resolves. Fails at once for a device that cannot
/// run or a token the coordinator refuses; waits out an unreachable coordinator.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    let workers = open_devices(&config.devices, &config.backend)?;
    run_with_devices(config, workers, shutdown).await
}

/// Like [`run`], with devices already opened (the demo shares them between agents' set-up and
/// start-up checks).
pub async fn run_with_devices(
    config: Config,
    workers: Vec<Arc<DeviceWorker>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    if config.name.trim().is_empty() {
        return Err(AgentError::Config("the agent needs a --name".into()));
    }
    // No fixed credential on the channel: each call carries the token or the secret it needs.
    let client = agent_client_with(&config.coordinator, None, config.deadlines, &config.tls)
        .map_err(|e| AgentError::Config(e.to_string()))?;
    let host = host_inventory();
    let identity = AgentIdentity {
        name: config.name.clone(),
        labels: config.labels.clone(),
        price_per_hour: config.price_per_hour,
        host,
    };
    let devices = workers
        .iter()
        .map(|w| pb::AgentDevice {
            device: w.spec.to_string(),
            kind: w.kind.clone(),
            name: w.name.clone(),
            precisions: w.precisions.iter().map(|p| p.as_str().into()).collect(),
            health: w.health.as_ref().map(Into::into),
            health_flags: Vec::new(),
        })
        .collect();
    let token = CancellationToken::new();
    let shared = Arc::new(Shared {
        config,
        client,
        identity,
        devices,
        agent_id: RwLock::new(String::new()),
        secret: RwLock::new(String::new()),
        heartbeat: RwLock::new(Duration::from_secs(2)),
        running: Mutex::new(HashMap::new()),
        shutdown: token.clone(),
    });
    {
        let token = token.clone();
        tokio::spawn(async move {
            shutdown.await;
            token.cancel();
        });
    }
    if !register(&shared).await? {
        return Ok(());
    }
    let heartbeat = tokio::spawn(heartbeat_loop(shared.clone()));
    let farewell = tokio::spawn(say_stopping(shared.clone()));
    let mut loops = Vec::new();
    for w in &workers {
        loops.push(tokio::spawn(device_loop(shared.clone(), w.clone())));
    }
    let mut first_error = None;
    for l in loops {
        match l.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                token.cancel();
                first_error.get_or_insert(e);
            }
            Err(e) => warn!(error = %e, "device loop panicked"),
        }
    }
    heartbeat.abort();
    // Give the stopping notice a moment to go out (it is bounded by its call deadline).
    let _ = tokio::time::timeout(Duration::from_secs(2), farewell).await;
    info!(agent = %shared.config.name, "agent stopped");
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Registers until it works. Ok(false) if shutdown came first.
async fn register(shared: &Shared) -> Result<bool, AgentError> {
    let mut backoff = Backoff::new(shared.config.max_backoff);
    loop {
        let req = pb::RegisterRequest {
            name: shared.config.name.clone(),
            labels: shared.config.labels.clone().into_iter().collect(),
            price_per_hour: shared.config.price_per_hour,
            inventory: Some((&shared.identity.host).into()),
            devices: shared.devices.clone(),
        };
        let mut client = shared.client.clone();
        let req = with_credential(req, shared.config.token.as_deref().unwrap_or(""));
        let outcome = tokio::select! {
            r = client.register(req) => r,
            _ = shared.shutdown.cancelled() => return Ok(false),
        };
        match outcome {
            Ok(resp) => {
                let resp = resp.into_inner();
                *shared.agent_id.write().await = resp.agent_id.clone();
                *shared.secret.write().await = resp.agent_secret.clone();
                if resp.released_jobs > 0 {
                    info!(
                        jobs = resp.released_jobs,
                        "jobs leased to this agent's previous run went back to the queue"
                    );
                }
                *shared.heartbeat.write().await =
                    Duration::from_millis(resp.heartbeat_interval_ms.max(100) as u64);
                info!(agent = %shared.config.name, agent_id = %resp.agent_id,
                      coordinator = %shared.config.coordinator, "registered");
                return Ok(true);
            }
            Err(s) if s.code() == Code::Unauthenticated => {
                return Err(AgentError::Unauthenticated(s.message().to_string()))
            }
            Err(s)
                if matches!(
                    s.code(),
                    Code::InvalidArgument | Code::PermissionDenied | Code::AlreadyExists
                ) =>
            {
                return Err(AgentError::Rejected(s.message().to_string()))
            }
            Err(s) => {
                warn!(coordinator = %shared.config.coordinator, error = %s.message(),
                      "coordinator not reachable, retrying");
                if !backoff.wait(&shared.shutdown).await {
                    return Ok(false);
                }
            }
        }
    }
}

async fn heartbeat_loop(shared: Arc<Shared>) {
    loop {
        let every = *shared.heartbeat.read().await;
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shared.shutdown.cancelled() => return,
        }
        let running: Vec<pb::JobRef> = shared
            .running
            .lock()
            .expect("running jobs")
            .iter()
            .map(|(id, r)| pb::JobRef {
                job_id: id.clone(),
                attempt: r.attempt,
            })
            .collect();
        let agent_id = shared.agent_id.read().await.clone();
        let mut client = shared.client.clone();
        match client
            .heartbeat(
                shared
                    .authed(pb::HeartbeatRequest {
                        agent_id,
                        running,
                        stopping: false,
                    })
                    .await,
            )
            .await
        {
            Ok(resp) => {
                let resp = resp.into_inner();
                if !resp.known {
                    warn!("the coordinator no longer knows this agent, registering again");
                    let _ = register(&shared).await;
                }
                let running = shared.running.lock().expect("running jobs");
                for stop in resp.stop {
                    if let Some(r) = running.get(&stop.job_id) {
                        if r.attempt == stop.attempt {
                            info!(job_id = %stop.job_id, "job cancelled or lease lost, stopping it");
                            r.cancel.store(true, Ordering::Relaxed);
                        }
                    }
                }
            }
            Err(s) => debug!(error = %s.message(), "heartbeat failed"),
        }
    }
}

/// Once shutdown begins, tells the coordinator this agent is stopping, so a lease it cannot hand
/// back in time expires as a hand-back, not as the job's failure.
async fn say_stopping(shared: Arc<Shared>) {
    shared.shutdown.cancelled().await;
    let agent_id = shared.agent_id.read().await.clone();
    let mut client = shared.client.clone();
    let req = pb::HeartbeatRequest {
        agent_id,
        running: Vec::new(),
        stopping: true,
    };
    if let Err(s) = client.heartbeat(shared.authed(req).await).await {
        debug!(error = %s.message(), "stopping notice not delivered");
    }
}

/// Claims and runs jobs for one device until shutdown.
async fn device_loop(shared: Arc<Shared>, worker: Arc<DeviceWorker>) -> Result<(), AgentError> {
    let mut backoff = Backoff::new(shared.config.max_backoff);
    let device = worker.spec.to_string();
    while !shared.shutdown.is_cancelled() {
        let agent_id = shared.agent_id.read().await.clone();
        let mut client = shared.client.clone();
        // A long poll: its deadline is the wait plus a margin.
        let mut req = shared
            .authed(pb::ClaimJobRequest {
                agent_id,
                device: device.clone(),
                wait_ms: shared.config.claim_wait.as_millis() as u32,
            })
            .await;
        req.set_timeout(shared.config.deadlines.long_poll(shared.config.claim_wait));
        let claim = tokio::select! {
            r = client.claim_job(req) => r,
            _ = shared.shutdown.cancelled() => break,
        };
        match claim {
            Ok(resp) => {
                backoff.reset();
                if let Some(job) = resp.into_inner().job {
                    run_claimed(&shared, &worker, job).await;
                }
            }
            Err(s) if s.code() == Code::Unauthenticated => {
                return Err(AgentError::Unauthenticated(s.message().to_string()))
            }
            Err(s) if s.code() == Code::InvalidArgument => {
                // Another agent registered under our name with other devices, most likely.
                warn!(device = %device, error = %s.message(), "the coordinator refused the claim");
                if !backoff.wait(&shared.shutdown).await {
                    break;
                }
            }
            Err(s) if s.code() == Code::NotFound => {
                warn!(error = %s.message(), "the coordinator does not know this agent, registering again");
                if !register(&shared).await? {
                    break;
                }
            }
            Err(s) => {
                debug!(device = %device, error = %s.message(), "claim failed, retrying");
                if !backoff.wait(&shared.shutdown).await {
                    break;
                }
            }
        }
    }
    Ok(())
}

async fn run_claimed(shared: &Arc<Shared>, worker: &DeviceWorker, job: pb::Job) {
    let job_id = job.job_id.clone();
    let attempt = job.attempt;
    let spec: Result<JobSpec, _> = job
        .spec
        .ok_or_else(|| fleetmark_proto::convert::WireError("job without a spec".into()))
        .and_then(JobSpec::try_from);
    let spec = match spec {
        Ok(s) => s,
        Err(e) => {
            fail(
                shared,
                &job_id,
                attempt,
                &format!("invalid job: {e}"),
                Ending::Permanent,
            )
            .await;
            return;
        }
    };
    let ctx = JobContext {
        job_id: parse_uuid("job id", &job_id).ok(),
        attempt,
    };
    info!(job_id = %job_id, attempt, device = %worker.spec, spec = %spec.label(), "job started");
    let cancel = Arc::new(AtomicBool::new(false));
    shared.running.lock().expect("running jobs").insert(
        job_id.clone(),
        Running {
            attempt,
            cancel: cancel.clone(),
        },
    );
    let (ptx, prx) = mpsc::unbounded_channel();
    let reporter = tokio::spawn(report_progress(
        shared.clone(),
        job_id.clone(),
        attempt,
        prx,
        cancel.clone(),
    ));
    // Shutdown stops the job too; it is handed back to the queue below.
    let stop_on_shutdown = {
        let cancel = cancel.clone();
        let token = shared.shutdown.clone();
        tokio::spawn(async move {
            token.cancelled().await;
            cancel.store(true, Ordering::Relaxed);
        })
    };
    let outcome = worker
        .run(spec, ctx, shared.identity.clone(), cancel.clone(), ptx)
        .await;
    stop_on_shutdown.abort();
    let lease_lost = reporter.await.unwrap_or(false);
    shared.running.lock().expect("running jobs").remove(&job_id);
    match outcome {
        Ok(result) => deliver(shared, &job_id, result).await,
        Err(EngineError::Cancelled) if lease_lost => {
            info!(job_id = %job_id, "job stopped: its lease is gone (cancelled or reassigned)")
        }
        Err(EngineError::Cancelled) => {
            // Not the job's fault: it goes back without using an attempt.
            fail(
                shared,
                &job_id,
                attempt,
                "the agent stopped during the job",
                Ending::HandBack,
            )
            .await
        }
        Err(e) => {
            warn!(job_id = %job_id, error = %e, "job failed");
            let ending = if e.is_permanent() {
                Ending::Permanent
            } else {
                Ending::Failure
            };
            fail(shared, &job_id, attempt, &e.to_string(), ending).await
        }
    }
}

/// Forwards progress to the coordinator, which extends the lease each time. Returns whether the
/// lease was found lost (and the job told to stop).
async fn report_progress(
    shared: Arc<Shared>,
    job_id: String,
    attempt: u32,
    mut rx: mpsc::UnboundedReceiver<Progress>,
    cancel: Arc<AtomicBool>,
) -> bool {
    let every = *shared.heartbeat.read().await;
    let mut latest: Option<Progress> = None;
    // The first report acknowledges the claim: it goes out at once, not at the next tick, since
    // the coordinator takes an unacknowledged claim back after a short grace.
    let mut acknowledged = false;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            p = rx.recv() => match p {
                Some(p) => {
                    latest = Some(p);
                    if acknowledged {
                        continue;
                    }
                }
                None => return false,
            },
            _ = tick.tick() => {}
        }
        let Some(p) = latest else { continue };
        let agent_id = shared.agent_id.read().await.clone();
        let mut client = shared.client.clone();
        let req = pb::ReportProgressRequest {
            agent_id,
            job_id: job_id.clone(),
            attempt,
            phase: p.phase.as_str().into(),
            iterations: p.iterations,
            fraction: p.fraction,
        };
        match client.report_progress(shared.authed(req).await).await {
            Ok(_) => acknowledged = true,
            Err(s) if s.code() == Code::FailedPrecondition => {
                warn!(job_id = %job_id, attempt, reason = %s.message(), "lease lost, stopping the job");
                cancel.store(true, Ordering::Relaxed);
                // Drain until the job ends.
                while rx.recv().await.is_some() {}
                return true;
            }
            // The coordinator is away: keep running; the result is delivered when it is back.
            Err(s) => debug!(job_id = %job_id, error = %s.message(), "progress not delivered"),
        }
    }
}

/// Where results that could not be delivered are kept, one JSON record per line, for
/// `fleetmark import`.
pub fn spool_path(agent: &str) -> std::path::PathBuf {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".local/state"))
        })
        .unwrap_or_else(std::env::temp_dir);
    let safe: String = agent
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    base.join("fleetmark")
        .join(format!("undelivered-{safe}.jsonl"))
}

fn spool(shared: &Shared, job_id: &str, result: &BenchResult, why: &str) {
    use std::io::Write;
    let path = spool_path(&shared.config.name);
    let written = std::fs::create_dir_all(path.parent().expect("spool path has a parent"))
        .and_then(|_| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
        })
        .and_then(|mut f| {
            writeln!(
                f,
                "{}",
                serde_json::to_string(result).expect("records serialise")
            )
        });
    match written {
        Ok(()) => warn!(job_id = %job_id, reason = why, path = %path.display(),
                        "result kept on disk; load it with `fleetmark import`"),
        Err(e) => {
            warn!(job_id = %job_id, reason = why, error = %e, "result lost: cannot write the spool file")
        }
    }
}

/// Delivers a result, retrying while the coordinator is unreachable. A result that cannot be
/// delivered (the agent is stopping, or the coordinator stays away) is kept on disk.
async fn deliver(shared: &Shared, job_id: &str, result: BenchResult) {
    let wire: pb::BenchResult = (&result).into();
    let mut backoff = Backoff::new(shared.config.max_backoff);
    // Past this the lease has surely expired; keep trying a while longer anyway, since the
    // coordinator decides, not us.
    let give_up = tokio::time::Instant::now() + Duration::from_secs(600);
    loop {
        let agent_id = shared.agent_id.read().await.clone();
        let mut client = shared.client.clone();
        match client
            .submit_result(
                shared
                    .authed(pb::SubmitResultRequest {
                        agent_id,
                        result: Some(wire.clone()),
                    })
                    .await,
            )
            .await
        {
            Ok(_) => {
                info!(job_id = %job_id, images_per_sec = format!("{:.1}", result.images_per_sec),
                      p50_ms = format!("{:.3}", result.latency.p50_ms), "result delivered");
                return;
            }
            Err(s) if s.code() == Code::FailedPrecondition => {
                warn!(job_id = %job_id, reason = %s.message(), "result rejected: the lease was lost");
                return;
            }
            Err(s) if is_transient(&s) && tokio::time::Instant::now() < give_up => {
                debug!(job_id = %job_id, error = %s.message(), "result not delivered yet, retrying");
                if !backoff.wait(&shared.shutdown).await {
                    spool(shared, job_id, &result, "the agent is stopping");
                    return;
                }
            }
            Err(s) => {
                spool(shared, job_id, &result, s.message());
                return;
            }
        }
    }
}

/// How a run that produced no result ends, as the agent tells the coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// The job failed; it may be retried.
    Failure,
    /// The job failed in a way a retry cannot fix.
    Permanent,
    /// The agent is stopping: not the job's fault, no attempt used.
    HandBack,
}

async fn fail(shared: &Shared, job_id: &str, attempt: u32, reason: &str, ending: Ending) {
    let mut backoff = Backoff::new(shared.config.max_backoff);
    for _ in 0..20 {
        let agent_id = shared.agent_id.read().await.clone();
        let mut client = shared.client.clone();
        let r: Result<_, Status> = client
            .fail_job(
                shared
                    .authed(pb::FailJobRequest {
                        agent_id,
                        job_id: job_id.to_string(),
                        attempt,
                        reason: reason.to_string(),
                        permanent: ending == Ending::Permanent,
                        handback: ending == Ending::HandBack,
                    })
                    .await,
            )
            .await;
        match r {
            Ok(resp) => {
                info!(job_id = %job_id, state = %resp.into_inner().state, "failure reported");
                return;
            }
            Err(s) if is_transient(&s) => backoff.sleep().await,
            Err(s) => {
                debug!(job_id = %job_id, error = %s.message(), "failure not reported");
                return;
            }
        }
    }
}

/// A request carrying `secret` as its bearer credential (none if it is empty or not ASCII,
/// which the coordinator answers with UNAUTHENTICATED).
fn with_credential<T>(message: T, secret: &str) -> Request<T> {
    let mut req = Request::new(message);
    if let Some(v) = Some(secret)
        .filter(|s| !s.is_empty())
        .and_then(|s| bearer(s).ok())
    {
        req.metadata_mut().insert("authorization", v);
    }
    req
}

impl Shared {
    /// A request authenticated as this agent (its current secret).
    async fn authed<T>(&self, message: T) -> Request<T> {
        let secret = self.secret.read().await.clone();
        with_credential(message, &secret)
    }
}

/// Exponential backoff from 100 ms up to a cap.
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(max: Duration) -> Self {
        Backoff {
            next: Duration::from_millis(100),
            max,
        }
    }

    fn reset(&mut self) {
        self.next = Duration::from_millis(100);
    }

    async fn sleep(&mut self) {
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(self.max);
    }

    /// Sleeps unless shutdown comes first; false if it did.
    async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        tokio::select! {
            _ = self.sleep() => true,
            _ = shutdown.cancelled() => false,
        }
    }
}
