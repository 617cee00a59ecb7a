//! Shared helpers of the kernel tests: they really load and attach programs (run as root),
//! drive the C workload, compare with bpftrace, and sweep for residue before and after.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::{
    io::{BufRead, BufReader, Write},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use fathom_crds::{CheckedSpec, TraceJobSpec, result::ResultData};
use fathom_node::{
    EngineError,
    engine::{
        kernel::Kernel,
        plan,
        session::{EngineOptions, Session},
    },
};

static KERNEL_LOCK: Mutex<()> = Mutex::new(());

/// Kernel tests of one binary run one at a time: the residue sweep looks at the whole kernel.
/// Each test holds the guard, which sweeps for residue when taken and when dropped.
pub struct KernelTest {
    _guard: MutexGuard<'static, ()>,
}

impl KernelTest {
    pub fn begin() -> KernelTest {
        let guard = KERNEL_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        assert_no_residue("before the test");
        KernelTest { _guard: guard }
    }
}

impl Drop for KernelTest {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            assert_no_residue("after the test");
        }
    }
}

/// Fathom's objects in the kernel: programs named fathom_*, their links, and maps of the
/// names our object uses.
#[derive(Debug, Default, PartialEq, Eq, Clone, Copy)]
pub struct Residue {
    pub programs: usize,
    pub links: usize,
    pub maps: usize,
    pub pins: usize,
}

fn bpftool(what: &str) -> Vec<serde_json::Value> {
    let out = Command::new("bpftool")
        .args(["-j", what, "show"])
        .output()
        .expect("bpftool runs (scripts/setup.sh installs it)");
    assert!(out.status.success(), "bpftool {what} show failed");
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

const OUR_MAPS: &[&str] = &[
    "AGG",
    "AGG_SMALL",
    "AGG_TINY",
    "COUNTERS",
    "EVENTS",
    "STACKS",
    "STASH",
    "RATE",
    "PIDS",
    "CGROUPS",
    "NET_AGG",
];

pub fn residue() -> Residue {
    let progs = bpftool("prog");
    let ids: Vec<u64> = progs
        .iter()
        .filter(|p| p["name"].as_str().is_some_and(|n| n.starts_with("fathom_")))
        .filter_map(|p| p["id"].as_u64())
        .collect();
    let links = bpftool("link")
        .iter()
        .filter(|l| l["prog_id"].as_u64().is_some_and(|id| ids.contains(&id)))
        .count();
    let maps = bpftool("map")
        .iter()
        .filter(|m| m["name"].as_str().is_some_and(|n| OUR_MAPS.contains(&n)))
        .count();
    let pins = std::fs::read_dir("/sys/fs/bpf/fathom")
        .map(|d| d.count())
        .unwrap_or(0);
    Residue {
        programs: ids.len(),
        links,
        maps,
        pins,
    }
}

pub fn assert_no_residue(when: &str) {
    // The kernel frees maps shortly after their last reference goes; give it a moment.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let r = residue();
        if r == Residue::default() {
            return;
        }
        if Instant::now() > deadline {
            panic!("Fathom objects remain in the kernel {when}: {r:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn spec(yaml: &str) -> CheckedSpec {
    let s: TraceJobSpec = serde_yaml::from_str(yaml).expect("test spec parses");
    s.validate().expect("test spec is valid")
}

/// Plans and starts a job on the running kernel, node-wide.
pub fn start(yaml: &str) -> Session {
    start_with(yaml, EngineOptions::default()).expect("job starts")
}

/// The running kernel, probed once per test binary (BTF and kallsyms are parsed lazily and
/// kept), as a long-lived runner would.
pub fn kernel() -> &'static Kernel {
    static KERNEL: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
    KERNEL.get_or_init(Kernel::running)
}

pub fn start_with(yaml: &str, opts: EngineOptions) -> Result<Session, EngineError> {
    let plan = plan::plan(&spec(yaml), kernel(), plan::Scope::Node)?;
    Session::start(plan, kernel(), opts)
}

/// Plans and starts a job, returning the error it fails with.
pub fn start_err(yaml: &str) -> EngineError {
    match start_with(yaml, EngineOptions::default()) {
        Ok(_) => panic!("job should not start: {yaml}"),
        Err(e) => e,
    }
}

pub fn workload_path() -> PathBuf {
    PathBuf::from(env!("FATHOM_WORKLOAD"))
}

/// Runs the workload to completion: `workload COMM MODE N [ARG]`.
pub fn workload(comm: &str, mode: &str, n: u64, arg: Option<&str>) -> String {
    let mut cmd = Command::new(workload_path());
    cmd.args([comm, mode, &n.to_string()]);
    if let Some(a) = arg {
        cmd.arg(a);
    }
    let out = cmd.output().expect("workload runs");
    assert!(
        out.status.success(),
        "workload {mode} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A workload started but waiting for a byte on stdin; its pid is known before it works.
pub struct Waiting {
    child: Child,
    pub pid: u32,
}

pub fn workload_waiting(comm: &str, mode: &str, n: u64, arg: Option<&str>) -> Waiting {
    let mut cmd = Command::new(workload_path());
    cmd.args([comm, mode, &n.to_string()]);
    if let Some(a) = arg {
        cmd.arg(a);
    }
    let mut child = cmd
        .env("FATHOM_WL_WAIT", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("workload starts");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("stdout"))
        .read_line(&mut line)
        .expect("ready line");
    let pid = line
        .trim()
        .strip_prefix("ready ")
        .and_then(|p| p.parse().ok())
        .expect("ready PID");
    Waiting { child, pid }
}

impl Waiting {
    /// Lets it work, and waits until it is done.
    pub fn go(self) {
        let mut child = self.release();
        let status = child.wait().expect("workload ends");
        assert!(status.success());
    }

    /// Lets it work in the background; it is killed when the returned guard drops.
    pub fn go_background(self) -> Running {
        Running(self.release())
    }

    fn release(mut self) -> Child {
        self.child
            .stdin
            .as_mut()
            .expect("stdin")
            .write_all(b"g")
            .expect("go");
        self.child
    }
}

/// A workload working in the background, killed on drop.
pub struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// bpftrace, attached and waiting: the oracle for counts.
pub struct Bpftrace {
    child: Child,
}

impl Bpftrace {
    /// Starts `bpftrace -f json -e PROGRAM` and waits until it has attached: its BEGIN
    /// probe runs only after every other probe is attached ("Attaching N probes" comes
    /// before, and a workload started then races the attachment).
    pub fn start(program: &str) -> Bpftrace {
        let program = format!("BEGIN {{ printf(\"fathom-ready\\n\"); }} {program}");
        let mut child = Command::new("bpftrace")
            .args(["-f", "json", "-e", &program])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("bpftrace runs (scripts/setup.sh installs it)");
        let stdout = child.stdout.as_mut().expect("stdout");
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        loop {
            line.clear();
            let n = reader.read_line(&mut line).expect("bpftrace output");
            assert!(n > 0, "bpftrace exited before attaching: {program}");
            if line.contains("fathom-ready") {
                break;
            }
        }
        Bpftrace { child }
    }

    /// Stops bpftrace ([`interrupt`]) and returns its maps as JSON objects.
    pub fn stop(self) -> Vec<serde_json::Value> {
        let out = interrupt(self.child, "bpftrace");
        out.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["type"] == "map")
            .collect()
    }

    /// Stops bpftrace and returns the value of scalar map `@name`.
    pub fn stop_count(self, name: &str) -> u64 {
        let maps = self.stop();
        maps.iter()
            .find_map(|m| m["data"][name].as_u64())
            .unwrap_or(0)
    }
}

/// Stops a child that ends on SIGINT and returns what it printed. A SIGINT it misses (one
/// can arrive between its polls and be lost) is sent again each second; one it ignores for a
/// minute fails the test instead of hanging it.
pub fn interrupt(mut child: Child, name: &str) -> String {
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut out);
        out
    });
    let pid = child.id() as i32;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut next_signal = Instant::now();
    while child.try_wait().expect("child status").is_none() {
        if Instant::now() >= next_signal {
            // SAFETY: sending a signal to our own child, which has not been reaped.
            #[allow(unsafe_code, reason = "kill(2) to stop the child")]
            unsafe {
                libc::kill(pid, libc::SIGINT);
            }
            next_signal = Instant::now() + Duration::from_secs(1);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{name} ignored SIGINT for 60 s; killed it");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    reader.join().expect("child output")
}

/// The value of the row whose keys include `key=value`.
pub fn row_value(r: &ResultData, key: &str, value: &str) -> u64 {
    r.rows
        .iter()
        .filter(|row| row.keys.get(key).map(String::as_str) == Some(value))
        .map(|row| row.value)
        .sum()
}

/// A comm unique to this test run (15 bytes at most).
pub fn comm(tag: &str) -> String {
    let mut c = format!("fw{}{tag}", std::process::id() % 10000);
    c.truncate(15);
    c
}

/// Runs `work` on a thread while polling the session, as `fathom run` does (user-stack
/// processes are remembered while they live).
pub fn drive(s: &mut Session, work: impl FnOnce() + Send + 'static) {
    let t = std::thread::spawn(work);
    while !t.is_finished() {
        s.poll_events(Duration::from_millis(50));
    }
    t.join().expect("workload thread");
}

/// An attach kind's state on the kernel under test, as the matrix declares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offer {
    Available,
    /// kprobes: CONFIG_KPROBES is not set.
    Absent,
    /// fentry/fexit/LSM: the kernel refuses BPF trampolines (EPERM on load).
    Refused,
    /// LSM: BPF LSM is built in but not in the active `lsm=` list.
    Disabled,
}

#[derive(Clone, Copy, Debug)]
pub enum Kind {
    Kprobes,
    Fentry,
    Lsm,
}

impl Kind {
    pub fn key(self) -> &'static str {
        match self {
            Kind::Kprobes => "kprobes",
            Kind::Fentry => "fentry",
            Kind::Lsm => "lsm",
        }
    }
}

/// The declared state of `kind`. A test without a declaration fails: it cannot tell a
/// refusal it should check from a bug, and a test that cannot run must not pass.
pub fn offered(kind: Kind) -> Offer {
    let Ok(expect) = std::env::var("FATHOM_KERNEL_EXPECT") else {
        panic!(
            "FATHOM_KERNEL_EXPECT is unset, so what this kernel offers is unknown: run the kernel tests through scripts/kernel-matrix.sh (it sets it per kernel, and probes the host's), or set it (docs/kernel-matrix.md)"
        );
    };
    let expect = expect.trim();
    if expect == "full" {
        return Offer::Available;
    }
    let value = expect
        .split(',')
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == kind.key())
        .map(|(_, v)| v.trim())
        .unwrap_or_else(|| {
            panic!(
                "FATHOM_KERNEL_EXPECT={expect:?} does not declare {}; see docs/kernel-matrix.md",
                kind.key()
            )
        });
    match value {
        "available" => Offer::Available,
        "absent" => Offer::Absent,
        "refused" => Offer::Refused,
        "disabled" => Offer::Disabled,
        other => panic!(
            "FATHOM_KERNEL_EXPECT: {}={other} is not one of available, absent, refused, disabled",
            kind.key()
        ),
    }
}

/// Reports `test` skipped, with the reason, to the kernel matrix: a `fathom-skip:` line written
/// past libtest's output capture. A skip fails its row unless the matrix's written skip list
/// (`MAY_SKIP` in scripts/kernel-matrix.sh) has it for that row.
pub fn skipped(test: &str, why: &str) {
    use std::io::Write as _;
    let mut err = std::io::stderr().lock();
    let _ = write!(err, "\nfathom-skip: {test}: {why}\n");
    let _ = err.flush();
}

/// A memory cgroup limited to `limit` bytes for the test (cgroup v2 where the memory
/// controller is there, else v1's memory hierarchy), removed on drop; `procs` is the file a
/// process writes its pid to, to join it.
pub struct MemoryCgroup {
    dir: std::path::PathBuf,
    pub procs: std::path::PathBuf,
}

impl MemoryCgroup {
    pub fn new(name: &str, limit: u64) -> MemoryCgroup {
        let v1 = std::path::Path::new("/sys/fs/cgroup/memory");
        let (dir, limit_file, procs) = if v1.join("memory.limit_in_bytes").exists() {
            let dir = v1.join(name);
            (
                dir.clone(),
                dir.join("memory.limit_in_bytes"),
                dir.join("cgroup.procs"),
            )
        } else {
            let root = std::path::Path::new("/sys/fs/cgroup");
            std::fs::write(root.join("cgroup.subtree_control"), "+memory")
                .expect("enable the memory controller (cgroup v2)");
            let dir = root.join(name);
            (
                dir.clone(),
                dir.join("memory.max"),
                dir.join("cgroup.procs"),
            )
        };
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        std::fs::write(&limit_file, limit.to_string())
            .unwrap_or_else(|e| panic!("{}: {e}", limit_file.display()));
        let swap = dir.join("memory.swap.max");
        if swap.exists() {
            std::fs::write(&swap, "0").expect("no swap for the cgroup");
        }
        MemoryCgroup { dir, procs }
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}
