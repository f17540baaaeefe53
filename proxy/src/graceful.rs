//! Graceful shutdown of served connections: each one is told to finish its
//! requests and close (hyper's `graceful_shutdown`) when its listener drains,
//! or when it has been idle for its idle timeout ([`crate::idle`]), and the
//! listener waits for them.
//!
//! Why not hyper-util's `GracefulShutdown`: its connection future polls a `watch`
//! receiver every time the connection is polled, which locks the channel's
//! waiter list each time (~1.3% of a sidecar's instructions per request). Here a
//! connection reads an atomic flag per poll and registers for the wake-up once
//! (again only if its task's waker changes).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};

use hyper_util::server::graceful::GracefulConnection;
use tokio::sync::Notify;
use tokio::sync::futures::OwnedNotified;

use crate::idle::IdleTimer;

/// The connections of one listener that drain together.
#[derive(Debug, Default)]
pub struct GracefulShutdown {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    draining: AtomicBool,
    /// Wakes the watched connections when the drain starts.
    start: Arc<Notify>,
    /// Watched connections not yet finished (or dropped).
    open: AtomicUsize,
    /// Notified when `open` drops to 0.
    closed: Notify,
}

/// Lets a connection accepted elsewhere (after a TLS handshake, in a task of its
/// own) be watched by its listener's [`GracefulShutdown`]. It counts as an open
/// connection from its creation, so a drain that starts during the handshake
/// waits for that connection too.
#[derive(Debug)]
pub struct Watcher {
    open: Open,
}

impl GracefulShutdown {
    /// No connection watched, not draining.
    pub fn new() -> GracefulShutdown {
        GracefulShutdown::default()
    }

    /// A handle that watches connections for this listener.
    pub fn watcher(&self) -> Watcher {
        self.inner.open.fetch_add(1, Ordering::AcqRel);
        Watcher { open: Open(self.inner.clone()) }
    }

    /// Watches `conn`: it shuts down gracefully when [`shutdown`](Self::shutdown) is called.
    pub fn watch<C: GracefulConnection>(&self, conn: C) -> Watched<C> {
        self.watcher().watch(conn)
    }

    /// Watched connections (and unused [`Watcher`]s) still open.
    pub fn count(&self) -> usize {
        self.inner.open.load(Ordering::Acquire)
    }

    /// Tells every watched connection to finish, then waits until all have.
    pub async fn shutdown(self) {
        let inner = &self.inner;
        inner.draining.store(true, Ordering::Release);
        inner.start.notify_waiters();
        loop {
            let closed = inner.closed.notified();
            let mut closed = std::pin::pin!(closed);
            closed.as_mut().enable();
            if inner.open.load(Ordering::Acquire) == 0 {
                return;
            }
            closed.await;
        }
    }
}

impl Watcher {
    /// Watches `conn` (see [`GracefulShutdown::watch`]).
    pub fn watch<C: GracefulConnection>(self, conn: C) -> Watched<C> {
        let start = self.open.0.start.clone().notified_owned();
        Watched { conn, start, waker: None, shut: false, open: self.open, idle: None }
    }
}

/// Counts a watcher, then its watched connection, as open until dropped.
#[derive(Debug)]
struct Open(Arc<Inner>);

impl Drop for Open {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.closed.notify_waiters();
        }
    }
}

pin_project_lite::pin_project! {
    /// A connection future that shuts down gracefully when its listener drains
    /// (or, with [`close_when_idle`](Watched::close_when_idle), when it is idle).
    pub struct Watched<C> {
        #[pin]
        conn: C,
        #[pin]
        start: OwnedNotified,
        // The waker `start` holds; `None` before the first poll.
        waker: Option<Waker>,
        // `graceful_shutdown` was called.
        shut: bool,
        open: Open,
        idle: Option<IdleTimer>,
    }
}

impl<C> Watched<C> {
    /// Also shuts the connection down gracefully once `timer` finds it idle.
    pub fn close_when_idle(mut self, timer: IdleTimer) -> Watched<C> {
        self.idle = Some(timer);
        self
    }
}

impl<C: GracefulConnection> Future for Watched<C> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let mut this = self.project();
        if !*this.shut {
            // Register for the drain's wake-up first, then read the flag: a drain
            // that starts in between wakes this task, one that started before is seen.
            let new_waker = !this.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
            if new_waker {
                let _ = this.start.as_mut().poll(cx);
                *this.waker = Some(cx.waker().clone());
            }
            let idle = this.idle.as_mut().is_some_and(|timer| timer.poll_idle(cx, new_waker));
            if idle || this.open.0.draining.load(Ordering::Acquire) {
                if idle {
                    tracing::debug!("idle timeout: closing the connection");
                }
                *this.shut = true;
                this.conn.as_mut().graceful_shutdown();
            }
        }
        this.conn.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use bytes::Bytes;
    use http_body_util::Full;
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::net::{TcpListener, TcpStream};

    type Client = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

    /// A served HTTP/1.1 connection (watched by `watcher`) and a client on it.
    async fn served(watcher: Watcher) -> (tokio::task::JoinHandle<hyper::Result<()>>, Client) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let svc = service_fn(|_req| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from("ok"))))
        });
        let conn = http1::Builder::new().serve_connection(TokioIo::new(accepted.expect("accept").0), svc);
        let server = tokio::spawn(watcher.watch(conn));
        let (sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(client.expect("connect"))).await.expect("handshake");
        tokio::spawn(conn);
        (server, sender)
    }

    async fn get(client: &mut Client) -> Result<http::StatusCode, hyper::Error> {
        client.ready().await?;
        let resp = client.send_request(http::Request::new(Full::new(Bytes::new()))).await?;
        Ok(resp.status())
    }

    /// Open connections keep serving until the drain; then each one closes
    /// (idle ones at once) and `shutdown` returns when all have. A connection
    /// watched after the drain started closes too.
    #[tokio::test]
    async fn shutdown_closes_every_connection_and_waits_for_them() {
        let graceful = GracefulShutdown::new();
        let mut conns = Vec::new();
        for _ in 0..3 {
            let (server, mut client) = served(graceful.watcher()).await;
            assert_eq!(get(&mut client).await.expect("served"), http::StatusCode::OK);
            conns.push((server, client));
        }
        assert_eq!(graceful.count(), 3);
        // A connection still in its TLS handshake when the drain starts.
        let late = graceful.watcher();
        assert_eq!(graceful.count(), 4);

        let shutdown = tokio::spawn(graceful.shutdown());
        for (server, mut client) in conns {
            server.await.expect("join").expect("served to the end");
            assert!(get(&mut client).await.is_err(), "the connection is closed");
        }
        assert!(!shutdown.is_finished(), "waits for the connection in its handshake");

        let (server, _client) = served(late).await;
        tokio::time::timeout(Duration::from_secs(10), server).await.expect("closes").expect("join").expect("conn");
        tokio::time::timeout(Duration::from_secs(10), shutdown).await.expect("shutdown returns").expect("join");
    }

    /// With nothing open, shutdown returns at once.
    #[tokio::test]
    async fn shutdown_without_connections_returns() {
        let graceful = GracefulShutdown::new();
        assert_eq!(graceful.count(), 0);
        tokio::time::timeout(Duration::from_secs(10), graceful.shutdown()).await.expect("returns");
    }
}
