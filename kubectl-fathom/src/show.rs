//! What `get`, `top` and `hist` print: a summary (phase, coverage, loss, truncation) and the
//! result as `fathom run` prints it (tables and bars from `fathom_node::cli::output`), or the whole
//! view as JSON or YAML.

use std::fmt::Write as _;

use fathom_crds::result::{ResultData, top_rows};
use fathom_node::cli::output;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde::Serialize;

use crate::{
    error::Error,
    results::{Coverage, JobResult, Loss},
};

/// Output formats of `get` and `top`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
    Yaml,
}

/// The machine-readable view of a job's result (`-o json|yaml`).
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ResultView<'a> {
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<&'a str>,
    pub name: &'a str,
    pub phase: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run: Option<i64>,
    pub coverage: Coverage,
    pub loss: Loss,
    pub truncated: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub updated: Option<&'a Time>,
    pub result: &'a ResultData,
}

fn view<'a>(r: &'a JobResult, data: &'a ResultData) -> ResultView<'a> {
    ResultView {
        kind: r.job.kind(),
        namespace: r.job.namespace.as_deref(),
        name: &r.job.name,
        phase: r.phase(),
        run: r.result.run.or(r.status.run),
        coverage: r.coverage(),
        loss: r.loss(),
        truncated: data.truncated,
        updated: r.result.updated.as_ref(),
        result: data,
    }
}

/// The summary lines above every table.
pub fn summary(r: &JobResult) -> String {
    let mut s = String::new();
    let run = r.result.run.or(r.status.run);
    let _ = writeln!(
        s,
        "{}{}: {}",
        r.job,
        run.map_or(String::new(), |n| format!(" (run {n})")),
        r.phase()
    );
    let c = r.coverage();
    let _ = writeln!(
        s,
        "coverage: {}/{} nodes reported",
        c.nodes_reported, c.nodes_expected
    );
    let l = r.loss();
    let _ = writeln!(
        s,
        "loss: {} (events lost in kernel {}, dropped {}; keys dropped on a full map {}; rate-limited {})",
        l.total(),
        l.events_lost,
        l.events_dropped,
        l.map_full,
        l.rate_limited
    );
    let _ = writeln!(
        s,
        "truncated: {}",
        if r.truncated() {
            "yes (rows, histograms or events were cut to fit spec.aggregate.top or the result's size bound)"
        } else {
            "no"
        }
    );
    if let Some(message) = r.status.message.as_deref().filter(|m| !m.is_empty()) {
        let _ = writeln!(s, "message: {message}");
    }
    s
}

fn machine(r: &JobResult, data: &ResultData, format: Format) -> Result<String, Error> {
    let v = view(r, data);
    match format {
        Format::Json => serde_json::to_string_pretty(&v)
            .map(|mut s| {
                s.push('\n');
                s
            })
            .map_err(|e| Error::Render(format!("JSON: {e}"))),
        Format::Yaml => serde_yaml::to_string(&v).map_err(|e| Error::Render(format!("YAML: {e}"))),
        Format::Table => Ok(format!(
            "{}\n{}",
            summary(r),
            output::render(data, output::Format::Table)
        )),
    }
}

/// `kubectl fathom get`: the summary and the whole result.
pub fn get(r: &JobResult, format: Format) -> Result<String, Error> {
    machine(r, &r.result.data, format)
}

/// `kubectl fathom top`: the rows sorted by value, largest first, at most `limit` (the rest
/// summed in the `other` row), without histograms or events.
pub fn top(r: &JobResult, limit: Option<usize>, format: Format) -> Result<String, Error> {
    let mut data = r.result.data.clone();
    let limit = limit.unwrap_or(data.rows.len());
    let (rows, cut) = top_rows(std::mem::take(&mut data.rows), limit);
    data.rows = rows;
    if let Some(cut) = cut {
        let other = data.other.get_or_insert_default();
        other.rows += cut.rows;
        other.value += cut.value;
    }
    data.histograms.clear();
    data.events.clear();
    machine(r, &data, format)
}

/// `kubectl fathom hist`: the summary and the histograms as bpftrace-style bars.
pub fn hist(r: &JobResult) -> Result<String, Error> {
    let data = &r.result.data;
    if data.histograms.is_empty() {
        return Err(Error::NoHistograms {
            job: r.job.clone(),
            value: data.value.clone(),
        });
    }
    Ok(format!("{}\n{}", summary(r), output::histograms(data)))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use fathom_crds::{
        JobPhase, TraceJobStatus, TraceResultStatus,
        job::NodeCounts,
        result::{Bucket, Histogram, OtherRow, Row, Totals},
    };

    use super::*;
    use crate::error::JobName;

    fn row(comm: &str, v: u64) -> Row {
        Row {
            keys: BTreeMap::from([("comm".into(), comm.into())]),
            value: v,
        }
    }

    fn result() -> JobResult {
        JobResult {
            job: JobName {
                namespace: Some("demo".into()),
                name: "web".into(),
            },
            status: TraceJobStatus {
                phase: Some(JobPhase::Running),
                run: Some(2),
                nodes: Some(NodeCounts {
                    desired: 3,
                    ..Default::default()
                }),
                ..Default::default()
            },
            result_at: ("demo".into(), "web".into()),
            result: TraceResultStatus {
                run: Some(2),
                nodes: 2,
                data: ResultData {
                    probe: "syscalls".into(),
                    value: "count".into(),
                    keys: vec!["comm".into()],
                    rows: vec![row("b", 5), row("a", 9), row("c", 1)],
                    other: Some(OtherRow { rows: 1, value: 1 }),
                    totals: Totals {
                        hits: 16,
                        events_lost: 2,
                        map_full: 1,
                        ..Default::default()
                    },
                    ..Default::default()
                },
                ..Default::default()
            },
        }
    }

    #[test]
    fn the_summary_shows_phase_coverage_loss_and_truncation() {
        let s = summary(&result());
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines[0], "tracejob demo/web (run 2): Running");
        assert_eq!(lines[1], "coverage: 2/3 nodes reported");
        assert!(
            lines[2].starts_with(
                "loss: 3 (events lost in kernel 2, dropped 0; keys dropped on a full map 1"
            ),
            "{s}"
        );
        assert_eq!(lines[3], "truncated: no");
    }

    #[test]
    fn top_sorts_by_value_and_folds_the_rest_into_other() {
        let t = top(&result(), Some(2), Format::Table).expect("renders");
        let table: Vec<&str> = t.lines().skip_while(|l| !l.starts_with("COMM")).collect();
        assert_eq!(table[0], "COMM             COUNT");
        assert_eq!(table[1], "a                    9");
        assert_eq!(table[2], "b                    5");
        // The job's own other row (1 row, 1) plus the cut row c (1).
        assert_eq!(table[3], "(other: 2 rows)      2");
    }

    #[test]
    fn json_carries_coverage_loss_and_the_rows() {
        let j: serde_json::Value =
            serde_json::from_str(&get(&result(), Format::Json).expect("json")).expect("parses");
        assert_eq!(j["kind"], "TraceJob");
        assert_eq!(j["namespace"], "demo");
        assert_eq!(j["phase"], "Running");
        assert_eq!(j["coverage"]["nodesReported"], 2);
        assert_eq!(j["coverage"]["nodesExpected"], 3);
        assert_eq!(j["loss"]["eventsLost"], 2);
        assert_eq!(j["truncated"], false);
        assert_eq!(j["result"]["rows"][1]["keys"]["comm"], "a");
        let y: serde_yaml::Value =
            serde_yaml::from_str(&top(&result(), Some(1), Format::Yaml).expect("yaml"))
                .expect("parses");
        assert_eq!(y["result"]["rows"][0]["value"], 9);
        assert_eq!(y["result"]["other"]["rows"], 3);
    }

    #[test]
    fn hist_draws_bars_and_refuses_a_count_job() {
        let err = hist(&result()).unwrap_err();
        assert!(
            err.to_string().starts_with(
                "tracejob demo/web has no histograms: its spec.aggregate.value is \"count\""
            ),
            "{err}"
        );
        let mut r = result();
        r.result.data.value = "latency".into();
        r.result.data.rows.clear();
        r.result.data.histograms = vec![Histogram {
            keys: BTreeMap::from([("comm".into(), "a".into())]),
            buckets: vec![
                Bucket {
                    low: 1024,
                    high: 2048,
                    count: 4,
                },
                Bucket {
                    low: 2048,
                    high: 4096,
                    count: 2,
                },
            ],
            count: 6,
        }];
        let h = hist(&r).expect("renders");
        assert!(h.contains("@latency[comm=a]:"), "{h}");
        assert!(
            h.contains(&format!(
                "[1K, 2K)                    4 |{}|",
                "@".repeat(52)
            )),
            "{h}"
        );
        assert!(
            h.contains(&format!(
                "[2K, 4K)                    2 |{}{}|",
                "@".repeat(26),
                " ".repeat(26)
            )),
            "{h}"
        );
    }
}
