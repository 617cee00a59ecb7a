//! Every manifest under `examples/` is a TraceJob or ClusterTraceJob that deserializes into the
//! resource types and passes the shared validation, the CRD's CEL rules included.

use std::path::PathBuf;

use fathom_crds::{ClusterTraceJob, TraceJob, crd};
use kube::core::cel::Validator;

fn examples() -> Vec<(PathBuf, serde_yaml::Value)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("examples/ exists") {
        let path = entry.expect("entry").path();
        if !matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read example");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            if value != serde_yaml::Value::Null {
                out.push((path.clone(), value));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn every_example_deserializes_and_validates() {
    let tj_schema = crd::schema_json(&crd::trace_job());
    let ctj_schema = crd::schema_json(&crd::cluster_trace_job());
    let validator = Validator::new();
    let mut checked = 0;
    for (path, value) in examples() {
        let p = path.display();
        let kind = value["kind"].as_str().unwrap_or_default().to_string();
        assert_eq!(
            value["apiVersion"].as_str(),
            Some("fathom.dev/v1alpha1"),
            "{p}"
        );
        let json = serde_json::to_value(&value).expect("yaml to json");
        let (spec, schema) = match kind.as_str() {
            "TraceJob" => {
                let job: TraceJob =
                    serde_yaml::from_value(value).unwrap_or_else(|e| panic!("{p}: {e}"));
                assert!(job.metadata.name.is_some(), "{p}: metadata.name");
                (job.spec.0, &tj_schema)
            }
            "ClusterTraceJob" => {
                let job: ClusterTraceJob =
                    serde_yaml::from_value(value).unwrap_or_else(|e| panic!("{p}: {e}"));
                assert!(job.metadata.name.is_some(), "{p}: metadata.name");
                (job.spec.0, &ctj_schema)
            }
            other => panic!("{p}: kind {other:?} is not TraceJob or ClusterTraceJob"),
        };
        if let Err(errors) = spec.validate() {
            panic!("{p}: {errors:?}");
        }
        if let Err(errors) = validator.validate(schema, &json, None) {
            panic!("{p}: CEL rules reject it: {errors:?}");
        }
        checked += 1;
    }
    eprintln!("{checked} example manifests checked");
}

/// `examples/` shows every catalog entry and every probe form at least once.
#[test]
fn every_catalog_entry_and_probe_form_has_an_example() {
    use fathom_crds::spec::CATALOG_NAMES;
    let mut forms = std::collections::BTreeSet::new();
    let mut entries = std::collections::BTreeSet::new();
    for (path, value) in examples() {
        let probe = value["spec"]["probe"]
            .as_mapping()
            .unwrap_or_else(|| panic!("{}: spec.probe", path.display()));
        for (form, v) in probe {
            let form = form.as_str().expect("a field name").to_string();
            if form == "catalog" {
                entries.insert(v.as_str().expect("an entry name").trim().to_string());
            }
            forms.insert(form);
        }
    }
    let missing: Vec<_> = CATALOG_NAMES
        .iter()
        .filter(|c| !entries.contains(**c))
        .collect();
    assert!(
        missing.is_empty(),
        "catalog entries without an example: {missing:?}"
    );
    let missing: Vec<_> = crd::PROBE_FORMS
        .iter()
        .filter(|f| !forms.contains(**f))
        .collect();
    assert!(
        missing.is_empty(),
        "probe forms without an example: {missing:?}"
    );
}
