//! One OS thread per device. The thread opens the device and runs every job on it: CUDA work
//! goes to the calling thread's stream, and a ResNet forward pass must not block the async
//! runtime that keeps the agent talking to its coordinator.

use std::{
    sync::{atomic::AtomicBool, mpsc, Arc},
    thread::JoinHandle,
};

use fleetmark_core::{BenchResult, DeviceHealth, JobSpec, Precision, WeightsSpec};
use fleetmark_engine::{
    backend::Backend,
    device::{open_backend, BackendOptions, DeviceSpec},
    run_job, AgentIdentity, EngineError, JobContext, ModelWeights, Progress,
};
use tokio::sync::{mpsc as tmpsc, oneshot};
use tracing::{info, warn};

struct WorkItem {
    job: JobSpec,
    ctx: JobContext,
    identity: AgentIdentity,
    cancel: Arc<AtomicBool>,
    progress: tmpsc::UnboundedSender<Progress>,
    reply: oneshot::Sender<Result<BenchResult, EngineError>>,
}

pub struct DeviceWorker {
    pub spec: DeviceSpec,
    /// Hardware kind jobs are matched on ("cpu", "h100").
    pub kind: String,
    /// Full device name.
    pub name: String,
    /// Precisions the device can run, declared at registration.
    pub precisions: Vec<Precision>,
    /// The health check run when the device opened (`--health-check`), declared at
    /// registration; `None` when it was not asked for or the device has none.
    pub health: Option<DeviceHealth>,
    tx: Option<mpsc::Sender<WorkItem>>,
    thread: Option<JoinHandle<()>>,
}

impl DeviceWorker {
    /// Opens the device on a new thread; fails with the device's own error if it cannot run.
    pub fn start(spec: DeviceSpec, opts: BackendOptions) -> Result<Self, EngineError> {
        let (tx, rx) = mpsc::channel::<WorkItem>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("device-{spec}"))
            .spawn(move || {
                let mut backend = match open_backend(spec, &opts) {
                    Ok(mut b) => {
                        let (kind, name) = b.hardware();
                        let precisions = fleetmark_core::capability::precisions_for(b.class());
                        let health = if opts.health_check {
                            health_check(spec, b.as_mut())
                        } else {
                            None
                        };
                        let _ = ready_tx.send(Ok((kind, name, precisions, health)));
                        b
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let mut weights: Option<(WeightsSpec, ModelWeights)> = None;
                while let Ok(item) = rx.recv() {
                    // A panic in a job must not take the device thread down with it: the agent
                    // would keep claiming jobs it can no longer run.
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        let w = match &weights {
                            Some((s, w)) if *s == item.job.weights => w,
                            _ => {
                                let w = ModelWeights::load(
                                    &item.job.weights,
                                    opts.weights_dir.as_deref(),
                                )?;
                                &weights.insert((item.job.weights.clone(), w)).1
                            }
                        };
                        let progress = item.progress.clone();
                        run_job(
                            backend.as_mut(),
                            w,
                            &item.job,
                            &item.identity,
                            &item.ctx,
                            &item.cancel,
                            &mut |p| {
                                let _ = progress.send(p);
                            },
                        )
                    }))
                    .unwrap_or_else(|panic| {
                        let msg = panic
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_else(|| "unknown panic".into());
                        Err(EngineError::Unsupported(format!("the job panicked: {msg}")))
                    });
                    let _ = item.reply.send(result);
                }
            })
            .map_err(|e| EngineError::Setup(format!("cannot start a device thread: {e}")))?;
        let (kind, name, precisions, health) = ready_rx.recv().map_err(|_| {
            EngineError::Setup(format!("the {spec} thread died while opening it"))
        })??;
        info!(device = %spec, kind = %kind, name = %name, ?precisions, "device ready");
        Ok(DeviceWorker {
            spec,
            kind,
            name,
            precisions,
            health,
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Runs one job on the device thread and waits for its result.
    pub async fn run(
        &self,
        job: JobSpec,
        ctx: JobContext,
        identity: AgentIdentity,
        cancel: Arc<AtomicBool>,
        progress: tmpsc::UnboundedSender<Progress>,
    ) -> Result<BenchResult, EngineError> {
        let (reply, rx) = oneshot::channel();
        let item = WorkItem {
            job,
            ctx,
            identity,
            cancel,
            progress,
            reply,
        };
        self.tx
            .as_ref()
            .expect("worker is running")
            .send(item)
            .map_err(|_| EngineError::Setup(format!("the {} thread has stopped", self.spec)))?;
        rx.await.map_err(|_| {
            EngineError::Setup(format!("the {} thread died during a job", self.spec))
        })?
    }
}

/// Runs the device's health check, logging what it found; a check that fails is logged and
/// left out (the device still serves jobs: the check describes it, it does not gate it).
fn health_check(spec: DeviceSpec, backend: &mut dyn Backend) -> Option<DeviceHealth> {
    match backend.health_check()? {
        Ok(h) => {
            let gemm: Vec<String> = h
                .gemm_tflops
                .iter()
                .map(|(p, t)| format!("{p}={t:.3}"))
                .collect();
            info!(device = %spec, gemm_tflops = %gemm.join(" "), memory_gbps = format!("{:.1}", h.memory_gbps),
                  host_to_device_gbps = ?h.host_to_device_gbps, sm_clock_mhz = ?h.sm_clock_under_load_mhz,
                  seconds = format!("{:.2}", h.seconds), "health check");
            Some(h)
        }
        Err(e) => {
            warn!(device = %spec, error = %e, "health check failed; the device serves jobs without one");
            None
        }
    }
}

impl Drop for DeviceWorker {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop once its current job is done.
        self.tx.take();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                warn!(device = %self.spec, "device thread panicked");
            }
        }
    }
}
