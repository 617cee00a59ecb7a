//! Generates the Rust code of `fathom/v1/fathom.proto` into OUT_DIR, without protoc: protox
//! compiles the file into a FileDescriptorSet, tonic-prost-build turns that into prost
//! messages and tonic client/server stubs. The descriptor set is kept too (for gRPC
//! reflection and the documentation test).

use std::path::PathBuf;

use anyhow::Context;
use prost::Message;

const PROTO: &str = "fathom/v1/fathom.proto";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed={PROTO}");
    let out = PathBuf::from(std::env::var("OUT_DIR").context("OUT_DIR is set by cargo")?);
    let fds = protox::compile([PROTO], ["."]).with_context(|| format!("compiling {PROTO}"))?;
    std::fs::write(out.join("fathom_descriptor.bin"), fds.encode_to_vec())
        .context("writing the descriptor set")?;
    tonic_prost_build::configure()
        // Maps as BTreeMap, like the results model, so conversions are moves and output is
        // ordered.
        .btree_map(".")
        // Stubs only: the operator and the runner bring their own transport (TLS, node
        // identity), so this crate needs none of tonic's.
        .build_transport(false)
        .compile_fds(fds)
        .context("generating Rust code")?;
    Ok(())
}
