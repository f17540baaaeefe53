//! The outbound side of a sidecar (`--outbound`, 15001): the app's own calls.
//!
//! A client that dials the listener itself (explicit proxying, the loopback
//! tests) is served as HTTP and routed by its `Host` header. A connection that
//! iptables redirected here (`serin iptables`) carries its original destination:
//! the service is found by that address and port (a ServiceEntry's `addresses`),
//! else by the `Host` header (HTTP) or the server name (TLS). The protocol is the
//! service port's declared one, or sniffed from the first bytes: HTTP is routed
//! as usual; TLS and anything else pass through as opaque TCP. Destinations the
//! registry does not know follow the outbound traffic policy: `ALLOW_ANY` sends
//! them on to where they were going (`PassthroughCluster`), `REGISTRY_ONLY`
//! refuses them (`BlackHoleCluster`: HTTP 502, TCP closed).

pub mod passthrough;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};

use crate::flags::ResponseFlags;
use crate::forward::{ConnInfo, RouteSource, listener};
use crate::gateway::hello;
use crate::graceful::GracefulShutdown;
use crate::metrics::TcpInfo;
use crate::original_dst;
use crate::request_info::Reporter;
use crate::snapshot::{Route, ServiceInfo};
use crate::sniff::{self, Detected};
use crate::state::Shared;
use crate::tcp_proxy;
use crate::upstream::balance;

/// What happens to captured traffic for destinations the registry does not know
/// (Istio's `meshConfig.outboundTrafficPolicy.mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OutboundPolicy {
    /// On to the original destination (`PassthroughCluster`), Istio's default.
    #[default]
    #[value(name = "ALLOW_ANY", alias = "allow-any")]
    AllowAny,
    /// Refused (`BlackHoleCluster`).
    #[value(name = "REGISTRY_ONLY", alias = "registry-only")]
    RegistryOnly,
}

/// A connection captured by iptables on its way to `dst`.
#[derive(Debug)]
pub struct Captured {
    /// The original destination.
    pub dst: SocketAddr,
    /// The registry service at `dst`, if any: its routes serve the connection.
    pub service: Option<Arc<ServiceInfo>>,
    /// Where a request for a host the routes do not know goes: the original
    /// destination under `ALLOW_ANY`, nowhere (502) under `REGISTRY_ONLY`.
    pub passthrough: Option<Route>,
}

/// Serves the outbound listener until the drain starts.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, policy: OutboundPolicy, timeouts: listener::Timeouts) {
    let graceful = GracefulShutdown::new();
    let server = listener::HttpServer::new(timeouts.idle);
    let accept_shared = shared.clone();
    listener::accept_loop(listener, &accept_shared, |stream, remote| {
        let local = stream.local_addr().unwrap_or(remote);
        let info = ConnInfo::new(remote, local, Reporter::Source, RouteSource::Outbound);
        let Some(dst) = original_dst::redirected(&stream) else {
            listener::serve_http(&server, &graceful, stream, shared.clone(), info);
            return;
        };
        let (shared, server, watcher) = (shared.clone(), server.clone(), graceful.watcher());
        tokio::spawn(async move {
            let service = shared.snapshot.load().service_by_addr(dst).cloned();
            let declared = service.as_ref().and_then(|s| s.protocol(dst.port())).map(str::to_ascii_uppercase);
            let detected = match declared.as_deref() {
                Some("HTTP" | "HTTP2" | "GRPC" | "GRPC-WEB") => Detected::Http,
                Some(_) => Detected::Tcp,
                None => sniff::detect(&stream).await,
            };
            tracing::debug!(%remote, %dst, service = ?service.as_ref().map(|s| &s.host), ?detected, "captured connection");
            match detected {
                Detected::Closed => {}
                Detected::Http => {
                    let passthrough = match policy {
                        OutboundPolicy::AllowAny => passthrough::route(dst, &shared),
                        OutboundPolicy::RegistryOnly => None,
                    };
                    let mut info = info;
                    info.captured = Some(Arc::new(Captured { dst, service, passthrough }));
                    listener::serve_http_watched(&server, watcher, stream, shared, info);
                }
                Detected::Tls => opaque(stream, dst, service, &shared, policy, true).await,
                Detected::Tcp => opaque(stream, dst, service, &shared, policy, false).await,
            }
        });
    })
    .await;
    listener::drain_connections(graceful, timeouts.drain).await;
}

/// Passes a captured non-HTTP connection through: to the service found by its
/// original destination (or, for TLS, by its server name), else by the policy.
async fn opaque(
    mut stream: TcpStream,
    dst: SocketAddr,
    mut service: Option<Arc<ServiceInfo>>,
    shared: &Shared,
    policy: OutboundPolicy,
    tls: bool,
) {
    let mut prefix = Vec::new();
    if tls {
        match hello::read_client_hello(&mut stream).await {
            Ok(h) => {
                if service.is_none()
                    && let Some(sni) = &h.sni
                {
                    service = shared.snapshot.load().services.get(sni).cloned();
                }
                prefix = h.bytes;
            }
            Err(e) => {
                tracing::debug!(%dst, error = %e, "captured TLS connection: no usable ClientHello; closing");
                return;
            }
        }
    }
    let info = TcpInfo::new(Reporter::Source);
    match (service, policy) {
        (Some(service), _) => {
            let name = format!("outbound|{}||{}", dst.port(), service.host);
            let cluster = shared.snapshot.load().clusters.get(&name).cloned();
            let Some(cluster) = cluster else {
                tracing::warn!(%dst, cluster = %name, "captured connection: the service has no such port");
                return tcp_proxy::refused(shared, info, None, ResponseFlags::NO_ROUTE);
            };
            let Some(endpoint) = balance::pick(&cluster, None, None) else {
                tracing::warn!(%dst, cluster = %name, "captured connection: no healthy upstream");
                return tcp_proxy::refused(shared, info, Some(cluster), ResponseFlags::NO_HEALTHY_UPSTREAM);
            };
            tcp_proxy::proxy(shared, stream, &prefix, info, cluster, endpoint, &name).await;
        }
        (None, OutboundPolicy::AllowAny) => {
            let cluster = passthrough::cluster(dst, shared);
            let Some(endpoint) = cluster.endpoints.first().cloned() else { return };
            tcp_proxy::proxy(shared, stream, &prefix, info, cluster, endpoint, passthrough::PASSTHROUGH).await;
        }
        (None, OutboundPolicy::RegistryOnly) => {
            tracing::info!(%dst, cluster = passthrough::BLACK_HOLE, "captured connection to an unknown destination refused (REGISTRY_ONLY)");
            tcp_proxy::refused(shared, info, Some(passthrough::black_hole()), ResponseFlags::NO_ROUTE);
        }
    }
}
