//! The gRPC services: `Collector.Report` (runners' reports in, acknowledgements out) and
//! `Results.Watch` (a job's merged result, live). TLS by rustls unless the development flag
//! `--collector-insecure-plaintext` is set; HTTP/2 keepalive so that a half-open connection
//! is noticed within [`KEEPALIVE_INTERVAL`] + [`KEEPALIVE_TIMEOUT`].

use std::{pin::Pin, sync::Arc, time::Duration};

use fathom_proto::{
    MAX_MESSAGE_BYTES,
    v1::{
        self, JobKind, RejectionCode,
        collector_server::{Collector as CollectorRpc, CollectorServer},
        results_server::{Results, ResultsServer},
    },
};
use futures::{Stream, StreamExt};
use tokio::{net::TcpListener, sync::watch};
use tonic::{
    Request, Response, Status, Streaming,
    transport::{Identity, Server, ServerTlsConfig},
};
use tracing::{debug, info, warn};

use crate::metrics::Metrics;

use super::{
    Accept, Collector,
    auth::{Authenticator, WatchAuthorizer, bearer, reader_bearer},
    merge::category,
};

/// HTTP/2 pings this often on an idle connection…
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// …and a connection whose ping is not answered this fast is closed: ≤ 20 s in all.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Acknowledgements queued per stream before the server stops reading its reports.
pub const ACK_QUEUE: usize = 64;

/// The server's transport security.
#[derive(Clone, Debug)]
pub enum Transport {
    /// TLS with this certificate chain and key (PEM).
    Tls { cert_pem: Vec<u8>, key_pem: Vec<u8> },
    /// No TLS: `--collector-insecure-plaintext`, for development only.
    InsecurePlaintext,
}

/// Both services over one collector.
#[derive(Clone)]
pub struct CollectorService {
    collector: Arc<Collector>,
    /// Which node a runner's stream speaks for (`Collector.Report`).
    auth: Arc<dyn Authenticator>,
    /// Who may watch which job's result (`Results.Watch`).
    readers: Arc<dyn WatchAuthorizer>,
    leading: watch::Receiver<bool>,
    metrics: Option<Arc<Metrics>>,
}

impl CollectorService {
    pub fn new(
        collector: Arc<Collector>,
        auth: Arc<dyn Authenticator>,
        readers: Arc<dyn WatchAuthorizer>,
        leading: watch::Receiver<bool>,
    ) -> Self {
        CollectorService {
            collector,
            auth,
            readers,
            leading,
            metrics: None,
        }
    }

    /// Counts reports by outcome in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn require_leader(&self) -> Result<(), Status> {
        if *self.leading.borrow() {
            Ok(())
        } else {
            Err(Status::unavailable(
                "this operator replica is not the leader: reconnect",
            ))
        }
    }
}

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn receiver_stream<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<Result<T, Status>>,
) -> Boxed<T> {
    Box::pin(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }))
}

#[tonic::async_trait]
impl CollectorRpc for CollectorService {
    type ReportStream = Boxed<v1::ReportAck>;

    async fn report(
        &self,
        request: Request<Streaming<v1::NodeReport>>,
    ) -> Result<Response<Self::ReportStream>, Status> {
        self.require_leader()?;
        let node = self.auth.node_of(bearer(request.metadata())?).await?;
        let peer = request.remote_addr();
        info!(%node, ?peer, "runner stream opened");
        let mut inbound = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(ACK_QUEUE);
        let collector = self.collector.clone();
        let leading = self.leading.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            loop {
                let report = match inbound.message().await {
                    Ok(Some(r)) => r,
                    Ok(None) => break,
                    Err(status) => {
                        // tonic says OUT_OF_RANGE for a message over the decoding limit; the
                        // contract says RESOURCE_EXHAUSTED.
                        let status = if status.code() == tonic::Code::OutOfRange {
                            Status::resource_exhausted(format!(
                                "report over {MAX_MESSAGE_BYTES} bytes (MAX_MESSAGE_BYTES): {}",
                                status.message()
                            ))
                        } else {
                            status
                        };
                        warn!(%node, code = ?status.code(), reason = %status.message(), "malformed or oversized report: ending the stream");
                        let _ = tx.send(Err(status)).await;
                        break;
                    }
                };
                if !*leading.borrow() {
                    let _ = tx
                        .send(Err(Status::unavailable(
                            "this operator replica stopped leading: reconnect",
                        )))
                        .await;
                    break;
                }
                let outcome = collector.accept(&node, &report);
                if let Some(m) = &metrics {
                    m.report(match &outcome {
                        Accept::Accepted { .. } => "accepted",
                        Accept::Duplicate { .. } => RejectionCode::Duplicate.as_str_name(),
                        Accept::Rejected { code, .. } => code.as_str_name(),
                    });
                }
                match &outcome {
                    Accept::Accepted { seq } => {
                        debug!(%node, assignment = %report.assignment_name, seq, "report accepted")
                    }
                    Accept::Duplicate { acked } => {
                        debug!(%node, assignment = %report.assignment_name, seq = report.seq, acked, "duplicate report discarded")
                    }
                    Accept::Rejected { code, reason, .. } => warn!(
                        %node,
                        assignment = %report.assignment_name,
                        seq = report.seq,
                        code = code.as_str_name(),
                        category = category(*code),
                        %reason,
                        "report rejected"
                    ),
                }
                if tx
                    .send(Ok(outcome.ack(&report.assignment_uid)))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            debug!(%node, "runner stream closed");
        });
        Ok(Response::new(receiver_stream(rx)))
    }
}

fn kind_name(kind: i32) -> Result<&'static str, Status> {
    match JobKind::try_from(kind) {
        Ok(JobKind::TraceJob) => Ok("TraceJob"),
        Ok(JobKind::ClusterTraceJob) => Ok("ClusterTraceJob"),
        _ => Err(Status::invalid_argument("JobRef.kind is unspecified")),
    }
}

#[tonic::async_trait]
impl Results for CollectorService {
    type WatchStream = Boxed<v1::ResultUpdate>;

    async fn watch(
        &self,
        request: Request<v1::JobRef>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.require_leader()?;
        // Authorized before the job is looked up, so a caller learns nothing of jobs whose
        // results it may not read.
        let token = reader_bearer(request.metadata())?.to_string();
        let job = request.into_inner();
        let kind = kind_name(job.kind)?;
        let namespace = match JobKind::try_from(job.kind) {
            Ok(JobKind::TraceJob) if job.namespace.is_empty() => {
                return Err(Status::invalid_argument(
                    "JobRef.namespace is empty: a TraceJob lives in a namespace",
                ));
            }
            Ok(JobKind::TraceJob) => Some(job.namespace.as_str()),
            _ => None,
        };
        self.readers.authorize_watch(&token, namespace).await?;
        debug!(
            kind,
            namespace = job.namespace,
            job = job.name,
            "watch authorized"
        );
        let uid = self
            .collector
            .state()
            .find_job(kind, namespace, &job.name)
            .ok_or_else(|| {
                Status::not_found(match namespace {
                    Some(ns) => format!("{kind} {ns}/{} is not known to the collector", job.name),
                    None => format!("{kind} {} is not known to the collector", job.name),
                })
            })?;
        let (rx, mut first) = self
            .collector
            .subscribe(&uid)
            .ok_or_else(|| Status::not_found("the job is gone"))?;
        let with_events = job.include_events;
        if !with_events {
            first.events.clear();
        }
        let first_final = first.r#final;
        let rest = futures::stream::unfold((rx, first_final), move |(mut rx, done)| async move {
            if done {
                return None;
            }
            rx.changed().await.ok()?;
            let update = rx.borrow_and_update().clone()?;
            let mut update = (*update).clone();
            if !with_events {
                update.events.clear();
            }
            let done = update.r#final;
            Some((Ok(update), (rx, done)))
        });
        let stream = futures::stream::once(async move { Ok(first) }).chain(rest);
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Serves both services on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    transport: Transport,
    service: CollectorService,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let mut builder = Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .tcp_nodelay(true);
    match transport {
        Transport::Tls { cert_pem, key_pem } => {
            builder = builder.tls_config(
                ServerTlsConfig::new().identity(Identity::from_pem(cert_pem, key_pem)),
            )?;
        }
        Transport::InsecurePlaintext => {
            warn!(
                "collector: plaintext gRPC (--collector-insecure-plaintext): for development only"
            );
        }
    }
    let collector = CollectorServer::new(service.clone())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let results = ResultsServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let incoming = futures::stream::unfold(listener, |listener| async move {
        let conn = listener.accept().await.map(|(s, _)| {
            let _ = s.set_nodelay(true);
            s
        });
        Some((conn, listener))
    });
    builder
        .add_service(collector)
        .add_service(results)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}
