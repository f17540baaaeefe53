//! The gRPC `Canaries` service: what `serin ctl canary` calls.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{CanaryError, CanaryManager};
use crate::pb;

/// The gRPC `Canaries` service over a [`CanaryManager`].
#[derive(Debug, Clone)]
pub struct CanaryService {
    pub(crate) manager: Arc<CanaryManager>,
}

impl From<CanaryError> for Status {
    fn from(e: CanaryError) -> Status {
        let message = e.to_string();
        match e {
            CanaryError::Field(_) => Status::invalid_argument(message),
            CanaryError::AlreadyExists { .. } => Status::already_exists(message),
            CanaryError::NotFound { .. } => Status::not_found(message),
            CanaryError::NotRunning { .. } => Status::failed_precondition(message),
            CanaryError::Io { .. } | CanaryError::BadState { .. } => Status::unavailable(message),
        }
    }
}

#[tonic::async_trait]
impl pb::canaries_server::Canaries for CanaryService {
    async fn start(&self, request: Request<pb::StartCanaryRequest>) -> Result<Response<pb::CanaryStatus>, Status> {
        let spec = request.into_inner().spec.ok_or_else(|| Status::invalid_argument("no spec given"))?;
        // Whatever the caller says, a spec over the API comes from `ctl` (documents come
        // from the config folder).
        let spec = pb::CanarySpec { source: "ctl".to_string(), ..spec };
        Ok(Response::new(self.manager.start(spec).await?))
    }

    async fn get(&self, request: Request<pb::GetCanaryRequest>) -> Result<Response<pb::CanaryStatus>, Status> {
        let service = request.into_inner().service;
        self.manager.get(&service).map(Response::new).ok_or_else(|| CanaryError::NotFound { service }.into())
    }

    async fn list(&self, _request: Request<pb::ListCanariesRequest>) -> Result<Response<pb::CanaryList>, Status> {
        Ok(Response::new(self.manager.list()))
    }

    async fn abort(&self, request: Request<pb::AbortCanaryRequest>) -> Result<Response<pb::CanaryStatus>, Status> {
        let request = request.into_inner();
        Ok(Response::new(self.manager.abort(&request.service, request.rollback).await?))
    }
}
