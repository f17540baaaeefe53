//! Header handling of a proxy hop, seen from the upstream (`/echo`) and from the
//! client: `x-request-id`, `x-forwarded-for` / `-proto`, hop-by-hop headers both ways.

use std::net::SocketAddr;

use serin::demo_app::AppConfig;
use serin_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Whether `id` is a lower-case UUID v4 (`xxxxxxxx-xxxx-4xxx-[89ab]xxx-xxxxxxxxxxxx`).
fn is_uuid_v4(id: &str) -> bool {
    let parts: Vec<&str> = id.split('-').collect();
    let lens: Vec<usize> = parts.iter().map(|p| p.len()).collect();
    lens == [8, 4, 4, 4, 12]
        && id.chars().all(|c| c == '-' || c.is_ascii_digit() || ('a'..='f').contains(&c))
        && parts[2].starts_with('4')
        && parts[3].starts_with(['8', '9', 'a', 'b'])
}

/// Splits a raw HTTP/1.1 response into the head (lower-cased) and the body
/// (Content-Length or chunked).
fn parse_response(raw: &str) -> (String, String) {
    let (head, rest) = raw.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no response head: {raw:?}"));
    let head = head.to_ascii_lowercase();
    if head.contains("transfer-encoding: chunked") {
        let mut body = String::new();
        let mut rest = rest;
        loop {
            let (size, after) = rest.split_once("\r\n").expect("chunk size");
            let size = usize::from_str_radix(size.trim(), 16).expect("hex chunk size");
            if size == 0 {
                break;
            }
            body.push_str(&after[..size]);
            rest = &after[size + 2..];
        }
        (head, body)
    } else {
        (head, rest.to_string())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_is_generated_when_absent_and_kept_when_present() {
    let world = World::payment_v1("HTTP", AppConfig::default(), "").await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (status, _, body) = get(world.outbound(), "payment", "/echo", &[]).await.expect("GET");
        assert_eq!(status, 200);
        let id = echo_json(&body)["headers"]["x-request-id"].as_str().expect("x-request-id sent upstream").to_string();
        assert!(is_uuid_v4(&id), "{id}");
        ids.push(id);
    }
    ids.dedup();
    assert_eq!(ids.len(), 3, "every request gets its own id: {ids:?}");

    let (_, _, body) =
        get(world.outbound(), "payment", "/echo", &[("x-request-id", "my-trace-123")]).await.expect("GET");
    assert_eq!(echo_json(&body)["headers"]["x-request-id"], "my-trace-123");

    // HTTP/2 as well.
    let mut sender = h2c_connect(world.outbound()).await;
    let req = http::Request::get("http://payment/echo").body(empty_body()).expect("request");
    let resp = sender.send_request(req).await.expect("h2 response");
    use http_body_util::BodyExt;
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let echo = echo_json(&body);
    assert!(is_uuid_v4(echo["headers"]["x-request-id"].as_str().expect("id")), "{echo}");
    assert_eq!(echo["authority"], "payment");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_passes_forwarded_for_through() {
    // Envoy in an Istio sidecar (use_remote_address false) neither adds nor
    // appends x-forwarded-for; only the edge gateway does. x-forwarded-proto is
    // set when the caller sent none.
    let world = World::payment_v1("HTTP", AppConfig::default(), "").await;
    let (_, _, body) = get(world.outbound(), "payment", "/echo", &[]).await.expect("GET");
    let echo = echo_json(&body);
    assert!(echo["headers"].get("x-forwarded-for").is_none(), "{echo}");
    assert_eq!(echo["headers"]["x-forwarded-proto"], "http");

    let sent = [("x-forwarded-for", "10.1.2.3, 10.0.0.9"), ("x-forwarded-proto", "https")];
    let (_, _, body) = get(world.outbound(), "payment", "/echo", &sent).await.expect("GET");
    let echo = echo_json(&body);
    assert_eq!(echo["headers"]["x-forwarded-for"], "10.1.2.3, 10.0.0.9");
    assert_eq!(echo["headers"]["x-forwarded-proto"], "https");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_request_headers_are_not_forwarded() {
    let world = World::payment_v1("HTTP", AppConfig::default(), "").await;
    let request = "GET /echo HTTP/1.1\r\n\
        Host: payment\r\n\
        Connection: keep-alive, X-Foo\r\n\
        Connection: close\r\n\
        X-Foo: secret\r\n\
        Keep-Alive: timeout=5, max=100\r\n\
        Proxy-Connection: keep-alive\r\n\
        TE: trailers, deflate\r\n\
        X-App: kept\r\n\
        \r\n";
    let raw = raw_exchange(world.outbound(), request.as_bytes()).await;
    let (head, body) = parse_response(&raw);
    assert!(head.starts_with("http/1.1 200"), "{raw}");
    let echo = echo_json(body.as_bytes());
    let headers = echo["headers"].as_object().expect("headers");
    for gone in ["x-foo", "keep-alive", "proxy-connection"] {
        assert!(!headers.contains_key(gone), "{gone} forwarded: {headers:?}");
    }
    // The upstream connection's own Connection header (if any) is the proxy's, not the client's.
    if let Some(conn) = headers.get("connection") {
        let conn = conn.as_str().unwrap_or_default().to_ascii_lowercase();
        assert!(!conn.contains("x-foo"), "{conn}");
    }
    assert_eq!(headers["te"], "trailers");
    assert_eq!(headers["x-app"], "kept");
}

/// An upstream that answers every request with a fixed raw response (HTTP/1.1 only).
async fn raw_upstream(response: &'static str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                    if head.windows(4).any(|w| w == b"\r\n\r\n") {
                        head.clear();
                        if stream.write_all(response.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_response_headers_are_not_forwarded() {
    let (addr, upstream) = raw_upstream(
        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive, X-Up\r\nX-Up: internal\r\nKeep-Alive: timeout=5\r\nX-Kept: yes\r\n\r\nok",
    )
    .await;
    let pods = [Pod { name: "payment-v1-raw".into(), version: "v1".into(), addr }];
    let sidecar = Sidecar::start(&[
        registry_yaml("payment", "HTTP", &pods),
        subsets_yaml("payment", None),
        route_all_yaml("payment", "v1", ""),
    ])
    .await;
    let (status, headers, body) = get(sidecar.bound.outbound, "payment", "/", &[]).await.expect("GET");
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"ok");
    assert!(headers.get("x-up").is_none(), "{headers:?}");
    assert!(headers.get("keep-alive").is_none(), "{headers:?}");
    assert_eq!(headers.get("x-kept").map(|v| v.as_bytes()), Some(&b"yes"[..]));
    upstream.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_target_reaches_the_upstream_unchanged() {
    let world = World::payment_v1("HTTP", AppConfig::default(), "").await;
    let (status, _, body) = get(world.outbound(), "Payment:8080", "/echo?x=1&y=%2F&z=", &[]).await.expect("GET");
    assert_eq!(status, 200);
    let echo = echo_json(&body);
    assert_eq!(echo["path"], "/echo");
    assert_eq!(echo["query"], "x=1&y=%2F&z=");
    // The Host goes upstream as the client wrote it.
    assert_eq!(echo["authority"], "Payment:8080");

    // An encoded path, seen on the wire by an upstream that answers with its request line.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let upstream = tokio::spawn(async move {
        let Ok((mut stream, _)) = listener.accept().await else { return };
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                _ => return,
            }
        }
        let line = String::from_utf8_lossy(&head).lines().next().unwrap_or_default().to_string();
        let resp = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{line}", line.len());
        let _ = stream.write_all(resp.as_bytes()).await;
    });
    let pods = [Pod { name: "payment-v1-raw".into(), version: "v1".into(), addr }];
    let sidecar = Sidecar::start(&[
        registry_yaml("payment", "HTTP", &pods),
        subsets_yaml("payment", None),
        route_all_yaml("payment", "v1", ""),
    ])
    .await;
    let (status, _, body) = get(sidecar.bound.outbound, "payment", "/a%20b/%2F/c;p=1?q=%41", &[]).await.expect("GET");
    assert_eq!(status, 200);
    assert_eq!(String::from_utf8_lossy(&body), "GET /a%20b/%2F/c;p=1?q=%41 HTTP/1.1");
    upstream.abort();
}
