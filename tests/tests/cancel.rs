//! `fleetmark cancel` on a sweep whose job is running: the jobs end cancelled with no result,
//! `watch` reports the sweep did not succeed, and the agent drops the job and takes new work.

use std::time::Duration;

use fleetmark_e2e::*;

#[tokio::test]
async fn cancelling_a_sweep_stops_its_running_job_and_frees_the_agent() {
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
    let url = coord.url.as_str();
    let pool = pool(&db.url).await;
    let mut agent = start_agent("sim-only", dir.path(), url, "simulated", &[]);
    wait_agents_online(&coord.client(), &["sim-only"]).await;

    // Two jobs that would each take a minute on the agent's one device.
    let mut long = sweep_toml("long", &[1, 2], 32, "60s");
    long = long.replace("max_duration = \"60s\"", "max_duration = \"120s\"");
    let sweep = submit_file(url, None, dir.path(), "long", &long).await;
    let sweep_s = sweep.to_string();
    let mut watch_cmd = command("fleetmark");
    watch_cmd.env("RUST_LOG", "warn").args([
        "--coordinator",
        url,
        "--token",
        &admin_token(url),
        "watch",
        &sweep_s,
    ]);
    let mut watch = Child::spawn("watch", watch_cmd, dir.path());
    eventually(START_TIMEOUT, "the first job to be timing", || {
        let pool = &pool;
        async move {
            let js = jobs(pool, sweep).await.ok()?;
            js.iter()
                .any(|j| j.state == "running" && j.phase.as_deref() == Some("timing"))
                .then_some(())
        }
    })
    .await;

    let out = cli(url, None, &["cancel", &sweep_s]).await;
    assert_success(&out, "fleetmark cancel");
    assert!(
        stderr(&out).contains("cancelled 2 unfinished jobs"),
        "{}",
        stderr(&out)
    );
    assert_eq!(sweep_state(&pool, sweep).await.expect("state"), "cancelled");
    let js = jobs(&pool, sweep).await.expect("jobs");
    assert!(
        js.iter()
            .all(|j| j.state == "cancelled" && j.lease_agent_id.is_none()),
        "{js:#?}"
    );

    // `watch` ends, unsuccessfully, and says why.
    let status = watch.wait_exit(START_TIMEOUT).await;
    let log = watch.log();
    assert_eq!(status.code(), Some(1), "watch exit status; output:\n{log}");
    assert!(log.contains("cancelled"), "{log}");

    // The agent let go of the cancelled job: a new short sweep runs at once on its one device,
    // well before the minute the cancelled job would have taken.
    let short = sweep_toml("short", &[1], 32, "50ms");
    let next = submit_file(url, None, dir.path(), "short", &short).await;
    wait_sweep_finished(&pool, next, Duration::from_secs(40)).await;
    assert_sweep_complete_once(&pool, next, 1).await;
    assert!(results(&pool, sweep).await.expect("results").is_empty());
    // Cancelled jobs stay cancelled: nothing came back for them afterwards.
    let js = jobs(&pool, sweep).await.expect("jobs");
    assert!(js.iter().all(|j| j.state == "cancelled"), "{js:#?}");
    agent.assert_running();
}
