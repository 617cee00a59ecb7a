//! The operator's errors: each names the failed operation and what to do; `category()` is a
//! stable label for metrics and Event reasons.

/// Something a reconcile or a background task could not do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An API call failed (network, permissions, conflict, a missing CRD…).
    #[error("{operation}: {source}{}", hint(source))]
    Api {
        operation: String,
        #[source]
        source: Box<kube::Error>,
    },
    /// An object lacks a field the API server always sets (name, uid, namespace).
    #[error("{0} has no {1}; was it created by the API server?")]
    MissingField(String, &'static str),
    /// Serving /metrics, /healthz and /readyz failed.
    #[error("serving HTTP on {address}: {source}")]
    Http {
        address: String,
        #[source]
        source: std::io::Error,
    },
    /// A flag or environment variable has an invalid value.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Leadership was lost: another replica may act now, so this one stops.
    #[error("lost the leader lease {0}; stopping so that only one replica acts")]
    LeadershipLost(String),
}

fn hint(e: &kube::Error) -> &'static str {
    match e {
        kube::Error::Api(s)
            if s.code == 404
                && s.message
                    .contains("the server could not find the requested resource") =>
        {
            " (is the CRD installed? kubectl apply -f crds/generated/)"
        }
        kube::Error::Api(s) if s.code == 403 => " (check the operator's RBAC)",
        _ => "",
    }
}

impl Error {
    /// Wraps a kube error with the operation that failed.
    pub fn api(operation: impl Into<String>, source: kube::Error) -> Self {
        Error::Api {
            operation: operation.into(),
            source: Box::new(source),
        }
    }

    /// A stable category: `NotFound`, `Conflict`, `PermissionDenied`, `InvalidArgument`,
    /// `Unavailable`, `FailedPrecondition`, `Internal`.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Api { source, .. } => match source.as_ref() {
                kube::Error::Api(s) => match s.code {
                    404 => "NotFound",
                    409 => "Conflict",
                    401 | 403 => "PermissionDenied",
                    400 | 422 => "InvalidArgument",
                    429 | 500..=599 => "Unavailable",
                    _ => "Internal",
                },
                _ => "Unavailable",
            },
            Error::MissingField(..) | Error::Config(_) => "InvalidArgument",
            Error::Http { .. } => "Unavailable",
            Error::LeadershipLost(_) => "FailedPrecondition",
        }
    }

    /// The API answered 404.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Api { source, .. } if matches!(source.as_ref(), kube::Error::Api(s) if s.code == 404))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
