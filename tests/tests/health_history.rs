//! Node health checks are kept and every result names the check in force, as an outsider sees
//! it: agents registered by a plain tonic client with health reports they chose, jobs claimed
//! and results delivered over the wire, then `ListResults`, `CompareResults`,
//! `ListHealthChecks` and the `fleetmark` binary read back. One of three nodes of a kind
//! reports a GEMM 25% below the others: its results (and only its) are flagged in `results`
//! and `compare`. When it registers again with a healthy check, the old check stays in the
//! history with its flags, its old result stays flagged, and a new result links to the new
//! check.

use fleetmark_e2e::*;
use fleetmark_proto::v1::{
    self as pb, agent_service_client::AgentServiceClient, sweep_service_client::SweepServiceClient,
};
use sqlx::PgPool;
use tonic::transport::Channel;
use uuid::Uuid;

const KIND: &str = "cpu";

fn health(f32_tflops: f64) -> pb::DeviceHealth {
    pb::DeviceHealth {
        measured_at: Some(fleetmark_proto::convert::timestamp(chrono::Utc::now())),
        gemm_tflops: [("f32".to_string(), f32_tflops)].into(),
        gemm_n: 512,
        memory_gbps: 8.0,
        seconds: 0.6,
        ..Default::default()
    }
}

/// Registers `name` with one cpu device and this check; returns its id and secret.
async fn register(channel: &Channel, token: &str, name: &str, gemm: f64) -> (String, String) {
    let mut agents = AgentServiceClient::new(channel.clone());
    let r = agents
        .register(bearer(
            pb::RegisterRequest {
                name: name.into(),
                inventory: Some(Default::default()),
                devices: vec![pb::AgentDevice {
                    device: "cpu".into(),
                    kind: KIND.into(),
                    name: "cpu device".into(),
                    precisions: vec![],
                    health: Some(health(gemm)),
                    health_flags: vec![],
                }],
                ..Default::default()
            },
            token,
        ))
        .await
        .expect("register")
        .into_inner();
    (r.agent_id, r.agent_secret)
}

/// Claims one job as `name`, acknowledges it and delivers a made-up result; the job's id.
async fn run_one(pool: &PgPool, channel: &Channel, id: &str, secret: &str, name: &str) -> Uuid {
    let mut agents = AgentServiceClient::new(channel.clone());
    let job = agents
        .claim_job(bearer(
            pb::ClaimJobRequest {
                agent_id: id.into(),
                device: "cpu".into(),
                wait_ms: 5_000,
            },
            secret,
        ))
        .await
        .expect("claim")
        .into_inner()
        .job
        .expect("a job");
    agents
        .report_progress(bearer(
            pb::ReportProgressRequest {
                agent_id: id.into(),
                job_id: job.job_id.clone(),
                attempt: job.attempt,
                phase: "timing".into(),
                iterations: 1,
                fraction: 0.5,
            },
            secret,
        ))
        .await
        .expect("progress");
    let job_id: Uuid = job.job_id.parse().expect("uuid");
    let spec = job_spec(pool, job_id).await;
    let result = made_up_result(Some(job_id), job.attempt, name, spec);
    agents
        .submit_result(bearer(
            pb::SubmitResultRequest {
                agent_id: id.into(),
                result: Some((&result).into()),
            },
            secret,
        ))
        .await
        .expect("result accepted");
    job_id
}

async fn listed(sweeps: &mut SweepServiceClient<Channel>, admin: &str) -> Vec<pb::StoredResult> {
    sweeps
        .list_results(bearer(
            pb::ListResultsRequest {
                include_simulated: true,
                ..Default::default()
            },
            admin,
        ))
        .await
        .expect("results")
        .into_inner()
        .results
}

fn flags_of(results: &[pb::StoredResult], agent: &str) -> Vec<Vec<String>> {
    results
        .iter()
        .filter(|r| r.result.as_ref().is_some_and(|b| b.agent_name == agent))
        .map(|r| {
            assert_ne!(r.health_check_id, 0, "{agent}'s result names its check");
            r.health_flags.clone()
        })
        .collect()
}

#[tokio::test]
async fn results_name_the_health_check_in_force_and_flagged_nodes_show_everywhere() {
    let Stack {
        coord,
        db,
        dir: _dir,
    } = Stack::start().await;
    let admin = coord.token.clone().expect("admin token");
    let channel = raw_channel(&coord.url).await;
    let pool = pool(&db.url).await;

    let mut nodes = Vec::new();
    for (name, gemm) in [("node-a", 0.100), ("node-b", 0.102), ("node-slow", 0.075)] {
        let (id, secret) = register(&channel, &coord.agent_token, name, gemm).await;
        nodes.push((name, id, secret));
    }
    let mut sweeps = SweepServiceClient::new(channel.clone());
    let toml = "name = \"health\"\nmodel = \"resnet18\"\nbatch_sizes = [1, 2, 3, 4]\n\
                precisions = [\"f32\"]\ngpus = [\"cpu\"]\nimage_size = 32\n";
    sweeps
        .submit_sweep(bearer(
            pb::SubmitSweepRequest {
                spec_toml: toml.into(),
            },
            &admin,
        ))
        .await
        .expect("submit");
    for (name, id, secret) in &nodes {
        run_one(&pool, &channel, id, secret, name).await;
    }

    // ListResults: the slow node's result carries its check's flag, the others none.
    let results = listed(&mut sweeps, &admin).await;
    assert_eq!(flags_of(&results, "node-a"), vec![Vec::<String>::new()]);
    assert_eq!(flags_of(&results, "node-b"), vec![Vec::<String>::new()]);
    let slow = flags_of(&results, "node-slow");
    assert_eq!(slow.len(), 1);
    assert!(
        slow[0].len() == 1 && slow[0][0].starts_with("gemm_f32_tflops -2"),
        "{slow:?}"
    );

    // CompareResults: the cell counts one result from a flagged node.
    let cells = sweeps
        .compare_results(bearer(
            pb::CompareRequest {
                model: "resnet18".into(),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .expect("compare")
        .into_inner()
        .cells;
    let flagged: u32 = cells.iter().map(|c| c.health_flagged).sum();
    assert_eq!(flagged, 1, "{cells:?}");

    // The slow node is repaired and registers again: a second check, healthy, in force.
    let (slow_id, slow_secret) = register(&channel, &coord.agent_token, "node-slow", 0.101).await;
    let checks = sweeps
        .list_health_checks(bearer(
            pb::ListHealthChecksRequest {
                agent_name: "node-slow".into(),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .expect("checks")
        .into_inner()
        .checks;
    assert_eq!(checks.len(), 2, "{checks:?}");
    assert!(
        checks[0].in_force && checks[0].flags.is_empty(),
        "{checks:?}"
    );
    assert!(
        !checks[1].in_force && checks[1].flags.len() == 1,
        "{checks:?}"
    );
    assert_eq!(checks[0].incarnation, checks[1].incarnation + 1);
    run_one(&pool, &channel, &slow_id, &slow_secret, "node-slow").await;
    let results = listed(&mut sweeps, &admin).await;
    let mut slow = flags_of(&results, "node-slow");
    slow.sort();
    assert_eq!(slow.len(), 2, "{slow:?}");
    assert!(
        slow[0].is_empty(),
        "the new result links to the new check: {slow:?}"
    );
    assert_eq!(
        slow[1].len(),
        1,
        "the old result keeps its check's flag: {slow:?}"
    );

    // The same through the binary a user runs.
    let out = cli(
        &coord.url,
        Some(&admin),
        &["agents", "checks", "--format", "json"],
    )
    .await;
    assert_success(&out, "fleetmark agents checks");
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(v.as_array().map(Vec::len), Some(4), "{v}");
    let sweep: String = sqlx::query_scalar("SELECT id::text FROM sweeps LIMIT 1")
        .fetch_one(&pool)
        .await
        .expect("sweep");
    let out = cli(&coord.url, Some(&admin), &["results", &sweep]).await;
    assert_success(&out, "fleetmark results");
    assert!(
        stdout(&out).contains("(flagged node)"),
        "the table marks the flagged node's result:\n{}",
        stdout(&out)
    );
}

/// The flags of the checks in force of `name`.
async fn flags_in_force(
    sweeps: &mut SweepServiceClient<Channel>,
    admin: &str,
    name: &str,
) -> Vec<String> {
    let checks = sweeps
        .list_health_checks(bearer(
            pb::ListHealthChecksRequest {
                agent_name: name.into(),
                ..Default::default()
            },
            admin,
        ))
        .await
        .expect("checks")
        .into_inner()
        .checks;
    checks
        .into_iter()
        .filter(|c| c.in_force)
        .flat_map(|c| c.flags)
        .collect()
}

/// Retiring agents (`PruneAgents`, over the wire, as an administrator) judges their kind's
/// remaining checks again without them. Two nodes of a kind report a GEMM half that of three
/// others and are flagged against those three; when the three are retired, the two are each
/// other's only peers and their flags go, without waiting for another registration.
#[tokio::test]
async fn retiring_agents_judges_their_kind_again_without_them() {
    let stack = Stack::start().await;
    let admin = stack.coord.token.clone().expect("admin token");
    let channel = raw_channel(&stack.coord.url).await;
    let pool = pool(&stack.db.url).await;
    for (name, gemm) in [
        ("slow-a", 0.050),
        ("slow-b", 0.051),
        ("fast-c", 0.100),
        ("fast-d", 0.101),
        ("fast-e", 0.102),
    ] {
        register(&channel, &stack.coord.agent_token, name, gemm).await;
    }
    let mut sweeps = SweepServiceClient::new(channel.clone());
    for slow in ["slow-a", "slow-b"] {
        let flags = flags_in_force(&mut sweeps, &admin, slow).await;
        assert!(
            flags.len() == 1 && flags[0].starts_with("gemm_f32_tflops -"),
            "{slow} is flagged against the fast three: {flags:?}"
        );
    }
    // The fast three went silent two hours ago (the clock is the database's: it is moved for
    // them alone, not waited for).
    sqlx::query(
        "UPDATE agents SET last_seen_at = now() - interval '2 hours' \
         WHERE name IN ('fast-c', 'fast-d', 'fast-e')",
    )
    .execute(&pool)
    .await
    .expect("age the fast nodes");
    let retired = sweeps
        .prune_agents(bearer(
            pb::PruneAgentsRequest {
                offline_for_seconds: 3600,
                dry_run: false,
            },
            &admin,
        ))
        .await
        .expect("prune")
        .into_inner()
        .names;
    assert_eq!(retired, ["fast-c", "fast-d", "fast-e"]);
    for slow in ["slow-a", "slow-b"] {
        let flags = flags_in_force(&mut sweeps, &admin, slow).await;
        assert!(
            flags.is_empty(),
            "{slow} judged without the retired: {flags:?}"
        );
    }
}
