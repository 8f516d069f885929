//! Coordinator dispatch benchmark: 1,000 jobs across 10 simulated agents, and the latency from
//! submit to start when agents are idle. Real coordinator, real gRPC on loopback, real Postgres;
//! the agents' device is the simulated backend (it sleeps ~1 ms per job instead of running the
//! model), and its results are stored marked `simulated`, apart from real ones.
//!
//!     cargo bench -p fleetmark-coordinator --bench dispatch
//!
//! Timestamps for latencies come from the database clock (jobs.created_at, jobs.started_at), so
//! no host clock skew enters them.

use std::time::{Duration, Instant};

use fleetmark_proto::{client::sweep_client, v1 as pb};
use fleetmark_testkit::TestDb;
use tokio_util::sync::CancellationToken;

const AGENTS: usize = 10;

fn pct(sorted: &[f64], q: f64) -> f64 {
    fleetmark_core::stats::percentile_sorted(sorted, q)
}

async fn wait_done(client: &mut fleetmark_proto::client::SweepClient, id: &str) {
    loop {
        let s = client
            .get_sweep(pb::GetSweepRequest {
                sweep_id: id.into(),
            })
            .await
            .expect("get sweep")
            .into_inner();
        if s.state != "active" {
            assert_eq!(s.state, "completed");
            assert!(
                s.jobs.iter().all(|j| j.state == "succeeded"),
                "a job failed"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn latencies(pool: &sqlx::PgPool, sweep_ids: &[uuid::Uuid]) -> Vec<f64> {
    let mut v: Vec<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM (started_at - created_at))::float8 * 1000 FROM jobs \
         WHERE sweep_id = ANY($1)",
    )
    .bind(sweep_ids)
    .fetch_all(pool)
    .await
    .expect("latencies");
    v.sort_by(f64::total_cmp);
    v
}

#[tokio::main]
async fn main() {
    let db = TestDb::new().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let store = fleetmark_coordinator::Store::connect(&db.url, 2)
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let role = fleetmark_coordinator::auth::Role::Admin;
    let (_, admin) = store.create_token("bench", role, None, None).await.unwrap();
    let mut config = fleetmark_coordinator::Config::new(db.url.clone());
    config.max_db_connections = 32;
    let s = stop.clone();
    let coordinator = tokio::spawn(fleetmark_coordinator::run(config, listener, async move {
        s.cancelled().await
    }));
    let mut agents = Vec::new();
    for i in 0..AGENTS {
        let mut c = fleetmark_agent::Config::new(url.clone(), format!("sim-{i}"));
        c.devices = "simulated".into();
        c.token = Some(admin.clone());
        c.backend.simulated_latency = Duration::from_millis(1);
        let s = stop.clone();
        agents.push(tokio::spawn(fleetmark_agent::run(c, async move {
            s.cancelled().await
        })));
    }
    let mut client = sweep_client(&url, Some(&admin)).unwrap();
    loop {
        let n = client
            .list_agents(pb::ListAgentsRequest {})
            .await
            .map(|r| r.into_inner().agents.len())
            .unwrap_or(0);
        if n == AGENTS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let measurement = "[measurement]\nwarmup_iterations = 0\nwarmup_duration = \"0s\"\nmin_iterations = 1\nmin_duration = \"0s\"\nstability_window = \"10ms\"\nstability_tolerance = 10.0\n";

    // 1. Throughput: one sweep of 1,000 jobs.
    let toml = format!(
        "name = \"dispatch-1000\"\nbatch_sizes = [1,2,3,4,5,6,7,8,9,10]\nprecisions = [\"f32\"]\nrepetitions = 100\n{measurement}"
    );
    let t0 = Instant::now();
    let resp = client
        .submit_sweep(pb::SubmitSweepRequest { spec_toml: toml })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.jobs, 1000);
    wait_done(&mut client, &resp.sweep_id).await;
    let elapsed = t0.elapsed().as_secs_f64();
    let big = latencies(&pool, &[resp.sweep_id.parse().unwrap()]).await;

    // 2. Idle latency: single-job sweeps, one after another, agents idle in their claims.
    let mut ids = Vec::new();
    for i in 0..200 {
        let toml = format!(
            "name = \"idle-{i}\"\nbatch_sizes = [1]\nprecisions = [\"f32\"]\n{measurement}"
        );
        let r = client
            .submit_sweep(pb::SubmitSweepRequest { spec_toml: toml })
            .await
            .unwrap()
            .into_inner();
        wait_done(&mut client, &r.sweep_id).await;
        ids.push(r.sweep_id.parse().unwrap());
    }
    let idle = latencies(&pool, &ids).await;
    let simulated: i64 = sqlx::query_scalar("SELECT count(*) FROM results WHERE simulated")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(simulated, 1200, "every result is marked simulated");

    println!("coordinator dispatch, {AGENTS} simulated agents (1 ms per job), one coordinator, Postgres on loopback");
    println!("| measure | value |");
    println!("|---|---|");
    println!("| 1,000 jobs, submit to last result | {elapsed:.2} s |");
    println!("| throughput | {:.0} jobs/s |", 1000.0 / elapsed);
    println!(
        "| queue wait in the 1,000-job sweep (created → started), p50 / p99 | {:.0} ms / {:.0} ms |",
        pct(&big, 50.0),
        pct(&big, 99.0)
    );
    println!(
        "| submit-to-start with idle agents (200 single-job sweeps), p50 / p99 | {:.1} ms / {:.1} ms |",
        pct(&idle, 50.0),
        pct(&idle, 99.0)
    );
    stop.cancel();
    for a in agents {
        let _ = a.await;
    }
    let _ = coordinator.await;
}
