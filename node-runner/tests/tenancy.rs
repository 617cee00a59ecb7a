//! The node's share of the tenant rules (issue 10), against the running kernel: argument
//! reads are bounded by the hook's real argument count for every job, and a TraceJob
//! (`Reach::Namespace`) may not key by anything that holds a kernel address. What the spec
//! alone shows (probe kinds, payloads) is refused before planning: crds' `tenancy` tests. And
//! the node's memory and CPU budgets hold across all jobs.
//! Needs root and scripts/setup.sh.

mod common;

use common::*;
use fathom_crds::{
    tenancy::{RULE_KERNEL_ADDRESS, Reach},
    verdict::Reason,
};
use fathom_node::{
    EngineError,
    engine::{
        kernel::Kernel,
        plan::{self, JobPlan, Scope},
        session::{self, Engine, EngineOptions},
    },
};

/// Plans `yaml` for `reach` (a TraceJob's plan is scoped to its pods' cgroups).
fn plan_for(yaml: &str, reach: Reach) -> Result<JobPlan, EngineError> {
    let mut s = spec(yaml);
    s.reach = reach;
    let scope = match reach {
        Reach::Node => Scope::Node,
        Reach::Namespace => Scope::targets([1]),
    };
    plan::plan(&s, kernel(), scope)
}

/// The reason and message a plan is refused with.
fn refused(yaml: &str, reach: Reach) -> (Reason, String) {
    match plan_for(yaml, reach) {
        Ok(_) => panic!("planned, but should be refused for {reach:?}: {yaml}"),
        Err(EngineError::NotFeasible(v)) => {
            let p = v.first_problem().expect("a problem");
            (p.reason.expect("a reason"), p.message.clone())
        }
        Err(e) => panic!("{yaml}: {e}"),
    }
}

fn plans(yaml: &str, reach: Reach) -> JobPlan {
    plan_for(yaml, reach).unwrap_or_else(|e| panic!("{reach:?} {yaml}: {e}"))
}

/// `rawTracepoint: sys_enter` has two arguments (regs, id). `arg5` used to read the words
/// past them on the kernel stack and return them as row keys; now any job is refused at plan
/// time, naming the count.
#[test]
fn arguments_past_the_real_count_are_refused_for_every_job() {
    for reach in [Reach::Node, Reach::Namespace] {
        let (reason, message) = refused(
            "probe: { rawTracepoint: sys_enter }\naggregate: { by: [arg5] }",
            reach,
        );
        assert_eq!(reason, Reason::SymbolNotFound, "{message}");
        assert!(
            message.contains("arg5 is past the 2 argument(s) of raw_tracepoint:sys_enter")
                && message.contains("use arg0…arg1"),
            "{message}"
        );
    }
    // The syscall number is argument 1: fine for everyone.
    for reach in [Reach::Node, Reach::Namespace] {
        plans(
            "probe: { rawTracepoint: sys_enter }\naggregate: { by: [arg1] }",
            reach,
        );
    }
}

/// A kernel address as a row key undoes KASLR: a TraceJob may not key by a pointer argument,
/// a pointer field or a number the kernel prints as an address; a ClusterTraceJob may, and
/// sees it in hex.
#[test]
fn a_tracejob_may_not_key_by_a_kernel_address() {
    for (yaml, what) in [
        (
            "probe: { rawTracepoint: sys_enter }\naggregate: { by: [arg0] }",
            "arg0 of raw_tracepoint:sys_enter",
        ),
        (
            "probe: { tracepoint: skb/kfree_skb }\naggregate: { by: [skbaddr] }",
            "skbaddr of tracepoint:skb/kfree_skb",
        ),
        (
            "probe: { tracepoint: skb/kfree_skb }\naggregate: { by: [location] }",
            "location of tracepoint:skb/kfree_skb",
        ),
        (
            "probe: { tracepoint: skb/kfree_skb }\naggregate: { value: sum(skbaddr) }",
            "skbaddr of tracepoint:skb/kfree_skb",
        ),
        (
            "probe: { tracepoint: kmem/kmalloc }\naggregate: { by: [call_site] }",
            "call_site of tracepoint:kmem/kmalloc",
        ),
    ] {
        let (reason, message) = refused(yaml, Reach::Namespace);
        assert_eq!(reason, Reason::PolicyDenied, "{yaml}: {message}");
        assert!(
            message.contains(RULE_KERNEL_ADDRESS) && message.contains(what),
            "{yaml}: {message}"
        );
        let plan = plans(yaml, Reach::Node);
        assert!(plan.verdict.feasible, "{yaml}");
    }
    // Not addresses: a drop reason, a syscall's own (user) pointer argument, kernel stacks
    // (shown as function names only).
    for yaml in [
        "probe: { tracepoint: skb/kfree_skb }\naggregate: { by: [reason, kstack] }",
        "probe: { tracepoint: syscalls/sys_enter_openat }\naggregate: { by: [filename] }",
        "probe: { catalog: packet-drops }",
    ] {
        plans(yaml, Reach::Namespace);
    }
}

/// A ClusterTraceJob keying by a kernel address sees it in hex, as the kernel prints it.
#[test]
fn a_kernel_address_key_renders_in_hex_for_a_cluster_job() {
    let _k = KernelTest::begin();
    let c = comm("hex");
    let s = start(&format!(
        "probe: {{ rawTracepoint: sys_enter }}\naggregate: {{ by: [arg0] }}\nfilter: {{ comm: {c} }}"
    ));
    workload(&c, "getppid", 20, None);
    let r = s.stop().expect("stops");
    assert!(!r.rows.is_empty());
    for row in &r.rows {
        let key = &row.keys["arg0"];
        let address = key
            .strip_prefix("0x")
            .and_then(|h| u64::from_str_radix(h, 16).ok());
        assert!(
            address.is_some_and(|a| a >= 0xff00_0000_0000_0000),
            "a kernel pt_regs address (the top of the address space), in hex: {key}"
        );
    }
}

/// The node's memory budget holds across jobs: a job whose maps could take more than what
/// the running jobs leave is refused with the figures and the knobs, and attaches nothing;
/// once the others end, it fits. Sizes count a value per possible CPU.
#[test]
fn a_job_that_does_not_fit_the_nodes_memory_budget_is_refused_and_attaches_nothing() {
    let _k = KernelTest::begin();
    let small = "probe: { tracepoint: syscalls/sys_enter_getppid }\nlimits: { mapEntries: 1024 }";
    let huge = "probe: { tracepoint: syscalls/sys_enter_getppid }\naggregate: { by: [pid] }\nlimits: { mapEntries: 1048576 }";
    let opts = EngineOptions::default();
    let need = |yaml: &str| {
        session::memlock_budget(
            &plan::plan(&spec(yaml), kernel(), Scope::Node).expect("plans"),
            &opts,
        )
    };
    let (small_need, huge_need) = (need(small), need(huge));
    let cpus = aya::util::nr_cpus().expect("possible CPUs") as u64;
    assert!(
        huge_need >= (1 << 20) * 16 * cpus,
        "a per-CPU value for each of {cpus} possible CPUs is counted: {huge_need}"
    );
    let mut engine = Engine::new(
        Kernel::running(),
        EngineOptions {
            node_memory_budget: small_need + huge_need - 1,
            ..EngineOptions::default()
        },
    );
    engine
        .apply("small", &spec(small), Scope::Node)
        .expect("fits");
    let before = residue();
    let e = engine
        .apply("huge", &spec(huge), Scope::Node)
        .expect_err("does not fit beside the small job");
    let EngineError::NotFeasible(v) = &e else {
        panic!("{e}")
    };
    let p = v.first_problem().expect("a problem");
    assert_eq!(p.reason, Some(Reason::NodeBudget), "{}", p.message);
    for words in [
        "1048576 entries",
        "1 running job",
        "limits.mapEntries",
        "--node-memory-budget",
    ] {
        assert!(p.message.contains(words), "{words:?} in: {}", p.message);
    }
    assert_eq!(residue(), before, "the refused job loaded nothing");
    engine.detach("small").expect("detaches");
    engine
        .apply("huge", &spec(huge), Scope::Node)
        .expect("fits alone");
    engine.detach("huge").expect("detaches");
    assert_no_residue("after both jobs");
}

/// The node's CPU budget holds across jobs: each running job reserves its CPU budget
/// (`limits.cpuPercent`, else the engine's default); a job that does not fit beside the others
/// is refused with the figures and the knobs and attaches nothing; once one ends, it fits.
#[test]
fn a_job_that_does_not_fit_the_nodes_cpu_budget_is_refused_and_attaches_nothing() {
    let _k = KernelTest::begin();
    let plain = "probe: { tracepoint: syscalls/sys_enter_getppid }";
    let light = "probe: { tracepoint: syscalls/sys_enter_getppid }\nlimits: { cpuPercent: 5 }";
    let mut engine = Engine::new(
        Kernel::running(),
        EngineOptions {
            default_cpu_percent: Some(10),
            node_cpu_percent: 15,
            ..EngineOptions::default()
        },
    );
    engine.apply("a", &spec(plain), Scope::Node).expect("fits");
    assert_eq!(engine.cpu_limit("a"), Some(10), "the default applies");
    let before = residue();
    let e = engine
        .apply("b", &spec(plain), Scope::Node)
        .expect_err("10 % beside 10 % does not fit 15 %");
    let EngineError::NotFeasible(v) = &e else {
        panic!("{e}")
    };
    let p = v.first_problem().expect("a problem");
    assert_eq!(p.reason, Some(Reason::NodeBudget), "{}", p.message);
    for words in [
        "10% of a CPU",
        "budget for all jobs is 15%",
        "10% of it reserved by 1 running job",
        "limits.cpuPercent",
        "--node-cpu-budget",
    ] {
        assert!(p.message.contains(words), "{words:?} in: {}", p.message);
    }
    assert_eq!(residue(), before, "the refused job loaded nothing");
    engine
        .apply("c", &spec(light), Scope::Node)
        .expect("5 % fits beside 10 %");
    assert_eq!(engine.cpu_limit("c"), Some(5), "the job's own budget wins");
    engine.detach("a").expect("detaches");
    engine
        .apply("b", &spec(plain), Scope::Node)
        .expect("fits now");
    engine.detach("b").expect("detaches");
    engine.detach("c").expect("detaches");
    assert_no_residue("after the jobs");
}
