//! Store tests against a real Postgres, each on its own fresh database.

use std::{collections::HashSet, time::Duration};

use chrono::Utc;
use fleetmark_coordinator::{
    store::{
        AgentDevice, AgentRegistration, FailOutcome, ImportOutcome, ProgressBySecret,
        ResultBySecret, ResultFilter,
    },
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
                precisions: None,
                health: None,
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
        hardware_name: "cpu device".into(),
        device: "cpu".into(),
        spec: job.spec.clone(),
        backend: Default::default(),
        weights: Default::default(),
        latency: LatencyStats::from_samples(&latencies).unwrap(),
        images_per_sec: job.spec.batch_size as f64 * 400.0,
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
        .unwrap()
        .results;
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
    let mut again = r.clone();
    again.finished_at += chrono::Duration::milliseconds(1);
    let report = store
        .import("h100 run", "tester", &[r.clone(), again, r])
        .await
        .unwrap();
    let sweep_id = report.sweep.unwrap();
    assert!(
        matches!(
            report.outcomes.as_slice(),
            [
                ImportOutcome::Imported { .. },
                ImportOutcome::Imported { .. },
                ImportOutcome::Duplicate { result: Some(_) }
            ]
        ),
        "{:?}",
        report.outcomes
    );
    let s = store.get_sweep(sweep_id).await.unwrap();
    assert_eq!((s.state.as_str(), s.finished), ("imported", 2));
    let listed = store
        .list_results(&ResultFilter {
            precision: Some("f16".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .results;
    assert_eq!(listed.len(), 2);
    assert!(listed.iter().all(|s| s.result.hardware_kind == "h100"));
    assert!(listed
        .iter()
        .all(|s| s.imported_by.as_deref() == Some("tester")));
    let agents = store.list_agents(Duration::from_secs(10)).await.unwrap();
    let imported = agents
        .iter()
        .find(|x| x.name == "imported/h100-node")
        .unwrap();
    assert_eq!(imported.origin, "imported");
    assert!(!imported.online);
    // A broken record is refused, and nothing of the batch is stored.
    let mut bad = result_for(&job, 1, "x");
    bad.latencies_ms.clear();
    assert!(store.import("bad", "tester", &[bad]).await.is_err());
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
    assert_eq!(store.extend_running_leases(LEASE, HEARD).await.unwrap(), 1);
    assert!(store.expire_leases(None).await.unwrap().is_empty());
    let j = store.get_job(job.id).await.unwrap();
    assert_eq!((j.state, j.attempt), (JobState::Running, 1));
    assert!(j.lease_expires_at.unwrap() > Utc::now() + chrono::Duration::seconds(20));
}

const HEARD: Duration = Duration::from_secs(3);

/// (failures, handbacks, error) of a job.
async fn counts(store: &Store, job: Uuid) -> (i32, i32, Option<String>) {
    sqlx::query_as("SELECT failures, handbacks, error FROM jobs WHERE id = $1")
        .bind(job)
        .fetch_one(store.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn renewal_after_an_outage_skips_agents_that_had_gone_quiet() {
    let (_db, store) = store().await;
    let alive = agent(&store, "alive", "cpu").await;
    let dead = agent(&store, "dead", "cpu").await;
    store
        .create_sweep(&sweep("batch_sizes=[1,2]\nprecisions=[\"f32\"]"), "")
        .await
        .unwrap();
    let a = store
        .claim_job(alive, "cpu", "cpu", LEASE)
        .await
        .unwrap()
        .unwrap();
    let d = store
        .claim_job(dead, "cpu", "cpu", LEASE)
        .await
        .unwrap()
        .unwrap();
    // A coordinator served until ten seconds ago. `alive` was heard a second before that,
    // `dead` a minute before; both leases ran out during the outage.
    sqlx::query("INSERT INTO service_clock (alive_at) VALUES (now() - interval '10 seconds')")
        .execute(store.pool())
        .await
        .unwrap();
    for (agent, ago) in [(alive, "11 seconds"), (dead, "70 seconds")] {
        sqlx::query("UPDATE agents SET last_seen_at = now() - $2::interval WHERE id = $1")
            .bind(agent)
            .bind(ago)
            .execute(store.pool())
            .await
            .unwrap();
    }
    sqlx::query(
        "UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE state = 'running'",
    )
    .execute(store.pool())
    .await
    .unwrap();
    assert_eq!(store.extend_running_leases(LEASE, HEARD).await.unwrap(), 1);
    assert_eq!(store.expire_leases(None).await.unwrap(), vec![d.id]);
    assert_eq!(store.get_job(a.id).await.unwrap().state, JobState::Running);
    // Serving again: the clock moves to now, and a second start renews nothing new.
    store.mark_alive().await.unwrap();
    let alive_at: chrono::DateTime<Utc> = sqlx::query_scalar("SELECT alive_at FROM service_clock")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert!(alive_at > Utc::now() - chrono::Duration::seconds(5));
}

#[tokio::test]
async fn hand_backs_use_no_attempt_and_are_bounded() {
    let (_db, store) = store().await;
    let a = agent(&store, "a", "cpu").await;
    let (sweep_id, _) = store
        .create_sweep(&sweep("batch_sizes=[1]\nprecisions=[\"f32\"]"), "")
        .await
        .unwrap();
    // More hand-backs than max_attempts (3): the job stays queued.
    for attempt in 1..=5 {
        let j = store
            .claim_job(a, "cpu", "cpu", LEASE)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(j.attempt, attempt);
        let outcome = store
            .hand_back(a, j.id, attempt, "the agent stopped during the job")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(outcome, FailOutcome::Retried);
        assert_eq!(counts(&store, j.id).await.0, 0);
    }
    // The bound: the sixth hand-back of a job allowed six fails it.
    sqlx::query("UPDATE jobs SET max_handbacks = 6")
        .execute(store.pool())
        .await
        .unwrap();
    let j = store
        .claim_job(a, "cpu", "cpu", LEASE)
        .await
        .unwrap()
        .unwrap();
    let outcome = store
        .hand_back(a, j.id, 6, "stopped again")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(outcome, FailOutcome::Failed);
    let (failures, handbacks, error) = counts(&store, j.id).await;
    assert_eq!((failures, handbacks), (0, 6));
    assert!(error.unwrap().contains("giving up"));
    assert_eq!(store.get_sweep(sweep_id).await.unwrap().state, "completed");
}

#[tokio::test]
async fn an_expired_lease_of_a_stopping_agent_is_a_hand_back() {
    let (_db, store) = store().await;
    let stopping = agent(&store, "stopping", "cpu").await;
    let vanished = agent(&store, "vanished", "cpu").await;
    store
        .create_sweep(&sweep("batch_sizes=[1,2]\nprecisions=[\"f32\"]"), "")
        .await
        .unwrap();
    let s = store
        .claim_job(stopping, "cpu", "cpu", LEASE)
        .await
        .unwrap()
        .unwrap();
    let v = store
        .claim_job(vanished, "cpu", "cpu", LEASE)
        .await
        .unwrap()
        .unwrap();
    store.mark_agent_stopping(stopping).await.unwrap();
    let later = Utc::now() + chrono::Duration::minutes(5);
    let mut expired = store.expire_leases(Some(later)).await.unwrap();
    expired.sort();
    let mut both = vec![s.id, v.id];
    both.sort();
    assert_eq!(expired, both);
    let (f, h, e) = counts(&store, s.id).await;
    assert_eq!((f, h), (0, 1), "{e:?}");
    assert!(e.unwrap().contains("was stopped"));
    let (f, h, _) = counts(&store, v.id).await;
    assert_eq!((f, h), (1, 0));
    // Heard from again (restarted), it is no longer stopping.
    assert!(store.touch_agent(stopping).await.unwrap());
    let since: Option<chrono::DateTime<Utc>> =
        sqlx::query_scalar("SELECT stopping_since FROM agents WHERE id = $1")
            .bind(stopping)
            .fetch_one(store.pool())
            .await
            .unwrap();
    assert!(since.is_none());
}

#[tokio::test]
async fn an_unacknowledged_claim_returns_without_costing_an_attempt() {
    let (_db, store) = store().await;
    let store = store.with_claim_grace(Duration::from_secs(2));
    let a = agent(&store, "a", "cpu").await;
    store
        .create_sweep(&sweep("batch_sizes=[1]\nprecisions=[\"f32\"]"), "")
        .await
        .unwrap();
    let j = store
        .claim_job(a, "cpu", "cpu", LEASE)
        .await
        .unwrap()
        .unwrap();
    let past_grace = Utc::now() + chrono::Duration::seconds(3);
    assert_eq!(
        store.expire_leases(Some(past_grace)).await.unwrap(),
        vec![j.id]
    );
    let (f, h, e) = counts(&store, j.id).await;
    assert_eq!((f, h), (0, 1));
    assert!(e.unwrap().contains("not acknowledged"));
    // Acknowledged by a progress report, the claim holds for its lease.
    let j = store
        .claim_job(a, "cpu", "cpu", LEASE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(j.attempt, 2);
    store
        .report_progress(a, j.id, 2, "loading", 0, 0.0, LEASE)
        .await
        .unwrap()
        .unwrap();
    let past_grace = Utc::now() + chrono::Duration::seconds(3);
    assert!(store
        .expire_leases(Some(past_grace))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(store.get_job(j.id).await.unwrap().state, JobState::Running);
}

#[tokio::test]
async fn the_database_refuses_a_return_to_the_queue_that_counts_nothing() {
    let (_db, store) = store().await;
    let a = agent(&store, "a", "cpu").await;
    store
        .create_sweep(&sweep("batch_sizes=[1]\nprecisions=[\"f32\"]"), "")
        .await
        .unwrap();
    store
        .claim_job(a, "cpu", "cpu", LEASE)
        .await
        .unwrap()
        .unwrap();
    let err = sqlx::query(
        "UPDATE jobs SET state = 'pending', lease_agent_id = NULL, lease_device = NULL, \
             lease_expires_at = NULL",
    )
    .execute(store.pool())
    .await
    .unwrap_err();
    assert!(err.to_string().contains("failure or a hand-back"), "{err}");
    let err = sqlx::query("UPDATE jobs SET failures = failures + 1")
        .execute(store.pool())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("only when a run ends"), "{err}");
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
    // Hardware the agent did not register for that device is refused.
    let mut unregistered = result_for(&job, 1, "a");
    unregistered.hardware_kind = "h100".into();
    unregistered.hardware_name = "NVIDIA H100 80GB HBM3".into();
    let err = store
        .submit_result(a, &unregistered)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("the agent registered h100 'h100 device'"),
        "{err}"
    );
    let mut right = result_for(&job, 1, "a");
    right.hardware_kind = "h100".into();
    right.hardware_name = "h100 device".into();
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

#[test]
fn hardware_must_match_the_registration_down_to_the_gpu() {
    use fleetmark_coordinator::store::check_hardware;
    use fleetmark_core::GpuInfo;
    let gpu = |uuid: &str| GpuInfo {
        index: 0,
        name: "NVIDIA H100 80GB HBM3".into(),
        uuid: uuid.into(),
        ..Default::default()
    };
    let devices = vec![AgentDevice {
        device: "cuda:0".into(),
        kind: "h100".into(),
        name: "NVIDIA H100 80GB HBM3".into(),
        precisions: None,
        health: None,
    }];
    let registered = HostInventory {
        gpus: vec![gpu("GPU-aaaa")],
        ..Default::default()
    };
    let job = fleetmark_coordinator::store::JobRow {
        id: Uuid::new_v4(),
        sweep_id: Uuid::new_v4(),
        seq: 0,
        spec: sweep("batch_sizes=[1]\nprecisions=[\"f32\"]")
            .expand()
            .unwrap()
            .remove(0),
        state: JobState::Running,
        attempt: 1,
        lease_expires_at: None,
        agent_name: None,
        device: None,
        phase: None,
        iterations: 0,
        fraction: 0.0,
        error: None,
        images_per_sec: None,
    };
    let mut r = result_for(&job, 1, "a");
    r.device = "cuda:0".into();
    r.hardware_kind = "h100".into();
    r.hardware_name = "NVIDIA H100 80GB HBM3".into();
    r.host.gpus = vec![gpu("GPU-aaaa")];
    assert_eq!(check_hardware(&r, &devices, &registered), Ok(()));
    r.host.gpus = vec![gpu("GPU-bbbb")];
    assert!(check_hardware(&r, &devices, &registered)
        .unwrap_err()
        .contains("not the one the agent registered"));
    r.host.gpus.clear();
    assert!(check_hardware(&r, &devices, &registered).is_err());
    // Where the registration knows no UUID, kind and name decide.
    assert_eq!(
        check_hardware(&r, &devices, &HostInventory::default()),
        Ok(())
    );
    r.device = "cuda:1".into();
    assert!(check_hardware(&r, &devices, &registered)
        .unwrap_err()
        .contains("did not register device 'cuda:1'"));
}

/// A big sweep queued onto a table of finished jobs whose statistics were taken while nothing
/// was pending (a quiet table, then a large submission): the claim must still read the head of
/// `jobs_pending_by_target`, not every unfinished job plus a sort. Before migration
/// 20261203000012 the planner picked `jobs_unfinished` here, and a load run with 100,000
/// finished jobs fell from 500 to 153 completions/s (docs/reliability.md).
#[tokio::test]
async fn the_claim_plan_survives_statistics_taken_before_a_big_sweep() {
    let (db, store) = store().await;
    let me = agent(&store, "planner-probe", "cpu").await;
    let _ = &db;
    let pg = store.pool().clone();
    let old = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO sweeps (id, name, spec, spec_toml, state) \
         VALUES ($1, 'finished work', '{}', '', 'imported')",
    )
    .bind(old)
    .execute(&pg)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO jobs (id, sweep_id, seq, spec, target, state, attempt, finished_at) \
         SELECT gen_random_uuid(), $1, g, '{\"precision\": \"f32\"}', 'cpu', 'succeeded', 1, now() \
         FROM generate_series(1, 100000) g",
    )
    .bind(old)
    .execute(&pg)
    .await
    .unwrap();
    sqlx::query("ANALYZE jobs").execute(&pg).await.unwrap();
    let spec =
        sweep("batch_sizes = [1]\nprecisions = [\"f32\"]\nimage_size = 32\nrepetitions = 100\n");
    for _ in 0..20 {
        store.create_sweep(&spec, "").await.unwrap();
    }
    let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "EXPLAIN {}",
        fleetmark_coordinator::store::CLAIM_SQL
    )))
    .bind(me)
    .bind("cpu")
    .bind(30_000.0_f64)
    .bind(Some(5_000.0_f64))
    .bind("cpu")
    .fetch_all(&pg)
    .await
    .unwrap();
    let plan = plan.join("\n");
    assert!(plan.contains("jobs_pending_by_target"), "{plan}");
    assert!(!plan.contains("jobs_unfinished"), "{plan}");
    // The claim that authenticates in the same statement plans the same way.
    let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "EXPLAIN {}",
        fleetmark_coordinator::store::CLAIM_BY_SECRET_SQL
    )))
    .bind(vec![0u8; 32])
    .bind("cpu")
    .bind(30_000.0_f64)
    .bind(Some(5_000.0_f64))
    .bind(Option::<Uuid>::None)
    .fetch_all(&pg)
    .await
    .unwrap();
    let plan = plan.join("\n");
    assert!(plan.contains("jobs_pending_by_target"), "{plan}");
    assert!(!plan.contains("jobs_unfinished"), "{plan}");
    // And the claim itself works on that table.
    let job = store
        .claim_job(me, "cpu", "cpu", Duration::from_secs(30))
        .await
        .unwrap();
    assert!(job.is_some());
}

/// The start-up check for autovacuum reads the server's real setting.
#[tokio::test]
async fn autovacuum_is_read_from_the_server() {
    let (_db, store) = store().await;
    let shown: String = sqlx::query_scalar("SHOW autovacuum")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(store.autovacuum_on().await.unwrap(), shown == "on");
}

/// Agent `a` claims the next job on its "cpu" device; there must be one.
async fn claim_cpu(store: &Store, a: Uuid) -> fleetmark_coordinator::store::JobRow {
    store
        .claim_job(a, "cpu", "cpu", LEASE)
        .await
        .unwrap()
        .expect("a pending job")
}

/// The job's state, as text.
async fn job_state(store: &Store, job: Uuid) -> String {
    sqlx::query_scalar("SELECT state::text FROM jobs WHERE id = $1")
        .bind(job)
        .fetch_one(store.pool())
        .await
        .unwrap()
}

/// Gives agent `a` a secret whose hash is `[tag; 32]`, as registration would.
async fn with_secret(store: &Store, a: Uuid, tag: u8) -> [u8; 32] {
    let hash = [tag; 32];
    sqlx::query("UPDATE agents SET secret_hash = $1 WHERE id = $2")
        .bind(&hash[..])
        .bind(a)
        .execute(store.pool())
        .await
        .unwrap();
    hash
}

fn by_secret(hash: [u8; 32], result: BenchResult) -> ResultBySecret {
    ResultBySecret {
        secret_hash: hash,
        body_agent: None,
        result,
    }
}

#[tokio::test]
async fn a_result_batch_stores_the_good_ones_and_leaves_the_rest_to_the_single_path() {
    let (_db, store) = store().await;
    let a = agent(&store, "a", "cpu").await;
    let b = agent(&store, "b", "cpu").await;
    let (ha, hb) = (
        with_secret(&store, a, 1).await,
        with_secret(&store, b, 2).await,
    );
    let (sweep_id, _) = store
        .create_sweep(&sweep("batch_sizes=[1,2,3]\nprecisions=[\"f32\"]"), "")
        .await
        .unwrap();
    let j1 = claim_cpu(&store, a).await;
    let j2 = claim_cpu(&store, a).await;
    let j3 = claim_cpu(&store, b).await;
    let mut wrong_spec = result_for(&j2, 1, "a");
    wrong_spec.spec.batch_size += 1;
    let items = vec![
        by_secret(ha, result_for(&j1, 1, "a")),
        by_secret(ha, wrong_spec),
        by_secret([9; 32], result_for(&j3, 1, "b")), // nobody's secret
        ResultBySecret {
            body_agent: Some(a), // b's secret, a's id in the body
            ..by_secret(hb, result_for(&j3, 1, "b"))
        },
        by_secret(hb, result_for(&j3, 1, "b")),
    ];
    let out = store.submit_results_batch(&items).await.unwrap();
    let stored: Vec<bool> = out.iter().map(Option::is_some).collect();
    assert_eq!(stored, [true, false, false, false, true]);
    assert_eq!(job_state(&store, j1.id).await, "succeeded");
    assert_eq!(
        job_state(&store, j2.id).await,
        "running",
        "the refused item changed nothing"
    );
    assert_eq!(job_state(&store, j3.id).await, "succeeded");
    // The single path says what was wrong with the refused one, then stores the right one.
    let e = store.submit_result(a, &items[1].result).await.unwrap_err();
    assert!(matches!(e, CoordinatorError::InvalidArgument(_)), "{e:?}");
    let last = store
        .submit_results_batch(&[by_secret(ha, result_for(&j2, 1, "a"))])
        .await
        .unwrap();
    assert!(last[0].is_some());
    // The batch that finished the last job completed the sweep; one result per job.
    let s = store.get_sweep(sweep_id).await.unwrap();
    assert_eq!((s.state.as_str(), s.finished), ("completed", 3));
    let results = store
        .list_results(&ResultFilter {
            sweep_id: Some(sweep_id),
            ..Default::default()
        })
        .await
        .unwrap()
        .results;
    assert_eq!(results.len(), 3);
    let ids: HashSet<Uuid> = results.iter().map(|r| r.id).collect();
    for id in out.iter().chain(&last).flatten() {
        assert!(ids.contains(id), "the answered id {id} is the stored row's");
    }
    assert!(results
        .iter()
        .all(|r| r.result.latencies_ms == vec![2.0, 2.5, 3.0]));
}

#[tokio::test]
async fn one_stale_result_fails_its_batch_as_a_whole() {
    let (_db, store) = store().await;
    let a = agent(&store, "a", "cpu").await;
    let ha = with_secret(&store, a, 1).await;
    store
        .create_sweep(&sweep("batch_sizes=[1,2]\nprecisions=[\"f32\"]"), "")
        .await
        .unwrap();
    let j1 = claim_cpu(&store, a).await;
    let j2 = claim_cpu(&store, a).await;
    // j2's result names an attempt that is not the running one.
    let items = [
        by_secret(ha, result_for(&j1, 1, "a")),
        by_secret(ha, result_for(&j2, 2, "a")),
    ];
    let e = store.submit_results_batch(&items).await.unwrap_err();
    assert!(matches!(e, CoordinatorError::StaleLease(_)), "{e:?}");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM results")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(stored, 0, "nothing of the failed batch was stored");
    // Alone, the good one is stored and the stale one refused.
    store.submit_result(a, &items[0].result).await.unwrap();
    let e = store.submit_result(a, &items[1].result).await.unwrap_err();
    assert!(matches!(e, CoordinatorError::StaleLease(_)), "{e:?}");
}

#[tokio::test]
async fn a_progress_batch_renews_only_the_lease_holders_run() {
    let (_db, store) = store().await;
    let a = agent(&store, "a", "cpu").await;
    let b = agent(&store, "b", "cpu").await;
    let (ha, hb) = (
        with_secret(&store, a, 1).await,
        with_secret(&store, b, 2).await,
    );
    store
        .create_sweep(&sweep("batch_sizes=[1,2]\nprecisions=[\"f32\"]"), "")
        .await
        .unwrap();
    let ja = claim_cpu(&store, a).await;
    let jb = claim_cpu(&store, b).await;
    let report = |hash: [u8; 32], body: Option<Uuid>, job: Uuid, attempt: i32| ProgressBySecret {
        secret_hash: hash,
        body_agent: body,
        job,
        attempt,
        phase: "timing".into(),
        iterations: 7,
        fraction: 0.5,
    };
    let items = [
        report(ha, None, ja.id, 1),
        report(ha, None, jb.id, 1),      // b's run, a's secret
        report(hb, None, jb.id, 2),      // not the running attempt
        report([9; 32], None, ja.id, 1), // nobody's secret
        report(hb, Some(a), jb.id, 1),   // b's secret, a's id in the body
        report(hb, Some(b), jb.id, 1),
    ];
    let out = store.report_progress_batch(&items, LEASE).await.unwrap();
    let applied: Vec<bool> = out.iter().map(Option::is_some).collect();
    assert_eq!(applied, [true, false, false, false, false, true]);
    for j in [ja.id, jb.id] {
        let (iterations, acked): (i32, bool) =
            sqlx::query_as("SELECT iterations, claim_ack_by IS NULL FROM jobs WHERE id = $1")
                .bind(j)
                .fetch_one(store.pool())
                .await
                .unwrap();
        assert_eq!((iterations, acked), (7, true), "job {j}");
    }
}

/// Kinds have one spelling in the database. `register_agent` lowercases a device's kind, so an
/// agent registered as `CPU` claims `cpu` jobs; a result that reaches the store with `CPU`
/// (the wire lowercases it first) is refused as a bad argument by the database's check, not
/// reported as a database failure, and nothing is stored.
#[tokio::test]
async fn kinds_are_stored_in_one_spelling() {
    let (_db, store) = store().await;
    let a = agent(&store, "shouty", "CPU").await;
    store
        .create_sweep(&sweep("batch_sizes=[8]\nprecisions=[\"f32\"]"), "")
        .await
        .unwrap();
    let job = claim_cpu(&store, a).await;
    let mut r = result_for(&job, 1, "imported-node");
    r.job_id = None;
    r.hardware_kind = "CPU".into();
    let sweeps = store.list_sweeps(100).await.unwrap().len();
    let err = store
        .import("shouty run", "tester", &[r])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CoordinatorError::InvalidArgument(m) if m.contains("lowercase")),
        "{err:?}"
    );
    assert_eq!(store.list_sweeps(100).await.unwrap().len(), sweeps);
}
