//! What the benches' smoke tests share: finding the `serin` binary, running a
//! script with a bound on its time.

#![allow(dead_code)] // each test file uses a part of these helpers

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The serin binary. It is another package's, so `CARGO_BIN_EXE_serin` is not
/// available here: `$SERIN_BIN` when set, else the `serin` in this profile's folder
/// (next to `serin-load`: `target/debug/serin`, which `cargo test --workspace`
/// builds for the proxy's tests), built with cargo when it is not there.
pub fn serin_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("SERIN_BIN") {
        return PathBuf::from(path);
    }
    let load = PathBuf::from(env!("CARGO_BIN_EXE_serin-load"));
    let serin = load.parent().expect("the profile folder").join("serin");
    if !serin.is_file() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "serin", "--bin", "serin"])
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .status()
            .expect("run cargo build -p serin");
        assert!(status.success(), "cargo build -p serin failed");
    }
    assert!(serin.is_file(), "{} was not built", serin.display());
    serin
}

/// Runs `cmd` to completion; past `timeout` it gets SIGTERM (the script then stops
/// every process it started), and SIGKILL 30 s later.
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> Output {
    let what = format!("{cmd:?}");
    let child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let pid = child.id();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = {
        let done = done.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                if start.elapsed() > timeout {
                    eprintln!("{what} ran past {timeout:?}: SIGTERM");
                    drop(Command::new("kill").args(["-TERM", &pid.to_string()]).status());
                    let grace = Instant::now();
                    while !done.load(std::sync::atomic::Ordering::SeqCst) {
                        if grace.elapsed() > Duration::from_secs(30) {
                            drop(Command::new("kill").args(["-KILL", &pid.to_string()]).status());
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let out = child.wait_with_output().expect("wait for the script");
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    drop(watchdog.join());
    out
}
