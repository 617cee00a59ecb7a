//! Fathom's node engine: TraceJob spec → plan → loaded, filtered, attached eBPF programs →
//! results, and back to nothing attached.
//!
//! - [`plan`]: resolve a checked spec on this kernel (the feasibility check) into a [`plan::JobPlan`].
//! - [`engine`]: load/attach/read/detach a plan ([`engine::Session`]).
//! - [`run`]: drive a session for a duration with budgets (what `fathom run` does).
//! - [`output`]: print results as a table, YAML, JSON or folded stacks.
//! - [`list`]: what a TraceJob can attach to on this machine (`fathom list`).
//! - [`daemon`]: the node runner (`fathom-node-runner`): assignments → engine, statuses and
//!   reports to the collector.

pub mod btf;
pub mod catalog;
pub mod daemon;
pub mod elf;
pub mod engine;
pub mod error;
pub mod jobfile;
pub mod kernel;
pub mod list;
pub mod output;
pub mod plan;
pub mod render;
pub mod run;
pub mod symbols;
mod syscall_table;
pub mod tracefs;

pub use error::EngineError;
