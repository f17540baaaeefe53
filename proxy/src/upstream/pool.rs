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
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::body::ProxyBody;
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
    /// The request was written (maybe partly) and the connection failed.
    #[error("upstream {addr}: {source}")]
    Send { addr: SocketAddr, source: hyper::Error, refused: bool },
}

impl PoolError {
    /// Whether nothing reached the upstream application (safe to retry anywhere).
    pub fn is_connect_failure(&self) -> bool {
        matches!(self, PoolError::Connect { .. } | PoolError::ConnectTimeout { .. } | PoolError::Handshake { .. })
    }
}

/// Connections to one address.
#[derive(Debug, Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

#[derive(Debug)]
struct PoolInner {
    addr: SocketAddr,
    idle: Mutex<Vec<IdleConn>>,
    h2: Mutex<Option<H2Conn>>,
    /// Open HTTP/1.1 connections (idle or busy).
    open: AtomicU32,
    /// Requests waiting for a connection because `max_connections` is reached.
    pending: AtomicU32,
    released: Notify,
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
                idle: Mutex::new(Vec::new()),
                h2: Mutex::new(None),
                open: AtomicU32::new(0),
                pending: AtomicU32::new(0),
                released: Notify::new(),
            }),
        }
    }

    /// Open HTTP/1.1 connections and idle ones among them.
    pub fn connection_counts(&self) -> (u32, usize) {
        let idle = self.inner.idle.lock().map(|v| v.len()).unwrap_or(0);
        (self.inner.open.load(Ordering::Relaxed), idle)
    }

    /// Sends `req` on a pooled connection. The response body returns the connection
    /// to the pool when it has been read to the end.
    pub async fn send(
        &self,
        req: Request<ProxyBody>,
        protocol: UpstreamProtocol,
        limits: &ConnectionPool,
    ) -> Result<Response<PooledBody>, PoolError> {
        match protocol {
            UpstreamProtocol::Http1 => self.send_h1(req, limits).await,
            UpstreamProtocol::Http2 => self.send_h2(req, limits).await,
        }
    }

    async fn send_h1(
        &self,
        req: Request<ProxyBody>,
        limits: &ConnectionPool,
    ) -> Result<Response<PooledBody>, PoolError> {
        let inner = &self.inner;
        let (mut sender, used) = loop {
            if let Some(conn) = self.take_idle(limits) {
                break (conn.sender, conn.used);
            }
            if inner.open.fetch_add(1, Ordering::AcqRel) < limits.max_connections {
                match self.connect_h1(limits).await {
                    Ok(sender) => break (sender, 0),
                    Err(e) => {
                        self.close_one();
                        return Err(e);
                    }
                }
            }
            inner.open.fetch_sub(1, Ordering::AcqRel);
            if inner.pending.fetch_add(1, Ordering::AcqRel) >= limits.max_pending_requests {
                inner.pending.fetch_sub(1, Ordering::AcqRel);
                return Err(PoolError::Overflow { addr: inner.addr });
            }
            let waited = tokio::time::timeout(limits.connect_timeout, inner.released.notified()).await;
            inner.pending.fetch_sub(1, Ordering::AcqRel);
            if waited.is_err() {
                return Err(PoolError::Overflow { addr: inner.addr });
            }
        };
        if sender.ready().await.is_err() {
            // Closed while idle: count it gone and try a fresh connection once.
            self.close_one();
            inner.open.fetch_add(1, Ordering::AcqRel);
            sender = match self.connect_h1(limits).await {
                Ok(s) => s,
                Err(e) => {
                    self.close_one();
                    return Err(e);
                }
            };
        }
        let wants_upgrade = req.headers().contains_key(http::header::UPGRADE);
        match sender.send_request(req).await {
            Ok(resp) => {
                let reusable = !wants_upgrade && resp.status() != http::StatusCode::SWITCHING_PROTOCOLS;
                let ret = reusable.then(|| ReturnTo {
                    pool: self.clone(),
                    sender,
                    used: used + 1,
                    max_requests: limits.max_requests_per_connection,
                });
                if ret.is_none() {
                    // The connection now belongs to the upgraded stream.
                    self.close_one();
                }
                Ok(resp.map(|body| PooledBody { inner: body, ret }))
            }
            Err(e) => {
                self.close_one();
                let refused = e.is_canceled();
                Err(PoolError::Send { addr: inner.addr, source: e, refused })
            }
        }
    }

    async fn send_h2(
        &self,
        req: Request<ProxyBody>,
        limits: &ConnectionPool,
    ) -> Result<Response<PooledBody>, PoolError> {
        let existing = {
            let guard = self.inner.h2.lock().unwrap_or_else(|e| e.into_inner());
            guard.clone()
        };
        let conn = match existing {
            Some(c) if !c.sender.is_closed() && !exhausted(&c.used, limits.max_requests_per_connection) => c,
            _ => {
                let sender = self.connect_h2(limits).await?;
                let conn = H2Conn { sender, used: Arc::new(AtomicU32::new(0)) };
                *self.inner.h2.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn.clone());
                conn
            }
        };
        conn.used.fetch_add(1, Ordering::Relaxed);
        let mut sender = conn.sender;
        if sender.ready().await.is_err() {
            let mut guard = self.inner.h2.lock().unwrap_or_else(|e| e.into_inner());
            *guard = None;
            drop(guard);
            sender = self.connect_h2(limits).await?;
        }
        match sender.send_request(req).await {
            Ok(resp) => Ok(resp.map(|body| PooledBody { inner: body, ret: None })),
            Err(e) => {
                let refused = e.is_canceled() || is_refused_stream(&e);
                Err(PoolError::Send { addr: self.inner.addr, source: e, refused })
            }
        }
    }

    fn take_idle(&self, limits: &ConnectionPool) -> Option<IdleConn> {
        let mut idle = self.inner.idle.lock().unwrap_or_else(|e| e.into_inner());
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

    fn give_back(&self, sender: http1::SendRequest<ProxyBody>, used: u32, max_requests: u32) {
        if sender.is_closed() || (max_requests != 0 && used >= max_requests) {
            self.close_one();
            return;
        }
        let mut idle = self.inner.idle.lock().unwrap_or_else(|e| e.into_inner());
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

    async fn connect_h1(&self, limits: &ConnectionPool) -> Result<http1::SendRequest<ProxyBody>, PoolError> {
        let addr = self.inner.addr;
        let stream = self.connect(limits).await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| PoolError::Handshake { addr, source })?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(%addr, error = %e, "upstream HTTP/1.1 connection ended");
            }
        });
        Ok(sender)
    }

    async fn connect_h2(&self, limits: &ConnectionPool) -> Result<http2::SendRequest<ProxyBody>, PoolError> {
        let addr = self.inner.addr;
        let stream = self.connect(limits).await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| PoolError::Handshake { addr, source })?;
        tokio::spawn(async move {
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

#[derive(Debug)]
struct ReturnTo {
    pool: Pool,
    sender: http1::SendRequest<ProxyBody>,
    used: u32,
    max_requests: u32,
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
            r.pool.give_back(r.sender, r.used, r.max_requests);
        }
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        if let Some(r) = self.ret.take() {
            drop(r.sender);
            r.pool.close_one();
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
            Poll::Ready(Some(Err(_))) => {
                if let Some(r) = self.ret.take() {
                    drop(r.sender);
                    r.pool.close_one();
                }
            }
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
