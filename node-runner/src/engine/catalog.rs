//! The catalog: named presets on top of the generic programs. Each entry is data — attach
//! points, default keys and value, event columns — never new kernel code.

use fathom_crds::{
    CheckedSpec,
    spec::{KeySpec, ValueSpec, catalog_default_value},
    verdict::{ProbeVerdict, Reason},
};

use crate::engine::plan::{
    AttachPoint,
    template::{EventSource, Named, PayloadSource, Template},
};

fn tp(category: &str, name: &str) -> AttachPoint {
    AttachPoint::Tracepoint {
        category: category.into(),
        name: name.into(),
    }
}

fn base(label: &str, main: AttachPoint) -> Template {
    Template::new(format!("catalog:{label}"), main)
}

/// Event columns of the TCP entries: the tracepoint's destination address and port.
fn destination_columns() -> Vec<(String, EventSource)> {
    ["daddr", "dport"]
        .into_iter()
        .map(|f| (f.to_string(), EventSource::Named(Named::Field(f.into()))))
        .collect()
}

/// TCP_SYN_SENT in `sock:inet_sock_set_state`'s `newstate`: the state `connect()` enters.
const TCP_SYN_SENT: u64 = 2;

/// A one-line description of each entry, for `fathom list catalog`.
pub const DESCRIPTIONS: &[(&str, &str)] = &[
    (
        "pod-traffic",
        "bytes sent and received by the job's pods, by pod, direction and protocol (cgroup_skb ingress/egress; observe only)",
    ),
    (
        "tcp-rtt",
        "TCP round-trip times in microseconds by peer address and port (sock_ops RTT samples)",
    ),
    (
        "tcp-life",
        "TCP connection lifetimes in microseconds, established to closed, by peer address and port (sock_ops state changes; tcplife's question)",
    ),
    (
        "syscalls",
        "system calls by syscall (raw_syscalls:sys_enter); value: latency pairs sys_enter→sys_exit",
    ),
    (
        "exec",
        "process executions as events: pid, ppid, comm, filename (sched:sched_process_exec)",
    ),
    (
        "open",
        "file opens as events: pid, comm, filename, result (syscalls:sys_{enter,exit}_openat)",
    ),
    (
        "tcp-connect",
        "outgoing TCP connects by comm, address and port (sock:inet_sock_set_state → SYN_SENT)",
    ),
    (
        "tcp-connect-kprobe",
        "outgoing IPv4 TCP connects by comm and result, without the sock tracepoint (kretprobe tcp_v4_connect; ret 0: SYN sent, <0: -errno)",
    ),
    (
        "tcp-retransmit",
        "TCP retransmissions by address and port (tcp:tcp_retransmit_skb)",
    ),
    (
        "packet-drops",
        "dropped packets by drop reason and kernel stack (skb:kfree_skb)",
    ),
    (
        "profile",
        "CPU samples by comm and user+kernel stack (perf_event, 99 Hz per CPU)",
    ),
    (
        "runqlat",
        "run-queue latency histogram (sched:sched_wakeup → sched:sched_switch)",
    ),
    (
        "biolatency",
        "block I/O latency histogram (block:block_rq_issue → block:block_rq_complete)",
    ),
    (
        "oom-kill",
        "OOM killer victims as events: pid, comm (oom:mark_victim)",
    ),
];

/// The template of catalog entry `name`.
pub fn template(name: &str, spec: &CheckedSpec) -> Result<Template, ProbeVerdict> {
    let latency = spec.value_given && spec.value == ValueSpec::Latency;
    Ok(match name {
        "syscalls" => {
            if latency {
                // Pairs sys_enter with sys_exit; the tracepoint's `id` field names the syscall.
                let mut t = base(name, tp("raw_syscalls", "sys_exit"));
                t.stash = vec![tp("raw_syscalls", "sys_enter")];
                t.stash_key = Some((Named::Tid, Named::Tid));
                t.default_by = vec![KeySpec::Syscall];
                t
            } else {
                // The raw tracepoint: the same hook as raw_syscalls:sys_enter without the
                // tracepoint's record assembly, so each syscall costs less.
                let mut t = base(
                    name,
                    AttachPoint::RawTracepoint {
                        name: "sys_enter".into(),
                    },
                );
                t.default_by = vec![KeySpec::Syscall];
                t
            }
        }
        "exec" => {
            let mut t = base(name, tp("sched", "sched_process_exec"));
            t.event_columns = vec![("ppid".into(), EventSource::Ppid)];
            t.payload = Some(PayloadSource::Field("filename".into()));
            t.default_by = vec![KeySpec::Comm];
            t
        }
        "open" => {
            let mut t = base(name, tp("syscalls", "sys_exit_openat"));
            t.stash = vec![tp("syscalls", "sys_enter_openat")];
            t.stash_key = Some((Named::Tid, Named::Tid));
            t.stash_value = Some(Named::Field("filename".into()));
            t.event_value = Some(Named::Field("ret".into()));
            t.event_columns = vec![("result".into(), EventSource::Value)];
            t.payload = Some(PayloadSource::Stashed);
            t.default_by = vec![KeySpec::Comm];
            t
        }
        "tcp-connect" => {
            let mut t = base(name, tp("sock", "inet_sock_set_state"));
            t.matches = Some((Named::Field("newstate".into()), TCP_SYN_SENT));
            t.default_by = vec![
                KeySpec::Comm,
                KeySpec::Field("daddr".into()),
                KeySpec::Field("dport".into()),
            ];
            t.event_columns = destination_columns();
            t
        }
        "tcp-connect-kprobe" => {
            // For kernels without sock:inet_sock_set_state (before 4.16), or where a
            // tracepoint is not wanted: the function every IPv4 connect() goes through.
            let mut t = base(
                name,
                AttachPoint::Kretprobe {
                    function: "tcp_v4_connect".into(),
                },
            );
            t.default_by = vec![KeySpec::Comm, KeySpec::Ret];
            t.event_value = Some(Named::Ret);
            t.event_columns = vec![("result".into(), EventSource::Value)];
            t
        }
        "tcp-retransmit" => {
            let mut t = base(name, tp("tcp", "tcp_retransmit_skb"));
            t.default_by = vec![
                KeySpec::Field("daddr".into()),
                KeySpec::Field("dport".into()),
            ];
            t.event_columns = destination_columns();
            t
        }
        "packet-drops" => {
            let mut t = base(name, tp("skb", "kfree_skb"));
            t.default_by = vec![KeySpec::Field("reason".into()), KeySpec::Kstack];
            t
        }
        "profile" => {
            let mut t = base(name, AttachPoint::Profile { frequency: 99 });
            t.default_by = vec![KeySpec::Comm, KeySpec::Ustack, KeySpec::Kstack];
            t
        }
        "runqlat" => {
            let mut t = base(name, tp("sched", "sched_switch"));
            t.stash = vec![tp("sched", "sched_wakeup"), tp("sched", "sched_wakeup_new")];
            t.stash_key = Some((Named::Field("pid".into()), Named::Field("next_pid".into())));
            t.default_value = catalog_default_value(name).unwrap_or(ValueSpec::Latency);
            t
        }
        "biolatency" => {
            let mut t = base(name, tp("block", "block_rq_complete"));
            t.stash = vec![tp("block", "block_rq_issue")];
            t.stash_key = Some((Named::Field("sector".into()), Named::Field("sector".into())));
            t.default_value = catalog_default_value(name).unwrap_or(ValueSpec::Latency);
            t
        }
        "oom-kill" => {
            let mut t = base(name, tp("oom", "mark_victim"));
            t.event_columns = vec![(
                "victim_pid".into(),
                EventSource::Named(Named::Field("pid".into())),
            )];
            t.payload = Some(PayloadSource::Field("comm".into()));
            t
        }
        other => {
            return Err(ProbeVerdict {
                probe: format!("catalog:{other}"),
                feasible: false,
                reason: Some(Reason::SymbolNotFound),
                message: format!("unknown catalog entry {other:?}"),
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use fathom_crds::spec::CATALOG_NAMES;

    #[test]
    fn every_catalog_name_has_a_template_and_a_description() {
        let spec: fathom_crds::TraceJobSpec =
            serde_json::from_str(r#"{"probe":{"catalog":"syscalls"}}"#).expect("json");
        let checked = spec.validate().expect("valid");
        for name in CATALOG_NAMES {
            // Network entries are planned by plan::network, not from a template.
            let network = fathom_crds::spec::network_catalog(name).is_some();
            assert!(network || template(name, &checked).is_ok(), "{name}");
            assert!(DESCRIPTIONS.iter().any(|(n, _)| n == name), "{name}");
        }
    }
}
