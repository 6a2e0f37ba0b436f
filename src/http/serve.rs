//! Serving the HTTP port connection by connection, so that slow or idle
//! clients cannot take it away from Google's redirects, RISC pushes and
//! health checks.
//!
//! Each accepted connection speaks HTTP/1.1 (hyper), over TLS when the port
//! listens beyond loopback (the server's `[tls]` certificate; configuration
//! refuses a non-loopback address without one). Invariants:
//!
//! - **Bounded connections.** At most [`HttpLimits::max_connections`] are
//!   held, and that is at most half the process's open-file limit, so
//!   accepting never runs out of descriptors because of this port. A new
//!   connection beyond the limit closes the oldest held connection that has
//!   no request in progress (idle keep-alive, half-sent headers, TLS
//!   handshake); only when every held connection is handling a request is the
//!   new one closed instead. Should `accept` still fail for want of
//!   descriptors (other ports share them), an idle connection is closed and
//!   accepting resumes. Closing an idle connection costs its client a
//!   reconnect, never an answer: no request of it was in progress.
//! - **Bounded client time.** A request's headers must arrive within
//!   `header_read_timeout` of the connection's start or of the previous
//!   response (so it is the idle timeout too; hyper closes the connection);
//!   its body within `body_read_timeout` once the headers are in (408, then
//!   the connection closes). A TLS handshake gets `header_read_timeout`.
//! - **Handlers never wait on the client.** A request's body is read in full,
//!   up to its route's limit ([`super::body_limit`]), before it is routed;
//!   a larger body gets the route's refusal once the rest is read and
//!   discarded (at most [`MAX_DRAIN_BYTES`] more, within the body deadline,
//!   so that the answer is not lost to a reset), else the connection closes
//!   after the answer.
//! - **Bounded memory per connection.** Headers larger than
//!   [`MAX_HEAD_BYTES`] are refused by hyper (431) before a route sees them.
//! - **Graceful stop.** When `stop` turns true, accepting ends, idle
//!   connections close, requests in progress finish (the server's shutdown
//!   grace bounds the wait), and [`serve`] returns once every connection has.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body as AxumBody;
use axum::body::Bytes;
use axum::http::{HeaderValue, Request, Response, StatusCode, header};
use axum::response::IntoResponse;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::config::HttpConfig;
use crate::grpc::transport::{Conn, PeerInfo};
use crate::vault::stopped;

/// The largest request head (request line and headers) read, in bytes:
/// hyper's read buffer per connection. Google's redirect with its `code`,
/// `state` and granted scopes fits several times over.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

/// The most bytes of an oversized body read and discarded so that its answer
/// arrives (see [`read_body`]); beyond them the connection is closed.
pub const MAX_DRAIN_BYTES: usize = 8 * 1024 * 1024;

/// How often at most the log says the connection limit is shedding.
const SHED_WARNING_EVERY: Duration = Duration::from_secs(60);

/// The HTTP port's limits, from `[http]` and the process's open-file limit.
#[derive(Clone, Copy, Debug)]
pub struct HttpLimits {
    /// Connections held at once (see the module doc).
    pub max_connections: usize,
    /// Headers (and keep-alive idle) deadline.
    pub header_read_timeout: Duration,
    /// Body deadline, from the end of the headers.
    pub body_read_timeout: Duration,
}

impl HttpLimits {
    /// The configured limits, with `max_connections` lowered to half the
    /// soft open-file limit (logged when it is).
    pub fn new(config: &HttpConfig) -> Self {
        let mut max_connections = config.max_connections;
        if let Some(files) = rustix::process::getrlimit(rustix::process::Resource::Nofile).current {
            let half = usize::try_from(files / 2).unwrap_or(usize::MAX).max(1);
            if half < max_connections {
                tracing::warn!(
                    configured = max_connections,
                    open_file_limit = files,
                    max_connections = half,
                    "http.max_connections lowered to half the open-file limit"
                );
                max_connections = half;
            }
        }
        Self {
            max_connections,
            header_read_timeout: Duration::from_secs(config.header_read_timeout_seconds),
            body_read_timeout: Duration::from_secs(config.body_read_timeout_seconds),
        }
    }
}

/// Serves `app` on `listener` until `stop` (see the module doc).
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    app: Router,
    limits: HttpLimits,
    mut stop: watch::Receiver<bool>,
) {
    let port = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let table = Arc::new(Connections::new(limits.max_connections, port));
    let acceptor = tls.map(TlsAcceptor::from);
    let mut tasks = JoinSet::new();
    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors, most likely: free one and retry.
                    if table.shed_idle("accept_failed") {
                        tracing::debug!(error = %e, "accept failed; closed an idle connection");
                        tokio::task::yield_now().await;
                    } else {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    continue;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            () = stopped(&mut stop) => break,
        };
        let Some(slot) = table.admit() else {
            // Every held connection is handling a request: this one waits
            // for nothing and is closed now.
            metrics::counter!("tokenvault_http_connections_closed_total", "reason" => "refused")
                .increment(1);
            drop(stream);
            continue;
        };
        tasks.spawn(connection(
            stream,
            remote,
            acceptor.clone(),
            app.clone(),
            limits,
            Held {
                table: table.clone(),
                slot,
            },
            stop.clone(),
        ));
    }
    while tasks.join_next().await.is_some() {}
}

/// One connection, from its TLS handshake to its close.
async fn connection(
    stream: TcpStream,
    remote: SocketAddr,
    acceptor: Option<TlsAcceptor>,
    app: Router,
    limits: HttpLimits,
    held: Held,
    mut stop: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let slot = held.slot.clone();
    let peer = |tls| PeerInfo {
        remote: Some(remote),
        tls,
        certificate: None,
    };
    let io = match acceptor {
        None => Conn::Plain(stream, peer(false)),
        Some(acceptor) => {
            let handshake =
                tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream));
            tokio::select! {
                done = handshake => match done {
                    Ok(Ok(tls)) => Conn::Tls(Box::new(tls), peer(true)),
                    Ok(Err(e)) => {
                        tracing::debug!(%remote, error = %e, "HTTP TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%remote, "HTTP TLS handshake timed out");
                        return;
                    }
                },
                () = slot.close.notified() => return,
                () = stopped(&mut stop) => return,
            }
        }
    };
    let service = hyper::service::service_fn({
        let slot = slot.clone();
        move |req| handle(req, app.clone(), slot.clone(), limits.body_read_timeout)
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        done = conn.as_mut() => {
            if let Err(e) = done {
                tracing::debug!(%remote, error = %e, "HTTP connection ended with an error");
            }
        }
        // Shed for a newer connection: dropping it closes the socket.
        () = slot.close.notified() => {}
        () = stopped(&mut stop) => {
            conn.as_mut().graceful_shutdown();
            if let Err(e) = conn.await {
                tracing::debug!(%remote, error = %e, "HTTP connection ended with an error");
            }
        }
    }
    drop(held);
}

/// One request: its body read within the deadline and the route's limit,
/// then routed.
async fn handle(
    req: Request<Incoming>,
    app: Router,
    slot: Arc<Slot>,
    body_read_timeout: Duration,
) -> Result<Response<AxumBody>, Infallible> {
    let _busy = Busy::new(&slot);
    let limit = super::body_limit(req.uri().path());
    let (parts, body) = req.into_parts();
    let body = match read_body(body, limit.bytes, body_read_timeout).await {
        ReadBody::Read(bytes) => bytes,
        ReadBody::TooLarge { drained: true } => return Ok((limit.too_large)()),
        ReadBody::TooLarge { drained: false } => return Ok(closing((limit.too_large)())),
        ReadBody::Unreadable => {
            let answer = (
                StatusCode::BAD_REQUEST,
                "the request body could not be read\n",
            );
            return Ok(closing(answer.into_response()));
        }
        ReadBody::TooSlow => {
            let answer = (
                StatusCode::REQUEST_TIMEOUT,
                "the request body was too slow\n",
            );
            return Ok(closing(answer.into_response()));
        }
    };
    let mut app = app;
    std::future::poll_fn(|cx| {
        tower_service::Service::<Request<AxumBody>>::poll_ready(&mut app, cx)
    })
    .await?;
    let request = Request::from_parts(parts, AxumBody::from(body));
    tower_service::Service::call(&mut app, request).await
}

/// What reading a request's body came to.
enum ReadBody {
    /// The whole body, within the limit.
    Read(Bytes),
    /// Over the limit. `drained`: the rest was read and discarded (at most
    /// [`MAX_DRAIN_BYTES`]), so the answer reaches the client and the
    /// connection can carry another request; otherwise the connection closes
    /// after the answer.
    TooLarge { drained: bool },
    /// The body could not be read (a malformed chunk, a reset).
    Unreadable,
    /// The body did not arrive within its deadline.
    TooSlow,
}

/// Reads `body` within `timeout`, keeping at most `limit` bytes. A larger
/// body is read on and discarded up to [`MAX_DRAIN_BYTES`] more (within the
/// same deadline): closing a connection on unread data makes the kernel
/// reset it, and the reset can destroy the answer before the client reads it.
async fn read_body(mut body: Incoming, limit: usize, timeout: Duration) -> ReadBody {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut kept = Vec::new();
    let mut seen = 0usize;
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) if seen > limit => return ReadBody::TooLarge { drained: false },
            Err(_) => return ReadBody::TooSlow,
            Ok(None) => break,
            Ok(Some(Err(_))) if seen > limit => return ReadBody::TooLarge { drained: false },
            Ok(Some(Err(_))) => return ReadBody::Unreadable,
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        seen = seen.saturating_add(data.len());
        if seen <= limit {
            kept.extend_from_slice(&data);
        } else if seen > limit.saturating_add(MAX_DRAIN_BYTES) {
            return ReadBody::TooLarge { drained: false };
        }
    }
    if seen > limit {
        ReadBody::TooLarge { drained: true }
    } else {
        ReadBody::Read(Bytes::from(kept))
    }
}

/// `response` with `Connection: close`: what is left of the request is not
/// read, so the connection cannot carry another.
fn closing(mut response: Response<AxumBody>) -> Response<AxumBody> {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// A held connection: whether a request of it is in progress, and how the
/// table tells it to close.
struct Slot {
    id: u64,
    in_progress: AtomicUsize,
    close: Notify,
}

/// Marks a request in progress for as long as it lives.
struct Busy<'a>(&'a Slot);

impl<'a> Busy<'a> {
    fn new(slot: &'a Slot) -> Self {
        slot.in_progress.fetch_add(1, Ordering::AcqRel);
        Self(slot)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.in_progress.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A connection's place in the table, given back when it is dropped.
struct Held {
    table: Arc<Connections>,
    slot: Arc<Slot>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.table.release(self.slot.id);
    }
}

/// The connections held, oldest first.
struct Connections {
    max: usize,
    port: String,
    inner: Mutex<Table>,
}

struct Table {
    next: u64,
    held: BTreeMap<u64, Arc<Slot>>,
    warned: Option<Instant>,
}

impl Connections {
    fn new(max: usize, port: String) -> Self {
        Self {
            max,
            port,
            inner: Mutex::new(Table {
                next: 0,
                held: BTreeMap::new(),
                warned: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A place for a new connection, closing the oldest idle one when the
    /// table is full; `None` when every held connection is busy.
    fn admit(&self) -> Option<Arc<Slot>> {
        if self.lock().held.len() >= self.max && !self.shed_idle("limit") {
            return None;
        }
        let mut table = self.lock();
        let slot = Arc::new(Slot {
            id: table.next,
            in_progress: AtomicUsize::new(0),
            close: Notify::new(),
        });
        table.next += 1;
        table.held.insert(slot.id, slot.clone());
        metrics::gauge!("tokenvault_http_connections").set(table.held.len() as f64);
        Some(slot)
    }

    /// Closes the oldest connection without a request in progress; false
    /// when there is none.
    fn shed_idle(&self, reason: &'static str) -> bool {
        let mut table = self.lock();
        let Some(id) = table
            .held
            .iter()
            .find(|(_, s)| s.in_progress.load(Ordering::Acquire) == 0)
            .map(|(id, _)| *id)
        else {
            return false;
        };
        if let Some(slot) = table.held.remove(&id) {
            slot.close.notify_one();
        }
        metrics::gauge!("tokenvault_http_connections").set(table.held.len() as f64);
        metrics::counter!("tokenvault_http_connections_closed_total", "reason" => reason)
            .increment(1);
        let now = Instant::now();
        if table
            .warned
            .is_none_or(|t| now.duration_since(t) >= SHED_WARNING_EVERY)
        {
            table.warned = Some(now);
            tracing::warn!(
                port = %self.port,
                max_connections = self.max,
                reason,
                "HTTP connections at their limit: closing idle ones for new ones \
                 (tokenvault_http_connections_closed_total counts them)"
            );
        }
        true
    }

    fn release(&self, id: u64) {
        let mut table = self.lock();
        if table.held.remove(&id).is_some() {
            metrics::gauge!("tokenvault_http_connections").set(table.held.len() as f64);
        }
    }
}
