//! TLS passthrough: a connection whose ClientHello names a host of a
//! `PASSTHROUGH` server goes, still encrypted, to a destination of the matching
//! VirtualService `tls[]` route; bytes are copied both ways until either side
//! closes. Recorded in the `istio_tcp_*` metrics (reporter `source`).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::hello::ClientHello;
use super::hosts;
use crate::config::gateway::SniRoute;
use crate::flags::ResponseFlags;
use crate::metrics::{TcpConnectionMetrics, TcpInfo};
use crate::request_info::Reporter;
use crate::state::Shared;
use crate::upstream::outlier::{self, Outcome};
use crate::upstream::{balance, split};

/// The route for a server name on gateway port `port`, if any.
pub fn route<'a>(routes: &'a [SniRoute], sni: Option<&str>, port: u16) -> Option<&'a SniRoute> {
    hosts::best(routes.iter().filter(|r| r.port.is_none_or(|p| p == port)).map(|r| (r.sni.as_slice(), r)), sni)
}

/// Proxies one connection by `routes`; `hello` holds the bytes already read.
pub async fn serve(shared: Arc<Shared>, downstream: TcpStream, hello: ClientHello, routes: &[SniRoute], port: u16) {
    let remote = downstream.peer_addr().ok();
    let Some(route) = route(routes, hello.sni.as_deref(), port) else {
        tracing::debug!(sni = ?hello.sni, ?remote, port, "TLS passthrough: no route for this server name; closing");
        return;
    };
    let dest = split::pick(&route.destinations, shared.split_mode, None);
    let cluster = dest.cluster.clone();
    let mut info = TcpInfo::new(Reporter::Source);
    info.cluster = Some(cluster.clone());
    let Some(endpoint) = balance::pick(&cluster, None, None) else {
        info.flags = ResponseFlags::NO_HEALTHY_UPSTREAM;
        drop(shared.metrics.tcp_connection(&shared.local, &info));
        tracing::warn!(route = %route.name, cluster = %cluster.name, "TLS passthrough: no healthy upstream");
        return;
    };
    info.endpoint = Some(endpoint.clone());
    let timeout = cluster.policy.pool.connect_timeout;
    let upstream = match tokio::time::timeout(timeout, TcpStream::connect(endpoint.addr)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return connect_failed(&shared, info, &route.name, e.to_string()),
        Err(_) => return connect_failed(&shared, info, &route.name, format!("no answer within {timeout:?}")),
    };
    let _ = upstream.set_nodelay(true);
    outlier::observe(&cluster, &endpoint, Outcome::Status(200));
    endpoint.state.total.fetch_add(1, Ordering::Relaxed);
    endpoint.state.active.fetch_add(1, Ordering::Relaxed);
    let metrics = shared.metrics.tcp_connection(&shared.local, &info);
    metrics.add_received(hello.bytes.len() as u64);
    let mut downstream = Metered { inner: downstream, metrics: &metrics };
    let mut upstream = upstream;
    let result = async {
        upstream.write_all(&hello.bytes).await?;
        tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await
    }
    .await;
    endpoint.state.active.fetch_sub(1, Ordering::Relaxed);
    match result {
        Ok((up, down)) => {
            tracing::debug!(route = %route.name, upstream = %endpoint.addr, sent = down, received = up, "TLS passthrough closed")
        }
        Err(e) => tracing::debug!(route = %route.name, upstream = %endpoint.addr, error = %e, "TLS passthrough ended"),
    }
}

fn connect_failed(shared: &Shared, mut info: TcpInfo, route: &str, error: String) {
    if let (Some(cluster), Some(endpoint)) = (&info.cluster, &info.endpoint) {
        outlier::observe(cluster, endpoint, Outcome::Failure);
        tracing::warn!(%route, upstream = %endpoint.addr, %error, "TLS passthrough: upstream connect failed");
    }
    info.flags = ResponseFlags::UPSTREAM_CONNECT_FAILURE;
    drop(shared.metrics.tcp_connection(&shared.local, &info));
}

/// The downstream side of a passthrough connection, counting bytes into the TCP
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
