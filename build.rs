//! Generates the wire protocol's Rust types from `src/proto/switchboard.proto`.
//! The vendored `protoc` keeps a fresh machine free of a system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=src/proto/switchboard.proto");
    prost_build::Config::new()
        // Payload fields decode as `Bytes` slices of the read buffer: no copy.
        .bytes(["."])
        .compile_protos(&["src/proto/switchboard.proto"], &["src/proto"])?;
    Ok(())
}
