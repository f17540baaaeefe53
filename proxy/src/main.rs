//! The `serin` binary: one executable for every role (sidecar, gateway, control
//! plane, ctl, demo, …), chosen by subcommand.

fn main() -> std::process::ExitCode {
    serin::cli::main()
}
