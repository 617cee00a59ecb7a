//! libbpf-tools parity: for a tool of Debian's `libbpf-tools`, the Fathom catalog entry that
//! answers the same question runs beside it on the same workload, and both must see exactly
//! the same (where the kernel guarantees an exact count). Needs root and scripts/setup.sh
//! (which installs libbpf-tools). docs/libbpf-tools.md has the table.

mod common;

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::*;

/// A libbpf-tools tool, attached and running.
struct Tool {
    child: Child,
    name: String,
}

/// The bpf links among a process's open files (their fdinfo has `link_type:`).
fn link_fds(pid: u32) -> usize {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return 0;
    };
    dir.flatten()
        .filter(|e| std::fs::read_to_string(e.path()).is_ok_and(|t| t.contains("link_type:")))
        .count()
}

impl Tool {
    /// Starts `/usr/sbin/NAME ARGS` and waits until it has attached: its links are open and
    /// their number has stopped growing (its output is block-buffered into a pipe, so its
    /// banner cannot tell).
    fn start(name: &str, args: &[&str]) -> Tool {
        let child = Command::new(format!("/usr/sbin/{name}"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("{name} runs (scripts/setup.sh installs libbpf-tools): {e}")
            });
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(120);
        let (mut last, mut since) = (0, Instant::now());
        loop {
            let n = link_fds(pid);
            if n != last {
                (last, since) = (n, Instant::now());
            }
            if n > 0 && since.elapsed() > Duration::from_millis(500) {
                break;
            }
            assert!(Instant::now() < deadline, "{name} did not attach in 120 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        Tool {
            child,
            name: name.into(),
        }
    }

    /// Stops it (SIGINT, see [`interrupt`]) and returns what it printed.
    fn stop(self) -> String {
        interrupt(self.child, &self.name)
    }
}

#[test]
fn execsnoop_and_the_exec_entry_see_the_same_executions() {
    let _k = KernelTest::begin();
    let c = comm("pexec");
    let s = start("probe: { catalog: exec }\nevents: { last: 1000, payload: true }");
    let tool = Tool::start("execsnoop", &[]);
    let w = workload_waiting(&c, "exec", 6, None);
    let parent = w.pid.to_string();
    w.go();
    let out = tool.stop();
    let r = s.stop().expect("stops");
    // PCOMM PID PPID RET ARGS (the arguments of `true`, started as argv[0] only, stay empty)
    let tool_count = out
        .lines()
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() >= 4 && f[0] == "true" && f[2] == parent && f[3] == "0"
        })
        .count();
    let fathom_count = r
        .events
        .iter()
        .filter(|e| e.fields["ppid"] == parent && e.fields["filename"] == "/bin/true")
        .count();
    assert_eq!(tool_count, 6, "execsnoop:\n{out}");
    assert_eq!(fathom_count, tool_count, "{:?}", r.events);
}

#[test]
fn opensnoop_and_the_open_entry_see_the_same_opens_and_results() {
    let _k = KernelTest::begin();
    let c = comm("popen");
    let s = start(&format!(
        "probe: {{ catalog: open }}\nfilter: {{ comm: {c} }}\nevents: {{ last: 100, payload: true }}"
    ));
    let tool = Tool::start("opensnoop", &["-n", &c]);
    workload(&c, "open", 7, Some("/etc/hostname"));
    workload(&c, "open", 3, Some("/nonexistent/file"));
    let out = tool.stop();
    let r = s.stop().expect("stops");
    // PID COMM FD ERR PATH
    let tool_rows: Vec<(String, String)> = out
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 5 && f[1] == c).then(|| (f[4].to_string(), f[3].to_string()))
        })
        .collect();
    let fathom_rows: Vec<(String, String)> = r
        .events
        .iter()
        .map(|e| {
            let result: i64 = e.fields["result"].parse().expect("a number");
            let err = if result < 0 { -result } else { 0 };
            (e.fields["filename"].clone(), err.to_string())
        })
        .collect();
    let count = |rows: &[(String, String)], path: &str, err: &str| {
        rows.iter().filter(|(p, e)| p == path && e == err).count()
    };
    for rows in [&tool_rows, &fathom_rows] {
        assert_eq!(
            count(rows, "/etc/hostname", "0"),
            7,
            "{rows:?}\nopensnoop:\n{out}"
        );
        assert_eq!(count(rows, "/nonexistent/file", "2"), 3, "{rows:?}");
    }
    assert_eq!(fathom_rows.len(), tool_rows.len());
}

#[test]
fn syscount_and_the_syscalls_entry_count_the_same_calls_of_a_process() {
    let _k = KernelTest::begin();
    let c = comm("psys");
    let n = 3000;
    let w = workload_waiting(&c, "getppid", n, None);
    let pid = w.pid;
    let s = start(&format!(
        "probe: {{ catalog: syscalls }}\naggregate: {{ by: [syscall], top: 100 }}\nfilter: {{ pids: [{pid}] }}"
    ));
    let tool = Tool::start("syscount", &["-p", &pid.to_string(), "-T", "100"]);
    w.go();
    let out = tool.stop();
    let r = s.stop().expect("stops");
    // SYSCALL COUNT
    let tool_getppid: u64 = out
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 2 && f[0] == "getppid").then(|| f[1].parse().ok())?
        })
        .unwrap_or_else(|| panic!("no getppid row in syscount's output:\n{out}"));
    assert_eq!(tool_getppid, n);
    assert_eq!(
        row_value(&r, "syscall", "getppid"),
        tool_getppid,
        "{:?}",
        r.rows
    );
    // The other calls differ at the edges by design: syscount counts at sys_exit (so the
    // read that waited before either attached, and never exit_group), Fathom at sys_enter.
}

/// The total of a libbpf-tools log2 histogram (`  lo -> hi : count |***|` lines).
fn histogram_total(out: &str) -> u64 {
    out.lines()
        .filter(|l| l.contains("->"))
        .filter_map(|l| {
            l.split(':')
                .nth(1)?
                .split('|')
                .next()?
                .trim()
                .parse::<u64>()
                .ok()
        })
        .sum()
}

#[test]
fn runqlat_and_the_runqlat_entry_time_the_same_wakeups_of_a_process() {
    let _k = KernelTest::begin();
    let c = comm("prq");
    let n = 200;
    let w = workload_waiting(&c, "sleep", n, None);
    let pid = w.pid;
    // Keyed by the task switched in: its wakeups' latencies.
    let s = start("probe: { catalog: runqlat }\naggregate: { by: [next_pid] }");
    let tool = Tool::start("runqlat", &["-p", &pid.to_string()]);
    w.go();
    let out = tool.stop();
    let r = s.stop().expect("stops");
    let h = r
        .histograms
        .iter()
        .find(|h| h.keys.get("next_pid") == Some(&pid.to_string()))
        .unwrap_or_else(|| panic!("no histogram of pid {pid}: {:?}", r.histograms));
    let tool_total = histogram_total(&out);
    // Each of the N sleeps ends in a wakeup and a switch in; a few more (the go byte on
    // stdin, a preemption, which the tool also counts) may add to either.
    for (who, total) in [("fathom", h.count), ("runqlat", tool_total)] {
        assert!(
            (n..=n + n / 10).contains(&total),
            "{who} timed {total} wakeups of {n}:\nrunqlat:\n{out}\nfathom: {h:?}"
        );
    }
    assert!(
        h.count.abs_diff(tool_total) <= n / 10,
        "fathom {} vs runqlat {tool_total}",
        h.count
    );
    // Waiting for a CPU after a 1 ms sleep takes well under a second, on both.
    assert!(
        h.buckets.iter().all(|b| b.count == 0 || b.high <= 1 << 30),
        "{h:?}"
    );
}

#[test]
fn biolatency_and_the_biolatency_entry_time_the_same_synchronous_writes() {
    let _k = KernelTest::begin();
    let dir = std::env::temp_dir().join(format!("fathom-pbio-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let file = dir.join("data");
    let n = 30;
    let s = start("probe: { catalog: biolatency }");
    let tool = Tool::start("biolatency", &[]);
    workload(&comm("pbio"), "write", n, Some(&file.display().to_string()));
    let out = tool.stop();
    let r = s.stop().expect("stops");
    let _ = std::fs::remove_dir_all(&dir);
    let fathom = r.histograms.first().map_or(0, |h| h.count);
    let tool_total = histogram_total(&out);
    // Every fdatasync'd 4 KiB write is at least one request; both count the node's I/O in
    // nested windows (the tool's inside Fathom's), so they agree within the stray I/O of the
    // node around the edges.
    assert!(
        tool_total >= n,
        "biolatency counted {tool_total} of at least {n}:\n{out}"
    );
    assert!(
        fathom >= n,
        "fathom counted {fathom} of at least {n}: {:?}",
        r.totals
    );
    assert!(
        fathom.abs_diff(tool_total) <= fathom.max(tool_total) / 4,
        "fathom {fathom} vs biolatency {tool_total}:\n{out}"
    );
}

/// Begins a kernel test of a tool that attaches kprobes, or, where this kernel offers none,
/// reports the test skipped (the matrix's written skip list names the rows where that is
/// expected) and returns None.
fn begin_with_kprobes(test: &str, tool: &str) -> Option<KernelTest> {
    match offered(Kind::Kprobes) {
        Offer::Available => Some(KernelTest::begin()),
        offer => {
            skipped(
                test,
                &format!("{tool} attaches kprobes, which this kernel does not offer ({offer:?})"),
            );
            None
        }
    }
}

/// The buckets of a log2 histogram, as (low, count) pairs, from `  lo -> hi : count |***|`
/// lines of a libbpf-tools tool.
fn histogram_buckets(out: &str) -> Vec<(u64, u64)> {
    out.lines()
        .filter_map(|l| {
            let (range, rest) = l.split_once(':')?;
            let (lo, _) = range.split_once("->")?;
            let count = rest.split('|').next()?.trim().parse().ok()?;
            Some((lo.trim().parse().ok()?, count))
        })
        .collect()
}

/// Both histograms (the tool's in nanoseconds) count exactly `calls`, and have their fullest
/// buckets within a factor of 4 of each other: the same calls, timed alike.
fn assert_same_latencies(out: &str, h: &fathom_crds::result::Histogram, calls: u64) {
    let tool = histogram_buckets(out);
    let tool_total: u64 = tool.iter().map(|(_, c)| c).sum();
    assert_eq!(tool_total, calls, "the tool's histogram:\n{out}");
    assert_eq!(h.count, calls, "{h:?}");
    let tool_mode = tool
        .iter()
        .max_by_key(|(_, c)| *c)
        .map(|(lo, _)| *lo.max(&1))
        .expect("a bucket");
    let ours = h
        .buckets
        .iter()
        .max_by_key(|b| b.count)
        .map(|b| b.low.max(1))
        .expect("a bucket");
    assert!(
        ours <= tool_mode * 4 && tool_mode <= ours * 4,
        "fathom's most common latency starts at {ours} ns, the tool's at {tool_mode} ns:\n{out}\n{h:?}"
    );
}

/// `funclatency -p PID FUNCTION` and Fathom's `probe` with `value: latency`, both limited to
/// one process that makes `n` calls (workload `mode`, `arg`): both time exactly those calls,
/// alike.
fn compare_funclatency(
    tag: &str,
    (mode, n, arg): (&str, u64, Option<&str>),
    probe: &str,
    function: &str,
) {
    let w = workload_waiting(&comm(tag), mode, n, arg);
    let pid = w.pid.to_string();
    let s = start(&format!(
        "probe: {{ {probe} }}\naggregate: {{ value: latency }}\nfilter: {{ pids: [{pid}] }}"
    ));
    let tool = Tool::start("funclatency", &["-p", &pid, function]);
    w.go();
    let out = tool.stop();
    let r = s.stop().expect("stops");
    assert_eq!(r.histograms.len(), 1, "{:?}", r.histograms);
    assert_same_latencies(&out, &r.histograms[0], n);
}

/// `funclatency -p PID :FUNCTION` (a uprobe on that process's binary, so on every kernel)
/// and Fathom's uretprobe time the same 400 calls of the workload's function.
#[test]
fn funclatency_and_a_uretprobe_latency_time_the_same_user_calls() {
    let _k = KernelTest::begin();
    let bin = workload_path().display().to_string();
    compare_funclatency(
        "pful",
        ("call", 400, None),
        &format!("uretprobe: '{bin}:fathom_target'"),
        ":fathom_target",
    );
}

/// `funclatency -p PID FUNCTION` (kprobes) and Fathom's kretprobe time the same 300 opens of
/// one process.
#[test]
fn funclatency_and_a_kretprobe_latency_time_the_same_kernel_calls() {
    let Some(_k) = begin_with_kprobes(
        "funclatency_and_a_kretprobe_latency_time_the_same_kernel_calls",
        "funclatency FUNCTION",
    ) else {
        return;
    };
    compare_funclatency(
        "pfuk",
        ("open", 300, Some("/etc/hostname")),
        "kretprobe: do_sys_openat2",
        "do_sys_openat2",
    );
}

/// Runs the Fathom job `yaml` and the tool `tool` while process `comm` makes `n` loopback
/// TCP connections to a listener of its own: what the tool printed, the job's result and
/// the listener's port. Two connections of another process and listener come first, so
/// that the measured ones take warm code paths on both sides: under TCG a path's first run
/// is translated, which once put 0.76 ms between two points microseconds apart.
fn connects_under(
    tool: &str,
    yaml: &str,
    comm: &str,
    n: u64,
) -> (String, fathom_crds::result::ResultData, String) {
    let s = start(yaml);
    let tool = Tool::start(tool, &[]);
    workload(&format!("{comm}w"), "connect", 2, None);
    let wout = workload(comm, "connect", n, None);
    let out = tool.stop();
    let r = s.stop().expect("stops");
    let port = wout
        .lines()
        .find_map(|l| l.strip_prefix("port "))
        .expect("port line")
        .to_string();
    (out, r, port)
}

/// `tcpconnect` (kprobes on tcp_v4_connect) and the `tcp-connect` entry (the sock tracepoint)
/// see the same 9 loopback connects of one process, to the same address and port.
#[test]
fn tcpconnect_and_the_tcp_connect_entry_see_the_same_connects() {
    let Some(_k) = begin_with_kprobes(
        "tcpconnect_and_the_tcp_connect_entry_see_the_same_connects",
        "tcpconnect",
    ) else {
        return;
    };
    let c = comm("ptcp");
    let (out, r, port) = connects_under(
        "tcpconnect",
        &format!("probe: {{ catalog: tcp-connect }}\nfilter: {{ comm: {c} }}"),
        &c,
        9,
    );
    // PID COMM IP SADDR DADDR DPORT
    let tool_rows = out
        .lines()
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() == 6 && f[1] == c && f[2] == "4" && f[4] == "127.0.0.1" && f[5] == port
        })
        .count();
    assert_eq!(tool_rows, 9, "tcpconnect:\n{out}");
    assert_eq!(r.rows.len(), 1, "{:?}", r.rows);
    assert_eq!(r.rows[0].keys["daddr"], "127.0.0.1");
    assert_eq!(r.rows[0].keys["dport"], port);
    assert_eq!(r.rows[0].value, tool_rows as u64);
}

/// `oomkill` (a kprobe on oom_kill_process) and the `oom-kill` entry (oom:mark_victim) name
/// the same victim: `dd` with a 64 MiB buffer in a memory cgroup of 16 MiB.
#[test]
fn oomkill_and_the_oom_kill_entry_name_the_same_victim() {
    let Some(_k) = begin_with_kprobes(
        "oomkill_and_the_oom_kill_entry_name_the_same_victim",
        "oomkill",
    ) else {
        return;
    };
    let cg = MemoryCgroup::new(&format!("fathom-poom-{}", std::process::id()), 16 << 20);
    let s = start("probe: { catalog: oom-kill }\nevents: { last: 100, payload: true }");
    let tool = Tool::start("oomkill", &[]);
    let hog = Command::new("/bin/sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}; exec dd if=/dev/zero of=/dev/null bs=64M count=1",
            cg.procs.display()
        ))
        .stderr(Stdio::null())
        .spawn()
        .expect("the hog starts");
    let pid = hog.id().to_string();
    let _ = hog.wait_with_output().expect("the hog ends");
    // The tool prints from its ring buffer when it polls; give it a moment.
    std::thread::sleep(Duration::from_millis(500));
    let out = tool.stop();
    let r = s.stop().expect("stops");
    drop(cg);
    // `... OOM kill of PID 123 ("dd"), ...`
    let tool_victims: Vec<(&str, &str)> = out
        .lines()
        .filter_map(|l| {
            let rest = l.split_once("OOM kill of PID ")?.1;
            let (victim, rest) = rest.split_once(' ')?;
            let comm = rest.split('"').nth(1)?;
            Some((victim, comm))
        })
        .collect();
    assert_eq!(tool_victims, vec![(pid.as_str(), "dd")], "oomkill:\n{out}");
    let ours: Vec<(&str, &str)> = r
        .events
        .iter()
        .filter(|e| e.fields.get("victim_pid") == Some(&pid))
        .map(|e| (e.fields["victim_pid"].as_str(), e.fields["comm"].as_str()))
        .collect();
    assert_eq!(ours, vec![(pid.as_str(), "dd")], "{:?}", r.events);
}

/// `tcplife` (the sock:inet_sock_set_state tracepoint, so on every kernel) and the
/// `tcp-life` entry, one row per connection: the same 5 loopback connections of a process,
/// both ends of each (10 sockets, by local and remote port), each with about the same
/// lifetime: both time from established to closed, their clocks a few microseconds apart
/// (tcplife prints milliseconds to two decimals; a VM's emulation adds jitter, so within
/// 0.25 ms or half).
#[test]
fn tcplife_and_the_tcp_life_entry_time_the_same_connections() {
    let _k = KernelTest::begin();
    let c = comm("plife");
    let (out, r, port) = connects_under(
        "tcplife",
        "probe: { catalog: tcp-life }\naggregate: { by: [sport, daddr, dport], value: sum(lifetime) }",
        &c,
        5,
    );
    // PID COMM LADDR LPORT RADDR RPORT TX_KB RX_KB MS
    let tool_rows: std::collections::BTreeMap<(String, String), f64> = out
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // By ports, not comm: tcplife names the task current at the close, which for an
            // accepted socket closed by the peer's FIN can be ksoftirqd.
            if f.len() != 9 || (f[3] != port && f[5] != port) {
                return None;
            }
            Some(((f[3].to_string(), f[5].to_string()), f[8].parse().ok()?))
        })
        .collect();
    assert_eq!(tool_rows.len(), 10, "tcplife:\n{out}");
    let ours: std::collections::BTreeMap<(String, String), u64> = r
        .rows
        .iter()
        .filter(|row| {
            row.keys["daddr"] == "127.0.0.1"
                && (row.keys["sport"] == port || row.keys["dport"] == port)
        })
        .map(|row| {
            (
                (row.keys["sport"].clone(), row.keys["dport"].clone()),
                row.value,
            )
        })
        .collect();
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        tool_rows.keys().collect::<Vec<_>>(),
        "the same sockets:\n{out}\n{:?}",
        r.rows
    );
    for (socket, ms) in &tool_rows {
        let ours_ms = ours[socket] as f64 / 1000.0;
        assert!(
            (ours_ms - ms).abs() <= 0.25_f64.max(ours_ms.max(*ms) / 2.0),
            "{socket:?}: fathom {ours_ms} ms, tcplife {ms} ms\n{out}"
        );
    }
}
