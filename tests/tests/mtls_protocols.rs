//! gRPC and WebSocket across the two-sidecar mTLS chain: app → frontend sidecar →
//! mTLS → payment sidecar → app. gRPC (h2c from the app) rides HTTP/2 between the
//! sidecars with its trailers; a WebSocket upgrade goes as HTTP/1.1 over mTLS.

mod mtls_common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use http::Request;
use http_body_util::{BodyExt, Full};
use mtls_common::*;
use serin_certs::Ca;
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

/// The frontend's `/clusters` entry for the payment sidecar's inbound address.
async fn payment_host(m: &Mesh) -> serde_json::Value {
    host_of(&m.frontend, m.payment.sidecar.bound.inbound).await
}

/// `frontend`'s `/clusters` entry for the endpoint at `addr`.
async fn host_of(frontend: &Sidecar, addr: SocketAddr) -> serde_json::Value {
    let addr = addr.to_string();
    let clusters = frontend.admin_json("/clusters?format=json").await;
    let hosts = clusters["cluster_statuses"]
        .as_array()
        .expect("cluster_statuses")
        .iter()
        .flat_map(|c| c["host_statuses"].as_array().cloned().unwrap_or_default());
    hosts.into_iter().find(|h| h["address"] == addr.as_str()).unwrap_or_else(|| panic!("no host {addr}: {clusters}"))
}

/// A TCP relay in front of an address that counts the connections made to it;
/// with no address it holds them silent (a peer that never answers a handshake).
struct Relay {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(target: Option<SocketAddr>) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("relay addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut from, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let Some(target) = target else {
                    held.push(from);
                    continue;
                };
                tokio::spawn(async move {
                    if let Ok(mut to) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut from, &mut to).await;
                    }
                });
            }
        });
        Relay { addr, accepted, task }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Sends `n` GETs of `path` at once, each on a client connection of its own.
async fn burst(frontend: &Sidecar, n: usize, path: &str) -> Vec<(http::StatusCode, Bytes)> {
    let sent = (0..n).map(|_| get(frontend.bound.outbound, "payment", path, &[]));
    let answers = futures_util::future::join_all(sent).await;
    answers.into_iter().map(|a| a.map(|(status, _, body)| (status, body)).expect("an answer")).collect()
}

/// Requests that find no HTTP/2 connection to a destination wait for one handshake
/// (as Envoy's pool queues them on its connecting client): a burst opens one
/// connection, not one per request, and a failed connect fails its waiters together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_shares_one_http2_connect() {
    let ca = Ca::generate("cluster.local").expect("ca");
    let (payment_dir, frontend_dir) = (cert_dir(&issue(&ca, "payment")), cert_dir(&issue(&ca, "frontend")));
    let payment = start_payment(&[STRICT.to_string()], payment_dir.path().to_path_buf()).await;
    let frontend_at = |relay: SocketAddr, extra: Vec<String>| {
        let dir = frontend_dir.path().to_path_buf();
        async move { start_frontend(relay, dir, &extra).await }
    };
    // UPGRADE: every request rides HTTP/2; sixteen at once, one connection.
    let relay = Relay::start(Some(payment.sidecar.bound.inbound)).await;
    let frontend = frontend_at(relay.addr, vec![payment_pool_rule("h2UpgradePolicy: UPGRADE")]).await;
    for (status, body) in burst(&frontend, 16, "/delay/200").await {
        assert_eq!(status, 200, "body: {}", String::from_utf8_lossy(&body));
        assert_eq!(version_of(&body).as_deref(), Some("v1"));
    }
    assert_eq!(relay.accepted(), 1, "UPGRADE: one connection for the burst");
    let host = host_of(&frontend, relay.addr).await;
    assert_eq!(host["connection_http2"], true, "{host}");
    assert_eq!(host["total_requests"], 16, "{host}");
    // The adaptive default: the first requests of a burst ride HTTP/1.1 connections
    // of their own, the rest the one HTTP/2 connection.
    let relay = Relay::start(Some(payment.sidecar.bound.inbound)).await;
    let frontend = frontend_at(relay.addr, vec![]).await;
    for (status, body) in burst(&frontend, 16, "/delay/200").await {
        assert_eq!(status, 200, "body: {}", String::from_utf8_lossy(&body));
    }
    let host = host_of(&frontend, relay.addr).await;
    assert_eq!(host["connection_http2"], true, "{host}");
    let http1 = host["connections_open"].as_u64().expect("connections_open") as usize;
    assert_eq!(relay.accepted(), http1 + 1, "adaptive: {http1} HTTP/1.1 connections and one HTTP/2: {host}");
    // A peer that never completes the handshake: each burst waits for one connect,
    // which times out, and every request of it gets 503. (The timeout leaves a slow
    // machine ample time to send the whole burst while the connect is under way.)
    let silent = Relay::start(None).await;
    let rule = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: payment, namespace: default}\nspec:\n  host: payment\n  trafficPolicy:\n    connectionPool:\n      tcp: {connectTimeout: 1500ms}\n      http: {h2UpgradePolicy: UPGRADE}\n";
    let route =
        vs_yaml("payment", "payment", "  - retries: {attempts: 0}\n    route: [{destination: {host: payment}}]\n");
    let frontend = frontend_at(silent.addr, vec![rule.to_string(), route]).await;
    for round in 1..=2 {
        for (status, body) in burst(&frontend, 12, "/").await {
            assert_eq!(status, 503, "body: {}", String::from_utf8_lossy(&body));
        }
        assert_eq!(silent.accepted(), round, "one connect per burst");
    }
}

/// Waits (bounded: 10 s) until the frontend has `n` requests active to the payment sidecar.
async fn wait_active(m: &Mesh, n: u64) {
    for _ in 0..1000 {
        if payment_host(m).await["active_requests"].as_u64() == Some(n) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("the frontend never had {n} requests active: {}", payment_host(m).await);
}

/// A DestinationRule for `payment` with `connectionPool.http` set to `http`.
fn payment_pool_rule(http: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: payment, namespace: default}}\nspec:\n  host: payment\n  trafficPolicy:\n    connectionPool:\n      http: {{{http}}}\n"
    )
}

/// Sends `n` HTTP/1.1 requests on one client connection; each must reach v1
/// over mutual TLS (the app sees the caller's identity).
async fn http1_requests(m: &Mesh, n: usize) {
    let mut client = Client::connect(m.frontend.bound.outbound, "payment").await;
    for _ in 0..n {
        let (status, body) = client.get("/echo", &[]).await;
        assert_eq!(status, 200, "body: {}", String::from_utf8_lossy(&body));
        let echo = String::from_utf8_lossy(&body);
        assert!(echo.contains("URI=spiffe://cluster.local/ns/default/sa/frontend"), "echo: {echo}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_hop_protocol_follows_the_rule_and_the_load() {
    // Unset or DEFAULT (serin's mesh default): adaptive. One request at a time rides
    // one pooled HTTP/1.1 mTLS connection; while the frontend has up to 4 requests in
    // flight they ride one each, beyond that they share the one HTTP/2 connection.
    for rule in [None, Some("h2UpgradePolicy: DEFAULT")] {
        let extra: Vec<String> = rule.map(payment_pool_rule).into_iter().collect();
        let m = mesh(&[STRICT.to_string()], &extra).await;
        http1_requests(&m, 10).await;
        let host = payment_host(&m).await;
        assert_eq!(host["connection_http2"], false, "{rule:?}: quiet: {host}");
        assert_eq!(host["connections_open"], 1, "{rule:?}: quiet: {host}");
        // Eight requests held by the app, sent one after the other once the one
        // before is in flight: the first four find the sidecar quiet (the first
        // reuses the idle connection), the other four do not.
        let mut held = Vec::new();
        for k in 1..=8u64 {
            let outbound = m.frontend.bound.outbound;
            held.push(tokio::spawn(async move { get(outbound, "payment", "/delay/3000", &[]).await }));
            wait_active(&m, k).await;
        }
        for answer in futures_util::future::join_all(held).await {
            let (status, _, body) = answer.expect("task").expect("GET");
            assert_eq!(status, 200, "body: {}", String::from_utf8_lossy(&body));
            assert_eq!(version_of(&body).as_deref(), Some("v1"));
        }
        let host = payment_host(&m).await;
        assert_eq!(host["connection_http2"], true, "{rule:?}: overlapping: {host}");
        assert_eq!(host["connections_open"], 4, "{rule:?}: overlapping: {host}");
        assert_eq!(host["total_requests"], 18, "{rule:?}: {host}");
    }
    // UPGRADE: two client connections at once, both on the one HTTP/2 mTLS
    // connection to the payment sidecar, even one request at a time.
    let m = mesh(&[STRICT.to_string()], &[payment_pool_rule("h2UpgradePolicy: UPGRADE")]).await;
    let ((), ()) = tokio::join!(http1_requests(&m, 10), http1_requests(&m, 10));
    let host = payment_host(&m).await;
    assert_eq!(host["connection_http2"], true, "UPGRADE: {host}");
    assert_eq!(host["connections_open"], 0, "UPGRADE: no HTTP/1.1 connection: {host}");
    assert_eq!(host["total_requests"], 20, "UPGRADE: {host}");
    // DO_NOT_UPGRADE (Istio's mesh default), and useClientProtocol even with
    // UPGRADE: HTTP/1.1 over pooled keep-alive mTLS connections, also under overlap.
    for rule in ["h2UpgradePolicy: DO_NOT_UPGRADE", "h2UpgradePolicy: UPGRADE, useClientProtocol: true"] {
        let m = mesh(&[STRICT.to_string()], &[payment_pool_rule(rule)]).await;
        http1_requests(&m, 10).await;
        let host = payment_host(&m).await;
        assert_eq!(host["connection_http2"], false, "{rule}: {host}");
        assert_eq!(host["connections_open"], 1, "{rule}: {host}");
        assert_eq!(host["total_requests"], 10, "{rule}: {host}");
        let ((), (), ()) = tokio::join!(http1_requests(&m, 5), http1_requests(&m, 5), http1_requests(&m, 5));
        assert_eq!(payment_host(&m).await["connection_http2"], false, "{rule}: overlapping");
    }
}

/// POSTs `body` to `/echo` through the frontend sidecar on a connection of its own;
/// returns the body the app saw, as it echoed it back.
async fn echo_post(m: &Mesh, body: Bytes) -> String {
    let stream = tokio::net::TcpStream::connect(m.frontend.bound.outbound).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.expect("handshake");
    tokio::spawn(conn);
    let req = Request::post("/echo").header("host", "payment").body(Full::new(body)).expect("request");
    let resp = sender.send_request(req).await.expect("send");
    assert_eq!(resp.status(), 200);
    let echoed = resp.into_body().collect().await.expect("body").to_bytes();
    let echo: serde_json::Value = serde_json::from_slice(&echoed).expect("echo JSON");
    echo["body"].as_str().expect("echoed body").to_string()
}

/// The mTLS sockets are corked (`cork.rs`): a connection's writes of one poll leave
/// together, with a bound per poll. Bodies past that bound, both ways, arrive whole
/// and in order: on several streams of the one HTTP/2 connection at once (`UPGRADE`:
/// every request on it), and on pooled HTTP/1.1 connections (`DO_NOT_UPGRADE`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_both_ways_on_corked_mtls_connections() {
    // Just under the echo app's 1 MiB limit; the answer (JSON) is as large.
    let bodies: Vec<String> = (0..4u8)
        .map(|i| (0..1_000_000usize).map(|j| char::from(b'a' + (i * 7 + (j % 23) as u8) % 26)).collect())
        .collect();
    for (rule, http2) in [("h2UpgradePolicy: UPGRADE", true), ("h2UpgradePolicy: DO_NOT_UPGRADE", false)] {
        let m = mesh(&[STRICT.to_string()], &[payment_pool_rule(rule)]).await;
        let sent = bodies.iter().map(|b| echo_post(&m, Bytes::from(b.clone())));
        let echoed = futures_util::future::join_all(sent).await;
        for (i, (sent, got)) in bodies.iter().zip(&echoed).enumerate() {
            assert_eq!(got.len(), sent.len(), "{rule}: body {i}");
            assert!(got == sent, "{rule}: body {i} differs");
        }
        let host = payment_host(&m).await;
        assert_eq!(host["connection_http2"], http2, "{rule}: {host}");
        assert_eq!(host["total_requests"], 4, "{rule}: {host}");
    }
}
