//! Node runners as real `fathom-node-runner` processes, one per node identity.
//!
//! On a real install the runner is a DaemonSet pod: the kubelet projects it a ServiceAccount
//! token of audience `fathom-collector` bound to that pod, so the token's
//! `authentication.kubernetes.io/node-name` extra names the pod's node, and the collector binds
//! the stream to it. Here each runner is a process on this machine, and its identity is made
//! the same way: a placeholder pod of ServiceAccount `fathom-node-runner` pinned to the node
//! (`spec.nodeName`), and a token bound to that pod (`kubectl create token --bound-object-kind
//! Pod`). A runner of a kubelet-less node runs the real engine on this kernel too — it sees the
//! host's tasks when its assignment is node-wide, and nothing for pods that have no cgroup here.

use std::{
    fs::File,
    path::PathBuf,
    process::{Child, Command},
    sync::{Once, OnceLock},
    time::{Duration, Instant},
};

use anyhow::anyhow;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams},
};
use serde_json::json;

use crate::{
    HOWTO, MANAGER, OPERATOR_NAMESPACE, cargo_binary, e2e_file, env, free_port, http_get,
    kubectl_ok, log_tail, secs, spawn_component,
};

/// The runner's ServiceAccount.
pub const RUNNER_SA: &str = "fathom-e2e-node-runner";
/// The audience of the collector's tokens (operator/src/collector/auth.rs).
pub const AUDIENCE: &str = "fathom-collector";
/// Where the e2e runners keep their bpffs directories (one per node below it), apart from a
/// real runner's `/sys/fs/bpf/fathom`.
pub const PIN_ROOT: &str = "/sys/fs/bpf/fathom-e2e";

/// The collector's certificate, key and CA that `scripts/cluster.sh` made.
pub struct CollectorPki {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn var(name: &str) -> PathBuf {
    match std::env::var_os(name) {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => panic!("{name} is not set: {HOWTO}"),
    }
}

/// The collector's PKI from the cluster's environment.
pub fn collector_pki() -> CollectorPki {
    CollectorPki {
        ca: var("FATHOM_E2E_COLLECTOR_CA"),
        cert: var("FATHOM_E2E_COLLECTOR_CERT"),
        key: var("FATHOM_E2E_COLLECTOR_KEY"),
    }
}

/// `fathom-node-runner`, built if needed; `FATHOM_E2E_RUNNER_BIN` overrides.
pub fn runner_binary() -> &'static PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| cargo_binary("fathom-node", "fathom-node-runner", "FATHOM_E2E_RUNNER_BIN"))
}

/// Grants the runner's ServiceAccount its permissions (the chart's `rbac-runner.yaml`), once
/// per test process.
pub fn install_runner_rbac() {
    static DONE: Once = Once::new();
    DONE.call_once(|| crate::apply_chart_rbac("rbac-runner.yaml"));
}

/// The placeholder pod that gives the runner of `node` its identity.
pub fn identity_pod_name(node: &str) -> String {
    format!("fathom-runner-e2e-{node}")
}

/// Makes (or keeps) the identity pod of `node` and writes a fresh token bound to it, audience
/// `fathom-collector`; returns the token file.
pub async fn runner_token(client: &Client, node: &str) -> PathBuf {
    let name = identity_pod_name(node);
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": OPERATOR_NAMESPACE,
                     "labels": {"app.kubernetes.io/name": "fathom-node-runner-e2e"}},
        "spec": {
            "nodeName": node,
            "serviceAccountName": RUNNER_SA,
            "automountServiceAccountToken": false,
            "tolerations": [{"operator": "Exists"}],
            "terminationGracePeriodSeconds": 0,
            "containers": [{
                "name": "pause",
                "image": "fathom.local/pause:1",
                "imagePullPolicy": "Never",
            }]
        }
    }))
    .expect("identity pod");
    Api::<Pod>::namespaced(client.clone(), OPERATOR_NAMESPACE)
        .patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&pod),
        )
        .await
        .unwrap_or_else(|e| panic!("applying identity pod {OPERATOR_NAMESPACE}/{name}: {e}"));
    let token = kubectl_ok(&[
        "-n",
        OPERATOR_NAMESPACE,
        "create",
        "token",
        RUNNER_SA,
        "--audience",
        AUDIENCE,
        "--bound-object-kind",
        "Pod",
        "--bound-object-name",
        &name,
        "--duration",
        "1h",
    ]);
    let path = e2e_file(&format!("runner-{node}.token"));
    std::fs::write(&path, token.trim()).expect("token file");
    path
}

/// Deletes the identity pods (their tokens stop being valid with them).
pub async fn remove_identity_pods(client: &Client, nodes: &[String]) {
    let api = Api::<Pod>::namespaced(client.clone(), OPERATOR_NAMESPACE);
    for node in nodes {
        let _ = api
            .delete(
                &identity_pod_name(node),
                &DeleteParams::default().grace_period(0),
            )
            .await;
    }
}

/// How to run one runner.
#[derive(Debug, Clone)]
pub struct RunnerOptions {
    pub node: String,
    /// The collector's port on 127.0.0.1 (TLS).
    pub collector_port: u16,
    pub report_interval: u64,
    pub status_interval: u64,
}

impl RunnerOptions {
    pub fn new(node: &str, collector_port: u16) -> RunnerOptions {
        RunnerOptions {
            node: node.to_string(),
            collector_port,
            report_interval: 1,
            status_interval: 2,
        }
    }

    /// Starts the process with the runner's RBAC and a token bound to the node's identity
    /// pod, and waits until it is ready (`/readyz`: its first list of assignments is done).
    pub async fn start(self, admin: &Client) -> NodeRunner {
        install_runner_rbac();
        let bin = runner_binary();
        let token = runner_token(admin, &self.node).await;
        let pki = collector_pki();
        let port = free_port();
        let log = e2e_file(&format!("runner-{}.log", self.node));
        let out = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .expect("runner log");
        let pin_root = PathBuf::from(PIN_ROOT).join(&self.node);
        let child = spawn_component(
            bin,
            &[
                "--node-name",
                &self.node,
                "--namespace",
                OPERATOR_NAMESPACE,
                "--collector",
                &format!("https://127.0.0.1:{}", self.collector_port),
                "--token-file",
                token.to_str().expect("utf-8"),
                "--ca-file",
                pki.ca.to_str().expect("utf-8"),
                "--http-addr",
                &format!("127.0.0.1:{port}"),
                "--pin-root",
                pin_root.to_str().expect("utf-8"),
                "--report-interval",
                &self.report_interval.to_string(),
                "--status-interval",
                &self.status_interval.to_string(),
            ],
            &env().runner_kubeconfig,
            out,
        );
        let mut runner = NodeRunner {
            child,
            options: self,
            port,
            log,
            token,
            killed: false,
        };
        let started = Instant::now();
        loop {
            if let Some(status) = runner.child.try_wait().expect("try_wait") {
                panic!(
                    "fathom-node-runner of {} exited at start ({status}):\n{}",
                    runner.options.node,
                    runner.log_tail(40)
                );
            }
            if runner.get("/readyz").is_ok() {
                break;
            }
            assert!(
                started.elapsed() < secs(60),
                "fathom-node-runner of {} was not ready on port {port} within 60 s:\n{}",
                runner.options.node,
                runner.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        runner
    }
}

/// A running `fathom-node-runner`: stopped (SIGTERM, so it detaches, then SIGKILL) when
/// dropped, its log printed when the test failed.
pub struct NodeRunner {
    child: Child,
    pub options: RunnerOptions,
    pub port: u16,
    pub log: PathBuf,
    pub token: PathBuf,
    killed: bool,
}

impl NodeRunner {
    pub fn node(&self) -> &str {
        &self.options.node
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// GET `path` of its HTTP endpoint: the body of a 200, else an error.
    pub fn get(&self, path: &str) -> anyhow::Result<String> {
        http_get(self.port, path)
    }

    /// A counter or gauge of its `/metrics` (summed over label sets).
    pub fn metric(&self, name: &str) -> anyhow::Result<f64> {
        let text = self.get("/metrics")?;
        let mut found = None;
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (key, value) = line
                .rsplit_once(' ')
                .ok_or_else(|| anyhow!("bad metrics line {line:?}"))?;
            let metric = key.split('{').next().unwrap_or(key);
            if metric == name {
                *found.get_or_insert(0.0) += value.parse::<f64>()?;
            }
        }
        found.ok_or_else(|| anyhow!("no {name} in the runner's /metrics"))
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

    /// SIGTERM, and waits for it to exit (it detaches everything first); SIGKILL after 20 s.
    pub fn stop(&mut self) {
        if self.killed || !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + secs(20);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.killed = true;
    }
}

impl Drop for NodeRunner {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "--- fathom-node-runner of {} (log {}), last lines:\n{}",
                self.options.node,
                self.log.display(),
                self.log_tail(60)
            );
        }
    }
}

/// The pin directories of the runner of `node` under [`PIN_ROOT`] (one per assignment it
/// runs or left pinned).
pub fn pins_of(node: &str) -> Vec<String> {
    std::fs::read_dir(std::path::Path::new(PIN_ROOT).join(node))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Programs of Fathom loaded in the kernel now (`bpftool prog show`, names `fathom_*`).
pub fn fathom_programs() -> Vec<String> {
    let out = Command::new("bpftool")
        .args(["prog", "show"])
        .output()
        .expect("bpftool (scripts/setup.sh installs it)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("name fathom"))
        // "<id>: <type>  name <name>  tag <tag>" (not the run-time statistics after it).
        .map(|l| l.split_whitespace().take(6).collect::<Vec<_>>().join(" "))
        .collect()
}
