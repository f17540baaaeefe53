//! Compiling a validated [`ConfigSet`] into the routing [`Snapshot`].
//!
//! Steps: check every resource (the parts that need nothing else), build the
//! registry from ServiceEntries and WorkloadEntries, merge DestinationRules,
//! link each VirtualService route to its clusters, add the implicit route of every
//! service no VirtualService covers. Every error of every step is reported.

pub mod gateway;
mod registry;
mod routes;

use std::collections::HashMap;
use std::time::SystemTime;

use super::error::{ConfigError, ConfigErrors};
use super::load::ConfigSet;
use super::validate;
use crate::security::{ROOT_NAMESPACE, SecurityPolicies};
use crate::snapshot::{EndpointRegistry, HostPattern, Snapshot};

/// Compiles `set` into a snapshot; `source` labels it (e.g. `file:/etc/serin`).
/// Endpoint runtime state comes from `registry`, so it survives reloads.
pub fn compile(set: &ConfigSet, registry: &EndpointRegistry, source: &str) -> Result<Snapshot, ConfigErrors> {
    let checked = validate::check_set(set)?;
    let mut errors: Vec<ConfigError> = Vec::new();
    let services = registry::services(&checked.service_entries, &checked.workload_entries, &mut errors);
    let rules = registry::destination_rules(&checked.destination_rules);
    let mut clusters = registry::Clusters { rules: &rules, registry, built: HashMap::new() };

    let mut virtual_hosts = Vec::new();
    let mut seen_exact: HashMap<String, String> = HashMap::new();
    for (origin, vs) in &checked.virtual_services {
        let Some(vh) = routes::virtual_host(origin, vs, &services, &mut clusters, &mut errors) else { continue };
        for d in &vh.domains {
            if let HostPattern::Exact(name) = d {
                if let Some(first) = seen_exact.get(name) {
                    tracing::warn!(host = %name, first = %first, other = %vh.name, "several VirtualServices for one host; the first wins");
                } else {
                    seen_exact.insert(name.clone(), vh.name.clone());
                }
            }
        }
        virtual_hosts.push(vh);
    }
    let covered: Vec<HostPattern> = virtual_hosts.iter().flat_map(|vh| vh.domains.iter().cloned()).collect();
    for service in services.values() {
        // Default clusters: one per service port.
        for p in &service.ports {
            if let Err(message) = clusters.get(service, None, p.number) {
                errors.push(ConfigError::new("", &format!("service {}", service.info.host), "", message));
            }
        }
        if covered.iter().any(|d| d.matches(&service.info.host)) {
            continue;
        }
        match routes::implicit_virtual_host(service, &mut clusters) {
            Ok(vh) => virtual_hosts.push(vh),
            Err(message) => errors.push(ConfigError::new("", &format!("service {}", service.info.host), "", message)),
        }
    }
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    let clusters = clusters.built;
    Ok(Snapshot {
        version: set.hash.clone(),
        source: source.to_string(),
        created: SystemTime::now(),
        virtual_hosts,
        clusters,
        services: services.into_iter().map(|(host, s)| (host, s.info)).collect(),
        security: SecurityPolicies::new(ROOT_NAMESPACE, checked.peer_policies, checked.authz_policies),
    })
}
