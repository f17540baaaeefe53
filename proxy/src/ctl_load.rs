//! `serin ctl load [SERVICE] [--window 60s]`: the per-version figures the control plane
//! aggregates from the sidecars' load reports, as a table.

use std::time::Duration;

use serin_control_api::client::LoadClient;
use serin_control_api::pb;

/// Options of `serin ctl load`.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// The service (short name or FQDN); none = every service with figures.
    pub service: Option<String>,
    /// The window the figures cover, ending now (at most 15m, the history the control
    /// plane keeps).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub window: Duration,
}

/// Asks the control plane at `address` and prints the table.
pub async fn run(address: &str, args: &LoadArgs) -> anyhow::Result<()> {
    anyhow::ensure!(!args.window.is_zero(), "--window must be longer than 0");
    let mut client = LoadClient::connect(address).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let service = args.service.as_deref().unwrap_or("");
    let figures = client.load(service, Some(args.window), false).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    print!("{}", load_table(&figures, service));
    Ok(())
}

fn opt(value: Option<f64>, unit: &str, decimals: usize) -> String {
    value.map_or_else(|| "-".to_string(), |v| format!("{v:.decimals$}{unit}"))
}

/// The figures as a table: one row per service and version.
pub fn load_table(figures: &pb::LoadFigures, service: &str) -> String {
    let window = humantime::format_duration(Duration::from_millis(u64::from(figures.window_ms)));
    if figures.versions.is_empty() {
        let what = if service.is_empty() { "any service".to_string() } else { service.to_string() };
        return format!("no load reported for {what} in the last {window}\n");
    }
    let header = ["SERVICE", "VERSION", "RPS", "SHARE", "SUCCESS", "P50", "P99", "REQUESTS", "REPORTERS"];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for v in &figures.versions {
        rows.push(vec![
            v.service.clone(),
            if v.version.is_empty() { "-".to_string() } else { v.version.clone() },
            format!("{:.1}", v.rps),
            format!("{:.1}%", v.share_percent),
            opt(v.success_percent, "%", 2),
            opt(v.p50_ms, "ms", 1),
            opt(v.p99_ms, "ms", 1),
            v.requests.to_string(),
            v.reporters.to_string(),
        ]);
    }
    let mut out = crate::ctl::table(&rows);
    out.push_str(&format!("over the last {window}\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_has_one_row_per_version() {
        let v = |version: &str, requests: u64, errors: u64| pb::VersionFigures {
            service: "payment.default.svc.cluster.local".into(),
            version: version.into(),
            requests,
            status_2xx: requests - errors,
            status_5xx: errors,
            rps: requests as f64 / 60.0,
            share_percent: 50.0,
            success_percent: Some((requests - errors) as f64 * 100.0 / requests as f64),
            p50_ms: Some(2.5),
            p99_ms: Some(24.75),
            reporters: 2,
            ..Default::default()
        };
        let figures =
            pb::LoadFigures { window_ms: 60_000, until_unix_ms: 0, versions: vec![v("v1", 600, 0), v("v2", 600, 60)] };
        let table = load_table(&figures, "payment");
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("SERVICE") && lines[0].contains("REPORTERS"), "{table}");
        assert!(lines[1].contains(" v1 ") && lines[1].contains("100.00%") && lines[1].contains("10.0"), "{table}");
        assert!(lines[2].contains("90.00%") && lines[2].contains("24.8ms") && lines[2].contains("600"), "{table}");
        assert!(table.ends_with("over the last 1m\n"), "{table}");
        let empty = load_table(&pb::LoadFigures { window_ms: 60_000, ..Default::default() }, "payment");
        assert_eq!(empty, "no load reported for payment in the last 1m\n");
    }
}
