//! Kernel-function probes — kprobe, kretprobe, fentry, fexit, an observe-only LSM program and
//! the kprobe-based catalog entry — against a workload of known shape, on every kernel of the
//! matrix (`scripts/kernel-matrix.sh`, docs/kernel-matrix.md).
//!
//! What the kernel under test offers is declared, not derived: the matrix sets
//! `FATHOM_KERNEL_EXPECT` per kernel (`full`, or e.g. `kprobes=absent,fentry=refused,lsm=refused`).
//! Where an attach kind is available, the feasibility check must say so and the probe must
//! count exactly; where it is not, the feasibility check must refuse with the precise reason
//! and message, before anything is loaded. Needs root and scripts/setup.sh.

mod common;

use common::*;
use fathom_crds::{
    result::ResultData,
    verdict::{ProbeVerdict, Reason},
};
use fathom_node::{
    EngineError,
    engine::{kernel::Kernel, plan},
};

/// Opens of an existing file and of a missing one, per workload run.
const OPENS_OK: u64 = 700;
const OPENS_MISSING: u64 = 300;
/// The kernel function behind openat(2): called once per open, successful or not.
const OPEN_FN: &str = "do_sys_openat2";

/// The verdict the feasibility check must give for `probe` when `kind` is not available.
fn expected_refusal(kind: Kind, offer: Offer, probe: &str) -> ProbeVerdict {
    let message = match (kind, offer) {
        (Kind::Kprobes, Offer::Absent) => {
            "kprobes are not built into this kernel (CONFIG_KPROBES); use a tracepoint or a raw tracepoint".to_string()
        }
        (Kind::Fentry, Offer::Refused) => {
            "this kernel refuses BPF trampolines (fentry/fexit programs fail to load: Operation not permitted (os error 1)) although this process has the privileges; use a kprobe, a tracepoint or a raw tracepoint".to_string()
        }
        (Kind::Lsm, Offer::Refused) => {
            "this kernel refuses BPF trampolines (LSM programs fail to load: Operation not permitted (os error 1)) although this process has the privileges; use a kprobe, a tracepoint or a raw tracepoint".to_string()
        }
        (Kind::Lsm, Offer::Disabled) => {
            let active = std::fs::read_to_string("/sys/kernel/security/lsm")
                .expect("the active LSMs (securityfs)");
            format!(
                "BPF LSM is not enabled (active LSMs: {}); add bpf to the lsm= kernel command line",
                active.trim()
            )
        }
        (k, o) => panic!("FATHOM_KERNEL_EXPECT: {}={o:?} is not a state of that kind", k.key()),
    };
    ProbeVerdict {
        probe: probe.to_string(),
        feasible: false,
        reason: Some(Reason::AttachKindUnsupported),
        message,
    }
}

/// Where `kind` is available: the feasibility check accepts every attach point of the job
/// (`probes`, in attach order) and the job starts. Elsewhere: the check refuses each of them
/// with the precise reason and message, nothing is loaded, and None is returned.
fn start_or_refused(
    kind: Kind,
    yaml: &str,
    probes: &[&str],
) -> Option<fathom_node::engine::session::Session> {
    let offer = offered(kind);
    let planned = plan::plan(&spec(yaml), &Kernel::running(), plan::Scope::Node);
    if offer == Offer::Available {
        let plan = match planned {
            Ok(p) => p,
            Err(e) => panic!("{} is declared available, but: {e}", kind.key()),
        };
        assert!(plan.verdict.feasible, "{:?}", plan.verdict);
        let verdicts: Vec<(&str, bool)> = plan
            .verdict
            .probes
            .iter()
            .map(|p| (p.probe.as_str(), p.feasible))
            .collect();
        let want: Vec<(&str, bool)> = probes.iter().map(|p| (*p, true)).collect();
        assert_eq!(verdicts, want, "every attach point checked and feasible");
        assert_eq!(plan.probe_labels(), probes);
        return Some(start(yaml));
    }
    let verdict = match planned {
        Err(EngineError::NotFeasible(v)) => v,
        Ok(_) => panic!(
            "{} is declared {offer:?}, but the feasibility check accepted {yaml}",
            kind.key()
        ),
        Err(e) => panic!("expected a feasibility verdict, got: {e}"),
    };
    assert!(!verdict.feasible);
    let want: Vec<ProbeVerdict> = probes
        .iter()
        .map(|p| expected_refusal(kind, offer, p))
        .collect();
    assert_eq!(verdict.probes, want);
    // The refusal comes before anything is loaded; `fathom run` reports the same verdict.
    assert!(matches!(start_err(yaml), EngineError::NotFeasible(v) if v.probes == want));
    assert_eq!(residue(), Residue::default());
    None
}

/// Runs the open workload: OPENS_OK opens of /etc/hostname, OPENS_MISSING of a missing file.
fn open_workload(comm: &str) {
    workload(comm, "open", OPENS_OK, Some("/etc/hostname"));
    workload(comm, "open", OPENS_MISSING, Some("/nonexistent/fathom"));
}

/// Rows keyed by `ret`: (successful opens, their distinct fds, ENOENT failures).
fn opens_by_result(r: &ResultData) -> (u64, usize, u64) {
    let mut ok = 0;
    let mut fds = 0;
    let mut enoent = 0;
    for row in &r.rows {
        let ret: i64 = row.keys["ret"].parse().expect("ret is a number");
        match ret {
            0.. => {
                ok += row.value;
                fds += 1;
            }
            -2 => enoent += row.value,
            other => panic!("unexpected return {other}: {:?}", r.rows),
        }
    }
    (ok, fds, enoent)
}

fn assert_latency_histogram(r: &ResultData, calls: u64) {
    assert_eq!(r.histograms.len(), 1, "{:?}", r.histograms);
    let h = &r.histograms[0];
    assert_eq!(h.count, calls, "one latency per call: {h:?}");
    let in_buckets: u64 = h.buckets.iter().map(|b| b.count).sum();
    assert_eq!(in_buckets, calls, "{h:?}");
    assert!(
        h.buckets.iter().all(|b| b.low < 1_000_000_000),
        "an open takes less than a second: {h:?}"
    );
    assert!(
        h.buckets.iter().any(|b| b.low >= 64),
        "an open takes more than 64 ns: {h:?}"
    );
    assert_eq!(r.totals.unpaired, 0, "every return found its entry");
}

#[test]
fn kprobe_counts_every_call_of_a_kernel_function() {
    let _k = KernelTest::begin();
    let c = comm("kp");
    let Some(s) = start_or_refused(
        Kind::Kprobes,
        &format!(
            "probe: {{ kprobe: {OPEN_FN} }}\naggregate: {{ by: [comm] }}\nfilter: {{ comm: {c} }}"
        ),
        &[&format!("kprobe:{OPEN_FN}")],
    ) else {
        return;
    };
    open_workload(&c);
    let r = s.stop().expect("stops");
    assert_eq!(r.rows.len(), 1, "{:?}", r.rows);
    assert_eq!(row_value(&r, "comm", &c), OPENS_OK + OPENS_MISSING);
    assert_eq!(r.totals.hits, OPENS_OK + OPENS_MISSING);
}

#[test]
fn kretprobe_keys_by_return_value() {
    let _k = KernelTest::begin();
    let c = comm("kr");
    let Some(s) = start_or_refused(
        Kind::Kprobes,
        &format!(
            "probe: {{ kretprobe: {OPEN_FN} }}\naggregate: {{ by: [ret] }}\nfilter: {{ comm: {c} }}"
        ),
        &[&format!("kretprobe:{OPEN_FN}")],
    ) else {
        return;
    };
    open_workload(&c);
    let r = s.stop().expect("stops");
    let (ok, fds, enoent) = opens_by_result(&r);
    assert_eq!(ok, OPENS_OK, "{:?}", r.rows);
    assert_eq!(fds, 1, "each open reuses the fd the previous close freed");
    assert_eq!(enoent, OPENS_MISSING, "-ENOENT");
}

#[test]
fn kretprobe_latency_histogram_pairs_entry_and_return() {
    let _k = KernelTest::begin();
    let c = comm("krl");
    let Some(s) = start_or_refused(
        Kind::Kprobes,
        &format!(
            "probe: {{ kretprobe: {OPEN_FN} }}\naggregate: {{ value: latency }}\nfilter: {{ comm: {c} }}"
        ),
        &[
            &format!("kprobe:{OPEN_FN}"),
            &format!("kretprobe:{OPEN_FN}"),
        ],
    ) else {
        return;
    };
    open_workload(&c);
    let r = s.stop().expect("stops");
    assert_latency_histogram(&r, OPENS_OK + OPENS_MISSING);
}

#[test]
fn fentry_counts_every_call_of_a_kernel_function() {
    let _k = KernelTest::begin();
    let c = comm("fe");
    let Some(s) = start_or_refused(
        Kind::Fentry,
        &format!(
            "probe: {{ fentry: {OPEN_FN} }}\naggregate: {{ by: [comm] }}\nfilter: {{ comm: {c} }}"
        ),
        &[&format!("fentry:{OPEN_FN}")],
    ) else {
        return;
    };
    open_workload(&c);
    let r = s.stop().expect("stops");
    assert_eq!(r.rows.len(), 1, "{:?}", r.rows);
    assert_eq!(row_value(&r, "comm", &c), OPENS_OK + OPENS_MISSING);
}

#[test]
fn fexit_keys_by_return_value() {
    let _k = KernelTest::begin();
    let c = comm("fx");
    let Some(s) = start_or_refused(
        Kind::Fentry,
        &format!(
            "probe: {{ fexit: {OPEN_FN} }}\naggregate: {{ by: [ret] }}\nfilter: {{ comm: {c} }}"
        ),
        &[&format!("fexit:{OPEN_FN}")],
    ) else {
        return;
    };
    open_workload(&c);
    let r = s.stop().expect("stops");
    let (ok, fds, enoent) = opens_by_result(&r);
    assert_eq!(ok, OPENS_OK, "{:?}", r.rows);
    assert_eq!(fds, 1, "each open reuses the fd the previous close freed");
    assert_eq!(enoent, OPENS_MISSING, "-ENOENT");
}

#[test]
fn fexit_latency_histogram_pairs_entry_and_return() {
    let _k = KernelTest::begin();
    let c = comm("fxl");
    let Some(s) = start_or_refused(
        Kind::Fentry,
        &format!(
            "probe: {{ fexit: {OPEN_FN} }}\naggregate: {{ value: latency }}\nfilter: {{ comm: {c} }}"
        ),
        &[&format!("fentry:{OPEN_FN}"), &format!("fexit:{OPEN_FN}")],
    ) else {
        return;
    };
    open_workload(&c);
    let r = s.stop().expect("stops");
    assert_latency_histogram(&r, OPENS_OK + OPENS_MISSING);
}

#[test]
fn lsm_observes_file_open_and_denies_nothing() {
    let _k = KernelTest::begin();
    let c = comm("lsm");
    let Some(s) = start_or_refused(
        Kind::Lsm,
        &format!(
            "probe: {{ lsm: file_open }}\naggregate: {{ by: [comm] }}\nfilter: {{ comm: {c} }}"
        ),
        &["lsm:file_open"],
    ) else {
        return;
    };
    open_workload(&c);
    // Observe only: with the program attached, opens still succeed.
    let hostname = std::fs::read_to_string("/etc/hostname").expect("opens still work");
    assert!(!hostname.is_empty());
    let r = s.stop().expect("stops");
    // The hook runs once per file actually opened: lookups that fail never reach it.
    assert_eq!(r.rows.len(), 1, "{:?}", r.rows);
    assert_eq!(row_value(&r, "comm", &c), OPENS_OK);
}

/// The observe-only LSM program changes no decision, also on a hook whose default is not 0.
/// `task_prctl`'s default is -ENOSYS ("no module handles this option"): had the program's 0
/// replaced it, every prctl(2) would count as handled, PR_GET_DUMPABLE would answer 0 and
/// PR_SET_NAME would rename nothing while the job runs. It does not: BPF LSM programs attach
/// as modify-return trampolines, where 0 means "no decision, run the hook's default", and the
/// first non-zero verdict ends the chain (docs/tenancy.md).
#[test]
fn lsm_keeps_the_hooks_own_verdict_where_the_default_is_not_zero() {
    let _k = KernelTest::begin();
    let Some(s) = start_or_refused(
        Kind::Lsm,
        "probe: { lsm: task_prctl }\naggregate: { by: [comm] }",
        &["lsm:task_prctl"],
    ) else {
        return;
    };
    let c = comm("prc");
    // The workload renames itself (PR_SET_NAME), then asks twice for its dumpable flag and
    // its name: 1 + 2 x 2 prctl calls under its new name (or its old one, had the rename
    // been swallowed).
    let answers = workload(&c, "prctl", 2, None);
    let r = s.stop().expect("stops");
    let answers: Vec<&str> = answers
        .lines()
        .filter(|l| l.starts_with("dumpable="))
        .collect();
    assert_eq!(
        answers,
        vec![format!("dumpable=1 name={c}"); 2],
        "prctl answers as it does without the program"
    );
    assert_eq!(row_value(&r, "comm", &c), 4, "{:?}", r.rows);
}

#[test]
fn tcp_connect_kprobe_catalog_entry_counts_connects_by_result() {
    let _k = KernelTest::begin();
    let c = comm("tck");
    let Some(s) = start_or_refused(
        Kind::Kprobes,
        &format!("probe: {{ catalog: tcp-connect-kprobe }}\nfilter: {{ comm: {c} }}"),
        &["kretprobe:tcp_v4_connect"],
    ) else {
        return;
    };
    workload(&c, "connect", 9, None);
    let r = s.stop().expect("stops");
    assert_eq!(r.probe, "catalog:tcp-connect-kprobe");
    assert_eq!(r.keys, vec!["comm", "ret"]);
    assert_eq!(r.rows.len(), 1, "{:?}", r.rows);
    assert_eq!(r.rows[0].keys["comm"], c);
    assert_eq!(r.rows[0].keys["ret"], "0", "the SYN was sent");
    assert_eq!(r.rows[0].value, 9);
}
