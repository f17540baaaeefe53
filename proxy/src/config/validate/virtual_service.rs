//! `VirtualService` checks, producing the registry-independent parts of routes.

use bytes::Bytes;
use http::StatusCode;

use super::{fields, route_extras};
use crate::config::error::Sink;
use crate::config::hosts;
use crate::config::model;
use crate::snapshot::{Fault, HeaderOps, Redirect, RequestMatch, RetryPolicy, Rewrite};

/// The gateway name that stands for all sidecars.
pub const MESH: &str = "mesh";

/// A destination as written, host resolved, not yet looked up in the registry.
#[derive(Debug, Clone)]
pub struct DestRef {
    /// Resolved host (`payment.prod.svc.cluster.local`).
    pub host: String,
    pub subset: Option<String>,
    pub port: Option<u16>,
    /// Field path of the `destination` block, for errors.
    pub path: String,
}

/// One weighted destination (weight > 0, or the only destination).
#[derive(Debug, Clone)]
pub struct CheckedDest {
    pub dest: DestRef,
    pub weight: u32,
    pub headers: HeaderOps,
}

/// What a checked route does.
#[derive(Debug, Clone)]
pub enum CheckedAction {
    Forward(Vec<CheckedDest>),
    Redirect(Redirect),
    Direct(StatusCode, Bytes),
}

/// A checked `http[]` entry.
#[derive(Debug, Clone)]
pub struct CheckedRoute {
    pub name: String,
    /// `spec.http[i]`.
    pub path: String,
    /// Matches that apply to sidecars (OR); empty = every request.
    pub matches: Vec<RequestMatch>,
    pub action: CheckedAction,
    pub timeout: Option<std::time::Duration>,
    pub retry: RetryPolicy,
    pub fault: Option<Fault>,
    pub headers: HeaderOps,
    pub rewrite: Option<Rewrite>,
    pub mirror: Option<(DestRef, f64)>,
}

/// A checked VirtualService.
#[derive(Debug, Clone)]
pub struct CheckedVirtualService {
    /// `namespace/name`.
    pub name: String,
    /// Resolved hosts.
    pub hosts: Vec<String>,
    /// Whether it applies to sidecars (`gateways` empty or listing `mesh`).
    pub for_mesh: bool,
    /// Routes that apply to sidecars, in order.
    pub routes: Vec<CheckedRoute>,
}

/// Checks a VirtualService in `namespace`.
pub fn check(vs: &model::VirtualService, namespace: &str, name: &str, sink: &mut Sink<'_>) -> CheckedVirtualService {
    // TLS (SNI) routes are served by `serin gateway` only: a VirtualService that
    // applies to sidecars must not have them.
    sink.unsupported(
        vs.tls.is_some() && applies_to_mesh(&vs.gateways),
        "spec.tls",
        "sidecars route HTTP only; TLS/SNI routes are served by `serin gateway` for VirtualServices bound only to gateways",
    );
    sink.unsupported(vs.tcp.is_some(), "spec.tcp", "serin routes HTTP only; TCP routes are not implemented");
    if vs.hosts.is_empty() {
        sink.push("spec.hosts", "at least one host is required");
    }
    let mut hosts = Vec::new();
    for (i, h) in vs.hosts.iter().enumerate() {
        if sink.check(&format!("spec.hosts[{i}]"), hosts::check_host(h, true)).is_some() {
            hosts.push(hosts::resolve_host(h, namespace));
        }
    }
    for (i, g) in vs.gateways.iter().enumerate() {
        if g.is_empty() {
            sink.push(&format!("spec.gateways[{i}]"), "gateway name must not be empty");
        }
    }
    if let Some(tls) = vs.tls.as_ref().filter(|_| !applies_to_mesh(&vs.gateways)) {
        crate::config::compile::gateway::check_tls_routes(tls, namespace, sink);
    }
    if vs.http.is_empty() && vs.tls.is_none() && vs.tcp.is_none() {
        sink.push("spec.http", "at least one http route is required");
    }
    let mut routes = Vec::new();
    for (i, route) in vs.http.iter().enumerate() {
        let path = format!("spec.http[{i}]");
        let default_name = format!("{namespace}/{name}/{i}");
        if let Some(r) = check_route(route, &path, namespace, &vs.gateways, default_name, sink) {
            routes.push(r);
        }
    }
    let for_mesh = applies_to_mesh(&vs.gateways) || !routes.is_empty();
    CheckedVirtualService { name: format!("{namespace}/{name}"), hosts, for_mesh, routes }
}

/// Whether a gateways list selects sidecars.
pub fn applies_to_mesh(gateways: &[String]) -> bool {
    gateways.is_empty() || gateways.iter().any(|g| g == MESH)
}

/// Checks one route; `None` when none of its matches applies to sidecars.
fn check_route(
    r: &model::HttpRoute,
    path: &str,
    namespace: &str,
    vs_gateways: &[String],
    default_name: String,
    sink: &mut Sink<'_>,
) -> Option<CheckedRoute> {
    sink.unsupported(r.cors_policy.is_some(), &format!("{path}.corsPolicy"), "");
    sink.unsupported(r.delegate.is_some(), &format!("{path}.delegate"), "write the routes in the root VirtualService");
    sink.unsupported(r.mirrors.is_some(), &format!("{path}.mirrors"), "use mirror + mirrorPercentage");

    let mut matches = Vec::new();
    let mut any_for_mesh = r.matches.is_empty() && applies_to_mesh(vs_gateways);
    for (j, m) in r.matches.iter().enumerate() {
        let mpath = format!("{path}.match[{j}]");
        let compiled = check_match(m, &mpath, sink);
        let gateways = if m.gateways.is_empty() { vs_gateways } else { &m.gateways };
        if applies_to_mesh(gateways) {
            any_for_mesh = true;
            matches.push(compiled);
        }
    }

    let actions = [!r.route.is_empty(), r.redirect.is_some(), r.direct_response.is_some(), r.delegate.is_some()];
    let action_count = actions.iter().filter(|x| **x).count();
    if action_count == 0 {
        sink.push(path, "one of route, redirect or directResponse is required");
    } else if action_count > 1 {
        sink.push(path, "only one of route, redirect and directResponse may be set");
    }
    let action = if let Some(red) = &r.redirect {
        CheckedAction::Redirect(route_extras::redirect(red, &format!("{path}.redirect"), sink))
    } else if let Some(d) = &r.direct_response {
        let (status, body) = route_extras::direct_response(d, &format!("{path}.directResponse"), sink);
        CheckedAction::Direct(status, body)
    } else {
        CheckedAction::Forward(destinations(&r.route, path, namespace, sink))
    };
    let forwards = matches!(action, CheckedAction::Forward(_));
    if r.rewrite.is_some() && r.redirect.is_some() {
        sink.push(&format!("{path}.rewrite"), "rewrite and redirect cannot both be set");
    }
    if r.mirror.is_some() && !forwards {
        sink.push(&format!("{path}.mirror"), "mirror needs route destinations");
    }
    let mirror_pct = if let Some(p) = &r.mirror_percentage {
        sink.check(&format!("{path}.mirrorPercentage.value"), fields::percentage(p.value)).unwrap_or(100.0)
    } else if let Some(p) = r.mirror_percent {
        #[allow(clippy::cast_precision_loss)]
        let v = p as f64;
        sink.check(&format!("{path}.mirrorPercent"), fields::percentage(v)).unwrap_or(100.0)
    } else {
        100.0
    };
    let mirror = r.mirror.as_ref().and_then(|m| dest_ref(m, &format!("{path}.mirror"), namespace, sink));

    let route = CheckedRoute {
        name: r.name.clone().unwrap_or(default_name),
        path: path.to_string(),
        matches,
        action,
        timeout: route_extras::timeout(r.timeout.as_ref(), &format!("{path}.timeout"), sink),
        retry: route_extras::retry_policy(r.retries.as_ref(), &format!("{path}.retries"), sink),
        fault: r.fault.as_ref().map(|f| route_extras::fault(f, &format!("{path}.fault"), sink)),
        headers: fields::header_ops(r.headers.as_ref(), &format!("{path}.headers"), sink),
        rewrite: r.rewrite.as_ref().map(|w| route_extras::rewrite(w, &format!("{path}.rewrite"), sink)),
        mirror: mirror.map(|m| (m, mirror_pct)),
    };
    any_for_mesh.then_some(route)
}

/// The weighted destinations: relative weights, 0-weight entries dropped.
fn destinations(
    list: &[model::HttpRouteDestination],
    path: &str,
    namespace: &str,
    sink: &mut Sink<'_>,
) -> Vec<CheckedDest> {
    let mut out = Vec::new();
    let mut total: u64 = 0;
    let mut weights_ok = true;
    for (k, d) in list.iter().enumerate() {
        let dpath = format!("{path}.route[{k}]");
        let weight = match d.weight {
            None => 0,
            Some(w) if w < 0 => {
                sink.push(&format!("{dpath}.weight"), format!("weight {w} must not be negative"));
                weights_ok = false;
                continue;
            }
            Some(w) => match u32::try_from(w).ok().filter(|w| i32::try_from(*w).is_ok()) {
                Some(w) => w,
                None => {
                    sink.push(&format!("{dpath}.weight"), format!("weight {w} is too large (max {})", i32::MAX));
                    weights_ok = false;
                    continue;
                }
            },
        };
        total += u64::from(weight);
        let headers = fields::header_ops(d.headers.as_ref(), &format!("{dpath}.headers"), sink);
        let Some(dest) = dest_ref(&d.destination, &format!("{dpath}.destination"), namespace, sink) else { continue };
        out.push(CheckedDest { dest, weight, headers });
    }
    if list.len() == 1 {
        // A single destination takes all traffic, whatever its weight.
        for d in &mut out {
            d.weight = d.weight.max(1);
        }
        return out;
    }
    if weights_ok && list.len() > 1 && total == 0 {
        sink.push(&format!("{path}.route"), "total destination weight is 0: at least one weight must be positive");
    }
    out.retain(|d| d.weight > 0);
    out
}

/// A `destination` block → [`DestRef`].
pub fn dest_ref(d: &model::Destination, path: &str, namespace: &str, sink: &mut Sink<'_>) -> Option<DestRef> {
    let host_ok = sink.check(&format!("{path}.host"), hosts::check_host(&d.host, false)).is_some();
    if d.subset.as_ref().is_some_and(String::is_empty) {
        sink.push(&format!("{path}.subset"), "subset name must not be empty");
    }
    let port = match d.port.as_ref().and_then(|p| p.number) {
        Some(n) => Some(sink.check(&format!("{path}.port.number"), fields::port(n))?),
        None => None,
    };
    host_ok.then(|| DestRef {
        host: hosts::resolve_host(&d.host, namespace),
        subset: d.subset.clone().filter(|s| !s.is_empty()),
        port,
        path: path.to_string(),
    })
}

/// One `match[]` entry → [`RequestMatch`].
fn check_match(m: &model::HttpMatchRequest, path: &str, sink: &mut Sink<'_>) -> RequestMatch {
    sink.unsupported(
        !m.source_labels.is_empty(),
        &format!("{path}.sourceLabels"),
        "serin compiles one route table for every client; it cannot select rules by client labels",
    );
    sink.unsupported(
        m.source_namespace.is_some(),
        &format!("{path}.sourceNamespace"),
        "serin compiles one route table for every client; it cannot select rules by client namespace",
    );
    sink.unsupported(m.stat_prefix.is_some(), &format!("{path}.statPrefix"), "");
    let mut out = RequestMatch { ignore_uri_case: m.ignore_uri_case, ..RequestMatch::default() };
    let req = |field: &str, sm: &Option<model::StringMatch>, lower: bool, sink: &mut Sink<'_>| {
        sm.as_ref().and_then(|sm| sink.check(&format!("{path}.{field}"), fields::required_match(sm, lower)))
    };
    out.uri = req("uri", &m.uri, m.ignore_uri_case, sink);
    out.scheme = req("scheme", &m.scheme, false, sink);
    out.method = req("method", &m.method, false, sink);
    out.authority = req("authority", &m.authority, false, sink);
    for (what, map, target) in
        [("headers", &m.headers, &mut out.headers), ("withoutHeaders", &m.without_headers, &mut out.without_headers)]
    {
        for (name, sm) in map {
            let field = format!("{path}.{what}.{name}");
            // Istio ignores these keys in header matches (they have their own fields).
            if matches!(name.to_ascii_lowercase().as_str(), "uri" | "scheme" | "method" | "authority") {
                continue;
            }
            if name.starts_with("@request.auth.claims") {
                sink.push(&field, "JWT claim matching (@request.auth.claims) is not supported by serin");
                continue;
            }
            let Some(header) = sink.check(&field, fields::header_name(name)) else { continue };
            let value = match sm {
                None => None,
                Some(sm) => match sink.check(&field, fields::string_match(sm, false)) {
                    Some(v) => v,
                    None => continue,
                },
            };
            target.push((header, value));
        }
    }
    for (name, sm) in &m.query_params {
        let field = format!("{path}.queryParams.{name}");
        if let Some(v) = sink.check(&field, fields::required_match(sm, false)) {
            out.query_params.push((name.clone(), v));
        }
    }
    out.port = m.port.and_then(|p| sink.check(&format!("{path}.port"), fields::port(p)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::error::ConfigError;

    fn routes(yaml: &str) -> (Vec<(Option<String>, u32)>, Vec<ConfigError>) {
        let list: Vec<model::HttpRouteDestination> = serde_saphyr::from_str(yaml).expect("yaml");
        let mut errors = Vec::new();
        let mut sink = Sink { file: "f", resource: "VirtualService ns/vs".into(), errors: &mut errors };
        let out = destinations(&list, "spec.http[0]", "ns", &mut sink);
        (out.into_iter().map(|d| (d.dest.subset, d.weight)).collect(), errors)
    }

    #[test]
    fn relative_weights() {
        let (d, e) = routes(
            "- {destination: {host: a, subset: v1}, weight: 999}\n- {destination: {host: a, subset: v2}, weight: 1}\n",
        );
        assert!(e.is_empty());
        assert_eq!(d, vec![(Some("v1".into()), 999), (Some("v2".into()), 1)]);
        let (d, e) = routes("- {destination: {host: a}, weight: 0}\n");
        assert!(e.is_empty());
        assert_eq!(d, vec![(None, 1)], "a single destination takes all");
        let (d, _) =
            routes("- {destination: {host: a, subset: v1}, weight: 3}\n- {destination: {host: a, subset: v2}}\n");
        assert_eq!(d, vec![(Some("v1".into()), 3)], "absent weight = 0 = dropped");
        let (_, e) = routes(
            "- {destination: {host: a, subset: v1}, weight: 0}\n- {destination: {host: a, subset: v2}, weight: 0}\n",
        );
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].field, "spec.http[0].route");
        let (_, e) = routes("- {destination: {host: a}, weight: -1}\n- {destination: {host: a}, weight: 1}\n");
        assert_eq!(e[0].field, "spec.http[0].route[0].weight");
    }

    #[test]
    fn gateways_select_sidecars() {
        assert!(applies_to_mesh(&[]));
        assert!(applies_to_mesh(&["gw".into(), "mesh".into()]));
        assert!(!applies_to_mesh(&["gw".into()]));
    }
}
