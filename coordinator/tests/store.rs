//! Store tests against a real Postgres, each on its own fresh database.

use std::{collections::HashSet, time::Duration};

use chrono::Utc;
use fleetmark_coordinator::{
    store::{AgentDevice, AgentRegistration, FailOutcome, ResultFilter},
    CoordinatorError, Store,
};
use fleetmark_core::{BenchResult, HostInventory, JobState, LatencyStats, SweepSpec};
use fleetmark_testkit::TestDb;
use uuid::Uuid;

async fn store() -> (TestDb, Store) {
    let db = TestDb::new().await;
    let store = Store::connect(&db.url, 20).await.unwrap();
    store.migrate().await.unwrap();
    (db, store)
}

async fn agent(store: &Store, name: &str, kind: &str) -> Uuid {
    store
        .register_agent(&AgentRegistration {
            name: name.into(),
            labels: Default::default(),
            price_per_hour: Some(1.5),
            inventory: HostInventory::default(),
            devices: vec![AgentDevice {
                device: "cpu".into(),
                kind: kind.into(),
                name: format!("{kind} device"),
            }],
        })
        .await
        .unwrap()
}

fn sweep(toml: &str) -> SweepSpec {
    SweepSpec::from_toml(toml).unwrap()
}

const LEASE: Duration = Duration::from_secs(30);

/// A well-formed record for a claimed job, with made-up latencies.
fn result_for(
    job: &fleetmark_coordinator::store::JobRow,
    attempt: i32,
    agent_name: &str,
) -> BenchResult {
    let latencies = vec![2.0, 2.5, 3.0];
    BenchResult {
        schema: fleetmark_core::RESULT_SCHEMA_VERSION,
        job_id: Some(job.id),
        attempt: attempt as u32,
        agent_name: agent_name.into(),
        agent_labels: Default::default(),
        price_per_hour: None,
        hardware_kind: "cpu".into(),
        hardware_name: "test cpu".into(),
        device: "cpu".into(),
        spec: job.spec.clone(),
        backend: Default::default(),
        weights: Default::default(),
        latency: LatencyStats::from_samples(&latencies).unwrap(),
        images_per_sec: 400.0,
        input_copy: None,
        peak_memory_bytes: 1,
        memory_scope: "process-rss".into(),
        warmup_iterations: 1,
        timed_seconds: 0.01,
        telemetry: None,
        correctness: None,
        environment: Default::default(),
        host: HostInventory::default(),
        started_at: Utc::now(),
        finished_at: Utc::now(),
        latencies_ms: latencies,
        stability: None,
    }
}

#[tokio::test]
async fn a_sweep_runs_to_completion() {
    let (_db, store) = store().await;
    let a = agent(&store, "a", "cpu").await;
    let (sweep_id, n) = store
        .create_sweep(&sweep("batch_sizes=[1,2]\nprecisions=[\"f32\"]"), "")
        .await
        .unwrap();
    assert_eq!(n, 2);
    for expected_batch in [1, 2] {
        let job = store
            .claim_job(a, "cpu", "cpu", LEASE)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            job.spec.batch_size, expected_batch,
            "oldest job first, in sweep order"
        );
        assert_eq!(job.attempt, 1);
        assert_eq!(job.state, JobState::Running);
        store
            .submit_result(a, &result_for(&job, 1, "a"))
            .await
            .unwrap();
    }
    assert!(store
        .claim_job(a, "cpu", "cpu", LEASE)
        .await
        .unwrap()
        .is_none());
    let s = store.get_sweep(sweep_id).await.unwrap();
    assert_eq!((s.state.as_str(), s.jobs, s.finished), ("completed", 2, 2));
    let results = store
        .list_results(&ResultFilter {
            sweep_id: Some(sweep_id),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(results.len(), 2);
    assert_eq!(results[0].result.latencies_ms, vec![2.0, 2.5, 3.0]);
}

#[tokio::test]
async fn an_expired_lease_goes_to_another_agent_and_the_late_result_is_rejected() {
    let (_db, store) = store().await;
    let dead = agent(&store, "dead", "cpu").await;
    let alive = agent(&store, "alive", "cpu").await;
    store
        .create_sweep(&sweep("batch_sizes=[4]\nprecisions=[\"f32\"]"), "")
        .await
        .unwrap();
    let first = store
        .claim_job(dead, "cpu", "cpu", LEASE)
        .await
        .unwrap()
        .unwrap();
    // Nothing expires before its time.
    assert!(store.expire_leases(None).await.unwrap().is_empty());
    // An hour later, by the database's reckoning, the lease is long gone.
    let later = Utc::now() + chrono::Duration::hours(1);
    assert_eq!(
        store.expire_leases(Some(later)).await.unwrap(),
        vec![first.id]
    );
    let second = store
        .claim_job(alive, "cpu", "cpu", LEASE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((second.id, second.attempt), (first.id, 2));

    // The dead agent's progress and result for attempt 1 are refused.
    assert!(store
        .report_progress(dead, first.id, 1, "timing", 3, 0.5, LEASE)
        .await
        .unwrap()
        .is_none());
    let err = store
        .submit_result(dead, &result_for(&first, 1, "dead"))
        .await
        .unwrap_err();
    assert!(matches!(err, CoordinatorError::StaleLease(_)), "{err}");
    // Even claiming to be the current attempt does not help a non-holder.
    let err = store
        .submit_result(dead, &result_for(&first, 2, "dead"))
        .await
        .unwrap_err();
    assert!(matches!(err, CoordinatorError::StaleLease(_)), "{err}");

    store
        .submit_result(alive, &result_for(&second, 2, "alive"))
        .await
        .unwrap();
    let job = store.get_job(first.id).await.unwrap();
    assert_eq!((job.state, job.attempt), (JobState::Succeeded, 2));
    assert_eq!(job.agent_name.as_deref(), Some("alive"));
    // And once succeeded, a replay of the dead agent's result is still refused.
    assert!(store
        .submit_result(dead, &result_for(&first, 1, "dead"))
        .await
        .is_err());
}

#[tokio::test]
async fn illegal_transitions_are_refused_by_the_database() {
    let (_db, store) = store().await;
    let a = agent(&store, "a", "cpu").await;
    store
        .create_sweep(&sweep("batch_sizes=[1]\nprecisions=[\"f32\"]"), "")
        .await
        .unwrap();
    let job = store
        .claim_job(a, "cpu", "cpu", LEASE)
        .await
        .unwrap()
        .unwrap();
    store
        .submit_result(a, &result_for(&job, 1, "a"))
        .await
        .unwrap();
    let pool = store.pool();
    for sql in [
        "UPDATE jobs SET state = 'pending'",
        "UPDATE jobs SET state = 'running', lease_agent_id = last_agent_id, lease_device = 'cpu', lease_expires_at = now()",
        "UPDATE jobs SET attempt = 7",
    ] {
        let err = sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
            .execute(pool)
            .await
            .unwrap_err();
        let code = err.as_database_error().and_then(|d| d.code()).map(|c| c.to_string());
        assert_eq!(code.as_deref(), Some("FM001"), "{sql}: {err}");
    }
    // A running job needs a lease; a pending one may not have one.
    let err = sqlx::query(
        "INSERT INTO jobs (id, sweep_id, seq, spec, target, state) \
         SELECT gen_random_uuid(), sweep_id, 99, spec, target, 'running' FROM jobs LIMIT 1",
    )
    .execute(pool)
    .await
    .unwrap_err();
    assert!(err.to_string().contains("must be created pending"), "{err}");
}

#[tokio::test]
async fn concurrent_claims_never_hand_out_a_job_twice() {
    let (_db, store) = store().await;
    let mut agents = Vec::new();
    for i in 0..8 {
        agents.push(agent(&store, &format!("a{i}"), "cpu").await);
    }
    store
        .create_sweep(
            &sweep("batch_sizes=[1,2,3,4,5]\nprecisions=[\"f32\",\"f16\"]\nrepetitions=4"),
            "",
        )
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for a in agents {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(job) = store.claim_job(a, "cpu", "cpu", LEASE).await.unwrap() {
                got.push(job.id);
            }
            got
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let distinct: HashSet<_> = all.iter().collect();
    assert_eq!(all.len(), 40);
    assert_eq!(distinct.len(), 40, "a job was claimed twice");
}

#[tokio::test]
async fn jobs_go_only_to_matching_hardware() {
    let (_db, store) = store().await;
    let cpu = agent(&store, "cpu-agent", "cpu").await;
    let h100 = agent(&store, "h100-agent", "h100").await;
    store
        .create_sweep(
            &sweep("batch_sizes=[1]\nprecisions=[\"f32\"]\ngpus=[\"h100\",\"gpu\"]"),
            "",
        )
        .await
        .unwrap();
    assert!(store
        .claim_job(cpu, "cpu", "cpu", LEASE)
        .await
        .unwrap()
        .is_none());
    let a = store
        .claim_job(h100, "cpu", "h100", LEASE)
        .await
        .unwrap()
        .unwrap();
    let b = store
        .claim_job(h100, "cpu", "h100", LEASE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.spec.target.to_string(), "h100");
    assert_eq!(b.spec.target.to_string(), "gpu");
}

#[tokio::test]
async fn failures_retry_until_attempts_run_out_and_permanent_ones_stop_at_once() {
    let (_db, store) = store().await;
    let a = agent(&store, "a", "cpu").await;
    let (sweep_id, _) = store
        .create_sweep(&sweep("batch_sizes=[1]\nprecisions=[\"f32\"]"), "")
        .await
        .unwrap();
    for attempt in 1..=3 {
        // The only job there is: the same device takes it again.
        let j = store
            .claim_job(a, "cpu", "cpu", LEASE)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(j.attempt, attempt);
        let outcome = store
            .fail_job(a, j.id, attempt, "flaky", false)
            .await
            .unwrap()
            .unwrap();
        let expected = if attempt < 3 {
            FailOutcome::Retried
        } else {
            FailOutcome::Failed
        };
        assert_eq!(outcome, expected);
    }
    assert!(store
        .claim_job(a, "cpu", "cpu", LEASE)
        .await
        .unwrap()
        .is_none());
    assert_eq!(store.get_sweep(sweep_id).await.unwrap().state, "completed");

    let (second, _) = store
        .create_sweep(&sweep("batch_sizes=[2]\nprecisions=[\"f32\"]"), "")
        .await
        .unwrap();
    let k = store
        .claim_job(a, "cpu", "cpu", LEASE)
        .await
        .unwrap()
        .unwrap();
    let outcome = store
        .fail_job(a, k.id, 1, "gate failed", true)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(outcome, FailOutcome::Failed);
    assert_eq!(
        store.get_job(k.id).await.unwrap().error.as_deref(),
        Some("gate failed")
    );
    // Failing again, with a lease already gone, is refused.
    assert!(store
        .fail_job(a, k.id, 1, "again", true)
        .await
        .unwrap()
        .is_none());
    assert_eq!(store.get_sweep(second).await.unwrap().state, "completed");
}

#[tokio::test]
async fn cancelling_stops_pending_and_running_jobs() {
    let (_db, store) = store().await;
    let a = agent(&store, "a", "cpu").await;
    let (sweep_id, _) = store
        .create_sweep(&sweep("batch_sizes=[1,2,3]\nprecisions=[\"f32\"]"), "")
        .await
        .unwrap();
    let running = store
        .claim_job(a, "cpu", "cpu", LEASE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(store.cancel_sweep(sweep_id).await.unwrap(), Some(3));
    assert!(store
        .claim_job(a, "cpu", "cpu", LEASE)
        .await
        .unwrap()
        .is_none());
    assert!(store
        .report_progress(a, running.id, 1, "timing", 1, 0.1, LEASE)
        .await
        .unwrap()
        .is_none());
    assert_eq!(
        store.stale_running(a, &[(running.id, 1)]).await.unwrap(),
        vec![(running.id, 1)]
    );
    assert!(store
        .submit_result(a, &result_for(&running, 1, "a"))
        .await
        .is_err());
    assert_eq!(store.get_sweep(sweep_id).await.unwrap().state, "cancelled");
    assert_eq!(store.cancel_sweep(Uuid::new_v4()).await.unwrap(), None);
}

#[tokio::test]
async fn imports_land_as_a_finished_sweep_with_their_agents() {
    let (_db, store) = store().await;
    let a = agent(&store, "a", "cpu").await;
    store
        .create_sweep(&sweep("batch_sizes=[8]\nprecisions=[\"f16\"]"), "")
        .await
        .unwrap();
    let job = store
        .claim_job(a, "cpu", "cpu", LEASE)
        .await
        .unwrap()
        .unwrap();
    let mut r = result_for(&job, 1, "h100-node");
    r.job_id = None;
    r.hardware_kind = "h100".into();
    let (sweep_id, n) = store.import("h100 run", &[r.clone(), r]).await.unwrap();
    assert_eq!(n, 2);
    let s = store.get_sweep(sweep_id).await.unwrap();
    assert_eq!((s.state.as_str(), s.finished), ("imported", 2));
    let listed = store
        .list_results(&ResultFilter {
            precision: Some("f16".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(listed.len(), 2);
    assert!(listed.iter().all(|s| s.result.hardware_kind == "h100"));
    let agents = store.list_agents(Duration::from_secs(10)).await.unwrap();
    let imported = agents.iter().find(|x| x.name == "h100-node").unwrap();
    assert_eq!(imported.origin, "imported");
    assert!(!imported.online);
    // A broken record is refused, and nothing of the batch is stored.
    let mut bad = result_for(&job, 1, "x");
    bad.latencies_ms.clear();
    assert!(store.import("bad", &[bad]).await.is_err());
    assert_eq!(store.list_sweeps(100).await.unwrap().len(), 2);
}

#[tokio::test]
async fn leases_get_a_fresh_term_after_a_database_outage() {
    let (_db, store) = store().await;
    let a = agent(&store, "a", "cpu").await;
    store
        .create_sweep(&sweep("batch_sizes=[1]\nprecisions=[\"f32\"]"), "")
        .await
        .unwrap();
    let job = store
        .claim_job(a, "cpu", "cpu", LEASE)
        .await
        .unwrap()
        .unwrap();
    // As if the agent could not report for a minute because the database was down.
    sqlx::query("UPDATE jobs SET lease_expires_at = now() - interval '1 minute'")
        .execute(store.pool())
        .await
        .unwrap();
    assert_eq!(store.extend_running_leases(LEASE).await.unwrap(), 1);
    assert!(store.expire_leases(None).await.unwrap().is_empty());
    let j = store.get_job(job.id).await.unwrap();
    assert_eq!((j.state, j.attempt), (JobState::Running, 1));
    assert!(j.lease_expires_at.unwrap() > Utc::now() + chrono::Duration::seconds(20));
}

#[tokio::test]
async fn a_retry_goes_to_another_device_when_one_is_free() {
    let (_db, store) = store().await;
    let a = agent(&store, "a", "cpu").await;
    let b = agent(&store, "b", "cpu").await;
    store
        .create_sweep(&sweep("batch_sizes=[1,2]\nprecisions=[\"f32\"]"), "")
        .await
        .unwrap();
    let first = store
        .claim_job(a, "cpu", "cpu", LEASE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.spec.batch_size, 1);
    store
        .fail_job(a, first.id, 1, "out of memory", false)
        .await
        .unwrap();
    // The device that just failed it takes the other job first...
    let next = store
        .claim_job(a, "cpu", "cpu", LEASE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next.spec.batch_size, 2);
    // ...and the retry goes to another agent.
    let retry = store
        .claim_job(b, "cpu", "cpu", LEASE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((retry.id, retry.attempt), (first.id, 2));
}

#[tokio::test]
async fn a_result_must_answer_its_job() {
    let (_db, store) = store().await;
    let a = agent(&store, "a", "h100").await;
    store
        .create_sweep(
            &sweep("batch_sizes=[8]\nprecisions=[\"f16\"]\ngpus=[\"h100\"]"),
            "",
        )
        .await
        .unwrap();
    let job = store
        .claim_job(a, "cpu", "h100", LEASE)
        .await
        .unwrap()
        .unwrap();
    let mut wrong_hw = result_for(&job, 1, "a");
    wrong_hw.hardware_kind = "t4".into();
    let err = store
        .submit_result(a, &wrong_hw)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("targets h100 but the result comes from t4"),
        "{err}"
    );
    let mut wrong_spec = result_for(&job, 1, "a");
    wrong_spec.hardware_kind = "h100".into();
    wrong_spec.spec.batch_size = 16;
    let err = store
        .submit_result(a, &wrong_spec)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("is not job"), "{err}");
    // Nothing was stored, and the right result is still accepted.
    let mut right = result_for(&job, 1, "a");
    right.hardware_kind = "h100".into();
    store.submit_result(a, &right).await.unwrap();
}

#[tokio::test]
async fn the_reaper_completes_a_sweep_whose_check_was_missed() {
    let (_db, store) = store().await;
    let a = agent(&store, "a", "cpu").await;
    let (sweep_id, _) = store
        .create_sweep(&sweep("batch_sizes=[1]\nprecisions=[\"f32\"]"), "")
        .await
        .unwrap();
    let job = store
        .claim_job(a, "cpu", "cpu", LEASE)
        .await
        .unwrap()
        .unwrap();
    store
        .submit_result(a, &result_for(&job, 1, "a"))
        .await
        .unwrap();
    // As if the process died between committing the job and checking the sweep.
    sqlx::query("UPDATE sweeps SET state = 'active', finished_at = NULL")
        .execute(store.pool())
        .await
        .unwrap();
    assert_eq!(store.complete_finished_sweeps().await.unwrap(), 1);
    assert_eq!(store.get_sweep(sweep_id).await.unwrap().state, "completed");
    assert_eq!(store.complete_finished_sweeps().await.unwrap(), 0);
}
