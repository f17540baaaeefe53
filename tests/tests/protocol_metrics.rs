//! The sidecar's Prometheus text after real traffic: `promtool check metrics`
//! accepts it, and the canary labels are there.

use std::io::Write;
use std::process::{Command, Stdio};

use serin::demo_app::AppConfig;
use serin_tests::*;

fn split_vs() -> String {
    "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: payment, namespace: default}\nspec:\n  hosts: [payment]\n  http:\n  - name: split\n    route:\n    - {destination: {host: payment, subset: v1}, weight: 50}\n    - {destination: {host: payment, subset: v2}, weight: 50}\n".to_string()
}

/// Runs `promtool check metrics` on `text`; returns the exit code and every finding.
fn promtool(text: &str) -> (Option<i32>, Vec<String>) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (Debian package prometheus)");
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("write to promtool");
    let out = child.wait_with_output().expect("promtool output");
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code(), report.lines().filter(|l| !l.trim().is_empty()).map(str::to_string).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_the_scrape_after_traffic() {
    let (_apps, pods) = start_pods(
        "payment",
        vec![("v1", AppConfig::default()), ("v2", AppConfig { error_rate: 0.0, ..AppConfig::default() })],
    )
    .await;
    let sidecar =
        Sidecar::start(&[registry_yaml("payment", "HTTP", &pods), subsets_yaml("payment", None), split_vs()]).await;
    let mut client = Client::connect(sidecar.bound.outbound, "payment").await;
    for _ in 0..20 {
        let (status, _) = client.get("/", &[]).await;
        assert_eq!(status, 200);
    }
    for _ in 0..4 {
        let (status, _) = client.get("/status/503", &[]).await;
        assert_eq!(status, 503);
    }
    let (status, _, _) = get(sidecar.bound.outbound, "nosuch", "/", &[]).await.expect("GET");
    assert_eq!(status, 404);
    let raw = raw_exchange(sidecar.bound.outbound, b"GARBAGE\r\n\r\n").await;
    assert!(raw.starts_with("HTTP/1.1 400"));
    // gRPC, for the grpc_response_status label.
    let mut h2 = h2c_connect(sidecar.bound.outbound).await;
    let req = http::Request::post("http://payment/demo.Payment/Charge")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(&[0, 0, 0, 0, 1, 42])))
        .expect("request");
    let resp = h2.send_request(req).await.expect("gRPC response");
    use http_body_util::BodyExt;
    let trailers = resp.into_body().collect().await.expect("body").trailers().cloned().expect("trailers");
    assert_eq!(trailers.get("grpc-status").map(|v| v.as_bytes()), Some(&b"0"[..]));

    let text = wait_metric(&sidecar, "istio_requests_total", &[], 27.0).await;
    let (code, findings) = promtool(&text);
    // Exit 3 is "parses, with lint findings"; the one allowed finding is the unit of
    // Istio's fixed metric name.
    let allowed = "istio_request_duration_milliseconds use base unit \"seconds\" instead of \"milliseconds\"";
    let unexpected: Vec<&String> = findings.iter().filter(|l| l.as_str() != allowed).collect();
    assert!(matches!(code, Some(0 | 3)) && unexpected.is_empty(), "promtool {code:?}: {unexpected:?}\n{text}");

    assert_eq!(label_values(&text, "istio_requests_total", "destination_version"), ["unknown", "v1", "v2"], "{text}");
    assert_eq!(label_values(&text, "istio_requests_total", "destination_app"), ["payment", "unknown"], "{text}");
    assert_eq!(label_values(&text, "istio_requests_total", "request_protocol"), ["grpc", "http"], "{text}");
    assert_eq!(label_values(&text, "istio_requests_total", "response_flags"), ["-", "DPE", "NR"], "{text}");
    let v1 =
        metric_sum(&text, "istio_requests_total", &[("destination_version", "v1"), ("destination_app", "payment")]);
    let v2 =
        metric_sum(&text, "istio_requests_total", &[("destination_version", "v2"), ("destination_app", "payment")]);
    assert_eq!(v1 + v2, 25.0, "{text}");
    assert!(v1 > 0.0 && v2 > 0.0, "{text}");
    assert_eq!(metric_sum(&text, "istio_requests_total", &[("response_code", "503")]), 4.0);
    // Every histogram of the HTTP metrics has a series per label set seen.
    for name in ["istio_request_duration_milliseconds_count", "istio_request_bytes_count", "istio_response_bytes_count"]
    {
        assert_eq!(metric_sum(&text, name, &[]), 27.0, "{name}\n{text}");
    }
    // The source side is the sidecar's own workload.
    assert_eq!(label_values(&text, "istio_requests_total", "source_workload"), ["frontend"]);
    assert_eq!(label_values(&text, "istio_requests_total", "reporter"), ["source"]);
}
