//! The HTTP listener: accepts connections, serves HTTP/1.1 and HTTP/2 (h2c prior
//! knowledge) on the same port, and drains gracefully.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::flags::ResponseFlags;
use crate::request_info::{Reporter, RequestInfo};
use crate::state::Shared;

use super::ConnInfo;

/// Largest request head accepted (Envoy's default is 60 KiB); larger gets 431.
pub const MAX_REQUEST_HEADERS: usize = 60 * 1024;

/// Serves `listener` until the drain starts, then lets open connections finish
/// their requests for up to `drain_deadline`.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, reporter: Reporter, drain_deadline: Duration) {
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .max_buf_size(MAX_REQUEST_HEADERS)
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(60));
    builder.http2().timer(TokioTimer::new()).max_header_list_size(MAX_REQUEST_HEADERS as u32);
    let builder = Arc::new(builder);
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
        let local = stream.local_addr().unwrap_or(remote);
        let info = ConnInfo { remote, local, reporter };
        let shared = shared.clone();
        let builder = builder.clone();
        let svc_shared = shared.clone();
        let svc = service_fn(move |req| super::handle(svc_shared.clone(), info, req));
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc).into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let opened = Instant::now();
            if let Err(e) = conn.await {
                record_protocol_error(&shared, &info, e.as_ref(), opened);
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(drain_deadline, graceful.shutdown()).await.is_err() {
        tracing::warn!(?drain_deadline, "drain deadline passed with connections still open");
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
        authority: String::new(),
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
        request_id: String::new(),
        user_agent: None,
        downstream_remote: conn.remote,
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
