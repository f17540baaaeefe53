//! One JSON access-log line per request on stdout, with Envoy's default fields
//! (Istio's JSON access log) plus `destination_app` / `destination_version`.
//!
//! Each line is serialized into a per-thread buffer and written with one
//! `write_all` on a locked stdout, so lines from concurrent requests never
//! interleave. Diagnostics go through `tracing` (stderr), never to stdout.

use std::cell::RefCell;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;

use crate::flags::ResponseFlags;
use crate::request_info::{Reporter, RequestInfo};
use crate::state::LocalWorkload;

/// The access log; disabled, it writes nothing.
#[derive(Debug, Clone, Default)]
pub struct AccessLog {
    enabled: bool,
    /// The workload beside this proxy: `destination_app` / `destination_version`
    /// of inbound (`reporter = destination`) requests.
    local: Option<Arc<LocalWorkload>>,
}

/// Serializes a `Display` value as a JSON string without an intermediate `String`.
#[derive(Debug)]
struct Text<T>(T);

impl<T: std::fmt::Display> Serialize for Text<T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0)
    }
}

/// One line, in Envoy's field names and order.
#[derive(Debug, Serialize)]
struct Line<'a> {
    start_time: Text<humantime::Rfc3339Timestamp>,
    method: &'a str,
    path: &'a str,
    protocol: &'a str,
    response_code: u16,
    response_flags: Text<ResponseFlags>,
    bytes_received: u64,
    bytes_sent: u64,
    duration: u64,
    upstream_host: Option<Text<SocketAddr>>,
    upstream_cluster: Option<&'a str>,
    x_request_id: Option<&'a str>,
    user_agent: Option<&'a str>,
    authority: &'a str,
    route_name: Option<&'a str>,
    downstream_remote_address: Text<SocketAddr>,
    attempts: u32,
    reporter: &'a str,
    destination_app: Option<&'a str>,
    destination_version: Option<&'a str>,
}

thread_local! {
    static BUFFER: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(1024));
}

/// Set once a write to stdout failed, so the failure is reported only once.
static WRITE_FAILED: AtomicBool = AtomicBool::new(false);

fn known(value: &str) -> Option<&str> {
    (!value.is_empty() && value != "unknown").then_some(value)
}

impl AccessLog {
    /// A log that writes when `enabled`.
    pub fn new(enabled: bool) -> AccessLog {
        AccessLog { enabled, local: None }
    }

    /// Names the workload beside this proxy, whose `app` / `version` labels are
    /// logged as `destination_app` / `destination_version` of inbound requests.
    pub fn with_local(mut self, local: &LocalWorkload) -> AccessLog {
        self.local = Some(Arc::new(local.clone()));
        self
    }

    /// Whether lines are written.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Writes the line for one finished request.
    pub fn log(&self, info: &RequestInfo) {
        if !self.enabled {
            return;
        }
        BUFFER.with(|buffer| {
            // A re-entrant call (impossible today) would get a fresh buffer.
            let mut fallback = Vec::new();
            let mut borrowed = buffer.try_borrow_mut();
            let buf = match borrowed.as_mut() {
                Ok(buf) => &mut **buf,
                Err(_) => &mut fallback,
            };
            buf.clear();
            self.write_line(info, buf);
            let result = std::io::stdout().lock().write_all(buf);
            if let Err(error) = result
                && !WRITE_FAILED.swap(true, Ordering::Relaxed)
            {
                tracing::warn!(%error, "access log: writing to stdout failed; further failures are not reported");
            }
            if buf.capacity() > 64 * 1024 {
                *buf = Vec::with_capacity(1024);
            }
        });
    }

    /// The line for `info`, with its trailing newline (what [`AccessLog::log`]
    /// writes, whether or not the log is enabled).
    pub fn render(&self, info: &RequestInfo) -> Vec<u8> {
        let mut buf = Vec::with_capacity(512);
        self.write_line(info, &mut buf);
        buf
    }

    fn write_line(&self, info: &RequestInfo, buf: &mut Vec<u8>) {
        let (destination_app, destination_version) = match (info.reporter, &self.local) {
            (Reporter::Destination, Some(local)) => (known(&local.app), known(&local.version)),
            _ => match &info.upstream {
                Some(ep) => (ep.label("app"), ep.label("version")),
                None => (None, None),
            },
        };
        let line = Line {
            start_time: Text(humantime::format_rfc3339_millis(info.start)),
            method: info.method.as_str(),
            path: &info.path,
            protocol: info.protocol,
            response_code: info.status,
            response_flags: Text(info.flags),
            bytes_received: info.bytes_received,
            bytes_sent: info.bytes_sent,
            duration: info.duration.as_millis().try_into().unwrap_or(u64::MAX),
            upstream_host: info.upstream.as_ref().map(|ep| Text(ep.addr)),
            upstream_cluster: info.cluster.as_ref().map(|c| c.name.as_str()),
            x_request_id: (!info.request_id.is_empty()).then_some(info.request_id.as_str()),
            user_agent: info.user_agent.as_deref(),
            authority: &info.authority,
            route_name: info.route_name.as_deref(),
            downstream_remote_address: Text(info.downstream_remote),
            attempts: info.attempts,
            reporter: info.reporter.as_str(),
            destination_app,
            destination_version,
        };
        // Serializing plain strings and numbers into a Vec cannot fail.
        if let Err(error) = serde_json::to_writer(&mut *buf, &line) {
            tracing::error!(%error, "access log: serializing a line failed");
            buf.clear();
            return;
        }
        buf.push(b'\n');
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::snapshot::{Cluster, Endpoint, EndpointRegistry, ServiceInfo, TrafficPolicy};

    const KEYS: [&str; 20] = [
        "start_time",
        "method",
        "path",
        "protocol",
        "response_code",
        "response_flags",
        "bytes_received",
        "bytes_sent",
        "duration",
        "upstream_host",
        "upstream_cluster",
        "x_request_id",
        "user_agent",
        "authority",
        "route_name",
        "downstream_remote_address",
        "attempts",
        "reporter",
        "destination_app",
        "destination_version",
    ];

    fn info() -> RequestInfo {
        RequestInfo {
            reporter: Reporter::Source,
            start: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            duration: Duration::from_micros(12_900),
            method: http::Method::POST,
            path: "/pay?x=\"1\"".into(),
            protocol: "HTTP/1.1",
            authority: "payment:8080".into(),
            status: 503,
            grpc_status: None,
            is_grpc: false,
            flags: ResponseFlags::UPSTREAM_CONNECT_FAILURE,
            bytes_received: 12,
            bytes_sent: 91,
            route_name: None,
            cluster: None,
            upstream: None,
            attempts: 3,
            request_id: "req-1".into(),
            user_agent: Some("curl/8".into()),
            downstream_remote: "127.0.0.1:40000".parse().expect("addr"),
            peer: None,
        }
    }

    fn parse(log: &AccessLog, info: &RequestInfo) -> serde_json::Map<String, serde_json::Value> {
        let line = log.render(info);
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1, "one line");
        match serde_json::from_slice(&line).expect("valid JSON") {
            serde_json::Value::Object(map) => map,
            other => panic!("not an object: {other}"),
        }
    }

    #[test]
    fn line_has_envoy_fields() {
        let map = parse(&AccessLog::new(true), &info());
        let keys: Vec<&str> = map.keys().map(String::as_str).collect();
        let mut expected = KEYS.to_vec();
        expected.sort_unstable();
        let mut got = keys.clone();
        got.sort_unstable();
        assert_eq!(got, expected);
        assert_eq!(map["start_time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(map["method"], "POST");
        assert_eq!(map["path"], "/pay?x=\"1\"");
        assert_eq!(map["response_code"], 503);
        assert_eq!(map["response_flags"], "UF");
        assert_eq!(map["duration"], 12);
        assert_eq!(map["bytes_received"], 12);
        assert_eq!(map["bytes_sent"], 91);
        assert_eq!(map["attempts"], 3);
        assert_eq!(map["upstream_host"], serde_json::Value::Null);
        assert_eq!(map["upstream_cluster"], serde_json::Value::Null);
        assert_eq!(map["route_name"], serde_json::Value::Null);
        assert_eq!(map["x_request_id"], "req-1");
        assert_eq!(map["user_agent"], "curl/8");
        assert_eq!(map["downstream_remote_address"], "127.0.0.1:40000");
    }

    #[test]
    fn upstream_fields_come_from_the_endpoint_and_cluster() {
        let registry = EndpointRegistry::default();
        let addr: SocketAddr = "10.1.2.3:8080".parse().expect("addr");
        let ep = Arc::new(Endpoint {
            addr,
            labels: vec![("app".into(), "payment".into()), ("version".into(), "v2".into())],
            workload: "payment-v2".into(),
            namespace: "default".into(),
            service_account: None,
            state: registry.get_or_create(addr),
        });
        let cluster = Arc::new(Cluster {
            name: "outbound|8080|v2|payment.default.svc.cluster.local".into(),
            service: Arc::new(ServiceInfo {
                host: "payment.default.svc.cluster.local".into(),
                name: "payment".into(),
                namespace: "default".into(),
                ports: Vec::new(),
                addresses: Vec::new(),
            }),
            subset: Some("v2".into()),
            port: 8080,
            endpoints: vec![ep.clone()],
            policy: TrafficPolicy::default(),
            rr_cursor: Default::default(),
        });
        let mut i = info();
        i.upstream = Some(ep);
        i.cluster = Some(cluster);
        i.route_name = Some("payment-split".into());
        i.flags = ResponseFlags::NONE;
        let map = parse(&AccessLog::new(true), &i);
        assert_eq!(map["upstream_host"], "10.1.2.3:8080");
        assert_eq!(map["upstream_cluster"], "outbound|8080|v2|payment.default.svc.cluster.local");
        assert_eq!(map["route_name"], "payment-split");
        assert_eq!(map["response_flags"], "-");
        assert_eq!(map["destination_app"], "payment");
        assert_eq!(map["destination_version"], "v2");

        // Inbound: the destination is the local workload.
        let local = LocalWorkload { app: "payment".into(), version: "v1".into(), ..LocalWorkload::default() };
        i.reporter = Reporter::Destination;
        let map = parse(&AccessLog::new(true).with_local(&local), &i);
        assert_eq!(map["reporter"], "destination");
        assert_eq!(map["destination_version"], "v1");
    }

    #[test]
    fn disabled_log_writes_nothing() {
        let log = AccessLog::new(false);
        assert!(!log.is_enabled());
        // `log` returns before touching stdout; `render` still works for tooling.
        log.log(&info());
        assert!(!log.render(&info()).is_empty());
    }
}
