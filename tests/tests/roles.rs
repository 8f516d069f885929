//! The role matrix, as an outsider sees it: every RPC of the three services, called through a
//! plain tonic channel and the generated clients, with every kind of credential. Missing,
//! wrong, expired and revoked credentials get UNAUTHENTICATED on every call; the wrong role gets
//! PERMISSION_DENIED; the right role gets past the check (whatever the call then answers).
//! Also: a submitter cancels only its own sweeps, and the rate limits, the pending-job cap and
//! the "no agent can run this" warning.

use fleetmark_e2e::*;
use fleetmark_proto::v1::{
    self as pb, agent_service_client::AgentServiceClient, sweep_service_client::SweepServiceClient,
    token_service_client::TokenServiceClient,
};
use tonic::{transport::Channel, Code};
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rpc {
    Register,
    Heartbeat,
    ClaimJob,
    ReportProgress,
    SubmitResult,
    FailJob,
    SubmitSweep,
    GetSweep,
    WatchSweep,
    ListSweeps,
    CancelSweep,
    ListResults,
    ListAgents,
    ImportResults,
    CompareResults,
    FindSweeps,
    PruneAgents,
    ListHealthChecks,
    CreateToken,
    ListTokens,
    RevokeToken,
}

const ALL: [Rpc; 21] = [
    Rpc::Register,
    Rpc::Heartbeat,
    Rpc::ClaimJob,
    Rpc::ReportProgress,
    Rpc::SubmitResult,
    Rpc::FailJob,
    Rpc::SubmitSweep,
    Rpc::GetSweep,
    Rpc::WatchSweep,
    Rpc::ListSweeps,
    Rpc::CancelSweep,
    Rpc::ListResults,
    Rpc::ListAgents,
    Rpc::ImportResults,
    Rpc::CompareResults,
    Rpc::FindSweeps,
    Rpc::PruneAgents,
    Rpc::ListHealthChecks,
    Rpc::CreateToken,
    Rpc::ListTokens,
    Rpc::RevokeToken,
];

/// The credentials that pass the check, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cred {
    Agent,
    Reader,
    Submitter,
    Admin,
    AgentSecret,
}

/// Who may make each call.
fn allowed(rpc: Rpc, cred: Cred) -> bool {
    use Cred::*;
    match rpc {
        Rpc::Register => matches!(cred, Agent | Admin),
        Rpc::Heartbeat | Rpc::ClaimJob | Rpc::ReportProgress | Rpc::SubmitResult | Rpc::FailJob => {
            cred == AgentSecret
        }
        Rpc::GetSweep
        | Rpc::WatchSweep
        | Rpc::ListSweeps
        | Rpc::ListResults
        | Rpc::ListAgents
        | Rpc::CompareResults
        | Rpc::FindSweeps
        | Rpc::ListHealthChecks => matches!(cred, Reader | Submitter | Admin),
        Rpc::SubmitSweep | Rpc::CancelSweep | Rpc::ImportResults => {
            matches!(cred, Submitter | Admin)
        }
        Rpc::CreateToken | Rpc::ListTokens | Rpc::RevokeToken | Rpc::PruneAgents => cred == Admin,
    }
}

const SMALL_SWEEP: &str = "name = \"matrix\"\nmodel = \"resnet18\"\nbatch_sizes = [1]\n\
    precisions = [\"f32\"]\ngpus = [\"h200\"]\nimage_size = 32\n";

/// Makes one call with `secret` as the bearer; the status code it got (OK included).
async fn call(channel: &Channel, rpc: Rpc, secret: &str, n: usize) -> Code {
    let mut agents = AgentServiceClient::new(channel.clone());
    let mut sweeps = SweepServiceClient::new(channel.clone());
    let mut tokens = TokenServiceClient::new(channel.clone());
    let some_id = Uuid::new_v4().to_string();
    let code = |r: Result<(), tonic::Status>| r.err().map_or(Code::Ok, |s| s.code());
    match rpc {
        Rpc::Register => code(
            agents
                .register(bearer(
                    pb::RegisterRequest {
                        name: format!("matrix-registered-{n}"),
                        devices: vec![pb::AgentDevice {
                            device: "cpu".into(),
                            kind: "cpu".into(),
                            name: "cpu".into(),
                            precisions: vec![],
                            health: None,
                            health_flags: vec![],
                        }],
                        inventory: Some(Default::default()),
                        ..Default::default()
                    },
                    secret,
                ))
                .await
                .map(drop),
        ),
        Rpc::Heartbeat => code(
            agents
                .heartbeat(bearer(pb::HeartbeatRequest::default(), secret))
                .await
                .map(drop),
        ),
        Rpc::ClaimJob => code(
            agents
                .claim_job(bearer(
                    pb::ClaimJobRequest {
                        agent_id: String::new(),
                        device: "cpu".into(),
                        wait_ms: 0,
                    },
                    secret,
                ))
                .await
                .map(drop),
        ),
        Rpc::ReportProgress => code(
            agents
                .report_progress(bearer(
                    pb::ReportProgressRequest {
                        job_id: some_id,
                        attempt: 1,
                        ..Default::default()
                    },
                    secret,
                ))
                .await
                .map(drop),
        ),
        Rpc::SubmitResult => code(
            agents
                .submit_result(bearer(pb::SubmitResultRequest::default(), secret))
                .await
                .map(drop),
        ),
        Rpc::FailJob => code(
            agents
                .fail_job(bearer(
                    pb::FailJobRequest {
                        job_id: some_id,
                        attempt: 1,
                        ..Default::default()
                    },
                    secret,
                ))
                .await
                .map(drop),
        ),
        Rpc::SubmitSweep => code(
            sweeps
                .submit_sweep(bearer(
                    pb::SubmitSweepRequest {
                        spec_toml: SMALL_SWEEP.into(),
                    },
                    secret,
                ))
                .await
                .map(drop),
        ),
        Rpc::GetSweep => code(
            sweeps
                .get_sweep(bearer(pb::GetSweepRequest { sweep_id: some_id }, secret))
                .await
                .map(drop),
        ),
        Rpc::WatchSweep => code(
            sweeps
                .watch_sweep(bearer(pb::GetSweepRequest { sweep_id: some_id }, secret))
                .await
                .map(drop),
        ),
        Rpc::ListSweeps => code(
            sweeps
                .list_sweeps(bearer(pb::ListSweepsRequest { limit: 1 }, secret))
                .await
                .map(drop),
        ),
        Rpc::CancelSweep => code(
            sweeps
                .cancel_sweep(bearer(pb::CancelSweepRequest { sweep_id: some_id }, secret))
                .await
                .map(drop),
        ),
        Rpc::ListResults => code(
            sweeps
                .list_results(bearer(pb::ListResultsRequest::default(), secret))
                .await
                .map(drop),
        ),
        Rpc::ListAgents => code(
            sweeps
                .list_agents(bearer(pb::ListAgentsRequest {}, secret))
                .await
                .map(drop),
        ),
        Rpc::ImportResults => code(
            sweeps
                .import_results(bearer(pb::ImportResultsRequest::default(), secret))
                .await
                .map(drop),
        ),
        Rpc::CompareResults => code(
            sweeps
                .compare_results(bearer(
                    pb::CompareRequest {
                        model: "resnet18".into(),
                        ..Default::default()
                    },
                    secret,
                ))
                .await
                .map(drop),
        ),
        Rpc::FindSweeps => code(
            sweeps
                .find_sweeps(bearer(
                    pb::FindSweepsRequest {
                        id_prefix: "0".into(),
                        limit: 1,
                    },
                    secret,
                ))
                .await
                .map(drop),
        ),
        Rpc::PruneAgents => code(
            sweeps
                .prune_agents(bearer(
                    pb::PruneAgentsRequest {
                        offline_for_seconds: 7 * 24 * 3600,
                        dry_run: true,
                    },
                    secret,
                ))
                .await
                .map(drop),
        ),
        Rpc::ListHealthChecks => code(
            sweeps
                .list_health_checks(bearer(
                    pb::ListHealthChecksRequest {
                        agent_name: String::new(),
                        kind: String::new(),
                        limit: 1,
                    },
                    secret,
                ))
                .await
                .map(drop),
        ),
        Rpc::CreateToken => code(
            tokens
                .create_token(bearer(
                    pb::CreateTokenRequest {
                        name: format!("made by the matrix {n}"),
                        role: pb::Role::Reader as i32,
                        expires_in_seconds: None,
                    },
                    secret,
                ))
                .await
                .map(drop),
        ),
        Rpc::ListTokens => code(
            tokens
                .list_tokens(bearer(pb::ListTokensRequest::default(), secret))
                .await
                .map(drop),
        ),
        Rpc::RevokeToken => code(
            tokens
                .revoke_token(bearer(pb::RevokeTokenRequest { token_id: some_id }, secret))
                .await
                .map(drop),
        ),
    }
}

#[tokio::test]
async fn every_rpc_with_every_credential() {
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
    let channel = raw_channel(url).await;
    let admin = coord.token.clone().expect("admin token");
    let agent = coord.agent_token.clone();
    let reader = create_token(&db.url, "reader", &[]);
    let submitter = create_token(&db.url, "submitter", &[]);
    let expiring = create_token(&db.url, "admin", &["--expires", "1s"]);
    let agent_secret = register_raw(url, &agent, "matrix-agent", "cpu")
        .await
        .expect("register")
        .agent_secret;
    assert!(agent_secret.starts_with("fma_"), "{agent_secret}");

    // A token revoked through the API by an admin.
    let mut tokens = TokenServiceClient::new(channel.clone());
    let made = tokens
        .create_token(bearer(
            pb::CreateTokenRequest {
                name: "to be revoked".into(),
                role: pb::Role::Admin as i32,
                expires_in_seconds: None,
            },
            &admin,
        ))
        .await
        .expect("create a token")
        .into_inner();
    let revoked = made.secret;
    assert_eq!(
        call(&channel, Rpc::ListTokens, &revoked, 0).await,
        Code::Ok,
        "works before it is revoked"
    );
    let listed = tokens
        .list_tokens(bearer(pb::ListTokensRequest::default(), &admin))
        .await
        .expect("list")
        .into_inner()
        .tokens;
    assert!(listed.iter().any(|t| t.name == "to be revoked"));
    let listing = format!("{listed:?}");
    assert!(
        !listing.contains(&revoked) && !listing.contains(&admin),
        "listings never hold secrets"
    );
    tokens
        .revoke_token(bearer(
            pb::RevokeTokenRequest {
                token_id: made.token.expect("info").token_id,
            },
            &admin,
        ))
        .await
        .expect("revoke");

    // The expiring token has run out once a call with it is refused.
    eventually(START_TIMEOUT, "the 1 s token to expire", || {
        let channel = channel.clone();
        let expiring = expiring.clone();
        async move {
            (call(&channel, Rpc::ListSweeps, &expiring, 0).await == Code::Unauthenticated)
                .then_some(())
        }
    })
    .await;

    let wrong = format!("fmt_{}", "0".repeat(64));
    let refused: [(&str, &str); 5] = [
        ("missing", ""),
        ("garbage", "hunter2"),
        ("wrong", &wrong),
        ("expired", &expiring),
        ("revoked", &revoked),
    ];
    let valid = [
        (Cred::Agent, agent.as_str()),
        (Cred::Reader, reader.as_str()),
        (Cred::Submitter, submitter.as_str()),
        (Cred::Admin, admin.as_str()),
        (Cred::AgentSecret, agent_secret.as_str()),
    ];
    let mut n = 0;
    let mut failures = Vec::new();
    for rpc in ALL {
        for (what, secret) in refused {
            n += 1;
            let got = call(&channel, rpc, secret, n).await;
            if got != Code::Unauthenticated {
                failures.push(format!("{rpc:?} with a {what} credential: {got:?}"));
            }
        }
        for (cred, secret) in valid {
            n += 1;
            let got = call(&channel, rpc, secret, n).await;
            let ok = if allowed(rpc, cred) {
                !matches!(got, Code::Unauthenticated | Code::PermissionDenied)
            } else {
                got == Code::PermissionDenied
            };
            if !ok {
                failures.push(format!(
                    "{rpc:?} with {cred:?}: got {got:?}, expected {}",
                    if allowed(rpc, cred) {
                        "to pass the check"
                    } else {
                        "PermissionDenied"
                    }
                ));
            }
        }
    }
    assert!(failures.is_empty(), "role matrix:\n{}", failures.join("\n"));
}

#[tokio::test]
async fn a_submitter_cancels_only_its_own_sweeps() {
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
    let alice = create_token(&db.url, "submitter", &["--name", "alice"]);
    let bob = create_token(&db.url, "submitter", &["--name", "bob"]);
    let reader = create_token(&db.url, "reader", &[]);
    let mut sweeps = SweepServiceClient::new(channel);
    let mut submit = async |secret: &str| {
        sweeps
            .submit_sweep(bearer(
                pb::SubmitSweepRequest {
                    spec_toml: SMALL_SWEEP.into(),
                },
                secret,
            ))
            .await
            .expect("submit")
            .into_inner()
            .sweep_id
    };
    let alices = submit(&alice).await;
    let alices_second = submit(&alice).await;
    let mut sweeps = SweepServiceClient::new(raw_channel(&coord.url).await);
    let mut cancel = async |secret: &str, id: &str| {
        sweeps
            .cancel_sweep(bearer(
                pb::CancelSweepRequest {
                    sweep_id: id.into(),
                },
                secret,
            ))
            .await
            .err()
            .map_or(Code::Ok, |s| s.code())
    };
    assert_eq!(cancel(&bob, &alices).await, Code::PermissionDenied);
    assert_eq!(cancel(&reader, &alices).await, Code::PermissionDenied);
    let pool = pool(&db.url).await;
    assert_eq!(
        sweep_state(&pool, alices.parse().unwrap()).await.unwrap(),
        "active"
    );
    assert_eq!(cancel(&alice, &alices).await, Code::Ok);
    let admin = coord.token.clone().expect("admin");
    assert_eq!(
        cancel(&admin, &alices_second).await,
        Code::Ok,
        "admins cancel any"
    );
    assert_eq!(
        sweep_state(&pool, alices.parse().unwrap()).await.unwrap(),
        "cancelled"
    );
}

#[tokio::test]
async fn rate_limits_the_pending_cap_and_the_unrunnable_warning() {
    let dir = scratch();
    let db = TestDb::new().await;
    let opts = CoordinatorOpts {
        extra: [
            "--register-per-minute",
            "2",
            "--submit-per-minute",
            "3",
            "--max-pending-jobs",
            "4",
        ]
        .map(String::from)
        .to_vec(),
        ..Default::default()
    };
    let coord = Coordinator::start("coordinator", dir.path(), &db.url, free_port(), &opts).await;
    let url = coord.url.as_str();

    // Registrations: two a minute per token; the third is RESOURCE_EXHAUSTED, another token is
    // not affected.
    for name in ["r1", "r2"] {
        register_raw(url, &coord.agent_token, name, "cpu")
            .await
            .expect("within the limit");
    }
    let err = register_raw(url, &coord.agent_token, "r3", "cpu")
        .await
        .expect_err("over the limit");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let other = create_token(&db.url, "agent", &[]);
    register_raw(url, &other, "r4", "cpu")
        .await
        .expect("another token has its own budget");

    // Submitting for hardware nobody has: accepted, with a warning on stderr.
    let h200 = dir.path().join("h200.toml");
    std::fs::write(
        &h200,
        SMALL_SWEEP.replace("batch_sizes = [1]", "batch_sizes = [1, 2]"),
    )
    .unwrap();
    let out = cli(url, None, &["submit", "--file", h200.to_str().unwrap()]).await;
    assert_success(&out, "submit");
    assert!(
        stderr(&out).contains("warning: no agent has a h200; 2 jobs will wait"),
        "{}",
        stderr(&out)
    );
    // The cap: 2 pending, 2 more is 4 (the cap), 2 more would be 6.
    let out = cli(url, None, &["submit", "--file", h200.to_str().unwrap()]).await;
    assert_success(&out, "submit up to the cap");
    let out = cli(url, None, &["submit", "--file", h200.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cap of 4 pending jobs"),
        "{}",
        stderr(&out)
    );
    let sweeps: i64 = sqlx::query_scalar("SELECT count(*) FROM sweeps")
        .fetch_one(&pool(&db.url).await)
        .await
        .unwrap();
    assert_eq!(sweeps, 2, "the refused sweep queued nothing");

    // Submissions per minute: the fourth within the minute is refused (the third was, too,
    // but by the cap; both count).
    let out = cli(url, None, &["submit", "--file", h200.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("too many sweeps"), "{}", stderr(&out));
}

/// Concurrent submits by one submitter, sent at once over raw gRPC: the pending-job cap is
/// checked and the sweep inserted in one transaction, so the cap is never overshot.
#[tokio::test]
async fn concurrent_submits_never_overshoot_the_pending_cap() {
    let dir = scratch();
    let db = TestDb::new().await;
    let opts = CoordinatorOpts {
        extra: ["--max-pending-jobs", "4"].map(String::from).to_vec(),
        ..Default::default()
    };
    let coord = Coordinator::start("coordinator", dir.path(), &db.url, free_port(), &opts).await;
    let submitter = create_token(&db.url, "submitter", &[]);
    let channel = Channel::from_shared(coord.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    // Eight sweeps of two jobs each, all at once: only two fit under a cap of four.
    let two_jobs = SMALL_SWEEP.replace("batch_sizes = [1]", "batch_sizes = [1, 2]");
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let mut sweeps = SweepServiceClient::new(channel.clone());
        let req = bearer(
            pb::SubmitSweepRequest {
                spec_toml: two_jobs.clone(),
            },
            &submitter,
        );
        calls.spawn(async move { sweeps.submit_sweep(req).await.map(drop) });
    }
    let outcomes = calls.join_all().await;
    let accepted = outcomes.iter().filter(|o| o.is_ok()).count();
    for refused in outcomes.iter().filter_map(|o| o.as_ref().err()) {
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    }
    assert_eq!(accepted, 2, "{outcomes:?}");
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state = 'pending'")
        .fetch_one(&pool(&db.url).await)
        .await
        .unwrap();
    assert_eq!(pending, 4, "exactly the cap is queued");
}
