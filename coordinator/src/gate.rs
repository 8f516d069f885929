//! The accept gate: a TCP connection must start speaking (an HTTP/2 preface or a TLS
//! ClientHello) within `preface_timeout`, or it is closed before tonic ever sees it.
//!
//! tonic's HTTP/2 keepalive pings only begin after the HTTP/2 handshake, so without this a
//! client that connects and says nothing (or trickles a byte at a time) would hold a socket and
//! a task for ever. Connections still waiting for their first bytes are also capped, so a flood
//! of silent sockets cannot exhaust file descriptors.

use std::sync::Arc;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, warn};

/// Bytes a real client sends before waiting for the server: the HTTP/2 client preface is 24
/// bytes, and a TLS ClientHello is longer than that.
const PREFACE_BYTES: usize = 24;
/// How often a connection that has sent only part of its preface is looked at again.
const PREFACE_POLL: Duration = Duration::from_millis(50);

/// How connections are admitted.
#[derive(Debug, Clone, Copy)]
pub struct GateConfig {
    /// A connection that has not sent its first `PREFACE_BYTES` within this long is closed.
    pub preface_timeout: Duration,
    /// Connections allowed to be waiting for their preface at once; beyond it, new ones are
    /// closed at once.
    pub max_unstarted: usize,
    /// TCP keepalive probes on every admitted socket (peers that vanished without a FIN).
    pub tcp_keepalive: Duration,
}

/// Accepts from `listener` and yields only the connections that started speaking in time.
pub fn admit(
    listener: TcpListener,
    config: GateConfig,
) -> ReceiverStream<Result<TcpStream, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let waiting = Arc::new(Semaphore::new(config.max_unstarted));
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Running out of descriptors is transient: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = waiting.clone().try_acquire_owned() else {
                debug!(%peer, "too many connections waiting for their preface; closed");
                continue;
            };
            let sender = tx.clone();
            tokio::spawn(async move {
                let started =
                    tokio::time::timeout(config.preface_timeout, preface_arrived(&stream)).await;
                drop(permit);
                match started {
                    Ok(true) => {
                        tune(&stream, config.tcp_keepalive);
                        // The server is gone when the receiver is: nothing left to hand to.
                        let _ = sender.send(Ok(stream)).await;
                    }
                    Ok(false) => debug!(%peer, "connection closed before its preface"),
                    Err(_) => debug!(%peer, "no preface in time; connection closed"),
                }
            });
            if tx.is_closed() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

/// True once the peer has sent `PREFACE_BYTES` (left unread for the server); false if it
/// closed or failed first.
async fn preface_arrived(stream: &TcpStream) -> bool {
    let mut buf = [0u8; PREFACE_BYTES];
    loop {
        match stream.peek(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) if n >= PREFACE_BYTES => return true,
            // Part of it: peek returns at once while those bytes sit unread, so wait a little
            // before looking again rather than spinning.
            Ok(_) => tokio::time::sleep(PREFACE_POLL).await,
        }
    }
}

fn tune(stream: &TcpStream, keepalive: Duration) {
    if let Err(e) = stream.set_nodelay(true) {
        debug!(error = %e, "cannot set TCP_NODELAY");
    }
    let probes = TcpKeepalive::new().with_time(keepalive);
    if let Err(e) = SockRef::from(stream).set_tcp_keepalive(&probes) {
        debug!(error = %e, "cannot set TCP keepalive");
    }
}
