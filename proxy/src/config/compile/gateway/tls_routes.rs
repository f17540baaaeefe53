//! VirtualService `tls[]`: SNI routes, served by gateways only. Checked at load
//! (for VirtualServices bound only to gateways) and linked by the gateway compile.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::config::error::Sink;
use crate::config::hosts;
use crate::config::model;
use crate::config::validate::fields;
use crate::config::validate::virtual_service::{DestRef, MESH, dest_ref};

/// `TLSRoute`: VirtualService `tls[]` (SNI routes, served by gateways only).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TlsRoute {
    #[serde(default, rename = "match")]
    matches: Vec<TlsMatch>,
    #[serde(default)]
    route: Vec<TlsRouteDestination>,
}

/// `TLSMatchAttributes`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TlsMatch {
    #[serde(default)]
    sni_hosts: Vec<String>,
    #[serde(default)]
    destination_subnets: Vec<String>,
    #[serde(default)]
    port: Option<i64>,
    #[serde(default)]
    source_labels: BTreeMap<String, String>,
    #[serde(default)]
    gateways: Vec<String>,
    #[serde(default)]
    source_namespace: Option<String>,
}

/// `RouteDestination` of a TLS route.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TlsRouteDestination {
    destination: model::Destination,
    #[serde(default)]
    weight: Option<i64>,
}

/// A checked `tls[]` route.
#[derive(Debug, Clone)]
pub(crate) struct CheckedTlsRoute {
    /// `spec.tls[i]`.
    pub(super) path: String,
    pub(super) matches: Vec<CheckedTlsMatch>,
    /// Destinations with a positive (relative) weight.
    pub(super) destinations: Vec<(DestRef, u32)>,
}

#[derive(Debug, Clone)]
pub(super) struct CheckedTlsMatch {
    /// Lower-case SNI hosts (exact or `*.suffix`).
    pub(super) sni_hosts: Vec<String>,
    pub(super) port: Option<u16>,
    /// Overrides the VirtualService's `gateways` when not empty.
    pub(super) gateways: Vec<String>,
}

/// Checks a VirtualService's `tls` block (any YAML) as a list of TLS routes of a
/// VirtualService in `namespace`, recording every problem in `sink`. Called at
/// load for VirtualServices bound only to gateways.
pub(crate) fn check_tls_routes(
    value: &serde_json::Value,
    namespace: &str,
    sink: &mut Sink<'_>,
) -> Vec<CheckedTlsRoute> {
    let routes: Vec<TlsRoute> = match serde_path_to_error::deserialize(value.clone()) {
        Ok(routes) => routes,
        Err(e) => {
            let at = e.path().to_string();
            let field = if at == "." { "spec.tls".to_string() } else { format!("spec.tls{}", bracket_path(&at)) };
            sink.push(&field, e.into_inner().to_string());
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for (i, r) in routes.iter().enumerate() {
        let path = format!("spec.tls[{i}]");
        if r.matches.is_empty() {
            sink.push(&format!("{path}.match"), "a TLS route needs at least one match with sniHosts");
        }
        let mut matches = Vec::new();
        for (j, m) in r.matches.iter().enumerate() {
            let mpath = format!("{path}.match[{j}]");
            sink.unsupported(!m.destination_subnets.is_empty(), &format!("{mpath}.destinationSubnets"), "");
            sink.unsupported(!m.source_labels.is_empty(), &format!("{mpath}.sourceLabels"), "");
            sink.unsupported(m.source_namespace.is_some(), &format!("{mpath}.sourceNamespace"), "");
            if m.sni_hosts.is_empty() {
                sink.push(&format!("{mpath}.sniHosts"), "at least one SNI host is required");
            }
            let mut sni_hosts = Vec::new();
            for (k, h) in m.sni_hosts.iter().enumerate() {
                let field = format!("{mpath}.sniHosts[{k}]");
                if sink.check(&field, hosts::check_host(h, true)).is_none() {
                    continue;
                }
                // Istio only warns when an SNI host is outside the VirtualService's
                // hosts; what a gateway serves is the SNI host narrowed to its server's.
                sni_hosts.push(h.to_ascii_lowercase());
            }
            if m.gateways.iter().any(|g| g == MESH) {
                sink.push(
                    &format!("{mpath}.gateways"),
                    "TLS routes are served by gateways only (sidecars route HTTP): remove mesh",
                );
            }
            let port = m.port.and_then(|p| sink.check(&format!("{mpath}.port"), fields::port(p)));
            matches.push(CheckedTlsMatch { sni_hosts, port, gateways: m.gateways.clone() });
        }
        let destinations = tls_destinations(&r.route, &path, namespace, sink);
        out.push(CheckedTlsRoute { path, matches, destinations });
    }
    out
}

/// Appends a `serde_path_to_error` path to `spec.tls`: `[0].match[1]` as is, a
/// leading field name (`x`) with a dot.
fn bracket_path(at: &str) -> String {
    if at.starts_with('[') || at.starts_with('.') { at.to_string() } else { format!(".{at}") }
}

/// Weighted destinations of a TLS route: relative weights, as for HTTP routes.
fn tls_destinations(
    list: &[TlsRouteDestination],
    path: &str,
    namespace: &str,
    sink: &mut Sink<'_>,
) -> Vec<(DestRef, u32)> {
    if list.is_empty() {
        sink.push(&format!("{path}.route"), "at least one destination is required");
    }
    let mut out = Vec::new();
    let mut total = 0u64;
    for (k, d) in list.iter().enumerate() {
        let dpath = format!("{path}.route[{k}]");
        let weight = match d.weight {
            None => 0,
            Some(w) => match u32::try_from(w).ok().filter(|w| i32::try_from(*w).is_ok()) {
                Some(w) => w,
                None => {
                    sink.push(&format!("{dpath}.weight"), format!("weight {w} must be within 0..={}", i32::MAX));
                    continue;
                }
            },
        };
        total += u64::from(weight);
        if let Some(dest) = dest_ref(&d.destination, &format!("{dpath}.destination"), namespace, sink) {
            out.push((dest, weight));
        }
    }
    if list.len() == 1 {
        for d in &mut out {
            d.1 = d.1.max(1);
        }
    } else if list.len() > 1 && total == 0 {
        sink.push(&format!("{path}.route"), "total destination weight is 0: at least one weight must be positive");
    }
    out.retain(|d| d.1 > 0);
    out
}
