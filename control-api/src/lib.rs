//! The control API of serin: the discovery protocol between `serin control-plane` and
//! the sidecars, the management API `serin ctl` calls, the control-plane server
//! ([`server`]) and the clients ([`client`]).

/// Generated protobuf messages and tonic services of `serin.control.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("serin.control.v1");
}
