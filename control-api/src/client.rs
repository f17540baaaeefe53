//! Clients of the control plane: [`subscribe`] for sidecars (one discovery stream,
//! ACK/NACK, reconnects with capped exponential backoff and jitter) and
//! [`ManagementClient`], [`CanaryClient`] and [`LoadClient`] for `serin ctl`. A
//! subscription can also send the sidecar's load reports ([`LoadReports`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::pb;
use crate::server::MAX_REPORT_ENTRIES;
use crate::transport::Transport;
use crate::types::{MAX_MESSAGE_SIZE, ResourceType, YAML_CONTENT_TYPE};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The control plane address is not a URI.
    #[error("{endpoint:?} is not a control plane address (like http://127.0.0.1:15010): {message}")]
    InvalidEndpoint {
        /// The address given.
        endpoint: String,
        /// Why it is not one.
        message: String,
    },
    /// The control plane cannot be reached.
    #[error("cannot reach the control plane at {endpoint}: {message}")]
    Connect {
        /// The address.
        endpoint: String,
        /// The transport error, with its causes.
        message: String,
    },
    /// The control plane answered with an error.
    #[error("{}", describe_status(.0))]
    Rpc(#[from] tonic::Status),
    /// TLS settings that cannot be used (roots, server name, scheme).
    #[error("TLS to the control plane: {message}")]
    Tls {
        /// What is wrong.
        message: String,
    },
    /// A bootstrap token that cannot be sent as gRPC metadata.
    #[error("the bootstrap token cannot be sent: it must be printable ASCII without spaces")]
    BadToken,
    /// A `SUBSET=PERCENT` argument that is not one.
    #[error("{arg:?}: {reason}")]
    BadWeight {
        /// The argument.
        arg: String,
        /// What is wrong.
        reason: String,
    },
}

fn describe_status(status: &tonic::Status) -> String {
    match status.code() {
        tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => status.message().to_string(),
        tonic::Code::Unavailable => format!("the control plane is unavailable: {}", status.message()),
        code => format!("{} ({code:?})", status.message()),
    }
}

/// An error and its causes on one line (`transport error: tcp connect error: Connection refused`).
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Parses an address (`http://host:port`, or `host:port` for plaintext) into an endpoint.
pub fn endpoint(address: &str) -> Result<Endpoint, ClientError> {
    let uri = if address.contains("://") { address.to_string() } else { format!("http://{address}") };
    Endpoint::from_shared(uri)
        .map_err(|e| ClientError::InvalidEndpoint { endpoint: address.to_string(), message: chain(&e) })
}

/// Parses `SUBSET=PERCENT` arguments (`v1=90 v2=10`) into weights.
pub fn parse_weights<S: AsRef<str>>(args: &[S]) -> Result<BTreeMap<String, u32>, ClientError> {
    let mut weights = BTreeMap::new();
    for arg in args {
        let arg = arg.as_ref();
        let bad = |reason: &str| ClientError::BadWeight { arg: arg.to_string(), reason: reason.to_string() };
        let (subset, weight) = arg.split_once('=').ok_or_else(|| bad("expected SUBSET=PERCENT, like v1=90"))?;
        if subset.trim().is_empty() {
            return Err(bad("no subset name before '='"));
        }
        let weight: u32 = weight.trim().parse().map_err(|_| bad("the weight is not a whole number from 0 to 100"))?;
        if weight > 100 {
            return Err(bad("a percentage is at most 100"));
        }
        if weights.insert(subset.trim().to_string(), weight).is_some() {
            return Err(bad("that subset is named twice"));
        }
    }
    Ok(weights)
}

// ----------------------------------------------------------------------------------
// Sidecar subscription
// ----------------------------------------------------------------------------------

/// One resource as received: one Istio document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedResource {
    /// `Kind/namespace/name`.
    pub name: String,
    /// The document's YAML.
    pub yaml: String,
}

/// The resources of one type and their version.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TypeConfig {
    /// The version the control plane gave them.
    pub version: String,
    /// The resources, in the control plane's order.
    pub resources: Vec<ReceivedResource>,
}

/// Everything received, per type.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConfigState {
    /// Per type.
    pub types: BTreeMap<ResourceType, TypeConfig>,
}

impl ConfigState {
    /// The version of each type.
    pub fn versions(&self) -> BTreeMap<ResourceType, String> {
        self.types.iter().map(|(t, c)| (*t, c.version.clone())).collect()
    }

    /// Every document, types in push order (clusters, endpoints, routes, policies).
    pub fn documents(&self) -> impl Iterator<Item = &ReceivedResource> {
        ResourceType::ALL.into_iter().filter_map(|t| self.types.get(&t)).flat_map(|c| c.resources.iter())
    }

    /// Every document as one YAML stream, each starting with `---`.
    pub fn yaml(&self) -> String {
        let mut out = String::new();
        for doc in self.documents() {
            let body = doc.yaml.strip_prefix("---\n").unwrap_or(&doc.yaml);
            out.push_str("---\n");
            out.push_str(body);
            if !body.ends_with('\n') {
                out.push('\n');
            }
        }
        out
    }

    /// A version string for the whole state, like `clusters=3,endpoints=1,routes=7,policies=1`.
    pub fn version(&self) -> String {
        self.types.iter().map(|(t, c)| format!("{t}={}", c.version)).collect::<Vec<_>>().join(",")
    }
}

/// What the handler is asked to apply.
#[derive(Debug)]
pub struct Update<'a> {
    /// The types whose content changed.
    pub changed: &'a [ResourceType],
    /// The whole state to apply: the last accepted state with the changes on top.
    pub state: &'a ConfigState,
}

/// Applies updates. `Ok` → the update is ACKed and becomes the accepted state;
/// `Err(reason)` → NACKed with the reason, and the accepted state stays as it was.
///
/// Apply the whole state (validate and compile, then swap) before returning `Ok`: an
/// ACK says "serving with it". Closures `FnMut(Update<'_>) -> Result<(), String>` are
/// handlers.
pub trait Handler: Send + 'static {
    /// Applies one update.
    fn apply(&mut self, update: Update<'_>) -> Result<(), String>;
}

impl<F> Handler for F
where
    F: FnMut(Update<'_>) -> Result<(), String> + Send + 'static,
{
    fn apply(&mut self, update: Update<'_>) -> Result<(), String> {
        self(update)
    }
}

/// How a subscription behaves.
#[derive(Debug, Clone)]
pub struct SubscribeOptions {
    /// The types to subscribe to (default: all four). The handler is first called once
    /// every one of them has arrived.
    pub types: Vec<ResourceType>,
    /// Services to get config for (short names or FQDNs); empty = all.
    pub resource_names: Vec<String>,
    /// First delay before reconnecting (default 100 ms); doubles on each failure.
    pub initial_backoff: Duration,
    /// Longest delay between reconnects (default 15 s).
    pub max_backoff: Duration,
    /// Time allowed for the TCP/HTTP2 connect (default 5 s).
    pub connect_timeout: Duration,
    /// Largest message accepted (default 4 MiB).
    pub max_message_size: usize,
    /// Where load reports come from, when the subscription sends them (default none).
    pub load_reports: Option<LoadReports>,
}

/// Takes the load of the interval just ended and resets it: `None` when no request
/// finished. Called from the subscription's task, so it should be quick.
pub type TakeLoadReport = Arc<dyn Fn() -> Option<pb::LoadReport> + Send + Sync>;

/// A subscription's load reporting: every `interval` it calls `take` and sends what it
/// returns on the open discovery stream, as requests with only `load_report` set (one
/// per [`MAX_REPORT_ENTRIES`] entries: a bigger report is split). A report taken while
/// no stream is open (or while the stream's queue is full) is dropped, not queued: each
/// report covers the interval it was taken in.
#[derive(Clone)]
pub struct LoadReports {
    /// How often a report is taken (must not be zero).
    pub interval: Duration,
    /// Takes one.
    pub take: TakeLoadReport,
}

impl std::fmt::Debug for LoadReports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadReports").field("interval", &self.interval).finish_non_exhaustive()
    }
}

impl Default for SubscribeOptions {
    fn default() -> SubscribeOptions {
        SubscribeOptions {
            types: ResourceType::ALL.to_vec(),
            resource_names: Vec::new(),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(5),
            max_message_size: MAX_MESSAGE_SIZE,
            load_reports: None,
        }
    }
}

/// Where a subscription stands (for `/config_dump`, readiness and logs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientStatus {
    /// The control plane address.
    pub endpoint: String,
    /// A stream is open and has received at least one response.
    pub connected: bool,
    /// The `control_plane` id of the last response.
    pub control_plane: String,
    /// The accepted version of each type.
    pub versions: BTreeMap<ResourceType, String>,
    /// Updates applied (ACKed after the handler accepted them).
    pub applied: u64,
    /// Streams opened so far.
    pub connects: u64,
    /// Why the last stream ended, or the last connect failed.
    pub last_error: Option<String>,
    /// The last NACK's reason.
    pub last_nack: Option<String>,
    /// Load reports sent on a stream.
    pub load_reports_sent: u64,
    /// Load reports dropped: taken while no stream was open, or its queue was full.
    pub load_reports_dropped: u64,
}

/// A running subscription. Dropping it leaves the task running; call
/// [`Subscription::shutdown`] to stop it.
#[derive(Debug)]
pub struct Subscription {
    status: watch::Receiver<ClientStatus>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Subscription {
    /// The subscription's status, updated as it goes.
    pub fn status(&self) -> watch::Receiver<ClientStatus> {
        self.status.clone()
    }

    /// Stops the subscription (closing its stream) and waits for the task to end.
    pub async fn shutdown(self) {
        self.stop.send_replace(true);
        let _ = self.task.await;
    }
}

/// Subscribes to every type of [`SubscribeOptions::default`] but `types` at `address`
/// (`http://host:15010`). See [`subscribe_with`]. Must be called inside a tokio runtime.
pub fn subscribe<H: Handler>(
    address: &str,
    node: pb::Node,
    types: &[ResourceType],
    handler: H,
) -> Result<Subscription, ClientError> {
    let options = SubscribeOptions { types: types.to_vec(), ..SubscribeOptions::default() };
    Ok(subscribe_with(endpoint(address)?, node, options, handler))
}

/// Starts a task that keeps a discovery stream to the control plane at `endpoint`
/// (configure TLS on it, if any): it sends one request per type, calls `handler` for
/// each change, ACKs or NACKs, and when the stream ends or cannot be opened, retries
/// after a capped exponential backoff with jitter, sending the versions it holds. It
/// keeps running (and the handler's last state stays in force) while the control plane
/// is down. Must be called inside a tokio runtime.
pub fn subscribe_with<H: Handler>(
    endpoint: Endpoint,
    node: pb::Node,
    options: SubscribeOptions,
    handler: H,
) -> Subscription {
    subscribe_with_transport(Transport::plaintext(endpoint), node, options, handler)
}

/// As [`subscribe_with`], over any [`Transport`] (TLS to the control plane's 15012 with a
/// client certificate read at each connect). Must be called inside a tokio runtime.
pub fn subscribe_with_transport<H: Handler>(
    transport: Transport,
    node: pb::Node,
    options: SubscribeOptions,
    handler: H,
) -> Subscription {
    let transport = transport.with_endpoint(|e| e.connect_timeout(options.connect_timeout).tcp_nodelay(true));
    let status = ClientStatus { endpoint: transport.endpoint().uri().to_string(), ..ClientStatus::default() };
    let (status_tx, status_rx) = watch::channel(status);
    let (stop, stop_rx) = watch::channel(false);
    let client = SubscriptionTask {
        transport,
        node,
        options,
        handler,
        status: status_tx,
        accepted: ConfigState::default(),
        backoff: Duration::ZERO,
        report_slot: Arc::new(Mutex::new(None)),
    };
    let task = tokio::spawn(client.run(stop_rx));
    Subscription { status: status_rx, stop, task }
}

struct SubscriptionTask<H> {
    transport: Transport,
    node: pb::Node,
    options: SubscribeOptions,
    handler: H,
    status: watch::Sender<ClientStatus>,
    accepted: ConfigState,
    backoff: Duration,
    /// The open stream's request queue, for the load reports; `None` between streams.
    report_slot: ReportSlot,
}

type ReportSlot = Arc<Mutex<Option<mpsc::Sender<pb::DiscoveryRequest>>>>;

fn lock_slot(slot: &ReportSlot) -> std::sync::MutexGuard<'_, Option<mpsc::Sender<pb::DiscoveryRequest>>> {
    // Writers replace the whole value: a poisoned lock still holds a usable one.
    slot.lock().unwrap_or_else(|e| e.into_inner())
}

/// Empties the slot when a stream ends (however its future ends).
struct ClearSlot(ReportSlot);

impl Drop for ClearSlot {
    fn drop(&mut self) {
        lock_slot(&self.0).take();
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Takes a report every interval and hands it to the open stream, if any.
async fn send_load_reports(reports: LoadReports, slot: ReportSlot, status: watch::Sender<ClientStatus>) {
    let interval = reports.interval.max(Duration::from_millis(10));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(report) = (reports.take)() else { continue };
        let tx = lock_slot(&slot).clone();
        let sent = tx.is_some_and(|tx| report_requests(report).all(|request| tx.try_send(request).is_ok()));
        status.send_modify(|s| {
            if sent {
                s.load_reports_sent += 1;
            } else {
                s.load_reports_dropped += 1;
            }
        });
    }
}

/// The requests carrying `report`: one per [`MAX_REPORT_ENTRIES`] entries (the most the
/// control plane takes in one), each with the report's interval.
fn report_requests(report: pb::LoadReport) -> impl Iterator<Item = pb::DiscoveryRequest> {
    let interval_ms = report.interval_ms;
    let mut loads = report.loads;
    let mut chunks = Vec::with_capacity(loads.len().div_ceil(MAX_REPORT_ENTRIES).max(1));
    while loads.len() > MAX_REPORT_ENTRIES {
        let rest = loads.split_off(MAX_REPORT_ENTRIES);
        chunks.push(std::mem::replace(&mut loads, rest));
    }
    chunks.push(loads);
    chunks.into_iter().map(move |loads| pb::DiscoveryRequest {
        load_report: Some(pb::LoadReport { interval_ms, loads }),
        ..pb::DiscoveryRequest::default()
    })
}

/// A response of a type waiting for the others to arrive (or for the handler).
struct Pending {
    config: TypeConfig,
    nonce: String,
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}

impl<H: Handler> SubscriptionTask<H> {
    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        self.backoff = self.options.initial_backoff;
        let _reports = self.options.load_reports.clone().map(|reports| {
            let task = send_load_reports(reports, Arc::clone(&self.report_slot), self.status.clone());
            AbortOnDrop(tokio::spawn(task))
        });
        loop {
            let error = tokio::select! {
                error = self.session() => error,
                () = stopped(&mut stop) => return,
            };
            tracing::warn!(endpoint = %self.transport.endpoint().uri(), "control plane stream: {error}");
            self.status.send_modify(|s| {
                s.connected = false;
                s.last_error = Some(error);
            });
            let delay = jitter(self.backoff);
            self.backoff = (self.backoff * 2).min(self.options.max_backoff);
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = stopped(&mut stop) => return,
            }
        }
    }

    /// One stream, until it ends; returns why.
    async fn session(&mut self) -> String {
        let uri = self.transport.endpoint().uri().to_string();
        let channel = match self.transport.connect().await {
            Ok(channel) => channel,
            Err(e) => return ClientError::Connect { endpoint: uri, message: chain(&e) }.to_string(),
        };
        let mut client = pb::discovery_client::DiscoveryClient::new(channel)
            .max_decoding_message_size(self.options.max_message_size)
            .max_encoding_message_size(self.options.max_message_size);
        let (tx, rx) = mpsc::channel(16);
        for (i, ty) in self.options.types.iter().enumerate() {
            let request = pb::DiscoveryRequest {
                node: (i == 0).then(|| self.node.clone()),
                type_url: ty.type_url().to_string(),
                version_info: self.accepted.types.get(ty).map(|c| c.version.clone()).unwrap_or_default(),
                resource_names: self.options.resource_names.clone(),
                ..pb::DiscoveryRequest::default()
            };
            if tx.send(request).await.is_err() {
                return "the request queue closed".to_string();
            }
        }
        let mut inbound = match client.stream(ReceiverStream::new(rx)).await {
            Ok(response) => response.into_inner(),
            Err(status) => return ClientError::Rpc(status).to_string(),
        };
        self.status.send_modify(|s| s.connects += 1);
        // Load reports go on this stream from now on, after the subscription requests.
        *lock_slot(&self.report_slot) = Some(tx.clone());
        let _clear = ClearSlot(Arc::clone(&self.report_slot));
        let mut pending: BTreeMap<ResourceType, Pending> = BTreeMap::new();
        // The newest config of each type received on this stream, applied or not:
        // after a rejected set, a push of one type completes the set with the others.
        let mut received: BTreeMap<ResourceType, TypeConfig> = BTreeMap::new();
        loop {
            let response = match inbound.message().await {
                Ok(Some(response)) => response,
                Ok(None) => return "the control plane ended the stream".to_string(),
                Err(status) => return ClientError::Rpc(status).to_string(),
            };
            // A response: the control plane is back, the backoff starts over.
            self.backoff = self.options.initial_backoff;
            self.status.send_modify(|s| {
                s.connected = true;
                s.control_plane.clone_from(&response.control_plane);
            });
            if let Err(error) = self.on_response(response, &mut pending, &mut received, &tx).await {
                return error;
            }
        }
    }

    /// Handles one response: decode, wait until every type has arrived, apply, answer.
    async fn on_response(
        &mut self,
        response: pb::DiscoveryResponse,
        pending: &mut BTreeMap<ResourceType, Pending>,
        received: &mut BTreeMap<ResourceType, TypeConfig>,
        tx: &mpsc::Sender<pb::DiscoveryRequest>,
    ) -> Result<(), String> {
        let ty = ResourceType::from_type_url(&response.type_url).filter(|t| self.options.types.contains(t));
        let decoded = match ty {
            None => Err(format!("type {:?} was not subscribed to", response.type_url)),
            Some(_) => decode(&response),
        };
        let (ty, config) = match (ty, decoded) {
            (Some(ty), Ok(config)) => (ty, config),
            (ty, Err(error)) => {
                // Answer at once; the other types are not held up by a bad one.
                let previous = ty.and_then(|t| self.accepted.types.get(&t)).map(|c| c.version.clone());
                let nack = answer(
                    &response.type_url,
                    previous.unwrap_or_default(),
                    response.nonce,
                    self.names(),
                    Some(&error),
                );
                self.status.send_modify(|s| s.last_nack = Some(error));
                return tx.send(nack).await.map_err(|_| "the stream closed".to_string());
            }
            (None, Ok(_)) => return Ok(()),
        };
        received.insert(ty, config.clone());
        pending.insert(ty, Pending { config, nonce: response.nonce });
        let complete =
            self.options.types.iter().all(|t| self.accepted.types.contains_key(t) || received.contains_key(t));
        if !complete {
            return Ok(());
        }
        let mut candidate = self.accepted.clone();
        let mut changed = Vec::new();
        for (t, config) in received.iter() {
            if self.accepted.types.get(t) != Some(config) {
                changed.push(*t);
            }
            candidate.types.insert(*t, config.clone());
        }
        let result = if changed.is_empty() {
            Ok(())
        } else {
            self.handler.apply(Update { changed: &changed, state: &candidate })
        };
        // The answers are built against the state before this update; the status is
        // published before they are sent, so whoever sees the ACK sees the status too.
        let names = self.names();
        let answers: Vec<pb::DiscoveryRequest> = std::mem::take(pending)
            .into_iter()
            .map(|(t, p)| match &result {
                Ok(()) => answer(t.type_url(), p.config.version, p.nonce, names.clone(), None),
                Err(error) => {
                    let previous = self.accepted.types.get(&t).map(|c| c.version.clone()).unwrap_or_default();
                    answer(t.type_url(), previous, p.nonce, names.clone(), Some(error))
                }
            })
            .collect();
        match result {
            Ok(()) => {
                let applied = !changed.is_empty();
                self.accepted = candidate;
                let versions = self.accepted.versions();
                self.status.send_modify(|s| {
                    s.versions = versions;
                    s.applied += u64::from(applied);
                });
            }
            Err(error) => {
                tracing::warn!("config from the control plane rejected: {error}");
                self.status.send_modify(|s| s.last_nack = Some(error));
            }
        }
        for request in answers {
            tx.send(request).await.map_err(|_| "the stream closed".to_string())?;
        }
        Ok(())
    }

    fn names(&self) -> Vec<String> {
        self.options.resource_names.clone()
    }
}

/// An ACK (`error` None) or NACK.
fn answer(
    type_url: &str,
    version: String,
    nonce: String,
    resource_names: Vec<String>,
    error: Option<&String>,
) -> pb::DiscoveryRequest {
    pb::DiscoveryRequest {
        node: None,
        type_url: type_url.to_string(),
        version_info: version,
        response_nonce: nonce,
        resource_names,
        error_detail: error.map(|e| pb::ErrorDetail { code: tonic::Code::InvalidArgument as i32, message: e.clone() }),
        load_report: None,
    }
}

/// The response's resources as documents; an error names the first bad one.
fn decode(response: &pb::DiscoveryResponse) -> Result<TypeConfig, String> {
    let mut resources = Vec::with_capacity(response.resources.len());
    for r in &response.resources {
        if !r.content_type.is_empty() && r.content_type != YAML_CONTENT_TYPE {
            return Err(format!("{}: content type {:?} is not {YAML_CONTENT_TYPE}", r.name, r.content_type));
        }
        if resources.iter().any(|x: &ReceivedResource| x.name == r.name) {
            return Err(format!("{} is in the response twice", r.name));
        }
        let yaml = String::from_utf8(r.body.clone()).map_err(|_| format!("{}: the body is not UTF-8", r.name))?;
        resources.push(ReceivedResource { name: r.name.clone(), yaml });
    }
    Ok(TypeConfig { version: response.version_info.clone(), resources })
}

/// A delay between `d/2` and `d` ("equal jitter"), so that sidecars cut off together do
/// not come back together.
fn jitter(d: Duration) -> Duration {
    let half = d / 2;
    let spread = u64::try_from(half.as_millis()).unwrap_or(u64::MAX);
    half + Duration::from_millis(if spread == 0 { 0 } else { rand::random_range(0..=spread) })
}

// ----------------------------------------------------------------------------------
// Management client
// ----------------------------------------------------------------------------------

/// The management API, as `serin ctl` uses it.
#[derive(Debug, Clone)]
pub struct ManagementClient {
    inner: pb::management_client::ManagementClient<Channel>,
}

fn wait_options(wait: Option<Duration>) -> Option<pb::WaitOptions> {
    wait.map(|d| pb::WaitOptions { timeout_ms: u32::try_from(d.as_millis()).unwrap_or(u32::MAX).max(1) })
}

impl ManagementClient {
    /// Connects to the control plane at `address` (`http://host:15010` or `host:port`).
    pub async fn connect(address: &str) -> Result<ManagementClient, ClientError> {
        Ok(ManagementClient::from_channel(connect_address(address).await?))
    }

    /// Connects over `transport` (plaintext or TLS).
    pub async fn connect_transport(transport: &Transport) -> Result<ManagementClient, ClientError> {
        Ok(ManagementClient::from_channel(open(transport).await?))
    }

    /// A client over an open channel (TLS, tests).
    pub fn from_channel(channel: Channel) -> ManagementClient {
        ManagementClient { inner: pb::management_client::ManagementClient::new(channel) }
    }

    /// Sets `service`'s split (percentages adding up to 100). With `wait`, returns once
    /// every subscribed sidecar answered, or the time passed (`ack` says which).
    pub async fn set_weights(
        &mut self,
        service: &str,
        weights: &BTreeMap<String, u32>,
        wait: Option<Duration>,
    ) -> Result<pb::ChangeResult, ClientError> {
        let request = pb::SetWeightsRequest {
            service: service.to_string(),
            weights: weights.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            wait: wait_options(wait),
        };
        Ok(self.inner.set_weights(request).await?.into_inner())
    }

    /// Sends all of `service`'s traffic to its stable subset.
    pub async fn rollback(&mut self, service: &str, wait: Option<Duration>) -> Result<pb::ChangeResult, ClientError> {
        let request = pb::RollbackRequest { service: service.to_string(), wait: wait_options(wait) };
        Ok(self.inner.rollback(request).await?.into_inner())
    }

    /// Drops the API's weights for `service`: the config folder's apply again.
    pub async fn reset_weights(
        &mut self,
        service: &str,
        wait: Option<Duration>,
    ) -> Result<pb::ChangeResult, ClientError> {
        let request = pb::ResetWeightsRequest { service: service.to_string(), wait: wait_options(wait) };
        Ok(self.inner.reset_weights(request).await?.into_inner())
    }

    /// Every connected sidecar and what it runs.
    pub async fn status(&mut self) -> Result<pb::Status, ClientError> {
        Ok(self.inner.get_status(pb::GetStatusRequest {}).await?.into_inner())
    }

    /// The config the control plane serves, for `service` ("" = all) and `ty` (None = all).
    pub async fn config(&mut self, service: &str, ty: Option<ResourceType>) -> Result<pb::Config, ClientError> {
        let request = pb::GetConfigRequest {
            service: service.to_string(),
            type_url: ty.map(|t| t.type_url().to_string()).unwrap_or_default(),
        };
        Ok(self.inner.get_config(request).await?.into_inner())
    }

    /// Waits until the sidecars subscribed to `ty` (and `service`, "" = all) answered `version`.
    pub async fn wait_for_ack(
        &mut self,
        ty: ResourceType,
        version: &str,
        service: &str,
        timeout: Duration,
    ) -> Result<pb::AckResult, ClientError> {
        let request = pb::WaitForAckRequest {
            type_url: ty.type_url().to_string(),
            version: version.to_string(),
            service: service.to_string(),
            timeout_ms: u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX).max(1),
        };
        Ok(self.inner.wait_for_ack(request).await?.into_inner())
    }
}

// ----------------------------------------------------------------------------------
// Canary client
// ----------------------------------------------------------------------------------

/// The canary analyses of the control plane, as `serin ctl canary` uses them.
#[derive(Debug, Clone)]
pub struct CanaryClient {
    inner: pb::canaries_client::CanariesClient<Channel>,
}

impl CanaryClient {
    /// Connects to the control plane at `address` (`http://host:15010` or `host:port`).
    pub async fn connect(address: &str) -> Result<CanaryClient, ClientError> {
        Ok(CanaryClient::from_channel(connect_address(address).await?))
    }

    /// Connects over `transport` (plaintext or TLS).
    pub async fn connect_transport(transport: &Transport) -> Result<CanaryClient, ClientError> {
        Ok(CanaryClient::from_channel(open(transport).await?))
    }

    /// A client over an open channel (TLS, tests).
    pub fn from_channel(channel: Channel) -> CanaryClient {
        CanaryClient { inner: pb::canaries_client::CanariesClient::new(channel) }
    }

    /// Starts an analysis (ALREADY_EXISTS when one runs on the service; a bad value is
    /// INVALID_ARGUMENT naming the field).
    pub async fn start(&mut self, spec: pb::CanarySpec) -> Result<pb::CanaryStatus, ClientError> {
        Ok(self.inner.start(pb::StartCanaryRequest { spec: Some(spec) }).await?.into_inner())
    }

    /// Where the service's latest analysis stands (NOT_FOUND when none).
    pub async fn get(&mut self, service: &str) -> Result<pb::CanaryStatus, ClientError> {
        Ok(self.inner.get(pb::GetCanaryRequest { service: service.to_string() }).await?.into_inner())
    }

    /// Every analysis, running and finished (the latest per service).
    pub async fn list(&mut self) -> Result<pb::CanaryList, ClientError> {
        Ok(self.inner.list(pb::ListCanariesRequest {}).await?.into_inner())
    }

    /// Stops the service's running analysis; with `rollback`, once the canary's
    /// weight 0 was applied and the sidecars answered.
    pub async fn abort(&mut self, service: &str, rollback: bool) -> Result<pb::CanaryStatus, ClientError> {
        let request = pb::AbortCanaryRequest { service: service.to_string(), rollback };
        Ok(self.inner.abort(request).await?.into_inner())
    }
}

// ----------------------------------------------------------------------------------
// Load client
// ----------------------------------------------------------------------------------

/// The control plane's per-version load figures (`GetLoad`), as `serin ctl load` and
/// dashboards read them.
#[derive(Debug, Clone)]
pub struct LoadClient {
    inner: pb::load_client::LoadClient<Channel>,
}

impl LoadClient {
    /// Connects to the control plane at `address` (`http://host:15010` or `host:port`).
    pub async fn connect(address: &str) -> Result<LoadClient, ClientError> {
        Ok(LoadClient::from_channel(connect_address(address).await?))
    }

    /// Connects over `transport` (plaintext or TLS).
    pub async fn connect_transport(transport: &Transport) -> Result<LoadClient, ClientError> {
        Ok(LoadClient::from_channel(open(transport).await?))
    }

    /// A client over an open channel (TLS, tests).
    pub fn from_channel(channel: Channel) -> LoadClient {
        LoadClient { inner: pb::load_client::LoadClient::new(channel) }
    }

    /// The figures of `service` (short name or FQDN; "" = every service) over the last
    /// `window` (None = 60 s; at most 15 minutes), with one point per second when
    /// `series` is set.
    pub async fn load(
        &mut self,
        service: &str,
        window: Option<Duration>,
        series: bool,
    ) -> Result<pb::LoadFigures, ClientError> {
        let window_ms = window.map_or(0, |w| u32::try_from(w.as_millis()).unwrap_or(u32::MAX).max(1));
        let request = pb::GetLoadRequest { service: service.to_string(), window_ms, series };
        Ok(self.inner.get_load(request).await?.into_inner())
    }
}

// ----------------------------------------------------------------------------------
// Certificate client
// ----------------------------------------------------------------------------------

/// Opens a plaintext channel to `address` (`http://host:15010` or `host:port`) with a
/// 5 s connect timeout; the error names the address.
async fn connect_address(address: &str) -> Result<Channel, ClientError> {
    let endpoint = endpoint(address)?.connect_timeout(Duration::from_secs(5));
    endpoint.connect().await.map_err(|e| ClientError::Connect { endpoint: address.to_string(), message: chain(&e) })
}

/// Opens a channel with a 5 s connect timeout; the error names the address.
async fn open(transport: &Transport) -> Result<Channel, ClientError> {
    let transport = transport.clone().with_endpoint(|e| e.connect_timeout(Duration::from_secs(5)));
    transport
        .connect()
        .await
        .map_err(|e| ClientError::Connect { endpoint: transport.endpoint().uri().to_string(), message: chain(&e) })
}

/// The control plane's certificate service, as a sidecar calls it to get and renew its
/// workload certificate.
#[derive(Debug, Clone)]
pub struct CertificateClient {
    inner: pb::certificates_client::CertificatesClient<Channel>,
    token: Option<String>,
}

impl CertificateClient {
    /// Connects over `transport`. Over TLS the client certificate the transport presents
    /// authenticates a renewal; a bootstrap token ([`CertificateClient::with_token`]) is
    /// needed for a first certificate, and for any certificate over plaintext.
    pub async fn connect(transport: &Transport) -> Result<CertificateClient, ClientError> {
        Ok(CertificateClient::from_channel(open(transport).await?))
    }

    /// A client over an open channel.
    pub fn from_channel(channel: Channel) -> CertificateClient {
        CertificateClient { inner: pb::certificates_client::CertificatesClient::new(channel), token: None }
    }

    /// Sends `token` as `authorization: Bearer TOKEN` with every request (`None`: no token).
    pub fn with_token(mut self, token: Option<String>) -> CertificateClient {
        self.token = token;
        self
    }

    /// Asks the CA to sign `csr_pem` for `validity` (zero = the server's default);
    /// `node_id` only goes to the control plane's logs.
    pub async fn create_certificate(
        &mut self,
        csr_pem: &str,
        validity: Duration,
        node_id: &str,
    ) -> Result<pb::CsrResponse, ClientError> {
        let mut request = tonic::Request::new(pb::CsrRequest {
            csr_pem: csr_pem.to_string(),
            validity_seconds: validity.as_secs(),
            node_id: node_id.to_string(),
        });
        if let Some(token) = &self.token {
            let value = tonic::metadata::MetadataValue::try_from(format!("Bearer {token}"))
                .map_err(|_| ClientError::BadToken)?;
            request.metadata_mut().insert(crate::server::AUTHORIZATION_METADATA, value);
        }
        Ok(self.inner.create_certificate(request).await?.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_parse_and_name_the_bad_argument() {
        let w = parse_weights(&["v1=90", "v2=10"]).expect("weights");
        assert_eq!(w.get("v1"), Some(&90));
        let e = parse_weights(&["v1=90", "v2"]).expect_err("no =").to_string();
        assert!(e.contains("\"v2\""), "{e}");
        let e = parse_weights(&["v1=x"]).expect_err("not a number").to_string();
        assert!(e.contains("whole number"), "{e}");
        assert!(parse_weights(&["v1=101"]).is_err());
        assert!(parse_weights(&["v1=50", "v1=50"]).is_err());
    }

    #[test]
    fn jitter_stays_within_half_and_whole() {
        for _ in 0..100 {
            let d = jitter(Duration::from_millis(800));
            assert!(d >= Duration::from_millis(400) && d <= Duration::from_millis(800), "{d:?}");
        }
        assert_eq!(jitter(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn big_load_reports_are_split_into_requests_the_control_plane_takes() {
        let entry = |i: usize| pb::VersionLoad { service: format!("s{i}"), status_2xx: 1, ..Default::default() };
        let report = |n: usize| pb::LoadReport { interval_ms: 1000, loads: (0..n).map(entry).collect() };
        let sizes = |n: usize| -> Vec<usize> {
            report_requests(report(n))
                .map(|r| {
                    let r = r.load_report.expect("report");
                    assert_eq!(r.interval_ms, 1000);
                    r.loads.len()
                })
                .collect()
        };
        assert_eq!(sizes(3), [3]);
        assert_eq!(sizes(MAX_REPORT_ENTRIES), [MAX_REPORT_ENTRIES]);
        assert_eq!(sizes(2_500), [1_000, 1_000, 500]);
        assert_eq!(sizes(10_000), [1_000; 10]);
        // In order, nothing lost.
        let names: Vec<String> = report_requests(report(2_001))
            .flat_map(|r| r.load_report.expect("report").loads)
            .map(|l| l.service)
            .collect();
        assert_eq!(names, (0..2_001).map(|i| format!("s{i}")).collect::<Vec<_>>());
    }

    #[test]
    fn endpoints_take_bare_host_port() {
        assert_eq!(endpoint("127.0.0.1:15010").expect("endpoint").uri().to_string(), "http://127.0.0.1:15010/");
        assert!(endpoint("http://exa mple:1").is_err());
    }
}
