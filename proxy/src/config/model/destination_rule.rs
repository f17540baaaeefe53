//! `DestinationRule` (networking.istio.io v1 / v1beta1 / v1alpha3).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::Unsupported;

/// `DestinationRule.spec`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DestinationRule {
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_policy: Option<TrafficPolicy>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subsets: Vec<Subset>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub export_to: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_selector: Unsupported,
}

/// `Subset`: a named set of endpoints by labels, with an optional policy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Subset {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_policy: Option<TrafficPolicy>,
}

/// `TrafficPolicy`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrafficPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancerSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPoolSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ClientTlsSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_level_settings: Unsupported,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel: Unsupported,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Unsupported,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_budget: Unsupported,
}

/// `LoadBalancerSettings`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LoadBalancerSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simple: Option<SimpleLb>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistent_hash: Option<ConsistentHash>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality_lb_setting: Unsupported,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_duration_secs: Unsupported,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup: Unsupported,
}

/// `LoadBalancerSettings.SimpleLB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[allow(clippy::upper_case_acronyms, non_camel_case_types)]
pub enum SimpleLb {
    UNSPECIFIED,
    LEAST_CONN,
    RANDOM,
    PASSTHROUGH,
    ROUND_ROBIN,
    LEAST_REQUEST,
}

/// `LoadBalancerSettings.ConsistentHashLB`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConsistentHash {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_header_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_cookie: Option<HttpCookie>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_source_ip: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_query_parameter_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ring_hash: Unsupported,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maglev: Unsupported,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum_ring_size: Unsupported,
}

/// `ConsistentHashLB.HTTPCookie`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpCookie {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attributes: Unsupported,
}

/// `ConnectionPoolSettings`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConnectionPoolSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSettings>,
}

/// `ConnectionPoolSettings.TCPSettings`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TcpSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_keepalive: Unsupported,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connection_duration: Unsupported,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,
}

/// `ConnectionPoolSettings.HTTPSettings`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpSettings {
    #[serde(default, rename = "http1MaxPendingRequests", skip_serializing_if = "Option::is_none")]
    pub http1_max_pending_requests: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,
    #[serde(default, rename = "http2MaxRequests", skip_serializing_if = "Option::is_none")]
    pub http2_max_requests: Unsupported,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Unsupported,
    #[serde(default, rename = "h2UpgradePolicy", skip_serializing_if = "Option::is_none")]
    pub h2_upgrade_policy: Option<H2UpgradePolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_client_protocol: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_streams: Unsupported,
    #[serde(default, rename = "http2KeepAlive", skip_serializing_if = "Option::is_none")]
    pub http2_keep_alive: Unsupported,
}

/// `OutlierDetection`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OutlierDetection {
    #[serde(default, rename = "consecutive5xxErrors", skip_serializing_if = "Option::is_none")]
    pub consecutive_5xx_errors: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_gateway_errors: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_errors: Unsupported,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_health_percent: Unsupported,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split_external_local_origin_errors: Unsupported,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_local_origin_failures: Unsupported,
}

/// `ClientTLSSettings`: only `mode` is supported.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClientTlsSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<ClientTlsMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate: Unsupported,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key: Unsupported,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_certificates: Unsupported,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_name: Unsupported,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_alt_names: Unsupported,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Unsupported,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub insecure_skip_verify: Unsupported,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_crl: Unsupported,
}

/// `ConnectionPoolSettings.HTTPSettings.H2UpgradePolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[allow(clippy::upper_case_acronyms, non_camel_case_types)]
pub enum H2UpgradePolicy {
    DEFAULT,
    DO_NOT_UPGRADE,
    UPGRADE,
}

/// `ClientTLSSettings.TLSmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[allow(clippy::upper_case_acronyms, non_camel_case_types)]
pub enum ClientTlsMode {
    DISABLE,
    SIMPLE,
    MUTUAL,
    ISTIO_MUTUAL,
}
