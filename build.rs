//! Generates the protobuf types from `format/mapstore.proto` with the pure-Rust
//! `protox` compiler, so building mapstore needs no system `protoc`.

fn main() {
    let proto = "format/mapstore.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = match protox::compile([proto], ["format"]) {
        Ok(set) => set,
        Err(error) => panic!("format/mapstore.proto does not compile: {error}"),
    };
    let mut config = prost_build::Config::new();
    // Keys and values decode as `bytes::Bytes`: slices of the record buffer, no copy.
    config.bytes(["."]);
    if let Err(error) = config.compile_fds(descriptors) {
        panic!("generating Rust types from format/mapstore.proto failed: {error}");
    }
}
