//! A coordinator in a crash loop (SIGKILLed and restarted over and over) while the agent that
//! holds a job is dead. Every start renews the leases of agents heard from just before, never
//! those of an agent gone quiet, so the dead agent's job is requeued within about one lease
//! instead of being kept leased for as long as the loop lasts.

use std::time::{Duration, Instant};

use fleetmark_e2e::*;

#[tokio::test]
async fn a_crash_looping_coordinator_does_not_keep_a_dead_agents_job() {
    let dir = scratch();
    let db = TestDb::new().await;
    let opts = CoordinatorOpts {
        lease: "4s",
        heartbeat: "500ms",
        reap_interval: "200ms",
        ..Default::default()
    };
    let lease = Duration::from_secs(4);
    let port = free_port();
    let mut coord = Coordinator::start("coordinator", dir.path(), &db.url, port, &opts).await;
    let url = coord.url.clone();
    let pool = pool(&db.url).await;
    let mut doomed = start_agent("doomed", dir.path(), &url, "simulated", &[]);
    let toml = sweep_toml("crash-loop", &[1], 32, "60s");
    let sweep = submit_file(&url, None, dir.path(), "crash-loop", &toml).await;
    let doomed_id = eventually(START_TIMEOUT, "the agent to be timing the job", || {
        let pool = &pool;
        async move {
            let j = jobs(pool, sweep).await.ok()?.pop()?;
            (j.phase.as_deref() == Some("timing")).then_some(j.lease_agent_id?)
        }
    })
    .await;
    doomed.kill();
    let died = Instant::now();

    // Restart the coordinator again and again; each incarnation lives at most a second.
    let mut restarts = 0;
    let requeued = loop {
        coord.process.kill();
        coord = Coordinator::start("coordinator", dir.path(), &db.url, port, &opts).await;
        restarts += 1;
        let pending = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                if let Ok(mut js) = jobs(&pool, sweep).await {
                    if js.pop().is_some_and(|j| j.state == "pending") {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        if pending.is_ok() {
            break died.elapsed();
        }
        assert!(
            died.elapsed() < lease * 5,
            "the dead agent's job is still leased after {restarts} restarts and {:?}",
            died.elapsed()
        );
    };
    assert!(
        restarts >= 2,
        "the coordinator restarted while the lease ran ({restarts})"
    );
    // One lease from its last report, plus restarts and reaper ticks on a loaded machine.
    assert!(
        requeued < lease * 3,
        "requeued {requeued:?} after the agent died ({restarts} restarts)"
    );
    let j = jobs(&pool, sweep)
        .await
        .expect("jobs")
        .pop()
        .expect("the job");
    let (_, failures, _, error) = job_counts(&pool, j.id).await;
    assert_eq!(
        failures, 1,
        "a vanished agent's expiry counts against the job: {error:?}"
    );
    assert_eq!(j.last_agent_id, Some(doomed_id));

    assert_eq!(j.state, "pending");
    assert!(j.lease_agent_id.is_none());
    coord.process.assert_running();
}
