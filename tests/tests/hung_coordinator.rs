//! A hung coordinator (SIGSTOPped: its sockets stay open, nothing answers) stalls no client
//! past its deadline. The CLI gives up with a clear error; an agent given two coordinators
//! moves to the other one and delivers its result there, with no lease expiry.

use std::time::{Duration, Instant};

use fleetmark_e2e::*;

#[tokio::test]
async fn a_frozen_coordinator_stalls_nobody_past_the_deadline() {
    let dir = scratch();
    let db = TestDb::new().await;
    let opts = CoordinatorOpts {
        lease: "8s",
        ..Default::default()
    };
    let mut frozen =
        Coordinator::start("coordinator-1", dir.path(), &db.url, free_port(), &opts).await;
    let live = Coordinator::start("coordinator-2", dir.path(), &db.url, free_port(), &opts).await;
    let both = format!("{},{}", frozen.url, live.url);
    let pool = pool(&db.url).await;
    let mut agent = start_agent(
        "patient",
        dir.path(),
        &both,
        "simulated",
        &["--call-timeout", "2s"],
    );

    let toml = sweep_toml("hung", &[1], 32, "5s");
    let sweep = submit_file(&live.url, None, dir.path(), "hung", &toml).await;
    eventually(START_TIMEOUT, "the agent to be timing the job", || {
        let pool = &pool;
        async move {
            let j = jobs(pool, sweep).await.ok()?.pop()?;
            (j.phase.as_deref() == Some("timing")).then_some(())
        }
    })
    .await;
    frozen.freeze();

    // The CLI against the frozen one alone: an error after its 2 s deadline, not a hang.
    let started = Instant::now();
    let out = cli(&frozen.url, None, &["--call-timeout", "2s", "sweeps"]).await;
    let took = started.elapsed();
    assert!(!out.status.success(), "a frozen coordinator cannot answer");
    assert!(
        took < Duration::from_secs(12),
        "the CLI gave up after {took:?}; its deadline is 2 s"
    );
    assert!(
        stderr(&out).contains("did not answer in time"),
        "a clear error: {}",
        stderr(&out)
    );

    // The agent moved on: the result arrives through the live coordinator while the other is
    // still frozen.
    wait_sweep_finished(&pool, sweep, SWEEP_TIMEOUT).await;
    let (done, _) = assert_sweep_complete_once(&pool, sweep, 1).await;
    assert_eq!(
        done[0].attempt, 1,
        "no lease expired while the first coordinator hung"
    );
    agent.assert_running();
    frozen.thaw();
    frozen.wait_ready().await;
}
