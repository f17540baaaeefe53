//! The crate's error type: every variant that concerns a file names it.

use std::io;
use std::path::PathBuf;

use crate::spiffe::SpiffeIdError;

/// Everything that can go wrong while making, reading or using certificates.
///
/// Errors about a file carry its path and say what is wrong with it, so that a startup
/// error or a reload log line is enough to fix the problem.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// A file that must exist does not.
    #[error("{path}: file is missing")]
    Missing {
        /// The missing file.
        path: PathBuf,
    },
    /// A file exists but cannot be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// A file or directory cannot be written.
    #[error("{path}: cannot write: {source}")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// Refused to overwrite an existing CA key.
    #[error("{path}: already exists; refusing to overwrite an existing CA (move it away first)")]
    AlreadyExists {
        /// The existing file.
        path: PathBuf,
    },
    /// A file is not PEM, or has no PEM block of the expected kind.
    #[error("{path}: not PEM: {reason}")]
    NotPem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A certificate cannot be parsed or is not usable as it is.
    #[error("{path}: bad certificate: {reason}")]
    BadCertificate {
        /// The file holding the certificate.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A private key cannot be parsed or used.
    #[error("{path}: bad private key: {reason}")]
    BadKey {
        /// The key file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The private key does not belong to the certificate.
    #[error("{key}: private key does not match the certificate in {cert}")]
    KeyMismatch {
        /// The key file.
        key: PathBuf,
        /// The certificate file.
        cert: PathBuf,
    },
    /// The leaf certificate carries no (or no single valid) SPIFFE URI SAN.
    #[error("{path}: leaf certificate has no usable SPIFFE URI SAN: {reason}")]
    NoSpiffeId {
        /// The certificate file.
        path: PathBuf,
        /// What was found instead.
        reason: String,
    },
    /// The leaf certificate's validity has ended.
    #[error("{path}: certificate expired at {not_after}")]
    Expired {
        /// The certificate file.
        path: PathBuf,
        /// The end of validity, RFC 3339.
        not_after: String,
    },
    /// A certificate that must be a CA is not one.
    #[error("{path}: not a CA certificate: {reason}")]
    NotCa {
        /// The certificate file.
        path: PathBuf,
        /// What is missing.
        reason: String,
    },
    /// A certificate chain does not lead to the given roots.
    #[error("{chain}: does not chain to the root(s) in {roots}: {reason}")]
    UntrustedChain {
        /// The chain file.
        chain: PathBuf,
        /// The roots file.
        roots: PathBuf,
        /// The verifier's reason.
        reason: String,
    },
    /// A directory holds no CA in either supported layout.
    #[error(
        "{dir}: no CA found: expected root-cert.pem + root-key.pem (serin ca init) or Istio's \
         plug-in layout ca-cert.pem + ca-key.pem + root-cert.pem + cert-chain.pem"
    )]
    NoCa {
        /// The directory.
        dir: PathBuf,
    },
    /// A SPIFFE ID is invalid.
    #[error(transparent)]
    Spiffe(#[from] SpiffeIdError),
    /// A certificate signing request is unusable.
    #[error("invalid CSR: {reason}")]
    Csr {
        /// What is wrong.
        reason: String,
    },
    /// A certificate signing request asks for another identity than the caller's.
    #[error("CSR asks for {requested}, but the caller's identity is {expected}")]
    CsrIdentityMismatch {
        /// The SAN(s) the CSR asked for.
        requested: String,
        /// The identity the CA was asked to certify.
        expected: String,
    },
    /// A validity period is empty or cannot be represented.
    #[error("invalid validity period: {reason}")]
    Validity {
        /// What is wrong.
        reason: String,
    },
    /// rcgen failed to build a key or certificate.
    #[error("certificate generation failed ({context}): {source}")]
    Generate {
        /// What was being generated.
        context: &'static str,
        /// rcgen's error.
        source: rcgen::Error,
    },
    /// rustls refused a configuration.
    #[error("TLS configuration ({context}): {source}")]
    Tls {
        /// What was being configured.
        context: &'static str,
        /// rustls's error.
        source: rustls::Error,
    },
    /// rustls refused to build a client-certificate verifier (e.g. no usable roots).
    #[error("TLS client verifier ({context}): {source}")]
    Verifier {
        /// What was being configured.
        context: String,
        /// rustls's error.
        source: rustls::server::VerifierBuilderError,
    },
    /// An SNI pattern for the gateway resolver is invalid.
    #[error("invalid SNI host pattern {pattern:?}: {reason}")]
    SniPattern {
        /// The pattern.
        pattern: String,
        /// What is wrong.
        reason: String,
    },
}
