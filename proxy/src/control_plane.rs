//! `serin control-plane`: holds the mesh's Istio config and serves it to the sidecars
//! over the discovery API, with the management API `serin ctl` calls.
//!
//! The config folder goes through the sidecar's own validate-and-compile path
//! ([`config::load_sources`] + [`config::compile`]) before the documents reach the
//! [`Store`]; a folder that does not compile is refused at start with every error,
//! and an invalid edit later is logged while the last good config keeps serving.
//! Weights set through the API live in the state folder (see the control-api README
//! for why they win over the folder). Metrics (connected sidecars, pushes, NACKs,
//! push-to-ACK latency, certificates signed and refused) are served on `--monitoring`
//! at `/metrics`.
//!
//! With `--ca-dir` (the mesh CA of `serin ca init`) the control plane also signs the
//! sidecars' CSRs and serves gRPC over TLS on `--listen-tls` (15012) with a serving
//! certificate it issues itself from that CA; every call there needs a mesh client
//! certificate or a bootstrap token (`--bootstrap-tokens`). See the control-api README.
//!
//! The dashboard ([`crate::dashboard`], `docs/dashboard.md`) is served on `--ui`
//! (default `127.0.0.1:15016`, `off` turns it off); its set-weight and rollback buttons
//! act only with `--admin-token-file`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serin_control_api::ResourceType;
use serin_control_api::pb;
use serin_control_api::server::{
    BootstrapTokens, CaSettings, ControlPlane, LoadStats, Observer, ServerOptions, SourceDocument, Store,
    parse_documents,
};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config;
use crate::reload::{POLL, fingerprint};
use crate::upstream::endpoint::EndpointRegistry;

/// Options of `serin control-plane`.
#[derive(Debug, Clone, clap::Args)]
pub struct ControlPlaneArgs {
    /// Folder of Istio YAML (`*.yaml`, `*.yml`) served to the sidecars; watched.
    #[arg(long)]
    pub config_dir: PathBuf,
    /// Folder for the state files (weights set through the API, versions; the canary
    /// analyses in `canaries.json`); created when missing.
    #[arg(long)]
    pub state_dir: PathBuf,
    /// gRPC listener (discovery and management), plaintext.
    #[arg(long, default_value = "0.0.0.0:15010")]
    pub listen: SocketAddr,
    /// Prometheus metrics (`/metrics`).
    #[arg(long, default_value = "0.0.0.0:15014")]
    pub monitoring: SocketAddr,
    /// How long a drain waits for the servers to stop.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// `--listen-tls`, `--ca-dir`, `--bootstrap-tokens`, `--trust-domain`, `--cert-ttl`,
    /// `--max-cert-ttl`: the mesh CA and the TLS listener.
    #[command(flatten)]
    pub security: SecurityArgs,
    /// `--ui`, `--admin-token-file`: the dashboard (see `docs/dashboard.md`).
    #[command(flatten)]
    pub dashboard: crate::dashboard::DashboardArgs,
}

/// The mesh CA and the TLS listener of `serin control-plane`.
#[derive(Debug, Clone, clap::Args)]
pub struct SecurityArgs {
    /// gRPC over TLS (discovery, management, certificates); every call needs a mesh client
    /// certificate or a bootstrap token. Served only with `--ca-dir`.
    #[arg(long, default_value = "0.0.0.0:15012")]
    pub listen_tls: SocketAddr,
    /// The mesh CA (`serin ca init`, or Istio's plug-in CA files): signs the sidecars'
    /// CSRs and the control plane's own serving certificate. Without it the TLS listener
    /// and certificate signing are off.
    #[arg(long, env = "SERIN_CA_DIR", value_name = "DIR")]
    pub ca_dir: Option<PathBuf>,
    /// Bootstrap tokens for a sidecar's first certificate: one `TOKEN NAMESPACE/SERVICE_ACCOUNT`
    /// (or `TOKEN *` for any identity) per line, `#` comments. Read at start.
    #[arg(long, value_name = "FILE")]
    pub bootstrap_tokens: Option<PathBuf>,
    /// Trust domain, when the CA's certificate does not name one (default cluster.local).
    #[arg(long)]
    pub trust_domain: Option<String>,
    /// Lifetime of a certificate whose CSR asks for none, and of the control plane's own.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub cert_ttl: Duration,
    /// Longest certificate lifetime granted; longer requests are cut to it.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub max_cert_ttl: Duration,
}

impl Default for SecurityArgs {
    /// The command line's defaults: no CA (so no TLS listener), 24 h certificates.
    fn default() -> SecurityArgs {
        SecurityArgs {
            listen_tls: SocketAddr::from(([0, 0, 0, 0], 15012)),
            ca_dir: None,
            bootstrap_tokens: None,
            trust_domain: None,
            cert_ttl: serin_certs::DEFAULT_WORKLOAD_LIFETIME,
            max_cert_ttl: serin_control_api::server::DEFAULT_MAX_CERT_TTL,
        }
    }
}

/// Loads the CA and the bootstrap tokens named by `args`; `None` without `--ca-dir`.
pub fn ca_settings(args: &SecurityArgs) -> anyhow::Result<Option<CaSettings>> {
    let Some(dir) = &args.ca_dir else {
        if args.bootstrap_tokens.is_some() {
            tracing::warn!("--bootstrap-tokens is unused without --ca-dir: nothing signs certificates");
        }
        return Ok(None);
    };
    let ca = serin_certs::Ca::load(dir).with_context(|| format!("--ca-dir {}", dir.display()))?;
    let mut settings = CaSettings::new(ca, args.trust_domain.as_deref()).context("--ca-dir")?;
    settings.max_ttl = args.max_cert_ttl;
    settings.default_ttl = args.cert_ttl.min(args.max_cert_ttl);
    settings.check().context("--cert-ttl / --max-cert-ttl")?;
    if let Some(path) = &args.bootstrap_tokens {
        settings.tokens = Arc::new(BootstrapTokens::load(path)?);
    }
    Ok(Some(settings))
}

/// A running control plane's bound addresses.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    /// The gRPC listener.
    pub listen: SocketAddr,
    /// The gRPC TLS listener, when the control plane has a CA.
    pub listen_tls: Option<SocketAddr>,
    /// The metrics listener.
    pub monitoring: SocketAddr,
    /// The dashboard, unless `--ui off` (or its address could not be bound).
    pub ui: Option<SocketAddr>,
}

/// A running control plane, as [`start`] returns it.
#[derive(Debug)]
pub struct Running {
    /// The bound addresses.
    pub bound: Bound,
    /// The store being served.
    pub store: Arc<Store>,
    stop: watch::Sender<bool>,
    server: JoinHandle<anyhow::Result<()>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Stops the servers and the folder watch; waits up to `deadline` for the gRPC server.
    pub async fn shutdown(self, deadline: Duration) -> anyhow::Result<()> {
        self.stop.send_replace(true);
        for task in &self.tasks {
            task.abort();
        }
        match tokio::time::timeout(deadline, self.server).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => Err(anyhow::anyhow!("the gRPC server task failed: {e}")),
            Err(_) => {
                tracing::warn!(?deadline, "drain deadline passed; exiting with streams open");
                Ok(())
            }
        }
    }
}

/// The config folder read and checked: the documents for the store and the
/// warnings worth logging.
#[derive(Debug)]
pub struct LoadedFolder {
    /// `(kind, "namespace/name", yaml)` of every document.
    pub documents: Vec<SourceDocument>,
    /// Warnings of loading (kinds accepted but not applied, …).
    pub warnings: Vec<String>,
    /// One line about what was loaded.
    pub summary: String,
}

/// Reads every `*.yaml` / `*.yml` file of `dir` (sorted, not recursive), validates
/// and compiles them as the sidecar does, and splits them into documents. The
/// error lists every problem found.
pub fn load_folder(dir: &Path) -> anyhow::Result<LoadedFolder> {
    let meta = std::fs::metadata(dir).with_context(|| format!("config folder {}", dir.display()))?;
    anyhow::ensure!(meta.is_dir(), "--config-dir {} is not a folder", dir.display());
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("config folder {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml") && p.is_file())
        .collect();
    files.sort();
    let mut sources = Vec::with_capacity(files.len());
    for file in files {
        let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        sources.push((file.display().to_string(), text));
    }
    // Canary documents (flagger.app) are the control plane's own: the store checks
    // them; the sidecar's config loader sees them as blank lines (line numbers kept).
    let istio: Vec<String> = sources.iter().map(|(_, t)| without_canaries(t)).collect();
    let texts: Vec<(&str, &str)> = sources.iter().zip(&istio).map(|((o, _), t)| (o.as_str(), t.as_str())).collect();
    let set = config::load_sources(&texts).map_err(|e| anyhow::anyhow!("{e}"))?;
    config::compile(&set, &EndpointRegistry::default(), "control-plane").map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut documents = Vec::new();
    for (origin, text) in &sources {
        documents.extend(parse_documents(text).map_err(|e| anyhow::anyhow!("{origin}: {e}"))?);
    }
    Ok(LoadedFolder { documents, warnings: set.warnings.clone(), summary: set.summary() })
}

/// `text` with the content of its `kind: Canary` documents replaced by blank lines.
fn without_canaries(text: &str) -> String {
    let docs = serin_control_api::yaml::split_documents(text);
    let is_canary = |content: &str| {
        serin_control_api::yaml::parse_document(content)
            .ok()
            .flatten()
            .is_some_and(|v| v.get("kind").and_then(serin_control_api::yaml::Yaml::as_str) == Some("Canary"))
    };
    if !docs.iter().any(|d| is_canary(d.content())) {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    for doc in docs {
        let content = doc.content();
        if is_canary(content) {
            out.push_str(&doc.text[..doc.text.len() - content.len()]);
            out.push_str(&"\n".repeat(content.matches('\n').count()));
        } else {
            out.push_str(doc.text);
        }
    }
    out
}

/// The control plane's Prometheus metrics, fed by the server's [`Observer`] hooks.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    connected: Gauge,
    pushes: Family<Vec<(String, String)>, Counter>,
    nacks: Family<Vec<(String, String)>, Counter>,
    push_to_ack: Family<Vec<(String, String)>, Histogram>,
    connects: Counter<u64, AtomicU64>,
    csr_signed: Family<Vec<(String, String)>, Counter>,
    csr_refused: Family<Vec<(String, String)>, Counter>,
    unauthenticated: Counter<u64, AtomicU64>,
}

impl Metrics {
    /// Registers every metric under the `serin_control_plane_` prefix.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("serin_control_plane");
        let connected = Gauge::default();
        let pushes = Family::<Vec<(String, String)>, Counter>::default();
        let nacks = Family::<Vec<(String, String)>, Counter>::default();
        let push_to_ack = Family::<Vec<(String, String)>, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 15))
        });
        let connects = Counter::default();
        for ty in ResourceType::ALL {
            let _ = pushes.get_or_create(&type_label(ty));
            let _ = nacks.get_or_create(&type_label(ty));
            let _ = push_to_ack.get_or_create(&type_label(ty));
        }
        registry.register("connected_sidecars", "Sidecars with an open discovery stream", connected.clone());
        registry.register("stream_connects", "Discovery streams opened", connects.clone());
        registry.register("pushes", "Discovery responses sent, by type", pushes.clone());
        registry.register("nacks", "Responses rejected by a sidecar, by type", nacks.clone());
        registry.register(
            "push_to_ack_seconds",
            "Time from sending a response to its ACK, by type",
            push_to_ack.clone(),
        );
        let csr_signed = Family::<Vec<(String, String)>, Counter>::default();
        let csr_refused = Family::<Vec<(String, String)>, Counter>::default();
        let unauthenticated = Counter::default();
        for auth in ["certificate", "token"] {
            let _ = csr_signed.get_or_create(&vec![("auth".to_string(), auth.to_string())]);
        }
        registry.register(
            "csr_signed",
            "Certificates signed, by how the caller was entitled (certificate = renewal, token = bootstrap)",
            csr_signed.clone(),
        );
        registry.register("csr_refused", "Certificate requests refused, by gRPC status code", csr_refused.clone());
        registry.register(
            "unauthenticated_calls",
            "Calls refused by the TLS listener for want of a client certificate or a valid token",
            unauthenticated.clone(),
        );
        Metrics { registry, connected, pushes, nacks, push_to_ack, connects, csr_signed, csr_refused, unauthenticated }
    }

    /// The metrics in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

fn type_label(ty: ResourceType) -> Vec<(String, String)> {
    vec![("type".to_string(), ty.short_name().to_string())]
}

impl Observer for Metrics {
    fn stream_opened(&self, _node: &pb::Node) {
        self.connected.inc();
        self.connects.inc();
    }
    fn stream_closed(&self, _node: &pb::Node, _error: Option<&tonic::Status>) {
        self.connected.dec();
    }
    fn pushed(&self, _node: &pb::Node, ty: ResourceType, _version: u64) {
        self.pushes.get_or_create(&type_label(ty)).inc();
    }
    fn acked(&self, _node: &pb::Node, ty: ResourceType, _version: u64, push_to_ack: Duration) {
        self.push_to_ack.get_or_create(&type_label(ty)).observe(push_to_ack.as_secs_f64());
    }
    fn nacked(&self, node: &pb::Node, ty: ResourceType, version: u64, error: &str) {
        tracing::warn!(node = %node.id, r#type = %ty, version, error, "sidecar NACKed");
        self.nacks.get_or_create(&type_label(ty)).inc();
    }
    fn csr_signed(&self, _spiffe_id: &str, auth: &str) {
        self.csr_signed.get_or_create(&vec![("auth".to_string(), auth.to_string())]).inc();
    }
    fn csr_refused(&self, code: tonic::Code) {
        let code = format!("{code:?}");
        self.csr_refused.get_or_create(&vec![("code".to_string(), code)]).inc();
    }
    fn unauthenticated(&self) {
        self.unauthenticated.inc();
    }
}

/// Loads the folder, opens the store, binds both listeners and starts serving.
pub async fn start(args: &ControlPlaneArgs) -> anyhow::Result<Running> {
    let dir = args.config_dir.clone();
    // Taken before the load: an edit made from here on, even before the watcher's
    // first poll, is seen as a change.
    let loaded_fingerprint = fingerprint(&args.config_dir);
    let loaded = tokio::task::spawn_blocking(move || load_folder(&dir))
        .await
        .context("loading the config folder")?
        .map_err(|e| anyhow::anyhow!("invalid config {}:\n{e:#}", args.config_dir.display()))?;
    for warning in &loaded.warnings {
        tracing::warn!(%warning, "config");
    }
    let state_dir = args.state_dir.clone();
    let store = tokio::task::spawn_blocking(move || Store::open(&state_dir, loaded.documents))
        .await
        .context("opening the state folder")?
        .with_context(|| {
            format!("config folder {} with state folder {}", args.config_dir.display(), args.state_dir.display())
        })?;
    let store = Arc::new(store);
    for warning in store.warnings() {
        tracing::warn!(%warning, "store");
    }
    let security = args.security.clone();
    let ca = tokio::task::spawn_blocking(move || ca_settings(&security)).await.context("loading the CA")??;
    let grpc = TcpListener::bind(args.listen).await.with_context(|| format!("--listen {}", args.listen))?;
    let grpc_tls = match &ca {
        Some(_) => Some(
            TcpListener::bind(args.security.listen_tls)
                .await
                .with_context(|| format!("--listen-tls {}", args.security.listen_tls))?,
        ),
        None => None,
    };
    let monitoring =
        TcpListener::bind(args.monitoring).await.with_context(|| format!("--monitoring {}", args.monitoring))?;
    let listen_tls = grpc_tls.as_ref().map(TcpListener::local_addr).transpose()?;
    let admin_token = crate::dashboard::load_token(&args.dashboard)?;
    let ui = match args.dashboard.ui.0 {
        // A dashboard that cannot listen does not take the control plane down with it.
        Some(addr) => match TcpListener::bind(addr).await {
            Ok(listener) => Some(listener),
            Err(e) => {
                tracing::error!(%addr, error = %e, "cannot listen for the dashboard (--ui); running without it");
                None
            }
        },
        None => None,
    };
    let bound = Bound {
        listen: grpc.local_addr()?,
        listen_tls,
        monitoring: monitoring.local_addr()?,
        ui: ui.as_ref().map(TcpListener::local_addr).transpose()?,
    };
    match &ca {
        Some(settings) => tracing::info!(
            listen_tls = ?bound.listen_tls,
            trust_domain = %settings.trust_domain,
            bootstrap_tokens = settings.tokens.len(),
            max_cert_ttl = ?settings.max_ttl,
            "mesh CA loaded: signing CSRs; TLS listener on"
        ),
        None => tracing::info!("no --ca-dir: the TLS listener (--listen-tls) and certificate signing are off"),
    }
    let metrics = Arc::new(Metrics::new());
    let options = ServerOptions { observer: metrics.clone(), ..ServerOptions::default() };
    let mut plane = ControlPlane::new(store.clone(), options);
    if let Some(settings) = ca {
        plane = plane.with_ca(settings);
    }
    // Resumes the canary analyses persisted in the state folder (a state file that
    // cannot be read stops the start, as the store's does).
    plane.start_canaries().with_context(|| format!("state folder {}", args.state_dir.display()))?;
    let (stop, stop_rx) = watch::channel(false);
    let load = Arc::clone(plane.load());
    let ui_task = ui.map(|listener| {
        let backend: Arc<dyn crate::dashboard::DashboardBackend> = Arc::new(plane.clone());
        let writes = if admin_token.is_some() { "on (--admin-token-file)" } else { "off (no --admin-token-file)" };
        let loopback = bound.ui.is_some_and(|a| a.ip().is_loopback());
        let dashboard = Arc::new(crate::dashboard::Dashboard::new(backend, admin_token).loopback_hosts_only(loopback));
        if let Some(addr) = bound.ui {
            tracing::info!(ui = %addr, set_weight_and_rollback = writes, "dashboard on http://{addr}/");
        }
        tokio::spawn(crate::dashboard::serve(listener, dashboard, stop_rx.clone()))
    });
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let plain = plane.clone().serve(grpc, stopped(stop_rx.clone()));
    let tls_stop = stopped(stop_rx.clone());
    let server = tokio::spawn(async move {
        let plain = async { plain.await.context("gRPC server") };
        match grpc_tls {
            Some(listener) => {
                let tls = async { plane.serve_tls(listener, tls_stop).await.context("gRPC TLS server") };
                tokio::try_join!(plain, tls).map(|_| ())
            }
            None => plain.await,
        }
    });
    let mut tasks = vec![
        tokio::spawn(serve_metrics(monitoring, metrics, load, stop_rx)),
        tokio::spawn(watch_folder(args.config_dir.clone(), store.clone(), loaded_fingerprint)),
    ];
    tasks.extend(ui_task);
    let versions: Vec<String> = store.versions().iter().map(|(t, v)| format!("{t}={v}")).collect();
    tracing::info!(
        listen = %bound.listen,
        monitoring = %bound.monitoring,
        config = %loaded.summary,
        versions = %versions.join(","),
        "control plane ready"
    );
    Ok(Running { bound, store, stop, server, tasks })
}

/// Runs `serin control-plane` until SIGTERM or Ctrl-C, then drains.
pub async fn run(args: ControlPlaneArgs) -> anyhow::Result<()> {
    let running = start(&args).await?;
    crate::sidecar::shutdown_signal().await;
    tracing::info!("signal received: draining");
    running.shutdown(args.drain_timeout).await
}

/// Polls the folder every 500 ms; a change that validates and compiles replaces the
/// store's documents, an invalid one is logged and the last good config stays.
/// `last` is the fingerprint of what was loaded at start.
async fn watch_folder(dir: PathBuf, store: Arc<Store>, mut last: Vec<(PathBuf, u64, Option<std::time::SystemTime>)>) {
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        poll.tick().await;
        let now = fingerprint(&dir);
        if now == last {
            continue;
        }
        last = now;
        let (d, s) = (dir.clone(), store.clone());
        let result = tokio::task::spawn_blocking(move || -> anyhow::Result<(Vec<ResourceType>, Vec<String>)> {
            let loaded = load_folder(&d)?;
            let changed = s.replace_documents(loaded.documents).map_err(|e| anyhow::anyhow!("{e}"))?;
            Ok((changed, loaded.warnings))
        })
        .await;
        match result {
            Ok(Ok((changed, warnings))) => {
                for warning in warnings {
                    tracing::warn!(%warning, "config");
                }
                for warning in store.warnings() {
                    tracing::warn!(%warning, "store");
                }
                let changed: Vec<&str> = changed.iter().map(|t| t.short_name()).collect();
                tracing::info!(dir = %dir.display(), changed = %changed.join(","), "config reloaded");
            }
            Ok(Err(e)) => {
                tracing::error!(dir = %dir.display(), "config rejected, the last good config keeps serving:\n{e:#}")
            }
            Err(e) => tracing::error!(error = %e, "config reload task failed"),
        }
    }
}

/// The sidecars' load figures over the last 60 s as gauges per service and version
/// (computed now), and the reports received, in the text format.
pub fn load_metrics(load: &LoadStats) -> String {
    use std::fmt::Write as _;
    fn label(value: &str) -> String {
        value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
    }
    let figures = load.figures(&pb::GetLoadRequest::default());
    let mut out = String::new();
    type LoadGauge = (&'static str, &'static str, fn(&pb::VersionFigures) -> Option<f64>);
    let gauges: [LoadGauge; 3] = [
        ("serin_load_requests_per_second", "Requests per second over the last 60 s (sidecar load reports)", |v| {
            Some(v.rps)
        }),
        ("serin_load_success_ratio", "Share of non-5xx answers over the last 60 s (sidecar load reports)", |v| {
            v.success_percent.map(|p| p / 100.0)
        }),
        ("serin_load_p99_ms", "99th percentile request duration over the last 60 s, ms (sidecar load reports)", |v| {
            v.p99_ms
        }),
    ];
    for (name, help, value) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}.\n# TYPE {name} gauge");
        for v in &figures.versions {
            if let Some(x) = value(v) {
                let _ =
                    writeln!(out, "{name}{{service=\"{}\",version=\"{}\"}} {x}", label(&v.service), label(&v.version));
            }
        }
    }
    let _ = writeln!(
        out,
        "# HELP serin_load_reports Load reports received from sidecars.\n# TYPE serin_load_reports counter\n\
         serin_load_reports_total {}",
        load.reports_total()
    );
    let _ = writeln!(
        out,
        "# HELP serin_load_reports_rejected Load reports not recorded in full (their bad or extra entries dropped; \
         the stream carries on), by reason.\n# TYPE serin_load_reports_rejected counter"
    );
    for (reason, n) in load.rejected_reports() {
        let _ = writeln!(out, "serin_load_reports_rejected_total{{reason=\"{reason}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP serin_load_series_dropped Load report entries dropped for want of room for their series, by \
         reason.\n# TYPE serin_load_series_dropped counter"
    );
    for (reason, n) in load.dropped_series_by_reason() {
        let _ = writeln!(out, "serin_load_series_dropped_total{{reason=\"{reason}\"}} {n}");
    }
    out
}

/// `text` (the registry's, ending with `# EOF`) with [`load_metrics`] before its end.
fn with_load(mut text: String, load: &LoadStats) -> String {
    let eof = text.ends_with("# EOF\n");
    if eof {
        text.truncate(text.len() - "# EOF\n".len());
    }
    text.push_str(&load_metrics(load));
    if eof {
        text.push_str("# EOF\n");
    }
    text
}

/// Serves `/metrics` (HTTP/1.1) until `stop` flips.
async fn serve_metrics(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    load: Arc<LoadStats>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "monitoring accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = async { let _ = stop.wait_for(|s| *s).await; } => return,
        };
        let metrics = metrics.clone();
        let load = load.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                let load = load.clone();
                async move {
                    if req.uri().path() == "/metrics" {
                        // The load figures take the LoadStats lock and walk every series:
                        // off the runtime threads.
                        let text = tokio::task::spawn_blocking(move || with_load(metrics.encode(), &load)).await;
                        match text {
                            Ok(text) => hyper::Response::builder()
                                .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                                .body(Full::new(Bytes::from(text))),
                            Err(e) => hyper::Response::builder()
                                .status(500)
                                .body(Full::new(Bytes::from(format!("the metrics were not computed: {e}\n")))),
                        }
                    } else {
                        hyper::Response::builder().status(404).body(Full::new(Bytes::from_static(b"not found\n")))
                    }
                }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

#[cfg(test)]
mod canary_folder_tests {
    use super::*;

    const MESH: &str = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: payment}
spec:
  hosts: [payment]
  http:
  - route:
    - {destination: {host: payment, subset: v1}, weight: 100}
    - {destination: {host: payment, subset: v2}, weight: 0}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: payment}
spec:
  host: payment
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: payment}
spec:
  hosts: [payment.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 8080, name: http, protocol: HTTP}]
  endpoints: [{address: 127.0.0.1, labels: {version: v1}}]
";

    const CANARY: &str = "---
apiVersion: flagger.app/v1beta1
kind: Canary
metadata: {name: payment}
spec:
  targetRef: {apiVersion: apps/v1, kind: Deployment, name: payment}
  analysis:
    interval: 30s
    threshold: 3
    maxWeight: 50
    stepWeight: 10
    metrics:
    - {name: request-success-rate, thresholdRange: {min: 99}}
";

    fn folder(files: &[(&str, &str)]) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("serin-cp-canary-{}-{}", std::process::id(), rand::random::<u64>()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        for (name, text) in files {
            std::fs::write(dir.join(name), text).expect("write");
        }
        dir
    }

    #[test]
    fn a_canary_document_loads_with_the_mesh_and_reaches_the_store() {
        let text = format!("{MESH}{CANARY}");
        assert_eq!(without_canaries(&text).lines().count(), text.lines().count(), "line numbers kept");
        let dir = folder(&[("mesh.yaml", &text)]);
        let loaded = load_folder(&dir).expect("loads");
        let store = Store::from_documents(loaded.documents).expect("store");
        let canaries = store.canaries();
        assert_eq!(canaries.len(), 1);
        assert_eq!((canaries[0].canary.as_str(), canaries[0].stable.as_str()), ("v2", "v1"));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn an_invalid_canary_document_is_refused_with_its_field() {
        let text = format!("{MESH}{}", CANARY.replace("threshold: 3", "threshold: 0"));
        let dir = folder(&[("mesh.yaml", &text)]);
        let loaded = load_folder(&dir).expect("the Istio part loads");
        let e = Store::from_documents(loaded.documents).expect_err("refused");
        assert!(e.to_string().contains("spec.analysis.threshold"), "{e}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
