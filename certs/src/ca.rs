//! The mesh certificate authority: a self-signed root made by `serin ca init`, or an
//! intermediate plugged in from Istio's plug-in CA files. It issues workload certificates
//! (URI SAN = SPIFFE ID) and signs CSRs.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

use crate::error::CertError;
use crate::files::{
    self, CA_CERT_FILE, CA_KEY_FILE, CERT_CHAIN_FILE, CERT_MODE, KEY_MODE, ROOT_CERT_FILE, ROOT_KEY_FILE,
};
use crate::spiffe::{SpiffeId, check_trust_domain};
use crate::workload::WorkloadIdentity;

/// Istio's default trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Default workload certificate lifetime: 24 h, as Istio's `SECRET_TTL`.
pub const DEFAULT_WORKLOAD_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Lifetime of a root made by [`Ca::init`]: 10 years, as Istio's self-signed root.
pub const ROOT_LIFETIME: Duration = Duration::from_secs(3650 * 24 * 3600);
/// Certificates start this long before "now", to tolerate small clock skew between pods.
pub const BACKDATE: Duration = Duration::from_secs(60);

/// A certificate authority able to sign workload certificates.
///
/// Either a self-signed root (layout of [`Ca::init`]: `root-cert.pem` + `root-key.pem`) or
/// an intermediate signing CA in Istio's plug-in layout (`ca-cert.pem`, `ca-key.pem`,
/// `root-cert.pem`, `cert-chain.pem`). The signing key stays in memory; `Debug` never
/// prints it.
pub struct Ca {
    /// The signing key.
    key: KeyPair,
    /// The signing certificate (the root itself for a root CA).
    cert: CertificateDer<'static>,
    /// Certificates from the signing certificate up to, excluding, the root: what goes after
    /// a leaf in a workload `cert-chain.pem`. Empty when the signing certificate is a root.
    chain: Vec<CertificateDer<'static>>,
    /// The trust bundle (`root-cert.pem`); the chain ends at one of these.
    roots: Vec<CertificateDer<'static>>,
    /// The trust domain the CA was made for, when known.
    trust_domain: Option<String>,
    /// End of the signing certificate's validity.
    not_after: SystemTime,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("intermediate", &self.is_intermediate())
            .field("trust_domain", &self.trust_domain)
            .field("not_after", &files::rfc3339(self.not_after))
            .finish_non_exhaustive()
    }
}

/// A freshly issued workload key and certificate, in memory.
#[derive(Clone)]
pub struct IssuedCert {
    /// The identity in the certificate's URI SAN.
    pub spiffe_id: SpiffeId,
    /// The workload's private key, PKCS#8 PEM (P-256).
    pub key_pem: String,
    /// The leaf certificate, then the intermediates (never the root).
    pub chain: Vec<CertificateDer<'static>>,
    /// The mesh roots the chain leads to.
    pub roots: Vec<CertificateDer<'static>>,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// Serial number, hex with colons.
    pub serial: String,
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert")
            .field("spiffe_id", &self.spiffe_id.to_string())
            .field("serial", &self.serial)
            .field("not_before", &files::rfc3339(self.not_before))
            .field("not_after", &files::rfc3339(self.not_after))
            .finish_non_exhaustive()
    }
}

impl IssuedCert {
    /// The leaf certificate (the first of [`IssuedCert::chain`]; `None` only if the chain was
    /// emptied by hand).
    pub fn leaf(&self) -> Option<&CertificateDer<'static>> {
        self.chain.first()
    }

    /// PEM of the chain (leaf first): the content of `cert-chain.pem`.
    pub fn chain_pem(&self) -> String {
        files::certs_to_pem(&self.chain)
    }

    /// PEM of the roots: the content of `root-cert.pem`.
    pub fn roots_pem(&self) -> String {
        files::certs_to_pem(&self.roots)
    }

    /// The rustls-ready identity, without checking the validity period against the clock
    /// (so that tests can build expired or not-yet-valid peers).
    pub fn to_identity(&self) -> Result<WorkloadIdentity, CertError> {
        WorkloadIdentity::from_pem(self.key_pem.as_bytes(), self.chain_pem().as_bytes(), self.roots_pem().as_bytes())
    }
}

/// A certificate signed from a CSR: no private key, which stays with the requester.
#[derive(Clone)]
pub struct SignedCert {
    /// The identity in the certificate's URI SAN.
    pub spiffe_id: SpiffeId,
    /// The leaf certificate, then the intermediates (never the root).
    pub chain: Vec<CertificateDer<'static>>,
    /// The mesh roots the chain leads to.
    pub roots: Vec<CertificateDer<'static>>,
    /// End of validity.
    pub not_after: SystemTime,
    /// Serial number, hex with colons.
    pub serial: String,
}

impl fmt::Debug for SignedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignedCert")
            .field("spiffe_id", &self.spiffe_id.to_string())
            .field("serial", &self.serial)
            .field("not_after", &files::rfc3339(self.not_after))
            .finish_non_exhaustive()
    }
}

impl SignedCert {
    /// PEM of the chain (leaf first).
    pub fn chain_pem(&self) -> String {
        files::certs_to_pem(&self.chain)
    }

    /// PEM of the roots.
    pub fn roots_pem(&self) -> String {
        files::certs_to_pem(&self.roots)
    }
}

fn gen_err(context: &'static str) -> impl FnOnce(rcgen::Error) -> CertError {
    move |source| CertError::Generate { context, source }
}

fn to_offset(t: SystemTime) -> Result<OffsetDateTime, CertError> {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|_| CertError::Validity { reason: "time before 1970".into() })?
        .as_secs();
    let secs = i64::try_from(secs).map_err(|_| CertError::Validity { reason: "time too far in the future".into() })?;
    OffsetDateTime::from_unix_timestamp(secs)
        .map_err(|e| CertError::Validity { reason: format!("time out of range: {e}") })
}

fn add(t: SystemTime, d: Duration) -> Result<SystemTime, CertError> {
    t.checked_add(d).ok_or_else(|| CertError::Validity { reason: format!("lifetime {d:?} is too long") })
}

/// A random positive 16-byte serial number (RFC 5280 allows up to 20 bytes).
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] = (bytes[0] & 0x7f) | 0x40; // positive, no leading zero byte
    SerialNumber::from_slice(&bytes)
}

fn ca_params(
    trust_domain: &str,
    common_name: &str,
    not_before: SystemTime,
    not_after: SystemTime,
    path_len: Option<u8>,
) -> Result<CertificateParams, CertError> {
    let mut params = CertificateParams::default();
    // A random tag in the common name tells two CAs of one trust domain apart (rotation, a
    // wrong CA): verifiers then report an unknown issuer instead of a bad signature.
    let tag: [u8; 4] = rand::random();
    let tag: String = tag.iter().map(|b| format!("{b:02x}")).collect();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    dn.push(DnType::CommonName, format!("{common_name} {tag}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.not_before = to_offset(not_before)?;
    params.not_after = to_offset(not_after)?;
    params.serial_number = Some(random_serial());
    params.use_authority_key_identifier_extension = path_len.is_some();
    Ok(params)
}

/// Workload certificate parameters: no subject (Istio's form), URI SAN = the SPIFFE ID, not a
/// CA, digitalSignature + keyEncipherment, serverAuth + clientAuth.
fn leaf_params(id: &SpiffeId, not_before: SystemTime, not_after: SystemTime) -> Result<CertificateParams, CertError> {
    if not_after <= not_before {
        return Err(CertError::Validity {
            reason: format!(
                "not_after {} is not after not_before {}",
                files::rfc3339(not_after),
                files::rfc3339(not_before)
            ),
        });
    }
    let uri = Ia5String::try_from(id.to_string()).map_err(gen_err("URI SAN"))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = to_offset(not_before)?;
    params.not_after = to_offset(not_after)?;
    params.serial_number = Some(random_serial());
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// Facts read from a CA certificate.
struct CaCertInfo {
    not_after: SystemTime,
    organization: Option<String>,
    spiffe_trust_domain: Option<String>,
}

/// Checks that `der` is a CA certificate allowed to sign certificates and that `key` is its key.
fn check_ca_cert(
    cert_path: &Path,
    key_path: &Path,
    der: &CertificateDer<'_>,
    key: &KeyPair,
) -> Result<CaCertInfo, CertError> {
    let x509 = files::parse_x509(cert_path, der)?;
    if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(CertError::KeyMismatch { key: key_path.to_path_buf(), cert: cert_path.to_path_buf() });
    }
    check_is_ca(cert_path, &x509)?;
    let organization = x509.subject().iter_organization().next().and_then(|o| o.as_str().ok()).map(str::to_string);
    let spiffe_trust_domain = x509.subject_alternative_name().ok().flatten().and_then(|san| {
        san.value.general_names.iter().find_map(|n| match n {
            GeneralName::URI(u) => u.strip_prefix("spiffe://").map(|r| r.split('/').next().unwrap_or("").to_string()),
            _ => None,
        })
    });
    Ok(CaCertInfo {
        not_after: files::system_time(x509.validity().not_after.timestamp()),
        organization,
        spiffe_trust_domain,
    })
}

/// The trust domain a CA certificate was made for: the trust domain of its `spiffe://` URI
/// SAN (Istio's plug-in CAs), else its subject organisation (roots made by [`Ca::init`]).
/// `None` when the certificate cannot be parsed or names neither. A sidecar uses this to
/// learn the trust domain from the root it was given.
pub fn ca_trust_domain(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, x509) = X509Certificate::from_der(cert).ok()?;
    let from_san = x509.subject_alternative_name().ok().flatten().and_then(|san| {
        san.value.general_names.iter().find_map(|n| match n {
            GeneralName::URI(u) => u.strip_prefix("spiffe://").map(|r| r.split('/').next().unwrap_or("").to_string()),
            _ => None,
        })
    });
    let from_org = || x509.subject().iter_organization().next().and_then(|o| o.as_str().ok()).map(str::to_string);
    from_san.or_else(from_org).filter(|td| check_trust_domain(td).is_ok())
}

fn check_is_ca(path: &Path, x509: &X509Certificate<'_>) -> Result<(), CertError> {
    let not_ca = |reason: &str| CertError::NotCa { path: path.to_path_buf(), reason: reason.to_string() };
    match x509.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {}
        Ok(_) => return Err(not_ca("basicConstraints has no CA:TRUE")),
        Err(e) => return Err(not_ca(&format!("basicConstraints is malformed: {e}"))),
    }
    match x509.key_usage() {
        Ok(Some(ku)) if !ku.value.key_cert_sign() => Err(not_ca("keyUsage lacks keyCertSign")),
        Ok(_) => Ok(()),
        Err(e) => Err(not_ca(&format!("keyUsage is malformed: {e}"))),
    }
}

/// Reads a PKCS#8 key into an rcgen `KeyPair` (rcgen with ring signs with PKCS#8 keys only).
fn load_key_pair(path: &Path) -> Result<KeyPair, CertError> {
    let pem = files::read_file(path)?;
    let der = files::parse_key(path, &pem)?;
    if !matches!(der, PrivateKeyDer::Pkcs8(_)) {
        return Err(CertError::BadKey {
            path: path.to_path_buf(),
            reason: "a CA key must be PKCS#8 (\"BEGIN PRIVATE KEY\"); convert it with \
                     `openssl pkcs8 -topk8 -nocrypt`"
                .into(),
        });
    }
    KeyPair::try_from(&der).map_err(|e| CertError::BadKey { path: path.to_path_buf(), reason: e.to_string() })
}

/// Verifies that `chain[0]` is signed by `chain[1]`, …, and the last by one of `roots`.
fn verify_chain(
    chain_path: &Path,
    roots_path: &Path,
    chain: &[CertificateDer<'_>],
    roots: &[CertificateDer<'_>],
) -> Result<(), CertError> {
    let untrusted = |reason: String| CertError::UntrustedChain {
        chain: chain_path.to_path_buf(),
        roots: roots_path.to_path_buf(),
        reason,
    };
    let parsed = chain.iter().map(|c| files::parse_x509(chain_path, c)).collect::<Result<Vec<_>, _>>()?;
    let parsed_roots = roots.iter().map(|c| files::parse_x509(roots_path, c)).collect::<Result<Vec<_>, _>>()?;
    for (i, pair) in parsed.windows(2).enumerate() {
        pair[0]
            .verify_signature(Some(pair[1].public_key()))
            .map_err(|e| untrusted(format!("certificate #{} is not signed by certificate #{}: {e}", i + 1, i + 2)))?;
    }
    let Some(last) = parsed.last() else {
        return Err(untrusted("empty chain".into()));
    };
    if parsed_roots.iter().any(|root| last.verify_signature(Some(root.public_key())).is_ok()) {
        Ok(())
    } else {
        Err(untrusted(format!("the last certificate (issuer {}) is signed by none of the roots", last.issuer())))
    }
}

impl Ca {
    /// Makes a new self-signed root CA in memory: ECDSA P-256, 10 years, CA bit, keyCertSign,
    /// subject `O=<trust domain>, CN=serin root CA <random tag>`. Nothing is written; see
    /// [`Ca::init`].
    ///
    /// Also the way to get a second, unrelated CA in tests (wrong-CA cases).
    pub fn generate(trust_domain: &str) -> Result<Ca, CertError> {
        let now = SystemTime::now();
        Self::generate_with_validity(trust_domain, now - BACKDATE, add(now, ROOT_LIFETIME)?)
    }

    /// As [`Ca::generate`], with a chosen validity period (tests of expired roots).
    pub fn generate_with_validity(
        trust_domain: &str,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Ca, CertError> {
        check_trust_domain(trust_domain)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(gen_err("root key"))?;
        let params = ca_params(trust_domain, "serin root CA", not_before, not_after, None)?;
        let cert = params.self_signed(&key).map_err(gen_err("root certificate"))?;
        let cert: CertificateDer<'static> = cert.into();
        Ok(Ca {
            key,
            cert: cert.clone(),
            chain: Vec::new(),
            roots: vec![cert],
            trust_domain: Some(trust_domain.to_string()),
            not_after,
        })
    }

    /// Makes a root CA for `trust_domain` and writes it to `dir` as `root-cert.pem` and
    /// `root-key.pem` (mode 0600), creating `dir` if needed. Refuses to overwrite an existing
    /// CA key in `dir`.
    pub fn init(dir: &Path, trust_domain: &str) -> Result<Ca, CertError> {
        for existing in [ROOT_KEY_FILE, CA_KEY_FILE] {
            let path = dir.join(existing);
            if path.exists() {
                return Err(CertError::AlreadyExists { path });
            }
        }
        let ca = Self::generate(trust_domain)?;
        ca.save(dir)?;
        Ok(ca)
    }

    /// Writes this CA to `dir` in its layout and returns the paths written: a root as
    /// `root-cert.pem` + `root-key.pem`; an intermediate in Istio's plug-in layout
    /// (`ca-cert.pem`, `ca-key.pem`, `root-cert.pem`, `cert-chain.pem` = signing certificate,
    /// intermediates, root). Keys get mode 0600; files are replaced atomically.
    pub fn save(&self, dir: &Path) -> Result<Vec<PathBuf>, CertError> {
        files::create_dir(dir)?;
        let key_pem = self.key.serialize_pem();
        let mut written = Vec::new();
        let mut write = |name: &str, contents: &str, mode: u32| -> Result<(), CertError> {
            let path = dir.join(name);
            files::write_atomic(&path, contents.as_bytes(), mode)?;
            written.push(path);
            Ok(())
        };
        let roots_pem = files::certs_to_pem(&self.roots);
        if self.is_intermediate() {
            write(CA_CERT_FILE, &files::certs_to_pem([&self.cert]), CERT_MODE)?;
            write(CA_KEY_FILE, &key_pem, KEY_MODE)?;
            write(ROOT_CERT_FILE, &roots_pem, CERT_MODE)?;
            let chain_pem = files::certs_to_pem(self.chain.iter().chain(self.roots.iter().take(1)));
            write(CERT_CHAIN_FILE, &chain_pem, CERT_MODE)?;
        } else {
            write(ROOT_CERT_FILE, &roots_pem, CERT_MODE)?;
            write(ROOT_KEY_FILE, &key_pem, KEY_MODE)?;
        }
        Ok(written)
    }

    /// Loads a CA from `dir`, in either layout:
    ///
    /// - Istio's plug-in CA, chosen when `ca-cert.pem` or `ca-key.pem` exists: `ca-cert.pem`
    ///   (the signing CA), `ca-key.pem` (its PKCS#8 key), `root-cert.pem` (the trust bundle)
    ///   and `cert-chain.pem` (signing CA, intermediates, optionally the root; when missing,
    ///   the signing CA is taken to be signed directly by a root);
    /// - otherwise the layout of [`Ca::init`]: `root-cert.pem` + `root-key.pem`.
    ///
    /// Checks that the key belongs to the certificate, that it is a CA with keyCertSign and
    /// (plug-in) that the chain leads to a root in `root-cert.pem`.
    pub fn load(dir: &Path) -> Result<Ca, CertError> {
        let (ca_cert, ca_key) = (dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE));
        let (root_cert, root_key) = (dir.join(ROOT_CERT_FILE), dir.join(ROOT_KEY_FILE));
        if ca_cert.exists() || ca_key.exists() {
            Self::load_plugin(dir)
        } else if root_key.exists() {
            Self::load_root(&root_cert, &root_key)
        } else {
            Err(CertError::NoCa { dir: dir.to_path_buf() })
        }
    }

    fn load_root(cert_path: &Path, key_path: &Path) -> Result<Ca, CertError> {
        let roots = files::parse_certs(cert_path, &files::read_file(cert_path)?)?;
        let key = load_key_pair(key_path)?;
        // root-cert.pem may hold several roots (rotation); sign with the one the key belongs to.
        let mut last_err = None;
        for root in &roots {
            match check_ca_cert(cert_path, key_path, root, &key) {
                Ok(info) => {
                    return Ok(Ca {
                        key,
                        cert: root.clone(),
                        chain: Vec::new(),
                        roots: roots.clone(),
                        trust_domain: info.organization,
                        not_after: info.not_after,
                    });
                }
                Err(e @ CertError::KeyMismatch { .. }) => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or_else(|| CertError::KeyMismatch { key: key_path.into(), cert: cert_path.into() }))
    }

    fn load_plugin(dir: &Path) -> Result<Ca, CertError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let roots_path = dir.join(ROOT_CERT_FILE);
        let chain_path = dir.join(CERT_CHAIN_FILE);
        let cert = files::parse_certs(&cert_path, &files::read_file(&cert_path)?)?.swap_remove(0);
        let key = load_key_pair(&key_path)?;
        let info = check_ca_cert(&cert_path, &key_path, &cert, &key)?;
        let roots = files::parse_certs(&roots_path, &files::read_file(&roots_path)?)?;
        let listed = match files::read_file(&chain_path) {
            Ok(pem) => files::parse_certs(&chain_path, &pem)?,
            Err(CertError::Missing { .. }) => Vec::new(),
            Err(e) => return Err(e),
        };
        // The workload chain part: signing CA, then intermediates, without the roots.
        let mut chain = Vec::new();
        if !roots.contains(&cert) {
            chain.push(cert.clone());
            chain.extend(listed.into_iter().filter(|c| *c != cert && !roots.contains(c)));
            verify_chain(&chain_path, &roots_path, &chain, &roots)?;
        }
        let trust_domain = info.spiffe_trust_domain;
        Ok(Ca { key, cert, chain, roots, trust_domain, not_after: info.not_after })
    }

    /// Issues an intermediate signing CA under this one (ECDSA P-256, pathlen 0, subject
    /// `O=<trust domain>, CN=serin intermediate CA <random tag>`, URI SAN `spiffe://<trust domain>` when the
    /// trust domain is known). Save it with [`Ca::save`] to get Istio's plug-in layout.
    pub fn issue_intermediate(&self, lifetime: Duration) -> Result<Ca, CertError> {
        let now = SystemTime::now();
        let not_after = add(now, lifetime)?;
        let td = self.trust_domain.clone().unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.to_string());
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(gen_err("intermediate key"))?;
        let mut params = ca_params(&td, "serin intermediate CA", now - BACKDATE, not_after, Some(0))?;
        if let Some(td) = &self.trust_domain {
            let uri = Ia5String::try_from(format!("spiffe://{td}")).map_err(gen_err("URI SAN"))?;
            params.subject_alt_names = vec![SanType::URI(uri)];
        }
        let cert: CertificateDer<'static> =
            params.signed_by(&key, &self.issuer()?).map_err(gen_err("intermediate certificate"))?.into();
        let mut chain = vec![cert.clone()];
        chain.extend(self.chain.iter().cloned());
        Ok(Ca { key, cert, chain, roots: self.roots.clone(), trust_domain: self.trust_domain.clone(), not_after })
    }

    fn issuer(&self) -> Result<Issuer<'static, &KeyPair>, CertError> {
        Issuer::from_ca_cert_der(&self.cert, &self.key).map_err(gen_err("reading the CA certificate"))
    }

    /// Issues a workload key (ECDSA P-256) and certificate for `id`, valid from one minute
    /// ago ([`BACKDATE`]) for `lifetime` ([`DEFAULT_WORKLOAD_LIFETIME`] is Istio's 24 h).
    ///
    /// The certificate has no subject, one URI SAN (the SPIFFE ID, marked critical as RFC 5280
    /// asks when the subject is empty), no CA bit, key usage digitalSignature +
    /// keyEncipherment, extended key usage serverAuth + clientAuth, and a random serial. The
    /// CA does not check `id`'s trust domain against its own: a caller that cares compares
    /// with [`Ca::trust_domain`].
    pub fn issue(&self, id: &SpiffeId, lifetime: Duration) -> Result<IssuedCert, CertError> {
        let now = SystemTime::now();
        self.issue_with_validity(id, now - BACKDATE, add(now, lifetime)?)
    }

    /// As [`Ca::issue`], with a chosen validity period: for tests of expired and
    /// not-yet-valid certificates.
    pub fn issue_with_validity(
        &self,
        id: &SpiffeId,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<IssuedCert, CertError> {
        let params = leaf_params(id, not_before, not_after)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(gen_err("workload key"))?;
        let cert = params.signed_by(&key, &self.issuer()?).map_err(gen_err("workload certificate"))?;
        let serial = params.serial_number.as_ref().map(serial_hex).unwrap_or_default();
        let mut chain = vec![cert.into()];
        chain.extend(self.chain.iter().cloned());
        Ok(IssuedCert {
            spiffe_id: id.clone(),
            key_pem: key.serialize_pem(),
            chain,
            roots: self.roots.clone(),
            not_before,
            not_after,
            serial,
        })
    }

    /// Issues a serving key and certificate for a mesh server that clients also reach by
    /// host name or address (the control plane's TLS listener): the profile of [`Ca::issue`]
    /// (URI SAN = `id`, serverAuth + clientAuth), plus `dns_names` and `ips` as DNS and IP
    /// SANs so that ordinary TLS clients can verify the name they dialled.
    pub fn issue_server(
        &self,
        id: &SpiffeId,
        dns_names: &[&str],
        ips: &[IpAddr],
        lifetime: Duration,
    ) -> Result<IssuedCert, CertError> {
        let now = SystemTime::now();
        let not_before = now - BACKDATE;
        let not_after = add(now, lifetime)?;
        let mut params = leaf_params(id, not_before, not_after)?;
        for name in dns_names {
            let dns = Ia5String::try_from(name.to_string()).map_err(gen_err("DNS SAN"))?;
            params.subject_alt_names.push(SanType::DnsName(dns));
        }
        params.subject_alt_names.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(gen_err("server key"))?;
        let cert = params.signed_by(&key, &self.issuer()?).map_err(gen_err("server certificate"))?;
        let serial = params.serial_number.as_ref().map(serial_hex).unwrap_or_default();
        let mut chain = vec![cert.into()];
        chain.extend(self.chain.iter().cloned());
        Ok(IssuedCert {
            spiffe_id: id.clone(),
            key_pem: key.serialize_pem(),
            chain,
            roots: self.roots.clone(),
            not_before,
            not_after,
            serial,
        })
    }

    /// Signs a PEM certificate signing request for `id`, valid for `lifetime` (the control
    /// plane's CA service).
    ///
    /// The identity comes from the caller, who has authenticated the requester; the CSR only
    /// contributes its public key (its signature is verified, proving possession of the key).
    /// If the CSR requests subject alternative names, they must be exactly one URI equal to
    /// `id`, otherwise the request is refused with [`CertError::CsrIdentityMismatch`]; a CSR
    /// without SANs is accepted and gets `id`. The CSR's subject, key usages, basic
    /// constraints and other extensions are ignored: the certificate has exactly the profile of
    /// [`Ca::issue`].
    pub fn sign_csr(&self, csr_pem: &str, id: &SpiffeId, lifetime: Duration) -> Result<SignedCert, CertError> {
        let csr_err = |reason: String| CertError::Csr { reason };
        let block = pem::parse(csr_pem).map_err(|e| csr_err(format!("not PEM: {e}")))?;
        if block.tag() != "CERTIFICATE REQUEST" && block.tag() != "NEW CERTIFICATE REQUEST" {
            return Err(csr_err(format!("PEM block is {:?}, expected \"CERTIFICATE REQUEST\"", block.tag())));
        }
        let (_, csr) = X509CertificationRequest::from_der(block.contents())
            .map_err(|e| csr_err(format!("cannot parse the request: {e}")))?;
        csr.verify_signature().map_err(|e| csr_err(format!("signature does not verify: {e}")))?;
        let mut requested: Vec<&GeneralName<'_>> = Vec::new();
        for ext in csr.requested_extensions().into_iter().flatten() {
            if let ParsedExtension::SubjectAlternativeName(san) = ext {
                requested.extend(san.general_names.iter());
            }
        }
        let id_text = id.to_string();
        let matches_id = match requested.as_slice() {
            [] => true,
            [GeneralName::URI(uri)] => *uri == id_text,
            _ => false,
        };
        if !matches_id {
            let requested = requested.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", ");
            return Err(CertError::CsrIdentityMismatch { requested, expected: id_text });
        }
        let public_key = rcgen::SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
            .map_err(|e| csr_err(format!("unsupported public key: {e}")))?;
        let now = SystemTime::now();
        let not_after = add(now, lifetime)?;
        let params = leaf_params(id, now - BACKDATE, not_after)?;
        let cert = params.signed_by(&public_key, &self.issuer()?).map_err(gen_err("certificate from CSR"))?;
        let serial = params.serial_number.as_ref().map(serial_hex).unwrap_or_default();
        let mut chain = vec![cert.into()];
        chain.extend(self.chain.iter().cloned());
        Ok(SignedCert { spiffe_id: id.clone(), chain, roots: self.roots.clone(), not_after, serial })
    }

    /// The trust domain, when known: the subject organisation of a root made by
    /// [`Ca::init`], or the trust domain of a `spiffe://` URI SAN on a plug-in CA certificate.
    pub fn trust_domain(&self) -> Option<&str> {
        self.trust_domain.as_deref()
    }

    /// Whether the signing certificate is an intermediate (plug-in layout) rather than a root.
    pub fn is_intermediate(&self) -> bool {
        !self.roots.contains(&self.cert)
    }

    /// The signing certificate.
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The certificates that follow a leaf in a workload chain (empty for a root CA).
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The trust bundle (`root-cert.pem`).
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// PEM of the trust bundle.
    pub fn roots_pem(&self) -> String {
        files::certs_to_pem(&self.roots)
    }

    /// End of the signing certificate's validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }
}

fn serial_hex(serial: &SerialNumber) -> String {
    serial.as_ref().iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf_profile_is_istio_like() {
        let ca = Ca::generate("cluster.local").unwrap();
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/payment".parse().unwrap();
        let issued = ca.issue(&id, DEFAULT_WORKLOAD_LIFETIME).unwrap();
        let (_, x509) = X509Certificate::from_der(issued.leaf().unwrap()).unwrap();
        assert!(x509.subject().iter().next().is_none(), "no subject / CN");
        assert!(!x509.is_ca());
        let san = x509.subject_alternative_name().unwrap().unwrap();
        assert!(san.critical, "SAN is critical with an empty subject");
        assert_eq!(san.value.general_names, vec![GeneralName::URI("spiffe://cluster.local/ns/default/sa/payment")]);
        let ku = x509.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && ku.key_encipherment() && !ku.key_cert_sign());
        let eku = x509.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        let life = x509.validity().not_after.timestamp() - x509.validity().not_before.timestamp();
        assert_eq!(life, 24 * 3600 + 60);
        assert_eq!(files::serial_of(&x509), issued.serial);
        assert_eq!(issued.chain.len(), 1, "root CA: leaf only");
        assert_eq!(files::spiffe_id_of(&x509).unwrap(), id);
    }

    #[test]
    fn root_profile() {
        let ca = Ca::generate("example.org").unwrap();
        let (_, x509) = X509Certificate::from_der(ca.cert()).unwrap();
        assert!(x509.is_ca());
        assert!(x509.key_usage().unwrap().unwrap().value.key_cert_sign());
        let life = x509.validity().not_after.timestamp() - x509.validity().not_before.timestamp();
        assert_eq!(life as u64, ROOT_LIFETIME.as_secs() + 60);
        assert_eq!(ca.trust_domain(), Some("example.org"));
        assert!(!ca.is_intermediate());
        assert!(Ca::generate("Not A Domain").is_err());
    }

    #[test]
    fn server_certificates_add_dns_and_ip_sans() {
        let ca = Ca::generate("example.org").unwrap();
        let id: SpiffeId = "spiffe://example.org/ns/serin-system/sa/serin-control-plane".parse().unwrap();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let issued =
            ca.issue_server(&id, &["serin-control-plane", "localhost"], &[ip], Duration::from_secs(60)).unwrap();
        let (_, x509) = X509Certificate::from_der(issued.leaf().unwrap()).unwrap();
        let names = x509.subject_alternative_name().unwrap().unwrap().value.general_names.clone();
        assert!(names.contains(&GeneralName::URI("spiffe://example.org/ns/serin-system/sa/serin-control-plane")));
        assert!(names.contains(&GeneralName::DNSName("serin-control-plane")));
        assert!(names.contains(&GeneralName::DNSName("localhost")));
        assert!(names.contains(&GeneralName::IPAddress(&[127, 0, 0, 1])));
        assert_eq!(files::spiffe_id_of(&x509).unwrap(), id, "still one URI SAN: an SVID");
        assert!(issued.to_identity().is_ok());
    }

    #[test]
    fn trust_domain_of_a_ca_certificate() {
        let root = Ca::generate("example.org").unwrap();
        assert_eq!(ca_trust_domain(root.cert()).as_deref(), Some("example.org"));
        let intermediate = root.issue_intermediate(Duration::from_secs(3600)).unwrap();
        assert_eq!(ca_trust_domain(intermediate.cert()).as_deref(), Some("example.org"));
        assert_eq!(ca_trust_domain(&CertificateDer::from(vec![1u8, 2, 3])), None);
    }

    #[test]
    fn rejects_empty_validity() {
        let ca = Ca::generate("cluster.local").unwrap();
        let id: SpiffeId = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let now = SystemTime::now();
        assert!(matches!(ca.issue_with_validity(&id, now, now), Err(CertError::Validity { .. })));
    }
}
