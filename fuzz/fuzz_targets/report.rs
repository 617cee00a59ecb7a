//! A report as a forged or broken runner may send it: protobuf decoding, then the collector's
//! checks and merge with the identity of a real assignment, so that the bytes reach past the
//! identity checks. Nothing panics; a report is accepted or rejected with a reason.
#![no_main]

use fathom_crds::assignment::JobRef;
use fathom_operator::collector::{Collector, ExpectedAssignment, JobInfo};
use fathom_proto::v1;
use libfuzzer_sys::fuzz_target;
use prost::Message;

const JOB: &str = "job-uid";

fn job() -> JobInfo {
    JobInfo {
        job: JobRef {
            kind: "TraceJob".into(),
            name: "drops".into(),
            namespace: Some("shop".into()),
            uid: JOB.into(),
        },
        result_namespace: "shop".into(),
        result_name: "drops".into(),
        run: 1,
        probe: "skb/kfree_skb".into(),
        value: "count".into(),
        keys: vec!["comm".into()],
        top: 3,
        events_last: 5,
        assignments: vec![ExpectedAssignment {
            name: "drops-node-0".into(),
            uid: "a-uid-0".into(),
            node: "node-0".into(),
            run: 1,
        }],
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(mut report) = v1::NodeReport::decode(data) else {
        return;
    };
    let collector = Collector::new();
    collector.set_job(job());
    // As it came, then with a real assignment's identity (the bytes' rows, events, counters).
    let _ = collector.accept("node-0", &report);
    report.job_uid = JOB.into();
    report.job_kind = v1::JobKind::TraceJob as i32;
    report.job_namespace = "shop".into();
    report.job_name = "drops".into();
    report.assignment_name = "drops-node-0".into();
    report.assignment_uid = "a-uid-0".into();
    report.node = "node-0".into();
    report.run = 1;
    let _ = collector.accept("node-0", &report);
    report.seq = report.seq.wrapping_add(1);
    let _ = collector.accept("node-0", &report);
    let _ = collector.merged(JOB);
    let _ = collector.subscribe(JOB);
});
