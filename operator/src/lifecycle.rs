//! The lifecycle of a job as a pure function: (job, its spec's validation, its plan, its
//! assignments, now) → the status to write, the assignments to apply and delete, the events
//! to publish, and when to look again.
//!
//! Phases: Pending → Running (a node attached) → Succeeded (the duration ran out and every node
//! sent its final report, or the grace period ran out: the laggards are named) / Failed
//! (invalid spec, node-wide TraceJob, every node failed or not feasible) / Stopped
//! (`spec.suspend`). A finished job stays finished while its generation is the one its run
//! started from; a changed spec starts the next run.

use std::time::Duration;

use fathom_crds::{
    FieldError, JobPhase, TraceAssignment, TraceJobStatus,
    assignment::{AssignmentPhase, TargetPod},
    job::{NodeCounts, NodeReason, PlanReport, PlannedNode, ResultRef},
};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::plan::Plan;

/// Condition types.
pub const READY: &str = "Ready";
pub const COMPLETE: &str = "Complete";
pub const FAILED: &str = "Failed";
pub const NOT_FEASIBLE: &str = "NotFeasible";
pub const SUSPENDED: &str = "Suspended";

/// At most this many nodes are listed in a status list or a condition message.
pub const LIST_LIMIT: usize = 10;

/// Tunables of the lifecycle.
#[derive(Clone, Debug)]
pub struct Settings {
    /// How long after the deadline the job waits for nodes' final reports.
    pub grace_period: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            grace_period: Duration::from_secs(30),
        }
    }
}

/// What the job asks for, once its spec and targets are understood.
#[derive(Debug)]
pub enum Intent<'a> {
    /// The spec fails validation.
    Invalid(Vec<FieldError>),
    /// Something else makes the job impossible as written (stable reason, message).
    Rejected(&'static str, String),
    /// The targets cannot be resolved now but may later (reason, message), e.g. the workload
    /// of `targetRef` does not exist yet.
    Waiting(&'static str, String),
    /// A plan, with the probe's display name and duration.
    Planned {
        plan: Plan<'a>,
        probe: String,
        duration: Option<Duration>,
    },
}

/// The job as it is now.
#[derive(Debug)]
pub struct Snapshot<'a> {
    pub generation: i64,
    pub status: Option<&'a TraceJobStatus>,
    pub suspend: bool,
    pub dry_run: bool,
    pub ttl_seconds_after_finished: Option<i64>,
    pub result_ref: ResultRef,
}

/// One assignment the job should have.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub node: String,
    pub node_wide: bool,
    pub target_pods: Vec<TargetPod>,
}

/// What to do with assignments.
#[derive(Debug, Clone, PartialEq)]
pub enum AssignmentPlan {
    /// Leave them as they are (a finished job keeps its per-node detail).
    Keep,
    /// Exactly these (others are deleted); `suspend` and `deadline` go into every spec.
    Set {
        desired: Vec<Desired>,
        suspend: bool,
        deadline: Option<Time>,
    },
}

/// A Kubernetes Event to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEvent {
    pub warning: bool,
    pub reason: &'static str,
    pub note: String,
}

/// The outcome of one decision.
#[derive(Debug)]
pub struct Decision {
    pub status: TraceJobStatus,
    pub assignments: AssignmentPlan,
    pub events: Vec<JobEvent>,
    /// Look again after this long even if nothing changes (deadline, grace period, TTL).
    pub requeue_after: Option<Duration>,
    /// The TTL after finishing ran out: delete the job.
    pub delete_job: bool,
}

/// A Kubernetes timestamp: whole seconds, as the API stores them.
fn time(t: Timestamp) -> Time {
    Time(Timestamp::from_second(t.as_second()).unwrap_or(t))
}

fn after(t: &Time, d: Duration) -> Timestamp {
    t.0.saturating_add(SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX))
        .unwrap_or(Timestamp::MAX)
}

fn until(now: Timestamp, t: Timestamp) -> Duration {
    let d = t.duration_since(now);
    Duration::try_from(d)
        .unwrap_or(Duration::ZERO)
        .max(Duration::from_secs(1))
}

/// Sets `conditions` to `new` (by type), keeping `lastTransitionTime` of every condition whose
/// status did not flip, and dropping types not in `new`.
pub fn merge_conditions(old: &[Condition], new: Vec<Condition>) -> Vec<Condition> {
    new.into_iter()
        .map(|mut c| {
            if let Some(prev) = old.iter().find(|o| o.type_ == c.type_)
                && prev.status == c.status
            {
                c.last_transition_time = prev.last_transition_time.clone();
            }
            c
        })
        .collect()
}

struct Conditions {
    generation: i64,
    now: Timestamp,
    list: Vec<Condition>,
}

impl Conditions {
    fn set(&mut self, type_: &str, status: bool, reason: &str, message: impl Into<String>) {
        self.list.push(Condition {
            type_: type_.to_string(),
            status: if status { "True" } else { "False" }.to_string(),
            reason: reason.to_string(),
            message: message.into(),
            observed_generation: Some(self.generation),
            last_transition_time: time(self.now),
        });
    }
}

/// Per-node counts and lists of the current run.
#[derive(Debug, Default)]
struct Tally {
    attached: u32,
    finished: u32,
    failed: u32,
    not_feasible: u32,
    not_feasible_nodes: Vec<NodeReason>,
    failed_nodes: Vec<NodeReason>,
    /// Nodes of this run without a final report, sorted.
    unfinished: Vec<String>,
    events: u64,
    lost: u64,
}

fn tally(assignments: &[TraceAssignment], run: i64) -> Tally {
    let mut t = Tally::default();
    let mut sorted: Vec<&TraceAssignment> =
        assignments.iter().filter(|a| a.spec.run == run).collect();
    sorted.sort_by(|a, b| a.spec.node_name.cmp(&b.spec.node_name));
    for a in sorted {
        let status = a.status.as_ref().filter(|s| s.run == Some(run));
        let phase = status.and_then(|s| s.phase);
        if let Some(s) = status {
            t.events += s.counters.hits;
            t.lost += s.counters.events_lost + s.counters.events_dropped + s.counters.map_full;
        }
        match phase {
            Some(AssignmentPhase::Attached) => t.attached += 1,
            Some(AssignmentPhase::Succeeded | AssignmentPhase::Stopped) => t.finished += 1,
            Some(AssignmentPhase::Failed) => {
                t.failed += 1;
                t.failed_nodes.push(NodeReason {
                    node: a.spec.node_name.clone(),
                    reason: "Failed".into(),
                    message: status.and_then(|s| s.error.clone()).unwrap_or_default(),
                });
            }
            Some(AssignmentPhase::NotFeasible) => {
                t.not_feasible += 1;
                let problem = status
                    .and_then(|s| s.verdict.as_ref())
                    .and_then(|v| v.first_problem());
                t.not_feasible_nodes.push(NodeReason {
                    node: a.spec.node_name.clone(),
                    reason: problem
                        .and_then(|p| p.reason)
                        .map(|r| format!("{r:?}"))
                        .unwrap_or_else(|| "NotFeasible".into()),
                    message: problem
                        .map(|p| format!("{}: {}", p.probe, p.message))
                        .unwrap_or_default(),
                });
            }
            _ => {}
        }
        if !phase.is_some_and(AssignmentPhase::is_final) {
            t.unfinished.push(a.spec.node_name.clone());
        }
    }
    t
}

fn node_list(nodes: &[String]) -> String {
    let shown: Vec<&str> = nodes.iter().take(LIST_LIMIT).map(String::as_str).collect();
    let mut s = shown.join(", ");
    if nodes.len() > LIST_LIMIT {
        s.push_str(&format!(" and {} more", nodes.len() - LIST_LIMIT));
    }
    s
}

/// `s` cut to at most `max` bytes (on a character boundary), marked with `…` when cut.
pub fn cut(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

fn phase_event(phase: JobPhase, note: String) -> JobEvent {
    JobEvent {
        warning: phase == JobPhase::Failed,
        reason: phase.as_str(),
        note,
    }
}

/// Decides the job's next state. Pure: the same inputs give the same decision.
pub fn decide(
    job: &Snapshot<'_>,
    intent: Intent<'_>,
    assignments: &[TraceAssignment],
    now: Timestamp,
    settings: &Settings,
) -> Decision {
    let old = job.status.cloned().unwrap_or_default();
    let old_phase = old.phase;
    let mut st = old.clone();
    st.observed_generation = Some(job.generation);
    st.result_ref = Some(job.result_ref.clone());
    let mut events = Vec::new();

    let finished = old_phase.is_some_and(JobPhase::is_finished);
    let new_run = match old.run {
        None => true,
        Some(_) => finished && old.run_generation != Some(job.generation) && !job.suspend,
    };
    if new_run {
        let run = old.run.unwrap_or(0) + 1;
        st = TraceJobStatus {
            phase: Some(JobPhase::Pending),
            observed_generation: Some(job.generation),
            conditions: old.conditions.clone(),
            run: Some(run),
            run_generation: Some(job.generation),
            result_ref: Some(job.result_ref.clone()),
            ..Default::default()
        };
        if run > 1 {
            events.push(JobEvent {
                warning: false,
                reason: "NewRun",
                note: format!("the spec changed after the job finished: run {run} starts"),
            });
        }
    }
    let run = st.run.unwrap_or(1);
    let t = tally(assignments, run);
    let mut conds = Conditions {
        generation: job.generation,
        now,
        list: Vec::new(),
    };
    let mut requeue_after = None;
    let mut delete_job = false;

    // A finished run stays as it is; only the TTL and the last reports move.
    if finished && !new_run {
        let phase = old_phase.unwrap_or(JobPhase::Succeeded);
        for c in &old.conditions {
            let mut c = c.clone();
            c.observed_generation = Some(job.generation);
            conds.list.push(c);
        }
        st.events = st.events.max(t.events);
        st.lost = st.lost.max(t.lost);
        if let (Some(ttl), Some(done)) = (job.ttl_seconds_after_finished, &st.completion_time) {
            let expires = after(done, Duration::from_secs(ttl.max(0) as u64));
            if now >= expires {
                delete_job = true;
            } else {
                requeue_after = Some(until(now, expires));
            }
        }
        st.conditions = merge_conditions(&old.conditions, conds.list);
        st.phase = Some(phase);
        return Decision {
            status: st,
            assignments: AssignmentPlan::Keep,
            events,
            requeue_after,
            delete_job,
        };
    }

    let fail = |st: &mut TraceJobStatus,
                conds: &mut Conditions,
                events: &mut Vec<JobEvent>,
                reason: &'static str,
                message: String| {
        st.phase = Some(JobPhase::Failed);
        st.completion_time.get_or_insert(time(now));
        st.message = Some(cut(message.clone(), 300));
        st.nodes = None;
        st.nodes_attached = None;
        st.plan = None;
        conds.set(READY, false, reason, message.clone());
        conds.set(FAILED, true, reason, message.clone());
        if old_phase != Some(JobPhase::Failed) || new_run {
            events.push(phase_event(JobPhase::Failed, cut(message, 1000)));
        }
    };
    let empty = AssignmentPlan::Set {
        desired: Vec::new(),
        suspend: false,
        deadline: None,
    };

    let (plan, probe, duration) = match intent {
        Intent::Invalid(_) | Intent::Rejected(..) => {
            let (reason, message) = match intent {
                Intent::Invalid(errors) => {
                    let all: Vec<String> = errors.iter().map(ToString::to_string).collect();
                    ("InvalidSpec", format!("invalid spec: {}", all.join("; ")))
                }
                Intent::Rejected(reason, message) => (reason, message),
                _ => unreachable!("matched above"),
            };
            fail(&mut st, &mut conds, &mut events, reason, message);
            st.conditions = merge_conditions(&old.conditions, conds.list);
            return Decision {
                status: st,
                assignments: empty,
                events,
                requeue_after: None,
                delete_job: false,
            };
        }
        Intent::Waiting(reason, message) => {
            st.phase = Some(JobPhase::Pending);
            st.message = Some(cut(message.clone(), 300));
            st.nodes = Some(NodeCounts::default());
            st.nodes_attached = Some("0/0".into());
            conds.set(READY, false, reason, message);
            st.conditions = merge_conditions(&old.conditions, conds.list);
            return Decision {
                status: st,
                assignments: empty,
                events,
                requeue_after: None,
                delete_job: false,
            };
        }
        Intent::Planned {
            plan,
            probe,
            duration,
        } => (plan, probe, duration),
    };
    st.probe = Some(probe.clone());

    if job.dry_run {
        let nodes: Vec<PlannedNode> = plan
            .nodes
            .iter()
            .take(LIST_LIMIT * 5)
            .map(|(node, pods)| PlannedNode {
                node: node.to_string(),
                pods: pods
                    .iter()
                    .take(LIST_LIMIT * 5)
                    .map(|p| format!("{}/{}", p.namespace, p.name))
                    .collect(),
            })
            .collect();
        st.plan = Some(PlanReport {
            nodes,
            excluded: plan.excluded_reasons(LIST_LIMIT * 5),
            node_count: plan.nodes.len() as u32,
            pod_count: plan.pod_count as u32,
            excluded_count: plan.excluded.len() as u32,
            hook: probe,
        });
        st.phase = Some(JobPhase::Pending);
        let message = format!(
            "dry run: would run on {} nodes{}; {} nodes excluded",
            plan.nodes.len(),
            if plan.node_wide {
                " (node-wide)".to_string()
            } else {
                format!(" tracing {} pods", plan.pod_count)
            },
            plan.excluded.len()
        );
        st.message = Some(message.clone());
        st.nodes = Some(NodeCounts {
            desired: plan.nodes.len() as u32,
            ..Default::default()
        });
        st.nodes_attached = Some(format!("0/{}", plan.nodes.len()));
        conds.set(READY, false, "DryRun", message);
        st.conditions = merge_conditions(&old.conditions, conds.list);
        return Decision {
            status: st,
            assignments: empty,
            events,
            requeue_after: None,
            delete_job: false,
        };
    }
    st.plan = None;

    let desired_of = |plan: &Plan<'_>| -> Vec<Desired> {
        plan.nodes
            .keys()
            .map(|node| Desired {
                node: node.to_string(),
                node_wide: plan.node_wide,
                target_pods: plan.targets(node),
            })
            .collect()
    };
    let existing_of_run = || -> Vec<Desired> {
        let mut v: Vec<Desired> = assignments
            .iter()
            .filter(|a| a.spec.run == run && a.metadata.deletion_timestamp.is_none())
            .map(|a| Desired {
                node: a.spec.node_name.clone(),
                node_wide: a.spec.node_wide,
                target_pods: a.spec.target_pods.clone(),
            })
            .collect();
        v.sort_by(|a, b| a.node.cmp(&b.node));
        v
    };

    st.events = t.events;
    st.lost = t.lost;
    st.not_feasible = t
        .not_feasible_nodes
        .iter()
        .take(LIST_LIMIT)
        .cloned()
        .collect();
    st.failed_nodes = t.failed_nodes.iter().take(LIST_LIMIT).cloned().collect();
    if t.not_feasible > 0 {
        let listed: Vec<String> = t
            .not_feasible_nodes
            .iter()
            .map(|n| format!("{} ({})", n.node, n.reason))
            .collect();
        let message = format!(
            "not feasible on {} node(s): {}; the job runs where it can",
            t.not_feasible,
            node_list(&listed)
        );
        let reason = t
            .not_feasible_nodes
            .first()
            .map(|n| n.reason.clone())
            .unwrap_or_else(|| "NotFeasible".into());
        let was = old
            .condition(NOT_FEASIBLE)
            .filter(|c| c.status == "True")
            .map(|c| c.message.clone());
        if was.as_deref() != Some(message.as_str()) {
            events.push(JobEvent {
                warning: true,
                reason: "NotFeasible",
                note: cut(message.clone(), 1000),
            });
        }
        conds.set(NOT_FEASIBLE, true, &reason, message);
    }

    // Suspended: stop everything of this run now.
    if job.suspend {
        st.phase = Some(JobPhase::Stopped);
        st.completion_time.get_or_insert(time(now));
        let desired = existing_of_run();
        st.nodes = Some(NodeCounts {
            desired: desired.len() as u32,
            attached: t.attached,
            finished: t.finished,
            failed: t.failed,
            not_feasible: t.not_feasible,
        });
        st.nodes_attached = Some(format!("{}/{}", t.attached, desired.len()));
        let message = "stopped: spec.suspend is true".to_string();
        st.message = Some(message.clone());
        conds.set(READY, false, "Suspended", message.clone());
        conds.set(SUSPENDED, true, "Suspended", message.clone());
        if old_phase != Some(JobPhase::Stopped) {
            events.push(phase_event(JobPhase::Stopped, message));
        }
        st.conditions = merge_conditions(&old.conditions, conds.list);
        let deadline = st.deadline.clone();
        return Decision {
            status: st,
            assignments: AssignmentPlan::Set {
                desired,
                suspend: true,
                deadline,
            },
            events,
            requeue_after: None,
            delete_job: false,
        };
    }

    // The duration ran out: wait for final reports, then succeed.
    if let Some(deadline) = st.deadline.clone()
        && now >= deadline.0
    {
        let desired = existing_of_run();
        let grace_end = after(&deadline, settings.grace_period);
        let counts = NodeCounts {
            desired: desired.len() as u32,
            attached: t.attached,
            finished: t.finished,
            failed: t.failed,
            not_feasible: t.not_feasible,
        };
        st.nodes_attached = Some(format!("{}/{}", t.attached, desired.len()));
        st.nodes = Some(counts);
        if t.unfinished.is_empty() || now >= grace_end {
            st.phase = Some(JobPhase::Succeeded);
            st.completion_time = Some(time(now));
            let (reason, message) = if t.unfinished.is_empty() {
                (
                    "DurationElapsed",
                    format!(
                        "ran for its duration; {} events from {} nodes",
                        t.events,
                        desired.len()
                    ),
                )
            } else {
                (
                    "GracePeriodExpired",
                    format!(
                        "no final report within {}s after the deadline from: {}",
                        settings.grace_period.as_secs(),
                        node_list(&t.unfinished)
                    ),
                )
            };
            st.message = Some(cut(message.clone(), 300));
            conds.set(READY, false, "Succeeded", "the job finished");
            conds.set(COMPLETE, true, reason, message.clone());
            events.push(JobEvent {
                warning: reason == "GracePeriodExpired",
                reason: "Succeeded",
                note: cut(message, 1000),
            });
            if let Some(ttl) = job.ttl_seconds_after_finished {
                let expires = after(&time(now), Duration::from_secs(ttl.max(0) as u64));
                if now >= expires {
                    delete_job = true;
                } else {
                    requeue_after = Some(until(now, expires));
                }
            }
        } else {
            st.phase = Some(JobPhase::Running);
            let message = format!(
                "duration elapsed; waiting for the final report of {}",
                node_list(&t.unfinished)
            );
            st.message = Some(cut(message.clone(), 300));
            conds.set(READY, false, "Finishing", message);
            requeue_after = Some(until(now, grace_end));
        }
        st.conditions = merge_conditions(&old.conditions, conds.list);
        return Decision {
            status: st,
            assignments: AssignmentPlan::Set {
                desired,
                suspend: false,
                deadline: Some(deadline),
            },
            events,
            requeue_after,
            delete_job,
        };
    }

    // Active: the plan decides where the job runs.
    let desired = desired_of(&plan);
    let n = desired.len() as u32;
    if st.phase != Some(JobPhase::Running) && t.attached > 0 {
        st.phase = Some(JobPhase::Running);
        st.start_time = Some(time(now));
        st.deadline = duration.map(|d| time(after(&time(now), d)));
    }
    if st.phase.is_none() {
        st.phase = Some(JobPhase::Pending);
    }
    st.nodes = Some(NodeCounts {
        desired: n,
        attached: t.attached,
        finished: t.finished,
        failed: t.failed,
        not_feasible: t.not_feasible,
    });
    st.nodes_attached = Some(format!("{}/{}", t.attached, n));
    if let Some(deadline) = &st.deadline {
        requeue_after = Some(until(now, deadline.0));
    }

    let dead = t.failed + t.not_feasible;
    if n > 0 && t.attached == 0 && t.finished == 0 && dead >= n {
        let (reason, message) = if t.failed == 0 {
            (
                "NotFeasibleAnywhere",
                "the probe is not feasible on any planned node".to_string(),
            )
        } else {
            (
                "AllNodesFailed",
                format!(
                    "every planned node failed or cannot run the probe ({} failed, {} not feasible)",
                    t.failed, t.not_feasible
                ),
            )
        };
        fail(&mut st, &mut conds, &mut events, reason, message);
        st.nodes = Some(NodeCounts {
            desired: n,
            attached: 0,
            finished: 0,
            failed: t.failed,
            not_feasible: t.not_feasible,
        });
        st.nodes_attached = Some(format!("0/{n}"));
        st.conditions = merge_conditions(&old.conditions, conds.list);
        return Decision {
            status: st,
            assignments: AssignmentPlan::Keep,
            events,
            requeue_after: None,
            delete_job: false,
        };
    }

    let waiting = n.saturating_sub(t.attached + t.finished + t.not_feasible + t.failed);
    let (ready, reason, message) = if n == 0 {
        let why = if plan.node_wide {
            format!(
                "no eligible node ({} excluded by readiness, taints or nodeSelector)",
                plan.excluded.len()
            )
        } else if plan.excluded.is_empty() {
            "no running pod matches the job's targets".to_string()
        } else {
            format!(
                "target pods run only on excluded nodes: {}",
                node_list(
                    &plan
                        .excluded
                        .iter()
                        .map(|(n, e)| format!("{n} ({})", e.reason()))
                        .collect::<Vec<_>>()
                )
            )
        };
        (false, "NoTargets", why)
    } else if st.phase == Some(JobPhase::Running) && waiting == 0 && t.failed == 0 {
        (
            true,
            "Attached",
            format!("attached on {}/{} nodes", t.attached, n),
        )
    } else if t.failed > 0 {
        let failed: Vec<String> = t.failed_nodes.iter().map(|n| n.node.clone()).collect();
        (
            false,
            "NodesFailed",
            format!("failed on {}", node_list(&failed)),
        )
    } else {
        (
            false,
            "AttachPending",
            format!(
                "attached on {}/{} nodes; waiting for {waiting}",
                t.attached, n
            ),
        )
    };
    st.message = Some(cut(
        match st.phase {
            Some(JobPhase::Running) => format!(
                "running on {}/{} nodes{}",
                t.attached,
                n,
                if t.not_feasible > 0 {
                    format!(", not feasible on {}", t.not_feasible)
                } else {
                    String::new()
                }
            ),
            _ => message.clone(),
        },
        300,
    ));
    conds.set(READY, ready, reason, message);
    if old_phase != st.phase && st.phase == Some(JobPhase::Running) {
        events.push(phase_event(
            JobPhase::Running,
            format!("attached on {} of {} nodes", t.attached, n),
        ));
    }
    st.conditions = merge_conditions(&old.conditions, conds.list);
    let deadline = st.deadline.clone();
    Decision {
        status: st,
        assignments: AssignmentPlan::Set {
            desired,
            suspend: false,
            deadline,
        },
        events,
        requeue_after,
        delete_job,
    }
}

/// What to do for a job being deleted.
#[derive(Debug, Default, PartialEq)]
pub struct Cleanup {
    /// Assignments to delete (not terminating yet).
    pub delete: Vec<String>,
    /// Terminating assignments whose detach finalizer the operator removes itself: their node
    /// is gone or not Ready, and the timeout ran out.
    pub release: Vec<String>,
    /// Nodes still detaching, sorted.
    pub waiting: Vec<String>,
    /// Every assignment is gone: the job's finalizer can go.
    pub done: bool,
    pub requeue_after: Option<Duration>,
}

/// Tunables of deletion.
#[derive(Clone, Debug)]
pub struct CleanupSettings {
    /// How long an assignment of a node that is gone or not Ready may hold deletion.
    pub lost_node_timeout: Duration,
    /// How long an assignment of a Ready node may hold deletion before the operator gives up
    /// on its runner (a safety valve; a Warning event names the node).
    pub stuck_timeout: Duration,
}

impl Default for CleanupSettings {
    fn default() -> Self {
        CleanupSettings {
            lost_node_timeout: Duration::from_secs(60),
            stuck_timeout: Duration::from_secs(600),
        }
    }
}

/// Decides the cleanup step of a job being deleted (or of assignments no longer wanted).
/// `node_ready(name)` tells whether the node exists and is Ready.
pub fn decide_cleanup(
    assignments: &[TraceAssignment],
    node_ready: impl Fn(&str) -> bool,
    now: Timestamp,
    settings: &CleanupSettings,
) -> Cleanup {
    let mut c = Cleanup::default();
    let mut next: Option<Timestamp> = None;
    for a in assignments {
        let name = a.metadata.name.clone().unwrap_or_default();
        match &a.metadata.deletion_timestamp {
            None => c.delete.push(name),
            Some(since) => {
                let has_finalizer = a.metadata.finalizers.as_ref().is_some_and(|f| {
                    f.iter()
                        .any(|f| f == fathom_crds::assignment::DETACH_FINALIZER)
                });
                if !has_finalizer {
                    // Held by someone else's finalizer: not ours to force.
                    c.waiting.push(a.spec.node_name.clone());
                    continue;
                }
                let timeout = if node_ready(&a.spec.node_name) {
                    settings.stuck_timeout
                } else {
                    settings.lost_node_timeout
                };
                let due = after(since, timeout);
                if now >= due {
                    c.release.push(name);
                } else {
                    c.waiting.push(a.spec.node_name.clone());
                    next = Some(next.map_or(due, |n| n.min(due)));
                }
            }
        }
    }
    c.waiting.sort();
    c.done = assignments.is_empty();
    c.requeue_after = match next {
        Some(t) => Some(until(now, t).min(Duration::from_secs(5))),
        None if !c.done => Some(Duration::from_secs(5)),
        None => None,
    };
    c
}
