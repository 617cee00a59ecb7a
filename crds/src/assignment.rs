//! `TraceAssignment`: one job on one node. The operator writes `spec`; the node runner writes
//! `status`.
//!
//! The protocol between them:
//! - the operator creates one assignment per (job, node) with the label
//!   [`NODE_LABEL`]`=<node>` (and `spec.nodeName`, a selectable field), owned by its job, with
//!   the finalizer [`DETACH_FINALIZER`];
//! - the runner of that node attaches the probes (filtered to `spec.targetPods`' cgroups unless
//!   `spec.nodeWide`), reports in `status`, detaches at `spec.deadline` or when `spec.suspend`
//!   is set, and writes a final status (phase Succeeded, Stopped, Failed or NotFeasible);
//! - when an assignment is deleted, the runner detaches and then removes [`DETACH_FINALIZER`];
//!   the operator removes it itself only for a node that is gone or not Ready after a timeout.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{result::Totals, spec::TraceJobSpec, verdict::Verdict};

/// Label with the node an assignment is for (the node name, or `h-<hash>` for names longer
/// than a label value may be; `spec.nodeName` always has the full name).
pub const NODE_LABEL: &str = "fathom.dev/node";
/// Label with the owning job's uid.
pub const JOB_UID_LABEL: &str = "fathom.dev/job-uid";
/// Label with the owning job's name (cut to 63 characters).
pub const JOB_NAME_LABEL: &str = "fathom.dev/job";
/// Label with the owning job's kind, `TraceJob` or `ClusterTraceJob`.
pub const JOB_KIND_LABEL: &str = "fathom.dev/job-kind";
/// Finalizer on each assignment, removed by the runner once it has detached.
pub const DETACH_FINALIZER: &str = "fathom.dev/detach";

/// Which job an object belongs to.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobRef {
    /// `TraceJob` or `ClusterTraceJob`.
    pub kind: String,
    pub name: String,
    /// The job's namespace; absent for a ClusterTraceJob.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub uid: String,
}

/// A pod the runner must trace: enough to find its cgroups on the node.
#[derive(
    Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct TargetPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// `Guaranteed`, `Burstable` or `BestEffort`: part of the pod's cgroup path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qos_class: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub containers: Vec<TargetContainer>,
}

/// A container of a target pod.
#[derive(
    Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct TargetContainer {
    pub name: String,
    /// `containerd://…`, `cri-o://…`: the runtime's id, from the pod status; absent until the
    /// container has started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
}

/// What the runner of one node must run.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "fathom.dev",
    version = "v1alpha1",
    kind = "TraceAssignment",
    namespaced,
    status = "TraceAssignmentStatus",
    shortname = "tas",
    category = "fathom",
    derive = "PartialEq",
    selectable = ".spec.nodeName",
    doc = "One TraceJob or ClusterTraceJob on one node: written by the operator, executed and reported on by that node's runner.",
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.nodeName"),
    printcolumn(name = "Job", type_ = "string", json_path = ".spec.job.name"),
    printcolumn(name = "Run", type_ = "integer", json_path = ".spec.run"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Hits", type_ = "integer", json_path = ".status.counters.hits"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct TraceAssignmentSpec {
    /// The job this assignment belongs to.
    pub job: JobRef,
    /// The job's run number; a new number means "detach what you have, start afresh".
    pub run: i64,
    /// The node that runs it.
    pub node_name: String,
    /// The job's spec, as the runner executes it (cluster-only fields are for the operator).
    pub trace: TraceJobSpec,
    /// `true`: trace the whole node (a ClusterTraceJob without pod targets). `false`: only the
    /// cgroups of `targetPods`.
    #[serde(default)]
    pub node_wide: bool,
    /// The pods to trace on this node, sorted by namespace and name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_pods: Vec<TargetPod>,
    /// When to detach and send the final report (the job's start plus its duration); absent
    /// until the job has started, or for a job without duration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<Time>,
    /// `true`: detach now and report phase Stopped (the job was suspended).
    #[serde(default)]
    pub suspend: bool,
}

/// Where an assignment is, as its runner reports it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum AssignmentPhase {
    /// Seen, not attached yet.
    Pending,
    /// Checking feasibility, loading and attaching.
    Attaching,
    /// Every probe attached; counting.
    Attached,
    /// Ran to the deadline, detached; final counters reported.
    Succeeded,
    /// Detached because the job was suspended; final counters reported.
    Stopped,
    /// Attaching or running failed (see `error`).
    Failed,
    /// The pre-attach check found a probe this node cannot run (see `verdict`).
    NotFeasible,
}

impl AssignmentPhase {
    /// The runner sends no more reports for this run.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            AssignmentPhase::Succeeded
                | AssignmentPhase::Stopped
                | AssignmentPhase::Failed
                | AssignmentPhase::NotFeasible
        )
    }
}

/// What the runner reports about one assignment.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TraceAssignmentStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<AssignmentPhase>,
    /// The run this status is about (`spec.run` when the runner wrote it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<i64>,
    /// The attach points that are attached, e.g. `tracepoint:skb/kfree_skb`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attached_probes: Vec<String>,
    /// Cumulative counters since the assignment attached.
    #[serde(default)]
    pub counters: Totals,
    /// The pre-attach feasibility verdict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<Verdict>,
    /// What failed, when phase is Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When the probes attached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the runner last reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_report_time: Option<Time>,
}
