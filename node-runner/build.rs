//! Builds the kernel programs (`node-ebpf`) for the BPF target with the nightly toolchain and
//! bpf-linker, and leaves the object in OUT_DIR for `include_bytes_aligned!`.
//! `scripts/setup.sh` installs what this needs.

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let root_dir = format!("{manifest_dir}/../node-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "fathom-ebpf",
            root_dir: &root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
