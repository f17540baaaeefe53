//! Weighted split through a real sidecar: exact shares under many concurrent
//! clients, Envoy-like random draws within a binomial bound, relative weights,
//! a single destination, and 0-weight destinations dropped.

use serin::demo_app::AppConfig;
use serin::upstream::split::SplitMode;
use serin_tests::*;

fn split_vs(v1: i64, v2: i64) -> String {
    vs_yaml(
        "payment",
        "payment",
        &format!(
            "  - name: split\n    route:\n    - {{destination: {{host: payment, subset: v1}}, weight: {v1}}}\n    - {{destination: {{host: payment, subset: v2}}, weight: {v2}}}\n"
        ),
    )
}

async fn canary_world(vs: String, mode: SplitMode) -> (Vec<serin::demo_app::DemoApp>, Vec<Pod>, Sidecar) {
    let (apps, pods) = start_pods(
        "payment",
        vec![
            ("v1", AppConfig::new("payment", "v1")),
            ("v1", AppConfig::new("payment", "v1")),
            ("v2", AppConfig::new("payment", "v2")),
        ],
    )
    .await;
    let sidecar =
        Sidecar::start_with(&[registry_yaml("payment", "HTTP", &pods), subsets_yaml("payment", None), vs], mode).await;
    (apps, pods, sidecar)
}

/// Counts answers by version; every answer must be a 200.
fn count_versions(answers: &[(http::StatusCode, bytes::Bytes)]) -> (usize, usize) {
    let (mut v1, mut v2) = (0, 0);
    for (status, body) in answers {
        assert_eq!(*status, 200, "body {}", String::from_utf8_lossy(body));
        match version_of(body).as_deref() {
            Some("v1") => v1 += 1,
            Some("v2") => v2 += 1,
            other => panic!("unexpected version {other:?}"),
        }
    }
    (v1, v2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_95_5_split_holds_under_8_concurrent_clients() {
    let (_apps, _pods, sidecar) = canary_world(split_vs(95, 5), SplitMode::Exact).await;
    let n = 20_000;
    let answers = load(sidecar.bound.outbound, "payment", "/", 8, n).await;
    let (v1, v2) = count_versions(&answers);
    assert_eq!(v1 + v2, n);
    // One atomic counter per route: the share is exact whatever the interleaving
    // of the clients; the bound asked for is 0.05 percentage points.
    let share = v2 as f64 * 100.0 / n as f64;
    assert!((share - 5.0).abs() <= 0.05, "v2 share {share}% ({v2} of {n})");
    assert_eq!(v2, n / 20, "20,000 requests are 1,000 whole periods of 20");
    let metrics = sidecar
        .wait_metric("istio_requests_total", None, &[("reporter", "source"), ("response_code", "200")], n as f64)
        .await;
    let v2_metric = metric_sum(&metrics, "istio_requests_total", &[("destination_version", "v2")]);
    assert_eq!(v2_metric, v2 as f64, "metrics agree with what the clients saw");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_split_is_within_six_sigma_of_5_percent() {
    let (_apps, _pods, sidecar) = canary_world(split_vs(95, 5), SplitMode::Random).await;
    let n = 20_000usize;
    let answers = load(sidecar.bound.outbound, "payment", "/", 8, n).await;
    let (_, v2) = count_versions(&answers);
    // Binomial(n, 0.05): sigma = sqrt(n p (1-p)) ≈ 30.8; 6 sigma ≈ 185
    // (a false failure about once in 500 million runs).
    let sigma = (n as f64 * 0.05 * 0.95).sqrt();
    let expected = n as f64 * 0.05;
    assert!((v2 as f64 - expected).abs() <= 6.0 * sigma, "v2 got {v2} of {n}, expected {expected} ± {}", 6.0 * sigma);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relative_weights_1_and_999_give_a_tenth_of_a_percent() {
    let (_apps, _pods, sidecar) = canary_world(split_vs(999, 1), SplitMode::Exact).await;
    let n = 10_000;
    let answers = load(sidecar.bound.outbound, "payment", "/", 4, n).await;
    let (v1, v2) = count_versions(&answers);
    assert_eq!((v1, v2), (9_990, 10), "weights 999/1 are 99.9% / 0.1%");
    let dump = sidecar.admin_json("/config_dump").await;
    let vh = dump["virtual_hosts"].as_array().expect("virtual hosts").iter().find(|v| v["name"] == "default/payment");
    let dests = &vh.expect("payment virtual host")["routes"][0]["action"]["route"];
    assert_eq!(dests[1]["percent"], 0.1, "{dests}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_destination_takes_all_whatever_its_weight() {
    let vs =
        vs_yaml("payment", "payment", "  - route:\n    - {destination: {host: payment, subset: v2}, weight: 30}\n");
    let (_apps, _pods, sidecar) = canary_world(vs, SplitMode::Exact).await;
    let answers = load(sidecar.bound.outbound, "payment", "/", 2, 200).await;
    assert_eq!(count_versions(&answers), (0, 200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weight_0_drops_the_destination() {
    let (_apps, pods, sidecar) = canary_world(split_vs(0, 100), SplitMode::Exact).await;
    let answers = load(sidecar.bound.outbound, "payment", "/", 2, 200).await;
    assert_eq!(count_versions(&answers), (0, 200));
    let dump = sidecar.admin_json("/config_dump").await;
    let vh = dump["virtual_hosts"].as_array().expect("virtual hosts").iter().find(|v| v["name"] == "default/payment");
    let dests = vh.expect("payment virtual host")["routes"][0]["action"]["route"].as_array().expect("route").clone();
    assert_eq!(dests.len(), 1, "the 0-weight destination is not compiled: {dests:?}");
    assert_eq!(dests[0]["subset"], "v2");

    // Rollback: v2 to 0 sends everything to v1.
    let old = sidecar.version();
    sidecar.rewrite(&[registry_yaml("payment", "HTTP", &pods), subsets_yaml("payment", None), split_vs(100, 0)]);
    sidecar.wait_reload(&old).await;
    let answers = load(sidecar.bound.outbound, "payment", "/", 2, 200).await;
    assert_eq!(count_versions(&answers), (200, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_zero_weights_are_rejected_and_the_old_split_keeps_serving() {
    let (apps, pods) =
        start_pods("payment", vec![("v1", AppConfig::new("payment", "v1")), ("v2", AppConfig::new("payment", "v2"))])
            .await;
    let registry = registry_yaml("payment", "HTTP", &pods);
    let sidecar = Sidecar::start(&[registry.clone(), subsets_yaml("payment", None), split_vs(50, 50)]).await;
    let version = sidecar.version();
    sidecar.rewrite(&[registry.clone(), subsets_yaml("payment", None), split_vs(0, 0)]);
    let error = sidecar.wait_rejected("spec.http[0].route").await;
    assert!(error.contains("total destination weight is 0"), "{error}");
    assert_eq!(sidecar.version(), version, "the last good config keeps serving");
    let answers = load(sidecar.bound.outbound, "payment", "/", 1, 20).await;
    assert_eq!(count_versions(&answers), (10, 10));
    drop(apps);
}
