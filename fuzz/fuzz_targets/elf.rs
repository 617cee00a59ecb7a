//! A binary as a container may hold it, read for uprobes and USDT: symbols, notes and
//! offsets of arbitrary bytes. Every read is bounded; nothing panics.
#![no_main]

use std::{path::PathBuf, sync::OnceLock};

use fathom_node::engine::elf;
use libfuzzer_sys::fuzz_target;

fn path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = std::env::temp_dir();
        dir.join(format!("fathom-fuzz-elf-{}", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    let p = path();
    std::fs::write(p, data).expect("a scratch file in the temporary directory");
    let _ = elf::resolve_binary(p);
    let _ = elf::function_symbols(p);
    let _ = elf::symbol_exists(p, "main");
    if let Ok(probes) = elf::usdt_probes(p) {
        for probe in probes.iter().take(4) {
            let _ = elf::usdt_offset(p, &probe.provider, &probe.name);
        }
    }
    let _ = elf::usdt_offset(p, "fathom", "tick");
});
