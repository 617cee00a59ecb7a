//! RELIABILITY.md's operator requirements O1–O4, as tests named after them.

mod support;

use std::{path::PathBuf, sync::Arc, time::Duration};

use fathom_crds::{TraceAssignment, TraceJob, TraceJobSpec, assignment::DETACH_FINALIZER, crd};
use fathom_operator::{
    lifecycle::{CleanupSettings, Intent},
    plan::ClusterView,
    reconcile::{
        self, APPLY_CONFLICT, CONFLICT_BACKOFF_START, JOB_FINALIZER, MANAGER, ReconcileConfig,
        Tenancy, admit,
    },
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api,
    api::{Patch, PatchParams},
    core::cel::Validator,
    runtime::controller::Action,
};
use serde_json::{Value, json};
use support::{FATHOM, World, api::Call, node, pod, ready_node};

const WEB: &str = r#"
apiVersion: fathom.dev/v1alpha1
kind: TraceJob
metadata: { name: web-drops, namespace: shop }
spec:
  probe: { tracepoint: skb/kfree_skb }
  podSelector: { matchLabels: { app: web } }
  duration: 60s
"#;

fn shop_with(config: ReconcileConfig) -> World {
    let mut w = World::with_config(config);
    for n in ["n1", "n2"] {
        w.add_node(ready_node(n));
    }
    w.add_pod(pod("shop", "web-a", &[("app", "web")], "n1"));
    w.add_pod(pod("shop", "web-b", &[("app", "web")], "n2"));
    w
}

fn shop() -> World {
    shop_with(ReconcileConfig {
        operator_namespace: "fathom-system".into(),
        ..Default::default()
    })
}

async fn assert_no_writes(w: &World, ns: &str, name: &str, what: &str) {
    w.api.clear_calls();
    w.reconcile(ns, name).await;
    assert!(w.api.writes().is_empty(), "{what}: {:?}", w.api.writes());
}

// ---------------------------------------------------------------- O1

#[tokio::test]
async fn o1_reconciling_an_unchanged_job_makes_no_mutating_call() {
    let mut w = shop();
    w.add_node(node("down", &[], false, &[]));
    let jobs = [
        ("pending", WEB.replace("web-drops", "pending")),
        (
            "dry",
            format!("{}  dryRun: true\n", WEB.replace("web-drops", "dry")),
        ),
        (
            "off",
            format!("{}  suspend: true\n", WEB.replace("web-drops", "off")),
        ),
        ("bad", WEB.replace("web-drops", "bad").replace("60s", "2d")),
        (
            "wide",
            WEB.replace("web-drops", "wide")
                .replace("  podSelector: { matchLabels: { app: web } }\n", ""),
        ),
        (
            "nobody",
            WEB.replace("web-drops", "nobody")
                .replace("app: web", "app: none"),
        ),
    ];
    for (name, yaml) in &jobs {
        w.create_job(yaml).await;
        w.settle("shop", name).await;
        assert_no_writes(&w, "shop", name, name).await;
    }
    // Running, and finished.
    w.create_job(WEB).await;
    w.settle("shop", "web-drops").await;
    w.runner_reports("shop", "n1", "Attached", 5).await;
    w.settle("shop", "web-drops").await;
    assert_no_writes(&w, "shop", "web-drops", "running").await;
    w.clock.advance(61);
    w.runner_reports("shop", "n1", "Succeeded", 5).await;
    w.runner_reports("shop", "n2", "Succeeded", 0).await;
    w.settle("shop", "web-drops").await;
    assert_no_writes(&w, "shop", "web-drops", "finished").await;
}

#[tokio::test]
async fn o1_writes_use_one_field_manager_and_the_finalizer_comes_first() {
    let w = shop();
    w.create_job(WEB).await;
    w.api.clear_calls();
    w.reconcile("shop", "web-drops").await;
    let writes = w.api.writes();
    let finalizer = writes
        .iter()
        .position(|c| {
            c.method == "PATCH"
                && c.path.ends_with("/tracejobs/web-drops")
                && c.body.contains(JOB_FINALIZER)
        })
        .expect("finalizer added");
    let first_assignment = writes
        .iter()
        .position(|c| c.path.contains("/traceassignments/"))
        .expect("an assignment applied");
    assert!(finalizer < first_assignment, "{writes:?}");
    // The finalizer patch is guarded: a JSON patch whose first operation is a test.
    let patch = &writes[finalizer];
    assert!(
        patch.content_type.starts_with("application/json-patch"),
        "{patch:?}"
    );
    let ops: Value = serde_json::from_str(&patch.body).expect("json patch");
    assert_eq!(ops[0]["op"], "test", "{ops}");
    for c in &writes {
        assert_eq!(c.field_manager.as_deref(), Some(MANAGER), "{c:?}");
        assert!(!c.force, "no write takes fields by force: {c:?}");
    }
}

/// Reconciles once and returns the operator's writes (the test's own are not among them).
async fn operator_writes(w: &World, ns: &str, name: &str) -> Vec<Call> {
    w.api.clear_calls();
    w.reconcile(ns, name).await;
    w.api.writes()
}

#[tokio::test]
async fn o1_every_write_carries_the_field_manager() {
    let mut w = shop();
    let mut writes = Vec::new();
    w.create_job(WEB).await;
    for _ in 0..3 {
        writes.extend(operator_writes(&w, "shop", "web-drops").await);
    }
    w.runner_reports("shop", "n1", "Attached", 5).await;
    w.runner_reports("shop", "n2", "Attached", 7).await;
    writes.extend(operator_writes(&w, "shop", "web-drops").await);
    // A spec change (new assignment specs), then deletion with a lost node whose detach
    // finalizer the operator removes itself, then the job's own finalizer.
    Api::<TraceJob>::namespaced(w.client.clone(), "shop")
        .patch(
            "web-drops",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"suspend": true}})),
        )
        .await
        .expect("suspend");
    writes.extend(operator_writes(&w, "shop", "web-drops").await);
    w.remove_node("n2");
    w.delete_job("shop", "web-drops").await;
    writes.extend(operator_writes(&w, "shop", "web-drops").await);
    w.runner_detaches("shop", "n1").await;
    w.clock.advance(61);
    for _ in 0..2 {
        writes.extend(operator_writes(&w, "shop", "web-drops").await);
    }
    assert!(w.job("shop", "web-drops").await.is_none(), "deleted");

    let kinds = |pred: &dyn Fn(&Call) -> bool| writes.iter().filter(|c| pred(c)).count();
    assert!(kinds(&|c| c.path.contains("/traceassignments/") && c.method == "PATCH") > 0);
    assert!(kinds(&|c| c.path.ends_with("/status")) > 0);
    assert!(kinds(&|c| c.path.contains("/events")) > 0);
    assert!(kinds(&|c| c.content_type.starts_with("application/json-patch")) >= 3);
    assert!(kinds(&|c| c.method == "DELETE") > 0);
    for c in &writes {
        if c.method == "DELETE" {
            // A delete takes no field manager in the Kubernetes API.
            continue;
        }
        assert_eq!(c.field_manager.as_deref(), Some(MANAGER), "{c:?}");
        assert!(!c.force, "{c:?}");
    }
}

#[tokio::test]
async fn o1_finalizer_patch_keeps_foreign_finalizers() {
    let mut w = shop();
    w.create_job(WEB).await;
    let jobs = Api::<TraceJob>::namespaced(w.client.clone(), "shop");
    let other = PatchParams {
        field_manager: Some("other-controller".into()),
        ..Default::default()
    };

    // The operator read the job just before another controller added its finalizer.
    let stale = w.job("shop", "web-drops").await.expect("job");
    jobs.patch(
        "web-drops",
        &other,
        &Patch::Merge(json!({"metadata": {"finalizers": ["other.io/keep"]}})),
    )
    .await
    .expect("foreign finalizer");
    w.api.clear_calls();
    reconcile::reconcile(Arc::new(stale), w.ctx.clone())
        .await
        .expect("reconcile from a stale read");
    let job = w.job("shop", "web-drops").await.expect("job");
    assert_eq!(
        job.metadata.finalizers.clone().unwrap_or_default(),
        ["other.io/keep", JOB_FINALIZER]
    );
    let finalizer_patches = w
        .api
        .writes()
        .into_iter()
        .filter(|c| c.path.ends_with("/tracejobs/web-drops") && c.method == "PATCH")
        .count();
    assert_eq!(
        finalizer_patches, 2,
        "refused once, then retried on a fresh read"
    );
    w.settle("shop", "web-drops").await;

    // n2's runner is gone; another controller also holds its assignment.
    let n2 = w
        .assignments("shop")
        .into_iter()
        .find(|a| a.spec.node_name == "n2")
        .expect("n2's assignment");
    Api::<TraceAssignment>::namespaced(w.client.clone(), "fathom-system")
        .patch(
            n2.metadata.name.as_deref().expect("name"),
            &other,
            &Patch::Merge(json!({"metadata": {"finalizers": [DETACH_FINALIZER, "other.io/hold"]}})),
        )
        .await
        .expect("foreign finalizer on the assignment");
    w.remove_node("n2");
    w.delete_job("shop", "web-drops").await;
    w.reconcile("shop", "web-drops").await;
    w.runner_detaches("shop", "n1").await;
    w.clock.advance(61);
    w.reconcile("shop", "web-drops").await;
    let n2 = w
        .assignments("shop")
        .into_iter()
        .find(|a| a.spec.node_name == "n2")
        .expect("held by the other controller");
    assert_eq!(
        n2.metadata.finalizers.unwrap_or_default(),
        ["other.io/hold"],
        "only the detach finalizer was released"
    );
    // The other controller lets its assignment go.
    Api::<TraceAssignment>::namespaced(w.client.clone(), "fathom-system")
        .patch(
            n2.metadata.name.as_deref().expect("name"),
            &other,
            &Patch::Json::<()>(
                serde_json::from_value(json!([{"op": "remove", "path": "/metadata/finalizers/0"}]))
                    .expect("patch"),
            ),
        )
        .await
        .expect("other controller releases");
    assert!(w.assignments("shop").is_empty());

    // The operator read the job just before the other controller removed its own finalizer:
    // removing the operator's must not bring the other one back.
    let stale = w.job("shop", "web-drops").await.expect("job");
    jobs.patch(
        "web-drops",
        &other,
        &Patch::Json::<()>(
            serde_json::from_value(json!([
                {"op": "test", "path": "/metadata/finalizers/0", "value": "other.io/keep"},
                {"op": "remove", "path": "/metadata/finalizers/0"},
            ]))
            .expect("patch"),
        ),
    )
    .await
    .expect("other controller removes its finalizer");
    reconcile::reconcile(Arc::new(stale), w.ctx.clone())
        .await
        .expect("reconcile from a stale read");
    assert!(
        w.job("shop", "web-drops").await.is_none(),
        "both finalizers gone, so the job is"
    );
}

#[tokio::test]
async fn o1_apply_conflict_is_not_stolen() {
    let w = shop();
    w.create_job(WEB).await;
    w.settle("shop", "web-drops").await;
    let n1 = w.assignments("shop").remove(0);
    let name = n1.metadata.name.clone().expect("name");
    let assignments = Api::<TraceAssignment>::namespaced(w.client.clone(), "fathom-system");
    let edit = |suspend: bool| {
        let assignments = assignments.clone();
        let name = name.clone();
        async move {
            assignments
                .patch(
                    &name,
                    &PatchParams {
                        field_manager: Some("kubectl-edit".into()),
                        ..Default::default()
                    },
                    &Patch::Merge(json!({"spec": {"suspend": suspend}})),
                )
                .await
                .expect("edit by another field manager");
        }
    };
    // Someone edits the assignment: the field is now theirs.
    edit(true).await;

    w.api.clear_calls();
    let action = w.reconcile("shop", "web-drops").await;
    let writes = w.api.writes();
    let applies: Vec<&Call> = writes
        .iter()
        .filter(|c| c.path.ends_with(&format!("/traceassignments/{name}")))
        .collect();
    assert_eq!(applies.len(), 1, "{writes:?}");
    assert!(writes.iter().all(|c| !c.force), "{writes:?}");
    let stored = w.assignments("shop").remove(0);
    assert!(stored.spec.suspend, "the other manager's value stays");
    // Surfaced: the job's condition, a Warning Event, and a retry after a backoff.
    let job = w.job("shop", "web-drops").await.expect("job");
    let cond = job
        .status
        .as_ref()
        .and_then(|s| s.condition(APPLY_CONFLICT))
        .cloned()
        .expect("ApplyConflict condition");
    assert_eq!(cond.status, "True");
    for part in ["kubectl-edit", ".spec.suspend", name.as_str()] {
        assert!(cond.message.contains(part), "{part} in {}", cond.message);
    }
    let warnings: Vec<_> = w
        .events()
        .into_iter()
        .filter(|(t, r, _)| t == "Warning" && r == APPLY_CONFLICT)
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].2.contains(".spec.suspend"), "{warnings:?}");
    assert_eq!(action, Action::requeue(CONFLICT_BACKOFF_START));

    // Still in conflict: the apply is tried again, nothing else is written, and the next try
    // waits twice as long.
    w.api.clear_calls();
    let action = w.reconcile("shop", "web-drops").await;
    let writes = w.api.writes();
    assert_eq!(writes.len(), 1, "{writes:?}");
    assert_eq!(action, Action::requeue(CONFLICT_BACKOFF_START * 2));

    // The other manager agrees with the operator again: the condition goes, and the job settles
    // with no writes.
    edit(false).await;
    w.settle("shop", "web-drops").await;
    let job = w.job("shop", "web-drops").await.expect("job");
    assert!(
        job.status
            .as_ref()
            .and_then(|s| s.condition(APPLY_CONFLICT))
            .is_none(),
        "{:?}",
        job.status
    );
    assert_no_writes(&w, "shop", "web-drops", "after the conflict").await;
    let owners = w
        .api
        .owners(FATHOM, "traceassignments", "fathom-system", &name);
    assert!(
        owners[".spec.trace"].iter().any(|m| m.name == MANAGER),
        "{owners:?}"
    );
}

#[tokio::test]
async fn o1_status_apply_conflict_is_not_stolen() {
    let w = shop();
    w.create_job(WEB).await;
    w.settle("shop", "web-drops").await;
    // Another controller forces its own status message onto the job.
    Api::<TraceJob>::namespaced(w.client.clone(), "shop")
        .patch_status(
            "web-drops",
            &PatchParams::apply("other-controller").force(),
            &Patch::Apply(json!({
                "apiVersion": "fathom.dev/v1alpha1",
                "kind": "TraceJob",
                "status": {"message": "mine"},
            })),
        )
        .await
        .expect("other controller's status");
    w.api.clear_calls();
    let action = w.reconcile("shop", "web-drops").await;
    let job = w.job("shop", "web-drops").await.expect("job");
    assert_eq!(
        job.status.and_then(|s| s.message).as_deref(),
        Some("mine"),
        "not overwritten"
    );
    let warning = w
        .events()
        .into_iter()
        .find(|(t, r, _)| t == "Warning" && r == APPLY_CONFLICT)
        .expect("ApplyConflict event");
    assert!(
        warning.2.contains(".status.message") && warning.2.contains("other-controller"),
        "{warning:?}"
    );
    assert_eq!(action, Action::requeue(CONFLICT_BACKOFF_START));
    assert!(w.api.writes().iter().all(|c| !c.force));
}

// ---------------------------------------------------------------- O2

fn status_writes(w: &World) -> Vec<(usize, Value)> {
    w.api
        .calls()
        .into_iter()
        .enumerate()
        .filter(|(_, c)| c.method == "PATCH" && c.path.ends_with("/tracejobs/web-drops/status"))
        .map(|(i, c)| (i, serde_json::from_str(&c.body).expect("json body")))
        .collect()
}

#[tokio::test]
async fn o2_finalizer_goes_only_after_every_live_node_detached_with_final_status_first() {
    let w = shop();
    w.create_job(WEB).await;
    w.settle("shop", "web-drops").await;
    w.delete_job("shop", "web-drops").await;
    for _ in 0..3 {
        w.reconcile("shop", "web-drops").await;
        w.clock.advance(30);
    }
    let job = w
        .job("shop", "web-drops")
        .await
        .expect("live nodes hold the job");
    assert!(
        job.metadata
            .finalizers
            .iter()
            .flatten()
            .any(|f| f == JOB_FINALIZER)
    );
    let msg = job.status.and_then(|s| s.message).unwrap_or_default();
    assert!(msg.contains("n1") && msg.contains("n2"), "{msg}");

    w.runner_detaches("shop", "n1").await;
    w.runner_detaches("shop", "n2").await;
    w.api.clear_calls();
    w.reconcile("shop", "web-drops").await;
    assert!(w.job("shop", "web-drops").await.is_none());
    let calls = w.api.calls();
    let removal = calls
        .iter()
        .position(|c| {
            c.method == "PATCH"
                && c.path.ends_with("/tracejobs/web-drops")
                && c.body.contains(r#""op":"remove""#)
        })
        .expect("finalizer removed");
    let (at, last) = status_writes(&w).pop().expect("final status written");
    assert!(at < removal);
    assert_eq!(
        last["status"]["message"],
        json!("deleted: every node has detached")
    );
}

#[tokio::test]
async fn o2_assignments_of_a_vanished_node_are_collected_after_a_timeout() {
    let mut w = shop();
    w.create_job(WEB).await;
    w.settle("shop", "web-drops").await;
    w.remove_node("n2");
    w.delete_job("shop", "web-drops").await;
    w.reconcile("shop", "web-drops").await;
    w.runner_detaches("shop", "n1").await;
    w.clock.advance(30);
    w.reconcile("shop", "web-drops").await;
    assert!(
        w.job("shop", "web-drops").await.is_some(),
        "before the timeout the lost node still holds it"
    );
    w.clock.advance(31);
    w.reconcile("shop", "web-drops").await; // releases n2's assignment
    w.reconcile("shop", "web-drops").await; // sees none left, lets the job go
    assert!(w.job("shop", "web-drops").await.is_none());
    assert!(w.assignments("shop").is_empty());
}

#[tokio::test]
async fn o2_a_stuck_runner_on_a_ready_node_does_not_hang_deletion_forever() {
    let w = shop_with(ReconcileConfig {
        operator_namespace: "fathom-system".into(),
        cleanup: CleanupSettings {
            lost_node_timeout: Duration::from_secs(60),
            stuck_timeout: Duration::from_secs(600),
        },
        ..Default::default()
    });
    w.create_job(WEB).await;
    w.settle("shop", "web-drops").await;
    w.delete_job("shop", "web-drops").await;
    w.reconcile("shop", "web-drops").await;
    w.clock.advance(599);
    w.reconcile("shop", "web-drops").await;
    assert!(w.job("shop", "web-drops").await.is_some());
    w.clock.advance(2);
    w.reconcile("shop", "web-drops").await;
    w.reconcile("shop", "web-drops").await;
    assert!(w.job("shop", "web-drops").await.is_none());
}

// ---------------------------------------------------------------- O3

#[tokio::test]
async fn o3_observed_generation_follows_generation_within_one_reconcile() {
    let w = shop();
    w.create_job(WEB).await;
    w.reconcile("shop", "web-drops").await;
    let job = w.job("shop", "web-drops").await.expect("job");
    let st = job
        .status
        .as_ref()
        .expect("status after the first reconcile");
    assert_eq!(st.observed_generation, job.metadata.generation);
    let ready = st
        .condition("Ready")
        .expect("a Ready condition from the first reconcile");
    assert_eq!(ready.observed_generation, job.metadata.generation);

    Api::<TraceJob>::namespaced(w.client.clone(), "shop")
        .patch(
            "web-drops",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"nodeSelector": {"kubernetes.io/os": "linux"}}})),
        )
        .await
        .expect("change spec");
    w.reconcile("shop", "web-drops").await;
    let job = w.job("shop", "web-drops").await.expect("job");
    assert_eq!(job.metadata.generation, Some(2));
    let st = job.status.expect("status");
    assert_eq!(st.observed_generation, Some(2));
    assert!(
        st.conditions
            .iter()
            .all(|c| c.observed_generation == Some(2))
    );
}

#[tokio::test]
async fn o3_last_transition_time_moves_only_when_a_condition_flips() {
    let w = shop();
    w.create_job(WEB).await;
    w.settle("shop", "web-drops").await;
    let ready = |j: &TraceJob| {
        j.status
            .as_ref()
            .and_then(|s| s.condition("Ready"))
            .cloned()
            .expect("Ready")
    };
    let t0 = ready(&w.job("shop", "web-drops").await.expect("job"));
    assert_eq!(t0.status, "False");

    // One node attaches: still False (waiting for the other), new message, same time.
    w.clock.advance(10);
    w.runner_reports("shop", "n1", "Attached", 1).await;
    w.settle("shop", "web-drops").await;
    let t1 = ready(&w.job("shop", "web-drops").await.expect("job"));
    assert_eq!(t1.status, "False");
    assert_ne!(t1.message, t0.message);
    assert_eq!(t1.last_transition_time, t0.last_transition_time);

    // Both attached: flips to True, the time moves.
    w.clock.advance(10);
    w.runner_reports("shop", "n2", "Attached", 1).await;
    w.settle("shop", "web-drops").await;
    let t2 = ready(&w.job("shop", "web-drops").await.expect("job"));
    assert_eq!(t2.status, "True");
    assert!(t2.last_transition_time.0 > t1.last_transition_time.0);

    // More hits: the condition does not move.
    w.clock.advance(10);
    w.runner_reports("shop", "n2", "Attached", 100).await;
    w.settle("shop", "web-drops").await;
    let t3 = ready(&w.job("shop", "web-drops").await.expect("job"));
    assert_eq!(t3, t2);
}

#[tokio::test]
async fn o3_per_node_detail_lives_in_the_assignments() {
    let mut w = World::new();
    for i in 0..50 {
        let n = format!("n{i:02}");
        w.add_node(ready_node(&n));
        w.add_pod(pod("shop", &format!("web-{i:02}"), &[("app", "web")], &n));
    }
    w.create_job(WEB).await;
    w.settle("shop", "web-drops").await;
    assert_eq!(w.assignments("shop").len(), 50);
    w.runner_reports("shop", "n00", "Attached", 1).await;
    for i in 1..50 {
        w.runner_status(
            "shop",
            &format!("n{i:02}"),
            json!({"phase": "NotFeasible", "verdict": {"feasible": false, "probes": [
                {"probe": "tracepoint:skb/kfree_skb", "feasible": false, "reason": "SymbolNotFound", "message": "missing"}]}}),
        )
        .await;
    }
    w.settle("shop", "web-drops").await;
    let job = w.job("shop", "web-drops").await.expect("job");
    let st = job.status.clone().expect("status");
    assert_eq!(st.nodes.as_ref().map(|n| n.not_feasible), Some(49));
    assert_eq!(st.not_feasible.len(), 10, "a bounded list");
    let msg = &st.condition("NotFeasible").expect("condition").message;
    assert!(msg.contains("and 39 more"), "{msg}");
    assert!(serde_json::to_string(&st).expect("json").len() < 8 * 1024);
}

// ---------------------------------------------------------------- O4

/// The committed CRD, as the cluster gets it.
fn committed_crd(file: &str) -> Value {
    let path = crd::generated_dir().join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let crd: CustomResourceDefinition = serde_yaml::from_str(&text).expect("CRD yaml");
    crd::schema_json(&crd)
}

/// One row of `e2e/manifests/o4-invalid-specs.yaml`: the invalid specs, checked here offline
/// (the CRD's CEL rules, the operator's admission) and by the e2e suite on the real API
/// server, from the one file.
#[derive(Debug, serde::Deserialize)]
struct InvalidSpec {
    spec: String,
    cel: String,
    field: String,
    operator: String,
}

fn invalid_specs() -> Vec<InvalidSpec> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../e2e/manifests/o4-invalid-specs.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn as_tracejob(spec_yaml: &str) -> Value {
    let spec: Value = serde_yaml::from_str(spec_yaml).expect("spec yaml");
    let mut spec = spec;
    if spec.get("targetRef").is_none() {
        spec["podSelector"] = json!({"matchLabels": {"app": "web"}});
    }
    json!({
        "apiVersion": "fathom.dev/v1alpha1", "kind": "TraceJob",
        "metadata": {"name": "t", "namespace": "shop"},
        "spec": spec,
    })
}

#[test]
fn o4_invalid_specs_are_rejected_by_the_cel_rules_and_by_the_operator() {
    let cases = invalid_specs();
    assert!(cases.len() >= 20, "{} cases", cases.len());
    let schema = committed_crd("tracejobs.fathom.dev.yaml");
    let validator = Validator::new();
    let view = ClusterView::default();
    let mut failures = Vec::new();
    for InvalidSpec {
        spec: spec_yaml,
        cel: cel_msg,
        field,
        operator: op_msg,
    } in &cases
    {
        let obj = as_tracejob(spec_yaml);
        // The CRD's CEL rules, evaluated offline.
        match validator.validate(&schema, &obj, None) {
            Ok(()) => failures.push(format!("CEL accepted: {spec_yaml}")),
            Err(errors) => {
                if !errors
                    .iter()
                    .any(|e| e.message.contains(cel_msg) && e.field_path.starts_with("spec"))
                {
                    failures.push(format!(
                        "CEL rejected {spec_yaml:?} without {cel_msg:?}: {:?}",
                        errors
                            .iter()
                            .map(|e| (&e.field_path, &e.message))
                            .collect::<Vec<_>>()
                    ));
                }
            }
        }
        // The operator's admission.
        let spec: TraceJobSpec =
            serde_json::from_value(obj["spec"].clone()).expect("spec deserializes");
        match admit(&spec, Some("shop"), &Tenancy::Namespace(None), None, &view) {
            Intent::Invalid(errors) => {
                if !errors
                    .iter()
                    .any(|e| e.field == *field && e.message.contains(op_msg))
                {
                    failures.push(format!(
                        "operator rejected {spec_yaml:?} without {field}: {op_msg:?}: {errors:?}"
                    ));
                }
            }
            other => failures.push(format!("operator did not reject {spec_yaml:?}: {other:?}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn o4_a_node_wide_tracejob_is_refused_by_the_operator() {
    let view = ClusterView::default();
    let spec: TraceJobSpec = serde_yaml::from_str("probe: { catalog: syscalls }").expect("spec");
    match admit(&spec, Some("shop"), &Tenancy::Namespace(None), None, &view) {
        Intent::Rejected(reason, message) => {
            assert_eq!(reason, "NodeWideNeedsClusterTraceJob");
            assert!(message.contains("ClusterTraceJob"));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        admit(&spec, None, &Tenancy::Cluster, None, &view),
        Intent::Planned { .. }
    ));
}

#[test]
fn o4_golden_examples_pass_the_cel_rules_and_the_operator() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let tj = committed_crd("tracejobs.fathom.dev.yaml");
    let ctj = committed_crd("clustertracejobs.fathom.dev.yaml");
    let validator = Validator::new();
    let view = ClusterView::default();
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("examples/") {
        let path = entry.expect("entry").path();
        if !matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value: Value = serde::Deserialize::deserialize(doc).expect("yaml");
            if value.is_null() {
                continue;
            }
            let p = path.display();
            let cluster = value["kind"] == json!("ClusterTraceJob");
            let schema = if cluster { &ctj } else { &tj };
            if let Err(e) = validator.validate(schema, &value, None) {
                panic!("{p}: CEL: {e:?}");
            }
            let spec: TraceJobSpec = serde_json::from_value(value["spec"].clone()).expect("spec");
            let ns = value
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .or(Some("default"));
            let workload = spec.target_ref.as_ref().map(|_| {
                Ok(k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector::default())
            });
            match admit(
                &spec,
                if cluster { None } else { ns },
                &if cluster {
                    Tenancy::Cluster
                } else {
                    Tenancy::Namespace(None)
                },
                workload,
                &view,
            ) {
                Intent::Planned { .. } => {}
                // An example without pod targets is node-wide: `fathom run` runs it as is; in a
                // cluster it is a ClusterTraceJob, which must accept it (also when the tenant
                // rules refuse it first, e.g. runqlat, which times every task of the node).
                Intent::Rejected("NodeWideNeedsClusterTraceJob" | "PolicyDenied", _)
                    if spec.pod_selector.is_none() && spec.target_ref.is_none() =>
                {
                    assert!(
                        matches!(
                            admit(&spec, None, &Tenancy::Cluster, None, &view),
                            Intent::Planned { .. }
                        ),
                        "{p}"
                    );
                }
                other => panic!("{p}: {other:?}"),
            }
            n += 1;
        }
    }
    assert!(n >= 2, "examples found: {n}");
}
