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

use crate::demo_app::{AppConfig, DemoApp};
use crate::demo_load::{LoadConfig, Outcome, Rate, run_load};
use crate::sidecar::{self, SidecarArgs};
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

    fn render(&mut self, elapsed: Duration, interval: Duration) -> String {
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
            "{:<8} {:>9} {:>7} {:>8} {:>9} {:>9} {:>9}",
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
                "{:<8} {:>9} {:>7.0} {:>7.2}% {:>8.2}% {:>9} {:>9}",
                version,
                s.requests,
                rps,
                share,
                success,
                format!("{:.1}ms", p(0.5).as_secs_f64() * 1e3),
                format!("{:.1}ms", p(0.99).as_secs_f64() * 1e3),
            );
        }
        if self.errors > 0 {
            let _ = writeln!(out, "(no answer from any version: {})", self.errors);
        }
        out
    }
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

/// The config text for the given pods: `(version, address)` pairs.
pub fn render_config(pods: &[(&str, std::net::SocketAddr)]) -> String {
    let mut entries = String::new();
    for (i, (version, addr)) in pods.iter().enumerate() {
        let _ = write!(
            entries,
            "---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: payment-{version}-{i}\n  namespace: default\nspec:\n  address: {}\n  ports:\n    http: {}\n  labels:\n    app: payment\n    version: {version}\n",
            addr.ip(),
            addr.port()
        );
    }
    TEMPLATE.replace("{{ENDPOINTS}}\n", &entries)
}

/// Runs the demo until Ctrl-C or `--duration`.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let mut apps = Vec::new();
    let mut pods = Vec::new();
    for (version, count) in [("v1", 3), ("v2", 1)] {
        for _ in 0..count {
            let mut cfg = AppConfig::new("payment", version);
            if version == "v2" {
                cfg.error_rate = args.v2_error_rate;
                cfg.latency = args.v2_latency;
            } else {
                cfg.latency = Duration::from_millis(2);
            }
            let app = DemoApp::start("127.0.0.1:0".parse()?, cfg).await.context("starting a demo upstream")?;
            pods.push((version, app.addr()));
            apps.push(app);
        }
    }
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("serin-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let config_path = dir.join("payment.yaml");
    std::fs::write(&config_path, render_config(&pods)).with_context(|| format!("writing {}", config_path.display()))?;

    let any = "127.0.0.1:0".parse()?;
    let sidecar_args = SidecarArgs {
        config: Some(dir.clone()),
        outbound: any,
        inbound: any,
        app: "127.0.0.1:8080".parse()?,
        admin: any,
        metrics: any,
        health: any,
        workload: "frontend".into(),
        namespace: "default".into(),
        app_label: "frontend".into(),
        app_version: "v1".into(),
        no_access_log: true,
        cert_dir: None,
        split: SplitMode::Exact,
        drain_timeout: Duration::from_secs(2),
    };
    let (shared, bound, data) = sidecar::start(&sidecar_args).await?;
    println!("serin demo: payment v1 ×3 (stable) and v2 ×1 (canary) behind a sidecar, 95/5");
    println!("  sidecar outbound  http://{}/   (Host: payment)", bound.outbound);
    println!("  metrics           http://{}/stats/prometheus", bound.metrics);
    println!("  admin             http://{}/config_dump   /clusters", bound.admin);
    println!("  config            {}   (edit the weights: the sidecar reloads it)", config_path.display());
    println!("  try               curl -H 'Host: payment' -H 'x-canary: always' http://{}/", bound.outbound);

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
                let text = table.lock().unwrap_or_else(|e| e.into_inner()).render(started.elapsed(), interval);
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
    for app in apps {
        app.shutdown().await;
    }
    if args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    println!("serin demo: stopped every upstream, the sidecar and the load");
    Ok(())
}
