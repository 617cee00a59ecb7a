//! The loop's figures on the local cluster (a benchmark, not a test: it prints, it asserts
//! nothing about time):
//!
//! - kernel event → TraceResult latency: a burst of openat calls on the host, then the time
//!   until the job's TraceResult counts all of them (runner report interval + collector pacing
//!   + API write), over several rounds;
//! - the runner's resident memory idle (watching, no assignment) and under a busy job (every
//!   syscall of the node counted by comm and pid).
//!
//! Run it against `scripts/cluster.sh up`:
//! `eval "$(scripts/cluster.sh env)"; cargo bench -p fathom-e2e --bench loop`
//! (`FATHOM_BENCH_REPORT_INTERVAL` sets the runner's --report-interval, default 2 as shipped).

use std::{
    process::Command,
    time::{Duration, Instant},
};

use fathom_crds::{ClusterTraceJob, TraceResult};
use fathom_e2e::{
    ClusterJobGuard, OperatorOptions, admin, env, install_crds,
    runner::{RunnerOptions, remove_identity_pods},
};
use kube::{
    Api,
    api::{DeleteParams, PostParams},
};
use serde_json::json;

const COMM: &str = "fathom-bench-wl";

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn workload() -> std::path::PathBuf {
    env().state.join("images/workload")
}

fn opens(n: u64) {
    let out = Command::new(workload())
        .args([COMM, "open", &n.to_string(), "/tmp/fathom-bench-marker"])
        .output()
        .expect("workload (scripts/cluster.sh builds it)");
    assert!(out.status.success(), "{out:?}");
}

async fn job(api: &Api<ClusterTraceJob>, name: &str, spec: serde_json::Value) {
    let job: ClusterTraceJob = serde_json::from_value(json!({
        "apiVersion": "fathom.dev/v1alpha1", "kind": "ClusterTraceJob",
        "metadata": {"name": name}, "spec": spec,
    }))
    .expect("job");
    api.create(&PostParams::default(), &job)
        .await
        .expect("creating the ClusterTraceJob");
}

/// The count of COMM's row in the job's TraceResult, 0 before there is one.
async fn counted(results: &Api<TraceResult>, name: &str) -> u64 {
    let Ok(r) = results.get(&format!("cluster.{name}")).await else {
        return 0;
    };
    r.status
        .map(|s| {
            s.data
                .rows
                .iter()
                .filter(|row| row.keys.get("comm").map(String::as_str) == Some(COMM))
                .map(|row| row.value)
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let client = admin().await;
    install_crds(&client).await;
    let node = env().real_node.clone();
    let interval: u64 = std::env::var("FATHOM_BENCH_REPORT_INTERVAL")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let mut opts = OperatorOptions::new("bench-loop");
    opts.collector = true;
    let operator = opts.start(&client).await;
    let cport = operator.collector_port.expect("collector port");
    let mut ropts = RunnerOptions::new(&node, cport);
    ropts.report_interval = interval;
    ropts.status_interval = 30;
    let runner = ropts.start(&client).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle = rss_kib(runner.pid());

    let api = Api::<ClusterTraceJob>::all(client.clone());
    let results = Api::<TraceResult>::namespaced(client.clone(), fathom_e2e::OPERATOR_NAMESPACE);
    let name = "bench-latency";
    let guard = ClusterJobGuard { name: name.into() };
    job(
        &api,
        name,
        json!({
            "probe": {"tracepoint": "syscalls/sys_enter_openat"},
            "aggregate": {"by": ["comm"]},
            "filter": {"comm": COMM},
            "nodeSelector": {"kubernetes.io/hostname": node},
            "duration": "10m",
        }),
    )
    .await;
    // Attached once a first burst is counted.
    let start = Instant::now();
    loop {
        opens(1);
        tokio::time::sleep(Duration::from_millis(500)).await;
        if counted(&results, name).await > 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the job never counted"
        );
    }
    // Opens made before the probe attached were never seen: the baseline is what the
    // result holds once the last of these opens had time to arrive.
    tokio::time::sleep(Duration::from_secs(interval + 2)).await;
    let mut total = counted(&results, name).await;
    let mut latencies = Vec::new();
    for round in 0..8 {
        // Spread the bursts over the report cycle.
        tokio::time::sleep(Duration::from_millis(700 + 300 * round)).await;
        let burst = 100;
        opens(burst);
        let sent = Instant::now();
        let want = total + burst;
        loop {
            let got = counted(&results, name).await;
            if got >= want {
                total = got;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert!(
                sent.elapsed() < Duration::from_secs(60),
                "burst {round} never counted: the result holds {got}, {want} were made"
            );
        }
        latencies.push(sent.elapsed());
    }
    api.delete(name, &DeleteParams::default()).await.ok();
    drop(guard);

    // A busy job: every syscall of the node by comm and pid, with a syscall flood running.
    let busy_name = "bench-busy";
    let busy_guard = ClusterJobGuard {
        name: busy_name.into(),
    };
    job(
        &api,
        busy_name,
        json!({
            "probe": {"catalog": "syscalls"},
            "aggregate": {"by": ["comm", "pid", "syscall"]},
            "events": {"last": 100},
            "nodeSelector": {"kubernetes.io/hostname": node},
            "duration": "10m",
        }),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let flood = Command::new(workload())
        .args([COMM, "pace", "50000", "15"])
        .spawn()
        .expect("flood");
    let mut busy_max = 0;
    for _ in 0..15 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        busy_max = busy_max.max(rss_kib(runner.pid()));
    }
    let _ = flood.wait_with_output();
    api.delete(busy_name, &DeleteParams::default()).await.ok();
    drop(busy_guard);
    drop(runner);
    drop(operator);
    remove_identity_pods(&client, std::slice::from_ref(&node)).await;

    latencies.sort();
    let ms = |d: &Duration| d.as_millis();
    println!("runner --report-interval {interval} s, collector pacing 1 s");
    println!(
        "kernel event → TraceResult latency over {} bursts: min {} ms, median {} ms, max {} ms (target ≤ 2000 ms)",
        latencies.len(),
        ms(&latencies[0]),
        ms(&latencies[latencies.len() / 2]),
        ms(latencies.last().expect("rounds"))
    );
    println!(
        "runner RSS: idle {:.1} MiB (target ≤ 30 MiB); busy job (syscalls by comm,pid,syscall + 50k/s flood) max {:.1} MiB",
        idle as f64 / 1024.0,
        busy_max as f64 / 1024.0
    );
}
