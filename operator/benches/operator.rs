//! Benchmarks (not tests): planning time for 1,000 jobs × 5,000 nodes (B12), and API writes
//! per reconcile at steady state. Run: `cargo bench -p fathom-operator --bench operator`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::{collections::BTreeMap, time::Instant};

use fathom_operator::plan::{
    ClusterView, PlanInput, Targets, daemonset_default_tolerations, plan_assignments,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::core::Selector;
use support::{World, node, pod, ready_node};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn planning() {
    let zones = ["a", "b", "c", "d"];
    let nodes: Vec<_> = (0..5000)
        .map(|i| {
            let taints: &[(&str, &str)] = if i % 50 == 0 {
                &[("dedicated", "NoSchedule")]
            } else {
                &[]
            };
            node(
                &format!("node-{i:05}"),
                &[("zone", zones[i % 4]), ("kubernetes.io/os", "linux")],
                i % 97 != 0,
                taints,
            )
        })
        .collect();
    let pods: Vec<_> = (0..50_000)
        .map(|i| {
            pod(
                &format!("ns-{:03}", i % 100),
                &format!("pod-{i:06}"),
                &[("app", &format!("app-{}", i % 20))],
                &format!("node-{:05}", (i * 7) % 5000),
            )
        })
        .collect();
    let tolerations = daemonset_default_tolerations();
    let selectors: Vec<Selector> = (0..20)
        .map(|a| {
            Selector::try_from(LabelSelector {
                match_labels: Some(BTreeMap::from([("app".to_string(), format!("app-{a}"))])),
                ..Default::default()
            })
            .expect("selector")
        })
        .collect();
    let zone_sel: Vec<BTreeMap<String, String>> = zones
        .iter()
        .map(|z| BTreeMap::from([("zone".to_string(), z.to_string())]))
        .collect();
    let namespaces: Vec<String> = (0..100).map(|n| format!("ns-{n:03}")).collect();
    // 1,000 jobs: 500 node-wide ClusterTraceJobs (half with a nodeSelector), 500 TraceJobs
    // with a podSelector in their namespace.
    let jobs: Vec<PlanInput<'_>> = (0..1000)
        .map(|j| {
            if j % 2 == 0 {
                PlanInput {
                    namespace: None,
                    node_selector: if j % 4 == 0 {
                        Some(&zone_sel[j % 4 / 4 + (j / 4) % 4])
                    } else {
                        None
                    },
                    targets: Targets::NodeWide,
                }
            } else {
                PlanInput {
                    namespace: Some(&namespaces[j % 100]),
                    node_selector: None,
                    targets: Targets::Pods(selectors[j % 20].clone()),
                }
            }
        })
        .collect();

    let mut build = Vec::new();
    let mut plan = Vec::new();
    let mut assigned = 0usize;
    for _ in 0..5 {
        let t = Instant::now();
        let view = ClusterView::new(&nodes, &pods, &tolerations);
        build.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        assigned = jobs
            .iter()
            .map(|j| plan_assignments(j, &view).nodes.len())
            .sum();
        plan.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let (b, p) = (median(build), median(plan));
    println!("B12 planning, 1,000 jobs x 5,000 nodes (50,000 pods), median of 5:");
    println!("  index nodes and pods once:   {b:8.1} ms");
    println!(
        "  plan 1,000 jobs:             {p:8.1} ms  ({:.1} us/job, {assigned} assignments)",
        p * 1e3 / 1000.0
    );
    println!("  total:                       {:8.1} ms", b + p);
}

async fn steady_state_writes() {
    let mut w = World::new();
    let nodes = 100;
    for i in 0..nodes {
        let n = format!("n{i:03}");
        w.add_node(ready_node(&n));
        w.add_pod(pod("shop", &format!("web-{i:03}"), &[("app", "web")], &n));
    }
    let jobs = 20;
    for j in 0..jobs {
        w.create_job(&format!(
            "apiVersion: fathom.dev/v1alpha1\nkind: TraceJob\nmetadata: {{ name: job-{j}, namespace: shop }}\nspec:\n  probe: {{ tracepoint: skb/kfree_skb }}\n  podSelector: {{ matchLabels: {{ app: web }} }}\n  duration: 1h\n"
        ))
        .await;
        w.settle("shop", &format!("job-{j}")).await;
    }
    let report = |hits: u64| serde_json::json!({"phase": "Attached", "counters": fathom_crds::result::Totals { hits, ..Default::default() }});
    // Every runner attaches.
    for a in w.assignments("shop") {
        w.report(&a, report(1)).await;
    }
    for j in 0..jobs {
        w.settle("shop", &format!("job-{j}")).await;
    }
    let rounds = 10;
    w.api.clear_calls();
    let t = Instant::now();
    for _ in 0..rounds {
        for j in 0..jobs {
            w.reconcile("shop", &format!("job-{j}")).await;
        }
    }
    let took = t.elapsed();
    let reconciles = rounds * jobs;
    let writes = w.api.writes().len();
    let reads = w.api.calls().len() - writes;
    println!(
        "API writes per reconcile, {jobs} running jobs x {nodes} nodes, {reconciles} reconciles:"
    );
    println!(
        "  steady state (nothing changed):        {:.3} writes/reconcile ({writes} writes, {:.1} reads/reconcile, {:.2} ms/reconcile)",
        writes as f64 / reconciles as f64,
        reads as f64 / reconciles as f64,
        took.as_secs_f64() * 1e3 / reconciles as f64
    );
    // Every runner's counters move between two reconciles (the busiest case).
    let mut writes = 0;
    let assignments = w.assignments("shop");
    for round in 0..3u64 {
        for a in &assignments {
            w.report(a, report(10 + round)).await;
        }
        w.api.clear_calls();
        for j in 0..jobs {
            w.reconcile("shop", &format!("job-{j}")).await;
        }
        writes += w.api.writes().len();
    }
    let reconciles = 3 * jobs;
    println!(
        "  every node's counters changed:         {:.3} writes/reconcile (job status + TraceResult status), vs {} for one patch per node report",
        writes as f64 / reconciles as f64,
        nodes
    );
}

fn main() {
    planning();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(steady_state_writes());
}
