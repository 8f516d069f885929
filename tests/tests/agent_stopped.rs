//! An agent stopped gracefully (SIGTERM, as on a preempted node) in the middle of a job hands the
//! job back at once, instead of leaving it to wait out its lease, and exits cleanly.

use std::time::Duration;

use fleetmark_e2e::*;

#[tokio::test]
async fn a_stopped_agent_hands_its_job_back_at_once() {
    let dir = scratch();
    let db = TestDb::new().await;
    // A lease far longer than the test: only the hand-back can free the job in time.
    let opts = CoordinatorOpts {
        lease: "5m",
        heartbeat: "500ms",
        ..Default::default()
    };
    let coord = Coordinator::start("coordinator", dir.path(), &db.url, free_port(), &opts).await;
    let url = coord.url.as_str();
    let pool = pool(&db.url).await;
    let mut a = start_agent("leaving", dir.path(), url, "simulated", &[]);
    wait_agents_online(&coord.client(), &["leaving"]).await;
    let a_id = agent_id(&pool, "leaving").await;

    let toml = sweep_toml("handback", &[1], 32, "5s");
    let sweep = submit_file(url, None, dir.path(), "handback", &toml).await;
    eventually(START_TIMEOUT, "the agent to be timing the job", || {
        let pool = &pool;
        async move {
            let j = jobs(pool, sweep).await.ok()?.pop()?;
            (j.phase.as_deref() == Some("timing") && j.lease_agent_id == Some(a_id)).then_some(())
        }
    })
    .await;

    let status = a
        .terminate(Duration::from_secs(20))
        .await
        .expect("the agent exits within 20 s of SIGTERM");
    assert!(status.success(), "clean exit: {status}; log:\n{}", a.log());
    // By the time it is gone, the job is back in the queue, its first attempt recorded.
    let j = jobs(&pool, sweep)
        .await
        .expect("jobs")
        .pop()
        .expect("the job");
    assert_eq!(j.state, "pending", "handed back: {j:#?}");
    assert_eq!(j.attempt, 1);
    assert!(j.lease_agent_id.is_none());
    let error: Option<String> = sqlx::query_scalar("SELECT error FROM jobs WHERE id = $1")
        .bind(j.id)
        .fetch_one(&pool)
        .await
        .expect("error column");
    assert!(
        error.as_deref().is_some_and(|e| e.contains("stopped")),
        "the job says why it was handed back: {error:?}"
    );

    // Another agent takes it straight away and finishes it on attempt 2.
    let _b = start_agent("arriving", dir.path(), url, "simulated", &[]);
    let b_id = {
        wait_agents_online(&coord.client(), &["arriving"]).await;
        agent_id(&pool, "arriving").await
    };
    wait_sweep_finished(&pool, sweep, SWEEP_TIMEOUT).await;
    let (done, stored) = assert_sweep_complete_once(&pool, sweep, 1).await;
    assert_eq!(done[0].attempt, 2);
    assert_eq!(stored[0].agent_id, b_id);
}
