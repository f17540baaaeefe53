//! Fault injection through a real sidecar: aborts (all, or a share bounded
//! statistically) with flag `FI`, and delays that still succeed with flag `DI`.
//! No test asserts how long anything took.

use serin::demo_app::AppConfig;
use serin_tests::*;

async fn world(fault: &str) -> (Vec<serin::demo_app::DemoApp>, Sidecar) {
    let (apps, pods) = start_pods("payment", vec![("v1", AppConfig::new("payment", "v1"))]).await;
    let vs = vs_yaml(
        "payment",
        "payment",
        &format!("  - name: main\n    fault:\n{fault}    route: [{{destination: {{host: payment, subset: v1}}}}]\n"),
    );
    let sidecar = Sidecar::start(&[registry_yaml("payment", "HTTP", &pods), subsets_yaml("payment", None), vs]).await;
    (apps, sidecar)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_at_100_percent_answers_418_fi_to_every_request() {
    let (_apps, sidecar) = world("      abort: {httpStatus: 418, percentage: {value: 100}}\n").await;
    let answers = load(sidecar.bound.outbound, "payment", "/", 2, 100).await;
    assert!(answers.iter().all(|(s, _)| *s == 418), "every request is aborted");
    let metrics = sidecar.wait_metric("istio_requests_total", Some("FI"), &[("response_code", "418")], 100.0).await;
    // Aborted before any upstream is picked: no upstream saw a request.
    assert_eq!(metric_sum(&metrics, "istio_requests_total", &[("response_code", "200")]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_at_50_percent_aborts_about_half() {
    let (_apps, sidecar) = world("      abort: {httpStatus: 503, percentage: {value: 50}}\n").await;
    let n = 1_000usize;
    let answers = load(sidecar.bound.outbound, "payment", "/", 4, n).await;
    let aborted = answers.iter().filter(|(s, _)| *s == 503).count();
    let ok = answers.iter().filter(|(s, _)| *s == 200).count();
    assert_eq!(aborted + ok, n, "only 200 and the injected 503");
    // Binomial(1000, 0.5): sigma ≈ 15.8; 6 sigma ≈ 95.
    let sigma = (n as f64 * 0.25).sqrt();
    assert!((aborted as f64 - 500.0).abs() <= 6.0 * sigma, "aborted {aborted} of {n}");
    let metrics = sidecar.wait_metric("istio_requests_total", Some("FI"), &[], aborted as f64).await;
    assert_eq!(metric_sum_with_flag(&metrics, "istio_requests_total", "FI", &[]), aborted as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_at_100_percent_still_succeeds_with_di() {
    let (_apps, sidecar) = world("      delay: {fixedDelay: 300ms, percentage: {value: 100}}\n").await;
    let mut client = Client::connect(sidecar.bound.outbound, "payment").await;
    for _ in 0..3 {
        let (status, _, body) = client.try_get("/", &[]).await.expect("request");
        assert_eq!(status, 200);
        assert_eq!(version_of(&body).as_deref(), Some("v1"));
    }
    sidecar.wait_metric("istio_requests_total", None, &[("response_code", "200"), ("response_flags", "DI")], 3.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_and_abort_together_flag_both() {
    let (_apps, sidecar) = world(
        "      delay: {fixedDelay: 50ms, percentage: {value: 100}}\n      abort: {httpStatus: 500, percentage: {value: 100}}\n",
    )
    .await;
    let mut client = Client::connect(sidecar.bound.outbound, "payment").await;
    let (status, _, _) = client.try_get("/", &[]).await.expect("request");
    assert_eq!(status, 500);
    let metrics = sidecar.wait_metric("istio_requests_total", Some("FI"), &[("response_code", "500")], 1.0).await;
    assert_eq!(metric_sum_with_flag(&metrics, "istio_requests_total", "DI", &[("response_code", "500")]), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_without_percentage_injects_nothing() {
    // Istio: an absent percentage means no request gets the fault.
    let (_apps, sidecar) = world("      abort: {httpStatus: 418}\n").await;
    let answers = load(sidecar.bound.outbound, "payment", "/", 1, 50).await;
    assert!(answers.iter().all(|(s, _)| *s == 200));
}
