//! The feasibility verdict: can this node run this job's probes, and if not, exactly why.
//!
//! Produced by the node engine before anything attaches (`fathom check`, `fathom run`, the
//! node runner's pre-attach check) and carried in a TraceAssignment's status, so the operator
//! can list the nodes where a probe is not feasible apart from real failures.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Why a probe cannot run on a node. Stable names: used as condition reasons and metric labels.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum Reason {
    /// The kernel has no BTF (`/sys/kernel/btf/vmlinux`), needed by fentry/fexit/LSM.
    BTFUnavailable,
    /// The tracepoint, kernel function, user symbol, USDT note or tracepoint field is absent.
    SymbolNotFound,
    /// The binary or library of a uprobe/USDT does not exist or is not an ELF file.
    BinaryNotFound,
    /// The kernel was built without what this attach kind needs (kprobes, trampolines, LSM).
    AttachKindUnsupported,
    /// The kernel refuses the attach kind in its current configuration (lockdown, BPF LSM not
    /// in the `lsm=` list).
    KernelLockdown,
    /// The process lacks CAP_BPF/CAP_PERFMON (or root).
    PermissionDenied,
    /// tracefs or bpffs is not mounted and could not be mounted.
    FilesystemUnavailable,
    /// The verifier rejected the program.
    VerifierRejected,
    /// An aggregate key or value this probe cannot provide on this kernel.
    InvalidForProbe,
    /// A tenant rule refuses it for a namespaced TraceJob (the message names the rule).
    PolicyDenied,
    /// The node's budget for all jobs together has no room for this one (the message says
    /// what is taken and what the job needs).
    NodeBudget,
}

/// The verdict for one attach point of a job.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProbeVerdict {
    /// The attach point, e.g. `tracepoint:skb/kfree_skb` or `kprobe:tcp_v4_connect`.
    pub probe: String,
    pub feasible: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// What is missing and what to do instead; empty when feasible.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// The verdict for a whole job on one node: feasible only if every attach point is.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Verdict {
    pub feasible: bool,
    pub probes: Vec<ProbeVerdict>,
}

impl Verdict {
    pub fn from_probes(probes: Vec<ProbeVerdict>) -> Self {
        Verdict {
            feasible: !probes.is_empty() && probes.iter().all(|p| p.feasible),
            probes,
        }
    }

    /// The first infeasible probe, for a one-line summary.
    pub fn first_problem(&self) -> Option<&ProbeVerdict> {
        self.probes.iter().find(|p| !p.feasible)
    }
}
