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
    auth::{authorize, Permission, Principal, Role},
    error::CoordinatorError,
    store::{
        AgentDevice, AgentRegistration, CompareFilter, FailOutcome, ImportOutcome, JobRow,
        ProgressBySecret, ResultBySecret, ResultFilter, Submitter, SweepRow,
    },
    State,
};

/// The longest a claim may wait for work before answering "none".
const MAX_CLAIM_WAIT: Duration = Duration::from_secs(30);
/// Waiting claims re-check this often even without a notification.
const CLAIM_RECHECK: Duration = Duration::from_secs(1);
/// A watch stream re-reads its sweep when told it changed, at most this often...
const WATCH_MIN_INTERVAL: Duration = Duration::from_millis(300);
/// ...and, in case a notification was lost, at least this often.
const WATCH_RECHECK: Duration = Duration::from_secs(5);

pub(crate) struct AgentApi(pub Arc<State>);
pub(crate) struct SweepApi(pub Arc<State>);
pub(crate) struct TokenApi(pub Arc<State>);

/// The agent making this call, authenticated by its secret. The agent id in the body, if any,
/// must be the caller's own: it is never used to pick the agent.
async fn calling_agent<T>(state: &State, req: &Request<T>, body_id: &str) -> Result<Uuid, Status> {
    let Principal::Agent { id } = authorize(state, req, Permission::AgentSession).await? else {
        return Err(Status::permission_denied(
            "agent calls take an agent secret",
        ));
    };
    check_body_id(id, body_id)?;
    Ok(id)
}

/// The agent id in a request body, if any, must be the caller's own.
fn check_body_id(id: Uuid, body_id: &str) -> Result<(), Status> {
    if !body_id.is_empty() && parse_uuid("agent id", body_id).ok() != Some(id) {
        return Err(CoordinatorError::PermissionDenied(format!(
            "agent id {body_id} in the request is not the caller's own ({id})"
        ))
        .into());
    }
    Ok(())
}

/// The hash of an agent secret and the agent id a request body names, if any.
type SecretAndBodyId = ([u8; 32], Option<Uuid>);

/// For the hot agent calls (progress, result) that can authenticate inside their own first
/// statement: the caller's secret hash and the agent id of the body, if any. `None` when the
/// credential is not an agent secret or the body's id is not a UUID: the call then takes the
/// full path ([`calling_agent`]), which says what is wrong. A one-statement attempt that
/// updates nothing also falls back to the full path, so every error is the one the full path
/// gives.
fn one_statement_auth<T>(
    state: &State,
    req: &Request<T>,
    body_id: &str,
) -> Result<Option<SecretAndBodyId>, Status> {
    let Some(hash) = crate::auth::agent_secret_hash(state, req)? else {
        return Ok(None);
    };
    if body_id.is_empty() {
        return Ok(Some((hash, None)));
    }
    Ok(parse_uuid("agent id", body_id)
        .ok()
        .map(|id| (hash, Some(id))))
}

/// The start of a claim: the calling agent (authenticated as [`calling_agent`] does) and the
/// kind of the device it claims for, with the agent marked as seen. For an agent secret this
/// is one statement (the lookup of the secret, the touch and the read of the devices).
async fn claiming_agent(
    state: &State,
    req: &Request<pb::ClaimJobRequest>,
) -> Result<(Uuid, String), Status> {
    let r = req.get_ref();
    match crate::auth::agent_secret_hash(state, req)? {
        Some(hash) => {
            let (agent, kind) = state
                .store
                .touch_device_kind_by_secret(&hash, &r.device)
                .await
                .map_err(Status::from)?
                .ok_or_else(crate::auth::unknown_agent_secret)?;
            check_body_id(agent, &r.agent_id)?;
            Ok((agent, kind))
        }
        None => {
            let agent = calling_agent(state, req, &r.agent_id).await?;
            let kind = state
                .store
                .touch_device_kind(agent, &r.device)
                .await
                .map_err(Status::from)?;
            Ok((agent, kind))
        }
    }
}

/// A known agent's heartbeat answer: the runs it reported but no longer holds, to stop.
fn heartbeat_answer(stale: Vec<(Uuid, i32)>) -> Response<pb::HeartbeatResponse> {
    Response::new(pb::HeartbeatResponse {
        stop: stale
            .into_iter()
            .map(|(j, a)| pb::JobRef {
                job_id: j.to_string(),
                attempt: a as u32,
            })
            .collect(),
        known: true,
    })
}

/// Maps a broken limit to INVALID_ARGUMENT.
fn limit(e: fleetmark_core::LimitError) -> Status {
    Status::invalid_argument(e.to_string())
}

/// Bounds every field of a registration: the name (in characters, '/' reserved for imported
/// agents), labels, devices, and every inventory string; no NUL anywhere.
/// The most precisions one device may declare (there are three today; room for fp8 and int8).
const MAX_DEVICE_PRECISIONS: usize = 16;

fn validate_registration(r: &pb::RegisterRequest) -> Result<(), Status> {
    use fleetmark_core::limits::{self, MAX_DEVICES, MAX_TEXT_CHARS};
    limits::check_agent_name(r.name.trim()).map_err(limit)?;
    limits::check_labels(r.labels.iter()).map_err(limit)?;
    limits::check_count("devices", r.devices.len(), MAX_DEVICES).map_err(limit)?;
    for d in &r.devices {
        limits::check_name("a device", &d.device).map_err(limit)?;
        limits::check_name("a device kind", &d.kind).map_err(limit)?;
        limits::check_text("a device name", &d.name, MAX_TEXT_CHARS).map_err(limit)?;
        // Each is parsed as a precision later; this bounds the list before anything is parsed.
        limits::check_count(
            "precisions of a device",
            d.precisions.len(),
            MAX_DEVICE_PRECISIONS,
        )
        .map_err(limit)?;
    }
    if let Some(inv) = &r.inventory {
        limits::check_inventory(&inv.clone().into()).map_err(limit)?;
    }
    Ok(())
}

/// The identity of the credential that made this call, recorded on imported results:
/// `token:<name>/<id>` for API tokens, `agent:<id>` for an agent's own secret.
fn caller_identity(caller: &crate::auth::Principal) -> String {
    match caller {
        crate::auth::Principal::Token { id, name, .. } => format!("token:{name}/{id}"),
        crate::auth::Principal::Agent { id } => format!("agent:{id}"),
    }
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
        let caller = authorize(&self.0, &req, Permission::Register).await?;
        let token = caller
            .token_id()
            .ok_or_else(|| Status::permission_denied("Register takes an agent token"))?;
        self.0.limits.register(token)?;
        let r = req.into_inner();
        validate_registration(&r)?;
        let name = r.name.trim().to_string();
        if name.is_empty() || name.chars().count() > fleetmark_core::limits::MAX_NAME_CHARS {
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
        let devices = r
            .devices
            .into_iter()
            .map(|d| {
                let health = d
                    .health
                    .map(fleetmark_core::DeviceHealth::try_from)
                    .transpose()
                    .map_err(|e| Status::invalid_argument(format!("device {}: {e}", d.device)))?;
                Ok(AgentDevice {
                    precisions: declared_precisions(&d.device, &d.precisions)?,
                    health,
                    device: d.device,
                    kind: fleetmark_core::normalize_kind(&d.kind),
                    name: d.name,
                })
            })
            .collect::<Result<Vec<_>, Status>>()?;
        let reg = AgentRegistration {
            name: name.clone(),
            labels: r.labels.into_iter().collect(),
            price_per_hour: r.price_per_hour,
            inventory: r.inventory.unwrap_or_default().into(),
            devices,
        };
        let done = self
            .0
            .store
            .register_agent_as(&reg, token)
            .await
            .map_err(Status::from)?;
        if !done.released.is_empty() {
            self.0.wakeup.notify_waiters();
        }
        info!(agent = %name, agent_id = %done.agent_id, incarnation = done.incarnation,
              released_jobs = done.released.len(), devices = reg.devices.len(), "agent registered");
        Ok(Response::new(pb::RegisterResponse {
            agent_id: done.agent_id.to_string(),
            heartbeat_interval_ms: self.0.config.heartbeat_interval.as_millis() as u32,
            lease_ms: self.0.config.lease.as_millis() as u32,
            agent_secret: done.secret,
            incarnation: done.incarnation.max(0) as u32,
            released_jobs: done.released.len() as u32,
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        // The common case, an agent secret and no stop: authentication, the touch and the
        // read of the leases it reports in one statement. Parse errors are reported only after
        // the caller is authenticated, on the full path below.
        let reported: Result<Vec<(Uuid, i32)>, fleetmark_proto::convert::WireError> = req
            .get_ref()
            .running
            .iter()
            .map(|j| Ok((parse_uuid("job id", &j.job_id)?, j.attempt as i32)))
            .collect();
        let hash = crate::auth::agent_secret_hash(&self.0, &req)?;
        if let (Some(hash), Ok(running), false) = (&hash, &reported, req.get_ref().stopping) {
            if let Some((agent, stale)) = self
                .0
                .store
                .heartbeat_by_secret(hash, running)
                .await
                .map_err(Status::from)?
            {
                check_body_id(agent, &req.get_ref().agent_id)?;
                return Ok(heartbeat_answer(stale));
            }
        }
        // Authentication and the touch in one statement for an agent secret.
        let touched = match hash {
            Some(hash) => self
                .0
                .store
                .touch_agent_by_secret(&hash)
                .await
                .map_err(Status::from)?,
            None => None,
        };
        let (agent, known) = match touched {
            Some(agent) => {
                check_body_id(agent, &req.get_ref().agent_id)?;
                (agent, true)
            }
            None => {
                let agent = calling_agent(&self.0, &req, &req.get_ref().agent_id).await?;
                let known = self
                    .0
                    .store
                    .touch_agent(agent)
                    .await
                    .map_err(Status::from)?;
                (agent, known)
            }
        };
        let r = req.into_inner();
        if !known {
            return Ok(Response::new(pb::HeartbeatResponse {
                stop: Vec::new(),
                known: false,
            }));
        }
        if r.stopping {
            info!(agent_id = %agent, "agent stopping");
            self.0
                .store
                .mark_agent_stopping(agent)
                .await
                .map_err(Status::from)?;
        }
        let running = reported.map_err(Status::from)?;
        let stop = self
            .0
            .store
            .stale_running(agent, &running)
            .await
            .map_err(Status::from)?;
        Ok(heartbeat_answer(stop))
    }

    async fn claim_job(
        &self,
        req: Request<pb::ClaimJobRequest>,
    ) -> Result<Response<pb::ClaimJobResponse>, Status> {
        let state = &self.0;
        let deadline = tokio::time::Instant::now()
            + Duration::from_millis(req.get_ref().wait_ms as u64).min(MAX_CLAIM_WAIT);
        // Register for wake-ups before the first look, so a notification between the look
        // and the wait is not lost.
        let mut notified = Box::pin(state.wakeup.notified());
        notified.as_mut().enable();
        // With an agent secret, the first look also authenticates (one statement); otherwise,
        // or when that statement names no agent and device, the full path, which says why.
        let mut started = std::time::Instant::now();
        let fast = match one_statement_auth(state, &req, &req.get_ref().agent_id)? {
            Some((hash, body)) => state
                .store
                .claim_job_by_secret(&hash, body, &req.get_ref().device, state.config.lease)
                .await
                .map_err(Status::from)?,
            None => None,
        };
        let (agent, kind, mut first) = match fast {
            Some((agent, kind, job)) => (agent, kind, Some(job)),
            None => {
                let (agent, kind) = claiming_agent(state, &req).await?;
                (agent, kind, None)
            }
        };
        let r = req.into_inner();
        loop {
            let looked = match first.take() {
                Some(job) => job,
                None => state
                    .store
                    .claim_job(agent, &r.device, &kind, state.config.lease)
                    .await
                    .map_err(Status::from)?,
            };
            if let Some(job) = looked {
                state
                    .metrics
                    .dispatch
                    .with_label_values(&[kind.as_str()])
                    .observe(started.elapsed().as_secs_f64());
                info!(job_id = %job.id, agent_id = %agent, device = %r.device, attempt = job.attempt,
                      spec = %job.spec.label(), "job claimed");
                state.sweep_events.job_changed(job.id, job.sweep_id);
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
            notified = Box::pin(state.wakeup.notified());
            notified.as_mut().enable();
            started = std::time::Instant::now();
        }
    }

    async fn report_progress(
        &self,
        req: Request<pb::ReportProgressRequest>,
    ) -> Result<Response<pb::ReportProgressResponse>, Status> {
        // One statement when the caller holds the lease: authentication and the update.
        let fast = one_statement_auth(&self.0, &req, &req.get_ref().agent_id)?;
        // Parsed once; its errors are reported only after the caller is authenticated.
        let update = ProgressUpdate::parse(req.get_ref());
        if let (Some((hash, body_agent)), Ok(u)) = (fast, &update) {
            // Shares a statement with other agents' reports (`batch`); a report the batch did
            // not apply takes the full path below, which says why.
            let updated = self
                .0
                .batches
                .progress
                .submit(ProgressBySecret {
                    secret_hash: hash,
                    body_agent,
                    job: u.job,
                    attempt: u.attempt,
                    phase: u.phase.clone(),
                    iterations: u.iterations,
                    fraction: u.fraction,
                })
                .await
                .flatten();
            if let Some((expires, sweep)) = updated {
                return Ok(progressed(&self.0, u.job, expires, sweep));
            }
        }
        let agent = calling_agent(&self.0, &req, &req.get_ref().agent_id).await?;
        let u = update?;
        match self
            .0
            .store
            .report_progress(
                agent,
                u.job,
                u.attempt,
                &u.phase,
                u.iterations,
                u.fraction,
                self.0.config.lease,
            )
            .await
            .map_err(Status::from)?
        {
            Some((expires, sweep)) => Ok(progressed(&self.0, u.job, expires, sweep)),
            None => Err(CoordinatorError::StaleLease(format!(
                "job {} attempt {} is no longer leased to this agent",
                u.job, u.attempt
            ))
            .into()),
        }
    }

    async fn submit_result(
        &self,
        req: Request<pb::SubmitResultRequest>,
    ) -> Result<Response<pb::SubmitResultResponse>, Status> {
        // Authentication inside the transaction's first read when the credential is an agent
        // secret; the full path (and its errors) otherwise.
        let fast = one_statement_auth(&self.0, &req, &req.get_ref().agent_id)?;
        let converted: Option<BenchResult> = match (&fast, &req.get_ref().result) {
            (Some(_), Some(wire)) => wire.clone().try_into().ok(),
            _ => None,
        };
        // Shares a statement with other agents' results (`batch`); a result the batch did not
        // store takes the full path below, which stores it or says why not.
        if let (Some((hash, body_agent)), Some(result)) = (fast, converted) {
            let (job, images_per_sec) = (result.job_id, result.images_per_sec);
            let item = ResultBySecret {
                secret_hash: hash,
                body_agent,
                result,
            };
            if let Some(id) = self.0.batches.results.submit(item).await.flatten() {
                return Ok(result_accepted(&self.0, job, None, images_per_sec, id));
            }
        }
        let agent = calling_agent(&self.0, &req, &req.get_ref().agent_id).await?;
        let result: BenchResult = req
            .into_inner()
            .result
            .ok_or_else(|| Status::invalid_argument("missing result"))?
            .try_into()
            .map_err(|e: fleetmark_proto::convert::WireError| Status::from(e))?;
        match self.0.store.submit_result(agent, &result).await {
            Ok(id) => Ok(result_accepted(
                &self.0,
                result.job_id,
                Some(agent),
                result.images_per_sec,
                id,
            )),
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
        let agent = calling_agent(&self.0, &req, &req.get_ref().agent_id).await?;
        let r = req.into_inner();
        let job = parse_uuid("job id", &r.job_id).map_err(Status::from)?;
        let reason: String = r.reason.chars().take(4000).collect();
        fleetmark_core::limits::check_text("reason", &reason, 4000).map_err(limit)?;
        let store = &self.0.store;
        let released = if r.handback && !r.permanent {
            store.hand_back(agent, job, r.attempt as i32, &reason).await
        } else {
            store
                .fail_job(agent, job, r.attempt as i32, &reason, r.permanent)
                .await
        };
        match released.map_err(Status::from)? {
            Some(outcome) => {
                self.0.sweep_events.job_finished(Some(job));
                warn!(job_id = %job, attempt = r.attempt, permanent = r.permanent,
                      handback = r.handback, reason = %reason, "job attempt ended without a result");
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

/// Results per `ListResults` page when the caller does not say, and at most.
const DEFAULT_PAGE: usize = 1000;
const MAX_PAGE: usize = 10_000;

fn page_size(asked: u32) -> usize {
    match asked as usize {
        0 => DEFAULT_PAGE,
        n => n.min(MAX_PAGE),
    }
}

/// A page token is the id of the previous page's last result.
fn page_after(token: &str) -> Result<Option<Uuid>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    parse_uuid("page token", token)
        .map(Some)
        .map_err(Status::from)
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::SweepStatus, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl SweepService for SweepApi {
    async fn submit_sweep(
        &self,
        req: Request<pb::SubmitSweepRequest>,
    ) -> Result<Response<pb::SubmitSweepResponse>, Status> {
        let caller = authorize(&self.0, &req, Permission::Submit).await?;
        let token = caller
            .token_id()
            .ok_or_else(|| Status::permission_denied("submitting takes a token"))?;
        self.0.limits.submit(token)?;
        let toml = req.into_inner().spec_toml;
        let spec = SweepSpec::from_toml(&toml).map_err(CoordinatorError::from)?;
        let planned = spec.expand().map_err(CoordinatorError::from)?;
        let submitter = Submitter {
            token,
            max_pending_jobs: self.0.config.max_pending_jobs,
        };
        let (id, jobs) = self
            .0
            .store
            .create_sweep_for(&spec, &toml, Some(submitter))
            .await
            .map_err(Status::from)?;
        self.0.wakeup.notify_waiters();
        let warnings = unrunnable_warnings(&self.0, &planned).await;
        info!(sweep_id = %id, jobs, warnings = warnings.len(), "sweep submitted");
        Ok(Response::new(pb::SubmitSweepResponse {
            sweep_id: id.to_string(),
            jobs: jobs as u32,
            warnings,
        }))
    }

    async fn get_sweep(
        &self,
        req: Request<pb::GetSweepRequest>,
    ) -> Result<Response<pb::SweepStatus>, Status> {
        authorize(&self.0, &req, Permission::Read).await?;
        let id = parse_uuid("sweep id", &req.into_inner().sweep_id).map_err(Status::from)?;
        Ok(Response::new(sweep_status(&self.0, id).await?))
    }

    type WatchSweepStream = WatchStream;

    async fn watch_sweep(
        &self,
        req: Request<pb::GetSweepRequest>,
    ) -> Result<Response<Self::WatchSweepStream>, Status> {
        authorize(&self.0, &req, Permission::Read).await?;
        let id = parse_uuid("sweep id", &req.into_inner().sweep_id).map_err(Status::from)?;
        // Fail fast on an unknown sweep, before the stream starts.
        let first = sweep_status(&self.0, id).await?;
        let state = self.0.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut events = state.sweep_events.subscribe();
        tokio::spawn(async move {
            let mut last = first;
            if tx.send(Ok(last.clone())).await.is_err() {
                return;
            }
            while last.state == "active" {
                // Wait for a change to this sweep (pushed), or the slow re-check.
                let recheck = tokio::time::sleep(WATCH_RECHECK);
                tokio::pin!(recheck);
                loop {
                    tokio::select! {
                        ev = events.recv() => match ev {
                            Ok(s) if s == id || s.is_nil() => break,
                            Ok(_) => {}
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                        },
                        _ = &mut recheck => break,
                        _ = state.shutdown.cancelled() => return,
                        _ = tx.closed() => return,
                    }
                }
                // At most one read per interval, however many changes arrive.
                tokio::select! {
                    _ = tokio::time::sleep(WATCH_MIN_INTERVAL) => {}
                    _ = state.shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                }
                while events.try_recv().is_ok() {}
                match sweep_status(&state, id).await {
                    Ok(now) if now != last => {
                        last = now;
                        if tx.send(Ok(last.clone())).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    // A database hiccup is not the end of the sweep: keep watching.
                    Err(e) => warn!(error = %e, sweep_id = %id, "watch read failed"),
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
        authorize(&self.0, &req, Permission::Read).await?;
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
        let caller = authorize(&self.0, &req, Permission::Submit).await?;
        let id = parse_uuid("sweep id", &req.into_inner().sweep_id).map_err(Status::from)?;
        let owner = self
            .0
            .store
            .sweep_submitter(id)
            .await
            .map_err(Status::from)?
            .ok_or_else(|| Status::not_found(format!("no sweep {id}")))?;
        if !caller.is_admin() && owner != caller.token_id() {
            return Err(Status::permission_denied(
                "a submitter may cancel only the sweeps it submitted",
            ));
        }
        match self.0.store.cancel_sweep(id).await.map_err(Status::from)? {
            Some(n) => {
                info!(sweep_id = %id, jobs = n, "sweep cancelled");
                self.0.sweep_events.changed(id);
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
        authorize(&self.0, &req, Permission::Read).await?;
        let r = req.into_inner();
        fleetmark_core::limits::check_text(
            "model",
            &r.model,
            fleetmark_core::limits::MAX_NAME_CHARS,
        )
        .map_err(limit)?;
        fleetmark_core::limits::check_text(
            "hardware kind",
            &r.hardware_kind,
            fleetmark_core::limits::MAX_NAME_CHARS,
        )
        .map_err(limit)?;
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
            hardware_kind: Some(r.hardware_kind.to_ascii_lowercase()).filter(|k| !k.is_empty()),
            include_simulated: r.include_simulated,
            omit_latencies: r.omit_latencies,
            after: page_after(&r.page_token)?,
            limit: Some(page_size(r.page_size) as i64 + 1),
        };
        let mut listing = self
            .0
            .store
            .list_results(&filter)
            .await
            .map_err(Status::from)?;
        if listing.skipped > 0 {
            warn!(
                skipped = listing.skipped,
                "results left out of a listing: stored rows that are not valid results"
            );
        }
        // A page fetches one row more than it returns, to know whether another page follows; rows
        // skipped as unreadable still count as rows read.
        let page = page_size(r.page_size);
        let next_page_token = if listing.results.len() + listing.skipped as usize > page {
            listing.results.truncate(page);
            listing
                .results
                .last()
                .map(|s| s.id.to_string())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListResultsResponse {
            results: listing
                .results
                .iter()
                .map(|s| pb::StoredResult {
                    result_id: s.id.to_string(),
                    sweep_id: s.sweep_id.to_string(),
                    result: Some((&s.result).into()),
                    imported_by: s.imported_by.clone().unwrap_or_default(),
                    health_check_id: s.health.as_ref().map_or(0, |h| h.0.max(0) as u64),
                    health_flags: s.health.as_ref().map(|h| h.1.clone()).unwrap_or_default(),
                })
                .collect(),
            next_page_token,
            skipped: listing.skipped as u32,
        }))
    }

    async fn list_agents(
        &self,
        req: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        authorize(&self.0, &req, Permission::Read).await?;
        let window = crate::online_window(&self.0.config);
        let agents = self
            .0
            .store
            .list_agents(window)
            .await
            .map_err(Status::from)?;
        let flags = health_flags(&agents);
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
                            health_flags: flags
                                .get(&(a.id, d.device.clone()))
                                .cloned()
                                .unwrap_or_default(),
                            health: d.health.as_ref().map(Into::into),
                            device: d.device,
                            kind: d.kind,
                            name: d.name,
                            precisions: d.precisions.unwrap_or_default(),
                        })
                        .collect(),
                    last_seen_at: Some(timestamp(a.last_seen_at)),
                    running_jobs: a.running_jobs.iter().map(Uuid::to_string).collect(),
                })
                .collect(),
        }))
    }

    async fn compare_results(
        &self,
        req: Request<pb::CompareRequest>,
    ) -> Result<Response<pb::CompareResponse>, Status> {
        authorize(&self.0, &req, Permission::Read).await?;
        let r = req.into_inner();
        let precisions = r
            .precisions
            .iter()
            .map(|p| {
                p.parse::<fleetmark_core::Precision>()
                    .map(|p| p.to_string())
                    .map_err(CoordinatorError::from)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let filter = CompareFilter {
            model: r.model,
            precisions,
            batch_sizes: r
                .batch_sizes
                .iter()
                .map(|b| (*b).min(i32::MAX as u32) as i32)
                .collect(),
            image_size: r.image_size.map(|s| s.min(i32::MAX as u32) as i32),
            sweep_id: match r.sweep_id.trim() {
                "" => None,
                id => Some(parse_uuid("sweep id", id).map_err(Status::from)?),
            },
            agent_name: match r.agent_name.as_str() {
                "" => None,
                name => {
                    fleetmark_core::limits::check_text(
                        "agent name",
                        name,
                        fleetmark_core::limits::MAX_NAME_CHARS + "imported/".len(),
                    )
                    .map_err(limit)?;
                    Some(r.agent_name)
                }
            },
            labels: parse_label_filters(&r.labels)?,
            since: r.since.map(|t| from_timestamp(Some(t))),
            until: r.until.map(|t| from_timestamp(Some(t))),
            by_node: r.by_node,
        };
        let cells = self.0.store.compare(&filter).await.map_err(Status::from)?;
        Ok(Response::new(pb::CompareResponse {
            cells: cells
                .into_iter()
                .map(|c| {
                    let ci = c.images_per_sec_ci95();
                    pb::CompareCell {
                        images_per_sec_ci95_low: ci.map(|c| c.0),
                        images_per_sec_ci95_high: ci.map(|c| c.1),
                        model: c.model,
                        precision: c.precision,
                        batch_size: c.batch_size as u32,
                        image_size: c.image_size as u32,
                        hardware_kind: c.hardware_kind,
                        path: c.path,
                        results: c.results as u32,
                        images_per_sec: c.images_per_sec,
                        p50_ms: c.p50_ms,
                        math: c.math,
                        peak_memory_bytes: c.peak_memory_bytes.max(0) as u64,
                        price_per_hour: c.price_per_hour,
                        mean_images_per_sec: c.images_per_sec_mean,
                        std_images_per_sec: c.images_per_sec_std,
                        min_images_per_sec: c.min_images_per_sec,
                        max_images_per_sec: c.max_images_per_sec,
                        unstable: c.unstable.clamp(0, u32::MAX as i64) as u32,
                        unknown_stability: c.unknown_stability.clamp(0, u32::MAX as i64) as u32,
                        health_flagged: c.health_flagged.clamp(0, u32::MAX as i64) as u32,
                        node: c.node,
                        agents: c.agents,
                    }
                })
                .collect(),
        }))
    }

    async fn import_results(
        &self,
        req: Request<pb::ImportResultsRequest>,
    ) -> Result<Response<pb::ImportResultsResponse>, Status> {
        let caller = authorize(&self.0, &req, Permission::Submit).await?;
        let importer = caller_identity(&caller);
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
        fleetmark_core::limits::check_name("the import name", &name).map_err(limit)?;
        let report = self
            .0
            .store
            .import(&name, &importer, &results)
            .await
            .map_err(Status::from)?;
        let stored = report
            .outcomes
            .iter()
            .filter(|o| {
                matches!(
                    o,
                    ImportOutcome::Imported { .. } | ImportOutcome::Attached { .. }
                )
            })
            .count();
        let imported = report
            .outcomes
            .iter()
            .filter(|o| matches!(o, ImportOutcome::Imported { .. }))
            .count();
        info!(sweep_id = ?report.sweep, records = results.len(), imported, importer = %importer,
              "results imported");
        self.0
            .metrics
            .results
            .with_label_values(&["import"])
            .inc_by(stored as u64);
        if let (Some(sweep), Some(token)) = (report.sweep, caller.token_id()) {
            self.0
                .store
                .set_submitter(sweep, token)
                .await
                .map_err(Status::from)?;
        }
        Ok(Response::new(pb::ImportResultsResponse {
            sweep_id: report.sweep.map(|s| s.to_string()).unwrap_or_default(),
            imported: imported as u32,
            outcomes: report
                .outcomes
                .iter()
                .enumerate()
                .map(|(i, o)| import_outcome_to_wire(i, o))
                .collect(),
        }))
    }

    async fn find_sweeps(
        &self,
        req: Request<pb::FindSweepsRequest>,
    ) -> Result<Response<pb::ListSweepsResponse>, Status> {
        authorize(&self.0, &req, Permission::Read).await?;
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
        // Retiring agents changes what every reader sees: an administrator's call.
        authorize(&self.0, &req, Permission::Admin).await?;
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

    async fn list_health_checks(
        &self,
        req: Request<pb::ListHealthChecksRequest>,
    ) -> Result<Response<pb::ListHealthChecksResponse>, Status> {
        authorize(&self.0, &req, Permission::Read).await?;
        let r = req.into_inner();
        let filter = |name: &str, v: String| -> Result<Option<String>, Status> {
            fleetmark_core::limits::check_text(name, &v, fleetmark_core::limits::MAX_TEXT_CHARS)
                .map_err(limit)?;
            Ok((!v.is_empty()).then_some(v))
        };
        let agent = filter("agent name", r.agent_name)?;
        let kind = filter("kind", r.kind.to_ascii_lowercase())?;
        let n = match r.limit {
            0 => 100,
            n => n.min(1000),
        };
        let checks = self
            .0
            .store
            .list_health_checks(agent.as_deref(), kind.as_deref(), n as i64)
            .await
            .map_err(Status::from)?;
        Ok(Response::new(pb::ListHealthChecksResponse {
            checks: checks
                .into_iter()
                .map(|c| pb::HealthCheckRecord {
                    id: c.id.max(0) as u64,
                    agent_name: c.agent_name,
                    device: c.device,
                    kind: c.kind,
                    incarnation: c.incarnation.max(0) as u32,
                    health: Some((&c.health).into()),
                    flags: c.flags,
                    in_force: c.in_force,
                })
                .collect(),
        }))
    }
}

/// "key=value" label filters as a map, bounded as labels are; INVALID_ARGUMENT for anything
/// else.
fn parse_label_filters(
    labels: &[String],
) -> Result<std::collections::BTreeMap<String, String>, Status> {
    fleetmark_core::limits::check_count(
        "label filters",
        labels.len(),
        fleetmark_core::limits::MAX_LABELS,
    )
    .map_err(limit)?;
    let map = labels
        .iter()
        .map(|l| match l.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                Ok((k.trim().to_string(), v.trim().to_string()))
            }
            _ => Err(Status::invalid_argument(format!(
                "label filter '{}' is not key=value",
                fleetmark_core::limits::Excerpt::of(l)
            ))),
        })
        .collect::<Result<std::collections::BTreeMap<_, _>, _>>()?;
    fleetmark_core::limits::check_labels(map.iter()).map_err(limit)?;
    Ok(map)
}

fn import_outcome_to_wire(index: usize, o: &ImportOutcome) -> pb::ImportOutcome {
    use pb::import_outcome::Kind;
    let mut w = pb::ImportOutcome {
        index: index as u32,
        ..Default::default()
    };
    match o {
        ImportOutcome::Imported { result } => {
            w.set_kind(Kind::Imported);
            w.result_id = result.to_string();
        }
        ImportOutcome::Attached { job, result } => {
            w.set_kind(Kind::Attached);
            w.job_id = job.to_string();
            w.result_id = result.to_string();
        }
        ImportOutcome::Duplicate { result } => {
            w.set_kind(Kind::Duplicate);
            w.result_id = result.map(|r| r.to_string()).unwrap_or_default();
        }
        ImportOutcome::Stale { job, reason } => {
            w.set_kind(Kind::Stale);
            w.job_id = job.to_string();
            w.reason = reason.clone();
        }
    }
    w
}

/// One warning per hardware target that no registered agent serves: those jobs will wait.
async fn unrunnable_warnings(state: &State, jobs: &[fleetmark_core::JobSpec]) -> Vec<String> {
    let kinds = match state.store.registered_kinds().await {
        Ok(k) => k,
        Err(e) => {
            warn!(error = %e, "cannot check which agents could run the sweep");
            return Vec::new();
        }
    };
    let mut waiting: std::collections::BTreeMap<String, usize> = Default::default();
    for j in jobs {
        if !kinds.iter().any(|k| j.target.matches_name(k)) {
            *waiting.entry(j.target.to_string()).or_default() += 1;
        }
    }
    waiting
        .into_iter()
        .map(|(target, n)| {
            let what = match target.as_str() {
                "any" => "no agent is registered".to_string(),
                "gpu" => "no agent has a GPU".to_string(),
                t => format!("no agent has a {t}"),
            };
            format!("{what}; {n} jobs will wait")
        })
        .collect()
}

fn token_to_wire(t: &crate::identity::TokenInfo) -> pb::TokenInfo {
    pb::TokenInfo {
        token_id: t.id.to_string(),
        name: t.name.clone(),
        role: pb::Role::from(t.role) as i32,
        created_at: Some(timestamp(t.created_at)),
        expires_at: t.expires_at.map(timestamp),
        revoked_at: t.revoked_at.map(timestamp),
    }
}

/// The longest lifetime a token may be given: ten years.
const MAX_TOKEN_LIFETIME_SECS: u64 = 10 * 365 * 24 * 3600;

#[tonic::async_trait]
impl pb::token_service_server::TokenService for TokenApi {
    async fn create_token(
        &self,
        req: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let caller = authorize(&self.0, &req, Permission::Admin).await?;
        let r = req.into_inner();
        let role = pb::Role::try_from(r.role)
            .map_err(|_| Status::invalid_argument(format!("unknown role {}", r.role)))?;
        let role = Role::try_from(role)?;
        let expires_at = match r.expires_in_seconds {
            None => None,
            Some(0) => {
                return Err(Status::invalid_argument(
                    "a token must live longer than zero",
                ))
            }
            Some(s) if s > MAX_TOKEN_LIFETIME_SECS => {
                return Err(Status::invalid_argument(
                    "a token may live ten years at most",
                ))
            }
            Some(s) => Some(chrono::Utc::now() + chrono::Duration::seconds(s as i64)),
        };
        let (info, secret) = self
            .0
            .store
            .create_token(&r.name, role, expires_at, caller.token_id())
            .await?;
        info!(token_id = %info.id, role = %role, name = %info.name, "token created");
        Ok(Response::new(pb::CreateTokenResponse {
            token: Some(token_to_wire(&info)),
            secret,
        }))
    }

    async fn list_tokens(
        &self,
        req: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        authorize(&self.0, &req, Permission::Admin).await?;
        let tokens = self
            .0
            .store
            .list_tokens(req.into_inner().include_revoked)
            .await?;
        Ok(Response::new(pb::ListTokensResponse {
            tokens: tokens.iter().map(token_to_wire).collect(),
        }))
    }

    async fn revoke_token(
        &self,
        req: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        authorize(&self.0, &req, Permission::Admin).await?;
        let id = parse_uuid("token id", &req.into_inner().token_id).map_err(Status::from)?;
        match self.0.store.revoke_token(id).await? {
            Some(revoked) => {
                info!(token_id = %id, "token revoked");
                Ok(Response::new(pb::RevokeTokenResponse { revoked }))
            }
            None => Err(Status::not_found(format!("no token {id}"))),
        }
    }
}

/// For every (agent, device) with a health check, the metrics on which it is more than 10%
/// below the median of the devices of its kind (`fleetmark_core::health::flags`), as text.
fn health_flags(
    agents: &[crate::store::AgentRow],
) -> std::collections::HashMap<(Uuid, String), Vec<String>> {
    let mut by_kind: std::collections::HashMap<&str, Vec<&fleetmark_core::DeviceHealth>> =
        Default::default();
    for a in agents {
        for d in &a.devices {
            if let Some(h) = &d.health {
                by_kind.entry(d.kind.as_str()).or_default().push(h);
            }
        }
    }
    let medians: std::collections::HashMap<&str, fleetmark_core::health::KindMedians> = by_kind
        .iter()
        .map(|(kind, peers)| (*kind, fleetmark_core::health::KindMedians::of(peers)))
        .collect();
    let mut out = std::collections::HashMap::new();
    for a in agents {
        for d in &a.devices {
            if let Some(h) = &d.health {
                let flags = medians[d.kind.as_str()].flags(h);
                out.insert(
                    (a.id, d.device.clone()),
                    flags.iter().map(ToString::to_string).collect(),
                );
            }
        }
    }
    out
}

/// The precisions a device declared at registration, checked; `None` when it declared none (an
/// agent older than the field), which the claim query reads as "offer it every precision".
fn declared_precisions(device: &str, given: &[String]) -> Result<Option<Vec<String>>, Status> {
    if given.is_empty() {
        return Ok(None);
    }
    given
        .iter()
        .map(|p| {
            p.parse::<fleetmark_core::Precision>()
                .map(|p| p.as_str().to_string())
                .map_err(|e| Status::invalid_argument(format!("device {device}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// A progress report, checked once for both the one-statement and the full path.
struct ProgressUpdate {
    job: Uuid,
    attempt: i32,
    phase: String,
    iterations: i32,
    fraction: f64,
}

impl ProgressUpdate {
    fn parse(r: &pb::ReportProgressRequest) -> Result<Self, Status> {
        let job = parse_uuid("job id", &r.job_id).map_err(Status::from)?;
        let phase: String = r.phase.chars().take(32).collect();
        fleetmark_core::limits::check_text("phase", &phase, 32).map_err(limit)?;
        Ok(ProgressUpdate {
            job,
            attempt: r.attempt as i32,
            phase,
            iterations: r.iterations.min(i32::MAX as u32) as i32,
            fraction: if r.fraction.is_finite() {
                r.fraction
            } else {
                0.0
            },
        })
    }
}

/// The answer to a stored result; watchers of its sweep are told.
fn result_accepted(
    state: &State,
    job: Option<Uuid>,
    agent: Option<Uuid>,
    images_per_sec: f64,
    id: Uuid,
) -> Response<pb::SubmitResultResponse> {
    info!(job_id = ?job, agent_id = ?agent, images_per_sec, "result accepted");
    state.sweep_events.job_finished(job);
    state.metrics.results.with_label_values(&["agent"]).inc();
    Response::new(pb::SubmitResultResponse {
        result_id: id.to_string(),
    })
}

/// The answer to a progress report that renewed the lease; watchers of its sweep are told.
fn progressed(
    state: &State,
    job: Uuid,
    expires: chrono::DateTime<chrono::Utc>,
    sweep: Uuid,
) -> Response<pb::ReportProgressResponse> {
    state.sweep_events.job_changed(job, sweep);
    Response::new(pb::ReportProgressResponse {
        lease_expires_at: Some(timestamp(expires)),
    })
}
