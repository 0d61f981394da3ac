//! Generates the fleet.v1 code with protox, a protobuf compiler in Rust, so that a fresh
//! machine needs no system protoc. The encoded descriptor set is kept for gRPC reflection.
//! Also generates the client of the part of etcd's API the controller's etcd store uses.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=fleet/v1/fleet.proto");
    println!("cargo:rerun-if-changed=etcd/rpc.proto");
    let fds = protox::compile(["fleet/v1/fleet.proto"], ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("fleet_v1_descriptor.bin"), fds.encode_to_vec())?;
    // Maps as BTreeMaps, should a message get one: encoded in key order, so that a request
    // encodes the same way each time (the controller fingerprints its mutating requests).
    tonic_prost_build::configure()
        .btree_map(".")
        .compile_fds(fds)?;
    let etcd = protox::compile(["etcd/rpc.proto"], ["."])?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(etcd)?;
    Ok(())
}
