//! The HTTP listener: accepts connections, serves HTTP/1.1 and HTTP/2 (h2c prior
//! knowledge) on the same port, and drains gracefully.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};

use crate::cork::ConnExecutor;
use crate::flags::ResponseFlags;
use crate::graceful::{GracefulShutdown, Watcher};
use crate::idle::{ActiveIo, IdleTimer};
use crate::request_info::RequestInfo;
use crate::state::Shared;

use super::ConnInfo;

/// Largest request head accepted (Envoy's default is 60 KiB); larger gets 431.
pub const MAX_REQUEST_HEADERS: usize = 60 * 1024;

/// A listener's timeouts: how long its connections may stay idle, and how long
/// its drain lets requests in flight finish.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Nothing read or written for this long closes a connection (zero: never).
    pub idle: Duration,
    /// How long a drain waits for open connections.
    pub drain: Duration,
}

/// How a listener serves HTTP on its connections: hyper's HTTP/1.1 + h2c
/// builder with serin's limits, and the idle timeout.
#[derive(Debug)]
pub struct HttpServer {
    builder: auto::Builder<TokioExecutor>,
    /// Zero: connections stay open however long they are idle.
    idle_timeout: Duration,
}

impl HttpServer {
    /// A server whose connections close after `idle_timeout` with nothing read
    /// or written (zero: never; see [`crate::idle`]).
    pub fn new(idle_timeout: Duration) -> Arc<HttpServer> {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // No header-read timeout: hyper's runs while a kept-alive connection waits
        // for its next request too, and arms a timer per request; the idle
        // timeout covers both, per connection.
        builder.http1().max_buf_size(MAX_REQUEST_HEADERS).timer(TokioTimer::new()).header_read_timeout(None);
        builder.http2().timer(TokioTimer::new()).max_header_list_size(MAX_REQUEST_HEADERS as u32);
        Arc::new(HttpServer { builder, idle_timeout })
    }
}

/// Serves HTTP on one accepted connection (plain TCP or TLS) in a task of its own;
/// the connection drains with `graceful`.
pub fn serve_http<IO>(server: &HttpServer, graceful: &GracefulShutdown, io: IO, shared: Arc<Shared>, info: ConnInfo)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    serve_http_watched(server, graceful.watcher(), io, shared, info);
}

/// Like [`serve_http`], for a connection accepted in a task of its own (after a
/// TLS handshake): `watcher` comes from the listener's `GracefulShutdown`.
pub fn serve_http_watched<IO>(server: &HttpServer, watcher: Watcher, io: IO, shared: Arc<Shared>, info: ConnInfo)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    serve_connection(server, watcher, io, shared, info, ConnExecutor::Plain);
}

/// Like [`serve_http_watched`], for a connection over a [`CorkedTcp`]: what each
/// poll of the connection writes leaves in one system call (`cork`).
///
/// [`CorkedTcp`]: crate::cork::CorkedTcp
pub fn serve_http_corked<IO>(
    server: &HttpServer,
    watcher: Watcher,
    io: IO,
    cork: Arc<crate::cork::Cork>,
    shared: Arc<Shared>,
    info: ConnInfo,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    serve_connection(server, watcher, io, shared, info, ConnExecutor::Corked(cork));
}

fn serve_connection<IO>(
    server: &HttpServer,
    watcher: Watcher,
    io: IO,
    shared: Arc<Shared>,
    info: ConnInfo,
    executor: ConnExecutor,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc_shared = shared.clone();
    let svc_info = info.clone();
    let svc = service_fn(move |req| super::handle(svc_shared.clone(), svc_info.clone(), req));
    let (idle, activity) = IdleTimer::unless_zero(server.idle_timeout);
    let io = TokioIo::new(ActiveIo::new(io, activity));
    let conn = server.builder.serve_connection_with_upgrades(io, svc).into_owned();
    let conn = watcher.watch(conn);
    let conn = match idle {
        Some(timer) => conn.close_when_idle(timer),
        None => conn,
    };
    let served = async move {
        let opened = Instant::now();
        if let Err(e) = conn.await {
            record_protocol_error(&shared, &info, e.as_ref(), opened);
        }
    };
    hyper::rt::Executor::execute(&executor, served);
}

/// Accepts connections until the drain starts, handing each to `on_accept`.
pub async fn accept_loop(listener: TcpListener, shared: &Shared, mut on_accept: impl FnMut(TcpStream, SocketAddr)) {
    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shared.drain.signaled() => break,
        };
        let _ = stream.set_nodelay(true);
        on_accept(stream, remote);
    }
}

/// Waits for drained connections to finish, up to `deadline`.
pub async fn drain_connections(graceful: GracefulShutdown, deadline: Duration) {
    if tokio::time::timeout(deadline, graceful.shutdown()).await.is_err() {
        tracing::warn!(?deadline, "drain deadline passed with connections still open");
    }
}

/// A request hyper rejected before it reached the router (malformed: 400,
/// headers too large: 431) is logged and counted like any other, flag DPE.
fn record_protocol_error(shared: &Shared, conn: &ConnInfo, err: &(dyn std::error::Error + 'static), opened: Instant) {
    let Some(e) = find_hyper_error(err) else {
        tracing::debug!(error = %err, "connection error");
        return;
    };
    let status = if e.is_parse_too_large() {
        431
    } else if e.is_parse() || e.is_parse_status() {
        400
    } else {
        tracing::debug!(error = %e, "connection error");
        return;
    };
    let info = RequestInfo {
        reporter: conn.reporter,
        start: SystemTime::now(),
        duration: opened.elapsed(),
        method: http::Method::GET,
        path: "-".into(),
        protocol: "HTTP/1.1",
        authority: Default::default(),
        status,
        grpc_status: None,
        is_grpc: false,
        flags: ResponseFlags::DOWNSTREAM_PROTOCOL_ERROR,
        bytes_received: 0,
        bytes_sent: 0,
        route_name: None,
        cluster: None,
        upstream: None,
        attempts: 0,
        request_id: Default::default(),
        user_agent: None,
        downstream_remote: conn.remote,
        peer: None,
    };
    shared.metrics.record_request(&shared.local, &info);
    shared.access_log.log(&info);
}

fn find_hyper_error<'a>(mut err: &'a (dyn std::error::Error + 'static)) -> Option<&'a hyper::Error> {
    loop {
        if let Some(e) = err.downcast_ref::<hyper::Error>() {
            return Some(e);
        }
        err = err.source()?;
    }
}

/// Binds a listener, with the address in the error.
pub async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    use anyhow::Context as _;
    TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr} ({what})"))
}
