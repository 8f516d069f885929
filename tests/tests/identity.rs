//! Agent identity, attacked from outside with plain tonic clients: an agent's secret is the only
//! thing that makes a caller that agent. Forged calls naming another agent's id are refused and
//! leave the victim's job alone; another token cannot take a registered name; registering again
//! with the same token starts a new incarnation (old secret dead, its jobs back in the queue
//! without using an attempt); revoking the registering token cuts the agent off.

use fleetmark_e2e::*;
use fleetmark_proto::v1::{
    self as pb, agent_service_client::AgentServiceClient, sweep_service_client::SweepServiceClient,
    token_service_client::TokenServiceClient,
};
use tonic::{transport::Channel, Code};
use uuid::Uuid;

const ONE_CPU_JOB: &str = "name = \"identity\"\nmodel = \"resnet18\"\nbatch_sizes = [1]\n\
    precisions = [\"f32\"]\ngpus = [\"cpu\"]\nimage_size = 32\n";

/// Fields drop in order: the coordinator before its database.
struct Setup {
    coord: Coordinator,
    channel: Channel,
    pool: sqlx::PgPool,
    db_url: String,
    _db: TestDb,
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
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
    let channel = raw_channel(&coord.url).await;
    let pool = pool(&db.url).await;
    Setup {
        db_url: db.url.clone(),
        _dir: dir,
        _db: db,
        coord,
        channel,
        pool,
    }
}

impl Setup {
    async fn submit(&self) -> Uuid {
        let mut sweeps = SweepServiceClient::new(self.channel.clone());
        sweeps
            .submit_sweep(bearer(
                pb::SubmitSweepRequest {
                    spec_toml: ONE_CPU_JOB.into(),
                },
                self.coord.token.as_deref().unwrap(),
            ))
            .await
            .expect("submit")
            .into_inner()
            .sweep_id
            .parse()
            .unwrap()
    }

    fn agents(&self) -> AgentServiceClient<Channel> {
        AgentServiceClient::new(self.channel.clone())
    }

    async fn claim(&self, secret: &str) -> Result<Option<pb::Job>, tonic::Status> {
        self.agents()
            .claim_job(bearer(
                pb::ClaimJobRequest {
                    agent_id: String::new(),
                    device: "cpu".into(),
                    wait_ms: 0,
                },
                secret,
            ))
            .await
            .map(|r| r.into_inner().job)
    }
}

#[tokio::test]
async fn forged_calls_and_name_takeover_are_refused() {
    let s = setup().await;
    let url = s.coord.url.as_str();
    let victim_token = s.coord.agent_token.clone();
    let attacker_token = create_token(&s.db_url, "agent", &["--name", "rented node"]);
    let victim = register_raw(url, &victim_token, "victim", "cpu")
        .await
        .expect("victim registers");
    let attacker = register_raw(url, &attacker_token, "attacker", "cpu")
        .await
        .expect("attacker registers");
    let sweep = s.submit().await;
    let job = s
        .claim(&victim.agent_secret)
        .await
        .expect("claim")
        .expect("the victim gets the job");
    let before = jobs(&s.pool, sweep).await.unwrap();
    assert_eq!(
        before[0].lease_agent_id,
        Some(victim.agent_id.parse().unwrap())
    );

    // The attacker names the victim's id (which ListAgents shows) with its own secret.
    let spec = job_spec(&s.pool, before[0].id).await;
    let forged = made_up_result(Some(before[0].id), job.attempt, "victim", spec);
    let mut api = s.agents();
    let err = api
        .submit_result(bearer(
            pb::SubmitResultRequest {
                agent_id: victim.agent_id.clone(),
                result: Some((&forged).into()),
            },
            &attacker.agent_secret,
        ))
        .await
        .expect_err("a forged result");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // Without naming anyone, the attacker is itself, and does not hold the lease.
    let err = api
        .submit_result(bearer(
            pb::SubmitResultRequest {
                agent_id: String::new(),
                result: Some((&forged).into()),
            },
            &attacker.agent_secret,
        ))
        .await
        .expect_err("a result for someone else's lease");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let err = api
        .report_progress(bearer(
            pb::ReportProgressRequest {
                agent_id: victim.agent_id.clone(),
                job_id: job.job_id.clone(),
                attempt: job.attempt,
                phase: "timing".into(),
                iterations: 99,
                fraction: 0.9,
            },
            &attacker.agent_secret,
        ))
        .await
        .expect_err("forged progress");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    for agent_id in [victim.agent_id.clone(), String::new()] {
        let err = api
            .fail_job(bearer(
                pb::FailJobRequest {
                    agent_id,
                    job_id: job.job_id.clone(),
                    attempt: job.attempt,
                    reason: "sabotage".into(),
                    permanent: true,
                    handback: false,
                },
                &attacker.agent_secret,
            ))
            .await
            .expect_err("forged failure");
        assert!(
            matches!(
                err.code(),
                Code::PermissionDenied | Code::FailedPrecondition
            ),
            "{err:?}"
        );
    }
    let err = api
        .heartbeat(bearer(
            pb::HeartbeatRequest {
                agent_id: victim.agent_id.clone(),
                running: vec![],
                stopping: false,
            },
            &attacker.agent_secret,
        ))
        .await
        .expect_err("forged heartbeat");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // The attacker's own heartbeat naming the victim's job: it holds no such lease, so it is
    // told to stop it, and nothing changes for the victim. The victim's heartbeat keeps its
    // job and is told to stop only the runs it does not hold.
    let heartbeat = |secret: &str, agent_id: &str, running: Vec<(String, u32)>| {
        let mut api = api.clone();
        let req = bearer(
            pb::HeartbeatRequest {
                agent_id: agent_id.into(),
                running: running
                    .into_iter()
                    .map(|(job_id, attempt)| pb::JobRef { job_id, attempt })
                    .collect(),
                stopping: false,
            },
            secret,
        );
        async move {
            let r = api.heartbeat(req).await.expect("heartbeat").into_inner();
            assert!(r.known);
            r.stop
                .into_iter()
                .map(|j| (j.job_id, j.attempt))
                .collect::<Vec<_>>()
        }
    };
    let mine = (job.job_id.clone(), job.attempt);
    let told = heartbeat(
        &attacker.agent_secret,
        &attacker.agent_id,
        vec![mine.clone()],
    )
    .await;
    assert_eq!(told, vec![mine.clone()], "not the attacker's lease");
    let made_up = (Uuid::new_v4().to_string(), 1);
    let old_run = (job.job_id.clone(), job.attempt + 1);
    let told = heartbeat(
        &victim.agent_secret,
        &victim.agent_id,
        vec![mine.clone(), made_up.clone(), old_run.clone()],
    )
    .await;
    assert_eq!(
        told,
        vec![made_up, old_run],
        "only the runs it does not hold"
    );

    // Taking the victim's name with another token.
    let err = register_raw(url, &attacker_token, "victim", "h100")
        .await
        .expect_err("a name taken with another token");
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");

    // The victim's job is exactly as it was, and the victim carries on with its secret.
    assert_eq!(jobs(&s.pool, sweep).await.unwrap(), before, "untouched");
    assert!(results(&s.pool, sweep).await.unwrap().is_empty());
    api.report_progress(bearer(
        pb::ReportProgressRequest {
            agent_id: victim.agent_id.clone(),
            job_id: job.job_id.clone(),
            attempt: job.attempt,
            phase: "timing".into(),
            iterations: 3,
            fraction: 0.5,
        },
        &victim.agent_secret,
    ))
    .await
    .expect("the victim still reports");
    s.claim(&victim.agent_secret)
        .await
        .expect("the victim still claims");
    let devices: serde_json::Value =
        sqlx::query_scalar("SELECT devices FROM agents WHERE name = 'victim'")
            .fetch_one(&s.pool)
            .await
            .unwrap();
    assert_eq!(devices[0]["kind"], "cpu", "its devices were not replaced");
    let mine = made_up_result(
        Some(before[0].id),
        job.attempt,
        "victim",
        forged.spec.clone(),
    );
    api.submit_result(bearer(
        pb::SubmitResultRequest {
            agent_id: victim.agent_id.clone(),
            result: Some((&mine).into()),
        },
        &victim.agent_secret,
    ))
    .await
    .expect("the victim delivers");
    let stored = results(&s.pool, sweep).await.unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].agent_id.to_string(), victim.agent_id);

    // API tokens are not agent identities.
    let err = api
        .heartbeat(bearer(
            pb::HeartbeatRequest::default(),
            s.coord.token.as_deref().unwrap(),
        ))
        .await
        .expect_err("an admin token is not an agent");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
}

#[tokio::test]
async fn a_new_incarnation_rotates_the_secret_and_releases_jobs() {
    let s = setup().await;
    let url = s.coord.url.as_str();
    let token = s.coord.agent_token.clone();
    let first = register_raw(url, &token, "node", "cpu")
        .await
        .expect("register");
    let sweep = s.submit().await;
    let job = s
        .claim(&first.agent_secret)
        .await
        .expect("claim")
        .expect("a job");
    assert_eq!(job.attempt, 1);

    // The node restarts: same name, same token.
    let second = register_raw(url, &token, "node", "cpu")
        .await
        .expect("register again");
    assert_eq!(second.agent_id, first.agent_id, "same agent");
    assert_ne!(second.agent_secret, first.agent_secret, "a new secret");
    assert_eq!(second.incarnation, first.incarnation + 1);
    assert_eq!(second.released_jobs, 1);
    let now = jobs(&s.pool, sweep).await.unwrap();
    assert_eq!(
        (now[0].state.as_str(), now[0].attempt, now[0].lease_agent_id),
        ("pending", 1, None),
        "released at once, as a hand-back"
    );

    // The old process is nobody now.
    let err = s
        .claim(&first.agent_secret)
        .await
        .expect_err("the old secret");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let again = s
        .claim(&second.agent_secret)
        .await
        .expect("claim")
        .expect("the job again");
    assert_eq!((again.job_id, again.attempt), (job.job_id, 2));
    let (_, failures, handbacks, _) = job_counts(&s.pool, now[0].id).await;
    assert_eq!((failures, handbacks), (0, 1), "no failure counted");

    // Revoking the token that registered it cuts the agent off, and frees the name.
    let token_id: Uuid = sqlx::query_scalar("SELECT registered_by FROM agents WHERE name = 'node'")
        .fetch_one(&s.pool)
        .await
        .unwrap();
    TokenServiceClient::new(s.channel.clone())
        .revoke_token(bearer(
            pb::RevokeTokenRequest {
                token_id: token_id.to_string(),
            },
            s.coord.token.as_deref().unwrap(),
        ))
        .await
        .expect("revoke");
    let err = s.claim(&second.agent_secret).await.expect_err("revoked");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let other = create_token(&s.db_url, "agent", &[]);
    let third = register_raw(url, &other, "node", "cpu")
        .await
        .expect("the name is free once its token is revoked");
    assert_eq!(third.agent_id, first.agent_id);
}

#[tokio::test]
async fn a_real_agent_stops_when_another_process_takes_its_identity() {
    let s = setup().await;
    let dir = scratch();
    let url = s.coord.url.as_str();
    let mut agent = start_agent("twin", dir.path(), url, "simulated", &[]);
    wait_agents_online(&s.coord.client(), &["twin"]).await;
    register_raw(url, &s.coord.agent_token, "twin", "simulated")
        .await
        .expect("a second process with the same token");
    let status = agent.wait_exit(START_TIMEOUT).await;
    let log = agent.log();
    assert!(!status.success(), "{log}");
    assert!(log.contains("registered again"), "says why:\n{log}");
    assert!(!log.contains("panicked"), "{log}");
}
