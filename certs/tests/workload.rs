//! Loading a workload identity directory: every bad file is an error naming the file and the
//! problem, never a panic.

mod common;

use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime};

use common::{frontend, payment, tempdir};
use rcgen::{CertificateParams, KeyPair};
use serin_certs::{
    CERT_CHAIN_FILE, Ca, CertError, DEFAULT_WORKLOAD_LIFETIME, KEY_FILE, ROOT_CERT_FILE, ROOT_KEY_FILE,
    WorkloadIdentity, write_workload,
};

fn good_dir(ca: &Ca) -> tempfile::TempDir {
    let dir = tempdir();
    write_workload(dir.path(), &ca.issue(&payment(), DEFAULT_WORKLOAD_LIFETIME).unwrap()).unwrap();
    dir
}

fn load_err(dir: &Path) -> (CertError, String) {
    let err = WorkloadIdentity::load(dir).expect_err("load must fail");
    let text = err.to_string();
    (err, text)
}

#[test]
fn missing_files() {
    let ca = Ca::generate("cluster.local").unwrap();
    for name in [KEY_FILE, CERT_CHAIN_FILE, ROOT_CERT_FILE] {
        let dir = good_dir(&ca);
        fs::remove_file(dir.path().join(name)).unwrap();
        let (err, text) = load_err(dir.path());
        assert!(matches!(err, CertError::Missing { .. }), "{text}");
        assert!(text.contains(name) && text.contains("missing"), "{text}");
    }
}

#[test]
fn unreadable_file() {
    let ca = Ca::generate("cluster.local").unwrap();
    let dir = good_dir(&ca);
    // A directory where the key should be: unreadable even for root.
    fs::remove_file(dir.path().join(KEY_FILE)).unwrap();
    fs::create_dir(dir.path().join(KEY_FILE)).unwrap();
    let (err, text) = load_err(dir.path());
    assert!(matches!(err, CertError::Read { .. }), "{text}");
    assert!(text.contains("key.pem: cannot read"), "{text}");
}

#[test]
fn not_pem() {
    let ca = Ca::generate("cluster.local").unwrap();
    for (name, content) in [
        (KEY_FILE, &b"garbage"[..]),
        (CERT_CHAIN_FILE, b"garbage"),
        (ROOT_CERT_FILE, b""),
        (CERT_CHAIN_FILE, b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n"),
        (CERT_CHAIN_FILE, b"-----BEGIN CERTIFICATE-----\nAAAA\n"),
        (KEY_FILE, b"\xff\xfe\x00binary"),
    ] {
        let dir = good_dir(&ca);
        fs::write(dir.path().join(name), content).unwrap();
        let (err, text) = load_err(dir.path());
        assert!(matches!(err, CertError::NotPem { .. }), "{name}: {text}");
        assert!(text.contains(name) && text.contains("not PEM"), "{text}");
    }
}

#[test]
fn pem_that_is_not_a_certificate() {
    let ca = Ca::generate("cluster.local").unwrap();
    let dir = good_dir(&ca);
    let junk = pem::encode(&pem::Pem::new("CERTIFICATE", vec![0x30, 0x03, 0x02, 0x01, 0x01]));
    fs::write(dir.path().join(CERT_CHAIN_FILE), junk).unwrap();
    let (err, text) = load_err(dir.path());
    assert!(matches!(err, CertError::BadCertificate { .. }), "{text}");
    assert!(text.contains(CERT_CHAIN_FILE), "{text}");
}

#[test]
fn key_does_not_match_certificate() {
    let ca = Ca::generate("cluster.local").unwrap();
    let dir = good_dir(&ca);
    let other = ca.issue(&payment(), DEFAULT_WORKLOAD_LIFETIME).unwrap();
    fs::write(dir.path().join(KEY_FILE), &other.key_pem).unwrap();
    let (err, text) = load_err(dir.path());
    assert!(matches!(err, CertError::KeyMismatch { .. }), "{text}");
    assert!(text.contains("key.pem: private key does not match the certificate in"), "{text}");
    assert!(text.contains(CERT_CHAIN_FILE), "{text}");
}

#[test]
fn no_spiffe_uri_san() {
    // A valid chain whose leaf has only a DNS SAN.
    let ca_dir = tempdir();
    let ca = Ca::init(ca_dir.path(), "cluster.local").unwrap();
    let root_key = KeyPair::from_pem(&fs::read_to_string(ca_dir.path().join(ROOT_KEY_FILE)).unwrap()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_der(&ca.roots()[0], &root_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["payment.default.svc".to_string()]).unwrap();
    params.extended_key_usages =
        vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let leaf = params.signed_by(&leaf_key, &issuer).unwrap();
    let dir = tempdir();
    fs::write(dir.path().join(KEY_FILE), leaf_key.serialize_pem()).unwrap();
    fs::write(dir.path().join(CERT_CHAIN_FILE), leaf.pem()).unwrap();
    fs::write(dir.path().join(ROOT_CERT_FILE), ca.roots_pem()).unwrap();
    let (err, text) = load_err(dir.path());
    assert!(matches!(err, CertError::NoSpiffeId { .. }), "{text}");
    assert!(text.contains("no URI SAN"), "{text}");

    // A URI SAN that is not an Istio SPIFFE ID.
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI("spiffe://cluster.local/payment".try_into().unwrap())];
    let leaf = params.signed_by(&leaf_key, &issuer).unwrap();
    fs::write(dir.path().join(CERT_CHAIN_FILE), leaf.pem()).unwrap();
    let (err, text) = load_err(dir.path());
    assert!(matches!(err, CertError::NoSpiffeId { .. }), "{text}");
    assert!(text.contains("/ns/<namespace>/sa/<service-account>"), "{text}");
}

#[test]
fn expired_and_not_yet_valid() {
    let ca = Ca::generate("cluster.local").unwrap();
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let expired = ca.issue_with_validity(&payment(), now - 2 * hour, now - hour).unwrap();
    let dir = tempdir();
    write_workload(dir.path(), &expired).unwrap();
    let (err, text) = load_err(dir.path());
    assert!(matches!(err, CertError::Expired { .. }), "{text}");
    assert!(text.contains("cert-chain.pem: certificate expired at"), "{text}");
    // Tests can still build the identity, to present it to a peer.
    assert!(expired.to_identity().is_ok());

    // Not yet valid: loaded (with a warning); peers refuse it (see tests/handshake.rs).
    let future = ca.issue_with_validity(&frontend(), now + hour, now + 2 * hour).unwrap();
    write_workload(dir.path(), &future).unwrap();
    assert_eq!(WorkloadIdentity::load(dir.path()).unwrap().spiffe_id(), &frontend());
}

#[test]
fn roots_of_another_ca() {
    let ca = Ca::generate("cluster.local").unwrap();
    let other = Ca::generate("cluster.local").unwrap();
    let dir = good_dir(&ca);
    fs::write(dir.path().join(ROOT_CERT_FILE), other.roots_pem()).unwrap();
    let (err, text) = load_err(dir.path());
    assert!(matches!(err, CertError::UntrustedChain { .. }), "{text}");
    assert!(text.contains(CERT_CHAIN_FILE) && text.contains(ROOT_CERT_FILE), "{text}");

    // Missing intermediate: a plug-in CA's leaf without its intermediate.
    let inter = ca.issue_intermediate(Duration::from_secs(3600)).unwrap();
    let mut issued = inter.issue(&payment(), DEFAULT_WORKLOAD_LIFETIME).unwrap();
    issued.chain.truncate(1);
    assert!(matches!(issued.to_identity(), Err(CertError::UntrustedChain { .. })));
}

#[test]
fn debug_output_hides_the_key() {
    let ca = Ca::generate("cluster.local").unwrap();
    let issued = ca.issue(&payment(), DEFAULT_WORKLOAD_LIFETIME).unwrap();
    let identity = issued.to_identity().unwrap();
    for text in [format!("{issued:?}"), format!("{identity:?}"), format!("{ca:?}")] {
        assert!(!text.contains("PRIVATE KEY"), "{text}");
    }
    assert!(format!("{identity:?}").contains("sa/payment"));
}
