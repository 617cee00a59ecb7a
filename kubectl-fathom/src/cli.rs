//! The command line: `kubectl fathom <command>` (kubectl runs `kubectl-fathom` from PATH).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::{show::Format, tail::CollectorArgs};

/// Fathom's kubectl plugin: read a TraceJob's merged result (RBAC on results only), watch it
/// live, run a job on this machine, or explain what the operator would do with one.
#[derive(Parser, Debug)]
#[command(name = "kubectl-fathom", bin_name = "kubectl fathom", version)]
pub struct Cli {
    /// The kubeconfig context to use (default: the current one).
    #[arg(long, global = true, env = "FATHOM_CONTEXT")]
    pub context: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

/// Which job: a TraceJob of a namespace, or a ClusterTraceJob.
#[derive(Args, Debug, Clone)]
pub struct JobArgs {
    /// The job's name.
    pub job: String,
    /// The TraceJob's namespace (default: the kubeconfig context's).
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    /// The job is a ClusterTraceJob.
    #[arg(long, conflicts_with = "namespace")]
    pub cluster: bool,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// The job's phase, coverage, loss and its merged result (rows, histograms, events).
    Get {
        #[command(flatten)]
        job: JobArgs,
        /// Output format.
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: Format,
    },
    /// The job's rows, largest value first.
    Top {
        #[command(flatten)]
        job: JobArgs,
        /// Rows shown at most; the rest are summed in the "other" row.
        #[arg(long)]
        limit: Option<usize>,
        /// Output format.
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: Format,
    },
    /// The job's histograms as bpftrace-style bars.
    Hist {
        #[command(flatten)]
        job: JobArgs,
    },
    /// An SVG flame graph of the job's stacks (kstack/ustack keys).
    Flamegraph {
        #[command(flatten)]
        job: JobArgs,
        /// Where to write the SVG ("-": standard output).
        #[arg(long, short = 'o', default_value = "-")]
        output: PathBuf,
    },
    /// Live events and merged updates from the operator (fathom.v1.Results.Watch), until the
    /// job finishes or Ctrl-C.
    Tail {
        #[command(flatten)]
        job: JobArgs,
        #[command(flatten)]
        collector: CollectorArgs,
        /// Only the merged updates, no events.
        #[arg(long)]
        no_events: bool,
    },
    /// Run a TraceJob file on this machine, like `fathom run` (needs root or CAP_BPF).
    Run {
        /// The TraceJob manifest (YAML).
        #[arg(long, short = 'f')]
        file: PathBuf,
        /// Override spec.duration (e.g. 10s, 5m).
        #[arg(long, short = 'd')]
        duration: Option<String>,
        /// Output format.
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: fathom_node::cli::output::Format,
        /// No progress line on the terminal.
        #[arg(long, short = 'q')]
        quiet: bool,
    },
    /// A dry run, read-only: the nodes, pods and containers the operator would trace, the
    /// nodes it would leave out and why, and whether this machine's kernel can run the probe.
    Explain {
        /// The TraceJob or ClusterTraceJob manifest (YAML).
        #[arg(long, short = 'f')]
        file: PathBuf,
        /// The namespace of a TraceJob whose manifest names none (default: the kubeconfig
        /// context's).
        #[arg(long, short = 'n')]
        namespace: Option<String>,
        /// Extra tolerations of the runner DaemonSet, a JSON list (as the operator's
        /// --runner-tolerations).
        #[arg(long, default_value = "[]")]
        runner_tolerations: String,
    },
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn bad_usage_is_a_clap_error() {
        let e = Cli::try_parse_from(["kubectl-fathom", "top"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let e = Cli::try_parse_from(["kubectl-fathom", "get", "x", "--cluster", "-n", "a"])
            .unwrap_err();
        assert_eq!(e.exit_code(), 2);
    }
}
