//! `kubectl fathom tail`: a job's live events and merged updates through the operator's
//! `fathom.v1.Results.Watch`, authenticated with the user's own Kubernetes bearer token (the
//! operator checks it with a TokenReview and a SubjectAccessReview: the caller must be allowed
//! to `get` the job's TraceResults).

use std::{io::Write, path::PathBuf, time::Duration};

use fathom_crds::result::ResultData;
use fathom_proto::{
    MAX_MESSAGE_BYTES,
    v1::{self, JobKind, results_client::ResultsClient},
};
use secrecy::ExposeSecret as _;
use tonic::{
    Code, Request, Status,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};

use crate::error::{Error, JobName, one_line};

/// How long connecting to the collector may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Rows of the merged result printed under each update.
pub const TOP_ROWS: usize = 5;

/// How to reach the Results API and who to be there.
#[derive(Clone, Debug, clap::Args)]
pub struct CollectorArgs {
    /// The operator's collector, HOST:PORT (its Service, e.g.
    /// fathom-collector.fathom-system.svc:9443).
    #[arg(long, env = "FATHOM_COLLECTOR")]
    pub collector: String,
    /// The CA certificate (PEM) that signed the collector's TLS certificate.
    #[arg(long, env = "FATHOM_COLLECTOR_CA")]
    pub ca_file: Option<PathBuf>,
    /// The name the collector's certificate is for, when it is not the host of --collector.
    #[arg(long)]
    pub tls_server_name: Option<String>,
    /// A file holding the bearer token to send. Default: the kubeconfig's token.
    #[arg(long, env = "FATHOM_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// DEVELOPMENT ONLY: no TLS, for a collector run with --collector-insecure-plaintext (the
    /// token travels in clear text).
    #[arg(long)]
    pub insecure_plaintext: bool,
}

/// The bearer token: `--token-file`, else the kubeconfig's (a token or a token file).
pub async fn bearer_token(args: &CollectorArgs) -> Result<String, Error> {
    let read = |path: &std::path::Path| -> Result<String, Error> {
        let t = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("reading the token file {}", path.display()), e))?;
        let t = t.trim().to_string();
        if t.is_empty() {
            return Err(Error::Usage(format!(
                "the token file {} is empty",
                path.display()
            )));
        }
        Ok(t)
    };
    if let Some(path) = &args.token_file {
        return read(path);
    }
    let config = kube::Config::infer()
        .await
        .map_err(|e| Error::Kubeconfig(one_line(&e)))?;
    if let Some(token) = &config.auth_info.token {
        return Ok(token.expose_secret().trim().to_string());
    }
    if let Some(file) = &config.auth_info.token_file {
        return read(std::path::Path::new(file));
    }
    Err(Error::Usage(
        "the kubeconfig's user has no bearer token (client certificates or an exec plugin prove nothing to the collector): pass --token-file, e.g. with a token from `kubectl create token`".into(),
    ))
}

/// Connects to the collector, TLS unless `--insecure-plaintext`.
pub async fn connect(args: &CollectorArgs) -> Result<ResultsClient<Channel>, Error> {
    let hostport = args
        .collector
        .trim()
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let host = hostport
        .rsplit_once(':')
        .map_or(hostport.as_str(), |(h, _)| h)
        .trim_matches(|c| c == '[' || c == ']')
        .to_string();
    let scheme = if args.insecure_plaintext {
        "http"
    } else {
        "https"
    };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{hostport}"))
        .map_err(|e| Error::Usage(format!("--collector {}: {e}", args.collector)))?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10));
    if !args.insecure_plaintext {
        let ca_file = args.ca_file.as_ref().ok_or_else(|| {
            Error::Usage(
                "--ca-file is needed for TLS: the CA certificate that signed the collector's certificate (or --insecure-plaintext for a development collector)".into(),
            )
        })?;
        let pem = std::fs::read(ca_file)
            .map_err(|e| Error::io(format!("reading the CA file {}", ca_file.display()), e))?;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(pem))
            .domain_name(args.tls_server_name.clone().unwrap_or(host));
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| Error::Usage(format!("TLS configuration: {}", one_line(&e))))?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| Error::CollectorUnreachable {
            addr: hostport.clone(),
            message: one_line(&e),
        })?;
    Ok(ResultsClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// The watch request of `job`, carrying `token`.
pub fn watch_request(
    job: &JobName,
    token: &str,
    events: bool,
) -> Result<Request<v1::JobRef>, Error> {
    let mut req = Request::new(v1::JobRef {
        namespace: job.namespace.clone().unwrap_or_default(),
        name: job.name.clone(),
        kind: match job.namespace {
            Some(_) => JobKind::TraceJob as i32,
            None => JobKind::ClusterTraceJob as i32,
        },
        include_events: events,
    });
    let value = format!("Bearer {token}").parse().map_err(|_| {
        Error::Usage("the bearer token holds characters a header cannot carry".into())
    })?;
    req.metadata_mut().insert("authorization", value);
    Ok(req)
}

/// A refused or broken watch, in words that name the fix.
pub fn watch_error(job: &JobName, addr: &str, status: &Status) -> Error {
    let msg = status.message();
    match status.code() {
        Code::PermissionDenied => Error::Watch(format!("forbidden: {msg}")),
        Code::Unauthenticated => Error::Watch(format!(
            "the operator did not accept your token: {msg}: use a kubeconfig whose user has a bearer token, or --token-file"
        )),
        Code::NotFound => Error::Watch(format!(
            "{job} is not known to the operator's collector ({msg}): check `kubectl get {}{}`; a job is known once the operator has planned it",
            job.plural(),
            job.namespace
                .as_ref()
                .map(|ns| format!(" -n {ns}"))
                .unwrap_or_default()
        )),
        Code::Unavailable => Error::CollectorUnreachable {
            addr: addr.to_string(),
            message: format!("unavailable: {msg}"),
        },
        code => Error::Watch(format!("watching {job}: {code:?}: {msg}")),
    }
}

/// The lines one update prints: its events, then the merged state and its top rows.
pub fn update_lines(update: &v1::ResultUpdate) -> Vec<String> {
    let mut lines = Vec::new();
    for e in &update.events {
        let fields: Vec<String> = e.fields.iter().map(|(k, v)| format!("{k}={v}")).collect();
        lines.push(format!("event {} {}", e.time_ns, fields.join(" ")));
    }
    let data: ResultData = update.result.clone().map(Into::into).unwrap_or_default();
    let c = update.coverage.as_ref().cloned().unwrap_or_default();
    let n = update.counters.as_ref().cloned().unwrap_or_default();
    let loss = n.map_full + n.ringbuf_lost + n.rate_limited + n.user_dropped + n.transport_dropped;
    lines.push(format!(
        "update run {}: {} hits, {}/{} nodes reported ({} finished, {} failed), loss {}{}{}",
        update.run,
        n.hits,
        c.nodes_reported,
        c.nodes_expected,
        c.nodes_finished,
        c.nodes_failed,
        loss,
        if data.truncated { ", truncated" } else { "" },
        if update.r#final { ", final" } else { "" },
    ));
    for row in data.rows.iter().take(TOP_ROWS) {
        let keys: Vec<String> = data
            .keys
            .iter()
            .map(|k| format!("{k}={}", row.keys.get(k).map_or("", String::as_str)))
            .collect();
        lines.push(format!("  {} {}", keys.join(" "), row.value));
    }
    lines
}

/// Watches `job` until the stream ends (after the job's final update), printing each update
/// to `out` as it comes.
pub async fn tail(
    client: &mut ResultsClient<Channel>,
    addr: &str,
    job: &JobName,
    token: &str,
    events: bool,
    out: &mut (dyn Write + Send),
) -> Result<(), Error> {
    let mut stream = client
        .watch(watch_request(job, token, events)?)
        .await
        .map_err(|s| watch_error(job, addr, &s))?
        .into_inner();
    loop {
        match stream.message().await {
            Ok(Some(update)) => {
                for line in update_lines(&update) {
                    writeln!(out, "{line}").map_err(|e| Error::io("writing", e))?;
                }
                out.flush().map_err(|e| Error::io("writing", e))?;
            }
            Ok(None) => return Ok(()),
            Err(status) => return Err(watch_error(job, addr, &status)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn an_update_prints_events_then_the_merged_state_and_top_rows() {
        let update = v1::ResultUpdate {
            job_uid: "u".into(),
            run: 1,
            result: Some(v1::ResultData {
                keys: vec!["comm".into()],
                rows: vec![v1::Row {
                    keys: BTreeMap::from([("comm".into(), "bash".into())]),
                    value: 7,
                }],
                ..Default::default()
            }),
            coverage: Some(v1::Coverage {
                nodes_reported: 1,
                nodes_expected: 2,
                nodes_finished: 0,
                nodes_failed: 0,
            }),
            counters: Some(v1::Counters {
                hits: 7,
                ringbuf_lost: 1,
                ..Default::default()
            }),
            events: vec![v1::Event {
                time_ns: 42,
                fields: BTreeMap::from([("pid".into(), "9".into())]),
            }],
            r#final: true,
        };
        assert_eq!(
            update_lines(&update),
            vec![
                "event 42 pid=9".to_string(),
                "update run 1: 7 hits, 1/2 nodes reported (0 finished, 0 failed), loss 1, final"
                    .to_string(),
                "  comm=bash 7".to_string(),
            ]
        );
    }

    #[test]
    fn refusals_name_the_fix() {
        let job = JobName {
            namespace: Some("demo".into()),
            name: "foo".into(),
        };
        let denied = watch_error(
            &job,
            "op:9443",
            &Status::permission_denied(
                "jane may not get traceresults.fathom.dev in namespace demo",
            ),
        );
        assert_eq!(
            denied.to_string(),
            "forbidden: jane may not get traceresults.fathom.dev in namespace demo"
        );
        let missing = watch_error(&job, "op:9443", &Status::not_found("unknown"));
        assert!(
            missing
                .to_string()
                .contains("kubectl get tracejobs -n demo"),
            "{missing}"
        );
        let down = watch_error(&job, "op:9443", &Status::unavailable("not the leader"));
        assert!(
            down.to_string()
                .starts_with("cannot reach the operator's Results API at op:9443"),
            "{down}"
        );
    }
}
