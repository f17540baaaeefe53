//! Command-line interface: the `serin` subcommands.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// serin: a service-mesh sidecar proxy for canary releases.
#[derive(Debug, Parser)]
#[command(name = "serin", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The roles of the one `serin` binary.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a sidecar proxy beside a workload (outbound, inbound, admin, metrics, health).
    Sidecar,
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Sidecar => ExitCode::SUCCESS,
    }
}
