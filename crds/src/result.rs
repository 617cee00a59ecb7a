//! The results model: one shape for `fathom run`, the gRPC contract, the TraceResult
//! resource and the CLI.
//!
//! Rows of `{keys, value}` sorted by value (largest first) with an `other` row for what falls
//! outside top-N; log2 histograms; stacks as folded strings (`root;…;leaf`) in the `kstack` /
//! `ustack` keys; the last N events; totals and loss counters.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A job's result on one node or merged over many.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResultData {
    /// The probe, as written in the job (`skb/kfree_skb`, `catalog:exec`).
    pub probe: String,
    /// What `value` means: count, sum(field), hist(field) or latency (nanoseconds).
    pub value: String,
    /// The key names, in the order the job listed them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<String>,
    /// The top rows, largest value first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rows: Vec<Row>,
    /// The sum of every row not in `rows`, and how many there were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub other: Option<OtherRow>,
    /// Log2 histograms, one per key combination, largest count first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub histograms: Vec<Histogram>,
    /// The last events, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<EventRecord>,
    pub totals: Totals,
    /// What the probes cost, measured by the kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,
    /// Why the job stopped before its duration, when it did (a budget, a signal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_reason: Option<String>,
    /// Ways the result is incomplete (a full map, lost events, a rate limit), each with a
    /// stable reason for conditions and metrics.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub degraded: Vec<Degradation>,
    /// Rows, histograms or events were cut to fit the bounds.
    #[serde(default)]
    pub truncated: bool,
    /// Seconds the probes were attached.
    #[serde(default)]
    pub elapsed_seconds: f64,
}

/// One aggregated key combination.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct Row {
    pub keys: BTreeMap<String, String>,
    pub value: u64,
}

/// The rows beyond top-N, summed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct OtherRow {
    pub rows: u64,
    pub value: u64,
}

/// A log2 histogram: bucket `[low, high)`; the first bucket is `[0, 1)`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct Histogram {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub keys: BTreeMap<String, String>,
    pub buckets: Vec<Bucket>,
    pub count: u64,
}

/// One histogram bucket.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct Bucket {
    pub low: u64,
    pub high: u64,
    pub count: u64,
}

/// One event.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct EventRecord {
    /// Nanoseconds since boot (CLOCK_MONOTONIC).
    pub time_ns: u64,
    pub fields: BTreeMap<String, String>,
}

/// Totals and loss counters. `hits = Σ rows + other` for count jobs; every hit the kernel
/// saw but did not count is in exactly one of the loss counters.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Totals {
    /// Hits that passed the filters and the rate limit.
    pub hits: u64,
    /// Distinct key combinations in the kernel map.
    pub distinct_keys: u64,
    /// Events written to the ring buffer.
    pub events_emitted: u64,
    /// Events read from the ring buffer.
    pub events_delivered: u64,
    /// Events the ring buffer had no room for.
    pub events_lost: u64,
    /// Events read but dropped in user space (bounded queues).
    pub events_dropped: u64,
    /// New keys dropped because the map was full.
    pub map_full: u64,
    /// Hits dropped by `limits.eventsPerSecond`.
    pub rate_limited: u64,
    /// Stack walks that failed.
    pub stack_errors: u64,
    /// Return/completion hits with no matching entry.
    pub unpaired: u64,
    /// Hits rejected by the filters.
    pub filtered: u64,
}

/// One way a result is incomplete.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct Degradation {
    /// `MapFull`, `EventsLost` or `RateLimited`.
    pub reason: String,
    pub message: String,
}

impl Totals {
    /// What the counters say is missing from a result.
    pub fn degradations(&self) -> Vec<Degradation> {
        let mut out = Vec::new();
        if self.map_full > 0 {
            out.push(Degradation {
                reason: "MapFull".into(),
                message: format!(
                    "the aggregation map was full: {} new keys were dropped; raise spec.limits.mapEntries or aggregate by fewer keys",
                    self.map_full
                ),
            });
        }
        if self.events_lost + self.events_dropped > 0 {
            out.push(Degradation {
                reason: "EventsLost".into(),
                message: format!(
                    "{} events were lost in the kernel and {} dropped in user space; lower the event rate or aggregate instead",
                    self.events_lost, self.events_dropped
                ),
            });
        }
        if self.rate_limited > 0 {
            out.push(Degradation {
                reason: "RateLimited".into(),
                message: format!(
                    "{} hits were dropped by spec.limits.eventsPerSecond",
                    self.rate_limited
                ),
            });
        }
        out
    }
}

/// What the probes cost.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Budget {
    /// Nanoseconds the programs ran, per the kernel's BPF run-time statistics (sampled for a
    /// part of each second and scaled to the whole run).
    pub cpu_ns: u64,
    /// Program runs (sampled and scaled likewise).
    pub runs: u64,
    /// Average percent of one CPU over the run.
    pub cpu_percent: f64,
    /// Hits per second over the run.
    pub events_per_second: f64,
    /// Bytes of locked kernel memory the job's maps hold.
    pub memlock_bytes: u64,
}

/// Sorts rows by value, largest first (ties by keys, for stable output), and keeps `top`,
/// summing the rest into an [`OtherRow`].
pub fn top_rows(mut rows: Vec<Row>, top: usize) -> (Vec<Row>, Option<OtherRow>) {
    rows.sort_by(|a, b| b.value.cmp(&a.value).then_with(|| a.keys.cmp(&b.keys)));
    if rows.len() <= top {
        return (rows, None);
    }
    let rest = rows.split_off(top);
    let other = OtherRow {
        rows: rest.len() as u64,
        value: rest.iter().map(|r| r.value).sum(),
    };
    (rows, Some(other))
}

impl ResultData {
    /// Stacks as folded lines (`frame;frame;frame value`), the input of flame graph tools.
    /// The user stack comes first (root to leaf), then the kernel stack, like bpftrace's
    /// `@[ustack, kstack]`; other keys are prepended as frames (e.g. the comm).
    pub fn folded(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for row in &self.rows {
            let mut frames: Vec<&str> = Vec::new();
            for k in &self.keys {
                if k == "kstack" || k == "ustack" {
                    continue;
                }
                if let Some(v) = row.keys.get(k) {
                    frames.push(v);
                }
            }
            for k in ["ustack", "kstack"] {
                if let Some(v) = row.keys.get(k)
                    && !v.is_empty()
                {
                    frames.push(v);
                }
            }
            if frames.is_empty() {
                frames.push("all");
            }
            lines.push(format!("{} {}", frames.join(";"), row.value));
        }
        lines
    }

    /// Σ of the rows' values plus the other row.
    pub fn value_total(&self) -> u64 {
        self.rows.iter().map(|r| r.value).sum::<u64>() + self.other.as_ref().map_or(0, |o| o.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(k: &str, v: u64) -> Row {
        Row {
            keys: BTreeMap::from([("comm".to_string(), k.to_string())]),
            value: v,
        }
    }

    #[test]
    fn top_rows_sorts_and_sums_the_rest() {
        let (rows, other) = top_rows(vec![row("a", 1), row("b", 5), row("c", 3), row("d", 2)], 2);
        assert_eq!(rows, vec![row("b", 5), row("c", 3)]);
        assert_eq!(other, Some(OtherRow { rows: 2, value: 3 }));
        let (rows, other) = top_rows(vec![row("a", 1)], 2);
        assert_eq!(rows.len(), 1);
        assert_eq!(other, None);
    }

    #[test]
    fn rows_serialize_as_keys_and_value() {
        let json = serde_json::to_string(&row("x", 7)).expect("serializes");
        assert_eq!(json, r#"{"keys":{"comm":"x"},"value":7}"#);
    }

    #[test]
    fn folded_puts_other_keys_then_ustack_then_kstack() {
        let r = ResultData {
            keys: vec!["comm".into(), "kstack".into(), "ustack".into()],
            rows: vec![Row {
                keys: BTreeMap::from([
                    ("comm".into(), "app".into()),
                    ("kstack".into(), "sys_read;vfs_read".into()),
                    ("ustack".into(), "main;read".into()),
                ]),
                value: 9,
            }],
            ..Default::default()
        };
        assert_eq!(r.folded(), vec!["app;main;read;sys_read;vfs_read 9"]);
    }
}
