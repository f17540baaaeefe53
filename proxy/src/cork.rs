//! Corked sockets: what a connection writes while its task is being polled leaves in
//! one system call at the end of that poll.
//!
//! hyper's HTTP/2 codec (h2) flushes its buffer after every DATA frame of 256 bytes or
//! more, and tokio-rustls sends each flush to the socket at once: an inbound sidecar
//! answering 60 requests on one mutual-TLS connection made 60 `writev` calls (and woke
//! the peer 60 times) where one would do. A [`CorkedTcp`] keeps the bytes written during
//! a poll of [`corked`]'s future in a buffer and sends them when that poll returns, so
//! the frames of every stream answered in one turn of the task share a system call.
//! Outside such a poll (during a TLS handshake, or after hyper hands an upgraded
//! connection to another task) writes go straight to the socket.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Bytes held before a write inside a corked poll goes to the socket anyway (and
/// waits for it, if the socket is full): the buffer's bound per connection.
const MAX_CORKED: usize = 256 * 1024;
/// A drained buffer larger than this is freed rather than kept for the next burst.
const KEEP_CAPACITY: usize = 64 * 1024;

/// A TCP stream whose writes are held while its connection's task is polled.
#[derive(Debug)]
pub struct CorkedTcp {
    cork: Arc<Cork>,
}

/// The shared half: the socket and the bytes not yet sent.
#[derive(Debug)]
pub struct Cork {
    tcp: TcpStream,
    out: Mutex<Out>,
    /// Polls of corked futures in progress (hyper may run a connection's parts as
    /// several tasks, on several threads): writes are held while any is.
    polls: AtomicUsize,
}

#[derive(Debug, Default)]
struct Out {
    buf: Vec<u8>,
    /// `buf[..sent]` is on the wire already.
    sent: usize,
    /// A send failed: what every later write returns.
    failed: Option<io::ErrorKind>,
    /// Tasks waiting for the socket to drain. tokio wakes only the last task that
    /// asked (`poll_write_ready`), and several corked tasks may share a socket
    /// (hyper's HTTP/2 client): whoever sends next wakes the others.
    waiters: Vec<Waker>,
}

impl Out {
    fn wait(&mut self, cx: &Context<'_>) {
        if !self.waiters.iter().any(|w| w.will_wake(cx.waker())) {
            self.waiters.push(cx.waker().clone());
        }
    }

    fn wake_waiters(&mut self) {
        for waker in self.waiters.drain(..) {
            waker.wake();
        }
    }
}

impl CorkedTcp {
    /// Wraps `tcp`; run the connection's futures with [`corked`] (or
    /// [`ConnExecutor::Corked`]) and its [`cork`](Self::cork) to coalesce their writes.
    pub fn new(tcp: TcpStream) -> CorkedTcp {
        CorkedTcp { cork: Arc::new(Cork { tcp, out: Mutex::new(Out::default()), polls: AtomicUsize::new(0) }) }
    }

    /// The shared half, for [`corked`] or [`ConnExecutor::Corked`].
    pub fn cork(&self) -> Arc<Cork> {
        self.cork.clone()
    }
}

/// Runs `conn` (a connection's future, reading and writing through the
/// [`CorkedTcp`] of `cork`), sending what each poll wrote when that poll returns.
pub async fn corked<F: Future>(cork: Arc<Cork>, conn: F) -> F::Output {
    let mut conn = std::pin::pin!(conn);
    let mut done = None;
    std::future::poll_fn(|cx| {
        if done.is_none() {
            cork.polls.fetch_add(1, Ordering::AcqRel);
            let polled = conn.as_mut().poll(cx);
            cork.polls.fetch_sub(1, Ordering::AcqRel);
            if let Poll::Ready(output) = polled {
                done = Some(output);
            }
        }
        // A send that would block waits for the socket: the task is woken when it
        // drains and polls the connection again (a no-op if nothing else woke it).
        // A failed send ends nothing here: the connection sees the error itself.
        if cork.poll_send(cx, &mut cork.lock()).is_pending() {
            return Poll::Pending;
        }
        match done.take() {
            Some(output) => Poll::Ready(output),
            None => Poll::Pending,
        }
    })
    .await
}

/// Spawns a connection's futures: as corked tasks when the connection has a cork
/// (its own future, and those hyper's HTTP/2 client runs beside it, the one that
/// reads and writes the socket among them), else as they are.
#[derive(Debug, Clone)]
pub enum ConnExecutor {
    /// No cork: `tokio::spawn`.
    Plain,
    /// Every spawned future corks this socket while it is polled.
    Corked(Arc<Cork>),
}

impl<F> hyper::rt::Executor<F> for ConnExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        match self {
            ConnExecutor::Plain => tokio::spawn(fut),
            ConnExecutor::Corked(cork) => tokio::spawn(corked(cork.clone(), fut)),
        };
    }
}

impl Cork {
    fn corked(&self) -> bool {
        self.polls.load(Ordering::Acquire) > 0
    }

    fn lock(&self) -> MutexGuard<'_, Out> {
        // A panic elsewhere cannot leave `Out` half-updated: keep going.
        self.out.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends the held bytes; `Pending` (woken when the socket drains) while some
    /// remain. After a failed send the bytes are dropped and every later write
    /// fails the same way.
    fn poll_send(&self, cx: &mut Context<'_>, out: &mut Out) -> Poll<io::Result<()>> {
        if let Some(kind) = out.failed {
            return Poll::Ready(Err(kind.into()));
        }
        while out.sent < out.buf.len() {
            let failed = match self.tcp.try_write(&out.buf[out.sent..]) {
                Ok(0) => io::ErrorKind::WriteZero,
                Ok(n) => {
                    out.sent += n;
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => match self.tcp.poll_write_ready(cx) {
                    Poll::Pending => {
                        out.wait(cx);
                        return Poll::Pending;
                    }
                    Poll::Ready(Ok(())) => continue,
                    Poll::Ready(Err(e)) => e.kind(),
                },
                Err(e) => e.kind(),
            };
            out.failed = Some(failed);
            out.buf = Vec::new();
            out.sent = 0;
            out.wake_waiters();
            return Poll::Ready(Err(failed.into()));
        }
        out.wake_waiters();
        out.sent = 0;
        if out.buf.capacity() > KEEP_CAPACITY {
            out.buf = Vec::new();
        } else {
            out.buf.clear();
        }
        Poll::Ready(Ok(()))
    }

    /// Writes `bufs` (one slice or several): held while corked and under the
    /// bound, else sent after what is held.
    fn poll_write_slices(&self, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let mut out = self.lock();
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        let corked = self.corked();
        if corked && out.buf.len() - out.sent + len > MAX_CORKED {
            ready!(self.poll_send(cx, &mut out))?;
        }
        if corked {
            out.buf.reserve(len);
            for b in bufs {
                out.buf.extend_from_slice(b);
            }
            return Poll::Ready(Ok(len));
        }
        ready!(self.poll_send(cx, &mut out))?;
        loop {
            match self.tcp.try_write_vectored(bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.tcp.poll_write_ready(cx)?.is_pending() {
                        out.wait(cx);
                        return Poll::Pending;
                    }
                }
                written => return Poll::Ready(written),
            }
        }
    }
}

impl AsyncRead for CorkedTcp {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let tcp = &self.cork.tcp;
        loop {
            ready!(tcp.poll_read_ready(cx))?;
            // tokio-rustls reads into rustls's own (initialised) buffer: nothing to zero.
            let unfilled = buf.initialize_unfilled();
            match read_forgetting_drained(tcp, unfilled) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// Reads what the socket holds into `buf`. A read that does not fill `buf` has
/// drained the socket (epoll is edge-triggered: data arriving later brings a new
/// event), so the readiness it was made on is cleared, as tokio's own `poll_read`
/// does; without that, the next read (hyper reads again after each message) made
/// a `recvfrom` that could only return `EAGAIN`, one per TLS record received.
///
/// The read happens inside `try_io`, which clears only the readiness seen before
/// the read: an event that arrives during the read keeps the socket readable.
/// (Clearing afterwards, in a second `try_io`, lost such an event, and a reader
/// then waited for data that had already arrived.)
fn read_forgetting_drained(tcp: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    use std::io::Read as _;
    let room = buf.len();
    let mut drained = None;
    let read = tcp.try_io(tokio::io::Interest::READABLE, || {
        let n = (&*socket2::SockRef::from(tcp)).read(buf)?;
        if n > 0 && n < room {
            // `WouldBlock` makes `try_io` clear the readiness; the bytes are kept.
            drained = Some(n);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match drained {
        Some(n) => Ok(n),
        None => read,
    }
}

impl AsyncWrite for CorkedTcp {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.cork.poll_write_slices(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.cork.poll_write_slices(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    /// Corked: the bytes leave when the poll returns. Otherwise sends what is held.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.cork.corked() {
            return Poll::Ready(Ok(()));
        }
        self.cork.poll_send(cx, &mut self.cork.lock())
    }

    /// Sends what is held, then closes the sending half (FIN).
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.cork.poll_send(cx, &mut self.cork.lock()))?;
        Poll::Ready(socket2::SockRef::from(&self.cork.tcp).shutdown(std::net::Shutdown::Write))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (CorkedTcp, Arc<Cork>, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let corked = CorkedTcp::new(client.expect("connect"));
        let cork = corked.cork();
        (corked, cork, accepted.expect("accept").0)
    }

    /// Writes and flushes made in one poll reach the peer together, once the poll
    /// has returned; reads and writes outside a corked poll pass straight through.
    #[tokio::test]
    async fn writes_of_one_poll_leave_together() {
        let (mut io, cork, mut peer) = pair().await;
        let wrote = corked(cork.clone(), async {
            for part in [&b"one "[..], b"two ", b"three"] {
                io.write_all(part).await.expect("write");
                io.flush().await.expect("flush");
                assert!(!cork.lock().buf.is_empty(), "held until the poll returns");
            }
            io
        })
        .await;
        assert!(cork.lock().buf.is_empty(), "sent when the poll returned");
        let mut got = [0u8; 13];
        peer.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"one two three");

        // Uncorked (e.g. an upgraded connection in another task): written at once.
        let mut io = wrote;
        io.write_all(b"direct").await.expect("write");
        assert!(cork.lock().buf.is_empty());
        let mut got = [0u8; 6];
        peer.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"direct");

        peer.write_all(b"back").await.expect("write");
        let mut got = [0u8; 4];
        io.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"back");

        io.shutdown().await.expect("shutdown");
        assert_eq!(peer.read(&mut got).await.expect("read"), 0, "FIN after the data");
    }

    /// A read that drains the socket forgets its readiness (no `recvfrom` that can
    /// only return `EAGAIN`); data that arrives later still reaches the reader.
    #[tokio::test]
    async fn a_drained_socket_still_sees_later_data() {
        let (mut io, _cork, mut peer) = pair().await;
        let mut buf = [0u8; 64];
        for round in 0..3u8 {
            peer.write_all(&[round; 5]).await.expect("write");
            let n = io.read(&mut buf).await.expect("read");
            assert_eq!(&buf[..n], &[round; 5]);
            let mut cx = Context::from_waker(Waker::noop());
            let polled = Pin::new(&mut io).poll_read(&mut cx, &mut ReadBuf::new(&mut buf));
            assert!(polled.is_pending(), "nothing more arrived");
        }
        // A read that fills the buffer keeps the readiness: the rest follows.
        peer.write_all(&[7; 100]).await.expect("write");
        let mut got = Vec::new();
        while got.len() < 100 {
            let n = io.read(&mut buf).await.expect("read");
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, vec![7; 100]);
    }

    /// Two corked tasks on one full socket (hyper's HTTP/2 client spawns several):
    /// tokio keeps only the last task's interest in the socket draining, so the
    /// one that sends next must wake the other, or the writer would wait forever.
    #[tokio::test]
    async fn tasks_sharing_a_full_socket_are_all_woken() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (client, mut peer) = (client.expect("connect"), accepted.expect("accept").0);
        // Small socket buffers: the writer blocks early.
        socket2::SockRef::from(&client).set_send_buffer_size(16 * 1024).expect("sndbuf");
        socket2::SockRef::from(&peer).set_recv_buffer_size(16 * 1024).expect("rcvbuf");
        let io = CorkedTcp::new(client);
        let cork = io.cork();
        let total = 4 * MAX_CORKED;
        let writer = tokio::spawn(corked(cork.clone(), async move {
            let mut io = io;
            let chunk = vec![7u8; 64 * 1024];
            for _ in 0..total / chunk.len() {
                io.write_all(&chunk).await.expect("write");
            }
            io.shutdown().await.expect("shutdown");
        }));
        while cork.lock().waiters.is_empty() {
            tokio::task::yield_now().await; // until the writer waits for the socket
        }
        // Another corked task polls now: its end-of-poll send finds the socket full.
        let nudge = Arc::new(tokio::sync::Notify::new());
        let other = tokio::spawn(corked(cork.clone(), {
            let nudge = nudge.clone();
            async move { nudge.notified().await }
        }));
        while cork.lock().waiters.len() < 2 {
            tokio::task::yield_now().await;
        }
        nudge.notify_one();
        let mut got = Vec::new();
        let read = tokio::time::timeout(std::time::Duration::from_secs(60), peer.read_to_end(&mut got)).await;
        assert!(read.is_ok(), "the writer was never woken: {} of {total} bytes", got.len());
        assert_eq!(got.len(), total);
        writer.await.expect("writer");
        other.await.expect("other");
    }

    /// More than the bound in one poll: the buffer is sent on the way (waiting
    /// for the peer to read when the socket is full), and nothing is lost.
    #[tokio::test]
    async fn a_burst_past_the_bound_is_sent_whole() {
        let (io, cork, mut peer) = pair().await;
        let total = 3 * MAX_CORKED + 17;
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            peer.read_to_end(&mut got).await.expect("read");
            got
        });
        corked(cork, async move {
            let mut io = io;
            let chunk: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
            let mut left = total;
            while left > 0 {
                let n = left.min(chunk.len());
                io.write_all(&chunk[..n]).await.expect("write");
                left -= n;
            }
            io.shutdown().await.expect("shutdown");
        })
        .await;
        let got = reader.await.expect("reader");
        assert_eq!(got.len(), total);
        assert!(got.chunks(1000).all(|c| c.iter().enumerate().all(|(i, b)| *b == i as u8)));
    }
}
