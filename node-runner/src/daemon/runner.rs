//! The runner's loop body: the node's desired assignments → engine sessions, each
//! assignment's status, and cumulative reports for the collector.
//!
//! [`Runner::sync`] takes the whole desired set (what the watch holds), [`Runner::reconcile`]
//! brings the engine to it and says what to write: statuses, reports, finalizers to release.
//! The engine, the cgroup tree and the clock are parameters, so every decision is tested
//! without a kernel or an API server.
//!
//! Per assignment and run:
//! - a new run detaches what the old one had (its final report) and attaches afresh;
//! - `suspend` detaches with phase Stopped, a passed `deadline` with phase Succeeded, a
//!   deletion (or the assignment vanishing) detaches and releases the finalizer;
//! - a refused target ([`targets`](crate::daemon::targets)) or an invalid spec is Failed, an
//!   infeasible probe NotFeasible; a final phase stays until the run changes (the collector
//!   takes no report of a run after its final one);
//! - otherwise `Engine::apply` (idempotent) with the scope resolved from the pods' cgroups,
//!   so a changed pod list re-scopes the job; with an engine that pins (the daemon), a
//!   session a previous runner left pinned is resumed rather than attached twice;
//! - whatever ends a run also removes the assignment's pin directory, so a session pinned by
//!   a previous runner detaches even when this one never ran it.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use fathom_crds::{
    CheckedSpec, FieldError, TracePolicySpec,
    assignment::{AssignmentPhase, TraceAssignmentSpec, TraceAssignmentStatus},
    result::{EventRecord, ResultData},
    tenancy::Reach,
    verdict::Verdict,
};
use fathom_proto::{MAX_EVENTS_PER_REPORT, v1};
use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};

use crate::{
    daemon::{
        cgroups::{CgroupIndex, CgroupRoot},
        pins::Pins,
        targets::{self, CLUSTER_TRACE_JOB, TRACE_JOB},
    },
    engine::{
        error::EngineError,
        plan::{NOTHING_ATTACHED, Scope},
        render::CgroupLabels,
        session::{Applied, Engine},
        stats::CpuWatch,
    },
};

/// Where the runner sees the node's processes (the DaemonSet runs with `hostPID`).
pub const PROC_ROOT: &str = "/proc";

/// The engine as the runner uses it (implemented by [`Engine`]; tests use a fake).
pub trait Probes {
    /// Runs job `id` with `spec` in `scope`; idempotent.
    fn apply(&mut self, id: &str, spec: &CheckedSpec, scope: Scope)
    -> Result<Applied, EngineError>;
    /// The result so far; `None` when `id` is not running.
    fn snapshot(&mut self, id: &str) -> Option<Result<ResultData, EngineError>>;
    /// Detaches `id` (absent is fine) and returns its final result.
    fn detach(&mut self, id: &str) -> Result<Option<ResultData>, EngineError>;
    /// The attached probes and the feasibility verdict of a running `id`.
    fn attached(&self, id: &str) -> Option<(Vec<String>, Verdict)>;
    /// Names the target cgroups of a running `id` (namespace, pod, container) for its keys.
    fn label(&mut self, id: &str, labels: HashMap<u64, CgroupLabels>);
    /// Up to `max` live events of a running `id` not taken yet (oldest first), and how many
    /// its live queue dropped so far; `None` when it is not running or has no events.
    fn take_events(&mut self, id: &str, max: usize) -> Option<(Vec<EventRecord>, u64)> {
        let _ = (id, max);
        None
    }
    /// The CPU budget (percent of one CPU) a running `id` is held to; `None`: none.
    fn cpu_limit(&self, id: &str) -> Option<u32> {
        let _ = id;
        None
    }
    /// The budget of a job that sets none (the runner's `--default-cpu-percent`).
    fn default_cpu_percent(&self) -> Option<u32> {
        None
    }
}

impl Probes for Engine {
    fn apply(
        &mut self,
        id: &str,
        spec: &CheckedSpec,
        scope: Scope,
    ) -> Result<Applied, EngineError> {
        Engine::apply(self, id, spec, scope)
    }

    fn snapshot(&mut self, id: &str) -> Option<Result<ResultData, EngineError>> {
        Engine::snapshot(self, id)
    }

    fn detach(&mut self, id: &str) -> Result<Option<ResultData>, EngineError> {
        Engine::detach(self, id)
    }

    fn attached(&self, id: &str) -> Option<(Vec<String>, Verdict)> {
        self.session(id)
            .map(|s| (s.attached_probes(), s.plan().verdict.clone()))
    }

    fn label(&mut self, id: &str, labels: HashMap<u64, CgroupLabels>) {
        self.label_cgroups(id, labels);
    }

    fn take_events(&mut self, id: &str, max: usize) -> Option<(Vec<EventRecord>, u64)> {
        Engine::take_events(self, id, max)
    }

    fn cpu_limit(&self, id: &str) -> Option<u32> {
        Engine::cpu_limit(self, id)
    }

    fn default_cpu_percent(&self) -> Option<u32> {
        self.options().default_cpu_percent
    }
}

/// This node's cgroups, scanned when scopes are resolved.
pub trait CgroupSource {
    /// One scan; `None` when the node has no cgroup v2 hierarchy (pod-limited jobs then
    /// attach nothing).
    fn index(&self) -> Option<CgroupIndex>;
}

impl CgroupSource for Option<CgroupRoot> {
    fn index(&self) -> Option<CgroupIndex> {
        self.as_ref().map(CgroupRoot::index)
    }
}

/// One TraceAssignment as the watch sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub spec: TraceAssignmentSpec,
    /// `metadata.deletionTimestamp` is set: detach, then release the finalizer.
    pub deleting: bool,
}

/// Which object a status or finalizer release is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AssignmentRef {
    pub uid: String,
    pub name: String,
    pub namespace: String,
}

/// What a reconcile asks the outside world to do.
#[derive(Debug, Default)]
pub struct Output {
    /// Statuses to write (server-side apply on the status subresource).
    pub statuses: Vec<(AssignmentRef, TraceAssignmentStatus)>,
    /// Reports for the collector, in order.
    pub reports: Vec<v1::NodeReport>,
    /// Deleted assignments that have detached: their detach finalizer may go.
    pub release: Vec<AssignmentRef>,
}

/// Runner policy.
#[derive(Clone, Debug)]
pub struct RunnerOptions {
    /// This node's name (reports carry it).
    pub node: String,
    /// Counters are written to the status at most this often (phase changes at once).
    pub status_interval: Duration,
}

/// What the runner knows of one assignment.
struct Tracked {
    desired: Desired,
    run: i64,
    phase: AssignmentPhase,
    /// The engine runs a session for it.
    attached: bool,
    probes: Vec<String>,
    verdict: Option<Verdict>,
    error: Option<String>,
    message: String,
    start_time: Option<SystemTime>,
    result: Option<ResultData>,
    seq: u64,
    /// Live events the engine's queue dropped (not taken in time), cumulative for the run.
    live_dropped: u64,
    final_reported: bool,
    released: bool,
    last_status: Option<(TraceAssignmentStatus, SystemTime)>,
    /// A user-space probe's binary inside the target containers: the process it was found
    /// through, and the path through that process' root.
    binary_root: Option<(u32, PathBuf)>,
    /// The probes' CPU use between report ticks, held to the job's budget.
    cpu: Option<CpuWatch>,
    /// Why the runner ended the run early (the CPU budget), for the result.
    stopped_reason: Option<String>,
}

impl Tracked {
    fn new(desired: Desired) -> Tracked {
        Tracked {
            run: desired.spec.run,
            desired,
            phase: AssignmentPhase::Pending,
            attached: false,
            probes: Vec::new(),
            verdict: None,
            error: None,
            message: String::new(),
            start_time: None,
            result: None,
            seq: 0,
            live_dropped: 0,
            final_reported: false,
            released: false,
            last_status: None,
            binary_root: None,
            cpu: None,
            stopped_reason: None,
        }
    }

    /// Forgets the previous run's state; the sequence number keeps growing.
    fn new_run(&mut self) {
        let seq = self.seq;
        *self = Tracked::new(self.desired.clone());
        self.seq = seq;
    }

    fn assignment(&self) -> AssignmentRef {
        AssignmentRef {
            uid: self.desired.uid.clone(),
            name: self.desired.name.clone(),
            namespace: self.desired.namespace.clone(),
        }
    }

    /// The next sequence number: strictly increasing, and at least the wall clock in
    /// microseconds so that a restarted runner continues above what it sent before.
    fn next_seq(&mut self, now: SystemTime) -> u64 {
        let micros = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        self.seq = (self.seq + 1).max(micros);
        self.seq
    }

    fn status(&self, now: SystemTime) -> TraceAssignmentStatus {
        TraceAssignmentStatus {
            phase: Some(self.phase),
            run: Some(self.run),
            attached_probes: self.probes.clone(),
            counters: self
                .result
                .as_ref()
                .map(|r| r.totals.clone())
                .unwrap_or_default(),
            verdict: self.verdict.clone(),
            error: self.error.clone(),
            start_time: self.start_time.and_then(time),
            last_report_time: time(now),
        }
    }

    fn report(&mut self, node: &str, now: SystemTime, is_final: bool) -> v1::NodeReport {
        let spec = &self.desired.spec;
        let kind = match spec.job.kind.as_str() {
            TRACE_JOB => v1::JobKind::TraceJob,
            CLUSTER_TRACE_JOB => v1::JobKind::ClusterTraceJob,
            _ => v1::JobKind::Unspecified,
        };
        // Live events the engine's queue dropped are user-space drops of this result too.
        let live_dropped = self.live_dropped;
        let result = self.result.clone().map(|mut r| {
            r.events.clear();
            r.totals.events_dropped += live_dropped;
            if r.stopped_reason.is_none() {
                r.stopped_reason.clone_from(&self.stopped_reason);
            }
            v1::ResultData::from(r)
        });
        let counters = self.result.as_ref().map(|r| v1::Counters {
            hits: r.totals.hits,
            map_full: r.totals.map_full,
            ringbuf_lost: r.totals.events_lost,
            rate_limited: r.totals.rate_limited,
            user_dropped: r.totals.events_dropped + self.live_dropped,
            transport_dropped: 0,
        });
        let message = match (&self.error, &self.verdict) {
            (Some(e), _) => e.clone(),
            (None, Some(v)) if !v.feasible => v
                .first_problem()
                .map(|p| format!("{}: {}", p.probe, p.message))
                .unwrap_or_default(),
            _ => self.message.clone(),
        };
        let state = v1::AssignmentState {
            phase: v1::AssignmentPhase::from(self.phase) as i32,
            attached_probes: self.probes.clone(),
            message,
            verdict: self.verdict.clone().map(Into::into),
        };
        let seq = self.next_seq(now);
        let spec = &self.desired.spec;
        v1::NodeReport {
            job_uid: spec.job.uid.clone(),
            job_kind: kind as i32,
            job_namespace: spec.job.namespace.clone().unwrap_or_default(),
            job_name: spec.job.name.clone(),
            assignment_name: self.desired.name.clone(),
            assignment_uid: self.desired.uid.clone(),
            node: node.to_string(),
            run: u64::try_from(self.run).unwrap_or(0),
            seq,
            result,
            event_batch: None,
            counters,
            state: Some(state),
            r#final: is_final,
        }
    }
}

/// The batch of `events`, none when there are none.
fn batch_of(events: &[EventRecord]) -> Option<v1::EventBatch> {
    (!events.is_empty()).then(|| v1::EventBatch::from_records(events))
}

fn time(t: SystemTime) -> Option<Time> {
    Timestamp::try_from(t).ok().map(Time)
}

/// The node's assignments and what the engine runs for them.
pub struct Runner<P, C> {
    opts: RunnerOptions,
    probes: P,
    cgroups: C,
    pins: Option<Pins>,
    desired: BTreeMap<String, Desired>,
    tracked: BTreeMap<String, Tracked>,
}

impl<P: Probes, C: CgroupSource> Runner<P, C> {
    pub fn new(opts: RunnerOptions, probes: P, cgroups: C, pins: Option<Pins>) -> Self {
        Runner {
            opts,
            probes,
            cgroups,
            pins,
            desired: BTreeMap::new(),
            tracked: BTreeMap::new(),
        }
    }

    pub fn probes(&self) -> &P {
        &self.probes
    }

    /// Replaces the desired set with what the watch holds now.
    pub fn sync(&mut self, desired: impl IntoIterator<Item = Desired>) {
        self.desired = desired.into_iter().map(|d| (d.uid.clone(), d)).collect();
    }

    /// At start, before the first reconcile: removes the pin directories of assignments not
    /// in the desired set (T1). Returns the uids removed.
    pub fn sweep_pins(&self) -> Vec<String> {
        let Some(pins) = &self.pins else {
            return Vec::new();
        };
        let wanted: BTreeSet<String> = self
            .desired
            .values()
            .filter(|d| !d.deleting)
            .map(|d| d.uid.clone())
            .collect();
        match pins.sweep(&wanted) {
            Ok(swept) => swept.removed,
            Err(e) => {
                tracing::warn!(error = %e, root = %pins.root().display(), "sweeping stale pins failed");
                Vec::new()
            }
        }
    }

    /// Brings the engine to the desired set. `report` also sends a report for every attached
    /// assignment (the periodic tick); changes of phase are reported either way.
    pub fn reconcile(&mut self, now: SystemTime, report: bool) -> Output {
        let mut out = Output::default();
        // Gone from the API altogether (deleted without our finalizer, or the label moved).
        let gone: Vec<String> = self
            .tracked
            .keys()
            .filter(|uid| !self.desired.contains_key(*uid))
            .cloned()
            .collect();
        for uid in gone {
            if let Some(mut t) = self.tracked.remove(&uid) {
                self.finish(&mut t, AssignmentPhase::Stopped, now, &mut out);
                self.unpin(&uid);
            }
        }
        let index = self
            .desired
            .values()
            .any(|d| !d.deleting && !d.spec.node_wide)
            .then(|| self.cgroups.index())
            .flatten();
        let desired: Vec<Desired> = self.desired.values().cloned().collect();
        for d in desired {
            let mut t = self
                .tracked
                .remove(&d.uid)
                .unwrap_or_else(|| Tracked::new(d.clone()));
            t.desired = d;
            self.step(&mut t, index.as_ref(), now, report, &mut out);
            self.tracked.insert(t.desired.uid.clone(), t);
        }
        out
    }

    /// One assignment's step.
    fn step(
        &mut self,
        t: &mut Tracked,
        index: Option<&CgroupIndex>,
        now: SystemTime,
        report: bool,
        out: &mut Output,
    ) {
        let spec = t.desired.spec.clone();
        if t.desired.deleting {
            if !t.released {
                self.finish(t, AssignmentPhase::Stopped, now, out);
                self.unpin(&t.desired.uid);
                // The final status goes before the finalizer (the writer keeps this order).
                self.write_status(t, now, out);
                out.release.push(t.assignment());
                t.released = true;
            }
            return;
        }
        if spec.run != t.run {
            self.finish(t, AssignmentPhase::Stopped, now, out);
            t.new_run();
        }
        if spec.suspend {
            self.finish(t, AssignmentPhase::Stopped, now, out);
            return self.write_status(t, now, out);
        }
        let deadline_passed = spec
            .deadline
            .as_ref()
            .is_some_and(|d| SystemTime::from(d.0) <= now);
        if deadline_passed {
            self.finish(t, AssignmentPhase::Succeeded, now, out);
            return self.write_status(t, now, out);
        }
        if t.phase.is_final() {
            // Final for this run: the collector takes no report after the final one, so only
            // a new run attaches again.
            return;
        }
        let before = t.phase;
        self.attach(t, index, now);
        if t.phase.is_final() {
            // Refused, invalid or infeasible: detach whatever an earlier spec had running.
            let phase = t.phase;
            self.finish(t, phase, now, out);
        } else if t.attached && (report || t.phase != before) {
            if let Some(Ok(r)) = self.probes.snapshot(&t.desired.uid) {
                t.result = Some(r);
            }
            let cpu_ns = t
                .result
                .as_ref()
                .and_then(|r| r.budget.as_ref())
                .map(|b| b.cpu_ns);
            let over = match (self.probes.cpu_limit(&t.desired.uid), cpu_ns) {
                (Some(limit), Some(ns)) => {
                    let at = now.duration_since(UNIX_EPOCH).unwrap_or_default();
                    t.cpu
                        .get_or_insert_with(|| CpuWatch::new(Some(limit)))
                        .observe(at, ns)
                        .and_then(|r| r.over_budget)
                }
                _ => None,
            };
            if let Some(reason) = over {
                tracing::warn!(uid = %t.desired.uid, %reason, "stopping the job");
                t.error = Some(reason.clone());
                t.stopped_reason = Some(reason);
                self.finish(t, AssignmentPhase::Failed, now, out);
                return self.write_status(t, now, out);
            }
            out.reports.push(t.report(&self.opts.node, now, false));
        } else if t.phase != before {
            out.reports.push(t.report(&self.opts.node, now, false));
        }
        self.write_status(t, now, out);
    }

    /// Validates, scopes and applies the assignment; sets phase and state.
    fn attach(&mut self, t: &mut Tracked, index: Option<&CgroupIndex>, now: SystemTime) {
        let spec = &t.desired.spec;
        let checked = match spec.trace.validate() {
            Ok(c) => c,
            Err(errors) => return fail(t, AssignmentPhase::Failed, in_assignment(&errors)),
        };
        let resolved = match targets::resolve(spec, index) {
            Ok(r) => r,
            Err(e) => return fail(t, AssignmentPhase::Failed, format!("refused: {e}")),
        };
        let nothing = !resolved.scope.attaches();
        let mut checked = checked;
        // Anything but a ClusterTraceJob is held to the tenant rules, under the TracePolicy
        // the operator copied into the assignment (admission and the operator refuse the
        // same; the node checks again, and checks what only it can tell).
        if spec.job.kind != CLUSTER_TRACE_JOB {
            let default_policy = TracePolicySpec::default();
            let (name, policy) = spec
                .policy
                .as_ref()
                .map_or(("(none)", &default_policy), |p| (p.name.as_str(), &p.spec));
            if !policy.allow.kernel_addresses {
                checked.reach = Reach::Namespace;
            }
            let refused = spec.trace.tenant_refusals_under(name, policy);
            if !refused.is_empty() {
                return fail(t, AssignmentPhase::Failed, in_assignment(&refused));
            }
            checked.cpu_percent = spec
                .trace
                .cpu_percent_under(policy, self.probes.default_cpu_percent());
        }
        let in_containers = !matches!(resolved.scope, Scope::Node);
        if in_containers && let Some(binary) = targets::user_binary(&mut checked.probe) {
            // A pod-limited job names the binary as its containers see it.
            if nothing {
                // No target container here: nothing to look the binary up in, and nothing
                // to attach (the engine would check the path on the host).
                if t.attached
                    && let Ok(Some(r)) = self.probes.detach(&t.desired.uid)
                {
                    t.result = Some(r);
                }
                t.attached = false;
                t.binary_root = None;
                t.probes.clear();
                t.phase = AssignmentPhase::Attached;
                t.error = None;
                t.message = NOTHING_ATTACHED.to_string();
                return;
            }
            match targets::container_binary(
                Path::new(PROC_ROOT),
                binary,
                resolved.pids(),
                t.binary_root.as_ref(),
            ) {
                Some((pid, path)) => {
                    *binary = path.display().to_string();
                    t.binary_root = Some((pid, path));
                }
                None => {
                    let n = resolved.containers.len();
                    let msg = format!(
                        "spec.trace.probe: {binary} is in none of the {n} target container(s) on this node (looked up through /proc/<pid>/root of their processes); name the binary as the container sees it"
                    );
                    return fail(t, AssignmentPhase::Failed, msg);
                }
            }
        }
        let labels = resolved.labels();
        match self.probes.apply(&t.desired.uid, &checked, resolved.scope) {
            Ok(applied) => {
                if applied == Applied::Resumed {
                    tracing::info!(uid = %t.desired.uid, "resumed the session a previous runner left pinned");
                }
                if applied != Applied::Unchanged || !t.attached {
                    t.start_time = Some(now);
                    t.result = None;
                    t.cpu = None;
                    if let Some(pins) = &self.pins
                        && let Err(e) = pins.mark(&t.desired.uid)
                    {
                        tracing::warn!(uid = %t.desired.uid, error = %e, "marking the pin directory failed");
                    }
                }
                self.probes.label(&t.desired.uid, labels);
                t.attached = true;
                t.phase = AssignmentPhase::Attached;
                t.error = None;
                t.message = if nothing {
                    NOTHING_ATTACHED.to_string()
                } else if resolved.unresolved > 0 {
                    format!(
                        "{} container(s) of the target pods have no cgroup on this node yet",
                        resolved.unresolved
                    )
                } else {
                    String::new()
                };
                if let Some((probes, verdict)) = self.probes.attached(&t.desired.uid) {
                    t.probes = probes;
                    t.verdict = Some(verdict);
                }
            }
            Err(EngineError::NotFeasible(v)) => {
                t.attached = false;
                t.verdict = Some(v);
                fail(t, AssignmentPhase::NotFeasible, String::new());
                t.error = None;
            }
            Err(e) => {
                t.attached = false;
                fail(t, AssignmentPhase::Failed, e.to_string());
            }
        }
    }

    /// Detaches (when attached), sets a final phase and sends the final report, once per run.
    fn finish(
        &mut self,
        t: &mut Tracked,
        phase: AssignmentPhase,
        now: SystemTime,
        out: &mut Output,
    ) {
        // The live events not taken yet go with the final report (at most one batch; what
        // remains in the engine's queue is dropped with the session).
        let mut last_events = Vec::new();
        if t.attached
            && let Some((events, dropped)) = self
                .probes
                .take_events(&t.desired.uid, MAX_EVENTS_PER_REPORT)
        {
            t.live_dropped = dropped;
            last_events = events;
        }
        if t.attached {
            match self.probes.detach(&t.desired.uid) {
                Ok(Some(r)) => t.result = Some(r),
                Ok(None) => {}
                Err(e) => t.error = Some(format!("detaching: {e}")),
            }
            t.attached = false;
            t.probes.clear();
        }
        // Also when not attached here: a session a previous process left pinned (a restart
        // that finds the assignment suspended or past its deadline) detaches with its pins.
        self.unpin(&t.desired.uid);
        if !t.phase.is_final() {
            t.phase = phase;
        }
        if !t.final_reported {
            let mut r = t.report(&self.opts.node, now, true);
            r.event_batch = batch_of(&last_events);
            out.reports.push(r);
            t.final_reported = true;
        }
    }

    /// Adds the status when it changed, or when counters are older than the interval.
    fn write_status(&self, t: &mut Tracked, now: SystemTime, out: &mut Output) {
        let status = t.status(now);
        let due = match &t.last_status {
            None => true,
            Some((last, at)) => {
                let same = TraceAssignmentStatus {
                    last_report_time: None,
                    counters: Default::default(),
                    ..last.clone()
                } == TraceAssignmentStatus {
                    last_report_time: None,
                    counters: Default::default(),
                    ..status.clone()
                };
                !same
                    || (last.counters != status.counters
                        && now.duration_since(*at).unwrap_or_default() >= self.opts.status_interval)
            }
        };
        if due {
            t.last_status = Some((status.clone(), now));
            out.statuses.push((t.assignment(), status));
        }
    }

    fn unpin(&self, uid: &str) {
        if let Some(pins) = &self.pins
            && let Err(e) = pins.remove(uid)
        {
            tracing::warn!(uid, error = %e, "removing the pin directory failed");
        }
    }

    /// Reports carrying the live events of the attached assignments: batches of at most
    /// [`MAX_EVENTS_PER_REPORT`], each in a report with the latest cumulative result (no new
    /// snapshot) and its own seq; at most `max_batches` per assignment, the rest waits in the
    /// engine's bounded queue (which counts what it drops, in `counters.user_dropped`).
    pub fn report_events(&mut self, now: SystemTime, max_batches: usize) -> Vec<v1::NodeReport> {
        let mut reports = Vec::new();
        for t in self.tracked.values_mut() {
            if !t.attached || t.phase.is_final() || t.desired.deleting {
                continue;
            }
            for _ in 0..max_batches {
                let Some((events, dropped)) = self
                    .probes
                    .take_events(&t.desired.uid, MAX_EVENTS_PER_REPORT)
                else {
                    break;
                };
                t.live_dropped = dropped;
                if events.is_empty() {
                    break;
                }
                let full = events.len() == MAX_EVENTS_PER_REPORT;
                let mut r = t.report(&self.opts.node, now, false);
                r.event_batch = batch_of(&events);
                reports.push(r);
                if !full {
                    break;
                }
            }
        }
        reports
    }

    /// Raises an assignment's next sequence number above what the collector acknowledged
    /// (its answer to a duplicate after a restart).
    pub fn acknowledged(&mut self, uid: &str, seq: u64) {
        if let Some(t) = self.tracked.get_mut(uid) {
            t.seq = t.seq.max(seq);
        }
    }

    /// The uids the engine runs.
    pub fn attached(&self) -> Vec<String> {
        self.tracked
            .values()
            .filter(|t| t.attached)
            .map(|t| t.desired.uid.clone())
            .collect()
    }
}

/// Field errors of a job's spec as the assignment names them (`spec.trace.<field>`), joined.
fn in_assignment(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(|e| {
            let field = e.field.strip_prefix("spec.").unwrap_or(&e.field);
            format!("spec.trace.{field}: {}", e.message)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn fail(t: &mut Tracked, phase: AssignmentPhase, error: String) {
    t.phase = phase;
    t.error = (!error.is_empty()).then_some(error);
    t.probes.clear();
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, rc::Rc};

    use fathom_crds::{
        assignment::{JobRef, TargetContainer, TargetPod},
        result::Totals,
        spec::TraceJobSpec,
        verdict::{ProbeVerdict, Reason},
    };

    use super::*;

    const C1: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const POD: &str = "1a2b3c4d-0000-1111-2222-333344445555";

    /// What the fake engine was asked, shared with the test.
    #[derive(Default)]
    struct Calls {
        running: BTreeMap<String, (CheckedSpec, Scope, u64)>,
        applies: Vec<(String, Scope)>,
        detaches: Vec<String>,
        labels: BTreeMap<String, HashMap<u64, CgroupLabels>>,
        infeasible: bool,
        /// Live events waiting in the engine, and how many it dropped.
        events: u64,
        events_dropped: u64,
        /// The CPU budget of every job, and the probes' CPU time (ns) each snapshot adds.
        cpu_limit: Option<u32>,
        cpu_ns_per_snapshot: u64,
        cpu_ns: u64,
    }

    #[derive(Clone, Default)]
    struct FakeEngine(Rc<RefCell<Calls>>);

    impl Probes for FakeEngine {
        fn apply(
            &mut self,
            id: &str,
            spec: &CheckedSpec,
            scope: Scope,
        ) -> Result<Applied, EngineError> {
            let mut c = self.0.borrow_mut();
            if c.infeasible {
                return Err(EngineError::NotFeasible(Verdict {
                    feasible: false,
                    probes: vec![ProbeVerdict {
                        probe: "kprobe:nope".into(),
                        feasible: false,
                        reason: Some(Reason::SymbolNotFound),
                        message: "no such function".into(),
                    }],
                }));
            }
            c.applies.push((id.to_string(), scope.clone()));
            let applied = match c.running.get(id) {
                Some((s, sc, _)) if s == spec && *sc == scope => Applied::Unchanged,
                Some(_) => Applied::Restarted,
                None => Applied::Started,
            };
            if applied != Applied::Unchanged {
                c.running.insert(id.to_string(), (spec.clone(), scope, 0));
            }
            Ok(applied)
        }

        fn snapshot(&mut self, id: &str) -> Option<Result<ResultData, EngineError>> {
            let mut c = self.0.borrow_mut();
            let (_, _, hits) = c.running.get_mut(id)?;
            *hits += 10;
            let mut r = result(*hits);
            c.cpu_ns += c.cpu_ns_per_snapshot;
            r.budget = Some(fathom_crds::result::Budget {
                cpu_ns: c.cpu_ns,
                ..Default::default()
            });
            Some(Ok(r))
        }

        fn cpu_limit(&self, id: &str) -> Option<u32> {
            let c = self.0.borrow();
            c.running.get(id).and(c.cpu_limit)
        }

        fn detach(&mut self, id: &str) -> Result<Option<ResultData>, EngineError> {
            let mut c = self.0.borrow_mut();
            c.detaches.push(id.to_string());
            Ok(c.running.remove(id).map(|(_, _, h)| result(h + 1)))
        }

        fn take_events(&mut self, id: &str, max: usize) -> Option<(Vec<EventRecord>, u64)> {
            let mut c = self.0.borrow_mut();
            c.running.get(id)?;
            let n = c.events.min(max as u64);
            c.events -= n;
            let events = (0..n)
                .map(|i| EventRecord {
                    time_ns: i,
                    ..Default::default()
                })
                .collect();
            Some((events, c.events_dropped))
        }

        fn attached(&self, id: &str) -> Option<(Vec<String>, Verdict)> {
            self.0.borrow().running.get(id).map(|_| {
                (
                    vec!["tracepoint:syscalls/sys_enter_getppid".to_string()],
                    Verdict {
                        feasible: true,
                        probes: Vec::new(),
                    },
                )
            })
        }

        fn label(&mut self, id: &str, labels: HashMap<u64, CgroupLabels>) {
            self.0.borrow_mut().labels.insert(id.to_string(), labels);
        }
    }

    fn result(hits: u64) -> ResultData {
        ResultData {
            totals: Totals {
                hits,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// A cgroup tree in a temp dir with one container of POD.
    struct Tree(std::path::PathBuf, u64);

    impl Tree {
        fn new(name: &str) -> Tree {
            let dir =
                std::env::temp_dir().join(format!("fathom-runner-{name}-{}", std::process::id()));
            let c = dir.join(format!("kubepods/besteffort/pod{POD}/{C1}"));
            std::fs::create_dir_all(&c).unwrap();
            let id = crate::engine::render::cgroup_id(&c).unwrap();
            Tree(dir, id)
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn trace() -> TraceJobSpec {
        serde_yaml::from_str("probe: {tracepoint: syscalls/sys_enter_getppid}").unwrap()
    }

    fn desired(uid: &str, kind: &str, ns: Option<&str>, pods: &[&str]) -> Desired {
        Desired {
            uid: uid.into(),
            name: format!("a-{uid}"),
            namespace: "fathom-system".into(),
            deleting: false,
            spec: TraceAssignmentSpec {
                job: JobRef {
                    kind: kind.into(),
                    name: "j".into(),
                    namespace: ns.map(Into::into),
                    uid: "job-1".into(),
                },
                run: 1,
                node_name: "node-a".into(),
                trace: trace(),
                node_wide: false,
                target_pods: pods
                    .iter()
                    .map(|ns| TargetPod {
                        namespace: (*ns).into(),
                        name: "p".into(),
                        uid: POD.into(),
                        qos_class: None,
                        containers: vec![TargetContainer {
                            name: "c".into(),
                            container_id: Some(format!("containerd://{C1}")),
                        }],
                    })
                    .collect(),
                deadline: None,
                suspend: false,
                policy: None,
            },
        }
    }

    fn runner(tree: &Tree) -> (Runner<FakeEngine, Option<CgroupRoot>>, FakeEngine) {
        let engine = FakeEngine::default();
        let r = Runner::new(
            RunnerOptions {
                node: "node-a".into(),
                status_interval: Duration::from_secs(30),
            },
            engine.clone(),
            Some(CgroupRoot::at(&tree.0)),
            None,
        );
        (r, engine)
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
    }

    fn phase(out: &Output) -> Option<AssignmentPhase> {
        out.statuses.last().and_then(|(_, s)| s.phase)
    }

    #[test]
    fn live_events_go_in_batches_of_at_most_max_events_per_report_with_drops_counted() {
        let tree = Tree::new("events");
        let (mut r, engine) = runner(&tree);
        r.sync([desired("u1", TRACE_JOB, Some("shop"), &["shop"])]);
        let first = r.reconcile(at(0), false).reports[0].seq;
        engine.0.borrow_mut().events = 2_500;
        engine.0.borrow_mut().events_dropped = 7;
        let out = r.report_events(at(1), 16);
        let batches: Vec<usize> = out
            .iter()
            .map(|r| r.event_batch.as_ref().map_or(0, |b| b.len()))
            .collect();
        assert_eq!(batches, vec![1000, 1000, 500]);
        assert!(out.windows(2).all(|w| w[0].seq < w[1].seq) && out[0].seq > first);
        let c = out[2].counters.unwrap();
        assert_eq!(c.user_dropped, 7, "the engine's live-queue drops");
        assert_eq!(
            out[2]
                .result
                .as_ref()
                .unwrap()
                .totals
                .as_ref()
                .unwrap()
                .events_dropped,
            7
        );
        assert!(
            r.report_events(at(2), 16).is_empty(),
            "nothing new: no report"
        );
        // At most `max_batches` per call; the rest waits.
        engine.0.borrow_mut().events = 3_000;
        assert_eq!(r.report_events(at(3), 2).len(), 2);
        assert_eq!(r.report_events(at(4), 2).len(), 1);
    }

    /// A TraceJob's assignment is planned for a namespace (the engine checks kernel addresses
    /// and argument counts); one that breaks a tenant rule (which admission and the operator
    /// refuse too) fails with the rule's name and reaches no engine. A ClusterTraceJob's is
    /// planned for the node.
    #[test]
    fn a_tracejobs_assignment_is_held_to_the_tenant_rules() {
        let tree = Tree::new("tenant");
        let (mut r, engine) = runner(&tree);
        r.sync([desired("u1", TRACE_JOB, Some("shop"), &["shop"])]);
        assert_eq!(
            phase(&r.reconcile(at(0), false)),
            Some(AssignmentPhase::Attached)
        );
        let reach = |uid: &str| engine.0.borrow().running.get(uid).map(|(s, _, _)| s.reach);
        assert_eq!(reach("u1"), Some(Reach::Namespace));

        let mut kprobe = desired("u2", TRACE_JOB, Some("shop"), &["shop"]);
        kprobe.spec.trace = serde_yaml::from_str("probe: {kprobe: tcp_v4_connect}").unwrap();
        r.sync([kprobe]);
        let out = r.reconcile(at(1), false);
        assert_eq!(phase(&out), Some(AssignmentPhase::Failed));
        let message = out.statuses.last().and_then(|(_, s)| s.error.clone());
        assert!(
            message
                .as_deref()
                .is_some_and(|m| m.contains("spec.trace.probe.kprobe")
                    && m.contains(fathom_crds::tenancy::RULE_PROBE_KIND)),
            "{message:?}"
        );
        assert!(!engine.0.borrow().applies.iter().any(|(id, _)| id == "u2"));

        let mut cluster = desired("u3", CLUSTER_TRACE_JOB, None, &["shop"]);
        cluster.spec.trace = serde_yaml::from_str("probe: {kprobe: tcp_v4_connect}").unwrap();
        r.sync([cluster]);
        r.reconcile(at(2), false);
        assert_eq!(reach("u3"), Some(Reach::Node));
    }

    /// The TracePolicy the operator copied into a TraceJob's assignment relaxes the node's
    /// checks as it says (a kprobe; kernel addresses: the job is planned for the node) and
    /// sets the job's CPU budget; without it the same job is refused.
    #[test]
    fn the_assignments_trace_policy_relaxes_the_tenant_rules_and_sets_the_cpu_budget() {
        let tree = Tree::new("policy");
        let (mut r, engine) = runner(&tree);
        let policy = |allow: serde_json::Value| {
            Some(fathom_crds::AssignedPolicy {
                name: "net-debug".into(),
                spec: serde_json::from_value(serde_json::json!({
                    "allow": allow,
                    "limits": {"defaultCpuPercent": 5, "maxCpuPercent": 20},
                }))
                .unwrap(),
            })
        };
        let mut kprobe = desired("u1", TRACE_JOB, Some("shop"), &["shop"]);
        kprobe.spec.trace = serde_yaml::from_str("probe: {kprobe: tcp_v4_connect}").unwrap();
        kprobe.spec.policy = policy(serde_json::json!({"probeKinds": ["kprobe"]}));
        let mut addresses = desired("u2", TRACE_JOB, Some("shop"), &["shop"]);
        addresses.spec.trace =
            serde_yaml::from_str("probe: {rawTracepoint: sys_enter}\nlimits: {cpuPercent: 15}")
                .unwrap();
        addresses.spec.policy = policy(serde_json::json!({"kernelAddresses": true}));
        r.sync([kprobe, addresses]);
        r.reconcile(at(0), false);
        let running = |uid: &str| {
            engine
                .0
                .borrow()
                .running
                .get(uid)
                .map(|(s, _, _)| (s.reach, s.cpu_percent))
        };
        assert_eq!(running("u1"), Some((Reach::Namespace, Some(5))));
        assert_eq!(running("u2"), Some((Reach::Node, Some(15))));

        // The same kprobe job under a policy that does not allow it is refused.
        let mut denied = desired("u3", TRACE_JOB, Some("shop"), &["shop"]);
        denied.spec.trace = serde_yaml::from_str("probe: {kprobe: tcp_v4_connect}").unwrap();
        denied.spec.policy = policy(serde_json::json!({"payload": true}));
        r.sync([denied]);
        let out = r.reconcile(at(1), false);
        assert_eq!(phase(&out), Some(AssignmentPhase::Failed));
        assert!(!engine.0.borrow().applies.iter().any(|(id, _)| id == "u3"));
    }

    #[test]
    fn a_namespaced_assignment_attaches_to_its_pods_cgroups_once() {
        let tree = Tree::new("attach");
        let (mut r, engine) = runner(&tree);
        r.sync([desired("u1", TRACE_JOB, Some("shop"), &["shop"])]);
        let out = r.reconcile(at(0), false);
        assert_eq!(phase(&out), Some(AssignmentPhase::Attached));
        assert_eq!(out.reports.len(), 1);
        let report = &out.reports[0];
        assert_eq!(
            (
                report.node.as_str(),
                report.assignment_uid.as_str(),
                report.run,
                report.r#final
            ),
            ("node-a", "u1", 1, false)
        );
        assert_eq!(report.job_kind, v1::JobKind::TraceJob as i32);
        assert_eq!(
            engine.0.borrow().applies,
            vec![("u1".to_string(), Scope::targets([tree.1]))]
        );
        // Its keys name the pod, not the cgroup id.
        let names = HashMap::from([(
            tree.1,
            CgroupLabels {
                namespace: "shop".into(),
                pod: "p".into(),
                container: "c".into(),
            },
        )]);
        assert_eq!(engine.0.borrow().labels.get("u1"), Some(&names));
        // Unchanged: nothing to write, nothing to report unless it is the tick.
        let out = r.reconcile(at(1), false);
        assert!(out.statuses.is_empty() && out.reports.is_empty(), "{out:?}");
        let out = r.reconcile(at(2), true);
        assert_eq!(out.reports.len(), 1);
        assert!(out.reports[0].seq > report.seq);
        assert_eq!(out.reports[0].counters.as_ref().unwrap().hits, 20);
        assert_eq!(r.attached(), vec!["u1"]);
    }

    #[test]
    fn a_foreign_pod_is_refused_and_nothing_attaches() {
        let tree = Tree::new("refuse");
        let (mut r, engine) = runner(&tree);
        r.sync([desired("u1", TRACE_JOB, Some("shop"), &["kube-system"])]);
        let out = r.reconcile(at(0), false);
        let (_, status) = out.statuses.last().unwrap();
        assert_eq!(status.phase, Some(AssignmentPhase::Failed));
        let error = status.error.as_deref().unwrap();
        assert!(error.contains("spec.targetPods[0].namespace"), "{error}");
        assert!(engine.0.borrow().applies.is_empty());
        assert!(out.reports[0].r#final);
        // Final phases stay: no re-apply, no second final report.
        let out = r.reconcile(at(1), true);
        assert!(out.reports.is_empty() && out.statuses.is_empty());
    }

    #[test]
    fn pods_elsewhere_attach_nothing_and_say_so() {
        let tree = Tree::new("nothing");
        let (mut r, engine) = runner(&tree);
        let mut d = desired("u1", CLUSTER_TRACE_JOB, None, &["shop"]);
        d.spec.target_pods[0].uid = "99999999-0000-1111-2222-333344445555".into();
        r.sync([d]);
        let out = r.reconcile(at(0), false);
        assert_eq!(engine.0.borrow().applies[0].1, Scope::Nothing);
        let state = out.reports[0].state.as_ref().unwrap();
        assert_eq!(state.message, NOTHING_ATTACHED);
    }

    #[test]
    fn a_changed_pod_list_rescopes_the_job() {
        let tree = Tree::new("rescope");
        let (mut r, engine) = runner(&tree);
        let mut d = desired("u1", TRACE_JOB, Some("shop"), &["shop"]);
        d.spec.target_pods[0].containers[0].container_id = None;
        r.sync([d.clone()]);
        r.reconcile(at(0), false);
        d.spec.target_pods[0].containers[0].container_id = Some(format!("containerd://{C1}"));
        r.sync([d]);
        r.reconcile(at(1), false);
        let applies = &engine.0.borrow().applies;
        assert_eq!(applies[0].1, Scope::Nothing);
        assert_eq!(applies[1].1, Scope::targets([tree.1]));
    }

    #[test]
    fn deletion_detaches_reports_final_and_releases_the_finalizer() {
        let tree = Tree::new("delete");
        let (mut r, engine) = runner(&tree);
        let mut d = desired("u1", TRACE_JOB, Some("shop"), &["shop"]);
        r.sync([d.clone()]);
        r.reconcile(at(0), true);
        d.deleting = true;
        r.sync([d.clone()]);
        let out = r.reconcile(at(1), false);
        assert_eq!(engine.0.borrow().detaches, vec!["u1"]);
        assert_eq!(out.release.len(), 1);
        assert_eq!(
            phase(&out),
            Some(AssignmentPhase::Stopped),
            "final status first"
        );
        assert_eq!(out.statuses[0].1.counters.hits, 11);
        let last = out.reports.last().unwrap();
        assert!(last.r#final);
        assert_eq!(
            last.counters.as_ref().unwrap().hits,
            11,
            "the final result is the detach's"
        );
        // Seen again while the finalizer goes: nothing more.
        r.sync([d]);
        let out = r.reconcile(at(2), true);
        assert!(out.release.is_empty() && out.reports.is_empty());
        r.sync([]);
        assert!(r.reconcile(at(3), true).reports.is_empty());
    }

    #[test]
    fn a_vanished_assignment_is_detached() {
        let tree = Tree::new("vanish");
        let (mut r, engine) = runner(&tree);
        r.sync([desired("u1", TRACE_JOB, Some("shop"), &["shop"])]);
        r.reconcile(at(0), false);
        r.sync([]);
        let out = r.reconcile(at(1), false);
        assert_eq!(engine.0.borrow().detaches, vec!["u1"]);
        assert!(out.reports[0].r#final);
        assert!(r.attached().is_empty());
    }

    #[test]
    fn suspend_stops_and_a_deadline_succeeds() {
        let tree = Tree::new("stop");
        let (mut r, _) = runner(&tree);
        let mut a = desired("u1", TRACE_JOB, Some("shop"), &["shop"]);
        let mut b = desired("u2", TRACE_JOB, Some("shop"), &["shop"]);
        b.spec.deadline = Some(Time(Timestamp::try_from(at(5)).unwrap()));
        r.sync([a.clone(), b.clone()]);
        r.reconcile(at(0), false);
        a.spec.suspend = true;
        r.sync([a, b]);
        let out = r.reconcile(at(5), false);
        let phases: BTreeMap<String, Option<AssignmentPhase>> = out
            .statuses
            .iter()
            .map(|(a, s)| (a.uid.clone(), s.phase))
            .collect();
        assert_eq!(phases["u1"], Some(AssignmentPhase::Stopped));
        assert_eq!(phases["u2"], Some(AssignmentPhase::Succeeded));
        assert_eq!(out.reports.iter().filter(|r| r.r#final).count(), 2);
        assert!(r.attached().is_empty());
    }

    #[test]
    fn probes_over_their_cpu_budget_for_three_seconds_are_stopped_with_the_figure() {
        let tree = Tree::new("cpu");
        let (mut r, engine) = runner(&tree);
        {
            let mut c = engine.0.borrow_mut();
            c.cpu_limit = Some(10);
            // 0.5 s of probe CPU per 1 s tick: 50 % of a CPU.
            c.cpu_ns_per_snapshot = 500_000_000;
        }
        r.sync([desired("u1", TRACE_JOB, Some("shop"), &["shop"])]);
        r.reconcile(at(0), false);
        // Measured from the attach (0 s): over at 1 s and 2 s; a tick under the budget (3 s)
        // resets; over again at 4 s and 5 s; stopped at 6 s, 3 s over in a row.
        for t in 1..=2 {
            let out = r.reconcile(at(t), true);
            assert_eq!(phase(&out), None, "still attached at {t} s");
        }
        engine.0.borrow_mut().cpu_ns_per_snapshot = 10_000_000; // 1 %
        r.reconcile(at(3), true);
        engine.0.borrow_mut().cpu_ns_per_snapshot = 500_000_000;
        for t in 4..=5 {
            let out = r.reconcile(at(t), true);
            assert_eq!(phase(&out), None, "over for {} s only at {t} s", t - 3);
        }
        let out = r.reconcile(at(6), true);
        assert_eq!(phase(&out), Some(AssignmentPhase::Failed));
        let (_, status) = out.statuses.last().unwrap();
        let error = status.error.clone().unwrap();
        assert!(
            error.starts_with("CPU budget exceeded: the probes used 50.0% of a CPU for 3 s")
                && error.contains("spec.limits.cpuPercent=10"),
            "{error}"
        );
        let last = out.reports.last().unwrap();
        assert!(last.r#final);
        assert_eq!(
            last.result
                .as_ref()
                .and_then(|r| r.stopped_reason.as_deref()),
            Some(error.as_str())
        );
        assert_eq!(engine.0.borrow().detaches, vec!["u1".to_string()]);
        assert!(r.attached().is_empty());
        // A job without a budget is never stopped, whatever it uses.
        engine.0.borrow_mut().cpu_limit = None;
        r.sync([desired("u2", TRACE_JOB, Some("shop"), &["shop"])]);
        for t in 10..=20 {
            let out = r.reconcile(at(t), true);
            assert!(
                out.statuses
                    .iter()
                    .all(|(_, s)| s.phase != Some(AssignmentPhase::Failed))
            );
        }
        assert_eq!(r.attached(), vec!["u2".to_string()]);
    }

    #[test]
    fn a_new_run_ends_the_old_one_and_starts_afresh() {
        let tree = Tree::new("run");
        let (mut r, engine) = runner(&tree);
        let mut d = desired("u1", TRACE_JOB, Some("shop"), &["shop"]);
        r.sync([d.clone()]);
        let first = r.reconcile(at(0), false).reports[0].seq;
        d.spec.run = 2;
        r.sync([d]);
        let out = r.reconcile(at(0), false);
        assert_eq!(engine.0.borrow().detaches, vec!["u1"]);
        let runs: Vec<(u64, bool)> = out.reports.iter().map(|r| (r.run, r.r#final)).collect();
        assert_eq!(runs, vec![(1, true), (2, false)]);
        assert!(out.reports[0].seq > first && out.reports[1].seq > out.reports[0].seq);
    }

    #[test]
    fn infeasible_probes_are_not_feasible_with_the_verdict() {
        let tree = Tree::new("infeasible");
        let (mut r, engine) = runner(&tree);
        engine.0.borrow_mut().infeasible = true;
        r.sync([desired("u1", TRACE_JOB, Some("shop"), &["shop"])]);
        let out = r.reconcile(at(0), false);
        let (_, status) = out.statuses.last().unwrap();
        assert_eq!(status.phase, Some(AssignmentPhase::NotFeasible));
        assert!(!status.verdict.as_ref().unwrap().feasible);
        let state = out.reports[0].state.as_ref().unwrap();
        assert_eq!(state.message, "kprobe:nope: no such function");
        assert!(out.reports[0].r#final);
    }

    #[test]
    fn an_invalid_spec_fails_naming_the_field() {
        let tree = Tree::new("invalid");
        let (mut r, _) = runner(&tree);
        let mut d = desired("u1", TRACE_JOB, Some("shop"), &["shop"]);
        d.spec.trace.probe = Default::default();
        r.sync([d]);
        let out = r.reconcile(at(0), false);
        let (_, status) = out.statuses.last().unwrap();
        assert_eq!(status.phase, Some(AssignmentPhase::Failed));
        assert!(
            status.error.as_deref().unwrap().starts_with("spec.trace."),
            "{status:?}"
        );
    }

    #[test]
    fn counters_reach_the_status_at_most_every_interval() {
        let tree = Tree::new("interval");
        let (mut r, _) = runner(&tree);
        r.sync([desired("u1", TRACE_JOB, Some("shop"), &["shop"])]);
        assert_eq!(r.reconcile(at(0), true).statuses.len(), 1);
        assert!(r.reconcile(at(10), true).statuses.is_empty());
        let out = r.reconcile(at(31), true);
        assert_eq!(out.statuses.len(), 1);
        assert!(out.statuses[0].1.counters.hits > 0);
    }

    #[test]
    fn ending_a_run_removes_pins_a_previous_runner_left() {
        let tree = Tree::new("leftover");
        let pins = Pins::at(tree.0.join("pins"));
        let left = pins.mark("u1").unwrap();
        let engine = FakeEngine::default();
        let mut r = Runner::new(
            RunnerOptions {
                node: "node-a".into(),
                status_interval: Duration::from_secs(30),
            },
            engine.clone(),
            Some(CgroupRoot::at(&tree.0)),
            Some(pins),
        );
        let mut d = desired("u1", TRACE_JOB, Some("shop"), &["shop"]);
        d.spec.suspend = true;
        r.sync([d]);
        let out = r.reconcile(at(0), false);
        assert_eq!(phase(&out), Some(AssignmentPhase::Stopped));
        assert!(
            engine.0.borrow().detaches.is_empty(),
            "not running in this engine"
        );
        assert!(!left.exists(), "the pins go all the same");
    }

    #[test]
    fn sequence_numbers_continue_above_an_acknowledgement() {
        let tree = Tree::new("ack");
        let (mut r, _) = runner(&tree);
        r.sync([desired("u1", TRACE_JOB, Some("shop"), &["shop"])]);
        r.reconcile(at(0), false);
        r.acknowledged("u1", u64::MAX / 2);
        let out = r.reconcile(at(1), true);
        assert_eq!(out.reports[0].seq, u64::MAX / 2 + 1);
    }
}
