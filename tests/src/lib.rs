//! Helpers for Fleetmark's end-to-end tests: real `fleetmark-coordinator`, `fleetmark-agent` and
//! `fleetmark` processes talking gRPC over loopback, with Postgres underneath.
//!
//! Every long-running process is held by a [`Child`], which SIGKILLs it when dropped (so a failed
//! assertion never leaves agents behind) and, when the test is failing, prints the tail of the
//! process's log so the failure can be understood from the test output alone.
//!
//! Nothing here sleeps to synchronise: waits poll a real condition (a gRPC call, a database row,
//! a process exit) until a generous deadline, through [`eventually`].
//!
//! Credentials: [`Coordinator::start`] makes an admin token and an agent token in the test's
//! database with the real `fleetmark-coordinator token create`, and remembers them by the
//! coordinator's URL. [`cli`] and [`submit_file`] called with `token: None` use that admin
//! token (pass `Some("")` to send none), and [`start_agent`] gives agents the agent token
//! unless `extra` has a `--token` of its own.

use std::{
    collections::BTreeMap,
    io::Write,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Output, Stdio},
    sync::Mutex,
    sync::OnceLock,
    time::Duration,
};

use fleetmark_proto::{
    client::{sweep_client, SweepClient},
    v1 as pb,
};
use sqlx::{postgres::PgPoolOptions, PgPool, Row};
use uuid::Uuid;

pub use fleetmark_testkit::{eventually, workspace_binary, PrivateCluster, TestDb};

/// How long to wait for a process to start and answer, for a sweep of a few small jobs to
/// finish, and so on. Generous: the suite runs on loaded two-core machines.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
pub const SWEEP_TIMEOUT: Duration = Duration::from_secs(120);

/// Variables that would change what the spawned binaries do if the developer's shell has them.
const SCRUBBED_ENV: &[&str] = &[
    "FLEETMARK_TOKEN",
    "FLEETMARK_COORDINATOR",
    "FLEETMARK_LISTEN",
    "FLEETMARK_LEASE",
    "FLEETMARK_HEARTBEAT",
    "FLEETMARK_DEVICE",
    "FLEETMARK_AGENT_NAME",
    "FLEETMARK_PRICE_PER_HOUR",
    "FLEETMARK_LABELS",
    "FLEETMARK_WEIGHTS_DIR",
    "DATABASE_URL",
    "RUST_LOG",
];

/// A free loopback port: bound to port 0, read back and released. Another process could take it
/// in between, which on a test machine does not happen in practice.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

static BUILT: OnceLock<Result<(), String>> = OnceLock::new();

/// The binaries these tests run. `cargo test --workspace` builds them; `cargo test -p
/// fleetmark-e2e` does not, so the first use builds them (a no-op when they are up to date),
/// lest the tests silently run stale binaries. `FLEETMARK_E2E_NO_BUILD=1` skips that.
pub const BINARY_PACKAGES: &[&str] = &["fleetmark-coordinator", "fleetmark-agent", "fleetmark"];

fn build_binaries() -> Result<(), String> {
    if std::env::var_os("FLEETMARK_E2E_NO_BUILD").is_some() {
        return Ok(());
    }
    // target/<profile>/deps/<this test> -> target/<profile> -> target
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or("the test binary is not in target/<profile>/deps")?;
    let target_dir = profile_dir.parent().ok_or("no target directory")?;
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the e2e crate lives in the workspace")
        .join("Cargo.toml");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet", "--bins"])
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(target_dir);
    for p in BINARY_PACKAGES {
        cmd.args(["-p", p]);
    }
    match profile_dir.file_name().and_then(|p| p.to_str()) {
        Some("debug") => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(other) => {
            cmd.args(["--profile", other]);
        }
        None => return Err("cannot tell the build profile".into()),
    }
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "building the binaries failed ({cmd:?}):\n{}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Path of one of the workspace binaries, built first if needed.
pub fn binary(name: &str) -> PathBuf {
    if let Err(e) = BUILT.get_or_init(build_binaries) {
        panic!("{e}");
    }
    workspace_binary(name)
}

/// A base command for one of the workspace binaries, with a clean environment.
pub fn command(binary_name: &str) -> Command {
    let mut c = Command::new(binary(binary_name));
    for v in SCRUBBED_ENV {
        c.env_remove(v);
    }
    c.env("RUST_LOG", "info,sqlx=warn,h2=warn,tower=warn,hyper=warn")
        .env("NO_COLOR", "1");
    c.stdin(Stdio::null());
    c
}

/// A child process that is SIGKILLed (and reaped) when dropped. Its stdout and stderr go to a
/// log file, printed (the tail of it) if the test is panicking.
pub struct Child {
    name: String,
    child: std::process::Child,
    log: PathBuf,
    status: Option<ExitStatus>,
}

impl Child {
    /// Starts `cmd`, logging to `<dir>/<name>.log` (appending, so a restarted process of the
    /// same name keeps one log).
    pub fn spawn(name: &str, mut cmd: Command, dir: &Path) -> Child {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open the log file");
        let mut header = file.try_clone().expect("log file handle");
        let _ = writeln!(header, "===== {name}: {cmd:?}");
        cmd.stdout(file.try_clone().expect("log file handle"))
            .stderr(file);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Child {
            name: name.to_string(),
            child,
            log,
            status: None,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process has written so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The exit status, if the process has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status
    }

    /// Panics, with the log, if the process has exited.
    pub fn assert_running(&mut self) {
        if let Some(s) = self.try_wait() {
            panic!(
                "{} exited unexpectedly ({s}); its log:\n{}",
                self.name,
                self.log()
            );
        }
    }

    /// Sends `signal` to the process, if it has not exited.
    pub fn signal(&mut self, signal: libc::c_int) {
        if self.try_wait().is_none() {
            // SAFETY: kill(2) on the pid of a child we have not reaped yet: it cannot be reused.
            unsafe {
                libc::kill(self.child.id() as libc::pid_t, signal);
            }
        }
    }

    /// SIGKILL, then reap. A process that is already gone is fine.
    pub fn kill(&mut self) {
        if self.try_wait().is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }

    /// SIGTERM, then wait up to `grace` for a clean exit; SIGKILL after that. Returns the exit
    /// status when the process left by itself.
    pub async fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Some(s) = self.try_wait() {
            return Some(s);
        }
        // SAFETY: kill(2) on the pid of a child we have not reaped yet: it cannot be reused.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = tokio::time::Instant::now() + grace;
        while tokio::time::Instant::now() < deadline {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.kill();
        None
    }

    /// Waits for the process to exit by itself, panicking with its log after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let what = format!("{} to exit", self.name);
        eventually(timeout, &what, || {
            let s = self.try_wait();
            async move { s }
        })
        .await
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(60)..];
            eprintln!(
                "----- last {} lines of {} ({}) -----\n{}\n-----",
                tail.len(),
                self.name,
                self.log.display(),
                tail.join("\n")
            );
        }
    }
}

/// The admin and agent tokens of each coordinator URL this test process started.
static CREDENTIALS: Mutex<BTreeMap<String, (String, String)>> = Mutex::new(BTreeMap::new());

/// The tokens made for the coordinator at `url`; for a list of coordinators (failover), those
/// of the first (they share one database, so its tokens are good at every one of them).
fn credentials(url: &str) -> Option<(String, String)> {
    let first = url.split(',').next().unwrap_or(url).trim();
    CREDENTIALS.lock().expect("credentials").get(first).cloned()
}

/// The admin token the harness made for the coordinator at `url`.
pub fn admin_token(url: &str) -> String {
    credentials(url)
        .unwrap_or_else(|| panic!("no coordinator started at {url}"))
        .0
}

/// The agent token the harness made for the coordinator at `url`.
pub fn agent_token(url: &str) -> String {
    credentials(url)
        .unwrap_or_else(|| panic!("no coordinator started at {url}"))
        .1
}

/// Creates an API token with the real `fleetmark-coordinator token create` and returns its
/// secret (the command's stdout). `extra` adds flags such as `--expires 1s`.
pub fn create_token(database_url: &str, role: &str, extra: &[&str]) -> String {
    let out = command("fleetmark-coordinator")
        .args([
            "token",
            "create",
            "--role",
            role,
            "--database-url",
            database_url,
        ])
        .args(extra)
        .output()
        .expect("run fleetmark-coordinator token create");
    assert!(
        out.status.success(),
        "token create failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let secret = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(secret.starts_with("fmt_"), "a token on stdout: {secret:?}");
    secret
}

/// Flags for a coordinator process.
#[derive(Debug, Clone)]
pub struct CoordinatorOpts {
    /// More flags, such as `--max-pending-jobs 5`.
    pub extra: Vec<String>,
    pub lease: &'static str,
    pub heartbeat: &'static str,
    pub reap_interval: &'static str,
    /// How long a claim waits for its agent's acknowledgement (`--claim-grace`).
    pub claim_grace: &'static str,
}

impl Default for CoordinatorOpts {
    fn default() -> Self {
        CoordinatorOpts {
            extra: Vec::new(),
            lease: "10s",
            heartbeat: "500ms",
            reap_interval: "200ms",
            claim_grace: "5s",
        }
    }
}

/// A coordinator with the default options on a fresh database, run from a scratch folder: how
/// most end-to-end tests begin. Fields drop in order: the coordinator before its database.
pub struct Stack {
    pub coord: Coordinator,
    pub db: TestDb,
    pub dir: tempfile::TempDir,
}

impl Stack {
    pub async fn start() -> Stack {
        let dir = scratch();
        let db = TestDb::new().await;
        let coord = Coordinator::start(
            "coordinator",
            dir.path(),
            &db.url,
            free_port(),
            &CoordinatorOpts::default(),
        )
        .await;
        Stack { coord, db, dir }
    }
}

/// A coordinator process and the URL it serves on.
pub struct Coordinator {
    pub process: Child,
    pub url: String,
    pub port: u16,
    /// An admin token.
    pub token: Option<String>,
    /// An agent token.
    pub agent_token: String,
}

impl Coordinator {
    /// Starts `fleetmark-coordinator` on `port` and waits until it answers gRPC calls (it has
    /// connected to the database and applied the migrations by then).
    pub async fn start(
        name: &str,
        dir: &Path,
        database_url: &str,
        port: u16,
        opts: &CoordinatorOpts,
    ) -> Coordinator {
        let mut cmd = command("fleetmark-coordinator");
        cmd.arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--database-url")
            .arg(database_url)
            .args(["--lease", opts.lease])
            .args(["--heartbeat", opts.heartbeat])
            .args(["--reap-interval", opts.reap_interval])
            .args(["--claim-grace", opts.claim_grace])
            .args(["--db-connections", "8"]);
        cmd.args(&opts.extra);
        let admin = create_token(database_url, "admin", &[]);
        let agent = create_token(database_url, "agent", &[]);
        let url = format!("http://127.0.0.1:{port}");
        CREDENTIALS
            .lock()
            .expect("credentials")
            .insert(url.clone(), (admin.clone(), agent.clone()));
        let mut c = Coordinator {
            process: Child::spawn(name, cmd, dir),
            url,
            port,
            token: Some(admin),
            agent_token: agent,
        };
        c.wait_ready().await;
        c
    }

    /// Polls a cheap call until it succeeds; panics with the log if the process dies first.
    pub async fn wait_ready(&mut self) {
        let client = sweep_client(&self.url, self.token.as_deref()).expect("client");
        let process = &mut self.process;
        eventually(START_TIMEOUT, "the coordinator to answer", || {
            process.assert_running();
            let mut client = client.clone();
            async move {
                within(client.list_sweeps(pb::ListSweepsRequest { limit: 1 }))
                    .await?
                    .ok()
                    .map(|_| ())
            }
        })
        .await;
    }

    pub fn client(&self) -> SweepClient {
        sweep_client(&self.url, self.token.as_deref()).expect("client")
    }

    /// Freezes the process (SIGSTOP): it keeps its sockets but answers nothing, as a hung
    /// coordinator would.
    pub fn freeze(&mut self) {
        self.process.signal(libc::SIGSTOP);
    }

    /// Lets a frozen process run again (SIGCONT).
    pub fn thaw(&mut self) {
        self.process.signal(libc::SIGCONT);
    }
}

/// Starts an agent serving `device` ("cpu" or "simulated") for the coordinator at `url`.
pub fn start_agent(name: &str, dir: &Path, url: &str, device: &str, extra: &[&str]) -> Child {
    let mut cmd = command("fleetmark-agent");
    cmd.args(["--coordinator", url, "--name", name, "--device", device])
        .args(extra);
    if !extra.contains(&"--token") {
        if let Some((_, agent)) = credentials(url) {
            cmd.arg("--token").arg(agent);
        }
    }
    Child::spawn(name, cmd, dir)
}

/// One poll of a condition, bounded so that a call that hangs counts as "not yet" instead of
/// stalling the test past its deadline.
pub async fn within<F: std::future::Future>(f: F) -> Option<F::Output> {
    tokio::time::timeout(Duration::from_secs(10), f).await.ok()
}

/// Waits until every named agent shows as online at the coordinator.
pub async fn wait_agents_online(client: &SweepClient, names: &[&str]) -> Vec<pb::AgentStatus> {
    eventually(
        START_TIMEOUT,
        &format!("agents {names:?} to be online"),
        || {
            let mut client = client.clone();
            async move {
                let agents = within(client.list_agents(pb::ListAgentsRequest {}))
                    .await?
                    .ok()?
                    .into_inner()
                    .agents;
                let online = names
                    .iter()
                    .all(|n| agents.iter().any(|a| a.name == *n && a.state == "online"));
                online.then_some(agents)
            }
        },
    )
    .await
}

/// Runs the `fleetmark` CLI against `url` (with `token` if given) and returns its output. Fails
/// the test if it runs longer than `SWEEP_TIMEOUT`.
pub async fn cli(url: &str, token: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::from(command("fleetmark"));
    cmd.env("RUST_LOG", "warn").arg("--coordinator").arg(url);
    let default = credentials(url).map(|c| c.0);
    if let Some(t) = token.or(default.as_deref()).filter(|t| !t.is_empty()) {
        cmd.arg("--token").arg(t);
    }
    cmd.args(args).kill_on_drop(true);
    match tokio::time::timeout(SWEEP_TIMEOUT, cmd.output()).await {
        Ok(out) => out.expect("run fleetmark"),
        Err(_) => panic!(
            "`fleetmark {}` did not finish within {SWEEP_TIMEOUT:?}",
            args.join(" ")
        ),
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Panics, showing both streams, unless the command exited 0.
pub fn assert_success(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        o.status,
        stdout(o),
        stderr(o)
    );
}

/// The stability rule relaxed for tests that are not about it: 10 ms windows, any spread up to
/// 11x accepted, so jobs stop right after their minimums on a loaded machine.
pub const RELAXED_STABILITY: &str = "stability_window = \"10ms\"\nstability_tolerance = 10.0\n";

/// A sweep file's text for ResNet18 at a small image size with a short measurement.
pub fn sweep_toml(name: &str, batches: &[u32], image_size: u32, min_duration: &str) -> String {
    let batches: Vec<String> = batches.iter().map(u32::to_string).collect();
    format!(
        "name = \"{name}\"\nmodel = \"resnet18\"\nbatch_sizes = [{}]\nprecisions = [\"f32\"]\n\
         gpus = [\"any\"]\nimage_size = {image_size}\n\n[measurement]\nwarmup_iterations = 1\n\
         warmup_duration = \"0s\"\nmin_iterations = 3\nmin_duration = \"{min_duration}\"\n\
         max_duration = \"60s\"\n{RELAXED_STABILITY}",
        batches.join(", ")
    )
}

/// Writes `toml` to `<dir>/<name>.toml`, submits it with `fleetmark submit --file`, and returns
/// the sweep id it printed.
pub async fn submit_file(
    url: &str,
    token: Option<&str>,
    dir: &Path,
    name: &str,
    toml: &str,
) -> Uuid {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, toml).expect("write the sweep file");
    let out = cli(
        url,
        token,
        &["submit", "--file", path.to_str().expect("utf-8 path")],
    )
    .await;
    assert_success(&out, "fleetmark submit");
    parse_id(&out)
}

/// The UUID a command printed on stdout.
pub fn parse_id(out: &Output) -> Uuid {
    let s = stdout(out);
    Uuid::parse_str(s.trim())
        .unwrap_or_else(|e| panic!("expected a sweep id on stdout, got {s:?}: {e}"))
}

/// A small pool on the test's database, for checking what the coordinator stored.
pub async fn pool(url: &str) -> PgPool {
    PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"))
}

/// One job row, as the tests look at it.
#[derive(Debug, Clone, PartialEq)]
pub struct JobInfo {
    pub id: Uuid,
    pub seq: i32,
    pub state: String,
    pub attempt: i32,
    pub phase: Option<String>,
    pub lease_agent_id: Option<Uuid>,
    pub last_agent_id: Option<Uuid>,
    pub batch_size: i64,
}

pub async fn jobs(pool: &PgPool, sweep: Uuid) -> sqlx::Result<Vec<JobInfo>> {
    let rows = sqlx::query(
        "SELECT id, seq, state::text AS state, attempt, phase, lease_agent_id, last_agent_id, \
                (spec->>'batch_size')::bigint AS batch_size \
         FROM jobs WHERE sweep_id = $1 ORDER BY seq",
    )
    .bind(sweep)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(JobInfo {
                id: r.try_get("id")?,
                seq: r.try_get("seq")?,
                state: r.try_get("state")?,
                attempt: r.try_get("attempt")?,
                phase: r.try_get("phase")?,
                lease_agent_id: r.try_get("lease_agent_id")?,
                last_agent_id: r.try_get("last_agent_id")?,
                batch_size: r.try_get("batch_size")?,
            })
        })
        .collect()
}

/// How a job's runs ended so far: (attempt, failures, hand-backs, error).
pub async fn job_counts(pool: &PgPool, job: Uuid) -> (i32, i32, i32, Option<String>) {
    sqlx::query_as("SELECT attempt, failures, handbacks, error FROM jobs WHERE id = $1")
        .bind(job)
        .fetch_one(pool)
        .await
        .expect("job counts")
}

/// One stored result row.
#[derive(Debug, Clone, PartialEq)]
pub struct ResultInfo {
    pub id: Uuid,
    pub job_id: Uuid,
    pub agent_id: Uuid,
    pub attempt: i32,
    pub batch_size: i32,
    pub hardware_kind: String,
    pub simulated: bool,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub images_per_sec: f64,
    pub latencies: usize,
}

pub async fn results(pool: &PgPool, sweep: Uuid) -> sqlx::Result<Vec<ResultInfo>> {
    let rows = sqlx::query(
        "SELECT id, job_id, agent_id, attempt, batch_size, hardware_kind, simulated, p50_ms, \
                p99_ms, images_per_sec, cardinality(latencies_ms) AS latencies \
         FROM results WHERE sweep_id = $1 ORDER BY batch_size, finished_at",
    )
    .bind(sweep)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(ResultInfo {
                id: r.try_get("id")?,
                job_id: r.try_get("job_id")?,
                agent_id: r.try_get("agent_id")?,
                attempt: r.try_get("attempt")?,
                batch_size: r.try_get("batch_size")?,
                hardware_kind: r.try_get("hardware_kind")?,
                simulated: r.try_get("simulated")?,
                p50_ms: r.try_get("p50_ms")?,
                p99_ms: r.try_get("p99_ms")?,
                images_per_sec: r.try_get("images_per_sec")?,
                latencies: r.try_get::<i32, _>("latencies")? as usize,
            })
        })
        .collect()
}

/// The id of the agent registered under `name`.
pub async fn agent_id(pool: &PgPool, name: &str) -> Uuid {
    sqlx::query_scalar("SELECT id FROM agents WHERE name = $1")
        .bind(name)
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("no agent {name} in the database: {e}"))
}

pub async fn sweep_state(pool: &PgPool, sweep: Uuid) -> sqlx::Result<String> {
    sqlx::query_scalar("SELECT state FROM sweeps WHERE id = $1")
        .bind(sweep)
        .fetch_one(pool)
        .await
}

/// Waits until the sweep is no longer active. Database errors (say, while it restarts) count as
/// "not yet".
pub async fn wait_sweep_finished(pool: &PgPool, sweep: Uuid, timeout: Duration) -> String {
    eventually(
        timeout,
        &format!("sweep {sweep} to finish"),
        || async move {
            sweep_state(pool, sweep)
                .await
                .ok()
                .filter(|s| s != "active")
        },
    )
    .await
}

/// Checks the outcome every test wants after a disturbance: the sweep completed with exactly
/// `expected_jobs` jobs, every one succeeded, and each has exactly one stored result, from the
/// attempt and agent the job row names. Returns the jobs and results.
pub async fn assert_sweep_complete_once(
    pool: &PgPool,
    sweep: Uuid,
    expected_jobs: usize,
) -> (Vec<JobInfo>, Vec<ResultInfo>) {
    let state = sweep_state(pool, sweep).await.expect("sweep state");
    let jobs = jobs(pool, sweep).await.expect("jobs");
    let results = results(pool, sweep).await.expect("results");
    assert_eq!(state, "completed", "sweep state; jobs: {jobs:#?}");
    assert_eq!(jobs.len(), expected_jobs, "job count: {jobs:#?}");
    for j in &jobs {
        assert_eq!(j.state, "succeeded", "every job succeeds: {j:#?}");
        assert!(
            j.lease_agent_id.is_none(),
            "finished jobs hold no lease: {j:#?}"
        );
        let mine: Vec<&ResultInfo> = results.iter().filter(|r| r.job_id == j.id).collect();
        assert_eq!(
            mine.len(),
            1,
            "exactly one result for job {j:#?}; results: {results:#?}"
        );
        let r = mine[0];
        assert_eq!(
            r.attempt, j.attempt,
            "the result is from the job's last attempt"
        );
        assert_eq!(
            Some(r.agent_id),
            j.last_agent_id,
            "the result is from the job's last agent"
        );
        assert!(
            r.latencies >= 1 && r.images_per_sec > 0.0,
            "sane result {r:#?}"
        );
        assert!(r.p50_ms <= r.p99_ms, "p50 <= p99 in {r:#?}");
    }
    assert_eq!(
        results.len(),
        expected_jobs,
        "no stray results: {results:#?}"
    );
    (jobs, results)
}

/// A fresh temporary folder for a test's logs and files. Removed afterwards, unless
/// `FLEETMARK_E2E_KEEP` is set (its path is printed then).
pub fn scratch() -> tempfile::TempDir {
    let keep = std::env::var_os("FLEETMARK_E2E_KEEP").is_some();
    let dir = tempfile::Builder::new()
        .prefix("fleetmark-e2e-")
        .disable_cleanup(keep)
        .tempdir()
        .expect("temp dir");
    if keep {
        eprintln!("keeping logs in {}", dir.path().display());
    }
    dir
}

/// The spec of a job, as the coordinator stored it.
pub async fn job_spec(pool: &PgPool, job: Uuid) -> fleetmark_core::JobSpec {
    let v: serde_json::Value = sqlx::query_scalar("SELECT spec FROM jobs WHERE id = $1")
        .bind(job)
        .fetch_one(pool)
        .await
        .expect("job spec");
    serde_json::from_value(v).expect("a job spec")
}

/// A well-formed, internally consistent result record with made-up latencies, as an agent that
/// ran `spec` for `job` would send it.
pub fn made_up_result(
    job: Option<Uuid>,
    attempt: u32,
    agent_name: &str,
    spec: fleetmark_core::JobSpec,
) -> fleetmark_core::BenchResult {
    use fleetmark_core::{BackendInfo, BenchResult, LatencyStats};
    let latencies = vec![4.0, 5.0, 6.0];
    let latency = LatencyStats::from_samples(&latencies).expect("stats");
    let now = chrono::Utc::now();
    BenchResult {
        schema: fleetmark_core::RESULT_SCHEMA_VERSION,
        job_id: job,
        attempt,
        agent_name: agent_name.into(),
        agent_labels: Default::default(),
        price_per_hour: None,
        hardware_kind: "cpu".into(),
        hardware_name: "cpu device".into(), // what `register_raw` registers
        device: "cpu".into(),
        images_per_sec: latency.images_per_sec(spec.batch_size),
        spec,
        backend: BackendInfo {
            backend: "candle-cpu".into(),
            path: "fused".into(),
            math: "f32".into(),
            details: Default::default(),
            simulated: false,
        },
        weights: Default::default(),
        latency,
        input_copy: None,
        peak_memory_bytes: 0,
        memory_scope: "process-rss".into(),
        warmup_iterations: 1,
        timed_seconds: 0.015,
        telemetry: None,
        correctness: None,
        environment: Default::default(),
        host: Default::default(),
        started_at: now,
        finished_at: now,
        latencies_ms: latencies,
        stability: None,
    }
}

/// Registers an agent the way an outsider would: a plain tonic channel and the generated
/// client, with `token` as the bearer. Returns the response (agent id and secret).
pub async fn register_raw(
    url: &str,
    token: &str,
    name: &str,
    kind: &str,
) -> Result<pb::RegisterResponse, tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut client = pb::agent_service_client::AgentServiceClient::new(channel);
    client
        .register(bearer(
            pb::RegisterRequest {
                name: name.into(),
                devices: vec![pb::AgentDevice {
                    device: "cpu".into(),
                    kind: kind.into(),
                    name: format!("{kind} device"),
                    precisions: vec![],
                    health: None,
                    health_flags: vec![],
                }],
                inventory: Some(Default::default()),
                ..Default::default()
            },
            token,
        ))
        .await
        .map(|r| r.into_inner())
}

/// A request with `authorization: Bearer <secret>` (none if `secret` is empty), built by hand.
pub fn bearer<T>(message: T, secret: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    if !secret.is_empty() {
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {secret}").parse().expect("ascii"),
        );
    }
    req
}

/// A plain tonic channel to `url`, connected now.
pub async fn raw_channel(url: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(url.to_string())
        .expect("url")
        .connect()
        .await
        .expect("connect")
}
