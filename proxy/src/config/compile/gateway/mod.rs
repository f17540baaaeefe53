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
//!
//! Parts: `servers` (Gateway servers and their TLS settings), `tls_routes`
//! (VirtualService `tls[]`), `build` (route tables and SNI routes).

mod build;
mod servers;
mod tls_routes;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::SystemTime;

use super::registry::{self, Clusters};
use crate::config::error::{ConfigError, ConfigErrors, Sink};
use crate::config::load::ConfigSet;
use crate::config::model::Resource;
use crate::config::validate::{self, Origin};
use crate::security::SecurityPolicies;
use crate::snapshot::{EndpointRegistry, HostPattern, Snapshot, WeightedDestinations};

use build::Builder;
use servers::{GatewayRes, ServerSpec, VsRes, check_port_conflicts, parse_server, selected};
pub(crate) use tls_routes::check_tls_routes;

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
        // A VirtualService bound by several servers is linked once per server.
        let mut seen = std::collections::HashSet::new();
        errors.retain(|e| seen.insert(e.to_string()));
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
