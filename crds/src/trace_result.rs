//! `TraceResult`: the merged result of a job, bounded in size, owned by the job and outliving
//! its runs. `kubectl get results` lists them.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{
    assignment::JobRef,
    result::{OtherRow, ResultData},
};

/// The largest serialized `status.data` a TraceResult may hold: well under the API server's
/// 1.5 MiB object limit (etcd's request limit), leaving room for metadata.
pub const MAX_RESULT_BYTES: usize = 1000 * 1024;

/// Which job this result belongs to.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "fathom.dev",
    version = "v1alpha1",
    kind = "TraceResult",
    namespaced,
    status = "TraceResultStatus",
    shortname = "results",
    shortname = "tres",
    category = "fathom",
    derive = "PartialEq",
    doc = "The merged result of a TraceJob or ClusterTraceJob: top rows, histograms, last events and totals, bounded in size.",
    printcolumn = r#"{"name": "Job", "type": "string", "jsonPath": ".spec.job.name"}"#,
    printcolumn = r#"{"name": "Rows", "type": "integer", "jsonPath": ".status.rows"}"#,
    printcolumn = r#"{"name": "Total", "type": "integer", "jsonPath": ".status.total"}"#,
    printcolumn = r#"{"name": "Nodes", "type": "string", "jsonPath": ".status.coverage.summary"}"#,
    printcolumn = r#"{"name": "Lost", "type": "integer", "jsonPath": ".status.loss.total"}"#,
    printcolumn = r#"{"name": "Updated", "type": "date", "jsonPath": ".status.updated"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct TraceResultSpec {
    pub job: JobRef,
}

/// The merged result.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TraceResultStatus {
    /// The run the data is from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<i64>,
    /// Rows in `data.rows`.
    #[serde(default)]
    pub rows: u64,
    /// Hits over all nodes (`data.totals.hits`).
    #[serde(default)]
    pub total: u64,
    /// When a node last reported data that is in here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated: Option<Time>,
    /// Nodes whose reports are merged in.
    #[serde(default)]
    pub nodes: u32,
    /// Which of the job's nodes the result covers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coverage: Option<Coverage>,
    /// What did not make it into the result, by where it was lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<Loss>,
    pub data: ResultData,
}

/// Which of the job's nodes a result covers: a partial result says so.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Coverage {
    /// Nodes whose reports are merged in.
    pub reported: u32,
    /// Nodes the job has an assignment on.
    pub expected: u32,
    /// Nodes that sent their final report.
    pub finished: u32,
    /// Nodes whose assignment failed or was not feasible (they report no counts).
    pub failed: u32,
    /// `reported/expected`, for `kubectl get results`.
    pub summary: String,
}

impl Coverage {
    pub fn new(reported: u32, expected: u32, finished: u32, failed: u32) -> Coverage {
        Coverage {
            reported,
            expected,
            finished,
            failed,
            summary: format!("{reported}/{expected}"),
        }
    }
}

/// Hits and events that did not make it into a result, summed over the nodes.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Loss {
    /// New keys the kernel dropped because the aggregation map was full.
    pub kernel: u64,
    /// Events the kernel had no ring-buffer room for, and events dropped in the runner's
    /// bounded queues.
    pub ring_buffer: u64,
    /// Events the runner read but could not send (stream down longer than its queue lasts).
    pub transport: u64,
    /// Hits dropped on purpose by `limits.eventsPerSecond` (counted apart from loss in `total`).
    pub rate_limited: u64,
    /// `kernel + ringBuffer + transport`: what was lost by accident.
    pub total: u64,
}

impl Loss {
    pub fn new(kernel: u64, ring_buffer: u64, transport: u64, rate_limited: u64) -> Loss {
        Loss {
            kernel,
            ring_buffer,
            transport,
            rate_limited,
            total: kernel + ring_buffer + transport,
        }
    }
}

/// Cuts `data` until its JSON form is at most `max_bytes`: last events first (oldest dropped),
/// then histograms (smallest count dropped), then rows (smallest folded into the `other` row).
/// Sets `truncated` when anything was cut. Returns the final size.
pub fn bound_result(data: &mut ResultData, max_bytes: usize) -> usize {
    let size = |d: &ResultData| serde_json::to_vec(d).map(|v| v.len()).unwrap_or(usize::MAX);
    let mut current = size(data);
    if current <= max_bytes {
        return current;
    }
    data.truncated = true;
    // Halve the cut list until it fits: O(log n) serializations instead of one per item.
    while current > max_bytes && !data.events.is_empty() {
        let keep = data.events.len() / 2;
        let drop = data.events.len() - keep;
        data.events.drain(..drop);
        current = size(data);
    }
    while current > max_bytes && !data.histograms.is_empty() {
        let keep = data.histograms.len() / 2;
        data.histograms.truncate(keep);
        current = size(data);
    }
    while current > max_bytes && !data.rows.is_empty() {
        let keep = data.rows.len() / 2;
        let cut = data.rows.split_off(keep);
        let other = data.other.get_or_insert(OtherRow::default());
        other.rows += cut.len() as u64;
        other.value += cut.iter().map(|r| r.value).sum::<u64>();
        current = size(data);
    }
    current
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::result::{EventRecord, Row};

    fn big() -> ResultData {
        ResultData {
            probe: "syscalls".into(),
            value: "count".into(),
            keys: vec!["comm".into()],
            rows: (0..20_000u64)
                .map(|i| Row {
                    keys: BTreeMap::from([("comm".into(), format!("process-{i:08}"))]),
                    value: 20_000 - i,
                })
                .collect(),
            events: (0..5_000u64)
                .map(|i| EventRecord {
                    time_ns: i,
                    fields: BTreeMap::from([("path".into(), "x".repeat(100))]),
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_small_result_is_untouched() {
        let mut d = ResultData {
            probe: "p".into(),
            ..Default::default()
        };
        let before = d.clone();
        bound_result(&mut d, MAX_RESULT_BYTES);
        assert_eq!(d, before);
    }

    #[test]
    fn a_big_result_is_cut_under_the_bound_and_keeps_its_total() {
        let mut d = big();
        let total_before = d.value_total();
        let size = bound_result(&mut d, 200 * 1024);
        assert!(size <= 200 * 1024, "{size}");
        assert_eq!(serde_json::to_vec(&d).expect("json").len(), size);
        assert!(d.truncated);
        assert!(d.events.is_empty(), "events go first");
        assert!(!d.rows.is_empty());
        // The biggest rows are kept; what was cut is summed in `other`.
        assert_eq!(d.rows[0].value, 20_000);
        assert_eq!(d.value_total(), total_before);
    }

    #[test]
    fn events_keep_the_newest() {
        let mut d = ResultData {
            events: (0..10_000u64)
                .map(|i| EventRecord {
                    time_ns: i,
                    fields: BTreeMap::from([("f".into(), "y".repeat(50))]),
                })
                .collect(),
            ..Default::default()
        };
        bound_result(&mut d, 64 * 1024);
        assert!(!d.events.is_empty());
        assert_eq!(d.events.last().expect("kept").time_ns, 9_999);
    }
}
