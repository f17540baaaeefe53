//! Load generator and benchmarks for serin (see README.md in this folder).
//!
//! - [`load`]: the core of the `serin-load` tool, usable from tests: run a load
//!   described by a [`load::LoadConfig`] and get a [`load::LoadReport`].
//! - [`cli`]: its command line.
//! - [`push`]: the core of `serin-push-latency`: weight changes pushed by a real
//!   `serin control-plane` to N simulated sidecar streams, timed to the last ACK.

pub mod cli;
pub mod load;
pub mod push;
