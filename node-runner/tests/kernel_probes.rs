//! Real probes in the running kernel against workloads of known shape, with bpftrace as the
//! oracle where it can run. Needs root (CAP_BPF + CAP_PERFMON) and scripts/setup.sh.

mod common;

use std::collections::BTreeMap;

use common::*;
use fathom_crds::result::ResultData;
use fathom_node::engine::{
    plan::{self, NOTHING_ATTACHED, Scope},
    session::Session,
};

fn events_with(r: &ResultData, field: &str, value: &str) -> usize {
    r.events
        .iter()
        .filter(|e| e.fields.get(field).map(String::as_str) == Some(value))
        .count()
}

#[test]
fn syscalls_by_comm_and_syscall_match_bpftrace_exactly() {
    let _k = KernelTest::begin();
    let c = comm("sys");
    let n = 5000;
    let s = start(&format!(
        "probe: {{ catalog: syscalls }}\naggregate: {{ by: [comm, syscall], top: 1000 }}\nfilter: {{ comm: {c} }}"
    ));
    let bt = Bpftrace::start(&format!(
        "tracepoint:raw_syscalls:sys_enter /comm == \"{c}\"/ {{ @total = count(); if (args->id == 110) {{ @getppid = count(); }} }}"
    ));
    workload(&c, "getppid", n, None);
    let maps = bt.stop();
    let r = s.stop().expect("stops");
    let bt_total = maps
        .iter()
        .find_map(|m| m["data"]["@total"].as_u64())
        .expect("@total");
    let bt_getppid = maps
        .iter()
        .find_map(|m| m["data"]["@getppid"].as_u64())
        .expect("@getppid");
    assert_eq!(row_value(&r, "syscall", "getppid"), n);
    assert_eq!(bt_getppid, n);
    assert_eq!(
        row_value(&r, "comm", &c),
        bt_total,
        "every syscall of the comm, as bpftrace counts them"
    );
    assert!(
        r.rows.iter().all(|row| row.keys["comm"] == c),
        "the comm filter ran in the kernel"
    );
    assert_eq!(r.totals.hits, bt_total);
}

#[test]
fn open_events_carry_filename_and_result_and_match_bpftrace() {
    let _k = KernelTest::begin();
    let c = comm("open");
    let s = start(&format!(
        "probe: {{ catalog: open }}\naggregate: {{ by: [comm] }}\nfilter: {{ comm: {c} }}\nevents: {{ last: 100, payload: true }}"
    ));
    let bt = Bpftrace::start(&format!(
        "tracepoint:syscalls:sys_enter_openat /comm == \"{c}\"/ {{ @ = count(); }}"
    ));
    workload(&c, "open", 7, Some("/etc/hostname"));
    workload(&c, "open", 3, Some("/nonexistent/file"));
    let bt_count = bt.stop_count("@");
    let r = s.stop().expect("stops");
    assert_eq!(bt_count, 10);
    assert_eq!(row_value(&r, "comm", &c), 10);
    let ok: Vec<_> = r
        .events
        .iter()
        .filter(|e| e.fields["filename"] == "/etc/hostname")
        .collect();
    assert_eq!(ok.len(), 7);
    assert!(
        ok.iter()
            .all(|e| e.fields["result"].parse::<i64>().expect("fd") >= 0)
    );
    let failed: Vec<_> = r
        .events
        .iter()
        .filter(|e| e.fields["filename"] == "/nonexistent/file")
        .collect();
    assert_eq!(failed.len(), 3);
    assert!(failed.iter().all(|e| e.fields["result"] == "-2"), "ENOENT");
    assert_eq!(r.totals.events_lost, 0);
}

#[test]
fn open_filenames_stay_out_without_payload_opt_in() {
    let _k = KernelTest::begin();
    let c = comm("nopay");
    let s = start(&format!(
        "probe: {{ catalog: open }}\nfilter: {{ comm: {c} }}"
    ));
    workload(&c, "open", 2, Some("/etc/hostname"));
    let r = s.stop().expect("stops");
    assert_eq!(r.events.len(), 2);
    for e in &r.events {
        assert!(!e.fields["filename"].contains("hostname"), "{e:?}");
    }
}

#[test]
fn exec_events_have_pid_ppid_comm_filename_and_match_bpftrace() {
    let _k = KernelTest::begin();
    let c = comm("exec");
    let s = start("probe: { catalog: exec }\nevents: { last: 1000, payload: true }");
    let bt = Bpftrace::start(
        "tracepoint:sched:sched_process_exec /str(args->filename) == \"/bin/true\"/ { @ = count(); }",
    );
    let w = workload_waiting(&c, "exec", 5, None);
    let parent = w.pid;
    w.go();
    let bt_count = bt.stop_count("@");
    let r = s.stop().expect("stops");
    let children: Vec<_> = r
        .events
        .iter()
        .filter(|e| e.fields["ppid"] == parent.to_string())
        .collect();
    assert_eq!(children.len(), 5, "{:?}", r.events);
    for e in &children {
        assert_eq!(e.fields["filename"], "/bin/true");
        assert_eq!(e.fields["comm"], "true");
        assert_ne!(e.fields["pid"], parent.to_string());
    }
    assert_eq!(bt_count, events_with(&r, "filename", "/bin/true") as u64);
}

#[test]
fn uprobe_counts_calls_exactly_and_matches_bpftrace() {
    let _k = KernelTest::begin();
    let c = comm("up");
    let bin = workload_path();
    let bin = bin.display();
    let s = start(&format!(
        "probe: {{ uprobe: '{bin}:fathom_target' }}\naggregate: {{ by: [comm] }}"
    ));
    let bt = Bpftrace::start(&format!(
        "uprobe:{bin}:fathom_target {{ @[comm] = count(); }}"
    ));
    workload(&c, "call", 1234, None);
    let maps = bt.stop();
    let r = s.stop().expect("stops");
    assert_eq!(row_value(&r, "comm", &c), 1234);
    let bt_count = maps
        .iter()
        .find_map(|m| m["data"]["@"][&c].as_u64())
        .expect("bpftrace row");
    assert_eq!(bt_count, 1234);
}

#[test]
fn uretprobe_latency_histogram_counts_every_call() {
    let _k = KernelTest::begin();
    let c = comm("uret");
    let bin = workload_path();
    let s = start(&format!(
        "probe: {{ uretprobe: '{}:fathom_target' }}\naggregate: {{ value: latency }}\nfilter: {{ comm: {c} }}",
        bin.display()
    ));
    workload(&c, "call", 300, None);
    let r = s.stop().expect("stops");
    assert_eq!(r.histograms.len(), 1);
    assert_eq!(r.histograms[0].count, 300);
    assert!(
        r.histograms[0].buckets.iter().all(|b| b.low < 100_000_000),
        "sub-100ms calls"
    );
}

#[test]
fn uprobe_keys_by_argument_and_sums_return_values() {
    let _k = KernelTest::begin();
    let c = comm("arg");
    let bin = workload_path();
    let s = start(&format!(
        "probe: {{ uretprobe: '{}:fathom_target' }}\naggregate: {{ value: sum(ret) }}\nfilter: {{ comm: {c} }}",
        bin.display()
    ));
    workload(&c, "call", 10, None);
    let r = s.stop().expect("stops");
    // fathom_target(i) returns 2*i for i in 0..10: Σ = 90.
    assert_eq!(r.rows.len(), 1);
    assert_eq!(r.rows[0].value, 90);
}

#[test]
fn usdt_probe_counts_hits() {
    let _k = KernelTest::begin();
    let c = comm("usdt");
    let s = start(&format!(
        "probe: {{ usdt: '{}:fathom:tick' }}\naggregate: {{ by: [comm] }}",
        workload_path().display()
    ));
    workload(&c, "usdt", 77, None);
    let r = s.stop().expect("stops");
    assert_eq!(row_value(&r, "comm", &c), 77);
}

#[test]
fn tcp_connect_counts_loopback_connects_by_port() {
    let _k = KernelTest::begin();
    let c = comm("tcp");
    let s = start(&format!(
        "probe: {{ catalog: tcp-connect }}\nfilter: {{ comm: {c} }}"
    ));
    let out = workload(&c, "connect", 9, None);
    let r = s.stop().expect("stops");
    let port = out
        .lines()
        .find_map(|l| l.strip_prefix("port "))
        .expect("port line");
    assert_eq!(r.keys, vec!["comm", "daddr", "dport"]);
    assert_eq!(r.rows.len(), 1, "{:?}", r.rows);
    let row = &r.rows[0];
    assert_eq!(row.value, 9);
    assert_eq!(row.keys["daddr"], "127.0.0.1");
    assert_eq!(row.keys["dport"], port);
}

#[test]
fn profile_finds_the_hot_function_in_user_stacks() {
    let _k = KernelTest::begin();
    let c = comm("prof");
    let s = start(&format!(
        "probe: {{ profile: {{ frequency: 199 }} }}\naggregate: {{ by: [comm, ustack] }}\nfilter: {{ comm: {c} }}"
    ));
    let mut s = s;
    let wc = c.clone();
    drive(&mut s, move || {
        workload(&wc, "spin", 1500, None);
    });
    let r = s.stop().expect("stops");
    let total: u64 = r.rows.iter().map(|r| r.value).sum();
    let hot: u64 = r
        .rows
        .iter()
        .filter(|row| row.keys["ustack"].contains("fathom_hot_loop"))
        .map(|row| row.value)
        .sum();
    assert!(total > 100, "samples: {total}");
    assert!(
        hot * 10 >= total * 8,
        "hot frame in {hot} of {total} samples: {:?}",
        r.rows
    );
    assert!(
        r.folded()
            .iter()
            .any(|l| l.contains("main;fathom_hot_loop")),
        "{:?}",
        r.folded()
    );
}

#[test]
fn packet_drops_key_by_reason_and_kernel_stack() {
    let _k = KernelTest::begin();
    let s = start("probe: { catalog: packet-drops }");
    // A connect to a closed loopback port is answered with a RST; the SYN is freed with a
    // drop reason (NO_SOCKET) on the way.
    for _ in 0..20 {
        let _ = std::net::TcpStream::connect("127.0.0.1:1");
    }
    let r = s.stop().expect("stops");
    assert_eq!(r.keys, vec!["reason", "kstack"]);
    assert!(r.totals.hits >= 20, "{:?}", r.totals);
    let reasons: BTreeMap<&str, u64> = r
        .rows
        .iter()
        .map(|row| (row.keys["reason"].as_str(), row.value))
        .collect();
    assert!(
        reasons
            .keys()
            .any(|k| k.chars().all(|c| c.is_ascii_uppercase() || c == '_')),
        "symbolic reasons: {reasons:?}"
    );
    assert!(
        r.rows
            .iter()
            .any(|row| row.keys["kstack"].contains("kfree_skb")
                || row.keys["kstack"].contains("tcp")),
        "kernel stacks symbolized: {:?}",
        r.rows
    );
}

#[test]
fn runqlat_histogram_fills() {
    let _k = KernelTest::begin();
    let s = start("probe: { catalog: runqlat }");
    workload(&comm("rq"), "exec", 20, None);
    std::thread::sleep(std::time::Duration::from_millis(200));
    let r = s.stop().expect("stops");
    assert_eq!(r.histograms.len(), 1);
    assert!(r.histograms[0].count > 0, "{:?}", r.totals);
    assert!(r.value.contains("latency"));
}

#[test]
fn biolatency_sees_synchronous_writes() {
    let _k = KernelTest::begin();
    let dir = std::env::temp_dir().join(format!("fathom-bio-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let file = dir.join("data");
    let s = start("probe: { catalog: biolatency }");
    workload(&comm("bio"), "write", 20, Some(&file.display().to_string()));
    let r = s.stop().expect("stops");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(r.histograms.len(), 1, "{:?}", r.totals);
    assert!(r.histograms[0].count > 0);
}

#[test]
fn raw_tracepoint_keys_by_syscall() {
    let _k = KernelTest::begin();
    let c = comm("raw");
    let s = start(&format!(
        "probe: {{ rawTracepoint: sys_enter }}\naggregate: {{ by: [syscall] }}\nfilter: {{ comm: {c} }}"
    ));
    workload(&c, "getppid", 321, None);
    let r = s.stop().expect("stops");
    assert_eq!(row_value(&r, "syscall", "getppid"), 321);
}

#[test]
fn pid_filter_counts_only_that_process() {
    let _k = KernelTest::begin();
    let c = comm("pid");
    let w = workload_waiting(&c, "getppid", 400, None);
    let s = start(&format!(
        "probe: {{ tracepoint: syscalls/sys_enter_getppid }}\naggregate: {{ by: [pid] }}\nfilter: {{ pids: [{}] }}",
        w.pid
    ));
    let pid = w.pid;
    w.go();
    workload(&c, "getppid", 50, None);
    let r = s.stop().expect("stops");
    assert_eq!(r.rows.len(), 1);
    assert_eq!(r.rows[0].keys["pid"], pid.to_string());
    assert_eq!(r.rows[0].value, 400);
}

#[test]
fn tracepoint_field_sum_and_histogram() {
    let _k = KernelTest::begin();
    let c = comm("fld");
    let s = start(&format!(
        "probe: {{ tracepoint: syscalls/sys_exit_openat }}\naggregate: {{ value: hist(ret) }}\nfilter: {{ comm: {c} }}"
    ));
    workload(&c, "open", 6, Some("/etc/hostname"));
    let r = s.stop().expect("stops");
    assert_eq!(r.histograms.len(), 1);
    assert_eq!(r.histograms[0].count, 6, "{:?}", r.histograms);
}

#[test]
fn cgroup_filter_counts_only_tasks_of_the_listed_cgroups() {
    let _k = KernelTest::begin();
    let c = comm("cg");
    let dir = fathom_node::engine::render::cgroup2_root()
        .join(format!("fathom-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("cgroup v2 directory");
    let inside = workload_waiting(&c, "getppid", 300, None);
    std::fs::write(dir.join("cgroup.procs"), inside.pid.to_string()).expect("move into cgroup");
    let id = fathom_node::engine::render::cgroup_id(&dir).expect("cgroup id");
    let plan = plan::plan(
        &spec(&format!("probe: {{ tracepoint: syscalls/sys_enter_getppid }}\naggregate: {{ by: [comm, cgroup] }}\nfilter: {{ comm: {c} }}")),
        kernel(),
        Scope::targets([id]),
    )
    .expect("plans");
    let s = Session::start(plan, kernel(), Default::default()).expect("starts");
    assert_eq!(s.link_count(), 1);
    inside.go();
    workload(&c, "getppid", 50, None); // same comm, outside the cgroup: not counted
    let r = s.stop().expect("stops");
    let _ = std::fs::remove_dir(&dir);
    assert_eq!(r.rows.len(), 1, "{:?}", r.rows);
    assert_eq!(r.rows[0].value, 300);
    assert_eq!(
        r.rows[0].keys["cgroup"],
        format!("/fathom-test-{}", std::process::id())
    );
}

/// A job limited to targets none of which runs here must not fall back to the whole node:
/// nothing is loaded or attached, and a workload the probe would see counts nowhere. A
/// node-wide session on the same tracepoint runs alongside as the control that the workload
/// does hit it.
#[test]
fn empty_target_set_attaches_nothing() {
    let _k = KernelTest::begin();
    let c = comm("none");
    let yaml = "probe: { tracepoint: syscalls/sys_enter_getppid }\naggregate: { by: [comm] }";
    let plan = plan::plan(&spec(yaml), kernel(), Scope::targets(Vec::new())).expect("plans");
    assert_eq!(plan.scope, Scope::Nothing);
    assert!(plan.verdict.feasible, "feasibility is still checked");
    let mut nothing = Session::start(plan, kernel(), Default::default()).expect("starts");
    assert_eq!(nothing.link_count(), 0);
    assert!(nothing.attached_probes().is_empty());
    assert_eq!(nothing.plan().scope.to_string(), NOTHING_ATTACHED);
    assert_eq!(
        residue(),
        Residue::default(),
        "bpftool lists no program, link or map of the job"
    );

    let control = start(&format!("{yaml}\nfilter: {{ comm: {c} }}"));
    let control_links = residue().links;
    workload(&c, "getppid", 200, None);
    assert_eq!(
        residue().links,
        control_links,
        "only the control's link is attached"
    );
    let during = nothing.snapshot().expect("reads");
    assert_eq!(during.totals, Default::default(), "no hit counted");
    assert!(during.rows.is_empty() && during.events.is_empty());
    let r = nothing.stop().expect("stops");
    let control = control.stop().expect("stops");
    assert_eq!(
        row_value(&control, "comm", &c),
        200,
        "the workload hit the probe"
    );
    assert_eq!(r.totals.hits, 0);
    assert!(r.rows.is_empty(), "{:?}", r.rows);
}

#[test]
fn wide_keys_beyond_the_packed_layout_use_the_full_key() {
    let _k = KernelTest::begin();
    let c = comm("wide");
    // comm (2 words) + pid|tid + cgroup + syscall = 5 words: more than a packed key holds.
    let s = start(&format!(
        "probe: {{ catalog: syscalls }}\naggregate: {{ by: [comm, pid, tid, cgroup, syscall], top: 500 }}\nfilter: {{ comm: {c} }}"
    ));
    assert_eq!(
        s.plan().config.flags & fathom_common::flags::COMPACT,
        0,
        "this job needs the full key"
    );
    let w = workload_waiting(&c, "getppid", 123, None);
    let pid = w.pid.to_string();
    w.go();
    let r = s.stop().expect("stops");
    let row = r
        .rows
        .iter()
        .find(|row| row.keys["syscall"] == "getppid")
        .expect("getppid row");
    assert_eq!(row.value, 123);
    assert_eq!(row.keys["comm"], c);
    assert_eq!(row.keys["pid"], pid);
    assert_eq!(row.keys["tid"], pid, "single-threaded: tid = pid");
    assert!(row.keys["cgroup"].starts_with('/'), "{:?}", row.keys);
}

/// A TCP counter of /proc/net/snmp (`Tcp:` lines) or /proc/net/netstat (`TcpExt:`).
fn tcp_counter(file: &str, prefix: &str, name: &str) -> u64 {
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{file}: {e}"));
    let mut lines = text.lines().filter(|l| l.starts_with(prefix));
    let (names, values) = (lines.next().expect("header"), lines.next().expect("values"));
    let i = names
        .split_whitespace()
        .position(|n| n == name)
        .unwrap_or_else(|| panic!("{name} in {file}"));
    values
        .split_whitespace()
        .nth(i)
        .expect("value")
        .parse()
        .expect("number")
}

/// A loopback listener with an accept queue of one (backlog 0), and its port.
fn full_listener() -> (std::os::fd::OwnedFd, u16) {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket calls on a new descriptor this function owns; the address
    // structures are initialized before use and sized as the calls expect.
    #[allow(unsafe_code, reason = "listen(2) with a backlog std does not offer")]
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let owned = std::os::fd::OwnedFd::from_raw_fd(fd);
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        addr.sin_family = libc::AF_INET as libc::sa_family_t;
        addr.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        assert_eq!(libc::bind(fd, (&raw const addr).cast(), len), 0, "bind");
        assert_eq!(libc::listen(fd, 0), 0, "listen");
        let mut got: libc::sockaddr_in = std::mem::zeroed();
        let mut got_len = len;
        assert_eq!(
            libc::getsockname(fd, (&raw mut got).cast(), &mut got_len),
            0,
            "getsockname"
        );
        (owned, u16::from_be(got.sin_port))
    }
}

/// `tcp-retransmit` (tcp:tcp_retransmit_skb) on retransmissions the test makes happen: a
/// listener whose accept queue is full drops new SYNs (the kernel counts a ListenOverflow),
/// so a second connect retransmits its SYN after 1 s and again after 3 s. The entry counts
/// them under the listener's address and port, and never more than the kernel's own
/// RetransSegs counter grew meanwhile.
#[test]
fn tcp_retransmit_counts_syn_retransmits_to_a_full_listener() {
    let _k = KernelTest::begin();
    let s = start("probe: { catalog: tcp-retransmit }");
    let (listener, port) = full_listener();
    let first =
        std::net::TcpStream::connect(("127.0.0.1", port)).expect("the first connect is queued");
    let retrans = || tcp_counter("/proc/net/snmp", "Tcp:", "RetransSegs");
    let overflows = || tcp_counter("/proc/net/netstat", "TcpExt:", "ListenOverflows");
    let (retrans_before, overflows_before) = (retrans(), overflows());
    // The second connect: SYN dropped, retransmitted by the kernel's timer.
    let second = std::thread::spawn(move || {
        std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            std::time::Duration::from_millis(3500),
        )
    });
    let outcome = second.join().expect("connect thread");
    let r = s.stop().expect("stops");
    let (retrans_after, overflows_after) = (retrans(), overflows());
    drop((first, listener, outcome));
    assert!(
        overflows_after > overflows_before,
        "the full queue dropped a SYN"
    );
    assert_eq!(r.keys, vec!["daddr", "dport"]);
    let ours: u64 = r
        .rows
        .iter()
        .filter(|row| row.keys["daddr"] == "127.0.0.1" && row.keys["dport"] == port.to_string())
        .map(|row| row.value)
        .sum();
    assert!(ours >= 2, "SYN retransmits at 1 s and 3 s: {:?}", r.rows);
    assert!(
        ours <= retrans_after - retrans_before,
        "{ours} counted, the kernel's RetransSegs grew by {}",
        retrans_after - retrans_before
    );
}

/// `oom-kill` (oom:mark_victim) on an OOM kill the test causes: `dd` with a 64 MiB buffer in
/// a memory cgroup of 16 MiB. The entry reports exactly one victim, with dd's pid, and the
/// kernel's own `oom_kill` counter (/proc/vmstat) grew by at least as much.
#[test]
fn oom_kill_reports_the_victim_of_a_memory_cgroup_over_its_limit() {
    use std::os::unix::process::ExitStatusExt;
    let _k = KernelTest::begin();
    let cg = MemoryCgroup::new(&format!("fathom-oom-{}", std::process::id()), 16 << 20);
    let vmstat = || {
        std::fs::read_to_string("/proc/vmstat")
            .expect("vmstat")
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .expect("oom_kill in /proc/vmstat")
    };
    let s = start("probe: { catalog: oom-kill }\nevents: { last: 100, payload: true }");
    let before = vmstat();
    let hog = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}; exec dd if=/dev/zero of=/dev/null bs=64M count=1",
            cg.procs.display()
        ))
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("the hog starts");
    let pid = hog.id();
    let status = hog.wait_with_output().expect("the hog ends").status;
    let r = s.stop().expect("stops");
    let after = vmstat();
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "the OOM killer killed dd: {status:?}"
    );
    let victims: Vec<_> = r
        .events
        .iter()
        .filter(|e| e.fields.get("victim_pid") == Some(&pid.to_string()))
        .collect();
    assert_eq!(victims.len(), 1, "{:?}", r.events);
    assert!(
        r.events.len() as u64 <= after - before,
        "{} victims reported, the kernel's oom_kill grew by {}",
        r.events.len(),
        after - before
    );
    drop(cg);
}
