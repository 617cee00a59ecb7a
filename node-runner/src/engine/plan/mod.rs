//! From a checked spec and a kernel to a [`JobPlan`]: which generic programs attach where,
//! how they are configured, and how their output is decoded. Resolving the plan is the
//! feasibility check: every attach point, symbol and field is looked up on this kernel, and
//! what is missing is reported per probe in a [`Verdict`].

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    path::PathBuf,
    time::Duration,
};

use fathom_common::{ProbeConfig, Source, StashConfig, filter, flags, key, source, strsrc, value};
use fathom_crds::{
    CheckedSpec, Probe,
    spec::{KeySpec, ValueSpec},
    verdict::{ProbeVerdict, Reason, Verdict},
};

use crate::engine::{
    catalog,
    elf::{self, ElfError},
    error::EngineError,
    kernel::{self, Kernel},
    tracefs::{TpField, TracepointFormat},
};

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
        }
    }
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
}

impl JobPlan {
    /// Turns the filter flags' cgroup bit on exactly when the scope is a cgroup set, in both
    /// the main and the stash configuration. `plan` calls it, and `Session::start` again, so a
    /// scope replaced after planning still reaches the kernel.
    pub fn apply_scope(&mut self) {
        self.config.filter_flags = scope_filter_flags(self.config.filter_flags, &self.scope);
        self.stash.filter_flags = scope_filter_flags(self.stash.filter_flags, &self.scope);
    }

    /// Every attach point's label.
    pub fn probe_labels(&self) -> Vec<String> {
        self.attachments.iter().map(|a| a.point.label()).collect()
    }
}

/// The reason a job limited to targets attaches nothing on a node.
pub const NOTHING_ATTACHED: &str = "no target pod of this job runs on this node: nothing attached";

/// Which tasks a job's probes observe on this node. There is no default and no "empty means
/// everything": whoever plans a job names its scope, and only [`Scope::Node`] sees the whole
/// node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every task of the node: `fathom run`, or a ClusterTraceJob's node-wide assignment
    /// (`spec.nodeWide`).
    Node,
    /// Only the tasks of these cgroups, enforced in the kernel by the cgroup filter: how a
    /// namespaced job sees only its own pods.
    Cgroups(CgroupSet),
    /// The job is limited to targets and none of them has a cgroup on this node: nothing is
    /// loaded or attached, and the result stays empty ([`NOTHING_ATTACHED`] says why).
    Nothing,
}

impl Scope {
    /// The scope of a job limited to `ids` (its target pods' cgroups on this node): those
    /// cgroups, or [`Scope::Nothing`] when there are none — never the whole node.
    pub fn targets(ids: impl IntoIterator<Item = u64>) -> Scope {
        match CgroupSet::new(ids) {
            Some(set) => Scope::Cgroups(set),
            None => Scope::Nothing,
        }
    }

    /// Whether the probes attach at all.
    pub fn attaches(&self) -> bool {
        !matches!(self, Scope::Nothing)
    }

    /// The cgroup ids the kernel filter admits; empty unless the scope is a cgroup set.
    pub fn cgroup_ids(&self) -> Vec<u64> {
        match self {
            Scope::Cgroups(set) => set.ids().collect(),
            Scope::Node | Scope::Nothing => Vec::new(),
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Node => f.write_str("the whole node"),
            Scope::Cgroups(set) if set.count() == 1 => f.write_str("1 cgroup"),
            Scope::Cgroups(set) => write!(f, "{} cgroups", set.count()),
            Scope::Nothing => f.write_str(NOTHING_ATTACHED),
        }
    }
}

/// A non-empty set of cgroup ids: the only way to build a [`Scope::Cgroups`], so a cgroup
/// scope always admits at least one cgroup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupSet(BTreeSet<u64>);

impl CgroupSet {
    /// The set of `ids`; `None` when there are none.
    pub fn new(ids: impl IntoIterator<Item = u64>) -> Option<CgroupSet> {
        let set: BTreeSet<u64> = ids.into_iter().collect();
        (!set.is_empty()).then_some(CgroupSet(set))
    }

    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.0.iter().copied()
    }

    /// How many cgroups: at least 1.
    pub fn count(&self) -> usize {
        self.0.len()
    }
}

/// `flags` with the cgroup filter bit on exactly when `scope` is a cgroup set.
pub fn scope_filter_flags(flags: u32, scope: &Scope) -> u32 {
    match scope {
        Scope::Cgroups(_) => flags | filter::CGROUP,
        Scope::Node | Scope::Nothing => flags & !filter::CGROUP,
    }
}

/// A catalog entry or a user probe, before fields are resolved.
#[derive(Clone, Debug)]
pub struct Template {
    pub label: String,
    pub main: AttachPoint,
    pub stash: Vec<AttachPoint>,
    /// Pairing key at the stash points and at the main point.
    pub stash_key: Option<(Named, Named)>,
    /// A value to stash with the start time.
    pub stash_value: Option<Named>,
    pub default_by: Vec<KeySpec>,
    pub default_value: ValueSpec,
    /// Event columns (besides pid/comm), when the entry is event style.
    pub event_columns: Vec<(String, EventSource)>,
    pub payload: Option<PayloadSource>,
    /// An equality filter on a field.
    pub matches: Option<(Named, u64)>,
    /// The value the main program reads for `sum`/`hist`/events when the job does not say.
    pub event_value: Option<Named>,
}

impl Template {
    /// One attach point, counted, nothing else.
    pub fn new(label: String, main: AttachPoint) -> Template {
        Template {
            label,
            main,
            stash: Vec::new(),
            stash_key: None,
            stash_value: None,
            default_by: Vec::new(),
            default_value: ValueSpec::Count,
            event_columns: Vec::new(),
            payload: None,
            matches: None,
            event_value: None,
        }
    }
}

/// A number by name, resolved against the attach point: a tracepoint field, `argN`, `ret`,
/// `tid`, `pid`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Named {
    Field(String),
    Arg(u32),
    Ret,
    Tid,
}

/// Where an event column of a template comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventSource {
    Ppid,
    /// The main program's value (e.g. a syscall's return).
    Value,
    /// A named number, stored in an event field slot.
    Named(Named),
}

/// Where a template's string payload comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PayloadSource {
    /// A field of the main tracepoint (`__data_loc` or a user `char *`).
    Field(String),
    /// A user pointer the stash program kept (the stash value).
    Stashed,
}

/// Resolves a checked spec on this kernel into a plan limited to `scope`, or the verdict of
/// why it cannot run. Feasibility is checked whatever the scope, [`Scope::Nothing`] included.
pub fn plan(spec: &CheckedSpec, kernel: &Kernel, scope: Scope) -> Result<JobPlan, EngineError> {
    let mut verdicts = Vec::new();
    let caps = kernel::missing_capabilities(kernel::effective_caps());
    let template = match template_for(&spec.probe, spec) {
        Ok(t) => t,
        Err(v) => return Err(EngineError::NotFeasible(Verdict::from_probes(vec![v]))),
    };
    let mut points: Vec<(Role, AttachPoint)> = template
        .stash
        .iter()
        .map(|p| (Role::Stash, p.clone()))
        .collect();
    points.push((Role::Main, template.main.clone()));

    let mut formats: BTreeMap<String, TracepointFormat> = BTreeMap::new();
    for (_, point) in &points {
        let v = check_point(point, kernel, &caps);
        if v.feasible
            && let AttachPoint::Tracepoint { category, name } = point
            && let Some(tfs) = &kernel.tracefs
            && let Ok(f) = tfs.format(category, name)
        {
            formats.insert(point.label(), f);
        }
        verdicts.push(v);
    }
    if verdicts.iter().any(|v| !v.feasible) {
        return Err(EngineError::NotFeasible(Verdict::from_probes(verdicts)));
    }

    let main_label = template.main.label();
    let main_fmt = formats.get(&main_label);
    let resolver = Resolver {
        point: &template.main,
        format: main_fmt,
    };
    let mut field_errors = Vec::new();
    let mut config = ProbeConfig::EMPTY;
    let mut stash = StashConfig::EMPTY;

    // Keys.
    let keys: Vec<KeySpec> = if !spec.keys_given {
        template.default_by.clone()
    } else {
        spec.keys.clone()
    };
    let mut columns = Vec::new();
    let mut field_slots: Vec<Source> = Vec::new();
    for k in &keys {
        let (part, render) = match k {
            KeySpec::Node => (KeyPart::Node, Render::Unsigned),
            KeySpec::Pid => (KeyPart::Pid, Render::Unsigned),
            KeySpec::Tid => (KeyPart::Tid, Render::Unsigned),
            KeySpec::Comm => (KeyPart::Comm, Render::Unsigned),
            KeySpec::Cgroup => (KeyPart::Cgroup(CgroupView::Id), Render::Unsigned),
            KeySpec::Namespace => (KeyPart::Cgroup(CgroupView::Namespace), Render::Unsigned),
            KeySpec::Pod => (KeyPart::Cgroup(CgroupView::Pod), Render::Unsigned),
            KeySpec::Container => (KeyPart::Cgroup(CgroupView::Container), Render::Unsigned),
            KeySpec::Cpu => (KeyPart::Cpu, Render::Unsigned),
            KeySpec::Kstack => (KeyPart::Kstack, Render::Unsigned),
            KeySpec::Ustack => (KeyPart::Ustack, Render::Unsigned),
            KeySpec::Syscall | KeySpec::Arg(_) | KeySpec::Ret | KeySpec::Field(_) => {
                match resolver.key_source(k) {
                    Ok((src, render)) => {
                        let slot = field_slots.len();
                        field_slots.push(src);
                        (KeyPart::Field(slot), render)
                    }
                    Err(e) => {
                        field_errors.push(ProbeVerdict {
                            probe: main_label.clone(),
                            feasible: false,
                            reason: Some(Reason::SymbolNotFound),
                            message: format!("spec.aggregate.by: {e}"),
                        });
                        continue;
                    }
                }
            }
        };
        columns.push(Column {
            name: k.name(),
            part,
            render,
        });
    }

    // Value.
    let value_spec = if !spec.value_given {
        template.default_value.clone()
    } else {
        spec.value.clone()
    };
    let mut value_kind = ValueKind::Count;
    let value_label = match &value_spec {
        ValueSpec::Count => "count".to_string(),
        ValueSpec::Sum(k) => format!("sum({})", k.name()),
        ValueSpec::Hist(k) => format!("hist({})", k.name()),
        ValueSpec::Latency => "latency (ns)".to_string(),
    };
    match &value_spec {
        ValueSpec::Count => {}
        ValueSpec::Sum(k) | ValueSpec::Hist(k) => match resolver.key_source(k) {
            Ok((src, _)) => {
                config.value_src = src;
                value_kind = if matches!(value_spec, ValueSpec::Sum(_)) {
                    ValueKind::Sum
                } else {
                    ValueKind::Hist
                };
            }
            Err(e) => field_errors.push(ProbeVerdict {
                probe: main_label.clone(),
                feasible: false,
                reason: Some(Reason::SymbolNotFound),
                message: format!("spec.aggregate.value: {e}"),
            }),
        },
        ValueSpec::Latency => {
            config.value_src = Source {
                kind: source::LATENCY,
                ..Source::NONE
            };
            value_kind = ValueKind::Hist;
        }
    }
    let latency = value_spec == ValueSpec::Latency;

    // Events.
    let mut events = None;
    if let Some(ev) = &spec.events {
        let mut cols: Vec<(String, EventPart)> = vec![
            ("pid".into(), EventPart::Pid),
            ("comm".into(), EventPart::Comm),
        ];
        for (name, src) in &template.event_columns {
            match src {
                EventSource::Ppid => match kernel.task_offsets() {
                    Some((parent, tgid)) => {
                        config.event_arg = Source {
                            kind: source::PARENT_PID,
                            offset: parent,
                            size: tgid,
                            signed: 0,
                        };
                        cols.push((name.clone(), EventPart::Arg(Render::Unsigned)));
                    }
                    // Without BTF the parent is looked up in /proc when the event is read.
                    None => cols.push((name.clone(), EventPart::Ppid)),
                },
                EventSource::Value => {
                    if let Some(n) = &template.event_value {
                        match resolver.named(n) {
                            Ok((src, render)) => {
                                if config.value_src.kind == source::NONE {
                                    config.value_src = src;
                                }
                                cols.push((name.clone(), EventPart::Value(render)));
                            }
                            Err(e) => field_errors.push(infeasible(&main_label, e)),
                        }
                    }
                }
                EventSource::Named(n) => match resolver.named(n) {
                    Ok((src, render)) => {
                        let slot = field_slots.len();
                        if slot < 2 {
                            field_slots.push(src);
                            cols.push((name.clone(), EventPart::Field(slot, render)));
                        } else {
                            config.event_arg = src;
                            cols.push((name.clone(), EventPart::Arg(render)));
                        }
                    }
                    Err(e) => field_errors.push(infeasible(&main_label, e)),
                },
            }
        }
        // Keys the user asked for show in events too.
        for c in &columns {
            if let KeyPart::Field(i) = c.part
                && !cols.iter().any(|(n, _)| n == &c.name)
            {
                cols.push((c.name.clone(), EventPart::Field(i, c.render.clone())));
            }
        }
        if latency {
            cols.push(("latency_ns".into(), EventPart::Value(Render::Unsigned)));
        }
        if let Some(p) = &template.payload {
            let name = match p {
                PayloadSource::Field(f) => f.clone(),
                PayloadSource::Stashed => "filename".into(),
            };
            cols.push((name, EventPart::Payload));
            if ev.payload {
                match p {
                    PayloadSource::Field(f) => match main_fmt.and_then(|fm| fm.field(f)) {
                        Some(field) if field.is_data_loc() => {
                            config.str_kind = strsrc::TP_DATA_LOC;
                            config.str_offset = field.offset;
                        }
                        Some(field) if field.is_char_pointer() => {
                            config.str_kind = strsrc::TP_USER_PTR;
                            config.str_offset = field.offset;
                        }
                        _ => field_errors.push(infeasible(
                            &main_label,
                            format!("no string field {f:?} in this tracepoint"),
                        )),
                    },
                    PayloadSource::Stashed => config.str_kind = strsrc::STASHED_USER_PTR,
                }
                config.str_max = ev.max_payload_bytes;
            }
        }
        events = Some(EventPlan {
            last: ev.last as usize,
            columns: cols,
            payload: ev.payload,
        });
    }
    if field_slots.len() > 2 {
        field_errors.push(infeasible(
            &main_label,
            "more than 2 field keys and event fields together; aggregate by fewer fields".into(),
        ));
    }
    for (i, src) in field_slots.iter().take(2).enumerate() {
        config.key_fields[i] = *src;
    }

    // Pairing (latency, stashed pointers).
    let mut attachments = Vec::new();
    let needs_stash = latency || template.stash_value.is_some();
    if needs_stash {
        let Some((entry_key, exit_key)) = &template.stash_key else {
            return Err(EngineError::NotFeasible(Verdict::from_probes(vec![
                infeasible(
                    &main_label,
                    "latency needs an entry/return pair this probe does not have".into(),
                ),
            ])));
        };
        let stash_points: Vec<&AttachPoint> = template.stash.iter().collect();
        for sp in &stash_points {
            let fmt = formats.get(&sp.label());
            let r = Resolver {
                point: sp,
                format: fmt,
            };
            match r.named(entry_key) {
                Ok((src, _)) => stash.key_src = src,
                Err(e) => field_errors.push(infeasible(&sp.label(), e)),
            }
            if let Some(v) = &template.stash_value {
                match r.named(v) {
                    Ok((src, _)) => stash.value_src = src,
                    Err(e) => field_errors.push(infeasible(&sp.label(), e)),
                }
            }
            attachments.push(Attachment {
                role: Role::Stash,
                point: (*sp).clone(),
            });
        }
        match resolver.named(exit_key) {
            Ok((src, _)) => stash.exit_key_src = src,
            Err(e) => field_errors.push(infeasible(&main_label, e)),
        }
        config.flags |= flags::PAIRED;
    }
    attachments.push(Attachment {
        role: Role::Main,
        point: template.main.clone(),
    });

    if let Some((n, v)) = &template.matches {
        match resolver.named(n) {
            Ok((src, _)) => {
                config.match_src = src;
                config.match_value = *v;
                config.filter_flags |= filter::FIELD;
            }
            Err(e) => field_errors.push(infeasible(&main_label, e)),
        }
    }

    if !field_errors.is_empty() {
        return Err(EngineError::NotFeasible(Verdict::from_probes(field_errors)));
    }

    // Kernel key mask, including hidden parts needed for rendering.
    let mut hidden = Vec::new();
    let mut mask = 0;
    for c in &columns {
        mask |= match c.part {
            KeyPart::Node => 0,
            KeyPart::Pid => key::PID,
            KeyPart::Tid => key::TID,
            KeyPart::Comm => key::COMM,
            KeyPart::Cgroup(_) => key::CGROUP,
            KeyPart::Cpu => key::CPU,
            KeyPart::Kstack => key::KSTACK,
            KeyPart::Ustack => key::USTACK,
            KeyPart::Field(0) => key::FIELD0,
            KeyPart::Field(_) => key::FIELD1,
        };
    }
    if mask & key::USTACK != 0 && mask & key::PID == 0 {
        mask |= key::PID;
        hidden.push(KeyPart::Pid);
    }
    config.key_mask = mask;
    if let Some((slots, words)) = fathom_common::compact::slots(mask, value_kind == ValueKind::Hist)
    {
        config.flags |= flags::COMPACT;
        config.compact_slots = slots;
        config.compact_words = words as u32;
    }
    config.value_kind = match value_kind {
        ValueKind::Count => value::COUNT,
        ValueKind::Sum => value::SUM,
        ValueKind::Hist => value::HIST,
    };
    if spec.aggregate {
        config.flags |= flags::AGGREGATE;
    }
    if events.is_some() {
        config.flags |= flags::EMIT;
    }
    if !spec.pids.is_empty() {
        config.filter_flags |= filter::PID;
    }
    if let Some(c) = &spec.comm {
        config.filter_flags |= filter::COMM;
        let bytes = c.as_bytes();
        config.comm[..bytes.len()].copy_from_slice(bytes);
    }
    stash.filter_flags = config.filter_flags & (filter::PID | filter::COMM | filter::CGROUP);
    config.rate_limit = spec.events_per_second.map_or(0, u64::from);
    // Helper calls only where something reads their result.
    if config.rate_limit > 0 || config.flags & (flags::PAIRED | flags::EMIT) != 0 {
        config.flags |= flags::TIME;
    }
    if mask & key::COMM != 0 || config.filter_flags & filter::COMM != 0 || events.is_some() {
        config.flags |= flags::COMM;
    }

    let mut plan = JobPlan {
        label: template.label.clone(),
        value_label,
        attachments,
        config,
        stash,
        columns,
        hidden,
        value: value_kind,
        top: spec.top as usize,
        aggregate: spec.aggregate,
        events,
        pids: spec.pids.clone(),
        scope,
        map_entries: spec.map_entries,
        duration: spec.duration,
        cpu_percent: spec.cpu_percent,
        verdict: Verdict::from_probes(verdicts),
    };
    plan.apply_scope();
    Ok(plan)
}

fn infeasible(probe: &str, message: String) -> ProbeVerdict {
    ProbeVerdict {
        probe: probe.to_string(),
        feasible: false,
        reason: Some(Reason::SymbolNotFound),
        message,
    }
}

/// The template of a user probe or catalog entry.
fn template_for(probe: &Probe, spec: &CheckedSpec) -> Result<Template, ProbeVerdict> {
    let simple = |main: AttachPoint| Template::new(probe.display_name(), main);
    let latency = spec.value == ValueSpec::Latency;
    Ok(match probe {
        Probe::Catalog(name) => catalog::template(name, spec)?,
        Probe::Tracepoint { category, name } => {
            let mut t = simple(AttachPoint::Tracepoint {
                category: category.clone(),
                name: name.clone(),
            });
            t.payload = None;
            t
        }
        Probe::RawTracepoint(name) => simple(AttachPoint::RawTracepoint { name: name.clone() }),
        Probe::Kprobe(f) => simple(AttachPoint::Kprobe {
            function: f.clone(),
        }),
        Probe::Kretprobe(f) => {
            let mut t = simple(AttachPoint::Kretprobe {
                function: f.clone(),
            });
            if latency {
                t.stash = vec![AttachPoint::Kprobe {
                    function: f.clone(),
                }];
                t.stash_key = Some((Named::Tid, Named::Tid));
            }
            t
        }
        Probe::Fentry(f) => simple(AttachPoint::Fentry {
            function: f.clone(),
        }),
        Probe::Fexit(f) => {
            let mut t = simple(AttachPoint::Fexit {
                function: f.clone(),
            });
            if latency {
                t.stash = vec![AttachPoint::Fentry {
                    function: f.clone(),
                }];
                t.stash_key = Some((Named::Tid, Named::Tid));
            }
            t
        }
        Probe::Uprobe { binary, symbol } => simple(AttachPoint::Uprobe {
            binary: PathBuf::from(binary),
            target: UprobeTarget::Symbol(symbol.clone()),
            ret: false,
        }),
        Probe::Uretprobe { binary, symbol } => {
            let mut t = simple(AttachPoint::Uprobe {
                binary: PathBuf::from(binary),
                target: UprobeTarget::Symbol(symbol.clone()),
                ret: true,
            });
            if latency {
                t.stash = vec![AttachPoint::Uprobe {
                    binary: PathBuf::from(binary),
                    target: UprobeTarget::Symbol(symbol.clone()),
                    ret: false,
                }];
                t.stash_key = Some((Named::Tid, Named::Tid));
            }
            t
        }
        Probe::Usdt {
            binary,
            provider,
            name,
        } => {
            let label = format!("{provider}:{name}");
            let offset = elf::usdt_offset(std::path::Path::new(binary), provider, name)
                .map_err(|e| elf_verdict(&probe.display_name(), e))?;
            simple(AttachPoint::Uprobe {
                binary: PathBuf::from(binary),
                target: UprobeTarget::Offset { offset, label },
                ret: false,
            })
        }
        Probe::Profile { frequency } => simple(AttachPoint::Profile {
            frequency: *frequency,
        }),
        Probe::Lsm(hook) => simple(AttachPoint::Lsm { hook: hook.clone() }),
    })
}

fn elf_verdict(probe: &str, e: ElfError) -> ProbeVerdict {
    let reason = match e {
        ElfError::Missing(_) | ElfError::NotElf(_) => Reason::BinaryNotFound,
        ElfError::NoSymbol { .. } | ElfError::NoUsdt { .. } => Reason::SymbolNotFound,
    };
    ProbeVerdict {
        probe: probe.to_string(),
        feasible: false,
        reason: Some(reason),
        message: e.to_string(),
    }
}

/// Checks one attach point against the kernel.
pub fn check_point(point: &AttachPoint, kernel: &Kernel, missing_caps: &[&str]) -> ProbeVerdict {
    let label = point.label();
    let no = |reason: Reason, message: String| ProbeVerdict {
        probe: label.clone(),
        feasible: false,
        reason: Some(reason),
        message,
    };
    if !missing_caps.is_empty() {
        return no(
            Reason::PermissionDenied,
            format!(
                "this process lacks {}; run as root or grant CAP_BPF and CAP_PERFMON",
                missing_caps.join(" and ")
            ),
        );
    }
    let needs_tracefs = matches!(
        point,
        AttachPoint::Tracepoint { .. }
            | AttachPoint::RawTracepoint { .. }
            | AttachPoint::Kprobe { .. }
            | AttachPoint::Kretprobe { .. }
    );
    if needs_tracefs && kernel.tracefs.is_none() {
        return no(
            Reason::FilesystemUnavailable,
            kernel
                .tracefs_error
                .clone()
                .unwrap_or_else(|| "tracefs is not available".into()),
        );
    }
    match point {
        AttachPoint::Tracepoint { category, name } => {
            let tfs = kernel.tracefs.as_ref().expect("checked above");
            if !tfs.has_tracepoint(category, name) {
                let alternatives = tfs.categories_of(name);
                let hint = if alternatives.is_empty() {
                    format!(
                        "`fathom list 'tracepoint:{category}:*'` lists the tracepoints of {category}"
                    )
                } else {
                    format!(
                        "it exists as {}",
                        alternatives
                            .iter()
                            .map(|c| format!("{c}/{name}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                };
                return no(
                    Reason::SymbolNotFound,
                    format!("tracepoint {category}/{name} does not exist on this kernel; {hint}"),
                );
            }
        }
        AttachPoint::RawTracepoint { name } => {
            let tfs = kernel.tracefs.as_ref().expect("checked above");
            if tfs.categories_of(name).is_empty() {
                return no(
                    Reason::SymbolNotFound,
                    format!(
                        "no tracepoint named {name} on this kernel; `fathom list 'tracepoint:*{name}*'` finds similar ones"
                    ),
                );
            }
        }
        AttachPoint::Kprobe { function } | AttachPoint::Kretprobe { function } => {
            if !kernel.has_kprobes() {
                return no(
                    Reason::AttachKindUnsupported,
                    "kprobes are not built into this kernel (CONFIG_KPROBES); use a tracepoint or a raw tracepoint".into(),
                );
            }
            if !kernel.kernel_functions().contains(function) {
                return no(
                    Reason::SymbolNotFound,
                    format!(
                        "kernel function {function} is not in /proc/kallsyms; `fathom list 'kprobe:*{function}*'` finds similar ones"
                    ),
                );
            }
        }
        AttachPoint::Fentry { function } | AttachPoint::Fexit { function } => {
            if !kernel.has_btf() {
                return no(
                    Reason::BTFUnavailable,
                    format!(
                        "{} is missing: fentry/fexit need kernel BTF (CONFIG_DEBUG_INFO_BTF); use a kprobe or a tracepoint",
                        kernel.btf_path.display()
                    ),
                );
            }
            match kernel.btf_has_function(function) {
                Ok(true) => {}
                Ok(false) => {
                    return no(
                        Reason::SymbolNotFound,
                        format!(
                            "kernel function {function} is not in the kernel's BTF; `fathom list 'fentry:*{function}*'` finds similar ones"
                        ),
                    );
                }
                Err(e) => {
                    return no(
                        Reason::BTFUnavailable,
                        format!("reading kernel BTF failed: {e}"),
                    );
                }
            }
            if let Err((reason, message)) = crate::engine::session::trial_load(point, kernel) {
                return no(reason, message);
            }
        }
        AttachPoint::Lsm { hook } => {
            if !kernel.has_btf() {
                return no(
                    Reason::BTFUnavailable,
                    format!(
                        "{} is missing: LSM programs need kernel BTF",
                        kernel.btf_path.display()
                    ),
                );
            }
            match kernel.lsms() {
                Some(l) if !l.iter().any(|x| x == "bpf") => {
                    return no(
                        Reason::AttachKindUnsupported,
                        format!(
                            "BPF LSM is not enabled (active LSMs: {}); add bpf to the lsm= kernel command line",
                            l.join(",")
                        ),
                    );
                }
                None => {
                    return no(
                        Reason::AttachKindUnsupported,
                        format!(
                            "cannot read {} to see whether BPF LSM is enabled; mount securityfs or enable lsm=…,bpf",
                            kernel.lsm_path.display()
                        ),
                    );
                }
                _ => {}
            }
            let func = format!("bpf_lsm_{hook}");
            if !matches!(kernel.btf_has_function(&func), Ok(true)) {
                return no(
                    Reason::SymbolNotFound,
                    format!("LSM hook {hook} does not exist on this kernel ({func} is not in BTF)"),
                );
            }
            if let Err((reason, message)) = crate::engine::session::trial_load(point, kernel) {
                return no(reason, message);
            }
        }
        AttachPoint::Uprobe { binary, target, .. } => {
            if let UprobeTarget::Symbol(sym) = target
                && let Err(e) = elf::symbol_exists(binary, sym)
            {
                return elf_verdict(&label, e);
            }
        }
        AttachPoint::Profile { .. } => {
            if !std::path::Path::new("/sys/bus/event_source/devices/cpu").exists()
                && !std::path::Path::new("/sys/bus/event_source/devices/software").exists()
            {
                return no(
                    Reason::AttachKindUnsupported,
                    "this kernel has no perf events (CONFIG_PERF_EVENTS)".into(),
                );
            }
        }
    }
    ProbeVerdict {
        probe: label,
        feasible: true,
        reason: None,
        message: String::new(),
    }
}

/// Resolves named numbers against one attach point.
struct Resolver<'a> {
    point: &'a AttachPoint,
    format: Option<&'a TracepointFormat>,
}

impl Resolver<'_> {
    fn field(&self, name: &str) -> Result<&TpField, String> {
        let Some(fmt) = self.format else {
            return Err(format!("{} has no fields", self.point.label()));
        };
        fmt.field(name).ok_or_else(|| {
            let names: Vec<&str> = fmt.own_fields().map(|f| f.name.as_str()).collect();
            format!(
                "{} has no field {name:?}; its fields are: {}",
                self.point.label(),
                names.join(", ")
            )
        })
    }

    fn field_source(&self, name: &str) -> Result<(Source, Render), String> {
        let f = self.field(name)?;
        if !(f.is_scalar() || f.is_ipv4()) {
            return Err(format!(
                "field {name:?} of {} is a {} and cannot be a key or value; use a number field",
                self.point.label(),
                f.c_type
            ));
        }
        let fmt = self.format.expect("field found");
        let symbolic = fmt.symbolic(name);
        let render = if f.is_ipv4() {
            Render::Ipv4
        } else if !symbolic.is_empty() {
            Render::Symbolic(symbolic)
        } else if f.c_type.contains('*') {
            Render::Hex
        } else if f.signed {
            Render::Signed
        } else {
            Render::Unsigned
        };
        Ok((
            Source {
                kind: source::TP_FIELD,
                offset: f.offset,
                size: f.size,
                signed: u32::from(f.signed),
            },
            render,
        ))
    }

    fn named(&self, n: &Named) -> Result<(Source, Render), String> {
        match n {
            Named::Field(f) => self.field_source(f),
            Named::Arg(i) => Ok((
                Source {
                    kind: source::ARG,
                    offset: *i,
                    size: 8,
                    signed: 0,
                },
                Render::Unsigned,
            )),
            Named::Ret => Ok((
                Source {
                    kind: source::RET,
                    offset: 0,
                    size: 8,
                    signed: 1,
                },
                Render::Signed,
            )),
            Named::Tid => Ok((
                Source {
                    kind: source::TID,
                    ..Source::NONE
                },
                Render::Unsigned,
            )),
        }
    }

    /// A key or value name on this attach point.
    fn key_source(&self, k: &KeySpec) -> Result<(Source, Render), String> {
        match (k, self.point) {
            (KeySpec::Syscall, AttachPoint::Tracepoint { .. }) => {
                let name = if self.format.and_then(|f| f.field("id")).is_some() {
                    "id"
                } else {
                    "__syscall_nr"
                };
                self.field_source(name)
                    .map(|(s, _)| (s, Render::Syscall))
                    .map_err(|_| format!("{} carries no syscall number; use tracepoint raw_syscalls/sys_enter or a syscalls:* tracepoint", self.point.label()))
            }
            (KeySpec::Syscall, AttachPoint::RawTracepoint { name })
                if name == "sys_enter" || name == "sys_exit" =>
            {
                self.named(&Named::Arg(1))
                    .map(|(s, _)| (s, Render::Syscall))
            }
            (KeySpec::Syscall, _) => Err(format!(
                "{} carries no syscall number; use tracepoint raw_syscalls/sys_enter",
                self.point.label()
            )),
            (KeySpec::Field(f), _) => self.field_source(f),
            (KeySpec::Ret, AttachPoint::Tracepoint { .. }) => self.field_source("ret"),
            (KeySpec::Arg(i), _) => self.named(&Named::Arg(u32::from(*i))),
            (KeySpec::Ret, _) => self.named(&Named::Ret),
            _ => Err(format!("{} is not a number key", k.name())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_target_set_is_nothing_never_the_node() {
        let scope = Scope::targets(Vec::new());
        assert_eq!(scope, Scope::Nothing);
        assert!(!scope.attaches());
        assert!(scope.cgroup_ids().is_empty());
        assert_eq!(scope.to_string(), NOTHING_ATTACHED);
        assert!(CgroupSet::new(Vec::new()).is_none());
    }

    #[test]
    fn a_target_set_keeps_each_cgroup_once() {
        let scope = Scope::targets([7, 3, 7]);
        assert!(scope.attaches());
        assert_eq!(scope.cgroup_ids(), vec![3, 7]);
        assert_eq!(scope.to_string(), "2 cgroups");
        assert_eq!(Scope::targets([9]).to_string(), "1 cgroup");
    }

    #[test]
    fn the_cgroup_filter_is_on_exactly_for_a_cgroup_set() {
        let other = filter::PID | filter::COMM;
        let set = Scope::targets([1]);
        assert_eq!(scope_filter_flags(other, &set), other | filter::CGROUP);
        for scope in [Scope::Node, Scope::Nothing] {
            assert_eq!(scope_filter_flags(other | filter::CGROUP, &scope), other);
            assert_eq!(scope_filter_flags(other, &scope), other);
        }
    }
}
