//! gRPC over h2c through a real sidecar: framed messages both ways, trailers with
//! `grpc-status`, and Istio's gRPC metric labels.

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Full};
use serin::demo_app::AppConfig;
use serin_tests::*;

/// One uncompressed gRPC message: flag, big-endian length, payload.
fn grpc_frame(payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + payload.len());
    b.extend_from_slice(&[0]);
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    b.freeze()
}

/// Sends one unary call; returns the HTTP status, the headers, the data and the trailers.
async fn unary(world: &World, payload: &[u8]) -> (http::StatusCode, HeaderMap, Bytes, Option<HeaderMap>) {
    let mut sender = h2c_connect(world.outbound()).await;
    let req = Request::post("http://payment/demo.Payment/Charge")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "10S")
        .body(Full::new(grpc_frame(payload)))
        .expect("request");
    let resp = sender.send_request(req).await.expect("gRPC response");
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await.expect("gRPC body");
    let trailers = collected.trailers().cloned();
    (parts.status, parts.headers, collected.to_bytes(), trailers)
}

fn grpc_status_of(headers: &HeaderMap, trailers: Option<&HeaderMap>) -> Option<String> {
    trailers
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| headers.get("grpc-status"))
        .map(|v| v.to_str().expect("ascii").to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_round_trip_with_trailers_on_grpc_http2_and_http_ports() {
    // On an `HTTP` port too: gRPC from an HTTP/2 client stays HTTP/2 upstream.
    for protocol in ["GRPC", "HTTP2", "HTTP"] {
        let world = World::payment_v1(protocol, AppConfig::default(), "").await;
        for payload in [&b"charge 42 EUR"[..], &[7u8; 40_000][..]] {
            let (status, headers, data, trailers) = unary(&world, payload).await;
            assert_eq!(status, 200, "{protocol}");
            assert_eq!(headers.get("content-type").map(|v| v.as_bytes()), Some(&b"application/grpc"[..]));
            assert_eq!(headers.get("x-version").map(|v| v.as_bytes()), Some(&b"v1"[..]));
            let trailers = trailers.unwrap_or_else(|| panic!("{protocol}: no trailers"));
            assert_eq!(trailers.get("grpc-status").map(|v| v.as_bytes()), Some(&b"0"[..]), "{protocol}");
            // The demo upstream echoes the framed message.
            assert_eq!(data, grpc_frame(payload), "{protocol}");
        }
        let text = wait_metric(
            &world.sidecar,
            "istio_requests_total",
            &[("request_protocol", "grpc"), ("grpc_response_status", "0")],
            2.0,
        )
        .await;
        let ok = metric_sum(
            &text,
            "istio_requests_total",
            &[
                ("request_protocol", "grpc"),
                ("grpc_response_status", "0"),
                ("response_code", "200"),
                ("destination_version", "v1"),
                ("response_flags", "-"),
            ],
        );
        assert_eq!(ok, 2.0, "{protocol}:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_upstream_failure_gives_status_14() {
    let cfg = AppConfig { error_rate: 1.0, ..AppConfig::default() };
    let world = World::payment_v1("GRPC", cfg, "").await;
    let (status, headers, _data, trailers) = unary(&world, b"charge").await;
    assert_eq!(status, 200, "gRPC errors travel in grpc-status, not the HTTP status");
    assert_eq!(grpc_status_of(&headers, trailers.as_ref()).as_deref(), Some("14"));
    let text = wait_metric(
        &world.sidecar,
        "istio_requests_total",
        &[("request_protocol", "grpc"), ("grpc_response_status", "14")],
        1.0,
    )
    .await;
    assert_eq!(metric_sum(&text, "istio_requests_total", &[("grpc_response_status", "0")]), 0.0, "{text}");
    assert_eq!(metric_sum(&text, "istio_requests_total", &[("request_protocol", "http")]), 0.0, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_local_reply_is_a_grpc_error() {
    // No endpoint in the routed subset: the proxy answers itself, as gRPC
    // (HTTP 200, grpc-status 14 UNAVAILABLE), like Envoy.
    let (apps, pods) = start_pods("payment", vec![("v1", AppConfig::default())]).await;
    let sidecar = Sidecar::start(&[
        registry_yaml("payment", "GRPC", &pods),
        subsets_yaml("payment", None),
        route_all_yaml("payment", "v2", ""),
    ])
    .await;
    let world = World { apps, pods, sidecar };
    let (status, headers, data, trailers) = unary(&world, b"charge").await;
    assert_eq!(status, 200);
    assert!(data.is_empty());
    assert_eq!(grpc_status_of(&headers, trailers.as_ref()).as_deref(), Some("14"));
    let text = wait_metric(
        &world.sidecar,
        "istio_requests_total",
        &[("request_protocol", "grpc"), ("grpc_response_status", "14"), ("response_flags", "UH")],
        1.0,
    )
    .await;
    assert!(text.contains("istio_requests_total"));
}
