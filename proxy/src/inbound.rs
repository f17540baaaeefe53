//! The inbound side of a sidecar: traffic addressed to the pod, forwarded to the
//! local app (`--app`) and recorded with `reporter="destination"`. The same
//! request path serves it, over a one-route snapshot built here.
//!
//! Each connection is sniffed: a TLS ClientHello is terminated with the
//! workload certificate and the caller's client certificate is verified against
//! the mesh roots; anything else is plaintext. PeerAuthentication decides what is
//! accepted: STRICT refuses plaintext, DISABLE refuses TLS, PERMISSIVE (the
//! default) takes both on the same port.
//!
//! Plaintext that is not HTTP is passed to the app as opaque TCP (after a
//! connection-level AuthorizationPolicy check).
//!
//! A connection iptables redirected here (`serin iptables`) goes to the app on
//! the port the caller dialled, on loopback; one that dialled this listener
//! itself goes to `--app`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use tokio::net::{TcpListener, TcpStream};

use crate::cork::CorkedTcp;
use crate::flags::ResponseFlags;
use crate::forward::{ConnInfo, RouteSource, listener};
use crate::graceful::GracefulShutdown;
use crate::metrics::TcpInfo;
use crate::original_dst;
use crate::request_info::{PeerTls, Reporter};
use crate::security::MtlsMode;
use crate::snapshot::{
    Cluster, Endpoint, EndpointRegistry, HeaderOps, HostPattern, RetryOn, RetryPolicy, Route, RouteAction,
    RouteDestination, ServiceInfo, Snapshot, TrafficPolicy, VirtualHost, WeightedDestinations,
};
use crate::sniff::{self, Detected};
use crate::state::LocalWorkload;
use crate::state::Shared;
use crate::tcp_proxy;

/// The inbound snapshot: any host, any path → the app at `app`. Istio's inbound
/// default retry (`reset-before-request`) becomes one retry on connect failure.
pub fn snapshot(app: SocketAddr, inbound_port: u16, local: &LocalWorkload, registry: &EndpointRegistry) -> Snapshot {
    let host = format!("{}.{}.svc.cluster.local", local.app, local.namespace);
    let service = Arc::new(ServiceInfo {
        host: host.clone(),
        name: local.app.clone(),
        namespace: local.namespace.clone(),
        ports: vec![(app.port(), "HTTP".into())],
        addresses: Vec::new(),
    });
    let endpoint = Arc::new(Endpoint {
        addr: app,
        labels: vec![("app".into(), local.app.clone()), ("version".into(), local.version.clone())],
        workload: local.workload.clone(),
        namespace: local.namespace.clone(),
        service_account: None,
        state: registry.get_or_create(app),
    });
    let name = format!("inbound|{inbound_port}||");
    let cluster = Arc::new(Cluster {
        name: name.clone(),
        service,
        subset: None,
        port: app.port(),
        endpoints: vec![endpoint],
        policy: TrafficPolicy::default(),
        rr_cursor: AtomicU64::new(0),
    });
    let destinations = WeightedDestinations::new(vec![RouteDestination {
        cluster: cluster.clone(),
        weight: 100,
        headers: HeaderOps::default(),
    }]);
    let route = Route {
        name: "inbound".into(),
        matches: Vec::new(),
        action: match destinations {
            Some(d) => RouteAction::Forward(d),
            None => RouteAction::Direct { status: http::StatusCode::SERVICE_UNAVAILABLE, body: bytes::Bytes::new() },
        },
        timeout: None,
        retry: RetryPolicy {
            attempts: 1,
            per_try_timeout: None,
            retry_on: RetryOn { connect_failure: true, ..RetryOn::default() },
            retriable_status_codes: Vec::new(),
            backoff_base: Duration::from_millis(25),
        },
        fault: None,
        headers: HeaderOps::default(),
        rewrite: None,
        mirror: None,
    };
    Snapshot {
        version: format!("inbound-{app}"),
        source: format!("inbound:{app}"),
        created: SystemTime::now(),
        virtual_hosts: vec![VirtualHost {
            name: "inbound".into(),
            domains: vec![HostPattern::Any],
            routes: vec![route],
        }],
        clusters: HashMap::from([(name, cluster)]),
        services: HashMap::new(),
        security: crate::security::SecurityPolicies::default(),
    }
}

/// The first byte of a TLS record carrying a handshake (the ClientHello).
const TLS_HANDSHAKE: u8 = 0x16;

/// How long a new connection may take to send its first byte or finish its TLS
/// handshake before it is dropped.
const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the inbound listener until the drain starts. `app_port` is the port the
/// workload listens on (PeerAuthentication's port-level settings refer to it).
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, app_port: u16, timeouts: listener::Timeouts) {
    let graceful = GracefulShutdown::new();
    let server = listener::HttpServer::new(timeouts.idle);
    let labels = Arc::new(local_labels(&shared.local));
    let accept_shared = shared.clone();
    let mut captured_ports = CapturedPorts::default();
    listener::accept_loop(listener, &accept_shared, |stream, remote| {
        let (shared, server, labels, watcher) = (shared.clone(), server.clone(), labels.clone(), graceful.watcher());
        let local = stream.local_addr().unwrap_or(remote);
        // Captured by iptables: the app listens on the port the caller dialled;
        // otherwise the caller dialled this listener and the app is `--app`.
        let (routes, local, port) = match original_dst::redirected(&stream) {
            Some(dst) if dst.port() != app_port => (captured_ports.routes(&shared, dst, local.port()), dst, dst.port()),
            Some(dst) => (RouteSource::Inbound, dst, app_port),
            None => (RouteSource::Inbound, local, app_port),
        };
        tokio::spawn(async move {
            let mut info = ConnInfo::new(remote, local, Reporter::Destination, routes);
            info.labels = Some(labels.clone());
            match accept(stream, &shared, &labels, port).await {
                Some(Accepted::Plain(stream)) => match sniff::detect(&stream).await {
                    Detected::Http => listener::serve_http_watched(&server, watcher, stream, shared, info),
                    Detected::Closed => {}
                    Detected::Tls | Detected::Tcp => opaque(stream, &shared, &info, &labels, port).await,
                },
                Some(Accepted::Tls(stream, peer)) => {
                    info.peer = Some(peer);
                    let cork = stream.get_ref().0.cork();
                    listener::serve_http_corked(&server, watcher, *stream, cork, shared, info);
                }
                None => {}
            }
        });
    })
    .await;
    listener::drain_connections(graceful, timeouts.drain).await;
}

/// A plaintext connection that is not HTTP (a database protocol, say): checked
/// against AuthorizationPolicy at the connection level, then passed to the app
/// as it is, recorded in the `istio_tcp_*` metrics.
async fn opaque(stream: TcpStream, shared: &Shared, info: &ConnInfo, labels: &[(String, String)], port: u16) {
    let snapshot = match &info.routes {
        RouteSource::Own(routes) => routes.load_full(),
        _ => shared.inbound.load_full(),
    };
    let Some(cluster) = snapshot.clusters.values().next().cloned() else { return };
    let Some(endpoint) = cluster.endpoints.first().cloned() else { return };
    let tcp = TcpInfo::new(Reporter::Destination);
    let policies = shared.snapshot.load();
    if policies.security.has_authorization(&shared.local.namespace, labels) {
        let attrs = crate::security::ConnAttrs {
            source_principal: None,
            source_namespace: None,
            source_ip: info.remote.ip(),
            port,
        };
        if let crate::security::Decision::Deny { policy } =
            policies.security.authorize_tcp(&shared.local.namespace, labels, &attrs)
        {
            tracing::debug!(%policy, remote = %info.remote, port, "TCP connection denied by AuthorizationPolicy");
            return tcp_proxy::refused(shared, tcp, Some(cluster), ResponseFlags::RBAC_DENIED);
        }
    }
    drop(policies);
    tcp_proxy::proxy(shared, stream, &[], tcp, cluster, endpoint, "inbound").await;
}

/// The inbound routes of each captured port other than `--app`'s: the app on
/// that port on loopback (built on first use; the inbound routes do not depend
/// on the config).
#[derive(Default)]
struct CapturedPorts {
    routes: HashMap<u16, RouteSource>,
}

impl CapturedPorts {
    fn routes(&mut self, shared: &Shared, dst: SocketAddr, inbound_port: u16) -> RouteSource {
        self.routes
            .entry(dst.port())
            .or_insert_with(|| {
                let loopback: std::net::IpAddr = if dst.is_ipv6() && !dst.ip().to_canonical().is_ipv4() {
                    std::net::Ipv6Addr::LOCALHOST.into()
                } else {
                    std::net::Ipv4Addr::LOCALHOST.into()
                };
                let app = SocketAddr::new(loopback, dst.port());
                let snapshot = snapshot(app, inbound_port, &shared.local, &shared.registry);
                RouteSource::Own(Arc::new(arc_swap::ArcSwap::from_pointee(snapshot)))
            })
            .clone()
    }
}

/// The local workload's labels, as PeerAuthentication and AuthorizationPolicy selectors see them.
pub fn local_labels(local: &LocalWorkload) -> Vec<(String, String)> {
    vec![("app".into(), local.app.clone()), ("version".into(), local.version.clone())]
}

enum Accepted {
    Plain(TcpStream),
    /// Mutual TLS over a corked socket (the responses of one turn of the
    /// connection's task leave together: `cork.rs`).
    Tls(Box<tokio_rustls::server::TlsStream<CorkedTcp>>, Arc<PeerTls>),
}

/// Sniffs the connection and applies the peer-authentication mode; `None` when
/// the connection is refused (and counted) or fails its handshake.
async fn accept(stream: TcpStream, shared: &Shared, labels: &[(String, String)], app_port: u16) -> Option<Accepted> {
    let remote = stream.peer_addr().ok();
    let mut first = [0u8; 1];
    let is_tls = match tokio::time::timeout(FIRST_BYTES_TIMEOUT, stream.peek(&mut first)).await {
        Ok(Ok(1)) => first[0] == TLS_HANDSHAKE,
        _ => return None,
    };
    let mode = shared.snapshot.load().security.peer_mode(&shared.local.namespace, labels, app_port);
    match (is_tls, mode) {
        (false, MtlsMode::Strict) => {
            shared.metrics.inbound_refused("plaintext_strict");
            tracing::info!(?remote, "plaintext connection refused: PeerAuthentication is STRICT");
            return None;
        }
        (true, MtlsMode::Disable) => {
            shared.metrics.inbound_refused("tls_disabled");
            tracing::info!(?remote, "TLS connection refused: PeerAuthentication is DISABLE");
            return None;
        }
        (false, _) => return Some(Accepted::Plain(stream)),
        (true, _) => {}
    }
    let Some(bundle) = shared.mesh.bundle() else {
        shared.metrics.inbound_refused("no_identity");
        tracing::warn!(?remote, "TLS connection refused: this sidecar has no workload certificate (--cert-dir)");
        return None;
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(bundle.server_config().clone());
    let stream = CorkedTcp::new(stream);
    let tls = match tokio::time::timeout(FIRST_BYTES_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            shared.metrics.inbound_refused("tls_handshake");
            tracing::info!(?remote, error = %e, "inbound mutual TLS handshake failed");
            return None;
        }
        Err(_) => {
            shared.metrics.inbound_refused("tls_handshake");
            return None;
        }
    };
    let Some(peer) = peer_tls(tls.get_ref().1.peer_certificates().unwrap_or_default(), &bundle) else {
        shared.metrics.inbound_refused("no_spiffe_id");
        tracing::info!(?remote, "inbound TLS peer refused: its certificate carries no SPIFFE identity");
        return None;
    };
    Some(Accepted::Tls(Box::new(tls), Arc::new(peer)))
}

/// The verified peer's identity and the `x-forwarded-client-cert` value Envoy
/// would send the app: `By=<our id>;Hash=<sha256 of the peer's leaf>;URI=<peer id>`.
fn peer_tls(certs: &[rustls::pki_types::CertificateDer<'_>], bundle: &serin_certs::IdentityBundle) -> Option<PeerTls> {
    let leaf = certs.first()?;
    let id = serin_certs::peer_spiffe_id(certs)?;
    let digest = ring::digest::digest(&ring::digest::SHA256, leaf.as_ref());
    let hash: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let xfcc = format!("By={};Hash={hash};Subject=\"\";URI={id}", bundle.identity().spiffe_id());
    Some(PeerTls {
        spiffe: id.to_string(),
        principal: id.principal(),
        namespace: id.namespace().to_string(),
        xfcc: http::HeaderValue::from_str(&xfcc).ok()?,
    })
}
