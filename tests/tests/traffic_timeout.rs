//! Timeouts through a real sidecar: the route timeout answers 504 `UT`; a
//! per-try timeout moves the request to a fast endpoint; a timed-out try gives
//! its connection slot back (`maxConnections: 1` keeps serving).
//! No test asserts how long anything took.

use std::time::Duration;

use serin::demo_app::AppConfig;
use serin_tests::*;

const V1: &str = "outbound|8080|v1|payment.default.svc.cluster.local";

fn vs(extra: &str) -> String {
    vs_yaml(
        "payment",
        "payment",
        &format!("  - name: main\n{extra}    route: [{{destination: {{host: payment, subset: v1}}}}]\n"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_timeout_answers_504_ut() {
    let slow = AppConfig { latency: Duration::from_secs(2), ..AppConfig::new("payment", "v1") };
    let (_apps, pods) = start_pods("payment", vec![("v1", slow)]).await;
    let sidecar = Sidecar::start(&[
        registry_yaml("payment", "HTTP", &pods),
        subsets_yaml("payment", None),
        vs("    timeout: 200ms\n"),
    ])
    .await;
    let mut client = Client::connect(sidecar.bound.outbound, "payment").await;
    for _ in 0..3 {
        let (status, _, body) = client.try_get("/", &[]).await.expect("request");
        assert_eq!(status, 504, "{}", String::from_utf8_lossy(&body));
        assert_eq!(&body[..], b"upstream request timeout");
    }
    sidecar.wait_metric("istio_requests_total", None, &[("response_code", "504"), ("response_flags", "UT")], 3.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_timeout_longer_than_the_answer_changes_nothing() {
    let (_apps, pods) = start_pods("payment", vec![("v1", AppConfig::new("payment", "v1"))]).await;
    let sidecar = Sidecar::start(&[
        registry_yaml("payment", "HTTP", &pods),
        subsets_yaml("payment", None),
        vs("    timeout: 30s\n"),
    ])
    .await;
    let mut client = Client::connect(sidecar.bound.outbound, "payment").await;
    let (status, _, _) = client.try_get("/delay/50", &[]).await.expect("request");
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_try_timeout_moves_the_request_to_the_fast_endpoint() {
    let slow = AppConfig { latency: Duration::from_secs(5), ..AppConfig::new("payment", "v1") };
    let (_apps, pods) = start_pods("payment", vec![("v1", slow), ("v1", AppConfig::new("payment", "v1"))]).await;
    let fast_pod = _apps[1].pod().to_string();
    // Envoy retries a per-try timeout on 5xx, gateway-error and reset.
    for retry_on in ["gateway-error", "5xx", "reset"] {
        let sidecar = Sidecar::start(&[
            registry_yaml("payment", "HTTP", &pods),
            subsets_yaml("payment", None),
            vs(&format!("    retries: {{attempts: 2, perTryTimeout: 200ms, retryOn: {retry_on}}}\n")),
        ])
        .await;
        let mut client = Client::connect(sidecar.bound.outbound, "payment").await;
        for _ in 0..20 {
            let (status, _, body) = client.try_get("/", &[]).await.expect("request");
            assert_eq!(status, 200, "retryOn {retry_on}: {}", String::from_utf8_lossy(&body));
            assert_eq!(pod_of(&body).as_deref(), Some(fast_pod.as_str()));
        }
        // The slow endpoint was tried (LEAST_REQUEST picks either; never picking
        // it in 20 requests happens once in a million runs).
        let slow = sidecar.host_status(V1, pods[0].addr).await;
        assert!(slow["total_requests"].as_u64().unwrap_or(0) > 0, "{slow}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_try_frees_its_connection_slot() {
    // maxConnections 1 per endpoint: a try cut by the per-try timeout must give
    // its slot back, or the next pick of the slow endpoint waits for a slot
    // (connectTimeout) and fails with 503 UO.
    let slow = AppConfig { latency: Duration::from_secs(5), ..AppConfig::new("payment", "v1") };
    let (_apps, pods) = start_pods("payment", vec![("v1", slow), ("v1", AppConfig::new("payment", "v1"))]).await;
    let pool = "    connectionPool: {tcp: {maxConnections: 1, connectTimeout: 1s}}\n";
    let sidecar = Sidecar::start(&[
        registry_yaml("payment", "HTTP", &pods),
        subsets_yaml("payment", Some(pool)),
        vs("    retries: {attempts: 2, perTryTimeout: 200ms, retryOn: gateway-error}\n"),
    ])
    .await;
    let mut client = Client::connect(sidecar.bound.outbound, "payment").await;
    for i in 0..20 {
        let (status, _, body) = client.try_get("/", &[]).await.expect("request");
        assert_eq!(status, 200, "request {i}: {}", String::from_utf8_lossy(&body));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_timeout_frees_the_connection_slot() {
    let (_apps, pods) = start_pods("payment", vec![("v1", AppConfig::new("payment", "v1"))]).await;
    let pool = "    connectionPool: {tcp: {maxConnections: 1, connectTimeout: 1s}}\n";
    let sidecar = Sidecar::start(&[
        registry_yaml("payment", "HTTP", &pods),
        subsets_yaml("payment", Some(pool)),
        vs("    timeout: 300ms\n"),
    ])
    .await;
    let mut client = Client::connect(sidecar.bound.outbound, "payment").await;
    for i in 0..3 {
        let (status, _, _) = client.try_get("/delay/3000", &[]).await.expect("request");
        assert_eq!(status, 504, "slow request {i}");
        let (status, _, body) = client.try_get("/", &[]).await.expect("request");
        assert_eq!(status, 200, "fast request after timeout {i}: {}", String::from_utf8_lossy(&body));
    }
    // Once everything is over, no connection is counted as open beyond the one
    // the pool may keep idle.
    let mut open = u64::MAX;
    for _ in 0..100 {
        open = sidecar.host_status(V1, pods[0].addr).await["connections_open"].as_u64().unwrap_or(u64::MAX);
        if open <= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(open <= 1, "connections_open {open}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_try_timeouts_on_every_endpoint_answer_504_ut_urx() {
    let slow = || AppConfig { latency: Duration::from_secs(5), ..AppConfig::new("payment", "v1") };
    let (_apps, pods) = start_pods("payment", vec![("v1", slow()), ("v1", slow())]).await;
    let sidecar = Sidecar::start(&[
        registry_yaml("payment", "HTTP", &pods),
        subsets_yaml("payment", None),
        vs("    retries: {attempts: 1, perTryTimeout: 100ms, retryOn: 5xx}\n"),
    ])
    .await;
    let mut client = Client::connect(sidecar.bound.outbound, "payment").await;
    let (status, _, _) = client.try_get("/", &[]).await.expect("request");
    assert_eq!(status, 504);
    sidecar
        .wait_metric("istio_requests_total", None, &[("response_code", "504"), ("response_flags", "UT,URX")], 1.0)
        .await;
}
