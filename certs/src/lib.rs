//! Identity and certificates for serin: SPIFFE identities, the mesh CA, workload
//! certificates on disk, rustls configurations for mesh mTLS and the edge gateway, and
//! certificate rotation.
//!
//! - [`SpiffeId`]: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`, strictly
//!   parsed.
//! - [`Ca`]: a self-signed root ([`Ca::init`]) or an Istio plug-in intermediate
//!   ([`Ca::load`]); issues workload certificates ([`Ca::issue`]) and signs CSRs
//!   ([`Ca::sign_csr`]); [`generate_csr`] / [`csr_spiffe_id`] are the two ends of a CSR.
//! - [`write_workload`] / [`WorkloadIdentity::load`]: Istio's workload layout (`key.pem`,
//!   `cert-chain.pem`, `root-cert.pem`), checked on load with errors naming the file.
//! - [`server_config`] / [`client_config`]: mesh mTLS with the `ring` provider; the client
//!   verifies the chain but not the DNS name, and the caller checks the peer's SPIFFE ID with
//!   [`verify_peer_identity`] / [`peer_spiffe_id`].
//! - [`server_config_from_files`], [`SniResolver`]: the gateway's ordinary certificates.
//! - [`CertSource`], [`IdentityWatcher`]: where a sidecar's certificates come from, reloaded
//!   on change, keeping the old identity when new files are bad.
//!
//! Nothing here panics on file or peer input, and nothing installs a process-wide rustls
//! crypto provider.

#![warn(missing_docs)]

mod ca;
mod csr;
mod error;
mod files;
mod spiffe;
mod tls;
mod watcher;
mod workload;

pub use ca::{
    BACKDATE, Ca, DEFAULT_TRUST_DOMAIN, DEFAULT_WORKLOAD_LIFETIME, IssuedCert, ROOT_LIFETIME, SignedCert,
    ca_trust_domain,
};
pub use csr::{CsrKey, MAX_CSR_LEN, csr_spiffe_id, generate_csr};
pub use error::CertError;
pub use files::{
    CA_CERT_FILE, CA_KEY_FILE, CERT_CHAIN_FILE, KEY_FILE, ROOT_CERT_FILE, ROOT_KEY_FILE, certs_to_pem, write_atomic,
};
pub use spiffe::{SpiffeId, SpiffeIdError, check_trust_domain};
pub use tls::{
    ALPN_H2, ALPN_HTTP11, ClientAuth, MESH_ALPN, MeshServerVerifier, PeerIdentityError, SniResolver, client_config,
    crypto_provider, load_certified_key, load_root_store, peer_spiffe_id, server_config, server_config_from_files,
    server_config_with_resolver, verify_peer_identity,
};
pub use watcher::{
    BundleOptions, CertSource, IdentityBundle, IdentityWatcher, StaticCertSource, WatcherOptions, WatcherStatus,
};
pub use workload::{WorkloadIdentity, WorkloadPaths, write_workload, write_workload_pem};

/// Re-export of the rustls version the configs are built with.
pub use rustls;
