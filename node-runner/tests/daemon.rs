//! The node runner's parts against this machine: real cgroups in the unified hierarchy, real
//! bpffs, and the runner driving the real engine. Needs root.

mod common;

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime},
};

use common::*;
use fathom_crds::assignment::{
    AssignmentPhase, JobRef, TargetContainer, TargetPod, TraceAssignmentSpec,
};
use fathom_node::{
    daemon::{
        cgroups::{CgroupRoot, ContainerId},
        pins::{BPFFS, Pins},
        runner::{Desired, Runner, RunnerOptions},
    },
    engine::{
        kernel::Kernel,
        render::cgroup_id,
        session::{Engine, EngineOptions},
    },
};

const POD: &str = "5e1f0c2a-7b3d-4e5f-8a9b-0c1d2e3f4a5b";

/// A fake container's cgroup under the unified root:
/// `<root>/fathom-test-<tag>-<pid>/kubepods/besteffort/pod<POD>/<id>`; removed (rmdir, deepest
/// first) on drop.
struct FakeContainer {
    top: PathBuf,
    dir: PathBuf,
    id: String,
}

impl FakeContainer {
    fn new(tag: &str) -> FakeContainer {
        let root = CgroupRoot::host().expect("a cgroup v2 hierarchy").root;
        let top = root.join(format!("fathom-test-{tag}-{}", std::process::id()));
        let id = format!("{:0>64x}", u64::from(std::process::id()) << 8 | 0xab);
        let dir = top.join(format!("kubepods/besteffort/pod{POD}/{id}"));
        fs::create_dir_all(&dir).expect("creating a cgroup under the unified root");
        FakeContainer { top, dir, id }
    }

    fn container_id(&self) -> String {
        format!("containerd://{}", self.id)
    }
}

impl Drop for FakeContainer {
    fn drop(&mut self) {
        let mut d: &Path = &self.dir;
        loop {
            let _ = fs::remove_dir(d);
            if d == self.top {
                break;
            }
            match d.parent() {
                Some(p) => d = p,
                None => break,
            }
        }
    }
}

#[test]
fn a_container_cgroup_in_the_unified_tree_resolves_to_its_inode() {
    let c = FakeContainer::new("resolve");
    let want = cgroup_id(&c.dir).unwrap();
    let root = CgroupRoot::host().unwrap();
    let index = root.index();
    let id = ContainerId::parse(&c.container_id()).unwrap();
    assert_eq!(index.container_ids(&id, POD), vec![want]);
    // The fallback through a process of the container.
    let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
    fs::write(c.dir.join("cgroup.procs"), sleeper.id().to_string()).unwrap();
    assert_eq!(
        root.of_process(Path::new("/proc"), sleeper.id()),
        Some(want)
    );
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
}

#[test]
fn stale_pin_dirs_in_bpffs_are_removed_at_start() {
    let dir = Path::new(BPFFS).join(format!("fathom-test-pins-{}", std::process::id()));
    fs::create_dir_all(&dir).expect("a directory in bpffs");
    let pins = Pins::at(&dir);
    pins.mark("11111111-aaaa").unwrap();
    pins.mark("22222222-bbbb").unwrap();
    let swept = pins
        .sweep(&BTreeSet::from(["11111111-aaaa".to_string()]))
        .unwrap();
    assert_eq!(swept.removed, vec!["22222222-bbbb"]);
    assert!(dir.join("11111111-aaaa").is_dir());
    assert!(!dir.join("22222222-bbbb").exists());
    pins.remove("11111111-aaaa").unwrap();
    fs::remove_dir(&dir).unwrap();
}

fn assignment(container_id: String, comm: &str) -> Desired {
    let trace = serde_yaml::from_str(&format!(
        "probe: {{ tracepoint: syscalls/sys_enter_getppid }}\naggregate: {{ by: [comm] }}\nfilter: {{ comm: {comm} }}"
    ))
    .unwrap();
    Desired {
        uid: format!("3a4b5c6d-{}", std::process::id()),
        name: "getppid-node".into(),
        namespace: "fathom-system".into(),
        deleting: false,
        spec: TraceAssignmentSpec {
            job: JobRef {
                kind: "TraceJob".into(),
                name: "getppid".into(),
                namespace: Some("shop".into()),
                uid: "job-uid".into(),
            },
            run: 1,
            node_name: "node".into(),
            trace,
            node_wide: false,
            target_pods: vec![TargetPod {
                namespace: "shop".into(),
                name: "web".into(),
                uid: POD.into(),
                qos_class: Some("BestEffort".into()),
                containers: vec![TargetContainer {
                    name: "app".into(),
                    container_id: Some(container_id),
                }],
            }],
            deadline: None,
            suspend: false,
            policy: None,
        },
    }
}

/// A runner of node "node" driving the real engine with `opts`, the host's cgroups and pins
/// under `pin_root`.
fn runner_with(opts: EngineOptions, pin_root: &Path) -> Runner<Engine, Option<CgroupRoot>> {
    Runner::new(
        RunnerOptions {
            node: "node".into(),
            status_interval: Duration::from_secs(30),
        },
        Engine::new(Kernel::running(), opts),
        Some(CgroupRoot::host().unwrap()),
        Some(Pins::at(pin_root)),
    )
}

/// The runner with the real engine: a namespaced job counts only its pod's container, its
/// pin directory lives while it runs, and deletion detaches with a final report.
#[test]
fn the_runner_attaches_an_assignment_to_its_pods_cgroup_only() {
    let _k = KernelTest::begin();
    let c = FakeContainer::new("runner");
    let comm = comm("run");
    let pin_root = Path::new(BPFFS).join(format!("fathom-test-runner-{}", std::process::id()));
    let mut runner = runner_with(EngineOptions::default(), &pin_root);
    let mut desired = assignment(c.container_id(), &comm);
    let uid = desired.uid.clone();
    runner.sync([desired.clone()]);
    let out = runner.reconcile(SystemTime::now(), false);
    let (_, status) = out.statuses.last().expect("a status");
    assert_eq!(status.phase, Some(AssignmentPhase::Attached), "{status:?}");
    assert_eq!(
        status.attached_probes,
        vec!["tracepoint:syscalls/sys_enter_getppid"]
    );
    assert!(pin_root.join(&uid).is_dir(), "pin directory while running");

    let inside = workload_waiting(&comm, "getppid", 300, None);
    fs::write(c.dir.join("cgroup.procs"), inside.pid.to_string()).expect("into the container");
    inside.go();
    workload(&comm, "getppid", 50, None); // same comm, another cgroup: not the pod's

    desired.deleting = true;
    runner.sync([desired]);
    let out = runner.reconcile(SystemTime::now(), false);
    assert_eq!(out.release.len(), 1, "the finalizer may go");
    let last = out.reports.last().expect("a final report");
    assert!(last.r#final);
    assert_eq!(last.counters.as_ref().unwrap().hits, 300);
    assert!(
        !pin_root.join(&uid).exists(),
        "pin directory removed on detach"
    );
    assert!(runner.attached().is_empty());
    let _ = fs::remove_dir(&pin_root);
}

/// The runner holds a job to its CPU budget — here the runner's default for a job that sets
/// none, 1 % of a CPU — as `fathom run` does: probes over it for 3 s in a row are detached,
/// the assignment fails with the figure, and the final report's result says why it stopped.
#[test]
fn a_job_over_the_runners_default_cpu_budget_is_stopped_and_detached() {
    let _k = KernelTest::begin();
    let c = FakeContainer::new("cpu");
    let comm = comm("cpu");
    let pin_root = Path::new(BPFFS).join(format!("fathom-test-cpu-{}", std::process::id()));
    let mut runner = runner_with(
        EngineOptions {
            default_cpu_percent: Some(1),
            ..EngineOptions::default()
        },
        &pin_root,
    );
    let desired = assignment(c.container_id(), &comm);
    let uid = desired.uid.clone();
    runner.sync([desired]);
    let out = runner.reconcile(SystemTime::now(), false);
    assert_eq!(
        out.statuses.last().and_then(|(_, s)| s.phase),
        Some(AssignmentPhase::Attached)
    );
    let busy = workload_waiting(&comm, "getppid", 4_000_000_000, None);
    fs::write(c.dir.join("cgroup.procs"), busy.pid.to_string()).expect("into the container");
    let busy = busy.go_background();
    let start = std::time::Instant::now();
    let (status, last) = loop {
        std::thread::sleep(Duration::from_secs(1));
        let out = runner.reconcile(SystemTime::now(), true);
        if let Some((_, s)) = out
            .statuses
            .iter()
            .find(|(_, s)| s.phase == Some(AssignmentPhase::Failed))
        {
            break (
                s.clone(),
                out.reports.last().cloned().expect("a final report"),
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "not stopped within 60 s: {:?}",
            out.statuses
        );
    };
    drop(busy);
    let error = status.error.clone().unwrap_or_default();
    assert!(
        error.starts_with("CPU budget exceeded") && error.contains("spec.limits.cpuPercent=1"),
        "{error}"
    );
    assert!(last.r#final);
    let reason = last
        .result
        .as_ref()
        .and_then(|r| r.stopped_reason.clone())
        .unwrap_or_default();
    assert_eq!(reason, error, "the result says why it stopped");
    assert!(runner.attached().is_empty(), "detached");
    assert!(!pin_root.join(&uid).exists(), "pins removed");
    // Failed for this run: the next reconcile does not attach it again.
    let out = runner.reconcile(SystemTime::now(), true);
    assert!(out.reports.is_empty() && runner.attached().is_empty());
    let _ = fs::remove_dir(&pin_root);
}
