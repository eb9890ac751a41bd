//! Compiles the repo's proto/csi.proto and proto/pluginregistration.proto
//! (the wire contract minilet speaks) into servers and clients for this
//! driver. The driver compiles the contract itself rather than importing
//! the agent's generated code: a test tool should share the wire with the
//! code under test, not its crate. `protox` parses in-process: no protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "../../proto/csi.proto",
        "../../proto/pluginregistration.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["../../proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
