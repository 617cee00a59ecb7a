//! RELIABILITY.md E1–E8, against the running kernel. Needs root and scripts/setup.sh.

mod common;

use std::{
    os::unix::process::CommandExt,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use common::*;
use fathom_crds::verdict::Reason;
use fathom_node::{
    EngineError,
    cli::run::run_session,
    engine::{
        kernel::Kernel,
        plan::{self, AttachPoint, Scope},
        session::{self, Applied, Engine, EngineOptions, Session},
    },
};

fn our_links() -> usize {
    residue().links
}

/// Programs named fathom_* in the kernel, asked directly (BPF_PROG_GET_NEXT_ID), which is
/// much faster than bpftool for a check in every cycle.
fn our_programs() -> usize {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str().is_some_and(|n| n.starts_with("fathom_")))
        .count()
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("fd dir").count()
}

#[test]
fn e1_apply_and_detach_are_idempotent() {
    let _k = KernelTest::begin();
    let mut engine = Engine::new(Kernel::running(), EngineOptions::default());
    let job = spec("probe: { catalog: syscalls }\naggregate: { by: [comm] }");
    assert_eq!(
        engine.apply("job-a", &job, Scope::Node).expect("apply 1"),
        Applied::Started
    );
    assert_eq!(
        engine.apply("job-a", &job, Scope::Node).expect("apply 2"),
        Applied::Unchanged
    );
    assert_eq!(
        engine.apply("job-a", &job, Scope::Node).expect("apply 3"),
        Applied::Unchanged
    );
    assert_eq!(our_links(), 1, "exactly one link for the one probe");
    let changed = spec("probe: { catalog: syscalls }\naggregate: { by: [pid] }");
    assert_eq!(
        engine
            .apply("job-a", &changed, Scope::Node)
            .expect("apply changed"),
        Applied::Restarted
    );
    assert_eq!(our_links(), 1, "a changed spec replaces, never adds");
    assert_eq!(
        engine
            .apply("job-a", &changed, Scope::Nothing)
            .expect("apply with no target here"),
        Applied::Restarted
    );
    assert_eq!(our_links(), 0, "a scope with no target attaches nothing");
    assert!(engine.detach("job-a").expect("detach 1").is_some());
    assert!(engine.detach("job-a").expect("detach 2").is_none());
    assert!(engine.detach("job-a").expect("detach 3").is_none());
    assert_eq!(our_links(), 0);
}

#[test]
fn e2_detach_is_synchronous_and_leaks_nothing() {
    let _k = KernelTest::begin();
    let yaml = "probe: { tracepoint: raw_syscalls/sys_enter }\naggregate: { by: [comm] }";
    // The first start loads lazily cached state (BTF, kallsyms); measure after it.
    start(yaml).stop().expect("warm-up");
    let fds = open_fds();
    // RELIABILITY E2 asks for 1000 cycles; the kernel matrix's emulated VMs run fewer.
    let cycles: usize = std::env::var("FATHOM_E2_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    eprintln!("e2: {cycles} attach/detach cycles");
    for i in 0..cycles {
        let s = start(yaml);
        assert_eq!(our_programs(), 1, "cycle {i}: loaded");
        s.stop().expect("stops");
        // No waiting: when stop returns, the program is gone, and with it every link (a link
        // holds its program). bpftool confirms links and maps every 100 cycles.
        assert_eq!(
            our_programs(),
            0,
            "cycle {i}: program left after stop returned"
        );
        if i % 100 == 0 {
            let r = residue();
            assert_eq!((r.links, r.programs), (0, 0), "cycle {i}: {r:?}");
        }
    }
    assert_eq!(
        open_fds(),
        fds,
        "file descriptors back to baseline after 1000 cycles"
    );
}

#[test]
fn e3_a_job_whose_third_probe_fails_leaves_nothing_and_others_keep_running() {
    let _k = KernelTest::begin();
    let c = comm("e3");
    let other = start(&format!(
        "probe: {{ tracepoint: syscalls/sys_enter_getppid }}\nfilter: {{ comm: {c} }}"
    ));
    let kernel = Kernel::running();
    let mut p =
        plan::plan(&spec("probe: { catalog: runqlat }"), &kernel, Scope::Node).expect("plans");
    assert_eq!(p.attachments.len(), 3);
    p.attachments[2].point = AttachPoint::Tracepoint {
        category: "sched".into(),
        name: "no_such_tracepoint".into(),
    };
    let err = match Session::start(p, &kernel, EngineOptions::default()) {
        Ok(_) => panic!("a job with a missing attach point must not start"),
        Err(e) => e,
    };
    let msg = err.to_string();
    assert!(
        msg.contains("tracepoint:sched/no_such_tracepoint"),
        "names the probe: {msg}"
    );
    assert_eq!(err.reason(), Some(Reason::SymbolNotFound), "{msg}");
    assert_eq!(our_links(), 1, "only the other job's link remains");
    workload(&c, "getppid", 25, None);
    let r = other.stop().expect("other job still works");
    assert_eq!(r.totals.hits, 25);
}

#[test]
fn e4_verifier_rejection_is_reported_not_fatal() {
    let _k = KernelTest::begin();
    let err = session::verifier_canary(&Kernel::running(), 4096);
    assert_eq!(err.reason(), Some(Reason::VerifierRejected), "{err}");
    let msg = err.to_string();
    let lines: Vec<&str> = msg.lines().map(str::trim).collect();
    // The failing instruction: the canary dereferences a map lookup's result unchecked, and
    // the verifier prints that access of the unchecked register (`N: (7b) *(u64 *)(r0 +0) =
    // r1` here, a store) right before its reason.
    let reason = lines
        .iter()
        .position(|l| l.contains("invalid mem access") && l.contains("map_value_or_null"))
        .unwrap_or_else(|| panic!("the verifier's reason: {msg}"));
    let insn = lines[..reason]
        .iter()
        .rev()
        .find(|l| is_insn_line(l))
        .unwrap_or_else(|| panic!("no instruction line before the reason: {msg}"));
    assert!(
        insn.contains("*(u") && insn.contains("(r0 +"),
        "the failing instruction is the access through the unchecked r0: {insn}"
    );
    // The summary line, as the kernel ends every log.
    let summary = lines
        .iter()
        .find(|l| l.starts_with("processed ") && l.contains(" insns (limit "))
        .unwrap_or_else(|| panic!("the verifier's summary line: {msg}"));
    assert!(summary.contains("peak_states"), "{summary}");
    assert!(msg.len() < 4096 + 512, "bounded: {} bytes", msg.len());
    // A smaller budget keeps the summary and the failing instruction, and drops the middle.
    let small = session::verifier_canary(&Kernel::running(), 512).to_string();
    assert!(small.len() < 512 + 512, "bounded: {} bytes", small.len());
    assert!(small.contains(summary), "{small}");
    assert!(small.contains(insn), "{small}");
    // The process goes on: a real job still runs.
    start("probe: { catalog: syscalls }")
        .stop()
        .expect("still works");
}

/// A verifier log line of one instruction: `N: (OP) …`, OP two hex digits.
fn is_insn_line(line: &str) -> bool {
    let Some((n, rest)) = line.split_once(": (") else {
        return false;
    };
    n.chars().all(|c| c.is_ascii_digit())
        && !n.is_empty()
        && rest.len() > 3
        && rest[..2].chars().all(|c| c.is_ascii_hexdigit())
        && rest[2..].starts_with(") ")
}

#[test]
fn e5_unsupported_kernel_conditions_degrade_clearly() {
    let _k = KernelTest::begin();
    let reason_of = |kernel: &Kernel, yaml: &str| -> (Reason, String) {
        match plan::plan(&spec(yaml), kernel, Scope::Node) {
            Err(EngineError::NotFeasible(v)) => {
                let p = v.first_problem().expect("a problem").clone();
                (p.reason.expect("reason"), p.message)
            }
            Ok(_) => panic!("{yaml} should not be feasible"),
            Err(e) => panic!("unexpected error {e}"),
        }
    };
    // Missing BTF.
    let mut no_btf = Kernel::running();
    no_btf.btf_path = "/nonexistent/vmlinux".into();
    let (r, m) = reason_of(&no_btf, "probe: { fentry: vfs_read }");
    assert_eq!(r, Reason::BTFUnavailable, "{m}");
    assert!(m.contains("/nonexistent/vmlinux"), "{m}");
    // A missing tracepoint, a missing user symbol, a missing binary.
    let kernel = Kernel::running();
    let (r, m) = reason_of(&kernel, "probe: { tracepoint: sched/no_such_event }");
    assert_eq!(r, Reason::SymbolNotFound, "{m}");
    let (r, m) = reason_of(
        &kernel,
        &format!(
            "probe: {{ uprobe: '{}:no_such_fn' }}",
            workload_path().display()
        ),
    );
    assert_eq!(r, Reason::SymbolNotFound, "{m}");
    let (r, _) = reason_of(&kernel, "probe: { uprobe: '/no/such/binary:main' }");
    assert_eq!(r, Reason::BinaryNotFound);
    // This kernel: no kprobes, trampolines refused (both reported before anything loads).
    if !kernel.has_kprobes() {
        let (r, m) = reason_of(&kernel, "probe: { kprobe: vfs_read }");
        assert_eq!(r, Reason::AttachKindUnsupported, "{m}");
        assert!(m.contains("kprobes are not built into this kernel"), "{m}");
    }
    // EPERM injected: the same binary without capabilities.
    let dir = std::env::temp_dir().join(format!("fathom-e5-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let job = dir.join("job.yaml");
    std::fs::write(
        &job,
        "apiVersion: fathom.dev/v1alpha1\nkind: TraceJob\nmetadata: { name: e5 }\nspec:\n  probe: { catalog: syscalls }\n  duration: 1s\n",
    )
    .expect("write job");
    let out = Command::new("setpriv")
        .args(["--inh-caps=-all", "--bounding-set=-all", "--"])
        .arg(env!("CARGO_BIN_EXE_fathom"))
        .arg("run")
        .arg(&job)
        .output()
        .expect("setpriv runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("PermissionDenied") && stderr.contains("CAP_BPF"),
        "{stderr}"
    );
    // A real EPERM from the kernel: the same binary, with every capability, under a seccomp
    // filter that makes bpf(BPF_PROG_LOAD) fail with EPERM (as a container runtime's default
    // profile does). The refusal is named before anything loads.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fathom"));
    cmd.arg("run").arg(&job);
    // SAFETY: the closure only makes async-signal-safe prctl calls between fork and exec.
    #[allow(unsafe_code, reason = "pre_exec: a seccomp filter for the child")]
    unsafe {
        cmd.pre_exec(refuse_bpf_prog_load);
    }
    let out = cmd.output().expect("fathom runs under seccomp");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("PermissionDenied")
            && stderr.contains("the kernel refuses to load any BPF program (bpf(BPF_PROG_LOAD): Operation not permitted")
            && stderr.contains("seccomp"),
        "{stderr}"
    );
    assert_eq!(residue(), Residue::default(), "nothing loaded");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Installs, in the calling thread, a seccomp filter under which `bpf(BPF_PROG_LOAD, ...)`
/// fails with EPERM and every other system call is allowed.
fn refuse_bpf_prog_load() -> std::io::Result<()> {
    #[cfg(target_arch = "x86_64")]
    const AUDIT_ARCH: u32 = 0xc000_003e;
    #[cfg(target_arch = "aarch64")]
    const AUDIT_ARCH: u32 = 0xc000_00b7;
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    const RET_ALLOW: u32 = 0x7fff_0000;
    const RET_EPERM: u32 = 0x0005_0000 | libc::EPERM as u32;
    let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    // seccomp_data: nr at 0, arch at 4, args[0] at 16 (its low half first, little-endian).
    let filter = [
        op(LD_W_ABS, 0, 0, 4),
        op(JEQ_K, 0, 5, AUDIT_ARCH),
        op(LD_W_ABS, 0, 0, 0),
        op(JEQ_K, 0, 3, libc::SYS_bpf as u32),
        op(LD_W_ABS, 0, 0, 16),
        op(JEQ_K, 0, 1, 5), // BPF_PROG_LOAD
        op(RET_K, 0, 0, RET_EPERM),
        op(RET_K, 0, 0, RET_ALLOW),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: plain prctl calls; prog points at a filter that outlives them.
    #[allow(unsafe_code, reason = "prctl(2): no_new_privs and the seccomp filter")]
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const libc::sock_fprog,
            ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Kernel lockdown (E5): in confidentiality mode tracefs cannot be mounted, and the verdict
/// says lockdown is why (not "mount tracefs"), before anything loads. Always checked with the
/// kernel's lockdown file and tracefs pointed at a lockdown state (as `Kernel`'s paths let a
/// test do); on a kernel really booted with `lockdown=confidentiality` (the matrix's
/// debian-6.12-lockdown row) checked on the running kernel too.
#[test]
fn e5_kernel_lockdown_refuses_with_its_reason() {
    let _k = KernelTest::begin();
    let check = |kernel: &Kernel| {
        for yaml in [
            "probe: { tracepoint: sched/sched_process_exec }",
            "probe: { rawTracepoint: sys_enter }",
        ] {
            match plan::plan(&spec(yaml), kernel, Scope::Node) {
                Err(EngineError::NotFeasible(v)) => {
                    let p = v.first_problem().expect("a problem");
                    assert_eq!(p.reason, Some(Reason::KernelLockdown), "{yaml}: {p:?}");
                    assert!(
                        p.message
                            .contains("kernel lockdown (confidentiality) forbids tracefs"),
                        "{}",
                        p.message
                    );
                }
                other => panic!("{yaml} under lockdown: {other:?}"),
            }
        }
        assert_eq!(residue(), Residue::default(), "nothing loaded");
    };
    let dir = std::env::temp_dir().join(format!("fathom-lockdown-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let lockdown = dir.join("lockdown");
    std::fs::write(&lockdown, "none integrity [confidentiality]\n").expect("lockdown file");
    let mut locked = Kernel::running();
    locked.lockdown_path = lockdown;
    locked.tracefs = None;
    locked.tracefs_error = Some("tracefs is not mounted and mounting it failed".into());
    check(&locked);
    let running = Kernel::running();
    if running.lockdown().as_deref() == Some("confidentiality") {
        check(&running);
    } else {
        // Without lockdown the same job plans.
        let yaml = "probe: { tracepoint: sched/sched_process_exec }";
        plan::plan(&spec(yaml), &running, Scope::Node).expect("plans without lockdown");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn e6_map_caps_are_enforced_twice_and_a_full_map_degrades() {
    let _k = KernelTest::begin();
    // Validation refuses a map above the cap.
    let s: fathom_crds::TraceJobSpec =
        serde_yaml::from_str("probe: { catalog: syscalls }\nlimits: { mapEntries: 2000000 }")
            .expect("yaml");
    let errs = s.validate().expect_err("over the cap");
    assert!(errs[0].to_string().starts_with("spec.limits.mapEntries"));
    // The engine clamps a plan that skipped validation.
    let kernel = Kernel::running();
    let mut p =
        plan::plan(&spec("probe: { catalog: syscalls }"), &kernel, Scope::Node).expect("plans");
    p.map_entries = u32::MAX;
    let s = Session::start(p, &kernel, EngineOptions::default()).expect("starts clamped");
    // The job's keys fit the packed map; its size is the one clamped.
    let agg = residue_map_max_entries("AGG_TINY");
    assert_eq!(
        agg,
        Some(fathom_crds::spec::MAX_MAP_ENTRIES),
        "clamped to the cap"
    );
    s.stop().expect("stops");
    // A saturated map: 4 entries, many distinct pids.
    let c = comm("e6");
    let yaml = format!(
        "probe: {{ tracepoint: syscalls/sys_enter_getppid }}\naggregate: {{ by: [pid] }}\nfilter: {{ comm: {c} }}\nlimits: {{ mapEntries: 4 }}"
    );
    let opts = EngineOptions::default();
    let plan = plan::plan(&spec(&yaml), &kernel, Scope::Node).expect("plans");
    let budget = session::memlock_budget(&plan, &opts);
    let mut s = Session::start(plan, &kernel, opts).expect("starts");
    for _ in 0..10 {
        workload(&c, "getppid", 3, None);
    }
    let r = s.snapshot().expect("reads");
    assert!(r.rows.len() <= 4);
    assert_eq!(
        r.totals.map_full,
        6 * 3,
        "each hit of the 6 processes that found no room"
    );
    assert!(
        r.degraded.iter().any(|d| d.reason == "MapFull"),
        "{:?}",
        r.degraded
    );
    let memlock = r.budget.as_ref().expect("budget").memlock_bytes;
    assert!(
        memlock > 0 && memlock <= budget,
        "memlock {memlock} within budget {budget}"
    );
    // The kernel's own accounting, as bpftool lists it for exactly this job's maps and
    // programs: the figure reported, and within the budget the node runner reserves.
    let (map_ids, prog_ids) = s.kernel_ids();
    assert!(!map_ids.is_empty() && !prog_ids.is_empty());
    let kernel = bpftool_memlock("map", &map_ids) + bpftool_memlock("prog", &prog_ids);
    assert_eq!(
        kernel, memlock,
        "bpftool's bytes_memlock against the reported figure"
    );
    assert!(
        kernel <= budget,
        "kernel memlock {kernel} within budget {budget}"
    );
    s.stop().expect("stops");
}

/// The sum of `bytes_memlock` of the `kind` objects (`map`, `prog`) with these ids, as
/// `bpftool -j <kind> show` lists them; each id must be listed.
fn bpftool_memlock(kind: &str, ids: &[u64]) -> u64 {
    let out = Command::new("bpftool")
        .args(["-j", kind, "show"])
        .output()
        .expect("bpftool runs");
    let all: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    ids.iter()
        .map(|id| {
            all.iter()
                .find(|o| o["id"].as_u64() == Some(*id))
                .and_then(|o| o["bytes_memlock"].as_u64())
                .unwrap_or_else(|| {
                    panic!("bpftool {kind} show lists no {kind} {id} with bytes_memlock")
                })
        })
        .sum()
}

fn residue_map_max_entries(name: &str) -> Option<u32> {
    let out = Command::new("bpftool")
        .args(["-j", "map", "show"])
        .output()
        .ok()?;
    let maps: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).ok()?;
    maps.iter()
        .filter(|m| m["name"] == name)
        .filter_map(|m| m["max_entries"].as_u64())
        .map(|v| v as u32)
        .max()
}

#[test]
fn e7_loss_is_accounted_exactly() {
    let _k = KernelTest::begin();
    let c = comm("e7");
    let yaml = format!(
        "probe: {{ tracepoint: syscalls/sys_enter_getppid }}\nfilter: {{ comm: {c} }}\nevents: {{ last: 10 }}"
    );
    let opts = EngineOptions {
        ringbuf_bytes: 4096,
        ..EngineOptions::default()
    };
    let mut s = start_with(&yaml, opts.clone()).expect("starts");
    // A flood against a one-page ring buffer and a consumer that reads every 20 ms.
    let wc = c.clone();
    let t = std::thread::spawn(move || workload(&wc, "getppid", 20000, None));
    while !t.is_finished() {
        std::thread::sleep(Duration::from_millis(20));
        s.poll_events(Duration::ZERO);
    }
    t.join().expect("workload");
    let r = s.stop().expect("stops");
    let t = &r.totals;
    assert_eq!(t.hits, 20000);
    assert!(t.events_lost > 0, "the small buffer overflowed: {t:?}");
    assert_eq!(
        t.hits,
        t.events_delivered + t.events_lost + t.events_dropped,
        "{t:?}"
    );
    assert_eq!(
        t.events_emitted,
        t.events_delivered + t.events_dropped,
        "{t:?}"
    );
    // Trimmed in user space: with a ring buffer big enough to lose nothing, every event
    // reaches user space; the live queue the node runner streams from keeps the newest
    // LIVE_EVENTS, and counts each one it let go, exactly.
    let trim = comm("e7t");
    let n = session::LIVE_EVENTS as u64 + 1500;
    let mut s = start_with(
        &format!("probe: {{ tracepoint: syscalls/sys_enter_getppid }}\nfilter: {{ comm: {trim} }}\nevents: {{ last: 10 }}"),
        EngineOptions {
            ringbuf_bytes: 16 << 20,
            ..EngineOptions::default()
        },
    )
    .expect("starts");
    let wc = trim.clone();
    let t = std::thread::spawn(move || workload(&wc, "getppid", n, None));
    while !t.is_finished() {
        std::thread::sleep(Duration::from_millis(20));
        s.poll_events(Duration::ZERO);
    }
    t.join().expect("workload");
    s.poll_events(Duration::ZERO);
    let (taken, trimmed) = s.take_events(usize::MAX);
    let r = s.stop().expect("stops");
    let t = &r.totals;
    assert_eq!((t.hits, t.events_lost), (n, 0), "{t:?}");
    assert_eq!(t.events_delivered, n, "{t:?}");
    assert_eq!(taken.len(), session::LIVE_EVENTS);
    assert_eq!(
        trimmed,
        n - session::LIVE_EVENTS as u64,
        "trimmed in user space"
    );
    assert_eq!(r.events.len(), 10, "the result keeps `last`");

    // Zero load, zero loss.
    let quiet = comm("e7q");
    let s = start_with(
        &format!("probe: {{ tracepoint: syscalls/sys_enter_getppid }}\nfilter: {{ comm: {quiet} }}\nevents: {{ last: 10 }}"),
        opts,
    )
    .expect("starts");
    std::thread::sleep(Duration::from_millis(200));
    let r = s.stop().expect("stops");
    assert_eq!(
        (r.totals.hits, r.totals.events_lost, r.totals.events_dropped),
        (0, 0, 0)
    );
}

fn cpu_seconds_of_self() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("stat");
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .expect("fields")
        .split_whitespace()
        .collect();
    let ticks: f64 =
        fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    // SAFETY: sysconf has no preconditions.
    #[allow(unsafe_code, reason = "sysconf(3)")]
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz
}

#[test]
fn e8_rate_limits_hold_and_are_counted_apart_from_loss() {
    let _k = KernelTest::begin();
    let c = comm("e8");
    let yaml = format!(
        "probe: {{ tracepoint: syscalls/sys_enter_getppid }}\naggregate: {{ by: [comm] }}\nfilter: {{ comm: {c} }}\nevents: {{ last: 10 }}\nlimits: {{ eventsPerSecond: 1000 }}"
    );
    let s = start(&yaml);
    let cpu0 = cpu_seconds_of_self();
    let stop = Arc::new(AtomicBool::new(false));
    let wc = c.clone();
    let flood = std::thread::spawn(move || workload(&wc, "pace", 20000, Some("30")));
    let stopper = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let out = flood.join().expect("flood");
            stop.store(true, Ordering::Relaxed);
            out
        })
    };
    let r = run_session(s, Some(Duration::from_secs(60)), &stop, |_| {}).expect("runs");
    let out = stopper.join().expect("stopper");
    let calls: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("done "))
        .and_then(|n| n.trim().parse().ok())
        .expect("done line");
    let cpu = cpu_seconds_of_self() - cpu0;
    let t = &r.totals;
    assert!(calls > 500_000, "the flood ran: {calls}");
    assert!(t.hits <= 31_500, "at most ~1000/s over ~30 s: {t:?}");
    assert!(t.hits >= 25_000, "the limit admits about the limit: {t:?}");
    assert_eq!(
        t.hits + t.rate_limited,
        calls,
        "every call either counted or rate-limited: {t:?}"
    );
    assert_eq!(t.events_lost, 0, "rate-limited drops are not loss: {t:?}");
    assert!(r.degraded.iter().any(|d| d.reason == "RateLimited"));
    assert!(
        cpu < r.elapsed_seconds,
        "the engine stayed under one core: {cpu:.1}s CPU in {:.1}s",
        r.elapsed_seconds
    );
}

/// S2: a secret in a process's argv, environment and file paths never reaches a result — rows,
/// events, totals or messages — unless the job asks for payloads (which a TraceJob may not:
/// docs/tenancy.md). The same jobs with payloads on show the sentinel, so the check would
/// see a leak.
#[test]
fn s2_sentinel_secrets_never_appear_unless_payloads_are_asked_for() {
    let _k = KernelTest::begin();
    let c = comm("s2");
    let sentinel = format!("FATHOMSENTINEL{}X", std::process::id());
    let dir = std::env::temp_dir().join(format!("fathom-s2-{sentinel}"));
    std::fs::create_dir_all(&dir).expect("sentinel directory");
    let program = dir.join("true");
    let _ = std::fs::remove_file(&program);
    std::os::unix::fs::symlink("/bin/true", &program).expect("sentinel program");
    let file = dir.join(format!("{sentinel}.conf"));
    std::fs::write(&file, "secret").expect("sentinel file");

    let jobs = |payload: bool| -> Vec<Session> {
        [
            format!("probe: {{ catalog: exec }}\nevents: {{ last: 50, payload: {payload} }}\naggregate: {{ by: [comm] }}"),
            format!("probe: {{ catalog: open }}\nevents: {{ last: 50, payload: {payload} }}\nfilter: {{ comm: {c} }}"),
            format!("probe: {{ tracepoint: syscalls/sys_enter_openat }}\naggregate: {{ by: [comm, pid] }}\nfilter: {{ comm: {c} }}"),
        ]
        .iter()
        .map(|yaml| start(yaml))
        .collect()
    };
    let work = || {
        for (mode, arg) in [("exec", &program), ("open", &file)] {
            let out = std::process::Command::new(workload_path())
                .args([
                    c.as_str(),
                    mode,
                    "3",
                    arg.to_str().expect("utf-8"),
                    &sentinel,
                ])
                .env("FATHOM_S2_SECRET", &sentinel)
                .output()
                .expect("workload runs");
            assert!(out.status.success(), "{out:?}");
        }
    };

    let without = jobs(false);
    work();
    for s in without {
        let r = s.stop().expect("stops");
        let text = serde_json::to_string(&r).expect("serializes");
        assert!(r.totals.hits > 0, "the job saw the work: {text}");
        assert!(
            !text.contains(&sentinel),
            "the sentinel leaked into a result without payloads: {text}"
        );
    }
    let with = jobs(true);
    work();
    let seen: Vec<bool> = with
        .into_iter()
        .map(|s| {
            let r = s.stop().expect("stops");
            serde_json::to_string(&r).expect("json").contains(&sentinel)
        })
        .collect();
    // exec's file name and open's path carry it once asked for; the counting job never does.
    assert_eq!(seen, [true, true, false]);
    let _ = std::fs::remove_dir_all(&dir);
}
