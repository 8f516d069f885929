//! The gRPC handlers: wire types in, domain calls on the store, wire types out. Each handler
//! converts at the edge and maps errors once, through `CoordinatorError`.

use std::{pin::Pin, sync::Arc, time::Duration};

use fleetmark_core::{BenchResult, SweepSpec};
use fleetmark_proto::{
    convert::{from_timestamp, parse_uuid, result_without_latencies, timestamp},
    v1::{self as pb, agent_service_server::AgentService, sweep_service_server::SweepService},
};
use futures::Stream;
use tonic::{Request, Response, Status};
use tracing::{info, warn};
use uuid::Uuid;

use crate::{
    error::CoordinatorError,
    store::{AgentDevice, AgentRegistration, FailOutcome, JobRow, ResultFilter, SweepRow},
    State,
};

/// The longest a claim may wait for work before answering "none".
const MAX_CLAIM_WAIT: Duration = Duration::from_secs(30);
/// Waiting claims re-check this often even without a notification.
const CLAIM_RECHECK: Duration = Duration::from_secs(1);
/// How often a watch stream looks at the sweep.
const WATCH_POLL: Duration = Duration::from_millis(300);

pub(crate) struct AgentApi(pub Arc<State>);
pub(crate) struct SweepApi(pub Arc<State>);

fn agent_id(s: &str) -> Result<Uuid, Status> {
    parse_uuid("agent id", s).map_err(Into::into)
}

fn job_to_wire(j: &JobRow) -> pb::JobStatus {
    pb::JobStatus {
        job_id: j.id.to_string(),
        spec: Some((&j.spec).into()),
        state: j.state.to_string(),
        attempt: j.attempt as u32,
        agent_name: j.agent_name.clone().unwrap_or_default(),
        device: j.device.clone().unwrap_or_default(),
        phase: j.phase.clone().unwrap_or_default(),
        iterations: j.iterations as u32,
        fraction: j.fraction,
        error: j.error.clone().unwrap_or_default(),
        images_per_sec: j.images_per_sec,
    }
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let r = req.into_inner();
        let name = r.name.trim().to_string();
        if name.is_empty() || name.len() > 200 {
            return Err(Status::invalid_argument(
                "agent name must be 1 to 200 characters",
            ));
        }
        if r.devices.is_empty() {
            return Err(Status::invalid_argument(
                "an agent must serve at least one device",
            ));
        }
        if let Some(p) = r.price_per_hour {
            if !(p.is_finite() && p >= 0.0) {
                return Err(Status::invalid_argument("price per hour must be >= 0"));
            }
        }
        let reg = AgentRegistration {
            name: name.clone(),
            labels: r.labels.into_iter().collect(),
            price_per_hour: r.price_per_hour,
            inventory: r.inventory.unwrap_or_default().into(),
            devices: r
                .devices
                .into_iter()
                .map(|d| AgentDevice {
                    device: d.device,
                    kind: d.kind,
                    name: d.name,
                })
                .collect(),
        };
        let id = self
            .0
            .store
            .register_agent(&reg)
            .await
            .map_err(Status::from)?;
        info!(agent = %name, agent_id = %id, devices = reg.devices.len(), "agent registered");
        Ok(Response::new(pb::RegisterResponse {
            agent_id: id.to_string(),
            heartbeat_interval_ms: self.0.config.heartbeat_interval.as_millis() as u32,
            lease_ms: self.0.config.lease.as_millis() as u32,
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let r = req.into_inner();
        let agent = agent_id(&r.agent_id)?;
        let known = self
            .0
            .store
            .touch_agent(agent)
            .await
            .map_err(Status::from)?;
        if !known {
            return Ok(Response::new(pb::HeartbeatResponse {
                stop: Vec::new(),
                known: false,
            }));
        }
        let running = r
            .running
            .iter()
            .map(|j| Ok((parse_uuid("job id", &j.job_id)?, j.attempt as i32)))
            .collect::<Result<Vec<_>, fleetmark_proto::convert::WireError>>()
            .map_err(Status::from)?;
        let stop = self
            .0
            .store
            .stale_running(agent, &running)
            .await
            .map_err(Status::from)?;
        Ok(Response::new(pb::HeartbeatResponse {
            stop: stop
                .into_iter()
                .map(|(j, a)| pb::JobRef {
                    job_id: j.to_string(),
                    attempt: a as u32,
                })
                .collect(),
            known: true,
        }))
    }

    async fn claim_job(
        &self,
        req: Request<pb::ClaimJobRequest>,
    ) -> Result<Response<pb::ClaimJobResponse>, Status> {
        let r = req.into_inner();
        let agent = agent_id(&r.agent_id)?;
        let state = &self.0;
        let kind = state
            .store
            .device_kind(agent, &r.device)
            .await
            .map_err(Status::from)?;
        state.store.touch_agent(agent).await.map_err(Status::from)?;
        let deadline = tokio::time::Instant::now()
            + Duration::from_millis(r.wait_ms as u64).min(MAX_CLAIM_WAIT);
        loop {
            // Register for wake-ups before looking, so a notification between the look and
            // the wait is not lost.
            let notified = state.wakeup.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let started = std::time::Instant::now();
            if let Some(job) = state
                .store
                .claim_job(agent, &r.device, &kind, state.config.lease)
                .await
                .map_err(Status::from)?
            {
                state
                    .metrics
                    .dispatch
                    .with_label_values(&[kind.as_str()])
                    .observe(started.elapsed().as_secs_f64());
                info!(job_id = %job.id, agent_id = %agent, device = %r.device, attempt = job.attempt,
                      spec = %job.spec.label(), "job claimed");
                return Ok(Response::new(pb::ClaimJobResponse {
                    job: Some(pb::Job {
                        job_id: job.id.to_string(),
                        sweep_id: job.sweep_id.to_string(),
                        attempt: job.attempt as u32,
                        spec: Some((&job.spec).into()),
                        lease_expires_at: job.lease_expires_at.map(timestamp),
                    }),
                }));
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(Response::new(pb::ClaimJobResponse { job: None }));
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(CLAIM_RECHECK.min(deadline - now)) => {}
                _ = state.shutdown.cancelled() => {
                    return Ok(Response::new(pb::ClaimJobResponse { job: None }));
                }
            }
        }
    }

    async fn report_progress(
        &self,
        req: Request<pb::ReportProgressRequest>,
    ) -> Result<Response<pb::ReportProgressResponse>, Status> {
        let r = req.into_inner();
        let agent = agent_id(&r.agent_id)?;
        let job = parse_uuid("job id", &r.job_id).map_err(Status::from)?;
        let phase: String = r.phase.chars().take(32).collect();
        match self
            .0
            .store
            .report_progress(
                agent,
                job,
                r.attempt as i32,
                &phase,
                r.iterations.min(i32::MAX as u32) as i32,
                if r.fraction.is_finite() {
                    r.fraction
                } else {
                    0.0
                },
                self.0.config.lease,
            )
            .await
            .map_err(Status::from)?
        {
            Some(expires) => Ok(Response::new(pb::ReportProgressResponse {
                lease_expires_at: Some(timestamp(expires)),
            })),
            None => Err(CoordinatorError::StaleLease(format!(
                "job {job} attempt {} is no longer leased to this agent",
                r.attempt
            ))
            .into()),
        }
    }

    async fn submit_result(
        &self,
        req: Request<pb::SubmitResultRequest>,
    ) -> Result<Response<pb::SubmitResultResponse>, Status> {
        let r = req.into_inner();
        let agent = agent_id(&r.agent_id)?;
        let result: BenchResult = r
            .result
            .ok_or_else(|| Status::invalid_argument("missing result"))?
            .try_into()
            .map_err(|e: fleetmark_proto::convert::WireError| Status::from(e))?;
        match self.0.store.submit_result(agent, &result).await {
            Ok(id) => {
                info!(job_id = ?result.job_id, agent_id = %agent, images_per_sec = result.images_per_sec,
                      "result accepted");
                self.0.metrics.results.with_label_values(&["agent"]).inc();
                Ok(Response::new(pb::SubmitResultResponse {
                    result_id: id.to_string(),
                }))
            }
            Err(e) => {
                if matches!(e, CoordinatorError::StaleLease(_)) {
                    warn!(job_id = ?result.job_id, attempt = result.attempt, agent_id = %agent,
                          "stale result rejected");
                }
                Err(e.into())
            }
        }
    }

    async fn fail_job(
        &self,
        req: Request<pb::FailJobRequest>,
    ) -> Result<Response<pb::FailJobResponse>, Status> {
        let r = req.into_inner();
        let agent = agent_id(&r.agent_id)?;
        let job = parse_uuid("job id", &r.job_id).map_err(Status::from)?;
        let reason: String = r.reason.chars().take(4000).collect();
        match self
            .0
            .store
            .fail_job(agent, job, r.attempt as i32, &reason, r.permanent)
            .await
            .map_err(Status::from)?
        {
            Some(outcome) => {
                warn!(job_id = %job, attempt = r.attempt, permanent = r.permanent, reason = %reason,
                      "job attempt failed");
                Ok(Response::new(pb::FailJobResponse {
                    state: match outcome {
                        FailOutcome::Retried => "pending",
                        FailOutcome::Failed => "failed",
                    }
                    .into(),
                }))
            }
            None => Err(CoordinatorError::StaleLease(format!(
                "job {job} attempt {} is no longer leased to this agent",
                r.attempt
            ))
            .into()),
        }
    }
}

async fn sweep_status(state: &State, id: Uuid) -> Result<pb::SweepStatus, CoordinatorError> {
    let sweep = state.store.get_sweep(id).await?;
    let jobs = state.store.sweep_jobs(id).await?;
    Ok(pb::SweepStatus {
        sweep_id: sweep.id.to_string(),
        name: sweep.name,
        state: sweep.state,
        created_at: Some(timestamp(sweep.created_at)),
        jobs: jobs.iter().map(job_to_wire).collect(),
        spec_toml: sweep.spec_toml,
    })
}

fn summary(s: &SweepRow) -> pb::SweepSummary {
    pb::SweepSummary {
        sweep_id: s.id.to_string(),
        name: s.name.clone(),
        state: s.state.clone(),
        created_at: Some(timestamp(s.created_at)),
        jobs: s.jobs as u32,
        finished: s.finished as u32,
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::SweepStatus, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl SweepService for SweepApi {
    async fn submit_sweep(
        &self,
        req: Request<pb::SubmitSweepRequest>,
    ) -> Result<Response<pb::SubmitSweepResponse>, Status> {
        let toml = req.into_inner().spec_toml;
        let spec = SweepSpec::from_toml(&toml).map_err(CoordinatorError::from)?;
        let (id, jobs) = self
            .0
            .store
            .create_sweep(&spec, &toml)
            .await
            .map_err(Status::from)?;
        self.0.wakeup.notify_waiters();
        info!(sweep_id = %id, jobs, "sweep submitted");
        Ok(Response::new(pb::SubmitSweepResponse {
            sweep_id: id.to_string(),
            jobs: jobs as u32,
        }))
    }

    async fn get_sweep(
        &self,
        req: Request<pb::GetSweepRequest>,
    ) -> Result<Response<pb::SweepStatus>, Status> {
        let id = parse_uuid("sweep id", &req.into_inner().sweep_id).map_err(Status::from)?;
        Ok(Response::new(sweep_status(&self.0, id).await?))
    }

    type WatchSweepStream = WatchStream;

    async fn watch_sweep(
        &self,
        req: Request<pb::GetSweepRequest>,
    ) -> Result<Response<Self::WatchSweepStream>, Status> {
        let id = parse_uuid("sweep id", &req.into_inner().sweep_id).map_err(Status::from)?;
        // Fail fast on an unknown sweep, before the stream starts.
        let first = sweep_status(&self.0, id).await?;
        let state = self.0.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut last = first;
            if tx.send(Ok(last.clone())).await.is_err() {
                return;
            }
            while last.state == "active" {
                tokio::select! {
                    _ = tokio::time::sleep(WATCH_POLL) => {}
                    _ = state.shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                }
                match sweep_status(&state, id).await {
                    Ok(now) if now != last => {
                        last = now;
                        if tx.send(Ok(last.clone())).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    // A database hiccup is not the end of the sweep: keep watching.
                    Err(e) => warn!(error = %e, sweep_id = %id, "watch poll failed"),
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn list_sweeps(
        &self,
        req: Request<pb::ListSweepsRequest>,
    ) -> Result<Response<pb::ListSweepsResponse>, Status> {
        let limit = match req.into_inner().limit {
            0 => 20,
            n => n.min(1000),
        };
        let sweeps = self
            .0
            .store
            .list_sweeps(limit as i64)
            .await
            .map_err(Status::from)?;
        Ok(Response::new(pb::ListSweepsResponse {
            sweeps: sweeps.iter().map(summary).collect(),
        }))
    }

    async fn cancel_sweep(
        &self,
        req: Request<pb::CancelSweepRequest>,
    ) -> Result<Response<pb::CancelSweepResponse>, Status> {
        let id = parse_uuid("sweep id", &req.into_inner().sweep_id).map_err(Status::from)?;
        match self.0.store.cancel_sweep(id).await.map_err(Status::from)? {
            Some(n) => {
                info!(sweep_id = %id, jobs = n, "sweep cancelled");
                Ok(Response::new(pb::CancelSweepResponse {
                    cancelled_jobs: n as u32,
                }))
            }
            None => Err(Status::not_found(format!("no sweep {id}"))),
        }
    }

    async fn list_results(
        &self,
        req: Request<pb::ListResultsRequest>,
    ) -> Result<Response<pb::ListResultsResponse>, Status> {
        let r = req.into_inner();
        let sweep_id = if r.sweep_id.is_empty() {
            None
        } else {
            let id = parse_uuid("sweep id", &r.sweep_id).map_err(Status::from)?;
            // An unknown sweep is an error, not an empty table.
            self.0.store.get_sweep(id).await.map_err(Status::from)?;
            Some(id)
        };
        let precision = if r.precision.is_empty() {
            None
        } else {
            Some(
                r.precision
                    .parse::<fleetmark_core::Precision>()
                    .map_err(CoordinatorError::from)?
                    .to_string(),
            )
        };
        let filter = ResultFilter {
            sweep_id,
            model: Some(r.model).filter(|m| !m.is_empty()),
            precision,
            batch_size: (r.batch_size > 0).then_some(r.batch_size as i32),
            include_simulated: r.include_simulated,
            omit_latencies: r.omit_latencies,
            agent_name: Some(r.agent_name).filter(|a| !a.is_empty()),
            labels: parse_label_filters(&r.labels)?,
            since: r.since.map(|t| from_timestamp(Some(t))),
            until: r.until.map(|t| from_timestamp(Some(t))),
        };
        let results = self
            .0
            .store
            .list_results(&filter)
            .await
            .map_err(Status::from)?;
        Ok(Response::new(pb::ListResultsResponse {
            results: results
                .iter()
                .map(|s| pb::StoredResult {
                    result_id: s.id.to_string(),
                    sweep_id: s.sweep_id.to_string(),
                    result: Some((&s.result).into()),
                })
                .collect(),
        }))
    }

    async fn list_agents(
        &self,
        _req: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let window = crate::online_window(&self.0.config);
        let agents = self
            .0
            .store
            .list_agents(window)
            .await
            .map_err(Status::from)?;
        Ok(Response::new(pb::ListAgentsResponse {
            agents: agents
                .into_iter()
                .map(|a| pb::AgentStatus {
                    agent_id: a.id.to_string(),
                    name: a.name,
                    state: if a.origin == "imported" {
                        "imported".into()
                    } else if a.online {
                        "online".into()
                    } else {
                        "offline".into()
                    },
                    labels: a.labels.into_iter().collect(),
                    price_per_hour: a.price_per_hour,
                    inventory: Some((&a.inventory).into()),
                    devices: a
                        .devices
                        .into_iter()
                        .map(|d| pb::AgentDevice {
                            device: d.device,
                            kind: d.kind,
                            name: d.name,
                        })
                        .collect(),
                    last_seen_at: Some(timestamp(a.last_seen_at)),
                    running_jobs: a.running_jobs.iter().map(Uuid::to_string).collect(),
                })
                .collect(),
        }))
    }

    async fn import_results(
        &self,
        req: Request<pb::ImportResultsRequest>,
    ) -> Result<Response<pb::ImportResultsResponse>, Status> {
        let r = req.into_inner();
        let mut results = Vec::with_capacity(r.results.len());
        for (i, wire) in r.results.into_iter().enumerate() {
            let result = result_without_latencies(wire)
                .map_err(|e| Status::invalid_argument(format!("record {}: {e}", i + 1)))?;
            results.push(result);
        }
        let name = if r.name.trim().is_empty() {
            "import".to_string()
        } else {
            r.name
        };
        let (id, n) = self
            .0
            .store
            .import(&name, &results)
            .await
            .map_err(Status::from)?;
        info!(sweep_id = %id, results = n, "results imported");
        self.0
            .metrics
            .results
            .with_label_values(&["import"])
            .inc_by(n as u64);
        Ok(Response::new(pb::ImportResultsResponse {
            sweep_id: id.to_string(),
            imported: n as u32,
        }))
    }

    async fn find_sweeps(
        &self,
        req: Request<pb::FindSweepsRequest>,
    ) -> Result<Response<pb::ListSweepsResponse>, Status> {
        let r = req.into_inner();
        let prefix = r.id_prefix.trim().to_ascii_lowercase();
        if prefix.is_empty()
            || prefix.len() > 36
            || !prefix.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
        {
            return Err(Status::invalid_argument(
                "a sweep id prefix is 1 to 36 hex digits and dashes",
            ));
        }
        let limit = match r.limit {
            0 => 10,
            n => n.min(100),
        };
        let sweeps = self
            .0
            .store
            .find_sweeps(&prefix, limit as i64)
            .await
            .map_err(Status::from)?;
        Ok(Response::new(pb::ListSweepsResponse {
            sweeps: sweeps.iter().map(summary).collect(),
        }))
    }

    async fn prune_agents(
        &self,
        req: Request<pb::PruneAgentsRequest>,
    ) -> Result<Response<pb::PruneAgentsResponse>, Status> {
        let r = req.into_inner();
        // An agent must have missed far more than a few heartbeats before it can be retired.
        let floor = crate::online_window(&self.0.config).max(Duration::from_secs(60));
        let offline_for = Duration::from_secs(r.offline_for_seconds);
        if offline_for < floor {
            return Err(Status::invalid_argument(format!(
                "an agent can be pruned only after at least {} s offline",
                floor.as_secs()
            )));
        }
        let names = self
            .0
            .store
            .prune_agents(offline_for, r.dry_run)
            .await
            .map_err(Status::from)?;
        if !r.dry_run && !names.is_empty() {
            info!(agents = ?names, "agents retired");
        }
        Ok(Response::new(pb::PruneAgentsResponse { names }))
    }
}

/// "key=value" label filters as a map; INVALID_ARGUMENT for anything else.
fn parse_label_filters(
    labels: &[String],
) -> Result<std::collections::BTreeMap<String, String>, Status> {
    labels
        .iter()
        .map(|l| match l.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                Ok((k.trim().to_string(), v.trim().to_string()))
            }
            _ => Err(Status::invalid_argument(format!(
                "label filter '{}' is not key=value",
                l.chars().take(64).collect::<String>()
            ))),
        })
        .collect()
}
