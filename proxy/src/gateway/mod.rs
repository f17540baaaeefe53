//! `serin gateway`: an Istio ingress gateway. Serves the `Gateway` resources of a
//! configuration folder with the VirtualServices bound to them.
//!
//! - Servers listen on their `port.number`, on `--bind-address` (default
//!   `0.0.0.0`), unless `--listen PORT=ADDR` maps a Gateway port elsewhere (e.g.
//!   `--listen 443=127.0.0.1:8443`, or `127.0.0.1:0` for an ephemeral port; the
//!   bound addresses are logged as `gateway port listening port=… addr=…`).
//!   Routing always sees the Gateway port number (VirtualService `match.port`).
//! - Protocols `HTTP`, `HTTP2`, `GRPC`, `GRPC-WEB` are plain HTTP (HTTP/1.1 and
//!   h2c); `HTTPS` terminates TLS (`tls.mode` `SIMPLE` or `MUTUAL`) and serves
//!   HTTP/1.1 or h2 by ALPN; `TLS` with `PASSTHROUGH` forwards TLS by SNI to the
//!   VirtualService `tls[]` routes. `httpsRedirect: true` answers 301 to
//!   `https://<host><path>` for every host of the server.
//! - Certificates: `serverCertificate` / `privateKey` / `caCertificates` paths
//!   (relative paths are taken from the Gateway file's folder), or
//!   `credentialName: NAME` with `--credentials-dir D`: `D/NAME/tls.crt`,
//!   `D/NAME/tls.key` and, for MUTUAL, `D/NAME/ca.crt` (or `D/NAME-cacert/ca.crt`),
//!   the keys of a Kubernetes TLS secret. They are re-read every 500 ms.
//! - Everything else is the sidecar's: routing, retries, timeouts, faults,
//!   metrics (`reporter="source"`, source labels from `--workload` etc.), the
//!   access log, admin (`/config_dump` shows every server's routes as virtual
//!   hosts named `<route config>/<VirtualService>`), metrics and health ports.
//! - Mesh mTLS to sidecars: `--cert-dir` gives the gateway a workload identity
//!   (`key.pem`, `cert-chain.pem`, `root-cert.pem`), used for upstream
//!   connections the way the sidecar uses it (DestinationRule `ISTIO_MUTUAL` or
//!   auto-mTLS, see [`crate::mesh_tls`]).

pub mod hello;
pub mod hosts;
pub mod listeners;
pub mod passthrough;
pub mod reload;
pub mod tls;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use crate::access_log::AccessLog;
use crate::config::gateway::GatewayOptions;
use crate::forward::listener;
use crate::snapshot::Snapshot;
use crate::state::{LocalWorkload, Shared};
use crate::upstream::split::SplitMode;
use crate::{admin, sidecar};

pub use reload::{Gateway, ListenPlan};

/// Options of `serin gateway`.
#[derive(Debug, Clone, clap::Args)]
pub struct GatewayArgs {
    /// Istio YAML file or folder: Gateway, VirtualService, DestinationRule,
    /// ServiceEntry, WorkloadEntry; reloaded when it changes.
    #[arg(long, env = "SERIN_CONFIG")]
    pub config: PathBuf,
    /// Address the Gateway ports listen on (each on its own `port.number`).
    #[arg(long, default_value = "0.0.0.0")]
    pub bind_address: IpAddr,
    /// Listen for Gateway port PORT on ADDR instead (repeatable), e.g.
    /// `443=127.0.0.1:8443` or `80=127.0.0.1:0` (ephemeral).
    #[arg(long = "listen", value_name = "PORT=ADDR", value_parser = parse_listen)]
    pub listen: Vec<(u16, SocketAddr)>,
    /// Folder of `credentialName` secrets: `DIR/<name>/tls.crt`, `tls.key`, `ca.crt`.
    #[arg(long, value_name = "DIR")]
    pub credentials_dir: Option<PathBuf>,
    /// Worker threads (Envoy's `--concurrency`); 0 = one per core the process may
    /// run on. With one, the gateway runs on a single thread.
    #[arg(long, env = "SERIN_CONCURRENCY", default_value_t = 0)]
    pub concurrency: usize,
    /// This gateway's pod labels (repeatable `key=value`): only Gateways whose
    /// `selector` they satisfy are served. Without it, every Gateway is.
    #[arg(long = "labels", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Workload identity folder (`key.pem`, `cert-chain.pem`, `root-cert.pem`)
    /// for mutual TLS to sidecars; reloaded when it changes.
    #[arg(long, value_name = "DIR")]
    pub cert_dir: Option<PathBuf>,
    /// Admin server (`/config_dump`, `/clusters`, `/ready`, `/quitquitquit`).
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin: SocketAddr,
    /// Prometheus metrics (`/stats/prometheus`).
    #[arg(long, default_value = "0.0.0.0:15090")]
    pub metrics: SocketAddr,
    /// Health (`/healthz/ready`).
    #[arg(long, default_value = "0.0.0.0:15021")]
    pub health: SocketAddr,
    /// This gateway's workload name (the `source_workload` label).
    #[arg(long, env = "SERIN_WORKLOAD", default_value = "istio-ingressgateway")]
    pub workload: String,
    /// This gateway's namespace.
    #[arg(long, env = "POD_NAMESPACE", default_value = "istio-system")]
    pub namespace: String,
    /// This gateway's `app` label.
    #[arg(long = "app-label", env = "SERIN_APP", default_value = "istio-ingressgateway")]
    pub app_label: String,
    /// This gateway's `version` label.
    #[arg(long = "app-version", env = "SERIN_VERSION", default_value = "unknown")]
    pub app_version: String,
    /// Turn the JSON access log on stdout off.
    #[arg(long)]
    pub no_access_log: bool,
    /// How weighted destinations are picked.
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
}

impl GatewayArgs {
    /// Arguments for a gateway on `config` with every port on loopback and
    /// ephemeral (tests): admin, metrics, health and the given Gateway ports.
    pub fn local(config: PathBuf, gateway_ports: &[u16]) -> GatewayArgs {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        GatewayArgs {
            config,
            bind_address: IpAddr::from([127, 0, 0, 1]),
            listen: gateway_ports.iter().map(|p| (*p, any)).collect(),
            credentials_dir: None,
            concurrency: 0,
            labels: Vec::new(),
            cert_dir: None,
            admin: any,
            metrics: any,
            health: any,
            workload: "istio-ingressgateway".into(),
            namespace: "istio-system".into(),
            app_label: "istio-ingressgateway".into(),
            app_version: "unknown".into(),
            no_access_log: true,
            split: SplitMode::Exact,
            drain_timeout: Duration::from_secs(5),
            idle_timeout: crate::idle::DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// `PORT=ADDR`, where ADDR is `ip:port` or just a port (on `--bind-address`'s
/// default, 0.0.0.0).
fn parse_listen(s: &str) -> Result<(u16, SocketAddr), String> {
    let (port, addr) = s.split_once('=').ok_or_else(|| format!("expected PORT=ADDR, got {s:?}"))?;
    let port: u16 = port.trim().parse().map_err(|e| format!("bad Gateway port {port:?}: {e}"))?;
    let addr = addr.trim();
    let addr = match addr.parse::<SocketAddr>() {
        Ok(a) => a,
        Err(_) => match addr.parse::<u16>() {
            Ok(p) => SocketAddr::from(([0, 0, 0, 0], p)),
            Err(_) => return Err(format!("bad address {addr:?}: expected ip:port or a port")),
        },
    };
    Ok((port, addr))
}

/// `key=value`.
fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))?;
    if k.is_empty() {
        return Err(format!("empty label key in {s:?}"));
    }
    Ok((k.to_string(), v.to_string()))
}

/// A running gateway's bound addresses.
#[derive(Debug, Clone)]
pub struct Bound {
    /// Gateway port number → listening address, at startup.
    pub ports: BTreeMap<u16, SocketAddr>,
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
    pub health: SocketAddr,
}

/// A started gateway.
#[derive(Debug)]
pub struct Started {
    pub shared: Arc<Shared>,
    pub bound: Bound,
    /// The running gateway (reload, ports added later).
    pub gateway: Arc<Gateway>,
    /// Ends once the drain has closed every port.
    pub data: tokio::task::JoinHandle<()>,
}

/// Loads the configuration (any error, e.g. a missing certificate file, is a
/// startup error naming it), binds every port and starts serving and watching.
/// The gateway runs until `shared.drain` is triggered.
pub async fn start(args: &GatewayArgs) -> anyhow::Result<Started> {
    let mut local = LocalWorkload {
        workload: args.workload.clone(),
        namespace: args.namespace.clone(),
        app: args.app_label.clone(),
        version: args.app_version.clone(),
        principal: "unknown".into(),
    };
    let identity = match &args.cert_dir {
        Some(dir) => {
            let (watcher, _task) = serin_certs::IdentityWatcher::spawn(dir)
                .with_context(|| format!("loading the gateway identity from {}", dir.display()))?;
            local.principal = serin_certs::CertSource::current(&watcher).identity().spiffe_id().to_string();
            Some(watcher)
        }
        None => None,
    };
    let access_log = AccessLog::new(!args.no_access_log).with_local(&local);
    let shared = Shared::with_split(Snapshot::empty("none"), local, access_log, args.split);
    if let Some(watcher) = identity {
        shared.mesh.set_source(Arc::new(watcher));
    }
    let options = GatewayOptions {
        labels: (!args.labels.is_empty()).then(|| args.labels.iter().cloned().collect()),
        credentials_dir: args.credentials_dir.clone(),
    };
    let plan = ListenPlan { bind: args.bind_address, overrides: args.listen.iter().copied().collect() };
    let gateway = Gateway::new(
        shared.clone(),
        args.config.clone(),
        options,
        plan,
        listener::Timeouts { idle: args.idle_timeout, drain: args.drain_timeout },
    );
    gateway
        .reload_now()
        .await
        .map_err(|e| anyhow::anyhow!("invalid gateway config {}:\n{e}", args.config.display()))?;
    let admin_l = listener::bind(args.admin, "--admin").await?;
    let metrics_l = listener::bind(args.metrics, "--metrics").await?;
    let health_l = listener::bind(args.health, "--health").await?;
    let bound = Bound {
        ports: gateway.ports().await,
        admin: admin_l.local_addr()?,
        metrics: metrics_l.local_addr()?,
        health: health_l.local_addr()?,
    };
    tokio::spawn(admin::serve_admin(admin_l, shared.clone()));
    tokio::spawn(admin::serve_metrics(metrics_l, shared.clone()));
    tokio::spawn(admin::serve_health(health_l, shared.clone()));
    gateway.spawn_watch();
    let closing = gateway.clone();
    let data = tokio::spawn(async move {
        closing.shared.drain.signaled().await;
        for task in closing.take_tasks().await {
            let _ = task.await;
        }
    });
    let ports: Vec<String> = bound.ports.iter().map(|(p, a)| format!("{p}={a}")).collect();
    tracing::info!(ports = %ports.join(","), admin = %bound.admin, metrics = %bound.metrics, health = %bound.health, "gateway ready");
    Ok(Started { shared, bound, gateway, data })
}

/// Runs `serin gateway` until SIGTERM, Ctrl-C or `/quitquitquit`, then drains.
pub async fn run(args: GatewayArgs) -> anyhow::Result<()> {
    let Started { shared, data, .. } = start(&args).await?;
    sidecar::run_until_drained(&shared, data, args.drain_timeout).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_overrides_parse() {
        assert_eq!(parse_listen("443=127.0.0.1:8443"), Ok((443, "127.0.0.1:8443".parse().expect("addr"))));
        assert_eq!(parse_listen("80=8080"), Ok((80, "0.0.0.0:8080".parse().expect("addr"))));
        assert!(parse_listen("80").is_err());
        assert!(parse_listen("x=1").is_err());
        assert!(parse_listen("80=nowhere").is_err());
        assert_eq!(parse_label("istio=ingressgateway"), Ok(("istio".into(), "ingressgateway".into())));
        assert!(parse_label("=x").is_err());
    }
}
