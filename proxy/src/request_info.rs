//! What is known about one finished request: the input of metrics and the access log.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::HeaderValue;
use http::uri::{Authority, PathAndQuery};

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
    pub path: Text,
    /// `HTTP/1.1`, `HTTP/2`, …
    pub protocol: &'static str,
    /// Host / :authority as received.
    pub authority: Text,
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
    pub request_id: Text,
    pub user_agent: Option<Text>,
    pub downstream_remote: SocketAddr,
    /// The downstream peer, when the connection is mutual TLS.
    pub peer: Option<Arc<PeerTls>>,
}

/// A string of the request (path, authority, request id, user agent) that shares
/// the received request's bytes where it can: taking it from the request and
/// cloning it copy nothing and allocate nothing.
#[derive(Clone, Default)]
pub struct Text(Repr);

#[derive(Clone)]
enum Repr {
    Static(&'static str),
    /// Valid UTF-8 (checked when made).
    Bytes(Bytes),
    Path(PathAndQuery),
    Authority(Authority),
    /// Visible ASCII (`to_str` succeeded when made).
    Header(HeaderValue),
}

impl Default for Repr {
    fn default() -> Self {
        Repr::Static("")
    }
}

impl Text {
    /// A header's value, if it is visible ASCII (as `HeaderValue::to_str` requires).
    pub fn from_header(value: &HeaderValue) -> Option<Text> {
        value.to_str().ok().map(|_| Text(Repr::Header(value.clone())))
    }

    /// The text as a `&str`.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            Repr::Static(s) => s,
            Repr::Bytes(b) => std::str::from_utf8(b).unwrap_or(""),
            Repr::Path(p) => p.as_str(),
            Repr::Authority(a) => a.as_str(),
            Repr::Header(h) => h.to_str().unwrap_or(""),
        }
    }

    /// As a header value (shared, not copied, when it came from one).
    pub fn to_header_value(&self) -> Option<HeaderValue> {
        match &self.0 {
            Repr::Header(h) => Some(h.clone()),
            Repr::Bytes(b) => HeaderValue::from_maybe_shared(b.clone()).ok(),
            _ => HeaderValue::from_str(self.as_str()).ok(),
        }
    }

    /// As a URI authority, if it is a valid one.
    pub fn to_authority(&self) -> Option<Authority> {
        match &self.0 {
            Repr::Authority(a) => Some(a.clone()),
            Repr::Bytes(b) => Authority::from_maybe_shared(b.clone()).ok(),
            _ => Authority::try_from(self.as_str()).ok(),
        }
    }
}

impl std::ops::Deref for Text {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Text {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl From<&'static str> for Text {
    fn from(s: &'static str) -> Text {
        Text(Repr::Static(s))
    }
}

impl From<String> for Text {
    fn from(s: String) -> Text {
        Text(Repr::Bytes(Bytes::from(s)))
    }
}

impl From<PathAndQuery> for Text {
    fn from(p: PathAndQuery) -> Text {
        Text(Repr::Path(p))
    }
}

impl From<Authority> for Text {
    fn from(a: Authority) -> Text {
        Text(Repr::Authority(a))
    }
}

impl TryFrom<Bytes> for Text {
    type Error = std::str::Utf8Error;

    fn try_from(b: Bytes) -> Result<Text, Self::Error> {
        std::str::from_utf8(&b)?;
        Ok(Text(Repr::Bytes(b)))
    }
}

impl PartialEq for Text {
    fn eq(&self, other: &Text) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Text {}

impl PartialEq<str> for Text {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Text {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl std::fmt::Debug for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_reads_the_same_from_every_source() {
        let header = HeaderValue::from_static("payment:8080");
        let all = [
            Text::from("payment:8080"),
            Text::from("payment:8080".to_string()),
            Text::from_header(&header).expect("visible ASCII"),
            Text::from(Authority::from_static("payment:8080")),
            Text::try_from(Bytes::from_static(b"payment:8080")).expect("UTF-8"),
        ];
        for t in &all {
            assert_eq!(t.as_str(), "payment:8080");
            assert_eq!(t, &all[0]);
            assert_eq!(t.to_header_value().as_ref(), Some(&header));
            assert_eq!(t.to_authority(), Some(Authority::from_static("payment:8080")));
            assert_eq!(format!("{t:?}"), "\"payment:8080\"");
        }
        assert_eq!(Text::from(PathAndQuery::from_static("/pay?x=1")), "/pay?x=1");
        assert_eq!(Text::default(), "");
        assert!(Text::from_header(&HeaderValue::from_bytes(b"caf\xe9").expect("obs-text")).is_none());
        assert!(Text::try_from(Bytes::from_static(b"\xff")).is_err());
    }
}
