//! Peers the mesh must refuse (issue 3, item 8): a client certificate from another
//! CA, expired or not yet valid (or none at all) is refused by the inbound
//! handshake and counted;
//! a payment sidecar presenting an expired, not-yet-valid or foreign certificate
//! makes the frontend answer 503 with flag UF. (A wrong identity from the right
//! CA is covered in `mtls.rs`.)

mod mtls_common;

use std::time::{Duration, SystemTime};

use mtls_common::*;
use serin_certs::Ca;
use serin_tests::*;

const REFUSED: &str = "serin_inbound_connections_refused_total";

/// Waits (bounded: 10 s) until the payment sidecar has refused `n` handshakes.
async fn wait_refused(sidecar: &Sidecar, n: f64) -> String {
    let text = wait_metric(sidecar, REFUSED, &[("reason", "tls_handshake")], n).await;
    assert_eq!(metric_sum(&text, REFUSED, &[("reason", "tls_handshake")]), n, "{text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_refuses_foreign_expired_not_yet_valid_and_missing_client_certificates() {
    let m = mesh(&[STRICT.to_string()], &[]).await;
    let inbound = m.payment.sidecar.bound.inbound;
    let mesh_identity = issue(&m.ca, "frontend").to_identity().expect("identity");

    // A valid client of the mesh CA gets through: the client side is sound.
    let good = tls_get(inbound, client_presenting(&mesh_identity, &mesh_identity)).await;
    assert!(good.ok(), "{:?}", good.response);

    let other_ca = Ca::generate("cluster.local").expect("other ca");
    let cases = [
        ("another CA", issue(&other_ca, "frontend")),
        ("expired", issue_between(&m.ca, "frontend", -7200, -3600)),
        ("not yet valid", issue_between(&m.ca, "frontend", 3600, 7200)),
    ];
    let mut refused = 0.0;
    for (what, cert) in &cases {
        // The client trusts the mesh roots (so it accepts the server) and presents
        // the bad certificate, over TLS 1.3 and over TLS 1.2.
        let present = cert.to_identity().expect("identity");
        for (version, config) in [
            ("TLS 1.3", client_presenting(&mesh_identity, &present)),
            ("TLS 1.2", tls12_client_presenting(&mesh_identity, &present)),
        ] {
            let exchange = tls_get(inbound, config).await;
            assert!(exchange.response.is_err(), "{what}, {version}: a refused client got an answer: {exchange:?}");
            refused += 1.0;
            wait_refused(&m.payment.sidecar, refused).await;
        }
    }

    // A TLS client with no certificate at all.
    let exchange = tls_get(inbound, client_without_certificate(&mesh_identity)).await;
    assert!(exchange.response.is_err(), "a client without a certificate got an answer: {exchange:?}");
    refused += 1.0;
    wait_refused(&m.payment.sidecar, refused).await;

    // Nothing reached the app, and good clients still get through, TLS 1.2 too.
    let metrics = m.payment.sidecar.scrape().await;
    assert_eq!(metric_sum(&metrics, "istio_requests_total", &[("reporter", "destination")]), 1.0, "{metrics}");
    let good = tls_get(inbound, client_presenting(&mesh_identity, &mesh_identity)).await;
    assert!(good.ok(), "{:?}", good.response);
    let good = tls_get(inbound, tls12_client_presenting(&mesh_identity, &mesh_identity)).await;
    assert!(good.ok(), "TLS 1.2: {:?}", good.response);
    wait_refused(&m.payment.sidecar, refused).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_with_a_not_yet_valid_certificate_is_refused_by_its_peer() {
    // The frontend's own certificate starts in an hour (it loads, with a warning):
    // the payment sidecar refuses it, and the request fails without reaching the app.
    // (With TLS 1.3 the client's side of the handshake is done before the server
    // judges its certificate, so the frontend sees a reset, flag UC, as Envoy does.)
    let ca = Ca::generate("cluster.local").expect("ca");
    let payment_dir = cert_dir(&issue(&ca, "payment"));
    let frontend_dir = cert_dir(&issue_between(&ca, "frontend", 3600, 7200));
    let payment = start_payment(&[STRICT.to_string()], payment_dir.path().to_path_buf()).await;
    let frontend = start_frontend(payment.sidecar.bound.inbound, frontend_dir.path().to_path_buf(), &[]).await;
    let (status, _, body) = get(frontend.bound.outbound, "payment", "/", &[]).await.expect("an answer");
    assert_eq!(status, 503, "body: {}", String::from_utf8_lossy(&body));
    // Each connection attempt is refused (the frontend may retry a request that
    // never left: one to three handshakes).
    wait_metric(&payment.sidecar, REFUSED, &[("reason", "tls_handshake")], 1.0).await;
    let metrics = payment.sidecar.scrape().await;
    assert_eq!(metric_sum(&metrics, "istio_requests_total", &[("reporter", "destination")]), 0.0, "{metrics}");
}

/// A frontend sidecar (identity from the mesh CA `ca`) in front of a payment
/// sidecar presenting `payment_cert`; one request must fail with 503 UF.
async fn assert_frontend_refuses(ca: &Ca, payment_cert: &serin_certs::IssuedCert) {
    let payment_dir = cert_dir(payment_cert);
    let frontend_dir = cert_dir(&issue(ca, "frontend"));
    let payment = start_payment(&[STRICT.to_string()], payment_dir.path().to_path_buf()).await;
    let frontend = start_frontend(payment.sidecar.bound.inbound, frontend_dir.path().to_path_buf(), &[]).await;
    for _ in 0..3 {
        let (status, _, body) = get(frontend.bound.outbound, "payment", "/", &[]).await.expect("an answer");
        assert_eq!(status, 503, "body: {}", String::from_utf8_lossy(&body));
    }
    let text = frontend.wait_metric("istio_requests_total", Some("UF"), &[("response_code", "503")], 3.0).await;
    assert_eq!(metric_sum(&text, "istio_requests_total", &[("response_code", "200")]), 0.0, "{text}");
    // The payment app never saw a request.
    let metrics = payment.sidecar.scrape().await;
    assert_eq!(metric_sum(&metrics, "istio_requests_total", &[("reporter", "destination")]), 0.0, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frontend_refuses_a_server_from_another_ca_with_503_uf() {
    let ca = Ca::generate("cluster.local").expect("ca");
    let other_ca = Ca::generate("cluster.local").expect("other ca");
    assert_frontend_refuses(&ca, &issue(&other_ca, "payment")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frontend_refuses_a_server_whose_certificate_is_not_yet_valid_with_503_uf() {
    let ca = Ca::generate("cluster.local").expect("ca");
    assert_frontend_refuses(&ca, &issue_between(&ca, "payment", 3600, 7200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frontend_refuses_an_expired_server_with_503_uf_and_the_server_reports_it() {
    // A sidecar does not start with an expired certificate, so the payment sidecar
    // gets one that expires two seconds after it starts.
    let ca = Ca::generate("cluster.local").expect("ca");
    let cert = issue_between(&ca, "payment", -3600, 2);
    // X.509 times have whole seconds: wait until a second past the end.
    let expired_at = cert.not_after + Duration::from_secs(1);
    let payment_dir = cert_dir(&cert);
    let frontend_dir = cert_dir(&issue(&ca, "frontend"));
    let payment = start_payment(&[STRICT.to_string()], payment_dir.path().to_path_buf()).await;
    let frontend = start_frontend(payment.sidecar.bound.inbound, frontend_dir.path().to_path_buf(), &[]).await;
    for _ in 0..100 {
        if SystemTime::now() > expired_at {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(SystemTime::now() > expired_at, "the payment certificate has not expired yet");
    for _ in 0..3 {
        let (status, _, body) = get(frontend.bound.outbound, "payment", "/", &[]).await.expect("an answer");
        assert_eq!(status, 503, "body: {}", String::from_utf8_lossy(&body));
    }
    frontend.wait_metric("istio_requests_total", Some("UF"), &[("response_code", "503")], 3.0).await;
    let metrics = payment.sidecar.scrape().await;
    assert_eq!(metric_sum(&metrics, "istio_requests_total", &[("reporter", "destination")]), 0.0, "{metrics}");

    // The payment sidecar says so in /config_dump (bounded: 10 s).
    let mut identity = serde_json::Value::Null;
    for _ in 0..200 {
        identity = identity_dump(&payment.sidecar).await;
        if identity["last_error"].as_str().is_some_and(|e| e.contains("expired")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(identity["last_error"].as_str().is_some_and(|e| e.contains("expired")), "identity: {identity}");
}
