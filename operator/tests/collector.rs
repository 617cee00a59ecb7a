//! The collector: the merge core (duplicates, replacement, cross-node merge, coverage,
//! bounds), write pacing against the in-memory API (B10), and the gRPC server in process with
//! a tonic client as a fake runner (acks, rejections, T6, T8).

mod support;

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use fathom_crds::{
    assignment::JobRef,
    result::{EventRecord, Row},
};
use fathom_operator::collector::{
    Accept, Collector, ExpectedAssignment, JobInfo, MergeState,
    auth::{StaticReaders, StaticTokens},
    pacing::{ResultWriter, WRITE_INTERVAL},
    server::{self, CollectorService, Transport},
};
use fathom_operator::metrics::Metrics;
use fathom_proto::v1::{
    self, AssignmentPhase, AssignmentState, Counters, JobKind, NodeReport, RejectionCode,
    collector_client::CollectorClient, results_client::ResultsClient,
};
use jiff::Timestamp;
use serde_json::json;
use support::{
    FATHOM,
    api::{ManualClock, MemoryApi},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};
use tonic::{Request, transport::Channel};

const JOB_UID: &str = "job-uid-1";

fn job_info(nodes: usize) -> JobInfo {
    JobInfo {
        job: JobRef {
            kind: "TraceJob".into(),
            name: "drops".into(),
            namespace: Some("shop".into()),
            uid: JOB_UID.into(),
        },
        result_namespace: "shop".into(),
        result_name: "drops".into(),
        run: 1,
        probe: "skb/kfree_skb".into(),
        value: "count".into(),
        keys: vec!["comm".into()],
        top: 3,
        events_last: 5,
        assignments: (0..nodes)
            .map(|i| ExpectedAssignment {
                name: format!("drops-node-{i}"),
                uid: format!("a-uid-{i}"),
                node: format!("node-{i}"),
                run: 1,
            })
            .collect(),
    }
}

fn row(comm: &str, value: u64) -> v1::Row {
    v1::Row {
        keys: BTreeMap::from([("comm".to_string(), comm.to_string())]),
        value,
    }
}

/// Node `i`'s cumulative report `seq` with `rows`.
fn report(i: usize, seq: u64, rows: &[(&str, u64)]) -> NodeReport {
    let hits: u64 = rows.iter().map(|r| r.1).sum();
    NodeReport {
        job_uid: JOB_UID.into(),
        job_kind: JobKind::TraceJob as i32,
        job_namespace: "shop".into(),
        job_name: "drops".into(),
        assignment_name: format!("drops-node-{i}"),
        assignment_uid: format!("a-uid-{i}"),
        node: format!("node-{i}"),
        run: 1,
        seq,
        result: Some(v1::ResultData {
            probe: "skb/kfree_skb".into(),
            value: "count".into(),
            keys: vec!["comm".into()],
            rows: rows.iter().map(|(c, v)| row(c, *v)).collect(),
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

fn merge_state(nodes: usize) -> MergeState {
    let mut s = MergeState::default();
    s.set_job(job_info(nodes));
    s
}

fn keys(comm: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("comm".to_string(), comm.to_string())])
}

// Merge core.

#[test]
fn a_duplicate_is_discarded_and_counted() {
    let mut s = merge_state(1);
    assert_eq!(
        s.accept("node-0", &report(0, 5, &[("a", 10)])),
        Accept::Accepted { seq: 5 }
    );
    assert_eq!(
        s.accept("node-0", &report(0, 5, &[("a", 10)])),
        Accept::Duplicate { acked: 5 }
    );
    assert_eq!(
        s.accept("node-0", &report(0, 3, &[("a", 99)])),
        Accept::Duplicate { acked: 5 }
    );
    assert_eq!(s.duplicates_discarded(), 2);
    let m = s.merged(JOB_UID).expect("known");
    assert_eq!(m.data.totals.hits, 10);
    assert_eq!(m.data.rows[0].value, 10);
}

#[test]
fn a_higher_seq_replaces_and_never_adds() {
    let mut s = merge_state(1);
    s.accept("node-0", &report(0, 1, &[("a", 10), ("b", 1)]));
    s.accept("node-0", &report(0, 2, &[("a", 15), ("b", 2)]));
    let m = s.merged(JOB_UID).expect("known");
    assert_eq!(m.data.totals.hits, 17);
    assert_eq!(m.counters.hits, 17);
    assert_eq!(
        m.data.rows,
        vec![
            Row {
                keys: keys("a"),
                value: 15
            },
            Row {
                keys: keys("b"),
                value: 2
            }
        ]
    );
}

#[test]
fn nodes_merge_by_keys_with_top_n_and_the_other_row() {
    let mut s = merge_state(3);
    s.accept("node-0", &report(0, 1, &[("a", 10), ("b", 5), ("c", 1)]));
    s.accept("node-1", &report(1, 1, &[("a", 1), ("d", 7), ("e", 2)]));
    s.accept("node-2", &report(2, 1, &[("c", 3), ("b", 1)]));
    let m = s.merged(JOB_UID).expect("known");
    // a=11, d=7, b=6 are the top 3; c=4 and e=2 go to other.
    let top: Vec<(String, u64)> = m
        .data
        .rows
        .iter()
        .map(|r| (r.keys["comm"].clone(), r.value))
        .collect();
    assert_eq!(
        top,
        vec![("a".into(), 11), ("d".into(), 7), ("b".into(), 6)]
    );
    let other = m.data.other.clone().expect("rows were cut");
    assert_eq!((other.rows, other.value), (2, 6));
    assert!(m.data.truncated, "top-N cut rows");
    assert_eq!(m.data.totals.hits, 30);
    assert_eq!(m.data.value_total(), 30);
}

#[test]
fn histograms_sum_bucket_wise_and_events_keep_the_last_n() {
    let mut s = merge_state(2);
    let hist = |counts: &[(u64, u64)]| v1::Histogram {
        keys: BTreeMap::new(),
        buckets: counts
            .iter()
            .map(|(low, count)| v1::Bucket {
                low: *low,
                high: (*low).max(1) * 2,
                count: *count,
            })
            .collect(),
        count: counts.iter().map(|c| c.1).sum(),
    };
    let events = |times: std::ops::Range<u64>| {
        let records: Vec<EventRecord> = times
            .map(|t| EventRecord {
                time_ns: t,
                fields: BTreeMap::from([("pid".to_string(), t.to_string())]),
            })
            .collect();
        Some(v1::EventBatch::from_records(&records))
    };
    let mut r0 = report(0, 1, &[]);
    r0.result.as_mut().expect("result").histograms = vec![hist(&[(1, 3), (4, 1)])];
    r0.event_batch = events(0..4);
    let mut r1 = report(1, 1, &[]);
    r1.result.as_mut().expect("result").histograms = vec![hist(&[(4, 2), (16, 5)])];
    r1.event_batch = events(10..14);
    s.accept("node-0", &r0);
    s.accept("node-1", &r1);
    let m = s.merged(JOB_UID).expect("known");
    assert_eq!(m.data.histograms.len(), 1);
    let h = &m.data.histograms[0];
    let buckets: Vec<(u64, u64)> = h.buckets.iter().map(|b| (b.low, b.count)).collect();
    assert_eq!(buckets, vec![(1, 3), (4, 3), (16, 5)]);
    assert_eq!(h.count, 11);
    let times: Vec<u64> = m.data.events.iter().map(|e| e.time_ns).collect();
    assert_eq!(times, vec![3, 10, 11, 12, 13], "the last 5, oldest first");
}

#[test]
fn loss_counters_sum_over_nodes() {
    let mut s = merge_state(2);
    for i in 0..2 {
        let mut r = report(i, 1, &[("a", 1)]);
        let t = r
            .result
            .as_mut()
            .and_then(|r| r.totals.as_mut())
            .expect("totals");
        t.map_full = 2;
        t.events_lost = 3;
        t.rate_limited = 4;
        r.counters = Some(Counters {
            hits: 1,
            map_full: 2,
            ringbuf_lost: 3,
            rate_limited: 4,
            user_dropped: 0,
            transport_dropped: 5,
        });
        s.accept(&format!("node-{i}"), &r);
    }
    let m = s.merged(JOB_UID).expect("known");
    assert_eq!(
        (
            m.data.totals.map_full,
            m.data.totals.events_lost,
            m.data.totals.rate_limited
        ),
        (4, 6, 8)
    );
    assert_eq!(m.counters.transport_dropped, 10);
    let reasons: Vec<&str> = m.data.degraded.iter().map(|d| d.reason.as_str()).collect();
    assert_eq!(reasons, vec!["MapFull", "EventsLost", "RateLimited"]);
}

#[test]
fn coverage_counts_reported_finished_and_failed_nodes() {
    let mut s = merge_state(4);
    let m = s.merged(JOB_UID).expect("known");
    assert_eq!(m.coverage.nodes_expected, 4);
    assert_eq!(m.coverage.nodes_reported, 0);
    s.accept("node-0", &report(0, 1, &[("a", 1)]));
    let mut fin = report(1, 1, &[("a", 2)]);
    fin.r#final = true;
    fin.state.as_mut().expect("state").phase = AssignmentPhase::Succeeded as i32;
    s.accept("node-1", &fin);
    let mut failed = report(2, 1, &[]);
    failed.result = None;
    failed.state.as_mut().expect("state").phase = AssignmentPhase::NotFeasible as i32;
    s.accept("node-2", &failed);
    let m = s.merged(JOB_UID).expect("known");
    assert_eq!(
        (
            m.coverage.nodes_reported,
            m.coverage.nodes_expected,
            m.coverage.nodes_finished,
            m.coverage.nodes_failed
        ),
        (3, 4, 1, 1)
    );
    assert!(!m.finished);
    // A report after the final one of the same run is a runner bug.
    let mut late = report(1, 2, &[("a", 3)]);
    late.state.as_mut().expect("state").phase = AssignmentPhase::Succeeded as i32;
    assert!(matches!(
        s.accept("node-1", &late),
        Accept::Rejected {
            code: RejectionCode::Invalid,
            ..
        }
    ));
    for i in [0, 3] {
        let mut f = report(i, 9, &[("a", 1)]);
        f.r#final = true;
        s.accept(&format!("node-{i}"), &f);
    }
    assert!(s.merged(JOB_UID).expect("known").finished);
}

#[test]
fn a_result_over_the_bound_is_cut_and_flagged_truncated() {
    let mut s = MergeState::default();
    let mut info = job_info(1);
    info.top = 10_000;
    s.set_job(info);
    let rows: Vec<(String, u64)> = (0..10_000u64)
        .map(|i| (format!("{}-{i:06}", "x".repeat(120)), 10_000 - i))
        .collect();
    let borrowed: Vec<(&str, u64)> = rows.iter().map(|(c, v)| (c.as_str(), *v)).collect();
    s.accept("node-0", &report(0, 1, &borrowed));
    let m = s.merged(JOB_UID).expect("known");
    assert!(m.data.truncated);
    assert!(serde_json::to_vec(&m.data).expect("json").len() <= 1000 * 1024);
    assert!(m.data.rows.len() < 10_000);
    assert_eq!(m.data.value_total(), (1..=10_000u64).sum::<u64>());
}

#[test]
fn reports_that_do_not_match_the_api_are_rejected_with_a_reason() {
    let mut s = merge_state(2);
    let code = |a: Accept| match a {
        Accept::Rejected { code, reason, .. } => {
            assert!(!reason.is_empty());
            code
        }
        other => panic!("accepted: {other:?}"),
    };
    let mut unknown = report(0, 1, &[("a", 1)]);
    unknown.assignment_uid = "nope".into();
    assert_eq!(
        code(s.accept("node-0", &unknown)),
        RejectionCode::UnknownAssignment
    );
    // Node 0's runner reporting on node 1's assignment.
    let mut other_node = report(1, 1, &[("a", 1)]);
    other_node.node = "node-0".into();
    assert_eq!(
        code(s.accept("node-0", &other_node)),
        RejectionCode::WrongNode
    );
    assert_eq!(
        code(s.accept("node-0", &report(1, 1, &[("a", 1)]))),
        RejectionCode::WrongNode
    );
    let mut wrong_job = report(0, 1, &[("a", 1)]);
    wrong_job.job_uid = "another-job".into();
    assert_eq!(
        code(s.accept("node-0", &wrong_job)),
        RejectionCode::JobMismatch
    );
    let mut info = job_info(2);
    info.run = 2;
    for a in &mut info.assignments {
        a.run = 2;
    }
    s.set_job(info);
    assert_eq!(
        code(s.accept("node-0", &report(0, 1, &[("a", 1)]))),
        RejectionCode::StaleRun
    );
    let m = s.merged(JOB_UID).expect("known");
    assert_eq!(m.coverage.nodes_reported, 0, "nothing merged");
    assert_eq!(m.data.totals.hits, 0);
    assert_eq!(s.rejected(), 5);
}

// Write pacing (B10).

fn seed_result(api: &MemoryApi) {
    api.seed(
        FATHOM,
        "traceresults",
        json!({
            "apiVersion": "fathom.dev/v1alpha1",
            "kind": "TraceResult",
            "metadata": {"name": "drops", "namespace": "shop"},
            "spec": {"job": {"kind": "TraceJob", "name": "drops", "namespace": "shop", "uid": JOB_UID}},
        }),
    );
}

fn seed_job_with_uid(api: &MemoryApi, uid: &str) {
    api.seed(
        FATHOM,
        "tracejobs",
        json!({
            "apiVersion": "fathom.dev/v1alpha1",
            "kind": "TraceJob",
            "metadata": {"name": "drops", "namespace": "shop", "uid": uid},
            "spec": {"probe": {"tracepoint": "skb/kfree_skb"}},
        }),
    );
}

fn seed_job(api: &MemoryApi) {
    seed_job_with_uid(api, JOB_UID);
}

/// Runs 100 nodes reporting once a second for 60 s against the writer on a virtual clock;
/// returns the API writes and the final report count.
pub async fn b10_writes(nodes: usize, seconds: u64) -> (u64, u64) {
    let clock = ManualClock::new(Timestamp::from_second(1_750_000_000).expect("time"));
    let api = MemoryApi::new(clock.clone());
    seed_result(&api);
    let collector = Collector::new();
    collector.set_job(job_info(nodes));
    let mut writer = ResultWriter::new(api.client(), collector.clone(), clock.clone());
    let start = Instant::now();
    let mut reports = 0;
    for second in 0..seconds {
        // Nodes report spread over the second; the writer ticks every 250 ms.
        for quarter in 0..4u64 {
            for i in (0..nodes).filter(|i| (*i as u64) % 4 == quarter) {
                let last = second + 1 == seconds;
                let mut r = report(i, second + 1, &[("a", second + 1), ("b", i as u64)]);
                r.r#final = last;
                collector.accept(&format!("node-{i}"), &r);
                reports += 1;
            }
            let now = start + Duration::from_millis(second * 1000 + quarter * 250);
            writer.tick(now).await;
        }
    }
    writer
        .tick(start + Duration::from_secs(seconds) + WRITE_INTERVAL)
        .await;
    let status_writes = api
        .writes()
        .iter()
        .filter(|c| c.path.contains("traceresults"))
        .inspect(|c| {
            assert_eq!(c.field_manager.as_deref(), Some("fathom-operator"));
            assert!(!c.force, "server-side apply without force");
        })
        .count() as u64;
    assert_eq!(status_writes, writer.writes());
    let stored = api
        .get(FATHOM, "traceresults", "shop", "drops")
        .expect("result");
    assert_eq!(
        stored["status"]["total"].as_u64(),
        Some(nodes as u64 * seconds + (0..nodes as u64).sum::<u64>()),
        "the last write holds the final merge"
    );
    assert_eq!(stored["status"]["nodes"].as_u64(), Some(nodes as u64));
    (status_writes, reports)
}

#[tokio::test]
async fn a_result_removed_under_a_running_job_is_made_again_owned_by_the_job() {
    // No TraceResult seeded: the garbage collector took it (a job deleted and created again
    // under its name), or someone deleted it. The job itself is still there.
    let clock = ManualClock::new(Timestamp::from_second(1_750_000_000).expect("time"));
    let api = MemoryApi::new(clock.clone());
    seed_job(&api);
    let collector = Collector::new();
    collector.set_job(job_info(2));
    let mut writer = ResultWriter::new(api.client(), collector.clone(), clock.clone());
    collector.accept("node-0", &report(0, 1, &[("a", 7)]));
    writer.tick(Instant::now()).await;
    assert_eq!(writer.writes(), 1);
    let stored = api
        .get(FATHOM, "traceresults", "shop", "drops")
        .expect("the result, made again");
    assert_eq!(stored["status"]["total"].as_u64(), Some(7));
    assert_eq!(stored["spec"]["job"]["uid"].as_str(), Some(JOB_UID));
    let owner = &stored["metadata"]["ownerReferences"][0];
    assert_eq!(
        (
            owner["kind"].as_str(),
            owner["uid"].as_str(),
            owner["controller"].as_bool()
        ),
        (Some("TraceJob"), Some(JOB_UID), Some(true)),
        "owned by the job: {stored:#}"
    );
}

#[tokio::test]
async fn a_job_gone_with_its_result_is_forgotten_not_written_for_ever() {
    // The job was deleted: the garbage collector took its TraceResult, and a late report
    // still sits in the merge. Nothing is made again for nobody, and the writer stops.
    let clock = ManualClock::new(Timestamp::from_second(1_750_000_000).expect("time"));
    let api = MemoryApi::new(clock.clone());
    let collector = Collector::new();
    collector.set_job(job_info(2));
    let mut writer = ResultWriter::new(api.client(), collector.clone(), clock.clone());
    collector.accept("node-0", &report(0, 1, &[("a", 7)]));
    writer.tick(Instant::now()).await;
    assert_eq!(writer.writes(), 0);
    assert!(
        api.get(FATHOM, "traceresults", "shop", "drops").is_none(),
        "no result made for a deleted job"
    );
    assert!(
        collector.state().job_uids().is_empty(),
        "the deleted job is forgotten"
    );
    // A job of the same name but another uid (created again) is not the one reported on.
    seed_job_with_uid(&api, "a-new-uid");
    collector.set_job(job_info(2));
    collector.accept("node-0", &report(0, 1, &[("a", 7)]));
    writer.tick(Instant::now() + WRITE_INTERVAL).await;
    assert_eq!(writer.writes(), 0);
    assert!(collector.state().job_uids().is_empty());
}

#[tokio::test]
async fn b10_writes_are_paced_to_a_tenth_of_one_per_report() {
    let (writes, reports) = b10_writes(100, 60).await;
    assert_eq!(reports, 6_000);
    assert!(
        writes * 10 <= reports,
        "{writes} writes for {reports} reports: more than 0.1×"
    );
    assert!(
        writes <= 62,
        "at most one a second and one at the end: {writes}"
    );
}

#[tokio::test]
async fn an_unchanged_merge_is_not_written_again() {
    let clock = ManualClock::new(Timestamp::from_second(1_750_000_000).expect("time"));
    let api = MemoryApi::new(clock.clone());
    seed_result(&api);
    let collector = Collector::new();
    collector.set_job(job_info(1));
    let mut writer = ResultWriter::new(api.client(), collector.clone(), clock.clone());
    let t0 = Instant::now();
    collector.accept("node-0", &report(0, 1, &[("a", 1)]));
    assert_eq!(writer.tick(t0).await, 1);
    // A newer report with the same counts: a new version, the same status.
    collector.accept("node-0", &report(0, 2, &[("a", 1)]));
    assert_eq!(writer.tick(t0 + Duration::from_secs(2)).await, 0);
    collector.accept("node-0", &report(0, 3, &[("a", 2)]));
    assert_eq!(
        writer.tick(t0 + Duration::from_millis(2500)).await,
        0,
        "paced"
    );
    assert_eq!(writer.tick(t0 + Duration::from_secs(4)).await, 1);
}

// The gRPC server, in process.

/// Readers of the watch tests: `reader-shop` may read results in namespace shop,
/// `reader-other` only in namespace other, `reader-cluster` everywhere.
fn readers() -> Arc<StaticReaders> {
    Arc::new(StaticReaders(HashMap::from([
        (
            "reader-shop".to_string(),
            ("shop-dev".to_string(), vec![Some("shop".to_string())]),
        ),
        (
            "reader-other".to_string(),
            ("other-dev".to_string(), vec![Some("other".to_string())]),
        ),
        (
            "reader-cluster".to_string(),
            ("admin".to_string(), vec![None]),
        ),
    ])))
}

/// A Results client that sends `token` as its bearer token.
async fn results_client(
    addr: SocketAddr,
    token: &'static str,
) -> ResultsClient<
    tonic::service::interceptor::InterceptedService<
        Channel,
        impl FnMut(Request<()>) -> Result<Request<()>, tonic::Status> + Clone,
    >,
> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    ResultsClient::with_interceptor(channel, move |mut req: Request<()>| {
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("ascii"),
        );
        Ok(req)
    })
}

/// Watches `job` as the reader of `token`.
async fn watch_as(
    addr: SocketAddr,
    token: &'static str,
    job: v1::JobRef,
) -> Result<tonic::Streaming<v1::ResultUpdate>, tonic::Status> {
    results_client(addr, token)
        .await
        .watch(job)
        .await
        .map(tonic::Response::into_inner)
}

fn job_ref(namespace: &str, name: &str) -> v1::JobRef {
    v1::JobRef {
        namespace: namespace.into(),
        name: name.into(),
        kind: JobKind::TraceJob as i32,
        include_events: true,
    }
}

struct Server {
    addr: SocketAddr,
    collector: Arc<Collector>,
    metrics: Arc<Metrics>,
    _stop: watch::Sender<bool>,
    _leading: watch::Sender<bool>,
}

async fn start_server(nodes: usize) -> Server {
    let collector = Collector::new();
    collector.set_job(job_info(nodes));
    let tokens = StaticTokens(
        (0..nodes)
            .map(|i| (format!("token-{i}"), format!("node-{i}")))
            .collect(),
    );
    let (leading_tx, leading) = watch::channel(true);
    let metrics = Arc::new(Metrics::default());
    let service = CollectorService::new(collector.clone(), Arc::new(tokens), readers(), leading)
        .with_metrics(metrics.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, mut stopped) = watch::channel(false);
    tokio::spawn(async move {
        server::serve(
            listener,
            Transport::InsecurePlaintext,
            service,
            async move {
                let _ = stopped.wait_for(|v| *v).await;
            },
        )
        .await
        .expect("serve");
    });
    Server {
        addr,
        collector,
        metrics,
        _stop: stop,
        _leading: leading_tx,
    }
}

/// A fake runner's stream: send reports, read acks.
struct Runner {
    tx: mpsc::Sender<NodeReport>,
    acks: tonic::Streaming<v1::ReportAck>,
}

async fn runner(addr: SocketAddr, token: &str) -> Result<Runner, tonic::Status> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut client = CollectorClient::new(channel).max_decoding_message_size(usize::MAX);
    let (tx, rx) = mpsc::channel(16);
    let outbound =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
    let mut req = Request::new(outbound);
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii"),
    );
    let acks = client.report(req).await?.into_inner();
    Ok(Runner { tx, acks })
}

impl Runner {
    async fn send(&mut self, r: NodeReport) -> Result<v1::ReportAck, tonic::Status> {
        self.tx
            .send(r)
            .await
            .map_err(|_| tonic::Status::unavailable("stream closed"))?;
        match tokio::time::timeout(Duration::from_secs(5), self.acks.message()).await {
            Ok(Ok(Some(ack))) => Ok(ack),
            Ok(Ok(None)) => Err(tonic::Status::unavailable("stream ended")),
            Ok(Err(s)) => Err(s),
            Err(_) => Err(tonic::Status::deadline_exceeded("no ack")),
        }
    }
}

fn rejection(ack: &v1::ReportAck) -> RejectionCode {
    ack.rejection
        .as_ref()
        .map_or(RejectionCode::Unspecified, |r| r.code())
}

#[tokio::test]
async fn reports_are_acked_in_order_and_merged() {
    let s = start_server(2).await;
    let mut r = runner(s.addr, "token-0").await.expect("stream");
    let ack = r.send(report(0, 1, &[("a", 3)])).await.expect("ack");
    assert_eq!((ack.acknowledged_seq, ack.rejection), (1, None));
    assert_eq!(ack.assignment_uid, "a-uid-0");
    let ack = r.send(report(0, 2, &[("a", 5)])).await.expect("ack");
    assert_eq!(ack.acknowledged_seq, 2);
    let ack = r.send(report(0, 2, &[("a", 5)])).await.expect("ack");
    assert_eq!(rejection(&ack), RejectionCode::Duplicate);
    assert_eq!(ack.acknowledged_seq, 2);
    let m = s.collector.merged(JOB_UID).expect("known");
    assert_eq!(m.data.totals.hits, 5);
    assert_eq!(s.collector.duplicates_discarded(), 1);
    let exposed = s.metrics.encode();
    assert!(
        exposed.contains(
            "fathom_operator_collector_reports_total{outcome=\"REJECTION_CODE_DUPLICATE\"} 1"
        ) && exposed.contains("fathom_operator_collector_reports_total{outcome=\"accepted\"} 2"),
        "{exposed}"
    );
}

#[tokio::test]
async fn a_stream_without_a_valid_token_is_unauthenticated() {
    let s = start_server(1).await;
    let err = match runner(s.addr, "forged").await {
        Ok(mut r) => r.send(report(0, 1, &[("a", 1)])).await.unwrap_err(),
        Err(e) => e,
    };
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert_eq!(
        s.collector.merged(JOB_UID).expect("known").data.totals.hits,
        0
    );
}

#[tokio::test]
async fn t8_a_runner_of_node_a_reporting_for_node_b_is_denied_and_nothing_is_merged() {
    let s = start_server(2).await;
    let mut a = runner(s.addr, "token-0").await.expect("stream");
    // Node 1's assignment, as node 1 would send it, on node 0's stream.
    let ack = a.send(report(1, 1, &[("evil", 1000)])).await.expect("ack");
    assert_eq!(rejection(&ack), RejectionCode::WrongNode);
    let reason = ack.rejection.as_ref().expect("rejected").reason.clone();
    assert!(
        reason.contains("node-1") && reason.contains("node-0"),
        "{reason}"
    );
    assert_eq!(
        fathom_operator::collector::merge::category(RejectionCode::WrongNode),
        "PermissionDenied"
    );
    // Claiming to be node 1 does not help: the stream is node 0's.
    let mut lying = report(1, 2, &[("evil", 1000)]);
    lying.node = "node-1".into();
    assert_eq!(
        rejection(&a.send(lying).await.expect("ack")),
        RejectionCode::WrongNode
    );
    let m = s.collector.merged(JOB_UID).expect("known");
    assert_eq!(m.coverage.nodes_reported, 0, "nothing merged");
    assert_eq!(m.data.totals.hits, 0);
    // The stream goes on for node 0's own reports.
    let ack = a.send(report(0, 1, &[("a", 1)])).await.expect("ack");
    assert_eq!(ack.rejection, None);
}

#[tokio::test]
async fn t8_a_wrong_job_uid_or_an_invalid_report_is_rejected_and_good_reports_keep_flowing() {
    let s = start_server(1).await;
    let mut r = runner(s.addr, "token-0").await.expect("stream");
    let mut wrong_job = report(0, 1, &[("a", 1)]);
    wrong_job.job_uid = "another-job".into();
    let ack = r.send(wrong_job).await.expect("ack");
    assert_eq!(rejection(&ack), RejectionCode::JobMismatch);
    let mut invalid = report(0, 2, &[("a", 1)]);
    invalid.state = None;
    assert_eq!(
        rejection(&r.send(invalid).await.expect("ack")),
        RejectionCode::Invalid
    );
    // An event batch whose cell points past its values is rejected whole.
    let mut bad_events = report(0, 2, &[("a", 1)]);
    bad_events.event_batch = Some(v1::EventBatch {
        fields: vec!["comm".into()],
        values: vec!["nginx".into()],
        time_ns: vec![1],
        cells: vec![2],
    });
    let ack = r.send(bad_events).await.expect("ack");
    assert_eq!(rejection(&ack), RejectionCode::Invalid);
    assert!(
        ack.rejection
            .expect("rejected")
            .reason
            .contains("cell 0 points at value 2 of 1"),
        "the reason names the cell"
    );
    let ack = r.send(report(0, 3, &[("a", 7)])).await.expect("ack");
    assert_eq!((ack.acknowledged_seq, ack.rejection), (3, None));
    assert_eq!(
        s.collector.merged(JOB_UID).expect("known").data.totals.hits,
        7
    );
}

#[tokio::test]
async fn t8_an_oversized_report_ends_the_stream_and_a_new_stream_keeps_going() {
    let s = start_server(1).await;
    let mut r = runner(s.addr, "token-0").await.expect("stream");
    let mut big = report(0, 1, &[]);
    // Distinct values: a batch sends each value once.
    let records: Vec<EventRecord> = (0..5_000)
        .map(|i| EventRecord {
            time_ns: i,
            fields: BTreeMap::from([("path".to_string(), format!("{i}{}", "p".repeat(1_000)))]),
        })
        .collect();
    big.event_batch = Some(v1::EventBatch::from_records(&records));
    let err = r.send(big).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
    assert_eq!(
        s.collector
            .merged(JOB_UID)
            .expect("known")
            .coverage
            .nodes_reported,
        0
    );
    // A new stream works.
    let mut r = runner(s.addr, "token-0").await.expect("stream");
    assert_eq!(
        r.send(report(0, 2, &[("a", 1)]))
            .await
            .expect("ack")
            .rejection,
        None
    );
}

#[tokio::test]
async fn a_follower_answers_unavailable() {
    let collector = Collector::new();
    collector.set_job(job_info(1));
    let (_tx, leading) = watch::channel(false);
    let tokens = StaticTokens(HashMap::from([("token-0".into(), "node-0".into())]));
    let service = CollectorService::new(collector, Arc::new(tokens), readers(), leading);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(server::serve(
        listener,
        Transport::InsecurePlaintext,
        service,
        futures::future::pending(),
    ));
    let err = match runner(addr, "token-0").await {
        Ok(mut r) => r.send(report(0, 1, &[])).await.unwrap_err(),
        Err(e) => e,
    };
    assert_eq!(err.code(), tonic::Code::Unavailable);
}

#[tokio::test]
async fn watch_streams_the_merged_result_and_ends_after_the_final_one() {
    let s = start_server(1).await;
    let mut results = results_client(s.addr, "reader-shop").await;
    let missing = results.watch(job_ref("shop", "nope")).await.unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let mut updates = results
        .watch(job_ref("shop", "drops"))
        .await
        .expect("watch")
        .into_inner();
    let first = updates.message().await.expect("ok").expect("first");
    assert_eq!(first.coverage.expect("coverage").nodes_expected, 1);
    let mut r = runner(s.addr, "token-0").await.expect("stream");
    let mut fin = report(0, 1, &[("a", 4)]);
    fin.r#final = true;
    fin.event_batch = Some(v1::EventBatch::from_records(&[EventRecord {
        time_ns: 1,
        fields: BTreeMap::from([("comm".to_string(), "nginx".to_string())]),
    }]));
    r.send(fin).await.expect("ack");
    s.collector.publish();
    let last = tokio::time::timeout(Duration::from_secs(5), updates.message())
        .await
        .expect("in time")
        .expect("ok")
        .expect("an update");
    assert!(last.r#final);
    assert_eq!(last.counters.expect("counters").hits, 4);
    assert_eq!(last.events.len(), 1);
    assert!(
        updates.message().await.expect("ok").is_none(),
        "the stream ends after the final update"
    );
}

// T6: a fault-injecting proxy between the runner and the collector.

/// Forwards connections to `upstream`; each connection, until `faults` reached `max`, is cut
/// after a pseudo-random number of bytes in one direction: toward the server (the report is
/// lost, a reset) or toward the runner (the report arrived, its ack is dropped).
async fn fault_proxy(upstream: SocketAddr, faults: Arc<AtomicU64>, max: u64) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let budget = 200 + (seed >> 33) % 3_000;
            let toward_runner = (seed >> 20) & 1 == 1;
            let faults = faults.clone();
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    return;
                };
                let inject = faults.load(Ordering::SeqCst) < max;
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let limit = |dir: bool| (inject && dir).then_some(budget);
                let up = pipe(cr, sw, limit(!toward_runner));
                let down = pipe(sr, cw, limit(toward_runner));
                // Either direction ending (a fault or a close) ends the connection.
                let cut = tokio::select! { c = up => c, c = down => c };
                if cut {
                    faults.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
    });
    addr
}

/// Copies until EOF, an error, or `limit` bytes (then returns true: a fault).
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    limit: Option<u64>,
) -> bool {
    let mut buf = vec![0u8; 4096];
    let mut sent = 0u64;
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        if let Some(limit) = limit
            && sent + n as u64 > limit
        {
            let keep = (limit - sent) as usize;
            let _ = to.write_all(&buf[..keep]).await;
            return true;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return false;
        }
        sent += n as u64;
    }
}

#[tokio::test]
async fn t6_retries_never_double_count() {
    let s = start_server(1).await;
    let faults = Arc::new(AtomicU64::new(0));
    let proxy = fault_proxy(s.addr, faults.clone(), 100).await;
    // Ground truth: the node's cumulative counts.
    let (mut a, mut b) = (0u64, 0u64);
    let mut seq = 0u64;
    let mut step = 0u64;
    let mut latest = None;
    let mut stream: Option<Runner> = None;
    let mut resends = 0u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    while faults.load(Ordering::SeqCst) < 100 || step < 300 {
        assert!(
            Instant::now() < deadline,
            "took too long: {} faults",
            faults.load(Ordering::SeqCst)
        );
        let r = match stream.as_mut() {
            Some(r) => r,
            None => match runner(proxy, "token-0").await {
                Ok(r) => stream.insert(r),
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    continue;
                }
            },
        };
        // After a reconnect the latest report is resent; else the next one is made.
        let report = match latest.clone() {
            Some(r) => {
                resends += 1;
                r
            }
            None => {
                step += 1;
                a += step % 7 + 1;
                b += step % 3;
                seq += 1;
                let r = self::report(0, seq, &[("a", a), ("b", b)]);
                latest = Some(r.clone());
                r
            }
        };
        match r.send(report).await {
            Ok(ack) => {
                assert!(
                    matches!(
                        rejection(&ack),
                        RejectionCode::Unspecified | RejectionCode::Duplicate
                    ),
                    "{ack:?}"
                );
                assert_eq!(ack.acknowledged_seq, seq);
                latest = None;
            }
            Err(_) => stream = None,
        }
    }
    let m = s.collector.merged(JOB_UID).expect("known");
    assert_eq!(m.data.totals.hits, a + b, "totals equal ground truth");
    let rows: HashMap<String, u64> = m
        .data
        .rows
        .iter()
        .map(|r| (r.keys["comm"].clone(), r.value))
        .collect();
    assert_eq!(rows["a"], a);
    assert_eq!(rows["b"], b);
    let dups = s.collector.duplicates_discarded();
    assert!(
        dups > 0,
        "retries happened: {resends} resends, {dups} duplicates"
    );
    assert!(faults.load(Ordering::SeqCst) >= 100);
}

#[tokio::test]
async fn watch_needs_a_bearer_token() {
    let s = start_server(1).await;
    let channel = Channel::from_shared(format!("http://{}", s.addr))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let err = ResultsClient::new(channel)
        .watch(job_ref("shop", "drops"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert!(err.message().contains("Bearer"), "{}", err.message());
    let unknown = watch_as(s.addr, "not-a-token", job_ref("shop", "drops"))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::Unauthenticated);
}

#[tokio::test]
async fn watch_is_denied_without_get_on_traceresults_in_the_jobs_namespace() {
    let s = start_server(1).await;
    let denied = watch_as(s.addr, "reader-other", job_ref("shop", "drops"))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    assert!(
        denied
            .message()
            .contains("other-dev may not get traceresults.fathom.dev in namespace shop"),
        "{}",
        denied.message()
    );
    // Denied before the lookup: a job that does not exist answers the same.
    let unknown = watch_as(s.addr, "reader-other", job_ref("shop", "nope"))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::PermissionDenied);
    // A runner's node token proves no reader.
    let runner = watch_as(s.addr, "token-0", job_ref("shop", "drops"))
        .await
        .unwrap_err();
    assert_eq!(runner.code(), tonic::Code::Unauthenticated);
    let allowed = watch_as(s.addr, "reader-cluster", job_ref("shop", "drops")).await;
    assert!(allowed.is_ok(), "{:?}", allowed.err());
}

#[tokio::test]
async fn a_cluster_jobs_result_needs_the_permission_cluster_wide() {
    let collector = Collector::new();
    let mut info = job_info(1);
    info.job.kind = "ClusterTraceJob".into();
    info.job.namespace = None;
    info.job.name = "everywhere".into();
    info.result_namespace = "fathom-system".into();
    info.result_name = "cluster.everywhere".into();
    collector.set_job(info);
    let (_leading_tx, leading) = watch::channel(true);
    let service = CollectorService::new(
        collector,
        Arc::new(StaticTokens::default()),
        readers(),
        leading,
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(server::serve(
        listener,
        Transport::InsecurePlaintext,
        service,
        futures::future::pending(),
    ));
    let cluster_ref = v1::JobRef {
        namespace: String::new(),
        name: "everywhere".into(),
        kind: JobKind::ClusterTraceJob as i32,
        include_events: false,
    };
    let denied = watch_as(addr, "reader-shop", cluster_ref.clone())
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    assert!(
        denied.message().contains("cluster-wide"),
        "{}",
        denied.message()
    );
    let mut updates = watch_as(addr, "reader-cluster", cluster_ref)
        .await
        .expect("an admin may watch");
    let first = updates.message().await.expect("ok").expect("first");
    assert_eq!(first.job_uid, JOB_UID);
}

// T8: TLS. A collector with a certificate of a test CA; clients configured as the runner's
// transport is (the CA bundle of --ca-file, the collector's name).

/// A CA, and certificates for `localhost` it signs.
struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: String,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("self-signed");
        TestCa {
            pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// (certificate PEM, key PEM) for `localhost`, valid from `not_before` to `not_after`.
    fn server_cert(
        &self,
        not_before: (i32, u8, u8),
        not_after: (i32, u8, u8),
    ) -> (Vec<u8>, Vec<u8>) {
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        params.not_before = rcgen::date_time_ymd(not_before.0, not_before.1, not_before.2);
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("signed");
        (cert.pem().into_bytes(), key.serialize_pem().into_bytes())
    }
}

/// The collector over TLS with this certificate; its address.
async fn start_tls_server(cert_pem: Vec<u8>, key_pem: Vec<u8>) -> (SocketAddr, Arc<Collector>) {
    let collector = Collector::new();
    collector.set_job(job_info(1));
    let tokens = StaticTokens(HashMap::from([("token-0".into(), "node-0".into())]));
    let (leading_tx, leading) = watch::channel(true);
    // Leading for the rest of the test.
    std::mem::forget(leading_tx);
    let service = CollectorService::new(collector.clone(), Arc::new(tokens), readers(), leading);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(server::serve(
        listener,
        Transport::Tls { cert_pem, key_pem },
        service,
        futures::future::pending(),
    ));
    (addr, collector)
}

/// One report over TLS trusting `ca_pem`, as the runner's transport connects.
async fn send_over_tls(addr: SocketAddr, ca_pem: &str) -> Result<v1::ReportAck, String> {
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://localhost:{}", addr.port()))
        .expect("uri")
        .tls_config(tls)
        .expect("tls")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let mut client = CollectorClient::new(channel);
    let mut req = Request::new(futures::stream::iter([report(0, 1, &[("a", 1)])]));
    req.metadata_mut()
        .insert("authorization", "Bearer token-0".parse().expect("ascii"));
    let mut acks = client
        .report(req)
        .await
        .map_err(|s| format!("report: {s:?}"))?
        .into_inner();
    match tokio::time::timeout(Duration::from_secs(10), acks.message()).await {
        Ok(Ok(Some(ack))) => Ok(ack),
        other => Err(format!("no ack: {other:?}")),
    }
}

#[tokio::test]
async fn t8_plaintext_is_refused_by_a_tls_collector() {
    let ca = TestCa::new("fathom test CA");
    let (cert, key) = ca.server_cert((2020, 1, 1), (2100, 1, 1));
    let (addr, collector) = start_tls_server(cert, key).await;
    // The control: the right CA over TLS works, so the refusals below are the TLS's doing.
    let ack = send_over_tls(addr, &ca.pem)
        .await
        .expect("TLS with the right CA");
    assert_eq!(ack.rejection, None);
    let err = match runner(addr, "token-0").await {
        Ok(mut r) => r.send(report(0, 2, &[("a", 5)])).await.unwrap_err(),
        Err(e) => e,
    };
    assert_ne!(err.code(), tonic::Code::Ok, "{err}");
    assert_eq!(
        collector.merged(JOB_UID).expect("known").data.totals.hits,
        1,
        "nothing of the plaintext stream merged"
    );
}

#[tokio::test]
async fn t8_a_server_certificate_of_another_ca_is_refused_by_the_runner() {
    let ca = TestCa::new("fathom test CA");
    let other = TestCa::new("another CA");
    let (cert, key) = other.server_cert((2020, 1, 1), (2100, 1, 1));
    let (addr, collector) = start_tls_server(cert, key).await;
    let err = send_over_tls(addr, &ca.pem).await.unwrap_err();
    assert!(
        err.contains("UnknownIssuer") || err.contains("invalid peer certificate"),
        "{err}"
    );
    assert_eq!(
        collector
            .merged(JOB_UID)
            .expect("known")
            .coverage
            .nodes_reported,
        0
    );
    // The control: trusting the other CA, the same server is accepted.
    assert!(send_over_tls(addr, &other.pem).await.is_ok());
}

#[tokio::test]
async fn t8_an_expired_server_certificate_is_refused() {
    let ca = TestCa::new("fathom test CA");
    let (cert, key) = ca.server_cert((2020, 1, 1), (2021, 1, 1));
    let (addr, collector) = start_tls_server(cert, key).await;
    let err = send_over_tls(addr, &ca.pem).await.unwrap_err();
    assert!(err.contains("Expired"), "{err}");
    assert_eq!(
        collector
            .merged(JOB_UID)
            .expect("known")
            .coverage
            .nodes_reported,
        0
    );
}

/// Raw gRPC frames out (for a message that is not a NodeReport), acks in.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = v1::ReportAck;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = v1::ReportAck;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<v1::ReportAck>, tonic::Status> {
        <v1::ReportAck as prost::Message>::decode(src)
            .map(Some)
            .map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

/// A writer into a shared buffer, to read what the collector logged.
#[derive(Clone, Default)]
struct LogBuf(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogBuf {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("lock")).into_owned()
    }

    /// What this test binary logged, from the first call on: a global subscriber, since a
    /// thread's own (`set_default`) missed events now and then when other tests' threads
    /// registered the same call sites first (about 1 run in 6).
    fn global() -> &'static LogBuf {
        static LOGS: std::sync::OnceLock<LogBuf> = std::sync::OnceLock::new();
        LOGS.get_or_init(|| {
            let logs = LogBuf::default();
            let writer = logs.clone();
            tracing::subscriber::set_global_default(
                tracing_subscriber::fmt()
                    .with_ansi(false)
                    .with_writer(move || writer.clone())
                    .finish(),
            )
            .expect("no other global subscriber in this test binary");
            logs
        })
    }
}

/// A malformed message (bytes that are no NodeReport) after a good report: the good one is
/// merged and acknowledged, the stream ends with the decoding error logged with its reason,
/// and the runner's next stream keeps going. A wrong job uid is rejected with its reason
/// logged while the stream goes on.
#[tokio::test]
async fn t8_a_malformed_message_is_rejected_with_a_logged_reason_and_the_runner_goes_on() {
    let logs = LogBuf::global();
    let s = start_server(1).await;
    let channel = Channel::from_shared(format!("http://{}", s.addr))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let good = prost::Message::encode_to_vec(&report(0, 1, &[("a", 3)]));
    // Field 1 as a length-delimited string of 100 bytes, with 3 bytes there: not a message.
    let malformed = vec![0x0a, 100, b'x', b'y', b'z'];
    let (tx, rx) = mpsc::channel::<Vec<u8>>(4);
    let outbound =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
    let mut req = Request::new(outbound);
    req.metadata_mut()
        .insert("authorization", "Bearer token-0".parse().expect("ascii"));
    tx.send(good).await.expect("send");
    let mut acks = grpc
        .streaming(
            req,
            http::uri::PathAndQuery::from_static("/fathom.v1.Collector/Report"),
            RawCodec,
        )
        .await
        .expect("stream")
        .into_inner();
    let ack = acks.message().await.expect("ok").expect("ack");
    assert_eq!((ack.acknowledged_seq, ack.rejection), (1, None));
    tx.send(malformed).await.expect("send");
    let err = tokio::time::timeout(Duration::from_secs(5), acks.message())
        .await
        .expect("in time")
        .unwrap_err();
    assert_ne!(err.code(), tonic::Code::Ok);
    let logged = logs.text();
    assert!(
        logged.contains("malformed or oversized report") && logged.contains("decode"),
        "the reason is logged: {logged}"
    );
    // The runner reconnects and goes on; a wrong job uid is rejected with a logged reason
    // while the stream's good reports keep flowing.
    let mut r = runner(s.addr, "token-0").await.expect("stream");
    let mut wrong_job = report(0, 2, &[("a", 100)]);
    wrong_job.job_uid = "another-job-of-t8".into();
    assert_eq!(
        rejection(&r.send(wrong_job).await.expect("ack")),
        RejectionCode::JobMismatch
    );
    assert!(
        logs.text()
            .lines()
            .any(|l| l.contains("report rejected") && l.contains("another-job-of-t8"))
    );
    let ack = r.send(report(0, 3, &[("a", 7)])).await.expect("ack");
    assert_eq!((ack.acknowledged_seq, ack.rejection), (3, None));
    assert_eq!(
        s.collector.merged(JOB_UID).expect("known").data.totals.hits,
        7
    );
}

/// T7 on the collector's side: the transport drops a runner counts in its reports show in
/// the merged result's totals (eventsDropped) and its EventsLost degradation.
#[test]
fn t7_transport_drops_show_in_the_result() {
    let mut s = merge_state(1);
    let mut r = report(0, 1, &[("a", 1)]);
    r.counters.as_mut().expect("counters").transport_dropped = 5_000;
    s.accept("node-0", &r);
    let m = s.merged(JOB_UID).expect("known");
    assert_eq!(m.data.totals.events_dropped, 5_000);
    assert!(
        m.data
            .degraded
            .iter()
            .any(|d| d.reason == "EventsLost" && d.message.contains("5000 dropped")),
        "{:?}",
        m.data.degraded
    );
}
