//! Istio's standard metrics (prometheus-client). Placeholder API; filled in by the
//! metrics work.

use crate::request_info::RequestInfo;
use crate::state::LocalWorkload;

/// The proxy's metric registry.
#[derive(Debug, Default)]
pub struct Metrics {}

impl Metrics {
    /// A registry with every Istio metric registered.
    pub fn new() -> Metrics {
        Metrics {}
    }

    /// Records one finished HTTP/gRPC request.
    pub fn record_request(&self, _local: &LocalWorkload, _info: &RequestInfo) {}

    /// Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        String::new()
    }
}
