//! The `qlive` command line: `qlive agent` runs the daemon, every other
//! subcommand is a client of its API socket. The daemon is entered through
//! `agent::run` alone; everything else goes through `api` (see the layering
//! in docs/architecture.md, checked by tests/layering.rs).
//!
//! Exit codes: 0 success; 1 the operation failed (the agent said why);
//! 2 usage error or the agent could not be reached.

mod metrics;
mod output;

use crate::api::client::{self, Client, ClientError};
use crate::api::Request;
use crate::config::{self, Config};
use clap::{Parser, Subcommand};
use output::Show;
use std::path::{Path, PathBuf};

#[derive(Parser, Debug)]
#[command(
    name = "qlive",
    version,
    about = "Live-upgrade the hypervisor under running QEMU guests"
)]
pub struct Cli {
    /// API socket of the agent.
    #[arg(long, global = true, env = "QLIVE_SOCKET", default_value = config::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the agent (daemon) in the foreground.
    Agent {
        #[arg(long, env = "QLIVE_STATE_DIR", default_value = config::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        #[arg(long, env = "QLIVE_RUN_DIR", default_value = config::DEFAULT_RUN_DIR)]
        run_dir: PathBuf,
        /// Required-feature hooks run on the migration destination.
        #[arg(long, env = "QLIVE_HOOKS_DIR", default_value = config::DEFAULT_HOOKS_DIR)]
        hooks_dir: PathBuf,
        /// Members of this group may use the API (besides root).
        #[arg(long, env = "QLIVE_API_GROUP", default_value = config::DEFAULT_API_GROUP)]
        api_group: String,
        /// Open API connections at most.
        #[arg(long, env = "QLIVE_MAX_CONNECTIONS", default_value_t = config::DEFAULT_MAX_CONNECTIONS)]
        max_connections: usize,
        /// Seconds a connection may stay without sending a request.
        #[arg(long, env = "QLIVE_IDLE_TIMEOUT_S", default_value_t = config::DEFAULT_IDLE_TIMEOUT_S)]
        idle_timeout_s: u64,
        /// Run QEMU instances as this unprivileged user (default: root).
        #[arg(long, env = "QLIVE_QEMU_USER")]
        qemu_user: Option<String>,
    },
    /// Store a domain definition from a JSON file (`-` for stdin).
    Define { file: PathBuf },
    /// Remove a shut-off domain's definition.
    Undefine { name: String },
    /// Boot a domain.
    Start { name: String },
    /// ACPI power-down, forced off after --timeout seconds.
    Stop {
        name: String,
        #[arg(long, default_value_t = crate::api::DEFAULT_STOP_TIMEOUT_S)]
        timeout: u64,
    },
    /// Kill a domain's QEMU at once.
    Destroy { name: String },
    /// List domains.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one domain.
    Info {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Stream a domain's live console to stdout (Ctrl-C to leave).
    Console { name: String },
    /// Live-migrate a running domain to a new QEMU process on this host.
    Migrate {
        name: String,
        /// Target QEMU binary (default: the domain's emulator).
        #[arg(long)]
        emulator: Option<PathBuf>,
        #[arg(long)]
        json: bool,
        /// Cancel the migration if it has not completed after S seconds.
        #[arg(long, default_value_t = crate::api::DEFAULT_MIGRATE_TIMEOUT_S)]
        timeout: u64,
        /// Copy guest RAM into new memory made as the definition says now
        /// (for example onto huge pages) instead of sharing it.
        #[arg(long)]
        copy_memory: bool,
        /// With --copy-memory: when to switch to post-copy (auto, always:
        /// after the first full pre-copy pass; never).
        #[arg(long, requires = "copy_memory")]
        postcopy: Option<crate::migration::params::Postcopy>,
        /// With --copy-memory: put guest RAM on huge pages of this size
        /// (2M, 1G) or off them (none); the definition keeps it.
        #[arg(long, requires = "copy_memory")]
        hugepages: Option<String>,
    },
    /// Show a domain's current job (phase, elapsed, bytes, target).
    Job {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Cancel a domain's migration (until switchover).
    Abort { name: String },
    /// Which running domains run on an outdated hypervisor, and why.
    Stale {
        #[arg(long)]
        json: bool,
    },
    /// Live-migrate domains to the current (or given) hypervisor binary.
    /// Exit: 0 all upgraded, 1 some failed (still running), 2 usage/agent error.
    Upgrade {
        /// Domains to upgrade.
        #[arg(conflicts_with_all = ["all", "stale"])]
        names: Vec<String>,
        /// Every running domain.
        #[arg(long, conflicts_with = "stale")]
        all: bool,
        /// Every running domain whose QEMU is stale (see `qlive stale`).
        #[arg(long)]
        stale: bool,
        /// Target QEMU binary (default: each domain's emulator path).
        #[arg(long)]
        emulator: Option<PathBuf>,
        /// Migrations at a time.
        #[arg(long, default_value_t = 1)]
        parallel: usize,
        /// List what would move and run the preflight on each.
        #[arg(long)]
        dry_run: bool,
        /// One JSON line per domain as it finishes, then a summary line.
        #[arg(long)]
        json: bool,
    },
    /// Send one command to a domain's guest agent (qemu-guest-agent in the
    /// guest; the domain needs `"guest_agent": true`) and print its answer,
    /// e.g. `qlive guest-agent web1 '{"execute":"guest-ping"}'`.
    GuestAgent {
        name: String,
        /// The command as JSON: `{"execute": "...", "arguments": {...}}`.
        command: String,
        /// Seconds to wait for the answer.
        #[arg(long, default_value_t = crate::api::DEFAULT_GUEST_AGENT_TIMEOUT_S)]
        timeout: u64,
    },
    /// Bring a running QEMU that qlive did not start under qlive. Only
    /// --dry-run is implemented: it prints the definition qlive would store
    /// (JSON, on stdout; what else the migration needs on stderr), or why
    /// it refuses the QEMU (exit 1).
    Adopt {
        /// The domain name to give it.
        name: String,
        /// The QEMU's QMP socket (unix).
        #[arg(long)]
        qmp: PathBuf,
        /// Check this definition against the running QEMU instead of
        /// printing a learned one.
        #[arg(long)]
        definition: Option<PathBuf>,
        /// Learn and check only; nothing is migrated or stored.
        #[arg(long)]
        dry_run: bool,
        /// When the copy of guest RAM switches to post-copy: auto (when
        /// pre-copy does not converge), always (after the first full
        /// pre-copy pass), never. Once post-copy has started, the guest
        /// is lost if either QEMU dies (docs/adopting.md).
        #[arg(long, default_value = "auto", conflicts_with = "dry_run")]
        postcopy: crate::migration::params::Postcopy,
        /// Cancel the copy if pre-copy has not completed (or switched to
        /// post-copy) after S seconds; the guest runs on untouched.
        #[arg(long, default_value_t = crate::api::DEFAULT_MIGRATE_TIMEOUT_S)]
        timeout: u64,
        /// Print the whole answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The agent's state in the Prometheus text format (domains, stale
    /// domains, migrations, the last upgrade run).
    /// Exit: 0 written, 2 agent unreachable (then `qlive_agent_up 0`).
    Metrics {
        /// Write it here (temporary file + rename, mode 0644) instead of
        /// stdout: for node_exporter's textfile collector.
        #[arg(long)]
        output: Option<PathBuf>,
    },
}

/// Exit code of a failed client call.
fn exit_code(e: &ClientError) -> i32 {
    match e {
        ClientError::Api(_) => 1,
        _ => 2,
    }
}

pub async fn run(cli: Cli) -> i32 {
    match cli.command {
        Command::Agent {
            state_dir,
            run_dir,
            hooks_dir,
            api_group,
            max_connections,
            idle_timeout_s,
            qemu_user,
        } => {
            let cfg = Config {
                state_dir,
                run_dir,
                socket: cli.socket,
                hooks_dir,
                api_group,
                max_connections: max_connections.max(1),
                idle_timeout: std::time::Duration::from_secs(idle_timeout_s.max(1)),
                qemu_user: qemu_user.filter(|u| !u.is_empty()),
            };
            match crate::agent::run(cfg).await {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("qlive agent: {e:#}");
                    1
                }
            }
        }
        Command::Console { name } => console(&cli.socket, name).await,
        Command::Metrics { output } => metrics::run(&cli.socket, output.as_deref()).await,
        Command::Adopt {
            name,
            qmp,
            definition,
            dry_run,
            postcopy,
            timeout,
            json,
        } => {
            let req = Request::Adopt {
                name,
                qmp: std::path::absolute(&qmp).unwrap_or(qmp),
                definition: None,
                dry_run,
                postcopy: Some(postcopy),
                timeout_s: Some(timeout),
            };
            adopt(&cli.socket, req, definition, json).await
        }
        Command::Upgrade {
            names,
            all,
            stale,
            emulator,
            parallel,
            dry_run,
            json,
        } => {
            let opts = crate::upgrade::run::Options {
                names,
                all,
                stale,
                emulator: emulator.map(|p| std::path::absolute(&p).unwrap_or(p)),
                parallel,
                dry_run,
                json,
            };
            crate::upgrade::run::run(&cli.socket, opts).await
        }
        cmd => {
            let (req, show): (Request, Show) = match cmd {
                Command::Define { file } => match read_definition(&file) {
                    Ok(definition) => (Request::Define { definition }, Show::Defined),
                    Err(e) => {
                        eprintln!("qlive: {e}");
                        return 2;
                    }
                },
                Command::Undefine { name } => (Request::Undefine { name }, Show::Undefined),
                Command::Start { name } => (Request::Start { name }, Show::Started),
                Command::Stop { name, timeout } => (
                    Request::Stop {
                        name,
                        timeout_s: Some(timeout),
                    },
                    Show::Stopped,
                ),
                Command::Destroy { name } => (Request::Destroy { name }, Show::Destroyed),
                Command::Migrate {
                    name,
                    emulator,
                    json,
                    timeout,
                    copy_memory,
                    postcopy,
                    hugepages,
                } => (
                    Request::Migrate {
                        name,
                        // The agent runs elsewhere: resolve against our cwd.
                        emulator: emulator.map(|p| std::path::absolute(&p).unwrap_or(p)),
                        timeout_s: Some(timeout),
                        copy_memory,
                        postcopy,
                        hugepages,
                    },
                    if json { Show::JsonLine } else { Show::Migrated },
                ),
                Command::Job { name, json } => (
                    Request::Job { name },
                    if json { Show::Json } else { Show::Job },
                ),
                Command::Abort { name } => (Request::Abort { name }, Show::Aborted),
                Command::Stale { json } => (
                    Request::Stale {},
                    if json { Show::Json } else { Show::Stale },
                ),
                Command::List { json } => {
                    (Request::List {}, if json { Show::Json } else { Show::List })
                }
                Command::Info { name, json } => (
                    Request::Info { name },
                    if json { Show::Json } else { Show::Info },
                ),
                Command::GuestAgent {
                    name,
                    command,
                    timeout,
                } => match serde_json::from_str(&command) {
                    Ok(command) => (
                        Request::GuestAgent {
                            name,
                            command,
                            timeout_s: Some(timeout),
                        },
                        Show::GuestAgent,
                    ),
                    Err(e) => {
                        eprintln!("qlive: the command is not JSON: {e}");
                        return 2;
                    }
                },
                Command::Agent { .. }
                | Command::Console { .. }
                | Command::Upgrade { .. }
                | Command::Adopt { .. }
                | Command::Metrics { .. } => {
                    unreachable!("handled above")
                }
            };
            match client::call(&cli.socket, &req)
                .await
                .and_then(|v| show.print(&req, v))
            {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("qlive: {}", crate::error::chain(&e));
                    exit_code(&e)
                }
            }
        }
    }
}

fn read_definition(file: &Path) -> Result<serde_json::Value, String> {
    use std::io::Read;
    let limit = crate::domain::definition::MAX_DEFINITION_BYTES;
    let mut buf = Vec::new();
    let r: Box<dyn Read> = if file == Path::new("-") {
        Box::new(std::io::stdin())
    } else {
        Box::new(std::fs::File::open(file).map_err(|e| format!("{}: {e}", file.display()))?)
    };
    r.take(limit as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| format!("{}: {e}", file.display()))?;
    if buf.len() > limit {
        return Err(format!(
            "{}: over the {limit}-byte limit for a definition",
            file.display()
        ));
    }
    serde_json::from_slice(&buf).map_err(|e| format!("{}: not valid JSON: {e}", file.display()))
}

/// `qlive adopt`: exit 0 learned (and matching) or adopted, 1 refused,
/// mismatching or failed, 2 usage or agent unreachable.
async fn adopt(socket: &Path, mut req: Request, file: Option<PathBuf>, json: bool) -> i32 {
    let def = match file.as_deref().map(read_definition).transpose() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("qlive: {e}");
            return 2;
        }
    };
    let Request::Adopt {
        dry_run,
        definition,
        ..
    } = &mut req
    else {
        return 2;
    };
    *definition = def;
    if !*dry_run {
        let show = if json { Show::JsonLine } else { Show::Migrated };
        return match client::call(socket, &req)
            .await
            .and_then(|v| show.render(&req, v))
        {
            Ok(out) => {
                print!("{out}");
                0
            }
            Err(e) => {
                eprintln!("qlive: {}", crate::error::chain(&e));
                exit_code(&e)
            }
        };
    }
    let plan = match client::call(socket, &req).await.and_then(|v| {
        let raw = v.clone();
        client::decode_result::<crate::api::AdoptPlan>(&req, v).map(|p| (p, raw))
    }) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("qlive: {}", crate::error::chain(&e));
            return exit_code(&e);
        }
    };
    let (plan, raw) = plan;
    if json {
        println!("{}", serde_json::to_string_pretty(&raw).unwrap_or_default());
    }
    if !plan.refused.is_empty() {
        eprintln!("qlive: cannot adopt: {}", plan.refused.join("; "));
        return 1;
    }
    if !plan.mismatches.is_empty() {
        eprintln!(
            "qlive: the definition does not match QEMU pid {}: {}",
            plan.pid,
            plan.mismatches.join("; ")
        );
        return 1;
    }
    if !json {
        if let Some(d) = &plan.definition {
            println!("{}", serde_json::to_string_pretty(d).unwrap_or_default());
        }
        if let Some(f) = &plan.facts {
            eprintln!(
                "# QEMU {} pid {} ({}): RAM block {} ({}, {} MiB, shared {})",
                f.qemu_version,
                f.pid,
                f.status,
                f.ram.block,
                f.ram.backend,
                f.ram.size_bytes >> 20,
                f.ram.shared
            );
            for n in &f.nics {
                eprintln!("# {}: tap {} at QEMU fd {:?}", n.device, n.tap, n.source);
            }
            for n in &f.notes {
                eprintln!("# note: {n}");
            }
        }
    }
    0
}

async fn console(socket: &Path, name: String) -> i32 {
    let mut c = match Client::connect(socket).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("qlive: {}", crate::error::chain(&e));
            return 2;
        }
    };
    if let Err(e) = c.call(&Request::Console { name }).await {
        eprintln!("qlive: {}", crate::error::chain(&e));
        return exit_code(&e);
    }
    let mut stream = c.into_stream();
    let mut out = tokio::io::stdout();
    tokio::select! {
        r = tokio::io::copy(&mut stream, &mut out) => match r {
            Ok(_) => 0,
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => 0,
            Err(e) => { eprintln!("qlive: console: {e}"); 2 }
        },
        _ = tokio::signal::ctrl_c() => 0,
    }
}
