//! Real rustls handshakes on 127.0.0.1 between configs built from issued identities: mutual
//! TLS succeeds with both identities visible, and every bad peer is refused.

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::{connect, exchange, frontend, id, payment, serve, tempdir};
use rcgen::{CertificateParams, KeyPair};
use serin_certs::rustls::pki_types::CertificateDer;
use serin_certs::rustls::version::{TLS12, TLS13};
use serin_certs::rustls::{CipherSuite, ClientConfig, ProtocolVersion, RootCertStore};
use serin_certs::{
    ALPN_H2, ALPN_HTTP11, Ca, ClientAuth, DEFAULT_WORKLOAD_LIFETIME, MESH_ALPN, MeshServerVerifier, PeerIdentityError,
    SniResolver, WorkloadIdentity, client_config, crypto_provider, load_certified_key, server_config,
    server_config_from_files, verify_peer_identity,
};
use tokio::io::AsyncWriteExt;

fn identity(ca: &Ca, who: &serin_certs::SpiffeId) -> WorkloadIdentity {
    ca.issue(who, DEFAULT_WORKLOAD_LIFETIME).unwrap().to_identity().unwrap()
}

fn issued_with(ca: &Ca, who: &serin_certs::SpiffeId, from_now: i64, to_now: i64) -> WorkloadIdentity {
    let now = SystemTime::now();
    let at = |secs: i64| {
        if secs >= 0 { now + Duration::from_secs(secs as u64) } else { now - Duration::from_secs(secs.unsigned_abs()) }
    };
    ca.issue_with_validity(who, at(from_now), at(to_now)).unwrap().to_identity().unwrap()
}

#[tokio::test]
async fn mutual_tls_between_two_identities() {
    let ca = Ca::generate("cluster.local").unwrap();
    let server = identity(&ca, &payment());
    let client = identity(&ca, &frontend());
    let outcome = exchange(
        server_config(&server, ClientAuth::Required, MESH_ALPN).unwrap(),
        client_config(&client, MESH_ALPN).unwrap(),
        // Any name: the mesh verifier ignores it (the cert has no DNS SAN at all).
        "payment.default.svc.cluster.local",
    )
    .await;
    let s = outcome.server.expect("server side");
    let c = outcome.client.expect("client side");
    assert_eq!(s.peer_id, Some(frontend()), "server sees the caller's SPIFFE ID");
    assert_eq!(c.peer_id, Some(payment()), "client sees the server's SPIFFE ID");
    assert_eq!(c.alpn.as_deref(), Some(ALPN_H2));
    assert_eq!(c.version, Some(ProtocolVersion::TLSv1_3));
    // Envoy's (BoringSSL's) preference on AES hardware, not rustls's AES-256 first.
    assert_eq!(c.suite, Some(CipherSuite::TLS13_AES_128_GCM_SHA256));
    assert_eq!(s.suite, c.suite);
    assert_eq!(verify_peer_identity(&c.peer_certs, &[payment()]), Ok(payment()));
    assert_eq!(verify_peer_identity(&s.peer_certs, &[]), Ok(frontend()));
    assert_eq!(s.peer_id.unwrap().principal(), "cluster.local/ns/default/sa/frontend");
}

#[tokio::test]
async fn mutual_tls_by_ip_and_http11_alpn() {
    let ca = Ca::generate("cluster.local").unwrap();
    let server = identity(&ca, &payment());
    let client = identity(&ca, &frontend());
    let outcome = exchange(
        server_config(&server, ClientAuth::Required, MESH_ALPN).unwrap(),
        client_config(&client, &[ALPN_HTTP11]).unwrap(),
        "127.0.0.1",
    )
    .await;
    let c = outcome.client.expect("client side");
    assert_eq!(c.alpn.as_deref(), Some(ALPN_HTTP11));
    assert!(outcome.server.is_ok());
}

#[tokio::test]
async fn tls12_is_accepted() {
    let ca = Ca::generate("cluster.local").unwrap();
    let server = identity(&ca, &payment());
    let client = identity(&ca, &frontend());
    let config = ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&TLS12])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(MeshServerVerifier::new(client.root_store().clone())))
        .with_client_cert_resolver(Arc::new(serin_certs::rustls::sign::SingleCertAndKey::from(
            client.certified_key().clone(),
        )));
    let outcome =
        exchange(server_config(&server, ClientAuth::Required, MESH_ALPN).unwrap(), Arc::new(config), "payment").await;
    let c = outcome.client.expect("client");
    assert_eq!(c.version, Some(ProtocolVersion::TLSv1_2));
    assert_eq!(c.suite, Some(CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256));
    assert_eq!(outcome.server.expect("server").peer_id, Some(frontend()));
}

#[tokio::test]
async fn plug_in_intermediate_chain_handshakes() {
    let root = Ca::generate("cluster.local").unwrap();
    let inter = root.issue_intermediate(Duration::from_secs(3600)).unwrap();
    let server = identity(&inter, &payment());
    // The client may even come from the root directly: both chain to the same root.
    let client = identity(&root, &frontend());
    let outcome = exchange(
        server_config(&server, ClientAuth::Required, MESH_ALPN).unwrap(),
        client_config(&client, MESH_ALPN).unwrap(),
        "payment",
    )
    .await;
    assert!(outcome.both_ok(), "{outcome:?}");
    assert_eq!(outcome.client.unwrap().peer_certs.len(), 2, "leaf + intermediate sent");
}

/// The server must refuse `client`; the client side fails too (alert), or at the latest on read.
async fn assert_server_refuses(server: &WorkloadIdentity, client: &WorkloadIdentity, expect: &str) {
    let outcome = exchange(
        server_config(server, ClientAuth::Required, MESH_ALPN).unwrap(),
        client_config(client, MESH_ALPN).unwrap(),
        "payment",
    )
    .await;
    let err = outcome.server.expect_err("server must refuse");
    assert!(err.contains(expect), "server error {err:?} should mention {expect:?}");
    assert!(outcome.client.is_err(), "client must not complete an exchange: {:?}", outcome.client);
}

/// The client must refuse `server`.
async fn assert_client_refuses(server: &WorkloadIdentity, client: &WorkloadIdentity, expect: &str) {
    let outcome = exchange(
        server_config(server, ClientAuth::Required, MESH_ALPN).unwrap(),
        client_config(client, MESH_ALPN).unwrap(),
        "payment",
    )
    .await;
    let err = outcome.client.expect_err("client must refuse");
    assert!(err.contains(expect), "client error {err:?} should mention {expect:?}");
    assert!(outcome.server.is_err());
}

#[tokio::test]
async fn refuses_expired_client() {
    let ca = Ca::generate("cluster.local").unwrap();
    let server = identity(&ca, &payment());
    let client = issued_with(&ca, &frontend(), -7200, -3600);
    assert_server_refuses(&server, &client, "certificate expired").await;
}

#[tokio::test]
async fn refuses_not_yet_valid_client() {
    let ca = Ca::generate("cluster.local").unwrap();
    let server = identity(&ca, &payment());
    let client = issued_with(&ca, &frontend(), 3600, 7200);
    assert_server_refuses(&server, &client, "certificate not valid yet").await;
}

#[tokio::test]
async fn refuses_client_of_another_ca() {
    let ca = Ca::generate("cluster.local").unwrap();
    let other = Ca::generate("cluster.local").unwrap();
    let server = identity(&ca, &payment());
    // Same trust domain name, different CA. The client trusts the server's roots (so it is
    // the server that must refuse) but presents a certificate of the other CA.
    let stranger = identity(&other, &frontend());
    let mut config = ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&TLS13, &TLS12])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(MeshServerVerifier::new(server.root_store().clone())))
        .with_client_cert_resolver(Arc::new(serin_certs::rustls::sign::SingleCertAndKey::from(
            stranger.certified_key().clone(),
        )));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    let outcome =
        exchange(server_config(&server, ClientAuth::Required, MESH_ALPN).unwrap(), Arc::new(config), "payment").await;
    let err = outcome.server.expect_err("server must refuse");
    assert!(err.contains("UnknownIssuer"), "{err}");
    assert!(outcome.client.is_err());
    // And a client of the other mesh through the ordinary config is refused too.
    let outcome = exchange(
        server_config(&server, ClientAuth::Required, MESH_ALPN).unwrap(),
        client_config(&stranger, MESH_ALPN).unwrap(),
        "payment",
    )
    .await;
    assert!(outcome.server.is_err() && outcome.client.is_err());
}

#[tokio::test]
async fn refuses_server_of_another_ca() {
    let ca = Ca::generate("cluster.local").unwrap();
    let other = Ca::generate("cluster.local").unwrap();
    let server = identity(&other, &payment());
    let client = identity(&ca, &frontend());
    assert_client_refuses(&server, &client, "UnknownIssuer").await;
}

#[tokio::test]
async fn refuses_expired_and_not_yet_valid_server() {
    let ca = Ca::generate("cluster.local").unwrap();
    let client = identity(&ca, &frontend());
    assert_client_refuses(&issued_with(&ca, &payment(), -7200, -3600), &client, "certificate expired").await;
    assert_client_refuses(&issued_with(&ca, &payment(), 3600, 7200), &client, "certificate not valid yet").await;
}

#[tokio::test]
async fn wrong_identity_is_detected_after_the_handshake() {
    let ca = Ca::generate("cluster.local").unwrap();
    let impostor = id("spiffe://cluster.local/ns/default/sa/reviews");
    let server = identity(&ca, &impostor);
    let client = identity(&ca, &frontend());
    let outcome = exchange(
        server_config(&server, ClientAuth::Required, MESH_ALPN).unwrap(),
        client_config(&client, MESH_ALPN).unwrap(),
        "payment",
    )
    .await;
    let c = outcome.client.expect("chain is valid");
    let err = verify_peer_identity(&c.peer_certs, &[payment()]).expect_err("not payment");
    assert_eq!(err, PeerIdentityError::Mismatch { actual: impostor.clone(), expected: payment().to_string() });
    assert!(err.to_string().contains("sa/reviews") && err.to_string().contains("sa/payment"), "{err}");
    assert_eq!(verify_peer_identity(&[], &[payment()]), Err(PeerIdentityError::NoCertificate));
    assert!(matches!(
        verify_peer_identity(&[CertificateDer::from(vec![1, 2, 3])], &[payment()]),
        Err(PeerIdentityError::NoSpiffeId(_))
    ));
}

fn client_without_cert(roots: Arc<RootCertStore>) -> Arc<ClientConfig> {
    let mut config = ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&TLS13, &TLS12])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(MeshServerVerifier::new(roots)))
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Arc::new(config)
}

#[tokio::test]
async fn client_auth_required_or_optional() {
    let ca = Ca::generate("cluster.local").unwrap();
    let server = identity(&ca, &payment());
    let anonymous = client_without_cert(server.root_store().clone());

    let outcome =
        exchange(server_config(&server, ClientAuth::Required, MESH_ALPN).unwrap(), anonymous.clone(), "payment").await;
    let err = outcome.server.expect_err("required");
    assert!(err.contains("NoCertificatesPresented") || err.contains("certificate"), "{err}");

    let outcome =
        exchange(server_config(&server, ClientAuth::Optional, MESH_ALPN).unwrap(), anonymous, "payment").await;
    assert!(outcome.both_ok(), "{outcome:?}");
    assert_eq!(outcome.server.unwrap().peer_id, None, "no client identity");

    // Optional still verifies a certificate that is sent.
    let other = Ca::generate("cluster.local").unwrap();
    let outcome = exchange(
        server_config(&server, ClientAuth::Optional, MESH_ALPN).unwrap(),
        client_config(&identity(&other, &frontend()), MESH_ALPN).unwrap(),
        "payment",
    )
    .await;
    assert!(outcome.server.is_err());
}

#[tokio::test]
async fn garbage_client_does_not_affect_the_next() {
    let ca = Ca::generate("cluster.local").unwrap();
    let server = identity(&ca, &payment());
    let client = identity(&ca, &frontend());
    let (addr, results) = serve(server_config(&server, ClientAuth::Required, MESH_ALPN).unwrap(), 2).await;
    let mut garbage = tokio::net::TcpStream::connect(addr).await.unwrap();
    garbage.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let (side, _) = connect(addr, client_config(&client, MESH_ALPN).unwrap(), "payment").await.expect("good client");
    assert_eq!(side.peer_id, Some(payment()));
    let results = results.await.unwrap();
    assert!(results[0].is_err(), "garbage refused: {:?}", results[0]);
    assert!(results[1].is_ok(), "{:?}", results[1]);
}

// ------------------------------------------------------------------------------------------
// Gateway: ordinary DNS certificates from files.

struct DnsPki {
    dir: tempfile::TempDir,
    ca_pem: String,
    roots: Arc<RootCertStore>,
    issuer: rcgen::Issuer<'static, KeyPair>,
}

impl DnsPki {
    fn new() -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(rcgen::DnType::CommonName, format!("test CA {:x}", rand::random::<u64>()));
        let cert = params.self_signed(&key).unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        DnsPki { dir: tempdir(), ca_pem: cert.pem(), roots: Arc::new(roots), issuer: rcgen::Issuer::new(params, key) }
    }

    /// Writes `<name>.crt` / `<name>.key` for the given DNS names and returns their paths.
    fn leaf(&self, name: &str, dns: &[&str]) -> (std::path::PathBuf, std::path::PathBuf) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(dns.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.extended_key_usages =
            vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (crt, k) = (self.dir.path().join(format!("{name}.crt")), self.dir.path().join(format!("{name}.key")));
        std::fs::write(&crt, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (crt, k)
    }

    fn ca_file(&self) -> std::path::PathBuf {
        let path = self.dir.path().join("ca.crt");
        std::fs::write(&path, &self.ca_pem).unwrap();
        path
    }

    /// A browser-like client: verifies the chain and the DNS name.
    fn client(&self, client_cert: Option<(&std::path::Path, &std::path::Path)>) -> Arc<ClientConfig> {
        let builder = ClientConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&TLS13, &TLS12])
            .unwrap()
            .with_root_certificates(self.roots.clone());
        let mut config = match client_cert {
            Some((crt, key)) => {
                let ck = load_certified_key(crt, key).unwrap();
                builder.with_client_auth_cert(ck.cert.clone(), rustls_pki_key(key)).unwrap()
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
        Arc::new(config)
    }
}

fn rustls_pki_key(path: &std::path::Path) -> serin_certs::rustls::pki_types::PrivateKeyDer<'static> {
    use serin_certs::rustls::pki_types::pem::PemObject;
    serin_certs::rustls::pki_types::PrivateKeyDer::from_pem_file(path).unwrap()
}

#[tokio::test]
async fn gateway_simple_and_mutual() {
    let pki = DnsPki::new();
    let (crt, key) = pki.leaf("gw", &["gw.example.com"]);

    // SIMPLE: a normal client checking the DNS name.
    let simple = server_config_from_files(&crt, &key, None, &[ALPN_HTTP11]).unwrap();
    let outcome = exchange(simple.clone(), pki.client(None), "gw.example.com").await;
    assert!(outcome.both_ok(), "{outcome:?}");
    // The wrong name is refused by the (ordinary) client.
    let outcome = exchange(simple, pki.client(None), "other.example.com").await;
    let err = outcome.client.unwrap_err();
    assert!(err.contains("not valid for name"), "{err}");

    // MUTUAL: client certificate required and checked against the given CA.
    let mutual = server_config_from_files(&crt, &key, Some(&pki.ca_file()), &[ALPN_HTTP11]).unwrap();
    let outcome = exchange(mutual.clone(), pki.client(None), "gw.example.com").await;
    assert!(outcome.server.is_err(), "no client cert refused");
    let (ccrt, ckey) = pki.leaf("client", &["client.example.com"]);
    let outcome = exchange(mutual.clone(), pki.client(Some((&ccrt, &ckey))), "gw.example.com").await;
    assert!(outcome.both_ok(), "{outcome:?}");
    // A client certificate from another CA is refused.
    let stranger = DnsPki::new();
    let (scrt, skey) = stranger.leaf("client", &["client.example.com"]);
    let mut config = (*pki.client(None)).clone();
    config.client_auth_cert_resolver =
        Arc::new(serin_certs::rustls::sign::SingleCertAndKey::from(load_certified_key(&scrt, &skey).unwrap()));
    let outcome = exchange(mutual, Arc::new(config), "gw.example.com").await;
    let err = outcome.server.unwrap_err();
    assert!(err.contains("UnknownIssuer"), "{err}");
}

#[tokio::test]
async fn gateway_file_errors_name_the_file() {
    let pki = DnsPki::new();
    let (crt, key) = pki.leaf("gw", &["gw.example.com"]);
    let (_, other_key) = pki.leaf("other", &["other.example.com"]);
    let err = server_config_from_files(&crt, &other_key, None, &[]).expect_err("mismatch");
    assert!(err.to_string().contains("other.key: private key does not match the certificate in"), "{err}");
    let missing = pki.dir.path().join("nope.crt");
    let err = server_config_from_files(&missing, &key, None, &[]).expect_err("missing");
    assert!(err.to_string().contains("nope.crt: file is missing"), "{err}");
    let err = server_config_from_files(&crt, &key, Some(&key), &[]).expect_err("CA file without certs");
    assert!(err.to_string().contains("gw.key: not PEM"), "{err}");
}

#[tokio::test]
async fn gateway_sni_selects_the_certificate() {
    let pki = DnsPki::new();
    let (a_crt, a_key) = pki.leaf("a", &["a.example.com"]);
    let (w_crt, w_key) = pki.leaf("w", &["*.example.org", "deep.sub.example.org"]);
    let (d_crt, d_key) = pki.leaf("d", &["fallback.example.net"]);
    let a = load_certified_key(&a_crt, &a_key).unwrap();
    let w = load_certified_key(&w_crt, &w_key).unwrap();
    let d = load_certified_key(&d_crt, &d_key).unwrap();
    let mut sni = SniResolver::new();
    sni.add("a.example.com", a.clone()).unwrap();
    sni.add("*.example.org", w.clone()).unwrap();
    sni.add("*", d.clone()).unwrap();
    assert!(sni.add("A.example.com", a.clone()).is_err(), "duplicate host");
    assert!(sni.add("*.", a.clone()).is_err());
    assert!(sni.add("a.*.com", a.clone()).is_err());
    assert!(sni.add("", a.clone()).is_err());

    let same = |got: Option<Arc<serin_certs::rustls::sign::CertifiedKey>>, want: &Arc<_>| {
        got.map(|g| Arc::ptr_eq(&g, want)).unwrap_or(false)
    };
    assert!(same(sni.resolve_name(Some("A.Example.COM.")), &a));
    assert!(same(sni.resolve_name(Some("x.example.org")), &w));
    assert!(same(sni.resolve_name(Some("deep.sub.example.org")), &w));
    assert!(same(sni.resolve_name(Some("example.org")), &d), "the bare suffix is not covered");
    assert!(same(sni.resolve_name(None), &d));

    let config = serin_certs::server_config_with_resolver(Arc::new(sni), None, &[ALPN_HTTP11]).unwrap();
    for (name, want) in [("a.example.com", &a), ("x.example.org", &w)] {
        let outcome = exchange(config.clone(), pki.client(None), name).await;
        let client = outcome.client.unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(client.peer_certs[0], want.cert[0], "{name} got its certificate");
    }
    // Longest wildcard wins.
    let mut sni = SniResolver::new();
    sni.add("*.org", a.clone()).unwrap();
    sni.add("*.example.org", w.clone()).unwrap();
    assert!(same(sni.resolve_name(Some("x.example.org")), &w));
    assert!(same(sni.resolve_name(Some("x.other.org")), &a));
    assert!(sni.resolve_name(None).is_none());
}

#[test]
fn mesh_identity_needs_the_tokio_runtime_only_for_io() {
    // Config builders are synchronous and cheap to call (a rotation builds new ones).
    let ca = Ca::generate("cluster.local").unwrap();
    let dir = tempdir();
    serin_certs::write_workload(dir.path(), &ca.issue(&payment(), DEFAULT_WORKLOAD_LIFETIME).unwrap()).unwrap();
    let identity = WorkloadIdentity::load(dir.path()).unwrap();
    for _ in 0..3 {
        server_config(&identity, ClientAuth::Required, MESH_ALPN).unwrap();
        client_config(&identity, MESH_ALPN).unwrap();
    }
}
