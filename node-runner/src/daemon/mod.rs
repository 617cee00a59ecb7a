//! The node runner daemon (`fathom-node-runner`): the engine driven by the node's
//! TraceAssignments instead of a file.
//!
//! - [`cgroups`]: container id → cgroup ids on this node (cgroup v2, every runtime layout).
//! - [`targets`]: what an assignment may observe, fail-closed → the engine's `Scope`.
//! - [`pins`]: the runner's directories in bpffs; stale ones removed at start (T1).
//! - [`runner`]: desired assignments → engine sessions, statuses and cumulative reports.
//! - [`transport`]: the reports to the collector over gRPC, reconnecting with backoff.
//! - [`api`]: the watch of this node's assignments, status writes, finalizer release.
//! - [`health`]: `/healthz`, `/readyz`, `/metrics`.

pub mod api;
pub mod cgroups;
pub mod health;
pub mod pins;
pub mod runner;
pub mod targets;
pub mod transport;
