//! The agent's side of a migration: the job lock, the API operations
//! (`migrate`, `job`, `abort`, `preflight`) and [`DomainHost`], the narrow
//! handle through which the engine (`migration::engine`) reaches the
//! agent's tables, allocator, probes and spawner for one domain.
//!
//! The migration runs in a task of its own, so a client that disconnects
//! mid-way cannot cancel it between two phases; `abort` is the way to stop
//! one, and only until switchover.

use super::{now_unix, Agent, AgentError, Domain, Run};
use crate::api;
use crate::domain::definition::HugePages;
use crate::domain::{Definition, DefinitionError, TableError};
use crate::instance::cmdline::StartMode;
use crate::instance::domid::DomidError;
use crate::instance::paths::InstancePaths;
use crate::instance::probe::{EmulatorInfo, ProbeError};
use crate::instance::{self, Instance, SpawnSpec};
use crate::metrics::MigrationResult;
use crate::migration::engine::{self, Host, Request};
use crate::migration::job::Job;
use crate::migration::params::{Memory, Postcopy};
use crate::migration::MigrationError;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The engine's handle on one domain of the agent.
pub(super) struct DomainHost {
    pub agent: Arc<Agent>,
    pub dom: Arc<Domain>,
}

impl Host for DomainHost {
    fn name(&self) -> &str {
        &self.dom.name
    }

    fn run_dir(&self) -> &Path {
        &self.agent.cfg.run_dir
    }

    fn hooks_dir(&self) -> &Path {
        &self.agent.cfg.hooks_dir
    }

    async fn probe(&self, emulator: &Path) -> Result<Arc<EmulatorInfo>, ProbeError> {
        self.agent.probes.get(emulator).await
    }

    fn check_qemu_access(&self, def: &Definition) -> Result<(), DefinitionError> {
        self.agent.check_qemu_access(def)
    }

    fn allocate_domid(&self) -> Result<u64, DomidError> {
        self.agent.domids.allocate()
    }

    fn observe_domid(&self, domid: u64) {
        let _ = self.agent.domids.observe(domid);
    }

    async fn spawn_destination(
        &self,
        def: &Definition,
        domid: u64,
        paths: InstancePaths,
        src: &Instance,
        info: &EmulatorInfo,
        memory: Memory,
    ) -> Result<Instance, MigrationError> {
        let console_log = self.agent.console_log(&self.dom.name);
        crate::fsutil::ensure_regular_or_absent(&console_log).map_err(|source| {
            MigrationError::ConsoleLog {
                path: console_log.clone(),
                source,
            }
        })?;
        let labels = self
            .agent
            .selinux_labels(&self.dom.name)
            .map_err(MigrationError::Labels)?;
        // The NVRAM exists since the first start; the destination opens
        // the same file (its spawn fails, naming it, if it is gone).
        let nvram = (def.firmware == crate::domain::definition::Firmware::Uefi)
            .then(|| self.agent.nvram_path(&self.dom.name));
        // A copy migration's destination gets RAM of its own, as the
        // definition describes it (huge pages or not); the source's memfd
        // goes with the source.
        let ram = match (&src.ram, memory) {
            (Some(r), Memory::Shared) => r.clone(),
            (None, Memory::Shared) => {
                return Err(MigrationError::NoSharedRam { domid: src.domid() })
            }
            (_, Memory::Copy { .. }) => {
                let spawn_err = |e: crate::instance::memory::MemoryError| {
                    MigrationError::SpawnDestination(e.into())
                };
                if let Some(h) = def.hugepages {
                    crate::instance::memory::check_huge_pages(h, def.memory_bytes())
                        .map_err(spawn_err)?;
                }
                Arc::new(
                    crate::instance::memory::GuestRam::create(
                        &self.dom.name,
                        def.memory_bytes(),
                        def.hugepages,
                    )
                    .map_err(spawn_err)?,
                )
            }
        };
        // The destination reads the taps' other set of queues.
        let tap_set = src.tap_set() ^ 1;
        for t in src.taps.iter() {
            t.reset_set(tap_set);
        }
        instance::spawn(SpawnSpec {
            def,
            domid,
            machine: &def.machine,
            accel: src.record.accel,
            paths,
            console_log: &console_log,
            mode: StartMode::Incoming,
            ram,
            taps: src.taps.clone(),
            tap_set,
            endpoints: src.endpoints.clone(),
            labels,
            run_as: self.agent.qemu_user.as_ref(),
            data_dirs: &info.data_dirs,
            nvram: nvram.as_deref(),
            inherit_firmware: Some(src.running_firmware()),
            ram_block: src.record.ram_block.clone(),
        })
        .await
        .map_err(MigrationError::SpawnDestination)
        .inspect(|dst| {
            // A foreign source has none of the domain's taps (they are
            // new): nobody else configures them, so the destination's tap
            // ioctls run from the start.
            if src.record.foreign.is_some() {
                dst.set_tap_owner(true);
            }
        })
    }

    fn insert_remote(&self, dst: Arc<Instance>) -> Result<(), TableError> {
        self.agent.table().insert_remote(&self.dom.name, dst)
    }

    fn take_remote(&self) {
        self.agent.table().take_remote(&self.dom.name);
    }

    async fn commit(&self, inst: &Arc<Instance>) -> bool {
        let mut st = self.dom.state.lock().await;
        self.agent.table().take_remote(&self.dom.name);
        if inst.record.foreign.is_some() {
            // An adoption that kept its source: the guest runs on in the
            // QEMU qlive did not start, which qlive lets go of (its QMP
            // connection closes with the instance); the adoption settles
            // the domain (agent::adopt).
            st.run = Run::ShutOff {
                reason: "the adoption did not complete: the guest stayed with the QEMU it was to \
                         be adopted from"
                    .into(),
            };
            return true;
        }
        if matches!(&st.run, Run::Running(cur) if cur.domid() == inst.domid()) {
            return true;
        }
        // A dead instance is not brought back: the caller (or, for the
        // source, its exit watcher) records why it ended.
        if inst.pidfd.exited() {
            tracing::warn!(domain = %self.dom.name, domid = inst.domid(), "not committing an instance that exited");
            return false;
        }
        if let Err(e) = self.agent.write_status(&self.dom.name, &inst.record) {
            tracing::error!(domain = %self.dom.name, "writing the status file: {}", crate::error::chain(&e));
        }
        st.run = Run::Running(inst.clone());
        // Moved to another binary: that is where the domain lives now.
        if st.def.emulator != inst.record.emulator {
            let mut def = st.def.clone();
            def.emulator = inst.record.emulator.clone();
            match self.agent.store.save(&def) {
                Ok(()) => st.def = def,
                Err(e) => tracing::error!(domain = %self.dom.name,
                    "recording the new emulator in the definition: {}", crate::error::chain(&e)),
            }
        }
        drop(st);
        self.agent.watch(&self.dom, inst);
        true
    }

    async fn lost(&self, reason: String) {
        self.agent.remove_run_files(&self.dom.name);
        self.dom.state.lock().await.run = Run::ShutOff { reason };
    }

    async fn crashed(&self, reason: String) {
        self.agent.remove_run_files(&self.dom.name);
        self.dom.state.lock().await.run = Run::Crashed { reason };
    }

    async fn unreachable(&self, record: crate::instance::InstanceRecord, reason: String) {
        tracing::error!(domain = %self.dom.name, %reason, "left alone");
        self.dom.state.lock().await.run = Run::Unreachable {
            record: Some(Box::new(record)),
            reason,
        };
    }

    async fn definition(&self) -> Definition {
        self.dom.state.lock().await.def.clone()
    }
}

impl Agent {
    /// The `preflight` op: what `qlive upgrade --dry-run` shows per domain.
    pub(super) async fn preflight_op(
        self: &Arc<Self>,
        name: &str,
        emulator: Option<PathBuf>,
    ) -> Result<api::Preflight, AgentError> {
        let dom = self.lookup(name)?;
        let (def, running) = {
            let st = dom.state.lock().await;
            let running = match &st.run {
                Run::Running(i) => Some(i.record.clone()),
                _ => None,
            };
            (st.def.clone(), running)
        };
        let target = emulator.unwrap_or_else(|| def.emulator.clone());
        if !target.is_absolute() {
            return Err(AgentError::BadRequest(format!(
                "the target emulator must be an absolute path (got {target:?})"
            )));
        }
        let Some(rec) = running else {
            return Err(AgentError::InvalidState(format!(
                "domain {} is not running",
                dom.name
            )));
        };
        let host = DomainHost {
            agent: self.clone(),
            dom: dom.clone(),
        };
        let verdict = engine::preflight(&host, &def, &target, &rec).await;
        let notes = verdict
            .as_ref()
            .map(|info| crate::migration::preflight::notes(info, &def))
            .unwrap_or_default();
        Ok(api::Preflight {
            name: dom.name.clone(),
            domid: rec.domid,
            from: api::EmulatorVersion {
                emulator: rec.emulator.clone(),
                qemu_version: Some(rec.qemu_version.to_string()),
            },
            to: api::EmulatorVersion {
                emulator: target,
                qemu_version: verdict.as_ref().ok().map(|i| i.version.to_string()),
            },
            ok: verdict.is_ok(),
            reason: verdict.err().map(|e| crate::error::chain(&e)),
            notes,
        })
    }

    /// Begin under the domain lock (the job is taken), then the engine in a
    /// task of its own; the job is dropped whatever happened.
    pub(super) async fn migrate(
        self: &Arc<Self>,
        name: &str,
        emulator: Option<PathBuf>,
        timeout: Duration,
        mut memory: Memory,
        hugepages: Option<Option<HugePages>>,
    ) -> Result<api::Migrated, AgentError> {
        let started = Instant::now();
        let dom = self.lookup(name)?;
        let (job, src, def) = {
            let mut st = dom.state.lock().await;
            if st.removed {
                return Err(crate::domain::TableError::NotFound(name.into()).into());
            }
            st.check_no_job(&dom.name)?;
            let src = match &st.run {
                Run::Running(i) => i.clone(),
                Run::ShutOff { .. } | Run::Unreachable { .. } | Run::Crashed { .. } => {
                    return Err(AgentError::InvalidState(format!(
                        "domain {} is not running",
                        dom.name
                    )))
                }
            };
            if let Some(why) = src.exit_intent() {
                return Err(AgentError::Busy(format!(
                    "domain {} is being ended ({why})",
                    dom.name
                )));
            }
            if emulator.as_ref().is_some_and(|p| !p.is_absolute()) {
                return Err(AgentError::BadRequest(format!(
                    "the target emulator must be an absolute path (got {:?})",
                    emulator.as_deref().unwrap_or(std::path::Path::new(""))
                )));
            }
            // A copy onto another backing: the destination's definition
            // has it, and must still be valid with it.
            let mut def = st.def.clone();
            if let Some(h) = hugepages {
                def.hugepages = h;
                def.validate()?;
            }
            // QEMU post-copies only between RAM blocks of one page size.
            if def.hugepages != st.def.hugepages {
                match memory {
                    Memory::Copy {
                        postcopy: Postcopy::Always,
                    } => {
                        return Err(AgentError::BadRequest(format!(
                            "post-copy cannot move guest RAM onto pages of another size \
                             ({} to {}): QEMU needs one page size on both sides; use \
                             --postcopy auto or never",
                            page_size(st.def.hugepages),
                            page_size(def.hugepages)
                        )))
                    }
                    Memory::Copy {
                        postcopy: Postcopy::Auto,
                    } => {
                        tracing::info!(domain = %dom.name, "another page size: pre-copy only");
                        memory = Memory::Copy {
                            postcopy: Postcopy::Never,
                        };
                    }
                    _ => {}
                }
            }
            let job = Arc::new(Job::migration_out(now_unix()));
            job.set_source_qmp(src.qmp.clone());
            st.job = Some(job.clone());
            (job, src, def)
        };
        let backing = def.hugepages;
        let host = DomainHost {
            agent: self.clone(),
            dom: dom.clone(),
        };
        let target = emulator.unwrap_or_else(|| def.emulator.clone());
        let req = Request {
            job,
            src,
            def,
            target,
            timeout,
            started,
            memory,
        };
        let src_record = req.src.record.clone();
        let handle = tokio::spawn(async move { engine::migrate(&host, req).await });
        let res = handle.await;
        // Whatever happened, the job is over (a test pause never gets here).
        let mut st = dom.state.lock().await;
        st.job = None;
        let job_kept = crate::migration::phase::job_path(&crate::instance::paths::domain_run_dir(
            &self.cfg.run_dir,
            &dom.name,
        ))
        .exists();
        let src_domid = src_record.domid;
        let still_source = matches!(&st.run, Run::Running(i) if i.domid() == src_domid);
        if let (Err(e), true, true) = (&res, job_kept, still_source) {
            // The engine itself failed (a bug) mid-way: which instance runs
            // the guest is not known. Leave it to recovery at the next agent
            // start, with the job file kept, and touch nothing.
            tracing::error!(domain = %dom.name, "migration task failed: {e}; the domain is left unreachable");
            self.table().take_remote(&dom.name);
            st.run = Run::Unreachable {
                record: Some(Box::new(src_record)),
                reason: format!(
                    "the migration task failed ({e}); restart the agent to recover the migration"
                ),
            };
        }
        // The domain lives on the new backing now: the stored definition
        // says so (its next boot gets it too).
        if let (Ok(Ok(_)), Some(_)) = (&res, hugepages) {
            if st.def.hugepages != backing {
                let mut def = st.def.clone();
                def.hugepages = backing;
                match self.store.save(&def) {
                    Ok(()) => st.def = def,
                    Err(e) => tracing::error!(domain = %dom.name,
                        "recording the new memory backing in the definition: {}", crate::error::chain(&e)),
                }
            }
        }
        let result = match (&res, &st.run) {
            (Ok(Ok(_)), _) => MigrationResult::Succeeded,
            (_, Run::Running(i)) if i.domid() == src_domid => MigrationResult::Failed,
            // The call failed and the guest runs (the engine never swaps
            // to the destination and then fails; counted as failed if it did).
            (_, Run::Running(_)) => MigrationResult::Failed,
            (_, Run::Crashed { .. }) => MigrationResult::Crashed,
            (_, Run::Unreachable { .. }) => MigrationResult::Unreachable,
            (_, Run::ShutOff { .. }) => MigrationResult::Lost,
        };
        drop(st);
        let downtime_s = match &res {
            Ok(Ok(r)) => r.qemu_downtime_ms.map(|ms| ms as f64 / 1000.0),
            _ => None,
        };
        let wall_s = started.elapsed().as_secs_f64();
        self.count(|t| t.migration(result, wall_s, downtime_s));
        match res {
            Ok(Ok(report)) => Ok(migrated(report)),
            Ok(Err(source)) => Err(AgentError::Migration {
                name: dom.name.clone(),
                source,
            }),
            Err(e) => Err(AgentError::Io {
                what: "migration task".into(),
                source: std::io::Error::other(e.to_string()),
            }),
        }
    }

    pub(super) async fn job(
        self: &Arc<Self>,
        name: &str,
    ) -> Result<Option<api::JobInfo>, AgentError> {
        let dom = self.lookup(name)?;
        let job = dom.state.lock().await.job.clone();
        match job {
            Some(j) => {
                j.refresh_bytes().await;
                Ok(Some(super::job_info(&j)))
            }
            None => Ok(None),
        }
    }

    pub(super) async fn abort(self: &Arc<Self>, name: &str) -> Result<api::Aborting, AgentError> {
        let dom = self.lookup(name)?;
        let st = dom.state.lock().await;
        let Some(job) = &st.job else {
            return Err(AgentError::InvalidState(format!(
                "domain {} has no job to abort",
                dom.name
            )));
        };
        if job.past_switchover() {
            return Err(AgentError::InvalidState(format!(
                "domain {}'s migration is past switchover (phase {}); it can no longer be aborted",
                dom.name,
                job.phase()
            )));
        }
        job.cancel.cancel();
        Ok(api::Aborting {
            name: dom.name.clone(),
            phase: job.phase().as_str().to_string(),
            aborting: true,
        })
    }
}

/// A backing's page size, for messages.
fn page_size(h: Option<HugePages>) -> &'static str {
    h.map_or("4K", HugePages::as_str)
}

/// The engine's report as the `migrate` call answers it.
pub(super) fn migrated(r: engine::Report) -> api::Migrated {
    let side = |s: engine::SideReport| api::InstanceSide {
        domid: s.domid,
        pid: s.pid,
        emulator: s.emulator,
        qemu_version: s.qemu_version,
    };
    let p = r.phases_ms;
    api::Migrated {
        result: api::MigrateResult::Success,
        name: r.name,
        stats: api::MigrationStats {
            from: side(r.from),
            to: side(r.to),
            phases_ms: api::PhasesMs {
                begin: p.begin,
                prepare: p.prepare,
                perform: p.perform,
                finish: p.finish,
                confirm: p.confirm,
            },
            qemu_downtime_ms: r.qemu_downtime_ms,
            qemu_total_ms: r.qemu_total_ms,
            bytes_sent: r.bytes_sent,
            completion_to_cont_us: r.completion_to_cont_us,
            total_ms: r.total_ms,
            postcopy: r.copied.then_some(r.postcopy),
            precopy_passes: r.precopy_passes,
        },
    }
}
