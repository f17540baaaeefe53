//! serin: a service-mesh sidecar proxy for canary releases.
//!
//! The crate holds the data plane (listeners, routing, load balancing, upstream
//! pools, retries, metrics, admin) and the `serin` binary's subcommands.

pub mod access_log;
pub mod admin;
pub mod body;
pub mod ca_cmd;
pub mod cert_client;
pub mod cli;
pub mod cli_deferred;
pub mod config;
pub mod control_plane;
pub mod cork;
pub mod ctl;
pub mod ctl_canary;
pub mod ctl_load;
pub mod dashboard;
pub mod demo;
pub mod demo_app;
pub mod demo_load;
pub mod drain;
pub mod flags;
pub mod forward;
pub mod gateway;
pub mod graceful;
pub mod idle;
pub mod inbound;
pub mod inject;
pub mod iptables;
pub mod load_report;
pub mod mesh_tls;
pub mod metrics;
pub mod original_dst;
pub mod outbound;
pub mod reload;
pub mod request_info;
pub mod router;
pub mod runtime;
pub mod security;
pub mod sidecar;
pub mod snapshot;
pub mod sniff;
pub mod state;
pub mod tcp_proxy;
pub mod upstream;
pub mod xds_client;
