//! Compiles proto/*.proto into Rust (prost messages, tonic clients and
//! servers) at build time. `protox` parses the files in-process, so a fresh
//! machine needs no system `protoc`; the generated code lands in OUT_DIR and
//! `src/csi/mod.rs` includes it as `minilet::csi::proto`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/csi.proto", "proto/pluginregistration.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    // google/protobuf/wrappers.proto (ProbeResponse.ready) comes built into
    // protox; prost maps BoolValue to Option<bool>.
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
