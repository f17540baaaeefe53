//! The sidecar's own HTTP servers, Istio's ports:
//!
//! - admin (`127.0.0.1:15000`): `/config_dump`, `/clusters`, `/ready`,
//!   `/server_info`, `/stats/prometheus`, `POST /quitquitquit`;
//! - metrics (`0.0.0.0:15090`): `/stats/prometheus`;
//! - health (`0.0.0.0:15021`): `/healthz/ready`.
//!
//! All three are plain HTTP/1.1 (hyper 1). When the drain starts they answer
//! `503 DRAINING` on the readiness paths and keep serving for a short linger (so
//! readiness probes see the 503 and Prometheus gets a last scrape), then stop
//! accepting and close their connections once idle. Handlers never block: the
//! metrics are encoded on the request's own task.

mod config_dump;
mod handlers;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::state::Shared;

pub use config_dump::{ConfigDump, clusters_json, clusters_text, config_dump};

/// Default admin address (loopback only, like Istio).
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15000";
/// Default Prometheus address.
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:15090";
/// Default health address.
pub const DEFAULT_HEALTH_ADDR: &str = "0.0.0.0:15021";

/// Errors of the admin servers.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// A server's address could not be bound.
    #[error("cannot listen for the {server} server on {addr}: {source}")]
    Bind {
        /// `admin`, `metrics` or `health`.
        server: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Binds a server's listener, with an error naming the server and the address.
pub async fn bind(server: &'static str, addr: SocketAddr) -> Result<TcpListener, AdminError> {
    TcpListener::bind(addr).await.map_err(|source| AdminError::Bind { server, addr, source })
}

/// How a server behaves once the drain has started.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// How long the server keeps accepting after the drain starts, answering
    /// `503` on readiness, before it stops accepting.
    pub linger: Duration,
    /// Time allowed for a client to send a request's headers.
    pub header_read_timeout: Duration,
}

impl Default for ServeOptions {
    /// A 5 s linger (Istio's default `terminationDrainDuration`), 30 s header timeout.
    fn default() -> Self {
        ServeOptions { linger: Duration::from_secs(5), header_read_timeout: Duration::from_secs(30) }
    }
}

/// The response body of every admin server.
pub type AdminBody = Full<Bytes>;

type Handler = fn(&Shared, &Request<Incoming>) -> Response<AdminBody>;

/// When the process's servers started (the first of them to start), for `uptime`.
pub fn started_at() -> (SystemTime, Instant) {
    static STARTED: OnceLock<(SystemTime, Instant)> = OnceLock::new();
    *STARTED.get_or_init(|| (SystemTime::now(), Instant::now()))
}

/// Serves the admin API (default [`DEFAULT_ADMIN_ADDR`]) until the drain has
/// started and [`ServeOptions::linger`] has passed.
pub async fn serve_admin(listener: TcpListener, shared: Arc<Shared>) {
    serve_admin_with(listener, shared, ServeOptions::default()).await
}

/// [`serve_admin`] with explicit options.
pub async fn serve_admin_with(listener: TcpListener, shared: Arc<Shared>, options: ServeOptions) {
    serve("admin", listener, shared, options, handlers::admin).await
}

/// Serves `/stats/prometheus` (default [`DEFAULT_METRICS_ADDR`]).
pub async fn serve_metrics(listener: TcpListener, shared: Arc<Shared>) {
    serve_metrics_with(listener, shared, ServeOptions::default()).await
}

/// [`serve_metrics`] with explicit options.
pub async fn serve_metrics_with(listener: TcpListener, shared: Arc<Shared>, options: ServeOptions) {
    serve("metrics", listener, shared, options, handlers::metrics).await
}

/// Serves `/healthz/ready` (default [`DEFAULT_HEALTH_ADDR`]).
pub async fn serve_health(listener: TcpListener, shared: Arc<Shared>) {
    serve_health_with(listener, shared, ServeOptions::default()).await
}

/// [`serve_health`] with explicit options.
pub async fn serve_health_with(listener: TcpListener, shared: Arc<Shared>, options: ServeOptions) {
    serve("health", listener, shared, options, handlers::health).await
}

async fn serve(
    server: &'static str,
    listener: TcpListener,
    shared: Arc<Shared>,
    options: ServeOptions,
    handler: Handler,
) {
    started_at();
    let addr = listener.local_addr().ok();
    tracing::info!(server, ?addr, "listening");
    // Connections close (once their request in flight is answered) when this flips.
    let (stop_tx, stop_rx) = watch::channel(false);
    let drain = shared.drain.clone();
    let stop = async move {
        drain.signaled().await;
        tokio::time::sleep(options.linger).await;
    };
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    tokio::spawn(serve_connection(server, stream, peer, shared.clone(), handler, options, stop_rx.clone()));
                }
                Err(error) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    tracing::warn!(server, %error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    drop(listener);
    stop_tx.send_replace(true);
    tracing::info!(server, ?addr, "draining: stopped accepting");
}

async fn serve_connection(
    server: &'static str,
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    handler: Handler,
    options: ServeOptions,
    mut stop: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |req: Request<Incoming>| {
        let response = handler(&shared, &req);
        std::future::ready(Ok::<_, Infallible>(response))
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let stopped = async move {
        // Err: the server is gone without a word; close as well.
        let _ = stop.wait_for(|stop| *stop).await;
    };
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = stopped => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(server, %peer, %error, "connection ended with an error");
    }
}
