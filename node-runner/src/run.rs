//! Driving a session to its end: duration, Ctrl-C, CPU budget, live progress.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use fathom_crds::result::ResultData;

use crate::{engine::Session, error::EngineError};

/// Consecutive seconds over `limits.cpuPercent` before a job is stopped.
pub const CPU_STRIKES: u32 = 3;

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
    let cpu_limit = session.plan().cpu_percent;
    let start = Instant::now();
    let mut last_tick = start;
    let mut last_cpu = session.run_time().0;
    let mut strikes = 0;
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
            let now = Instant::now();
            let cpu = session.run_time().0;
            let window = now.duration_since(last_tick).as_secs_f64();
            let pct = (cpu.saturating_sub(last_cpu)) as f64 / 1e9 / window * 100.0;
            last_cpu = cpu;
            last_tick = now;
            if let Some(limit) = cpu_limit {
                if pct > f64::from(limit) {
                    strikes += 1;
                } else {
                    strikes = 0;
                }
                if strikes >= CPU_STRIKES {
                    reason = Some(format!(
                        "CPU budget exceeded: the probes used {pct:.1}% of a CPU for {CPU_STRIKES} s, over spec.limits.cpuPercent={limit}"
                    ));
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
