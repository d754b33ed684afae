//! `qlive upgrade`: live-migrate a set of running domains to the current (or
//! a given) hypervisor binary, at most N at a time, continuing past
//! failures (each failed source keeps running), with progress on a TTY,
//! STATUS= lines to systemd, and JSON lines for fleet tools.
//!
//! Exit codes: 0 every selected domain upgraded (or, with --dry-run, passed
//! the preflight); 1 some failed (their sources still run), or with --stale
//! some running domain could not be checked; 2 usage error, or the agent
//! could not be reached (at the start or during the run: then some outcomes
//! are unknown).

use crate::api::client::{self, ClientError};
use crate::api::{
    ListEntry, Migrated, Preflight, Request, StaleEntry, UpgradeLine, UpgradeOutcome,
    UpgradeSummary, UpgradeSummaryLine,
};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("choose what to upgrade: domain names, --all or --stale")]
    NothingSelected,
    #[error("--parallel must be at least 1")]
    BadParallel,
    #[error("{0}")]
    Agent(#[from] ClientError),
}

#[derive(Debug, Clone)]
pub struct Options {
    pub names: Vec<String>,
    pub all: bool,
    pub stale: bool,
    pub emulator: Option<PathBuf>,
    pub parallel: usize,
    pub dry_run: bool,
    pub json: bool,
}

pub const EXIT_OK: i32 = 0;
pub const EXIT_SOME_FAILED: i32 = 1;
pub const EXIT_USAGE: i32 = 2;

/// Tell systemd (if we run under it, e.g. as qlive-upgrade.service).
fn sd_status(msg: &str) {
    let _ = systemd::daemon::notify([(systemd::daemon::STATE_STATUS, msg)].iter());
}

/// The domains to upgrade, in a stable order, and (with --stale) the
/// running domains whose staleness could not be determined.
async fn select(
    socket: &Path,
    o: &Options,
) -> Result<(Vec<String>, Vec<(String, String)>), UpgradeError> {
    if !o.names.is_empty() {
        return Ok((o.names.clone(), vec![]));
    }
    if o.stale {
        let doms: Vec<StaleEntry> = client::call_as(socket, &Request::Stale {}).await?;
        let stale = doms
            .iter()
            .filter(|d| d.stale)
            .map(|d| d.name.clone())
            .collect();
        let unchecked = doms
            .into_iter()
            .filter_map(|d| d.error.map(|e| (d.name, e)))
            .collect();
        return Ok((stale, unchecked));
    }
    if o.all {
        let doms: Vec<ListEntry> = client::call_as(socket, &Request::List {}).await?;
        let running = doms
            .into_iter()
            .filter(|d| d.domid.is_some() && d.state != "unreachable")
            .map(|d| d.name)
            .collect();
        return Ok((running, vec![]));
    }
    Err(UpgradeError::NothingSelected)
}

/// A line of JSON as the agent's answers are: keys sorted.
fn json_line<T: serde::Serialize>(line: &T) -> String {
    crate::api::encode(line)
        .map(|v| v.to_string())
        .unwrap_or_else(|e| {
            let mut m = serde_json::Map::new();
            let e = serde_json::Value::String(format!("encoding the line: {e}"));
            m.insert("error".into(), e);
            serde_json::Value::Object(m).to_string()
        })
}

/// One line per finished domain.
fn report(o: &Options, line: &UpgradeLine, bar: Option<&indicatif::ProgressBar>) {
    if o.json {
        println!("{}", json_line(line));
        return;
    }
    let name = &line.name;
    let version = |v: Option<&str>| v.unwrap_or("?").to_string();
    let text = match &line.outcome {
        UpgradeOutcome::Success(m) => format!(
            "{name}: upgraded QEMU {} -> {} (QEMU downtime {} ms)",
            m.from.qemu_version,
            m.to.qemu_version,
            m.qemu_downtime_ms
                .map_or_else(|| "null".to_string(), |d| d.to_string())
        ),
        UpgradeOutcome::Ok { from, to } => format!(
            "{name}: would move QEMU {} -> {}",
            version(from.qemu_version.as_deref()),
            version(to.qemu_version.as_deref())
        ),
        UpgradeOutcome::Failed { error, .. } => {
            format!("{name}: FAILED, still running on its old QEMU: {error}")
        }
    };
    match bar {
        Some(b) => b.println(text),
        None => println!("{text}"),
    }
}

pub async fn run(socket: &Path, o: Options) -> i32 {
    match run_inner(socket, o).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("qlive upgrade: {}", crate::error::chain(&e));
            sd_status(&format!("upgrade not run: {e}"));
            EXIT_USAGE
        }
    }
}

async fn run_inner(socket: &Path, o: Options) -> Result<i32, UpgradeError> {
    if o.parallel == 0 {
        return Err(UpgradeError::BadParallel);
    }
    let t0 = Instant::now();
    let (names, unchecked) = select(socket, &o).await?;
    for (n, why) in &unchecked {
        eprintln!("qlive upgrade: {n}: could not tell whether it is stale, not upgraded: {why}");
    }
    let total = names.len();
    sd_status(&format!(
        "upgrading {total} domain(s), {} at a time",
        o.parallel
    ));
    let bar = (!o.json && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new(total as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let sem = Arc::new(tokio::sync::Semaphore::new(o.parallel));
    let mut set = tokio::task::JoinSet::new();
    for name in names {
        let sem = sem.clone();
        let socket = socket.to_path_buf();
        let (emulator, dry_run) = (o.emulator.clone(), o.dry_run);
        set.spawn(async move {
            let _permit = sem.acquire_owned().await;
            let t = Instant::now();
            let req = if dry_run {
                Request::Preflight {
                    name: name.clone(),
                    emulator,
                }
            } else {
                Request::Migrate {
                    name: name.clone(),
                    emulator,
                    timeout_s: None,
                    copy_memory: false,
                    postcopy: None,
                    hugepages: None,
                }
            };
            let res = if dry_run {
                client::call_as::<Preflight>(&socket, &req)
                    .await
                    .map(|p| match (p.ok, p.reason) {
                        (true, _) => UpgradeOutcome::Ok {
                            from: p.from,
                            to: p.to,
                        },
                        (false, reason) => UpgradeOutcome::Failed {
                            from: Some(p.from),
                            to: Some(p.to),
                            error: reason.unwrap_or_else(|| "the preflight failed".into()),
                        },
                    })
            } else {
                client::call_as::<Migrated>(&socket, &req)
                    .await
                    .map(|m| UpgradeOutcome::Success(m.stats))
            };
            // No answer, or none we can read: the outcome is unknown.
            let agent_lost = matches!(&res, Err(e) if e.api_kind().is_none());
            let outcome = res.unwrap_or_else(|e| UpgradeOutcome::Failed {
                from: None,
                to: None,
                error: crate::error::chain(&e),
            });
            let line = UpgradeLine {
                name,
                outcome,
                wall_ms: Some(t.elapsed().as_millis() as u64),
            };
            (line, agent_lost)
        });
    }
    let (mut ok, mut failed, mut agent_lost) = (0usize, Vec::new(), false);
    while let Some(done) = set.join_next().await {
        let line = match done {
            Ok((l, lost)) => {
                agent_lost |= lost;
                l
            }
            Err(e) => UpgradeLine {
                name: "?".into(),
                outcome: UpgradeOutcome::Failed {
                    from: None,
                    to: None,
                    error: e.to_string(),
                },
                wall_ms: None,
            },
        };
        if line.outcome.succeeded() {
            ok += 1;
        } else {
            failed.push(line.name.clone());
        }
        report(&o, &line, bar.as_ref());
        if let Some(b) = &bar {
            b.inc(1);
            b.set_message(format!("{} failed", failed.len()));
        }
        sd_status(&format!("upgraded {ok}/{total}, {} failed", failed.len()));
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    failed.sort();
    let wall_ms = t0.elapsed().as_millis() as u64;
    let verb = if o.dry_run {
        "passed preflight"
    } else {
        "upgraded"
    };
    let summary = UpgradeSummary {
        selected: total,
        succeeded: ok,
        failed: failed.len(),
        failed_domains: failed.clone(),
        unchecked: unchecked.iter().map(|u| u.0.clone()).collect(),
        dry_run: o.dry_run,
        parallel: o.parallel,
        wall_ms,
    };
    if !o.dry_run {
        // The agent keeps it for `qlive metrics`; the run's outcome does
        // not depend on it.
        let req = Request::RecordUpgrade {
            summary: summary.clone(),
        };
        if let Err(e) = client::call(socket, &req).await {
            eprintln!(
                "qlive upgrade: the agent did not record this run for its metrics: {}",
                crate::error::chain(&e)
            );
        }
    }
    if o.json {
        println!("{}", json_line(&UpgradeSummaryLine { summary }));
    } else if failed.is_empty() {
        println!("{ok}/{total} {verb} in {wall_ms} ms");
    } else {
        println!(
            "{ok}/{total} {verb} in {wall_ms} ms; failed (still on their old QEMU): {}",
            failed.join(", ")
        );
    }
    sd_status(&format!(
        "done: {ok}/{total} {verb}, {} failed",
        failed.len()
    ));
    Ok(if agent_lost {
        // Some outcomes are unknown: that is an agent error, not a verdict.
        EXIT_USAGE
    } else if failed.is_empty() && unchecked.is_empty() {
        EXIT_OK
    } else {
        EXIT_SOME_FAILED
    })
}
