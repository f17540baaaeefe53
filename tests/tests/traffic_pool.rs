//! DestinationRule `connectionPool` through a real sidecar: a full pool with a
//! full pending queue answers 503 `UO`; `maxRequestsPerConnection: 1` opens a
//! connection per request and still serves all; keep-alive reuses one.

use std::time::Duration;

use serin::demo_app::AppConfig;
use serin_tests::*;

const V1: &str = "outbound|8080|v1|payment.default.svc.cluster.local";

fn vs() -> String {
    vs_yaml("payment", "payment", "  - name: main\n    route: [{destination: {host: payment, subset: v1}}]\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_and_pending_queue_overflow_with_503_uo() {
    let (_apps, pods) = start_pods("payment", vec![("v1", AppConfig::new("payment", "v1"))]).await;
    let policy = "    connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}\n";
    let sidecar =
        Sidecar::start(&[registry_yaml("payment", "HTTP", &pods), subsets_yaml("payment", Some(policy)), vs()]).await;
    let outbound = sidecar.bound.outbound;
    // The first request holds the only connection for a while.
    let first = tokio::spawn(async move { get(outbound, "payment", "/delay/4000", &[]).await.map(|r| r.0) });
    let mut in_flight = false;
    for _ in 0..200 {
        if sidecar.host_status(V1, pods[0].addr).await["active_requests"] == 1 {
            in_flight = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(in_flight, "the first request reached the upstream");
    // Five more while it runs: one may wait (the pending queue holds one), the
    // others overflow at once.
    let mut rest = Vec::new();
    for _ in 0..5 {
        rest.push(tokio::spawn(async move { get(outbound, "payment", "/", &[]).await.map(|r| r.0) }));
    }
    let mut statuses = Vec::new();
    for t in rest {
        statuses.push(t.await.expect("task").expect("request").as_u16());
    }
    assert_eq!(first.await.expect("task").expect("request"), 200, "the first request completes");
    let overflowed = statuses.iter().filter(|s| **s == 503).count();
    assert!(statuses.iter().all(|s| *s == 200 || *s == 503), "{statuses:?}");
    assert!(overflowed >= 4, "at most one waits in the queue: {statuses:?}");
    sidecar.wait_metric("istio_requests_total", Some("UO"), &[("response_code", "503")], overflowed as f64).await;
    // Once the pool is free again, requests pass.
    let (status, _, _) = get(outbound, "payment", "/", &[]).await.expect("request");
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_requests_per_connection_1_serves_every_request_on_new_connections() {
    let upstream = RecordingUpstream::start("payment-v1-rec").await;
    let pods = vec![pod_at("payment-v1-0", "v1", upstream.addr())];
    let policy = "    connectionPool: {http: {maxRequestsPerConnection: 1}}\n";
    let sidecar =
        Sidecar::start(&[registry_yaml("payment", "HTTP", &pods), subsets_yaml("payment", Some(policy)), vs()]).await;
    let answers = load(sidecar.bound.outbound, "payment", "/", 2, 40).await;
    assert!(answers.iter().all(|(s, _)| *s == 200));
    assert_eq!(upstream.seen().len(), 40);
    assert_eq!(upstream.connections(), 40, "one upstream connection per request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_reuses_the_upstream_connection() {
    let upstream = RecordingUpstream::start("payment-v1-rec").await;
    let pods = vec![pod_at("payment-v1-0", "v1", upstream.addr())];
    let sidecar = Sidecar::start(&[registry_yaml("payment", "HTTP", &pods), subsets_yaml("payment", None), vs()]).await;
    // One client, one request at a time: one upstream connection does it all.
    let answers = load(sidecar.bound.outbound, "payment", "/", 1, 40).await;
    assert!(answers.iter().all(|(s, _)| *s == 200));
    assert_eq!(upstream.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_1_queues_concurrent_requests_and_serves_them_all() {
    let upstream = RecordingUpstream::start("payment-v1-rec").await;
    let pods = vec![pod_at("payment-v1-0", "v1", upstream.addr())];
    let policy = "    connectionPool: {tcp: {maxConnections: 1}}\n";
    let sidecar =
        Sidecar::start(&[registry_yaml("payment", "HTTP", &pods), subsets_yaml("payment", Some(policy)), vs()]).await;
    let answers = load(sidecar.bound.outbound, "payment", "/", 4, 200).await;
    assert!(answers.iter().all(|(s, _)| *s == 200));
    assert_eq!(upstream.connections(), 1, "never more than the one connection");
}
