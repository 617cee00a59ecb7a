//! The running operator: caches of Nodes and Pods, one kube-runtime `Controller` per job kind
//! (watching the TraceAssignments of the operator's namespace and mapping each to its job by
//! `spec.job`: a TraceJob's assignments have no ownerReference), a router that maps relevant
//! Node and Pod changes to the jobs they affect, the orphan sweep, leader election, and the
//! HTTP endpoints.

use std::{
    collections::{HashMap, hash_map::DefaultHasher},
    hash::{Hash, Hasher},
    sync::Arc,
    time::Duration,
};

use fathom_crds::{ClusterTraceJob, TraceAssignment, TraceJob};
use futures::{StreamExt, channel::mpsc, stream};
use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{Node, Pod},
};
use kube::{
    Api, Client, ResourceExt,
    runtime::{
        Controller, WatchStreamExt,
        controller::Config as ControllerConfig,
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use serde_json::json;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    collector::{
        Collector,
        auth::{AccessReviewAuthorizer, TokenReviewAuthenticator},
        pacing::ResultWriter,
        server::{self, CollectorService},
    },
    config::RunArgs,
    error::{Error, Result},
    events::EventRecorder,
    http::{self, Health},
    leader::{self, LeaseLock},
    metrics::Metrics,
    orphans,
    reconcile::{self, Context, JobObject, ReconcileConfig, SystemClock},
};

/// A fingerprint of what planning reads from a node.
pub fn node_fingerprint(n: &Node) -> u64 {
    let ready = n
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let taints = n.spec.as_ref().and_then(|s| s.taints.as_ref());
    hash(&json!([n.metadata.labels, ready, taints]).to_string())
}

/// A fingerprint of what planning reads from a pod.
pub fn pod_fingerprint(p: &Pod) -> u64 {
    let status = p.status.as_ref();
    let ids: Vec<_> = status
        .and_then(|s| s.container_statuses.as_ref())
        .map(|cs| cs.iter().map(|c| (&c.name, &c.container_id)).collect())
        .unwrap_or_default();
    hash(
        &json!([
            p.metadata.labels,
            p.metadata.deletion_timestamp.is_some(),
            p.spec.as_ref().and_then(|s| s.node_name.as_ref()),
            status.and_then(|s| s.phase.as_ref()),
            status.and_then(|s| s.qos_class.as_ref()),
            ids,
        ])
        .to_string(),
    )
}

fn hash(s: &str) -> u64 {
    let mut h = DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

/// The job of kind `K` an assignment belongs to, from its `spec.job` (kind, namespace, name):
/// the controllers' mapper from assignment changes to jobs. None for an assignment of the
/// other kind, or whose reference does not fit the kind (a TraceJob without namespace, a
/// ClusterTraceJob with one).
pub fn job_of_assignment<K: JobObject>(a: &TraceAssignment) -> Option<ObjectRef<K>> {
    let job = &a.spec.job;
    if job.kind != K::KIND || job.name.is_empty() {
        return None;
    }
    let r = ObjectRef::<K>::new(&job.name);
    match (&job.namespace, K::is_cluster()) {
        (Some(ns), false) => Some(r.within(ns)),
        (None, true) => Some(r),
        _ => None,
    }
}

fn unfinished<K: JobObject>(job: &K) -> bool {
    !job.job_status()
        .and_then(|s| s.phase)
        .is_some_and(|p| p.is_finished())
}

/// The jobs a pod change may affect: unfinished jobs that target pods of its namespace (or
/// any namespace, for a ClusterTraceJob with a podSelector).
pub fn jobs_for_pod(
    pod: &Pod,
    jobs: &Store<TraceJob>,
    cluster_jobs: &Store<ClusterTraceJob>,
) -> (Vec<ObjectRef<TraceJob>>, Vec<ObjectRef<ClusterTraceJob>>) {
    let ns = pod.namespace();
    let tj = jobs
        .state()
        .iter()
        .filter(|j| j.namespace() == ns && unfinished(j.as_ref()))
        .filter(|j| j.spec.pod_selector.is_some() || j.spec.target_ref.is_some())
        .map(|j| ObjectRef::from_obj(j.as_ref()))
        .collect();
    let ctj = cluster_jobs
        .state()
        .iter()
        .filter(|j| j.spec.pod_selector.is_some() && unfinished(j.as_ref()))
        .map(|j| ObjectRef::from_obj(j.as_ref()))
        .collect();
    (tj, ctj)
}

/// The jobs a node change may affect: every unfinished job.
pub fn jobs_for_node(
    jobs: &Store<TraceJob>,
    cluster_jobs: &Store<ClusterTraceJob>,
) -> (Vec<ObjectRef<TraceJob>>, Vec<ObjectRef<ClusterTraceJob>>) {
    (
        jobs.state()
            .iter()
            .filter(|j| unfinished(j.as_ref()))
            .map(|j| ObjectRef::from_obj(j.as_ref()))
            .collect(),
        cluster_jobs
            .state()
            .iter()
            .filter(|j| unfinished(j.as_ref()))
            .map(|j| ObjectRef::from_obj(j.as_ref()))
            .collect(),
    )
}

enum Change {
    Node(Box<watcher::Event<Node>>),
    Pod(Box<watcher::Event<Pod>>),
}

/// Runs the controllers (and the collector's result writer, when there is a collector) until
/// `shutdown` fires.
#[expect(
    clippy::too_many_arguments,
    reason = "the leader's whole wiring, called from one place"
)]
pub async fn run_controllers(
    client: Client,
    config: ReconcileConfig,
    identity: String,
    debounce: Duration,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    collector: Option<Arc<Collector>>,
    shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let (nodes, node_writer) = reflector::store::<Node>();
    let (pods, pod_writer) = reflector::store::<Pod>();
    let node_events = reflector::reflector(
        node_writer,
        watcher(Api::<Node>::all(client.clone()), watcher::Config::default()),
    )
    .default_backoff()
    .filter_map(|e| async move { e.ok().map(|e| Change::Node(Box::new(e))) });
    let pod_events = reflector::reflector(
        pod_writer,
        watcher(Api::<Pod>::all(client.clone()), watcher::Config::default()),
    )
    .default_backoff()
    .filter_map(|e| async move { e.ok().map(|e| Change::Pod(Box::new(e))) });

    let ctx = Arc::new(Context {
        client: client.clone(),
        nodes: nodes.clone(),
        pods: pods.clone(),
        config: config.clone(),
        events: Box::new(EventRecorder::new(client.clone(), &identity)),
        metrics: metrics.clone(),
        clock: Arc::new(SystemClock),
        conflicts: Default::default(),
        collector: collector.clone(),
    });
    // The leader writes merged results, paced; a follower never gets here.
    let writer = {
        let (client, shutdown) = (client.clone(), shutdown.clone());
        async move {
            if let Some(c) = collector {
                ResultWriter::new(client, c, Arc::new(SystemClock))
                    .with_metrics(metrics)
                    .run(shutdown)
                    .await;
            }
        }
    };

    let (tj_tx, tj_rx) = mpsc::unbounded::<ObjectRef<TraceJob>>();
    let (ctj_tx, ctj_rx) = mpsc::unbounded::<ObjectRef<ClusterTraceJob>>();
    let cfg = ControllerConfig::default().debounce(debounce);
    let wc = watcher::Config::default();
    let stop = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };

    // Every assignment lives in the operator's namespace; only that namespace is watched (an
    // object of the same kind a tenant wrote elsewhere triggers nothing and is never read).
    let assignments =
        || Api::<TraceAssignment>::namespaced(client.clone(), &config.operator_namespace);
    let tj = Controller::new(Api::<TraceJob>::all(client.clone()), wc.clone())
        .watches(assignments(), wc.clone(), |a| {
            job_of_assignment::<TraceJob>(&a)
        })
        .with_config(cfg.clone())
        .reconcile_on(tj_rx)
        .graceful_shutdown_on(stop(shutdown.clone()));
    let ctj = Controller::new(Api::<ClusterTraceJob>::all(client.clone()), wc.clone())
        .watches(assignments(), wc, |a| {
            job_of_assignment::<ClusterTraceJob>(&a)
        })
        .with_config(cfg)
        .reconcile_on(ctj_rx)
        .graceful_shutdown_on(stop(shutdown.clone()));
    let (tj_store, ctj_store) = (tj.store(), ctj.store());

    // Route relevant Node and Pod changes to the jobs they affect.
    let router = {
        let (tj_store, ctj_store) = (tj_store.clone(), ctj_store.clone());
        let mut node_seen: HashMap<String, u64> = HashMap::new();
        let mut pod_seen: HashMap<String, u64> = HashMap::new();
        let mut shutdown = shutdown.clone();
        async move {
            let mut changes = std::pin::pin!(stream::select(node_events, pod_events));
            loop {
                let change = tokio::select! {
                    c = changes.next() => match c { Some(c) => c, None => return },
                    _ = shutdown.wait_for(|v| *v) => return,
                };
                let (tjs, ctjs) = match change {
                    Change::Node(e) => match *e {
                        watcher::Event::Apply(n) | watcher::Event::InitApply(n) => {
                            let fp = node_fingerprint(&n);
                            if node_seen.insert(n.name_any(), fp) == Some(fp) {
                                continue;
                            }
                            jobs_for_node(&tj_store, &ctj_store)
                        }
                        watcher::Event::Delete(n) => {
                            node_seen.remove(&n.name_any());
                            jobs_for_node(&tj_store, &ctj_store)
                        }
                        watcher::Event::InitDone => jobs_for_node(&tj_store, &ctj_store),
                        watcher::Event::Init => continue,
                    },
                    Change::Pod(e) => match *e {
                        watcher::Event::Apply(p) | watcher::Event::InitApply(p) => {
                            let fp = pod_fingerprint(&p);
                            let key =
                                format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any());
                            if pod_seen.insert(key, fp) == Some(fp) {
                                continue;
                            }
                            jobs_for_pod(&p, &tj_store, &ctj_store)
                        }
                        watcher::Event::Delete(p) => {
                            pod_seen.remove(&format!(
                                "{}/{}",
                                p.namespace().unwrap_or_default(),
                                p.name_any()
                            ));
                            jobs_for_pod(&p, &tj_store, &ctj_store)
                        }
                        watcher::Event::InitDone => jobs_for_node(&tj_store, &ctj_store),
                        watcher::Event::Init => continue,
                    },
                };
                for r in tjs {
                    let _ = tj_tx.unbounded_send(r);
                }
                for r in ctjs {
                    let _ = ctj_tx.unbounded_send(r);
                }
            }
        }
    };

    let readiness = {
        let (nodes, pods, health) = (nodes.clone(), pods.clone(), health.clone());
        let (tj_store, ctj_store) = (tj_store.clone(), ctj_store.clone());
        async move {
            let synced = nodes.wait_until_ready().await.is_ok()
                && pods.wait_until_ready().await.is_ok()
                && tj_store.wait_until_ready().await.is_ok()
                && ctj_store.wait_until_ready().await.is_ok();
            if synced {
                info!("caches synced");
                health.set_ready(true);
            }
        }
    };

    // Assignments whose job is gone (force-deleted): at start, then at each resync.
    let sweeper = orphans::run_sweeper(ctx.clone(), shutdown.clone());

    let tj_run = tj
        .run(reconcile::reconcile, reconcile::error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));
    let ctj_run = ctj
        .run(reconcile::reconcile, reconcile::error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));
    info!("controllers started");
    tokio::join!(router, readiness, tj_run, ctj_run, writer, sweeper);
    Ok(())
}

/// Everything `fathom-operator run` does: HTTP endpoints, leader election, and the controllers
/// while this replica leads. Returns when `shutdown` fires, or with an error when leadership
/// is lost.
pub async fn run_operator(
    client: Client,
    args: RunArgs,
    shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let config = args.reconcile_config().map_err(Error::Config)?;
    let timings = args.leader_timings().map_err(Error::Config)?;
    let identity = args.identity();
    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(Health::default());
    let listener = http::bind(args.http_addr).await?;
    let serve = {
        let mut sd = shutdown.clone();
        http::serve(listener, metrics.clone(), health.clone(), async move {
            let _ = sd.wait_for(|v| *v).await;
        })
    };

    // The collector serves on every replica; a follower answers UNAVAILABLE (see
    // crate::collector), so only the leader merges and writes.
    let (leading_tx, mut leading_rx) = watch::channel(false);
    let transport = args.collector_transport().map_err(Error::Config)?;
    let collector = transport.as_ref().map(|_| Collector::new());
    let collect = {
        let mut sd = shutdown.clone();
        let service = collector.clone().map(|c| {
            let auth = Arc::new(TokenReviewAuthenticator::new(
                client.clone(),
                args.collector_runner_user.clone(),
            ));
            let readers = Arc::new(AccessReviewAuthorizer::new(client.clone()));
            CollectorService::new(c, auth, readers, leading_rx.clone())
                .with_metrics(metrics.clone())
        });
        let listener = match &service {
            Some(_) => Some(http::bind(args.collector_addr).await?),
            None => {
                warn!(
                    "collector disabled: no --collector-tls-cert/--collector-tls-key (nor --collector-insecure-plaintext)"
                );
                None
            }
        };
        async move {
            let (Some(service), Some(listener), Some(transport)) = (service, listener, transport)
            else {
                return Ok(());
            };
            info!(addr = %args.collector_addr, "collector serving");
            server::serve(listener, transport, service, async move {
                let _ = sd.wait_for(|v| *v).await;
            })
            .await
            .map_err(|e| Error::Config(format!("collector server: {e}")))
        }
    };

    let lock = LeaseLock::new(
        Api::<Lease>::namespaced(client.clone(), &args.namespace),
        &args.lease_name,
        &identity,
        timings,
    )
    .with_health(health.clone());
    let elect = leader::run(lock, leading_tx, shutdown.clone());

    let act = {
        let (metrics, health, mut shutdown) = (metrics.clone(), health.clone(), shutdown.clone());
        let debounce = Duration::from_millis(args.debounce_ms);
        async move {
            // A follower is ready: it serves its endpoints and waits for the lease.
            health.set_ready(true);
            tokio::select! {
                r = leading_rx.wait_for(|l| *l) => if r.is_err() { return Ok(()) },
                _ = shutdown.wait_for(|v| *v) => return Ok(()),
            }
            info!(%identity, "leading: starting controllers");
            metrics.leader.set(1);
            health.set_ready(false);
            run_controllers(
                client, config, identity, debounce, metrics, health, collector, shutdown,
            )
            .await
        }
    };
    // Losing the lease ends everything at once (the other futures are dropped): a replica
    // that is not sure it leads must not act.
    let elect = async move {
        let r = elect.await;
        if let Err(e) = &r {
            warn!(error = %e, "leader election ended");
        }
        r
    };
    tokio::try_join!(serve, elect, act, collect).map(|_| ())
}
