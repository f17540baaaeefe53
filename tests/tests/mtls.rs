//! Mutual TLS between two real sidecars: client → outbound sidecar → mTLS →
//! inbound sidecar → app, with SPIFFE identities from the mesh CA, STRICT
//! PeerAuthentication, AuthorizationPolicy, and `x-forwarded-client-cert`.

use std::path::Path;
use std::time::Duration;

use serin::demo_app::{AppConfig, DemoApp};
use serin_certs::{Ca, SpiffeId, write_workload};
use serin_tests::*;

/// Issues `spiffe://cluster.local/ns/default/sa/<sa>` into `dir`.
fn issue(ca: &Ca, sa: &str, dir: &Path) {
    let id: SpiffeId = format!("spiffe://cluster.local/ns/default/sa/{sa}").parse().expect("spiffe id");
    let cert = ca.issue(&id, Duration::from_secs(3600)).expect("issue");
    write_workload(dir, &cert).expect("write identity");
}

/// The registry entry of a meshed payment pod behind its inbound sidecar.
fn meshed_registry(inbound: std::net::SocketAddr, service_account: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: payment, namespace: default}}\nspec:\n  hosts: [payment.default.svc.cluster.local]\n  resolution: STATIC\n  ports: [{{number: 8080, name: http, protocol: HTTP}}]\n  endpoints:\n  - address: {}\n    ports: {{http: {}}}\n    serviceAccount: {service_account}\n    labels: {{app: payment, version: v1, security.istio.io/tlsMode: istio}}\n",
        inbound.ip(),
        inbound.port()
    )
}

const STRICT: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: default}\nspec: {mtls: {mode: STRICT}}\n";

struct Mesh {
    _app: DemoApp,
    _dirs: Vec<tempfile::TempDir>,
    payment: Sidecar,
    frontend: Sidecar,
}

/// A payment pod (app + STRICT inbound sidecar, identity `payment`) and a
/// frontend sidecar (identity `frontend`) whose registry names the payment
/// pod's service account `expected_sa`.
async fn mesh(payment_policy: &[String], expected_sa: &str) -> Mesh {
    let ca = Ca::generate("cluster.local").expect("ca");
    let (pay_dir, front_dir) = (tempfile::tempdir().expect("tmp"), tempfile::tempdir().expect("tmp"));
    issue(&ca, "payment", pay_dir.path());
    issue(&ca, "frontend", front_dir.path());
    let app = DemoApp::start("127.0.0.1:0".parse().expect("addr"), AppConfig::new("payment", "v1")).await.expect("app");
    let pay_cert_dir = pay_dir.path().to_path_buf();
    let payment = Sidecar::start_args(payment_policy, |a| {
        a.app = app.addr();
        a.cert_dir = Some(pay_cert_dir);
        a.workload = "payment-v1".into();
        a.app_label = "payment".into();
    })
    .await;
    let front_cert_dir = front_dir.path().to_path_buf();
    let frontend = Sidecar::start_args(&[meshed_registry(payment.bound.inbound, expected_sa)], |a| {
        a.cert_dir = Some(front_cert_dir);
    })
    .await;
    Mesh { _app: app, _dirs: vec![pay_dir, front_dir], payment, frontend }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sidecars_talk_mutual_tls_and_strict_refuses_plaintext() {
    let m = mesh(&[STRICT.to_string()], "payment").await;
    // HTTP/1.1 from the app, carried as HTTP/2 over mTLS between the sidecars.
    let mut client = Client::connect(m.frontend.bound.outbound, "payment").await;
    for _ in 0..20 {
        let (status, body) = client.get("/", &[]).await;
        assert_eq!(status, 200, "body: {}", String::from_utf8_lossy(&body));
        assert_eq!(version_of(&body).as_deref(), Some("v1"));
    }
    // The app sees the caller's identity in Envoy's XFCC format.
    let (status, body) = client.get("/echo", &[("x-forwarded-client-cert", "By=forged")]).await;
    assert_eq!(status, 200);
    let echo = String::from_utf8_lossy(&body);
    assert!(echo.contains("URI=spiffe://cluster.local/ns/default/sa/frontend"), "echo: {echo}");
    assert!(echo.contains("By=spiffe://cluster.local/ns/default/sa/payment"), "echo: {echo}");
    assert!(!echo.contains("By=forged"), "a caller's own XFCC must not reach the app: {echo}");
    // h2c from the app works the same way.
    let (ok, out) =
        curl(&["--http2-prior-knowledge", "-H", "Host: payment", &format!("http://{}/", m.frontend.bound.outbound)]);
    assert!(ok && out.contains("\"version\":\"v1\""), "curl h2c: {out}");

    let metrics = m.payment.scrape().await;
    let mtls = metric_sum(
        &metrics,
        "istio_requests_total",
        &[
            ("reporter", "destination"),
            ("connection_security_policy", "mutual_tls"),
            ("source_principal", "spiffe://cluster.local/ns/default/sa/frontend"),
            ("destination_principal", "spiffe://cluster.local/ns/default/sa/payment"),
        ],
    );
    assert_eq!(mtls, 22.0, "metrics:\n{metrics}");

    // Plaintext straight to the STRICT inbound port: closed, and counted.
    let plain = get(m.payment.bound.inbound, "payment", "/", &[]).await;
    assert!(plain.is_err(), "plaintext to a STRICT port must fail, got {plain:?}");
    let metrics = m.payment.scrape().await;
    assert_eq!(metric_sum(&metrics, "serin_inbound_connections_refused_total", &[("reason", "plaintext_strict")]), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_server_identity_fails_with_uf() {
    let m = mesh(&[STRICT.to_string()], "someone-else").await;
    let (status, _, body) = get(m.frontend.bound.outbound, "payment", "/", &[]).await.expect("answer");
    assert_eq!(status, 503, "body: {}", String::from_utf8_lossy(&body));
    let metrics = m.frontend.scrape().await;
    let uf =
        metrics.lines().filter(|l| l.starts_with("istio_requests_total{") && l.contains("response_flags=\"UF")).count();
    assert!(uf > 0, "metrics:\n{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_policy_allows_and_denies() {
    let allow_frontend_get_v1 = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: payment-allow, namespace: default}\nspec:\n  selector: {matchLabels: {app: payment}}\n  action: ALLOW\n  rules:\n  - from: [{source: {principals: [cluster.local/ns/default/sa/frontend]}}]\n    to: [{operation: {methods: [GET], paths: [/v1/*]}}]\n";
    let deny_debug = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-debug, namespace: default}\nspec:\n  action: DENY\n  rules:\n  - to: [{operation: {paths: [/v1/debug*]}}]\n";
    let m = mesh(&[STRICT.to_string(), allow_frontend_get_v1.to_string(), deny_debug.to_string()], "payment").await;
    let mut client = Client::connect(m.frontend.bound.outbound, "payment").await;
    let (status, _) = client.get("/v1/pay", &[]).await;
    assert_eq!(status, 200);
    let (status, body) = client.get("/other", &[]).await;
    assert_eq!((status.as_u16(), &body[..]), (403, &b"RBAC: access denied"[..]));
    let (status, _) = client.get("/v1/debug/vars", &[]).await;
    assert_eq!(status, 403, "DENY wins over ALLOW");
    let metrics = m.payment.scrape().await;
    assert_eq!(
        metric_sum(&metrics, "istio_requests_total", &[("reporter", "destination"), ("response_flags", "RBAC")]),
        2.0,
        "metrics:\n{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_accepts_both_on_one_port() {
    let m = mesh(&[], "payment").await;
    let (status, _, _) = get(m.frontend.bound.outbound, "payment", "/", &[]).await.expect("via mTLS");
    assert_eq!(status, 200);
    let (status, _, _) = get(m.payment.bound.inbound, "payment", "/", &[]).await.expect("plaintext");
    assert_eq!(status, 200);
    let metrics = m.payment.scrape().await;
    let by = |policy| {
        metric_sum(
            &metrics,
            "istio_requests_total",
            &[("reporter", "destination"), ("connection_security_policy", policy)],
        )
    };
    assert_eq!((by("mutual_tls"), by("none")), (1.0, 1.0), "metrics:\n{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_with_a_mesh_client_certificate_reaches_the_inbound_port() {
    let m = mesh(&[STRICT.to_string()], "payment").await;
    // The frontend's identity, issued by the mesh CA that also signed the payment sidecar.
    let front = m._dirs[1].path();
    let url = format!("https://{}/echo", m.payment.bound.inbound);
    let cert = front.join("cert-chain.pem");
    let key = front.join("key.pem");
    let root = front.join("root-cert.pem");
    // Mesh certificates carry a SPIFFE URI, not a DNS name, so curl cannot check
    // the server's name (-k); the chain is still checked by the sidecar, and
    // the client certificate is what is under test.
    let (ok, out) = curl(&[
        "-k",
        "--cacert",
        root.to_str().expect("path"),
        "--cert",
        cert.to_str().expect("path"),
        "--key",
        key.to_str().expect("path"),
        "-H",
        "Host: payment",
        &url,
    ]);
    assert!(ok, "curl with a client certificate failed: {out}");
    assert!(out.contains("URI=spiffe://cluster.local/ns/default/sa/frontend"), "echo: {out}");
    // Without a client certificate the handshake is refused.
    let (ok, out) = curl(&["-k", "-H", "Host: payment", &url]);
    assert!(!ok, "a TLS client without a certificate must be refused: {out}");
}
