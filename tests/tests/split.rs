//! The weighted split through a real sidecar: exact shares, header override,
//! relative weights.

use serin::demo_app::AppConfig;
use serin_tests::*;

fn canary_vs(v1: u32, v2: u32) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: payment, namespace: default}}\nspec:\n  hosts: [payment]\n  http:\n  - name: canary-override\n    match: [{{headers: {{x-canary: {{exact: always}}}}}}]\n    route: [{{destination: {{host: payment, subset: v2}}}}]\n  - name: split\n    route:\n    - {{destination: {{host: payment, subset: v1}}, weight: {v1}}}\n    - {{destination: {{host: payment, subset: v2}}, weight: {v2}}}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_95_5_is_exact_and_header_pins_v2() {
    let (_apps, pods) = start_pods(
        "payment",
        vec![
            ("v1", AppConfig::new("payment", "v1")),
            ("v1", AppConfig::new("payment", "v1")),
            ("v2", AppConfig::new("payment", "v2")),
        ],
    )
    .await;
    let sidecar =
        Sidecar::start(&[registry_yaml("payment", "HTTP", &pods), subsets_yaml("payment", None), canary_vs(95, 5)])
            .await;
    let mut client = Client::connect(sidecar.bound.outbound, "payment").await;
    let mut v2 = 0;
    let n = 2_000;
    for _ in 0..n {
        let (status, body) = client.get("/", &[]).await;
        assert_eq!(status, 200);
        if version_of(&body).as_deref() == Some("v2") {
            v2 += 1;
        }
    }
    // One client, one sidecar: exactly 5% of any whole number of 20-request periods.
    assert_eq!(v2, n / 20, "v2 answered {v2} of {n}");
    for _ in 0..50 {
        let (status, body) = client.get("/", &[("x-canary", "always")]).await;
        assert_eq!(status, 200);
        assert_eq!(version_of(&body).as_deref(), Some("v2"));
    }
    let metrics = sidecar.scrape().await;
    let v2_count =
        metric_sum(&metrics, "istio_requests_total", &[("destination_version", "v2"), ("reporter", "source")]);
    assert_eq!(v2_count, (n / 20 + 50) as f64, "metrics:\n{metrics}");
}
