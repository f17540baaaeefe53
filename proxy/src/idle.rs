//! Idle client connections: one on which nothing has been read or written for the
//! idle timeout is closed, gracefully (Envoy's HTTP connection manager
//! `idle_timeout`, 1 h unless set, which Istio leaves as it is). Opaque TCP
//! connections use the same parts with DestinationRule's `tcp.idleTimeout`
//! (`tcp_proxy`).
//!
//! The connection's reads and writes set an [`Activity`] flag through [`ActiveIo`]
//! (one store per system call); an [`IdleTimer`] per connection looks at the flag
//! a few times per timeout, and the connection's future ([`Watched`]) asks it only
//! when the timer has fired. There is no per-request timer: hyper's own
//! (`header_read_timeout`) armed a boxed `Sleep` for every request head and, since
//! it also runs while a kept-alive connection waits for its next request, closed
//! every idle connection after it (60 s), which raced the connection pools of apps
//! that keep connections longer. As with Envoy's defaults (no
//! `request_headers_timeout`), a client sending a head slowly keeps its connection
//! while bytes arrive; the head's size is bounded.
//!
//! Closing is hyper's graceful shutdown: an idle HTTP/1.1 connection closes at
//! once; a request in flight finishes and its response says `connection: close`;
//! HTTP/2 gets a GOAWAY and its open streams finish.
//!
//! [`Watched`]: crate::graceful::Watched

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// Envoy's default idle timeout for client connections.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Looks at the flag per timeout: a connection closes between the timeout and a
/// quarter of it more after its last read or write.
const CHECKS: u32 = 4;

/// Whether a connection has read or written since the timer last looked.
#[derive(Debug, Default)]
pub struct Activity(AtomicBool);

impl Activity {
    fn mark(&self) {
        // A store, not a read-modify-write: the timer only needs to see it set.
        self.0.store(true, Ordering::Relaxed);
    }

    fn take(&self) -> bool {
        self.0.swap(false, Ordering::Relaxed)
    }
}

pin_project_lite::pin_project! {
    /// An IO that marks its connection's [`Activity`] on every completed read or write.
    #[derive(Debug)]
    pub struct ActiveIo<IO> {
        #[pin]
        io: IO,
        activity: Arc<Activity>,
    }
}

impl<IO> ActiveIo<IO> {
    /// Wraps `io`; its reads and writes mark `activity`.
    pub fn new(io: IO, activity: Arc<Activity>) -> ActiveIo<IO> {
        ActiveIo { io, activity }
    }
}

/// Marks `activity` when `polled` is ready, and passes it on.
fn marked<T>(polled: Poll<T>, activity: &Activity) -> Poll<T> {
    if polled.is_ready() {
        activity.mark();
    }
    polled
}

impl<IO: AsyncRead> AsyncRead for ActiveIo<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        marked(this.io.poll_read(cx, buf), this.activity)
    }
}

impl<IO: AsyncWrite> AsyncWrite for ActiveIo<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.project();
        marked(this.io.poll_write(cx, buf), this.activity)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        marked(this.io.poll_write_vectored(cx, bufs), this.activity)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

/// Tells when a connection has been idle for its timeout; polled by the
/// connection's future.
#[derive(Debug)]
pub struct IdleTimer {
    /// Fires every `every` (the timeout / [`CHECKS`]).
    tick: Pin<Box<Sleep>>,
    every: Duration,
    activity: Arc<Activity>,
    /// Ticks in a row that found no activity.
    quiet: u32,
}

impl IdleTimer {
    /// A timer for a connection idle after `timeout` (not zero), and the flag the
    /// connection's IO marks (wrap the IO in [`ActiveIo`] with it). Call within a
    /// tokio runtime.
    pub fn new(timeout: Duration) -> (IdleTimer, Arc<Activity>) {
        let every = (timeout / CHECKS).max(Duration::from_millis(1));
        let activity = Arc::new(Activity::default());
        let timer =
            IdleTimer { tick: Box::pin(tokio::time::sleep(every)), every, activity: activity.clone(), quiet: 0 };
        (timer, activity)
    }

    /// [`IdleTimer::new`] unless `timeout` is zero (never idle), and the flag
    /// for the connection's [`ActiveIo`] either way.
    pub fn unless_zero(timeout: Duration) -> (Option<IdleTimer>, Arc<Activity>) {
        if timeout.is_zero() {
            return (None, Arc::default());
        }
        let (timer, activity) = IdleTimer::new(timeout);
        (Some(timer), activity)
    }

    /// True once nothing was read or written for the timeout. Looks at the timer
    /// only when it has fired or when `register` (the first poll, or the task's
    /// waker changed, so the timer must wake the new one): a poll of a busy
    /// connection costs a load.
    pub fn poll_idle(&mut self, cx: &mut Context<'_>, register: bool) -> bool {
        if !register && !self.tick.is_elapsed() {
            return false;
        }
        while self.tick.as_mut().poll(cx).is_ready() {
            if self.activity.take() {
                self.quiet = 0;
            } else {
                self.quiet += 1;
                if self.quiet >= CHECKS {
                    return true;
                }
            }
            // From the deadline, not from now: ticks missed while the task was
            // not polled are each counted.
            let next = self.tick.deadline() + self.every;
            self.tick.as_mut().reset(next);
        }
        false
    }

    /// Resolves once the connection has been idle for the timeout: for a task
    /// that polls its connection with `select!` (the opaque TCP proxy).
    pub async fn expired(mut self) {
        std::future::poll_fn(|cx| if self.poll_idle(cx, true) { Poll::Ready(()) } else { Poll::Pending }).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    /// Polls the timer once (registering the task's waker), as a connection's poll would.
    async fn idle_now(timer: &mut IdleTimer) -> bool {
        poll_fn(|cx| Poll::Ready(timer.poll_idle(cx, true))).await
    }

    /// A connection that reads or writes at least once per timeout is never idle;
    /// one that stops is idle after the timeout and before a quarter more.
    #[tokio::test(start_paused = true)]
    async fn idle_after_the_timeout_of_silence_only() {
        let timeout = Duration::from_secs(40);
        let (mut timer, activity) = IdleTimer::new(timeout);
        for _ in 0..20 {
            tokio::time::advance(Duration::from_secs(9)).await;
            activity.mark();
            assert!(!idle_now(&mut timer).await, "active connections stay");
        }
        // The last mark was just now: idle at 40-50 s of silence, not before.
        tokio::time::advance(Duration::from_secs(39)).await;
        assert!(!idle_now(&mut timer).await, "39 s of silence");
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(idle_now(&mut timer).await, "50 s of silence");
    }

    /// A connection that never reads anything is idle after the timeout.
    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_is_idle_after_the_timeout() {
        let (mut timer, _activity) = IdleTimer::new(Duration::from_secs(8));
        assert!(!idle_now(&mut timer).await);
        tokio::time::advance(Duration::from_secs(7)).await;
        assert!(!idle_now(&mut timer).await);
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(idle_now(&mut timer).await);
    }

    /// Reads and writes through [`ActiveIo`] mark the flag; a stalled read does not.
    #[tokio::test]
    async fn reads_and_writes_mark_activity() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (a, mut b) = tokio::io::duplex(64);
        let activity = Arc::new(Activity::default());
        let mut io = ActiveIo::new(a, activity.clone());
        io.write_all(b"ping").await.expect("write");
        assert!(activity.take(), "a write marks");
        let mut buf = [0u8; 4];
        let pending = poll_fn(|cx| {
            let mut rb = ReadBuf::new(&mut buf);
            Poll::Ready(Pin::new(&mut io).poll_read(cx, &mut rb).is_pending())
        })
        .await;
        assert!(pending && !activity.take(), "a read that waits does not mark");
        b.write_all(b"pong").await.expect("peer write");
        io.read_exact(&mut buf).await.expect("read");
        assert!(activity.take(), "a read marks");
    }
}
