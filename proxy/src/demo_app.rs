//! The demo upstream: a tiny `payment` service, one version of it, used by
//! `serin upstream`, by `serin demo` and by the tests as a real peer behind the proxy.
//!
//! One port speaks HTTP/1.1 (keep-alive, chunked bodies, WebSocket upgrade) and h2c
//! (HTTP/2 with prior knowledge). What it answers:
//!
//! | request | answer |
//! | --- | --- |
//! | any path | `200`, `{"service":"payment","version":"v1","pod":"…"}` (padded to `--body-size`) |
//! | `/echo` | `200`, the request's method, path, headers, trailers and body as JSON |
//! | `/status/NNN` | status `NNN` with a small JSON body |
//! | `/delay/MS` | sleeps `MS` milliseconds, then answers as for any path |
//! | `/ws` + `Upgrade: websocket` | `101`, then echoes every text/binary message |
//! | `content-type: application/grpc…` | `200` + trailers `grpc-status: 0`, echoing the request's gRPC frames (or one empty message) |
//!
//! Every response carries `x-service`, `x-version` and `x-pod` headers, so a client can
//! tell which version answered without parsing the body. With an error rate `p`, each
//! request (except the WebSocket handshake) fails with probability `p`: `503` and a
//! JSON error body, or for gRPC `grpc-status: 14` (UNAVAILABLE). A configured latency
//! delays every such request before it is answered.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use http::header::{CONNECTION, CONTENT_TYPE, HeaderName, HeaderValue, SEC_WEBSOCKET_ACCEPT, UPGRADE};
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body::Frame;
use http_body_util::{BodyExt, Limited, StreamBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tracing::{debug, info, warn};

use crate::body::{BoxError, ProxyBody, boxed, empty, full};
use crate::graceful::GracefulShutdown;

/// Largest request body `/echo` and gRPC requests buffer; larger ones get 413 /
/// `grpc-status: 8`.
pub const MAX_BUFFERED_BODY: usize = 1024 * 1024;
/// Longest delay `/delay/MS` accepts.
pub const MAX_DELAY: Duration = Duration::from_secs(600);
/// Largest WebSocket message (and frame) the `/ws` echo accepts.
pub const MAX_WS_MESSAGE: usize = 1024 * 1024;
/// How long a shutdown waits for open connections to finish their requests.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Response header naming the service that answered.
pub const X_SERVICE: HeaderName = HeaderName::from_static("x-service");
/// Response header naming the version that answered (what a canary's share is counted by).
pub const X_VERSION: HeaderName = HeaderName::from_static("x-version");
/// Response header naming the pod that answered.
pub const X_POD: HeaderName = HeaderName::from_static("x-pod");

const APPLICATION_JSON: HeaderValue = HeaderValue::from_static("application/json");
const APPLICATION_GRPC: HeaderValue = HeaderValue::from_static("application/grpc");
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
/// gRPC's UNAVAILABLE: what an injected fault answers.
const GRPC_UNAVAILABLE: &str = "14";
/// gRPC's RESOURCE_EXHAUSTED: a request message over [`MAX_BUFFERED_BODY`].
const GRPC_RESOURCE_EXHAUSTED: &str = "8";
/// gRPC's INTERNAL: a request body that could not be read.
const GRPC_INTERNAL: &str = "13";

/// `serin upstream`: run the demo payment service.
#[derive(Debug, Clone, clap::Args)]
pub struct UpstreamArgs {
    /// Service name reported in every answer.
    #[arg(long, default_value = "payment")]
    pub service: String,
    /// Version reported in every answer (the canary subset, e.g. v1 or v2).
    #[arg(long, default_value = "v1")]
    pub version: String,
    /// Address to listen on, e.g. 127.0.0.1:9080.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Pod name reported in every answer [default: <service>-<version>-<port>].
    #[arg(long)]
    pub pod: Option<String>,
    /// Share of requests answered with an injected failure (503, or grpc-status 14), 0..=1.
    #[arg(long, default_value_t = 0.0, value_parser = parse_probability)]
    pub error_rate: f64,
    /// Delay added before every answer, e.g. 20ms.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub latency: Duration,
    /// Pad the default JSON answer to this many bytes (0: no padding).
    #[arg(long, default_value_t = 0)]
    pub body_size: usize,
}

/// Parses a probability in `0..=1`.
fn parse_probability(s: &str) -> Result<f64, String> {
    let p: f64 = s.trim().parse().map_err(|e| format!("not a number: {e}"))?;
    if (0.0..=1.0).contains(&p) { Ok(p) } else { Err(format!("{p} is not within 0..=1")) }
}

/// What the demo app answers as.
#[derive(Debug, Clone, PartialEq)]
pub struct AppConfig {
    /// Service name, e.g. `payment`.
    pub service: String,
    /// Version, e.g. `v1`.
    pub version: String,
    /// Pod name; `None` means `<service>-<version>-<port>` with the listening port.
    pub pod: Option<String>,
    /// Probability (0..=1) that a request fails with an injected fault.
    pub error_rate: f64,
    /// Delay before every answer.
    pub latency: Duration,
    /// Size to pad the default JSON answer to (0: unpadded).
    pub body_size: usize,
}

impl AppConfig {
    /// A healthy, fast, unpadded `service`/`version`, with the default pod name.
    pub fn new(service: impl Into<String>, version: impl Into<String>) -> AppConfig {
        AppConfig {
            service: service.into(),
            version: version.into(),
            pod: None,
            error_rate: 0.0,
            latency: Duration::ZERO,
            body_size: 0,
        }
    }

    /// The pod name this config answers with when listening on `port`.
    pub fn pod_name(&self, port: u16) -> String {
        match &self.pod {
            Some(pod) => pod.clone(),
            None => format!("{}-{}-{}", self.service, self.version, port),
        }
    }
}

impl Default for AppConfig {
    /// `payment` `v1`.
    fn default() -> Self {
        AppConfig::new("payment", "v1")
    }
}

impl From<&UpstreamArgs> for AppConfig {
    fn from(args: &UpstreamArgs) -> Self {
        AppConfig {
            service: args.service.clone(),
            version: args.version.clone(),
            pod: args.pod.clone(),
            error_rate: args.error_rate,
            latency: args.latency,
            body_size: args.body_size,
        }
    }
}

/// Why the demo app could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoAppError {
    /// The listening socket could not be bound.
    #[error("demo upstream: cannot listen on {addr}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The bind error.
        source: std::io::Error,
    },
    /// The error rate is not a probability.
    #[error("demo upstream: error rate {0} is not within 0..=1")]
    ErrorRate(f64),
}

/// `serin upstream`: binds `--listen`, serves until Ctrl-C or SIGTERM, then drains.
pub async fn run_upstream(args: UpstreamArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;
    // Harmless when the binary already installed a subscriber.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .try_init();
    let cfg = AppConfig::from(&args);
    check_config(&cfg)?;
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|source| DemoAppError::Bind { addr: args.listen, source })
        .context("starting `serin upstream`")?;
    serve(listener, cfg, shutdown_signal()).await;
    Ok(())
}

/// Resolves on Ctrl-C or (on Unix) SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            warn!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => info!("Ctrl-C: shutting down"),
        _ = term => info!("SIGTERM: shutting down"),
    }
}

fn check_config(cfg: &AppConfig) -> Result<(), DemoAppError> {
    if (0.0..=1.0).contains(&cfg.error_rate) { Ok(()) } else { Err(DemoAppError::ErrorRate(cfg.error_rate)) }
}

/// Serves the demo app on `listener` until `shutdown` resolves, then stops accepting
/// and gives open connections up to [`SHUTDOWN_GRACE`] to finish.
///
/// Accept errors are logged and retried; per-connection errors are logged at debug
/// level. An error rate outside `0..=1` is clamped.
pub async fn serve(listener: TcpListener, cfg: AppConfig, shutdown: impl Future<Output = ()>) {
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let app = Arc::new(App::new(cfg, port));
    info!(
        addr = ?listener.local_addr().ok(),
        service = %app.cfg.service,
        version = %app.cfg.version,
        pod = %app.pod,
        error_rate = app.cfg.error_rate,
        latency = ?app.cfg.latency,
        "demo upstream listening (HTTP/1.1 + h2c)"
    );
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if let Err(e) = stream.set_nodelay(true) {
                        debug!(%peer, error = %e, "set TCP_NODELAY failed");
                    }
                    let app = app.clone();
                    let service = service_fn(move |req| handle(req, app.clone()));
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
                    let conn = graceful.watch(conn);
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            debug!(%peer, error = %e, "demo upstream connection ended with an error");
                        }
                    });
                }
                Err(e) => {
                    // E.g. EMFILE: back off instead of spinning.
                    warn!(error = %e, "demo upstream: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    drop(listener);
    info!(pod = %app.pod, open = graceful.count(), "demo upstream draining");
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await.is_err() {
        warn!(pod = %app.pod, "demo upstream: connections still open after the grace period");
    }
}

/// A demo app running in the background (for tests and `serin demo`); dropping it
/// stops it.
#[derive(Debug)]
pub struct DemoApp {
    addr: SocketAddr,
    pod: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl DemoApp {
    /// Binds `listen` (port 0 picks a free port) and serves `cfg` on a spawned task.
    pub async fn start(listen: SocketAddr, cfg: AppConfig) -> Result<DemoApp, DemoAppError> {
        check_config(&cfg)?;
        let listener = TcpListener::bind(listen).await.map_err(|source| DemoAppError::Bind { addr: listen, source })?;
        let addr = listener.local_addr().map_err(|source| DemoAppError::Bind { addr: listen, source })?;
        let pod = cfg.pod_name(addr.port());
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(serve(listener, cfg, async move {
            let _ = stopped.await;
        }));
        Ok(DemoApp { addr, pod, stop: Some(stop), task: Some(task) })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The pod name it answers with.
    pub fn pod(&self) -> &str {
        &self.pod
    }

    /// Stops accepting and waits until open connections are drained (at most
    /// [`SHUTDOWN_GRACE`]).
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take()
            && let Err(e) = task.await
        {
            warn!(error = %e, "demo upstream task failed");
        }
    }
}

impl Drop for DemoApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Shared, precomputed state of one running app.
#[derive(Debug)]
struct App {
    cfg: AppConfig,
    pod: String,
    service_header: HeaderValue,
    version_header: HeaderValue,
    pod_header: HeaderValue,
    ok_body: Bytes,
    error_body: Bytes,
}

#[derive(Serialize)]
struct Identity<'a> {
    service: &'a str,
    version: &'a str,
    pod: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pad: &'a str,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    service: &'a str,
    version: &'a str,
    pod: &'a str,
}

#[derive(Serialize)]
struct StatusBody<'a> {
    service: &'a str,
    version: &'a str,
    pod: &'a str,
    status: u16,
}

#[derive(Serialize)]
struct EchoBody<'a> {
    service: &'a str,
    version: &'a str,
    pod: &'a str,
    method: &'a str,
    path: &'a str,
    query: Option<&'a str>,
    http_version: &'static str,
    /// The `Host` header, or the URI's authority (HTTP/2's `:authority`).
    authority: Option<&'a str>,
    headers: serde_json::Map<String, serde_json::Value>,
    trailers: serde_json::Map<String, serde_json::Value>,
    body: String,
    body_bytes: usize,
}

impl App {
    fn new(mut cfg: AppConfig, port: u16) -> App {
        if !(0.0..=1.0).contains(&cfg.error_rate) {
            warn!(error_rate = cfg.error_rate, "error rate outside 0..=1; clamped");
            cfg.error_rate = if cfg.error_rate > 1.0 { 1.0 } else { 0.0 };
        }
        let pod = cfg.pod_name(port);
        let ok_body = identity_body(&cfg.service, &cfg.version, &pod, cfg.body_size);
        let error_body =
            json_bytes(&ErrorBody { error: "injected fault", service: &cfg.service, version: &cfg.version, pod: &pod });
        App {
            service_header: header_value(&cfg.service),
            version_header: header_value(&cfg.version),
            pod_header: header_value(&pod),
            pod,
            ok_body,
            error_body,
            cfg,
        }
    }

    /// Whether this request gets an injected fault.
    fn inject_fault(&self) -> bool {
        self.cfg.error_rate > 0.0 && rand::random::<f64>() < self.cfg.error_rate
    }

    /// A response with the identity headers set.
    fn response(&self, status: StatusCode, content_type: HeaderValue, body: ProxyBody) -> Response<ProxyBody> {
        let mut resp = Response::new(body);
        *resp.status_mut() = status;
        let headers = resp.headers_mut();
        headers.insert(CONTENT_TYPE, content_type);
        headers.insert(X_SERVICE, self.service_header.clone());
        headers.insert(X_VERSION, self.version_header.clone());
        headers.insert(X_POD, self.pod_header.clone());
        resp
    }

    fn json(&self, status: StatusCode, body: Bytes) -> Response<ProxyBody> {
        self.response(status, APPLICATION_JSON, full(body))
    }

    fn fault(&self) -> Response<ProxyBody> {
        self.json(StatusCode::SERVICE_UNAVAILABLE, self.error_body.clone())
    }

    fn error(&self, status: StatusCode, message: &str) -> Response<ProxyBody> {
        let body = json_bytes(&ErrorBody {
            error: message,
            service: &self.cfg.service,
            version: &self.cfg.version,
            pod: &self.pod,
        });
        self.json(status, body)
    }
}

/// The identity JSON, padded with a `pad` field to `size` bytes when it is shorter.
fn identity_body(service: &str, version: &str, pod: &str, size: usize) -> Bytes {
    let bare = json_bytes(&Identity { service, version, pod, pad: "" });
    // `,"pad":""` adds 9 bytes before any padding character.
    const PAD_OVERHEAD: usize = 9;
    if size < bare.len() + PAD_OVERHEAD {
        return bare;
    }
    let pad = "x".repeat(size - bare.len() - PAD_OVERHEAD);
    json_bytes(&Identity { service, version, pod, pad: &pad })
}

fn json_bytes<T: Serialize>(value: &T) -> Bytes {
    // Serializing these plain structs of strings and maps cannot fail.
    serde_json::to_vec(value).map(Bytes::from).unwrap_or_else(|_| Bytes::from_static(b"{}"))
}

/// A header value for a name from the command line; invalid characters become `_`.
fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| {
        let cleaned: String = s.chars().map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '_' }).collect();
        HeaderValue::from_str(&cleaned).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
    })
}

async fn handle(req: Request<Incoming>, app: Arc<App>) -> Result<Response<ProxyBody>, Infallible> {
    debug!(method = %req.method(), uri = %req.uri(), version = ?req.version(), "demo upstream request");
    if req.uri().path() == "/ws" {
        return Ok(websocket(req, &app));
    }
    if !app.cfg.latency.is_zero() {
        tokio::time::sleep(app.cfg.latency).await;
    }
    if let Some(ms) = req.uri().path().strip_prefix("/delay/") {
        match ms.parse::<u64>().map(Duration::from_millis) {
            Ok(delay) if delay <= MAX_DELAY => tokio::time::sleep(delay).await,
            _ => {
                drain(req.into_body()).await;
                return Ok(app.error(StatusCode::BAD_REQUEST, "/delay/MS wants milliseconds up to 600000"));
            }
        }
    }
    if is_grpc(req.headers()) {
        return Ok(grpc(req, &app).await);
    }
    if app.inject_fault() {
        drain(req.into_body()).await;
        return Ok(app.fault());
    }
    if let Some(code) = req.uri().path().strip_prefix("/status/") {
        let status = code.parse::<u16>().ok().and_then(|c| StatusCode::from_u16(c).ok()).filter(|s| s.as_u16() >= 200);
        drain(req.into_body()).await;
        return Ok(match status {
            Some(status) if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED => {
                app.response(status, APPLICATION_JSON, empty())
            }
            Some(status) => {
                let body = json_bytes(&StatusBody {
                    service: &app.cfg.service,
                    version: &app.cfg.version,
                    pod: &app.pod,
                    status: status.as_u16(),
                });
                app.json(status, body)
            }
            None => app.error(StatusCode::BAD_REQUEST, "/status/NNN wants a final status code, 200..=999"),
        });
    }
    if req.uri().path() == "/echo" {
        return Ok(echo(req, &app).await);
    }
    drain(req.into_body()).await;
    Ok(app.json(StatusCode::OK, app.ok_body.clone()))
}

/// Reads and discards a request body (so the connection can be reused).
async fn drain(mut body: Incoming) {
    while let Some(frame) = body.frame().await {
        if let Err(e) = frame {
            debug!(error = %e, "demo upstream: request body failed");
            return;
        }
    }
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(CONTENT_TYPE).is_some_and(|ct| ct.as_bytes().starts_with(b"application/grpc"))
}

fn http_version_name(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "unknown",
    }
}

/// Headers as a JSON object; repeated names are joined with `", "`.
fn headers_json(headers: &HeaderMap) -> serde_json::Map<String, serde_json::Value> {
    let mut map = serde_json::Map::new();
    for name in headers.keys() {
        let joined = headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect::<Vec<_>>()
            .join(", ");
        map.insert(name.as_str().to_owned(), serde_json::Value::String(joined));
    }
    map
}

async fn echo(req: Request<Incoming>, app: &App) -> Response<ProxyBody> {
    let (parts, body) = req.into_parts();
    let collected = match Limited::new(body, MAX_BUFFERED_BODY).collect().await {
        Ok(c) => c,
        Err(e) => {
            return if e.is::<http_body_util::LengthLimitError>() {
                app.error(StatusCode::PAYLOAD_TOO_LARGE, "request body over 1 MiB")
            } else {
                debug!(error = %e, "demo upstream: echo body failed");
                app.error(StatusCode::BAD_REQUEST, "request body could not be read")
            };
        }
    };
    let trailers = collected.trailers().map(headers_json).unwrap_or_default();
    let data = collected.to_bytes();
    let authority = parts
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| parts.uri.authority().map(|a| a.as_str()));
    let body = json_bytes(&EchoBody {
        service: &app.cfg.service,
        version: &app.cfg.version,
        pod: &app.pod,
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query(),
        http_version: http_version_name(parts.version),
        authority,
        headers: headers_json(&parts.headers),
        trailers,
        body: String::from_utf8_lossy(&data).into_owned(),
        body_bytes: data.len(),
    });
    app.json(StatusCode::OK, body)
}

/// Whether `data` is a whole sequence of gRPC length-prefixed messages.
fn is_grpc_framed(mut data: &[u8]) -> bool {
    while !data.is_empty() {
        if data.len() < 5 || data[0] > 1 {
            return false;
        }
        let len = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
        match data.get(5..).and_then(|rest| rest.get(len..)) {
            Some(rest) => data = rest,
            None => return false,
        }
    }
    true
}

/// A gRPC answer: the given messages, then trailers with `status` (and `message`).
fn grpc_response(
    app: &App,
    messages: Option<Bytes>,
    status: &'static str,
    message: Option<&str>,
) -> Response<ProxyBody> {
    let mut trailers = HeaderMap::new();
    trailers.insert(GRPC_STATUS, HeaderValue::from_static(status));
    if let Some(m) = message {
        trailers.insert(GRPC_MESSAGE, header_value(m));
    }
    let mut frames: Vec<Result<Frame<Bytes>, BoxError>> = Vec::with_capacity(2);
    if let Some(m) = messages {
        frames.push(Ok(Frame::data(m)));
    }
    frames.push(Ok(Frame::trailers(trailers)));
    let body = boxed(StreamBody::new(futures_util::stream::iter(frames)));
    app.response(StatusCode::OK, APPLICATION_GRPC, body)
}

async fn grpc(req: Request<Incoming>, app: &App) -> Response<ProxyBody> {
    let data = match Limited::new(req.into_body(), MAX_BUFFERED_BODY).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => {
            return if e.is::<http_body_util::LengthLimitError>() {
                grpc_response(app, None, GRPC_RESOURCE_EXHAUSTED, Some("request over 1 MiB"))
            } else {
                debug!(error = %e, "demo upstream: gRPC request body failed");
                grpc_response(app, None, GRPC_INTERNAL, Some("request body could not be read"))
            };
        }
    };
    if app.inject_fault() {
        return grpc_response(app, None, GRPC_UNAVAILABLE, Some("injected fault"));
    }
    let reply = if !data.is_empty() && is_grpc_framed(&data) {
        data
    } else {
        // One empty, uncompressed message.
        let mut empty = BytesMut::with_capacity(5);
        empty.extend_from_slice(&[0, 0, 0, 0, 0]);
        empty.freeze()
    };
    grpc_response(app, Some(reply), "0", None)
}

/// Answers a WebSocket handshake on `/ws` and echoes messages on the upgraded connection.
fn websocket(mut req: Request<Incoming>, app: &App) -> Response<ProxyBody> {
    let headers = req.headers();
    let wants_upgrade = req.method() == Method::GET
        && headers.get(UPGRADE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
        && headers
            .get_all(CONNECTION)
            .iter()
            .any(|v| v.as_bytes().split(|b| *b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade")));
    let key = headers.get(http::header::SEC_WEBSOCKET_KEY).map(|k| k.as_bytes().to_vec());
    let version_ok = headers.get(http::header::SEC_WEBSOCKET_VERSION).is_some_and(|v| v.as_bytes() == b"13");
    let (true, Some(key), true) = (wants_upgrade, key, version_ok) else {
        let mut resp = app.error(
            StatusCode::UPGRADE_REQUIRED,
            "/ws wants GET with Upgrade: websocket, Sec-WebSocket-Key and Sec-WebSocket-Version: 13",
        );
        resp.headers_mut().insert(UPGRADE, HeaderValue::from_static("websocket"));
        resp.headers_mut().insert(http::header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        return resp;
    };
    let accept = derive_accept_key(&key);
    let on_upgrade = hyper::upgrade::on(&mut req);
    let pod = app.pod.clone();
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let config = WebSocketConfig::default()
                    .max_message_size(Some(MAX_WS_MESSAGE))
                    .max_frame_size(Some(MAX_WS_MESSAGE));
                let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await;
                ws_echo(ws, &pod).await;
            }
            Err(e) => debug!(error = %e, "demo upstream: WebSocket upgrade failed"),
        }
    });
    let mut resp = app.response(StatusCode::SWITCHING_PROTOCOLS, APPLICATION_JSON, empty());
    let headers = resp.headers_mut();
    headers.remove(CONTENT_TYPE);
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    match HeaderValue::from_str(&accept) {
        Ok(v) => {
            headers.insert(SEC_WEBSOCKET_ACCEPT, v);
        }
        Err(_) => return app.error(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode Sec-WebSocket-Accept"),
    }
    resp
}

/// Echoes text and binary messages until the peer closes (pings are answered by
/// tungstenite itself).
async fn ws_echo<S>(mut ws: WebSocketStream<S>, pod: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio_tungstenite::tungstenite::Message;
    debug!(%pod, "WebSocket open");
    while let Some(msg) = ws.next().await {
        match msg {
            Ok(msg @ (Message::Text(_) | Message::Binary(_))) => {
                if let Err(e) = ws.send(msg).await {
                    debug!(error = %e, "WebSocket send failed");
                    break;
                }
            }
            // The close reply is queued by tungstenite and flushed by the next poll.
            Ok(Message::Close(_) | Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => {}
            Err(e) => {
                debug!(error = %e, "WebSocket ended");
                break;
            }
        }
    }
    debug!(%pod, "WebSocket closed");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_to_exact_size() {
        for size in [0, 10, 60, 61, 62, 100, 1024, 4096] {
            let body = identity_body("payment", "v1", "payment-v1-9080", size);
            let bare = identity_body("payment", "v1", "payment-v1-9080", 0);
            if size >= bare.len() + 9 {
                assert_eq!(body.len(), size, "size {size}");
            } else {
                assert_eq!(body, bare);
            }
            let v: serde_json::Value = serde_json::from_slice(&body).expect("valid JSON");
            assert_eq!(v["version"], "v1");
        }
    }

    #[test]
    fn grpc_framing() {
        assert!(is_grpc_framed(&[0, 0, 0, 0, 0]));
        assert!(is_grpc_framed(&[0, 0, 0, 0, 2, 8, 1, 0, 0, 0, 0, 0]));
        assert!(!is_grpc_framed(&[0, 0, 0, 0, 3, 8, 1]));
        assert!(!is_grpc_framed(&[0, 0, 0]));
        assert!(!is_grpc_framed(&[7, 0, 0, 0, 0]));
    }

    #[test]
    fn probability_parser() {
        assert_eq!(parse_probability("0.08"), Ok(0.08));
        assert!(parse_probability("1.5").is_err());
        assert!(parse_probability("-0.1").is_err());
        assert!(parse_probability("NaN").is_err());
        assert!(parse_probability("x").is_err());
    }

    #[test]
    fn default_pod_name() {
        assert_eq!(AppConfig::new("payment", "v2").pod_name(9081), "payment-v2-9081");
        let cfg = AppConfig { pod: Some("p-1".into()), ..AppConfig::default() };
        assert_eq!(cfg.pod_name(1), "p-1");
    }
}
