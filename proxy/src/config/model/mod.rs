//! The Istio resources serin reads, as written in YAML (Istio's field names).
//!
//! These types mirror the Istio API one to one and reject unknown fields. Istio
//! fields that serin does not implement are kept as `Option<serde_json::Value>`
//! ("present or not") so that validation can name them in a clear error instead of
//! a generic "unknown field"; see `config::validate`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

mod destination_rule;
mod gateway;
mod security;
mod service_entry;
mod virtual_service;

pub use destination_rule::*;
pub use gateway::*;
pub use security::*;
pub use service_entry::*;
pub use virtual_service::*;

/// A field serin accepts in YAML only to report it as unsupported (any content).
pub type Unsupported = Option<serde_json::Value>;

/// Kubernetes `ObjectMeta`: the standard keys are accepted, only name, namespace,
/// labels and annotations mean something to serin.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generate_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_timestamp: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_grace_period_seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_references: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finalizers: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed_fields: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_link: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_name: Option<String>,
}

/// One Kubernetes-style document: `apiVersion`, `kind`, `metadata`, `spec`.
/// `status` (as found in `kubectl get -o yaml` output) is accepted and ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Envelope<S> {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: S,
    #[serde(default, skip_serializing)]
    pub status: Option<serde_json::Value>,
}

/// A loaded resource of a kind serin knows.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
#[allow(clippy::large_enum_variant)] // a handful per config, never on the request path
pub enum Resource {
    VirtualService(Envelope<VirtualService>),
    DestinationRule(Envelope<DestinationRule>),
    ServiceEntry(Envelope<ServiceEntry>),
    WorkloadEntry(Envelope<WorkloadEntry>),
    Gateway(Envelope<Gateway>),
    PeerAuthentication(Envelope<PeerAuthentication>),
    AuthorizationPolicy(Envelope<AuthorizationPolicy>),
    /// An Istio kind serin accepts but does not apply to the sidecar snapshot
    /// (Sidecar, RequestAuthentication, Telemetry, …); its spec is kept as is,
    /// not validated.
    NotApplied(Envelope<serde_json::Value>),
}

impl Resource {
    /// The envelope's metadata.
    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Resource::VirtualService(r) => &r.metadata,
            Resource::DestinationRule(r) => &r.metadata,
            Resource::ServiceEntry(r) => &r.metadata,
            Resource::WorkloadEntry(r) => &r.metadata,
            Resource::Gateway(r) => &r.metadata,
            Resource::PeerAuthentication(r) => &r.metadata,
            Resource::AuthorizationPolicy(r) => &r.metadata,
            Resource::NotApplied(r) => &r.metadata,
        }
    }

    /// `kind` as written.
    pub fn kind(&self) -> &str {
        match self {
            Resource::VirtualService(r) => &r.kind,
            Resource::DestinationRule(r) => &r.kind,
            Resource::ServiceEntry(r) => &r.kind,
            Resource::WorkloadEntry(r) => &r.kind,
            Resource::Gateway(r) => &r.kind,
            Resource::PeerAuthentication(r) => &r.kind,
            Resource::AuthorizationPolicy(r) => &r.kind,
            Resource::NotApplied(r) => &r.kind,
        }
    }

    /// The namespace (`default` when metadata has none).
    pub fn namespace(&self) -> &str {
        self.metadata().namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE)
    }

    /// The name (empty when missing, which validation reports).
    pub fn name(&self) -> &str {
        self.metadata().name.as_deref().unwrap_or("")
    }

    /// `Kind namespace/name`, the way errors name a resource.
    pub fn display_name(&self) -> String {
        format!("{} {}/{}", self.kind(), self.namespace(), self.name())
    }
}

/// The namespace of a resource whose metadata names none (Kubernetes' default).
pub const DEFAULT_NAMESPACE: &str = "default";

/// A resource with the file it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedResource {
    /// File name or origin label.
    pub file: String,
    /// 1-based line where the resource's document starts.
    pub line: u32,
    pub resource: Resource,
}
