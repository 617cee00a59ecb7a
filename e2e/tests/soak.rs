//! RELIABILITY S4, the chaos soak, on the real cluster: an operator and a node runner as
//! processes on the real node, a control job counting a workload's opens for the whole soak,
//! and around it TraceJobs created and deleted — at least `FATHOM_SOAK_CYCLES` of them (60 in
//! the test command) and for at least `FATHOM_SOAK_SECONDS` (0; `scripts/soak.sh` runs 1,000
//! cycles and an hour) — while every 10 cycles the runner or the operator is killed with
//! `kill -9` and restarted, or the collector's connections are reset for a few seconds, in
//! turn, with a burst of the workload's opens each time.
//!
//! At the end: no job is left behind a stuck finalizer, no assignment of the namespace is
//! left, the kernel's programs and the runner's pins are back at their baseline, and the
//! control job counted exactly what the workload did, less what it reported lost.

use std::{collections::BTreeMap, path::Path, process::Command, time::Instant};

use anyhow::{anyhow, ensure};
use fathom_crds::{TraceAssignment, TraceJob, TraceResult, assignment::JOB_NAMESPACE_LABEL};
use fathom_e2e::{
    OPERATOR_NAMESPACE, Operator, OperatorOptions, ScriptDeployment, TestNamespace, admin,
    create_job, env, eventually, install_crds,
    runner::{RunnerOptions, fathom_programs, pins_of, remove_identity_pods},
    running_pods, secs,
};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams},
};
use serde_json::json;

/// The control workload's command name.
const COMM: &str = "fathom-soak-wl";
/// openat calls per burst.
const OPENS_PER_BURST: u64 = 200;

/// The control workload: one pod that, for k = 0, 1, …, waits for `/trigger/go-k`, opens a
/// file OPENS_PER_BURST times as COMM, and writes `/trigger/done-k`.
async fn control_workload(client: &Client, ns: &str, node: &str, dir: &Path) {
    let script = format!(
        "k=0; while true; do while [ ! -e /trigger/go-$k ]; do sleep 0.2; done; \
         /workload {COMM} open {OPENS_PER_BURST} /tmp/fathom-soak-marker && \
         touch /trigger/done-$k; k=$((k+1)); done"
    );
    ScriptDeployment {
        trigger: Some(dir),
        ..ScriptDeployment::new(ns, "control", node, &script)
    }
    .apply(client)
    .await;
}

/// The workload's bursts, counted.
struct Bursts<'a> {
    dir: &'a Path,
    done: u64,
}

impl Bursts<'_> {
    /// One burst of opens, waited for.
    async fn one(&mut self) {
        let k = self.done;
        std::fs::write(self.dir.join(format!("go-{k}")), b"go").expect("trigger file");
        let done = self.dir.join(format!("done-{k}"));
        eventually(secs(60), format!("burst {k} done"), async || {
            ensure!(done.exists(), "not yet");
            Ok(())
        })
        .await;
        self.done += 1;
    }

    fn opens(&self) -> u64 {
        self.done * OPENS_PER_BURST
    }
}

/// Connections to and from the collector's port reset (RST) for the guard's life.
struct ConnectionReset(u16);

impl ConnectionReset {
    fn rules(port: u16) -> [Vec<String>; 2] {
        let p = port.to_string();
        [["--dport", &p], ["--sport", &p]].map(|[dir, port]| {
            [
                "INPUT",
                "-i",
                "lo",
                "-p",
                "tcp",
                dir,
                port,
                "-j",
                "REJECT",
                "--reject-with",
                "tcp-reset",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect()
        })
    }

    fn new(port: u16) -> ConnectionReset {
        for rule in ConnectionReset::rules(port) {
            let ok = Command::new("iptables")
                .args(["-w", "-I"])
                .args(&rule)
                .status()
                .expect("iptables (the soak needs root and iptables)")
                .success();
            assert!(ok, "iptables -I {rule:?}");
        }
        ConnectionReset(port)
    }
}

impl Drop for ConnectionReset {
    fn drop(&mut self) {
        for rule in ConnectionReset::rules(self.0) {
            let _ = Command::new("iptables")
                .args(["-w", "-D"])
                .args(&rule)
                .status();
        }
    }
}

async fn start_operator(client: &Client, port: Option<u16>, n: u32) -> Operator {
    let mut opts = OperatorOptions::new("soak");
    opts.collector = true;
    opts.collector_port = port;
    opts.log_name = format!("soak-operator-{n}");
    opts.start(client).await
}

#[tokio::test]
async fn s4_chaos_soak_ends_at_baseline_with_the_control_count_exact() {
    let cycles: u32 = std::env::var("FATHOM_SOAK_CYCLES")
        .ok()
        .map(|v| v.parse().expect("FATHOM_SOAK_CYCLES: a number"))
        .unwrap_or(60);
    let min_seconds: u64 = std::env::var("FATHOM_SOAK_SECONDS")
        .ok()
        .map(|v| v.parse().expect("FATHOM_SOAK_SECONDS: a number"))
        .unwrap_or(0);
    assert!(cycles >= 30, "FATHOM_SOAK_CYCLES: at least 30");
    let client = admin().await;
    install_crds(&client).await;
    let ns = TestNamespace::create(&client, "soak").await;
    let ns = ns.as_str().to_string();
    let node = env().real_node.clone();
    let dir = env().state.join("e2e-trigger").join("soak");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("trigger dir");
    control_workload(&client, &ns, &node, &dir).await;
    running_pods(&client, &ns, "control", 1).await;
    let programs_before = fathom_programs();
    let started = Instant::now();

    let mut restarts = 0;
    let mut operator = start_operator(&client, None, restarts).await;
    let cport = operator.collector_port.expect("collector port");
    let mut runner = RunnerOptions::new(&node, cport).start(&client).await;
    let jobs = Api::<TraceJob>::namespaced(client.clone(), &ns);
    let spec = json!({
        "probe": {"tracepoint": "syscalls/sys_enter_openat"},
        "aggregate": {"by": ["pod", "comm"]},
        "podSelector": {"matchLabels": {"app": "control"}},
    });
    create_job(&client, &ns, "control", spec.clone()).await;
    eventually(secs(60), "the control job attached", async || {
        ensure!(
            fathom_programs().len() > programs_before.len(),
            "no program yet"
        );
        Ok(())
    })
    .await;
    let mut bursts = Bursts { dir: &dir, done: 0 };
    bursts.one().await;

    let mut faults: BTreeMap<&str, u32> = BTreeMap::new();
    let mut i: u32 = 0;
    while i < cycles || started.elapsed() < secs(min_seconds) {
        let name = format!("churn-{i}");
        create_job(&client, &ns, &name, spec.clone()).await;
        // Deleted at once, or once its assignment exists: both races, in turn.
        if i % 2 == 1 {
            let assignments =
                Api::<TraceAssignment>::namespaced(client.clone(), OPERATOR_NAMESPACE);
            let selector = format!("{JOB_NAMESPACE_LABEL}={ns}");
            let _ = tokio::time::timeout(secs(5), async {
                loop {
                    let n = assignments
                        .list(&ListParams::default().labels(&selector))
                        .await
                        .map(|l| l.items.len())
                        .unwrap_or(0);
                    if n >= 2 {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            })
            .await;
        }
        jobs.delete(&name, &DeleteParams::default())
            .await
            .unwrap_or_else(|e| panic!("deleting {name}: {e}"));
        if i % 10 == 9 {
            let fault = match (i / 10) % 3 {
                0 => {
                    // kill -9 of the runner: the pinned probes keep counting without it.
                    runner.kill();
                    bursts.one().await;
                    runner = RunnerOptions::new(&node, cport).start(&client).await;
                    "runner kill -9"
                }
                1 => {
                    // kill -9 of the operator: the runner spools until its collector is back.
                    operator.kill();
                    bursts.one().await;
                    restarts += 1;
                    operator = start_operator(&client, Some(cport), restarts).await;
                    "operator kill -9"
                }
                _ => {
                    let reset = ConnectionReset::new(cport);
                    bursts.one().await;
                    tokio::time::sleep(secs(3)).await;
                    drop(reset);
                    "collector connections reset"
                }
            };
            *faults.entry(fault).or_default() += 1;
        }
        i += 1;
    }
    bursts.one().await;

    // No job is left behind a finalizer: every churn job is gone.
    eventually(secs(180), "every churn job gone", async || {
        let left: Vec<String> = jobs
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter_map(|j| j.metadata.name)
            .filter(|n| n != "control")
            .collect();
        ensure!(left.is_empty(), "left: {left:?}");
        Ok(())
    })
    .await;
    // The control job counted every open, less what it reported lost.
    let results = Api::<TraceResult>::namespaced(client.clone(), &ns);
    let truth = bursts.opens();
    eventually(
        secs(90),
        format!("the control count at {truth}"),
        async || {
            let r = results.get("control").await?;
            let s = r.status.ok_or_else(|| anyhow!("no status"))?;
            let counted: u64 = s
                .data
                .rows
                .iter()
                .filter(|r| r.keys.get("comm").map(String::as_str) == Some(COMM))
                .map(|r| r.value)
                .sum();
            let t = &s.data.totals;
            let lost = t.map_full + t.rate_limited;
            ensure!(
                counted + lost == truth,
                "counted {counted} + lost {lost} != {truth} opens"
            );
            ensure!(lost == 0, "lost {lost}: {t:?}");
            Ok(())
        },
    )
    .await;
    jobs.delete("control", &DeleteParams::default())
        .await
        .expect("deleting the control job");
    eventually(secs(60), "the control job gone", async || {
        ensure!(jobs.get_opt("control").await?.is_none(), "still there");
        Ok(())
    })
    .await;
    // Baseline: no program, link or pin of ours; no assignment of the namespace.
    eventually(
        secs(30),
        "kernel objects and pins at baseline",
        async || {
            let programs = fathom_programs();
            ensure!(
                programs == programs_before,
                "programs {programs:?}, before {programs_before:?}"
            );
            let p = pins_of(&node);
            ensure!(p.is_empty(), "pins {p:?}");
            Ok(())
        },
    )
    .await;
    let selector = format!("{JOB_NAMESPACE_LABEL}={ns}");
    let left = Api::<TraceAssignment>::namespaced(client.clone(), OPERATOR_NAMESPACE)
        .list(&ListParams::default().labels(&selector))
        .await
        .expect("listing assignments")
        .items;
    assert!(left.is_empty(), "assignments left: {left:?}");
    eprintln!(
        "S4 soak: {i} create/delete cycles, {} bursts ({truth} opens, counted exactly), faults {faults:?}, {:.0} s",
        bursts.done,
        started.elapsed().as_secs_f64()
    );
    drop(runner);
    drop(operator);
    remove_identity_pods(&client, std::slice::from_ref(&node)).await;
    let _ = std::fs::remove_dir_all(&dir);
}
