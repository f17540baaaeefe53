//! TLS passthrough: a connection whose ClientHello names a host of a
//! `PASSTHROUGH` server goes, still encrypted, to a destination of the matching
//! VirtualService `tls[]` route; bytes are copied both ways until either side
//! closes. Recorded in the `istio_tcp_*` metrics (reporter `source`).

use std::sync::Arc;

use tokio::net::TcpStream;

use super::hello::ClientHello;
use super::hosts;
use crate::config::gateway::SniRoute;
use crate::flags::ResponseFlags;
use crate::metrics::TcpInfo;
use crate::request_info::Reporter;
use crate::state::Shared;
use crate::tcp_proxy;
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
    let info = TcpInfo::new(Reporter::Source);
    let Some(endpoint) = balance::pick(&cluster, None, None) else {
        tracing::warn!(route = %route.name, cluster = %cluster.name, "TLS passthrough: no healthy upstream");
        return tcp_proxy::refused(&shared, info, Some(cluster), ResponseFlags::NO_HEALTHY_UPSTREAM);
    };
    tcp_proxy::proxy(&shared, downstream, &hello.bytes, info, cluster, endpoint, &route.name).await;
}
