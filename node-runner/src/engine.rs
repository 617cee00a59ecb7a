//! The engine: load the vetted kernel programs with a plan's configuration, attach them all
//! or none, read their maps and ring buffer, detach synchronously.
//!
//! One [`Session`] is one job on one machine; `fathom run`, the node runner and the tests all
//! drive it the same way.

use std::{
    collections::VecDeque,
    fs,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf, StackTraceMap},
    programs::{
        FEntry, FExit, KProbe, Lsm, PerfEvent, ProgramError, RawTracePoint, TracePoint, UProbe,
        perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent},
        uprobe::{UProbeAttachLocation, UProbeScope},
    },
    sys::{Stats, SyscallError, enable_stats},
    util::online_cpus,
};
use fathom_common::{AggKey, AggValue, Event, compact, counter, names};
use fathom_crds::{
    CheckedSpec,
    result::{Budget, EventRecord, ResultData, Totals},
    spec::MAX_MAP_ENTRIES,
    verdict::Reason,
};

use crate::{
    error::EngineError,
    kernel::Kernel,
    plan::{AttachPoint, JobPlan, Scope, UprobeTarget},
    render::{Cgroups, Renderer, StackFrames},
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
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            ringbuf_bytes: 1 << 20,
            stack_entries: 4096,
            stash_entries: 16384,
            verifier_log_budget: 4096,
            node: hostname(),
            stats_duty: 0.1,
        }
    }
}

/// This machine's name.
pub fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// The kernel's BPF run-time statistics cost every program run two clock reads (about
/// 75 ns per hit here, more than the probe itself), so they are switched on for a window of
/// each second only — the first window at start — and the readings are scaled up by the
/// share of time they were on. `duty` 1.0 keeps them on.
pub struct RunTimeSampler {
    fd: Option<OwnedFd>,
    duty: f64,
    started: Instant,
    on_since: Option<Instant>,
    sampled: Duration,
    last_off: Instant,
}

/// The sampling period of the run-time statistics.
const STATS_PERIOD: Duration = Duration::from_secs(1);

impl RunTimeSampler {
    pub fn start(duty: f64) -> RunTimeSampler {
        let now = Instant::now();
        let fd = enable_stats(Stats::RunTime).ok();
        RunTimeSampler {
            on_since: fd.as_ref().map(|_| now),
            fd,
            duty: duty.clamp(0.01, 1.0),
            started: now,
            sampled: Duration::ZERO,
            last_off: now,
        }
    }

    /// A sampler that never switches the statistics on (a session with nothing attached has
    /// no programs to measure).
    pub fn off() -> RunTimeSampler {
        let now = Instant::now();
        RunTimeSampler {
            fd: None,
            duty: 1.0,
            started: now,
            on_since: None,
            sampled: Duration::ZERO,
            last_off: now,
        }
    }

    /// Switches the statistics on or off as the period goes.
    pub fn tick(&mut self) {
        if self.duty >= 1.0 {
            return;
        }
        let now = Instant::now();
        let window = STATS_PERIOD.mul_f64(self.duty);
        match self.on_since {
            Some(since) if now.duration_since(since) >= window => {
                self.fd = None;
                self.sampled += now.duration_since(since);
                self.on_since = None;
                self.last_off = now;
            }
            None if now.duration_since(self.last_off) >= STATS_PERIOD - window => {
                self.fd = enable_stats(Stats::RunTime).ok();
                self.on_since = self.fd.as_ref().map(|_| now);
            }
            _ => {}
        }
    }

    /// Whole run time over sampled time (1 when always on, or before any sample).
    pub fn scale(&self) -> f64 {
        let now = Instant::now();
        let sampled = self.sampled
            + self
                .on_since
                .map_or(Duration::ZERO, |s| now.duration_since(s));
        let total = now.duration_since(self.started);
        if sampled.is_zero() || self.duty >= 1.0 {
            1.0
        } else {
            total.as_secs_f64() / sampled.as_secs_f64()
        }
    }
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

/// An upper bound of the locked kernel memory a job may use with these options: what the
/// maps' sizes allow, with room for the kernel's per-element overhead (RELIABILITY E6).
pub fn memlock_budget(plan: &JobPlan, opts: &EngineOptions) -> u64 {
    let cpus = online_cpus().map(|c| c.len() as u64).unwrap_or(1).max(1);
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
    let small = 256 * 1024;
    let programs = plan.attachments.len() as u64 * 64 * 1024;
    agg + stacks + ring + stash + small + programs
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
}

/// The jobs of one machine by id (an assignment's uid, or a file name): applying the same
/// job again changes nothing, detaching an absent job succeeds (RELIABILITY E1).
pub struct Engine {
    kernel: Kernel,
    opts: EngineOptions,
    jobs: std::collections::BTreeMap<String, (CheckedSpec, Scope, Session)>,
}

impl Engine {
    pub fn new(kernel: Kernel, opts: EngineOptions) -> Engine {
        Engine {
            kernel,
            opts,
            jobs: Default::default(),
        }
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
        let plan = crate::plan::plan(spec, &self.kernel, scope.clone())?;
        let session = Session::start(plan, &self.kernel, self.opts.clone())?;
        self.jobs
            .insert(id.to_string(), (spec.clone(), scope, session));
        Ok(if restarted {
            Applied::Restarted
        } else {
            Applied::Started
        })
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
            if kernel.lockdown().is_some_and(|l| l != "none") {
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
    /// whose scope is [`Scope::Nothing`] loads and attaches nothing.
    pub fn start(
        plan: JobPlan,
        kernel: &Kernel,
        opts: EngineOptions,
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
        let ringbuf = if plan.events.is_some() {
            opts.ringbuf_bytes.max(4096).next_power_of_two()
        } else {
            4096
        };
        let mut plan = plan;
        plan.config.wakeup_bytes = u64::from(ringbuf / 8);
        // The cgroup filter follows the scope, whatever was done to the plan after planning.
        plan.apply_scope();
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
        let (tiny, small, full) = agg_sizes(&plan.config, map_entries);
        let mut loader = EbpfLoader::new();
        // The kernel's BTF, parsed once per Kernel, instead of once per load.
        loader.btf(kernel.btf());
        loader
            .override_global(names::CONFIG, &plan.config, true)
            .override_global(names::STASH_CONFIG, &plan.stash, true)
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
                    p.attach(category, name).map_err(perr)?;
                }
                AttachPoint::RawTracepoint { name } => {
                    let p: &mut RawTracePoint = prog.try_into().map_err(perr)?;
                    if p.fd().is_err() {
                        p.load().map_err(perr)?;
                    }
                    p.attach(name).map_err(perr)?;
                }
                AttachPoint::Kprobe { function } | AttachPoint::Kretprobe { function } => {
                    let p: &mut KProbe = prog.try_into().map_err(perr)?;
                    if p.fd().is_err() {
                        p.load().map_err(perr)?;
                    }
                    p.attach(function, 0).map_err(perr)?;
                }
                AttachPoint::Fentry { function } => {
                    let btf = need_btf(kernel, &probe)?;
                    let p: &mut FEntry = prog.try_into().map_err(perr)?;
                    p.load(function, btf).map_err(perr)?;
                    p.attach().map_err(perr)?;
                }
                AttachPoint::Fexit { function } => {
                    let btf = need_btf(kernel, &probe)?;
                    let p: &mut FExit = prog.try_into().map_err(perr)?;
                    p.load(function, btf).map_err(perr)?;
                    p.attach().map_err(perr)?;
                }
                AttachPoint::Lsm { hook } => {
                    let btf = need_btf(kernel, &probe)?;
                    let p: &mut Lsm = prog.try_into().map_err(perr)?;
                    p.load(hook, btf).map_err(perr)?;
                    p.attach().map_err(perr)?;
                }
                AttachPoint::Uprobe { binary, target, .. } => {
                    let path = crate::elf::resolve_binary(binary)
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
                    p.attach(location, &path, UProbeScope::AllProcesses)
                        .map_err(perr)?;
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
                        p.attach(
                            PerfEventConfig::Software(SoftwareEvent::CpuClock),
                            PerfEventScope::AllProcessesOneCpu { cpu },
                            SamplePolicy::Frequency(u64::from(*frequency)),
                            true,
                        )
                        .map_err(perr)?;
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
        tracing::info!(job = %label, scope = %plan.scope, links = link_count, "attached");
        Ok(Session::new(
            Some(ebpf),
            plan,
            opts,
            stats,
            ring,
            link_count,
        ))
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
        }
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
        if self.ebpf.is_some() {
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
            self.stats.tick();
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

    fn drain_ring(&mut self) -> usize {
        self.stats.tick();
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
        let Some(ebpf) = &self.ebpf else {
            return Ok(Counters::default());
        };
        let map = ebpf.map(names::COUNTERS).expect("COUNTERS in object");
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
        let mut ns = 0;
        let mut runs = 0;
        for (_, p) in self.ebpf.iter().flat_map(Ebpf::programs) {
            if let Ok(info) = p.info() {
                ns += info.run_time().as_nanos() as u64;
                runs += info.run_count();
            }
        }
        let scale = self.stats.scale();
        ((ns as f64 * scale) as u64, (runs as f64 * scale) as u64)
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
        total
    }

    fn aggregate_entries(&self) -> Result<Vec<(AggKey, AggValue)>, EngineError> {
        let sum = |per_cpu: &aya::maps::PerCpuValues<AggValue>| {
            let mut v = AggValue::default();
            for c in per_cpu.iter() {
                v.count += c.count;
                v.sum = v.sum.wrapping_add(c.sum);
            }
            v
        };
        let mut out = Vec::new();
        let Some(ebpf) = &self.ebpf else {
            return Ok(out);
        };
        // A key deleted between listing and lookup is skipped, not an error.
        let cfg = &self.plan.config;
        let slots = cfg.compact_slots;
        if cfg.flags & fathom_common::flags::COMPACT != 0
            && cfg.compact_words as usize <= compact::TINY_WORDS
        {
            let map = ebpf.map(names::AGG_TINY).expect("AGG_TINY in object");
            let agg: PerCpuHashMap<_, [u64; compact::TINY_WORDS], AggValue> =
                PerCpuHashMap::try_from(map).map_err(read_err("aggregation map"))?;
            for (k, per_cpu) in agg.iter().flatten() {
                let w = [k[0], k[1], 0, 0];
                out.push((compact::unpack(&w, &slots), sum(&per_cpu)));
            }
        } else if cfg.flags & fathom_common::flags::COMPACT != 0 {
            let map = ebpf.map(names::AGG_SMALL).expect("AGG_SMALL in object");
            let agg: PerCpuHashMap<_, [u64; compact::WORDS], AggValue> =
                PerCpuHashMap::try_from(map).map_err(read_err("aggregation map"))?;
            for (k, per_cpu) in agg.iter().flatten() {
                out.push((compact::unpack(&k, &slots), sum(&per_cpu)));
            }
        } else {
            let map = ebpf.map(names::AGG).expect("AGG in object");
            let agg: PerCpuHashMap<_, AggKey, AggValue> =
                PerCpuHashMap::try_from(map).map_err(read_err("aggregation map"))?;
            for (k, per_cpu) in agg.iter().flatten() {
                out.push((k, sum(&per_cpu)));
            }
        }
        Ok(out)
    }

    fn stack_frames(&self, entries: &[(AggKey, AggValue)]) -> StackFrames {
        let mut frames = StackFrames::new();
        let Some(map) = self.ebpf.as_ref().and_then(|e| e.map(names::STACKS)) else {
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
        let entries = if self.plan.aggregate {
            self.aggregate_entries()?
        } else {
            Vec::new()
        };
        let stacks = self.stack_frames(&entries);
        let mut renderer = Renderer {
            plan: &self.plan,
            node: &self.opts.node,
            stacks: &stacks,
            symbols: &mut self.symbols,
            cgroups: &mut self.cgroups,
        };
        let (rows, other, histograms, truncated) = renderer.aggregate(&entries);
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
            distinct_keys: entries.len() as u64,
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
        let ids: Vec<u32> = self
            .ebpf
            .iter()
            .flat_map(Ebpf::programs)
            .filter_map(|(_, p)| p.info().ok().map(|i| i.id()))
            .collect();
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
    fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
