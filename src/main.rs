//! `qlive`: parse the command line, run, exit with its code.

use clap::Parser;

fn main() {
    let cli = qlive::cli::Cli::parse();
    let is_agent = matches!(cli.command, qlive::cli::Command::Agent { .. });
    let default = if is_agent { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("QLIVE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    init_logging(filter, is_agent);
    // Capabilities are per thread: drop them before the runtime's threads
    // exist, so none of them (and nothing they exec) has more.
    if is_agent {
        if let Err(e) = qlive::instance::reserve_inherited_fd_numbers() {
            eprintln!("qlive agent: reserving fd numbers: {e}");
            std::process::exit(1);
        }
        match qlive::agent::privileges::drop_all_but_kept() {
            Ok(kept) => {
                let mut v: Vec<String> = kept.iter().map(|c| c.to_string()).collect();
                v.sort();
                tracing::info!(kept = %v.join(","), "capabilities dropped");
            }
            Err(e) => {
                eprintln!("qlive agent: {e}");
                std::process::exit(1);
            }
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("qlive: starting the runtime: {e}");
            std::process::exit(2);
        }
    };
    let code = rt.block_on(qlive::cli::run(cli));
    std::process::exit(code);
}

/// Under systemd (JOURNAL_STREAM set) the agent logs to the journal with
/// structured fields; otherwise, and for the client, to stderr.
fn init_logging(filter: tracing_subscriber::EnvFilter, is_agent: bool) {
    use tracing_subscriber::prelude::*;
    if is_agent && std::env::var_os("JOURNAL_STREAM").is_some() {
        if let Ok(journald) = tracing_journald::layer() {
            tracing_subscriber::registry()
                .with(filter)
                .with(journald.with_syslog_identifier("qlive".into()))
                .init();
            return;
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
