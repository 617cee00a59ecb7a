//! Network probes (XDP, tc, cgroup_skb, sock_ops): planned onto the network programs and
//! their [`NetKey`](fathom_common::NetKey) rather than the tracing pipeline. A packet has no
//! process, so there are no process keys, filters or events; the pod of a packet is its
//! socket's cgroup.

use std::{fs, path::PathBuf};

use aya::util::KernelVersion;
use fathom_common::{NetConfig, ProbeConfig, StashConfig, net};
use fathom_crds::{
    CheckedSpec, Probe,
    spec::{
        KeySpec, NetDirection, NetHook, NetProbe, SockEvent, ValueSpec, catalog_default_value,
        network_catalog,
    },
    verdict::{ProbeVerdict, Reason, Verdict},
};

use super::{
    AttachPoint, Attachment, CgroupView, Column, JobPlan, KeyPart, NetPart, Render, Role, Scope,
    ValueKind, not_feasible,
};
use crate::engine::{
    error::EngineError,
    kernel,
    render::{cgroup2_mount, interface_names},
};

/// The network probe a spec names, directly or through a catalog entry.
pub fn net_probe(probe: &Probe) -> Option<NetProbe> {
    match probe {
        Probe::Network(n) => Some(n.clone()),
        Probe::Catalog(c) => network_catalog(c),
        _ => None,
    }
}

/// The kernel release that brought TCX links, which own a tc attachment by file descriptor.
const TCX: KernelVersion = KernelVersion::new(6, 6, 0);

/// Plans a network probe on this node.
pub(super) fn plan_network(
    spec: &CheckedSpec,
    n: &NetProbe,
    scope: Scope,
) -> Result<JobPlan, EngineError> {
    let (label, default_by) = match &spec.probe {
        Probe::Catalog(c) if c == "pod-traffic" => (
            c.clone(),
            vec![
                KeySpec::Namespace,
                KeySpec::Pod,
                KeySpec::Field("direction".into()),
                KeySpec::Field("protocol".into()),
            ],
        ),
        Probe::Catalog(c) if c == "tcp-rtt" || c == "tcp-life" => (
            c.clone(),
            vec![
                KeySpec::Field("daddr".into()),
                KeySpec::Field("dport".into()),
            ],
        ),
        _ => (n.display_name(), Vec::new()),
    };
    let default_value = match &spec.probe {
        Probe::Catalog(c) => catalog_default_value(c).unwrap_or(ValueSpec::Count),
        _ => ValueSpec::Count,
    };
    // xdp and tc with target pods and no interface: the host side of each pod's veth.
    let pod_mode = matches!(n.hook, NetHook::Xdp | NetHook::Tc)
        && n.interface.is_none()
        && matches!(scope, Scope::Cgroups(_));
    let veths = if pod_mode {
        let veths = pod_veths(&scope.cgroup_ids()).map_err(|e| {
            not_feasible(vec![ProbeVerdict {
                probe: n.display_name(),
                feasible: false,
                reason: Some(Reason::SymbolNotFound),
                message: e,
            }])
        })?;
        if veths.is_empty() {
            return Err(not_feasible(vec![ProbeVerdict {
                probe: n.display_name(),
                feasible: false,
                reason: Some(Reason::SymbolNotFound),
                message: "no target pod on this node has an interface of its own (pods of the node's network, hostNetwork, have none); trace them with network hook cgroupSkb".into(),
            }]));
        }
        veths
    } else {
        Vec::new()
    };
    let points = if pod_mode {
        // Directions are the pod's: its ingress is the host side's egress.
        let direction = match n.direction {
            NetDirection::Ingress => NetDirection::Egress,
            NetDirection::Egress => NetDirection::Ingress,
            NetDirection::Both => NetDirection::Both,
        };
        veths
            .iter()
            .flat_map(|v| {
                attach_points(&NetProbe {
                    interface: Some(v.name.clone()),
                    direction,
                    ..n.clone()
                })
            })
            .collect()
    } else {
        attach_points(n)
    };
    let caps = kernel::effective_caps();
    // One load probe for the plan, once the capabilities are there (as check::check_points).
    let refusal = kernel::missing_capabilities(caps)
        .is_empty()
        .then(kernel::load_refusal)
        .flatten();
    let verdicts: Vec<ProbeVerdict> = points
        .iter()
        .map(|p| check(p, n, &scope, pod_mode, caps, refusal.as_deref()))
        .collect();
    if verdicts.iter().any(|v| !v.feasible) {
        return Err(not_feasible(verdicts));
    }

    let keys = if spec.keys_given {
        &spec.keys
    } else {
        &default_by
    };
    let value = if spec.value_given {
        &spec.value
    } else {
        &default_value
    };
    let mut cfg = NetConfig::EMPTY;
    let mut columns = Vec::new();
    for k in keys {
        let (part, render, bits) = match k {
            KeySpec::Node => (KeyPart::Node, Render::Unsigned, 0),
            KeySpec::Namespace => cgroup(CgroupView::Namespace),
            KeySpec::Pod => cgroup(CgroupView::Pod),
            KeySpec::Container => cgroup(CgroupView::Container),
            KeySpec::Cgroup => cgroup(CgroupView::Id),
            KeySpec::Field(f) => match f.as_str() {
                "interface" => (
                    KeyPart::Net(NetPart::Interface),
                    Render::Unsigned,
                    net::key::IFINDEX,
                ),
                "direction" => (
                    KeyPart::Net(NetPart::Direction),
                    Render::Unsigned,
                    net::key::DIRECTION,
                ),
                "protocol" => (
                    KeyPart::Net(NetPart::Protocol),
                    Render::Unsigned,
                    net::key::PROTOCOL,
                ),
                "saddr" => (
                    KeyPart::Net(NetPart::Saddr),
                    Render::Unsigned,
                    net::key::SADDR,
                ),
                "daddr" => (
                    KeyPart::Net(NetPart::Daddr),
                    Render::Unsigned,
                    net::key::DADDR,
                ),
                "sport" => (
                    KeyPart::Net(NetPart::Sport),
                    Render::Unsigned,
                    net::key::SPORT,
                ),
                "dport" => (
                    KeyPart::Net(NetPart::Dport),
                    Render::Unsigned,
                    net::key::DPORT,
                ),
                _ => return Err(invalid(&label, &format!("{f} is not a network key"))),
            },
            other => {
                return Err(invalid(
                    &label,
                    &format!("{} is not a network key", other.name()),
                ));
            }
        };
        cfg.key_mask |= bits;
        columns.push(Column {
            name: k.name(),
            part,
            render,
        });
    }
    let kind = match value {
        ValueSpec::Count => ValueKind::Count,
        ValueSpec::Sum(KeySpec::Field(_)) => ValueKind::Sum,
        ValueSpec::Hist(KeySpec::Field(f)) => {
            cfg.value_kind = if f == "bytes" {
                net::value::BYTES_HIST
            } else {
                net::value::MICROS_HIST
            };
            ValueKind::Hist
        }
        _ => {
            return Err(invalid(
                &label,
                "network hooks aggregate count, sum or hist",
            ));
        }
    };
    let value_label = value.label();
    cfg.pod_view = u32::from(pod_mode);
    cfg.sock_event = match (n.hook, n.event) {
        (NetHook::SockOps, SockEvent::Rtt) => net::sock::RTT,
        (NetHook::SockOps, SockEvent::Retransmit) => net::sock::RETRANSMIT,
        (NetHook::SockOps, SockEvent::Lifetime) => net::sock::LIFETIME,
        _ => 0,
    };
    let mut plan = JobPlan {
        label,
        value_label,
        attachments: points
            .into_iter()
            .map(|point| Attachment {
                role: Role::Main,
                point,
            })
            .collect(),
        config: ProbeConfig::EMPTY,
        stash: StashConfig::EMPTY,
        columns,
        hidden: Vec::new(),
        value: kind,
        top: spec.top as usize,
        aggregate: true,
        events: None,
        pids: Vec::new(),
        scope,
        map_entries: spec.map_entries,
        duration: spec.duration,
        cpu_percent: spec.cpu_percent,
        verdict: Verdict::from_probes(verdicts),
        net: Some(cfg),
        pod_interfaces: veths.iter().map(|v| (v.ifindex, v.cgroup)).collect(),
    };
    plan.apply_scope();
    Ok(plan)
}

fn cgroup(view: CgroupView) -> (KeyPart, Render, u32) {
    (
        KeyPart::Net(NetPart::Cgroup(view)),
        Render::Unsigned,
        net::key::CGROUP,
    )
}

fn invalid(label: &str, message: &str) -> EngineError {
    not_feasible(vec![ProbeVerdict {
        probe: label.to_string(),
        feasible: false,
        reason: Some(Reason::InvalidForProbe),
        message: message.to_string(),
    }])
}

/// One attach point per hook and direction. A cgroup hook attaches at the root of the cgroup
/// v2 hierarchy; the session moves sock_ops to the job's own cgroups.
fn attach_points(n: &NetProbe) -> Vec<AttachPoint> {
    let interface = n.interface.clone().unwrap_or_default();
    let mut out = Vec::new();
    match n.hook {
        NetHook::Xdp => out.push(AttachPoint::Xdp { interface }),
        NetHook::Tc => {
            if n.direction.ingress() {
                out.push(AttachPoint::Tc {
                    interface: interface.clone(),
                    egress: false,
                });
            }
            if n.direction.egress() {
                out.push(AttachPoint::Tc {
                    interface,
                    egress: true,
                });
            }
        }
        NetHook::CgroupSkb => {
            if n.direction.ingress() {
                out.push(AttachPoint::CgroupSkb { egress: false });
            }
            if n.direction.egress() {
                out.push(AttachPoint::CgroupSkb { egress: true });
            }
        }
        NetHook::SockOps => out.push(AttachPoint::SockOps),
    }
    out
}

/// The index of an interface, from sysfs.
pub fn ifindex(name: &str) -> Option<u32> {
    fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// The cgroup v2 hierarchy the cgroup hooks attach to.
pub fn cgroup_root() -> Option<PathBuf> {
    cgroup2_mount()
}

fn check(
    point: &AttachPoint,
    n: &NetProbe,
    scope: &Scope,
    pod_mode: bool,
    caps: u64,
    load_refusal: Option<&str>,
) -> ProbeVerdict {
    let label = point.label();
    let no = |reason: Reason, message: String| ProbeVerdict {
        probe: label.clone(),
        feasible: false,
        reason: Some(reason),
        message,
    };
    let missing = kernel::missing_capabilities(caps);
    if !missing.is_empty() || !kernel::may_attach_network(caps) {
        let mut all: Vec<&str> = missing;
        if !kernel::may_attach_network(caps) {
            all.push("CAP_NET_ADMIN");
        }
        return no(
            Reason::PermissionDenied,
            format!(
                "network hooks need {}; run as root, or install the runner with runner.networkHooks=true",
                all.join(" and ")
            ),
        );
    }
    if let Some(why) = load_refusal {
        return no(Reason::PermissionDenied, why.to_string());
    }
    match point {
        AttachPoint::Xdp { interface } | AttachPoint::Tc { interface, .. } => {
            if matches!(scope, Scope::Cgroups(_)) && !pod_mode {
                return no(
                    Reason::InvalidForProbe,
                    format!(
                        "{} on a named interface sees every packet of it, not only the job's pods'; leave interface out to trace the pods' own interfaces",
                        n.hook.name()
                    ),
                );
            }
            if interface.is_empty() {
                return no(
                    Reason::InvalidForProbe,
                    format!(
                        "{} needs spec.probe.network.interface (or target pods); `ip link` lists this node's interfaces",
                        n.hook.name()
                    ),
                );
            }
            if !in_host_network() {
                return no(
                    Reason::InvalidForProbe,
                    format!(
                        "this runner is not in the node's network namespace, so interface {interface} would be its own; install it with runner.hostNetwork=true"
                    ),
                );
            }
            if ifindex(interface).is_none() {
                return no(
                    Reason::SymbolNotFound,
                    format!(
                        "interface {interface} does not exist on this node; `ip link` lists them"
                    ),
                );
            }
            if let AttachPoint::Tc { .. } = point
                && KernelVersion::current().is_ok_and(|v| v < TCX)
            {
                return no(
                    Reason::AttachKindUnsupported,
                    "tc hooks attach through TCX links (Linux 6.6 or later), which the kernel removes with their owner; this kernel has only netlink filters, which would outlive a crashed runner: use network hook xdp for ingress, or cgroupSkb".into(),
                );
            }
        }
        AttachPoint::CgroupSkb { .. } | AttachPoint::SockOps if cgroup_root().is_none() => {
            return no(
                Reason::FilesystemUnavailable,
                "cgroup hooks need the cgroup v2 hierarchy mounted (mount -t cgroup2 none /sys/fs/cgroup/unified)".into(),
            );
        }
        _ => {}
    }
    ProbeVerdict {
        probe: label,
        feasible: true,
        reason: None,
        message: String::new(),
    }
}

/// Whether this process is in the node's network namespace (that of pid 1, which the runner
/// sees with hostPID).
fn in_host_network() -> bool {
    let ns = |p: &str| fs::read_link(p).ok();
    match (ns("/proc/self/ns/net"), ns("/proc/1/ns/net")) {
        (Some(me), Some(init)) => me == init,
        // Without /proc/1 (no hostPID) nothing says otherwise.
        _ => true,
    }
}

/// The host side of a target pod's veth.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodVeth {
    pub name: String,
    pub ifindex: u32,
    /// A cgroup of the pod, which names it in results.
    pub cgroup: u64,
}

/// The host-side veth of each pod with a cgroup in `ids`. A pod's interfaces are read from
/// the sysfs its containers see (`/proc/<pid>/root/sys/class/net`, mounted in the pod's
/// network namespace): a veth's `iflink` is its peer's index here, which must point back.
/// Pods in the node's own network namespace have none.
pub fn pod_veths(ids: &[u64]) -> Result<Vec<PodVeth>, String> {
    let root = cgroup2_mount().ok_or("the cgroup v2 hierarchy is not mounted")?;
    let mut cgroups = crate::engine::render::Cgroups::default();
    let own_ns = fs::read_link("/proc/self/ns/net").ok();
    let mut seen_ns = std::collections::BTreeSet::new();
    // This node's interfaces by index, read once for every pod.
    let host = interface_names();
    let mut out = Vec::new();
    for &id in ids {
        let dir = root.join(cgroups.path(id).trim_start_matches('/'));
        let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) else {
            continue;
        };
        let Some(pid) = procs.lines().find_map(|l| l.trim().parse::<u32>().ok()) else {
            continue;
        };
        let Ok(ns) = fs::read_link(format!("/proc/{pid}/ns/net")) else {
            continue;
        };
        if Some(&ns) == own_ns.as_ref() || !seen_ns.insert(ns) {
            continue;
        }
        let net = PathBuf::from(format!("/proc/{pid}/root/sys/class/net"));
        let entries = fs::read_dir(&net).map_err(|e| {
            format!(
                "reading the interfaces of pid {pid} ({}): {e}",
                net.display()
            )
        })?;
        for e in entries.flatten() {
            let read = |f: &str| -> Option<u32> {
                fs::read_to_string(e.path().join(f))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()
            };
            let (Some(index), Some(peer)) = (read("ifindex"), read("iflink")) else {
                continue;
            };
            if index == peer {
                continue; // not a pair (lo, a physical device)
            }
            let Some(name) = host.get(&peer).cloned() else {
                continue;
            };
            let back = fs::read_to_string(format!("/sys/class/net/{name}/iflink"))
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok());
            if back == Some(index) {
                out.push(PodVeth {
                    name,
                    ifindex: peer,
                    cgroup: id,
                });
            }
        }
    }
    Ok(out)
}
