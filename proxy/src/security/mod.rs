//! Peer authentication and authorization: Istio's `PeerAuthentication` and
//! `AuthorizationPolicy`, compiled into the snapshot ([`SecurityPolicies`],
//! `Snapshot::security`) and evaluated by the inbound side.
//!
//! - [`SecurityPolicies::peer_mode`]: which connections a workload port accepts
//!   (STRICT, PERMISSIVE, DISABLE) with Istio's mesh / namespace / workload / port
//!   precedence.
//! - [`SecurityPolicies::authorize`] (HTTP) and [`SecurityPolicies::authorize_tcp`]:
//!   DENY, then ALLOW, with Istio's matching rules; see `docs/istio-compat.md`.
//!
//! Patterns are compiled when the configuration is, so evaluation only compares.
//! The reference for the semantics is `shared/notes/istio-semantics.md` §3.

mod authz;
mod pattern;
mod peer;

pub use authz::{
    Action, Attr, AuthzPolicy, Check, ConnAttrs, Decision, RequestAttrs, Rule, Values, principal_namespace,
};
pub use pattern::{IpBlock, Pattern};
pub use peer::{MtlsMode, PeerPolicy};

/// The mesh's root namespace: PeerAuthentications without a selector there are
/// mesh-wide, and AuthorizationPolicies there apply to every namespace (Istio's
/// `meshConfig.rootNamespace` default). Fixed for now; [`SecurityPolicies::new`]
/// takes it as a parameter so that it can become configurable.
pub const ROOT_NAMESPACE: &str = "istio-system";

/// Every PeerAuthentication and AuthorizationPolicy of a configuration, with its
/// namespace and selector; the default has none (PERMISSIVE, everything allowed).
#[derive(Debug, Clone)]
pub struct SecurityPolicies {
    /// The root namespace (see [`ROOT_NAMESPACE`]).
    pub root_namespace: String,
    /// PeerAuthentications, oldest first (the order that decides ties in a scope).
    pub peer: Vec<PeerPolicy>,
    /// AuthorizationPolicies, in configuration order.
    pub authz: Vec<AuthzPolicy>,
}

impl Default for SecurityPolicies {
    fn default() -> Self {
        SecurityPolicies { root_namespace: ROOT_NAMESPACE.to_string(), peer: Vec::new(), authz: Vec::new() }
    }
}

impl SecurityPolicies {
    /// The policies of one configuration; sorts `peer` oldest first.
    pub fn new(root_namespace: &str, mut peer: Vec<PeerPolicy>, authz: Vec<AuthzPolicy>) -> SecurityPolicies {
        peer.sort_by(|a, b| a.order_key().cmp(&b.order_key()));
        SecurityPolicies { root_namespace: root_namespace.to_string(), peer, authz }
    }

    /// Whether there is no policy at all.
    pub fn is_empty(&self) -> bool {
        self.peer.is_empty() && self.authz.is_empty()
    }
}

/// Whether every `selector` label is among `labels` with the same value (an empty
/// selector selects every workload).
pub(crate) fn selector_matches(selector: &[(String, String)], labels: &[(String, String)]) -> bool {
    selector.iter().all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v))
}

#[cfg(test)]
mod tests;
