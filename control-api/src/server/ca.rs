//! The certificate service (`Certificates.CreateCertificate`): the mesh CA signs a
//! workload's CSR for the SPIFFE ID the caller is entitled to (Istio's model).
//!
//! - The CSR must ask for exactly one SAN, a `spiffe://` URI of the CA's trust domain
//!   (else INVALID_ARGUMENT).
//! - A caller with a verified mesh client certificate (TLS listener) may get its own
//!   identity again: a renewal. A caller with a bootstrap token gets the identity the
//!   token is bound to, or any identity of the trust domain for a `*` token. Anyone else
//!   is PERMISSION_DENIED (credentials, wrong identity) or UNAUTHENTICATED (none).
//! - Over the plaintext listener there is never a client certificate, so only a token
//!   gets a certificate there.
//! - The lifetime asked for is cut to the maximum; 0 asks for the default.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use serin_certs::{
    Ca, CertError, DEFAULT_TRUST_DOMAIN, DEFAULT_WORKLOAD_LIFETIME, SpiffeId, certs_to_pem, csr_spiffe_id,
};
use tonic::{Request, Response, Status};

use super::auth::{BootstrapTokens, Caller, caller};
use super::status::Observer;
use crate::pb;

/// The longest lifetime a workload certificate gets unless configured otherwise: Istio's
/// `MAX_WORKLOAD_CERT_TTL` default is 90 days; serin keeps certificates short, 24 h.
pub const DEFAULT_MAX_CERT_TTL: Duration = DEFAULT_WORKLOAD_LIFETIME;

/// The namespace of the control plane's own identity.
pub const CONTROL_PLANE_NAMESPACE: &str = "serin-system";
/// The service account of the control plane's own identity.
pub const CONTROL_PLANE_SERVICE_ACCOUNT: &str = "serin-control-plane";

/// Why the CA cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum CaSetupError {
    /// The trust domain given differs from the CA's own.
    #[error("--trust-domain {given} differs from the CA's trust domain {ca}")]
    TrustDomainMismatch {
        /// The trust domain given.
        given: String,
        /// The CA's.
        ca: String,
    },
    /// A trust domain that is not one.
    #[error("trust domain: {0}")]
    BadTrustDomain(#[from] serin_certs::SpiffeIdError),
    /// The default lifetime is longer than the maximum, or zero.
    #[error("certificate lifetimes: {0}")]
    Lifetime(String),
}

/// The CA behind the control plane and its signing rules.
#[derive(Debug, Clone)]
pub struct CaSettings {
    /// The signing CA (from `--ca-dir`).
    pub ca: Arc<Ca>,
    /// The trust domain every identity must be in.
    pub trust_domain: String,
    /// The bootstrap tokens accepted.
    pub tokens: Arc<BootstrapTokens>,
    /// Lifetime of a certificate whose request asks for none (default 24 h).
    pub default_ttl: Duration,
    /// Longest lifetime granted; longer requests are cut (default [`DEFAULT_MAX_CERT_TTL`]).
    pub max_ttl: Duration,
}

impl CaSettings {
    /// Settings for `ca` with default lifetimes and no tokens. The trust domain is the CA's
    /// own when it knows it, else `trust_domain`, else `cluster.local`; a `trust_domain`
    /// that contradicts the CA's is an error.
    pub fn new(ca: Ca, trust_domain: Option<&str>) -> Result<CaSettings, CaSetupError> {
        let trust_domain = match (ca.trust_domain(), trust_domain) {
            (Some(ca_td), Some(given)) if ca_td != given => {
                return Err(CaSetupError::TrustDomainMismatch { given: given.into(), ca: ca_td.into() });
            }
            (Some(td), _) | (None, Some(td)) => td.to_string(),
            (None, None) => DEFAULT_TRUST_DOMAIN.to_string(),
        };
        serin_certs::check_trust_domain(&trust_domain)?;
        Ok(CaSettings {
            ca: Arc::new(ca),
            trust_domain,
            tokens: Arc::new(BootstrapTokens::empty()),
            default_ttl: DEFAULT_WORKLOAD_LIFETIME,
            max_ttl: DEFAULT_MAX_CERT_TTL,
        })
    }

    /// Checks the lifetimes: both above zero, the default not above the maximum.
    pub fn check(&self) -> Result<(), CaSetupError> {
        if self.default_ttl.is_zero() || self.max_ttl.is_zero() {
            return Err(CaSetupError::Lifetime("lifetimes must be longer than 0s".into()));
        }
        if self.default_ttl > self.max_ttl {
            return Err(CaSetupError::Lifetime(format!(
                "the default lifetime {:?} is longer than the maximum {:?}",
                self.default_ttl, self.max_ttl
            )));
        }
        Ok(())
    }

    /// The control plane's own identity: `spiffe://<td>/ns/serin-system/sa/serin-control-plane`.
    pub fn control_plane_identity(&self) -> Result<SpiffeId, serin_certs::SpiffeIdError> {
        SpiffeId::new(&self.trust_domain, CONTROL_PLANE_NAMESPACE, CONTROL_PLANE_SERVICE_ACCOUNT)
    }

    /// The lifetime granted for a request of `seconds` (0 = default).
    pub fn granted_ttl(&self, seconds: u64) -> Duration {
        if seconds == 0 { self.default_ttl.min(self.max_ttl) } else { Duration::from_secs(seconds).min(self.max_ttl) }
    }

    /// Decides and signs one request; returns the response and how the caller was
    /// entitled (`certificate` or `token`).
    fn sign(&self, who: &Caller, request: &pb::CsrRequest) -> Result<(pb::CsrResponse, &'static str), Status> {
        if !who.is_authenticated() {
            return Err(Status::unauthenticated(if who.tls {
                "no credentials: the CA signs for a caller with a mesh client certificate (renewal) or a \
                 bootstrap token (metadata `authorization: Bearer TOKEN`)"
            } else {
                "no credentials: over the plaintext listener the CA signs only for a caller with a bootstrap \
                 token (metadata `authorization: Bearer TOKEN`); renewals with a client certificate go to the \
                 TLS listener (15012)"
            }));
        }
        let requested = csr_spiffe_id(&request.csr_pem).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if requested.trust_domain() != self.trust_domain {
            return Err(Status::invalid_argument(format!(
                "the CSR asks for {requested}, outside this CA's trust domain {}",
                self.trust_domain
            )));
        }
        let auth = if who.peer.as_ref() == Some(&requested) {
            "certificate"
        } else if who.token.as_ref().is_some_and(|scope| scope.allows(&requested)) {
            "token"
        } else {
            let mut reasons = Vec::new();
            if let Some(peer) = &who.peer {
                reasons.push(format!("the client certificate is {peer}, which may renew only its own identity"));
            }
            if let Some(scope) = &who.token {
                reasons.push(format!("the bootstrap token is bound to {scope}"));
            }
            return Err(Status::permission_denied(format!(
                "the CSR asks for {requested}, but {}",
                reasons.join(" and ")
            )));
        };
        let ttl = self.granted_ttl(request.validity_seconds);
        let signed = self.ca.sign_csr(&request.csr_pem, &requested, ttl).map_err(|e| match e {
            CertError::Csr { .. } | CertError::CsrIdentityMismatch { .. } => Status::invalid_argument(e.to_string()),
            other => {
                tracing::error!(error = %other, "signing a CSR failed");
                Status::internal(format!("the CA failed to sign: {other}"))
            }
        })?;
        let pem_each = |certs: &[serin_certs::rustls::pki_types::CertificateDer<'static>]| {
            certs.iter().map(|c| certs_to_pem([c])).collect::<Vec<_>>()
        };
        let not_after_unix = signed
            .not_after
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        Ok((
            pb::CsrResponse {
                cert_chain: pem_each(&signed.chain),
                root_certs: pem_each(&signed.roots),
                spiffe_id: signed.spiffe_id.to_string(),
                serial: signed.serial.clone(),
                not_after_unix,
                validity_seconds: ttl.as_secs(),
            },
            auth,
        ))
    }
}

/// The gRPC `Certificates` service.
#[derive(Clone)]
pub struct CaService {
    pub(crate) settings: Option<Arc<CaSettings>>,
    pub(crate) observer: Arc<dyn Observer>,
}

impl std::fmt::Debug for CaService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaService").field("settings", &self.settings).finish_non_exhaustive()
    }
}

#[tonic::async_trait]
impl pb::certificates_server::Certificates for CaService {
    async fn create_certificate(&self, request: Request<pb::CsrRequest>) -> Result<Response<pb::CsrResponse>, Status> {
        let Some(settings) = &self.settings else {
            self.observer.csr_refused(tonic::Code::FailedPrecondition);
            return Err(Status::failed_precondition(
                "this control plane has no CA: start it with --ca-dir to sign certificates",
            ));
        };
        let (node, remote) = who_summary(&request);
        let result = caller(&request, &settings.tokens).and_then(|who| settings.sign(&who, request.get_ref()));
        match result {
            Ok((response, auth)) => {
                self.observer.csr_signed(&response.spiffe_id, auth);
                tracing::info!(
                    spiffe_id = %response.spiffe_id,
                    serial = %response.serial,
                    validity_s = response.validity_seconds,
                    auth,
                    node = %node,
                    ?remote,
                    "certificate signed"
                );
                Ok(Response::new(response))
            }
            Err(status) => {
                self.observer.csr_refused(status.code());
                tracing::warn!(code = ?status.code(), reason = status.message(), node = %node, ?remote, "CSR refused");
                Err(status)
            }
        }
    }
}

/// The node id (cut to 128 characters) and address of a request, for logs.
fn who_summary(request: &Request<pb::CsrRequest>) -> (String, Option<std::net::SocketAddr>) {
    let node: String = request.get_ref().node_id.chars().take(128).collect();
    let remote = request
        .extensions()
        .get::<super::auth::MeshConnectInfo>()
        .and_then(|i| i.remote_addr)
        .or_else(|| request.remote_addr());
    (node, remote)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_is_capped_and_defaulted() {
        let mut settings = CaSettings::new(Ca::generate("cluster.local").expect("ca"), None).expect("settings");
        settings.max_ttl = Duration::from_secs(3600);
        settings.default_ttl = Duration::from_secs(600);
        assert_eq!(settings.granted_ttl(0), Duration::from_secs(600));
        assert_eq!(settings.granted_ttl(60), Duration::from_secs(60));
        assert_eq!(settings.granted_ttl(86_400), Duration::from_secs(3600));
        assert!(settings.check().is_ok());
        settings.default_ttl = Duration::from_secs(7200);
        assert!(settings.check().is_err());
    }

    #[test]
    fn trust_domain_comes_from_the_ca() {
        let ca = Ca::generate("example.org").expect("ca");
        assert!(matches!(CaSettings::new(ca, Some("cluster.local")), Err(CaSetupError::TrustDomainMismatch { .. })));
        let settings = CaSettings::new(Ca::generate("example.org").expect("ca"), None).expect("settings");
        assert_eq!(settings.trust_domain, "example.org");
        assert_eq!(
            settings.control_plane_identity().expect("id").to_string(),
            "spiffe://example.org/ns/serin-system/sa/serin-control-plane"
        );
    }
}
