//! The coordinator keeps no state of its own: stopping it (SIGTERM) or killing it (SIGKILL) in
//! the middle of a sweep and starting a new process on the same port and database loses nothing.
//! The agents and a running `fleetmark watch` reconnect by themselves.

use std::time::Duration;

use fleetmark_e2e::*;

const JOBS: usize = 8;

/// Waits until at least `done` jobs have succeeded while at least two are still open.
async fn wait_progress(pool: &sqlx::PgPool, sweep: uuid::Uuid, done: usize) {
    eventually(
        SWEEP_TIMEOUT,
        &format!("{done} jobs to succeed while others remain"),
        || async move {
            let js = jobs(pool, sweep).await.ok()?;
            let ok = js.iter().filter(|j| j.state == "succeeded").count();
            let open = js
                .iter()
                .filter(|j| j.state == "pending" || j.state == "running")
                .count();
            (ok >= done && open >= 2).then_some(())
        },
    )
    .await;
}

/// Jobs not finished yet. Nothing moves while no coordinator runs, so after a stop this is the
/// state the next coordinator has to carry on from.
async fn open_jobs(pool: &sqlx::PgPool, sweep: uuid::Uuid) -> usize {
    jobs(pool, sweep)
        .await
        .expect("jobs")
        .into_iter()
        .filter(|j| j.state != "succeeded")
        .count()
}

#[tokio::test]
async fn a_coordinator_restarted_mid_sweep_loses_nothing() {
    let dir = scratch();
    let db = TestDb::new().await;
    let port = free_port();
    let opts = CoordinatorOpts {
        lease: "5s",
        ..Default::default()
    };
    let mut first = Coordinator::start("coordinator-1", dir.path(), &db.url, port, &opts).await;
    let url = first.url.clone();
    let pool = pool(&db.url).await;
    let mut a = start_agent("restart-cpu-1", dir.path(), &url, "cpu", &[]);
    let mut b = start_agent("restart-cpu-2", dir.path(), &url, "cpu", &[]);
    wait_agents_online(&first.client(), &["restart-cpu-1", "restart-cpu-2"]).await;
    let ids_before = (
        agent_id(&pool, "restart-cpu-1").await,
        agent_id(&pool, "restart-cpu-2").await,
    );

    let toml = sweep_toml("restart", &[1, 2, 3, 4, 5, 6, 7, 8], 32, "1s");
    let sweep = submit_file(&url, None, dir.path(), "restart", &toml).await;
    let mut watch_cmd = command("fleetmark");
    watch_cmd.env("RUST_LOG", "warn").args([
        "--coordinator",
        &url,
        "--token",
        &admin_token(&url),
        "watch",
        &sweep.to_string(),
    ]);
    let mut watch = Child::spawn("watch", watch_cmd, dir.path());

    // A graceful stop once some jobs are done and others are not...
    wait_progress(&pool, sweep, 1).await;
    let status = first
        .process
        .terminate(Duration::from_secs(20))
        .await
        .expect("the coordinator stops within 20 s of SIGTERM, even with agents long-polling");
    assert!(status.success(), "clean exit on SIGTERM: {status}");
    assert!(open_jobs(&pool, sweep).await >= 1, "stopped mid-sweep");
    let mut second = Coordinator::start("coordinator-2", dir.path(), &db.url, port, &opts).await;

    // ...then a crash, a little further on.
    wait_progress(&pool, sweep, 3).await;
    second.process.kill();
    assert!(open_jobs(&pool, sweep).await >= 1, "killed mid-sweep");
    let third = Coordinator::start("coordinator-3", dir.path(), &db.url, port, &opts).await;

    wait_sweep_finished(&pool, sweep, SWEEP_TIMEOUT).await;
    assert_sweep_complete_once(&pool, sweep, JOBS).await;

    // The agents carried on by themselves, as the same agents.
    a.assert_running();
    b.assert_running();
    let ids_after = (
        agent_id(&pool, "restart-cpu-1").await,
        agent_id(&pool, "restart-cpu-2").await,
    );
    assert_eq!(ids_before, ids_after);
    wait_agents_online(&third.client(), &["restart-cpu-1", "restart-cpu-2"]).await;

    // `watch` followed the sweep across both restarts and reports the whole sweep succeeded.
    let status = watch.wait_exit(START_TIMEOUT).await;
    let log = watch.log();
    assert!(
        status.success(),
        "watch exit status {status}; output:\n{log}"
    );
    assert!(
        log.contains(&format!("{JOBS} of {JOBS} jobs succeeded")),
        "watch output:\n{log}"
    );
}
