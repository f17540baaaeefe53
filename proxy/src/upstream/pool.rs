//! Upstream connections to one endpoint: a keep-alive pool of HTTP/1.1 connections
//! and one multiplexed HTTP/2 connection, with the DestinationRule's connection limits.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::rt::Executor as _;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};

use crate::body::ProxyBody;
use crate::cork::{ConnExecutor, CorkedTcp};
use crate::snapshot::ConnectionPool;

/// Which HTTP version to speak upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    Http1,
    Http2,
}

/// Why a request could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("connect to {addr} failed: {source}")]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error("connect to {addr} timed out")]
    ConnectTimeout { addr: SocketAddr },
    #[error("pending-request limit reached for {addr}")]
    Overflow { addr: SocketAddr },
    #[error("HTTP handshake with {addr} failed: {source}")]
    Handshake { addr: SocketAddr, source: hyper::Error },
    /// The TLS handshake with an upstream sidecar failed (bad chain, wrong CA, …).
    #[error("mutual TLS handshake with {addr} failed: {source}")]
    Tls { addr: SocketAddr, source: std::io::Error },
    /// The upstream presented another identity than the registry gives for it.
    #[error("upstream {addr} identity check failed: {source}")]
    Identity { addr: SocketAddr, source: Box<serin_certs::PeerIdentityError> },
    /// Mutual TLS is required but this proxy has no workload certificate.
    #[error("mutual TLS to {addr} needs a workload certificate (--cert-dir)")]
    NoIdentity { addr: SocketAddr },
    /// The request was written (maybe partly) and the connection failed.
    #[error("upstream {addr}: {source}")]
    Send { addr: SocketAddr, source: hyper::Error, refused: bool },
    /// The HTTP/2 connect this request waited for, with every other request that
    /// found no connection, failed so.
    #[error(transparent)]
    Shared(Arc<PoolError>),
}

impl PoolError {
    /// Whether nothing reached the upstream application (safe to retry anywhere).
    pub fn is_connect_failure(&self) -> bool {
        matches!(
            self.root(),
            PoolError::Connect { .. }
                | PoolError::ConnectTimeout { .. }
                | PoolError::Handshake { .. }
                | PoolError::Tls { .. }
                | PoolError::Identity { .. }
                | PoolError::NoIdentity { .. }
        )
    }

    /// The error itself, or for a [`PoolError::Shared`] connect the failure it shared.
    pub fn root(&self) -> &PoolError {
        match self {
            PoolError::Shared(e) => e.root(),
            e => e,
        }
    }
}

/// Mutual TLS to an upstream sidecar: the client config (its ALPN offer decides
/// HTTP/2 or HTTP/1.1) and the identities the server may present.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    pub config: Arc<rustls::ClientConfig>,
    /// The identities the server may present (checked after each handshake).
    pub expected: crate::mesh_tls::ExpectedPeer,
}

/// Connections to one address.
#[derive(Debug, Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

#[derive(Debug)]
struct PoolInner {
    addr: SocketAddr,
    /// Plaintext connections.
    plain: SubPool,
    /// Mutual-TLS connections (kept apart: a pooled connection's security is part of its key).
    mtls: SubPool,
    /// Open HTTP/1.1 connections (idle or busy).
    open: AtomicU32,
    /// Requests waiting for a connection because `max_connections` is reached.
    pending: AtomicU32,
    released: Notify,
}

#[derive(Debug, Default)]
struct SubPool {
    idle: Mutex<Vec<IdleConn>>,
    h2: Mutex<H2Slot>,
}

/// What a shared HTTP/2 connect ends in; `None` while it runs.
type H2Outcome = Option<Result<H2Conn, Arc<PoolError>>>;

/// The one multiplexed HTTP/2 connection, and the connect under way when there is
/// none: every request that finds no usable connection waits for that one
/// handshake (as Envoy's pool queues them on its connecting client), so a burst
/// opens one connection, not one per request.
#[derive(Debug, Default)]
struct H2Slot {
    conn: Option<H2Conn>,
    connecting: Option<watch::Receiver<H2Outcome>>,
}

#[derive(Debug)]
struct IdleConn {
    sender: http1::SendRequest<ProxyBody>,
    since: Instant,
    used: u32,
}

#[derive(Debug, Clone)]
struct H2Conn {
    sender: http2::SendRequest<ProxyBody>,
    used: Arc<AtomicU32>,
}

impl Pool {
    /// An empty pool for `addr`.
    pub fn new(addr: SocketAddr) -> Pool {
        Pool {
            inner: Arc::new(PoolInner {
                addr,
                plain: SubPool::default(),
                mtls: SubPool::default(),
                open: AtomicU32::new(0),
                pending: AtomicU32::new(0),
                released: Notify::new(),
            }),
        }
    }

    /// Open HTTP/1.1 connections and idle ones among them.
    pub fn connection_counts(&self) -> (u32, usize) {
        let count = |p: &SubPool| p.idle.lock().map(|v| v.len()).unwrap_or(0);
        let idle = count(&self.inner.plain) + count(&self.inner.mtls);
        (self.inner.open.load(Ordering::Relaxed), idle)
    }

    /// Whether a live HTTP/2 connection (plaintext or mutual TLS) is pooled.
    pub fn has_http2(&self) -> bool {
        let live = |p: &SubPool| {
            p.h2.lock().map(|slot| slot.conn.as_ref().is_some_and(|c| !c.sender.is_closed())).unwrap_or(false)
        };
        live(&self.inner.plain) || live(&self.inner.mtls)
    }

    /// A connection ready to carry one request: an idle or new HTTP/1.1 connection,
    /// or the shared HTTP/2 connection. Fails without touching any request, so a
    /// connect failure can be retried elsewhere with the same body.
    /// With `tls`, the connection is mutual TLS and the server's identity checked.
    pub async fn checkout(
        &self,
        protocol: UpstreamProtocol,
        limits: &ConnectionPool,
        tls: Option<&UpstreamTls>,
    ) -> Result<Conn, PoolError> {
        match protocol {
            UpstreamProtocol::Http1 => self.checkout_h1(limits, tls).await,
            UpstreamProtocol::Http2 => self.checkout_h2(limits, tls).await,
        }
    }

    fn sub(&self, secure: bool) -> &SubPool {
        if secure { &self.inner.mtls } else { &self.inner.plain }
    }

    async fn checkout_h1(&self, limits: &ConnectionPool, tls: Option<&UpstreamTls>) -> Result<Conn, PoolError> {
        let secure = tls.is_some();
        let inner = &self.inner;
        // Every count taken below is given back by a guard, also when the caller
        // drops this future (a route or per-try timeout) in the middle of an await.
        loop {
            if let Some(idle) = self.take_idle(limits, secure) {
                let mut ret = ReturnTo {
                    pool: self.clone(),
                    secure,
                    sender: Some(idle.sender),
                    used: idle.used,
                    max_requests: limits.max_requests_per_connection,
                };
                let ready = match ret.sender.as_mut() {
                    Some(sender) => sender.ready().await.is_ok(),
                    None => false,
                };
                if ready {
                    return Ok(Conn { addr: inner.addr, kind: ConnKind::H1(Some(ret)) });
                }
                // Dropping `ret` closes the dead connection and frees its slot.
                continue;
            }
            if inner.open.fetch_add(1, Ordering::AcqRel) < limits.max_connections {
                let slot = Held { count: &inner.open, released: Some(&inner.released) };
                // Boxed: a connect (TCP, TLS handshake) is rare and its future is
                // large; inline, every request's future would carry (and copy) it.
                let sender = Box::pin(self.connect_h1(limits, tls)).await?;
                slot.keep();
                return Ok(self.h1_conn(sender, 0, limits, secure));
            }
            inner.open.fetch_sub(1, Ordering::AcqRel);
            if inner.pending.fetch_add(1, Ordering::AcqRel) >= limits.max_pending_requests {
                inner.pending.fetch_sub(1, Ordering::AcqRel);
                return Err(PoolError::Overflow { addr: inner.addr });
            }
            let pending = Held { count: &inner.pending, released: None };
            let waited = tokio::time::timeout(limits.connect_timeout, inner.released.notified()).await;
            drop(pending);
            if waited.is_err() {
                return Err(PoolError::Overflow { addr: inner.addr });
            }
        }
    }

    fn h1_conn(&self, sender: http1::SendRequest<ProxyBody>, used: u32, limits: &ConnectionPool, secure: bool) -> Conn {
        Conn {
            addr: self.inner.addr,
            kind: ConnKind::H1(Some(ReturnTo {
                pool: self.clone(),
                secure,
                sender: Some(sender),
                used,
                max_requests: limits.max_requests_per_connection,
            })),
        }
    }

    async fn checkout_h2(&self, limits: &ConnectionPool, tls: Option<&UpstreamTls>) -> Result<Conn, PoolError> {
        let conn = self.shared_h2(limits, tls).await?;
        conn.used.fetch_add(1, Ordering::Relaxed);
        let mut sender = conn.sender;
        if sender.ready().await.is_err() {
            // It closed meanwhile: the next connect (shared as well) takes the request.
            sender = self.shared_h2(limits, tls).await?.sender;
        }
        Ok(Conn { addr: self.inner.addr, kind: ConnKind::H2(sender) })
    }

    /// The pooled HTTP/2 connection if it can take a request; else the outcome of
    /// the connect under way, or of one started here. A failed connect fails every
    /// request that waited for it.
    async fn shared_h2(&self, limits: &ConnectionPool, tls: Option<&UpstreamTls>) -> Result<H2Conn, PoolError> {
        let mut outcome = {
            let mut slot = self.sub(tls.is_some()).h2.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(c) = &slot.conn
                && !c.sender.is_closed()
                && !exhausted(&c.used, limits.max_requests_per_connection)
            {
                return Ok(c.clone());
            }
            match &slot.connecting {
                // A connect whose task ended without an outcome (a panic) has a closed channel.
                Some(under_way) if !under_way.is_closed() => under_way.clone(),
                _ => {
                    let (done, outcome) = watch::channel(None);
                    slot.connecting = Some(outcome.clone());
                    // A task of its own: the handshake goes on if the requests that
                    // wait for it give up (a timeout), and its connection is pooled.
                    tokio::spawn(self.clone().connect_shared_h2(limits.clone(), tls.cloned(), done));
                    outcome
                }
            }
        };
        let ended = outcome.wait_for(Option::is_some).await;
        match ended.as_deref() {
            Ok(Some(Ok(conn))) => Ok(conn.clone()),
            Ok(Some(Err(e))) => Err(PoolError::Shared(e.clone())),
            _ => Err(PoolError::Connect {
                addr: self.inner.addr,
                source: std::io::Error::other("the HTTP/2 connect ended without an outcome"),
            }),
        }
    }

    /// Connects, pools the connection and tells the requests waiting for it.
    async fn connect_shared_h2(self, limits: ConnectionPool, tls: Option<UpstreamTls>, done: watch::Sender<H2Outcome>) {
        let outcome = self
            .connect_h2(&limits, tls.as_ref())
            .await
            .map(|sender| H2Conn { sender, used: Arc::new(AtomicU32::new(0)) })
            .map_err(Arc::new);
        let mut slot = self.sub(tls.is_some()).h2.lock().unwrap_or_else(|e| e.into_inner());
        slot.connecting = None;
        if let Ok(conn) = &outcome {
            slot.conn = Some(conn.clone());
        }
        drop(slot);
        done.send_replace(Some(outcome));
    }

    fn take_idle(&self, limits: &ConnectionPool, secure: bool) -> Option<IdleConn> {
        let mut idle = self.sub(secure).idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(conn) = idle.pop() {
            if conn.sender.is_closed() || conn.since.elapsed() >= limits.idle_timeout {
                self.close_one();
                continue;
            }
            return Some(conn);
        }
        None
    }

    fn close_one(&self) {
        self.inner.open.fetch_sub(1, Ordering::AcqRel);
        self.inner.released.notify_one();
    }

    fn give_back(&self, sender: http1::SendRequest<ProxyBody>, used: u32, max_requests: u32, secure: bool) {
        if sender.is_closed() || (max_requests != 0 && used >= max_requests) {
            self.close_one();
            return;
        }
        let mut idle = self.sub(secure).idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.push(IdleConn { sender, since: Instant::now(), used });
        drop(idle);
        self.inner.released.notify_one();
    }

    async fn connect(&self, limits: &ConnectionPool) -> Result<TcpStream, PoolError> {
        let addr = self.inner.addr;
        match tokio::time::timeout(limits.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                Ok(stream)
            }
            Ok(Err(source)) => Err(PoolError::Connect { addr, source }),
            Err(_) => Err(PoolError::ConnectTimeout { addr }),
        }
    }

    /// TCP, then (with `tls`) the mutual-TLS handshake and the identity check. A
    /// TLS connection is corked: spawn its futures with [`Io::executor`].
    ///
    /// A failed handshake or identity check is logged here, once per connection
    /// (the requests that waited for a shared connect do not log it again).
    async fn connect_io(&self, limits: &ConnectionPool, tls: Option<&UpstreamTls>) -> Result<Io, PoolError> {
        let stream = self.connect(limits).await?;
        let Some(tls) = tls else { return Ok(Io::Plain(stream)) };
        let secured = self.secure(stream, limits, tls).await;
        if let Err(e) = &secured
            && matches!(e, PoolError::Tls { .. } | PoolError::Identity { .. })
        {
            tracing::warn!(endpoint = %self.inner.addr, error = %e, "mutual TLS to upstream failed");
        }
        secured
    }

    /// The mutual-TLS handshake on `stream` and the server's identity check.
    async fn secure(&self, stream: TcpStream, limits: &ConnectionPool, tls: &UpstreamTls) -> Result<Io, PoolError> {
        let addr = self.inner.addr;
        let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
        // Mesh certificates carry a SPIFFE URI, not a name: the verifier ignores it.
        let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
        let stream = CorkedTcp::new(stream);
        let stream = match tokio::time::timeout(limits.connect_timeout, connector.connect(name, stream)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(source)) => return Err(PoolError::Tls { addr, source }),
            Err(_) => return Err(PoolError::ConnectTimeout { addr }),
        };
        let peer = stream.get_ref().1.peer_certificates().unwrap_or_default();
        serin_certs::verify_peer_identity(peer, &tls.expected.ids())
            .map_err(|source| PoolError::Identity { addr, source: Box::new(source) })?;
        Ok(Io::Tls(Box::new(stream)))
    }

    async fn connect_h1(
        &self,
        limits: &ConnectionPool,
        tls: Option<&UpstreamTls>,
    ) -> Result<http1::SendRequest<ProxyBody>, PoolError> {
        let addr = self.inner.addr;
        let stream = self.connect_io(limits, tls).await?;
        let executor = stream.executor();
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| PoolError::Handshake { addr, source })?;
        executor.execute(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(%addr, error = %e, "upstream HTTP/1.1 connection ended");
            }
        });
        Ok(sender)
    }

    async fn connect_h2(
        &self,
        limits: &ConnectionPool,
        tls: Option<&UpstreamTls>,
    ) -> Result<http2::SendRequest<ProxyBody>, PoolError> {
        let addr = self.inner.addr;
        let stream = self.connect_io(limits, tls).await?;
        // hyper runs the HTTP/2 connection's reads and writes in a task of its own.
        let executor = stream.executor();
        let (sender, conn) = http2::Builder::new(executor.clone())
            .timer(hyper_util::rt::TokioTimer::new())
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| PoolError::Handshake { addr, source })?;
        executor.execute(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%addr, error = %e, "upstream HTTP/2 connection ended");
            }
        });
        Ok(sender)
    }
}

fn exhausted(used: &AtomicU32, max: u32) -> bool {
    max != 0 && used.load(Ordering::Relaxed) >= max
}

fn is_refused_stream(e: &hyper::Error) -> bool {
    use std::error::Error as _;
    let mut source = e.source();
    while let Some(err) = source {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        source = err.source();
    }
    false
}

/// A checked-out connection for one request.
#[derive(Debug)]
pub struct Conn {
    addr: SocketAddr,
    kind: ConnKind,
}

#[derive(Debug)]
enum ConnKind {
    /// `None` once the request was sent.
    H1(Option<ReturnTo>),
    H2(http2::SendRequest<ProxyBody>),
}

impl Conn {
    /// Sends the request. An HTTP/1.1 connection goes back to the pool when the
    /// response body has been read to the end (not after an upgrade).
    ///
    /// The request is handed to the connection at once: the returned future holds
    /// the response channel, not the request. (It is part of every request's
    /// future, which is moved and copied as a whole, so its size matters.)
    pub fn send(
        mut self,
        req: Request<ProxyBody>,
    ) -> impl Future<Output = Result<Response<PooledBody>, PoolError>> + Send + use<> {
        use futures_util::FutureExt as _;
        use futures_util::future::{Either, ready};
        let addr = self.addr;
        match &mut self.kind {
            ConnKind::H2(sender) => Either::Left(sender.send_request(req).map(move |sent| match sent {
                Ok(resp) => Ok(resp.map(|body| PooledBody { inner: body, ret: None })),
                Err(e) => {
                    let refused = e.is_canceled() || is_refused_stream(&e);
                    Err(PoolError::Send { addr, source: e, refused })
                }
            })),
            // `ret` frees the connection's slot when dropped: on an error, an
            // upgrade, or when the future is dropped (a timeout) mid-request.
            ConnKind::H1(slot) => match slot.take() {
                Some(mut ret) => match ret.sender.as_mut() {
                    Some(sender) => {
                        let wants_upgrade = req.headers().contains_key(http::header::UPGRADE);
                        let response = sender.send_request(req);
                        Either::Right(Either::Left(
                            response.map(move |sent| h1_response(sent, ret, wants_upgrade, addr)),
                        ))
                    }
                    None => Either::Right(Either::Right(ready(Err(PoolError::Overflow { addr })))),
                },
                None => Either::Right(Either::Right(ready(Err(PoolError::Overflow { addr })))),
            },
        }
    }
}

/// The outcome of a request on an HTTP/1.1 connection; `ret` gives the connection
/// back when the response body ends.
fn h1_response(
    sent: hyper::Result<Response<Incoming>>,
    mut ret: ReturnTo,
    wants_upgrade: bool,
    addr: SocketAddr,
) -> Result<Response<PooledBody>, PoolError> {
    match sent {
        Ok(resp) => {
            ret.used += 1;
            let upgraded = wants_upgrade || resp.status() == http::StatusCode::SWITCHING_PROTOCOLS;
            // The connection of an upgrade now belongs to the upgraded stream.
            let ret = if upgraded { None } else { Some(ret) };
            Ok(resp.map(|body| {
                let mut body = PooledBody { inner: body, ret };
                // A bodiless answer (HEAD, 204, 304, Content-Length: 0) is
                // complete already and its body is never polled: give the
                // connection back now, not close it on drop.
                if body.inner.is_end_stream() {
                    body.finish();
                }
                body
            }))
        }
        Err(e) => {
            drop(ret);
            let refused = e.is_canceled();
            Err(PoolError::Send { addr, source: e, refused })
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Checked out but never used: still good, give it back.
        if let ConnKind::H1(slot) = &mut self.kind
            && let Some(r) = slot.take()
        {
            r.give_back();
        }
    }
}

/// A checked-out HTTP/1.1 connection. Given back with [`ReturnTo::give_back`];
/// dropped otherwise (error, upgrade, cancelled request, body not read to the
/// end), the connection is closed and its slot in the pool freed.
#[derive(Debug)]
struct ReturnTo {
    pool: Pool,
    /// Which sub-pool it goes back to.
    secure: bool,
    /// `None` once given back or closed.
    sender: Option<http1::SendRequest<ProxyBody>>,
    used: u32,
    max_requests: u32,
}

impl ReturnTo {
    fn give_back(mut self) {
        if let Some(sender) = self.sender.take() {
            self.pool.give_back(sender, self.used, self.max_requests, self.secure);
        }
    }
}

impl Drop for ReturnTo {
    fn drop(&mut self) {
        if let Some(sender) = self.sender.take() {
            drop(sender);
            self.pool.close_one();
        }
    }
}

/// A count taken in the pool (`open` or `pending`), given back when dropped
/// unless [`kept`](Held::keep).
struct Held<'a> {
    count: &'a AtomicU32,
    /// Woken when the count goes down (a freed connection slot).
    released: Option<&'a Notify>,
}

impl Held<'_> {
    fn keep(self) {
        std::mem::forget(self);
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
        if let Some(released) = self.released {
            released.notify_one();
        }
    }
}

/// A response body that gives its HTTP/1.1 connection back to the pool once read to
/// the end; dropped early, the connection is closed instead.
#[derive(Debug)]
pub struct PooledBody {
    inner: Incoming,
    ret: Option<ReturnTo>,
}

impl PooledBody {
    fn finish(&mut self) {
        if let Some(r) = self.ret.take() {
            r.give_back();
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.finish(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.finish(),
            // Dropping the connection closes it and frees its slot.
            Poll::Ready(Some(Err(_))) => drop(self.ret.take()),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An upstream byte stream: plain TCP or mutual TLS over it.
enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<CorkedTcp>>),
}

impl Io {
    /// Spawns the connection's futures: corked over mutual TLS.
    fn executor(&self) -> ConnExecutor {
        match self {
            Io::Plain(_) => ConnExecutor::Plain,
            Io::Tls(s) => ConnExecutor::Corked(s.get_ref().0.cork()),
        }
    }
}

impl tokio::io::AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Io {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A try cut short by a timeout (its future dropped mid-request) must free
    /// its connection slot, or `maxConnections` slots leak one per timeout.
    #[tokio::test]
    async fn a_cancelled_request_frees_its_connection_slot() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        // Accepts connections, reads nothing, never answers.
        let silent = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let limits = ConnectionPool {
            max_connections: 1,
            max_pending_requests: 1,
            connect_timeout: Duration::from_millis(200),
            ..ConnectionPool::default()
        };
        let pool = Pool::new(addr);
        for _ in 0..3 {
            let conn = pool.checkout(UpstreamProtocol::Http1, &limits, None).await.expect("a free slot");
            let req = Request::builder().uri("/").body(crate::body::empty()).expect("request");
            let sent = tokio::time::timeout(Duration::from_millis(20), conn.send(req)).await;
            assert!(sent.is_err(), "the silent upstream never answers");
            assert_eq!(pool.connection_counts().0, 0, "the cancelled request's connection is closed");
        }
        // A checkout cancelled while it waits for a slot gives its pending place back.
        let conn = pool.checkout(UpstreamProtocol::Http1, &limits, None).await.expect("a free slot");
        for _ in 0..3 {
            let waiting =
                tokio::time::timeout(Duration::from_millis(20), pool.checkout(UpstreamProtocol::Http1, &limits, None));
            assert!(waiting.await.is_err(), "waits for the only slot");
        }
        assert_eq!(pool.inner.pending.load(Ordering::Relaxed), 0);
        drop(conn);
        silent.abort();
    }
}
