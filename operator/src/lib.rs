//! Fathom's operator: reconciles TraceJobs and ClusterTraceJobs into per-node
//! TraceAssignments, keeps their status and results, and cleans up.
//!
//! - [`plan`]: (job, nodes, pods) → nodes and pods, a pure function;
//! - [`lifecycle`]: (job, plan, assignments, now) → status, writes, events; pure;
//! - [`reconcile`]: the I/O around them (server-side apply without force, events);
//! - [`orphans`]: deletes assignments whose job is gone (force-deleted jobs);
//! - [`finalizers`]: the one finalizer patch, safe against concurrent writers;
//! - [`events`]: Kubernetes Events under the operator's field manager;
//! - [`controller`]: the kube-runtime controllers, caches and watches;
//! - [`leader`]: leader election with a coordination Lease;
//! - [`http`], [`metrics`]: `/metrics`, `/healthz`, `/readyz`;
//! - [`collector`]: the gRPC collector: runners' reports merged per job into TraceResults;
//! - [`config`]: flags and environment.

pub mod collector;
pub mod config;
pub mod controller;
pub mod error;
pub mod events;
pub mod finalizers;
pub mod http;
pub mod leader;
pub mod lifecycle;
pub mod metrics;
pub mod orphans;
pub mod plan;
pub mod reconcile;

pub use error::{Error, Result};
