//! The reconciler against the in-memory API: creation, scale-out, node loss, pods moving,
//! suspension, expiry, deletion with the finalizer, TTL, invalid specs, dry run, feasibility,
//! GitOps one-shot semantics, and "nothing changed → zero writes".

mod support;

use fathom_crds::{JobPhase, TraceJob, assignment::DETACH_FINALIZER};
use fathom_operator::{lifecycle, reconcile::JOB_FINALIZER};
use k8s_openapi::api::apps::v1::Deployment;
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::json;
use support::{World, node, pod, ready_node};

const WEB: &str = r#"
apiVersion: fathom.dev/v1alpha1
kind: TraceJob
metadata: { name: web-drops, namespace: shop }
spec:
  probe: { tracepoint: skb/kfree_skb }
  aggregate: { by: [pod, kstack] }
  podSelector: { matchLabels: { app: web } }
  duration: 60s
"#;

fn web_with(extra: &str) -> String {
    format!("{WEB}  {extra}\n")
}

/// Three Ready nodes; web pods on n1 and n2, another app on n3, a web pod in another namespace
/// on n3.
fn shop() -> World {
    let mut w = World::new();
    for n in ["n1", "n2", "n3"] {
        w.add_node(ready_node(n));
    }
    w.add_pod(pod("shop", "web-a", &[("app", "web")], "n1"));
    w.add_pod(pod("shop", "web-b", &[("app", "web")], "n2"));
    w.add_pod(pod("shop", "db-0", &[("app", "db")], "n3"));
    w.add_pod(pod("other", "web-x", &[("app", "web")], "n3"));
    w
}

fn phase(job: &TraceJob) -> Option<JobPhase> {
    job.status.as_ref().and_then(|s| s.phase)
}

fn condition<'a>(
    job: &'a TraceJob,
    t: &str,
) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    job.status
        .as_ref()
        .and_then(|s| s.condition(t))
        .unwrap_or_else(|| panic!("no {t} condition in {:?}", job.status))
}

async fn running_web() -> World {
    let w = shop();
    w.create_job(WEB).await;
    w.settle("shop", "web-drops").await;
    w.runner_reports("shop", "n1", "Attached", 10).await;
    w.runner_reports("shop", "n2", "Attached", 5).await;
    w.settle("shop", "web-drops").await;
    w
}

#[tokio::test]
async fn creation_places_assignments_where_the_pods_run() {
    let w = shop();
    w.create_job(WEB).await;
    w.reconcile("shop", "web-drops").await;

    let job = w.job("shop", "web-drops").await.expect("job");
    assert!(
        job.metadata
            .finalizers
            .iter()
            .flatten()
            .any(|f| f == JOB_FINALIZER)
    );
    let assignments = w.assignments("shop");
    assert_eq!(w.assignment_nodes("shop"), ["n1", "n2"]);
    let a = &assignments[0];
    assert_eq!(a.spec.target_pods.len(), 1);
    assert_eq!(a.spec.target_pods[0].name, "web-a");
    assert_eq!(a.spec.target_pods[0].uid, "pod-uid-shop-web-a");
    assert_eq!(
        a.spec.target_pods[0].containers[0].container_id.as_deref(),
        Some("containerd://web-a")
    );
    assert!(!a.spec.node_wide);
    assert_eq!(a.spec.run, 1);
    assert_eq!(
        a.spec.trace.probe.tracepoint.as_deref(),
        Some("skb/kfree_skb")
    );
    assert_eq!(
        a.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("fathom.dev/node"))
            .map(String::as_str),
        Some("n1")
    );
    // In the operator's namespace, which tenants cannot write; no ownerReference (it cannot
    // cross namespaces), but the job's labels, its namespace among them.
    assert_eq!(a.metadata.namespace.as_deref(), Some("fathom-system"));
    assert!(
        a.metadata
            .name
            .as_deref()
            .unwrap_or_default()
            .starts_with("shop.web-drops-n1-")
    );
    assert!(a.metadata.owner_references.is_none(), "{:?}", a.metadata);
    let label = |k: &str| {
        a.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(k))
            .map(String::as_str)
    };
    assert_eq!(label("fathom.dev/job-namespace"), Some("shop"));
    assert_eq!(label("fathom.dev/job-uid"), job.metadata.uid.as_deref());
    assert_eq!(label("fathom.dev/job-kind"), Some("TraceJob"));
    assert_eq!(a.spec.job.namespace.as_deref(), Some("shop"));
    assert!(w.assignments_in("shop").is_empty());
    assert!(
        a.metadata
            .finalizers
            .iter()
            .flatten()
            .any(|f| f == DETACH_FINALIZER)
    );

    let st = job.status.as_ref().expect("status");
    assert_eq!(st.phase, Some(JobPhase::Pending));
    assert_eq!(st.run, Some(1));
    assert_eq!(st.probe.as_deref(), Some("skb/kfree_skb"));
    assert_eq!(st.nodes_attached.as_deref(), Some("0/2"));
    assert_eq!(st.nodes.as_ref().map(|n| n.desired), Some(2));
    assert_eq!(condition(&job, "Ready").status, "False");
    assert_eq!(condition(&job, "Ready").reason, "AttachPending");
    let rr = st.result_ref.as_ref().expect("resultRef");
    assert_eq!(
        (rr.name.as_str(), rr.namespace.as_str()),
        ("web-drops", "shop")
    );
    // The result stays in the job's namespace, where its tenant reads it, owned by the job.
    let result = w.result("shop", "web-drops").expect("TraceResult created");
    assert_eq!(result.spec.job.name, "web-drops");
    let owner = &result.metadata.owner_references.as_ref().expect("owner")[0];
    assert_eq!(owner.kind, "TraceJob");
    assert_eq!(Some(&owner.uid), job.metadata.uid.as_ref());
}

#[tokio::test]
async fn running_then_succeeded_after_the_duration_and_final_reports() {
    let w = running_web().await;
    let job = w.job("shop", "web-drops").await.expect("job");
    let st = job.status.clone().expect("status");
    assert_eq!(st.phase, Some(JobPhase::Running));
    assert_eq!(st.events, 15);
    assert_eq!(st.nodes_attached.as_deref(), Some("2/2"));
    assert_eq!(condition(&job, "Ready").status, "True");
    let start = st.start_time.expect("startTime").0;
    let deadline = st.deadline.clone().expect("deadline");
    assert_eq!(deadline.0.as_second() - start.as_second(), 60);
    // Every assignment carries the deadline, so runners stop together.
    for a in w.assignments("shop") {
        assert_eq!(a.spec.deadline.as_ref(), Some(&deadline));
    }
    assert_eq!(
        w.result("shop", "web-drops")
            .and_then(|r| r.status)
            .map(|s| s.total),
        Some(15)
    );

    w.clock.advance(61);
    w.settle("shop", "web-drops").await;
    let job = w.job("shop", "web-drops").await.expect("job");
    assert_eq!(
        phase(&job),
        Some(JobPhase::Running),
        "waits for final reports"
    );
    assert_eq!(condition(&job, "Ready").reason, "Finishing");

    w.runner_reports("shop", "n1", "Succeeded", 12).await;
    w.runner_reports("shop", "n2", "Succeeded", 7).await;
    w.settle("shop", "web-drops").await;
    let job = w.job("shop", "web-drops").await.expect("job");
    assert_eq!(phase(&job), Some(JobPhase::Succeeded));
    assert_eq!(condition(&job, "Complete").reason, "DurationElapsed");
    let st = job.status.expect("status");
    assert_eq!(st.events, 19);
    assert!(st.completion_time.is_some());
    let reasons: Vec<String> = w.events().into_iter().map(|e| e.1).collect();
    assert!(reasons.contains(&"Running".to_string()), "{reasons:?}");
    assert!(reasons.contains(&"Succeeded".to_string()), "{reasons:?}");
}

#[tokio::test]
async fn the_grace_period_names_the_laggards() {
    let w = running_web().await;
    w.clock.advance(61);
    w.runner_reports("shop", "n1", "Succeeded", 12).await;
    w.settle("shop", "web-drops").await;
    assert_eq!(
        phase(&w.job("shop", "web-drops").await.expect("job")),
        Some(JobPhase::Running)
    );
    w.clock.advance(31);
    w.settle("shop", "web-drops").await;
    let job = w.job("shop", "web-drops").await.expect("job");
    assert_eq!(phase(&job), Some(JobPhase::Succeeded));
    let c = condition(&job, "Complete");
    assert_eq!(c.reason, "GracePeriodExpired");
    assert!(
        c.message.contains("n2") && !c.message.contains("n1"),
        "{}",
        c.message
    );
}

#[tokio::test]
async fn scale_out_on_a_new_node_and_node_loss() {
    let mut w = running_web().await;
    w.add_node(ready_node("n4"));
    w.add_pod(pod("shop", "web-c", &[("app", "web")], "n4"));
    w.settle("shop", "web-drops").await;
    assert_eq!(w.assignment_nodes("shop"), ["n1", "n2", "n4"]);
    let deadline = w
        .job("shop", "web-drops")
        .await
        .and_then(|j| j.status)
        .and_then(|s| s.deadline);
    let n4 = w
        .assignments("shop")
        .into_iter()
        .find(|a| a.spec.node_name == "n4")
        .expect("n4");
    assert_eq!(
        n4.spec.deadline, deadline,
        "a late node stops with the others"
    );

    // n2 disappears: its assignment is deleted; its runner is gone, so after the timeout the
    // operator collects it instead of waiting forever.
    w.remove_pod("shop", "web-b");
    w.remove_node("n2");
    w.settle("shop", "web-drops").await;
    let n2 = w
        .assignments("shop")
        .into_iter()
        .find(|a| a.spec.node_name == "n2")
        .expect("terminating");
    assert!(n2.metadata.deletion_timestamp.is_some());
    w.clock.advance(61);
    w.settle("shop", "web-drops").await;
    assert_eq!(w.assignment_nodes("shop"), ["n1", "n4"]);
}

#[tokio::test]
async fn pods_of_a_workload_are_followed_as_they_move() {
    let mut w = World::new();
    for n in ["n1", "n2"] {
        w.add_node(ready_node(n));
    }
    let deploy: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "checkout", "namespace": "shop"},
        "spec": {"selector": {"matchLabels": {"app": "checkout"}},
                 "template": {"metadata": {"labels": {"app": "checkout"}}}}
    }))
    .expect("deployment");
    Api::<Deployment>::namespaced(w.client.clone(), "shop")
        .create(&PostParams::default(), &deploy)
        .await
        .expect("create deployment");
    w.add_pod(pod("shop", "checkout-1", &[("app", "checkout")], "n1"));
    w.create_job(
        "apiVersion: fathom.dev/v1alpha1\nkind: TraceJob\nmetadata: { name: co, namespace: shop }\nspec:\n  probe: { catalog: tcp-connect }\n  targetRef: { kind: Deployment, name: checkout }\n",
    )
    .await;
    w.settle("shop", "co").await;
    assert_eq!(w.assignment_nodes("shop"), ["n1"]);

    // The pod is rescheduled to n2.
    w.remove_pod("shop", "checkout-1");
    w.add_pod(pod("shop", "checkout-2", &[("app", "checkout")], "n2"));
    w.settle("shop", "co").await;
    let live: Vec<String> = w
        .assignments("shop")
        .into_iter()
        .filter(|a| a.metadata.deletion_timestamp.is_none())
        .map(|a| a.spec.node_name)
        .collect();
    assert_eq!(live, ["n2"]);
    w.runner_detaches("shop", "n1").await;
    assert_eq!(w.assignment_nodes("shop"), ["n2"]);

    // A missing workload is waited for, not a failure.
    w.create_job(
        "apiVersion: fathom.dev/v1alpha1\nkind: TraceJob\nmetadata: { name: ghost, namespace: shop }\nspec:\n  probe: { catalog: tcp-connect }\n  targetRef: { kind: StatefulSet, name: nope }\n",
    )
    .await;
    w.settle("shop", "ghost").await;
    let job = w.job("shop", "ghost").await.expect("job");
    assert_eq!(phase(&job), Some(JobPhase::Pending));
    assert_eq!(condition(&job, "Ready").reason, "TargetNotFound");
}

#[tokio::test]
async fn suspension_stops_the_job_on_every_node() {
    let w = running_web().await;
    Api::<TraceJob>::namespaced(w.client.clone(), "shop")
        .patch(
            "web-drops",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"suspend": true}})),
        )
        .await
        .expect("suspend");
    w.settle("shop", "web-drops").await;
    let job = w.job("shop", "web-drops").await.expect("job");
    assert_eq!(phase(&job), Some(JobPhase::Stopped));
    assert_eq!(condition(&job, "Suspended").status, "True");
    assert!(w.assignments("shop").iter().all(|a| a.spec.suspend));
    assert!(w.events().iter().any(|e| e.1 == "Stopped"));
    // Stopped is final: resuming is a changed spec, so a new run.
    Api::<TraceJob>::namespaced(w.client.clone(), "shop")
        .patch(
            "web-drops",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"suspend": false}})),
        )
        .await
        .expect("resume");
    w.settle("shop", "web-drops").await;
    let job = w.job("shop", "web-drops").await.expect("job");
    assert_eq!(job.status.as_ref().and_then(|s| s.run), Some(2));
    assert!(
        w.assignments("shop")
            .iter()
            .all(|a| a.spec.run == 2 && !a.spec.suspend)
    );
}

#[tokio::test]
async fn deletion_waits_for_every_node_then_lets_go() {
    let w = running_web().await;
    w.delete_job("shop", "web-drops").await;
    w.reconcile("shop", "web-drops").await;
    let job = w
        .job("shop", "web-drops")
        .await
        .expect("held by the finalizer");
    assert!(job.metadata.deletion_timestamp.is_some());
    assert!(
        w.assignments("shop")
            .iter()
            .all(|a| a.metadata.deletion_timestamp.is_some())
    );
    assert_eq!(condition(&job, "Ready").reason, "Deleting");

    w.runner_detaches("shop", "n1").await;
    w.reconcile("shop", "web-drops").await;
    assert!(
        w.job("shop", "web-drops").await.is_some(),
        "n2 has not detached"
    );
    w.runner_detaches("shop", "n2").await;
    w.reconcile("shop", "web-drops").await;
    assert!(w.job("shop", "web-drops").await.is_none());
    assert!(
        w.result("shop", "web-drops").is_none(),
        "the result is owned by the job"
    );
}

#[tokio::test]
async fn ttl_deletes_a_finished_job() {
    let w = shop();
    w.create_job(&web_with("ttlSecondsAfterFinished: 10")).await;
    w.settle("shop", "web-drops").await;
    w.runner_reports("shop", "n1", "Attached", 1).await;
    w.settle("shop", "web-drops").await;
    w.clock.advance(61);
    w.runner_reports("shop", "n1", "Succeeded", 1).await;
    w.runner_reports("shop", "n2", "Succeeded", 0).await;
    w.settle("shop", "web-drops").await;
    let action = w.reconcile("shop", "web-drops").await;
    assert_eq!(
        format!("{action:?}"),
        format!(
            "{:?}",
            kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(10))
        )
    );
    w.clock.advance(10);
    w.reconcile("shop", "web-drops").await;
    let job = w
        .job("shop", "web-drops")
        .await
        .expect("finalizer holds it");
    assert!(
        job.metadata.deletion_timestamp.is_some(),
        "TTL deleted the job"
    );
    w.reconcile("shop", "web-drops").await;
    w.runner_detaches("shop", "n1").await;
    w.runner_detaches("shop", "n2").await;
    w.reconcile("shop", "web-drops").await;
    assert!(w.job("shop", "web-drops").await.is_none());
}

#[tokio::test]
async fn an_invalid_spec_is_a_condition_not_a_crash_loop() {
    let w = shop();
    w.create_job(
        "apiVersion: fathom.dev/v1alpha1\nkind: TraceJob\nmetadata: { name: bad, namespace: shop }\nspec:\n  probe: { tracepoint: a/b, kprobe: x }\n  duration: 2d\n  podSelector: { matchLabels: { app: web } }\n",
    )
    .await;
    w.settle("shop", "bad").await;
    let job = w.job("shop", "bad").await.expect("job");
    assert_eq!(phase(&job), Some(JobPhase::Failed));
    let c = condition(&job, "Failed");
    assert_eq!(c.reason, "InvalidSpec");
    assert!(
        c.message.contains("spec.probe: has 2 forms"),
        "{}",
        c.message
    );
    assert!(c.message.contains("spec.duration"), "{}", c.message);
    assert!(w.assignments("shop").is_empty());
    assert!(
        w.events()
            .iter()
            .any(|e| e.0 == "Warning" && e.1 == "Failed")
    );

    // Fixing the spec starts a new run.
    Api::<TraceJob>::namespaced(w.client.clone(), "shop")
        .patch(
            "bad",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"probe": {"kprobe": null}, "duration": "30s"}})),
        )
        .await
        .expect("fix");
    w.settle("shop", "bad").await;
    let job = w.job("shop", "bad").await.expect("job");
    assert_eq!(phase(&job), Some(JobPhase::Pending));
    assert_eq!(job.status.as_ref().and_then(|s| s.run), Some(2));
    assert_eq!(w.assignment_nodes("shop"), ["n1", "n2"]);
}

/// Where the CRD's tenant rules did not run (the in-memory API has none), the operator refuses
/// what a TraceJob may not use with the rule's name, and attaches nothing; a ClusterTraceJob
/// may use it.
#[tokio::test]
async fn the_tenant_rules_refuse_kernel_probes_and_payloads_in_a_tracejob() {
    let w = shop();
    for (name, spec, rule) in [
        (
            "kp",
            "probe: { kprobe: tcp_v4_connect }",
            "tenant-probe-kind",
        ),
        (
            "raw",
            "probe: { rawTracepoint: kfree_skb }",
            "tenant-probe-kind",
        ),
        (
            "pay",
            "probe: { catalog: exec }\n  events: { payload: true }",
            "tenant-payload",
        ),
    ] {
        w.create_job(&format!(
            "apiVersion: fathom.dev/v1alpha1\nkind: TraceJob\nmetadata: {{ name: {name}, namespace: shop }}\nspec:\n  {spec}\n  podSelector: {{ matchLabels: {{ app: web }} }}\n"
        ))
        .await;
        w.settle("shop", name).await;
        let job = w.job("shop", name).await.expect("job");
        assert_eq!(phase(&job), Some(JobPhase::Failed), "{name}");
        let c = condition(&job, "Failed");
        assert_eq!(c.reason, "PolicyDenied", "{name}");
        assert!(c.message.contains(rule), "{name}: {}", c.message);
        assert!(
            c.message.contains("ClusterTraceJob"),
            "{name}: {}",
            c.message
        );
    }
    assert!(w.assignments("shop").is_empty());
    w.create_cluster_job(
        "apiVersion: fathom.dev/v1alpha1\nkind: ClusterTraceJob\nmetadata: { name: kp }\nspec:\n  probe: { kprobe: tcp_v4_connect }\n",
    )
    .await;
    w.reconcile_cluster("kp").await;
    w.reconcile_cluster("kp").await;
    assert!(!w.assignment_nodes("fathom-system").is_empty());
}

#[tokio::test]
async fn a_node_wide_tracejob_needs_a_clustertracejob() {
    let mut w = shop();
    w.create_job(
        "apiVersion: fathom.dev/v1alpha1\nkind: TraceJob\nmetadata: { name: all, namespace: shop }\nspec:\n  probe: { catalog: syscalls }\n",
    )
    .await;
    w.settle("shop", "all").await;
    let job = w.job("shop", "all").await.expect("job");
    assert_eq!(phase(&job), Some(JobPhase::Failed));
    let c = condition(&job, "Failed");
    assert_eq!(c.reason, "NodeWideNeedsClusterTraceJob");
    assert!(c.message.contains("ClusterTraceJob"), "{}", c.message);

    // The same spec as a ClusterTraceJob runs on every eligible node; a tainted node and a
    // NotReady one are left out.
    w.add_node(node("tainted", &[], true, &[("dedicated", "NoSchedule")]));
    w.add_node(node("down", &[], false, &[]));
    w.add_node(node(
        "cordoned",
        &[],
        true,
        &[("node.kubernetes.io/unschedulable", "NoSchedule")],
    ));
    w.create_cluster_job(
        "apiVersion: fathom.dev/v1alpha1\nkind: ClusterTraceJob\nmetadata: { name: all }\nspec:\n  probe: { catalog: syscalls }\n",
    )
    .await;
    w.reconcile_cluster("all").await;
    w.reconcile_cluster("all").await;
    let nodes = w.assignment_nodes("fathom-system");
    assert_eq!(nodes, ["cordoned", "n1", "n2", "n3"]);
    assert!(
        w.assignments("fathom-system")
            .iter()
            .all(|a| a.spec.node_wide && a.spec.target_pods.is_empty())
    );
    let job = w.cluster_job("all").await.expect("job");
    assert_eq!(
        job.status
            .as_ref()
            .and_then(|s| s.result_ref.as_ref())
            .map(|r| (r.name.as_str(), r.namespace.as_str())),
        Some(("cluster.all", "fathom-system"))
    );
}

#[tokio::test]
async fn a_namespaced_job_never_targets_another_namespace() {
    let w = shop();
    w.create_job(WEB).await;
    w.settle("shop", "web-drops").await;
    let pods: Vec<String> = w
        .assignments("shop")
        .iter()
        .flat_map(|a| {
            a.spec
                .target_pods
                .iter()
                .map(|p| format!("{}/{}", p.namespace, p.name))
        })
        .collect();
    assert_eq!(pods, ["shop/web-a", "shop/web-b"]);
    assert!(w.assignments("other").is_empty());
}

#[tokio::test]
async fn dry_run_reports_the_plan_without_assigning() {
    let mut w = shop();
    w.add_node(node("n5", &[], false, &[]));
    w.add_pod(pod("shop", "web-z", &[("app", "web")], "n5"));
    w.create_job(&web_with("dryRun: true")).await;
    w.settle("shop", "web-drops").await;
    assert!(w.assignments("shop").is_empty());
    let job = w.job("shop", "web-drops").await.expect("job");
    let plan = job
        .status
        .as_ref()
        .and_then(|s| s.plan.clone())
        .expect("plan");
    assert_eq!(plan.node_count, 2);
    assert_eq!(plan.pod_count, 2);
    assert_eq!(plan.nodes[0].node, "n1");
    assert_eq!(plan.nodes[0].pods, ["shop/web-a"]);
    assert_eq!(plan.excluded.len(), 1);
    assert_eq!(
        (
            plan.excluded[0].node.as_str(),
            plan.excluded[0].reason.as_str()
        ),
        ("n5", "NotReady")
    );
    assert_eq!(condition(&job, "Ready").reason, "DryRun");
}

#[tokio::test]
async fn not_feasible_nodes_are_listed_apart_and_the_job_runs_elsewhere() {
    let w = shop();
    w.create_job(WEB).await;
    w.settle("shop", "web-drops").await;
    w.runner_reports("shop", "n1", "Attached", 3).await;
    w.runner_status(
        "shop",
        "n2",
        json!({"phase": "NotFeasible", "verdict": {"feasible": false, "probes": [
            {"probe": "tracepoint:skb/kfree_skb", "feasible": false, "reason": "SymbolNotFound",
             "message": "no tracepoint skb/kfree_skb on this kernel"}]}}),
    )
    .await;
    w.settle("shop", "web-drops").await;
    let job = w.job("shop", "web-drops").await.expect("job");
    assert_eq!(phase(&job), Some(JobPhase::Running));
    let st = job.status.clone().expect("status");
    let nodes = st.nodes.expect("counts");
    assert_eq!(
        (nodes.attached, nodes.not_feasible, nodes.failed),
        (1, 1, 0)
    );
    assert_eq!(st.not_feasible[0].node, "n2");
    assert_eq!(st.not_feasible[0].reason, "SymbolNotFound");
    let c = condition(&job, "NotFeasible");
    assert_eq!(c.status, "True");
    assert!(c.message.contains("n2 (SymbolNotFound)"), "{}", c.message);
    assert_eq!(
        condition(&job, "Ready").status,
        "True",
        "every node is attached or not feasible"
    );
    assert!(
        w.events()
            .iter()
            .any(|e| e.0 == "Warning" && e.1 == "NotFeasible")
    );
}

#[tokio::test]
async fn not_feasible_anywhere_fails_the_job() {
    let w = shop();
    w.create_job(WEB).await;
    w.settle("shop", "web-drops").await;
    for n in ["n1", "n2"] {
        w.runner_status("shop", n, json!({"phase": "NotFeasible", "verdict": {"feasible": false, "probes": [
            {"probe": "tracepoint:skb/kfree_skb", "feasible": false, "reason": "BTFUnavailable", "message": "no BTF"}]}}))
            .await;
    }
    w.settle("shop", "web-drops").await;
    let job = w.job("shop", "web-drops").await.expect("job");
    assert_eq!(phase(&job), Some(JobPhase::Failed));
    assert_eq!(condition(&job, "Failed").reason, "NotFeasibleAnywhere");
}

#[tokio::test]
async fn gitops_reapply_of_a_finished_job_does_not_rerun_it() {
    let w = shop();
    w.create_job(WEB).await;
    w.settle("shop", "web-drops").await;
    w.runner_reports("shop", "n1", "Attached", 1).await;
    w.settle("shop", "web-drops").await;
    w.clock.advance(61);
    w.runner_reports("shop", "n1", "Succeeded", 1).await;
    w.runner_reports("shop", "n2", "Succeeded", 0).await;
    w.settle("shop", "web-drops").await;
    let before = w.job("shop", "web-drops").await.expect("job");
    assert_eq!(phase(&before), Some(JobPhase::Succeeded));

    // `kubectl apply` / a GitOps sync of the same manifest, with its own field manager (and,
    // like Argo CD's server-side apply, forcing conflicts with the job's creator).
    let manifest: serde_json::Value = serde_yaml::from_str(WEB).expect("yaml");
    let api = Api::<TraceJob>::namespaced(w.client.clone(), "shop");
    api.patch(
        "web-drops",
        &PatchParams::apply("argocd").force(),
        &Patch::Apply(&manifest),
    )
    .await
    .expect("re-apply");
    w.api.clear_calls();
    w.reconcile("shop", "web-drops").await;
    assert!(w.api.writes().is_empty(), "{:?}", w.api.writes());
    let after = w.job("shop", "web-drops").await.expect("job");
    assert_eq!(after.status, before.status);
    assert!(
        after.spec == before.spec,
        "the operator writes nothing into spec"
    );

    // A changed spec is a new run.
    let mut changed = manifest.clone();
    changed["spec"]["duration"] = json!("120s");
    api.patch(
        "web-drops",
        &PatchParams::apply("argocd").force(),
        &Patch::Apply(&changed),
    )
    .await
    .expect("apply change");
    w.settle("shop", "web-drops").await;
    let job = w.job("shop", "web-drops").await.expect("job");
    let st = job.status.expect("status");
    assert_eq!((st.run, st.phase), (Some(2), Some(JobPhase::Pending)));
    assert!(st.completion_time.is_none() && st.start_time.is_none());
    assert!(
        w.assignments("shop")
            .iter()
            .all(|a| a.spec.run == 2 && a.spec.trace.duration.as_deref() == Some("120s"))
    );
    assert!(w.events().iter().any(|e| e.1 == "NewRun"));
}

#[tokio::test]
async fn nothing_changed_means_zero_writes() {
    let w = running_web().await;
    for _ in 0..3 {
        w.api.clear_calls();
        w.reconcile("shop", "web-drops").await;
        assert!(w.api.writes().is_empty(), "{:?}", w.api.writes());
        assert!(!w.api.calls().is_empty(), "it did read");
    }
    let expected = lifecycle::READY;
    assert_eq!(
        condition(&w.job("shop", "web-drops").await.expect("job"), expected).status,
        "True"
    );
}
