//! Standalone mode: run a sweep file on this machine's devices with no coordinator, and write
//! one JSON result record per line, exactly the records a coordinator would have received.
//! `fleetmark import` loads the file into Postgres later, from anywhere.

use std::{
    collections::VecDeque,
    io::Write,
    path::{Path, PathBuf},
    sync::{atomic::AtomicBool, Arc, Mutex},
};

use fleetmark_core::{HardwareKind, JobSpec, SweepSpec};
use fleetmark_engine::{AgentIdentity, EngineError, JobContext};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{open_devices, AgentError, Config};

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub succeeded: usize,
    pub failed: usize,
    /// Jobs whose hardware target no local device matches.
    pub skipped: usize,
}

/// Runs every job of `sweep_file` that one of the configured devices can take, one job per
/// device at a time, appending each result to `out` as soon as it exists (so a crash loses at
/// most the job in flight).
pub async fn run_sweep(
    config: &Config,
    sweep_file: &Path,
    out: &Path,
    cancel: Arc<AtomicBool>,
) -> Result<Summary, AgentError> {
    let text = std::fs::read_to_string(sweep_file).map_err(|cause| AgentError::Io {
        context: format!("cannot read {}", sweep_file.display()),
        cause,
    })?;
    let spec = SweepSpec::from_toml(&text)?;
    let jobs = spec.expand()?;
    let workers = open_devices(&config.devices, &config.backend)?;
    let kinds: Vec<HardwareKind> = workers
        .iter()
        .map(|w| {
            if w.kind == "cpu" {
                HardwareKind::cpu()
            } else {
                HardwareKind::from_gpu_name(&w.name)
            }
        })
        .collect();
    let runnable: Vec<JobSpec> = jobs
        .iter()
        .filter(|j| kinds.iter().any(|k| j.target.matches(k)))
        .cloned()
        .collect();
    let skipped = jobs.len() - runnable.len();
    if runnable.is_empty() {
        return Err(AgentError::Config(format!(
            "none of the sweep's {} jobs can run here: they target {}, this machine has {}",
            jobs.len(),
            spec.gpus
                .iter()
                .map(|g| g.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            kinds
                .iter()
                .map(|k| k.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    if skipped > 0 {
        warn!(
            skipped,
            "jobs target hardware this machine lacks; skipping them"
        );
    }
    let file = std::fs::File::create(out).map_err(|cause| AgentError::Io {
        context: format!("cannot create {}", out.display()),
        cause,
    })?;
    let sink = Arc::new(Mutex::new(std::io::BufWriter::new(file)));
    let queue = Arc::new(Mutex::new(runnable.into_iter().collect::<VecDeque<_>>()));
    let identity = AgentIdentity {
        name: config.name.clone(),
        labels: config.labels.clone(),
        price_per_hour: config.price_per_hour,
        host: crate::host_inventory(),
    };
    let total = queue.lock().expect("queue").len();
    let summary = Arc::new(Mutex::new(Summary {
        skipped,
        ..Default::default()
    }));
    let mut tasks = Vec::new();
    for (worker, kind) in workers.into_iter().zip(kinds) {
        let queue = queue.clone();
        let sink = sink.clone();
        let identity = identity.clone();
        let summary = summary.clone();
        let cancel = cancel.clone();
        let out: PathBuf = out.to_path_buf();
        tasks.push(tokio::spawn(async move {
            loop {
                let next = {
                    let mut q = queue.lock().expect("queue");
                    let pos = q.iter().position(|j| j.target.matches(&kind));
                    pos.and_then(|p| q.remove(p))
                };
                let Some(job) = next else {
                    return Ok::<(), AgentError>(());
                };
                let label = job.label();
                info!(device = %worker.spec, job = %label, "job started");
                let (ptx, mut prx) = mpsc::unbounded_channel();
                tokio::spawn(async move { while prx.recv().await.is_some() {} });
                let outcome = worker
                    .run(
                        job,
                        JobContext::default(),
                        identity.clone(),
                        cancel.clone(),
                        ptx,
                    )
                    .await;
                match outcome {
                    Ok(result) => {
                        let line = serde_json::to_string(&result).expect("records serialise");
                        let mut w = sink.lock().expect("sink");
                        writeln!(w, "{line}")
                            .and_then(|_| w.flush())
                            .map_err(|cause| AgentError::Io {
                                context: format!("cannot write {}", out.display()),
                                cause,
                            })?;
                        info!(device = %worker.spec, job = %label,
                              images_per_sec = format!("{:.1}", result.images_per_sec),
                              p50_ms = format!("{:.3}", result.latency.p50_ms), "job done");
                        summary.lock().expect("summary").succeeded += 1;
                    }
                    Err(EngineError::Cancelled) => return Ok(()),
                    Err(e) => {
                        warn!(device = %worker.spec, job = %label, error = %e, "job failed");
                        summary.lock().expect("summary").failed += 1;
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await
            .map_err(|e| AgentError::Config(format!("a device task panicked: {e}")))??;
    }
    let s = summary.lock().expect("summary").clone();
    info!(total, succeeded = s.succeeded, failed = s.failed, skipped = s.skipped, out = %out.display(),
          "sweep finished");
    Ok(s)
}
