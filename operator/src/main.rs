//! `fathom-operator`: parses flags, starts logging, runs the operator (or prints the CRDs).

use anyhow::Context as _;
use clap::Parser;
use fathom_operator::{
    config::{Cli, Command},
    controller,
};
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        // Colours only for a terminal: a pod's log (kubectl logs) or a file gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    match cli.command {
        Some(Command::Crd { out: Some(dir) }) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for (name, body) in fathom_crds::crd::generated_files() {
                let path = dir.join(&name);
                std::fs::write(&path, body)
                    .with_context(|| format!("writing {}", path.display()))?;
                println!("wrote {}", path.display());
            }
            Ok(())
        }
        Some(Command::Crd { out: None }) => {
            for (_, body) in fathom_crds::crd::generated_files() {
                print!("---\n{body}");
            }
            Ok(())
        }
        Some(Command::Run) | None => {
            let client = kube::Client::try_default().await.context(
                "connecting to the Kubernetes API (in-cluster service account, or KUBECONFIG)",
            )?;
            let (tx, rx) = watch::channel(false);
            tokio::spawn(async move {
                shutdown_signal().await;
                tracing::info!("shutting down");
                let _ = tx.send(true);
            });
            controller::run_operator(client, cli.run, rx).await?;
            Ok(())
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
