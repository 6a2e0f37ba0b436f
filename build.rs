//! Compiles the `tokenvault.v1` protos with protox (pure Rust, no system `protoc`) and
//! generates the tonic clients and servers. The encoded descriptor set is also written to
//! `$OUT_DIR/tokenvault_descriptor.bin` for gRPC server reflection.

use std::error::Error;
use std::path::{Path, PathBuf};
use std::{env, fs};

/// Where the API contract lives, relative to the crate root.
const PROTO_ROOT: &str = "proto";
/// The directory of the v1 package's `.proto` files.
const PROTO_DIR: &str = "proto/tokenvault/v1";

/// Messages that carry a token, an OAuth state or an OAuth code. prost derives no `Debug`
/// for them (nor for their oneofs); `src/proto.rs` implements a redacted one by hand, and
/// a new secret-bearing message must be added here.
const REDACTED_DEBUG: &[&str] = &[
    ".tokenvault.v1.BeginAuthorizationResponse",
    ".tokenvault.v1.CompleteAuthorizationRequest",
    ".tokenvault.v1.LeaseTokenResponse",
];

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed={PROTO_ROOT}");
    println!("cargo:rerun-if-changed=migrations");

    let protos = proto_files(Path::new(PROTO_DIR))?;

    // Source info keeps the proto comments: they become doc comments on the generated
    // code and are served by reflection. Imports (google/protobuf/timestamp.proto, which
    // protox ships) are included so reflection clients can resolve every type.
    let mut compiler = protox::Compiler::new([PROTO_ROOT])?;
    compiler.include_source_info(true).include_imports(true);
    compiler.open_files(&protos)?;

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("tokenvault_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .skip_debug(REDACTED_DEBUG)
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}

/// Every `.proto` file directly in `dir`, sorted so that the output is reproducible.
fn proto_files(dir: &Path) -> Result<Vec<PathBuf>, Box<dyn Error>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "proto") {
            files.push(path);
        }
    }
    if files.is_empty() {
        return Err(format!("no .proto files in {}", dir.display()).into());
    }
    files.sort();
    Ok(files)
}
