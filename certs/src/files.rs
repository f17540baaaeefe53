//! File names, atomic writes, PEM and X.509 parsing helpers shared by the CA and the
//! workload identity. Every error names the file it is about.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::error::CertError;
use crate::spiffe::SpiffeId;

/// Workload private key (Istio's name), written with mode 0600.
pub const KEY_FILE: &str = "key.pem";
/// Workload certificate chain: the leaf first, then intermediates (Istio's name).
pub const CERT_CHAIN_FILE: &str = "cert-chain.pem";
/// The mesh root certificate(s) (Istio's name); also the root of a CA directory.
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
/// The root CA's private key written by `serin ca init`, mode 0600.
pub const ROOT_KEY_FILE: &str = "root-key.pem";
/// Istio plug-in CA: the signing (intermediate) CA certificate.
pub const CA_CERT_FILE: &str = "ca-cert.pem";
/// Istio plug-in CA: the signing CA's private key, mode 0600.
pub const CA_KEY_FILE: &str = "ca-key.pem";

/// Mode of private key files.
pub(crate) const KEY_MODE: u32 = 0o600;
/// Mode of certificate files.
pub(crate) const CERT_MODE: u32 = 0o644;

/// Reads a whole file; a missing file is [`CertError::Missing`], anything else [`CertError::Read`].
pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>, CertError> {
    fs::read(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => CertError::Missing { path: path.to_path_buf() },
        _ => CertError::Read { path: path.to_path_buf(), source },
    })
}

/// Parses every `CERTIFICATE` block of a PEM file; at least one must be present.
pub(crate) fn parse_certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::NotPem { path: path.to_path_buf(), reason: pem_reason(e) })?;
    if certs.is_empty() {
        return Err(CertError::NotPem { path: path.to_path_buf(), reason: "no CERTIFICATE block found".into() });
    }
    Ok(certs)
}

/// Parses the first private key block (PKCS#8, PKCS#1 RSA or SEC1 EC) of a PEM file.
pub(crate) fn parse_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, CertError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| {
        let reason = match e {
            rustls_pki_types::pem::Error::NoItemsFound => {
                "no PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY block found".to_string()
            }
            other => pem_reason(other),
        };
        CertError::NotPem { path: path.to_path_buf(), reason }
    })
}

/// A PEM parse error as text. The markers and lines the parser quotes are bytes, which its
/// own `Display` prints as a list of numbers; here they are text.
fn pem_reason(e: rustls_pki_types::pem::Error) -> String {
    use rustls_pki_types::pem::Error;
    match e {
        Error::MissingSectionEnd { end_marker } => {
            let label = String::from_utf8_lossy(&end_marker);
            format!("missing the \"-----END {}-----\" line (truncated file?)", label.trim())
        }
        Error::IllegalSectionStart { line } => {
            format!("malformed BEGIN line {:?}", String::from_utf8_lossy(&line).trim())
        }
        other => other.to_string(),
    }
}

/// Parses a DER certificate with x509-parser; the error names `path`.
pub(crate) fn parse_x509<'a>(path: &Path, der: &'a [u8]) -> Result<X509Certificate<'a>, CertError> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(CertError::BadCertificate { path: path.to_path_buf(), reason: "trailing bytes after DER".into() }),
        Err(e) => Err(CertError::BadCertificate { path: path.to_path_buf(), reason: e.to_string() }),
    }
}

/// The single SPIFFE ID in a certificate's URI SANs, or why there is none.
///
/// The SPIFFE X.509-SVID rules apply: exactly one URI SAN, and it must be a SPIFFE ID (here
/// additionally in Istio's `/ns/<ns>/sa/<sa>` form).
pub(crate) fn spiffe_id_of(cert: &X509Certificate<'_>) -> Result<SpiffeId, String> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("subjectAltName extension is malformed: {e}"))?
        .ok_or_else(|| "no subjectAltName extension".to_string())?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => Err("no URI SAN".into()),
        [one] => one.parse::<SpiffeId>().map_err(|e| e.to_string()),
        many => Err(format!("{} URI SANs ({}); an X.509-SVID has exactly one", many.len(), many.join(", "))),
    }
}

/// A certificate's serial number as lower-case hex with colons (as `openssl x509` prints it).
pub(crate) fn serial_of(cert: &X509Certificate<'_>) -> String {
    cert.raw_serial().iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Seconds since the Unix epoch to `SystemTime` (times before 1970 clamp to the epoch).
pub(crate) fn system_time(unix_seconds: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(unix_seconds).unwrap_or(0))
}

/// RFC 3339 text of a time, for messages.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// PEM text of certificates, one `CERTIFICATE` block each, LF line endings.
pub fn certs_to_pem<'a>(certs: impl IntoIterator<Item = &'a CertificateDer<'a>>) -> String {
    certs.into_iter().map(|c| pem_block("CERTIFICATE", c.as_ref())).collect()
}

/// One PEM block with LF line endings.
pub(crate) fn pem_block(tag: &str, der: &[u8]) -> String {
    pem::encode_config(&pem::Pem::new(tag, der), pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF))
}

/// Creates `dir` (and parents) if needed.
pub(crate) fn create_dir(dir: &Path) -> Result<(), CertError> {
    fs::create_dir_all(dir).map_err(|source| CertError::Write { path: dir.to_path_buf(), source })
}

/// Writes `contents` to `path` atomically: a temporary file in the same directory, created
/// with `mode`, flushed to disk, then renamed over `path`. Readers see the old or the new
/// file, never a half-written one, and a key file is never readable by others, not even
/// for a moment.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), CertError> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "file".into());
    let nonce: u64 = rand::random();
    let tmp: PathBuf = dir.join(format!(".{name}.tmp.{}.{nonce:016x}", std::process::id()));
    let result = (|| -> io::Result<()> {
        let mut file = OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)
    })();
    result.map_err(|source| {
        let _ = fs::remove_file(&tmp);
        CertError::Write { path: path.to_path_buf(), source }
    })
}
