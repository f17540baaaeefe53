//! What each connected sidecar runs: the registry behind `GetStatus` and `WaitForAck`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;

use super::hosts::same_service;
use crate::pb;
use crate::types::ResourceType;

/// Hooks for metrics: called by the discovery streams. Every method has an empty
/// default.
pub trait Observer: Send + Sync + 'static {
    /// A stream named its node.
    fn stream_opened(&self, _node: &pb::Node) {}
    /// A stream ended; `error` is the status it ended with, if any.
    fn stream_closed(&self, _node: &pb::Node, _error: Option<&tonic::Status>) {}
    /// A response was sent.
    fn pushed(&self, _node: &pb::Node, _ty: ResourceType, _version: u64) {}
    /// A response was ACKed, `push_to_ack` after it was sent.
    fn acked(&self, _node: &pb::Node, _ty: ResourceType, _version: u64, _push_to_ack: Duration) {}
    /// A response was NACKed.
    fn nacked(&self, _node: &pb::Node, _ty: ResourceType, _version: u64, _error: &str) {}
    /// The CA signed a certificate for `spiffe_id`; `auth` is how the caller showed it may
    /// have it: `certificate` (renewal) or `token` (bootstrap).
    fn csr_signed(&self, _spiffe_id: &str, _auth: &str) {}
    /// The CA refused a request with `code` (UNAUTHENTICATED, PERMISSION_DENIED, ...).
    fn csr_refused(&self, _code: tonic::Code) {}
    /// The TLS listener refused a call that carried no valid credential.
    fn unauthenticated(&self) {}
}

/// An observer that does nothing.
#[derive(Debug, Default)]
pub struct NoopObserver;

impl Observer for NoopObserver {}

/// One type on one stream.
#[derive(Debug, Clone, Default)]
pub(crate) struct TypeEntry {
    pub names: Vec<String>,
    pub sent_version: Option<u64>,
    pub sent_at: Option<SystemTime>,
    /// The last response is not ACKed or NACKed yet.
    pub awaiting: bool,
    /// The version the sidecar last said it runs, as it wrote it.
    pub acked_version: String,
    pub nack: Option<(u64, String)>,
    pub push_to_ack: Option<Duration>,
}

impl TypeEntry {
    fn acked(&self) -> Option<u64> {
        self.acked_version.parse().ok()
    }

    /// SYNCED / STALE / NACKED / NOT_SENT against the current version.
    pub(crate) fn state(&self, current: u64) -> pb::SyncState {
        match self.sent_version {
            None => pb::SyncState::NotSent,
            Some(_) if self.awaiting => pb::SyncState::Stale,
            Some(sent) if self.nack.as_ref().is_some_and(|(v, _)| *v == sent) => pb::SyncState::Nacked,
            Some(_) if self.acked() == Some(current) => pb::SyncState::Synced,
            Some(_) => pb::SyncState::Stale,
        }
    }

    /// The sidecar's answer to `version`.
    fn answer(&self, version: u64) -> Answer {
        if self.acked().is_some_and(|a| a >= version) {
            Answer::Acked
        } else if self.nack.as_ref().is_some_and(|(v, _)| *v >= version) {
            Answer::Nacked
        } else {
            Answer::Pending
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Acked,
    Nacked,
    Pending,
}

/// One open stream.
#[derive(Debug, Clone)]
pub(crate) struct StreamEntry {
    pub node: pb::Node,
    pub connected_since: SystemTime,
    pub types: BTreeMap<ResourceType, TypeEntry>,
}

/// Every open stream, by stream id.
pub(crate) struct Registry {
    streams: Mutex<BTreeMap<u64, StreamEntry>>,
    next_id: AtomicU64,
    changed: Notify,
    pub observer: Arc<dyn Observer>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("streams", &self.lock().len()).finish_non_exhaustive()
    }
}

pub(crate) fn unix_ms(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Registry {
    pub(crate) fn new(observer: Arc<dyn Observer>) -> Registry {
        Registry { streams: Mutex::new(BTreeMap::new()), next_id: AtomicU64::new(1), changed: Notify::new(), observer }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, StreamEntry>> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new stream id.
    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers an open stream.
    pub(crate) fn open(&self, id: u64, node: pb::Node) {
        self.observer.stream_opened(&node);
        self.lock().insert(id, StreamEntry { node, connected_since: SystemTime::now(), types: BTreeMap::new() });
        self.changed.notify_waiters();
    }

    /// Removes a closed stream.
    pub(crate) fn close(&self, id: u64, error: Option<&tonic::Status>) {
        let entry = self.lock().remove(&id);
        if let Some(entry) = entry {
            self.observer.stream_closed(&entry.node, error);
        }
        self.changed.notify_waiters();
    }

    /// Changes one type of one stream and wakes the waiters.
    pub(crate) fn update(&self, id: u64, ty: ResourceType, change: impl FnOnce(&mut TypeEntry)) {
        if let Some(entry) = self.lock().get_mut(&id) {
            change(entry.types.entry(ty).or_default());
        }
        self.changed.notify_waiters();
    }

    /// The status table.
    pub(crate) fn status(&self, versions: &BTreeMap<ResourceType, u64>) -> pb::Status {
        let streams = self.lock();
        let proxies = streams
            .iter()
            .map(|(id, entry)| pb::ProxyStatus {
                node: Some(entry.node.clone()),
                connected_since_unix_ms: unix_ms(entry.connected_since),
                stream_id: *id,
                types: entry
                    .types
                    .iter()
                    .map(|(ty, t)| pb::TypeStatus {
                        type_url: ty.type_url().to_string(),
                        resource_names: t.names.clone(),
                        sent_version: t.sent_version.map(|v| v.to_string()).unwrap_or_default(),
                        acked_version: t.acked_version.clone(),
                        state: t.state(versions.get(ty).copied().unwrap_or(0)) as i32,
                        last_nack_version: t.nack.as_ref().map(|(v, _)| v.to_string()).unwrap_or_default(),
                        last_nack_error: t.nack.as_ref().map(|(_, e)| e.clone()).unwrap_or_default(),
                        push_to_ack_ms: t.push_to_ack.map(millis),
                        last_sent_unix_ms: t.sent_at.map_or(0, unix_ms),
                    })
                    .collect(),
            })
            .collect();
        pb::Status {
            proxies,
            versions: versions.iter().map(|(ty, v)| (ty.type_url().to_string(), v.to_string())).collect(),
        }
    }

    /// The answers of the streams subscribed to `ty` (and to `service`, when given) to
    /// `version`; with `per_node`, each node's answer too (the counts alone allocate
    /// nothing: a waiter re-counts on every ACK of every stream).
    fn evaluate(&self, ty: ResourceType, version: u64, service: Option<&str>, per_node: bool) -> pb::AckResult {
        let streams = self.lock();
        let mut result = pb::AckResult::default();
        for entry in streams.values() {
            let Some(t) = entry.types.get(&ty) else { continue };
            let namespace = if entry.node.namespace.is_empty() { "default" } else { entry.node.namespace.as_str() };
            let wanted = match service {
                None => true,
                Some(service) => t.names.is_empty() || t.names.iter().any(|n| same_service(n, service, namespace)),
            };
            if !wanted {
                continue;
            }
            result.total += 1;
            let answer = t.answer(version);
            let push_to_ack_ms = t.push_to_ack.map_or(0, millis);
            let state = match answer {
                Answer::Acked => {
                    result.acked += 1;
                    result.slowest_ms = result.slowest_ms.max(push_to_ack_ms);
                    "ACKED"
                }
                Answer::Nacked => {
                    result.nacked += 1;
                    "NACKED"
                }
                Answer::Pending => "PENDING",
            };
            if !per_node {
                continue;
            }
            let error = match answer {
                Answer::Nacked => t.nack.as_ref().map(|(_, e)| e.clone()).unwrap_or_default(),
                _ => String::new(),
            };
            result.nodes.push(pb::NodeAck {
                node_id: entry.node.id.clone(),
                state: state.to_string(),
                error,
                push_to_ack_ms,
            });
        }
        result
    }

    /// Waits until every stream subscribed to `ty` (and `service`) ACKed or NACKed
    /// `version` or a later one, or `timeout` passed. Streams that open meanwhile
    /// count too; streams that close stop counting.
    pub(crate) async fn wait_for_ack(
        &self,
        ty: ResourceType,
        version: u64,
        service: Option<&str>,
        timeout: Duration,
    ) -> pb::AckResult {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let counts = self.evaluate(ty, version, service, false);
            if counts.acked + counts.nacked == counts.total {
                let result = self.evaluate(ty, version, service, true);
                if result.acked + result.nacked == result.total {
                    return result;
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let mut result = self.evaluate(ty, version, service, true);
                result.timed_out = result.acked + result.nacked < result.total;
                return result;
            }
        }
    }
}
