//! Named numbers — tracepoint fields, `argN`, `ret`, `tid`, key names — resolved against one
//! attach point into what a program reads ([`Source`]) and how it is shown ([`Render`]).

use fathom_common::{Source, source};
use fathom_crds::{
    spec::KeySpec,
    tenancy::{self, Reach},
    verdict::{ProbeVerdict, Reason},
};

use super::{AttachPoint, Render, template::Named};
use crate::engine::{
    btf::ArgKind,
    kernel::Kernel,
    tracefs::{TpField, TracepointFormat},
};

/// A field error at `probe`: the probe is infeasible on this kernel for `message` (or a
/// tenant rule refuses it, when the message is a refusal).
pub(super) fn infeasible(probe: &str, message: String) -> ProbeVerdict {
    let reason = if tenancy::is_refusal(&message) {
        Reason::PolicyDenied
    } else {
        Reason::SymbolNotFound
    };
    ProbeVerdict {
        probe: probe.to_string(),
        feasible: false,
        reason: Some(reason),
        message,
    }
}

/// The arguments of a kernel attach point as BTF describes them; `None` when BTF does not
/// (no BTF, a function BTF leaves out) or the point's arguments are not the kernel's (uprobes,
/// tracepoints, profile).
pub(super) fn kernel_args<'k>(point: &AttachPoint, kernel: &'k Kernel) -> Option<&'k [ArgKind]> {
    // BTF is parsed (once per kernel; seconds under emulation) only for kernel-side points.
    if !kernel_side(point) {
        return None;
    }
    let idx = kernel.btf_index()?;
    match point {
        AttachPoint::RawTracepoint { name } => idx.raw_tracepoint_args(name),
        AttachPoint::Kprobe { function }
        | AttachPoint::Kretprobe { function }
        | AttachPoint::Fentry { function }
        | AttachPoint::Fexit { function } => idx.function_args(function),
        AttachPoint::Lsm { hook } => idx.function_args(&format!("bpf_lsm_{hook}")),
        AttachPoint::Tracepoint { .. }
        | AttachPoint::Uprobe { .. }
        | AttachPoint::Profile { .. }
        | AttachPoint::Xdp { .. }
        | AttachPoint::Tc { .. }
        | AttachPoint::CgroupSkb { .. }
        | AttachPoint::SockOps => None,
    }
}

/// Whether a point's `argN` are the kernel's (registers or a BTF context): read past the real
/// count they are other kernel data.
fn kernel_side(point: &AttachPoint) -> bool {
    matches!(
        point,
        AttachPoint::RawTracepoint { .. }
            | AttachPoint::Kprobe { .. }
            | AttachPoint::Kretprobe { .. }
            | AttachPoint::Fentry { .. }
            | AttachPoint::Fexit { .. }
            | AttachPoint::Lsm { .. }
    )
}

/// Resolves named numbers against one attach point.
pub(super) struct Resolver<'a> {
    pub(super) point: &'a AttachPoint,
    pub(super) format: Option<&'a TracepointFormat>,
    /// The point's arguments, when BTF describes them ([`kernel_args`]).
    pub(super) args: Option<&'a [ArgKind]>,
    /// Who the job is for: a TraceJob may not read kernel addresses.
    pub(super) reach: Reach,
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
        } else if f.c_type.contains('*') || fmt.printed_as_address(name) {
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
            Named::Arg(i) => {
                let kind = self.arg_kind(*i)?;
                let render = if kind == Some(ArgKind::KernelPointer) {
                    Render::Hex
                } else {
                    Render::Unsigned
                };
                Ok((
                    Source {
                        kind: source::ARG,
                        offset: *i,
                        size: 8,
                        signed: 0,
                    },
                    render,
                ))
            }
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

    /// What argument `i` holds, checked against the point's real argument count: an index
    /// past it would read other kernel data (the program reads arguments with a checked
    /// kernel read, so the kernel's own bound does not apply).
    fn arg_kind(&self, i: u32) -> Result<Option<ArgKind>, String> {
        let label = self.point.label();
        match self.args {
            Some(args) if (i as usize) < args.len() => Ok(Some(args[i as usize])),
            Some([]) => Err(format!(
                "arg{i}: {label} has no arguments; key by a built-in key instead"
            )),
            Some(args) => Err(format!(
                "arg{i} is past the {n} argument(s) of {label} (the kernel's BTF says so); use arg0…arg{last}",
                n = args.len(),
                last = args.len() - 1
            )),
            None if self.reach == Reach::Namespace && kernel_side(self.point) => {
                Err(tenancy::refusal(
                    tenancy::RULE_KERNEL_ADDRESS,
                    &format!(
                        "arg{i} of {label} cannot be checked without the kernel's BTF, and may hold a kernel address"
                    ),
                    "key by a tracepoint field, or ask a cluster admin for a ClusterTraceJob",
                ))
            }
            None => Ok(None),
        }
    }

    /// Whether a tracepoint field holds a kernel address: a pointer (other than a syscall's
    /// arguments, which are the caller's) or a number the kernel prints as an address.
    fn field_is_kernel_address(&self, f: &TpField) -> bool {
        let syscall = matches!(self.point, AttachPoint::Tracepoint { category, .. } if category == "syscalls");
        let printed = self
            .format
            .is_some_and(|fmt| fmt.printed_as_address(&f.name));
        (f.c_type.contains('*') && !syscall) || printed
    }

    /// A key or value the job shows (its aggregate keys and values): what [`Self::key_source`]
    /// resolves, refused for a TraceJob when it is a kernel address.
    pub(super) fn shown_source(&self, k: &KeySpec) -> Result<(Source, Render), String> {
        let resolved = self.key_source(k)?;
        if self.reach == Reach::Namespace {
            let address = match k {
                KeySpec::Field(f) => self.field(f).is_ok_and(|f| self.field_is_kernel_address(f)),
                KeySpec::Ret if matches!(self.point, AttachPoint::Tracepoint { .. }) => self
                    .field("ret")
                    .is_ok_and(|f| self.field_is_kernel_address(f)),
                KeySpec::Arg(i) => self.arg_kind(u32::from(*i))? == Some(ArgKind::KernelPointer),
                _ => false,
            };
            if address {
                return Err(tenancy::kernel_address_message(&format!(
                    "{} of {}",
                    k.name(),
                    self.point.label()
                )));
            }
        }
        Ok(resolved)
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
