//! The `serin` binary: one executable for every role (sidecar, gateway, control
//! plane, ctl, demo, …), chosen by subcommand.

/// mimalloc instead of glibc's malloc: a proxied request allocates a few dozen
/// times (hyper, h2, rustls buffers), and mimalloc's thread-local free lists take
/// fewer instructions per allocation (`benches/RESULTS.md`, issue 6).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    serin::cli::main()
}
