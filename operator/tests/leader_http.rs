//! Leader election against the in-memory API, and the HTTP endpoints on a real socket.

mod support;

use std::{sync::Arc, time::Duration};

use fathom_operator::{
    http::{self, Health},
    leader::LeaseLock,
    metrics::Metrics,
};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use support::api::{ManualClock, MemoryApi};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::watch,
};

fn locks() -> (MemoryApi, LeaseLock, LeaseLock) {
    let api = MemoryApi::new(ManualClock::new(Timestamp::UNIX_EPOCH));
    let leases: Api<Lease> = Api::namespaced(api.client(), "fathom-system");
    let a = LeaseLock::new(
        leases.clone(),
        "leader",
        "replica-a",
        Duration::from_secs(15),
    );
    let b = LeaseLock::new(leases, "leader", "replica-b", Duration::from_secs(15));
    (api, a, b)
}

fn at(secs: i64) -> Timestamp {
    Timestamp::UNIX_EPOCH + SignedDuration::from_secs(1_700_000_000 + secs)
}

#[tokio::test]
async fn only_one_replica_leads_and_a_stale_lease_is_taken_over() {
    let (api, a, b) = locks();
    assert!(a.try_acquire_or_renew(at(0)).await.expect("a"));
    assert!(
        !b.try_acquire_or_renew(at(1)).await.expect("b"),
        "a holds it"
    );
    assert!(a.try_acquire_or_renew(at(5)).await.expect("a renews"));
    assert!(
        !b.try_acquire_or_renew(at(19)).await.expect("b"),
        "renewed at 5, valid until 20"
    );
    // a stops renewing: after the lease duration b takes over, and a cannot come back.
    assert!(b.try_acquire_or_renew(at(21)).await.expect("b takes over"));
    assert!(!a.try_acquire_or_renew(at(22)).await.expect("a lost it"));
    let lease = api
        .get(
            "apis/coordination.k8s.io/v1",
            "leases",
            "fathom-system",
            "leader",
        )
        .expect("lease");
    assert_eq!(lease["spec"]["holderIdentity"], "replica-b");
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
}

#[tokio::test]
async fn racing_replicas_never_both_win() {
    let (_api, a, b) = locks();
    let (ra, rb) = tokio::join!(a.try_acquire_or_renew(at(0)), b.try_acquire_or_renew(at(0)));
    let (ra, rb) = (ra.expect("a"), rb.expect("b"));
    assert!(ra ^ rb, "exactly one wins: a={ra} b={rb}");
    // Both see the lease expired at the same time: the resourceVersion guard lets one through.
    let (winner, loser) = if ra { (a, b) } else { (b, a) };
    let (rw, rl) = tokio::join!(
        winner.try_acquire_or_renew(at(100)),
        loser.try_acquire_or_renew(at(100))
    );
    assert!(rw.expect("w") ^ rl.expect("l"));
}

#[tokio::test]
async fn releasing_hands_over_at_once() {
    let (_api, a, b) = locks();
    assert!(a.try_acquire_or_renew(at(0)).await.expect("a"));
    a.release().await.expect("release");
    assert!(b.try_acquire_or_renew(at(1)).await.expect("b"));
}

#[tokio::test]
async fn the_elector_publishes_leadership_and_stops_on_shutdown() {
    let (api, a, _b) = locks();
    let (tx, mut rx) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = tokio::spawn(fathom_operator::leader::run(a, tx, stop_rx));
    tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|l| *l))
        .await
        .expect("leads in time")
        .expect("channel");
    stop_tx.send(true).expect("stop");
    task.await.expect("join").expect("clean stop");
    let lease = api
        .get(
            "apis/coordination.k8s.io/v1",
            "leases",
            "fathom-system",
            "leader",
        )
        .expect("lease");
    assert!(
        lease["spec"].get("holderIdentity").is_none(),
        "released on shutdown: {lease}"
    );
}

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status line");
    (code, out)
}

#[tokio::test]
async fn metrics_health_and_readiness_are_served() {
    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(Health::default());
    metrics.reconciled("TraceJob", Duration::from_millis(3));
    metrics.job_state("uid-1", Some(("TraceJob", true, 3)));
    let listener = http::bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let server = tokio::spawn(http::serve(
        listener,
        metrics.clone(),
        health.clone(),
        async move {
            let _ = stop_rx.wait_for(|v| *v).await;
        },
    ));
    assert_eq!(get(addr, "/healthz").await.0, 200);
    assert_eq!(get(addr, "/readyz").await.0, 503);
    health.set_ready(true);
    assert_eq!(get(addr, "/readyz").await.0, 200);
    let (code, body) = get(addr, "/metrics").await;
    assert_eq!(code, 200);
    assert!(
        body.contains("fathom_operator_reconciles_total{kind=\"TraceJob\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("fathom_operator_active_jobs{kind=\"TraceJob\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("fathom_operator_assignments{kind=\"TraceJob\"} 3"),
        "{body}"
    );
    assert!(
        body.contains("fathom_operator_reconcile_duration_seconds"),
        "{body}"
    );
    assert_eq!(get(addr, "/nope").await.0, 404);
    stop_tx.send(true).expect("stop");
    server.await.expect("join").expect("serve");
}
