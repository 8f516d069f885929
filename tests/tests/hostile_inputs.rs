//! Hostile inputs, sent as an outsider would: a plain tonic `Channel` with the generated
//! clients (not Fleetmark's client helpers), raw protobuf bytes, raw TCP. Each probe from the
//! input-validation review gets a clear error code, and the database is checked afterwards:
//! nothing stored, nothing lost.

use std::time::{Duration, Instant};

use fleetmark_core::BenchResult;
use fleetmark_e2e::*;
use fleetmark_proto::v1::{
    self as pb, agent_service_client::AgentServiceClient, sweep_service_client::SweepServiceClient,
};
use sqlx::PgPool;
use tonic::{
    metadata::{Ascii, MetadataValue},
    service::{interceptor::InterceptedService, Interceptor},
    transport::Channel,
    Code,
};
use uuid::Uuid;

/// Adds `authorization: Bearer <credential>` to every call, as any gRPC client would.
#[derive(Clone)]
struct Bearer(MetadataValue<Ascii>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

fn bearer(credential: &str) -> Bearer {
    Bearer(format!("Bearer {credential}").parse().expect("ascii"))
}

type Agents = AgentServiceClient<InterceptedService<Channel, Bearer>>;
type Sweeps = SweepServiceClient<InterceptedService<Channel, Bearer>>;

/// A coordinator process with its database, plain clients, and one registered cpu agent.
struct Probe {
    _dir: tempfile::TempDir,
    _db: TestDb,
    coord: Coordinator,
    pool: PgPool,
    /// Calls as the probe agent (its own secret).
    agents: Agents,
    /// Registers with the harness's agent token.
    registrar: Agents,
    /// Calls with the harness's admin token.
    sweeps: Sweeps,
    agent_id: String,
}

const AGENT: &str = "probe-agent";
const CPU_NAME: &str = "probe cpu";

impl Probe {
    async fn start(extra_args: Vec<&'static str>) -> Probe {
        let dir = scratch();
        let db = TestDb::new().await;
        let opts = CoordinatorOpts {
            extra: extra_args.into_iter().map(String::from).collect(),
            ..Default::default()
        };
        let coord =
            Coordinator::start("coordinator", dir.path(), &db.url, free_port(), &opts).await;
        let channel = Channel::from_shared(coord.url.clone())
            .expect("url")
            .connect()
            .await
            .expect("connect");
        let mut registrar =
            AgentServiceClient::with_interceptor(channel.clone(), bearer(&agent_token(&coord.url)));
        let sweeps =
            SweepServiceClient::with_interceptor(channel.clone(), bearer(&admin_token(&coord.url)));
        let registered = registrar
            .register(registration(AGENT))
            .await
            .expect("register the probe agent")
            .into_inner();
        let agent_id = registered.agent_id;
        let agents =
            AgentServiceClient::with_interceptor(channel, bearer(&registered.agent_secret));
        let pool = pool(&db.url).await;
        Probe {
            _dir: dir,
            _db: db,
            coord,
            pool,
            agents,
            registrar,
            sweeps,
            agent_id,
        }
    }

    async fn count(&self, table: &str) -> i64 {
        let sql = match table {
            "agents" => "SELECT count(*) FROM agents",
            "sweeps" => "SELECT count(*) FROM sweeps",
            "results" => "SELECT count(*) FROM results",
            other => panic!("no count for {other}"),
        };
        sqlx::query_scalar(sql)
            .fetch_one(&self.pool)
            .await
            .expect("count")
    }

    /// Queues a one-job cpu sweep and claims its job as the probe agent.
    async fn claimed_job(&mut self) -> pb::Job {
        self.sweeps
            .submit_sweep(pb::SubmitSweepRequest {
                spec_toml: sweep_toml("probe", &[1], 32, "10ms"),
            })
            .await
            .expect("submit");
        self.claim().await
    }

    async fn claim(&mut self) -> pb::Job {
        self.agents
            .claim_job(pb::ClaimJobRequest {
                agent_id: self.agent_id.clone(),
                device: "cpu".into(),
                wait_ms: 5000,
            })
            .await
            .expect("claim")
            .into_inner()
            .job
            .expect("a job")
    }

    /// A valid result for `job`, as the probe agent would send it.
    fn result_for(&self, job: &pb::Job) -> BenchResult {
        let spec = job.spec.clone().expect("spec").try_into().expect("a spec");
        let mut r = made_up_result(
            Some(job.job_id.parse().expect("uuid")),
            job.attempt,
            AGENT,
            spec,
        );
        r.hardware_name = CPU_NAME.into();
        r
    }

    async fn submit(&mut self, r: &BenchResult) -> Result<(), tonic::Status> {
        self.agents
            .submit_result(pb::SubmitResultRequest {
                agent_id: self.agent_id.clone(),
                result: Some(r.into()),
            })
            .await
            .map(|_| ())
    }

    async fn import(&mut self, records: &[BenchResult]) -> pb::ImportResultsResponse {
        self.sweeps
            .import_results(pb::ImportResultsRequest {
                name: "probe import".into(),
                results: records.iter().map(Into::into).collect(),
            })
            .await
            .expect("import")
            .into_inner()
    }
}

fn registration(name: &str) -> pb::RegisterRequest {
    pb::RegisterRequest {
        name: name.into(),
        labels: Default::default(),
        price_per_hour: None,
        inventory: Some(pb::HostInventory {
            hostname: "probe-host".into(),
            ..Default::default()
        }),
        devices: vec![pb::AgentDevice {
            device: "cpu".into(),
            kind: "cpu".into(),
            name: CPU_NAME.into(),
            precisions: vec![],
            health: None,
            health_flags: vec![],
        }],
    }
}

/// A health report a real CPU could send, for a plain client to spoil.
fn honest_health() -> pb::DeviceHealth {
    pb::DeviceHealth {
        measured_at: Some(fleetmark_proto::convert::timestamp(chrono::Utc::now())),
        gemm_tflops: [("f32".to_string(), 0.05)].into(),
        gemm_n: 512,
        memory_gbps: 8.0,
        seconds: 0.6,
        ..Default::default()
    }
}

/// Health reports that are not numbers, absurd, or of unknown precisions are refused at
/// registration by INVALID_ARGUMENT, and no agent is stored; an honest one is kept, listed,
/// and unflagged while it is the only one of its kind.
#[tokio::test]
async fn hostile_health_reports_are_refused_at_registration() {
    let p = Probe::start(vec![]).await;
    let before = p.count("agents").await;
    let cases: Vec<(&str, pb::DeviceHealth)> = vec![
        (
            "NaN bandwidth",
            pb::DeviceHealth {
                memory_gbps: f64::NAN,
                ..honest_health()
            },
        ),
        (
            "negative GEMM",
            pb::DeviceHealth {
                gemm_tflops: [("f32".to_string(), -1.0)].into(),
                ..honest_health()
            },
        ),
        (
            "absurd GEMM",
            pb::DeviceHealth {
                gemm_tflops: [("f32".to_string(), 1e300)].into(),
                ..honest_health()
            },
        ),
        (
            "unknown precision",
            pb::DeviceHealth {
                gemm_tflops: [("fp4".to_string(), 1.0)].into(),
                ..honest_health()
            },
        ),
        (
            "no GEMM",
            pb::DeviceHealth {
                gemm_tflops: Default::default(),
                ..honest_health()
            },
        ),
        (
            "zero PCIe lanes",
            pb::DeviceHealth {
                pcie_link_width: Some(0),
                ..honest_health()
            },
        ),
    ];
    let mut registrar = p.registrar.clone();
    for (what, health) in cases {
        let mut r = registration("health-probe");
        r.devices[0].health = Some(health);
        let msg = assert_code(registrar.register(r).await, Code::InvalidArgument, what);
        assert!(msg.contains("health check"), "{what}: {msg}");
    }
    assert_eq!(p.count("agents").await, before, "nothing stored");
    let mut r = registration("health-honest");
    r.devices[0].health = Some(honest_health());
    registrar
        .register(r)
        .await
        .expect("an honest report is accepted");
    let listed = p
        .sweeps
        .clone()
        .list_agents(pb::ListAgentsRequest {})
        .await
        .expect("agents")
        .into_inner()
        .agents;
    let honest = listed
        .iter()
        .find(|a| a.name == "health-honest")
        .expect("listed");
    let d = &honest.devices[0];
    assert_eq!(d.health.as_ref().map(|h| h.gemm_n), Some(512));
    assert!(d.health_flags.is_empty(), "{:?}", d.health_flags);
}

fn assert_code<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, what: &str) -> String {
    match r {
        Ok(v) => panic!("{what}: accepted ({v:?}), expected {code:?}"),
        Err(s) => {
            assert_eq!(s.code(), code, "{what}: {s:?}");
            assert!(
                s.message().len() < 1024,
                "{what}: the error is short ({} bytes)",
                s.message().len()
            );
            s.message().to_string()
        }
    }
}

#[tokio::test]
async fn impossible_results_are_refused_and_the_job_keeps_running() {
    let mut p = Probe::start(Vec::new()).await;
    let job = p.claimed_job().await;
    let mut good = p.result_for(&job);
    // As long as a real fused plan's detail (about 850 characters), which must get through.
    good.backend.details.insert(
        "plan".into(),
        "l1.0.c1:implicit_precomp_gemm/Api ".repeat(25),
    );

    type Forge = fn(&mut BenchResult);
    let forgeries: Vec<(&str, Forge)> = vec![
        ("images/s -1", |r| r.images_per_sec = -1.0),
        ("images/s 1e12", |r| r.images_per_sec = 1e12),
        ("images/s 1e308", |r| r.images_per_sec = 1e308),
        ("mean -7", |r| r.latency.mean_ms = -7.0),
        ("p99 below p50", |r| {
            r.latency.p99_ms = r.latency.p50_ms / 2.0
        }),
        ("min above max", |r| {
            r.latency.min_ms = r.latency.max_ms + 1.0
        }),
        ("NaN max_rel_error", |r| {
            r.correctness = Some(fleetmark_core::Correctness {
                max_rel_error: f64::NAN,
                ..Default::default()
            })
        }),
        ("infinite power", |r| {
            r.telemetry = Some(fleetmark_core::Telemetry {
                power_watts: Some(fleetmark_core::MetricSummary {
                    min: 1.0,
                    mean: f64::INFINITY,
                    max: f64::INFINITY,
                }),
                ..Default::default()
            })
        }),
        ("count above the raw latencies", |r| {
            r.latency.count = 2_000_000
        }),
        ("a hardware name the agent did not register", |r| {
            r.hardware_name = "NVIDIA H100 80GB HBM3".into()
        }),
        ("a kind the agent did not register", |r| {
            r.hardware_kind = "h100".into();
            r.hardware_name = "NVIDIA H100 80GB HBM3".into();
        }),
        ("a device the agent did not register", |r| {
            r.device = "cuda:0".into()
        }),
        ("a NUL in the hardware name", |r| {
            r.hardware_name = "probe\0cpu".into()
        }),
        ("a backend detail past 4,096 characters", |r| {
            r.backend.details.insert(
                "plan".into(),
                "x".repeat(fleetmark_core::limits::MAX_DETAIL_CHARS + 1),
            );
        }),
    ];
    for (what, forge) in forgeries {
        let mut bad = good.clone();
        forge(&mut bad);
        assert_code(p.submit(&bad).await, Code::InvalidArgument, what);
    }
    assert_eq!(p.count("results").await, 0, "nothing forged was stored");
    let jobs = jobs(&p.pool, job.sweep_id.parse().expect("uuid"))
        .await
        .expect("jobs");
    assert_eq!(jobs[0].state, "running", "the job is not lost");

    // The honest result is still accepted.
    p.submit(&good).await.expect("the real result");
    assert_eq!(p.count("results").await, 1);
}

/// Over-long filters on the listing calls are refused with INVALID_ARGUMENT before any query
/// runs: a 100,000-character hardware kind on `ListResults`, and an agent name and a kind of
/// that size on `ListHealthChecks`; a NUL in a filter likewise.
#[tokio::test]
async fn over_long_listing_filters_are_refused() {
    let p = Probe::start(Vec::new()).await;
    let huge = "h".repeat(100_000);
    let mut sweeps = p.sweeps.clone();
    for (what, kind) in [("long kind", huge.clone()), ("NUL in kind", "h1\0".into())] {
        assert_code(
            sweeps
                .list_results(pb::ListResultsRequest {
                    hardware_kind: kind,
                    ..Default::default()
                })
                .await,
            Code::InvalidArgument,
            &format!("ListResults: {what}"),
        );
    }
    for (what, req) in [
        (
            "long agent name",
            pb::ListHealthChecksRequest {
                agent_name: huge.clone(),
                ..Default::default()
            },
        ),
        (
            "long kind",
            pb::ListHealthChecksRequest {
                kind: huge.clone(),
                ..Default::default()
            },
        ),
        (
            "NUL in agent name",
            pb::ListHealthChecksRequest {
                agent_name: "a\0b".into(),
                ..Default::default()
            },
        ),
    ] {
        assert_code(
            sweeps.list_health_checks(req).await,
            Code::InvalidArgument,
            &format!("ListHealthChecks: {what}"),
        );
    }
    // A sane filter still answers, and an absurd limit is capped: with 1,005 checks stored, a
    // limit of 5,000 gets 1,000 of them, and no limit the default 100.
    sqlx::query(
        "INSERT INTO health_checks (agent_id, incarnation, device, kind, checked_at, health) \
         SELECT a.id, a.incarnation, 'cpu', 'cpu', now(), \
                jsonb_build_object('measured_at', now(), 'gemm_tflops', \
                                   jsonb_build_object('f32', 1.0 + i), 'gemm_n', 256, \
                                   'memory_gbps', 10.0, 'seconds', 0.1) \
         FROM agents a, generate_series(1, 1005) i WHERE a.name = $1",
    )
    .bind(AGENT)
    .execute(&p.pool)
    .await
    .expect("store 1,005 checks");
    for (asked, got) in [(5_000, 1_000), (0, 100)] {
        let listed = sweeps
            .list_health_checks(pb::ListHealthChecksRequest {
                limit: asked,
                ..Default::default()
            })
            .await
            .expect("a plain listing")
            .into_inner()
            .checks;
        assert_eq!(listed.len(), got, "limit {asked}");
    }
}

#[tokio::test]
async fn a_bad_row_already_stored_is_skipped_not_fatal() {
    let mut p = Probe::start(Vec::new()).await;
    let job = p.claimed_job().await;
    let mut standalone = p.result_for(&job);
    standalone.job_id = None;
    let first = p.result_for(&job);
    p.submit(&first).await.expect("a real result");
    p.import(&[standalone]).await;
    assert_eq!(p.count("results").await, 2);

    // What the old coordinator stored for `max_rel_error = NaN`: a JSON null.
    sqlx::query(
        "UPDATE results SET record = jsonb_set(record, '{latency,max_ms}', 'null') \
         WHERE id = (SELECT id FROM results ORDER BY created_at LIMIT 1)",
    )
    .execute(&p.pool)
    .await
    .expect("damage a row");

    for omit_latencies in [false, true] {
        let listing = p
            .sweeps
            .list_results(pb::ListResultsRequest {
                omit_latencies,
                ..Default::default()
            })
            .await
            .expect("the listing still works")
            .into_inner();
        assert_eq!(listing.results.len(), 1, "the good row is listed");
        assert_eq!(listing.skipped, 1, "the bad row is counted as skipped");
    }
}

#[tokio::test]
async fn oversized_and_malformed_requests_are_refused_cheaply() {
    let mut p = Probe::start(Vec::new()).await;
    let agents_before = p.count("agents").await;

    // 100 labels of 1 MB: over the message limit, refused before it is read.
    let mut big = registration("labelled");
    for i in 0..100 {
        big.labels.insert(format!("k{i}"), "x".repeat(1 << 20));
    }
    let e = p
        .registrar
        .register(big)
        .await
        .expect_err("100 MB of labels");
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    // Under the message limit, each label is still bounded, and so is their number.
    let mut long_value = registration("labelled");
    long_value.labels.insert("k".into(), "x".repeat(10_000));
    assert_code(
        p.registrar.register(long_value).await,
        Code::InvalidArgument,
        "a 10 kB label",
    );
    let mut many = registration("labelled");
    for i in 0..100 {
        many.labels.insert(format!("k{i}"), "v".into());
    }
    let msg = assert_code(
        p.registrar.register(many).await,
        Code::InvalidArgument,
        "100 labels",
    );
    assert!(msg.contains("at most 64"), "{msg}");

    // Names: counted in characters, NUL refused, '/' reserved for imported agents.
    p.registrar
        .register(registration(&"é".repeat(200)))
        .await
        .expect("200 characters (400 bytes) is a valid name");
    let msg = assert_code(
        p.registrar.register(registration(&"é".repeat(201))).await,
        Code::InvalidArgument,
        "201 characters",
    );
    assert!(msg.contains("201 characters"), "{msg}");
    assert_code(
        p.registrar.register(registration("nul\0name")).await,
        Code::InvalidArgument,
        "a NUL in a name",
    );
    assert_code(
        p.registrar.register(registration("imported/x")).await,
        Code::InvalidArgument,
        "an imported agent's name",
    );
    let mut host = registration("hosty");
    host.inventory.as_mut().expect("inventory").hostname = "h".repeat(100_000);
    assert_code(
        p.registrar.register(host).await,
        Code::InvalidArgument,
        "a 100 kB hostname",
    );
    let mut devices = registration("devices");
    devices.devices = (0..1000)
        .map(|i| pb::AgentDevice {
            device: format!("cuda:{i}"),
            kind: "h100".into(),
            name: "x".into(),
            precisions: vec![],
            health: None,
            health_flags: vec![],
        })
        .collect();
    assert_code(
        p.registrar.register(devices).await,
        Code::InvalidArgument,
        "1000 devices",
    );
    assert_eq!(
        p.count("agents").await,
        agents_before + 1,
        "only the valid 200-character name was registered"
    );

    // Sweeps: a 255 MB TOML is refused by the message limit, quickly.
    let started = Instant::now();
    let e = p
        .sweeps
        .submit_sweep(pb::SubmitSweepRequest {
            spec_toml: "#".repeat(255 << 20),
        })
        .await
        .expect_err("a 255 MB sweep");
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    assert!(e.message().len() < 1024);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "refused in {:?}",
        started.elapsed()
    );
    // 100 MB of garbage: the same.
    let garbage: String = (0..100 << 20)
        .map(|i| (b'!' + (i % 90) as u8) as char)
        .collect();
    let e = p
        .sweeps
        .submit_sweep(pb::SubmitSweepRequest {
            spec_toml: garbage.clone(),
        })
        .await
        .expect_err("100 MB of garbage");
    assert!(e.message().len() < 1024, "{} bytes", e.message().len());
    // Under the message limit but over the sweep limit, and garbage under both: short errors.
    for size in [1 << 20, 60_000] {
        let msg = assert_code(
            p.sweeps
                .submit_sweep(pb::SubmitSweepRequest {
                    spec_toml: garbage[..size].to_string(),
                })
                .await,
            Code::InvalidArgument,
            "garbage TOML",
        );
        assert!(msg.len() < 512, "{msg}");
    }
    let long_name = format!(
        "name = \"{}\"\nbatch_sizes = [1]\nprecisions = [\"f32\"]",
        "n".repeat(201)
    );
    for (what, toml) in [
        (
            "a NUL in the sweep name",
            "name = \"a\\u0000b\"\nbatch_sizes = [1]\nprecisions = [\"f32\"]",
        ),
        (
            "a raw NUL",
            "name = \"a\0b\"\nbatch_sizes = [1]\nprecisions = [\"f32\"]",
        ),
        ("a 201-character sweep name", long_name.as_str()),
    ] {
        assert_code(
            p.sweeps
                .submit_sweep(pb::SubmitSweepRequest {
                    spec_toml: toml.into(),
                })
                .await,
            Code::InvalidArgument,
            what,
        );
    }
    assert_eq!(p.count("sweeps").await, 0, "nothing was queued");

    // A NUL in the import name.
    let e = p
        .sweeps
        .import_results(pb::ImportResultsRequest {
            name: "a\0b".into(),
            results: vec![(&standalone_record("x")).into()],
        })
        .await;
    assert_code(e, Code::InvalidArgument, "a NUL in the import name");
    // A NUL in a progress phase or failure reason.
    let e = p
        .agents
        .report_progress(pb::ReportProgressRequest {
            agent_id: p.agent_id.clone(),
            job_id: Uuid::new_v4().to_string(),
            attempt: 1,
            phase: "t\0".into(),
            iterations: 0,
            fraction: 0.0,
        })
        .await;
    assert_code(e, Code::InvalidArgument, "a NUL in a phase");
    assert_eq!(p.count("results").await, 0);
    p.coord.process.assert_running();
}

/// A codec that sends bytes as they are, so a request can be any bytes at all.
#[derive(Default, Clone)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf;
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

#[tokio::test]
async fn undecodable_protobuf_is_invalid_argument() {
    use prost::Message;
    let p = Probe::start(Vec::new()).await;
    let channel = Channel::from_shared(p.coord.url.clone())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    let valid = pb::SubmitSweepRequest {
        spec_toml: sweep_toml("raw", &[1], 32, "10ms"),
    }
    .encode_to_vec();
    let truncated = valid[..valid.len() / 2].to_vec();
    let cases = [
        (
            "truncated",
            "/fleetmark.v1.SweepService/SubmitSweep",
            truncated.clone(),
        ),
        (
            "garbage",
            "/fleetmark.v1.SweepService/SubmitSweep",
            vec![0xff; 16],
        ),
        (
            "truncated",
            "/fleetmark.v1.AgentService/SubmitResult",
            truncated,
        ),
    ];
    for (what, path, bytes) in cases {
        grpc.ready().await.expect("ready");
        let r = grpc
            .unary::<Vec<u8>, Vec<u8>, _>(
                tonic::Request::new(bytes),
                tonic::codegen::http::uri::PathAndQuery::from_static(path),
                RawCodec,
            )
            .await;
        assert_code(r, Code::InvalidArgument, &format!("{what} bytes to {path}"));
    }
    assert_eq!(p.count("sweeps").await, 0);
}

fn standalone_record(agent: &str) -> BenchResult {
    let spec = fleetmark_core::SweepSpec::from_toml(&sweep_toml("s", &[1], 32, "10ms"))
        .expect("spec")
        .expand()
        .expect("jobs")
        .remove(0);
    let mut r = made_up_result(None, 0, agent, spec);
    r.hardware_name = CPU_NAME.into();
    r
}

#[tokio::test]
async fn imports_never_borrow_agents_repeat_results_or_revive_stale_attempts() {
    let mut p = Probe::start(Vec::new()).await;

    // A standalone record that names the registered agent.
    let forged = standalone_record(AGENT);
    let first = p.import(std::slice::from_ref(&forged)).await;
    assert_eq!(first.imported, 1);
    let kinds = |r: &pb::ImportResultsResponse| -> Vec<pb::import_outcome::Kind> {
        r.outcomes.iter().map(|o| o.kind()).collect()
    };
    assert_eq!(kinds(&first), [pb::import_outcome::Kind::Imported]);
    let (origin, devices): (String, serde_json::Value) =
        sqlx::query_as("SELECT origin, devices FROM agents WHERE name = $1")
            .bind(AGENT)
            .fetch_one(&p.pool)
            .await
            .expect("the registered agent");
    assert_eq!(origin, "registered");
    assert_eq!(
        devices[0]["name"], CPU_NAME,
        "its registration is untouched"
    );
    let stored_under: String =
        sqlx::query_scalar("SELECT a.name FROM results r JOIN agents a ON a.id = r.agent_id")
            .fetch_one(&p.pool)
            .await
            .expect("the imported result's agent");
    assert_eq!(stored_under, format!("imported/{AGENT}"));
    let listed = p
        .sweeps
        .list_results(pb::ListResultsRequest::default())
        .await
        .expect("list")
        .into_inner();
    let listed = listed.results[0].clone();
    assert_eq!(
        listed.result.expect("record").agent_name,
        format!("imported/{AGENT}"),
        "compare and results never show it as the registered agent"
    );
    assert!(!listed.imported_by.is_empty(), "marked as imported");

    // The same record again adds nothing.
    let again = p.import(std::slice::from_ref(&forged)).await;
    assert_eq!(kinds(&again), [pb::import_outcome::Kind::Duplicate]);
    assert!(again.sweep_id.is_empty(), "no new sweep");
    assert_eq!(p.count("results").await, 1);
    assert_eq!(p.count("sweeps").await, 1);

    // A spooled record of attempt 1 for a job that has since been re-run and finished.
    let job = p.claimed_job().await;
    let spooled = p.result_for(&job);
    p.agents
        .fail_job(pb::FailJobRequest {
            agent_id: p.agent_id.clone(),
            job_id: job.job_id.clone(),
            attempt: job.attempt,
            reason: "probe".into(),
            permanent: false,
            handback: false,
        })
        .await
        .expect("fail attempt 1");
    let rerun = p.claim().await;
    assert_eq!(rerun.job_id, job.job_id);
    assert_eq!(rerun.attempt, 2);
    let delivered = p.result_for(&rerun);
    p.submit(&delivered).await.expect("attempt 2 delivers");
    let stale = p.import(std::slice::from_ref(&spooled)).await;
    assert_eq!(kinds(&stale), [pb::import_outcome::Kind::Stale]);
    assert!(stale.sweep_id.is_empty(), "never copied into a new sweep");
    assert_eq!(p.count("results").await, 2, "no row for the stale record");
    // The delivered result, imported from a spool file too, is a duplicate.
    let dup = p.import(std::slice::from_ref(&delivered)).await;
    assert_eq!(kinds(&dup), [pb::import_outcome::Kind::Duplicate]);

    // A spooled record for a job still running on that attempt completes its own job.
    let job = p.claimed_job().await;
    let spooled = p.result_for(&job);
    let attached = p.import(std::slice::from_ref(&spooled)).await;
    assert_eq!(kinds(&attached), [pb::import_outcome::Kind::Attached]);
    assert_eq!(attached.outcomes[0].job_id, job.job_id);
    let sweep: Uuid = job.sweep_id.parse().expect("uuid");
    let js = jobs(&p.pool, sweep).await.expect("jobs");
    assert_eq!(js[0].state, "succeeded");
    assert_eq!(
        sweep_state(&p.pool, sweep).await.expect("state"),
        "completed"
    );
    assert_eq!(p.count("results").await, 3);
    assert_eq!(
        p.count("sweeps").await,
        3,
        "one imported sweep and two real ones: nothing new"
    );
    // ... and the agent's own late delivery is then refused.
    assert_code(
        p.submit(&spooled).await,
        Code::FailedPrecondition,
        "delivery after the import",
    );
}

#[tokio::test]
async fn weights_paths_are_refused_without_an_oracle() {
    let mut p = Probe::start(Vec::new()).await;
    let submit = |path: &str| pb::SubmitSweepRequest {
        spec_toml: format!(
            "batch_sizes = [1]\nprecisions = [\"f32\"]\nimage_size = 32\n\
             weights = {{ kind = \"file\", path = \"{path}\" }}\n"
        ),
    };
    let mut messages = Vec::new();
    for path in [
        "/etc/shadow",
        "/etc/no-such-file-here",
        "/dev/zero",
        "../x",
        "..",
        "a/b",
    ] {
        let msg = assert_code(
            p.sweeps.submit_sweep(submit(path)).await,
            Code::InvalidArgument,
            path,
        );
        messages.push(msg.replace(path, "<path>"));
    }
    assert_eq!(
        messages[0], messages[1],
        "an existing and a missing file get the same answer"
    );
    assert_eq!(p.count("sweeps").await, 0);

    // A plain name reaches the agent, which looks only in its --weights-dir. A link in there
    // to a file outside it is refused exactly like a file that does not exist.
    let weights = scratch();
    std::os::unix::fs::symlink("/etc/hostname", weights.path().join("outside")).expect("symlink");
    let dir = scratch();
    let wd = weights.path().to_str().expect("utf-8").to_string();
    let _agent = start_agent(
        "weights-agent",
        dir.path(),
        &p.coord.url,
        "cpu",
        &["--weights-dir", &wd],
    );
    // Keep the probe agent from taking these jobs: it never claims.
    let mut errors = Vec::new();
    for name in ["outside", "missing.safetensors"] {
        let id: Uuid = p
            .sweeps
            .submit_sweep(submit(name))
            .await
            .expect("a plain file name is a valid sweep")
            .into_inner()
            .sweep_id
            .parse()
            .expect("uuid");
        wait_sweep_finished(&p.pool, id, SWEEP_TIMEOUT).await;
        let (state, error): (String, Option<String>) =
            sqlx::query_as("SELECT state::text, error FROM jobs WHERE sweep_id = $1")
                .bind(id)
                .fetch_one(&p.pool)
                .await
                .expect("the job");
        assert_eq!(state, "failed", "{error:?}");
        errors.push(error.unwrap_or_default().replace(name, "<name>"));
    }
    assert_eq!(errors[0], errors[1], "no existence oracle: {errors:?}");
    assert!(
        !errors[0].contains(&wd),
        "no path in the error: {}",
        errors[0]
    );
    assert!(!errors[0].contains("/etc"), "{}", errors[0]);
}

#[tokio::test]
async fn half_open_connections_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let p = Probe::start(vec![
        "--keepalive-interval",
        "300ms",
        "--keepalive-timeout",
        "300ms",
    ])
    .await;
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", p.coord.port))
        .await
        .expect("connect");
    // The HTTP/2 preface and an empty SETTINGS frame, then silence: pings go unanswered.
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .expect("preface");
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        let mut buf = [0u8; 4096];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the server closed a connection that stopped answering pings"
    );
}

/// Reads until the server closes the connection; true if it did within `within`.
async fn closed_by_server(tcp: &mut tokio::net::TcpStream, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    tokio::time::timeout(within, async {
        let mut buf = [0u8; 4096];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test]
async fn silent_and_trickling_connections_are_closed_before_the_handshake() {
    use tokio::io::AsyncWriteExt;
    let mut p = Probe::start(vec!["--preface-timeout", "500ms"]).await;
    // Connects and says nothing at all.
    let mut silent = tokio::net::TcpStream::connect(("127.0.0.1", p.coord.port))
        .await
        .expect("connect");
    // Sends three bytes of the HTTP/2 preface and stops.
    let mut trickle = tokio::net::TcpStream::connect(("127.0.0.1", p.coord.port))
        .await
        .expect("connect");
    trickle.write_all(b"PRI").await.expect("partial preface");
    let started = Instant::now();
    assert!(
        closed_by_server(&mut silent, Duration::from_secs(10)).await,
        "a connection that never spoke stayed open"
    );
    assert!(
        closed_by_server(&mut trickle, Duration::from_secs(10)).await,
        "a connection that sent part of its preface stayed open"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "closed only after {:?}",
        started.elapsed()
    );
    // A real client that connects afterwards is served as usual.
    Channel::from_shared(p.coord.url.clone())
        .expect("url")
        .connect()
        .await
        .expect("a fresh connection after the silent ones");
    let job = p.claimed_job().await;
    assert!(!job.job_id.is_empty());
}
