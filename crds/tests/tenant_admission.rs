//! The chart's tenant admission policies (`charts/fathom/templates/tenant-policy.yaml`, as
//! rendered in `deploy/fathom.yaml`, which `e2e/tests/chart.rs` keeps equal to the chart)
//! refuse exactly what the operator's `tenant_refusals_under` refuses, in its words: under the
//! defaults, under a TracePolicy the namespace names, and never under a TracePolicy it does
//! not name. The API server's own verdict on the same objects is `e2e/tests/tenancy.rs`.

use std::collections::BTreeSet;

use fathom_crds::{TraceJobSpec, TracePolicySpec};
use kube::core::cel::{KubeCelExt, cel};
use serde_json::{Value, json};

/// One ValidatingAdmissionPolicy of the rendered chart: its variables, match conditions and
/// validations.
struct Vap {
    variables: Vec<(String, String)>,
    match_conditions: Vec<String>,
    validations: Vec<Value>,
}

fn vap(name: &str) -> Vap {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/fathom.yaml");
    let text = std::fs::read_to_string(&path).expect("deploy/fathom.yaml");
    let doc = serde_yaml::Deserializer::from_str(&text)
        .filter_map(|d| serde::Deserialize::deserialize(d).ok())
        .find(|d: &Value| d["kind"] == "ValidatingAdmissionPolicy" && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no ValidatingAdmissionPolicy {name} in deploy/fathom.yaml"));
    let list = |key: &str| doc["spec"][key].as_array().cloned().unwrap_or_default();
    Vap {
        variables: list("variables")
            .iter()
            .map(|v| {
                (
                    v["name"].as_str().expect("name").to_string(),
                    v["expression"].as_str().expect("expression").to_string(),
                )
            })
            .collect(),
        match_conditions: list("matchConditions")
            .iter()
            .map(|c| c["expression"].as_str().expect("expression").to_string())
            .collect(),
        validations: list("validations"),
    }
}

/// `variables.x` as a plain identifier (the `cel` crate has no VAP variables).
fn plain(expr: &str) -> String {
    expr.replace("variables.", "variables_")
}

fn eval(ctx: &cel::Context, expr: &str) -> cel::Value {
    let program = cel::Program::compile(&plain(expr)).unwrap_or_else(|e| panic!("{expr}: {e}"));
    program
        .execute(ctx)
        .unwrap_or_else(|e| panic!("{expr}: {e:?}"))
}

impl Vap {
    /// The messages of the validations that fail, as the API server evaluates them for
    /// `object` (`old`: an update) with `params` in `namespace`; `None` when the match
    /// conditions leave the request alone.
    fn refusals(
        &self,
        object: &Value,
        old: Option<&Value>,
        params: Option<&Value>,
        namespace: &Value,
    ) -> Option<BTreeSet<String>> {
        let mut ctx = cel::Context::default();
        ctx.register_all();
        for (name, value) in [
            ("object", object),
            ("oldObject", old.unwrap_or(&Value::Null)),
            ("params", params.unwrap_or(&Value::Null)),
            ("namespaceObject", namespace),
        ] {
            ctx.add_variable(name, value.clone()).expect("variable");
        }
        for (name, expr) in &self.variables {
            let v = eval(&ctx, expr);
            ctx.add_variable_from_value(format!("variables_{name}"), v);
        }
        for c in &self.match_conditions {
            if eval(&ctx, c) != cel::Value::Bool(true) {
                return None;
            }
        }
        let mut out = BTreeSet::new();
        for v in &self.validations {
            let expr = v["expression"].as_str().expect("expression");
            match eval(&ctx, expr) {
                cel::Value::Bool(true) => {}
                cel::Value::Bool(false) => {
                    let message = match (v["message"].as_str(), v["messageExpression"].as_str()) {
                        (_, Some(m)) => match eval(&ctx, m) {
                            cel::Value::String(s) => s.to_string(),
                            other => panic!("{m}: {other:?}"),
                        },
                        (Some(m), None) => m.to_string(),
                        (None, None) => panic!("{expr}: no message"),
                    };
                    assert_eq!(v["reason"], "Invalid", "{expr}: a 422, like a CRD's rules");
                    out.insert(message);
                }
                other => panic!("{expr}: {other:?}"),
            }
        }
        Some(out)
    }
}

fn job(spec: &Value) -> Value {
    json!({
        "apiVersion": "fathom.dev/v1alpha1", "kind": "TraceJob",
        "metadata": {"name": "j", "namespace": "shop"},
        "spec": spec,
    })
}

fn namespace(policy: Option<&str>) -> Value {
    let mut ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}});
    if let Some(p) = policy {
        ns["metadata"]["labels"] = json!({ "fathom.dev/trace-policy": p });
    }
    ns
}

fn policy(name: &str, spec: &Value) -> Value {
    json!({
        "apiVersion": "fathom.dev/v1alpha1", "kind": "TracePolicy",
        "metadata": {"name": name}, "spec": spec,
    })
}

/// Specs that touch every rule, each aimed at the namespace's pods.
fn specs() -> Vec<Value> {
    let mut out: Vec<Value> = [
        json!({"kprobe": "tcp_v4_connect"}),
        json!({"kretprobe": "tcp_v4_connect"}),
        json!({"fentry": "vfs_read"}),
        json!({"fexit": "vfs_read"}),
        json!({"lsm": "file_open"}),
        json!({"rawTracepoint": "kfree_skb"}),
        json!({"rawTracepoint": " sys_enter "}),
        json!({"catalog": "tcp-connect-kprobe"}),
        json!({"catalog": "tcp-connect"}),
        json!({"catalog": "runqlat"}),
        json!({"catalog": "biolatency"}),
        json!({"tracepoint": "skb/kfree_skb"}),
        json!({"network": {"hook": "xdp", "interface": "eth0"}}),
        json!({"network": {"hook": " tc", "interface": "eth0"}}),
        json!({"network": {"hook": "cgroupSkb"}}),
        json!({"network": {"hook": "tc"}}),
        json!({"network": {"hook": "sockOps", "event": "rtt"}}),
        json!({"catalog": "pod-traffic"}),
    ]
    .into_iter()
    .map(|probe| json!({"probe": probe, "podSelector": {"matchLabels": {"app": "web"}}}))
    .collect();
    let base =
        || json!({"probe": {"catalog": "exec"}, "podSelector": {"matchLabels": {"app": "web"}}});
    for (key, value) in [
        ("events", json!({"last": 5, "payload": true})),
        ("events", json!({"last": 5, "payload": false})),
        ("limits", json!({"cpuPercent": 50})),
        ("limits", json!({"cpuPercent": 20, "mapEntries": 8192})),
        ("limits", json!({"mapEntries": 100000})),
        ("limits", json!({"eventsPerSecond": 100})),
    ] {
        let mut s = base();
        s[key] = value;
        out.push(s);
    }
    out
}

fn expected(spec: &Value, name: &str, policy: &TracePolicySpec) -> BTreeSet<String> {
    let spec: TraceJobSpec = serde_json::from_value(spec.clone()).expect("spec");
    spec.tenant_refusals_under(name, policy)
        .into_iter()
        .map(|r| r.message)
        .collect()
}

#[test]
fn the_defaults_refuse_at_admission_what_the_operator_refuses_in_its_words() {
    let defaults = vap("fathom-tenant-defaults");
    let mut refused = 0;
    for spec in specs() {
        let want = expected(&spec, "(none)", &TracePolicySpec::default());
        let got = defaults
            .refusals(&job(&spec), None, None, &namespace(None))
            .expect("a new job is judged");
        assert_eq!(got, want, "{spec}");
        refused += usize::from(!want.is_empty());
    }
    assert_eq!(refused, 12, "the table has 12 specs the defaults refuse");
}

#[test]
fn a_trace_policy_relaxes_and_tightens_the_rules_only_for_the_namespaces_naming_it() {
    let by_policy = vap("fathom-tenant-policy");
    let policies = [
        json!({}),
        json!({"allow": {"probeKinds": ["kprobe"], "payload": true}}),
        json!({"allow": {"probeKinds": ["kprobe", "kretprobe", "fentry", "fexit", "lsm", "rawTracepoint"], "kernelAddresses": true, "nodeTiming": true},
               "limits": {"maxCpuPercent": 20, "maxMapEntries": 8192, "defaultCpuPercent": 5}}),
        json!({"limits": {"maxMapEntries": 20000}}),
    ];
    let mut differs_from_defaults = 0;
    for p in &policies {
        let spec_of: TracePolicySpec = serde_json::from_value(p.clone()).expect("policy");
        for spec in specs() {
            let want = expected(&spec, "debug", &spec_of);
            let (o, ns) = (job(&spec), namespace(Some("debug")));
            let params = policy("debug", p);
            let got = by_policy
                .refusals(&o, None, Some(&params), &ns)
                .expect("a new job is judged");
            assert_eq!(got, want, "{spec} under {p}");
            differs_from_defaults +=
                usize::from(want != expected(&spec, "(none)", &TracePolicySpec::default()));
            // Another TracePolicy, which the namespace does not name, judges nothing.
            let other = policy("other", &json!({"limits": {"maxMapEntries": 1}}));
            assert_eq!(
                by_policy.refusals(&o, None, Some(&other), &ns),
                Some(BTreeSet::new()),
                "{spec}: a policy the namespace does not name refused it"
            );
        }
    }
    assert!(differs_from_defaults >= 12, "{differs_from_defaults}");
}

#[test]
fn an_update_that_keeps_the_spec_is_not_judged_so_finalizers_can_go() {
    let defaults = vap("fathom-tenant-defaults");
    let spec = json!({"probe": {"kprobe": "tcp_v4_connect"}, "podSelector": {"matchLabels": {"app": "web"}}});
    let old = job(&spec);
    let mut new = old.clone();
    new["metadata"]["finalizers"] = json!([]);
    assert_eq!(
        defaults.refusals(&new, Some(&old), None, &namespace(None)),
        None
    );
    // A changed spec is judged again.
    let mut edited = old.clone();
    edited["spec"]["probe"] = json!({"fentry": "vfs_read"});
    assert_eq!(
        defaults
            .refusals(&edited, Some(&old), None, &namespace(None))
            .map(|r| r.len()),
        Some(1)
    );
}
