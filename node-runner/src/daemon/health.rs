//! `/healthz`, `/readyz` and `/metrics` on a small HTTP port.
//!
//! Live while the process serves; ready once the watch has listed this node's assignments
//! (before that the runner does not know what to run). Metrics are the transport's counters
//! and the number of attached assignments, in the Prometheus text format.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::watch};

use crate::daemon::transport::TransportStats;

/// What the runner's loop publishes for the probes and metrics.
#[derive(Debug, Default)]
pub struct RunnerStats {
    /// The watch has listed this node's assignments at least once.
    pub synced: AtomicBool,
    pub assignments: AtomicU64,
    pub attached: AtomicU64,
    pub status_write_errors: AtomicU64,
    pub finalizers_released: AtomicU64,
}

/// The Prometheus text of the counters.
pub fn metrics_text(runner: &RunnerStats, transport: &TransportStats) -> String {
    let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let b = |a: &AtomicBool| u64::from(a.load(Ordering::Relaxed));
    let lines: [(&str, &str, &str, u64); 15] = [
        (
            "fathom_runner_synced",
            "gauge",
            "1 once this node's assignments were listed",
            b(&runner.synced),
        ),
        (
            "fathom_runner_assignments",
            "gauge",
            "assignments of this node",
            g(&runner.assignments),
        ),
        (
            "fathom_runner_attached_assignments",
            "gauge",
            "assignments whose probes the engine runs",
            g(&runner.attached),
        ),
        (
            "fathom_runner_status_write_errors_total",
            "counter",
            "status writes that failed",
            g(&runner.status_write_errors),
        ),
        (
            "fathom_runner_finalizers_released_total",
            "counter",
            "detach finalizers removed after detaching",
            g(&runner.finalizers_released),
        ),
        (
            "fathom_runner_collector_connected",
            "gauge",
            "1 while the report stream is open",
            b(&transport.connected),
        ),
        (
            "fathom_runner_collector_connects_total",
            "counter",
            "connection attempts to the collector",
            g(&transport.connects),
        ),
        (
            "fathom_runner_collector_connect_failures_total",
            "counter",
            "attempts that failed before any acknowledgement",
            g(&transport.connect_failures),
        ),
        (
            "fathom_runner_reports_sent_total",
            "counter",
            "reports handed to the stream",
            g(&transport.sent),
        ),
        (
            "fathom_runner_reports_acknowledged_total",
            "counter",
            "reports the collector accepted",
            g(&transport.acknowledged),
        ),
        (
            "fathom_runner_reports_rejected_total",
            "counter",
            "reports the collector rejected",
            g(&transport.rejected),
        ),
        (
            "fathom_runner_reports_dropped_total",
            "counter",
            "reports that fell off the full outgoing queue",
            g(&transport.dropped),
        ),
        (
            "fathom_runner_events_dropped_total",
            "counter",
            "events the transport dropped (spool full, or unacknowledged on a broken stream)",
            g(&transport.events_dropped),
        ),
        (
            "fathom_runner_spool_reports",
            "gauge",
            "reports queued for the collector",
            g(&transport.queued),
        ),
        (
            "fathom_runner_spool_events",
            "gauge",
            "events queued for the collector",
            g(&transport.queued_events),
        ),
    ];
    let mut out = String::new();
    for (name, kind, help, value) in lines {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        ));
    }
    out
}

/// The answer to one request.
pub fn respond(
    path: &str,
    runner: &RunnerStats,
    transport: &TransportStats,
) -> (StatusCode, String) {
    match path {
        "/healthz" => (StatusCode::OK, "ok\n".into()),
        "/readyz" if runner.synced.load(Ordering::Relaxed) => (StatusCode::OK, "ok\n".into()),
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the node's assignments are not listed yet\n".into(),
        ),
        "/metrics" => (StatusCode::OK, metrics_text(runner, transport)),
        _ => (StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

/// Serves until `shutdown` turns true.
pub async fn serve(
    addr: SocketAddr,
    runner: Arc<RunnerStats>,
    transport: Arc<TransportStats>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /healthz, /readyz and /metrics");
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            _ = shutdown.changed() => return Ok(()),
        };
        let (runner, transport) = (runner.clone(), transport.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let (status, body) = respond(req.uri().path(), &runner, &transport);
                let mut resp = Response::new(Full::new(Bytes::from(body)));
                *resp.status_mut() = status;
                async move { Ok::<_, Infallible>(resp) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "health connection ended");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_once_synced_and_metrics_are_prometheus_text() {
        let runner = RunnerStats::default();
        let transport = TransportStats::default();
        assert_eq!(respond("/healthz", &runner, &transport).0, StatusCode::OK);
        assert_eq!(
            respond("/readyz", &runner, &transport).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        runner.synced.store(true, Ordering::Relaxed);
        transport.dropped.store(3, Ordering::Relaxed);
        assert_eq!(respond("/readyz", &runner, &transport).0, StatusCode::OK);
        let (code, text) = respond("/metrics", &runner, &transport);
        assert_eq!(code, StatusCode::OK);
        assert!(text.contains("# TYPE fathom_runner_reports_dropped_total counter\nfathom_runner_reports_dropped_total 3\n"), "{text}");
        assert!(text.contains("fathom_runner_synced 1\n"));
        assert_eq!(respond("/x", &runner, &transport).0, StatusCode::NOT_FOUND);
    }
}
