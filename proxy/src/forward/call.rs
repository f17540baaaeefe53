//! One call to a cluster: pick an endpoint, check out a connection, send, and
//! retry by the route's policy with per-try timeouts and outlier detection.

use std::net::SocketAddr;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version, header};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use crate::body::{self, ProxyBody};
use crate::flags::ResponseFlags;
use crate::request_info::Text;
use crate::snapshot::{Cluster, Route};
use crate::upstream::balance;
use crate::upstream::outlier::{self, Outcome};
use crate::upstream::pool::{PoolError, PooledBody, UpstreamProtocol};

use super::record::{Recorder, grpc_status};
use super::retry;

/// The request as it goes upstream, minus its body.
#[derive(Debug)]
pub struct UpstreamHead {
    pub method: Method,
    /// Path and query (shares the received request's bytes unless rewritten).
    pub path: PathAndQuery,
    pub authority: Text,
    pub headers: HeaderMap,
    pub protocol: UpstreamProtocol,
}

/// The request body: buffered (replayable) or streaming (sent at most once).
#[derive(Debug)]
pub enum RequestBody {
    Buffered(Bytes),
    Stream(Option<ProxyBody>),
}

/// Why a call produced no upstream response.
#[derive(Debug)]
pub enum CallError {
    /// No endpoint, or every endpoint ejected: 503 UH.
    NoHealthy,
    /// Connection refused or connect timeout: 503 UF.
    Connect { retried: bool },
    /// Pending-request limit: 503 UO.
    Overflow,
    /// Route or per-try timeout: 504 UT.
    Timeout,
    /// The upstream reset the connection or stream: 503 UC.
    Reset { retried: bool },
}

impl CallError {
    /// Status, flag and body text of the local reply.
    pub fn reply(&self) -> (StatusCode, ResponseFlags, &'static str) {
        let urx = |retried: bool| {
            if retried { ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED } else { ResponseFlags::NONE }
        };
        match self {
            CallError::NoHealthy => {
                (StatusCode::SERVICE_UNAVAILABLE, ResponseFlags::NO_HEALTHY_UPSTREAM, "no healthy upstream")
            }
            CallError::Connect { retried } => (
                StatusCode::SERVICE_UNAVAILABLE,
                ResponseFlags::UPSTREAM_CONNECT_FAILURE | urx(*retried),
                "upstream connect error or disconnect/reset before headers. reset reason: connection failure",
            ),
            CallError::Overflow => (
                StatusCode::SERVICE_UNAVAILABLE,
                ResponseFlags::UPSTREAM_OVERFLOW,
                "upstream connect error or disconnect/reset before headers. reset reason: overflow",
            ),
            CallError::Timeout => {
                (StatusCode::GATEWAY_TIMEOUT, ResponseFlags::UPSTREAM_TIMEOUT, "upstream request timeout")
            }
            CallError::Reset { retried } => (
                StatusCode::SERVICE_UNAVAILABLE,
                ResponseFlags::UPSTREAM_CONNECTION_TERMINATION | urx(*retried),
                "upstream connect error or disconnect/reset before headers. reset reason: connection termination",
            ),
        }
    }
}

/// Calls `cluster`, retrying as `route.retry` allows.
pub async fn call(
    cluster: &Cluster,
    route: &Route,
    head: &UpstreamHead,
    mut body: RequestBody,
    hash: Option<u64>,
    rec: &mut Recorder,
) -> Result<Response<PooledBody>, CallError> {
    let policy = &route.retry;
    let tries = 1 + policy.attempts;
    // Endpoints already tried, skipped by later tries while others are left
    // (filled only when a retry happens: no allocation otherwise).
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut previous: Option<SocketAddr> = None;
    let mut last = CallError::NoHealthy;
    for attempt in 0..tries {
        if attempt > 0 {
            tokio::time::sleep(retry::backoff(policy, attempt)).await;
        }
        tried.extend(previous.take());
        let more = attempt + 1 < tries;
        let Some(endpoint) = balance::pick_avoiding(cluster, hash, &tried) else {
            return Err(CallError::NoHealthy);
        };
        previous = Some(endpoint.addr);
        rec.info.upstream = Some(endpoint.clone());
        rec.info.attempts = attempt + 1;
        rec.set_active(endpoint.state.clone());

        let upgrade = head.headers.contains_key(header::UPGRADE);
        let in_flight = rec.shared().drain.in_flight();
        let checkout = match rec.shared().mesh.upstream_hop(cluster, &endpoint, head.protocol, upgrade, in_flight) {
            Ok((protocol, tls)) => {
                let pool = &endpoint.state.pool;
                pool.checkout(protocol, &cluster.policy.pool, tls.as_ref()).await.map(|conn| (conn, protocol))
            }
            Err(e) => Err(e),
        };
        let (conn, protocol) = match checkout {
            Ok(pair) => pair,
            Err(PoolError::Overflow { .. }) => return Err(CallError::Overflow),
            Err(e) => {
                // Handshake and identity failures are logged by the pool, once per connection.
                if matches!(e, PoolError::NoIdentity { .. }) {
                    tracing::warn!(cluster = %cluster.name, endpoint = %endpoint.addr, error = %e, "mutual TLS to upstream failed");
                }
                tracing::debug!(cluster = %cluster.name, error = %e, "upstream connect failed");
                outlier::observe(cluster, &endpoint, Outcome::Failure);
                last = CallError::Connect { retried: attempt > 0 };
                if more && retry::retriable_connect_failure(policy) {
                    continue;
                }
                return Err(last);
            }
        };
        let replayable = matches!(body, RequestBody::Buffered(_));
        let req = build_request(head, protocol, &mut body, &endpoint.addr);
        let sent = match policy.per_try_timeout {
            Some(limit) => tokio::time::timeout(limit, conn.send(req)).await.map_err(|_| ()),
            None => Ok(conn.send(req).await),
        };
        match sent {
            Err(()) => {
                outlier::observe(cluster, &endpoint, Outcome::Failure);
                last = CallError::Timeout;
                let retriable = replayable && retry::retriable_timeout(policy);
                if more && retriable {
                    continue;
                }
                if retriable && policy.attempts > 0 {
                    rec.info.flags.insert(ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED);
                }
                return Err(last);
            }
            Ok(Ok(resp)) => {
                let status = resp.status().as_u16();
                outlier::observe(cluster, &endpoint, Outcome::Status(status));
                let grpc = grpc_status(resp.headers());
                let retriable = replayable && retry::retriable_response(policy, status, grpc);
                if more && retriable {
                    tracing::debug!(cluster = %cluster.name, status, "retrying");
                    continue;
                }
                if retriable && policy.attempts > 0 {
                    // Envoy passes the last retriable answer on, flagged URX.
                    rec.info.flags.insert(ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED);
                }
                return Ok(resp);
            }
            Ok(Err(e)) => {
                let refused = matches!(e, PoolError::Send { refused: true, .. });
                tracing::debug!(cluster = %cluster.name, error = %e, "upstream request failed");
                outlier::observe(cluster, &endpoint, Outcome::Failure);
                last = if e.is_connect_failure() {
                    CallError::Connect { retried: attempt > 0 }
                } else {
                    CallError::Reset { retried: attempt > 0 }
                };
                let may_retry = (replayable || refused) && retry::retriable_reset(policy, refused);
                if more && may_retry && !matches!(body, RequestBody::Stream(None)) {
                    continue;
                }
                return Err(last);
            }
        }
    }
    Err(last)
}

/// Builds the request of one try. A streaming body is taken by the first try.
pub(super) fn build_request(
    head: &UpstreamHead,
    protocol: UpstreamProtocol,
    body: &mut RequestBody,
    addr: &SocketAddr,
) -> Request<ProxyBody> {
    let body = match body {
        RequestBody::Buffered(bytes) => body::full(bytes.clone()),
        RequestBody::Stream(stream) => stream.take().unwrap_or_else(body::empty),
    };
    let mut req = Request::new(body);
    *req.method_mut() = head.method.clone();
    *req.headers_mut() = head.headers.clone();
    match protocol {
        UpstreamProtocol::Http2 => {
            *req.version_mut() = Version::HTTP_2;
            // Built from its parts: no formatting and no second parse of the path.
            let authority = head.authority.to_authority().or_else(|| fallback_authority(addr));
            let mut parts = http::uri::Parts::default();
            if authority.is_some() {
                parts.scheme = Some(Scheme::HTTP);
                parts.authority = authority;
            }
            parts.path_and_query = Some(head.path.clone());
            *req.uri_mut() = Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("/"));
            req.headers_mut().remove(header::HOST);
        }
        UpstreamProtocol::Http1 => {
            *req.version_mut() = Version::HTTP_11;
            *req.uri_mut() = Uri::from(head.path.clone());
            // The received `Host` is usually the authority already: keep it then.
            let mut hosts = req.headers().get_all(header::HOST).iter();
            let same =
                hosts.next().is_some_and(|h| h.as_bytes() == head.authority.as_bytes()) && hosts.next().is_none();
            if !same && let Some(host) = head.authority.to_header_value() {
                req.headers_mut().insert(header::HOST, host);
            }
        }
    }
    req
}

/// The endpoint's address as the authority of an HTTP/2 request whose own
/// authority is not a valid one.
fn fallback_authority(addr: &SocketAddr) -> Option<Authority> {
    Authority::try_from(addr.to_string()).ok()
}

/// Joins the two halves of an upgraded (e.g. WebSocket) connection.
pub async fn splice_upgrade(down: OnUpgrade, up: OnUpgrade) {
    match tokio::try_join!(down, up) {
        Ok((down, up)) => {
            let mut down = TokioIo::new(down);
            let mut up = TokioIo::new(up);
            if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
                tracing::debug!(error = %e, "upgraded connection ended");
            }
        }
        Err(e) => tracing::debug!(error = %e, "upgrade failed"),
    }
}
