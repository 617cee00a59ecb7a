//! RELIABILITY T1 and T2 against the real kernel: a node runner killed with SIGKILL, then
//! started again. The runner is the daemon library — `Runner` driving an engine built
//! `with_pin_root`, and `Pins` — in a child process: this test binary run again in the child
//! role (the daemon binary itself needs an API server). Kernel truth comes from bpftool and
//! bpffs; counts from a workload of exactly N getppid calls. Needs root.

mod common;

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant, SystemTime},
};

use common::*;
use fathom_crds::assignment::{AssignmentPhase, JobRef, TraceAssignmentSpec};
use fathom_node::{
    daemon::{
        cgroups::CgroupRoot,
        pins::{BPFFS, Pins},
        runner::{Desired, Runner, RunnerOptions},
    },
    engine::{
        kernel::Kernel,
        plan::Scope,
        session::{Applied, Engine, EngineOptions},
    },
};

/// Set in a child: `<pin root>|<assignment uid>|<comm>|<wanted: 1 or 0>`.
const CHILD_ROLE: &str = "FATHOM_RESUME_CHILD";

/// Generous: a busy 2-core host can take seconds to start a runner and load its programs.
const PATIENCE: Duration = Duration::from_secs(60);

/// A node-wide ClusterTraceJob assignment counting getppid calls of one comm.
fn assignment(uid: &str, comm: &str) -> Desired {
    let trace = serde_yaml::from_str(&format!(
        "probe: {{ tracepoint: syscalls/sys_enter_getppid }}\naggregate: {{ by: [comm] }}\nfilter: {{ comm: {comm} }}"
    ))
    .unwrap();
    Desired {
        uid: uid.to_string(),
        name: "getppid-node".into(),
        namespace: "fathom-system".into(),
        deleting: false,
        spec: TraceAssignmentSpec {
            job: JobRef {
                kind: "ClusterTraceJob".into(),
                name: "getppid".into(),
                namespace: None,
                uid: "job-uid".into(),
            },
            run: 1,
            node_name: "node".into(),
            trace,
            node_wide: true,
            target_pods: Vec::new(),
            deadline: None,
            suspend: false,
            policy: None,
        },
    }
}

/// The child role: a runner for `uid` (wanted or not) with pins under the given root.
/// Prints `swept <uids>`, `phase <phase>`, `links <n>`, then `hits <n>` at every report
/// (every 100 ms); on `delete` from stdin, detaches and prints `final <hits>` and exits.
fn run_child(role: &str) -> ! {
    let mut parts = role.split('|');
    let (root, uid, comm, wanted) = (
        PathBuf::from(parts.next().unwrap()),
        parts.next().unwrap().to_string(),
        parts.next().unwrap().to_string(),
        parts.next() == Some("1"),
    );
    let engine = Engine::new(Kernel::running(), EngineOptions::default()).with_pin_root(&root);
    let mut runner = Runner::new(
        RunnerOptions {
            node: "node".into(),
            status_interval: Duration::from_secs(30),
        },
        engine,
        None::<CgroupRoot>,
        Some(Pins::at(&root)),
    );
    let mut desired: Vec<Desired> = if wanted {
        vec![assignment(&uid, &comm)]
    } else {
        Vec::new()
    };
    runner.sync(desired.clone());
    // libtest has printed `test <name> ... ` without a newline: end that line first.
    println!();
    println!("swept {}", runner.sweep_pins().join(","));
    let out = runner.reconcile(SystemTime::now(), false);
    if let Some((_, status)) = out.statuses.last() {
        println!(
            "phase {:?}",
            status.phase.unwrap_or(AssignmentPhase::Pending)
        );
        if let Some(e) = &status.error {
            println!("error {e}");
        }
    }
    let links = runner.probes().session(&uid).map_or(0, |s| s.link_count());
    println!("links {links}");
    let (tx, commands) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    loop {
        match commands.recv_timeout(Duration::from_millis(100)) {
            Ok(c) if c == "delete" => {
                for d in &mut desired {
                    d.deleting = true;
                }
                runner.sync(desired.clone());
                let out = runner.reconcile(SystemTime::now(), false);
                let hits = out
                    .reports
                    .iter()
                    .rev()
                    .find(|r| r.r#final)
                    .and_then(|r| r.counters.as_ref())
                    .map_or(0, |c| c.hits);
                println!("final {hits}");
                std::process::exit(0);
            }
            Ok(_) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let out = runner.reconcile(SystemTime::now(), true);
                for r in out.reports {
                    if let Some(c) = r.counters {
                        println!("hits {}", c.hits);
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => std::process::exit(0),
        }
    }
}

/// A runner in a child process, its stdout read line by line.
struct ChildRunner {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl ChildRunner {
    /// Runs test `test` of this binary in the child role.
    fn spawn(test: &str, root: &Path, uid: &str, comm: &str, wanted: bool) -> ChildRunner {
        let exe = std::env::current_exe().expect("the test binary's path");
        let mut child = Command::new(exe)
            .args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env(
                CHILD_ROLE,
                format!(
                    "{}|{uid}|{comm}|{}",
                    root.display(),
                    if wanted { 1 } else { 0 }
                ),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("the child runner starts");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        ChildRunner {
            stdin: child.stdin.take(),
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The first line (from now on) that `want` accepts; panics after PATIENCE.
    fn wait_for(&mut self, what: &str, want: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if want(&line) {
                        return line;
                    }
                }
                Err(e) => panic!(
                    "the child runner never printed {what} ({e:?}); its last lines: {:?}",
                    &self.seen[self.seen.len().saturating_sub(10)..]
                ),
            }
        }
    }

    fn wait_line(&mut self, exact: &str) {
        self.wait_for(exact, |l| l == exact);
    }

    /// Waits until a report carries exactly `n` hits; panics when one carries more.
    fn wait_hits(&mut self, n: u64) {
        let line = self.wait_for(&format!("hits {n}"), |l| {
            l.strip_prefix("hits ")
                .and_then(|h| h.parse::<u64>().ok())
                .is_some_and(|h| h >= n)
        });
        assert_eq!(
            line,
            format!("hits {n}"),
            "counted more than the workload did"
        );
    }

    fn send(&mut self, command: &str) {
        let stdin = self.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{command}").expect("the child reads commands");
    }

    /// SIGKILL, as a crash or the OOM killer would: no destructor runs.
    fn kill9(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaped");
    }

    fn wait_exit(mut self) {
        let deadline = Instant::now() + PATIENCE;
        while self.child.try_wait().expect("waiting").is_none() {
            assert!(Instant::now() < deadline, "the child runner did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ChildRunner {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A private pin root in bpffs (never the host's `/sys/fs/bpf/fathom`), removed with all it
/// holds when the test ends, passed or failed.
struct PinRoot(PathBuf);

impl PinRoot {
    fn new(tag: &str) -> PinRoot {
        let dir = Path::new(BPFFS).join(format!("fathom-test-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("a directory in bpffs");
        PinRoot(dir)
    }

    /// The record directory of a job: the one `record-…` in its directory.
    fn record(&self, uid: &str) -> PathBuf {
        let records: Vec<PathBuf> = fs::read_dir(self.0.join(uid))
            .expect("the job's pin directory")
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("record-"))
            })
            .collect();
        assert_eq!(records.len(), 1, "one record per job: {records:?}");
        records.into_iter().next().unwrap()
    }
}

impl Drop for PinRoot {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn bpftool(args: &[&str]) -> serde_json::Value {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .expect("bpftool runs (scripts/setup.sh installs it)");
    assert!(out.status.success(), "bpftool {args:?} failed");
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

/// The kernel id of a pinned map.
fn pinned_map_id(path: &Path) -> u64 {
    bpftool(&["map", "show", "pinned", &path.display().to_string()])["id"]
        .as_u64()
        .expect("the pinned map's id")
}

/// The loaded programs that use map `map_id`: the job's programs, whoever loaded them.
fn programs_using(map_id: u64) -> Vec<u64> {
    let progs = bpftool(&["prog", "show"]);
    progs
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| {
            p["map_ids"]
                .as_array()
                .is_some_and(|ids| ids.iter().any(|i| i.as_u64() == Some(map_id)))
        })
        .filter_map(|p| p["id"].as_u64())
        .collect()
}

/// The kernel's links of these programs.
fn links_of(programs: &[u64]) -> usize {
    let links = bpftool(&["link", "show"]);
    links
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| {
            l["prog_id"]
                .as_u64()
                .is_some_and(|id| programs.contains(&id))
        })
        .count()
}

fn map_exists(map_id: u64) -> bool {
    let maps = bpftool(&["map", "show"]);
    maps.as_array()
        .into_iter()
        .flatten()
        .any(|m| m["id"].as_u64() == Some(map_id))
}

/// T1: a runner killed with an attached job, the job deleted while it is down, a runner
/// started again: within 5 s nothing of the job remains — no pins under its uid, none of its
/// programs, links or maps in the kernel.
#[test]
fn t1_crash_with_a_deleted_job_leaves_no_orphans() {
    const TEST: &str = "t1_crash_with_a_deleted_job_leaves_no_orphans";
    if let Ok(role) = std::env::var(CHILD_ROLE) {
        run_child(&role);
    }
    let _k = KernelTest::begin();
    let root = PinRoot::new("t1");
    let uid = format!("7e1a0000-0000-4000-8000-{:012}", std::process::id());
    let c = comm("t1");

    let mut first = ChildRunner::spawn(TEST, &root.0, &uid, &c, true);
    first.wait_line("phase Attached");
    first.wait_line("links 1");
    workload(&c, "getppid", 100, None);
    first.wait_hits(100);
    let counters = pinned_map_id(&root.record(&uid).join("COUNTERS"));
    let programs = programs_using(counters);
    assert_eq!(programs.len(), 1, "the job's program: {programs:?}");
    assert_eq!(links_of(&programs), 1);
    first.kill9();
    assert_eq!(
        links_of(&programs),
        1,
        "the crash leaves the pinned link attached (else this test proves nothing)"
    );

    // The assignment is gone when the runner comes back.
    let restarted = Instant::now();
    let mut second = ChildRunner::spawn(TEST, &root.0, &uid, &c, false);
    second.wait_line(&format!("swept {uid}"));
    loop {
        let pins_gone = !root.0.join(&uid).exists();
        let programs_gone = programs_using(counters).is_empty()
            && links_of(&programs) == 0
            && !bpftool(&["prog", "show"])
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| p["id"].as_u64().is_some_and(|id| programs.contains(&id)));
        let map_gone = !map_exists(counters);
        if pins_gone && programs_gone && map_gone {
            eprintln!(
                "t1: nothing of the job remains {:?} after the restart",
                restarted.elapsed()
            );
            break;
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(5),
            "5 s after the restart the job remains: pins gone {pins_gone}, programs and links gone {programs_gone}, maps gone {map_gone}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    second.wait_line("links 0");
    second.send("quit");
    drop(second);
}

/// T2: a runner killed with an attached job that stays wanted, a runner started again: the
/// job is resumed from its pins — the same program, exactly one link — and a workload of
/// exactly N calls, part of it while no runner ran, is counted exactly N (the pinned link
/// kept the program attached and the pinned maps kept counting).
#[test]
fn t2_crash_with_an_active_job_resumes_without_double_counting() {
    const TEST: &str = "t2_crash_with_an_active_job_resumes_without_double_counting";
    if let Ok(role) = std::env::var(CHILD_ROLE) {
        run_child(&role);
    }
    let _k = KernelTest::begin();
    let root = PinRoot::new("t2");
    let uid = format!("7e2a0000-0000-4000-8000-{:012}", std::process::id());
    let c = comm("t2");
    let (before, during, after) = (1000, 700, 300);

    let mut first = ChildRunner::spawn(TEST, &root.0, &uid, &c, true);
    first.wait_line("phase Attached");
    first.wait_line("links 1");
    workload(&c, "getppid", before, None);
    first.wait_hits(before);
    let record = root.record(&uid);
    let counters = pinned_map_id(&record.join("COUNTERS"));
    let programs = programs_using(counters);
    assert_eq!(programs.len(), 1, "the job's program: {programs:?}");
    assert_eq!(links_of(&programs), 1);
    first.kill9();

    // While no runner runs, the pinned link keeps counting.
    assert_eq!(
        links_of(&programs),
        1,
        "the pinned link outlives the runner"
    );
    workload(&c, "getppid", during, None);

    let mut second = ChildRunner::spawn(TEST, &root.0, &uid, &c, true);
    second.wait_line("swept ");
    second.wait_line("phase Attached");
    second.wait_line("links 1");
    assert_eq!(root.record(&uid), record, "the same record, resumed");
    assert_eq!(
        pinned_map_id(&record.join("COUNTERS")),
        counters,
        "the same maps"
    );
    assert_eq!(
        programs_using(counters),
        programs,
        "no program loaded again"
    );
    assert_eq!(links_of(&programs), 1, "exactly one link: no second attach");
    workload(&c, "getppid", after, None);
    let total = before + during + after;
    second.wait_hits(total);
    // Later reports stay at the total: nothing counted twice.
    second.wait_hits(total);

    second.send("delete");
    let last = second.wait_for("final", |l| l.starts_with("final "));
    assert_eq!(last, format!("final {total}"), "the final report");
    second.wait_exit();
    assert!(!root.0.join(&uid).exists(), "pins removed with the job");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !programs_using(counters).is_empty() || map_exists(counters) {
        assert!(
            Instant::now() < deadline,
            "the job's objects remain after its deletion"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The engine alone, two "processes" in one: an engine dropped without stopping closes every
/// fd it had, as a SIGKILL does. Events written to the pinned ring buffer while no engine ran
/// are read by the resumed session, and nothing is lost.
#[test]
fn t2_a_resumed_session_reads_the_events_the_pinned_ring_buffer_kept() {
    let _k = KernelTest::begin();
    let root = PinRoot::new("t2ev");
    let id = "7e2e0000-events";
    let c = comm("t2ev");
    let job = spec(&format!(
        "probe: {{ catalog: open }}\naggregate: {{ by: [comm] }}\nfilter: {{ comm: {c} }}\nevents: {{ last: 1000 }}"
    ));
    let engine = || Engine::new(Kernel::running(), EngineOptions::default()).with_pin_root(&root.0);

    let mut first = engine();
    assert_eq!(
        first.apply(id, &job, Scope::Node).unwrap(),
        Applied::Started
    );
    workload(&c, "open", 10, Some("/etc/hostname"));
    let r = first.snapshot(id).unwrap().unwrap();
    assert_eq!((r.totals.hits, r.totals.events_delivered), (10, 10));
    let links = first.session(id).unwrap().link_count();
    drop(first);

    workload(&c, "open", 20, Some("/etc/hostname"));
    let mut second = engine();
    assert_eq!(
        second.apply(id, &job, Scope::Node).unwrap(),
        Applied::Resumed
    );
    assert_eq!(
        second.session(id).unwrap().link_count(),
        links,
        "the same links, reopened"
    );
    workload(&c, "open", 5, Some("/etc/hostname"));
    let r = second.detach(id).unwrap().expect("a final result");
    assert_eq!(
        r.totals.hits, 35,
        "every open, before, during and after the downtime"
    );
    assert_eq!(r.totals.events_emitted, 35);
    assert_eq!(
        (r.totals.events_delivered, r.totals.events_lost),
        (25, 0),
        "the downtime's events were kept in the pinned ring buffer"
    );
    assert_eq!(r.events.len(), 25);
    assert!(!root.0.join(id).exists(), "detach removes the pins");
}

/// A spec changed while no engine ran: the pins of the old spec are removed (which detaches
/// them) and the new spec starts afresh, its counts from zero — never the old maps read
/// with the new layout.
#[test]
fn t2_a_spec_changed_during_the_downtime_starts_afresh() {
    let _k = KernelTest::begin();
    let root = PinRoot::new("t2spec");
    let id = "7e2c0000-spec";
    let c = comm("t2sp");
    let old = spec(&format!(
        "probe: {{ tracepoint: syscalls/sys_enter_getppid }}\naggregate: {{ by: [comm] }}\nfilter: {{ comm: {c} }}"
    ));
    let new = spec(&format!(
        "probe: {{ tracepoint: syscalls/sys_enter_getppid }}\naggregate: {{ by: [comm, pid] }}\nfilter: {{ comm: {c} }}"
    ));
    let engine = || Engine::new(Kernel::running(), EngineOptions::default()).with_pin_root(&root.0);

    let mut first = engine();
    first.apply(id, &old, Scope::Node).unwrap();
    workload(&c, "getppid", 100, None);
    let old_record = root.record(id);
    let old_counters = pinned_map_id(&old_record.join("COUNTERS"));
    let old_programs = programs_using(old_counters);
    drop(first);
    assert_eq!(links_of(&old_programs), 1, "still attached by its pin");

    let mut second = engine();
    assert_eq!(
        second.apply(id, &new, Scope::Node).unwrap(),
        Applied::Started
    );
    assert_ne!(root.record(id), old_record, "one record, the new spec's");
    assert!(!old_record.exists());
    let deadline = Instant::now() + Duration::from_secs(5);
    while !programs_using(old_counters).is_empty() || map_exists(old_counters) {
        assert!(Instant::now() < deadline, "the old spec's objects remain");
        std::thread::sleep(Duration::from_millis(50));
    }
    workload(&c, "getppid", 30, None);
    let r = second.detach(id).unwrap().expect("a final result");
    assert_eq!(r.totals.hits, 30, "counts of the new spec only");
}
