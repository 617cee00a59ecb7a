//! The orphan sweep: TraceAssignments whose job no longer exists.
//!
//! Every assignment lives in the operator's namespace, so a TraceJob's assignments cannot
//! carry an ownerReference to it (owners cannot cross namespaces) and the garbage collector
//! does not delete them. The job's finalizer normally does; but a job whose finalizer was
//! removed by hand (force-deleted), or that vanished while the operator was down, leaves its
//! assignments behind — and a runner would keep tracing for them. The sweep deletes every
//! assignment of the operator's namespace whose job (by `spec.job.uid`) is not among the
//! existing TraceJobs and ClusterTraceJobs: once when the controllers start and then at each
//! resync. Deletion goes the usual way: the runner detaches and releases its finalizer; an
//! assignment of a node that is gone is released after the cleanup timeout.

use std::{collections::HashSet, time::Duration};

use fathom_crds::{ClusterTraceJob, TraceAssignment, TraceJob};
use kube::{Api, ResourceExt, api::ListParams};
use tracing::{info, warn};

use crate::{
    error::{Error, Result},
    reconcile::{Context, remove_assignments},
};

/// The assignments whose job is not in `live` (the uids of every existing TraceJob and
/// ClusterTraceJob): those the sweep deletes. An assignment that names no job uid is an orphan
/// too (the operator never writes one).
pub fn orphans<'a>(
    assignments: &'a [TraceAssignment],
    live: &HashSet<String>,
) -> Vec<&'a TraceAssignment> {
    assignments
        .iter()
        .filter(|a| a.spec.job.uid.is_empty() || !live.contains(&a.spec.job.uid))
        .collect()
}

/// What one sweep found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Sweep {
    /// Orphans found (deleted now, or still detaching from an earlier sweep).
    pub orphans: usize,
    /// When to look again because some orphan is still detaching.
    pub requeue_after: Option<Duration>,
}

/// Deletes the assignments of the operator's namespace whose job is gone (see the module).
pub async fn sweep_orphans(ctx: &Context) -> Result<Sweep> {
    let api: Api<TraceAssignment> =
        Api::namespaced(ctx.client.clone(), &ctx.config.operator_namespace);
    // Assignments first, jobs second: a job created between the two lists is in the second,
    // so its fresh assignments are never taken for orphans.
    let assignments = api
        .list(&ListParams::default())
        .await
        .map_err(|e| Error::api("listing TraceAssignments for the orphan sweep", e))?
        .items;
    if assignments.is_empty() {
        return Ok(Sweep::default());
    }
    let mut live: HashSet<String> = HashSet::new();
    let jobs = Api::<TraceJob>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| Error::api("listing TraceJobs for the orphan sweep", e))?;
    live.extend(jobs.items.iter().filter_map(|j| j.uid()));
    let cluster_jobs = Api::<ClusterTraceJob>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| Error::api("listing ClusterTraceJobs for the orphan sweep", e))?;
    live.extend(cluster_jobs.items.iter().filter_map(|j| j.uid()));

    let found: Vec<TraceAssignment> = orphans(&assignments, &live).into_iter().cloned().collect();
    if found.is_empty() {
        return Ok(Sweep::default());
    }
    for a in &found {
        let job = &a.spec.job;
        info!(
            assignment = %a.name_any(),
            node = %a.spec.node_name,
            job_kind = %job.kind,
            job_namespace = job.namespace.as_deref().unwrap_or(""),
            job = %job.name,
            job_uid = %job.uid,
            "the assignment's job no longer exists: deleting it"
        );
    }
    // The job is gone: so is what the operator keeps of it.
    let uids: HashSet<&str> = found.iter().map(|a| a.spec.job.uid.as_str()).collect();
    for uid in uids {
        ctx.metrics.job_state(uid, None);
        if let Some(c) = &ctx.collector {
            c.forget_job(uid);
        }
    }
    let requeue_after = remove_assignments(&api, &found, ctx).await?;
    Ok(Sweep {
        orphans: found.len(),
        requeue_after,
    })
}

/// Sweeps now, then at every `ctx.config.resync` (sooner, but at most every 30 s, while an
/// orphan is still detaching), until `shutdown` fires. A failed sweep is logged and tried again
/// at the next turn.
pub async fn run_sweeper(
    ctx: std::sync::Arc<Context>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let wait = match sweep_orphans(&ctx).await {
            Ok(s) => s.requeue_after.map_or(ctx.config.resync, |r| {
                r.max(Duration::from_secs(30)).min(ctx.config.resync)
            }),
            Err(e) => {
                warn!(error = %e, category = e.category(), "orphan sweep failed");
                ctx.config.resync.min(Duration::from_secs(60))
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.wait_for(|v| *v) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use fathom_crds::{TraceAssignmentSpec, assignment::JobRef};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn assignment(name: &str, job_uid: &str) -> TraceAssignment {
        TraceAssignment {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: TraceAssignmentSpec {
                job: JobRef {
                    kind: "TraceJob".into(),
                    name: "web".into(),
                    namespace: Some("shop".into()),
                    uid: job_uid.into(),
                },
                ..Default::default()
            },
            status: None,
        }
    }

    #[test]
    fn only_assignments_of_jobs_that_are_gone_are_orphans() {
        let all = [
            assignment("a", "live"),
            assignment("b", "gone"),
            assignment("c", ""),
        ];
        let live = HashSet::from(["live".to_string()]);
        let names: Vec<String> = orphans(&all, &live).iter().map(|a| a.name_any()).collect();
        assert_eq!(names, ["b", "c"]);
        assert!(orphans(&all[..1], &live).is_empty());
    }
}
