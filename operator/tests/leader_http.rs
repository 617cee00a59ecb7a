//! Leader election against the in-memory API (on tokio's paused clock where time matters),
//! and the HTTP endpoints on a real socket.

mod support;

use std::{sync::Arc, time::Duration};

use fathom_operator::{
    Error,
    http::{self, Health},
    leader::{self, LeaseLock, Timings},
    metrics::Metrics,
    reconcile::MANAGER,
};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use serde_json::json;
use support::api::{ManualClock, MemoryApi};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::watch,
    time::{Instant, advance},
};

const LEASES: &str = "apis/coordination.k8s.io/v1";

fn locks() -> (MemoryApi, LeaseLock, LeaseLock) {
    let api = MemoryApi::new(ManualClock::new(Timestamp::UNIX_EPOCH));
    let leases: Api<Lease> = Api::namespaced(api.client(), "fathom-system");
    let a = LeaseLock::new(leases.clone(), "leader", "replica-a", Timings::default());
    let b = LeaseLock::new(leases, "leader", "replica-b", Timings::default());
    (api, a, b)
}

/// A wall-clock time to write into the Lease; expiry never reads it.
fn at(secs: i64) -> Timestamp {
    Timestamp::UNIX_EPOCH + SignedDuration::from_secs(1_700_000_000 + secs)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn lease(api: &MemoryApi) -> serde_json::Value {
    api.get(LEASES, "leases", "fathom-system", "leader")
        .expect("lease")
}

#[tokio::test(start_paused = true)]
async fn only_one_replica_leads_and_a_stale_lease_is_taken_over() {
    let (api, a, b) = locks();
    assert!(a.try_acquire_or_renew(at(0)).await.expect("a"));
    assert!(
        !b.try_acquire_or_renew(at(1)).await.expect("b"),
        "a holds it"
    );
    advance(secs(5)).await;
    assert!(a.try_acquire_or_renew(at(5)).await.expect("a renews"));
    advance(secs(1)).await;
    assert!(
        !b.try_acquire_or_renew(at(6)).await.expect("b"),
        "b sees the renewal now: valid for 15 s of b's clock"
    );
    advance(secs(14)).await;
    assert!(
        !b.try_acquire_or_renew(at(20)).await.expect("b"),
        "14 s after b saw it change"
    );
    // a stopped renewing: 15 s after b last saw a change, b takes over, and a cannot come back.
    advance(secs(1)).await;
    assert!(b.try_acquire_or_renew(at(21)).await.expect("b takes over"));
    assert!(!a.try_acquire_or_renew(at(22)).await.expect("a lost it"));
    let lease = lease(&api);
    assert_eq!(lease["spec"]["holderIdentity"], "replica-b");
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
    let writes = api.writes();
    assert!(!writes.is_empty());
    for c in writes {
        assert_eq!(c.field_manager.as_deref(), Some(MANAGER), "{c:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn racing_replicas_never_both_win() {
    let (_api, a, b) = locks();
    let (ra, rb) = tokio::join!(a.try_acquire_or_renew(at(0)), b.try_acquire_or_renew(at(0)));
    let (ra, rb) = (ra.expect("a"), rb.expect("b"));
    assert!(ra ^ rb, "exactly one wins: a={ra} b={rb}");
    // The loser has watched the lease stay unchanged for longer than its duration, so it may
    // take it while the winner renews: the resourceVersion guard lets only one through.
    let (winner, loser) = if ra { (a, b) } else { (b, a) };
    assert!(!loser.try_acquire_or_renew(at(1)).await.expect("observe"));
    advance(secs(16)).await;
    let (rw, rl) = tokio::join!(
        winner.try_acquire_or_renew(at(100)),
        loser.try_acquire_or_renew(at(100))
    );
    assert!(rw.expect("w") ^ rl.expect("l"));
}

/// A Lease held by a replica on another node whose clock reads `renew_time`.
fn seed_lease(api: &MemoryApi, renew_time: &str) {
    api.seed(
        LEASES,
        "leases",
        json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": "leader", "namespace": "fathom-system"},
            "spec": {
                "holderIdentity": "replica-x",
                "leaseDurationSeconds": 15,
                "acquireTime": renew_time,
                "renewTime": renew_time,
                "leaseTransitions": 0,
            },
        }),
    );
}

#[tokio::test(start_paused = true)]
async fn takeover_waits_a_lease_duration_of_local_observation_whatever_the_holders_clock_says() {
    // The holder's clock far ahead (its renewTime in the future), or far behind.
    for renew_time in ["2100-01-01T00:00:00.000000Z", "2001-01-01T00:00:00.000000Z"] {
        let (api, _a, b) = locks();
        seed_lease(&api, renew_time);
        assert!(
            !b.try_acquire_or_renew(at(0)).await.expect("b"),
            "{renew_time}: just observed, so valid for 15 s"
        );
        advance(secs(14)).await;
        assert!(
            !b.try_acquire_or_renew(at(14)).await.expect("b"),
            "{renew_time}: 14 s of local observation"
        );
        advance(secs(1)).await;
        assert!(
            b.try_acquire_or_renew(at(15)).await.expect("b"),
            "{renew_time}: unchanged for 15 s of b's clock: expired"
        );
        assert_eq!(lease(&api)["spec"]["holderIdentity"], "replica-b");
    }
}

#[tokio::test(start_paused = true)]
async fn a_leader_that_keeps_renewing_is_never_taken_over() {
    let (api, a, b) = locks();
    let (a_tx, mut a_rx) = watch::channel(false);
    let (b_tx, b_rx) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    let ta = tokio::spawn(leader::run(a, a_tx, stop_rx.clone()));
    a_rx.wait_for(|l| *l).await.expect("a leads");
    let tb = tokio::spawn(leader::run(b, b_tx, stop_rx));
    tokio::time::sleep(secs(120)).await;
    assert!(*a_rx.borrow(), "a still leads");
    assert!(!*b_rx.borrow(), "b never led");
    assert_eq!(lease(&api)["spec"]["leaseTransitions"], 0);
    stop_tx.send(true).expect("stop");
    ta.await.expect("join a").expect("a stops cleanly");
    tb.await.expect("join b").expect("b stops cleanly");
}

#[tokio::test(start_paused = true)]
async fn the_leader_steps_down_at_the_renew_deadline_when_the_api_fails() {
    let t = Timings::default();
    for hanging in [false, true] {
        let (api, a, _b) = locks();
        let (tx, mut rx) = watch::channel(false);
        let (_stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(leader::run(a, tx, stop_rx));
        rx.wait_for(|l| *l).await.expect("leads");
        let renewed = Instant::now();
        if hanging {
            api.set_hanging(true);
        } else {
            api.set_unavailable(true);
        }
        let result = task.await.expect("join");
        let led_for = renewed.elapsed();
        assert!(
            matches!(result, Err(Error::LeadershipLost(_))),
            "hanging={hanging}: {result:?}"
        );
        assert!(!*rx.borrow(), "no longer published as leading");
        assert!(
            led_for <= t.renew_deadline,
            "hanging={hanging}: stepped down {led_for:?} after the last renewal"
        );
        assert!(
            led_for >= t.renew_deadline - t.retry_period,
            "hanging={hanging}: kept trying until close to the deadline, stepped down after {led_for:?}"
        );
        assert!(led_for < t.lease_duration);
    }
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
    // Synced, but the API server has not answered a lease round yet.
    let (code, body) = get(addr, "/readyz").await;
    assert_eq!(code, 503);
    assert!(body.contains("API server has not answered"), "{body}");
    health.set_api_answers(true);
    assert_eq!(get(addr, "/readyz").await.0, 200);
    health.set_ready(false);
    let (code, body) = get(addr, "/readyz").await;
    assert_eq!(code, 503);
    assert!(
        body.ends_with("\r\n\r\nnot ready: caches not synced\n"),
        "{body}"
    );
    health.set_ready(true);
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
