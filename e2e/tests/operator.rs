//! The operator, as a real `fathom-operator` process with its own ServiceAccount and least
//! privilege RBAC, against the real API server: planning onto the nodes of real pods, status,
//! dry runs, node-wide ClusterTraceJobs, no writes once settled (O1, from the audit log),
//! apply conflicts, deletion with the garbage collector (O2), and leader election between two
//! processes.
//!
//! No node runner is deployed: where a runner is needed the test writes what it would.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use anyhow::{anyhow, ensure};
use fathom_crds::{ClusterTraceJob, JobPhase, TraceAssignment, TraceJob, TraceResult};
use fathom_e2e::{
    AuditEvent, AuditLog, ClusterJobGuard, GC_USER, OPERATOR_2_USER, OPERATOR_NAMESPACE,
    OPERATOR_USER, OperatorOptions, TestNamespace, admin, apply_manifest, assignments_of,
    busybox_deployment, create_job, env, eventually, install_crds, lease_holder, runner_detaches,
    runner_reports, running_pods, scale, secs, service_account_kubeconfig, sim_node_tolerations,
};
use fathom_operator::{
    plan::{ClusterView, PlanInput, Targets, daemonset_default_tolerations, plan_assignments},
    reconcile::{JOB_FINALIZER, MANAGER as OPERATOR_MANAGER},
};
use k8s_openapi::api::core::v1::{Event, Node, Pod, Toleration};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

fn web_job() -> Value {
    json!({
        "probe": {"tracepoint": "skb/kfree_skb"},
        "aggregate": {"by": ["pod", "kstack"]},
        "duration": "1h",
        "podSelector": {"matchLabels": {"app": "web"}}
    })
}

/// Waits until the job has exactly one assignment per node of `nodes`; returns them.
async fn wait_assignments(
    client: &Client,
    ns: &str,
    uid: &str,
    nodes: &BTreeSet<String>,
) -> Vec<TraceAssignment> {
    eventually(secs(60), format!("assignments on {nodes:?}"), async || {
        let all = assignments_of(client, ns, uid).await?;
        let got: BTreeSet<String> = all.iter().map(|a| a.spec.node_name.clone()).collect();
        ensure!(got == *nodes && all.len() == nodes.len(), "on {got:?}");
        Ok(all)
    })
    .await
}

/// Waits until the job's status satisfies `ok`; returns the job.
async fn wait_job(
    jobs: &Api<TraceJob>,
    name: &str,
    what: &str,
    ok: impl Fn(&TraceJob) -> bool,
) -> TraceJob {
    eventually(secs(60), format!("TraceJob {name}: {what}"), async || {
        let j = jobs.get(name).await?;
        ensure!(ok(&j), "status {:?}", j.status);
        Ok(j)
    })
    .await
}

fn phase(j: &TraceJob) -> Option<JobPhase> {
    j.status.as_ref().and_then(|s| s.phase)
}

fn ready_status(j: &TraceJob) -> Option<&str> {
    j.status
        .as_ref()
        .and_then(|s| s.condition("Ready"))
        .map(|c| c.status.as_str())
}

#[tokio::test]
async fn tracejob_is_planned_onto_the_node_of_its_pods_and_runs_once_a_runner_attaches() {
    let client = admin().await;
    install_crds(&client).await;
    let ns = TestNamespace::create(&client, "planned").await;
    let ns = ns.as_str();
    let _op = OperatorOptions::new("planned").start(&client).await;
    let node = env().real_node.clone();
    busybox_deployment(&client, ns, "web", 2, &node).await;
    running_pods(&client, ns, "web", 2).await;

    let job = create_job(&client, ns, "web-drops", web_job()).await;
    let uid = job.uid().expect("uid");
    let assignments = wait_assignments(&client, ns, &uid, &BTreeSet::from([node.clone()])).await;
    let jobs: Api<TraceJob> = Api::namespaced(client.clone(), ns);
    let job = wait_job(&jobs, "web-drops", "observedGeneration and Ready", |j| {
        j.status.as_ref().is_some_and(|s| {
            s.observed_generation == j.metadata.generation && s.condition("Ready").is_some()
        })
    })
    .await;
    let st = job.status.clone().expect("status");
    assert_eq!(st.phase, Some(JobPhase::Pending));
    assert_eq!(st.nodes.as_ref().map(|n| n.desired), Some(1));
    assert!(
        job.finalizers().iter().any(|f| f == JOB_FINALIZER),
        "{:?}",
        job.finalizers()
    );
    let results: Api<TraceResult> = Api::namespaced(client.clone(), ns);
    eventually(secs(30), "the job's TraceResult", async || {
        results
            .get_opt("web-drops")
            .await?
            .ok_or_else(|| anyhow!("none yet"))
    })
    .await;

    // Playing the node's runner: the job runs, its result sums the runner's counters.
    runner_reports(&client, &assignments[0], "Attached", 42).await;
    wait_job(&jobs, "web-drops", "Running and Ready", |j| {
        phase(j) == Some(JobPhase::Running) && ready_status(j) == Some("True")
    })
    .await;
    eventually(secs(30), "TraceResult total 42", async || {
        let r = results.get("web-drops").await?;
        let total = r.status.as_ref().map(|s| s.total);
        ensure!(total == Some(42), "total {total:?}");
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn dry_run_and_cluster_wide_jobs_follow_the_real_nodes() {
    let client = admin().await;
    install_crds(&client).await;
    let ns = TestNamespace::create(&client, "dry").await;
    let ns = ns.as_str();
    let mut options = OperatorOptions::new("dry");
    options.stuck_seconds = 10;
    let extra = sim_node_tolerations(&client).await;
    options.runner_tolerations = Some(extra.clone());
    let _op = options.start(&client).await;
    let node = env().real_node.clone();
    busybox_deployment(&client, ns, "web", 2, &node).await;
    running_pods(&client, ns, "web", 2).await;

    // A dry run with a targetRef reports its plan and creates no assignment.
    let dry = create_job(
        &client,
        ns,
        "dry",
        json!({"probe": {"catalog": "tcp-connect"}, "dryRun": true,
               "targetRef": {"kind": "Deployment", "name": "web"}}),
    )
    .await;
    let jobs: Api<TraceJob> = Api::namespaced(client.clone(), ns);
    let job = wait_job(&jobs, "dry", "a dry-run plan", |j| {
        j.status.as_ref().is_some_and(|s| s.plan.is_some())
    })
    .await;
    let plan = job.status.and_then(|s| s.plan).expect("plan");
    assert_eq!(plan.node_count, 1, "{plan:?}");
    assert_eq!(plan.pod_count, 2, "{plan:?}");
    assert_eq!(
        plan.nodes.first().map(|n| n.node.as_str()),
        Some(node.as_str())
    );
    assert!(
        assignments_of(&client, ns, &dry.uid().expect("uid"))
            .await
            .expect("list")
            .is_empty()
    );

    // A node-wide ClusterTraceJob lands on exactly the nodes the planner finds eligible: the
    // real node and the Ready simulated ones.
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("nodes")
        .items;
    let mut tolerations = daemonset_default_tolerations();
    tolerations.extend(serde_json::from_value::<Vec<Toleration>>(extra).expect("tolerations"));
    let no_pods: Vec<Pod> = Vec::new();
    let view = ClusterView::new(&nodes, &no_pods, &tolerations);
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
    assert!(expected.contains(&node), "{expected:?}");
    let cjobs: Api<ClusterTraceJob> = Api::all(client.clone());
    let name = "fathom-e2e-wide";
    let _guard = ClusterJobGuard {
        name: name.to_string(),
    };
    let cj: ClusterTraceJob = serde_json::from_value(json!({
        "apiVersion": "fathom.dev/v1alpha1", "kind": "ClusterTraceJob",
        "metadata": {"name": name},
        "spec": {"probe": {"catalog": "syscalls"}, "duration": "30s"}
    }))
    .expect("job");
    let cj = cjobs
        .create(&PostParams::default(), &cj)
        .await
        .expect("create ClusterTraceJob");
    wait_assignments(
        &client,
        OPERATOR_NAMESPACE,
        &cj.uid().expect("uid"),
        &expected,
    )
    .await;

    // No runner: the operator gives up on the Ready nodes' runners after --stuck-seconds.
    cjobs
        .delete(name, &DeleteParams::default())
        .await
        .expect("delete");
    eventually(secs(90), "the ClusterTraceJob gone", async || {
        ensure!(cjobs.get_opt(name).await?.is_none(), "still there");
        Ok(())
    })
    .await;
}

/// Sets up a running job on the real node: namespace, one web pod, the job, its assignment
/// reported Attached by a played runner, status Running and Ready.
async fn running_job(
    client: &Client,
    ns: &str,
    job_name: &str,
) -> (TraceJob, Vec<TraceAssignment>) {
    let node = env().real_node.clone();
    busybox_deployment(client, ns, "web", 1, &node).await;
    let pods = running_pods(client, ns, "web", 1).await;
    let job = create_job(client, ns, job_name, web_job()).await;
    let uid = job.uid().expect("uid");
    let want = fathom_e2e::expected_targets(&pods);
    let assignments = eventually(secs(60), "the assignment listing the pod", async || {
        let all = assignments_of(client, ns, &uid).await?;
        ensure!(
            all.len() == 1 && fathom_e2e::listed_targets(&all[0]) == want,
            "{:?}",
            all.iter()
                .map(fathom_e2e::listed_targets)
                .collect::<Vec<_>>()
        );
        Ok(all)
    })
    .await;
    runner_reports(client, &assignments[0], "Attached", 7).await;
    let jobs: Api<TraceJob> = Api::namespaced(client.clone(), ns);
    let job = wait_job(&jobs, job_name, "Running and Ready", |j| {
        phase(j) == Some(JobPhase::Running) && ready_status(j) == Some("True")
    })
    .await;
    let results: Api<TraceResult> = Api::namespaced(client.clone(), ns);
    eventually(secs(30), "the result's total", async || {
        let total = results.get(job_name).await?.status.map(|s| s.total);
        ensure!(total == Some(7), "total {total:?}");
        Ok(())
    })
    .await;
    (job, assignments)
}

fn briefs<'a>(events: impl IntoIterator<Item = &'a AuditEvent>) -> String {
    events
        .into_iter()
        .map(AuditEvent::brief)
        .collect::<Vec<_>>()
        .join("\n")
}

/// O1 on the real server, from its audit log: once a job has settled, a 10 s window holds no
/// mutating request by the operator's identity (but its Lease renewals and Events); and every
/// create, update and patch it made during the test names the field manager `fathom-operator`:
/// applies, finalizer patches, Lease and Event writes alike (deletes carry no field manager in
/// the API).
#[tokio::test]
async fn o1_a_settled_job_gets_no_writes_and_every_operator_write_names_its_field_manager() {
    let client = admin().await;
    install_crds(&client).await;
    let ns = TestNamespace::create(&client, "o1").await;
    let ns = ns.as_str();
    let audit = AuditLog::open();
    let _op = OperatorOptions::new("o1").start(&client).await;
    running_job(&client, ns, "settled").await;

    let m0 = audit.mark(&client, ns).await;
    tokio::time::sleep(secs(10)).await; // the window itself
    let m1 = audit.mark(&client, ns).await;
    let events = audit.events();
    let by_operator: Vec<&AuditEvent> = events
        .iter()
        .filter(|e| e.user.username == OPERATOR_USER && e.is_mutating())
        .collect();
    let in_window: Vec<&AuditEvent> = by_operator
        .iter()
        .copied()
        .filter(|e| {
            e.stage_timestamp > m0.stage_timestamp && e.stage_timestamp < m1.stage_timestamp
        })
        .filter(|e| !e.is_lease_or_event())
        .collect();
    assert!(
        in_window.is_empty(),
        "{} mutating requests by the operator while the job was settled ({} .. {}):\n{}",
        in_window.len(),
        m0.stage_timestamp,
        m1.stage_timestamp,
        briefs(in_window.iter().copied())
    );

    // Its RBAC sufficed: no request of the operator was refused.
    let refused: Vec<&AuditEvent> = events
        .iter()
        .filter(|e| e.user.username == OPERATOR_USER && e.code() == Some(403))
        .collect();
    assert!(
        refused.is_empty(),
        "requests of the operator refused by RBAC (charts/fathom/templates/rbac-operator.yaml):\n{}",
        briefs(refused.iter().copied())
    );

    let writes: Vec<&AuditEvent> = by_operator
        .iter()
        .copied()
        .filter(|e| matches!(e.verb.as_str(), "create" | "update" | "patch"))
        .collect();
    // The check saw every kind of write the operator makes here.
    let kinds: BTreeSet<(&str, Option<&str>)> = writes
        .iter()
        .map(|e| (e.resource(), e.subresource()))
        .collect();
    for kind in [
        ("tracejobs", None),              // the cleanup finalizer
        ("tracejobs", Some("status")),    // status
        ("traceassignments", None),       // the assignment
        ("traceresults", None),           // the result
        ("traceresults", Some("status")), // its totals
        ("leases", None),                 // leader election
        ("events", None),                 // Running
    ] {
        assert!(
            kinds.contains(&kind),
            "no write to {kind:?} by {OPERATOR_USER} in the audit log; seen {kinds:?}"
        );
    }
    let unnamed: Vec<&AuditEvent> = writes
        .iter()
        .copied()
        .filter(|e| e.field_manager() != Some(OPERATOR_MANAGER))
        .collect();
    assert!(
        unnamed.is_empty(),
        "{} of {} writes by the operator do not carry fieldManager={OPERATOR_MANAGER}:\n{}",
        unnamed.len(),
        writes.len(),
        briefs(unnamed.iter().copied())
    );
}

/// Another field manager applies a different value to a field the operator owns on a
/// TraceAssignment (server-side apply, forced, as `kubectl apply --server-side
/// --force-conflicts` would). The operator's next reconcile must not take the field back by
/// force: it reports the conflict with a Warning Event `ApplyConflict`, and the intruder still
/// owns the field.
#[tokio::test]
async fn a_conflicting_apply_by_another_field_manager_is_reported_not_forced_back() {
    let client = admin().await;
    install_crds(&client).await;
    let ns = TestNamespace::create(&client, "conflict").await;
    let ns = ns.as_str();
    let _op = OperatorOptions::new("conflict").start(&client).await;
    let (job, assignments) = running_job(&client, ns, "contested").await;
    let a = &assignments[0];
    let name = a.name_any();
    // Assignments live in the operator's namespace, not the job's.
    let api: Api<TraceAssignment> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let intruded_run = a.spec.run + 98;
    api.patch(
        &name,
        &PatchParams::apply("intruder").force(),
        &Patch::Apply(json!({
            "apiVersion": "fathom.dev/v1alpha1", "kind": "TraceAssignment",
            "metadata": {"name": name},
            "spec": {"run": intruded_run},
        })),
    )
    .await
    .expect("the intruder's apply");

    let owners_of_run = |a: &TraceAssignment| -> Vec<String> {
        a.managed_fields()
            .iter()
            .filter(|m| {
                m.fields_v1
                    .as_ref()
                    .is_some_and(|f| f.0.pointer("/f:spec/f:run").is_some())
            })
            .filter_map(|m| m.manager.clone())
            .collect()
    };
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    let started = Instant::now();
    let found = loop {
        let list = events.list(&ListParams::default()).await.expect("events");
        if let Some(e) = list
            .items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("ApplyConflict"))
        {
            break Some(e);
        }
        if started.elapsed() > secs(30) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let now = api.get(&name).await.expect("assignment");
    let Some(event) = found else {
        panic!(
            "no ApplyConflict Event within 30 s of another manager's apply to spec.run of \
             {name}; spec.run is now {} (intruder wrote {intruded_run}), its owners {:?}{}",
            now.spec.run,
            owners_of_run(&now),
            if now.spec.run != intruded_run {
                ": the operator took the field back by force"
            } else {
                ""
            }
        )
    };
    assert_eq!(event.type_.as_deref(), Some("Warning"), "{event:?}");
    let regarding = event.involved_object.name.clone().unwrap_or_default();
    assert!(
        regarding == name || regarding == job.name_any(),
        "the Event is about {regarding}, not the assignment or its job"
    );
    assert_eq!(
        now.spec.run, intruded_run,
        "the intruder's value was replaced"
    );
    assert!(
        owners_of_run(&now).contains(&"intruder".to_string()),
        "managedFields: {:?}",
        owners_of_run(&now)
    );
}

/// O2 on the real server: deleting a job deletes its assignments (in the operator's namespace,
/// without ownerReference: deleted by the operator itself), holds the job (its finalizer) until
/// the runners detach, then lets it go; the garbage collector, following the ownerReference,
/// removes its TraceResult (in the job's namespace).
#[tokio::test]
async fn o2_deleting_a_job_waits_for_its_runners_and_the_garbage_collector_removes_its_result() {
    let client = admin().await;
    install_crds(&client).await;
    let ns_guard = TestNamespace::create(&client, "gc").await;
    let ns = ns_guard.as_str();
    let audit = AuditLog::open();
    let _op = OperatorOptions::new("gc").start(&client).await;
    let (job, _) = running_job(&client, ns, "doomed").await;
    let uid = job.uid().expect("uid");
    let results: Api<TraceResult> = Api::namespaced(client.clone(), ns);
    let result = results.get("doomed").await.expect("result");
    let assignments = assignments_of(&client, ns, &uid)
        .await
        .expect("assignments");
    for a in &assignments {
        assert_eq!(a.namespace().as_deref(), Some(OPERATOR_NAMESPACE));
        assert!(
            a.owner_references().is_empty(),
            "an ownerReference cannot cross namespaces: {:?}",
            a.owner_references()
        );
    }
    let owners = result.owner_references();
    assert!(
        owners.iter().any(|o| o.uid == uid
            && o.kind == "TraceJob"
            && o.controller == Some(true)
            && o.block_owner_deletion == Some(true)),
        "{owners:?}"
    );

    let jobs: Api<TraceJob> = Api::namespaced(client.clone(), ns);
    jobs.delete("doomed", &DeleteParams::background())
        .await
        .expect("delete the job");
    let terminating = eventually(secs(30), "assignments terminating", async || {
        let all = assignments_of(&client, ns, &uid).await?;
        ensure!(
            !all.is_empty() && all.iter().all(|a| a.metadata.deletion_timestamp.is_some()),
            "{:?}",
            all.iter()
                .map(|a| (a.name_any(), a.metadata.deletion_timestamp.clone()))
                .collect::<Vec<_>>()
        );
        Ok(all)
    })
    .await;
    assert!(
        jobs.get_opt("doomed").await.expect("get").is_some(),
        "the job must wait for its runners"
    );
    for a in &terminating {
        runner_detaches(&client, a).await;
    }
    eventually(secs(60), "assignments, job and result gone", async || {
        let left = assignments_of(&client, ns, &uid).await?.len();
        let job = jobs.get_opt("doomed").await?.is_some();
        let result = results.get_opt("doomed").await?.is_some();
        ensure!(
            left == 0 && !job && !result,
            "assignments {left}, job {job}, result {result}"
        );
        Ok(())
    })
    .await;

    let m = audit.mark(&client, ns).await;
    let events: Vec<AuditEvent> = audit
        .events()
        .into_iter()
        .filter(|e| e.stage_timestamp <= m.stage_timestamp)
        .collect();
    let result_deletes: Vec<&AuditEvent> = events
        .iter()
        .filter(|e| {
            e.verb == "delete" && e.resource() == "traceresults" && e.name() == Some("doomed")
        })
        .collect();
    assert!(
        result_deletes.iter().any(|e| e.user.username == GC_USER),
        "the TraceResult was not deleted by the garbage collector ({GC_USER}):\n{}",
        briefs(result_deletes.iter().copied())
    );
}

/// Two operator processes with different ServiceAccounts compete for one Lease: exactly one
/// leads and acts; kill -9 of the leader hands over to the other within the Lease's duration
/// plus one retry period; and the audit log shows their writes to jobs, assignments and
/// results never interleave.
#[tokio::test]
async fn leader_election_one_of_two_operator_processes_acts_and_the_other_takes_over_after_kill_9()
{
    let client = admin().await;
    install_crds(&client).await;
    let ns = TestNamespace::create(&client, "leader").await;
    let ns = ns.as_str();
    apply_manifest("second-operator.yaml");
    let second_kubeconfig = service_account_kubeconfig("fathom-operator-2");
    let audit = AuditLog::open();

    let lease_seconds = 6;
    let retry_seconds = 2;
    let mut a = OperatorOptions::new("leader");
    a.identity = "e2e-leader-a".into();
    a.log_name = "leader-a".into();
    a.lease_seconds = lease_seconds;
    a.retry_period_seconds = Some(retry_seconds);
    let mut b = a.clone();
    b.identity = "e2e-leader-b".into();
    b.log_name = "leader-b".into();
    b.kubeconfig = second_kubeconfig;
    let lease = a.lease_name.clone();
    let users = [
        (a.identity.clone(), OPERATOR_USER),
        (b.identity.clone(), OPERATOR_2_USER),
    ];
    let mut ops = [a.start(&client).await, b.start(&client).await];

    // Exactly one leads: the Lease names it, and only its /metrics say so.
    let leader = eventually(secs(30), "one leader", async || {
        let holder = lease_holder(&client, &lease)
            .await?
            .ok_or_else(|| anyhow!("Lease {lease} has no holder"))?;
        let leads: Vec<bool> = ops.iter().map(|o| o.leads()).collect::<Result<_, _>>()?;
        let i = ops
            .iter()
            .position(|o| o.identity() == holder)
            .ok_or_else(|| anyhow!("holder {holder} is neither process"))?;
        ensure!(
            leads[i] && leads.iter().filter(|l| **l).count() == 1,
            "holder {holder}, leads {leads:?}"
        );
        Ok(i)
    })
    .await;
    let follower = 1 - leader;

    // The leader acts.
    busybox_deployment(&client, ns, "web", 1, &env().real_node).await;
    running_pods(&client, ns, "web", 1).await;
    let job = create_job(&client, ns, "web-drops", web_job()).await;
    let uid = job.uid().expect("uid");
    wait_assignments(
        &client,
        ns,
        &uid,
        &BTreeSet::from([env().real_node.clone()]),
    )
    .await;
    assert!(
        !ops[follower].leads().expect("metrics"),
        "the follower leads too"
    );

    // kill -9 the leader: the follower takes over within the Lease + one retry period.
    let killed_at = Instant::now();
    ops[leader].kill();
    let budget = Duration::from_secs(lease_seconds + retry_seconds);
    let new_holder = ops[follower].identity().to_string();
    eventually(
        budget + secs(5),
        "the follower takes the Lease",
        async || {
            let holder = lease_holder(&client, &lease).await?;
            ensure!(
                holder.as_deref() == Some(new_holder.as_str()),
                "holder {holder:?}"
            );
            Ok(())
        },
    )
    .await;
    let took = killed_at.elapsed();
    assert!(
        took <= budget + Duration::from_secs(1),
        "takeover took {took:?}, more than the Lease ({lease_seconds} s) plus a retry period \
         ({retry_seconds} s)"
    );
    eventually(secs(10), "the new leader's /metrics", async || {
        ensure!(ops[follower].leads()?, "not leading yet");
        Ok(())
    })
    .await;

    // The new leader acts: a second pod shows up in the assignment.
    scale(&client, ns, "web", 2).await;
    let pods = running_pods(&client, ns, "web", 2).await;
    let want = fathom_e2e::expected_targets(&pods);
    eventually(
        secs(60),
        "the new leader updates the assignment",
        async || {
            let all = assignments_of(&client, ns, &uid).await?;
            ensure!(
                all.len() == 1 && fathom_e2e::listed_targets(&all[0]) == want,
                "{:?}",
                all.iter()
                    .map(fathom_e2e::listed_targets)
                    .collect::<Vec<_>>()
            );
            Ok(())
        },
    )
    .await;

    // Their writes never interleave: every write of the first leader precedes every write of
    // the second.
    let m = audit.mark(&client, ns).await;
    let writes = |user: &str| -> Vec<AuditEvent> {
        audit
            .events()
            .into_iter()
            .filter(|e| e.stage_timestamp <= m.stage_timestamp)
            .filter(|e| e.user.username == user && e.is_mutating())
            .filter(|e| {
                matches!(
                    e.resource(),
                    "tracejobs" | "clustertracejobs" | "traceassignments" | "traceresults"
                )
            })
            .collect()
    };
    let first = writes(users[leader].1);
    let second = writes(users[follower].1);
    let (Some(first_last), Some(second_first)) = (
        first.iter().max_by_key(|e| e.stage_timestamp),
        second.iter().min_by_key(|e| e.request_received_timestamp),
    ) else {
        panic!(
            "both leaders must have written: first {}, second {}",
            first.len(),
            second.len()
        )
    };
    let overlap: Vec<&AuditEvent> = first
        .iter()
        .filter(|e| e.stage_timestamp >= second_first.request_received_timestamp)
        .collect();
    assert!(
        overlap.is_empty(),
        "writes interleave: the first leader ({}) wrote until {}, the second ({}) from {}:\n{}",
        users[leader].1,
        first_last.stage_timestamp,
        users[follower].1,
        second_first.request_received_timestamp,
        briefs(overlap)
    );
    assert!(
        ops[follower].alive(),
        "the new leader exited:\n{}",
        ops[follower].log_tail(30)
    );
}

/// The chart's `rbac-operator.yaml` grants the operator's ServiceAccount what the operator does
/// and nothing else (the o1 test checks from the audit log that no request of it is refused).
#[tokio::test]
async fn operator_rbac_allows_what_the_operator_does_and_denies_the_rest() {
    let _client = admin().await;
    fathom_e2e::install_operator_rbac();
    let can = |verb: &str, resource: &str, ns: Option<&str>| -> bool {
        let sa = format!("--as={OPERATOR_USER}");
        // `kind/x` would name an object: a subresource is a flag.
        let (resource, sub) = match resource.split_once('/') {
            Some((r, sub)) => (r, Some(format!("--subresource={sub}"))),
            None => (resource, None),
        };
        let mut args = vec!["auth", "can-i", verb, resource, sa.as_str()];
        if let Some(sub) = &sub {
            args.push(sub);
        }
        if let Some(ns) = ns {
            args.extend(["-n", ns]);
        }
        // `can-i` exits 1 for "no": read the answer, not the status.
        let out = std::process::Command::new("kubectl")
            .args(&args)
            .env("KUBECONFIG", &env().kubeconfig)
            .output()
            .expect("kubectl auth can-i");
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    };
    let allowed = [
        ("watch", "tracejobs.fathom.dev", None),
        ("patch", "tracejobs.fathom.dev", Some("default")),
        ("patch", "tracejobs.fathom.dev/status", Some("default")),
        ("patch", "clustertracejobs.fathom.dev/status", None),
        // Assignments: only in the operator's namespace (issue 8).
        (
            "create",
            "traceassignments.fathom.dev",
            Some(OPERATOR_NAMESPACE),
        ),
        (
            "patch",
            "traceassignments.fathom.dev",
            Some(OPERATOR_NAMESPACE),
        ),
        (
            "delete",
            "traceassignments.fathom.dev",
            Some(OPERATOR_NAMESPACE),
        ),
        (
            "watch",
            "traceassignments.fathom.dev",
            Some(OPERATOR_NAMESPACE),
        ),
        // The orphan sweep lists every job.
        ("list", "tracejobs.fathom.dev", None),
        ("list", "clustertracejobs.fathom.dev", None),
        // Results live in the jobs' namespaces.
        ("create", "traceresults.fathom.dev", Some("default")),
        ("patch", "traceresults.fathom.dev/status", Some("default")),
        ("list", "pods", None),
        ("watch", "nodes", None),
        ("get", "deployments.apps", Some("default")),
        ("create", "events.events.k8s.io", Some("default")),
        ("create", "tokenreviews.authentication.k8s.io", None),
        ("create", "subjectaccessreviews.authorization.k8s.io", None),
        (
            "update",
            "leases.coordination.k8s.io",
            Some(OPERATOR_NAMESPACE),
        ),
    ];
    let denied = [
        ("get", "secrets", Some(OPERATOR_NAMESPACE)),
        ("list", "secrets", None),
        ("create", "pods", Some("default")),
        ("delete", "pods", Some("default")),
        ("patch", "nodes", None),
        ("update", "deployments.apps", Some("default")),
        (
            "patch",
            "traceassignments.fathom.dev/status",
            Some("default"),
        ),
        (
            "patch",
            "traceassignments.fathom.dev/status",
            Some(OPERATOR_NAMESPACE),
        ),
        // Nothing of assignments outside its namespace: not even a read.
        ("list", "traceassignments.fathom.dev", None),
        ("get", "traceassignments.fathom.dev", Some("default")),
        ("create", "traceassignments.fathom.dev", Some("default")),
        ("delete", "traceassignments.fathom.dev", Some("default")),
        ("create", "tracejobs.fathom.dev", Some("default")),
        ("update", "leases.coordination.k8s.io", Some("default")),
        (
            "create",
            "customresourcedefinitions.apiextensions.k8s.io",
            None,
        ),
    ];
    let mut wrong = Vec::new();
    for (verb, resource, ns) in allowed {
        if !can(verb, resource, ns) {
            wrong.push(format!("denied {verb} {resource} in {ns:?}"));
        }
    }
    for (verb, resource, ns) in denied {
        if can(verb, resource, ns) {
            wrong.push(format!("allowed {verb} {resource} in {ns:?}"));
        }
    }
    assert!(wrong.is_empty(), "{OPERATOR_USER}: {}", wrong.join("; "));
}

/// Issue 8, on the real server: every TraceAssignment lives in the operator's namespace. One
/// written in a tenant's namespace (here by the admin, standing in for a tenant granted write
/// access to TraceAssignments there) that claims the tenant's job — node-wide, on the real
/// node, with a runner-like status — is never read, counted or touched by the operator: the
/// audit log holds no request of the operator to TraceAssignments outside its namespace, the
/// job's status and result ignore it.
#[tokio::test]
async fn a_traceassignment_written_in_a_tenant_namespace_is_ignored() {
    let client = admin().await;
    install_crds(&client).await;
    let ns_guard = TestNamespace::create(&client, "forged").await;
    let ns = ns_guard.as_str();
    let audit = AuditLog::open();
    let m0 = audit.mark(&client, ns).await;
    let _op = OperatorOptions::new("forged").start(&client).await;
    let (job, assignments) = running_job(&client, ns, "victim").await;
    let uid = job.uid().expect("uid");

    // The operator's assignment: in its namespace, no ownerReference, the job's namespace as a
    // label.
    let real = &assignments[0];
    assert_eq!(real.namespace().as_deref(), Some(OPERATOR_NAMESPACE));
    assert!(real.owner_references().is_empty(), "{real:?}");
    assert_eq!(
        real.labels()
            .get("fathom.dev/job-namespace")
            .map(String::as_str),
        Some(ns)
    );

    // The forgery: the job's labels and reference, node-wide, on the real node.
    let node = env().real_node.clone();
    let forged: TraceAssignment = serde_json::from_value(json!({
        "apiVersion": "fathom.dev/v1alpha1", "kind": "TraceAssignment",
        "metadata": {
            "name": "forged",
            "namespace": ns,
            "labels": {
                "fathom.dev/job-uid": uid,
                "fathom.dev/job-kind": "TraceJob",
                "fathom.dev/job": "victim",
                "fathom.dev/job-namespace": ns,
                "fathom.dev/node": node,
            },
        },
        "spec": {
            "job": {"kind": "TraceJob", "name": "victim", "namespace": ns, "uid": uid},
            "run": real.spec.run,
            "nodeName": node,
            "nodeWide": true,
            "trace": {"probe": {"tracepoint": "skb/kfree_skb"}},
        },
    }))
    .expect("forged assignment");
    let forged_api: Api<TraceAssignment> = Api::namespaced(client.clone(), ns);
    let forged = forged_api
        .create(&PostParams::default(), &forged)
        .await
        .expect("create the forged assignment");
    runner_reports(&client, &forged, "Attached", 1_000_000).await;
    let forged_version = forged_api
        .get("forged")
        .await
        .expect("forged")
        .resource_version();

    // Make the operator look at the job again (a label change is a watch event).
    let jobs: Api<TraceJob> = Api::namespaced(client.clone(), ns);
    jobs.patch(
        "victim",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"poke": "1"}}})),
    )
    .await
    .expect("poke the job");
    tokio::time::sleep(secs(5)).await;

    let job = jobs.get("victim").await.expect("job");
    let st = job.status.clone().expect("status");
    assert_eq!(st.nodes.as_ref().map(|n| n.desired), Some(1), "{st:?}");
    let results: Api<TraceResult> = Api::namespaced(client.clone(), ns);
    let total = results
        .get("victim")
        .await
        .expect("result")
        .status
        .map(|s| s.total);
    assert_eq!(total, Some(7), "the forged status was counted");
    assert_eq!(
        forged_api
            .get("forged")
            .await
            .expect("forged")
            .resource_version(),
        forged_version,
        "the operator touched the forged assignment"
    );

    let m1 = audit.mark(&client, ns).await;
    let outside: Vec<AuditEvent> = audit
        .events()
        .into_iter()
        .filter(|e| {
            e.stage_timestamp > m0.stage_timestamp && e.stage_timestamp <= m1.stage_timestamp
        })
        .filter(|e| e.user.username == OPERATOR_USER && e.resource() == "traceassignments")
        .filter(|e| e.namespace() != Some(OPERATOR_NAMESPACE))
        .collect();
    assert!(
        outside.is_empty(),
        "requests of the operator to TraceAssignments outside {OPERATOR_NAMESPACE}:\n{}",
        briefs(outside.iter())
    );
}
