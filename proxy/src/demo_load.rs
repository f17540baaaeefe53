//! A small HTTP load loop: the engine behind `serin demo`'s built-in traffic and the
//! `serin-load` benchmark tool (crate `serin-benches`, which adds histograms, reports
//! and a CLI on top of it).
//!
//! [`run_load`] drives `connections` request slots against one address. Each slot has
//! at most one request in flight. In HTTP/1.1 every slot owns a keep-alive
//! connection; in HTTP/2 (h2c, prior knowledge) the slots share a few multiplexed
//! connections.
//!
//! - **Closed loop** ([`Rate::Max`]): a slot sends its next request as soon as the
//!   previous answer is read.
//! - **Open loop** ([`Rate::PerSecond`]): requests are sent on a fixed schedule
//!   (spread evenly over the slots) whatever the answers do. Latency is measured
//!   from each request's *intended* send time when the slot was running behind
//!   schedule, so a stalled server shows up as latency instead of silently lowering
//!   the request rate (the "coordinated omission" correction). When the slot was
//!   idle and only our own timer woke it late, latency is measured from the actual
//!   send, so timer slack is not blamed on the server.
//!
//! Every finished request (answer or failure) is handed to the slot's own
//! [`Recorder`], with the status, the answering version (the `x-version` response
//! header, else the `version` field of a JSON body) and the latency. Recorders are
//! per slot, so recording needs no lock; [`run_load`] returns them all at the end.
//!
//! The run ends by itself: after `duration`, after `max_requests`, or when `stop`
//! turns true, whichever comes first. A stuck peer cannot keep it running: each
//! request is bounded by `timeout`, and an open-loop run that has fallen behind
//! stops at `duration + timeout`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), serin::demo_load::LoadError> {
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicU64, Ordering};
//! use serin::demo_load::{LoadConfig, Outcome, Rate, run_load};
//!
//! let mut cfg = LoadConfig::new("127.0.0.1:15001".parse().unwrap(), "payment");
//! cfg.rate = Rate::PerSecond(50);
//! cfg.connections = 4;
//! let (stop_tx, stop) = tokio::sync::watch::channel(false);
//! let v2 = Arc::new(AtomicU64::new(0));
//! let counter = v2.clone();
//! let run = run_load(cfg, stop, move |_slot| {
//!     let v2 = counter.clone();
//!     move |o: &Outcome<'_>| {
//!         if o.version == Some("v2") {
//!             v2.fetch_add(1, Ordering::Relaxed);
//!         }
//!     }
//! });
//! // … later: stop_tx.send_replace(true);
//! # drop(stop_tx);
//! run.await?;
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::HOST;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::debug;

use crate::demo_app::X_VERSION;

/// Longest body prefix kept to find a `version` field when there is no `x-version`
/// header.
pub const MAX_VERSION_BODY: usize = 64 * 1024;
/// First wait after a failed connect; doubles up to [`MAX_RECONNECT_BACKOFF`].
pub const MIN_RECONNECT_BACKOFF: Duration = Duration::from_millis(10);
/// Longest wait between failed connects.
pub const MAX_RECONNECT_BACKOFF: Duration = Duration::from_secs(1);

/// The HTTP version spoken to the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// HTTP/1.1 with keep-alive, one connection per slot.
    #[default]
    Http1,
    /// HTTP/2 over cleartext with prior knowledge (h2c), slots sharing connections.
    Http2,
}

/// How fast to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rate {
    /// Closed loop: each slot sends again as soon as it has its answer.
    Max,
    /// Open loop: this many requests per second in total, on a fixed schedule.
    PerSecond(u32),
}

/// What to send, where, how fast and for how long.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Address to connect to (e.g. the sidecar's outbound port).
    pub target: SocketAddr,
    /// `Host` header (HTTP/1.1) or `:authority` (HTTP/2): what the proxy routes by.
    pub authority: String,
    /// Path and query, starting with `/`.
    pub path: String,
    /// Request method; requests carry no body.
    pub method: Method,
    /// Extra request headers.
    pub headers: HeaderMap,
    /// HTTP/1.1 or h2c.
    pub protocol: Protocol,
    /// Request slots (concurrent requests); in HTTP/1.1 also the connection count.
    pub connections: usize,
    /// HTTP/2 connections the slots share; `None`: one per 32 slots, at least one.
    pub h2_connections: Option<usize>,
    /// Closed or open loop.
    pub rate: Rate,
    /// Stop after this long (for open loop: no request is scheduled after it).
    pub duration: Option<Duration>,
    /// Stop after this many requests in total.
    pub max_requests: Option<u64>,
    /// Bound on one request (connect, send and reading the whole answer).
    pub timeout: Duration,
}

impl LoadConfig {
    /// `GET /` over HTTP/1.1, one connection, closed loop, 10 s request timeout, and
    /// no end but the `stop` signal.
    pub fn new(target: SocketAddr, authority: impl Into<String>) -> LoadConfig {
        LoadConfig {
            target,
            authority: authority.into(),
            path: "/".to_owned(),
            method: Method::GET,
            headers: HeaderMap::new(),
            protocol: Protocol::Http1,
            connections: 1,
            h2_connections: None,
            rate: Rate::Max,
            duration: None,
            max_requests: None,
            timeout: Duration::from_secs(10),
        }
    }

    fn h2_connection_count(&self) -> usize {
        self.h2_connections.unwrap_or(self.connections.div_ceil(32)).clamp(1, self.connections.max(1))
    }
}

/// Why a load run could not start.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// `connections` is 0.
    #[error("load: at least one connection is needed")]
    NoConnections,
    /// `Rate::PerSecond(0)`.
    #[error("load: the request rate must be above 0 (or max)")]
    ZeroRate,
    /// The timeout is zero.
    #[error("load: the request timeout must be above 0")]
    ZeroTimeout,
    /// The path does not start with `/`.
    #[error("load: the request path {0:?} must start with '/'")]
    Path(String),
    /// Authority or path do not make a valid request.
    #[error("load: invalid request target (authority {authority:?}, path {path:?})")]
    Request {
        /// The configured authority.
        authority: String,
        /// The configured path.
        path: String,
        /// What was wrong.
        source: http::Error,
    },
}

/// Why one request got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestError {
    /// TCP connect or HTTP handshake failed.
    Connect,
    /// No whole answer within the timeout.
    Timeout,
    /// The connection failed while sending or before the answer's head arrived.
    Send,
    /// The answer's body failed midway.
    Body,
}

impl RequestError {
    /// A short, stable name (`connect`, `timeout`, `send`, `body`).
    pub fn as_str(self) -> &'static str {
        match self {
            RequestError::Connect => "connect",
            RequestError::Timeout => "timeout",
            RequestError::Send => "send",
            RequestError::Body => "body",
        }
    }
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One finished request.
#[derive(Debug, Clone, Copy)]
pub struct Outcome<'a> {
    /// The answer's status, or why there was none.
    pub result: Result<StatusCode, RequestError>,
    /// The version that answered: `x-version` header, else the JSON body's `version`.
    pub version: Option<&'a str>,
    /// Latency as the client saw it (from the intended send time when the open loop
    /// was behind schedule, see the module docs).
    pub latency: Duration,
    /// From the actual send to the end of the answer (uncorrected).
    pub service_time: Duration,
}

/// Receives the outcomes of one slot; one recorder per slot, so no locking needed.
pub trait Recorder: Send + 'static {
    /// Called once per finished (or failed) request.
    fn record(&mut self, outcome: &Outcome<'_>);
}

impl<F> Recorder for F
where
    F: FnMut(&Outcome<'_>) + Send + 'static,
{
    fn record(&mut self, outcome: &Outcome<'_>) {
        self(outcome)
    }
}

/// What a finished run hands back.
#[derive(Debug)]
pub struct LoadRun<R> {
    /// The slots' recorders, in slot order.
    pub recorders: Vec<R>,
    /// From the start of sending (after the first connects) to the last answer.
    pub elapsed: Duration,
}

type ReqBody = Empty<Bytes>;

/// Everything the slots share.
struct Ctx {
    cfg: LoadConfig,
    template: Request<()>,
    issued: AtomicU64,
    start: Instant,
    deadline: Option<Instant>,
    hard_stop: Option<Instant>,
}

impl Ctx {
    /// Takes one request from the `max_requests` budget.
    fn claim(&self) -> bool {
        match self.cfg.max_requests {
            None => true,
            Some(max) => self.issued.fetch_add(1, Ordering::Relaxed) < max,
        }
    }

    fn request(&self) -> Request<ReqBody> {
        let mut req = Request::new(Empty::new());
        *req.method_mut() = self.template.method().clone();
        *req.uri_mut() = self.template.uri().clone();
        *req.headers_mut() = self.template.headers().clone();
        req
    }
}

/// Builds the request every slot sends (method, URI, headers).
fn template(cfg: &LoadConfig) -> Result<Request<()>, LoadError> {
    let err =
        |source: http::Error| LoadError::Request { authority: cfg.authority.clone(), path: cfg.path.clone(), source };
    if !cfg.path.starts_with('/') {
        return Err(LoadError::Path(cfg.path.clone()));
    }
    let mut builder = Request::builder().method(cfg.method.clone());
    builder = match cfg.protocol {
        Protocol::Http1 => builder.uri(cfg.path.as_str()).header(HOST, cfg.authority.as_str()),
        Protocol::Http2 => builder.uri(format!("http://{}{}", cfg.authority, cfg.path)),
    };
    let mut req = builder.body(()).map_err(err)?;
    // A configured header replaces a default one of the same name (e.g. `host`).
    for name in cfg.headers.keys() {
        req.headers_mut().remove(name);
    }
    for (name, value) in &cfg.headers {
        req.headers_mut().append(name.clone(), value.clone());
    }
    Ok(req)
}

/// Runs the load described by `cfg` until it ends by itself or `stop` turns true.
///
/// `make_recorder(slot)` is called once per slot before the start. Connections are
/// opened before the clock starts; a slot whose first connect fails retries (and
/// records the failure) when it sends.
pub async fn run_load<R, M>(
    cfg: LoadConfig,
    stop: watch::Receiver<bool>,
    mut make_recorder: M,
) -> Result<LoadRun<R>, LoadError>
where
    R: Recorder,
    M: FnMut(usize) -> R,
{
    if cfg.connections == 0 {
        return Err(LoadError::NoConnections);
    }
    if cfg.rate == Rate::PerSecond(0) {
        return Err(LoadError::ZeroRate);
    }
    if cfg.timeout.is_zero() {
        return Err(LoadError::ZeroTimeout);
    }
    let template = template(&cfg)?;
    let slots = cfg.connections;

    // Connect before the clock starts.
    let conns: Vec<SlotConn> = match cfg.protocol {
        Protocol::Http1 => {
            let connects = (0..slots).map(|_| async {
                let sender = tokio::time::timeout(cfg.timeout, connect_h1(cfg.target)).await.ok().and_then(Result::ok);
                SlotConn::H1(sender)
            });
            futures_util::future::join_all(connects).await
        }
        Protocol::Http2 => {
            let shared = (0..cfg.h2_connection_count()).map(|_| async {
                let sender = tokio::time::timeout(cfg.timeout, connect_h2(cfg.target)).await.ok().and_then(Result::ok);
                Arc::new(H2Shared { target: cfg.target, timeout: cfg.timeout, conn: tokio::sync::Mutex::new(sender) })
            });
            let shared = futures_util::future::join_all(shared).await;
            let mut conns = Vec::with_capacity(slots);
            for slot in 0..slots {
                let shared = shared[slot % shared.len()].clone();
                let cached = shared.conn.lock().await.clone();
                conns.push(SlotConn::H2 { shared, cached });
            }
            conns
        }
    };

    let start = Instant::now();
    let deadline = cfg.duration.map(|d| start + d);
    let hard_stop = deadline.map(|d| d + cfg.timeout);
    let ctx = Arc::new(Ctx { cfg, template, issued: AtomicU64::new(0), start, deadline, hard_stop });
    let mut tasks = Vec::with_capacity(slots);
    for (slot, conn) in conns.into_iter().enumerate() {
        let recorder = make_recorder(slot);
        tasks.push(tokio::spawn(run_slot(slot, ctx.clone(), conn, recorder, stop.clone())));
    }
    let mut recorders = Vec::with_capacity(slots);
    for task in tasks {
        match task.await {
            Ok(r) => recorders.push(r),
            // A panicking recorder: re-raise it here rather than lose it.
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => debug!(error = %e, "load slot cancelled"),
        }
    }
    Ok(LoadRun { recorders, elapsed: start.elapsed() })
}

/// Resolves when `stop` is (or turns) true; never if its sender is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn run_slot<R: Recorder>(
    slot: usize,
    ctx: Arc<Ctx>,
    mut conn: SlotConn,
    mut recorder: R,
    mut stop: watch::Receiver<bool>,
) -> R {
    let schedule = match ctx.cfg.rate {
        Rate::Max => None,
        Rate::PerSecond(rate) => {
            let rate = f64::from(rate);
            let interval = Duration::from_secs_f64(ctx.cfg.connections as f64 / rate);
            Some((ctx.start + Duration::from_secs_f64(slot as f64 / rate), interval))
        }
    };
    let (mut intended, interval) = match schedule {
        Some((first, interval)) => (Some(first), interval),
        None => (None, Duration::ZERO),
    };
    let mut buf = BytesMut::new();
    let mut backoff = MIN_RECONNECT_BACKOFF;
    loop {
        if *stop.borrow() {
            break;
        }
        let now = Instant::now();
        if ctx.hard_stop.is_some_and(|h| now >= h) {
            break;
        }
        match (intended, ctx.deadline) {
            (Some(t), Some(d)) if t >= d => break,
            (None, Some(d)) if now >= d => break,
            _ => {}
        }
        if !ctx.claim() {
            break;
        }
        // Open loop: wait for the scheduled time unless already behind it.
        let behind = match intended {
            Some(t) if now < t => {
                tokio::select! {
                    () = tokio::time::sleep_until(t) => {}
                    () = stopped(&mut stop) => break,
                }
                false
            }
            Some(_) => true,
            None => false,
        };
        let sent_at = Instant::now();
        let result = tokio::select! {
            r = tokio::time::timeout(ctx.cfg.timeout, exchange(&ctx, &mut conn, &mut buf)) => r,
            () = stopped(&mut stop) => break,
        };
        let done = Instant::now();
        let service_time = done - sent_at;
        let latency = match intended {
            Some(t) if behind => done - t,
            _ => service_time,
        };
        let result = match result {
            Ok(r) => r,
            Err(_elapsed) => {
                // Whatever was half sent is lost with the connection.
                conn.reset();
                Err(RequestError::Timeout)
            }
        };
        match result {
            Ok(parts) => {
                backoff = MIN_RECONNECT_BACKOFF;
                let version = response_version(&parts.headers, &buf);
                recorder.record(&Outcome { result: Ok(parts.status), version, latency, service_time });
            }
            Err(e) => {
                recorder.record(&Outcome { result: Err(e), version: None, latency, service_time });
                if e == RequestError::Connect {
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = stopped(&mut stop) => break,
                    }
                    backoff = (backoff * 2).min(MAX_RECONNECT_BACKOFF);
                    // Requests scheduled while the target was unreachable failed too.
                    if let Some(t) = intended.as_mut() {
                        let now = Instant::now();
                        while *t + interval < now && ctx.deadline.is_none_or(|d| *t + interval < d) && ctx.claim() {
                            *t += interval;
                            let skipped = Outcome {
                                result: Err(RequestError::Connect),
                                version: None,
                                latency: now - *t,
                                service_time: Duration::ZERO,
                            };
                            recorder.record(&skipped);
                        }
                    }
                }
            }
        }
        if let Some(t) = intended.as_mut() {
            *t += interval;
        }
    }
    recorder
}

/// The version that answered: `x-version`, else the `version` field of a JSON body.
fn response_version<'a>(headers: &'a HeaderMap, body: &'a [u8]) -> Option<&'a str> {
    if let Some(v) = headers.get(X_VERSION) {
        return v.to_str().ok();
    }
    #[derive(Deserialize)]
    struct Versioned<'a> {
        #[serde(borrow)]
        version: Option<&'a str>,
    }
    if body.first() != Some(&b'{') {
        return None;
    }
    serde_json::from_slice::<Versioned<'_>>(body).ok().and_then(|v| v.version)
}

/// Sends one request and reads the whole answer; keeps a body prefix in `buf` when
/// the version must be read from it.
async fn exchange(ctx: &Ctx, conn: &mut SlotConn, buf: &mut BytesMut) -> Result<http::response::Parts, RequestError> {
    let req = ctx.request();
    let resp = match conn {
        SlotConn::H1(sender) => {
            // A keep-alive connection the peer closed while idle is replaced silently.
            let usable = match sender {
                Some(s) => s.ready().await.is_ok(),
                None => false,
            };
            if !usable {
                *sender = Some(connect_h1(ctx.cfg.target).await.map_err(|e| {
                    debug!(target = %ctx.cfg.target, error = %e, "load: connect failed");
                    RequestError::Connect
                })?);
            }
            let s = sender.as_mut().ok_or(RequestError::Connect)?;
            match s.send_request(req).await {
                Ok(resp) => resp,
                Err(e) => {
                    debug!(error = %e, "load: HTTP/1.1 request failed");
                    *sender = None;
                    return Err(RequestError::Send);
                }
            }
        }
        SlotConn::H2 { shared, cached } => {
            let mut s = match cached.as_ref().filter(|s| !s.is_closed()) {
                Some(s) => s.clone(),
                None => {
                    let s = shared.get().await?;
                    *cached = Some(s.clone());
                    s
                }
            };
            if let Err(e) = s.ready().await {
                debug!(error = %e, "load: HTTP/2 connection unusable");
                *cached = None;
                return Err(RequestError::Send);
            }
            match s.send_request(req).await {
                Ok(resp) => resp,
                Err(e) => {
                    debug!(error = %e, "load: HTTP/2 request failed");
                    return Err(RequestError::Send);
                }
            }
        }
    };
    let (parts, mut body) = resp.into_parts();
    let keep = !parts.headers.contains_key(X_VERSION);
    buf.clear();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            debug!(error = %e, "load: response body failed");
            RequestError::Body
        })?;
        if keep
            && let Some(data) = frame.data_ref()
            && buf.len() < MAX_VERSION_BODY
        {
            let room = MAX_VERSION_BODY - buf.len();
            buf.extend_from_slice(&data[..data.len().min(room)]);
        }
    }
    Ok(parts)
}

/// A slot's connection.
enum SlotConn {
    /// Its own HTTP/1.1 connection (`None`: to be opened).
    H1(Option<http1::SendRequest<ReqBody>>),
    /// A handle on a shared HTTP/2 connection.
    H2 { shared: Arc<H2Shared>, cached: Option<http2::SendRequest<ReqBody>> },
}

impl SlotConn {
    /// Drops the slot's connection after a timeout.
    fn reset(&mut self) {
        match self {
            SlotConn::H1(sender) => *sender = None,
            // The stream was reset when its future was dropped; the connection stays.
            SlotConn::H2 { .. } => {}
        }
    }
}

/// One HTTP/2 connection shared by several slots, reopened by whichever slot first
/// finds it closed.
struct H2Shared {
    target: SocketAddr,
    timeout: Duration,
    conn: tokio::sync::Mutex<Option<http2::SendRequest<ReqBody>>>,
}

impl H2Shared {
    async fn get(&self) -> Result<http2::SendRequest<ReqBody>, RequestError> {
        let mut conn = self.conn.lock().await;
        if let Some(s) = conn.as_ref().filter(|s| !s.is_closed()) {
            return Ok(s.clone());
        }
        *conn = None;
        let s = tokio::time::timeout(self.timeout, connect_h2(self.target))
            .await
            .map_err(|_| RequestError::Connect)?
            .map_err(|e| {
            debug!(target = %self.target, error = %e, "load: HTTP/2 connect failed");
            RequestError::Connect
        })?;
        *conn = Some(s.clone());
        Ok(s)
    }
}

/// A connect or handshake failure.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("connect: {0}")]
    Tcp(#[from] std::io::Error),
    #[error("handshake: {0}")]
    Handshake(#[from] hyper::Error),
}

async fn tcp(target: SocketAddr) -> Result<TokioIo<TcpStream>, ConnectError> {
    let stream = TcpStream::connect(target).await?;
    stream.set_nodelay(true)?;
    Ok(TokioIo::new(stream))
}

async fn connect_h1(target: SocketAddr) -> Result<http1::SendRequest<ReqBody>, ConnectError> {
    let (sender, conn) = http1::handshake(tcp(target).await?).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!(error = %e, "load: HTTP/1.1 connection ended");
        }
    });
    Ok(sender)
}

async fn connect_h2(target: SocketAddr) -> Result<http2::SendRequest<ReqBody>, ConnectError> {
    let (sender, conn) = http2::handshake(TokioExecutor::new(), tcp(target).await?).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!(error = %e, "load: HTTP/2 connection ended");
        }
    });
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn version_from_header_or_body() {
        let mut h = HeaderMap::new();
        assert_eq!(response_version(&h, br#"{"service":"payment","version":"v2"}"#), Some("v2"));
        assert_eq!(response_version(&h, b"no healthy upstream"), None);
        assert_eq!(response_version(&h, br#"{"service":"payment"}"#), None);
        h.insert(X_VERSION, HeaderValue::from_static("v1"));
        assert_eq!(response_version(&h, br#"{"version":"v2"}"#), Some("v1"));
    }

    #[test]
    fn request_templates() {
        let mut cfg = LoadConfig::new("127.0.0.1:1".parse().unwrap(), "payment");
        cfg.path = "/pay?x=1".into();
        cfg.headers.insert("x-test", HeaderValue::from_static("1"));
        let t = template(&cfg).unwrap();
        assert_eq!(t.uri(), "/pay?x=1");
        assert_eq!(t.headers()[HOST], "payment");
        assert_eq!(t.headers()["x-test"], "1");
        let mut host = cfg.clone();
        host.headers.insert(HOST, HeaderValue::from_static("other"));
        let t = template(&host).unwrap();
        assert_eq!(t.headers().get_all(HOST).iter().collect::<Vec<_>>(), ["other"]);
        cfg.protocol = Protocol::Http2;
        let t = template(&cfg).unwrap();
        assert_eq!(t.uri(), "http://payment/pay?x=1");
        assert!(t.headers().get(HOST).is_none());
        cfg.path = "pay".into();
        assert!(template(&cfg).is_err());
    }

    #[test]
    fn h2_connection_counts() {
        let mut cfg = LoadConfig::new("127.0.0.1:1".parse().unwrap(), "payment");
        cfg.connections = 64;
        assert_eq!(cfg.h2_connection_count(), 2);
        cfg.connections = 1;
        assert_eq!(cfg.h2_connection_count(), 1);
        cfg.h2_connections = Some(100);
        assert_eq!(cfg.h2_connection_count(), 1);
    }
}
