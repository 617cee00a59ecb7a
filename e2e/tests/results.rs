//! The product's loop on the real cluster: a TraceJob applied → the operator plans it → real
//! `fathom-node-runner` processes attach real eBPF on this kernel → they stream cumulative
//! reports over TLS to the operator's collector, authenticated by tokens bound to their node →
//! the collector merges them → `kubectl get results` shows exactly what the kernel saw.
//!
//! The workload: pods of the image `fathom.local/workload:1` (scripts/cluster.sh builds it
//! from node-runner/tests/workload/workload.c) wait for a trigger file on a hostPath, then open
//! a file exactly N times and call `fathom_target()` exactly M times under a known command
//! name. Decoys do the same work and must not be counted: pods of the same namespace that the
//! job does not select, and a process on the host.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{anyhow, ensure};
use fathom_crds::{ClusterTraceJob, JobPhase, TraceJob, TraceResult, result::Row};
use fathom_e2e::{
    ClusterJobGuard, OPERATOR_NAMESPACE, Operator, OperatorOptions, ScriptDeployment,
    TestNamespace, admin, env, eventually, install_crds, kubectl_ok,
    runner::{NodeRunner, RunnerOptions, fathom_programs, remove_identity_pods},
    running_pods, secs,
};
use kube::{Api, Client, ResourceExt, api::PostParams};
use serde_json::{Value, json};

/// openat calls per workload process.
const N_OPENS: u64 = 250;
/// fathom_target() calls per workload process.
const M_CALLS: u64 = 170;
/// The workload's command name (what the jobs count by).
const COMM: &str = "fathom-e2e-wl";

/// The trigger directory of a test on this machine (a hostPath of its pods), made empty.
fn trigger_dir(test: &str) -> PathBuf {
    let dir = env().state.join("e2e-trigger").join(test);
    // Empty: a trigger left by an earlier run would start the pods at once.
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("trigger dir");
    dir
}

/// A Deployment of `replicas` workload pods labelled `app: <app>` on `node`: each waits for
/// `/trigger/go`, does N opens of `/tmp/fathom-e2e-marker` and M calls of fathom_target() as
/// COMM, writes `/trigger/done-<pod>`, then sleeps.
async fn workload(client: &Client, ns: &str, app: &str, replicas: i32, node: &str, dir: &Path) {
    let script = format!(
        "while [ ! -e /trigger/go ]; do sleep 1; done; \
         /workload {COMM} open {N_OPENS} /tmp/fathom-e2e-marker && \
         /workload {COMM} call {M_CALLS} && touch /trigger/done-$HOSTNAME; exec sleep 3600"
    );
    ScriptDeployment {
        replicas,
        trigger: Some(dir),
        ..ScriptDeployment::new(ns, app, node, &script)
    }
    .apply(client)
    .await;
}

/// The operator as a process serving its collector (TLS); returns it and the collector's port.
async fn operator_with_collector(client: &Client, test: &str) -> (Operator, u16) {
    let mut opts = OperatorOptions::new(test);
    opts.collector = true;
    let operator = opts.start(client).await;
    let port = operator.collector_port.expect("collector port");
    (operator, port)
}

/// The host's copy of the workload binary (the image's is built from the same source).
fn host_workload() -> PathBuf {
    let path = env().state.join("images/workload");
    assert!(
        path.is_file(),
        "{} is missing: scripts/cluster.sh up builds it with the workload image",
        path.display()
    );
    path
}

/// Runs the decoy on the host: the same opens and calls under the same command name.
fn host_decoy() {
    let bin = host_workload();
    for args in [
        vec![COMM, "open", &N_OPENS.to_string(), "/tmp/fathom-e2e-marker"],
        vec![COMM, "call", &M_CALLS.to_string()],
    ] {
        let out = Command::new(&bin).args(&args).output().expect("host decoy");
        assert!(out.status.success(), "host decoy {args:?}: {out:?}");
    }
}

/// Starts the workload of every pod waiting on `dir` and waits until `pods` are done.
async fn trigger(dir: &Path, pods: &[String]) {
    std::fs::write(dir.join("go"), b"go").expect("trigger file");
    eventually(
        secs(60),
        format!("workload pods {pods:?} done"),
        async || {
            let missing: Vec<&String> = pods
                .iter()
                .filter(|p| !dir.join(format!("done-{p}")).exists())
                .collect();
            ensure!(missing.is_empty(), "not done: {missing:?}");
            Ok(())
        },
    )
    .await;
}

async fn wait_phase<K>(api: &Api<K>, name: &str, phase: JobPhase, timeout_s: u64) -> K
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + JobStatus,
{
    eventually(
        secs(timeout_s),
        format!("job {name} {phase:?}"),
        async || {
            let job = api.get(name).await?;
            let got = job.phase();
            ensure!(got == Some(phase), "phase {got:?}: {}", job.describe());
            Ok(job)
        },
    )
    .await
}

/// The phase of either kind of job.
trait JobStatus {
    fn phase(&self) -> Option<JobPhase>;
    fn describe(&self) -> String;
}

impl JobStatus for TraceJob {
    fn phase(&self) -> Option<JobPhase> {
        self.status.as_ref().and_then(|s| s.phase)
    }
    fn describe(&self) -> String {
        serde_json::to_string(&self.status).unwrap_or_default()
    }
}

impl JobStatus for ClusterTraceJob {
    fn phase(&self) -> Option<JobPhase> {
        self.status.as_ref().and_then(|s| s.phase)
    }
    fn describe(&self) -> String {
        serde_json::to_string(&self.status).unwrap_or_default()
    }
}

/// Waits until every assignment of the job is Attached (so the workload runs with the probes
/// in place).
async fn wait_attached(job_ns: Option<&str>, job: &str, kind: &str, nodes: usize) {
    // Every assignment lives in the operator's namespace, whatever the job's.
    let ns = OPERATOR_NAMESPACE;
    let mut selector = format!("fathom.dev/job={job},fathom.dev/job-kind={kind}");
    if let Some(job_ns) = job_ns {
        selector.push_str(&format!(",fathom.dev/job-namespace={job_ns}"));
    }
    eventually(
        secs(90),
        format!("{nodes} assignment(s) of {job} Attached"),
        async || {
            let out = kubectl_ok(&[
                "-n",
                ns,
                "get",
                "traceassignments.fathom.dev",
                "-l",
                &selector,
                "-o",
                "jsonpath={range .items[*]}{.spec.nodeName}={.status.phase}{\"\\n\"}{end}",
            ]);
            let phases: Vec<&str> = out.lines().filter(|l| !l.is_empty()).collect();
            ensure!(
                phases.len() == nodes && phases.iter().all(|l| l.ends_with("=Attached")),
                "{phases:?}"
            );
            Ok(())
        },
    )
    .await;
}

/// The TraceResult of a job, once its data covers `nodes` nodes and its status says the run
/// finished.
async fn final_result(client: &Client, ns: &str, name: &str, nodes: u32) -> TraceResult {
    let api = Api::<TraceResult>::namespaced(client.clone(), ns);
    eventually(
        secs(60),
        format!("TraceResult {ns}/{name} of {nodes} node(s)"),
        async || {
            let r = api.get(name).await?;
            let s = r.status.clone().ok_or_else(|| anyhow!("no status"))?;
            let c = s
                .coverage
                .clone()
                .ok_or_else(|| anyhow!("no coverage: {s:?}"))?;
            ensure!(
                c.reported == nodes && c.expected == nodes && c.finished == nodes,
                "coverage {c:?}"
            );
            Ok(r)
        },
    )
    .await
}

/// The rows whose `key` column equals `value`, as (other columns → value).
fn rows_where<'a>(rows: &'a [Row], key: &str, value: &str) -> Vec<&'a Row> {
    rows.iter()
        .filter(|r| r.keys.get(key).map(String::as_str) == Some(value))
        .collect()
}

fn job_api(client: &Client, ns: &str) -> Api<TraceJob> {
    Api::namespaced(client.clone(), ns)
}

async fn create(client: &Client, ns: &str, name: &str, spec: Value) {
    let job: TraceJob = serde_json::from_value(json!({
        "apiVersion": "fathom.dev/v1alpha1", "kind": "TraceJob",
        "metadata": {"name": name, "namespace": ns}, "spec": spec,
    }))
    .expect("job");
    job_api(client, ns)
        .create(&PostParams::default(), &job)
        .await
        .unwrap_or_else(|e| panic!("creating TraceJob {ns}/{name}: {e}"));
}

#[tokio::test]
async fn a_tracejob_counts_exactly_the_opens_and_uprobe_calls_of_its_pods_and_nothing_else() {
    let client = admin().await;
    install_crds(&client).await;
    let ns = TestNamespace::create(&client, "loop").await;
    let node = env().real_node.clone();
    let dir = trigger_dir("loop");

    // Two target pods and one decoy pod of the same namespace, all waiting for the trigger.
    workload(&client, ns.as_str(), "target", 2, &node, &dir).await;
    workload(&client, ns.as_str(), "decoy", 1, &node, &dir).await;
    let targets = running_pods(&client, ns.as_str(), "target", 2).await;
    let decoys = running_pods(&client, ns.as_str(), "decoy", 1).await;
    let target_names: BTreeSet<String> = targets.iter().map(ResourceExt::name_any).collect();

    let (operator, cport) = operator_with_collector(&client, "loop").await;
    let mut runner = RunnerOptions::new(&node, cport).start(&client).await;

    create(
        &client,
        ns.as_str(),
        "opens",
        json!({
            "probe": {"tracepoint": "syscalls/sys_enter_openat"},
            "aggregate": {"by": ["pod", "comm"]},
            "podSelector": {"matchLabels": {"app": "target"}},
            "duration": "40s",
        }),
    )
    .await;
    create(
        &client,
        ns.as_str(),
        "calls",
        json!({
            "probe": {"uprobe": "/workload:fathom_target"},
            "aggregate": {"by": ["namespace", "pod", "container"]},
            "podSelector": {"matchLabels": {"app": "target"}},
            "duration": "40s",
        }),
    )
    .await;
    wait_attached(Some(ns.as_str()), "opens", "TraceJob", 1).await;
    wait_attached(Some(ns.as_str()), "calls", "TraceJob", 1).await;

    // The work, with the probes in place: the pods (targets and decoy) and the host decoy.
    let all: Vec<String> = targets
        .iter()
        .chain(&decoys)
        .map(ResourceExt::name_any)
        .collect();
    trigger(&dir, &all).await;
    host_decoy();

    let jobs = job_api(&client, ns.as_str());
    wait_phase(&jobs, "opens", JobPhase::Succeeded, 90).await;
    wait_phase(&jobs, "calls", JobPhase::Succeeded, 90).await;

    // openat by pod: exactly N for each target pod, no row for the decoy pod or the host.
    let opens = final_result(&client, ns.as_str(), "opens", 1).await;
    let data = &opens.status.as_ref().expect("status").data;
    let ours = rows_where(&data.rows, "comm", COMM);
    let by_pod: BTreeMap<String, u64> = ours
        .iter()
        .map(|r| (r.keys.get("pod").cloned().unwrap_or_default(), r.value))
        .collect();
    let expected: BTreeMap<String, u64> =
        target_names.iter().map(|p| (p.clone(), N_OPENS)).collect();
    assert_eq!(by_pod, expected, "openat rows of {COMM}: {:#?}", data.rows);
    let foreign: Vec<&Row> = data
        .rows
        .iter()
        .filter(|r| !target_names.contains(r.keys.get("pod").map(String::as_str).unwrap_or("")))
        .collect();
    assert!(
        foreign.is_empty(),
        "rows of other pods or the host: {foreign:#?}"
    );

    // The uprobe on /workload inside the containers: exactly M per target pod, named.
    let calls = final_result(&client, ns.as_str(), "calls", 1).await;
    let data = &calls.status.as_ref().expect("status").data;
    let got: BTreeSet<(String, String, String, u64)> = data
        .rows
        .iter()
        .map(|r| {
            let k = |c: &str| r.keys.get(c).cloned().unwrap_or_default();
            (k("namespace"), k("pod"), k("container"), r.value)
        })
        .collect();
    let want: BTreeSet<(String, String, String, u64)> = target_names
        .iter()
        .map(|p| {
            (
                ns.as_str().to_string(),
                p.clone(),
                "work".to_string(),
                M_CALLS,
            )
        })
        .collect();
    assert_eq!(got, want, "uprobe rows: {:#?}", data.rows);
    let s = calls.status.as_ref().expect("status");
    assert_eq!(s.total, M_CALLS * 2, "total of the calls job");
    assert_eq!(
        s.loss.as_ref().map(|l| l.total),
        Some(0),
        "loss: {:?}",
        s.loss
    );

    // What a user sees: `kubectl get results` lists both with their totals and coverage.
    let table = kubectl_ok(&["-n", ns.as_str(), "get", "results"]);
    let line = table
        .lines()
        .find(|l| l.starts_with("calls"))
        .unwrap_or_else(|| panic!("no calls row in:\n{table}"));
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert!(
        cols.contains(&(M_CALLS * 2).to_string().as_str()) && cols.contains(&"1/1"),
        "kubectl get results:\n{table}"
    );

    // And through the plugin: `kubectl fathom top` lists each target pod with exactly M.
    let (code, out, err) =
        fathom_e2e::kubectl_fathom(&env().kubeconfig, &["top", "calls", "-n", ns.as_str()]);
    assert_eq!(code, 0, "kubectl fathom top: {err}");
    for pod in &target_names {
        let line = out
            .lines()
            .find(|l| l.contains(pod.as_str()))
            .unwrap_or_else(|| panic!("no row of {pod} in kubectl fathom top:\n{out}"));
        assert!(
            line.split_whitespace().any(|c| c == M_CALLS.to_string()),
            "{pod}'s row is not {M_CALLS}: {line}\n{out}"
        );
    }
    assert!(
        !out.contains(decoys[0].name_any().as_str()),
        "the decoy pod in kubectl fathom top:\n{out}"
    );

    // Detached after the deadline: nothing of Fathom left in the kernel.
    runner.stop();
    drop(operator);
    let left = fathom_programs();
    assert!(
        left.is_empty(),
        "programs left after the runner stopped: {left:?}"
    );
    remove_identity_pods(&client, std::slice::from_ref(&node)).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// UDP datagrams each workload process sends (to itself over its loopback, or to the node).
const N_DATAGRAMS: u64 = 120;
/// Their port.
const UDP_PORT: u16 = 47123;

/// Two target pods and a decoy pod, each sending N_DATAGRAMS datagrams of 100 bytes to
/// `to` (the workload's `udp` argument) once triggered; returns every pod's name and the
/// targets'.
async fn udp_pods(
    client: &Client,
    ns: &str,
    node: &str,
    dir: &Path,
    to: &str,
) -> (Vec<String>, BTreeSet<String>) {
    let script = format!(
        "while [ ! -e /trigger/go ]; do sleep 1; done; \
         /workload {COMM} udp {N_DATAGRAMS} {to} && touch /trigger/done-$HOSTNAME; exec sleep 3600"
    );
    for (app, replicas) in [("target", 2), ("decoy", 1)] {
        ScriptDeployment {
            replicas,
            trigger: Some(dir),
            ..ScriptDeployment::new(ns, app, node, &script)
        }
        .apply(client)
        .await;
    }
    let targets = running_pods(client, ns, "target", 2).await;
    let decoys = running_pods(client, ns, "decoy", 1).await;
    let all = targets
        .iter()
        .chain(&decoys)
        .map(ResourceExt::name_any)
        .collect();
    (all, targets.iter().map(ResourceExt::name_any).collect())
}

/// Stops the runner and the operator, checks that the kernel holds nothing of Fathom, and
/// removes the node's identity pods and the trigger directory.
async fn finish(
    client: &Client,
    mut runner: NodeRunner,
    operator: Operator,
    node: &str,
    dir: &Path,
) {
    runner.stop();
    drop(operator);
    let left = fathom_programs();
    assert!(
        left.is_empty(),
        "programs left after the runner stopped: {left:?}"
    );
    remove_identity_pods(client, &[node.to_string()]).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn pod_traffic_counts_exactly_the_packets_of_its_pods_sockets_and_nothing_else() {
    let client = admin().await;
    install_crds(&client).await;
    let ns = TestNamespace::create(&client, "net").await;
    let node = env().real_node.clone();
    let dir = trigger_dir("net");
    // Each pod sends itself N datagrams of 100 bytes on 127.0.0.1:UDP_PORT: packets of its
    // own sockets, which only the pod's cgroup_skb view may count.
    let (all, target_names) =
        udp_pods(&client, ns.as_str(), &node, &dir, &UDP_PORT.to_string()).await;

    let (operator, cport) = operator_with_collector(&client, "net").await;
    let runner = RunnerOptions::new(&node, cport).start(&client).await;
    create(
        &client,
        ns.as_str(),
        "traffic",
        json!({
            "probe": {"catalog": "pod-traffic"},
            "aggregate": {"by": ["namespace", "pod", "direction", "protocol", "dport"]},
            "podSelector": {"matchLabels": {"app": "target"}},
            "duration": "40s",
        }),
    )
    .await;
    wait_attached(Some(ns.as_str()), "traffic", "TraceJob", 1).await;

    trigger(&dir, &all).await;
    // The same traffic from a process on the host: not the job's either.
    let out = Command::new(host_workload())
        .args([COMM, "udp", &N_DATAGRAMS.to_string(), &UDP_PORT.to_string()])
        .output()
        .expect("host decoy");
    assert!(out.status.success(), "host decoy: {out:?}");

    wait_phase(
        &job_api(&client, ns.as_str()),
        "traffic",
        JobPhase::Succeeded,
        90,
    )
    .await;
    let r = final_result(&client, ns.as_str(), "traffic", 1).await;
    let data = &r.status.as_ref().expect("status").data;
    assert_eq!(data.value, "sum(bytes)", "pod-traffic sums bytes");
    // Exactly N datagrams each way per target pod: IPv4 and UDP headers plus 100 bytes.
    let bytes = N_DATAGRAMS * (20 + 8 + 100);
    let got: BTreeSet<(String, String, String, String, String, u64)> = data
        .rows
        .iter()
        .map(|r| {
            let k = |c: &str| r.keys.get(c).cloned().unwrap_or_default();
            (
                k("namespace"),
                k("pod"),
                k("direction"),
                k("protocol"),
                k("dport"),
                r.value,
            )
        })
        .collect();
    let want: BTreeSet<(String, String, String, String, String, u64)> = target_names
        .iter()
        .flat_map(|p| {
            ["egress", "ingress"].map(|d| {
                (
                    ns.as_str().to_string(),
                    p.clone(),
                    d.to_string(),
                    "udp".to_string(),
                    UDP_PORT.to_string(),
                    bytes,
                )
            })
        })
        .collect();
    assert_eq!(got, want, "rows (no decoy pod, no host): {:#?}", data.rows);

    finish(&client, runner, operator, &node, &dir).await;
}

#[tokio::test]
async fn tc_on_target_pods_counts_what_each_pod_sends_through_its_veth() {
    let client = admin().await;
    install_crds(&client).await;
    let ns = TestNamespace::create(&client, "veth").await;
    let node = env().real_node.clone();
    let dir = trigger_dir("veth");
    // The node's address on the pod network (scripts/cluster.sh: the bridge's), where this
    // test listens: each pod sends N datagrams there, through its own veth.
    let node_ip = "10.244.0.1";
    let port = UDP_PORT + 1;
    let sink = std::net::UdpSocket::bind((node_ip, port)).expect("listen on the node address");
    let (all, target_names) = udp_pods(
        &client,
        ns.as_str(),
        &node,
        &dir,
        &format!("{node_ip}:{port}"),
    )
    .await;

    let (operator, cport) = operator_with_collector(&client, "veth").await;
    let runner = RunnerOptions::new(&node, cport).start(&client).await;
    // A TraceJob may use tc without naming an interface: it runs on its pods' veths only.
    create(
        &client,
        ns.as_str(),
        "veth",
        json!({
            "probe": {"network": {"hook": "tc"}},
            "aggregate": {"by": ["pod", "direction", "protocol", "daddr", "dport"]},
            "podSelector": {"matchLabels": {"app": "target"}},
            "duration": "40s",
        }),
    )
    .await;
    wait_attached(Some(ns.as_str()), "veth", "TraceJob", 1).await;

    // Read as they come (a socket buffer holds only some hundreds).
    sink.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .expect("timeout");
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let mut got = 0;
        while got < 3 * N_DATAGRAMS && sink.recv(&mut buf).is_ok() {
            got += 1;
        }
        got
    });
    trigger(&dir, &all).await;
    // Every datagram arrived: 3 pods × N.
    assert_eq!(reader.join().expect("reader"), 3 * N_DATAGRAMS);

    wait_phase(
        &job_api(&client, ns.as_str()),
        "veth",
        JobPhase::Succeeded,
        90,
    )
    .await;
    let r = final_result(&client, ns.as_str(), "veth", 1).await;
    let data = &r.status.as_ref().expect("status").data;
    // Exactly N UDP datagrams out of each target pod (egress is the pod's side), none of
    // the decoy pod's.
    let udp: BTreeMap<String, u64> = data
        .rows
        .iter()
        .filter(|r| {
            let k = |c: &str| r.keys.get(c).map(String::as_str).unwrap_or("");
            k("protocol") == "udp" && k("dport") == port.to_string() && k("daddr") == node_ip
        })
        .map(|r| {
            let k = |c: &str| r.keys.get(c).cloned().unwrap_or_default();
            (format!("{}/{}", k("pod"), k("direction")), r.value)
        })
        .collect();
    let want: BTreeMap<String, u64> = target_names
        .iter()
        .map(|p| (format!("{p}/egress"), N_DATAGRAMS))
        .collect();
    assert_eq!(udp, want, "UDP rows: {:#?}", data.rows);
    let pods: BTreeSet<&str> = data
        .rows
        .iter()
        .filter_map(|r| r.keys.get("pod").map(String::as_str))
        .collect();
    assert!(
        pods.iter().all(|p| target_names.contains(*p)),
        "only target pods' veths: {pods:?}"
    );

    finish(&client, runner, operator, &node, &dir).await;
}

#[tokio::test]
async fn a_cluster_tracejob_merges_each_nodes_report_exactly_once() {
    let client = admin().await;
    install_crds(&client).await;
    let e = env();
    let mut nodes = vec![e.real_node.clone()];
    nodes.extend(e.sim_nodes.iter().cloned());
    for n in &e.sim_nodes {
        fathom_e2e::ensure_sim_node_ready(&client, n).await;
    }

    let (operator, cport) = operator_with_collector(&client, "cluster-loop").await;
    let mut runners = Vec::new();
    for n in &nodes {
        runners.push(RunnerOptions::new(n, cport).start(&client).await);
    }

    // Node-wide on every node: each runner runs the real engine on this kernel, so each sees
    // the host's workload: every node must contribute exactly N — a report merged twice or
    // missed shows as 2N or 0 on that node's row.
    let name = "e2e-cluster-loop";
    let guard = ClusterJobGuard { name: name.into() };
    let job: ClusterTraceJob = serde_json::from_value(json!({
        "apiVersion": "fathom.dev/v1alpha1", "kind": "ClusterTraceJob",
        "metadata": {"name": name},
        "spec": {
            "probe": {"tracepoint": "syscalls/sys_enter_openat"},
            "aggregate": {"by": ["node", "comm"]},
            "duration": "30s",
        }
    }))
    .expect("job");
    let api = Api::<ClusterTraceJob>::all(client.clone());
    api.create(&PostParams::default(), &job)
        .await
        .expect("creating the ClusterTraceJob");
    wait_attached(None, name, "ClusterTraceJob", nodes.len()).await;
    let out = Command::new(host_workload())
        .args([
            COMM,
            "open",
            &N_OPENS.to_string(),
            "/tmp/fathom-e2e-cluster",
        ])
        .output()
        .expect("workload");
    assert!(out.status.success(), "{out:?}");
    let job = wait_phase(&api, name, JobPhase::Succeeded, 90).await;
    let at = job
        .status
        .and_then(|s| s.result_ref)
        .expect("status.resultRef of a finished ClusterTraceJob");

    let result = final_result(&client, &at.namespace, &at.name, nodes.len() as u32).await;
    let data = &result.status.as_ref().expect("status").data;
    let by_node: BTreeMap<String, u64> = rows_where(&data.rows, "comm", COMM)
        .iter()
        .map(|r| (r.keys.get("node").cloned().unwrap_or_default(), r.value))
        .collect();
    let want: BTreeMap<String, u64> = nodes.iter().map(|n| (n.clone(), N_OPENS)).collect();
    assert_eq!(by_node, want, "rows of {COMM} by node: {:#?}", data.rows);

    for r in &mut runners {
        r.stop();
    }
    drop(runners);
    drop(operator);
    drop(guard);
    remove_identity_pods(&client, &nodes).await;
    let left = fathom_programs();
    assert!(
        left.is_empty(),
        "programs left after the runners stopped: {left:?}"
    );
}

/// Fathom's programs and the pin directories of the e2e runner of `node`.
fn kernel_state(node: &str) -> (Vec<String>, Vec<String>) {
    (fathom_programs(), fathom_e2e::runner::pins_of(node))
}

#[tokio::test]
async fn t2_a_runner_killed_mid_job_resumes_its_pinned_probe_and_counts_exactly() {
    let client = admin().await;
    install_crds(&client).await;
    let ns = TestNamespace::create(&client, "t2").await;
    let node = env().real_node.clone();
    let dir = trigger_dir("t2");
    workload(&client, ns.as_str(), "target", 1, &node, &dir).await;
    let pods = running_pods(&client, ns.as_str(), "target", 1).await;
    let pod = pods[0].name_any();

    let (operator, cport) = operator_with_collector(&client, "t2").await;
    let mut runner = RunnerOptions::new(&node, cport).start(&client).await;
    create(
        &client,
        ns.as_str(),
        "opens",
        json!({
            "probe": {"tracepoint": "syscalls/sys_enter_openat"},
            "aggregate": {"by": ["pod", "comm"]},
            "podSelector": {"matchLabels": {"app": "target"}},
            "duration": "45s",
        }),
    )
    .await;
    wait_attached(Some(ns.as_str()), "opens", "TraceJob", 1).await;
    let (programs, pins) = kernel_state(&node);
    assert_eq!(
        (programs.len(), pins.len()),
        (1, 1),
        "{programs:?} {pins:?}"
    );

    // kill -9: the pinned link keeps the probe attached and counting while no runner runs.
    runner.kill();
    trigger(&dir, std::slice::from_ref(&pod)).await;
    assert_eq!(
        kernel_state(&node),
        (programs.clone(), pins.clone()),
        "after kill -9"
    );

    // The restarted runner resumes the same program (no second attachment) and its counts.
    let mut runner = RunnerOptions::new(&node, cport).start(&client).await;
    let jobs = job_api(&client, ns.as_str());
    eventually(secs(30), "the resumed assignment Attached", async || {
        let (p, _) = kernel_state(&node);
        ensure!(
            p == programs,
            "programs {p:?}, before the kill {programs:?}"
        );
        Ok(())
    })
    .await;
    wait_phase(&jobs, "opens", JobPhase::Succeeded, 90).await;
    let result = final_result(&client, ns.as_str(), "opens", 1).await;
    let s = result.status.as_ref().expect("status");
    let ours: BTreeMap<String, u64> = rows_where(&s.data.rows, "comm", COMM)
        .iter()
        .map(|r| (r.keys.get("pod").cloned().unwrap_or_default(), r.value))
        .collect();
    assert_eq!(
        ours,
        BTreeMap::from([(pod.clone(), N_OPENS)]),
        "opens done while the runner was dead: {:#?}",
        s.data.rows
    );
    runner.stop();
    drop(operator);
    assert_eq!(kernel_state(&node), (vec![], vec![]), "after the job ended");
    remove_identity_pods(&client, std::slice::from_ref(&node)).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn t1_a_runner_killed_then_its_job_deleted_leaves_nothing_once_it_restarts() {
    let client = admin().await;
    install_crds(&client).await;
    let ns = TestNamespace::create(&client, "t1").await;
    let node = env().real_node.clone();
    let dir = trigger_dir("t1");
    workload(&client, ns.as_str(), "target", 1, &node, &dir).await;
    running_pods(&client, ns.as_str(), "target", 1).await;

    let (operator, cport) = operator_with_collector(&client, "t1").await;
    let mut runner = RunnerOptions::new(&node, cport).start(&client).await;
    create(
        &client,
        ns.as_str(),
        "opens",
        json!({
            "probe": {"tracepoint": "syscalls/sys_enter_openat"},
            "podSelector": {"matchLabels": {"app": "target"}},
            "duration": "1h",
        }),
    )
    .await;
    wait_attached(Some(ns.as_str()), "opens", "TraceJob", 1).await;
    runner.kill();
    assert_ne!(
        kernel_state(&node),
        (vec![], vec![]),
        "pinned after kill -9"
    );

    // Deleted while no runner runs: the job waits on its assignment's detach finalizer.
    let jobs = job_api(&client, ns.as_str());
    jobs.delete("opens", &Default::default())
        .await
        .expect("deleting the job");
    let runner = RunnerOptions::new(&node, cport).start(&client).await;
    eventually(
        secs(5),
        "nothing of the deleted job in the kernel or bpffs",
        async || {
            let state = kernel_state(&node);
            ensure!(state == (vec![], vec![]), "{state:?}");
            Ok(())
        },
    )
    .await;
    eventually(secs(30), "the job gone", async || {
        ensure!(jobs.get_opt("opens").await?.is_none(), "still there");
        Ok(())
    })
    .await;
    drop(runner);
    drop(operator);
    remove_identity_pods(&client, std::slice::from_ref(&node)).await;
    let _ = std::fs::remove_dir_all(&dir);
}
