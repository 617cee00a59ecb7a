//! The CRDs on the real API server: they install and become Established (so their CEL rules
//! fit the server's cost budget), the server rejects every invalid spec of the O4 table with
//! its message and accepts the golden examples, and `kubectl` shows the printer columns and
//! resolves the short names the CRDs declare.

use std::{collections::BTreeMap, path::PathBuf};

use fathom_crds::{
    TraceAssignment, TraceAssignmentSpec, TraceJob, TraceResult, TraceResultSpec,
    assignment::JobRef,
};
use fathom_e2e::{
    TestNamespace, admin, apply_crds, env, generated_crds, install_crds, kubectl, kubectl_ok,
    manifest, workspace_root,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api, Client, ResourceExt,
    api::{ApiResource, DynamicObject, PostParams},
};
use serde::Deserialize;
use serde_json::{Value, json};

/// The number of CEL rules (`x-kubernetes-validations` entries) in a schema.
fn cel_rules(v: &Value) -> usize {
    match v {
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| match (k.as_str(), v) {
                ("x-kubernetes-validations", Value::Array(rules)) => rules.len(),
                _ => cel_rules(v),
            })
            .sum(),
        Value::Array(a) => a.iter().map(cel_rules).sum(),
        _ => 0,
    }
}

#[tokio::test]
async fn crds_install_and_become_established_on_the_real_server() {
    let client = admin().await;
    let started = std::time::Instant::now();
    let stored = apply_crds(&client).await;
    let local = generated_crds();
    assert_eq!(stored.len(), local.len());
    let mut total = 0;
    for (s, l) in stored.iter().zip(&local) {
        assert_eq!(s.name_any(), l.name_any());
        // The server kept every rule (none dropped or rewritten away).
        let want = cel_rules(&serde_json::to_value(&l.spec).expect("json"));
        let got = cel_rules(&serde_json::to_value(&s.spec).expect("json"));
        assert_eq!(got, want, "CEL rules of {} on the server", s.name_any());
        total += got;
        let accepted = s
            .status
            .as_ref()
            .and_then(|st| st.accepted_names.as_ref())
            .expect("accepted names");
        assert_eq!(accepted.kind, l.spec.names.kind);
        assert_eq!(accepted.short_names, l.spec.names.short_names);
    }
    assert!(total >= 20, "only {total} CEL rules installed");
    eprintln!(
        "{} CRDs with {total} CEL rules Established in {:?}",
        stored.len(),
        started.elapsed()
    );
}

// ---------------------------------------------------------------- O4

/// One row of `manifests/o4-invalid-specs.yaml`.
#[derive(Debug, Deserialize)]
struct InvalidSpec {
    spec: String,
    cel: String,
}

fn invalid_specs() -> Vec<InvalidSpec> {
    let path = manifest("o4-invalid-specs.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The TraceJob of a spec of the table (as the operator's test builds it).
fn as_tracejob(spec_yaml: &str, ns: &str, name: &str) -> DynamicObject {
    let mut spec: Value = serde_yaml::from_str(spec_yaml).expect("spec yaml");
    if spec.get("targetRef").is_none() {
        spec["podSelector"] = json!({"matchLabels": {"app": "web"}});
    }
    serde_json::from_value(json!({
        "apiVersion": "fathom.dev/v1alpha1", "kind": "TraceJob",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }))
    .expect("object")
}

fn dynamic_api<K: kube::Resource<DynamicType = ()>>(
    client: &Client,
    ns: Option<&str>,
) -> Api<DynamicObject> {
    let ar = ApiResource::erase::<K>(&());
    match ns {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    }
}

const DRY_RUN: PostParams = PostParams {
    dry_run: true,
    field_manager: None,
};

#[tokio::test]
async fn o4_each_invalid_spec_is_rejected_by_the_api_server_with_its_message() {
    let cases = invalid_specs();
    assert!(cases.len() >= 20, "{} cases", cases.len());
    let client = admin().await;
    install_crds(&client).await;
    let ns = TestNamespace::create(&client, "o4").await;
    let api = dynamic_api::<TraceJob>(&client, Some(ns.as_str()));
    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let obj = as_tracejob(&case.spec, ns.as_str(), &format!("invalid-{i}"));
        match api.create(&DRY_RUN, &obj).await {
            Err(kube::Error::Api(s)) if s.code == 422 && s.message.contains(&case.cel) => {}
            Err(kube::Error::Api(s)) => failures.push(format!(
                "{:?}: rejected ({}) without {:?}: {}",
                case.spec, s.code, case.cel, s.message
            )),
            Err(e) => failures.push(format!("{:?}: {e}", case.spec)),
            Ok(_) => failures.push(format!("{:?}: accepted by the API server", case.spec)),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} invalid specs not rejected as expected:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// Every document of `examples/*.yaml`.
fn examples() -> Vec<(PathBuf, Value)> {
    let dir = workspace_root().join("examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("examples/")
        .map(|e| e.expect("entry").path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).expect("read example");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v: Value =
                Deserialize::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            if !v.is_null() {
                out.push((path.clone(), v));
            }
        }
    }
    out
}

#[tokio::test]
async fn o4_golden_examples_are_accepted_by_the_api_server() {
    let client = admin().await;
    install_crds(&client).await;
    let ns = TestNamespace::create(&client, "examples").await;
    let examples = examples();
    assert!(examples.len() >= 2, "{} examples", examples.len());
    let mut failures = Vec::new();
    for (path, mut value) in examples {
        let api = match value["kind"].as_str() {
            Some("TraceJob") => {
                // Server-side dry run in the test's namespace, whatever the example names.
                value["metadata"]["namespace"] = json!(ns.as_str());
                dynamic_api::<TraceJob>(&client, Some(ns.as_str()))
            }
            Some("ClusterTraceJob") => dynamic_api::<fathom_crds::ClusterTraceJob>(&client, None),
            other => panic!("{}: kind {other:?}", path.display()),
        };
        let obj: DynamicObject = serde_json::from_value(value).expect("object");
        if let Err(e) = api.create(&DRY_RUN, &obj).await {
            failures.push(format!("{}: {e}", path.display()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------- kubectl

/// The header of each table `kubectl get` printed (one per resource type).
fn headers(out: &str) -> Vec<Vec<String>> {
    out.split("\n\n")
        .filter_map(|block| block.lines().find(|l| !l.trim().is_empty()))
        .map(|h| h.split_whitespace().map(String::from).collect())
        .collect()
}

/// NAME, then the printer columns of `crd` (those of priority 0 unless `wide`), as kubectl
/// prints them.
fn expected_header(crd: &CustomResourceDefinition, wide: bool) -> Vec<String> {
    let version = &crd.spec.versions[0];
    let mut h = vec!["NAME".to_string()];
    for c in version.additional_printer_columns.iter().flatten() {
        if wide || c.priority.unwrap_or(0) == 0 {
            h.push(c.name.to_uppercase());
        }
    }
    h
}

#[tokio::test]
async fn kubectl_shows_the_crds_printer_columns_and_resolves_their_short_names() {
    let client = admin().await;
    install_crds(&client).await;
    let ns = TestNamespace::create(&client, "kubectl").await;
    let crds: BTreeMap<String, CustomResourceDefinition> = generated_crds()
        .into_iter()
        .map(|c| (c.spec.names.plural.clone(), c))
        .collect();

    // One object of each namespaced kind (no operator needed to list them).
    let spec: fathom_crds::TraceJobSpec = serde_json::from_value(json!({
        "probe": {"tracepoint": "skb/kfree_skb"},
        "podSelector": {"matchLabels": {"app": "web"}},
        "duration": "60s"
    }))
    .expect("spec");
    let mut job = TraceJob::new(
        "web-drops",
        fathom_crds::job::NamespacedJobSpec(spec.clone()),
    );
    job.metadata.namespace = Some(ns.name.clone());
    let job = Api::<TraceJob>::namespaced(client.clone(), ns.as_str())
        .create(&PostParams::default(), &job)
        .await
        .expect("create job");
    let job_ref = JobRef {
        kind: "TraceJob".into(),
        name: job.name_any(),
        namespace: Some(ns.name.clone()),
        uid: job.uid().expect("uid"),
    };
    let mut a = TraceAssignment::new(
        "web-drops-node",
        TraceAssignmentSpec {
            job: job_ref.clone(),
            run: 1,
            node_name: env().real_node.clone(),
            trace: spec,
            node_wide: false,
            target_pods: Vec::new(),
            deadline: None,
            suspend: false,
            policy: None,
        },
    );
    a.metadata.namespace = Some(ns.name.clone());
    Api::<TraceAssignment>::namespaced(client.clone(), ns.as_str())
        .create(&PostParams::default(), &a)
        .await
        .expect("create assignment");
    let mut r = TraceResult::new("web-drops", TraceResultSpec { job: job_ref });
    r.metadata.namespace = Some(ns.name.clone());
    Api::<TraceResult>::namespaced(client.clone(), ns.as_str())
        .create(&PostParams::default(), &r)
        .await
        .expect("create result");

    // Headers: `kubectl get tracejobs,tas,results` prints one table per type.
    let kinds = ["tracejobs", "traceassignments", "traceresults"];
    let args = "tracejobs,tas,results";
    for wide in [false, true] {
        let mut cmd = vec!["get", args, "-n", ns.as_str()];
        if wide {
            cmd.extend(["-o", "wide"]);
        }
        let out = kubectl_ok(&cmd);
        let got = headers(&out);
        let want: Vec<Vec<String>> = kinds
            .iter()
            .map(|k| expected_header(&crds[*k], wide))
            .collect();
        assert_eq!(got, want, "kubectl {}:\n{out}", cmd.join(" "));
    }

    // Every declared short name resolves to its kind (and the category lists them all).
    let mut names_seen = Vec::new();
    for crd in crds.values() {
        let namespaced = crd.spec.scope == "Namespaced";
        for short in crd.spec.names.short_names.iter().flatten() {
            let mut cmd = vec!["get", short.as_str(), "-o", "name"];
            if namespaced {
                cmd.extend(["-n", ns.as_str()]);
            }
            let out = kubectl(&cmd).unwrap_or_else(|e| panic!("short name {short}: {e:#}"));
            if namespaced {
                let prefix = format!(
                    "{}.{}/",
                    crd.spec.names.singular.as_deref().unwrap_or_default(),
                    crd.spec.group
                );
                assert!(
                    out.lines().any(|l| l.starts_with(&prefix)),
                    "kubectl get {short} did not list a {prefix}…: {out:?}"
                );
            }
            names_seen.push(short.clone());
        }
    }
    assert!(names_seen.len() >= 4, "short names: {names_seen:?}");
    let out = kubectl_ok(&["get", "fathom", "-n", ns.as_str(), "-o", "name"]);
    for prefix in [
        "tracejob.fathom.dev/web-drops",
        "traceassignment.fathom.dev/web-drops-node",
        "traceresult.fathom.dev/web-drops",
    ] {
        assert!(out.lines().any(|l| l == prefix), "category fathom: {out}");
    }
}
