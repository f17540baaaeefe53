//! Certificate rotation at the gateway: replacing the files of a
//! `credentialName` secret (`--credentials-dir`) makes new handshakes present
//! the new certificate while an open keep-alive connection keeps working; a bad
//! new file keeps the old certificate and shows in `/config_dump`.

mod gateway_support;

use gateway_support::{Pki, TempDir, admin_get, presented_cert, service_entry, wait_for, write_atomic};
use serin::demo_app::{AppConfig, DemoApp};
use serin::gateway::GatewayArgs;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_certificates_serve_new_handshakes_and_bad_files_are_refused() {
    let dir = TempDir::new("rotation");
    let pki = Pki::new("rotation CA");
    let secret = dir.path().join("secrets").join("pay-cert");
    let v1 = pki.server(&["pay.example.com"], 1001);
    write_atomic(&secret.join("tls.crt"), &v1.cert_pem);
    write_atomic(&secret.join("tls.key"), &v1.key_pem);
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
