//! Generates the gRPC client and server code from `proto/`. protoc comes from the
//! protoc-bin-vendored crate, so a fresh machine needs no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY: build scripts are single-threaded; nothing else reads the environment now.
        unsafe { std::env::set_var("PROTOC", protoc) };
    }
    println!("cargo:rerun-if-changed=proto");
    // The encoded descriptors let the coordinator answer gRPC reflection (grpcurl, grpcui).
    let descriptors =
        std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("fleetmark_descriptor.bin");
    tonic_prost_build::configure()
        // Undecodable bytes are the caller's fault: INVALID_ARGUMENT, not prost's INTERNAL.
        .codec_path("crate::codec::FleetmarkCodec")
        .file_descriptor_set_path(descriptors)
        .compile_protos(&["proto/fleetmark/v1/fleetmark.proto"], &["proto"])?;
    Ok(())
}
