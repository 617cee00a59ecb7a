//! Printing results: a table (histograms as bars, like bpftrace's `hist()`), YAML, JSON or
//! folded stacks.

use std::fmt::Write as _;

use fathom_crds::result::{Histogram, ResultData};

/// Output formats of `fathom run -o`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Yaml,
    Json,
    Folded,
}

/// Renders `r` in `format`.
pub fn render(r: &ResultData, format: Format) -> String {
    match format {
        Format::Table => table(r),
        Format::Yaml => serde_yaml::to_string(r).unwrap_or_default(),
        Format::Json => {
            let mut s = serde_json::to_string_pretty(r).unwrap_or_default();
            s.push('\n');
            s
        }
        Format::Folded => {
            let mut s = r.folded().join("\n");
            if !s.is_empty() {
                s.push('\n');
            }
            s
        }
    }
}

fn is_stack(key: &str) -> bool {
    key == "kstack" || key == "ustack"
}

/// Rows keyed by stacks, one block per row like bpftrace's `@[kstack]`: the other keys and
/// the value on a line, then each stack leaf first, indented.
fn stack_rows(out: &mut String, r: &ResultData) {
    for row in &r.rows {
        let head: Vec<String> = r
            .keys
            .iter()
            .filter(|k| !is_stack(k))
            .map(|k| format!("{k}={}", row.keys.get(k).map_or("", String::as_str)))
            .collect();
        let _ = writeln!(out, "[{}]: {}", head.join(", "), row.value);
        for k in r.keys.iter().filter(|k| is_stack(k)) {
            let stack = row.keys.get(k).map_or("", String::as_str);
            let _ = writeln!(out, "    {k}:");
            for frame in stack.split(';').rev() {
                let _ = writeln!(out, "        {frame}");
            }
        }
    }
    if let Some(o) = &r.other {
        let _ = writeln!(out, "[other: {} rows]: {}", o.rows, o.value);
    }
}

fn table(r: &ResultData) -> String {
    let mut out = String::new();
    if r.keys.iter().any(|k| is_stack(k)) && !r.rows.is_empty() {
        stack_rows(&mut out, r);
    } else if !r.rows.is_empty() || r.other.is_some() {
        let value_col = r.value.to_uppercase();
        let mut headers: Vec<String> = r.keys.iter().map(|k| k.to_uppercase()).collect();
        headers.push(value_col);
        let mut cells: Vec<Vec<String>> = r
            .rows
            .iter()
            .map(|row| {
                let mut c: Vec<String> = r
                    .keys
                    .iter()
                    .map(|k| row.keys.get(k).cloned().unwrap_or_default())
                    .collect();
                c.push(row.value.to_string());
                c
            })
            .collect();
        if let Some(o) = &r.other {
            let mut c = vec![String::new(); r.keys.len()];
            if let Some(first) = c.first_mut() {
                *first = format!("(other: {} rows)", o.rows);
            }
            c.push(o.value.to_string());
            cells.push(c);
        }
        write_table(&mut out, &headers, &cells);
    } else if r.histograms.is_empty() && r.events.is_empty() {
        let _ = writeln!(out, "(no rows: nothing matched)");
    }
    out.push_str(&histograms(r));
    if !r.events.is_empty() {
        if !out.is_empty() {
            out.push('\n');
        }
        let mut names: Vec<String> = Vec::new();
        for e in &r.events {
            for k in e.fields.keys() {
                if !names.contains(k) {
                    names.push(k.clone());
                }
            }
        }
        // pid and comm first, payload-like columns last.
        names.sort_by_key(|n| match n.as_str() {
            "pid" => 0,
            "ppid" => 1,
            "comm" => 2,
            "filename" => 9,
            _ => 5,
        });
        let t0 = r.events.first().map_or(0, |e| e.time_ns);
        let mut headers = vec!["TIME(s)".to_string()];
        headers.extend(names.iter().map(|n| n.to_uppercase()));
        let cells: Vec<Vec<String>> = r
            .events
            .iter()
            .map(|e| {
                let mut c = vec![format!("{:.6}", (e.time_ns - t0) as f64 / 1e9)];
                c.extend(
                    names
                        .iter()
                        .map(|n| e.fields.get(n).cloned().unwrap_or_default()),
                );
                c
            })
            .collect();
        write_table(&mut out, &headers, &cells);
    }
    out.push('\n');
    out.push_str(&summary(r));
    out
}

fn write_table(out: &mut String, headers: &[String], cells: &[Vec<String>]) {
    let n = headers.len();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in cells {
        for (i, c) in row.iter().enumerate().take(n) {
            // Stacks can be very long; they are the last column before the value in practice.
            widths[i] = widths[i].max(c.chars().count().min(120));
        }
    }
    let line = |out: &mut String, row: &[String]| {
        let mut s = String::new();
        for (i, c) in row.iter().enumerate() {
            let last = i + 1 == n;
            if last {
                let _ = write!(s, "{c:>w$}", w = widths[i]);
            } else {
                let _ = write!(s, "{c:<w$}  ", w = widths[i]);
            }
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(out, headers);
    for row in cells {
        line(out, row);
    }
}

/// The result's histograms alone, bpftrace-style, one block each (`kubectl fathom hist`).
pub fn histograms(r: &ResultData) -> String {
    let mut out = String::new();
    for h in &r.histograms {
        hist(&mut out, h, &r.value);
    }
    out
}

/// A bpftrace-style histogram: `[low, high)  count |@@@@   |`.
fn hist(out: &mut String, h: &Histogram, value: &str) {
    let title = if h.keys.is_empty() {
        format!("@{value}:")
    } else {
        let k: Vec<String> = h.keys.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("@{value}[{}]:", k.join(", "))
    };
    let _ = writeln!(out, "{title}");
    let max = h.buckets.iter().map(|b| b.count).max().unwrap_or(0).max(1);
    for b in &h.buckets {
        // A one-value bucket ([0, 1), [1, 2)) prints as that value, like bpftrace's.
        let range = if b.low + 1 == b.high {
            format!("[{}]", b.low)
        } else {
            format!("[{}, {})", human(b.low), human(b.high))
        };
        let bar = (b.count * 52).div_ceil(max) as usize;
        let _ = writeln!(
            out,
            "{range:<20} {count:>8} |{bar:<52}|",
            count = b.count,
            bar = "@".repeat(bar.min(52))
        );
    }
    out.push('\n');
}

/// Powers of two as bpftrace prints them: 1K, 2M, 4G.
fn human(v: u64) -> String {
    for (unit, shift) in [("P", 50), ("T", 40), ("G", 30), ("M", 20), ("K", 10)] {
        if v >= 1 << shift && v.is_multiple_of(1 << shift) {
            return format!("{}{unit}", v >> shift);
        }
    }
    v.to_string()
}

/// The closing lines: totals, loss, cost, and why it stopped.
pub fn summary(r: &ResultData) -> String {
    let t = &r.totals;
    let mut s = format!("{} hits in {:.1}s", t.hits, r.elapsed_seconds);
    if t.events_emitted + t.events_lost > 0 {
        let _ = write!(
            s,
            "; events: {} delivered, {} lost in kernel, {} dropped",
            t.events_delivered, t.events_lost, t.events_dropped
        );
    }
    if let Some(b) = &r.budget {
        let _ = write!(
            s,
            "; probes used ~{:.3}% of a CPU, {} KiB locked memory",
            b.cpu_percent,
            b.memlock_bytes / 1024
        );
    }
    s.push('\n');
    for d in &r.degraded {
        let _ = writeln!(s, "degraded ({}): {}", d.reason, d.message);
    }
    if t.stack_errors > 0 {
        let _ = writeln!(s, "note: {} stack walks failed", t.stack_errors);
    }
    if r.truncated {
        let _ = writeln!(s, "note: output cut to spec.aggregate.top");
    }
    if let Some(reason) = &r.stopped_reason {
        let _ = writeln!(s, "stopped early: {reason}");
    }
    s
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use fathom_crds::result::{Bucket, OtherRow, Row};

    use super::*;

    fn result() -> ResultData {
        ResultData {
            probe: "catalog:syscalls".into(),
            value: "count".into(),
            keys: vec!["comm".into()],
            rows: vec![Row {
                keys: BTreeMap::from([("comm".into(), "bash".into())]),
                value: 42,
            }],
            other: Some(OtherRow { rows: 3, value: 5 }),
            ..Default::default()
        }
    }

    #[test]
    fn table_has_header_rows_and_other() {
        let t = render(&result(), Format::Table);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "COMM             COUNT");
        assert_eq!(lines[1], "bash                42");
        assert_eq!(lines[2], "(other: 3 rows)      5");
    }

    #[test]
    fn stack_rows_print_as_blocks_leaf_first() {
        let r = ResultData {
            keys: vec!["reason".into(), "kstack".into()],
            rows: vec![Row {
                keys: BTreeMap::from([
                    ("reason".into(), "NO_SOCKET".into()),
                    ("kstack".into(), "root_fn;mid_fn;leaf_fn".into()),
                ]),
                value: 3,
            }],
            ..Default::default()
        };
        let t = render(&r, Format::Table);
        assert!(
            t.starts_with("[reason=NO_SOCKET]: 3\n    kstack:\n        leaf_fn\n        mid_fn\n        root_fn\n"),
            "{t}"
        );
    }

    #[test]
    fn json_rows_are_keys_and_value() {
        let j: serde_json::Value =
            serde_json::from_str(&render(&result(), Format::Json)).expect("json");
        assert_eq!(
            j["rows"][0],
            serde_json::json!({"keys": {"comm": "bash"}, "value": 42})
        );
    }

    #[test]
    fn histograms_draw_bars() {
        let mut r = result();
        r.rows.clear();
        r.other = None;
        r.value = "latency (ns)".into();
        r.histograms = vec![Histogram {
            keys: BTreeMap::new(),
            buckets: vec![
                Bucket {
                    low: 1024,
                    high: 2048,
                    count: 10,
                },
                Bucket {
                    low: 2048,
                    high: 4096,
                    count: 5,
                },
            ],
            count: 15,
        }];
        let t = render(&r, Format::Table);
        assert!(t.contains("[1K, 2K)"), "{t}");
        assert!(t.contains(&format!("|{}|", "@".repeat(52))), "{t}");
        assert!(
            t.contains(&format!("|{}{}|", "@".repeat(26), " ".repeat(26))),
            "{t}"
        );
    }
}
