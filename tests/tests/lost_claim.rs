//! A claim lost on its way to the agent (here: an outsider that claims over the wire and then
//! goes silent, as an agent behind a partition would look) does not hold the job for a whole
//! lease: unacknowledged within the claim grace, it returns to the queue without costing an
//! attempt, the silent claimant's late reports and results are refused, and a real agent runs
//! the job once.

use std::time::{Duration, Instant};

use fleetmark_e2e::*;
use fleetmark_proto::v1::{self as pb, agent_service_client::AgentServiceClient};
use tonic::Code;

#[tokio::test]
async fn an_unacknowledged_claim_returns_to_the_queue_within_the_grace() {
    let dir = scratch();
    let db = TestDb::new().await;
    let opts = CoordinatorOpts {
        lease: "5m",
        claim_grace: "1s",
        reap_interval: "200ms",
        ..Default::default()
    };
    let grace_and_tick = Duration::from_millis(1200);
    let coord = Coordinator::start("coordinator", dir.path(), &db.url, free_port(), &opts).await;
    let url = coord.url.clone();
    let pool = pool(&db.url).await;

    // The outsider: a plain tonic client, not the project's client helpers.
    let channel = tonic::transport::Endpoint::from_shared(url.clone())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    // It registers with the harness's agent token, then calls with its own secret.
    let credential = std::sync::Arc::new(std::sync::Mutex::new(coord.agent_token.clone()));
    let current = credential.clone();
    let mut ghost =
        AgentServiceClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
            let value = format!("Bearer {}", current.lock().expect("credential"));
            req.metadata_mut()
                .insert("authorization", value.parse().expect("ascii"));
            Ok(req)
        });
    let registered = ghost
        .register(pb::RegisterRequest {
            name: "ghost".into(),
            devices: vec![pb::AgentDevice {
                device: "cpu".into(),
                kind: "cpu".into(),
                name: "cpu device".into(),
                precisions: vec![],
                health: None,
                health_flags: vec![],
            }],
            ..Default::default()
        })
        .await
        .expect("register")
        .into_inner();
    let ghost_id = registered.agent_id;
    *credential.lock().expect("credential") = registered.agent_secret;

    let toml = sweep_toml("lost-claim", &[1], 32, "2s");
    let sweep = submit_file(&url, None, dir.path(), "lost-claim", &toml).await;
    let claimed = ghost
        .claim_job(pb::ClaimJobRequest {
            agent_id: ghost_id.clone(),
            device: "cpu".into(),
            wait_ms: 5_000,
        })
        .await
        .expect("claim")
        .into_inner()
        .job
        .expect("a job");
    let t0 = Instant::now();
    assert_eq!(claimed.attempt, 1);

    // Never acknowledged: back in the queue after the grace and a reaper tick.
    eventually(START_TIMEOUT, "the unacknowledged claim to return", || {
        let pool = &pool;
        async move {
            let j = jobs(pool, sweep).await.ok()?.pop()?;
            (j.state == "pending").then_some(())
        }
    })
    .await;
    let back_after = t0.elapsed();
    assert!(
        back_after < grace_and_tick + Duration::from_secs(3),
        "returned after {back_after:?}; grace plus a tick is {grace_and_tick:?}"
    );
    let job = jobs(&pool, sweep).await.expect("jobs").pop().expect("job");
    let (attempt, failures, handbacks, error) = job_counts(&pool, job.id).await;
    assert_eq!((attempt, failures, handbacks), (1, 0, 1), "{error:?}");
    assert!(
        error
            .as_deref()
            .is_some_and(|e| e.contains("not acknowledged")),
        "{error:?}"
    );

    // The silent claimant wakes up: its report and its result are both refused.
    let err = ghost
        .report_progress(pb::ReportProgressRequest {
            agent_id: ghost_id.clone(),
            job_id: claimed.job_id.clone(),
            attempt: 1,
            phase: "timing".into(),
            iterations: 1,
            fraction: 0.5,
        })
        .await
        .expect_err("a report on a claim taken back is refused");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let spec = job_spec(&pool, job.id).await;
    let late = made_up_result(Some(job.id), 1, "ghost", spec);
    let err = ghost
        .submit_result(pb::SubmitResultRequest {
            agent_id: ghost_id.clone(),
            result: Some((&late).into()),
        })
        .await
        .expect_err("a result on a claim taken back is refused");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    // A real agent acknowledges at once and keeps its claim past the grace (the job takes 2 s).
    let _real = start_agent("real", dir.path(), &url, "simulated", &[]);
    wait_sweep_finished(&pool, sweep, SWEEP_TIMEOUT).await;
    let (done, _) = assert_sweep_complete_once(&pool, sweep, 1).await;
    assert_eq!(done[0].attempt, 2);
    let (_, failures, handbacks, _) = job_counts(&pool, job.id).await;
    assert_eq!((failures, handbacks), (0, 1));
}
