//! The Helm chart without a cluster: `helm lint` and `helm template` with the real Helm (built
//! by scripts/setup.sh), the schema refusing wrong values with its message, the rendered
//! objects holding what docs/install.md promises (capabilities, RBAC without `*`, escalate,
//! bind or impersonate), the CRDs being the generated ones, and `deploy/` being the chart
//! rendered (a drift fails). Without Helm every test fails, naming how to build it.

use std::collections::BTreeSet;

use fathom_e2e::{
    chart::{
        DEPLOY_ARGS, RUNNER_CAPABILITIES, chart_dir, documents, find, helm, helm_ok, render,
        strings,
    },
    workspace_root,
};
use serde_yaml::Value;

#[test]
fn helm_lint_passes_strict() {
    let out = helm_ok(&["lint", "--strict", "charts/fathom"]);
    assert!(out.contains("0 chart(s) failed"), "{out}");
    // And with every switch flipped.
    helm_ok(&[
        "lint",
        "--strict",
        "charts/fathom",
        "--set",
        "runner.networkHooks=true,serviceMonitor.enabled=true,aggregateRoles=false,nodeBoundPolicy=false",
        "--set",
        "collector.tls.generate=false,collector.tls.existingSecret=my-tls",
    ]);
}

#[test]
fn the_charts_crds_are_the_generated_ones() {
    let generated = workspace_root().join("crds/generated");
    let names = |dir: &std::path::Path| -> BTreeSet<String> {
        std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect()
    };
    let crds = chart_dir().join("crds");
    assert_eq!(names(&crds), names(&generated));
    for name in names(&crds) {
        let link = crds.join(&name);
        // One source: each is a symlink to crds/generated, not a copy that could drift.
        assert!(
            link.is_symlink(),
            "{} must link to crds/generated",
            link.display()
        );
        assert_eq!(
            std::fs::canonicalize(&link).expect("link resolves"),
            std::fs::canonicalize(generated.join(&name)).expect("generated CRD")
        );
    }
    // Helm installs them (--include-crds renders them as it would).
    let docs = documents(&helm_ok(&[
        "template",
        "fathom",
        "charts/fathom",
        "--include-crds",
    ]));
    let rendered: BTreeSet<String> = docs
        .iter()
        .filter(|d| d["kind"].as_str() == Some("CustomResourceDefinition"))
        .map(|d| format!("{}.yaml", d["metadata"]["name"].as_str().expect("name")))
        .collect();
    assert_eq!(rendered, names(&generated));
}

#[test]
fn the_rendered_workloads_hold_what_the_docs_promise() {
    let docs = render("fathom", "fathom-system", &[]);
    let op = find(&docs, "Deployment", "fathom-operator");
    assert_eq!(op["spec"]["replicas"].as_i64(), Some(2));
    let pod = &op["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(
        c["image"].as_str(),
        Some("fathom.local/fathom-operator:0.1.0")
    );
    assert_eq!(
        c["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/healthz")
    );
    assert_eq!(
        c["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz")
    );
    assert!(c["resources"]["requests"]["memory"].is_string());
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(
        strings(&c["securityContext"]["capabilities"]["drop"]),
        ["ALL"]
    );
    assert!(c["securityContext"]["capabilities"]["add"].is_null());
    let env = |c: &Value, name: &str| -> Option<String> {
        c["env"].as_sequence().and_then(|s| {
            s.iter()
                .find(|e| e["name"].as_str() == Some(name))
                .and_then(|e| e["value"].as_str().map(str::to_string))
        })
    };
    assert_eq!(
        env(c, "FATHOM_COLLECTOR_RUNNER_USER").as_deref(),
        Some("system:serviceaccount:fathom-system:fathom-node-runner")
    );

    let ds = find(&docs, "DaemonSet", "fathom-node-runner");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"].as_bool(), Some(true));
    assert!(
        pod["hostNetwork"].is_null(),
        "the runner stays in the pod network"
    );
    assert!(
        pod["tolerations"]
            .as_sequence()
            .expect("tolerations")
            .iter()
            .any(|t| t["operator"].as_str() == Some("Exists") && t["key"].is_null()),
        "the runner tolerates every taint"
    );
    let c = &pod["containers"][0];
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"].as_bool(), Some(false));
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(strings(&sc["capabilities"]["add"]), RUNNER_CAPABILITIES);
    let host_paths: BTreeSet<&str> = pod["volumes"]
        .as_sequence()
        .expect("volumes")
        .iter()
        .filter_map(|v| v["hostPath"]["path"].as_str())
        .collect();
    assert_eq!(
        host_paths,
        BTreeSet::from(["/sys/fs/bpf", "/sys/kernel/tracing", "/sys/fs/cgroup"])
    );
    let token = pod["volumes"]
        .as_sequence()
        .expect("volumes")
        .iter()
        .find_map(|v| v["projected"]["sources"][0]["serviceAccountToken"].as_mapping())
        .expect("a projected token");
    assert_eq!(
        token.get("audience").and_then(Value::as_str),
        Some("fathom-collector")
    );
    // The runner gets the CA of the collector's Secret, not its key.
    let ca = pod["volumes"]
        .as_sequence()
        .expect("volumes")
        .iter()
        .find(|v| v["name"].as_str() == Some("collector-ca"))
        .expect("collector-ca volume");
    assert_eq!(ca["secret"]["items"].as_sequence().map(Vec::len), Some(1));
    assert_eq!(ca["secret"]["items"][0]["key"].as_str(), Some("ca.crt"));

    // NET_ADMIN only with network hooks.
    let docs = render("fathom", "fathom-system", &["runner.networkHooks=true"]);
    let ds = find(&docs, "DaemonSet", "fathom-node-runner");
    let mut with_net: Vec<String> = RUNNER_CAPABILITIES.iter().map(|s| s.to_string()).collect();
    with_net.push("NET_ADMIN".into());
    assert_eq!(
        strings(
            &ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"]
        ),
        with_net
    );
}

#[test]
fn o5_the_rendered_rbac_is_least_privilege() {
    let docs = render("fathom", "fathom-system", &["serviceMonitor.enabled=true"]);
    let rules_of = |kind: &str, name: &str| -> Vec<Value> {
        find(&docs, kind, name)["rules"]
            .as_sequence()
            .expect("rules")
            .clone()
    };
    for d in docs
        .iter()
        .filter(|d| matches!(d["kind"].as_str(), Some("Role" | "ClusterRole")))
    {
        for rule in d["rules"].as_sequence().expect("rules") {
            for field in ["verbs", "resources", "apiGroups"] {
                assert!(
                    !strings(&rule[field]).iter().any(|v| v == "*"),
                    "{} {}: `*` in {field}",
                    d["kind"].as_str().unwrap_or_default(),
                    d["metadata"]["name"].as_str().unwrap_or_default()
                );
            }
            for verb in strings(&rule["verbs"]) {
                assert!(
                    !["escalate", "bind", "impersonate"].contains(&verb.as_str()),
                    "{}: {verb}",
                    d["metadata"]["name"].as_str().unwrap_or_default()
                );
            }
            for resource in strings(&rule["resources"]) {
                assert!(
                    !resource.starts_with("secrets"),
                    "{}: secrets",
                    d["metadata"]["name"].as_str().unwrap_or_default()
                );
            }
        }
    }
    // The runner: one namespaced Role, its assignments and the collector's EndpointSlices (read)
    // only; no binding of the runner cluster-wide.
    let runner = rules_of("Role", "fathom-node-runner");
    let resources: BTreeSet<String> = runner
        .iter()
        .flat_map(|r| strings(&r["resources"]))
        .collect();
    assert_eq!(
        resources,
        BTreeSet::from([
            "traceassignments".into(),
            "traceassignments/status".into(),
            "endpointslices".into()
        ])
    );
    for r in &runner {
        if strings(&r["resources"]) == ["endpointslices"] {
            assert_eq!(strings(&r["verbs"]), ["list", "watch"]);
        }
    }
    for d in docs
        .iter()
        .filter(|d| d["kind"].as_str() == Some("ClusterRoleBinding"))
    {
        for s in d["subjects"].as_sequence().expect("subjects") {
            assert_ne!(s["name"].as_str(), Some("fathom-node-runner"));
        }
    }
    // Tenants: jobs and results, never cluster jobs or assignments.
    for name in ["fathom-tenant-edit", "fathom-tenant-view"] {
        let resources: BTreeSet<String> = rules_of("ClusterRole", name)
            .iter()
            .flat_map(|r| strings(&r["resources"]))
            .collect();
        assert!(resources.contains("tracejobs") && resources.contains("traceresults"));
        assert!(
            resources
                .iter()
                .all(|r| !r.starts_with("clustertracejobs") && !r.starts_with("traceassignments")),
            "{name}: {resources:?}"
        );
    }
    let edit = find(&docs, "ClusterRole", "fathom-tenant-edit");
    for label in ["aggregate-to-edit", "aggregate-to-admin"] {
        assert_eq!(
            edit["metadata"]["labels"][format!("rbac.authorization.k8s.io/{label}").as_str()]
                .as_str(),
            Some("true")
        );
    }
    // Results (read) for tenants: no write verb on traceresults.
    for r in rules_of("ClusterRole", "fathom-tenant-edit") {
        if strings(&r["resources"])
            .iter()
            .any(|x| x.starts_with("traceresults"))
        {
            assert_eq!(strings(&r["verbs"]), ["get", "list", "watch"]);
        }
    }
    // The node-bound policy names the runner's user.
    let vap = find(
        &docs,
        "ValidatingAdmissionPolicy",
        "fathom-node-runner-own-node",
    );
    assert!(
        vap["spec"]["matchConditions"][0]["expression"]
            .as_str()
            .expect("expression")
            .contains("system:serviceaccount:fathom-system:fathom-node-runner")
    );
}

/// Each invalid value fails `helm template` (as it fails `helm install`) with the schema's
/// message naming the value.
#[test]
fn an_invalid_value_fails_with_the_schema_message() {
    let cases: [(&str, &[&str]); 7] = [
        (
            "runner.extraCapabilities={SYS_ADMIN}",
            &["at '/runner/extraCapabilities/0': 'not' failed"],
        ),
        (
            "operator.replicas=0",
            &["at '/operator/replicas': minimum: got 0, want 1"],
        ),
        (
            "runner.seccompProfile=Privileged",
            &["at '/runner/seccompProfile': value must be one of 'Unconfined', 'RuntimeDefault'"],
        ),
        (
            "runner.privileged=true",
            &["at '/runner': additional properties 'privileged' not allowed"],
        ),
        (
            "images.pullPolicy=Sometimes",
            &["at '/images/pullPolicy': value must be one of"],
        ),
        (
            "runner.pinRoot=/tmp/pins",
            &["at '/runner/pinRoot': '/tmp/pins' does not match pattern"],
        ),
        (
            "collector.tls.generate=false",
            &["at '/collector/tls/existingSecret': minLength: got 0, want 1"],
        ),
    ];
    for (set, wanted) in cases {
        let out = helm(&["template", "fathom", "charts/fathom", "--set", set]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--set {set} was accepted");
        assert!(
            stderr.contains("values don't meet the specifications of the schema"),
            "--set {set}: {stderr}"
        );
        for w in wanted {
            assert!(
                stderr.contains(w),
                "--set {set}: expected {w:?} in: {stderr}"
            );
        }
    }
}

/// `deploy/fathom.yaml` is the chart rendered by `scripts/render-deploy.sh`; a change to the
/// chart without a new render fails here.
#[test]
fn deploy_is_the_chart_rendered_and_has_no_private_key() {
    let rendered = helm_ok(&DEPLOY_ARGS);
    let path = workspace_root().join("deploy/fathom.yaml");
    let committed =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let body = committed
        .split_once("\n---\n")
        .map(|(_, b)| format!("---\n{b}"))
        .expect("deploy/fathom.yaml starts with its header comment");
    if body != rendered {
        let first = body
            .lines()
            .zip(rendered.lines())
            .enumerate()
            .find(|(_, (a, b))| a != b)
            .map(|(i, (a, b))| format!("line {}: committed {a:?}, chart {b:?}", i + 1))
            .unwrap_or_else(|| "one is a prefix of the other".into());
        panic!("deploy/fathom.yaml drifted from the chart ({first}): run scripts/render-deploy.sh");
    }
    assert!(!committed.contains("PRIVATE KEY") && !committed.contains("tls.key: "));
    let docs = documents(&committed);
    assert!(docs.iter().all(|d| d["kind"].as_str() != Some("Secret")));
    let kustomization = std::fs::read_to_string(workspace_root().join("deploy/kustomization.yaml"))
        .expect("deploy/kustomization.yaml");
    assert!(kustomization.contains("fathom.yaml") && kustomization.contains("namespace.yaml"));
}
