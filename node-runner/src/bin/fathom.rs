//! `fathom`: run a TraceJob on this machine, check it, or list what it can attach to.

use std::{
    io::{IsTerminal, Write},
    path::PathBuf,
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
};

use clap::{Parser, Subcommand};
use fathom_crds::spec::parse_duration;
use fathom_node::{
    EngineError,
    engine::{EngineOptions, Session},
    jobfile,
    kernel::Kernel,
    list,
    output::{self, Format},
    plan,
    run::{Progress, run_session},
};

/// Fathom: eBPF tracing driven by TraceJob YAML — the same file you `kubectl apply`.
#[derive(Parser, Debug)]
#[command(name = "fathom", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Attach a TraceJob's probes here, show progress, stop at its duration or Ctrl-C,
    /// detach everything and print the result.
    Run {
        /// The TraceJob manifest (YAML).
        file: PathBuf,
        /// Override spec.duration (e.g. 10s, 5m).
        #[arg(long, short = 'd')]
        duration: Option<String>,
        /// Output format.
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: Format,
        /// No progress line on the terminal.
        #[arg(long, short = 'q')]
        quiet: bool,
    },
    /// Check a TraceJob against this kernel without attaching anything.
    Check {
        /// The TraceJob manifest (YAML).
        file: PathBuf,
        /// Print the verdict as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List attach points: tracepoints, kernel functions, uprobe symbols, USDT notes, LSM
    /// hooks, the catalog, or this kernel's features.
    List {
        /// KIND:GLOB, e.g. 'tracepoint:syscalls:*open*', 'kprobe:tcp_*',
        /// 'uprobe:/usr/bin/bash:*readline*', 'usdt:/usr/bin/python3', catalog, features.
        pattern: Option<String>,
        /// Show tracepoint fields and USDT arguments.
        #[arg(long, short = 'v')]
        verbose: bool,
    },
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        #[expect(unsafe_code, reason = "installing a signal handler")]
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
}

/// Exit codes: 2 for bad input, 3 when the kernel cannot run the job, 1 for other failures.
fn exit_code(e: &EngineError) -> ExitCode {
    match e {
        EngineError::File { .. } | EngineError::InvalidSpec(_) => ExitCode::from(2),
        EngineError::NotFeasible(_) | EngineError::Kernel { .. } => ExitCode::from(3),
        EngineError::Read { .. } | EngineError::Pin { .. } => ExitCode::from(1),
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run {
            file,
            duration,
            output,
            quiet,
        } => run(&file, duration.as_deref(), output, quiet),
        Command::Check { file, json } => match check(&file, json) {
            // The verdict is printed already; its reasons need no second "error:" line.
            Ok(false) => return ExitCode::from(3),
            other => other.map(|_| ()),
        },
        Command::List { pattern, verbose } => {
            let kernel = Kernel::running();
            list::list(pattern.as_deref(), verbose, &kernel).map(|lines| {
                let mut out = std::io::stdout().lock();
                for l in lines {
                    let _ = writeln!(out, "{l}");
                }
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            exit_code(&e)
        }
    }
}

fn load(
    file: &std::path::Path,
) -> Result<(jobfile::JobFile, fathom_crds::CheckedSpec), EngineError> {
    let job = jobfile::read(file)?;
    let cluster_only = job.spec.cluster_only_fields();
    if !cluster_only.is_empty() {
        eprintln!(
            "note: {} only matter in a cluster; ignored here",
            cluster_only.join(", ")
        );
    }
    let checked = job.spec.validate().map_err(EngineError::InvalidSpec)?;
    Ok((job, checked))
}

/// Prints the verdict; Ok(true) when every probe is feasible.
fn check(file: &std::path::Path, json: bool) -> Result<bool, EngineError> {
    let (_, checked) = load(file)?;
    let kernel = Kernel::running();
    let verdict = match plan::plan(&checked, &kernel, plan::Scope::Node) {
        Ok(p) => p.verdict,
        Err(EngineError::NotFeasible(v)) => v,
        Err(e) => return Err(e),
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&verdict).unwrap_or_default()
        );
    } else {
        for p in &verdict.probes {
            if p.feasible {
                println!("{}: feasible", p.probe);
            } else {
                println!(
                    "{}: not feasible: {:?}: {}",
                    p.probe,
                    p.reason
                        .unwrap_or(fathom_crds::verdict::Reason::SymbolNotFound),
                    p.message
                );
            }
        }
    }
    Ok(verdict.feasible)
}

fn run(
    file: &std::path::Path,
    duration: Option<&str>,
    format: Format,
    quiet: bool,
) -> Result<(), EngineError> {
    let (job, mut checked) = load(file)?;
    if let Some(d) = duration {
        checked.duration = Some(parse_duration(d).filter(|d| !d.is_zero()).ok_or_else(|| {
            EngineError::InvalidSpec(vec![fathom_crds::FieldError {
                field: "--duration".into(),
                message: format!("{d:?} is not a duration; write e.g. 10s, 5m"),
            }])
        })?);
    }
    let kernel = Kernel::running();
    // A local run traces the whole machine, as bpftrace does.
    let plan = plan::plan(&checked, &kernel, plan::Scope::Node)?;
    let labels = plan.probe_labels().join(", ");
    let duration = plan.duration;
    install_signal_handlers();
    let session = Session::start(plan, &kernel, EngineOptions::default())?;
    let stderr = std::io::stderr();
    let live = !quiet && stderr.is_terminal();
    eprintln!(
        "{}: attached {} ({} link{}); {}",
        job.name,
        labels,
        session.link_count(),
        if session.link_count() == 1 { "" } else { "s" },
        match duration {
            Some(d) => format!("running for {}s, Ctrl-C to stop early", d.as_secs_f64()),
            None => "running until Ctrl-C".into(),
        }
    );
    let result = run_session(session, duration, &STOP, |p: &Progress| {
        if live {
            let remaining = p.remaining.map_or(String::new(), |r| {
                format!(" / {:.0}s left", r.as_secs_f64())
            });
            eprint!(
                "\r\x1b[K{:.0}s{remaining}: {} hits, {} events, probes {:.2}% CPU",
                p.elapsed.as_secs_f64(),
                p.hits,
                p.events,
                p.cpu_percent
            );
        }
    })?;
    if live {
        eprintln!("\r\x1b[Kdetached");
    }
    print!("{}", output::render(&result, format));
    Ok(())
}
