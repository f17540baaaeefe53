//! `serin-push-latency` stays runnable: a tiny run (5 streams, 2 changes) against a
//! real `serin control-plane`, and a clear error when the serin binary is missing.
//! Counts are asserted; timings never are.
//!
//! The serin binary is another package's, so `CARGO_BIN_EXE_serin` is not available
//! here: the test uses `$SERIN_BIN` when set, else the `serin` next to this test's
//! own profile folder (`target/debug/serin`, which `cargo test --workspace` builds for
//! the proxy's tests), building it with cargo when it is not there.

mod support;

use std::process::{Command, Output};
use support::serin_bin;

fn push_latency(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_serin-push-latency"))
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("run serin-push-latency")
}

#[test]
fn five_streams_two_changes_all_acked() {
    let serin = serin_bin();
    let serin = serin.to_str().expect("UTF-8 path");
    let out = push_latency(&[
        "--streams",
        "5",
        "--changes",
        "2",
        "--serin-bin",
        serin,
        "--idle",
        "0s",
        "--pause",
        "0s",
        "--deadline",
        "120s",
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "serin-push-latency failed ({}):\n{stderr}", out.status);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON report");
    assert_eq!(report["streams"], 5);
    assert_eq!(report["changes"], 2);
    assert_eq!(report["server_wait"], true);
    assert_eq!(report["last_ack_ms"]["count"], 2);
    let samples = report["samples"].as_array().expect("samples");
    assert_eq!(samples.len(), 2);
    for sample in samples {
        assert_eq!(sample["acked"], 5, "{sample}");
    }
    assert_eq!(samples[0]["weights"], "v1=90 v2=10");
    assert_eq!(samples[1]["weights"], "v1=95 v2=5");
    // Each change is a new routes version.
    assert!(samples[1]["version"].as_u64() > samples[0]["version"].as_u64(), "{samples:?}");
    let cp = &report["control_plane"];
    assert!(cp["streams_idle"]["vm_rss_kib"].as_u64().is_some_and(|k| k > 0), "{cp}");
    assert!(cp["after_changes"]["vm_hwm_kib"].as_u64().is_some_and(|k| k > 0), "{cp}");
}

#[test]
fn text_report_without_wait() {
    let serin = serin_bin();
    let out = push_latency(&[
        "--streams",
        "3",
        "--changes",
        "1",
        "--serin-bin",
        serin.to_str().expect("UTF-8 path"),
        "--idle",
        "0s",
        "--no-wait",
        "--deadline",
        "120s",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "serin-push-latency failed:\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("3 simulated sidecars"), "{stdout}");
    assert!(stdout.contains("SetWeights -> last sidecar ACK"), "{stdout}");
    assert!(stdout.contains("without wait"), "{stdout}");
}

#[test]
fn missing_serin_binary_says_how_to_build_it() {
    let out = push_latency(&["--streams", "1", "--changes", "1", "--serin-bin", "/nonexistent/serin"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/serin not found"), "{stderr}");
    assert!(stderr.contains("cargo build --release -p serin"), "{stderr}");
}
