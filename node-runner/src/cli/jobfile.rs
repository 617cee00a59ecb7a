//! Reading a TraceJob manifest from a file: the same YAML a user applies to a cluster.

use std::{fs, path::Path};

use fathom_crds::TraceJobSpec;
use serde::Deserialize;

use crate::engine::error::EngineError;

/// The parts of a TraceJob or ClusterTraceJob manifest `fathom run` uses.
#[derive(Debug, Clone)]
pub struct JobFile {
    pub kind: String,
    pub name: String,
    pub namespace: Option<String>,
    pub spec: TraceJobSpec,
}

/// apiVersion and kind are checked by [`check_kind`] and only ignored here.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    #[serde(rename = "apiVersion")]
    _api_version: Option<String>,
    kind: Option<String>,
    #[serde(default)]
    metadata: Metadata,
    spec: Option<TraceJobSpec>,
}

#[derive(Deserialize, Default)]
struct Metadata {
    name: Option<String>,
    namespace: Option<String>,
}

pub const API_VERSION: &str = "fathom.dev/v1alpha1";

/// Parses manifest text; `origin` names it in errors.
pub fn parse(text: &str, origin: &str) -> Result<JobFile, EngineError> {
    let err = |message: String| EngineError::File {
        path: origin.to_string(),
        message,
    };
    // What kind of object this is comes first: a Pod manifest should hear that it is not a
    // TraceJob, not that its spec lacks a probe.
    let head: serde_yaml::Value = serde_yaml::from_str(text)
        .map_err(|e| err(format!("not a valid TraceJob manifest: {e}")))?;
    check_kind(&head).map_err(err)?;
    let de = serde_yaml::Deserializer::from_str(text);
    let mut unknown = Vec::new();
    let manifest: Manifest = serde_ignored::deserialize(de, |path| {
        // serde_ignored writes `?` for an Option it stepped into; users think in fields.
        let p = path.to_string().replace(".?", "");
        // metadata carries labels, annotations and more that a local run does not use.
        if !p.starts_with("metadata") {
            unknown.push(p);
        }
    })
    .map_err(|e| err(format!("not a valid TraceJob manifest: {e}")))?;
    if let Some(first) = unknown.first() {
        return Err(err(format!(
            "unknown field `{first}`; check its spelling against `kubectl explain tracejob.spec` or the examples/ folder"
        )));
    }
    let kind = manifest.kind.unwrap_or_default();
    let spec = manifest
        .spec
        .ok_or_else(|| err("spec is missing; a TraceJob needs at least spec.probe".into()))?;
    Ok(JobFile {
        kind,
        name: manifest.metadata.name.unwrap_or_else(|| "unnamed".into()),
        namespace: manifest.metadata.namespace,
        spec,
    })
}

fn check_kind(head: &serde_yaml::Value) -> Result<(), String> {
    match head.get("apiVersion").and_then(|v| v.as_str()) {
        Some(API_VERSION) => {}
        Some(other) => {
            return Err(format!(
                "apiVersion is {other:?}; a TraceJob's apiVersion is {API_VERSION}"
            ));
        }
        None => {
            return Err(format!(
                "apiVersion is missing; set apiVersion: {API_VERSION}"
            ));
        }
    }
    match head.get("kind").and_then(|v| v.as_str()) {
        Some("TraceJob" | "ClusterTraceJob") => Ok(()),
        other => Err(format!(
            "kind is {:?}; fathom runs kind TraceJob or ClusterTraceJob",
            other.unwrap_or("")
        )),
    }
}

/// Reads and parses a manifest file.
pub fn read(path: &Path) -> Result<JobFile, EngineError> {
    let text = fs::read_to_string(path).map_err(|e| EngineError::File {
        path: path.display().to_string(),
        message: format!("cannot read it: {e}"),
    })?;
    parse(&text, &path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_parses() {
        let j = parse(
            "apiVersion: fathom.dev/v1alpha1\nkind: TraceJob\nmetadata: { name: x, namespace: shop, labels: { a: b } }\nspec:\n  probe: { catalog: exec }\n",
            "t.yaml",
        )
        .expect("parses");
        assert_eq!(j.name, "x");
        assert_eq!(j.namespace.as_deref(), Some("shop"));
        assert_eq!(j.spec.probe.catalog.as_deref(), Some("exec"));
    }

    #[test]
    fn typos_wrong_kinds_and_missing_specs_are_named() {
        let e = parse(
            "apiVersion: fathom.dev/v1alpha1\nkind: TraceJob\nspec:\n  probe: { catalog: exec }\n  aggregat: { by: [comm] }\n",
            "t.yaml",
        )
        .expect_err("typo");
        assert!(
            e.to_string().contains("unknown field `spec.aggregat`"),
            "{e}"
        );
        let e = parse("apiVersion: v1\nkind: Pod\nspec: {}\n", "t.yaml").expect_err("pod");
        assert!(e.to_string().contains("apiVersion is \"v1\""), "{e}");
        let e = parse(
            "apiVersion: fathom.dev/v1alpha1\nkind: TraceJob\n",
            "t.yaml",
        )
        .expect_err("no spec");
        assert!(e.to_string().contains("spec is missing"), "{e}");
        let e = parse("probe: [", "t.yaml").expect_err("yaml");
        assert!(
            e.to_string()
                .starts_with("t.yaml: not a valid TraceJob manifest"),
            "{e}"
        );
    }
}
