//! `kubectl fathom explain -f job.yaml`: a dry run, read-only. What the operator would plan
//! for the job against the cluster's nodes and pods as they are now — the operator's own pure
//! admission and planner (`fathom_operator::reconcile::admit`, `plan`) — and the engine's
//! feasibility verdict for this machine's kernel (what `fathom check` says).

use std::{fmt::Write as _, path::Path};

use fathom_crds::verdict::Verdict;
use fathom_node::{
    EngineError,
    cli::{
        jobfile::{self, JobFile},
        run::{check_job, verdict_lines},
    },
    engine::kernel::Kernel,
};
use fathom_operator::{
    lifecycle::Intent,
    plan::{ClusterView, daemonset_default_tolerations},
    reconcile::{Tenancy, Workload, admit, resolve_workload, tenancy_in},
};
use k8s_openapi::api::core::v1::{Node, Pod, Toleration};
use kube::{Api, Client, api::ListParams};

use crate::error::{Error, JobName, one_line};

/// Nodes listed per section at most (the counts are always whole).
pub const LIST_LIMIT: usize = 50;

/// A job file as explain reads it: the job's identity and spec.
pub struct ExplainInput {
    pub job: JobName,
    pub file: JobFile,
}

/// Reads the manifest; a TraceJob's namespace is its own, else `namespace` (from `-n` or the
/// kubeconfig's context).
pub fn read_input(path: &Path, namespace: &str) -> Result<ExplainInput, Error> {
    let file = jobfile::read(path)?;
    let job = match file.kind.as_str() {
        "ClusterTraceJob" => JobName {
            namespace: None,
            name: file.name.clone(),
        },
        _ => JobName {
            namespace: Some(
                file.namespace
                    .clone()
                    .unwrap_or_else(|| namespace.to_string()),
            ),
            name: file.name.clone(),
        },
    };
    Ok(ExplainInput { job, file })
}

/// The runner's tolerations: the DaemonSet controller's defaults plus `extra_json` (a JSON
/// list, as the operator's `--runner-tolerations`).
pub fn tolerations(extra_json: &str) -> Result<Vec<Toleration>, Error> {
    let extra: Vec<Toleration> = serde_json::from_str(extra_json).map_err(|e| {
        Error::Usage(format!(
            "--runner-tolerations is not a JSON list of tolerations: {e}"
        ))
    })?;
    let mut all = daemonset_default_tolerations();
    all.extend(extra);
    Ok(all)
}

/// What the cluster holds that planning reads: nodes, the pods the job may target, and the
/// selector of its `targetRef` workload. Only `list` and `get` requests.
pub struct ClusterState {
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    pub workload: Workload,
    /// The tenant rules the job is held to (its namespace's TracePolicy).
    pub tenancy: Tenancy,
    /// Why the tenancy is a guess: the Namespace or its TracePolicy could not be read (a
    /// tenant may not read either), so the default rules were assumed.
    pub tenancy_note: Option<String>,
}

/// Lists nodes, and the pods of the job's namespace (every namespace for a ClusterTraceJob)
/// when the job targets pods.
pub async fn read_cluster(client: &Client, input: &ExplainInput) -> Result<ClusterState, Error> {
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| Error::from_api(e, "list", "nodes", None))?
        .items;
    let spec = &input.file.spec;
    let targets_pods = spec.pod_selector.is_some() || spec.target_ref.is_some();
    let pods = match (&input.job.namespace, targets_pods) {
        (_, false) => Vec::new(),
        (Some(ns), true) => {
            Api::<Pod>::namespaced(client.clone(), ns)
                .list(&ListParams::default())
                .await
                .map_err(|e| Error::from_api(e, "list", "pods", Some(ns)))?
                .items
        }
        (None, true) => {
            Api::<Pod>::all(client.clone())
                .list(&ListParams::default())
                .await
                .map_err(|e| Error::from_api(e, "list", "pods", None))?
                .items
        }
    };
    let workload = resolve_workload(spec, input.job.namespace.as_deref(), client)
        .await
        .map_err(|e| Error::Api {
            what: "reading the workload of spec.targetRef".into(),
            message: one_line(&e),
        })?;
    // A tenant may not read its Namespace or the cluster's TracePolicies: the plan then
    // assumes the default rules, and says so.
    let (tenancy, tenancy_note) = match tenancy_in(input.job.namespace.as_deref(), client).await {
        Ok(t) => (t, None),
        Err(e) => (
            Tenancy::Namespace(None),
            Some(format!(
                "could not read the namespace's TracePolicy (label fathom.dev/trace-policy): {}; judged by the default tenant rules",
                one_line(&e)
            )),
        ),
    };
    Ok(ClusterState {
        nodes,
        pods,
        workload,
        tenancy,
        tenancy_note,
    })
}

/// The operator's plan for the job, as text; an error when it would refuse the job.
pub fn describe_plan(
    input: &ExplainInput,
    cluster: ClusterState,
    tolerations: &[Toleration],
) -> Result<String, Error> {
    let view = ClusterView::new(cluster.nodes.iter(), cluster.pods.iter(), tolerations);
    let intent = admit(
        &input.file.spec,
        input.job.namespace.as_deref(),
        &cluster.tenancy,
        cluster.workload,
        &view,
    );
    let mut out = String::new();
    if let Some(note) = &cluster.tenancy_note {
        let _ = writeln!(out, "note: {note}");
    }
    match intent {
        Intent::Invalid(errors) => return Err(Error::Engine(EngineError::InvalidSpec(errors))),
        Intent::Rejected(reason, message) => {
            let message = match &cluster.tenancy_note {
                Some(note) => format!("{message} (note: {note})"),
                None => message,
            };
            return Err(Error::WouldReject {
                reason: reason.to_string(),
                message,
            });
        }
        Intent::Waiting(reason, message) => {
            let _ = writeln!(
                out,
                "{}: the operator would wait: {reason}: {message}",
                input.job
            );
        }
        Intent::Planned {
            plan,
            probe,
            duration,
        } => {
            let _ = writeln!(
                out,
                "{}: probe {probe}, {}",
                input.job,
                duration.map_or("until deleted".to_string(), |d| format!(
                    "for {}s",
                    d.as_secs()
                ))
            );
            let _ = writeln!(
                out,
                "would run on {} of {} nodes{}:",
                plan.nodes.len(),
                view.nodes().len(),
                if plan.node_wide {
                    ", tracing every process there".to_string()
                } else {
                    format!(", tracing {} pods", plan.pod_count)
                }
            );
            if plan.nodes.is_empty() {
                let _ = writeln!(out, "  (no node: nothing would be attached yet)");
            }
            for (node, pods) in plan.nodes.iter().take(LIST_LIMIT) {
                let what = if plan.node_wide {
                    "the whole node".to_string()
                } else {
                    pods.iter()
                        .map(|p| {
                            let t = p.target();
                            let containers: Vec<&str> =
                                t.containers.iter().map(|c| c.name.as_str()).collect();
                            format!("{}/{} [{}]", t.namespace, t.name, containers.join(", "))
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let _ = writeln!(out, "  {node}: {what}");
            }
            if plan.nodes.len() > LIST_LIMIT {
                let _ = writeln!(out, "  … and {} more", plan.nodes.len() - LIST_LIMIT);
            }
            if !plan.excluded.is_empty() {
                let _ = writeln!(out, "refused nodes ({}):", plan.excluded.len());
                for r in plan.excluded_reasons(LIST_LIMIT) {
                    let _ = writeln!(out, "  {}: {}: {}", r.node, r.reason, r.message);
                }
                if plan.excluded.len() > LIST_LIMIT {
                    let _ = writeln!(out, "  … and {} more", plan.excluded.len() - LIST_LIMIT);
                }
            }
        }
    }
    Ok(out)
}

/// This machine's kernel verdict on the job, as `fathom check` prints it.
pub fn describe_kernel(input: &ExplainInput, kernel: &Kernel) -> Result<String, Error> {
    let checked = input
        .file
        .spec
        .validate()
        .map_err(|e| Error::Engine(EngineError::InvalidSpec(e)))?;
    let verdict: Verdict = check_job(&checked, kernel)?;
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown release".to_string(), |r| r.trim().to_string());
    let mut out = format!(
        "this machine's kernel ({release}): {}\n",
        if verdict.feasible {
            "feasible"
        } else {
            "not feasible"
        }
    );
    for line in verdict_lines(&verdict) {
        let _ = writeln!(out, "  {line}");
    }
    Ok(out)
}
