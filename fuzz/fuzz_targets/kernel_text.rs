//! What the engine reads from the kernel, as a hostile or broken kernel file would hold it:
//! tracepoint format files, BTF (argument kinds walk its type graph) and kallsyms. The first
//! byte picks the reader. Nothing panics or loops for ever.
#![no_main]

use fathom_node::engine::{btf::BtfIndex, symbols::KernelSymbols, tracefs::TracepointFormat};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => {
            let text = String::from_utf8_lossy(rest);
            let f = TracepointFormat::parse(&text);
            for field in &f.fields {
                let _ = f.printed_as_address(&field.name);
                let _ = f.symbolic(&field.name);
            }
            let _ = f.printed_as_address("");
        }
        1 => {
            if let Some(idx) = BtfIndex::parse(rest) {
                for name in idx.functions().iter().take(16) {
                    let _ = idx.function_args(name);
                }
                let _ = idx.raw_tracepoint_args("sys_enter");
                let _ = idx.member_offset("task_struct", "tgid");
            }
        }
        _ => {
            let text = String::from_utf8_lossy(rest);
            let k = KernelSymbols::parse(&text);
            for addr in [0, 1, u64::MAX, 0xffff_ffff_8100_0000] {
                let _ = k.name(addr);
            }
        }
    }
});
