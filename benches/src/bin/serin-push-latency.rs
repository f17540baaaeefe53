//! `serin-push-latency`: time from `SetWeights` to the last ACK of N simulated
//! sidecars, against a real `serin control-plane` process, with the control plane's
//! memory and CPU. See `benches/README.md` and [`serin_benches::push`].
//!
//! `cargo build --release -p serin -p serin-benches && target/release/serin-push-latency`

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use serin_benches::push::{PushConfig, run};

/// serin-push-latency: push latency of weight changes to N sidecar streams, against a
/// real `serin control-plane`.
#[derive(Debug, Parser)]
#[command(name = "serin-push-latency", version, about)]
struct Args {
    /// Simulated sidecars: one discovery stream on its own HTTP/2 connection each.
    #[arg(long, default_value_t = 1000)]
    streams: usize,
    /// Weight changes to make and time (alternating v1=90/v2=10 and v1=95/v2=5).
    #[arg(long, default_value_t = 50)]
    changes: usize,
    /// The serin binary to run as `serin control-plane`.
    #[arg(long, default_value = "target/release/serin")]
    serin_bin: PathBuf,
    /// Pause after each change's last ACK, before the next change.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    pause: Duration,
    /// CPU of the control plane is sampled over this idle window with every stream open.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    idle: Duration,
    /// Bound on opening every stream and getting every first ACK.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    setup_timeout: Duration,
    /// Bound on one change, from SetWeights to the last ACK.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    change_timeout: Duration,
    /// Call SetWeights without `wait` (only the simulated sidecars tell when they have it).
    #[arg(long)]
    no_wait: bool,
    /// Bound on the whole run.
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
    deadline: Duration,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    serin_benches::cli::init_logging("error");
    match main_inner(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("serin-push-latency: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn main_inner(args: &Args) -> anyhow::Result<()> {
    let cfg = PushConfig {
        serin_bin: args.serin_bin.clone(),
        streams: args.streams,
        changes: args.changes,
        pause: args.pause,
        idle: args.idle,
        setup_timeout: args.setup_timeout,
        change_timeout: args.change_timeout,
        server_wait: !args.no_wait,
    };
    let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    let report = runtime
        .block_on(async { tokio::time::timeout(args.deadline, run(&cfg)).await })
        .map_err(|_| anyhow::anyhow!("the run did not finish within --deadline {:?}", args.deadline))?
        .context("push-latency run")?;
    // The simulated sidecars' tasks are stopped; do not wait for stragglers.
    runtime.shutdown_timeout(Duration::from_secs(1));
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).context("encoding the report")?);
    } else {
        print!("{}", report.render_text());
    }
    Ok(())
}
