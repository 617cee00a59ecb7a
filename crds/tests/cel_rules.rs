//! The CRDs' CEL rules compile, stay within the API server's cost budget, and accept a valid
//! spec. (The table of invalid specs is `o4_…` in the operator's tests.)

use fathom_crds::crd;
use kube::core::cel::{Validator, compile_schema, estimate_rule_cost};
use serde_json::Value;

/// The schema node a rule sits on (`path` relative to spec, `[]` for array items).
fn node<'a>(schema: &'a Value, path: &str) -> &'a Value {
    let mut n = &schema["properties"]["spec"];
    if path.is_empty() {
        return n;
    }
    for part in path.split('.') {
        let (name, items) = match part.strip_suffix("[]") {
            Some(n) => (n, true),
            None => (part, false),
        };
        n = &n["properties"][name];
        if items {
            n = &n["items"];
        }
    }
    assert!(!n.is_null(), "no schema at {path}");
    n
}
use serde_json::json;

#[test]
fn every_rule_compiles_and_is_affordable() {
    for crd in [crd::trace_job(), crd::cluster_trace_job()] {
        let schema = crd::schema_json(&crd);
        let compiled = compile_schema(&schema);
        assert!(
            !compiled.has_errors(),
            "{:?}",
            compiled.compilation_errors()
        );
        for r in crd::spec_rules() {
            let at = compile_schema(node(&schema, r.path));
            let warnings = estimate_rule_cost(&r.rule, &at);
            assert!(warnings.is_empty(), "{}: {warnings:?}", r.rule);
        }
    }
}

/// A job with every field set, of `kind` with `probe` and aggregate keys `by`.
fn full_job(kind: &str, probe: Value, by: Value) -> Value {
    json!({
        "apiVersion": "fathom.dev/v1alpha1", "kind": kind,
        "metadata": {"name": "web-drops", "namespace": "shop"},
        "spec": {
            "probe": probe,
            "aggregate": {"by": by, "value": "count", "top": 50},
            "events": {"last": 10, "maxPayloadBytes": 64},
            "filter": {"pids": [1, 2], "comm": "nginx"},
            "duration": "1h30m",
            "limits": {"eventsPerSecond": 10000, "mapEntries": 16384, "cpuPercent": 5},
            "podSelector": {"matchLabels": {"app": "web"}},
            "ttlSecondsAfterFinished": 0,
            "targetRef": {"kind": "Deployment", "name": "web"}
        }
    })
}

#[test]
fn a_full_valid_spec_passes_every_rule() {
    let cluster = full_job(
        "ClusterTraceJob",
        json!({"kprobe": "tcp_v4_connect"}),
        json!(["pod", "arg0", "comm"]),
    );
    Validator::new()
        .validate(&crd::schema_json(&crd::cluster_trace_job()), &cluster, None)
        .unwrap_or_else(|e| panic!("{e:?}"));
    let namespaced = full_job(
        "TraceJob",
        json!({"rawTracepoint": "sys_enter"}),
        json!(["pod", "arg1", "comm"]),
    );
    Validator::new()
        .validate(&crd::schema_json(&crd::trace_job()), &namespaced, None)
        .unwrap_or_else(|e| panic!("{e:?}"));
}
