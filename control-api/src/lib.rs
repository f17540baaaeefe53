//! The control API of serin: the discovery protocol between `serin control-plane` and
//! the sidecars (xDS in spirit), the management API `serin ctl` calls, the certificate
//! service (the mesh CA signing CSRs), the control-plane server ([`server`]), the clients
//! ([`client`]) and how they connect, plaintext or TLS ([`transport`]).
//!
//! Resources are Istio documents as YAML, grouped by type ([`types`]): the sidecar
//! compiles them with the same validate-and-compile code it uses for files. The store
//! edits them in [`yaml`], the project's one ordered YAML tree (`serin inject` uses it
//! too).
//!
//! Sidecars also send per-version load reports on their discovery stream
//! (`DiscoveryRequest.load_report`, [`client::LoadReports`]); the control plane sums
//! them per second over 15 minutes ([`server::LoadStats`]) and answers `GetLoad` (the
//! `Load` service, [`client::LoadClient`]).

#![warn(missing_docs)]

pub mod client;
pub mod server;
pub mod transport;
pub mod types;
pub mod yaml;

/// Generated protobuf messages and tonic services of `serin.control.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("serin.control.v1");
}

pub use types::{
    CLUSTERS_TYPE_URL, ENDPOINTS_TYPE_URL, MAX_MESSAGE_SIZE, POLICIES_TYPE_URL, ROUTES_TYPE_URL, ResourceType,
    YAML_CONTENT_TYPE,
};
