//! Test support: the in-memory API, hand-made nodes and pods, and a `World` that runs the real
//! reconciler against them with a hand-moved clock.

#![allow(
    dead_code,
    reason = "each test binary uses a different part of the support module"
)]

pub mod api;

use std::{collections::BTreeMap, sync::Arc};

use api::{ManualClock, MemoryApi};
use fathom_crds::{ClusterTraceJob, TraceAssignment, TraceJob, TraceResult};
use fathom_operator::{
    collector::Collector,
    events::EventRecorder,
    metrics::Metrics,
    reconcile::{self, Context, JobObject, ReconcileConfig},
};
use jiff::Timestamp;
use k8s_openapi::{
    api::core::v1::{
        Container, ContainerStatus, Node, NodeCondition, NodeSpec, NodeStatus, Pod, PodSpec,
        PodStatus, Taint,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
    runtime::{
        controller::Action,
        reflector::{self, store::Writer},
        watcher,
    },
};
use serde_json::{Value, json};

pub const FATHOM: &str = "apis/fathom.dev/v1alpha1";

pub fn node(name: &str, labels: &[(&str, &str)], ready: bool, taints: &[(&str, &str)]) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            taints: Some(
                taints
                    .iter()
                    .map(|(k, e)| Taint {
                        key: k.to_string(),
                        effect: e.to_string(),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        status: Some(NodeStatus {
            conditions: Some(vec![NodeCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
}

pub fn ready_node(name: &str) -> Node {
    node(name, &[("kubernetes.io/os", "linux")], true, &[])
}

pub fn pod(ns: &str, name: &str, labels: &[(&str, &str)], node: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            uid: Some(format!("pod-uid-{ns}-{name}")),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            containers: vec![Container {
                name: "main".into(),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            qos_class: Some("BestEffort".into()),
            container_statuses: Some(vec![ContainerStatus {
                name: "main".into(),
                container_id: Some(format!("containerd://{name}")),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
}

/// The operator, the in-memory API and the caches, driven by hand.
pub struct World {
    pub api: MemoryApi,
    pub clock: Arc<ManualClock>,
    pub ctx: Arc<Context>,
    pub client: kube::Client,
    nodes: Writer<Node>,
    pods: Writer<Pod>,
    node_objs: BTreeMap<String, Node>,
    pod_objs: BTreeMap<String, Pod>,
}

impl World {
    pub fn new() -> World {
        Self::with_config(ReconcileConfig {
            operator_namespace: "fathom-system".into(),
            ..Default::default()
        })
    }

    /// A world whose reconciler tells a collector of each job's assignments.
    pub fn with_collector() -> World {
        Self::build(
            ReconcileConfig {
                operator_namespace: "fathom-system".into(),
                ..Default::default()
            },
            Some(Collector::new()),
        )
    }

    pub fn with_config(config: ReconcileConfig) -> World {
        Self::build(config, None)
    }

    fn build(config: ReconcileConfig, collector: Option<Arc<Collector>>) -> World {
        let clock = ManualClock::new(Timestamp::from_second(1_750_000_000).expect("time"));
        let api = MemoryApi::new(clock.clone());
        let client = api.client();
        let (node_store, nodes) = reflector::store::<Node>();
        let (pod_store, pods) = reflector::store::<Pod>();
        let ctx = Arc::new(Context {
            client: client.clone(),
            nodes: node_store,
            pods: pod_store,
            config,
            events: Box::new(EventRecorder::new(client.clone(), "test")),
            metrics: Arc::new(Metrics::default()),
            clock: clock.clone(),
            conflicts: Default::default(),
            collector,
        });
        World {
            api,
            clock,
            ctx,
            client,
            nodes,
            pods,
            node_objs: BTreeMap::new(),
            pod_objs: BTreeMap::new(),
        }
    }

    pub fn add_node(&mut self, n: Node) {
        self.node_objs
            .insert(n.metadata.name.clone().expect("name"), n.clone());
        self.nodes.apply_watcher_event(&watcher::Event::Apply(n));
    }

    pub fn remove_node(&mut self, name: &str) {
        if let Some(n) = self.node_objs.remove(name) {
            self.nodes.apply_watcher_event(&watcher::Event::Delete(n));
        }
    }

    pub fn add_pod(&mut self, p: Pod) {
        let key = format!(
            "{}/{}",
            p.metadata.namespace.clone().unwrap_or_default(),
            p.metadata.name.clone().unwrap_or_default()
        );
        self.pod_objs.insert(key, p.clone());
        self.pods.apply_watcher_event(&watcher::Event::Apply(p));
    }

    pub fn remove_pod(&mut self, ns: &str, name: &str) {
        if let Some(p) = self.pod_objs.remove(&format!("{ns}/{name}")) {
            self.pods.apply_watcher_event(&watcher::Event::Delete(p));
        }
    }

    /// Creates a TraceJob from YAML through the API (as kubectl would).
    pub async fn create_job(&self, yaml: &str) -> TraceJob {
        let job: TraceJob = serde_yaml::from_str(yaml).expect("job yaml");
        let ns = job.metadata.namespace.clone().expect("namespace");
        Api::<TraceJob>::namespaced(self.client.clone(), &ns)
            .create(&PostParams::default(), &job)
            .await
            .expect("create job")
    }

    pub async fn create_cluster_job(&self, yaml: &str) -> ClusterTraceJob {
        let job: ClusterTraceJob = serde_yaml::from_str(yaml).expect("job yaml");
        Api::<ClusterTraceJob>::all(self.client.clone())
            .create(&PostParams::default(), &job)
            .await
            .expect("create job")
    }

    pub async fn job(&self, ns: &str, name: &str) -> Option<TraceJob> {
        Api::<TraceJob>::namespaced(self.client.clone(), ns)
            .get_opt(name)
            .await
            .expect("get job")
    }

    pub async fn cluster_job(&self, name: &str) -> Option<ClusterTraceJob> {
        Api::<ClusterTraceJob>::all(self.client.clone())
            .get_opt(name)
            .await
            .expect("get job")
    }

    /// Reads the job from the API and reconciles it once, as the controller would.
    pub async fn reconcile(&self, ns: &str, name: &str) -> Action {
        let job = self.job(ns, name).await.expect("job exists");
        reconcile::reconcile(Arc::new(job), self.ctx.clone())
            .await
            .expect("reconcile succeeds")
    }

    pub async fn reconcile_cluster(&self, name: &str) -> Action {
        let job = self.cluster_job(name).await.expect("job exists");
        reconcile::reconcile(Arc::new(job), self.ctx.clone())
            .await
            .expect("reconcile succeeds")
    }

    /// Reconciles until the job makes no more writes (at most 10 rounds); returns the rounds.
    pub async fn settle(&self, ns: &str, name: &str) -> usize {
        for round in 1..=10 {
            self.api.clear_calls();
            if self.job(ns, name).await.is_none() {
                return round;
            }
            self.reconcile(ns, name).await;
            if self.api.writes().is_empty() {
                return round;
            }
        }
        panic!(
            "job {ns}/{name} still writes after 10 reconciles: {:?}",
            self.api.writes()
        );
    }

    /// The assignments of the jobs of namespace `ns` (of ClusterTraceJobs when `ns` is the
    /// operator's namespace), sorted by node. Every assignment the operator wrote lives in the
    /// operator's namespace, whatever its job's: checked here for each one.
    pub fn assignments(&self, ns: &str) -> Vec<TraceAssignment> {
        let operator_ns = self.ctx.config.operator_namespace.clone();
        let mut v: Vec<TraceAssignment> = self
            .api
            .list(FATHOM, "traceassignments")
            .into_iter()
            .filter(|a| a["metadata"]["namespace"] == json!(operator_ns))
            .map(|a| serde_json::from_value::<TraceAssignment>(a).expect("assignment"))
            .filter(|a| a.spec.job.namespace.as_deref().unwrap_or(&operator_ns) == ns)
            .collect();
        v.sort_by(|a, b| a.spec.node_name.cmp(&b.spec.node_name));
        v
    }

    /// The assignments stored in namespace `ns`, whoever wrote them.
    pub fn assignments_in(&self, ns: &str) -> Vec<TraceAssignment> {
        self.api
            .list(FATHOM, "traceassignments")
            .into_iter()
            .filter(|a| a["metadata"]["namespace"] == json!(ns))
            .map(|a| serde_json::from_value(a).expect("assignment"))
            .collect()
    }

    pub fn assignment_nodes(&self, ns: &str) -> Vec<String> {
        self.assignments(ns)
            .into_iter()
            .map(|a| a.spec.node_name)
            .collect()
    }

    pub fn result(&self, ns: &str, name: &str) -> Option<TraceResult> {
        self.api
            .get(FATHOM, "traceresults", ns, name)
            .map(|v| serde_json::from_value(v).expect("result"))
    }

    /// A runner reports on its assignment (status subresource, its own field manager).
    pub async fn runner_reports(&self, ns: &str, node: &str, phase: &str, hits: u64) {
        let counters = fathom_crds::result::Totals {
            hits,
            ..Default::default()
        };
        self.runner_status(ns, node, json!({"phase": phase, "counters": counters}))
            .await;
    }

    pub async fn runner_status(&self, ns: &str, node: &str, status: Value) {
        let a = self
            .assignments(ns)
            .into_iter()
            .find(|a| a.spec.node_name == node)
            .unwrap_or_else(|| panic!("no assignment on {node}"));
        self.report(&a, status).await;
    }

    /// The runner of `a`'s node writes `status` on it.
    pub async fn report(&self, a: &TraceAssignment, mut status: Value) {
        let ns = a.metadata.namespace.as_deref().expect("namespace");
        status["run"] = json!(a.spec.run);
        if status.get("counters").is_none() {
            status["counters"] = json!(fathom_crds::result::Totals::default());
        }
        status["lastReportTime"] =
            json!(jiff::fmt::strtime::format("%Y-%m-%dT%H:%M:%SZ", self.clock.now()).expect("fmt"));
        Api::<TraceAssignment>::namespaced(self.client.clone(), ns)
            .patch_status(
                a.metadata.name.as_deref().expect("name"),
                &PatchParams::apply("fathom-node-runner").force(),
                &Patch::Apply(json!({
                    "apiVersion": "fathom.dev/v1alpha1",
                    "kind": "TraceAssignment",
                    "status": status,
                })),
            )
            .await
            .expect("runner status");
    }

    /// A runner detached: it removes its finalizer from the (terminating) assignment.
    pub async fn runner_detaches(&self, ns: &str, node: &str) {
        let a = self
            .assignments(ns)
            .into_iter()
            .find(|a| a.spec.node_name == node)
            .unwrap_or_else(|| panic!("no assignment on {node}"));
        let at = a.metadata.namespace.as_deref().expect("namespace");
        Api::<TraceAssignment>::namespaced(self.client.clone(), at)
            .patch(
                a.metadata.name.as_deref().expect("name"),
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"finalizers": null}})),
            )
            .await
            .expect("runner detaches");
    }

    /// Events published so far, as (type, reason, note).
    pub fn events(&self) -> Vec<(String, String, String)> {
        self.api
            .list("apis/events.k8s.io/v1", "events")
            .into_iter()
            .map(|e| {
                (
                    e["type"].as_str().unwrap_or_default().to_string(),
                    e["reason"].as_str().unwrap_or_default().to_string(),
                    e["note"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }

    pub async fn delete_job(&self, ns: &str, name: &str) {
        Api::<TraceJob>::namespaced(self.client.clone(), ns)
            .delete(name, &Default::default())
            .await
            .expect("delete job");
    }
}

/// The job's kind, for generic helpers.
pub fn kind_of<K: JobObject>() -> &'static str {
    K::KIND
}
