//! A TraceJob spec as a tenant may write it (YAML or JSON): validation, the tenant rules and,
//! for probes that load nothing while planning, the plan against the running kernel. Every
//! refusal names a field; nothing panics.
#![no_main]

use std::sync::OnceLock;

use fathom_crds::{Probe, TraceJobSpec, tenancy::Reach};
use fathom_node::engine::{
    kernel::Kernel,
    plan::{self, Scope},
};
use libfuzzer_sys::fuzz_target;

fn kernel() -> &'static Kernel {
    static KERNEL: OnceLock<Kernel> = OnceLock::new();
    KERNEL.get_or_init(Kernel::running)
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let specs = [
        serde_yaml::from_str::<TraceJobSpec>(text).ok(),
        serde_json::from_str::<TraceJobSpec>(text).ok(),
    ];
    for spec in specs.into_iter().flatten() {
        for e in spec.tenant_refusals() {
            assert!(e.field.starts_with("spec."), "{e:?}");
        }
        match spec.validate() {
            Err(errors) => {
                assert!(!errors.is_empty());
                for e in errors {
                    assert!(e.field.starts_with("spec"), "{e:?}");
                    assert!(!e.message.is_empty(), "{e:?}");
                }
            }
            Ok(mut checked) => {
                // Tracepoints, raw tracepoints and the catalog's tracepoint entries plan
                // without loading anything (fentry/LSM load a trial program; uprobes read
                // binaries: the elf target covers those).
                let plans_only = match &checked.probe {
                    Probe::Tracepoint { .. } | Probe::RawTracepoint(_) => true,
                    Probe::Catalog(c) => c != "tcp-connect-kprobe",
                    _ => false,
                };
                if plans_only {
                    for reach in [Reach::Node, Reach::Namespace] {
                        checked.reach = reach;
                        let _ = plan::plan(&checked, kernel(), Scope::targets([1]));
                    }
                }
            }
        }
    }
});
