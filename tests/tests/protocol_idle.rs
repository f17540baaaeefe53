//! Idle client connections through a real sidecar: it closes a connection on
//! which nothing was read or written for its idle timeout (Envoy's
//! `idle_timeout`), gracefully, and never one that keeps working or has a request
//! in flight.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serin::demo_app::{AppConfig, DemoApp};
use serin_tests::*;
use tokio::net::TcpStream;

/// Longest wait for a close the test expects (the timeouts here are seconds).
const CLOSE_WITHIN: Duration = Duration::from_secs(30);

/// A `payment` v1 pod behind a sidecar whose client connections close after `idle`.
async fn world(idle: Duration) -> (Vec<DemoApp>, Sidecar) {
    let (apps, pods) = start_pods("payment", vec![("v1", AppConfig::default())]).await;
    let docs =
        [registry_yaml("payment", "HTTP", &pods), subsets_yaml("payment", None), route_all_yaml("payment", "v1", "")];
    let sidecar = Sidecar::start_args(&docs, |args| args.idle_timeout = idle).await;
    (apps, sidecar)
}

/// A kept-alive HTTP/1.1 connection to the sidecar's outbound listener, and its
/// task (which ends when the connection closes).
async fn connect_h1(
    sidecar: &Sidecar,
) -> (http1::SendRequest<Full<Bytes>>, tokio::task::JoinHandle<hyper::Result<()>>) {
    let stream = TcpStream::connect(sidecar.bound.outbound).await.expect("connect");
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.expect("handshake");
    (sender, tokio::spawn(conn))
}

fn get_payment(path: &str) -> Request<Full<Bytes>> {
    Request::builder().uri(path).header("host", "payment").body(Full::new(Bytes::new())).expect("request")
}

/// A kept-alive HTTP/1.1 connection used every 300 ms outlives the 2 s idle
/// timeout; once left alone, the sidecar closes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_working_connection_stays_and_an_idle_one_closes() {
    let (_apps, sidecar) = world(Duration::from_secs(2)).await;
    let (mut sender, conn) = connect_h1(&sidecar).await;
    for i in 0..12 {
        sender.ready().await.unwrap_or_else(|e| panic!("request {i}: the connection closed while in use: {e}"));
        let resp = sender.send_request(get_payment("/")).await.expect("send");
        assert_eq!(resp.status(), 200);
        assert!(resp.headers().get("connection").is_none(), "request {i}: {:?}", resp.headers());
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(version_of(&body).as_deref(), Some("v1"));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let closed = tokio::time::timeout(CLOSE_WITHIN, conn).await;
    assert!(closed.is_ok(), "the sidecar did not close the idle connection");
    assert!(sender.is_closed());
}

/// A request that takes longer than the idle timeout (nothing crosses the client
/// connection meanwhile) is answered in full; the connection then closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_outlives_the_idle_timeout() {
    let (_apps, sidecar) = world(Duration::from_secs(1)).await;
    let (mut sender, conn) = connect_h1(&sidecar).await;
    let resp = sender.send_request(get_payment("/delay/3000")).await.expect("answered");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.expect("whole body").to_bytes();
    assert_eq!(version_of(&body).as_deref(), Some("v1"));
    let closed = tokio::time::timeout(CLOSE_WITHIN, conn).await;
    assert!(closed.is_ok(), "the sidecar did not close the idle connection");
}

/// An idle HTTP/2 connection gets a GOAWAY and closes; a stream open on it
/// before then is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_is_closed() {
    let (_apps, sidecar) = world(Duration::from_secs(1)).await;
    let mut sender = h2c_connect(sidecar.bound.outbound).await;
    let req = Request::get("http://payment/delay/2000").body(empty_body()).expect("request");
    let resp = sender.send_request(req).await.expect("answered");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.expect("whole body").to_bytes();
    assert_eq!(version_of(&body).as_deref(), Some("v1"));
    let deadline = tokio::time::Instant::now() + CLOSE_WITHIN;
    while !sender.is_closed() {
        assert!(tokio::time::Instant::now() < deadline, "the sidecar did not close the idle HTTP/2 connection");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
