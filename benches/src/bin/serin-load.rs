//! `serin-load`: HTTP/1.1 or h2c load, open loop (`--rate N`) or closed loop
//! (`--rate max`), with HdrHistogram latencies and per-version shares. See
//! `benches/README.md`.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use serin_benches::cli::LoadArgs;

fn main() -> ExitCode {
    let args = LoadArgs::parse();
    serin_benches::cli::init_logging("warn");
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("serin-load: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: LoadArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    runtime.block_on(async {
        let cfg = args.to_config().await?;
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        // Ctrl-C ends the run early; the report covers what was done until then.
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                tracing::info!("Ctrl-C: stopping");
                stop_tx.send_replace(true);
            } else {
                // No signal handling: keep the sender alive so the run is not stopped.
                std::future::pending::<()>().await;
            }
        });
        let report = serin_benches::load::run_until(cfg, stop).await.context("load run")?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report).context("encoding the report")?);
        } else {
            print!("{}", report.render_text());
        }
        Ok(())
    })
}
