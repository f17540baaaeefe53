//! A workload's identity on disk, in Istio's layout, and loaded for rustls.
//!
//! The directory (`--cert-dir`) holds `key.pem` (mode 0600), `cert-chain.pem` (the leaf, then
//! intermediates) and `root-cert.pem` (the mesh roots), the names Istio's agent uses.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::RootCertStore;
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::server::ParsedCertificate;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, UnixTime};

use crate::ca::IssuedCert;
use crate::error::CertError;
use crate::files::{self, CERT_CHAIN_FILE, CERT_MODE, KEY_FILE, KEY_MODE, ROOT_CERT_FILE};
use crate::spiffe::SpiffeId;
use crate::tls::crypto_provider;

/// A workload's key, certificate chain and mesh roots, checked and ready for rustls.
///
/// Built by [`WorkloadIdentity::load`] (from a directory) or [`WorkloadIdentity::from_pem`].
/// Cheap to share behind an `Arc`; `Debug` never prints the key.
#[derive(Clone)]
pub struct WorkloadIdentity {
    spiffe_id: SpiffeId,
    certified_key: Arc<CertifiedKey>,
    roots: Vec<CertificateDer<'static>>,
    root_store: Arc<RootCertStore>,
    not_before: SystemTime,
    not_after: SystemTime,
    serial: String,
}

impl fmt::Debug for WorkloadIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadIdentity")
            .field("spiffe_id", &self.spiffe_id.to_string())
            .field("serial", &self.serial)
            .field("not_before", &files::rfc3339(self.not_before))
            .field("not_after", &files::rfc3339(self.not_after))
            .field("chain_len", &self.certified_key.cert.len())
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

/// The three files of a workload identity directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadPaths {
    /// `key.pem`.
    pub key: PathBuf,
    /// `cert-chain.pem`.
    pub cert_chain: PathBuf,
    /// `root-cert.pem`.
    pub root_cert: PathBuf,
}

impl WorkloadPaths {
    /// The Istio file names inside `dir`.
    pub fn new(dir: &Path) -> Self {
        WorkloadPaths {
            key: dir.join(KEY_FILE),
            cert_chain: dir.join(CERT_CHAIN_FILE),
            root_cert: dir.join(ROOT_CERT_FILE),
        }
    }
}

impl WorkloadIdentity {
    /// Loads `key.pem`, `cert-chain.pem` and `root-cert.pem` from `dir` and checks them: each
    /// file present, readable and PEM; the key matches the leaf; the leaf has exactly one URI
    /// SAN and it is an Istio SPIFFE ID; the chain leads to a root in `root-cert.pem` (with
    /// the serverAuth usage a mesh certificate carries); the leaf has not expired. Errors
    /// name the file and the problem.
    ///
    /// A leaf that is not valid *yet* is accepted with a warning (peers refuse it until its
    /// start), so that a small clock skew at rotation does not keep an old certificate.
    pub fn load(dir: &Path) -> Result<WorkloadIdentity, CertError> {
        let paths = WorkloadPaths::new(dir);
        let key = files::read_file(&paths.key)?;
        let chain = files::read_file(&paths.cert_chain)?;
        let roots = files::read_file(&paths.root_cert)?;
        let identity = Self::parse(&paths, &key, &chain, &roots)?;
        let now = SystemTime::now();
        if now > identity.not_after {
            return Err(CertError::Expired { path: paths.cert_chain, not_after: files::rfc3339(identity.not_after) });
        }
        if now < identity.not_before {
            tracing::warn!(
                file = %paths.cert_chain.display(),
                not_before = %files::rfc3339(identity.not_before),
                "workload certificate is not valid yet (clock skew?); peers will refuse it until then"
            );
        }
        Ok(identity)
    }

    /// Builds an identity from PEM text (key, chain with the leaf first, roots) with the checks
    /// of [`WorkloadIdentity::load`] except the validity period, which is not compared with the
    /// clock: tests use this to build expired and not-yet-valid peers. Errors name the
    /// in-memory parts as `<memory>/key.pem` and so on.
    pub fn from_pem(key_pem: &[u8], chain_pem: &[u8], roots_pem: &[u8]) -> Result<WorkloadIdentity, CertError> {
        Self::parse(&WorkloadPaths::new(Path::new("<memory>")), key_pem, chain_pem, roots_pem)
    }

    fn parse(paths: &WorkloadPaths, key: &[u8], chain: &[u8], roots: &[u8]) -> Result<WorkloadIdentity, CertError> {
        let key_der = files::parse_key(&paths.key, key)?;
        let chain = files::parse_certs(&paths.cert_chain, chain)?;
        let roots = files::parse_certs(&paths.root_cert, roots)?;

        let leaf = files::parse_x509(&paths.cert_chain, &chain[0])?;
        for (i, cert) in chain.iter().enumerate().skip(1) {
            files::parse_x509(&paths.cert_chain, cert).map_err(|e| CertError::BadCertificate {
                path: paths.cert_chain.clone(),
                reason: format!("certificate #{}: {e}", i + 1),
            })?;
        }
        let spiffe_id = files::spiffe_id_of(&leaf)
            .map_err(|reason| CertError::NoSpiffeId { path: paths.cert_chain.clone(), reason })?;
        let not_before = files::system_time(leaf.validity().not_before.timestamp());
        let not_after = files::system_time(leaf.validity().not_after.timestamp());
        let serial = files::serial_of(&leaf);

        let mut root_store = RootCertStore::empty();
        for (i, root) in roots.iter().enumerate() {
            root_store.add(root.clone()).map_err(|e| CertError::BadCertificate {
                path: paths.root_cert.clone(),
                reason: format!("certificate #{} is not a usable trust anchor: {e}", i + 1),
            })?;
        }

        let provider = crypto_provider();
        let signing_key = provider
            .key_provider
            .load_private_key(key_der)
            .map_err(|e| CertError::BadKey { path: paths.key.clone(), reason: e.to_string() })?;
        let certified_key = CertifiedKey::new(chain, signing_key);
        match certified_key.keys_match() {
            Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
            Err(_) => return Err(CertError::KeyMismatch { key: paths.key.clone(), cert: paths.cert_chain.clone() }),
        }

        // Check the chain against the roots at a time inside the leaf's validity: this finds
        // a wrong root-cert.pem or missing intermediates regardless of the clock.
        let at = SystemTime::now().clamp(not_before, not_after);
        let at = UnixTime::since_unix_epoch(at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or(Duration::ZERO));
        let untrusted = |reason: String| CertError::UntrustedChain {
            chain: paths.cert_chain.clone(),
            roots: paths.root_cert.clone(),
            reason,
        };
        let end_entity = ParsedCertificate::try_from(&certified_key.cert[0]).map_err(|e| untrusted(e.to_string()))?;
        verify_server_cert_signed_by_trust_anchor(
            &end_entity,
            &root_store,
            &certified_key.cert[1..],
            at,
            provider.signature_verification_algorithms.all,
        )
        .map_err(|e| untrusted(e.to_string()))?;

        Ok(WorkloadIdentity {
            spiffe_id,
            certified_key: Arc::new(certified_key),
            roots,
            root_store: Arc::new(root_store),
            not_before,
            not_after,
            serial,
        })
    }

    /// The SPIFFE ID in the leaf's URI SAN.
    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.spiffe_id
    }

    /// The certificate chain (leaf first) and signing key, as rustls presents them.
    pub fn certified_key(&self) -> &Arc<CertifiedKey> {
        &self.certified_key
    }

    /// The certificate chain, leaf first.
    pub fn cert_chain(&self) -> &[CertificateDer<'static>] {
        &self.certified_key.cert
    }

    /// The mesh roots from `root-cert.pem`.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The mesh roots as a rustls trust store.
    pub fn root_store(&self) -> &Arc<RootCertStore> {
        &self.root_store
    }

    /// Start of the leaf's validity.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// End of the leaf's validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The leaf's serial number, hex with colons.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// Whether the leaf has expired at `now`.
    pub fn is_expired_at(&self, now: SystemTime) -> bool {
        now > self.not_after
    }

    /// When a renewal should start: half-way through the leaf's lifetime, as Istio's agent
    /// (`SECRET_GRACE_PERIOD_RATIO` 0.5).
    pub fn refresh_at(&self) -> SystemTime {
        let lifetime = self.not_after.duration_since(self.not_before).unwrap_or(Duration::ZERO);
        self.not_before + lifetime / 2
    }
}

/// Writes an issued certificate to `dir` in Istio's layout (`key.pem` mode 0600,
/// `cert-chain.pem`, `root-cert.pem`), creating `dir` if needed. Each file is replaced
/// atomically (temporary file + rename); returns the paths written.
pub fn write_workload(dir: &Path, issued: &IssuedCert) -> Result<WorkloadPaths, CertError> {
    write_workload_pem(dir, issued.key_pem.as_bytes(), issued.chain_pem().as_bytes(), issued.roots_pem().as_bytes())
}

/// As [`write_workload`], from PEM text: for a certificate obtained elsewhere (a CSR answered
/// by the control plane). The roots are written first and the chain last, so that a reader
/// polling the directory sees the new leaf only once its key is in place.
pub fn write_workload_pem(
    dir: &Path,
    key_pem: &[u8],
    chain_pem: &[u8],
    roots_pem: &[u8],
) -> Result<WorkloadPaths, CertError> {
    files::create_dir(dir)?;
    let paths = WorkloadPaths::new(dir);
    files::write_atomic(&paths.root_cert, roots_pem, CERT_MODE)?;
    files::write_atomic(&paths.key, key_pem, KEY_MODE)?;
    files::write_atomic(&paths.cert_chain, chain_pem, CERT_MODE)?;
    Ok(paths)
}
