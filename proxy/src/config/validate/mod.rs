//! Per-resource validation: every check that needs only the resource itself.
//!
//! Each check walks the whole resource and records every problem it finds (with the
//! field path), and returns the registry-independent, compiled parts (matches,
//! retry policies, traffic policies, …) that `compile` links together.

pub mod fields;
pub mod policy;
pub mod registry;
pub mod route_extras;
pub mod security;
pub mod virtual_service;

use super::error::{ConfigErrors, Sink};
use super::load::ConfigSet;
use super::model::Resource;
use crate::security::{AuthzPolicy, PeerPolicy};

pub use policy::{CheckedDestinationRule, CheckedSubset, PolicyOverlay};
pub use registry::{CheckedEndpoint, CheckedPort, CheckedServiceEntry};
pub use virtual_service::{CheckedAction, CheckedRoute, CheckedVirtualService, DestRef};

/// The checked form of one resource.
#[derive(Debug, Clone)]
pub enum CheckedResource {
    VirtualService(CheckedVirtualService),
    DestinationRule(CheckedDestinationRule),
    ServiceEntry(CheckedServiceEntry),
    WorkloadEntry(CheckedEndpoint),
    PeerAuthentication(PeerPolicy),
    AuthorizationPolicy(AuthzPolicy),
    /// Gateway and kinds not applied to the sidecar snapshot.
    Other,
}

/// Checks one resource, recording every error in `sink`.
pub fn check_resource(resource: &Resource, sink: &mut Sink<'_>) -> Option<CheckedResource> {
    let meta = resource.metadata();
    let name = meta.name.as_deref().unwrap_or("");
    if name.is_empty() {
        sink.push("metadata.name", "name is required");
    }
    let namespace = resource.namespace();
    Some(match resource {
        Resource::VirtualService(r) => {
            CheckedResource::VirtualService(virtual_service::check(&r.spec, namespace, name, sink))
        }
        Resource::DestinationRule(r) => CheckedResource::DestinationRule(policy::check(&r.spec, namespace, name, sink)),
        Resource::ServiceEntry(r) => {
            CheckedResource::ServiceEntry(registry::service_entry(&r.spec, namespace, name, sink))
        }
        Resource::WorkloadEntry(r) => {
            CheckedResource::WorkloadEntry(registry::workload_entry(&r.spec, namespace, name, sink)?)
        }
        Resource::Gateway(r) => {
            registry::gateway(&r.spec, sink);
            CheckedResource::Other
        }
        Resource::PeerAuthentication(r) => {
            CheckedResource::PeerAuthentication(security::peer_authentication(&r.spec, meta, namespace, name, sink))
        }
        Resource::AuthorizationPolicy(r) => {
            CheckedResource::AuthorizationPolicy(security::authorization_policy(&r.spec, meta, namespace, name, sink))
        }
        Resource::NotApplied(_) => CheckedResource::Other,
    })
}

/// Where a checked resource came from, for errors found when linking.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    pub file: String,
    /// `Kind namespace/name`.
    pub resource: String,
}

impl Origin {
    /// A [`ConfigError`](super::ConfigError) about `field` of this resource.
    pub fn error(&self, field: &str, message: impl Into<String>) -> super::ConfigError {
        super::ConfigError::new(&self.file, &self.resource, field, message)
    }
}

/// Every resource of a set, checked, with its origin.
#[derive(Debug, Clone, Default)]
pub struct Checked {
    pub virtual_services: Vec<(Origin, CheckedVirtualService)>,
    pub destination_rules: Vec<(Origin, CheckedDestinationRule)>,
    pub service_entries: Vec<(Origin, CheckedServiceEntry)>,
    pub workload_entries: Vec<(Origin, CheckedEndpoint)>,
    pub peer_policies: Vec<PeerPolicy>,
    pub authz_policies: Vec<AuthzPolicy>,
}

/// Checks every resource of `set` (already checked at load; errors here mean the
/// set was built by hand).
pub fn check_set(set: &ConfigSet) -> Result<Checked, ConfigErrors> {
    let mut errors = Vec::new();
    let mut out = Checked::default();
    for r in &set.resources {
        let origin = Origin { file: r.file.clone(), resource: r.resource.display_name() };
        let mut sink = Sink { file: &r.file, resource: r.resource.display_name(), errors: &mut errors };
        match check_resource(&r.resource, &mut sink) {
            Some(CheckedResource::VirtualService(v)) => out.virtual_services.push((origin, v)),
            Some(CheckedResource::DestinationRule(d)) => out.destination_rules.push((origin, d)),
            Some(CheckedResource::ServiceEntry(s)) => out.service_entries.push((origin, s)),
            Some(CheckedResource::WorkloadEntry(w)) => out.workload_entries.push((origin, w)),
            Some(CheckedResource::PeerAuthentication(p)) => out.peer_policies.push(p),
            Some(CheckedResource::AuthorizationPolicy(p)) => out.authz_policies.push(p),
            Some(CheckedResource::Other) | None => {}
        }
    }
    ConfigErrors(errors).into_result(out)
}
