//! State shared by a sidecar's listeners, admin server and config sources.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;

use crate::access_log::AccessLog;
use crate::drain::Drain;
use crate::mesh_tls::MeshIdentity;
use crate::metrics::Metrics;
use crate::snapshot::{EndpointRegistry, Snapshot};
use crate::upstream::split::SplitMode;

/// Who this proxy runs beside: the `source_*` labels of outbound metrics and the
/// `destination_*` labels of inbound ones.
#[derive(Debug, Clone)]
pub struct LocalWorkload {
    /// Workload name (`--workload`, default `unknown`).
    pub workload: String,
    /// Namespace (`--namespace`, default `default`).
    pub namespace: String,
    /// `app` label (`--app`, default `unknown`).
    pub app: String,
    /// `version` label (`--app-version`, default `unknown`).
    pub version: String,
    /// SPIFFE principal once mTLS exists; `unknown` until then.
    pub principal: String,
}

impl Default for LocalWorkload {
    fn default() -> Self {
        LocalWorkload {
            workload: "unknown".into(),
            namespace: "default".into(),
            app: "unknown".into(),
            version: "unknown".into(),
            principal: "unknown".into(),
        }
    }
}

/// A config update that failed validation or compilation and was not applied.
#[derive(Debug, Clone)]
pub struct RejectedUpdate {
    pub at: SystemTime,
    /// Where the update came from.
    pub source: String,
    /// Every error, one per line, each naming file, resource and field.
    pub error: String,
}

/// Everything a running sidecar shares between its tasks.
#[derive(Debug)]
pub struct Shared {
    /// The routing snapshot the request path reads.
    pub snapshot: ArcSwap<Snapshot>,
    /// The inbound side's snapshot: every request to the local app.
    pub inbound: ArcSwap<Snapshot>,
    /// The last rejected update, shown in `/config_dump`.
    pub rejected: Mutex<Option<RejectedUpdate>>,
    /// Endpoint runtime state kept across snapshots.
    pub registry: EndpointRegistry,
    pub metrics: Metrics,
    pub access_log: AccessLog,
    pub local: LocalWorkload,
    pub drain: Drain,
    /// How route destinations are picked by weight.
    pub split_mode: SplitMode,
    /// The workload certificate for mutual TLS, when the sidecar has one.
    pub mesh: MeshIdentity,
    /// The control-plane subscription, when the config comes from one.
    pub control_plane: std::sync::OnceLock<crate::xds_client::Subscribed>,
}

impl Shared {
    /// Shared state starting from `snapshot`.
    pub fn new(snapshot: Snapshot, local: LocalWorkload, access_log: AccessLog) -> Arc<Shared> {
        Shared::with_split(snapshot, local, access_log, SplitMode::Exact)
    }

    /// Like [`Shared::new`], with a choice of weighted split.
    pub fn with_split(
        snapshot: Snapshot,
        local: LocalWorkload,
        access_log: AccessLog,
        split_mode: SplitMode,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(snapshot),
            inbound: ArcSwap::from_pointee(Snapshot::empty("inbound")),
            rejected: Mutex::new(None),
            registry: EndpointRegistry::default(),
            metrics: Metrics::new(),
            access_log,
            local,
            drain: Drain::new(),
            split_mode,
            mesh: MeshIdentity::default(),
            control_plane: std::sync::OnceLock::new(),
        })
    }

    /// Publishes a new snapshot; requests in flight finish on the old one.
    pub fn apply(&self, snapshot: Snapshot) {
        tracing::info!(version = %snapshot.version, source = %snapshot.source, "config applied");
        self.snapshot.store(Arc::new(snapshot));
    }

    /// Records a rejected update; the current snapshot keeps serving.
    pub fn reject(&self, source: &str, error: String) {
        tracing::error!(%source, %error, "config update rejected; keeping the last good config");
        let mut guard = self.rejected.lock().unwrap_or_else(|e| e.into_inner());
        *guard = Some(RejectedUpdate { at: SystemTime::now(), source: source.to_string(), error });
    }
}
