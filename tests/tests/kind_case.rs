//! A hardware kind has one spelling. An agent speaking the wire protocol itself registers its
//! device as `CPU`: it is still handed `cpu` jobs, its result (which says `CPU`) is accepted
//! and stored as `cpu`, and a listing filtered on `cpu` finds it. Before the kinds were
//! normalised, that agent was never handed a job at all, since the claim compares the job's
//! target with the device's kind exactly.

use fleetmark_e2e::*;
use fleetmark_proto::v1::{
    self as pb, agent_service_client::AgentServiceClient, sweep_service_client::SweepServiceClient,
};

const ONE_CPU_JOB: &str = "name = \"kind-case\"\nmodel = \"resnet18\"\nbatch_sizes = [1]\n\
    precisions = [\"f32\"]\ngpus = [\"cpu\"]\nimage_size = 32\n";

#[tokio::test]
async fn a_kind_in_capitals_is_the_same_kind() {
    let stack = Stack::start().await;
    let (coord, db) = (&stack.coord, &stack.db);
    let channel = raw_channel(&coord.url).await;
    let pool = pool(&db.url).await;
    let admin = coord.token.clone().expect("admin token");
    let me = register_raw(&coord.url, &coord.agent_token, "shouty", "CPU")
        .await
        .expect("registers");
    let registered: serde_json::Value =
        sqlx::query_scalar("SELECT devices FROM agents WHERE name = 'shouty'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(registered[0]["kind"], "cpu", "{registered}");

    let mut sweeps = SweepServiceClient::new(channel.clone());
    let sweep = sweeps
        .submit_sweep(bearer(
            pb::SubmitSweepRequest {
                spec_toml: ONE_CPU_JOB.into(),
            },
            &admin,
        ))
        .await
        .expect("submit")
        .into_inner()
        .sweep_id
        .parse()
        .unwrap();
    let mut agents = AgentServiceClient::new(channel);
    let job = agents
        .claim_job(bearer(
            pb::ClaimJobRequest {
                agent_id: String::new(),
                device: "cpu".into(),
                wait_ms: 0,
            },
            &me.agent_secret,
        ))
        .await
        .expect("claim")
        .into_inner()
        .job
        .expect("a `CPU` device is handed the `cpu` job");

    let job_id = job.job_id.parse().unwrap();
    let mut result = made_up_result(
        Some(job_id),
        job.attempt,
        "shouty",
        job_spec(&pool, job_id).await,
    );
    result.hardware_kind = "CPU".into();
    result.hardware_name = "CPU device".into(); // what `register_raw` registered
    agents
        .submit_result(bearer(
            pb::SubmitResultRequest {
                agent_id: String::new(),
                result: Some((&result).into()),
            },
            &me.agent_secret,
        ))
        .await
        .expect("the result is accepted");
    let stored = results(&pool, sweep).await.unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].hardware_kind, "cpu");
    let listed = sweeps
        .list_results(bearer(
            pb::ListResultsRequest {
                hardware_kind: "cpu".into(),
                include_simulated: true,
                ..Default::default()
            },
            &admin,
        ))
        .await
        .expect("results")
        .into_inner()
        .results;
    assert_eq!(listed.len(), 1, "the filter on `cpu` finds it");

    // Another spelling cannot be stored, whoever writes.
    let err = sqlx::query("UPDATE results SET hardware_kind = 'Cpu'")
        .execute(&pool)
        .await
        .expect_err("the database keeps kinds lowercase");
    assert!(err.to_string().contains("results_kind_lowercase"), "{err}");
}
