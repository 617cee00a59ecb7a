//! Flags and environment of `fathom-operator`.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};
use k8s_openapi::api::core::v1::Toleration;

use crate::{
    collector::server::Transport,
    leader::{self, Timings},
    lifecycle::{CleanupSettings, Settings},
    plan::daemonset_default_tolerations,
    reconcile::ReconcileConfig,
};

/// Fathom's operator: turns TraceJobs and ClusterTraceJobs into per-node TraceAssignments.
#[derive(Parser, Debug)]
#[command(name = "fathom-operator", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the operator (the default).
    Run,
    /// Print the CRDs as YAML, or write one file per CRD into a directory.
    Crd {
        /// Write `<name>.yaml` files here instead of printing (e.g. crds/generated).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// How the operator runs.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Namespace of the operator, which tenants must not be able to write: every
    /// TraceAssignment (of TraceJobs and ClusterTraceJobs) and ClusterTraceJobs' results go
    /// here, and the leader Lease lives here.
    #[arg(long, env = "POD_NAMESPACE", default_value = "fathom-system")]
    pub namespace: String,
    /// This replica's identity in the leader Lease; unique per replica. Default: the host name,
    /// `_` and a suffix unique to this process.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Name of the leader Lease.
    #[arg(
        long,
        env = "FATHOM_LEASE_NAME",
        default_value = "fathom-operator-leader"
    )]
    pub lease_name: String,
    /// Seconds a follower waits, after it last saw the leader Lease change, before taking it
    /// over.
    #[arg(long, env = "FATHOM_LEASE_SECONDS", default_value_t = 15)]
    pub lease_seconds: u64,
    /// Seconds a leader goes on leading without a successful renewal of its Lease; shorter
    /// than --lease-seconds. Default: two thirds of --lease-seconds (10 for 15).
    #[arg(long, env = "FATHOM_RENEW_DEADLINE_SECONDS")]
    pub renew_deadline_seconds: Option<u64>,
    /// Seconds between two attempts to acquire or renew the leader Lease; shorter than the
    /// renew deadline. Default: 2, or half the renew deadline if that is shorter.
    #[arg(long, env = "FATHOM_RETRY_PERIOD_SECONDS")]
    pub retry_period_seconds: Option<u64>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "FATHOM_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,
    /// Extra tolerations of the runner DaemonSet, as a JSON list of Kubernetes tolerations
    /// (the DaemonSet controller's own are always included).
    #[arg(long, env = "FATHOM_RUNNER_TOLERATIONS", default_value = "[]")]
    pub runner_tolerations: String,
    /// Seconds to wait after a job's deadline for nodes' final reports.
    #[arg(long, env = "FATHOM_GRACE_SECONDS", default_value_t = 30)]
    pub grace_seconds: u64,
    /// Seconds an assignment of a node that is gone or not Ready may hold a deletion.
    #[arg(long, env = "FATHOM_LOST_NODE_SECONDS", default_value_t = 60)]
    pub lost_node_seconds: u64,
    /// Seconds an assignment of a Ready node may hold a deletion before the operator gives
    /// up on its runner.
    #[arg(long, env = "FATHOM_STUCK_SECONDS", default_value_t = 600)]
    pub stuck_seconds: u64,
    /// Seconds between two looks at every job even if nothing changed.
    #[arg(long, env = "FATHOM_RESYNC_SECONDS", default_value_t = 300)]
    pub resync_seconds: u64,
    /// Milliseconds the controller waits to merge bursts of triggers for one job.
    #[arg(long, env = "FATHOM_DEBOUNCE_MS", default_value_t = 500)]
    pub debounce_ms: u64,
    /// Address of the collector's gRPC server (fathom.v1 Collector and Results).
    #[arg(long, env = "FATHOM_COLLECTOR_ADDR", default_value = "0.0.0.0:9443")]
    pub collector_addr: SocketAddr,
    /// The collector's TLS certificate chain (PEM file).
    #[arg(long, env = "FATHOM_COLLECTOR_TLS_CERT")]
    pub collector_tls_cert: Option<PathBuf>,
    /// The collector's TLS private key (PEM file).
    #[arg(long, env = "FATHOM_COLLECTOR_TLS_KEY")]
    pub collector_tls_key: Option<PathBuf>,
    /// DEVELOPMENT ONLY: serve the collector without TLS (tokens travel in clear text).
    #[arg(long, env = "FATHOM_COLLECTOR_INSECURE_PLAINTEXT")]
    pub collector_insecure_plaintext: bool,
    /// The node runner's ServiceAccount as a user name: only its tokens prove a node.
    #[arg(
        long,
        env = "FATHOM_COLLECTOR_RUNNER_USER",
        default_value = crate::collector::auth::DEFAULT_RUNNER_USER
    )]
    pub collector_runner_user: String,
}

impl RunArgs {
    /// This replica's identity in the leader Lease: `--identity`/`$POD_NAME`, else
    /// [`leader::default_identity`].
    pub fn identity(&self) -> String {
        self.identity
            .as_deref()
            .map(str::trim)
            .filter(|i| !i.is_empty())
            .map_or_else(leader::default_identity, str::to_string)
    }

    /// The leader election's timings, or why the flags are wrong.
    pub fn leader_timings(&self) -> Result<Timings, String> {
        let lease_duration = Duration::from_secs(self.lease_seconds.max(1));
        let renew_deadline = self
            .renew_deadline_seconds
            .map_or(lease_duration * 2 / 3, Duration::from_secs);
        let retry_period = self.retry_period_seconds.map_or(
            Duration::from_secs(2).min(renew_deadline / 2),
            Duration::from_secs,
        );
        let timings = Timings {
            lease_duration,
            renew_deadline,
            retry_period,
        };
        timings.validate()?;
        Ok(timings)
    }

    /// The collector's transport: TLS from the two files, or plaintext with the development
    /// flag; `None` (no collector) when neither is given.
    pub fn collector_transport(&self) -> Result<Option<Transport>, String> {
        let read = |p: &PathBuf, flag: &str| {
            std::fs::read(p).map_err(|e| format!("{flag} {}: {e}", p.display()))
        };
        match (
            &self.collector_tls_cert,
            &self.collector_tls_key,
            self.collector_insecure_plaintext,
        ) {
            (Some(_), Some(_), true) => Err(
                "--collector-insecure-plaintext and --collector-tls-cert/--collector-tls-key exclude each other"
                    .into(),
            ),
            (Some(cert), Some(key), false) => Ok(Some(Transport::Tls {
                cert_pem: read(cert, "--collector-tls-cert")?,
                key_pem: read(key, "--collector-tls-key")?,
            })),
            (None, None, true) => Ok(Some(Transport::InsecurePlaintext)),
            (None, None, false) => Ok(None),
            _ => Err("--collector-tls-cert and --collector-tls-key go together".into()),
        }
    }

    /// The reconciler's configuration, or why the flags are wrong.
    pub fn reconcile_config(&self) -> Result<ReconcileConfig, String> {
        let extra: Vec<Toleration> = serde_json::from_str(&self.runner_tolerations)
            .map_err(|e| format!("--runner-tolerations is not a JSON list of tolerations: {e}"))?;
        let mut tolerations = daemonset_default_tolerations();
        tolerations.extend(extra);
        Ok(ReconcileConfig {
            operator_namespace: self.namespace.clone(),
            runner_tolerations: tolerations,
            lifecycle: Settings {
                grace_period: Duration::from_secs(self.grace_seconds),
            },
            cleanup: CleanupSettings {
                lost_node_timeout: Duration::from_secs(self.lost_node_seconds),
                stuck_timeout: Duration::from_secs(self.stuck_seconds),
            },
            resync: Duration::from_secs(self.resync_seconds.max(1)),
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn tolerations_flag_adds_to_the_daemonset_defaults() {
        let cli = Cli::parse_from([
            "fathom-operator",
            "--runner-tolerations",
            r#"[{"key":"dedicated","operator":"Equal","value":"gpu","effect":"NoSchedule"}]"#,
        ]);
        let c = cli.run.reconcile_config().expect("valid");
        assert_eq!(
            c.runner_tolerations.len(),
            daemonset_default_tolerations().len() + 1
        );
        let bad = Cli::parse_from(["fathom-operator", "--runner-tolerations", "nope"]);
        assert!(
            bad.run
                .reconcile_config()
                .unwrap_err()
                .contains("--runner-tolerations")
        );
    }

    #[test]
    fn leader_timings_default_to_15_10_2_and_follow_the_lease() {
        let cli = Cli::parse_from(["fathom-operator"]);
        assert_eq!(cli.run.leader_timings(), Ok(Timings::default()));
        let short = Cli::parse_from(["fathom-operator", "--lease-seconds", "6"]);
        let t = short
            .run
            .leader_timings()
            .expect("derived defaults are valid");
        assert_eq!(t.renew_deadline, Duration::from_secs(4));
        assert_eq!(t.retry_period, Duration::from_secs(2));
        let set = Cli::parse_from([
            "fathom-operator",
            "--lease-seconds",
            "30",
            "--renew-deadline-seconds",
            "20",
            "--retry-period-seconds",
            "5",
        ]);
        let t = set.run.leader_timings().expect("valid");
        assert_eq!(
            (t.lease_duration, t.renew_deadline, t.retry_period),
            (
                Duration::from_secs(30),
                Duration::from_secs(20),
                Duration::from_secs(5)
            )
        );
        let bad = Cli::parse_from([
            "fathom-operator",
            "--lease-seconds",
            "10",
            "--renew-deadline-seconds",
            "12",
        ]);
        let err = bad.run.leader_timings().unwrap_err();
        assert!(
            err.contains("--renew-deadline-seconds") && err.contains("--lease-seconds"),
            "{err}"
        );
    }

    #[test]
    fn the_collector_needs_tls_files_or_the_plaintext_flag() {
        let cli = Cli::parse_from(["fathom-operator"]);
        assert!(matches!(cli.run.collector_transport(), Ok(None)));
        assert_eq!(cli.run.collector_addr.port(), 9443);
        let dev = Cli::parse_from(["fathom-operator", "--collector-insecure-plaintext"]);
        assert!(matches!(
            dev.run.collector_transport(),
            Ok(Some(Transport::InsecurePlaintext))
        ));
        let half = Cli::parse_from(["fathom-operator", "--collector-tls-cert", "/x.pem"]);
        assert!(
            half.run
                .collector_transport()
                .unwrap_err()
                .contains("go together")
        );
        let missing = Cli::parse_from([
            "fathom-operator",
            "--collector-tls-cert",
            "/nonexistent/c.pem",
            "--collector-tls-key",
            "/nonexistent/k.pem",
        ]);
        assert!(
            missing
                .run
                .collector_transport()
                .unwrap_err()
                .contains("--collector-tls-cert /nonexistent/c.pem")
        );
    }

    #[test]
    fn the_identity_flag_wins_and_the_default_is_unique_per_process() {
        let cli = Cli::parse_from(["fathom-operator", "--identity", "replica-a"]);
        assert_eq!(cli.run.identity(), "replica-a");
        let cli = Cli::parse_from(["fathom-operator"]);
        assert_eq!(cli.run.identity(), leader::default_identity());
        assert_ne!(cli.run.identity(), "fathom-operator");
    }
}
