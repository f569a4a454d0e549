//! Compiles the gRPC protocol into OUT_DIR. protox parses the .proto files in Rust, so no
//! protoc binary is needed on the build machine.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/fptserve/v1/classifier.proto",
        "proto/fptserve/v1/admin.proto",
        "proto/inference/grpc_service.proto",
    ];
    for proto in &protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    // Kept for server reflection, so grpcurl works without the .proto files.
    std::fs::write(
        out_dir.join("fptserve_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        // a malformed request is INVALID_ARGUMENT, not INTERNAL (src/grpc/codec.rs)
        .codec_path("crate::grpc::codec::Codec")
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}
