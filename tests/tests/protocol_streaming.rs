//! Bodies that do not fit in a buffer, both ways and over both HTTP versions; a
//! client that leaves in the middle of a response; an h2c upstream that restarts.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use serin::demo_app::{AppConfig, DemoApp};
use serin_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_responses_stream_whole_over_h1_and_h2() {
    let size = 4 * 1024 * 1024;
    let world = World::payment_v1("HTTP", AppConfig { body_size: size, ..AppConfig::default() }, "").await;
    let (status, _, body) = get(world.outbound(), "payment", "/", &[]).await.expect("GET");
    assert_eq!(status, 200);
    assert_eq!(body.len(), size);
    assert_eq!(version_of(&body).as_deref(), Some("v1"));

    let mut sender = h2c_connect(world.outbound()).await;
    let resp = sender.send_request(Request::get("http://payment/").body(empty_body()).expect("req")).await.expect("h2");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(body.len(), size);

    let text = wait_metric(&world.sidecar, "istio_response_bytes_count", &[("response_code", "200")], 2.0).await;
    assert_eq!(metric_sum(&text, "istio_response_bytes_sum", &[("response_code", "200")]), (2 * size) as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_h2_upload_to_an_http1_upstream() {
    let world = World::payment_v1("HTTP", AppConfig::default(), "").await;
    let size = 3 * 1024 * 1024;
    let mut sender = h2c_connect(world.outbound()).await;
    let req = Request::post("http://payment/upload").body(Full::new(Bytes::from(vec![b'z'; size]))).expect("req");
    let resp = sender.send_request(req).await.expect("h2 response");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(version_of(&body).as_deref(), Some("v1"));
    let text = wait_metric(&world.sidecar, "istio_request_bytes_count", &[("response_code", "200")], 1.0).await;
    assert_eq!(metric_sum(&text, "istio_request_bytes_sum", &[("response_code", "200")]), size as f64, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_mid_response_is_dc_with_the_status() {
    // Far more than the socket buffers hold, so the proxy is still sending when
    // the client goes.
    let size = 32 * 1024 * 1024;
    let world = World::payment_v1("HTTP", AppConfig { body_size: size, ..AppConfig::default() }, "").await;
    let mut stream = TcpStream::connect(world.outbound()).await.expect("connect");
    stream.write_all(b"GET / HTTP/1.1\r\nHost: payment\r\n\r\n").await.expect("write");
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n =
            tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await.expect("head").expect("read");
        assert!(n > 0, "closed before the head");
        head.extend_from_slice(&buf[..n]);
    }
    assert!(head.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&head));
    drop(stream);
    let text =
        wait_metric(&world.sidecar, "istio_requests_total", &[("response_code", "200"), ("response_flags", "DC")], 1.0)
            .await;
    let sent = metric_sum(&text, "istio_response_bytes_sum", &[("response_flags", "DC")]);
    assert!(sent < size as f64, "counted {sent} bytes sent of {size}");
    // Nothing stays in flight, and the sidecar serves on.
    for _ in 0..200 {
        if world.sidecar.shared.drain.in_flight() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(world.sidecar.shared.drain.in_flight(), 0);
    let mut small = Client::connect(world.outbound(), "payment").await;
    let (status, body) = small.get("/status/201", &[]).await;
    assert_eq!(status, 201);
    assert!(!body.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_upstream_restart_is_survived() {
    let mut world = World::payment_v1("HTTP2", AppConfig::default(), "").await;
    let addr = world.pods[0].addr;
    let (status, _, body) = get(world.outbound(), "payment", "/", &[]).await.expect("GET");
    assert_eq!(status, 200);
    assert_eq!(version_of(&body).as_deref(), Some("v1"));

    // The upstream goes away (GOAWAY to the proxy's h2 connection) and comes back
    // on the same address.
    let old = world.apps.pop().expect("app");
    old.shutdown().await;
    let mut restarted = None;
    for _ in 0..100 {
        match DemoApp::start(addr, AppConfig::new("payment", "v1")).await {
            Ok(app) => {
                restarted = Some(app);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let _app = restarted.expect("the address is free again");
    for _ in 0..5 {
        let (status, _, body) = get(world.outbound(), "payment", "/", &[]).await.expect("GET");
        assert_eq!(status, 200, "{body:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_answer_to_a_large_upload_reaches_the_client() {
    // `/echo` refuses bodies over 1 MiB with 413 before reading them whole. The
    // upstream speaks h2c here: an HTTP/1.1 upstream that answers early closes with
    // the body unread, the kernel resets the connection, and the proxy's HTTP/1.1
    // client (hyper) may see the write error before the answer (a 503 UC); see the
    // report of the protocol tests.
    let world = World::payment_v1("HTTP2", AppConfig::default(), "").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("big");
    std::fs::write(&file, vec![b'a'; 3 * 1024 * 1024]).expect("write");
    let data = format!("@{}", file.display());
    let url = format!("http://127.0.0.1:{}/echo", world.outbound().port());
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "20", "-H", "Host: payment", "-H", "Expect:", "-o", "/dev/null"])
        .args(["-w", "%{http_code}", "--data-binary", &data, &url])
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "413", "{}", String::from_utf8_lossy(&out.stderr));

    let mut h2 = h2c_connect(world.outbound()).await;
    let req =
        Request::post("http://payment/echo").body(Full::new(Bytes::from(vec![b'a'; 3 * 1024 * 1024]))).expect("req");
    let resp = h2.send_request(req).await.expect("h2 answer");
    assert_eq!(resp.status(), 413);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("over 1 MiB"), "{body:?}");

    let text = wait_metric(&world.sidecar, "istio_requests_total", &[("response_code", "413")], 2.0).await;
    assert_eq!(metric_sum(&text, "istio_requests_total", &[("response_code", "413"), ("response_flags", "-")]), 2.0);
}
