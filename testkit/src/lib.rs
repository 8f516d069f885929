//! Test fixtures shared by the store, service and end-to-end tests.
//!
//! [`TestDb`] gives each test its own fresh database (the same idea as `#[sqlx::test]`), on the
//! first server it can find: `FLEETMARK_TEST_DATABASE_URL`, then `DATABASE_URL`, then the local
//! default `postgres://postgres@127.0.0.1:5432/postgres`, and failing those a private cluster it
//! starts itself from the PostgreSQL binaries on the machine. If none of that works, the test
//! fails with a message saying what was tried.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use fleetmark_core::localpg::LocalPostgres;
use sqlx::{postgres::PgConnectOptions, ConnectOptions, Connection, PgConnection};
use tokio::sync::OnceCell;

static SERVER: OnceCell<Result<String, String>> = OnceCell::const_new();

async fn reachable(url: &str) -> bool {
    match url.parse::<PgConnectOptions>() {
        Ok(opts) => tokio::time::timeout(Duration::from_secs(3), opts.connect())
            .await
            .map(|r| r.is_ok())
            .unwrap_or(false),
        Err(_) => false,
    }
}

async fn find_server() -> Result<String, String> {
    let mut tried = Vec::new();
    for var in ["FLEETMARK_TEST_DATABASE_URL", "DATABASE_URL"] {
        if let Ok(url) = std::env::var(var) {
            if reachable(&url).await {
                return Ok(url);
            }
            tried.push(format!("{var}={url} (not reachable)"));
        }
    }
    let local = "postgres://postgres@127.0.0.1:5432/postgres";
    if reachable(local).await {
        return Ok(local.to_string());
    }
    tried.push(format!("{local} (not reachable)"));
    // A private cluster shared by every test process of this user, started once.
    let dir = std::env::temp_dir().join(format!("fleetmark-test-pg-{}", whoami()));
    match tokio::task::spawn_blocking(move || LocalPostgres::start(&dir)).await {
        Ok(Ok(pg)) => Ok(pg.url()),
        Ok(Err(e)) => {
            tried.push(format!("a private cluster: {e}"));
            Err(format!(
                "no PostgreSQL server for the tests. Tried: {}",
                tried.join("; ")
            ))
        }
        Err(e) => Err(format!("starting a private cluster panicked: {e}")),
    }
}

fn whoami() -> String {
    std::env::var("USER").unwrap_or_else(|_| "user".into())
}

/// A URL of a server the tests can create databases on.
pub async fn server_url() -> String {
    match SERVER.get_or_init(find_server).await {
        Ok(url) => url.clone(),
        Err(e) => panic!("{e}"),
    }
}

fn with_database(url: &str, db: &str) -> String {
    let opts: PgConnectOptions = url.parse().expect("valid postgres url");
    let host = opts.get_host();
    let port = opts.get_port();
    let user = opts.get_username();
    format!("postgres://{user}@{host}:{port}/{db}")
}

/// A fresh, empty database, dropped when the value is dropped.
pub struct TestDb {
    pub url: String,
    name: String,
    admin_url: String,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let admin_url = server_url().await;
        Self::create_on(&admin_url).await
    }

    /// A fresh database on a specific server (for tests that run their own cluster).
    pub async fn create_on(admin_url: &str) -> TestDb {
        let name = format!("fleetmark_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = PgConnection::connect(admin_url)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {admin_url}: {e}"));
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("cannot create test database {name}: {e}"));
        let _ = conn.close().await;
        TestDb {
            url: with_database(admin_url, &name),
            name,
            admin_url: admin_url.to_string(),
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin = self.admin_url.clone();
        let name = self.name.clone();
        // Drop runs outside any runtime (or inside one we must not block): use a thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                if let Ok(mut c) = PgConnection::connect(&admin).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                    )))
                    .execute(&mut c)
                    .await;
                }
            })
        })
        .join();
    }
}

/// A private PostgreSQL cluster that a test owns and may stop and restart.
pub struct PrivateCluster {
    pub pg: LocalPostgres,
    _dir: tempfile::TempDir,
}

impl PrivateCluster {
    /// Starts one in a new temporary folder. Panics, saying why, if no server binaries exist.
    pub fn start() -> PrivateCluster {
        let dir = tempfile::Builder::new()
            .prefix("fleetmark-pg-")
            .tempdir_in(std::env::temp_dir())
            .expect("temp dir");
        make_traversable(dir.path());
        let pg = LocalPostgres::start(&dir.path().join("data"))
            .unwrap_or_else(|e| panic!("cannot start a private PostgreSQL cluster: {e}"));
        PrivateCluster { pg, _dir: dir }
    }

    pub fn url(&self) -> String {
        self.pg.url()
    }

    pub fn stop(&self) {
        self.pg.stop().expect("pg_ctl stop");
    }

    pub fn start_again(&self) {
        self.pg.restart_stopped().expect("pg_ctl start");
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let _ = self.pg.stop();
    }
}

/// The cluster may run as another user (root runs it as `postgres`): let it into the folder.
fn make_traversable(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o777));
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`. For waiting on
/// real processes and databases, where there is no event to await.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Path of a workspace binary built next to the running test (`target/<profile>/<name>`).
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(|p| p.parent())
        .expect("test binary lives in target/<profile>/deps");
    let path = dir.join(name);
    if !path.exists() {
        panic!(
            "{} is not built: run the tests with `cargo test --workspace` (which builds every \
             binary) or build it with `cargo build --bin {name}`",
            path.display()
        );
    }
    path
}
