//! `serin demo` as a newcomer runs it: a process with the control plane in it, whose
//! frontend sidecar gets its config over gRPC; the weights move in steps (95/5,
//! 75/25, rollback), every push ACKed by the frontend sidecar, the traffic follows
//! each split exactly, every hop to the pods is mutual TLS, and it stops everything
//! it started.

use std::process::Command;

/// `(total, v1, v2)` of the end summary's line for the phase named `origin`
/// (`config`, `step 1`, `step 2`, `rollback`), like
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

#[test]
fn demo_shifts_the_weights_through_the_control_plane_and_stops_cleanly() {
    let out = Command::new(env!("CARGO_BIN_EXE_serin"))
        .args(["demo", "--duration", "10s", "--rate", "200"])
        .output()
        .expect("run serin demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("stopped every upstream, the sidecars, the control plane and the load"), "{stdout}");

    // The frontend sidecar got its config from the control plane before the load: v2 dark.
    assert!(stdout.contains("control plane     127.0.0.1:"), "{stdout}");
    assert!(
        stdout.contains("config pushed by the control plane (node frontend), now: split v1 100% / v2 0%"),
        "{stdout}"
    );

    // Three pushes through the management API, in order, each ACKed by the frontend sidecar.
    let pushes: Vec<&str> = stdout.lines().filter(|l| l.starts_with(">> ")).collect();
    let expected = [
        "step 1/3: set-weight payment v1=95 v2=5 →",
        "step 2/3: set-weight payment v1=75 v2=25 →",
        "step 3/3: rollback payment (v1=100 v2=0) →",
    ];
    assert_eq!(pushes.len(), expected.len(), "{stdout}");
    for (line, step) in pushes.iter().zip(expected) {
        assert!(line.contains(step), "expected {step:?} in {line:?}");
        assert!(line.contains("ACKed by 1/1 sidecar(s) (frontend) · push-to-ACK"), "{line}");
    }

    // At the end the rollback is what the frontend sidecar routes by.
    let last_table = stdout.rsplit("payment through the frontend sidecar").next().unwrap_or("");
    assert!(last_table.contains("split v1 100% / v2 0%"), "{last_table}");
    let rows: Vec<&str> = last_table.lines().collect();
    let row = |v: &str| rows.iter().find(|l| l.starts_with(v)).map(|l| l.split_whitespace().collect::<Vec<_>>());
    let v1 = row("v1").expect("a v1 row");
    let v2 = row("v2").expect("a v2 row");
    // Every hop to the pods is mutual TLS, and plaintext to a STRICT pod is refused.
    assert!(v1.join(" ").ends_with("mutual_tls 100%"), "v1 row: {v1:?}");
    assert!(v2.join(" ").ends_with("mutual_tls 100%"), "v2 row: {v2:?}");
    assert!(stdout.contains("(PeerAuthentication STRICT): refused"), "{stdout}");
    assert!(stdout.contains("sidecar metrics: istio_requests_total"));

    // The traffic followed each split exactly, and nothing reached v2 after the rollback.
    assert_v2_share(&stdout, "config", 0.0);
    assert_v2_share(&stdout, "step 1", 5.0);
    assert_v2_share(&stdout, "step 2", 25.0);
    let (total, v1, v2) = phase(&stdout, "rollback");
    assert!(total > 0, "requests after the rollback");
    assert_eq!((v1, v2), (total, 0), "after the rollback only v1 answers");
}
