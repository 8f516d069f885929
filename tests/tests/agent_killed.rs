//! An agent SIGKILLed in the middle of a job: its lease runs out, another agent finishes the job
//! on the next attempt, and a late result from the dead attempt is refused, whenever it comes.

use fleetmark_e2e::*;
use fleetmark_proto::v1::{self as pb, agent_service_client::AgentServiceClient};
use tonic::Code;

#[tokio::test]
async fn a_killed_agents_job_is_rerun_elsewhere_and_its_late_result_is_refused() {
    let dir = scratch();
    let db = TestDb::new().await;
    let opts = CoordinatorOpts {
        lease: "3s",
        heartbeat: "500ms",
        reap_interval: "200ms",
        ..Default::default()
    };
    let coord = Coordinator::start("coordinator", dir.path(), &db.url, free_port(), &opts).await;
    let url = coord.url.as_str();
    let pool = pool(&db.url).await;

    let mut a = start_agent("agent-a", dir.path(), url, "cpu", &[]);
    wait_agents_online(&coord.client(), &["agent-a"]).await;
    let a_id = agent_id(&pool, "agent-a").await;

    // One job, long enough that A is surely mid-measurement when it dies.
    let toml = sweep_toml("long", &[1], 32, "8s");
    let sweep = submit_file(url, None, dir.path(), "long", &toml).await;
    let job = eventually(START_TIMEOUT, "agent A to be timing the job", || {
        let pool = &pool;
        async move {
            let j = jobs(pool, sweep).await.ok()?.pop()?;
            (j.state == "running"
                && j.phase.as_deref() == Some("timing")
                && j.lease_agent_id == Some(a_id))
            .then_some(j)
        }
    })
    .await;
    assert_eq!(job.attempt, 1);
    a.kill();

    // B comes up; the job is B's once A's lease has run out, on attempt 2.
    let _b = start_agent("agent-b", dir.path(), url, "cpu", &[]);
    wait_agents_online(&coord.client(), &["agent-b"]).await;
    let b_id = agent_id(&pool, "agent-b").await;
    let running = eventually(START_TIMEOUT, "agent B to run attempt 2", || {
        let pool = &pool;
        async move {
            let j = jobs(pool, sweep).await.ok()?.pop()?;
            (j.state == "running" && j.lease_agent_id == Some(b_id)).then_some(j)
        }
    })
    .await;
    assert_eq!(running.id, job.id);
    assert_eq!(running.attempt, 2, "a new attempt after the lease expired");

    // While B runs attempt 2, A's attempt-1 result turns up (say, A was only partitioned away
    // and restarted): it registers again with its agent token, keeps its id, gets a new secret.
    let a_again = register_raw(url, &coord.agent_token, "agent-a", "cpu")
        .await
        .expect("A registers again");
    assert_eq!(
        a_again.agent_id,
        a_id.to_string(),
        "same name, same token: same id"
    );
    let a_secret = a_again.agent_secret;
    let mut agent_api = AgentServiceClient::new(raw_channel(url).await);
    let spec = job_spec(&pool, job.id).await;
    let late = made_up_result(Some(job.id), 1, "agent-a", spec.clone());
    let err = agent_api
        .submit_result(bearer(
            pb::SubmitResultRequest {
                agent_id: a_id.to_string(),
                result: Some((&late).into()),
            },
            &a_secret,
        ))
        .await
        .expect_err("a result from an expired attempt must be refused");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    // Nor may A pass its result off as the current attempt: the lease is B's.
    let posing = made_up_result(Some(job.id), 2, "agent-a", spec);
    let err = agent_api
        .submit_result(bearer(
            pb::SubmitResultRequest {
                agent_id: a_id.to_string(),
                result: Some((&posing).into()),
            },
            &a_secret,
        ))
        .await
        .expect_err("a result from an agent without the lease must be refused");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let now = jobs(&pool, sweep)
        .await
        .expect("jobs")
        .pop()
        .expect("the job");
    assert_eq!(
        (now.state.as_str(), now.attempt, now.lease_agent_id),
        ("running", 2, Some(b_id)),
        "refused results leave B's attempt alone"
    );
    assert!(results(&pool, sweep).await.expect("results").is_empty());

    // B finishes: one result, attempt 2, B's.
    wait_sweep_finished(&pool, sweep, SWEEP_TIMEOUT).await;
    let (jobs_done, stored) = assert_sweep_complete_once(&pool, sweep, 1).await;
    assert_eq!(jobs_done[0].attempt, 2);
    assert_eq!(jobs_done[0].last_agent_id, Some(b_id));
    assert_eq!(stored[0].agent_id, b_id);
    assert_eq!(stored[0].attempt, 2);

    // Now replay A's late result built from B's real record, and B's own result a second time.
    let mut sweeps_api = coord.client();
    let listed = sweeps_api
        .list_results(pb::ListResultsRequest {
            sweep_id: sweep.to_string(),
            include_simulated: true,
            ..Default::default()
        })
        .await
        .expect("list results")
        .into_inner()
        .results;
    assert_eq!(listed.len(), 1);
    let b_record = listed[0].result.clone().expect("a record");
    assert_eq!(b_record.attempt, 2);
    assert_eq!(b_record.agent_name, "agent-b");
    assert!(
        !b_record.latencies_ms.is_empty(),
        "the record carries its latencies"
    );
    // A registered its device again through `register_raw`: the record names that device, so
    // what refuses it is the lease, not the hardware check.
    let mut b_record = b_record;
    b_record.hardware_name = "cpu device".into();
    let mut replay = b_record.clone();
    replay.attempt = 1;
    replay.agent_name = "agent-a".into();
    let err = agent_api
        .submit_result(bearer(
            pb::SubmitResultRequest {
                agent_id: a_id.to_string(),
                result: Some(replay),
            },
            &a_secret,
        ))
        .await
        .expect_err("A's late result after the job finished must be refused");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    // B's own result a second time, with B's credentials (a new incarnation of B).
    let b_secret = register_raw(url, &coord.agent_token, "agent-b", "cpu")
        .await
        .expect("B registers again")
        .agent_secret;
    let err = agent_api
        .submit_result(bearer(
            pb::SubmitResultRequest {
                agent_id: b_id.to_string(),
                result: Some(b_record),
            },
            &b_secret,
        ))
        .await
        .expect_err("a second delivery of a finished job's result must be refused");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    let (_, after) = assert_sweep_complete_once(&pool, sweep, 1).await;
    assert_eq!(after, stored, "the stored result is still B's, unchanged");
}
