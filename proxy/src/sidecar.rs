//! `serin sidecar`: a proxy beside one workload. Binds every listener (outbound,
//! admin, metrics, health), loads the config and watches it (or subscribes to a
//! control plane, see [`crate::xds_client`]), and drains on SIGTERM or
//! `/quitquitquit`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::access_log::AccessLog;
use crate::forward::listener;
use crate::snapshot::Snapshot;
use crate::state::{LocalWorkload, Shared};
use crate::upstream::split::SplitMode;
use crate::{admin, inbound, reload, xds_client};

/// Options of `serin sidecar`.
#[derive(Debug, Clone, clap::Args)]
pub struct SidecarArgs {
    /// Istio YAML file or folder (VirtualService, DestinationRule, ServiceEntry,
    /// WorkloadEntry); reloaded when it changes.
    #[arg(long, env = "SERIN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Outbound listener: the app's outgoing traffic, routed by the Host header.
    #[arg(long, default_value = "0.0.0.0:15001")]
    pub outbound: SocketAddr,
    /// Inbound listener: traffic to this pod, forwarded to `--app`.
    #[arg(long, default_value = "0.0.0.0:15006")]
    pub inbound: SocketAddr,
    /// The local app that inbound traffic goes to.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub app: SocketAddr,
    /// Admin server (`/config_dump`, `/clusters`, `/ready`, `/quitquitquit`).
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin: SocketAddr,
    /// Prometheus metrics (`/stats/prometheus`).
    #[arg(long, default_value = "0.0.0.0:15090")]
    pub metrics: SocketAddr,
    /// Health (`/healthz/ready`).
    #[arg(long, default_value = "0.0.0.0:15021")]
    pub health: SocketAddr,
    /// This workload's name (the `source_workload` label).
    #[arg(long, env = "SERIN_WORKLOAD", default_value = "unknown")]
    pub workload: String,
    /// This workload's namespace.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// This workload's `app` label.
    #[arg(long = "app-label", env = "SERIN_APP", default_value = "unknown")]
    pub app_label: String,
    /// This workload's `version` label.
    #[arg(long = "app-version", env = "SERIN_VERSION", default_value = "unknown")]
    pub app_version: String,
    /// Folder with this workload's identity (`key.pem`, `cert-chain.pem`,
    /// `root-cert.pem`, as `serin ca issue` writes them); reloaded when it changes.
    /// Without it, the identity comes from the control plane's CA when
    /// `--bootstrap-token-file` is given, else the sidecar speaks plaintext only.
    #[arg(long, env = "SERIN_CERT_DIR")]
    pub cert_dir: Option<PathBuf>,
    /// Turn the JSON access log on stdout off.
    #[arg(long)]
    pub no_access_log: bool,
    /// How weighted destinations are picked: exact shares, or a random draw per
    /// request like Envoy.
    #[arg(long, value_enum, default_value = "exact")]
    pub split: SplitMode,
    /// How long a drain lets requests in flight finish.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// A client connection with nothing read or written for this long is closed,
    /// gracefully (Envoy's `idle_timeout`, 1 h by default); 0 keeps idle
    /// connections open.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,
    /// Worker threads (Envoy's `--concurrency`, Istio's `concurrency`); 0 = one
    /// per core the process may run on. With one, the proxy runs on a single
    /// thread: no cross-thread wake-ups or work stealing.
    #[arg(long, env = "SERIN_CONCURRENCY", default_value_t = 0)]
    pub concurrency: usize,
    /// Captured traffic to destinations the registry does not know: on to where
    /// it was going (`ALLOW_ANY`, Istio's default) or refused (`REGISTRY_ONLY`).
    #[arg(long, value_enum, env = "SERIN_OUTBOUND_TRAFFIC_POLICY", default_value = "ALLOW_ANY")]
    pub outbound_traffic_policy: crate::outbound::OutboundPolicy,
    /// `--control-plane`, `--node-id`, `--subscribe`: config pushed by `serin
    /// control-plane` instead of `--config` (the two are not taken together); with
    /// `--ca-root`, `--bootstrap-token-file`, `--service-account`, `--trust-domain`,
    /// `--cert-ttl`: TLS to it and an identity from its CA (see `cert_client`).
    #[command(flatten)]
    pub control_plane: xds_client::ControlPlaneArgs,
}

/// A running sidecar's bound addresses.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
    pub health: SocketAddr,
}

/// Binds every listener and starts serving; returns the shared state and the
/// bound addresses. The sidecar runs until `shared.drain` is triggered.
pub async fn start(args: &SidecarArgs) -> anyhow::Result<(Arc<Shared>, Bound, tokio::task::JoinHandle<()>)> {
    xds_client::check_sources(args.config.as_deref(), &args.control_plane)?;
    let mut local = LocalWorkload {
        workload: args.workload.clone(),
        namespace: args.namespace.clone(),
        app: args.app_label.clone(),
        version: args.app_version.clone(),
        principal: "unknown".into(),
    };
    // The identity: `--cert-dir` files, else a certificate from the control plane's CA
    // (`--bootstrap-token-file`), else none (plaintext only). See `cert_client`.
    let identity =
        crate::cert_client::identity_source(args.cert_dir.as_deref(), &args.control_plane, &args.namespace).await?;
    if let Some(source) = &identity {
        local.principal = source.current().identity().spiffe_id().to_string();
    }
    let access_log = AccessLog::new(!args.no_access_log).with_local(&local);
    let shared = Shared::with_split(Snapshot::empty("none"), local, access_log, args.split);
    if let Some(source) = identity {
        shared.mesh.set_source(source);
    }
    if let Some(path) = &args.config {
        let loaded = reload::fingerprint(path);
        reload::reload_now(path, &shared).map_err(|e| anyhow::anyhow!("invalid config {}:\n{e}", path.display()))?;
        reload::spawn_watch(path.clone(), shared.clone(), Some(loaded));
    }
    let outbound = listener::bind(args.outbound, "--outbound").await?;
    let inbound_l = listener::bind(args.inbound, "--inbound").await?;
    let admin_l = listener::bind(args.admin, "--admin").await?;
    let metrics_l = listener::bind(args.metrics, "--metrics").await?;
    let health_l = listener::bind(args.health, "--health").await?;
    let bound = Bound {
        outbound: outbound.local_addr()?,
        inbound: inbound_l.local_addr()?,
        admin: admin_l.local_addr()?,
        metrics: metrics_l.local_addr()?,
        health: health_l.local_addr()?,
    };
    // After every bind (a listener that fails leaves no subscription behind) and
    // before the health server (readiness must already wait for the first config).
    if args.control_plane.address.is_some() {
        xds_client::start(&args.control_plane, &shared)?;
    }
    tokio::spawn(admin::serve_admin(admin_l, shared.clone()));
    tokio::spawn(admin::serve_metrics(metrics_l, shared.clone()));
    tokio::spawn(admin::serve_health(health_l, shared.clone()));
    shared.inbound.store(Arc::new(inbound::snapshot(args.app, bound.inbound.port(), &shared.local, &shared.registry)));
    let timeouts = listener::Timeouts { idle: args.idle_timeout, drain: args.drain_timeout };
    tokio::spawn(inbound::serve(inbound_l, shared.clone(), args.app.port(), timeouts));
    let data = tokio::spawn(crate::outbound::serve(outbound, shared.clone(), args.outbound_traffic_policy, timeouts));
    tracing::info!(outbound = %bound.outbound, inbound = %bound.inbound, app = %args.app, admin = %bound.admin, metrics = %bound.metrics, health = %bound.health, "sidecar ready");
    Ok((shared, bound, data))
}

/// Runs `serin sidecar` until SIGTERM, Ctrl-C or `/quitquitquit`, then drains.
pub async fn run(args: SidecarArgs) -> anyhow::Result<()> {
    let (shared, _bound, data) = start(&args).await?;
    run_until_drained(&shared, data, args.drain_timeout).await;
    Ok(())
}

/// Waits for SIGTERM, Ctrl-C or a drain request (`/quitquitquit`), then drains:
/// listeners stop accepting and requests in flight get up to `deadline`.
pub async fn run_until_drained(shared: &Shared, data: tokio::task::JoinHandle<()>, deadline: Duration) {
    tokio::select! {
        () = shutdown_signal() => {
            tracing::info!("signal received: draining");
            shared.drain.trigger();
        }
        () = shared.drain.signaled() => tracing::info!("drain requested: draining"),
    }
    let idle = shared.drain.wait_idle(deadline).await;
    let _ = tokio::time::timeout(deadline, data).await;
    if !idle {
        tracing::warn!(in_flight = shared.drain.in_flight(), "drain deadline passed; exiting with requests in flight");
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = async {
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}
