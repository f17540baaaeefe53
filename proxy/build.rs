//! Release builds of the `serin` binary lay out the functions a running sidecar
//! executes first and side by side in `.text` (`serin.order`, written by
//! `benches/orderfile.py`), so that a sidecar's resident code is a few MiB of
//! contiguous pages instead of pages spread over the whole multi-role binary.
//!
//! Only with lld (the default linker of `x86_64-unknown-linux-gnu` since Rust 1.90):
//! GNU ld has no `--symbol-ordering-file`. `SERIN_NO_ORDER_FILE=1` turns it off.

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=serin.order");
    println!("cargo:rerun-if-env-changed=SERIN_NO_ORDER_FILE");
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    let release = var("PROFILE") == "release";
    let lld_by_default = var("CARGO_CFG_TARGET_ARCH") == "x86_64"
        && var("CARGO_CFG_TARGET_OS") == "linux"
        && var("CARGO_CFG_TARGET_ENV") == "gnu";
    let order = Path::new(&var("CARGO_MANIFEST_DIR")).join("serin.order");
    if release && lld_by_default && var("SERIN_NO_ORDER_FILE").is_empty() && order.is_file() {
        println!("cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}", order.display());
        // Functions renamed or gone since the file was written are expected.
        println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    }
}
