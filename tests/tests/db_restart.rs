//! Postgres restarted in the middle of a sweep: the coordinator answers UNAVAILABLE while it is
//! down, stays up, and the sweep completes afterwards with no job lost or run twice over.

use fleetmark_e2e::*;
use fleetmark_proto::v1 as pb;
use tonic::Code;

const JOBS: usize = 5;

#[tokio::test]
async fn a_database_restart_mid_sweep_loses_no_job() {
    let dir = scratch();
    // This test's own cluster, which it stops and starts; declared first so it is dropped last.
    let cluster = tokio::task::spawn_blocking(PrivateCluster::start)
        .await
        .expect("start a private cluster");
    let db = TestDb::create_on(&cluster.url()).await;
    let opts = CoordinatorOpts {
        lease: "10s",
        heartbeat: "500ms",
        reap_interval: "200ms",
        ..Default::default()
    };
    let mut coord =
        Coordinator::start("coordinator", dir.path(), &db.url, free_port(), &opts).await;
    let url = coord.url.clone();
    let pool = pool(&db.url).await;
    let _a = start_agent("dbr-cpu-1", dir.path(), &url, "cpu", &[]);
    let _b = start_agent("dbr-cpu-2", dir.path(), &url, "cpu", &[]);
    wait_agents_online(&coord.client(), &["dbr-cpu-1", "dbr-cpu-2"]).await;

    let toml = sweep_toml("db-restart", &[1, 2, 3, 4, 5], 32, "1500ms");
    let sweep = submit_file(&url, None, dir.path(), "db-restart", &toml).await;
    eventually(SWEEP_TIMEOUT, "a job to be timing", || {
        let pool = &pool;
        async move {
            let js = jobs(pool, sweep).await.ok()?;
            js.iter()
                .any(|j| j.state == "running" && j.phase.as_deref() == Some("timing"))
                .then_some(())
        }
    })
    .await;

    let stopper = cluster.pg.clone();
    tokio::task::spawn_blocking(move || stopper.stop().expect("pg_ctl stop"))
        .await
        .expect("stop the cluster");
    // The coordinator says so, in the documented way, rather than failing some other way; and
    // the CLI says what is wrong. (Both at once: each waits out the pool's acquire timeout.)
    let mut client = coord.client();
    let get = client.get_sweep(pb::GetSweepRequest {
        sweep_id: sweep.to_string(),
    });
    let (got, out) = tokio::join!(get, cli(&url, None, &["sweeps"]));
    let err = got.expect_err("no sweep can be read while the database is down");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    // 3: the coordinator or its database cannot be reached (`fleetmark --help`).
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let said = stderr(&out);
    assert!(said.starts_with("error:"), "{said}");
    assert!(said.contains("cannot reach its database"), "{said}");
    assert!(
        !said.contains("Is it running?"),
        "the coordinator is running: {said}"
    );
    coord.process.assert_running();

    let starter = cluster.pg.clone();
    tokio::task::spawn_blocking(move || starter.restart_stopped().expect("pg_ctl start"))
        .await
        .expect("start the cluster again");

    let state = wait_sweep_finished(&pool, sweep, SWEEP_TIMEOUT).await;
    assert_eq!(state, "completed");
    assert_sweep_complete_once(&pool, sweep, JOBS).await;
    coord.process.assert_running();
    // And it serves normally again.
    let status = coord
        .client()
        .get_sweep(pb::GetSweepRequest {
            sweep_id: sweep.to_string(),
        })
        .await
        .expect("the coordinator serves again")
        .into_inner();
    assert_eq!(status.state, "completed");
    assert!(status.jobs.iter().all(|j| j.state == "succeeded"));
}
