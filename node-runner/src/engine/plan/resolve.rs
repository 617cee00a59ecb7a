//! Named numbers — tracepoint fields, `argN`, `ret`, `tid`, key names — resolved against one
//! attach point into what a program reads ([`Source`]) and how it is shown ([`Render`]).

use fathom_common::{Source, source};
use fathom_crds::{
    spec::KeySpec,
    verdict::{ProbeVerdict, Reason},
};

use super::{AttachPoint, Render, template::Named};
use crate::engine::tracefs::{TpField, TracepointFormat};

/// A field error at `probe`: the probe is infeasible on this kernel for `message`.
pub(super) fn infeasible(probe: &str, message: String) -> ProbeVerdict {
    ProbeVerdict {
        probe: probe.to_string(),
        feasible: false,
        reason: Some(Reason::SymbolNotFound),
        message,
    }
}

/// Resolves named numbers against one attach point.
pub(super) struct Resolver<'a> {
    pub(super) point: &'a AttachPoint,
    pub(super) format: Option<&'a TracepointFormat>,
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

    pub(super) fn named(&self, n: &Named) -> Result<(Source, Render), String> {
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
    pub(super) fn key_source(&self, k: &KeySpec) -> Result<(Source, Render), String> {
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
