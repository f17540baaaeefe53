//! The inbound listener: requests to the pod reach the local app and are
//! recorded with `reporter="destination"` and this workload's labels.

use serin::demo_app::AppConfig;
use serin::upstream::split::SplitMode;
use serin_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_forwards_to_the_app_and_reports_as_destination() {
    let (_apps, pods) = start_pods("payment", vec![("v1", AppConfig::new("payment", "v1"))]).await;
    let sidecar = Sidecar::start_full(&[], SplitMode::Exact, pods[0].addr).await;
    let mut client = Client::connect(sidecar.bound.inbound, "payment.default.svc.cluster.local:8080").await;
    for _ in 0..10 {
        let (status, body) = client.get("/", &[]).await;
        assert_eq!(status, 200);
        assert_eq!(version_of(&body).as_deref(), Some("v1"));
    }
    let metrics = sidecar.scrape().await;
    let n = metric_sum(
        &metrics,
        "istio_requests_total",
        &[("reporter", "destination"), ("destination_workload", "frontend"), ("response_code", "200")],
    );
    assert_eq!(n, 10.0, "metrics:\n{metrics}");
}
