//! Per-version load reports to the control plane (Envoy's LRS idea, on the discovery
//! stream).
//!
//! For each destination service (FQDN) and version this sidecar calls as a client, a
//! [`LoadCell`] of relaxed atomics counts the finished requests by class, the resets and
//! timeouts, and their durations in the buckets of `istio_request_duration_milliseconds`.
//! [`crate::metrics::Metrics`] resolves the cell once per metric label set and keeps it
//! with the label set's handles, so recording costs three or four relaxed atomic adds.
//! A label set can cover several cells (subsets chosen by a label other than `version`,
//! or failures without an endpoint); a request for another cell than the label set's
//! finds it by its cluster's address (a read lock and one hash of a pointer) or, for a
//! cluster without a subset, by borrowed names: never an allocation.
//! Every `--load-report-interval` the control-plane subscription takes and resets the
//! cells ([`LoadCells::take`]) and sends the non-empty ones as one `LoadReport` (which
//! the subscription splits into requests of at most
//! [`MAX_REPORT_ENTRIES`](serin_control_api::server::MAX_REPORT_ENTRIES) entries).
//!
//! Only requests this sidecar made as a client (`reporter=source`) to a known cluster
//! are counted. The version is the route's destination subset (`v1`) when the cluster
//! has one, else the endpoint's `version` label, else `""`. A request that got no
//! response (status 0) counts as a 5xx; the resets are the requests with the response
//! flags `UC` (upstream connection termination) or `UR` (upstream remote reset), the
//! timeouts those with `UT`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serin_control_api::pb;

use crate::flags::ResponseFlags;
use crate::metrics::{ENVOY_DEFAULT_BUCKETS, FastMap, PtrCache};
use crate::request_info::{Reporter, RequestInfo};
use crate::snapshot::{Cluster, Endpoint};

/// The default `--load-report-interval`.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
/// Duration buckets: Envoy's 19 bounds and the overflow bucket.
pub const BUCKETS: usize = ENVOY_DEFAULT_BUCKETS.len() + 1;
/// Most (service, version) cells; requests to more are not reported.
pub const MAX_CELLS: usize = 10_000;

const CLASS_2XX: usize = 0;
const CLASS_5XX: usize = 3;
const RESETS: usize = 4;
const TIMEOUTS: usize = 5;

/// The counts of one destination service and version since the last report.
#[derive(Debug)]
pub struct LoadCell {
    service: String,
    version: String,
    /// 2xx (and 1xx), 3xx, 4xx, 5xx (and no response), resets, timeouts.
    counts: [AtomicU64; 6],
    /// Non-cumulative.
    buckets: [AtomicU64; BUCKETS],
    /// Sum of the durations, microseconds.
    sum_us: AtomicU64,
}

impl LoadCell {
    fn new(service: &str, version: &str) -> LoadCell {
        LoadCell {
            service: service.to_string(),
            version: version.to_string(),
            counts: Default::default(),
            buckets: Default::default(),
            sum_us: AtomicU64::new(0),
        }
    }

    /// The destination service's FQDN.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The version counted here.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Counts one finished request.
    fn add(&self, status: u16, flags: ResponseFlags, duration: Duration) {
        let ms = duration.as_secs_f64() * 1000.0;
        let bucket = ENVOY_DEFAULT_BUCKETS.partition_point(|bound| *bound < ms);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let us = u64::try_from(duration.as_micros()).unwrap_or(u64::MAX);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
        if flags.contains(ResponseFlags::UPSTREAM_CONNECTION_TERMINATION)
            || flags.contains(ResponseFlags::UPSTREAM_REMOTE_RESET)
        {
            self.counts[RESETS].fetch_add(1, Ordering::Relaxed);
        }
        if flags.contains(ResponseFlags::UPSTREAM_TIMEOUT) {
            self.counts[TIMEOUTS].fetch_add(1, Ordering::Relaxed);
        }
        let class = match status {
            100..=299 => CLASS_2XX,
            300..=399 => 1,
            400..=499 => 2,
            _ => CLASS_5XX,
        };
        self.counts[class].fetch_add(1, Ordering::Relaxed);
    }

    /// Takes the counts (resetting them): `None` when no request finished.
    fn take(&self) -> Option<pb::VersionLoad> {
        let counts: [u64; 6] = std::array::from_fn(|i| self.counts[i].swap(0, Ordering::Relaxed));
        let mut buckets: Vec<u64> = self.buckets.iter().map(|b| b.swap(0, Ordering::Relaxed)).collect();
        let sum_us = self.sum_us.swap(0, Ordering::Relaxed);
        if counts[..4].iter().all(|c| *c == 0) {
            return None;
        }
        let len = buckets.iter().rposition(|b| *b > 0).map_or(0, |i| i + 1);
        buckets.truncate(len);
        Some(pb::VersionLoad {
            service: self.service.clone(),
            version: self.version.clone(),
            status_2xx: counts[0],
            status_3xx: counts[1],
            status_4xx: counts[2],
            status_5xx: counts[3],
            resets: counts[RESETS],
            timeouts: counts[TIMEOUTS],
            duration_buckets: buckets,
            duration_sum_ms: sum_us as f64 / 1000.0,
        })
    }
}

/// The version a request to `cluster` (and `endpoint`) counts for: the subset name, else
/// the endpoint's `version` label, else `""`.
pub fn version_of<'a>(cluster: &'a Cluster, endpoint: Option<&'a Arc<Endpoint>>) -> &'a str {
    match &cluster.subset {
        Some(subset) => subset,
        None => endpoint.and_then(|e| e.label("version")).unwrap_or(""),
    }
}

/// The cells by service, then version (nested, so that a lookup borrows the names).
#[derive(Debug, Default)]
struct CellMap {
    cells: FastMap<String, FastMap<String, Arc<LoadCell>>>,
    len: usize,
}

impl CellMap {
    fn get(&self, service: &str, version: &str) -> Option<&Arc<LoadCell>> {
        self.cells.get(service)?.get(version)
    }
}

/// Every cell of this sidecar, and when they were last taken. Off (no cell handed out)
/// until [`LoadCells::enable`].
#[derive(Debug)]
pub struct LoadCells {
    enabled: AtomicBool,
    cells: RwLock<CellMap>,
    /// The cell of each cluster with a subset (whose version is the subset), by the
    /// cluster's address: `None` when [`MAX_CELLS`] cells existed already.
    by_cluster: PtrCache<Cluster, Option<Arc<LoadCell>>>,
    last_take: Mutex<Instant>,
    /// Requests not counted: [`MAX_CELLS`] cells existed already.
    overflow: AtomicU64,
}

impl Default for LoadCells {
    fn default() -> LoadCells {
        LoadCells::new()
    }
}

impl LoadCells {
    /// No cell, off.
    pub fn new() -> LoadCells {
        LoadCells {
            enabled: AtomicBool::new(false),
            cells: RwLock::new(CellMap::default()),
            by_cluster: PtrCache::new(),
            last_take: Mutex::new(Instant::now()),
            overflow: AtomicU64::new(0),
        }
    }

    /// Starts counting (before the first request, so that every label set gets its cell).
    pub fn enable(&self) {
        self.enabled.store(true, Ordering::Relaxed);
    }

    /// Whether requests are counted.
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Requests not counted because [`MAX_CELLS`] cells existed already.
    pub fn overflow(&self) -> u64 {
        self.overflow.load(Ordering::Relaxed)
    }

    /// The cell of `service` and `version`, made when missing (`None` at the cap). No
    /// allocation when it exists.
    fn cell(&self, service: &str, version: &str) -> Option<Arc<LoadCell>> {
        {
            let cells = self.cells.read().unwrap_or_else(|e| e.into_inner());
            if let Some(cell) = cells.get(service, version) {
                return Some(Arc::clone(cell));
            }
        }
        let mut guard = self.cells.write().unwrap_or_else(|e| e.into_inner());
        if let Some(cell) = guard.get(service, version) {
            return Some(Arc::clone(cell));
        }
        if guard.len >= MAX_CELLS {
            return None;
        }
        let cell = Arc::new(LoadCell::new(service, version));
        guard.cells.entry(service.to_string()).or_default().insert(version.to_string(), Arc::clone(&cell));
        guard.len += 1;
        Some(cell)
    }

    /// The cell of a request to `cluster` counted for `version` (its
    /// [`version_of`]): by the cluster's address when it has a subset, else by name.
    fn cell_of(&self, cluster: &Arc<Cluster>, version: &str) -> Option<Arc<LoadCell>> {
        let cell = match cluster.subset {
            Some(_) => self.by_cluster.get_or_insert_with(cluster, |c| self.cell(&c.service.host, version)),
            None => self.cell(&cluster.service.host, version),
        };
        if cell.is_none() {
            self.overflow.fetch_add(1, Ordering::Relaxed);
        }
        cell
    }

    /// The cell a request counts in: `None` when counting is off, for an inbound
    /// request, or without a cluster. Called once per metric label set.
    pub fn cell_for(&self, info: &RequestInfo) -> Option<Arc<LoadCell>> {
        if !self.enabled() || info.reporter != Reporter::Source {
            return None;
        }
        let cluster = info.cluster.as_ref()?;
        self.cell_of(cluster, version_of(cluster, info.upstream.as_ref()))
    }

    /// Counts `info` in `cell`, the cell resolved for its label set. The label set names
    /// the service and the endpoint's labels but not the subset, so a request counted for
    /// another version (the same endpoint in two subsets, subsets chosen by a label other
    /// than `version`, or no endpoint) is counted in its own cell, found by its cluster's
    /// address or by borrowed names: no allocation either way.
    pub fn record(&self, cell: &LoadCell, info: &RequestInfo) {
        let Some(cluster) = info.cluster.as_ref() else { return };
        self.record_to(cell, cluster, info.upstream.as_ref(), info.status, info.flags, info.duration);
    }

    fn record_to(
        &self,
        cell: &LoadCell,
        cluster: &Arc<Cluster>,
        upstream: Option<&Arc<Endpoint>>,
        status: u16,
        flags: ResponseFlags,
        duration: Duration,
    ) {
        let version = version_of(cluster, upstream);
        if version == cell.version {
            cell.add(status, flags, duration);
        } else if let Some(other) = self.cell_of(cluster, version) {
            other.add(status, flags, duration);
        }
    }

    /// Takes every cell's counts (resetting them) into one report: `None` when no
    /// request finished since the last take.
    pub fn take(&self) -> Option<pb::LoadReport> {
        let interval = {
            let mut last = self.last_take.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let interval = now.duration_since(*last);
            *last = now;
            interval
        };
        let cells: Vec<Arc<LoadCell>> = self
            .cells
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .cells
            .values()
            .flat_map(|versions| versions.values().map(Arc::clone))
            .collect();
        let mut loads: Vec<pb::VersionLoad> = cells.iter().filter_map(|c| c.take()).collect();
        if loads.is_empty() {
            return None;
        }
        loads.sort_by(|a, b| (&a.service, &a.version).cmp(&(&b.service, &b.version)));
        Some(pb::LoadReport { interval_ms: u32::try_from(interval.as_millis()).unwrap_or(u32::MAX), loads })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_flags_and_buckets() {
        let cell = LoadCell::new("payment.default.svc.cluster.local", "v1");
        cell.add(200, ResponseFlags::NONE, Duration::from_millis(3));
        cell.add(101, ResponseFlags::NONE, Duration::from_micros(500));
        cell.add(302, ResponseFlags::NONE, Duration::from_millis(3));
        cell.add(404, ResponseFlags::NONE, Duration::from_millis(3));
        cell.add(503, ResponseFlags::UPSTREAM_CONNECTION_TERMINATION, Duration::from_millis(3));
        cell.add(504, ResponseFlags::UPSTREAM_TIMEOUT, Duration::from_millis(20));
        cell.add(0, ResponseFlags::UPSTREAM_REMOTE_RESET, Duration::from_secs(7200));
        let load = cell.take().expect("load");
        assert_eq!((load.status_2xx, load.status_3xx, load.status_4xx, load.status_5xx), (2, 1, 1, 3));
        assert_eq!((load.resets, load.timeouts), (2, 1));
        // 0.5 ms is in the first bucket (le 0.5); 3 ms in le 5; 20 ms in le 25; 2 h overflows.
        let mut expected = vec![0u64; BUCKETS];
        expected[0] = 1;
        expected[2] = 4;
        expected[4] = 1;
        expected[BUCKETS - 1] = 1;
        assert_eq!(load.duration_buckets, expected);
        assert!((load.duration_sum_ms - (0.5 + 4.0 * 3.0 + 20.0 + 7_200_000.0)).abs() < 1e-6);
        assert!(cell.take().is_none(), "taking resets the cell");
    }

    fn cluster(subset: Option<&str>) -> Arc<Cluster> {
        Arc::new(Cluster {
            name: format!("outbound|8080|{}|payment.default.svc.cluster.local", subset.unwrap_or("")),
            service: Arc::new(crate::snapshot::ServiceInfo {
                host: "payment.default.svc.cluster.local".into(),
                name: "payment".into(),
                namespace: "default".into(),
                ports: vec![(8080, "HTTP".into())],
                addresses: Vec::new(),
            }),
            subset: subset.map(str::to_string),
            port: 8080,
            endpoints: Vec::new(),
            policy: crate::snapshot::TrafficPolicy::default(),
            rr_cursor: Default::default(),
        })
    }

    #[test]
    fn a_label_set_covering_several_versions_counts_each_in_its_own_cell() {
        let cells = LoadCells::new();
        let (v1, v2, plain) = (cluster(Some("v1")), cluster(Some("v2")), cluster(None));
        // Failures without an endpoint share one label set: its cell is the first one's.
        let handle = cells.cell_of(&v1, "v1").expect("cell");
        let ms = Duration::from_millis(3);
        for _ in 0..3 {
            cells.record_to(&handle, &v1, None, 503, ResponseFlags::NONE, ms);
        }
        for _ in 0..2 {
            cells.record_to(&handle, &v2, None, 503, ResponseFlags::NONE, ms);
        }
        cells.record_to(&handle, &plain, None, 503, ResponseFlags::NONE, ms);
        // The other subset's cell is found by the cluster's address: always the same one.
        let by_ptr = cells.by_cluster.get_or_insert_with(&v2, |_| None).expect("cached");
        assert!(Arc::ptr_eq(&by_ptr, &cells.cell("payment.default.svc.cluster.local", "v2").expect("cell")));
        let report = cells.take().expect("report");
        let got: Vec<(&str, u64)> = report.loads.iter().map(|l| (l.version.as_str(), l.status_5xx)).collect();
        assert_eq!(got, [("", 1), ("v1", 3), ("v2", 2)]);
        assert_eq!(cells.overflow(), 0);
    }

    #[test]
    fn trailing_zero_buckets_are_left_out_and_reports_are_small() {
        let cells = LoadCells::new();
        let a = cells.cell("payment.default.svc.cluster.local", "v1").expect("cell");
        let b = cells.cell("payment.default.svc.cluster.local", "v2").expect("cell");
        assert!(Arc::ptr_eq(&a, &cells.cell("payment.default.svc.cluster.local", "v1").expect("cell")));
        assert!(cells.take().is_none(), "nothing finished");
        for i in 0..950u64 {
            a.add(if i % 50 == 0 { 503 } else { 200 }, ResponseFlags::NONE, Duration::from_millis(1 + i % 40));
        }
        for i in 0..50u64 {
            b.add(200, ResponseFlags::NONE, Duration::from_millis(1 + i * 4));
        }
        let report = cells.take().expect("report");
        assert_eq!(report.loads.len(), 2);
        assert_eq!(report.loads[0].version, "v1");
        assert_eq!(report.loads[0].duration_buckets.len(), 6, "up to le 50");
        assert_eq!(report.loads[1].duration_buckets.len(), 8, "up to le 250");
        assert_eq!(report.loads[0].status_5xx, 19);
    }
}
