//! The engine: load the vetted kernel programs with a plan's configuration, attach them all
//! or none, read their maps and ring buffer, detach synchronously.
//!
//! One [`Session`] is one job on one machine; `fathom run`, the node runner and the tests all
//! drive it the same way.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    fs,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        HashMap as BpfHashMap, Map, MapData, PerCpuArray, PerCpuHashMap, RingBuf, StackTraceMap,
    },
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, FEntry, FExit, KProbe, Lsm, PerfEvent,
        ProgramError, ProgramInfo, RawTracePoint, SchedClassifier, SockOps, TcAttachType,
        TracePoint, UProbe, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent},
        uprobe::{UProbeAttachLocation, UProbeScope},
    },
    sys::SyscallError,
    util::online_cpus,
};
use fathom_common::{AggKey, AggValue, Event, compact, counter, names};
use fathom_crds::{
    CheckedSpec,
    result::{Budget, EventRecord, ResultData, Totals},
    spec::MAX_MAP_ENTRIES,
    verdict::{ProbeVerdict, Reason, Verdict},
};

use crate::engine::{
    error::EngineError,
    kernel::Kernel,
    plan::{AttachPoint, JobPlan, Scope, UprobeTarget},
    render::{CgroupLabels, Cgroups, Renderer, StackFrames},
    stats::RunTimeSampler,
    symbols::Symbols,
};

/// The kernel programs, built by build.rs from `node-ebpf` and embedded: the only bytecode
/// the engine ever loads.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/fathom"));

/// Sizes that are engine policy rather than job spec.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Ring-buffer bytes for event jobs (a power of two, at least a page).
    pub ringbuf_bytes: u32,
    pub stack_entries: u32,
    pub stash_entries: u32,
    /// Bytes of verifier log kept in an error.
    pub verifier_log_budget: usize,
    /// The node name reported in the `node` key.
    pub node: String,
    /// Share of each second the kernel's run-time statistics are on (see [`RunTimeSampler`]).
    pub stats_duty: f64,
    /// Locked kernel memory all jobs of an [`Engine`] may use together, by their
    /// [`memlock_budget`]: a job that does not fit is refused with the reason, never started.
    pub node_memory_budget: u64,
    /// The CPU budget (percent of one CPU) of a job of an [`Engine`] that sets no
    /// `limits.cpuPercent`; `None`: such a job has none.
    pub default_cpu_percent: Option<u32>,
    /// Probe CPU (percent of one CPU) the jobs of an [`Engine`] may reserve together, each
    /// by its CPU budget: a job that does not fit is refused with the reason, never started.
    pub node_cpu_percent: u32,
}

/// [`EngineOptions::node_memory_budget`] by default: 512 MiB.
pub const DEFAULT_NODE_MEMORY_BUDGET: u64 = 512 << 20;
/// The node runner's CPU budget of a job without `limits.cpuPercent`: 10 % of one CPU.
pub const DEFAULT_JOB_CPU_PERCENT: u32 = 10;
/// [`EngineOptions::node_cpu_percent`] by default: one CPU's worth for all jobs together.
pub const DEFAULT_NODE_CPU_PERCENT: u32 = 100;

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            ringbuf_bytes: 1 << 20,
            stack_entries: 4096,
            stash_entries: 16384,
            verifier_log_budget: 4096,
            node: hostname(),
            stats_duty: 0.1,
            node_memory_budget: DEFAULT_NODE_MEMORY_BUDGET,
            default_cpu_percent: None,
            node_cpu_percent: DEFAULT_NODE_CPU_PERCENT,
        }
    }
}

/// This machine's name.
pub fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// `plan` refused for the node's budget (memory or CPU), with `message`.
fn over_node_budget(plan: &JobPlan, message: String) -> EngineError {
    EngineError::NotFeasible(Verdict {
        feasible: false,
        probes: vec![ProbeVerdict {
            probe: plan.label.clone(),
            feasible: false,
            reason: Some(Reason::NodeBudget),
            message,
        }],
    })
}

/// Counters of the kernel programs, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub hits: u64,
    pub map_full: u64,
    pub ringbuf_lost: u64,
    pub rate_limited: u64,
    pub stack_errors: u64,
    pub stash_misses: u64,
    pub events_emitted: u64,
    pub filtered: u64,
}

/// The open connections a sock_ops `lifetime` job remembers (as many as a pairing job's
/// stash); one entry for every other job.
fn life_entries(plan: &JobPlan, opts: &EngineOptions) -> u32 {
    match plan.net {
        Some(n) if n.sock_event == fathom_common::net::sock::LIFETIME => opts.stash_entries,
        _ => 1,
    }
}

/// An upper bound of the locked kernel memory a job may use with these options: what the
/// maps' sizes allow, with room for the kernel's per-element overhead (RELIABILITY E6).
pub fn memlock_budget(plan: &JobPlan, opts: &EngineOptions) -> u64 {
    if !plan.scope.attaches() {
        return 0;
    }
    // Per-CPU maps hold a value for every possible CPU, online or not.
    let cpus = aya::util::nr_cpus().map(|n| n as u64).unwrap_or(1).max(1);
    let entries = u64::from(plan.map_entries.clamp(1, MAX_MAP_ENTRIES));
    let agg = entries * (64 + 64 + 16 * cpus) * 2;
    let stacks =
        if plan.config.key_mask & (fathom_common::key::KSTACK | fathom_common::key::USTACK) != 0 {
            u64::from(opts.stack_entries) * (8 * 127 + 64) * 2
        } else {
            4096
        };
    let ring = if plan.events.is_some() {
        u64::from(opts.ringbuf_bytes.max(4096).next_power_of_two()) * 2 + 65536
    } else {
        4096 * 4
    };
    let stash = u64::from(opts.stash_entries) * (8 + 16 + 64) * 2;
    // The connections a `lifetime` job remembers: a socket cookie and a start time.
    let lives = u64::from(life_entries(plan, opts)) * (8 + 8 + 64) * 2;
    let small = 256 * 1024;
    let programs = plan.attachments.len() as u64 * 64 * 1024;
    agg + stacks + ring + stash + lives + small + programs
}

/// What `Engine::apply` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The job was not running; it is now.
    Started,
    /// The same spec was already running: nothing changed.
    Unchanged,
    /// The spec changed: the old probes were detached and the new ones attached.
    Restarted,
    /// The job was not running in this process but its pins were (a restarted runner): the
    /// pinned links and maps were reopened, nothing was loaded or attached anew, and the
    /// counts continue from what the kernel kept counting.
    Resumed,
}

/// The jobs of one machine by id (an assignment's uid, or a file name): applying the same
/// job again changes nothing, detaching an absent job succeeds (RELIABILITY E1).
pub struct Engine {
    kernel: Kernel,
    opts: EngineOptions,
    jobs: BTreeMap<String, (CheckedSpec, Scope, Session)>,
    /// Where sessions pin their links and maps, one directory per job id; `None`: nothing is
    /// pinned and everything dies with the process (`fathom run`).
    pin_root: Option<PathBuf>,
}

impl Engine {
    /// The options the engine was made with.
    pub fn options(&self) -> &EngineOptions {
        &self.opts
    }

    pub fn new(kernel: Kernel, opts: EngineOptions) -> Engine {
        Engine {
            kernel,
            opts,
            jobs: Default::default(),
            pin_root: None,
        }
    }

    /// Pins every job's links and maps under `root/<id>/` (see [`Session::start_pinned`]), so
    /// that the probes keep counting when this process dies and a new engine with the same
    /// root resumes them instead of attaching twice (RELIABILITY T2).
    pub fn with_pin_root(mut self, root: impl Into<PathBuf>) -> Engine {
        self.pin_root = Some(root.into());
        self
    }

    pub fn kernel(&self) -> &Kernel {
        &self.kernel
    }

    /// Makes job `id` run `spec` limited to `scope`; a changed scope restarts it like a
    /// changed spec.
    pub fn apply(
        &mut self,
        id: &str,
        spec: &CheckedSpec,
        scope: Scope,
    ) -> Result<Applied, EngineError> {
        let restarted = match self.jobs.get(id) {
            Some((running, running_scope, _)) if running == spec && *running_scope == scope => {
                return Ok(Applied::Unchanged);
            }
            Some(_) => {
                self.detach(id)?;
                true
            }
            None => false,
        };
        let mut plan = crate::engine::plan::plan(spec, &self.kernel, scope.clone())?;
        if plan.cpu_percent.is_none() {
            plan.cpu_percent = self.opts.default_cpu_percent;
        }
        self.check_node_budget(id, &plan)?;
        let (session, resumed) = match &self.pin_root {
            Some(root) => {
                let dir = job_pin_dir(root, id)?;
                let record = pin_record(spec, &scope, &self.opts);
                Session::start_pinned(plan, &self.kernel, self.opts.clone(), &dir, &record)?
            }
            None => (
                Session::start(plan, &self.kernel, self.opts.clone())?,
                false,
            ),
        };
        self.jobs
            .insert(id.to_string(), (spec.clone(), scope, session));
        Ok(if restarted {
            Applied::Restarted
        } else if resumed {
            Applied::Resumed
        } else {
            Applied::Started
        })
    }

    /// The CPU budget (percent of one CPU) job `id` runs with: its `limits.cpuPercent`, else
    /// [`EngineOptions::default_cpu_percent`]; `None` when it has none or is not running.
    pub fn cpu_limit(&self, id: &str) -> Option<u32> {
        self.jobs.get(id).and_then(|(_, _, s)| s.plan().cpu_percent)
    }

    /// The plans of the running jobs but `id`.
    fn other_plans<'a>(&'a self, id: &'a str) -> impl Iterator<Item = &'a JobPlan> + 'a {
        self.jobs
            .iter()
            .filter(move |(other, _)| other.as_str() != id)
            .map(|(_, (_, _, s))| s.plan())
    }

    /// Refuses `plan` (for job `id`) when it does not fit the node's memory budget or CPU
    /// budget beside the other running jobs.
    fn check_node_budget(&self, id: &str, plan: &JobPlan) -> Result<(), EngineError> {
        self.check_node_memory(id, plan)?;
        self.check_node_cpu(id, plan)
    }

    /// Refuses `plan` when its CPU budget and those of the other running jobs add up to more
    /// than [`EngineOptions::node_cpu_percent`]. A job without a budget reserves nothing.
    fn check_node_cpu(&self, id: &str, plan: &JobPlan) -> Result<(), EngineError> {
        let Some(need) = plan.cpu_percent else {
            return Ok(());
        };
        let others: Vec<u32> = self.other_plans(id).filter_map(|p| p.cpu_percent).collect();
        let taken: u32 = others.iter().sum();
        let budget = self.opts.node_cpu_percent;
        if taken.saturating_add(need) <= budget {
            return Ok(());
        }
        Err(over_node_budget(
            plan,
            format!(
                "this job's probes may use {need}% of a CPU (limits.cpuPercent, or the runner's default) and the node's CPU budget for all jobs is {budget}%, {taken}% of it reserved by {} running job(s); lower limits.cpuPercent, or wait for other jobs to end (the runner's --node-cpu-budget sets the budget)",
                others.len(),
            ),
        ))
    }

    /// Refuses `plan` when it does not fit the node's memory budget beside the other running
    /// jobs.
    fn check_node_memory(&self, id: &str, plan: &JobPlan) -> Result<(), EngineError> {
        let need = memlock_budget(plan, &self.opts);
        let others: Vec<u64> = self
            .other_plans(id)
            .map(|p| memlock_budget(p, &self.opts))
            .collect();
        let taken: u64 = others.iter().sum();
        let budget = self.opts.node_memory_budget;
        if taken.saturating_add(need) <= budget {
            return Ok(());
        }
        let mib = |b: u64| b.div_ceil(1 << 20);
        Err(over_node_budget(
            plan,
            format!(
                "this job may lock up to {} MiB of kernel memory (maps of {} entries, per-CPU values for {} possible CPUs) and the node's budget for all jobs is {} MiB, {} MiB of it taken by {} running job(s); lower limits.mapEntries, or wait for other jobs to end (the runner's --node-memory-budget sets the budget)",
                mib(need),
                plan.map_entries,
                aya::util::nr_cpus().unwrap_or(1),
                mib(budget),
                mib(taken),
                others.len(),
            ),
        ))
    }

    /// Detaches job `id` and returns its final result; `None` when it was not running.
    pub fn detach(&mut self, id: &str) -> Result<Option<ResultData>, EngineError> {
        match self.jobs.remove(id) {
            Some((_, _, session)) => session.stop().map(Some),
            None => Ok(None),
        }
    }

    /// The result so far of job `id`.
    pub fn snapshot(&mut self, id: &str) -> Option<Result<ResultData, EngineError>> {
        self.jobs.get_mut(id).map(|(_, _, s)| s.snapshot())
    }

    /// Names the target containers' cgroups of job `id` (namespace, pod, container), so its
    /// keys show names instead of ids; a no-op when `id` is not running.
    pub fn label_cgroups(&mut self, id: &str, labels: HashMap<u64, CgroupLabels>) {
        if let Some((_, _, s)) = self.jobs.get_mut(id) {
            s.cgroups.set_labels(labels);
        }
    }

    /// Takes up to `max` of job `id`'s live events (oldest first) and how many the live
    /// queue dropped so far; `None` when `id` is not running.
    pub fn take_events(&mut self, id: &str, max: usize) -> Option<(Vec<EventRecord>, u64)> {
        self.jobs.get_mut(id).map(|(_, _, s)| s.take_events(max))
    }

    /// The running session of job `id`.
    pub fn session(&self, id: &str) -> Option<&Session> {
        self.jobs.get(id).map(|(_, _, s)| s)
    }

    /// The ids of the running jobs.
    pub fn ids(&self) -> Vec<String> {
        self.jobs.keys().cloned().collect()
    }
}

/// Live events kept per session for [`Session::take_events`] (the node runner streams them);
/// older ones are dropped and counted.
pub const LIVE_EVENTS: usize = 8192;

/// A running job: programs loaded and attached — or, for a plan whose scope is
/// [`Scope::Nothing`], nothing in the kernel at all and a result that stays empty.
pub struct Session {
    /// The job's maps and programs; `None` when the scope attaches nothing.
    ebpf: Option<Ebpf>,
    plan: JobPlan,
    opts: EngineOptions,
    started: Instant,
    stats: RunTimeSampler,
    ring: Option<RingBuf<MapData>>,
    events: VecDeque<EventRecord>,
    /// Events read and not yet taken by [`Session::take_events`], at most [`LIVE_EVENTS`].
    live: VecDeque<EventRecord>,
    /// Events the live queue dropped (oldest first) because nobody took them in time.
    live_dropped: u64,
    delivered: u64,
    dropped: u64,
    symbols: Symbols,
    cgroups: Cgroups,
    link_count: usize,
    /// Run time and runs read just before detaching (the counts stop there).
    final_run_time: Option<(u64, u64)>,
    /// Seconds attached, fixed at detach.
    final_elapsed: Option<f64>,
    last_remember: Instant,
    /// The pins of a session started with [`Session::start_pinned`]; `None` otherwise.
    pinned: Option<Pinned>,
}

/// What a pinned session holds besides (or, resumed, instead of) its `Ebpf`.
struct Pinned {
    /// `<root>/<id>/`: removed at stop, which detaches the links once their fds close.
    job_dir: PathBuf,
    /// The links, taken from their programs: their pins keep them attached without us.
    links: Vec<FdLink>,
    /// Maps reopened from their pins (a resumed session has no `Ebpf`; empty otherwise).
    maps: BTreeMap<String, Map>,
    /// The ids of the attached programs of a resumed session (empty otherwise).
    program_ids: Vec<u32>,
}

/// Pinned links are `link-<n>` in a session's pin directory; maps keep their names.
const LINK_PREFIX: &str = "link-";

/// A job's pin directory, `root/<id>`; an id that is not a plain name (letters, digits, `-`,
/// `_`) is refused, so nothing walks out of the root.
pub fn job_pin_dir(root: &Path, id: &str) -> Result<PathBuf, EngineError> {
    let plain = !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !plain {
        return Err(EngineError::Pin {
            path: root.display().to_string(),
            message: format!("{id:?} cannot name a pin directory"),
        });
    }
    Ok(root.join(id))
}

/// The record of what a pinned session runs, used as the name of the directory its pins live
/// in (bpffs holds only directories and BPF objects, so the record is a name): a digest of
/// everything its kernel objects depend on — the checked spec, the scope, the engine's sizes
/// and the kernel programs themselves — so that a session is resumed only from pins of the
/// same job built by the same programs, never from maps laid out for another.
pub fn pin_record(spec: &CheckedSpec, scope: &Scope, opts: &EngineOptions) -> String {
    static PROGRAMS_DIGEST: std::sync::OnceLock<(u64, u64)> = std::sync::OnceLock::new();
    let (p1, p2) =
        *PROGRAMS_DIGEST.get_or_init(|| (fnv1a(FNV_A, PROGRAMS), fnv1a(FNV_B, PROGRAMS)));
    let text = format!(
        "{spec:?}\n{scope:?}\n{} {} {}",
        opts.ringbuf_bytes, opts.stack_entries, opts.stash_entries
    );
    format!(
        "record-{:016x}{:016x}",
        fnv1a(p1, text.as_bytes()),
        fnv1a(p2, text.as_bytes())
    )
}

const FNV_A: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_B: u64 = 0x6c62_272e_07bb_0142;

/// FNV-1a over `bytes` from `seed`: stable across builds and platforms (unlike `Hash`).
fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(seed, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Removes a job's pin directory with everything pinned in it (absent is fine). A pinned
/// link whose pin goes and whose fds are all closed is detached.
pub fn remove_pins(job_dir: &Path) -> Result<(), EngineError> {
    match fs::remove_dir_all(job_dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(pin_err(job_dir)(e)),
        _ => Ok(()),
    }
}

fn pin_err<E: std::fmt::Display>(path: &Path) -> impl Fn(E) -> EngineError + '_ {
    move |e| EngineError::Pin {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// A map's name as a pin: its name, with anything but letters, digits and `_` replaced (the
/// object's `.rodata` becomes `_rodata`).
fn pin_name(map: &str) -> String {
    map.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// An attached link taken from its program, to be pinned.
fn fd_link<L>(link: Result<L, ProgramError>, probe: &str) -> Result<FdLink, EngineError>
where
    FdLink: TryFrom<L>,
    <FdLink as TryFrom<L>>::Error: std::fmt::Display,
{
    let link =
        link.map_err(|e| kernel_error(probe, Reason::AttachKindUnsupported, e.to_string()))?;
    FdLink::try_from(link).map_err(|e| {
        kernel_error(
            probe,
            Reason::AttachKindUnsupported,
            format!("this link cannot be pinned ({e}); the node runner needs BPF links (Linux 5.15 or later)"),
        )
    })
}

/// The links a plan attaches: one per attach point, one per online CPU for sampling, one per
/// cgroup of the job for sock_ops.
fn expected_links(plan: &JobPlan) -> usize {
    let cpus = online_cpus().map(|c| c.len()).unwrap_or(1);
    plan.attachments
        .iter()
        .map(|a| match a.point {
            AttachPoint::Profile { .. } => cpus,
            AttachPoint::SockOps => match &plan.scope {
                Scope::Cgroups(set) => set.count(),
                _ => 1,
            },
            _ => 1,
        })
        .sum()
}

/// A cgroup v2 directory, opened for a cgroup hook: `path` below the hierarchy's root (as
/// [`crate::engine::render::Cgroups::path`] gives it), or the root itself.
fn cgroup_dir(probe: &str, path: Option<String>) -> Result<std::fs::File, EngineError> {
    let root = crate::engine::render::cgroup2_mount().ok_or_else(|| {
        kernel_error(
            probe,
            Reason::FilesystemUnavailable,
            "cgroup hooks need the cgroup v2 hierarchy mounted",
        )
    })?;
    let dir = match path {
        Some(p) => root.join(p.trim_start_matches('/')),
        None => root,
    };
    std::fs::File::open(&dir).map_err(|e| {
        kernel_error(
            probe,
            Reason::FilesystemUnavailable,
            format!("opening cgroup {}: {e}", dir.display()),
        )
    })
}

fn kernel_error(probe: &str, reason: Reason, message: impl Into<String>) -> EngineError {
    EngineError::Kernel {
        probe: probe.to_string(),
        reason,
        message: message.into(),
    }
}

/// Maps an errno from load/attach to a feasibility reason and a fix.
fn errno_reason(errno: Option<i32>, kernel: &Kernel) -> (Reason, &'static str) {
    match errno {
        Some(libc::EPERM) | Some(libc::EACCES) => {
            // Only confidentiality mode refuses tracing (kprobes, perf, reading kernel
            // memory, tracefs); integrity mode (this VM's host runs it) refuses none of it.
            if kernel.lockdown().as_deref() == Some("confidentiality") {
                (
                    Reason::KernelLockdown,
                    "the kernel refused it (lockdown is active); use a tracepoint, raw tracepoint or uprobe",
                )
            } else {
                (
                    Reason::PermissionDenied,
                    "the kernel refused it (EPERM); run as root with CAP_BPF and CAP_PERFMON, or this kernel does not allow this attach kind",
                )
            }
        }
        Some(libc::ENOENT) => (
            Reason::SymbolNotFound,
            "the attach point does not exist; `fathom list` shows what does",
        ),
        Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => (
            Reason::AttachKindUnsupported,
            "this kernel does not support this attach kind here",
        ),
        _ => (Reason::AttachKindUnsupported, "the kernel refused it"),
    }
}

/// The errno somewhere in an error's source chain.
fn source_errno(e: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(errno) = err
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
        {
            return Some(errno);
        }
        cur = err.source();
    }
    None
}

/// The errno of a failed load or attach.
fn program_errno(e: &ProgramError) -> Option<i32> {
    match e {
        ProgramError::LoadError { io_error, .. }
        | ProgramError::SyscallError(SyscallError { io_error, .. }) => io_error.raw_os_error(),
        other => source_errno(other),
    }
}

fn program_error(probe: &str, e: ProgramError, kernel: &Kernel, budget: usize) -> EngineError {
    match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            if log.trim().is_empty() {
                let (reason, fix) = errno_reason(io_error.raw_os_error(), kernel);
                kernel_error(probe, reason, format!("loading failed: {io_error}; {fix}"))
            } else {
                kernel_error(
                    probe,
                    Reason::VerifierRejected,
                    format!(
                        "the verifier rejected the program ({io_error}):\n{}",
                        summarize_verifier_log(&log, budget)
                    ),
                )
            }
        }
        ProgramError::SyscallError(SyscallError { call, io_error }) => {
            let (reason, fix) = errno_reason(io_error.raw_os_error(), kernel);
            kernel_error(probe, reason, format!("{call} failed: {io_error}; {fix}"))
        }
        other => {
            let (reason, fix) = errno_reason(program_errno(&other), kernel);
            kernel_error(probe, reason, format!("{other}; {fix}"))
        }
    }
}

/// The end of a verifier log — the failing instruction, the error and the summary line —
/// within `budget` bytes, cut at a line boundary.
pub fn summarize_verifier_log(log: &str, budget: usize) -> String {
    let log = log.trim_end();
    if log.len() <= budget {
        return log.to_string();
    }
    let mut start = log.len() - budget;
    while !log.is_char_boundary(start) {
        start += 1;
    }
    let tail = &log[start..];
    let tail = tail.find('\n').map_or(tail, |i| &tail[i + 1..]);
    format!(
        "… ({} bytes of log omitted)\n{tail}",
        log.len() - tail.len()
    )
}

/// Loads the verifier canary, a program the verifier always rejects, and returns the error
/// the engine reports for it: proof that rejections come back as errors with the verifier's
/// log, not as crashes (RELIABILITY E4).
pub fn verifier_canary(kernel: &Kernel, budget: usize) -> EngineError {
    let mut ebpf = match EbpfLoader::new().load(PROGRAMS) {
        Ok(e) => e,
        Err(e) => {
            return kernel_error(
                "verifier-canary",
                Reason::AttachKindUnsupported,
                e.to_string(),
            );
        }
    };
    let prog = ebpf
        .program_mut("fathom_verifier_canary")
        .expect("canary in object");
    match <&mut TracePoint>::try_from(prog).and_then(|p| p.load()) {
        Ok(()) => kernel_error(
            "verifier-canary",
            Reason::AttachKindUnsupported,
            "the verifier accepted a program it must reject",
        ),
        Err(e) => program_error("verifier-canary", e, kernel, budget),
    }
}

/// Loads (without attaching) the program an fentry/fexit/LSM attach point needs, against its
/// real target, and unloads it: the only reliable way to learn whether this kernel accepts
/// BPF trampolines. Other attach points are not trial-loaded.
pub fn trial_load(point: &AttachPoint, kernel: &Kernel) -> Result<(), (Reason, String)> {
    let (program, target) = match point {
        AttachPoint::Fentry { function } => ("fathom_fentry", function.as_str()),
        AttachPoint::Fexit { function } => ("fathom_fexit", function.as_str()),
        AttachPoint::Lsm { hook } => ("fathom_lsm", hook.as_str()),
        _ => return Ok(()),
    };
    let Some(btf) = kernel.btf() else {
        return Err((Reason::BTFUnavailable, "kernel BTF is unavailable".into()));
    };
    let mut loader = EbpfLoader::new();
    loader.btf(Some(btf));
    for (name, size) in [
        (names::AGG, 1),
        (names::AGG_SMALL, 1),
        (names::AGG_TINY, 1),
        (names::EVENTS, 4096),
        (names::STACKS, 1),
        (names::STASH, 1),
        (names::PIDS, 1),
        (names::CGROUPS, 1),
    ] {
        loader.map_max_entries(name, size);
    }
    let mut ebpf = loader.load(PROGRAMS).map_err(|e| {
        (
            Reason::AttachKindUnsupported,
            format!("creating maps failed: {e}"),
        )
    })?;
    let prog = ebpf.program_mut(program).expect("program in object");
    let result = match point {
        AttachPoint::Fentry { .. } => {
            <&mut FEntry>::try_from(prog).and_then(|p| p.load(target, btf))
        }
        AttachPoint::Fexit { .. } => <&mut FExit>::try_from(prog).and_then(|p| p.load(target, btf)),
        _ => <&mut Lsm>::try_from(prog).and_then(|p| p.load(target, btf)),
    };
    result.map_err(|e| {
        let errno = program_errno(&e);
        let kind = match point {
            AttachPoint::Lsm { .. } => "LSM programs",
            _ => "fentry/fexit programs",
        };
        match errno {
            Some(libc::EPERM) if kernel.lockdown().as_deref() == Some("confidentiality") => (
                Reason::KernelLockdown,
                format!("kernel lockdown (confidentiality) refuses {kind}; use a tracepoint or raw tracepoint"),
            ),
            // 524 is the kernel-internal ENOTSUPP some program types return.
            Some(libc::EPERM) | Some(libc::EOPNOTSUPP) | Some(524) => (
                Reason::AttachKindUnsupported,
                format!(
                    "this kernel refuses BPF trampolines ({kind} fail to load: {}) although this process has the privileges; use a kprobe, a tracepoint or a raw tracepoint",
                    std::io::Error::from_raw_os_error(errno.unwrap_or(libc::EPERM))
                ),
            ),
            _ => (
                Reason::VerifierRejected,
                format!("loading the {kind} for {target} failed: {e}"),
            ),
        }
    })
}

impl Session {
    /// Loads and attaches every program of `plan`. Either all attach or none remain: on any
    /// error everything already attached is detached before the error is returned. A plan
    /// whose scope is [`Scope::Nothing`] loads and attaches nothing. Nothing is pinned: the
    /// job ends with the session or the process.
    pub fn start(
        plan: JobPlan,
        kernel: &Kernel,
        opts: EngineOptions,
    ) -> Result<Session, EngineError> {
        Session::load(plan, kernel, opts, None)
    }

    /// Starts `plan` with its links and maps pinned under `job_dir/record/`, or resumes it
    /// from there. When a previous process (a runner killed or restarted) left the same
    /// `record` with every link the plan attaches, the pins are reopened: nothing is loaded
    /// or attached anew, and the counts go on from what the kernel kept counting meanwhile.
    /// Anything else in `job_dir` (another spec or scope, a start cut short) is removed
    /// first, which detaches it. All or nothing as [`Session::start`]: when loading or
    /// attaching fails, the pins made so far are removed and nothing of the job stays
    /// attached. Returns the session and whether it was resumed.
    pub fn start_pinned(
        plan: JobPlan,
        kernel: &Kernel,
        opts: EngineOptions,
        job_dir: &Path,
        record: &str,
    ) -> Result<(Session, bool), EngineError> {
        let dir = job_dir.join(record);
        if plan.scope.attaches() && dir.is_dir() {
            match Session::resume(plan.clone(), opts.clone(), job_dir, &dir) {
                Ok(s) => return Ok((s, true)),
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "the pins cannot be resumed; starting afresh");
                }
            }
        }
        remove_pins(job_dir)?;
        if !plan.scope.attaches() {
            return Ok((Session::start(plan, kernel, opts)?, false));
        }
        fs::create_dir_all(&dir).map_err(pin_err(&dir))?;
        match Session::load(plan, kernel, opts, Some((job_dir, &dir))) {
            Ok(s) => Ok((s, false)),
            Err(e) => {
                // The links pinned so far detach when their pins go (our fds are closed).
                if let Err(e) = remove_pins(job_dir) {
                    tracing::warn!(error = %e, "removing the pins of a failed start");
                }
                Err(e)
            }
        }
    }

    /// Reopens the pinned links and maps a session of `plan` left in `dir` (see
    /// [`Session::start_pinned`], which checks the record first). Fails, leaving the pins as
    /// they are, when a link or a map the plan reads is missing.
    pub fn resume(
        plan: JobPlan,
        opts: EngineOptions,
        job_dir: &Path,
        dir: &Path,
    ) -> Result<Session, EngineError> {
        let mut plan = plan;
        prepare_plan(&mut plan, &opts);
        let mut maps = BTreeMap::new();
        let mut link_paths = Vec::new();
        for entry in fs::read_dir(dir).map_err(pin_err(dir))? {
            let path = entry.map_err(pin_err(dir))?.path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if name.starts_with(LINK_PREFIX) {
                link_paths.push(path);
                continue;
            }
            let data = MapData::from_pin(&path).map_err(pin_err(&path))?;
            maps.insert(name, Map::from_map_data(data).map_err(pin_err(&path))?);
        }
        let want = expected_links(&plan);
        if link_paths.len() != want {
            return Err(EngineError::Pin {
                path: dir.display().to_string(),
                message: format!(
                    "{} pinned link(s) where the job attaches {want}",
                    link_paths.len()
                ),
            });
        }
        let agg = agg_map_name(&plan.config);
        for name in [names::COUNTERS, agg, names::STACKS, names::EVENTS] {
            if !maps.contains_key(name) {
                return Err(EngineError::Pin {
                    path: dir.display().to_string(),
                    message: format!("map {name} is not pinned"),
                });
            }
        }
        let mut links = Vec::new();
        let mut program_ids = Vec::new();
        for path in link_paths {
            let link = FdLink::from(PinnedLink::from_pin(&path).map_err(pin_err(&path))?);
            let id = link.info().map_err(pin_err(&path))?.program_id();
            if !program_ids.contains(&id) {
                program_ids.push(id);
            }
            links.push(link);
        }
        let ring = match maps.remove(names::EVENTS) {
            Some(m) if plan.events.is_some() => Some(RingBuf::try_from(m).map_err(pin_err(dir))?),
            _ => None,
        };
        let stats = RunTimeSampler::start(opts.stats_duty);
        tracing::info!(job = %plan.label, scope = %plan.scope, links = links.len(), "resumed from pins");
        let mut session = Session::new(None, plan, opts, stats, ring, links.len());
        session.pinned = Some(Pinned {
            job_dir: job_dir.to_path_buf(),
            links,
            maps,
            program_ids,
        });
        Ok(session)
    }

    /// Loads and attaches; with `pin` (the job's directory and the record directory in it)
    /// every map and link is pinned in the record directory.
    fn load(
        plan: JobPlan,
        kernel: &Kernel,
        opts: EngineOptions,
        pin: Option<(&Path, &Path)>,
    ) -> Result<Session, EngineError> {
        let label = plan.label.clone();
        if !plan.scope.attaches() {
            tracing::info!(job = %label, scope = %plan.scope, "nothing attached");
            return Ok(Session::new(
                None,
                plan,
                opts,
                RunTimeSampler::off(),
                None,
                0,
            ));
        }
        let mut plan = plan;
        let ringbuf = prepare_plan(&mut plan, &opts);
        let cgroups = plan.scope.cgroup_ids();
        // Maps a job does not use are created at their smallest: a stack map is preallocated
        // (1 KiB per entry) and would otherwise dominate the job's locked memory.
        let uses_stacks =
            plan.config.key_mask & (fathom_common::key::KSTACK | fathom_common::key::USTACK) != 0;
        let stack_entries = if uses_stacks { opts.stack_entries } else { 1 };
        let stash_entries = if plan.config.flags & fathom_common::flags::PAIRED != 0 {
            opts.stash_entries
        } else {
            1
        };
        // The spec's bound is checked by validation; the engine enforces it again so that no
        // caller (a stale operator, a hand-made plan) can size a map past it.
        let map_entries = plan.map_entries.clamp(1, MAX_MAP_ENTRIES);
        // Exactly one aggregation map is sized for the job; the others get one entry.
        let (tiny, small, full, net_entries) = match plan.net {
            Some(_) => (1, 1, 1, map_entries),
            None => {
                let (tiny, small, full) = agg_sizes(&plan.config, map_entries);
                (tiny, small, full, 1)
            }
        };
        let net_config = plan.net.unwrap_or(fathom_common::NetConfig::EMPTY);
        let mut loader = EbpfLoader::new();
        // The kernel's BTF, parsed once per Kernel, instead of once per load.
        loader.btf(kernel.btf());
        loader
            .override_global(names::CONFIG, &plan.config, true)
            .override_global(names::STASH_CONFIG, &plan.stash, true)
            .override_global(names::NET_CONFIG, &net_config, true)
            .map_max_entries(names::NET_AGG, net_entries)
            .map_max_entries(names::IF_CGROUPS, (plan.pod_interfaces.len() as u32).max(1))
            .map_max_entries(names::LIFE_STARTS, life_entries(&plan, &opts))
            .map_max_entries(names::AGG, full)
            .map_max_entries(names::AGG_SMALL, small)
            .map_max_entries(names::AGG_TINY, tiny)
            .map_max_entries(names::EVENTS, ringbuf)
            .map_max_entries(names::STACKS, stack_entries)
            .map_max_entries(names::STASH, stash_entries)
            .map_max_entries(names::PIDS, (plan.pids.len() as u32).max(1))
            .map_max_entries(names::CGROUPS, (cgroups.len() as u32).max(1));
        let mut ebpf = loader.load(PROGRAMS).map_err(|e| {
            let (reason, fix) = errno_reason(source_errno(&e), kernel);
            kernel_error(
                &label,
                reason,
                format!("creating the job's maps failed: {e}; {fix}"),
            )
        })?;

        fill_set(&mut ebpf, names::PIDS, &plan.pids)
            .map_err(|e| kernel_error(&label, Reason::AttachKindUnsupported, e))?;
        fill_set(&mut ebpf, names::CGROUPS, &cgroups)
            .map_err(|e| kernel_error(&label, Reason::AttachKindUnsupported, e))?;
        if !plan.pod_interfaces.is_empty() {
            let map = ebpf.map_mut(names::IF_CGROUPS).ok_or_else(|| {
                kernel_error(&label, Reason::AttachKindUnsupported, "no IF_CGROUPS map")
            })?;
            let mut m: BpfHashMap<_, u32, u64> = BpfHashMap::try_from(map)
                .map_err(|e| kernel_error(&label, Reason::AttachKindUnsupported, e.to_string()))?;
            for (ifindex, cgroup) in &plan.pod_interfaces {
                m.insert(ifindex, cgroup, 0).map_err(|e| {
                    kernel_error(&label, Reason::AttachKindUnsupported, e.to_string())
                })?;
            }
        }
        if let Some((_, dir)) = pin {
            for (name, map) in ebpf.maps() {
                let path = dir.join(pin_name(name));
                map.pin(&path).map_err(pin_err(&path))?;
            }
        }
        // With pinning, each link is taken from its program to be pinned.
        let mut taken: Option<Vec<FdLink>> = pin.map(|_| Vec::new());

        // Run-time statistics for the CPU budget; the kernel keeps them on while the fd lives.
        let stats = RunTimeSampler::start(opts.stats_duty);

        let mut link_count = 0;
        for att in &plan.attachments {
            let probe = att.point.label();
            let budget = opts.verifier_log_budget;
            let perr = |e: ProgramError| program_error(&probe, e, kernel, budget);
            let prog = ebpf
                .program_mut(att.program())
                .expect("every planned program is in the object");
            match &att.point {
                AttachPoint::Tracepoint { category, name } => {
                    let p: &mut TracePoint = prog.try_into().map_err(perr)?;
                    if p.fd().is_err() {
                        p.load().map_err(perr)?;
                    }
                    let id = p.attach(category, name).map_err(perr)?;
                    if let Some(t) = taken.as_mut() {
                        t.push(fd_link(p.take_link(id), &probe)?);
                    }
                }
                AttachPoint::RawTracepoint { name } => {
                    let p: &mut RawTracePoint = prog.try_into().map_err(perr)?;
                    if p.fd().is_err() {
                        p.load().map_err(perr)?;
                    }
                    let id = p.attach(name).map_err(perr)?;
                    if let Some(t) = taken.as_mut() {
                        t.push(fd_link(p.take_link(id), &probe)?);
                    }
                }
                AttachPoint::Kprobe { function } | AttachPoint::Kretprobe { function } => {
                    let p: &mut KProbe = prog.try_into().map_err(perr)?;
                    if p.fd().is_err() {
                        p.load().map_err(perr)?;
                    }
                    let id = p.attach(function, 0).map_err(perr)?;
                    if let Some(t) = taken.as_mut() {
                        t.push(fd_link(p.take_link(id), &probe)?);
                    }
                }
                AttachPoint::Fentry { function } => {
                    let btf = need_btf(kernel, &probe)?;
                    let p: &mut FEntry = prog.try_into().map_err(perr)?;
                    p.load(function, btf).map_err(perr)?;
                    let id = p.attach().map_err(perr)?;
                    if let Some(t) = taken.as_mut() {
                        t.push(fd_link(p.take_link(id), &probe)?);
                    }
                }
                AttachPoint::Fexit { function } => {
                    let btf = need_btf(kernel, &probe)?;
                    let p: &mut FExit = prog.try_into().map_err(perr)?;
                    p.load(function, btf).map_err(perr)?;
                    let id = p.attach().map_err(perr)?;
                    if let Some(t) = taken.as_mut() {
                        t.push(fd_link(p.take_link(id), &probe)?);
                    }
                }
                AttachPoint::Lsm { hook } => {
                    let btf = need_btf(kernel, &probe)?;
                    let p: &mut Lsm = prog.try_into().map_err(perr)?;
                    p.load(hook, btf).map_err(perr)?;
                    let id = p.attach().map_err(perr)?;
                    if let Some(t) = taken.as_mut() {
                        t.push(fd_link(p.take_link(id), &probe)?);
                    }
                }
                AttachPoint::Uprobe { binary, target, .. } => {
                    let path = crate::engine::elf::resolve_binary(binary)
                        .map_err(|e| kernel_error(&probe, Reason::BinaryNotFound, e.to_string()))?;
                    let p: &mut UProbe = prog.try_into().map_err(perr)?;
                    if p.fd().is_err() {
                        p.load().map_err(perr)?;
                    }
                    let location = match target {
                        UprobeTarget::Symbol(s) => UProbeAttachLocation::Symbol(s),
                        UprobeTarget::Offset { offset, .. } => {
                            UProbeAttachLocation::AbsoluteOffset(*offset)
                        }
                    };
                    let id = p
                        .attach(location, &path, UProbeScope::AllProcesses)
                        .map_err(perr)?;
                    if let Some(t) = taken.as_mut() {
                        t.push(fd_link(p.take_link(id), &probe)?);
                    }
                }
                AttachPoint::Xdp { interface } => {
                    let p: &mut Xdp = prog.try_into().map_err(perr)?;
                    if p.fd().is_err() {
                        p.load().map_err(perr)?;
                    }
                    // Generic (skb) mode: a native XDP program makes many drivers reconfigure
                    // their rings, a blip of lost packets an observer must not cause (and on
                    // veth it moves packets to a ring that can overflow). A link, never the
                    // netlink path that replaces another program: an interface that has one
                    // in this mode already refuses with EBUSY.
                    let id = p.attach(interface, XdpMode::Skb).map_err(|e| {
                        if program_errno(&e) == Some(libc::EBUSY) {
                            kernel_error(
                                &probe,
                                Reason::AttachKindUnsupported,
                                format!("interface {interface} already runs an XDP program, and Fathom never replaces one; trace it with network hook tc"),
                            )
                        } else {
                            perr(e)
                        }
                    })?;
                    if let Some(t) = taken.as_mut() {
                        t.push(fd_link(p.take_link(id), &probe)?);
                    }
                }
                AttachPoint::Tc { interface, egress } => {
                    let p: &mut SchedClassifier = prog.try_into().map_err(perr)?;
                    if p.fd().is_err() {
                        p.load().map_err(perr)?;
                    }
                    let ty = if *egress {
                        TcAttachType::Egress
                    } else {
                        TcAttachType::Ingress
                    };
                    // Linux 6.6+ (checked by planning): a TCX link, owned by its fd.
                    let id = p.attach(interface, ty).map_err(perr)?;
                    if let Some(t) = taken.as_mut() {
                        t.push(fd_link(p.take_link(id), &probe)?);
                    }
                }
                AttachPoint::CgroupSkb { egress } => {
                    let root = cgroup_dir(&probe, None)?;
                    let p: &mut CgroupSkb = prog.try_into().map_err(perr)?;
                    if p.fd().is_err() {
                        p.load().map_err(perr)?;
                    }
                    let ty = if *egress {
                        CgroupSkbAttachType::Egress
                    } else {
                        CgroupSkbAttachType::Ingress
                    };
                    // A cgroup link always runs beside the cgroup's other programs (link_create
                    // takes no mode flag: ALLOW_MULTI is implied, and passing it is EINVAL).
                    let id = p
                        .attach(&root, ty, CgroupAttachMode::Single)
                        .map_err(perr)?;
                    if let Some(t) = taken.as_mut() {
                        t.push(fd_link(p.take_link(id), &probe)?);
                    }
                }
                AttachPoint::SockOps => {
                    // sock_ops has no cgroup filter: it attaches where the job looks, the
                    // root for the whole node, else each of the job's cgroups.
                    let dirs = match &plan.scope {
                        Scope::Cgroups(set) => {
                            let mut cgroups = crate::engine::render::Cgroups::default();
                            let mut dirs = Vec::new();
                            for id in set.ids() {
                                dirs.push(cgroup_dir(&probe, Some(cgroups.path(id)))?);
                            }
                            dirs
                        }
                        _ => vec![cgroup_dir(&probe, None)?],
                    };
                    let p: &mut SockOps = prog.try_into().map_err(perr)?;
                    if p.fd().is_err() {
                        p.load().map_err(perr)?;
                    }
                    for dir in &dirs {
                        let id = p.attach(dir, CgroupAttachMode::Single).map_err(perr)?;
                        if let Some(t) = taken.as_mut() {
                            t.push(fd_link(p.take_link(id), &probe)?);
                        }
                        link_count += 1;
                    }
                    continue;
                }
                AttachPoint::Profile { frequency } => {
                    let p: &mut PerfEvent = prog.try_into().map_err(perr)?;
                    if p.fd().is_err() {
                        p.load().map_err(perr)?;
                    }
                    let cpus = online_cpus().map_err(|(_, e)| {
                        kernel_error(&probe, Reason::AttachKindUnsupported, e.to_string())
                    })?;
                    for cpu in cpus {
                        let id = p
                            .attach(
                                PerfEventConfig::Software(SoftwareEvent::CpuClock),
                                PerfEventScope::AllProcessesOneCpu { cpu },
                                SamplePolicy::Frequency(u64::from(*frequency)),
                                true,
                            )
                            .map_err(perr)?;
                        if let Some(t) = taken.as_mut() {
                            t.push(fd_link(p.take_link(id), &probe)?);
                        }
                        link_count += 1;
                    }
                    continue;
                }
            }
            link_count += 1;
        }

        let ring =
            match ebpf.take_map(names::EVENTS) {
                Some(m) if plan.events.is_some() => Some(RingBuf::try_from(m).map_err(|e| {
                    kernel_error(&label, Reason::AttachKindUnsupported, e.to_string())
                })?),
                _ => None,
            };
        // Pinned last: a record directory holds every link of the job or is not resumed.
        let pinned = match (pin, taken) {
            (Some((job_dir, dir)), Some(taken)) => {
                let mut links = Vec::with_capacity(taken.len());
                for (i, link) in taken.into_iter().enumerate() {
                    let path = dir.join(format!("{LINK_PREFIX}{i}"));
                    links.push(FdLink::from(link.pin(&path).map_err(pin_err(&path))?));
                }
                Some(Pinned {
                    job_dir: job_dir.to_path_buf(),
                    links,
                    maps: BTreeMap::new(),
                    program_ids: Vec::new(),
                })
            }
            _ => None,
        };
        tracing::info!(job = %label, scope = %plan.scope, links = link_count, pinned = pinned.is_some(), "attached");
        let mut session = Session::new(Some(ebpf), plan, opts, stats, ring, link_count);
        session.pinned = pinned;
        Ok(session)
    }

    fn new(
        ebpf: Option<Ebpf>,
        plan: JobPlan,
        opts: EngineOptions,
        stats: RunTimeSampler,
        ring: Option<RingBuf<MapData>>,
        link_count: usize,
    ) -> Session {
        Session {
            ebpf,
            plan,
            opts,
            started: Instant::now(),
            stats,
            ring,
            events: VecDeque::new(),
            live: VecDeque::new(),
            live_dropped: 0,
            delivered: 0,
            dropped: 0,
            symbols: Symbols::new(),
            cgroups: Cgroups::default(),
            link_count,
            final_run_time: None,
            final_elapsed: None,
            last_remember: Instant::now(),
            pinned: None,
        }
    }

    /// A map of the job: the loaded object's, or one reopened from its pin.
    fn map(&self, name: &str) -> Option<&Map> {
        self.ebpf
            .as_ref()
            .and_then(|e| e.map(name))
            .or_else(|| self.pinned.as_ref()?.maps.get(name))
    }

    /// Whether the job's programs are in the kernel (loaded here, or resumed from pins).
    fn in_kernel(&self) -> bool {
        self.ebpf.is_some() || self.pinned.is_some()
    }

    /// Whether this session's links and maps are pinned (they outlive the process).
    pub fn is_pinned(&self) -> bool {
        self.pinned.is_some()
    }

    /// The kernel's information about the job's programs.
    fn program_infos(&self) -> Vec<ProgramInfo> {
        let mut infos: Vec<ProgramInfo> = self
            .ebpf
            .iter()
            .flat_map(Ebpf::programs)
            .filter_map(|(_, p)| p.info().ok())
            .collect();
        if let Some(ids) = self.pinned.as_ref().map(|p| &p.program_ids)
            && !ids.is_empty()
        {
            infos.extend(
                aya::programs::loaded_programs()
                    .filter_map(Result::ok)
                    .filter(|p| ids.contains(&p.id())),
            );
        }
        infos
    }

    pub fn plan(&self) -> &JobPlan {
        &self.plan
    }

    /// Links attached (one per attach point, one per CPU for sampling); 0 when the scope
    /// attaches nothing.
    pub fn link_count(&self) -> usize {
        self.link_count
    }

    /// The attach points that are attached (an assignment's `status.attachedProbes`): none
    /// when the scope attaches nothing.
    pub fn attached_probes(&self) -> Vec<String> {
        if self.in_kernel() {
            self.plan.probe_labels()
        } else {
            Vec::new()
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Reads what the ring buffer holds, waiting up to `timeout` for the first record.
    /// Returns how many events were read.
    pub fn poll_events(&mut self, timeout: Duration) -> usize {
        let Some(ring) = self.ring.as_mut() else {
            std::thread::sleep(timeout);
            self.remember_processes();
            self.tick_stats();
            return 0;
        };
        let mut pfd = libc::pollfd {
            fd: ring.as_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd on the stack.
        #[expect(unsafe_code, reason = "poll(2) on the ring buffer's fd")]
        unsafe {
            libc::poll(&mut pfd, 1, ms);
        }
        self.drain_ring()
    }

    /// Switches the run-time statistics on or off as their period goes.
    fn tick_stats(&mut self) {
        if self.stats.wants_reading() {
            let (ns, _) = self.raw_run_time();
            self.stats.observe(ns);
        }
    }

    fn drain_ring(&mut self) -> usize {
        self.tick_stats();
        let Some(ring) = self.ring.as_mut() else {
            return 0;
        };
        let Some(ev_plan) = self.plan.events.as_ref() else {
            return 0;
        };
        let last = ev_plan.last;
        // Every record is counted; only the newest `last` (or LIVE_EVENTS for the live queue)
        // are copied and decoded.
        let keep = last.max(LIVE_EVENTS);
        let mut raw: VecDeque<Event> = VecDeque::with_capacity(keep.min(1024));
        let mut n = 0;
        while let Some(item) = ring.next() {
            if item.len() >= std::mem::size_of::<Event>() {
                n += 1;
                if raw.len() == keep {
                    raw.pop_front();
                    self.live_dropped += 1;
                }
                // SAFETY: the record is at least an Event; Event is plain data.
                #[expect(unsafe_code, reason = "decoding a #[repr(C)] ring-buffer record")]
                let e = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<Event>()) };
                raw.push_back(e);
            } else {
                self.dropped += 1;
            }
        }
        self.delivered += n as u64;
        self.remember_processes();
        let mut renderer = Renderer {
            plan: &self.plan,
            node: &self.opts.node,
            stacks: &StackFrames::new(),
            symbols: &mut self.symbols,
            cgroups: &mut self.cgroups,
        };
        for e in &raw {
            let record = renderer.event(e);
            if self.live.len() == LIVE_EVENTS {
                self.live.pop_front();
                self.live_dropped += 1;
            }
            self.live.push_back(record.clone());
            self.events.push_back(record);
            if self.events.len() > last {
                self.events.pop_front();
            }
        }
        n
    }

    /// Takes up to `max` live events (oldest first), and how many the live queue dropped so
    /// far because they were not taken in time.
    pub fn take_events(&mut self, max: usize) -> (Vec<EventRecord>, u64) {
        self.drain_ring();
        let n = max.min(self.live.len());
        (self.live.drain(..n).collect(), self.live_dropped)
    }

    /// Keeps the mappings of processes in user-stack keys while they still exist, so their
    /// stacks can be symbolized after they exit. Called as the session is polled (at most
    /// every 250 ms).
    fn remember_processes(&mut self) {
        if self.plan.config.key_mask & fathom_common::key::USTACK == 0
            || self.last_remember.elapsed() < Duration::from_millis(250)
        {
            return;
        }
        self.last_remember = Instant::now();
        if let Ok(entries) = self.aggregate_entries() {
            for (k, _) in entries {
                self.symbols.remember(k.pid);
            }
        }
    }

    /// The kernel programs' counters, summed over CPUs.
    pub fn counters(&self) -> Result<Counters, EngineError> {
        let Some(map) = self.map(names::COUNTERS) else {
            return Ok(Counters::default());
        };
        let arr: PerCpuArray<_, u64> = PerCpuArray::try_from(map).map_err(read_err("counters"))?;
        let mut c = [0u64; counter::COUNT as usize];
        for (i, slot) in c.iter_mut().enumerate() {
            let v = arr.get(&(i as u32), 0).map_err(read_err("counters"))?;
            *slot = v.iter().sum();
        }
        Ok(Counters {
            hits: c[counter::HITS as usize],
            map_full: c[counter::MAP_FULL as usize],
            ringbuf_lost: c[counter::RINGBUF_LOST as usize],
            rate_limited: c[counter::RATE_LIMITED as usize],
            stack_errors: c[counter::STACK_ERRORS as usize],
            stash_misses: c[counter::STASH_MISSES as usize],
            events_emitted: c[counter::EVENTS_EMITTED as usize],
            filtered: c[counter::FILTERED as usize],
        })
    }

    /// Nanoseconds the job's programs have run and how many times they ran, from the
    /// kernel's run-time statistics, scaled up from the sampled windows to the whole run.
    pub fn run_time(&self) -> (u64, u64) {
        if let Some(t) = self.final_run_time {
            return t;
        }
        let (ns, runs) = self.raw_run_time();
        (self.stats.estimate(ns), self.stats.estimate(runs))
    }

    /// The programs' run time (ns) and runs as the kernel counts them, summed.
    fn raw_run_time(&self) -> (u64, u64) {
        let mut ns = 0;
        let mut runs = 0;
        for info in self.program_infos() {
            ns += info.run_time().as_nanos() as u64;
            runs += info.run_count();
        }
        (ns, runs)
    }

    /// Locked kernel memory of the job's maps and programs, from the kernel's fdinfo.
    pub fn memlock_bytes(&self) -> u64 {
        let mut total = 0;
        for (_, m) in self.ebpf.iter().flat_map(Ebpf::maps) {
            if let Some(fd) = map_fd(m) {
                total += fdinfo_memlock(fd);
            }
        }
        if let Some(r) = &self.ring {
            total += fdinfo_memlock(r.as_fd().as_raw_fd());
        }
        for (_, p) in self.ebpf.iter().flat_map(Ebpf::programs) {
            if let Ok(fd) = p.fd() {
                total += fdinfo_memlock(fd.as_fd().as_raw_fd());
            }
        }
        if let Some(pinned) = self.pinned.as_ref().filter(|p| !p.program_ids.is_empty()) {
            for m in pinned.maps.values() {
                if let Some(fd) = map_fd(m) {
                    total += fdinfo_memlock(fd);
                }
            }
            for info in self.program_infos() {
                total += info.memory_locked().map_or(0, u64::from);
            }
        }
        total
    }

    /// The kernel's ids of the job's maps and programs, as `bpftool map show` and `prog show`
    /// list them: the objects [`Self::memlock_bytes`] sums. Sorted, without duplicates.
    pub fn kernel_ids(&self) -> (Vec<u64>, Vec<u64>) {
        let mut maps = Vec::new();
        let mut progs = Vec::new();
        let pinned = self.pinned.as_ref().filter(|p| !p.program_ids.is_empty());
        let map_fds = self
            .ebpf
            .iter()
            .flat_map(Ebpf::maps)
            .map(|(_, m)| m)
            .chain(pinned.iter().flat_map(|p| p.maps.values()))
            .filter_map(map_fd)
            .chain(self.ring.as_ref().map(|r| r.as_fd().as_raw_fd()));
        maps.extend(map_fds.filter_map(|fd| fdinfo_field(fd, "map_id")));
        for (_, p) in self.ebpf.iter().flat_map(Ebpf::programs) {
            if let Ok(fd) = p.fd() {
                progs.extend(fdinfo_field(fd.as_fd().as_raw_fd(), "prog_id"));
            }
        }
        if pinned.is_some() {
            progs.extend(self.program_infos().iter().map(|i| u64::from(i.id())));
        }
        for ids in [&mut maps, &mut progs] {
            ids.sort_unstable();
            ids.dedup();
        }
        (maps, progs)
    }

    fn aggregate_entries(&self) -> Result<Vec<(AggKey, AggValue)>, EngineError> {
        let mut out = Vec::new();
        if !self.in_kernel() {
            return Ok(out);
        }
        let cfg = &self.plan.config;
        let map = self
            .map(agg_map_name(cfg))
            .ok_or_else(|| read_err("aggregation map")("the map is missing"))?;
        // A key deleted between listing and lookup is skipped, not an error.
        let slots = cfg.compact_slots;
        if cfg.flags & fathom_common::flags::COMPACT != 0
            && cfg.compact_words as usize <= compact::TINY_WORDS
        {
            let agg: PerCpuHashMap<_, [u64; compact::TINY_WORDS], AggValue> =
                PerCpuHashMap::try_from(map).map_err(read_err("aggregation map"))?;
            for (k, per_cpu) in agg.iter().flatten() {
                let w = [k[0], k[1], 0, 0];
                out.push((compact::unpack(&w, &slots), sum_cpus(&per_cpu)));
            }
        } else if cfg.flags & fathom_common::flags::COMPACT != 0 {
            let agg: PerCpuHashMap<_, [u64; compact::WORDS], AggValue> =
                PerCpuHashMap::try_from(map).map_err(read_err("aggregation map"))?;
            for (k, per_cpu) in agg.iter().flatten() {
                out.push((compact::unpack(&k, &slots), sum_cpus(&per_cpu)));
            }
        } else {
            let agg: PerCpuHashMap<_, AggKey, AggValue> =
                PerCpuHashMap::try_from(map).map_err(read_err("aggregation map"))?;
            for (k, per_cpu) in agg.iter().flatten() {
                out.push((k, sum_cpus(&per_cpu)));
            }
        }
        Ok(out)
    }

    /// A network probe's entries, each summed over the CPUs.
    fn net_entries(&self) -> Result<Vec<(fathom_common::NetKey, AggValue)>, EngineError> {
        let mut out = Vec::new();
        if !self.in_kernel() {
            return Ok(out);
        }
        let map = self
            .map(names::NET_AGG)
            .ok_or_else(|| read_err("network map")("the map is missing"))?;
        let agg: PerCpuHashMap<_, fathom_common::NetKey, AggValue> =
            PerCpuHashMap::try_from(map).map_err(read_err("network map"))?;
        for (k, per_cpu) in agg.iter().flatten() {
            out.push((k, sum_cpus(&per_cpu)));
        }
        Ok(out)
    }

    fn stack_frames(&self, entries: &[(AggKey, AggValue)]) -> StackFrames {
        let mut frames = StackFrames::new();
        let Some(map) = self.map(names::STACKS) else {
            return frames;
        };
        let Ok(stacks) = StackTraceMap::try_from(map) else {
            return frames;
        };
        for (k, _) in entries {
            for id in [k.kstack, k.ustack] {
                if id >= 0
                    && !frames.contains_key(&id)
                    && let Ok(st) = stacks.get(&(id as u32), 0)
                {
                    frames.insert(id, st.frames().iter().map(|f| f.ip).collect());
                }
            }
        }
        frames
    }

    /// The job's result so far: cumulative since start.
    pub fn snapshot(&mut self) -> Result<ResultData, EngineError> {
        self.drain_ring();
        let counters = self.counters()?;
        let (entries, net_entries) = match (self.plan.aggregate, self.plan.net.is_some()) {
            (false, _) => (Vec::new(), Vec::new()),
            (true, false) => (self.aggregate_entries()?, Vec::new()),
            (true, true) => (Vec::new(), self.net_entries()?),
        };
        let stacks = self.stack_frames(&entries);
        let mut renderer = Renderer {
            plan: &self.plan,
            node: &self.opts.node,
            stacks: &stacks,
            symbols: &mut self.symbols,
            cgroups: &mut self.cgroups,
        };
        let (rows, other, histograms, truncated) = if self.plan.net.is_some() {
            renderer.aggregate_net(&net_entries)
        } else {
            renderer.aggregate(&entries)
        };
        let elapsed = self
            .final_elapsed
            .unwrap_or_else(|| self.started.elapsed().as_secs_f64());
        let (cpu_ns, runs) = self.run_time();
        let budget = Budget {
            cpu_ns,
            runs,
            cpu_percent: if elapsed > 0.0 {
                cpu_ns as f64 / 1e9 / elapsed * 100.0
            } else {
                0.0
            },
            events_per_second: if elapsed > 0.0 {
                counters.hits as f64 / elapsed
            } else {
                0.0
            },
            memlock_bytes: self.memlock_bytes(),
        };
        let totals = Totals {
            hits: counters.hits,
            distinct_keys: (entries.len() + net_entries.len()) as u64,
            events_emitted: counters.events_emitted,
            events_delivered: self.delivered,
            events_lost: counters.ringbuf_lost,
            events_dropped: self.dropped,
            map_full: counters.map_full,
            rate_limited: counters.rate_limited,
            stack_errors: counters.stack_errors,
            unpaired: counters.stash_misses,
            filtered: counters.filtered,
        };
        Ok(ResultData {
            probe: self.plan.label.clone(),
            value: self.plan.value_label.clone(),
            keys: self.plan.columns.iter().map(|c| c.name.clone()).collect(),
            rows,
            other,
            histograms,
            events: self.events.iter().cloned().collect(),
            degraded: totals.degradations(),
            totals,
            budget: Some(budget),
            stopped_reason: None,
            truncated,
            elapsed_seconds: elapsed,
        })
    }

    /// Detaches every program, then reads the final result. When this returns, no link,
    /// program or map of the job remains in the kernel.
    pub fn stop(mut self) -> Result<ResultData, EngineError> {
        // Detach first so the final read is the final count, then read what remains.
        self.final_run_time = Some(self.run_time());
        self.final_elapsed = Some(self.started.elapsed().as_secs_f64());
        let ids: Vec<u32> = self.program_infos().iter().map(ProgramInfo::id).collect();
        if let Some(pinned) = self.pinned.as_mut() {
            // Unpinned, then closed: each link's last reference goes and it detaches.
            if let Err(e) = remove_pins(&pinned.job_dir) {
                tracing::warn!(error = %e, "removing the job's pins");
            }
            pinned.links.clear();
        }
        for (_, p) in self.ebpf.iter_mut().flat_map(Ebpf::programs_mut) {
            detach_all(p);
        }
        let result = self.snapshot();
        drop(self);
        wait_until_released(&ids);
        tracing::info!("detached");
        result
    }
}

/// An aggregation value summed over the CPUs.
fn sum_cpus(per_cpu: &aya::maps::PerCpuValues<AggValue>) -> AggValue {
    let mut v = AggValue::default();
    for c in per_cpu.iter() {
        v.count += c.count;
        v.sum = v.sum.wrapping_add(c.sum);
    }
    v
}

/// Sizes the ring buffer and sets what follows from the scope, as every session of `plan`
/// needs it (started or resumed). Returns the ring buffer's bytes.
fn prepare_plan(plan: &mut JobPlan, opts: &EngineOptions) -> u32 {
    let ringbuf = if plan.events.is_some() {
        opts.ringbuf_bytes.max(4096).next_power_of_two()
    } else {
        4096
    };
    plan.config.wakeup_bytes = u64::from(ringbuf / 8);
    // The cgroup filter follows the scope, whatever was done to the plan after planning.
    plan.apply_scope();
    ringbuf
}

/// The aggregation map the job's key layout uses.
fn agg_map_name(cfg: &fathom_common::ProbeConfig) -> &'static str {
    if cfg.flags & fathom_common::flags::COMPACT == 0 {
        names::AGG
    } else if cfg.compact_words as usize <= compact::TINY_WORDS {
        names::AGG_TINY
    } else {
        names::AGG_SMALL
    }
}

/// Entries of (AGG_TINY, AGG_SMALL, AGG): the map the job's key layout uses gets them all.
fn agg_sizes(cfg: &fathom_common::ProbeConfig, entries: u32) -> (u32, u32, u32) {
    if cfg.flags & fathom_common::flags::COMPACT == 0 {
        (1, 1, entries)
    } else if cfg.compact_words as usize <= compact::TINY_WORDS {
        (entries, 1, 1)
    } else {
        (1, entries, 1)
    }
}

/// Some links (raw tracepoints) free their program after an RCU grace period rather than
/// when their fd closes. Waits (bounded) until the kernel no longer knows these programs, so
/// that "stopped" means gone, whatever the attach kind.
fn wait_until_released(ids: &[u32]) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        let alive = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .any(|p| ids.contains(&p.id()));
        if !alive {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    tracing::warn!(
        ?ids,
        "programs still loaded 2 s after their links were closed"
    );
}

fn need_btf<'k>(kernel: &'k Kernel, probe: &str) -> Result<&'k aya::Btf, EngineError> {
    kernel
        .btf()
        .ok_or_else(|| kernel_error(probe, Reason::BTFUnavailable, "kernel BTF is unavailable"))
}

/// Puts every item into a filter set map (`PIDS`, `CGROUPS`).
fn fill_set<K: aya::Pod>(ebpf: &mut Ebpf, name: &str, items: &[K]) -> Result<(), String> {
    if items.is_empty() {
        return Ok(());
    }
    let map = ebpf
        .map_mut(name)
        .ok_or_else(|| format!("map {name} missing"))?;
    let mut set: BpfHashMap<_, K, u8> = BpfHashMap::try_from(map).map_err(|e| e.to_string())?;
    for item in items {
        set.insert(item, 1, 0)
            .map_err(|e| format!("filling {name}: {e}"))?;
    }
    Ok(())
}

/// Detaches every link of a program (the program stays loaded until the session drops).
fn detach_all(p: &mut aya::programs::Program) {
    use aya::programs::Program as P;
    // Unloading detaches every link synchronously and closes the program's fd.
    let _ = match p {
        P::TracePoint(x) => x.unload(),
        P::RawTracePoint(x) => x.unload(),
        P::KProbe(x) => x.unload(),
        P::UProbe(x) => x.unload(),
        P::FEntry(x) => x.unload(),
        P::FExit(x) => x.unload(),
        P::PerfEvent(x) => x.unload(),
        P::Lsm(x) => x.unload(),
        _ => Ok(()),
    };
}

fn read_err<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> EngineError {
    move |e| EngineError::Read {
        what: what.into(),
        message: e.to_string(),
    }
}

fn map_fd(m: &aya::maps::Map) -> Option<i32> {
    use aya::maps::Map as M;
    let data = match m {
        M::Array(d)
        | M::PerCpuArray(d)
        | M::HashMap(d)
        | M::PerCpuHashMap(d)
        | M::StackTraceMap(d)
        | M::RingBuf(d) => d,
        _ => return None,
    };
    Some(data.fd().as_fd().as_raw_fd())
}

/// The `memlock:` line of /proc/self/fdinfo/<fd>.
fn fdinfo_memlock(fd: i32) -> u64 {
    fdinfo_field(fd, "memlock").unwrap_or(0)
}

/// A numeric field (`memlock`, `map_id`, `prog_id`) of a BPF object's fd, as the kernel shows it.
fn fdinfo_field(fd: i32, field: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    text.lines().find_map(|l| {
        l.strip_prefix(field)?
            .strip_prefix(':')?
            .trim()
            .parse()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// S1: the only bytecode a job can run is the object compiled into this binary, and a plan
    /// picks its programs by attach kind from a fixed table, never from anything a job or a
    /// request names. Every program the table can pick is in the object; the object's other
    /// program (the verifier canary, which never loads) is never picked.
    #[test]
    fn s1_every_program_a_plan_can_pick_is_built_in_and_vetted() {
        use std::collections::BTreeSet;

        use crate::engine::plan::{Attachment, Role};
        let object = aya_obj::Object::parse(PROGRAMS).expect("the built-in object parses");
        let built_in: BTreeSet<&str> = object.programs.keys().map(String::as_str).collect();
        let f = || "f".to_string();
        let points = [
            AttachPoint::Tracepoint {
                category: "c".into(),
                name: "n".into(),
            },
            AttachPoint::RawTracepoint { name: f() },
            AttachPoint::Kprobe { function: f() },
            AttachPoint::Kretprobe { function: f() },
            AttachPoint::Fentry { function: f() },
            AttachPoint::Fexit { function: f() },
            AttachPoint::Uprobe {
                binary: "/b".into(),
                target: UprobeTarget::Symbol(f()),
                ret: false,
            },
            AttachPoint::Uprobe {
                binary: "/b".into(),
                target: UprobeTarget::Symbol(f()),
                ret: true,
            },
            AttachPoint::Profile { frequency: 99 },
            AttachPoint::Lsm { hook: f() },
            AttachPoint::Xdp { interface: f() },
            AttachPoint::Tc {
                interface: f(),
                egress: false,
            },
            AttachPoint::Tc {
                interface: f(),
                egress: true,
            },
            AttachPoint::CgroupSkb { egress: false },
            AttachPoint::CgroupSkb { egress: true },
            AttachPoint::SockOps,
        ];
        let mut picked = BTreeSet::new();
        for point in points {
            for role in [Role::Main, Role::Stash] {
                let name = Attachment {
                    role,
                    point: point.clone(),
                }
                .program();
                assert!(
                    built_in.contains(name),
                    "{name} is not in the built-in object"
                );
                picked.insert(name);
            }
        }
        let unpicked: Vec<&&str> = built_in.difference(&picked).collect();
        assert_eq!(unpicked, [&"fathom_verifier_canary"]);
    }

    #[test]
    fn verifier_logs_keep_their_end_within_budget() {
        let log: String = (0..500)
            .map(|i| format!("{i}: (b7) r{} = {i}\n", i % 10))
            .collect::<String>()
            + "R1 invalid mem access 'scalar'\nprocessed 500 insns (limit 1000000)\n";
        let s = summarize_verifier_log(&log, 4096);
        assert!(s.len() <= 4096 + 64, "{}", s.len());
        assert!(s.ends_with("processed 500 insns (limit 1000000)"));
        assert!(s.contains("R1 invalid mem access"));
        assert!(s.starts_with("… ("));
        assert_eq!(summarize_verifier_log("short\n", 4096), "short");
    }

    #[test]
    fn the_pin_record_changes_with_spec_scope_and_sizes_only() {
        let spec = |yaml: &str| {
            serde_yaml::from_str::<fathom_crds::TraceJobSpec>(yaml)
                .unwrap()
                .validate()
                .unwrap()
        };
        let a = spec("probe: {tracepoint: syscalls/sys_enter_getppid}");
        let b = spec("probe: {tracepoint: syscalls/sys_enter_getpid}");
        let opts = EngineOptions::default();
        let record = pin_record(&a, &Scope::Node, &opts);
        assert!(
            record.starts_with("record-") && record.len() == 7 + 32,
            "{record}"
        );
        assert_eq!(record, pin_record(&a.clone(), &Scope::Node, &opts.clone()));
        assert_ne!(record, pin_record(&b, &Scope::Node, &opts));
        assert_ne!(record, pin_record(&a, &Scope::targets([7]), &opts));
        let bigger = EngineOptions {
            ringbuf_bytes: opts.ringbuf_bytes * 2,
            ..opts.clone()
        };
        assert_ne!(record, pin_record(&a, &Scope::Node, &bigger));
        let other_node = EngineOptions {
            node: "elsewhere".into(),
            ..opts.clone()
        };
        assert_eq!(record, pin_record(&a, &Scope::Node, &other_node));
    }

    #[test]
    fn pin_directories_are_plain_names_under_the_root() {
        let root = Path::new("/sys/fs/bpf/fathom");
        assert_eq!(
            job_pin_dir(root, "3a4b-5c6d_7").unwrap(),
            root.join("3a4b-5c6d_7")
        );
        for bad in ["", "..", "../etc", "a/b", "a.b", &"x".repeat(129)] {
            assert!(job_pin_dir(root, bad).is_err(), "{bad:?}");
        }
    }
}
