//! Issue 10's table of hostile namespaced TraceJobs, on the real cluster. Each one is refused
//! with the rule that refused it: at admission (the chart's tenant ValidatingAdmissionPolicies),
//! by the operator (scope), or by the node runner (what only the node's kernel can tell). None
//! of them leaves anything attached, while an allowed job of the same namespace attaches as
//! usual. The same specs as ClusterTraceJobs pass admission: the rules bind tenants only. A
//! TracePolicy named by a namespace's label relaxes and tightens the rules for that namespace.

use anyhow::ensure;
use fathom_crds::{ClusterTraceJob, JobPhase, TraceJob, TraceResult};
use fathom_e2e::{
    OperatorOptions, ScriptDeployment, TestNamespace, admin, busybox_deployment, create_job, env,
    eventually, install_crds, kubectl, kubectl_ok,
    runner::{RunnerOptions, fathom_programs, remove_identity_pods},
    running_pods, secs,
};
use kube::{
    Api,
    api::{DeleteParams, PostParams},
};
use serde_json::{Value, json};

fn trace_job(ns: &str, name: &str, spec: &Value) -> TraceJob {
    serde_json::from_value(json!({
        "apiVersion": "fathom.dev/v1alpha1", "kind": "TraceJob",
        "metadata": {"name": name, "namespace": ns}, "spec": spec,
    }))
    .expect("job")
}

/// A spec aimed at the pods labelled app=web of the job's namespace.
fn at_web(mut spec: Value) -> Value {
    spec["podSelector"] = json!({"matchLabels": {"app": "web"}});
    spec
}

/// The job's status as JSON once it is Failed.
async fn failed_status(jobs: &Api<TraceJob>, name: &str) -> String {
    eventually(secs(60), format!("TraceJob {name} Failed"), async || {
        let job = jobs.get(name).await?;
        let status = serde_json::to_string(&job.status)?;
        ensure!(
            job.status.as_ref().and_then(|s| s.phase) == Some(JobPhase::Failed),
            "{status}"
        );
        Ok(status)
    })
    .await
}

#[tokio::test]
async fn hostile_tracejobs_are_refused_with_their_rule_and_attach_nothing() {
    let client = admin().await;
    install_crds(&client).await;
    let ns = TestNamespace::create(&client, "tenancy").await;
    let jobs: Api<TraceJob> = Api::namespaced(client.clone(), ns.as_str());

    // 1. Admission: what the spec alone shows never reaches the cluster's storage.
    let admission = [
        (
            json!({"kprobe": "tcp_v4_connect"}),
            None,
            "tenant-probe-kind",
        ),
        (
            json!({"kretprobe": "tcp_v4_connect"}),
            None,
            "tenant-probe-kind",
        ),
        (json!({"fentry": "vfs_read"}), None, "tenant-probe-kind"),
        (json!({"fexit": "vfs_read"}), None, "tenant-probe-kind"),
        (json!({"lsm": "file_open"}), None, "tenant-probe-kind"),
        (
            json!({"network": {"hook": "xdp", "interface": "eth0"}}),
            None,
            "tenant-probe-kind",
        ),
        (
            json!({"rawTracepoint": "kfree_skb"}),
            None,
            "tenant-probe-kind",
        ),
        (
            json!({"catalog": "tcp-connect-kprobe"}),
            None,
            "tenant-probe-kind",
        ),
        (
            json!({"catalog": "exec"}),
            Some(json!({"last": 10, "payload": true})),
            "tenant-payload",
        ),
    ];
    let clusters: Api<ClusterTraceJob> = Api::all(client.clone());
    for (i, (probe, events, rule)) in admission.iter().enumerate() {
        let mut spec = at_web(json!({"probe": probe}));
        if let Some(e) = events {
            spec["events"] = e.clone();
        }
        let name = format!("hostile-{i}");
        match jobs
            .create(
                &PostParams::default(),
                &trace_job(ns.as_str(), &name, &spec),
            )
            .await
        {
            Err(kube::Error::Api(e)) => {
                assert_eq!(e.code, 422, "{probe}: {e:?}");
                assert!(
                    e.message.contains(&format!("refused by rule {rule}")),
                    "{probe}: {}",
                    e.message
                );
            }
            other => panic!("TraceJob with {probe} {events:?} was not refused: {other:?}"),
        }
        // A cluster admin's ClusterTraceJob may (a server-side dry run: nothing is stored).
        let mut cluster_spec = spec.clone();
        cluster_spec
            .as_object_mut()
            .expect("object")
            .remove("podSelector");
        let cluster: ClusterTraceJob = serde_json::from_value(json!({
            "apiVersion": "fathom.dev/v1alpha1", "kind": "ClusterTraceJob",
            "metadata": {"name": name}, "spec": cluster_spec,
        }))
        .expect("cluster job");
        clusters
            .create(
                &PostParams {
                    dry_run: true,
                    ..Default::default()
                },
                &cluster,
            )
            .await
            .unwrap_or_else(|e| panic!("ClusterTraceJob with {probe}: {e}"));
    }

    // 2. The operator and the node: a target pod, the operator with its collector, a runner.
    let node = env().real_node.clone();
    busybox_deployment(&client, ns.as_str(), "web", 1, &node).await;
    running_pods(&client, ns.as_str(), "web", 1).await;
    let mut opts = OperatorOptions::new("tenancy");
    opts.collector = true;
    let operator = opts.start(&client).await;
    let cport = operator.collector_port.expect("collector port");
    let mut runner = RunnerOptions::new(&node, cport).start(&client).await;
    assert_eq!(
        fathom_programs(),
        Vec::<String>::new(),
        "nothing attached before"
    );

    let hostile = [
        // Past sys_enter's 2 arguments: kernel stack words, for any job.
        (
            "arg-past-count",
            at_web(json!({"probe": {"rawTracepoint": "sys_enter"}, "aggregate": {"by": ["arg5"]}})),
            "arg5 is past the 2 argument(s) of raw_tracepoint:sys_enter",
        ),
        // sys_enter's arg0 is the kernel's struct pt_regs pointer.
        (
            "pointer-arg",
            at_web(json!({"probe": {"rawTracepoint": "sys_enter"}, "aggregate": {"by": ["arg0"]}})),
            "refused by rule tenant-kernel-address: arg0 of raw_tracepoint:sys_enter",
        ),
        // A kernel text address printed with %pS.
        (
            "pointer-field",
            at_web(
                json!({"probe": {"tracepoint": "skb/kfree_skb"}, "aggregate": {"by": ["location"]}}),
            ),
            "refused by rule tenant-kernel-address: location of tracepoint:skb/kfree_skb",
        ),
        // The whole node.
        (
            "node-wide",
            json!({"probe": {"tracepoint": "syscalls/sys_enter_getppid"}}),
            "NodeWideNeedsClusterTraceJob",
        ),
    ];
    for (name, spec, _) in &hostile {
        jobs.create(&PostParams::default(), &trace_job(ns.as_str(), name, spec))
            .await
            .unwrap_or_else(|e| panic!("creating {name}: {e}"));
    }
    for (name, _, why) in &hostile {
        let status = failed_status(&jobs, name).await;
        assert!(status.contains(why), "{name}: {status}");
        if name.starts_with("pointer") {
            assert!(status.contains("PolicyDenied"), "{name}: {status}");
        }
    }
    assert_eq!(
        fathom_programs(),
        Vec::<String>::new(),
        "a refused job left programs in the kernel"
    );

    // The control: an allowed job of the same namespace (the syscall number, arg1) attaches.
    let control =
        at_web(json!({"probe": {"rawTracepoint": "sys_enter"}, "aggregate": {"by": ["arg1"]}}));
    jobs.create(
        &PostParams::default(),
        &trace_job(ns.as_str(), "allowed", &control),
    )
    .await
    .expect("creating the control job");
    eventually(secs(60), "the control job Running", async || {
        let job = jobs.get("allowed").await?;
        let phase = job.status.as_ref().and_then(|s| s.phase);
        ensure!(phase == Some(JobPhase::Running), "{:?}", job.status);
        ensure!(!fathom_programs().is_empty(), "no program attached yet");
        Ok(())
    })
    .await;
    jobs.delete("allowed", &DeleteParams::default())
        .await
        .expect("delete the control job");
    eventually(
        secs(60),
        "the control job's programs detached",
        async || {
            let left = fathom_programs();
            ensure!(left.is_empty(), "{left:?}");
            Ok(())
        },
    )
    .await;

    runner.stop();
    drop(operator);
    remove_identity_pods(&client, std::slice::from_ref(&node)).await;
}

/// RELIABILITY S2 on the real path: a workload whose environment, command line and opened
/// file's path carry a sentinel secret, traced by two TraceJobs of its namespace (openat
/// counts by pod and command, and `catalog: open` events, which a TraceJob gets without
/// payloads). The jobs see the opens, and the sentinel appears nowhere a tenant or an
/// operator's tooling reads: not in the TraceResults, the jobs' status, the operator's or
/// the runner's log, nor their /metrics (labels included).
#[tokio::test]
async fn s2_a_sentinel_in_env_argv_and_paths_reaches_no_result_status_log_or_metric() {
    const COMM: &str = "fathom-s2-wl";
    let client = admin().await;
    install_crds(&client).await;
    let ns = TestNamespace::create(&client, "s2").await;
    let node = env().real_node.clone();
    let sentinel = format!("fathoms2sentinel{}", std::process::id());
    let script =
        format!("while true; do /workload {COMM} open 20 /tmp/{sentinel}-path; sleep 0.5; done");
    ScriptDeployment {
        env: &[("FATHOM_S2_SECRET", &sentinel)],
        ..ScriptDeployment::new(ns.as_str(), "secretive", &node, &script)
    }
    .apply(&client)
    .await;
    running_pods(&client, ns.as_str(), "secretive", 1).await;

    let mut opts = OperatorOptions::new("s2");
    opts.collector = true;
    let operator = opts.start(&client).await;
    let cport = operator.collector_port.expect("collector port");
    let mut runner = RunnerOptions::new(&node, cport).start(&client).await;
    let jobs: Api<TraceJob> = Api::namespaced(client.clone(), ns.as_str());
    let selector = json!({"matchLabels": {"app": "secretive"}});
    for (name, spec) in [
        (
            "counts",
            json!({"probe": {"tracepoint": "syscalls/sys_enter_openat"},
                   "aggregate": {"by": ["pod", "comm"]}, "podSelector": selector, "duration": "12s"}),
        ),
        (
            "events",
            json!({"probe": {"catalog": "open"}, "events": {"last": 50},
                   "podSelector": selector, "duration": "12s"}),
        ),
    ] {
        create_job(&client, ns.as_str(), name, spec).await;
    }
    let results: Api<TraceResult> = Api::namespaced(client.clone(), ns.as_str());
    let mut seen = Vec::new();
    for name in ["counts", "events"] {
        let text = eventually(secs(90), format!("TraceJob {name} Succeeded"), async || {
            let job = jobs.get(name).await?;
            let phase = job.status.as_ref().and_then(|s| s.phase);
            ensure!(phase == Some(JobPhase::Succeeded), "{:?}", job.status);
            let result = results.get(name).await?;
            Ok(format!(
                "{}\n{}",
                serde_json::to_string(&job)?,
                serde_json::to_string(&result)?
            ))
        })
        .await;
        seen.push((format!("TraceJob and TraceResult {name}"), text));
    }
    // The jobs saw the workload: its opens counted, its events listed (without file names).
    assert!(
        seen[0].1.contains(COMM),
        "the counts have no row of {COMM}: {}",
        seen[0].1
    );
    assert!(
        seen[1].1.contains("\"result\""),
        "the events job listed no event: {}",
        seen[1].1
    );
    seen.push((
        "the operator's /metrics".into(),
        operator.get("/metrics").expect("operator metrics"),
    ));
    seen.push((
        "the runner's /metrics".into(),
        runner.get("/metrics").expect("runner metrics"),
    ));
    for (what, log) in [("operator", &operator.log), ("runner", &runner.log)] {
        seen.push((
            format!("the {what}'s log"),
            std::fs::read_to_string(log).unwrap_or_else(|e| panic!("{}: {e}", log.display())),
        ));
    }
    for (what, text) in &seen {
        assert!(
            !text.contains(&sentinel),
            "the sentinel reached {what}:\n{text}"
        );
    }
    runner.stop();
    drop(operator);
    remove_identity_pods(&client, std::slice::from_ref(&node)).await;
}

/// Deletes the named TracePolicies when the test ends, however it ends.
struct Policies(Vec<String>);

impl Drop for Policies {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = kubectl(&["delete", "tracepolicy", p, "--ignore-not-found"]);
        }
    }
}

/// A dry-run create of TraceJob `name` with `spec` in `ns`: what admission says, storing nothing.
async fn admission_of(
    jobs: &Api<TraceJob>,
    ns: &str,
    name: &str,
    spec: &Value,
) -> Result<(), kube::Error> {
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    jobs.create(&dry, &trace_job(ns, name, spec))
        .await
        .map(|_| ())
}

/// A namespace labelled `fathom.dev/trace-policy=<name>` is held to that TracePolicy, on the
/// real API server, operator and runner: while no such policy exists its jobs fail with rule
/// `tenant-policy`; once it exists, the payload capture it allows is admitted and runs (the
/// workload's opened path shows in the result), its CPU ceiling refuses a bigger budget at
/// admission with the numbers, and what it does not allow (a kprobe) is still refused.
#[tokio::test]
async fn a_trace_policy_relaxes_and_tightens_the_rules_of_the_namespace_naming_it() {
    const COMM: &str = "fathom-pol-wl";
    let client = admin().await;
    install_crds(&client).await;
    let ns = TestNamespace::create(&client, "policy").await;
    let policy = format!("e2e-{}", ns.as_str());
    let other = format!("{policy}-other");
    let cleanup = Policies(vec![policy.clone(), other.clone()]);
    // Another TracePolicy exists, which this namespace does not name: admission judges
    // nothing by it, and the operator finds no policy of the label's name.
    let apply_policy = |name: &str, spec: Value| {
        let path = fathom_e2e::e2e_file(&format!("policy-{name}.json"));
        let p = json!({"apiVersion": "fathom.dev/v1alpha1", "kind": "TracePolicy",
                       "metadata": {"name": name}, "spec": spec});
        std::fs::write(&path, p.to_string()).expect("policy file");
        kubectl_ok(&["apply", "-f", path.to_str().expect("utf-8")]);
    };
    apply_policy(&other, json!({}));
    kubectl_ok(&[
        "label",
        "namespace",
        ns.as_str(),
        &format!("fathom.dev/trace-policy={policy}"),
    ]);

    let node = env().real_node.clone();
    let path = format!("/tmp/fathom-policy-{}-path", std::process::id());
    let script = format!("while true; do /workload {COMM} open 5 {path}; sleep 0.5; done");
    ScriptDeployment::new(ns.as_str(), "web", &node, &script)
        .apply(&client)
        .await;
    running_pods(&client, ns.as_str(), "web", 1).await;
    let mut opts = OperatorOptions::new("policy");
    opts.collector = true;
    let operator = opts.start(&client).await;
    let cport = operator.collector_port.expect("collector port");
    let mut runner = RunnerOptions::new(&node, cport).start(&client).await;
    let jobs: Api<TraceJob> = Api::namespaced(client.clone(), ns.as_str());

    // 1. The label names no TracePolicy: the operator refuses every job of the namespace.
    let plain =
        at_web(json!({"probe": {"tracepoint": "syscalls/sys_enter_openat"}, "duration": "10s"}));
    jobs.create(
        &PostParams::default(),
        &trace_job(ns.as_str(), "unnamed", &plain),
    )
    .await
    .expect("admitted: no policy of this name judges it");
    let status = failed_status(&jobs, "unnamed").await;
    assert!(
        status.contains("PolicyDenied")
            && status.contains(&format!(
                "refused by rule tenant-policy: namespace {} is labelled fathom.dev/trace-policy={policy}, and no TracePolicy {policy} exists",
                ns.as_str()
            )),
        "{status}"
    );

    // 2. The policy: payloads allowed, at most 20 % of a CPU.
    apply_policy(
        &policy,
        json!({"allow": {"payload": true}, "limits": {"maxCpuPercent": 20, "defaultCpuPercent": 5}}),
    );
    let greedy = at_web(
        json!({"probe": {"tracepoint": "syscalls/sys_enter_openat"}, "limits": {"cpuPercent": 50}}),
    );
    let want = format!(
        "refused by rule tenant-limits: spec.limits.cpuPercent=50 is over the 20 that TracePolicy {policy} allows"
    );
    eventually(
        secs(30),
        "admission holds the policy's CPU ceiling",
        async || match admission_of(&jobs, ns.as_str(), "greedy", &greedy).await {
            Err(kube::Error::Api(e)) if e.code == 422 && e.message.contains(&want) => Ok(()),
            other => anyhow::bail!("{other:?}"),
        },
    )
    .await;
    match admission_of(
        &jobs,
        ns.as_str(),
        "kprobe",
        &at_web(json!({"probe": {"kprobe": "tcp_v4_connect"}})),
    )
    .await
    {
        Err(kube::Error::Api(e)) => assert!(
            e.code == 422 && e.message.contains("refused by rule tenant-probe-kind"),
            "{e:?}"
        ),
        other => panic!("a kprobe the policy does not allow was admitted: {other:?}"),
    }
    let payloads = at_web(
        json!({"probe": {"catalog": "open"}, "events": {"last": 50, "payload": true}, "duration": "10s"}),
    );
    eventually(
        secs(30),
        "admission allows the payloads the policy allows",
        async || {
            admission_of(&jobs, ns.as_str(), "payloads", &payloads)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))
        },
    )
    .await;
    jobs.create(
        &PostParams::default(),
        &trace_job(ns.as_str(), "payloads", &payloads),
    )
    .await
    .expect("creating the payload job");
    let results: Api<TraceResult> = Api::namespaced(client.clone(), ns.as_str());
    eventually(
        secs(90),
        "the payload job Succeeded with the workload's path",
        async || {
            let job = jobs.get("payloads").await?;
            let phase = job.status.as_ref().and_then(|s| s.phase);
            ensure!(phase == Some(JobPhase::Succeeded), "{:?}", job.status);
            let result = serde_json::to_string(&results.get("payloads").await?)?;
            ensure!(result.contains(&path), "no event carries {path}: {result}");
            Ok(())
        },
    )
    .await;

    // 3. With every TracePolicy gone the namespace's jobs can still go: admission judges only
    // written specs, and a missing policy blocks no finalizer update.
    drop(cleanup);
    for name in ["payloads", "unnamed"] {
        jobs.delete(name, &DeleteParams::default())
            .await
            .unwrap_or_else(|e| panic!("deleting {name}: {e}"));
    }
    eventually(
        secs(60),
        "the jobs gone through their finalizers",
        async || {
            let left = jobs.list(&Default::default()).await?.items.len();
            ensure!(left == 0, "{left} job(s) left");
            Ok(())
        },
    )
    .await;

    runner.stop();
    drop(operator);
    remove_identity_pods(&client, std::slice::from_ref(&node)).await;
}
