//! The service registry (ServiceEntry + WorkloadEntry) and clusters: one per
//! (service, subset, port), with the DestinationRule policy merged in.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use crate::config::error::ConfigError;
use crate::config::hosts;
use crate::config::model::Resolution;
use crate::config::validate::{
    CheckedDestinationRule, CheckedEndpoint, CheckedPort, CheckedServiceEntry, CheckedSubset, Origin, PolicyOverlay,
};
use crate::snapshot::{Cluster, Endpoint, EndpointRegistry, ServiceInfo};

/// An endpoint with its address resolved.
#[derive(Debug, Clone)]
pub struct ResolvedEndpoint {
    pub ip: IpAddr,
    pub spec: CheckedEndpoint,
}

/// A registry service (one host of a ServiceEntry, merged over ServiceEntries).
#[derive(Debug, Clone)]
pub struct Service {
    pub info: Arc<ServiceInfo>,
    pub ports: Vec<CheckedPort>,
    pub endpoints: Vec<ResolvedEndpoint>,
    /// `namespace/name` of the ServiceEntry that defined it first.
    pub defined_by: String,
}

impl Service {
    /// The port `number`, if the service has it.
    pub fn port(&self, number: u16) -> Option<&CheckedPort> {
        self.ports.iter().find(|p| p.number == number)
    }

    /// Port numbers, for messages.
    pub fn port_list(&self) -> String {
        self.ports.iter().map(|p| p.number.to_string()).collect::<Vec<_>>().join(", ")
    }
}

/// Builds the services by FQDN.
pub fn services(
    entries: &[(Origin, CheckedServiceEntry)],
    workloads: &[(Origin, CheckedEndpoint)],
    errors: &mut Vec<ConfigError>,
) -> BTreeMap<String, Service> {
    let mut out: BTreeMap<String, Service> = BTreeMap::new();
    for (origin, se) in entries {
        let mut specs: Vec<CheckedEndpoint> = se.endpoints.clone();
        if let Some(selector) = &se.selector {
            specs.extend(
                workloads
                    .iter()
                    .map(|(_, w)| w)
                    .filter(|w| w.namespace == se.namespace && labels_match(&w.labels, selector))
                    .cloned(),
            );
        }
        for (i, host) in se.hosts.iter().enumerate() {
            let mut endpoints = Vec::new();
            for spec in &specs {
                for ip in resolve(&spec.address) {
                    endpoints.push(ResolvedEndpoint { ip, spec: spec.clone() });
                }
            }
            if specs.is_empty()
                && matches!(se.resolution, Resolution::DNS | Resolution::DNS_ROUND_ROBIN)
                && !host.starts_with('*')
            {
                for ip in resolve(host) {
                    let spec = CheckedEndpoint {
                        address: host.clone(),
                        ports: BTreeMap::new(),
                        labels: BTreeMap::new(),
                        service_account: None,
                        workload: host.clone(),
                        namespace: se.namespace.clone(),
                    };
                    endpoints.push(ResolvedEndpoint { ip, spec });
                }
            }
            match out.get_mut(host) {
                Some(existing) => {
                    let same_ports = existing.ports.len() == se.ports.len()
                        && se.ports.iter().all(|p| existing.port(p.number).is_some_and(|q| q.name == p.name));
                    if same_ports {
                        existing.endpoints.extend(endpoints);
                    } else {
                        errors.push(origin.error(
                            &format!("spec.hosts[{i}]"),
                            format!(
                                "host {host} is also defined by ServiceEntry {} with other ports ({})",
                                existing.defined_by,
                                existing.port_list()
                            ),
                        ));
                    }
                }
                None => {
                    let (name, namespace) = match hosts::split_cluster_local(host) {
                        Some((n, ns)) => (n.to_string(), ns.to_string()),
                        None => (host.split('.').next().unwrap_or(host).to_string(), se.namespace.clone()),
                    };
                    let info = Arc::new(ServiceInfo {
                        host: host.clone(),
                        name,
                        namespace,
                        ports: se.ports.iter().map(|p| (p.number, p.protocol.clone())).collect(),
                        addresses: se.addresses.clone(),
                    });
                    let service = Service { info, ports: se.ports.clone(), endpoints, defined_by: se.name.clone() };
                    out.insert(host.clone(), service);
                }
            }
        }
    }
    out
}

/// Resolves an endpoint address: an IP as is, a name through the system resolver
/// at compile time (failures are logged and give no endpoint).
fn resolve(address: &str) -> Vec<IpAddr> {
    if let Ok(ip) = address.parse::<IpAddr>() {
        return vec![ip];
    }
    match (address, 0u16).to_socket_addrs() {
        Ok(addrs) => {
            let mut ips: Vec<IpAddr> = Vec::new();
            for a in addrs {
                if !ips.contains(&a.ip()) {
                    ips.push(a.ip());
                }
            }
            ips
        }
        Err(e) => {
            tracing::warn!(%address, error = %e, "cannot resolve endpoint address; it gets no endpoint");
            Vec::new()
        }
    }
}

/// Whether `labels` contain every `selector` pair.
pub fn labels_match(labels: &BTreeMap<String, String>, selector: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// DestinationRules by host, merged like Istio: the first rule's `trafficPolicy`
/// wins, subsets are combined (the first definition of a name wins).
pub fn destination_rules(rules: &[(Origin, CheckedDestinationRule)]) -> Vec<CheckedDestinationRule> {
    let mut out: Vec<CheckedDestinationRule> = Vec::new();
    for (_, r) in rules {
        match out.iter_mut().find(|x| x.host == r.host) {
            Some(existing) => {
                tracing::warn!(host = %r.host, first = %existing.name, other = %r.name, "several DestinationRules for one host; merging");
                if is_empty(&existing.policy) {
                    existing.policy = r.policy.clone();
                }
                for s in &r.subsets {
                    if !existing.subsets.iter().any(|x| x.name == s.name) {
                        existing.subsets.push(s.clone());
                    }
                }
            }
            None => out.push(r.clone()),
        }
    }
    out
}

fn is_empty(p: &PolicyOverlay) -> bool {
    p.load_balancer.is_none() && p.outlier.is_none() && p.pool.is_none() && p.tls.is_none()
}

/// The DestinationRule for a service host: exact host first, else the longest
/// matching wildcard (`*.example.com`, `*`).
pub fn rule_for<'a>(rules: &'a [CheckedDestinationRule], host: &str) -> Option<&'a CheckedDestinationRule> {
    if let Some(r) = rules.iter().find(|r| r.host == host) {
        return Some(r);
    }
    rules
        .iter()
        .filter(|r| r.host == "*" || r.host.strip_prefix('*').is_some_and(|suffix| host.ends_with(suffix)))
        .max_by_key(|r| r.host.len())
}

/// Builds and caches clusters.
pub struct Clusters<'a> {
    pub rules: &'a [CheckedDestinationRule],
    pub registry: &'a EndpointRegistry,
    pub built: HashMap<String, Arc<Cluster>>,
}

impl Clusters<'_> {
    /// The cluster for `service`, optional `subset` and `port` (a port of the service).
    pub fn get(&mut self, service: &Service, subset: Option<&str>, port: u16) -> Result<Arc<Cluster>, String> {
        let host = &service.info.host;
        let name = format!("outbound|{port}|{}|{host}", subset.unwrap_or(""));
        if let Some(c) = self.built.get(&name) {
            return Ok(c.clone());
        }
        let svc_port = service
            .port(port)
            .ok_or_else(|| format!("service {host} has no port {port} (ports: {})", service.port_list()))?;
        let rule = rule_for(self.rules, host);
        let base = rule.map(|r| r.policy.clone()).unwrap_or_default();
        let (labels, policy) = match subset {
            None => (BTreeMap::new(), base),
            Some(s) => {
                let found: Option<&CheckedSubset> = rule.and_then(|r| r.subsets.iter().find(|x| x.name == s));
                match found {
                    Some(sub) => (sub.labels.clone(), sub.policy.over(&base)),
                    None => return Err(unknown_subset(host, s, rule)),
                }
            }
        };
        let endpoints = service
            .endpoints
            .iter()
            .filter(|e| labels_match(&e.spec.labels, &labels))
            .map(|e| {
                let number = e.spec.ports.get(&svc_port.name).copied().or(svc_port.target_port).unwrap_or(port);
                let addr = SocketAddr::new(e.ip, number);
                Arc::new(Endpoint {
                    addr,
                    labels: e.spec.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                    workload: e.spec.workload.clone(),
                    namespace: e.spec.namespace.clone(),
                    service_account: e.spec.service_account.clone(),
                    state: self.registry.get_or_create(addr),
                })
            })
            .collect();
        let cluster = Arc::new(Cluster {
            name: name.clone(),
            service: service.info.clone(),
            subset: subset.map(str::to_string),
            port,
            endpoints,
            policy: policy.resolve(),
            rr_cursor: AtomicU64::new(0),
        });
        self.built.insert(name, cluster.clone());
        Ok(cluster)
    }
}

fn unknown_subset(host: &str, subset: &str, rule: Option<&CheckedDestinationRule>) -> String {
    match rule {
        Some(r) if !r.subsets.is_empty() => {
            let names: Vec<&str> = r.subsets.iter().map(|s| s.name.as_str()).collect();
            format!(
                "unknown subset {subset:?} of host {host} (DestinationRule {} defines {})",
                r.name,
                names.join(", ")
            )
        }
        Some(r) => format!("unknown subset {subset:?} of host {host} (DestinationRule {} defines no subsets)", r.name),
        None => format!("unknown subset {subset:?}: no DestinationRule defines subsets for host {host}"),
    }
}
