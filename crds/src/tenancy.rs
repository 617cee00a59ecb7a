//! What a namespaced `TraceJob` may use: the tenant rules.
//!
//! A TraceJob is something a namespace admin may create, so by default it may observe only its
//! own pods and may not read kernel memory. A cluster admin lets a namespace do more with a
//! [`TracePolicy`](crate::policy::TracePolicy). ClusterTraceJobs (cluster admins) and
//! `fathom run` (root on the machine) are not bound by these rules.
//!
//! Each rule has a name that every refusal carries, in the same words wherever it is
//! enforced:
//! - at admission, by the chart's ValidatingAdmissionPolicies
//!   (`charts/fathom/templates/tenant-policy.yaml`), for what the spec alone shows (probe
//!   kinds, payload capture, limits);
//! - by the operator ([`TraceJobSpec::tenant_refusals_under`]), as the job's `Failed`
//!   condition, for a cluster without those admission policies;
//! - by the node runner, which plans a TraceJob's assignment with [`Reach::Namespace`] (unless
//!   its policy allows kernel addresses) and so refuses what only the node's kernel can tell
//!   (an argument or field that holds a kernel address) and re-checks the rest.

use crate::{
    policy::{GrantedKind, TracePolicySpec},
    spec::{DEFAULT_MAP_ENTRIES, FieldError, Probe, TraceJobSpec},
};

/// The rule that keeps TraceJobs to hooks that cannot read kernel memory at will.
pub const RULE_PROBE_KIND: &str = "tenant-probe-kind";
/// The rule that keeps string payloads (paths, file names, which can carry secrets) out of
/// TraceJobs.
pub const RULE_PAYLOAD: &str = "tenant-payload";
/// The rule that keeps kernel addresses (which undo KASLR) out of TraceJobs' results.
pub const RULE_KERNEL_ADDRESS: &str = "tenant-kernel-address";
/// The rule that holds TraceJobs to their TracePolicy's limits.
pub const RULE_LIMITS: &str = "tenant-limits";
/// The rule that refuses every TraceJob of a namespace whose policy label names no TracePolicy.
pub const RULE_POLICY: &str = "tenant-policy";

/// The end of every refusal's fix: who can lift the rule.
pub const ASK_AN_ADMIN: &str = "or ask a cluster admin for a TracePolicy that allows it (docs/tenancy.md) or a ClusterTraceJob";

/// Who a job is planned for, which decides what it may read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// `fathom run` and ClusterTraceJobs: everything the kernel allows.
    Node,
    /// A TraceJob: the tenant rules of this module hold.
    Namespace,
}

/// Probe forms a TraceJob may not use: each reads kernel functions' arguments and memory.
pub const KERNEL_FORMS: &[&str] = &["kprobe", "kretprobe", "fentry", "fexit", "lsm"];

/// Raw tracepoints a TraceJob may use: the syscall entry and exit, whose arguments are the
/// calling process's own.
pub const TENANT_RAW_TRACEPOINTS: &[&str] = &["sys_enter", "sys_exit"];

/// Catalog entries a TraceJob may not use (built on a kernel-function probe).
pub const KERNEL_CATALOG: &[&str] = &["tcp-connect-kprobe"];

/// Catalog entries whose hooks run in other tasks' context (a wakeup by another task, an I/O
/// completion in an interrupt): the cgroup filter sees whichever task is current there, so a
/// job of one namespace would time other tasks of the node. A TraceJob may use them only
/// when its TracePolicy allows `nodeTiming`.
pub const NODE_TIMING_CATALOG: &[&str] = &["runqlat", "biolatency"];

/// How every refusal's message begins, before the rule's name.
const REFUSED_BY: &str = "refused by rule ";

/// The message of a refusal by `rule`: the rule's name, what it refuses, and the fix.
pub fn refusal(rule: &str, what: &str, fix: &str) -> String {
    format!("{REFUSED_BY}{rule}: {what}; {fix}")
}

/// Whether `message` (or the message it ends with) is a tenant rule's refusal.
pub fn is_refusal(message: &str) -> bool {
    message.contains(REFUSED_BY)
}

/// The [`RULE_PROBE_KIND`] message for a kernel-function probe form.
pub fn kernel_form_message(form: &str) -> String {
    refusal(
        RULE_PROBE_KIND,
        &format!("a TraceJob may not use {form} probes (they read kernel memory)"),
        &format!(
            "use a tracepoint, a syscall raw tracepoint, profile, uprobe or usdt, {ASK_AN_ADMIN}"
        ),
    )
}

/// The [`RULE_PROBE_KIND`] message for a raw tracepoint other than the syscall ones.
pub fn raw_tracepoint_message() -> String {
    refusal(
        RULE_PROBE_KIND,
        &format!(
            "a TraceJob may use only the raw tracepoints {}",
            TENANT_RAW_TRACEPOINTS.join(" and ")
        ),
        &format!("use the tracepoint of the same name (its fields are checked), {ASK_AN_ADMIN}"),
    )
}

/// The network hooks that see every packet of an interface, whoever it belongs to.
pub const INTERFACE_HOOKS: &[&str] = &["xdp", "tc"];

/// The [`RULE_PROBE_KIND`] message for an interface hook on a named interface (no policy
/// grants one: an interface's packets are the node's, not a namespace's).
pub fn interface_hook_message() -> String {
    refusal(
        RULE_PROBE_KIND,
        "a TraceJob may not name an interface for the network hooks xdp and tc (they see every packet of it, whoever sends it)",
        "leave interface out to trace the job's pods' own interfaces, or use network hook cgroupSkb or a ClusterTraceJob",
    )
}

/// The [`RULE_PROBE_KIND`] message for a kernel-function catalog entry.
pub fn kernel_catalog_message() -> String {
    refusal(
        RULE_PROBE_KIND,
        &format!(
            "catalog entries {} are built on kernel-function probes",
            KERNEL_CATALOG.join(", ")
        ),
        &format!("use tcp-connect (a tracepoint), {ASK_AN_ADMIN}"),
    )
}

/// The [`RULE_PROBE_KIND`] message for a catalog entry that times other tasks.
pub fn node_timing_message() -> String {
    refusal(
        RULE_PROBE_KIND,
        &format!(
            "catalog entries {} time other tasks of the node (their hooks run in other tasks' context, where the pod filter cannot tell whose work it is)",
            NODE_TIMING_CATALOG.join(", ")
        ),
        &format!("use syscalls with value latency for the pods' own waits, {ASK_AN_ADMIN}"),
    )
}

/// The [`RULE_PAYLOAD`] message.
pub fn payload_message() -> String {
    refusal(
        RULE_PAYLOAD,
        "a TraceJob may not capture string payloads (paths can carry secrets)",
        &format!("remove events.payload, {ASK_AN_ADMIN}"),
    )
}

/// The [`RULE_KERNEL_ADDRESS`] message for `what` (e.g. `arg0 of raw_tracepoint:sys_enter`).
pub fn kernel_address_message(what: &str) -> String {
    refusal(
        RULE_KERNEL_ADDRESS,
        &format!("{what} is a kernel address, which a TraceJob may not read (it would undo KASLR)"),
        &format!("key by another field, {ASK_AN_ADMIN}"),
    )
}

/// The [`RULE_LIMITS`] message for a limit over the policy's most.
pub fn limit_message(field: &str, asked: u32, most: u32, policy: &str) -> String {
    refusal(
        RULE_LIMITS,
        &format!("{field}={asked} is over the {most} that TracePolicy {policy} allows"),
        &format!("ask for at most {most}, {ASK_AN_ADMIN}"),
    )
}

/// The [`RULE_POLICY`] message for a namespace whose label names a policy that does not exist.
pub fn missing_policy_message(namespace: &str, policy: &str) -> String {
    refusal(
        RULE_POLICY,
        &format!(
            "namespace {namespace} is labelled {}={policy}, and no TracePolicy {policy} exists",
            crate::policy::POLICY_LABEL
        ),
        "ask a cluster admin to create it, or to remove the label for the default rules",
    )
}

impl TraceJobSpec {
    /// What the default tenant rules refuse in this spec: [`Self::tenant_refusals_under`] the
    /// default policy.
    pub fn tenant_refusals(&self) -> Vec<FieldError> {
        self.tenant_refusals_under("(none)", &TracePolicySpec::default())
    }

    /// What the tenant rules refuse in this spec under `policy` (named `name`), as far as the
    /// spec alone tells (the node runner refuses kernel addresses, which only the node's
    /// kernel can tell). Empty for an allowed spec; a spec whose probe does not parse is
    /// [`TraceJobSpec::validate`]'s to refuse.
    pub fn tenant_refusals_under(&self, name: &str, policy: &TracePolicySpec) -> Vec<FieldError> {
        let mut out = Vec::new();
        let mut refuse = |field: &str, message: String| {
            out.push(FieldError {
                field: field.into(),
                message,
            })
        };
        let kernel_form = |kind: GrantedKind| {
            (!policy.allows(kind)).then(|| {
                (
                    format!("spec.probe.{}", kind.name()),
                    kernel_form_message(kind.name()),
                )
            })
        };
        let refused = match self.probe.parse() {
            Ok(Probe::Kprobe(_)) => kernel_form(GrantedKind::Kprobe),
            Ok(Probe::Kretprobe(_)) => kernel_form(GrantedKind::Kretprobe),
            Ok(Probe::Fentry(_)) => kernel_form(GrantedKind::Fentry),
            Ok(Probe::Fexit(_)) => kernel_form(GrantedKind::Fexit),
            Ok(Probe::Lsm(_)) => kernel_form(GrantedKind::Lsm),
            Ok(Probe::RawTracepoint(name))
                if !TENANT_RAW_TRACEPOINTS.contains(&name.as_str())
                    && !policy.allows(GrantedKind::RawTracepoint) =>
            {
                Some(("spec.probe.rawTracepoint".into(), raw_tracepoint_message()))
            }
            Ok(Probe::Network(n))
                if INTERFACE_HOOKS.contains(&n.hook.name()) && n.interface.is_some() =>
            {
                Some(("spec.probe.network.hook".into(), interface_hook_message()))
            }
            Ok(Probe::Catalog(c))
                if KERNEL_CATALOG.contains(&c.as_str()) && !policy.allows(GrantedKind::Kprobe) =>
            {
                Some(("spec.probe.catalog".into(), kernel_catalog_message()))
            }
            Ok(Probe::Catalog(c))
                if NODE_TIMING_CATALOG.contains(&c.as_str()) && !policy.allow.node_timing =>
            {
                Some(("spec.probe.catalog".into(), node_timing_message()))
            }
            _ => None,
        };
        if let Some((field, message)) = refused {
            refuse(&field, message);
        }
        if self.events.as_ref().and_then(|e| e.payload) == Some(true) && !policy.allow.payload {
            refuse("spec.events.payload", payload_message());
        }
        let limits = self.limits.as_ref();
        if let Some(most) = policy.limits.max_cpu_percent
            && let Some(asked) = limits.and_then(|l| l.cpu_percent)
            && asked > most
        {
            let field = "spec.limits.cpuPercent";
            refuse(field, limit_message(field, asked, most, name));
        }
        if let Some(most) = policy.limits.max_map_entries {
            let asked = limits
                .and_then(|l| l.map_entries)
                .unwrap_or(DEFAULT_MAP_ENTRIES);
            if asked > most {
                let field = "spec.limits.mapEntries";
                refuse(field, limit_message(field, asked, most, name));
            }
        }
        out
    }

    /// The CPU budget of this job under `policy` on a node whose default is `node_default`:
    /// its own `limits.cpuPercent`, else the policy's default, else the node's; never over
    /// the policy's most. `None`: no budget.
    pub fn cpu_percent_under(
        &self,
        policy: &TracePolicySpec,
        node_default: Option<u32>,
    ) -> Option<u32> {
        let own = self.limits.as_ref().and_then(|l| l.cpu_percent);
        let budget = own.or(policy.limits.default_cpu_percent).or(node_default);
        match (budget, policy.limits.max_cpu_percent) {
            (Some(b), Some(most)) => Some(b.min(most)),
            (None, most) => most,
            (b, None) => b,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> TraceJobSpec {
        serde_yaml::from_str(yaml).expect("spec")
    }

    #[test]
    fn each_kernel_form_is_refused_with_its_field_and_rule() {
        for form in KERNEL_FORMS {
            let s = spec(&format!("probe: {{ {form}: tcp_v4_connect }}"));
            let r = s.tenant_refusals();
            assert_eq!(r.len(), 1, "{form}: {r:?}");
            assert_eq!(r[0].field, format!("spec.probe.{form}"));
            assert!(r[0].message.contains(RULE_PROBE_KIND), "{}", r[0].message);
        }
    }

    #[test]
    fn what_a_tenant_may_use_is_not_refused() {
        for ok in [
            "probe: { tracepoint: skb/kfree_skb }",
            "probe: { rawTracepoint: sys_enter }\naggregate: { by: [syscall] }",
            "probe: { catalog: tcp-connect }",
            "probe: { catalog: packet-drops }",
            "probe: { profile: { frequency: 99 } }",
            "probe: { uprobe: '/bin/sh:main' }",
            "probe: { usdt: '/usr/bin/python3:python:function__entry' }",
            "probe: { catalog: exec }\nevents: { last: 10 }",
            "probe: { catalog: exec }\nevents: { payload: false }",
        ] {
            assert_eq!(spec(ok).tenant_refusals(), vec![], "{ok}");
        }
    }

    #[test]
    fn other_raw_tracepoints_kernel_catalog_entries_and_payloads_are_refused() {
        for (bad, field, rule) in [
            (
                "probe: { rawTracepoint: kfree_skb }",
                "spec.probe.rawTracepoint",
                RULE_PROBE_KIND,
            ),
            (
                "probe: { catalog: tcp-connect-kprobe }",
                "spec.probe.catalog",
                RULE_PROBE_KIND,
            ),
            (
                "probe: { catalog: exec }\nevents: { payload: true }",
                "spec.events.payload",
                RULE_PAYLOAD,
            ),
        ] {
            let r = spec(bad).tenant_refusals();
            assert_eq!(r.len(), 1, "{bad}: {r:?}");
            assert_eq!(r[0].field, field);
            assert!(r[0].message.contains(rule), "{}", r[0].message);
        }
    }
}
