//! Tenancy of TraceAssignments (issue 8): every assignment lives in the operator's namespace,
//! which tenants cannot write; a TraceJob's result stays in its namespace. A TraceAssignment a
//! tenant writes in its own namespace is never read, counted or accepted; assignments of a
//! job that went without its finalizer (force-deleted) are swept.

mod support;

use fathom_crds::{ClusterTraceJob, TraceAssignment, TraceJob, assignment::JobRef};
use fathom_operator::{
    collector::Accept,
    controller::job_of_assignment,
    orphans::{self, sweep_orphans},
};
use fathom_proto::v1::{self, JobKind, RejectionCode};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams},
    runtime::reflector::ObjectRef,
};
use serde_json::json;
use support::{FATHOM, World, pod, ready_node};

const OPERATOR_NS: &str = "fathom-system";

fn web(namespace: &str) -> String {
    format!(
        r#"
apiVersion: fathom.dev/v1alpha1
kind: TraceJob
metadata: {{ name: web-drops, namespace: {namespace} }}
spec:
  probe: {{ tracepoint: skb/kfree_skb }}
  podSelector: {{ matchLabels: {{ app: web }} }}
  duration: 60s
"#
    )
}

const ALL: &str = "apiVersion: fathom.dev/v1alpha1\nkind: ClusterTraceJob\nmetadata: { name: all }\nspec:\n  probe: { catalog: syscalls }\n";

/// Three Ready nodes; web pods of `shop` on n1 and n2, a web pod of `bank` on n3.
fn world(w: World) -> World {
    let mut w = w;
    for n in ["n1", "n2", "n3"] {
        w.add_node(ready_node(n));
    }
    w.add_pod(pod("shop", "web-a", &[("app", "web")], "n1"));
    w.add_pod(pod("shop", "web-b", &[("app", "web")], "n2"));
    w.add_pod(pod("bank", "web-x", &[("app", "web")], "n3"));
    w
}

fn names(v: &[TraceAssignment]) -> Vec<String> {
    let mut n: Vec<String> = v.iter().map(|a| a.name_any()).collect();
    n.sort();
    n
}

#[tokio::test]
async fn same_named_jobs_of_two_namespaces_share_the_operator_namespace_apart() {
    let w = world(World::new());
    w.create_job(&web("shop")).await;
    w.create_job(&web("bank")).await;
    w.settle("shop", "web-drops").await;
    w.settle("bank", "web-drops").await;
    assert_eq!(w.assignment_nodes("shop"), ["n1", "n2"]);
    assert_eq!(w.assignment_nodes("bank"), ["n3"]);
    // Nothing in the tenants' namespaces; all three in the operator's, under distinct names.
    assert!(w.assignments_in("shop").is_empty() && w.assignments_in("bank").is_empty());
    let all = w.assignments_in(OPERATOR_NS);
    assert_eq!(all.len(), 3);
    for a in &all {
        let ns = a.spec.job.namespace.clone().expect("a TraceJob's");
        assert!(
            a.name_any().starts_with(&format!("{ns}.web-drops-")),
            "{}",
            a.name_any()
        );
        assert!(a.metadata.owner_references.is_none());
    }
    // Each result in its job's namespace.
    assert!(w.result("shop", "web-drops").is_some());
    assert!(w.result("bank", "web-drops").is_some());

    // Deleting shop's job deletes its assignments (found in the operator's namespace) and
    // nothing of bank's.
    w.delete_job("shop", "web-drops").await;
    w.reconcile("shop", "web-drops").await;
    assert!(
        w.assignments("shop")
            .iter()
            .all(|a| a.metadata.deletion_timestamp.is_some())
    );
    w.runner_detaches("shop", "n1").await;
    w.runner_detaches("shop", "n2").await;
    w.reconcile("shop", "web-drops").await;
    assert!(w.job("shop", "web-drops").await.is_none());
    assert!(w.assignments("shop").is_empty());
    assert_eq!(w.assignment_nodes("bank"), ["n3"]);
    assert!(
        w.assignments("bank")[0]
            .metadata
            .deletion_timestamp
            .is_none(),
        "bank's assignment untouched"
    );
}

#[tokio::test]
async fn a_cluster_jobs_assignments_keep_their_owner_reference() {
    let w = world(World::new());
    let job = w.create_cluster_job(ALL).await;
    w.reconcile_cluster("all").await;
    w.reconcile_cluster("all").await;
    let all = w.assignments(OPERATOR_NS);
    assert_eq!(all.len(), 3);
    for a in &all {
        let owner = &a.metadata.owner_references.as_ref().expect("owner")[0];
        assert_eq!(owner.kind, "ClusterTraceJob");
        assert_eq!(Some(&owner.uid), job.metadata.uid.as_ref());
        assert!(
            !a.labels().contains_key("fathom.dev/job-namespace"),
            "{:?}",
            a.labels()
        );
    }
}

/// What a tenant allowed to write TraceAssignments in its own namespace could forge: an
/// assignment that claims to be its job's, for a node its pods are not on, node-wide.
fn forged(job: &TraceJob) -> serde_json::Value {
    let uid = job.uid().expect("uid");
    json!({
        "apiVersion": "fathom.dev/v1alpha1",
        "kind": "TraceAssignment",
        "metadata": {
            "name": "forged",
            "namespace": "shop",
            "labels": {
                "fathom.dev/job-uid": uid,
                "fathom.dev/job-kind": "TraceJob",
                "fathom.dev/job": "web-drops",
                "fathom.dev/node": "n3",
            },
        },
        "spec": {
            "job": {"kind": "TraceJob", "name": "web-drops", "namespace": "shop", "uid": uid},
            "run": 1,
            "nodeName": "n3",
            "nodeWide": true,
            "trace": {"probe": {"tracepoint": "skb/kfree_skb"}},
        },
        "status": {"phase": "Attached", "run": 1, "counters": {"hits": 1_000_000}},
    })
}

#[tokio::test]
async fn a_tenants_forged_assignment_is_never_read_counted_or_accepted() {
    let w = world(World::with_collector());
    let job = w.create_job(&web("shop")).await;
    let stored = w.api.seed(FATHOM, "traceassignments", forged(&job));
    w.api.clear_calls();
    w.settle("shop", "web-drops").await;
    w.runner_reports("shop", "n1", "Attached", 10).await;
    w.api.clear_calls();
    w.settle("shop", "web-drops").await;

    // The reconciler never reads the tenant's namespace for assignments, nor writes there.
    w.api.clear_calls();
    w.reconcile("shop", "web-drops").await;
    // Every request about assignments names the operator's namespace: none names the
    // tenant's, none spans all namespaces.
    let calls = w.api.calls();
    assert!(
        calls
            .iter()
            .filter(|c| c.path.contains("traceassignments"))
            .all(|c| c
                .path
                .contains("/namespaces/fathom-system/traceassignments")),
        "{calls:?}"
    );
    assert!(
        calls.iter().any(|c| c
            .path
            .contains("/namespaces/fathom-system/traceassignments")),
        "{calls:?}"
    );
    // Not counted: two nodes desired, the forged node-wide n3 nowhere, its hits nowhere.
    let job = w.job("shop", "web-drops").await.expect("job");
    let st = job.status.expect("status");
    assert_eq!(st.nodes.as_ref().map(|n| n.desired), Some(2));
    assert_eq!(st.nodes_attached.as_deref(), Some("1/2"));
    let result = w.result("shop", "web-drops").expect("result");
    assert_eq!(result.status.expect("result status").total, 10);
    // Untouched (it is the tenant's own object, in its own namespace; the runner never sees it).
    let still = w
        .api
        .get(FATHOM, "traceassignments", "shop", "forged")
        .expect("forged object");
    assert_eq!(
        still["metadata"]["resourceVersion"],
        stored["metadata"]["resourceVersion"]
    );

    // The collector expects only the operator's assignments: a report for the forged one,
    // even from n3's authenticated runner, is refused; the real one is accepted.
    let collector = w.ctx.collector.clone().expect("collector");
    let uid = job.metadata.uid.clone().expect("uid");
    let report = |a_name: &str, a_uid: &str, node: &str| v1::NodeReport {
        job_uid: uid.clone(),
        job_kind: JobKind::TraceJob as i32,
        job_namespace: "shop".into(),
        job_name: "web-drops".into(),
        assignment_name: a_name.into(),
        assignment_uid: a_uid.into(),
        node: node.into(),
        run: 1,
        seq: 1,
        state: Some(v1::AssignmentState {
            phase: v1::AssignmentPhase::Attached as i32,
            ..Default::default()
        }),
        ..Default::default()
    };
    let forged_uid = stored["metadata"]["uid"].as_str().expect("uid");
    match collector.accept("n3", &report("forged", forged_uid, "n3")) {
        Accept::Rejected { code, .. } => assert_eq!(code, RejectionCode::UnknownAssignment),
        other => panic!("forged report accepted: {other:?}"),
    }
    let real = w
        .assignments("shop")
        .into_iter()
        .find(|a| a.spec.node_name == "n1")
        .expect("n1's assignment");
    let accepted = collector.accept(
        "n1",
        &report(&real.name_any(), &real.uid().expect("uid"), "n1"),
    );
    assert_eq!(accepted, Accept::Accepted { seq: 1 });
}

/// Force-deletes a TraceJob as `kubectl delete --force` plus a removed finalizer would: the
/// job goes at once, and nothing deletes its assignments (they have no ownerReference).
async fn force_delete(w: &World, ns: &str, name: &str) {
    let jobs = Api::<TraceJob>::namespaced(w.client.clone(), ns);
    jobs.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .expect("finalizer removed by hand");
    jobs.delete(name, &Default::default())
        .await
        .expect("delete");
    assert!(w.job(ns, name).await.is_none());
}

#[tokio::test]
async fn orphan_sweep_deletes_the_assignments_of_a_force_deleted_job() {
    let mut w = world(World::new());
    w.create_job(&web("shop")).await;
    w.settle("shop", "web-drops").await;
    w.create_job(&web("bank")).await;
    w.settle("bank", "web-drops").await;
    w.create_cluster_job(ALL).await;
    w.reconcile_cluster("all").await;
    let before = w.assignments("shop");
    assert_eq!(before.len(), 2);

    // Nothing to sweep while every job exists.
    w.api.clear_calls();
    let s = sweep_orphans(&w.ctx).await.expect("sweep");
    assert_eq!(s, orphans::Sweep::default());
    assert!(
        w.api
            .writes()
            .iter()
            .all(|c| !c.path.contains("traceassignments"))
    );

    force_delete(&w, "shop", "web-drops").await;
    assert_eq!(
        w.assignments("shop").len(),
        2,
        "no garbage collection across namespaces"
    );
    // The same name again: a new job (new uid), with new assignment names.
    w.create_job(&web("shop")).await;
    w.settle("shop", "web-drops").await;
    let now: Vec<TraceAssignment> = w.assignments("shop");
    assert_eq!(now.len(), 4);

    // The sweep deletes the orphans only: the runner detaches, or after the timeout for a node
    // that is gone.
    let s = sweep_orphans(&w.ctx).await.expect("sweep");
    assert_eq!(s.orphans, 2);
    assert!(s.requeue_after.is_some(), "orphans still detaching");
    let terminating: Vec<TraceAssignment> = w
        .assignments("shop")
        .into_iter()
        .filter(|a| a.metadata.deletion_timestamp.is_some())
        .collect();
    assert_eq!(names(&terminating), names(&before));
    let n1 = before
        .iter()
        .find(|a| a.spec.node_name == "n1")
        .expect("n1");
    Api::<TraceAssignment>::namespaced(w.client.clone(), OPERATOR_NS)
        .patch(
            &n1.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .expect("n1's runner detaches");
    w.remove_node("n2");
    w.clock.advance(61);
    sweep_orphans(&w.ctx).await.expect("sweep");
    let left = w.assignments("shop");
    assert_eq!(left.len(), 2, "{:?}", names(&left));
    assert!(left.iter().all(|a| a.metadata.deletion_timestamp.is_none()));
    assert!(names(&left).iter().all(|n| !names(&before).contains(n)));
    // Others untouched; nothing more to sweep.
    assert_eq!(w.assignment_nodes("bank"), ["n3"]);
    assert_eq!(w.assignments(OPERATOR_NS).len(), 3);
    assert_eq!(
        sweep_orphans(&w.ctx).await.expect("sweep"),
        orphans::Sweep::default()
    );
}

#[test]
fn assignment_changes_map_to_their_job_of_the_right_kind() {
    let a = |kind: &str, ns: Option<&str>| TraceAssignment {
        metadata: ObjectMeta {
            name: Some("x".into()),
            namespace: Some(OPERATOR_NS.into()),
            ..Default::default()
        },
        spec: fathom_crds::TraceAssignmentSpec {
            job: JobRef {
                kind: kind.into(),
                name: "web".into(),
                namespace: ns.map(Into::into),
                uid: "u".into(),
            },
            ..Default::default()
        },
        status: None,
    };
    assert_eq!(
        job_of_assignment::<TraceJob>(&a("TraceJob", Some("shop"))),
        Some(ObjectRef::new("web").within("shop"))
    );
    assert_eq!(
        job_of_assignment::<ClusterTraceJob>(&a("TraceJob", Some("shop"))),
        None
    );
    assert_eq!(
        job_of_assignment::<ClusterTraceJob>(&a("ClusterTraceJob", None)),
        Some(ObjectRef::new("web"))
    );
    assert_eq!(
        job_of_assignment::<TraceJob>(&a("ClusterTraceJob", None)),
        None
    );
    // Malformed references map to nothing.
    assert_eq!(job_of_assignment::<TraceJob>(&a("TraceJob", None)), None);
    assert_eq!(
        job_of_assignment::<ClusterTraceJob>(&a("ClusterTraceJob", Some("x"))),
        None
    );
}

// ------------------------------------------------------------------ TracePolicy

/// Labels namespace `ns` with TracePolicy `policy` (the Namespace object, as a cluster admin
/// writes it) and, when `spec` is given, creates that TracePolicy.
async fn govern(w: &World, ns: &str, policy: &str, spec: Option<serde_json::Value>) {
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(w.client.clone());
    let n = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": ns, "labels": {"fathom.dev/trace-policy": policy}},
    }))
    .expect("namespace");
    namespaces
        .create(&Default::default(), &n)
        .await
        .expect("create namespace");
    if let Some(spec) = spec {
        let policies: Api<fathom_crds::TracePolicy> = Api::all(w.client.clone());
        let p = serde_json::from_value(json!({
            "apiVersion": "fathom.dev/v1alpha1", "kind": "TracePolicy",
            "metadata": {"name": policy}, "spec": spec,
        }))
        .expect("policy");
        policies
            .create(&Default::default(), &p)
            .await
            .expect("create policy");
    }
}

fn kprobe_job(namespace: &str, limits: &str) -> String {
    format!(
        r#"
apiVersion: fathom.dev/v1alpha1
kind: TraceJob
metadata: {{ name: connects, namespace: {namespace} }}
spec:
  probe: {{ kprobe: tcp_v4_connect }}
  podSelector: {{ matchLabels: {{ app: web }} }}
  limits: {{ {limits} }}
"#
    )
}

async fn failure(w: &World, ns: &str, name: &str) -> (Option<String>, String) {
    let job = w.job(ns, name).await.expect("job");
    let c = job
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Failed"))
        .cloned();
    (
        c.as_ref().map(|c| c.reason.clone()),
        c.map(|c| c.message).unwrap_or_default(),
    )
}

#[tokio::test]
async fn a_namespaces_trace_policy_lets_its_jobs_use_more_and_rides_in_their_assignments() {
    let w = world(World::new());
    // shop names a policy allowing kprobes; bank keeps the defaults.
    govern(
        &w,
        "shop",
        "net-debug",
        Some(json!({"allow": {"probeKinds": ["kprobe"]}, "limits": {"defaultCpuPercent": 5, "maxCpuPercent": 20}})),
    )
    .await;
    w.create_job(&kprobe_job("shop", "cpuPercent: 20")).await;
    w.create_job(&kprobe_job("bank", "cpuPercent: 20")).await;
    w.settle("shop", "connects").await;
    w.settle("bank", "connects").await;

    assert_eq!(w.assignment_nodes("shop"), ["n1", "n2"]);
    for a in w
        .assignments_in(OPERATOR_NS)
        .iter()
        .filter(|a| a.spec.job.namespace.as_deref() == Some("shop"))
    {
        let p = a.spec.policy.as_ref().expect("the policy rides along");
        assert_eq!(p.name, "net-debug");
        assert_eq!(p.spec.limits.default_cpu_percent, Some(5));
    }
    assert!(w.assignment_nodes("bank").is_empty());
    let (reason, message) = failure(&w, "bank", "connects").await;
    assert_eq!(reason.as_deref(), Some("PolicyDenied"), "{message}");
    assert!(
        message.contains("refused by rule tenant-probe-kind"),
        "{message}"
    );
}

#[tokio::test]
async fn a_policys_limits_and_a_missing_policy_refuse_with_their_rule() {
    let w = world(World::new());
    govern(
        &w,
        "shop",
        "small",
        Some(json!({"allow": {"probeKinds": ["kprobe"]}, "limits": {"maxCpuPercent": 20, "maxMapEntries": 4096}})),
    )
    .await;
    govern(&w, "bank", "nowhere", None).await;
    w.create_job(&kprobe_job("shop", "cpuPercent: 50, mapEntries: 4096"))
        .await;
    w.create_job(&kprobe_job("bank", "cpuPercent: 5")).await;
    w.settle("shop", "connects").await;
    w.settle("bank", "connects").await;
    assert!(w.assignments_in(OPERATOR_NS).is_empty());

    let (reason, message) = failure(&w, "shop", "connects").await;
    assert_eq!(reason.as_deref(), Some("PolicyDenied"));
    assert!(
        message.contains(
            "refused by rule tenant-limits: spec.limits.cpuPercent=50 is over the 20 that TracePolicy small allows"
        ),
        "{message}"
    );
    let (reason, message) = failure(&w, "bank", "connects").await;
    assert_eq!(reason.as_deref(), Some("PolicyDenied"));
    assert!(
        message.contains("refused by rule tenant-policy: namespace bank is labelled fathom.dev/trace-policy=nowhere, and no TracePolicy nowhere exists"),
        "{message}"
    );
}

#[tokio::test]
async fn a_revoked_grant_fails_the_running_job_and_removes_its_assignments() {
    let w = world(World::new());
    govern(
        &w,
        "shop",
        "net-debug",
        Some(json!({"allow": {"probeKinds": ["kprobe"]}})),
    )
    .await;
    w.create_job(&kprobe_job("shop", "mapEntries: 1024")).await;
    w.settle("shop", "connects").await;
    assert_eq!(w.assignment_nodes("shop"), ["n1", "n2"]);
    w.runner_reports("shop", "n1", "Attached", 3).await;

    let policies: Api<fathom_crds::TracePolicy> = Api::all(w.client.clone());
    policies
        .patch(
            "net-debug",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"allow": {"probeKinds": []}}})),
        )
        .await
        .expect("revoke");
    w.settle("shop", "connects").await;
    let (reason, message) = failure(&w, "shop", "connects").await;
    assert_eq!(reason.as_deref(), Some("PolicyDenied"), "{message}");
    assert!(
        message.contains("refused by rule tenant-probe-kind"),
        "{message}"
    );
    // The assignments are being deleted (their runners detach, then release the finalizer).
    assert!(
        w.assignments_in(OPERATOR_NS)
            .iter()
            .all(|a| a.metadata.deletion_timestamp.is_some()),
        "{:?}",
        w.assignments_in(OPERATOR_NS)
    );
}
