//! Planning, without any API: selectors, taints, readiness, namespaces, pods moving, zero and
//! thousands of nodes; then properties over random clusters.

mod support;

use std::collections::BTreeMap;

use fathom_operator::plan::{
    ClusterView, Exclusion, PlanInput, Targets, daemonset_default_tolerations, plan_assignments,
    tolerates,
};
use k8s_openapi::{
    api::core::v1::{Node, Pod, Taint, Toleration},
    apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement},
};
use kube::core::Selector;
use proptest::prelude::*;
use support::{node, pod};

fn sel(labels: &[(&str, &str)]) -> Targets {
    let ls = LabelSelector {
        match_labels: Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        ..Default::default()
    };
    Targets::Pods(Selector::try_from(ls).expect("selector"))
}

fn input<'a>(
    ns: Option<&'a str>,
    node_selector: Option<&'a BTreeMap<String, String>>,
    targets: Targets,
) -> PlanInput<'a> {
    PlanInput {
        namespace: ns,
        node_selector,
        targets,
    }
}

fn tol() -> Vec<Toleration> {
    daemonset_default_tolerations()
}

fn names<'a>(plan: &fathom_operator::plan::Plan<'a>) -> Vec<&'a str> {
    plan.nodes.keys().copied().collect()
}

#[test]
fn zero_nodes_plan_nothing() {
    let (nodes, pods): (Vec<Node>, Vec<Pod>) = (vec![], vec![]);
    let t = tol();
    let view = ClusterView::new(&nodes, &pods, &t);
    let p = plan_assignments(&input(None, None, Targets::NodeWide), &view);
    assert!(p.nodes.is_empty() && p.excluded.is_empty());
    let p = plan_assignments(&input(Some("a"), None, sel(&[("app", "x")])), &view);
    assert!(p.nodes.is_empty());
}

#[test]
fn node_wide_respects_readiness_taints_and_node_selector() {
    let nodes = vec![
        node("a", &[("zone", "1")], true, &[]),
        node("b", &[("zone", "2")], true, &[]),
        node("c", &[("zone", "1")], false, &[]),
        node("d", &[("zone", "1")], true, &[("gpu", "NoSchedule")]),
        node("e", &[("zone", "1")], true, &[("gpu", "NoExecute")]),
        node("f", &[("zone", "1")], true, &[("soft", "PreferNoSchedule")]),
        node(
            "g",
            &[("zone", "1")],
            true,
            &[("node.kubernetes.io/unschedulable", "NoSchedule")],
        ),
        node(
            "h",
            &[("zone", "1")],
            true,
            &[("node.kubernetes.io/disk-pressure", "NoSchedule")],
        ),
    ];
    let pods: Vec<Pod> = vec![];
    let t = tol();
    let view = ClusterView::new(&nodes, &pods, &t);
    let zone1 = BTreeMap::from([("zone".to_string(), "1".to_string())]);
    let p = plan_assignments(&input(None, Some(&zone1), Targets::NodeWide), &view);
    assert_eq!(names(&p), ["a", "f", "g", "h"]);
    assert!(p.node_wide);
    let excluded: BTreeMap<&str, Exclusion> = p.excluded.iter().copied().collect();
    assert_eq!(excluded["b"], Exclusion::NodeSelector);
    assert_eq!(excluded["c"], Exclusion::NotReady);
    assert_eq!(excluded["d"], Exclusion::Untolerated("gpu"));
    assert_eq!(excluded["e"], Exclusion::Untolerated("gpu"));

    // The runner DaemonSet tolerating `gpu` brings d and e in.
    let mut t = tol();
    t.push(Toleration {
        key: Some("gpu".into()),
        operator: Some("Exists".into()),
        ..Default::default()
    });
    let view = ClusterView::new(&nodes, &pods, &t);
    let p = plan_assignments(&input(None, Some(&zone1), Targets::NodeWide), &view);
    assert_eq!(names(&p), ["a", "d", "e", "f", "g", "h"]);
}

#[test]
fn toleration_rules_follow_kubernetes() {
    let taint = Taint {
        key: "k".into(),
        value: Some("v".into()),
        effect: "NoSchedule".into(),
        ..Default::default()
    };
    let t = |key: Option<&str>, op: Option<&str>, value: Option<&str>, effect: Option<&str>| {
        Toleration {
            key: key.map(Into::into),
            operator: op.map(Into::into),
            value: value.map(Into::into),
            effect: effect.map(Into::into),
            ..Default::default()
        }
    };
    assert!(
        tolerates(&t(Some("k"), None, Some("v"), None), &taint),
        "Equal is the default operator"
    );
    assert!(!tolerates(&t(Some("k"), None, Some("w"), None), &taint));
    assert!(tolerates(
        &t(Some("k"), Some("Exists"), None, Some("NoSchedule")),
        &taint
    ));
    assert!(!tolerates(
        &t(Some("k"), Some("Exists"), None, Some("NoExecute")),
        &taint
    ));
    assert!(
        tolerates(&t(None, Some("Exists"), None, None), &taint),
        "empty key + Exists tolerates everything"
    );
    assert!(!tolerates(&t(None, None, None, None), &taint));
    assert!(!tolerates(
        &t(Some("other"), Some("Exists"), None, None),
        &taint
    ));
}

#[test]
fn pod_targets_pick_the_nodes_of_matching_pods_and_list_them() {
    let nodes = vec![
        node("a", &[], true, &[]),
        node("b", &[], true, &[]),
        node("c", &[], true, &[]),
    ];
    let pods = vec![
        pod("shop", "web-2", &[("app", "web")], "a"),
        pod("shop", "web-1", &[("app", "web")], "a"),
        pod("shop", "web-3", &[("app", "web"), ("tier", "x")], "b"),
        pod("shop", "db", &[("app", "db")], "c"),
        pod("else", "web-9", &[("app", "web")], "c"),
    ];
    let t = tol();
    let view = ClusterView::new(&nodes, &pods, &t);
    let p = plan_assignments(&input(Some("shop"), None, sel(&[("app", "web")])), &view);
    assert_eq!(names(&p), ["a", "b"]);
    let on_a: Vec<String> = p.targets("a").into_iter().map(|t| t.name).collect();
    assert_eq!(on_a, ["web-1", "web-2"], "sorted");
    assert_eq!(p.pod_count, 3);
    // A cluster job with the same selector sees every namespace.
    let p = plan_assignments(&input(None, None, sel(&[("app", "web")])), &view);
    assert_eq!(names(&p), ["a", "b", "c"]);
    assert_eq!(p.targets("c")[0].namespace, "else");
    // matchExpressions.
    let ls = LabelSelector {
        match_expressions: Some(vec![LabelSelectorRequirement {
            key: "tier".into(),
            operator: "Exists".into(),
            values: None,
        }]),
        ..Default::default()
    };
    let p = plan_assignments(
        &input(
            Some("shop"),
            None,
            Targets::Pods(Selector::try_from(ls).expect("sel")),
        ),
        &view,
    );
    assert_eq!(names(&p), ["b"]);
}

#[test]
fn finished_terminating_and_unscheduled_pods_are_not_targets() {
    let nodes = vec![node("a", &[], true, &[])];
    let mut done = pod("shop", "done", &[("app", "web")], "a");
    done.status.as_mut().expect("status").phase = Some("Succeeded".into());
    let mut going = pod("shop", "going", &[("app", "web")], "a");
    going.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        jiff::Timestamp::UNIX_EPOCH,
    ));
    let mut pending = pod("shop", "pending", &[("app", "web")], "a");
    pending.spec.as_mut().expect("spec").node_name = None;
    let pods = vec![done, going, pending];
    let t = tol();
    let view = ClusterView::new(&nodes, &pods, &t);
    let p = plan_assignments(&input(Some("shop"), None, sel(&[("app", "web")])), &view);
    assert!(p.nodes.is_empty());
}

#[test]
fn pods_on_ineligible_or_unknown_nodes_are_reported_as_excluded() {
    let nodes = vec![
        node("a", &[], true, &[]),
        node("b", &[], false, &[]),
        node("c", &[("os", "windows")], true, &[]),
    ];
    let pods = vec![
        pod("shop", "w1", &[("app", "web")], "a"),
        pod("shop", "w2", &[("app", "web")], "b"),
        pod("shop", "w3", &[("app", "web")], "c"),
        pod("shop", "w4", &[("app", "web")], "ghost"),
    ];
    let t = tol();
    let view = ClusterView::new(&nodes, &pods, &t);
    let linux = BTreeMap::from([("os".to_string(), "linux".to_string())]);
    let p = plan_assignments(&input(Some("shop"), None, sel(&[("app", "web")])), &view);
    assert_eq!(names(&p), ["a", "c"]);
    let p = plan_assignments(
        &input(Some("shop"), Some(&linux), sel(&[("app", "web")])),
        &view,
    );
    assert!(p.nodes.is_empty());
    let excluded: Vec<(&str, &str)> = p.excluded.iter().map(|(n, e)| (*n, e.reason())).collect();
    assert_eq!(
        excluded,
        [
            ("a", "NodeSelector"),
            ("b", "NotReady"),
            ("c", "NodeSelector"),
            ("ghost", "NodeUnknown")
        ]
    );
}

#[test]
fn a_pod_moving_between_nodes_moves_the_plan() {
    let nodes = vec![node("a", &[], true, &[]), node("b", &[], true, &[])];
    let t = tol();
    let before = vec![pod("shop", "w", &[("app", "web")], "a")];
    let after = vec![pod("shop", "w", &[("app", "web")], "b")];
    let v1 = ClusterView::new(&nodes, &before, &t);
    let v2 = ClusterView::new(&nodes, &after, &t);
    let i = input(Some("shop"), None, sel(&[("app", "web")]));
    assert_eq!(names(&plan_assignments(&i, &v1)), ["a"]);
    assert_eq!(names(&plan_assignments(&i, &v2)), ["b"]);
}

#[test]
fn thousands_of_nodes() {
    let nodes: Vec<Node> = (0..5000)
        .map(|i| {
            node(
                &format!("node-{i:05}"),
                &[("zone", if i % 2 == 0 { "a" } else { "b" })],
                i % 100 != 0,
                &[],
            )
        })
        .collect();
    let pods: Vec<Pod> = (0..20_000)
        .map(|i| {
            pod(
                &format!("ns-{}", i % 10),
                &format!("p-{i}"),
                &[("app", if i % 3 == 0 { "web" } else { "db" })],
                &format!("node-{:05}", i % 5000),
            )
        })
        .collect();
    let t = tol();
    let view = ClusterView::new(&nodes, &pods, &t);
    let zone_a = BTreeMap::from([("zone".to_string(), "a".to_string())]);
    let p = plan_assignments(&input(None, Some(&zone_a), Targets::NodeWide), &view);
    assert_eq!(p.nodes.len(), 2500 - 50);
    let p = plan_assignments(&input(Some("ns-3"), None, sel(&[("app", "web")])), &view);
    let expected: usize = (0..20_000)
        .filter(|i| i % 10 == 3 && i % 3 == 0 && (i % 5000) % 100 != 0)
        .count();
    assert_eq!(p.pod_count, expected);
}

// ---------------------------------------------------------------- properties

#[derive(Debug, Clone)]
struct World {
    nodes: Vec<(u8, u8, bool, Option<u8>)>, // (index, zone, ready, taint key index)
    pods: Vec<(u8, u8, u8, u8)>,            // (namespace, app, node index (may be missing), index)
}

fn world() -> impl Strategy<Value = World> {
    (
        prop::collection::vec((0u8..3, any::<bool>(), prop::option::of(0u8..3)), 0..40),
        prop::collection::vec((0u8..3, 0u8..3, 0u8..45), 0..120),
    )
        .prop_map(|(nodes, pods)| World {
            nodes: nodes
                .into_iter()
                .enumerate()
                .map(|(i, (z, r, t))| (i as u8, z, r, t))
                .collect(),
            pods: pods
                .into_iter()
                .enumerate()
                .map(|(i, (ns, app, n))| (ns, app, n, i as u8))
                .collect(),
        })
}

const TAINTS: [&str; 3] = ["dedicated", "node.kubernetes.io/memory-pressure", "gpu"];

fn build(w: &World) -> (Vec<Node>, Vec<Pod>) {
    let nodes = w
        .nodes
        .iter()
        .map(|(i, z, ready, taint)| {
            let taints: Vec<(&str, &str)> = taint
                .map(|t| (TAINTS[t as usize], "NoSchedule"))
                .into_iter()
                .collect();
            node(
                &format!("n{i}"),
                &[("zone", &z.to_string())],
                *ready,
                &taints,
            )
        })
        .collect();
    let pods = w
        .pods
        .iter()
        .map(|(ns, app, n, i)| {
            pod(
                &format!("ns{ns}"),
                &format!("p{i}"),
                &[("app", &app.to_string())],
                &format!("n{n}"),
            )
        })
        .collect();
    (nodes, pods)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn plans_are_sound_complete_and_isolated(w in world(), ns in 0u8..3, app in 0u8..3, zone in prop::option::of(0u8..3), cluster in any::<bool>()) {
        let (nodes, pods) = build(&w);
        let t = tol();
        let view = ClusterView::new(&nodes, &pods, &t);
        let ns_name = format!("ns{ns}");
        let zone_sel = zone.map(|z| BTreeMap::from([("zone".to_string(), z.to_string())]));
        let i = input(if cluster { None } else { Some(&ns_name) }, zone_sel.as_ref(), sel(&[("app", &app.to_string())]));
        let plan = plan_assignments(&i, &view);
        let eligible = |n: &str| {
            w.nodes.iter().any(|(idx, z, ready, taint)| {
                format!("n{idx}") == n && *ready
                    && taint.is_none_or(|t| TAINTS[t as usize] == "node.kubernetes.io/memory-pressure")
                    && zone.is_none_or(|zz| zz == *z)
            })
        };
        // Sound: every planned node is eligible; every target matches, is in scope and on it.
        for (node, targets) in &plan.nodes {
            prop_assert!(eligible(node), "{node} is not eligible");
            prop_assert!(!targets.is_empty());
            for p in targets {
                prop_assert_eq!(p.node, *node);
                prop_assert!(cluster || p.namespace == ns_name, "namespace isolation");
                let (_, a, _, _) = w.pods.iter().find(|(_, _, _, idx)| format!("p{idx}") == p.name).expect("pod");
                prop_assert_eq!(*a, app);
            }
        }
        // Complete: every matching pod on an eligible node is planned, the others' nodes are
        // excluded.
        for (pns, papp, pn, idx) in &w.pods {
            if *papp != app || (!cluster && *pns != ns) {
                continue;
            }
            let n = format!("n{pn}");
            let planned = plan.nodes.get(n.as_str()).is_some_and(|ps| ps.iter().any(|p| p.name == format!("p{idx}")));
            if eligible(&n) {
                prop_assert!(planned, "p{idx} on {n} missing");
            } else {
                prop_assert!(!planned);
                prop_assert!(plan.excluded.iter().any(|(x, _)| *x == n), "{n} not reported as excluded");
            }
        }
    }

    #[test]
    fn plans_do_not_depend_on_input_order(w in world(), app in 0u8..3) {
        let (nodes, pods) = build(&w);
        let (mut rnodes, mut rpods) = (nodes.clone(), pods.clone());
        rnodes.reverse();
        rpods.reverse();
        let t = tol();
        let (v1, v2) = (ClusterView::new(&nodes, &pods, &t), ClusterView::new(&rnodes, &rpods, &t));
        let i = input(None, None, sel(&[("app", &app.to_string())]));
        let (a, b) = (plan_assignments(&i, &v1), plan_assignments(&i, &v2));
        prop_assert_eq!(&a, &b);
        let wide = input(None, None, Targets::NodeWide);
        prop_assert_eq!(plan_assignments(&wide, &v1), plan_assignments(&wide, &v2));
    }

    #[test]
    fn node_wide_plans_partition_the_nodes(w in world(), zone in prop::option::of(0u8..3)) {
        let (nodes, pods) = build(&w);
        let t = tol();
        let view = ClusterView::new(&nodes, &pods, &t);
        let zone_sel = zone.map(|z| BTreeMap::from([("zone".to_string(), z.to_string())]));
        let plan = plan_assignments(&input(None, zone_sel.as_ref(), Targets::NodeWide), &view);
        prop_assert_eq!(plan.nodes.len() + plan.excluded.len(), nodes.len());
        prop_assert!(plan.nodes.values().all(Vec::is_empty));
    }
}
