//! `benches/netns_mesh.py` stays runnable: a `--quick` run (1 s per measured run)
//! of the captured-mesh benchmark in network namespaces, against this profile's
//! `serin` and `serin-load`. It asserts that the script finished, printed its
//! table and that its own path checks passed (the captured runs went over mTLS
//! through both sidecars, the direct runs bypassed them) with no failed request;
//! timings never are.
//!
//! Needs root, iproute2, iptables, `setpriv` and python3; fails saying what is
//! missing unless `SERIN_SKIP_NETNS=1` is set on purpose.
//!
//! The serin binary is another package's: `$SERIN_BIN` when set, else the `serin`
//! next to `serin-load` in this profile's folder (`target/debug/serin`, which
//! `cargo test --workspace` builds for the proxy's tests), built with cargo when
//! missing.

#[allow(dead_code)]
#[path = "../../tests/src/netns.rs"]
mod netns;

mod support;

use std::process::Command;
use std::time::Duration;
use support::serin_bin;

const TOOLS: [&str; 3] = ["iptables-restore", "iptables-save", "python3"];

#[test]
fn netns_mesh_bench_quick_run() {
    if !netns::require("netns_mesh_bench_quick_run", &TOOLS) {
        return;
    }
    let mut cmd = Command::new("python3");
    cmd.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/netns_mesh.py"))
        .args(["--quick", "--no-build", "--fail-on-errors", "--deadline", "150", "--serin"])
        .arg(serin_bin())
        .args(["--serin-load", env!("CARGO_BIN_EXE_serin-load")]);
    let out = netns::run_bounded(&mut cmd, Duration::from_secs(180)).expect("run benches/netns_mesh.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "netns_mesh.py --quick failed ({}):\n{stdout}\n{stderr}", out.status);
    for row in [
        "| captured mesh (mTLS) | 200 rps |",
        "| captured mesh (mTLS) | max rate |",
        "| rules removed (direct) | 200 rps |",
        "| rules removed (direct) | max rate |",
    ] {
        assert!(stdout.contains(row), "no row {row:?} in:\n{stdout}");
    }
    assert!(
        stdout.contains("check (round 1, captured)") && stdout.contains("check (round 1, rules removed)"),
        "{stdout}"
    );
    assert!(!stdout.contains("FAILED"), "{stdout}");
}
