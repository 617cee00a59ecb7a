//! `/metrics` (Prometheus text), `/healthz` (the process serves) and `/readyz` (the API
//! server answered a leader-lease round within the renew deadline, and the caches are synced
//! and the controllers run, or this replica stands by for the lease).

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, info};

use crate::{
    error::{Error, Result},
    metrics::Metrics,
};

/// What the probes report.
#[derive(Debug, Default)]
pub struct Health {
    /// The controllers' caches are synced, or this replica stands by.
    ready: AtomicBool,
    /// The API server answered a leader-lease round within the renew deadline: a replica
    /// that cannot reach it can neither lead nor take over, and says so (not Ready), instead
    /// of looking healthy in `kubectl get pods`.
    api_answers: AtomicBool,
}

impl Health {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn set_api_answers(&self, answers: bool) {
        self.api_answers.store(answers, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.not_ready_because().is_none()
    }

    /// Why `/readyz` fails, if it does.
    pub fn not_ready_because(&self) -> Option<&'static str> {
        if !self.api_answers.load(Ordering::SeqCst) {
            Some("the API server has not answered a leader-lease round within the renew deadline")
        } else if !self.ready.load(Ordering::SeqCst) {
            Some("caches not synced")
        } else {
            None
        }
    }
}

fn respond(metrics: &Metrics, health: &Health, path: &str) -> Response<Full<Bytes>> {
    let (code, ctype, body) = match path {
        "/metrics" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        "/readyz" => match health.not_ready_because() {
            None => (StatusCode::OK, "text/plain", "ready\n".to_string()),
            Some(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {why}\n"),
            ),
        },
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_string(),
        ),
    };
    Response::builder()
        .status(code)
        .header("content-type", ctype)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

/// Binds `addr`; the returned listener is then served by [`serve`].
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|source| Error::Http {
        address: addr.to_string(),
        source,
    })
}

/// Serves the endpoints until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let address = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    info!(%address, "serving /metrics, /healthz, /readyz");
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = listener.accept() => accepted.map_err(|source| Error::Http { address: address.clone(), source })?,
        };
        let (metrics, health) = (metrics.clone(), health.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let resp = respond(&metrics, &health, req.uri().path());
                async move { Ok::<_, Infallible>(resp) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%peer, %e, "http connection ended");
            }
        });
    }
}
