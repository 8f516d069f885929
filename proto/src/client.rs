//! Client-side plumbing shared by the agent and the CLI: a lazily connecting channel (it
//! reconnects by itself after a coordinator restart) and the bearer-token interceptor.

use std::time::Duration;

use tonic::{
    metadata::{Ascii, MetadataValue},
    service::{interceptor::InterceptedService, Interceptor},
    transport::{Channel, Endpoint},
    Request, Status,
};

use crate::{
    convert::WireError,
    secure::ClientTls,
    v1::{
        agent_service_client::AgentServiceClient, sweep_service_client::SweepServiceClient,
        token_service_client::TokenServiceClient,
    },
};

/// Adds `authorization: Bearer <token>` to every call when a token is configured.
#[derive(Clone)]
pub struct BearerAuth(Option<MetadataValue<Ascii>>);

impl Interceptor for BearerAuth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

pub type AgentClient = AgentServiceClient<InterceptedService<Channel, BearerAuth>>;
pub type SweepClient = SweepServiceClient<InterceptedService<Channel, BearerAuth>>;
pub type TokenClient = TokenServiceClient<InterceptedService<Channel, BearerAuth>>;

/// Largest message a client accepts (results with many raw latencies).
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;

pub use crate::secure::normalize_url;

/// The TLS-or-loopback policy lives in `secure::endpoint`; this adds the connection settings.
fn endpoint(url: &str, tls: &ClientTls) -> Result<Endpoint, WireError> {
    crate::secure::endpoint(url, tls).map(|e| {
        e.connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_while_idle(true)
    })
}

fn auth(token: Option<&str>) -> Result<BearerAuth, WireError> {
    token
        .filter(|t| !t.is_empty())
        .map(|t| {
            format!("Bearer {t}")
                .parse::<MetadataValue<Ascii>>()
                .map_err(|_| WireError("the token must be printable ASCII".into()))
        })
        .transpose()
        .map(BearerAuth)
}

/// A client for the agent API. Connects on first use and reconnects after failures.
pub fn agent_client(url: &str, token: Option<&str>) -> Result<AgentClient, WireError> {
    agent_client_tls(url, token, &ClientTls::default())
}

/// [`agent_client`] with TLS settings.
pub fn agent_client_tls(
    url: &str,
    token: Option<&str>,
    tls: &ClientTls,
) -> Result<AgentClient, WireError> {
    let channel = endpoint(url, tls)?.connect_lazy();
    Ok(AgentServiceClient::with_interceptor(channel, auth(token)?)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// A client for the sweep API (the CLI).
pub fn sweep_client(url: &str, token: Option<&str>) -> Result<SweepClient, WireError> {
    sweep_client_tls(url, token, &ClientTls::default())
}

/// [`sweep_client`] with TLS settings.
pub fn sweep_client_tls(
    url: &str,
    token: Option<&str>,
    tls: &ClientTls,
) -> Result<SweepClient, WireError> {
    let channel = endpoint(url, tls)?.connect_lazy();
    Ok(SweepServiceClient::with_interceptor(channel, auth(token)?)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// A client for the token API (admins).
pub fn token_client_tls(
    url: &str,
    token: Option<&str>,
    tls: &ClientTls,
) -> Result<TokenClient, WireError> {
    let channel = endpoint(url, tls)?.connect_lazy();
    Ok(TokenServiceClient::with_interceptor(channel, auth(token)?))
}

/// True for errors that mean "try again later": the coordinator or its database is down.
pub fn is_transient(status: &Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::DeadlineExceeded
            | tonic::Code::ResourceExhausted
            | tonic::Code::Aborted
    )
}
