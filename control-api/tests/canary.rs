//! Canary analyses over real gRPC with a real store in a temp folder: start → steps →
//! promote, failure → rollback, persistence and restart mid-analysis, Canary
//! documents, bad input. Figures come from a synthetic source or from the load
//! aggregator fed like the sidecars feed it.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Subscriber, eventually, weights};
use serin_control_api::client::{CanaryClient, ClientError};
use serin_control_api::pb::{self, CanaryPhase};
use serin_control_api::server::{
    CANARY_STATE_FILE, CanaryOptions, ControlPlane, Figures, ServerOptions, Store, parse_documents,
};

/// Figures per version, set by the test.
#[derive(Clone, Default)]
struct Fake(Arc<Mutex<BTreeMap<String, Figures>>>);

impl Fake {
    fn set(&self, version: &str, requests: u64, success: f64, p99: f64) {
        let f = Figures { version: version.into(), requests, success_percent: Some(success), p99_ms: Some(p99) };
        self.0.lock().expect("lock").insert(version.to_string(), f);
    }

    fn healthy() -> Fake {
        let fake = Fake::default();
        fake.set("v1", 500, 100.0, 20.0);
        fake.set("v2", 100, 100.0, 20.0);
        fake
    }

    fn options(&self) -> CanaryOptions {
        let map = Arc::clone(&self.0);
        let source = move |_service: &str, version: &str, _window: Duration| {
            map.lock()
                .expect("lock")
                .get(version)
                .cloned()
                .unwrap_or_else(|| Figures { version: version.into(), ..Figures::default() })
        };
        CanaryOptions { figures: Arc::new(source), ack_timeout: Duration::from_secs(10) }
    }
}

/// A control plane on 127.0.0.1 whose analyses read `fake` from the start.
struct Server {
    addr: std::net::SocketAddr,
    plane: ControlPlane,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn management(&self) -> serin_control_api::client::ManagementClient {
        serin_control_api::client::ManagementClient::connect(&self.url()).await.expect("management client")
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(common::PATIENCE, self.task).await.expect("server stops").expect("server task");
    }
}

async fn serve(store: Store, fake: &Fake) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let plane = ControlPlane::new(Arc::new(store), ServerOptions::default()).with_canary_options(fake.options());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = plane.clone();
    let task = tokio::spawn(async move {
        serving
            .serve(listener, async move {
                let _ = stopped.await;
            })
            .await
            .expect("serve");
    });
    Server { addr, plane, stop, task }
}

async fn client(server: &Server) -> CanaryClient {
    CanaryClient::connect(&server.url()).await.expect("canary client")
}

fn spec(step: u32, max: u32) -> pb::CanarySpec {
    pb::CanarySpec {
        service: "payment".into(),
        canary: "v2".into(),
        step_weight: step,
        max_weight: max,
        interval_ms: 200,
        threshold: 2,
        min_success_percent: Some(99.0),
        max_p99_ms: Some(500.0),
        min_requests: 10,
        promote_weight: 100,
        ..Default::default()
    }
}

async fn until_phase(client: &mut CanaryClient, phase: CanaryPhase) -> pb::CanaryStatus {
    eventually(&format!("phase {phase:?}"), || {
        let mut c = client.clone();
        async move { c.get("payment").await.ok().filter(|s| s.phase() == phase) }
    })
    .await
}

fn kinds(status: &pb::CanaryStatus) -> Vec<&str> {
    status.events.iter().map(|e| e.kind.as_str()).collect()
}

#[tokio::test]
async fn a_healthy_canary_steps_up_and_is_promoted() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fake = Fake::healthy();
    let server = serve(common::open_store(dir.path()), &fake).await;
    let sidecar = Subscriber::start(&server.url(), "frontend-1", |_| None);
    sidecar.wait_for_routes_version("1").await;
    let mut ctl = client(&server).await;
    let started = ctl.start(spec(20, 60)).await.expect("start");
    assert_eq!((started.phase(), started.weight), (CanaryPhase::Progressing, 20), "the first step, applied");
    assert!(started.events[0].message.contains("ACKed by 1 sidecar(s)"), "{:?}", started.events);
    let resolved = started.spec.clone().expect("spec");
    assert_eq!((resolved.stable.as_str(), resolved.source.as_str(), resolved.promote_weight), ("v1", "ctl", 100));
    // One analysis per service.
    let again = ctl.start(spec(20, 60)).await.expect_err("refused");
    let ClientError::Rpc(status) = again else { panic!("an RPC error: {again}") };
    assert_eq!(status.code(), tonic::Code::AlreadyExists, "{status:?}");
    let done = until_phase(&mut ctl, CanaryPhase::Succeeded).await;
    assert_eq!(done.weight, 100);
    assert_eq!(kinds(&done), ["started", "step", "step", "promote"], "{:?}", done.events);
    assert!(done.events.iter().all(|e| e.message.contains("ACKed by 1 sidecar(s)")), "{:?}", done.events);
    assert_eq!(done.events[1].figures.len(), 2, "canary and stable figures");
    assert_eq!(done.last_figures.first().map(|f| f.version.as_str()), Some("v2"));
    assert_eq!(server.plane.store().weights("payment"), weights(&[("v1", 0), ("v2", 100)]));
    eventually("the sidecar got the promotion", || async {
        (sidecar.routes().contains("weight: 100") && sidecar.routes().contains("weight: 0")).then_some(())
    })
    .await;
    // Finished: a new one may start; list shows the latest per service.
    let list = ctl.list().await.expect("list");
    assert_eq!(list.canaries.len(), 1);
    sidecar.subscription.shutdown().await;
    server.stop().await;
}

#[tokio::test]
async fn a_failing_canary_is_rolled_back_at_threshold_and_stays_failed_after_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fake = Fake::healthy();
    fake.set("v2", 100, 80.0, 20.0);
    let server = serve(common::open_store(dir.path()), &fake).await;
    let mut ctl = client(&server).await;
    ctl.start(spec(10, 50)).await.expect("start");
    let failed = until_phase(&mut ctl, CanaryPhase::Failed).await;
    assert_eq!((failed.weight, failed.failed_checks), (0, 2));
    assert!(failed.reason.contains("success rate 80.00% < 99%"), "{}", failed.reason);
    assert_eq!(kinds(&failed), ["started", "failed-check", "failed-check", "rollback"]);
    assert_eq!(server.plane.store().weights("payment"), weights(&[("v1", 100), ("v2", 0)]));
    let saved = std::fs::read_to_string(dir.path().join(CANARY_STATE_FILE)).expect("state file");
    assert!(saved.contains("\"phase\": \"FAILED\""), "{saved}");
    server.stop().await;

    let server = serve(common::open_store(dir.path()), &fake).await;
    assert_eq!(server.plane.store().weights("payment"), weights(&[("v1", 100), ("v2", 0)]), "weights persisted");
    let mut ctl = client(&server).await;
    let after = ctl.get("payment").await.expect("kept for status");
    assert_eq!(after.phase(), CanaryPhase::Failed);
    assert_eq!(after.events.len(), failed.events.len(), "a finished analysis does not resume");
    server.stop().await;
}

#[tokio::test]
async fn a_restart_mid_analysis_resumes_and_reapplies_a_recorded_weight() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fake = Fake::healthy();
    fake.set("v2", 2, 100.0, 20.0); // too little traffic: the analysis waits at step 1
    let server = serve(common::open_store(dir.path()), &fake).await;
    let mut ctl = client(&server).await;
    ctl.start(spec(10, 30)).await.expect("start");
    let waiting = eventually("a wait event", || {
        let mut c = ctl.clone();
        async move { c.get("payment").await.ok().filter(|s| s.events.iter().any(|e| e.kind == "wait")) }
    })
    .await;
    assert_eq!((waiting.phase(), waiting.weight, waiting.failed_checks), (CanaryPhase::Progressing, 10, 0));
    assert!(waiting.events.iter().any(|e| e.message.contains("2 request(s)")), "{:?}", waiting.events);
    server.stop().await;

    // As if the process had died after recording the next step (20%) and before the
    // store committed it.
    let path = dir.path().join(CANARY_STATE_FILE);
    let mut saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("state file")).expect("json");
    saved["canaries"][0]["applying"] =
        serde_json::json!({"kind": "step", "weight": 20, "step": 1, "message": "checks passed at 10%", "figures": []});
    std::fs::write(&path, serde_json::to_vec_pretty(&saved).expect("json")).expect("write");

    fake.set("v2", 100, 100.0, 20.0);
    let server = serve(common::open_store(dir.path()), &fake).await;
    let mut ctl = client(&server).await;
    let done = until_phase(&mut ctl, CanaryPhase::Succeeded).await;
    let kinds = kinds(&done);
    let resumed = kinds.iter().position(|k| *k == "resumed").expect("a resumed event");
    assert_eq!(&kinds[resumed..], ["resumed", "step", "step", "promote"], "{kinds:?}");
    assert!(done.events[resumed].message.contains("applying the recorded weight 20%"), "{:?}", done.events);
    assert_eq!(done.events[resumed + 1].weight, 20);
    assert_eq!(server.plane.store().weights("payment"), weights(&[("v1", 0), ("v2", 100)]));
    server.stop().await;
}

#[tokio::test]
async fn a_manual_weight_change_aborts_the_analysis_and_abort_can_roll_back() {
    let fake = Fake::healthy();
    fake.set("v2", 0, 100.0, 20.0);
    let server = serve(common::store(), &fake).await;
    let mut ctl = client(&server).await;
    ctl.start(spec(10, 50)).await.expect("start");
    until_phase(&mut ctl, CanaryPhase::Progressing).await;
    let mut management = server.management().await;
    management.set_weights("payment", &weights(&[("v1", 70), ("v2", 30)]), None).await.expect("set-weight");
    let aborted = until_phase(&mut ctl, CanaryPhase::Aborted).await;
    assert!(aborted.reason.contains("changed outside the analysis"), "{}", aborted.reason);
    assert_eq!(server.plane.store().weights("payment"), weights(&[("v1", 70), ("v2", 30)]), "manual weights stay");
    let e = ctl.abort("payment", false).await.expect_err("not running");
    assert!(matches!(&e, ClientError::Rpc(s) if s.code() == tonic::Code::FailedPrecondition), "{e}");

    // A new analysis, aborted with rollback: weight 0, confirmed.
    ctl.start(spec(10, 50)).await.expect("start again");
    until_phase(&mut ctl, CanaryPhase::Progressing).await;
    let aborted = ctl.abort("payment.default.svc.cluster.local", true).await.expect("abort");
    assert_eq!((aborted.phase(), aborted.weight), (CanaryPhase::Aborted, 0));
    assert_eq!(server.plane.store().weights("payment"), weights(&[("v1", 100), ("v2", 0)]));
    server.stop().await;
}

#[tokio::test]
async fn bad_starts_are_refused_naming_the_field() {
    let server = serve(common::store(), &Fake::healthy()).await;
    let mut ctl = client(&server).await;
    let cases = [
        (pb::CanarySpec { canary: "v3".into(), ..spec(10, 50) }, "--canary", "its subsets are v1, v2"),
        (pb::CanarySpec { stable: "v9".into(), ..spec(10, 50) }, "--stable", "its subsets are v1, v2"),
        (pb::CanarySpec { threshold: 0, ..spec(10, 50) }, "--threshold", "at least 1"),
        (spec(0, 50), "--step", "more than 0"),
        (spec(10, 0), "--max", "from 1 to 100"),
        (spec(10, 120), "--max", "more than 100"),
        (pb::CanarySpec { step_weights: vec![10, 5], ..spec(0, 0) }, "--steps", "must increase"),
        (pb::CanarySpec { step_weights: vec![10, 40], ..spec(0, 50) }, "--max", "last step weight 40"),
        (pb::CanarySpec { service: "ledger".into(), ..spec(10, 50) }, "SERVICE", "ledger"),
    ];
    for (spec, field, words) in cases {
        let e = ctl.start(spec).await.expect_err("refused");
        let ClientError::Rpc(status) = &e else { panic!("an RPC error: {e}") };
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().starts_with(&format!("{field}: ")), "{field}: {}", status.message());
        assert!(status.message().contains(words), "{words}: {}", status.message());
    }
    let e = ctl.get("payment").await.expect_err("none");
    assert!(matches!(&e, ClientError::Rpc(s) if s.code() == tonic::Code::NotFound), "{e}");
    server.stop().await;
}

const CANARY_DOC: &str = "apiVersion: flagger.app/v1beta1
kind: Canary
metadata: {name: payment, namespace: default}
spec:
  targetRef: {apiVersion: apps/v1, kind: Deployment, name: payment}
  service: {port: 8080}
  analysis:
    interval: 200ms
    threshold: 2
    stepWeights: [10, 30]
    metrics:
    - {name: request-success-rate, thresholdRange: {min: 99}, interval: 1s}
    - {name: request-duration, thresholdRange: {max: 500}}
  serin: {minRequests: 10}
";

fn mesh_with_canary(doc: &str) -> Vec<serin_control_api::server::SourceDocument> {
    let mut docs = common::mesh();
    docs.extend(parse_documents(doc).expect("canary parses"));
    docs
}

#[tokio::test]
async fn a_canary_document_starts_once_and_again_only_when_changed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fake = Fake::healthy();
    let store = Store::open(dir.path(), mesh_with_canary(CANARY_DOC)).expect("store");
    assert!(store.warnings().iter().any(|w| w.contains("spec.service.port") && w.contains("not used")));
    let server = serve(store, &fake).await;
    let mut ctl = client(&server).await;
    let done = until_phase(&mut ctl, CanaryPhase::Succeeded).await;
    let spec = done.spec.clone().expect("spec");
    assert_eq!((spec.source.as_str(), spec.canary.as_str(), spec.max_weight), ("Canary/default/payment", "v2", 30));
    assert_eq!(kinds(&done), ["started", "step", "promote"]);
    server.stop().await;

    // Same document after a restart: not started again.
    let server = serve(Store::open(dir.path(), mesh_with_canary(CANARY_DOC)).expect("store"), &fake).await;
    let mut ctl = client(&server).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let same = ctl.get("payment").await.expect("status");
    assert_eq!((same.phase(), same.started_unix_ms), (CanaryPhase::Succeeded, done.started_unix_ms));

    // An invalid edit is refused whole; the last good config stays.
    let bad = CANARY_DOC.replace("threshold: 2", "threshold: 0");
    let e = server.plane.store().replace_documents(mesh_with_canary(&bad)).expect_err("refused");
    assert!(e.to_string().contains("Canary/default/payment: spec.analysis.threshold"), "{e}");
    let skip = CANARY_DOC.replace("  serin:", "  skipAnalysis: true\n  serin:");
    let e = server.plane.store().replace_documents(mesh_with_canary(&skip)).expect_err("refused");
    assert!(e.to_string().contains("spec.skipAnalysis"), "{e}");

    // A changed spec starts a new analysis.
    let changed = CANARY_DOC.replace("stepWeights: [10, 30]", "stepWeights: [20, 40]");
    server.plane.store().replace_documents(mesh_with_canary(&changed)).expect("reloads");
    let again = eventually("a new analysis", || {
        let mut c = ctl.clone();
        async move {
            c.get("payment")
                .await
                .ok()
                .filter(|s| s.started_unix_ms != done.started_unix_ms && s.phase() == CanaryPhase::Succeeded)
        }
    })
    .await;
    assert_eq!(again.spec.map(|s| s.step_weights), Some(vec![20, 40]));
    server.stop().await;
}

#[tokio::test]
async fn the_load_reports_of_the_sidecars_drive_the_analysis() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    // The default figures source: the load aggregator.
    let plane = ControlPlane::new(Arc::new(common::store()), ServerOptions::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = plane.clone();
    let task = tokio::spawn(async move {
        serving
            .serve(listener, async move {
                let _ = stopped.await;
            })
            .await
            .expect("serve");
    });
    let server = Server { addr, plane, stop, task };
    let mut ctl = client(&server).await;
    // A sidecar reporting every 20 ms: v1 healthy, v2 answering 20% 5xx.
    let load = Arc::clone(server.plane.load());
    let feeder = tokio::spawn(async move {
        loop {
            let report = pb::LoadReport {
                interval_ms: 20,
                loads: vec![
                    pb::VersionLoad {
                        service: "payment.default.svc.cluster.local".into(),
                        version: "v1".into(),
                        status_2xx: 10,
                        duration_buckets: vec![0, 0, 10],
                        duration_sum_ms: 30.0,
                        ..Default::default()
                    },
                    pb::VersionLoad {
                        service: "payment.default.svc.cluster.local".into(),
                        version: "v2".into(),
                        status_2xx: 8,
                        status_5xx: 2,
                        duration_buckets: vec![0, 0, 10],
                        duration_sum_ms: 30.0,
                        ..Default::default()
                    },
                ],
            };
            load.record("frontend-1", &report);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    ctl.start(pb::CanarySpec { max_p99_ms: None, ..spec(10, 50) }).await.expect("start");
    let failed = until_phase(&mut ctl, CanaryPhase::Failed).await;
    feeder.abort();
    let checks: Vec<&pb::CanaryEvent> = failed.events.iter().filter(|e| e.kind == "failed-check").collect();
    assert_eq!(checks.len(), 2, "{:?}", failed.events);
    for check in checks {
        let canary = &check.figures[0];
        assert_eq!(canary.version, "v2");
        let success = canary.success_percent.expect("a success rate");
        assert!((success - 80.0).abs() < 0.01, "{success}");
    }
    assert_eq!(server.plane.store().weights("payment"), weights(&[("v1", 100), ("v2", 0)]));
    server.stop().await;
}

// ---- Regression tests of the review of issue #7 ----

/// A control plane whose analyses read `fake` and wait `ack_timeout` for ACKs.
async fn serve_with_ack(store: Store, fake: &Fake, ack_timeout: Duration) -> Server {
    let server = serve(store, fake).await;
    server.plane.canaries().set_options(CanaryOptions { ack_timeout, ..fake.options() });
    server
}

/// A sidecar subscribed to the routes that never ACKs another version: an applied
/// weight waits the whole ACK timeout for it.
async fn silent_sidecar(server: &Server) -> common::RawStream {
    let mut raw = common::RawStream::open(&server.url()).await;
    raw.subscribe(Some(common::node("silent-1")), serin_control_api::ResourceType::Routes).await;
    raw
}

/// Waits until the store gives the canary `v2` the weight `weight`.
async fn until_store_v2(server: &Server, weight: u32) {
    let store = Arc::clone(server.plane.store());
    let mut changes = store.subscribe();
    tokio::time::timeout(common::PATIENCE, async {
        while store.weights("payment").get("v2").copied() != Some(weight) {
            changes.changed().await.expect("store alive");
        }
    })
    .await
    .expect("the store got the weight");
}

/// Finding 1: the caller of `start` going away (Ctrl-C, grpc-timeout) while the
/// first weight waits for the sidecars' ACKs leaves a running analysis, not an
/// INITIALIZED entry without a task that refuses every later start.
#[tokio::test]
async fn a_start_whose_caller_goes_away_mid_apply_still_runs() {
    let fake = Fake::healthy();
    fake.set("v2", 0, 100.0, 20.0); // no traffic: the analysis waits at its first step
    let server = serve_with_ack(common::store(), &fake, Duration::from_secs(2)).await;
    let _sidecar = silent_sidecar(&server).await;
    let manager = Arc::clone(server.plane.canaries());
    {
        let start = manager.start(spec(10, 50));
        tokio::pin!(start);
        let store = Arc::clone(server.plane.store());
        let mut changes = store.subscribe();
        // Drive the start until the store holds the first weight, then drop it: the
        // ACK wait (2 s, a silent sidecar) is under way.
        loop {
            tokio::select! {
                biased;
                done = &mut start => panic!("start returned before the sidecar's ACK wait ended: {done:?}"),
                changed = changes.changed() => changed.expect("store alive"),
            }
            if store.weights("payment").get("v2") == Some(&10) {
                break;
            }
        }
    }
    // The caller is gone. The analysis goes on by itself: PROGRESSING at 10% once the
    // ACK wait ends (the silent sidecar is named), then waiting for traffic.
    let mut ctl = client(&server).await;
    let running = until_phase(&mut ctl, CanaryPhase::Progressing).await;
    assert_eq!(running.weight, 10);
    assert!(running.events[0].message.contains("not confirmed in time by silent-1"), "{:?}", running.events);
    eventually("a wait event", || {
        let mut c = ctl.clone();
        async move { c.get("payment").await.ok().filter(|s| s.events.iter().any(|e| e.kind == "wait")) }
    })
    .await;
    // Still one analysis per service, and it can be aborted.
    let again = ctl.start(spec(10, 50)).await.expect_err("one runs");
    assert!(matches!(&again, ClientError::Rpc(s) if s.code() == tonic::Code::AlreadyExists), "{again}");
    let aborted = manager.abort("payment", false).await.expect("abort");
    assert_eq!((aborted.phase(), aborted.weight), (CanaryPhase::Aborted, 10));
    server.stop().await;
}

/// Finding 1 (item 13): an abort arriving while start applies its first weight
/// waits for that apply, then stops the one runner: the analysis ends ABORTED and
/// rolled back, `start` returns, and no second runner moves the weights again.
#[tokio::test]
async fn an_abort_during_the_first_apply_leaves_one_runner() {
    let fake = Fake::healthy(); // healthy: a second runner would step the canary up
    let server = serve_with_ack(common::store(), &fake, Duration::from_secs(2)).await;
    let _sidecar = silent_sidecar(&server).await;
    let manager = Arc::clone(server.plane.canaries());
    let starting = {
        let manager = Arc::clone(&manager);
        tokio::spawn(async move { manager.start(spec(10, 50)).await })
    };
    until_store_v2(&server, 10).await;
    let aborted = manager.abort("payment", true).await.expect("abort");
    assert_eq!((aborted.phase(), aborted.weight), (CanaryPhase::Aborted, 0));
    let started = tokio::time::timeout(common::PATIENCE, starting).await.expect("start returns").expect("no panic");
    let started = started.expect("start answers");
    assert_ne!(started.phase(), CanaryPhase::Initialized, "{started:?}");
    assert_eq!(server.plane.store().weights("payment"), weights(&[("v1", 100), ("v2", 0)]));
    // A later start is accepted (nothing is left running) and runs alone.
    let mut ctl = client(&server).await;
    let status = ctl.get("payment").await.expect("status");
    assert_eq!(status.phase(), CanaryPhase::Aborted);
    let kinds = kinds(&status);
    assert_eq!(kinds.iter().filter(|k| **k == "started").count(), 1, "{kinds:?}");
    assert!(!kinds.contains(&"step"), "no runner stepped after the abort: {kinds:?}");
    server.stop().await;
}

/// Sets up a persisted analysis of `payment` waiting at 10% whose next decision
/// (`applying`) was recorded and not applied, then has the service's weights set to
/// `manual` behind its back (as a `ctl set-weight` landing between the runner's read
/// and its write would), and restarts the control plane on it.
async fn restart_with_recorded(
    applying: serde_json::Value,
    manual: &[(&str, u32)],
    fake: &Fake,
) -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let waiting = Fake::healthy();
    waiting.set("v2", 0, 100.0, 20.0);
    let server = serve(common::open_store(dir.path()), &waiting).await;
    let mut ctl = client(&server).await;
    ctl.start(pb::CanarySpec { threshold: 1, ..spec(10, 30) }).await.expect("start");
    until_phase(&mut ctl, CanaryPhase::Progressing).await;
    server.stop().await;
    let path = dir.path().join(CANARY_STATE_FILE);
    let mut saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("state file")).expect("json");
    saved["canaries"][0]["applying"] = applying;
    std::fs::write(&path, serde_json::to_vec_pretty(&saved).expect("json")).expect("write");
    let store = common::open_store(dir.path());
    store.set_weights("payment", &weights(manual)).expect("manual set-weight");
    (serve(store, fake).await, dir)
}

fn recorded(kind: &str, weight: u32) -> serde_json::Value {
    serde_json::json!({"kind": kind, "weight": weight, "step": 1, "message": "decided", "figures": [],
                       "before": {"v1": 90, "v2": 10}})
}

/// Finding 2: a manual weight change landing between the analysis' decision and its
/// write is not overwritten: the write is a compare-and-set, the analysis stops
/// ABORTED ("weights changed outside the analysis"), the manual weights stay.
#[tokio::test]
async fn a_manual_change_between_decision_and_write_is_not_overwritten() {
    let (server, _dir) = restart_with_recorded(recorded("step", 20), &[("v1", 70), ("v2", 30)], &Fake::healthy()).await;
    let mut ctl = client(&server).await;
    let aborted = until_phase(&mut ctl, CanaryPhase::Aborted).await;
    assert!(aborted.reason.contains("weights changed outside the analysis"), "{}", aborted.reason);
    assert!(aborted.reason.contains("v1=70 v2=30"), "{}", aborted.reason);
    assert_eq!(server.plane.store().weights("payment"), weights(&[("v1", 70), ("v2", 30)]), "manual weights stay");
    server.stop().await;

    // The store already at the recorded weights (applied before the crash): applied
    // again, the analysis goes on.
    let (server, _dir) = restart_with_recorded(recorded("step", 20), &[("v1", 80), ("v2", 20)], &Fake::healthy()).await;
    let mut ctl = client(&server).await;
    let done = until_phase(&mut ctl, CanaryPhase::Succeeded).await;
    assert!(kinds(&done).contains(&"step"), "{:?}", done.events);
    server.stop().await;
}

/// Finding 2: the analysis' own rollback still happens over a manual change that
/// gave the canary traffic; over a manual rollback (the rollback's own weights) it
/// is simply applied again. (A manual split that leaves the canary at 0 but differs
/// from the rollback's is left as it is: see the state machine's tests.)
#[tokio::test]
async fn the_analysis_rollback_survives_a_manual_change() {
    let (server, _dir) =
        restart_with_recorded(recorded("rollback", 0), &[("v1", 50), ("v2", 50)], &Fake::healthy()).await;
    let mut ctl = client(&server).await;
    let failed = until_phase(&mut ctl, CanaryPhase::Failed).await;
    assert!(failed.reason.contains("weights changed outside the analysis"), "{}", failed.reason);
    assert!(failed.reason.contains("rolled back anyway"), "{}", failed.reason);
    assert_eq!(server.plane.store().weights("payment"), weights(&[("v1", 100), ("v2", 0)]));
    server.stop().await;

    let (server, _dir) =
        restart_with_recorded(recorded("rollback", 0), &[("v1", 100), ("v2", 0)], &Fake::healthy()).await;
    let mut ctl = client(&server).await;
    let failed = until_phase(&mut ctl, CanaryPhase::Failed).await;
    assert_eq!(failed.weight, 0);
    assert!(!failed.reason.contains("changed outside"), "{}", failed.reason);
    assert_eq!(server.plane.store().weights("payment"), weights(&[("v1", 100), ("v2", 0)]));
    server.stop().await;
}

/// Finding 3: the figures are asked for the service's FQDN (the load aggregates
/// match a FQDN exactly; the short name matched every namespace's `payment`).
#[tokio::test]
async fn figures_are_asked_by_fqdn() {
    let asked: Arc<Mutex<Vec<String>>> = Arc::default();
    let fake = Fake::healthy();
    let server = serve(common::store(), &fake).await;
    let (seen, figures) = (Arc::clone(&asked), fake.options().figures);
    let source = move |service: &str, version: &str, window: Duration| {
        seen.lock().expect("lock").push(service.to_string());
        figures.figures(service, version, window)
    };
    server.plane.canaries().set_options(CanaryOptions { figures: Arc::new(source), ..fake.options() });
    let mut ctl = client(&server).await;
    ctl.start(spec(20, 40)).await.expect("start");
    until_phase(&mut ctl, CanaryPhase::Succeeded).await;
    let asked = asked.lock().expect("lock").clone();
    assert!(!asked.is_empty());
    assert!(asked.iter().all(|s| s == "payment.default.svc.cluster.local"), "{asked:?}");
    server.stop().await;
}

/// Finding 4: a decision whose intent cannot be saved is not applied. The first
/// weight: the analysis ends FAILED, `start` returns the error, the weights stay
/// and a new start is accepted. A later step: it waits, retried until saved.
#[tokio::test]
async fn a_decision_that_cannot_be_saved_is_not_applied() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fake = Fake::healthy();
    fake.set("v2", 0, 100.0, 20.0);
    let server = serve(common::open_store(dir.path()), &fake).await;
    let mut ctl = client(&server).await;
    // canaries.json cannot be replaced: a folder (non-empty) stands in its way.
    let blocker = dir.path().join(CANARY_STATE_FILE);
    let block = || {
        let _ = std::fs::remove_file(&blocker);
        std::fs::create_dir_all(blocker.join("x")).expect("block");
    };
    block();
    let e = ctl.start(spec(10, 50)).await.expect_err("not saved");
    assert!(matches!(&e, ClientError::Rpc(s) if s.code() == tonic::Code::Unavailable), "{e}");
    assert_eq!(server.plane.store().weights("payment"), weights(&[("v1", 95), ("v2", 5)]), "nothing applied");
    let failed = ctl.get("payment").await.expect("status");
    assert_eq!(failed.phase(), CanaryPhase::Failed);
    assert!(failed.reason.contains("could not be saved"), "{}", failed.reason);

    std::fs::remove_dir_all(&blocker).expect("unblock");
    ctl.start(spec(10, 50)).await.expect("a new start");
    until_phase(&mut ctl, CanaryPhase::Progressing).await;
    block();
    fake.set("v2", 100, 100.0, 20.0); // the next interval passes: a step to 20%, not saved
    let waiting = eventually("a save-failed event", || {
        let mut c = ctl.clone();
        async move { c.get("payment").await.ok().filter(|s| s.events.iter().any(|e| e.kind == "save-failed")) }
    })
    .await;
    assert_eq!(waiting.weight, 10);
    assert_eq!(server.plane.store().weights("payment"), weights(&[("v1", 90), ("v2", 10)]), "the step waits");
    std::fs::remove_dir_all(&blocker).expect("unblock");
    let done = until_phase(&mut ctl, CanaryPhase::Succeeded).await;
    assert_eq!(done.weight, 100);
    server.stop().await;
}

/// Finding 5: aborting (without rollback) while the threshold's rollback is
/// recorded and not yet applied keeps it: it is applied, and the analysis ends
/// FAILED with the canary without traffic. (The rollback is held back here by a
/// state folder that cannot be written: a decision is applied only once saved.)
#[tokio::test]
async fn an_abort_does_not_discard_a_recorded_rollback() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fake = Fake::healthy();
    fake.set("v2", 0, 100.0, 20.0);
    let server = serve(common::open_store(dir.path()), &fake).await;
    let mut ctl = client(&server).await;
    ctl.start(pb::CanarySpec { threshold: 1, ..spec(10, 50) }).await.expect("start");
    until_phase(&mut ctl, CanaryPhase::Progressing).await;
    let blocker = dir.path().join(CANARY_STATE_FILE);
    std::fs::remove_file(&blocker).expect("state file");
    std::fs::create_dir_all(blocker.join("x")).expect("block");
    fake.set("v2", 100, 50.0, 20.0); // threshold 1: the next interval decides a rollback
    eventually("the rollback recorded, not saved", || {
        let mut c = ctl.clone();
        async move { c.get("payment").await.ok().filter(|s| s.events.iter().any(|e| e.kind == "save-failed")) }
    })
    .await;
    assert_eq!(server.plane.store().weights("payment"), weights(&[("v1", 90), ("v2", 10)]));
    // The abort stands in memory but cannot be saved either: it says so.
    let e = server.plane.canaries().abort("payment", false).await.expect_err("not saved");
    assert!(e.to_string().contains(CANARY_STATE_FILE), "{e}");
    let status = ctl.get("payment").await.expect("status");
    assert_ne!(status.phase(), CanaryPhase::Aborted, "the rollback was kept: {status:?}");
    assert!(kinds(&status).contains(&"abort-requested"), "{:?}", status.events);
    std::fs::remove_dir_all(&blocker).expect("unblock");
    let failed = until_phase(&mut ctl, CanaryPhase::Failed).await;
    assert_eq!(failed.weight, 0);
    assert!(failed.reason.contains("the rollback already decided is applied first"), "{}", failed.reason);
    assert_eq!(server.plane.store().weights("payment"), weights(&[("v1", 100), ("v2", 0)]));
    server.stop().await;
}

/// Finding 7: `--min-requests 0` and `--promote-weight 0` are refused naming the
/// flag (not silently turned into the defaults), as a promote weight below the max.
#[tokio::test]
async fn zero_and_low_promote_values_are_refused_over_the_api() {
    let server = serve(common::store(), &Fake::healthy()).await;
    let mut ctl = client(&server).await;
    let cases = [
        (pb::CanarySpec { min_requests: 0, ..spec(10, 50) }, "--min-requests"),
        (pb::CanarySpec { promote_weight: 0, ..spec(10, 50) }, "--promote-weight"),
        (pb::CanarySpec { promote_weight: 40, ..spec(10, 50) }, "--promote-weight"),
    ];
    for (spec, flag) in cases {
        let e = ctl.start(spec).await.expect_err("refused");
        let ClientError::Rpc(status) = &e else { panic!("an RPC error: {e}") };
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().starts_with(&format!("{flag}: ")), "{}", status.message());
    }
    server.stop().await;
}
