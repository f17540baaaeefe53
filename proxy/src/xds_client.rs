//! The sidecar's control-plane client (`serin sidecar --control-plane ADDR`).
//!
//! One discovery stream to `serin control-plane` ([`serin_control_api::client`] does
//! the protocol: ACK/NACK, nonces, reconnects with capped exponential backoff and
//! jitter, the current state on reconnect). Each update is the whole state (every
//! pushed Istio document); it goes through the same load → compile path as a config
//! folder, and then:
//!
//! - compiled: the snapshot is swapped in **before** the handler returns, so the ACK
//!   the library sends means "serving with it";
//! - rejected: [`Shared::reject`] records it (`/config_dump` `last_rejected`), the
//!   handler returns the errors and the library NACKs with them; the last good
//!   snapshot keeps serving.
//!
//! While the control plane is unreachable the sidecar keeps serving the last snapshot
//! it applied.
//!
//! One source of truth: `--config` and `--control-plane` together are refused
//! ([`check_sources`]); a sidecar that merged a folder with pushed config could not
//! say which of the two a route came from, nor what an ACK covers.
//!
//! `/config_dump` shows the subscription under `control_plane` ([`status_json`]).

use std::sync::{Arc, Mutex, Weak};
use std::time::SystemTime;

use serde_json::{Value, json};
use serin_control_api::client::{self, ClientStatus, ConfigState, SubscribeOptions, Subscription, Update};
use serin_control_api::pb;
use tokio::sync::watch;

use crate::config;
use crate::state::{LocalWorkload, Shared};

/// The control-plane options of `serin sidecar`.
#[derive(Debug, Clone, clap::Args)]
pub struct ControlPlaneArgs {
    /// Take the routing config from this control plane (`host:15010` or
    /// `http://host:15010`, or TLS: `https://host:15012` with `--ca-root`) instead of
    /// `--config`: the sidecar subscribes, applies each push, ACKs or NACKs it, and keeps
    /// the last good config while the control plane is unreachable.
    #[arg(long = "control-plane", value_name = "ADDR")]
    pub address: Option<String>,
    /// The node id sent to the control plane (default: `$POD_NAME`, else the host name
    /// and the process id, `host-1234`).
    #[arg(long = "node-id", value_name = "ID")]
    pub node_id: Option<String>,
    /// Services to get config for (short names or FQDNs, comma-separated); none = all.
    #[arg(long = "subscribe", value_name = "SERVICE,...", value_delimiter = ',')]
    pub subscribe: Vec<String>,
    /// How often the sidecar reports, on its stream, what it saw of each destination
    /// service and version (requests by class, latency histogram); `0` = never.
    #[arg(
        long = "load-report-interval",
        value_name = "DURATION",
        default_value = "1s",
        value_parser = humantime::parse_duration
    )]
    pub load_report_interval: std::time::Duration,
    /// `--ca-root`, `--bootstrap-token-file`, `--service-account`, `--trust-domain`,
    /// `--cert-ttl`: TLS to the control plane (`https://`) and an identity from its CA.
    #[command(flatten)]
    pub identity: crate::cert_client::IdentityArgs,
}

impl Default for ControlPlaneArgs {
    /// The command line's defaults: no control plane, load reports every second.
    fn default() -> ControlPlaneArgs {
        ControlPlaneArgs {
            address: None,
            node_id: None,
            subscribe: Vec::new(),
            load_report_interval: crate::load_report::DEFAULT_INTERVAL,
            identity: Default::default(),
        }
    }
}

/// Refuses option combinations that name two config sources, or control-plane options
/// without a control plane.
pub fn check_sources(config: Option<&std::path::Path>, args: &ControlPlaneArgs) -> anyhow::Result<()> {
    match (&args.address, config) {
        (Some(address), Some(path)) => anyhow::bail!(
            "both --config {} (or SERIN_CONFIG) and --control-plane {address} are given: a sidecar takes its \
             routing config from one source; drop one of them",
            path.display()
        ),
        (None, _) if args.node_id.is_some() || !args.subscribe.is_empty() => {
            anyhow::bail!("--node-id and --subscribe need --control-plane ADDR")
        }
        _ => Ok(()),
    }
}

/// The node id: `--node-id`, else `$POD_NAME`, else `hostname-pid`.
pub fn node_id(args: &ControlPlaneArgs) -> String {
    if let Some(id) = args.node_id.as_deref().map(str::trim).filter(|id| !id.is_empty()) {
        return id.to_string();
    }
    if let Ok(pod) = std::env::var("POD_NAME")
        && !pod.trim().is_empty()
    {
        return pod.trim().to_string();
    }
    format!("{}-{}", hostname(), std::process::id())
}

/// The host name (Linux: `/proc/sys/kernel/hostname`, else `$HOSTNAME`, else `localhost`).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// The `source` label of snapshots pushed by the control plane at `address`.
pub fn source_label(address: &str) -> String {
    format!("control-plane:{address}")
}

/// The outcome of the last update the handler saw.
#[derive(Debug, Clone)]
struct Outcome {
    at: SystemTime,
    /// The state's version (`clusters=3,endpoints=1,...`).
    version: String,
    /// `None` = applied and ACKed; `Some(errors)` = NACKed with them.
    error: Option<String>,
}

/// What `/config_dump` shows of one sidecar's subscription.
#[derive(Debug, Default)]
struct Info {
    node_id: String,
    subscribe: Vec<String>,
    last_ack: Option<Outcome>,
    last_nack: Option<Outcome>,
    /// True when the last update was NACKed.
    nacked: bool,
}

/// A sidecar's subscription as its admin server sees it (kept in [`Shared`]).
#[derive(Debug)]
pub struct Subscribed {
    info: Arc<Mutex<Info>>,
    status: watch::Receiver<ClientStatus>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every writer replaces whole values, so a poisoned lock holds usable data.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Subscribes `shared` to the control plane named by `args` (which must hold an
/// address): every push is compiled and applied (ACK) or rejected (NACK with the
/// errors). The subscription stops when the sidecar drains. Must be called inside a
/// tokio runtime.
pub fn start(args: &ControlPlaneArgs, shared: &Arc<Shared>) -> anyhow::Result<()> {
    let Some(address) = args.address.as_deref() else {
        anyhow::bail!("no --control-plane address");
    };
    let transport = crate::cert_client::transport(address, &args.identity, shared)?;
    let node = node(args, &shared.local);
    let info =
        Arc::new(Mutex::new(Info { node_id: node.id.clone(), subscribe: args.subscribe.clone(), ..Info::default() }));
    let load_reports = (!args.load_report_interval.is_zero()).then(|| {
        shared.metrics.load().enable();
        let weak = Arc::downgrade(shared);
        let take: client::TakeLoadReport = Arc::new(move || weak.upgrade().and_then(|s| s.metrics.load().take()));
        client::LoadReports { interval: args.load_report_interval, take }
    });
    let options =
        SubscribeOptions { resource_names: args.subscribe.clone(), load_reports, ..SubscribeOptions::default() };
    let handler = handler(Arc::downgrade(shared), source_label(address), Arc::clone(&info));
    tracing::info!(control_plane = %address, node = %node.id, services = ?args.subscribe, "subscribing to the control plane");
    let subscription = client::subscribe_with_transport(transport, node, options, handler);
    if shared.control_plane.set(Subscribed { info, status: subscription.status() }).is_err() {
        anyhow::bail!("this sidecar already subscribes to a control plane");
    }
    tokio::spawn(stop_on_drain(Arc::downgrade(shared), subscription));
    Ok(())
}

/// Ends the subscription (closing its stream) once the sidecar drains.
async fn stop_on_drain(shared: Weak<Shared>, subscription: Subscription) {
    let Some(strong) = shared.upgrade() else { return subscription.shutdown().await };
    let drain = strong.drain.clone();
    drop(strong);
    drain.signaled().await;
    subscription.shutdown().await;
}

/// The node this sidecar announces: id, workload, namespace, `app`/`version` labels.
fn node(args: &ControlPlaneArgs, local: &LocalWorkload) -> pb::Node {
    let labels = [("app", &local.app), ("version", &local.version)]
        .into_iter()
        .filter(|(_, v)| v.as_str() != "unknown")
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    pb::Node { id: node_id(args), workload: local.workload.clone(), namespace: local.namespace.clone(), labels }
}

/// The subscription's handler: load + compile the whole pushed state, then apply
/// (→ ACK) or reject (→ NACK with the errors).
fn handler(
    shared: Weak<Shared>,
    source: String,
    info: Arc<Mutex<Info>>,
) -> impl FnMut(Update<'_>) -> Result<(), String> + Send + 'static {
    move |update: Update<'_>| {
        let Some(shared) = shared.upgrade() else {
            return Err("the sidecar is shutting down".to_string());
        };
        let version = update.state.version();
        let result = compile(update.state, &shared, &source, &version);
        let outcome =
            Outcome { at: SystemTime::now(), version: version.clone(), error: result.as_ref().err().cloned() };
        {
            let mut info = lock(&info);
            info.nacked = outcome.error.is_some();
            if outcome.error.is_some() {
                info.last_nack = Some(outcome);
            } else {
                info.last_ack = Some(outcome);
            }
        }
        match result {
            Ok(()) => {
                tracing::info!(%version, changed = ?update.changed, "control plane config applied");
                Ok(())
            }
            Err(errors) => Err(errors),
        }
    }
}

/// Compiles `state` and applies it, or records the rejection and returns the errors.
fn compile(state: &ConfigState, shared: &Shared, source: &str, version: &str) -> Result<(), String> {
    // Each document is its own source, named by its resource name, so an error reads
    // like `serin validate`'s: `VirtualService/default/payment: spec.http[0]...`.
    let origins: Vec<String> = state.documents().map(|d| d.name.clone()).collect();
    let sources: Vec<(&str, &str)> =
        origins.iter().map(String::as_str).zip(state.documents().map(|d| d.yaml.as_str())).collect();
    let result = config::load_sources(&sources).and_then(|set| {
        for warning in &set.warnings {
            tracing::warn!("{warning}");
        }
        config::compile(&set, &shared.registry, source)
    });
    match result {
        Ok(mut snapshot) => {
            snapshot.version = version.to_string();
            shared.apply(snapshot);
            Ok(())
        }
        Err(errors) => {
            let text = errors.to_string();
            shared.reject(source, text.clone());
            Err(text)
        }
    }
}

fn time(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

fn outcome_json(outcome: Option<&Outcome>) -> Value {
    outcome.map_or(Value::Null, |o| json!({ "at": time(o.at), "version": o.version, "error": o.error }))
}

/// The `control_plane` section of `/config_dump`: `null` when the sidecar does not
/// subscribe, else the address, node id, state (`CONNECTING`, `ACKED`, `NACKED`),
/// connection, versions accepted, last ACK and last NACK (with the reason).
pub fn status_json(shared: &Shared) -> Value {
    let Some(entry) = shared.control_plane.get() else {
        return Value::Null;
    };
    let status = entry.status.borrow().clone();
    let info = lock(&entry.info);
    // A response the library refused before the handler (bad encoding) is a NACK too.
    let state = if info.nacked {
        "NACKED"
    } else if info.last_ack.is_some() {
        "ACKED"
    } else if status.last_nack.is_some() {
        "NACKED"
    } else {
        "CONNECTING"
    };
    let versions: serde_json::Map<String, Value> =
        status.versions.iter().map(|(t, v)| (t.to_string(), Value::from(v.as_str()))).collect();
    json!({
        "endpoint": status.endpoint,
        "node_id": info.node_id,
        "subscribe": info.subscribe,
        "state": state,
        "connected": status.connected,
        "control_plane_id": status.control_plane,
        "versions": versions,
        "applied": status.applied,
        "connects": status.connects,
        "last_error": status.last_error,
        "last_ack": outcome_json(info.last_ack.as_ref()),
        "last_nack": outcome_json(info.last_nack.as_ref()),
        "last_nack_reason": status.last_nack,
        "load_reports": {
            "sent": status.load_reports_sent,
            "dropped": status.load_reports_dropped,
            "requests_not_reported": shared.metrics.load().overflow(),
        },
    })
}

/// Why readiness must wait, as pilot-agent's does: `Some(reason)` while a sidecar
/// subscribed to a control plane has not yet applied (and so ACKed) a first config
/// from it; `None` once it has, or when the sidecar does not subscribe. A sidecar that
/// later loses the control plane stays ready on its last good config.
pub fn waiting_for_first_config(shared: &Shared) -> Option<String> {
    let entry = shared.control_plane.get()?;
    let info = lock(&entry.info);
    if info.last_ack.is_some() {
        return None;
    }
    let status = entry.status.borrow();
    let mut reason = format!("waiting for first config from control plane {}", status.endpoint.trim_end_matches('/'));
    let rejected = info.last_nack.as_ref().and_then(|o| o.error.as_deref()).or(status.last_nack.as_deref());
    if let Some(error) = rejected {
        reason.push_str(&format!(" (the last one was rejected: {error})"));
    } else if let Some(error) = status.last_error.as_deref().filter(|_| !status.connected) {
        reason.push_str(&format!(" ({error})"));
    }
    Some(reason)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        cp: ControlPlaneArgs,
    }

    fn parse(args: &[&str]) -> ControlPlaneArgs {
        let argv = std::iter::once("serin").chain(args.iter().copied());
        Cli::try_parse_from(argv).map(|c| c.cp).expect("arguments parse")
    }

    #[test]
    fn flags_parse_and_subscribe_splits_on_commas() {
        let args = parse(&["--control-plane", "cp:15010", "--node-id", "pod-1", "--subscribe", "payment,reviews"]);
        assert_eq!(args.address.as_deref(), Some("cp:15010"));
        assert_eq!(node_id(&args), "pod-1");
        assert_eq!(args.subscribe, ["payment", "reviews"]);
        assert!(parse(&[]).address.is_none());
        assert_eq!(parse(&[]).load_report_interval, crate::load_report::DEFAULT_INTERVAL);
        assert_eq!(ControlPlaneArgs::default().load_report_interval, crate::load_report::DEFAULT_INTERVAL);
        assert!(parse(&["--load-report-interval", "0"]).load_report_interval.is_zero());
        assert_eq!(parse(&["--load-report-interval", "250ms"]).load_report_interval.as_millis(), 250);
    }

    #[test]
    fn two_config_sources_are_refused_naming_both() {
        let args = parse(&["--control-plane", "cp:15010"]);
        let error = check_sources(Some(Path::new("/etc/serin")), &args).expect_err("two sources").to_string();
        assert!(error.contains("--config /etc/serin") && error.contains("--control-plane cp:15010"), "{error}");
        assert!(check_sources(None, &args).is_ok());
        assert!(check_sources(Some(Path::new("/etc/serin")), &parse(&[])).is_ok());
        let error = check_sources(None, &parse(&["--node-id", "x"])).expect_err("no address").to_string();
        assert!(error.contains("need --control-plane"), "{error}");
    }

    #[test]
    fn node_id_defaults_to_something_unique_per_process() {
        let id = node_id(&parse(&["--node-id", "  "]));
        assert!(!id.trim().is_empty());
        if std::env::var("POD_NAME").is_err() {
            assert!(id.ends_with(&format!("-{}", std::process::id())), "{id}");
        }
    }
}
