//! Reading a job and its TraceResult from the API: a `get` of each, nothing else, so the
//! commands need RBAC `get` on tracejobs (or clustertracejobs) and traceresults only.

use fathom_crds::{
    ClusterTraceJob, TraceJob, TraceJobStatus, TraceResult, TraceResultStatus,
    assignment::{JobRef, result_name},
    job::ResultRef,
};
use kube::{Api, Client};
use serde::Serialize;

use crate::error::{Error, JobName};

/// The resource name RBAC knows the results by.
pub const RESULTS_RESOURCE: &str = "traceresults.fathom.dev";

/// A job's status and its merged result, as the commands show them.
#[derive(Clone, Debug, PartialEq)]
pub struct JobResult {
    pub job: JobName,
    pub status: TraceJobStatus,
    /// Where the TraceResult is (namespace, name).
    pub result_at: (String, String),
    pub result: TraceResultStatus,
}

/// How much of the cluster a result covers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Coverage {
    /// Nodes whose reports are merged in the result.
    pub nodes_reported: u32,
    /// Nodes the job is planned on (its `status.nodes.desired`).
    pub nodes_expected: u32,
}

/// Where hits went that are not in the result.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Loss {
    /// Events the kernel's ring buffer had no room for.
    pub events_lost: u64,
    /// Events dropped in the runners' bounded queues.
    pub events_dropped: u64,
    /// New keys dropped on a full map.
    pub map_full: u64,
    /// Hits dropped by `spec.limits.eventsPerSecond`.
    pub rate_limited: u64,
}

impl Loss {
    pub fn total(&self) -> u64 {
        self.events_lost + self.events_dropped + self.map_full + self.rate_limited
    }
}

impl JobResult {
    pub fn phase(&self) -> &'static str {
        self.status.phase.map_or("Unknown", |p| p.as_str())
    }

    pub fn coverage(&self) -> Coverage {
        Coverage {
            nodes_reported: self.result.nodes,
            nodes_expected: self.status.nodes.as_ref().map_or(0, |n| n.desired),
        }
    }

    pub fn loss(&self) -> Loss {
        let t = &self.result.data.totals;
        Loss {
            events_lost: t.events_lost,
            events_dropped: t.events_dropped,
            map_full: t.map_full,
            rate_limited: t.rate_limited,
        }
    }

    pub fn truncated(&self) -> bool {
        self.result.data.truncated
    }
}

/// Reads `job` and its TraceResult.
pub async fn fetch(client: &Client, job: &JobName) -> Result<JobResult, Error> {
    let status = fetch_job_status(client, job).await?;
    let (namespace, name) = match (&status.result_ref, &job.namespace) {
        (Some(ResultRef { name, namespace }), _) => (namespace.clone(), name.clone()),
        // A TraceJob's result has the job's name in its namespace (crds' result_name).
        (None, Some(ns)) => (
            ns.clone(),
            result_name(&JobRef {
                kind: job.kind().into(),
                name: job.name.clone(),
                namespace: Some(ns.clone()),
                uid: String::new(),
            }),
        ),
        // A ClusterTraceJob's lives in the operator's namespace, which only its status names.
        (None, None) => {
            return Err(Error::ResultNotFound {
                job: job.clone(),
                namespace: "(the operator's namespace)".into(),
                name: result_name(&JobRef {
                    kind: job.kind().into(),
                    name: job.name.clone(),
                    namespace: None,
                    uid: String::new(),
                }),
            });
        }
    };
    let api: Api<TraceResult> = Api::namespaced(client.clone(), &namespace);
    let result = api
        .get_opt(&name)
        .await
        .map_err(|e| Error::from_api(e, "get", RESULTS_RESOURCE, Some(&namespace)))?
        .ok_or_else(|| Error::ResultNotFound {
            job: job.clone(),
            namespace: namespace.clone(),
            name: name.clone(),
        })?;
    Ok(JobResult {
        job: job.clone(),
        status,
        result: result.status.unwrap_or_default(),
        result_at: (namespace, name),
    })
}

/// Reads the job's status (default when the operator has not written one).
async fn fetch_job_status(client: &Client, job: &JobName) -> Result<TraceJobStatus, Error> {
    let found = match &job.namespace {
        Some(ns) => Api::<TraceJob>::namespaced(client.clone(), ns)
            .get_opt(&job.name)
            .await
            .map(|j| j.map(|j| j.status))
            .map_err(|e| Error::from_api(e, "get", "tracejobs.fathom.dev", Some(ns)))?,
        None => Api::<ClusterTraceJob>::all(client.clone())
            .get_opt(&job.name)
            .await
            .map(|j| j.map(|j| j.status))
            .map_err(|e| Error::from_api(e, "get", "clustertracejobs.fathom.dev", None))?,
    };
    match found {
        Some(status) => Ok(status.unwrap_or_default()),
        None => Err(Error::JobNotFound { job: job.clone() }),
    }
}
