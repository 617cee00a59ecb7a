//! Fathom's resources and the data shapes every component shares.
//!
//! - [`spec`]: the TraceJob spec (what users write) and its validation.
//! - [`result`]: the results model (rows, histograms, events, totals).
//! - [`verdict`]: the per-node feasibility verdict.

pub mod result;
pub mod spec;
pub mod verdict;

pub use result::ResultData;
pub use spec::{CheckedSpec, FieldError, Probe, TraceJobSpec};
