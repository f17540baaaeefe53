//! gRPC and WebSocket across the two-sidecar mTLS chain: app → frontend sidecar →
//! mTLS → payment sidecar → app. gRPC (h2c from the app) rides HTTP/2 between the
//! sidecars with its trailers; a WebSocket upgrade goes as HTTP/1.1 over mTLS.

mod mtls_common;

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use http::Request;
use http_body_util::{BodyExt, Full};
use mtls_common::*;
use serin_tests::*;
use tokio_tungstenite::tungstenite::Message;

/// One uncompressed gRPC message: flag, big-endian length, payload.
fn grpc_frame(payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + payload.len());
    b.extend_from_slice(&[0]);
    b.extend_from_slice(&u32::try_from(payload.len()).expect("small payload").to_be_bytes());
    b.extend_from_slice(payload);
    b.freeze()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_through_the_mtls_chain_keeps_its_trailers() {
    let m = mesh(&[STRICT.to_string()], &[]).await;
    // One h2c connection from the app, several calls on it.
    let mut sender = h2c_connect(m.frontend.bound.outbound).await;
    let payloads = [&b"charge 42 EUR"[..], &[7u8; 40_000][..], &b""[..]];
    for payload in payloads {
        let req = Request::post("http://payment/demo.Payment/Charge")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("grpc-timeout", "10S")
            .body(Full::new(grpc_frame(payload)))
            .expect("request");
        sender.ready().await.expect("h2c connection ready");
        let resp = sender.send_request(req).await.expect("gRPC response");
        let (parts, body) = resp.into_parts();
        assert_eq!(parts.status, 200);
        assert_eq!(parts.headers.get("content-type").map(|v| v.as_bytes()), Some(&b"application/grpc"[..]));
        assert_eq!(parts.headers.get("x-version").map(|v| v.as_bytes()), Some(&b"v1"[..]));
        let collected = body.collect().await.expect("gRPC body");
        let trailers = collected.trailers().cloned().expect("trailers");
        assert_eq!(trailers.get("grpc-status").map(|v| v.as_bytes()), Some(&b"0"[..]), "{trailers:?}");
        // The demo app echoes the framed message.
        assert_eq!(collected.to_bytes(), grpc_frame(payload));
    }

    let labels = [
        ("reporter", "destination"),
        ("request_protocol", "grpc"),
        ("grpc_response_status", "0"),
        ("connection_security_policy", "mutual_tls"),
        ("source_principal", "spiffe://cluster.local/ns/default/sa/frontend"),
        ("response_code", "200"),
    ];
    let text = wait_metric(&m.payment.sidecar, "istio_requests_total", &labels, 3.0).await;
    assert_eq!(metric_sum(&text, "istio_requests_total", &labels), 3.0, "{text}");
    assert_eq!(metric_sum(&text, "istio_requests_total", &[("request_protocol", "http")]), 0.0, "{text}");
    let text = wait_metric(
        &m.frontend,
        "istio_requests_total",
        &[("reporter", "source"), ("request_protocol", "grpc"), ("grpc_response_status", "0")],
        3.0,
    )
    .await;
    assert_eq!(metric_sum(&text, "istio_requests_total", &[("response_code", "503")]), 0.0, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_through_the_mtls_chain() {
    let m = mesh(&[STRICT.to_string()], &[]).await;
    // Two WebSockets at once, each on its own upstream mTLS connection.
    let mut sockets = Vec::new();
    for _ in 0..2 {
        let stream = tokio::net::TcpStream::connect(m.frontend.bound.outbound).await.expect("connect");
        let (ws, resp) = tokio_tungstenite::client_async("ws://payment/ws", stream).await.expect("WebSocket handshake");
        assert_eq!(resp.status(), 101);
        assert_eq!(resp.headers().get("x-version").map(|v| v.as_bytes()), Some(&b"v1"[..]));
        sockets.push(ws);
    }
    for round in 0..5 {
        for (i, ws) in sockets.iter_mut().enumerate() {
            ws.send(Message::text(format!("{i}:{round}"))).await.expect("send");
        }
        for (i, ws) in sockets.iter_mut().enumerate() {
            assert_eq!(next_message(ws).await, Message::text(format!("{i}:{round}")));
        }
    }
    let ws = &mut sockets[0];
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    ws.send(Message::binary(big.clone())).await.expect("send binary");
    assert_eq!(next_message(ws).await, Message::binary(big));
    for mut ws in sockets {
        ws.close(None).await.expect("close");
        // The close handshake completes: the echo answers the close and the stream ends.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while let Ok(Some(Ok(msg))) = tokio::time::timeout_at(deadline, ws.next()).await {
            assert!(matches!(msg, Message::Close(_) | Message::Ping(_) | Message::Pong(_)), "{msg:?}");
        }
    }

    let labels = [
        ("reporter", "destination"),
        ("response_code", "101"),
        ("connection_security_policy", "mutual_tls"),
        ("source_principal", "spiffe://cluster.local/ns/default/sa/frontend"),
    ];
    let text = wait_metric(&m.payment.sidecar, "istio_requests_total", &labels, 2.0).await;
    assert_eq!(metric_sum(&text, "istio_requests_total", &labels), 2.0, "{text}");
    m.frontend
        .wait_metric("istio_requests_total", None, &[("reporter", "source"), ("response_code", "101")], 2.0)
        .await;

    // Plain requests still work on the chain afterwards.
    let (status, _, body) = get(m.frontend.bound.outbound, "payment", "/", &[]).await.expect("GET");
    assert_eq!(status, 200);
    assert_eq!(version_of(&body).as_deref(), Some("v1"));
}
