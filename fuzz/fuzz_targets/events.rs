//! Events both ways: the collector's columnar batches as a runner sends them (checked, then
//! read, appended and cut), and the kernel's ring-buffer records as the node renders them
//! (for an event job with a payload and one with tracepoint fields).
#![no_main]

use std::sync::OnceLock;

use fathom_common::Event;
use fathom_crds::TraceJobSpec;
use fathom_node::engine::{
    kernel::Kernel,
    plan::{self, JobPlan, Scope},
    render::{Cgroups, Renderer, StackFrames},
    symbols::Symbols,
};
use fathom_proto::v1;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fn plans() -> &'static Vec<JobPlan> {
    static PLANS: OnceLock<Vec<JobPlan>> = OnceLock::new();
    PLANS.get_or_init(|| {
        let kernel = Kernel::running();
        [
            "probe: { catalog: exec }\nevents: { last: 10, payload: true }",
            "probe: { catalog: tcp-connect }\nevents: { last: 10 }",
            "probe: { catalog: open }\nevents: { last: 10, payload: true, maxPayloadBytes: 7 }",
        ]
        .iter()
        .map(|yaml| {
            let spec: TraceJobSpec = serde_yaml::from_str(yaml).expect("spec");
            plan::plan(&spec.validate().expect("valid"), &kernel, Scope::Node).expect("plans")
        })
        .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    // The collector's side.
    if let Ok(batch) = v1::EventBatch::decode(data)
        && batch.check().is_ok()
    {
        let n = batch.len();
        let _: Vec<_> = batch.records().collect();
        let mut twice = batch.clone();
        twice.append(&batch);
        assert!(
            twice.check().is_ok(),
            "appending a checked batch keeps it valid"
        );
        twice.drop_front(n / 2 + 1);
        assert!(twice.check().is_ok(), "dropping events keeps a batch valid");
    }
    // The node's side: the record's bytes as the kernel would write them.
    let size = std::mem::size_of::<Event>();
    let mut bytes = vec![0u8; size];
    let len = data.len().min(size);
    bytes[..len].copy_from_slice(&data[..len]);
    // SAFETY: Event is plain #[repr(C)] data of integers and byte arrays; any bytes are one.
    let event: Event = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Event>()) };
    let (mut symbols, mut cgroups, stacks) =
        (Symbols::new(), Cgroups::default(), StackFrames::new());
    for plan in plans() {
        let mut r = Renderer {
            plan,
            node: "node-0",
            stacks: &stacks,
            symbols: &mut symbols,
            cgroups: &mut cgroups,
        };
        let record = r.event(&event);
        assert!(!record.fields.is_empty(), "an event shows its fields");
    }
});
