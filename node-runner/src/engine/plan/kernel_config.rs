//! The last step: what the kernel programs are told once every name is resolved — the key
//! mask, the filters, the value kind and which parts of the programs run.

use fathom_common::{ProbeConfig, StashConfig, filter, flags, key, value};
use fathom_crds::CheckedSpec;

use super::{Column, KeyPart, ValueKind};

/// The kernel key mask of `columns`, and the compact key layout when the key fits one.
/// Returns the key parts kept only to render others (a pid for user stacks).
pub(super) fn key_mask(
    config: &mut ProbeConfig,
    columns: &[Column],
    kind: ValueKind,
) -> Vec<KeyPart> {
    let mut hidden = Vec::new();
    let mut mask = 0;
    for c in columns {
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
            // Network keys are `NetConfig::key_mask`'s (plan::network).
            KeyPart::Net(_) => 0,
        };
    }
    if mask & key::USTACK != 0 && mask & key::PID == 0 {
        mask |= key::PID;
        hidden.push(KeyPart::Pid);
    }
    config.key_mask = mask;
    if let Some((slots, words)) = fathom_common::compact::slots(mask, kind == ValueKind::Hist) {
        config.flags |= flags::COMPACT;
        config.compact_slots = slots;
        config.compact_words = words as u32;
    }
    hidden
}

/// The job's filters (pids, comm) in both programs, and its event rate limit.
pub(super) fn filters(config: &mut ProbeConfig, stash: &mut StashConfig, spec: &CheckedSpec) {
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
}

/// The value kind and which parts of the main program run: aggregation, events, and helper
/// calls only where something reads their result.
pub(super) fn program_flags(
    config: &mut ProbeConfig,
    spec: &CheckedSpec,
    kind: ValueKind,
    emits: bool,
) {
    config.value_kind = match kind {
        ValueKind::Count => value::COUNT,
        ValueKind::Sum => value::SUM,
        ValueKind::Hist => value::HIST,
    };
    if spec.aggregate {
        config.flags |= flags::AGGREGATE;
    }
    if emits {
        config.flags |= flags::EMIT;
    }
    if config.rate_limit > 0 || config.flags & (flags::PAIRED | flags::EMIT) != 0 {
        config.flags |= flags::TIME;
    }
    if config.key_mask & key::COMM != 0 || config.filter_flags & filter::COMM != 0 || emits {
        config.flags |= flags::COMM;
    }
}
