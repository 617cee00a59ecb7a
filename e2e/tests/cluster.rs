//! The operator against a real cluster: CRDs install (and their CEL rules reject an invalid
//! job at admission), a TraceJob is planned onto the nodes where its pods run, a dry run
//! reports its plan, a ClusterTraceJob covers the eligible nodes, and deletion cleans up.
//!
//! Opt-in and separate: these tests are `#[ignore]`d, so a plain `cargo test` lists them as
//! ignored; run them with a disposable cluster in `KUBECONFIG`:
//!
//! ```sh
//! kind create cluster --name fathom-e2e --config e2e/kind.yaml
//! FATHOM_E2E=1 cargo test -p fathom-e2e -- --ignored --test-threads=1
//! ```
//!
//! The node runner is not deployed (it lands with the next issue); where a test needs one, it
//! plays the runner's part in the API (status writes, removing the detach finalizer).

use std::{collections::BTreeSet, time::Duration};

use clap::Parser;
use fathom_crds::{
    ClusterTraceJob, JobPhase, TraceAssignment, TraceJob, TraceResult,
    assignment::{DETACH_FINALIZER, JOB_UID_LABEL},
    crd,
};
use fathom_operator::{
    config::Cli,
    plan::{ClusterView, PlanInput, Targets, daemonset_default_tolerations, plan_assignments},
};
use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        core::v1::{Namespace, Node, Pod},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    runtime::{conditions, wait::await_condition},
};
use serde_json::json;
use tokio::sync::watch;

const MANAGER: &str = "fathom-e2e";

async fn client() -> Client {
    assert_eq!(
        std::env::var("FATHOM_E2E").as_deref(),
        Ok("1"),
        "set FATHOM_E2E=1 (and KUBECONFIG to a disposable kind/k3d cluster) to run the e2e suite"
    );
    Client::try_default()
        .await
        .expect("a cluster through KUBECONFIG")
}

/// Polls `f` every 500 ms until it returns Some, for at most `secs`.
async fn eventually<T, F, Fut>(secs: u64, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn install_crds(client: &Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for c in crd::all() {
        let name = c.name_any();
        api.patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&c),
        )
        .await
        .unwrap_or_else(|e| panic!("installing {name}: {e}"));
        tokio::time::timeout(
            Duration::from_secs(30),
            await_condition(api.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .unwrap_or_else(|_| panic!("{name} not established"))
        .expect("watch CRD");
    }
}

async fn namespace(client: &Client, name: &str) {
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).expect("ns");
    match Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("creating namespace {name}: {e}"),
    }
}

/// Starts the operator in this process (leader election, controllers, endpoints).
fn start_operator(client: Client, operator_ns: &str) -> watch::Sender<bool> {
    let cli = Cli::parse_from([
        "fathom-operator",
        "--namespace",
        operator_ns,
        "--identity",
        "e2e",
        "--http-addr",
        "127.0.0.1:0",
        "--stuck-seconds",
        "20",
        "--lease-seconds",
        "6",
    ]);
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        if let Err(e) = fathom_operator::controller::run_operator(client, cli.run, rx).await {
            panic!("operator stopped: {e}");
        }
    });
    tx
}

async fn web_deployment(client: &Client, ns: &str, replicas: i32) -> BTreeSet<String> {
    let d: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web", "namespace": ns},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "main", "image": "registry.k8s.io/pause:3.9"}]}
            }
        }
    }))
    .expect("deployment");
    Api::<Deployment>::namespaced(client.clone(), ns)
        .patch(
            "web",
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&d),
        )
        .await
        .expect("apply deployment");
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    eventually(120, "web pods running", || {
        let pods = pods.clone();
        async move {
            let list = pods
                .list(&ListParams::default().labels("app=web"))
                .await
                .ok()?;
            let running: Vec<&Pod> = list
                .items
                .iter()
                .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
                .collect();
            (running.len() == replicas as usize).then(|| {
                running
                    .iter()
                    .filter_map(|p| p.spec.as_ref()?.node_name.clone())
                    .collect()
            })
        }
    })
    .await
}

async fn assignments_of(client: &Client, ns: &str, uid: &str) -> Vec<TraceAssignment> {
    Api::<TraceAssignment>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!("{JOB_UID_LABEL}={uid}")))
        .await
        .expect("list assignments")
        .items
}

#[tokio::test]
#[ignore = "needs a real cluster: FATHOM_E2E=1 KUBECONFIG=… cargo test -p fathom-e2e -- --ignored"]
async fn tracejob_is_planned_onto_nodes_and_cleaned_up() {
    let client = client().await;
    install_crds(&client).await;
    let (ns, op_ns) = ("fathom-e2e", "fathom-e2e-system");
    namespace(&client, ns).await;
    namespace(&client, op_ns).await;
    let stop = start_operator(client.clone(), op_ns);
    let pod_nodes = web_deployment(&client, ns, 2).await;
    let jobs: Api<TraceJob> = Api::namespaced(client.clone(), ns);

    // The CRD's CEL rules reject an invalid job at admission.
    let bad: TraceJob = serde_json::from_value(json!({
        "apiVersion": "fathom.dev/v1alpha1", "kind": "TraceJob",
        "metadata": {"name": "too-long", "namespace": ns},
        "spec": {"probe": {"tracepoint": "skb/kfree_skb"}, "duration": "2d",
                 "podSelector": {"matchLabels": {"app": "web"}}}
    }))
    .expect("job");
    match jobs.create(&PostParams::default(), &bad).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 422, "{s:?}");
            assert!(s.message.contains("is not a duration"), "{}", s.message);
        }
        other => panic!("the API server accepted an invalid job: {other:?}"),
    }

    // A valid job is planned onto exactly the nodes of the web pods.
    let job: TraceJob = serde_json::from_value(json!({
        "apiVersion": "fathom.dev/v1alpha1", "kind": "TraceJob",
        "metadata": {"name": "web-drops", "namespace": ns},
        "spec": {"probe": {"tracepoint": "skb/kfree_skb"}, "aggregate": {"by": ["pod", "kstack"]},
                 "duration": "60s", "podSelector": {"matchLabels": {"app": "web"}}}
    }))
    .expect("job");
    let _ = jobs.delete("web-drops", &DeleteParams::default()).await;
    let job = jobs
        .create(&PostParams::default(), &job)
        .await
        .expect("create job");
    let uid = job.uid().expect("uid");
    let planned: BTreeSet<String> = eventually(60, "assignments on the pods' nodes", || {
        let (client, uid, want) = (client.clone(), uid.clone(), pod_nodes.clone());
        async move {
            let nodes: BTreeSet<String> = assignments_of(&client, ns, &uid)
                .await
                .into_iter()
                .map(|a| a.spec.node_name)
                .collect();
            (nodes == want).then_some(nodes)
        }
    })
    .await;
    assert_eq!(planned, pod_nodes);
    let job = eventually(30, "status", || {
        let jobs = jobs.clone();
        async move {
            let j = jobs.get("web-drops").await.ok()?;
            let st = j.status.as_ref()?;
            (st.observed_generation == j.metadata.generation && st.condition("Ready").is_some())
                .then_some(j)
        }
    })
    .await;
    let st = job.status.expect("status");
    assert_eq!(st.phase, Some(JobPhase::Pending));
    assert_eq!(
        st.nodes.as_ref().map(|n| n.desired as usize),
        Some(pod_nodes.len())
    );
    assert!(
        job.metadata
            .finalizers
            .iter()
            .flatten()
            .any(|f| f == "fathom.dev/cleanup")
    );
    let results: Api<TraceResult> = Api::namespaced(client.clone(), ns);
    assert!(
        results
            .get_opt("web-drops")
            .await
            .expect("get result")
            .is_some()
    );

    // Playing one node's runner: the job runs.
    let a = assignments_of(&client, ns, &uid).await.remove(0);
    Api::<TraceAssignment>::namespaced(client.clone(), ns)
        .patch_status(
            &a.name_any(),
            &PatchParams::apply("fathom-node-runner").force(),
            &Patch::Apply(json!({
                "apiVersion": "fathom.dev/v1alpha1", "kind": "TraceAssignment",
                "status": {"phase": "Attached", "run": a.spec.run,
                           "counters": fathom_crds::result::Totals { hits: 42, ..Default::default() }}
            })),
        )
        .await
        .expect("runner status");
    eventually(30, "phase Running", || {
        let jobs = jobs.clone();
        async move {
            let j = jobs.get("web-drops").await.ok()?;
            (j.status?.phase == Some(JobPhase::Running)).then_some(())
        }
    })
    .await;

    // Deletion: the finalizer holds the job until the runners detach.
    jobs.delete("web-drops", &DeleteParams::default())
        .await
        .expect("delete");
    eventually(30, "assignments terminating", || {
        let (client, uid) = (client.clone(), uid.clone());
        async move {
            let all = assignments_of(&client, ns, &uid).await;
            all.iter()
                .all(|a| a.metadata.deletion_timestamp.is_some())
                .then_some(())
        }
    })
    .await;
    assert!(
        jobs.get_opt("web-drops").await.expect("get").is_some(),
        "held by its finalizer"
    );
    for a in assignments_of(&client, ns, &uid).await {
        let keep: Vec<String> = a
            .finalizers()
            .iter()
            .filter(|f| *f != DETACH_FINALIZER)
            .cloned()
            .collect();
        Api::<TraceAssignment>::namespaced(client.clone(), ns)
            .patch(
                &a.name_any(),
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"finalizers": keep}})),
            )
            .await
            .expect("runner detaches");
    }
    eventually(60, "job gone", || {
        let jobs = jobs.clone();
        async move {
            jobs.get_opt("web-drops")
                .await
                .ok()?
                .is_none()
                .then_some(())
        }
    })
    .await;
    eventually(60, "result collected", || {
        let results = results.clone();
        async move {
            results
                .get_opt("web-drops")
                .await
                .ok()?
                .is_none()
                .then_some(())
        }
    })
    .await;
    let _ = stop.send(true);
}

#[tokio::test]
#[ignore = "needs a real cluster: FATHOM_E2E=1 KUBECONFIG=… cargo test -p fathom-e2e -- --ignored"]
async fn dry_run_and_cluster_wide_jobs_follow_the_real_nodes() {
    let client = client().await;
    install_crds(&client).await;
    let (ns, op_ns) = ("fathom-e2e-dry", "fathom-e2e-system2");
    namespace(&client, ns).await;
    namespace(&client, op_ns).await;
    let stop = start_operator(client.clone(), op_ns);
    let pod_nodes = web_deployment(&client, ns, 2).await;

    let jobs: Api<TraceJob> = Api::namespaced(client.clone(), ns);
    let dry: TraceJob = serde_json::from_value(json!({
        "apiVersion": "fathom.dev/v1alpha1", "kind": "TraceJob",
        "metadata": {"name": "dry", "namespace": ns},
        "spec": {"probe": {"kprobe": "tcp_v4_connect"}, "dryRun": true,
                 "targetRef": {"kind": "Deployment", "name": "web"}}
    }))
    .expect("job");
    let _ = jobs.delete("dry", &DeleteParams::default()).await;
    let dry = jobs
        .create(&PostParams::default(), &dry)
        .await
        .expect("create");
    let plan = eventually(60, "dry-run plan", || {
        let jobs = jobs.clone();
        async move { jobs.get("dry").await.ok()?.status?.plan }
    })
    .await;
    assert_eq!(plan.node_count as usize, pod_nodes.len());
    assert_eq!(plan.pod_count, 2);
    assert!(
        assignments_of(&client, ns, &dry.uid().expect("uid"))
            .await
            .is_empty()
    );

    // A node-wide ClusterTraceJob lands on exactly the nodes the planner finds eligible.
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("nodes")
        .items;
    let tolerations = daemonset_default_tolerations();
    let pods: Vec<Pod> = Vec::new();
    let view = ClusterView::new(&nodes, &pods, &tolerations);
    let expected: BTreeSet<String> = plan_assignments(
        &PlanInput {
            namespace: None,
            node_selector: None,
            targets: Targets::NodeWide,
        },
        &view,
    )
    .nodes
    .keys()
    .map(|n| n.to_string())
    .collect();
    let cjobs: Api<ClusterTraceJob> = Api::all(client.clone());
    let cj: ClusterTraceJob = serde_json::from_value(json!({
        "apiVersion": "fathom.dev/v1alpha1", "kind": "ClusterTraceJob",
        "metadata": {"name": "fathom-e2e-wide"},
        "spec": {"probe": {"catalog": "syscalls"}, "duration": "30s"}
    }))
    .expect("job");
    let _ = cjobs
        .delete("fathom-e2e-wide", &DeleteParams::default())
        .await;
    let cj = cjobs
        .create(&PostParams::default(), &cj)
        .await
        .expect("create");
    let uid = cj.uid().expect("uid");
    eventually(60, "node-wide assignments", || {
        let (client, uid, expected) = (client.clone(), uid.clone(), expected.clone());
        async move {
            let got: BTreeSet<String> = assignments_of(&client, op_ns, &uid)
                .await
                .into_iter()
                .map(|a| a.spec.node_name)
                .collect();
            (got == expected).then_some(())
        }
    })
    .await;
    // No runner: the operator gives up on the Ready nodes' runners after --stuck-seconds.
    cjobs
        .delete("fathom-e2e-wide", &DeleteParams::default())
        .await
        .expect("delete");
    eventually(90, "cluster job gone", || {
        let cjobs = cjobs.clone();
        async move {
            cjobs
                .get_opt("fathom-e2e-wide")
                .await
                .ok()?
                .is_none()
                .then_some(())
        }
    })
    .await;
    let _ = jobs.delete("dry", &DeleteParams::default()).await;
    let _ = stop.send(true);
}
