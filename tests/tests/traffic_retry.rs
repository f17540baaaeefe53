//! Retries through a real sidecar: an always-failing pod next to a healthy one
//! in the same subset; `5xx`, `gateway-error`, `retriable-status-codes`; no
//! retries with `attempts: 0`; connect failures on a closed port (Istio's default
//! policy retries them) and 503 `UF` when no endpoint can be reached.

use serin::demo_app::{AppConfig, DemoApp};
use serin_tests::*;

fn retry_vs(retries: &str) -> String {
    vs_yaml(
        "payment",
        "payment",
        &format!("  - name: main\n{retries}    route: [{{destination: {{host: payment, subset: v1}}}}]\n"),
    )
}

/// One pod that always answers 503 and one healthy pod, both in subset v1.
async fn flaky_subset() -> (Vec<DemoApp>, Vec<Pod>) {
    let broken = AppConfig { error_rate: 1.0, ..AppConfig::new("payment", "v1") };
    start_pods("payment", vec![("v1", broken), ("v1", AppConfig::new("payment", "v1"))]).await
}

/// Sends `n` requests on one connection; returns (200s, 503s) and panics on others.
async fn statuses(sidecar: &Sidecar, n: usize) -> (usize, usize) {
    let mut client = Client::connect(sidecar.bound.outbound, "payment").await;
    let (mut ok, mut unavailable) = (0, 0);
    for _ in 0..n {
        let (status, _, body) = client.try_get("/", &[]).await.expect("request");
        match status.as_u16() {
            200 => ok += 1,
            503 => unavailable += 1,
            other => panic!("unexpected {other}: {}", String::from_utf8_lossy(&body)),
        }
    }
    (ok, unavailable)
}

async fn run(retries: &str, n: usize) -> (usize, usize) {
    let (_apps, pods) = flaky_subset().await;
    let sidecar =
        Sidecar::start(&[registry_yaml("payment", "HTTP", &pods), subsets_yaml("payment", None), retry_vs(retries)])
            .await;
    statuses(&sidecar, n).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_on_5xx_turns_a_broken_pods_503_into_success() {
    assert_eq!(run("    retries: {attempts: 3, retryOn: 5xx}\n", 100).await, (100, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_on_gateway_error_covers_503() {
    assert_eq!(run("    retries: {attempts: 2, retryOn: gateway-error}\n", 100).await, (100, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retriable_status_codes_retry_the_listed_code() {
    let retries = "    retries: {attempts: 2, retryOn: \"retriable-status-codes,503\"}\n";
    assert_eq!(run(retries, 100).await, (100, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retriable_status_codes_leave_other_codes_alone() {
    // 502 is listed, the broken pod answers 503: not retried. Each request picks
    // one of the two pods; 100 requests that never pick the broken one would
    // happen once in 2^100 runs.
    let retries = "    retries: {attempts: 2, retryOn: \"retriable-status-codes,502\"}\n";
    let (ok, unavailable) = run(retries, 100).await;
    assert!(ok > 0 && unavailable > 0, "ok {ok}, 503 {unavailable}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_0_lets_the_503_through() {
    let (_apps, pods) = flaky_subset().await;
    let sidecar = Sidecar::start(&[
        registry_yaml("payment", "HTTP", &pods),
        subsets_yaml("payment", None),
        retry_vs("    retries: {attempts: 0, retryOn: 5xx}\n"),
    ])
    .await;
    let (ok, unavailable) = statuses(&sidecar, 100).await;
    assert!(ok > 0 && unavailable > 0, "ok {ok}, 503 {unavailable}");
    // The upstream's own 503 has no response flag.
    let metrics = sidecar
        .wait_metric(
            "istio_requests_total",
            None,
            &[("response_code", "503"), ("response_flags", "-")],
            unavailable as f64,
        )
        .await;
    assert_eq!(
        metric_sum(&metrics, "istio_requests_total", &[("reporter", "source"), ("response_code", "503")]),
        unavailable as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_policy_retries_a_503_never() {
    // Istio's default (no `retries` block) retries connect failures, not 503s.
    let (ok, unavailable) = run("", 100).await;
    assert!(ok > 0 && unavailable > 0, "ok {ok}, 503 {unavailable}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failure_is_retried_on_the_other_endpoint() {
    let (_apps, mut pods) = start_pods("payment", vec![("v1", AppConfig::new("payment", "v1"))]).await;
    pods.push(pod_at("payment-v1-dead", "v1", closed_port()));
    for retries in ["", "    retries: {attempts: 2, retryOn: connect-failure}\n"] {
        let sidecar = Sidecar::start(&[
            registry_yaml("payment", "HTTP", &pods),
            subsets_yaml("payment", None),
            retry_vs(retries),
        ])
        .await;
        assert_eq!(statuses(&sidecar, 50).await, (50, 0), "retries {retries:?}");
        // The dead endpoint was tried (and failed) at least once in 50 picks.
        let dead = sidecar.host_status("outbound|8080|v1|payment.default.svc.cluster.local", pods[1].addr).await;
        assert!(dead["total_requests"].as_u64().unwrap_or(0) > 0, "{dead}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_dead_endpoint_gives_503_uf() {
    let pods = vec![pod_at("payment-v1-dead", "v1", closed_port())];
    let sidecar =
        Sidecar::start(&[registry_yaml("payment", "HTTP", &pods), subsets_yaml("payment", None), retry_vs("")]).await;
    let mut client = Client::connect(sidecar.bound.outbound, "payment").await;
    for _ in 0..5 {
        let (status, _, _) = client.try_get("/", &[]).await.expect("request");
        assert_eq!(status, 503);
    }
    let metrics = sidecar.wait_metric("istio_requests_total", Some("UF"), &[("response_code", "503")], 5.0).await;
    // The default policy retried (twice) before giving up: URX too.
    assert_eq!(metric_sum_with_flag(&metrics, "istio_requests_total", "URX", &[("response_code", "503")]), 5.0);

    // Without retries: UF alone.
    let old = sidecar.version();
    sidecar.rewrite(&[
        registry_yaml("payment", "HTTP", &pods),
        subsets_yaml("payment", None),
        retry_vs("    retries: {attempts: 0}\n"),
    ]);
    sidecar.wait_reload(&old).await;
    let (status, _, _) = client.try_get("/", &[]).await.expect("request");
    assert_eq!(status, 503);
    sidecar.wait_metric("istio_requests_total", None, &[("response_code", "503"), ("response_flags", "UF")], 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_request_carries_its_body_again() {
    let (_apps, pods) = flaky_subset().await;
    let sidecar = Sidecar::start(&[
        registry_yaml("payment", "HTTP", &pods),
        subsets_yaml("payment", None),
        retry_vs("    retries: {attempts: 3, retryOn: 5xx}\n"),
    ])
    .await;
    let mut client = Client::connect(sidecar.bound.outbound, "payment").await;
    for i in 0..30 {
        let payload = format!("payment #{i} {}", "x".repeat(i * 100));
        let (status, _, body) = client
            .send("POST", "/echo", &[("content-type", "text/plain")], payload.clone().into())
            .await
            .expect("request");
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let echo: serde_json::Value = serde_json::from_slice(&body).expect("echo JSON");
        assert_eq!(echo["body"], payload.as_str());
        assert_eq!(echo["method"], "POST");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_left_after_the_last_retry_is_passed_on_flagged_urx() {
    // Every pod fails: the client gets the upstream's 503, and (like Envoy) the
    // request is flagged URX since it would have been retried again.
    let broken = || AppConfig { error_rate: 1.0, ..AppConfig::new("payment", "v1") };
    let (_apps, pods) = start_pods("payment", vec![("v1", broken()), ("v1", broken())]).await;
    let sidecar = Sidecar::start(&[
        registry_yaml("payment", "HTTP", &pods),
        subsets_yaml("payment", None),
        retry_vs("    retries: {attempts: 2, retryOn: 5xx}\n"),
    ])
    .await;
    let mut client = Client::connect(sidecar.bound.outbound, "payment").await;
    for _ in 0..5 {
        let (status, _, body) = client.try_get("/", &[]).await.expect("request");
        assert_eq!(status, 503);
        assert!(String::from_utf8_lossy(&body).contains("injected fault"), "the upstream's own answer");
    }
    sidecar
        .wait_metric("istio_requests_total", None, &[("response_code", "503"), ("response_flags", "URX")], 5.0)
        .await;

    // Without retries there is no retry limit to exceed: no flag.
    let old = sidecar.version();
    sidecar.rewrite(&[
        registry_yaml("payment", "HTTP", &pods),
        subsets_yaml("payment", None),
        retry_vs("    retries: {attempts: 0, retryOn: 5xx}\n"),
    ]);
    sidecar.wait_reload(&old).await;
    let (status, _, _) = client.try_get("/", &[]).await.expect("request");
    assert_eq!(status, 503);
    sidecar.wait_metric("istio_requests_total", None, &[("response_code", "503"), ("response_flags", "-")], 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_skip_every_endpoint_already_tried() {
    // Two broken pods and one healthy one, two retries: Istio's retry host
    // predicate skips every previously tried host, so the third try always
    // lands on the healthy pod.
    let broken = || AppConfig { error_rate: 1.0, ..AppConfig::new("payment", "v1") };
    let (_apps, pods) =
        start_pods("payment", vec![("v1", broken()), ("v1", broken()), ("v1", AppConfig::new("payment", "v1"))]).await;
    for lb in ["LEAST_REQUEST", "ROUND_ROBIN", "RANDOM"] {
        let policy = format!("    loadBalancer: {{simple: {lb}}}\n");
        let sidecar = Sidecar::start(&[
            registry_yaml("payment", "HTTP", &pods),
            subsets_yaml("payment", Some(&policy)),
            retry_vs("    retries: {attempts: 2, retryOn: 5xx}\n"),
        ])
        .await;
        // With only the last endpoint skipped, one request in six failed; 40
        // requests per policy all passing by luck: (5/6)^120 ≈ 3e-10.
        assert_eq!(statuses(&sidecar, 40).await, (40, 0), "{lb}");
    }
}
