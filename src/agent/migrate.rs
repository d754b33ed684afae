//! The migration driver: the five phases of `migration`, run by the agent
//! on both sides, with the job lock, the remote (shadow) table and the swap.
//!
//! The migration runs in a task of its own, so a client that disconnects
//! mid-way cannot cancel it between two phases; `abort` is the way to stop
//! one, and only until switchover.

use super::{Agent, AgentError, Domain, Run};
use crate::api;
use crate::domain::Definition;
use crate::error::chain as error_chain;
use crate::instance::cmdline::StartMode;
use crate::instance::paths::{domain_run_dir, InstancePaths};
use crate::instance::{self, Instance, SpawnSpec};
use crate::migration::hooks::{self, HookEnv};
use crate::migration::job::{Job, TargetInfo};
use crate::migration::params::{self, Side};
use crate::migration::phase::{job_path, JobFile, Outcome, Phase, PhaseName};
use crate::migration::MigrationError;
use crate::qmp::{QmpError, QmpEvent};
use serde_json::Value;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::broadcast;

/// Test-only: `<phase>:before|after` makes the migration task stop there
/// (after writing a marker file) so a test can SIGKILL the agent.
pub const TEST_PAUSE_ENV: &str = "QLIVE_TEST_PAUSE_AT";
const KILL_GRACE: Duration = Duration::from_secs(5);

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn qmp_err(what: &str) -> impl FnOnce(QmpError) -> MigrationError + '_ {
    move |source| MigrationError::Qmp {
        what: what.to_string(),
        source,
    }
}

/// Per-phase wall time.
#[derive(Default)]
struct Times {
    ms: Vec<(PhaseName, f64)>,
}

impl Times {
    fn record(&mut self, p: PhaseName, since: Instant) {
        self.ms.push((p, since.elapsed().as_secs_f64() * 1e3));
    }
    fn phases(&self) -> api::PhasesMs {
        let ms = |p: PhaseName| {
            self.ms
                .iter()
                .find(|(q, _)| *q == p)
                .map(|(_, ms)| (ms * 1000.0).round() / 1000.0)
        };
        api::PhasesMs {
            begin: ms(PhaseName::Begin),
            prepare: ms(PhaseName::Prepare),
            perform: ms(PhaseName::Perform),
            finish: ms(PhaseName::Finish),
            confirm: ms(PhaseName::Confirm),
        }
    }
}

/// One migration in flight: what each phase consumes and produces.
struct Mig {
    agent: Arc<Agent>,
    dom: Arc<Domain>,
    job: Arc<Job>,
    def: Definition,
    src: Arc<Instance>,
    target: PathBuf,
    file: JobFile,
    path: PathBuf,
    times: Times,
    dst: Option<Arc<Instance>>,
    dst_domid: Option<u64>,
    dst_paths: Option<InstancePaths>,
    hooks_ran: bool,
}

impl Mig {
    /// Persist the next phase (atomic, fsync) before acting on it.
    fn persist(&mut self, phase: Phase) -> Result<(), MigrationError> {
        self.file.phase = phase;
        self.file
            .save(&self.path)
            .map_err(|source| MigrationError::Persist {
                path: self.path.clone(),
                source,
            })?;
        self.job.set_phase(self.file.phase.name());
        Ok(())
    }

    /// Test-only stop point; see [`TEST_PAUSE_ENV`].
    async fn test_pause(&self, when: &str) {
        let Ok(want) = std::env::var(TEST_PAUSE_ENV) else {
            return;
        };
        let here = format!("{}:{when}", self.file.phase.name());
        if want == here {
            let marker =
                domain_run_dir(&self.agent.cfg.run_dir, &self.dom.name).join("test-paused");
            tracing::warn!(at = %here, "test pause: migration task stops here");
            let _ = std::fs::write(&marker, &here);
            std::future::pending::<()>().await;
        }
    }

    fn hook_env(&self) -> HookEnv {
        HookEnv {
            domain: self.dom.name.clone(),
            src_domid: self.src.domid(),
            dst_domid: self.dst_domid.unwrap_or(0),
            dst_pid: self.dst.as_ref().map(|d| d.pid()),
            emulator: self.target.clone(),
            nics: hooks::nics_of(&self.def),
        }
    }

    /// Prepare: preflight the target, spawn the destination paused with
    /// `-incoming defer` on the same memfd, capabilities, hooks,
    /// `migrate-incoming`, remote table.
    async fn prepare(&mut self) -> Result<broadcast::Receiver<QmpEvent>, MigrationError> {
        let info = self
            .agent
            .preflight(&self.def, &self.target, &self.src.record)
            .await?;
        let target = self.target.clone();
        let preflight = move |reason: String| MigrationError::Preflight {
            emulator: target.clone(),
            reason,
        };
        let domid = self
            .agent
            .domids
            .allocate()
            .map_err(|e| preflight(error_chain(&e)))?;
        let paths = InstancePaths::new(&self.agent.cfg.run_dir, &self.dom.name, domid);
        self.dst_domid = Some(domid);
        self.dst_paths = Some(paths.clone());
        let next = self.file.phase.clone().prepare(domid, paths.clone());
        self.persist(next)?;
        self.test_pause("before").await;

        let mut dst_def = self.def.clone();
        dst_def.emulator = self.target.clone();
        let console_log = self.agent.console_log(&self.dom.name);
        crate::fsutil::ensure_regular_or_absent(&console_log)
            .map_err(|e| preflight(format!("console log: {e}")))?;
        let dst = instance::spawn(SpawnSpec {
            def: &dst_def,
            domid,
            machine: &self.def.machine,
            accel: self.src.record.accel,
            paths,
            console_log: &console_log,
            mode: StartMode::Incoming,
            ram: self.src.ram.clone(),
            taps: self.src.taps.clone(),
            labels: self
                .agent
                .selinux_labels(&self.dom.name)
                .map_err(|e| preflight(error_chain(&e)))?,
            run_as: self.agent.qemu_user.as_ref(),
            data_dirs: &info.data_dirs,
        })
        .await
        .map_err(MigrationError::SpawnDestination)?;
        let dst = Arc::new(dst);
        self.dst = Some(dst.clone());
        self.job.set_target(TargetInfo {
            domid,
            pid: Some(dst.pid()),
            emulator: self.target.clone(),
        });
        if let Err(e) = self
            .agent
            .table()
            .insert_remote(&self.dom.name, dst.clone())
        {
            return Err(MigrationError::RemoteTaken(e.to_string()));
        }

        crate::migration::devices::same_disks(&self.src.record.disks, &dst.record.disks).map_err(
            |reason| MigrationError::Preflight {
                emulator: self.target.clone(),
                reason,
            },
        )?;
        params::apply(&self.src.qmp, Side::Source)
            .await
            .map_err(qmp_err("setting migration capabilities on the source"))?;
        params::apply(&dst.qmp, Side::Destination)
            .await
            .map_err(qmp_err("setting migration capabilities on the destination"))?;
        params::apply_test_parameters(&self.src.qmp)
            .await
            .map_err(qmp_err("setting test parameters"))?;

        self.hooks_ran = true;
        hooks::prepare(&self.agent.cfg.hooks_dir, &self.hook_env()).await?;

        let events = dst.qmp.subscribe();
        let uri = format!("unix:{}", dst.record.paths.migrate.display());
        dst.qmp
            .execute(qapi::qmp::migrate_incoming {
                uri: Some(uri),
                channels: None,
                exit_on_error: None,
            })
            .await
            .map_err(qmp_err("migrate-incoming on the destination"))?;
        Ok(events)
    }

    /// Perform: `migrate` on the source, then wait for its MIGRATION event.
    /// Returns the instant the completion event arrived.
    async fn perform(&mut self, timeout: Duration) -> Result<Instant, MigrationError> {
        let dst = self
            .dst
            .clone()
            .ok_or_else(|| MigrationError::Unsafe("no destination".into()))?;
        let next = self.file.phase.clone().perform(dst.record.clone());
        self.persist(next)?;
        self.test_pause("before").await;
        if self.job.cancel.is_cancelled() {
            return Err(MigrationError::Aborted);
        }

        let mut events = self.src.qmp.subscribe();
        let uri = format!("unix:{}", dst.record.paths.migrate.display());
        self.src
            .qmp
            .execute(qapi::qmp::migrate {
                uri: Some(uri),
                channels: None,
                detach: None,
                resume: None,
            })
            .await
            .map_err(qmp_err("migrate on the source"))?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // biased: a completion that raced an abort wins (the switchover
            // happened; abort is refused from then on).
            tokio::select! {
                biased;
                ev = events.recv() => match ev {
                    Ok(ev) if ev.name == "MIGRATION" => {
                        let status = ev.data["status"].as_str().unwrap_or("").to_string();
                        tracing::debug!(domain = %self.dom.name, %status, "source MIGRATION event");
                        match status.as_str() {
                            "completed" => return Ok(Instant::now()),
                            "failed" | "cancelled" => {
                                let detail = self.src.qmp.execute_raw("query-migrate", None).await
                                    .ok()
                                    .and_then(|v| v["error-desc"].as_str().map(String::from))
                                    .unwrap_or_else(|| "QEMU gave no reason".into());
                                return Err(MigrationError::Failed { status, detail });
                            }
                            _ => {}
                        }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => {
                        return Err(MigrationError::Failed {
                            status: "failed".into(),
                            detail: "lost the source's QMP connection".into(),
                        });
                    }
                },
                _ = self.job.cancel.cancelled() => {
                    self.cancel_outgoing().await;
                    return Err(MigrationError::Aborted);
                }
                _ = tokio::time::sleep_until(deadline) => {
                    self.cancel_outgoing().await;
                    return Err(MigrationError::Timeout { secs: timeout.as_secs() });
                }
            }
        }
    }

    /// `migrate_cancel` and wait (bounded) for the source to leave the
    /// migration: it then runs again if it ran before.
    async fn cancel_outgoing(&self) {
        crate::migration::cancel_outgoing(&self.src.qmp).await;
    }

    /// Finish: the incoming side completed; prove the source stopped; cont.
    async fn finish(
        &mut self,
        mut dst_events: broadcast::Receiver<QmpEvent>,
        completed_at: Instant,
    ) -> Result<Duration, MigrationError> {
        let dst = self
            .dst
            .clone()
            .ok_or_else(|| MigrationError::Unsafe("no destination".into()))?;
        let t_entry = completed_at.elapsed();
        let next = self.file.phase.clone().finish();
        self.persist(next)?;
        let t_persisted = completed_at.elapsed();
        self.test_pause("before").await;
        // The destination's own MIGRATION completed (usually already queued).
        let incoming = async {
            loop {
                match dst_events.recv().await {
                    Ok(ev) if ev.name == "MIGRATION" => match ev.data["status"].as_str() {
                        Some("completed") => return Ok(()),
                        Some(s @ ("failed" | "cancelled")) => {
                            return Err(MigrationError::Failed {
                                status: s.to_string(),
                                detail: "the destination could not load the incoming state".into(),
                            })
                        }
                        _ => {}
                    },
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => {
                        return Err(MigrationError::Failed {
                            status: "failed".into(),
                            detail: "the destination QEMU went away".into(),
                        })
                    }
                }
            }
        };
        let incoming = async {
            tokio::time::timeout(Duration::from_secs(30), incoming)
                .await
                .map_err(|_| MigrationError::Failed {
                    status: "failed".into(),
                    detail: "the destination did not report completion within 30 s".into(),
                })?
        };
        // Safety invariant: never two instances running vCPUs. The proof that
        // the source stopped is asked for while the destination finishes
        // loading, so it costs no time between completion and cont.
        let (incoming, src_status) = tokio::join!(incoming, self.src.qmp.status());
        incoming?;
        let t_proved = completed_at.elapsed();
        let (src_running, src_status) = match src_status {
            Ok(s) => s,
            // A source that died after completing holds no vCPUs any more.
            Err(_) if self.src.pidfd.exited() => (false, "exited".to_string()),
            Err(e) => return Err(qmp_err("checking the source stopped")(e)),
        };
        if src_running {
            return Err(MigrationError::Unsafe(format!(
                "the source still runs vCPUs (status {src_status})"
            )));
        }
        dst.qmp
            .cont()
            .await
            .map_err(qmp_err("resuming the destination (cont)"))?;
        let overhead = completed_at.elapsed();
        tracing::debug!(
            entry_us = t_entry.as_micros() as u64,
            persisted_us = t_persisted.as_micros() as u64,
            proved_us = t_proved.as_micros() as u64,
            cont_us = overhead.as_micros() as u64,
            "finish timeline from the source's completion event"
        );
        self.test_pause("after").await;
        Ok(overhead)
    }
}

impl Agent {
    /// Can `target` run this domain as a migration destination? The target
    /// binary exists and answers QMP, provides the pinned machine type and
    /// the migration capabilities of the table. Nothing is started.
    pub(super) async fn preflight(
        &self,
        def: &Definition,
        target: &std::path::Path,
        src: &crate::instance::InstanceRecord,
    ) -> Result<Arc<crate::instance::probe::EmulatorInfo>, MigrationError> {
        let fail = |reason: String| MigrationError::Preflight {
            emulator: target.to_path_buf(),
            reason,
        };
        let info = self
            .probes
            .get(target)
            .await
            .map_err(|e| fail(error_chain(&e)))?;
        if !info.machines.iter().any(|m| m.name == def.machine) {
            return Err(fail(format!(
                "QEMU {} does not provide the domain's pinned machine type {}",
                info.version, def.machine
            )));
        }
        for cap in params::required_capabilities() {
            if !info.has_migration_capability(cap) {
                return Err(fail(format!(
                    "QEMU {} lacks migration capability {cap}",
                    info.version
                )));
            }
        }
        crate::migration::devices::preflight_disks(def, &src.disks).map_err(fail)?;
        self.check_qemu_access(def)
            .map_err(|e| fail(error_chain(&e)))?;
        Ok(info)
    }

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
        let verdict = self.preflight(&def, &target, &rec).await;
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
            reason: verdict.err().map(|e| error_chain(&e)),
        })
    }

    pub(super) async fn migrate(
        self: &Arc<Self>,
        name: &str,
        emulator: Option<PathBuf>,
        timeout: Duration,
    ) -> Result<api::Migrated, AgentError> {
        let t0 = Instant::now();
        let dom = self.lookup(name)?;
        // Begin: take the job under the domain lock.
        let (job, src, def) = {
            let mut st = dom.state.lock().await;
            if st.removed {
                return Err(crate::domain::TableError::NotFound(name.into()).into());
            }
            st.check_no_job(&dom.name)?;
            let src = match &st.run {
                Run::Running(i) => i.clone(),
                Run::ShutOff { .. } | Run::Unreachable { .. } => {
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
            let job = Arc::new(Job::migration_out(now_unix()));
            job.set_source_qmp(src.qmp.clone());
            st.job = Some(job.clone());
            (job, src, st.def.clone())
        };
        let agent = self.clone();
        let task_dom = dom.clone();
        let task_job = job.clone();
        let target = emulator.unwrap_or_else(|| def.emulator.clone());
        let handle = tokio::spawn(async move {
            agent
                .run_migration(task_dom, task_job, src, def, target, timeout, t0)
                .await
        });
        let res = handle.await.map_err(|e| AgentError::Io {
            what: "migration task".into(),
            source: std::io::Error::other(e.to_string()),
        });
        // Whatever happened, the job is over (a test pause never gets here).
        dom.state.lock().await.job = None;
        res?
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_migration(
        self: Arc<Self>,
        dom: Arc<Domain>,
        job: Arc<Job>,
        src: Arc<Instance>,
        def: Definition,
        target: PathBuf,
        timeout: Duration,
        t0: Instant,
    ) -> Result<api::Migrated, AgentError> {
        let path = job_path(&domain_run_dir(&self.cfg.run_dir, &dom.name));
        let src_was_running = src.qmp.status().await.map(|s| s.0).unwrap_or(true);
        let mut m = Mig {
            agent: self.clone(),
            dom: dom.clone(),
            job: job.clone(),
            def,
            src: src.clone(),
            target: target.clone(),
            file: JobFile {
                format: crate::migration::phase::FORMAT.into(),
                version: crate::migration::phase::VERSION,
                domain: dom.name.clone(),
                target_emulator: target,
                src_was_running,
                started_at: job.started_at,
                phase: Phase::Begin {
                    src: src.record.clone(),
                },
            },
            path,
            times: Times::default(),
            dst: None,
            dst_domid: None,
            dst_paths: None,
            hooks_ran: false,
        };
        let mig_err = |source| AgentError::Migration {
            name: dom.name.clone(),
            source,
        };
        // Begin
        let phase = Phase::Begin {
            src: src.record.clone(),
        };
        if let Err(e) = m.persist(phase) {
            return Err(mig_err(e));
        }
        m.test_pause("before").await;
        m.times.record(PhaseName::Begin, t0);
        m.test_pause("after").await;

        let result: Result<(Duration, Value), MigrationError> = async {
            let t = Instant::now();
            let dst_events = m.prepare().await?;
            m.times.record(PhaseName::Prepare, t);
            m.test_pause("after").await;

            let t = Instant::now();
            let completed_at = m.perform(timeout).await?;
            job.mark_switchover();
            m.times.record(PhaseName::Perform, t);
            m.test_pause("after").await;

            let t = Instant::now();
            let overhead = m.finish(dst_events, completed_at).await?;
            m.times.record(PhaseName::Finish, t);
            // Statistics only now: off the path between completion and cont.
            let stats = src
                .qmp
                .execute_raw("query-migrate", None)
                .await
                .unwrap_or(Value::Null);
            job.set_bytes(stats["ram"]["transferred"].as_u64().unwrap_or(0));
            Ok((overhead, stats))
        }
        .await;

        let (overhead, stats) = match result {
            Ok(v) => v,
            Err(e) => {
                // The cause goes in the message text too: journald shows fields
                // only with -o verbose.
                tracing::warn!(domain = %dom.name, "migration failed; keeping the source: {}", error_chain(&e));
                self.migration_failed(&mut m, src_was_running).await;
                return Err(mig_err(e));
            }
        };

        // Confirm (success): swap, then quit the source.
        let t = Instant::now();
        let next = m.file.phase.clone().confirm(Outcome::Success);
        if let Err(e) = m.persist(next) {
            // The destination runs the guest already; carry on regardless.
            tracing::error!(error = %error_chain(&e), "persisting Confirm");
        }
        m.test_pause("before").await;
        let dst = m.dst.clone().expect("destination exists after Finish");
        self.switch_to(&dom, &src, &dst).await;
        m.times.record(PhaseName::Confirm, t);
        m.test_pause("after").await;
        if let Err(e) = JobFile::remove(&m.path) {
            tracing::warn!(error = %e, "removing job file");
        }
        let total_ms = t0.elapsed().as_secs_f64() * 1e3;
        let side = |i: &Instance| api::InstanceSide {
            domid: i.domid(),
            pid: i.pid(),
            emulator: i.record.emulator.clone(),
            qemu_version: i.record.qemu_version.to_string(),
        };
        tracing::info!(domain = %dom.name, from = src.domid(), to = dst.domid(),
            downtime_ms = stats["downtime"].as_u64(), total_ms, "migrated");
        Ok(api::Migrated {
            result: api::MigrateResult::Success,
            name: dom.name.clone(),
            stats: api::MigrationStats {
                from: side(&src),
                to: side(&dst),
                phases_ms: m.times.phases(),
                qemu_downtime_ms: stats["downtime"].as_u64(),
                qemu_total_ms: stats["total-time"].as_u64(),
                bytes_sent: stats["ram"]["transferred"].as_u64(),
                completion_to_cont_us: overhead.as_micros() as u64,
                total_ms: (total_ms * 1000.0).round() / 1000.0,
            },
        })
    }

    /// The swap: the incoming instance leaves the remote table and becomes
    /// the domain's instance (status file rewritten), then the source quits
    /// and its paths go.
    pub(super) async fn switch_to(
        self: &Arc<Self>,
        dom: &Arc<Domain>,
        src: &Arc<Instance>,
        dst: &Arc<Instance>,
    ) {
        {
            let mut st = dom.state.lock().await;
            self.table().take_remote(&dom.name);
            if let Err(e) = self.write_status(&dom.name, &dst.record) {
                tracing::error!(error = %error_chain(&e), "writing status after swap");
            }
            st.run = Run::Running(dst.clone());
            // Moved to another binary: that is where the domain lives now.
            if st.def.emulator != dst.record.emulator {
                let mut def = st.def.clone();
                def.emulator = dst.record.emulator.clone();
                match self.store.save(&def) {
                    Ok(()) => st.def = def,
                    Err(e) => {
                        tracing::error!(error = %error_chain(&e), "recording the new emulator")
                    }
                }
            }
        }
        self.watch(dom, dst);
        src.set_exit_intent(format!("migrated to domid {}", dst.domid()));
        if let Err(e) = src.terminate(KILL_GRACE).await {
            tracing::error!(error = %error_chain(&e), "quitting the source after migration");
        }
    }

    /// Failure before the destination ran: kill it, release hooks, make sure
    /// the source runs as before. The source is untouched otherwise.
    async fn migration_failed(self: &Arc<Self>, m: &mut Mig, src_was_running: bool) {
        let next = m.file.phase.clone().confirm(Outcome::Failure);
        if let Err(e) = m.persist(next) {
            tracing::error!(error = %error_chain(&e), "persisting Confirm(failure)");
        }
        // The hook environment names the destination: take it first.
        let hook_env = m.hook_env();
        self.table().take_remote(&m.dom.name);
        if let Some(dst) = m.dst.take() {
            dst.kill("migration failed", KILL_GRACE).await;
        } else if let Some(p) = &m.dst_paths {
            instance::cleanup_paths(p);
        }
        if m.hooks_ran {
            hooks::release(&self.cfg.hooks_dir, &hook_env).await;
        }
        // The destination is dead: resuming the source is safe.
        if src_was_running {
            match m.src.qmp.status().await {
                Ok((false, status)) => {
                    tracing::info!(domain = %m.dom.name, %status, "resuming the source");
                    if let Err(e) = m.src.qmp.cont().await {
                        tracing::error!(error = %e, "resuming the source after a failed migration");
                    }
                }
                Ok((true, _)) => {}
                Err(e) => tracing::error!(error = %e, "source status after failed migration"),
            }
        }
        if let Err(e) = JobFile::remove(&m.path) {
            tracing::warn!(error = %e, "removing job file");
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
            phase: job.phase().as_str().into(),
            aborting: true,
        })
    }
}
