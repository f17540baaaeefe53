//! `serin demo` as a newcomer runs it: a process with the control plane in it, whose
//! frontend sidecar gets its config over gRPC and reports its load; the control
//! plane's canary analysis steps v2's weight (5 → 10 → 25 → 50%) and rolls a failing
//! v2 back or promotes a healthy one; the traffic follows each split exactly, every
//! hop to the pods is mutual TLS, and it stops everything it started.

use std::process::Command;

/// `(total, v1, v2)` of the end summary's line for the phase named `origin`
/// (`config`, `step 1`, …, `rollback`, `promote`), like
/// `  v1=95 v2=5   step 1   497 requests: v1 473 (95.17%), v2 24 (4.83%)`.
fn phase(stdout: &str, origin: &str) -> (u64, u64, u64) {
    let summary = stdout.rsplit("while each split was in force").next().unwrap_or("");
    for line in summary.lines() {
        let Some((left, right)) = line.split_once(" requests: ") else { continue };
        let words: Vec<&str> = left.split_whitespace().collect();
        let Some((total, rest)) = words.split_last() else { continue };
        let name: Vec<&str> = rest.iter().copied().filter(|w| !w.contains('=')).collect();
        if name.join(" ") != origin {
            continue;
        }
        let count = |version: &str| -> u64 {
            right
                .split(", ")
                .find_map(|part| part.strip_prefix(&format!("{version} ")))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no {version} count in {line:?}"))
        };
        let total = total.parse().unwrap_or_else(|_| panic!("no total in {line:?}"));
        return (total, count("v1"), count("v2"));
    }
    panic!("no summary line for {origin}:\n{summary}");
}

/// Asserts v2's share of a phase is `percent`, within three requests (the exact
/// split, give or take requests that crossed the phase's edges out of order).
fn assert_v2_share(stdout: &str, origin: &str, percent: f64) {
    let (total, v1, v2) = phase(stdout, origin);
    assert!(total > 0 && v1 + v2 == total, "{origin}: {total} = {v1} + {v2}");
    let share = 100.0 * v2 as f64 / total as f64;
    assert!((share - percent).abs() <= 300.0 / total as f64 + 0.01, "{origin}: v2 {v2} of {total} is {share:.2}%");
}

/// Runs `serin demo` with `args`; returns its stdout once it stopped cleanly.
fn run_demo(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_serin")).arg("demo").args(args).output().expect("run serin demo");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "demo failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("stopped every upstream, the sidecars, the control plane and the load"), "{stdout}");
    stdout
}

/// What every run shows: the control plane, the dashboard, the frontend sidecar's
/// first config (v2 dark), mutual TLS on every hop to the pods, the metrics line.
fn assert_common(stdout: &str) {
    assert!(stdout.contains("control plane     127.0.0.1:"), "{stdout}");
    assert!(stdout.contains("dashboard         http://127.0.0.1:"), "{stdout}");
    assert!(
        stdout.contains("config pushed by the control plane (node frontend), now: split v1 100% / v2 0%"),
        "{stdout}"
    );
    let last_table = stdout.rsplit("payment through the frontend sidecar").next().unwrap_or("");
    let rows: Vec<&str> = last_table.lines().collect();
    for version in ["v1", "v2"] {
        let row = rows.iter().find(|l| l.starts_with(version)).unwrap_or_else(|| panic!("a {version} row"));
        assert!(row.ends_with("mutual_tls 100%"), "{version} row: {row:?}");
    }
    assert!(stdout.contains("(PeerAuthentication STRICT): refused"), "{stdout}");
    assert!(stdout.contains("sidecar metrics: istio_requests_total"), "{stdout}");
    assert_v2_share(stdout, "config", 0.0);
    assert_v2_share(stdout, "step 1", 5.0);
}

/// The `>> … canary KIND: …` lines, in order.
fn canary_events(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix(">> ")?.split_once("] canary ")?.1.split(':').next().map(str::to_string))
        .collect()
}

/// The analysis' decisions as the demo printed them (for failure messages).
fn decisions(stdout: &str) -> String {
    stdout.lines().filter(|l| l.starts_with(">> ")).collect::<Vec<_>>().join("\n")
}

#[test]
fn demo_rolls_a_failing_canary_back_and_stops_cleanly() {
    let stdout = run_demo(&["--duration", "20s", "--interval", "2s", "--min-requests", "10"]);
    assert_common(&stdout);
    let events = canary_events(&stdout);
    assert_eq!(events.first().map(String::as_str), Some("started"), "{stdout}");
    assert_eq!(events.iter().filter(|e| *e == "failed-check").count(), 2, "{}", decisions(&stdout));
    assert!(events.contains(&"rollback".to_string()), "{events:?}");
    assert!(stdout.contains("canary analysis ended: FAILED"), "{stdout}");
    // After the rollback the frontend sidecar routes everything to v1, and does.
    let last_table = stdout.rsplit("payment through the frontend sidecar").next().unwrap_or("");
    assert!(last_table.contains("split v1 100% / v2 0%"), "{last_table}");
    let (total, v1, v2) = phase(&stdout, "rollback");
    assert!(total > 0, "requests after the rollback");
    assert_eq!((v1, v2), (total, 0), "after the rollback only v1 answers");
}

#[test]
fn demo_promotes_a_healthy_canary() {
    let stdout = run_demo(&["--duration", "20s", "--healthy-canary", "--interval", "2s", "--min-requests", "10"]);
    assert_common(&stdout);
    let events = canary_events(&stdout);
    assert_eq!(events.iter().filter(|e| *e == "step").count(), 3, "{}", decisions(&stdout));
    assert!(!events.contains(&"failed-check".to_string()), "{events:?}");
    assert!(stdout.contains("canary analysis ended: SUCCEEDED"), "{stdout}");
    // Each step's split held exactly, then all traffic went to v2.
    assert_v2_share(&stdout, "step 2", 10.0);
    assert_v2_share(&stdout, "step 3", 25.0);
    assert_v2_share(&stdout, "step 4", 50.0);
    let (total, v1, v2) = phase(&stdout, "promote");
    assert!(total > 0, "requests after the promotion");
    assert_eq!((v1, v2), (0, total), "after the promotion only v2 answers");
}
