//! What the e2e tests share: the local cluster's environment and clients, bounded polling,
//! the API server's audit log, per-test namespaces, `kubectl`, local workloads, and the
//! operator as a real `fathom-operator` child process.
//!
//! The cluster is the one `scripts/cluster.sh up` starts on this machine; its environment comes
//! from `eval "$(scripts/cluster.sh env)"`. Without it every test fails with a message saying
//! so: the suite never passes or skips without a cluster.

use std::{
    collections::BTreeSet,
    fmt::Display,
    fs::File,
    io::{Read as _, Seek as _, SeekFrom, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Once, OnceLock,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail, ensure};
use fathom_crds::{
    TraceAssignment,
    assignment::{JOB_NAMESPACE_LABEL, JOB_UID_LABEL},
};
use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        coordination::v1::Lease,
        core::v1::{ConfigMap, Namespace, Node, Pod},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, Config, ResourceExt,
    api::{ListParams, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use serde::Deserialize;
use serde_json::{Value, json};

pub mod chart;
pub mod runner;

/// The field manager of everything the tests write as the cluster admin.
pub const MANAGER: &str = "fathom-e2e";
/// Where the operator processes the tests run live: their ServiceAccounts, their Lease, the
/// assignments (scripts/cluster.sh `E2E_NAMESPACE`). Not `fathom-system`, which is left to
/// `kubectl apply -k deploy/` as it ships (tests/install.rs).
pub const OPERATOR_NAMESPACE: &str = "fathom-e2e";
/// The release name the chart's RBAC is rendered with for the test processes' identities
/// (ServiceAccounts `fathom-e2e-operator` and `fathom-e2e-node-runner`, made by
/// scripts/cluster.sh): its cluster-scoped objects never collide with a real install's.
pub const HARNESS_RELEASE: &str = "fathom-e2e";
/// The operator's identity as the API server (and its audit log) sees it.
pub const OPERATOR_USER: &str = "system:serviceaccount:fathom-e2e:fathom-e2e-operator";
/// The node runner's identity (the collector accepts only its tokens).
pub const RUNNER_USER: &str = "system:serviceaccount:fathom-e2e:fathom-e2e-node-runner";
/// A second operator identity, for the leader election test (`manifests/second-operator.yaml`).
pub const OPERATOR_2_USER: &str = "system:serviceaccount:fathom-e2e:fathom-operator-2";
/// The garbage collector's identity (kube-controller-manager runs with
/// `--use-service-account-credentials`).
pub const GC_USER: &str = "system:serviceaccount:kube-system:generic-garbage-collector";
/// The label that marks the simulated nodes.
pub const SIM_LABEL: &str = "fathom.dev/simulated";
/// Set to `off` on a simulated node, its heartbeat stops and the node goes NotReady.
pub const SIM_HEARTBEAT_LABEL: &str = "fathom.dev/sim-heartbeat";
/// The local images (no registry is reachable: pods use `imagePullPolicy: Never`).
pub const BUSYBOX: &str = "fathom.local/busybox:1";
/// The workload image: busybox and `/workload` (node-runner/tests/workload/workload.c), built
/// by scripts/cluster.sh.
pub const WORKLOAD_IMAGE: &str = "fathom.local/workload:1";

pub(crate) const HOWTO: &str = "the e2e suite runs against the local cluster of scripts/cluster.sh: \
start it with `scripts/cluster.sh up` (as root), load its environment with \
`eval \"$(scripts/cluster.sh env)\"`, then run `cargo test -p fathom-e2e -- --test-threads=1`";

/// A `Duration` of `n` seconds.
pub const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

// ------------------------------------------------------------------ environment and clients

/// The variables `scripts/cluster.sh env` exports.
#[derive(Debug)]
pub struct Env {
    pub kubeconfig: PathBuf,
    pub state: PathBuf,
    pub audit_log: PathBuf,
    pub operator_kubeconfig: PathBuf,
    pub runner_kubeconfig: PathBuf,
    /// The node with a real kubelet, containerd and runc.
    pub real_node: String,
    /// Kubelet-less nodes kept Ready (pods bound there are marked Running).
    pub sim_nodes: Vec<String>,
    /// containerd's socket; its CRI namespace is `k8s.io`.
    pub containerd: PathBuf,
}

fn var(name: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!("{name} is not set: {HOWTO}"),
    }
}

/// The cluster's environment; panics, saying how to get it, when it is not set.
/// The `RUST_LOG` filter of the operator and runner processes the tests start: `info`, or
/// `FATHOM_E2E_LOG` (e.g. `info,fathom_operator::collector=debug`) when debugging.
pub fn log_filter() -> String {
    std::env::var("FATHOM_E2E_LOG").unwrap_or_else(|_| "info".into())
}

/// Starts a component (operator, runner) with `args`: nothing of the test's environment but
/// PATH, the `kubeconfig` it acts with and the log filter; stdout and stderr to `log`.
pub(crate) fn spawn_component<S: AsRef<std::ffi::OsStr>>(
    bin: &Path,
    args: &[S],
    kubeconfig: &Path,
    log: File,
) -> Child {
    let err = log.try_clone().expect("component log");
    Command::new(bin)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", log_filter())
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()))
}

pub fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| Env {
        kubeconfig: var("KUBECONFIG").into(),
        state: var("FATHOM_CLUSTER_STATE").into(),
        audit_log: var("FATHOM_E2E_AUDIT_LOG").into(),
        operator_kubeconfig: var("FATHOM_E2E_OPERATOR_KUBECONFIG").into(),
        runner_kubeconfig: var("FATHOM_E2E_RUNNER_KUBECONFIG").into(),
        real_node: var("FATHOM_E2E_REAL_NODE"),
        sim_nodes: std::env::var("FATHOM_E2E_SIM_NODES")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
        containerd: var("FATHOM_E2E_CONTAINERD").into(),
    })
}

impl Env {
    /// The first simulated node; panics when the cluster has none.
    pub fn sim_node(&self) -> &str {
        self.sim_nodes
            .first()
            .map(String::as_str)
            .unwrap_or_else(|| panic!("FATHOM_E2E_SIM_NODES lists no simulated node; {HOWTO}"))
    }
}

/// A client for the cluster as the user of `kubeconfig`.
pub async fn client_for(kubeconfig: &Path) -> Client {
    let kc = Kubeconfig::read_from(kubeconfig)
        .unwrap_or_else(|e| panic!("reading {}: {e}; {HOWTO}", kubeconfig.display()));
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap_or_else(|e| panic!("loading {}: {e}; {HOWTO}", kubeconfig.display()));
    Client::try_from(config)
        .unwrap_or_else(|e| panic!("a client from {}: {e}", kubeconfig.display()))
}

/// The cluster admin (`system:masters`), after checking the API server answers. The first
/// call of a test process prints the server's version, past the test harness' capture, so the
/// output shows what the suite ran against.
pub async fn admin() -> Client {
    let env = env();
    let client = client_for(&env.kubeconfig).await;
    let version = match tokio::time::timeout(secs(15), client.apiserver_version()).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => panic!(
            "the API server of {} does not answer: {e}; {HOWTO}",
            env.kubeconfig.display()
        ),
        Err(_) => panic!(
            "the API server of {} did not answer within 15 s; {HOWTO}",
            env.kubeconfig.display()
        ),
    };
    static PRINTED: Once = Once::new();
    PRINTED.call_once(|| {
        let _ = writeln!(
            std::io::stderr(),
            "fathom-e2e: API server {} ({}) of {}, real node {}, simulated nodes {:?}",
            version.git_version,
            version.platform,
            env.kubeconfig.display(),
            env.real_node,
            env.sim_nodes,
        );
    });
    client
}

/// The operator's own identity (ServiceAccount fathom-e2e/fathom-e2e-operator).
pub async fn operator_client() -> Client {
    client_for(&env().operator_kubeconfig).await
}

// ------------------------------------------------------------------ polling

/// Calls `f` until it returns Ok, at most for `timeout`; panics naming `what` and the last
/// error (what was seen instead) when the time is up.
pub async fn eventually<T>(
    timeout: Duration,
    what: impl Display,
    mut f: impl AsyncFnMut() -> anyhow::Result<T>,
) -> T {
    let start = Instant::now();
    loop {
        let last = match f().await {
            Ok(v) => return v,
            Err(e) => e,
        };
        if start.elapsed() >= timeout {
            panic!(
                "timed out after {} s waiting for {what}; last seen: {last:#}",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

// ------------------------------------------------------------------ paths, kubectl

/// The workspace's root directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e/ is in the workspace")
        .to_path_buf()
}

/// A fixture of `e2e/manifests/`.
pub fn manifest(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("manifests")
        .join(name)
}

/// The Cargo target directory (`CARGO_TARGET_DIR`, else `target/` of the workspace).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// `target/e2e-logs/<name>`, the folder made if need be: where the tests put logs, rendered
/// manifests and tokens (a clean clone has no such folder until the first test writes one).
pub fn e2e_file(name: &str) -> PathBuf {
    let dir = target_dir().join("e2e-logs");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir.join(name)
}

/// Runs `kubectl` as the cluster admin: stdout, or an error with its stderr.
pub fn kubectl(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("kubectl")
        .args(args)
        .env("KUBECONFIG", &env().kubeconfig)
        .output()
        .context("running kubectl (is it installed?)")?;
    if !out.status.success() {
        bail!(
            "kubectl {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `kubectl` as the cluster admin; panics when it fails.
pub fn kubectl_ok(args: &[&str]) -> String {
    kubectl(args).unwrap_or_else(|e| panic!("{e:#}"))
}

// ------------------------------------------------------------------ CRDs and RBAC

/// The committed CRDs (`crds/generated/*.yaml`), as a user installs them.
pub fn generated_crds() -> Vec<CustomResourceDefinition> {
    let dir = fathom_crds::crd::generated_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| {
            let text =
                std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        })
        .collect()
}

/// Applies the committed CRDs (server-side apply, idempotent) and waits until each is
/// Established with its names accepted.
pub async fn apply_crds(client: &Client) -> Vec<CustomResourceDefinition> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crds = generated_crds();
    for c in &crds {
        let name = c.name_any();
        api.patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(c),
        )
        .await
        .unwrap_or_else(|e| panic!("the API server refused CRD {name}: {e}"));
    }
    let mut stored = Vec::new();
    for c in &crds {
        let name = c.name_any();
        stored.push(
            eventually(secs(60), format!("CRD {name} Established"), async || {
                let crd = api.get(&name).await?;
                let conds = crd
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.clone())
                    .unwrap_or_default();
                for t in ["NamesAccepted", "Established"] {
                    ensure!(
                        conds.iter().any(|c| c.type_ == t && c.status == "True"),
                        "conditions {:?}",
                        conds
                            .iter()
                            .map(|c| (&c.type_, &c.status, &c.message))
                            .collect::<Vec<_>>()
                    );
                }
                Ok(crd)
            })
            .await,
        );
    }
    stored
}

/// Installs the CRDs and the chart's tenant admission policies (`tenant-policy.yaml`) once per
/// test process, and waits until the API server enforces the policies.
pub async fn install_crds(client: &Client) {
    static DONE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    DONE.get_or_init(async || {
        apply_crds(client).await;
        apply_chart_rbac("tenant-policy.yaml");
        let jobs: Api<fathom_crds::TraceJob> = Api::namespaced(client.clone(), "default");
        let probe: fathom_crds::TraceJob = serde_json::from_value(serde_json::json!({
            "apiVersion": "fathom.dev/v1alpha1", "kind": "TraceJob",
            "metadata": {"name": "admission-probe", "namespace": "default"},
            "spec": {"probe": {"kprobe": "tcp_v4_connect"},
                     "podSelector": {"matchLabels": {"app": "none"}}},
        }))
        .expect("probe job");
        let dry = PostParams {
            dry_run: true,
            ..Default::default()
        };
        eventually(
            secs(60),
            "the tenant admission policies enforced",
            async || match jobs.create(&dry, &probe).await {
                Err(kube::Error::Api(e)) if e.message.contains("refused by rule") => Ok(()),
                other => anyhow::bail!("a kprobe TraceJob passed admission: {other:?}"),
            },
        )
        .await;
    })
    .await;
}

/// Applies a manifest of `e2e/manifests/` (server-side, as the admin).
pub fn apply_manifest(name: &str) {
    apply_file(&manifest(name));
}

/// Applies a file server-side as the admin, taking over its fields.
fn apply_file(path: &Path) {
    kubectl_ok(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "--field-manager",
        MANAGER,
        "-f",
        path.to_str().expect("utf-8 path"),
    ]);
}

/// Applies a template of the chart's RBAC (`charts/fathom/templates/<template>`) as release
/// [`HARNESS_RELEASE`] in the operator's namespace renders it — ServiceAccounts
/// `fathom-e2e-operator` and `fathom-e2e-node-runner` of `fathom-e2e`, the cluster's
/// identities — server-side, as the admin. The chart is the one source of the components'
/// permissions.
pub fn apply_chart_rbac(template: &str) {
    let yaml = chart::helm_ok(&[
        "template",
        HARNESS_RELEASE,
        "charts/fathom",
        "--namespace",
        OPERATOR_NAMESPACE,
        "--show-only",
        &format!("templates/{template}"),
    ]);
    let path = e2e_file(&format!("chart-{template}"));
    std::fs::write(&path, yaml).expect("rendered RBAC");
    apply_file(&path);
}

/// Grants the operator's ServiceAccount its permissions (the chart's `rbac-operator.yaml`),
/// once per test process.
pub fn install_operator_rbac() {
    static DONE: Once = Once::new();
    DONE.call_once(|| apply_chart_rbac("rbac-operator.yaml"));
}

// ------------------------------------------------------------------ namespaces and cleanup

/// Removes the finalizers of the Fathom objects of a namespace (the operator may be gone, and
/// no runner runs), so the namespace can go; and deletes (releasing their finalizers) the
/// assignments of its jobs, which live in the operator's namespace and have no ownerReference.
fn release_fathom_objects(ns: &str) {
    release_assignments_of_namespace(ns);
    for kind in ["tracejobs.fathom.dev", "traceassignments.fathom.dev"] {
        let Ok(names) = kubectl(&["-n", ns, "get", kind, "-o", "name"]) else {
            continue;
        };
        for obj in names.lines().filter(|l| !l.is_empty()) {
            let _ = kubectl(&[
                "-n",
                ns,
                "patch",
                obj,
                "--type=merge",
                "-p",
                r#"{"metadata":{"finalizers":null}}"#,
            ]);
        }
    }
}

/// Deletes the assignments of the TraceJobs of namespace `ns` (label `fathom.dev/job-namespace`,
/// in the operator's namespace) and removes their finalizers: no runner detaches here.
fn release_assignments_of_namespace(ns: &str) {
    let selector = format!("{JOB_NAMESPACE_LABEL}={ns}");
    let Ok(names) = kubectl(&[
        "-n",
        OPERATOR_NAMESPACE,
        "get",
        "traceassignments.fathom.dev",
        "-l",
        &selector,
        "-o",
        "name",
    ]) else {
        return;
    };
    for obj in names.lines().filter(|l| !l.is_empty()) {
        let ns_args = ["-n", OPERATOR_NAMESPACE];
        let _ = kubectl(
            &[
                &ns_args[..],
                &["delete", obj, "--wait=false", "--ignore-not-found"],
            ]
            .concat(),
        );
        let _ = kubectl(
            &[
                &ns_args[..],
                &[
                    "patch",
                    obj,
                    "--type=merge",
                    "-p",
                    r#"{"metadata":{"finalizers":null}}"#,
                ],
            ]
            .concat(),
        );
    }
}

/// The label of the tests' namespaces.
const E2E_LABEL: &str = "fathom.dev/e2e=true";

/// A namespace of one test, `fathom-e2e-<test>`: created fresh (a leftover of an earlier run is
/// removed first), deleted when dropped, even when the test fails.
pub struct TestNamespace {
    pub name: String,
}

impl TestNamespace {
    pub async fn create(client: &Client, test: &str) -> TestNamespace {
        let name = format!("fathom-e2e-{test}");
        assert!(
            name.len() <= 63
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
            "{name} is not a namespace name"
        );
        // Leftovers of earlier runs (this test's namespace, or any other test's): gone first,
        // so no operator of this test finds objects of another.
        let api: Api<Namespace> = Api::all(client.clone());
        let mut leftovers: BTreeSet<String> = api
            .list(&ListParams::default().labels(E2E_LABEL))
            .await
            .unwrap_or_else(|e| panic!("listing namespaces: {e}; {HOWTO}"))
            .items
            .iter()
            .map(|n| n.name_any())
            .collect();
        if api.get_opt(&name).await.expect("get namespace").is_some() {
            leftovers.insert(name.clone());
        }
        // Assignments of this namespace's jobs an earlier run left in the operator's namespace
        // (they have no ownerReference, so its deletion did not take them).
        release_assignments_of_namespace(&name);
        for old in leftovers {
            drop(TestNamespace { name: old.clone() });
            if api.get_opt(&old).await.expect("get namespace").is_some() {
                panic!("namespace {old} left by an earlier run does not go away");
            }
        }
        let ns: Namespace = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"fathom.dev/e2e": "true"}}
        }))
        .expect("namespace");
        api.create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
        TestNamespace { name }
    }

    pub fn as_str(&self) -> &str {
        &self.name
    }
}

impl Drop for TestNamespace {
    /// Deletes the namespace and waits (at most a minute) until it is gone, so that nothing of
    /// this test is left for the next test's operator to act on.
    fn drop(&mut self) {
        let ns = self.name.as_str();
        let _ = kubectl(&[
            "delete",
            "namespace",
            ns,
            "--wait=false",
            "--ignore-not-found",
        ]);
        // Pods of simulated nodes have no kubelet to confirm their end.
        let _ = kubectl(&[
            "-n",
            ns,
            "delete",
            "pods",
            "--all",
            "--force",
            "--grace-period=0",
            "--wait=false",
        ]);
        let deadline = Instant::now() + secs(60);
        loop {
            release_fathom_objects(ns);
            match kubectl(&["get", "namespace", ns, "--ignore-not-found", "-o", "name"]) {
                Ok(out) if out.trim().is_empty() => return,
                _ if Instant::now() >= deadline => {
                    eprintln!("namespace {ns} still there a minute after its deletion");
                    return;
                }
                _ => std::thread::sleep(Duration::from_millis(500)),
            }
        }
    }
}

/// A ClusterTraceJob of a test: deleted when dropped, its finalizers and its assignments'
/// released, so no leftover holds the operator's namespace.
pub struct ClusterJobGuard {
    pub name: String,
}

impl Drop for ClusterJobGuard {
    /// Deletes the job and its assignments, releasing their finalizers, and waits (at most a
    /// minute) until they are gone.
    fn drop(&mut self) {
        let name = self.name.as_str();
        let release = r#"{"metadata":{"finalizers":null}}"#;
        let selector = format!("fathom.dev/job={name},fathom.dev/job-kind=ClusterTraceJob");
        let deadline = Instant::now() + secs(60);
        loop {
            let job = kubectl(&[
                "get",
                "clustertracejobs.fathom.dev",
                name,
                "--ignore-not-found",
                "-o",
                "name",
            ])
            .unwrap_or_default();
            let assignments = kubectl(&[
                "-n",
                OPERATOR_NAMESPACE,
                "get",
                "traceassignments.fathom.dev",
                "-l",
                &selector,
                "-o",
                "name",
            ])
            .unwrap_or_default();
            if job.trim().is_empty() && assignments.trim().is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                eprintln!("ClusterTraceJob {name} or its assignments still there after a minute");
                return;
            }
            if !job.trim().is_empty() {
                let _ = kubectl(&["delete", job.trim(), "--wait=false", "--ignore-not-found"]);
                let _ = kubectl(&["patch", job.trim(), "--type=merge", "-p", release]);
            }
            for obj in assignments.lines().filter(|l| !l.is_empty()) {
                let ns = ["-n", OPERATOR_NAMESPACE];
                let _ = kubectl(
                    &[
                        &ns[..],
                        &["delete", obj, "--wait=false", "--ignore-not-found"],
                    ]
                    .concat(),
                );
                let _ =
                    kubectl(&[&ns[..], &["patch", obj, "--type=merge", "-p", release]].concat());
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

// ------------------------------------------------------------------ nodes

/// Whether the node's Ready condition is True.
pub fn is_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Waits until the node's readiness is `ready`.
pub async fn wait_node_ready(client: &Client, node: &str, ready: bool, timeout: Duration) {
    let api: Api<Node> = Api::all(client.clone());
    eventually(
        timeout,
        format!("node {node} {}", if ready { "Ready" } else { "NotReady" }),
        async || {
            let n = api.get(node).await?;
            ensure!(
                is_ready(&n) == ready,
                "Ready condition: {:?}",
                n.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
                    .map(|c| (&c.status, &c.reason))
            );
            Ok(())
        },
    )
    .await;
}

/// A simulated node whose heartbeat is stopped (label `fathom.dev/sim-heartbeat=off`) until
/// [`SimNodeOutage::restore`] or drop.
pub struct SimNodeOutage {
    pub node: String,
    restored: bool,
}

impl SimNodeOutage {
    pub fn start(node: &str) -> SimNodeOutage {
        kubectl_ok(&[
            "label",
            "node",
            node,
            &format!("{SIM_HEARTBEAT_LABEL}=off"),
            "--overwrite",
        ]);
        SimNodeOutage {
            node: node.to_string(),
            restored: false,
        }
    }

    /// Restarts the heartbeat and waits until the node is Ready again.
    pub async fn restore(mut self, client: &Client) {
        kubectl_ok(&[
            "label",
            "node",
            &self.node,
            &format!("{SIM_HEARTBEAT_LABEL}-"),
        ]);
        self.restored = true;
        wait_node_ready(client, &self.node, true, secs(90)).await;
    }
}

impl Drop for SimNodeOutage {
    fn drop(&mut self) {
        if !self.restored {
            let _ = kubectl(&[
                "label",
                "node",
                &self.node,
                &format!("{SIM_HEARTBEAT_LABEL}-"),
            ]);
        }
    }
}

/// Makes sure a simulated node has its heartbeat (an earlier run may have stopped it) and is
/// Ready.
pub async fn ensure_sim_node_ready(client: &Client, node: &str) {
    let _ = kubectl(&["label", "node", node, &format!("{SIM_HEARTBEAT_LABEL}-")]);
    wait_node_ready(client, node, true, secs(90)).await;
}

// ------------------------------------------------------------------ workloads

/// Applies a Deployment `name` of `replicas` busybox pods (`sleep 3600`, labels `app: name`)
/// pinned to `node`. The pods tolerate every taint, so they stay on a node that goes
/// NotReady.
pub async fn busybox_deployment(client: &Client, ns: &str, name: &str, replicas: i32, node: &str) {
    ScriptDeployment {
        image: BUSYBOX,
        replicas,
        tolerate_all: true,
        ..ScriptDeployment::new(ns, name, node, "exec /bin/sleep 3600")
    }
    .apply(client)
    .await;
}

/// A Deployment of pods, pinned to a node, whose one container (`work`) runs a shell script.
pub struct ScriptDeployment<'a> {
    pub ns: &'a str,
    /// Its name and its pods' label `app`.
    pub app: &'a str,
    pub replicas: i32,
    /// The node its pods are pinned to.
    pub node: &'a str,
    /// [`WORKLOAD_IMAGE`] unless said otherwise.
    pub image: &'a str,
    /// What `/bin/sh -c` runs.
    pub script: &'a str,
    /// A host folder mounted at `/trigger` (created if missing).
    pub trigger: Option<&'a Path>,
    /// The container's environment.
    pub env: &'a [(&'a str, &'a str)],
    /// The pods tolerate every taint (they stay on a node that goes NotReady).
    pub tolerate_all: bool,
}

impl<'a> ScriptDeployment<'a> {
    /// One pod of the workload image running `script` on `node`.
    pub fn new(ns: &'a str, app: &'a str, node: &'a str, script: &'a str) -> Self {
        ScriptDeployment {
            ns,
            app,
            replicas: 1,
            node,
            image: WORKLOAD_IMAGE,
            script,
            trigger: None,
            env: &[],
            tolerate_all: false,
        }
    }

    /// Applies it (server-side, as the test suite's field manager).
    pub async fn apply(&self, client: &Client) {
        let mut container = json!({
            "name": "work",
            "image": self.image,
            "imagePullPolicy": "Never",
            "command": ["/bin/sh", "-c", self.script],
            "env": self.env.iter().map(|(k, v)| json!({"name": k, "value": v})).collect::<Vec<_>>(),
        });
        let mut volumes = Vec::new();
        if let Some(dir) = self.trigger {
            volumes.push(json!({"name": "trigger", "hostPath": {
                "path": dir.to_str().expect("utf-8"), "type": "DirectoryOrCreate"}}));
            container["volumeMounts"] = json!([{"name": "trigger", "mountPath": "/trigger"}]);
        }
        let d: Deployment = serde_json::from_value(json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": self.app, "namespace": self.ns},
            "spec": {
                "replicas": self.replicas,
                "selector": {"matchLabels": {"app": self.app}},
                "template": {
                    "metadata": {"labels": {"app": self.app}},
                    "spec": {
                        "nodeSelector": {"kubernetes.io/hostname": self.node},
                        "tolerations": if self.tolerate_all {
                            json!([{"operator": "Exists"}])
                        } else {
                            json!([])
                        },
                        "terminationGracePeriodSeconds": 1,
                        "volumes": volumes,
                        "containers": [container],
                    }
                }
            }
        }))
        .expect("deployment");
        Api::<Deployment>::namespaced(client.clone(), self.ns)
            .patch(
                self.app,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&d),
            )
            .await
            .unwrap_or_else(|e| panic!("applying Deployment {}/{}: {e}", self.ns, self.app));
    }
}

/// Scales a Deployment.
pub async fn scale(client: &Client, ns: &str, name: &str, replicas: i32) {
    Api::<Deployment>::namespaced(client.clone(), ns)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": replicas}})),
        )
        .await
        .unwrap_or_else(|e| panic!("scaling Deployment {ns}/{name}: {e}"));
}

/// Whether a pod runs: phase Running, not terminating, every container with an id.
pub fn pod_running(p: &Pod) -> bool {
    let st = p.status.as_ref();
    p.metadata.deletion_timestamp.is_none()
        && st.and_then(|s| s.phase.as_deref()) == Some("Running")
        && st
            .and_then(|s| s.container_statuses.as_ref())
            .is_some_and(|cs| !cs.is_empty() && cs.iter().all(|c| c.container_id.is_some()))
}

/// Waits until exactly `n` pods labelled `app=<app>` exist (not terminating) and all run with
/// container ids; returns them sorted by name.
pub async fn running_pods(client: &Client, ns: &str, app: &str, n: usize) -> Vec<Pod> {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    eventually(
        secs(120),
        format!("{n} running pods app={app} in {ns}"),
        async || {
            let mut pods: Vec<Pod> = api
                .list(&ListParams::default().labels(&format!("app={app}")))
                .await?
                .items
                .into_iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .collect();
            pods.sort_by_key(|p| p.name_any());
            let states: Vec<String> = pods
                .iter()
                .map(|p| {
                    format!(
                        "{} {:?} on {:?}",
                        p.name_any(),
                        p.status.as_ref().and_then(|s| s.phase.clone()),
                        p.spec.as_ref().and_then(|s| s.node_name.clone())
                    )
                })
                .collect();
            ensure!(
                pods.len() == n && pods.iter().all(pod_running),
                "{states:?}"
            );
            Ok(pods)
        },
    )
    .await
}

/// A pod as an assignment should list it: (name, uid, container ids).
pub type PodTarget = (String, String, Vec<Option<String>>);

/// The pods as an assignment should list them.
pub fn expected_targets(pods: &[Pod]) -> BTreeSet<PodTarget> {
    pods.iter()
        .map(|p| {
            let ids = p
                .spec
                .as_ref()
                .map(|s| s.containers.as_slice())
                .unwrap_or_default()
                .iter()
                .map(|c| {
                    p.status
                        .as_ref()
                        .and_then(|s| s.container_statuses.as_ref())
                        .and_then(|cs| cs.iter().find(|s| s.name == c.name))
                        .and_then(|s| s.container_id.clone())
                })
                .collect();
            (p.name_any(), p.uid().unwrap_or_default(), ids)
        })
        .collect()
}

/// The pods an assignment lists.
pub fn listed_targets(a: &TraceAssignment) -> BTreeSet<PodTarget> {
    a.spec
        .target_pods
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                t.uid.clone(),
                t.containers
                    .iter()
                    .map(|c| c.container_id.clone())
                    .collect(),
            )
        })
        .collect()
}

// ------------------------------------------------------------------ jobs and the runner's part

/// Creates a TraceJob `name` with `spec` in `ns`.
pub async fn create_job(
    client: &Client,
    ns: &str,
    name: &str,
    spec: Value,
) -> fathom_crds::TraceJob {
    let job: fathom_crds::TraceJob = serde_json::from_value(json!({
        "apiVersion": "fathom.dev/v1alpha1", "kind": "TraceJob",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }))
    .unwrap_or_else(|e| panic!("TraceJob {name}: {e}"));
    Api::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &job)
        .await
        .unwrap_or_else(|e| panic!("creating TraceJob {ns}/{name}: {e}"))
}

/// The assignments of the job with `uid` of namespace `ns` (of a ClusterTraceJob when `ns` is
/// [`OPERATOR_NAMESPACE`]). They all live in the operator's namespace, whatever the job's
/// namespace: an assignment that names another job namespace is an error.
pub async fn assignments_of(
    client: &Client,
    ns: &str,
    uid: &str,
) -> anyhow::Result<Vec<TraceAssignment>> {
    let all = Api::<TraceAssignment>::namespaced(client.clone(), OPERATOR_NAMESPACE)
        .list(&ListParams::default().labels(&format!("{JOB_UID_LABEL}={uid}")))
        .await?
        .items;
    for a in &all {
        let job_ns = a
            .spec
            .job
            .namespace
            .as_deref()
            .unwrap_or(OPERATOR_NAMESPACE);
        anyhow::ensure!(
            job_ns == ns,
            "assignment {} of job uid {uid} names job namespace {job_ns}, not {ns}",
            a.name_any()
        );
    }
    Ok(all)
}

/// Plays a node runner's status report on an assignment.
pub async fn runner_reports(client: &Client, a: &TraceAssignment, phase: &str, hits: u64) {
    let ns = a.namespace().expect("namespaced");
    Api::<TraceAssignment>::namespaced(client.clone(), &ns)
        .patch_status(
            &a.name_any(),
            &PatchParams::apply("fathom-node-runner").force(),
            &Patch::Apply(json!({
                "apiVersion": "fathom.dev/v1alpha1", "kind": "TraceAssignment",
                "status": {
                    "phase": phase,
                    "run": a.spec.run,
                    "counters": fathom_crds::result::Totals { hits, ..Default::default() },
                }
            })),
        )
        .await
        .unwrap_or_else(|e| panic!("runner status on {}: {e}", a.name_any()));
}

/// Plays a node runner that has detached: removes the detach finalizer.
pub async fn runner_detaches(client: &Client, a: &TraceAssignment) {
    let ns = a.namespace().expect("namespaced");
    let keep: Vec<&String> = a
        .finalizers()
        .iter()
        .filter(|f| *f != fathom_crds::assignment::DETACH_FINALIZER)
        .collect();
    match Api::<TraceAssignment>::namespaced(client.clone(), &ns)
        .patch(
            &a.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {
                "finalizers": keep,
                "resourceVersion": a.resource_version(),
            }})),
        )
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => panic!("runner detaching {}: {e}", a.name_any()),
    }
}

// ------------------------------------------------------------------ the audit log

/// One line of the API server's audit log (level Metadata).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditEvent {
    #[serde(rename = "auditID")]
    pub audit_id: String,
    pub verb: String,
    pub user: AuditUser,
    #[serde(default)]
    pub user_agent: Option<String>,
    #[serde(default)]
    pub object_ref: Option<AuditObjectRef>,
    #[serde(rename = "requestURI")]
    pub request_uri: String,
    #[serde(default)]
    pub response_status: Option<AuditStatus>,
    pub request_received_timestamp: jiff::Timestamp,
    pub stage_timestamp: jiff::Timestamp,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AuditUser {
    pub username: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditObjectRef {
    #[serde(default)]
    pub resource: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub api_group: Option<String>,
    #[serde(default)]
    pub subresource: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AuditStatus {
    #[serde(default)]
    pub code: Option<u16>,
}

impl AuditEvent {
    /// create, update, patch, delete, deletecollection.
    pub fn is_mutating(&self) -> bool {
        matches!(
            self.verb.as_str(),
            "create" | "update" | "patch" | "delete" | "deletecollection"
        )
    }

    pub fn resource(&self) -> &str {
        self.object_ref.as_ref().map_or("", |o| o.resource.as_str())
    }

    pub fn subresource(&self) -> Option<&str> {
        self.object_ref
            .as_ref()
            .and_then(|o| o.subresource.as_deref())
    }

    pub fn name(&self) -> Option<&str> {
        self.object_ref.as_ref().and_then(|o| o.name.as_deref())
    }

    pub fn namespace(&self) -> Option<&str> {
        self.object_ref
            .as_ref()
            .and_then(|o| o.namespace.as_deref())
    }

    pub fn code(&self) -> Option<u16> {
        self.response_status.as_ref().and_then(|s| s.code)
    }

    /// The `fieldManager` query parameter of the request.
    pub fn field_manager(&self) -> Option<&str> {
        let (_, query) = self.request_uri.split_once('?')?;
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == "fieldManager")
            .map(|(_, v)| v)
    }

    /// Lease renewals and Events: the writes a settled operator still makes.
    pub fn is_lease_or_event(&self) -> bool {
        matches!(self.resource(), "leases" | "events")
    }

    /// A short line for failure messages.
    pub fn brief(&self) -> String {
        format!(
            "{} {} {} {} -> {:?} by {}",
            self.stage_timestamp,
            self.verb,
            self.request_uri,
            self.subresource().unwrap_or(""),
            self.code(),
            self.user.username
        )
    }
}

/// The audit log from where a test opened it.
pub struct AuditLog {
    path: PathBuf,
    start: u64,
}

static MARKS: AtomicU32 = AtomicU32::new(0);

impl AuditLog {
    /// Opens the audit log at its current end: [`AuditLog::events`] returns what comes after.
    pub fn open() -> AuditLog {
        let path = env().audit_log.clone();
        let start = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("the audit log {}: {e}; {HOWTO}", path.display()))
            .len();
        AuditLog { path, start }
    }

    /// Every event logged since [`AuditLog::open`] (a rotation restarts at the new file).
    pub fn events(&self) -> Vec<AuditEvent> {
        let mut f = File::open(&self.path)
            .unwrap_or_else(|e| panic!("the audit log {}: {e}", self.path.display()));
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let from = if len < self.start { 0 } else { self.start };
        f.seek(SeekFrom::Start(from)).expect("seek audit log");
        let mut text = String::new();
        f.read_to_string(&mut text).expect("read audit log");
        let complete = text.rfind('\n').map_or("", |i| &text[..i]);
        complete
            .lines()
            .filter(|l| !l.trim().is_empty())
            .filter_map(|l| serde_json::from_str::<AuditEvent>(l).ok())
            .collect()
    }

    /// Makes a request that lands in the audit log (the admin reading a ConfigMap that does
    /// not exist) and waits until it is there: every request the server completed before is
    /// logged by then. Returns its event, whose `stage_timestamp` bounds a window.
    pub async fn mark(&self, client: &Client, ns: &str) -> AuditEvent {
        let name = format!(
            "fathom-e2e-audit-mark-{}-{}",
            std::process::id(),
            MARKS.fetch_add(1, Ordering::Relaxed)
        );
        let _ = Api::<ConfigMap>::namespaced(client.clone(), ns)
            .get_opt(&name)
            .await;
        eventually(
            secs(20),
            format!("audit mark {name} in the log"),
            async || {
                self.events()
                    .into_iter()
                    .find(|e| e.name() == Some(name.as_str()) && e.resource() == "configmaps")
                    .ok_or_else(|| anyhow!("not logged yet"))
            },
        )
        .await
    }
}

// ------------------------------------------------------------------ the operator process

/// Builds binary `bin` of package `package` (a no-op when it is up to date: the test command
/// builds it beforehand) and returns its path.
pub fn workspace_binary(package: &str, bin: &str) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(&cargo)
        .current_dir(workspace_root())
        .args([
            "build",
            "-p",
            package,
            "--bin",
            bin,
            "--message-format=json-render-diagnostics",
        ])
        .output()
        .unwrap_or_else(|e| panic!("running {cargo}: {e}"));
    assert!(
        out.status.success(),
        "cargo build -p {package} --bin {bin} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == bin)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        // Cargo names no artifact when nothing was rebuilt on some versions: the usual place.
        .unwrap_or_else(|| target_dir().join("debug").join(bin))
}

/// [`workspace_binary`], unless the variable `overrides` names another binary.
pub fn cargo_binary(package: &str, bin: &str, overrides: &str) -> PathBuf {
    match std::env::var_os(overrides) {
        Some(p) => PathBuf::from(p),
        None => workspace_binary(package, bin),
    }
}

/// Builds `fathom-operator` and returns its path; `FATHOM_E2E_OPERATOR_BIN` overrides.
pub fn operator_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| match std::env::var_os("FATHOM_E2E_OPERATOR_BIN") {
        Some(p) => PathBuf::from(p),
        None => workspace_binary("fathom-operator", "fathom-operator"),
    })
}

/// Builds the kubectl plugin `kubectl-fathom` and returns the directory holding it, to put on
/// `PATH` so that `kubectl fathom …` finds it.
pub fn plugin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        workspace_binary("kubectl-fathom", "kubectl-fathom")
            .parent()
            .expect("the binary is in a directory")
            .to_path_buf()
    })
}

/// Runs `kubectl fathom ARGS` (the plugin found on `PATH` by kubectl) as the user of
/// `kubeconfig`: (exit code, stdout, stderr).
pub fn kubectl_fathom(kubeconfig: &Path, args: &[&str]) -> (i32, String, String) {
    let path = std::env::join_paths(std::iter::once(plugin_dir().to_path_buf()).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))
    .expect("PATH");
    let out = Command::new("kubectl")
        .arg("fathom")
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env("PATH", path)
        .output()
        .expect("running kubectl (is it installed?)");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The runner tolerations the operator needs so the simulated nodes count as nodes the runner
/// DaemonSet could run on: an `Exists` toleration for every NoSchedule/NoExecute taint they
/// carry (besides the node conditions' own, which the DaemonSet defaults cover).
pub async fn sim_node_tolerations(client: &Client) -> Value {
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default().labels(&format!("{SIM_LABEL}=true")))
        .await
        .expect("list simulated nodes")
        .items;
    let keys: BTreeSet<String> = nodes
        .iter()
        .filter_map(|n| n.spec.as_ref()?.taints.clone())
        .flatten()
        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        .map(|t| t.key)
        .filter(|k| !k.starts_with("node.kubernetes.io/"))
        .collect();
    Value::Array(
        keys.into_iter()
            .map(|k| json!({"key": k, "operator": "Exists"}))
            .collect(),
    )
}

/// How to run one `fathom-operator` process.
#[derive(Debug, Clone)]
pub struct OperatorOptions {
    /// Who it is to the API server.
    pub kubeconfig: PathBuf,
    /// Its identity in the Lease.
    pub identity: String,
    pub lease_name: String,
    pub lease_seconds: u64,
    /// `--retry-period-seconds`; None: the operator's default.
    pub retry_period_seconds: Option<u64>,
    pub stuck_seconds: u64,
    pub lost_node_seconds: u64,
    /// `--runner-tolerations`; None: those of [`sim_node_tolerations`].
    pub runner_tolerations: Option<Value>,
    /// Names the log file `target/e2e-logs/<log_name>.log`.
    pub log_name: String,
    /// Serve the collector (TLS with the cluster's collector certificate) on a free port.
    pub collector: bool,
    /// The collector's port instead of a free one (an operator restarted where its runners
    /// expect it).
    pub collector_port: Option<u16>,
}

impl OperatorOptions {
    /// The operator's ServiceAccount, a Lease of this test run, short timeouts.
    pub fn new(test: &str) -> OperatorOptions {
        OperatorOptions {
            kubeconfig: env().operator_kubeconfig.clone(),
            identity: format!("e2e-{test}"),
            lease_name: format!("fathom-e2e-{test}-{}", std::process::id()),
            lease_seconds: 6,
            retry_period_seconds: None,
            stuck_seconds: 600,
            lost_node_seconds: 60,
            runner_tolerations: None,
            log_name: test.to_string(),
            collector: false,
            collector_port: None,
        }
    }

    /// Starts the process (after granting the operator's RBAC) and waits until it serves
    /// `/healthz`.
    pub async fn start(self, admin: &Client) -> Operator {
        install_operator_rbac();
        let bin = operator_binary();
        let tolerations = match &self.runner_tolerations {
            Some(t) => t.clone(),
            None => sim_node_tolerations(admin).await,
        };
        let port = free_port();
        let log = e2e_file(&format!("{}.log", self.log_name));
        let out = File::create(&log).expect("operator log");
        let mut args: Vec<String> = vec![
            "--namespace".into(),
            OPERATOR_NAMESPACE.into(),
            "--identity".into(),
            self.identity.clone(),
            "--lease-name".into(),
            self.lease_name.clone(),
            "--lease-seconds".into(),
            self.lease_seconds.to_string(),
            "--http-addr".into(),
            format!("127.0.0.1:{port}"),
            "--stuck-seconds".into(),
            self.stuck_seconds.to_string(),
            "--lost-node-seconds".into(),
            self.lost_node_seconds.to_string(),
            "--grace-seconds".into(),
            "10".into(),
            "--runner-tolerations".into(),
            tolerations.to_string(),
            "--collector-runner-user".into(),
            RUNNER_USER.into(),
        ];
        if let Some(retry) = self.retry_period_seconds {
            args.extend(["--retry-period-seconds".into(), retry.to_string()]);
        }
        let collector_port = self
            .collector
            .then(|| self.collector_port.unwrap_or_else(free_port));
        if let Some(cport) = collector_port {
            let pki = runner::collector_pki();
            args.extend([
                "--collector-addr".into(),
                format!("127.0.0.1:{cport}"),
                "--collector-tls-cert".into(),
                pki.cert.display().to_string(),
                "--collector-tls-key".into(),
                pki.key.display().to_string(),
            ]);
        }
        let child = spawn_component(bin, &args, &self.kubeconfig, out);
        let mut op = Operator {
            child,
            options: self,
            port,
            collector_port,
            log,
            killed: false,
        };
        let started = Instant::now();
        loop {
            if let Some(status) = op.child.try_wait().expect("try_wait") {
                panic!(
                    "fathom-operator {} exited at start ({status}):\n{}",
                    op.options.identity,
                    op.log_tail(40)
                );
            }
            if op.get("/healthz").is_ok_and(|b| b.contains("ok")) {
                break;
            }
            assert!(
                started.elapsed() < secs(30),
                "fathom-operator {} did not serve /healthz on port {port} within 30 s:\n{}",
                op.options.identity,
                op.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        op
    }
}

/// A running `fathom-operator` process: stopped (SIGTERM, then SIGKILL) when dropped, its log
/// printed when the test failed.
pub struct Operator {
    child: Child,
    pub options: OperatorOptions,
    pub port: u16,
    /// The collector's port (127.0.0.1, TLS), when it serves one.
    pub collector_port: Option<u16>,
    pub log: PathBuf,
    killed: bool,
}

impl Operator {
    pub fn identity(&self) -> &str {
        &self.options.identity
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// GET `path` of its HTTP endpoint: the body of a 200, else an error.
    pub fn get(&self, path: &str) -> anyhow::Result<String> {
        http_get(self.port, path)
    }

    /// Whether its `/metrics` say it holds the leader lease (`fathom_operator_leader 1`).
    pub fn leads(&self) -> anyhow::Result<bool> {
        let metrics = self.get("/metrics")?;
        let value = metrics
            .lines()
            .find_map(|l| l.strip_prefix("fathom_operator_leader "))
            .ok_or_else(|| anyhow!("no fathom_operator_leader in /metrics"))?;
        Ok(value.trim() == "1")
    }

    /// Whether the process still runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// kill -9, and reap it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.killed = true;
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        log_tail(&self.log, n)
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if !self.killed && matches!(self.child.try_wait(), Ok(None)) {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            let deadline = Instant::now() + secs(5);
            while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- fathom-operator {} (log {}), last lines:\n{}",
                self.options.identity,
                self.log.display(),
                self.log_tail(60)
            );
        }
        let _ = kubectl(&[
            "-n",
            OPERATOR_NAMESPACE,
            "delete",
            "lease",
            &self.options.lease_name,
            "--ignore-not-found",
            "--wait=false",
        ]);
    }
}

/// GET `path` from a component's HTTP endpoint on 127.0.0.1:`port`: the body of a 200, else
/// an error.
pub fn http_get(port: u16, path: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    ensure!(
        head.starts_with("HTTP/1.") && head.contains(" 200 "),
        "{head}"
    );
    Ok(body.to_string())
}

/// The last `n` lines of a log file.
pub fn log_tail(log: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A port nobody listens on now, on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The holder of a Lease in the operator's namespace, if any.
pub async fn lease_holder(client: &Client, name: &str) -> anyhow::Result<Option<String>> {
    lease_holder_in(client, OPERATOR_NAMESPACE, name).await
}

/// The holder of Lease `ns/name`, if any.
pub async fn lease_holder_in(
    client: &Client,
    ns: &str,
    name: &str,
) -> anyhow::Result<Option<String>> {
    Ok(Api::<Lease>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await?
        .and_then(|l| l.spec?.holder_identity))
}

/// A kubeconfig for a ServiceAccount of the operator's namespace: the operator's kubeconfig
/// with a token minted by `kubectl create token`. Written under `target/e2e-logs/`.
pub fn service_account_kubeconfig(sa: &str) -> PathBuf {
    service_account_kubeconfig_in(OPERATOR_NAMESPACE, sa)
}

/// A kubeconfig for ServiceAccount `ns/sa`: the operator's kubeconfig (its cluster and CA)
/// with a token minted by `kubectl create token`, and `ns` as the context's namespace.
/// Written under `target/e2e-logs/`.
pub fn service_account_kubeconfig_in(ns: &str, sa: &str) -> PathBuf {
    let token = kubectl_ok(&["-n", ns, "create", "token", sa, "--duration", "1h"]);
    let base = &env().operator_kubeconfig;
    let text = std::fs::read_to_string(base).unwrap_or_else(|e| panic!("{}: {e}", base.display()));
    let mut kc: serde_yaml::Value =
        serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", base.display()));
    let users = kc["users"]
        .as_sequence_mut()
        .expect("a kubeconfig with users");
    for u in users.iter_mut() {
        u["user"]["token"] = serde_yaml::Value::String(token.trim().to_string());
    }
    if let Some(contexts) = kc["contexts"].as_sequence_mut() {
        for c in contexts.iter_mut() {
            c["context"]["namespace"] = serde_yaml::Value::String(ns.to_string());
        }
    }
    let path = e2e_file(&format!("{ns}.{sa}.kubeconfig"));
    std::fs::write(&path, serde_yaml::to_string(&kc).expect("yaml")).expect("write kubeconfig");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    }
    path
}
