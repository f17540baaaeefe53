//! The management service: what `serin ctl` calls.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::{Shared, StoreError};
use crate::pb;
use crate::types::ResourceType;

/// How long a change waits for ACKs when the caller gives no timeout.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(10);
/// The longest wait a caller may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(600);

/// The gRPC `Management` service.
#[derive(Debug, Clone)]
pub struct ManagementService {
    pub(crate) shared: Arc<Shared>,
}

fn wait_time(timeout_ms: u32) -> Duration {
    if timeout_ms == 0 { DEFAULT_WAIT } else { Duration::from_millis(u64::from(timeout_ms)).min(MAX_WAIT) }
}

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Status {
        let message = e.to_string();
        match e {
            StoreError::NoService
            | StoreError::NoWeights { .. }
            | StoreError::BadSum { .. }
            | StoreError::UnknownSubsets { .. } => Status::invalid_argument(message),
            StoreError::NoSubsets { .. } | StoreError::NoRoute { .. } | StoreError::NoOverride { .. } => {
                Status::failed_precondition(message)
            }
            StoreError::Io { .. } | StoreError::BadState { .. } => Status::unavailable(message),
            StoreError::Document { .. } | StoreError::Duplicate { .. } => Status::internal(message),
        }
    }
}

impl ManagementService {
    /// Runs a store change off the runtime (it fsyncs), then waits for ACKs if asked.
    async fn change<F>(&self, service: String, wait: Option<pb::WaitOptions>, f: F) -> Result<pb::ChangeResult, Status>
    where
        F: FnOnce(&super::Store, &str) -> Result<super::Change, StoreError> + Send + 'static,
    {
        let store = Arc::clone(&self.shared.store);
        let svc = service.clone();
        let change = tokio::task::spawn_blocking(move || f(&store, &svc))
            .await
            .map_err(|e| Status::internal(format!("the change did not finish: {e}")))??;
        let ack = match wait {
            Some(wait) => Some(
                self.shared.wait_for_ack(change.ty, change.version, Some(&service), wait_time(wait.timeout_ms)).await,
            ),
            None => None,
        };
        Ok(pb::ChangeResult { ack, ..change.into() })
    }
}

/// A store change as the management API reports it (without the ACKs).
impl From<super::Change> for pb::ChangeResult {
    fn from(change: super::Change) -> pb::ChangeResult {
        pb::ChangeResult {
            type_url: change.ty.type_url().to_string(),
            version: change.version.to_string(),
            changed: change.changed,
            weights: change.weights.into_iter().collect(),
            stable_subset: change.stable_subset,
            resources: change.resources,
            ack: None,
        }
    }
}

#[tonic::async_trait]
impl pb::management_server::Management for ManagementService {
    async fn set_weights(&self, request: Request<pb::SetWeightsRequest>) -> Result<Response<pb::ChangeResult>, Status> {
        let request = request.into_inner();
        let weights: BTreeMap<String, u32> = request.weights.into_iter().collect();
        let result = self.change(request.service, request.wait, move |store, s| store.set_weights(s, &weights)).await?;
        Ok(Response::new(result))
    }

    async fn rollback(&self, request: Request<pb::RollbackRequest>) -> Result<Response<pb::ChangeResult>, Status> {
        let request = request.into_inner();
        let result = self.change(request.service, request.wait, |store, s| store.rollback(s)).await?;
        Ok(Response::new(result))
    }

    async fn reset_weights(
        &self,
        request: Request<pb::ResetWeightsRequest>,
    ) -> Result<Response<pb::ChangeResult>, Status> {
        let request = request.into_inner();
        let result = self.change(request.service, request.wait, |store, s| store.reset_weights(s)).await?;
        Ok(Response::new(result))
    }

    async fn get_status(&self, _request: Request<pb::GetStatusRequest>) -> Result<Response<pb::Status>, Status> {
        Ok(Response::new(self.shared.status()))
    }

    async fn get_config(&self, request: Request<pb::GetConfigRequest>) -> Result<Response<pb::Config>, Status> {
        let request = request.into_inner();
        let ty = match request.type_url.as_str() {
            "" => None,
            url => Some(
                ResourceType::parse(url).ok_or_else(|| Status::invalid_argument(format!("unknown type {url:?}")))?,
            ),
        };
        let service = Some(request.service.as_str()).filter(|s| !s.is_empty());
        let documents: Vec<pb::ConfigDocument> = self
            .shared
            .store
            .documents(service, ty)
            .into_iter()
            .map(|(ty, name, yaml)| pb::ConfigDocument {
                type_url: ty.type_url().to_string(),
                name,
                yaml: yaml.to_string(),
            })
            .collect();
        let yaml = documents
            .iter()
            .map(|d| {
                let body = d.yaml.trim_start_matches("---\n");
                if body.ends_with('\n') { format!("---\n{body}") } else { format!("---\n{body}\n") }
            })
            .collect();
        let versions = self
            .shared
            .store
            .versions()
            .into_iter()
            .map(|(ty, v)| (ty.type_url().to_string(), v.to_string()))
            .collect();
        Ok(Response::new(pb::Config { yaml, documents, versions }))
    }

    async fn wait_for_ack(&self, request: Request<pb::WaitForAckRequest>) -> Result<Response<pb::AckResult>, Status> {
        let request = request.into_inner();
        let ty = match request.type_url.as_str() {
            "" => ResourceType::Routes,
            url => ResourceType::parse(url).ok_or_else(|| Status::invalid_argument(format!("unknown type {url:?}")))?,
        };
        let version: u64 = request
            .version
            .parse()
            .map_err(|_| Status::invalid_argument(format!("version {:?} is not a version number", request.version)))?;
        let service = Some(request.service.as_str()).filter(|s| !s.is_empty());
        Ok(Response::new(self.shared.wait_for_ack(ty, version, service, wait_time(request.timeout_ms)).await))
    }
}
