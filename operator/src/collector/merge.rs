//! The merge core: pure, no I/O. Per job and per assignment it keeps the latest accepted
//! report (each one CUMULATIVE since the assignment attached), and merges them into one
//! [`ResultData`] with its coverage and loss.
//!
//! A report with a seq not above the last accepted one of its assignment is a duplicate:
//! discarded and counted. A higher seq REPLACES the previous report, never adds to it, so
//! retries and reconnects cannot count anything twice.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use fathom_crds::{
    assignment::JobRef,
    result::{Bucket, EventRecord, Histogram, OtherRow, ResultData, Row, Totals, top_rows},
    trace_result::{MAX_RESULT_BYTES, bound_result},
};
use fathom_proto::{
    MAX_EVENTS_PER_REPORT,
    v1::{self, AssignmentPhase, Counters, Coverage, JobKind, RejectionCode},
};

use super::events::EventWindow;

/// An assignment the operator knows, as the API has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpectedAssignment {
    /// metadata.name (in the operator's namespace, where every assignment lives).
    pub name: String,
    /// metadata.uid: the key reports are kept under.
    pub uid: String,
    /// spec.nodeName.
    pub node: String,
    /// spec.run.
    pub run: u64,
}

/// What the operator knows of one job: kept current by the reconciler.
#[derive(Clone, Debug, PartialEq)]
pub struct JobInfo {
    /// The job (kind, name, namespace, uid).
    pub job: JobRef,
    /// Where its TraceResult lives: the job's namespace for a TraceJob (where its tenant reads
    /// it), the operator's for a ClusterTraceJob.
    pub result_namespace: String,
    pub result_name: String,
    /// The job's current run (status.run).
    pub run: u64,
    /// The probe, value kind and keys, for a result nobody reported into yet.
    pub probe: String,
    pub value: String,
    pub keys: Vec<String>,
    /// Rows kept (spec.aggregate.top, default 50).
    pub top: usize,
    /// Events kept (spec.events.last, default 100).
    pub events_last: usize,
    /// The job's assignments as listed from the API.
    pub assignments: Vec<ExpectedAssignment>,
}

/// Rows kept when the job says nothing (spec.aggregate.top's default).
pub const DEFAULT_TOP: usize = 50;
/// Events kept when the job says nothing (spec.events.last's default).
pub const DEFAULT_EVENTS_LAST: usize = 100;
/// New events buffered for watchers between two updates; beyond it the oldest are dropped.
pub const MAX_PENDING_EVENTS: usize = 10_000;

/// The collector's answer to one report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Accept {
    /// Applied: it replaced the assignment's previous report.
    Accepted { seq: u64 },
    /// seq not above the last accepted one (`acked`): discarded and counted.
    Duplicate { acked: u64 },
    /// Not applied, for `reason`.
    Rejected {
        code: RejectionCode,
        reason: String,
        acked: u64,
    },
}

impl Accept {
    /// The acknowledgement the runner gets.
    pub fn ack(&self, assignment_uid: &str) -> v1::ReportAck {
        let (acked, rejection) = match self {
            Accept::Accepted { seq } => (*seq, None),
            Accept::Duplicate { acked } => (
                *acked,
                Some(v1::Rejection {
                    code: RejectionCode::Duplicate as i32,
                    reason: format!("seq not above {acked}, the last accepted: discarded"),
                }),
            ),
            Accept::Rejected {
                code,
                reason,
                acked,
            } => (
                *acked,
                Some(v1::Rejection {
                    code: *code as i32,
                    reason: reason.clone(),
                }),
            ),
        };
        v1::ReportAck {
            assignment_uid: assignment_uid.to_string(),
            acknowledged_seq: acked,
            rejection,
        }
    }
}

/// A stable category of a rejection code, as gRPC names it: metric label and log field.
pub fn category(code: RejectionCode) -> &'static str {
    match code {
        RejectionCode::WrongNode => "PermissionDenied",
        RejectionCode::UnknownAssignment => "NotFound",
        RejectionCode::JobMismatch | RejectionCode::Invalid => "InvalidArgument",
        RejectionCode::StaleRun => "FailedPrecondition",
        RejectionCode::Duplicate => "AlreadyExists",
        RejectionCode::Unspecified => "Unknown",
    }
}

/// The latest accepted report of one assignment.
#[derive(Clone, Debug, Default)]
struct Slot {
    node: String,
    run: u64,
    seq: u64,
    result: Option<ResultData>,
    counters: Counters,
    phase: i32,
    final_: bool,
}

/// One job: its expected assignments, their latest reports, its last events.
#[derive(Debug)]
struct JobState {
    info: JobInfo,
    slots: HashMap<String, Slot>,
    /// The last `info.events_last` events.
    events: EventWindow,
    /// Events accepted since watchers were last sent an update.
    pending_events: EventWindow,
    /// Grows with every accepted report.
    version: u64,
}

/// The merge of one job, as written and streamed.
#[derive(Clone, Debug, PartialEq)]
pub struct Merged {
    pub job: JobRef,
    pub result_namespace: String,
    pub result_name: String,
    pub run: u64,
    /// Bounded with [`bound_result`] under [`MAX_RESULT_BYTES`]; events included.
    pub data: ResultData,
    pub coverage: Coverage,
    /// Volume and loss summed over the nodes, transport loss included.
    pub counters: Counters,
    /// Every expected node sent its final report (or failed).
    pub finished: bool,
    /// Grows with every accepted report.
    pub version: u64,
}

/// Every job's reports; the whole of the collector's state. No I/O.
#[derive(Debug, Default)]
pub struct MergeState {
    jobs: HashMap<String, JobState>,
    by_assignment: HashMap<String, String>,
    duplicates: u64,
    rejected: u64,
}

impl MergeState {
    /// Sets what the operator knows of a job (from the API): replaces its expected
    /// assignments; keeps the reports already accepted.
    pub fn set_job(&mut self, mut info: JobInfo) {
        info.top = info.top.max(1);
        let uid = info.job.uid.clone();
        for a in &info.assignments {
            self.by_assignment.insert(a.uid.clone(), uid.clone());
        }
        match self.jobs.get_mut(&uid) {
            Some(j) => {
                let gone: Vec<String> = j
                    .info
                    .assignments
                    .iter()
                    .filter(|a| !info.assignments.iter().any(|b| b.uid == a.uid))
                    .map(|a| a.uid.clone())
                    .collect();
                for g in gone {
                    self.by_assignment.remove(&g);
                }
                if j.info.run != info.run {
                    j.version += 1;
                }
                j.events.bound(info.events_last);
                j.info = info;
            }
            None => {
                self.jobs.insert(
                    uid,
                    JobState {
                        info,
                        slots: HashMap::new(),
                        events: EventWindow::default(),
                        pending_events: EventWindow::default(),
                        version: 1,
                    },
                );
            }
        }
    }

    /// Forgets a job that is gone.
    pub fn forget_job(&mut self, uid: &str) {
        if let Some(j) = self.jobs.remove(uid) {
            for a in j.info.assignments {
                self.by_assignment.remove(&a.uid);
            }
        }
    }

    /// Duplicates discarded so far.
    pub fn duplicates_discarded(&self) -> u64 {
        self.duplicates
    }

    /// Reports rejected so far (duplicates not included).
    pub fn rejected(&self) -> u64 {
        self.rejected
    }

    /// The known jobs' uids.
    pub fn job_uids(&self) -> Vec<String> {
        self.jobs.keys().cloned().collect()
    }

    /// The uid of the job of this kind, namespace and name.
    pub fn find_job(&self, kind: &str, namespace: Option<&str>, name: &str) -> Option<String> {
        self.jobs
            .values()
            .find(|j| {
                j.info.job.kind == kind
                    && j.info.job.namespace.as_deref() == namespace
                    && j.info.job.name == name
            })
            .map(|j| j.info.job.uid.clone())
    }

    /// A job's version: grows with every accepted report (0 when unknown).
    pub fn version(&self, uid: &str) -> u64 {
        self.jobs.get(uid).map_or(0, |j| j.version)
    }

    /// Whether a node reported into the job's current run.
    pub fn has_reports(&self, uid: &str, run: u64) -> bool {
        self.jobs
            .get(uid)
            .is_some_and(|j| j.slots.values().any(|s| s.run == run))
    }

    /// Takes the events accepted since the last call, oldest first.
    pub fn take_new_events(&mut self, uid: &str) -> Vec<EventRecord> {
        self.jobs
            .get_mut(uid)
            .map(|j| j.pending_events.take())
            .unwrap_or_default()
    }

    /// Checks `report` against what the operator knows and the stream's node `peer_node`,
    /// and applies it when it is new.
    pub fn accept(&mut self, peer_node: &str, report: &v1::NodeReport) -> Accept {
        let out = self.check_and_apply(peer_node, report);
        match &out {
            Accept::Duplicate { .. } => self.duplicates += 1,
            Accept::Rejected { .. } => self.rejected += 1,
            Accept::Accepted { .. } => {}
        }
        out
    }

    fn check_and_apply(&mut self, peer_node: &str, r: &v1::NodeReport) -> Accept {
        let reject = |code, reason: String, acked| Accept::Rejected {
            code,
            reason,
            acked,
        };
        if r.assignment_uid.is_empty() || r.job_uid.is_empty() || r.node.is_empty() {
            return reject(
                RejectionCode::Invalid,
                "job_uid, assignment_uid and node are required".into(),
                0,
            );
        }
        let Some(job) = self
            .by_assignment
            .get(&r.assignment_uid)
            .and_then(|uid| self.jobs.get_mut(uid))
        else {
            return reject(
                RejectionCode::UnknownAssignment,
                format!(
                    "assignment {} (uid {}) is unknown to the operator: deleted, or not seen yet",
                    r.assignment_name, r.assignment_uid
                ),
                0,
            );
        };
        let Some(expected) = job
            .info
            .assignments
            .iter()
            .find(|a| a.uid == r.assignment_uid)
        else {
            return reject(
                RejectionCode::UnknownAssignment,
                format!("assignment uid {} is unknown", r.assignment_uid),
                0,
            );
        };
        let acked = job.slots.get(&r.assignment_uid).map_or(0, |s| s.seq);
        if expected.name != r.assignment_name {
            return reject(
                RejectionCode::UnknownAssignment,
                format!(
                    "assignment uid {} is named {}, not {}",
                    r.assignment_uid, expected.name, r.assignment_name
                ),
                acked,
            );
        }
        if expected.node != peer_node || r.node != peer_node {
            return reject(
                RejectionCode::WrongNode,
                format!(
                    "assignment {} belongs to node {}; the report says node {} and the stream is authenticated as node {}",
                    expected.name, expected.node, r.node, peer_node
                ),
                acked,
            );
        }
        let job_ref = &job.info.job;
        let kind = match JobKind::try_from(r.job_kind) {
            Ok(JobKind::TraceJob) => "TraceJob",
            Ok(JobKind::ClusterTraceJob) => "ClusterTraceJob",
            _ => "",
        };
        let namespace = (!r.job_namespace.is_empty()).then_some(r.job_namespace.as_str());
        if r.job_uid != job_ref.uid
            || kind != job_ref.kind
            || namespace != job_ref.namespace.as_deref()
            || r.job_name != job_ref.name
        {
            return reject(
                RejectionCode::JobMismatch,
                format!(
                    "assignment {} belongs to {} {}/{} (uid {}), not {kind} {}/{} (uid {})",
                    expected.name,
                    job_ref.kind,
                    job_ref.namespace.as_deref().unwrap_or(""),
                    job_ref.name,
                    job_ref.uid,
                    r.job_namespace,
                    r.job_name,
                    r.job_uid
                ),
                acked,
            );
        }
        if r.run < expected.run {
            return reject(
                RejectionCode::StaleRun,
                format!(
                    "run {} is older than the assignment's run {}",
                    r.run, expected.run
                ),
                acked,
            );
        }
        if r.run > expected.run {
            return reject(
                RejectionCode::Invalid,
                format!(
                    "run {} is newer than the assignment's run {} the operator knows",
                    r.run, expected.run
                ),
                acked,
            );
        }
        if r.seq <= acked {
            return Accept::Duplicate { acked };
        }
        let phase = r
            .state
            .as_ref()
            .map_or(AssignmentPhase::Unspecified as i32, |s| s.phase);
        if !matches!(AssignmentPhase::try_from(phase), Ok(p) if p != AssignmentPhase::Unspecified) {
            return reject(
                RejectionCode::Invalid,
                "state.phase is unspecified".into(),
                acked,
            );
        }
        if let Some(batch) = &r.event_batch {
            if let Err(e) = batch.check() {
                return reject(RejectionCode::Invalid, e.to_string(), acked);
            }
            if batch.len() > MAX_EVENTS_PER_REPORT {
                return reject(
                    RejectionCode::Invalid,
                    format!(
                        "event_batch holds {} events, more than {MAX_EVENTS_PER_REPORT}",
                        batch.len()
                    ),
                    acked,
                );
            }
        }
        if let Some(s) = job.slots.get(&r.assignment_uid)
            && s.final_
            && s.run == r.run
        {
            return reject(
                RejectionCode::Invalid,
                format!("run {} already had its final report", r.run),
                acked,
            );
        }
        let slot = Slot {
            node: r.node.clone(),
            run: r.run,
            seq: r.seq,
            result: r.result.clone().map(ResultData::from),
            counters: r.counters.unwrap_or_default(),
            phase,
            final_: r.r#final,
        };
        job.slots.insert(r.assignment_uid.clone(), slot);
        if let Some(batch) = &r.event_batch {
            // Shared by both windows; rendered only when read.
            let batch = Arc::new(batch.clone());
            job.events.push(batch.clone(), job.info.events_last);
            job.pending_events.push(batch, MAX_PENDING_EVENTS);
        }
        job.version += 1;
        Accept::Accepted { seq: r.seq }
    }

    /// The merge of job `uid`, or `None` when the operator does not know it.
    pub fn merged(&self, uid: &str) -> Option<Merged> {
        let job = self.jobs.get(uid)?;
        Some(merge_job(job))
    }
}

/// A histogram's buckets being summed: (low, high) → count.
type Buckets = BTreeMap<(u64, u64), u64>;

fn merge_job(job: &JobState) -> Merged {
    let info = &job.info;
    let run = info.run;
    let slots: Vec<&Slot> = job.slots.values().filter(|s| s.run == run).collect();
    let mut data = ResultData {
        probe: info.probe.clone(),
        value: info.value.clone(),
        keys: info.keys.clone(),
        ..Default::default()
    };
    let mut rows: HashMap<&BTreeMap<String, String>, u64> = HashMap::new();
    let mut other = OtherRow::default();
    let mut hists: HashMap<&BTreeMap<String, String>, Buckets> = HashMap::new();
    let mut counters = Counters::default();
    let mut truncated = false;
    for s in &slots {
        add_counters(&mut counters, &s.counters);
        let Some(r) = &s.result else { continue };
        if data.probe.is_empty() {
            data.probe.clone_from(&r.probe);
        }
        if data.value.is_empty() {
            data.value.clone_from(&r.value);
        }
        if data.keys.is_empty() {
            data.keys.clone_from(&r.keys);
        }
        for row in &r.rows {
            *rows.entry(&row.keys).or_default() += row.value;
        }
        if let Some(o) = &r.other {
            other.rows += o.rows;
            other.value += o.value;
        }
        for h in &r.histograms {
            let buckets = hists.entry(&h.keys).or_default();
            for b in &h.buckets {
                *buckets.entry((b.low, b.high)).or_default() += b.count;
            }
        }
        add_totals(&mut data.totals, &r.totals);
        truncated |= r.truncated;
        data.elapsed_seconds = data.elapsed_seconds.max(r.elapsed_seconds);
        if data.stopped_reason.is_none() {
            data.stopped_reason.clone_from(&r.stopped_reason);
        }
    }
    let rows: Vec<Row> = rows
        .into_iter()
        .map(|(keys, value)| Row {
            keys: keys.clone(),
            value,
        })
        .collect();
    let (rows, cut) = top_rows(rows, info.top);
    if let Some(c) = cut {
        other.rows += c.rows;
        other.value += c.value;
        truncated = true;
    }
    data.rows = rows;
    data.other = (other.rows > 0 || other.value > 0).then_some(other);
    let mut histograms: Vec<Histogram> = hists
        .into_iter()
        .map(|(keys, buckets)| {
            let buckets: Vec<Bucket> = buckets
                .into_iter()
                .map(|((low, high), count)| Bucket { low, high, count })
                .collect();
            Histogram {
                keys: keys.clone(),
                count: buckets.iter().map(|b| b.count).sum(),
                buckets,
            }
        })
        .collect();
    histograms.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.keys.cmp(&b.keys)));
    data.histograms = histograms;
    data.events = job.events.records();
    // Events the runners dropped on the way here (spool full, broken streams) are user-space
    // drops of the result: they show in its totals and its EventsLost degradation.
    data.totals.events_dropped += counters.transport_dropped;
    data.degraded = data.totals.degradations();
    data.truncated = truncated;
    bound_result(&mut data, MAX_RESULT_BYTES);

    let mut expected_nodes: Vec<&str> = info
        .assignments
        .iter()
        .filter(|a| a.run == run)
        .map(|a| a.node.as_str())
        .chain(slots.iter().map(|s| s.node.as_str()))
        .collect();
    expected_nodes.sort_unstable();
    expected_nodes.dedup();
    let failed = |p: i32| {
        matches!(
            AssignmentPhase::try_from(p),
            Ok(AssignmentPhase::Failed | AssignmentPhase::NotFeasible)
        )
    };
    let coverage = Coverage {
        nodes_reported: slots.len() as u32,
        nodes_expected: expected_nodes.len() as u32,
        nodes_finished: slots.iter().filter(|s| s.final_).count() as u32,
        nodes_failed: slots.iter().filter(|s| failed(s.phase)).count() as u32,
    };
    let finished = !expected_nodes.is_empty()
        && expected_nodes.iter().all(|n| {
            slots
                .iter()
                .any(|s| s.node == *n && (s.final_ || failed(s.phase)))
        });
    Merged {
        job: info.job.clone(),
        result_namespace: info.result_namespace.clone(),
        result_name: info.result_name.clone(),
        run,
        data,
        coverage,
        counters,
        finished,
        version: job.version,
    }
}

fn add_counters(to: &mut Counters, c: &Counters) {
    to.hits += c.hits;
    to.map_full += c.map_full;
    to.ringbuf_lost += c.ringbuf_lost;
    to.rate_limited += c.rate_limited;
    to.user_dropped += c.user_dropped;
    to.transport_dropped += c.transport_dropped;
}

fn add_totals(to: &mut Totals, t: &Totals) {
    to.hits += t.hits;
    to.distinct_keys += t.distinct_keys;
    to.events_emitted += t.events_emitted;
    to.events_delivered += t.events_delivered;
    to.events_lost += t.events_lost;
    to.events_dropped += t.events_dropped;
    to.map_full += t.map_full;
    to.rate_limited += t.rate_limited;
    to.stack_errors += t.stack_errors;
    to.unpaired += t.unpaired;
    to.filtered += t.filtered;
}
