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

use super::{Agent, AgentError, Domain, Run};
use crate::error::chain as error_chain;
use crate::instance::process::ProcessError;
use crate::instance::{
    self,
    paths::{domain_run_dir, InstancePaths},
    process::Pidfd,
    Instance, InstanceError, InstanceRecord,
};
use crate::migration::hooks::{self, HookEnv};
use crate::migration::phase::{job_path, JobFile, Phase};
use crate::migration::recovery::{self, Decision, Observed};
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
        if let Some(keep) = adopted.keep() {
            sweep_strays(agent, &name, keep).await;
        }
    }
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
    match instance::adopt(rec.clone()).await {
        Ok(inst) => {
            let inst = Arc::new(inst);
            // Killed between recording the instance and `cont` in start:
            // the guest never ran; finish the start.
            if let Ok((false, status)) = inst.qmp.status().await {
                if status == "prelaunch" {
                    tracing::warn!(domain = %dom.name, domid, "instance was never resumed; finishing its start");
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
            agent.remove_status(&dom.name);
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

/// Adopt an instance from a record: `Ok(None)` if it is gone (or its pid
/// is another process now), `Err` if it is alive but cannot be adopted.
async fn try_adopt(rec: &InstanceRecord) -> Result<Option<Arc<Instance>>, String> {
    match instance::adopt(rec.clone()).await {
        Ok(i) => Ok(Some(Arc::new(i))),
        Err(InstanceError::Process(ProcessError::Gone { .. } | ProcessError::Reused { .. })) => {
            Ok(None)
        }
        Err(e) => Err(format!(
            "QEMU (domid {}, pid {}) runs but could not be adopted: {}",
            rec.domid,
            rec.process.pid,
            error_chain(&e)
        )),
    }
}

/// (alive, vCPUs running, query-migrate status) of one instance.
async fn observe_one(i: Option<&Arc<Instance>>) -> (bool, bool, Option<String>) {
    let Some(i) = i else {
        return (false, false, None);
    };
    let running = i.qmp.status().await.map(|x| x.0).unwrap_or(false);
    let migration = i
        .qmp
        .execute_raw("query-migrate", None)
        .await
        .ok()
        .and_then(|v| v["status"].as_str().map(String::from));
    (true, running, migration)
}

async fn observe(src: Option<&Arc<Instance>>, dst: Option<&Arc<Instance>>) -> Observed {
    let (src_alive, src_running, src_migration) = observe_one(src).await;
    let (dst_alive, dst_running, dst_migration) = observe_one(dst).await;
    Observed {
        src_alive,
        src_running,
        src_migration,
        dst_alive,
        dst_running,
        dst_migration,
    }
}

/// Finish an interrupted migration by the rules of
/// [`crate::migration::recovery`]. Returns the domid that now runs the guest.
async fn recover_migration(agent: &Arc<Agent>, dom: &Arc<Domain>, job: JobFile) -> Adopted {
    let path = job_path(&domain_run_dir(&agent.cfg.run_dir, &dom.name));
    let phase = job.phase.name();
    let outcome = match &job.phase {
        Phase::Confirm { outcome, .. } => Some(*outcome),
        _ => None,
    };
    let (src_rec, dst_rec, dst_paths, dst_domid) = match &job.phase {
        Phase::Begin { src } => (src.clone(), None, None, None),
        Phase::Prepare {
            src,
            dst_paths,
            dst_domid,
        } => (src.clone(), None, Some(dst_paths.clone()), Some(*dst_domid)),
        Phase::Perform { src, dst } | Phase::Finish { src, dst } => (
            src.clone(),
            Some(dst.clone()),
            Some(dst.paths.clone()),
            Some(dst.domid),
        ),
        Phase::Confirm {
            src,
            dst,
            dst_paths,
            dst_domid,
            ..
        } => (src.clone(), dst.clone(), dst_paths.clone(), *dst_domid),
    };
    let _ = agent.domids.observe(src_rec.domid);
    if let Some(d) = &dst_rec {
        let _ = agent.domids.observe(d.domid);
    }
    let adopted = async {
        let src = try_adopt(&src_rec).await?;
        let dst = match &dst_rec {
            Some(r) => try_adopt(r).await?,
            None => None,
        };
        Ok::<_, String>((src, dst))
    };
    let (src, dst) = match adopted.await {
        Ok(v) => v,
        Err(why) => {
            // Never decide on a guess: an instance that lives but cannot be
            // talked to may be the one running the guest. Keep the job file
            // so a later start retries.
            let reason = format!("interrupted migration (phase {phase}) not recovered: {why}");
            tracing::error!(domain = %dom.name, %reason);
            dom.state.lock().await.run = Run::Unreachable {
                record: Some(Box::new(src_rec)),
                reason,
            };
            return Adopted::LeaveAlone;
        }
    };
    let observed = observe(src.as_ref(), dst.as_ref()).await;
    let decision = recovery::decide(phase, outcome, &observed);
    tracing::warn!(domain = %dom.name, %phase, ?outcome, ?observed, ?decision, "recovering interrupted migration");
    let hook_env = HookEnv {
        domain: dom.name.clone(),
        src_domid: src_rec.domid,
        dst_domid: dst_domid.unwrap_or(0),
        dst_pid: dst_rec.as_ref().map(|d| d.process.pid),
        emulator: job.target_emulator.clone(),
        nics: crate::migration::hooks::nics_of(&dom.state.lock().await.def),
    };
    const KILL_WAIT: Duration = Duration::from_secs(10);
    let result = match decision {
        Decision::KeepSource { cancel_migration } => {
            let Some(src) = src else {
                unreachable_lost(dom, agent).await;
                return Adopted::Nothing;
            };
            if cancel_migration {
                crate::migration::cancel_outgoing(&src.qmp).await;
            }
            // The destination dies first: then resuming the source is safe.
            if let Some(d) = dst {
                d.kill("migration recovered: source kept", KILL_WAIT).await;
            }
            if let Some(p) = &dst_paths {
                kill_unrecorded(&dom.name, &p.dir).await;
                instance::cleanup_paths(p);
            }

            // Only if a destination existed (prepare hooks may have run).
            if dst_paths.is_some() {
                hooks::release(&agent.cfg.hooks_dir, &hook_env).await;
            }
            if job.src_was_running && !src.qmp.status().await.map(|x| x.0).unwrap_or(true) {
                if let Err(e) = src.qmp.cont().await {
                    tracing::error!(domain = %dom.name, error = %e, "resuming the source during recovery");
                }
            }
            Some(src)
        }
        Decision::SwitchToDestination { cont_dst } => {
            let Some(d) = dst else {
                unreachable_lost(dom, agent).await;
                return Adopted::Nothing;
            };
            // The source must be gone before the destination runs.
            if let Some(s) = src {
                s.kill("migration recovered: destination kept", KILL_WAIT)
                    .await;
            } else {
                instance::cleanup_paths(&src_rec.paths);
            }
            if cont_dst {
                if let Err(e) = d.qmp.cont().await {
                    tracing::error!(domain = %dom.name, error = %e, "resuming the destination during recovery");
                }
            }
            if d.record.emulator != dom.state.lock().await.def.emulator {
                let mut st = dom.state.lock().await;
                let mut def = st.def.clone();
                def.emulator = d.record.emulator.clone();
                if agent.store.save(&def).is_ok() {
                    st.def = def;
                }
            }
            Some(d)
        }
        Decision::Lost(reason) => {
            for i in [src, dst].into_iter().flatten() {
                i.kill("migration recovery: guest lost", KILL_WAIT).await;
            }
            agent.remove_status(&dom.name);
            dom.state.lock().await.run = Run::ShutOff { reason };
            None
        }
    };
    let _ = JobFile::remove(&path);
    let Some(inst) = result else {
        return Adopted::Nothing;
    };
    if let Err(e) = agent.write_status(&dom.name, &inst.record) {
        tracing::error!(error = %error_chain(&e), "writing status after recovery");
    }
    dom.state.lock().await.run = Run::Running(inst.clone());
    agent.watch(dom, &inst);
    tracing::warn!(domain = %dom.name, domid = inst.domid(), "migration recovered");
    Adopted::Domid(inst.domid())
}

async fn unreachable_lost(dom: &Arc<Domain>, agent: &Arc<Agent>) {
    agent.remove_status(&dom.name);
    dom.state.lock().await.run = Run::ShutOff {
        reason: "migration recovery found no instance to keep".into(),
    };
}

/// Kill the QEMU whose pidfile is in `dir`, if the process there really is
/// that instance (its command line names the directory's QMP socket).
pub(super) async fn kill_unrecorded(name: &str, dir: &std::path::Path) {
    let paths = InstancePaths::in_dir(dir);
    let Ok(pid) = instance::read_pidfile(&paths.pid) else {
        return;
    };
    // pidfd first: the process checked below is the process killed.
    let Ok(pfd) = Pidfd::open(pid) else { return };
    if !instance::runs_instance(pid, &paths) {
        return;
    }
    tracing::warn!(domain = name, dir = %dir.display(), pid, "killing QEMU of this domain");
    let _ = pfd.kill_and_wait(Duration::from_secs(10)).await;
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
