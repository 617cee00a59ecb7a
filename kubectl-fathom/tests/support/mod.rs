//! Test support: the operator's in-memory API server (operator/tests/support/api.rs, shared,
//! not copied), fixtures of jobs and results, and an API that refuses chosen requests with 403
//! as RBAC would.

#![allow(
    dead_code,
    reason = "each test binary uses a different part of the support module"
)]

#[path = "../../../operator/tests/support/api.rs"]
pub mod api;

use std::{
    convert::Infallible,
    sync::Arc,
    task::{Context, Poll},
};

use api::{ManualClock, MemoryApi};
use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Request, Response};
use http_body_util::Full;
use serde_json::{Value, json};

pub const FATHOM: &str = "apis/fathom.dev/v1alpha1";

/// A fresh in-memory API.
pub fn memory_api() -> MemoryApi {
    MemoryApi::new(ManualClock::new(
        "2026-01-01T00:00:00Z".parse().expect("timestamp"),
    ))
}

/// Seeds a TraceJob `ns/name` with `status`.
pub fn seed_job(api: &MemoryApi, ns: &str, name: &str, spec: Value, status: Value) {
    api.seed(
        FATHOM,
        "tracejobs",
        json!({
            "apiVersion": "fathom.dev/v1alpha1", "kind": "TraceJob",
            "metadata": {"name": name, "namespace": ns},
            "spec": spec,
            "status": status,
        }),
    );
}

/// Seeds the TraceResult `ns/name` with `status`.
pub fn seed_result(api: &MemoryApi, ns: &str, name: &str, job: &str, status: Value) {
    api.seed(
        FATHOM,
        "traceresults",
        json!({
            "apiVersion": "fathom.dev/v1alpha1", "kind": "TraceResult",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"job": {"kind": "TraceJob", "name": job, "namespace": ns, "uid": "uid-1"}},
            "status": status,
        }),
    );
}

/// The in-memory API behind RBAC that forbids every request whose path contains one of
/// `forbidden` (e.g. "/traceresults/"), answering 403 as the real API server does.
#[derive(Clone)]
pub struct Rbac {
    pub inner: MemoryApi,
    pub forbidden: Arc<Vec<String>>,
}

impl Rbac {
    pub fn client(&self) -> kube::Client {
        kube::Client::new(self.clone(), "default")
    }
}

impl tower::Service<Request<kube::client::Body>> for Rbac {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        tower::Service::<Request<kube::client::Body>>::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, req: Request<kube::client::Body>) -> Self::Future {
        let path = req.uri().path().to_string();
        if let Some(rule) = self.forbidden.iter().find(|f| path.contains(f.as_str())) {
            let resource = rule.trim_matches('/').to_string();
            let body = json!({
                "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden",
                "code": 403,
                "message": format!("{resource} is forbidden: User \"jane\" cannot get resource \"{resource}\" in API group \"fathom.dev\""),
            });
            return Box::pin(async move {
                Ok(Response::builder()
                    .status(403)
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(Full::new(Bytes::from(body.to_string())))
                    .expect("response"))
            });
        }
        self.inner.call(req)
    }
}
