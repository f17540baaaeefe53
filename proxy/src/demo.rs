//! `serin demo`: a local canary of `payment` on loopback, driven by the control plane.
//!
//! Starts 3 × v1 and 1 × v2 demo upstreams with a sidecar beside each (STRICT mutual
//! TLS), the control plane in process (the code of `serin control-plane`, on free
//! loopback ports, its state inside the demo folder) serving an Istio config written
//! from the embedded template, a frontend sidecar that takes its config from the
//! control plane over gRPC (as `serin sidecar --control-plane`), and a steady load.
//! It starts a canary analysis in the control plane (v2's weight 5 → 10 → 25 → 50%,
//! judged each `--interval` on the figures the frontend sidecar reports), prints each
//! decision and a live table per version once a second, until Ctrl-C or `--duration`:
//! by default v2 answers 8% errors and the analysis rolls it back; with
//! `--healthy-canary` it promotes v2 to 100%. At the end it sums up which version
//! answered while each split was in force.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use serin_certs::{Ca, SpiffeId, write_workload};
use serin_control_api::pb;

use crate::control_plane::{self, ControlPlaneArgs};
use crate::demo_app::{AppConfig, DemoApp};
use crate::demo_load::{LoadConfig, Outcome, Rate, run_load};
use crate::sidecar::{self, SidecarArgs};
use crate::snapshot::{RouteAction, Snapshot};
use crate::state::Shared;
use crate::upstream::split::SplitMode;
use crate::xds_client;

/// The embedded canary config; `{{ENDPOINTS}}` becomes one WorkloadEntry per pod.
/// It starts with v2 dark (weight 0); the demo's steps change that.
pub const TEMPLATE: &str = include_str!("demo/payment.yaml");

/// The service the demo shifts.
const SERVICE: &str = "payment";
/// The versions the table always shows, stable first.
const VERSIONS: [&str; 2] = ["v1", "v2"];
/// The frontend sidecar's node id at the control plane.
const FRONTEND_NODE: &str = "frontend";
/// How often the demo looks at the frontend sidecar's split and at the analysis.
const WATCH_EVERY: Duration = Duration::from_millis(10);
/// How long the frontend sidecar may take to get its first config.
const FIRST_CONFIG_WAIT: Duration = Duration::from_secs(10);

/// Options of `serin demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Stop after this long, e.g. `30s` or `30` (default: run until Ctrl-C).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Let v2 answer without errors, so that the analysis promotes it to 100%
    /// (default: v2 answers `--v2-error-rate` errors and the analysis rolls it back).
    #[arg(long)]
    pub healthy_canary: bool,
    /// The canary analysis interval: each interval the control plane judges v2's
    /// figures, then steps its weight 5 → 10 → 25 → 50% (Flagger's `analysis.interval`).
    #[arg(long, default_value = "3s", value_parser = parse_interval)]
    pub interval: Duration,
    /// Fewest v2 requests in an interval for the analysis to judge it (below, the
    /// step waits and says why).
    #[arg(long, default_value_t = 20)]
    pub min_requests: u64,
    /// Requests per second of the built-in load.
    #[arg(long, default_value_t = 300)]
    pub rate: u32,
    /// Share of v2's answers that are 503 errors (v1 answers without errors); 0 with
    /// `--healthy-canary`.
    #[arg(long, default_value_t = 0.08)]
    pub v2_error_rate: f64,
    /// Latency added by v2 (v1 adds 2ms).
    #[arg(long, default_value = "10ms", value_parser = humantime::parse_duration)]
    pub v2_latency: Duration,
    /// Folder for the certificates, the config and the control plane's state
    /// (default: a new folder under the temp dir, removed at the end).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

impl DemoArgs {
    /// v2's error rate: none for a healthy canary.
    fn v2_errors(&self) -> f64 {
        if self.healthy_canary { 0.0 } else { self.v2_error_rate }
    }
}

/// A duration like `30s`, `2m`, or a plain number of seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    match text.parse::<u64>() {
        Ok(secs) => Ok(Duration::from_secs(secs)),
        Err(_) => humantime::parse_duration(text).map_err(|e| e.to_string()),
    }
}

/// Like [`parse_duration`], at least 1 s (the sidecars report their load every second,
/// and the analysis judges whole seconds of reports).
fn parse_interval(text: &str) -> Result<Duration, String> {
    let every = parse_duration(text)?;
    if every < Duration::from_secs(1) {
        return Err("the analysis interval must be at least 1s".to_string());
    }
    Ok(every)
}

/// The analysis the demo starts: Flagger's checks on a demo's time scale. The weights
/// step 5 → 10 → 25 → 50%; an interval fails when v2's success rate is under 99% or
/// its p99 over 500 ms; two failed intervals roll v2 back, passing at 50% promotes it.
fn canary_spec(args: &DemoArgs) -> pb::CanarySpec {
    pb::CanarySpec {
        service: SERVICE.to_string(),
        canary: "v2".to_string(),
        stable: "v1".to_string(),
        step_weights: vec![5, 10, 25, 50],
        max_weight: 50,
        interval_ms: u32::try_from(args.interval.as_millis()).unwrap_or(u32::MAX),
        threshold: 2,
        min_success_percent: Some(99.0),
        max_p99_ms: Some(500.0),
        min_requests: args.min_requests,
        promote_weight: 100,
        source: "serin demo".to_string(),
        ..pb::CanarySpec::default()
    }
}

/// A split while it was in force, and which version answered the requests sent then.
#[derive(Debug)]
struct Phase {
    /// `v1=95 v2=5`.
    split: String,
    /// `config`, `step 1`, `rollback`, …
    origin: String,
    /// When it was in force on the frontend sidecar (its ACK had come back).
    from: Instant,
    /// When the next push started; requests sent from then until the next ACK are
    /// left out, since either split may have routed them.
    until: Option<Instant>,
    /// Answers per version.
    counts: BTreeMap<String, u64>,
    /// Requests with no answer.
    errors: u64,
}

/// Per-version figures of the built-in load.
#[derive(Debug)]
struct Table {
    versions: BTreeMap<String, VersionStats>,
    errors: u64,
    phases: Vec<Phase>,
}

#[derive(Debug)]
struct VersionStats {
    requests: u64,
    ok: u64,
    last_requests: u64,
    latency: Histogram<u64>,
}

impl Default for VersionStats {
    fn default() -> Self {
        VersionStats {
            requests: 0,
            ok: 0,
            last_requests: 0,
            // Constant, valid bounds: 1 µs to 60 s, 3 significant digits.
            latency: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds"),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every writer leaves the table consistent, so a poisoned lock holds usable data.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Table {
    /// An empty table with a row per version, and the first split in force from `from`.
    fn new(split: String, from: Instant) -> Table {
        Table {
            versions: VERSIONS.iter().map(|v| (v.to_string(), VersionStats::default())).collect(),
            errors: 0,
            phases: vec![Phase {
                split,
                origin: "config".into(),
                from,
                until: None,
                counts: BTreeMap::new(),
                errors: 0,
            }],
        }
    }

    fn record(&mut self, o: &Outcome<'_>) {
        let now = Instant::now();
        let sent = now.checked_sub(o.service_time).unwrap_or(now);
        if let Some(phase) = self.phases.iter_mut().rev().find(|p| p.from <= sent)
            && phase.until.is_none_or(|until| sent < until)
        {
            match o.version {
                Some(version) => *phase.counts.entry(version.to_string()).or_default() += 1,
                None => phase.errors += 1,
            }
        }
        let Some(version) = o.version else {
            self.errors += 1;
            return;
        };
        let stats = self.versions.entry(version.to_string()).or_default();
        stats.requests += 1;
        if o.result.is_ok_and(|s| s.is_success()) {
            stats.ok += 1;
        }
        let _ = stats.latency.record((o.latency.as_micros() as u64).max(1));
    }

    /// A push starts: the split in force ends at `at`.
    fn end_phase(&mut self, at: Instant) {
        if let Some(phase) = self.phases.last_mut() {
            phase.until = Some(at);
        }
    }

    /// A push was ACKed: `split` is in force from `at`.
    fn begin_phase(&mut self, split: String, origin: String, at: Instant) {
        self.phases.push(Phase { split, origin, from: at, until: None, counts: BTreeMap::new(), errors: 0 });
    }

    fn render(
        &mut self,
        elapsed: Duration,
        interval: Duration,
        config: &str,
        security: &BTreeMap<String, String>,
    ) -> String {
        let total: u64 = self.versions.values().map(|v| v.requests).sum();
        let recent: u64 = self.versions.values().map(|v| v.requests - v.last_requests).sum();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\n[{:>5.1}s] payment through the frontend sidecar ({total} requests) · {config}",
            elapsed.as_secs_f64(),
        );
        let _ = writeln!(
            out,
            "{:<8} {:>9} {:>6} {:>8} {:>8} {:>8} {:>9} {:>9}  security (seen by the pods)",
            "version", "requests", "rps", "now", "overall", "success", "p50", "p99"
        );
        for (version, s) in &mut self.versions {
            let new = s.requests - s.last_requests;
            s.last_requests = s.requests;
            let rps = new as f64 / interval.as_secs_f64();
            let now = 100.0 * new as f64 / recent.max(1) as f64;
            let share = 100.0 * s.requests as f64 / total.max(1) as f64;
            let success = 100.0 * s.ok as f64 / s.requests.max(1) as f64;
            let p = |q: f64| {
                if s.requests == 0 {
                    "-".to_string()
                } else {
                    format!("{:.1}ms", Duration::from_micros(s.latency.value_at_quantile(q)).as_secs_f64() * 1e3)
                }
            };
            let _ = writeln!(
                out,
                "{:<8} {:>9} {:>6.0} {:>7.2}% {:>7.2}% {:>7.2}% {:>9} {:>9}  {}",
                version,
                s.requests,
                rps,
                now,
                share,
                success,
                p(0.5),
                p(0.99),
                security.get(version.as_str()).map_or("-", String::as_str),
            );
        }
        if self.errors > 0 {
            let _ = writeln!(out, "(no answer from any version: {})", self.errors);
        }
        out
    }

    /// Which version answered while each split was in force.
    fn summary(&self) -> String {
        let mut out = String::from(
            "\nrequests per version while each split was in force (sent after its ACK, before the next push):\n",
        );
        let width = self.phases.iter().map(|p| p.split.len()).max().unwrap_or(0);
        for phase in &self.phases {
            let total: u64 = phase.counts.values().sum();
            let mut versions: Vec<String> = VERSIONS.iter().map(|v| v.to_string()).collect();
            versions.extend(phase.counts.keys().filter(|k| !VERSIONS.contains(&k.as_str())).cloned());
            let parts: Vec<String> = versions
                .iter()
                .map(|v| {
                    let n = phase.counts.get(v).copied().unwrap_or(0);
                    format!("{v} {n} ({:.2}%)", 100.0 * n as f64 / total.max(1) as f64)
                })
                .collect();
            let _ = write!(
                out,
                "  {:<width$}  {:<9} {:>7} requests: {}",
                phase.split,
                phase.origin,
                total,
                parts.join(", ")
            );
            if phase.errors > 0 {
                let _ = write!(out, ", no answer {}", phase.errors);
            }
            out.push('\n');
        }
        out
    }
}

/// The weights of the `payment` route named `split` in `snapshot` (0-weight
/// destinations are not in a compiled route, so they read as 0).
fn split_weights(snapshot: &Snapshot) -> BTreeMap<String, u32> {
    let mut weights: BTreeMap<String, u32> = VERSIONS.iter().map(|v| (v.to_string(), 0)).collect();
    let route = snapshot.virtual_hosts.iter().flat_map(|vh| vh.routes.iter()).find(|r| {
        r.name == "split"
            && matches!(&r.action, RouteAction::Forward(w) if w.destinations.iter().all(|d| d.cluster.service.name == SERVICE))
    });
    if let Some(RouteAction::Forward(w)) = route.map(|r| &r.action) {
        for d in &w.destinations {
            weights.insert(d.cluster.subset.clone().unwrap_or_else(|| "-".into()), d.weight);
        }
    }
    weights
}

/// `v1=95 v2=5`.
fn describe_weights<'a>(weights: impl IntoIterator<Item = (&'a String, &'a u32)>) -> String {
    let mut pairs: Vec<(&String, &u32)> = weights.into_iter().collect();
    pairs.sort();
    pairs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
}

/// What the frontend sidecar routes by now: `split v1 95% / v2 5% · routes version 3
/// from the control plane`.
fn frontend_config(shared: &Shared) -> String {
    let snapshot = shared.snapshot.load();
    let weights = split_weights(&snapshot);
    let sum: u32 = weights.values().sum();
    let split: Vec<String> =
        weights.iter().map(|(v, w)| format!("{v} {:.0}%", 100.0 * f64::from(*w) / f64::from(sum.max(1)))).collect();
    let routes = snapshot
        .version
        .split(',')
        .find_map(|part| part.strip_prefix("routes="))
        .map_or_else(|| snapshot.version.clone(), str::to_string);
    format!("split {} · routes version {routes} from the control plane", split.join(" / "))
}

/// PeerAuthentication for the payment pods' sidecars: mutual TLS only.
const STRICT_MTLS: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  namespace: default\nspec:\n  mtls:\n    mode: STRICT\n";

/// Per version, the `connection_security_policy` the payment pods' sidecars
/// report (`reporter="destination"`) with its share of their requests.
fn security_by_version(pods: &[Pod]) -> BTreeMap<String, String> {
    let mut counts: BTreeMap<&str, BTreeMap<String, f64>> = BTreeMap::new();
    for pod in pods {
        let text = pod.sidecar.metrics.encode();
        for line in
            text.lines().filter(|l| l.starts_with("istio_requests_total{") && l.contains("reporter=\"destination\""))
        {
            let policy = label(line, "connection_security_policy").unwrap_or("unknown").to_string();
            let value = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            *counts.entry(pod.version).or_default().entry(policy).or_default() += value;
        }
    }
    counts
        .into_iter()
        .map(|(version, by_policy)| {
            let total: f64 = by_policy.values().sum();
            let text: Vec<String> =
                by_policy.iter().map(|(p, n)| format!("{p} {:.0}%", 100.0 * n / total.max(1.0))).collect();
            (version.to_string(), text.join(", "))
        })
        .collect()
}

/// The value of `name` in one Prometheus sample line.
fn label<'l>(line: &'l str, name: &str) -> Option<&'l str> {
    line.split(&format!("{name}=\"")).nth(1)?.split('"').next()
}

/// Whether a plaintext request straight to a STRICT sidecar is refused.
async fn plaintext_refused(inbound: SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(inbound).await else { return true };
    if stream.write_all(b"GET / HTTP/1.1\r\nHost: payment\r\n\r\n").await.is_err() {
        return true;
    }
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(3), stream.read(&mut buf)).await;
    matches!(read, Ok(Ok(0)) | Ok(Err(_)))
}

/// One line of the sidecar's own `istio_requests_total` per destination version,
/// so the table can be checked against the metrics Prometheus would scrape.
fn sidecar_counts(metrics: &str) -> String {
    let mut counts: BTreeMap<String, f64> = BTreeMap::new();
    for line in metrics.lines().filter(|l| l.starts_with("istio_requests_total{")) {
        let version =
            line.split("destination_version=\"").nth(1).and_then(|rest| rest.split('"').next()).unwrap_or("unknown");
        let value = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        *counts.entry(version.to_string()).or_default() += value;
    }
    let parts: Vec<String> = counts.iter().map(|(v, n)| format!("{v}={n}")).collect();
    format!(
        "sidecar metrics: istio_requests_total{{reporter=\"source\"}} by destination_version: {}\n",
        parts.join(", ")
    )
}

/// The config text for the given pods: `(version, address of the pod's inbound sidecar)` pairs.
pub fn render_config(pods: &[(&str, SocketAddr)]) -> String {
    let mut entries = String::new();
    for (i, (version, addr)) in pods.iter().enumerate() {
        let _ = write!(
            entries,
            "---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: payment-{version}-{i}\n  namespace: default\nspec:\n  address: {}\n  ports:\n    http: {}\n  serviceAccount: payment\n  labels:\n    app: payment\n    version: {version}\n    security.istio.io/tlsMode: istio\n",
            addr.ip(),
            addr.port()
        );
    }
    TEMPLATE.replace("{{ENDPOINTS}}\n", &entries)
}

/// One payment pod: its app and the sidecar beside it (inbound, STRICT mutual TLS).
struct Pod {
    version: &'static str,
    app: DemoApp,
    sidecar: Arc<Shared>,
    inbound: SocketAddr,
    data: tokio::task::JoinHandle<()>,
}

/// Options of a demo sidecar on loopback with ephemeral ports.
fn sidecar_args(
    config: Option<PathBuf>,
    cert_dir: PathBuf,
    workload: &str,
    app_label: &str,
    version: &str,
) -> SidecarArgs {
    let any: SocketAddr = ([127, 0, 0, 1], 0).into();
    SidecarArgs {
        config,
        outbound: any,
        inbound: any,
        app: ([127, 0, 0, 1], 8080).into(),
        admin: any,
        metrics: any,
        health: any,
        workload: workload.into(),
        namespace: "default".into(),
        app_label: app_label.into(),
        app_version: version.into(),
        no_access_log: true,
        cert_dir: Some(cert_dir),
        split: SplitMode::Exact,
        drain_timeout: Duration::from_secs(2),
        idle_timeout: crate::idle::DEFAULT_IDLE_TIMEOUT,
        concurrency: 0,
        outbound_traffic_policy: Default::default(),
        control_plane: Default::default(),
    }
}

/// The options of `serin control-plane` for the demo: its two folders, and every
/// listener (any option whose default is an address) on a free loopback port. Parsed
/// from flags, so that options added to the control plane keep their defaults here.
fn control_plane_args(config_dir: &Path, state_dir: &Path) -> anyhow::Result<ControlPlaneArgs> {
    #[derive(clap::Parser)]
    struct Flags {
        #[command(flatten)]
        args: ControlPlaneArgs,
    }
    let mut argv: Vec<OsString> =
        vec!["control-plane".into(), "--config-dir".into(), config_dir.into(), "--state-dir".into(), state_dir.into()];
    let command = <Flags as clap::CommandFactory>::command();
    for arg in command.get_arguments() {
        let listens =
            arg.get_default_values().iter().any(|d| d.to_str().is_some_and(|d| d.parse::<SocketAddr>().is_ok()));
        if let Some(long) = arg.get_long().filter(|_| listens) {
            argv.push(format!("--{long}").into());
            argv.push("127.0.0.1:0".into());
        }
    }
    <Flags as clap::Parser>::try_parse_from(argv).map(|f| f.args).context("control plane options for the demo")
}

/// Issues `spiffe://cluster.local/ns/default/sa/<sa>` from `ca` into `dir/<sa>`.
fn issue_identity(ca: &Ca, dir: &Path, sa: &str) -> anyhow::Result<PathBuf> {
    let id: SpiffeId = format!("spiffe://cluster.local/ns/default/sa/{sa}").parse()?;
    let cert = ca.issue(&id, serin_certs::DEFAULT_WORKLOAD_LIFETIME)?;
    let out = dir.join("identities").join(sa);
    write_workload(&out, &cert)?;
    Ok(out)
}

/// Waits until the sidecar has applied its first config from the control plane (what
/// its readiness waits for), or fails with the reason after [`FIRST_CONFIG_WAIT`].
async fn wait_first_config(shared: &Shared) -> anyhow::Result<()> {
    let deadline = Instant::now() + FIRST_CONFIG_WAIT;
    while let Some(reason) = xds_client::waiting_for_first_config(shared) {
        if Instant::now() >= deadline {
            anyhow::bail!("the frontend sidecar got no config within {FIRST_CONFIG_WAIT:?}: {reason}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Follows the frontend sidecar's split: each change of the weights it routes by ends
/// the table's phase and begins the next (`step N`, `rollback` or `promote`), so the
/// summary counts the answers per split exactly. Runs until aborted.
async fn track_split(shared: Arc<Shared>, table: Arc<Mutex<Table>>) {
    let mut last = split_weights(&shared.snapshot.load());
    let mut last_look = Instant::now();
    let mut steps = 0;
    loop {
        tokio::time::sleep(WATCH_EVERY).await;
        let weights = split_weights(&shared.snapshot.load());
        let now = Instant::now();
        if weights != last {
            let v2 = |w: &BTreeMap<String, u32>| w.get("v2").copied().unwrap_or(0);
            let origin = if v2(&weights) == 0 && v2(&last) > 0 {
                "rollback".to_string()
            } else if weights.values().filter(|w| **w > 0).count() == 1 && v2(&weights) > 0 {
                "promote".to_string()
            } else {
                steps += 1;
                format!("step {steps}")
            };
            // The change landed between the last look and now: requests sent in that
            // gap may have been routed by either split, so neither phase counts them.
            let mut table = lock(&table);
            table.end_phase(last_look);
            table.begin_phase(describe_weights(&weights), origin, now);
            last = weights;
        }
        last_look = now;
    }
}

/// After `baseline` of v1-only traffic, starts the canary analysis at the control
/// plane and prints each of its decisions as it is made; returns the analysis as it
/// ended (or the error that stopped it).
async fn watch_canary(
    control_plane: String,
    spec: pb::CanarySpec,
    started: Instant,
    baseline: Duration,
) -> anyhow::Result<pb::CanaryStatus> {
    let at = || format!("[{:>5.1}s]", started.elapsed().as_secs_f64());
    tokio::time::sleep_until((started + baseline).into()).await;
    let channel = serin_control_api::client::endpoint(&control_plane)?
        .connect()
        .await
        .with_context(|| format!("connecting to the control plane at {control_plane}"))?;
    let mut client = pb::canaries_client::CanariesClient::new(channel);
    let request = pb::StartCanaryRequest { spec: Some(spec) };
    let status = client.start(request).await.context("starting the canary analysis")?.into_inner();
    let mut printed = 0;
    let mut status = status;
    loop {
        for event in status.events.iter().skip(printed) {
            println!(">> {} canary {}: {}", at(), event.kind, event.message);
        }
        printed = printed.max(status.events.len());
        let phase = pb::CanaryPhase::try_from(status.phase).unwrap_or(pb::CanaryPhase::Unspecified);
        if matches!(phase, pb::CanaryPhase::Succeeded | pb::CanaryPhase::Failed | pb::CanaryPhase::Aborted) {
            return Ok(status);
        }
        tokio::time::sleep(WATCH_EVERY * 20).await;
        let request = pb::GetCanaryRequest { service: SERVICE.to_string() };
        status = client.get(request).await.context("asking for the canary's status")?.into_inner();
    }
}

/// `FAILED: rolled back (…)`, `SUCCEEDED: promoted …` for the end of the analysis.
fn describe_end(status: &pb::CanaryStatus) -> String {
    let phase = pb::CanaryPhase::try_from(status.phase).map_or("?", |p| p.as_str_name());
    let reason = if status.reason.is_empty() { String::new() } else { format!(": {}", status.reason) };
    format!(
        "{phase}{reason} · v2 now at {}%, after {} step(s) and {} failed check(s)",
        status.weight, status.step, status.failed_checks
    )
}
/// Runs the demo until Ctrl-C or `--duration`.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("serin-demo-{}", std::process::id())),
    };
    let payment_config = dir.join("payment");
    let cp_config = dir.join("control-plane").join("config");
    let cp_state = dir.join("control-plane").join("state");
    // A fresh state: weights a previous run set through the API would win over the config.
    if cp_state.exists() {
        std::fs::remove_dir_all(&cp_state).with_context(|| format!("clearing {}", cp_state.display()))?;
    }
    for d in [&payment_config, &cp_config, &cp_state] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    // The mesh CA and one identity per service account, as `serin ca` would make them.
    let ca = Ca::generate("cluster.local").context("creating the demo mesh CA")?;
    let frontend_id = issue_identity(&ca, &dir, "frontend")?;
    let payment_id = issue_identity(&ca, &dir, "payment")?;
    std::fs::write(payment_config.join("peer-authentication.yaml"), STRICT_MTLS)
        .with_context(|| format!("writing {}", payment_config.display()))?;

    let mut pods = Vec::new();
    for (version, count) in [("v1", 3), ("v2", 1)] {
        for i in 0..count {
            let mut cfg = AppConfig::new(SERVICE, version);
            if version == "v2" {
                cfg.error_rate = args.v2_errors();
                cfg.latency = args.v2_latency;
            } else {
                cfg.latency = Duration::from_millis(2);
            }
            let app = DemoApp::start(([127, 0, 0, 1], 0).into(), cfg).await.context("starting a demo upstream")?;
            let mut pod_args = sidecar_args(
                Some(payment_config.clone()),
                payment_id.clone(),
                &format!("payment-{version}-{i}"),
                SERVICE,
                version,
            );
            pod_args.app = app.addr();
            let (sidecar, bound, data) = sidecar::start(&pod_args).await?;
            pods.push(Pod { version, app, sidecar, inbound: bound.inbound, data });
        }
    }

    // The control plane serves the mesh config; the frontend sidecar subscribes to it.
    let endpoints: Vec<(&str, SocketAddr)> = pods.iter().map(|p| (p.version, p.inbound)).collect();
    let config_path = cp_config.join("payment.yaml");
    std::fs::write(&config_path, render_config(&endpoints))
        .with_context(|| format!("writing {}", config_path.display()))?;
    let plane = control_plane::start(&control_plane_args(&cp_config, &cp_state)?)
        .await
        .context("starting the demo's control plane")?;
    let cp_addr = plane.bound.listen.to_string();
    let mut frontend_args = sidecar_args(None, frontend_id, "frontend", "frontend", "v1");
    frontend_args.control_plane.address = Some(cp_addr.clone());
    frontend_args.control_plane.node_id = Some(FRONTEND_NODE.to_string());
    let (shared, bound, data) = sidecar::start(&frontend_args).await?;
    wait_first_config(&shared).await?;

    let spec = canary_spec(&args);
    println!(
        "serin demo: payment v1 ×3 (stable) and v2 ×1 (canary), a sidecar beside every pod, mutual TLS between them"
    );
    println!("  control plane     {cp_addr} (gRPC)   metrics http://{}/metrics", plane.bound.monitoring);
    println!("                    try: serin ctl --control-plane {cp_addr} status");
    match plane.bound.ui {
        Some(ui) => {
            println!("  dashboard         http://{ui}/   (live figures per version, the sidecars, the canary's steps)")
        }
        None => println!("  dashboard         not running (see the log)"),
    }
    println!("  frontend sidecar  http://{}/   (Host: payment)  → mutual TLS → payment sidecars", bound.outbound);
    println!(
        "                    config pushed by the control plane (node {FRONTEND_NODE}), now: {}",
        frontend_config(&shared)
    );
    println!("  metrics           http://{}/stats/prometheus", bound.metrics);
    println!("  admin             http://{}/config_dump   /clusters", bound.admin);
    println!("  config            {}   (served by the control plane: edits are pushed)", config_path.display());
    println!(
        "  canary analysis   in the control plane: v2's weight {} every {:.1}s while its success rate is at least 99% and its p99 under 500 ms; {} failed intervals roll it back ({})",
        spec.step_weights.iter().map(|w| format!("{w}%")).collect::<Vec<_>>().join(" → "),
        args.interval.as_secs_f64(),
        spec.threshold,
        if args.healthy_canary {
            "v2 healthy: expect a promotion".to_string()
        } else {
            format!("v2 answers {:.0}% errors: expect a rollback", args.v2_errors() * 100.0)
        },
    );
    println!("                    try: serin ctl --control-plane {cp_addr} canary status payment");
    println!("  try               curl -H 'Host: payment' -H 'x-canary: always' http://{}/", bound.outbound);
    let refused = plaintext_refused(pods[0].inbound).await;
    println!(
        "  plaintext to payment-v1-0's sidecar (PeerAuthentication STRICT): {}",
        if refused { "refused" } else { "NOT refused (unexpected)" }
    );

    let started = Instant::now();
    let initial = describe_weights(&split_weights(&shared.snapshot.load()));
    let table = Arc::new(Mutex::new(Table::new(initial, started)));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut load = LoadConfig::new(bound.outbound, SERVICE);
    load.rate = Rate::PerSecond(args.rate.max(1));
    load.connections = 16;
    load.duration = args.duration;
    let sink = table.clone();
    let load_task = tokio::spawn(run_load(load, stop_rx, move |_slot| {
        let sink = sink.clone();
        move |o: &Outcome<'_>| lock(&sink).record(o)
    }));
    let split_task = tokio::spawn(track_split(shared.clone(), table.clone()));
    let mut canary = Some(tokio::spawn(watch_canary(cp_addr, spec, started, args.interval)));

    let interval = Duration::from_secs(1);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    let deadline = args.duration.map(|d| started + d);
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                let security = security_by_version(&pods);
                let config = frontend_config(&shared);
                let text = lock(&table).render(started.elapsed(), interval, &config, &security);
                print!("{text}{}", sidecar_counts(&shared.metrics.encode()));
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
            }
            ended = async {
                match canary.as_mut() {
                    Some(watcher) => watcher.await,
                    None => std::future::pending().await,
                }
            }, if canary.is_some() => {
                canary = None;
                match ended {
                    Ok(Ok(status)) => println!(">> [{:>5.1}s] canary analysis ended: {}", started.elapsed().as_secs_f64(), describe_end(&status)),
                    Ok(Err(e)) => println!(">> canary analysis not run: {e:#}"),
                    Err(e) => println!(">> canary analysis watcher stopped: {e}"),
                }
            }
            () = sidecar::shutdown_signal() => break,
        }
    }
    stop_tx.send_replace(true);
    let _ = load_task.await;
    split_task.abort();
    if let Some(canary) = canary {
        canary.abort();
    }
    print!("{}", lock(&table).summary());
    shared.drain.trigger();
    let _ = tokio::time::timeout(Duration::from_secs(3), data).await;
    for pod in pods {
        pod.sidecar.drain.trigger();
        let _ = tokio::time::timeout(Duration::from_secs(3), pod.data).await;
        pod.app.shutdown().await;
    }
    if let Err(e) = plane.shutdown(Duration::from_secs(3)).await {
        tracing::warn!(error = %e, "the demo's control plane did not stop cleanly");
    }
    if args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    println!("serin demo: stopped every upstream, the sidecars, the control plane and the load");
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        demo: DemoArgs,
    }

    fn parse(args: &[&str]) -> Result<DemoArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("demo").chain(args.iter().copied())).map(|c| c.demo)
    }

    #[test]
    fn a_healthy_canary_answers_without_errors() {
        let args = parse(&[]).expect("defaults parse");
        assert!((args.v2_errors() - 0.08).abs() < 1e-9);
        assert_eq!(args.interval, Duration::from_secs(3));
        let healthy = parse(&["--healthy-canary", "--interval", "1s"]).expect("flags parse");
        assert_eq!(healthy.v2_errors(), 0.0);
        assert_eq!(canary_spec(&healthy).interval_ms, 1000);
        assert!(parse(&["--interval", "500ms"]).is_err());
    }

    #[test]
    fn the_analysis_steps_up_to_its_max_weight() {
        let spec = canary_spec(&parse(&[]).expect("defaults parse"));
        assert_eq!(spec.step_weights.last(), Some(&spec.max_weight));
        assert!(spec.threshold >= 1 && spec.min_requests > 0);
    }

    #[test]
    fn the_control_plane_listens_on_free_loopback_ports() {
        let args = control_plane_args(Path::new("/c"), Path::new("/s")).expect("options");
        assert_eq!(args.listen, SocketAddr::from(([127, 0, 0, 1], 0)));
        assert_eq!(args.monitoring, SocketAddr::from(([127, 0, 0, 1], 0)));
        assert_eq!(args.config_dir, Path::new("/c"));
        assert_eq!(args.state_dir, Path::new("/s"));
    }

    #[test]
    fn phases_count_requests_sent_while_their_split_was_in_force() {
        let start = Instant::now();
        let mut table = Table::new("v1=100 v2=0".into(), start);
        let outcome = |version| Outcome {
            result: Ok(http::StatusCode::OK),
            version,
            latency: Duration::ZERO,
            service_time: Duration::ZERO,
        };
        table.record(&outcome(Some("v1")));
        table.end_phase(Instant::now());
        // Sent while the push was on its way: either split may have routed it.
        table.record(&outcome(Some("v2")));
        table.begin_phase("v1=95 v2=5".into(), "step 1".into(), Instant::now());
        table.record(&outcome(Some("v2")));
        table.record(&outcome(None));
        assert_eq!(table.phases[0].counts.get("v1"), Some(&1));
        assert_eq!(table.phases[0].counts.get("v2"), None);
        assert_eq!(table.phases[1].counts.get("v2"), Some(&1));
        assert_eq!(table.phases[1].errors, 1);
        let summary = table.summary();
        assert!(summary.contains("v1=100 v2=0  config          1 requests: v1 1 (100.00%), v2 0 (0.00%)"), "{summary}");
        assert!(summary.contains("step 1"), "{summary}");
        assert_eq!(table.versions["v2"].requests, 2);
    }
}
