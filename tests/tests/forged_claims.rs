//! A claim authenticates inside its own statement when the caller sends an agent secret
//! (`CLAIM_BY_SECRET_SQL`). An outsider on a plain tonic client tries to claim as another agent
//! (its own secret, the victim's id in the body), with the registering token instead of a
//! secret, with a malformed id, and for a device it never registered: each is refused with the
//! code the full path gives, and nothing is leased to anyone.

use fleetmark_e2e::*;
use fleetmark_proto::v1::{self as pb, agent_service_client::AgentServiceClient};
use tonic::Code;

fn claim(agent_id: &str, device: &str, secret: &str) -> tonic::Request<pb::ClaimJobRequest> {
    bearer(
        pb::ClaimJobRequest {
            agent_id: agent_id.into(),
            device: device.into(),
            wait_ms: 0,
        },
        secret,
    )
}

#[tokio::test]
async fn claims_as_another_agent_or_for_an_unregistered_device_are_refused() {
    let stack = Stack::start().await;
    let (coord, db, dir) = (&stack.coord, &stack.db, &stack.dir);
    let url = coord.url.as_str();
    let pool = pool(&db.url).await;
    let attacker_token = create_token(&db.url, "agent", &["--name", "rented node"]);
    let victim = register_raw(url, &coord.agent_token, "victim", "cpu")
        .await
        .expect("victim registers");
    let attacker = register_raw(url, &attacker_token, "attacker", "cpu")
        .await
        .expect("attacker registers");
    let toml = sweep_toml("forged-claims", &[1], 32, "1s");
    let sweep = submit_file(url, None, dir.path(), "forged-claims", &toml).await;
    let mut api = AgentServiceClient::new(raw_channel(url).await);
    let untouched = || async {
        let j = jobs(&pool, sweep).await.expect("jobs");
        assert_eq!(j.len(), 1);
        assert_eq!(
            (j[0].state.as_str(), j[0].attempt, j[0].lease_agent_id),
            ("pending", 0, None),
            "nothing was claimed: {j:?}"
        );
    };

    // The attacker's secret, the victim's id.
    let err = api
        .claim_job(claim(&victim.agent_id, "cpu", &attacker.agent_secret))
        .await
        .expect_err("a claim as another agent");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    untouched().await;

    // A device the attacker never registered, with or without naming itself.
    for agent_id in [attacker.agent_id.as_str(), ""] {
        let err = api
            .claim_job(claim(agent_id, "cuda:0", &attacker.agent_secret))
            .await
            .expect_err("a claim for an unregistered device");
        assert!(
            matches!(err.code(), Code::InvalidArgument | Code::NotFound),
            "{err:?}"
        );
        untouched().await;
    }

    // The registering token (not an agent's secret) naming the victim, and the attacker's
    // secret naming no valid id at all: the claim takes the full path, not the one-statement
    // one, and is refused there too.
    let err = api
        .claim_job(claim(&victim.agent_id, "cpu", &coord.agent_token))
        .await
        .expect_err("a token naming an agent");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    untouched().await;
    let err = api
        .claim_job(claim("not-a-uuid", "cpu", &attacker.agent_secret))
        .await
        .expect_err("a malformed agent id");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    untouched().await;

    // A secret nobody holds.
    let err = api
        .claim_job(claim("", "cpu", "fma_not-a-real-secret"))
        .await
        .expect_err("an unknown secret");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    untouched().await;

    // The victim's own claim still works, and the job is leased to it.
    let job = api
        .claim_job(claim(&victim.agent_id, "cpu", &victim.agent_secret))
        .await
        .expect("the victim claims")
        .into_inner()
        .job
        .expect("the job");
    assert_eq!(job.attempt, 1);
    let j = jobs(&pool, sweep).await.expect("jobs");
    assert_eq!(
        j[0].lease_agent_id.map(|id| id.to_string()),
        Some(victim.agent_id.clone())
    );
}
