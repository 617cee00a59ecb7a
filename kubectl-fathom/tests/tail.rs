//! `tail` against the operator's real Results service in process (tonic, plaintext), with
//! the watch authorization faked by `StaticReaders`: updates printed as they come, the end of
//! the stream after the final update, and refusals in one line.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use fathom_crds::{assignment::JobRef, result::EventRecord};
use fathom_operator::collector::{
    Collector, ExpectedAssignment, JobInfo,
    auth::{StaticReaders, StaticTokens},
    server::{self, CollectorService, Transport},
};
use fathom_proto::v1::{self, AssignmentPhase, AssignmentState, Counters, JobKind, NodeReport};
use kubectl_fathom::{
    JobName,
    tail::{self, CollectorArgs},
};
use tokio::{net::TcpListener, sync::watch};

const UID: &str = "job-uid-7";

fn job_info() -> JobInfo {
    JobInfo {
        job: JobRef {
            kind: "TraceJob".into(),
            name: "web".into(),
            namespace: Some("demo".into()),
            uid: UID.into(),
        },
        result_namespace: "demo".into(),
        result_name: "web".into(),
        run: 1,
        probe: "exec".into(),
        value: "count".into(),
        keys: vec!["comm".into()],
        top: 10,
        events_last: 10,
        assignments: vec![ExpectedAssignment {
            name: "web-node-0".into(),
            uid: "a-uid-0".into(),
            node: "node-0".into(),
            run: 1,
        }],
    }
}

fn report(seq: u64, hits: u64, fin: bool) -> NodeReport {
    NodeReport {
        job_uid: UID.into(),
        job_kind: JobKind::TraceJob as i32,
        job_namespace: "demo".into(),
        job_name: "web".into(),
        assignment_name: "web-node-0".into(),
        assignment_uid: "a-uid-0".into(),
        node: "node-0".into(),
        run: 1,
        seq,
        result: Some(v1::ResultData {
            probe: "exec".into(),
            value: "count".into(),
            keys: vec!["comm".into()],
            rows: vec![v1::Row {
                keys: BTreeMap::from([("comm".into(), "sh".into())]),
                value: hits,
            }],
            totals: Some(v1::Totals {
                hits,
                ..Default::default()
            }),
            ..Default::default()
        }),
        event_batch: Some(v1::EventBatch::from_records(&[EventRecord {
            time_ns: seq,
            fields: BTreeMap::from([
                ("comm".into(), "sh".into()),
                ("pid".into(), seq.to_string()),
            ]),
        }])),
        counters: Some(Counters {
            hits,
            ..Default::default()
        }),
        state: Some(AssignmentState {
            phase: if fin {
                AssignmentPhase::Succeeded as i32
            } else {
                AssignmentPhase::Attached as i32
            },
            ..Default::default()
        }),
        r#final: fin,
    }
}

async fn server() -> (SocketAddr, Arc<Collector>, watch::Sender<bool>) {
    let collector = Collector::new();
    collector.set_job(job_info());
    let readers = StaticReaders(HashMap::from([
        (
            "dev-token".to_string(),
            ("dev".to_string(), vec![Some("demo".to_string())]),
        ),
        (
            "stranger-token".to_string(),
            ("stranger".to_string(), vec![Some("elsewhere".to_string())]),
        ),
    ]));
    let (leading_tx, leading) = watch::channel(true);
    let service = CollectorService::new(
        collector.clone(),
        Arc::new(StaticTokens::default()),
        Arc::new(readers),
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
    (addr, collector, leading_tx)
}

fn args(addr: SocketAddr, token_file: &std::path::Path) -> CollectorArgs {
    CollectorArgs {
        collector: addr.to_string(),
        ca_file: None,
        tls_server_name: None,
        token_file: Some(token_file.to_path_buf()),
        insecure_plaintext: true,
    }
}

fn token_file(token: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("kubectl-fathom-tail-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join(format!("{token}.txt"));
    std::fs::write(&path, format!("{token}\n")).expect("token file");
    path
}

fn demo_web() -> JobName {
    JobName {
        namespace: Some("demo".into()),
        name: "web".into(),
    }
}

/// A writer the test can read while tail writes.
#[derive(Clone, Default)]
struct Shared(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Shared {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("lock")).into_owned()
    }
}

#[tokio::test]
async fn tail_prints_events_and_updates_live_and_ends_with_the_job() {
    let (addr, collector, _leading) = server().await;
    assert!(matches!(
        collector.accept("node-0", &report(1, 3, false)),
        fathom_operator::collector::Accept::Accepted { .. }
    ));
    let a = args(addr, &token_file("dev-token"));
    let token = tail::bearer_token(&a).await.expect("token from the file");
    assert_eq!(token, "dev-token");
    let mut client = tail::connect(&a).await.expect("connects");
    let out = Shared::default();
    let mut writer = out.clone();
    let job = demo_web();
    let task = tokio::spawn(async move {
        tail::tail(
            &mut client,
            &addr.to_string(),
            &job,
            &token,
            true,
            &mut writer,
        )
        .await
    });
    // The first update: what the collector holds now.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !out.text().contains("update run 1: 3 hits") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no first update: {}",
            out.text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        out.text().contains("event 1 comm=sh pid=1"),
        "{}",
        out.text()
    );
    // A later report, then the final one: each published update is printed; the stream ends.
    collector.accept("node-0", &report(2, 7, false));
    collector.publish();
    while !out.text().contains("update run 1: 7 hits") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no second update: {}",
            out.text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    collector.accept("node-0", &report(3, 9, true));
    collector.publish();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("tail ends after the final update")
        .expect("task")
        .expect("tail ok");
    let text = out.text();
    assert!(text.contains("event 3 comm=sh pid=3"), "{text}");
    assert!(
        text.contains("update run 1: 9 hits, 1/1 nodes reported (1 finished, 0 failed), loss 0, final\n  comm=sh 9\n"),
        "{text}"
    );
}

#[tokio::test]
async fn tail_refusals_are_one_line_each() {
    let (addr, _collector, _leading) = server().await;
    let a = args(addr, &token_file("stranger-token"));
    let mut client = tail::connect(&a).await.expect("connects");
    let mut out = Vec::new();
    let err = tail::tail(
        &mut client,
        &addr.to_string(),
        &demo_web(),
        "stranger-token",
        true,
        &mut out,
    )
    .await
    .unwrap_err();
    assert_eq!(err.to_string().lines().count(), 1, "{err}");
    assert!(
        err.to_string().starts_with(
            "forbidden: stranger may not get traceresults.fathom.dev in namespace demo"
        ),
        "{err}"
    );
    let err = tail::tail(
        &mut client,
        &addr.to_string(),
        &demo_web(),
        "forged",
        true,
        &mut out,
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("the operator did not accept your token"),
        "{err}"
    );
    let missing = JobName {
        namespace: Some("demo".into()),
        name: "nope".into(),
    };
    let err = tail::tail(
        &mut client,
        &addr.to_string(),
        &missing,
        "dev-token",
        true,
        &mut out,
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("kubectl get tracejobs -n demo"),
        "{err}"
    );
}

#[tokio::test]
async fn an_unreachable_operator_says_where_it_looked() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let a = CollectorArgs {
        collector: format!("127.0.0.1:{port}"),
        ca_file: None,
        tls_server_name: None,
        token_file: None,
        insecure_plaintext: true,
    };
    let err = tail::connect(&a).await.unwrap_err();
    assert!(
        err.to_string().starts_with(&format!(
            "cannot reach the operator's Results API at 127.0.0.1:{port}"
        )),
        "{err}"
    );
    let tls = CollectorArgs {
        insecure_plaintext: false,
        ..a
    };
    let err = tail::connect(&tls).await.unwrap_err();
    assert!(
        err.to_string().starts_with("--ca-file is needed for TLS"),
        "{err}"
    );
    assert_eq!(err.exit_code(), 2);
}
