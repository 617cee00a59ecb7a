//! The TraceJob spec: what a user writes, the same YAML for a cluster and for `fathom run`.
//!
//! The types are plain serde + schemars data; [`TraceJobSpec::validate`] turns one into a
//! checked [`Plan`]-ready form or a list of [`FieldError`]s that name the field and the fix.
//! The CRD's CEL rules mirror the checks a schema can express; the rest (catalog names,
//! aggregate keys against the probe kind, duration syntax) are checked here, by both the
//! operator and the node engine.

use std::{collections::BTreeMap, fmt, time::Duration};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::tenancy::Reach;

/// Largest `limits.mapEntries` a job may ask for (per map).
pub const MAX_MAP_ENTRIES: u32 = 1 << 20;
/// `limits.mapEntries` when the job does not say.
pub const DEFAULT_MAP_ENTRIES: u32 = 16384;
/// Largest `limits.eventsPerSecond`.
pub const MAX_EVENTS_PER_SECOND: u32 = 10_000_000;
/// Largest `duration`: a day. Longer observation is a series of jobs.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);
/// Largest `aggregate.top`.
pub const MAX_TOP: u32 = 10_000;
/// `aggregate.top` when the job does not say.
pub const DEFAULT_TOP: u32 = 50;
/// Largest `events.last`.
pub const MAX_LAST_EVENTS: u32 = 10_000;
/// Largest `events.maxPayloadBytes` (bounded by the kernel record).
pub const MAX_PAYLOAD_BYTES: u32 = 256;
/// Largest `profile.frequency`, in Hz.
pub const MAX_PROFILE_HZ: u32 = 10_000;

/// What to trace, where, for how long, and how to aggregate it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TraceJobSpec {
    /// The hook to attach to: exactly one of the forms below.
    pub probe: ProbeSpec,

    /// How hits are aggregated in the kernel. Absent: count all hits (by nothing), or, for
    /// event catalog entries (exec, open, oom-kill), keep events only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregate: Option<AggregateSpec>,

    /// Stream individual events (a ring buffer) and keep the last N in the result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<EventsSpec>,

    /// In-kernel filters applied before anything is counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<FilterSpec>,

    /// How long the probe runs, e.g. `30s`, `5m`, `1h` (at most 24h). Absent: until the job
    /// is deleted (or Ctrl-C for `fathom run`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,

    /// Budgets the job may not exceed on any node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitsSpec>,

    /// Cluster only: trace only the pods these labels select (pods of the job's own namespace
    /// for a TraceJob). Ignored by `fathom run`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,

    /// Cluster only: trace only the pods of this workload (Deployment, StatefulSet,
    /// DaemonSet or Job of the job's namespace). Ignored by `fathom run`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<TargetRef>,

    /// Cluster only: run only on nodes with these labels. Ignored by `fathom run`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,

    /// Cluster only: `true` stops a running job early (phase Stopped). Ignored by `fathom run`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspend: Option<bool>,

    /// Cluster only: plan without attaching; status lists the nodes and pods the job would
    /// hit. Ignored by `fathom run` (use `fathom check`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<bool>,

    /// Cluster only: delete the job this many seconds after it finished, like a batch Job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds_after_finished: Option<i64>,
}

/// Exactly one attach form.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProbeSpec {
    /// A named preset: syscalls, exec, open, tcp-connect, tcp-connect-kprobe, tcp-retransmit,
    /// packet-drops, profile, runqlat, biolatency, oom-kill, pod-traffic, tcp-rtt, tcp-life.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catalog: Option<String>,
    /// A kernel tracepoint, `category/name` (or `category:name`), e.g. `skb/kfree_skb`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracepoint: Option<String>,
    /// A raw tracepoint by name, e.g. `sys_enter`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_tracepoint: Option<String>,
    /// A kernel function entry, e.g. `tcp_v4_connect` (needs kprobes in the kernel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kprobe: Option<String>,
    /// A kernel function return (needs kprobes in the kernel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kretprobe: Option<String>,
    /// A kernel function entry through a BPF trampoline (needs BTF and trampolines).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fentry: Option<String>,
    /// A kernel function return through a BPF trampoline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fexit: Option<String>,
    /// A user-space function entry, `/path/to/binary:symbol`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uprobe: Option<String>,
    /// A user-space function return, `/path/to/binary:symbol`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uretprobe: Option<String>,
    /// A USDT probe, `/path/to/binary:provider:name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usdt: Option<String>,
    /// CPU sampling with perf events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<ProfileSpec>,
    /// An LSM hook, observe only (never denies), e.g. `file_open` (needs BPF LSM enabled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lsm: Option<String>,
    /// A network hook, observe only (never changes a packet's fate): XDP or tc on an
    /// interface, cgroup_skb on the sockets of the job's pods, sock_ops on TCP connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkSpec>,
}

/// A network hook.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkSpec {
    /// `xdp` (packets as the driver receives them), `tc` (clsact ingress/egress),
    /// `cgroupSkb` (packets of the sockets in the job's cgroups: the natural hook for pods),
    /// `sockOps` (TCP connections: RTT samples or retransmits).
    pub hook: String,
    /// The interface of `xdp` and `tc`, e.g. `eth0`. Leave it out in a job with target pods
    /// to trace the host side of each pod's veth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// `ingress`, `egress` or `both` (the default) for `tc` and `cgroupSkb`; `xdp` sees
    /// ingress only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<String>,
    /// For `sockOps`: `rtt` (the default; one sample per RTT update), `retransmit`, or
    /// `lifetime` (one sample per connection when it closes: microseconds since its handshake
    /// ended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
}

/// CPU sampling.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProfileSpec {
    /// Samples per second per CPU (1–10000). 99 avoids lockstep with timers.
    pub frequency: u32,
}

/// In-kernel aggregation.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AggregateSpec {
    /// Keys: any of node, namespace, pod, container, pid, tid, comm, cgroup, cpu, kstack,
    /// ustack, syscall, a tracepoint field name, arg0…arg5, ret.
    #[serde(default)]
    pub by: Vec<String>,
    /// `count` (default), `sum(<field>)`, `hist(<field>)` (log2 histogram of a field) or
    /// `latency` (log2 histogram of entry→return time in nanoseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// Rows kept in the result (1–10000, default 50); the rest are summed in an "other" row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top: Option<u32>,
}

/// Event streaming.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventsSpec {
    /// Events kept in the result, newest last (1–10000, default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<u32>,
    /// Capture string payloads (file names, exec paths). Off by default: paths can carry
    /// secrets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<bool>,
    /// Bytes of payload kept per event (1–256, default 256).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_payload_bytes: Option<u32>,
}

/// In-kernel filters.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FilterSpec {
    /// Only these process ids (thread group ids), at most 1024.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pids: Vec<u32>,
    /// Only tasks with exactly this command name (at most 15 bytes, as the kernel keeps it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
}

/// Budgets.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LimitsSpec {
    /// Hits per second counted or emitted, across all CPUs of a node; the rest are dropped
    /// in the kernel and counted as rate-limited. Absent: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events_per_second: Option<u32>,
    /// Entries of the aggregation map (1–1048576, default 16384). New keys beyond it are
    /// dropped and counted as map-full.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map_entries: Option<u32>,
    /// CPU time the probes may use, in percent of one CPU, measured by the kernel's BPF
    /// run-time statistics (1–100). A job over it for 3 seconds in a row is stopped. Absent:
    /// the node runner's default (10 unless the runner's --default-cpu-percent says
    /// otherwise); `fathom run` then sets none. A node runs the jobs whose budgets fit its
    /// --node-cpu-budget together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_percent: Option<u32>,
}

/// A workload whose pods a job traces.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetRef {
    /// Deployment, StatefulSet, DaemonSet or Job.
    pub kind: String,
    /// The workload's name, in the job's namespace.
    pub name: String,
}

/// One problem with a spec: the field's path and what to do about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// The field's path, e.g. `spec.aggregate.by[1]`.
    pub field: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

fn err(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

/// The attach form of a probe, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    Catalog(String),
    Tracepoint {
        category: String,
        name: String,
    },
    RawTracepoint(String),
    Kprobe(String),
    Kretprobe(String),
    Fentry(String),
    Fexit(String),
    Uprobe {
        binary: String,
        symbol: String,
    },
    Uretprobe {
        binary: String,
        symbol: String,
    },
    Usdt {
        binary: String,
        provider: String,
        name: String,
    },
    Profile {
        frequency: u32,
    },
    Lsm(String),
    Network(NetProbe),
}

/// Where a network probe attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetHook {
    Xdp,
    Tc,
    CgroupSkb,
    SockOps,
}

impl NetHook {
    /// The hook as the spec writes it.
    pub fn name(self) -> &'static str {
        match self {
            NetHook::Xdp => "xdp",
            NetHook::Tc => "tc",
            NetHook::CgroupSkb => "cgroupSkb",
            NetHook::SockOps => "sockOps",
        }
    }
}

/// Which way packets go through a hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetDirection {
    Ingress,
    Egress,
    Both,
}

impl NetDirection {
    pub fn ingress(self) -> bool {
        matches!(self, NetDirection::Ingress | NetDirection::Both)
    }
    pub fn egress(self) -> bool {
        matches!(self, NetDirection::Egress | NetDirection::Both)
    }
}

/// What a sock_ops probe counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SockEvent {
    Rtt,
    Retransmit,
    /// A connection's lifetime, from the end of its handshake (on either side) to its close,
    /// in microseconds: what libbpf-tools' tcplife reports.
    Lifetime,
}

/// A network probe, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetProbe {
    pub hook: NetHook,
    pub interface: Option<String>,
    pub direction: NetDirection,
    pub event: SockEvent,
}

impl NetProbe {
    /// The probe on one line: `tc:eth0/both`, `cgroupSkb/egress`, `sockOps:rtt`.
    pub fn display_name(&self) -> String {
        let dir = match self.direction {
            NetDirection::Ingress => "ingress",
            NetDirection::Egress => "egress",
            NetDirection::Both => "both",
        };
        match self.hook {
            NetHook::Xdp => format!("xdp:{}", self.interface.as_deref().unwrap_or("*")),
            NetHook::Tc => format!("tc:{}/{dir}", self.interface.as_deref().unwrap_or("*")),
            NetHook::CgroupSkb => format!("cgroupSkb/{dir}"),
            NetHook::SockOps => match self.event {
                SockEvent::Rtt => "sockOps:rtt".into(),
                SockEvent::Retransmit => "sockOps:retransmit".into(),
                SockEvent::Lifetime => "sockOps:lifetime".into(),
            },
        }
    }

    /// The keys a network probe can aggregate by (besides node, namespace, pod, container
    /// and cgroup where the hook knows the socket).
    pub const KEYS: &'static [&'static str] = &[
        "interface",
        "direction",
        "protocol",
        "saddr",
        "daddr",
        "sport",
        "dport",
    ];

    /// The hook knows a packet's pod: by its socket's cgroup (cgroupSkb, tc egress), or by
    /// the pod veth it attaches to (xdp and tc on target pods).
    pub fn knows_cgroup(&self) -> bool {
        self.hook != NetHook::SockOps
    }
}

/// The network catalog entries: `pod-traffic` (bytes and packets of the job's pods by
/// direction and protocol, through cgroup_skb), `tcp-rtt` (TCP round-trip times by peer,
/// through sock_ops) and `tcp-life` (TCP connection lifetimes by peer, through sock_ops).
pub fn network_catalog(name: &str) -> Option<NetProbe> {
    match name {
        "pod-traffic" => Some(NetProbe {
            hook: NetHook::CgroupSkb,
            interface: None,
            direction: NetDirection::Both,
            event: SockEvent::Rtt,
        }),
        "tcp-rtt" => Some(NetProbe {
            hook: NetHook::SockOps,
            interface: None,
            direction: NetDirection::Both,
            event: SockEvent::Rtt,
        }),
        "tcp-life" => Some(NetProbe {
            hook: NetHook::SockOps,
            interface: None,
            direction: NetDirection::Both,
            event: SockEvent::Lifetime,
        }),
        _ => None,
    }
}

impl Probe {
    /// The probe as a user would write it on one line: `tracepoint:skb/kfree_skb`.
    pub fn display_name(&self) -> String {
        match self {
            Probe::Catalog(c) => c.clone(),
            Probe::Tracepoint { category, name } => format!("{category}/{name}"),
            Probe::RawTracepoint(n) => format!("raw_tracepoint:{n}"),
            Probe::Kprobe(n) => format!("kprobe:{n}"),
            Probe::Kretprobe(n) => format!("kretprobe:{n}"),
            Probe::Fentry(n) => format!("fentry:{n}"),
            Probe::Fexit(n) => format!("fexit:{n}"),
            Probe::Uprobe { binary, symbol } => format!("uprobe:{binary}:{symbol}"),
            Probe::Uretprobe { binary, symbol } => format!("uretprobe:{binary}:{symbol}"),
            Probe::Usdt {
                binary,
                provider,
                name,
            } => format!("usdt:{binary}:{provider}:{name}"),
            Probe::Profile { frequency } => format!("profile:{frequency}Hz"),
            Probe::Lsm(n) => format!("lsm:{n}"),
            Probe::Network(n) => n.display_name(),
        }
    }
}

/// The catalog's names, for messages and the CRD's CEL rule.
pub const CATALOG_NAMES: &[&str] = &[
    "syscalls",
    "exec",
    "open",
    "tcp-connect",
    "tcp-connect-kprobe",
    "tcp-retransmit",
    "packet-drops",
    "profile",
    "runqlat",
    "biolatency",
    "oom-kill",
    "pod-traffic",
    "tcp-rtt",
    "tcp-life",
];

/// Aggregate keys every attach kind understands (plus fields, args and `ret` where the kind
/// has them).
pub const BUILTIN_KEYS: &[&str] = &[
    "node",
    "namespace",
    "pod",
    "container",
    "pid",
    "tid",
    "comm",
    "cgroup",
    "cpu",
    "kstack",
    "ustack",
    "syscall",
];

/// An aggregation key, parsed.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeySpec {
    Node,
    Namespace,
    Pod,
    Container,
    Pid,
    Tid,
    Comm,
    Cgroup,
    Cpu,
    Kstack,
    Ustack,
    Syscall,
    /// `arg0`…`arg5` of a function or raw tracepoint.
    Arg(u8),
    /// The return value of a return probe.
    Ret,
    /// A tracepoint field, checked against the format file on the node.
    Field(String),
}

impl KeySpec {
    pub fn parse(s: &str) -> Option<KeySpec> {
        Some(match s {
            "node" => KeySpec::Node,
            "namespace" => KeySpec::Namespace,
            "pod" => KeySpec::Pod,
            "container" => KeySpec::Container,
            "pid" => KeySpec::Pid,
            "tid" => KeySpec::Tid,
            "comm" => KeySpec::Comm,
            "cgroup" => KeySpec::Cgroup,
            "cpu" => KeySpec::Cpu,
            "kstack" => KeySpec::Kstack,
            "ustack" => KeySpec::Ustack,
            "syscall" => KeySpec::Syscall,
            "ret" | "retval" => KeySpec::Ret,
            _ => {
                if let Some(n) = s.strip_prefix("arg")
                    && let Ok(n) = n.parse::<u8>()
                    && n <= 5
                    && !n.to_string().is_empty()
                    && s.len() == 4
                {
                    return Some(KeySpec::Arg(n));
                }
                if is_field_name(s) {
                    KeySpec::Field(s.to_string())
                } else {
                    return None;
                }
            }
        })
    }

    /// The key's name in results.
    pub fn name(&self) -> String {
        match self {
            KeySpec::Node => "node".into(),
            KeySpec::Namespace => "namespace".into(),
            KeySpec::Pod => "pod".into(),
            KeySpec::Container => "container".into(),
            KeySpec::Pid => "pid".into(),
            KeySpec::Tid => "tid".into(),
            KeySpec::Comm => "comm".into(),
            KeySpec::Cgroup => "cgroup".into(),
            KeySpec::Cpu => "cpu".into(),
            KeySpec::Kstack => "kstack".into(),
            KeySpec::Ustack => "ustack".into(),
            KeySpec::Syscall => "syscall".into(),
            KeySpec::Arg(n) => format!("arg{n}"),
            KeySpec::Ret => "ret".into(),
            KeySpec::Field(f) => f.clone(),
        }
    }
}

fn is_field_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && s.len() <= 64
}

/// What is aggregated, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ValueSpec {
    Count,
    /// Sum of a field, `arg<n>` or `ret`.
    Sum(KeySpec),
    /// Log2 histogram of a field, `arg<n>` or `ret`.
    Hist(KeySpec),
    /// Log2 histogram of entry→return nanoseconds.
    Latency,
}

impl ValueSpec {
    pub fn parse(s: &str) -> Option<ValueSpec> {
        let s = s.trim();
        if s == "count" {
            return Some(ValueSpec::Count);
        }
        if s == "latency" {
            return Some(ValueSpec::Latency);
        }
        let inner = |prefix: &str| -> Option<KeySpec> {
            let rest = s
                .strip_prefix(prefix)?
                .strip_prefix('(')?
                .strip_suffix(')')?;
            match KeySpec::parse(rest.trim())? {
                k @ (KeySpec::Arg(_) | KeySpec::Ret | KeySpec::Field(_)) => Some(k),
                _ => None,
            }
        };
        if let Some(k) = inner("sum") {
            return Some(ValueSpec::Sum(k));
        }
        if let Some(k) = inner("hist") {
            return Some(ValueSpec::Hist(k));
        }
        None
    }

    pub fn is_histogram(&self) -> bool {
        matches!(self, ValueSpec::Hist(_) | ValueSpec::Latency)
    }

    /// The value as results name it: `count`, `sum(bytes)`, `hist(rtt)`, `latency (ns)`.
    pub fn label(&self) -> String {
        match self {
            ValueSpec::Count => "count".to_string(),
            ValueSpec::Sum(k) => format!("sum({})", k.name()),
            ValueSpec::Hist(k) => format!("hist({})", k.name()),
            ValueSpec::Latency => "latency (ns)".to_string(),
        }
    }
}

/// What a catalog entry aggregates when the job does not say (`None`: a count).
pub fn catalog_default_value(name: &str) -> Option<ValueSpec> {
    match name {
        "runqlat" | "biolatency" => Some(ValueSpec::Latency),
        "pod-traffic" => Some(ValueSpec::Sum(KeySpec::Field("bytes".into()))),
        "tcp-rtt" => Some(ValueSpec::Hist(KeySpec::Field("rtt".into()))),
        "tcp-life" => Some(ValueSpec::Hist(KeySpec::Field("lifetime".into()))),
        _ => None,
    }
}

impl TraceJobSpec {
    /// The label of the value this job aggregates: its own `aggregate.value`, else its
    /// catalog entry's default, else a count (what the nodes' results say).
    pub fn value_label(&self) -> String {
        let own = self
            .aggregate
            .as_ref()
            .and_then(|a| a.value.as_deref())
            .and_then(ValueSpec::parse);
        let catalog = self
            .probe
            .catalog
            .as_deref()
            .and_then(|c| catalog_default_value(c.trim()));
        own.or(catalog).unwrap_or(ValueSpec::Count).label()
    }
}

/// Parses `30s`, `5m`, `1h`, `1h30m`, `500ms`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.chars().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest.chars().take_while(|c| c.is_ascii_alphabetic()).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let d = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.checked_mul(60)?),
            "h" => Duration::from_secs(n.checked_mul(3600)?),
            _ => return None,
        };
        total = total.checked_add(d)?;
    }
    Some(total)
}

/// A spec that passed validation, in parsed form.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckedSpec {
    pub probe: Probe,
    pub keys: Vec<KeySpec>,
    /// The job listed keys (else a catalog entry's defaults apply).
    pub keys_given: bool,
    pub value: ValueSpec,
    /// The job named a value (else a catalog entry's default applies).
    pub value_given: bool,
    pub top: u32,
    /// Aggregation was asked for (or defaulted); false for events-only jobs.
    pub aggregate: bool,
    pub events: Option<CheckedEvents>,
    pub pids: Vec<u32>,
    pub comm: Option<String>,
    pub duration: Option<Duration>,
    pub events_per_second: Option<u32>,
    pub map_entries: u32,
    pub cpu_percent: Option<u32>,
    /// Who the job is planned for: [`Reach::Node`] from [`TraceJobSpec::validate`]; the node
    /// runner sets [`Reach::Namespace`] for a TraceJob's assignment, so the node's checks of
    /// the tenant rules hold (kernel addresses, argument counts).
    pub reach: Reach,
}

/// Event streaming, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedEvents {
    pub last: u32,
    pub payload: bool,
    pub max_payload_bytes: u32,
}

/// Catalog entries whose default output is events, not rows.
pub const EVENT_CATALOG: &[&str] = &["exec", "open", "oom-kill"];

impl ProbeSpec {
    /// The one attach form, or an error naming the fields.
    pub fn parse(&self) -> Result<Probe, FieldError> {
        let mut forms: Vec<(&str, Probe)> = Vec::new();
        let path_sym = |field: &str, v: &str| -> Result<(String, String), FieldError> {
            match v.rsplit_once(':') {
                Some((bin, sym)) if !bin.is_empty() && !sym.is_empty() => {
                    Ok((bin.to_string(), sym.to_string()))
                }
                _ => Err(err(
                    format!("spec.probe.{field}"),
                    format!(
                        "{v:?} is not BINARY:SYMBOL; write e.g. /usr/lib/x86_64-linux-gnu/libc.so.6:malloc"
                    ),
                )),
            }
        };
        let nonempty = |field: &str, v: &str| -> Result<String, FieldError> {
            let v = v.trim();
            if v.is_empty() || v.contains(char::is_whitespace) {
                Err(err(
                    format!("spec.probe.{field}"),
                    "must be a single non-empty name; `fathom list` shows what this kernel has",
                ))
            } else {
                Ok(v.to_string())
            }
        };
        if let Some(c) = &self.catalog {
            let c = c.trim();
            if !CATALOG_NAMES.contains(&c) {
                return Err(err(
                    "spec.probe.catalog",
                    format!(
                        "unknown catalog entry {c:?}; use one of: {}",
                        CATALOG_NAMES.join(", ")
                    ),
                ));
            }
            forms.push(("catalog", Probe::Catalog(c.to_string())));
        }
        if let Some(t) = &self.tracepoint {
            let t = t.trim();
            let parsed = t.split_once('/').or_else(|| t.split_once(':'));
            match parsed {
                Some((c, n)) if is_tp_part(c) && is_tp_part(n) => forms.push((
                    "tracepoint",
                    Probe::Tracepoint {
                        category: c.to_string(),
                        name: n.to_string(),
                    },
                )),
                _ => {
                    return Err(err(
                        "spec.probe.tracepoint",
                        format!(
                            "{t:?} is not CATEGORY/NAME; write e.g. skb/kfree_skb (`fathom list 'tracepoint:*'` lists them)"
                        ),
                    ));
                }
            }
        }
        if let Some(v) = &self.raw_tracepoint {
            forms.push((
                "rawTracepoint",
                Probe::RawTracepoint(nonempty("rawTracepoint", v)?),
            ));
        }
        if let Some(v) = &self.kprobe {
            forms.push(("kprobe", Probe::Kprobe(nonempty("kprobe", v)?)));
        }
        if let Some(v) = &self.kretprobe {
            forms.push(("kretprobe", Probe::Kretprobe(nonempty("kretprobe", v)?)));
        }
        if let Some(v) = &self.fentry {
            forms.push(("fentry", Probe::Fentry(nonempty("fentry", v)?)));
        }
        if let Some(v) = &self.fexit {
            forms.push(("fexit", Probe::Fexit(nonempty("fexit", v)?)));
        }
        if let Some(v) = &self.lsm {
            forms.push(("lsm", Probe::Lsm(nonempty("lsm", v)?)));
        }
        if let Some(v) = &self.uprobe {
            let (binary, symbol) = path_sym("uprobe", v)?;
            forms.push(("uprobe", Probe::Uprobe { binary, symbol }));
        }
        if let Some(v) = &self.uretprobe {
            let (binary, symbol) = path_sym("uretprobe", v)?;
            forms.push(("uretprobe", Probe::Uretprobe { binary, symbol }));
        }
        if let Some(v) = &self.usdt {
            let mut parts = v.rsplitn(3, ':');
            let (name, provider, binary) = (parts.next(), parts.next(), parts.next());
            match (binary, provider, name) {
                (Some(b), Some(p), Some(n)) if !b.is_empty() && !p.is_empty() && !n.is_empty() => {
                    forms.push((
                        "usdt",
                        Probe::Usdt {
                            binary: b.to_string(),
                            provider: p.to_string(),
                            name: n.to_string(),
                        },
                    ))
                }
                _ => {
                    return Err(err(
                        "spec.probe.usdt",
                        format!(
                            "{v:?} is not BINARY:PROVIDER:NAME; `fathom list usdt:BINARY` lists a binary's probes"
                        ),
                    ));
                }
            }
        }
        if let Some(p) = &self.profile {
            if p.frequency == 0 || p.frequency > MAX_PROFILE_HZ {
                return Err(err(
                    "spec.probe.profile.frequency",
                    format!("must be 1–{MAX_PROFILE_HZ} Hz; 99 is a good default"),
                ));
            }
            forms.push((
                "profile",
                Probe::Profile {
                    frequency: p.frequency,
                },
            ));
        }
        if let Some(n) = &self.network {
            forms.push(("network", Probe::Network(n.parse()?)));
        }
        match forms.len() {
            1 => Ok(forms.pop().map(|(_, p)| p).expect("one form")),
            0 => Err(err(
                "spec.probe",
                "set exactly one of catalog, tracepoint, rawTracepoint, kprobe, kretprobe, fentry, fexit, uprobe, uretprobe, usdt, profile, lsm, network",
            )),
            _ => Err(err(
                "spec.probe",
                format!(
                    "has {} forms ({}); set exactly one",
                    forms.len(),
                    forms.iter().map(|(f, _)| *f).collect::<Vec<_>>().join(", ")
                ),
            )),
        }
    }
}

impl NetworkSpec {
    fn parse(&self) -> Result<NetProbe, FieldError> {
        let hook = match self.hook.trim() {
            "xdp" => NetHook::Xdp,
            "tc" => NetHook::Tc,
            "cgroupSkb" => NetHook::CgroupSkb,
            "sockOps" => NetHook::SockOps,
            h => {
                return Err(err(
                    "spec.probe.network.hook",
                    format!("{h:?} is not a network hook; use xdp, tc, cgroupSkb or sockOps"),
                ));
            }
        };
        let interface = match (&self.interface, hook) {
            (Some(i), NetHook::Xdp | NetHook::Tc) => {
                let i = i.trim();
                if i.is_empty()
                    || i.len() > 15
                    || i.chars().any(|c| c == '/' || c == ':' || c.is_whitespace())
                {
                    return Err(err(
                        "spec.probe.network.interface",
                        format!(
                            "{i:?} is not an interface name (1–15 bytes, no '/', ':' or spaces); `ip link` lists them"
                        ),
                    ));
                }
                Some(i.to_string())
            }
            (Some(_), _) => {
                return Err(err(
                    "spec.probe.network.interface",
                    format!(
                        "{} hooks attach to cgroups, not interfaces; remove interface, or use xdp or tc",
                        hook.name()
                    ),
                ));
            }
            (None, _) => None,
        };
        let direction = match (self.direction.as_deref().map(str::trim), hook) {
            (None, _) => NetDirection::Both,
            (Some(_), NetHook::SockOps) => {
                return Err(err(
                    "spec.probe.network.direction",
                    "sockOps counts TCP connection events, which have no direction; remove direction",
                ));
            }
            (Some("ingress"), _) => NetDirection::Ingress,
            (Some("egress" | "both"), NetHook::Xdp) => {
                return Err(err(
                    "spec.probe.network.direction",
                    "xdp sees received packets only; write ingress, or use tc for egress",
                ));
            }
            (Some("egress"), _) => NetDirection::Egress,
            (Some("both"), _) => NetDirection::Both,
            (Some(d), _) => {
                return Err(err(
                    "spec.probe.network.direction",
                    format!("{d:?} is not ingress, egress or both"),
                ));
            }
        };
        let direction = if hook == NetHook::Xdp {
            NetDirection::Ingress
        } else {
            direction
        };
        let event = match (self.event.as_deref().map(str::trim), hook) {
            (None | Some("rtt"), NetHook::SockOps) => SockEvent::Rtt,
            (Some("retransmit"), NetHook::SockOps) => SockEvent::Retransmit,
            (Some("lifetime"), NetHook::SockOps) => SockEvent::Lifetime,
            (Some(e), NetHook::SockOps) => {
                return Err(err(
                    "spec.probe.network.event",
                    format!("{e:?} is not rtt, retransmit or lifetime"),
                ));
            }
            (Some(_), _) => {
                return Err(err(
                    "spec.probe.network.event",
                    "only sockOps has events (rtt, retransmit, lifetime); remove event",
                ));
            }
            (None, _) => SockEvent::Rtt,
        };
        Ok(NetProbe {
            hook,
            interface,
            direction,
            event,
        })
    }
}

fn is_tp_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

impl TraceJobSpec {
    /// Checks everything that can be checked without a kernel: every error, not just the
    /// first, each naming its field and the fix.
    pub fn validate(&self) -> Result<CheckedSpec, Vec<FieldError>> {
        let mut errors = Vec::new();
        let probe = match self.probe.parse() {
            Ok(p) => Some(p),
            Err(e) => {
                errors.push(e);
                None
            }
        };
        let catalog = match &probe {
            Some(Probe::Catalog(c)) => Some(c.as_str()),
            _ => None,
        };

        let mut keys = Vec::new();
        let mut value = ValueSpec::Count;
        let mut top = DEFAULT_TOP;
        if let Some(agg) = &self.aggregate {
            for (i, k) in agg.by.iter().enumerate() {
                match KeySpec::parse(k.trim()) {
                    Some(key) if keys.contains(&key) => errors.push(err(
                        format!("spec.aggregate.by[{i}]"),
                        format!("{k:?} is listed twice; list each key once"),
                    )),
                    Some(key) => keys.push(key),
                    None => errors.push(err(
                        format!("spec.aggregate.by[{i}]"),
                        format!(
                            "unknown key {k:?}; use one of {}, arg0…arg5, ret, or a tracepoint field name",
                            BUILTIN_KEYS.join(", ")
                        ),
                    )),
                }
            }
            if agg.by.len() > 8 {
                errors.push(err(
                    "spec.aggregate.by",
                    "at most 8 keys; aggregate by fewer keys",
                ));
            }
            if let Some(v) = &agg.value {
                match ValueSpec::parse(v) {
                    Some(v) => value = v,
                    None => errors.push(err(
                        "spec.aggregate.value",
                        format!("{v:?} is not count, latency, sum(<field>) or hist(<field>)"),
                    )),
                }
            }
            if let Some(t) = agg.top {
                if t == 0 || t > MAX_TOP {
                    errors.push(err("spec.aggregate.top", format!("must be 1–{MAX_TOP}")));
                } else {
                    top = t;
                }
            }
        }
        let network = match &probe {
            Some(Probe::Network(n)) => Some(n.clone()),
            Some(Probe::Catalog(c)) => network_catalog(c),
            _ => None,
        };
        if let Some(n) = &network {
            check_network(n, &keys, &value, self, &mut errors);
        } else if let Some(probe) = &probe {
            check_keys_for_probe(probe, &keys, &value, &mut errors);
        }

        let events = match &self.events {
            Some(e) => {
                let last = e.last.unwrap_or(100);
                if last == 0 || last > MAX_LAST_EVENTS {
                    errors.push(err(
                        "spec.events.last",
                        format!("must be 1–{MAX_LAST_EVENTS}"),
                    ));
                }
                let max = e.max_payload_bytes.unwrap_or(MAX_PAYLOAD_BYTES);
                if max == 0 || max > MAX_PAYLOAD_BYTES {
                    errors.push(err(
                        "spec.events.maxPayloadBytes",
                        format!("must be 1–{MAX_PAYLOAD_BYTES}"),
                    ));
                }
                Some(CheckedEvents {
                    last,
                    payload: e.payload.unwrap_or(false),
                    max_payload_bytes: max,
                })
            }
            None if catalog.is_some_and(|c| EVENT_CATALOG.contains(&c)) => Some(CheckedEvents {
                last: 100,
                payload: false,
                max_payload_bytes: MAX_PAYLOAD_BYTES,
            }),
            None => None,
        };
        // Event catalog entries keep events only unless the user asks for aggregation too.
        let aggregate = self.aggregate.is_some()
            || !(catalog.is_some_and(|c| EVENT_CATALOG.contains(&c)) || self.events.is_some());

        let mut pids = Vec::new();
        let mut comm = None;
        if let Some(f) = &self.filter {
            if f.pids.len() > 1024 {
                errors.push(err("spec.filter.pids", "at most 1024 pids"));
            }
            if f.pids.contains(&0) {
                errors.push(err(
                    "spec.filter.pids",
                    "pid 0 is the idle task; list real process ids",
                ));
            }
            pids = f.pids.clone();
            if let Some(c) = &f.comm {
                if c.is_empty() || c.len() > 15 {
                    errors.push(err(
                        "spec.filter.comm",
                        format!("{c:?} must be 1–15 bytes: the kernel keeps only the first 15 bytes of a command name"),
                    ));
                } else {
                    comm = Some(c.clone());
                }
            }
        }

        let duration = match &self.duration {
            Some(d) => match parse_duration(d) {
                Some(v) if v.is_zero() => {
                    errors.push(err(
                        "spec.duration",
                        "must be longer than 0; omit it to run until deleted",
                    ));
                    None
                }
                Some(v) if v > MAX_DURATION => {
                    errors.push(err("spec.duration", "must be at most 24h"));
                    None
                }
                Some(v) => Some(v),
                None => {
                    errors.push(err(
                        "spec.duration",
                        format!("{d:?} is not a duration; write e.g. 30s, 5m, 1h30m"),
                    ));
                    None
                }
            },
            None => None,
        };

        let limits = self.limits.clone().unwrap_or_default();
        if let Some(e) = limits.events_per_second
            && (e == 0 || e > MAX_EVENTS_PER_SECOND)
        {
            errors.push(err(
                "spec.limits.eventsPerSecond",
                format!("must be 1–{MAX_EVENTS_PER_SECOND}; omit it for no limit"),
            ));
        }
        let map_entries = limits.map_entries.unwrap_or(DEFAULT_MAP_ENTRIES);
        if map_entries == 0 || map_entries > MAX_MAP_ENTRIES {
            errors.push(err(
                "spec.limits.mapEntries",
                format!("must be 1–{MAX_MAP_ENTRIES}"),
            ));
        }
        if let Some(c) = limits.cpu_percent
            && (c == 0 || c > 100)
        {
            errors.push(err(
                "spec.limits.cpuPercent",
                "must be 1–100 (percent of one CPU)",
            ));
        }
        if let Some(ttl) = self.ttl_seconds_after_finished
            && ttl < 0
        {
            errors.push(err(
                "spec.ttlSecondsAfterFinished",
                "must be 0 or more seconds",
            ));
        }
        if let Some(t) = &self.target_ref {
            if !["Deployment", "StatefulSet", "DaemonSet", "Job"].contains(&t.kind.as_str()) {
                errors.push(err(
                    "spec.targetRef.kind",
                    format!(
                        "{:?} is not Deployment, StatefulSet, DaemonSet or Job",
                        t.kind
                    ),
                ));
            }
            if t.name.is_empty() {
                errors.push(err("spec.targetRef.name", "must name the workload"));
            }
        }

        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(CheckedSpec {
            probe: probe.expect("no errors means a probe"),
            keys_given: self.aggregate.as_ref().is_some_and(|a| !a.by.is_empty()),
            keys,
            value_given: self.aggregate.as_ref().is_some_and(|a| a.value.is_some()),
            value,
            top,
            aggregate,
            events,
            pids,
            comm,
            duration,
            events_per_second: limits.events_per_second,
            map_entries,
            cpu_percent: limits.cpu_percent,
            reach: Reach::Node,
        })
    }

    /// The cluster-only fields this spec sets, for the local run's one-line notice.
    pub fn cluster_only_fields(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.pod_selector.is_some() {
            v.push("podSelector");
        }
        if self.target_ref.is_some() {
            v.push("targetRef");
        }
        if self.node_selector.is_some() {
            v.push("nodeSelector");
        }
        if self.suspend.is_some() {
            v.push("suspend");
        }
        if self.dry_run.is_some() {
            v.push("dryRun");
        }
        if self.ttl_seconds_after_finished.is_some() {
            v.push("ttlSecondsAfterFinished");
        }
        v
    }
}

/// Keys and values an attach kind cannot provide are errors before anything loads.
fn check_keys_for_probe(
    probe: &Probe,
    keys: &[KeySpec],
    value: &ValueSpec,
    errors: &mut Vec<FieldError>,
) {
    let has_args = matches!(
        probe,
        Probe::RawTracepoint(_)
            | Probe::Kprobe(_)
            | Probe::Fentry(_)
            | Probe::Fexit(_)
            | Probe::Uprobe { .. }
            | Probe::Lsm(_)
    );
    let has_ret = matches!(
        probe,
        Probe::Kretprobe(_) | Probe::Uretprobe { .. } | Probe::Fexit(_)
    );
    let has_fields = matches!(probe, Probe::Tracepoint { .. } | Probe::Catalog(_));
    let kind = probe_kind_name(probe);
    let check = |k: &KeySpec, field: String, errors: &mut Vec<FieldError>| {
        match k {
        KeySpec::Arg(_) if !has_args => errors.push(err(
            field,
            format!("{kind} probes have no function arguments; use a kprobe, fentry, uprobe or raw tracepoint to key by {}", k.name()),
        )),
        // A tracepoint's `ret` is its field of that name (syscalls:sys_exit_*).
        KeySpec::Ret if !has_ret && !has_fields => errors.push(err(
            field,
            format!("{kind} probes have no return value; use a kretprobe, fexit or uretprobe"),
        )),
        KeySpec::Field(f) if !has_fields => errors.push(err(
            field,
            format!("{f:?} is a tracepoint field name, but {kind} probes have no fields; use arg0…arg5 or ret"),
        )),
        KeySpec::Syscall
            if !matches!(probe, Probe::Tracepoint { .. } | Probe::Catalog(_) | Probe::RawTracepoint(_)) =>
        {
            errors.push(err(
                field,
                format!("{kind} probes do not know the syscall number; use tracepoint raw_syscalls/sys_enter or the syscalls catalog entry"),
            ))
        }
        KeySpec::Kstack if matches!(probe, Probe::Lsm(_)) => errors.push(err(
            field,
            "LSM programs cannot walk stacks; remove kstack",
        )),
        KeySpec::Ustack if matches!(probe, Probe::Lsm(_)) => errors.push(err(
            field,
            "LSM programs cannot walk stacks; remove ustack",
        )),
        _ => {}
    }
    };
    for (i, k) in keys.iter().enumerate() {
        check(k, format!("spec.aggregate.by[{i}]"), errors);
    }
    let field_keys = keys
        .iter()
        .filter(|k| {
            matches!(
                k,
                KeySpec::Field(_) | KeySpec::Arg(_) | KeySpec::Ret | KeySpec::Syscall
            )
        })
        .count();
    if field_keys > 2 {
        errors.push(err(
            "spec.aggregate.by",
            "at most 2 of syscall, tracepoint fields, arg0…arg5 and ret can be keys at once",
        ));
    }
    match value {
        ValueSpec::Sum(k) | ValueSpec::Hist(k) => check(k, "spec.aggregate.value".into(), errors),
        ValueSpec::Latency => {
            let pairs = matches!(
                probe,
                Probe::Kretprobe(_) | Probe::Uretprobe { .. } | Probe::Fexit(_)
            ) || matches!(probe, Probe::Catalog(c) if c == "runqlat" || c == "biolatency" || c == "syscalls");
            if !pairs {
                errors.push(err(
                    "spec.aggregate.value",
                    format!("latency needs an entry→return pair, which {kind} probes do not have; use a kretprobe, uretprobe or fexit, or the runqlat/biolatency catalog entries"),
                ));
            }
        }
        ValueSpec::Count => {}
    }
}

/// What a network probe can key by, sum and filter: packets have no process, so process keys
/// and filters are errors, and events are not kept.
fn check_network(
    n: &NetProbe,
    keys: &[KeySpec],
    value: &ValueSpec,
    spec: &TraceJobSpec,
    errors: &mut Vec<FieldError>,
) {
    let hook = n.hook.name();
    let socket_keys = if n.knows_cgroup() {
        ", node, namespace, pod, container, cgroup"
    } else {
        ", node"
    };
    for (i, k) in keys.iter().enumerate() {
        let ok = match k {
            KeySpec::Node => true,
            KeySpec::Namespace | KeySpec::Pod | KeySpec::Container | KeySpec::Cgroup => {
                n.knows_cgroup()
            }
            KeySpec::Field(f) => match f.as_str() {
                "interface" | "direction" => n.hook != NetHook::SockOps,
                f => NetProbe::KEYS.contains(&f),
            },
            _ => false,
        };
        if !ok {
            let usable: Vec<&str> = NetProbe::KEYS
                .iter()
                .copied()
                .filter(|k| n.hook != NetHook::SockOps || !["interface", "direction"].contains(k))
                .collect();
            errors.push(err(
                format!("spec.aggregate.by[{i}]"),
                format!(
                    "{hook} hooks cannot key by {}; use {}{socket_keys}",
                    k.name(),
                    usable.join(", ")
                ),
            ));
        }
    }
    let measure = match (n.hook, n.event) {
        (NetHook::SockOps, SockEvent::Rtt) => Some("rtt"),
        (NetHook::SockOps, SockEvent::Retransmit) => None,
        (NetHook::SockOps, SockEvent::Lifetime) => Some("lifetime"),
        _ => Some("bytes"),
    };
    let value_ok = match value {
        ValueSpec::Count => true,
        ValueSpec::Sum(KeySpec::Field(f)) | ValueSpec::Hist(KeySpec::Field(f)) => {
            measure == Some(f.as_str())
        }
        _ => false,
    };
    if !value_ok {
        let fix = match measure {
            Some(m) => format!("count, sum({m}) or hist({m})"),
            None => "count".into(),
        };
        errors.push(err(
            "spec.aggregate.value",
            format!("{} hooks aggregate {fix}", n.display_name()),
        ));
    }
    if let Some(f) = &spec.filter {
        if !f.pids.is_empty() {
            errors.push(err(
                "spec.filter.pids",
                "packets are not handled by a process; remove pids, and target pods (cgroupSkb) instead",
            ));
        }
        if f.comm.is_some() {
            errors.push(err(
                "spec.filter.comm",
                "packets are not handled by a process; remove comm, and target pods (cgroupSkb) instead",
            ));
        }
    }
    if spec.events.is_some() {
        errors.push(err(
            "spec.events",
            "network hooks aggregate in the kernel and keep no per-packet events; remove events",
        ));
    }
}

/// A short name of the attach kind, for messages.
pub fn probe_kind_name(probe: &Probe) -> &'static str {
    match probe {
        Probe::Catalog(_) => "catalog",
        Probe::Tracepoint { .. } => "tracepoint",
        Probe::RawTracepoint(_) => "raw tracepoint",
        Probe::Kprobe(_) => "kprobe",
        Probe::Kretprobe(_) => "kretprobe",
        Probe::Fentry(_) => "fentry",
        Probe::Fexit(_) => "fexit",
        Probe::Uprobe { .. } => "uprobe",
        Probe::Uretprobe { .. } => "uretprobe",
        Probe::Usdt { .. } => "usdt",
        Probe::Profile { .. } => "profile",
        Probe::Lsm(_) => "lsm",
        Probe::Network(n) => n.hook.name(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> TraceJobSpec {
        serde_yaml::from_str(yaml).expect("test yaml parses")
    }

    fn errors(yaml: &str) -> Vec<String> {
        spec(yaml)
            .validate()
            .expect_err("spec should be invalid")
            .into_iter()
            .map(|e| e.to_string())
            .collect()
    }

    #[test]
    fn the_design_example_validates() {
        let s = spec(
            "probe: { tracepoint: skb/kfree_skb }\naggregate: { by: [pod, kstack], value: count, top: 50 }\npodSelector: { matchLabels: { app: web } }\nnodeSelector: { kubernetes.io/os: linux }\nduration: 60s\nlimits: { eventsPerSecond: 10000, mapEntries: 16384 }\n",
        );
        let c = s.validate().expect("valid");
        assert_eq!(
            c.probe,
            Probe::Tracepoint {
                category: "skb".into(),
                name: "kfree_skb".into()
            }
        );
        assert_eq!(c.keys, vec![KeySpec::Pod, KeySpec::Kstack]);
        assert_eq!(c.duration, Some(Duration::from_secs(60)));
        assert_eq!(s.cluster_only_fields(), vec!["podSelector", "nodeSelector"]);
    }

    #[test]
    fn two_probe_forms_are_named() {
        let e = errors("probe: { tracepoint: a/b, kprobe: x }");
        assert_eq!(
            e,
            vec!["spec.probe: has 2 forms (tracepoint, kprobe); set exactly one"]
        );
    }

    #[test]
    fn no_probe_form_is_an_error() {
        let e = errors("probe: {}");
        assert!(e[0].starts_with("spec.probe: set exactly one of"), "{e:?}");
    }

    #[test]
    fn unknown_catalog_lists_the_catalog() {
        let e = errors("probe: { catalog: nope }");
        assert!(e[0].contains("unknown catalog entry \"nope\""), "{e:?}");
        assert!(e[0].contains("packet-drops"), "{e:?}");
    }

    #[test]
    fn bad_keys_and_values_name_their_index() {
        let e = errors(
            "probe: { tracepoint: a/b }\naggregate: { by: [comm, Bad-Key, comm], value: avg }",
        );
        assert!(
            e.iter()
                .any(|m| m.starts_with("spec.aggregate.by[1]: unknown key")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|m| m.starts_with("spec.aggregate.by[2]: \"comm\" is listed twice")),
            "{e:?}"
        );
        assert!(
            e.iter().any(|m| m.starts_with("spec.aggregate.value:")),
            "{e:?}"
        );
    }

    #[test]
    fn keys_the_attach_kind_cannot_provide_are_rejected() {
        let e = errors("probe: { tracepoint: a/b }\naggregate: { by: [arg0] }");
        assert!(e[0].contains("no function arguments"), "{e:?}");
        let e = errors("probe: { kprobe: f }\naggregate: { by: [ret] }");
        assert!(e[0].contains("no return value"), "{e:?}");
        let e = errors("probe: { uprobe: /bin/x:main }\naggregate: { by: [reason] }");
        assert!(e[0].contains("no fields"), "{e:?}");
        let e = errors("probe: { tracepoint: a/b }\naggregate: { value: latency }");
        assert!(e[0].contains("entry→return"), "{e:?}");
    }

    #[test]
    fn limits_and_duration_are_bounded() {
        let e = errors(
            "probe: { tracepoint: a/b }\nduration: 2d\nlimits: { mapEntries: 99999999, eventsPerSecond: 0, cpuPercent: 101 }",
        );
        assert_eq!(e.len(), 4, "{e:?}");
        assert!(e.iter().any(|m| m.starts_with("spec.duration:")));
        assert!(e.iter().any(|m| m.starts_with("spec.limits.mapEntries:")));
        assert!(
            e.iter()
                .any(|m| m.starts_with("spec.limits.eventsPerSecond:"))
        );
        assert!(e.iter().any(|m| m.starts_with("spec.limits.cpuPercent:")));
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration("5x"), None);
    }

    #[test]
    fn probe_strings_parse() {
        let p = |y: &str| spec(y).probe.parse();
        assert_eq!(
            p("probe: { uprobe: '/usr/lib/libc.so.6:malloc' }"),
            Ok(Probe::Uprobe {
                binary: "/usr/lib/libc.so.6".into(),
                symbol: "malloc".into()
            })
        );
        assert_eq!(
            p("probe: { usdt: '/usr/bin/python3:python:function__entry' }"),
            Ok(Probe::Usdt {
                binary: "/usr/bin/python3".into(),
                provider: "python".into(),
                name: "function__entry".into()
            })
        );
        assert_eq!(
            p("probe: { tracepoint: 'syscalls:sys_enter_openat' }"),
            Ok(Probe::Tracepoint {
                category: "syscalls".into(),
                name: "sys_enter_openat".into()
            })
        );
        assert!(p("probe: { uprobe: malloc }").is_err());
        assert!(p("probe: { profile: { frequency: 0 } }").is_err());
    }

    #[test]
    fn event_catalog_entries_default_to_events_only() {
        let c = spec("probe: { catalog: exec }").validate().expect("valid");
        assert!(!c.aggregate);
        assert_eq!(c.events.expect("events").last, 100);
        let c = spec("probe: { catalog: exec }\naggregate: { by: [comm] }")
            .validate()
            .expect("valid");
        assert!(c.aggregate);
    }

    #[test]
    fn comm_filter_is_bounded_by_the_kernel() {
        let e = errors("probe: { tracepoint: a/b }\nfilter: { comm: abcdefghijklmnopq }");
        assert!(e[0].starts_with("spec.filter.comm:"), "{e:?}");
    }
}
