//! What the dashboard reads and changes, as a trait ([`DashboardBackend`]) so that the
//! HTTP side does not depend on how the control plane keeps its figures, and its
//! implementation for the real [`ControlPlane`].

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serin_control_api::ResourceType;
use serin_control_api::pb;
use serin_control_api::server::{Change, ControlPlane, DEFAULT_WAIT, StoreError};

/// A boxed future, as the trait's actions return them.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A service as the config defines it: its subsets (DestinationRule) and the weights
/// its routes give them now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceConfig {
    /// The service's FQDN (`payment.default.svc.cluster.local`).
    pub service: String,
    /// Its subsets, in the DestinationRule's order.
    pub subsets: Vec<String>,
    /// Subset → weight, as the routes say now (empty when no route splits it).
    pub weights: BTreeMap<String, u32>,
}

/// Why a set-weight or rollback did not happen: an HTTP status and a message naming
/// the problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionError {
    /// The HTTP status to answer.
    pub status: http::StatusCode,
    /// What went wrong, for people.
    pub message: String,
}

impl ActionError {
    /// The status a store refusal maps to: an unknown service is 404, a request the
    /// store refuses is 400, a service whose routes cannot take weights 409, a state
    /// folder problem 503.
    pub fn from_store(error: StoreError) -> ActionError {
        use http::StatusCode as S;
        let status = match &error {
            StoreError::NoSubsets { .. } => S::NOT_FOUND,
            StoreError::NoService
            | StoreError::NoWeights { .. }
            | StoreError::BadSum { .. }
            | StoreError::UnknownSubsets { .. } => S::BAD_REQUEST,
            StoreError::NoRoute { .. } | StoreError::NoOverride { .. } => S::CONFLICT,
            StoreError::Io { .. } | StoreError::BadState { .. } => S::SERVICE_UNAVAILABLE,
            StoreError::Document { .. } | StoreError::Duplicate { .. } => S::INTERNAL_SERVER_ERROR,
        };
        let message = match &error {
            StoreError::NoSubsets { service } => {
                format!("unknown service {service}: no DestinationRule defines subsets for it")
            }
            other => other.to_string(),
        };
        ActionError { status, message }
    }

    fn internal(message: impl Into<String>) -> ActionError {
        ActionError { status: http::StatusCode::INTERNAL_SERVER_ERROR, message: message.into() }
    }
}

/// What the dashboard needs from a control plane.
pub trait DashboardBackend: Send + Sync + 'static {
    /// Every connected sidecar and what it runs (as `serin ctl status`).
    fn status(&self) -> pb::Status;
    /// The per-version figures over the last `window`, with one point per second when
    /// `series` is set.
    fn load(&self, window: Duration, series: bool) -> pb::LoadFigures;
    /// The canary analyses, running and finished (the latest per service).
    fn canaries(&self) -> pb::CanaryList;
    /// The services the config defines subsets for, with their current weights.
    fn services(&self) -> Vec<ServiceConfig>;
    /// Sets a service's split (percentages adding up to 100), then waits for the
    /// sidecars' ACKs (bounded).
    fn set_weights(
        &self,
        service: String,
        weights: BTreeMap<String, u32>,
    ) -> BoxFuture<'_, Result<pb::ChangeResult, ActionError>>;
    /// Sends all of a service's traffic to its stable subset, then waits for the ACKs.
    fn rollback(&self, service: String) -> BoxFuture<'_, Result<pb::ChangeResult, ActionError>>;
}

impl<T: DashboardBackend + ?Sized> DashboardBackend for Arc<T> {
    fn status(&self) -> pb::Status {
        (**self).status()
    }
    fn load(&self, window: Duration, series: bool) -> pb::LoadFigures {
        (**self).load(window, series)
    }
    fn canaries(&self) -> pb::CanaryList {
        (**self).canaries()
    }
    fn services(&self) -> Vec<ServiceConfig> {
        (**self).services()
    }
    fn set_weights(
        &self,
        service: String,
        weights: BTreeMap<String, u32>,
    ) -> BoxFuture<'_, Result<pb::ChangeResult, ActionError>> {
        (**self).set_weights(service, weights)
    }
    fn rollback(&self, service: String) -> BoxFuture<'_, Result<pb::ChangeResult, ActionError>> {
        (**self).rollback(service)
    }
}

/// The fully qualified form of a host written in `namespace` (Kubernetes short names):
/// the control plane's own.
pub use serin_control_api::server::fqdn;

#[derive(Deserialize)]
struct DestinationRule {
    #[serde(default)]
    metadata: Metadata,
    #[serde(default)]
    spec: DestinationRuleSpec,
}

#[derive(Deserialize, Default)]
struct Metadata {
    namespace: Option<String>,
}

#[derive(Deserialize, Default)]
struct DestinationRuleSpec {
    #[serde(default)]
    host: String,
    #[serde(default)]
    subsets: Vec<Subset>,
}

#[derive(Deserialize)]
struct Subset {
    name: String,
}

/// The services of the DestinationRules in `documents` (YAML texts) and their subsets,
/// merged by FQDN, in order of first appearance.
pub fn services_of(documents: &[&str]) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for text in documents {
        let Ok(rule) = serde_saphyr::from_str::<DestinationRule>(text) else { continue };
        if rule.spec.host.is_empty() || rule.spec.subsets.is_empty() {
            continue;
        }
        let namespace = rule.metadata.namespace.as_deref().unwrap_or("default");
        let service = fqdn(&rule.spec.host, namespace);
        let index = match out.iter().position(|(s, _)| *s == service) {
            Some(i) => i,
            None => {
                out.push((service, Vec::new()));
                out.len() - 1
            }
        };
        for subset in rule.spec.subsets {
            if !out[index].1.contains(&subset.name) {
                out[index].1.push(subset.name);
            }
        }
    }
    out
}

/// Runs a store change off the runtime (it writes the state file), then waits for
/// the ACKs of the sidecars subscribed to the service (up to [`DEFAULT_WAIT`]).
async fn change<F>(plane: &ControlPlane, service: String, f: F) -> Result<pb::ChangeResult, ActionError>
where
    F: FnOnce(&serin_control_api::server::Store, &str) -> Result<Change, StoreError> + Send + 'static,
{
    let store = Arc::clone(plane.store());
    let svc = service.clone();
    let change = tokio::task::spawn_blocking(move || f(&store, &svc))
        .await
        .map_err(|e| ActionError::internal(format!("the change did not finish: {e}")))?
        .map_err(ActionError::from_store)?;
    let ack = plane.wait_for_ack(change.ty, change.version, Some(&service), DEFAULT_WAIT).await;
    // As the management API reports it.
    Ok(pb::ChangeResult { ack: Some(ack), ..change.into() })
}

impl DashboardBackend for ControlPlane {
    fn status(&self) -> pb::Status {
        ControlPlane::status(self)
    }

    fn load(&self, window: Duration, series: bool) -> pb::LoadFigures {
        let window_ms = u32::try_from(window.as_millis()).unwrap_or(u32::MAX);
        let request = pb::GetLoadRequest { service: String::new(), window_ms, series };
        figures(self, &request)
    }

    fn canaries(&self) -> pb::CanaryList {
        ControlPlane::canaries(self).list()
    }

    fn services(&self) -> Vec<ServiceConfig> {
        let store = self.store();
        let documents = store.documents(None, Some(ResourceType::Clusters));
        let texts: Vec<&str> = documents.iter().map(|(_, _, yaml)| &**yaml).collect();
        services_of(&texts)
            .into_iter()
            .map(|(service, subsets)| {
                let weights = store.weights(&service);
                ServiceConfig { service, subsets, weights }
            })
            .collect()
    }

    fn set_weights(
        &self,
        service: String,
        weights: BTreeMap<String, u32>,
    ) -> BoxFuture<'_, Result<pb::ChangeResult, ActionError>> {
        Box::pin(change(self, service, move |store, s| store.set_weights(s, &weights)))
    }

    fn rollback(&self, service: String) -> BoxFuture<'_, Result<pb::ChangeResult, ActionError>> {
        Box::pin(change(self, service, |store, s| store.rollback(s)))
    }
}

/// The control plane's aggregated load figures.
fn figures(plane: &ControlPlane, request: &pb::GetLoadRequest) -> pb::LoadFigures {
    plane.load().figures(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destination_rules_give_services_and_subsets() {
        let a = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: p, namespace: shop}\nspec:\n  host: payment\n  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]\n";
        let b = "kind: DestinationRule\nmetadata: {name: p2}\nspec:\n  host: payment.shop.svc.cluster.local\n  subsets: [{name: v3}, {name: v1}]\n";
        let c = "kind: DestinationRule\nmetadata: {name: q}\nspec:\n  host: ledger\n  trafficPolicy: {}\n";
        let got = services_of(&[a, b, c, "not: [yaml"]);
        assert_eq!(
            got,
            vec![("payment.shop.svc.cluster.local".to_string(), vec!["v1".into(), "v2".into(), "v3".into()])]
        );
    }

    #[test]
    fn store_errors_map_to_statuses_that_name_the_problem() {
        let e = ActionError::from_store(StoreError::NoSubsets { service: "nope".into() });
        assert_eq!(e.status, http::StatusCode::NOT_FOUND);
        assert!(e.message.contains("unknown service nope"), "{}", e.message);
        let e = ActionError::from_store(StoreError::BadSum { service: "p".into(), sum: 90, weights: "v1=90".into() });
        assert_eq!(e.status, http::StatusCode::BAD_REQUEST);
        assert!(e.message.contains("add up to 90"), "{}", e.message);
    }
}
