//! What the benches' smoke tests share: finding the `serin` binary.

use std::path::PathBuf;
use std::process::Command;

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
