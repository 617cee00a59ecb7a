//! Builds the kernel programs (`node-ebpf`) for the BPF target with the nightly toolchain and
//! bpf-linker, and leaves the object in OUT_DIR for `include_bytes_aligned!`.
//! Also builds the C workload the kernel tests and benchmarks drive (`tests/workload`).
//! `scripts/setup.sh` installs what this needs.

use std::{env, path::PathBuf, process::Command};

/// The nightly toolchain that builds the kernel programs; `scripts/setup.sh` installs it.
const NIGHTLY: &str = "nightly-2026-05-19";

fn main() -> anyhow::Result<()> {
    let manifest_dir = env::var("CARGO_MANIFEST_DIR")?;
    let root_dir = format!("{manifest_dir}/../node-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "fathom-ebpf",
            root_dir: &root_dir,
            ..Default::default()
        }],
        // Pinned: the LLVM of this nightly matches bpf-linker (scripts/setup.sh, NIGHTLY).
        aya_build::Toolchain::Custom(NIGHTLY),
    )?;
    build_workload(&manifest_dir)
}

/// The tests' workload: a small C program (known syscall counts, a uprobe target, a USDT
/// note, a hot loop). Its path reaches the tests as FATHOM_WORKLOAD.
fn build_workload(manifest_dir: &str) -> anyhow::Result<()> {
    let src = format!("{manifest_dir}/tests/workload/workload.c");
    println!("cargo:rerun-if-changed={src}");
    let out = PathBuf::from(env::var("OUT_DIR")?).join("fathom-workload");
    let cc = env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .args(["-O1", "-g", "-fno-omit-frame-pointer", "-o"])
        .arg(&out)
        .arg(&src)
        .status();
    match status {
        Ok(s) if s.success() => {}
        other => anyhow::bail!(
            "building {src} with {cc} failed ({other:?}); install a C compiler (scripts/setup.sh)"
        ),
    }
    println!("cargo:rustc-env=FATHOM_WORKLOAD={}", out.display());
    Ok(())
}
