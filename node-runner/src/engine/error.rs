//! The engine's errors: each names what failed, the field or attach point involved, and the fix.

use fathom_crds::{
    spec::FieldError,
    verdict::{Reason, Verdict},
};

/// Everything that can go wrong between a TraceJob file and detached probes.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The job file could not be read or parsed.
    #[error("{path}: {message}")]
    File { path: String, message: String },

    /// The spec failed validation; every problem is listed.
    #[error("invalid TraceJob:\n{}", list(.0))]
    InvalidSpec(Vec<FieldError>),

    /// A probe cannot run on this kernel; the verdict says which and why.
    #[error("not feasible on this kernel:\n{}", verdict_lines(.0))]
    NotFeasible(Verdict),

    /// The kernel refused to load or attach a program.
    #[error("{probe}: {reason:?}: {message}")]
    Kernel {
        probe: String,
        reason: Reason,
        message: String,
    },

    /// Reading the job's maps or ring buffer failed.
    #[error("reading {what}: {message}")]
    Read { what: String, message: String },

    /// Pinning the job's links and maps in bpffs, or reopening them, failed.
    #[error("pins at {path}: {message}")]
    Pin { path: String, message: String },
}

impl EngineError {
    /// A stable category for metric labels, Event reasons and exit codes.
    pub fn category(&self) -> &'static str {
        match self {
            EngineError::File { .. } => "InvalidArgument",
            EngineError::InvalidSpec(_) => "InvalidArgument",
            EngineError::NotFeasible(_) => "FailedPrecondition",
            EngineError::Kernel { reason, .. } => match reason {
                Reason::PermissionDenied | Reason::KernelLockdown => "PermissionDenied",
                _ => "FailedPrecondition",
            },
            EngineError::Read { .. } | EngineError::Pin { .. } => "Unavailable",
        }
    }

    /// The feasibility reason, when the error is about the kernel.
    pub fn reason(&self) -> Option<Reason> {
        match self {
            EngineError::NotFeasible(v) => v.first_problem().and_then(|p| p.reason),
            EngineError::Kernel { reason, .. } => Some(*reason),
            _ => None,
        }
    }
}

fn list(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(|e| format!("  - {e}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn verdict_lines(v: &Verdict) -> String {
    v.probes
        .iter()
        .map(|p| {
            if p.feasible {
                format!("  - {}: ok", p.probe)
            } else {
                format!(
                    "  - {}: {:?}: {}",
                    p.probe,
                    p.reason.unwrap_or(Reason::SymbolNotFound),
                    p.message
                )
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}
