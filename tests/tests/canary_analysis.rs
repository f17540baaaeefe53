//! The canary analysis end to end: real upstreams (v1 healthy; v2 answering errors or
//! not), a real sidecar subscribed to a real control plane over gRPC on loopback,
//! reporting its per-version load over the discovery stream, and a steady load
//! through the sidecar. A v2 answering 20% errors is rolled back after `threshold`
//! failed intervals, the rollback is confirmed by the sidecar, and no request sent
//! after that reaches v2; a healthy v2 is promoted to 100%.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serin::demo_app::{AppConfig, DemoApp};
use serin_control_api::pb;
use serin_control_api::server::{ControlPlane, ServerOptions, Store, parse_documents};
use serin_tests::*;
use tokio::task::JoinHandle;

/// The payment VirtualService: one split route, all to v1.
fn split_vs() -> String {
    vs_yaml(
        "payment",
        "payment",
        "  - name: split\n    route:\n    - {destination: {host: payment, subset: v1}, weight: 100}\n    - {destination: {host: payment, subset: v2}, weight: 0}\n",
    )
}

/// One answer of the load: when its request was sent, and the version that answered
/// (None for a 5xx or no version).
struct Answer {
    sent: Instant,
    version: Option<String>,
}

/// Requests sent one after another through the sidecar until stopped (bounded: 120 s).
struct Load {
    answers: Arc<Mutex<Vec<Answer>>>,
    stop: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Load {
    fn start(sidecar: &Sidecar) -> Load {
        let answers = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let addr = sidecar.bound.outbound;
        let (sink, stopped) = (answers.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut client = Client::connect(addr, "payment").await;
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stopped.load(Ordering::Relaxed) && Instant::now() < deadline {
                let sent = Instant::now();
                let (status, body) = client.get("/", &[]).await;
                let version = if status.is_success() { version_of(&body) } else { None };
                sink.lock().unwrap_or_else(|e| e.into_inner()).push(Answer { sent, version });
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
        Load { answers, stop, task }
    }

    async fn stop(self) -> Vec<Answer> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
        std::mem::take(&mut *self.answers.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// A control plane (state persisted in `state`) serving on a loopback port, a sidecar
/// subscribed to it with its first config applied, and the upstreams.
struct Mesh {
    plane: ControlPlane,
    store: Arc<Store>,
    sidecar: Sidecar,
    _apps: Vec<DemoApp>,
    _serve: JoinHandle<()>,
}

impl Mesh {
    async fn start(v2_error_rate: f64, state: &Path) -> Mesh {
        let mut v2 = AppConfig::new("payment", "v2");
        v2.error_rate = v2_error_rate;
        let (apps, pods) = start_pods("payment", vec![("v1", AppConfig::new("payment", "v1")), ("v2", v2)]).await;
        let docs = [registry_yaml("payment", "HTTP", &pods), subsets_yaml("payment", None), split_vs()];
        let documents = parse_documents(&docs.join("\n---\n")).expect("documents");
        let store = Arc::new(Store::open(state, documents).expect("store"));
        let plane = ControlPlane::new(Arc::clone(&store), ServerOptions::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind control plane");
        let addr = listener.local_addr().expect("control plane address");
        let serving = plane.clone();
        let serve = tokio::spawn(async move {
            serving.serve(listener, std::future::pending()).await.expect("control plane serve");
        });
        let sidecar = Sidecar::start_args(&[], move |args| {
            args.config = None;
            args.control_plane.address = Some(addr.to_string());
            args.control_plane.node_id = Some("frontend".to_string());
        })
        .await;
        let deadline = Instant::now() + Duration::from_secs(20);
        while sidecar.admin_json("/config_dump").await["control_plane"]["state"] != "ACKED" {
            assert!(Instant::now() < deadline, "the sidecar never applied the control plane's config");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Mesh { plane, store, sidecar, _apps: apps, _serve: serve }
    }

    /// Starts an analysis of v2 stepping 20 → 40 → 60%, judged every second.
    async fn start_canary(&self) -> pb::CanaryStatus {
        let spec = pb::CanarySpec {
            service: "payment".into(),
            canary: "v2".into(),
            stable: "v1".into(),
            step_weight: 20,
            max_weight: 60,
            interval_ms: 1000,
            threshold: 2,
            min_success_percent: Some(99.0),
            max_p99_ms: Some(1000.0),
            min_requests: 10,
            promote_weight: 100,
            ..pb::CanarySpec::default()
        };
        self.plane.canaries().start(spec).await.expect("start the analysis")
    }

    /// Waits (bounded: 90 s) until the analysis has ended; returns how it ended.
    async fn wait_finished(&self) -> pb::CanaryStatus {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let status = self.plane.canaries().get("payment").expect("the analysis is known");
            let phase = pb::CanaryPhase::try_from(status.phase).unwrap_or(pb::CanaryPhase::Unspecified);
            if matches!(phase, pb::CanaryPhase::Succeeded | pb::CanaryPhase::Failed | pb::CanaryPhase::Aborted) {
                return status;
            }
            assert!(Instant::now() < deadline, "the analysis did not end: {status:#?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The events of judged intervals: a failed check, or a pass (the step or the
/// promotion it led to).
fn judged(status: &pb::CanaryStatus) -> Vec<&pb::CanaryEvent> {
    status.events.iter().filter(|e| matches!(e.kind.as_str(), "failed-check" | "step" | "promote")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_canary_is_rolled_back_and_gets_no_traffic_after_the_rollback_is_confirmed() {
    let state = tempfile::tempdir().expect("state dir");
    let mesh = Mesh::start(0.2, state.path()).await;
    let load = Load::start(&mesh.sidecar);
    let started = mesh.start_canary().await;
    assert_eq!(started.weight, 20, "the first step: {started:#?}");

    let ended = mesh.wait_finished().await;
    // `wait_finished` sees FAILED only after the rollback was ACKed by the sidecar.
    let confirmed = Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let answers = load.stop().await;

    assert_eq!(pb::CanaryPhase::try_from(ended.phase), Ok(pb::CanaryPhase::Failed), "{ended:#?}");
    assert_eq!(ended.weight, 0, "{ended:#?}");
    assert_eq!(ended.failed_checks, ended.spec.as_ref().map_or(0, |s| s.threshold), "{ended:#?}");
    assert!(!ended.reason.is_empty(), "a failed analysis says why");
    // Rolled back within `threshold` judged intervals: every interval failed (v2's
    // success rate is ~80% against a minimum of 99%), so no step was passed.
    let judged = judged(&ended);
    assert_eq!(judged.len(), 2, "intervals judged: {:#?}", ended.events);
    assert_eq!(ended.step, 0, "{ended:#?}");
    for event in &judged {
        let canary = &event.figures[0];
        assert_eq!(canary.version, "v2");
        assert!(canary.requests >= 10, "judged on too few requests: {event:#?}");
        assert!(canary.success_percent.is_some_and(|s| s < 99.0), "{event:#?}");
    }
    assert_eq!(mesh.store.weights("payment").get("v2").copied(), Some(0));

    // v2 took traffic during the analysis, none after the rollback was confirmed.
    assert!(answers.iter().any(|a| a.sent < confirmed && a.version.as_deref() == Some("v2")), "v2 never answered");
    let after: Vec<&Answer> = answers.iter().filter(|a| a.sent >= confirmed).collect();
    assert!(!after.is_empty(), "no request after the rollback");
    assert!(after.iter().all(|a| a.version.as_deref() == Some("v1")), "a request after the rollback reached v2");

    // The control plane's figures saw v2's errors.
    let figures =
        mesh.plane.load().figures(&pb::GetLoadRequest { service: "payment".into(), window_ms: 120_000, series: false });
    let v2 = figures.versions.iter().find(|v| v.version == "v2").expect("v2 figures");
    assert!(v2.requests > 0 && v2.status_5xx > 0, "{v2:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_canary_is_promoted() {
    let state = tempfile::tempdir().expect("state dir");
    let mesh = Mesh::start(0.0, state.path()).await;
    let load = Load::start(&mesh.sidecar);
    mesh.start_canary().await;

    let ended = mesh.wait_finished().await;
    let confirmed = Instant::now();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let answers = load.stop().await;

    assert_eq!(pb::CanaryPhase::try_from(ended.phase), Ok(pb::CanaryPhase::Succeeded), "{ended:#?}");
    assert_eq!(ended.weight, 100, "{ended:#?}");
    assert_eq!(ended.failed_checks, 0, "{ended:#?}");
    // 20 → 40 → 60, each passed, then the promotion.
    let weights: Vec<u32> = judged(&ended).iter().map(|e| e.weight).collect();
    assert_eq!(weights, [40, 60, 100], "weights after each judged interval: {:#?}", ended.events);
    let weights = mesh.store.weights("payment");
    assert_eq!((weights.get("v1").copied(), weights.get("v2").copied()), (Some(0), Some(100)));
    let after: Vec<&Answer> = answers.iter().filter(|a| a.sent >= confirmed).collect();
    assert!(!after.is_empty() && after.iter().all(|a| a.version.as_deref() == Some("v2")), "all traffic to v2");
}
