//! Fathom's resources and the data shapes every component shares.
//!
//! - [`spec`]: the TraceJob spec (what users write) and its validation.
//! - [`result`]: the results model (rows, histograms, events, totals).
//! - [`verdict`]: the per-node feasibility verdict.
//! - [`tenancy`]: what a namespaced TraceJob may use (the tenant rules); [`policy`]: the
//!   `TracePolicy` that lets a namespace use more.
//! - [`job`], [`assignment`], [`trace_result`]: the Kubernetes resources (`TraceJob`,
//!   `ClusterTraceJob`, `TraceAssignment`, `TraceResult`); [`crd`]: their CRDs, CEL rules and
//!   generated YAML.

pub mod assignment;
pub mod crd;
pub mod job;
pub mod policy;
pub mod result;
pub mod spec;
pub mod tenancy;
pub mod trace_result;
pub mod verdict;

pub use assignment::{TraceAssignment, TraceAssignmentSpec, TraceAssignmentStatus};
pub use job::{ClusterTraceJob, JobPhase, TraceJob, TraceJobStatus};
pub use policy::{AssignedPolicy, TracePolicy, TracePolicySpec};
pub use result::ResultData;
pub use spec::{CheckedSpec, FieldError, Probe, TraceJobSpec};
pub use trace_result::{TraceResult, TraceResultSpec, TraceResultStatus};
