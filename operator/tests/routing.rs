//! Which Node and Pod changes wake which jobs: the controllers' mappers.

mod support;

use fathom_crds::{ClusterTraceJob, JobPhase, TraceJob, TraceJobStatus};
use fathom_operator::controller::{jobs_for_node, jobs_for_pod, node_fingerprint, pod_fingerprint};
use kube::runtime::{reflector, watcher};
use support::{node, pod};

fn tj(ns: &str, name: &str, spec: &str, phase: Option<JobPhase>) -> TraceJob {
    let mut j: TraceJob = serde_yaml::from_str(&format!(
        "apiVersion: fathom.dev/v1alpha1\nkind: TraceJob\nmetadata: {{ name: {name}, namespace: {ns} }}\nspec:\n{spec}"
    ))
    .expect("job");
    j.status = phase.map(|p| TraceJobStatus {
        phase: Some(p),
        ..Default::default()
    });
    j
}

fn ctj(name: &str, spec: &str) -> ClusterTraceJob {
    serde_yaml::from_str(&format!(
        "apiVersion: fathom.dev/v1alpha1\nkind: ClusterTraceJob\nmetadata: {{ name: {name} }}\nspec:\n{spec}"
    ))
    .expect("job")
}

#[test]
fn pod_changes_wake_the_jobs_that_target_that_namespace() {
    let (tjs, mut tw) = reflector::store::<TraceJob>();
    let (ctjs, mut cw) = reflector::store::<ClusterTraceJob>();
    for j in [
        tj(
            "shop",
            "sel",
            "  probe: { tracepoint: sock/inet_sock_set_state }\n  podSelector: { matchLabels: { app: web } }\n",
            None,
        ),
        tj(
            "shop",
            "ref",
            "  probe: { tracepoint: sock/inet_sock_set_state }\n  targetRef: { kind: Deployment, name: web }\n",
            Some(JobPhase::Running),
        ),
        tj(
            "shop",
            "done",
            "  probe: { tracepoint: sock/inet_sock_set_state }\n  podSelector: {}\n",
            Some(JobPhase::Succeeded),
        ),
        tj(
            "shop",
            "wide",
            "  probe: { tracepoint: sock/inet_sock_set_state }\n",
            None,
        ),
        tj(
            "other",
            "sel",
            "  probe: { tracepoint: sock/inet_sock_set_state }\n  podSelector: {}\n",
            None,
        ),
    ] {
        tw.apply_watcher_event(&watcher::Event::Apply(j));
    }
    cw.apply_watcher_event(&watcher::Event::Apply(ctj(
        "pods",
        "  probe: { tracepoint: sock/inet_sock_set_state }\n  podSelector: {}\n",
    )));
    cw.apply_watcher_event(&watcher::Event::Apply(ctj(
        "nodes",
        "  probe: { tracepoint: sock/inet_sock_set_state }\n",
    )));
    let (t, c) = jobs_for_pod(&pod("shop", "p", &[("app", "web")], "n1"), &tjs, &ctjs);
    let mut t: Vec<String> = t.into_iter().map(|r| r.name).collect();
    t.sort();
    assert_eq!(t, ["ref", "sel"]);
    assert_eq!(c.into_iter().map(|r| r.name).collect::<Vec<_>>(), ["pods"]);
    let (t, c) = jobs_for_node(&tjs, &ctjs);
    assert_eq!(t.len(), 4, "every unfinished job");
    assert_eq!(c.len(), 2);
}

#[test]
fn only_changes_planning_reads_are_routed() {
    let p = pod("shop", "p", &[("app", "web")], "n1");
    let mut ready_changed = p.clone();
    ready_changed.status.as_mut().expect("status").conditions = Some(vec![Default::default()]);
    assert_eq!(
        pod_fingerprint(&p),
        pod_fingerprint(&ready_changed),
        "a readiness flip does not replan"
    );
    let mut moved = p.clone();
    moved.spec.as_mut().expect("spec").node_name = Some("n2".into());
    assert_ne!(pod_fingerprint(&p), pod_fingerprint(&moved));
    let mut relabelled = p.clone();
    relabelled.metadata.labels = None;
    assert_ne!(pod_fingerprint(&p), pod_fingerprint(&relabelled));
    let mut started = p.clone();
    started
        .status
        .as_mut()
        .expect("status")
        .container_statuses
        .as_mut()
        .expect("cs")[0]
        .container_id = Some("containerd://new".into());
    assert_ne!(pod_fingerprint(&p), pod_fingerprint(&started));

    let n = node("n1", &[("zone", "a")], true, &[]);
    let mut heartbeat = n.clone();
    heartbeat
        .status
        .as_mut()
        .expect("status")
        .conditions
        .as_mut()
        .expect("c")[0]
        .last_heartbeat_time = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        jiff::Timestamp::UNIX_EPOCH,
    ));
    assert_eq!(
        node_fingerprint(&n),
        node_fingerprint(&heartbeat),
        "heartbeats do not replan"
    );
    assert_ne!(
        node_fingerprint(&n),
        node_fingerprint(&node("n1", &[("zone", "a")], false, &[]))
    );
    assert_ne!(
        node_fingerprint(&n),
        node_fingerprint(&node("n1", &[("zone", "a")], true, &[("x", "NoSchedule")]))
    );
    assert_ne!(
        node_fingerprint(&n),
        node_fingerprint(&node("n1", &[("zone", "b")], true, &[]))
    );
}
