//! get, top, hist, flamegraph and explain against the operator's in-memory API server, through
//! a real `kube::Client`: output, read-only requests, and the one-line errors.

mod support;

use std::sync::Arc;

use kubectl_fathom::{Cli, cluster_command};
use serde_json::{Value, json};
use support::{Rbac, memory_api, seed_job, seed_result};

use clap::Parser;

fn job_status() -> Value {
    json!({
        "phase": "Running",
        "run": 1,
        "nodes": {"desired": 3, "attached": 2, "finished": 0, "failed": 0, "notFeasible": 0},
        "resultRef": {"name": "web", "namespace": "demo"},
        "events": 60, "lost": 3,
    })
}

fn rows_status() -> Value {
    json!({
        "run": 1, "rows": 3, "total": 60, "nodes": 2,
        "data": {
            "probe": "syscalls", "value": "count", "keys": ["comm"],
            "rows": [
                {"keys": {"comm": "nginx"}, "value": 40},
                {"keys": {"comm": "bash"}, "value": 15},
                {"keys": {"comm": "sh"}, "value": 5},
            ],
            "totals": {"hits": 60, "distinctKeys": 3, "eventsEmitted": 0, "eventsDelivered": 0,
                       "eventsLost": 2, "eventsDropped": 0, "mapFull": 1, "rateLimited": 0,
                       "stackErrors": 0, "unpaired": 0, "filtered": 0},
            "truncated": true,
        }
    })
}

fn spec() -> Value {
    json!({"probe": {"catalog": "syscalls"}, "aggregate": {"by": ["comm"]},
           "podSelector": {"matchLabels": {"app": "web"}}})
}

async fn run(client: &kube::Client, args: &[&str]) -> Result<String, kubectl_fathom::Error> {
    let mut argv = vec!["kubectl-fathom"];
    argv.extend(args);
    let cli = Cli::try_parse_from(argv).expect("valid command line");
    let mut out = Vec::new();
    cluster_command(&cli.command, client, &mut out).await?;
    Ok(String::from_utf8(out).expect("utf-8"))
}

#[tokio::test]
async fn get_shows_phase_coverage_loss_truncation_and_rows_with_gets_only() {
    let api = memory_api();
    seed_job(&api, "demo", "web", spec(), job_status());
    seed_result(&api, "demo", "web", "web", rows_status());
    api.clear_calls();
    let out = run(&api.client(), &["get", "web", "-n", "demo"])
        .await
        .expect("get");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "tracejob demo/web (run 1): Running");
    assert_eq!(lines[1], "coverage: 2/3 nodes reported");
    assert!(
        lines[2].starts_with("loss: 3 (events lost in kernel 2"),
        "{out}"
    );
    assert!(lines[3].starts_with("truncated: yes"), "{out}");
    assert!(
        out.contains("COMM   COUNT\nnginx     40\nbash      15\nsh         5\n"),
        "{out}"
    );
    assert!(out.contains("60 hits"), "{out}");
    let calls = api.calls();
    assert!(calls.iter().all(|c| c.method == "GET"), "{calls:?}");
    let paths: Vec<&str> = calls.iter().map(|c| c.path.as_str()).collect();
    assert_eq!(
        paths,
        vec![
            "/apis/fathom.dev/v1alpha1/namespaces/demo/tracejobs/web",
            "/apis/fathom.dev/v1alpha1/namespaces/demo/traceresults/web",
        ]
    );
}

#[tokio::test]
async fn get_uses_the_clients_default_namespace_and_prints_json() {
    let api = memory_api();
    seed_job(&api, "default", "web", spec(), job_status());
    seed_result(&api, "demo", "web", "web", rows_status());
    let out = run(&api.client(), &["get", "web", "-o", "json"])
        .await
        .expect("get");
    let j: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(j["namespace"], "default");
    assert_eq!(
        j["coverage"],
        json!({"nodesReported": 2, "nodesExpected": 3})
    );
    assert_eq!(j["loss"]["mapFull"], 1);
    assert_eq!(j["truncated"], true);
    assert_eq!(j["result"]["rows"][0]["keys"]["comm"], "nginx");
}

#[tokio::test]
async fn top_sorts_by_value_and_limits() {
    let api = memory_api();
    seed_job(&api, "demo", "web", spec(), job_status());
    let mut status = rows_status();
    // Stored out of order: top sorts itself.
    status["data"]["rows"] = json!([
        {"keys": {"comm": "sh"}, "value": 5},
        {"keys": {"comm": "nginx"}, "value": 40},
        {"keys": {"comm": "bash"}, "value": 15},
    ]);
    seed_result(&api, "demo", "web", "web", status);
    let out = run(&api.client(), &["top", "web", "-n", "demo", "--limit", "2"])
        .await
        .expect("top");
    assert!(
        out.contains("COMM             COUNT\nnginx               40\nbash                15\n(other: 1 rows)      5\n"),
        "{out}"
    );
}

#[tokio::test]
async fn hist_draws_the_histograms_of_a_latency_job() {
    let api = memory_api();
    seed_job(&api, "demo", "lat", spec(), job_status());
    seed_result(
        &api,
        "demo",
        "web",
        "lat",
        json!({"run": 1, "nodes": 1, "data": {
            "probe": "runqlat", "value": "latency", "keys": [],
            "histograms": [{"buckets": [
                {"low": 1024, "high": 2048, "count": 8},
                {"low": 2048, "high": 4096, "count": 2},
            ], "count": 10}],
            "totals": {"hits": 10, "distinctKeys": 0, "eventsEmitted": 0, "eventsDelivered": 0,
                       "eventsLost": 0, "eventsDropped": 0, "mapFull": 0, "rateLimited": 0,
                       "stackErrors": 0, "unpaired": 0, "filtered": 0},
        }}),
    );
    let out = run(&api.client(), &["hist", "lat", "-n", "demo"])
        .await
        .expect("hist");
    assert!(out.contains("@latency:\n"), "{out}");
    assert!(
        out.contains(&format!(
            "[1K, 2K)                    8 |{}|",
            "@".repeat(52)
        )),
        "{out}"
    );
    assert!(
        out.contains("[2K, 4K)                    2 |@@@@@@@@@@@@@ "),
        "{out}"
    );
}

#[tokio::test]
async fn flamegraph_writes_an_svg_and_refuses_a_job_without_stacks() {
    let api = memory_api();
    seed_job(&api, "demo", "web", spec(), job_status());
    seed_result(&api, "demo", "web", "web", rows_status());
    let err = run(&api.client(), &["flamegraph", "web", "-n", "demo"])
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "tracejob demo/web has no stack keys: add `kstack` (kernel stacks) or `ustack` (user stacks) to spec.aggregate.by (it aggregates by: comm)"
    );
    let mut status = rows_status();
    status["data"]["keys"] = json!(["comm", "kstack"]);
    status["data"]["rows"] = json!([
        {"keys": {"comm": "nginx", "kstack": "entry_SYSCALL_64;do_syscall_64;tcp_sendmsg"}, "value": 30},
        {"keys": {"comm": "bash", "kstack": "entry_SYSCALL_64;do_syscall_64;vfs_read"}, "value": 10},
    ]);
    seed_result(&api, "demo", "web", "web", status);
    let dir = std::env::temp_dir().join(format!("kubectl-fathom-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let svg_path = dir.join("out.svg");
    let out = run(
        &api.client(),
        &[
            "flamegraph",
            "web",
            "-n",
            "demo",
            "-o",
            svg_path.to_str().expect("utf-8"),
        ],
    )
    .await
    .expect("flamegraph");
    assert!(out.starts_with("wrote "), "{out}");
    let svg = std::fs::read_to_string(&svg_path).expect("svg written");
    assert!(svg.contains("<svg"), "an SVG");
    for frame in ["tcp_sendmsg", "vfs_read", "nginx", "bash"] {
        assert!(svg.contains(frame), "{frame} in the SVG");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_missing_job_or_result_names_the_command_to_look() {
    let api = memory_api();
    let err = run(&api.client(), &["get", "foo", "-n", "demo"])
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "tracejob demo/foo not found: kubectl get tracejobs -n demo"
    );
    assert_eq!(err.exit_code(), 1);
    let err = run(&api.client(), &["top", "foo", "--cluster"])
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "clustertracejob foo not found: kubectl get clustertracejobs"
    );
    seed_job(&api, "demo", "web", spec(), job_status());
    let err = run(&api.client(), &["get", "web", "-n", "demo"])
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("traceresult demo/web of tracejob demo/web not found"),
        "{err}"
    );
}

#[tokio::test]
async fn rbac_forbidden_names_the_missing_verb_and_resource() {
    let api = memory_api();
    seed_job(&api, "demo", "web", spec(), job_status());
    seed_result(&api, "demo", "web", "web", rows_status());
    let rbac = Rbac {
        inner: api.clone(),
        forbidden: Arc::new(vec!["/traceresults/".into()]),
    };
    let err = run(&rbac.client(), &["get", "web", "-n", "demo"])
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with("forbidden: you may not get traceresults.fathom.dev in namespace demo: ask for a Role granting [get] on traceresults.fathom.dev"),
        "{text}"
    );
    assert!(!text.contains('\n'), "one line: {text}");
    let rbac = Rbac {
        inner: api,
        forbidden: Arc::new(vec!["/tracejobs/".into()]),
    };
    let err = run(&rbac.client(), &["top", "web", "-n", "demo"])
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("forbidden: you may not get tracejobs.fathom.dev in namespace demo"),
        "{err}"
    );
}

#[tokio::test]
async fn an_unreachable_api_server_says_so() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let config = kube::Config::new(format!("http://127.0.0.1:{port}").parse().expect("uri"));
    let client = kube::Client::try_from(config).expect("client");
    let err = run(&client, &["get", "web", "-n", "demo"])
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("cannot reach the Kubernetes API server:"),
        "{err}"
    );
    assert!(err.to_string().contains("kubectl cluster-info"), "{err}");
}

fn node(name: &str, ready: bool) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {"kubernetes.io/os": "linux"}},
           "status": {"conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}})
}

fn pod(ns: &str, name: &str, node: &str, app: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"), "labels": {"app": app}},
           "spec": {"nodeName": node, "containers": [{"name": "app", "image": "busybox"}, {"name": "sidecar", "image": "busybox"}]},
           "status": {"phase": "Running"}})
}

/// `kubectl fathom explain -f FILE` with `yaml` written into FILE.
async fn explain(
    client: &kube::Client,
    dir: &std::path::Path,
    yaml: &str,
) -> Result<String, kubectl_fathom::Error> {
    let file = dir.join("job.yaml");
    std::fs::write(&file, yaml).expect("write job");
    run(client, &["explain", "-f", file.to_str().expect("utf-8")]).await
}

#[tokio::test]
async fn explain_plans_like_the_operator_read_only() {
    let api = memory_api();
    api.seed("api/v1", "nodes", node("node-a", true));
    api.seed("api/v1", "nodes", node("node-b", false));
    api.seed("api/v1", "nodes", node("node-c", true));
    api.seed("api/v1", "pods", pod("demo", "web-1", "node-a", "web"));
    api.seed("api/v1", "pods", pod("demo", "web-2", "node-b", "web"));
    api.seed("api/v1", "pods", pod("demo", "db-1", "node-c", "db"));
    api.seed("api/v1", "pods", pod("other", "web-9", "node-c", "web"));
    api.clear_calls();
    let dir = std::env::temp_dir().join(format!("kubectl-fathom-explain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let out = explain(
        &api.client(),
        &dir,
        "apiVersion: fathom.dev/v1alpha1\nkind: TraceJob\nmetadata: { name: web-syscalls, namespace: demo }\nspec:\n  probe: { tracepoint: raw_syscalls/sys_enter }\n  aggregate: { by: [pod] }\n  podSelector: { matchLabels: { app: web } }\n  duration: 30s\n",
    )
    .await
    .expect("explain");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0],
        "tracejob demo/web-syscalls: probe raw_syscalls/sys_enter, for 30s"
    );
    assert_eq!(lines[1], "would run on 1 of 3 nodes, tracing 1 pods:");
    assert_eq!(lines[2], "  node-a: demo/web-1 [app, sidecar]");
    assert_eq!(lines[3], "refused nodes (1):");
    assert_eq!(lines[4], "  node-b: NotReady: node is not Ready");
    assert!(lines[5].starts_with("this machine's kernel ("), "{out}");
    assert!(
        lines[6].starts_with("  tracepoint:raw_syscalls/sys_enter: "),
        "{out}"
    );
    let calls = api.calls();
    assert!(
        calls.iter().all(|c| c.method == "GET"),
        "read-only: {calls:?}"
    );
    // A namespaced job lists only its namespace's pods.
    assert!(
        calls
            .iter()
            .any(|c| c.path == "/api/v1/namespaces/demo/pods"),
        "{calls:?}"
    );

    // A TraceJob without targets: the operator's refusal, word for word.
    let err = explain(
        &api.client(),
        &dir,
        "apiVersion: fathom.dev/v1alpha1\nkind: TraceJob\nmetadata: { name: everything }\nspec:\n  probe: { catalog: syscalls }\n",
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("the operator would not run this job: NodeWideNeedsClusterTraceJob"),
        "{err}"
    );
    // An invalid spec is bad usage (exit 2).
    let err = explain(
        &api.client(),
        &dir,
        "apiVersion: fathom.dev/v1alpha1\nkind: TraceJob\nmetadata: { name: bad }\nspec:\n  probe: { catalog: nope }\n",
    )
    .await
    .unwrap_err();
    assert_eq!(err.exit_code(), 2, "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `explain` judges a TraceJob by its namespace's TracePolicy, as the operator does: a kprobe
/// the policy allows plans; the same job where the label names no policy is refused with the
/// rule.
#[tokio::test]
async fn explain_judges_a_tracejob_by_its_namespaces_trace_policy() {
    let api = memory_api();
    api.seed("api/v1", "nodes", node("node-a", true));
    api.seed("api/v1", "pods", pod("demo", "web-1", "node-a", "web"));
    api.seed("api/v1", "pods", pod("lab", "web-2", "node-a", "web"));
    for (ns, policy) in [("demo", "net-debug"), ("lab", "missing")] {
        api.seed(
            "api/v1",
            "namespaces",
            json!({"apiVersion": "v1", "kind": "Namespace",
                   "metadata": {"name": ns, "labels": {"fathom.dev/trace-policy": policy}}}),
        );
    }
    api.seed(
        "apis/fathom.dev/v1alpha1",
        "tracepolicies",
        json!({"apiVersion": "fathom.dev/v1alpha1", "kind": "TracePolicy",
               "metadata": {"name": "net-debug"},
               "spec": {"allow": {"probeKinds": ["kprobe"]}}}),
    );
    let dir = std::env::temp_dir().join(format!("kubectl-fathom-policy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let job = |ns: &str| {
        format!(
            "apiVersion: fathom.dev/v1alpha1\nkind: TraceJob\nmetadata: {{ name: connects, namespace: {ns} }}\nspec:\n  probe: {{ kprobe: tcp_v4_connect }}\n  podSelector: {{ matchLabels: {{ app: web }} }}\n"
        )
    };
    let out = explain(&api.client(), &dir, &job("demo"))
        .await
        .expect("the policy allows kprobes");
    assert!(
        out.starts_with("tracejob demo/connects: probe kprobe:tcp_v4_connect"),
        "{out}"
    );
    let err = explain(&api.client(), &dir, &job("lab"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("PolicyDenied") && err.contains("refused by rule tenant-policy"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
