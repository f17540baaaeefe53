//! PeerAuthentication: which connections a workload's inbound side accepts
//! (mutual TLS, plaintext, or both), with Istio's scopes and precedence.

use super::{SecurityPolicies, selector_matches};

/// The effective mutual-TLS mode of an inbound port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MtlsMode {
    /// Plaintext only.
    Disable,
    /// mTLS and plaintext on the same port (told apart by sniffing the TLS
    /// ClientHello). Istio's default when no policy says otherwise.
    Permissive,
    /// mTLS only; plaintext connections are refused.
    Strict,
}

impl MtlsMode {
    /// Istio's name: `DISABLE`, `PERMISSIVE`, `STRICT`.
    pub fn as_str(self) -> &'static str {
        match self {
            MtlsMode::Disable => "DISABLE",
            MtlsMode::Permissive => "PERMISSIVE",
            MtlsMode::Strict => "STRICT",
        }
    }
}

impl std::fmt::Display for MtlsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One compiled PeerAuthentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerPolicy {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.creationTimestamp` as written (RFC 3339, as Kubernetes writes
    /// it), when present: the oldest policy of a scope wins, as in Istio.
    pub created: Option<String>,
    /// `selector.matchLabels`; empty = the whole namespace (or the mesh, in the
    /// root namespace).
    pub selector: Vec<(String, String)>,
    /// `mtls.mode`; `None` = UNSET (inherit from the enclosing scope).
    pub mode: Option<MtlsMode>,
    /// `portLevelMtls`: workload port → mode (`None` = UNSET: the policy's own
    /// effective mode). Only on policies with a selector.
    pub port_modes: Vec<(u16, Option<MtlsMode>)>,
}

impl PeerPolicy {
    /// Istio's order within a scope: oldest `creationTimestamp` first (a policy
    /// without one counts as oldest), then by name, then namespace (istiod's
    /// `sortConfigByCreationTime`).
    pub(crate) fn order_key(&self) -> (Option<&str>, &str, &str) {
        (self.created.as_deref(), &self.name, &self.namespace)
    }
}

impl SecurityPolicies {
    /// The mTLS mode of `port` (the port the workload listens on, i.e. Istio's
    /// target port) of a workload in `workload_namespace` with `workload_labels`.
    ///
    /// Istio's precedence (istio `pilot/pkg/security/authn/policy_applier.go`,
    /// `ComposePeerAuthentication`): the workload policy (selector matching the
    /// labels, in the workload's namespace; selector policies in the root
    /// namespace are ignored) with its port-level override, over the namespace
    /// policy (no selector), over the mesh policy (no selector, root namespace),
    /// over PERMISSIVE. UNSET at any level inherits the level above; an UNSET
    /// port inherits the workload level's result. Several policies in one scope:
    /// the oldest wins.
    pub fn peer_mode(&self, workload_namespace: &str, workload_labels: &[(String, String)], port: u16) -> MtlsMode {
        let (mut mesh, mut namespace, mut workload) = (None, None, None);
        // `self.peer` is sorted oldest first, so the first policy of a scope wins.
        for p in &self.peer {
            let slot = if p.selector.is_empty() {
                if p.namespace == self.root_namespace {
                    &mut mesh
                } else if p.namespace == workload_namespace {
                    &mut namespace
                } else {
                    continue;
                }
            } else if p.namespace == workload_namespace
                && p.namespace != self.root_namespace
                && selector_matches(&p.selector, workload_labels)
            {
                &mut workload
            } else {
                continue;
            };
            if slot.is_none() {
                *slot = Some(p);
            }
        }
        let mut mode = MtlsMode::Permissive;
        for level in [mesh, namespace, workload].into_iter().flatten() {
            if let Some(m) = level.mode {
                mode = m;
            }
        }
        if let Some(w) = workload
            && let Some((_, port_mode)) = w.port_modes.iter().find(|(p, _)| *p == port)
        {
            return port_mode.unwrap_or(mode);
        }
        mode
    }
}
