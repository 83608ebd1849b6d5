//! Compiles `proto/csi.proto` into the gRPC server and client code used by `src/csi`.
//!
//! Uses the `protoc` from the `PROTOC` environment variable when set, otherwise the one vendored
//! by `protoc-bin-vendored`, so a fresh machine needs no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/csi.proto");
    println!("cargo:rerun-if-env-changed=PROTOC");
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
        unsafe { std::env::set_var("PROTOC", protoc) };
    }
    let well_known = protoc_bin_vendored::include_path()?;
    let well_known = well_known.to_str().ok_or("the protoc include path is not UTF-8")?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&["proto/csi.proto"], &["proto", well_known])?;
    Ok(())
}
