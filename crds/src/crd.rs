//! The CustomResourceDefinitions, with the spec's CEL rules, and their YAML form.
//!
//! kube's derive produces the structural schema from the Rust types; this module adds what a
//! schema can say about a [`TraceJobSpec`](crate::TraceJobSpec): the CEL rules of
//! [`SPEC_RULES`] (`x-kubernetes-validations`, each with the same message as
//! [`TraceJobSpec::validate`](crate::TraceJobSpec::validate)) and the size bounds of
//! [`SPEC_BOUNDS`] that keep the rules' estimated cost within the API server's budget. The rules
//! live in one table so tests can evaluate them offline, case by case.
//!
//! `fathom-operator crd --out crds/generated` writes [`generated_files`]; a test fails when the
//! committed files differ.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use serde_json::{Value, json};

use crate::{
    assignment::TraceAssignment,
    job::{ClusterTraceJob, TraceJob},
    policy::TracePolicy,
    spec::{
        BUILTIN_KEYS, CATALOG_NAMES, MAX_EVENTS_PER_SECOND, MAX_LAST_EVENTS, MAX_MAP_ENTRIES,
        MAX_PAYLOAD_BYTES, MAX_PROFILE_HZ, MAX_TOP,
    },
    trace_result::TraceResult,
};

/// One CEL rule on a field of the spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecRule {
    /// The field the rule sits on, relative to `spec` (`""` is the spec itself); `[]` is an
    /// array's items: `aggregate.by[]`.
    pub path: &'static str,
    /// The CEL expression, `self` being that field.
    pub rule: String,
    /// The message the API server returns (the same words as the operator's validation).
    pub message: String,
    /// For rules on the spec that are about one field: that field, e.g. `.aggregate.by`.
    pub field_path: Option<&'static str>,
}

fn rule(path: &'static str, rule: impl Into<String>, message: impl Into<String>) -> SpecRule {
    SpecRule {
        path,
        rule: rule.into(),
        message: message.into(),
        field_path: None,
    }
}

/// The fields of `spec.probe`, one per probe form.
pub const PROBE_FORMS: &[&str] = &[
    "catalog",
    "tracepoint",
    "rawTracepoint",
    "kprobe",
    "kretprobe",
    "fentry",
    "fexit",
    "uprobe",
    "uretprobe",
    "usdt",
    "profile",
    "lsm",
    "network",
];

fn cel_list(items: &[&str]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("'{s}'")).collect();
    format!("[{}]", quoted.join(", "))
}

fn has_any(forms: &[&str]) -> String {
    forms
        .iter()
        .map(|f| format!("has(self.probe.{f})"))
        .collect::<Vec<_>>()
        .join(" || ")
}

/// Regex of a duration `parse_duration` accepts.
const DURATION_RE: &str = "^([0-9]+(ms|s|m|h))+$";

/// The CEL rules on a TraceJob / ClusterTraceJob spec.
pub fn spec_rules() -> Vec<SpecRule> {
    let forms_has = PROBE_FORMS
        .iter()
        .map(|f| format!("has(self.{f})"))
        .collect::<Vec<_>>()
        .join(", ");
    let name_rule = "self.matches('^\\\\s*\\\\S+\\\\s*$')";
    let name_msg = "must be a single non-empty name; `fathom list` shows what this kernel has";
    let mut rules = vec![
        rule(
            "probe",
            format!("[{forms_has}].filter(x, x).size() == 1"),
            format!("set exactly one of {}", PROBE_FORMS.join(", ")),
        ),
        rule(
            "probe.catalog",
            format!("self.trim() in {}", cel_list(CATALOG_NAMES)),
            format!(
                "unknown catalog entry; use one of: {}",
                CATALOG_NAMES.join(", ")
            ),
        ),
        rule(
            "probe.network.hook",
            "self.trim() in ['xdp', 'tc', 'cgroupSkb', 'sockOps']",
            "is not a network hook; use xdp, tc, cgroupSkb or sockOps",
        ),
        rule(
            "probe.tracepoint",
            "self.trim().matches('^[A-Za-z0-9_-]{1,128}[/:][A-Za-z0-9_-]{1,128}$')",
            "is not CATEGORY/NAME; write e.g. skb/kfree_skb (`fathom list 'tracepoint:*'` lists them)",
        ),
    ];
    for f in [
        "rawTracepoint",
        "kprobe",
        "kretprobe",
        "fentry",
        "fexit",
        "lsm",
    ] {
        let path: &'static str = match f {
            "rawTracepoint" => "probe.rawTracepoint",
            "kprobe" => "probe.kprobe",
            "kretprobe" => "probe.kretprobe",
            "fentry" => "probe.fentry",
            "fexit" => "probe.fexit",
            _ => "probe.lsm",
        };
        rules.push(rule(path, name_rule, name_msg));
    }
    rules.extend([
        rule(
            "probe.uprobe",
            "self.matches('^.+:[^:]+$')",
            "is not BINARY:SYMBOL; write e.g. /usr/lib/x86_64-linux-gnu/libc.so.6:malloc",
        ),
        rule(
            "probe.uretprobe",
            "self.matches('^.+:[^:]+$')",
            "is not BINARY:SYMBOL; write e.g. /usr/lib/x86_64-linux-gnu/libc.so.6:malloc",
        ),
        rule(
            "probe.usdt",
            "self.matches('^.+:[^:]+:[^:]+$')",
            "is not BINARY:PROVIDER:NAME; `fathom list usdt:BINARY` lists a binary's probes",
        ),
        rule(
            "probe.profile.frequency",
            format!("self >= 1 && self <= {MAX_PROFILE_HZ}"),
            format!("must be 1–{MAX_PROFILE_HZ} Hz; 99 is a good default"),
        ),
        rule(
            "aggregate.by",
            "self.size() <= 8",
            "at most 8 keys; aggregate by fewer keys",
        ),
        rule(
            "aggregate.by[]",
            "self.trim().matches('^[a-z_][a-z0-9_]{0,63}$')",
            format!(
                "unknown key; use one of {}, arg0…arg5, ret, or a tracepoint field name",
                BUILTIN_KEYS.join(", ")
            ),
        ),
        rule(
            "aggregate.by",
            "self.all(k, self.filter(x, x.trim() == k.trim()).size() == 1)",
            "a key is listed twice; list each key once",
        ),
        rule(
            "aggregate.value",
            format!(
                "self.trim() in ['count', 'latency'] || (self.trim().matches('^(sum|hist)\\\\(\\\\s*[a-z_][a-z0-9_]{{0,63}}\\\\s*\\\\)$') && !{}.exists(b, self.trim().matches('^(sum|hist)\\\\(\\\\s*' + b + '\\\\s*\\\\)$')))",
                cel_list(BUILTIN_KEYS)
            ),
            "is not count, latency, sum(<field>) or hist(<field>)",
        ),
        rule(
            "aggregate.top",
            format!("self >= 1 && self <= {MAX_TOP}"),
            format!("must be 1–{MAX_TOP}"),
        ),
        rule(
            "events.last",
            format!("self >= 1 && self <= {MAX_LAST_EVENTS}"),
            format!("must be 1–{MAX_LAST_EVENTS}"),
        ),
        rule(
            "events.maxPayloadBytes",
            format!("self >= 1 && self <= {MAX_PAYLOAD_BYTES}"),
            format!("must be 1–{MAX_PAYLOAD_BYTES}"),
        ),
        rule("filter.pids", "self.size() <= 1024", "at most 1024 pids"),
        rule(
            "filter.pids",
            "!self.exists(p, p == 0)",
            "pid 0 is the idle task; list real process ids",
        ),
        rule(
            "filter.comm",
            "size(self) >= 1 && size(bytes(self)) <= 15",
            "must be 1–15 bytes: the kernel keeps only the first 15 bytes of a command name",
        ),
        rule(
            "duration",
            format!("self.trim().matches('{DURATION_RE}')"),
            "is not a duration; write e.g. 30s, 5m, 1h30m",
        ),
        rule(
            "duration",
            format!("!self.trim().matches('{DURATION_RE}') || duration(self.trim()) > duration('0s')"),
            "must be longer than 0; omit it to run until deleted",
        ),
        rule(
            "duration",
            format!("!self.trim().matches('{DURATION_RE}') || duration(self.trim()) <= duration('24h')"),
            "must be at most 24h",
        ),
        rule(
            "limits.eventsPerSecond",
            format!("self >= 1 && self <= {MAX_EVENTS_PER_SECOND}"),
            format!("must be 1–{MAX_EVENTS_PER_SECOND}; omit it for no limit"),
        ),
        rule(
            "limits.mapEntries",
            format!("self >= 1 && self <= {MAX_MAP_ENTRIES}"),
            format!("must be 1–{MAX_MAP_ENTRIES}"),
        ),
        rule(
            "limits.cpuPercent",
            "self >= 1 && self <= 100",
            "must be 1–100 (percent of one CPU)",
        ),
        rule(
            "ttlSecondsAfterFinished",
            "self >= 0",
            "must be 0 or more seconds",
        ),
        rule(
            "targetRef.kind",
            "self in ['Deployment', 'StatefulSet', 'DaemonSet', 'Job']",
            "is not Deployment, StatefulSet, DaemonSet or Job",
        ),
        rule("targetRef.name", "size(self) > 0", "must name the workload"),
    ]);
    // Keys and values the attach kind cannot provide.
    let by_has = |pred: &str| {
        format!(
            "!has(self.aggregate) || !has(self.aggregate.by) || !self.aggregate.by.exists(k, {pred})"
        )
    };
    rules.push(SpecRule {
        path: "",
        rule: format!(
            "{} || {}",
            by_has("k.trim().matches('^arg[0-5]$')"),
            has_any(&["rawTracepoint", "kprobe", "fentry", "fexit", "uprobe", "lsm"])
        ),
        message: "arg0…arg5 are function arguments: use a kprobe, fentry, fexit, uprobe, lsm or raw tracepoint probe to key by them".into(),
        field_path: Some(".aggregate.by"),
    });
    rules.push(SpecRule {
        path: "",
        rule: format!(
            "{} || {}",
            by_has("k.trim() in ['ret', 'retval']"),
            has_any(&["kretprobe", "uretprobe", "fexit", "tracepoint", "catalog"])
        ),
        message: "ret is a return value (or a tracepoint field): use a kretprobe, fexit, uretprobe or a tracepoint with a ret field".into(),
        field_path: Some(".aggregate.by"),
    });
    rules.push(SpecRule {
        path: "",
        rule: format!(
            "!has(self.aggregate) || !has(self.aggregate.value) || self.aggregate.value.trim() != 'latency' || {} || (has(self.probe.catalog) && self.probe.catalog.trim() in ['runqlat', 'biolatency', 'syscalls'])",
            has_any(&["kretprobe", "uretprobe", "fexit"])
        ),
        message: "latency needs an entry→return pair: use a kretprobe, uretprobe or fexit, or the runqlat/biolatency catalog entries".into(),
        field_path: Some(".aggregate.value"),
    });
    rules
}

/// Size bounds added to the schema (field path relative to `spec`, keyword, value): they cap
/// the cost the API server estimates for the CEL rules. The rules themselves carry the
/// tighter, user-facing limits.
pub const SPEC_BOUNDS: &[(&str, &str, u64)] = &[
    ("probe.catalog", "maxLength", 64),
    ("probe.tracepoint", "maxLength", 260),
    ("probe.rawTracepoint", "maxLength", 256),
    ("probe.kprobe", "maxLength", 256),
    ("probe.kretprobe", "maxLength", 256),
    ("probe.fentry", "maxLength", 256),
    ("probe.fexit", "maxLength", 256),
    ("probe.lsm", "maxLength", 256),
    ("probe.uprobe", "maxLength", 4096),
    ("probe.uretprobe", "maxLength", 4096),
    ("probe.usdt", "maxLength", 4096),
    ("aggregate.by", "maxItems", 16),
    ("aggregate.by[]", "maxLength", 128),
    ("aggregate.value", "maxLength", 160),
    ("filter.pids", "maxItems", 4096),
    ("filter.comm", "maxLength", 64),
    ("duration", "maxLength", 32),
    ("targetRef.kind", "maxLength", 32),
    ("targetRef.name", "maxLength", 253),
];

/// The schema node at `path` (relative to `spec`) inside a CRD's openAPIV3Schema.
fn node_mut<'a>(schema: &'a mut Value, path: &str) -> &'a mut Value {
    let mut node = schema
        .pointer_mut("/properties/spec")
        .expect("a CRD schema has spec");
    if path.is_empty() {
        return node;
    }
    for part in path.split('.') {
        let (name, items) = match part.strip_suffix("[]") {
            Some(n) => (n, true),
            None => (part, false),
        };
        node = node
            .get_mut("properties")
            .and_then(|p| p.get_mut(name))
            .unwrap_or_else(|| panic!("spec schema has no field {path:?}"));
        if items {
            node = node
                .get_mut("items")
                .unwrap_or_else(|| panic!("spec field {path:?} is not an array"));
        }
    }
    node
}

/// Adds `rules` and [`SPEC_BOUNDS`] to a job CRD.
fn add_spec_validation(
    mut crd: CustomResourceDefinition,
    rules: Vec<SpecRule>,
) -> CustomResourceDefinition {
    for version in &mut crd.spec.versions {
        let Some(schema) = version.schema.as_mut() else {
            continue;
        };
        let mut value =
            serde_json::to_value(schema.open_api_v3_schema.take()).expect("schema serializes");
        for r in &rules {
            let node = node_mut(&mut value, r.path);
            let mut entry = json!({ "rule": r.rule, "message": r.message });
            if let Some(fp) = r.field_path {
                entry["fieldPath"] = json!(fp);
            }
            match node.get_mut("x-kubernetes-validations") {
                Some(Value::Array(list)) => list.push(entry),
                _ => node["x-kubernetes-validations"] = json!([entry]),
            }
        }
        for (path, keyword, bound) in SPEC_BOUNDS {
            node_mut(&mut value, path)[*keyword] = json!(bound);
        }
        schema.open_api_v3_schema = serde_json::from_value(value).expect("schema deserializes");
    }
    crd
}

/// The TraceJob CRD, with the spec's CEL rules. The tenant rules are not here: a TracePolicy
/// can relax them per namespace, which a CRD's rules (seeing the object alone) cannot. They
/// are the chart's ValidatingAdmissionPolicies (`charts/fathom/templates/tenant-policy.yaml`).
pub fn trace_job() -> CustomResourceDefinition {
    add_spec_validation(TraceJob::crd(), spec_rules())
}

/// The ClusterTraceJob CRD, with the spec's CEL rules.
pub fn cluster_trace_job() -> CustomResourceDefinition {
    add_spec_validation(ClusterTraceJob::crd(), spec_rules())
}

/// Every CRD Fathom installs.
pub fn all() -> Vec<CustomResourceDefinition> {
    vec![
        trace_job(),
        cluster_trace_job(),
        TraceAssignment::crd(),
        TraceResult::crd(),
        TracePolicy::crd(),
    ]
}

/// The committed files: `(file name, YAML)`, one CRD per file.
pub fn generated_files() -> Vec<(String, String)> {
    all()
        .into_iter()
        .map(|crd| {
            let name = crd.metadata.name.clone().unwrap_or_default();
            let body = serde_yaml::to_string(&crd).expect("CRD serializes to YAML");
            (
                format!("{name}.yaml"),
                format!(
                    "# Generated by `cargo run -p fathom-operator -- crd --out crds/generated`; do not edit.\n{body}"
                ),
            )
        })
        .collect()
}

/// The directory the generated YAML is committed in.
pub fn generated_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("generated")
}

/// The openAPIV3Schema of a CRD as JSON (for offline CEL evaluation).
pub fn schema_json(crd: &CustomResourceDefinition) -> Value {
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("CRD has a schema");
    serde_json::to_value(schema).expect("schema serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rule_lands_on_an_existing_field() {
        let crd = trace_job();
        let schema = schema_json(&crd);
        let text = serde_json::to_string(&schema).expect("json");
        for r in spec_rules() {
            assert!(text.contains(&r.message), "{r:?}");
        }
        assert_eq!(
            schema.pointer("/properties/spec/properties/aggregate/properties/by/maxItems"),
            Some(&json!(16))
        );
    }

    #[test]
    fn names_and_scopes() {
        let crds = all();
        let names: Vec<_> = crds
            .iter()
            .map(|c| (c.spec.names.kind.clone(), c.spec.scope.clone()))
            .collect();
        assert_eq!(
            names,
            vec![
                ("TraceJob".to_string(), "Namespaced".to_string()),
                ("ClusterTraceJob".into(), "Cluster".into()),
                ("TraceAssignment".into(), "Namespaced".into()),
                ("TraceResult".into(), "Namespaced".into()),
                ("TracePolicy".into(), "Cluster".into()),
            ]
        );
        let tres = &crds[3];
        assert_eq!(
            tres.spec.names.short_names,
            Some(vec!["results".to_string(), "tres".to_string()])
        );
        for c in &crds {
            assert_eq!(c.spec.group, "fathom.dev");
            let v = &c.spec.versions[0];
            // A TracePolicy is configuration: nothing reports on it.
            let reported = c.spec.names.kind != "TracePolicy";
            assert_eq!(
                v.subresources
                    .as_ref()
                    .and_then(|s| s.status.as_ref())
                    .is_some(),
                reported,
                "{} has a status subresource",
                c.spec.names.kind
            );
        }
    }

    /// S1: no spec field can carry bytecode or switch a check off. These are the fields
    /// reviewed for it, down to each nested object's: a new one fails here until it is
    /// reviewed and added.
    #[test]
    fn s1_the_spec_has_only_reviewed_fields() {
        let schema = schema_json(&trace_job());
        let fields = |path: &str| -> Vec<String> {
            let mut v: Vec<String> = schema
                .pointer(path)
                .and_then(Value::as_object)
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default();
            v.sort();
            v
        };
        let spec = "/properties/spec/properties";
        assert_eq!(
            fields(spec),
            [
                "aggregate",
                "dryRun",
                "duration",
                "events",
                "filter",
                "limits",
                "nodeSelector",
                "podSelector",
                "probe",
                "suspend",
                "targetRef",
                "ttlSecondsAfterFinished"
            ]
        );
        for (part, reviewed) in [
            ("aggregate", &["by", "top", "value"][..]),
            ("events", &["last", "maxPayloadBytes", "payload"][..]),
            ("filter", &["comm", "pids"][..]),
            (
                "limits",
                &["cpuPercent", "eventsPerSecond", "mapEntries"][..],
            ),
            ("targetRef", &["kind", "name"][..]),
        ] {
            assert_eq!(
                fields(&format!("{spec}/{part}/properties")),
                reviewed,
                "{part}"
            );
        }
        let mut forms = PROBE_FORMS.to_vec();
        forms.sort();
        assert_eq!(fields(&format!("{spec}/probe/properties")), forms);
    }

    #[test]
    fn the_job_spec_schema_is_the_shared_spec() {
        /// The schema without its CEL rules.
        fn shape(v: &Value) -> Value {
            match v {
                Value::Object(m) => Value::Object(
                    m.iter()
                        .filter(|(k, _)| *k != "x-kubernetes-validations")
                        .map(|(k, v)| (k.clone(), shape(v)))
                        .collect(),
                ),
                Value::Array(a) => Value::Array(a.iter().map(shape).collect()),
                other => other.clone(),
            }
        }
        let tj = schema_json(&trace_job());
        let ctj = schema_json(&cluster_trace_job());
        assert_eq!(
            tj.pointer("/properties/spec").map(shape),
            ctj.pointer("/properties/spec").map(shape)
        );
        // Neither carries the tenant rules (a TracePolicy relaxes them, at admission by the
        // chart's policies).
        assert_eq!(
            tj.pointer("/properties/spec"),
            ctj.pointer("/properties/spec")
        );
        assert!(!tj.to_string().contains("refused by rule"));
        assert!(
            tj.pointer("/properties/spec/properties/probe/properties/tracepoint")
                .is_some()
        );
    }
}
