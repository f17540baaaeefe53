//! The mesh CA on disk: init, load (both layouts), issue, CSR signing, file modes and errors.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::{frontend, id, payment, tempdir};
use rcgen::{CertificateParams, KeyPair, SanType};
use serin_certs::{
    CA_CERT_FILE, CA_KEY_FILE, CERT_CHAIN_FILE, Ca, CertError, DEFAULT_WORKLOAD_LIFETIME, KEY_FILE, ROOT_CERT_FILE,
    ROOT_KEY_FILE, WorkloadIdentity, write_workload,
};
use x509_parser::prelude::{FromDer, X509Certificate};

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o777
}

fn leaf_of(id: &WorkloadIdentity) -> X509Certificate<'_> {
    X509Certificate::from_der(&id.cert_chain()[0]).expect("leaf parses").1
}

#[test]
fn init_issue_load_round_trip() {
    let ca_dir = tempdir();
    let work_dir = tempdir();
    let ca = Ca::init(ca_dir.path(), "cluster.local").expect("init");
    assert_eq!(mode(&ca_dir.path().join(ROOT_KEY_FILE)), 0o600, "root key is 0600");
    assert!(ca_dir.path().join(ROOT_CERT_FILE).is_file());

    let loaded = Ca::load(ca_dir.path()).expect("load what init wrote");
    assert_eq!(loaded.cert(), ca.cert());
    assert_eq!(loaded.trust_domain(), Some("cluster.local"));
    assert!(!loaded.is_intermediate());

    let issued = loaded.issue(&payment(), DEFAULT_WORKLOAD_LIFETIME).expect("issue");
    let paths = write_workload(work_dir.path(), &issued).expect("write");
    assert_eq!(paths.key, work_dir.path().join(KEY_FILE));
    assert_eq!(mode(&paths.key), 0o600, "workload key is 0600");
    assert_eq!(mode(&paths.cert_chain), 0o644);

    let identity = WorkloadIdentity::load(work_dir.path()).expect("load identity");
    assert_eq!(identity.spiffe_id(), &payment());
    assert_eq!(identity.serial(), issued.serial);
    assert_eq!(identity.roots(), ca.roots());
    assert_eq!(identity.cert_chain().len(), 1);
    let life = identity.not_after().duration_since(identity.not_before()).unwrap();
    assert_eq!(life, DEFAULT_WORKLOAD_LIFETIME + Duration::from_secs(60));
    assert!(identity.refresh_at() > identity.not_before() && identity.refresh_at() < identity.not_after());

    // Each issue makes a new key and serial.
    let again = loaded.issue(&payment(), DEFAULT_WORKLOAD_LIFETIME).unwrap();
    assert_ne!(again.serial, issued.serial);
    assert_ne!(again.key_pem, issued.key_pem);
    // No temporary files are left behind.
    let names: Vec<String> =
        fs::read_dir(work_dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names.len(), 3, "{names:?}");
}

#[test]
fn init_refuses_to_overwrite() {
    let dir = tempdir();
    Ca::init(dir.path(), "cluster.local").unwrap();
    let err = Ca::init(dir.path(), "cluster.local").expect_err("second init");
    assert!(matches!(err, CertError::AlreadyExists { .. }), "{err}");
    assert!(err.to_string().contains(ROOT_KEY_FILE), "{err}");
    assert!(matches!(Ca::init(tempdir().path(), "Bad_Domain!"), Err(CertError::Spiffe(_))));
}

#[test]
fn load_errors_name_the_problem() {
    let empty = tempdir();
    let err = Ca::load(empty.path()).expect_err("empty dir");
    assert!(matches!(err, CertError::NoCa { .. }), "{err}");
    assert!(err.to_string().contains("ca-cert.pem"), "{err}");

    // Key of another CA.
    let dir = tempdir();
    Ca::init(dir.path(), "cluster.local").unwrap();
    let other = tempdir();
    Ca::init(other.path(), "cluster.local").unwrap();
    fs::copy(other.path().join(ROOT_KEY_FILE), dir.path().join(ROOT_KEY_FILE)).unwrap();
    let err = Ca::load(dir.path()).expect_err("mismatched key");
    assert!(matches!(err, CertError::KeyMismatch { .. }), "{err}");
    assert!(err.to_string().contains("root-key.pem") && err.to_string().contains("root-cert.pem"), "{err}");

    // Garbage key.
    fs::write(dir.path().join(ROOT_KEY_FILE), "not a key").unwrap();
    let err = Ca::load(dir.path()).expect_err("garbage key");
    assert!(matches!(err, CertError::NotPem { .. }), "{err}");
    assert!(err.to_string().contains("root-key.pem"), "{err}");

    // A workload certificate is not a CA.
    let ca = Ca::generate("cluster.local").unwrap();
    let leaf = ca.issue(&payment(), DEFAULT_WORKLOAD_LIFETIME).unwrap();
    let not_ca = tempdir();
    fs::write(not_ca.path().join(ROOT_CERT_FILE), leaf.chain_pem()).unwrap();
    fs::write(not_ca.path().join(ROOT_KEY_FILE), &leaf.key_pem).unwrap();
    let err = Ca::load(not_ca.path()).expect_err("leaf as CA");
    assert!(matches!(err, CertError::NotCa { .. }), "{err}");
}

#[test]
fn plug_in_intermediate_layout() {
    let root = Ca::generate("cluster.local").unwrap();
    let intermediate = root.issue_intermediate(Duration::from_secs(365 * 24 * 3600)).unwrap();
    assert!(intermediate.is_intermediate());
    let dir = tempdir();
    let written = intermediate.save(dir.path()).unwrap();
    for name in [CA_CERT_FILE, CA_KEY_FILE, ROOT_CERT_FILE, CERT_CHAIN_FILE] {
        assert!(written.contains(&dir.path().join(name)), "{name} written");
    }
    assert_eq!(mode(&dir.path().join(CA_KEY_FILE)), 0o600);
    // Istio's cert-chain.pem: the signing CA then the root.
    let chain_pem = fs::read(dir.path().join(CERT_CHAIN_FILE)).unwrap();
    assert_eq!(pem::parse_many(&chain_pem).unwrap().len(), 2);

    let ca = Ca::load(dir.path()).expect("load plug-in CA");
    assert!(ca.is_intermediate());
    assert_eq!(ca.trust_domain(), Some("cluster.local"));
    assert_eq!(ca.roots(), root.roots());
    assert_eq!(ca.chain().len(), 1, "workload chains carry the intermediate, not the root");

    let issued = ca.issue(&frontend(), DEFAULT_WORKLOAD_LIFETIME).unwrap();
    assert_eq!(issued.chain.len(), 2, "leaf + intermediate");
    let work = tempdir();
    write_workload(work.path(), &issued).unwrap();
    // WorkloadIdentity::load verifies the chain up to the root with webpki.
    let identity = WorkloadIdentity::load(work.path()).expect("chain verifies to the root");
    assert_eq!(identity.spiffe_id(), &frontend());

    // And by hand: leaf signed by the intermediate, intermediate by the root.
    let leaf = leaf_of(&identity);
    let inter = X509Certificate::from_der(&identity.cert_chain()[1]).unwrap().1;
    let root_cert = X509Certificate::from_der(&root.roots()[0]).unwrap().1;
    leaf.verify_signature(Some(inter.public_key())).expect("leaf signed by intermediate");
    inter.verify_signature(Some(root_cert.public_key())).expect("intermediate signed by root");
    assert!(leaf.verify_signature(Some(root_cert.public_key())).is_err());

    // A plug-in directory whose root is not the intermediate's issuer is refused.
    let wrong = Ca::generate("cluster.local").unwrap();
    fs::write(dir.path().join(ROOT_CERT_FILE), wrong.roots_pem()).unwrap();
    fs::write(dir.path().join(CERT_CHAIN_FILE), fs::read(dir.path().join(CA_CERT_FILE)).unwrap()).unwrap();
    let err = Ca::load(dir.path()).expect_err("wrong root");
    assert!(matches!(err, CertError::UntrustedChain { .. }), "{err}");
}

#[test]
fn plug_in_layout_with_istio_style_files() {
    // Files as a user would bring them: cert-chain.pem holds ca-cert + root; the CA certificate
    // is not made by serin (custom subject, no SPIFFE SAN).
    let root = Ca::generate("cluster.local").unwrap();
    let dir = tempdir();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::OrganizationName, "Istio");
    params.distinguished_name.push(rcgen::DnType::CommonName, "Intermediate CA");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    // Sign with the root: rcgen needs the root's key, which serin keeps private, so go
    // through the files of a root CA directory.
    let root_dir = tempdir();
    root.save(root_dir.path()).unwrap();
    let root_key = KeyPair::from_pem(&fs::read_to_string(root_dir.path().join(ROOT_KEY_FILE)).unwrap()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_der(&root.roots()[0], &root_key).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    fs::write(dir.path().join(CA_CERT_FILE), cert.pem()).unwrap();
    fs::write(dir.path().join(CA_KEY_FILE), key.serialize_pem()).unwrap();
    fs::write(dir.path().join(ROOT_CERT_FILE), root.roots_pem()).unwrap();
    fs::write(dir.path().join(CERT_CHAIN_FILE), format!("{}{}", cert.pem(), root.roots_pem())).unwrap();

    let ca = Ca::load(dir.path()).expect("load");
    assert_eq!(ca.trust_domain(), None, "no SPIFFE SAN on this CA");
    let issued = ca.issue(&payment(), DEFAULT_WORKLOAD_LIFETIME).unwrap();
    let identity = issued.to_identity().expect("chain verifies");
    assert_eq!(identity.cert_chain().len(), 2);
}

#[test]
fn sign_csr_checks_the_requested_identity() {
    let ca = Ca::generate("cluster.local").unwrap();
    let key = KeyPair::generate().unwrap();

    // CSR asking for the caller's identity.
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![SanType::URI(payment().to_string().try_into().unwrap())];
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let signed = ca.sign_csr(&csr, &payment(), Duration::from_secs(3600)).expect("matching CSR");
    let cert = X509Certificate::from_der(&signed.chain[0]).unwrap().1;
    assert_eq!(cert.public_key().subject_public_key.data.as_ref(), key.public_key_raw(), "the requester's key");
    assert!(cert.subject().iter().next().is_none(), "subject of the CSR is dropped");
    let identity = WorkloadIdentity::from_pem(
        key.serialize_pem().as_bytes(),
        signed.chain_pem().as_bytes(),
        signed.roots_pem().as_bytes(),
    )
    .expect("usable identity");
    assert_eq!(identity.spiffe_id(), &payment());

    // CSR asking for someone else.
    let err = ca.sign_csr(&csr, &frontend(), Duration::from_secs(3600)).expect_err("other identity");
    assert!(matches!(err, CertError::CsrIdentityMismatch { .. }), "{err}");
    assert!(err.to_string().contains("sa/payment") && err.to_string().contains("sa/frontend"), "{err}");

    // CSR with an extra DNS SAN.
    let mut params = CertificateParams::new(vec!["evil.example.com".to_string()]).unwrap();
    params.subject_alt_names.push(SanType::URI(payment().to_string().try_into().unwrap()));
    let csr2 = params.serialize_request(&key).unwrap().pem().unwrap();
    assert!(matches!(
        ca.sign_csr(&csr2, &payment(), Duration::from_secs(3600)),
        Err(CertError::CsrIdentityMismatch { .. })
    ));

    // CSR without SANs: gets the given identity.
    let csr3 = CertificateParams::new(Vec::<String>::new()).unwrap().serialize_request(&key).unwrap().pem().unwrap();
    let signed = ca.sign_csr(&csr3, &frontend(), Duration::from_secs(3600)).expect("CSR without SAN");
    let cert = X509Certificate::from_der(&signed.chain[0]).unwrap().1;
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert_eq!(san.value.general_names.len(), 1);

    // Garbage and tampered CSRs.
    assert!(matches!(ca.sign_csr("hello", &payment(), Duration::from_secs(60)), Err(CertError::Csr { .. })));
    let mut block = pem::parse(&csr).unwrap().into_contents();
    let last = block.len() - 1;
    block[last] ^= 0xff;
    let tampered = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", block));
    let err = ca.sign_csr(&tampered, &payment(), Duration::from_secs(60)).expect_err("bad signature");
    assert!(matches!(err, CertError::Csr { .. }), "{err}");
    assert!(matches!(ca.sign_csr(&ca.roots_pem(), &payment(), Duration::from_secs(60)), Err(CertError::Csr { .. })));
}

#[test]
fn issue_any_identity_and_validity() {
    let ca = Ca::generate("cluster.local").unwrap();
    let other_td = id("spiffe://example.org/ns/x/sa/y");
    let issued = ca.issue(&other_td, Duration::from_secs(60)).unwrap();
    assert_eq!(issued.to_identity().unwrap().spiffe_id(), &other_td);
    let err = ca.issue(&payment(), Duration::from_secs(u64::MAX)).expect_err("absurd lifetime");
    assert!(matches!(err, CertError::Validity { .. }), "{err}");
}
