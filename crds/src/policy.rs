//! `TracePolicy` (cluster-scoped): what a cluster admin lets one or more namespaces' TraceJobs
//! use beyond the safe defaults of [`tenancy`](crate::tenancy), and the limits it holds them to.
//!
//! A namespace chooses its policy the way Pod Security Admission chooses a level: by a label
//! on the Namespace object, [`POLICY_LABEL`]`=<policy name>`. Only cluster admins can label a
//! Namespace (a namespace admin's `admin` role cannot update it), and only cluster admins can
//! write TracePolicies, so a tenant can neither pick nor write its own policy. A namespace
//! without the label gets the defaults ([`TracePolicySpec::default`]); one naming a policy
//! that does not exist gets nothing (its TraceJobs fail with reason `PolicyDenied`).
//!
//! One policy per namespace, never a merge of several: what a namespace may do is read in
//! one object.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The Namespace label naming the TracePolicy of the namespace's TraceJobs.
pub const POLICY_LABEL: &str = "fathom.dev/trace-policy";

/// A probe kind the defaults refuse a TraceJob and a policy may allow.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum GrantedKind {
    /// `probe.kprobe`, and the catalog entries built on kprobes (`tcp-connect-kprobe`).
    Kprobe,
    Kretprobe,
    Fentry,
    Fexit,
    Lsm,
    /// Any raw tracepoint, beyond the syscall ones (`sys_enter`, `sys_exit`) that every
    /// TraceJob may use.
    RawTracepoint,
}

impl GrantedKind {
    /// Every kind, in the order of the spec's probe fields.
    pub const ALL: [GrantedKind; 6] = [
        GrantedKind::Kprobe,
        GrantedKind::Kretprobe,
        GrantedKind::Fentry,
        GrantedKind::Fexit,
        GrantedKind::Lsm,
        GrantedKind::RawTracepoint,
    ];

    /// The name as written in YAML (and as the probe's field is named).
    pub fn name(self) -> &'static str {
        match self {
            GrantedKind::Kprobe => "kprobe",
            GrantedKind::Kretprobe => "kretprobe",
            GrantedKind::Fentry => "fentry",
            GrantedKind::Fexit => "fexit",
            GrantedKind::Lsm => "lsm",
            GrantedKind::RawTracepoint => "rawTracepoint",
        }
    }
}

/// What a namespace's TraceJobs may use beyond the defaults. Everything is off by default.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyAllow {
    /// Probe kinds allowed beyond the defaults (tracepoints, the syscall raw tracepoints,
    /// profile, and uprobes/USDT on the job's own containers' binaries): kprobe, kretprobe,
    /// fentry, fexit, lsm, rawTracepoint. Each reads kernel memory at will.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 6))]
    pub probe_kinds: Vec<GrantedKind>,
    /// `true`: jobs may capture string payloads (`events.payload`), such as paths and file
    /// names, which can carry secrets.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub payload: bool,
    /// `true`: jobs may key or sum by values that hold kernel addresses (shown in hex), which
    /// undo the node's KASLR.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub kernel_addresses: bool,
    /// `true`: jobs may use the catalog entries that time other tasks of the node (runqlat,
    /// biolatency): their hooks run in other tasks' context, so the pod filter cannot keep
    /// other tasks' timing out.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub node_timing: bool,
}

/// Limits for a namespace's TraceJobs, within those every job has (the node runner's budgets
/// still hold).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyLimits {
    /// The CPU budget (percent of one CPU, 1–100) of a job that sets no `limits.cpuPercent`,
    /// instead of the node runner's `--default-cpu-percent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub default_cpu_percent: Option<u32>,
    /// The most a job may ask for in `limits.cpuPercent` (1–100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub max_cpu_percent: Option<u32>,
    /// The most a job may ask for in `limits.mapEntries` (1–1048576). A job that sets none
    /// uses the default, 16384, which must fit too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1048576))]
    pub max_map_entries: Option<u32>,
}

/// What the TraceJobs of the namespaces labelled [`POLICY_LABEL`]`=<this policy's name>` may
/// use and how much.
#[derive(
    CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema,
)]
#[kube(
    group = "fathom.dev",
    version = "v1alpha1",
    kind = "TracePolicy",
    shortname = "tpol",
    category = "fathom",
    derive = "PartialEq",
    doc = "What the TraceJobs of the namespaces labelled fathom.dev/trace-policy=<name> may use beyond the safe defaults (probe kinds, payloads, kernel addresses), and their limits. Written by cluster admins.",
    printcolumn = r#"{"name": "Kinds", "type": "string", "jsonPath": ".spec.allow.probeKinds"}"#,
    printcolumn = r#"{"name": "Payload", "type": "boolean", "jsonPath": ".spec.allow.payload"}"#,
    printcolumn = r#"{"name": "Addresses", "type": "boolean", "jsonPath": ".spec.allow.kernelAddresses"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct TracePolicySpec {
    /// What the jobs may use beyond the defaults.
    #[serde(default)]
    pub allow: PolicyAllow,
    /// Their limits.
    #[serde(default)]
    pub limits: PolicyLimits,
}

impl TracePolicySpec {
    /// Whether the policy allows probe kind `kind`.
    pub fn allows(&self, kind: GrantedKind) -> bool {
        self.allow.probe_kinds.contains(&kind)
    }
}

/// The policy a TraceJob's assignment is held to: copied by the operator from the TracePolicy
/// its namespace names, so the node runner applies the same policy the operator admitted the
/// job under (assignments live in the operator's namespace, which tenants cannot write).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AssignedPolicy {
    /// The TracePolicy's name.
    pub name: String,
    /// Its spec when the operator last reconciled the job.
    pub spec: TracePolicySpec,
}
