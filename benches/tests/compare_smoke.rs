//! `benches/compare` (serin side by side with nginx and haproxy, issue 6) stays
//! runnable: a `--quick` run (one round, 1 s per measured run) against this
//! profile's `serin` and `serin-load`, with the system's nginx and haproxy. It
//! asserts that the script finished, printed its tables with a row per case, and
//! that no request failed and every proxy split between v1 and v2; timings never.
//!
//! Needs python3, nginx and haproxy (`apt-get install nginx haproxy`; `.ci/run`
//! installs them): fails naming what is missing.
//!
//! The serin binary is another package's: `$SERIN_BIN` when set, else the `serin`
//! next to `serin-load` in this profile's folder (`target/debug/serin`, which
//! `cargo test --workspace` builds for the proxy's tests), built with cargo when
//! missing.

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;
use support::{run_bounded, serin_bin};

const CASES: [&str; 7] = [
    "direct",
    "serin one hop",
    "nginx one hop",
    "haproxy one hop",
    "serin mTLS pair",
    "nginx mTLS pair",
    "haproxy mTLS pair",
];

/// `name` in `PATH` or in the sbin folders (nginx and haproxy live in /usr/sbin).
fn find_tool(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    dirs.extend(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from));
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

#[test]
fn compare_quick_run_prints_the_table() {
    let missing: Vec<&str> = ["python3", "nginx", "haproxy"].into_iter().filter(|t| find_tool(t).is_none()).collect();
    assert!(
        missing.is_empty(),
        "benches/compare needs nginx and haproxy (and python3); missing: {}. Install them: \
         `apt-get install nginx haproxy` (`.ci/run` does)",
        missing.join(", ")
    );
    let json = std::env::temp_dir().join(format!("serin-compare-smoke-{}.json", std::process::id()));
    let mut cmd = Command::new("python3");
    cmd.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/compare"))
        .args(["--quick", "--no-build", "--no-install", "--deadline", "240", "--serin"])
        .arg(serin_bin())
        .args(["--serin-load", env!("CARGO_BIN_EXE_serin-load"), "--json-out"])
        .arg(&json);
    let out = run_bounded(&mut cmd, Duration::from_secs(300));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "benches/compare --quick failed ({}):\n{stdout}\n{stderr}", out.status);
    for heading in
        ["Throughput, cost and memory", "Latency, open loop", "Ratio to haproxy", "Ratio to nginx", "Issue 6's targets"]
    {
        assert!(stdout.contains(heading), "no {heading:?} in:\n{stdout}");
    }
    for case in CASES {
        // One row in the cost table, one in the latency table (and the proxies' in the ratio tables).
        let rows = stdout.matches(&format!("| {case} |")).count();
        assert!(rows >= 2, "{rows} row(s) for {case:?} in:\n{stdout}");
    }

    let text = std::fs::read_to_string(&json).expect("the --json-out file");
    drop(std::fs::remove_file(&json));
    let report: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    let round = &report["figures"][0];
    for case in CASES {
        let f = &round[case];
        assert!(f.is_object(), "no figures for {case:?}: {round}");
        assert_eq!(f["errors"], 0, "{case}: failed requests: {f}");
        assert!(f["requests"].as_u64().unwrap_or(0) > 0, "{case}: no requests: {f}");
        if case != "direct" {
            // The 95/5 split happened (v2 answered some, v1 most); not a timing.
            let share = f["v2_share"].as_f64().unwrap_or(-1.0);
            assert!(share > 0.0 && share < 50.0, "{case}: v2 share {share}%: {f}");
        }
    }
}
