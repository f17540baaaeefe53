//! Compiles `proto/serin/control/v1/*.proto` with protox (a pure-Rust protobuf
//! compiler, so no system `protoc` is needed) and generates the prost messages
//! and tonic services with tonic-prost-build.

use std::path::Path;

const PROTOS: [&str; 5] = [
    "serin/control/v1/discovery.proto",
    "serin/control/v1/management.proto",
    "serin/control/v1/ca.proto",
    "serin/control/v1/load.proto",
    "serin/control/v1/canary.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new("proto");
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={}", root.join(proto).display());
    }
    let descriptors = protox::compile(PROTOS, [root])?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(descriptors)?;
    Ok(())
}
