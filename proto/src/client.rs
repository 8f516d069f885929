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
    v1::{agent_service_client::AgentServiceClient, sweep_service_client::SweepServiceClient},
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

/// Largest message a client sends (a result with many raw latencies, an import chunk).
pub const MAX_REQUEST_BYTES: usize = fleetmark_core::limits::MAX_REQUEST_BYTES;
/// Largest message a client accepts (a listing of results with their raw latencies).
pub const MAX_RESPONSE_BYTES: usize = fleetmark_core::limits::MAX_RESPONSE_BYTES;

/// "127.0.0.1:7070" and "http://127.0.0.1:7070" both work.
pub fn normalize_url(url: &str) -> String {
    if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    }
}

fn endpoint(url: &str) -> Result<Endpoint, WireError> {
    let url = normalize_url(url);
    Endpoint::from_shared(url.clone())
        .map(|e| {
            e.connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(20))
                .keep_alive_while_idle(true)
        })
        .map_err(|e| WireError(format!("invalid coordinator URL '{url}': {e}")))
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
    let channel = endpoint(url)?.connect_lazy();
    Ok(AgentServiceClient::with_interceptor(channel, auth(token)?)
        .max_decoding_message_size(MAX_RESPONSE_BYTES)
        .max_encoding_message_size(MAX_REQUEST_BYTES))
}

/// A client for the sweep API (the CLI).
pub fn sweep_client(url: &str, token: Option<&str>) -> Result<SweepClient, WireError> {
    let channel = endpoint(url)?.connect_lazy();
    Ok(SweepServiceClient::with_interceptor(channel, auth(token)?)
        .max_decoding_message_size(MAX_RESPONSE_BYTES)
        .max_encoding_message_size(MAX_REQUEST_BYTES))
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
