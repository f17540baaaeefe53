//! What is known about one finished request: the input of metrics and the access log.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::flags::ResponseFlags;
use crate::snapshot::{Cluster, Endpoint};

/// Which side of the call this proxy reports for (Istio's `reporter` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reporter {
    /// The caller's sidecar or a gateway (outbound).
    Source,
    /// The callee's sidecar (inbound).
    Destination,
}

impl Reporter {
    /// Istio's label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

/// The verified peer of a mutual-TLS connection.
#[derive(Debug, Clone)]
pub struct PeerTls {
    /// The peer's SPIFFE ID (`spiffe://cluster.local/ns/default/sa/frontend`).
    pub spiffe: String,
    /// Istio's principal form, without the scheme (`cluster.local/ns/default/sa/frontend`).
    pub principal: String,
    /// The peer's namespace, from its SPIFFE ID.
    pub namespace: String,
    /// `x-forwarded-client-cert` for the app, in Envoy's format.
    pub xfcc: http::HeaderValue,
}

/// One finished HTTP request or gRPC call.
#[derive(Debug, Clone)]
pub struct RequestInfo {
    pub reporter: Reporter,
    /// When the request's headers arrived.
    pub start: SystemTime,
    /// From the request's arrival to the end of the response (or the failure).
    pub duration: Duration,
    pub method: http::Method,
    /// Path and query as received.
    pub path: String,
    /// `HTTP/1.1`, `HTTP/2`, …
    pub protocol: &'static str,
    /// Host / :authority as received.
    pub authority: String,
    /// Status sent downstream; 0 when none was sent (client gone first).
    pub status: u16,
    /// gRPC status from the response trailers or headers, for gRPC calls.
    pub grpc_status: Option<u32>,
    /// Whether this is gRPC (`content-type: application/grpc…`).
    pub is_grpc: bool,
    pub flags: ResponseFlags,
    /// Request body bytes received from downstream.
    pub bytes_received: u64,
    /// Response body bytes sent downstream.
    pub bytes_sent: u64,
    /// The route that matched, if any.
    pub route_name: Option<String>,
    /// The cluster the request was sent to, if one was picked.
    pub cluster: Option<Arc<Cluster>>,
    /// The endpoint of the last try, if one was picked.
    pub upstream: Option<Arc<Endpoint>>,
    /// Tries made (1 + retries); 0 when none.
    pub attempts: u32,
    /// `x-request-id`.
    pub request_id: String,
    pub user_agent: Option<String>,
    pub downstream_remote: SocketAddr,
    /// The downstream peer, when the connection is mutual TLS.
    pub peer: Option<Arc<PeerTls>>,
}
