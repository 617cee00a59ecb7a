//! From a checked spec and a kernel to a [`JobPlan`]: which generic programs attach where,
//! how they are configured, and how their output is decoded. Resolving the plan is the
//! feasibility check: every attach point, symbol and field is looked up on this kernel, and
//! what is missing is reported per probe in a [`Verdict`].
//!
//! [`plan`] reads as its steps, each in its own file:
//!
//! 1. [`template`]: the probe or catalog entry as attach points, pairing and defaults;
//! 2. `check`: every attach point looked up on this kernel (one infeasible point ends
//!    planning here, with every point's verdict);
//! 3. `aggregate`: the key columns and the value; `events`: the event columns and payload;
//! 4. `draft`: the key's field slots (at most 2); `pairing`: the stash programs of a latency
//!    or a stashed pointer; `draft`: the template's match filter, then every field error
//!    found so far, reported together;
//! 5. `kernel_config`: the key mask, the filters and the program flags;
//! 6. the [`scope`]'s cgroup filter ([`JobPlan::apply_scope`]).
//!
//! `resolve` turns names (fields, `argN`, `ret`, key names) into what a program reads.

mod aggregate;
mod check;
mod draft;
mod events;
mod kernel_config;
pub mod network;
mod pairing;
mod resolve;
pub mod scope;
pub mod template;

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use fathom_common::{NetConfig, ProbeConfig, StashConfig};
use fathom_crds::{
    CheckedSpec,
    verdict::{ProbeVerdict, Verdict},
};

pub use self::scope::{CgroupSet, NOTHING_ATTACHED, Scope, scope_filter_flags};
use self::{
    check::check_points,
    draft::Draft,
    kernel_config::{filters, key_mask, program_flags},
    resolve::Resolver,
    template::template_for,
};
use crate::engine::{error::EngineError, kernel::Kernel};

/// Where one program attaches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttachPoint {
    Tracepoint {
        category: String,
        name: String,
    },
    RawTracepoint {
        name: String,
    },
    Kprobe {
        function: String,
    },
    Kretprobe {
        function: String,
    },
    Fentry {
        function: String,
    },
    Fexit {
        function: String,
    },
    Uprobe {
        binary: PathBuf,
        target: UprobeTarget,
        ret: bool,
    },
    Profile {
        frequency: u32,
    },
    Lsm {
        hook: String,
    },
    /// XDP on an interface (received packets).
    Xdp {
        interface: String,
    },
    /// tc (clsact) on an interface, through a TCX link.
    Tc {
        interface: String,
        egress: bool,
    },
    /// cgroup_skb at the root of the cgroup v2 hierarchy (the job's cgroups by the filter).
    CgroupSkb {
        egress: bool,
    },
    /// sock_ops at the root of the cgroup v2 hierarchy, or at each of the job's cgroups.
    SockOps,
}

/// A uprobe location.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UprobeTarget {
    Symbol(String),
    /// A file offset (USDT notes resolve to one).
    Offset {
        offset: u64,
        label: String,
    },
}

impl AttachPoint {
    /// A one-line name, e.g. `tracepoint:skb/kfree_skb`.
    pub fn label(&self) -> String {
        match self {
            AttachPoint::Tracepoint { category, name } => format!("tracepoint:{category}/{name}"),
            AttachPoint::RawTracepoint { name } => format!("raw_tracepoint:{name}"),
            AttachPoint::Kprobe { function } => format!("kprobe:{function}"),
            AttachPoint::Kretprobe { function } => format!("kretprobe:{function}"),
            AttachPoint::Fentry { function } => format!("fentry:{function}"),
            AttachPoint::Fexit { function } => format!("fexit:{function}"),
            AttachPoint::Uprobe {
                binary,
                target,
                ret,
            } => {
                let kind = if *ret { "uretprobe" } else { "uprobe" };
                match target {
                    UprobeTarget::Symbol(s) => format!("{kind}:{}:{s}", binary.display()),
                    UprobeTarget::Offset { label, .. } => {
                        format!("usdt:{}:{label}", binary.display())
                    }
                }
            }
            AttachPoint::Profile { frequency } => format!("profile:{frequency}Hz"),
            AttachPoint::Lsm { hook } => format!("lsm:{hook}"),
            AttachPoint::Xdp { interface } => format!("xdp:{interface}"),
            AttachPoint::Tc { interface, egress } => {
                format!("tc:{interface}/{}", direction(*egress))
            }
            AttachPoint::CgroupSkb { egress } => format!("cgroup_skb/{}", direction(*egress)),
            AttachPoint::SockOps => "sock_ops".into(),
        }
    }
}

fn direction(egress: bool) -> &'static str {
    if egress { "egress" } else { "ingress" }
}

/// What a program does at its attach point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Filter, aggregate, emit.
    Main,
    /// Remember the start time for the main program's pairing.
    Stash,
}

/// One program at one attach point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub role: Role,
    pub point: AttachPoint,
}

impl Attachment {
    /// The program in the object that serves this attachment.
    pub fn program(&self) -> &'static str {
        use AttachPoint as A;
        match (&self.point, self.role) {
            (A::Tracepoint { .. }, Role::Main) => "fathom_tp",
            (A::Tracepoint { .. }, Role::Stash) => "fathom_tp_stash",
            (A::RawTracepoint { .. }, _) => "fathom_raw_tp",
            (A::Kprobe { .. }, Role::Main) => "fathom_kprobe",
            (A::Kprobe { .. }, Role::Stash) => "fathom_kprobe_stash",
            (A::Kretprobe { .. }, _) => "fathom_kretprobe",
            (A::Fentry { .. }, Role::Main) => "fathom_fentry",
            (A::Fentry { .. }, Role::Stash) => "fathom_fentry_stash",
            (A::Fexit { .. }, _) => "fathom_fexit",
            (A::Uprobe { ret: false, .. }, Role::Main) => "fathom_uprobe",
            (A::Uprobe { ret: false, .. }, Role::Stash) => "fathom_uprobe_stash",
            (A::Uprobe { ret: true, .. }, _) => "fathom_uretprobe",
            (A::Profile { .. }, _) => "fathom_profile",
            (A::Lsm { .. }, _) => "fathom_lsm",
            (A::Xdp { .. }, _) => "fathom_xdp",
            (A::Tc { egress: false, .. }, _) => "fathom_tc_ingress",
            (A::Tc { egress: true, .. }, _) => "fathom_tc_egress",
            (A::CgroupSkb { egress: false }, _) => "fathom_cgroup_skb_ingress",
            (A::CgroupSkb { egress: true }, _) => "fathom_cgroup_skb_egress",
            (A::SockOps, _) => "fathom_sock_ops",
        }
    }
}

/// Which part of the kernel key a result column comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyPart {
    Node,
    Pid,
    Tid,
    Comm,
    Cgroup(CgroupView),
    Cpu,
    Kstack,
    Ustack,
    /// `AggKey::fields[i]`.
    Field(usize),
    /// A part of a network probe's `NetKey`.
    Net(NetPart),
}

/// A part of a network key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetPart {
    Interface,
    Direction,
    Protocol,
    Saddr,
    Daddr,
    Sport,
    Dport,
    Cgroup(CgroupView),
}

/// What a column shows of a cgroup id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupView {
    Id,
    Namespace,
    Pod,
    Container,
}

/// How a number is shown.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Render {
    Unsigned,
    /// Sign-extended from this many bytes.
    Signed,
    /// Names from the tracepoint's `__print_symbolic`.
    Symbolic(BTreeMap<u64, String>),
    /// A syscall number.
    Syscall,
    /// A 4-byte address in network order.
    Ipv4,
    Hex,
}

/// A result column.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub part: KeyPart,
    pub render: Render,
}

/// What an event column shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventPart {
    Pid,
    Tid,
    /// The parent's pid, looked up in /proc when the event is read.
    Ppid,
    Comm,
    Cpu,
    Cgroup,
    Value(Render),
    Arg(Render),
    Field(usize, Render),
    Payload,
}

/// Event streaming, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventPlan {
    pub last: usize,
    pub columns: Vec<(String, EventPart)>,
    /// Payload capture is on (else payload columns say so).
    pub payload: bool,
}

/// How aggregated values are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueKind {
    Count,
    Sum,
    Hist,
}

/// Everything the engine needs to run a job.
#[derive(Clone, Debug)]
pub struct JobPlan {
    pub label: String,
    pub value_label: String,
    pub attachments: Vec<Attachment>,
    pub config: ProbeConfig,
    pub stash: StashConfig,
    /// Visible key columns, in the order the job listed them.
    pub columns: Vec<Column>,
    /// Key parts filled in only to render others (a pid for user stacks, a cgroup for pods).
    pub hidden: Vec<KeyPart>,
    pub value: ValueKind,
    pub top: usize,
    pub aggregate: bool,
    pub events: Option<EventPlan>,
    pub pids: Vec<u32>,
    /// The tasks the probes observe: the whole node, a set of cgroups, or nothing at all.
    pub scope: Scope,
    pub map_entries: u32,
    pub duration: Option<Duration>,
    pub cpu_percent: Option<u32>,
    pub verdict: Verdict,
    /// A network probe's configuration (its programs read `NET_CONFIG` and fill `NET_AGG`,
    /// and `config` is unused); `None` for tracing probes.
    pub net: Option<NetConfig>,
    /// xdp/tc on target pods: each pod veth's host-side index and a cgroup of its pod (the
    /// kernel names packets by it).
    pub pod_interfaces: Vec<(u32, u64)>,
}

impl JobPlan {
    /// Turns the filter flags' cgroup bit on exactly when the scope is a cgroup set, in both
    /// the main and the stash configuration. `plan` calls it, and `Session::start` again, so a
    /// scope replaced after planning still reaches the kernel.
    pub fn apply_scope(&mut self) {
        self.config.filter_flags = scope_filter_flags(self.config.filter_flags, &self.scope);
        self.stash.filter_flags = scope_filter_flags(self.stash.filter_flags, &self.scope);
        // Only cgroup_skb filters by cgroup. The other network hooks are scoped by where they
        // attach: xdp/tc to the pods' own veths (their packets have no socket yet), sock_ops
        // to the pods' cgroups (its context has no cgroup id).
        let filtered = self
            .attachments
            .iter()
            .any(|a| matches!(a.point, AttachPoint::CgroupSkb { .. }));
        if let Some(net) = self.net.as_mut() {
            net.filter_flags = if filtered {
                scope_filter_flags(net.filter_flags, &self.scope)
            } else {
                net.filter_flags & !fathom_common::filter::CGROUP
            };
        }
    }

    /// Every attach point's label.
    pub fn probe_labels(&self) -> Vec<String> {
        self.attachments.iter().map(|a| a.point.label()).collect()
    }
}

/// Resolves a checked spec on this kernel into a plan limited to `scope`, or the verdict of
/// why it cannot run. Feasibility is checked whatever the scope, [`Scope::Nothing`] included.
pub fn plan(spec: &CheckedSpec, kernel: &Kernel, scope: Scope) -> Result<JobPlan, EngineError> {
    if let Some(n) = network::net_probe(&spec.probe) {
        return network::plan_network(spec, &n, scope);
    }
    let template = template_for(&spec.probe, spec).map_err(|v| not_feasible(vec![v]))?;
    let (verdicts, formats) = check_points(&template, kernel)?;

    let mut draft = Draft::new(Resolver {
        point: &template.main,
        format: formats.get(&template.main.label()),
        args: resolve::kernel_args(&template.main, kernel),
        reach: spec.reach,
    });
    let columns = draft.keys(spec, &template);
    let value = draft.value(spec, &template);
    let events = spec
        .events
        .as_ref()
        .map(|ev| draft.events(ev, &template, kernel, &columns, value.latency));
    draft.key_fields();
    let attachments = draft.attachments(&template, &formats, value.latency)?;
    draft.field_match(&template);
    let (mut config, mut stash) = draft.finish()?;

    let hidden = key_mask(&mut config, &columns, value.kind);
    filters(&mut config, &mut stash, spec);
    program_flags(&mut config, spec, value.kind, events.is_some());

    let mut plan = JobPlan {
        label: template.label.clone(),
        value_label: value.label,
        attachments,
        config,
        stash,
        columns,
        hidden,
        value: value.kind,
        top: spec.top as usize,
        aggregate: spec.aggregate,
        events,
        pids: spec.pids.clone(),
        scope,
        map_entries: spec.map_entries,
        duration: spec.duration,
        cpu_percent: spec.cpu_percent,
        verdict: Verdict::from_probes(verdicts),
        net: None,
        pod_interfaces: Vec::new(),
    };
    plan.apply_scope();
    Ok(plan)
}

/// The job cannot run on this kernel, for these reasons.
fn not_feasible(verdicts: Vec<ProbeVerdict>) -> EngineError {
    EngineError::NotFeasible(Verdict::from_probes(verdicts))
}
