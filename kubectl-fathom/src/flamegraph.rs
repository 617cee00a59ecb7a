//! `kubectl fathom flamegraph`: an SVG flame graph (inferno) of a job's stack rows, whose
//! folded lines come from the results model (`ResultData::folded`: other keys, then the user
//! stack, then the kernel stack, root first).

use fathom_crds::result::ResultData;

use crate::{error::Error, results::JobResult};

/// Whether the result's rows carry stacks.
pub fn has_stacks(data: &ResultData) -> bool {
    data.keys.iter().any(|k| k == "kstack" || k == "ustack")
}

/// The SVG of `r`'s stacks; an error naming the fix when the job has no stack keys or no row.
pub fn render(r: &JobResult) -> Result<Vec<u8>, Error> {
    let data = &r.result.data;
    if !has_stacks(data) {
        return Err(Error::NoStacks {
            job: r.job.clone(),
            keys: data.keys.clone(),
        });
    }
    let lines = data.folded();
    if lines.is_empty() {
        return Err(Error::NoRows { job: r.job.clone() });
    }
    let mut options = inferno::flamegraph::Options::default();
    options.title = format!("{} — {}", r.job, data.probe);
    options.subtitle = Some(format!(
        "{} nodes reported of {}{}",
        r.coverage().nodes_reported,
        r.coverage().nodes_expected,
        if data.truncated {
            "; truncated: the smallest stacks were cut"
        } else {
            ""
        }
    ));
    options.count_name = if data.value.is_empty() {
        "samples".into()
    } else {
        data.value.clone()
    };
    let mut svg = Vec::new();
    inferno::flamegraph::from_lines(&mut options, lines.iter().map(String::as_str), &mut svg)
        .map_err(|e| Error::Render(format!("rendering the flame graph of {}: {e}", r.job)))?;
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use fathom_crds::{TraceJobStatus, TraceResultStatus, result::Row};

    use super::*;
    use crate::error::JobName;

    fn job(keys: &[&str], rows: Vec<Row>) -> JobResult {
        JobResult {
            job: JobName {
                namespace: Some("demo".into()),
                name: "prof".into(),
            },
            status: TraceJobStatus::default(),
            result_at: ("demo".into(), "prof".into()),
            result: TraceResultStatus {
                nodes: 1,
                data: ResultData {
                    probe: "profile".into(),
                    value: "count".into(),
                    keys: keys.iter().map(|k| k.to_string()).collect(),
                    rows,
                    ..Default::default()
                },
                ..Default::default()
            },
        }
    }

    fn stack(comm: &str, kstack: &str, v: u64) -> Row {
        Row {
            keys: BTreeMap::from([
                ("comm".into(), comm.into()),
                ("kstack".into(), kstack.into()),
            ]),
            value: v,
        }
    }

    #[test]
    fn stacks_become_an_svg_with_every_frame() {
        let r = job(
            &["comm", "kstack"],
            vec![
                stack("nginx", "entry_SYSCALL_64;do_syscall_64;tcp_sendmsg", 30),
                stack("nginx", "entry_SYSCALL_64;do_syscall_64;vfs_read", 10),
            ],
        );
        let svg = String::from_utf8(render(&r).expect("renders")).expect("utf-8");
        assert!(svg.starts_with("<?xml"), "{}", &svg[..80.min(svg.len())]);
        assert!(svg.contains("</svg>"));
        for frame in ["nginx", "do_syscall_64", "tcp_sendmsg", "vfs_read"] {
            assert!(svg.contains(frame), "{frame} missing");
        }
        assert!(
            svg.contains("tracejob demo/prof"),
            "the title names the job"
        );
        // 30 of 40 samples: inferno writes each frame's count and share.
        assert!(
            svg.contains("tcp_sendmsg (30 count"),
            "counts in the titles"
        );
    }

    #[test]
    fn a_job_without_stack_keys_is_told_what_to_add() {
        let r = job(&["comm"], vec![]);
        assert_eq!(
            render(&r).unwrap_err().to_string(),
            "tracejob demo/prof has no stack keys: add `kstack` (kernel stacks) or `ustack` (user stacks) to spec.aggregate.by (it aggregates by: comm)"
        );
        let r = job(&["kstack"], vec![]);
        assert!(matches!(render(&r), Err(Error::NoRows { .. })));
    }
}
