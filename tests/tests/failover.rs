//! Two coordinators on one database; the agent and the CLI are given both. The coordinator the
//! agent uses is SIGKILLed mid-job: the agent moves to the other, keeps its lease alive there,
//! and delivers its result with no lease expiry (the job keeps attempt 1). The CLI, given the
//! dead one first, is answered by the live one.

use fleetmark_e2e::*;

#[tokio::test]
async fn the_agent_moves_to_the_next_coordinator_and_delivers_without_an_expiry() {
    let dir = scratch();
    let db = TestDb::new().await;
    let opts = CoordinatorOpts {
        lease: "6s",
        ..Default::default()
    };
    let mut first =
        Coordinator::start("coordinator-1", dir.path(), &db.url, free_port(), &opts).await;
    let second = Coordinator::start("coordinator-2", dir.path(), &db.url, free_port(), &opts).await;
    let both = format!("{},{}", first.url, second.url);
    let pool = pool(&db.url).await;
    let mut agent = start_agent(
        "mover",
        dir.path(),
        &both,
        "simulated",
        &["--call-timeout", "2s"],
    );

    let toml = sweep_toml("failover", &[1], 32, "4s");
    let sweep = submit_file(&second.url, None, dir.path(), "failover", &toml).await;
    eventually(START_TIMEOUT, "the agent to be timing the job", || {
        let pool = &pool;
        async move {
            let j = jobs(pool, sweep).await.ok()?.pop()?;
            (j.phase.as_deref() == Some("timing")).then_some(())
        }
    })
    .await;
    // The agent talks to the first coordinator (the first in its list) until now.
    first.process.kill();

    wait_sweep_finished(&pool, sweep, SWEEP_TIMEOUT).await;
    let (done, _) = assert_sweep_complete_once(&pool, sweep, 1).await;
    assert_eq!(done[0].attempt, 1, "no lease expired on the way");
    let (_, failures, handbacks, error) = job_counts(&pool, done[0].id).await;
    assert_eq!((failures, handbacks), (0, 0), "{error:?}");
    agent.assert_running();

    // The CLI, dead coordinator first: the live one answers.
    let out = cli(&both, None, &["sweeps", "--format", "json"]).await;
    assert_success(&out, "fleetmark sweeps with a dead coordinator first");
    assert!(
        stdout(&out).contains(&sweep.to_string()),
        "{}",
        stdout(&out)
    );
}
