//! `serin ctl canary`: start, follow and stop the control plane's automated canary
//! analyses (`start`, `status`, `abort`, `list`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serin_control_api::client::CanaryClient;
use serin_control_api::pb;
use serin_control_api::server::canary::spec::parse_go_duration;

/// The commands of `serin ctl canary`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum CanaryCommand {
    /// Start an analysis: the canary's weight goes up one step per passing interval,
    /// rolls back at `--threshold` failed intervals, promotes after passing at `--max`.
    Start(Box<StartArgs>),
    /// Phase, weight, step, failed checks, last figures per version and events.
    Status {
        /// The service (short name or FQDN).
        service: String,
    },
    /// Stop a running analysis (weights left as they are, unless `--rollback`).
    Abort {
        /// The service.
        service: String,
        /// Also send all traffic back to the stable subset, confirmed by the sidecars.
        #[arg(long)]
        rollback: bool,
    },
    /// Every analysis, running and finished.
    List,
}

/// Options of `serin ctl canary start`.
#[derive(Debug, Clone, clap::Args)]
pub struct StartArgs {
    /// The service (short name or FQDN).
    pub service: String,
    /// The canary subset (default: the non-stable one, when the service has two).
    #[arg(long)]
    pub canary: Option<String>,
    /// The stable subset (default: the one `rollback` sends traffic to).
    #[arg(long)]
    pub stable: Option<String>,
    /// Weight added per passing interval, percent (default 10).
    #[arg(long, conflicts_with = "steps")]
    pub step: Option<u32>,
    /// Explicit increasing weights, e.g. `5,10,25,50` (the last is the max weight).
    #[arg(long, value_delimiter = ',')]
    pub steps: Vec<u32>,
    /// The canary's weight at which passing promotes it (default 50, or the last of `--steps`).
    #[arg(long)]
    pub max: Option<u32>,
    /// Analysis interval (Go duration: 30s, 1m, 1m30s).
    #[arg(long, default_value = "1m", value_parser = parse_interval)]
    pub interval: Duration,
    /// Failed intervals before rollback (counted over the whole analysis).
    #[arg(long, default_value_t = 5)]
    pub threshold: u32,
    /// Fail an interval whose canary success rate (non-5xx %) is below this.
    #[arg(long, default_value_t = 99.0)]
    pub min_success: f64,
    /// Fail an interval whose canary p99 is above this (`500ms`, `1s`, or milliseconds).
    #[arg(long, value_parser = parse_ms)]
    pub max_p99: Option<f64>,
    /// Fewest canary requests in an interval for it to be judged.
    #[arg(long, default_value_t = 10)]
    pub min_requests: u64,
    /// The canary's weight after promotion, percent.
    #[arg(long, default_value_t = 100)]
    pub promote_weight: u32,
    /// Also fail an interval whose canary success rate is more than this many points
    /// below the stable version's in the same interval.
    #[arg(long)]
    pub max_success_drop: Option<f64>,
}

fn parse_interval(text: &str) -> Result<Duration, String> {
    parse_go_duration(text)
}

/// `500ms`, `1s`, `1.5s` or a plain number of milliseconds.
fn parse_ms(text: &str) -> Result<f64, String> {
    if let Ok(ms) = text.trim().parse::<f64>() {
        return Ok(ms);
    }
    parse_go_duration(text).map(|d| d.as_secs_f64() * 1000.0)
}

impl StartArgs {
    /// The spec this command asks for (the control plane checks it and fills in the rest).
    pub fn spec(&self) -> pb::CanarySpec {
        let step_weight = if self.steps.is_empty() { self.step.unwrap_or(10) } else { 0 };
        let max_weight = match (self.max, self.steps.last()) {
            (Some(max), _) => max,
            (None, Some(_)) => 0,
            (None, None) => 50,
        };
        pb::CanarySpec {
            service: self.service.clone(),
            canary: self.canary.clone().unwrap_or_default(),
            stable: self.stable.clone().unwrap_or_default(),
            step_weight,
            step_weights: self.steps.clone(),
            max_weight,
            interval_ms: u32::try_from(self.interval.as_millis()).unwrap_or(u32::MAX),
            threshold: self.threshold,
            min_success_percent: Some(self.min_success),
            max_p99_ms: self.max_p99,
            min_requests: self.min_requests,
            max_success_drop_percent: self.max_success_drop,
            promote_weight: self.promote_weight,
            source: "ctl".to_string(),
            success_window_ms: 0,
            p99_window_ms: 0,
        }
    }
}

/// Runs `serin ctl canary` against the control plane at `address`.
pub async fn run(address: &str, command: CanaryCommand) -> anyhow::Result<()> {
    let mut client = CanaryClient::connect(address).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let api = |e: serin_control_api::client::ClientError| anyhow::anyhow!("{e}");
    match command {
        CanaryCommand::Start(args) => {
            let status = client.start(args.spec()).await.map_err(api)?;
            print!("{}", started(&status));
        }
        CanaryCommand::Status { service } => {
            let status = client.get(&service).await.map_err(api)?;
            print!("{}", status_text(&status, now_ms()));
        }
        CanaryCommand::Abort { service, rollback } => {
            let status = client.abort(&service, rollback).await.map_err(api)?;
            println!(
                "{}: {} at canary weight {}%{}",
                status.spec.as_ref().map_or("", |s| s.service.as_str()),
                phase_name(status.phase),
                status.weight,
                if status.reason.is_empty() { String::new() } else { format!(" ({})", status.reason) }
            );
        }
        CanaryCommand::List => {
            let list = client.list().await.map_err(api)?;
            print!("{}", list_table(&list));
        }
    }
    Ok(())
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn phase_name(phase: i32) -> &'static str {
    match pb::CanaryPhase::try_from(phase) {
        Ok(pb::CanaryPhase::Initialized) => "Initialized",
        Ok(pb::CanaryPhase::Progressing) => "Progressing",
        Ok(pb::CanaryPhase::Succeeded) => "Succeeded",
        Ok(pb::CanaryPhase::Failed) => "Failed",
        Ok(pb::CanaryPhase::Aborted) => "Aborted",
        _ => "?",
    }
}

/// The steps of a spec as the control plane runs them.
fn steps(spec: &pb::CanarySpec) -> Vec<u32> {
    serin_control_api::server::canary::spec::steps(spec)
}

fn checks(spec: &pb::CanarySpec) -> String {
    let mut checks = Vec::new();
    if let Some(min) = spec.min_success_percent {
        checks.push(format!("success rate >= {min}%"));
    }
    if let Some(max) = spec.max_p99_ms {
        checks.push(format!("p99 <= {max} ms"));
    }
    if let Some(drop) = spec.max_success_drop_percent {
        checks.push(format!("success rate at most {drop} points below stable's"));
    }
    if checks.is_empty() { "none".to_string() } else { checks.join(", ") }
}

fn started(status: &pb::CanaryStatus) -> String {
    let Some(spec) = &status.spec else { return "started\n".to_string() };
    let steps: Vec<String> = steps(spec).iter().map(u32::to_string).collect();
    format!(
        "{}: analysis started ({}), canary {} at {}% against stable {}\n  steps {}% then promote to {}%, every {}; rollback after {} \
         failed interval(s)\n  checks: {} (at least {} canary requests per interval)\n  follow it with `serin ctl canary \
         status {}`\n",
        spec.service,
        phase_name(status.phase),
        spec.canary,
        status.weight,
        spec.stable,
        steps.join(","),
        spec.promote_weight,
        humantime::format_duration(Duration::from_millis(u64::from(spec.interval_ms))),
        spec.threshold,
        checks(spec),
        spec.min_requests,
        spec.service
    )
}

fn figures_line(f: &pb::IntervalFigures) -> String {
    let success = f.success_percent.map_or_else(|| "-".to_string(), |s| format!("{s:.2}%"));
    let p99 = f.p99_ms.map_or_else(|| "-".to_string(), |p| format!("{p:.1} ms"));
    format!("{:<12} {:>10} {:>10} {:>12}", f.version, f.requests, success, p99)
}

fn time_of(unix_ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(u64::try_from(unix_ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

/// `serin ctl canary status`: the analysis as text.
pub fn status_text(status: &pb::CanaryStatus, now_ms: i64) -> String {
    let spec = status.spec.clone().unwrap_or_default();
    let steps = steps(&spec);
    let mut out = String::new();
    out.push_str(&format!("service:       {} ({})\n", spec.service, spec.source));
    out.push_str(&format!("phase:         {}\n", phase_name(status.phase)));
    if !status.reason.is_empty() {
        out.push_str(&format!("reason:        {}\n", status.reason));
    }
    out.push_str(&format!(
        "weight:        canary {} {}%, stable {} {}%\n",
        spec.canary,
        status.weight,
        spec.stable,
        100u32.saturating_sub(status.weight)
    ));
    let list: Vec<String> = steps.iter().map(u32::to_string).collect();
    out.push_str(&format!(
        "step:          {} of {} ({}%; then promote to {}%)\n",
        (status.step + 1).min(u32::try_from(steps.len()).unwrap_or(u32::MAX)),
        steps.len(),
        list.join(","),
        spec.promote_weight
    ));
    out.push_str(&format!("failed checks: {} of {}\n", status.failed_checks, spec.threshold));
    out.push_str(&format!(
        "checks:        {} (at least {} requests per {})\n",
        checks(&spec),
        spec.min_requests,
        humantime::format_duration(Duration::from_millis(u64::from(spec.interval_ms)))
    ));
    if status.next_check_unix_ms > 0 {
        let left = u64::try_from(status.next_check_unix_ms.saturating_sub(now_ms)).unwrap_or(0);
        out.push_str(&format!(
            "next check:    in {}\n",
            humantime::format_duration(Duration::from_secs(left.div_ceil(1000)))
        ));
    }
    if !status.last_figures.is_empty() {
        out.push_str("last interval:\n");
        out.push_str(&format!("  {:<12} {:>10} {:>10} {:>12}\n", "VERSION", "REQUESTS", "SUCCESS", "P99"));
        for f in &status.last_figures {
            out.push_str(&format!("  {}\n", figures_line(f)));
        }
    }
    out.push_str("events:\n");
    if status.events.is_empty() {
        out.push_str("  (none yet)\n");
    }
    for e in &status.events {
        out.push_str(&format!("  {} {:<12} {:>3}%  {}\n", time_of(e.unix_ms), e.kind, e.weight, e.message));
    }
    out
}

/// `serin ctl canary list`: one row per service.
pub fn list_table(list: &pb::CanaryList) -> String {
    let mut rows =
        vec![["SERVICE", "CANARY", "STABLE", "PHASE", "WEIGHT", "STEP", "FAILED", "SOURCE"].map(String::from).to_vec()];
    for c in &list.canaries {
        let spec = c.spec.clone().unwrap_or_default();
        rows.push(vec![
            spec.service.clone(),
            spec.canary.clone(),
            spec.stable.clone(),
            phase_name(c.phase).to_string(),
            format!("{}%", c.weight),
            format!("{}/{}", c.step + 1, steps(&spec).len()),
            format!("{}/{}", c.failed_checks, spec.threshold),
            spec.source.clone(),
        ]);
    }
    let mut out = crate::ctl::table(&rows);
    if list.canaries.is_empty() {
        out.push_str("(no canary analyses)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        command: CanaryCommand,
    }

    #[test]
    fn start_flags_make_a_spec() {
        let cli = Cli::try_parse_from([
            "canary",
            "start",
            "payment",
            "--canary",
            "v2",
            "--steps",
            "5,10,25,50",
            "--interval",
            "30s",
            "--max-p99",
            "500ms",
            "--min-success",
            "99.5",
            "--max-success-drop",
            "1",
        ])
        .expect("parses");
        let CanaryCommand::Start(args) = cli.command else { panic!("start") };
        let spec = args.spec();
        assert_eq!(spec.step_weights, vec![5, 10, 25, 50]);
        assert_eq!((spec.step_weight, spec.max_weight, spec.interval_ms), (0, 0, 30_000));
        assert_eq!(spec.max_p99_ms, Some(500.0));
        assert_eq!(spec.min_success_percent, Some(99.5));
        assert_eq!(spec.max_success_drop_percent, Some(1.0));
        let cli = Cli::try_parse_from(["canary", "start", "payment", "--step", "5", "--max", "50"]).expect("parses");
        let CanaryCommand::Start(args) = cli.command else { panic!("start") };
        assert_eq!((args.spec().step_weight, args.spec().max_weight, args.spec().threshold), (5, 50, 5));
        assert!(Cli::try_parse_from(["canary", "start", "payment", "--step", "5", "--steps", "5,10"]).is_err());
        assert!(Cli::try_parse_from(["canary", "start", "payment", "--interval", "1x"]).is_err());
    }

    #[test]
    fn status_shows_phase_weight_figures_and_events() {
        let status = pb::CanaryStatus {
            spec: Some(pb::CanarySpec {
                service: "payment".into(),
                canary: "v2".into(),
                stable: "v1".into(),
                step_weight: 10,
                max_weight: 30,
                interval_ms: 30_000,
                threshold: 3,
                min_success_percent: Some(99.0),
                min_requests: 10,
                promote_weight: 100,
                source: "ctl".into(),
                ..Default::default()
            }),
            phase: pb::CanaryPhase::Progressing as i32,
            weight: 20,
            step: 1,
            failed_checks: 1,
            next_check_unix_ms: 10_000,
            last_figures: vec![
                pb::IntervalFigures {
                    version: "v2".into(),
                    requests: 120,
                    success_percent: Some(97.5),
                    p99_ms: Some(40.0),
                },
                pb::IntervalFigures { version: "v1".into(), requests: 480, success_percent: Some(100.0), p99_ms: None },
            ],
            events: vec![pb::CanaryEvent {
                unix_ms: 1_000,
                kind: "failed-check".into(),
                message: "check failed at 20%".into(),
                weight: 20,
                figures: Vec::new(),
            }],
            ..Default::default()
        };
        let text = status_text(&status, 5_000);
        assert!(text.contains("phase:         Progressing"), "{text}");
        assert!(text.contains("canary v2 20%, stable v1 80%"), "{text}");
        assert!(text.contains("step:          2 of 3"), "{text}");
        assert!(text.contains("failed checks: 1 of 3"), "{text}");
        assert!(text.contains("next check:    in 5s"), "{text}");
        assert!(text.contains("97.50%"), "{text}");
        assert!(text.contains("failed-check"), "{text}");
        let table = list_table(&pb::CanaryList { canaries: vec![status] });
        assert!(table.lines().nth(1).is_some_and(|l| l.contains("Progressing") && l.contains("2/3")), "{table}");
    }
}
