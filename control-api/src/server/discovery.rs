//! The discovery stream: Envoy's state-of-the-world rules, per resource type.
//!
//! - The first request of a type on a stream (or any request with an empty nonce) is
//!   answered at once with the current version.
//! - A request carrying the nonce of the last response answers it: with that version
//!   and no `error_detail` it is an ACK (the push-to-ACK time is recorded); with an
//!   `error_detail` it is a NACK (recorded; the same version is not sent again).
//! - A nonce sent earlier on the stream but not the last is stale: ignored. A nonce
//!   never sent on the stream is an error.
//! - Never two responses of a type in flight: a change that comes while the last
//!   response is unanswered is sent when the answer arrives (only the latest version).
//! - A request carrying a `load_report` is a load report, handed to the control plane's
//!   [`LoadStats`](super::LoadStats); its other fields are ignored (it is not a
//!   subscription, an ACK or a NACK). It needs the node like any request: a stream
//!   whose first request names none ends with INVALID_ARGUMENT. A report that is too
//!   big (over [`MAX_REPORT_ENTRIES`](super::MAX_REPORT_ENTRIES) entries) or has
//!   malformed entries never ends the stream: telemetry must not take down config. Its
//!   valid part is recorded, the rest dropped and counted
//!   ([`LoadStats::accept`](super::LoadStats::accept)).
//! - A bad request (no node on the first request, an unknown type URL, an unknown
//!   nonce, an oversized message) ends that stream with a gRPC error status; other
//!   streams carry on.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use super::Shared;
use crate::pb;
use crate::types::{ResourceType, YAML_CONTENT_TYPE};

/// What goes out on the response stream.
pub(crate) type Outbound = mpsc::Sender<Result<pb::DiscoveryResponse, Status>>;

/// Largest number of resource names one request may carry.
const MAX_RESOURCE_NAMES: usize = 10_000;

/// Why a stream ends.
enum End {
    /// The client closed its side, or went away.
    Closed,
    /// The server is shutting down.
    Shutdown,
    /// A protocol error: sent to the client as the stream's status.
    Error(Status),
}

/// The last response of one type on a stream.
struct Sent {
    version: u64,
    nonce: String,
    at: Instant,
}

/// One type on one stream.
struct TypeState {
    names: Vec<String>,
    sent: Option<Sent>,
    /// The last response is not ACKed or NACKed yet.
    awaiting: bool,
}

/// One stream's state.
struct Session {
    id: u64,
    shared: Arc<Shared>,
    tx: Outbound,
    node: Option<pb::Node>,
    types: BTreeMap<ResourceType, TypeState>,
    nonces: u64,
}

/// Runs one stream until it ends, then unregisters it.
pub(crate) async fn run(shared: Arc<Shared>, mut inbound: Streaming<pb::DiscoveryRequest>, tx: Outbound) {
    let id = shared.registry.next_id();
    let mut changes = shared.store.subscribe();
    let mut closing = shared.closing.subscribe();
    let mut session = Session { id, shared: Arc::clone(&shared), tx, node: None, types: BTreeMap::new(), nonces: 0 };
    let end = loop {
        let step = tokio::select! {
            message = inbound.message() => match message {
                Ok(Some(request)) => session.handle(request).await,
                Ok(None) => Err(End::Closed),
                // Decoding errors (oversized, malformed) come as a status: tell the client.
                Err(status) if status.code() == tonic::Code::Unknown || status.code() == tonic::Code::Cancelled => Err(End::Closed),
                Err(status) => Err(End::Error(status)),
            },
            changed = changes.changed() => match changed {
                Ok(()) => session.push_changes().await,
                Err(_) => Err(End::Shutdown),
            },
            () = super::closed(&mut closing) => Err(End::Shutdown),
            () = session.tx.closed() => Err(End::Closed),
        };
        if let Err(end) = step {
            break end;
        }
    };
    let error = match end {
        End::Closed => None,
        End::Shutdown => Some(Status::unavailable("the control plane is shutting down")),
        End::Error(status) => Some(status),
    };
    if let Some(status) = &error {
        tracing::debug!(stream = id, node = session.node_id(), "discovery stream ends: {status}");
        // The client may be gone already; nothing more to do then.
        let _ = session.tx.send(Err(status.clone())).await;
    }
    if session.node.is_some() {
        shared.registry.close(id, error.as_ref());
    }
}

impl Session {
    fn node_id(&self) -> &str {
        self.node.as_ref().map_or("", |n| n.id.as_str())
    }

    /// Handles one request.
    async fn handle(&mut self, mut request: pb::DiscoveryRequest) -> Result<(), End> {
        if self.node.is_none() {
            let node = request.node.clone().unwrap_or_default();
            if node.id.trim().is_empty() {
                return Err(End::Error(Status::invalid_argument(
                    "the first request of a stream must carry node.id (the sidecar's name)",
                )));
            }
            self.shared.registry.open(self.id, node.clone());
            self.node = Some(node);
        }
        if let Some(report) = request.load_report.take() {
            self.shared.load.accept(self.node_id(), &report);
            return Ok(());
        }
        let Some(ty) = ResourceType::from_type_url(&request.type_url) else {
            let known: Vec<&str> = ResourceType::ALL.iter().map(|t| t.type_url()).collect();
            return Err(End::Error(Status::invalid_argument(format!(
                "unknown type_url {:?}; this control plane serves {}",
                request.type_url,
                known.join(", ")
            ))));
        };
        if request.resource_names.len() > MAX_RESOURCE_NAMES {
            return Err(End::Error(Status::invalid_argument(format!(
                "{} resource names in one request; at most {MAX_RESOURCE_NAMES}",
                request.resource_names.len()
            ))));
        }
        if request.resource_names.iter().any(|n| n.trim().is_empty()) {
            return Err(End::Error(Status::invalid_argument("an empty resource name (subscribe to all with none)")));
        }
        let mut names = request.resource_names.clone();
        names.sort();
        names.dedup();

        let Some(state) = self.types.get_mut(&ty) else {
            // First request of this type on this stream: always answered.
            self.types.insert(ty, TypeState { names: names.clone(), sent: None, awaiting: false });
            let reported = request.version_info.clone();
            self.shared.registry.update(self.id, ty, |t| {
                t.names = names;
                t.acked_version = reported;
            });
            return self.send(ty).await;
        };
        if request.response_nonce.is_empty() {
            // A new subscription request for a type already seen: answer it.
            state.names = names.clone();
            self.shared.registry.update(self.id, ty, |t| t.names = names);
            return self.send(ty).await;
        }
        let last_nonce = state.sent.as_ref().map(|s| s.nonce.as_str());
        if last_nonce != Some(request.response_nonce.as_str()) {
            if self.issued(&request.response_nonce) {
                tracing::debug!(stream = self.id, nonce = request.response_nonce, "stale nonce ignored");
                return Ok(());
            }
            return Err(End::Error(Status::invalid_argument(format!(
                "nonce {:?} was never sent on this stream",
                request.response_nonce
            ))));
        }
        if !state.awaiting {
            // The last response was answered already; a repeat answer changes nothing
            // but may change the subscription.
            if names != state.names {
                state.names = names.clone();
                self.shared.registry.update(self.id, ty, |t| t.names = names);
                return self.send(ty).await;
            }
            return Ok(());
        }
        state.awaiting = false;
        let Some(sent) = state.sent.as_ref() else { return Ok(()) };
        let (version, push_to_ack) = (sent.version, sent.at.elapsed());
        let node = self.node.clone().unwrap_or_default();
        let observer = Arc::clone(&self.shared.registry.observer);
        let nack = match request.error_detail {
            Some(detail) => Some(if detail.message.is_empty() {
                format!("rejected (code {}) without a message", detail.code)
            } else {
                detail.message
            }),
            None if request.version_info != version.to_string() => {
                Some(format!("answered version {version} with version {:?} and no error_detail", request.version_info))
            }
            None => None,
        };
        match nack {
            Some(error) => {
                tracing::info!(node = node.id, %ty, version, "NACK: {error}");
                observer.nacked(&node, ty, version, &error);
                self.shared.registry.update(self.id, ty, |t| {
                    t.awaiting = false;
                    t.nack = Some((version, error));
                });
            }
            None => {
                observer.acked(&node, ty, version, push_to_ack);
                let reported = request.version_info;
                self.shared.registry.update(self.id, ty, |t| {
                    t.awaiting = false;
                    t.acked_version = reported;
                    t.push_to_ack = Some(push_to_ack);
                });
            }
        }
        if names != state.names {
            state.names = names.clone();
            self.shared.registry.update(self.id, ty, |t| t.names = names);
            return self.send(ty).await;
        }
        self.send_if_newer(ty).await
    }

    /// True when `nonce` was sent on this stream (maybe for another type).
    fn issued(&self, nonce: &str) -> bool {
        let Some((stream, n)) = nonce.split_once('-') else { return false };
        stream.parse::<u64>().ok() == Some(self.id) && n.parse::<u64>().is_ok_and(|n| n >= 1 && n <= self.nonces)
    }

    /// After a change of the store: sends every type whose version moved on and whose
    /// last response was answered (the others follow their answer).
    async fn push_changes(&mut self) -> Result<(), End> {
        let types: Vec<ResourceType> = self.types.keys().copied().collect();
        for ty in types {
            self.send_if_newer(ty).await?;
        }
        Ok(())
    }

    /// Sends `ty` when its last response was answered and the store holds a newer version.
    async fn send_if_newer(&mut self, ty: ResourceType) -> Result<(), End> {
        let Some(state) = self.types.get(&ty) else { return Ok(()) };
        if state.awaiting {
            return Ok(());
        }
        let current = self.shared.store.snapshot(ty).version;
        if state.sent.as_ref().is_some_and(|s| s.version == current) {
            return Ok(());
        }
        self.send(ty).await
    }

    /// Sends the current version of `ty`.
    async fn send(&mut self, ty: ResourceType) -> Result<(), End> {
        let Some(state) = self.types.get_mut(&ty) else { return Ok(()) };
        let snapshot = self.shared.store.snapshot(ty);
        self.nonces += 1;
        let nonce = format!("{}-{}", self.id, self.nonces);
        let resources = snapshot
            .select(&state.names)
            .map(|r| pb::Resource {
                name: r.name.clone(),
                body: r.yaml.as_bytes().to_vec(),
                content_type: YAML_CONTENT_TYPE.to_string(),
            })
            .collect();
        let response = pb::DiscoveryResponse {
            type_url: ty.type_url().to_string(),
            version_info: snapshot.version.to_string(),
            nonce: nonce.clone(),
            resources,
            control_plane: self.shared.id.clone(),
        };
        state.sent = Some(Sent { version: snapshot.version, nonce, at: Instant::now() });
        state.awaiting = true;
        let version = snapshot.version;
        self.shared.registry.update(self.id, ty, |t| {
            t.sent_version = Some(version);
            t.sent_at = Some(SystemTime::now());
            t.awaiting = true;
        });
        if let Some(node) = &self.node {
            self.shared.registry.observer.pushed(node, ty, version);
        }
        self.tx.send(Ok(response)).await.map_err(|_| End::Closed)
    }
}
