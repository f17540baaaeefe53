//! serin: a service-mesh sidecar proxy for canary releases.
//!
//! The crate holds the data plane (listeners, routing, load balancing, upstream
//! pools, retries, metrics, admin) and the `serin` binary's subcommands.

pub mod access_log;
pub mod body;
pub mod cli;
pub mod drain;
pub mod flags;
pub mod metrics;
pub mod request_info;
pub mod snapshot;
pub mod state;
pub mod upstream;
