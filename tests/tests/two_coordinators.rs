//! Two coordinator processes on one database, each with its own agents (simulated devices, so
//! forty jobs take seconds): every job runs exactly once, on its first attempt, whichever
//! coordinator handed it out.

use std::collections::{BTreeSet, HashMap};

use fleetmark_e2e::*;
use fleetmark_proto::v1 as pb;
use uuid::Uuid;

const JOBS: usize = 40;

#[tokio::test]
async fn two_coordinators_share_one_database_without_running_a_job_twice() {
    let dir = scratch();
    let db = TestDb::new().await;
    let opts = CoordinatorOpts::default();
    // Start them one after the other: both apply migrations at start-up.
    let c1 = Coordinator::start("coordinator-1", dir.path(), &db.url, free_port(), &opts).await;
    let c2 = Coordinator::start("coordinator-2", dir.path(), &db.url, free_port(), &opts).await;
    let pool = pool(&db.url).await;

    let first = ["sim-1a", "sim-1b"];
    let second = ["sim-2a", "sim-2b"];
    let mut agents = Vec::new();
    for name in first {
        agents.push(start_agent(name, dir.path(), &c1.url, "simulated", &[]));
    }
    for name in second {
        agents.push(start_agent(name, dir.path(), &c2.url, "simulated", &[]));
    }
    // Each coordinator sees all four: the state is in the database, not in either process.
    let everyone = [first, second].concat();
    wait_agents_online(&c1.client(), &everyone).await;
    wait_agents_online(&c2.client(), &everyone).await;

    // 10 batch sizes x 4 repetitions, submitted to the first coordinator only.
    let toml = "name = \"shared\"\nbatch_sizes = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\nprecisions = [\"f32\"]\n\
         image_size = 32\nrepetitions = 4\n\n[measurement]\nwarmup_iterations = 1\n\
         warmup_duration = \"0s\"\nmin_iterations = 3\nmin_duration = \"50ms\"\n\
         stability_window = \"10ms\"\nstability_tolerance = 10.0\n";
    let sweep = submit_file(&c1.url, None, dir.path(), "shared", toml).await;
    wait_sweep_finished(&pool, sweep, SWEEP_TIMEOUT).await;
    let (jobs, stored) = assert_sweep_complete_once(&pool, sweep, JOBS).await;
    assert!(
        jobs.iter().all(|j| j.attempt == 1),
        "every job ran once, on its first attempt: {jobs:#?}"
    );
    assert!(stored
        .iter()
        .all(|r| r.simulated && r.hardware_kind == "cpu"));

    // Agents of both coordinators took part.
    let mut names: HashMap<Uuid, String> = HashMap::new();
    for n in everyone.iter() {
        names.insert(agent_id(&pool, n).await, n.to_string());
    }
    let ran: BTreeSet<&str> = stored.iter().map(|r| names[&r.agent_id].as_str()).collect();
    assert!(
        first.iter().any(|n| ran.contains(n)) && second.iter().any(|n| ran.contains(n)),
        "agents of both coordinators ran jobs; ran: {ran:?}"
    );

    // Either coordinator reports the same, complete sweep.
    for c in [&c1, &c2] {
        let listed = c
            .client()
            .list_results(pb::ListResultsRequest {
                sweep_id: sweep.to_string(),
                include_simulated: true,
                omit_latencies: true,
                ..Default::default()
            })
            .await
            .expect("list results")
            .into_inner()
            .results;
        assert_eq!(listed.len(), JOBS, "results via {}", c.url);
    }
    // Simulated results never reach a comparison.
    let out = cli(&c2.url, None, &["compare", "--format", "json"]).await;
    assert_success(&out, "fleetmark compare");
    assert_eq!(stdout(&out).trim(), "[]");
    for a in &mut agents {
        a.assert_running();
    }
}
