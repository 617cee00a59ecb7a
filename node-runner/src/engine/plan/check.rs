//! Feasibility of attach points: each one looked up on this kernel (capabilities, tracefs,
//! kernel symbols, BTF, binaries), one [`ProbeVerdict`] per point.

use std::collections::BTreeMap;

use fathom_crds::verdict::{ProbeVerdict, Reason};

use super::{
    AttachPoint, UprobeTarget, not_feasible,
    template::{Template, elf_verdict},
};
use crate::engine::{
    elf,
    error::EngineError,
    kernel::{self, Kernel},
    tracefs::TracepointFormat,
};

/// The formats of a plan's tracepoints, by attach point label.
pub(super) type Formats = BTreeMap<String, TracepointFormat>;

/// Checks every attach point of `template` on this kernel, the stash points first, then the
/// main one: their verdicts, and the formats of the tracepoints among them. Not feasible when
/// any point is not.
pub(super) fn check_points(
    template: &Template,
    kernel: &Kernel,
) -> Result<(Vec<ProbeVerdict>, Formats), EngineError> {
    let caps = kernel::missing_capabilities(kernel::effective_caps());
    let refusal = caps.is_empty().then(kernel::load_refusal).flatten();
    let mut verdicts = Vec::new();
    let mut formats = BTreeMap::new();
    for point in template.stash.iter().chain([&template.main]) {
        let v = check_point(point, kernel, &caps, refusal.as_deref());
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
        return Err(not_feasible(verdicts));
    }
    Ok((verdicts, formats))
}

/// Checks one attach point against the kernel.
fn check_point(
    point: &AttachPoint,
    kernel: &Kernel,
    missing_caps: &[&str],
    load_refusal: Option<&str>,
) -> ProbeVerdict {
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
    if let Some(why) = load_refusal {
        return no(Reason::PermissionDenied, why.to_string());
    }
    let needs_tracefs = matches!(
        point,
        AttachPoint::Tracepoint { .. }
            | AttachPoint::RawTracepoint { .. }
            | AttachPoint::Kprobe { .. }
            | AttachPoint::Kretprobe { .. }
    );
    if needs_tracefs && kernel.tracefs.is_none() {
        // Lockdown's confidentiality mode forbids tracefs (and kprobes, and reading kernel
        // memory from BPF): no mount will help, and the reason says so. Integrity mode
        // allows all three.
        if let Some(mode) = kernel.lockdown().filter(|m| m == "confidentiality") {
            return no(
                Reason::KernelLockdown,
                format!(
                    "kernel lockdown ({mode}) forbids tracefs, which {} needs; this kernel must boot without lockdown=confidentiality to trace it",
                    point.label()
                ),
            );
        }
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
        // Planned and checked by `network`, never through a template.
        AttachPoint::Xdp { .. }
        | AttachPoint::Tc { .. }
        | AttachPoint::CgroupSkb { .. }
        | AttachPoint::SockOps => {}
    }
    ProbeVerdict {
        probe: label,
        feasible: true,
        reason: None,
        message: String::new(),
    }
}
