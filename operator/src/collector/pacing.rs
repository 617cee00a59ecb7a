//! Write pacing: each job's TraceResult status is written at most once per
//! [`WRITE_INTERVAL`] while reports come in, and at once when every node sent its final report;
//! only when the merge changed, by server-side apply under [`MANAGER`] without force. kube-rs
//! has no client-side rate limit: 100 nodes reporting each second make 100 merges a second,
//! and one write.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use fathom_crds::{
    ClusterTraceJob, TraceJob, TraceResult, TraceResultSpec, TraceResultStatus,
    assignment::{
        JOB_KIND_LABEL, JOB_NAME_LABEL, JOB_NAMESPACE_LABEL, JOB_UID_LABEL, JobRef, label_value,
    },
    trace_result::{Coverage, Loss},
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use kube::{
    Api, Client, Resource,
    api::{Patch, PatchParams},
};
use serde_json::json;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{Collector, Merged};
use crate::{
    metrics::Metrics,
    reconcile::{Clock, MANAGER},
};

/// The shortest time between two writes of one job's TraceResult (the final one excepted).
pub const WRITE_INTERVAL: Duration = Duration::from_secs(1);
/// How often the writer looks for due jobs and publishes watchers' updates.
pub const TICK: Duration = Duration::from_millis(250);

/// What was last written for one job.
#[derive(Debug, Default)]
struct Written {
    at: Option<Instant>,
    version: u64,
    status: Option<TraceResultStatus>,
}

/// Decides when a job's result is due; pure.
#[derive(Debug, Default)]
pub struct Pacer {
    jobs: HashMap<String, Written>,
}

impl Pacer {
    /// Whether job `uid`, at merge `version`, is due at `now`: it changed since the last
    /// write, and either it finished or the last write is [`WRITE_INTERVAL`] old.
    pub fn due(&self, uid: &str, version: u64, finished: bool, now: Instant) -> bool {
        let Some(w) = self.jobs.get(uid) else {
            return true;
        };
        w.version != version
            && (finished
                || w.at
                    .is_none_or(|at| now.duration_since(at) >= WRITE_INTERVAL))
    }

    /// Whether `status` is what was last written (its `updated` time aside).
    fn unchanged(&self, uid: &str, status: &TraceResultStatus) -> bool {
        self.jobs
            .get(uid)
            .and_then(|w| w.status.as_ref())
            .is_some_and(|s| {
                s.run == status.run
                    && s.rows == status.rows
                    && s.total == status.total
                    && s.nodes == status.nodes
                    && s.data == status.data
            })
    }

    fn record(&mut self, uid: &str, version: u64, now: Instant, status: Option<TraceResultStatus>) {
        let w = self.jobs.entry(uid.to_string()).or_default();
        w.version = version;
        w.at = Some(now);
        if status.is_some() {
            w.status = status;
        }
    }

    /// A write that failed: try again after the interval.
    fn failed(&mut self, uid: &str, now: Instant) {
        self.jobs.entry(uid.to_string()).or_default().at = Some(now);
    }

    fn retain(&mut self, known: &[String]) {
        self.jobs.retain(|uid, _| known.contains(uid));
    }
}

/// The status a merge is written as.
pub fn status_of(m: &Merged, now: jiff::Timestamp) -> TraceResultStatus {
    TraceResultStatus {
        run: Some(m.run as i64),
        rows: m.data.rows.len() as u64,
        total: m.data.totals.hits,
        updated: Some(Time(now)),
        nodes: m.coverage.nodes_reported,
        coverage: Some(Coverage::new(
            m.coverage.nodes_reported,
            m.coverage.nodes_expected,
            m.coverage.nodes_finished,
            m.coverage.nodes_failed,
        )),
        loss: Some(Loss::new(
            m.counters.map_full,
            m.counters.ringbuf_lost + m.counters.user_dropped,
            m.counters.transport_dropped,
            m.counters.rate_limited,
        )),
        data: m.data.clone(),
    }
}

/// The TraceResult object of `job` (no status): what the reconciler creates, made again by
/// the writer when it is missing. Owned by the job, so it goes with it.
pub fn result_object(job: &JobRef, namespace: &str, name: &str) -> TraceResult {
    let mut r = TraceResult::new(name, TraceResultSpec { job: job.clone() });
    r.metadata.namespace = Some(namespace.to_string());
    r.metadata.labels = Some(BTreeMap::from([
        (JOB_UID_LABEL.to_string(), job.uid.clone()),
        (JOB_NAME_LABEL.to_string(), label_value(&job.name)),
        (JOB_KIND_LABEL.to_string(), job.kind.clone()),
        (
            "app.kubernetes.io/managed-by".to_string(),
            MANAGER.to_string(),
        ),
    ]));
    if let (Some(labels), Some(ns)) = (r.metadata.labels.as_mut(), &job.namespace) {
        labels.insert(JOB_NAMESPACE_LABEL.to_string(), ns.clone());
    }
    r.metadata.owner_references = Some(vec![OwnerReference {
        api_version: TraceJob::api_version(&()).into_owned(),
        kind: job.kind.clone(),
        name: job.name.clone(),
        uid: job.uid.clone(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }]);
    r
}

/// What [`ResultWriter::apply`] did.
enum Applied {
    Written,
    /// The TraceResult and its job are gone: the job was forgotten.
    JobGone,
}

/// Writes merged results to the API, paced.
pub struct ResultWriter {
    client: Client,
    collector: Arc<Collector>,
    clock: Arc<dyn Clock>,
    pacer: Pacer,
    writes: u64,
    metrics: Option<Arc<Metrics>>,
}

impl ResultWriter {
    pub fn new(client: Client, collector: Arc<Collector>, clock: Arc<dyn Clock>) -> Self {
        ResultWriter {
            client,
            collector,
            clock,
            pacer: Pacer::default(),
            writes: 0,
            metrics: None,
        }
    }

    /// Counts writes in `metrics` (`api_writes{verb="apply-status",resource="TraceResult"}`).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// API writes made so far.
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// Writes every due job's result; publishes watchers' updates. Returns the writes made.
    pub async fn tick(&mut self, now: Instant) -> usize {
        self.collector.publish();
        let uids = self.collector.state().job_uids();
        self.pacer.retain(&uids);
        let mut written = 0;
        for uid in uids {
            let (version, merged) = {
                let state = self.collector.state();
                let version = state.version(&uid);
                if self
                    .pacer
                    .jobs
                    .get(&uid)
                    .is_some_and(|w| w.version == version)
                {
                    continue;
                }
                (version, state.merged(&uid))
            };
            let Some(m) = merged else { continue };
            if !self.pacer.due(&uid, version, m.finished, now) {
                continue;
            }
            if !self.collector.has_reports(&uid, m.run) {
                // Nothing reported into this run: the reconciler keeps the status.
                self.pacer.record(&uid, version, now, None);
                continue;
            }
            let status = status_of(&m, self.clock.now());
            if self.pacer.unchanged(&uid, &status) {
                self.pacer.record(&uid, version, now, None);
                continue;
            }
            match self.apply(&m, &status).await {
                Ok(Applied::JobGone) => {}
                Ok(Applied::Written) => {
                    self.writes += 1;
                    if let Some(metrics) = &self.metrics {
                        metrics.wrote("apply-status", "TraceResult");
                    }
                    written += 1;
                    self.pacer.record(&uid, version, now, Some(status));
                }
                Err(e) => {
                    warn!(job = %m.job.name, uid = %uid, error = %e, "could not write the TraceResult; retrying");
                    self.pacer.failed(&uid, now);
                }
            }
        }
        written
    }

    async fn apply(&self, m: &Merged, status: &TraceResultStatus) -> Result<Applied, kube::Error> {
        let api: Api<TraceResult> = Api::namespaced(self.client.clone(), &m.result_namespace);
        let patch = json!({
            "apiVersion": TraceResult::api_version(&()),
            "kind": "TraceResult",
            "status": status,
        });
        let params = PatchParams::apply(MANAGER);
        match api
            .patch_status(&m.result_name, &params, &Patch::Apply(&patch))
            .await
        {
            Err(kube::Error::Api(e)) if e.code == 404 => {
                // Gone with its job (the garbage collector follows the ownerReference): the
                // job is forgotten, not its result made again for nobody.
                if !self.job_exists(&m.job).await? {
                    self.collector.forget_job(&m.job.uid);
                    info!(job = %m.job.name, uid = %m.job.uid, "the job is gone: forgot its reports");
                    return Ok(Applied::JobGone);
                }
                // Gone while the job runs: the garbage collector removed it (a job deleted
                // and created again under the same name can lose its result that way), or it
                // was deleted by hand. The result is made again, owned by the job.
                let object = result_object(&m.job, &m.result_namespace, &m.result_name);
                api.patch(&m.result_name, &params, &Patch::Apply(&object))
                    .await?;
                api.patch_status(&m.result_name, &params, &Patch::Apply(&patch))
                    .await?;
                info!(result = %m.result_name, namespace = %m.result_namespace, "made the missing TraceResult again");
            }
            other => {
                other?;
            }
        }
        debug!(result = %m.result_name, nodes = m.coverage.nodes_reported, "wrote the TraceResult");
        Ok(Applied::Written)
    }

    /// The job with this uid still exists (it may be deleting).
    async fn job_exists(&self, job: &JobRef) -> Result<bool, kube::Error> {
        let uid = match (job.kind.as_str(), &job.namespace) {
            ("ClusterTraceJob", _) => Api::<ClusterTraceJob>::all(self.client.clone())
                .get_opt(&job.name)
                .await?
                .and_then(|j| j.metadata.uid),
            (_, Some(ns)) => Api::<TraceJob>::namespaced(self.client.clone(), ns)
                .get_opt(&job.name)
                .await?
                .and_then(|j| j.metadata.uid),
            (_, None) => None,
        };
        Ok(uid.as_deref() == Some(job.uid.as_str()))
    }

    /// Ticks every [`TICK`] until `shutdown`, then writes what is left.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut interval = tokio::time::interval(TICK);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                _ = shutdown.wait_for(|v| *v) => break,
            }
            self.tick(Instant::now()).await;
        }
        // Last chance: pacing does not hold back a write at shutdown.
        self.tick(Instant::now() + WRITE_INTERVAL).await;
    }
}
