//! Every generation behaves honestly: a device never claims a job of a precision it cannot run,
//! a sweep that names a kind which can never run a precision is refused at submit, and a
//! registration that declares nonsense is refused. The agent side is a separate wire client (a
//! plain tonic channel and the generated client), acting as a T4 would.

use fleetmark_e2e::*;
use fleetmark_proto::v1::{self as pb, agent_service_client::AgentServiceClient};
use tonic::{transport::Channel, Code};

async fn raw_agent(url: &str) -> AgentServiceClient<Channel> {
    let channel = Channel::from_shared(url.to_string())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    AgentServiceClient::new(channel)
}

fn device(device: &str, kind: &str, precisions: &[&str]) -> pb::AgentDevice {
    pb::AgentDevice {
        device: device.into(),
        kind: kind.into(),
        name: format!("simulated {kind}"),
        precisions: precisions.iter().map(|p| p.to_string()).collect(),
        health: None,
        health_flags: vec![],
    }
}

/// An agent as the wire sees it: its id and its own secret, returned by `Register`.
struct Registered {
    id: String,
    secret: String,
}

/// Registers with the harness's agent token, as a node's operator would.
async fn register(
    client: &mut AgentServiceClient<Channel>,
    url: &str,
    name: &str,
    d: pb::AgentDevice,
) -> Registered {
    let r = client
        .register(bearer(
            pb::RegisterRequest {
                name: name.into(),
                devices: vec![d],
                ..Default::default()
            },
            &agent_token(url),
        ))
        .await
        .expect("register")
        .into_inner();
    Registered {
        id: r.agent_id,
        secret: r.agent_secret,
    }
}

/// Claims as that agent, with its own secret.
async fn claim(
    client: &mut AgentServiceClient<Channel>,
    agent: &Registered,
    dev: &str,
) -> Option<pb::Job> {
    client
        .claim_job(bearer(
            pb::ClaimJobRequest {
                agent_id: agent.id.clone(),
                device: dev.into(),
                wait_ms: 0,
            },
            &agent.secret,
        ))
        .await
        .expect("claim")
        .into_inner()
        .job
}

/// A scratch folder, a fresh database and a coordinator with default options on it.
async fn started() -> (tempfile::TempDir, TestDb, Coordinator) {
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
    (dir, db, coord)
}

fn sweep(precisions: &str, gpus: &str) -> String {
    format!(
        "batch_sizes = [1]\nprecisions = [{precisions}]\ngpus = [{gpus}]\nimage_size = 32\n\n\
         [measurement]\nwarmup_iterations = 1\nwarmup_duration = \"0s\"\nmin_iterations = 1\n\
         min_duration = \"0s\"\n"
    )
}

#[tokio::test]
async fn a_device_only_claims_precisions_it_declared() {
    let (dir, db, coord) = started().await;
    let url = coord.url.as_str();
    let mut t4 = raw_agent(url).await;
    let id = register(
        &mut t4,
        url,
        "t4-box",
        device("cuda:0", "t4", &["f32", "f16"]),
    )
    .await;

    // bf16 for "gpu" may still find an Ampere card, so it is queued...
    let sweep_id = submit_file(
        url,
        None,
        dir.path(),
        "mixed",
        &sweep("\"bf16\", \"f16\"", "\"gpu\""),
    )
    .await;
    // ...but the T4 gets only the f16 job, and nothing after it.
    let job = claim(&mut t4, &id, "cuda:0").await.expect("the f16 job");
    assert_eq!(job.spec.expect("spec").precision, "f16");
    assert!(
        claim(&mut t4, &id, "cuda:0").await.is_none(),
        "bf16 must not be offered"
    );

    // An A100 that declares bf16 takes it.
    let mut a100 = raw_agent(url).await;
    let a = register(
        &mut a100,
        url,
        "a100-box",
        device("cuda:0", "a100", &["f32", "f16", "bf16"]),
    )
    .await;
    let job = claim(&mut a100, &a, "cuda:0").await.expect("the bf16 job");
    assert_eq!(job.spec.expect("spec").precision, "bf16");

    let pool = pool(&db.url).await;
    let js = jobs(&pool, sweep_id).await.expect("jobs");
    assert!(
        js.iter().all(|j| j.attempt == 1 && j.state == "running"),
        "{js:?}"
    );
}

#[tokio::test]
async fn an_agent_that_declares_no_precisions_is_offered_every_one() {
    // Agents older than the field declare nothing; they keep working as before.
    let (dir, _db, coord) = started().await;
    let url = coord.url.as_str();
    let mut old = raw_agent(url).await;
    let id = register(&mut old, url, "old-agent", device("cuda:0", "h100", &[])).await;
    submit_file(
        url,
        None,
        dir.path(),
        "bf16",
        &sweep("\"bf16\"", "\"h100\""),
    )
    .await;
    let job = claim(&mut old, &id, "cuda:0").await.expect("the bf16 job");
    assert_eq!(job.spec.expect("spec").precision, "bf16");
}

#[tokio::test]
async fn bad_declarations_and_impossible_sweeps_are_refused() {
    let (dir, db, coord) = started().await;
    let url = coord.url.as_str();

    let mut client = raw_agent(url).await;
    let err = client
        .register(bearer(
            pb::RegisterRequest {
                name: "liar".into(),
                devices: vec![device("cuda:0", "t4", &["f16", "fp64"])],
                ..Default::default()
            },
            &agent_token(url),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("fp64"), "{}", err.message());

    for kind in ["t4", "v100", "cpu"] {
        let path = dir.path().join(format!("{kind}.toml"));
        std::fs::write(&path, sweep("\"f16\", \"bf16\"", &format!("\"{kind}\""))).unwrap();
        let out = cli(url, None, &["submit", "--file", path.to_str().unwrap()]).await;
        assert!(!out.status.success(), "{kind}: {}", stdout(&out));
        let err = stderr(&out);
        assert!(
            err.contains(&format!("{kind} cannot run bf16")),
            "{kind}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
    let pool = pool(&db.url).await;
    let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM sweeps")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(queued, 0, "a refused sweep queues nothing");
}

#[tokio::test]
async fn a_cpu_agent_declares_it_cannot_run_bf16_and_never_claims_it() {
    let (dir, db, coord) = started().await;
    let url = coord.url.as_str();
    let _agent = start_agent("cpu-agent", dir.path(), url, "cpu", &[]);
    let agents = wait_agents_online(&coord.client(), &["cpu-agent"]).await;
    assert_eq!(agents[0].devices[0].precisions, vec!["f32", "f16"]);

    let sweep_id = submit_file(
        url,
        None,
        dir.path(),
        "any",
        &sweep("\"f32\", \"bf16\"", "\"any\""),
    )
    .await;
    let pool = pool(&db.url).await;
    // The f32 job runs; the bf16 one waits for a device that can run it, untouched.
    eventually(SWEEP_TIMEOUT, "the f32 job to finish", || {
        let pool = pool.clone();
        async move {
            let js = jobs(&pool, sweep_id).await.ok()?;
            js.iter().any(|j| j.state == "succeeded").then_some(())
        }
    })
    .await;
    let row: (String, i32, Option<String>) = sqlx::query_as(
        "SELECT state::text, attempt, error FROM jobs WHERE sweep_id = $1 AND spec->>'precision' = 'bf16'",
    )
    .bind(sweep_id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(row, ("pending".to_string(), 0, None));
}
