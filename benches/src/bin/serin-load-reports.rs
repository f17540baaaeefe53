//! `serin-load-reports`: what the sidecars' per-version load reports (issue 7) cost a
//! real `serin control-plane` process.
//!
//! 1. Starts `serin control-plane` on loopback (the start-up, `/proc` sampling and
//!    stream checks are [`serin_benches::push`]'s, shared with `serin-push-latency`).
//! 2. Opens `--streams` simulated sidecars, each the real sidecar client
//!    ([`client::subscribe_with`]) on its own HTTP/2 connection, subscribed to all
//!    four types, with load reporting on ([`client::LoadReports`], every `--interval`);
//!    waits until every one ACKed its first config (client side and as the control
//!    plane counts, `WaitForAck`).
//! 3. Idle window (`--idle`): every stream open, no report: the control plane's CPU.
//! 4. Reporting window (`--duration`): every `--interval` each stream sends a
//!    report like a sidecar at `--rps` requests per second sends: 2 services × 2
//!    versions (payment v1/v2 at 95/5, reviews v1/v2 at 75/25), status classes, a few
//!    resets and timeouts, durations in the `istio_request_duration_milliseconds`
//!    buckets (trailing zero buckets left out, as the proxy does). The control plane's
//!    CPU (`utime + stime`, `/proc/PID/stat`) and memory (`VmRSS`) are sampled every
//!    second, the TCP bytes of its connections (`ss -tin`) at the windows' edges.
//! 5. Stops reporting and checks that `GetLoad` sums exactly what was sent: requests
//!    by class, resets, timeouts, p50/p99 (from the same histogram), and the reporters.
//!
//! Bytes per report: `encoded_len` of the `DiscoveryRequest { load_report }` as sent,
//! plus the gRPC message prefix (5 bytes) and the HTTP/2 DATA frame header (9 bytes);
//! beside it the TCP bytes the control plane received per report (`ss -tin`).
//!
//! `cargo build --release -p serin -p serin-benches && target/release/serin-load-reports`

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use prost::Message as _;
use serde::Serialize;
use serin_benches::push::{
    self, ControlPlaneProcess, ProcSample, PushError, SERVICE, Summary, all_acked, bounded, check_streams, node_id,
    not_acked, rpc,
};
use serin_control_api::client::{self, LoadClient, LoadReports, ManagementClient, SubscribeOptions, Subscription};
use serin_control_api::server::{BUCKET_BOUNDS_MS, BUCKETS, HISTORY, quantile};
use serin_control_api::{ROUTES_TYPE_URL, ResourceType, pb};

/// gRPC length-prefixed message: 1 byte compressed flag + 4 bytes length.
const GRPC_PREFIX: usize = 5;
/// HTTP/2 frame header of the DATA frame carrying it.
const HTTP2_FRAME_HEADER: usize = 9;

/// What a sidecar calls, as `(service, version, share of its requests, median ms,
/// 5xx probability)`: the canary of `payment` at 95/5 and of `reviews` at 75/25, the
/// canaries a little slower and worse. Sorted by service and version, as the proxy
/// sorts a report.
const DESTINATIONS: [(&str, &str, f64, f64, f64); 4] = [
    ("payment.default.svc.cluster.local", "v1", 0.57, 8.0, 0.002),
    ("payment.default.svc.cluster.local", "v2", 0.03, 9.0, 0.010),
    ("reviews.default.svc.cluster.local", "v1", 0.30, 20.0, 0.002),
    ("reviews.default.svc.cluster.local", "v2", 0.10, 22.0, 0.005),
];

/// serin-load-reports: the cost of N sidecars' per-version load reports to a real
/// `serin control-plane`.
#[derive(Debug, Parser)]
#[command(name = "serin-load-reports", version, about)]
struct Args {
    /// Simulated sidecars: one discovery stream on its own HTTP/2 connection each.
    #[arg(long, default_value_t = 1000)]
    streams: usize,
    /// How long every stream sends reports (at most 14 minutes: the check reads it back
    /// from the 15-minute history).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Reporting interval of each stream (the sidecar's `--load-report-interval`).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Requests per second each simulated sidecar reports (±10% per interval).
    #[arg(long, default_value_t = 100)]
    rps: u32,
    /// CPU of the control plane is sampled over this window with every stream open and
    /// no report, before the reports start.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    idle: Duration,
    /// The serin binary to run as `serin control-plane`.
    #[arg(long, default_value = "target/release/serin")]
    serin_bin: PathBuf,
    /// Bound on opening every stream and getting every first ACK.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    setup_timeout: Duration,
    /// Bound on the whole run.
    #[arg(long, default_value = "20m", value_parser = humantime::parse_duration)]
    deadline: Duration,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    serin_benches::cli::init_logging("error");
    match main_inner(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("serin-load-reports: GetLoad does not sum exactly what was sent (see the check above)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("serin-load-reports: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs and prints; `Ok(false)` when the correctness check failed.
fn main_inner(args: &Args) -> anyhow::Result<bool> {
    if args.streams == 0 {
        bail!("--streams must be at least 1");
    }
    if args.duration.is_zero() || args.duration > HISTORY - Duration::from_secs(60) {
        bail!("--duration must be more than 0 and at most 14m (the control plane keeps 15 minutes)");
    }
    if args.interval < Duration::from_millis(10) || args.interval > args.duration {
        bail!("--interval must be at least 10ms and at most --duration");
    }
    let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    let report = runtime
        .block_on(async { tokio::time::timeout(args.deadline, run(args)).await })
        .map_err(|_| anyhow::anyhow!("the run did not finish within --deadline {:?}", args.deadline))?
        .context("load-reports run")?;
    runtime.shutdown_timeout(Duration::from_secs(1));
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).context("encoding the report")?);
    } else {
        print!("{}", report.render_text());
    }
    Ok(report.check.exact)
}

// ----------------------------------------------------------------------------------
// What the simulated sidecars report
// ----------------------------------------------------------------------------------

/// xorshift64*: deterministic per stream, no dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    fn normal(&mut self) -> f64 {
        let u1 = self.unit().max(f64::MIN_POSITIVE);
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// The counts of one (service, version), as a sidecar's `LoadCell` holds them.
#[derive(Debug, Clone, Default)]
struct Tally {
    /// 2xx, 3xx, 4xx, 5xx, resets, timeouts.
    classes: [u64; 6],
    buckets: [u64; BUCKETS],
    sum_us: u64,
}

impl Tally {
    fn requests(&self) -> u64 {
        self.classes[..4].iter().sum()
    }

    fn add(&mut self, other: &Tally) {
        for (a, b) in self.classes.iter_mut().zip(other.classes) {
            *a += b;
        }
        for (a, b) in self.buckets.iter_mut().zip(other.buckets) {
            *a += b;
        }
        self.sum_us += other.sum_us;
    }

    /// As the proxy's `LoadCell::take`: `None` without requests, trailing zero buckets
    /// left out.
    fn to_load(&self, service: &str, version: &str) -> Option<pb::VersionLoad> {
        if self.requests() == 0 {
            return None;
        }
        let len = self.buckets.iter().rposition(|b| *b > 0).map_or(0, |i| i + 1);
        Some(pb::VersionLoad {
            service: service.to_string(),
            version: version.to_string(),
            status_2xx: self.classes[0],
            status_3xx: self.classes[1],
            status_4xx: self.classes[2],
            status_5xx: self.classes[3],
            resets: self.classes[4],
            timeouts: self.classes[5],
            duration_buckets: self.buckets[..len].to_vec(),
            duration_sum_ms: self.sum_us as f64 / 1000.0,
        })
    }
}

/// One interval of a sidecar at `rps` requests per second (±10%).
fn simulate_interval(rng: &mut Rng, rps: u32, interval: Duration) -> [Tally; 4] {
    let mut tallies: [Tally; 4] = Default::default();
    let mean = f64::from(rps) * interval.as_secs_f64();
    let requests = (mean * (0.9 + 0.2 * rng.unit())).round() as u64;
    for _ in 0..requests {
        let pick = rng.unit();
        let mut acc = 0.0;
        let index = DESTINATIONS
            .iter()
            .position(|(_, _, share, _, _)| {
                acc += share;
                pick < acc
            })
            .unwrap_or(DESTINATIONS.len() - 1);
        let (_, _, _, median_ms, p5xx) = DESTINATIONS[index];
        let t = &mut tallies[index];
        let u = rng.unit();
        let mut ms = median_ms * (0.6 * rng.normal()).exp();
        if u < p5xx {
            t.classes[3] += 1;
            let kind = rng.unit();
            if kind < 0.3 {
                t.classes[4] += 1; // reset (UC/UR)
            } else if kind < 0.4 {
                t.classes[5] += 1; // timeout (UT) at the route's 3 s
                ms = 3000.0;
            }
        } else if u < p5xx + 0.01 {
            t.classes[2] += 1;
        } else if u < p5xx + 0.015 {
            t.classes[1] += 1;
        } else {
            t.classes[0] += 1;
        }
        t.buckets[BUCKET_BOUNDS_MS.partition_point(|bound| *bound < ms)] += 1;
        t.sum_us += (ms * 1000.0).round() as u64;
    }
    tallies
}

/// What every simulated sidecar handed to its stream, summed.
#[derive(Debug, Default)]
struct Sent {
    /// Per destination, in [`DESTINATIONS`] order.
    tallies: [Tally; 4],
    /// Reports taken.
    reports: u64,
    /// `encoded_len` of each `DiscoveryRequest { load_report }`.
    sizes: Vec<usize>,
    /// Entries (versions) in every report.
    entries: u64,
    /// Per simulated sidecar, the destinations it reported (bit `i`: `DESTINATIONS[i]`).
    reported: HashMap<usize, u8>,
}

/// Shared by every simulated sidecar's report task.
#[derive(Debug, Default)]
struct Reporting {
    on: AtomicBool,
    sent: Mutex<Sent>,
}

impl Reporting {
    fn lock(&self) -> std::sync::MutexGuard<'_, Sent> {
        self.sent.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The load reporting of simulated sidecar `index`: nothing while reporting is off.
fn load_reports(index: usize, rps: u32, interval: Duration, reporting: &Arc<Reporting>) -> LoadReports {
    let rng = Mutex::new(Rng::new(index as u64 + 1));
    let reporting = Arc::clone(reporting);
    let take = move || -> Option<pb::LoadReport> {
        if !reporting.on.load(Ordering::SeqCst) {
            return None;
        }
        let tallies = simulate_interval(&mut rng.lock().unwrap_or_else(|e| e.into_inner()), rps, interval);
        let loads: Vec<pb::VersionLoad> =
            tallies.iter().zip(DESTINATIONS).filter_map(|(t, (s, v, ..))| t.to_load(s, v)).collect();
        if loads.is_empty() {
            return None;
        }
        let report = pb::LoadReport { interval_ms: u32::try_from(interval.as_millis()).unwrap_or(u32::MAX), loads };
        let size =
            pb::DiscoveryRequest { load_report: Some(report.clone()), ..pb::DiscoveryRequest::default() }.encoded_len();
        let mut sent = reporting.lock();
        for (total, t) in sent.tallies.iter_mut().zip(&tallies) {
            total.add(t);
        }
        sent.reports += 1;
        sent.entries += report.loads.len() as u64;
        sent.sizes.push(size);
        let bits = tallies.iter().enumerate().filter(|(_, t)| t.requests() > 0).fold(0u8, |b, (i, _)| b | 1 << i);
        *sent.reported.entry(index).or_default() |= bits;
        Some(report)
    };
    LoadReports { interval, take: Arc::new(take) }
}

/// Opens `count` subscriptions, each on its own connection, with load reporting; each
/// ACKs whatever arrives (it does not compile the config: the two shared cores are
/// left to the control plane).
fn open_streams(
    cp: &ControlPlaneProcess,
    args: &Args,
    reporting: &Arc<Reporting>,
) -> anyhow::Result<Vec<Subscription>> {
    let mut subscriptions = Vec::with_capacity(args.streams);
    for i in 0..args.streams {
        let endpoint = client::endpoint(&format!("http://{}", cp.listen)).context("the control plane's address")?;
        let node = pb::Node {
            id: node_id(i),
            workload: "frontend".to_string(),
            namespace: "default".to_string(),
            labels: [("app", "frontend"), ("version", "v1")].into_iter().map(|(k, v)| (k.into(), v.into())).collect(),
        };
        let options = SubscribeOptions {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(10),
            load_reports: Some(load_reports(i, args.rps, args.interval, reporting)),
            ..SubscribeOptions::default()
        };
        let handler = |update: client::Update<'_>| -> Result<(), String> {
            let routes = update.state.types.get(&ResourceType::Routes).ok_or("no routes in the push")?;
            if routes.resources.is_empty() {
                return Err("the routes type holds no resource".to_string());
            }
            Ok(())
        };
        subscriptions.push(client::subscribe_with(endpoint, node, options, handler));
    }
    Ok(subscriptions)
}

// ----------------------------------------------------------------------------------
// Sampling
// ----------------------------------------------------------------------------------

/// TCP payload bytes the control plane's gRPC listener received and sent on its
/// established connections (`bytes_received`/`bytes_sent` of `ss -tin`: HTTP/2 frames
/// as they crossed loopback); zero when `ss` is not there.
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct Wire {
    received: u64,
    sent: u64,
}

impl Wire {
    fn read(port: u16) -> Wire {
        let out = std::process::Command::new("ss")
            .args(["-tinH", "state", "established", &format!("( sport = :{port} )")])
            .stderr(std::process::Stdio::null())
            .output();
        let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
        let sum = |key: &str| -> u64 {
            text.split_whitespace().filter_map(|f| f.strip_prefix(key)).filter_map(|v| v.parse::<u64>().ok()).sum()
        };
        Wire { received: sum("bytes_received:"), sent: sum("bytes_sent:") }
    }
}

/// The control plane at one moment.
#[derive(Debug, Clone, Copy, Serialize)]
struct Point {
    /// Seconds since the phase began.
    at_secs: f64,
    proc: ProcSample,
    /// Read at the edges of the windows only (zero elsewhere).
    wire: Wire,
}

fn point(cp: &ControlPlaneProcess, ticks: f64, since: Instant) -> Result<Point, PushError> {
    Ok(Point { at_secs: since.elapsed().as_secs_f64(), proc: cp.sample(ticks)?, wire: Wire::default() })
}

/// [`point`] with the listener's TCP bytes.
fn edge(cp: &ControlPlaneProcess, ticks: f64, since: Instant) -> Result<Point, PushError> {
    let wire = Wire::read(cp.listen.port());
    Ok(Point { wire, ..point(cp, ticks, since)? })
}

/// CPU, bytes and memory between two points.
#[derive(Debug, Clone, Copy, Serialize)]
struct Window {
    secs: f64,
    cpu_secs: f64,
    /// CPU, percent of one core.
    cpu_percent: f64,
    /// TCP payload bytes the control plane's listener received / sent (`ss -tin`).
    read_bytes: u64,
    written_bytes: u64,
    rss_before_kib: u64,
    rss_after_kib: u64,
    hwm_after_kib: u64,
}

impl Window {
    fn between(a: &Point, b: &Point) -> Window {
        let secs = (b.at_secs - a.at_secs).max(1e-9);
        let cpu_secs = b.proc.cpu_secs - a.proc.cpu_secs;
        Window {
            secs,
            cpu_secs,
            cpu_percent: 100.0 * cpu_secs / secs,
            read_bytes: b.wire.received.saturating_sub(a.wire.received),
            written_bytes: b.wire.sent.saturating_sub(a.wire.sent),
            rss_before_kib: a.proc.vm_rss_kib,
            rss_after_kib: b.proc.vm_rss_kib,
            hwm_after_kib: b.proc.vm_hwm_kib,
        }
    }
}

// ----------------------------------------------------------------------------------
// The check
// ----------------------------------------------------------------------------------

/// One version: what the simulated sidecars sent, what `GetLoad` answers.
#[derive(Debug, Clone, Serialize)]
struct CheckRow {
    service: String,
    version: String,
    /// 2xx, 3xx, 4xx, 5xx, resets, timeouts sent.
    sent: [u64; 6],
    /// As `GetLoad` answers.
    got: [u64; 6],
    sent_requests: u64,
    got_requests: u64,
    /// p50/p99 of the summed histogram (the control plane's own interpolation) …
    sent_p50_ms: Option<f64>,
    sent_p99_ms: Option<f64>,
    /// … and as `GetLoad` answers.
    got_p50_ms: Option<f64>,
    got_p99_ms: Option<f64>,
    /// Sidecars that sent this version, and as `GetLoad` counts them.
    sent_reporters: u32,
    got_reporters: u32,
    exact: bool,
}

#[derive(Debug, Clone, Serialize)]
struct Check {
    rows: Vec<CheckRow>,
    /// Versions `GetLoad` answered that no sidecar sent.
    unexpected: Vec<String>,
    /// Simulated sidecars that sent at least one report.
    streams_reporting: usize,
    /// Every row exact (reporters too), every stream reported, nothing unexpected.
    exact: bool,
    /// Time from the last report taken to the figures matching (or giving up).
    settle_ms: f64,
}

fn compare(sent: &Sent, figures: &pb::LoadFigures, streams: usize) -> Check {
    let mut rows = Vec::new();
    let mut unexpected = Vec::new();
    let by_key: BTreeMap<(&str, &str), &pb::VersionFigures> =
        figures.versions.iter().map(|v| ((v.service.as_str(), v.version.as_str()), v)).collect();
    for (index, ((service, version, ..), tally)) in DESTINATIONS.iter().zip(&sent.tallies).enumerate() {
        let got = by_key.get(&(*service, *version));
        let got_classes =
            got.map_or([0; 6], |v| [v.status_2xx, v.status_3xx, v.status_4xx, v.status_5xx, v.resets, v.timeouts]);
        let row = CheckRow {
            service: (*service).to_string(),
            version: (*version).to_string(),
            sent: tally.classes,
            got: got_classes,
            sent_requests: tally.requests(),
            got_requests: got.map_or(0, |v| v.requests),
            sent_p50_ms: quantile(0.5, &tally.buckets),
            sent_p99_ms: quantile(0.99, &tally.buckets),
            got_p50_ms: got.and_then(|v| v.p50_ms),
            got_p99_ms: got.and_then(|v| v.p99_ms),
            sent_reporters: sent.reported.values().filter(|bits| *bits & (1 << index) != 0).count() as u32,
            got_reporters: got.map_or(0, |v| v.reporters),
            exact: false,
        };
        let exact = row.sent == row.got
            && row.sent_requests == row.got_requests
            && row.sent_p50_ms == row.got_p50_ms
            && row.sent_p99_ms == row.got_p99_ms
            && row.sent_reporters == row.got_reporters;
        rows.push(CheckRow { exact, ..row });
    }
    for v in &figures.versions {
        if !DESTINATIONS.iter().any(|(s, ver, ..)| *s == v.service && *ver == v.version) {
            unexpected.push(format!("{} {}", v.service, v.version));
        }
    }
    let streams_reporting = sent.reported.len();
    let exact = unexpected.is_empty() && rows.iter().all(|r| r.exact) && streams_reporting == streams;
    Check { rows, unexpected, streams_reporting, exact, settle_ms: 0.0 }
}

// ----------------------------------------------------------------------------------
// The run
// ----------------------------------------------------------------------------------

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
struct Report {
    streams: usize,
    interval_ms: f64,
    rps_per_sidecar: u32,
    control_plane_pid: u32,
    control_plane_addr: String,
    /// From opening the first stream to every stream ACKed (client and server side).
    subscribe_secs: f64,
    /// Right after it was ready, no stream open.
    started: ProcSample,
    /// Every stream open, no report.
    idle: Window,
    /// Every stream reporting.
    reporting: Window,
    /// After the check (the history holds the run).
    after: ProcSample,
    /// CPU percent of each second of the reporting window.
    reporting_cpu_percent_per_second: Summary,
    /// Reports the simulated sidecars took and handed to their streams.
    reports: u64,
    /// Reports the subscriptions counted sent / dropped (no stream, queue full).
    reports_sent: u64,
    reports_dropped: u64,
    reports_per_sec: f64,
    /// Versions per report.
    entries_per_report: f64,
    /// `encoded_len` of `DiscoveryRequest { load_report }`, bytes.
    message_bytes: Summary,
    /// Mean message + gRPC prefix (5) + HTTP/2 DATA frame header (9).
    wire_bytes_mean: f64,
    /// (TCP bytes the control plane received over the reporting window − the idle
    /// window's rate) / reports.
    read_bytes_per_report: f64,
    /// The same for the bytes it sent (its WINDOW_UPDATEs, PINGs' ACKs and the like).
    written_bytes_per_report: f64,
    /// (reporting CPU − idle CPU) / reports, microseconds.
    cpu_us_per_report: f64,
    /// (series) held after the run.
    series: usize,
    /// VmRSS half-way through the reporting window, KiB: the first half holds the
    /// one-time growth of the connections' buffers once data flows.
    rss_mid_kib: u64,
    /// RSS growth over the second half of the reporting window per series per second of
    /// history, bytes: what the history costs (within the allocator's noise).
    rss_growth_per_series_second_bytes: f64,
    /// CPU seconds this process (every simulated sidecar) spent over the reporting window.
    client_reporting_cpu_secs: f64,
    /// Control-plane memory and CPU, every second of the reporting window.
    samples: Vec<Point>,
    check: Check,
}

fn kib_to_mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

async fn run(args: &Args) -> anyhow::Result<Report> {
    let need = args.streams as u64 + 256;
    if let Some(limit) = push::open_file_limit()
        && limit < need
    {
        return Err(PushError::FileLimit { limit, streams: args.streams, need }.into());
    }
    let ticks = push::ticks_per_sec();
    let mut cp = ControlPlaneProcess::start(&args.serin_bin, Duration::from_secs(30)).await?;
    let reporting = Arc::new(Reporting::default());
    let opened = Instant::now();
    let subscriptions = match open_streams(&cp, args, &reporting) {
        Ok(s) => s,
        Err(e) => {
            cp.stop(Duration::from_secs(5)).await;
            return Err(e);
        }
    };
    let result = measure(args, &mut cp, &subscriptions, &reporting, opened, ticks).await;
    reporting.on.store(false, Ordering::SeqCst);
    let mut closing = tokio::task::JoinSet::new();
    for sub in subscriptions {
        closing.spawn(sub.shutdown());
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), closing.join_all()).await;
    cp.stop(Duration::from_secs(5)).await;
    result
}

async fn measure(
    args: &Args,
    cp: &mut ControlPlaneProcess,
    subscriptions: &[Subscription],
    reporting: &Reporting,
    opened: Instant,
    ticks: f64,
) -> anyhow::Result<Report> {
    let n = args.streams;
    let address = format!("http://{}", cp.listen);
    let started = cp.sample(ticks)?;
    let mut mgmt = bounded("connecting to the management API", Duration::from_secs(15), async {
        ManagementClient::connect(&address).await.map_err(rpc("connecting to the management API"))
    })
    .await?;
    let config = bounded("GetConfig", Duration::from_secs(15), async {
        mgmt.config(SERVICE, Some(ResourceType::Routes)).await.map_err(rpc("GetConfig payment"))
    })
    .await?;
    let version = config.versions.get(ROUTES_TYPE_URL).cloned().ok_or_else(|| cp.failed("no routes version"))?;

    // Every first ACK, client side then as the control plane counts.
    let deadline = tokio::time::Instant::now() + args.setup_timeout;
    for (i, sub) in subscriptions.iter().enumerate() {
        let mut status = sub.status();
        if tokio::time::timeout_at(deadline, status.wait_for(|s| s.applied >= 1)).await.is_err() {
            cp.check_alive()?;
            check_streams(subscriptions)?;
            bail!("{} had not ACKed its first config within {:?}", node_id(i), args.setup_timeout);
        }
    }
    let acked = bounded("WaitForAck of the first config", args.setup_timeout + Duration::from_secs(5), async {
        mgmt.wait_for_ack(ResourceType::Routes, &version, SERVICE, args.setup_timeout).await.map_err(rpc("WaitForAck"))
    })
    .await?;
    if !all_acked(&acked, n) {
        bail!("the control plane does not count {n} sidecars ACKed:{}", not_acked(&acked));
    }
    let subscribe_secs = opened.elapsed().as_secs_f64();
    check_streams(subscriptions)?;

    // Idle: every stream open, no report.
    let t0 = Instant::now();
    let idle_start = edge(cp, ticks, t0)?;
    tokio::time::sleep(args.idle).await;
    let idle_end = edge(cp, ticks, t0)?;

    // Reporting, sampled every second.
    let client_before = ProcSample::read("self", ticks).context("reading /proc/self")?;
    reporting.on.store(true, Ordering::SeqCst);
    let r0 = Instant::now();
    let reporting_start = edge(cp, ticks, r0)?;
    let mut samples = vec![reporting_start];
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + Duration::from_secs(1), Duration::from_secs(1));
    while r0.elapsed() + Duration::from_millis(500) < args.duration {
        tick.tick().await;
        samples.push(point(cp, ticks, r0)?);
    }
    tokio::time::sleep(args.duration.saturating_sub(r0.elapsed())).await;
    reporting.on.store(false, Ordering::SeqCst);
    let reporting_end = edge(cp, ticks, r0)?;
    samples.push(reporting_end);
    let client_after = ProcSample::read("self", ticks).context("reading /proc/self")?;
    cp.check_alive()?;
    check_streams(subscriptions)?;

    // The check: poll GetLoad until it sums what was sent (reports still in flight
    // arrive within a few ms), at most 10 s.
    let stopped = Instant::now();
    let mut load = bounded("connecting to the Load service", Duration::from_secs(15), async {
        LoadClient::connect(&address).await.map_err(rpc("connecting to the Load service"))
    })
    .await?;
    let check = loop {
        let window = r0.elapsed() + Duration::from_secs(3);
        let figures = bounded("GetLoad", Duration::from_secs(15), async {
            load.load("", Some(window), false).await.map_err(rpc("GetLoad"))
        })
        .await?;
        let mut check = compare(&reporting.lock(), &figures, n);
        check.settle_ms = stopped.elapsed().as_secs_f64() * 1000.0;
        let over = check.rows.iter().any(|r| r.got_requests > r.sent_requests);
        if check.exact || over || stopped.elapsed() > Duration::from_secs(10) {
            break check;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let after = cp.sample(ticks)?;
    let series = bounded("GetLoad", Duration::from_secs(15), async {
        load.load("", Some(HISTORY), false).await.map_err(rpc("GetLoad"))
    })
    .await?
    .versions
    .len();

    let (mut reports_sent, mut reports_dropped) = (0, 0);
    for sub in subscriptions {
        let s = sub.status().borrow().clone();
        reports_sent += s.load_reports_sent;
        reports_dropped += s.load_reports_dropped;
    }
    let sent = reporting.lock();
    let idle = Window::between(&idle_start, &idle_end);
    let busy = Window::between(&reporting_start, &reporting_end);
    let reports = sent.reports;
    let per_report = |busy_total: f64, idle_total: f64| {
        if reports == 0 {
            return 0.0;
        }
        let idle_rate = idle_total / idle.secs;
        (busy_total - idle_rate * busy.secs) / reports as f64
    };
    let sizes: Vec<f64> = sent.sizes.iter().map(|s| *s as f64).collect();
    let message_bytes = Summary::of(&sizes);
    // Whole seconds only: the last window may be a few ms (10 ms CPU ticks).
    let per_second: Vec<f64> = samples
        .windows(2)
        .map(|w| Window::between(&w[0], &w[1]))
        .filter(|w| w.secs >= 0.5)
        .map(|w| w.cpu_percent)
        .collect();
    let mid = samples.iter().find(|p| p.at_secs >= busy.secs / 2.0).copied().unwrap_or(reporting_start);
    let second_half = (reporting_end.at_secs - mid.at_secs).max(1e-9);
    let growth_kib = reporting_end.proc.vm_rss_kib as f64 - mid.proc.vm_rss_kib as f64;
    Ok(Report {
        streams: n,
        interval_ms: args.interval.as_secs_f64() * 1000.0,
        rps_per_sidecar: args.rps,
        control_plane_pid: cp.pid().parse().unwrap_or(0),
        control_plane_addr: cp.listen.to_string(),
        subscribe_secs,
        started,
        idle,
        reporting: busy,
        after,
        reporting_cpu_percent_per_second: Summary::of(&per_second),
        reports,
        reports_sent,
        reports_dropped,
        reports_per_sec: reports as f64 / busy.secs,
        entries_per_report: if reports == 0 { 0.0 } else { sent.entries as f64 / reports as f64 },
        wire_bytes_mean: message_bytes.mean + (GRPC_PREFIX + HTTP2_FRAME_HEADER) as f64,
        message_bytes,
        read_bytes_per_report: per_report(busy.read_bytes as f64, idle.read_bytes as f64),
        written_bytes_per_report: per_report(busy.written_bytes as f64, idle.written_bytes as f64),
        cpu_us_per_report: 1e6 * per_report(busy.cpu_secs, idle.cpu_secs),
        series,
        rss_mid_kib: mid.proc.vm_rss_kib,
        rss_growth_per_series_second_bytes: if series == 0 {
            0.0
        } else {
            growth_kib * 1024.0 / series as f64 / second_half
        },
        client_reporting_cpu_secs: client_after.cpu_secs - client_before.cpu_secs,
        samples,
        check,
    })
}

impl Report {
    fn render_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "serin control-plane pid {} on {}; {} simulated sidecars, one gRPC stream and one HTTP/2 connection each, \
             subscribed and ACKed in {:.2} s",
            self.control_plane_pid, self.control_plane_addr, self.streams, self.subscribe_secs
        );
        let _ = writeln!(
            out,
            "each reports every {:.0} ms what a sidecar at {} rps sends (2 services x 2 versions, {:.2} entries per \
             report)",
            self.interval_ms, self.rps_per_sidecar, self.entries_per_report
        );
        let _ = writeln!(
            out,
            "reports: {} taken, {} sent, {} dropped; {:.1} reports/s over {:.1} s",
            self.reports, self.reports_sent, self.reports_dropped, self.reports_per_sec, self.reporting.secs
        );
        let m = &self.message_bytes;
        let _ = writeln!(
            out,
            "bytes per report: DiscoveryRequest{{load_report}} encoded_len mean {:.1} (min {:.0}, p50 {:.0}, max {:.0}) \
             + {GRPC_PREFIX} gRPC prefix + {HTTP2_FRAME_HEADER} HTTP/2 frame header = {:.1} on the wire",
            m.mean, m.min, m.p50, m.max, self.wire_bytes_mean
        );
        let _ = writeln!(
            out,
            "  measured on its TCP connections (ss -tin, idle rate taken out): the control plane received {:.1} B and \
             sent {:.1} B per report; {:.1} KiB/s in for {} sidecars",
            self.read_bytes_per_report,
            self.written_bytes_per_report,
            self.read_bytes_per_report * self.reports_per_sec / 1024.0,
            self.streams
        );
        let (i, r) = (&self.idle, &self.reporting);
        let _ = writeln!(out, "control plane CPU (utime+stime, % of one core):");
        let _ = writeln!(
            out,
            "  idle streams       {:6.2} %  ({:.2} s CPU over {:.1} s)",
            i.cpu_percent, i.cpu_secs, i.secs
        );
        let c = &self.reporting_cpu_percent_per_second;
        let _ = writeln!(
            out,
            "  reporting          {:6.2} %  ({:.2} s CPU over {:.1} s; per second p50 {:.1} %, max {:.1} %)",
            r.cpu_percent, r.cpu_secs, r.secs, c.p50, c.max
        );
        let _ = writeln!(
            out,
            "  per report         {:6.1} us CPU (reporting minus idle, over the reports)",
            self.cpu_us_per_report
        );
        let _ = writeln!(
            out,
            "  this process (the {} simulated sidecars): {:.2} s CPU over the reporting window",
            self.streams, self.client_reporting_cpu_secs
        );
        let _ = writeln!(out, "control plane memory (VmRSS):");
        let _ = writeln!(out, "  started, no stream         {:7.1} MiB", kib_to_mib(self.started.vm_rss_kib));
        let _ = writeln!(out, "  streams open, before       {:7.1} MiB", kib_to_mib(r.rss_before_kib));
        let _ = writeln!(
            out,
            "  after {:>4.0} s of reports    {:7.1} MiB  (VmHWM {:.1} MiB; {:+.1} MiB)",
            r.secs,
            kib_to_mib(r.rss_after_kib),
            kib_to_mib(r.hwm_after_kib),
            (r.rss_after_kib as f64 - r.rss_before_kib as f64) / 1024.0
        );
        let _ = writeln!(
            out,
            "  half-way {:.1} MiB: {:+.1} MiB over the first half (the connections' buffers, once), {:+.1} KiB over \
             the second",
            kib_to_mib(self.rss_mid_kib),
            (self.rss_mid_kib as f64 - r.rss_before_kib as f64) / 1024.0,
            r.rss_after_kib as f64 - self.rss_mid_kib as f64
        );
        let _ = writeln!(
            out,
            "  {} series held; second half: {:.0} B per series per second of history (x 900 s = {:.0} KiB per series \
             at full history, if linear)",
            self.series,
            self.rss_growth_per_series_second_bytes,
            self.rss_growth_per_series_second_bytes * 900.0 / 1024.0
        );
        let _ = writeln!(
            out,
            "check: GetLoad sums exactly what was sent: {} ({} of {} sidecars reported; settled {:.0} ms after the \
             last report; sent/got)",
            if self.check.exact { "YES" } else { "NO" },
            self.check.streams_reporting,
            self.streams,
            self.check.settle_ms
        );
        for row in &self.check.rows {
            let _ = writeln!(
                out,
                "  {:<36}{:<4} sent {:>8} req [2xx {} 3xx {} 4xx {} 5xx {} reset {} timeout {}]  got {:>8} req [{} {} {} {} \
                 {} {}]  p50 {:.3}/{:.3} p99 {:.3}/{:.3} ms  reporters {}/{}  {}",
                row.service,
                row.version,
                row.sent_requests,
                row.sent[0],
                row.sent[1],
                row.sent[2],
                row.sent[3],
                row.sent[4],
                row.sent[5],
                row.got_requests,
                row.got[0],
                row.got[1],
                row.got[2],
                row.got[3],
                row.got[4],
                row.got[5],
                row.sent_p50_ms.unwrap_or(f64::NAN),
                row.got_p50_ms.unwrap_or(f64::NAN),
                row.sent_p99_ms.unwrap_or(f64::NAN),
                row.got_p99_ms.unwrap_or(f64::NAN),
                row.sent_reporters,
                row.got_reporters,
                if row.exact { "exact" } else { "MISMATCH" }
            );
        }
        for u in &self.check.unexpected {
            let _ = writeln!(out, "  unexpected in GetLoad: {u}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sidecar_at_100_rps_sends_a_small_report() {
        let mut rng = Rng::new(7);
        let tallies = simulate_interval(&mut rng, 100, Duration::from_secs(1));
        let total: u64 = tallies.iter().map(Tally::requests).sum();
        assert!((90..=110).contains(&total), "{total}");
        let loads: Vec<pb::VersionLoad> =
            tallies.iter().zip(DESTINATIONS).filter_map(|(t, (s, v, ..))| t.to_load(s, v)).collect();
        assert!(loads.len() >= 3);
        for load in &loads {
            assert!(load.duration_buckets.last().is_some_and(|b| *b > 0), "trailing zeros left out");
        }
        let report = pb::LoadReport { interval_ms: 1000, loads };
        assert!(serin_control_api::server::check_report(&report).is_ok());
    }

    #[test]
    fn compare_finds_a_difference() {
        let mut sent = Sent::default();
        sent.tallies[0].classes[0] = 3;
        sent.tallies[0].buckets[2] = 3;
        sent.reported.insert(0, 1);
        let figures = pb::LoadFigures {
            versions: vec![pb::VersionFigures {
                service: DESTINATIONS[0].0.to_string(),
                version: "v1".to_string(),
                requests: 3,
                status_2xx: 3,
                p50_ms: quantile(0.5, &sent.tallies[0].buckets),
                p99_ms: quantile(0.99, &sent.tallies[0].buckets),
                reporters: 1,
                ..pb::VersionFigures::default()
            }],
            ..pb::LoadFigures::default()
        };
        assert!(compare(&sent, &figures, 1).exact);
        assert!(!compare(&sent, &figures, 2).exact, "a stream did not report");
        sent.reported.insert(1, 1);
        assert!(!compare(&sent, &figures, 2).exact, "a reporter not counted");
        sent.tallies[0].classes[0] = 4;
        assert!(!compare(&sent, &figures, 1).exact);
    }
}
