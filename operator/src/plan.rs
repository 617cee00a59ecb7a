//! Planning: (job, nodes, pods) → the nodes a job runs on and the pods it traces there.
//!
//! Pure and synchronous: no API, no clock. The operator builds a [`ClusterView`] from its
//! caches and calls [`plan_assignments`]; tests and the benchmark call it with hand-made
//! objects.
//!
//! A node is eligible when it is Ready and the runner DaemonSet's pods may run there: every
//! `NoSchedule`/`NoExecute` taint is tolerated by the runner's tolerations. A cordoned node
//! (`spec.unschedulable`) stays eligible, as DaemonSet pods tolerate
//! `node.kubernetes.io/unschedulable`. A job's `nodeSelector` narrows the eligible nodes;
//! a `podSelector` or workload selector narrows them further to the nodes that host a
//! matching pod, and lists those pods. A namespaced job sees only pods of its own namespace.

use std::collections::BTreeMap;

use fathom_crds::{
    assignment::{TargetContainer, TargetPod},
    job::NodeReason,
};
use k8s_openapi::api::core::v1::{Node, Pod, Taint, Toleration};
use kube::core::{Selector, SelectorExt};

/// The tolerations every DaemonSet pod gets from the DaemonSet controller, so the runner's
/// pods have them whatever the chart says.
pub fn daemonset_default_tolerations() -> Vec<Toleration> {
    let t = |key: &str, effect: &str| Toleration {
        key: Some(key.to_string()),
        operator: Some("Exists".to_string()),
        effect: Some(effect.to_string()),
        ..Default::default()
    };
    vec![
        t("node.kubernetes.io/not-ready", "NoExecute"),
        t("node.kubernetes.io/unreachable", "NoExecute"),
        t("node.kubernetes.io/disk-pressure", "NoSchedule"),
        t("node.kubernetes.io/memory-pressure", "NoSchedule"),
        t("node.kubernetes.io/pid-pressure", "NoSchedule"),
        t("node.kubernetes.io/unschedulable", "NoSchedule"),
    ]
}

/// Whether `toleration` tolerates `taint`, with Kubernetes' rules.
pub fn tolerates(toleration: &Toleration, taint: &Taint) -> bool {
    if let Some(effect) = toleration.effect.as_deref()
        && !effect.is_empty()
        && effect != taint.effect
    {
        return false;
    }
    let exists = toleration.operator.as_deref() == Some("Exists");
    match toleration.key.as_deref() {
        None | Some("") => exists,
        Some(key) if key != taint.key => false,
        Some(_) if exists => true,
        Some(_) => {
            toleration.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or("")
        }
    }
}

/// Why a node is left out of a job's plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exclusion<'a> {
    /// The node's Ready condition is not True.
    NotReady,
    /// A NoSchedule/NoExecute taint the runner does not tolerate.
    Untolerated(&'a str),
    /// The job's nodeSelector does not match.
    NodeSelector,
    /// Target pods run there, but the node does not exist in the cache.
    Unknown,
}

impl Exclusion<'_> {
    /// A stable reason for status and events.
    pub fn reason(&self) -> &'static str {
        match self {
            Exclusion::NotReady => "NotReady",
            Exclusion::Untolerated(_) => "Taint",
            Exclusion::NodeSelector => "NodeSelector",
            Exclusion::Unknown => "NodeUnknown",
        }
    }

    pub fn message(&self) -> String {
        match self {
            Exclusion::NotReady => "node is not Ready".into(),
            Exclusion::Untolerated(key) => {
                format!("taint {key} is not tolerated by the runner DaemonSet")
            }
            Exclusion::NodeSelector => "does not match spec.nodeSelector".into(),
            Exclusion::Unknown => "the node of the target pods is unknown".into(),
        }
    }
}

/// A node as planning sees it.
#[derive(Debug)]
pub struct NodeInfo<'a> {
    pub name: &'a str,
    labels: Option<&'a BTreeMap<String, String>>,
    /// Ok when the runner can run there; else why not.
    pub eligible: Result<(), Exclusion<'a>>,
}

impl<'a> NodeInfo<'a> {
    fn label(&self, key: &str) -> Option<&'a str> {
        self.labels.and_then(|l| l.get(key)).map(String::as_str)
    }
}

/// A pod as planning sees it: scheduled, not finished, not terminating.
#[derive(Debug)]
pub struct PodInfo<'a> {
    pub pod: &'a Pod,
    pub namespace: &'a str,
    pub name: &'a str,
    pub node: &'a str,
    labels: Option<&'a BTreeMap<String, String>>,
}

impl PodInfo<'_> {
    fn matches(&self, selector: &Selector) -> bool {
        match self.labels {
            Some(l) => selector.matches(l),
            None => selector.matches(&BTreeMap::new()),
        }
    }

    /// The assignment's view of the pod.
    pub fn target(&self) -> TargetPod {
        let statuses = self
            .pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_deref())
            .unwrap_or_default();
        let containers = self
            .pod
            .spec
            .as_ref()
            .map(|s| s.containers.as_slice())
            .unwrap_or_default()
            .iter()
            .map(|c| TargetContainer {
                name: c.name.clone(),
                container_id: statuses
                    .iter()
                    .find(|s| s.name == c.name)
                    .and_then(|s| s.container_id.clone()),
            })
            .collect();
        TargetPod {
            namespace: self.namespace.to_string(),
            name: self.name.to_string(),
            uid: self.pod.metadata.uid.clone().unwrap_or_default(),
            qos_class: self.pod.status.as_ref().and_then(|s| s.qos_class.clone()),
            containers,
        }
    }
}

/// Nodes and pods indexed for planning many jobs.
#[derive(Debug, Default)]
pub struct ClusterView<'a> {
    /// Sorted by name.
    nodes: Vec<NodeInfo<'a>>,
    /// Running pods by namespace, each list sorted by name.
    pods: BTreeMap<&'a str, Vec<PodInfo<'a>>>,
}

fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn pod_runs(pod: &Pod) -> bool {
    if pod.metadata.deletion_timestamp.is_some() {
        return false;
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    !matches!(phase, Some("Succeeded" | "Failed"))
}

impl<'a> ClusterView<'a> {
    /// Indexes `nodes` and `pods`; `tolerations` are the runner DaemonSet's (with
    /// [`daemonset_default_tolerations`] included by the caller).
    pub fn new(
        nodes: impl IntoIterator<Item = &'a Node>,
        pods: impl IntoIterator<Item = &'a Pod>,
        tolerations: &[Toleration],
    ) -> Self {
        let mut infos: Vec<NodeInfo<'a>> = nodes
            .into_iter()
            .filter_map(|node| {
                let name = node.metadata.name.as_deref()?;
                let eligible = if !node_ready(node) {
                    Err(Exclusion::NotReady)
                } else {
                    let taints = node
                        .spec
                        .as_ref()
                        .and_then(|s| s.taints.as_deref())
                        .unwrap_or_default();
                    match taints.iter().find(|t| {
                        (t.effect == "NoSchedule" || t.effect == "NoExecute")
                            && !tolerations.iter().any(|tol| tolerates(tol, t))
                    }) {
                        Some(t) => Err(Exclusion::Untolerated(t.key.as_str())),
                        None => Ok(()),
                    }
                };
                Some(NodeInfo {
                    name,
                    labels: node.metadata.labels.as_ref(),
                    eligible,
                })
            })
            .collect();
        infos.sort_by(|a, b| a.name.cmp(b.name));
        let mut by_ns: BTreeMap<&'a str, Vec<PodInfo<'a>>> = BTreeMap::new();
        for pod in pods {
            let (Some(namespace), Some(name)) = (
                pod.metadata.namespace.as_deref(),
                pod.metadata.name.as_deref(),
            ) else {
                continue;
            };
            let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) else {
                continue;
            };
            if !pod_runs(pod) {
                continue;
            }
            by_ns.entry(namespace).or_default().push(PodInfo {
                pod,
                namespace,
                name,
                node,
                labels: pod.metadata.labels.as_ref(),
            });
        }
        for list in by_ns.values_mut() {
            list.sort_by(|a, b| a.name.cmp(b.name));
        }
        ClusterView {
            nodes: infos,
            pods: by_ns,
        }
    }

    pub fn node(&self, name: &str) -> Option<&NodeInfo<'a>> {
        self.nodes
            .binary_search_by(|n| n.name.cmp(name))
            .ok()
            .map(|i| &self.nodes[i])
    }

    pub fn nodes(&self) -> &[NodeInfo<'a>] {
        &self.nodes
    }

    fn pods_in<'s>(
        &'s self,
        namespace: Option<&str>,
    ) -> Box<dyn Iterator<Item = &'s PodInfo<'a>> + 's> {
        match namespace {
            Some(ns) => Box::new(self.pods.get(ns).into_iter().flatten()),
            None => Box::new(self.pods.values().flatten()),
        }
    }
}

/// Which pods a job targets.
#[derive(Debug, Clone)]
pub enum Targets {
    /// Every process on the node (ClusterTraceJob only).
    NodeWide,
    /// The pods this selector matches (a podSelector, or a workload's selector).
    Pods(Selector),
}

/// What planning needs to know about a job.
#[derive(Debug, Clone)]
pub struct PlanInput<'j> {
    /// The job's namespace for a TraceJob (its pods only); None for a ClusterTraceJob.
    pub namespace: Option<&'j str>,
    pub node_selector: Option<&'j BTreeMap<String, String>>,
    pub targets: Targets,
}

/// The plan of one job.
#[derive(Debug, Default, PartialEq)]
pub struct Plan<'a> {
    /// Node → the pods to trace there (empty for a node-wide job), sorted.
    pub nodes: BTreeMap<&'a str, Vec<&'a PodInfo<'a>>>,
    pub node_wide: bool,
    /// Nodes left out and why: for a node-wide job, every node that is not used; for a pod
    /// job, the nodes that host target pods but are not eligible.
    pub excluded: Vec<(&'a str, Exclusion<'a>)>,
    /// Target pods on eligible nodes.
    pub pod_count: usize,
}

impl PartialEq for PodInfo<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.namespace == other.namespace && self.name == other.name && self.node == other.node
    }
}

impl Plan<'_> {
    /// The target pods of one node, as the assignment lists them.
    pub fn targets(&self, node: &str) -> Vec<TargetPod> {
        self.nodes
            .get(node)
            .map(|pods| pods.iter().map(|p| p.target()).collect())
            .unwrap_or_default()
    }

    /// Excluded nodes as status entries, at most `limit`.
    pub fn excluded_reasons(&self, limit: usize) -> Vec<NodeReason> {
        self.excluded
            .iter()
            .take(limit)
            .map(|(node, why)| NodeReason {
                node: node.to_string(),
                reason: why.reason().to_string(),
                message: why.message(),
            })
            .collect()
    }
}

fn selector_matches(node: &NodeInfo<'_>, selector: Option<&BTreeMap<String, String>>) -> bool {
    selector.is_none_or(|sel| sel.iter().all(|(k, v)| node.label(k) == Some(v.as_str())))
}

/// Plans one job: the nodes it runs on, the pods it traces there, the nodes left out.
pub fn plan_assignments<'a>(job: &PlanInput<'_>, view: &'a ClusterView<'a>) -> Plan<'a> {
    let mut plan = Plan::default();
    match &job.targets {
        Targets::NodeWide => {
            plan.node_wide = true;
            // Nodes are sorted: collecting a sorted list builds the map in one pass.
            let mut chosen: Vec<(&'a str, Vec<&'a PodInfo<'a>>)> =
                Vec::with_capacity(view.nodes.len());
            for node in &view.nodes {
                let why = match node.eligible {
                    Err(e) => Some(e),
                    Ok(()) if !selector_matches(node, job.node_selector) => {
                        Some(Exclusion::NodeSelector)
                    }
                    Ok(()) => None,
                };
                match why {
                    None => chosen.push((node.name, Vec::new())),
                    Some(e) => plan.excluded.push((node.name, e)),
                }
            }
            plan.nodes = chosen.into_iter().collect();
        }
        Targets::Pods(selector) => {
            let mut excluded: BTreeMap<&'a str, Exclusion<'a>> = BTreeMap::new();
            for pod in view.pods_in(job.namespace) {
                if !pod.matches(selector) {
                    continue;
                }
                let why = match view.node(pod.node) {
                    None => Some(Exclusion::Unknown),
                    Some(node) => match node.eligible {
                        Err(e) => Some(e),
                        Ok(()) if !selector_matches(node, job.node_selector) => {
                            Some(Exclusion::NodeSelector)
                        }
                        Ok(()) => None,
                    },
                };
                match why {
                    None => {
                        plan.nodes.entry(pod.node).or_default().push(pod);
                        plan.pod_count += 1;
                    }
                    Some(e) => {
                        excluded.insert(pod.node, e);
                    }
                }
            }
            for pods in plan.nodes.values_mut() {
                pods.sort_by(|a, b| (a.namespace, a.name).cmp(&(b.namespace, b.name)));
            }
            plan.excluded = excluded.into_iter().collect();
        }
    }
    plan
}
