//! Helpers shared by the `mtls_*` tests: a two-sidecar mesh (frontend sidecar →
//! mTLS → payment sidecar → demo app) with certificates from the test's own CA,
//! and a raw rustls client for handshakes straight to an inbound port.

#![allow(dead_code)] // each test file uses a part of these helpers

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serin::demo_app::{AppConfig, DemoApp};
use serin::sidecar::SidecarArgs;
use serin::upstream::split::SplitMode;
use serin_certs::rustls::pki_types::{CertificateDer, ServerName};
use serin_certs::rustls::{self, ClientConfig, RootCertStore};
use serin_certs::{Ca, IssuedCert, MeshServerVerifier, SpiffeId, WorkloadIdentity, crypto_provider, write_workload};
use serin_tests::*;

/// PeerAuthentication STRICT for namespace `default`.
pub const STRICT: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: default}\nspec: {mtls: {mode: STRICT}}\n";

/// `spiffe://cluster.local/ns/default/sa/<sa>`.
pub fn spiffe(sa: &str) -> SpiffeId {
    format!("spiffe://cluster.local/ns/default/sa/{sa}").parse().expect("spiffe id")
}

/// A certificate for service account `sa`, valid from a minute ago for an hour.
pub fn issue(ca: &Ca, sa: &str) -> IssuedCert {
    ca.issue(&spiffe(sa), Duration::from_secs(3600)).expect("issue")
}

/// A certificate for `sa` valid from `now + from` to `now + to` (seconds, may be negative).
pub fn issue_between(ca: &Ca, sa: &str, from: i64, to: i64) -> IssuedCert {
    let at = |s: i64| {
        let now = SystemTime::now();
        if s >= 0 { now + Duration::from_secs(s.unsigned_abs()) } else { now - Duration::from_secs(s.unsigned_abs()) }
    };
    ca.issue_with_validity(&spiffe(sa), at(from), at(to)).expect("issue with validity")
}

/// A temporary identity directory holding `cert`.
pub fn cert_dir(cert: &IssuedCert) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    write_workload(dir.path(), cert).expect("write identity");
    dir
}

/// The registry entry of a meshed payment pod (port protocol `HTTP`) behind its
/// inbound sidecar, with service account `service_account`.
pub fn meshed_registry(inbound: SocketAddr, service_account: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: payment, namespace: default}}\nspec:\n  hosts: [payment.default.svc.cluster.local]\n  resolution: STATIC\n  ports: [{{number: 8080, name: http, protocol: HTTP}}]\n  endpoints:\n  - address: {}\n    ports: {{http: {}}}\n    serviceAccount: {service_account}\n    labels: {{app: payment, version: v1, security.istio.io/tlsMode: istio}}\n",
        inbound.ip(),
        inbound.port()
    )
}

/// The options of a test sidecar (every port ephemeral, no access log).
pub fn sidecar_args(config: PathBuf, cert_dir: Option<PathBuf>) -> SidecarArgs {
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    SidecarArgs {
        config: Some(config),
        outbound: any,
        inbound: any,
        app: "127.0.0.1:8080".parse().expect("addr"),
        admin: any,
        metrics: any,
        health: any,
        workload: "frontend".into(),
        namespace: "default".into(),
        app_label: "frontend".into(),
        app_version: "v1".into(),
        no_access_log: true,
        cert_dir,
        split: SplitMode::Exact,
        drain_timeout: Duration::from_secs(2),
        idle_timeout: serin::idle::DEFAULT_IDLE_TIMEOUT,
        concurrency: 0,
        outbound_traffic_policy: Default::default(),
        control_plane: Default::default(),
    }
}

/// A payment pod: the demo app and its inbound sidecar (identity from `dir`).
pub struct PaymentPod {
    pub app: DemoApp,
    pub sidecar: Sidecar,
}

/// Starts the payment app and its sidecar with `docs` (PeerAuthentication,
/// AuthorizationPolicy, …) and the identity in `dir`.
pub async fn start_payment(docs: &[String], dir: PathBuf) -> PaymentPod {
    let app = DemoApp::start("127.0.0.1:0".parse().expect("addr"), AppConfig::new("payment", "v1")).await.expect("app");
    let app_addr = app.addr();
    let sidecar = Sidecar::start_args(docs, |a| {
        a.app = app_addr;
        a.cert_dir = Some(dir);
        a.workload = "payment-v1".into();
        a.app_label = "payment".into();
    })
    .await;
    PaymentPod { app, sidecar }
}

/// Starts a frontend sidecar (identity from `dir`) whose registry has the payment
/// pod at `inbound` with service account `payment`, plus `extra` documents.
pub async fn start_frontend(inbound: SocketAddr, dir: PathBuf, extra: &[String]) -> Sidecar {
    let mut docs = vec![meshed_registry(inbound, "payment")];
    docs.extend_from_slice(extra);
    Sidecar::start_args(&docs, |a| a.cert_dir = Some(dir)).await
}

/// A frontend and a payment pod with certificates from one CA.
pub struct Mesh {
    pub ca: Ca,
    pub payment: PaymentPod,
    pub frontend: Sidecar,
    pub payment_dir: tempfile::TempDir,
    pub frontend_dir: tempfile::TempDir,
    pub payment_cert: IssuedCert,
    pub frontend_cert: IssuedCert,
}

/// A new CA, a payment pod with `payment_docs` and a frontend with `frontend_extra`.
pub async fn mesh(payment_docs: &[String], frontend_extra: &[String]) -> Mesh {
    let ca = Ca::generate("cluster.local").expect("ca");
    let (payment_cert, frontend_cert) = (issue(&ca, "payment"), issue(&ca, "frontend"));
    let (payment_dir, frontend_dir) = (cert_dir(&payment_cert), cert_dir(&frontend_cert));
    let payment = start_payment(payment_docs, payment_dir.path().to_path_buf()).await;
    let frontend =
        start_frontend(payment.sidecar.bound.inbound, frontend_dir.path().to_path_buf(), frontend_extra).await;
    Mesh { ca, payment, frontend, payment_dir, frontend_dir, payment_cert, frontend_cert }
}

/// A rustls client config that trusts `trust`'s roots (verifying the server's chain,
/// not its name) and presents `present`'s certificate, whatever CA issued it.
/// ALPN `http/1.1`, TLS 1.3 and 1.2.
pub fn client_presenting(trust: &WorkloadIdentity, present: &WorkloadIdentity) -> Arc<ClientConfig> {
    client_with_roots(trust.root_store().clone(), present)
}

/// As [`client_presenting`], trusting `roots`.
pub fn client_with_roots(roots: Arc<RootCertStore>, present: &WorkloadIdentity) -> Arc<ClientConfig> {
    client_with_versions(roots, present, &[&rustls::version::TLS13, &rustls::version::TLS12])
}

/// As [`client_presenting`], speaking TLS 1.2 only.
pub fn tls12_client_presenting(trust: &WorkloadIdentity, present: &WorkloadIdentity) -> Arc<ClientConfig> {
    client_with_versions(trust.root_store().clone(), present, &[&rustls::version::TLS12])
}

fn client_with_versions(
    roots: Arc<RootCertStore>,
    present: &WorkloadIdentity,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    let mut config = ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(versions)
        .expect("protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(MeshServerVerifier::new(roots)))
        .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(present.certified_key().clone())));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// A client config that trusts `trust`'s roots and presents no certificate.
pub fn client_without_certificate(trust: &WorkloadIdentity) -> Arc<ClientConfig> {
    let mut config = ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(MeshServerVerifier::new(trust.root_store().clone())))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// A mesh client config for `cert` (its own CA's roots), ALPN `http/1.1`.
pub fn mesh_client(cert: &IssuedCert) -> Arc<ClientConfig> {
    let identity = cert.to_identity().expect("identity");
    serin_certs::client_config(&identity, &[serin_certs::ALPN_HTTP11]).expect("client config")
}

/// What a raw TLS exchange with an inbound port gave.
#[derive(Debug)]
pub struct TlsExchange {
    /// The server's certificates (leaf first), when the handshake got that far.
    pub peer: Vec<CertificateDer<'static>>,
    /// The HTTP response text, or why there was none.
    pub response: Result<String, String>,
}

impl TlsExchange {
    /// Whether an HTTP 200 came back.
    pub fn ok(&self) -> bool {
        self.response.as_deref().is_ok_and(|r| r.starts_with("HTTP/1.1 200"))
    }
}

/// A TLS handshake with `addr` (blocking rustls on a blocking thread, 10 s socket
/// timeouts), then `GET /` with `Connection: close`, read to the end.
pub async fn tls_get(addr: SocketAddr, config: Arc<ClientConfig>) -> TlsExchange {
    tokio::task::spawn_blocking(move || tls_get_blocking(addr, config)).await.expect("TLS client thread")
}

fn tls_get_blocking(addr: SocketAddr, config: Arc<ClientConfig>) -> TlsExchange {
    let mut exchange = TlsExchange { peer: Vec::new(), response: Err("not connected".into()) };
    let mut sock = match std::net::TcpStream::connect(addr) {
        Ok(s) => s,
        Err(e) => {
            exchange.response = Err(format!("connect: {e}"));
            return exchange;
        }
    };
    let timeout = Some(Duration::from_secs(10));
    sock.set_read_timeout(timeout).expect("read timeout");
    sock.set_write_timeout(timeout).expect("write timeout");
    let name = ServerName::IpAddress(addr.ip().into());
    let mut conn = rustls::ClientConnection::new(config, name).expect("client connection");
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut sock) {
            exchange.response = Err(format!("handshake: {e}"));
            return exchange;
        }
    }
    exchange.peer = conn.peer_certificates().unwrap_or_default().iter().map(|c| c.clone().into_owned()).collect();
    let mut tls = rustls::Stream::new(&mut conn, &mut sock);
    if let Err(e) = tls.write_all(b"GET / HTTP/1.1\r\nhost: payment\r\nconnection: close\r\n\r\n") {
        exchange.response = Err(format!("write: {e}"));
        return exchange;
    }
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tls.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            // A close without close_notify after a whole response is still a response.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !out.is_empty() => break,
            Err(e) => {
                exchange.response = Err(format!("read: {e}"));
                return exchange;
            }
        }
    }
    exchange.response = Ok(String::from_utf8_lossy(&out).into_owned());
    exchange
}

/// The `x-forwarded-client-cert` header the app saw on a `/echo` request.
pub fn xfcc_of(body: &[u8]) -> String {
    echo_json(body)["headers"]["x-forwarded-client-cert"].as_str().unwrap_or_default().to_string()
}

/// The `Hash=` field of an XFCC value.
pub fn xfcc_hash(xfcc: &str) -> String {
    xfcc.split(';').find_map(|part| part.strip_prefix("Hash=")).unwrap_or_default().to_string()
}

/// SHA-256 of a certificate, lowercase hex: XFCC's `Hash=` of that certificate.
pub fn cert_hash(cert: &CertificateDer<'_>) -> String {
    let suite = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256;
    let hash = suite.tls13().expect("a TLS 1.3 suite").common.hash_provider.hash(cert.as_ref());
    hash.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The `/config_dump` `identity` section of `sidecar`.
pub async fn identity_dump(sidecar: &Sidecar) -> serde_json::Value {
    sidecar.admin_json("/config_dump").await["identity"].clone()
}
