//! `fathom`: run a TraceJob on this machine, check it, or list what it can attach to.

use std::{
    io::Write,
    path::PathBuf,
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
};

use clap::{Parser, Subcommand};
use fathom_node::{
    EngineError,
    cli::{
        list,
        output::{self, Format},
        run,
    },
    engine::kernel::Kernel,
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
        // Colours only for a terminal: a pod's log (kubectl logs) or a file gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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

/// Prints the verdict; Ok(true) when every probe is feasible.
fn check(file: &std::path::Path, json: bool) -> Result<bool, EngineError> {
    let (_, checked) = run::load_job(file)?;
    let verdict = run::check_job(&checked, &Kernel::running())?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&verdict).unwrap_or_default()
        );
    } else {
        for line in run::verdict_lines(&verdict) {
            println!("{line}");
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
    install_signal_handlers();
    let result = run::run_file(file, duration, quiet, &STOP)?;
    print!("{}", output::render(&result, format));
    Ok(())
}
