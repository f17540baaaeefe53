//! `serin ctl`: the operator's client of the control plane's management API
//! (`set-weight`, `rollback`, `reset-weights`, `status`, `get`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use serin_control_api::ResourceType;
use serin_control_api::client::{ClientError, ManagementClient, parse_weights};
use serin_control_api::pb;

/// Options of `serin ctl`.
#[derive(Debug, Clone, clap::Args)]
pub struct CtlArgs {
    /// The control plane's gRPC address (`host:port` or `http://host:port`).
    #[arg(long, env = "SERIN_CONTROL_PLANE", default_value = "127.0.0.1:15010", global = true)]
    pub control_plane: String,
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// Waiting for the sidecars to apply a change.
#[derive(Debug, Clone, clap::Args)]
pub struct WaitArgs {
    /// Return once every connected sidecar subscribed to the service ACKed the change.
    #[arg(long)]
    pub wait: bool,
    /// How long `--wait` waits.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

impl WaitArgs {
    fn wait(&self) -> Option<Duration> {
        self.wait.then_some(self.timeout)
    }
}

/// The commands of `serin ctl`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum CtlCommand {
    /// Set a service's split in percent (`v1=90 v2=10`; must add up to 100).
    SetWeight {
        /// The service (short name or FQDN).
        service: String,
        /// `SUBSET=PERCENT` pairs.
        #[arg(required = true)]
        weights: Vec<String>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Send all of a service's traffic to its stable subset.
    Rollback {
        /// The service.
        service: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Forget the weights set through the API: the config folder's apply again.
    ResetWeights {
        /// The service.
        service: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Every connected sidecar and what it runs, per resource type.
    Status,
    /// Automated canary analyses: `start`, `status`, `abort`, `list`.
    Canary {
        #[command(subcommand)]
        command: crate::ctl_canary::CanaryCommand,
    },
    /// Per-version request rate, share, success and latency from the sidecars' load reports.
    Load(crate::ctl_load::LoadArgs),
    /// Print the config served for a service as YAML.
    Get {
        /// `routes`, `clusters`, `endpoints` or `policies`.
        #[arg(value_parser = ["routes", "clusters", "endpoints", "policies"])]
        kind: String,
        /// The service.
        service: String,
    },
}

/// Runs `serin ctl`; an error ends the command with exit status 1.
pub async fn run(args: CtlArgs) -> anyhow::Result<()> {
    if let CtlCommand::Load(load) = &args.command {
        return crate::ctl_load::run(&args.control_plane, load).await;
    }
    if let CtlCommand::Canary { command } = args.command {
        return crate::ctl_canary::run(&args.control_plane, command).await;
    }
    if let CtlCommand::SetWeight { weights, .. } = &args.command {
        // Refuse malformed arguments before connecting.
        api(parse_weights(weights))?;
    }
    let mut client = api(ManagementClient::connect(&args.control_plane).await)?;
    match args.command {
        CtlCommand::SetWeight { service, weights, wait } => {
            let weights = api(parse_weights(&weights))?;
            let result = api(client.set_weights(&service, &weights, wait.wait()).await)?;
            report_change(&service, &result, &wait)
        }
        CtlCommand::Rollback { service, wait } => {
            let result = api(client.rollback(&service, wait.wait()).await)?;
            report_change(&service, &result, &wait)
        }
        CtlCommand::ResetWeights { service, wait } => {
            let result = api(client.reset_weights(&service, wait.wait()).await)?;
            report_change(&service, &result, &wait)
        }
        CtlCommand::Status => {
            let status = api(client.status().await)?;
            print!("{}", status_table(&status, now_unix_ms()));
            Ok(())
        }
        CtlCommand::Canary { command } => crate::ctl_canary::run(&args.control_plane, command).await,
        CtlCommand::Load(load) => crate::ctl_load::run(&args.control_plane, &load).await,
        CtlCommand::Get { kind, service } => {
            let ty = ResourceType::parse(&kind).with_context(|| format!("unknown type {kind:?}"))?;
            let config = api(client.config(&service, Some(ty)).await)?;
            anyhow::ensure!(!config.documents.is_empty(), "the control plane serves no {kind} for {service}");
            print!("{}", config.yaml);
            if !config.yaml.ends_with('\n') {
                println!();
            }
            Ok(())
        }
    }
}

/// A client error as one message: its text already says what the gRPC status says,
/// so its source is not repeated.
fn api<T>(result: Result<T, ClientError>) -> anyhow::Result<T> {
    result.map_err(|e| anyhow::anyhow!("{e}"))
}

fn now_unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn format_weights(weights: &std::collections::HashMap<String, u32>) -> String {
    let mut pairs: Vec<_> = weights.iter().collect();
    pairs.sort();
    pairs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
}

/// Prints what a change did and, with `--wait`, who applied it; a NACK or a timeout
/// is an error.
fn report_change(service: &str, result: &pb::ChangeResult, wait: &WaitArgs) -> anyhow::Result<()> {
    let ty = ResourceType::from_type_url(&result.type_url)
        .map_or_else(|| result.type_url.clone(), |t| t.short_name().to_string());
    let what = if result.changed { "now" } else { "unchanged" };
    println!("{service}: {what} {} ({ty} version {})", format_weights(&result.weights), result.version);
    if !wait.wait {
        return Ok(());
    }
    let Some(ack) = &result.ack else {
        anyhow::bail!("the control plane did not report the ACKs");
    };
    if ack.nacked > 0 {
        let errors: Vec<String> = ack
            .nodes
            .iter()
            .filter(|n| n.state == "NACKED" || !n.error.is_empty())
            .map(|n| format!("  {}: {}", n.node_id, n.error))
            .collect();
        anyhow::bail!(
            "{} of {} sidecar(s) rejected {ty} version {}:\n{}",
            ack.nacked,
            ack.total,
            result.version,
            errors.join("\n")
        );
    }
    if ack.timed_out {
        let waiting: Vec<&str> = ack.nodes.iter().filter(|n| n.state != "ACKED").map(|n| n.node_id.as_str()).collect();
        anyhow::bail!(
            "timed out after {}: {} of {} sidecar(s) ACKed {ty} version {}; still waiting on {}",
            humantime::format_duration(wait.timeout),
            ack.acked,
            ack.total,
            result.version,
            waiting.join(", ")
        );
    }
    if ack.total == 0 {
        println!("no connected sidecar subscribes to {service}");
    } else {
        println!("ACKed by {} sidecar(s); slowest push-to-ACK {} ms", ack.acked, ack.slowest_ms);
    }
    Ok(())
}

/// A sidecar's sync state of one type as `serin ctl status` and the dashboard name it:
/// `SYNCED`, `STALE`, `NACKED`, `NOT SENT` (`?` for a state this build does not know).
pub fn sync_state_name(state: i32) -> &'static str {
    match pb::SyncState::try_from(state) {
        Ok(pb::SyncState::Synced) => "SYNCED",
        Ok(pb::SyncState::Stale) => "STALE",
        Ok(pb::SyncState::Nacked) => "NACKED",
        Ok(pb::SyncState::NotSent) => "NOT SENT",
        _ => "?",
    }
}

/// The status as a table like `istioctl proxy-status`: one row per sidecar, one
/// column per resource type (`STATE version latency`).
pub fn status_table(status: &pb::Status, now_ms: i64) -> String {
    let mut header = vec!["NODE".to_string(), "WORKLOAD".to_string(), "CONNECTED".to_string()];
    header.extend(ResourceType::ALL.iter().map(|t| t.short_name().to_uppercase()));
    let mut rows = vec![header];
    let mut nacks = Vec::new();
    for proxy in &status.proxies {
        let node = proxy.node.clone().unwrap_or_default();
        let since = u64::try_from(now_ms.saturating_sub(proxy.connected_since_unix_ms)).unwrap_or(0);
        let workload =
            if node.workload.is_empty() { "-".to_string() } else { format!("{}.{}", node.workload, node.namespace) };
        let mut row = vec![node.id.clone(), workload, format!("{} ago", humantime::format_duration(secs(since)))];
        for ty in ResourceType::ALL {
            let cell = match proxy.types.iter().find(|t| t.type_url == ty.type_url()) {
                None => "-".to_string(),
                Some(t) => {
                    let version = if t.acked_version.is_empty() { &t.sent_version } else { &t.acked_version };
                    let mut cell = sync_state_name(t.state).to_string();
                    if !version.is_empty() {
                        cell.push_str(&format!(" v{version}"));
                    }
                    if let Some(ms) = t.push_to_ack_ms {
                        cell.push_str(&format!(" {ms}ms"));
                    }
                    if !t.last_nack_error.is_empty() {
                        nacks.push(format!(
                            "{} {} v{}: {}",
                            node.id,
                            ty.short_name(),
                            t.last_nack_version,
                            t.last_nack_error
                        ));
                    }
                    cell
                }
            };
            row.push(cell);
        }
        rows.push(row);
    }
    let mut out = table(&rows);
    if status.proxies.is_empty() {
        out.push_str("(no sidecars connected)\n");
    }
    let mut versions: Vec<_> = status.versions.iter().collect();
    versions.sort();
    let versions: Vec<String> = versions
        .iter()
        .map(|(k, v)| match ResourceType::from_type_url(k) {
            Some(t) => format!("{}={v}", t.short_name()),
            None => format!("{k}={v}"),
        })
        .collect();
    out.push_str(&format!("control plane versions: {}\n", versions.join(" ")));
    for nack in nacks {
        out.push_str(&format!("last NACK: {nack}\n"));
    }
    out
}

/// `rows` (the header first) as left-aligned columns two spaces apart, one line each,
/// without trailing spaces: the tables of `serin ctl`.
pub fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..columns).map(|i| rows.iter().filter_map(|r| r.get(i)).map(|c| c.len()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Whole seconds of `ms` (a table does not need milliseconds of uptime).
fn secs(ms: u64) -> Duration {
    Duration::from_secs(ms / 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_without_trailing_spaces() {
        let rows = vec![
            vec!["NAME".to_string(), "STATE".to_string(), "X".to_string()],
            vec!["frontend-1".to_string(), "SYNCED".to_string(), String::new()],
        ];
        assert_eq!(table(&rows), "NAME        STATE   X\nfrontend-1  SYNCED\n");
        assert_eq!(table(&[]), "");
        assert_eq!(sync_state_name(pb::SyncState::NotSent as i32), "NOT SENT");
        assert_eq!(sync_state_name(99), "?");
    }

    #[test]
    fn the_status_table_shows_each_type_with_its_state_version_and_latency() {
        let proxy = pb::ProxyStatus {
            node: Some(pb::Node {
                id: "frontend-1".into(),
                workload: "frontend".into(),
                namespace: "default".into(),
                ..Default::default()
            }),
            connected_since_unix_ms: 1_000,
            types: vec![
                pb::TypeStatus {
                    type_url: ResourceType::Routes.type_url().into(),
                    sent_version: "3".into(),
                    acked_version: "3".into(),
                    state: pb::SyncState::Synced as i32,
                    push_to_ack_ms: Some(12),
                    ..Default::default()
                },
                pb::TypeStatus {
                    type_url: ResourceType::Clusters.type_url().into(),
                    sent_version: "2".into(),
                    acked_version: "1".into(),
                    state: pb::SyncState::Nacked as i32,
                    last_nack_version: "2".into(),
                    last_nack_error: "bad subset".into(),
                    ..Default::default()
                },
            ],
            stream_id: 1,
        };
        let status = pb::Status {
            proxies: vec![proxy],
            versions: [(ResourceType::Routes.type_url().to_string(), "3".to_string())].into_iter().collect(),
        };
        let table = status_table(&status, 61_000);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("NODE"), "{table}");
        assert!(lines[1].starts_with("frontend-1"), "{table}");
        assert!(lines[1].contains("frontend.default"), "{table}");
        assert!(lines[1].contains("1m ago"), "{table}");
        assert!(lines[1].contains("SYNCED v3 12ms"), "{table}");
        assert!(lines[1].contains("NACKED v1"), "{table}");
        assert!(table.contains("control plane versions: routes=3"), "{table}");
        assert!(table.contains("last NACK: frontend-1 clusters v2: bad subset"), "{table}");
    }
}
