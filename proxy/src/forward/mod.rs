//! The HTTP request path: route a request by the current snapshot, apply the
//! route's fault, rewrite and header rules, call the picked destination with
//! retries and timeouts, and stream the response back while recording it.

pub mod call;
pub mod headers;
pub mod listener;
pub mod local_reply;
pub mod mirror;
pub mod record;
pub mod retry;

use std::borrow::Cow;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderMap, Request, Response, StatusCode, Uri, Version, header};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::body::{self, ProxyBody};
use crate::flags::ResponseFlags;
use crate::request_info::{Reporter, RequestInfo, Text};
use crate::router::{self, RequestView};
use crate::snapshot::{Fault, FaultAbort, HashKey, LoadBalancer, Rewrite, Route, RouteAction, WeightedDestinations};
use crate::state::Shared;
use crate::upstream::balance::hash_of;
use crate::upstream::pool::UpstreamProtocol;
use crate::upstream::split;

use call::{CallError, RequestBody, UpstreamHead};
use local_reply::local_reply;
use record::{CountingBody, ObservedBody, Recorder};

/// The largest request body kept in memory so that it can be retried or
/// mirrored; larger or unsized bodies stream and are tried once.
pub const MAX_REPLAY_BODY: u64 = 64 * 1024;

/// What the listener knows about the downstream connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    pub local: SocketAddr,
    pub reporter: Reporter,
    /// Which routes serve this listener.
    pub routes: RouteSource,
    /// The verified peer when the connection is mutual TLS.
    pub peer: Option<Arc<crate::request_info::PeerTls>>,
    /// The proxy terminated TLS for this connection at the edge (a gateway's
    /// HTTPS server): requests have scheme `https` and `x-forwarded-proto: https`.
    pub tls: bool,
    /// The listener is the mesh's edge (a gateway), Envoy's `use_remote_address`
    /// as Istio sets it there: the client's address is appended to
    /// `x-forwarded-for` and `x-forwarded-proto` is this connection's scheme.
    /// Sidecars leave `x-forwarded-for` alone and set `x-forwarded-proto` only
    /// when it is absent.
    pub edge: bool,
    /// Set when iptables redirected the connection here: its original
    /// destination, the service there and the fallback for unknown hosts.
    pub captured: Option<Arc<crate::outbound::Captured>>,
    /// The local workload's labels for AuthorizationPolicy selectors, when the
    /// listener has them (inbound); else they are built per request.
    pub labels: Option<Arc<Vec<(String, String)>>>,
}

/// The snapshot a listener routes by.
#[derive(Debug, Clone)]
pub enum RouteSource {
    /// The sidecar's outbound routes (`Shared::snapshot`).
    Outbound,
    /// The inbound one-route snapshot (`Shared::inbound`).
    Inbound,
    /// A listener's own routes (a gateway server), swapped on reload.
    Own(Arc<arc_swap::ArcSwap<crate::snapshot::Snapshot>>),
}

impl ConnInfo {
    /// A plaintext connection's info.
    pub fn new(remote: SocketAddr, local: SocketAddr, reporter: Reporter, routes: RouteSource) -> ConnInfo {
        ConnInfo { remote, local, reporter, routes, peer: None, tls: false, edge: false, captured: None, labels: None }
    }
}

/// Serves one request; never fails (errors become local replies).
pub async fn handle(
    shared: Arc<Shared>,
    conn: ConnInfo,
    mut req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
    let on_upgrade = (req.version() == Version::HTTP_11 && req.headers().contains_key(header::UPGRADE))
        .then(|| hyper::upgrade::on(&mut req));
    let (mut parts, incoming) = req.into_parts();
    let request_id = headers::ensure_request_id(&mut parts.headers);
    let authority = request_authority(&parts.uri, &parts.headers);
    let default_port = conn.captured.as_ref().map_or(conn.local.port(), |c| c.dst.port());
    let (host, port) = split_host_port(&authority, default_port);
    let info = RequestInfo {
        reporter: conn.reporter,
        start: SystemTime::now(),
        duration: Default::default(),
        method: parts.method.clone(),
        path: parts.uri.path_and_query().map_or_else(|| Text::from("/"), |p| Text::from(p.clone())),
        protocol: protocol_name(parts.version),
        authority: authority.clone(),
        status: 0,
        grpc_status: None,
        is_grpc: is_grpc(&parts.headers),
        flags: ResponseFlags::NONE,
        bytes_received: 0,
        bytes_sent: 0,
        route_name: None,
        cluster: None,
        upstream: None,
        attempts: 0,
        request_id,
        user_agent: parts.headers.get(header::USER_AGENT).and_then(Text::from_header),
        downstream_remote: conn.remote,
        peer: conn.peer.clone(),
    };
    let mut rec = Recorder::new(shared.clone(), info, started);
    let counter = (!incoming.is_end_stream()).then(|| rec.received_counter());
    let body = CountingBody::new(incoming, counter);
    if let Some((status, text)) = malformed(&parts) {
        return Ok(local_reply(rec, status, ResponseFlags::DOWNSTREAM_PROTOCOL_ERROR, text));
    }

    let snapshot = match &conn.routes {
        RouteSource::Outbound => shared.snapshot.load_full(),
        RouteSource::Inbound => shared.inbound.load_full(),
        RouteSource::Own(routes) => routes.load_full(),
    };
    // A captured connection is for the service at its original destination;
    // otherwise (or when that has no routes) the Host header decides.
    let by_destination = conn.captured.as_ref().and_then(|c| c.service.as_ref());
    let vh =
        by_destination.and_then(|s| snapshot.find_virtual_host(&s.host)).or_else(|| snapshot.find_virtual_host(&host));
    let view = RequestView {
        method: &parts.method,
        path: parts.uri.path(),
        query: parts.uri.query().unwrap_or(""),
        scheme: if conn.tls { "https" } else { "http" },
        authority: &authority,
        headers: &parts.headers,
        port,
    };
    if conn.reporter == Reporter::Destination
        && let Some(reply) = authorize(&shared, &conn, &view)
    {
        return Ok(local_reply(rec, StatusCode::FORBIDDEN, ResponseFlags::RBAC_DENIED, reply));
    }
    let route = match (vh, &conn.captured) {
        (Some(vh), _) => router::find_route(vh, &view),
        (None, Some(captured)) => match &captured.passthrough {
            Some(route) => Some(route),
            None => {
                rec.info.cluster = Some(crate::outbound::passthrough::black_hole());
                return Ok(local_reply(
                    rec,
                    StatusCode::BAD_GATEWAY,
                    ResponseFlags::NO_ROUTE,
                    "destination not in the registry (outbound traffic policy REGISTRY_ONLY)",
                ));
            }
        },
        (None, None) => None,
    };
    let Some(route) = route else {
        return Ok(local_reply(rec, StatusCode::NOT_FOUND, ResponseFlags::NO_ROUTE, "route not found"));
    };
    rec.info.route_name = Some(route.name.clone());

    let dests = match &route.action {
        RouteAction::Forward(dests) => dests,
        RouteAction::Direct { status, body } => {
            return Ok(local_reply(rec, *status, ResponseFlags::NONE, body.clone()));
        }
        RouteAction::Redirect(r) => return Ok(local_reply::redirect(rec, r, &parts.uri, &authority)),
    };

    if let Some(fault) = &route.fault
        && let Some(abort) = inject_fault(fault, &mut rec).await
    {
        return Ok(local_reply::fault_abort(rec, abort));
    }

    let hash = request_hash(dests, &parts.headers, view.query, conn.remote);
    let dest = split::pick(dests, shared.split_mode, hash);
    // The endpoint is picked by the chosen cluster's own policy: a subset-level
    // consistentHash applies even when another subset comes first in the route.
    let hash = cluster_hash(&dest.cluster, &parts.headers, view.query, conn.remote);
    let cluster = dest.cluster.clone();
    rec.info.cluster = Some(cluster.clone());

    let upgrade = on_upgrade.is_some();
    headers::strip_hop_by_hop(&mut parts.headers, upgrade);
    if conn.reporter == Reporter::Destination {
        // The app learns the caller from the mutual-TLS connection only, never
        // from a header the caller sent (Envoy's SANITIZE_SET).
        parts.headers.remove(X_FORWARDED_CLIENT_CERT);
        if let Some(peer) = &conn.peer {
            parts.headers.insert(X_FORWARDED_CLIENT_CERT, peer.xfcc.clone());
        }
    }
    parts.headers.remove(header::EXPECT);
    headers::set_forwarded(&mut parts.headers, conn.edge.then_some(conn.remote.ip()), conn.tls || conn.peer.is_some());
    headers::apply_edits(&mut parts.headers, &route.headers.request);
    headers::apply_edits(&mut parts.headers, &dest.headers.request);
    let (path, authority) = rewrite(route, &parts.uri, authority);

    let protocol = upstream_protocol(&cluster, parts.version, rec.info.is_grpc, upgrade);
    let replayable = incoming_is_small(&parts.headers, &body);
    let request_body = if body.is_end_stream() {
        RequestBody::Buffered(Bytes::new())
    } else if replayable && (route.retry.attempts > 0 || route.mirror.is_some()) {
        match body.collect().await {
            Ok(collected) => RequestBody::Buffered(collected.to_bytes()),
            Err(_) => {
                return Ok(local_reply(
                    rec,
                    StatusCode::BAD_REQUEST,
                    ResponseFlags::DOWNSTREAM_CONNECTION_TERMINATION,
                    "request body read failed",
                ));
            }
        }
    } else {
        RequestBody::Stream(Some(body::boxed(body)))
    };
    let head = UpstreamHead { method: parts.method, path, authority, headers: parts.headers, protocol };

    if let Some(mirror) = &route.mirror
        && let RequestBody::Buffered(bytes) = &request_body
    {
        mirror::maybe_send(&shared, mirror, &head, bytes.clone());
    }

    // The route timeout runs from the request's arrival to the response's end.
    let deadline = route.timeout.map(|t| tokio::time::Instant::from_std(started) + t);
    let call = call::call(&cluster, route, &head, request_body, hash, &mut rec);
    let outcome = match deadline {
        Some(at) => tokio::time::timeout_at(at, call).await.unwrap_or(Err(CallError::Timeout)),
        None => call.await,
    };
    let mut resp = match outcome {
        Ok(resp) => resp,
        Err(e) => {
            let (status, flag, text) = e.reply();
            return Ok(local_reply(rec, status, flag, text));
        }
    };
    // The client's connection keeps its own version: an HTTP/1.0 (or h2) upstream
    // answer must not turn an HTTP/1.1 keep-alive connection into a 1.0 one.
    // hyper answers an HTTP/1.0 client as 1.0 by itself.
    *resp.version_mut() = Version::HTTP_11;

    let status = resp.status();
    rec.info.status = status.as_u16();
    if rec.info.is_grpc {
        rec.info.grpc_status = record::grpc_status(resp.headers());
    }
    if status == StatusCode::SWITCHING_PROTOCOLS
        && let Some(down) = on_upgrade
    {
        let up = hyper::upgrade::on(&mut resp);
        tokio::spawn(call::splice_upgrade(down, up));
    } else {
        headers::strip_hop_by_hop(resp.headers_mut(), false);
    }
    headers::apply_edits(resp.headers_mut(), &route.headers.response);
    headers::apply_edits(resp.headers_mut(), &dest.headers.response);
    Ok(resp.map(|b| body::boxed(ObservedBody::new(b, rec).with_deadline(deadline))))
}

/// RFC 9112 checks that hyper leaves to the server (Envoy makes them too): an
/// HTTP/1.1 request needs exactly one `Host` (400; HTTP/1.0 at most one), and a
/// transfer coding other than `chunked` is not implemented (501).
fn malformed(parts: &http::request::Parts) -> Option<(StatusCode, &'static str)> {
    if !matches!(parts.version, Version::HTTP_10 | Version::HTTP_11) {
        return None;
    }
    let hosts = parts.headers.get_all(header::HOST).iter().count();
    if hosts > 1 || (hosts == 0 && parts.version == Version::HTTP_11) {
        return Some((StatusCode::BAD_REQUEST, "missing or repeated host header"));
    }
    let other_coding = parts
        .headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("?").split(','))
        .any(|coding| !coding.trim().eq_ignore_ascii_case("chunked"));
    other_coding.then_some((StatusCode::NOT_IMPLEMENTED, "unsupported transfer encoding"))
}

/// `x-forwarded-client-cert`.
const X_FORWARDED_CLIENT_CERT: http::HeaderName = http::HeaderName::from_static("x-forwarded-client-cert");

/// AuthorizationPolicy on the inbound side: the denial's body, or `None` to go on.
fn authorize(shared: &Shared, conn: &ConnInfo, view: &RequestView<'_>) -> Option<&'static str> {
    let snapshot = shared.snapshot.load();
    // The inbound listener works the labels out once per connection.
    let owned;
    let labels = match &conn.labels {
        Some(labels) => labels.as_slice(),
        None => {
            owned = crate::inbound::local_labels(&shared.local);
            owned.as_slice()
        }
    };
    if !snapshot.security.has_authorization(&shared.local.namespace, labels) {
        return None;
    }
    let principal = conn.peer.as_ref().map(|p| p.principal.as_str());
    let attrs = crate::security::RequestAttrs {
        source_principal: principal,
        source_namespace: conn.peer.as_ref().map(|p| p.namespace.as_str()),
        source_ip: conn.remote.ip(),
        method: view.method.as_str(),
        path: view.path,
        host: view.authority,
        port: view.port,
        headers: view.headers,
    };
    match snapshot.security.authorize(&shared.local.namespace, labels, &attrs) {
        crate::security::Decision::Allow => None,
        crate::security::Decision::Deny { policy } => {
            tracing::debug!(%policy, principal = principal.unwrap_or("-"), "request denied by AuthorizationPolicy");
            Some("RBAC: access denied")
        }
    }
}

/// Host and port as the request addressed them: `:authority` (HTTP/2 or an
/// absolute URI) or the `Host` header. Shares the request's bytes.
fn request_authority(uri: &Uri, headers: &HeaderMap) -> Text {
    uri.authority()
        .map(|a| Text::from(a.clone()))
        .or_else(|| headers.get(header::HOST).and_then(Text::from_header))
        .unwrap_or_default()
}

/// Lower-case host without port, and the port (or `default_port`).
pub fn split_host_port(authority: &str, default_port: u16) -> (Cow<'_, str>, u16) {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        // [v6]:port
        match rest.split_once(']') {
            Some((h, p)) => (h, p.strip_prefix(':').and_then(|p| p.parse().ok())),
            None => (rest, None),
        }
    } else {
        // One colon: host and port; none, or several (a bare IPv6 address): all host.
        let bytes = authority.as_bytes();
        match bytes.iter().position(|&b| b == b':') {
            Some(i) if !bytes[i + 1..].contains(&b':') => (&authority[..i], authority[i + 1..].parse().ok()),
            _ => (authority, None),
        }
    };
    // Borrowed when already lower case (the usual case): no allocation.
    let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    };
    (host, port.unwrap_or(default_port))
}

fn protocol_name(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// Whether the body is known to be small enough to buffer for retries.
fn incoming_is_small<B: http_body::Body>(headers: &HeaderMap, body: &B) -> bool {
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    declared.or(body.size_hint().exact()).is_some_and(|len| len <= MAX_REPLAY_BODY)
}

/// The upstream HTTP version. The service port's declared protocol decides, as in
/// Istio: `HTTP2` / `GRPC` / `GRPC-WEB` → h2, `HTTP` → HTTP/1.1 whatever the client
/// speaks (an HTTP/1.1-only app behind an `HTTP` port must work for h2c clients).
/// gRPC from an HTTP/2 client stays HTTP/2 (it cannot work over HTTP/1.1); a port
/// with another or no protocol keeps the client's version; an HTTP/1.1 upgrade
/// (WebSocket) always goes upstream as HTTP/1.1. The DestinationRule's
/// `h2UpgradePolicy: UPGRADE` sends HTTP/1.1 requests as HTTP/2, and
/// `useClientProtocol` keeps the client's version whatever the port says.
/// Between sidecars (mutual TLS), [`crate::mesh_tls::mesh_protocol`] decides.
fn upstream_protocol(
    cluster: &crate::snapshot::Cluster,
    downstream: Version,
    grpc: bool,
    upgrade: bool,
) -> UpstreamProtocol {
    let pool = &cluster.policy.pool;
    if upgrade {
        return UpstreamProtocol::Http1;
    }
    if pool.use_client_protocol {
        return if downstream == Version::HTTP_2 { UpstreamProtocol::Http2 } else { UpstreamProtocol::Http1 };
    }
    // Compared without case and without an upper-case copy.
    let declared = cluster.service.ports.iter().find(|(port, _)| *port == cluster.port).map(|(_, p)| p.as_str());
    let is = |name: &str| declared.is_some_and(|p| p.eq_ignore_ascii_case(name));
    let h2 = if is("HTTP2") || is("GRPC") || is("GRPC-WEB") {
        true
    } else if is("HTTP") {
        (downstream == Version::HTTP_2 && grpc) || pool.h2_upgrade == Some(true)
    } else {
        downstream == Version::HTTP_2 || pool.h2_upgrade == Some(true)
    };
    if h2 { UpstreamProtocol::Http2 } else { UpstreamProtocol::Http1 }
}

/// Applies `fault`: sleeps for an injected delay; returns the abort to answer
/// with, if one is drawn.
async fn inject_fault<'f>(fault: &'f Fault, rec: &mut Recorder) -> Option<&'f FaultAbort> {
    if let Some((delay, pct)) = fault.delay
        && hit(pct)
    {
        rec.info.flags.insert(ResponseFlags::DELAY_INJECTED);
        tokio::time::sleep(delay).await;
    }
    fault.abort.as_ref().filter(|abort| hit(abort.percentage))
}

/// True with probability `percent` / 100.
fn hit(percent: f64) -> bool {
    percent >= 100.0 || (percent > 0.0 && rand::random::<f64>() * 100.0 < percent)
}

/// The consistent-hash key of the request, when the destination's policy has one.
fn request_hash(dests: &WeightedDestinations, headers: &HeaderMap, query: &str, remote: SocketAddr) -> Option<u64> {
    cluster_hash(&dests.destinations.first()?.cluster, headers, query, remote)
}

/// The consistent-hash key of the request under `cluster`'s policy, if it has one.
fn cluster_hash(
    cluster: &crate::snapshot::Cluster,
    headers: &HeaderMap,
    query: &str,
    remote: SocketAddr,
) -> Option<u64> {
    let LoadBalancer::ConsistentHash(key) = &cluster.policy.load_balancer else {
        return None;
    };
    match key {
        HashKey::Header(name) => headers.get(name).map(|v| hash_of(&v.as_bytes())),
        HashKey::Cookie(name) => cookie(headers, name).map(|v| hash_of(&v)),
        HashKey::SourceIp => Some(hash_of(&remote.ip())),
        HashKey::QueryParam(name) => router::query_param(query, name).map(|v| hash_of(&v)),
    }
}

fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| pair.trim().split_once('=').filter(|(k, _)| *k == name).map(|(_, v)| v))
}

/// The upstream path and authority after `rewrite`. Without a rewrite the path
/// shares the received request's bytes (no copy).
fn rewrite(route: &Route, uri: &Uri, authority: Text) -> (PathAndQuery, Text) {
    let received = || uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    let Some(Rewrite { uri: new_uri, authority: new_auth }) = &route.rewrite else {
        return (received(), authority);
    };
    let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str());
    let path = match new_uri {
        Some(replacement) => {
            let prefix = route.matches.iter().find_map(|m| match &m.uri {
                // An `ignoreUriCase` prefix is stored lower-case: compare as the matcher does.
                Some(crate::snapshot::StringMatch::Prefix(p))
                    if uri.path().get(..p.len()).is_some_and(|head| {
                        if m.ignore_uri_case { head.eq_ignore_ascii_case(p) } else { head == p }
                    }) =>
                {
                    Some(p.len())
                }
                _ => None,
            });
            let rest = match prefix {
                Some(len) => &path_and_query[len..],
                // Exact or regex match: the whole path is replaced, the query kept.
                None => uri.query().map_or("", |q| &path_and_query[path_and_query.len() - q.len() - 1..]),
            };
            let joined = format!("{replacement}{rest}");
            let joined = if joined.starts_with('/') { joined } else { format!("/{joined}") };
            // A path that is not a valid URI path goes upstream as `/`, as before.
            PathAndQuery::try_from(joined).unwrap_or_else(|_| PathAndQuery::from_static("/"))
        }
        None => received(),
    };
    (path, new_auth.clone().map_or(authority, Text::from))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_port() {
        assert_eq!(split_host_port("Payment:8080", 80), ("payment".into(), 8080));
        assert_eq!(split_host_port("payment", 15001), ("payment".into(), 15001));
        assert_eq!(split_host_port("[::1]:9000", 80), ("::1".into(), 9000));
        assert_eq!(split_host_port("payment.default.svc.cluster.local", 80).0, "payment.default.svc.cluster.local");
        assert_eq!(split_host_port("payment:", 80), ("payment".into(), 80));
        assert_eq!(split_host_port("payment:65535", 80), ("payment".into(), 65535));
        assert_eq!(split_host_port("payment:65536", 80), ("payment".into(), 80));
        assert_eq!(split_host_port("fe80::1", 80), ("fe80::1".into(), 80));
    }

    #[test]
    fn prefix_rewrite_honours_ignore_uri_case() {
        let route = Route {
            name: "shop".into(),
            matches: vec![crate::snapshot::RequestMatch {
                uri: Some(crate::snapshot::StringMatch::Prefix("/shop/".into())),
                ignore_uri_case: true,
                ..Default::default()
            }],
            action: RouteAction::Direct { status: StatusCode::OK, body: Bytes::new() },
            timeout: None,
            retry: Default::default(),
            fault: None,
            headers: Default::default(),
            rewrite: Some(Rewrite { uri: Some("/".into()), authority: None }),
            mirror: None,
        };
        for path in ["/shop/cart?x=1", "/Shop/cart?x=1", "/SHOP/cart?x=1"] {
            let uri: Uri = path.parse().expect("uri");
            assert_eq!(rewrite(&route, &uri, "payment".into()).0, "/cart?x=1", "{path}");
        }
    }

    #[test]
    fn cookies() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, "a=1; user=alice; b=2".parse().expect("value"));
        assert_eq!(cookie(&h, "user"), Some("alice"));
        assert_eq!(cookie(&h, "nope"), None);
    }
}
