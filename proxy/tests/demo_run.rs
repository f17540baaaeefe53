//! `serin demo` as a newcomer runs it: a process that shows both versions with
//! the 95/5 split and mutual TLS in its table, and stops everything it started.

use std::process::Command;

#[test]
fn demo_shows_the_split_and_stops_cleanly() {
    let out = Command::new(env!("CARGO_BIN_EXE_serin"))
        .args(["demo", "--duration", "3s", "--rate", "200"])
        .output()
        .expect("run serin demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    let last_table: Vec<&str> =
        stdout.rsplit("payment canary through the sidecar").next().unwrap_or("").lines().collect();
    let row = |v: &str| last_table.iter().find(|l| l.starts_with(v)).map(|l| l.split_whitespace().collect::<Vec<_>>());
    let v1 = row("v1").expect("a v1 row");
    let v2 = row("v2").expect("a v2 row");
    let share = |cols: &Vec<&str>| cols[3].trim_end_matches('%').parse::<f64>().expect("share column");
    // Exact split: within one request of 5% at any point of the run.
    let total: f64 = v1[1].parse::<f64>().expect("count") + v2[1].parse::<f64>().expect("count");
    assert!((share(&v2) - 5.0).abs() <= 100.0 / total + 0.01, "v2 share {} of {total}", share(&v2));
    assert!(share(&v1) > 94.0);
    assert!(stdout.contains("sidecar metrics: istio_requests_total"));
    assert!(stdout.contains("stopped every upstream, the sidecars and the load"));
    // Every hop to the pods is mutual TLS, and plaintext to a STRICT pod is refused.
    assert!(v1.join(" ").ends_with("mutual_tls 100%"), "v1 row: {v1:?}");
    assert!(v2.join(" ").ends_with("mutual_tls 100%"), "v2 row: {v2:?}");
    assert!(stdout.contains("(PeerAuthentication STRICT): refused"), "{stdout}");
}
