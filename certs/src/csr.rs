//! Certificate signing requests, both sides: a workload makes a key and a CSR for its SPIFFE
//! ID ([`generate_csr`]); the control plane's CA reads which identity a CSR asks for
//! ([`csr_spiffe_id`]) before deciding whether the caller may have it and signing it with
//! [`crate::Ca::sign_csr`].

use std::fmt;

use rcgen::string::Ia5String;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

use crate::error::CertError;
use crate::spiffe::SpiffeId;

/// Largest CSR [`csr_spiffe_id`] reads (PEM text): a P-256 CSR is well under 1 KiB.
pub const MAX_CSR_LEN: usize = 16 * 1024;

/// A fresh workload key with a CSR for it.
#[derive(Clone)]
pub struct CsrKey {
    /// The identity the CSR asks for.
    pub spiffe_id: SpiffeId,
    /// The private key, PKCS#8 PEM (P-256). Stays with the workload.
    pub key_pem: String,
    /// The PKCS#10 request, PEM (`CERTIFICATE REQUEST`).
    pub csr_pem: String,
}

impl fmt::Debug for CsrKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CsrKey").field("spiffe_id", &self.spiffe_id.to_string()).finish_non_exhaustive()
    }
}

/// Makes an ECDSA P-256 key and a CSR for `id`, in Istio's form: no subject, one URI SAN
/// holding the SPIFFE ID.
pub fn generate_csr(id: &SpiffeId) -> Result<CsrKey, CertError> {
    let gen_err = |context: &'static str| move |source| CertError::Generate { context, source };
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(gen_err("workload key"))?;
    let uri = Ia5String::try_from(id.to_string()).map_err(gen_err("URI SAN"))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(uri)];
    let csr = params.serialize_request(&key).map_err(gen_err("certificate signing request"))?;
    let csr_pem = csr.pem().map_err(gen_err("certificate signing request PEM"))?;
    Ok(CsrKey { spiffe_id: id.clone(), key_pem: key.serialize_pem(), csr_pem })
}

/// The SPIFFE ID a PEM CSR asks for, after checking the request: PEM of a
/// `CERTIFICATE REQUEST`, at most [`MAX_CSR_LEN`] bytes, a valid signature (the requester
/// holds the key), and subject alternative names that are exactly one URI, an Istio SPIFFE
/// ID. Anything else is [`CertError::Csr`] saying what was found. The trust domain is not
/// checked here; the caller compares it with its own.
pub fn csr_spiffe_id(csr_pem: &str) -> Result<SpiffeId, CertError> {
    let csr_err = |reason: String| CertError::Csr { reason };
    if csr_pem.len() > MAX_CSR_LEN {
        return Err(csr_err(format!("{} bytes; the limit is {MAX_CSR_LEN}", csr_pem.len())));
    }
    let block = pem::parse(csr_pem).map_err(|e| csr_err(format!("not PEM: {e}")))?;
    if block.tag() != "CERTIFICATE REQUEST" && block.tag() != "NEW CERTIFICATE REQUEST" {
        return Err(csr_err(format!("PEM block is {:?}, expected \"CERTIFICATE REQUEST\"", block.tag())));
    }
    let (_, csr) = X509CertificationRequest::from_der(block.contents())
        .map_err(|e| csr_err(format!("cannot parse the request: {e}")))?;
    csr.verify_signature().map_err(|e| csr_err(format!("signature does not verify: {e}")))?;
    let mut names: Vec<&GeneralName<'_>> = Vec::new();
    for ext in csr.requested_extensions().into_iter().flatten() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext {
            names.extend(san.general_names.iter());
        }
    }
    match names.as_slice() {
        [] => Err(csr_err("no subject alternative name; a CSR must ask for exactly one spiffe:// URI".into())),
        [GeneralName::URI(uri)] => {
            uri.parse::<SpiffeId>().map_err(|e| csr_err(format!("the URI SAN is not a SPIFFE ID: {e}")))
        }
        many => {
            let list = many.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", ");
            Err(csr_err(format!("subject alternative names {list}; a CSR must ask for exactly one spiffe:// URI")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_csr_reads_back() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/payment".parse().unwrap();
        let made = generate_csr(&id).unwrap();
        assert_eq!(csr_spiffe_id(&made.csr_pem).unwrap(), id);
        assert!(made.key_pem.contains("PRIVATE KEY"));
        assert!(!format!("{made:?}").contains("PRIVATE"), "Debug hides the key");
    }

    #[test]
    fn refuses_other_sans_and_garbage() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let dns = CertificateParams::new(vec!["payment.example".to_string()]).unwrap();
        let err = csr_spiffe_id(&dns.serialize_request(&key).unwrap().pem().unwrap()).unwrap_err().to_string();
        assert!(err.contains("exactly one spiffe:// URI"), "{err}");
        let none = CertificateParams::new(Vec::<String>::new()).unwrap();
        let err = csr_spiffe_id(&none.serialize_request(&key).unwrap().pem().unwrap()).unwrap_err().to_string();
        assert!(err.contains("no subject alternative name"), "{err}");
        let mut uri = CertificateParams::default();
        uri.subject_alt_names = vec![SanType::URI(Ia5String::try_from("https://example.org/x").unwrap())];
        let err = csr_spiffe_id(&uri.serialize_request(&key).unwrap().pem().unwrap()).unwrap_err().to_string();
        assert!(err.contains("not a SPIFFE ID"), "{err}");
        assert!(csr_spiffe_id("hello").is_err());
        assert!(csr_spiffe_id(&"A".repeat(MAX_CSR_LEN + 1)).unwrap_err().to_string().contains("limit"));
    }
}
