//! `benches/orderfile.py` (the linker's order file for the sidecar's code, issue 6)
//! stays runnable: it runs this profile's `serin` sidecars under callgrind for a
//! few requests per path and writes an order file to a temp folder (never
//! `proxy/serin.order`). It asserts that the file lists the request path's
//! functions, the one-thread sidecar's scheduler and the mTLS code, as mangled
//! symbols the linker can match, and that `--check` tells a current file from a
//! stale one; timings never.
//!
//! Needs python3 and valgrind (`.ci/run` installs valgrind): fails naming what is
//! missing.

mod support;

use std::process::Command;
use std::time::Duration;
use support::{run_bounded, serin_bin};

#[test]
fn orderfile_lists_the_sidecars_functions() {
    let valgrind = Command::new("valgrind").arg("--version").output();
    assert!(
        valgrind.is_ok_and(|o| o.status.success()),
        "benches/orderfile.py needs valgrind: `apt-get install valgrind` (`.ci/run` does)"
    );
    let out_file = std::env::temp_dir().join(format!("serin-orderfile-smoke-{}.order", std::process::id()));
    let mut cmd = Command::new("python3");
    cmd.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/orderfile.py"))
        .args(["--no-build", "--requests", "100", "--timeout", "300", "--out"])
        .arg(&out_file)
        .arg("--serin")
        .arg(serin_bin())
        .args(["--serin-load", env!("CARGO_BIN_EXE_serin-load")]);
    let out = run_bounded(&mut cmd, Duration::from_secs(900));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "benches/orderfile.py failed ({}):\n{stdout}\n{stderr}", out.status);
    let text = std::fs::read_to_string(&out_file).expect("the order file");
    // `--check`: the file just written matches the binary it came from; a file of
    // names the binary lacks (a stale one) fails, saying so.
    let check = |order: &std::path::Path| {
        let mut cmd = Command::new("python3");
        cmd.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/orderfile.py"))
            .arg("--check")
            .arg("--out")
            .arg(order)
            .arg("--serin")
            .arg(serin_bin());
        run_bounded(&mut cmd, Duration::from_secs(120))
    };
    let fresh = check(&out_file);
    let fresh_out = String::from_utf8_lossy(&fresh.stdout);
    assert!(fresh.status.success() && fresh_out.contains("current"), "{fresh_out}");
    let stale_file = out_file.with_extension("stale");
    std::fs::write(&stale_file, "_ZN5serin14renamed_before4this17h0000000000000000E\n").expect("a stale order file");
    let stale = check(&stale_file);
    let stale_out = String::from_utf8_lossy(&stale.stdout);
    assert_eq!(stale.status.code(), Some(1), "{stale_out}");
    assert!(stale_out.contains("0 of 1 symbols") && stale_out.contains("stale"), "{stale_out}");
    // Nearly every name matching is not enough when the hottest one was renamed.
    let renamed_first =
        text.replacen(text.lines().next().unwrap_or_default(), "_ZN5serin7renamed17h0000000000000000E", 1);
    std::fs::write(&stale_file, renamed_first).expect("an order file with its hottest name renamed");
    let hot = check(&stale_file);
    drop(std::fs::remove_file(&stale_file));
    drop(std::fs::remove_file(&out_file));
    let hot_out = String::from_utf8_lossy(&hot.stdout);
    assert_eq!(hot.status.code(), Some(1), "{hot_out}");
    assert!(hot_out.contains("the hottest 100: 99") && hot_out.contains("stale"), "{hot_out}");
    let names: Vec<&str> = text.lines().collect();
    assert!(names.len() > 1000, "only {} functions:\n{stdout}\n{stderr}", names.len());
    // One symbol per line, no duplicates, mangled (what lld matches), none an address.
    let mut unique = names.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), names.len(), "duplicate symbols");
    assert!(names.iter().all(|n| !n.is_empty() && !n.contains(' ') && !n.starts_with("0x")), "{text}");
    for needle in [
        "5serin7forward6handle", // the request path
        "current_thread",        // the one-thread sidecar's scheduler
        "5serin8mesh_tls",       // mutual TLS to the upstream sidecar (pair A)
        "5serin7inbound6accept", // the inbound mTLS handshake (pair B)
        "5serin10xds_client",    // the xDS-fed sidecar
    ] {
        assert!(names.iter().any(|n| n.contains(needle)), "no {needle} in the order file");
    }
    // Tiers: what every sidecar runs comes before what only an mTLS server runs.
    let first = |needle: &str| names.iter().position(|n| n.contains(needle)).unwrap_or(usize::MAX);
    assert!(first("5serin7forward6handle") < first("5serin7inbound6accept"), "tiers out of order");
}
