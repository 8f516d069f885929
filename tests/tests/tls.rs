//! TLS end to end with a CA made by `fleetmark-coordinator tls init`: a coordinator with mutual
//! TLS for agents, a real agent process and the real CLI run a small CPU sweep over https
//! through a loopback proxy that records every byte, and no credential appears in them. An
//! https client without the CA fails; an agent without a client certificate is refused; and
//! plaintext to a non-loopback name is refused before any connection is made.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use fleetmark_e2e::*;
use fleetmark_proto::v1::{self as pb, sweep_service_client::SweepServiceClient};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

/// A loopback TCP proxy to `upstream` that keeps a copy of everything it forwards.
async fn recording_proxy(upstream: u16) -> (u16, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                continue;
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(pump(cr, sw, record.clone()));
            tokio::spawn(pump(sr, cw, record.clone()));
        }
    });
    (port, seen)
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    record: Arc<Mutex<Vec<u8>>>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                record.lock().unwrap().extend_from_slice(&buf[..n]);
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn a_sweep_over_mutual_tls_with_a_private_ca() {
    let dir = scratch();
    let db = TestDb::new().await;
    let pki = dir.path().join("pki");
    let out = command("fleetmark-coordinator")
        .args(["tls", "init"])
        .arg(&pki)
        .output()
        .expect("tls init");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let advice = String::from_utf8_lossy(&out.stderr);
    assert!(
        advice.contains("--ca-cert"),
        "prints what clients need:\n{advice}"
    );
    let path = |f: &str| pki.join(f).to_str().unwrap().to_string();

    let admin = create_token(&db.url, "admin", &[]);
    let agent_token = create_token(&db.url, "agent", &[]);
    let port = free_port();
    let mut cmd = command("fleetmark-coordinator");
    cmd.args([
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--database-url",
        &db.url,
    ])
    .args([
        "--tls-cert",
        &path("server.crt"),
        "--tls-key",
        &path("server.key"),
    ])
    .args(["--client-ca", &path("ca.crt")])
    .args(["--heartbeat", "500ms", "--lease", "10s"]);
    let _coordinator = Child::spawn("coordinator", cmd, dir.path());
    let (proxy, seen) = recording_proxy(port).await;
    let url = format!("https://127.0.0.1:{proxy}");

    // A plain tonic client trusting the CA: up once it answers.
    let ca = std::fs::read(path("ca.crt")).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca))
        .domain_name("127.0.0.1");
    let channel = Endpoint::from_shared(url.clone())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_lazy();
    let reader = SweepServiceClient::new(channel.clone());
    eventually(START_TIMEOUT, "the TLS coordinator to answer", || {
        let mut reader = reader.clone();
        let admin = admin.clone();
        async move {
            within(reader.list_sweeps(bearer(pb::ListSweepsRequest { limit: 1 }, &admin)))
                .await?
                .ok()
                .map(drop)
        }
    })
    .await;

    // An agent over mutual TLS, and the CLI over TLS.
    let _agent = start_agent(
        "tls-agent",
        dir.path(),
        &url,
        "cpu",
        &[
            "--token",
            &agent_token,
            "--ca-cert",
            &path("ca.crt"),
            "--tls-cert",
            &path("agent.crt"),
            "--tls-key",
            &path("agent.key"),
        ],
    );
    let toml = dir.path().join("tls.toml");
    std::fs::write(&toml, sweep_toml("over-tls", &[1], 32, "10ms")).unwrap();
    let out = cli(
        &url,
        Some(&admin),
        &[
            "--ca-cert",
            &path("ca.crt"),
            "submit",
            "--file",
            toml.to_str().unwrap(),
            "--watch",
        ],
    )
    .await;
    assert_success(&out, "fleetmark submit --watch over TLS");
    let sweep = parse_id_line(&out);
    let pool = pool(&db.url).await;
    wait_sweep_finished(&pool, sweep, SWEEP_TIMEOUT).await;
    assert_sweep_complete_once(&pool, sweep, 1).await;
    let out = cli(
        &url,
        Some(&admin),
        &[
            "--ca-cert",
            &path("ca.crt"),
            "results",
            &sweep.to_string(),
            "--format",
            "json",
        ],
    )
    .await;
    assert_success(&out, "fleetmark results over TLS");
    assert!(stdout(&out).contains("over-tls") || stdout(&out).contains("resnet18"));

    let bytes = seen.lock().unwrap().clone();
    assert!(
        bytes.len() > 10_000,
        "the proxy saw the traffic ({} bytes)",
        bytes.len()
    );
    for secret in [
        admin.as_str(),
        agent_token.as_str(),
        "Bearer",
        "fma_",
        "resnet18",
    ] {
        assert!(
            !contains(&bytes, secret),
            "{secret:?} crossed the wire in clear"
        );
    }

    // Without the CA, the server is not trusted: no call goes through.
    let out = cli(&url, Some(&admin), &["sweeps"]).await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("--ca-cert"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("panicked"));
    let untrusted = Endpoint::from_shared(url.clone())
        .unwrap()
        .tls_config(ClientTlsConfig::new().with_native_roots())
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy();
    let err = SweepServiceClient::new(untrusted)
        .list_sweeps(bearer(pb::ListSweepsRequest { limit: 1 }, &admin))
        .await
        .expect_err("an untrusted server");
    assert_ne!(
        err.code(),
        tonic::Code::Unauthenticated,
        "never got that far: {err:?}"
    );

    // An agent without a client certificate is refused, though its token is good.
    let err = register_over(&channel, &agent_token).await;
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("client certificate"), "{err:?}");
}

async fn register_over(channel: &tonic::transport::Channel, token: &str) -> tonic::Status {
    pb::agent_service_client::AgentServiceClient::new(channel.clone())
        .register(bearer(
            pb::RegisterRequest {
                name: "no-cert".into(),
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
            token,
        ))
        .await
        .expect_err("no client certificate")
}

/// The sweep id `submit --watch` printed first on stdout.
fn parse_id_line(out: &std::process::Output) -> uuid::Uuid {
    let s = stdout(out);
    let first = s.lines().next().unwrap_or_default();
    first
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("a sweep id first on stdout, got {s:?}: {e}"))
}

#[tokio::test]
async fn plaintext_to_a_remote_name_is_refused_before_connecting() {
    let dir = scratch();
    let remote = "http://coordinator.example.invalid:7070";
    for args in [vec!["sweeps"], vec!["submit", "--batch", "1"]] {
        let out = cli(remote, Some("fmt_x"), &args).await;
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains("refusing plaintext"), "{err}");
        assert!(err.contains("--insecure"), "says how to override: {err}");
    }
    let mut agent = start_agent(
        "remote-plain",
        dir.path(),
        "coordinator.example.invalid:7070",
        "cpu",
        &["--token", "fmt_x"],
    );
    let status = agent.wait_exit(START_TIMEOUT).await;
    let log = agent.log();
    assert!(!status.success(), "{log}");
    assert!(log.contains("refusing plaintext"), "{log}");
    // A CA given for a plaintext URL is a mistake, not a reason to downgrade quietly.
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "not used").unwrap();
    let out = cli(
        "http://127.0.0.1:9",
        Some("fmt_x"),
        &["--ca-cert", ca.to_str().unwrap(), "sweeps"],
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("use https://"), "{}", stderr(&out));
}
