//! The resource types of the discovery API and how Istio kinds map onto them.

use std::fmt;

/// Type URL of the routes type: `VirtualService` and `Gateway` documents.
pub const ROUTES_TYPE_URL: &str = "type.serin.io/serin.control.v1.Routes";
/// Type URL of the clusters type: `DestinationRule` documents (subsets and traffic policies).
pub const CLUSTERS_TYPE_URL: &str = "type.serin.io/serin.control.v1.Clusters";
/// Type URL of the endpoints type: `ServiceEntry` and `WorkloadEntry` documents (the registry).
pub const ENDPOINTS_TYPE_URL: &str = "type.serin.io/serin.control.v1.Endpoints";
/// Type URL of the policies type: `PeerAuthentication`, `AuthorizationPolicy` and
/// `RequestAuthentication` documents.
pub const POLICIES_TYPE_URL: &str = "type.serin.io/serin.control.v1.Policies";

/// Content type of every resource body: one Istio document as YAML.
pub const YAML_CONTENT_TYPE: &str = "application/yaml";

/// The largest message either side accepts (4 MiB, gRPC's usual default).
pub const MAX_MESSAGE_SIZE: usize = 4 * 1024 * 1024;

/// A resource type of the discovery API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ResourceType {
    /// Clusters: `DestinationRule`.
    Clusters,
    /// Endpoints: `ServiceEntry`, `WorkloadEntry`.
    Endpoints,
    /// Routes: `VirtualService`, `Gateway`.
    Routes,
    /// Policies: `PeerAuthentication`, `AuthorizationPolicy`, `RequestAuthentication`.
    Policies,
}

impl ResourceType {
    /// Every type, in push order (make before break: clusters and endpoints before the
    /// routes that name them, as Envoy's CDS → EDS → LDS/RDS).
    pub const ALL: [ResourceType; 4] =
        [ResourceType::Clusters, ResourceType::Endpoints, ResourceType::Routes, ResourceType::Policies];

    /// The type URL.
    pub fn type_url(self) -> &'static str {
        match self {
            ResourceType::Routes => ROUTES_TYPE_URL,
            ResourceType::Clusters => CLUSTERS_TYPE_URL,
            ResourceType::Endpoints => ENDPOINTS_TYPE_URL,
            ResourceType::Policies => POLICIES_TYPE_URL,
        }
    }

    /// The type of a type URL; `None` for an unknown URL.
    pub fn from_type_url(url: &str) -> Option<ResourceType> {
        ResourceType::ALL.into_iter().find(|t| t.type_url() == url)
    }

    /// A short name (`routes`, `clusters`, `endpoints`, `policies`), as `serin ctl get` takes.
    pub fn short_name(self) -> &'static str {
        match self {
            ResourceType::Routes => "routes",
            ResourceType::Clusters => "clusters",
            ResourceType::Endpoints => "endpoints",
            ResourceType::Policies => "policies",
        }
    }

    /// The type of a short name or a type URL.
    pub fn parse(name: &str) -> Option<ResourceType> {
        ResourceType::ALL.into_iter().find(|t| t.short_name() == name).or_else(|| ResourceType::from_type_url(name))
    }

    /// The type an Istio kind belongs to; `None` for kinds the control plane does not serve.
    pub fn for_kind(kind: &str) -> Option<ResourceType> {
        match kind {
            "VirtualService" | "Gateway" => Some(ResourceType::Routes),
            "DestinationRule" => Some(ResourceType::Clusters),
            "ServiceEntry" | "WorkloadEntry" => Some(ResourceType::Endpoints),
            "PeerAuthentication" | "AuthorizationPolicy" | "RequestAuthentication" => Some(ResourceType::Policies),
            _ => None,
        }
    }
}

impl fmt::Display for ResourceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.short_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_urls_round_trip() {
        for t in ResourceType::ALL {
            assert_eq!(ResourceType::from_type_url(t.type_url()), Some(t));
            assert_eq!(ResourceType::parse(t.short_name()), Some(t));
        }
        assert_eq!(ResourceType::from_type_url("type.googleapis.com/envoy.config.cluster.v3.Cluster"), None);
        assert_eq!(ResourceType::for_kind("VirtualService"), Some(ResourceType::Routes));
        assert_eq!(ResourceType::for_kind("Sidecar"), None);
    }
}
