//! `kubectl fathom` on the real cluster: the plugin found by kubectl on PATH, reading a real
//! TraceJob's TraceResult written by a real `fathom-operator`, as a user whose only
//! permissions are `get` on tracejobs and traceresults of one namespace; and the one-line
//! error (exit 1) of a user without them.
//!
//! No node runner is deployed: the test writes what a runner would (the assignment's status),
//! and the rows a collector would merge (the TraceResult's `status.data.rows`).

use anyhow::ensure;
use fathom_crds::{JobPhase, TraceJob, TraceResult};
use fathom_e2e::{
    MANAGER, OperatorOptions, TestNamespace, admin, assignments_of, busybox_deployment, create_job,
    env, eventually, install_crds, kubectl_fathom, kubectl_ok, runner_reports, running_pods, secs,
    service_account_kubeconfig_in,
};
use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams},
};
use serde_json::json;

/// A ServiceAccount `reader` allowed only `get` on tracejobs and traceresults of `ns`, and a
/// ServiceAccount `stranger` allowed nothing.
fn grant_reader(ns: &str) {
    kubectl_ok(&["-n", ns, "create", "serviceaccount", "reader"]);
    kubectl_ok(&["-n", ns, "create", "serviceaccount", "stranger"]);
    kubectl_ok(&[
        "-n",
        ns,
        "create",
        "role",
        "fathom-results-reader",
        "--verb=get",
        "--resource=tracejobs.fathom.dev,traceresults.fathom.dev",
    ]);
    kubectl_ok(&[
        "-n",
        ns,
        "create",
        "rolebinding",
        "fathom-results-reader",
        "--role=fathom-results-reader",
        &format!("--serviceaccount={ns}:reader"),
    ]);
}

#[tokio::test]
async fn kubectl_fathom_get_and_top_show_a_real_jobs_result_with_get_permission_only() {
    let client = admin().await;
    install_crds(&client).await;
    let ns = TestNamespace::create(&client, "plugin").await;
    let ns = ns.as_str();
    let _op = OperatorOptions::new("plugin").start(&client).await;
    let node = env().real_node.clone();
    busybox_deployment(&client, ns, "web", 1, &node).await;
    running_pods(&client, ns, "web", 1).await;
    grant_reader(ns);

    let job = create_job(
        &client,
        ns,
        "web-syscalls",
        json!({"probe": {"catalog": "syscalls"}, "aggregate": {"by": ["comm"]},
               "podSelector": {"matchLabels": {"app": "web"}}}),
    )
    .await;
    let uid = job.uid().expect("uid");
    let assignments = eventually(secs(60), "the job's assignment", async || {
        let a = assignments_of(&client, ns, &uid).await?;
        ensure!(a.len() == 1, "{} assignments", a.len());
        Ok(a)
    })
    .await;
    // Playing the node's runner, then the collector's rows.
    runner_reports(&client, &assignments[0], "Attached", 60).await;
    let jobs: Api<TraceJob> = Api::namespaced(client.clone(), ns);
    eventually(secs(30), "the job Running", async || {
        let j = jobs.get("web-syscalls").await?;
        let phase = j.status.as_ref().and_then(|s| s.phase);
        ensure!(phase == Some(JobPhase::Running), "phase {phase:?}");
        Ok(())
    })
    .await;
    let results: Api<TraceResult> = Api::namespaced(client.clone(), ns);
    eventually(secs(30), "TraceResult total 60", async || {
        let r = results.get("web-syscalls").await?;
        ensure!(
            r.status.as_ref().map(|s| s.total) == Some(60),
            "{:?}",
            r.status
        );
        Ok(())
    })
    .await;
    results
        .patch_status(
            "web-syscalls",
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(json!({
                "apiVersion": "fathom.dev/v1alpha1", "kind": "TraceResult",
                "status": {"data": {"probe": "syscalls", "value": "count", "keys": ["comm"],
                    "rows": [
                        {"keys": {"comm": "sh"}, "value": 10},
                        {"keys": {"comm": "sleep"}, "value": 45},
                        {"keys": {"comm": "ls"}, "value": 5},
                    ],
                    "totals": {"hits": 60, "distinctKeys": 3, "eventsEmitted": 0,
                        "eventsDelivered": 0, "eventsLost": 0, "eventsDropped": 0, "mapFull": 0,
                        "rateLimited": 0, "stackErrors": 0, "unpaired": 0, "filtered": 0}}}
            })),
        )
        .await
        .unwrap_or_else(|e| panic!("rows into the TraceResult: {e}"));

    let reader = service_account_kubeconfig_in(ns, "reader");
    let (code, out, err) = eventually(secs(30), "kubectl fathom get with three rows", async || {
        let (code, out, err) = kubectl_fathom(&reader, &["get", "web-syscalls"]);
        ensure!(code == 0, "exit {code}: {err}");
        ensure!(out.contains("sleep"), "no rows yet:\n{out}");
        Ok((code, out, err))
    })
    .await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0],
        format!("tracejob {ns}/web-syscalls (run 1): Running"),
        "{out}"
    );
    assert_eq!(lines[1], "coverage: 1/1 nodes reported", "{out}");
    assert!(lines[2].starts_with("loss: 0 "), "{out}");
    assert_eq!(lines[3], "truncated: no", "{out}");
    assert!(out.contains("60 hits"), "{out}");

    let (code, out, err) = kubectl_fathom(&reader, &["top", "web-syscalls", "--limit", "2"]);
    assert_eq!(code, 0, "{err}");
    let table: Vec<&str> = out.lines().skip_while(|l| !l.starts_with("COMM")).collect();
    assert_eq!(
        table[..4],
        [
            "COMM             COUNT",
            "sleep               45",
            "sh                  10",
            "(other: 1 rows)      5"
        ],
        "{out}"
    );
    let (code, out, err) = kubectl_fathom(&reader, &["get", "web-syscalls", "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(
        j["coverage"],
        json!({"nodesReported": 1, "nodesExpected": 1})
    );

    // Not found, and forbidden: one line each, exit 1.
    let (code, _, err) = kubectl_fathom(&reader, &["get", "nope"]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        err.trim(),
        format!("error: tracejob {ns}/nope not found: kubectl get tracejobs -n {ns}")
    );
    let stranger = service_account_kubeconfig_in(ns, "stranger");
    let (code, _, err) = kubectl_fathom(&stranger, &["top", "web-syscalls"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.starts_with(&format!(
            "error: forbidden: you may not get tracejobs.fathom.dev in namespace {ns}"
        )),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    let (code, _, err) = kubectl_fathom(&reader, &["flamegraph", "web-syscalls"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("has no stack keys: add `kstack`"), "{err}");
}
