//! Compiling Istio `Gateway` resources and the VirtualServices bound to them into
//! what `serin gateway` serves: per port, either one plain-HTTP route table, or
//! TLS servers chosen by SNI that terminate TLS (HTTPS `SIMPLE` / `MUTUAL`, each
//! with its own route table) or pass it through (`PASSTHROUGH`, routed by the
//! VirtualService `tls[].match[].sniHosts`).
//!
//! Binding follows Istio: a VirtualService binds to a Gateway it names in
//! `gateways` (`ns/name`, or `name` in its own namespace; a `match[].gateways`
//! list overrides the VirtualService's for that match), on every server of that
//! Gateway whose `hosts` admit the VirtualService's namespace and share a name with
//! its `hosts`. HTTP servers of one port share one route table (Istio's `http.80`);
//! each HTTPS server has its own (`https.443.<port name>.<gateway>.<namespace>`).
//!
//! The HTTP routes of a bound VirtualService are compiled by the same code as the
//! sidecar's: the VirtualService is viewed "as seen by this gateway" (the gateway
//! plays the role of `mesh` in its `gateways` lists) and then checked and linked as
//! usual, so retries, timeouts, faults, rewrites and redirects behave the same.
//!
//! Certificate files are only named here; `serin gateway` loads them (see
//! `crate::gateway::tls`). Unsupported Gateway fields are errors naming the field.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Deserialize;

use super::registry::{self, Clusters, Service};
use super::routes;
use crate::config::error::{ConfigError, ConfigErrors, Sink};
use crate::config::hosts;
use crate::config::load::ConfigSet;
use crate::config::model::{self, Resource, ServerTlsMode, TlsProtocol};
use crate::config::validate::virtual_service::{DestRef, MESH, dest_ref};
use crate::config::validate::{self, Origin, fields};
use crate::gateway::hosts::{ServerHost, intersect, pattern};
use crate::security::SecurityPolicies;
use crate::snapshot::{
    EndpointRegistry, HeaderOps, HostPattern, Redirect, RetryPolicy, Route, RouteAction, RouteDestination, Snapshot,
    VirtualHost, WeightedDestinations,
};

/// Options of the gateway compile that come from the command line.
#[derive(Debug, Clone, Default)]
pub struct GatewayOptions {
    /// The gateway's own pod labels: only Gateways whose `selector` they satisfy
    /// are served. `None` serves every Gateway of the configuration.
    pub labels: Option<BTreeMap<String, String>>,
    /// Where `credentialName` secrets live: `<dir>/<credentialName>/tls.crt`,
    /// `tls.key` and (MUTUAL) `ca.crt`. `None`: `credentialName` is an error.
    pub credentials_dir: Option<PathBuf>,
}

/// Everything `serin gateway` serves, compiled.
#[derive(Debug)]
pub struct GatewayConfig {
    /// The configuration's version (content hash).
    pub version: String,
    /// Every route table and SNI route of every port in one snapshot, with the
    /// clusters and services they use: what `/config_dump` and `/clusters` show.
    pub overview: Snapshot,
    /// Listening ports by Gateway port number.
    pub ports: BTreeMap<u16, PortConfig>,
    /// Things worth logging that are not errors (e.g. a server nothing binds to).
    pub warnings: Vec<String>,
}

/// What one gateway port serves.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // a few per configuration, never on the request path
pub enum PortConfig {
    /// Plain HTTP (`HTTP`, `HTTP2`, `GRPC`, `GRPC-WEB` servers): one route table.
    Http(RouteTable),
    /// TLS (`HTTPS` and `TLS` servers), chosen by the ClientHello's SNI.
    Tls(Vec<TlsServer>),
}

/// A named route table (a snapshot holding only virtual hosts).
#[derive(Debug)]
pub struct RouteTable {
    /// Istio's route configuration name: `http.80`, `https.443.https.edge.prod`.
    /// Stable across reloads: connections keep following the table of this name.
    pub name: String,
    pub snapshot: Snapshot,
}

/// One TLS server of a port.
#[derive(Debug)]
pub struct TlsServer {
    /// `https.443.<port name>.<gateway>.<namespace>` (or `tls.…` for passthrough).
    pub name: String,
    /// The server names (SNI) this server answers.
    pub sni: Vec<HostPattern>,
    pub action: TlsAction,
}

/// What a TLS server does with a connection.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // a few per configuration, never on the request path
pub enum TlsAction {
    /// Terminate TLS with `credentials`, then route HTTP by `routes`.
    Terminate { credentials: ServerCredentials, routes: RouteTable },
    /// Forward the TLS bytes as they are, by SNI.
    Passthrough(Vec<SniRoute>),
}

/// The certificate files of a terminating server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerCredentials {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// MUTUAL: PEM CA certificates client certificates must chain to.
    pub client_ca: Option<PathBuf>,
    /// Where these files are named, for errors about them.
    pub origin: FieldOrigin,
}

/// A field of a resource, for errors found after compiling (e.g. loading files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldOrigin {
    pub file: String,
    /// `Kind namespace/name`.
    pub resource: String,
    /// e.g. `spec.servers[1].tls`.
    pub field: String,
}

impl FieldOrigin {
    /// A configuration error about this field.
    pub fn error(&self, message: impl Into<String>) -> ConfigError {
        ConfigError::new(&self.file, &self.resource, &self.field, message)
    }
}

/// One TLS route of a passthrough server: connections whose SNI matches go to
/// one of `destinations` (picked by weight per connection).
#[derive(Debug)]
pub struct SniRoute {
    /// `namespace/name/tls[i]` of the VirtualService route.
    pub name: String,
    /// Server names, already narrowed to the server's hosts.
    pub sni: Vec<HostPattern>,
    /// `match[].port`: only on this gateway port.
    pub port: Option<u16>,
    pub destinations: WeightedDestinations,
}

// ---------------------------------------------------------------------------------------------
// VirtualService `tls[]` routes.

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
    path: String,
    matches: Vec<CheckedTlsMatch>,
    /// Destinations with a positive (relative) weight.
    destinations: Vec<(DestRef, u32)>,
}

#[derive(Debug, Clone)]
struct CheckedTlsMatch {
    /// Lower-case SNI hosts (exact or `*.suffix`).
    sni_hosts: Vec<String>,
    port: Option<u16>,
    /// Overrides the VirtualService's `gateways` when not empty.
    gateways: Vec<String>,
}

/// Checks a VirtualService's `tls` block (any YAML) as a list of TLS routes of a
/// VirtualService in `namespace` with the (resolved) `vs_hosts`, recording every
/// problem in `sink`. Called at load for VirtualServices bound only to gateways.
pub(crate) fn check_tls_routes(
    value: &serde_json::Value,
    namespace: &str,
    vs_hosts: &[String],
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
    let vs_hosts: Vec<String> = vs_hosts.iter().map(|h| h.to_ascii_lowercase()).collect();
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
                let h = h.to_ascii_lowercase();
                if !vs_hosts.iter().any(|vs| intersect(&h, vs).as_deref() == Some(h.as_str())) {
                    sink.push(&field, format!("SNI host {h:?} is not one of the VirtualService's hosts"));
                    continue;
                }
                sni_hosts.push(h);
            }
            let port = m.port.and_then(|p| sink.check(&format!("{mpath}.port"), fields::port(p)));
            matches.push(CheckedTlsMatch { sni_hosts, port, gateways: m.gateways.clone() });
        }
        let destinations = tls_destinations(&r.route, &path, namespace, sink);
        out.push(CheckedTlsRoute { path, matches, destinations });
    }
    out
}

/// `serde_path_to_error` writes `[0].match[1].x`; errors read `[0].match[1].x` too,
/// but a leading field needs a dot: `.x` stays, `x` becomes `.x`.
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

// ---------------------------------------------------------------------------------------------
// Gateways and servers.

/// A Gateway resource to serve.
struct GatewayRes<'a> {
    file: &'a str,
    display: String,
    namespace: &'a str,
    name: &'a str,
    spec: &'a model::Gateway,
}

impl GatewayRes<'_> {
    fn origin(&self, field: &str) -> FieldOrigin {
        FieldOrigin { file: self.file.to_string(), resource: self.display.clone(), field: field.to_string() }
    }
}

/// A VirtualService of the configuration.
struct VsRes<'a> {
    origin: Origin,
    namespace: &'a str,
    name: &'a str,
    spec: &'a model::VirtualService,
}

/// A parsed server.
struct ServerSpec {
    /// Index into the gateways list.
    gateway: usize,
    /// `spec.servers[i]`.
    path: String,
    port: u16,
    kind: ServerKind,
    hosts: Vec<ServerHost>,
    /// Route configuration / filter chain name.
    name: String,
}

enum ServerKind {
    Http { https_redirect: bool },
    Terminate(ServerCredentials),
    Passthrough,
}

impl ServerKind {
    fn is_tls(&self) -> bool {
        !matches!(self, ServerKind::Http { .. })
    }
}

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

/// Whether a Gateway's `selector` is satisfied by `labels` (`None`: serve all).
fn selected(spec: &model::Gateway, labels: Option<&BTreeMap<String, String>>) -> bool {
    labels.is_none_or(|labels| spec.selector.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// Resolves a file named in a Gateway: relative paths are taken from the folder of
/// the file the Gateway came from.
fn resolve_file(gateway_file: &str, named: &str) -> PathBuf {
    let path = Path::new(named);
    if path.is_absolute() {
        return path.to_path_buf();
    }
    Path::new(gateway_file).parent().map_or_else(|| path.to_path_buf(), |dir| dir.join(path))
}

/// Parses one server; errors go to `sink`.
fn parse_server(
    gw: &GatewayRes<'_>,
    gateway: usize,
    i: usize,
    server: &model::Server,
    options: &GatewayOptions,
    sink: &mut Sink<'_>,
) -> Option<ServerSpec> {
    let path = format!("spec.servers[{i}]");
    sink.unsupported(server.bind.is_some(), &format!("{path}.bind"), "serin listens on --bind-address / --listen");
    sink.unsupported(server.default_endpoint.is_some(), &format!("{path}.defaultEndpoint"), "");
    sink.unsupported(server.port.target_port.is_some(), &format!("{path}.port.targetPort"), "deprecated in Istio");
    let port = sink.check(&format!("{path}.port.number"), fields::port(server.port.number))?;
    let protocol = server.port.protocol.to_ascii_uppercase();
    let tls = server.tls.as_ref();
    let tls_path = format!("{path}.tls");
    if let Some(t) = tls {
        unsupported_tls_fields(t, &tls_path, sink);
    }
    let mode = tls.and_then(|t| t.mode);
    let kind = match protocol.as_str() {
        "HTTP" | "HTTP2" | "GRPC" | "GRPC-WEB" => {
            if let Some(mode) = mode {
                sink.push(&format!("{tls_path}.mode"), format!("tls.mode {mode:?} needs protocol HTTPS or TLS"));
                return None;
            }
            ServerKind::Http { https_redirect: tls.and_then(|t| t.https_redirect).unwrap_or(false) }
        }
        "HTTPS" | "TLS" => {
            let Some(t) = tls else {
                sink.push(
                    &tls_path,
                    format!("a {protocol} server needs tls settings (mode SIMPLE, MUTUAL or PASSTHROUGH)"),
                );
                return None;
            };
            let has_cert = t.server_certificate.is_some() || t.credential_name.is_some();
            match mode {
                Some(ServerTlsMode::PASSTHROUGH) => ServerKind::Passthrough,
                None if !has_cert => ServerKind::Passthrough,
                None => {
                    sink.push(
                        &format!("{tls_path}.mode"),
                        "tls.mode is missing: Istio's default is PASSTHROUGH, which does not use the certificate; \
                         set mode: SIMPLE (or MUTUAL) to terminate TLS",
                    );
                    return None;
                }
                Some(m @ (ServerTlsMode::SIMPLE | ServerTlsMode::MUTUAL)) if protocol == "HTTPS" => {
                    ServerKind::Terminate(credentials(gw, &tls_path, t, m == ServerTlsMode::MUTUAL, options, sink)?)
                }
                Some(ServerTlsMode::SIMPLE | ServerTlsMode::MUTUAL) => {
                    sink.push(
                        &format!("{tls_path}.mode"),
                        "terminating TLS on a TLS server (then routing TCP) is not supported by serin: \
                         use protocol HTTPS, or mode PASSTHROUGH",
                    );
                    return None;
                }
                Some(other) => {
                    sink.push(
                        &format!("{tls_path}.mode"),
                        format!(
                            "tls.mode {other:?} is not supported by serin gateway (SIMPLE, MUTUAL and PASSTHROUGH are)"
                        ),
                    );
                    return None;
                }
            }
        }
        other => {
            sink.push(
                &format!("{path}.port.protocol"),
                format!("protocol {other} is not served by serin gateway (HTTP, HTTP2, GRPC, HTTPS and TLS are)"),
            );
            return None;
        }
    };
    if server.hosts.is_empty() {
        return None; // Reported at load.
    }
    let hosts = server.hosts.iter().map(|h| ServerHost::parse(h, gw.namespace)).collect();
    let port_name = if server.port.name.is_empty() { protocol.to_ascii_lowercase() } else { server.port.name.clone() };
    let name = match &kind {
        ServerKind::Http { .. } => format!("http.{port}"),
        ServerKind::Terminate(_) => format!("https.{port}.{port_name}.{}.{}", gw.name, gw.namespace),
        ServerKind::Passthrough => format!("tls.{port}.{port_name}.{}.{}", gw.name, gw.namespace),
    };
    Some(ServerSpec { gateway, path, port, kind, hosts, name })
}

/// Reports the server TLS fields serin does not implement.
fn unsupported_tls_fields(t: &model::ServerTlsSettings, path: &str, sink: &mut Sink<'_>) {
    let field = |name: &str| format!("{path}.{name}");
    sink.unsupported(t.ca_crl.is_some(), &field("caCrl"), "");
    sink.unsupported(!t.credential_names.is_empty(), &field("credentialNames"), "use credentialName");
    sink.unsupported(!t.tls_certificates.is_empty(), &field("tlsCertificates"), "use serverCertificate/privateKey");
    sink.unsupported(!t.subject_alt_names.is_empty(), &field("subjectAltNames"), "");
    sink.unsupported(!t.verify_certificate_spki.is_empty(), &field("verifyCertificateSpki"), "");
    sink.unsupported(!t.verify_certificate_hash.is_empty(), &field("verifyCertificateHash"), "");
    sink.unsupported(!t.cipher_suites.is_empty(), &field("cipherSuites"), "serin uses rustls's default suites");
    if let Some(v) = t.min_protocol_version
        && !matches!(v, TlsProtocol::TLS_AUTO | TlsProtocol::TLSV1_2)
    {
        sink.push(
            &field("minProtocolVersion"),
            format!("{v:?} is not supported by serin (TLS 1.2 and 1.3 are served)"),
        );
    }
    if let Some(v) = t.max_protocol_version
        && !matches!(v, TlsProtocol::TLS_AUTO | TlsProtocol::TLSV1_3)
    {
        sink.push(
            &field("maxProtocolVersion"),
            format!("{v:?} is not supported by serin (TLS 1.2 and 1.3 are served)"),
        );
    }
}

/// The certificate files of a SIMPLE or MUTUAL server.
fn credentials(
    gw: &GatewayRes<'_>,
    tls_path: &str,
    t: &model::ServerTlsSettings,
    mutual: bool,
    options: &GatewayOptions,
    sink: &mut Sink<'_>,
) -> Option<ServerCredentials> {
    let origin = gw.origin(tls_path);
    if !mutual && t.ca_certificates.is_some() {
        sink.push(&format!("{tls_path}.caCertificates"), "caCertificates is only used with mode MUTUAL");
    }
    let file = |named: &str| resolve_file(gw.file, named);
    if let Some(credential) = &t.credential_name {
        if t.server_certificate.is_some() || t.private_key.is_some() {
            sink.push(tls_path, "set either credentialName or serverCertificate/privateKey, not both");
            return None;
        }
        let Some(dir) = &options.credentials_dir else {
            sink.push(
                &format!("{tls_path}.credentialName"),
                "Kubernetes secrets are not available to serin: start `serin gateway` with --credentials-dir D \
                 (files D/<credentialName>/tls.crt, tls.key and, for MUTUAL, ca.crt) or use serverCertificate/privateKey",
            );
            return None;
        };
        if credential.is_empty() || credential.contains('/') || credential.starts_with('.') {
            sink.push(&format!("{tls_path}.credentialName"), format!("invalid credential name {credential:?}"));
            return None;
        }
        let secret = dir.join(credential);
        let client_ca = mutual.then(|| match &t.ca_certificates {
            Some(ca) => file(ca),
            // Istio reads the CA from the same secret, or from `<name>-cacert`.
            None if !secret.join("ca.crt").exists() && dir.join(format!("{credential}-cacert")).is_dir() => {
                dir.join(format!("{credential}-cacert")).join("ca.crt")
            }
            None => secret.join("ca.crt"),
        });
        return Some(ServerCredentials {
            cert: secret.join("tls.crt"),
            key: secret.join("tls.key"),
            client_ca,
            origin: gw.origin(&format!("{tls_path}.credentialName")),
        });
    }
    let (Some(cert), Some(key)) = (&t.server_certificate, &t.private_key) else {
        sink.push(tls_path, "serverCertificate and privateKey (or credentialName) are required for SIMPLE and MUTUAL");
        return None;
    };
    let client_ca = if mutual {
        match &t.ca_certificates {
            Some(ca) => Some(file(ca)),
            None => {
                sink.push(&format!("{tls_path}.caCertificates"), "mode MUTUAL needs caCertificates");
                return None;
            }
        }
    } else {
        None
    };
    Some(ServerCredentials { cert: file(cert), key: file(key), client_ca, origin })
}

// ---------------------------------------------------------------------------------------------
// The compile.

/// Compiles the Gateways of `set` (those `options.labels` select) and the
/// VirtualServices bound to them. Endpoint runtime state comes from `registry`.
pub fn compile_gateway(
    set: &ConfigSet,
    registry: &EndpointRegistry,
    source: &str,
    options: &GatewayOptions,
) -> Result<GatewayConfig, ConfigErrors> {
    let checked = validate::check_set(set)?;
    let mut errors: Vec<ConfigError> = Vec::new();
    let mut warnings = Vec::new();
    let services = registry::services(&checked.service_entries, &checked.workload_entries, &mut errors);
    let rules = registry::destination_rules(&checked.destination_rules);
    let mut clusters = Clusters { rules: &rules, registry, built: HashMap::new() };

    let mut gateways = Vec::new();
    let mut vss = Vec::new();
    for r in &set.resources {
        match &r.resource {
            Resource::Gateway(g) if selected(&g.spec, options.labels.as_ref()) => gateways.push(GatewayRes {
                file: &r.file,
                display: r.resource.display_name(),
                namespace: r.resource.namespace(),
                name: r.resource.name(),
                spec: &g.spec,
            }),
            Resource::Gateway(_) => {
                warnings
                    .push(format!("{}: not served: its selector does not match --labels", r.resource.display_name()));
            }
            Resource::VirtualService(v) => vss.push(VsRes {
                origin: Origin { file: r.file.clone(), resource: r.resource.display_name() },
                namespace: r.resource.namespace(),
                name: r.resource.name(),
                spec: &v.spec,
            }),
            _ => {}
        }
    }
    if gateways.is_empty() {
        warnings.push("no Gateway to serve: only the admin, metrics and health ports are open".into());
    }

    let mut servers: Vec<ServerSpec> = Vec::new();
    for (g, gw) in gateways.iter().enumerate() {
        let mut sink = Sink { file: gw.file, resource: gw.display.clone(), errors: &mut errors };
        for (i, server) in gw.spec.servers.iter().enumerate() {
            if let Some(mut spec) = parse_server(gw, g, i, server, options, &mut sink) {
                check_port_conflicts(&servers, &spec, &gateways, &mut sink);
                // TLS server names key their route tables: keep them unique.
                if spec.kind.is_tls() && servers.iter().any(|s| s.name == spec.name) {
                    spec.name = format!("{}.{i}", spec.name);
                }
                servers.push(spec);
            }
        }
    }

    let build = Builder { gateways: &gateways, vss: &vss, services: &services, version: &set.hash, source };
    let ports = build.ports(&servers, &mut clusters, &mut errors, &mut warnings);
    // The overview is built again (routes are not `Clone`); its errors repeat the first pass.
    let mut repeated = Vec::new();
    let overview_hosts = build.overview(&servers, &mut clusters, &mut repeated);
    if !errors.is_empty() {
        errors.dedup();
        return Err(ConfigErrors(errors));
    }
    let overview = Snapshot {
        version: set.hash.clone(),
        source: source.to_string(),
        created: SystemTime::now(),
        virtual_hosts: overview_hosts,
        clusters: clusters.built,
        services: services.into_iter().map(|(host, s)| (host, s.info)).collect(),
        security: SecurityPolicies::default(),
    };
    Ok(GatewayConfig { version: set.hash.clone(), overview, ports, warnings })
}

/// Errors when `spec` cannot share its port with the servers already parsed: a
/// port is plain HTTP or TLS, and two TLS servers of a port cannot claim one SNI name.
fn check_port_conflicts(servers: &[ServerSpec], spec: &ServerSpec, gateways: &[GatewayRes<'_>], sink: &mut Sink<'_>) {
    for other in servers.iter().filter(|s| s.port == spec.port) {
        let where_ = || format!("{} {}", gateways[other.gateway].display, other.path);
        if other.kind.is_tls() != spec.kind.is_tls() {
            sink.push(
                &format!("{}.port", spec.path),
                format!(
                    "port {} is already a {} port ({}); one port serves either plain HTTP or TLS",
                    spec.port,
                    if other.kind.is_tls() { "TLS" } else { "plain HTTP" },
                    where_()
                ),
            );
            return;
        }
        if !spec.kind.is_tls() {
            continue;
        }
        for h in &spec.hosts {
            if other.hosts.iter().any(|o| o.host == h.host) {
                sink.push(
                    &format!("{}.hosts", spec.path),
                    format!("host {:?} on port {} is already served by {}", h.host, spec.port, where_()),
                );
            }
        }
    }
}

/// Builds route tables and SNI routes from parsed servers.
struct Builder<'a> {
    gateways: &'a [GatewayRes<'a>],
    vss: &'a [VsRes<'a>],
    services: &'a BTreeMap<String, Service>,
    version: &'a str,
    source: &'a str,
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

    fn ports(
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
    fn overview(
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
            let resolved: Vec<String> = vs.spec.hosts.iter().map(|h| hosts::resolve_host(h, vs.namespace)).collect();
            let mut scratch = Vec::new();
            let mut sink = Sink { file: &vs.origin.file, resource: vs.origin.resource.clone(), errors: &mut scratch };
            let checked = check_tls_routes(tls, vs.namespace, &resolved, &mut sink);
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
