//! The core of `serin-load`: runs [`serin::demo_load`]'s load loop and turns what
//! every request did into a [`LoadReport`]: request rate, status classes, transport
//! errors, latency percentiles from HdrHistograms, and the share of each version.
//!
//! ```no_run
//! # async fn f() -> Result<(), serin_benches::load::LoadError> {
//! use serin_benches::load::{LoadConfig, Rate, run};
//! let mut cfg = LoadConfig::new("127.0.0.1:15001".parse().unwrap(), "payment");
//! cfg.connections = 16;
//! cfg.rate = Rate::PerSecond(1000);
//! cfg.duration = Some(std::time::Duration::from_secs(10));
//! let report = run(cfg).await?;
//! println!("{}", report.render_text());
//! # Ok(())
//! # }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
pub use serin::demo_load::{LoadConfig, LoadError, Outcome, Protocol, Rate, Recorder, RequestError};
use tokio::sync::watch;

/// Significant figures kept by the latency histograms.
const SIGFIG: u8 = 3;

/// Name under which answers that carried no version are counted.
pub const UNKNOWN_VERSION: &str = "unknown";

/// What one slot saw; merged into one at the end of a run.
#[derive(Debug, Clone)]
pub struct Stats {
    /// Latency of every answer (any status), nanoseconds, corrected for coordinated
    /// omission in an open-loop run.
    pub latency: Histogram<u64>,
    /// From the actual send to the end of the answer, nanoseconds.
    pub service_time: Histogram<u64>,
    /// Answers by status class: index 1 = 1xx … 5 = 5xx; 0 = anything else.
    pub classes: [u64; 6],
    /// Requests without an answer, by reason.
    pub transport: HashMap<RequestError, u64>,
    /// Answers by version (`x-version` header or JSON `version`), [`UNKNOWN_VERSION`]
    /// when none.
    pub versions: HashMap<String, u64>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats::new()
    }
}

fn histogram() -> Histogram<u64> {
    // Auto-resizing: memory grows only with the largest value seen. `new` fails only
    // for a sigfig above 5.
    Histogram::new(SIGFIG).unwrap_or_else(|_| unreachable!("sigfig {SIGFIG} is valid"))
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1)
}

impl Stats {
    /// Nothing recorded yet.
    pub fn new() -> Stats {
        Stats {
            latency: histogram(),
            service_time: histogram(),
            classes: [0; 6],
            transport: HashMap::new(),
            versions: HashMap::new(),
        }
    }

    /// Adds `other` into `self`.
    pub fn merge(&mut self, other: &Stats) {
        // Both histograms auto-resize, so adding cannot run out of range.
        let _ = self.latency.add(&other.latency);
        let _ = self.service_time.add(&other.service_time);
        for (mine, theirs) in self.classes.iter_mut().zip(other.classes) {
            *mine += theirs;
        }
        for (e, n) in &other.transport {
            *self.transport.entry(*e).or_default() += n;
        }
        for (v, n) in &other.versions {
            match self.versions.get_mut(v.as_str()) {
                Some(count) => *count += n,
                None => {
                    self.versions.insert(v.clone(), *n);
                }
            }
        }
    }

    /// Every recorded request: answers and failures.
    pub fn requests(&self) -> u64 {
        self.classes.iter().sum::<u64>() + self.transport.values().sum::<u64>()
    }
}

impl Recorder for Stats {
    fn record(&mut self, o: &Outcome<'_>) {
        match o.result {
            Ok(status) => {
                let class = usize::from(status.as_u16() / 100);
                self.classes[if (1..=5).contains(&class) { class } else { 0 }] += 1;
                let _ = self.latency.record(nanos(o.latency));
                let _ = self.service_time.record(nanos(o.service_time));
                let version = o.version.unwrap_or(UNKNOWN_VERSION);
                // Look up by &str first: no allocation once a version has been seen.
                match self.versions.get_mut(version) {
                    Some(n) => *n += 1,
                    None => {
                        self.versions.insert(version.to_owned(), 1);
                    }
                }
            }
            Err(e) => *self.transport.entry(e).or_default() += 1,
        }
    }
}

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Percentiles {
    /// Values recorded.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest value.
    pub max: f64,
    /// Arithmetic mean.
    pub mean: f64,
}

impl Percentiles {
    /// Summarises a histogram of nanoseconds.
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        let ms = |ns: u64| ns as f64 / 1e6;
        Percentiles {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean() / 1e6,
        }
    }
}

/// Answers by status class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StatusClasses {
    /// 1xx answers.
    #[serde(rename = "1xx")]
    pub informational: u64,
    /// 2xx answers.
    #[serde(rename = "2xx")]
    pub success: u64,
    /// 3xx answers.
    #[serde(rename = "3xx")]
    pub redirect: u64,
    /// 4xx answers.
    #[serde(rename = "4xx")]
    pub client_error: u64,
    /// 5xx answers.
    #[serde(rename = "5xx")]
    pub server_error: u64,
}

/// Failed requests: error answers and requests that got no answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ErrorCounts {
    /// All of the below.
    pub total: u64,
    /// 4xx answers.
    pub http_4xx: u64,
    /// 5xx answers.
    pub http_5xx: u64,
    /// TCP connect or HTTP handshake failed.
    pub connect: u64,
    /// No whole answer within the timeout.
    pub timeout: u64,
    /// The connection failed before the answer's head.
    pub send: u64,
    /// The answer's body failed midway.
    pub body: u64,
}

/// How many answers one version gave.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct VersionShare {
    /// Answers from this version.
    pub requests: u64,
    /// Share of all answers, 0..=1.
    pub share: f64,
}

/// The result of a load run (what `serin-load --json` prints).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoadReport {
    /// The address load was sent to.
    pub target: String,
    /// `Host` / `:authority` sent.
    pub authority: String,
    /// Path sent.
    pub path: String,
    /// `http1` or `h2c`.
    pub protocol: &'static str,
    /// Request slots.
    pub connections: usize,
    /// Open-loop rate asked for (requests per second); `None` for closed loop (max).
    pub target_rate: Option<u32>,
    /// Seconds from the first request to the last answer.
    pub duration_secs: f64,
    /// Requests finished (answered or failed).
    pub requests: u64,
    /// `requests / duration_secs`.
    pub rps: f64,
    /// Answers by status class.
    pub responses: StatusClasses,
    /// Failures.
    pub errors: ErrorCounts,
    /// Latency of all answers, ms; in an open-loop run measured from the intended
    /// send time when running behind (corrected for coordinated omission).
    pub latency_ms: Percentiles,
    /// From the actual send to the end of each answer, ms (uncorrected).
    pub service_time_ms: Percentiles,
    /// Whether `latency_ms` is corrected for coordinated omission (open loop).
    pub coordinated_omission_corrected: bool,
    /// Answers by version, with their share of all answers.
    pub versions: BTreeMap<String, VersionShare>,
}

impl LoadReport {
    /// Builds the report of a run of `cfg` that took `elapsed` and saw `stats`.
    pub fn new(cfg: &LoadConfig, elapsed: Duration, stats: &Stats) -> LoadReport {
        let requests = stats.requests();
        let secs = elapsed.as_secs_f64();
        let c = &stats.classes;
        let responses = StatusClasses {
            informational: c[1],
            success: c[2],
            redirect: c[3],
            client_error: c[4],
            server_error: c[5],
        };
        let t = |e| stats.transport.get(&e).copied().unwrap_or(0);
        let mut errors = ErrorCounts {
            total: 0,
            http_4xx: c[4],
            http_5xx: c[5],
            connect: t(RequestError::Connect),
            timeout: t(RequestError::Timeout),
            send: t(RequestError::Send),
            body: t(RequestError::Body),
        };
        errors.total = errors.http_4xx + errors.http_5xx + errors.connect + errors.timeout + errors.send + errors.body;
        let answered: u64 = stats.versions.values().sum();
        let versions = stats
            .versions
            .iter()
            .map(|(v, &n)| {
                let share = if answered == 0 { 0.0 } else { n as f64 / answered as f64 };
                (v.clone(), VersionShare { requests: n, share })
            })
            .collect();
        let target_rate = match cfg.rate {
            Rate::Max => None,
            Rate::PerSecond(r) => Some(r),
        };
        LoadReport {
            target: cfg.target.to_string(),
            authority: cfg.authority.clone(),
            path: cfg.path.clone(),
            protocol: match cfg.protocol {
                Protocol::Http1 => "http1",
                Protocol::Http2 => "h2c",
            },
            connections: cfg.connections,
            target_rate,
            duration_secs: secs,
            requests,
            rps: if secs > 0.0 { requests as f64 / secs } else { 0.0 },
            responses,
            errors,
            latency_ms: Percentiles::of(&stats.latency),
            service_time_ms: Percentiles::of(&stats.service_time),
            coordinated_omission_corrected: target_rate.is_some(),
            versions,
        }
    }

    /// A human-readable summary (what `serin-load` prints without `--json`).
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let mode = match self.target_rate {
            Some(r) => format!("open loop at {r} req/s"),
            None => "closed loop (max rate)".to_owned(),
        };
        let _ = writeln!(
            out,
            "target        {}{} (host {}), {}, {} connections, {}",
            self.target, self.path, self.authority, self.protocol, self.connections, mode
        );
        let _ = writeln!(out, "requests      {} in {:.2}s = {:.1} req/s", self.requests, self.duration_secs, self.rps);
        let r = &self.responses;
        let _ = writeln!(
            out,
            "responses     2xx {}  3xx {}  4xx {}  5xx {}  1xx {}",
            r.success, r.redirect, r.client_error, r.server_error, r.informational
        );
        let e = &self.errors;
        let _ = writeln!(
            out,
            "errors        {} (4xx {}, 5xx {}, connect {}, timeout {}, send {}, body {})",
            e.total, e.http_4xx, e.http_5xx, e.connect, e.timeout, e.send, e.body
        );
        let line = |p: &Percentiles| {
            format!(
                "p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  mean {:.3} (ms)",
                p.p50, p.p90, p.p99, p.p999, p.max, p.mean
            )
        };
        let latency_note =
            if self.coordinated_omission_corrected { "  [corrected for coordinated omission]" } else { "" };
        let _ = writeln!(out, "latency       {}{latency_note}", line(&self.latency_ms));
        if self.coordinated_omission_corrected {
            let _ = writeln!(out, "service time  {}", line(&self.service_time_ms));
        }
        let versions: Vec<String> =
            self.versions.iter().map(|(v, s)| format!("{v} {} ({:.2}%)", s.requests, s.share * 100.0)).collect();
        let _ =
            writeln!(out, "versions      {}", if versions.is_empty() { "-".to_owned() } else { versions.join("  ") });
        out
    }
}

/// Runs `cfg` to its end (duration or request count) and reports.
///
/// A config with neither `duration` nor `max_requests` would run forever; it is
/// given a 10 s duration.
pub async fn run(cfg: LoadConfig) -> Result<LoadReport, LoadError> {
    // The sender stays alive for the whole run, so the run never stops early.
    let (_keep, stop) = watch::channel(false);
    run_until(cfg, stop).await
}

/// Like [`run`], but also stops early when `stop` turns true (e.g. on Ctrl-C), and
/// reports what was done until then.
pub async fn run_until(mut cfg: LoadConfig, stop: watch::Receiver<bool>) -> Result<LoadReport, LoadError> {
    if cfg.duration.is_none() && cfg.max_requests.is_none() {
        cfg.duration = Some(Duration::from_secs(10));
    }
    let run = serin::demo_load::run_load(cfg.clone(), stop, |_| Stats::new()).await?;
    let mut total = Stats::new();
    for s in &run.recorders {
        total.merge(s);
    }
    Ok(LoadReport::new(&cfg, run.elapsed, &total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    fn outcome(result: Result<StatusCode, RequestError>, version: Option<&str>, ms: u64) -> Outcome<'_> {
        let d = Duration::from_millis(ms);
        Outcome { result, version, latency: d, service_time: d }
    }

    #[test]
    fn records_and_merges() {
        let mut a = Stats::new();
        let mut b = Stats::new();
        for i in 0..95 {
            a.record(&outcome(Ok(StatusCode::OK), Some("v1"), i % 10 + 1));
        }
        for _ in 0..5 {
            b.record(&outcome(Ok(StatusCode::SERVICE_UNAVAILABLE), Some("v2"), 100));
        }
        b.record(&outcome(Err(RequestError::Connect), None, 1));
        b.record(&outcome(Ok(StatusCode::NOT_FOUND), None, 1));
        a.merge(&b);
        assert_eq!(a.requests(), 102);
        let mut cfg = LoadConfig::new("127.0.0.1:1".parse().unwrap(), "payment");
        cfg.rate = Rate::PerSecond(100);
        let r = LoadReport::new(&cfg, Duration::from_secs(1), &a);
        assert_eq!(r.requests, 102);
        assert_eq!(r.responses.success, 95);
        assert_eq!(r.responses.server_error, 5);
        assert_eq!(r.errors.total, 7);
        assert_eq!(r.errors.connect, 1);
        assert_eq!(r.versions["v1"].requests, 95);
        assert_eq!(r.versions["v2"].requests, 5);
        assert_eq!(r.versions[UNKNOWN_VERSION].requests, 1);
        assert!((r.versions["v1"].share - 95.0 / 101.0).abs() < 1e-9);
        assert_eq!(r.latency_ms.count, 101);
        assert!(r.latency_ms.max >= 99.0);
        assert!(r.coordinated_omission_corrected);
        let text = r.render_text();
        assert!(text.contains("v2 5"), "{text}");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["responses"]["2xx"], 95);
        assert_eq!(json["target_rate"], 100);
    }
}
