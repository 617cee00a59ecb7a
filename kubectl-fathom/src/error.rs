//! The plugin's errors: each is one line that names what failed and the fix, with an exit
//! code (1: it failed, 2: bad usage or a bad job file).

use fathom_node::EngineError;

/// Which job a command is about, as users write it: `tracejob demo/foo`,
/// `clustertracejob foo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobName {
    /// `None` for a ClusterTraceJob.
    pub namespace: Option<String>,
    pub name: String,
}

impl JobName {
    pub fn kind(&self) -> &'static str {
        match self.namespace {
            Some(_) => "TraceJob",
            None => "ClusterTraceJob",
        }
    }

    /// The resource's plural, as in `kubectl get tracejobs`.
    pub fn plural(&self) -> &'static str {
        match self.namespace {
            Some(_) => "tracejobs",
            None => "clustertracejobs",
        }
    }
}

impl std::fmt::Display for JobName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "tracejob {ns}/{}", self.name),
            None => write!(f, "clustertracejob {}", self.name),
        }
    }
}

/// ` -n X` for a namespaced job's kubectl commands.
fn ns_flag(namespace: &Option<String>) -> String {
    namespace
        .as_ref()
        .map(|ns| format!(" -n {ns}"))
        .unwrap_or_default()
}

/// ` (it aggregates by: a, b)`, or nothing.
fn aggregates_by(keys: &[String]) -> String {
    if keys.is_empty() {
        String::new()
    } else {
        format!(" (it aggregates by: {})", keys.join(", "))
    }
}

/// `in namespace X` or `cluster-wide`.
fn scope(namespace: &Option<String>) -> String {
    match namespace {
        Some(ns) => format!("in namespace {ns}"),
        None => "cluster-wide".to_string(),
    }
}

/// Everything a command can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The command line is wrong (clap reports most of these itself).
    #[error("{0}")]
    Usage(String),

    /// The job does not exist.
    #[error("{job} not found: kubectl get {}{}", .job.plural(), ns_flag(&.job.namespace))]
    JobNotFound { job: JobName },

    /// The job exists but its TraceResult does not (yet).
    #[error("traceresult {namespace}/{name} of {job} not found: the operator writes it once the job is planned; see `kubectl describe {} {}{}`", .job.plural(), .job.name, ns_flag(&.job.namespace))]
    ResultNotFound {
        job: JobName,
        namespace: String,
        name: String,
    },

    /// A flame graph of a job whose rows hold no stack.
    #[error("{job} has no stack keys: add `kstack` (kernel stacks) or `ustack` (user stacks) to spec.aggregate.by{}", aggregates_by(.keys))]
    NoStacks { job: JobName, keys: Vec<String> },

    /// A histogram of a job that aggregates no histogram.
    #[error(
        "{job} has no histograms: its spec.aggregate.value is {value:?}; use `hist(<field>)` or `latency` for histograms, or `kubectl fathom top`"
    )]
    NoHistograms { job: JobName, value: String },

    /// The result has stack keys but no row yet.
    #[error("{job} has no stacks yet (0 rows): wait for nodes to report (`kubectl fathom get {}`)", .job.name)]
    NoRows { job: JobName },

    /// RBAC refused a request.
    #[error("forbidden: you may not {verb} {resource} {}: ask for a Role granting [{verb}] on {resource} (the API server said: {message})", scope(.namespace))]
    Forbidden {
        verb: String,
        resource: String,
        namespace: Option<String>,
        message: String,
    },

    /// The API server cannot be reached.
    #[error(
        "cannot reach the Kubernetes API server: {message}: check the kubeconfig's server and context (`kubectl cluster-info`)"
    )]
    ApiUnreachable { message: String },

    /// The API answered an error other than not found or forbidden.
    #[error("{what}: {message}")]
    Api { what: String, message: String },

    /// No usable kubeconfig.
    #[error(
        "no Kubernetes configuration: {0}: set KUBECONFIG or ~/.kube/config (`kubectl config view`)"
    )]
    Kubeconfig(String),

    /// The operator's Results API cannot be reached.
    #[error(
        "cannot reach the operator's Results API at {addr}: {message}: is the operator running with its collector (--collector-tls-cert/--collector-tls-key, or --collector-insecure-plaintext) and is {addr} reachable from here? (--collector)"
    )]
    CollectorUnreachable { addr: String, message: String },

    /// The Results API refused or ended the watch.
    #[error("{0}")]
    Watch(String),

    /// A local engine error (`run`, `explain`'s kernel check).
    #[error("{0}")]
    Engine(#[from] EngineError),

    /// The operator would not plan the job (`explain`).
    #[error("the operator would not run this job: {reason}: {message}")]
    WouldReject { reason: String, message: String },

    /// Reading or writing a file or the terminal.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },

    /// Rendering failed (a flame graph, YAML).
    #[error("{0}")]
    Render(String),
}

impl Error {
    /// The process exit code: 2 for bad usage or a bad job file, 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Usage(_) => 2,
            Error::Engine(EngineError::File { .. } | EngineError::InvalidSpec(_)) => 2,
            _ => 1,
        }
    }

    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }

    /// An API error of `verb` on `resource` (`traceresults.fathom.dev`) in `namespace`: 403
    /// becomes [`Error::Forbidden`], a failed connection [`Error::ApiUnreachable`].
    pub fn from_api(e: kube::Error, verb: &str, resource: &str, namespace: Option<&str>) -> Self {
        match e {
            kube::Error::Api(s) if s.code == 403 => Error::Forbidden {
                verb: verb.to_string(),
                resource: resource.to_string(),
                namespace: namespace.map(str::to_string),
                message: s.message.clone(),
            },
            kube::Error::Api(s) => Error::Api {
                what: format!(
                    "{verb} {resource} {}",
                    scope(&namespace.map(str::to_string))
                ),
                message: format!("the API server answered {}: {}", s.code, s.message),
            },
            kube::Error::HyperError(_) | kube::Error::Service(_) => Error::ApiUnreachable {
                message: one_line(&e),
            },
            other => Error::Api {
                what: format!(
                    "{verb} {resource} {}",
                    scope(&namespace.map(str::to_string))
                ),
                message: one_line(&other),
            },
        }
    }
}

/// An error with its sources, on one line.
pub fn one_line(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = inner.source();
    }
    s.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> JobName {
        JobName {
            namespace: Some("demo".into()),
            name: "foo".into(),
        }
    }

    #[test]
    fn a_missing_job_names_the_command_that_lists_jobs() {
        assert_eq!(
            Error::JobNotFound { job: job() }.to_string(),
            "tracejob demo/foo not found: kubectl get tracejobs -n demo"
        );
        let cluster = JobName {
            namespace: None,
            name: "all".into(),
        };
        assert_eq!(
            Error::JobNotFound { job: cluster }.to_string(),
            "clustertracejob all not found: kubectl get clustertracejobs"
        );
    }

    #[test]
    fn a_job_without_stacks_names_the_field_to_add() {
        let e = Error::NoStacks {
            job: job(),
            keys: vec!["comm".into()],
        };
        assert_eq!(
            e.to_string(),
            "tracejob demo/foo has no stack keys: add `kstack` (kernel stacks) or `ustack` (user stacks) to spec.aggregate.by (it aggregates by: comm)"
        );
    }

    #[test]
    fn forbidden_names_the_verb_the_resource_and_the_namespace() {
        let e = Error::Forbidden {
            verb: "get".into(),
            resource: "traceresults.fathom.dev".into(),
            namespace: Some("demo".into()),
            message: "User \"jane\" cannot get resource".into(),
        };
        let text = e.to_string();
        assert!(
            text.starts_with(
                "forbidden: you may not get traceresults.fathom.dev in namespace demo: ask for a Role granting [get] on traceresults.fathom.dev"
            ),
            "{text}"
        );
        assert!(!text.contains('\n'));
    }

    #[test]
    fn exit_codes_are_two_for_usage_and_bad_files_one_otherwise() {
        assert_eq!(Error::Usage("x".into()).exit_code(), 2);
        assert_eq!(
            Error::Engine(EngineError::File {
                path: "j.yaml".into(),
                message: "no".into()
            })
            .exit_code(),
            2
        );
        assert_eq!(Error::JobNotFound { job: job() }.exit_code(), 1);
        assert_eq!(
            Error::ApiUnreachable {
                message: "refused".into()
            }
            .exit_code(),
            1
        );
    }
}
