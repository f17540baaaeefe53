//! `/config_dump` and `/clusters`: the running snapshot and endpoint state, as JSON
//! (and Envoy's `/clusters` text form).

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::snapshot::{
    Cluster, Endpoint, Fault, HashKey, HeaderEdits, HeaderOps, LoadBalancer, RequestMatch, RetryPolicy, Route,
    RouteAction, ServiceInfo, Snapshot, StringMatch, TrafficPolicy, VirtualHost,
};
use crate::state::Shared;

fn time(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

fn duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

fn opt_duration(d: Option<Duration>) -> Value {
    d.map_or(Value::Null, |d| Value::String(duration(d)))
}

fn string_match(m: &StringMatch) -> Value {
    match m {
        StringMatch::Exact(s) => json!({ "exact": s }),
        StringMatch::Prefix(s) => json!({ "prefix": s }),
        StringMatch::Regex(r) => json!({ "regex": r.as_str() }),
    }
}

fn header_matches(headers: &[(http::HeaderName, Option<StringMatch>)]) -> Value {
    let map: Map<String, Value> = headers
        .iter()
        .map(|(name, m)| (name.as_str().to_string(), m.as_ref().map_or(json!({ "present": true }), string_match)))
        .collect();
    Value::Object(map)
}

/// One match, with only the fields it sets (Istio's `HTTPMatchRequest` shape).
fn request_match(m: &RequestMatch) -> Value {
    let mut out = Map::new();
    if let Some(uri) = &m.uri {
        out.insert("uri".into(), string_match(uri));
    }
    if m.ignore_uri_case {
        out.insert("ignore_uri_case".into(), Value::Bool(true));
    }
    if let Some(scheme) = &m.scheme {
        out.insert("scheme".into(), string_match(scheme));
    }
    if let Some(method) = &m.method {
        out.insert("method".into(), string_match(method));
    }
    if let Some(authority) = &m.authority {
        out.insert("authority".into(), string_match(authority));
    }
    if !m.headers.is_empty() {
        out.insert("headers".into(), header_matches(&m.headers));
    }
    if !m.without_headers.is_empty() {
        out.insert("without_headers".into(), header_matches(&m.without_headers));
    }
    if !m.query_params.is_empty() {
        let map: Map<String, Value> = m.query_params.iter().map(|(k, v)| (k.clone(), string_match(v))).collect();
        out.insert("query_params".into(), Value::Object(map));
    }
    if let Some(port) = m.port {
        out.insert("port".into(), json!(port));
    }
    Value::Object(out)
}

fn header_edits(edits: &HeaderEdits) -> Value {
    let pairs = |list: &[(http::HeaderName, http::HeaderValue)]| -> Value {
        list.iter().map(|(name, value)| json!([name.as_str(), String::from_utf8_lossy(value.as_bytes())])).collect()
    };
    let mut out = Map::new();
    if !edits.set.is_empty() {
        out.insert("set".into(), pairs(&edits.set));
    }
    if !edits.add.is_empty() {
        out.insert("add".into(), pairs(&edits.add));
    }
    if !edits.remove.is_empty() {
        out.insert("remove".into(), edits.remove.iter().map(|n| Value::from(n.as_str())).collect());
    }
    Value::Object(out)
}

/// Header operations, or null when there are none.
fn header_ops(ops: &HeaderOps) -> Value {
    let request = header_edits(&ops.request);
    let response = header_edits(&ops.response);
    let empty = |v: &Value| v.as_object().is_some_and(Map::is_empty);
    if empty(&request) && empty(&response) {
        return Value::Null;
    }
    json!({ "request": request, "response": response })
}

fn action(action: &RouteAction) -> Value {
    match action {
        RouteAction::Forward(split) => {
            let sum: u64 = split.destinations.iter().map(|d| u64::from(d.weight)).sum();
            let destinations: Vec<Value> = split
                .destinations
                .iter()
                .map(|d| {
                    let percent = if sum == 0 { 0.0 } else { f64::from(d.weight) * 100.0 / sum as f64 };
                    json!({
                        "cluster": d.cluster.name,
                        "host": d.cluster.service.host,
                        "subset": d.cluster.subset,
                        "port": d.cluster.port,
                        "weight": d.weight,
                        "percent": (percent * 1000.0).round() / 1000.0,
                        "headers": header_ops(&d.headers),
                    })
                })
                .collect();
            json!({ "route": destinations })
        }
        RouteAction::Redirect(r) => json!({
            "redirect": {
                "uri": r.uri,
                "authority": r.authority,
                "scheme": r.scheme,
                "port": r.port,
                "status": r.status.as_u16(),
            }
        }),
        RouteAction::Direct { status, body } => json!({
            "direct_response": {
                "status": status.as_u16(),
                "body": String::from_utf8_lossy(body),
            }
        }),
    }
}

fn retries(policy: &RetryPolicy) -> Value {
    let on = &policy.retry_on;
    let names = [
        (on.server_error_5xx, "5xx"),
        (on.gateway_error, "gateway-error"),
        (on.connect_failure, "connect-failure"),
        (on.reset, "reset"),
        (on.retriable_4xx, "retriable-4xx"),
        (on.refused_stream, "refused-stream"),
        (on.grpc_unavailable, "unavailable"),
        (on.grpc_cancelled, "cancelled"),
    ];
    let retry_on: Vec<&str> = names.iter().filter(|(set, _)| *set).map(|(_, name)| *name).collect();
    json!({
        "attempts": policy.attempts,
        "per_try_timeout": opt_duration(policy.per_try_timeout),
        "retry_on": retry_on,
        "retriable_status_codes": policy.retriable_status_codes,
        "backoff_base": duration(policy.backoff_base),
    })
}

fn fault(fault: &Fault) -> Value {
    json!({
        "delay": fault.delay.map(|(d, percent)| json!({ "fixed_delay": duration(d), "percentage": percent })),
        "abort": fault.abort.as_ref().map(|a| json!({
            "http_status": a.status.as_u16(),
            "grpc_status": a.grpc_status,
            "percentage": a.percentage,
        })),
    })
}

fn route(route: &Route) -> Value {
    json!({
        "name": route.name,
        "match": route.matches.iter().map(request_match).collect::<Vec<_>>(),
        "action": action(&route.action),
        "timeout": opt_duration(route.timeout),
        "retries": retries(&route.retry),
        "fault": route.fault.as_ref().map(fault),
        "mirror": route.mirror.as_ref().map(|m| json!({ "cluster": m.cluster.name, "percentage": m.percentage })),
        "rewrite": route.rewrite.as_ref().map(|r| json!({ "uri": r.uri, "authority": r.authority })),
        "headers": header_ops(&route.headers),
    })
}

fn virtual_host(vh: &VirtualHost) -> Value {
    use crate::snapshot::HostPattern;
    let domains: Vec<String> = vh
        .domains
        .iter()
        .map(|d| match d {
            HostPattern::Exact(name) => name.clone(),
            HostPattern::Suffix(suffix) => format!("*{suffix}"),
            HostPattern::Any => "*".to_string(),
        })
        .collect();
    json!({
        "name": vh.name,
        "domains": domains,
        "routes": vh.routes.iter().map(route).collect::<Vec<_>>(),
    })
}

fn load_balancer(lb: &LoadBalancer) -> Value {
    match lb {
        LoadBalancer::LeastRequest => json!({ "simple": "LEAST_REQUEST" }),
        LoadBalancer::RoundRobin => json!({ "simple": "ROUND_ROBIN" }),
        LoadBalancer::Random => json!({ "simple": "RANDOM" }),
        LoadBalancer::ConsistentHash(key) => {
            let key = match key {
                HashKey::Header(name) => json!({ "http_header_name": name.as_str() }),
                HashKey::Cookie(name) => json!({ "http_cookie": name }),
                HashKey::SourceIp => json!({ "use_source_ip": true }),
                HashKey::QueryParam(name) => json!({ "http_query_parameter_name": name }),
            };
            json!({ "consistent_hash": key })
        }
    }
}

fn policy(policy: &TrafficPolicy) -> Value {
    let pool = &policy.pool;
    json!({
        "load_balancer": load_balancer(&policy.load_balancer),
        "outlier_detection": policy.outlier.as_ref().map(|o| json!({
            "consecutive_5xx_errors": o.consecutive_5xx,
            "consecutive_gateway_errors": o.consecutive_gateway_errors,
            "interval": duration(o.interval),
            "base_ejection_time": duration(o.base_ejection_time),
            "max_ejection_percent": o.max_ejection_percent,
        })),
        "connection_pool": {
            "max_connections": pool.max_connections,
            "connect_timeout": duration(pool.connect_timeout),
            "http1_max_pending_requests": pool.max_pending_requests,
            "max_requests_per_connection": pool.max_requests_per_connection,
            "idle_timeout": duration(pool.idle_timeout),
            "tcp_idle_timeout": duration(pool.tcp_idle_timeout),
        },
    })
}

fn health(ejected: bool) -> &'static str {
    if ejected { "ejected" } else { "healthy" }
}

/// An endpoint with its live state.
fn endpoint(ep: &Endpoint) -> Value {
    let state = &ep.state;
    let (open, idle) = state.pool.connection_counts();
    let ejected = state.is_ejected();
    let labels: Map<String, Value> = ep.labels.iter().map(|(k, v)| (k.clone(), Value::from(v.as_str()))).collect();
    json!({
        "address": ep.addr.to_string(),
        "workload": ep.workload,
        "namespace": ep.namespace,
        "service_account": ep.service_account,
        "labels": labels,
        "health": health(ejected),
        "ejected": ejected,
        "ejections": state.ejections.load(Ordering::Relaxed),
        "active_requests": state.active.load(Ordering::Relaxed),
        "total_requests": state.total.load(Ordering::Relaxed),
        "connections": { "open": open, "idle": idle, "http2": state.pool.has_http2() },
    })
}

fn cluster(c: &Cluster) -> Value {
    json!({
        "name": c.name,
        "service": c.service.host,
        "subset": c.subset,
        "port": c.port,
        "policy": policy(&c.policy),
        "endpoints": c.endpoints.iter().map(|ep| endpoint(ep)).collect::<Vec<_>>(),
    })
}

fn service(s: &ServiceInfo) -> Value {
    json!({
        "host": s.host,
        "name": s.name,
        "namespace": s.namespace,
        "ports": s.ports.iter().map(|(port, protocol)| json!({ "number": port, "protocol": protocol })).collect::<Vec<_>>(),
    })
}

fn sorted_clusters(snapshot: &Snapshot) -> Vec<&Cluster> {
    let mut clusters: Vec<&Cluster> = snapshot.clusters.values().map(|c| &**c).collect();
    clusters.sort_by(|a, b| a.name.cmp(&b.name));
    clusters
}

/// `/config_dump`: the running snapshot, the last rejected update and the workload
/// identity, fields in reading order.
#[derive(Debug, Serialize)]
pub struct ConfigDump {
    /// The snapshot's version.
    pub version: String,
    /// Where it came from.
    pub source: String,
    /// When it was compiled (RFC 3339, UTC).
    pub created: String,
    /// `{at, source, error}` of the last rejected update, or null.
    pub last_rejected: Value,
    /// Virtual hosts with their domains and routes.
    pub virtual_hosts: Vec<Value>,
    /// Clusters (by name) with policy and endpoints.
    pub clusters: Vec<Value>,
    /// Registry services (by host).
    pub services: Vec<Value>,
    /// The workload identity (`--cert-dir`, or the control plane's CA): `{spiffe_id,
    /// serial, not_before, not_after, last_error, origin, next_renewal}`, or null when
    /// the proxy has none. `last_error` is the last failed certificate reload or renewal
    /// (the previous certificate keeps serving), or null; `origin` is `files:<dir>` or
    /// `control-plane:<address>`; `next_renewal` is when a certificate from the control
    /// plane is renewed next (null for files).
    pub identity: Value,
    /// The control-plane subscription (`--control-plane`): `{endpoint, node_id,
    /// state (CONNECTING | ACKED | NACKED), connected, versions, last_ack, last_nack,
    /// ...}`, or null when the config comes from files. See
    /// [`crate::xds_client::status_json`].
    pub control_plane: Value,
    /// The runtime serving the proxy: `{flavor: "current_thread" | "multi_thread",
    /// workers}` (`--concurrency`).
    pub runtime: Value,
}

/// The `runtime` section of `/config_dump`.
fn runtime() -> Value {
    let Ok(handle) = tokio::runtime::Handle::try_current() else { return Value::Null };
    let flavor = match handle.runtime_flavor() {
        tokio::runtime::RuntimeFlavor::CurrentThread => "current_thread",
        _ => "multi_thread",
    };
    json!({ "flavor": flavor, "workers": handle.metrics().num_workers() })
}

/// The `identity` section of `/config_dump`.
fn identity(shared: &Shared) -> Value {
    let Some(bundle) = shared.mesh.bundle() else { return Value::Null };
    let id = bundle.identity();
    json!({
        "spiffe_id": id.spiffe_id().to_string(),
        "serial": id.serial(),
        "not_before": time(id.not_before()),
        "not_after": time(id.not_after()),
        "last_error": shared.mesh.last_error(),
        "origin": shared.mesh.origin(),
        "next_renewal": shared.mesh.next_renewal().map(time),
    })
}

/// The running snapshot, the last rejected update and the workload identity.
pub fn config_dump(shared: &Shared) -> ConfigDump {
    let snapshot = shared.snapshot.load();
    let rejected = shared.rejected.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut services: Vec<&ServiceInfo> = snapshot.services.values().map(|s| &**s).collect();
    services.sort_by(|a, b| a.host.cmp(&b.host));
    ConfigDump {
        version: snapshot.version.clone(),
        source: snapshot.source.clone(),
        created: time(snapshot.created),
        last_rejected: rejected
            .map_or(Value::Null, |r| json!({ "at": time(r.at), "source": r.source, "error": r.error })),
        virtual_hosts: snapshot.virtual_hosts.iter().map(virtual_host).collect(),
        clusters: sorted_clusters(&snapshot).into_iter().map(cluster).collect(),
        services: services.into_iter().map(service).collect(),
        identity: identity(shared),
        control_plane: crate::xds_client::status_json(shared),
        runtime: runtime(),
    }
}

/// `/clusters?format=json`: per cluster, per endpoint: address, health, counters.
pub fn clusters_json(shared: &Shared) -> Value {
    let snapshot = shared.snapshot.load();
    let statuses: Vec<Value> = sorted_clusters(&snapshot)
        .into_iter()
        .map(|c| {
            let hosts: Vec<Value> = c
                .endpoints
                .iter()
                .map(|ep| {
                    let (open, idle) = ep.state.pool.connection_counts();
                    let ejected = ep.state.is_ejected();
                    json!({
                        "address": ep.addr.to_string(),
                        "health": health(ejected),
                        "ejected": ejected,
                        "active_requests": ep.state.active.load(Ordering::Relaxed),
                        "total_requests": ep.state.total.load(Ordering::Relaxed),
                        "connections_open": open,
                        "connections_idle": idle,
                        "connection_http2": ep.state.pool.has_http2(),
                    })
                })
                .collect();
            json!({
                "name": c.name,
                "service": c.service.host,
                "subset": c.subset,
                "host_statuses": hosts,
            })
        })
        .collect();
    json!({ "version": snapshot.version, "cluster_statuses": statuses })
}

/// `/clusters` in Envoy's text form: `cluster::address::stat::value` lines.
pub fn clusters_text(shared: &Shared) -> String {
    let snapshot = shared.snapshot.load();
    let mut out = String::new();
    for c in sorted_clusters(&snapshot) {
        for ep in &c.endpoints {
            let state = &ep.state;
            let (open, _) = state.pool.connection_counts();
            let flags = if state.is_ejected() { "/failed_outlier_check" } else { "healthy" };
            let prefix = format!("{}::{}", c.name, ep.addr);
            // Writing to a String cannot fail.
            let _ = writeln!(out, "{prefix}::cx_active::{open}");
            let _ = writeln!(out, "{prefix}::rq_active::{}", state.active.load(Ordering::Relaxed));
            let _ = writeln!(out, "{prefix}::rq_total::{}", state.total.load(Ordering::Relaxed));
            let _ = writeln!(out, "{prefix}::health_flags::{flags}");
            let _ = writeln!(out, "{prefix}::hostname::{}", ep.workload);
        }
    }
    out
}
