//! `serin-load-reports` stays runnable: 20 simulated sidecars report for 3 s to a real
//! `serin control-plane`, and `GetLoad` must sum exactly what they sent. Only the
//! correctness check is asserted; timings never are. The serin binary is found as in
//! the other smoke tests (`support::serin_bin`).

mod support;

use std::process::Command;
use support::serin_bin;

#[test]
fn twenty_streams_three_seconds_sum_exactly() {
    let serin = serin_bin();
    let out = Command::new(env!("CARGO_BIN_EXE_serin-load-reports"))
        .args(["--streams", "20", "--duration", "3s", "--idle", "1s", "--deadline", "120s", "--json", "--serin-bin"])
        .arg(&serin)
        .env("NO_COLOR", "1")
        .output()
        .expect("run serin-load-reports");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "serin-load-reports failed:\nstdout:\n{stdout}\nstderr:\n{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("JSON report");
    let check = &report["check"];
    assert_eq!(check["exact"], true, "{check:#}");
    assert_eq!(check["streams_reporting"], 20, "{check:#}");
    assert_eq!(report["reports_dropped"], 0);
    let sent: u64 =
        check["rows"].as_array().expect("rows").iter().map(|r| r["sent_requests"].as_u64().unwrap_or(0)).sum();
    assert!(sent > 0, "no request was reported: {check:#}");
}
