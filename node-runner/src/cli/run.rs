//! Driving a session to its end: duration, Ctrl-C, CPU budget, live progress; and the local
//! commands on a TraceJob file (`fathom run`, `fathom check`, and the same in
//! `kubectl fathom run`/`explain`): [`load_job`], [`check_job`], [`run_file`].

use std::{
    io::IsTerminal,
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use fathom_crds::{
    CheckedSpec, FieldError,
    result::ResultData,
    spec::parse_duration,
    verdict::{Reason, Verdict},
};

use crate::{
    cli::jobfile::{self, JobFile},
    engine::{
        error::EngineError,
        kernel::Kernel,
        plan,
        session::{EngineOptions, Session},
        stats::CpuWatch,
    },
};

/// Reads and validates a TraceJob file, noting on stderr the fields that only matter in a
/// cluster.
pub fn load_job(file: &Path) -> Result<(JobFile, CheckedSpec), EngineError> {
    let job = jobfile::read(file)?;
    let cluster_only = job.spec.cluster_only_fields();
    if !cluster_only.is_empty() {
        eprintln!(
            "note: {} only matter in a cluster; ignored here",
            cluster_only.join(", ")
        );
    }
    let checked = job.spec.validate().map_err(EngineError::InvalidSpec)?;
    Ok((job, checked))
}

/// The feasibility verdict of a checked spec on `kernel`, nothing attached.
pub fn check_job(checked: &CheckedSpec, kernel: &Kernel) -> Result<Verdict, EngineError> {
    match plan::plan(checked, kernel, plan::Scope::Node) {
        Ok(p) => Ok(p.verdict),
        Err(EngineError::NotFeasible(v)) => Ok(v),
        Err(e) => Err(e),
    }
}

/// A verdict as `fathom check` prints it: one line per probe.
pub fn verdict_lines(verdict: &Verdict) -> Vec<String> {
    verdict
        .probes
        .iter()
        .map(|p| {
            if p.feasible {
                format!("{}: feasible", p.probe)
            } else {
                format!(
                    "{}: not feasible: {:?}: {}",
                    p.probe,
                    p.reason.unwrap_or(Reason::SymbolNotFound),
                    p.message
                )
            }
        })
        .collect()
}

/// `fathom run FILE`: loads the job, attaches it on this machine (the whole machine, as
/// bpftrace does), shows progress on a terminal stderr unless `quiet`, runs until its duration
/// (or `duration`, which overrides it), `stop`, or a budget, and returns the final result with
/// everything detached.
pub fn run_file(
    file: &Path,
    duration: Option<&str>,
    quiet: bool,
    stop: &AtomicBool,
) -> Result<ResultData, EngineError> {
    let (job, mut checked) = load_job(file)?;
    if let Some(d) = duration {
        checked.duration = Some(parse_duration(d).filter(|d| !d.is_zero()).ok_or_else(|| {
            EngineError::InvalidSpec(vec![FieldError {
                field: "--duration".into(),
                message: format!("{d:?} is not a duration; write e.g. 10s, 5m"),
            }])
        })?);
    }
    let kernel = Kernel::running();
    let plan = plan::plan(&checked, &kernel, plan::Scope::Node)?;
    let labels = plan.probe_labels().join(", ");
    let duration = plan.duration;
    let session = Session::start(plan, &kernel, EngineOptions::default())?;
    let live = !quiet && std::io::stderr().is_terminal();
    eprintln!(
        "{}: attached {} ({} link{}); {}",
        job.name,
        labels,
        session.link_count(),
        if session.link_count() == 1 { "" } else { "s" },
        match duration {
            Some(d) => format!("running for {}s, Ctrl-C to stop early", d.as_secs_f64()),
            None => "running until Ctrl-C".into(),
        }
    );
    let result = run_session(session, duration, stop, |p: &Progress| {
        if live {
            let remaining = p.remaining.map_or(String::new(), |r| {
                format!(" / {:.0}s left", r.as_secs_f64())
            });
            eprint!(
                "\r\x1b[K{:.0}s{remaining}: {} hits, {} events, probes {:.2}% CPU",
                p.elapsed.as_secs_f64(),
                p.hits,
                p.events,
                p.cpu_percent
            );
        }
    })?;
    if live {
        eprintln!("\r\x1b[Kdetached");
    }
    Ok(result)
}

pub use crate::engine::stats::CPU_STRIKES;

/// What the progress callback sees about once a second.
#[derive(Clone, Debug, PartialEq)]
pub struct Progress {
    pub elapsed: Duration,
    pub remaining: Option<Duration>,
    pub hits: u64,
    pub events: u64,
    pub cpu_percent: f64,
}

/// Runs `session` until `duration` passes, `stop` is set, or a budget is exceeded; then
/// detaches and returns the final result with the reason it ended early, if it did.
pub fn run_session(
    mut session: Session,
    duration: Option<Duration>,
    stop: &AtomicBool,
    mut progress: impl FnMut(&Progress),
) -> Result<ResultData, EngineError> {
    let start = Instant::now();
    let mut last_tick = start;
    let mut cpu = CpuWatch::new(session.plan().cpu_percent);
    cpu.observe(Duration::ZERO, session.run_time().0);
    let mut pct = 0.0;
    let mut reason = None;
    let mut delivered = 0u64;
    loop {
        if stop.load(Ordering::Relaxed) {
            reason = Some("interrupted".to_string());
            break;
        }
        let elapsed = start.elapsed();
        let remaining = duration.map(|d| d.saturating_sub(elapsed));
        if remaining.is_some_and(|r| r.is_zero()) {
            break;
        }
        let wait = remaining.map_or(Duration::from_millis(100), |r| {
            r.min(Duration::from_millis(100))
        });
        delivered += session.poll_events(wait) as u64;
        if last_tick.elapsed() >= Duration::from_secs(1) {
            last_tick = Instant::now();
            if let Some(reading) = cpu.observe(start.elapsed(), session.run_time().0) {
                pct = reading.percent;
                if reading.over_budget.is_some() {
                    reason = reading.over_budget;
                    break;
                }
            }
            let hits = session.counters().map(|c| c.hits).unwrap_or(0);
            progress(&Progress {
                elapsed: start.elapsed(),
                remaining: duration.map(|d| d.saturating_sub(start.elapsed())),
                hits,
                events: delivered,
                cpu_percent: pct,
            });
        }
    }
    let mut result = session.stop()?;
    result.stopped_reason = reason;
    Ok(result)
}
