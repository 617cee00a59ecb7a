//! The local commands on a TraceJob file, behind the `fathom` binary and
//! `kubectl fathom run`/`explain`/`get`.
//!
//! - [`jobfile`]: read a TraceJob manifest from a file.
//! - [`run`]: drive a session to its end (`fathom run`, `fathom check`).
//! - [`list`]: what a TraceJob can attach to here (`fathom list`).
//! - [`output`]: print results as a table, YAML, JSON or folded stacks.

pub mod jobfile;
pub mod list;
pub mod output;
pub mod run;
