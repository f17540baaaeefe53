//! Every local error of the request path through a real sidecar: the status the
//! client sees and the `response_flags` label of `istio_requests_total`.
//! NR, UH, UF, UT, UC, DC, UO, and DPE for requests hyper rejects (400, 431).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serin::demo_app::AppConfig;
use serin_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Semaphore, mpsc};

fn payment_pod(addr: SocketAddr, version: &str) -> Pod {
    Pod { name: format!("payment-{version}-raw"), version: version.into(), addr }
}

/// A sidecar over `pods` with subsets v1/v2, the route `vs` and an optional
/// DestinationRule traffic policy.
async fn sidecar_for(pods: &[Pod], policy: Option<&str>, vs: String) -> Sidecar {
    Sidecar::start(&[registry_yaml("payment", "HTTP", pods), subsets_yaml("payment", policy), vs]).await
}

async fn assert_flag(sidecar: &Sidecar, code: &str, flags: &str, count: f64) -> String {
    wait_metric(sidecar, "istio_requests_total", &[("response_code", code), ("response_flags", flags)], count).await
}

/// Reads one request head (up to the blank line); false when the peer closed first.
async fn read_head(stream: &mut TcpStream) -> bool {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
            _ => return false,
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_is_404_nr() {
    let (_apps, pods) = start_pods("payment", vec![("v1", AppConfig::default())]).await;
    let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: payment, namespace: default}\nspec:\n  hosts: [payment]\n  http:\n  - name: only\n    match: [{uri: {prefix: /only}}]\n    route: [{destination: {host: payment, subset: v1}}]\n";
    let sidecar = sidecar_for(&pods, None, vs.to_string()).await;

    // Unknown host.
    let (status, _, body) = get(sidecar.bound.outbound, "nosuch.example", "/", &[]).await.expect("GET");
    assert_eq!(status, 404);
    assert_eq!(&body[..], b"route not found");
    // Known host, no route matches.
    let (status, _, _) = get(sidecar.bound.outbound, "payment", "/other", &[]).await.expect("GET");
    assert_eq!(status, 404);
    // The matching route still works.
    let (status, _, body) = get(sidecar.bound.outbound, "payment", "/only/x", &[]).await.expect("GET");
    assert_eq!(status, 200);
    assert_eq!(version_of(&body).as_deref(), Some("v1"));

    let text = assert_flag(&sidecar, "404", "NR", 2.0).await;
    assert_eq!(metric_sum(&text, "istio_requests_total", &[("response_code", "404")]), 2.0, "{text}");
    assert_eq!(metric_sum(&text, "istio_requests_total", &[("response_flags", "-")]), 1.0, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subset_without_endpoints_is_503_uh() {
    let (_apps, pods) = start_pods("payment", vec![("v1", AppConfig::default())]).await;
    let sidecar = sidecar_for(&pods, None, route_all_yaml("payment", "v2", "")).await;
    let (status, _, body) = get(sidecar.bound.outbound, "payment", "/", &[]).await.expect("GET");
    assert_eq!(status, 503);
    assert_eq!(&body[..], b"no healthy upstream");
    let text = assert_flag(&sidecar, "503", "UH", 1.0).await;
    assert_eq!(label_values(&text, "istio_requests_total", "response_flags"), ["UH"], "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failure_is_503_uf() {
    // A bound socket that never listens: connecting to it is refused, and no
    // other test can take the port while it is held.
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let dead = socket.local_addr().expect("addr");
    let pods = [payment_pod(dead, "v1")];

    // Without retries: UF.
    let sidecar = sidecar_for(&pods, None, route_all_yaml("payment", "v1", "    retries: {attempts: 0}\n")).await;
    let (status, _, body) = get(sidecar.bound.outbound, "payment", "/", &[]).await.expect("GET");
    assert_eq!(status, 503);
    assert!(String::from_utf8_lossy(&body).contains("connection failure"), "{body:?}");
    assert_flag(&sidecar, "503", "UF", 1.0).await;

    // Istio's default retries (connect-failure, 2 attempts) exhausted: UF,URX.
    let sidecar = sidecar_for(&pods, None, route_all_yaml("payment", "v1", "")).await;
    let (status, _, _) = get(sidecar.bound.outbound, "payment", "/", &[]).await.expect("GET");
    assert_eq!(status, 503);
    assert_flag(&sidecar, "503", "UF,URX", 1.0).await;
    drop(socket);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_timeout_is_504_ut() {
    let world = World::payment_v1("HTTP", AppConfig::default(), "    timeout: 300ms\n").await;
    let (status, _, body) = get(world.outbound(), "payment", "/delay/5000", &[]).await.expect("GET");
    assert_eq!(status, 504);
    assert_eq!(&body[..], b"upstream request timeout");
    assert_flag(&world.sidecar, "504", "UT", 1.0).await;
    // A fast request on the same route is unaffected.
    let (status, _, _) = get(world.outbound(), "payment", "/", &[]).await.expect("GET");
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_reset_is_503_uc() {
    // An upstream that reads the request and closes the connection without answering.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let resetter = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                read_head(&mut stream).await;
                drop(stream);
            });
        }
    });
    let sidecar = sidecar_for(&[payment_pod(addr, "v1")], None, route_all_yaml("payment", "v1", "")).await;
    let (status, _, body) = get(sidecar.bound.outbound, "payment", "/", &[]).await.expect("GET");
    assert_eq!(status, 503);
    assert!(String::from_utf8_lossy(&body).contains("connection termination"), "{body:?}");
    let text = assert_flag(&sidecar, "503", "UC", 1.0).await;
    assert_eq!(metric_sum(&text, "istio_requests_total", &[("destination_version", "v1")]), 1.0, "{text}");
    resetter.abort();
}

/// Waits until the sidecar has `n` requests in flight (bounded: 10 s).
async fn wait_in_flight(sidecar: &Sidecar, n: usize) {
    for _ in 0..200 {
        if sidecar.shared.drain.in_flight() == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never {n} requests in flight (now {})", sidecar.shared.drain.in_flight());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_is_dc() {
    let world = World::payment_v1("HTTP", AppConfig::default(), "").await;

    // HTTP/1.1: the client sends a request to a slow upstream and goes away.
    let mut stream = TcpStream::connect(world.outbound()).await.expect("connect");
    stream.write_all(b"GET /delay/20000 HTTP/1.1\r\nHost: payment\r\n\r\n").await.expect("write");
    wait_in_flight(&world.sidecar, 1).await;
    drop(stream);
    let text = wait_metric(&world.sidecar, "istio_requests_total", &[("response_flags", "DC")], 1.0).await;
    assert_eq!(metric_sum(&text, "istio_requests_total", &[("response_flags", "DC"), ("response_code", "0")]), 1.0);
    wait_in_flight(&world.sidecar, 0).await;

    // HTTP/2: the client drops the connection with the stream open.
    let mut sender = h2c_connect(world.outbound()).await;
    let req = http::Request::get("http://payment/delay/20000").body(empty_body()).expect("request");
    let pending = tokio::spawn(async move { sender.send_request(req).await.map(|r| r.status()) });
    wait_in_flight(&world.sidecar, 1).await;
    pending.abort();
    let _ = pending.await;
    wait_metric(&world.sidecar, "istio_requests_total", &[("response_flags", "DC")], 2.0).await;
    wait_in_flight(&world.sidecar, 0).await;

    // The sidecar still serves.
    let (status, _, _) = get(world.outbound(), "payment", "/", &[]).await.expect("GET");
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_request_limit_is_503_uo() {
    // An upstream that holds every request until the test releases it.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (arrived_tx, mut arrived) = mpsc::unbounded_channel::<()>();
    let release = Arc::new(Semaphore::new(0));
    let gate = release.clone();
    let upstream = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { return };
            let arrived_tx = arrived_tx.clone();
            let gate = gate.clone();
            tokio::spawn(async move {
                while read_head(&mut stream).await {
                    let _ = arrived_tx.send(());
                    let Ok(permit) = gate.acquire().await else { return };
                    permit.forget();
                    let resp = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 4\r\n\r\nheld";
                    if stream.write_all(resp).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let policy = "    connectionPool:\n      tcp: {maxConnections: 1}\n      http: {http1MaxPendingRequests: 1}\n";
    let sidecar = sidecar_for(&[payment_pod(addr, "v1")], Some(policy), route_all_yaml("payment", "v1", "")).await;
    let outbound = sidecar.bound.outbound;

    let (done_tx, mut done) = mpsc::unbounded_channel();
    let send = |name: &'static str| {
        let done_tx = done_tx.clone();
        tokio::spawn(async move {
            let result = get(outbound, "payment", &format!("/{name}"), &[]).await.expect("GET");
            let _ = done_tx.send((name, result.0, result.2));
        })
    };
    // A takes the one connection and is held upstream.
    send("a");
    tokio::time::timeout(Duration::from_secs(10), arrived.recv()).await.expect("A reached the upstream");
    // B and C: one waits as the one pending request, the other overflows.
    send("b");
    send("c");
    let (first, status, body) =
        tokio::time::timeout(Duration::from_secs(10), done.recv()).await.expect("an overflow answer").expect("answer");
    assert_ne!(first, "a");
    assert_eq!(status, 503, "{first}: {body:?}");
    assert!(String::from_utf8_lossy(&body).contains("overflow"), "{body:?}");
    // Release A, then the pending one.
    release.add_permits(2);
    let mut rest = Vec::new();
    for _ in 0..2 {
        let (name, status, body) =
            tokio::time::timeout(Duration::from_secs(10), done.recv()).await.expect("answer in time").expect("answer");
        assert_eq!(status, 200, "{name}");
        assert_eq!(&body[..], b"held");
        rest.push(name);
    }
    rest.sort_unstable();
    assert!(rest[0] == "a" && rest[1] != first, "{rest:?} / overflowed {first}");

    let text = assert_flag(&sidecar, "503", "UO", 1.0).await;
    assert_eq!(metric_sum(&text, "istio_requests_total", &[("response_code", "200")]), 2.0, "{text}");
    upstream.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_requests_are_400_and_431_dpe() {
    let world = World::payment_v1("HTTP", AppConfig::default(), "").await;
    let outbound = world.outbound();

    let reply = raw_exchange(outbound, b"GARBAGE\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply:?}");
    let reply = raw_exchange(outbound, b"GET / HTTP/1.1 trailing junk\r\nHost: payment\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply:?}");
    let reply = raw_exchange(outbound, b"GET / HTTP/1.1\r\nHost: payment\r\nBad Header Name: x\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply:?}");

    // RFC 9112 §3.2: an HTTP/1.1 request without Host, or with two, is a 400.
    let reply = raw_exchange(outbound, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply:?}");
    let reply =
        raw_exchange(outbound, b"GET / HTTP/1.1\r\nHost: payment\r\nHost: other\r\nConnection: close\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply:?}");
    // Conflicting lengths: 400 (request smuggling guard).
    let reply = raw_exchange(
        outbound,
        b"POST /echo HTTP/1.1\r\nHost: payment\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply:?}");
    // A transfer coding the proxy cannot decode is not passed on disguised as chunked.
    let reply = raw_exchange(
        outbound,
        b"POST /echo HTTP/1.1\r\nHost: payment\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n0\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 501"), "{reply:?}");
    // HTTP/1.0 may leave Host out: routed by host "" → no route.
    let reply = raw_exchange(outbound, b"GET / HTTP/1.0\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.0 404"), "{reply:?}");

    let mut big = b"GET / HTTP/1.1\r\nHost: payment\r\nX-Big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 70 * 1024));
    big.extend_from_slice(b"\r\n\r\n");
    let reply = raw_exchange(outbound, &big).await;
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply:?}");

    // The proxy keeps serving: a normal request on a new connection.
    let (status, _, body) = get(outbound, "payment", "/", &[]).await.expect("GET");
    assert_eq!(status, 200);
    assert_eq!(version_of(&body).as_deref(), Some("v1"));

    let text = assert_flag(&world.sidecar, "400", "DPE", 6.0).await;
    assert_flag(&world.sidecar, "501", "DPE", 1.0).await;
    assert_flag(&world.sidecar, "404", "NR", 1.0).await;
    let text431 = assert_flag(&world.sidecar, "431", "DPE", 1.0).await;
    assert_eq!(metric_sum(&text, "istio_requests_total", &[("response_code", "400")]), 6.0, "{text}");
    assert_eq!(metric_sum(&text431, "istio_requests_total", &[("response_code", "200")]), 1.0, "{text431}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_h2_headers_are_refused_and_the_proxy_keeps_serving() {
    let world = World::payment_v1("HTTP", AppConfig::default(), "").await;
    let mut sender = h2c_connect(world.outbound()).await;
    let big = "a".repeat(70 * 1024);
    let req = http::Request::get("http://payment/").header("x-big", big).body(empty_body()).expect("request");
    // The h2 server's header-list limit (60 KiB, as on HTTP/1.1) answers 431.
    let resp = sender.send_request(req).await.expect("h2 response");
    assert_eq!(resp.status(), 431);
    let mut sender = h2c_connect(world.outbound()).await;
    let req = http::Request::get("http://payment/").body(empty_body()).expect("request");
    let resp = sender.send_request(req).await.expect("h2 response");
    assert_eq!(resp.status(), 200);
}
