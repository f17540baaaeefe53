//! `DestinationRule` checks: traffic policies (rule and subsets) and subsets.

use std::collections::BTreeMap;
use std::time::Duration;

use super::fields;
use crate::config::error::Sink;
use crate::config::hosts;
use crate::config::model::{self, ClientTlsMode, SimpleLb};
use crate::snapshot::{ConnectionPool, HashKey, LoadBalancer, OutlierPolicy, TlsMode, TrafficPolicy};

/// The parts of a traffic policy a block sets; merging is per top-level field
/// (a subset's `connectionPool` replaces the rule's whole `connectionPool`), as in
/// Istio's `MergeTrafficPolicy`.
#[derive(Debug, Clone, Default)]
pub struct PolicyOverlay {
    pub load_balancer: Option<LoadBalancer>,
    pub outlier: Option<OutlierPolicy>,
    pub pool: Option<ConnectionPool>,
    pub tls: Option<TlsMode>,
}

impl PolicyOverlay {
    /// `self` over `base` (field by field).
    pub fn over(&self, base: &PolicyOverlay) -> PolicyOverlay {
        PolicyOverlay {
            load_balancer: self.load_balancer.clone().or_else(|| base.load_balancer.clone()),
            outlier: self.outlier.clone().or_else(|| base.outlier.clone()),
            pool: self.pool.clone().or_else(|| base.pool.clone()),
            tls: self.tls.or(base.tls),
        }
    }

    /// The effective policy, defaults filled in.
    pub fn resolve(&self) -> TrafficPolicy {
        TrafficPolicy {
            load_balancer: self.load_balancer.clone().unwrap_or_default(),
            outlier: self.outlier.clone(),
            pool: self.pool.clone().unwrap_or_default(),
            tls: self.tls,
        }
    }
}

/// A checked subset.
#[derive(Debug, Clone)]
pub struct CheckedSubset {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub policy: PolicyOverlay,
}

/// A checked DestinationRule.
#[derive(Debug, Clone)]
pub struct CheckedDestinationRule {
    /// `namespace/name`.
    pub name: String,
    /// Resolved host (may be a wildcard).
    pub host: String,
    pub policy: PolicyOverlay,
    pub subsets: Vec<CheckedSubset>,
}

/// Checks a DestinationRule in `namespace`.
pub fn check(dr: &model::DestinationRule, namespace: &str, name: &str, sink: &mut Sink<'_>) -> CheckedDestinationRule {
    sink.unsupported(dr.workload_selector.is_some(), "spec.workloadSelector", "");
    sink.check("spec.host", hosts::check_host(&dr.host, true));
    let policy = match &dr.traffic_policy {
        Some(p) => traffic_policy(p, "spec.trafficPolicy", sink),
        None => PolicyOverlay::default(),
    };
    let mut subsets: Vec<CheckedSubset> = Vec::new();
    for (i, s) in dr.subsets.iter().enumerate() {
        let path = format!("spec.subsets[{i}]");
        if s.name.is_empty() {
            sink.push(&format!("{path}.name"), "subset name must not be empty");
        } else if subsets.iter().any(|x| x.name == s.name) {
            sink.push(&format!("{path}.name"), format!("subset {:?} is defined twice", s.name));
        }
        let own = match &s.traffic_policy {
            Some(p) => traffic_policy(p, &format!("{path}.trafficPolicy"), sink),
            None => PolicyOverlay::default(),
        };
        subsets.push(CheckedSubset { name: s.name.clone(), labels: s.labels.clone(), policy: own });
    }
    CheckedDestinationRule {
        name: format!("{namespace}/{name}"),
        host: hosts::resolve_host(&dr.host, namespace),
        policy,
        subsets,
    }
}

/// One `trafficPolicy` block.
pub fn traffic_policy(p: &model::TrafficPolicy, path: &str, sink: &mut Sink<'_>) -> PolicyOverlay {
    sink.unsupported(p.port_level_settings.is_some(), &format!("{path}.portLevelSettings"), "");
    sink.unsupported(p.tunnel.is_some(), &format!("{path}.tunnel"), "");
    sink.unsupported(p.proxy_protocol.is_some(), &format!("{path}.proxyProtocol"), "");
    sink.unsupported(p.retry_budget.is_some(), &format!("{path}.retryBudget"), "");
    PolicyOverlay {
        load_balancer: p.load_balancer.as_ref().and_then(|lb| load_balancer(lb, &format!("{path}.loadBalancer"), sink)),
        outlier: p.outlier_detection.as_ref().map(|o| outlier(o, &format!("{path}.outlierDetection"), sink)),
        pool: p.connection_pool.as_ref().map(|c| pool(c, &format!("{path}.connectionPool"), sink)),
        tls: p.tls.as_ref().and_then(|t| tls(t, &format!("{path}.tls"), sink)),
    }
}

fn load_balancer(lb: &model::LoadBalancerSettings, path: &str, sink: &mut Sink<'_>) -> Option<LoadBalancer> {
    sink.unsupported(lb.locality_lb_setting.is_some(), &format!("{path}.localityLbSetting"), "serin has no localities");
    sink.unsupported(lb.warmup_duration_secs.is_some(), &format!("{path}.warmupDurationSecs"), "");
    sink.unsupported(lb.warmup.is_some(), &format!("{path}.warmup"), "");
    if lb.simple.is_some() && lb.consistent_hash.is_some() {
        sink.push(path, "only one of simple and consistentHash may be set");
    }
    if let Some(ch) = &lb.consistent_hash {
        return consistent_hash(ch, &format!("{path}.consistentHash"), sink).map(LoadBalancer::ConsistentHash);
    }
    match lb.simple? {
        SimpleLb::UNSPECIFIED | SimpleLb::LEAST_REQUEST | SimpleLb::LEAST_CONN => Some(LoadBalancer::LeastRequest),
        SimpleLb::ROUND_ROBIN => Some(LoadBalancer::RoundRobin),
        SimpleLb::RANDOM => Some(LoadBalancer::Random),
        SimpleLb::PASSTHROUGH => {
            sink.push(&format!("{path}.simple"), "PASSTHROUGH is not supported by serin");
            None
        }
    }
}

fn consistent_hash(ch: &model::ConsistentHash, path: &str, sink: &mut Sink<'_>) -> Option<HashKey> {
    sink.unsupported(ch.ring_hash.is_some(), &format!("{path}.ringHash"), "");
    sink.unsupported(ch.maglev.is_some(), &format!("{path}.maglev"), "");
    sink.unsupported(ch.minimum_ring_size.is_some(), &format!("{path}.minimumRingSize"), "");
    let mut keys = Vec::new();
    if let Some(h) = &ch.http_header_name
        && let Some(name) = sink.check(&format!("{path}.httpHeaderName"), fields::header_name(h))
    {
        keys.push(HashKey::Header(name));
    }
    if let Some(c) = &ch.http_cookie {
        let cpath = format!("{path}.httpCookie");
        sink.unsupported(c.attributes.is_some(), &format!("{cpath}.attributes"), "");
        if c.name.is_empty() {
            sink.push(&format!("{cpath}.name"), "cookie name must not be empty");
        }
        if let Some(ttl) = &c.ttl {
            sink.check(&format!("{cpath}.ttl"), crate::config::duration::parse_duration(ttl));
        }
        keys.push(HashKey::Cookie(c.name.clone()));
    }
    if ch.use_source_ip == Some(true) {
        keys.push(HashKey::SourceIp);
    }
    if let Some(q) = &ch.http_query_parameter_name {
        if q.is_empty() {
            sink.push(&format!("{path}.httpQueryParameterName"), "must not be empty");
        }
        keys.push(HashKey::QueryParam(q.clone()));
    }
    if keys.len() != 1 {
        sink.push(
            path,
            "exactly one of httpHeaderName, httpCookie, useSourceIp and httpQueryParameterName is required",
        );
    }
    keys.into_iter().next()
}

fn outlier(o: &model::OutlierDetection, path: &str, sink: &mut Sink<'_>) -> OutlierPolicy {
    sink.unsupported(
        o.consecutive_errors.is_some(),
        &format!("{path}.consecutiveErrors"),
        "deprecated in Istio; use consecutive5xxErrors or consecutiveGatewayErrors",
    );
    sink.unsupported(o.min_health_percent.is_some(), &format!("{path}.minHealthPercent"), "");
    sink.unsupported(
        o.split_external_local_origin_errors.is_some(),
        &format!("{path}.splitExternalLocalOriginErrors"),
        "",
    );
    sink.unsupported(
        o.consecutive_local_origin_failures.is_some(),
        &format!("{path}.consecutiveLocalOriginFailures"),
        "",
    );
    let mut out = OutlierPolicy::default();
    if let Some(n) = o.consecutive_5xx_errors {
        out.consecutive_5xx = sink.check(&format!("{path}.consecutive5xxErrors"), fields::count(n)).unwrap_or(0);
    }
    if let Some(n) = o.consecutive_gateway_errors {
        out.consecutive_gateway_errors =
            sink.check(&format!("{path}.consecutiveGatewayErrors"), fields::count(n)).unwrap_or(0);
    }
    let ms = Duration::from_millis(1);
    if let Some(t) = &o.interval {
        out.interval =
            sink.check(&format!("{path}.interval"), fields::duration_at_least(t, ms)).unwrap_or(out.interval);
    }
    if let Some(t) = &o.base_ejection_time {
        out.base_ejection_time = sink
            .check(&format!("{path}.baseEjectionTime"), fields::duration_at_least(t, ms))
            .unwrap_or(out.base_ejection_time);
    }
    if let Some(p) = o.max_ejection_percent {
        match u32::try_from(p).ok().filter(|p| *p <= 100) {
            Some(p) => out.max_ejection_percent = p,
            None => sink.push(&format!("{path}.maxEjectionPercent"), format!("{p} is out of range (0 to 100)")),
        }
    }
    out
}

fn pool(c: &model::ConnectionPoolSettings, path: &str, sink: &mut Sink<'_>) -> ConnectionPool {
    let mut out = ConnectionPool::default();
    // Istio: 0 (the proto default) means "not set" for these limits.
    let limit = |v: i64, field: &str, sink: &mut Sink<'_>| -> Option<u32> {
        sink.check(field, fields::count(v)).filter(|v| *v > 0)
    };
    if let Some(tcp) = &c.tcp {
        let tpath = format!("{path}.tcp");
        sink.unsupported(tcp.tcp_keepalive.is_some(), &format!("{tpath}.tcpKeepalive"), "");
        sink.unsupported(tcp.max_connection_duration.is_some(), &format!("{tpath}.maxConnectionDuration"), "");
        if let Some(n) = tcp.max_connections.and_then(|v| limit(v, &format!("{tpath}.maxConnections"), sink)) {
            out.max_connections = n;
        }
        if let Some(t) = &tcp.connect_timeout {
            let field = format!("{tpath}.connectTimeout");
            if let Some(d) = sink.check(&field, fields::duration_at_least(t, Duration::from_millis(1))) {
                out.connect_timeout = d;
            }
        }
        // Istio: 0s turns the timeout off.
        if let Some(t) = &tcp.idle_timeout {
            let field = format!("{tpath}.idleTimeout");
            if let Some(d) = sink.check(&field, fields::duration_at_least(t, Duration::ZERO)) {
                out.tcp_idle_timeout = d;
            }
        }
    }
    if let Some(h) = &c.http {
        let hpath = format!("{path}.http");
        sink.unsupported(h.http2_max_requests.is_some(), &format!("{hpath}.http2MaxRequests"), "");
        sink.unsupported(h.max_retries.is_some(), &format!("{hpath}.maxRetries"), "");
        out.h2_upgrade = match h.h2_upgrade_policy {
            Some(model::H2UpgradePolicy::UPGRADE) => Some(true),
            Some(model::H2UpgradePolicy::DO_NOT_UPGRADE) => Some(false),
            Some(model::H2UpgradePolicy::DEFAULT) | None => None,
        };
        out.use_client_protocol = h.use_client_protocol == Some(true);
        sink.unsupported(h.max_concurrent_streams.is_some(), &format!("{hpath}.maxConcurrentStreams"), "");
        sink.unsupported(h.http2_keep_alive.is_some(), &format!("{hpath}.http2KeepAlive"), "");
        if let Some(n) =
            h.http1_max_pending_requests.and_then(|v| limit(v, &format!("{hpath}.http1MaxPendingRequests"), sink))
        {
            out.max_pending_requests = n;
        }
        if let Some(n) = h.max_requests_per_connection {
            out.max_requests_per_connection =
                sink.check(&format!("{hpath}.maxRequestsPerConnection"), fields::count(n)).unwrap_or(0);
        }
        if let Some(t) = &h.idle_timeout {
            let field = format!("{hpath}.idleTimeout");
            if let Some(d) = sink.check(&field, fields::duration_at_least(t, Duration::from_millis(1))) {
                out.idle_timeout = d;
            }
        }
    }
    out
}

fn tls(t: &model::ClientTlsSettings, path: &str, sink: &mut Sink<'_>) -> Option<TlsMode> {
    let hint = "serin reads only tls.mode";
    sink.unsupported(t.client_certificate.is_some(), &format!("{path}.clientCertificate"), hint);
    sink.unsupported(t.private_key.is_some(), &format!("{path}.privateKey"), hint);
    sink.unsupported(t.ca_certificates.is_some(), &format!("{path}.caCertificates"), hint);
    sink.unsupported(t.credential_name.is_some(), &format!("{path}.credentialName"), hint);
    sink.unsupported(t.subject_alt_names.is_some(), &format!("{path}.subjectAltNames"), hint);
    sink.unsupported(t.sni.is_some(), &format!("{path}.sni"), hint);
    sink.unsupported(t.insecure_skip_verify.is_some(), &format!("{path}.insecureSkipVerify"), hint);
    sink.unsupported(t.ca_crl.is_some(), &format!("{path}.caCrl"), hint);
    t.mode.map(|m| match m {
        ClientTlsMode::DISABLE => TlsMode::Disable,
        ClientTlsMode::SIMPLE => TlsMode::Simple,
        ClientTlsMode::MUTUAL => TlsMode::Mutual,
        ClientTlsMode::ISTIO_MUTUAL => TlsMode::IstioMutual,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::error::ConfigError;

    fn overlay(yaml: &str) -> (PolicyOverlay, Vec<ConfigError>) {
        let p: model::TrafficPolicy = serde_saphyr::from_str(yaml).expect("yaml");
        let mut errors = Vec::new();
        let mut sink = Sink { file: "f", resource: "DestinationRule d/x".into(), errors: &mut errors };
        let o = traffic_policy(&p, "spec.trafficPolicy", &mut sink);
        (o, errors)
    }

    #[test]
    fn subset_overrides_the_rule_field_by_field() {
        let (rule, e1) = overlay("loadBalancer: {simple: ROUND_ROBIN}\nconnectionPool: {tcp: {maxConnections: 7}}\n");
        let (subset, e2) = overlay("loadBalancer: {simple: RANDOM}\noutlierDetection: {baseEjectionTime: 1m}\n");
        assert!(e1.is_empty() && e2.is_empty());
        let merged = subset.over(&rule).resolve();
        assert_eq!(merged.load_balancer, LoadBalancer::Random);
        assert_eq!(merged.pool.max_connections, 7);
        let outlier = merged.outlier.expect("block present = on");
        assert_eq!(outlier.base_ejection_time, Duration::from_secs(60));
        assert_eq!(outlier.consecutive_5xx, 5, "Istio default for a missing field");
        let none = PolicyOverlay::default().resolve();
        assert_eq!(none.load_balancer, LoadBalancer::LeastRequest);
        assert!(none.outlier.is_none() && none.tls.is_none());
    }

    #[test]
    fn policy_values_and_unsupported_fields() {
        let (o, e) = overlay("loadBalancer: {simple: LEAST_CONN}\ntls: {mode: DISABLE}\n");
        assert!(e.is_empty());
        assert_eq!((o.load_balancer, o.tls), (Some(LoadBalancer::LeastRequest), Some(TlsMode::Disable)));
        let (_, e) = overlay("loadBalancer: {consistentHash: {httpCookie: {name: u, ttl: 0s}, useSourceIp: true}}\n");
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].field, "spec.trafficPolicy.loadBalancer.consistentHash");
        let (_, e) = overlay("portLevelSettings: []\nconnectionPool: {http: {http2MaxRequests: 5}}\n");
        let fields: Vec<&str> = e.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            vec!["spec.trafficPolicy.portLevelSettings", "spec.trafficPolicy.connectionPool.http.http2MaxRequests"]
        );
        let (_, e) = overlay("outlierDetection: {maxEjectionPercent: 101}\n");
        assert_eq!(e[0].field, "spec.trafficPolicy.outlierDetection.maxEjectionPercent");
    }
}
