//! Startup: load the stored definitions and re-adopt the QEMU instances that
//! kept running while the agent was away.
//!
//! Rules:
//! - a status file names the instance that was running; it is adopted if
//!   its process still exists with the recorded start time (a reused pid is
//!   rejected), its guest RAM memfd is recovered from the process, and QMP
//!   is reconnected (the console needs nothing: QEMU appends to its log);
//! - an instance that is gone is recorded as shut off with the reason, and
//!   its paths are removed;
//! - an instance directory with no status file is a QEMU the agent spawned
//!   but never recorded. The status is written before `cont`, so such a
//!   QEMU never ran guest code: it is killed and its directory removed.

use super::migrate::DomainHost;
use super::{Agent, AgentError, Domain, Run};
use crate::error::chain as error_chain;
use crate::instance::process::ProcessError;
use crate::instance::{
    self, kill_unrecorded, paths::domain_run_dir, process::Pidfd, InstanceError, InstanceRecord,
};
use crate::migration::engine::{self, Recovered};
use crate::migration::phase::{job_path, JobFile};
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
        let dom = Arc::new(Domain::new(
            def,
            uuid,
            "not started since the agent started",
        ));
        if let Err(e) = agent.table().insert(&name, uuid, dom.clone()) {
            tracing::error!(domain = %name, error = %e, "stored domain not loaded");
            continue;
        }
        dom.follow_console(&agent.console_log(&name));
        let job = job_path(&domain_run_dir(&agent.cfg.run_dir, &name));
        let adopted = match JobFile::load(&job) {
            Ok(Some(j)) => recover_migration(agent, &dom, j).await,
            Ok(None) => adopt_domain(agent, &dom).await,
            Err(e) => {
                // The status file names the source until the swap; after an
                // interrupted migration it may be the wrong instance. Touch
                // nothing.
                let reason = format!("migration job file unreadable: {e}; instances left alone");
                tracing::error!(domain = %name, %reason);
                dom.state.lock().await.run = Run::Unreachable {
                    record: None,
                    reason,
                };
                Adopted::LeaveAlone
            }
        };
        // The VNC console is served once per run by the agent: again for
        // whichever instance runs now, whether it was re-adopted or a
        // recovered migration left it running (source or destination).
        if let Adopted::Domid(_) = adopted {
            let running = match &dom.state.lock().await.run {
                Run::Running(i) => Some(i.clone()),
                _ => None,
            };
            if let Some(inst) = running {
                agent.serve_vnc(&dom, &inst);
            }
        }
        if let Some(keep) = adopted.keep() {
            sweep_strays(agent, &name, keep).await;
        }
        // An adoption was under way: the domain is qlive's now, or its
        // guest runs on in the foreign QEMU and the domain is forgotten.
        if agent.adopting(&name) {
            agent.settle_adoption(&dom).await;
        }
    }
    agent.remove_orphan_adoptions();
    Ok(())
}

/// What adoption found: which instance directories the sweep must leave.
enum Adopted {
    /// This domid runs the guest.
    Domid(u64),
    /// No instance: every instance directory is stale.
    Nothing,
    /// Unknown (status unreadable, or QEMU alive but not adoptable): the
    /// sweep must not touch anything.
    LeaveAlone,
}

impl Adopted {
    fn keep(&self) -> Option<Option<u64>> {
        match self {
            Adopted::Domid(d) => Some(Some(*d)),
            Adopted::Nothing => Some(None),
            Adopted::LeaveAlone => None,
        }
    }
}

async fn adopt_domain(agent: &Arc<Agent>, dom: &Arc<Domain>) -> Adopted {
    let rec = match agent.read_status(&dom.name) {
        Ok(Some(r)) => r,
        Ok(None) => return Adopted::Nothing,
        Err(e) => {
            let reason = format!("status unreadable: {}", error_chain(&e));
            tracing::error!(domain = %dom.name, %reason, "instances left alone");
            dom.state.lock().await.run = Run::Unreachable {
                record: None,
                reason,
            };
            return Adopted::LeaveAlone;
        }
    };
    let _ = agent.domids.observe(rec.domid);
    let domid = rec.domid;
    let pid = rec.process.pid;
    let paths = rec.paths.clone();
    match instance::adopt(rec.clone(), true).await {
        Ok(inst) => {
            let inst = Arc::new(inst);
            // Killed between recording the instance and `cont` in start:
            // the guest never ran; finish the start.
            if let Ok((false, status)) = inst.qmp.status().await {
                if status == "prelaunch" {
                    tracing::warn!(domain = %dom.name, domid, "instance was never resumed; finishing its start");
                    inst.set_tap_owner(true);
                    if let Err(e) = inst.qmp.cont().await {
                        tracing::error!(domain = %dom.name, error = %e, "cont");
                    }
                }
            }
            dom.state.lock().await.run = Run::Running(inst.clone());
            agent.watch(dom, &inst);
            tracing::info!(domain = %dom.name, domid, pid, "re-adopted running instance");
            Adopted::Domid(domid)
        }
        Err(InstanceError::Process(
            e @ (ProcessError::Gone { .. } | ProcessError::Reused { .. }),
        )) => {
            let reason = format!(
                "QEMU (domid {domid}, pid {pid}) was not running when the agent started: {}",
                error_chain(&e)
            );
            tracing::warn!(domain = %dom.name, %reason, "not adopted");
            instance::cleanup_paths(&paths);
            agent.remove_run_files(&dom.name);
            dom.state.lock().await.run = Run::ShutOff { reason };
            Adopted::Nothing
        }
        Err(e) => {
            // Alive but not adoptable: never kill or orphan it silently.
            let reason = format!(
                "QEMU (domid {domid}, pid {pid}) runs but could not be adopted: {}",
                error_chain(&e)
            );
            tracing::error!(domain = %dom.name, %reason, "left alone");
            dom.state.lock().await.run = Run::Unreachable {
                record: Some(Box::new(rec)),
                reason,
            };
            Adopted::LeaveAlone
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
        kill_unrecorded(name, &p).await;
        tracing::info!(domain = name, domid, "removing stale instance directory");
        let _ = crate::fsutil::remove_dir_all_if_exists(&p);
    }
}

/// Finish an interrupted migration through the engine; see
/// [`crate::migration::engine::recover`].
async fn recover_migration(agent: &Arc<Agent>, dom: &Arc<Domain>, job: JobFile) -> Adopted {
    let host = DomainHost {
        agent: agent.clone(),
        dom: dom.clone(),
    };
    match engine::recover(&host, job).await {
        Recovered::Domid(d) => Adopted::Domid(d),
        Recovered::Nothing => Adopted::Nothing,
        Recovered::LeaveAlone { src, reason } => {
            tracing::error!(domain = %dom.name, %reason);
            dom.state.lock().await.run = Run::Unreachable {
                record: Some(src),
                reason,
            };
            Adopted::LeaveAlone
        }
    }
}

impl Agent {
    /// `destroy` of an unreachable domain: kill its recorded process (if it
    /// is still that process), else any QEMU found in its instance dirs.
    pub(super) async fn kill_unreachable(&self, name: &str, record: Option<Box<InstanceRecord>>) {
        if let Some(r) = &record {
            if let Ok(pfd) = Pidfd::adopt(&r.process) {
                let _ = pfd.kill_and_wait(Duration::from_secs(10)).await;
            }
        }
        let dir = domain_run_dir(&self.cfg.run_dir, name);
        for ent in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if ent
                .file_name()
                .to_str()
                .is_some_and(|n| n.parse::<u64>().is_ok())
            {
                kill_unrecorded(name, &ent.path()).await;
                let _ = crate::fsutil::remove_dir_all_if_exists(&ent.path());
            }
        }
    }
}
