//! The reconciler: reads a job, its assignments and the cluster caches, asks
//! [`lifecycle::decide`] what to do, and writes only what differs.
//!
//! Writes, each under the field manager [`MANAGER`] (deletes excepted: they take none):
//! - server-side apply for assignments, results and status, without force: when another field
//!   manager owns a field with another value the API server answers 409 and nothing is taken
//!   from it; the conflict is logged, published as a Warning Event `ApplyConflict` on the job,
//!   shown as the job's `ApplyConflict` condition, and retried with a growing backoff;
//! - one finalizer added or removed at a time by a guarded JSON patch ([`crate::finalizers`]);
//! - deletes for stale assignments and for jobs past their TTL.
//!
//! Where things live: every TraceAssignment in the operator's namespace
//! ([`ReconcileConfig::operator_namespace`]), which tenants cannot write — a tenant able to
//! write an assignment could point the privileged runner at any node, pod or the whole node.
//! A TraceJob's TraceResult stays in the job's namespace, where its tenant reads it; a
//! ClusterTraceJob's goes to the operator's namespace. A TraceJob's assignments carry no
//! ownerReference (it cannot cross namespaces): the finalizer deletes them, and
//! [`sweep_orphans`] deletes those whose job went without it (force-deleted).
//!
//! Reconciling an unchanged job makes no mutating call.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Debug,
    sync::{Arc, Mutex},
    time::Duration,
};

use fathom_crds::{
    AssignedPolicy, ClusterTraceJob, TraceAssignment, TraceAssignmentSpec, TraceJob, TraceJobSpec,
    TraceJobStatus, TracePolicy, TraceResult, TraceResultStatus,
    assignment::{
        AssignmentPhase, DETACH_FINALIZER, JOB_KIND_LABEL, JOB_NAME_LABEL, JOB_NAMESPACE_LABEL,
        JOB_UID_LABEL, JobRef, NODE_LABEL, assignment_name, label_value, node_label_value,
        result_name,
    },
    job::{JobPhase, ResultRef},
    policy::POLICY_LABEL,
    result::{ResultData, Totals},
    tenancy,
    trace_result::{Coverage, Loss},
};
use jiff::Timestamp;
use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment, StatefulSet},
        batch::v1::Job,
        core::v1::{Namespace, Node, ObjectReference, Pod, Toleration},
    },
    apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, OwnerReference, Time},
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams},
    core::Selector,
    runtime::{
        controller::Action,
        events::{Event, EventType},
        reflector::Store,
    },
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::json;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{
    collector::{Collector, ExpectedAssignment, JobInfo, merge},
    error::{ApplyConflict, Error, Result},
    finalizers::{Change, change_finalizer},
    lifecycle::{
        self, AssignmentPlan, CleanupSettings, Decision, Intent, JobEvent, Settings, Snapshot,
    },
    metrics::Metrics,
    plan::{ClusterView, PlanInput, Targets, plan_assignments},
};

/// The field manager of every write the operator makes.
pub const MANAGER: &str = "fathom-operator";
/// The finalizer the operator puts on jobs: held until every assignment is gone.
pub const JOB_FINALIZER: &str = "fathom.dev/cleanup";
/// The job's condition (True while some apply is refused by a field-manager conflict), and the
/// reason of the Warning Event that reports a new conflict.
pub const APPLY_CONFLICT: &str = "ApplyConflict";
/// The first retry after an apply conflict; each further one in a row waits twice as long…
pub const CONFLICT_BACKOFF_START: Duration = Duration::from_secs(1);
/// …up to this.
pub const CONFLICT_BACKOFF_MAX: Duration = Duration::from_secs(300);

/// A TraceJob or a ClusterTraceJob.
pub trait JobObject:
    Resource<DynamicType = ()> + Clone + Serialize + DeserializeOwned + Debug + Send + Sync + 'static
{
    const KIND: &'static str;
    fn trace(&self) -> &TraceJobSpec;
    fn job_status(&self) -> Option<&TraceJobStatus>;
    /// The API of this kind, in `namespace` for a TraceJob.
    fn api(client: Client, namespace: Option<&str>) -> Api<Self>;
    fn is_cluster() -> bool;
}

impl JobObject for TraceJob {
    const KIND: &'static str = "TraceJob";
    fn trace(&self) -> &TraceJobSpec {
        &self.spec.0
    }
    fn job_status(&self) -> Option<&TraceJobStatus> {
        self.status.as_ref()
    }
    fn api(client: Client, namespace: Option<&str>) -> Api<Self> {
        Api::namespaced(client, namespace.unwrap_or("default"))
    }
    fn is_cluster() -> bool {
        false
    }
}

impl JobObject for ClusterTraceJob {
    const KIND: &'static str = "ClusterTraceJob";
    fn trace(&self) -> &TraceJobSpec {
        &self.spec.0
    }
    fn job_status(&self) -> Option<&TraceJobStatus> {
        self.status.as_ref()
    }
    fn api(client: Client, _namespace: Option<&str>) -> Api<Self> {
        Api::all(client)
    }
    fn is_cluster() -> bool {
        true
    }
}

/// Where "now" comes from: the wall clock, or a test's hand.
pub trait Clock: Send + Sync {
    fn now(&self) -> Timestamp;
}

/// The wall clock, to the second (the precision of Kubernetes timestamps).
#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_second(Timestamp::now().as_second()).unwrap_or(Timestamp::UNIX_EPOCH)
    }
}

/// How the reconciler behaves.
#[derive(Clone, Debug)]
pub struct ReconcileConfig {
    /// Where every TraceAssignment goes (of TraceJobs and ClusterTraceJobs alike), and the
    /// TraceResults of ClusterTraceJobs.
    pub operator_namespace: String,
    /// The runner DaemonSet's tolerations (the DaemonSet controller's defaults included).
    pub runner_tolerations: Vec<Toleration>,
    pub lifecycle: Settings,
    pub cleanup: CleanupSettings,
    /// Look at every job at least this often.
    pub resync: Duration,
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        ReconcileConfig {
            operator_namespace: "fathom-system".into(),
            runner_tolerations: crate::plan::daemonset_default_tolerations(),
            lifecycle: Settings::default(),
            cleanup: CleanupSettings::default(),
            resync: Duration::from_secs(300),
        }
    }
}

/// Publishes Kubernetes Events: [`crate::events::EventRecorder`], which writes them under
/// [`MANAGER`] (kube-runtime's `Recorder` names no field manager, so it is not one).
pub trait EventSink: Send + Sync {
    fn publish<'a>(
        &'a self,
        event: Event,
        reference: ObjectReference,
    ) -> futures::future::BoxFuture<'a, Result<(), kube::Error>>;
}

/// Per job (by uid): how many reconciles in a row met apply conflicts, and the conflicts last
/// reported, so that a conflict is published once and retried with a growing backoff.
#[derive(Debug, Default)]
pub struct ConflictBackoff(Mutex<HashMap<String, (u32, String)>>);

impl ConflictBackoff {
    /// Records a reconcile of job `uid` that met the conflicts `message` describes: returns the
    /// delay before the next try, and whether `message` differs from the last one reported.
    pub fn hit(&self, uid: &str, message: &str) -> (Duration, bool) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let entry = map.entry(uid.to_string()).or_insert((0, String::new()));
        let delay = CONFLICT_BACKOFF_START
            .saturating_mul(1u32 << entry.0.min(16))
            .min(CONFLICT_BACKOFF_MAX);
        entry.0 = entry.0.saturating_add(1);
        let new = entry.1 != message;
        entry.1 = message.to_string();
        (delay, new)
    }

    /// Forgets job `uid`: a reconcile met no conflict, or the job is gone.
    pub fn clear(&self, uid: &str) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(uid);
    }
}

/// What a reconcile needs.
pub struct Context {
    pub client: Client,
    pub nodes: Store<Node>,
    pub pods: Store<Pod>,
    pub config: ReconcileConfig,
    pub events: Box<dyn EventSink>,
    pub metrics: Arc<Metrics>,
    pub clock: Arc<dyn Clock>,
    pub conflicts: ConflictBackoff,
    /// The collector, told of each job's assignments; `None` where no collector runs.
    pub collector: Option<Arc<Collector>>,
}

impl Context {
    fn now(&self) -> Timestamp {
        self.clock.now()
    }

    fn node_ready(&self, name: &str) -> bool {
        self.nodes
            .get(&kube::runtime::reflector::ObjectRef::new(name))
            .is_some_and(|n| {
                n.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
    }
}

/// Reconciles one job: the entry point for the controller and the tests.
pub async fn reconcile<K: JobObject>(job: Arc<K>, ctx: Arc<Context>) -> Result<Action> {
    let started = std::time::Instant::now();
    let span = info_span!(
        "reconcile",
        kind = K::KIND,
        job = %job.name_any(),
        namespace = job.namespace().unwrap_or_default(),
    );
    let result = reconcile_job(job.as_ref(), &ctx).instrument(span).await;
    ctx.metrics.reconciled(K::KIND, started.elapsed());
    if let Err(e) = &result {
        ctx.metrics.failed(K::KIND, e.category());
    }
    result
}

/// What the controller does after a failed reconcile: retry soon, and say why.
pub fn error_policy<K: JobObject>(job: Arc<K>, error: &Error, _ctx: Arc<Context>) -> Action {
    warn!(kind = K::KIND, job = %job.name_any(), category = error.category(), %error, "reconcile failed");
    Action::requeue(Duration::from_secs(if error.category() == "Conflict" {
        1
    } else {
        10
    }))
}

struct JobIds {
    name: String,
    namespace: Option<String>,
    uid: String,
    generation: i64,
    job_ref: JobRef,
    /// Where the job's assignments live: always the operator's namespace.
    assignment_ns: String,
    /// Where the job's TraceResult lives: the job's namespace for a TraceJob, the operator's
    /// for a ClusterTraceJob.
    result_ns: String,
}

fn ids<K: JobObject>(job: &K, ctx: &Context) -> Result<JobIds> {
    let name = job
        .meta()
        .name
        .clone()
        .ok_or_else(|| Error::MissingField(K::KIND.into(), "metadata.name"))?;
    let namespace = if K::is_cluster() {
        None
    } else {
        Some(job.meta().namespace.clone().ok_or_else(|| {
            Error::MissingField(format!("{} {name}", K::KIND), "metadata.namespace")
        })?)
    };
    let uid = job
        .meta()
        .uid
        .clone()
        .ok_or_else(|| Error::MissingField(format!("{} {name}", K::KIND), "metadata.uid"))?;
    let result_ns = namespace
        .clone()
        .unwrap_or_else(|| ctx.config.operator_namespace.clone());
    Ok(JobIds {
        job_ref: JobRef {
            kind: K::KIND.into(),
            name: name.clone(),
            namespace: namespace.clone(),
            uid: uid.clone(),
        },
        generation: job.meta().generation.unwrap_or(0),
        name,
        namespace,
        uid,
        assignment_ns: ctx.config.operator_namespace.clone(),
        result_ns,
    })
}

async fn reconcile_job<K: JobObject>(job: &K, ctx: &Context) -> Result<Action> {
    let id = ids(job, ctx)?;
    let assignments_api: Api<TraceAssignment> =
        Api::namespaced(ctx.client.clone(), &id.assignment_ns);
    let existing = assignments_api
        .list(&ListParams::default().labels(&format!("{JOB_UID_LABEL}={}", id.uid)))
        .await
        .map_err(|e| Error::api("listing the job's TraceAssignments", e))?
        .items;

    if job.meta().deletion_timestamp.is_some() {
        if let Some(c) = &ctx.collector {
            c.forget_job(&id.uid);
        }
        return finalize(job, &id, existing, ctx).await;
    }

    // The finalizer goes on before the first assignment exists.
    let jobs = K::api(ctx.client.clone(), id.namespace.as_deref());
    if change_finalizer(&jobs, job, Change::Add, JOB_FINALIZER).await? {
        ctx.metrics.wrote("patch", K::KIND);
    }

    let spec = job.trace();
    let now = ctx.now();
    let result_ref = ResultRef {
        name: result_name(&id.job_ref),
        namespace: id.result_ns.clone(),
    };
    // The lifecycle never sees the conflict condition: it is this function's to set or clear.
    let old_status = job.job_status().cloned().unwrap_or_default();
    let seen_status = job.job_status().map(without_conflict);
    let snapshot = Snapshot {
        generation: id.generation,
        status: seen_status.as_ref(),
        suspend: spec.suspend == Some(true),
        dry_run: spec.dry_run == Some(true),
        ttl_seconds_after_finished: spec.ttl_seconds_after_finished,
        result_ref: result_ref.clone(),
    };

    let nodes = ctx.nodes.state();
    let pods = ctx.pods.state();
    let view = ClusterView::new(
        nodes.iter().map(|n| n.as_ref()),
        pods.iter().map(|p| p.as_ref()),
        &ctx.config.runner_tolerations,
    );
    let workload = resolve_workload(spec, id.namespace.as_deref(), &ctx.client).await?;
    // A ClusterTraceJob's ids have no namespace: its tenancy is `Tenancy::Cluster`.
    let tenancy = tenancy_in(id.namespace.as_deref(), &ctx.client).await?;
    let intent = admit(spec, id.namespace.as_deref(), &tenancy, workload, &view);
    let decision = lifecycle::decide(&snapshot, intent, &existing, now, &ctx.config.lifecycle);
    debug!(phase = ?decision.status.phase, run = ?decision.status.run, "decided");
    if let (Some(c), Some(info)) = (&ctx.collector, job_info(spec, &id, &decision, &existing)) {
        c.set_job(info);
    }

    let mut requeue = Some(ctx.config.resync);
    let mut conflicts = Vec::new();
    let run = decision.status.run.unwrap_or(1);
    if let AssignmentPlan::Set {
        desired,
        suspend,
        deadline,
    } = &decision.assignments
    {
        let wanted: Vec<TraceAssignment> = desired
            .iter()
            .map(|d| {
                let policy = tenancy.policy();
                build_assignment::<K>(&id, spec, policy, run, d, *suspend, deadline.clone())
            })
            .collect();
        let r = sync_assignments(&assignments_api, &existing, &wanted, &mut conflicts, ctx).await?;
        requeue = min_duration(requeue, r);
    }

    sync_result::<K>(job, &id, &decision, &existing, &mut conflicts, ctx).await?;

    let status = with_conflicts(
        decision.status.clone(),
        &old_status,
        &conflicts,
        id.generation,
        now,
    );
    if status != old_status {
        match write_status::<K>(&id, &status, ctx).await {
            Ok(()) => {}
            Err(Error::ApplyConflict(c)) => conflicts.push(c),
            Err(e) => return Err(e),
        }
    }
    publish_events::<K>(job, &decision.events, ctx).await;
    requeue = min_duration(requeue, report_conflicts(job, &id, &conflicts, ctx).await);
    let phase = decision.status.phase;
    let active = matches!(phase, Some(JobPhase::Pending | JobPhase::Running));
    let assigned = match &decision.assignments {
        AssignmentPlan::Set { desired, .. } if active => desired.len() as i64,
        _ => 0,
    };
    ctx.metrics
        .job_state(&id.uid, Some((K::KIND, active, assigned)));

    if decision.delete_job {
        info!("ttlSecondsAfterFinished ran out: deleting the job");
        match K::api(ctx.client.clone(), id.namespace.as_deref())
            .delete(&id.name, &DeleteParams::background())
            .await
        {
            Ok(_) => ctx.metrics.wrote("delete", K::KIND),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(Error::api("deleting the finished job (TTL)", e)),
        }
        return Ok(Action::await_change());
    }
    requeue = min_duration(requeue, decision.requeue_after);
    Ok(requeue.map_or_else(Action::await_change, Action::requeue))
}

fn min_duration(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

/// The selector of `spec.targetRef`'s workload: Ok(None) without targetRef, Err(message)
/// when the workload cannot be read.
pub type Workload = Option<Result<LabelSelector, String>>;

/// Reads the selector of `spec.targetRef`'s workload in `namespace` (a `get` of it).
pub async fn resolve_workload(
    spec: &TraceJobSpec,
    namespace: Option<&str>,
    client: &Client,
) -> Result<Workload> {
    let (Some(target), Some(ns)) = (&spec.target_ref, namespace) else {
        return Ok(None);
    };
    async fn selector_of<W>(
        api: Api<W>,
        name: &str,
        get: fn(&W) -> Option<LabelSelector>,
    ) -> Result<Workload>
    where
        W: Resource + Clone + DeserializeOwned + Debug,
    {
        match api.get_opt(name).await {
            Ok(Some(w)) => Ok(Some(
                get(&w).ok_or_else(|| "the workload has no selector".to_string()),
            )),
            Ok(None) => Ok(Some(Err("not found".into()))),
            Err(e) => Err(Error::api(format!("reading the workload {name}"), e)),
        }
    }
    let c = client.clone();
    let name = target.name.as_str();
    match target.kind.as_str() {
        "Deployment" => {
            selector_of(Api::<Deployment>::namespaced(c, ns), name, |w| {
                w.spec.as_ref().map(|s| s.selector.clone())
            })
            .await
        }
        "StatefulSet" => {
            selector_of(Api::<StatefulSet>::namespaced(c, ns), name, |w| {
                w.spec.as_ref().map(|s| s.selector.clone())
            })
            .await
        }
        "DaemonSet" => {
            selector_of(Api::<DaemonSet>::namespaced(c, ns), name, |w| {
                w.spec.as_ref().map(|s| s.selector.clone())
            })
            .await
        }
        "Job" => {
            selector_of(Api::<Job>::namespaced(c, ns), name, |w| {
                w.spec.as_ref().and_then(|s| s.selector.clone())
            })
            .await
        }
        // An unknown kind fails validation before targets matter.
        _ => Ok(None),
    }
}

/// Which tenant rules hold for a job (docs/tenancy.md).
#[derive(Clone, Debug, PartialEq)]
pub enum Tenancy {
    /// A ClusterTraceJob: none.
    Cluster,
    /// A TraceJob: the defaults, or the TracePolicy its namespace names.
    Namespace(Option<AssignedPolicy>),
    /// A TraceJob whose namespace names a TracePolicy that does not exist (the refusal).
    MissingPolicy(String),
}

impl Tenancy {
    /// The TracePolicy the job's assignments carry to the runners.
    pub fn policy(&self) -> Option<&AssignedPolicy> {
        match self {
            Tenancy::Namespace(p) => p.as_ref(),
            Tenancy::Cluster | Tenancy::MissingPolicy(_) => None,
        }
    }
}

/// The tenancy of a TraceJob in `namespace` (`None`: a ClusterTraceJob): the namespace's
/// label [`POLICY_LABEL`] names its TracePolicy. A Namespace that cannot be found (it is
/// being deleted) has the defaults.
pub async fn tenancy_in(namespace: Option<&str>, client: &Client) -> Result<Tenancy> {
    let Some(ns) = namespace else {
        return Ok(Tenancy::Cluster);
    };
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let named = namespaces
        .get_opt(ns)
        .await
        .map_err(|e| Error::api("reading the job's Namespace", e))?
        .and_then(|n| n.labels().get(POLICY_LABEL).cloned());
    let Some(name) = named else {
        return Ok(Tenancy::Namespace(None));
    };
    let policies: Api<TracePolicy> = Api::all(client.clone());
    let policy = policies
        .get_opt(&name)
        .await
        .map_err(|e| Error::api("reading the namespace's TracePolicy", e))?;
    Ok(match policy {
        Some(p) => Tenancy::Namespace(Some(AssignedPolicy { name, spec: p.spec })),
        None => Tenancy::MissingPolicy(tenancy::missing_policy_message(ns, &name)),
    })
}

/// The operator's admission of a spec (what the lifecycle works with: errors, a rejection, or
/// a plan): the shared validation, the tenant rules, then what only a cluster can check (scope of the kind, selectors, the workload), then the plan.
pub fn admit<'a>(
    spec: &TraceJobSpec,
    namespace: Option<&str>,
    tenancy: &Tenancy,
    workload: Workload,
    view: &'a ClusterView<'a>,
) -> Intent<'a> {
    let checked = match spec.validate() {
        Ok(c) => c,
        Err(errors) => return Intent::Invalid(errors),
    };
    let cluster = *tenancy == Tenancy::Cluster;
    let refused = match tenancy {
        Tenancy::Cluster => Vec::new(),
        Tenancy::MissingPolicy(why) => return Intent::Rejected("PolicyDenied", why.clone()),
        // The chart's admission policies refuse these; this holds where they did not run.
        Tenancy::Namespace(None) => spec.tenant_refusals(),
        Tenancy::Namespace(Some(p)) => spec.tenant_refusals_under(&p.name, &p.spec),
    };
    if !refused.is_empty() {
        let all: Vec<String> = refused.iter().map(ToString::to_string).collect();
        return Intent::Rejected("PolicyDenied", all.join("; "));
    }
    let targets = match (&spec.pod_selector, &spec.target_ref) {
        (Some(_), Some(_)) => {
            return Intent::Rejected(
                "InvalidSpec",
                "spec.podSelector and spec.targetRef are both set; set one".into(),
            );
        }
        (None, None) if !cluster => {
            return Intent::Rejected(
                "NodeWideNeedsClusterTraceJob",
                "a TraceJob traces only pods of its namespace: set spec.podSelector or spec.targetRef; tracing whole nodes needs a ClusterTraceJob".into(),
            );
        }
        (None, None) => Targets::NodeWide,
        (Some(sel), None) => match Selector::try_from(sel.clone()) {
            Ok(s) => Targets::Pods(s),
            Err(e) => {
                return Intent::Rejected("InvalidSelector", format!("spec.podSelector: {e}"));
            }
        },
        (None, Some(t)) if cluster => {
            return Intent::Rejected(
                "TargetRefNeedsNamespace",
                format!(
                    "spec.targetRef names a {} of a namespace: use a TraceJob in that namespace, or a podSelector",
                    t.kind
                ),
            );
        }
        (None, Some(t)) => match workload {
            Some(Ok(sel)) => match Selector::try_from(sel) {
                Ok(s) => Targets::Pods(s),
                Err(e) => {
                    return Intent::Rejected(
                        "InvalidSelector",
                        format!("the selector of {} {}: {e}", t.kind, t.name),
                    );
                }
            },
            Some(Err(why)) => {
                return Intent::Waiting("TargetNotFound", format!("{} {}: {why}", t.kind, t.name));
            }
            None => {
                return Intent::Waiting(
                    "TargetNotFound",
                    format!("{} {}: not looked up", t.kind, t.name),
                );
            }
        },
    };
    let input = PlanInput {
        namespace: if cluster { None } else { namespace },
        node_selector: spec.node_selector.as_ref(),
        targets,
    };
    Intent::Planned {
        plan: plan_assignments(&input, view),
        probe: checked.probe.display_name(),
        duration: checked.duration,
    }
}

fn owner_reference<K: JobObject>(id: &JobIds) -> OwnerReference {
    OwnerReference {
        api_version: K::api_version(&()).into_owned(),
        kind: K::KIND.into(),
        name: id.name.clone(),
        uid: id.uid.clone(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// The labels of a job's objects: its uid, name, kind and namespace (for a TraceJob), and the
/// node for an assignment.
fn labels(id: &JobIds, node: Option<&str>) -> BTreeMap<String, String> {
    let mut l = BTreeMap::from([
        (JOB_UID_LABEL.to_string(), id.uid.clone()),
        (JOB_NAME_LABEL.to_string(), label_value(&id.name)),
        (JOB_KIND_LABEL.to_string(), id.job_ref.kind.clone()),
        (
            "app.kubernetes.io/managed-by".to_string(),
            MANAGER.to_string(),
        ),
    ]);
    if let Some(ns) = &id.namespace {
        // A namespace name is a DNS label: at most 63 characters, a valid label value.
        l.insert(JOB_NAMESPACE_LABEL.to_string(), ns.clone());
    }
    if let Some(node) = node {
        l.insert(NODE_LABEL.to_string(), node_label_value(node));
    }
    l
}

fn build_assignment<K: JobObject>(
    id: &JobIds,
    spec: &TraceJobSpec,
    policy: Option<&AssignedPolicy>,
    run: i64,
    d: &lifecycle::Desired,
    suspend: bool,
    deadline: Option<Time>,
) -> TraceAssignment {
    let name = assignment_name(&id.job_ref, &d.node);
    let mut a = TraceAssignment::new(
        &name,
        TraceAssignmentSpec {
            job: id.job_ref.clone(),
            run,
            node_name: d.node.clone(),
            trace: spec.clone(),
            node_wide: d.node_wide,
            target_pods: d.target_pods.clone(),
            deadline,
            suspend,
            policy: policy.cloned(),
        },
    );
    a.metadata.namespace = Some(id.assignment_ns.clone());
    a.metadata.labels = Some(labels(id, Some(&d.node)));
    // An ownerReference cannot cross namespaces: only a cluster-scoped job (a
    // ClusterTraceJob) may own an object of the operator's namespace. A TraceJob's
    // assignments are deleted by its finalizer, or by the orphan sweep.
    if K::is_cluster() {
        a.metadata.owner_references = Some(vec![owner_reference::<K>(id)]);
    }
    a.metadata.finalizers = Some(vec![DETACH_FINALIZER.to_string()]);
    a
}

/// Server-side applies `patch` to `name` (its status when `status`) under [`MANAGER`] without
/// force: a field another manager owns with another value is not taken, and the API server's
/// 409 comes back as [`Error::ApplyConflict`] naming the managers and fields. `what` names the
/// object, e.g. `TraceAssignment shop/web-drops-1a2b`.
async fn apply<T>(
    api: &Api<T>,
    name: &str,
    status: bool,
    patch: &(impl Serialize + Debug),
    what: &str,
) -> Result<()>
where
    T: Resource + Clone + DeserializeOwned + Debug,
{
    let params = PatchParams::apply(MANAGER);
    let patch = Patch::Apply(patch);
    let written = if status {
        api.patch_status(name, &params, &patch).await.map(drop)
    } else {
        api.patch(name, &params, &patch).await.map(drop)
    };
    match written {
        Ok(()) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => {
            Err(Error::ApplyConflict(ApplyConflict::from_status(what, &s)))
        }
        Err(e) => Err(Error::api(format!("applying {what}"), e)),
    }
}

/// `status` without the [`APPLY_CONFLICT`] condition.
fn without_conflict(status: &TraceJobStatus) -> TraceJobStatus {
    let mut s = status.clone();
    s.conditions.retain(|c| c.type_ != APPLY_CONFLICT);
    s
}

/// The decided status with the [`APPLY_CONFLICT`] condition while some applies are refused
/// (its `lastTransitionTime` kept while it stays), and without it once none is.
fn with_conflicts(
    mut status: TraceJobStatus,
    old: &TraceJobStatus,
    conflicts: &[ApplyConflict],
    generation: i64,
    now: Timestamp,
) -> TraceJobStatus {
    status.conditions.retain(|c| c.type_ != APPLY_CONFLICT);
    if conflicts.is_empty() {
        return status;
    }
    let since = old
        .condition(APPLY_CONFLICT)
        .filter(|c| c.status == "True")
        .map_or_else(
            || Time(Timestamp::from_second(now.as_second()).unwrap_or(now)),
            |c| c.last_transition_time.clone(),
        );
    status.conditions.push(Condition {
        type_: APPLY_CONFLICT.into(),
        status: "True".into(),
        reason: "FieldManagerConflict".into(),
        message: conflicts_message(conflicts),
        observed_generation: Some(generation),
        last_transition_time: since,
    });
    status
}

/// One line about the refused applies (the first [`lifecycle::LIST_LIMIT`]), at most 1000
/// bytes.
fn conflicts_message(conflicts: &[ApplyConflict]) -> String {
    let mut parts: Vec<String> = conflicts
        .iter()
        .take(lifecycle::LIST_LIMIT)
        .map(ToString::to_string)
        .collect();
    if conflicts.len() > lifecycle::LIST_LIMIT {
        parts.push(format!(
            "and {} more",
            conflicts.len() - lifecycle::LIST_LIMIT
        ));
    }
    // An Event's note may not pass 1 KiB.
    lifecycle::cut(parts.join("; "), 1000)
}

/// Says which applies were refused — in the log each time, as a Warning Event on the job when
/// the conflicts are new — and returns when to try again: a backoff that doubles while
/// conflicts last. None (and the backoff reset) when there were none.
async fn report_conflicts<K: JobObject>(
    job: &K,
    id: &JobIds,
    conflicts: &[ApplyConflict],
    ctx: &Context,
) -> Option<Duration> {
    if conflicts.is_empty() {
        ctx.conflicts.clear(&id.uid);
        return None;
    }
    for c in conflicts {
        warn!(object = %c.object, managers = ?c.managers, fields = ?c.fields, "apply refused: another field manager owns these fields; not overwriting");
    }
    let message = conflicts_message(conflicts);
    let (delay, new) = ctx.conflicts.hit(&id.uid, &message);
    if new {
        let event = JobEvent {
            warning: true,
            reason: APPLY_CONFLICT,
            note: message,
        };
        publish_events(job, std::slice::from_ref(&event), ctx).await;
    }
    Some(delay)
}

/// Whether `existing` already is what `wanted` asks for (so no write is needed).
fn up_to_date(existing: &TraceAssignment, wanted: &TraceAssignment) -> bool {
    let has = |l: &Option<BTreeMap<String, String>>, k: &str, v: &str| {
        l.as_ref().and_then(|m| m.get(k)).map(String::as_str) == Some(v)
    };
    existing.spec == wanted.spec
        && wanted
            .metadata
            .labels
            .iter()
            .flatten()
            .all(|(k, v)| has(&existing.metadata.labels, k, v))
        && wanted.metadata.owner_references.iter().flatten().all(|w| {
            existing
                .metadata
                .owner_references
                .iter()
                .flatten()
                .any(|o| o.uid == w.uid && o.controller == Some(true))
        })
        && existing
            .metadata
            .finalizers
            .iter()
            .flatten()
            .any(|f| f == DETACH_FINALIZER)
}

/// Applies what is missing or different, deletes what is not wanted, and releases
/// terminating assignments whose node is gone after the timeout. An apply refused by a
/// field-manager conflict goes to `conflicts`, and the others go on.
async fn sync_assignments(
    api: &Api<TraceAssignment>,
    existing: &[TraceAssignment],
    wanted: &[TraceAssignment],
    conflicts: &mut Vec<ApplyConflict>,
    ctx: &Context,
) -> Result<Option<Duration>> {
    let by_name: BTreeMap<&str, &TraceAssignment> = existing
        .iter()
        .filter_map(|a| a.metadata.name.as_deref().map(|n| (n, a)))
        .collect();
    for w in wanted {
        let name = w.metadata.name.as_deref().unwrap_or_default();
        match by_name.get(name) {
            Some(e) if e.metadata.deletion_timestamp.is_some() => {
                // Still detaching from an earlier removal; re-created once it is gone.
                continue;
            }
            Some(e) if up_to_date(e, w) => continue,
            _ => {}
        }
        let what = format!(
            "TraceAssignment {}/{name}",
            w.metadata.namespace.as_deref().unwrap_or_default()
        );
        match apply(api, name, false, w, &what).await {
            Ok(()) => {
                ctx.metrics.wrote("apply", "TraceAssignment");
                debug!(assignment = name, node = %w.spec.node_name, "applied");
            }
            Err(Error::ApplyConflict(c)) => conflicts.push(c),
            Err(e) => return Err(e),
        }
    }
    let wanted_names: Vec<&str> = wanted
        .iter()
        .filter_map(|w| w.metadata.name.as_deref())
        .collect();
    let stale: Vec<TraceAssignment> = existing
        .iter()
        .filter(|e| !wanted_names.contains(&e.metadata.name.as_deref().unwrap_or_default()))
        .cloned()
        .collect();
    remove_assignments(api, &stale, ctx).await
}

/// Deletes assignments and releases the terminating ones that may be released; returns when
/// to look again if some are still detaching.
pub(crate) async fn remove_assignments(
    api: &Api<TraceAssignment>,
    assignments: &[TraceAssignment],
    ctx: &Context,
) -> Result<Option<Duration>> {
    if assignments.is_empty() {
        return Ok(None);
    }
    let step = lifecycle::decide_cleanup(
        assignments,
        |n| ctx.node_ready(n),
        ctx.now(),
        &ctx.config.cleanup,
    );
    for name in &step.delete {
        match api.delete(name, &DeleteParams::background()).await {
            Ok(_) => ctx.metrics.wrote("delete", "TraceAssignment"),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(Error::api(format!("deleting TraceAssignment {name}"), e)),
        }
        debug!(assignment = %name, "deleted");
    }
    for name in &step.release {
        let Some(a) = assignments
            .iter()
            .find(|a| a.metadata.name.as_deref() == Some(name.as_str()))
        else {
            continue;
        };
        warn!(assignment = %name, node = %a.spec.node_name, "node did not confirm detaching in time: releasing its assignment");
        if change_finalizer(api, a, Change::Remove, DETACH_FINALIZER).await? {
            ctx.metrics.wrote("patch", "TraceAssignment");
        }
    }
    Ok(step.requeue_after)
}

/// The job is being deleted: delete its assignments, wait for runners to detach (or the
/// timeouts), write the final status, then let the job go.
async fn finalize<K: JobObject>(
    job: &K,
    id: &JobIds,
    existing: Vec<TraceAssignment>,
    ctx: &Context,
) -> Result<Action> {
    ctx.metrics.job_state(&id.uid, None);
    if !job.finalizers().iter().any(|f| f == JOB_FINALIZER) {
        ctx.conflicts.clear(&id.uid);
        return Ok(Action::await_change());
    }
    let api: Api<TraceAssignment> = Api::namespaced(ctx.client.clone(), &id.assignment_ns);
    let step = lifecycle::decide_cleanup(
        &existing,
        |n| ctx.node_ready(n),
        ctx.now(),
        &ctx.config.cleanup,
    );
    let requeue = remove_assignments(&api, &existing, ctx).await?;

    let old = job.job_status().cloned().unwrap_or_default();
    let mut status = old.clone();
    let (message, ready_reason) = if step.done {
        ("deleted: every node has detached".to_string(), "Deleted")
    } else {
        let mut nodes = step.waiting.clone();
        if nodes.is_empty() {
            nodes = existing.iter().map(|a| a.spec.node_name.clone()).collect();
            nodes.sort();
        }
        (
            format!(
                "deleting: waiting for {} node(s) to detach: {}",
                existing.len(),
                nodes
                    .iter()
                    .take(lifecycle::LIST_LIMIT)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            "Deleting",
        )
    };
    status.message = Some(message.clone());
    let mut conditions: Vec<_> = old
        .conditions
        .iter()
        // A deleted job applies nothing more, so an earlier conflict is over.
        .filter(|c| c.type_ != lifecycle::READY && c.type_ != APPLY_CONFLICT)
        .cloned()
        .collect();
    conditions.insert(
        0,
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
            type_: lifecycle::READY.into(),
            status: "False".into(),
            reason: ready_reason.into(),
            message,
            observed_generation: Some(id.generation),
            last_transition_time: Time(ctx.now()),
        },
    );
    status.conditions = lifecycle::merge_conditions(&old.conditions, conditions);
    let mut conflicts = Vec::new();
    if status != old {
        // The final status is written before the finalizer goes — unless another field
        // manager owns those fields: then nothing is overwritten, and as the job is about to
        // go, its deletion does not wait for that conflict.
        match write_status::<K>(id, &status, ctx).await {
            Ok(()) => {}
            Err(Error::ApplyConflict(c)) => conflicts.push(c),
            Err(e) if e.is_not_found() => return Ok(Action::await_change()),
            Err(e) => return Err(e),
        }
    }
    let backoff = report_conflicts(job, id, &conflicts, ctx).await;
    if !step.done {
        let after = min_duration(requeue, backoff).unwrap_or(Duration::from_secs(5));
        return Ok(Action::requeue(after));
    }
    let jobs = K::api(ctx.client.clone(), id.namespace.as_deref());
    if change_finalizer(&jobs, job, Change::Remove, JOB_FINALIZER).await? {
        ctx.metrics.wrote("patch", K::KIND);
    }
    ctx.conflicts.clear(&id.uid);
    info!("every node detached: finalizer removed");
    Ok(Action::await_change())
}

async fn write_status<K: JobObject>(
    id: &JobIds,
    status: &TraceJobStatus,
    ctx: &Context,
) -> Result<()> {
    let patch = json!({
        "apiVersion": K::api_version(&()),
        "kind": K::KIND,
        "status": status,
    });
    let what = match &id.namespace {
        Some(ns) => format!("{} {ns}/{} status", K::KIND, id.name),
        None => format!("{} {} status", K::KIND, id.name),
    };
    apply(
        &K::api(ctx.client.clone(), id.namespace.as_deref()),
        &id.name,
        true,
        &patch,
        &what,
    )
    .await?;
    ctx.metrics.wrote("apply-status", K::KIND);
    Ok(())
}

/// Keeps the job's TraceResult: created with the job, its totals summed from the runners'
/// counters of the current run. (Rows come from the collector's merged reports.) An apply
/// refused by a field-manager conflict goes to `conflicts`.
async fn sync_result<K: JobObject>(
    job: &K,
    id: &JobIds,
    decision: &Decision,
    assignments: &[TraceAssignment],
    conflicts: &mut Vec<ApplyConflict>,
    ctx: &Context,
) -> Result<()> {
    let Some(run) = decision.status.run else {
        return Ok(());
    };
    let name = result_name(&id.job_ref);
    let api: Api<TraceResult> = Api::namespaced(ctx.client.clone(), &id.result_ns);
    let existing = api
        .get_opt(&name)
        .await
        .map_err(|e| Error::api(format!("reading TraceResult {name}"), e))?;
    // The same object the collector's writer makes again when it went missing.
    let wanted = crate::collector::pacing::result_object(&id.job_ref, &id.result_ns, &name);
    let needs_object = match &existing {
        None => true,
        Some(e) => e.spec != wanted.spec || !e.owner_references().iter().any(|o| o.uid == id.uid),
    };
    let what = format!("TraceResult {}/{name}", id.result_ns);
    if needs_object {
        match apply(&api, &name, false, &wanted, &what).await {
            Ok(()) => ctx.metrics.wrote("apply", "TraceResult"),
            Err(Error::ApplyConflict(c)) => conflicts.push(c),
            Err(e) => return Err(e),
        }
    }

    let mut totals = Totals::default();
    let mut nodes = 0u32;
    let mut expected = 0u32;
    let (mut finished, mut failed) = (0u32, 0u32);
    let mut updated: Option<Time> = None;
    for a in assignments.iter().filter(|a| a.spec.run == run) {
        expected += 1;
        let Some(s) = a.status.as_ref().filter(|s| s.run == Some(run)) else {
            continue;
        };
        nodes += 1;
        match s.phase {
            Some(AssignmentPhase::Succeeded | AssignmentPhase::Stopped) => finished += 1,
            Some(AssignmentPhase::Failed | AssignmentPhase::NotFeasible) => failed += 1,
            _ => {}
        }
        let c = &s.counters;
        totals.hits += c.hits;
        totals.distinct_keys += c.distinct_keys;
        totals.events_emitted += c.events_emitted;
        totals.events_delivered += c.events_delivered;
        totals.events_lost += c.events_lost;
        totals.events_dropped += c.events_dropped;
        totals.map_full += c.map_full;
        totals.rate_limited += c.rate_limited;
        totals.stack_errors += c.stack_errors;
        totals.unpaired += c.unpaired;
        totals.filtered += c.filtered;
        if let Some(t) = &s.last_report_time
            && updated.as_ref().is_none_or(|u| u.0 < t.0)
        {
            updated = Some(t.clone());
        }
    }
    if ctx
        .collector
        .as_ref()
        .is_some_and(|c| c.has_reports(&id.uid, run as u64))
    {
        // The collector merges the runners' reports of this run and writes the status.
        return Ok(());
    }
    let old = existing.as_ref().and_then(|e| e.status.clone());
    let mut data = old
        .as_ref()
        .filter(|o| o.run == Some(run))
        .map(|o| o.data.clone())
        .unwrap_or_else(|| ResultData {
            probe: decision.status.probe.clone().unwrap_or_default(),
            value: job.trace().value_label(),
            keys: job
                .trace()
                .aggregate
                .as_ref()
                .map(|a| a.by.clone())
                .unwrap_or_default(),
            ..Default::default()
        });
    data.totals = totals;
    fathom_crds::trace_result::bound_result(&mut data, fathom_crds::trace_result::MAX_RESULT_BYTES);
    let status = TraceResultStatus {
        run: Some(run),
        rows: data.rows.len() as u64,
        total: data.totals.hits,
        updated: updated.or_else(|| old.as_ref().and_then(|o| o.updated.clone())),
        nodes,
        coverage: Some(Coverage::new(nodes, expected, finished, failed)),
        loss: Some(Loss::new(
            data.totals.map_full,
            data.totals.events_lost + data.totals.events_dropped,
            0,
            data.totals.rate_limited,
        )),
        data,
    };
    if old.as_ref() != Some(&status) {
        let patch = json!({
            "apiVersion": TraceResult::api_version(&()),
            "kind": "TraceResult",
            "status": status,
        });
        match apply(&api, &name, true, &patch, &format!("{what} status")).await {
            Ok(()) => ctx.metrics.wrote("apply-status", "TraceResult"),
            Err(Error::ApplyConflict(c)) => conflicts.push(c),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// What the collector needs to know of a job: its result's place, bounds and assignments.
fn job_info(
    spec: &TraceJobSpec,
    id: &JobIds,
    decision: &Decision,
    assignments: &[TraceAssignment],
) -> Option<JobInfo> {
    let run = u64::try_from(decision.status.run?).ok()?;
    let aggregate = spec.aggregate.as_ref();
    Some(JobInfo {
        job: id.job_ref.clone(),
        result_namespace: id.result_ns.clone(),
        result_name: result_name(&id.job_ref),
        run,
        probe: decision.status.probe.clone().unwrap_or_default(),
        value: spec.value_label(),
        keys: aggregate.map(|a| a.by.clone()).unwrap_or_default(),
        top: aggregate
            .and_then(|a| a.top)
            .map_or(merge::DEFAULT_TOP, |t| t as usize),
        events_last: spec
            .events
            .as_ref()
            .and_then(|e| e.last)
            .map_or(merge::DEFAULT_EVENTS_LAST, |l| l as usize),
        assignments: assignments
            .iter()
            .filter_map(|a| {
                Some(ExpectedAssignment {
                    name: a.metadata.name.clone()?,
                    uid: a.metadata.uid.clone()?,
                    node: a.spec.node_name.clone(),
                    run: u64::try_from(a.spec.run).ok()?,
                })
            })
            .collect(),
    })
}

async fn publish_events<K: JobObject>(job: &K, events: &[JobEvent], ctx: &Context) {
    if events.is_empty() {
        return;
    }
    let reference = job.object_ref(&());
    for e in events {
        let event = Event {
            type_: if e.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: e.reason.to_string(),
            note: Some(e.note.clone()),
            action: "Reconcile".into(),
            secondary: None,
        };
        match ctx.events.publish(event, reference.clone()).await {
            Ok(()) => ctx.metrics.wrote("create", "Event"),
            // An event is best effort: the status says the same.
            Err(err) => warn!(%err, reason = e.reason, "could not publish event"),
        }
    }
}
