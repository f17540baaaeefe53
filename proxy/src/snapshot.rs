//! The compiled, immutable routing snapshot: the only thing the request path reads.
//!
//! `config::compile` turns validated Istio resources into a [`Snapshot`]; the sidecar
//! publishes it with one `ArcSwap` store. Runtime state that must outlive a reload
//! (connection pools, outlier ejection, active-request counts) lives in
//! [`EndpointState`], shared across snapshots through the [`EndpointRegistry`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use http::{HeaderName, HeaderValue, StatusCode};

use crate::security::SecurityPolicies;
pub use crate::upstream::endpoint::{EndpointRegistry, EndpointState};

/// One compiled configuration, swapped atomically as a whole.
#[derive(Debug)]
pub struct Snapshot {
    /// Version label: a content hash or the control plane's version.
    pub version: String,
    /// Where it came from, e.g. `file:/etc/serin` or `control-plane:host:15010`.
    pub source: String,
    /// When it was compiled.
    pub created: SystemTime,
    /// Virtual hosts in precedence order (exact domains before wildcards is the
    /// lookup's job, see [`Snapshot::find_virtual_host`]).
    pub virtual_hosts: Vec<VirtualHost>,
    /// Every cluster (service + subset + port) by its Istio name
    /// (`outbound|8080|v1|payment.default.svc.cluster.local`).
    pub clusters: HashMap<String, Arc<Cluster>>,
    /// Services known from the registry by FQDN, also used for hosts without a
    /// VirtualService (a default route to the whole service).
    pub services: HashMap<String, Arc<ServiceInfo>>,
    /// PeerAuthentication and AuthorizationPolicy, compiled (none by default:
    /// PERMISSIVE, everything allowed). See [`crate::security`].
    pub security: SecurityPolicies,
}

/// A host name pattern of a VirtualService or a registry service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// An exact, lower-case name (`payment`, `payment.default.svc.cluster.local`).
    Exact(String),
    /// `*.example.com`, stored as the suffix `.example.com`.
    Suffix(String),
    /// `*`.
    Any,
}

/// The routes that serve a set of host names (one VirtualService, or the implicit
/// default route of a registry service).
#[derive(Debug)]
pub struct VirtualHost {
    /// `namespace/name` of the VirtualService, or `service:<fqdn>` for an implicit one.
    pub name: String,
    /// All names this host answers to, including short and FQDN forms.
    pub domains: Vec<HostPattern>,
    /// HTTP routes, first match wins.
    pub routes: Vec<Route>,
}

/// One `http[]` entry of a VirtualService.
#[derive(Debug)]
pub struct Route {
    /// The route's `name`, or `<vs>/<index>` when it has none.
    pub name: String,
    /// OR of matches; an empty list matches every request.
    pub matches: Vec<RequestMatch>,
    pub action: RouteAction,
    /// Route timeout; `None` = no timeout (Istio's default).
    pub timeout: Option<Duration>,
    pub retry: RetryPolicy,
    pub fault: Option<Fault>,
    /// Route-level header operations.
    pub headers: HeaderOps,
    pub rewrite: Option<Rewrite>,
    pub mirror: Option<Mirror>,
}

/// Istio's `StringMatch`.
#[derive(Debug, Clone)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    /// RE2-style, anchored to the whole string at compile time.
    Regex(regex::Regex),
}

/// One `HTTPMatchRequest`: all present fields must match.
#[derive(Debug, Clone, Default)]
pub struct RequestMatch {
    pub uri: Option<StringMatch>,
    /// `ignoreUriCase`: for exact and prefix uri matches (compiled lower-case).
    pub ignore_uri_case: bool,
    pub scheme: Option<StringMatch>,
    pub method: Option<StringMatch>,
    pub authority: Option<StringMatch>,
    /// Header name (lower-case) and value match; `None` = presence only.
    pub headers: Vec<(HeaderName, Option<StringMatch>)>,
    /// Negated header matches: the request matches only if none of these does.
    pub without_headers: Vec<(HeaderName, Option<StringMatch>)>,
    /// Query parameter name and value match.
    pub query_params: Vec<(String, StringMatch)>,
    /// Port the request was addressed to.
    pub port: Option<u16>,
}

/// What a matched route does.
#[derive(Debug)]
pub enum RouteAction {
    /// Forward to weighted destinations.
    Forward(WeightedDestinations),
    /// `redirect`: answer with a redirect.
    Redirect(Redirect),
    /// `directResponse`: answer with a fixed status and body.
    Direct { status: StatusCode, body: bytes::Bytes },
}

/// The destinations of a route with their relative weights (0-weight ones dropped).
/// Build it with [`WeightedDestinations::new`], which precomputes the split.
#[derive(Debug)]
pub struct WeightedDestinations {
    /// At least one entry; weights > 0.
    pub destinations: Vec<RouteDestination>,
    /// Sum of the weights divided by their greatest common divisor.
    pub total: u64,
    /// Cumulative reduced weights: destination `i` owns `[cumulative[i-1], cumulative[i])`.
    pub cumulative: Vec<u64>,
    /// Step of the low-discrepancy sequence: coprime with `total`, near `total / φ`.
    pub stride: u64,
    /// Per-route pick counter for the exact split.
    pub counter: AtomicU64,
}

impl WeightedDestinations {
    /// Destinations with weight 0 are dropped. Returns `None` when none is left.
    pub fn new(destinations: Vec<RouteDestination>) -> Option<WeightedDestinations> {
        let destinations: Vec<RouteDestination> = destinations.into_iter().filter(|d| d.weight > 0).collect();
        let divisor = destinations.iter().fold(0u64, |g, d| gcd(g, u64::from(d.weight)));
        if divisor == 0 {
            return None;
        }
        let mut cumulative = Vec::with_capacity(destinations.len());
        let mut total = 0u64;
        for d in &destinations {
            total += u64::from(d.weight) / divisor;
            cumulative.push(total);
        }
        // Stepping through [0, total) by a stride coprime with it visits every slot
        // once per period, so each destination gets exactly its share per period,
        // and a stride near total/φ spreads the slots evenly within the period.
        let mut stride = ((total as f64) * 0.618_033_988_75).round().max(1.0) as u64;
        while gcd(stride, total) != 1 {
            stride += 1;
        }
        // Start at a random point of the period: every reload compiles a new
        // counter, and a fixed start would hand the same few slots to each short
        // run of requests between frequent reloads (a canary starved, or served
        // far above its share). Any `total` consecutive picks stay exact.
        let start = rand::random_range(0..total);
        Some(WeightedDestinations { destinations, total, cumulative, stride, counter: AtomicU64::new(start) })
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// One `route[]` entry.
#[derive(Debug)]
pub struct RouteDestination {
    pub cluster: Arc<Cluster>,
    pub weight: u32,
    /// Destination-level header operations (applied after the route's).
    pub headers: HeaderOps,
}

/// `redirect`.
#[derive(Debug, Clone)]
pub struct Redirect {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub scheme: Option<String>,
    pub port: Option<u16>,
    pub status: StatusCode,
}

/// `rewrite`.
#[derive(Debug, Clone, Default)]
pub struct Rewrite {
    /// Replaces the matched uri prefix (or the whole path for exact/regex matches).
    pub uri: Option<String>,
    pub authority: Option<String>,
}

/// `mirror` + `mirrorPercentage`.
#[derive(Debug)]
pub struct Mirror {
    pub cluster: Arc<Cluster>,
    /// 0.0..=100.0; 100 when `mirrorPercentage` is absent.
    pub percentage: f64,
}

/// `fault`.
#[derive(Debug, Clone, Default)]
pub struct Fault {
    /// Fixed delay and the percentage of requests that get it.
    pub delay: Option<(Duration, f64)>,
    /// HTTP status (or gRPC status when `grpc` is set) and the percentage.
    pub abort: Option<FaultAbort>,
}

/// `fault.abort`.
#[derive(Debug, Clone)]
pub struct FaultAbort {
    pub status: StatusCode,
    /// gRPC status code, for `grpcStatus` aborts.
    pub grpc_status: Option<u32>,
    pub percentage: f64,
}

/// `headers.request` / `headers.response`.
#[derive(Debug, Clone, Default)]
pub struct HeaderOps {
    pub request: HeaderEdits,
    pub response: HeaderEdits,
}

/// `set` / `add` / `remove` on one direction.
#[derive(Debug, Clone, Default)]
pub struct HeaderEdits {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

/// Retry conditions (`retryOn`), Envoy's names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetryOn {
    pub server_error_5xx: bool,
    pub gateway_error: bool,
    pub connect_failure: bool,
    pub reset: bool,
    pub retriable_4xx: bool,
    pub refused_stream: bool,
    /// gRPC `unavailable` (14) / `cancelled` (1) in the response trailers or headers.
    pub grpc_unavailable: bool,
    pub grpc_cancelled: bool,
}

/// `retries`; without a `retries` block Istio's default applies (2 attempts on
/// connect-failure, refused-stream, unavailable, cancelled).
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Retries after the first try (0 disables).
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub retry_on: RetryOn,
    /// Extra status codes to retry (integers in `retryOn`).
    pub retriable_status_codes: Vec<u16>,
    /// Base of the exponential backoff between tries (25 ms).
    pub backoff_base: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 2,
            per_try_timeout: None,
            retry_on: RetryOn {
                connect_failure: true,
                refused_stream: true,
                grpc_unavailable: true,
                grpc_cancelled: true,
                ..RetryOn::default()
            },
            retriable_status_codes: Vec::new(),
            backoff_base: Duration::from_millis(25),
        }
    }
}

/// A registry service (ServiceEntry host) and its namespace.
#[derive(Debug, Clone)]
pub struct ServiceInfo {
    /// FQDN, e.g. `payment.default.svc.cluster.local`.
    pub host: String,
    /// Short name, e.g. `payment`.
    pub name: String,
    pub namespace: String,
    /// Port number → protocol name (`HTTP`, `HTTP2`, `GRPC`, `TCP`, …) from the ServiceEntry.
    pub ports: Vec<(u16, String)>,
    /// The service's virtual addresses (ServiceEntry `addresses`): a connection
    /// captured on its way to one of them, on one of `ports`, is for this service.
    pub addresses: Vec<crate::security::IpBlock>,
}

impl ServiceInfo {
    /// The declared protocol of `port` (upper case), if the service has that port.
    pub fn protocol(&self, port: u16) -> Option<&str> {
        self.ports.iter().find(|(p, _)| *p == port).map(|(_, proto)| proto.as_str())
    }
}

/// A cluster: the endpoints of one service subset on one port, with their policy.
#[derive(Debug)]
pub struct Cluster {
    /// Istio's name: `outbound|8080|v1|payment.default.svc.cluster.local`.
    pub name: String,
    pub service: Arc<ServiceInfo>,
    pub subset: Option<String>,
    pub port: u16,
    /// Endpoints whose labels match the subset.
    pub endpoints: Vec<Arc<Endpoint>>,
    pub policy: TrafficPolicy,
    /// Round-robin cursor for `ROUND_ROBIN`.
    pub rr_cursor: AtomicU64,
}

/// One endpoint (a WorkloadEntry or a ServiceEntry endpoint).
#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// Labels (`app`, `version`, …).
    pub labels: Vec<(String, String)>,
    /// Workload name (WorkloadEntry name, or the address when none).
    pub workload: String,
    pub namespace: String,
    /// `serviceAccount`, when the registry gives one.
    pub service_account: Option<String>,
    /// Shared runtime state (pool, ejection, counters), kept across reloads.
    pub state: Arc<EndpointState>,
}

impl Endpoint {
    /// The value of a label, if present.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// DestinationRule `trafficPolicy`, merged (subset over rule) and with defaults.
#[derive(Debug, Clone, Default)]
pub struct TrafficPolicy {
    pub load_balancer: LoadBalancer,
    /// `None` = outlier detection off (Istio's default without the block).
    pub outlier: Option<OutlierPolicy>,
    pub pool: ConnectionPool,
    /// DestinationRule `tls.mode`; `None` = not set (Istio's auto-mTLS decides).
    pub tls: Option<TlsMode>,
}

/// DestinationRule `trafficPolicy.tls.mode` (client side).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// `DISABLE`: plaintext to the upstream.
    Disable,
    /// `SIMPLE`: TLS origination (server certificate checked).
    Simple,
    /// `MUTUAL`: TLS with a client certificate given by the user.
    Mutual,
    /// `ISTIO_MUTUAL`: mesh mTLS with the workload's certificate.
    IstioMutual,
}

/// `loadBalancer`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum LoadBalancer {
    /// Istio's default.
    #[default]
    LeastRequest,
    RoundRobin,
    Random,
    /// `consistentHash`.
    ConsistentHash(HashKey),
}

/// What `consistentHash` hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    Header(HeaderName),
    Cookie(String),
    SourceIp,
    QueryParam(String),
}

/// `outlierDetection`.
#[derive(Debug, Clone)]
pub struct OutlierPolicy {
    /// 0 = disabled for 5xx (default 5 when the block is present).
    pub consecutive_5xx: u32,
    /// 0 = off (default).
    pub consecutive_gateway_errors: u32,
    pub interval: Duration,
    pub base_ejection_time: Duration,
    /// Percent of a cluster's endpoints that may be ejected at once.
    pub max_ejection_percent: u32,
}

impl Default for OutlierPolicy {
    fn default() -> Self {
        OutlierPolicy {
            consecutive_5xx: 5,
            consecutive_gateway_errors: 0,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 10,
        }
    }
}

/// `connectionPool`.
#[derive(Debug, Clone)]
pub struct ConnectionPool {
    /// `tcp.maxConnections` per endpoint.
    pub max_connections: u32,
    /// `tcp.connectTimeout` (10 s).
    pub connect_timeout: Duration,
    /// `http.http1MaxPendingRequests`: requests waiting for a connection.
    pub max_pending_requests: u32,
    /// `http.maxRequestsPerConnection` (0 = unlimited).
    pub max_requests_per_connection: u32,
    /// `http.idleTimeout` (1 h).
    pub idle_timeout: Duration,
    /// `tcp.idleTimeout` (1 h; zero: never): an opaque TCP connection with no
    /// bytes either way for this long is closed.
    pub tcp_idle_timeout: Duration,
    /// `http.h2UpgradePolicy`: `Some(true)` for `UPGRADE` (HTTP/1.1 requests go
    /// upstream as HTTP/2), `Some(false)` for `DO_NOT_UPGRADE`, `None` for `DEFAULT`
    /// or unset: the adaptive hop between sidecars (`mesh_tls::mesh_protocol`), the
    /// port's protocol to plaintext upstreams.
    pub h2_upgrade: Option<bool>,
    /// `http.useClientProtocol`: the upstream connection speaks the client's
    /// HTTP version, whatever the port declares (and no upgrade).
    pub use_client_protocol: bool,
}

impl Default for ConnectionPool {
    fn default() -> Self {
        ConnectionPool {
            max_connections: u32::MAX,
            connect_timeout: Duration::from_secs(10),
            max_pending_requests: u32::MAX,
            max_requests_per_connection: 0,
            idle_timeout: Duration::from_secs(3600),
            tcp_idle_timeout: crate::idle::DEFAULT_IDLE_TIMEOUT,
            h2_upgrade: None,
            use_client_protocol: false,
        }
    }
}

impl HostPattern {
    /// Whether `host` (lower-case, without port) matches this pattern.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(name) => name == host,
            HostPattern::Suffix(suffix) => host.len() > suffix.len() && host.ends_with(suffix.as_str()),
            HostPattern::Any => true,
        }
    }
}

impl Snapshot {
    /// An empty snapshot (no routes): every request gets 404 NR.
    pub fn empty(source: &str) -> Snapshot {
        Snapshot {
            version: "0".into(),
            source: source.into(),
            created: SystemTime::now(),
            virtual_hosts: Vec::new(),
            clusters: HashMap::new(),
            services: HashMap::new(),
            security: SecurityPolicies::default(),
        }
    }

    /// The virtual host for a request's host (lower-case, port stripped): exact
    /// names first, then the longest wildcard suffix, then `*`.
    pub fn find_virtual_host(&self, host: &str) -> Option<&VirtualHost> {
        let mut best: Option<(&VirtualHost, usize)> = None;
        for vh in &self.virtual_hosts {
            for domain in &vh.domains {
                let rank = match domain {
                    HostPattern::Exact(name) if name == host => usize::MAX,
                    HostPattern::Suffix(s) if domain.matches(host) => s.len(),
                    HostPattern::Any => 0,
                    _ => continue,
                };
                if best.is_none_or(|(_, r)| rank > r) {
                    best = Some((vh, rank));
                }
            }
        }
        best.map(|(vh, _)| vh)
    }

    /// The service a captured connection was addressed to: one whose virtual
    /// addresses hold `dst`'s IP and which has `dst`'s port.
    pub fn service_by_addr(&self, dst: SocketAddr) -> Option<&Arc<ServiceInfo>> {
        self.services
            .values()
            .find(|s| s.protocol(dst.port()).is_some() && s.addresses.iter().any(|b| b.contains(dst.ip())))
    }
}
