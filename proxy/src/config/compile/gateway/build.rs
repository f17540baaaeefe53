//! Route tables and SNI routes of parsed servers: which VirtualServices bind to
//! a server, under which names, with which routes.

use std::collections::{BTreeMap, HashMap};
use std::time::SystemTime;

use super::super::registry::{Clusters, Service};
use super::super::routes;
use super::servers::{GatewayRes, ServerKind, ServerSpec, VsRes};
use super::tls_routes::{CheckedTlsRoute, check_tls_routes};
use super::{PortConfig, RouteTable, SniRoute, TlsAction, TlsServer};
use crate::config::error::{ConfigError, Sink};
use crate::config::hosts;
use crate::config::model;
use crate::config::validate;
use crate::config::validate::virtual_service::MESH;
use crate::gateway::hosts::{ServerHost, intersect, pattern};
use crate::security::SecurityPolicies;
use crate::snapshot::{
    HeaderOps, HostPattern, Redirect, RetryPolicy, Route, RouteAction, RouteDestination, Snapshot, VirtualHost,
    WeightedDestinations,
};

/// Whether the `gateways` entry `reference`, written in a VirtualService of
/// `vs_namespace`, names the Gateway `namespace/name` (`ns/name`, `name`, or the
/// old `name.ns.svc.cluster.local` form).
fn refers_to(reference: &str, vs_namespace: &str, namespace: &str, name: &str) -> bool {
    if reference == MESH {
        return false;
    }
    match reference.split_once('/') {
        Some((ns, n)) => ns == namespace && n == name,
        None => match reference.split_once('.') {
            Some((n, rest)) => n == name && rest.split('.').next() == Some(namespace),
            None => reference == name && vs_namespace == namespace,
        },
    }
}

/// Placeholder gateway name for "not this gateway" in a gateway view.
const ELSEWHERE: &str = "serin.internal/another-gateway";

/// The VirtualService as the Gateway `namespace/name` sees it: its `gateways`
/// lists rewritten so that `mesh` means "this gateway", without `tls`/`tcp`.
/// `None` when it does not name the gateway at all.
fn gateway_view(vs: &VsRes<'_>, namespace: &str, name: &str) -> Option<model::VirtualService> {
    let here = |list: &[String]| list.iter().any(|g| refers_to(g, vs.namespace, namespace, name));
    let mut view = vs.spec.clone();
    let binds = here(&vs.spec.gateways);
    let mut any = binds;
    view.gateways = vec![if binds { MESH } else { ELSEWHERE }.to_string()];
    view.tls = None;
    view.tcp = None;
    for route in &mut view.http {
        for m in &mut route.matches {
            if !m.gateways.is_empty() {
                let b = here(&m.gateways);
                any |= b;
                m.gateways = vec![if b { MESH } else { ELSEWHERE }.to_string()];
            }
        }
    }
    any.then_some(view)
}

/// Builds route tables and SNI routes from parsed servers.
pub(super) struct Builder<'a> {
    pub(super) gateways: &'a [GatewayRes<'a>],
    pub(super) vss: &'a [VsRes<'a>],
    pub(super) services: &'a BTreeMap<String, Service>,
    pub(super) version: &'a str,
    pub(super) source: &'a str,
}

impl Builder<'_> {
    fn snapshot(&self, virtual_hosts: Vec<VirtualHost>) -> Snapshot {
        Snapshot {
            version: self.version.to_string(),
            source: self.source.to_string(),
            created: SystemTime::now(),
            virtual_hosts,
            clusters: HashMap::new(),
            services: HashMap::new(),
            security: SecurityPolicies::default(),
        }
    }

    pub(super) fn ports(
        &self,
        servers: &[ServerSpec],
        clusters: &mut Clusters<'_>,
        errors: &mut Vec<ConfigError>,
        warnings: &mut Vec<String>,
    ) -> BTreeMap<u16, PortConfig> {
        let mut ports: BTreeMap<u16, PortConfig> = BTreeMap::new();
        for server in servers {
            let gw = &self.gateways[server.gateway];
            let label = format!("{} {} (port {})", gw.display, server.path, server.port);
            match &server.kind {
                ServerKind::Http { https_redirect } => {
                    let hosts = self.http_hosts(server, *https_redirect, clusters, errors);
                    if hosts.is_empty() {
                        warnings.push(format!("{label}: no VirtualService binds to it; requests get 404"));
                    }
                    let entry = ports.entry(server.port).or_insert_with(|| {
                        PortConfig::Http(RouteTable { name: server.name.clone(), snapshot: self.snapshot(Vec::new()) })
                    });
                    if let PortConfig::Http(table) = entry {
                        merge_hosts(&mut table.snapshot.virtual_hosts, hosts);
                    }
                }
                ServerKind::Terminate(credentials) => {
                    let hosts = self.http_hosts(server, false, clusters, errors);
                    if hosts.is_empty() {
                        warnings.push(format!("{label}: no VirtualService binds to it; requests get 404"));
                    }
                    let routes = RouteTable { name: server.name.clone(), snapshot: self.snapshot(hosts) };
                    let action = TlsAction::Terminate { credentials: credentials.clone(), routes };
                    push_tls(&mut ports, server, action);
                }
                ServerKind::Passthrough => {
                    let routes = self.sni_routes(server, clusters, errors);
                    if routes.is_empty() {
                        warnings.push(format!(
                            "{label}: no VirtualService tls[] route binds to it; connections are closed"
                        ));
                    }
                    push_tls(&mut ports, server, TlsAction::Passthrough(routes));
                }
            }
        }
        ports
    }

    /// Every virtual host and SNI route, named by server, for `/config_dump`.
    pub(super) fn overview(
        &self,
        servers: &[ServerSpec],
        clusters: &mut Clusters<'_>,
        errors: &mut Vec<ConfigError>,
    ) -> Vec<VirtualHost> {
        let mut out = Vec::new();
        for server in servers {
            let prefix = |vh: &mut VirtualHost| vh.name = format!("{}/{}", server.name, vh.name);
            match &server.kind {
                ServerKind::Http { https_redirect } => {
                    let mut hosts = self.http_hosts(server, *https_redirect, clusters, errors);
                    hosts.iter_mut().for_each(prefix);
                    out.extend(hosts);
                }
                ServerKind::Terminate(_) => {
                    let mut hosts = self.http_hosts(server, false, clusters, errors);
                    hosts.iter_mut().for_each(prefix);
                    out.extend(hosts);
                }
                ServerKind::Passthrough => {
                    for r in self.sni_routes(server, clusters, errors) {
                        out.push(VirtualHost {
                            name: format!("{}/{}", server.name, r.name),
                            domains: r.sni,
                            routes: vec![plain_route(r.name, RouteAction::Forward(r.destinations))],
                        });
                    }
                }
            }
        }
        out
    }

    /// The virtual hosts of an HTTP or HTTPS server.
    fn http_hosts(
        &self,
        server: &ServerSpec,
        https_redirect: bool,
        clusters: &mut Clusters<'_>,
        errors: &mut Vec<ConfigError>,
    ) -> Vec<VirtualHost> {
        let gw = &self.gateways[server.gateway];
        if https_redirect {
            // Every host of the server redirects, bound or not (as Istio does).
            let redirect = Redirect {
                uri: None,
                authority: None,
                scheme: Some("https".into()),
                port: None,
                status: http::StatusCode::MOVED_PERMANENTLY,
            };
            let mut domains: Vec<HostPattern> = Vec::new();
            for h in &server.hosts {
                let p = h.pattern();
                if !domains.contains(&p) {
                    domains.push(p);
                }
            }
            return vec![VirtualHost {
                name: format!("https-redirect/{}/{}", gw.namespace, gw.name),
                domains,
                routes: vec![plain_route("https_redirect".into(), RouteAction::Redirect(redirect))],
            }];
        }
        let mut out = Vec::new();
        for vs in self.vss {
            if vs.spec.http.is_empty() {
                continue;
            }
            let Some(view) = gateway_view(vs, gw.namespace, gw.name) else { continue };
            let mut scratch = Vec::new();
            let mut sink = Sink { file: &vs.origin.file, resource: vs.origin.resource.clone(), errors: &mut scratch };
            let checked = validate::virtual_service::check(&view, vs.namespace, vs.name, &mut sink);
            errors.extend(scratch);
            let domains = bound_domains(&checked.hosts, &server.hosts, vs.namespace);
            if domains.is_empty() {
                continue;
            }
            let Some(mut vh) = routes::virtual_host(&vs.origin, &checked, self.services, clusters, errors) else {
                continue;
            };
            if vh.routes.is_empty() {
                continue;
            }
            vh.domains = domains;
            out.push(vh);
        }
        out
    }

    /// The SNI routes of a passthrough server.
    fn sni_routes(
        &self,
        server: &ServerSpec,
        clusters: &mut Clusters<'_>,
        errors: &mut Vec<ConfigError>,
    ) -> Vec<SniRoute> {
        let gw = &self.gateways[server.gateway];
        let mut out = Vec::new();
        for vs in self.vss {
            let Some(tls) = &vs.spec.tls else { continue };
            let vs_binds = vs.spec.gateways.iter().any(|g| refers_to(g, vs.namespace, gw.namespace, gw.name));
            let mut scratch = Vec::new();
            let mut sink = Sink { file: &vs.origin.file, resource: vs.origin.resource.clone(), errors: &mut scratch };
            let checked = check_tls_routes(tls, vs.namespace, &mut sink);
            errors.extend(scratch);
            for (i, r) in checked.iter().enumerate() {
                for m in &r.matches {
                    let here = if m.gateways.is_empty() {
                        vs_binds
                    } else {
                        m.gateways.iter().any(|g| refers_to(g, vs.namespace, gw.namespace, gw.name))
                    };
                    if !here || m.port.is_some_and(|p| p != server.port) {
                        continue;
                    }
                    let sni = bound_domains(&m.sni_hosts, &server.hosts, vs.namespace);
                    if sni.is_empty() {
                        continue;
                    }
                    let Some(destinations) = self.link_tls(vs, r, clusters, errors) else { continue };
                    out.push(SniRoute {
                        name: format!("{}/{}/tls[{i}]", vs.namespace, vs.name),
                        sni,
                        port: m.port,
                        destinations,
                    });
                }
            }
        }
        out
    }

    fn link_tls(
        &self,
        vs: &VsRes<'_>,
        r: &CheckedTlsRoute,
        clusters: &mut Clusters<'_>,
        errors: &mut Vec<ConfigError>,
    ) -> Option<WeightedDestinations> {
        let mut dests = Vec::new();
        for (dest, weight) in &r.destinations {
            let cluster = routes::link(&vs.origin, dest, None, self.services, clusters, errors)?;
            dests.push(RouteDestination { cluster, weight: *weight, headers: HeaderOps::default() });
        }
        let w = WeightedDestinations::new(dests);
        if w.is_none() {
            errors.push(vs.origin.error(&format!("{}.route", r.path), "no destination with a positive weight"));
        }
        w
    }
}

/// Adds a TLS server to its port.
fn push_tls(ports: &mut BTreeMap<u16, PortConfig>, server: &ServerSpec, action: TlsAction) {
    let mut sni: Vec<HostPattern> = Vec::new();
    for h in &server.hosts {
        let p = h.pattern();
        if !sni.contains(&p) {
            sni.push(p);
        }
    }
    let entry = ports.entry(server.port).or_insert_with(|| PortConfig::Tls(Vec::new()));
    if let PortConfig::Tls(list) = entry {
        list.push(TlsServer { name: server.name.clone(), sni, action });
    }
}

/// Adds virtual hosts to a shared route table; a VirtualService bound by several
/// servers of the port answers for all their names.
fn merge_hosts(table: &mut Vec<VirtualHost>, hosts: Vec<VirtualHost>) {
    for vh in hosts {
        match table.iter_mut().find(|t| t.name == vh.name) {
            Some(existing) => {
                for d in vh.domains {
                    if !existing.domains.contains(&d) {
                        existing.domains.push(d);
                    }
                }
            }
            None => table.push(vh),
        }
    }
}

/// The names a VirtualService of `namespace` with `vs_hosts` serves on a server
/// with `server_hosts`: every non-empty intersection, with the short spellings
/// of cluster-local names.
fn bound_domains(vs_hosts: &[String], server_hosts: &[ServerHost], namespace: &str) -> Vec<HostPattern> {
    let mut out: Vec<HostPattern> = Vec::new();
    for sh in server_hosts.iter().filter(|sh| sh.admits_namespace(namespace)) {
        for vh in vs_hosts {
            let Some(common) = intersect(&vh.to_ascii_lowercase(), &sh.host) else { continue };
            let patterns = if common.starts_with('*') { vec![pattern(&common)] } else { hosts::domains(&common) };
            for p in patterns {
                if !out.contains(&p) {
                    out.push(p);
                }
            }
        }
    }
    out
}

/// A route without matches, policies or rewrites.
fn plain_route(name: String, action: RouteAction) -> Route {
    Route {
        name,
        matches: Vec::new(),
        action,
        timeout: None,
        retry: RetryPolicy { attempts: 0, ..RetryPolicy::default() },
        fault: None,
        headers: HeaderOps::default(),
        rewrite: None,
        mirror: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_references() {
        assert!(refers_to("edge", "prod", "prod", "edge"));
        assert!(!refers_to("edge", "dev", "prod", "edge"));
        assert!(refers_to("prod/edge", "dev", "prod", "edge"));
        assert!(refers_to("edge.prod.svc.cluster.local", "dev", "prod", "edge"));
        assert!(!refers_to("mesh", "prod", "prod", "mesh"));
    }

    #[test]
    fn bound_domains_respect_namespaces_and_wildcards() {
        let server = vec![ServerHost::parse("prod/*.example.com", "edge")];
        let vs = vec!["pay.example.com".to_string(), "other.org".to_string()];
        assert_eq!(bound_domains(&vs, &server, "prod"), vec![HostPattern::Exact("pay.example.com".into())]);
        assert!(bound_domains(&vs, &server, "dev").is_empty());
        let any = vec![ServerHost::parse("*", "edge")];
        assert_eq!(
            bound_domains(&["*.example.com".into()], &any, "x"),
            vec![HostPattern::Suffix(".example.com".into())]
        );
    }
}
