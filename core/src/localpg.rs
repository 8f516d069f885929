//! A private PostgreSQL cluster for the quick start and for tests on machines where no server
//! is reachable: found on PATH or under `/usr/lib/postgresql/*/bin`, created with `initdb`,
//! started and stopped with `pg_ctl`, listening on loopback only.
//!
//! PostgreSQL refuses to run as root. When we are root, the cluster is owned by and run as the
//! `postgres` system user, which the distribution's packages create.

use std::{
    fs,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum LocalPgError {
    #[error(
        "no PostgreSQL server binaries found: looked for initdb and pg_ctl on PATH and in \
         /usr/lib/postgresql/*/bin. Install PostgreSQL (for example `apt-get install postgresql`) \
         or set DATABASE_URL to a server you can reach"
    )]
    NotFound,
    #[error("running as root, but there is no 'postgres' user to run the private cluster as")]
    NoPostgresUser,
    #[error("{step} failed: {detail}")]
    Command { step: String, detail: String },
    #[error("io error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A running private cluster. Dropping it does not stop it; call [`LocalPostgres::stop`].
#[derive(Debug, Clone)]
pub struct LocalPostgres {
    pub bin_dir: PathBuf,
    pub data_dir: PathBuf,
    pub port: u16,
    /// False when `start` found the server already running (and so should leave it running).
    pub started_here: bool,
    run_as: Option<String>,
}

/// Where the server binaries are: the directory holding both `initdb` and `pg_ctl`.
pub fn find_server_binaries() -> Result<PathBuf, LocalPgError> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Ok(entries) = fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin"))
            .collect();
        // Newest major version first.
        versions.sort_by_key(|p| {
            std::cmp::Reverse(
                p.parent()
                    .and_then(|v| v.file_name())
                    .and_then(|v| v.to_str())
                    .and_then(|v| v.parse::<u32>().ok())
                    .unwrap_or(0),
            )
        });
        candidates.extend(versions);
    }
    candidates
        .into_iter()
        .find(|dir| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file())
        .ok_or(LocalPgError::NotFound)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn postgres_user_exists() -> bool {
    Command::new("id")
        .arg("-u")
        .arg("postgres")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn free_port() -> Result<u16, LocalPgError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|source| LocalPgError::Io {
        path: "127.0.0.1:0".into(),
        source,
    })?;
    Ok(l.local_addr().expect("bound socket has an address").port())
}

fn describe(out: &Output) -> String {
    let mut s = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if s.is_empty() {
        s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    }
    format!("{} ({})", s, out.status)
}

impl LocalPostgres {
    /// The default data folder for the quick start: `$XDG_DATA_HOME/fleetmark/postgres`, or
    /// `~/.local/share/fleetmark/postgres`. Root's home is closed to the `postgres` user, so
    /// root gets `/var/lib/fleetmark/postgres`.
    pub fn default_data_dir() -> PathBuf {
        if is_root() {
            return PathBuf::from("/var/lib/fleetmark/postgres");
        }
        if let Some(x) = std::env::var_os("XDG_DATA_HOME") {
            return PathBuf::from(x).join("fleetmark/postgres");
        }
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| ".".into());
        home.join(".local/share/fleetmark/postgres")
    }

    /// Starts (creating if needed) a cluster in `data_dir` on a free loopback port. A cluster
    /// already running there is reused.
    pub fn start(data_dir: &Path) -> Result<Self, LocalPgError> {
        let bin_dir = find_server_binaries()?;
        let run_as = if is_root() {
            if !postgres_user_exists() {
                return Err(LocalPgError::NoPostgresUser);
            }
            Some("postgres".to_string())
        } else {
            None
        };
        let mut pg = LocalPostgres {
            bin_dir,
            data_dir: data_dir.to_path_buf(),
            port: 0,
            started_here: false,
            run_as,
        };
        if let Some(port) = pg.running_port() {
            pg.port = port;
            return Ok(pg);
        }
        pg.started_here = true;
        if !data_dir.join("PG_VERSION").exists() {
            pg.init()?;
        }
        pg.port = free_port()?;
        pg.pg_ctl_start()?;
        Ok(pg)
    }

    fn io<T>(path: &Path, r: std::io::Result<T>) -> Result<T, LocalPgError> {
        r.map_err(|source| LocalPgError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    fn command(&self, program: &str) -> Command {
        let exe = self.bin_dir.join(program);
        match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.arg("-u").arg(user).arg("--").arg(exe);
                c
            }
            None => Command::new(exe),
        }
    }

    fn run(&self, step: &str, mut cmd: Command) -> Result<(), LocalPgError> {
        let out = cmd.output().map_err(|e| LocalPgError::Command {
            step: step.into(),
            detail: e.to_string(),
        })?;
        if out.status.success() {
            Ok(())
        } else {
            Err(LocalPgError::Command {
                step: step.into(),
                detail: describe(&out),
            })
        }
    }

    fn init(&self) -> Result<(), LocalPgError> {
        Self::io(&self.data_dir, fs::create_dir_all(&self.data_dir))?;
        if let Some(user) = &self.run_as {
            // The cluster's files must belong to the user that runs it, and its parents must be
            // traversable by that user.
            let out = Command::new("chown")
                .arg("-R")
                .arg(format!("{user}:{user}"))
                .arg(&self.data_dir)
                .output();
            match out {
                Ok(o) if o.status.success() => {}
                Ok(o) => {
                    return Err(LocalPgError::Command {
                        step: "chown of the data folder".into(),
                        detail: describe(&o),
                    })
                }
                Err(e) => {
                    return Err(LocalPgError::Command {
                        step: "chown of the data folder".into(),
                        detail: e.to_string(),
                    })
                }
            }
        }
        let mut cmd = self.command("initdb");
        cmd.arg("-D").arg(&self.data_dir).args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        ]);
        self.run("initdb", cmd)
    }

    fn pg_ctl_start(&self) -> Result<(), LocalPgError> {
        let log = self.data_dir.join("server.log");
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&log)
            .arg("-w")
            .args(["-t", "60"])
            .arg("-o")
            .arg(format!(
                "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories='{}' -c fsync=off \
                 -c max_connections=200",
                self.port,
                self.data_dir.display()
            ))
            .arg("start");
        self.run("pg_ctl start", cmd).map_err(|e| match e {
            LocalPgError::Command { step, detail } => {
                let tail = fs::read_to_string(&log)
                    .map(|s| s.lines().rev().take(5).collect::<Vec<_>>().join(" | "))
                    .unwrap_or_default();
                LocalPgError::Command {
                    step,
                    detail: format!("{detail}; server log: {tail}"),
                }
            }
            other => other,
        })
    }

    /// The port of a server already running on this data folder, from `postmaster.pid`.
    fn running_port(&self) -> Option<u16> {
        let pid_file = fs::read_to_string(self.data_dir.join("postmaster.pid")).ok()?;
        let mut lines = pid_file.lines();
        let pid: i32 = lines.next()?.trim().parse().ok()?;
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return None;
        }
        lines.nth(2)?.trim().parse().ok()
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server (fast mode: open sessions are ended).
    pub fn stop(&self) -> Result<(), LocalPgError> {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D")
            .arg(&self.data_dir)
            .args(["-m", "fast", "-w", "stop"]);
        self.run("pg_ctl stop", cmd)
    }

    /// Starts a stopped server again on the same port.
    pub fn restart_stopped(&self) -> Result<(), LocalPgError> {
        self.pg_ctl_start()
    }
}
