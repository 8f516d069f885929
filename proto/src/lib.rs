//! Code generated from `proto/fleetmark/v1/fleetmark.proto`, Fleetmark's gRPC API. The `.proto`
//! file documents every call; this crate only exposes what `tonic` generates from it. Crates map
//! these wire types to `fleetmark-core`'s domain types at their edges.

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("fleetmark.v1");
}

pub use v1::*;

/// The encoded `FileDescriptorSet` of the API, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("fleetmark_descriptor");

pub mod client;
pub mod codec;
pub mod convert;
pub mod error_code;
pub mod secure;
