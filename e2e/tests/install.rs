//! The chart installed with the real Helm into the real cluster: its RBAC as the API server
//! enforces it (the checked-in can-i matrix, requirement O5), the node-bound admission policy
//! (a runner token of node A writing node B's assignment is denied by the server), and the
//! schema refusing a wrong value at `helm install`.

use std::process::Command;

use fathom_e2e::{
    admin,
    chart::{Release, ScratchNamespace, helm},
    env, kubectl, kubectl_ok, manifest,
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
fn can_i(
    user: &str,
    groups: &[&str],
    verb: &str,
    resource: &str,
    ns: Option<&str>,
) -> Result<bool, String> {
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
            "create",
            "rolebinding",
            &format!("tenant-{role}"),
            "-n",
            tenant.as_str(),
            "--clusterrole",
            role,
            "--user",
            &format!("fathom-e2e-tenant-{role}"),
        ]);
    }
    let text = std::fs::read_to_string(manifest("can-i-matrix.yaml")).expect("the matrix");
    let matrix: Matrix = serde_yaml::from_str(&text).expect("the matrix parses");
    assert!(
        matrix.rows.len() >= 50,
        "the matrix has {} rows",
        matrix.rows.len()
    );
    let mut wrong = Vec::new();
    for row in &matrix.rows {
        let (user, groups): (String, Vec<&str>) = match row.identity.as_str() {
            "operator" => (
                release.user("operator"),
                vec!["system:serviceaccounts", "system:authenticated"],
            ),
            "runner" => (
                release.user("node-runner"),
                vec!["system:serviceaccounts", "system:authenticated"],
            ),
            "nobody" => ("fathom-e2e-nobody".into(), vec!["system:authenticated"]),
            t if t.starts_with("tenant-") => {
                (format!("fathom-e2e-{t}"), vec!["system:authenticated"])
            }
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
    assert!(
        wrong.is_empty(),
        "{} of {} rows differ:\n{}",
        wrong.len(),
        matrix.rows.len(),
        wrong.join("\n")
    );
    eprintln!(
        "can-i matrix: {} rows hold on the real API server",
        matrix.rows.len()
    );
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
    let file = fathom_e2e::e2e_file(&format!("{pod}.json"));
    std::fs::create_dir_all(file.parent().expect("dir")).expect("log dir");
    std::fs::write(&file, manifest.to_string()).expect("pod file");
    kubectl_ok(&["apply", "-f", file.to_str().expect("utf-8")]);
    kubectl_ok(&[
        "-n",
        &release.namespace,
        "create",
        "token",
        &format!("{}-node-runner", release.name),
        "--bound-object-kind",
        "Pod",
        "--bound-object-name",
        &pod,
        "--duration",
        "1h",
    ])
    .trim()
    .to_string()
}

/// `kubectl` with a bearer token instead of the admin's credentials.
/// What a runner writes of its assignment `job-<node>`.
#[derive(Clone, Copy, Debug)]
enum Patched {
    /// The status subresource.
    Status,
    /// Its finalizers (released after detaching).
    Finalizers,
}

/// Patches assignment `job-<node>` of namespace `ns` with a runner's `token`.
fn patch_assignment(token: &str, ns: &str, node: &str, what: Patched) -> Result<String, String> {
    let name = format!("job-{node}");
    let mut args = vec!["-n", ns, "patch", "traceassignment", name.as_str()];
    args.extend(match what {
        Patched::Status => [
            "--subresource",
            "status",
            "--type",
            "merge",
            "-p",
            r#"{"status":{"run":1}}"#,
        ]
        .as_slice(),
        Patched::Finalizers => {
            ["--type", "merge", "-p", r#"{"metadata":{"finalizers":[]}}"#].as_slice()
        }
    });
    kubectl_as_token(token, &args)
}

fn kubectl_as_token(token: &str, args: &[&str]) -> Result<String, String> {
    let server = kubectl_ok(&[
        "config",
        "view",
        "--minify",
        "-o",
        "jsonpath={.clusters[0].cluster.server}",
    ]);
    let ca = env().state.join("pki/ca.crt");
    let out = Command::new("kubectl")
        .env_remove("KUBECONFIG")
        .args([
            "--kubeconfig",
            "/dev/null",
            "--server",
            server.trim(),
            "--certificate-authority",
        ])
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
    assert!(
        e.sim_nodes.len() >= 2,
        "two simulated nodes needed (FATHOM_E2E_SIM_NODES)"
    );
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
        let file = fathom_e2e::e2e_file(&format!("assignment-{node}.json"));
        std::fs::write(&file, a.to_string()).expect("assignment file");
        kubectl_ok(&["apply", "-f", file.to_str().expect("utf-8")]);
    }
    let token_a = runner_token_on(&release, node_a);
    // Its own node's assignment: the status patch and a finalizer patch are allowed.
    for what in [Patched::Status, Patched::Finalizers] {
        patch_assignment(&token_a, ns, node_a, what).unwrap_or_else(|e| {
            panic!("runner of {node_a} patching its own assignment's {what:?}: {e}")
        });
    }
    // Node B's: denied by the admission policy, with its message.
    for what in [Patched::Status, Patched::Finalizers] {
        let err = patch_assignment(&token_a, ns, node_b, what)
            .err()
            .unwrap_or_else(|| {
                panic!("runner of {node_a} wrote {what:?} of {node_b}'s assignment")
            });
        assert!(
            err.contains("ValidatingAdmissionPolicy")
                && err.contains(&format!(
                    "token is bound to node {node_a}, the assignment is for node {node_b}"
                )),
            "{what:?}: {err}"
        );
    }
    // A runner token bound to no node (not a pod's) is denied even on node A's assignment.
    let unbound = kubectl_ok(&[
        "-n",
        ns,
        "create",
        "token",
        &format!("{}-node-runner", release.name),
        "--duration",
        "1h",
    ]);
    let err = patch_assignment(unbound.trim(), ns, node_a, Patched::Status)
        .expect_err("an unbound runner token wrote an assignment");
    assert!(err.contains("bound to no node"), "{err}");
    // The admin (not the runner) is not concerned by the policy.
    kubectl_ok(&[
        "-n",
        ns,
        "patch",
        "traceassignment",
        &format!("job-{node_b}"),
        "--subresource",
        "status",
        "--type",
        "merge",
        "-p",
        r#"{"status":{"run":1}}"#,
    ]);
    drop(release);
    let _ = kubectl(&[
        "get",
        "validatingadmissionpolicy",
        "fathom-vap-node-runner-own-node",
    ])
    .expect_err("the policy goes with the release");
}

#[test]
fn an_invalid_value_fails_at_helm_install_with_the_schema_message() {
    let _ = env();
    let out = helm(&[
        "install",
        "fathom-bad",
        "charts/fathom",
        "--namespace",
        "fathom-install-bad",
        "--set",
        "operator.replicas=0",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "helm install accepted operator.replicas=0"
    );
    assert!(
        stderr.contains("values don't meet the specifications of the schema")
            && stderr.contains("at '/operator/replicas': minimum: got 0, want 1"),
        "{stderr}"
    );
    // Nothing was installed.
    let listed =
        String::from_utf8_lossy(&helm(&["list", "--all-namespaces", "--all", "-q"]).stdout)
            .into_owned();
    assert!(!listed.lines().any(|l| l == "fathom-bad"), "{listed}");
}

// ------------------------------------------------------------------ the install itself

/// The images the chart deploys, built and imported by `scripts/images.sh import`.
const IMAGES: [&str; 2] = [
    "fathom.local/fathom-operator:0.1.0",
    "fathom.local/fathom-node-runner:0.1.0",
];

/// The values an install on this cluster needs beyond the chart's defaults: the pods pinned
/// to the real node (the simulated nodes run no containers), a pin root of the test's own,
/// images never pulled (no registry), and a short grace. The defaults otherwise: two operator
/// replicas on the pod network, the in-cluster `kubernetes` Service (scripts/cluster.sh routes
/// its ClusterIP to the API server, as kube-proxy would).
fn local_cluster_values(node: &str, pin_root: &str) -> Vec<String> {
    vec![
        "--set-string".into(),
        format!(
            "operator.nodeSelector.kubernetes\\.io/hostname={node},\
             runner.nodeSelector.kubernetes\\.io/hostname={node},runner.pinRoot={pin_root}"
        ),
        "--set".into(),
        "operator.graceSeconds=10,images.pullPolicy=Never".into(),
    ]
}

fn ctr(args: &[&str]) -> String {
    let out = Command::new("ctr")
        .arg("--address")
        .arg(&env().containerd)
        .args(["--namespace", "k8s.io"])
        .args(args)
        .output()
        .expect("ctr (containerd's client)");
    assert!(
        out.status.success(),
        "ctr {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The release's runner pod on the real node (the simulated nodes' runner pods are made up).
fn real_runner_pod(ns: &str) -> serde_json::Value {
    let node = env().real_node.as_str();
    let pods = json_of(&[
        "-n",
        ns,
        "get",
        "pods",
        "-l",
        "app.kubernetes.io/name=fathom-node-runner",
        "--field-selector",
        &format!("spec.nodeName={node}"),
        "-o",
        "json",
    ]);
    let items = pods["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(items.len(), 1, "one runner pod on {node}: {pods}");
    items[0].clone()
}

/// The host pid of the runner container of the release's pod on the real node.
fn runner_pid(ns: &str) -> u32 {
    let pod = real_runner_pod(ns);
    let id = pod["status"]["containerStatuses"][0]["containerID"]
        .as_str()
        .and_then(|s| s.strip_prefix("containerd://"))
        .unwrap_or_else(|| panic!("no runner container id: {pod}"))
        .to_string();
    let tasks = ctr(&["task", "ls"]);
    tasks
        .lines()
        .find(|l| l.starts_with(&id))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no task of container {id}: {tasks}"))
}

/// The capability names of a CapEff mask.
fn capabilities(mask: u64) -> Vec<&'static str> {
    const NAMES: [(u32, &str); 41] = [
        (0, "CHOWN"),
        (1, "DAC_OVERRIDE"),
        (2, "DAC_READ_SEARCH"),
        (3, "FOWNER"),
        (4, "FSETID"),
        (5, "KILL"),
        (6, "SETGID"),
        (7, "SETUID"),
        (8, "SETPCAP"),
        (9, "LINUX_IMMUTABLE"),
        (10, "NET_BIND_SERVICE"),
        (11, "NET_BROADCAST"),
        (12, "NET_ADMIN"),
        (13, "NET_RAW"),
        (14, "IPC_LOCK"),
        (15, "IPC_OWNER"),
        (16, "SYS_MODULE"),
        (17, "SYS_RAWIO"),
        (18, "SYS_CHROOT"),
        (19, "SYS_PTRACE"),
        (20, "SYS_PACCT"),
        (21, "SYS_ADMIN"),
        (22, "SYS_BOOT"),
        (23, "SYS_NICE"),
        (24, "SYS_RESOURCE"),
        (25, "SYS_TIME"),
        (26, "SYS_TTY_CONFIG"),
        (27, "MKNOD"),
        (28, "LEASE"),
        (29, "AUDIT_WRITE"),
        (30, "AUDIT_CONTROL"),
        (31, "SETFCAP"),
        (32, "MAC_OVERRIDE"),
        (33, "MAC_ADMIN"),
        (34, "SYSLOG"),
        (35, "WAKE_ALARM"),
        (36, "BLOCK_SUSPEND"),
        (37, "AUDIT_READ"),
        (38, "PERFMON"),
        (39, "BPF"),
        (40, "CHECKPOINT_RESTORE"),
    ];
    let mut out: Vec<&str> = NAMES
        .iter()
        .filter(|(b, _)| mask & (1 << b) != 0)
        .map(|(_, n)| *n)
        .collect();
    out.sort_unstable();
    out
}

fn proc_status_field(pid: u32, field: &str) -> String {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/<pid>/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/<pid>/stat");
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

/// Pin directories and files under `root` (recursively).
fn pins_under(root: &str) -> Vec<String> {
    fn walk(dir: &std::path::Path, out: &mut Vec<String>) {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                out.push(e.path().display().to_string());
                walk(&e.path(), out);
            }
        }
    }
    let mut out = Vec::new();
    walk(std::path::Path::new(root), &mut out);
    out
}

fn json_of(args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&kubectl_ok(args)).expect("kubectl -o json")
}

/// Preconditions of an install on the real node: the images imported.
fn install_preconditions() {
    let images = ctr(&["images", "ls", "-q"]);
    for image in IMAGES {
        assert!(
            images.lines().any(|l| l == image),
            "{image} is not in the node's containerd: run scripts/images.sh import"
        );
    }
}

/// Where an install's pods are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    /// Every pod on the real node (node selectors in the values).
    Pinned,
    /// The defaults: the operator where the scheduler puts it (the real node: the simulated
    /// ones are cordoned), a runner on every node.
    Everywhere,
}

/// Nodes cordoned (`kubectl cordon`) for a test's span, uncordoned on drop.
struct Cordoned(Vec<String>);

impl Cordoned {
    fn nodes(nodes: &[String]) -> Self {
        for n in nodes {
            kubectl_ok(&["cordon", n]);
        }
        Cordoned(nodes.to_vec())
    }
}

impl Drop for Cordoned {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = kubectl(&["uncordon", n]);
        }
    }
}

/// What one install showed.
struct Figures {
    ready: std::time::Duration,
    runner_pid: u32,
    rss: String,
    idle_cpu: f64,
}

/// An installed release in `ns` (installed at `start`): every pod Ready on the real node, the
/// runner's CapEff exactly the documented set, idle figures, and the example TraceJob on a
/// workload pod Succeeded with its rows (`kubectl get results` shows it); the job deleted after.
async fn exercise(
    ns: &str,
    start: std::time::Instant,
    work_ns: &str,
    placement: Placement,
) -> Figures {
    let node = env().real_node.as_str();
    for app in ["fathom-operator", "fathom-node-runner"] {
        kubectl_ok(&[
            "-n",
            ns,
            "wait",
            "pod",
            "-l",
            &format!("app.kubernetes.io/name={app}"),
            "--for=condition=Ready",
            "--timeout=120s",
        ]);
    }
    let ready = start.elapsed();
    let pods = json_of(&["-n", ns, "get", "pods", "-o", "json"]);
    let mut runner_nodes = Vec::new();
    for p in pods["items"].as_array().expect("pods") {
        let on = p["spec"]["nodeName"].as_str().unwrap_or_default();
        let app = p["metadata"]["labels"]["app.kubernetes.io/name"]
            .as_str()
            .unwrap_or_default();
        if app == "fathom-node-runner" {
            runner_nodes.push(on.to_string());
        }
        if placement == Placement::Pinned || app == "fathom-operator" {
            assert_eq!(on, node, "{}", p["metadata"]["name"]);
        }
    }
    let operators = operator_pods(ns);
    assert_eq!(operators.len(), 2, "two operator replicas: {operators:?}");
    if placement == Placement::Everywhere {
        // The DaemonSet tolerates every taint: a runner on every node, cordoned ones too.
        let mut all = env().sim_nodes.clone();
        all.push(node.to_string());
        all.sort();
        runner_nodes.sort();
        assert_eq!(runner_nodes, all, "the runner pods' nodes");
    }

    // The runner's effective capabilities are exactly the documented set. (With hostPID the
    // container's /proc/1 is the host's init: the runner is read by its host pid.)
    let pid = runner_pid(ns);
    let cap_eff = u64::from_str_radix(&proc_status_field(pid, "CapEff"), 16).expect("CapEff hex");
    let mut want: Vec<&str> = fathom_e2e::chart::RUNNER_CAPABILITIES.to_vec();
    want.sort_unstable();
    assert_eq!(
        capabilities(cap_eff),
        want,
        "CapEff {cap_eff:#x} of the runner (pid {pid})"
    );
    assert_eq!(proc_status_field(pid, "NoNewPrivs"), "1");

    // Idle figures of the runner as a pod.
    let ticks0 = cpu_ticks(pid);
    tokio::time::sleep(std::time::Duration::from_secs(10)).await;
    let idle_cpu = (cpu_ticks(pid) - ticks0) as f64 / 100.0 / 10.0 * 100.0;
    let rss = proc_status_field(pid, "VmRSS");

    // A workload and the example job on it, applied with kubectl as a user would.
    let web = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": work_ns},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {
                    "nodeSelector": {"kubernetes.io/hostname": node},
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{
                        "name": "web", "image": fathom_e2e::BUSYBOX, "imagePullPolicy": "Never",
                        "command": ["/bin/sh", "-c", "while true; do cat /etc/hostname >/dev/null; sleep 0.2; done"],
                    }]
                }
            }
        }
    });
    let file = fathom_e2e::e2e_file("install-web.json");
    std::fs::create_dir_all(file.parent().expect("dir")).expect("dir");
    std::fs::write(&file, web.to_string()).expect("file");
    kubectl_ok(&["apply", "-f", file.to_str().expect("utf-8")]);
    kubectl_ok(&[
        "-n",
        work_ns,
        "rollout",
        "status",
        "deployment/web",
        "--timeout=60s",
    ]);
    run_example_job(ns, work_ns).await;
    // Logs as `kubectl logs` shows them: plain text, no terminal colour codes.
    let runner_pod = real_runner_pod(ns)["metadata"]["name"]
        .as_str()
        .expect("name")
        .to_string();
    for (app, pods) in [
        ("fathom-operator", operator_pods(ns)),
        ("fathom-node-runner", vec![runner_pod]),
    ] {
        let logs = pods
            .iter()
            .map(|p| kubectl_ok(&["-n", ns, "logs", "--tail=200", p]))
            .collect::<String>();
        assert!(!logs.trim().is_empty(), "{app} logged nothing");
        assert!(
            !logs.contains('\x1b'),
            "{app}'s log has ANSI escapes:\n{logs}"
        );
    }
    Figures {
        ready,
        runner_pid: pid,
        rss,
        idle_cpu,
    }
}

/// `kubectl apply -f examples/pod-opens.yaml` in `work_ns` (whose `web` pod opens files):
/// Succeeded, `kubectl get results` lists it, its rows are the web pod's counts and only its;
/// then the job is deleted. `ns`: the release, for its logs on a failure.
async fn run_example_job(ns: &str, work_ns: &str) {
    let example = fathom_e2e::workspace_root().join("examples/pod-opens.yaml");
    kubectl_ok(&[
        "-n",
        work_ns,
        "apply",
        "-f",
        example.to_str().expect("utf-8"),
    ]);
    let job_start = std::time::Instant::now();
    loop {
        let job = json_of(&["-n", work_ns, "get", "tracejob", "pod-opens", "-o", "json"]);
        let phase = job["status"]["phase"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if phase == "Succeeded" {
            break;
        }
        if phase == "Failed" || job_start.elapsed().as_secs() > 120 {
            let logs = |app: &str| {
                let pods = match app {
                    "fathom-operator" => operator_pods(ns),
                    _ => vec![
                        real_runner_pod(ns)["metadata"]["name"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                    ],
                };
                pods.iter()
                    .map(|p| {
                        kubectl(&["-n", ns, "logs", "--tail=40", p])
                            .unwrap_or_else(|e| e.to_string())
                    })
                    .collect::<String>()
            };
            panic!(
                "job pod-opens: {phase:?}: {:#}\n--- runner:\n{}\n--- operator:\n{}",
                job["status"],
                logs("fathom-node-runner"),
                logs("fathom-operator")
            );
        }
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
    let results = kubectl_ok(&["-n", work_ns, "get", "results"]);
    assert!(
        results.contains("pod-opens"),
        "kubectl get results: {results}"
    );
    let result = json_of(&["-n", work_ns, "get", "traceresults", "-o", "json"]);
    let rows = result["items"][0]["status"]["data"]["rows"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let web_pod = json_of(&["-n", work_ns, "get", "pods", "-l", "app=web", "-o", "json"])["items"]
        [0]["metadata"]["name"]
        .as_str()
        .expect("web pod")
        .to_string();
    assert!(
        rows.iter()
            .any(|r| r["keys"]["pod"].as_str() == Some(web_pod.as_str())
                && r["value"].as_u64().unwrap_or(0) > 0),
        "no row of {web_pod}: {rows:#?}"
    );
    assert!(
        rows.iter()
            .all(|r| r["keys"]["pod"].as_str() == Some(web_pod.as_str())),
        "rows of other pods: {rows:#?}"
    );
    // Jobs go before the operator does (their cleanup finalizer is its).
    kubectl_ok(&[
        "-n",
        work_ns,
        "delete",
        "tracejob",
        "pod-opens",
        "--wait=true",
        "--timeout=60s",
    ]);
}

/// The operator pods of release namespace `ns`, by name.
fn operator_pods(ns: &str) -> Vec<String> {
    kubectl_ok(&[
        "-n",
        ns,
        "get",
        "pods",
        "-l",
        "app.kubernetes.io/name=fathom-operator",
        "-o",
        "jsonpath={range .items[*]}{.metadata.name}{\"\\n\"}{end}",
    ])
    .lines()
    .map(str::to_string)
    .collect()
}

/// The holder of the leader Lease of release namespace `ns` ("" when none).
async fn lease_holder(ns: &str) -> String {
    fathom_e2e::lease_holder_in(&admin().await, ns, "fathom-operator-leader")
        .await
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// The leader replica's pod is deleted, as a node drain or a crash would: the standby takes
/// the Lease over and the Deployment's new pod becomes Ready as the next standby. Returns the
/// time from the delete to the new leader.
async fn fail_over(ns: &str) -> std::time::Duration {
    let pods = operator_pods(ns);
    assert_eq!(pods.len(), 2, "two operator replicas: {pods:?}");
    let leader = lease_holder(ns).await;
    assert!(
        pods.contains(&leader),
        "the Lease is held by {leader:?}, not one of the replicas {pods:?}"
    );
    let start = std::time::Instant::now();
    kubectl_ok(&["-n", ns, "delete", "pod", &leader, "--wait=false"]);
    let new_leader = loop {
        let holder = lease_holder(ns).await;
        if !holder.is_empty() && holder != leader {
            break holder;
        }
        assert!(
            start.elapsed().as_secs() < 120,
            "no replica took the Lease over from {leader} within 120 s (holder {holder:?})"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    };
    let took_over = start.elapsed();
    // The leader releases the Lease as it stops: the standby or the Deployment's new pod,
    // whichever asks first, takes it.
    let now = operator_pods(ns);
    assert!(
        now.contains(&new_leader),
        "the new leader {new_leader} is none of the operator pods {now:?}"
    );
    eprintln!(
        "operator fail-over: {leader} deleted; {new_leader} ({}) leads",
        if pods.contains(&new_leader) {
            "the standby"
        } else {
            "the replacement pod"
        }
    );
    kubectl_ok(&[
        "-n",
        ns,
        "rollout",
        "status",
        "deployment",
        "-l",
        "app.kubernetes.io/name=fathom-operator",
        "--timeout=120s",
    ]);
    took_over
}

/// After an uninstall: no pod of `ns`, the runner process gone, no program or link of Fathom
/// beyond `programs_before`, no pin under `pin_root`, no cluster-scoped object of `instance`;
/// the CRDs kept.
async fn assert_nothing_left(
    ns: &str,
    instance: &str,
    figures: &Figures,
    pin_root: &str,
    programs_before: &[String],
) {
    let gone = std::time::Instant::now();
    loop {
        let left = kubectl_ok(&["-n", ns, "get", "pods", "-o", "name"]);
        if left.trim().is_empty() {
            break;
        }
        assert!(
            gone.elapsed().as_secs() < 60,
            "pods left after the uninstall: {left}"
        );
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
    assert!(
        !std::path::Path::new(&format!("/proc/{}", figures.runner_pid)).exists(),
        "the runner process is still there"
    );
    assert_eq!(
        fathom_e2e::runner::fathom_programs(),
        programs_before,
        "programs (and their links) left"
    );
    let pins = pins_under(pin_root);
    assert!(pins.is_empty(), "pins left under {pin_root}: {pins:?}");
    // The pin root itself (an empty directory the runner made) stays on the node; removed here
    // so that the machine is as before.
    let _ = std::fs::remove_dir(pin_root);
    for crd in [
        "tracejobs.fathom.dev",
        "traceresults.fathom.dev",
        "clustertracejobs.fathom.dev",
        "traceassignments.fathom.dev",
    ] {
        kubectl_ok(&["get", "crd", crd]);
    }
    for kind in [
        "clusterrole",
        "clusterrolebinding",
        "validatingadmissionpolicy",
        "validatingadmissionpolicybinding",
    ] {
        let left = kubectl_ok(&[
            "get",
            kind,
            "-l",
            &format!("app.kubernetes.io/instance={instance}"),
            "-o",
            "name",
        ]);
        assert!(left.trim().is_empty(), "{kind} left: {left}");
    }
}

#[tokio::test]
async fn the_chart_installs_on_the_real_node_runs_a_tracejob_and_uninstalls_leaving_nothing() {
    let _ = admin().await;
    install_preconditions();
    let node = env().real_node.clone();
    let pin_root = "/sys/fs/bpf/fathom-it";
    let programs_before = fathom_e2e::runner::fathom_programs();
    let work = ScratchNamespace::create("fathom-install-work");

    let start = std::time::Instant::now();
    let mut args: Vec<String> = local_cluster_values(&node, pin_root);
    args.extend(["--wait".into(), "--timeout".into(), "180s".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let release = Release::install("fathom-it", "fathom-install", &args);
    let figures = exercise(&release.namespace, start, work.as_str(), Placement::Pinned).await;
    // Leader election as pods: the leader goes, the standby leads, and the product path works
    // through it (the runner reconnects to the new leader's collector).
    let took_over = fail_over(&release.namespace).await;
    run_example_job(&release.namespace, work.as_str()).await;
    eprintln!(
        "operator fail-over: a new leader held the Lease {:.1} s after the leader's pod was deleted",
        took_over.as_secs_f64()
    );

    let out = helm(&[
        "uninstall",
        "fathom-it",
        "--namespace",
        &release.namespace,
        "--wait",
        "--timeout",
        "120s",
    ]);
    assert!(
        out.status.success(),
        "helm uninstall: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_nothing_left(
        &release.namespace,
        "fathom-it",
        &figures,
        pin_root,
        &programs_before,
    )
    .await;
    eprintln!(
        "install figures (helm): install to every pod Ready {:.1} s; runner idle: VmRSS {}, CPU {:.2} % of a core over 10 s",
        figures.ready.as_secs_f64(),
        figures.rss,
        figures.idle_cpu
    );
}

/// The GitOps way, exactly as docs/install.md tells it: `kubectl create namespace fathom-system`,
/// `scripts/collector-tls.sh`, `kubectl apply --server-side -k deploy/` — the checked-in
/// manifests, defaults and all. The simulated nodes run no containers, so they are cordoned
/// for the test: the operator's two replicas land on the real node, the runner DaemonSet (which
/// tolerates every taint) on every node. Then the same checks as the Helm install, and the
/// documented uninstall — `kubectl delete -k deploy/ -l app.kubernetes.io/instance=fathom`,
/// which keeps the CRDs (and so every TraceJob), then the namespace — leaves nothing.
#[tokio::test]
async fn deploy_applies_with_kubectl_runs_a_tracejob_and_deletes_leaving_nothing() {
    let _ = admin().await;
    install_preconditions();
    let root = fathom_e2e::workspace_root();
    let (ns, pin_root) = ("fathom-system", "/sys/fs/bpf/fathom");
    assert!(
        kubectl(&["get", "namespace", ns]).is_err(),
        "{ns} exists already: this test installs deploy/ there as it ships"
    );
    let programs_before = fathom_e2e::runner::fathom_programs();
    let work = ScratchNamespace::create("fathom-gitops-work");
    let cordoned = Cordoned::nodes(&env().sim_nodes);

    let start = std::time::Instant::now();
    kubectl_ok(&["create", "namespace", ns]);
    let tls = Command::new("bash")
        .arg(root.join("scripts/collector-tls.sh"))
        .env("KUBECONFIG", &env().kubeconfig)
        .output()
        .expect("scripts/collector-tls.sh");
    assert!(
        tls.status.success(),
        "scripts/collector-tls.sh: {}",
        String::from_utf8_lossy(&tls.stderr)
    );
    let deploy = root.join("deploy");
    let deploy = deploy.to_str().expect("utf-8");
    kubectl_ok(&["apply", "--server-side", "-k", deploy]);
    let figures = exercise(ns, start, work.as_str(), Placement::Everywhere).await;
    let took_over = fail_over(ns).await;
    run_example_job(ns, work.as_str()).await;

    kubectl_ok(&[
        "delete",
        "-k",
        deploy,
        "-l",
        "app.kubernetes.io/instance=fathom",
        "--wait=true",
        "--timeout=120s",
    ]);
    assert_nothing_left(ns, "fathom", &figures, pin_root, &programs_before).await;
    kubectl_ok(&["delete", "namespace", ns, "--wait=true", "--timeout=120s"]);
    drop(cordoned);
    eprintln!(
        "install figures (kubectl apply -k deploy/): apply to every pod Ready {:.1} s; runner idle: VmRSS {}, CPU {:.2} % of a core over 10 s; fail-over {:.1} s",
        figures.ready.as_secs_f64(),
        figures.rss,
        figures.idle_cpu,
        took_over.as_secs_f64()
    );
}
