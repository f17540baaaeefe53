//! Opaque TCP proxying: connect to a picked endpoint, replay the bytes already
//! read from the client, then copy both ways until either side closes or no byte
//! has passed either way for the cluster's `tcp.idleTimeout` (1 h; Envoy's
//! `tcp_proxy` `idle_timeout`). Recorded in the `istio_tcp_*` metrics. Serves the
//! gateway's TLS passthrough and the sidecar's captured non-HTTP traffic.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::flags::ResponseFlags;
use crate::idle::{ActiveIo, IdleTimer};
use crate::metrics::{TcpConnectionMetrics, TcpInfo};
use crate::snapshot::{Cluster, Endpoint};
use crate::state::Shared;
use crate::upstream::outlier::{self, Outcome};

/// Proxies `downstream` to `endpoint` of `cluster`; `prefix` holds bytes already
/// read from the client (a ClientHello), sent upstream first. `what` names the
/// route or listener in logs.
pub async fn proxy(
    shared: &Shared,
    downstream: TcpStream,
    prefix: &[u8],
    mut info: TcpInfo,
    cluster: Arc<Cluster>,
    endpoint: Arc<Endpoint>,
    what: &str,
) {
    info.cluster = Some(cluster.clone());
    info.endpoint = Some(endpoint.clone());
    let timeout = cluster.policy.pool.connect_timeout;
    let upstream = match tokio::time::timeout(timeout, TcpStream::connect(endpoint.addr)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return connect_failed(shared, info, what, e.to_string()),
        Err(_) => return connect_failed(shared, info, what, format!("no answer within {timeout:?}")),
    };
    let _ = upstream.set_nodelay(true);
    outlier::observe(&cluster, &endpoint, Outcome::Status(200));
    endpoint.state.total.fetch_add(1, Ordering::Relaxed);
    endpoint.state.active.fetch_add(1, Ordering::Relaxed);
    let metrics = shared.metrics.tcp_connection(&shared.local, &info);
    metrics.add_received(prefix.len() as u64);
    // Every byte passes the downstream side one way or the other: its reads and
    // writes tell the idle timer.
    let idle_timeout = cluster.policy.pool.tcp_idle_timeout;
    let (idle, activity) = IdleTimer::unless_zero(idle_timeout);
    let mut downstream = ActiveIo::new(Metered { inner: downstream, metrics: &metrics }, activity);
    let mut upstream = upstream;
    let copy = async {
        upstream.write_all(prefix).await?;
        tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await
    };
    let result = match idle {
        Some(timer) => tokio::select! {
            copied = copy => copied,
            () = timer.expired() => Err(io::Error::new(io::ErrorKind::TimedOut, format!("idle for {idle_timeout:?}"))),
        },
        None => copy.await,
    };
    endpoint.state.active.fetch_sub(1, Ordering::Relaxed);
    match result {
        Ok((up, down)) => {
            tracing::debug!(%what, upstream = %endpoint.addr, sent = down, received = up, "TCP proxy closed")
        }
        Err(e) => tracing::debug!(%what, upstream = %endpoint.addr, error = %e, "TCP proxy ended"),
    }
}

/// Records a connection that found no endpoint (`flags`, e.g. UH) or was refused
/// by policy (the black hole), as opened and closed at once.
pub fn refused(shared: &Shared, mut info: TcpInfo, cluster: Option<Arc<Cluster>>, flags: ResponseFlags) {
    info.cluster = cluster;
    info.flags = flags;
    drop(shared.metrics.tcp_connection(&shared.local, &info));
}

fn connect_failed(shared: &Shared, mut info: TcpInfo, what: &str, error: String) {
    if let (Some(cluster), Some(endpoint)) = (&info.cluster, &info.endpoint) {
        outlier::observe(cluster, endpoint, Outcome::Failure);
        tracing::warn!(%what, upstream = %endpoint.addr, %error, "TCP proxy: upstream connect failed");
    }
    info.flags = ResponseFlags::UPSTREAM_CONNECT_FAILURE;
    drop(shared.metrics.tcp_connection(&shared.local, &info));
}

/// The downstream side of a proxied connection, counting bytes into the TCP
/// metrics as they pass (received = from the client, sent = to the client).
struct Metered<'m> {
    inner: TcpStream,
    metrics: &'m TcpConnectionMetrics,
}

impl AsyncRead for Metered<'_> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = poll {
            self.metrics.add_received((buf.filled().len() - before) as u64);
        }
        poll
    }
}

impl AsyncWrite for Metered<'_> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = poll {
            self.metrics.add_sent(n as u64);
        }
        poll
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
