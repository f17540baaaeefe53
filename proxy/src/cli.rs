//! Command-line interface: the `serin` subcommands.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::cli_deferred::Deferred;
use crate::demo::DemoArgs;
use crate::demo_app::UpstreamArgs;
use crate::gateway::GatewayArgs;
use crate::sidecar::SidecarArgs;

/// serin: a service-mesh sidecar proxy for canary releases, configured with
/// Istio's own VirtualService / DestinationRule / ServiceEntry resources.
#[derive(Debug, Parser)]
#[command(name = "serin", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The roles of the one `serin` binary.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a sidecar proxy beside a workload (outbound, inbound with mTLS, admin, metrics, health).
    Sidecar(Deferred<SidecarArgs>),
    /// Run an ingress gateway: Istio Gateway resources with their VirtualServices (HTTP, HTTPS SIMPLE/MUTUAL, TLS passthrough).
    Gateway(Deferred<GatewayArgs>),
    /// Check Istio YAML files as `istioctl validate` does; exit 1 on any error.
    Validate {
        /// Files or folders of Istio resources.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Run a demo upstream service that answers with its service, version and pod.
    Upstream(Deferred<UpstreamArgs>),
    /// Run a local canary of `payment` v1/v2: sidecars with mTLS, the control plane's canary analysis stepping v2's weight and rolling it back (or promoting it with --healthy-canary), load, a live table and the dashboard.
    Demo(Deferred<DemoArgs>),
    /// Manage the mesh CA: create a root CA, issue workload certificates.
    Ca {
        #[command(subcommand)]
        cmd: crate::ca_cmd::CaCommand,
    },
    /// Run the control plane: serve the config folder to the sidecars over gRPC, with the management API.
    ControlPlane(Deferred<crate::control_plane::ControlPlaneArgs>),
    /// Talk to the control plane: set-weight, rollback, reset-weights, status, get.
    Ctl(Deferred<crate::ctl::CtlArgs>),
    /// Write the pod's nat rules that capture its TCP for the sidecar (the init step, like `istio-iptables`).
    Iptables(Deferred<crate::iptables::IptablesArgs>),
    /// Add serin's sidecar to Kubernetes workloads (like `istioctl kube-inject`): init container, proxy, identity volumes.
    Inject(Deferred<crate::inject::InjectArgs>),
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        // The demo's steps set weights through the API on purpose: the store's warning
        // that they win over the config folder is expected there.
        Command::Demo(_) => "warn,serin_control_api::server::store=error",
        Command::Ctl(_) => "warn",
        _ => "info",
    };
    init_logging(default_level);
    if let Command::Validate { paths } = &cli.command {
        return crate::config::validate_command(paths);
    }
    if let Command::Ca { cmd } = &cli.command {
        return match crate::ca_cmd::run(cmd.clone()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("serin: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Command::Inject(args) = &cli.command {
        return match crate::inject::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let concurrency = match &cli.command {
        Command::Sidecar(args) => args.concurrency,
        Command::Gateway(args) => args.concurrency,
        _ => 0,
    };
    let runtime = match crate::runtime::build(concurrency) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("serin: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Sidecar(args) => crate::sidecar::run(args.into_inner()).await,
            Command::Gateway(args) => crate::gateway::run(args.into_inner()).await,
            Command::Upstream(args) => crate::demo_app::run_upstream(args.into_inner()).await,
            Command::Demo(args) => crate::demo::run(args.into_inner()).await,
            Command::ControlPlane(args) => crate::control_plane::run(args.into_inner()).await,
            Command::Ctl(args) => crate::ctl::run(args.into_inner()).await,
            Command::Iptables(args) => crate::iptables::run(&args).map_err(anyhow::Error::from),
            Command::Validate { .. } | Command::Ca { .. } | Command::Inject(_) => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("serin: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr (stdout carries the access log); `RUST_LOG` overrides the level.
fn init_logging(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}
