//! `fathom list`: what a TraceJob can attach to here, like `bpftrace -l`.
//!
//! Patterns are `KIND:GLOB`: `tracepoint:syscalls:*open*`, `kprobe:tcp_*`, `fentry:vfs_*`,
//! `uprobe:/usr/bin/bash:*read*`, `usdt:/usr/bin/python3`, `lsm:*`, `catalog`, `features`.
//! A pattern without a kind searches tracepoints and kernel functions.

use std::path::Path;

use aya::{programs::ProgramType, sys::is_program_supported};
use glob::Pattern;

use crate::engine::{catalog, elf, error::EngineError, kernel::Kernel};

fn glob(p: &str) -> Result<Pattern, EngineError> {
    Pattern::new(if p.is_empty() { "*" } else { p }).map_err(|e| EngineError::File {
        path: "PATTERN".into(),
        message: format!("{p:?} is not a glob: {e}"),
    })
}

fn bad(message: String) -> EngineError {
    EngineError::File {
        path: "PATTERN".into(),
        message,
    }
}

/// The lines `fathom list PATTERN` prints.
pub fn list(
    pattern: Option<&str>,
    verbose: bool,
    kernel: &Kernel,
) -> Result<Vec<String>, EngineError> {
    let pattern = pattern.unwrap_or("tracepoint:*");
    let (kind, rest) = match pattern.split_once(':') {
        Some((k, r)) => (k, r),
        None if pattern == "catalog" || pattern == "features" => (pattern, ""),
        None => ("", pattern),
    };
    match kind {
        "tracepoint" | "t" => tracepoints(rest, verbose, kernel),
        "rawtracepoint" | "raw_tracepoint" | "rt" => {
            let g = glob(rest)?;
            Ok(tracefs(kernel)?
                .tracepoints()
                .into_iter()
                .filter(|(_, n)| g.matches(n))
                .map(|(_, n)| format!("rawtracepoint:{n}"))
                .collect())
        }
        "kprobe" | "kretprobe" | "k" | "kr" => kernel_functions(kind, rest, verbose, kernel),
        "fentry" | "fexit" | "f" | "fr" => kernel_functions(kind, rest, verbose, kernel),
        "uprobe" | "uretprobe" | "u" | "ur" => {
            let (bin, sym) = rest.rsplit_once(':').unwrap_or((rest, "*"));
            if bin.is_empty() {
                return Err(bad("give a binary: uprobe:/path/to/binary:GLOB".into()));
            }
            let g = glob(sym)?;
            let path = elf::resolve_binary(Path::new(bin)).map_err(|e| bad(e.to_string()))?;
            let syms = elf::function_symbols(&path).map_err(|e| bad(e.to_string()))?;
            Ok(syms
                .into_iter()
                .filter(|s| g.matches(s))
                .map(|s| format!("uprobe:{}:{s}", path.display()))
                .collect())
        }
        "usdt" | "U" => {
            let mut parts = rest.splitn(2, ':');
            let bin = parts.next().unwrap_or_default();
            let g = glob(parts.next().unwrap_or("*"))?;
            if bin.is_empty() {
                return Err(bad("give a binary: usdt:/path/to/binary".into()));
            }
            let path = elf::resolve_binary(Path::new(bin)).map_err(|e| bad(e.to_string()))?;
            let probes = elf::usdt_probes(&path).map_err(|e| bad(e.to_string()))?;
            Ok(probes
                .into_iter()
                .filter(|p| g.matches(&format!("{}:{}", p.provider, p.name)))
                .map(|p| {
                    let base = format!("usdt:{}:{}:{}", path.display(), p.provider, p.name);
                    if verbose {
                        format!("{base}\n    args: {}", p.args)
                    } else {
                        base
                    }
                })
                .collect())
        }
        "lsm" => {
            let g = glob(rest)?;
            let enabled = kernel.lsms().is_some_and(|l| l.iter().any(|x| x == "bpf"));
            let mut out: Vec<String> = kernel
                .kernel_functions()
                .iter()
                .filter_map(|f| f.strip_prefix("bpf_lsm_"))
                .filter(|h| g.matches(h))
                .map(|h| format!("lsm:{h}"))
                .collect();
            out.sort();
            if !enabled {
                out.push("# BPF LSM is not enabled on this kernel (add bpf to lsm= on the kernel command line)".into());
            }
            Ok(out)
        }
        "catalog" => Ok(catalog::DESCRIPTIONS
            .iter()
            .map(|(n, d)| format!("catalog:{n:<16} {d}"))
            .collect()),
        "features" => Ok(features(kernel)),
        "" => {
            let mut out = tracepoints(&format!("*{rest}*"), verbose, kernel)?;
            let g = glob(&format!("*{rest}*"))?;
            let mut funcs: Vec<String> = kernel
                .kernel_functions()
                .iter()
                .filter(|f| g.matches(f))
                .map(|f| format!("kprobe:{f}"))
                .collect();
            funcs.sort();
            out.extend(funcs);
            Ok(out)
        }
        other => Err(bad(format!(
            "unknown kind {other:?}; use tracepoint, rawtracepoint, kprobe, kretprobe, fentry, fexit, uprobe, uretprobe, usdt, lsm, catalog or features"
        ))),
    }
}

fn tracefs(kernel: &Kernel) -> Result<&crate::engine::tracefs::TraceFs, EngineError> {
    kernel.tracefs.as_ref().ok_or_else(|| {
        bad(kernel
            .tracefs_error
            .clone()
            .unwrap_or_else(|| "tracefs is unavailable".into()))
    })
}

fn tracepoints(rest: &str, verbose: bool, kernel: &Kernel) -> Result<Vec<String>, EngineError> {
    let tfs = tracefs(kernel)?;
    // "cat:name", "cat/name" or a glob over both.
    let rest = rest.replacen('/', ":", 1);
    let (cat_g, name_g) = match rest.split_once(':') {
        Some((c, n)) => (glob(c)?, glob(n)?),
        None => (glob("*")?, glob(&rest)?),
    };
    let mut out = Vec::new();
    for (c, n) in tfs.tracepoints() {
        if !(cat_g.matches(&c) && name_g.matches(&n)) {
            continue;
        }
        out.push(format!("tracepoint:{c}:{n}"));
        if verbose && let Ok(fmt) = tfs.format(&c, &n) {
            for f in fmt.own_fields() {
                out.push(format!("    {} {};", f.c_type, f.name));
            }
        }
    }
    Ok(out)
}

fn kernel_functions(
    kind: &str,
    rest: &str,
    verbose: bool,
    kernel: &Kernel,
) -> Result<Vec<String>, EngineError> {
    let g = glob(rest)?;
    let kind = match kind {
        "k" => "kprobe",
        "kr" => "kretprobe",
        "f" => "fentry",
        "fr" => "fexit",
        k => k,
    };
    let traceable = kernel
        .tracefs
        .as_ref()
        .and_then(|t| t.traceable_functions());
    let mut names: Vec<&String> = kernel
        .kernel_functions()
        .iter()
        .filter(|f| g.matches(f))
        .collect();
    names.sort();
    let mut out: Vec<String> = names
        .into_iter()
        .map(|f| {
            let ok = traceable.as_ref().is_none_or(|t| t.contains(f));
            if verbose {
                format!(
                    "{kind}:{f}{}",
                    if ok {
                        ""
                    } else {
                        "  (not traceable: notrace/inlined)"
                    }
                )
            } else {
                format!("{kind}:{f}")
            }
        })
        .collect();
    let unavailable = match kind {
        "kprobe" | "kretprobe" if !kernel.has_kprobes() => Some(
            "# kprobes are not built into this kernel (CONFIG_KPROBES): these cannot be attached here; use tracepoints",
        ),
        "fentry" | "fexit" if !kernel.has_btf() => {
            Some("# this kernel has no BTF: fentry/fexit cannot attach here")
        }
        _ => None,
    };
    if let Some(u) = unavailable {
        out.push(u.to_string());
    }
    Ok(out)
}

/// What this kernel supports, like `bpftool feature probe`.
pub fn features(kernel: &Kernel) -> Vec<String> {
    let mut out = vec![format!("kernel {}", Kernel::release())];
    let yes = |b: bool| if b { "yes" } else { "no" };
    out.push(format!(
        "tracefs: {}",
        kernel
            .tracefs
            .as_ref()
            .map_or_else(|| "no".to_string(), |t| t.root().display().to_string())
    ));
    out.push(format!("btf: {}", yes(kernel.has_btf())));
    out.push(format!("kprobes: {}", yes(kernel.has_kprobes())));
    out.push(format!(
        "bpf lsm: {}",
        kernel
            .lsms()
            .map_or("unknown (securityfs not mounted)".to_string(), |l| yes(l
                .iter()
                .any(|x| x == "bpf"))
            .to_string())
    ));
    if let Some(l) = kernel.lockdown() {
        out.push(format!("lockdown: {l}"));
    }
    for (name, t) in [
        ("tracepoint", ProgramType::TracePoint),
        ("raw_tracepoint", ProgramType::RawTracePoint),
        ("kprobe", ProgramType::KProbe),
        ("perf_event", ProgramType::PerfEvent),
        ("tracing (fentry/fexit)", ProgramType::Tracing),
        ("lsm", ProgramType::Lsm(aya::programs::LsmAttachType::Mac)),
        ("xdp", ProgramType::Xdp),
        ("sched_cls (tc)", ProgramType::SchedClassifier),
        ("socket_filter", ProgramType::SocketFilter),
    ] {
        let s = match is_program_supported(t) {
            Ok(true) => "supported".to_string(),
            Ok(false) => "not supported".to_string(),
            Err(e) => format!("unknown ({e})"),
        };
        out.push(format!("program type {name}: {s}"));
    }
    out
}
