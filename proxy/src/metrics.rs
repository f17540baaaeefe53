//! Istio's standard metrics (prometheus-client), with Istio's names, labels and
//! Envoy's default histogram buckets, exposed in the Prometheus text format 0.0.4.
//!
//! HTTP/gRPC: `istio_requests_total`, `istio_request_duration_milliseconds`,
//! `istio_request_bytes`, `istio_response_bytes`. Opaque TCP:
//! `istio_tcp_sent_bytes_total`, `istio_tcp_received_bytes_total`,
//! `istio_tcp_connections_opened_total`, `istio_tcp_connections_closed_total`.
//!
//! # Cost on the request path
//!
//! The label set of a request is made of a few small values (reporter, protocol,
//! status, flags, …) and three *interned* halves: the source workload, the
//! destination workload and the destination service. Interning guarantees one
//! `Arc` per distinct content, so the halves hash and compare by pointer. Each half
//! is found from the `Arc<Endpoint>` / `Arc<ServiceInfo>` of the request through a
//! pointer-keyed cache, and from the [`LocalWorkload`] by comparing a few short
//! strings. Recording a request is then: three cache reads, one lookup of the
//! resolved metric handles (one hash of ~10 machine words), one counter increment
//! and three histogram observations. No string is built or allocated unless a label
//! combination is new.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelSetEncoder, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::flags::ResponseFlags;
use crate::request_info::{PeerTls, Reporter, RequestInfo};
use crate::snapshot::{Cluster, Endpoint, ServiceInfo};
use crate::state::LocalWorkload;

/// Envoy's default histogram buckets, used by Istio for every histogram
/// (milliseconds and bytes alike).
pub const ENVOY_DEFAULT_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0, 300000.0,
    600000.0, 1800000.0, 3600000.0,
];

/// `Content-Type` of [`Metrics::encode`]'s output (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The label value written where nothing is known.
const UNKNOWN: &str = "unknown";

/// Istio's `request_protocol` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// HTTP/1.x or HTTP/2 (not gRPC).
    Http,
    /// gRPC over HTTP/2.
    Grpc,
    /// Opaque TCP.
    Tcp,
}

impl Protocol {
    /// Istio's label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Grpc => "grpc",
            Protocol::Tcp => "tcp",
        }
    }
}

impl EncodeLabelValue for Protocol {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

/// Istio's `connection_security_policy` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SecurityPolicy {
    /// What a client-side (`reporter="source"`) proxy reports.
    Unknown,
    /// Plain text at the server side.
    None,
    /// Mutual TLS at the server side.
    MutualTls,
}

impl SecurityPolicy {
    /// Istio's label value.
    pub fn as_str(self) -> &'static str {
        match self {
            SecurityPolicy::Unknown => "unknown",
            SecurityPolicy::None => "none",
            SecurityPolicy::MutualTls => "mutual_tls",
        }
    }

    /// The policy as Istio reports it: `unknown` at the source, and at the
    /// destination `mutual_tls` or `none` by the connection.
    fn for_reporter(reporter: Reporter, mutual_tls: bool) -> SecurityPolicy {
        match reporter {
            Reporter::Source => SecurityPolicy::Unknown,
            Reporter::Destination if mutual_tls => SecurityPolicy::MutualTls,
            Reporter::Destination => SecurityPolicy::None,
        }
    }
}

impl EncodeLabelValue for SecurityPolicy {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

/// `reporter` label (the [`Reporter`] of the request info, which has no `Hash`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ReporterLabel(Reporter);

impl Hash for ReporterLabel {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (self.0 == Reporter::Source).hash(state);
    }
}

impl EncodeLabelValue for ReporterLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.0.as_str())
    }
}

/// `response_flags` label: Envoy's short names, `-` when none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FlagsLabel(ResponseFlags);

impl EncodeLabelValue for FlagsLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        write!(encoder, "{}", self.0)
    }
}

/// The identity labels of one workload (either side of a call).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct WorkloadLabels {
    workload: String,
    namespace: String,
    principal: String,
    app: String,
    version: String,
    canonical_service: String,
    canonical_revision: String,
}

impl WorkloadLabels {
    fn unknown() -> WorkloadLabels {
        WorkloadLabels {
            workload: UNKNOWN.into(),
            namespace: UNKNOWN.into(),
            principal: UNKNOWN.into(),
            app: UNKNOWN.into(),
            version: UNKNOWN.into(),
            canonical_service: UNKNOWN.into(),
            canonical_revision: UNKNOWN.into(),
        }
    }

    fn from_local(local: &LocalWorkload) -> WorkloadLabels {
        let app = or_unknown(&local.app);
        let version = or_unknown(&local.version);
        let workload = or_unknown(&local.workload);
        WorkloadLabels {
            canonical_service: if app != UNKNOWN { app.into() } else { workload.into() },
            canonical_revision: if version != UNKNOWN { version.into() } else { "latest".into() },
            workload: workload.into(),
            namespace: or_unknown(&local.namespace).into(),
            principal: or_unknown(&local.principal).into(),
            app: app.into(),
            version: version.into(),
        }
    }

    /// Labels of an upstream endpoint: `app` / `version` labels, Istio's canonical
    /// name and revision rules. The principal stays `unknown` until mTLS gives a
    /// verified peer identity.
    fn from_endpoint(ep: &Endpoint) -> WorkloadLabels {
        let workload = or_unknown(&ep.workload);
        let app = ep.label("app").filter(|v| !v.is_empty());
        let version = ep.label("version").filter(|v| !v.is_empty());
        let canonical_service = ep
            .label("service.istio.io/canonical-name")
            .or_else(|| ep.label("app.kubernetes.io/name"))
            .or(app)
            .unwrap_or(workload);
        let canonical_revision = ep
            .label("service.istio.io/canonical-revision")
            .or_else(|| ep.label("app.kubernetes.io/version"))
            .or(version)
            .unwrap_or("latest");
        WorkloadLabels {
            workload: workload.into(),
            namespace: or_unknown(&ep.namespace).into(),
            principal: UNKNOWN.into(),
            app: app.unwrap_or(UNKNOWN).into(),
            version: version.unwrap_or(UNKNOWN).into(),
            canonical_service: canonical_service.into(),
            canonical_revision: canonical_revision.into(),
        }
    }
}

/// The labels of a destination service.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ServiceLabels {
    /// FQDN.
    host: String,
    name: String,
    namespace: String,
}

impl ServiceLabels {
    fn unknown() -> ServiceLabels {
        ServiceLabels { host: UNKNOWN.into(), name: UNKNOWN.into(), namespace: UNKNOWN.into() }
    }

    fn from_service(service: &ServiceInfo) -> ServiceLabels {
        ServiceLabels {
            host: or_unknown(&service.host).into(),
            name: or_unknown(&service.name).into(),
            namespace: or_unknown(&service.namespace).into(),
        }
    }
}

fn or_unknown(value: &str) -> &str {
    if value.is_empty() { UNKNOWN } else { value }
}

/// A `HashMap` with foldhash's fast hasher, for the request-path caches: their keys
/// are pointers and small integers chosen by this process and its configuration, so
/// SipHash's flooding resistance buys nothing and costs ~700 instructions per request.
pub(crate) type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// A value shared by every holder of equal content: compares and hashes by pointer.
/// Only [`Interner::intern`] makes one, which keeps "equal content ⇔ same pointer".
#[derive(Debug)]
struct Interned<T>(Arc<T>);

impl<T> Clone for Interned<T> {
    fn clone(&self) -> Self {
        Interned(self.0.clone())
    }
}

impl<T> PartialEq for Interned<T> {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl<T> Eq for Interned<T> {}

impl<T> Hash for Interned<T> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (Arc::as_ptr(&self.0) as *const () as usize).hash(state);
    }
}

/// Hands out one [`Interned`] per distinct content. Entries are never dropped: the
/// metric families keep every label set they have seen anyway.
#[derive(Debug)]
struct Interner<T>(Mutex<HashSet<Arc<T>>>);

impl<T: Hash + Eq> Interner<T> {
    fn new() -> Self {
        Interner(Mutex::new(HashSet::new()))
    }

    fn intern(&self, value: T) -> Interned<T> {
        let mut set = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(existing) = set.get(&value) {
            return Interned(existing.clone());
        }
        let arc = Arc::new(value);
        set.insert(arc.clone());
        Interned(arc)
    }
}

/// A cache keyed by the address of an `Arc<K>`. Each entry holds a `Weak<K>`, which
/// keeps the allocation (not the value) alive, so no other `Arc<K>` can take the
/// same address while the entry exists: an address hit is always the same object.
/// Entries whose object is gone are pruned when the map has doubled. (Also the load
/// cells' cache by cluster, [`crate::load_report`].)
#[derive(Debug)]
pub(crate) struct PtrCache<K, V> {
    map: RwLock<FastMap<usize, (Weak<K>, V)>>,
    prune_at: AtomicUsize,
}

impl<K, V: Clone> PtrCache<K, V> {
    const MIN_PRUNE: usize = 64;

    pub(crate) fn new() -> Self {
        PtrCache { map: RwLock::new(FastMap::default()), prune_at: AtomicUsize::new(Self::MIN_PRUNE) }
    }

    pub(crate) fn get_or_insert_with(&self, key: &Arc<K>, make: impl FnOnce(&K) -> V) -> V {
        let addr = Arc::as_ptr(key) as *const () as usize;
        {
            let map = self.map.read().unwrap_or_else(|e| e.into_inner());
            if let Some((weak, value)) = map.get(&addr)
                && std::ptr::eq(weak.as_ptr(), Arc::as_ptr(key))
            {
                return value.clone();
            }
        }
        let value = make(key);
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        if map.len() >= self.prune_at.load(Ordering::Relaxed) {
            map.retain(|_, (weak, _)| weak.strong_count() > 0);
            self.prune_at.store((map.len() * 2).max(Self::MIN_PRUNE), Ordering::Relaxed);
        }
        map.insert(addr, (Arc::downgrade(key), value.clone()));
        value
    }
}

/// The `source_*` labels.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct SourceLabels(Interned<WorkloadLabels>);

impl EncodeLabelSet for SourceLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        let w = &*self.0.0;
        [
            ("source_workload", w.workload.as_str()),
            ("source_canonical_service", &w.canonical_service),
            ("source_canonical_revision", &w.canonical_revision),
            ("source_workload_namespace", &w.namespace),
            ("source_principal", &w.principal),
            ("source_app", &w.app),
            ("source_version", &w.version),
        ]
        .encode(encoder)
    }
}

/// The `destination_*` labels: the workload and the service.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct DestinationLabels {
    workload: Interned<WorkloadLabels>,
    service: Interned<ServiceLabels>,
}

impl EncodeLabelSet for DestinationLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        let w = &*self.workload.0;
        let s = &*self.service.0;
        // Istio's order (istio/proxy golden files).
        [
            ("destination_workload", w.workload.as_str()),
            ("destination_workload_namespace", &w.namespace),
            ("destination_principal", &w.principal),
            ("destination_app", &w.app),
            ("destination_version", &w.version),
            ("destination_service", &s.host),
            ("destination_canonical_service", &w.canonical_service),
            ("destination_canonical_revision", &w.canonical_revision),
            ("destination_service_name", &s.name),
            ("destination_service_namespace", &s.namespace),
        ]
        .encode(encoder)
    }
}

/// Istio's standard label set of the HTTP/gRPC metrics.
#[derive(Debug, Clone, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
struct RequestLabels {
    reporter: ReporterLabel,
    #[prometheus(flatten)]
    source: SourceLabels,
    #[prometheus(flatten)]
    destination: DestinationLabels,
    request_protocol: Protocol,
    /// `0` when no response was sent.
    response_code: u16,
    /// `""` when not gRPC (or no status).
    grpc_response_status: Option<u32>,
    response_flags: FlagsLabel,
    connection_security_policy: SecurityPolicy,
}

/// Istio's label set of the TCP metrics (no response code or gRPC status).
#[derive(Debug, Clone, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
struct TcpLabels {
    reporter: ReporterLabel,
    #[prometheus(flatten)]
    source: SourceLabels,
    #[prometheus(flatten)]
    destination: DestinationLabels,
    request_protocol: Protocol,
    response_flags: FlagsLabel,
    connection_security_policy: SecurityPolicy,
}

/// Resolved handles of the four HTTP metrics for one label set.
#[derive(Debug, Clone)]
struct RequestHandles {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
    /// The load-report cell of the label set's destination service and version
    /// (outbound requests with a cluster, when load reporting is on).
    load: Option<Arc<crate::load_report::LoadCell>>,
}

/// Resolved handles of the four TCP metrics for one label set.
#[derive(Debug, Clone)]
struct TcpHandles {
    sent: Counter,
    received: Counter,
    opened: Counter,
    closed: Counter,
}

/// One opaque TCP connection, for the TCP metrics.
#[derive(Debug, Clone)]
pub struct TcpInfo {
    /// Which side this proxy reports for.
    pub reporter: Reporter,
    /// The cluster the connection was sent to, if one was picked.
    pub cluster: Option<Arc<Cluster>>,
    /// The upstream endpoint, if one was picked.
    pub endpoint: Option<Arc<Endpoint>>,
    /// Envoy response flags (e.g. `UF` when the upstream connect failed).
    pub flags: ResponseFlags,
    /// Bytes sent downstream (the response direction) not yet recorded.
    pub sent_bytes: u64,
    /// Bytes received from downstream (the request direction) not yet recorded.
    pub received_bytes: u64,
}

impl TcpInfo {
    /// A connection with no cluster, endpoint, flag or bytes yet.
    pub fn new(reporter: Reporter) -> TcpInfo {
        TcpInfo {
            reporter,
            cluster: None,
            endpoint: None,
            flags: ResponseFlags::NONE,
            sent_bytes: 0,
            received_bytes: 0,
        }
    }
}

/// The TCP metrics of one open connection, with its label set resolved once.
/// Dropping it counts the connection as closed, so a cancelled task still does.
#[derive(Debug)]
pub struct TcpConnectionMetrics {
    handles: TcpHandles,
}

impl TcpConnectionMetrics {
    /// Adds bytes sent downstream (response direction).
    pub fn add_sent(&self, bytes: u64) {
        if bytes > 0 {
            self.handles.sent.inc_by(bytes);
        }
    }

    /// Adds bytes received from downstream (request direction).
    pub fn add_received(&self, bytes: u64) {
        if bytes > 0 {
            self.handles.received.inc_by(bytes);
        }
    }
}

impl Drop for TcpConnectionMetrics {
    fn drop(&mut self) {
        self.handles.closed.inc();
    }
}

/// The interned label halves and the caches that find them.
#[derive(Debug)]
struct LabelCache {
    workloads: Interner<WorkloadLabels>,
    services: Interner<ServiceLabels>,
    unknown_workload: Interned<WorkloadLabels>,
    unknown_service: Interned<ServiceLabels>,
    /// The last `LocalWorkload` seen and its labels (it never changes in practice).
    local: RwLock<Option<(LocalWorkload, Interned<WorkloadLabels>)>>,
    endpoints: PtrCache<Endpoint, Interned<WorkloadLabels>>,
    service_by_ptr: PtrCache<ServiceInfo, Interned<ServiceLabels>>,
    /// The caller's labels at the destination, per mutual-TLS peer (one `PeerTls` per
    /// connection), so they are interned once per connection, not per request.
    peer_by_ptr: PtrCache<PeerTls, Interned<WorkloadLabels>>,
}

impl LabelCache {
    fn new() -> LabelCache {
        let workloads = Interner::new();
        let services = Interner::new();
        let unknown_workload = workloads.intern(WorkloadLabels::unknown());
        let unknown_service = services.intern(ServiceLabels::unknown());
        LabelCache {
            workloads,
            services,
            unknown_workload,
            unknown_service,
            local: RwLock::new(None),
            endpoints: PtrCache::new(),
            service_by_ptr: PtrCache::new(),
            peer_by_ptr: PtrCache::new(),
        }
    }

    fn local(&self, local: &LocalWorkload) -> Interned<WorkloadLabels> {
        fn same(a: &LocalWorkload, b: &LocalWorkload) -> bool {
            a.workload == b.workload
                && a.namespace == b.namespace
                && a.app == b.app
                && a.version == b.version
                && a.principal == b.principal
        }
        {
            let cached = self.local.read().unwrap_or_else(|e| e.into_inner());
            if let Some((seen, labels)) = &*cached
                && same(seen, local)
            {
                return labels.clone();
            }
        }
        let labels = self.workloads.intern(WorkloadLabels::from_local(local));
        *self.local.write().unwrap_or_else(|e| e.into_inner()) = Some((local.clone(), labels.clone()));
        labels
    }

    fn endpoint(&self, endpoint: Option<&Arc<Endpoint>>) -> Interned<WorkloadLabels> {
        match endpoint {
            Some(ep) => {
                self.endpoints.get_or_insert_with(ep, |ep| self.workloads.intern(WorkloadLabels::from_endpoint(ep)))
            }
            None => self.unknown_workload.clone(),
        }
    }

    fn service(&self, cluster: Option<&Arc<Cluster>>) -> Interned<ServiceLabels> {
        match cluster {
            Some(cluster) => self
                .service_by_ptr
                .get_or_insert_with(&cluster.service, |s| self.services.intern(ServiceLabels::from_service(s))),
            None => self.unknown_service.clone(),
        }
    }

    /// Source and destination labels of a call seen by `reporter`.
    fn peers(
        &self,
        reporter: Reporter,
        local: &LocalWorkload,
        cluster: Option<&Arc<Cluster>>,
        endpoint: Option<&Arc<Endpoint>>,
        peer: Option<&Arc<PeerTls>>,
    ) -> (SourceLabels, DestinationLabels) {
        let service = self.service(cluster);
        match reporter {
            Reporter::Source => {
                (SourceLabels(self.local(local)), DestinationLabels { workload: self.endpoint(endpoint), service })
            }
            // The caller's workload labels are unknown until peer metadata travels
            // with requests; a mutual-TLS peer gives its principal and namespace.
            Reporter::Destination => {
                let source = match peer {
                    Some(peer) => self.peer_by_ptr.get_or_insert_with(peer, |p| {
                        self.workloads.intern(WorkloadLabels {
                            principal: p.spiffe.clone(),
                            namespace: p.namespace.clone(),
                            ..WorkloadLabels::unknown()
                        })
                    }),
                    None => self.unknown_workload.clone(),
                };
                (SourceLabels(source), DestinationLabels { workload: self.local(local), service })
            }
        }
    }
}

type HistogramFamily<S> = Family<S, Histogram, fn() -> Histogram>;

fn envoy_histogram() -> Histogram {
    Histogram::new(ENVOY_DEFAULT_BUCKETS)
}

/// The proxy's metric registry: Istio's standard metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: HistogramFamily<RequestLabels>,
    request_bytes: HistogramFamily<RequestLabels>,
    response_bytes: HistogramFamily<RequestLabels>,
    tcp_sent: Family<TcpLabels, Counter>,
    tcp_received: Family<TcpLabels, Counter>,
    tcp_opened: Family<TcpLabels, Counter>,
    tcp_closed: Family<TcpLabels, Counter>,
    /// Inbound connections refused before any request, by reason.
    inbound_refused: Family<Vec<(&'static str, &'static str)>, Counter>,
    request_handles: RwLock<FastMap<RequestLabels, RequestHandles>>,
    tcp_handles: RwLock<FastMap<TcpLabels, TcpHandles>>,
    labels: LabelCache,
    /// Per-version load for the control plane ([`crate::load_report`]).
    load: crate::load_report::LoadCells,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every Istio metric registered.
    pub fn new() -> Metrics {
        let histograms = || Family::new_with_constructor(envoy_histogram as fn() -> Histogram);
        let mut metrics = Metrics {
            requests: Family::default(),
            duration: histograms(),
            request_bytes: histograms(),
            response_bytes: histograms(),
            tcp_sent: Family::default(),
            tcp_received: Family::default(),
            tcp_opened: Family::default(),
            tcp_closed: Family::default(),
            inbound_refused: Family::default(),
            request_handles: RwLock::new(FastMap::default()),
            tcp_handles: RwLock::new(FastMap::default()),
            labels: LabelCache::new(),
            load: crate::load_report::LoadCells::new(),
            registry: Registry::default(),
        };
        // prometheus-client appends `_total` to counter names.
        metrics.registry.register("istio_requests", "Requests handled by the proxy", metrics.requests.clone());
        metrics.registry.register(
            "istio_request_duration_milliseconds",
            "Request duration in milliseconds",
            metrics.duration.clone(),
        );
        metrics.registry.register("istio_request_bytes", "Request body sizes in bytes", metrics.request_bytes.clone());
        metrics.registry.register(
            "istio_response_bytes",
            "Response body sizes in bytes",
            metrics.response_bytes.clone(),
        );
        metrics.registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent downstream on TCP connections (response direction)",
            metrics.tcp_sent.clone(),
        );
        metrics.registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from downstream on TCP connections (request direction)",
            metrics.tcp_received.clone(),
        );
        metrics.registry.register("istio_tcp_connections_opened", "TCP connections opened", metrics.tcp_opened.clone());
        metrics.registry.register("istio_tcp_connections_closed", "TCP connections closed", metrics.tcp_closed.clone());
        metrics.registry.register(
            "serin_inbound_connections_refused",
            "Inbound connections refused before any request (PeerAuthentication, TLS handshake)",
            metrics.inbound_refused.clone(),
        );
        metrics
    }

    /// The per-version load counted for the control plane's load reports.
    pub fn load(&self) -> &crate::load_report::LoadCells {
        &self.load
    }

    /// Records one finished HTTP request or gRPC call.
    pub fn record_request(&self, local: &LocalWorkload, info: &RequestInfo) {
        let (source, destination) =
            self.labels.peers(info.reporter, local, info.cluster.as_ref(), info.upstream.as_ref(), info.peer.as_ref());
        let labels = RequestLabels {
            reporter: ReporterLabel(info.reporter),
            source,
            destination,
            request_protocol: if info.is_grpc { Protocol::Grpc } else { Protocol::Http },
            response_code: info.status,
            grpc_response_status: if info.is_grpc { info.grpc_status } else { None },
            response_flags: FlagsLabel(info.flags),
            connection_security_policy: SecurityPolicy::for_reporter(info.reporter, info.peer.is_some()),
        };
        let record = |h: &RequestHandles| {
            h.requests.inc();
            h.duration.observe(info.duration.as_secs_f64() * 1000.0);
            h.request_bytes.observe(info.bytes_received as f64);
            h.response_bytes.observe(info.bytes_sent as f64);
            if let Some(cell) = &h.load {
                self.load.record(cell, info);
            }
        };
        {
            let cache = self.request_handles.read().unwrap_or_else(|e| e.into_inner());
            if let Some(handles) = cache.get(&labels) {
                return record(handles);
            }
        }
        let handles = RequestHandles {
            requests: self.requests.get_or_create_owned(&labels),
            duration: self.duration.get_or_create_owned(&labels),
            request_bytes: self.request_bytes.get_or_create_owned(&labels),
            response_bytes: self.response_bytes.get_or_create_owned(&labels),
            load: self.load.cell_for(info),
        };
        record(&handles);
        self.request_handles.write().unwrap_or_else(|e| e.into_inner()).insert(labels, handles);
    }

    fn tcp(&self, local: &LocalWorkload, info: &TcpInfo) -> TcpHandles {
        let (source, destination) =
            self.labels.peers(info.reporter, local, info.cluster.as_ref(), info.endpoint.as_ref(), None);
        let labels = TcpLabels {
            reporter: ReporterLabel(info.reporter),
            source,
            destination,
            request_protocol: Protocol::Tcp,
            response_flags: FlagsLabel(info.flags),
            connection_security_policy: SecurityPolicy::for_reporter(info.reporter, false),
        };
        {
            let cache = self.tcp_handles.read().unwrap_or_else(|e| e.into_inner());
            if let Some(handles) = cache.get(&labels) {
                return handles.clone();
            }
        }
        let handles = TcpHandles {
            sent: self.tcp_sent.get_or_create_owned(&labels),
            received: self.tcp_received.get_or_create_owned(&labels),
            opened: self.tcp_opened.get_or_create_owned(&labels),
            closed: self.tcp_closed.get_or_create_owned(&labels),
        };
        self.tcp_handles.write().unwrap_or_else(|e| e.into_inner()).insert(labels, handles.clone());
        handles
    }

    fn add_tcp_bytes(handles: &TcpHandles, info: &TcpInfo) {
        if info.sent_bytes > 0 {
            handles.sent.inc_by(info.sent_bytes);
        }
        if info.received_bytes > 0 {
            handles.received.inc_by(info.received_bytes);
        }
    }

    /// Counts a TCP connection as opened (and adds `info`'s bytes, usually 0).
    pub fn record_tcp_open(&self, local: &LocalWorkload, info: &TcpInfo) {
        let handles = self.tcp(local, info);
        handles.opened.inc();
        Self::add_tcp_bytes(&handles, info);
    }

    /// Adds `info`'s bytes (deltas since the last record) of an open connection.
    pub fn record_tcp_bytes(&self, local: &LocalWorkload, info: &TcpInfo) {
        Self::add_tcp_bytes(&self.tcp(local, info), info);
    }

    /// Counts a TCP connection as closed and adds `info`'s bytes not yet recorded.
    pub fn record_tcp_close(&self, local: &LocalWorkload, info: &TcpInfo) {
        let handles = self.tcp(local, info);
        Self::add_tcp_bytes(&handles, info);
        handles.closed.inc();
    }

    /// Counts a TCP connection as opened (with `info`'s bytes) and returns its
    /// metrics with the labels resolved once; dropping the result counts the close.
    pub fn tcp_connection(&self, local: &LocalWorkload, info: &TcpInfo) -> TcpConnectionMetrics {
        let handles = self.tcp(local, info);
        handles.opened.inc();
        Self::add_tcp_bytes(&handles, info);
        TcpConnectionMetrics { handles }
    }

    /// Counts an inbound connection refused for `reason` (`plaintext_strict`,
    /// `tls_disabled`, `tls_handshake`, `no_identity`, `no_spiffe_id`).
    pub fn inbound_refused(&self, reason: &'static str) {
        self.inbound_refused.get_or_create(&vec![("reason", reason)]).inc();
    }

    /// Prometheus text exposition (format 0.0.4, see [`CONTENT_TYPE`]) of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        if let Err(error) = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry) {
            tracing::error!(%error, "encoding metrics failed");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::SocketAddr;
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::snapshot::{EndpointRegistry, TrafficPolicy};

    /// One parsed sample line.
    #[derive(Debug)]
    pub(crate) struct Sample {
        pub name: String,
        pub labels: BTreeMap<String, String>,
        pub value: f64,
    }

    /// A small parser of the text format's sample lines (enough for these tests).
    pub(crate) fn parse_samples(text: &str) -> Vec<Sample> {
        let mut samples = Vec::new();
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
            let name_end = line.find(['{', ' ']).expect("sample name");
            let name = line[..name_end].to_string();
            let mut labels = BTreeMap::new();
            let mut chars = line[name_end..].chars().peekable();
            if chars.peek() == Some(&'{') {
                chars.next();
                loop {
                    let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
                    assert_eq!(chars.next(), Some('"'), "{line}");
                    let mut value = String::new();
                    loop {
                        match chars.next().expect("closing quote") {
                            '\\' => match chars.next().expect("escape") {
                                'n' => value.push('\n'),
                                other => value.push(other),
                            },
                            '"' => break,
                            other => value.push(other),
                        }
                    }
                    labels.insert(key, value);
                    match chars.next() {
                        Some(',') => continue,
                        Some('}') => break,
                        other => panic!("unexpected {other:?} in {line}"),
                    }
                }
            }
            let value = chars.collect::<String>().trim().parse().expect("numeric value");
            samples.push(Sample { name, labels, value });
        }
        samples
    }

    fn endpoint(registry: &EndpointRegistry, addr: &str, version: &str) -> Arc<Endpoint> {
        let addr: SocketAddr = addr.parse().expect("addr");
        Arc::new(Endpoint {
            addr,
            labels: vec![("app".into(), "payment".into()), ("version".into(), version.into())],
            workload: format!("payment-{version}"),
            namespace: "default".into(),
            service_account: None,
            state: registry.get_or_create(addr),
        })
    }

    fn cluster(endpoints: Vec<Arc<Endpoint>>, subset: &str) -> Arc<Cluster> {
        Arc::new(Cluster {
            name: format!("outbound|8080|{subset}|payment.default.svc.cluster.local"),
            service: Arc::new(ServiceInfo {
                host: "payment.default.svc.cluster.local".into(),
                name: "payment".into(),
                namespace: "default".into(),
                ports: vec![(8080, "HTTP".into())],
                addresses: Vec::new(),
            }),
            subset: Some(subset.into()),
            port: 8080,
            endpoints,
            policy: TrafficPolicy::default(),
            rr_cursor: Default::default(),
        })
    }

    fn info(reporter: Reporter, status: u16, millis: u64) -> RequestInfo {
        RequestInfo {
            reporter,
            start: SystemTime::now(),
            duration: Duration::from_millis(millis),
            method: http::Method::GET,
            path: "/pay".into(),
            protocol: "HTTP/1.1",
            authority: "payment:8080".into(),
            status,
            grpc_status: None,
            is_grpc: false,
            flags: ResponseFlags::NONE,
            bytes_received: 10,
            bytes_sent: 2000,
            route_name: Some("default".into()),
            cluster: None,
            upstream: None,
            attempts: 1,
            request_id: "abc".into(),
            user_agent: None,
            downstream_remote: "127.0.0.1:5000".parse().expect("addr"),
            peer: None,
        }
    }

    fn local() -> LocalWorkload {
        LocalWorkload {
            workload: "frontend".into(),
            namespace: "shop".into(),
            app: "frontend".into(),
            version: "v1".into(),
            principal: "unknown".into(),
        }
    }

    fn find<'a>(samples: &'a [Sample], name: &str, pairs: &[(&str, &str)]) -> Vec<&'a Sample> {
        samples
            .iter()
            .filter(|s| s.name == name && pairs.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
            .collect()
    }

    #[test]
    fn records_requests_with_istio_names_and_labels() {
        let metrics = Metrics::new();
        let registry = EndpointRegistry::default();
        let v1 = endpoint(&registry, "10.0.0.1:8080", "v1");
        let v2 = endpoint(&registry, "10.0.0.2:8080", "v2");
        let c1 = cluster(vec![v1.clone()], "v1");
        let c2 = cluster(vec![v2.clone()], "v2");
        let local = local();

        for _ in 0..3 {
            let mut i = info(Reporter::Source, 200, 7);
            i.cluster = Some(c1.clone());
            i.upstream = Some(v1.clone());
            metrics.record_request(&local, &i);
        }
        let mut i = info(Reporter::Source, 503, 30);
        i.cluster = Some(c2.clone());
        i.upstream = Some(v2.clone());
        i.flags = ResponseFlags::UPSTREAM_CONNECT_FAILURE | ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED;
        metrics.record_request(&local, &i);
        // No route: nothing known about the destination.
        let mut i = info(Reporter::Source, 404, 0);
        i.flags = ResponseFlags::NO_ROUTE;
        metrics.record_request(&local, &i);
        // Inbound gRPC call.
        let mut i = info(Reporter::Destination, 200, 2);
        i.is_grpc = true;
        i.grpc_status = Some(14);
        metrics.record_request(&local, &i);

        let text = metrics.encode();
        let samples = parse_samples(&text);

        // Exact names, with TYPE lines naming the same families.
        assert!(text.contains("# TYPE istio_requests_total counter\n"), "{text}");
        assert!(text.contains("# TYPE istio_request_duration_milliseconds histogram\n"));
        assert!(text.contains("# TYPE istio_request_bytes histogram\n"));
        assert!(text.contains("# TYPE istio_response_bytes histogram\n"));
        assert!(!text.contains("_total_total"));
        assert!(!text.contains("# EOF"), "Prometheus text format, not OpenMetrics");

        let v1_ok = find(
            &samples,
            "istio_requests_total",
            &[("reporter", "source"), ("destination_version", "v1"), ("response_code", "200")],
        );
        assert_eq!(v1_ok.len(), 1, "{text}");
        let s = v1_ok[0];
        assert_eq!(s.value, 3.0);
        let expected: BTreeMap<&str, &str> = [
            ("reporter", "source"),
            ("source_workload", "frontend"),
            ("source_canonical_service", "frontend"),
            ("source_canonical_revision", "v1"),
            ("source_workload_namespace", "shop"),
            ("source_principal", "unknown"),
            ("source_app", "frontend"),
            ("source_version", "v1"),
            ("destination_workload", "payment-v1"),
            ("destination_workload_namespace", "default"),
            ("destination_principal", "unknown"),
            ("destination_app", "payment"),
            ("destination_version", "v1"),
            ("destination_service", "payment.default.svc.cluster.local"),
            ("destination_canonical_service", "payment"),
            ("destination_canonical_revision", "v1"),
            ("destination_service_name", "payment"),
            ("destination_service_namespace", "default"),
            ("request_protocol", "http"),
            ("response_code", "200"),
            ("grpc_response_status", ""),
            ("response_flags", "-"),
            ("connection_security_policy", "unknown"),
        ]
        .into_iter()
        .collect();
        let got: BTreeMap<&str, &str> = s.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(got, expected);

        let failed = find(&samples, "istio_requests_total", &[("destination_version", "v2"), ("response_code", "503")]);
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].labels["response_flags"], "UF,URX");

        let no_route = find(&samples, "istio_requests_total", &[("response_flags", "NR")]);
        assert_eq!(no_route.len(), 1);
        assert_eq!(no_route[0].labels["destination_service"], "unknown");
        assert_eq!(no_route[0].labels["destination_version"], "unknown");
        assert_eq!(no_route[0].labels["response_code"], "404");

        let inbound = find(&samples, "istio_requests_total", &[("reporter", "destination")]);
        assert_eq!(inbound.len(), 1);
        let l = &inbound[0].labels;
        assert_eq!(l["request_protocol"], "grpc");
        assert_eq!(l["grpc_response_status"], "14");
        assert_eq!(l["destination_workload"], "frontend");
        assert_eq!(l["destination_workload_namespace"], "shop");
        assert_eq!(l["destination_version"], "v1");
        assert_eq!(l["source_workload"], "unknown");
        assert_eq!(l["connection_security_policy"], "none");

        // Histogram: Envoy's buckets + Inf, cumulative, with _sum and _count.
        let buckets = find(
            &samples,
            "istio_request_duration_milliseconds_bucket",
            &[("destination_version", "v1"), ("reporter", "source")],
        );
        let les: Vec<&str> = buckets.iter().map(|s| s.labels["le"].as_str()).collect();
        assert_eq!(
            les,
            [
                "0.5", "1", "5", "10", "25", "50", "100", "250", "500", "1000", "2500", "5000", "10000", "30000",
                "60000", "300000", "600000", "1.8e+06", "3.6e+06", "+Inf"
            ]
        );
        let counts: Vec<f64> = buckets.iter().map(|s| s.value).collect();
        assert_eq!(counts[..3], [0.0, 0.0, 0.0]); // 7 ms > 5
        assert!(counts[3..].iter().all(|c| *c == 3.0));
        let sum = find(
            &samples,
            "istio_request_duration_milliseconds_sum",
            &[("destination_version", "v1"), ("reporter", "source")],
        );
        assert_eq!(sum.len(), 1);
        assert!((sum[0].value - 21.0).abs() < 1e-9);
        let count = find(
            &samples,
            "istio_request_duration_milliseconds_count",
            &[("destination_version", "v1"), ("reporter", "source")],
        );
        assert_eq!(count[0].value, 3.0);
        let resp = find(&samples, "istio_response_bytes_sum", &[("destination_version", "v1"), ("reporter", "source")]);
        assert_eq!(resp[0].value, 6000.0);
        let req = find(&samples, "istio_request_bytes_count", &[("destination_version", "v2")]);
        assert_eq!(req[0].value, 1.0);
        assert!(!samples.iter().any(|s| s.name == "istio_request_duration_milliseconds_bucket"
            && s.labels.contains_key("le")
            && s.labels.len() != 24));
    }

    #[test]
    fn equal_endpoints_share_one_series() {
        // Two snapshots' Endpoint objects with the same content must not produce
        // duplicate series (interning by content).
        let metrics = Metrics::new();
        let registry = EndpointRegistry::default();
        let local = local();
        for _ in 0..2 {
            let ep = endpoint(&registry, "10.0.0.1:8080", "v1");
            let c = cluster(vec![ep.clone()], "v1");
            let mut i = info(Reporter::Source, 200, 1);
            i.cluster = Some(c);
            i.upstream = Some(ep);
            metrics.record_request(&local, &i);
        }
        let samples = parse_samples(&metrics.encode());
        let total = find(&samples, "istio_requests_total", &[]);
        assert_eq!(total.len(), 1);
        assert_eq!(total[0].value, 2.0);
    }

    #[test]
    fn records_tcp_connections() {
        let metrics = Metrics::new();
        let registry = EndpointRegistry::default();
        let ep = endpoint(&registry, "10.0.0.3:5432", "v2");
        let local = local();
        let mut tcp = TcpInfo::new(Reporter::Source);
        tcp.cluster = Some(cluster(vec![ep.clone()], "v2"));
        tcp.endpoint = Some(ep);
        {
            let conn = metrics.tcp_connection(&local, &tcp);
            conn.add_sent(100);
            conn.add_received(40);
        }
        metrics.record_tcp_open(&local, &tcp);
        metrics.record_tcp_close(&local, &TcpInfo { sent_bytes: 5, received_bytes: 6, ..tcp.clone() });

        let samples = parse_samples(&metrics.encode());
        let get = |name: &str| {
            let found = find(&samples, name, &[("request_protocol", "tcp"), ("destination_version", "v2")]);
            assert_eq!(found.len(), 1, "{name}");
            assert!(!found[0].labels.contains_key("response_code"));
            assert!(!found[0].labels.contains_key("grpc_response_status"));
            found[0].value
        };
        assert_eq!(get("istio_tcp_connections_opened_total"), 2.0);
        assert_eq!(get("istio_tcp_connections_closed_total"), 2.0);
        assert_eq!(get("istio_tcp_sent_bytes_total"), 105.0);
        assert_eq!(get("istio_tcp_received_bytes_total"), 46.0);
    }

    /// `promtool check metrics` accepts the output (skipped, loudly, when promtool
    /// is not installed: Debian package `prometheus`; under CI, or with
    /// SERIN_REQUIRE_PROMTOOL=1, its absence is a failure).
    #[test]
    fn promtool_accepts_output() {
        use std::io::Write;
        use std::process::{Command, Stdio};

        let metrics = Metrics::new();
        let registry = EndpointRegistry::default();
        let ep = endpoint(&registry, "10.0.0.1:8080", "v1");
        let mut i = info(Reporter::Source, 200, 12);
        i.cluster = Some(cluster(vec![ep.clone()], "v1"));
        i.upstream = Some(ep.clone());
        metrics.record_request(&local(), &i);
        let mut tcp = TcpInfo::new(Reporter::Destination);
        tcp.sent_bytes = 3;
        metrics.record_tcp_open(&local(), &tcp);
        let text = metrics.encode();

        let child = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match child {
            Ok(child) => child,
            Err(e) => {
                let required = std::env::var_os("CI").is_some() || std::env::var_os("SERIN_REQUIRE_PROMTOOL").is_some();
                assert!(!required, "promtool not runnable (CI installs Debian package `prometheus`): {e}");
                eprintln!("SKIPPED: promtool not installed (apt-get install prometheus): {e}");
                return;
            }
        };
        child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("write to promtool");
        let out = child.wait_with_output().expect("promtool output");
        let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        // Exit 1: the text does not parse. Exit 3: it parses, with lint findings;
        // the only one allowed is the unit of Istio's own (fixed) metric name.
        let allowed = "istio_request_duration_milliseconds use base unit \"seconds\" instead of \"milliseconds\"";
        let findings: Vec<&str> = report.lines().filter(|l| !l.trim().is_empty() && *l != allowed).collect();
        assert!(
            matches!(out.status.code(), Some(0 | 3)) && findings.is_empty(),
            "promtool rejected the output ({:?}): {findings:?}",
            out.status
        );
    }
}
