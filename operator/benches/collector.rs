//! Benchmarks (not tests): the collector's merge rate on one core (B11), its API writes for
//! 100 nodes reporting once a second for 60 s (B10), and events delivered per second over gRPC
//! on loopback to the real collector server, with loss counted (events).
//! Run: `cargo bench -p fathom-operator --bench collector`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use fathom_crds::{assignment::JobRef, result::EventRecord};
use fathom_operator::collector::{
    Accept, Collector, ExpectedAssignment, JobInfo, MergeState, pacing::ResultWriter,
};
use fathom_proto::v1::{self, AssignmentPhase, AssignmentState, Counters, JobKind, NodeReport};
use jiff::Timestamp;
use serde_json::json;
use support::api::{ManualClock, MemoryApi};

const JOB_UID: &str = "job-uid-1";

fn job_info(nodes: usize) -> JobInfo {
    JobInfo {
        job: JobRef {
            kind: "TraceJob".into(),
            name: "syscalls".into(),
            namespace: Some("shop".into()),
            uid: JOB_UID.into(),
        },
        result_namespace: "shop".into(),
        result_name: "syscalls".into(),
        run: 1,
        probe: "raw_syscalls/sys_enter".into(),
        value: "count".into(),
        keys: vec!["comm".into()],
        top: 50,
        events_last: 100,
        assignments: (0..nodes)
            .map(|i| ExpectedAssignment {
                name: format!("syscalls-node-{i}"),
                uid: format!("a-uid-{i}"),
                node: format!("node-{i}"),
                run: 1,
            })
            .collect(),
    }
}

/// Node `i`'s cumulative report `seq`: `rows` rows keyed by comm.
fn report(i: usize, seq: u64, rows: usize) -> NodeReport {
    let rows: Vec<v1::Row> = (0..rows)
        .map(|r| v1::Row {
            keys: BTreeMap::from([("comm".to_string(), format!("proc-{r}"))]),
            value: seq * (r as u64 + 1),
        })
        .collect();
    let hits = rows.iter().map(|r| r.value).sum();
    NodeReport {
        job_uid: JOB_UID.into(),
        job_kind: JobKind::TraceJob as i32,
        job_namespace: "shop".into(),
        job_name: "syscalls".into(),
        assignment_name: format!("syscalls-node-{i}"),
        assignment_uid: format!("a-uid-{i}"),
        node: format!("node-{i}"),
        run: 1,
        seq,
        result: Some(v1::ResultData {
            probe: "raw_syscalls/sys_enter".into(),
            value: "count".into(),
            keys: vec!["comm".into()],
            rows,
            totals: Some(v1::Totals {
                hits,
                ..Default::default()
            }),
            ..Default::default()
        }),
        event_batch: None,
        counters: Some(Counters {
            hits,
            ..Default::default()
        }),
        state: Some(AssignmentState {
            phase: AssignmentPhase::Attached as i32,
            ..Default::default()
        }),
        r#final: false,
    }
}

/// B11: reports accepted per second on one thread (100 nodes, 50-row reports), and the cost
/// of one full merge of them.
fn merge_rate() {
    let nodes = 100;
    let rounds = 400u64;
    let reports: Vec<Vec<NodeReport>> = (1..=rounds)
        .map(|seq| (0..nodes).map(|i| report(i, seq, 50)).collect())
        .collect();
    let mut state = MergeState::default();
    state.set_job(job_info(nodes));
    let peers: Vec<String> = (0..nodes).map(|i| format!("node-{i}")).collect();
    let started = Instant::now();
    let mut accepted = 0u64;
    for round in &reports {
        for (i, r) in round.iter().enumerate() {
            if matches!(state.accept(&peers[i], r), Accept::Accepted { .. }) {
                accepted += 1;
            }
        }
    }
    let elapsed = started.elapsed();
    assert_eq!(accepted, rounds * nodes as u64);
    println!(
        "B11 accept: {accepted} reports (100 nodes × 50 rows) in {:.1} ms = {:.0} reports/s on one core (target ≥ 10,000, stretch ≥ 100,000)",
        elapsed.as_secs_f64() * 1e3,
        accepted as f64 / elapsed.as_secs_f64()
    );
    let started = Instant::now();
    let merges = 100;
    for _ in 0..merges {
        std::hint::black_box(state.merged(JOB_UID));
    }
    let per = started.elapsed() / merges;
    println!(
        "B11 merge: one full merge of 100 nodes × 50 rows takes {:.2} ms (done at most 4×/s per job)",
        per.as_secs_f64() * 1e3
    );
    // Steady state: the writer merges a job at most every 250 ms; at 100 reports/s that is one
    // merge per 25 reports.
    let per_report = elapsed / accepted as u32 + per / 25;
    println!(
        "B11 accept + amortized merge: {:.0} reports/s",
        1.0 / per_report.as_secs_f64()
    );
}

/// B10: API writes for `nodes` reporting once a second for `seconds`, against the naive one
/// patch per report.
async fn writes(nodes: usize, seconds: u64) {
    let clock = ManualClock::new(Timestamp::from_second(1_750_000_000).expect("time"));
    let api = MemoryApi::new(clock.clone());
    api.seed(
        support::FATHOM,
        "traceresults",
        json!({
            "apiVersion": "fathom.dev/v1alpha1",
            "kind": "TraceResult",
            "metadata": {"name": "syscalls", "namespace": "shop"},
            "spec": {"job": {"kind": "TraceJob", "name": "syscalls", "namespace": "shop", "uid": JOB_UID}},
        }),
    );
    let collector = Collector::new();
    collector.set_job(job_info(nodes));
    let mut writer = ResultWriter::new(api.client(), collector.clone(), clock.clone());
    let start = Instant::now();
    let mut reports = 0u64;
    for second in 0..seconds {
        for quarter in 0..4u64 {
            for i in (0..nodes).filter(|i| (*i as u64) % 4 == quarter) {
                let mut r = report(i, second + 1, 20);
                r.r#final = second + 1 == seconds;
                collector.accept(&format!("node-{i}"), &r);
                reports += 1;
            }
            writer
                .tick(start + Duration::from_millis(second * 1000 + quarter * 250))
                .await;
        }
    }
    writer.tick(start + Duration::from_secs(seconds + 1)).await;
    let api_writes = api
        .writes()
        .iter()
        .filter(|c| c.path.contains("traceresults"))
        .count();
    println!(
        "B10: {nodes} nodes × {seconds} reports: {api_writes} TraceResult writes vs {reports} naive = {:.4}× (target ≤ 0.1×, stretch ≤ 0.02×)",
        api_writes as f64 / reports as f64
    );
}

/// Events/s over gRPC: `streams` runner streams (one per node) send reports of
/// MAX_EVENTS_PER_REPORT events each, pipelined, to the real collector server on loopback
/// (plaintext: TLS adds its cost on top) for `seconds`; delivered = events of accepted
/// reports, lost = sent − delivered (rejected or never acknowledged).
async fn events_over_grpc(streams: usize, seconds: u64) {
    use std::{
        collections::HashMap,
        sync::{
            Arc,
            atomic::{AtomicU64, Ordering},
        },
    };

    use fathom_operator::collector::{
        auth::{StaticReaders, StaticTokens},
        server::{self, CollectorService, Transport},
    };
    use fathom_proto::{MAX_EVENTS_PER_REPORT, v1::collector_client::CollectorClient};
    use tokio::sync::{mpsc, watch};

    let collector = Collector::new();
    collector.set_job(job_info(streams));
    let tokens = StaticTokens(
        (0..streams)
            .map(|i| (format!("token-{i}"), format!("node-{i}")))
            .collect::<HashMap<_, _>>(),
    );
    let (_leading_tx, leading) = watch::channel(true);
    // Nobody watches in this bench: no reader is known.
    let readers = Arc::new(StaticReaders(HashMap::new()));
    let service = CollectorService::new(collector.clone(), Arc::new(tokens), readers, leading);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(server::serve(
        listener,
        Transport::InsecurePlaintext,
        service,
        futures::future::pending(),
    ));
    let sent = Arc::new(AtomicU64::new(0));
    let delivered = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for i in 0..streams {
        let (sent, delivered) = (sent.clone(), delivered.clone());
        tasks.push(tokio::spawn(async move {
            let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
                .expect("uri")
                .connect()
                .await
                .expect("connect");
            let mut client = CollectorClient::new(channel);
            let (tx, rx) = mpsc::channel::<NodeReport>(16);
            let outbound =
                futures::stream::unfold(
                    rx,
                    |mut rx| async move { rx.recv().await.map(|r| (r, rx)) },
                );
            let mut req = tonic::Request::new(outbound);
            req.metadata_mut().insert(
                "authorization",
                format!("Bearer token-{i}").parse().expect("ascii"),
            );
            let template = report(i, 0, 20);
            // Events as the runner holds them after reading the ring buffer; each report
            // converts them into its batch, as the runner does (that cost is counted).
            let records: Vec<EventRecord> = (0..MAX_EVENTS_PER_REPORT as u64)
                .map(|e| EventRecord {
                    time_ns: 1_750_000_000_000_000_000 + e,
                    fields: BTreeMap::from([
                        ("comm".to_string(), format!("proc-{}", e % 50)),
                        ("pid".to_string(), (1000 + e % 50).to_string()),
                        ("path".to_string(), "/var/lib/app/data.db".to_string()),
                    ]),
                })
                .collect();
            let per_report = records.len() as u64;
            let sender = {
                let sent = sent.clone();
                tokio::spawn(async move {
                    let mut seq = 0;
                    while Instant::now() < until {
                        seq += 1;
                        let mut r = template.clone();
                        r.seq = seq;
                        r.event_batch = Some(v1::EventBatch::from_records(&records));
                        if tx.send(r).await.is_err() {
                            break;
                        }
                        sent.fetch_add(per_report, Ordering::Relaxed);
                    }
                })
            };
            let mut acks = client.report(req).await.expect("stream").into_inner();
            while let Ok(Some(ack)) = acks.message().await {
                if ack.rejection.is_none() {
                    delivered.fetch_add(per_report, Ordering::Relaxed);
                }
                if sender.is_finished()
                    && delivered.load(Ordering::Relaxed) >= sent.load(Ordering::Relaxed)
                {
                    break;
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (sent, delivered) = (
        sent.load(Ordering::Relaxed),
        delivered.load(Ordering::Relaxed),
    );
    println!(
        "events over gRPC: {streams} streams, {delivered} events delivered in {elapsed:.2} s = {:.0} events/s (target ≥ 1,000,000 on 2 cores); sent {sent}, lost {}",
        delivered as f64 / elapsed,
        sent - delivered
    );
}

fn main() {
    merge_rate();
    let single = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    single.block_on(writes(100, 60));
    // Two workers: the runners' side and the collector's share the machine's 2 cores.
    let two = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    two.block_on(events_over_grpc(4, 10));
}
