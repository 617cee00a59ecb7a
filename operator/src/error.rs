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
    /// An object the operator was changing was deleted meanwhile.
    #[error("{0}: no longer exists")]
    Gone(String),
    /// A server-side apply was refused because another field manager owns some of its fields
    /// with other values; the operator applies without force, so it took nothing.
    #[error("{0}")]
    ApplyConflict(ApplyConflict),
    /// A request the operator built could not be encoded (a bug in the operator).
    #[error("encoding {what}: {source}")]
    Encode {
        what: String,
        #[source]
        source: serde_json::Error,
    },
}

/// What the API server said when it refused a server-side apply with 409 Conflict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyConflict {
    /// What was applied, e.g. `TraceAssignment shop/web-drops-1a2b` or `TraceJob shop/web-drops
    /// status`.
    pub object: String,
    /// The field managers that own the contested fields, as the API server names them (e.g.
    /// `"kubectl-edit" using fathom.dev/v1alpha1`).
    pub managers: Vec<String>,
    /// The contested fields, e.g. `.spec.suspend`.
    pub fields: Vec<String>,
    /// The API server's own message.
    pub message: String,
}

impl ApplyConflict {
    /// Reads the conflicting managers and fields out of the API server's 409 answer (one
    /// `FieldManagerConflict` cause per field: `conflict with "<manager>"…` on `<field>`).
    pub fn from_status(object: impl Into<String>, status: &kube::core::Status) -> Self {
        let mut managers: Vec<String> = Vec::new();
        let mut fields: Vec<String> = Vec::new();
        for cause in status.details.iter().flat_map(|d| d.causes.iter()) {
            let manager = cause
                .message
                .strip_prefix("conflict with ")
                .unwrap_or(&cause.message)
                .to_string();
            if !manager.is_empty() && !managers.contains(&manager) {
                managers.push(manager);
            }
            if !cause.field.is_empty() && !fields.contains(&cause.field) {
                fields.push(cause.field.clone());
            }
        }
        ApplyConflict {
            object: object.into(),
            managers,
            fields,
            message: status.message.clone(),
        }
    }
}

impl std::fmt::Display for ApplyConflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.managers.is_empty() && self.fields.is_empty() {
            return write!(
                f,
                "applying {}: refused with a conflict ({}); not overwritten",
                self.object, self.message
            );
        }
        write!(
            f,
            "applying {}: {} owned by field manager {}; not overwritten (the operator applies \
             without force: remove the other manager's value or make it agree)",
            self.object,
            if self.fields.is_empty() {
                "fields".to_string()
            } else {
                self.fields.join(", ")
            },
            self.managers.join(", ")
        )
    }
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
            Error::ApplyConflict(_) => "Conflict",
            Error::Gone(_) => "NotFound",
            Error::Encode { .. } => "Internal",
        }
    }

    /// The API answered 404, or the object went away meanwhile.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Gone(_))
            || matches!(self, Error::Api { source, .. } if matches!(source.as_ref(), kube::Error::Api(s) if s.code == 404))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
