//! The Helm chart (`charts/fathom`) and its rendered GitOps manifests (`deploy/`): the real
//! Helm the tests run (built by `scripts/helm.sh --build`, which the test command runs, from
//! the Go module pinned in `e2e/cluster/helm`), rendering, and the documented facts the tests
//! compare with.
//!
//! A missing Helm is a failure, never a skip: every helper here panics naming how to build it.

use std::{
    path::PathBuf,
    process::{Command, Output},
};

use serde_yaml::Value;

use crate::workspace_root;

/// The runner's capabilities, exactly (docs/install.md says why each is needed); NET_ADMIN is
/// added only with `runner.networkHooks`.
pub const RUNNER_CAPABILITIES: [&str; 4] = ["BPF", "PERFMON", "DAC_READ_SEARCH", "SYS_PTRACE"];

/// The arguments `scripts/render-deploy.sh` renders `deploy/fathom.yaml` with (release
/// `fathom` in `fathom-system`, the chart's defaults plus `deploy/values.yaml`).
pub const DEPLOY_ARGS: [&str; 8] = [
    "template",
    "fathom",
    "charts/fathom",
    "--namespace",
    "fathom-system",
    "--include-crds",
    "--values",
    "deploy/values.yaml",
];

/// The chart's directory.
pub fn chart_dir() -> PathBuf {
    workspace_root().join("charts/fathom")
}

/// The Helm binary: `$FATHOM_HELM`, else what `scripts/helm.sh --path` names (the pinned
/// build in /var/cache/fathom/helm). Panics, naming the fix, when there is none.
pub fn helm_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FATHOM_HELM") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "FATHOM_HELM={} is not a file", p.display());
        return p;
    }
    let script = workspace_root().join("scripts/helm.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg("--path")
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "no Helm: {} (run scripts/helm.sh --build, or set FATHOM_HELM)",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Runs helm in the workspace root with `args` (and the environment's KUBECONFIG).
pub fn helm(args: &[&str]) -> Output {
    Command::new(helm_bin())
        .args(args)
        .current_dir(workspace_root())
        .output()
        .unwrap_or_else(|e| panic!("running helm {}: {e}", args.join(" ")))
}

/// Runs helm; panics with its stderr unless it succeeds; stdout.
pub fn helm_ok(args: &[&str]) -> String {
    let out = helm(args);
    assert!(
        out.status.success(),
        "helm {} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8(out.stdout).expect("helm prints UTF-8")
}

/// `helm template` of the chart as release `release` in `namespace`, with `--set` values.
pub fn render(release: &str, namespace: &str, sets: &[&str]) -> Vec<Value> {
    let mut args = vec![
        "template",
        release,
        "charts/fathom",
        "--namespace",
        namespace,
    ];
    for s in sets {
        args.extend(["--set", s]);
    }
    documents(&helm_ok(&args))
}

/// The objects of a multi-document YAML stream (empty documents left out).
pub fn documents(yaml: &str) -> Vec<Value> {
    use serde::Deserialize as _;
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).expect("helm renders valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

/// The one object of `kind` named `name` in `docs`.
pub fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    let found: Vec<&Value> = docs
        .iter()
        .filter(|d| {
            d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name)
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {kind} {name}, found {}",
        found.len()
    );
    found[0]
}

/// The strings of a YAML sequence.
pub fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// A release of the chart installed into the cluster (as the admin) in its own namespace;
/// `helm uninstall` and the namespace deleted when dropped, even when the test fails.
pub struct Release {
    pub name: String,
    pub namespace: String,
}

impl Release {
    /// `helm install` of `charts/fathom` as `name` into `namespace` (created, after removing a
    /// leftover of an earlier run), with `--set` values; panics with Helm's message if it fails.
    pub fn install(name: &str, namespace: &str, extra: &[&str]) -> Release {
        let release = Release {
            name: name.into(),
            namespace: namespace.into(),
        };
        release.remove();
        let mut args = vec![
            "install",
            name,
            "charts/fathom",
            "--namespace",
            namespace,
            "--create-namespace",
        ];
        args.extend_from_slice(extra);
        helm_ok(&args);
        release
    }

    /// The ServiceAccount user of the operator (`operator`) or runner (`node-runner`).
    pub fn user(&self, component: &str) -> String {
        format!(
            "system:serviceaccount:{}:{}-{component}",
            self.namespace, self.name
        )
    }

    fn remove(&self) {
        let _ = helm(&[
            "uninstall",
            &self.name,
            "--namespace",
            &self.namespace,
            "--wait",
            "--timeout",
            "120s",
        ]);
        let _ = crate::kubectl(&[
            "delete",
            "namespace",
            &self.namespace,
            "--ignore-not-found",
            "--wait=true",
            "--timeout=120s",
        ]);
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        self.remove();
    }
}

/// A namespace of these tests, without the e2e label (so that other tests' sweeps of labelled
/// leftovers never remove it while in use, and its removal touches nothing of theirs): made
/// fresh, deleted when dropped.
pub struct ScratchNamespace(pub String);

impl ScratchNamespace {
    pub fn create(name: &str) -> ScratchNamespace {
        let _ = crate::kubectl(&[
            "delete",
            "namespace",
            name,
            "--ignore-not-found",
            "--wait=true",
            "--timeout=120s",
        ]);
        crate::kubectl_ok(&["create", "namespace", name]);
        ScratchNamespace(name.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Drop for ScratchNamespace {
    fn drop(&mut self) {
        let _ = crate::kubectl(&[
            "delete",
            "namespace",
            &self.0,
            "--ignore-not-found",
            "--wait=true",
            "--timeout=120s",
        ]);
    }
}
