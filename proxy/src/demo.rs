//! `serin demo`: a local canary of `payment` on loopback. Starts 3 × v1 and 1 × v2
//! demo upstreams, a sidecar routing 95/5 by an Istio config written from the
//! embedded template, and a steady load; prints a live table per version once a
//! second until Ctrl-C or `--duration`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hdrhistogram::Histogram;

use serin_certs::{Ca, SpiffeId, write_workload};

use crate::demo_app::{AppConfig, DemoApp};
use crate::demo_load::{LoadConfig, Outcome, Rate, run_load};
use crate::sidecar::{self, SidecarArgs};
use crate::state::Shared;
use crate::upstream::split::SplitMode;

/// The embedded canary config; `{{ENDPOINTS}}` becomes one WorkloadEntry per pod.
pub const TEMPLATE: &str = include_str!("demo/payment.yaml");

/// Options of `serin demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Stop after this long, e.g. `30s` or `30` (default: run until Ctrl-C).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Requests per second of the built-in load.
    #[arg(long, default_value_t = 300)]
    pub rate: u32,
    /// Share of v2's answers that are 503 errors (v1 answers without errors).
    #[arg(long, default_value_t = 0.05)]
    pub v2_error_rate: f64,
    /// Latency added by v2 (v1 adds 2ms).
    #[arg(long, default_value = "10ms", value_parser = humantime::parse_duration)]
    pub v2_latency: Duration,
    /// Folder for the generated config (default: a new folder under the temp dir).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// A duration like `30s`, `2m`, or a plain number of seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    match text.parse::<u64>() {
        Ok(secs) => Ok(Duration::from_secs(secs)),
        Err(_) => humantime::parse_duration(text).map_err(|e| e.to_string()),
    }
}

/// Per-version figures of the built-in load.
#[derive(Debug, Default)]
struct Table {
    versions: BTreeMap<String, VersionStats>,
    errors: u64,
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

impl Table {
    fn record(&mut self, o: &Outcome<'_>) {
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

    fn render(&mut self, elapsed: Duration, interval: Duration, security: &BTreeMap<String, String>) -> String {
        let total: u64 = self.versions.values().map(|v| v.requests).sum();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\n[{:>5.1}s] payment canary through the sidecar ({} requests)",
            elapsed.as_secs_f64(),
            total
        );
        let _ = writeln!(
            out,
            "{:<8} {:>9} {:>7} {:>8} {:>9} {:>9} {:>9}  security (seen by the pods)",
            "version", "requests", "rps", "share", "success", "p50", "p99"
        );
        for (version, s) in &mut self.versions {
            let rps = (s.requests - s.last_requests) as f64 / interval.as_secs_f64();
            s.last_requests = s.requests;
            let share = 100.0 * s.requests as f64 / total.max(1) as f64;
            let success = 100.0 * s.ok as f64 / s.requests.max(1) as f64;
            let p = |q: f64| Duration::from_micros(s.latency.value_at_quantile(q));
            let _ = writeln!(
                out,
                "{:<8} {:>9} {:>7.0} {:>7.2}% {:>8.2}% {:>9} {:>9}  {}",
                version,
                s.requests,
                rps,
                share,
                success,
                format!("{:.1}ms", p(0.5).as_secs_f64() * 1e3),
                format!("{:.1}ms", p(0.99).as_secs_f64() * 1e3),
                security.get(version.as_str()).map_or("-", String::as_str),
            );
        }
        if self.errors > 0 {
            let _ = writeln!(out, "(no answer from any version: {})", self.errors);
        }
        out
    }
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
async fn plaintext_refused(inbound: std::net::SocketAddr) -> bool {
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
pub fn render_config(pods: &[(&str, std::net::SocketAddr)]) -> String {
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

/// One payment pod: its app and the sidecar beside it (inbound, STRICT mTLS).
struct Pod {
    version: &'static str,
    app: DemoApp,
    sidecar: Arc<Shared>,
    inbound: std::net::SocketAddr,
    data: tokio::task::JoinHandle<()>,
}

/// Options of a demo sidecar on loopback with ephemeral ports.
fn sidecar_args(config: PathBuf, cert_dir: PathBuf, workload: &str, app_label: &str, version: &str) -> SidecarArgs {
    let any: std::net::SocketAddr = ([127, 0, 0, 1], 0).into();
    SidecarArgs {
        config: Some(config),
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
        control_plane: Default::default(),
    }
}

/// Issues `spiffe://cluster.local/ns/default/sa/<sa>` from `ca` into `dir/<sa>`.
fn issue_identity(ca: &Ca, dir: &std::path::Path, sa: &str) -> anyhow::Result<PathBuf> {
    let id: SpiffeId = format!("spiffe://cluster.local/ns/default/sa/{sa}").parse()?;
    let cert = ca.issue(&id, serin_certs::DEFAULT_WORKLOAD_LIFETIME)?;
    let out = dir.join("identities").join(sa);
    write_workload(&out, &cert)?;
    Ok(out)
}

/// Runs the demo until Ctrl-C or `--duration`.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("serin-demo-{}", std::process::id())),
    };
    let frontend_config = dir.join("frontend");
    let payment_config = dir.join("payment");
    for d in [&frontend_config, &payment_config] {
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
            let mut cfg = AppConfig::new("payment", version);
            if version == "v2" {
                cfg.error_rate = args.v2_error_rate;
                cfg.latency = args.v2_latency;
            } else {
                cfg.latency = Duration::from_millis(2);
            }
            let app = DemoApp::start(([127, 0, 0, 1], 0).into(), cfg).await.context("starting a demo upstream")?;
            let mut pod_args = sidecar_args(
                payment_config.clone(),
                payment_id.clone(),
                &format!("payment-{version}-{i}"),
                "payment",
                version,
            );
            pod_args.app = app.addr();
            let (sidecar, bound, data) = sidecar::start(&pod_args).await?;
            pods.push(Pod { version, app, sidecar, inbound: bound.inbound, data });
        }
    }
    let endpoints: Vec<(&str, std::net::SocketAddr)> = pods.iter().map(|p| (p.version, p.inbound)).collect();
    let config_path = frontend_config.join("payment.yaml");
    std::fs::write(&config_path, render_config(&endpoints))
        .with_context(|| format!("writing {}", config_path.display()))?;
    let (shared, bound, data) =
        sidecar::start(&sidecar_args(frontend_config.clone(), frontend_id, "frontend", "frontend", "v1")).await?;

    println!("serin demo: payment v1 ×3 (stable) and v2 ×1 (canary), a sidecar beside every pod, 95/5");
    println!("  frontend sidecar  http://{}/   (Host: payment)  → mutual TLS → payment sidecars", bound.outbound);
    println!("  metrics           http://{}/stats/prometheus", bound.metrics);
    println!("  admin             http://{}/config_dump   /clusters", bound.admin);
    println!("  config            {}   (edit the weights: the sidecar reloads it)", config_path.display());
    println!("  try               curl -H 'Host: payment' -H 'x-canary: always' http://{}/", bound.outbound);
    let refused = plaintext_refused(pods[0].inbound).await;
    println!(
        "  plaintext to payment-v1-0's sidecar (PeerAuthentication STRICT): {}",
        if refused { "refused" } else { "NOT refused (unexpected)" }
    );

    let table = Arc::new(Mutex::new(Table::default()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut load = LoadConfig::new(bound.outbound, "payment");
    load.rate = Rate::PerSecond(args.rate.max(1));
    load.connections = 16;
    load.duration = args.duration;
    let sink = table.clone();
    let load_task = tokio::spawn(run_load(load, stop_rx, move |_slot| {
        let sink = sink.clone();
        move |o: &Outcome<'_>| sink.lock().unwrap_or_else(|e| e.into_inner()).record(o)
    }));

    let started = Instant::now();
    let interval = Duration::from_secs(1);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    let deadline = args.duration.map(|d| started + d);
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                let security = security_by_version(&pods);
                let text = table.lock().unwrap_or_else(|e| e.into_inner()).render(started.elapsed(), interval, &security);
                print!("{text}{}", sidecar_counts(&shared.metrics.encode()));
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
            }
            () = sidecar::shutdown_signal() => break,
        }
    }
    stop_tx.send_replace(true);
    let _ = load_task.await;
    shared.drain.trigger();
    let _ = tokio::time::timeout(Duration::from_secs(3), data).await;
    for pod in pods {
        pod.sidecar.drain.trigger();
        let _ = tokio::time::timeout(Duration::from_secs(3), pod.data).await;
        pod.app.shutdown().await;
    }
    if args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    println!("serin demo: stopped every upstream, the sidecars and the load");
    Ok(())
}
