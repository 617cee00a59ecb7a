//! The chart installed with the real Helm into the real cluster: its RBAC as the API server
//! enforces it (the checked-in can-i matrix, requirement O5), the node-bound admission policy
//! (a runner token of node A writing node B's assignment is denied by the server), and the
//! schema refusing a wrong value at `helm install`.

use std::process::Command;

use fathom_e2e::{
    admin, env,
    chart::{Release, ScratchNamespace, helm},
    kubectl, kubectl_ok, manifest,
};
use serde::Deserialize;
use serde_json::json;

/// The RBAC and admission tests are about the API server's answers: their releases' pods are
/// kept Pending (a node selector no node has), since an operator running there would reconcile
/// the jobs of whatever else runs on the cluster.
const PARKED: &[&str] = &[
    "--set-string",
    "operator.nodeSelector.fathom\\.dev/parked=yes,runner.nodeSelector.fathom\\.dev/parked=yes",
];

#[derive(Deserialize)]
struct Matrix {
    rows: Vec<Row>,
}

#[derive(Deserialize, Debug)]
struct Row {
    identity: String,
    verb: String,
    resource: String,
    namespace: String,
    allowed: bool,
}

/// `kubectl auth can-i` as `user` (with `groups`); `Some(answer)`, `None` when kubectl failed
/// to ask.
fn can_i(user: &str, groups: &[&str], verb: &str, resource: &str, ns: Option<&str>) -> Result<bool, String> {
    let (resource, sub) = match resource.split_once('/') {
        Some((r, s)) => (r, Some(s)),
        None => (resource, None),
    };
    let mut cmd = Command::new("kubectl");
    cmd.env("KUBECONFIG", &env().kubeconfig)
        .args(["auth", "can-i", verb, resource, "--as", user]);
    for g in groups {
        cmd.args(["--as-group", g]);
    }
    if let Some(s) = sub {
        cmd.args(["--subresource", s]);
    }
    match ns {
        Some("*") => {
            cmd.arg("--all-namespaces");
        }
        Some(ns) => {
            cmd.args(["--namespace", ns]);
        }
        None => {}
    }
    let out = cmd.output().map_err(|e| format!("running kubectl: {e}"))?;
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
    match (out.status.code(), answer.as_str()) {
        (Some(0), "yes") => Ok(true),
        (Some(1), "no") => Ok(false),
        _ => Err(format!(
            "kubectl auth can-i {verb} {resource} as {user}: {} {answer} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

#[tokio::test]
async fn o5_the_can_i_matrix_holds_on_the_real_server() {
    let _ = admin().await;
    let tenant = ScratchNamespace::create("fathom-install-tenant");
    let release = Release::install("fathom-canii", "fathom-install-rbac", PARKED);
    // Tenants: users bound in their namespace to the default roles the chart aggregates into.
    for role in ["admin", "edit", "view"] {
        kubectl_ok(&[
            "create", "rolebinding", &format!("tenant-{role}"), "-n", tenant.as_str(),
            "--clusterrole", role, "--user", &format!("fathom-e2e-tenant-{role}"),
        ]);
    }
    let text = std::fs::read_to_string(manifest("can-i-matrix.yaml")).expect("the matrix");
    let matrix: Matrix = serde_yaml::from_str(&text).expect("the matrix parses");
    assert!(matrix.rows.len() >= 50, "the matrix has {} rows", matrix.rows.len());
    let mut wrong = Vec::new();
    for row in &matrix.rows {
        let (user, groups): (String, Vec<&str>) = match row.identity.as_str() {
            "operator" => (release.user("operator"), vec!["system:serviceaccounts", "system:authenticated"]),
            "runner" => (release.user("node-runner"), vec!["system:serviceaccounts", "system:authenticated"]),
            "nobody" => ("fathom-e2e-nobody".into(), vec!["system:authenticated"]),
            t if t.starts_with("tenant-") => (
                format!("fathom-e2e-{t}"),
                vec!["system:authenticated"],
            ),
            other => panic!("unknown identity {other} in the matrix"),
        };
        let ns = match row.namespace.as_str() {
            "release" => Some(release.namespace.as_str()),
            "tenant" => Some(tenant.as_str()),
            "all" => Some("*"),
            "cluster" => None,
            other => panic!("unknown namespace {other} in the matrix"),
        };
        match can_i(&user, &groups, &row.verb, &row.resource, ns) {
            Ok(a) if a == row.allowed => {}
            Ok(a) => wrong.push(format!("{row:?}: the server says {a}")),
            Err(e) => wrong.push(format!("{row:?}: {e}")),
        }
    }
    assert!(wrong.is_empty(), "{} of {} rows differ:\n{}", wrong.len(), matrix.rows.len(), wrong.join("\n"));
    eprintln!("can-i matrix: {} rows hold on the real API server", matrix.rows.len());
}

/// A token of the runner's ServiceAccount bound to a pod on `node` (as the DaemonSet pod's own
/// token is), audience the API server.
fn runner_token_on(release: &Release, node: &str) -> String {
    let pod = format!("runner-identity-{node}");
    let manifest = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod, "namespace": release.namespace},
        "spec": {
            "nodeName": node,
            "serviceAccountName": format!("{}-node-runner", release.name),
            "automountServiceAccountToken": false,
            "tolerations": [{"operator": "Exists"}],
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "pause", "image": "fathom.local/pause:1", "imagePullPolicy": "Never"}],
        }
    });
    let file = fathom_e2e::target_dir().join(format!("e2e-logs/{pod}.json"));
    std::fs::create_dir_all(file.parent().expect("dir")).expect("log dir");
    std::fs::write(&file, manifest.to_string()).expect("pod file");
    kubectl_ok(&["apply", "-f", file.to_str().expect("utf-8")]);
    kubectl_ok(&[
        "-n", &release.namespace, "create", "token", &format!("{}-node-runner", release.name),
        "--bound-object-kind", "Pod", "--bound-object-name", &pod, "--duration", "1h",
    ])
    .trim()
    .to_string()
}

/// `kubectl` with a bearer token instead of the admin's credentials.
fn kubectl_as_token(token: &str, args: &[&str]) -> Result<String, String> {
    let server = kubectl_ok(&["config", "view", "--minify", "-o", "jsonpath={.clusters[0].cluster.server}"]);
    let ca = env().state.join("pki/ca.crt");
    let out = Command::new("kubectl")
        .env_remove("KUBECONFIG")
        .args(["--kubeconfig", "/dev/null", "--server", server.trim(), "--certificate-authority"])
        .arg(&ca)
        .args(["--token", token])
        .args(args)
        .output()
        .map_err(|e| format!("running kubectl: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[tokio::test]
async fn a_runner_token_of_node_a_cannot_write_node_bs_assignment() {
    let _ = admin().await;
    let e = env();
    assert!(e.sim_nodes.len() >= 2, "two simulated nodes needed (FATHOM_E2E_SIM_NODES)");
    let (node_a, node_b) = (e.sim_nodes[0].as_str(), e.sim_nodes[1].as_str());
    let release = Release::install("fathom-vap", "fathom-install-vap", PARKED);
    let ns = release.namespace.as_str();
    // Two assignments, one per node, as the operator would write them.
    for node in [node_a, node_b] {
        let a = json!({
            "apiVersion": "fathom.dev/v1alpha1", "kind": "TraceAssignment",
            "metadata": {"name": format!("job-{node}"), "namespace": ns,
                         "labels": {"fathom.dev/node": node}},
            "spec": {
                "job": {"kind": "TraceJob", "name": "job", "namespace": "tenant", "uid": "00000000-0000-0000-0000-000000000001"},
                "run": 1, "nodeName": node, "nodeWide": false,
                "trace": {"probe": {"tracepoint": "syscalls/sys_enter_openat"}},
            }
        });
        let file = fathom_e2e::target_dir().join(format!("e2e-logs/assignment-{node}.json"));
        std::fs::write(&file, a.to_string()).expect("assignment file");
        kubectl_ok(&["apply", "-f", file.to_str().expect("utf-8")]);
    }
    let token_a = runner_token_on(&release, node_a);
    let status = r#"{"status":{"run":1}}"#;
    // Its own node's assignment: the status patch and a finalizer patch are allowed.
    kubectl_as_token(&token_a, &["-n", ns, "patch", "traceassignment", &format!("job-{node_a}"),
        "--subresource", "status", "--type", "merge", "-p", status])
        .unwrap_or_else(|e| panic!("runner of {node_a} patching its own assignment's status: {e}"));
    kubectl_as_token(&token_a, &["-n", ns, "patch", "traceassignment", &format!("job-{node_a}"),
        "--type", "merge", "-p", r#"{"metadata":{"finalizers":[]}}"#])
        .unwrap_or_else(|e| panic!("runner of {node_a} patching its own assignment: {e}"));
    // Node B's: denied by the admission policy, with its message.
    for (what, args) in [
        ("status", vec!["--subresource", "status", "--type", "merge", "-p", status]),
        ("finalizers", vec!["--type", "merge", "-p", r#"{"metadata":{"finalizers":[]}}"#]),
    ] {
        let name = format!("job-{node_b}");
        let mut full = vec!["-n", ns, "patch", "traceassignment", name.as_str()];
        full.extend(args);
        let err = kubectl_as_token(&token_a, &full)
            .err()
            .unwrap_or_else(|| panic!("runner of {node_a} wrote {what} of {node_b}'s assignment"));
        assert!(
            err.contains("ValidatingAdmissionPolicy")
                && err.contains(&format!("token is bound to node {node_a}, the assignment is for node {node_b}")),
            "{what}: {err}"
        );
    }
    // A runner token bound to no node (not a pod's) is denied even on node A's assignment.
    let unbound = kubectl_ok(&["-n", ns, "create", "token", &format!("{}-node-runner", release.name), "--duration", "1h"]);
    let err = kubectl_as_token(unbound.trim(), &["-n", ns, "patch", "traceassignment", &format!("job-{node_a}"),
        "--subresource", "status", "--type", "merge", "-p", status])
        .expect_err("an unbound runner token wrote an assignment");
    assert!(err.contains("bound to no node"), "{err}");
    // The admin (not the runner) is not concerned by the policy.
    kubectl_ok(&["-n", ns, "patch", "traceassignment", &format!("job-{node_b}"), "--subresource", "status",
        "--type", "merge", "-p", status]);
    drop(release);
    let _ = kubectl(&["get", "validatingadmissionpolicy", "fathom-vap-node-runner-own-node"])
        .expect_err("the policy goes with the release");
}

#[test]
fn an_invalid_value_fails_at_helm_install_with_the_schema_message() {
    let _ = env();
    let out = helm(&[
        "install", "fathom-bad", "charts/fathom", "--namespace", "fathom-install-bad",
        "--set", "operator.replicas=0",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "helm install accepted operator.replicas=0");
    assert!(
        stderr.contains("values don't meet the specifications of the schema")
            && stderr.contains("at '/operator/replicas': minimum: got 0, want 1"),
        "{stderr}"
    );
    // Nothing was installed.
    let listed = String::from_utf8_lossy(
        &helm(&["list", "--all-namespaces", "--all", "-q"]).stdout,
    )
    .into_owned();
    assert!(!listed.lines().any(|l| l == "fathom-bad"), "{listed}");
}
