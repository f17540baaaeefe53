//! HTTP versions across the hop: the upstream protocol follows the service port's
//! declared protocol (HTTP → HTTP/1.1, HTTP2/GRPC → h2c) whatever the client speaks;
//! HTTP/1.0, HEAD and bodiless statuses pass through intact.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serin::demo_app::AppConfig;
use serin_tests::*;
use tokio::net::TcpListener;

/// An upstream that speaks HTTP/1.1 only (like most apps behind an `HTTP` port)
/// and answers `<version> <method> <path> <body bytes>`.
async fn h1_only_upstream() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let svc = service_fn(|req: Request<Incoming>| async move {
                let (parts, body) = req.into_parts();
                let n = body.collect().await.map(|c| c.to_bytes().len()).unwrap_or(usize::MAX);
                let text = format!("{:?} {} {} {n}", parts.version, parts.method, parts.uri.path());
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
            });
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc));
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_client_reaches_an_http1_only_upstream() {
    let (addr, upstream) = h1_only_upstream().await;
    let pods = [Pod { name: "payment-v1-h1".into(), version: "v1".into(), addr }];
    let sidecar = Sidecar::start(&[
        registry_yaml("payment", "HTTP", &pods),
        subsets_yaml("payment", None),
        route_all_yaml("payment", "v1", ""),
    ])
    .await;
    let mut sender = h2c_connect(sidecar.bound.outbound).await;
    for i in 0..3 {
        let req = Request::post(format!("http://payment/pay/{i}"))
            .body(Full::new(Bytes::from_static(b"12345")))
            .expect("request");
        let resp = sender.send_request(req).await.expect("h2 response");
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(String::from_utf8_lossy(&body), format!("HTTP/1.1 POST /pay/{i} 5"));
    }
    // HTTP/1.1 clients, of course, too.
    let (status, _, body) = get(sidecar.bound.outbound, "payment", "/x", &[]).await.expect("GET");
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"HTTP/1.1 GET /x 0");
    upstream.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_client_reaches_an_http2_port_over_h2c() {
    for protocol in ["HTTP2", "GRPC"] {
        let world = World::payment_v1(protocol, AppConfig::default(), "").await;
        let (status, _, body) = get(world.outbound(), "payment", "/echo", &[]).await.expect("GET");
        assert_eq!(status, 200);
        let echo = echo_json(&body);
        assert_eq!(echo["http_version"], "HTTP/2.0", "{protocol}: {echo}");
        assert_eq!(echo["authority"], "payment", "{protocol}");

        // A chunked HTTP/1.1 body becomes h2 DATA frames, whole.
        let body = "x".repeat(100_000);
        let request = format!(
            "POST /echo HTTP/1.1\r\nHost: payment\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
            body.len()
        );
        let raw = raw_exchange(world.outbound(), request.as_bytes()).await;
        assert!(raw.starts_with("HTTP/1.1 200"), "{protocol}: {}", &raw[..raw.len().min(300)]);
        let json_start = raw.find("{\"service\"").expect("JSON body");
        let json_end = raw.rfind('}').expect("JSON end");
        let echo = echo_json(&raw.as_bytes()[json_start..=json_end]);
        assert_eq!(echo["body_bytes"], 100_000, "{protocol}");
        assert_eq!(echo["http_version"], "HTTP/2.0");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_head_and_bodiless_statuses() {
    let world = World::payment_v1("HTTP", AppConfig::default(), "").await;

    // HTTP/1.0 with no keep-alive: answered, then closed.
    let raw = raw_exchange(world.outbound(), b"GET / HTTP/1.0\r\nHost: payment\r\n\r\n").await;
    assert!(raw.starts_with("HTTP/1.0 200") || raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert!(raw.contains("\"version\":\"v1\""), "{raw}");

    // HEAD, 204 and 304 on one keep-alive connection: no body is expected after
    // any of them, so the following request must still parse.
    let mut client = Client::connect(world.outbound(), "payment").await;
    let (status, body) = client.get("/status/204", &[]).await;
    assert_eq!((status.as_u16(), body.len()), (204, 0));
    let (status, body) = client.get("/status/304", &[]).await;
    assert_eq!((status.as_u16(), body.len()), (304, 0));
    let (status, body) = client.get("/", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(version_of(&body).as_deref(), Some("v1"));

    let request =
        "HEAD / HTTP/1.1\r\nHost: payment\r\n\r\nGET /echo HTTP/1.1\r\nHost: payment\r\nConnection: close\r\n\r\n";
    let raw = raw_exchange(world.outbound(), request.as_bytes()).await;
    let second =
        raw.find("HTTP/1.1 200").and_then(|first| raw[first + 1..].find("HTTP/1.1 200").map(|i| i + first + 1));
    let second = second.unwrap_or_else(|| panic!("two answers expected: {raw}"));
    let head_reply = &raw[..second];
    assert!(head_reply.to_ascii_lowercase().contains("content-length: "), "{head_reply}");
    assert!(head_reply.ends_with("\r\n\r\n"), "HEAD answered with a body: {head_reply:?}");
    assert!(raw[second..].contains("\"method\":\"GET\""), "{raw}");
}
