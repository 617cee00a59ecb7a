//! `kubectl-fathom`, Fathom's kubectl plugin (DESIGN.md §3, docs/kubectl-fathom.md).
//!
//! - [`results`]: a job and its TraceResult from the API (`get` requests only);
//! - [`show`]: `get`/`top`/`hist` as text (summary + `fathom run`'s tables and bars), JSON, YAML;
//! - [`flamegraph`]: SVG from the result's folded stacks (inferno);
//! - [`tail`]: the operator's `fathom.v1.Results.Watch`, with the user's bearer token;
//! - [`explain`]: the operator's planner on the cluster as it is, and this kernel's verdict;
//! - [`error`]: one-line errors naming the fix, and exit codes.
//!
//! `run` is `fathom run` (`fathom_node::cli::run::run_file`).

pub mod cli;
pub mod error;
pub mod explain;
pub mod flamegraph;
pub mod results;
pub mod show;
pub mod tail;

use std::{
    io::Write,
    sync::atomic::{AtomicBool, Ordering},
};

use kube::{
    Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
};

pub use cli::{Cli, Command, JobArgs};
pub use error::{Error, JobName};

/// The Kubernetes configuration of `context` (the current one when `None`), as kubectl reads it.
pub async fn kube_config(context: Option<&str>) -> Result<Config, Error> {
    let config = match context {
        None => Config::infer()
            .await
            .map_err(|e| Error::Kubeconfig(error::one_line(&e)))?,
        Some(ctx) => {
            let kubeconfig =
                Kubeconfig::read().map_err(|e| Error::Kubeconfig(error::one_line(&e)))?;
            let options = KubeConfigOptions {
                context: Some(ctx.to_string()),
                ..Default::default()
            };
            Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(|e| Error::Kubeconfig(error::one_line(&e)))?
        }
    };
    Ok(config)
}

/// A client of the API server of `context`.
pub async fn kube_client(context: Option<&str>) -> Result<Client, Error> {
    Client::try_from(kube_config(context).await?)
        .map_err(|e| Error::Kubeconfig(error::one_line(&e)))
}

/// The job `args` name; a TraceJob's namespace defaults to `default_namespace`.
pub fn job_name(args: &JobArgs, default_namespace: &str) -> JobName {
    JobName {
        namespace: (!args.cluster).then(|| {
            args.namespace
                .clone()
                .unwrap_or_else(|| default_namespace.to_string())
        }),
        name: args.job.clone(),
    }
}

fn write(out: &mut dyn Write, bytes: &[u8]) -> Result<(), Error> {
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(|e| Error::io("writing the output", e))
}

/// Runs a command that reads the cluster through `client`: get, top, hist, flamegraph,
/// explain. `tail` and `run` have their own entry points ([`tail_command`], [`run_command`]).
pub async fn cluster_command(
    command: &Command,
    client: &Client,
    out: &mut dyn Write,
) -> Result<(), Error> {
    let ns = client.default_namespace().to_string();
    match command {
        Command::Get { job, output } => {
            let r = results::fetch(client, &job_name(job, &ns)).await?;
            write(out, show::get(&r, *output)?.as_bytes())
        }
        Command::Top { job, limit, output } => {
            let r = results::fetch(client, &job_name(job, &ns)).await?;
            write(out, show::top(&r, *limit, *output)?.as_bytes())
        }
        Command::Hist { job } => {
            let r = results::fetch(client, &job_name(job, &ns)).await?;
            write(out, show::hist(&r)?.as_bytes())
        }
        Command::Flamegraph { job, output } => {
            let r = results::fetch(client, &job_name(job, &ns)).await?;
            let svg = flamegraph::render(&r)?;
            if output.as_os_str() == "-" {
                write(out, &svg)
            } else {
                std::fs::write(output, &svg)
                    .map_err(|e| Error::io(format!("writing {}", output.display()), e))?;
                write(
                    out,
                    format!("wrote {} ({} bytes)\n", output.display(), svg.len()).as_bytes(),
                )
            }
        }
        Command::Explain {
            file,
            namespace,
            runner_tolerations,
        } => {
            let tolerations = explain::tolerations(runner_tolerations)?;
            let input = explain::read_input(file, namespace.as_deref().unwrap_or(&ns))?;
            let cluster = explain::read_cluster(client, &input).await?;
            let plan = explain::describe_plan(&input, cluster, &tolerations)?;
            let kernel = fathom_node::engine::kernel::Kernel::running();
            let verdict = explain::describe_kernel(&input, &kernel)?;
            write(out, format!("{plan}{verdict}").as_bytes())
        }
        Command::Tail { .. } | Command::Run { .. } => Err(Error::Usage(
            "tail and run do not read the cluster through the API client".into(),
        )),
    }
}

/// `kubectl fathom tail`: connects to the collector and prints updates until the job ends.
pub async fn tail_command(
    job: &JobArgs,
    collector: &tail::CollectorArgs,
    events: bool,
    context: Option<&str>,
    out: &mut (dyn Write + Send),
) -> Result<(), Error> {
    let default_ns = if job.cluster || job.namespace.is_some() {
        String::new()
    } else {
        kube_config(context).await?.default_namespace
    };
    let name = job_name(job, &default_ns);
    let token = tail::bearer_token(collector).await?;
    let mut client = tail::connect(collector).await?;
    tail::tail(
        &mut client,
        &collector.collector,
        &name,
        &token,
        events,
        out,
    )
    .await
}

/// Set by Ctrl-C or SIGTERM during `kubectl fathom run`: the run stops and detaches.
pub static STOP: AtomicBool = AtomicBool::new(false);

/// `kubectl fathom run`: `fathom run` on this machine (the engine library), printing the result.
pub async fn run_command(
    file: &std::path::Path,
    duration: Option<&str>,
    format: fathom_node::cli::output::Format,
    quiet: bool,
    out: &mut dyn Write,
) -> Result<(), Error> {
    tokio::spawn(async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            Some(_) = async { match term.as_mut() { Some(t) => t.recv().await, None => None } } => {}
        }
        STOP.store(true, Ordering::Relaxed);
    });
    let file = file.to_path_buf();
    let duration = duration.map(str::to_string);
    let result = tokio::task::spawn_blocking(move || {
        fathom_node::cli::run::run_file(&file, duration.as_deref(), quiet, &STOP)
    })
    .await
    .map_err(|e| Error::Render(format!("the run's thread failed: {e}")))??;
    write(
        out,
        fathom_node::cli::output::render(&result, format).as_bytes(),
    )
}

/// Runs the parsed command line.
pub async fn execute(cli: Cli, out: &mut (dyn Write + Send)) -> Result<(), Error> {
    let context = cli.context.as_deref();
    match &cli.command {
        Command::Tail {
            job,
            collector,
            no_events,
        } => tail_command(job, collector, !no_events, context, out).await,
        Command::Run {
            file,
            duration,
            output,
            quiet,
        } => run_command(file, duration.as_deref(), *output, *quiet, out).await,
        command => {
            let client = kube_client(context).await?;
            cluster_command(command, &client, out).await
        }
    }
}
