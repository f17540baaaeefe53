//! The control-plane server: the [`Store`] of mesh config (versions, API weights,
//! persistence), the discovery streams, the management service and the certificate service
//! (the mesh CA signing CSRs, [`CaSettings`]), put together by [`ControlPlane`], which
//! serves them in plaintext ([`ControlPlane::serve`], 15010) and over TLS with
//! authentication ([`ControlPlane::serve_tls`], 15012).
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use serin_control_api::server::{ControlPlane, ServerOptions, Store, parse_documents};
//!
//! let docs = parse_documents(&std::fs::read_to_string("mesh.yaml")?)?;
//! let store = Arc::new(Store::open(std::path::Path::new("/var/lib/serin"), docs)?);
//! let plane = ControlPlane::new(store, ServerOptions::default());
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:15010").await?;
//! plane.serve(listener, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```

mod auth;
mod ca;
pub mod canary;
mod discovery;
mod hosts;
mod load;
mod management;
mod persist;
mod status;
mod store;
mod tls;
mod weights;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

pub use auth::{
    AUTHORIZATION_METADATA, BootstrapTokens, Caller, MIN_TOKEN_LEN, MeshConnectInfo, TokenFileError, TokenScope, caller,
};
pub use ca::{
    CONTROL_PLANE_NAMESPACE, CONTROL_PLANE_SERVICE_ACCOUNT, CaService, CaSettings, CaSetupError, DEFAULT_MAX_CERT_TTL,
};
pub use canary::{
    CANARY_STATE_FILE, CanaryError, CanaryManager, CanaryOptions, CanaryService, FieldError, Figures, FiguresSource,
    NoFigures,
};
pub use hosts::fqdn;
pub use load::{
    BUCKET_BOUNDS_MS, BUCKETS, DEFAULT_WINDOW, HISTORY, LoadService, LoadStats, MAX_NAME_LEN, MAX_REPORT_ENTRIES,
    MAX_SERIES, check_report, quantile,
};
pub use management::{DEFAULT_WAIT, MAX_WAIT, ManagementService};
pub use persist::STATE_FILE;
pub use status::{NoopObserver, Observer};
pub(crate) use store::Document;
pub use store::{Change, SetWeightsIfError, SourceDocument, Store, StoredResource, TypeSnapshot, parse_documents};
pub use tls::{SERVING_DNS_NAMES, SERVING_IPS, TlsServeError};
pub use weights::{STABLE_LABEL, STABLE_SUBSET_KEY};

use crate::pb;
use crate::types::{MAX_MESSAGE_SIZE, ResourceType};

/// Why the store refused a change or could not load.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The request named no service.
    #[error("no service named")]
    NoService,
    /// `set-weight` without weights.
    #[error("no weights given for {service}")]
    NoWeights {
        /// The service.
        service: String,
    },
    /// Percentages that do not add up to 100.
    #[error(
        "the weights for {service} add up to {sum}, not 100 ({weights}); set-weight takes percentages \
         (Istio itself reads weights as relative shares)"
    )]
    BadSum {
        /// The service.
        service: String,
        /// Their sum.
        sum: u64,
        /// The weights as given, `v1=90 v2=20`.
        weights: String,
    },
    /// Subsets the service's DestinationRule does not define.
    #[error("{service} has no subset {}; its subsets are {}", unknown.join(", "), known.join(", "))]
    UnknownSubsets {
        /// The service.
        service: String,
        /// The unknown names.
        unknown: Vec<String>,
        /// The subsets defined.
        known: Vec<String>,
    },
    /// No DestinationRule defines subsets for the service.
    #[error("no DestinationRule defines subsets for {service}")]
    NoSubsets {
        /// The service.
        service: String,
    },
    /// No VirtualService route goes to the service.
    #[error("no VirtualService route sends traffic only to {service}, so there is no split to set")]
    NoRoute {
        /// The service.
        service: String,
    },
    /// `reset-weights` for a service whose weights were not set through the API.
    #[error("no weights were set through the API for {service}")]
    NoOverride {
        /// The service.
        service: String,
    },
    /// A document that cannot be read or written as YAML.
    #[error("{name}: {message}")]
    Document {
        /// `Kind/namespace/name`, or `#index` in a stream.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// The same resource twice.
    #[error("{kind} {name} is defined twice")]
    Duplicate {
        /// Its kind.
        kind: String,
        /// `namespace/name`.
        name: String,
    },
    /// Reading or writing the state folder failed.
    #[error("state {}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The state file is not one this version reads.
    #[error("state file {} cannot be read: {message}", path.display())]
    BadState {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// Server settings.
#[derive(Clone)]
pub struct ServerOptions {
    /// Largest message accepted or sent (default [`MAX_MESSAGE_SIZE`], 4 MiB).
    pub max_message_size: usize,
    /// Sent as `control_plane` in every response (default `serin-control-plane/<pid>`).
    pub id: String,
    /// Metrics hooks.
    pub observer: Arc<dyn Observer>,
    /// HTTP/2 keepalive ping interval, to notice sidecars that vanished (default 30 s).
    pub keepalive_interval: Duration,
}

impl Default for ServerOptions {
    fn default() -> ServerOptions {
        ServerOptions {
            max_message_size: MAX_MESSAGE_SIZE,
            id: format!("serin-control-plane/{}", std::process::id()),
            observer: Arc::new(NoopObserver),
            keepalive_interval: Duration::from_secs(30),
        }
    }
}

impl std::fmt::Debug for ServerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerOptions")
            .field("max_message_size", &self.max_message_size)
            .field("id", &self.id)
            .field("keepalive_interval", &self.keepalive_interval)
            .finish_non_exhaustive()
    }
}

/// What the services share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub store: Arc<Store>,
    pub registry: status::Registry,
    /// The load reports of the sidecars, aggregated.
    pub load: Arc<LoadStats>,
    pub id: String,
    /// Set when the server shuts down: every stream ends.
    pub closing: watch::Sender<bool>,
}

impl Shared {
    fn status(&self) -> pb::Status {
        self.registry.status(&self.store.versions())
    }

    async fn wait_for_ack(
        &self,
        ty: ResourceType,
        version: u64,
        service: Option<&str>,
        timeout: Duration,
    ) -> pb::AckResult {
        let mut closing = self.closing.subscribe();
        tokio::select! {
            result = self.registry.wait_for_ack(ty, version, service, timeout) => result,
            () = closed(&mut closing) => pb::AckResult { timed_out: true, ..Default::default() },
        }
    }
}

/// Completes once the server is closing (or the sender is gone).
pub(crate) async fn closed(closing: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is dropped here, before any caller awaits again.
    let _ = closing.wait_for(|c| *c).await.map(|_| ());
}

/// The gRPC `Discovery` service.
#[derive(Debug, Clone)]
pub struct DiscoveryService {
    shared: Arc<Shared>,
}

#[tonic::async_trait]
impl pb::discovery_server::Discovery for DiscoveryService {
    type StreamStream = ReceiverStream<Result<pb::DiscoveryResponse, Status>>;

    async fn stream(
        &self,
        request: Request<Streaming<pb::DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(discovery::run(Arc::clone(&self.shared), request.into_inner(), tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// The control plane: a [`Store`] served over the discovery and management services, and,
/// with a CA ([`ControlPlane::with_ca`]), the certificate service and the TLS listener.
#[derive(Debug, Clone)]
pub struct ControlPlane {
    shared: Arc<Shared>,
    options: ServerOptions,
    ca: Option<Arc<CaSettings>>,
    canaries: Arc<CanaryManager>,
}

impl ControlPlane {
    /// A control plane serving `store`.
    pub fn new(store: Arc<Store>, options: ServerOptions) -> ControlPlane {
        let shared = Arc::new(Shared {
            store,
            registry: status::Registry::new(Arc::clone(&options.observer)),
            load: Arc::new(LoadStats::new()),
            id: options.id.clone(),
            closing: watch::Sender::new(false),
        });
        let figures: Arc<dyn FiguresSource> = Arc::clone(&shared.load) as Arc<dyn FiguresSource>;
        let canary_options = CanaryOptions { figures, ..CanaryOptions::default() };
        let canaries = Arc::new(CanaryManager::new(Arc::clone(&shared), canary_options));
        ControlPlane { shared, options, ca: None, canaries }
    }

    /// The canary analyses: start, list, show, abort.
    pub fn canaries(&self) -> &Arc<CanaryManager> {
        &self.canaries
    }

    /// The same control plane with these canary settings (figures source, ACK timeout).
    pub fn with_canary_options(self, options: CanaryOptions) -> ControlPlane {
        self.canaries.set_options(options);
        self
    }

    /// Loads the persisted canary analyses, resumes the running ones and starts
    /// following the config folder's `Canary` documents. Idempotent; `serve` calls it
    /// (logging an error), callers that want a bad state file to stop them call it first.
    /// Needs a tokio runtime.
    pub fn start_canaries(&self) -> Result<(), CanaryError> {
        self.canaries.start_all()
    }

    /// The canary service, for a caller that builds its own tonic server.
    pub fn canaries_service(&self) -> pb::canaries_server::CanariesServer<CanaryService> {
        pb::canaries_server::CanariesServer::new(CanaryService { manager: Arc::clone(&self.canaries) })
            .max_decoding_message_size(self.options.max_message_size)
            .max_encoding_message_size(self.options.max_message_size)
    }

    /// The same control plane with a CA: `CreateCertificate` signs CSRs, and
    /// [`ControlPlane::serve_tls`] can serve.
    pub fn with_ca(mut self, settings: CaSettings) -> ControlPlane {
        self.ca = Some(Arc::new(settings));
        self
    }

    /// The CA settings, when the control plane has a CA.
    pub fn ca(&self) -> Option<&Arc<CaSettings>> {
        self.ca.as_ref()
    }

    /// The certificate service (answers FAILED_PRECONDITION without a CA).
    pub fn certificates_service(&self) -> pb::certificates_server::CertificatesServer<CaService> {
        let service = CaService { settings: self.ca.clone(), observer: Arc::clone(&self.options.observer) };
        pb::certificates_server::CertificatesServer::new(service)
            .max_decoding_message_size(self.options.max_message_size)
            .max_encoding_message_size(self.options.max_message_size)
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.shared.store
    }

    /// The discovery service, for a caller that builds its own tonic server (TLS, …).
    pub fn discovery_service(&self) -> pb::discovery_server::DiscoveryServer<DiscoveryService> {
        pb::discovery_server::DiscoveryServer::new(DiscoveryService { shared: Arc::clone(&self.shared) })
            .max_decoding_message_size(self.options.max_message_size)
            .max_encoding_message_size(self.options.max_message_size)
    }

    /// The management service, for a caller that builds its own tonic server.
    pub fn management_service(&self) -> pb::management_server::ManagementServer<ManagementService> {
        pb::management_server::ManagementServer::new(ManagementService { shared: Arc::clone(&self.shared) })
            .max_decoding_message_size(self.options.max_message_size)
            .max_encoding_message_size(self.options.max_message_size)
    }

    /// The load service (`GetLoad`), for a caller that builds its own tonic server.
    pub fn load_service(&self) -> pb::load_server::LoadServer<LoadService> {
        pb::load_server::LoadServer::new(LoadService { stats: Arc::clone(&self.shared.load) })
            .max_decoding_message_size(self.options.max_message_size)
            .max_encoding_message_size(self.options.max_message_size)
    }

    /// The per-version load figures the sidecars report (what `GetLoad` answers).
    pub fn load(&self) -> &Arc<LoadStats> {
        &self.shared.load
    }

    /// Every connected sidecar and what it runs (what `GetStatus` answers).
    pub fn status(&self) -> pb::Status {
        self.shared.status()
    }

    /// Waits until every sidecar subscribed to `ty` (and to `service`, when given) has
    /// ACKed or NACKed `version` or a later one, or `timeout` passed.
    pub async fn wait_for_ack(
        &self,
        ty: ResourceType,
        version: u64,
        service: Option<&str>,
        timeout: Duration,
    ) -> pb::AckResult {
        self.shared.wait_for_ack(ty, version, service, timeout).await
    }

    /// Ends every discovery stream (with UNAVAILABLE, so sidecars reconnect) and every
    /// wait; call it before a graceful shutdown of a server built by the caller, which
    /// would otherwise wait for the streams forever.
    pub fn close_streams(&self) {
        self.shared.closing.send_replace(true);
    }

    /// Serves the discovery, management and certificate services on `listener`
    /// (plaintext) until `shutdown` completes, then ends the streams and returns. Over
    /// plaintext the CA signs only for callers with a bootstrap token.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), tonic::transport::Error> {
        if let Err(e) = self.start_canaries() {
            tracing::error!(error = %e, "canary analyses not resumed");
        }
        let closing = self.clone();
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(self.options.keepalive_interval))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(self.discovery_service())
            .add_service(self.management_service())
            .add_service(self.load_service())
            .add_service(self.certificates_service())
            .add_service(self.canaries_service())
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                shutdown.await;
                closing.close_streams();
            })
            .await?;
        // The analyses stop with the streams; none is left writing the state folder.
        self.canaries.join().await;
        Ok(())
    }
}
