//! `serin --help` and friends, run as a process.

use std::process::Command;

fn serin(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_serin")).args(args).env("NO_COLOR", "1").output().expect("run serin");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_lists_the_subcommands() {
    let (code, out, _) = serin(&["--help"]);
    assert_eq!(code, Some(0));
    for sub in ["sidecar", "validate", "upstream", "demo"] {
        assert!(out.lines().any(|l| l.trim_start().starts_with(sub)), "{sub} missing:\n{out}");
    }
    let (code, out, _) = serin(&["--version"]);
    assert_eq!(code, Some(0));
    assert!(out.starts_with("serin "), "{out}");
}

#[test]
fn sidecar_help_has_a_flag_for_every_listener() {
    let (code, out, _) = serin(&["sidecar", "--help"]);
    assert_eq!(code, Some(0));
    for flag in [
        "--outbound",
        "--inbound",
        "--app <APP>",
        "--admin",
        "--metrics",
        "--health",
        "--config",
        "--no-access-log",
        "--drain-timeout",
    ] {
        assert!(out.contains(flag), "{flag} missing:\n{out}");
    }
    // Istio's ports are the defaults.
    for port in ["15001", "15006", "15000", "15090", "15021"] {
        assert!(out.contains(port), "{port} missing:\n{out}");
    }
    let (code, out, _) = serin(&["upstream", "--help"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("--listen"), "{out}");
}

#[test]
fn usage_errors_exit_2() {
    let (code, _, err) = serin(&["no-such-command"]);
    assert_eq!(code, Some(2), "{err}");
    let (code, _, err) = serin(&["sidecar", "--outbound", "not-an-address"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--outbound"), "{err}");
    let (code, _, err) = serin(&["validate"]);
    assert_eq!(code, Some(2), "{err}");
}
