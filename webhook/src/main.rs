//! The `bulwark` command: logging, the runtime, and dispatch to the subcommand (see `cli`).

mod cli;
mod commands;

use std::process::ExitCode;

use anyhow::Context;
use cli::{Command, LogFormat};

// jemalloc, not glibc malloc: after a relist of 100,000 pods glibc's per-thread arenas kept
// the freed pages (70 MiB resident against 33 MiB for the same caches built from watch
// events), while jemalloc's background purge hands them back within seconds (35 MiB); it also
// takes 8-12 % fewer instructions per review. Figures: bench/scale.md, bench/throughput.md.
#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn init_logging(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal, not for log files and collectors.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = cli::parse();
    // A command a person reads prints only what went wrong; the servers log what they do.
    let level = match cli.command {
        Command::Status(_) => "warn",
        _ => "info",
    };
    init_logging(cli.log_format, level);
    // kube-rs and every TLS endpoint use rustls with ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
        .and_then(|rt| rt.block_on(cli.command.run()));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bulwark: {e:#}");
            ExitCode::FAILURE
        }
    }
}
