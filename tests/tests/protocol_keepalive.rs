//! Upstream keep-alive through a real sidecar: the proxy reuses its HTTP/1.1
//! connections (also after bodiless answers), and honours an upstream that closes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serin_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What the raw upstream does with one request.
fn answer(request_line: &str) -> (&'static str, Option<Duration>) {
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or_default();
    let path = parts.next().unwrap_or_default();
    match (method, path) {
        ("HEAD", _) => ("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", None),
        (_, "/204") => ("HTTP/1.1 204 No Content\r\n\r\n", None),
        (_, "/304") => ("HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n", None),
        // No length: the body runs to the connection's end (RFC 9112 §6.3).
        (_, "/until-close") => ("HTTP/1.1 200 OK\r\n\r\nbody until close", Some(Duration::ZERO)),
        (_, "/http10") => ("HTTP/1.0 200 OK\r\nContent-Length: 6\r\n\r\nold-ok", Some(Duration::ZERO)),
        (_, "/empty") => ("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", None),
        (_, "/close") => ("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok", Some(Duration::ZERO)),
        // Answers as keep-alive, then closes the idle connection soon after.
        (_, "/idle-close") => ("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", Some(Duration::from_millis(30))),
        _ => ("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", None),
    }
}

/// A raw HTTP/1.1 upstream (requests without bodies) that counts its connections.
async fn counting_upstream() -> (SocketAddr, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { return };
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        buf.drain(..end + 4);
                        let (response, close_after) = answer(head.lines().next().unwrap_or_default());
                        if stream.write_all(response.as_bytes()).await.is_err() {
                            return;
                        }
                        if let Some(after) = close_after {
                            tokio::time::sleep(after).await;
                            return;
                        }
                    }
                    match stream.read(&mut chunk).await {
                        Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                        _ => return,
                    }
                }
            });
        }
    });
    (addr, accepted, task)
}

async fn sidecar_over(addr: SocketAddr) -> Sidecar {
    let pods = [Pod { name: "payment-v1-raw".into(), version: "v1".into(), addr }];
    Sidecar::start(&[
        registry_yaml("payment", "HTTP", &pods),
        subsets_yaml("payment", None),
        route_all_yaml("payment", "v1", ""),
    ])
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_reused_across_clients() {
    let (addr, accepted, upstream) = counting_upstream().await;
    let sidecar = sidecar_over(addr).await;
    let mut client = Client::connect(sidecar.bound.outbound, "payment").await;
    for _ in 0..10 {
        let (status, body) = client.get("/", &[]).await;
        assert_eq!((status.as_u16(), &body[..]), (200, &b"ok"[..]));
    }
    // New downstream connections share the same upstream pool.
    for _ in 0..5 {
        let (status, _, _) = get(sidecar.bound.outbound, "payment", "/", &[]).await.expect("GET");
        assert_eq!(status, 200);
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "sequential requests use one upstream connection");
    upstream.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodiless_answers_keep_the_upstream_connection() {
    let (addr, accepted, upstream) = counting_upstream().await;
    let sidecar = sidecar_over(addr).await;
    let mut client = Client::connect(sidecar.bound.outbound, "payment").await;
    for path in ["/204", "/304", "/empty", "/"] {
        for _ in 0..3 {
            let (status, _) = client.get(path, &[]).await;
            assert!(status.is_success() || status == 304, "{path}: {status}");
        }
    }
    // HEAD: a Content-Length and no body.
    let request = "HEAD / HTTP/1.1\r\nHost: payment\r\n\r\nHEAD / HTTP/1.1\r\nHost: payment\r\n\r\nGET / HTTP/1.1\r\nHost: payment\r\nConnection: close\r\n\r\n";
    let raw = raw_exchange(sidecar.bound.outbound, request.as_bytes()).await;
    assert_eq!(raw.matches("HTTP/1.1 200").count(), 3, "{raw}");
    assert!(raw.ends_with("\r\n\r\nok"), "{raw}");
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "a bodiless answer must not cost the upstream connection");
    upstream.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connection_close_is_honoured() {
    let (addr, accepted, upstream) = counting_upstream().await;
    let sidecar = sidecar_over(addr).await;
    let mut client = Client::connect(sidecar.bound.outbound, "payment").await;
    for _ in 0..10 {
        let (status, body) = client.get("/close", &[]).await;
        assert_eq!((status.as_u16(), &body[..]), (200, &b"ok"[..]));
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 10, "one connection per `Connection: close` answer");
    let text = wait_metric(&sidecar, "istio_requests_total", &[("response_code", "200")], 10.0).await;
    assert_eq!(metric_sum(&text, "istio_requests_total", &[]), 10.0, "no failed request: {text}");
    upstream.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_closing_idle_connections_is_not_an_error() {
    let (addr, accepted, upstream) = counting_upstream().await;
    let sidecar = sidecar_over(addr).await;
    let mut client = Client::connect(sidecar.bound.outbound, "payment").await;
    for _ in 0..5 {
        let (status, body) = client.get("/idle-close", &[]).await;
        assert_eq!((status.as_u16(), &body[..]), (200, &b"ok"[..]));
        // Well after the upstream closed the pooled connection.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 5);
    upstream.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_delimited_and_http10_answers_pass_through() {
    let (addr, accepted, upstream) = counting_upstream().await;
    let sidecar = sidecar_over(addr).await;
    let mut client = Client::connect(sidecar.bound.outbound, "payment").await;
    for _ in 0..3 {
        let (status, body) = client.get("/until-close", &[]).await;
        assert_eq!((status.as_u16(), &body[..]), (200, &b"body until close"[..]));
        let (status, body) = client.get("/http10", &[]).await;
        assert_eq!((status.as_u16(), &body[..]), (200, &b"old-ok"[..]));
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 6);
    let text = wait_metric(&sidecar, "istio_requests_total", &[("response_code", "200")], 6.0).await;
    assert_eq!(metric_sum(&text, "istio_requests_total", &[("response_flags", "-")]), 6.0, "{text}");
    upstream.abort();
}
