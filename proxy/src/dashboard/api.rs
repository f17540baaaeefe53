//! The dashboard's JSON API: `GET /api/overview` (what the page draws) and the two
//! write actions, `POST /api/services/{service}/weights` and
//! `POST /api/services/{service}/rollback`.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serin_control_api::ResourceType;
use serin_control_api::pb;
use serin_control_api::server::canary::spec::steps;
use serin_control_api::server::fqdn;

use super::backend::{ActionError, DashboardBackend, ServiceConfig};
use crate::ctl::sync_state_name;

/// The default window of the current figures (the numbers): the last minute, the
/// control plane's own default window (`serin ctl load`'s too).
pub const FIGURES_WINDOW: Duration = Duration::from_secs(60);
/// The longest figures window `?window=` may ask for: the history the control plane keeps.
pub const MAX_FIGURES_WINDOW: Duration = Duration::from_secs(900);
/// The window of the charts: the last five minutes, one point a second.
pub const SERIES_WINDOW: Duration = Duration::from_secs(300);
/// How many events of a canary the overview carries (the newest).
pub const MAX_EVENTS: usize = 50;

/// Everything the page shows, as `GET /api/overview` answers it.
#[derive(Debug, Clone, Serialize)]
pub struct Overview {
    /// When this was put together, Unix milliseconds.
    pub generated_unix_ms: i64,
    /// The window of each version's figures, seconds.
    pub window_s: u64,
    /// The charts' first second (Unix seconds); point `i` of a series is second
    /// `series_start_unix_s + i`.
    pub series_start_unix_s: i64,
    /// Number of points of each series.
    pub series_len: usize,
    /// True when the control plane has an admin token, so set-weight and rollback
    /// can act.
    pub writes_enabled: bool,
    /// Per service: its versions' figures and series, its weights, its canary.
    pub services: Vec<ServiceView>,
    /// The connected sidecars and their sync state per type (as `serin ctl status`).
    pub sidecars: Vec<SidecarView>,
    /// The control plane's current version per type (short type name → version).
    pub versions: BTreeMap<String, String>,
    /// Every canary analysis (the latest per service).
    pub canaries: Vec<CanaryView>,
}

/// One service.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceView {
    /// Its FQDN.
    pub service: String,
    /// Its short name (the FQDN's first label).
    pub name: String,
    /// Its subsets (from the DestinationRules).
    pub subsets: Vec<String>,
    /// Subset → weight, as its routes say now.
    pub weights: BTreeMap<String, u32>,
    /// Each version's figures: the subsets first, in order, then versions that
    /// only the load reports name.
    pub versions: Vec<VersionView>,
    /// The service's canary analysis, running or the last one.
    pub canary: Option<CanaryView>,
}

/// One version of a service over [`FIGURES_WINDOW`], and its per-second series over
/// [`SERIES_WINDOW`].
#[derive(Debug, Clone, Default, Serialize)]
pub struct VersionView {
    /// The subset (or version label).
    pub version: String,
    /// Requests finished in the window.
    pub requests: u64,
    /// Requests per second over the window.
    pub rps: f64,
    /// Share of the service's requests, percent.
    pub share_percent: f64,
    /// Non-5xx answers, percent (absent without requests).
    pub success_percent: Option<f64>,
    /// Median latency, milliseconds.
    pub p50_ms: Option<f64>,
    /// 99th percentile latency, milliseconds.
    pub p99_ms: Option<f64>,
    /// 5xx answers.
    pub errors: u64,
    /// Sidecars that reported this version in the window.
    pub reporters: u32,
    /// The per-second series.
    pub series: SeriesView,
}

/// Per-second series of one version, aligned on
/// [`Overview::series_start_unix_s`]; `null` where no report covered the second.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SeriesView {
    /// Requests in the second.
    pub rps: Vec<Option<f64>>,
    /// Share of the service's requests in the second, percent.
    pub share: Vec<Option<f64>>,
    /// Non-5xx answers in the second, percent.
    pub success: Vec<Option<f64>>,
    /// Median latency, milliseconds.
    pub p50: Vec<Option<f64>>,
    /// 99th percentile latency, milliseconds.
    pub p99: Vec<Option<f64>>,
}

/// One connected sidecar.
#[derive(Debug, Clone, Serialize)]
pub struct SidecarView {
    /// Its node id.
    pub id: String,
    /// `workload.namespace`, or `-`.
    pub workload: String,
    /// Its `version` label, if any.
    pub version: Option<String>,
    /// When its stream opened, Unix milliseconds.
    pub connected_since_unix_ms: i64,
    /// One entry per resource type, in the order of `serin ctl status`'s columns.
    pub types: Vec<TypeView>,
}

/// One resource type on one sidecar.
#[derive(Debug, Clone, Serialize)]
pub struct TypeView {
    /// The short type name (`routes`, `clusters`, …).
    #[serde(rename = "type")]
    pub ty: String,
    /// `SYNCED`, `STALE`, `NACKED`, `NOT SENT`, or `-` when not subscribed.
    pub state: String,
    /// The version it runs (ACKed, else the one sent).
    pub version: Option<String>,
    /// Push-to-ACK time of its last ACK, milliseconds.
    pub push_to_ack_ms: Option<u64>,
    /// The last NACK: `v<version>: <error>`.
    pub last_nack: Option<String>,
}

/// A canary analysis.
#[derive(Debug, Clone, Serialize)]
pub struct CanaryView {
    /// The service, as the spec names it.
    pub service: String,
    /// Its FQDN.
    pub service_fqdn: String,
    /// The canary subset.
    pub canary: String,
    /// The stable subset ("" = rollback's).
    pub stable: String,
    /// `INITIALIZED`, `PROGRESSING`, `SUCCEEDED`, `FAILED`, `ABORTED`.
    pub phase: String,
    /// True while it runs.
    pub running: bool,
    /// The canary's weight, percent.
    pub weight: u32,
    /// Steps passed.
    pub step: u32,
    /// The weights it steps through.
    pub steps: Vec<u32>,
    /// Promotion happens after passing at this weight.
    pub max_weight: u32,
    /// Failed intervals counted.
    pub failed_checks: u32,
    /// Failed intervals that roll back.
    pub threshold: u32,
    /// The analysis interval, milliseconds.
    pub interval_ms: u32,
    /// Why it failed or was aborted.
    pub reason: String,
    /// When the next interval is judged, Unix milliseconds (0 = not running).
    pub next_check_unix_ms: i64,
    /// When it started, Unix milliseconds.
    pub started_unix_ms: i64,
    /// The last interval's figures, canary first.
    pub last_figures: Vec<IntervalView>,
    /// The newest events (at most [`MAX_EVENTS`]), oldest first.
    pub events: Vec<EventView>,
}

/// One version's figures over one analysis interval.
#[derive(Debug, Clone, Serialize)]
pub struct IntervalView {
    /// The version.
    pub version: String,
    /// Requests in the interval.
    pub requests: u64,
    /// Success rate, percent.
    pub success_percent: Option<f64>,
    /// p99 latency, milliseconds.
    pub p99_ms: Option<f64>,
}

/// One decision of an analysis.
#[derive(Debug, Clone, Serialize)]
pub struct EventView {
    /// When, Unix milliseconds.
    pub unix_ms: i64,
    /// `started`, `step`, `wait`, `failed-check`, `rollback`, `promote`, …
    pub kind: String,
    /// What happened and why.
    pub message: String,
    /// The canary weight after it.
    pub weight: u32,
}

fn now_unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The short name of a service: the first label of its FQDN.
fn short_name(service: &str) -> String {
    service.split('.').next().unwrap_or(service).to_string()
}

/// The figures window asked for by a query string (`window=SECONDS`, 1..=900):
/// [`FIGURES_WINDOW`] when absent; an error naming the problem otherwise.
pub fn window_of(query: Option<&str>) -> Result<Duration, ActionError> {
    let Some(raw) = query.unwrap_or_default().split('&').find_map(|kv| kv.strip_prefix("window=")) else {
        return Ok(FIGURES_WINDOW);
    };
    let max = MAX_FIGURES_WINDOW.as_secs();
    match raw.parse::<u64>() {
        Ok(s) if (1..=max).contains(&s) => Ok(Duration::from_secs(s)),
        _ => Err(ActionError {
            status: http::StatusCode::BAD_REQUEST,
            message: format!("window={raw:?}: give whole seconds from 1 to {max}"),
        }),
    }
}

/// Puts the overview together from the backend's status, figures (over `window`) and
/// analyses.
pub fn overview(backend: &dyn DashboardBackend, writes_enabled: bool, window: Duration) -> Overview {
    let figures = backend.load(window, false);
    let series = backend.load(SERIES_WINDOW, true);
    let status = backend.status();
    let canaries: Vec<CanaryView> = backend.canaries().canaries.iter().map(canary_view).collect();
    let configs = backend.services();

    let until_ms = if series.until_unix_ms > 0 { series.until_unix_ms } else { now_unix_ms() };
    let series_len = usize::try_from(SERIES_WINDOW.as_secs()).unwrap_or(300);
    let last_second = until_ms.div_euclid(1000);
    let series_start = last_second - i64::try_from(series_len).unwrap_or(300) + 1;

    // Services: the configured ones first, then those only the figures or canaries name.
    let mut services: Vec<ServiceView> = configs.into_iter().map(service_view).collect();
    let ensure = |services: &mut Vec<ServiceView>, name: &str| -> usize {
        let key = fqdn(name, "default");
        match services.iter().position(|s| s.service == key) {
            Some(i) => i,
            None => {
                services.push(service_view(ServiceConfig { service: key, ..ServiceConfig::default() }));
                services.len() - 1
            }
        }
    };
    for f in &figures.versions {
        let i = ensure(&mut services, &f.service);
        let view = version_entry(&mut services[i], &f.version);
        view.requests = f.requests;
        view.rps = f.rps;
        view.share_percent = f.share_percent;
        view.success_percent = f.success_percent;
        view.p50_ms = f.p50_ms;
        view.p99_ms = f.p99_ms;
        view.errors = f.status_5xx;
        view.reporters = f.reporters;
    }
    for f in &series.versions {
        let i = ensure(&mut services, &f.service);
        let view = version_entry(&mut services[i], &f.version);
        view.series = series_view(&f.series, series_start, series_len);
    }
    for service in &mut services {
        for version in &mut service.versions {
            if version.series.rps.len() != series_len {
                version.series = series_view(&[], series_start, series_len);
            }
        }
        fill_shares(service, series_len);
    }
    for canary in &canaries {
        let i = ensure(&mut services, &canary.service_fqdn);
        services[i].canary = Some(canary.clone());
    }

    let versions = status
        .versions
        .iter()
        .map(|(url, v)| {
            let name = ResourceType::from_type_url(url).map_or_else(|| url.clone(), |t| t.short_name().to_string());
            (name, v.clone())
        })
        .collect();
    Overview {
        generated_unix_ms: now_unix_ms(),
        window_s: window.as_secs(),
        series_start_unix_s: series_start,
        series_len,
        writes_enabled,
        services,
        sidecars: status.proxies.iter().map(sidecar_view).collect(),
        versions,
        canaries,
    }
}

fn service_view(config: ServiceConfig) -> ServiceView {
    let versions =
        config.subsets.iter().map(|s| VersionView { version: s.clone(), ..VersionView::default() }).collect();
    ServiceView {
        name: short_name(&config.service),
        service: config.service,
        subsets: config.subsets,
        weights: config.weights,
        versions,
        canary: None,
    }
}

fn version_entry<'a>(service: &'a mut ServiceView, version: &str) -> &'a mut VersionView {
    let i = match service.versions.iter().position(|v| v.version == version) {
        Some(i) => i,
        None => {
            service.versions.push(VersionView { version: version.to_string(), ..VersionView::default() });
            service.versions.len() - 1
        }
    };
    &mut service.versions[i]
}

fn series_view(points: &[pb::LoadPoint], start: i64, len: usize) -> SeriesView {
    let mut view = SeriesView {
        rps: vec![None; len],
        share: vec![None; len],
        success: vec![None; len],
        p50: vec![None; len],
        p99: vec![None; len],
    };
    for point in points {
        let Some(i) = usize::try_from(point.unix_s - start).ok().filter(|i| *i < len) else { continue };
        let requests = point.requests as f64;
        view.rps[i] = Some(view.rps[i].unwrap_or(0.0) + requests);
        if point.requests > 0 {
            let ok = point.requests.saturating_sub(point.errors) as f64;
            view.success[i] = Some(100.0 * ok / requests);
        }
        view.p50[i] = point.p50_ms;
        view.p99[i] = point.p99_ms;
    }
    view
}

/// Each second's share of the service's requests, per version.
fn fill_shares(service: &mut ServiceView, len: usize) {
    for i in 0..len {
        let total: f64 = service.versions.iter().filter_map(|v| v.series.rps.get(i).copied().flatten()).sum();
        for version in &mut service.versions {
            let Some(slot) = version.series.share.get_mut(i) else { continue };
            *slot = match version.series.rps.get(i).copied().flatten() {
                Some(r) if total > 0.0 => Some(100.0 * r / total),
                Some(_) => Some(0.0),
                None => None,
            };
        }
    }
}

fn sidecar_view(proxy: &pb::ProxyStatus) -> SidecarView {
    let node = proxy.node.clone().unwrap_or_default();
    let workload =
        if node.workload.is_empty() { "-".to_string() } else { format!("{}.{}", node.workload, node.namespace) };
    let types = ResourceType::ALL
        .iter()
        .map(|ty| match proxy.types.iter().find(|t| t.type_url == ty.type_url()) {
            None => TypeView {
                ty: ty.short_name().to_string(),
                state: "-".to_string(),
                version: None,
                push_to_ack_ms: None,
                last_nack: None,
            },
            Some(t) => {
                let version = if t.acked_version.is_empty() { &t.sent_version } else { &t.acked_version };
                TypeView {
                    ty: ty.short_name().to_string(),
                    state: sync_state_name(t.state).to_string(),
                    version: Some(version.clone()).filter(|v| !v.is_empty()),
                    push_to_ack_ms: t.push_to_ack_ms,
                    last_nack: Some(&t.last_nack_error)
                        .filter(|e| !e.is_empty())
                        .map(|e| format!("v{}: {e}", t.last_nack_version)),
                }
            }
        })
        .collect();
    SidecarView {
        id: node.id,
        workload,
        version: node.labels.get("version").cloned(),
        connected_since_unix_ms: proxy.connected_since_unix_ms,
        types,
    }
}

fn phase_name(phase: i32) -> &'static str {
    match pb::CanaryPhase::try_from(phase) {
        Ok(pb::CanaryPhase::Initialized) => "INITIALIZED",
        Ok(pb::CanaryPhase::Progressing) => "PROGRESSING",
        Ok(pb::CanaryPhase::Succeeded) => "SUCCEEDED",
        Ok(pb::CanaryPhase::Failed) => "FAILED",
        Ok(pb::CanaryPhase::Aborted) => "ABORTED",
        _ => "UNKNOWN",
    }
}

fn canary_view(status: &pb::CanaryStatus) -> CanaryView {
    let spec = status.spec.clone().unwrap_or_default();
    let phase = phase_name(status.phase);
    let skip = status.events.len().saturating_sub(MAX_EVENTS);
    CanaryView {
        service_fqdn: fqdn(&spec.service, "default"),
        service: spec.service.clone(),
        canary: spec.canary.clone(),
        stable: spec.stable.clone(),
        phase: phase.to_string(),
        running: matches!(phase, "INITIALIZED" | "PROGRESSING"),
        weight: status.weight,
        step: status.step,
        steps: steps(&spec),
        max_weight: spec.max_weight,
        failed_checks: status.failed_checks,
        threshold: spec.threshold,
        interval_ms: spec.interval_ms,
        reason: status.reason.clone(),
        next_check_unix_ms: status.next_check_unix_ms,
        started_unix_ms: status.started_unix_ms,
        last_figures: status
            .last_figures
            .iter()
            .map(|f| IntervalView {
                version: f.version.clone(),
                requests: f.requests,
                success_percent: f.success_percent,
                p99_ms: f.p99_ms,
            })
            .collect(),
        events: status
            .events
            .iter()
            .skip(skip)
            .map(|e| EventView {
                unix_ms: e.unix_ms,
                kind: e.kind.clone(),
                message: e.message.clone(),
                weight: e.weight,
            })
            .collect(),
    }
}

/// The body of `POST /api/services/{service}/weights`: `{"weights": {"v1": 90, "v2": 10}}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetWeightsBody {
    /// Subset → percentage; they must add up to 100.
    pub weights: BTreeMap<String, u32>,
}

/// The body of `POST /api/services/{service}/rollback`: empty or `{}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackBody {}

/// What a write action answers.
#[derive(Debug, Clone, Serialize)]
pub struct ActionView {
    /// The service, as given.
    pub service: String,
    /// `set-weight` or `rollback`.
    pub action: &'static str,
    /// False when the config already said this.
    pub changed: bool,
    /// The routes version carrying the change.
    pub version: String,
    /// The weights now in force.
    pub weights: BTreeMap<String, u32>,
    /// The subset rollback sends traffic to.
    pub stable_subset: String,
    /// Sidecars that ACKed the version.
    pub acked: u32,
    /// Sidecars that NACKed it.
    pub nacked: u32,
    /// Sidecars waited for.
    pub total: u32,
    /// True when the wait ended before every sidecar answered.
    pub timed_out: bool,
    /// One line for people.
    pub message: String,
}

/// The answer to a done action.
pub fn action_view(service: &str, action: &'static str, result: pb::ChangeResult) -> ActionView {
    let weights: BTreeMap<String, u32> = result.weights.into_iter().collect();
    let ack = result.ack.unwrap_or_default();
    let split: Vec<String> = weights.iter().map(|(s, w)| format!("{s}={w}")).collect();
    let mut message = if result.changed {
        format!("{service}: {} (routes version {})", split.join(" "), result.version)
    } else {
        format!("{service}: already {} (routes version {}), nothing changed", split.join(" "), result.version)
    };
    if ack.total == 0 {
        message.push_str("; no sidecar subscribed to wait for");
    } else {
        message.push_str(&format!("; ACKed by {} of {} sidecar(s)", ack.acked, ack.total));
        if ack.nacked > 0 {
            let nacks: Vec<String> = ack
                .nodes
                .iter()
                .filter(|n| n.state == "NACKED")
                .map(|n| format!("{}: {}", n.node_id, n.error))
                .collect();
            message.push_str(&format!(", NACKed by {} ({})", ack.nacked, nacks.join("; ")));
        }
        if ack.timed_out {
            message.push_str(", the wait timed out");
        }
    }
    ActionView {
        service: service.to_string(),
        action,
        changed: result.changed,
        version: result.version,
        weights,
        stable_subset: result.stable_subset,
        acked: ack.acked,
        nacked: ack.nacked,
        total: ack.total,
        timed_out: ack.timed_out,
        message,
    }
}

/// Parses a JSON body; the error names the problem (line, column, field).
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8], empty_ok: bool) -> Result<T, ActionError> {
    let text = if body.iter().all(u8::is_ascii_whitespace) && empty_ok { &b"{}"[..] } else { body };
    serde_json::from_slice(text)
        .map_err(|e| ActionError { status: http::StatusCode::BAD_REQUEST, message: format!("bad JSON body: {e}") })
}

/// True for a name a service can have (a DNS name, `*` excluded).
pub fn valid_service_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !name.starts_with('.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_parse_and_bad_ones_name_the_problem() {
        let body: SetWeightsBody = parse_body(br#"{"weights": {"v1": 90, "v2": 10}}"#, false).expect("parses");
        assert_eq!(body.weights.get("v2"), Some(&10));
        let e = parse_body::<SetWeightsBody>(br#"{"weights": {"v1": "ninety"}}"#, false).unwrap_err();
        assert_eq!(e.status, http::StatusCode::BAD_REQUEST);
        assert!(e.message.contains("bad JSON body"), "{}", e.message);
        let e = parse_body::<SetWeightsBody>(br#"{"wieghts": {}}"#, false).unwrap_err();
        assert!(e.message.contains("wieghts"), "{}", e.message);
        let e = parse_body::<SetWeightsBody>(b"", false).unwrap_err();
        assert!(e.message.contains("EOF"), "{}", e.message);
        assert!(parse_body::<RollbackBody>(b"", true).is_ok());
        assert!(parse_body::<RollbackBody>(br#"{"force": true}"#, true).is_err());
    }

    #[test]
    fn series_are_aligned_and_shares_computed_per_second() {
        let mut service = service_view(ServiceConfig {
            service: "payment.default.svc.cluster.local".into(),
            subsets: vec!["v1".into(), "v2".into()],
            weights: BTreeMap::new(),
        });
        let point = |s, r, e| pb::LoadPoint { unix_s: s, requests: r, errors: e, p50_ms: Some(1.0), p99_ms: Some(2.0) };
        service.versions[0].series = series_view(&[point(100, 30, 0), point(101, 10, 0), point(99, 5, 0)], 100, 3);
        service.versions[1].series = series_view(&[point(100, 10, 5)], 100, 3);
        fill_shares(&mut service, 3);
        assert_eq!(service.versions[0].series.rps, vec![Some(30.0), Some(10.0), None]);
        assert_eq!(service.versions[0].series.share, vec![Some(75.0), Some(100.0), None]);
        assert_eq!(service.versions[1].series.share, vec![Some(25.0), None, None]);
        assert_eq!(service.versions[1].series.success, vec![Some(50.0), None, None]);
        assert_eq!(service.name, "payment");
    }

    #[test]
    fn steps_are_the_control_planes() {
        let view = |spec: pb::CanarySpec| canary_view(&pb::CanaryStatus { spec: Some(spec), ..Default::default() });
        let spec = pb::CanarySpec { step_weight: 20, max_weight: 50, ..Default::default() };
        assert_eq!(view(spec.clone()).steps, vec![20, 40, 50]);
        assert_eq!(view(spec.clone()).steps, steps(&spec));
        let spec = pb::CanarySpec { step_weights: vec![5, 10, 25, 50], max_weight: 50, ..Default::default() };
        assert_eq!(view(spec).steps, vec![5, 10, 25, 50]);
    }

    #[test]
    fn the_window_comes_from_the_query() {
        assert_eq!(window_of(None), Ok(FIGURES_WINDOW));
        assert_eq!(window_of(Some("x=1")), Ok(FIGURES_WINDOW));
        assert_eq!(window_of(Some("x=1&window=900")), Ok(Duration::from_secs(900)));
        assert!(window_of(Some("window=901")).unwrap_err().message.contains("from 1 to 900"));
        assert!(window_of(Some("window=1m")).is_err());
    }

    #[test]
    fn service_names_are_checked() {
        assert!(valid_service_name("payment.default.svc.cluster.local"));
        assert!(!valid_service_name("pay/ment"));
        assert!(!valid_service_name("pay%20ment"));
        assert!(!valid_service_name(""));
    }
}
