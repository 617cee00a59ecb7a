//! The kernel's BPF run-time statistics, as the CPU budgets read them.
//!
//! The statistics cost every program run two clock reads (about 75 ns per hit here, more than
//! the probe itself), so they are switched on for a window of each second only — the first
//! window at start — and each session's reading is scaled up by the share of its time they
//! were on. `duty` 1.0 keeps them on.
//!
//! The statistics are one switch for the whole kernel. So this process has **one** switch
//! ([`StatsSwitch`]), shared by all its sessions: a node runner runs many jobs at once, and
//! sessions flipping the kernel's switch each on their own clock would see each other's
//! windows as "someone else" and read too little (or scale too much). Each session keeps
//! only its own start and its view of the switch ([`RunTimeSampler`]).
//!
//! Anyone outside the process may hold the statistics on too (`sysctl
//! kernel.bpf_stats_enabled=1`, another tool's `BPF_ENABLE_STATS`). Then the programs' run
//! time grows in the switch's "off" windows, and scaling it up would inflate it (up to
//! 1/duty, 10×) and stop jobs for budgets they kept. So each sampler looks: when the sysctl
//! is set at start, or its programs' run time grew while the shared switch was off, the
//! kernel's figure is the whole run's and is taken as it is, unscaled
//! ([`RunTimeSampler::estimate`]).
//!
//! [`CpuWatch`] turns successive readings into a job's CPU share and stops it after
//! [`CPU_STRIKES`] seconds over its budget, for `fathom run` and the node runner alike.

use std::{
    collections::BTreeMap,
    fs,
    os::fd::OwnedFd,
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use aya::sys::{Stats, enable_stats};

/// Consecutive seconds over its CPU budget (`limits.cpuPercent`) before a job is stopped.
pub const CPU_STRIKES: u32 = 3;

/// A job's CPU use between readings of its probes' cumulative run time, held to its budget
/// (`fathom run` each second, the node runner at each report tick).
#[derive(Debug, Default)]
pub struct CpuWatch {
    /// Percent of one CPU; `None`: measured, never stopped.
    limit: Option<u32>,
    /// The last reading: when (on the caller's clock) and the run time (ns) then.
    seen: Option<(Duration, u64)>,
    /// Since when the probes have been over the budget without a break.
    over_since: Option<Duration>,
}

/// One reading of a [`CpuWatch`].
#[derive(Debug, Clone, PartialEq)]
pub struct CpuReading {
    /// Percent of one CPU the probes used since the reading before.
    pub percent: f64,
    /// Why the job must stop: over its budget for [`CPU_STRIKES`] seconds in a row.
    pub over_budget: Option<String>,
}

impl CpuWatch {
    pub fn new(limit: Option<u32>) -> CpuWatch {
        CpuWatch {
            limit,
            ..CpuWatch::default()
        }
    }

    /// Takes the probes' cumulative run time `cpu_ns` at `at` (any clock that only moves
    /// forward, the same for every reading); `None` for the first reading, or when the clock
    /// did not move forward.
    pub fn observe(&mut self, at: Duration, cpu_ns: u64) -> Option<CpuReading> {
        let (then, before) = self.seen.replace((at, cpu_ns))?;
        let window = at.checked_sub(then).filter(|w| !w.is_zero())?;
        let percent = cpu_ns.saturating_sub(before) as f64 / 1e9 / window.as_secs_f64() * 100.0;
        let over_budget = match self.limit {
            Some(limit) if percent > f64::from(limit) => {
                let since = *self.over_since.get_or_insert(then);
                let over = at.saturating_sub(since);
                (over >= Duration::from_secs(u64::from(CPU_STRIKES))).then(|| {
                    format!(
                        "CPU budget exceeded: the probes used {percent:.1}% of a CPU for {} s, over spec.limits.cpuPercent={limit} (the node runner's default when the job sets none); raise limits.cpuPercent or trace less",
                        over.as_secs()
                    )
                })
            }
            _ => {
                self.over_since = None;
                None
            }
        };
        Some(CpuReading {
            percent,
            over_budget,
        })
    }
}

/// The sampling period of the run-time statistics.
const STATS_PERIOD: Duration = Duration::from_secs(1);

/// How long after the switch went off the baseline of the off window is read (runs in flight
/// when it went off still count theirs).
const OFF_SETTLE: Duration = Duration::from_millis(50);

/// How often, in an off window, a sampler compares its programs' run time with the window's
/// baseline.
const OFF_CHECK: Duration = Duration::from_millis(100);

/// The sysctl that keeps the kernel's BPF statistics on for everyone.
const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// The process's switch of the kernel's run-time statistics.
struct StatsSwitch {
    /// Held while the switch is on: the kernel keeps the statistics on while the fd lives.
    fd: Option<OwnedFd>,
    on_since: Option<Instant>,
    /// Time the switch was on, in closed windows, since the process first used it.
    sampled: Duration,
    last_off: Instant,
    /// Counts the times the switch went off: an off window's number.
    off_window: u64,
    /// The samplers using the switch, with their duty; the switch follows the largest.
    users: BTreeMap<u64, f64>,
    next_user: u64,
}

static SWITCH: Mutex<Option<StatsSwitch>> = Mutex::new(None);

fn switch() -> MutexGuard<'static, Option<StatsSwitch>> {
    // A panic while holding it leaves consistent data (plain fields): take it back.
    SWITCH.lock().unwrap_or_else(|e| e.into_inner())
}

impl StatsSwitch {
    fn new(now: Instant) -> StatsSwitch {
        StatsSwitch {
            fd: None,
            on_since: None,
            sampled: Duration::ZERO,
            last_off: now,
            off_window: 0,
            users: BTreeMap::new(),
            next_user: 0,
        }
    }

    fn duty(&self) -> f64 {
        self.users.values().copied().fold(0.0, f64::max)
    }

    /// The on time so far, the open window included.
    fn sampled_at(&self, now: Instant) -> Duration {
        self.sampled
            + self
                .on_since
                .map_or(Duration::ZERO, |s| now.duration_since(s))
    }

    fn turn_on(&mut self, now: Instant) {
        self.fd = enable_stats(Stats::RunTime).ok();
        self.on_since = self.fd.as_ref().map(|_| now);
    }

    fn turn_off(&mut self, now: Instant) {
        if let Some(since) = self.on_since.take() {
            self.sampled += now.duration_since(since);
        }
        self.fd = None;
        self.last_off = now;
        self.off_window += 1;
    }

    /// Whether the switch is to go on or off now.
    fn switch_due(&self, now: Instant) -> bool {
        let duty = self.duty();
        if duty >= 1.0 {
            return self.on_since.is_none();
        }
        let window = STATS_PERIOD.mul_f64(duty);
        match self.on_since {
            Some(since) => now.duration_since(since) >= window,
            None => now.duration_since(self.last_off) >= STATS_PERIOD - window,
        }
    }

    fn flip(&mut self, now: Instant) {
        if self.on_since.is_some() {
            self.turn_off(now);
        } else {
            self.turn_on(now);
        }
    }
}

/// One session's view of the process's statistics switch.
pub struct RunTimeSampler {
    /// Its registration with the switch; `None`: a sampler that measures nothing.
    user: Option<u64>,
    started: Instant,
    /// The switch's on time when this sampler started.
    sampled_at_start: Duration,
    /// The baseline of an off window: its number and the programs' run time then.
    baseline: Option<(u64, u64)>,
    last_check: Instant,
    /// Someone else keeps the statistics on: readings are not scaled.
    others: bool,
}

impl RunTimeSampler {
    /// Joins the process's switch with `duty` (the share of each second the statistics are
    /// on; the switch follows the largest duty of its users) and turns it on if it was off.
    pub fn start(duty: f64) -> RunTimeSampler {
        let now = Instant::now();
        let others = fs::read_to_string(STATS_SYSCTL).is_ok_and(|v| v.trim() != "0");
        let mut guard = switch();
        let sw = guard.get_or_insert_with(|| StatsSwitch::new(now));
        let user = sw.next_user;
        sw.next_user += 1;
        sw.users.insert(user, duty.clamp(0.01, 1.0));
        if sw.on_since.is_none() {
            // The first window at start: a short job still gets a sample.
            sw.turn_on(now);
        }
        RunTimeSampler {
            user: Some(user),
            started: now,
            sampled_at_start: sw.sampled_at(now),
            baseline: None,
            last_check: now,
            others,
        }
    }

    /// A sampler that never switches the statistics on (a session with nothing attached has
    /// no programs to measure).
    pub fn off() -> RunTimeSampler {
        let now = Instant::now();
        RunTimeSampler {
            user: None,
            started: now,
            sampled_at_start: Duration::ZERO,
            baseline: None,
            last_check: now,
            others: false,
        }
    }

    /// Whether [`RunTimeSampler::observe`] wants a reading now: the switch is due to flip,
    /// or, in an off window, its baseline is due or a comparison with it.
    pub fn wants_reading(&self) -> bool {
        if self.user.is_none() {
            return false;
        }
        let now = Instant::now();
        let guard = switch();
        let Some(sw) = guard.as_ref() else {
            return false;
        };
        if sw.switch_due(now) {
            return true;
        }
        sw.on_since.is_none()
            && now.duration_since(sw.last_off) >= OFF_SETTLE
            && match self.baseline {
                Some((window, _)) if window == sw.off_window => {
                    now.duration_since(self.last_check) >= OFF_CHECK
                }
                _ => true,
            }
    }

    /// Takes this session's programs' run time as the kernel counts it now: in an off
    /// window, the window's baseline or a comparison with it (growth: someone else keeps the
    /// statistics on); then flips the shared switch when it is due.
    pub fn observe(&mut self, run_time_ns: u64) {
        if self.user.is_none() {
            return;
        }
        let now = Instant::now();
        let mut guard = switch();
        let Some(sw) = guard.as_mut() else {
            return;
        };
        if sw.on_since.is_none() && now.duration_since(sw.last_off) >= OFF_SETTLE {
            match self.baseline {
                Some((window, ns)) if window == sw.off_window => {
                    if run_time_ns > ns && !self.others {
                        tracing::info!(
                            "BPF run-time statistics are kept on by someone else: CPU use is read unscaled"
                        );
                        self.others = true;
                    }
                }
                _ => self.baseline = Some((sw.off_window, run_time_ns)),
            }
            self.last_check = now;
        }
        if sw.switch_due(now) {
            sw.flip(now);
        }
    }

    /// Someone else keeps the kernel's statistics on.
    pub fn shared(&self) -> bool {
        self.others
    }

    /// Whole run time over sampled time (1 when always on, when someone else keeps the
    /// statistics on, or before any sample).
    pub fn scale(&self) -> f64 {
        if self.others || self.user.is_none() {
            return 1.0;
        }
        let now = Instant::now();
        let guard = switch();
        let Some(sw) = guard.as_ref() else {
            return 1.0;
        };
        let sampled = sw.sampled_at(now).saturating_sub(self.sampled_at_start);
        let total = now.duration_since(self.started);
        if sampled.is_zero() || sampled >= total {
            1.0
        } else {
            total.as_secs_f64() / sampled.as_secs_f64()
        }
    }

    /// The whole run's figure from the kernel's reading (ns or runs).
    pub fn estimate(&self, reading: u64) -> u64 {
        (reading as f64 * self.scale()) as u64
    }
}

impl Drop for RunTimeSampler {
    /// Leaves the switch; the last user turns it off.
    fn drop(&mut self) {
        let Some(user) = self.user else {
            return;
        };
        let mut guard = switch();
        if let Some(sw) = guard.as_mut() {
            sw.users.remove(&user);
            if sw.users.is_empty() {
                sw.turn_off(Instant::now());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two samplers of one process share one switch: the second sees the first's window as
    /// its own (not "someone else"), both scale by the same windows, and the switch goes off
    /// only when the last leaves.
    #[test]
    fn samplers_of_one_process_share_the_switch() {
        let a = RunTimeSampler::start(0.1);
        let mut b = RunTimeSampler::start(0.1);
        {
            let guard = switch();
            let sw = guard.as_ref().expect("a switch");
            assert!(sw.users.len() >= 2);
        }
        // b reads the same run time through an off window: nobody else is counting.
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if b.wants_reading() {
                b.observe(1_000);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!b.shared(), "a sibling's window is not someone else's");
        let (sa, sb) = (a.scale(), b.scale());
        assert!(sa >= 1.0 && sb >= 1.0, "{sa} {sb}");
        drop(a);
        assert!(switch().as_ref().is_some_and(|sw| !sw.users.is_empty()));
        drop(b);
    }

    /// Run time that grows in an off window is someone else's: the sampler stops scaling.
    #[test]
    fn growth_in_an_off_window_means_someone_else() {
        let mut s = RunTimeSampler::start(0.1);
        let mut ns = 0;
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline && !s.shared() {
            if s.wants_reading() {
                ns += 1_000;
                s.observe(ns);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(s.shared());
        assert_eq!(s.scale(), 1.0);
    }
}
