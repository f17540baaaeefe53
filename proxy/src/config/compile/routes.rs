//! Virtual hosts and routes: checked VirtualServices linked to clusters, and the
//! implicit default route of every registry service without a VirtualService.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::registry::{Clusters, Service};
use crate::config::error::ConfigError;
use crate::config::hosts;
use crate::config::validate::{CheckedAction, CheckedRoute, CheckedVirtualService, DestRef, Origin};
use crate::snapshot::{
    Cluster, HeaderOps, HostPattern, Mirror, RequestMatch, RetryPolicy, Route, RouteAction, RouteDestination,
    VirtualHost, WeightedDestinations,
};

/// Links one VirtualService; `None` when it does not apply to sidecars.
pub fn virtual_host(
    origin: &Origin,
    vs: &CheckedVirtualService,
    services: &BTreeMap<String, Service>,
    clusters: &mut Clusters<'_>,
    errors: &mut Vec<ConfigError>,
) -> Option<VirtualHost> {
    if !vs.for_mesh {
        return None;
    }
    let mut domains: Vec<HostPattern> = Vec::new();
    for host in &vs.hosts {
        for d in hosts::domains(host) {
            if !domains.contains(&d) {
                domains.push(d);
            }
        }
    }
    let mut routes = Vec::new();
    for r in &vs.routes {
        if let Some(route) = route(origin, r, services, clusters, errors) {
            routes.push(route);
        }
    }
    Some(VirtualHost { name: vs.name.clone(), domains, routes })
}

fn route(
    origin: &Origin,
    r: &CheckedRoute,
    services: &BTreeMap<String, Service>,
    clusters: &mut Clusters<'_>,
    errors: &mut Vec<ConfigError>,
) -> Option<Route> {
    let match_port = single_match_port(&r.matches);
    let action = match &r.action {
        CheckedAction::Redirect(red) => RouteAction::Redirect(red.clone()),
        CheckedAction::Direct(status, body) => RouteAction::Direct { status: *status, body: body.clone() },
        CheckedAction::Forward(list) => {
            let mut dests = Vec::new();
            for d in list {
                let cluster = link(origin, &d.dest, match_port, services, clusters, errors)?;
                dests.push(RouteDestination { cluster, weight: d.weight, headers: d.headers.clone() });
            }
            match WeightedDestinations::new(dests) {
                Some(w) => RouteAction::Forward(w),
                None => {
                    errors.push(origin.error(&format!("{}.route", r.path), "no destination with a positive weight"));
                    return None;
                }
            }
        }
    };
    let mirror = match &r.mirror {
        Some((dest, percentage)) => {
            let cluster = link(origin, dest, match_port, services, clusters, errors)?;
            Some(Mirror { cluster, percentage: *percentage })
        }
        None => None,
    };
    Some(Route {
        name: r.name.clone(),
        matches: r.matches.clone(),
        action,
        timeout: r.timeout,
        retry: r.retry.clone(),
        fault: r.fault.clone(),
        headers: r.headers.clone(),
        rewrite: r.rewrite.clone(),
        mirror,
    })
}

/// The port every match of a route names, when they all name the same one.
fn single_match_port(matches: &[RequestMatch]) -> Option<u16> {
    let first = matches.first()?.port?;
    matches.iter().all(|m| m.port == Some(first)).then_some(first)
}

/// Finds the cluster of a destination; errors name the destination's fields.
/// (Also used by the gateway compile for `tls[]` destinations.)
pub(super) fn link(
    origin: &Origin,
    dest: &DestRef,
    match_port: Option<u16>,
    services: &BTreeMap<String, Service>,
    clusters: &mut Clusters<'_>,
    errors: &mut Vec<ConfigError>,
) -> Option<Arc<Cluster>> {
    let Some(service) = hosts::lookup_candidates(&dest.host).iter().find_map(|h| services.get(h)) else {
        let message = format!(
            "host {} is not in the service registry (add a ServiceEntry for it; Istio would answer 503 NC)",
            dest.host
        );
        errors.push(origin.error(&format!("{}.host", dest.path), message));
        return None;
    };
    let port = match (dest.port, service.ports.as_slice()) {
        (Some(p), _) => p,
        (None, [only]) => only.number,
        (None, _) => match match_port.filter(|p| service.port(*p).is_some()) {
            Some(p) => p,
            None => {
                let message = format!(
                    "port.number is required: service {} has several ports ({})",
                    service.info.host,
                    service.port_list()
                );
                errors.push(origin.error(&format!("{}.port", dest.path), message));
                return None;
            }
        },
    };
    // The only ways to fail now: a port the service lacks, or an unknown subset.
    let field = if service.port(port).is_some() { "subset" } else { "port.number" };
    let field = format!("{}.{field}", dest.path);
    match clusters.get(service, dest.subset.as_deref(), port) {
        Ok(c) => Some(c),
        Err(message) => {
            errors.push(origin.error(&field, message));
            None
        }
    }
}

/// The implicit virtual host of a service nobody routes explicitly: one route to
/// the whole service (per port when it has several), Istio's default retries.
pub fn implicit_virtual_host(service: &Service, clusters: &mut Clusters<'_>) -> Result<VirtualHost, String> {
    let host = &service.info.host;
    let mut routes = Vec::new();
    let several = service.ports.len() > 1;
    for p in &service.ports {
        let cluster = clusters.get(service, None, p.number)?;
        let matches =
            if several { vec![RequestMatch { port: Some(p.number), ..RequestMatch::default() }] } else { vec![] };
        routes.push(default_route(format!("service:{host}:{}", p.number), matches, cluster));
    }
    if several && let Some(first) = service.ports.first() {
        let cluster = clusters.get(service, None, first.number)?;
        routes.push(default_route(format!("service:{host}"), vec![], cluster));
    }
    Ok(VirtualHost { name: format!("service:{host}"), domains: hosts::domains(host), routes })
}

fn default_route(name: String, matches: Vec<RequestMatch>, cluster: Arc<Cluster>) -> Route {
    let dest = RouteDestination { cluster, weight: 1, headers: HeaderOps::default() };
    let action = match WeightedDestinations::new(vec![dest]) {
        Some(w) => RouteAction::Forward(w),
        None => RouteAction::Direct { status: http::StatusCode::SERVICE_UNAVAILABLE, body: bytes::Bytes::new() },
    };
    Route {
        name,
        matches,
        action,
        timeout: None,
        retry: RetryPolicy::default(),
        fault: None,
        headers: HeaderOps::default(),
        rewrite: None,
        mirror: None,
    }
}
