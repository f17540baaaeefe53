//! Certificate rotation at the gateway: replacing the files of a
//! `credentialName` secret (`--credentials-dir`) makes new handshakes present
//! the new certificate while an open keep-alive connection keeps working; a bad
//! new file keeps the old certificate and shows in `/config_dump`; and two
//! rotations under a steady, bounded load (keep-alive clients plus a new
//! connection per request) lose no request (issue 3).

mod gateway_support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gateway_support::{Issued, Pki, TempDir, WAIT, admin_get, presented_cert, service_entry, wait_for, write_atomic};
use http_body_util::{BodyExt as _, Empty};
use hyper::client::conn::http1::SendRequest;
use serin::demo_app::{AppConfig, DemoApp};
use serin::gateway::{GatewayArgs, Started};
use serin_certs::rustls::pki_types::CertificateDer;
use tokio::task::JoinHandle;

/// A gateway serving `pay.example.com` over HTTPS (SIMPLE, the `pay-cert` secret
/// in `--credentials-dir`, first installed from `first` into `secret`) in front
/// of a payment v1 demo app; returns the app, the gateway and its 443 address.
async fn pay_gateway(dir: &TempDir, secret: &std::path::Path, first: &Issued) -> (DemoApp, Started, SocketAddr) {
    write_atomic(&secret.join("tls.crt"), &first.cert_pem);
    write_atomic(&secret.join("tls.key"), &first.key_pem);
    let payment =
        DemoApp::start("127.0.0.1:0".parse().expect("addr"), AppConfig::new("payment", "v1")).await.expect("app");
    let mut config = service_entry("payment", "prod", "payment.prod.svc.cluster.local", payment.addr(), "HTTP");
    config += "apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: edge, namespace: prod}
spec:
  servers:
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: [pay.example.com]
    tls: {mode: SIMPLE, credentialName: pay-cert}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: pay, namespace: prod}
spec:
  hosts: [pay.example.com]
  gateways: [edge]
  http: [{route: [{destination: {host: payment}}]}]
";
    let path = dir.write("gateway.yaml", &config);
    let mut args = GatewayArgs::local(path, &[443]);
    args.credentials_dir = Some(dir.path().join("secrets"));
    let started = gateway_support::start_with(args).await;
    let port = started.bound.ports[&443];
    (payment, started, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_certificates_serve_new_handshakes_and_bad_files_are_refused() {
    let dir = TempDir::new("rotation");
    let pki = Pki::new("rotation CA");
    let secret = dir.path().join("secrets").join("pay-cert");
    let v1 = pki.server(&["pay.example.com"], 1001);
    let (_payment, started, port) = pay_gateway(&dir, &secret, &v1).await;
    assert_eq!(presented_cert(port, "pay.example.com", &pki.ca_der).await, v1.der);

    // A keep-alive connection opened on the first certificate.
    let client = gateway_support::client_config(&pki.ca_der, None);
    let mut old = gateway_support::connect_tls(port, "pay.example.com", client).await.expect("connect");
    let (status, body) = gateway_support::get_keep_alive(&mut old, "pay.example.com", "/").await;
    assert_eq!(status, 200, "{body}");

    // Rotate: key first, then certificate (a moment where they do not match).
    let v2 = pki.server(&["pay.example.com"], 1002);
    write_atomic(&secret.join("tls.key"), &v2.key_pem);
    write_atomic(&secret.join("tls.crt"), &v2.cert_pem);
    wait_for("the new certificate on new handshakes", || async {
        presented_cert(port, "pay.example.com", &pki.ca_der).await == v2.der
    })
    .await;
    let (status, _) = gateway_support::get_keep_alive(&mut old, "pay.example.com", "/").await;
    assert_eq!(status, 200, "the connection opened before the rotation keeps working");
    let dump: serde_json::Value =
        serde_json::from_str(&admin_get(started.bound.admin, "/config_dump").await).expect("json");
    assert!(dump["last_rejected"].is_null(), "a rotation that settles is not an error: {dump}");

    // A broken certificate file: the old certificate keeps serving; the error shows.
    write_atomic(&secret.join("tls.crt"), "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n");
    wait_for("the rejected certificate in /config_dump", || async {
        let dump: serde_json::Value =
            serde_json::from_str(&admin_get(started.bound.admin, "/config_dump").await).expect("json");
        dump["last_rejected"]["source"].as_str().is_some_and(|s| s.contains("tls.crt"))
    })
    .await;
    assert_eq!(presented_cert(port, "pay.example.com", &pki.ca_der).await, v2.der);
    let (status, _) = gateway_support::get_keep_alive(&mut old, "pay.example.com", "/").await;
    assert_eq!(status, 200);
    started.shared.drain.trigger();
}

/// Keep-alive clients of the load (one connection each, opened before any rotation).
const KEEP_ALIVE_CLIENTS: usize = 4;
/// Clients that open a new connection (a new handshake) for every request.
const CHURN_CLIENTS: usize = 2;
/// Most requests one keep-alive client sends.
const MAX_KEEP_ALIVE_REQUESTS: usize = 20_000;
/// Most requests (connections) one churn client makes.
const MAX_CHURN_REQUESTS: usize = 2_000;
/// Longest a load task runs, whatever happens to the test.
const LOAD_DEADLINE: Duration = Duration::from_secs(90);

/// What every load task shares with the test.
struct Shared {
    stop: AtomicBool,
    /// Rotations whose certificate a probe handshake has seen: a handshake begun
    /// after that must present certificate `generation` (or a newer one).
    generation: AtomicUsize,
    /// The certificates in rotation order (v1, v2, v3).
    certs: Vec<CertificateDer<'static>>,
    /// Requests completed, per keep-alive client, then per churn client.
    done: Vec<AtomicUsize>,
}

impl Shared {
    fn done(&self) -> Vec<usize> {
        self.done.iter().map(|d| d.load(Ordering::SeqCst)).collect()
    }
}

/// What one load task saw.
#[derive(Debug, Default)]
struct TaskReport {
    failures: Vec<String>,
    /// Handshakes per certificate index (churn clients).
    handshakes: Vec<usize>,
    /// The keep-alive connection was still open at the end.
    still_open: bool,
}

/// One GET through `sender`: `Ok` for a 200 from payment v1, otherwise why not.
async fn one_request(sender: &mut SendRequest<Empty<Bytes>>, close: bool) -> Result<(), String> {
    let exchange = async {
        sender.ready().await.map_err(|e| format!("connection not ready: {e}"))?;
        let mut req = hyper::Request::get("/").header(http::header::HOST, "pay.example.com");
        if close {
            req = req.header(http::header::CONNECTION, "close");
        }
        let resp = sender
            .send_request(req.body(Empty::new()).expect("request"))
            .await
            .map_err(|e| format!("request error: {e}"))?;
        let status = resp.status();
        let version = resp.headers().get("x-version").cloned();
        let body = resp.into_body().collect().await.map_err(|e| format!("body error: {e}"))?.to_bytes();
        if status != 200 || version.as_ref().is_none_or(|v| v != "v1") {
            return Err(format!("{status} ({version:?}): {}", String::from_utf8_lossy(&body)));
        }
        Ok(())
    };
    tokio::time::timeout(WAIT, exchange).await.unwrap_or_else(|_| Err("no response in time".to_string()))
}

/// A keep-alive client: `GET /` on its one connection until told to stop.
fn keep_alive_task(shared: Arc<Shared>, slot: usize, mut sender: SendRequest<Empty<Bytes>>) -> JoinHandle<TaskReport> {
    tokio::spawn(async move {
        let mut report = TaskReport::default();
        let deadline = Instant::now() + LOAD_DEADLINE;
        for _ in 0..MAX_KEEP_ALIVE_REQUESTS {
            if shared.stop.load(Ordering::SeqCst) || Instant::now() > deadline {
                break;
            }
            if let Err(e) = one_request(&mut sender, false).await {
                report.failures.push(format!("keep-alive client {slot}: {e}"));
                if sender.is_closed() {
                    break;
                }
            }
            shared.done[slot].fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        report.still_open = !sender.is_closed();
        report
    })
}

/// A churn client: a new connection (new handshake) for every request; checks
/// that a handshake begun after a rotation was seen presents a rotated certificate.
fn churn_task(
    addr: SocketAddr,
    ca: CertificateDer<'static>,
    shared: Arc<Shared>,
    slot: usize,
) -> JoinHandle<TaskReport> {
    tokio::spawn(async move {
        let mut report = TaskReport { handshakes: vec![0; shared.certs.len()], ..TaskReport::default() };
        let deadline = Instant::now() + LOAD_DEADLINE;
        for n in 0..MAX_CHURN_REQUESTS {
            if shared.stop.load(Ordering::SeqCst) || Instant::now() > deadline {
                break;
            }
            let generation = shared.generation.load(Ordering::SeqCst);
            match gateway_support::https_client(addr, "pay.example.com", &ca).await {
                Ok((mut sender, leaf)) => {
                    match shared.certs.iter().position(|c| *c == leaf) {
                        Some(i) if i >= generation => report.handshakes[i] += 1,
                        Some(i) => report.failures.push(format!(
                            "churn client {slot}, request {n}: certificate v{} after rotation {generation} was served",
                            i + 1
                        )),
                        None => report.failures.push(format!("churn client {slot}, request {n}: unknown certificate")),
                    }
                    if let Err(e) = one_request(&mut sender, true).await {
                        report.failures.push(format!("churn client {slot}, request {n}: {e}"));
                    }
                }
                Err(e) => report.failures.push(format!("churn client {slot}, request {n}: connect: {e}")),
            }
            shared.done[slot].fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        report
    })
}

/// Waits (bounded) until every load task has completed `n` more requests than now.
async fn wait_progress(shared: &Shared, n: usize, what: &str) {
    let target: Vec<usize> = shared.done().into_iter().map(|d| d + n).collect();
    wait_for(what, || async { shared.done().iter().zip(&target).all(|(d, t)| d >= t) }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotations_under_load_lose_no_request_and_new_handshakes_present_the_new_certificate() {
    let dir = TempDir::new("rotation-load");
    let pki = Pki::new("rotation load CA");
    let secret = dir.path().join("secrets").join("pay-cert");
    let issued = [
        pki.server(&["pay.example.com"], 2001),
        pki.server(&["pay.example.com"], 2002),
        pki.server(&["pay.example.com"], 2003),
    ];
    let (_payment, started, port) = pay_gateway(&dir, &secret, &issued[0]).await;
    assert_eq!(presented_cert(port, "pay.example.com", &pki.ca_der).await, issued[0].der);

    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        generation: AtomicUsize::new(0),
        certs: issued.iter().map(|i| i.der.clone()).collect(),
        done: (0..KEEP_ALIVE_CLIENTS + CHURN_CLIENTS).map(|_| AtomicUsize::new(0)).collect(),
    });
    // The keep-alive connections, all opened on the first certificate.
    let mut tasks = Vec::new();
    for slot in 0..KEEP_ALIVE_CLIENTS {
        let (mut sender, leaf) =
            gateway_support::https_client(port, "pay.example.com", &pki.ca_der).await.expect("keep-alive connection");
        assert_eq!(leaf, issued[0].der, "keep-alive client {slot} did not get the first certificate");
        one_request(&mut sender, false).await.expect("a first request on the keep-alive connection");
        tasks.push(keep_alive_task(shared.clone(), slot, sender));
    }
    for slot in KEEP_ALIVE_CLIENTS..KEEP_ALIVE_CLIENTS + CHURN_CLIENTS {
        tasks.push(churn_task(port, pki.ca_der.clone(), shared.clone(), slot));
    }
    wait_progress(&shared, 10, "the load to get going").await;

    // Two rotations: certificate then key, then key then certificate (each order
    // has a moment where the files do not match).
    for (generation, new) in issued.iter().enumerate().skip(1) {
        if generation % 2 == 1 {
            write_atomic(&secret.join("tls.crt"), &new.cert_pem);
            write_atomic(&secret.join("tls.key"), &new.key_pem);
        } else {
            write_atomic(&secret.join("tls.key"), &new.key_pem);
            write_atomic(&secret.join("tls.crt"), &new.cert_pem);
        }
        wait_for(&format!("certificate v{} on new handshakes", generation + 1), || async {
            presented_cert(port, "pay.example.com", &pki.ca_der).await == new.der
        })
        .await;
        shared.generation.store(generation, Ordering::SeqCst);
        // Every client, keep-alive and churn, keeps completing requests.
        wait_progress(&shared, 10, &format!("the load to go on after rotation {generation}")).await;
    }

    shared.stop.store(true, Ordering::SeqCst);
    let mut failures = Vec::new();
    let mut handshakes = vec![0; issued.len()];
    for (slot, task) in tasks.into_iter().enumerate() {
        let report = task.await.expect("load task");
        failures.extend(report.failures);
        if slot < KEEP_ALIVE_CLIENTS {
            assert!(report.still_open, "keep-alive client {slot}: the connection opened before the rotations closed");
        }
        for (total, n) in handshakes.iter_mut().zip(report.handshakes) {
            *total += n;
        }
    }
    let total: usize = shared.done().iter().sum();
    assert!(
        failures.is_empty(),
        "{} failures (failed requests or stale certificates) in {total} requests: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    // Churn handshakes begun after each rotation presented that rotation's
    // certificate (checked per handshake above); some happened after each one.
    assert!(handshakes[1..].iter().all(|&n| n > 0), "handshakes per certificate: {handshakes:?}");
    assert_eq!(presented_cert(port, "pay.example.com", &pki.ca_der).await, issued[2].der);
    started.shared.drain.trigger();
}
