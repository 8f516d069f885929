//! How clients (agents, the CLI) reach a coordinator safely: the URL decides between TLS and
//! plaintext, and plaintext is allowed only where no one else can read it (a loopback address)
//! or when the user said so (`--insecure`). The check happens before any connection is made,
//! and nothing is ever silently downgraded: `https://` always means verified TLS.
//!
//! Also the per-request bearer credential, for agents whose secret changes at run time.

use std::{net::IpAddr, path::Path};

use tonic::{
    codegen::http::Uri,
    metadata::{Ascii, MetadataValue},
    transport::{Certificate, ClientTlsConfig, Endpoint, Identity},
    Request,
};

use crate::convert::WireError;

/// A client's TLS settings.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// PEM of the CA to trust instead of the system roots (a private CA from `tls init`).
    pub ca_pem: Option<Vec<u8>>,
    /// PEM certificate and key for mutual TLS (agents of a coordinator with `--client-ca`).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// Allow plaintext to a non-loopback address.
    pub insecure: bool,
}

impl ClientTls {
    /// Reads the CA and the client identity from PEM files.
    pub fn from_files(
        ca: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
        insecure: bool,
    ) -> Result<Self, WireError> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|e| WireError(format!("cannot read {}: {e}", p.display())))
        };
        let identity = match (cert, key) {
            (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
            (None, None) => None,
            _ => {
                return Err(WireError(
                    "--tls-cert and --tls-key go together: give both or neither".into(),
                ))
            }
        };
        Ok(ClientTls {
            ca_pem: ca.map(read).transpose()?,
            identity,
            insecure,
        })
    }
}

/// "127.0.0.1:7070" and "http://127.0.0.1:7070" both work.
pub fn normalize_url(url: &str) -> String {
    if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    }
}

/// True for `localhost` and loopback IP addresses: traffic that never leaves the machine.
pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Checks `url` against the plaintext policy and builds an endpoint for it: TLS for
/// `https://`, plaintext for `http://` (or a bare `host:port`) only to a loopback address or
/// with `insecure`. Fails before any connection is attempted.
pub fn endpoint(url: &str, tls: &ClientTls) -> Result<Endpoint, WireError> {
    let url = normalize_url(url);
    let uri: Uri = url
        .parse()
        .map_err(|e| WireError(format!("invalid coordinator URL '{url}': {e}")))?;
    let host = uri
        .host()
        .ok_or_else(|| WireError(format!("the coordinator URL '{url}' has no host")))?
        .to_string();
    let endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| WireError(format!("invalid coordinator URL '{url}': {e}")))?;
    match uri.scheme_str() {
        Some("https") => endpoint
            .tls_config(client_tls_config(&host, tls))
            .map_err(|e| WireError(format!("TLS set-up for '{url}': {e}"))),
        Some("http") => {
            if tls.ca_pem.is_some() || tls.identity.is_some() {
                return Err(WireError(format!(
                    "TLS certificates were given but '{url}' is plaintext http://; use https://"
                )));
            }
            if !tls.insecure && !is_loopback_host(&host) {
                return Err(WireError(format!(
                    "refusing plaintext to {host}: it is not a loopback address, so the \
                     credentials would cross the network unencrypted. Use https:// (with \
                     --ca-cert for a private CA), or pass --insecure to accept that"
                )));
            }
            Ok(endpoint)
        }
        other => Err(WireError(format!(
            "unsupported scheme {:?} in '{url}': use https:// (or http:// on loopback)",
            other.unwrap_or("")
        ))),
    }
}

fn client_tls_config(host: &str, tls: &ClientTls) -> ClientTlsConfig {
    let mut config = ClientTlsConfig::new().domain_name(host.trim_matches(['[', ']']));
    config = match &tls.ca_pem {
        Some(ca) => config.ca_certificate(Certificate::from_pem(ca)),
        None => config.with_native_roots(),
    };
    if let Some((cert, key)) = &tls.identity {
        config = config.identity(Identity::from_pem(cert, key));
    }
    config
}

/// The `authorization` metadata value for a secret.
pub fn bearer(secret: &str) -> Result<MetadataValue<Ascii>, WireError> {
    format!("Bearer {secret}")
        .parse()
        .map_err(|_| WireError("the token must be printable ASCII".into()))
}

/// Wraps a message in a request that carries `secret` as its bearer credential.
pub fn with_bearer<T>(message: T, secret: &str) -> Result<Request<T>, WireError> {
    let mut req = Request::new(message);
    req.metadata_mut().insert("authorization", bearer(secret)?);
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_only_to_loopback_unless_insecure() {
        let plain = ClientTls::default();
        for ok in [
            "127.0.0.1:7070",
            "http://localhost:7070",
            "http://[::1]:7070",
            "http://127.5.0.1:1",
        ] {
            assert!(endpoint(ok, &plain).is_ok(), "{ok}");
        }
        let err = endpoint("http://coordinator.example.invalid:7070", &plain)
            .unwrap_err()
            .0;
        assert!(err.contains("refusing plaintext"), "{err}");
        assert!(endpoint("coordinator.example.invalid:7070", &plain).is_err());
        let insecure = ClientTls {
            insecure: true,
            ..Default::default()
        };
        assert!(endpoint("http://coordinator.example.invalid:7070", &insecure).is_ok());
        assert!(endpoint("ftp://x:1", &insecure).is_err());
    }

    #[test]
    fn certificates_with_http_are_a_mistake() {
        let tls = ClientTls {
            ca_pem: Some(b"x".to_vec()),
            ..Default::default()
        };
        assert!(endpoint("http://127.0.0.1:1", &tls).is_err());
    }
}
