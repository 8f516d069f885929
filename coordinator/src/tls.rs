//! The coordinator's TLS: its certificate and key, an optional client CA for mutual TLS with
//! agents, and `tls init`, a one-command private CA for users without a PKI of their own.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::error::CoordinatorError;

/// PEM contents of the server's TLS material.
#[derive(Clone)]
pub struct ServerTls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// When set, agents must present a certificate signed by this CA. Other clients (the CLI)
    /// may connect without one and are judged by their tokens alone.
    pub client_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("ServerTls")
            .field("client_ca", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Reads the PEM files.
    pub fn from_files(
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
    ) -> Result<Self, CoordinatorError> {
        Ok(ServerTls {
            cert_pem: read(cert)?,
            key_pem: read(key)?,
            client_ca_pem: client_ca.map(read).transpose()?,
        })
    }

    /// The rustls configuration tonic serves with.
    pub fn config(&self) -> Result<ServerTlsConfig, CoordinatorError> {
        let mut c =
            ServerTlsConfig::new().identity(Identity::from_pem(&self.cert_pem, &self.key_pem));
        if let Some(ca) = &self.client_ca_pem {
            c = c
                .client_ca_root(Certificate::from_pem(ca))
                .client_auth_optional(true);
        }
        Ok(c)
    }
}

fn read(p: &Path) -> Result<Vec<u8>, CoordinatorError> {
    std::fs::read(p)
        .map_err(|e| CoordinatorError::Config(format!("cannot read {}: {e}", p.display())))
}

/// The files `tls init` wrote.
#[derive(Debug, Clone)]
pub struct InitOutput {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub agent_cert: PathBuf,
    pub agent_key: PathBuf,
}

/// Writes a private CA, a server certificate for `hosts` (DNS names or IP addresses) and an
/// agent client certificate into `dir`. Refuses to overwrite an existing CA.
pub fn init(dir: &Path, hosts: &[String]) -> Result<InitOutput, CoordinatorError> {
    let e = |what: &str, err: rcgen::Error| CoordinatorError::Config(format!("{what}: {err}"));
    let out = InitOutput {
        ca_cert: dir.join("ca.crt"),
        ca_key: dir.join("ca.key"),
        server_cert: dir.join("server.crt"),
        server_key: dir.join("server.key"),
        agent_cert: dir.join("agent.crt"),
        agent_key: dir.join("agent.key"),
    };
    if out.ca_key.exists() {
        return Err(CoordinatorError::Config(format!(
            "{} exists already; remove it (and everything signed by it) to start over",
            out.ca_key.display()
        )));
    }
    if hosts.is_empty() {
        return Err(CoordinatorError::Config("give at least one --host".into()));
    }
    std::fs::create_dir_all(dir).map_err(|err| {
        CoordinatorError::Config(format!("cannot create {}: {err}", dir.display()))
    })?;

    let ca_key = KeyPair::generate().map_err(|err| e("CA key", err))?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(|err| e("CA", err))?;
    ca.distinguished_name
        .push(DnType::CommonName, "Fleetmark private CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).map_err(|err| e("CA", err))?;
    let issuer = Issuer::new(ca, &ca_key);

    let server_key = KeyPair::generate().map_err(|err| e("server key", err))?;
    let mut server = CertificateParams::default();
    server
        .distinguished_name
        .push(DnType::CommonName, "fleetmark-coordinator");
    server.subject_alt_names = hosts
        .iter()
        .map(|h| match h.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => h
                .clone()
                .try_into()
                .map(SanType::DnsName)
                .map_err(|err| e(&format!("host '{h}'"), err)),
        })
        .collect::<Result<_, _>>()?;
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server
        .signed_by(&server_key, &issuer)
        .map_err(|err| e("server certificate", err))?;

    let agent_key = KeyPair::generate().map_err(|err| e("agent key", err))?;
    let mut agent = CertificateParams::default();
    agent
        .distinguished_name
        .push(DnType::CommonName, "fleetmark-agent");
    agent.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let agent_cert = agent
        .signed_by(&agent_key, &issuer)
        .map_err(|err| e("agent certificate", err))?;

    write(&out.ca_cert, &ca_cert.pem(), false)?;
    write(&out.ca_key, &ca_key.serialize_pem(), true)?;
    write(&out.server_cert, &server_cert.pem(), false)?;
    write(&out.server_key, &server_key.serialize_pem(), true)?;
    write(&out.agent_cert, &agent_cert.pem(), false)?;
    write(&out.agent_key, &agent_key.serialize_pem(), true)?;
    Ok(out)
}

/// Writes a file; private keys are readable by their owner only.
fn write(path: &Path, text: &str, private: bool) -> Result<(), CoordinatorError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    if private {
        opts.mode(0o600);
    }
    opts.open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|err| CoordinatorError::Config(format!("cannot write {}: {err}", path.display())))
}
