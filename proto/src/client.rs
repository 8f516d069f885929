//! Client-side plumbing shared by the agent and the CLI: lazily connecting channels (they
//! reconnect by themselves after a coordinator restart), failover between several coordinators,
//! a deadline on every call and keepalives on every connection (all set from [`Deadlines`]), and
//! the bearer-token interceptor.

use std::{
    net::ToSocketAddrs,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use http_body_util::{BodyExt, Full};
use tonic::{
    body::Body,
    codegen::{http, Service},
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

pub type AgentClient = AgentServiceClient<InterceptedService<Failover, BearerAuth>>;
pub type SweepClient = SweepServiceClient<InterceptedService<Failover, BearerAuth>>;
pub type TokenClient = TokenServiceClient<InterceptedService<Channel, BearerAuth>>;

/// Largest message a client sends (a result with many raw latencies, an import chunk).
pub const MAX_REQUEST_BYTES: usize = fleetmark_core::limits::MAX_REQUEST_BYTES;
/// Largest message a client accepts (a listing of results with their raw latencies).
pub const MAX_RESPONSE_BYTES: usize = fleetmark_core::limits::MAX_RESPONSE_BYTES;

pub use crate::secure::normalize_url;

/// Every client-side time limit, in one place. A call that gets no answer within its deadline
/// fails with DEADLINE_EXCEEDED (the server is told the deadline too, through `grpc-timeout`),
/// and a connection whose peer stops answering HTTP/2 pings is dropped: a hung coordinator
/// (SIGSTOPped, say) stalls nobody for longer than this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// Establishing a TCP connection.
    pub connect: Duration,
    /// Any unary call that does not set its own deadline.
    pub call: Duration,
    /// Added to a long poll's wait (a claim) to make its deadline.
    pub long_poll_margin: Duration,
    /// HTTP/2 ping interval on every connection, busy or idle.
    pub keepalive_interval: Duration,
    /// A ping unanswered for this long closes the connection.
    pub keepalive_timeout: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Deadlines {
            connect: Duration::from_secs(3),
            call: Duration::from_secs(15),
            long_poll_margin: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(5),
        }
    }
}

impl Deadlines {
    /// The same limits with `call` as the deadline of an ordinary call.
    pub fn with_call(self, call: Duration) -> Self {
        Deadlines { call, ..self }
    }

    /// The deadline of a long poll that may wait `wait` at the server.
    pub fn long_poll(&self, wait: Duration) -> Duration {
        wait + self.long_poll_margin
    }
}

/// Calls that stream for as long as they last: no deadline (keepalives still apply).
const STREAMING_PATHS: &[&str] = &["/fleetmark.v1.SweepService/WatchSweep"];

/// The coordinators named by `spec`: a comma-separated list of addresses, each of which may be
/// a DNS name resolving to several. Plain-HTTP names are resolved here, once, into one address
/// each; `https://` names are kept as they are (their certificates name the host).
pub fn coordinator_urls(spec: &str) -> Result<Vec<String>, WireError> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let url = normalize_url(part);
        for u in expand_dns(&url) {
            if !out.contains(&u) {
                out.push(u);
            }
        }
    }
    if out.is_empty() {
        return Err(WireError("no coordinator address given".into()));
    }
    Ok(out)
}

/// `http://name:port` as one URL per address the name resolves to; anything else unchanged
/// (also when the name does not resolve now: the channel resolves it again when it connects).
fn expand_dns(url: &str) -> Vec<String> {
    let Some(rest) = url.strip_prefix("http://") else {
        return vec![url.to_string()];
    };
    let authority = rest.split('/').next().unwrap_or(rest);
    if authority.parse::<std::net::SocketAddr>().is_ok() || !authority.contains(':') {
        return vec![url.to_string()];
    }
    match authority.to_socket_addrs() {
        Ok(addrs) => {
            let v: Vec<String> = addrs.map(|a| format!("http://{a}")).collect();
            if v.is_empty() {
                vec![url.to_string()]
            } else {
                v
            }
        }
        Err(_) => vec![url.to_string()],
    }
}

/// The TLS-or-loopback policy lives in `secure::endpoint`; this adds the time limits.
fn endpoint(url: &str, d: &Deadlines, tls: &ClientTls) -> Result<Endpoint, WireError> {
    crate::secure::endpoint(url, tls).map(|e| {
        e.connect_timeout(d.connect)
            .tcp_nodelay(true)
            .tcp_keepalive(Some(d.keepalive_interval))
            .http2_keep_alive_interval(d.keepalive_interval)
            .keep_alive_timeout(d.keepalive_timeout)
            .keep_alive_while_idle(true)
    })
}

/// Channels to several coordinators that all serve one database. Calls go to the current one;
/// a call that fails at the transport (refused, reset, no answer before its deadline) moves
/// the client to the next, so the caller's retry lands elsewhere. Also gives every call that
/// has none the default deadline of [`Deadlines`].
#[derive(Clone)]
pub struct Failover {
    targets: Arc<[(String, Channel)]>,
    current: Arc<AtomicUsize>,
    deadlines: Deadlines,
}

impl Failover {
    /// Lazily connecting channels to `urls` (see [`coordinator_urls`]).
    pub fn new(urls: &[String], deadlines: Deadlines, tls: &ClientTls) -> Result<Self, WireError> {
        let targets = urls
            .iter()
            .map(|u| Ok((u.clone(), endpoint(u, &deadlines, tls)?.connect_lazy())))
            .collect::<Result<Vec<_>, WireError>>()?;
        Self::from_channels(targets, deadlines)
    }

    /// Over channels made elsewhere (with TLS, say), each with the URL it reaches.
    pub fn from_channels(
        targets: Vec<(String, Channel)>,
        deadlines: Deadlines,
    ) -> Result<Self, WireError> {
        if targets.is_empty() {
            return Err(WireError("no coordinator address given".into()));
        }
        Ok(Failover {
            targets: targets.into(),
            current: Arc::new(AtomicUsize::new(0)),
            deadlines,
        })
    }

    /// The URL calls go to now.
    pub fn current_url(&self) -> &str {
        let i = self.current.load(Ordering::Relaxed) % self.targets.len();
        &self.targets[i].0
    }
}

impl Service<http::Request<Body>> for Failover {
    type Response = http::Response<Body>;
    type Error = Status;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Status>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        // Each call waits for its own channel's readiness, under its deadline.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let n = self.targets.len();
        let i = self.current.load(Ordering::Relaxed) % n;
        let targets = self.targets.clone();
        let current = self.current.clone();
        if !req.headers().contains_key("grpc-timeout")
            && !STREAMING_PATHS.contains(&req.uri().path())
        {
            let ms = self.deadlines.call.as_millis().clamp(1, 99_999_999);
            req.headers_mut().insert(
                "grpc-timeout",
                http::HeaderValue::from_str(&format!("{ms}m")).expect("digits are a header"),
            );
        }
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            // Requests are single messages: buffer this one so it can go to another
            // coordinator when this one cannot be reached at all.
            let body = body
                .collect()
                .await
                .map_err(|e| Status::internal(format!("cannot encode the request: {e}")))?
                .to_bytes();
            let mut last = None;
            for k in 0..n {
                let at = (i + k) % n;
                let (url, mut channel) = targets[at].clone();
                let mut req = http::Request::new(Body::new(Full::new(body.clone())));
                *req.method_mut() = parts.method.clone();
                *req.uri_mut() = parts.uri.clone();
                *req.version_mut() = parts.version;
                *req.headers_mut() = parts.headers.clone();
                *req.extensions_mut() = parts.extensions.clone();
                let outcome = match std::future::poll_fn(|cx| channel.poll_ready(cx)).await {
                    Ok(()) => channel.call(req).await,
                    Err(e) => Err(e),
                };
                match outcome {
                    Ok(resp) => return Ok(resp),
                    Err(e) => {
                        // Later calls go to the next coordinator, unless another call moved on
                        // already.
                        let _ = current.compare_exchange(
                            at,
                            (at + 1) % n,
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                        );
                        let never_sent = is_connect_error(&e);
                        last = Some(transport_status(&url, &e));
                        // Only a call that never reached a coordinator is safe to send again:
                        // one that timed out may have been carried out.
                        if !never_sent {
                            break;
                        }
                    }
                }
            }
            Err(last.expect("at least one coordinator was tried"))
        })
    }
}

fn is_connect_error(e: &tonic::transport::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<tonic::ConnectError>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// A transport failure as the status a caller branches on: DEADLINE_EXCEEDED when the
/// coordinator did not answer in time, UNAVAILABLE otherwise.
fn transport_status(url: &str, e: &tonic::transport::Error) -> Status {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<tonic::TimeoutExpired>() {
            return Status::deadline_exceeded(format!("{url} did not answer in time"));
        }
        source = err.source();
    }
    Status::unavailable(format!("{url}: {e}"))
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

/// A client for the agent API. Connects on first use and reconnects after failures. `url` may
/// name several coordinators (see [`coordinator_urls`]).
pub fn agent_client(url: &str, token: Option<&str>) -> Result<AgentClient, WireError> {
    agent_client_with(url, token, Deadlines::default(), &ClientTls::default())
}

/// [`agent_client`] with TLS settings.
pub fn agent_client_tls(
    url: &str,
    token: Option<&str>,
    tls: &ClientTls,
) -> Result<AgentClient, WireError> {
    agent_client_with(url, token, Deadlines::default(), tls)
}

/// [`agent_client`] with other deadlines and TLS settings.
pub fn agent_client_with(
    url: &str,
    token: Option<&str>,
    deadlines: Deadlines,
    tls: &ClientTls,
) -> Result<AgentClient, WireError> {
    let channel = Failover::new(&coordinator_urls(url)?, deadlines, tls)?;
    Ok(AgentServiceClient::with_interceptor(channel, auth(token)?)
        .max_decoding_message_size(MAX_RESPONSE_BYTES)
        .max_encoding_message_size(MAX_REQUEST_BYTES))
}

/// A client for the sweep API (the CLI).
pub fn sweep_client(url: &str, token: Option<&str>) -> Result<SweepClient, WireError> {
    sweep_client_with(url, token, Deadlines::default(), &ClientTls::default())
}

/// [`sweep_client`] with TLS settings.
pub fn sweep_client_tls(
    url: &str,
    token: Option<&str>,
    tls: &ClientTls,
) -> Result<SweepClient, WireError> {
    sweep_client_with(url, token, Deadlines::default(), tls)
}

/// [`sweep_client`] with other deadlines and TLS settings.
pub fn sweep_client_with(
    url: &str,
    token: Option<&str>,
    deadlines: Deadlines,
    tls: &ClientTls,
) -> Result<SweepClient, WireError> {
    let channel = Failover::new(&coordinator_urls(url)?, deadlines, tls)?;
    Ok(SweepServiceClient::with_interceptor(channel, auth(token)?)
        .max_decoding_message_size(MAX_RESPONSE_BYTES)
        .max_encoding_message_size(MAX_REQUEST_BYTES))
}

/// A client for the token API (admins).
pub fn token_client_tls(
    url: &str,
    token: Option<&str>,
    tls: &ClientTls,
) -> Result<TokenClient, WireError> {
    let channel = endpoint(url, &Deadlines::default(), tls)?.connect_lazy();
    Ok(TokenServiceClient::with_interceptor(channel, auth(token)?))
}

/// True for errors that mean "try again later": the coordinator or its database is down.
pub fn is_transient(status: &Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            // What a server says when a call outlived the deadline it was sent with.
            | tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded
            | tonic::Code::ResourceExhausted
            | tonic::Code::Aborted
    )
}
