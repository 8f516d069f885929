//! The coordinator puts concurrent agents' progress reports and results into shared statements
//! (`coordinator/src/batch.rs`). Outsiders speaking the wire protocol deliver all at once, with
//! forged and stale deliveries in the same moment: every genuine delivery lands exactly once,
//! and every bad one is refused as it would be on its own.

use fleetmark_e2e::*;
use fleetmark_proto::v1::{self as pb, agent_service_client::AgentServiceClient};
use tonic::Code;

/// Agents delivering at the same instant: enough that batches of several form.
const AGENTS: usize = 24;

struct Outsider {
    id: String,
    secret: String,
    client: AgentServiceClient<tonic::transport::Channel>,
}

async fn outsider(url: &str, token: &str, name: &str) -> Outsider {
    let reg = register_raw(url, token, name, "cpu")
        .await
        .expect("register");
    Outsider {
        id: reg.agent_id,
        secret: reg.agent_secret,
        client: AgentServiceClient::new(raw_channel(url).await),
    }
}

fn progress(
    o: &Outsider,
    job: &pb::Job,
    attempt: u32,
) -> tonic::Request<pb::ReportProgressRequest> {
    bearer(
        pb::ReportProgressRequest {
            agent_id: o.id.clone(),
            job_id: job.job_id.clone(),
            attempt,
            phase: "timing".into(),
            iterations: 3,
            fraction: 0.5,
        },
        &o.secret,
    )
}

async fn result(
    pool: &sqlx::PgPool,
    o: &Outsider,
    name: &str,
    job: &pb::Job,
    attempt: u32,
) -> tonic::Request<pb::SubmitResultRequest> {
    let id = job.job_id.parse().expect("job id");
    let spec = job_spec(pool, id).await;
    let record = made_up_result(Some(id), attempt, name, spec);
    bearer(
        pb::SubmitResultRequest {
            agent_id: o.id.clone(),
            result: Some((&record).into()),
        },
        &o.secret,
    )
}

#[tokio::test]
async fn concurrent_deliveries_share_statements_and_bad_ones_are_still_refused() {
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
    let url = coord.url.clone();
    let pool = pool(&db.url).await;

    let mut agents = Vec::new();
    for i in 0..AGENTS {
        agents.push(outsider(&url, &coord.agent_token, &format!("outsider-{i}")).await);
    }
    // A registered agent that holds no job and tries to report and deliver for others.
    let thief = outsider(&url, &coord.agent_token, "thief").await;
    let batches: Vec<u32> = (1..=AGENTS as u32).collect();
    let toml = sweep_toml("batched", &batches, 32, "1s");
    let sweep = submit_file(&url, None, dir.path(), "batched", &toml).await;

    let mut jobs = Vec::new();
    for o in agents.iter_mut() {
        let claim = bearer(
            pb::ClaimJobRequest {
                agent_id: o.id.clone(),
                device: "cpu".into(),
                wait_ms: 5_000,
            },
            &o.secret,
        );
        let job = o
            .client
            .claim_job(claim)
            .await
            .expect("claim")
            .into_inner()
            .job
            .expect("a job for every agent");
        jobs.push(job);
    }

    // Every progress report at once, with the thief's report on agent 0's job among them.
    let mut calls = Vec::new();
    for (o, job) in agents.iter().zip(&jobs) {
        let mut c = o.client.clone();
        let req = progress(o, job, job.attempt);
        calls.push(tokio::spawn(async move { c.report_progress(req).await }));
    }
    let stolen = {
        let mut c = thief.client.clone();
        let req = progress(&thief, &jobs[0], jobs[0].attempt);
        tokio::spawn(async move { c.report_progress(req).await })
    };
    // Spawned above, so they run together; awaited in turn here.
    for (i, call) in calls.into_iter().enumerate() {
        let answer = call
            .await
            .expect("task")
            .expect("a genuine report is accepted");
        assert!(answer.into_inner().lease_expires_at.is_some(), "agent {i}");
    }
    let refused = stolen.await.expect("task").expect_err("a forged report");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");

    // Every result at once, with a thief's result for agent 1's job and agent 2's own result
    // sent a second time under a wrong attempt number.
    // Built first, so the calls go out together.
    let mut requests = Vec::new();
    for (i, (o, job)) in agents.iter().zip(&jobs).enumerate() {
        requests.push(result(&pool, o, &format!("outsider-{i}"), job, job.attempt).await);
    }
    let forged = result(&pool, &thief, "thief", &jobs[1], jobs[1].attempt).await;
    let wrong_attempt = result(
        &pool,
        &agents[2],
        "outsider-2",
        &jobs[2],
        jobs[2].attempt + 1,
    )
    .await;
    let calls: Vec<_> = agents
        .iter()
        .zip(requests)
        .map(|(o, req)| {
            let mut c = o.client.clone();
            tokio::spawn(async move { c.submit_result(req).await })
        })
        .collect();
    let forged = {
        let mut c = thief.client.clone();
        tokio::spawn(async move { c.submit_result(forged).await })
    };
    let wrong_attempt = {
        let mut c = agents[2].client.clone();
        tokio::spawn(async move { c.submit_result(wrong_attempt).await })
    };
    for (i, call) in calls.into_iter().enumerate() {
        let id = call
            .await
            .expect("task")
            .unwrap_or_else(|e| panic!("agent {i}'s genuine result refused: {e:?}"))
            .into_inner()
            .result_id;
        assert!(!id.is_empty(), "agent {i}");
    }
    for (what, call) in [("forged", forged), ("wrong attempt", wrong_attempt)] {
        let e = call
            .await
            .expect("task")
            .expect_err(&format!("the {what} result"));
        assert!(
            matches!(e.code(), Code::FailedPrecondition | Code::InvalidArgument),
            "{what}: {e:?}"
        );
    }

    // One result per job, from its holder's attempt; the sweep completed.
    wait_sweep_finished(&pool, sweep, START_TIMEOUT).await;
    assert_sweep_complete_once(&pool, sweep, AGENTS).await;
    let thief_id: uuid::Uuid = thief.id.parse().expect("uuid");
    let by_thief: i64 = sqlx::query_scalar("SELECT count(*) FROM results WHERE agent_id = $1")
        .bind(thief_id)
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(by_thief, 0, "nothing stored for the thief");
}
