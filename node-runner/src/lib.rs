//! Fathom's node engine: TraceJob spec → plan → loaded, filtered, attached eBPF programs →
//! results, and back to nothing attached.
//!
//! Three rooms, one per role:
//!
//! - [`engine`]: the one library that plans, loads, attaches, reads and detaches a job on this
//!   machine ([`engine::plan`], [`engine::catalog`], [`engine::session`], and what they read
//!   of the kernel).
//! - [`cli`]: the local commands on a TraceJob file, behind the `fathom` binary and
//!   `kubectl fathom run`/`explain`: run a job for a duration, check it, list what can be
//!   traced, print results.
//! - [`daemon`]: the node runner (`fathom-node-runner`): assignments → engine, statuses and
//!   reports to the collector.
//!
//! The two binaries in `src/bin` are thin: `fathom` over [`cli`], `fathom-node-runner` over
//! [`daemon`].

pub mod cli;
pub mod daemon;
pub mod engine;

pub use engine::error::EngineError;
