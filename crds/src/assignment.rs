//! `TraceAssignment`: one job on one node. The operator writes `spec`; the node runner writes
//! `status`.
//!
//! The protocol between them:
//! - the operator creates one assignment per (job, node) **in its own namespace** (never the
//!   job's: a tenant who may write objects in its namespace must not be able to write an
//!   assignment the runner would execute), with the label [`NODE_LABEL`]`=<node>` (and
//!   `spec.nodeName`, a selectable field), the labels of its job ([`JOB_UID_LABEL`],
//!   [`JOB_NAMESPACE_LABEL`]…) and the finalizer [`DETACH_FINALIZER`]. Only a
//!   ClusterTraceJob's assignment has an ownerReference (a cluster-scoped owner may own objects
//!   of any namespace; a namespaced one may not own objects of another namespace); the
//!   operator deletes the others itself, and sweeps assignments whose job is gone;
//! - the runner of that node attaches the probes (filtered to `spec.targetPods`' cgroups unless
//!   `spec.nodeWide`), reports in `status`, detaches at `spec.deadline` or when `spec.suspend`
//!   is set, and writes a final status (phase Succeeded, Stopped, Failed or NotFeasible);
//! - when an assignment is deleted, the runner detaches and then removes [`DETACH_FINALIZER`];
//!   the operator removes it itself only for a node that is gone or not Ready after a timeout.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{policy::AssignedPolicy, result::Totals, spec::TraceJobSpec, verdict::Verdict};

/// Label with the node an assignment is for (the node name, or `h-<hash>` for names longer
/// than a label value may be; `spec.nodeName` always has the full name).
pub const NODE_LABEL: &str = "fathom.dev/node";
/// Label with the owning job's uid.
pub const JOB_UID_LABEL: &str = "fathom.dev/job-uid";
/// Label with the owning job's name (cut to 63 characters).
pub const JOB_NAME_LABEL: &str = "fathom.dev/job";
/// Label with the owning job's kind, `TraceJob` or `ClusterTraceJob`.
pub const JOB_KIND_LABEL: &str = "fathom.dev/job-kind";
/// Label with the owning TraceJob's namespace (absent for a ClusterTraceJob): assignments all
/// live in the operator's namespace, this says which tenant's job each one runs.
pub const JOB_NAMESPACE_LABEL: &str = "fathom.dev/job-namespace";
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
    printcolumn = r#"{"name": "Node", "type": "string", "jsonPath": ".spec.nodeName"}"#,
    printcolumn = r#"{"name": "Job", "type": "string", "jsonPath": ".spec.job.name"}"#,
    printcolumn = r#"{"name": "Run", "type": "integer", "jsonPath": ".spec.run"}"#,
    printcolumn = r#"{"name": "Phase", "type": "string", "jsonPath": ".status.phase"}"#,
    printcolumn = r#"{"name": "Hits", "type": "integer", "jsonPath": ".status.counters.hits"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
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
    /// The TracePolicy a TraceJob is held to (its namespace's label names it); absent for a
    /// ClusterTraceJob and for a namespace under the default rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<AssignedPolicy>,
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

/// FNV-1a, 32 bits: a stable short hash for names and label values (not for security).
pub fn short_hash(parts: &[&str]) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            h ^= 0xff;
            h = h.wrapping_mul(0x0100_0193);
        }
        for b in part.bytes() {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
    }
    format!("{h:08x}")
}

/// `s` as a label value: itself when it is one (at most 63 characters), else its first
/// characters and a hash, so distinct inputs stay distinct.
pub fn label_value(s: &str) -> String {
    if s.len() <= 63 {
        return s.to_string();
    }
    let head: String = s.chars().take(54).collect();
    let head = head.trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
    format!("{head}-{}", short_hash(&[s]))
}

/// The value of [`NODE_LABEL`] for a node: runners select their assignments with it.
pub fn node_label_value(node: &str) -> String {
    label_value(node)
}

/// A DNS-subdomain name made of `base` and a hash of `hash_of`, at most 253 characters.
fn bounded_name(base: &str, hash_of: &[&str]) -> String {
    let hash = short_hash(hash_of);
    let head: String = base.chars().take(253 - 1 - hash.len()).collect();
    let head = head.trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
    format!("{head}-{hash}")
}

/// The name of the assignment of a job on a node, in the operator's namespace:
/// `<namespace>.<job>-<node>-<hash>` for a TraceJob, `<job>-<node>-<hash>` for a
/// ClusterTraceJob. The hash (of kind, namespace, job name, job uid and node) keeps the names of
/// different (job, node) pairs apart — jobs of the same name in different namespaces, names
/// cut to 253 characters — and, holding the job's uid (which the API server picks and no other
/// tenant can read), makes a name that one tenant's job would take unpredictable to another.
/// The namespace prefix is never cut (a namespace has at most 63 characters).
pub fn assignment_name(job: &JobRef, node: &str) -> String {
    let base = match &job.namespace {
        Some(ns) => format!("{ns}.{}-{node}", job.name),
        None => format!("{}-{node}", job.name),
    };
    bounded_name(
        &base,
        &[
            &job.kind,
            job.namespace.as_deref().unwrap_or(""),
            &job.name,
            &job.uid,
            node,
        ],
    )
}

/// The name of a job's TraceResult: the job's name for a TraceJob (in the job's namespace,
/// where its tenant reads it), and `cluster.<name>` for a ClusterTraceJob (in the operator's
/// namespace).
pub fn result_name(job: &JobRef) -> String {
    match job.namespace {
        Some(_) => job.name.clone(),
        None if job.name.len() + 8 <= 253 => format!("cluster.{}", job.name),
        None => bounded_name(&format!("cluster.{}", job.name), &[&job.name]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(kind: &str, ns: Option<&str>, name: &str) -> JobRef {
        JobRef {
            kind: kind.into(),
            name: name.into(),
            namespace: ns.map(Into::into),
            uid: "u".into(),
        }
    }

    #[test]
    fn names_are_distinct_where_plain_concatenation_collides() {
        let a = assignment_name(&job("TraceJob", Some("ns"), "a-b"), "c");
        let b = assignment_name(&job("TraceJob", Some("ns"), "a"), "b-c");
        assert_ne!(a, b);
        assert!(a.starts_with("ns.a-b-c-"), "{a}");
        let c = assignment_name(&job("ClusterTraceJob", None, "a-b"), "c");
        assert_ne!(a, c);
        assert!(c.starts_with("a-b-c-"), "{c}");
        // A ClusterTraceJob whose name looks like a namespaced job's prefix still differs.
        let d = assignment_name(&job("ClusterTraceJob", None, "ns.a-b"), "c");
        assert_ne!(a, d);
    }

    #[test]
    fn jobs_of_the_same_name_in_two_namespaces_get_two_names() {
        // Every assignment lives in the operator's namespace: names must not meet there.
        let shop = assignment_name(&job("TraceJob", Some("shop"), "web"), "n1");
        let bank = assignment_name(&job("TraceJob", Some("bank"), "web"), "n1");
        assert_ne!(shop, bank);
        assert!(shop.starts_with("shop.web-n1-"), "{shop}");
        assert!(bank.starts_with("bank.web-n1-"), "{bank}");
        // A recreated job (new uid) gets new names: its predecessor's assignments, maybe
        // still detaching, are never taken over.
        let mut again = job("TraceJob", Some("shop"), "web");
        again.uid = "u2".into();
        assert_ne!(shop, assignment_name(&again, "n1"));
    }

    #[test]
    fn long_names_are_bounded_and_valid_and_keep_the_namespace() {
        let node = format!("{}.example.internal", "n".repeat(230));
        let ns = "t".repeat(63);
        let name = assignment_name(&job("TraceJob", Some(&ns), &"j".repeat(200)), &node);
        assert!(name.len() <= 253, "{}", name.len());
        assert!(name.starts_with(&format!("{ns}.")), "{name}");
        assert!(
            name.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        );
        assert!(!name.contains(".-") && !name.contains("-."));
        let other = assignment_name(&job("TraceJob", Some(&ns), &"j".repeat(201)), &node);
        assert_ne!(
            name, other,
            "names cut to the same head differ by their hash"
        );
        let v = node_label_value(&node);
        assert!(v.len() <= 63, "{v}");
        assert_ne!(v, node_label_value(&format!("{node}x")));
        assert_eq!(node_label_value("node-1"), "node-1");
    }

    #[test]
    fn cluster_results_live_under_a_prefix() {
        assert_eq!(result_name(&job("TraceJob", Some("shop"), "web")), "web");
        assert_eq!(
            result_name(&job("ClusterTraceJob", None, "web")),
            "cluster.web"
        );
        assert!(result_name(&job("ClusterTraceJob", None, &"w".repeat(253))).len() <= 253);
    }
}
