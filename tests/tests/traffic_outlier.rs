//! Outlier detection through a real sidecar: a pod that always answers 503 is
//! ejected after `consecutive5xxErrors`, gets no traffic while ejected, and comes
//! back (healthy in `/clusters`) once `baseEjectionTime` has passed.
//! No test asserts how long anything took: waits are bounded polls.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serin::demo_app::AppConfig;
use serin_tests::*;

const V1: &str = "outbound|8080|v1|payment.default.svc.cluster.local";

/// (ejected, ejections) of `addr`, read straight from the running snapshot.
fn ejection_state(sidecar: &Sidecar, addr: SocketAddr) -> (bool, u32) {
    let snapshot = sidecar.shared.snapshot.load();
    let cluster = snapshot.clusters.get(V1).expect("v1 cluster");
    let ep = cluster.endpoints.iter().find(|e| e.addr == addr).expect("endpoint");
    (ep.state.is_ejected(), ep.state.ejections.load(Ordering::Relaxed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_endpoint_is_ejected_and_comes_back() {
    let broken = AppConfig { error_rate: 1.0, ..AppConfig::new("payment", "v1") };
    let (apps, pods) = start_pods("payment", vec![("v1", broken), ("v1", AppConfig::new("payment", "v1"))]).await;
    let (bad, good_pod) = (pods[0].addr, apps[1].pod().to_string());
    let policy = "    outlierDetection: {consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 1s, maxEjectionPercent: 100}\n";
    let vs = vs_yaml(
        "payment",
        "payment",
        "  - name: main\n    retries: {attempts: 0}\n    route: [{destination: {host: payment, subset: v1}}]\n",
    );
    let sidecar =
        Sidecar::start(&[registry_yaml("payment", "HTTP", &pods), subsets_yaml("payment", Some(policy)), vs]).await;
    let mut client = Client::connect(sidecar.bound.outbound, "payment").await;

    // Phase 1: traffic until the broken pod has answered 503 twice in a row.
    let mut ejected = false;
    for _ in 0..500 {
        let (status, _, _) = client.try_get("/", &[]).await.expect("request");
        assert!(status == 200 || status == 503, "{status}");
        if ejection_state(&sidecar, bad).0 {
            ejected = true;
            break;
        }
    }
    assert!(ejected, "the broken endpoint was never ejected");
    // `/clusters` shows it (or, on a very slow machine, the 1 s ejection is
    // already over by the time we look).
    let status = sidecar.host_status(V1, bad).await;
    assert!(status["ejected"] == true || !ejection_state(&sidecar, bad).0, "{status}");
    assert_eq!(status["health"], if status["ejected"] == true { "ejected" } else { "healthy" });
    let text = get(sidecar.bound.admin, "admin", "/clusters", &[]).await.expect("clusters").2;
    let text = String::from_utf8_lossy(&text).into_owned();
    assert!(
        text.contains(&format!("{V1}::{bad}::health_flags::/failed_outlier_check")) || !ejection_state(&sidecar, bad).0,
        "{text}"
    );

    // Phase 2: while it is ejected, every request goes to the healthy pod. A
    // request counts only when the same ejection covers it from before it is
    // sent to after its answer.
    let mut covered = 0;
    for _ in 0..50 {
        let before = ejection_state(&sidecar, bad);
        let (status, _, body) = client.try_get("/", &[]).await.expect("request");
        let after = ejection_state(&sidecar, bad);
        if before.0 && after.0 && before.1 == after.1 {
            covered += 1;
            assert_eq!(status, 200);
            assert_eq!(pod_of(&body).as_deref(), Some(good_pod.as_str()));
        }
    }
    assert!(covered > 0, "no request was sent while the endpoint was ejected");

    // Phase 3: without traffic, the ejection ends and /clusters shows it healthy.
    let mut healthy = false;
    for _ in 0..200 {
        let status = sidecar.host_status(V1, bad).await;
        if status["health"] == "healthy" && status["ejected"] == false {
            healthy = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(healthy, "the endpoint never came back");

    // Back in rotation: it gets requests again (and is ejected again, for
    // longer: baseEjectionTime × number of ejections).
    let mut reached = false;
    for _ in 0..200 {
        let (_, _, body) = client.try_get("/", &[]).await.expect("request");
        if pod_of(&body).as_deref() == Some(apps[0].pod()) {
            reached = true;
            break;
        }
    }
    assert!(reached, "the returned endpoint got no request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_ejection_percent_keeps_the_last_endpoint() {
    // Both pods fail; maxEjectionPercent 50 of 2 endpoints lets only one go.
    let broken = || AppConfig { error_rate: 1.0, ..AppConfig::new("payment", "v1") };
    let (_apps, pods) = start_pods("payment", vec![("v1", broken()), ("v1", broken())]).await;
    let policy = "    outlierDetection: {consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 50}\n";
    let vs = vs_yaml(
        "payment",
        "payment",
        "  - name: main\n    retries: {attempts: 0}\n    route: [{destination: {host: payment, subset: v1}}]\n",
    );
    let sidecar =
        Sidecar::start(&[registry_yaml("payment", "HTTP", &pods), subsets_yaml("payment", Some(policy)), vs]).await;
    let mut client = Client::connect(sidecar.bound.outbound, "payment").await;
    for _ in 0..50 {
        let (status, _, _) = client.try_get("/", &[]).await.expect("request");
        assert_eq!(status, 503, "an upstream 503, never 503 UH: one endpoint always stays");
    }
    let ejected = [ejection_state(&sidecar, pods[0].addr).0, ejection_state(&sidecar, pods[1].addr).0];
    assert_eq!(ejected.iter().filter(|e| **e).count(), 1, "{ejected:?}");
    let metrics = sidecar.wait_metric("istio_requests_total", None, &[("response_code", "503")], 50.0).await;
    assert_eq!(metric_sum_with_flag(&metrics, "istio_requests_total", "UH", &[]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_gateway_errors_count_only_502_503_504() {
    let (_apps, pods) =
        start_pods("payment", vec![("v1", AppConfig::new("payment", "v1")), ("v1", AppConfig::new("payment", "v1"))])
            .await;
    let policy = "    outlierDetection: {consecutive5xxErrors: 0, consecutiveGatewayErrors: 3, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 50}\n";
    let vs = vs_yaml(
        "payment",
        "payment",
        "  - name: main\n    retries: {attempts: 0}\n    route: [{destination: {host: payment, subset: v1}}]\n",
    );
    let sidecar =
        Sidecar::start(&[registry_yaml("payment", "HTTP", &pods), subsets_yaml("payment", Some(policy)), vs]).await;
    let mut client = Client::connect(sidecar.bound.outbound, "payment").await;
    // 500s are not gateway errors (and consecutive5xxErrors: 0 disables that rule).
    for _ in 0..40 {
        let (status, _, _) = client.try_get("/status/500", &[]).await.expect("request");
        assert_eq!(status, 500);
    }
    assert!(!ejection_state(&sidecar, pods[0].addr).0 && !ejection_state(&sidecar, pods[1].addr).0);
    // 502s are: one endpoint goes (maxEjectionPercent 50 keeps the other).
    for _ in 0..40 {
        let (status, _, _) = client.try_get("/status/502", &[]).await.expect("request");
        assert_eq!(status, 502);
    }
    let ejected = [ejection_state(&sidecar, pods[0].addr).0, ejection_state(&sidecar, pods[1].addr).0];
    assert_eq!(ejected.iter().filter(|e| **e).count(), 1, "{ejected:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ejection_survives_a_config_reload() {
    let broken = AppConfig { error_rate: 1.0, ..AppConfig::new("payment", "v1") };
    let (_apps, pods) = start_pods("payment", vec![("v1", broken), ("v1", AppConfig::new("payment", "v1"))]).await;
    let policy = "    outlierDetection: {consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 100}\n";
    let vs = |timeout: &str| {
        vs_yaml(
            "payment",
            "payment",
            &format!(
                "  - name: main\n    timeout: {timeout}\n    retries: {{attempts: 0}}\n    route: [{{destination: {{host: payment, subset: v1}}}}]\n"
            ),
        )
    };
    let docs = |t| vec![registry_yaml("payment", "HTTP", &pods), subsets_yaml("payment", Some(policy)), vs(t)];
    let sidecar = Sidecar::start(&docs("10s")).await;
    let mut client = Client::connect(sidecar.bound.outbound, "payment").await;
    for _ in 0..200 {
        let _ = client.try_get("/", &[]).await.expect("request");
        if ejection_state(&sidecar, pods[0].addr).0 {
            break;
        }
    }
    assert!(ejection_state(&sidecar, pods[0].addr).0, "ejected");
    let old = sidecar.version();
    sidecar.rewrite(&docs("20s"));
    sidecar.wait_reload(&old).await;
    assert!(ejection_state(&sidecar, pods[0].addr).0, "still ejected in the new snapshot");
    for _ in 0..20 {
        let (status, _, _) = client.try_get("/", &[]).await.expect("request");
        assert_eq!(status, 200, "the broken pod stays out of rotation");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subset_without_endpoints_answers_503_uh() {
    let (_apps, pods) = start_pods("payment", vec![("v1", AppConfig::new("payment", "v1"))]).await;
    let vs = vs_yaml("payment", "payment", "  - route: [{destination: {host: payment, subset: v2}}]\n");
    let sidecar = Sidecar::start(&[registry_yaml("payment", "HTTP", &pods), subsets_yaml("payment", None), vs]).await;
    let (status, _, body) = get(sidecar.bound.outbound, "payment", "/", &[]).await.expect("request");
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    sidecar.wait_metric("istio_requests_total", None, &[("response_code", "503"), ("response_flags", "UH")], 1.0).await;
}
