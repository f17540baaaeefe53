//! The demo upstream over real sockets: hyper clients (HTTP/1.1 and h2c), curl,
//! gRPC framing and trailers, WebSocket echo, fault injection.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use serin::body::{BoxError, ProxyBody, boxed, empty, full};
use serin::demo_app::{AppConfig, DemoApp};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

async fn start(cfg: AppConfig) -> DemoApp {
    DemoApp::start("127.0.0.1:0".parse().unwrap(), cfg).await.expect("demo app starts")
}

async fn h1(addr: SocketAddr) -> http1::SendRequest<ProxyBody> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) = http1::handshake(TokioIo::new(tcp)).await.expect("h1 handshake");
    tokio::spawn(conn);
    sender
}

async fn h2(addr: SocketAddr) -> http2::SendRequest<ProxyBody> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.expect("h2 handshake");
    tokio::spawn(conn);
    sender
}

struct Answer {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
    trailers: Option<http::HeaderMap>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
}

async fn read(resp: http::Response<hyper::body::Incoming>) -> Answer {
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await.expect("body");
    let trailers = collected.trailers().cloned();
    Answer { status: parts.status, headers: parts.headers, body: collected.to_bytes(), trailers }
}

async fn get1(sender: &mut http1::SendRequest<ProxyBody>, path: &str) -> Answer {
    let req = Request::get(path).header("host", "payment").body(empty()).unwrap();
    read(sender.send_request(req).await.expect("response")).await
}

async fn get2(sender: &mut http2::SendRequest<ProxyBody>, path: &str) -> Answer {
    let req = Request::get(format!("http://payment{path}")).body(empty()).unwrap();
    read(sender.send_request(req).await.expect("response")).await
}

#[tokio::test]
async fn http1_keep_alive_identity() {
    let app = start(AppConfig::new("payment", "v1")).await;
    let port = app.addr().port();
    assert_eq!(app.pod(), format!("payment-v1-{port}"));
    let mut c = h1(app.addr()).await;
    for _ in 0..3 {
        // Same connection each time: keep-alive.
        let a = get1(&mut c, "/pay").await;
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(a.headers["content-type"], "application/json");
        assert_eq!(a.headers["x-version"], "v1");
        assert_eq!(a.headers["x-service"], "payment");
        let v = a.json();
        assert_eq!(v["service"], "payment");
        assert_eq!(v["version"], "v1");
        assert_eq!(v["pod"], format!("payment-v1-{port}"));
    }
    app.shutdown().await;
}

#[tokio::test]
async fn h2c_prior_knowledge_and_pod_override() {
    let cfg = AppConfig { pod: Some("payment-v2-abc".into()), ..AppConfig::new("payment", "v2") };
    let app = start(cfg).await;
    let mut c = h2(app.addr()).await;
    let a = get2(&mut c, "/").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.json()["pod"], "payment-v2-abc");
    assert_eq!(a.json()["version"], "v2");
    // Multiplexed: several streams at once on one connection.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move { get2(&mut c, "/echo").await }));
    }
    for t in tasks {
        let a = t.await.unwrap();
        assert_eq!(a.json()["http_version"], "HTTP/2.0");
        assert_eq!(a.json()["authority"], "payment");
    }
}

#[tokio::test]
async fn echo_chunked_body_and_headers() {
    let app = start(AppConfig::default()).await;
    let mut c = h1(app.addr()).await;
    // A streamed body of unknown length goes out chunked.
    let chunks: Vec<Result<Frame<Bytes>, BoxError>> =
        vec![Ok(Frame::data(Bytes::from_static(b"hello "))), Ok(Frame::data(Bytes::from_static(b"world")))];
    let body = boxed(StreamBody::new(futures_util::stream::iter(chunks)));
    let req = Request::post("/echo?a=1")
        .header("host", "payment")
        .header("x-request-id", "abc-123")
        .header("x-multi", "1")
        .header("x-multi", "2")
        .body(body)
        .unwrap();
    let a = read(c.send_request(req).await.unwrap()).await;
    assert_eq!(a.status, StatusCode::OK);
    let v = a.json();
    assert_eq!(v["method"], "POST");
    assert_eq!(v["path"], "/echo");
    assert_eq!(v["query"], "a=1");
    assert_eq!(v["http_version"], "HTTP/1.1");
    assert_eq!(v["authority"], "payment");
    assert_eq!(v["headers"]["x-request-id"], "abc-123");
    assert_eq!(v["headers"]["x-multi"], "1, 2");
    assert_eq!(v["headers"]["transfer-encoding"], "chunked");
    assert_eq!(v["body"], "hello world");
    assert_eq!(v["body_bytes"], 11);
    // The connection is still usable after a chunked request.
    assert_eq!(get1(&mut c, "/").await.status, StatusCode::OK);
}

#[tokio::test]
async fn echo_rejects_huge_body() {
    let app = start(AppConfig::default()).await;
    let mut c = h1(app.addr()).await;
    let req = Request::post("/echo").header("host", "payment").body(full(vec![b'a'; 2 * 1024 * 1024])).unwrap();
    let a = read(c.send_request(req).await.unwrap()).await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn status_and_delay_paths() {
    let app = start(AppConfig::default()).await;
    let mut c = h1(app.addr()).await;
    let a = get1(&mut c, "/status/418").await;
    assert_eq!(a.status, StatusCode::IM_A_TEAPOT);
    assert_eq!(a.json()["status"], 418);
    assert_eq!(a.headers["x-version"], "v1");
    assert_eq!(get1(&mut c, "/status/503").await.status, StatusCode::SERVICE_UNAVAILABLE);
    let a = get1(&mut c, "/status/204").await;
    assert_eq!(a.status, StatusCode::NO_CONTENT);
    assert!(a.body.is_empty());
    assert_eq!(get1(&mut c, "/status/abc").await.status, StatusCode::BAD_REQUEST);
    assert_eq!(get1(&mut c, "/status/101").await.status, StatusCode::BAD_REQUEST);
    let a = get1(&mut c, "/delay/20").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.json()["version"], "v1");
    assert_eq!(get1(&mut c, "/delay/99999999").await.status, StatusCode::BAD_REQUEST);
    assert_eq!(get1(&mut c, "/delay/x").await.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn delay_then_client_gives_up() {
    let app = start(AppConfig::default()).await;
    let mut c = h1(app.addr()).await;
    let req = Request::get("/delay/5000").header("host", "payment").body(empty()).unwrap();
    let r = tokio::time::timeout(Duration::from_millis(50), c.send_request(req)).await;
    assert!(r.is_err(), "a 5 s delay answers after the client's 50 ms timeout");
    // The app is fine with the abandoned request.
    let mut other = h1(app.addr()).await;
    assert_eq!(get1(&mut other, "/").await.status, StatusCode::OK);
}

#[tokio::test]
async fn body_size_padding() {
    let cfg = AppConfig { body_size: 1024, ..AppConfig::default() };
    let app = start(cfg).await;
    let a = get1(&mut h1(app.addr()).await, "/").await;
    assert_eq!(a.body.len(), 1024);
    assert_eq!(a.json()["version"], "v1");
}

#[tokio::test]
async fn error_rate_one_always_fails() {
    let cfg = AppConfig { error_rate: 1.0, ..AppConfig::default() };
    let app = start(cfg).await;
    let mut c = h1(app.addr()).await;
    for _ in 0..5 {
        let a = get1(&mut c, "/").await;
        assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(a.json()["error"], "injected fault");
        assert_eq!(a.json()["version"], "v1");
    }
    // gRPC faults are UNAVAILABLE in the trailers.
    let mut c2 = h2(app.addr()).await;
    let req = Request::post("http://payment/pkg.Svc/Pay")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(full(vec![0u8, 0, 0, 0, 0]))
        .unwrap();
    let a = read(c2.send_request(req).await.unwrap()).await;
    assert_eq!(a.status, StatusCode::OK);
    let trailers = a.trailers.expect("trailers");
    assert_eq!(trailers["grpc-status"], "14");
}

#[tokio::test]
async fn error_rate_is_a_share() {
    let cfg = AppConfig { error_rate: 0.5, ..AppConfig::default() };
    let app = start(cfg).await;
    let mut c = h1(app.addr()).await;
    let mut failed = 0;
    for _ in 0..200 {
        if get1(&mut c, "/").await.status == StatusCode::SERVICE_UNAVAILABLE {
            failed += 1;
        }
    }
    // Binomial(200, 0.5): outside 40..160 has probability far below 1e-15.
    assert!((40..160).contains(&failed), "{failed} of 200 failed");
}

#[tokio::test]
async fn grpc_echoes_frames_with_trailers() {
    let app = start(AppConfig::default()).await;
    let mut c = h2(app.addr()).await;
    let message = vec![0u8, 0, 0, 0, 3, 0x08, 0x96, 0x01];
    let req = Request::post("http://payment/payment.Payment/Charge")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(full(message.clone()))
        .unwrap();
    let a = read(c.send_request(req).await.unwrap()).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.headers["content-type"], "application/grpc");
    assert_eq!(a.headers["x-version"], "v1");
    assert_eq!(&a.body[..], &message[..]);
    assert_eq!(a.trailers.expect("trailers")["grpc-status"], "0");

    // No request message: one empty response message.
    let req = Request::post("http://payment/payment.Payment/Charge")
        .header("content-type", "application/grpc+proto")
        .body(empty())
        .unwrap();
    let a = read(c.send_request(req).await.unwrap()).await;
    assert_eq!(&a.body[..], &[0, 0, 0, 0, 0]);
    assert_eq!(a.trailers.expect("trailers")["grpc-status"], "0");
}

#[tokio::test]
async fn websocket_echo() {
    let app = start(AppConfig::default()).await;
    let tcp = TcpStream::connect(app.addr()).await.unwrap();
    let url = format!("ws://{}/ws", app.addr());
    let (mut ws, resp) = tokio_tungstenite::client_async(url, tcp).await.expect("WebSocket handshake");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(resp.headers()["x-version"], "v1");
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"));
    ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(vec![1u8, 2, 3]));
    ws.send(Message::Ping(Bytes::from_static(b"p"))).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::Pong(Bytes::from_static(b"p")));
    ws.close(None).await.unwrap();
    // The server answers the close; then the stream ends.
    while let Some(msg) = ws.next().await {
        match msg {
            Ok(Message::Close(_)) => {}
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) => break,
        }
    }
}

#[tokio::test]
async fn websocket_needs_upgrade() {
    let app = start(AppConfig::default()).await;
    let a = get1(&mut h1(app.addr()).await, "/ws").await;
    assert_eq!(a.status, StatusCode::UPGRADE_REQUIRED);
    let a = get2(&mut h2(app.addr()).await, "/ws").await;
    assert_eq!(a.status, StatusCode::UPGRADE_REQUIRED);
}

fn curl(args: &[&str]) -> (String, String) {
    let out =
        std::process::Command::new("curl").args(["-sS", "--max-time", "10"]).args(args).output().expect("run curl");
    assert!(out.status.success(), "curl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_http1_and_h2c() {
    let app = start(AppConfig::new("payment", "v2")).await;
    let base = format!("http://{}", app.addr());
    let (body, _) = tokio::task::spawn_blocking({
        let url = format!("{base}/");
        move || curl(&[&url])
    })
    .await
    .unwrap();
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["version"], "v2");

    let (body, _) = tokio::task::spawn_blocking({
        let url = format!("{base}/echo");
        move || curl(&["--http2-prior-knowledge", "-H", "x-test: yes", "--data-binary", "ping", &url])
    })
    .await
    .unwrap();
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["http_version"], "HTTP/2.0");
    assert_eq!(v["headers"]["x-test"], "yes");
    assert_eq!(v["body"], "ping");

    // Chunked upload with curl over HTTP/1.1.
    let (body, _) = tokio::task::spawn_blocking({
        let url = format!("{base}/echo");
        move || curl(&["-H", "transfer-encoding: chunked", "--data-binary", "chunky", &url])
    })
    .await
    .unwrap();
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["body"], "chunky");
    assert_eq!(v["headers"]["transfer-encoding"], "chunked");
}

#[tokio::test]
async fn shutdown_stops_listening() {
    let app = start(AppConfig::default()).await;
    let addr = app.addr();
    let mut idle = h1(addr).await;
    assert_eq!(get1(&mut idle, "/").await.status, StatusCode::OK);
    // An idle keep-alive connection does not hold the shutdown up.
    tokio::time::timeout(Duration::from_secs(4), app.shutdown()).await.expect("shutdown drains idle connections");
    assert!(TcpStream::connect(addr).await.is_err(), "no longer listening");
}

#[tokio::test]
async fn upstream_args_parse() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: serin::demo_app::UpstreamArgs,
    }
    let cli = Cli::try_parse_from([
        "serin",
        "--service",
        "payment",
        "--version",
        "v2",
        "--listen",
        "127.0.0.1:9081",
        "--error-rate",
        "0.08",
        "--latency",
        "20ms",
        "--body-size",
        "1024",
    ])
    .expect("parses");
    let cfg = AppConfig::from(&cli.args);
    assert_eq!(cfg.version, "v2");
    assert_eq!(cfg.error_rate, 0.08);
    assert_eq!(cfg.latency, Duration::from_millis(20));
    assert_eq!(cfg.body_size, 1024);
    assert_eq!(cfg.pod_name(9081), "payment-v2-9081");
    assert!(Cli::try_parse_from(["serin", "--listen", "127.0.0.1:1", "--error-rate", "2"]).is_err());
    assert!(Cli::try_parse_from(["serin", "--listen", "127.0.0.1:1", "--latency", "soon"]).is_err());
}

#[test]
fn upstream_subcommand_beside_a_versioned_root() {
    use clap::{CommandFactory, Parser, Subcommand};
    // The shape of `serin`'s own CLI: a root with `--version`, and `upstream` whose
    // `--version` is the service version.
    #[derive(Parser)]
    #[command(name = "serin", version)]
    struct Top {
        #[command(subcommand)]
        command: Sub,
    }
    #[derive(Subcommand)]
    enum Sub {
        Upstream(serin::demo_app::UpstreamArgs),
    }
    Top::command().debug_assert();
    let top = Top::try_parse_from(["serin", "upstream", "--version", "v2", "--listen", "127.0.0.1:9081"]).unwrap();
    let Sub::Upstream(args) = top.command;
    assert_eq!(args.version, "v2");
    assert_eq!(args.service, "payment");
}
