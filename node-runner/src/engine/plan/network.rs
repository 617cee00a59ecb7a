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
        KeySpec, NetHook, NetProbe, SockEvent, ValueSpec, catalog_default_value, network_catalog,
    },
    verdict::{ProbeVerdict, Reason, Verdict},
};

use super::{
    AttachPoint, Attachment, CgroupView, Column, JobPlan, KeyPart, NetPart, Render, Role, Scope,
    ValueKind, not_feasible,
};
use crate::engine::{error::EngineError, kernel, render::cgroup2_mount};

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
        Probe::Catalog(c) if c == "tcp-rtt" => (
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
    let points = attach_points(n);
    let verdicts: Vec<ProbeVerdict> = points
        .iter()
        .map(|p| check(p, n, &scope, kernel::effective_caps()))
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
            cfg.value_kind = if f == "rtt" {
                net::value::RTT_HIST
            } else {
                net::value::BYTES_HIST
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
    cfg.sock_event = match (n.hook, n.event) {
        (NetHook::SockOps, SockEvent::Rtt) => net::sock::RTT,
        (NetHook::SockOps, SockEvent::Retransmit) => net::sock::RETRANSMIT,
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

/// The name of an interface index, from sysfs.
pub fn interface_name(index: u32) -> Option<String> {
    fs::read_dir("/sys/class/net")
        .ok()?
        .flatten()
        .find_map(|e| {
            (ifindex(&e.file_name().to_string_lossy()) == Some(index))
                .then(|| e.file_name().to_string_lossy().into_owned())
        })
}

/// The cgroup v2 hierarchy the cgroup hooks attach to.
pub fn cgroup_root() -> Option<PathBuf> {
    cgroup2_mount()
}

fn check(point: &AttachPoint, n: &NetProbe, scope: &Scope, caps: u64) -> ProbeVerdict {
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
    match point {
        AttachPoint::Xdp { interface } | AttachPoint::Tc { interface, .. } => {
            if matches!(scope, Scope::Cgroups(_)) {
                return no(
                    Reason::InvalidForProbe,
                    format!(
                        "{} hooks see every packet of an interface, not one pod's; trace the job's pods with network hook cgroupSkb",
                        n.hook.name()
                    ),
                );
            }
            if interface.is_empty() {
                return no(
                    Reason::InvalidForProbe,
                    format!(
                        "{} needs spec.probe.network.interface; `ip link` lists this node's interfaces",
                        n.hook.name()
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
