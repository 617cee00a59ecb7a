//! What a job aggregates: its key columns and its value, resolved against the main attach
//! point (the job's own, or the template's defaults).

use fathom_common::{Source, source};
use fathom_crds::{
    CheckedSpec,
    spec::{KeySpec, ValueSpec},
};

use super::{CgroupView, Column, KeyPart, Render, ValueKind, draft::Draft, template::Template};

/// The value a plan reads.
pub(super) struct Value {
    pub(super) kind: ValueKind,
    /// Its column's name, e.g. `sum(arg2)`.
    pub(super) label: String,
    /// Entry-to-return latency: the main program pairs with stash programs.
    pub(super) latency: bool,
}

impl Draft<'_> {
    /// The key columns, in the order the job lists them. A number key (a field, an argument,
    /// the return value, the syscall) takes a field slot; one that does not resolve is an
    /// error and gets no column.
    pub(super) fn keys(&mut self, spec: &CheckedSpec, template: &Template) -> Vec<Column> {
        let keys = if !spec.keys_given {
            &template.default_by
        } else {
            &spec.keys
        };
        let mut columns = Vec::new();
        for k in keys {
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
                    match self.main.shown_source(k) {
                        Ok((src, render)) => {
                            let slot = self.field_slots.len();
                            self.field_slots.push(src);
                            (KeyPart::Field(slot), render)
                        }
                        Err(e) => {
                            self.main_error(format!("spec.aggregate.by: {e}"));
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
        columns
    }

    /// The value: a count, the sum or histogram of a number (one that does not resolve is an
    /// error, and the value stays a count), or the latency histogram.
    pub(super) fn value(&mut self, spec: &CheckedSpec, template: &Template) -> Value {
        let value_spec = if !spec.value_given {
            template.default_value.clone()
        } else {
            spec.value.clone()
        };
        let label = value_spec.label();
        let kind = match &value_spec {
            ValueSpec::Count => ValueKind::Count,
            ValueSpec::Sum(k) | ValueSpec::Hist(k) => match self.main.shown_source(k) {
                Ok((src, _)) => {
                    self.config.value_src = src;
                    if matches!(value_spec, ValueSpec::Sum(_)) {
                        ValueKind::Sum
                    } else {
                        ValueKind::Hist
                    }
                }
                Err(e) => {
                    self.main_error(format!("spec.aggregate.value: {e}"));
                    ValueKind::Count
                }
            },
            ValueSpec::Latency => {
                self.config.value_src = Source {
                    kind: source::LATENCY,
                    ..Source::NONE
                };
                ValueKind::Hist
            }
        };
        Value {
            kind,
            label,
            latency: value_spec == ValueSpec::Latency,
        }
    }
}
