//! `TraceJob` (namespaced) and `ClusterTraceJob` (cluster-scoped): one spec, two scopes.
//!
//! Both kinds carry the same [`TraceJobSpec`] (through a transparent newtype per kind, so the
//! YAML is identical and `job.spec.probe` works through `Deref`) and the same
//! [`TraceJobStatus`]. The operator writes only `status`; nothing it writes lives in `spec`.

use std::ops::{Deref, DerefMut};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::spec::TraceJobSpec;

/// API group of every Fathom resource.
pub const GROUP: &str = "fathom.dev";
/// API version of every Fathom resource.
pub const VERSION: &str = "v1alpha1";

// The spec of a `TraceJob`: a `TraceJobSpec`, serialized as-is. The doc line below becomes the
// schema description (`kubectl explain tracejob.spec`), so it says what the spec is.
/// What to trace, where, for how long, and how to aggregate it.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "fathom.dev",
    version = "v1alpha1",
    kind = "TraceJob",
    namespaced,
    status = "TraceJobStatus",
    shortname = "tj",
    category = "fathom",
    derive = "PartialEq",
    doc = "A probe, its targets (pods of this namespace), a duration and an aggregation. The operator places it on the nodes where the targeted pods run and keeps its status.",
    printcolumn = r#"{"name": "Probe", "type": "string", "jsonPath": ".status.probe"}"#,
    printcolumn = r#"{"name": "Phase", "type": "string", "jsonPath": ".status.phase"}"#,
    printcolumn = r#"{"name": "Nodes", "type": "string", "description": "nodes attached / nodes desired", "jsonPath": ".status.nodesAttached"}"#,
    printcolumn = r#"{"name": "Events", "type": "integer", "jsonPath": ".status.events"}"#,
    printcolumn = r#"{"name": "Run", "type": "integer", "jsonPath": ".status.run", "priority": 1}"#,
    printcolumn = r#"{"name": "Message", "type": "string", "jsonPath": ".status.message", "priority": 1}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(transparent)]
pub struct NamespacedJobSpec(pub TraceJobSpec);

// The spec of a `ClusterTraceJob`: a `TraceJobSpec`, serialized as-is.
/// What to trace, where, for how long, and how to aggregate it.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "fathom.dev",
    version = "v1alpha1",
    kind = "ClusterTraceJob",
    status = "TraceJobStatus",
    shortname = "ctj",
    category = "fathom",
    derive = "PartialEq",
    doc = "A TraceJob for cluster admins: the same spec, and it may observe whole nodes and pods of every namespace.",
    printcolumn = r#"{"name": "Probe", "type": "string", "jsonPath": ".status.probe"}"#,
    printcolumn = r#"{"name": "Phase", "type": "string", "jsonPath": ".status.phase"}"#,
    printcolumn = r#"{"name": "Nodes", "type": "string", "description": "nodes attached / nodes desired", "jsonPath": ".status.nodesAttached"}"#,
    printcolumn = r#"{"name": "Events", "type": "integer", "jsonPath": ".status.events"}"#,
    printcolumn = r#"{"name": "Run", "type": "integer", "jsonPath": ".status.run", "priority": 1}"#,
    printcolumn = r#"{"name": "Message", "type": "string", "jsonPath": ".status.message", "priority": 1}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(transparent)]
pub struct ClusterJobSpec(pub TraceJobSpec);

impl Deref for NamespacedJobSpec {
    type Target = TraceJobSpec;
    fn deref(&self) -> &TraceJobSpec {
        &self.0
    }
}

impl DerefMut for NamespacedJobSpec {
    fn deref_mut(&mut self) -> &mut TraceJobSpec {
        &mut self.0
    }
}

impl Deref for ClusterJobSpec {
    type Target = TraceJobSpec;
    fn deref(&self) -> &TraceJobSpec {
        &self.0
    }
}

impl DerefMut for ClusterJobSpec {
    fn deref_mut(&mut self) -> &mut TraceJobSpec {
        &mut self.0
    }
}

impl From<TraceJobSpec> for NamespacedJobSpec {
    fn from(s: TraceJobSpec) -> Self {
        NamespacedJobSpec(s)
    }
}

impl From<TraceJobSpec> for ClusterJobSpec {
    fn from(s: TraceJobSpec) -> Self {
        ClusterJobSpec(s)
    }
}

/// Where a job is in its life.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum JobPhase {
    /// Accepted, not attached on any node yet (no matching node, or runners still attaching).
    Pending,
    /// Attached on at least one node.
    Running,
    /// Ran for its duration and every node reported its final state (or the grace period ran out).
    Succeeded,
    /// Could not run: an invalid spec, a node-wide TraceJob, or every node failed.
    Failed,
    /// Stopped early by `spec.suspend: true`.
    Stopped,
}

impl JobPhase {
    /// Succeeded, Failed and Stopped are final for a run.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            JobPhase::Succeeded | JobPhase::Failed | JobPhase::Stopped
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobPhase::Pending => "Pending",
            JobPhase::Running => "Running",
            JobPhase::Succeeded => "Succeeded",
            JobPhase::Failed => "Failed",
            JobPhase::Stopped => "Stopped",
        }
    }
}

/// Node counts of the current run. Per-node detail lives in the TraceAssignments.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeCounts {
    /// Nodes the job is planned on.
    pub desired: u32,
    /// Nodes whose runner reports the probes attached.
    pub attached: u32,
    /// Nodes that ran to their end (or stopped) and sent their final report.
    pub finished: u32,
    /// Nodes where attaching or running failed.
    pub failed: u32,
    /// Nodes where the probe cannot run (missing symbol, tracepoint, BTF…); counted apart from
    /// failures.
    pub not_feasible: u32,
}

/// A node and why it is listed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeReason {
    pub node: String,
    /// A stable reason, e.g. `SymbolNotFound`, `NotReady`, `Taint`.
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// Where the merged result is.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResultRef {
    /// The TraceResult's name.
    pub name: String,
    /// The TraceResult's namespace.
    pub namespace: String,
}

/// What a dry run would do.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlanReport {
    /// Nodes the job would run on, with the pods it would trace there (`namespace/name`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<PlannedNode>,
    /// Nodes left out and why (not Ready, not matching `nodeSelector`, a taint the runner does
    /// not tolerate, target pods there but node not eligible).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded: Vec<NodeReason>,
    /// Total nodes the job would run on (the lists above are cut to a fixed length).
    pub node_count: u32,
    /// Total pods the job would trace.
    pub pod_count: u32,
    /// Total nodes excluded.
    pub excluded_count: u32,
    /// The hook the job would attach, as `fathom run` would.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hook: String,
}

/// One node of a dry run.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlannedNode {
    pub node: String,
    /// `namespace/name` of the target pods there; empty for a node-wide probe.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pods: Vec<String>,
}

/// The observed state of a TraceJob or ClusterTraceJob, per Kubernetes API conventions.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TraceJobStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<JobPhase>,
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Complete`, `Failed`, `NotFeasible`, `Suspended`…
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The run number: 1 for the first run; a changed spec of a finished job starts the next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<i64>,
    /// The `metadata.generation` the current run started from. Re-applying an unchanged
    /// finished job keeps it, and so does not re-run the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_generation: Option<i64>,
    /// The probe, as `fathom run` prints it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<String>,
    /// When the first node attached in this run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the run ends: `startTime + duration`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<Time>,
    /// When the run finished (Succeeded, Failed or Stopped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<NodeCounts>,
    /// `attached/desired`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes_attached: Option<String>,
    /// Nodes where the probe is not feasible, with the reason (at most 10 listed; the count
    /// is in `nodes.notFeasible`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_feasible: Vec<NodeReason>,
    /// Nodes that failed, with the error (at most 10 listed; the count is in `nodes.failed`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_nodes: Vec<NodeReason>,
    /// Hits counted over all nodes in this run.
    #[serde(default)]
    pub events: u64,
    /// Events lost in the kernel or dropped in user space, plus keys dropped on a full map.
    #[serde(default)]
    pub lost: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_ref: Option<ResultRef>,
    /// What a dry run would do (only with `spec.dryRun: true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<PlanReport>,
    /// A short human-readable summary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl TraceJobStatus {
    /// The condition of this type, if set.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }
}
