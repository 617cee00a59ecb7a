//! What an assignment may observe, decided fail-closed by the runner itself (DESIGN §3: "the
//! runner re-checks that a namespaced job's assignment stays inside that namespace").
//!
//! - a ClusterTraceJob sees the whole node only when its assignment says `nodeWide` and its
//!   spec selects no pods;
//! - every other assignment sees only the cgroups of its listed pods — and an empty list, or
//!   pods none of whose containers runs here, attaches nothing, never the whole node;
//! - a TraceJob (namespaced) asking for the whole node, or listing a pod of another
//!   namespace, is refused with the field that is wrong.

use fathom_crds::assignment::{TargetPod, TraceAssignmentSpec};

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use fathom_crds::spec::Probe;

use crate::{
    daemon::cgroups::{CgroupIndex, ContainerId},
    engine::{plan::Scope, render::CgroupLabels},
};

pub const TRACE_JOB: &str = "TraceJob";
pub const CLUSTER_TRACE_JOB: &str = "ClusterTraceJob";

/// Why an assignment is refused; each names the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("spec.job.kind: {0:?} is neither TraceJob nor ClusterTraceJob")]
    UnknownKind(String),
    #[error("spec.job.namespace: a TraceJob's assignment must name the job's namespace")]
    MissingNamespace,
    #[error(
        "spec.job.namespace: a ClusterTraceJob has no namespace, but the assignment names {0:?}"
    )]
    ClusterJobWithNamespace(String),
    #[error(
        "spec.nodeWide: a TraceJob may observe only pods of its namespace {namespace:?}, never the whole node"
    )]
    NamespacedNodeWide { namespace: String },
    #[error(
        "spec.nodeWide: set, but spec.trace.{0} selects pods; refusing to trace the whole node"
    )]
    NodeWideWithSelector(&'static str),
    #[error(
        "spec.targetPods[{index}].namespace: pod {pod_namespace}/{pod} is outside the job's namespace {namespace:?}"
    )]
    ForeignPod {
        index: usize,
        pod_namespace: String,
        pod: String,
        namespace: String,
    },
    #[error("spec.targetPods[{index}].containers[{container}].containerId: {message}")]
    BadContainerId {
        index: usize,
        container: usize,
        message: String,
    },
}

impl TargetError {
    /// A stable category for metric labels and status reasons.
    pub fn category(&self) -> &'static str {
        match self {
            TargetError::UnknownKind(_)
            | TargetError::MissingNamespace
            | TargetError::ClusterJobWithNamespace(_)
            | TargetError::BadContainerId { .. } => "InvalidArgument",
            TargetError::NamespacedNodeWide { .. }
            | TargetError::NodeWideWithSelector(_)
            | TargetError::ForeignPod { .. } => "PermissionDenied",
        }
    }
}

/// What an assignment is allowed to observe, before looking at this node's cgroups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allowed<'a> {
    /// Every task of the node.
    Node,
    /// Only the containers of these pods.
    Pods(&'a [TargetPod]),
}

/// The pure check: the assignment's kind, namespace, `nodeWide` and pod list against each
/// other.
pub fn allowed(spec: &TraceAssignmentSpec) -> Result<Allowed<'_>, TargetError> {
    let job = &spec.job;
    match job.kind.as_str() {
        CLUSTER_TRACE_JOB => {
            if let Some(ns) = &job.namespace {
                return Err(TargetError::ClusterJobWithNamespace(ns.clone()));
            }
            if spec.node_wide {
                if spec.trace.pod_selector.is_some() {
                    return Err(TargetError::NodeWideWithSelector("podSelector"));
                }
                if spec.trace.target_ref.is_some() {
                    return Err(TargetError::NodeWideWithSelector("targetRef"));
                }
                return Ok(Allowed::Node);
            }
        }
        TRACE_JOB => {
            let namespace = match job.namespace.as_deref() {
                Some(ns) if !ns.is_empty() => ns,
                _ => return Err(TargetError::MissingNamespace),
            };
            if spec.node_wide {
                return Err(TargetError::NamespacedNodeWide {
                    namespace: namespace.to_string(),
                });
            }
            if let Some((index, pod)) = spec
                .target_pods
                .iter()
                .enumerate()
                .find(|(_, p)| p.namespace != namespace)
            {
                return Err(TargetError::ForeignPod {
                    index,
                    pod_namespace: pod.namespace.clone(),
                    pod: pod.name.clone(),
                    namespace: namespace.to_string(),
                });
            }
        }
        other => return Err(TargetError::UnknownKind(other.to_string())),
    }
    Ok(Allowed::Pods(&spec.target_pods))
}

/// The engine scope of an assignment on this node, and how many of its started containers
/// have no cgroup here (yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub scope: Scope,
    /// Containers with an id whose cgroup was not found on this node.
    pub unresolved: usize,
    /// The target containers found on this node (none for a node-wide assignment).
    pub containers: Vec<Container>,
}

/// A target container on this node: its names, cgroups and processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    pub labels: CgroupLabels,
    /// Its cgroup ids (its sub-cgroups' included).
    pub ids: Vec<u64>,
    /// Its processes when the index was taken.
    pub pids: Vec<u32>,
}

impl Resolved {
    /// Namespace, pod and container of every target cgroup, for the engine's keys.
    pub fn labels(&self) -> HashMap<u64, CgroupLabels> {
        self.containers
            .iter()
            .flat_map(|c| c.ids.iter().map(|id| (*id, c.labels.clone())))
            .collect()
    }

    /// The processes of the target containers, in pod order.
    pub fn pids(&self) -> impl Iterator<Item = u32> + '_ {
        self.containers.iter().flat_map(|c| c.pids.iter().copied())
    }
}

/// The scope of an assignment: [`allowed`], then its pods' containers looked up in `index`.
/// `index` is `None` when this node has no cgroup v2 hierarchy: a pod-limited job then gets
/// [`Scope::Nothing`].
pub fn resolve(
    spec: &TraceAssignmentSpec,
    index: Option<&CgroupIndex>,
) -> Result<Resolved, TargetError> {
    let pods = match allowed(spec)? {
        Allowed::Node => {
            return Ok(Resolved {
                scope: Scope::Node,
                unresolved: 0,
                containers: Vec::new(),
            });
        }
        Allowed::Pods(pods) => pods,
    };
    let mut ids = Vec::new();
    let mut containers = Vec::new();
    let mut unresolved = 0;
    for (index_pod, pod) in pods.iter().enumerate() {
        for (index_c, c) in pod.containers.iter().enumerate() {
            let Some(raw) = c.container_id.as_deref() else {
                continue;
            };
            let id = ContainerId::parse(raw).map_err(|e| TargetError::BadContainerId {
                index: index_pod,
                container: index_c,
                message: e.to_string(),
            })?;
            let found = index.map(|i| (i.container_ids(&id, &pod.uid), i));
            match found {
                Some((found, index)) if !found.is_empty() => {
                    ids.extend(found.iter().copied());
                    containers.push(Container {
                        labels: CgroupLabels {
                            namespace: pod.namespace.clone(),
                            pod: pod.name.clone(),
                            container: c.name.clone(),
                        },
                        ids: found,
                        pids: index.container_pids(&id, &pod.uid),
                    });
                }
                _ => unresolved += 1,
            }
        }
    }
    Ok(Resolved {
        scope: Scope::targets(ids),
        unresolved,
        containers,
    })
}

/// The binary of a user-space probe (uprobe, uretprobe, USDT), which a pod-limited job names
/// as the containers see it.
pub fn user_binary(probe: &mut Probe) -> Option<&mut String> {
    match probe {
        Probe::Uprobe { binary, .. }
        | Probe::Uretprobe { binary, .. }
        | Probe::Usdt { binary, .. } => Some(binary),
        _ => None,
    }
}

/// The path, seen from this node, of `binary` as the process `pid` sees it: through
/// `<proc>/<pid>/root`, its mount namespace's root (the kernel resolves the container's
/// filesystem, overlays included). `None` when that process is gone or has no such file.
pub fn in_process_root(proc_root: &Path, pid: u32, binary: &str) -> Option<PathBuf> {
    let rel = binary.trim_start_matches('/');
    if rel.is_empty() || rel.split('/').any(|p| p == "..") {
        return None;
    }
    let path = proc_root.join(pid.to_string()).join("root").join(rel);
    path.is_file().then_some(path)
}

/// `binary` inside the target containers: `previous` while it still resolves (the same
/// process still runs, so the session is not restarted for a new path), else through the first
/// target process that has it. `None`: no target process here has that file.
pub fn container_binary(
    proc_root: &Path,
    binary: &str,
    pids: impl IntoIterator<Item = u32>,
    previous: Option<&(u32, PathBuf)>,
) -> Option<(u32, PathBuf)> {
    let pids: Vec<u32> = pids.into_iter().collect();
    if let Some((pid, path)) = previous
        && pids.contains(pid)
        && path.is_file()
    {
        return Some((*pid, path.clone()));
    }
    pids.into_iter()
        .find_map(|pid| in_process_root(proc_root, pid, binary).map(|p| (pid, p)))
}

#[cfg(test)]
mod tests {
    use fathom_crds::assignment::{JobRef, TargetContainer};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

    use super::*;

    const C1: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const POD: &str = "1a2b3c4d-0000-1111-2222-333344445555";

    fn spec(
        kind: &str,
        ns: Option<&str>,
        node_wide: bool,
        pods: &[(&str, &str)],
    ) -> TraceAssignmentSpec {
        TraceAssignmentSpec {
            job: JobRef {
                kind: kind.into(),
                name: "j".into(),
                namespace: ns.map(Into::into),
                uid: "job-uid".into(),
            },
            run: 1,
            node_name: "n".into(),
            node_wide,
            target_pods: pods
                .iter()
                .map(|(ns, name)| TargetPod {
                    namespace: (*ns).into(),
                    name: (*name).into(),
                    uid: POD.into(),
                    qos_class: None,
                    containers: vec![TargetContainer {
                        name: "c".into(),
                        container_id: Some(format!("containerd://{C1}")),
                    }],
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_cluster_job_is_node_wide_only_when_asked() {
        let s = spec(CLUSTER_TRACE_JOB, None, true, &[]);
        assert_eq!(resolve(&s, None).unwrap().scope, Scope::Node);
        let s = spec(CLUSTER_TRACE_JOB, None, false, &[]);
        assert_eq!(resolve(&s, None).unwrap().scope, Scope::Nothing);
    }

    #[test]
    fn a_node_wide_cluster_job_with_a_selector_is_refused() {
        let mut s = spec(CLUSTER_TRACE_JOB, None, true, &[]);
        s.trace.pod_selector = Some(LabelSelector::default());
        let e = resolve(&s, None).unwrap_err();
        assert_eq!(e, TargetError::NodeWideWithSelector("podSelector"));
        assert!(e.to_string().starts_with("spec.nodeWide"), "{e}");
    }

    #[test]
    fn a_namespaced_job_asking_node_wide_is_refused() {
        let s = spec(TRACE_JOB, Some("shop"), true, &[]);
        let e = resolve(&s, None).unwrap_err();
        assert!(matches!(e, TargetError::NamespacedNodeWide { .. }));
        assert!(e.to_string().starts_with("spec.nodeWide:"), "{e}");
        assert_eq!(e.category(), "PermissionDenied");
    }

    #[test]
    fn a_namespaced_job_listing_a_foreign_pod_is_refused() {
        let s = spec(
            TRACE_JOB,
            Some("shop"),
            false,
            &[("shop", "a"), ("kube-system", "b")],
        );
        let e = resolve(&s, None).unwrap_err();
        assert_eq!(
            e,
            TargetError::ForeignPod {
                index: 1,
                pod_namespace: "kube-system".into(),
                pod: "b".into(),
                namespace: "shop".into()
            }
        );
        assert!(
            e.to_string().starts_with("spec.targetPods[1].namespace:"),
            "{e}"
        );
    }

    #[test]
    fn malformed_jobs_are_refused() {
        assert_eq!(
            resolve(&spec(TRACE_JOB, None, false, &[]), None).unwrap_err(),
            TargetError::MissingNamespace
        );
        assert_eq!(
            resolve(&spec(TRACE_JOB, Some(""), false, &[]), None).unwrap_err(),
            TargetError::MissingNamespace
        );
        assert!(matches!(
            resolve(&spec("Pod", Some("x"), true, &[]), None).unwrap_err(),
            TargetError::UnknownKind(_)
        ));
        assert!(matches!(
            resolve(&spec(CLUSTER_TRACE_JOB, Some("x"), true, &[]), None).unwrap_err(),
            TargetError::ClusterJobWithNamespace(_)
        ));
        let mut s = spec(TRACE_JOB, Some("shop"), false, &[("shop", "a")]);
        s.target_pods[0].containers[0].container_id = Some("containerd://../x".into());
        let e = resolve(&s, None).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("spec.targetPods[0].containers[0].containerId"),
            "{e}"
        );
    }

    #[test]
    fn listed_pods_become_their_cgroups_or_nothing() {
        let dir = std::env::temp_dir().join(format!("fathom-targets-{}", std::process::id()));
        let cdir = dir.join(format!("kubepods/besteffort/pod{POD}/{C1}"));
        std::fs::create_dir_all(&cdir).unwrap();
        let id = crate::engine::render::cgroup_id(&cdir).unwrap();
        let index = CgroupIndex::scan(&dir);
        let s = spec(TRACE_JOB, Some("shop"), false, &[("shop", "a")]);
        let r = resolve(&s, Some(&index)).unwrap();
        assert_eq!(r.scope, Scope::targets([id]));
        assert_eq!(r.unresolved, 0);
        // No v2 hierarchy, or not on this node: nothing, never the node.
        let r = resolve(&s, None).unwrap();
        assert_eq!((r.scope, r.unresolved), (Scope::Nothing, 1));
        let empty = CgroupIndex::default();
        assert_eq!(resolve(&s, Some(&empty)).unwrap().scope, Scope::Nothing);
        // A cluster job's listed pods of any namespace.
        let s = spec(CLUSTER_TRACE_JOB, None, false, &[("other", "a")]);
        assert_eq!(
            resolve(&s, Some(&index)).unwrap().scope,
            Scope::targets([id])
        );
        // A container not started yet is not counted as unresolved.
        let mut s = spec(TRACE_JOB, Some("shop"), false, &[("shop", "a")]);
        s.target_pods[0].containers[0].container_id = None;
        let r = resolve(&s, Some(&index)).unwrap();
        assert_eq!((r.scope, r.unresolved), (Scope::Nothing, 0));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_binary_is_found_through_a_process_root_and_kept_while_it_runs() {
        let proc_root = Path::new("/proc");
        let me = std::process::id();
        let sh = in_process_root(proc_root, me, "/bin/sh").expect("/bin/sh through /proc/self");
        assert_eq!(sh, PathBuf::from(format!("/proc/{me}/root/bin/sh")));
        assert_eq!(in_process_root(proc_root, me, "/no/such/binary"), None);
        assert_eq!(
            in_process_root(proc_root, me, "/bin/../bin/sh"),
            None,
            "no .."
        );
        assert_eq!(in_process_root(proc_root, me, "/"), None);
        // The first target process that has it; a kept path while its process is a target.
        assert_eq!(
            container_binary(proc_root, "/bin/sh", [u32::MAX, me], None),
            Some((me, sh.clone()))
        );
        let kept = (me, sh.clone());
        assert_eq!(
            container_binary(proc_root, "/bin/sh", [1, me], Some(&kept)),
            Some(kept.clone())
        );
        assert_eq!(container_binary(proc_root, "/no/such", [me], None), None);
        assert_eq!(
            container_binary(proc_root, "/bin/sh", [], Some(&kept)),
            None
        );
    }

    #[test]
    fn user_probes_have_a_binary_kernel_probes_none() {
        let mut p = Probe::Uprobe {
            binary: "/app".into(),
            symbol: "f".into(),
        };
        *user_binary(&mut p).expect("uprobe") = "/proc/1/root/app".into();
        assert_eq!(
            p,
            Probe::Uprobe {
                binary: "/proc/1/root/app".into(),
                symbol: "f".into()
            }
        );
        assert!(user_binary(&mut Probe::Kprobe("f".into())).is_none());
    }
}
