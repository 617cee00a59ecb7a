//! Container id → cgroup ids on this node.
//!
//! The kernel filter compares `bpf_get_current_cgroup_id()`: the task's cgroup in the cgroup
//! v2 (unified) hierarchy, whose id is the inode number of its directory. That hierarchy is
//! mounted at /sys/fs/cgroup on a unified host and at /sys/fs/cgroup/unified on a hybrid one,
//! and the runtimes create each container's cgroup there whatever the layout:
//!
//! | layout | container directory |
//! |---|---|
//! | cgroupfs driver (containerd, runc) | `[/<prefix>]/kubepods/<qos>/pod<uid>/<id>` |
//! | CRI-O, cgroupfs driver | `[/<prefix>]/kubepods/<qos>/pod<uid>/crio-<id>` |
//! | systemd driver, containerd | `kubepods.slice/…/kubepods-<qos>-pod<uid_>.slice/cri-containerd-<id>.scope` |
//! | systemd driver, CRI-O | `…/kubepods-<qos>-pod<uid_>.slice/crio-<id>.scope` |
//! | systemd driver, Docker | `…/docker-<id>.scope` |
//!
//! So resolution is one bounded scan of the v2 tree into a [`CgroupIndex`] (container id →
//! directories), then a lookup per container: fast for hundreds of pods. A directory counts
//! only under its pod's directory (the pod uid in a parent's name), and a match brings its
//! sub-cgroups too (crun's `container` child under a systemd scope). A host without a v2
//! hierarchy (cgroup v1 only) cannot filter by cgroup at all: resolution fails there, and the
//! caller attaches nothing rather than the whole node.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
};

use crate::engine::render::{cgroup_id, cgroup2_mount};

/// How deep below the v2 root the scan looks: enough for the systemd layout under a prefix
/// (`prefix/kubepods.slice/kubepods-<qos>.slice/kubepods-…-pod….slice/cri-containerd-….scope/container`).
pub const MAX_DEPTH: usize = 9;

/// What can go wrong finding a container's cgroups.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CgroupError {
    /// The id is not `<runtime>://<hex id>`.
    #[error(
        "container id {0:?} is not `<runtime>://<id>` with a hexadecimal id (as in pod.status.containerStatuses)"
    )]
    BadContainerId(String),
    /// No cgroup v2 hierarchy is mounted: the kernel's cgroup filter cannot tell pods apart.
    #[error(
        "no cgroup v2 (unified) hierarchy is mounted on this node: a job limited to pods cannot be filtered here (mount cgroup2, e.g. at /sys/fs/cgroup/unified)"
    )]
    NoUnifiedHierarchy,
}

/// A container runtime's id, split from its `<runtime>://` prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerId {
    pub runtime: String,
    pub id: String,
}

impl ContainerId {
    /// Parses `containerd://<id>`, `cri-o://<id>`, `docker://<id>` (any runtime name); the id
    /// must be hexadecimal, which also keeps path characters out of the lookup.
    pub fn parse(s: &str) -> Result<ContainerId, CgroupError> {
        let bad = || CgroupError::BadContainerId(s.to_string());
        let (runtime, id) = s.split_once("://").ok_or_else(bad)?;
        let hex = id.len() >= 12 && id.chars().all(|c| c.is_ascii_hexdigit());
        if runtime.is_empty() || !hex {
            return Err(bad());
        }
        Ok(ContainerId {
            runtime: runtime.to_string(),
            id: id.to_ascii_lowercase(),
        })
    }
}

/// The container id a cgroup directory's name stands for, if it is a container's:
/// `<id>`, `crio-<id>`, `<prefix>-<id>.scope`. CRI-O's monitor (`crio-conmon-<id>.scope`) is
/// not the container.
pub fn container_of_dir(name: &str) -> Option<&str> {
    let name = name.strip_suffix(".scope").unwrap_or(name);
    if name.starts_with("crio-conmon-") {
        return None;
    }
    let id = [
        "cri-containerd-",
        "crio-",
        "docker-",
        "containerd-",
        "libpod-",
    ]
    .iter()
    .find_map(|p| name.strip_prefix(p))
    .unwrap_or(name);
    (id.len() == 64 && id.chars().all(|c| c.is_ascii_hexdigit())).then_some(id)
}

/// Whether a cgroup path lies under the directory of the pod with this uid
/// (`pod<uid>` with the cgroupfs driver, `…-pod<uid with _>.slice` with systemd).
pub fn under_pod(path: &Path, pod_uid: &str) -> bool {
    let cgroupfs = format!("pod{pod_uid}");
    let systemd = format!("pod{}.slice", pod_uid.replace('-', "_"));
    path.components().any(|c| {
        let c = c.as_os_str().to_string_lossy();
        c == cgroupfs || c.ends_with(&systemd)
    })
}

/// One container cgroup found by the scan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    /// The directory, below the v2 root.
    pub path: PathBuf,
    /// Its cgroup id and those of its sub-cgroups.
    pub ids: Vec<u64>,
}

/// One scan of the v2 hierarchy: container id → the directories named after it.
#[derive(Debug, Default)]
pub struct CgroupIndex {
    /// The v2 mount scanned.
    root: PathBuf,
    containers: HashMap<String, Vec<Found>>,
}

impl CgroupIndex {
    /// Scans `root` (the v2 mount) to [`MAX_DEPTH`]. Unreadable directories (a cgroup removed
    /// while scanning) are skipped.
    pub fn scan(root: &Path) -> CgroupIndex {
        let mut index = CgroupIndex {
            root: root.to_path_buf(),
            ..CgroupIndex::default()
        };
        let mut stack = vec![(root.to_path_buf(), 0usize)];
        while let Some((dir, depth)) = stack.pop() {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                if !e.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let path = e.path();
                let name = e.file_name();
                if let Some(id) = container_of_dir(&name.to_string_lossy()) {
                    let ids = subtree_ids(&path, MAX_DEPTH.saturating_sub(depth + 1));
                    if !ids.is_empty() {
                        let rel = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
                        index
                            .containers
                            .entry(id.to_ascii_lowercase())
                            .or_default()
                            .push(Found { path: rel, ids });
                    }
                } else if depth + 1 < MAX_DEPTH {
                    stack.push((path, depth + 1));
                }
            }
        }
        index
    }

    /// How many containers the scan found.
    pub fn len(&self) -> usize {
        self.containers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.containers.is_empty()
    }

    /// The cgroup ids of a container of the pod `pod_uid`; empty when it has none on this
    /// node (not started, another node, or its directory is not under that pod's).
    pub fn container_ids(&self, container: &ContainerId, pod_uid: &str) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .containers
            .get(&container.id)
            .into_iter()
            .flatten()
            .filter(|f| under_pod(&f.path, pod_uid))
            .flat_map(|f| f.ids.iter().copied())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

impl CgroupIndex {
    /// The processes of a container of the pod `pod_uid` now (its cgroup's and sub-cgroups'
    /// `cgroup.procs`), sorted; empty when it has none on this node.
    pub fn container_pids(&self, container: &ContainerId, pod_uid: &str) -> Vec<u32> {
        let mut pids = Vec::new();
        for f in self
            .containers
            .get(&container.id)
            .into_iter()
            .flatten()
            .filter(|f| under_pod(&f.path, pod_uid))
        {
            let mut stack = vec![(self.root.join(&f.path), 0usize)];
            while let Some((dir, level)) = stack.pop() {
                if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
                    pids.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
                }
                if level >= MAX_DEPTH {
                    continue;
                }
                for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        stack.push((e.path(), level + 1));
                    }
                }
            }
        }
        pids.sort_unstable();
        pids.dedup();
        pids
    }
}

/// The ids of `dir` and its sub-cgroups down to `depth` more levels.
fn subtree_ids(dir: &Path, depth: usize) -> Vec<u64> {
    let mut ids = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), 0usize)];
    while let Some((d, level)) = stack.pop() {
        let Ok(id) = cgroup_id(&d) else { continue };
        ids.push(id);
        if level >= depth {
            continue;
        }
        if let Ok(entries) = fs::read_dir(&d) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push((e.path(), level + 1));
                }
            }
        }
    }
    ids
}

/// Where this node's cgroup v2 hierarchy is, or why there is none.
#[derive(Clone, Debug)]
pub struct CgroupRoot {
    pub root: PathBuf,
}

impl CgroupRoot {
    /// The running host's v2 mount (/sys/fs/cgroup, or /sys/fs/cgroup/unified on a hybrid
    /// host); an error on a cgroup v1-only host.
    pub fn host() -> Result<CgroupRoot, CgroupError> {
        cgroup2_mount()
            .map(|root| CgroupRoot { root })
            .ok_or(CgroupError::NoUnifiedHierarchy)
    }

    pub fn at(root: impl Into<PathBuf>) -> CgroupRoot {
        CgroupRoot { root: root.into() }
    }

    /// One scan of the hierarchy.
    pub fn index(&self) -> CgroupIndex {
        CgroupIndex::scan(&self.root)
    }

    /// The fallback through a process of the container: the `0::<path>` line of
    /// `<proc>/<pid>/cgroup` (the v2 entry, present on unified and hybrid hosts) → the id of
    /// that directory.
    pub fn of_process(&self, proc_root: &Path, pid: u32) -> Option<u64> {
        let text = fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup")).ok()?;
        let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
        let rel = rel.trim().trim_start_matches('/');
        if rel.split('/').any(|p| p == "..") {
            return None;
        }
        cgroup_id(&self.root.join(rel)).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const C1: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const C2: &str = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";
    const POD: &str = "1a2b3c4d-0000-1111-2222-333344445555";

    /// A fresh directory under the system's temp dir, removed on drop.
    struct TempTree(PathBuf);

    impl TempTree {
        fn new(name: &str) -> TempTree {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let dir = std::env::temp_dir().join(format!(
                "fathom-cgroups-{name}-{}-{nanos}",
                std::process::id()
            ));
            fs::create_dir_all(&dir).unwrap();
            TempTree(dir)
        }

        fn mkdir(&self, rel: &str) -> u64 {
            let p = self.0.join(rel);
            fs::create_dir_all(&p).unwrap();
            cgroup_id(&p).unwrap()
        }
    }

    impl Drop for TempTree {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn cid(runtime: &str, id: &str) -> ContainerId {
        ContainerId::parse(&format!("{runtime}://{id}")).unwrap()
    }

    /// Builds `layout` (container dir of C1 in pod POD) plus noise, and checks the lookup.
    fn resolves(name: &str, runtime: &str, container_dir: &str) {
        let t = TempTree::new(name);
        let id = t.mkdir(container_dir);
        t.mkdir("system.slice/containerd.service");
        t.mkdir("user.slice/user-0.slice/session-1.scope");
        let index = CgroupRoot::at(&t.0).index();
        assert_eq!(
            index.container_ids(&cid(runtime, C1), POD),
            vec![id],
            "{container_dir}"
        );
        assert!(index.container_ids(&cid(runtime, C2), POD).is_empty());
        assert!(
            index
                .container_ids(&cid(runtime, C1), "99999999-0000-1111-2222-333344445555")
                .is_empty(),
            "a container outside its pod's directory is not that pod's"
        );
    }

    #[test]
    fn cgroupfs_containerd_layout() {
        resolves(
            "cgroupfs",
            "containerd",
            &format!("kubepods/besteffort/pod{POD}/{C1}"),
        );
        resolves(
            "guaranteed",
            "containerd",
            &format!("kubepods/pod{POD}/{C1}"),
        );
    }

    #[test]
    fn cgroupfs_layout_under_a_root_prefix() {
        resolves(
            "prefix",
            "containerd",
            &format!("fathom/kubepods/burstable/pod{POD}/{C1}"),
        );
    }

    #[test]
    fn crio_layouts() {
        resolves(
            "crio-cgroupfs",
            "cri-o",
            &format!("kubepods/burstable/pod{POD}/crio-{C1}"),
        );
        let pod_ = POD.replace('-', "_");
        resolves(
            "crio-systemd",
            "cri-o",
            &format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{pod_}.slice/crio-{C1}.scope"
            ),
        );
    }

    #[test]
    fn systemd_containerd_and_docker_layouts() {
        let pod_ = POD.replace('-', "_");
        let slice =
            format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{pod_}.slice");
        resolves(
            "systemd",
            "containerd",
            &format!("{slice}/cri-containerd-{C1}.scope"),
        );
        resolves("docker", "docker", &format!("{slice}/docker-{C1}.scope"));
    }

    #[test]
    fn the_conmon_scope_is_not_the_container_and_sub_cgroups_count() {
        let t = TempTree::new("conmon");
        let pod_ = POD.replace('-', "_");
        let slice = format!("kubepods.slice/kubepods-pod{pod_}.slice");
        t.mkdir(&format!("{slice}/crio-conmon-{C1}.scope"));
        let scope = t.mkdir(&format!("{slice}/crio-{C1}.scope"));
        let child = t.mkdir(&format!("{slice}/crio-{C1}.scope/container"));
        let mut want = vec![scope, child];
        want.sort_unstable();
        let index = CgroupRoot::at(&t.0).index();
        assert_eq!(index.container_ids(&cid("cri-o", C1), POD), want);
        assert_eq!(index.len(), 1);
    }

    #[test]
    fn hybrid_host_resolves_in_the_unified_tree_only() {
        // A hybrid host: v1 controllers next to the unified mount; the scan is given the
        // unified root, so only the v2 directory's inode counts.
        let t = TempTree::new("hybrid");
        t.mkdir(&format!("memory/kubepods/besteffort/pod{POD}/{C1}"));
        let v2 = t.mkdir(&format!("unified/kubepods/besteffort/pod{POD}/{C1}"));
        let index = CgroupRoot::at(t.0.join("unified")).index();
        assert_eq!(index.container_ids(&cid("containerd", C1), POD), vec![v2]);
    }

    #[test]
    fn many_pods_resolve_from_one_scan() {
        let t = TempTree::new("many");
        let mut want = Vec::new();
        for i in 0..300u32 {
            let pod = format!("{i:08x}-0000-1111-2222-333344445555");
            let c = format!("{i:064x}");
            want.push((
                pod.clone(),
                c.clone(),
                t.mkdir(&format!("kubepods/burstable/pod{pod}/{c}")),
            ));
        }
        let start = std::time::Instant::now();
        let index = CgroupRoot::at(&t.0).index();
        for (pod, c, id) in &want {
            assert_eq!(index.container_ids(&cid("containerd", c), pod), vec![*id]);
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(2));
    }

    #[test]
    fn container_ids_are_checked() {
        assert_eq!(
            ContainerId::parse(&format!("containerd://{C1}"))
                .unwrap()
                .id,
            C1
        );
        assert_eq!(
            ContainerId::parse(&format!("cri-o://{C2}"))
                .unwrap()
                .runtime,
            "cri-o"
        );
        for bad in [
            C1.to_string(),
            format!("containerd://../../{C1}"),
            "containerd://".into(),
            format!("://{C1}"),
            "docker://abc".into(),
        ] {
            assert!(ContainerId::parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_process_fallback_reads_the_v2_line() {
        let t = TempTree::new("proc");
        let id = t.mkdir(&format!("cg/kubepods/pod{POD}/{C1}"));
        fs::create_dir_all(t.0.join("proc/42")).unwrap();
        fs::write(
            t.0.join("proc/42/cgroup"),
            format!("12:memory:/kubepods/pod{POD}/{C1}\n0::/kubepods/pod{POD}/{C1}\n"),
        )
        .unwrap();
        fs::create_dir_all(t.0.join("proc/43")).unwrap();
        fs::write(t.0.join("proc/43/cgroup"), "0::/../../etc\n").unwrap();
        let root = CgroupRoot::at(t.0.join("cg"));
        assert_eq!(root.of_process(&t.0.join("proc"), 42), Some(id));
        assert_eq!(root.of_process(&t.0.join("proc"), 43), None);
        assert_eq!(root.of_process(&t.0.join("proc"), 44), None);
    }
}
