//! Benchmarks against bpftrace, printed as ratios (DESIGN.md §6): not tests.
//!
//!   cargo bench -p fathom-node --bench overhead            (as root, after scripts/setup.sh)
//!
//! B1: a syscall-heavy loop (N getppid calls) run bare, under Fathom counting syscalls by
//! comm (on the same tracepoint as bpftrace, and with the `syscalls` catalog entry, which
//! uses the raw tracepoint), and under `bpftrace -e 'tracepoint:raw_syscalls:sys_enter { @[comm] = count(); }'`;
//! R = (fathom − bare) / (bpftrace − bare), the share of bpftrace's added cost that Fathom adds.
//! B3/ring buffer: events/s delivered and lost when every getppid is an event.
//! libbpf-tools: the same loops under Debian's `syscount`, `opensnoop` and `funclatency` and
//! under the Fathom jobs that answer their question, as ns per event and R against the tool
//! (docs/libbpf-tools.md). Arguments after `--` pick sections: `-- libbpf_tools`.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use fathom_crds::TraceJobSpec;
use fathom_node::engine::{
    kernel::Kernel,
    plan,
    session::{EngineOptions, Session},
};

const CALLS: u64 = 2_000_000;
const ROUNDS: usize = 7;

fn workload(comm: &str, mode: &str, n: u64) -> Duration {
    let t = Instant::now();
    let out = Command::new(env!("FATHOM_WORKLOAD"))
        .args([comm, mode, &n.to_string()])
        .output()
        .expect("workload runs");
    assert!(out.status.success());
    t.elapsed()
}

/// The fastest round: the run least disturbed by the rest of the machine (these are CPU-bound
/// loops on a 2-core VM where other work comes and goes).
fn fastest(v: Vec<Duration>) -> Duration {
    v.into_iter().min().expect("rounds")
}

fn session(kernel: &Kernel, yaml: &str, opts: EngineOptions) -> Session {
    let spec: TraceJobSpec = serde_yaml::from_str(yaml).expect("spec");
    let plan =
        plan::plan(&spec.validate().expect("valid"), kernel, plan::Scope::Node).expect("feasible");
    Session::start(plan, kernel, opts).expect("starts")
}

struct Bpftrace(std::process::Child);

impl Bpftrace {
    fn start(program: &str) -> Bpftrace {
        let program = format!("BEGIN {{ printf(\"ready\\n\"); }} {program}");
        let mut child = Command::new("bpftrace")
            .args(["-e", &program])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("bpftrace");
        let mut r = BufReader::new(child.stdout.as_mut().expect("stdout"));
        let mut line = String::new();
        while r.read_line(&mut line).expect("read") > 0 && !line.contains("ready") {
            line.clear();
        }
        Bpftrace(child)
    }

    fn stop(mut self) {
        // SAFETY: signalling our own child.
        #[allow(unsafe_code, reason = "kill(2)")]
        unsafe {
            libc::kill(self.0.id() as i32, libc::SIGINT);
        }
        let _ = self.0.wait();
    }
}

/// Runs the workload while polling the session, as `fathom run` does.
fn driven(s: &mut Session, comm: &'static str, n: u64) -> Duration {
    let t = std::thread::spawn(move || workload(comm, "getppid", n));
    while !t.is_finished() {
        s.poll_events(Duration::from_millis(100));
    }
    t.join().expect("workload")
}

fn ratio(ours: Duration, peer: Duration, bare: Duration) -> f64 {
    let o = ours.as_secs_f64() - bare.as_secs_f64();
    let p = peer.as_secs_f64() - bare.as_secs_f64();
    o / p
}

fn b1(kernel: &Kernel) {
    let per = |d: Duration| d.as_nanos() as f64 / CALLS as f64;
    let mut bare = Vec::new();
    let mut ours_tp = Vec::new();
    let mut ours_raw = Vec::new();
    let mut peer = Vec::new();
    for _ in 0..ROUNDS {
        bare.push(workload("benchbare", "getppid", CALLS));

        let mut s = session(
            kernel,
            "probe: { tracepoint: raw_syscalls/sys_enter }\naggregate: { by: [comm] }",
            EngineOptions::default(),
        );
        ours_tp.push(driven(&mut s, "benchtp", CALLS));
        s.stop().expect("stops");

        let mut s = session(
            kernel,
            "probe: { catalog: syscalls }\naggregate: { by: [comm] }",
            EngineOptions::default(),
        );
        ours_raw.push(driven(&mut s, "benchraw", CALLS));
        s.stop().expect("stops");

        let bt = Bpftrace::start("tracepoint:raw_syscalls:sys_enter { @[comm] = count(); }");
        peer.push(workload("benchbt", "getppid", CALLS));
        bt.stop();
    }
    let (bare, tp, raw, bt) = (
        fastest(bare),
        fastest(ours_tp),
        fastest(ours_raw),
        fastest(peer),
    );
    println!(
        "B1 count syscalls by comm, {CALLS} getppid calls, fastest of {ROUNDS} interleaved rounds:"
    );
    println!(
        "  bare                               {:7.1} ns/call",
        per(bare)
    );
    println!(
        "  bpftrace raw_syscalls:sys_enter    {:7.1} ns/call (+{:.1})",
        per(bt),
        per(bt) - per(bare)
    );
    println!(
        "  fathom   raw_syscalls:sys_enter    {:7.1} ns/call (+{:.1})",
        per(tp),
        per(tp) - per(bare)
    );
    println!(
        "  fathom   catalog syscalls (raw tp)  {:7.1} ns/call (+{:.1})",
        per(raw),
        per(raw) - per(bare)
    );
    println!(
        "  R (same tracepoint as bpftrace)    {:.2}   (target ≤ 1.0, stretch ≤ 0.7)",
        ratio(tp, bt, bare)
    );
    println!(
        "  R (catalog syscalls, raw tp)       {:.2}",
        ratio(raw, bt, bare)
    );
}

fn ring_buffer(kernel: &Kernel) {
    let n = 1_000_000;
    let comm = "benchring";
    let mut s = session(
        kernel,
        &format!(
            "probe: {{ tracepoint: syscalls/sys_enter_getppid }}\nfilter: {{ comm: {comm} }}\nevents: {{ last: 1 }}"
        ),
        EngineOptions::default(),
    );
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    let t = std::thread::spawn(move || {
        let e = workload(comm, "getppid", n);
        d.store(true, Ordering::Relaxed);
        e
    });
    let start = Instant::now();
    while !done.load(Ordering::Relaxed) {
        s.poll_events(Duration::from_millis(10));
    }
    let elapsed = t.join().expect("workload");
    s.poll_events(Duration::ZERO);
    let wall = start.elapsed();
    let r = s.stop().expect("stops");
    let t = &r.totals;
    println!("Ring buffer: every getppid an event ({n} calls, 1 MiB buffer, one consumer thread):");
    println!(
        "  {} emitted, {} delivered, {} lost in kernel, {} dropped; {:.0} events/s delivered over {:.2}s (workload {:.2}s)",
        t.events_emitted,
        t.events_delivered,
        t.events_lost,
        t.events_dropped,
        t.events_delivered as f64 / wall.as_secs_f64(),
        wall.as_secs_f64(),
        elapsed.as_secs_f64()
    );
}

/// A libbpf-tools tool, started and attached (its links are open and no more are coming;
/// its banner is block-buffered into the pipe, so it cannot tell).
struct Tool(std::process::Child);

impl Tool {
    fn start(name: &str, args: &[&str]) -> Tool {
        let child = Command::new(format!("/usr/sbin/{name}"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("libbpf-tools (scripts/setup.sh installs them)");
        let links = |pid: u32| {
            std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
                .map(|d| {
                    d.flatten()
                        .filter(|e| {
                            std::fs::read_to_string(e.path())
                                .is_ok_and(|t| t.contains("link_type:"))
                        })
                        .count()
                })
                .unwrap_or(0)
        };
        let mut child = child;
        let deadline = Instant::now() + Duration::from_secs(120);
        let (mut last, mut since) = (0, Instant::now());
        loop {
            let n = links(child.id());
            if n != last {
                (last, since) = (n, Instant::now());
            }
            if n > 0 && since.elapsed() > Duration::from_millis(500) {
                return Tool(child);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{name} did not attach in 120 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(mut self) {
        // SAFETY: signalling our own child.
        #[allow(unsafe_code, reason = "kill(2)")]
        unsafe {
            libc::kill(self.0.id() as i32, libc::SIGINT);
        }
        let _ = self.0.wait();
    }
}

/// Ns per event under the tool and under Fathom (fastest of ROUNDS each), and R.
fn versus(
    kernel: &Kernel,
    title: &str,
    mode: &'static str,
    n: u64,
    tool: (&str, &[&str]),
    yaml: &str,
) {
    let run = move |comm: &'static str| {
        let t = Instant::now();
        let out = Command::new(env!("FATHOM_WORKLOAD"))
            .args([comm, mode, &n.to_string(), "/etc/hostname"])
            .output()
            .expect("workload runs");
        assert!(out.status.success());
        t.elapsed()
    };
    let (mut bare, mut ours, mut theirs) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        bare.push(run("benchvs"));
        let mut s = session(kernel, yaml, EngineOptions::default());
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        let t = std::thread::spawn(move || {
            let e = run("benchvs");
            d.store(true, Ordering::Relaxed);
            e
        });
        while !done.load(Ordering::Relaxed) {
            s.poll_events(Duration::from_millis(10));
        }
        ours.push(t.join().expect("workload"));
        s.stop().expect("stops");
        let tl = Tool::start(tool.0, tool.1);
        theirs.push(run("benchvs"));
        tl.stop();
    }
    let (bare, ours, theirs) = (fastest(bare), fastest(ours), fastest(theirs));
    let per = |d: Duration| d.as_nanos() as f64 / n as f64;
    println!("{title} ({n} events):");
    println!(
        "  bare                               {:7.1} ns/event",
        per(bare)
    );
    println!(
        "  {:<34} {:7.1} ns/event (+{:.1})",
        format!("{} {}", tool.0, tool.1.join(" ")),
        per(theirs),
        per(theirs) - per(bare)
    );
    println!(
        "  {:<34} {:7.1} ns/event (+{:.1})",
        "fathom",
        per(ours),
        per(ours) - per(bare)
    );
    println!(
        "  R (fathom vs {})                 {:.2}",
        tool.0,
        ratio(ours, theirs, bare)
    );
}

fn libbpf_tools(kernel: &Kernel) {
    versus(
        kernel,
        "syscount vs the syscalls entry by syscall, node-wide",
        "getppid",
        CALLS,
        ("syscount", &[]),
        "probe: { catalog: syscalls }\naggregate: { by: [syscall] }",
    );
    versus(
        kernel,
        "opensnoop vs the open entry, every open an event (output to /dev/null)",
        "open",
        200_000,
        ("opensnoop", &["-n", "benchvs"]),
        "probe: { catalog: open }\nfilter: { comm: benchvs }\nevents: { last: 100 }",
    );
    let target = format!("{}:fathom_target", env!("FATHOM_WORKLOAD"));
    versus(
        kernel,
        "funclatency vs a uretprobe latency histogram of a user function (uprobes)",
        "call",
        100_000,
        ("funclatency", &[&target]),
        &format!("probe: {{ uretprobe: '{target}' }}\naggregate: {{ value: latency }}"),
    );
}

fn main() {
    // `cargo bench` passes --bench; other arguments name the sections to run (b1,
    // ring_buffer, libbpf_tools), all of them when none is named.
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let kernel = Kernel::running();
    type Section = (&'static str, fn(&Kernel));
    let sections: [Section; 3] = [
        ("b1", b1),
        ("ring_buffer", ring_buffer),
        ("libbpf_tools", libbpf_tools),
    ];
    for (name, section) in sections {
        if only.is_empty() || only.iter().any(|o| o == name) {
            section(&kernel);
        }
    }
}
