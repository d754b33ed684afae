//! The migration engine. [`migrate`] runs the five phases of
//! docs/migration.md top-down on one live [`State`]; [`recover`] finishes a
//! migration a killed agent left behind. Both end through [`resolve`]'s
//! `keep_source`, `switch_to_destination` or `crash`.
//!
//! The engine owns the flow and nothing else: it reaches the agent's tables,
//! allocator, probes and spawner through [`Host`], a handle on one domain.
//! The agent keeps the job lock, the API and the error mapping.
//!
//! ```text
//!  Begin    persist Begin
//!  Prepare  preflight; allocate a domid; persist Prepare; spawn the
//!           destination -S -incoming defer on the same memfd and taps;
//!           remote table; same disks; capabilities; prepare hooks;
//!           migrate-incoming
//!  Perform  persist Perform; migrate; wait for the source's MIGRATION event
//!           (completed: past switchover, abort refused from here)
//!  Finish   persist Finish; the destination loaded the state and the source
//!           is proven stopped; persist the intent to resume; cont
//!  Confirm  persist Confirm; swap the tables; quit the source; drop the job
//! ```
//! A failure before the intent to resume is on disk keeps the source; after
//! it, the guest belongs to the destination, and a destination that then
//! fails makes the domain crashed, never a resumed source.

// A failed step hands back the whole state (it owns what the failure path
// must clean up); that happens at most once per migration, so its size
// costs nothing worth a box.
#![allow(clippy::result_large_err)]

use super::copy;
use super::hooks::{self, HookEnv};
use super::job::{Job, TargetInfo};
use super::params::{self, Memory, Side};
use super::phase::{job_path, JobFile, Outcome, Phase, PhaseName};
use super::preflight::{self, PreflightError};
use super::recovery::{self, Decision, Observed};
use super::resolve::{self, Destination, Source, Switch};
use super::state::{Failed, State};
use super::MigrationError;
use crate::domain::{Definition, DefinitionError, TableError};
use crate::instance::domid::DomidError;
use crate::instance::paths::{domain_run_dir, InstancePaths};
use crate::instance::probe::{EmulatorInfo, ProbeError};
use crate::instance::process::ProcessError;
use crate::instance::{self, Instance, InstanceError, InstanceRecord};
use crate::qmp::{Qmp, QmpError, QmpEvent};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::broadcast;

/// Test-only: `<phase>:before|after` (and `finish:resume`, between the
/// persisted intent to resume and `cont`) makes the migration task stop
/// there, after writing `<run>/domains/<name>/test-paused`, so a test can
/// SIGKILL the agent.
pub const TEST_PAUSE_ENV: &str = "QLIVE_TEST_PAUSE_AT";
/// How long the destination may take to report the incoming state loaded
/// once the source completed.
const INCOMING_WAIT: Duration = Duration::from_secs(30);
/// How long recovery waits for an instance to be adopted (its QMP
/// greeting).
const ADOPT_WAIT: Duration = Duration::from_secs(10);
/// How long a post-copy under way (live, or found by recovery) may take to
/// send its last pages: it sends at full speed, seconds per GiB here. Not
/// the migration's `timeout_s`, which bounds pre-copy: a post-copy cut
/// short is a crash.
const POSTCOPY_WAIT: Duration = Duration::from_secs(600);

/// What the engine needs from the agent, for one domain.
pub trait Host: Send + Sync {
    fn name(&self) -> &str;
    fn run_dir(&self) -> &Path;
    fn hooks_dir(&self) -> &Path;
    /// The (cached) probe of an emulator binary.
    fn probe(
        &self,
        emulator: &Path,
    ) -> impl Future<Output = Result<Arc<EmulatorInfo>, ProbeError>> + Send;
    /// Can the QEMU user open every file the definition names?
    fn check_qemu_access(&self, def: &Definition) -> Result<(), DefinitionError>;
    fn allocate_domid(&self) -> Result<u64, DomidError>;
    fn observe_domid(&self, domid: u64);
    /// Spawn `def` paused with `-incoming defer` under `domid`, on the
    /// source's taps and, for [`Memory::Shared`], its guest RAM; a copy
    /// migration's destination gets new RAM as `def` describes it.
    fn spawn_destination(
        &self,
        def: &Definition,
        domid: u64,
        paths: InstancePaths,
        src: &Instance,
        info: &EmulatorInfo,
        memory: Memory,
    ) -> impl Future<Output = Result<Instance, MigrationError>> + Send;
    /// Put the incoming instance in the remote (shadow) table.
    fn insert_remote(&self, dst: Arc<Instance>) -> Result<(), TableError>;
    fn take_remote(&self);
    /// Make `inst` the domain's instance: out of the remote table, status
    /// file, definition's emulator, exit watcher. Idempotent. `false`: the
    /// instance has exited and was not committed.
    fn commit(&self, inst: &Arc<Instance>) -> impl Future<Output = bool> + Send;
    /// No instance is left and none may be started automatically: the
    /// domain is shut off with `reason`.
    fn lost(&self, reason: String) -> impl Future<Output = ()> + Send;
    /// The domain crashed during a migration; see [`resolve::crash`].
    fn crashed(&self, reason: String) -> impl Future<Output = ()> + Send;
    /// An instance may run the guest but cannot be talked to: the domain is
    /// left unreachable (the job file is kept for a later recovery).
    fn unreachable(
        &self,
        record: InstanceRecord,
        reason: String,
    ) -> impl Future<Output = ()> + Send;
    /// The stored definition (for the hook environment in recovery).
    fn definition(&self) -> impl Future<Output = Definition> + Send;
}

/// Preflight of `target` for this domain; see [`preflight`].
pub async fn preflight<H: Host>(
    host: &H,
    def: &Definition,
    target: &Path,
    src: &InstanceRecord,
) -> Result<preflight::Passed, MigrationError> {
    let fail = |source| MigrationError::Preflight {
        emulator: target.to_path_buf(),
        source,
    };
    let info = host
        .probe(target)
        .await
        .map_err(|e| fail(PreflightError::Probe(e)))?;
    preflight::check(&info, def, src).map_err(fail)?;
    host.check_qemu_access(def)
        .map_err(|e| fail(PreflightError::QemuAccess(e)))?;
    Ok(info)
}

/// One migration to start.
pub struct Request {
    pub job: Arc<Job>,
    pub src: Arc<Instance>,
    pub def: Definition,
    pub target: PathBuf,
    pub timeout: Duration,
    /// When the client's request arrived.
    pub started: Instant,
    pub memory: Memory,
}

/// One side of a finished migration.
#[derive(Debug, Clone)]
pub struct SideReport {
    pub domid: u64,
    pub pid: i32,
    pub emulator: PathBuf,
    pub qemu_version: String,
}

impl SideReport {
    fn of(i: &Instance) -> SideReport {
        SideReport {
            domid: i.domid(),
            pid: i.pid(),
            emulator: i.record.emulator.clone(),
            qemu_version: i.record.qemu_version.to_string(),
        }
    }
}

/// Wall time per phase, in ms (null for a phase not reached).
#[derive(Debug, Clone, Default)]
pub struct PhaseTimes {
    pub begin: Option<f64>,
    pub prepare: Option<f64>,
    pub perform: Option<f64>,
    pub finish: Option<f64>,
    pub confirm: Option<f64>,
}

impl PhaseTimes {
    fn record(&mut self, p: PhaseName, since: Instant) {
        let ms = (since.elapsed().as_secs_f64() * 1e6).round() / 1000.0;
        let slot = match p {
            PhaseName::Begin => &mut self.begin,
            PhaseName::Prepare => &mut self.prepare,
            PhaseName::Perform => &mut self.perform,
            PhaseName::Finish => &mut self.finish,
            PhaseName::Confirm => &mut self.confirm,
        };
        *slot = Some(ms);
    }
}

/// A successful migration (the agent answers `migrate` with it).
#[derive(Debug, Clone)]
pub struct Report {
    pub name: String,
    pub from: SideReport,
    pub to: SideReport,
    pub phases_ms: PhaseTimes,
    pub qemu_downtime_ms: Option<u64>,
    pub qemu_total_ms: Option<u64>,
    pub bytes_sent: Option<u64>,
    /// From the source's completion event to the destination's `cont`
    /// reply: what qlive adds to QEMU's own downtime.
    pub completion_to_cont_us: u64,
    pub total_ms: f64,
    /// Guest RAM was copied (not shared).
    pub copied: bool,
    /// A copy migration switched over by post-copy.
    pub postcopy: bool,
    /// A copy migration's pre-copy passes (QEMU's dirty-sync-count when
    /// post-copy started or the migration completed).
    pub precopy_passes: Option<u64>,
}

/// Live-migrate the domain's running instance `req.src` to a new QEMU of
/// `req.target` on the same host.
pub async fn migrate<H: Host>(host: &H, req: Request) -> Result<Report, MigrationError> {
    let src_was_running = req.src.qmp.status().await.map(|s| s.0).unwrap_or(true);
    let mut m = Migration {
        host,
        file: JobFile {
            format: super::phase::FORMAT.into(),
            version: super::phase::version_for(req.memory),
            domain: host.name().to_string(),
            target_emulator: req.target.clone(),
            src_was_running,
            started_at: req.job.started_at,
            memory: req.memory,
            phase: Phase::Begin {
                src: req.src.record.clone(),
            },
        },
        path: job_path(&domain_run_dir(host.run_dir(), host.name())),
        req,
        times: PhaseTimes::default(),
        postcopy: false,
        passes: None,
    };

    // Begin
    m.persist(&State::Begun)?;
    m.test_pause("before").await;
    m.times.record(PhaseName::Begin, m.req.started);
    m.test_pause("after").await;

    let resumed = async {
        let st = m.prepare(State::Begun).await?;
        let st = m.perform(st).await?;
        m.finish(st).await
    }
    .await;
    match resumed {
        Ok((dst, overhead)) => m.confirm(dst, overhead).await,
        Err(f) => Err(m.failed(f).await),
    }
}

struct Migration<'h, H: Host> {
    host: &'h H,
    req: Request,
    file: JobFile,
    path: PathBuf,
    times: PhaseTimes,
    /// `migrate-start-postcopy` may have been sent (persisted from then on).
    postcopy: bool,
    /// The sync count when post-copy started.
    passes: Option<u64>,
}

/// How long the source gets to read the frames its queues hold once the
/// taps steer to the destination (normally under a millisecond).
const DRAIN_TIMEOUT: Duration = Duration::from_millis(250);

fn qmp_err(what: &'static str) -> impl FnOnce(QmpError) -> MigrationError {
    move |source| MigrationError::Qmp { what, source }
}

/// `Err(Failed { state, error })` from an expression's error.
macro_rules! attempt {
    ($st:ident, $e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => return Err(Failed::new($st, e.into())),
        }
    };
}

impl<H: Host> Migration<'_, H> {
    /// Persist what `st` derives (atomic write, fsync) before acting on it.
    fn persist(&mut self, st: &State) -> Result<(), MigrationError> {
        let mut phase = st.persisted(&self.req.src.record);
        phase.set_postcopy(self.postcopy);
        self.write(phase)?;
        self.req.job.set_phase(st.phase_name());
        Ok(())
    }

    fn write(&mut self, phase: Phase) -> Result<(), MigrationError> {
        self.file.phase = phase;
        self.file
            .save(&self.path)
            .map_err(|source| MigrationError::Persist {
                path: self.path.clone(),
                source,
            })
    }

    /// Persist Confirm(crashed): the record that keeps the domain crashed.
    fn record_crash(&mut self, reason: &str) {
        let next = self
            .file
            .phase
            .confirm(Outcome::Crashed, Some(reason.to_string()));
        if let Err(e) = self.write(next) {
            tracing::error!("persisting Confirm(crashed): {}", crate::error::chain(&e));
        }
    }

    /// Test-only stop point; see [`TEST_PAUSE_ENV`].
    async fn test_pause(&self, when: &str) {
        let Ok(want) = std::env::var(TEST_PAUSE_ENV) else {
            return;
        };
        let here = format!("{}:{when}", self.file.phase.name());
        if want == here {
            let marker = domain_run_dir(self.host.run_dir(), self.host.name()).join("test-paused");
            tracing::warn!(at = %here, "test pause: migration task stops here");
            let _ = std::fs::write(&marker, &here);
            std::future::pending::<()>().await;
        }
    }

    fn hook_env(&self, st: &State) -> HookEnv {
        HookEnv {
            domain: self.host.name().to_string(),
            src_domid: self.req.src.domid(),
            dst_domid: st.dst_slot().map(|(d, _)| d).unwrap_or(0),
            dst_pid: st.dst().map(|d| d.pid()),
            emulator: self.req.target.clone(),
            nics: hooks::nics_of(&self.req.def),
        }
    }

    /// Prepare: preflight the target, spawn the destination paused with
    /// `-incoming defer` on the same memfd, remote table, capabilities,
    /// hooks, `migrate-incoming`.
    async fn prepare(&mut self, st: State) -> Result<State, Failed> {
        let t = Instant::now();
        let src = self.req.src.clone();
        let info = attempt!(
            st,
            preflight(self.host, &self.req.def, &self.req.target, &src.record).await
        );
        let domid = attempt!(
            st,
            self.host
                .allocate_domid()
                .map_err(MigrationError::AllocateDomid)
        );
        let paths = InstancePaths::new(self.host.run_dir(), self.host.name(), domid);
        let st = st.allocate(domid, paths.clone())?;
        attempt!(st, self.persist(&st));
        self.test_pause("before").await;

        let mut dst_def = self.req.def.clone();
        dst_def.emulator = self.req.target.clone();
        let dst = attempt!(
            st,
            self.host
                .spawn_destination(&dst_def, domid, paths, &src, &info, self.req.memory)
                .await
        );
        let dst = Arc::new(dst);
        self.req.job.set_target(TargetInfo {
            domid,
            pid: Some(dst.pid()),
            emulator: self.req.target.clone(),
        });
        let st = st.spawned(dst.clone())?;
        attempt!(
            st,
            self.host
                .insert_remote(dst.clone())
                .map_err(MigrationError::RemoteTaken)
        );
        attempt!(
            st,
            super::devices::same_disks(&src.record.disks, &dst.record.disks)
                .map_err(MigrationError::DisksDiffer)
        );
        let memory = self.req.memory;
        attempt!(
            st,
            params::apply(&src.qmp, Side::Source, memory)
                .await
                .map_err(qmp_err("setting migration capabilities on the source"))
        );
        let on_dst = params::apply(&dst.qmp, Side::Destination, memory).await;
        let on_dst = match (on_dst, memory) {
            // The destination cannot do post-copy (QEMU checks userfaultfd
            // when the capability is set on the incoming side): `auto`
            // falls back to pre-copy only, on both sides; `always` fails.
            (
                Err(e),
                Memory::Copy {
                    postcopy: params::Postcopy::Auto,
                },
            ) => {
                tracing::warn!(
                    domain = %self.host.name(),
                    "the destination cannot do post-copy ({}); pre-copy only",
                    crate::error::chain(&e)
                );
                let never = Memory::Copy {
                    postcopy: params::Postcopy::Never,
                };
                self.req.memory = never;
                self.file.memory = never;
                match params::apply(&src.qmp, Side::Source, never).await {
                    Ok(()) => params::apply(&dst.qmp, Side::Destination, never).await,
                    Err(e) => Err(e),
                }
            }
            (
                Err(e),
                Memory::Copy {
                    postcopy: params::Postcopy::Always,
                },
            ) => return Err(Failed::new(st, MigrationError::PostcopyUnavailable(e))),
            (r, _) => r,
        };
        attempt!(
            st,
            on_dst.map_err(qmp_err("setting migration capabilities on the destination"))
        );
        if !memory.is_shared() {
            attempt!(
                st,
                params::apply_copy_parameters(&src.qmp)
                    .await
                    .map_err(qmp_err("setting the copy's bandwidth on the source"))
            );
        }
        attempt!(
            st,
            params::apply_test_parameters(&src.qmp)
                .await
                .map_err(qmp_err("setting test parameters"))
        );
        let st = st.hooks()?;
        let env = self.hook_env(&st);
        attempt!(st, hooks::prepare(self.host.hooks_dir(), &env).await);

        let events = dst.qmp.subscribe();
        let uri = format!("unix:{}", dst.record.paths.migrate.display());
        attempt!(
            st,
            dst.qmp
                .execute(qapi::qmp::migrate_incoming {
                    uri: Some(uri),
                    channels: None,
                    exit_on_error: None,
                })
                .await
                .map_err(qmp_err("migrate-incoming on the destination"))
        );
        let st = st.listening(events)?;
        self.times.record(PhaseName::Prepare, t);
        self.test_pause("after").await;
        Ok(st)
    }

    /// Perform: `migrate` on the source, then wait for its MIGRATION event.
    async fn perform(&mut self, st: State) -> Result<State, Failed> {
        let t = Instant::now();
        let st = st.perform()?;
        attempt!(st, self.persist(&st));
        self.test_pause("before").await;
        if self.req.job.cancel.is_cancelled() {
            return Err(Failed::new(st, MigrationError::Aborted));
        }
        let Some(dst) = st.dst().cloned() else {
            return Err(Failed::new(
                st,
                MigrationError::Transition {
                    from: "performing",
                    step: "migrate",
                },
            ));
        };
        let src = self.req.src.clone();
        let mut events = src.qmp.subscribe();
        let uri = format!("unix:{}", dst.record.paths.migrate.display());
        // The taps' frames go to the destination's queues from here on,
        // and the source reads what its queues still hold while its guest
        // runs: when its vCPUs stop there is nothing left for it to take
        // (a stopped QEMU still reads one frame, and drops it when it
        // quits). A failure from here gives the traffic back
        // (`resolve::keep_source`).
        let t_steer = Instant::now();
        let drained = attempt!(
            st,
            dst.receive_from_now(DRAIN_TIMEOUT)
                .await
                .map_err(MigrationError::Steering)
        );
        tracing::debug!(
            drained,
            steer_us = t_steer.elapsed().as_micros() as u64,
            "taps steered to the destination"
        );
        attempt!(
            st,
            src.qmp
                .execute(qapi::qmp::migrate {
                    uri: Some(uri),
                    channels: None,
                    detach: None,
                    resume: None,
                })
                .await
                .map_err(qmp_err("migrate on the source"))
        );
        let rule = match self.req.memory {
            Memory::Copy { postcopy } => Some(copy::Rule::new(postcopy)).filter(|r| r.armed()),
            Memory::Shared => None,
        };
        let Migration {
            file,
            path,
            req,
            postcopy,
            passes,
            ..
        } = self;
        // Persisted before `migrate-start-postcopy` is sent.
        let intent = |at: u64| -> Result<(), MigrationError> {
            file.phase.set_postcopy(true);
            *postcopy = true;
            *passes = Some(at);
            file.save(path).map_err(|source| MigrationError::Persist {
                path: path.clone(),
                source,
            })
        };
        let watch = rule.map(|rule| PostcopyWatch { rule, intent });
        let completed = wait_outgoing(&src.qmp, &mut events, &req.job, req.timeout, watch);
        let at = attempt!(st, completed.await);
        self.req.job.mark_switchover();
        let st = st.completed(at)?;
        self.times.record(PhaseName::Perform, t);
        self.test_pause("after").await;
        Ok(st)
    }

    /// Finish: the destination loaded the state, the source is proven
    /// stopped, the intent to resume is on disk, `cont`.
    async fn finish(&mut self, st: State) -> Result<(Arc<Instance>, Duration), Failed> {
        let t = Instant::now();
        attempt!(st, self.persist(&st));
        self.test_pause("before").await;
        let (dst, mut events, at) = st.into_completed()?;
        let src = self.req.src.clone();
        let src_exited = || src.pidfd.exited();
        let postcopy = self.postcopy;
        // The persisted intent: written before `cont` is sent.
        let intent = |file: &mut JobFile, path: &Path| -> Result<(), MigrationError> {
            file.phase = Phase::Finish {
                src: src.record.clone(),
                dst: dst.record.clone(),
                resume_sent: true,
                postcopy,
            };
            file.save(path).map_err(|source| MigrationError::Persist {
                path: path.to_path_buf(),
                source,
            })
        };
        let path = self.path.clone();
        let file = &mut self.file;
        let pause = std::env::var(TEST_PAUSE_ENV).ok().as_deref() == Some("finish:resume");
        let marker = domain_run_dir(self.host.run_dir(), self.host.name()).join("test-paused");
        let dst_exited = || dst.pidfd.exited();
        // The taps change hands with the guest: from right before `cont`
        // the destination's tap ioctls run, the source's do not.
        let hand_over = |to_dst: bool| {
            src.set_tap_owner(!to_dst);
            dst.set_tap_owner(to_dst);
        };
        let resumed = resume_destination(
            &src.qmp,
            src_exited,
            &dst.qmp,
            dst_exited,
            &mut events,
            postcopy,
            || intent(file, &path),
            || {
                hand_over(true);
                async move {
                    if pause {
                        tracing::warn!("test pause: migration task stops at finish:resume");
                        let _ = std::fs::write(&marker, "finish:resume");
                        std::future::pending::<()>().await;
                    }
                }
            },
        )
        .await;
        if let Err(Resume::NotResumed(_)) = &resumed {
            // The destination did not run: the source keeps the guest.
            hand_over(false);
        }
        let st = State::Completed { dst, events, at };
        let st = match resumed {
            Ok(()) => st.resuming()?.resumed()?,
            Err(Resume::NotResumed(e)) => return Err(Failed::new(st, e)),
            Err(Resume::MayHaveRun(e) | Resume::Unanswered(e)) => {
                return Err(Failed::new(st.resuming()?, e))
            }
        };
        let overhead = at.elapsed();
        tracing::debug!(
            cont_us = overhead.as_micros() as u64,
            "from the source's completion event to cont"
        );
        // Post-copy: the guest runs on the destination, which fetches
        // the pages it lacks from the source until the source is done.
        if postcopy {
            self.test_pause("postcopy").await;
            let done = wait_postcopy_done(&src.qmp, POSTCOPY_WAIT).await;
            attempt!(st, done);
        }
        self.times.record(PhaseName::Finish, t);
        self.test_pause("after").await;
        match st {
            State::Resumed { dst } => Ok((dst, overhead)),
            other => Err(Failed::new(
                other,
                MigrationError::Transition {
                    from: "resumed",
                    step: "confirm",
                },
            )),
        }
    }

    /// Confirm (success): persist, swap, quit the source, drop the job.
    async fn confirm(
        &mut self,
        dst: Arc<Instance>,
        overhead: Duration,
    ) -> Result<Report, MigrationError> {
        let t = Instant::now();
        // Statistics only now: off the path between completion and cont.
        let src = self.req.src.clone();
        let stats = src
            .qmp
            .execute_raw("query-migrate", None)
            .await
            .unwrap_or(serde_json::Value::Null);
        self.req
            .job
            .set_bytes(stats["ram"]["transferred"].as_u64().unwrap_or(0));
        let next = self.file.phase.confirm(Outcome::Success, None);
        if let Err(e) = self.write(next) {
            // The destination runs the guest already; carry on regardless.
            tracing::error!("persisting Confirm: {}", crate::error::chain(&e));
        }
        self.req.job.set_phase(PhaseName::Confirm);
        self.test_pause("before").await;
        if !resolve::switch_to_destination(self.host, Source::Held(src.clone()), &dst, Switch::Live)
            .await
        {
            let reason = "the destination QEMU died right after it was resumed".to_string();
            self.record_crash(&reason);
            return Err(MigrationError::Crashed { detail: reason });
        }
        self.times.record(PhaseName::Confirm, t);
        self.test_pause("after").await;
        if let Err(e) = JobFile::remove(&self.path) {
            tracing::warn!("removing the job file: {}", crate::error::chain(&e));
        }
        let total_ms = (self.req.started.elapsed().as_secs_f64() * 1e6).round() / 1000.0;
        tracing::info!(
            domain = %self.host.name(),
            from = src.domid(),
            to = dst.domid(),
            downtime_ms = stats["downtime"].as_u64(),
            total_ms,
            "migrated"
        );
        Ok(Report {
            name: self.host.name().to_string(),
            from: SideReport::of(&src),
            to: SideReport::of(&dst),
            phases_ms: self.times.clone(),
            qemu_downtime_ms: stats["downtime"].as_u64(),
            qemu_total_ms: stats["total-time"].as_u64(),
            bytes_sent: stats["ram"]["transferred"].as_u64(),
            completion_to_cont_us: overhead.as_micros() as u64,
            total_ms,
            copied: !self.req.memory.is_shared(),
            postcopy: self.postcopy,
            precopy_passes: (!self.req.memory.is_shared())
                .then(|| self.passes.or(stats["ram"]["dirty-sync-count"].as_u64()))
                .flatten(),
        })
    }

    /// The failure path: keep the source while the destination never ran;
    /// once it may have run, the domain crashed.
    async fn failed(&mut self, f: Failed) -> MigrationError {
        let Failed { state, error } = f;
        let hooks = state.hooks_may_have_run().then(|| self.hook_env(&state));
        let dst = state.dst().cloned();
        if let (MigrationError::ContUnanswered { detail }, Some(d)) = (&error, &dst) {
            // A destination that closes its QMP connection as it dies is
            // still alive for a moment: give it that moment.
            let gone = tokio::time::timeout(Duration::from_secs(2), d.pidfd.wait_exit())
                .await
                .is_ok();
            if !gone {
                // Alive, and whether it runs the guest is unknown. Nothing is
                // killed or resumed on a guess: the job file (Finish with the
                // intent) stays, and the recovery rules decide at the next
                // agent start, on fresh QMP connections (a QEMU monitor
                // serves one client at a time, so not from here).
                self.host.take_remote();
                let reason = format!(
                    "the destination QEMU (domid {}, pid {}) did not answer `cont` ({detail}); \
                     restart the agent (systemctl restart qlive) and the recovery rules decide \
                     which QEMU keeps the guest",
                    d.domid(),
                    d.pid()
                );
                self.host
                    .unreachable(self.req.src.record.clone(), reason)
                    .await;
                return error;
            }
        }
        if state.destination_may_have_run() {
            let reason = crate::error::chain(&error);
            self.record_crash(&reason);
            let paths: Vec<&InstancePaths> = state.dst_slot().map(|(_, p)| p).into_iter().collect();
            let instances = dst.into_iter().chain([self.req.src.clone()]).collect();
            resolve::crash(self.host, instances, paths, hooks, reason).await;
            return error;
        }
        // The cause goes in the message text too: journald shows fields only
        // with -o verbose.
        tracing::warn!(
            domain = %self.host.name(),
            state = state.label(),
            "migration failed; keeping the source: {}",
            crate::error::chain(&error)
        );
        let next = self.file.phase.confirm(Outcome::Failure, None);
        if let Err(e) = self.write(next) {
            tracing::error!("persisting Confirm(failure): {}", crate::error::chain(&e));
        }
        // Abort and timeout cancelled already. A post-copy that began
        // (and whose destination never ran) is still in flight too.
        let cancel = (matches!(state, State::Performing { .. }) || self.postcopy)
            && !matches!(
                error,
                MigrationError::Aborted | MigrationError::Timeout { .. }
            );
        resolve::keep_source(
            self.host,
            &self.req.src,
            Destination {
                instance: dst,
                paths: state.dst_slot().map(|(_, p)| p),
                hooks,
            },
            self.file.src_was_running,
            cancel,
        )
        .await;
        if let Err(e) = JobFile::remove(&self.path) {
            tracing::warn!("removing the job file: {}", crate::error::chain(&e));
        }
        error
    }
}

/// A copy migration's post-copy switch: the rule, and the persisted intent
/// (called with the sync count just before `migrate-start-postcopy`).
pub struct PostcopyWatch<F> {
    pub rule: copy::Rule,
    pub intent: F,
}

/// Wait for the source's MIGRATION event: `completed` (or, once post-copy
/// was started, `postcopy-active`) returns the instant it arrived; abort
/// and timeout cancel the migration first. With `watch`, the source's
/// progress is read every [`copy::POLL`] and post-copy started when the
/// rule says so; abort is refused from then on.
async fn wait_outgoing<F>(
    src: &Qmp,
    events: &mut broadcast::Receiver<QmpEvent>,
    job: &Job,
    timeout: Duration,
    mut watch: Option<PostcopyWatch<F>>,
) -> Result<Instant, MigrationError>
where
    F: FnMut(u64) -> Result<(), MigrationError>,
{
    // A timeout too large to add is no timeout.
    let deadline = tokio::time::Instant::now().checked_add(timeout);
    let expired = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(expired);
    let mut tick = tokio::time::interval(copy::POLL);
    let mut postcopy = false;
    let failed = |v: &serde_json::Value, status: &str| MigrationError::Failed {
        status: status.to_string(),
        detail: v["error-desc"]
            .as_str()
            .unwrap_or("QEMU gave no reason")
            .to_string(),
    };
    loop {
        // biased: a completion that raced an abort wins (the switchover
        // happened; abort is refused from then on).
        tokio::select! {
            biased;
            ev = events.recv() => match ev {
                Ok(ev) if ev.name == "MIGRATION" => {
                    let status = ev.data["status"].as_str().unwrap_or("").to_string();
                    match status.as_str() {
                        "completed" => return Ok(Instant::now()),
                        "postcopy-active" if postcopy => return Ok(Instant::now()),
                        "failed" | "cancelled" => {
                            let v = src.execute_raw("query-migrate", None).await
                                .unwrap_or(serde_json::Value::Null);
                            return Err(failed(&v, &status));
                        }
                        _ => {}
                    }
                }
                Ok(_) => {}
                // Events were dropped: ask for the status instead.
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let v = src.execute_raw("query-migrate", None).await
                        .map_err(qmp_err("query-migrate on the source"))?;
                    match v["status"].as_str() {
                        Some("completed") => return Ok(Instant::now()),
                        Some("postcopy-active") if postcopy => return Ok(Instant::now()),
                        Some(s @ ("failed" | "cancelled")) => return Err(failed(&v, s)),
                        _ => {}
                    }
                }
                Err(broadcast::error::RecvError::Closed) => {
                    return Err(MigrationError::Failed {
                        status: "failed".into(),
                        detail: "lost the source's QMP connection".into(),
                    });
                }
            },
            _ = job.cancel.cancelled(), if !postcopy => {
                super::cancel_outgoing(src).await;
                return Err(MigrationError::Aborted);
            }
            _ = &mut expired, if !postcopy => {
                super::cancel_outgoing(src).await;
                return Err(MigrationError::Timeout { secs: timeout.as_secs() });
            }
            _ = tick.tick(), if watch.is_some() && !postcopy => {
                let Some(w) = watch.as_mut() else { continue };
                let v = src.execute_raw("query-migrate", None).await
                    .map_err(qmp_err("query-migrate on the source"))?;
                let Some(p) = copy::Progress::of(&v) else { continue };
                tracing::debug!(syncs = p.syncs, remaining = p.remaining, "copy progress");
                if !w.rule.observe(p) {
                    continue;
                }
                (w.intent)(p.syncs)?;
                job.mark_switchover();
                postcopy = true;
                tracing::info!(passes = p.syncs, remaining = p.remaining, "starting post-copy");
                if let Err(e) = src.execute_raw("migrate-start-postcopy", None).await {
                    // Pre-copy may have completed meanwhile: its event
                    // follows. Anything else is a failure.
                    let v = src.execute_raw("query-migrate", None).await
                        .unwrap_or(serde_json::Value::Null);
                    if !matches!(v["status"].as_str(), Some("completed" | "device" | "postcopy-active")) {
                        return Err(qmp_err("migrate-start-postcopy on the source")(e));
                    }
                }
            }
        }
    }
}

/// After a post-copy switchover: wait for the source's `completed` (the
/// destination has every page). The guest runs on the destination by
/// now; a failure here is a crash.
async fn wait_postcopy_done(src: &Qmp, timeout: Duration) -> Result<(), MigrationError> {
    let mut events = src.subscribe();
    let status = |v: &serde_json::Value| v["status"].as_str().unwrap_or("").to_string();
    let v = src
        .execute_raw("query-migrate", None)
        .await
        .map_err(qmp_err("query-migrate on the source"))?;
    let ended = |s: &str, v: &serde_json::Value| -> Option<Result<(), MigrationError>> {
        match s {
            "completed" => Some(Ok(())),
            "failed" | "cancelled" | "postcopy-paused" => Some(Err(MigrationError::Failed {
                status: s.to_string(),
                detail: format!(
                    "post-copy did not complete: {}",
                    v["error-desc"].as_str().unwrap_or("QEMU gave no reason")
                ),
            })),
            _ => None,
        }
    };
    if let Some(r) = ended(&status(&v), &v) {
        return r;
    }
    let wait = async {
        loop {
            match events.recv().await {
                Ok(ev) if ev.name == "MIGRATION" => {
                    let s = ev.data["status"].as_str().unwrap_or("").to_string();
                    if s == "completed" {
                        return Ok(());
                    }
                    if ended(&s, &serde_json::Value::Null).is_some() {
                        let v = src
                            .execute_raw("query-migrate", None)
                            .await
                            .unwrap_or(serde_json::Value::Null);
                        if let Some(r) = ended(&s, &v) {
                            return r;
                        }
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let v = src
                        .execute_raw("query-migrate", None)
                        .await
                        .map_err(qmp_err("query-migrate on the source"))?;
                    if let Some(r) = ended(&status(&v), &v) {
                        return r;
                    }
                }
                Err(broadcast::error::RecvError::Closed) => {
                    return Err(MigrationError::Failed {
                        status: "failed".into(),
                        detail: "post-copy did not complete: lost the source's QMP connection"
                            .into(),
                    })
                }
            }
        }
    };
    tokio::time::timeout(timeout, wait)
        .await
        .map_err(|_| MigrationError::Failed {
            status: "failed".into(),
            detail: format!("post-copy did not complete within {} s", timeout.as_secs()),
        })?
}

/// Why the destination was not resumed.
#[derive(Debug)]
pub enum Resume {
    /// `cont` was provably never executed: the source may be kept.
    NotResumed(MigrationError),
    /// `cont` may have run and the destination is gone: it may have run
    /// the guest and died.
    MayHaveRun(MigrationError),
    /// `cont` may have run and the destination is alive, but its answer was
    /// lost: what happened is decided by observation, as after an agent
    /// kill (the recovery rules).
    Unanswered(MigrationError),
}

/// The last step of the switchover, on the destination. In order:
/// 1. its incoming side reported `completed` (its MIGRATION event, or
///    `query-migrate` when events were lost), while in parallel the source
///    is asked whether its vCPUs still run: the safety invariant is proven
///    before `cont`, not assumed;
/// 2. `intent` persists that `cont` is about to be sent; if that fails,
///    nothing is sent;
/// 3. `cont`. Only an error *answer* from QEMU, or a command that could
///    not be written, proves it did not run; a lost answer may mean the
///    guest runs there.
#[allow(clippy::too_many_arguments)]
pub async fn resume_destination<P, F>(
    src: &Qmp,
    src_exited: impl Fn() -> bool,
    dst: &Qmp,
    dst_exited: impl Fn() -> bool,
    events: &mut broadcast::Receiver<QmpEvent>,
    postcopy: bool,
    intent: impl FnOnce() -> Result<(), MigrationError>,
    before_cont: P,
) -> Result<(), Resume>
where
    P: FnOnce() -> F,
    F: Future<Output = ()>,
{
    let incoming = async {
        tokio::time::timeout(INCOMING_WAIT, wait_incoming(dst, events, postcopy))
            .await
            .map_err(|_| MigrationError::Failed {
                status: "failed".into(),
                detail: format!(
                    "the destination did not report completion within {} s",
                    INCOMING_WAIT.as_secs()
                ),
            })?
    };
    // The proof that the source stopped is asked for while the destination
    // finishes loading, so it costs no time between completion and cont.
    let (incoming, src_status) = tokio::join!(incoming, src.status());
    incoming.map_err(Resume::NotResumed)?;
    match src_status {
        Ok((true, status)) => {
            return Err(Resume::NotResumed(MigrationError::SourceRunning { status }))
        }
        // A post-copy source that died took the pages the destination
        // lacks with it: the destination must not run.
        _ if postcopy && src_exited() => {
            return Err(Resume::NotResumed(MigrationError::Failed {
                status: "failed".into(),
                detail: "the source QEMU died during post-copy, before the destination ran".into(),
            }))
        }
        Ok((false, _)) => {}
        // A source that died after completing holds no vCPUs any more.
        Err(_) if src_exited() => {}
        Err(e) => {
            return Err(Resume::NotResumed(qmp_err("checking the source stopped")(
                e,
            )))
        }
    }
    intent().map_err(Resume::NotResumed)?;
    before_cont().await;
    match dst.cont().await {
        // An answer that does not decode is still an answer: cont ran.
        Ok(()) | Err(QmpError::Decode { .. }) => Ok(()),
        // QEMU answered with an error: it did not run. (A failed write may
        // still have delivered the whole command: that is a lost answer.)
        Err(e @ QmpError::Command { .. }) => Err(Resume::NotResumed(qmp_err(
            "resuming the destination (cont)",
        )(e))),
        Err(e) if dst_exited() => Err(Resume::MayHaveRun(MigrationError::Crashed {
            detail: format!("cont: {}", crate::error::chain(&e)),
        })),
        Err(e) => Err(Resume::Unanswered(MigrationError::ContUnanswered {
            detail: crate::error::chain(&e),
        })),
    }
}

/// The destination's own MIGRATION `completed` (usually already queued);
/// after a post-copy switchover, `postcopy-active` (the destination
/// listens for pages; a `cont` sent before it loaded the device state
/// makes it run as soon as it has).
async fn wait_incoming(
    dst: &Qmp,
    events: &mut broadcast::Receiver<QmpEvent>,
    postcopy: bool,
) -> Result<(), MigrationError> {
    let failed = |s: &str| MigrationError::Failed {
        status: s.to_string(),
        detail: "the destination could not load the incoming state".into(),
    };
    loop {
        match events.recv().await {
            Ok(ev) if ev.name == "MIGRATION" => match ev.data["status"].as_str() {
                Some("completed") => return Ok(()),
                Some("postcopy-active") if postcopy => return Ok(()),
                Some(s @ ("failed" | "cancelled")) => return Err(failed(s)),
                _ => {}
            },
            Ok(_) => {}
            // Events were dropped: the event we wait for may be among them.
            Err(broadcast::error::RecvError::Lagged(_)) => {
                let v = dst
                    .execute_raw("query-migrate", None)
                    .await
                    .map_err(qmp_err("query-migrate on the destination"))?;
                match v["status"].as_str() {
                    Some("completed") => return Ok(()),
                    Some("postcopy-active") if postcopy => return Ok(()),
                    Some(s @ ("failed" | "cancelled")) => return Err(failed(s)),
                    _ => {}
                }
            }
            Err(broadcast::error::RecvError::Closed) => {
                return Err(MigrationError::Failed {
                    status: "failed".into(),
                    detail: "the destination QEMU went away".into(),
                })
            }
        }
    }
}

/// What recovery found: which instance directories the startup sweep
/// must leave alone.
pub enum Recovered {
    /// This domid runs the guest.
    Domid(u64),
    /// No instance runs the guest.
    Nothing,
    /// Unknown: an instance lives but could not be talked to; the job file
    /// is kept so a later start retries, and nothing is swept.
    LeaveAlone {
        src: Box<InstanceRecord>,
        reason: String,
    },
}

/// Adopt an instance from a record: `Ok(None)` if it is gone (or its pid
/// is another process now), `Err` if it is alive but cannot be adopted.
async fn try_adopt(rec: &InstanceRecord, owner: bool) -> Result<Option<Arc<Instance>>, String> {
    // A QEMU whose main loop waits for a page that never comes (post-copy
    // whose source died) never greets on QMP: bounded, so the agent
    // starts anyway.
    let Ok(adopted) = tokio::time::timeout(ADOPT_WAIT, instance::adopt(rec.clone(), owner)).await
    else {
        return Err(format!(
            "QEMU (domid {}, pid {}) runs but did not greet on QMP within {} s",
            rec.domid,
            rec.process.pid,
            ADOPT_WAIT.as_secs()
        ));
    };
    match adopted {
        Ok(i) => Ok(Some(Arc::new(i))),
        Err(InstanceError::Process(ProcessError::Gone { .. } | ProcessError::Reused { .. })) => {
            Ok(None)
        }
        Err(e) => Err(format!(
            "QEMU (domid {}, pid {}) runs but could not be adopted: {}",
            rec.domid,
            rec.process.pid,
            crate::error::chain(&e)
        )),
    }
}

/// The recorded process is gone (or its pid is another process now).
fn source_gone(rec: &InstanceRecord) -> bool {
    matches!(
        crate::instance::process::Pidfd::adopt(&rec.process),
        Err(ProcessError::Gone { .. } | ProcessError::Reused { .. })
    )
}

/// (alive, vCPUs running, query-migrate status) of one instance; `Err`
/// when it is alive but does not say whether its vCPUs run: "not known to
/// run" is never taken for "stopped".
async fn observe_one(i: Option<&Arc<Instance>>) -> Result<(bool, bool, Option<String>), String> {
    let Some(i) = i else {
        return Ok((false, false, None));
    };
    let running = match i.qmp.status().await {
        Ok((running, _)) => running,
        Err(e) => {
            return Err(format!(
                "QEMU (domid {}, pid {}) does not answer query-status: {}",
                i.domid(),
                i.pid(),
                crate::error::chain(&e)
            ))
        }
    };
    let migration = i
        .qmp
        .execute_raw("query-migrate", None)
        .await
        .ok()
        .and_then(|v| v["status"].as_str().map(String::from));
    Ok((true, running, migration))
}

/// Finish a migration the agent was killed in (or whose `cont` went
/// unanswered), by the rules of [`recovery`], through the same [`resolve`]
/// steps as the live path.
pub async fn recover<H: Host>(host: &H, job: JobFile) -> Recovered {
    let path = job_path(&domain_run_dir(host.run_dir(), host.name()));
    let phase = job.phase.name();
    let (outcome, crash_reason) = match &job.phase {
        Phase::Confirm {
            outcome, reason, ..
        } => (Some(*outcome), reason.clone()),
        _ => (None, None),
    };
    let resume_sent = matches!(
        job.phase,
        Phase::Finish {
            resume_sent: true,
            ..
        }
    );
    let parts = job.phase.parts();
    host.observe_domid(parts.src.domid);
    if let Some(d) = parts.dst_domid {
        host.observe_domid(d);
    }
    let leave_alone = |why: String| Recovered::LeaveAlone {
        src: Box::new(parts.src.clone()),
        reason: format!("interrupted migration (phase {phase}) not recovered: {why}"),
    };
    let adopted = async {
        // Until their vCPUs' state is read, the source answers its tap
        // ioctls as the owner, the destination (which may be loading the
        // device's state) as not.
        let src = try_adopt(parts.src, true).await?;
        // An adoption's destination is its taps' only user from the start
        // (agent::adopt): nobody else configured them.
        let dst = match parts.dst {
            Some(r) => try_adopt(r, parts.src.foreign.is_some()).await?,
            None => None,
        };
        Ok::<_, String>((src, dst))
    };
    // Prepare hooks may have run once a destination slot existed; after a
    // recorded crash they were released when the crash was handled.
    let hooks = if parts.dst_paths.is_some() && outcome != Some(Outcome::Crashed) {
        Some(HookEnv {
            domain: host.name().to_string(),
            src_domid: parts.src.domid,
            dst_domid: parts.dst_domid.unwrap_or(0),
            dst_pid: parts.dst.map(|d| d.process.pid),
            emulator: job.target_emulator.clone(),
            nics: hooks::nics_of(&host.definition().await),
        })
    } else {
        None
    };
    // Never decide on a guess: an instance that lives but cannot be talked
    // to may be the one running the guest. Except after post-copy began
    // with the source gone: the pages the destination lacks are lost with
    // it, whatever the destination answers (and one stuck on such a page
    // answers nothing).
    let (src, dst) = match adopted.await {
        Ok(v) => v,
        Err(why) if job.phase.postcopy() && source_gone(parts.src) => {
            let reason = format!(
                "post-copy had started and the source QEMU is gone: the guest's memory is not \
                 whole anywhere ({why})"
            );
            tracing::warn!(domain = %host.name(), %phase, decision = "Crashed", %reason,
                "recovering interrupted migration");
            save_crash(&job, &path, reason.clone());
            let paths = [Some(&parts.src.paths), parts.dst_paths]
                .into_iter()
                .flatten()
                .collect();
            resolve::crash(host, vec![], paths, hooks, reason).await;
            return Recovered::Nothing;
        }
        Err(why) => return leave_alone(why),
    };
    let observed = async {
        let (src_alive, src_running, src_migration) = observe_one(src.as_ref()).await?;
        let (dst_alive, dst_running, dst_migration) = observe_one(dst.as_ref()).await?;
        Ok::<_, String>(Observed {
            src_alive,
            src_running,
            src_migration,
            dst_alive,
            dst_running,
            dst_migration,
            resume_sent,
            postcopy: job.phase.postcopy(),
        })
    };
    let observed = match observed.await {
        Ok(o) => o,
        Err(why) => return leave_alone(why),
    };
    let decision = recovery::decide(phase, outcome, &observed);
    tracing::warn!(domain = %host.name(), %phase, ?outcome, ?observed, ?decision, "recovering interrupted migration");
    let winner = match decision {
        Decision::KeepSource { cancel_migration } => match src {
            Some(src) => {
                resolve::keep_source(
                    host,
                    &src,
                    Destination {
                        instance: dst,
                        paths: parts.dst_paths,
                        hooks,
                    },
                    job.src_was_running,
                    cancel_migration,
                )
                .await;
                Some(src)
            }
            None => {
                lost(
                    host,
                    hooks,
                    "migration recovery found no instance to keep".into(),
                )
                .await;
                None
            }
        },
        Decision::SwitchToDestination { .. } => match dst {
            Some(d) => {
                let from = match src {
                    Some(s) => Source::Held(s),
                    None => Source::Gone(parts.src),
                };
                if !resolve::switch_to_destination(host, from, &d, Switch::Recovery).await {
                    let reason = "the destination QEMU died while recovery resumed it".to_string();
                    save_crash(&job, &path, reason);
                    return Recovered::Nothing;
                }
                Some(d)
            }
            None => {
                lost(
                    host,
                    hooks,
                    "migration recovery found no instance to keep".into(),
                )
                .await;
                None
            }
        },
        Decision::FinishPostcopy { cont_dst } => match (src, dst) {
            (Some(s), Some(d)) => {
                if cont_dst {
                    // The source is stopped (observed): the guest may run
                    // on the destination, which fetches what it lacks.
                    d.set_tap_owner(true);
                    if let Err(e) = d.qmp.cont().await {
                        tracing::error!(domain = %host.name(), "resuming the destination in post-copy: {}", crate::error::chain(&e));
                    }
                }
                if let Err(e) = wait_postcopy_done(&s.qmp, POSTCOPY_WAIT).await {
                    let reason = crate::error::chain(&e);
                    save_crash(&job, &path, reason.clone());
                    let paths = [Some(&parts.src.paths), parts.dst_paths]
                        .into_iter()
                        .flatten()
                        .collect();
                    resolve::crash(host, vec![s, d], paths, hooks, reason).await;
                    return Recovered::Nothing;
                }
                if !resolve::switch_to_destination(host, Source::Held(s), &d, Switch::Recovery)
                    .await
                {
                    let reason = "the destination QEMU died while recovery resumed it".to_string();
                    save_crash(&job, &path, reason);
                    return Recovered::Nothing;
                }
                Some(d)
            }
            (s, d) => {
                let reason = "post-copy recovery lost a QEMU".to_string();
                save_crash(&job, &path, reason.clone());
                resolve::crash(
                    host,
                    [s, d].into_iter().flatten().collect(),
                    vec![],
                    hooks,
                    reason,
                )
                .await;
                return Recovered::Nothing;
            }
        },
        Decision::Crashed(reason) => {
            let reason = crash_reason.unwrap_or(reason);
            save_crash(&job, &path, reason.clone());
            let paths = [Some(&parts.src.paths), parts.dst_paths]
                .into_iter()
                .flatten()
                .collect();
            resolve::crash(
                host,
                [src, dst].into_iter().flatten().collect(),
                paths,
                hooks,
                reason,
            )
            .await;
            return Recovered::Nothing;
        }
        Decision::LeaveAlone(why) => return leave_alone(why),
        Decision::Lost(reason) => {
            for i in [src, dst].into_iter().flatten() {
                i.kill("migration recovery: guest lost", resolve::KILL_WAIT)
                    .await;
            }
            lost(host, hooks, reason).await;
            None
        }
    };
    if let Err(e) = JobFile::remove(&path) {
        tracing::warn!("removing the job file: {}", crate::error::chain(&e));
    }
    match winner {
        Some(i) => {
            tracing::warn!(
                domain = %host.name(),
                domid = i.domid(),
                "migration recovered"
            );
            Recovered::Domid(i.domid())
        }
        None => Recovered::Nothing,
    }
}

/// Rewrite the job file as Confirm(crashed), in this version's format: the
/// record that keeps the domain crashed until `qlive destroy`.
fn save_crash(job: &JobFile, path: &Path, reason: String) {
    let file = JobFile {
        version: super::phase::version_for(job.memory),
        phase: job.phase.confirm(Outcome::Crashed, Some(reason)),
        ..job.clone()
    };
    if let Err(e) = file.save(path) {
        tracing::error!("persisting Confirm(crashed): {}", crate::error::chain(&e));
    }
}

/// No instance is left: release what prepare hooks set up, then the domain
/// is shut off.
async fn lost<H: Host>(host: &H, hooks: Option<HookEnv>, reason: String) {
    if let Some(env) = &hooks {
        hooks::release(host.hooks_dir(), env).await;
    }
    host.lost(reason).await;
}

#[cfg(test)]
mod tests {
    //! The safety branches of the switchover against fake QMP peers: what a
    //! real QEMU cannot be made to do on demand (a source that still runs
    //! after `completed`, a destination lost exactly between `cont` and its
    //! reply, a burst of events that overruns the subscriber).
    use super::*;
    use crate::qmp::fake::{self, Reply};
    use serde_json::{json, Value};
    use std::sync::atomic::{AtomicBool, Ordering};

    fn answer(cmd: &Value, running: bool, migrate: &str) -> Reply {
        match cmd["execute"].as_str() {
            Some("query-status") => Reply::Lines(vec![fake::ok(
                cmd,
                json!({"running": running, "status": if running {"running"} else {"postmigrate"}}),
            )]),
            Some("query-migrate") => Reply::Lines(vec![fake::ok(cmd, json!({"status": migrate}))]),
            _ => Reply::Lines(vec![fake::ok(cmd, json!({}))]),
        }
    }

    fn completed() -> Option<String> {
        Some(fake::event("MIGRATION", json!({"status": "completed"})))
    }

    async fn stopped_source() -> (Qmp, fake::Received) {
        fake::start(vec![], |c| answer(c, false, "completed")).await
    }

    /// Run `resume_destination`; returns the result and whether the intent
    /// was persisted.
    async fn resume(
        src: &Qmp,
        src_exited: bool,
        dst: &Qmp,
        events: &mut broadcast::Receiver<QmpEvent>,
        intent_ok: bool,
    ) -> (Result<(), Resume>, bool) {
        resume_with(src, src_exited, dst, false, events, intent_ok).await
    }

    async fn resume_with(
        src: &Qmp,
        src_exited: bool,
        dst: &Qmp,
        dst_exited: bool,
        events: &mut broadcast::Receiver<QmpEvent>,
        intent_ok: bool,
    ) -> (Result<(), Resume>, bool) {
        let persisted = AtomicBool::new(false);
        let r = resume_destination(
            src,
            || src_exited,
            dst,
            || dst_exited,
            events,
            false,
            || {
                persisted.store(true, Ordering::SeqCst);
                if intent_ok {
                    Ok(())
                } else {
                    Err(MigrationError::Persist {
                        path: "/run/qlive/domains/vm/job.json".into(),
                        source: std::io::Error::from(std::io::ErrorKind::StorageFull),
                    })
                }
            },
            || async {},
        )
        .await;
        (r, persisted.load(Ordering::SeqCst))
    }

    fn sent(r: &fake::Received, name: &str) -> bool {
        r.lock().unwrap().iter().any(|c| c == name)
    }

    #[tokio::test]
    async fn a_source_still_running_is_never_joined_by_the_destination() {
        let (src, _) = fake::start(vec![], |c| answer(c, true, "completed")).await;
        let (dst, dst_got) =
            fake::start(vec![completed()], |c| answer(c, false, "completed")).await;
        let mut events = dst.subscribe();
        let (r, persisted) = resume(&src, false, &dst, &mut events, true).await;
        assert!(
            matches!(
                r,
                Err(Resume::NotResumed(MigrationError::SourceRunning { .. }))
            ),
            "{r:?}"
        );
        assert!(!persisted, "no intent is recorded for a cont never sent");
        assert!(!sent(&dst_got, "cont"));
    }

    #[tokio::test]
    async fn a_destination_gone_before_cont_leaves_the_source_to_keep() {
        let (src, _) = stopped_source().await;
        // Greets, then closes before reporting the incoming state loaded.
        let (dst, _) = fake::start(vec![None], |c| answer(c, false, "active")).await;
        let mut events = dst.subscribe();
        let (r, persisted) = resume(&src, false, &dst, &mut events, true).await;
        assert!(
            matches!(r, Err(Resume::NotResumed(MigrationError::Failed { .. }))),
            "{r:?}"
        );
        assert!(!persisted);
    }

    async fn dst_closing_on_cont() -> (Qmp, fake::Received) {
        fake::start(vec![completed()], |c| match c["execute"].as_str() {
            // The connection drops between `cont` and its reply.
            Some("cont") => Reply::Close,
            _ => answer(c, false, "completed"),
        })
        .await
    }

    #[tokio::test]
    async fn a_destination_lost_after_cont_may_have_run() {
        let (src, _) = stopped_source().await;
        let (dst, dst_got) = dst_closing_on_cont().await;
        let mut events = dst.subscribe();
        // ... and its process is gone: crashed.
        let (r, persisted) = resume_with(&src, false, &dst, true, &mut events, true).await;
        assert!(
            matches!(r, Err(Resume::MayHaveRun(MigrationError::Crashed { .. }))),
            "{r:?}"
        );
        assert!(persisted, "the intent was on disk before cont was sent");
        assert!(sent(&dst_got, "cont"));
    }

    #[tokio::test]
    async fn a_lost_answer_from_a_live_destination_is_left_to_observation() {
        let (src, _) = stopped_source().await;
        let (dst, _) = dst_closing_on_cont().await;
        let mut events = dst.subscribe();
        let (r, _) = resume_with(&src, false, &dst, false, &mut events, true).await;
        assert!(
            matches!(
                r,
                Err(Resume::Unanswered(MigrationError::ContUnanswered { .. }))
            ),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn an_answer_that_does_not_decode_is_still_an_answer() {
        let (src, _) = stopped_source().await;
        let (dst, _) = fake::start(vec![completed()], |c| match c["execute"].as_str() {
            Some("cont") => Reply::Lines(vec![fake::ok(c, json!(42))]),
            _ => answer(c, false, "completed"),
        })
        .await;
        let mut events = dst.subscribe();
        let (r, _) = resume(&src, false, &dst, &mut events, true).await;
        assert!(r.is_ok(), "{r:?}");
    }

    #[tokio::test]
    async fn cont_refused_by_qemu_proves_the_destination_never_ran() {
        let (src, _) = stopped_source().await;
        let (dst, _) = fake::start(vec![completed()], |c| match c["execute"].as_str() {
            Some("cont") => Reply::Lines(vec![fake::error(c, "GenericError", "not ready")]),
            _ => answer(c, false, "completed"),
        })
        .await;
        let mut events = dst.subscribe();
        let (r, _) = resume(&src, false, &dst, &mut events, true).await;
        assert!(
            matches!(r, Err(Resume::NotResumed(MigrationError::Qmp { .. }))),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn no_cont_without_the_persisted_intent() {
        let (src, _) = stopped_source().await;
        let (dst, dst_got) =
            fake::start(vec![completed()], |c| answer(c, false, "completed")).await;
        let mut events = dst.subscribe();
        let (r, persisted) = resume(&src, false, &dst, &mut events, false).await;
        assert!(persisted);
        assert!(
            matches!(r, Err(Resume::NotResumed(MigrationError::Persist { .. }))),
            "{r:?}"
        );
        assert!(!sent(&dst_got, "cont"));
    }

    #[tokio::test]
    async fn lost_events_are_replaced_by_query_migrate() {
        let (src, _) = stopped_source().await;
        // The completion event, then more events than the subscriber holds:
        // the completion is overrun before it is read.
        let mut burst = vec![completed()];
        burst.extend((0..1100).map(|i| Some(fake::event("RTC_CHANGE", json!({"offset": i})))));
        let (dst, dst_got) = fake::start(burst, |c| answer(c, false, "completed")).await;
        let mut events = dst.subscribe();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (r, persisted) = resume(&src, false, &dst, &mut events, true).await;
        assert!(r.is_ok(), "{r:?}");
        assert!(persisted);
        assert!(sent(&dst_got, "query-migrate"), "asked instead of waiting");
        assert!(sent(&dst_got, "cont"));
    }

    #[tokio::test]
    async fn a_source_that_died_after_completing_holds_no_vcpus() {
        let (src, _) = fake::start(vec![None], |c| answer(c, true, "completed")).await;
        let (dst, dst_got) =
            fake::start(vec![completed()], |c| answer(c, false, "completed")).await;
        let mut events = dst.subscribe();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (r, _) = resume(&src, true, &dst, &mut events, true).await;
        assert!(r.is_ok(), "{r:?}");
        assert!(sent(&dst_got, "cont"));
        // ... but a source that only stopped answering is not proof.
        let (src, _) = fake::start(vec![None], |c| answer(c, true, "completed")).await;
        let (dst, dst_got) =
            fake::start(vec![completed()], |c| answer(c, false, "completed")).await;
        let mut events = dst.subscribe();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (r, _) = resume(&src, false, &dst, &mut events, true).await;
        assert!(
            matches!(r, Err(Resume::NotResumed(MigrationError::Qmp { .. }))),
            "{r:?}"
        );
        assert!(!sent(&dst_got, "cont"));
    }
}
