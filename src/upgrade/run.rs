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
use crate::api::Request;
use serde_json::{json, Value};
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
        let v = client::call(socket, &Request::Stale {}).await?;
        let doms = v.as_array().cloned().unwrap_or_default();
        let name = |d: &Value| d["name"].as_str().unwrap_or("?").to_string();
        let stale = doms
            .iter()
            .filter(|d| d["stale"] == true)
            .map(name)
            .collect();
        let unchecked = doms
            .iter()
            .filter(|d| !d["error"].is_null())
            .map(|d| (name(d), d["error"].as_str().unwrap_or("").to_string()))
            .collect();
        return Ok((stale, unchecked));
    }
    if o.all {
        let v = client::call(socket, &Request::List {}).await?;
        return Ok(v
            .as_array()
            .into_iter()
            .flatten()
            .filter(|d| d["domid"].is_u64() && d["state"] != "unreachable")
            .filter_map(|d| d["name"].as_str().map(String::from))
            .collect::<Vec<_>>())
        .map(|v| (v, vec![]));
    }
    Err(UpgradeError::NothingSelected)
}

/// One line per finished domain.
fn report(o: &Options, line: &Value, bar: Option<&indicatif::ProgressBar>) {
    if o.json {
        println!("{line}");
        return;
    }
    let name = line["name"].as_str().unwrap_or("?");
    let text = if line["result"] == "success" {
        format!(
            "{name}: upgraded QEMU {} -> {} (QEMU downtime {} ms)",
            line["from"]["qemu_version"].as_str().unwrap_or("?"),
            line["to"]["qemu_version"].as_str().unwrap_or("?"),
            line["qemu_downtime_ms"]
        )
    } else if line["result"] == "ok" {
        format!(
            "{name}: would move QEMU {} -> {}",
            line["from"]["qemu_version"].as_str().unwrap_or("?"),
            line["to"]["qemu_version"].as_str().unwrap_or("?")
        )
    } else {
        format!(
            "{name}: FAILED, still running on its old QEMU: {}",
            line["error"].as_str().unwrap_or("?")
        )
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
                }
            };
            let res = client::call(&socket, &req).await;
            let agent_lost = matches!(&res, Err(e) if e.api_kind().is_none());
            let mut line = match res {
                Ok(v) if dry_run && v["ok"] == true => {
                    json!({"name": name, "result": "ok", "from": v["from"], "to": v["to"]})
                }
                Ok(v) if dry_run => json!({"name": name, "result": "failed", "from": v["from"],
                    "to": v["to"], "error": v["reason"]}),
                Ok(v) => {
                    let mut v = v;
                    v["name"] = json!(name);
                    v
                }
                Err(e) => {
                    json!({"name": name, "result": "failed", "error": crate::error::chain(&e)})
                }
            };
            line["wall_ms"] = json!(t.elapsed().as_millis() as u64);
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
            Err(e) => json!({"name": "?", "result": "failed", "error": e.to_string()}),
        };
        if line["result"] == "success" || line["result"] == "ok" {
            ok += 1;
        } else {
            failed.push(line["name"].as_str().unwrap_or("?").to_string());
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
    if o.json {
        println!(
            "{}",
            json!({"summary": {"selected": total, "succeeded": ok, "failed": failed.len(),
                "failed_domains": failed, "dry_run": o.dry_run, "parallel": o.parallel, "wall_ms": wall_ms,
                "unchecked": unchecked.iter().map(|u| &u.0).collect::<Vec<_>>()}})
        );
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
