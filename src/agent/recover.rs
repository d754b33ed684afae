//! Startup: load the stored definitions and re-adopt the QEMU instances that
//! kept running while the agent was away.
//!
//! Rules:
//! - a status file names the instance that was running; it is adopted if
//!   its process still exists with the recorded start time (a reused pid is
//!   rejected), its guest RAM memfd is recovered from the process, and QMP
//!   and the console are reconnected;
//! - an instance that is gone is recorded as shut off with the reason, and
//!   its paths are removed;
//! - an instance directory with no status file is a QEMU the agent spawned
//!   but never recorded. The status is written before `cont`, so such a
//!   QEMU never ran guest code: it is killed and its directory removed.

use super::{error_chain, Agent, AgentError, Domain, DomainState, Run};
use crate::console::ConsoleHub;
use crate::instance::{self, paths::domain_run_dir, process::Pidfd};
use std::sync::Arc;
use std::time::Duration;

pub(super) async fn recover(agent: &Arc<Agent>) -> Result<(), AgentError> {
    for loaded in agent.store.load_all()? {
        let def = match loaded {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %error_chain(&e), "stored domain not loaded");
                continue;
            }
        };
        let Some(uuid) = def.uuid else {
            tracing::error!(domain = %def.name, "stored definition has no UUID; not loaded");
            continue;
        };
        let name = def.name.clone();
        let dom = Arc::new(Domain {
            name: name.clone(),
            uuid,
            state: tokio::sync::Mutex::new(DomainState {
                def,
                run: Run::ShutOff {
                    reason: "not started since the agent started".into(),
                },
                removed: false,
            }),
            console: ConsoleHub::default(),
        });
        if let Err(e) = agent.table().insert(&name, uuid, dom.clone()) {
            tracing::error!(domain = %name, error = %e, "stored domain not loaded");
            continue;
        }
        let adopted = adopt_domain(agent, &dom).await;
        sweep_strays(agent, &name, adopted).await;
    }
    Ok(())
}

/// Returns the adopted domid, if any.
async fn adopt_domain(agent: &Arc<Agent>, dom: &Arc<Domain>) -> Option<u64> {
    let rec = match agent.read_status(&dom.name) {
        Ok(Some(r)) => r,
        Ok(None) => return None,
        Err(e) => {
            tracing::error!(domain = %dom.name, error = %error_chain(&e), "status unreadable; domain left shut off");
            return None;
        }
    };
    let _ = agent.domids.observe(rec.domid);
    let domid = rec.domid;
    let pid = rec.process.pid;
    let paths = rec.paths.clone();
    match instance::adopt(rec).await {
        Ok(inst) => {
            let inst = Arc::new(inst);
            if let Err(e) = dom.console.attach(&inst.record.paths.console).await {
                tracing::warn!(domain = %dom.name, error = %e, "console not reattached");
            }
            dom.state.lock().await.run = Run::Running(inst.clone());
            agent.watch(dom, &inst);
            tracing::info!(domain = %dom.name, domid, pid, "re-adopted running instance");
            Some(domid)
        }
        Err(e) => {
            let reason = format!(
                "QEMU (domid {domid}, pid {pid}) was not running when the agent started: {}",
                error_chain(&e)
            );
            tracing::warn!(domain = %dom.name, %reason, "not adopted");
            instance::cleanup_paths(&paths);
            agent.remove_status(&dom.name);
            dom.state.lock().await.run = Run::ShutOff { reason };
            None
        }
    }
}

/// Remove instance directories other than the adopted one, killing a QEMU
/// that was spawned but never recorded (it never ran vCPUs).
async fn sweep_strays(agent: &Arc<Agent>, name: &str, keep: Option<u64>) {
    let dir = domain_run_dir(&agent.cfg.run_dir, name);
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return;
    };
    for ent in rd.flatten() {
        let Some(domid) = ent.file_name().to_str().and_then(|s| s.parse::<u64>().ok()) else {
            continue;
        };
        let _ = agent.domids.observe(domid);
        if Some(domid) == keep {
            continue;
        }
        let p = ent.path();
        if let Ok(pid) = instance::read_pidfile(&p.join("pid")) {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let needle = p.join("qmp.sock");
            let ours = String::from_utf8_lossy(&cmdline).contains(&*needle.to_string_lossy());
            if ours {
                if let Ok(pfd) = Pidfd::open(pid) {
                    tracing::warn!(
                        domain = name,
                        domid,
                        pid,
                        "killing unrecorded QEMU (never ran vCPUs)"
                    );
                    let _ = pfd.kill_and_wait(Duration::from_secs(10)).await;
                }
            }
        }
        tracing::info!(domain = name, domid, "removing stale instance directory");
        let _ = crate::fsutil::remove_dir_all_if_exists(&p);
    }
}
