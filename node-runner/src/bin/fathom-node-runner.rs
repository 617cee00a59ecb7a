//! `fathom-node-runner`: the node runner daemon (one per node, a DaemonSet).
//!
//! Watches the TraceAssignments labelled with its node in the operator's namespace (and no
//! other namespace: tenants may write objects in theirs), runs them with the engine on a
//! dedicated thread (aya and the kernel are blocking), writes their status, releases their
//! detach finalizer after detaching, and streams cumulative reports to the collector. Serves
//! `/healthz`, `/readyz` and `/metrics`. The logic is in `fathom_node::daemon`.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, atomic::Ordering, mpsc as std_mpsc},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context;
use clap::Parser;
use fathom_node::{
    daemon::{
        api::{self, Watched},
        cgroups::CgroupRoot,
        health::{self, RunnerStats},
        pins::{PIN_ROOT, Pins},
        runner::{Desired, Output, Runner, RunnerOptions},
        transport::{self, TransportConfig, TransportStats},
    },
    engine::{
        kernel::Kernel,
        session::{
            DEFAULT_JOB_CPU_PERCENT, DEFAULT_NODE_CPU_PERCENT, DEFAULT_NODE_MEMORY_BUDGET, Engine,
            EngineOptions,
        },
    },
};
use fathom_proto::v1::{NodeReport, RejectionCode, ReportAck};
use futures::StreamExt;
use kube::{
    Client,
    runtime::{WatchStreamExt, watcher},
};
use tokio::sync::{mpsc, watch};

/// Fathom's node runner: runs this node's TraceAssignments and reports them.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// This node's name (from the Downward API: spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// The operator's namespace, where every TraceAssignment lives; the runner reads no other
    /// (the runner runs in it too: the Downward API's metadata.namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = api::DEFAULT_NAMESPACE)]
    namespace: String,
    /// The collector's URL, e.g. https://fathom-collector.fathom-system:7443. Without it,
    /// reports are not sent (statuses still are).
    #[arg(long, env = "FATHOM_COLLECTOR")]
    collector: Option<String>,
    /// `endpointslices`: connect to the ready endpoints of the collector's Service (the URL's
    /// host `<service>.<namespace>.svc…`), found in its EndpointSlices, one after the other at
    /// each reconnect, instead of resolving the host: for clusters without cluster DNS or a
    /// Service proxy (kube-proxy); TLS still checks the URL's host name. Default: resolve it.
    #[arg(long, env = "FATHOM_COLLECTOR_DISCOVERY", value_parser = ["dns", "endpointslices"], default_value = "dns")]
    collector_discovery: String,
    /// The projected ServiceAccount token (audience fathom-collector), sent as
    /// `authorization: Bearer` and read again at each connect.
    #[arg(long, env = "FATHOM_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The CA bundle (PEM) of the collector's certificate.
    #[arg(long, env = "FATHOM_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// Allow an http:// collector (development only: reports and the token travel in clear).
    #[arg(long, env = "FATHOM_INSECURE_PLAINTEXT")]
    insecure_plaintext: bool,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "FATHOM_HTTP_ADDR", default_value = "0.0.0.0:9090")]
    http_addr: SocketAddr,
    /// Where the runner keeps its directories in bpffs.
    #[arg(long, env = "FATHOM_PIN_ROOT", default_value = PIN_ROOT)]
    pin_root: PathBuf,
    /// Seconds between two reports of an attached assignment.
    #[arg(long, env = "FATHOM_REPORT_INTERVAL", default_value_t = 2)]
    report_interval: u64,
    /// Events the runner spools while the collector is unreachable or not reading; more are
    /// dropped (oldest first) and counted in the reports' transportDropped.
    #[arg(long, env = "FATHOM_SPOOL_EVENTS", default_value_t = 100_000)]
    spool_events: usize,
    /// Seconds between two status writes that only update counters.
    #[arg(long, env = "FATHOM_STATUS_INTERVAL", default_value_t = 30)]
    status_interval: u64,
    /// Locked kernel memory (bytes) all jobs on this node may use together, by the most each
    /// job's maps may take: a job that does not fit fails with reason NodeBudget.
    #[arg(long, env = "FATHOM_NODE_MEMORY_BUDGET", default_value_t = DEFAULT_NODE_MEMORY_BUDGET)]
    node_memory_budget: u64,
    /// The CPU budget, in percent of one CPU, of a job that sets no limits.cpuPercent: over
    /// it for 3 s in a row, the job is stopped (Failed, with the figure). 0: no budget.
    #[arg(long, env = "FATHOM_DEFAULT_CPU_PERCENT", default_value_t = DEFAULT_JOB_CPU_PERCENT,
          value_parser = clap::value_parser!(u32).range(0..=100))]
    default_cpu_percent: u32,
    /// Probe CPU, in percent of one CPU, all jobs on this node may reserve together, each by
    /// its CPU budget: a job that does not fit fails with reason NodeBudget.
    #[arg(long, env = "FATHOM_NODE_CPU_BUDGET", default_value_t = DEFAULT_NODE_CPU_PERCENT,
          value_parser = clap::value_parser!(u32).range(1..))]
    node_cpu_budget: u32,
}

/// Reports between the engine thread and the transport.
const REPORT_QUEUE: usize = 64;
/// How often the engine thread sends the live events read since the last time.
const EVENTS_INTERVAL: Duration = Duration::from_millis(200);
/// Event batches (of MAX_EVENTS_PER_REPORT) per assignment each EVENTS_INTERVAL.
const EVENT_BATCHES: usize = 16;

/// What the async side tells the engine thread.
enum Command {
    /// The desired set; `first`: the first complete list (time to sweep stale pins).
    Sync { desired: Vec<Desired>, first: bool },
    /// The collector already has this seq of an assignment (a restarted runner's reports).
    Acknowledged { uid: String, seq: u64 },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        // Colours only for a terminal: a pod's log (kubectl logs) or a file gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let args = Args::parse();
    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let (stop, shutdown) = watch::channel(false);
    let runner_stats = Arc::new(RunnerStats::default());
    let transport_stats = Arc::new(TransportStats::default());
    // Small: reports may carry 1,000 events each; the transport's bounded outbox is the spool.
    let (report_tx, report_rx) = mpsc::channel::<NodeReport>(REPORT_QUEUE);
    let (write_tx, write_rx) = mpsc::channel::<Output>(256);
    let (ack_tx, ack_rx) = mpsc::channel::<ReportAck>(256);
    let (cmd_tx, cmd_rx) = std_mpsc::channel::<Command>();

    let engine_thread = {
        let engine_opts = EngineOptions {
            node: args.node_name.clone(),
            node_memory_budget: args.node_memory_budget,
            default_cpu_percent: (args.default_cpu_percent > 0).then_some(args.default_cpu_percent),
            node_cpu_percent: args.node_cpu_budget,
            ..Default::default()
        };
        let pin_root = args.pin_root.clone();
        let intervals = (
            Duration::from_secs(args.report_interval.max(1)),
            Duration::from_secs(args.status_interval),
        );
        let stats = runner_stats.clone();
        std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || {
                engine_loop(
                    (engine_opts, pin_root),
                    intervals,
                    cmd_rx,
                    report_tx,
                    write_tx,
                    stats,
                )
            })
            .context("starting the engine thread")?
    };

    let transport_task = {
        let shutdown = shutdown.clone();
        let stats = transport_stats.clone();
        let dial = match (&args.collector, args.collector_discovery.as_str()) {
            (Some(url), "endpointslices") => Some(
                collector_endpoints(client.clone(), url, shutdown.clone())
                    .context("--collector-discovery endpointslices")?,
            ),
            _ => None,
        };
        let config = args.collector.clone().map(|url| {
            let mut c = TransportConfig::new(url);
            c.dial = dial;
            c.token_file = args.token_file.clone();
            c.ca_file = args.ca_file.clone();
            c.insecure_plaintext = args.insecure_plaintext;
            c.spool_events = args.spool_events;
            c
        });
        async move {
            match config {
                Some(config) => transport::run(config, report_rx, Some(ack_tx), stats, shutdown)
                    .await
                    .context("the collector transport"),
                None => {
                    tracing::warn!("no --collector: reports are not sent");
                    discard(report_rx, shutdown).await;
                    Ok(())
                }
            }
        }
    };

    tokio::try_join!(
        watch_assignments(
            client.clone(),
            api::Scope {
                node: args.node_name.clone(),
                namespace: args.namespace.clone(),
            },
            cmd_tx.clone(),
            runner_stats.clone(),
            shutdown.clone()
        ),
        transport_task,
        write_api(client, write_rx, runner_stats.clone()),
        forward_acks(ack_rx, cmd_tx),
        async {
            health::serve(
                args.http_addr,
                runner_stats.clone(),
                transport_stats.clone(),
                shutdown.clone(),
            )
            .await
            .context("the health server")
        },
        async {
            shutdown_signal().await;
            tracing::info!("shutting down");
            let _ = stop.send(true);
            Ok(())
        },
    )?;
    let _ = engine_thread.join();
    Ok(())
}

/// The collector Service's ready endpoints, kept current by a watch of its EndpointSlices (in
/// the Service's namespace, label `kubernetes.io/service-name`); each call of the returned
/// [`transport::Dial`] gives the next one (so a runner told UNAVAILABLE by the standby
/// operator replica tries the other), `None` while there is none.
fn collector_endpoints(
    client: Client,
    url: &str,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<transport::Dial> {
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use std::sync::{Mutex, atomic::AtomicUsize};
    let host = url
        .split_once("://")
        .map_or(url, |(_, rest)| rest)
        .split(['/', ':'])
        .next()
        .unwrap_or_default();
    let mut labels = host.split('.');
    let (Some(service), Some(namespace)) = (labels.next(), labels.next()) else {
        anyhow::bail!("the collector URL's host {host:?} is not <service>.<namespace>[.svc…]");
    };
    let api: kube::Api<EndpointSlice> = kube::Api::namespaced(client, namespace);
    let config =
        watcher::Config::default().labels(&format!("kubernetes.io/service-name={service}"));
    let slices: Arc<Mutex<std::collections::BTreeMap<String, Vec<SocketAddr>>>> = Arc::default();
    let addrs_of = |s: &EndpointSlice| -> Vec<SocketAddr> {
        let port = s.ports.iter().flatten().find_map(|p| p.port).unwrap_or(0);
        let mut out = Vec::new();
        for e in s.endpoints.iter().flatten() {
            if e.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            for a in &e.addresses {
                if let Ok(ip) = a.parse::<std::net::IpAddr>() {
                    out.push(SocketAddr::new(ip, port as u16));
                }
            }
        }
        out
    };
    {
        let slices = slices.clone();
        let service = format!("{namespace}/{service}");
        tokio::spawn(async move {
            let stream = watcher(api, config).default_backoff();
            futures::pin_mut!(stream);
            loop {
                let event = tokio::select! {
                    _ = shutdown.changed() => return,
                    e = stream.next() => match e { Some(e) => e, None => return },
                };
                let mut map = slices.lock().expect("endpoints lock");
                match event {
                    Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => {
                        map.insert(s.metadata.name.clone().unwrap_or_default(), addrs_of(&s));
                    }
                    Ok(watcher::Event::Delete(s)) => {
                        map.remove(&s.metadata.name.clone().unwrap_or_default());
                    }
                    Ok(watcher::Event::Init) => map.clear(),
                    Ok(watcher::Event::InitDone) => {}
                    Err(e) => {
                        tracing::warn!(%service, error = %e, "watching the collector's EndpointSlices")
                    }
                }
                tracing::debug!(%service, endpoints = ?map, "collector endpoints");
            }
        });
    }
    let next = Arc::new(AtomicUsize::new(0));
    Ok(transport::Dial(Arc::new(move || {
        let all: Vec<SocketAddr> = slices
            .lock()
            .expect("endpoints lock")
            .values()
            .flatten()
            .copied()
            .collect();
        if all.is_empty() {
            return None;
        }
        let addr = all[next.fetch_add(1, Ordering::Relaxed) % all.len()];
        tracing::info!(%addr, "dialing a collector endpoint (EndpointSlice)");
        Some(addr)
    })))
}

/// SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// The watch of this node's assignments (in the operator's namespace only) → the engine
/// thread. Ends on shutdown (which drops the command channel and so stops the engine thread).
async fn watch_assignments(
    client: Client,
    scope: api::Scope,
    cmd_tx: std_mpsc::Sender<Command>,
    stats: Arc<RunnerStats>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let assignments = api::assignments_api(client, &scope.namespace);
    let config = api::watch_config(&scope.node);
    let mut events = watcher(assignments, config).default_backoff().boxed();
    let mut watched = Watched::default();
    let mut first = true;
    loop {
        let event = tokio::select! {
            e = events.next() => e,
            _ = shutdown.changed() => return Ok(()),
        };
        match event {
            None => anyhow::bail!("the TraceAssignment watch ended"),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "watching TraceAssignments (is the CRD installed?)");
            }
            Some(Ok(event)) => {
                if watched.apply(event) {
                    let desired = watched.desired(&scope);
                    stats
                        .assignments
                        .store(desired.len() as u64, Ordering::Relaxed);
                    stats.synced.store(true, Ordering::Relaxed);
                    if cmd_tx.send(Command::Sync { desired, first }).is_err() {
                        anyhow::bail!("the engine thread stopped");
                    }
                    first = false;
                }
            }
        }
    }
}

/// The engine thread: owns the engine and the runner; reconciles on every change and reports
/// every interval.
fn engine_loop(
    (engine_opts, pin_root): (EngineOptions, PathBuf),
    (report_interval, status_interval): (Duration, Duration),
    commands: std_mpsc::Receiver<Command>,
    reports: mpsc::Sender<NodeReport>,
    writes: mpsc::Sender<Output>,
    stats: Arc<RunnerStats>,
) {
    // Sessions are pinned under the assignments' directories: they outlive this process, and
    // the next one resumes the wanted ones (T2) after sweeping the others (T1).
    let node = engine_opts.node.clone();
    let engine = Engine::new(Kernel::running(), engine_opts).with_pin_root(&pin_root);
    let cgroups = match CgroupRoot::host() {
        Ok(root) => Some(root),
        Err(e) => {
            tracing::warn!(error = %e, "jobs limited to pods will attach nothing on this node");
            None
        }
    };
    let mut runner = Runner::new(
        RunnerOptions {
            node,
            status_interval,
        },
        engine,
        cgroups,
        Some(Pins::at(pin_root)),
    );
    let mut synced = false;
    let mut next_tick = Instant::now() + report_interval;
    let mut next_events = Instant::now() + EVENTS_INTERVAL;
    loop {
        let wait = next_tick
            .min(next_events)
            .saturating_duration_since(Instant::now());
        let output = match commands.recv_timeout(wait) {
            Ok(Command::Sync { desired, first }) => {
                runner.sync(desired);
                if first {
                    let removed = runner.sweep_pins();
                    if !removed.is_empty() {
                        tracing::info!(
                            ?removed,
                            "removed the pins of assignments no longer wanted"
                        );
                    }
                }
                synced = true;
                runner.reconcile(SystemTime::now(), false)
            }
            Ok(Command::Acknowledged { uid, seq }) => {
                runner.acknowledged(&uid, seq);
                continue;
            }
            Err(std_mpsc::RecvTimeoutError::Timeout) if Instant::now() < next_tick => {
                next_events = Instant::now() + EVENTS_INTERVAL;
                if !synced {
                    continue;
                }
                let events = runner.report_events(SystemTime::now(), EVENT_BATCHES);
                for report in events {
                    if reports.blocking_send(report).is_err() {
                        return;
                    }
                }
                continue;
            }
            Err(std_mpsc::RecvTimeoutError::Timeout) => {
                next_tick = Instant::now() + report_interval;
                if !synced {
                    continue;
                }
                runner.reconcile(SystemTime::now(), true)
            }
            Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
        };
        stats
            .attached
            .store(runner.attached().len() as u64, Ordering::Relaxed);
        for report in output.reports.iter().cloned() {
            if reports.blocking_send(report).is_err() {
                return;
            }
        }
        if (!output.statuses.is_empty() || !output.release.is_empty())
            && writes.blocking_send(output).is_err()
        {
            return;
        }
    }
}

/// Statuses and finalizer releases → the API server.
async fn write_api(
    client: Client,
    mut writes: mpsc::Receiver<Output>,
    stats: Arc<RunnerStats>,
) -> anyhow::Result<()> {
    while let Some(output) = writes.recv().await {
        for (to, status) in &output.statuses {
            if let Err(e) = api::write_status(&client, to, status).await {
                stats.status_write_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(assignment = %to.name, error = %e, "writing the status failed");
            }
        }
        for to in &output.release {
            for attempt in 1..=api::ATTEMPTS {
                match api::release_finalizer(&client, to).await {
                    Ok(released) => {
                        if released {
                            stats.finalizers_released.fetch_add(1, Ordering::Relaxed);
                        }
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(assignment = %to.name, attempt, error = %e, "releasing the detach finalizer failed");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }
    }
    Ok(())
}

/// DUPLICATE rejections tell the runner where the collector's sequence is.
async fn forward_acks(
    mut acks: mpsc::Receiver<ReportAck>,
    cmd_tx: std_mpsc::Sender<Command>,
) -> anyhow::Result<()> {
    while let Some(ack) = acks.recv().await {
        let duplicate = ack
            .rejection
            .as_ref()
            .is_some_and(|r| r.code == RejectionCode::Duplicate as i32);
        if duplicate {
            let _ = cmd_tx.send(Command::Acknowledged {
                uid: ack.assignment_uid,
                seq: ack.acknowledged_seq,
            });
        }
    }
    Ok(())
}

/// Without a collector: take the reports so the engine thread never blocks.
async fn discard(mut reports: mpsc::Receiver<NodeReport>, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            r = reports.recv() => if r.is_none() { return },
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Args::command().debug_assert();
    }
}
