//! `qlive`: parse the command line, run, exit with its code.

use clap::Parser;

fn main() {
    let cli = qlive::cli::Cli::parse();
    let is_agent = matches!(cli.command, qlive::cli::Command::Agent { .. });
    let default = if is_agent { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("QLIVE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
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
