//! Release builds of the `serin` binary lay out the functions a running sidecar
//! executes first and side by side in `.text` (`serin.order`, written by
//! `benches/orderfile.py`), so that a sidecar's resident code is a few MiB of
//! contiguous pages instead of pages spread over the whole multi-role binary.
//!
//! Only with lld (the default linker of `x86_64-unknown-linux-gnu` since Rust 1.90,
//! unless the build names another linker): GNU ld has no `--symbol-ordering-file`.
//! `SERIN_NO_ORDER_FILE=1` turns it off.
//!
//! Release builds against glibc 2.36 or later also pack the relative relocations
//! (`-z pack-relative-relocs`, DT_RELR): the position-independent binary's 0.5 MiB
//! `.rela.dyn`, read by the loader at every start and then left resident, shrinks to
//! a few KiB. The binary then needs glibc ≥ 2.36 at run time, as it already needs
//! the build machine's glibc.

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=serin.order");
    println!("cargo:rerun-if-env-changed=SERIN_NO_ORDER_FILE");
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER");
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    let release = var("PROFILE") == "release";
    let flags = var("CARGO_ENCODED_RUSTFLAGS");
    let lld_by_default = var("CARGO_CFG_TARGET_ARCH") == "x86_64"
        && var("CARGO_CFG_TARGET_OS") == "linux"
        && var("CARGO_CFG_TARGET_ENV") == "gnu"
        && release
        && rustc_minor().is_some_and(|minor| minor >= 90)
        && !["linker", "fuse-ld"].iter().any(|f| flags.contains(f))
        && var("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER").is_empty();
    let order = Path::new(&var("CARGO_MANIFEST_DIR")).join("serin.order");
    if release && lld_by_default && var("SERIN_NO_ORDER_FILE").is_empty() && order.is_file() {
        println!("cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}", order.display());
        // Functions renamed or gone since the file was written are expected.
        println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    }
    if release && lld_by_default && glibc_at_least(2, 36) {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}

/// The minor version of the `rustc` cargo builds with (`rustc 1.95.0 (...)` → 95).
fn rustc_minor() -> Option<u32> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(rustc).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().nth(1)?.split('.').nth(1)?.parse().ok()
}

/// Whether the build machine's glibc (`getconf GNU_LIBC_VERSION`: "glibc 2.36") is
/// at least `major.minor`; false when it cannot tell.
fn glibc_at_least(major: u32, minor: u32) -> bool {
    let Ok(out) = Command::new("getconf").arg("GNU_LIBC_VERSION").output() else { return false };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut parts = text.trim().trim_start_matches("glibc ").split('.').map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(ma), Some(mi)) => (ma, mi) >= (major, minor),
        _ => false,
    }
}
