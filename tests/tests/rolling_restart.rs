//! A routine upgrade: an agent is restarted with SIGTERM three times while it runs a job (more
//! than the job's `max_attempts` of 3). Each stop hands the job back without using an attempt,
//! so the job never fails; the fourth incarnation finishes it, and it has exactly one result,
//! from its last run.

use std::time::Duration;

use fleetmark_e2e::*;

const RESTARTS: i32 = 3;

#[tokio::test]
async fn three_rolling_sigterm_restarts_never_fail_the_job() {
    let dir = scratch();
    let db = TestDb::new().await;
    // A lease far longer than the test: only hand-backs can free the job in time.
    let opts = CoordinatorOpts {
        lease: "5m",
        ..Default::default()
    };
    let coord = Coordinator::start("coordinator", dir.path(), &db.url, free_port(), &opts).await;
    let url = coord.url.as_str();
    let pool = pool(&db.url).await;
    let toml = sweep_toml("rolling", &[1], 32, "3s");
    let sweep = submit_file(url, None, dir.path(), "rolling", &toml).await;
    let job = jobs(&pool, sweep).await.expect("jobs")[0].id;

    for round in 1..=RESTARTS {
        let mut agent = start_agent("rolling", dir.path(), url, "simulated", &[]);
        let me = eventually(START_TIMEOUT, "the agent to be running the job", || {
            let pool = &pool;
            async move {
                let j = jobs(pool, sweep).await.ok()?.pop()?;
                let phase = j.phase.as_deref()?;
                (j.state == "running"
                    && j.attempt == round
                    && matches!(phase, "loading" | "checking" | "warmup" | "timing"))
                .then_some(j)
            }
        })
        .await;
        let status = agent
            .terminate(Duration::from_secs(20))
            .await
            .expect("the agent exits within 20 s of SIGTERM");
        assert!(
            status.success(),
            "clean exit: {status}; log:\n{}",
            agent.log()
        );
        let j = jobs(&pool, sweep)
            .await
            .expect("jobs")
            .pop()
            .expect("the job");
        assert_eq!(j.state, "pending", "round {round}: handed back: {j:#?}");
        assert!(j.lease_agent_id.is_none());
        let (attempt, failures, handbacks, error) = job_counts(&pool, job).await;
        assert_eq!(attempt, round, "every run has its own number");
        assert_eq!(
            failures, 0,
            "a stop is not the job's failure (round {round}, phase {:?})",
            me.phase
        );
        assert_eq!(handbacks, round, "each stop counts as a hand-back");
        assert!(
            error.as_deref().is_some_and(|e| e.contains("stopped")),
            "the job says why it was handed back: {error:?}"
        );
    }

    // The upgraded agent finishes the job: one result, from the fourth run.
    let _agent = start_agent("rolling", dir.path(), url, "simulated", &[]);
    wait_sweep_finished(&pool, sweep, SWEEP_TIMEOUT).await;
    let (done, _) = assert_sweep_complete_once(&pool, sweep, 1).await;
    assert_eq!(done[0].attempt, RESTARTS + 1);
    let (_, failures, handbacks, _) = job_counts(&pool, job).await;
    assert_eq!((failures, handbacks), (0, RESTARTS));
}
