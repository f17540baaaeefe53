//! rustls configurations: mesh mTLS between sidecars (SPIFFE identities, DNS names ignored)
//! and plain server certificates for the edge gateway (SIMPLE / MUTUAL, SNI selection).
//!
//! Every config is built with the `ring` provider explicitly ([`crypto_provider`]); nothing
//! here installs a process-wide default provider.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use rustls::client::Resumption;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::version::{TLS12, TLS13};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore, ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::error::CertError;
use crate::files;
use crate::spiffe::SpiffeId;
use crate::workload::WorkloadIdentity;

/// ALPN `h2`.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN `http/1.1`.
pub const ALPN_HTTP11: &[u8] = b"http/1.1";
/// What sidecars offer and accept between each other: `h2`, then `http/1.1`.
pub const MESH_ALPN: &[&[u8]] = &[ALPN_H2, ALPN_HTTP11];

/// The crypto provider of every config made here: rustls's `ring` provider (one shared
/// instance) with AES-128-GCM preferred (see [`prefers_aes128`]). Use it for any other
/// rustls config in serin, rather than a process default.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let mut provider = rustls::crypto::ring::default_provider();
            // A stable sort: the rest keeps ring's order (AES-256-GCM, then ChaCha20).
            provider.cipher_suites.sort_by_key(|s| !prefers_aes128(s.suite()));
            Arc::new(provider)
        })
        .clone()
}

/// The suites [`crypto_provider`] puts first: AES-128-GCM, as BoringSSL (Envoy, so Istio's
/// sidecars) does on CPUs with AES instructions. rustls's own order starts with AES-256-GCM
/// (14 rounds per block instead of 10; on 1 KiB records GHASH and set-up dominate, so
/// the saving is small: ~300 instructions per request and side, issue 6).
fn prefers_aes128(suite: rustls::CipherSuite) -> bool {
    use rustls::CipherSuite as S;
    matches!(
        suite,
        S::TLS13_AES_128_GCM_SHA256
            | S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            | S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
    )
}

/// Whether a server asks for and requires a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientAuth {
    /// A client certificate chaining to the roots is required (mesh mTLS; STRICT).
    #[default]
    Required,
    /// A client certificate is requested and verified if sent, but may be absent.
    Optional,
}

fn alpn_vec(alpn: &[&[u8]]) -> Vec<Vec<u8>> {
    alpn.iter().map(|p| p.to_vec()).collect()
}

fn tls_err(context: &'static str) -> impl FnOnce(rustls::Error) -> CertError {
    move |source| CertError::Tls { context, source }
}

fn client_verifier(
    roots: Arc<RootCertStore>,
    client_auth: ClientAuth,
    context: impl FnOnce() -> String,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, CertError> {
    let mut builder = WebPkiClientVerifier::builder_with_provider(roots, crypto_provider());
    if client_auth == ClientAuth::Optional {
        builder = builder.allow_unauthenticated();
    }
    builder.build().map_err(|source| CertError::Verifier { context: context(), source })
}

/// A server config for a mesh inbound listener: presents the workload's certificate, verifies
/// client chains against the mesh roots (`WebPkiClientVerifier`: chain, validity, clientAuth
/// usage; no name is pinned: callers are identified afterwards with [`peer_spiffe_id`]), TLS
/// 1.3 and 1.2, and the given ALPN protocols in order of preference ([`MESH_ALPN`]).
pub fn server_config(
    identity: &WorkloadIdentity,
    client_auth: ClientAuth,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, CertError> {
    let verifier = client_verifier(identity.root_store().clone(), client_auth, || "mesh roots".into())?;
    let resolver = Arc::new(SingleCertAndKey::from(identity.certified_key().clone()));
    let mut config = ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&TLS13, &TLS12])
        .map_err(tls_err("mesh server protocol versions"))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    config.alpn_protocols = alpn_vec(alpn);
    Ok(Arc::new(config))
}

/// A client config for mesh outbound connections: presents the workload's certificate,
/// verifies the server's chain against the mesh roots with [`MeshServerVerifier`] (which
/// ignores the DNS name: mesh certificates carry only a URI SAN), TLS 1.3 and 1.2, the given
/// ALPN offer, and no session resumption (every connection verifies the current peer).
///
/// The caller must check the server's identity after the handshake, with
/// [`verify_peer_identity`] on `peer_certificates()`.
pub fn client_config(identity: &WorkloadIdentity, alpn: &[&[u8]]) -> Result<Arc<ClientConfig>, CertError> {
    let verifier = Arc::new(MeshServerVerifier::new(identity.root_store().clone()));
    let resolver = Arc::new(SingleCertAndKey::from(identity.certified_key().clone()));
    let mut config = ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&TLS13, &TLS12])
        .map_err(tls_err("mesh client protocol versions"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(resolver);
    config.alpn_protocols = alpn_vec(alpn);
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// Verifies a mesh server's certificate chain against the mesh roots (webpki: signatures,
/// validity, serverAuth usage) and requires a SPIFFE URI SAN, but does not check the DNS
/// server name: which SPIFFE ID is acceptable depends on the endpoint and is checked by the
/// caller after the handshake ([`verify_peer_identity`]).
#[derive(Debug)]
pub struct MeshServerVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl MeshServerVerifier {
    /// A verifier trusting `roots`.
    pub fn new(roots: Arc<RootCertStore>) -> Self {
        MeshServerVerifier { roots, provider: crypto_provider() }
    }
}

/// Why a mesh server certificate was refused although its chain is valid.
#[derive(Debug, thiserror::Error)]
#[error("server certificate has no SPIFFE identity: {0}")]
struct NoSpiffeIdentity(String);

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        if let Err(reason) = spiffe_id_of_der(end_entity) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
                NoSpiffeIdentity(reason),
            )))));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

fn spiffe_id_of_der(cert: &CertificateDer<'_>) -> Result<SpiffeId, String> {
    let x509 = files::parse_x509(Path::new("peer"), cert).map_err(|e| e.to_string())?;
    files::spiffe_id_of(&x509)
}

/// The SPIFFE ID of a peer, from the leaf (first) certificate of its chain as rustls gives it
/// (`peer_certificates()`): `None` when there is no certificate, or the leaf does not have
/// exactly one URI SAN holding a valid Istio SPIFFE ID.
pub fn peer_spiffe_id(certs: &[CertificateDer<'_>]) -> Option<SpiffeId> {
    spiffe_id_of_der(certs.first()?).ok()
}

/// Why a verified peer is not the one expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerIdentityError {
    /// The peer sent no certificate.
    #[error("peer presented no certificate")]
    NoCertificate,
    /// The peer's certificate has no usable SPIFFE ID.
    #[error("peer certificate has no SPIFFE identity: {0}")]
    NoSpiffeId(String),
    /// The peer is someone else.
    #[error("peer identity is {actual}, expected {expected}")]
    Mismatch {
        /// The identity the peer presented.
        actual: SpiffeId,
        /// The acceptable identities, comma-separated.
        expected: String,
    },
}

/// Checks, after a handshake, that the peer's SPIFFE ID is one of `expected` (exact match, as
/// Istio's client side does with the destination's service accounts) and returns it. An empty
/// `expected` accepts any identity.
pub fn verify_peer_identity(
    certs: &[CertificateDer<'_>],
    expected: &[SpiffeId],
) -> Result<SpiffeId, PeerIdentityError> {
    let leaf = certs.first().ok_or(PeerIdentityError::NoCertificate)?;
    let actual = spiffe_id_of_der(leaf).map_err(PeerIdentityError::NoSpiffeId)?;
    if expected.is_empty() || expected.contains(&actual) {
        Ok(actual)
    } else {
        let expected = expected.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
        Err(PeerIdentityError::Mismatch { actual, expected })
    }
}

// ---------------------------------------------------------------------------------------------
// Edge gateway: ordinary DNS certificates.

/// Loads a PEM certificate chain (leaf first) and its PEM private key (PKCS#8, PKCS#1 or SEC1)
/// for a gateway server, checking that the key matches the leaf. No SPIFFE ID is required and
/// the chain is not verified; an expired leaf is loaded with a warning (clients decide).
pub fn load_certified_key(cert_pem_path: &Path, key_pem_path: &Path) -> Result<Arc<CertifiedKey>, CertError> {
    let chain = files::parse_certs(cert_pem_path, &files::read_file(cert_pem_path)?)?;
    let key = files::parse_key(key_pem_path, &files::read_file(key_pem_path)?)?;
    let leaf = files::parse_x509(cert_pem_path, &chain[0])?;
    let not_after = files::system_time(leaf.validity().not_after.timestamp());
    if SystemTime::now() > not_after {
        tracing::warn!(file = %cert_pem_path.display(), not_after = %files::rfc3339(not_after), "server certificate has expired");
    }
    let signing_key = crypto_provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| CertError::BadKey { path: key_pem_path.to_path_buf(), reason: e.to_string() })?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(Arc::new(certified)),
        Err(_) => Err(CertError::KeyMismatch { key: key_pem_path.to_path_buf(), cert: cert_pem_path.to_path_buf() }),
    }
}

/// Loads a PEM file of CA certificates into a trust store (gateway MUTUAL `caCertificates`).
pub fn load_root_store(ca_pem_path: &Path) -> Result<Arc<RootCertStore>, CertError> {
    let certs = files::parse_certs(ca_pem_path, &files::read_file(ca_pem_path)?)?;
    let mut store = RootCertStore::empty();
    for (i, cert) in certs.into_iter().enumerate() {
        store.add(cert).map_err(|e| CertError::BadCertificate {
            path: ca_pem_path.to_path_buf(),
            reason: format!("certificate #{} is not a usable trust anchor: {e}", i + 1),
        })?;
    }
    Ok(Arc::new(store))
}

/// A gateway server config from files: Istio `tls.mode: SIMPLE` (`client_ca` = `None`) or
/// `MUTUAL` (client certificates required and verified against the CAs in `client_ca`).
/// TLS 1.3 and 1.2; `alpn` in order of preference.
pub fn server_config_from_files(
    cert_pem_path: &Path,
    key_pem_path: &Path,
    client_ca: Option<&Path>,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, CertError> {
    let key = load_certified_key(cert_pem_path, key_pem_path)?;
    server_config_with_resolver(Arc::new(SingleCertAndKey::from(key)), client_ca, alpn)
}

/// A gateway server config whose certificate is chosen by `resolver` (e.g. a [`SniResolver`]),
/// optionally requiring client certificates from the CAs in `client_ca` (MUTUAL).
pub fn server_config_with_resolver(
    resolver: Arc<dyn ResolvesServerCert>,
    client_ca: Option<&Path>,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, CertError> {
    let builder = ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&TLS13, &TLS12])
        .map_err(tls_err("gateway protocol versions"))?;
    let builder = match client_ca {
        Some(path) => {
            builder.with_client_cert_verifier(client_verifier(load_root_store(path)?, ClientAuth::Required, || {
                path.display().to_string()
            })?)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(resolver);
    config.alpn_protocols = alpn_vec(alpn);
    Ok(Arc::new(config))
}

/// Chooses a gateway certificate by the client's SNI, as Envoy matches `server_names`.
///
/// Patterns are exact host names (`bookinfo.example.com`), `*.suffix` wildcards (matching any
/// name ending in `.suffix`, at any depth: `*.example.com` matches `a.example.com` and
/// `a.b.example.com` but not `example.com`) or `*` (any name, and clients without SNI).
/// Matching ignores case and a trailing dot; an exact name wins over wildcards, and a longer
/// wildcard suffix over a shorter one. A client without SNI gets the `*` certificate, if any.
#[derive(Debug, Clone, Default)]
pub struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `(".suffix", key)`, longest suffix first.
    wildcards: Vec<(String, Arc<CertifiedKey>)>,
    default: Option<Arc<CertifiedKey>>,
}

fn normalize_host(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl SniResolver {
    /// An empty resolver (it resolves nothing until patterns are added).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a certificate for a host pattern. Errors on a malformed pattern or a pattern that
    /// already has a certificate.
    pub fn add(&mut self, pattern: &str, key: Arc<CertifiedKey>) -> Result<(), CertError> {
        let bad = |reason: &str| CertError::SniPattern { pattern: pattern.to_string(), reason: reason.to_string() };
        let host = normalize_host(pattern);
        let valid =
            |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
        if host == "*" {
            if self.default.is_some() {
                return Err(bad("'*' already has a certificate"));
            }
            self.default = Some(key);
        } else if let Some(suffix) = host.strip_prefix("*.") {
            if !valid(suffix) || suffix.starts_with('.') || suffix.contains("..") {
                return Err(bad("a wildcard must be '*.' followed by a host name"));
            }
            let suffix = format!(".{suffix}");
            if self.wildcards.iter().any(|(s, _)| *s == suffix) {
                return Err(bad("this pattern already has a certificate"));
            }
            self.wildcards.push((suffix, key));
            self.wildcards.sort_by_key(|(suffix, _)| std::cmp::Reverse(suffix.len()));
        } else {
            if !valid(&host) || host.starts_with('.') || host.contains("..") {
                return Err(bad("expected a host name, '*.suffix' or '*'"));
            }
            if self.exact.insert(host, key).is_some() {
                return Err(bad("this pattern already has a certificate"));
            }
        }
        Ok(())
    }

    /// Whether no certificate has been added.
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wildcards.is_empty() && self.default.is_none()
    }

    /// The certificate for a server name (`None` = the client sent no SNI).
    pub fn resolve_name(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let Some(sni) = sni else {
            return self.default.clone();
        };
        let name = normalize_host(sni);
        if let Some(key) = self.exact.get(&name) {
            return Some(key.clone());
        }
        self.wildcards
            .iter()
            .find(|(suffix, _)| name.len() > suffix.len() && name.ends_with(suffix.as_str()))
            .map(|(_, key)| key.clone())
            .or_else(|| self.default.clone())
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.resolve_name(client_hello.server_name())
    }
}
