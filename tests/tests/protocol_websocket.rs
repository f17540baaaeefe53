//! WebSocket through a real sidecar: the HTTP/1.1 Upgrade goes upstream, the 101
//! comes back, and frames flow both ways on the spliced connection.

use futures_util::{SinkExt, StreamExt};
use serin::demo_app::AppConfig;
use serin_tests::*;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_the_sidecar() {
    let world = World::payment_v1("HTTP", AppConfig::default(), "").await;
    websocket_echo(&world).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_on_an_http2_port_goes_upstream_as_http1_upgrade() {
    // An HTTP/1.1 Upgrade cannot ride an h2c connection: it goes upstream as HTTP/1.1.
    let world = World::payment_v1("HTTP2", AppConfig::default(), "").await;
    websocket_echo(&world).await;
}

async fn websocket_echo(world: &World) {
    let stream = TcpStream::connect(world.outbound()).await.expect("connect");
    let (mut ws, resp) = tokio_tungstenite::client_async("ws://payment/ws", stream).await.expect("WebSocket handshake");
    assert_eq!(resp.status(), 101);
    assert_eq!(resp.headers().get("x-version").map(|v| v.as_bytes()), Some(&b"v1"[..]));

    ws.send(Message::text("hello through serin")).await.expect("send text");
    assert_eq!(next_message(&mut ws).await, Message::text("hello through serin"));

    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    ws.send(Message::binary(big.clone())).await.expect("send binary");
    assert_eq!(next_message(&mut ws).await, Message::binary(big));

    for i in 0..20 {
        ws.send(Message::text(format!("message {i}"))).await.expect("send");
        assert_eq!(next_message(&mut ws).await, Message::text(format!("message {i}")));
    }
    ws.close(None).await.expect("close");
    // The close handshake completes: the echo answers the close and the stream ends.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while let Ok(Some(Ok(msg))) = tokio::time::timeout_at(deadline, ws.next()).await {
        assert!(matches!(msg, Message::Close(_) | Message::Ping(_) | Message::Pong(_)), "{msg:?}");
    }

    let text = wait_metric(&world.sidecar, "istio_requests_total", &[("response_code", "101")], 1.0).await;
    assert_eq!(metric_sum(&text, "istio_requests_total", &[("destination_version", "v1")]), 1.0, "{text}");

    // The sidecar still serves plain requests afterwards.
    let (status, _, body) = get(world.outbound(), "payment", "/", &[]).await.expect("GET");
    assert_eq!(status, 200);
    assert_eq!(version_of(&body).as_deref(), Some("v1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_without_upgrade_headers_gets_the_upstream_426() {
    let world = World::payment_v1("HTTP", AppConfig::default(), "").await;
    let (status, headers, _) = get(world.outbound(), "payment", "/ws", &[]).await.expect("GET");
    assert_eq!(status, 426);
    assert_eq!(headers.get("x-version").map(|v| v.as_bytes()), Some(&b"v1"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_websockets_at_once() {
    let world = World::payment_v1("HTTP", AppConfig::default(), "").await;
    let mut sockets = Vec::new();
    for _ in 0..2 {
        let stream = TcpStream::connect(world.outbound()).await.expect("connect");
        let (ws, _) = tokio_tungstenite::client_async("ws://payment/ws", stream).await.expect("handshake");
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
}
