//! Prometheus metrics: reconciles, errors, durations, active jobs, assignments, API writes.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub kind: String,
    pub category: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    pub verb: String,
    pub resource: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReportLabels {
    /// `accepted`, or the rejection code (`DUPLICATE` for a discarded duplicate).
    pub outcome: String,
}

/// The operator's metrics and their registry.
pub struct Metrics {
    registry: Registry,
    pub reconciles: Family<KindLabel, Counter>,
    pub errors: Family<ErrorLabels, Counter>,
    pub duration: Family<KindLabel, Histogram>,
    pub active_jobs: Family<KindLabel, Gauge>,
    pub assignments: Family<KindLabel, Gauge>,
    pub writes: Family<WriteLabels, Counter>,
    pub leader: Gauge,
    /// Collector reports by outcome; `outcome="REJECTION_CODE_DUPLICATE"` is the
    /// duplicates-discarded counter.
    pub reports: Family<ReportLabels, Counter>,
    /// Per job uid: (kind, active, assignments), to set the gauges.
    jobs: Mutex<HashMap<String, (String, bool, i64)>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("fathom_operator");
        let reconciles = Family::<KindLabel, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let duration = Family::<KindLabel, Histogram>::new_with_constructor(|| {
            Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0])
        });
        let active_jobs = Family::<KindLabel, Gauge>::default();
        let assignments = Family::<KindLabel, Gauge>::default();
        let writes = Family::<WriteLabels, Counter>::default();
        let leader = Gauge::default();
        let reports = Family::<ReportLabels, Counter>::default();
        registry.register(
            "collector_reports",
            "Node reports received by the collector, by outcome (accepted or the rejection code)",
            reports.clone(),
        );
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconciles that failed, by error category",
            errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconcile took",
            duration.clone(),
        );
        registry.register(
            "active_jobs",
            "Jobs Pending or Running",
            active_jobs.clone(),
        );
        registry.register(
            "assignments",
            "TraceAssignments the running jobs want",
            assignments.clone(),
        );
        registry.register(
            "api_writes",
            "Mutating API calls made by reconciles",
            writes.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader lease",
            leader.clone(),
        );
        Metrics {
            registry,
            reconciles,
            errors,
            duration,
            active_jobs,
            assignments,
            writes,
            leader,
            reports,
            jobs: Mutex::new(HashMap::new()),
        }
    }
}

impl Metrics {
    pub fn reconciled(&self, kind: &str, took: Duration) {
        let l = KindLabel { kind: kind.into() };
        self.reconciles.get_or_create(&l).inc();
        self.duration.get_or_create(&l).observe(took.as_secs_f64());
    }

    pub fn failed(&self, kind: &str, category: &str) {
        self.errors
            .get_or_create(&ErrorLabels {
                kind: kind.into(),
                category: category.into(),
            })
            .inc();
    }

    pub fn wrote(&self, verb: &str, resource: &str) {
        self.writes
            .get_or_create(&WriteLabels {
                verb: verb.into(),
                resource: resource.into(),
            })
            .inc();
    }

    /// Counts one collector report by `outcome`.
    pub fn report(&self, outcome: &str) {
        self.reports
            .get_or_create(&ReportLabels {
                outcome: outcome.into(),
            })
            .inc();
    }

    /// Records a job's state (None: the job is gone) and refreshes the gauges.
    pub fn job_state(&self, uid: &str, state: Option<(&str, bool, i64)>) {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        match state {
            Some((kind, active, n)) => {
                jobs.insert(uid.to_string(), (kind.to_string(), active, n));
            }
            None => {
                jobs.remove(uid);
            }
        }
        let mut active: HashMap<&str, i64> = HashMap::new();
        let mut assigned: HashMap<&str, i64> = HashMap::new();
        for kind in ["TraceJob", "ClusterTraceJob"] {
            active.insert(kind, 0);
            assigned.insert(kind, 0);
        }
        for (kind, is_active, n) in jobs.values() {
            *active.entry(kind).or_default() += i64::from(*is_active);
            *assigned.entry(kind).or_default() += n;
        }
        for (kind, v) in active {
            self.active_jobs
                .get_or_create(&KindLabel { kind: kind.into() })
                .set(v);
        }
        for (kind, v) in assigned {
            self.assignments
                .get_or_create(&KindLabel { kind: kind.into() })
                .set(v);
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// Shared handle.
pub type SharedMetrics = Arc<Metrics>;
