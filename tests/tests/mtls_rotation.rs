//! Certificate rotation under steady load (issue 3, item 8): both sidecars get new
//! certificates (new serials) written atomically into their `--cert-dir` while
//! keep-alive clients send requests through the chain. No request fails, new
//! handshakes present the new certificates, and connections opened before the
//! rotation keep working.

mod mtls_common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use mtls_common::*;
use serin_certs::rustls::pki_types::CertificateDer;
use serin_certs::write_workload;
use serin_tests::*;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

/// Keep-alive clients of the load.
const CLIENTS: usize = 4;
/// Most requests one client sends (bounds the load if a wait below panics late).
const MAX_PER_CLIENT: usize = 5_000;

/// A bounded load on the frontend's outbound port: `CLIENTS` keep-alive
/// connections, each sending `GET /` until `stop` (or `MAX_PER_CLIENT`).
struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    tasks: Vec<JoinHandle<Vec<String>>>,
}

impl Load {
    fn start(addr: std::net::SocketAddr) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let tasks = (0..CLIENTS)
            .map(|_| {
                let (stop, done) = (stop.clone(), done.clone());
                tokio::spawn(async move {
                    let mut client = Client::connect(addr, "payment").await;
                    let mut failures = Vec::new();
                    for _ in 0..MAX_PER_CLIENT {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        match client.try_get("/", &[]).await {
                            Ok((status, _, body)) if status == 200 && version_of(&body).as_deref() == Some("v1") => {}
                            Ok((status, _, body)) => {
                                failures.push(format!("{status}: {}", String::from_utf8_lossy(&body)));
                            }
                            Err(e) => {
                                failures.push(format!("connection error: {e}"));
                                break;
                            }
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    failures
                })
            })
            .collect();
        Load { stop, done, tasks }
    }

    fn done(&self) -> usize {
        self.done.load(Ordering::Relaxed)
    }

    /// Waits (bounded: 20 s) until `n` more requests than now have completed.
    async fn wait_more(&self, n: usize) {
        let target = self.done() + n;
        for _ in 0..400 {
            if self.done() >= target {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the load stalled: {} requests done, waited for {target}", self.done());
    }

    /// Stops the load; returns the number of requests and every failure.
    async fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut failures = Vec::new();
        for task in self.tasks {
            failures.extend(task.await.expect("load task"));
        }
        (self.done.load(Ordering::Relaxed), failures)
    }
}

/// Polls a fresh TLS handshake with the payment inbound port until the server
/// presents `want` (bounded: 10 s; the watcher reads the directory every 500 ms).
async fn wait_server_cert(m: &Mesh, probe: &Arc<serin_certs::rustls::ClientConfig>, want: &CertificateDer<'_>) {
    let mut last = None;
    for _ in 0..200 {
        let exchange = tls_get(m.payment.sidecar.bound.inbound, probe.clone()).await;
        assert!(exchange.ok(), "a new handshake during rotation failed: {:?}", exchange.response);
        if exchange.peer.first() == Some(want) {
            return;
        }
        last = exchange.peer.first().map(|c| c.as_ref().len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the payment sidecar never presented the re-issued certificate (last leaf: {last:?} bytes)");
}

/// Polls the frontend's `/config_dump` until its identity has serial `serial`
/// (bounded: 10 s).
async fn wait_dump_serial(sidecar: &Sidecar, serial: &str) -> serde_json::Value {
    let mut identity = serde_json::Value::Null;
    for _ in 0..200 {
        identity = identity_dump(sidecar).await;
        if identity["serial"] == serial {
            return identity;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("config_dump never showed serial {serial}; identity: {identity}");
}

/// A WebSocket through the frontend to the payment app (an HTTP/1.1 upgrade over
/// its own mTLS connection).
async fn websocket(m: &Mesh) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    let stream = tokio::net::TcpStream::connect(m.frontend.bound.outbound).await.expect("connect");
    let (ws, resp) = tokio_tungstenite::client_async("ws://payment/ws", stream).await.expect("WebSocket handshake");
    assert_eq!(resp.status(), 101);
    ws
}

/// One text message there and back (bounded: 10 s).
async fn ws_echo(ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>, text: &str) {
    ws.send(Message::text(text)).await.expect("send");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("an echo within 10 s")
            .expect("stream open")
            .expect("valid frame");
        if !matches!(msg, Message::Ping(_) | Message::Pong(_)) {
            assert_eq!(msg, Message::text(text));
            return;
        }
    }
}

/// `/echo` through the frontend on a new client connection; the XFCC `Hash=`
/// (the frontend certificate the payment sidecar saw).
async fn echo_hash(m: &Mesh) -> String {
    let (status, _, body) = get(m.frontend.bound.outbound, "payment", "/echo", &[]).await.expect("GET /echo");
    assert_eq!(status, 200, "body: {}", String::from_utf8_lossy(&body));
    xfcc_hash(&xfcc_of(&body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_load_loses_no_request_and_new_handshakes_present_the_new_certificate() {
    let m = mesh(&[STRICT.to_string()], &[]).await;
    let probe = mesh_client(&issue(&m.ca, "probe"));
    let old_payment_leaf = m.payment_cert.leaf().expect("leaf").clone();
    let old_frontend_hash = cert_hash(m.frontend_cert.leaf().expect("leaf"));

    // Before: the payment sidecar presents its first certificate, and the frontend's
    // certificate reaches the app in XFCC.
    let before = tls_get(m.payment.sidecar.bound.inbound, probe.clone()).await;
    assert!(before.ok(), "{:?}", before.response);
    assert_eq!(before.peer.first(), Some(&old_payment_leaf));
    assert_eq!(echo_hash(&m).await, old_frontend_hash);
    // A WebSocket opened before the rotation, on its own mTLS connection.
    let mut ws = websocket(&m).await;
    ws_echo(&mut ws, "before rotation").await;

    let load = Load::start(m.frontend.bound.outbound);
    load.wait_more(100).await;

    // Re-issue both identities (same CA, new keys and serials), written atomically.
    let new_payment = issue(&m.ca, "payment");
    let new_frontend = issue(&m.ca, "frontend");
    assert_ne!(new_payment.serial, m.payment_cert.serial);
    write_workload(m.payment_dir.path(), &new_payment).expect("write payment identity");
    write_workload(m.frontend_dir.path(), &new_frontend).expect("write frontend identity");

    // New handshakes present the new certificates.
    wait_server_cert(&m, &probe, new_payment.leaf().expect("leaf")).await;
    let new_frontend_serial = new_frontend.to_identity().expect("identity").serial().to_string();
    let frontend_identity = wait_dump_serial(&m.frontend, &new_frontend_serial).await;
    assert_eq!(frontend_identity["spiffe_id"], "spiffe://cluster.local/ns/default/sa/frontend");
    assert_eq!(frontend_identity["last_error"], serde_json::Value::Null, "{frontend_identity}");
    let new_payment_serial = new_payment.to_identity().expect("identity").serial().to_string();
    wait_dump_serial(&m.payment.sidecar, &new_payment_serial).await;

    // The load keeps going on its keep-alive connections after the rotation.
    load.wait_more(200).await;
    let (total, failures) = load.finish().await;
    assert!(
        failures.is_empty(),
        "{} of {total} requests failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );

    // Existing connections were not cut: the frontend's pooled HTTP/2 connection to
    // the payment sidecar still carries requests, with the certificate it was
    // opened with, and the WebSocket opened before the rotation still echoes.
    assert_eq!(echo_hash(&m).await, old_frontend_hash, "the pooled mTLS connection was replaced");
    ws_echo(&mut ws, "after rotation").await;
    ws.close(None).await.expect("close");
    // A WebSocket opened now (a new upstream mTLS handshake, new certificates on
    // both ends) works too.
    let mut fresh = websocket(&m).await;
    ws_echo(&mut fresh, "new connection").await;

    // Nothing was refused at the payment sidecar's inbound port.
    let metrics = m.payment.sidecar.scrape().await;
    assert_eq!(metric_sum(&metrics, "serin_inbound_connections_refused_total", &[]), 0.0, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_with_connection_churn_new_upstream_connections_present_the_new_client_certificate() {
    // Every 10 requests the frontend opens a new mTLS connection to the payment
    // sidecar, so handshakes happen all through the rotation.
    let churn = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: payment, namespace: default}\nspec:\n  host: payment.default.svc.cluster.local\n  trafficPolicy:\n    connectionPool: {http: {maxRequestsPerConnection: 10}}\n";
    let m = mesh(&[STRICT.to_string()], &[churn.to_string()]).await;
    let old_frontend_hash = cert_hash(m.frontend_cert.leaf().expect("leaf"));
    assert_eq!(echo_hash(&m).await, old_frontend_hash);

    let load = Load::start(m.frontend.bound.outbound);
    load.wait_more(100).await;
    let new_payment = issue(&m.ca, "payment");
    let new_frontend = issue(&m.ca, "frontend");
    write_workload(m.payment_dir.path(), &new_payment).expect("write payment identity");
    write_workload(m.frontend_dir.path(), &new_frontend).expect("write frontend identity");

    // Soon a new upstream connection carries the frontend's new certificate to the
    // payment sidecar (seen by the app as XFCC `Hash=`).
    let new_frontend_hash = cert_hash(new_frontend.leaf().expect("leaf"));
    let mut presented = false;
    for _ in 0..200 {
        let hash = echo_hash(&m).await;
        if hash == new_frontend_hash {
            presented = true;
            break;
        }
        assert_eq!(hash, old_frontend_hash, "XFCC carries an unknown certificate");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(presented, "no new upstream connection presented the frontend's new certificate within 10 s");
    let probe = mesh_client(&issue(&m.ca, "probe"));
    wait_server_cert(&m, &probe, new_payment.leaf().expect("leaf")).await;

    load.wait_more(200).await;
    let (total, failures) = load.finish().await;
    assert!(
        failures.is_empty(),
        "{} of {total} requests failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let metrics = m.payment.sidecar.scrape().await;
    assert_eq!(metric_sum(&metrics, "serin_inbound_connections_refused_total", &[]), 0.0, "{metrics}");
}

/// `/echo` through the frontend as an HTTP/1.1 upgrade request (carried upstream on
/// a new HTTP/1.1 mTLS connection of its own); the XFCC `Hash=` the app saw.
async fn upgrade_echo_hash(m: &Mesh) -> String {
    let headers = [("connection", "upgrade"), ("upgrade", "websocket")];
    let (status, _, body) = get(m.frontend.bound.outbound, "payment", "/echo", &headers).await.expect("GET /echo");
    assert_eq!(status, 200, "body: {}", String::from_utf8_lossy(&body));
    xfcc_hash(&xfcc_of(&body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_connections_present_the_current_certificate_after_each_rotation() {
    let m = mesh(&[STRICT.to_string()], &[]).await;
    assert_eq!(upgrade_echo_hash(&m).await, cert_hash(m.frontend_cert.leaf().expect("leaf")));
    // Several rotations, some of them with no upgrade in between.
    for round in 0..4 {
        let mut latest = None;
        for _ in 0..=round % 2 {
            let cert = issue(&m.ca, "frontend");
            write_workload(m.frontend_dir.path(), &cert).expect("write frontend identity");
            wait_dump_serial(&m.frontend, cert.to_identity().expect("identity").serial()).await;
            latest = Some(cert);
        }
        let latest = latest.expect("rotated");
        assert_eq!(
            upgrade_echo_hash(&m).await,
            cert_hash(latest.leaf().expect("leaf")),
            "round {round}: an upgrade used an old certificate"
        );
    }
}

/// Writes `cert` with the trust bundle `roots_pem` into `dir`; waits until
/// `sidecar`'s `/config_dump` shows the new serial.
async fn install(sidecar: &Sidecar, dir: &std::path::Path, cert: &serin_certs::IssuedCert, roots_pem: &str) {
    serin_certs::write_workload_pem(dir, cert.key_pem.as_bytes(), cert.chain_pem().as_bytes(), roots_pem.as_bytes())
        .expect("write identity");
    let identity = serin_certs::WorkloadIdentity::from_pem(
        cert.key_pem.as_bytes(),
        cert.chain_pem().as_bytes(),
        roots_pem.as_bytes(),
    )
    .expect("identity");
    let dump = wait_dump_serial(sidecar, identity.serial()).await;
    assert_eq!(dump["last_error"], serde_json::Value::Null, "{dump}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_rotation_through_a_two_root_bundle_loses_no_request() {
    // New upstream connections all along (every 10 requests), so handshakes
    // between old and new certificates happen while the roots change.
    let churn = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: payment, namespace: default}\nspec:\n  host: payment.default.svc.cluster.local\n  trafficPolicy:\n    connectionPool: {http: {maxRequestsPerConnection: 10}}\n";
    let m = mesh(&[STRICT.to_string()], &[churn.to_string()]).await;
    let new_ca = serin_certs::Ca::generate("cluster.local").expect("new ca");
    let both = format!("{}{}", m.ca.roots_pem(), new_ca.roots_pem());
    let load = Load::start(m.frontend.bound.outbound);
    load.wait_more(50).await;

    // 1. Both sidecars trust both roots (leaves still from the old CA).
    install(&m.payment.sidecar, m.payment_dir.path(), &issue(&m.ca, "payment"), &both).await;
    install(&m.frontend, m.frontend_dir.path(), &issue(&m.ca, "frontend"), &both).await;
    load.wait_more(50).await;
    // 2. Leaves from the new CA, one side after the other.
    install(&m.payment.sidecar, m.payment_dir.path(), &issue(&new_ca, "payment"), &both).await;
    load.wait_more(50).await;
    install(&m.frontend, m.frontend_dir.path(), &issue(&new_ca, "frontend"), &both).await;
    load.wait_more(50).await;
    // 3. The old root is dropped.
    let only_new = new_ca.roots_pem();
    install(&m.payment.sidecar, m.payment_dir.path(), &issue(&new_ca, "payment"), &only_new).await;
    install(&m.frontend, m.frontend_dir.path(), &issue(&new_ca, "frontend"), &only_new).await;
    load.wait_more(50).await;

    let (total, failures) = load.finish().await;
    assert!(
        failures.is_empty(),
        "{} of {total} requests failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    // A client of the new CA only is accepted; one of the old CA is not any more.
    let exchange = tls_get(m.payment.sidecar.bound.inbound, mesh_client(&issue(&new_ca, "probe"))).await;
    assert!(exchange.ok(), "{:?}", exchange.response);
    let exchange = tls_get(m.payment.sidecar.bound.inbound, mesh_client(&issue(&m.ca, "probe"))).await;
    assert!(exchange.response.is_err(), "a client of the dropped root got through: {exchange:?}");
}
