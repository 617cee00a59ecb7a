//! The node runner's transport (`fathom_node::daemon::transport`) against real tonic servers
//! over loopback: backpressure (T3), reconnect backoff with 20 runners (T4), half-open
//! connections dropped by iptables (T5), a collector restart within and beyond the spool (T7).
//! T5 needs root (iptables on loopback).
//!
//! The collector here is a small in-test `Collector` service with the real one's duplicate
//! rule (a report at or below its assignment's last accepted seq is discarded): these tests
//! are about what the runner does; the collector's own side is in the operator's tests.

use std::{
    collections::HashMap,
    net::SocketAddr,
    pin::Pin,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use fathom_crds::result::EventRecord;
use fathom_node::daemon::transport::{self, BackoffPolicy, TransportConfig, TransportStats};
use fathom_proto::v1::{
    self, Counters, NodeReport, ReportAck,
    collector_server::{Collector, CollectorServer},
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};

/// What the test collector saw.
#[derive(Debug, Default)]
struct Seen {
    /// Last accepted seq per assignment.
    last_seq: HashMap<String, u64>,
    /// Events of accepted reports.
    events: u64,
    accepted: u64,
    duplicates: u64,
    /// The last accepted report, without its events.
    last: Option<NodeReport>,
    streams: u64,
}

/// A collector that accepts by seq, acknowledges every report, and stops reading its streams
/// while `paused`.
#[derive(Clone, Default)]
struct TestCollector {
    seen: Arc<Mutex<Seen>>,
    paused: Arc<AtomicBool>,
}

type AckStream = Pin<Box<dyn Stream<Item = Result<ReportAck, Status>> + Send>>;

#[tonic::async_trait]
impl Collector for TestCollector {
    type ReportStream = AckStream;

    async fn report(
        &self,
        request: Request<Streaming<NodeReport>>,
    ) -> Result<Response<AckStream>, Status> {
        self.seen.lock().unwrap().streams += 1;
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let (seen, paused) = (self.seen.clone(), self.paused.clone());
        tokio::spawn(async move {
            loop {
                while paused.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                let Ok(Some(mut r)) = inbound.message().await else {
                    return;
                };
                let acked = {
                    let mut s = seen.lock().unwrap();
                    let last = s.last_seq.get(&r.assignment_uid).copied().unwrap_or(0);
                    if r.seq <= last {
                        s.duplicates += 1;
                        last
                    } else {
                        s.last_seq.insert(r.assignment_uid.clone(), r.seq);
                        s.accepted += 1;
                        s.events += r.event_batch.take().map_or(0, |b| b.len()) as u64;
                        s.last = Some(r.clone());
                        r.seq
                    }
                };
                let ack = ReportAck {
                    assignment_uid: r.assignment_uid,
                    acknowledged_seq: acked,
                    rejection: None,
                };
                if tx.send(Ok(ack)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

impl TestCollector {
    fn seen<T>(&self, f: impl FnOnce(&Seen) -> T) -> T {
        f(&self.seen.lock().unwrap())
    }

    /// Serves on `listener` until the task is aborted.
    fn serve(&self, listener: TcpListener) -> JoinHandle<()> {
        let service = CollectorServer::new(self.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await
                .expect("serve");
        })
    }
}

/// Assignment `uid`'s cumulative report `seq` with `events` events of ~100 bytes each.
fn report(uid: &str, seq: u64, events: usize) -> NodeReport {
    NodeReport {
        job_uid: "job".into(),
        assignment_uid: uid.into(),
        node: "node-0".into(),
        run: 1,
        seq,
        counters: Some(Counters {
            hits: seq,
            ..Default::default()
        }),
        // Distinct values: a batch would send a repeated one once.
        event_batch: (events > 0).then(|| {
            let records: Vec<EventRecord> = (0..events)
                .map(|i| EventRecord {
                    time_ns: i as u64,
                    fields: [(
                        "path".to_string(),
                        format!("{seq:08}{i:06}{}", "p".repeat(86)),
                    )]
                    .into(),
                })
                .collect();
            v1::EventBatch::from_records(&records)
        }),
        ..Default::default()
    }
}

/// A running transport: its report sender, stats and stop switch.
struct Runner {
    tx: mpsc::Sender<NodeReport>,
    stats: Arc<TransportStats>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

fn start_runner(config: TransportConfig) -> Runner {
    let (tx, rx) = mpsc::channel(16);
    let (stop, shutdown) = watch::channel(false);
    let stats = Arc::new(TransportStats::default());
    let task = {
        let stats = stats.clone();
        tokio::spawn(async move {
            transport::run(config, rx, None, stats, shutdown)
                .await
                .expect("transport");
        })
    };
    Runner {
        tx,
        stats,
        stop,
        task,
    }
}

impl Runner {
    async fn stop(self) {
        self.stop.send(true).unwrap();
        drop(self.tx);
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("the transport stops")
            .expect("no panic");
    }

    fn stat(&self, f: impl Fn(&TransportStats) -> &AtomicU64) -> u64 {
        f(&self.stats).load(Ordering::SeqCst)
    }
}

fn plaintext(addr: SocketAddr) -> TransportConfig {
    let mut c = TransportConfig::new(format!("http://{addr}"));
    c.insecure_plaintext = true;
    c.connect_timeout = Duration::from_secs(2);
    c
}

async fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

/// T3: the collector stops reading (15 s here instead of 60 s: the bounds are counters, so
/// the length of the pause changes nothing but the test's time): the runner keeps taking
/// reports without blocking, its spool stays within its caps, what falls off is counted, and
/// once the collector reads again the newest report arrives within 5 s; events generated =
/// events received + events the runner reported as dropped, exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t3_a_collector_that_stops_reading_keeps_the_runner_bounded() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let collector = TestCollector::default();
    let server = collector.serve(listener);
    let mut config = plaintext(addr);
    config.buffer = 64;
    config.spool_events = 5_000;
    let runner = start_runner(config);

    let mut seq = 0;
    let mut generated = 0u64;
    for uid in ["a", "b"] {
        seq += 1;
        runner.tx.send(report(uid, seq, 10)).await.unwrap();
        generated += 10;
    }
    wait_for("the first reports", Duration::from_secs(20), || {
        collector.seen(|s| s.accepted) == 2
    })
    .await;

    collector.paused.store(true, Ordering::SeqCst);
    let paused = Instant::now();
    // 600 reports of 1,000 events (600,000 events, ~70 MB) while nobody reads.
    while paused.elapsed() < Duration::from_secs(15) || seq < 600 {
        for uid in ["a", "b"] {
            seq += 1;
            tokio::time::timeout(
                Duration::from_secs(5),
                runner.tx.send(report(uid, seq, 1_000)),
            )
            .await
            .expect("the runner never blocks on a collector that does not read")
            .unwrap();
            generated += 1_000;
        }
        if seq >= 600 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let high = runner.stat(|s| &s.queued_events_high);
    let dropped = runner.stat(|s| &s.events_dropped);
    assert!(high <= 5_000, "spooled events within the cap: {high}");
    assert!(
        runner.stat(|s| &s.queued) <= 64,
        "queued reports within the cap"
    );
    assert!(dropped > 0, "drops are counted");
    assert_eq!(
        runner.stat(|s| &s.connects),
        1,
        "the stream stayed up: keepalive is answered while the collector does not read"
    );

    collector.paused.store(false, Ordering::SeqCst);
    let resumed = wait_for("the newest report", Duration::from_secs(5), || {
        collector.seen(|s| s.last_seq.get("b").copied()) == Some(seq)
    })
    .await;
    let (received, reported_dropped) = collector.seen(|s| {
        (
            s.events,
            s.last.as_ref().unwrap().counters.unwrap().transport_dropped,
        )
    });
    let by_a = collector.seen(|s| s.last_seq["a"]);
    assert_eq!(by_a, seq - 1);
    // Both assignments' drops: the last report of each carries its own count; here the total
    // is the transport's.
    assert!(reported_dropped > 0);
    assert_eq!(
        received + runner.stat(|s| &s.events_dropped),
        generated,
        "every event generated is received or counted as dropped"
    );
    eprintln!(
        "t3: {generated} events generated, {received} received, {dropped} dropped, spool high {high}, resumed in {resumed:?}"
    );
    runner.stop().await;
    server.abort();
}

/// A listener per runner that accepts and closes at once (a collector that is down but
/// reachable, so each attempt can be seen), recording when each attempt arrived. A thread of
/// its own blocks in accept, so a busy async runtime does not delay the timestamps.
fn refusing_listener(times: Arc<Mutex<Vec<Instant>>>) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        while let Ok((conn, _)) = listener.accept() {
            times.lock().unwrap().push(Instant::now());
            drop(conn);
        }
    });
    addr
}

/// T4: 20 runners against a collector that is down for 45 s: each one's intervals between
/// attempts follow ~1 s × 1.6ⁿ ± 20 %, capped (at 8 s here instead of 30 s, so the cap is
/// reached within the test), none is under a second, and the runners do not retry in step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t4_twenty_runners_back_off_with_jitter_against_a_down_collector() {
    const RUNNERS: usize = 20;
    let cap = 8.0;
    let mut attempts = Vec::new();
    let mut runners = Vec::new();
    for _ in 0..RUNNERS {
        let times = Arc::new(Mutex::new(Vec::new()));
        let addr = refusing_listener(times.clone());
        let mut config = plaintext(addr);
        config.backoff = BackoffPolicy {
            cap: Duration::from_secs_f64(cap),
            ..BackoffPolicy::default()
        };
        let runner = start_runner(config);
        runner.tx.send(report("a", 1, 0)).await.unwrap();
        runners.push(runner);
        attempts.push(times);
    }
    tokio::time::sleep(Duration::from_secs(45)).await;
    for r in runners {
        r.stop().await;
    }

    let mut ratios = Vec::new();
    let mut growth = Vec::new();
    for (i, times) in attempts.iter().enumerate() {
        let times = times.lock().unwrap().clone();
        let gaps: Vec<f64> = times
            .windows(2)
            .map(|w| (w[1] - w[0]).as_secs_f64())
            .collect();
        // 1, 1.6, 2.56, 4.1, 6.55, 8, 8, 8 … fill 45 s with 8 or 9 attempts after the first.
        assert!(
            (7..=10).contains(&gaps.len()),
            "runner {i}: {} intervals in 45 s: {gaps:?}",
            gaps.len()
        );
        let mut base: f64 = 1.0;
        for (n, gap) in gaps.iter().enumerate() {
            assert!(
                *gap >= 0.95,
                "runner {i} retried after {gap:.3} s (< 1 s): {gaps:?}"
            );
            // Jitter is ±20 %; a busy machine may add latency, never remove it.
            let (low, high) = ((base * 0.8).max(1.0) - 0.05, (base * 1.2).min(cap) + 0.5);
            assert!(
                *gap >= low && *gap <= high,
                "runner {i}, interval {n}: {gap:.3} s ∉ [{low:.2}, {high:.2}]: {gaps:?}"
            );
            ratios.push(gap / base.min(cap));
            if n > 0 && base < cap / 1.6 {
                growth.push(gap / gaps[n - 1]);
            }
            base = (base * 1.6).min(cap);
        }
        assert!(
            gaps.iter().rev().take(2).all(|g| *g <= cap + 0.5),
            "runner {i}: capped: {gaps:?}"
        );
    }
    let mean_growth = growth.iter().sum::<f64>() / growth.len() as f64;
    assert!(
        (1.4..=1.8).contains(&mean_growth),
        "intervals grow ~1.6× on average: {mean_growth:.3}"
    );
    let (min, max) = ratios
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), r| (a.min(*r), b.max(*r)));
    assert!(
        min < 0.95 && max > 1.05,
        "jitter spreads the runners: ratios to the base in [{min:.3}, {max:.3}]"
    );
    eprintln!(
        "t4: {} intervals, mean growth {mean_growth:.3}, ratio to the base in [{min:.3}, {max:.3}]",
        ratios.len()
    );
}

/// Drops every packet to and from `port` on loopback (no RST) while it lives.
struct Blackhole(u16);

impl Blackhole {
    fn rules(port: u16) -> [Vec<String>; 2] {
        let p = port.to_string();
        [
            [
                "INPUT", "-i", "lo", "-p", "tcp", "--dport", &p, "-j", "DROP",
            ],
            [
                "INPUT", "-i", "lo", "-p", "tcp", "--sport", &p, "-j", "DROP",
            ],
        ]
        .map(|r| r.iter().map(|s| s.to_string()).collect())
    }

    fn new(port: u16) -> Blackhole {
        for rule in Blackhole::rules(port) {
            let ok = Command::new("iptables")
                .arg("-w")
                .arg("-I")
                .args(&rule)
                .status()
                .expect("iptables (T5 needs root and iptables)")
                .success();
            assert!(ok, "iptables -I {rule:?}");
        }
        Blackhole(port)
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        for rule in Blackhole::rules(self.0) {
            let _ = Command::new("iptables")
                .arg("-w")
                .arg("-D")
                .args(&rule)
                .status();
        }
    }
}

/// T5: packets to and from the collector dropped without RST (iptables on loopback): the
/// runner notices within keepalive interval + timeout (10 s + 10 s; asserted ≤ 30 s) and,
/// once packets flow again, reconnects and its reports arrive on a new stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t5_a_half_open_connection_is_noticed_and_replaced() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let collector = TestCollector::default();
    let server = collector.serve(listener);
    let config = plaintext(addr);
    assert_eq!(
        (config.keepalive_interval, config.keepalive_timeout),
        (Duration::from_secs(10), Duration::from_secs(10))
    );
    let runner = start_runner(config);
    runner.tx.send(report("a", 1, 0)).await.unwrap();
    wait_for(
        "the first report, acknowledged",
        Duration::from_secs(20),
        || collector.seen(|s| s.accepted) == 1 && runner.stat(|s| &s.acknowledged) == 1,
    )
    .await;
    assert!(runner.stats.connected.load(Ordering::SeqCst));

    let hole = Blackhole::new(addr.port());
    let cut = Instant::now();
    let mut seq = 1;
    // Reports keep coming (they sit in the kernel's send queue, unacknowledged).
    while runner.stats.connected.load(Ordering::SeqCst) {
        assert!(
            cut.elapsed() < Duration::from_secs(30),
            "the half-open connection was not noticed within 30 s"
        );
        seq += 1;
        let _ = runner.tx.try_send(report("a", seq, 0));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let noticed = cut.elapsed();
    assert!(
        noticed >= Duration::from_secs(9),
        "noticed by keepalive, not by something else: {noticed:?}"
    );
    drop(hole);
    seq += 1;
    runner.tx.send(report("a", seq, 0)).await.unwrap();
    wait_for("reports on a new stream", Duration::from_secs(30), || {
        collector.seen(|s| s.last_seq.get("a").copied()) == Some(seq)
    })
    .await;
    assert!(collector.seen(|s| s.streams) >= 2, "a new stream");
    eprintln!("t5: half-open noticed after {noticed:?}");
    runner.stop().await;
    server.abort();
}

/// A switch in front of the collector: while up it forwards connections; `down` closes every
/// connection and stops listening (connection refused), as a collector that restarts.
struct Switch {
    addr: SocketAddr,
    upstream: SocketAddr,
    task: Option<JoinHandle<()>>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Switch {
    async fn new(upstream: SocketAddr) -> Switch {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut s = Switch {
            addr,
            upstream,
            task: None,
            conns: Arc::default(),
        };
        s.listen(listener);
        s
    }

    fn listen(&mut self, listener: TcpListener) {
        let (upstream, conns) = (self.upstream, self.conns.clone());
        self.task = Some(tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                conns.lock().unwrap().push(tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                }));
            }
        }));
    }

    fn down(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    async fn up(&mut self) {
        let listener = TcpListener::bind(self.addr).await.expect("the same port");
        self.listen(listener);
    }
}

/// T7: the collector restarts (here: every connection cut and refused until it is back).
/// Within the spool budget nothing is lost; beyond it the reports' transport drop count
/// equals the overflow exactly, and that count is what the collector shows (the operator's
/// merge adds it to the result's eventsDropped: `t7_transport_drops_show_in_the_result`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t7_a_collector_restart_loses_nothing_within_the_spool_and_counts_the_overflow() {
    const SPOOL: usize = 10_000;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let collector = TestCollector::default();
    let server = collector.serve(listener);
    let mut switch = Switch::new(upstream).await;
    let mut config = plaintext(switch.addr);
    config.spool_events = SPOOL;
    config.backoff.cap = Duration::from_secs(4);
    let runner = start_runner(config);

    let mut seq = 0;
    let mut generated = 0u64;
    for (round, (reports, want_dropped)) in [(8, 0u64), (15, 5_000u64)].into_iter().enumerate() {
        // All acknowledged before the restart: nothing in flight.
        send_events(&runner, 2, &mut seq, &mut generated).await;
        let acked = seq;
        wait_for("acknowledgements", Duration::from_secs(30), || {
            collector.seen(|s| s.last_seq.get("a").copied()) == Some(acked)
                && runner.stat(|s| &s.acknowledged) >= runner.stat(|s| &s.sent)
        })
        .await;
        switch.down();
        wait_for("the runner to notice", Duration::from_secs(30), || {
            !runner.stats.connected.load(Ordering::SeqCst)
        })
        .await;
        // While it is down: `reports` reports of 1,000 events.
        send_events(&runner, reports, &mut seq, &mut generated).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        switch.up().await;
        wait_for(
            "the spool after the restart",
            Duration::from_secs(30),
            || collector.seen(|s| s.last_seq.get("a").copied()) == Some(seq),
        )
        .await;
        let (received, dropped) = collector.seen(|s| {
            (
                s.events,
                s.last.as_ref().unwrap().counters.unwrap().transport_dropped,
            )
        });
        assert_eq!(
            dropped, want_dropped,
            "round {round}: the drop count equals the overflow exactly"
        );
        assert_eq!(
            received + dropped,
            generated,
            "round {round}: received + dropped = generated"
        );
        eprintln!(
            "t7 round {round}: {generated} generated, {received} received, {dropped} dropped"
        );
    }
    runner.stop().await;
    switch.down();
    server.abort();
}

/// Sends `n` reports of 1,000 events of assignment `a`.
async fn send_events(runner: &Runner, n: usize, seq: &mut u64, generated: &mut u64) {
    for _ in 0..n {
        *seq += 1;
        runner.tx.send(report("a", *seq, 1_000)).await.unwrap();
        *generated += 1_000;
    }
}
