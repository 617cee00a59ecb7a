//! The cluster's nodes as the operator meets them: real pods with real container ids on the
//! real node (kubelet, containerd, runc), their cgroups on this machine, and a simulated node
//! that is lost.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use fathom_crds::{TraceJob, TraceResult};
use fathom_e2e::{
    AuditLog, OPERATOR_USER, OperatorOptions, SimNodeOutage, TestNamespace, admin, assignments_of,
    busybox_deployment, create_job, ensure_sim_node_ready, env, eventually, expected_targets,
    install_crds, listed_targets, running_pods, scale, secs, wait_node_ready,
};
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client, ResourceExt, api::DeleteParams};
use serde_json::json;

/// Waits until the job has exactly one assignment, on `node`, listing exactly `pods`.
async fn wait_listed(client: &Client, ns: &str, uid: &str, node: &str, pods: &[Pod]) {
    let want = expected_targets(pods);
    eventually(
        secs(60),
        format!("one assignment on {node} listing {:?}", want),
        async || {
            let all = assignments_of(client, ns, uid).await?;
            let got: Vec<(String, BTreeSet<_>)> = all
                .iter()
                .map(|a| (a.spec.node_name.clone(), listed_targets(a)))
                .collect();
            anyhow::ensure!(
                got.len() == 1 && got[0].0 == node && got[0].1 == want,
                "{got:?}"
            );
            Ok(())
        },
    )
    .await;
}

#[tokio::test]
async fn assignment_of_the_real_node_lists_its_pods_with_their_container_ids_through_scaling_and_replacement()
 {
    let client = admin().await;
    install_crds(&client).await;
    let ns = TestNamespace::create(&client, "pods").await;
    let ns = ns.as_str();
    let _op = OperatorOptions::new("pods").start(&client).await;
    let node = env().real_node.clone();
    busybox_deployment(&client, ns, "web", 2, &node).await;
    let pods = running_pods(&client, ns, "web", 2).await;
    for p in &pods {
        assert_eq!(
            p.spec.as_ref().and_then(|s| s.node_name.as_deref()),
            Some(node.as_str())
        );
        for (_, _, ids) in expected_targets(std::slice::from_ref(p)) {
            for id in ids {
                let id = id.expect("a container id");
                assert!(id.starts_with("containerd://"), "{id}");
            }
        }
    }
    let job = create_job(
        &client,
        ns,
        "web-drops",
        json!({"probe": {"tracepoint": "skb/kfree_skb"}, "duration": "1h",
               "podSelector": {"matchLabels": {"app": "web"}}}),
    )
    .await;
    let uid = job.uid().expect("uid");
    wait_listed(&client, ns, &uid, &node, &pods).await;

    // Scaled to 3: the assignment lists 3.
    scale(&client, ns, "web", 3).await;
    let pods = running_pods(&client, ns, "web", 3).await;
    wait_listed(&client, ns, &uid, &node, &pods).await;

    // A pod deleted: its replacement takes its place.
    let gone = pods[0].name_any();
    Api::<Pod>::namespaced(client.clone(), ns)
        .delete(&gone, &DeleteParams::default())
        .await
        .expect("delete pod");
    let pods = running_pods(&client, ns, "web", 3).await;
    assert!(
        pods.iter().all(|p| p.name_any() != gone),
        "{gone} still listed"
    );
    wait_listed(&client, ns, &uid, &node, &pods).await;
}

/// What the planner promises for a node that is lost (operator/src/plan.rs, lifecycle.rs): a
/// node that is not Ready is excluded from the plan, with reason NotReady; the assignment it
/// had is deleted, and as no runner there can confirm detaching, the operator releases it
/// itself once `--lost-node-seconds` have passed since the deletion.
#[tokio::test]
async fn o2_a_lost_simulated_node_leaves_the_plan_and_its_assignment_is_released_after_the_timeout()
{
    let client = admin().await;
    install_crds(&client).await;
    let sim = env().sim_node().to_string();
    ensure_sim_node_ready(&client, &sim).await;
    let ns = TestNamespace::create(&client, "sim").await;
    let ns = ns.as_str();
    let audit = AuditLog::open();
    let lost_after = 5;
    let mut options = OperatorOptions::new("sim");
    options.lost_node_seconds = lost_after;
    let _op = options.start(&client).await;

    // A Deployment pinned to the simulated node puts an assignment there.
    busybox_deployment(&client, ns, "sim", 1, &sim).await;
    let pods = running_pods(&client, ns, "sim", 1).await;
    assert_eq!(
        pods[0].spec.as_ref().and_then(|s| s.node_name.as_deref()),
        Some(sim.as_str())
    );
    let job = create_job(
        &client,
        ns,
        "sim-drops",
        json!({"probe": {"tracepoint": "skb/kfree_skb"}, "duration": "1h",
               "podSelector": {"matchLabels": {"app": "sim"}}}),
    )
    .await;
    let uid = job.uid().expect("uid");
    wait_listed(&client, ns, &uid, &sim, &pods).await;
    let assignment = assignments_of(&client, ns, &uid)
        .await
        .expect("list")
        .remove(0);
    let name = assignment.name_any();

    // The node is lost.
    let outage = SimNodeOutage::start(&sim);
    let lost = std::time::Instant::now();
    wait_node_ready(&client, &sim, false, secs(120)).await;
    eprintln!(
        "{sim} NotReady {:?} after its heartbeat stopped",
        lost.elapsed()
    );

    // Its assignment goes: deleted, then released by the operator after the timeout.
    eventually(
        secs(lost_after + 60),
        format!("assignment {name} of the lost node gone"),
        async || {
            let left: Vec<String> = assignments_of(&client, ns, &uid)
                .await?
                .iter()
                .map(|a| {
                    format!(
                        "{} deleting since {:?}",
                        a.name_any(),
                        a.metadata.deletion_timestamp
                    )
                })
                .collect();
            anyhow::ensure!(left.is_empty(), "{left:?}");
            Ok(())
        },
    )
    .await;
    let jobs: Api<TraceJob> = Api::namespaced(client.clone(), ns);
    let job = eventually(
        secs(30),
        "the job's status naming the lost node",
        async || {
            let j = jobs.get("sim-drops").await?;
            let st = j.status.clone().unwrap_or_default();
            let ready = st.condition("Ready").cloned();
            anyhow::ensure!(
                st.nodes.as_ref().map(|n| n.desired) == Some(0)
                    && ready.as_ref().is_some_and(|c| c.status == "False"
                        && c.reason == "NoTargets"
                        && c.message.contains(&format!("{sim} (NotReady)"))),
                "nodes {:?}, Ready {ready:?}",
                st.nodes
            );
            Ok(j)
        },
    )
    .await;
    assert!(job.metadata.deletion_timestamp.is_none());
    assert!(
        Api::<TraceResult>::namespaced(client.clone(), ns)
            .get_opt("sim-drops")
            .await
            .expect("get result")
            .is_some(),
        "the job keeps its result"
    );

    // From the audit log: the operator deleted the assignment, and released it (removed the
    // detach finalizer) no sooner than --lost-node-seconds later.
    eprintln!(
        "{sim}: assignment released and status updated {:?} after the outage began",
        lost.elapsed()
    );
    let m = audit.mark(&client, ns).await;
    let events: Vec<_> = audit
        .events()
        .into_iter()
        .filter(|e| e.stage_timestamp <= m.stage_timestamp)
        .filter(|e| {
            e.user.username == OPERATOR_USER
                && e.resource() == "traceassignments"
                && e.name() == Some(name.as_str())
        })
        .collect();
    let deleted = events
        .iter()
        .find(|e| e.verb == "delete")
        .unwrap_or_else(|| panic!("no delete of {name} by the operator in the audit log"));
    let released = events
        .iter()
        .find(|e| e.verb == "patch" && e.stage_timestamp > deleted.stage_timestamp)
        .unwrap_or_else(|| panic!("no release of {name} by the operator in the audit log"));
    let waited = released
        .stage_timestamp
        .duration_since(deleted.stage_timestamp);
    assert!(
        waited.as_secs_f64() >= lost_after as f64 - 1.0,
        "released {waited:?} after the deletion, before --lost-node-seconds {lost_after}"
    );

    outage.restore(&client).await;
    eprintln!(
        "{sim} Ready again {:?} after the outage began",
        lost.elapsed()
    );
}

/// The cgroup controllers' mount points of this machine: (controllers, mount point); `""` is
/// the cgroup v2 hierarchy.
fn cgroup_mounts() -> Vec<(BTreeSet<String>, PathBuf)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let mut out = Vec::new();
    for line in info.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let mount_point = pre.split(' ').nth(4).unwrap_or_default();
        let mut post = post.split(' ');
        let (fstype, _source, options) = (post.next(), post.next(), post.next().unwrap_or(""));
        match fstype {
            Some("cgroup2") => out.push((BTreeSet::new(), PathBuf::from(mount_point))),
            Some("cgroup") => out.push((
                options
                    .split(',')
                    .filter(|o| *o != "rw" && *o != "ro")
                    .map(String::from)
                    .collect(),
                PathBuf::from(mount_point),
            )),
            _ => {}
        }
    }
    out
}

/// The pid of a container's task, from containerd (`ctr tasks ls`).
fn task_pid(container_id: &str) -> u32 {
    let sock = &env().containerd;
    let out = Command::new("ctr")
        .arg("-a")
        .arg(sock)
        .args(["-n", "k8s.io", "tasks", "ls"])
        .output()
        .expect("running ctr");
    assert!(
        out.status.success(),
        "ctr -a {} -n k8s.io tasks ls: {}",
        sock.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter_map(|l| {
            let mut cols = l.split_whitespace();
            Some((cols.next()?, cols.next()?))
        })
        .find(|(task, _)| *task == container_id)
        .and_then(|(_, pid)| pid.parse().ok())
        .unwrap_or_else(|| panic!("no task {container_id} in `ctr tasks ls`:\n{text}"))
}

#[tokio::test]
async fn a_pod_on_the_real_node_runs_in_a_cgroup_of_this_machine() {
    let client = admin().await;
    let ns = TestNamespace::create(&client, "cgroup").await;
    let ns = ns.as_str();
    busybox_deployment(&client, ns, "sleeper", 1, &env().real_node).await;
    let pod = running_pods(&client, ns, "sleeper", 1).await.remove(0);
    let uid = pod.uid().expect("uid");
    let id = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.first())
        .and_then(|c| c.container_id.clone())
        .expect("container id");
    let id = id
        .strip_prefix("containerd://")
        .unwrap_or_else(|| panic!("{id} is not a containerd id"));

    let pid = task_pid(id);
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(cmdline.contains("sleep"), "pid {pid} runs {cmdline:?}");

    let mounts = cgroup_mounts();
    assert!(!mounts.is_empty(), "no cgroup filesystem mounted");
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
    let mut checked = BTreeMap::new();
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next().unwrap_or(""), parts.next());
        let path = path.unwrap_or_default();
        let wanted: BTreeSet<String> = controllers
            .split(',')
            .filter(|c| !c.is_empty())
            .map(String::from)
            .collect();
        let Some((_, root)) = mounts.iter().find(|(opts, _)| {
            if wanted.is_empty() {
                opts.is_empty()
            } else {
                wanted.is_subset(opts)
            }
        }) else {
            continue; // a hierarchy not mounted on this machine
        };
        let dir: PathBuf = root.join(path.trim_start_matches('/'));
        assert!(
            Path::new(&dir).is_dir(),
            "cgroup {controllers:?} of pid {pid}: {} does not exist",
            dir.display()
        );
        checked.insert(controllers.to_string(), dir);
    }
    assert!(
        !checked.is_empty(),
        "no cgroup of pid {pid} checked:\n{cgroups}"
    );
    let uid_forms = [uid.clone(), uid.replace('-', "_")];
    assert!(
        checked.values().any(|d| {
            let d = d.to_string_lossy();
            d.contains(id) && uid_forms.iter().any(|u| d.contains(u.as_str()))
        }),
        "no cgroup path of pid {pid} names its container {id} and pod {uid}: {checked:?}"
    );
    eprintln!(
        "pid {pid} of container {id}: {} cgroups exist",
        checked.len()
    );
}
