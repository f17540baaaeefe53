//! The load figures the sidecars report on their discovery streams
//! (`DiscoveryRequest.load_report`), aggregated across sidecars: [`LoadStats`], and the
//! gRPC `Load` service that answers `GetLoad` from it.
//!
//! Each report is added to the second it arrived in (Unix seconds, control plane
//! clock), per destination service and version. A series keeps at most [`HISTORY`] of
//! seconds (only seconds with data stored, each packed in a few bytes once the series
//! moved on to a later second); a series without a report for [`HISTORY`] is dropped.
//! At most [`MAX_SERIES`] series exist at once, and once [`SHARED_SERIES`] exist one
//! sidecar may have created at most [`MAX_SERIES_PER_NODE`] of them (so one stream
//! reporting made-up names cannot crowd out the others): reports for more are dropped
//! and counted
//! ([`LoadStats::dropped_series_by_reason`]). Per series the last second each sidecar
//! reported it is kept, which counts the reporters of a window.
//!
//! A report from a stream is never a reason to end the stream ([`LoadStats::accept`]):
//! entries over [`MAX_REPORT_ENTRIES`] and malformed entries are dropped and counted
//! ([`LoadStats::rejected_reports`]), the rest is recorded.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tonic::{Request, Response, Status};

use crate::pb;

/// How far back the figures go: 15 minutes at one-second resolution.
pub const HISTORY: Duration = Duration::from_secs(900);
/// The window of a `GetLoad` that names none.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(60);
/// Most (service, version) series kept at once.
pub const MAX_SERIES: usize = 10_000;
/// Most series one sidecar (node id) may have created and still hold (series it was
/// the first to report) once [`SHARED_SERIES`] series exist: past that, reports of
/// more new series from it are dropped and counted. Below, a sidecar may create more
/// (one that alone calls thousands of services loses nothing in an uncrowded mesh),
/// yet one stream making up names can never hold more than half of [`MAX_SERIES`].
pub const MAX_SERIES_PER_NODE: usize = 2_000;
/// The series count up to which [`MAX_SERIES_PER_NODE`] does not apply.
pub const SHARED_SERIES: usize = MAX_SERIES / 2;
/// Most entries one report may carry: a sidecar with more splits them over several
/// requests; the entries past it of a bigger report are dropped (and counted).
pub const MAX_REPORT_ENTRIES: usize = 1_000;
/// Longest service or version name accepted in a report.
pub const MAX_NAME_LEN: usize = 253;
/// Duration buckets of a report: the 19 bounds of
/// `istio_request_duration_milliseconds` and the overflow bucket.
pub const BUCKETS: usize = 20;
/// Upper bounds of the duration buckets, milliseconds (Envoy's defaults); the 20th
/// bucket has none.
pub const BUCKET_BOUNDS_MS: [f64; BUCKETS - 1] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0, 300000.0,
    600000.0, 1800000.0, 3600000.0,
];

const HISTORY_S: i64 = HISTORY.as_secs() as i64;

/// Why (part of) a report was not recorded: the `reason` label of
/// `serin_load_reports_rejected_total`.
const TOO_MANY_ENTRIES: usize = 0;
const MALFORMED: usize = 1;
const REJECT_REASONS: [&str; 2] = ["too_many_entries", "malformed"];
/// Why a report entry found no series: the `reason` label of
/// `serin_load_series_dropped_total`.
const SERIES_CAP: usize = 0;
const NODE_SERIES_CAP: usize = 1;
const DROP_REASONS: [&str; 2] = ["series_cap", "node_series_cap"];
/// At most one warning about rejected reports per this many seconds (the others are
/// logged at debug level).
const WARN_EVERY_S: i64 = 60;

/// What is wrong with entry `i` of a report, if anything.
fn entry_problem(i: usize, load: &pb::VersionLoad) -> Option<String> {
    if load.service.trim().is_empty() {
        return Some(format!("load_report.loads[{i}].service is empty"));
    }
    if load.service.len() > MAX_NAME_LEN || load.version.len() > MAX_NAME_LEN {
        return Some(format!("load_report.loads[{i}]: a service or version name longer than {MAX_NAME_LEN} bytes"));
    }
    if load.duration_buckets.len() > BUCKETS {
        return Some(format!(
            "load_report.loads[{i}].duration_buckets has {} entries; at most {BUCKETS}",
            load.duration_buckets.len()
        ));
    }
    None
}

fn entry_ok(load: &pb::VersionLoad) -> bool {
    !load.service.trim().is_empty()
        && load.service.len() <= MAX_NAME_LEN
        && load.version.len() <= MAX_NAME_LEN
        && load.duration_buckets.len() <= BUCKETS
}

/// Checks a report: at most [`MAX_REPORT_ENTRIES`] entries, each naming a service (at
/// most [`MAX_NAME_LEN`] bytes, as the version) with at most [`BUCKETS`] duration
/// buckets. The error says what is wrong. ([`LoadStats::accept`] records the valid
/// part of a report that fails it.)
pub fn check_report(report: &pb::LoadReport) -> Result<(), String> {
    if report.loads.len() > MAX_REPORT_ENTRIES {
        return Err(format!(
            "load_report has {} entries; at most {MAX_REPORT_ENTRIES} (one per destination service and version)",
            report.loads.len()
        ));
    }
    match report.loads.iter().enumerate().find_map(|(i, load)| entry_problem(i, load)) {
        Some(problem) => Err(problem),
        None => Ok(()),
    }
}

/// The counts of one second (or of a window, summed).
#[derive(Debug, Clone, Default, PartialEq)]
struct Counts {
    /// 2xx, 3xx, 4xx, 5xx, resets, timeouts.
    classes: [u64; 6],
    /// Non-cumulative.
    buckets: [u64; BUCKETS],
}

impl Counts {
    fn requests(&self) -> u64 {
        self.classes[..4].iter().fold(0u64, |a, b| a.saturating_add(*b))
    }

    fn add_load(&mut self, load: &pb::VersionLoad) {
        let add = [load.status_2xx, load.status_3xx, load.status_4xx, load.status_5xx, load.resets, load.timeouts];
        for (c, a) in self.classes.iter_mut().zip(add) {
            *c = c.saturating_add(a);
        }
        for (mine, theirs) in self.buckets.iter_mut().zip(&load.duration_buckets) {
            *mine = mine.saturating_add(*theirs);
        }
    }

    fn add(&mut self, other: &Counts) {
        for (c, a) in self.classes.iter_mut().zip(other.classes) {
            *c = c.saturating_add(a);
        }
        for (c, a) in self.buckets.iter_mut().zip(other.buckets) {
            *c = c.saturating_add(a);
        }
    }

    /// The counts as LEB128 varints: the six classes, then the buckets up to the last
    /// non-zero one. A typical second takes 10 to 30 bytes instead of 208.
    fn pack(&self) -> Packed {
        let len = self.buckets.iter().rposition(|b| *b > 0).map_or(0, |i| i + 1);
        let mut out = Vec::with_capacity(6 + len + 8);
        for mut v in self.classes.iter().chain(&self.buckets[..len]).copied() {
            while v >= 0x80 {
                out.push((v as u8) | 0x80);
                v >>= 7;
            }
            out.push(v as u8);
        }
        Packed(out.into_boxed_slice())
    }
}

/// One second's [`Counts`], packed ([`Counts::pack`]).
#[derive(Debug, Clone, PartialEq)]
struct Packed(Box<[u8]>);

impl Packed {
    fn unpack(&self) -> Counts {
        let mut counts = Counts::default();
        let (mut value, mut shift, mut index) = (0u64, 0u32, 0usize);
        for byte in self.0.iter() {
            if shift < 64 {
                value |= u64::from(byte & 0x7f) << shift;
            }
            shift += 7;
            if byte & 0x80 == 0 {
                match index {
                    0..6 => counts.classes[index] = value,
                    _ => {
                        if let Some(b) = counts.buckets.get_mut(index - 6) {
                            *b = value;
                        }
                    }
                }
                index += 1;
                value = 0;
                shift = 0;
            }
        }
        counts
    }
}

/// Interpolated quantile `q` of non-cumulative `buckets` (the last one the overflow
/// bucket), as Prometheus' `histogram_quantile`: linear inside the bucket the rank
/// falls in (from 0 for the first bucket); in the overflow bucket, the highest finite
/// bound. `None` without observations.
pub fn quantile(q: f64, buckets: &[u64]) -> Option<f64> {
    let total = buckets.iter().fold(0u64, |a, b| a.saturating_add(*b));
    if total == 0 || q.is_nan() {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let mut below = 0u64;
    for (i, count) in buckets.iter().enumerate() {
        let cumulative = below.saturating_add(*count);
        if *count > 0 && cumulative as f64 >= rank {
            let Some(upper) = BUCKET_BOUNDS_MS.get(i) else {
                return Some(BUCKET_BOUNDS_MS[BUCKETS - 2]);
            };
            let lower = if i == 0 { 0.0 } else { BUCKET_BOUNDS_MS[i - 1] };
            let into = (rank - below as f64) / *count as f64;
            return Some(lower + (upper - lower) * into.clamp(0.0, 1.0));
        }
        below = cumulative;
    }
    Some(BUCKET_BOUNDS_MS[BUCKETS - 2])
}

/// One (service, version): its seconds with data, and when each sidecar last reported
/// it. The newest second is kept open (added to as reports arrive); the older ones
/// are packed.
#[derive(Debug)]
struct Series {
    /// The seconds before `open`, oldest first.
    sealed: VecDeque<(i64, Packed)>,
    /// The newest second with data and its counts.
    open: Option<(i64, Counts)>,
    reporters: HashMap<Arc<str>, i64>,
    last: i64,
    /// The sidecar that reported it first (whose [`MAX_SERIES_PER_NODE`] it counts in).
    creator: Arc<str>,
}

impl Series {
    fn new(creator: Arc<str>) -> Series {
        Series { sealed: VecDeque::new(), open: None, reporters: HashMap::new(), last: i64::MIN, creator }
    }

    /// Adds `load` to `second`. A later second than the open one seals it and trims
    /// what fell out of the history (once per series and second, not per report); an
    /// earlier one (a clock step back: rare) is unpacked, added to and packed again.
    fn add(&mut self, second: i64, load: &pb::VersionLoad) {
        match &mut self.open {
            Some((s, counts)) if *s == second => counts.add_load(load),
            Some((s, _)) if *s > second => {
                match self.sealed.binary_search_by_key(&second, |(s, _)| *s) {
                    Ok(i) => {
                        let mut counts = self.sealed[i].1.unpack();
                        counts.add_load(load);
                        self.sealed[i].1 = counts.pack();
                    }
                    Err(i) => {
                        let mut counts = Counts::default();
                        counts.add_load(load);
                        self.sealed.insert(i, (second, counts.pack()));
                    }
                }
                self.trim(self.last);
            }
            _ => {
                let mut counts = Counts::default();
                counts.add_load(load);
                if let Some((s, previous)) = self.open.replace((second, counts)) {
                    self.sealed.push_back((s, previous.pack()));
                }
                self.trim(second);
            }
        }
        self.last = self.last.max(second);
    }

    /// Drops what is older than the history, as of `now`.
    fn trim(&mut self, now: i64) {
        let oldest = now - HISTORY_S + 1;
        let max_sealed = HISTORY_S as usize - usize::from(self.open.is_some());
        while self.sealed.front().is_some_and(|(s, _)| *s < oldest) || self.sealed.len() > max_sealed {
            self.sealed.pop_front();
        }
        if self.open.as_ref().is_some_and(|(s, _)| *s < oldest) {
            self.open = None;
        }
        self.reporters.retain(|_, last| *last >= oldest);
    }

    /// The seconds held, oldest first.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.sealed.len() + usize::from(self.open.is_some())
    }

    /// The seconds of `from..=until`, oldest first.
    fn range(&self, from: i64, until: i64) -> impl Iterator<Item = (i64, Counts)> + '_ {
        let start = self.sealed.partition_point(|(s, _)| *s < from);
        let sealed = self.sealed.range(start..).take_while(move |(s, _)| *s <= until).map(|(s, p)| (*s, p.unpack()));
        let open = self.open.iter().filter(move |(s, _)| (from..=until).contains(s)).map(|(s, c)| (*s, c.clone()));
        sealed.chain(open)
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// By service FQDN, then version (nested, so that a report's names are looked up
    /// without building a key).
    series: BTreeMap<String, BTreeMap<String, Series>>,
    /// The number of series in `series`.
    count: usize,
    /// Interned node ids, with the number of series each created and still held.
    nodes: HashMap<Arc<str>, usize>,
    /// The last second idle series were swept.
    swept: i64,
}

impl Inner {
    /// Drops the series without a report for the history, as of `second`.
    fn sweep(&mut self, second: i64) {
        let Inner { series, count, nodes, .. } = self;
        series.retain(|_, versions| {
            versions.retain(|_, s| {
                let keep = s.last > second - HISTORY_S;
                if !keep {
                    *count -= 1;
                    if let Some(created) = nodes.get_mut(&s.creator) {
                        *created = created.saturating_sub(1);
                    }
                }
                keep
            });
            !versions.is_empty()
        });
        nodes.retain(|node, created| *created > 0 || Arc::strong_count(node) > 1);
    }

    fn iter(&self) -> impl Iterator<Item = (&str, &str, &Series)> {
        self.series.iter().flat_map(|(service, versions)| {
            versions.iter().map(move |(version, s)| (service.as_str(), version.as_str(), s))
        })
    }
}

/// The per-version load figures of the mesh: every sidecar's reports, summed per second
/// over the last 15 minutes. Thread-safe; [`LoadStats::record`] takes one short lock.
#[derive(Debug, Default)]
pub struct LoadStats {
    inner: Mutex<Inner>,
    reports: AtomicU64,
    /// Report entries dropped, by [`DROP_REASONS`].
    dropped_series: [AtomicU64; 2],
    /// Reports not recorded in full, by [`REJECT_REASONS`].
    rejected: [AtomicU64; 2],
    /// The Unix second of the last warning about a rejected report.
    warned: AtomicI64,
}

fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn unix_millis(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// True when `query` (short name, `name.namespace`, … or FQDN; any case) names `fqdn`.
fn matches_service(query: &str, fqdn: &str) -> bool {
    let query = query.trim().trim_end_matches('.');
    if query.is_empty() {
        return true;
    }
    fqdn.len() >= query.len()
        && fqdn[..query.len()].eq_ignore_ascii_case(query)
        && (fqdn.len() == query.len() || fqdn.as_bytes()[query.len()] == b'.')
}

/// The window in whole seconds (at least 1, at most the history).
fn window_seconds(window: Duration) -> i64 {
    let ms = window.as_millis();
    i64::try_from(ms.div_ceil(1000)).unwrap_or(HISTORY_S).clamp(1, HISTORY_S)
}

impl LoadStats {
    /// No figures yet.
    pub fn new() -> LoadStats {
        LoadStats::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every writer leaves the maps consistent between statements.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reports recorded since the start.
    pub fn reports_total(&self) -> u64 {
        self.reports.load(Ordering::Relaxed)
    }

    /// Report entries dropped because [`MAX_SERIES`] series existed already, or their
    /// sidecar had created [`MAX_SERIES_PER_NODE`] series already.
    pub fn dropped_series(&self) -> u64 {
        self.dropped_series.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// [`LoadStats::dropped_series`] by reason: `series_cap` ([`MAX_SERIES`]) and
    /// `node_series_cap` ([`MAX_SERIES_PER_NODE`]).
    pub fn dropped_series_by_reason(&self) -> [(&'static str, u64); 2] {
        std::array::from_fn(|i| (DROP_REASONS[i], self.dropped_series[i].load(Ordering::Relaxed)))
    }

    /// Reports from streams not recorded in full, by reason: `too_many_entries` (over
    /// [`MAX_REPORT_ENTRIES`]: the extra ones dropped) and `malformed` (entries that fail
    /// [`check_report`] dropped).
    pub fn rejected_reports(&self) -> [(&'static str, u64); 2] {
        std::array::from_fn(|i| (REJECT_REASONS[i], self.rejected[i].load(Ordering::Relaxed)))
    }

    /// The (service, version) series held now.
    pub fn series_count(&self) -> usize {
        self.lock().count
    }

    /// Records what is valid of `report`, received from the sidecar `node_id` on its
    /// discovery stream: at most the first [`MAX_REPORT_ENTRIES`] entries, each that
    /// passes [`check_report`]'s checks. The others are dropped and counted
    /// ([`LoadStats::rejected_reports`]), with a warning at most once a minute (debug
    /// otherwise). Never an error: telemetry must not take down the config stream.
    pub fn accept(&self, node_id: &str, report: &pb::LoadReport) {
        self.accept_at(node_id, report, SystemTime::now());
    }

    /// [`LoadStats::accept`] as of `now`.
    pub fn accept_at(&self, node_id: &str, report: &pb::LoadReport, now: SystemTime) {
        let total = report.loads.len();
        let kept = &report.loads[..total.min(MAX_REPORT_ENTRIES)];
        let malformed = kept.iter().filter(|l| !entry_ok(l)).count();
        if malformed == 0 && total == kept.len() {
            return self.record_loads(node_id, kept.iter(), now);
        }
        let mut problems = Vec::new();
        if total > kept.len() {
            self.rejected[TOO_MANY_ENTRIES].fetch_add(1, Ordering::Relaxed);
            problems.push(format!(
                "{total} entries, at most {MAX_REPORT_ENTRIES}: the last {} dropped",
                total - kept.len()
            ));
        }
        if malformed > 0 {
            self.rejected[MALFORMED].fetch_add(1, Ordering::Relaxed);
            let first = kept.iter().enumerate().find_map(|(i, l)| entry_problem(i, l)).unwrap_or_default();
            problems.push(format!("{malformed} malformed entries dropped (first: {first})"));
        }
        self.record_loads(node_id, kept.iter().filter(|l| entry_ok(l)), now);
        let second = unix_seconds(now);
        let last = self.warned.load(Ordering::Relaxed);
        let warn = (last == 0 || second >= last + WARN_EVERY_S)
            && self.warned.compare_exchange(last, second.max(1), Ordering::Relaxed, Ordering::Relaxed).is_ok();
        let problems = problems.join("; ");
        if warn {
            tracing::warn!(node = node_id, "load report partly dropped, the stream carries on: {problems}");
        } else {
            tracing::debug!(node = node_id, "load report partly dropped, the stream carries on: {problems}");
        }
    }

    /// Adds `report`, from the sidecar `node_id`, to the current second.
    pub fn record(&self, node_id: &str, report: &pb::LoadReport) {
        self.record_at(node_id, report, SystemTime::now());
    }

    /// Adds `report` to the second of `now`. Entries with no request are skipped;
    /// counts saturate rather than wrap.
    pub fn record_at(&self, node_id: &str, report: &pb::LoadReport, now: SystemTime) {
        self.record_loads(node_id, report.loads.iter(), now);
    }

    fn record_loads<'a>(&self, node_id: &str, loads: impl Iterator<Item = &'a pb::VersionLoad>, now: SystemTime) {
        self.reports.fetch_add(1, Ordering::Relaxed);
        let second = unix_seconds(now);
        let mut guard = self.lock();
        let inner = &mut *guard;
        if second > inner.swept {
            inner.swept = second;
            inner.sweep(second);
        }
        let node: Arc<str> = match inner.nodes.get_key_value(node_id) {
            Some((node, _)) => Arc::clone(node),
            None => {
                let node: Arc<str> = Arc::from(node_id);
                inner.nodes.insert(Arc::clone(&node), 0);
                node
            }
        };
        for load in loads {
            let requests = [load.status_2xx, load.status_3xx, load.status_4xx, load.status_5xx]
                .into_iter()
                .fold(0u64, u64::saturating_add);
            if requests == 0 || load.service.is_empty() {
                continue;
            }
            let exists = inner.series.get(&load.service).is_some_and(|v| v.contains_key(&load.version));
            if !exists {
                let created = inner.nodes.get(&node).copied().unwrap_or(0);
                let drop = if inner.count >= MAX_SERIES {
                    Some(SERIES_CAP)
                } else if created >= MAX_SERIES_PER_NODE && inner.count >= SHARED_SERIES {
                    Some(NODE_SERIES_CAP)
                } else {
                    None
                };
                if let Some(reason) = drop {
                    self.dropped_series[reason].fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                inner
                    .series
                    .entry(load.service.clone())
                    .or_default()
                    .insert(load.version.clone(), Series::new(Arc::clone(&node)));
                inner.count += 1;
                if let Some(created) = inner.nodes.get_mut(&node) {
                    *created += 1;
                }
            }
            let Some(series) = inner.series.get_mut(&load.service).and_then(|v| v.get_mut(&load.version)) else {
                continue;
            };
            series.add(second, load);
            let last = series.reporters.entry(Arc::clone(&node)).or_insert(second);
            *last = (*last).max(second);
        }
    }

    /// The figures asked for by `request`, as of now. `window_ms` over [`HISTORY`] is
    /// cut to it (the `Load` service refuses it instead). The current second counts
    /// (its reports are still arriving).
    pub fn figures(&self, request: &pb::GetLoadRequest) -> pb::LoadFigures {
        self.figures_at(request, SystemTime::now())
    }

    /// [`LoadStats::figures`] as of `now`.
    pub fn figures_at(&self, request: &pb::GetLoadRequest, now: SystemTime) -> pb::LoadFigures {
        let window = match request.window_ms {
            0 => DEFAULT_WINDOW,
            ms => Duration::from_millis(u64::from(ms)).min(HISTORY),
        };
        let seconds = window_seconds(window);
        let until = unix_seconds(now);
        let from = until - seconds + 1;
        let inner = self.lock();
        let mut versions: Vec<pb::VersionFigures> = inner
            .iter()
            .filter(|(service, _, _)| matches_service(&request.service, service))
            .map(|(service, version, series)| figures_of(service, version, [series], from, until, request.series))
            .collect();
        drop(inner);
        fill_shares(&mut versions);
        pb::LoadFigures {
            window_ms: u32::try_from(window.as_millis()).unwrap_or(u32::MAX),
            until_unix_ms: unix_millis(now),
            versions,
        }
    }

    /// One version of one service (short name or FQDN) over the last `window` (cut to
    /// [`HISTORY`]) of complete seconds, without series: zero figures when nothing was
    /// reported. The current second is left out (its reports are still arriving), so a
    /// window of N seconds holds N reports of each sidecar whatever the phase of the
    /// caller's timer: what the canary analysis judges. When a short name matches
    /// services of several namespaces, their figures are summed.
    pub fn version_window(&self, service: &str, version: &str, window: Duration) -> pb::VersionFigures {
        self.version_window_at(service, version, window, SystemTime::now())
    }

    /// [`LoadStats::version_window`] as of `now`.
    pub fn version_window_at(
        &self,
        service: &str,
        version: &str,
        window: Duration,
        now: SystemTime,
    ) -> pb::VersionFigures {
        let seconds = window_seconds(window);
        let until = unix_seconds(now) - 1;
        let from = until - seconds + 1;
        let inner = self.lock();
        let matching: Vec<(&str, &str, &Series)> =
            inner.iter().filter(|(s, _, _)| matches_service(service, s)).collect();
        let mut services: Vec<&str> = matching.iter().map(|(s, _, _)| *s).collect();
        services.dedup();
        let name = match services.as_slice() {
            [one] => (*one).to_string(),
            _ => service.to_string(),
        };
        let mine = matching.iter().filter(|(_, v, _)| *v == version).map(|(_, _, s)| *s);
        let mut figures = figures_of(&name, version, mine, from, until, false);
        let all = figures_of(&name, "", matching.iter().map(|(_, _, s)| *s), from, until, false);
        if all.requests > 0 {
            figures.share_percent = figures.requests as f64 * 100.0 / all.requests as f64;
        }
        figures
    }
}

/// Sums `series` over `from..=until` into one version's figures (share left at 0).
fn figures_of<'a>(
    service: &str,
    version: &str,
    series: impl IntoIterator<Item = &'a Series>,
    from: i64,
    until: i64,
    with_points: bool,
) -> pb::VersionFigures {
    let mut total = Counts::default();
    let mut reporters = 0usize;
    let mut per_second: BTreeMap<i64, Counts> = BTreeMap::new();
    for s in series {
        for (second, counts) in s.range(from, until) {
            total.add(&counts);
            if with_points {
                per_second.entry(second).or_default().add(&counts);
            }
        }
        reporters += s.reporters.values().filter(|last| (from..=until).contains(*last)).count();
    }
    let requests = total.requests();
    let seconds = (until - from + 1).max(1);
    let points = if with_points {
        (from..=until)
            .map(|second| match per_second.get(&second) {
                Some(c) => pb::LoadPoint {
                    unix_s: second,
                    requests: c.requests(),
                    errors: c.classes[3],
                    p50_ms: quantile(0.5, &c.buckets),
                    p99_ms: quantile(0.99, &c.buckets),
                },
                None => pb::LoadPoint { unix_s: second, ..pb::LoadPoint::default() },
            })
            .collect()
    } else {
        Vec::new()
    };
    pb::VersionFigures {
        service: service.to_string(),
        version: version.to_string(),
        requests,
        status_2xx: total.classes[0],
        status_3xx: total.classes[1],
        status_4xx: total.classes[2],
        status_5xx: total.classes[3],
        resets: total.classes[4],
        timeouts: total.classes[5],
        rps: requests as f64 / seconds as f64,
        share_percent: 0.0,
        success_percent: (requests > 0)
            .then(|| requests.saturating_sub(total.classes[3]) as f64 * 100.0 / requests as f64),
        p50_ms: quantile(0.5, &total.buckets),
        p99_ms: quantile(0.99, &total.buckets),
        reporters: u32::try_from(reporters).unwrap_or(u32::MAX),
        series: points,
    }
}

/// Sets each version's share of its service's requests (`versions` sorted by service).
fn fill_shares(versions: &mut [pb::VersionFigures]) {
    let mut totals: HashMap<String, u64> = HashMap::new();
    for v in versions.iter() {
        let t = totals.entry(v.service.clone()).or_default();
        *t = t.saturating_add(v.requests);
    }
    for v in versions.iter_mut() {
        let total = totals.get(&v.service).copied().unwrap_or(0);
        if total > 0 {
            v.share_percent = v.requests as f64 * 100.0 / total as f64;
        }
    }
}

/// The gRPC `Load` service: `GetLoad` answers from the control plane's [`LoadStats`].
#[derive(Debug, Clone)]
pub struct LoadService {
    pub(crate) stats: Arc<LoadStats>,
}

#[tonic::async_trait]
impl pb::load_server::Load for LoadService {
    async fn get_load(&self, request: Request<pb::GetLoadRequest>) -> Result<Response<pb::LoadFigures>, Status> {
        let request = request.into_inner();
        if u128::from(request.window_ms) > HISTORY.as_millis() {
            return Err(Status::invalid_argument(format!(
                "window_ms {} is longer than the history the control plane keeps ({} ms, 15 minutes)",
                request.window_ms,
                HISTORY.as_millis()
            )));
        }
        let stats = Arc::clone(&self.stats);
        let figures = tokio::task::spawn_blocking(move || stats.figures(&request))
            .await
            .map_err(|e| Status::internal(format!("the figures were not computed: {e}")))?;
        Ok(Response::new(figures))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SVC: &str = "payment.default.svc.cluster.local";

    fn at(s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000 + s)
    }

    fn load(service: &str, version: &str, ok: u64, errors: u64, buckets: &[u64]) -> pb::VersionLoad {
        pb::VersionLoad {
            service: service.to_string(),
            version: version.to_string(),
            status_2xx: ok,
            status_5xx: errors,
            duration_buckets: buckets.to_vec(),
            duration_sum_ms: 1.0,
            ..pb::VersionLoad::default()
        }
    }

    fn report(loads: Vec<pb::VersionLoad>) -> pb::LoadReport {
        pb::LoadReport { interval_ms: 1000, loads }
    }

    fn ask(service: &str, window_s: u32, series: bool) -> pb::GetLoadRequest {
        pb::GetLoadRequest { service: service.to_string(), window_ms: window_s * 1000, series }
    }

    #[test]
    fn sums_several_nodes_and_counts_reporters() {
        let stats = LoadStats::new();
        // 10 requests in bucket 4 (10..25 ms) per node and second.
        let b = [0, 0, 0, 0, 10];
        for node in ["a", "b", "c"] {
            stats.record_at(node, &report(vec![load(SVC, "v1", 9, 1, &b), load(SVC, "v2", 10, 0, &b)]), at(0));
        }
        stats.record_at("a", &report(vec![load(SVC, "v1", 10, 0, &b)]), at(1));
        let f = stats.figures_at(&ask("", 60, false), at(1));
        assert_eq!(f.versions.len(), 2);
        let v1 = &f.versions[0];
        assert_eq!((v1.version.as_str(), v1.requests, v1.status_2xx, v1.status_5xx), ("v1", 40, 37, 3));
        assert_eq!(v1.reporters, 3);
        assert_eq!(v1.success_percent, Some(92.5));
        assert!((v1.rps - 40.0 / 60.0).abs() < 1e-9);
        let v2 = &f.versions[1];
        assert_eq!((v2.requests, v2.reporters), (30, 3));
        assert!((v1.share_percent - 40.0 / 70.0 * 100.0).abs() < 1e-9);
        assert!((v1.share_percent + v2.share_percent - 100.0).abs() < 1e-9);
        assert_eq!(f.window_ms, 60_000);
        assert_eq!(stats.reports_total(), 4);
    }

    #[test]
    fn windows_cut_old_seconds_and_reporters() {
        let stats = LoadStats::new();
        stats.record_at("old", &report(vec![load(SVC, "v1", 5, 0, &[5])]), at(0));
        stats.record_at("new", &report(vec![load(SVC, "v1", 7, 0, &[7])]), at(100));
        // Complete seconds only: the second of `now` is still filling.
        let f = stats.version_window_at("payment", "v1", Duration::from_secs(10), at(100));
        assert_eq!((f.requests, f.reporters), (0, 0));
        let f = stats.version_window_at("payment", "v1", Duration::from_secs(10), at(101));
        assert_eq!((f.requests, f.reporters), (7, 1));
        let f = stats.version_window_at("payment", "v1", Duration::from_secs(101), at(101));
        assert_eq!((f.requests, f.reporters), (12, 2));
        // The default window is 60 s; a window over the history is cut to it.
        assert_eq!(stats.figures_at(&ask("", 0, false), at(100)).versions[0].requests, 7);
        let f = stats.figures_at(&pb::GetLoadRequest { window_ms: u32::MAX, ..ask("", 0, false) }, at(100));
        assert_eq!((f.window_ms, f.versions[0].requests), (900_000, 12));
        // Nothing reported: zero figures.
        let none = stats.version_window_at("payment", "v9", Duration::from_secs(60), at(100));
        assert_eq!((none.requests, none.reporters, none.success_percent, none.p99_ms), (0, 0, None, None));
        assert_eq!(none.service, SVC);
    }

    #[test]
    fn percentiles_interpolate_inside_buckets() {
        // 100 observations in (10, 25]: p50 = 10 + 15 * 0.5, p99 = 10 + 15 * 0.99.
        let b = [0, 0, 0, 0, 100];
        assert_eq!(quantile(0.5, &b), Some(17.5));
        assert!((quantile(0.99, &b).expect("p99") - 24.85).abs() < 1e-9);
        // First bucket from 0; a rank in the overflow bucket gives the highest bound.
        assert_eq!(quantile(0.5, &[10]), Some(0.25));
        let mut overflow = vec![0u64; BUCKETS];
        overflow[BUCKETS - 1] = 1;
        assert_eq!(quantile(0.99, &overflow), Some(3_600_000.0));
        assert_eq!(quantile(0.5, &[]), None);
        // Across buckets: 50 in (0, 0.5], 50 in (100, 250]: p99 in the second.
        let mut mixed = vec![0u64; 8];
        mixed[0] = 50;
        mixed[7] = 50;
        assert!((quantile(0.99, &mixed).expect("p99") - (100.0 + 150.0 * 0.98)).abs() < 1e-9);
        assert_eq!(quantile(0.5, &mixed), Some(0.5));
        // Merged over nodes, through the figures.
        let stats = LoadStats::new();
        stats.record_at("a", &report(vec![load(SVC, "v1", 50, 0, &[50])]), at(0));
        stats.record_at("b", &report(vec![load(SVC, "v1", 50, 0, &[0, 0, 0, 0, 0, 0, 0, 50])]), at(0));
        let f = stats.version_window_at(SVC, "v1", Duration::from_secs(60), at(1));
        assert!((f.p99_ms.expect("p99") - 247.0).abs() < 1e-9);
    }

    #[test]
    fn series_have_one_point_per_second_with_zeros() {
        let stats = LoadStats::new();
        stats.record_at("a", &report(vec![load(SVC, "v1", 3, 1, &[0, 0, 0, 4])]), at(7));
        stats.record_at("a", &report(vec![load(SVC, "v1", 2, 0, &[0, 0, 0, 2])]), at(9));
        let f = stats.figures_at(&ask("payment", 5, true), at(10));
        let points = &f.versions[0].series;
        assert_eq!(points.len(), 5);
        let secs: Vec<i64> = points.iter().map(|p| p.unix_s - 1_700_000_000).collect();
        assert_eq!(secs, [6, 7, 8, 9, 10]);
        let counts: Vec<(u64, u64)> = points.iter().map(|p| (p.requests, p.errors)).collect();
        assert_eq!(counts, [(0, 0), (4, 1), (0, 0), (2, 0), (0, 0)]);
        assert_eq!(points[0].p50_ms, None);
        assert_eq!(points[1].p50_ms, Some(7.5));
        assert!(stats.figures_at(&ask("payment", 5, false), at(10)).versions[0].series.is_empty());
    }

    #[test]
    fn idle_series_are_evicted_and_history_is_bounded() {
        let stats = LoadStats::new();
        stats.record_at("a", &report(vec![load("old.default.svc.cluster.local", "v1", 1, 0, &[1])]), at(0));
        for s in 0..1000 {
            stats.record_at("a", &report(vec![load(SVC, "v1", 1, 0, &[1])]), at(s));
        }
        assert_eq!(stats.series_count(), 1, "the idle series is gone");
        let inner = stats.lock();
        let (_, _, series) = inner.iter().next().expect("series");
        assert_eq!(series.len(), 900);
        assert_eq!(series.reporters.len(), 1);
        drop(inner);
        let f = stats.figures_at(&ask("", 900, false), at(999));
        assert_eq!(f.versions[0].requests, 900);
    }

    #[test]
    fn series_are_capped_and_drops_counted() {
        let stats = LoadStats::new();
        let loads: Vec<pb::VersionLoad> =
            (0..MAX_SERIES + 5).map(|i| load(&format!("s{i}.default.svc.cluster.local"), "v1", 1, 0, &[])).collect();
        for (n, chunk) in loads.chunks(MAX_REPORT_ENTRIES).enumerate() {
            stats.record_at(&format!("node-{n}"), &report(chunk.to_vec()), at(0));
        }
        assert_eq!(stats.series_count(), MAX_SERIES);
        assert_eq!(stats.dropped_series(), 5);
        assert_eq!(stats.dropped_series_by_reason(), [("series_cap", 5), ("node_series_cap", 0)]);
    }

    #[test]
    fn one_node_cannot_crowd_out_the_others() {
        let stats = LoadStats::new();
        // One stream makes up names: it gets half the series, no more.
        let made_up: Vec<pb::VersionLoad> =
            (0..MAX_SERIES).map(|i| load(&format!("fake{i}.default.svc.cluster.local"), "v1", 1, 0, &[])).collect();
        for chunk in made_up.chunks(MAX_REPORT_ENTRIES) {
            stats.record_at("greedy", &report(chunk.to_vec()), at(0));
        }
        assert_eq!(stats.series_count(), SHARED_SERIES);
        assert_eq!(stats.dropped_series_by_reason(), [("series_cap", 0), ("node_series_cap", 5_000)]);
        // A second one gets its own share, and no more.
        for chunk in made_up.chunks(MAX_REPORT_ENTRIES) {
            let renamed: Vec<pb::VersionLoad> = chunk.iter().map(|l| load(&l.service, "v2", 1, 0, &[])).collect();
            stats.record_at("greedy-2", &report(renamed), at(0));
        }
        assert_eq!(stats.series_count(), SHARED_SERIES + MAX_SERIES_PER_NODE);
        // Its existing series still take its reports; another sidecar's real series are kept.
        stats.record_at("greedy", &report(vec![load("fake0.default.svc.cluster.local", "v1", 2, 0, &[])]), at(1));
        stats.record_at("honest", &report(vec![load(SVC, "v1", 3, 0, &[])]), at(1));
        let f = stats.figures_at(&ask("payment", 60, false), at(1));
        assert_eq!((f.versions.len(), f.versions[0].requests), (1, 3));
        assert_eq!(stats.figures_at(&ask("fake0", 60, false), at(1)).versions[0].requests, 3);
        // Once its series went idle and were dropped, it may create new ones again.
        stats.record_at("honest", &report(vec![load(SVC, "v1", 1, 0, &[])]), at(901));
        assert_eq!(stats.series_count(), 1);
        stats.record_at("greedy", &report(made_up[..3].to_vec()), at(902));
        assert_eq!(stats.series_count(), 4);
    }

    #[test]
    fn accepted_reports_keep_their_valid_entries_and_count_the_rest() {
        let stats = LoadStats::new();
        // Over the entry cap: the first MAX_REPORT_ENTRIES are recorded.
        let many: Vec<pb::VersionLoad> = (0..MAX_REPORT_ENTRIES + 7)
            .map(|i| load(&format!("s{i:04}.default.svc.cluster.local"), "v1", 1, 0, &[1]))
            .collect();
        stats.accept_at("big", &report(many), at(0));
        assert_eq!(stats.series_count(), MAX_REPORT_ENTRIES);
        assert_eq!(stats.rejected_reports(), [("too_many_entries", 1), ("malformed", 0)]);
        // Malformed entries are dropped, the valid ones of the same report recorded.
        let long = "x".repeat(MAX_NAME_LEN + 1);
        let mixed = report(vec![
            load("", "v1", 1, 0, &[]),
            load(SVC, &long, 1, 0, &[]),
            load(SVC, "v1", 4, 1, &[1; BUCKETS + 1]),
            load(SVC, "v2", 5, 0, &[5]),
        ]);
        stats.accept_at("mixed", &mixed, at(0));
        assert_eq!(stats.rejected_reports(), [("too_many_entries", 1), ("malformed", 1)]);
        let f = stats.figures_at(&ask("payment", 60, false), at(0));
        let versions: Vec<(&str, u64)> = f.versions.iter().map(|v| (v.version.as_str(), v.requests)).collect();
        assert_eq!(versions, [("v2", 5)]);
        // A good report counts nothing.
        stats.accept_at("good", &report(vec![load(SVC, "v1", 1, 0, &[1])]), at(0));
        assert_eq!(stats.rejected_reports(), [("too_many_entries", 1), ("malformed", 1)]);
        assert_eq!(stats.reports_total(), 3);
    }

    #[test]
    fn packed_seconds_give_back_their_counts() {
        let mut counts = Counts { classes: [0, 1, 127, 128, u64::MAX, 300], ..Counts::default() };
        counts.buckets[0] = 5;
        counts.buckets[7] = 1 << 40;
        let packed = counts.pack();
        assert_eq!(packed.unpack(), counts);
        assert!(packed.0.len() < 40, "{} bytes", packed.0.len());
        assert_eq!(Counts::default().pack().unpack(), Counts::default());
        assert_eq!(Counts::default().pack().0.len(), 6);
    }

    #[test]
    fn seconds_seal_in_order_and_a_clock_step_back_adds_to_the_old_second() {
        let stats = LoadStats::new();
        for (s, n) in [(5, 1), (6, 2), (6, 3), (8, 4), (6, 10), (7, 20)] {
            stats.record_at("a", &report(vec![load(SVC, "v1", n, 0, &[n])]), at(s));
        }
        let f = stats.figures_at(&ask("payment", 4, true), at(8));
        let counts: Vec<u64> = f.versions[0].series.iter().map(|p| p.requests).collect();
        assert_eq!(counts, [1, 15, 20, 4]);
        assert_eq!(f.versions[0].reporters, 1);
    }

    #[test]
    fn short_names_match_their_fqdn_only() {
        let stats = LoadStats::new();
        let r = report(vec![
            load(SVC, "v1", 1, 0, &[]),
            load("payments.default.svc.cluster.local", "v1", 2, 0, &[]),
            load("reviews.default.svc.cluster.local", "v1", 4, 0, &[]),
        ]);
        stats.record_at("a", &r, at(0));
        for query in ["payment", "PAYMENT", "payment.default", SVC] {
            let f = stats.figures_at(&ask(query, 60, false), at(0));
            assert_eq!(f.versions.len(), 1, "{query}");
            assert_eq!((f.versions[0].service.as_str(), f.versions[0].requests), (SVC, 1));
            assert_eq!(f.versions[0].share_percent, 100.0);
        }
        assert!(stats.figures_at(&ask("pay", 60, false), at(0)).versions.is_empty());
        assert!(stats.figures_at(&ask("nothing", 60, false), at(0)).versions.is_empty());
        assert_eq!(stats.figures_at(&ask("", 60, false), at(0)).versions.len(), 3);
    }

    #[test]
    fn bad_reports_are_named() {
        let ok = report(vec![load(SVC, "v1", 1, 0, &[1; BUCKETS])]);
        assert!(check_report(&ok).is_ok());
        let e = check_report(&report(vec![load(SVC, "v1", 1, 0, &[1; BUCKETS + 1])])).expect_err("buckets");
        assert!(e.contains("duration_buckets"), "{e}");
        let e = check_report(&report(vec![load("", "v1", 1, 0, &[])])).expect_err("service");
        assert!(e.contains("service"), "{e}");
        let many = report(vec![load(SVC, "v1", 1, 0, &[]); MAX_REPORT_ENTRIES + 1]);
        assert!(check_report(&many).expect_err("entries").contains("entries"));
    }
}
