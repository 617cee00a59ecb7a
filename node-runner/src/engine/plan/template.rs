//! The first step of planning: a user probe or catalog entry as a [`Template`] — its attach
//! points, pairing, default keys and value, event columns — before any field is resolved.

use std::path::PathBuf;

use fathom_crds::{
    CheckedSpec, Probe,
    spec::{KeySpec, ValueSpec},
    verdict::{ProbeVerdict, Reason},
};

use super::{AttachPoint, UprobeTarget};
use crate::engine::{
    catalog,
    elf::{self, ElfError},
};

/// A catalog entry or a user probe, before fields are resolved.
#[derive(Clone, Debug)]
pub struct Template {
    pub label: String,
    pub main: AttachPoint,
    pub stash: Vec<AttachPoint>,
    /// Pairing key at the stash points and at the main point.
    pub stash_key: Option<(Named, Named)>,
    /// A value to stash with the start time.
    pub stash_value: Option<Named>,
    pub default_by: Vec<KeySpec>,
    pub default_value: ValueSpec,
    /// Event columns (besides pid/comm), when the entry is event style.
    pub event_columns: Vec<(String, EventSource)>,
    pub payload: Option<PayloadSource>,
    /// An equality filter on a field.
    pub matches: Option<(Named, u64)>,
    /// The value the main program reads for `sum`/`hist`/events when the job does not say.
    pub event_value: Option<Named>,
}

impl Template {
    /// One attach point, counted, nothing else.
    pub fn new(label: String, main: AttachPoint) -> Template {
        Template {
            label,
            main,
            stash: Vec::new(),
            stash_key: None,
            stash_value: None,
            default_by: Vec::new(),
            default_value: ValueSpec::Count,
            event_columns: Vec::new(),
            payload: None,
            matches: None,
            event_value: None,
        }
    }
}

/// A number by name, resolved against the attach point: a tracepoint field, `argN`, `ret`,
/// `tid`, `pid`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Named {
    Field(String),
    Arg(u32),
    Ret,
    Tid,
}

/// Where an event column of a template comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventSource {
    Ppid,
    /// The main program's value (e.g. a syscall's return).
    Value,
    /// A named number, stored in an event field slot.
    Named(Named),
}

/// Where a template's string payload comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PayloadSource {
    /// A field of the main tracepoint (`__data_loc` or a user `char *`).
    Field(String),
    /// A user pointer the stash program kept (the stash value).
    Stashed,
}

/// The template of a user probe or catalog entry.
pub(super) fn template_for(probe: &Probe, spec: &CheckedSpec) -> Result<Template, ProbeVerdict> {
    let simple = |main: AttachPoint| Template::new(probe.display_name(), main);
    let latency = spec.value == ValueSpec::Latency;
    Ok(match probe {
        Probe::Catalog(name) => catalog::template(name, spec)?,
        Probe::Tracepoint { category, name } => {
            let mut t = simple(AttachPoint::Tracepoint {
                category: category.clone(),
                name: name.clone(),
            });
            t.payload = None;
            t
        }
        Probe::RawTracepoint(name) => simple(AttachPoint::RawTracepoint { name: name.clone() }),
        Probe::Kprobe(f) => simple(AttachPoint::Kprobe {
            function: f.clone(),
        }),
        Probe::Kretprobe(f) => {
            let mut t = simple(AttachPoint::Kretprobe {
                function: f.clone(),
            });
            if latency {
                t.stash = vec![AttachPoint::Kprobe {
                    function: f.clone(),
                }];
                t.stash_key = Some((Named::Tid, Named::Tid));
            }
            t
        }
        Probe::Fentry(f) => simple(AttachPoint::Fentry {
            function: f.clone(),
        }),
        Probe::Fexit(f) => {
            let mut t = simple(AttachPoint::Fexit {
                function: f.clone(),
            });
            if latency {
                t.stash = vec![AttachPoint::Fentry {
                    function: f.clone(),
                }];
                t.stash_key = Some((Named::Tid, Named::Tid));
            }
            t
        }
        Probe::Uprobe { binary, symbol } => simple(AttachPoint::Uprobe {
            binary: PathBuf::from(binary),
            target: UprobeTarget::Symbol(symbol.clone()),
            ret: false,
        }),
        Probe::Uretprobe { binary, symbol } => {
            let mut t = simple(AttachPoint::Uprobe {
                binary: PathBuf::from(binary),
                target: UprobeTarget::Symbol(symbol.clone()),
                ret: true,
            });
            if latency {
                t.stash = vec![AttachPoint::Uprobe {
                    binary: PathBuf::from(binary),
                    target: UprobeTarget::Symbol(symbol.clone()),
                    ret: false,
                }];
                t.stash_key = Some((Named::Tid, Named::Tid));
            }
            t
        }
        Probe::Usdt {
            binary,
            provider,
            name,
        } => {
            let label = format!("{provider}:{name}");
            let offset = elf::usdt_offset(std::path::Path::new(binary), provider, name)
                .map_err(|e| elf_verdict(&probe.display_name(), e))?;
            simple(AttachPoint::Uprobe {
                binary: PathBuf::from(binary),
                target: UprobeTarget::Offset { offset, label },
                ret: false,
            })
        }
        Probe::Profile { frequency } => simple(AttachPoint::Profile {
            frequency: *frequency,
        }),
        Probe::Lsm(hook) => simple(AttachPoint::Lsm { hook: hook.clone() }),
        Probe::Network(_) => {
            return Err(ProbeVerdict {
                probe: probe.display_name(),
                feasible: false,
                reason: Some(Reason::InvalidForProbe),
                message: "network probes are planned by plan::network, not from a template".into(),
            });
        }
    })
}

pub(super) fn elf_verdict(probe: &str, e: ElfError) -> ProbeVerdict {
    let reason = match e {
        ElfError::Missing(_) | ElfError::NotElf(_) | ElfError::Relative(_) => {
            Reason::BinaryNotFound
        }
        ElfError::NoSymbol { .. } | ElfError::NoUsdt { .. } => Reason::SymbolNotFound,
    };
    ProbeVerdict {
        probe: probe.to_string(),
        feasible: false,
        reason: Some(reason),
        message: e.to_string(),
    }
}
