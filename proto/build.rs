//! Compiles the kubelet protos with `protox` (pure Rust, no system `protoc`) and generates
//! prost messages plus tonic clients and servers for every service.
//!
//! Each proto is generated into its own `OUT_DIR` subdirectory, because prost names its output
//! file after the proto package and two protos with the same package would overwrite each other.

use std::error::Error;
use std::path::{Path, PathBuf};

/// (subdirectory of OUT_DIR, proto file relative to `proto/`, required proto package).
///
/// The package is part of every gRPC path the kubelet calls, and `src/lib.rs` includes the
/// generated file by package name, so it is checked here.
const PROTOS: &[(&str, &str, &str)] = &[
    ("deviceplugin", "deviceplugin/v1beta1/api.proto", "v1beta1"),
    ("podresources", "podresources/v1/api.proto", "v1"),
];

fn main() -> Result<(), Box<dyn Error>> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let include_dir = manifest_dir.join("proto");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    for (subdir, proto, package) in PROTOS {
        compile(&include_dir, proto, package, &out_dir.join(subdir))?;
    }
    Ok(())
}

fn compile(
    include_dir: &Path,
    proto: &str,
    package: &str,
    out_dir: &Path,
) -> Result<(), Box<dyn Error>> {
    println!(
        "cargo:rerun-if-changed={}",
        include_dir.join(proto).display()
    );
    let fds = protox::compile([proto], [include_dir])
        .map_err(|e| format!("compiling {proto} with protox failed: {e:?}"))?;
    for file in &fds.file {
        if file.package() != package {
            return Err(format!(
                "{} declares package {:?}, but the kubelet API requires package {package:?}",
                file.name(),
                file.package()
            )
            .into());
        }
    }
    // Start from an empty directory so that a file left by an earlier build (for example
    // under an old package name) can never be included by mistake.
    if out_dir.exists() {
        std::fs::remove_dir_all(out_dir)
            .map_err(|e| format!("clearing {} failed: {e}", out_dir.display()))?;
    }
    std::fs::create_dir_all(out_dir)
        .map_err(|e| format!("creating {} failed: {e}", out_dir.display()))?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .out_dir(out_dir)
        .compile_fds(fds)
        .map_err(|e| format!("generating Rust code for {proto} failed: {e}"))?;
    Ok(())
}
