//! Request handlers: one function per API operation, each returning its
//! result type from `api` (encoded to JSON by [`Agent::handle`]).

use super::{path_str, Agent, AgentError, Domain, Run};
use crate::api::{self, Request};
use crate::domain::definition::Accel;
use crate::domain::{Definition, DefinitionError};
use crate::error::chain as error_chain;
use crate::instance::cmdline::{EffectiveAccel, StartMode};
use crate::instance::memory::GuestRam;
use crate::instance::paths::InstancePaths;
use crate::instance::{self, Instance, SpawnSpec};
use crate::migration::params::Memory;
use serde_json::Value;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::api::{DEFAULT_MIGRATE_TIMEOUT_S, DEFAULT_STOP_TIMEOUT_S};
const DESTROY_GRACE: Duration = Duration::from_secs(5);

/// A request's `timeout_s`, its default when absent; over
/// [`api::MAX_TIMEOUT_S`] it is refused before anything starts.
fn bounded_timeout(timeout_s: Option<u64>, default: u64) -> Result<u64, AgentError> {
    match timeout_s {
        None => Ok(default),
        Some(t) if t <= api::MAX_TIMEOUT_S => Ok(t),
        Some(t) => Err(AgentError::BadRequest(format!(
            "timeout_s {t} is over the limit of {} s",
            api::MAX_TIMEOUT_S
        ))),
    }
}

impl Agent {
    /// Run one request; its result as it goes on the wire.
    pub async fn handle(self: &Arc<Self>, req: Request) -> Result<Value, AgentError> {
        match req {
            Request::Ping {} => answer(&api::Pong {
                version: env!("CARGO_PKG_VERSION").into(),
            }),
            Request::Define { definition } => answer(&self.define(&definition).await?),
            Request::Undefine { name } => answer(&self.undefine(&name).await?),
            Request::Start { name } => answer(&self.start(&name).await?),
            Request::Stop { name, timeout_s } => {
                let timeout =
                    Duration::from_secs(bounded_timeout(timeout_s, DEFAULT_STOP_TIMEOUT_S)?);
                answer(&self.stop(&name, timeout).await?)
            }
            Request::Destroy { name } => answer(&self.destroy(&name).await?),
            Request::List {} => answer(&self.list().await?),
            Request::Info { name } => answer(&self.info(&name).await?),
            Request::Migrate {
                name,
                emulator,
                timeout_s,
                copy_memory,
                postcopy,
                hugepages,
            } => {
                let timeout =
                    Duration::from_secs(bounded_timeout(timeout_s, DEFAULT_MIGRATE_TIMEOUT_S)?);
                let memory = match (copy_memory, postcopy) {
                    (false, None) => Memory::Shared,
                    (false, Some(_)) => {
                        return Err(AgentError::BadRequest(
                            "postcopy applies only with copy_memory: a shared-memory migration sends no RAM".into(),
                        ))
                    }
                    (true, p) => Memory::Copy {
                        postcopy: p.unwrap_or_default(),
                    },
                };
                let hugepages = match (copy_memory, hugepages.as_deref()) {
                    (_, None) => None,
                    (false, Some(_)) => {
                        return Err(AgentError::BadRequest(
                            "hugepages applies only with copy_memory: a shared-memory migration keeps the domain's memfd".into(),
                        ))
                    }
                    (true, Some("none")) => Some(None),
                    (true, Some(h)) => Some(Some(
                        serde_json::from_value(Value::String(h.to_string())).map_err(|_| {
                            AgentError::BadRequest(format!(
                                "hugepages {h:?} is not one of 2M, 1G, none"
                            ))
                        })?,
                    )),
                };
                answer(
                    &self
                        .migrate(&name, emulator, timeout, memory, hugepages)
                        .await?,
                )
            }
            Request::Job { name } => answer(&self.job(&name).await?),
            Request::Abort { name } => answer(&self.abort(&name).await?),
            Request::Stale {} => answer(&self.stale().await?),
            Request::Preflight { name, emulator } => {
                answer(&self.preflight_op(&name, emulator).await?)
            }
            Request::Metrics {} => answer(&self.metrics()),
            Request::GuestAgent {
                name,
                command,
                timeout_s,
            } => {
                let timeout = Duration::from_secs(bounded_timeout(
                    timeout_s,
                    api::DEFAULT_GUEST_AGENT_TIMEOUT_S,
                )?);
                answer(&self.guest_agent(&name, &command, timeout).await?)
            }
            Request::RecordUpgrade { summary } => answer(&self.record_upgrade(summary)?),
            Request::Adopt {
                name,
                qmp,
                definition,
                dry_run,
                postcopy,
                timeout_s,
            } => {
                let timeout =
                    Duration::from_secs(bounded_timeout(timeout_s, DEFAULT_MIGRATE_TIMEOUT_S)?);
                let how = super::adopt::How {
                    dry_run,
                    postcopy: postcopy.unwrap_or_default(),
                    timeout,
                };
                self.adopt(&name, &qmp, definition.as_ref(), how).await
            }
            // Streaming; handled by the server before it gets here.
            Request::Console { .. } => Err(AgentError::InvalidState(
                "console is a streaming call".into(),
            )),
        }
    }

    /// One command to the guest agent, on the domain's stable socket; the
    /// domain lock is not held while the guest answers.
    async fn guest_agent(
        &self,
        name: &str,
        command: &Value,
        timeout: Duration,
    ) -> Result<api::GuestAgentAnswer, AgentError> {
        let dom = self.lookup(name)?;
        let socket = {
            let st = dom.state.lock().await;
            if !st.def.guest_agent {
                return Err(AgentError::InvalidState(format!(
                    "domain {} has no guest agent channel (define it with \"guest_agent\": true)",
                    dom.name
                )));
            }
            match &st.run {
                Run::Running(i) => i.record.guest_agent.clone(),
                _ => None,
            }
        };
        let Some(socket) = socket else {
            return Err(AgentError::InvalidState(format!(
                "domain {} is not running",
                dom.name
            )));
        };
        let answer = crate::qga::execute(&socket, command, timeout)
            .await
            .map_err(|source| AgentError::GuestAgent {
                name: dom.name.clone(),
                source,
            })?;
        Ok(api::GuestAgentAnswer {
            name: dom.name.clone(),
            answer,
        })
    }

    fn metrics(&self) -> api::Metrics {
        api::Metrics {
            agent_started_at_s: self.started_at_s,
            tally: self
                .tally
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .tally
                .clone(),
        }
    }

    /// Keep an upgrade run's summary as the last one. A dry run moved
    /// nothing and is refused, so the last run is always a real one.
    fn record_upgrade(&self, s: api::UpgradeSummary) -> Result<api::Recorded, AgentError> {
        if s.dry_run {
            return Err(AgentError::BadRequest(
                "a dry run is not recorded as an upgrade run".into(),
            ));
        }
        let last = crate::metrics::LastUpgrade {
            finished_at_s: super::now_unix(),
            selected: s.selected as u64,
            succeeded: s.succeeded as u64,
            failed: s.failed as u64,
            failed_domains: s.failed_domains,
            unchecked: s.unchecked,
            wall_ms: s.wall_ms,
        };
        tracing::info!(
            selected = last.selected,
            succeeded = last.succeeded,
            failed = last.failed,
            "upgrade run recorded"
        );
        self.count(|t| t.last_upgrade = Some(last));
        Ok(api::Recorded { recorded: true })
    }

    async fn define(self: &Arc<Self>, v: &Value) -> Result<api::Defined, AgentError> {
        let def = Definition::from_value(v)?;
        let dom = self.define_definition(def)?;
        Ok(api::Defined {
            name: dom.name.clone(),
            uuid: dom.uuid,
        })
    }

    /// Complete, check and store `def` as a new domain (define, and
    /// adoption before its migration).
    pub(super) fn define_definition(
        self: &Arc<Self>,
        mut def: Definition,
    ) -> Result<Arc<Domain>, AgentError> {
        // The emulator must exist now; it is checked again at every start.
        crate::instance::probe::check_executable(&def.emulator).map_err(|e| {
            DefinitionError::Invalid {
                field: "emulator".into(),
                reason: e.to_string(),
            }
        })?;
        let uuid = *def.uuid.get_or_insert_with(uuid::Uuid::new_v4);
        def.assign_nic_defaults(|| {
            let b = super::random_u32().to_le_bytes();
            [b[0], b[1], b[2]]
        });
        def.assign_firmware_defaults();
        // The firmware images must be there now, like the emulator.
        for (field, p) in [
            ("firmware_code", &def.firmware_code),
            ("nvram_template", &def.nvram_template),
        ] {
            if let Some(p) = p {
                crate::instance::firmware::check_readable(field, p).map_err(|e| {
                    DefinitionError::Invalid {
                        field: field.into(),
                        reason: format!("{}: {}", p.display(), crate::error::chain(&e)),
                    }
                })?;
            }
        }
        // What is stored must load again: check the completed definition.
        def.validate()?;
        let mut table = self.table();
        table.check_free(&def.name, uuid)?;
        if self.store.exists(&def.name)? {
            return Err(AgentError::InvalidState(format!(
                "a stored definition file for {:?} exists but could not be loaded at startup; fix or remove {}",
                def.name,
                path_str(&self.store.path_of(&def.name)?)
            )));
        }
        let mcs = self.mcs_pair(&def.name)?;
        if let Err(e) = self.store.save(&def) {
            self.release_mcs(&def.name);
            return Err(e.into());
        }
        let dom = Arc::new(Domain::new(def.clone(), uuid, "defined"));
        table.insert(&def.name, uuid, dom.clone())?;
        drop(table);
        dom.follow_console(&self.console_log(&def.name));
        tracing::info!(domain = %def.name, %uuid, %mcs, "defined");
        Ok(dom)
    }

    async fn undefine(self: &Arc<Self>, name: &str) -> Result<api::Undefined, AgentError> {
        let dom = self.lookup(name)?;
        let mut st = dom.state.lock().await;
        if st.removed {
            return Err(crate::domain::TableError::NotFound(name.into()).into());
        }
        st.check_no_job(&dom.name)?;
        match &st.run {
            Run::Running(i) => {
                return Err(AgentError::InvalidState(format!(
                    "domain {} is running (domid {}); stop or destroy it first",
                    dom.name,
                    i.domid()
                )))
            }
            Run::Unreachable { .. } => {
                return Err(AgentError::InvalidState(format!(
                    "domain {} may still have a QEMU running; destroy it first",
                    dom.name
                )))
            }
            Run::Crashed { reason } => {
                return Err(AgentError::InvalidState(format!(
                    "domain {} crashed during a migration ({reason}); `qlive destroy {}` acknowledges it first",
                    dom.name, dom.name
                )))
            }
            Run::ShutOff { .. } => {}
        }
        self.forget(dom.as_ref(), &mut st)?;
        tracing::info!(domain = %dom.name, "undefined");
        Ok(api::Undefined {
            name: dom.name.clone(),
        })
    }

    /// Remove a shut-off domain: its stored definition, table entry, labels,
    /// console log, NVRAM and run directory.
    pub(super) fn forget(
        &self,
        dom: &Domain,
        st: &mut super::DomainState,
    ) -> Result<(), AgentError> {
        self.store.remove(&dom.name)?;
        self.table().remove(&dom.name)?;
        self.release_mcs(&dom.name);
        st.removed = true;
        dom.stop_console();
        let _ = crate::fsutil::remove_file_if_exists(&self.console_log(&dom.name));
        if let Err(e) = crate::fsutil::remove_file_if_exists(&self.nvram_path(&dom.name)) {
            tracing::warn!(domain = %dom.name, error = %e, "removing the NVRAM");
        }
        let _ = crate::fsutil::remove_dir_all_if_exists(&crate::instance::paths::domain_run_dir(
            &self.cfg.run_dir,
            &dom.name,
        ));
        Ok(())
    }

    async fn start(self: &Arc<Self>, name: &str) -> Result<api::Started, AgentError> {
        let dom = self.lookup(name)?;
        let mut st = dom.state.lock().await;
        if st.removed {
            return Err(crate::domain::TableError::NotFound(name.into()).into());
        }
        st.check_no_job(&dom.name)?;
        // Its guest runs in the QEMU being adopted: a start would boot a
        // second one on the same disks.
        if self.adopting(&dom.name) {
            return Err(AgentError::Busy(format!(
                "domain {} is being adopted from a running QEMU",
                dom.name
            )));
        }
        if let Run::Unreachable { reason, .. } = &st.run {
            return Err(AgentError::InvalidState(format!(
                "a QEMU of domain {} may still run but the agent could not take it over ({reason}); `qlive destroy {}` kills it",
                dom.name, dom.name
            )));
        }
        if let Run::Crashed { reason } = &st.run {
            return Err(AgentError::InvalidState(format!(
                "domain {} crashed during a migration ({reason}); it is not started again until \
                 an operator acknowledges it: `qlive destroy {}`, then `qlive start {}` boots it from its disks",
                dom.name, dom.name, dom.name
            )));
        }
        if let Run::Running(i) = &st.run {
            return Err(AgentError::InvalidState(format!(
                "domain {} is already running (domid {}, pid {})",
                dom.name,
                i.domid(),
                i.pid()
            )));
        }
        let t0 = std::time::Instant::now();
        let info = self.probes.get(&st.def.emulator).await?;
        // Pin the machine type and the CPU model on first start: guest ABI
        // from now on.
        let machine = info.resolve_machine(&st.def.machine)?;
        let cpu = match &st.def.cpu {
            Some(c) => Some(info.resolve_cpu(c).map_err(|e| DefinitionError::Invalid {
                field: "cpu".into(),
                reason: e.to_string(),
            })?),
            None => None,
        };
        if machine != st.def.machine || cpu != st.def.cpu {
            let mut pinned = st.def.clone();
            pinned.machine = machine.clone();
            pinned.cpu = cpu.clone();
            self.store.save(&pinned)?;
            if machine != st.def.machine {
                tracing::info!(domain = %dom.name, alias = %st.def.machine, %machine, "machine type pinned");
            }
            if cpu != st.def.cpu {
                tracing::info!(domain = %dom.name, model = ?st.def.cpu, pinned = ?cpu, "CPU model pinned");
            }
            st.def = pinned;
        }
        for (field, p) in [
            ("kernel", &st.def.kernel),
            ("initrd", &st.def.initrd),
            ("firmware_code", &st.def.firmware_code),
        ] {
            if let Some(p) = p {
                if !p.is_file() {
                    return Err(DefinitionError::Invalid {
                        field: field.into(),
                        reason: format!("{} does not exist or is not a file", p.display()),
                    }
                    .into());
                }
            }
        }
        self.check_qemu_access(&st.def)?;
        let nvram = self.prepare_nvram(&st.def)?;
        let accel = match st.def.accel {
            Accel::Kvm => EffectiveAccel::Kvm,
            Accel::Tcg => EffectiveAccel::Tcg,
            Accel::Auto => {
                let kvm = tokio::task::spawn_blocking(crate::instance::kvm::kvm_usable)
                    .await
                    .unwrap_or(false);
                if kvm {
                    EffectiveAccel::Kvm
                } else {
                    EffectiveAccel::Tcg
                }
            }
        };
        let start_err = |e: crate::instance::memory::MemoryError| AgentError::Start {
            name: dom.name.clone(),
            source: e.into(),
        };
        if let Some(h) = st.def.hugepages {
            crate::instance::memory::check_huge_pages(h, st.def.memory_bytes())
                .map_err(start_err)?;
        }
        let ram = Arc::new(
            GuestRam::create(&dom.name, st.def.memory_bytes(), st.def.hugepages)
                .map_err(start_err)?,
        );
        // The taps live as long as this run of the domain: every instance
        // gets the same fds, so a migration never recreates the device.
        let taps = self.open_taps(&dom.name, &st.def).await?;
        let taps = Arc::new(taps);
        let endpoints = Arc::new(self.bind_endpoints(&st.def)?);
        let domid = match self.domids.allocate() {
            Ok(d) => d,
            Err(e) => {
                endpoints.unlink();
                return Err(e.into());
            }
        };
        let paths = InstancePaths::new(&self.cfg.run_dir, &dom.name, domid);
        let console_log = self.console_log(&dom.name);
        if let Err(e) = crate::fsutil::ensure_regular_or_absent(&console_log) {
            endpoints.unlink();
            return Err(AgentError::InvalidState(format!(
                "refusing to start {}: {e}",
                dom.name
            )));
        }
        let labels = match self.selinux_labels(&dom.name) {
            Ok(l) => l,
            Err(e) => {
                endpoints.unlink();
                return Err(e.into());
            }
        };
        let inst = instance::spawn(SpawnSpec {
            def: &st.def,
            domid,
            machine: &machine,
            accel,
            paths,
            console_log: &console_log,
            mode: StartMode::Boot,
            ram,
            taps,
            tap_set: 0,
            endpoints: endpoints.clone(),
            labels,
            run_as: self.qemu_user.as_ref(),
            data_dirs: &info.data_dirs,
            nvram: nvram.as_deref(),
            inherit_firmware: None,
            ram_block: None,
        })
        .await
        .map_err(|source| {
            endpoints.unlink();
            AgentError::Start {
                name: dom.name.clone(),
                source,
            }
        })?;
        let inst = Arc::new(inst);
        // From here on a failure must take the instance down again.
        let activate = async {
            // Recorded before the vCPUs run: recovery relies on it.
            self.write_status(&dom.name, &inst.record)?;
            inst.qmp.cont().await.map_err(|source| AgentError::Qmp {
                what: "resuming vCPUs (cont)".into(),
                source,
            })
        };
        if let Err(e) = activate.await {
            let _ = inst.terminate(DESTROY_GRACE).await;
            self.remove_run_files(&dom.name);
            return Err(e);
        }
        st.run = Run::Running(inst.clone());
        self.watch(&dom, &inst);
        self.serve_vnc(&dom, &inst);
        tracing::info!(domain = %dom.name, domid = inst.domid(), pid = inst.pid(),
            qemu = %inst.record.qemu_version, %machine, accel = accel.as_str(),
            ms = t0.elapsed().as_millis() as u64, "started");
        Ok(api::Started {
            name: dom.name.clone(),
            domid: inst.domid(),
            pid: inst.pid(),
            machine,
            accel: accel.as_str().into(),
        })
    }

    /// The domain's taps for a new run (a start, or an adoption), with
    /// their steering state in the domain's run directory.
    pub(super) async fn open_taps(
        &self,
        name: &str,
        def: &Definition,
    ) -> Result<Vec<crate::instance::tap::Tap>, AgentError> {
        let mut taps = Vec::with_capacity(def.nics.len());
        if !def.nics.is_empty() {
            // The taps keep their steering there (instance::tap).
            self.create_domain_run_dir(name)?;
        }
        for (i, n) in def.nics.iter().enumerate() {
            // A stop or destroy just before this start: the last holders
            // of the previous run's taps (its instance, the tasks that
            // watched it) let go of them asynchronously. Give them a
            // moment before calling the tap another process's.
            let t0 = std::time::Instant::now();
            while crate::instance::tap::attached(n.tap())
                && t0.elapsed() < std::time::Duration::from_secs(5)
            {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            let state = crate::instance::tap::steering_file(
                &crate::instance::paths::domain_run_dir(&self.cfg.run_dir, name),
                i,
            );
            let tap =
                crate::instance::tap::Tap::open(n.tap(), n.bridge.as_deref(), n.queues(), state)
                    .map_err(|e| AgentError::Start {
                        name: name.to_string(),
                        source: e.into(),
                    })?;
            taps.push(tap);
        }
        Ok(taps)
    }

    /// The domain's stable sockets for a new run (crate::instance::endpoint):
    /// bound now, before any instance, in the domain's run directory.
    pub(super) fn bind_endpoints(
        &self,
        def: &Definition,
    ) -> Result<crate::instance::endpoint::Endpoints, AgentError> {
        use crate::instance::{endpoint, paths};
        let mut e = endpoint::Endpoints::default();
        let run = &self.cfg.run_dir;
        if def.guest_agent {
            e.guest_agent =
                Some(self.bind_endpoint(def, &paths::guest_agent_socket(run, &def.name))?);
        }
        if def.vnc {
            match self.bind_endpoint(def, &paths::vnc_socket(run, &def.name)) {
                Ok(ep) => e.vnc = Some(ep),
                Err(err) => {
                    e.unlink();
                    return Err(err);
                }
            }
        }
        Ok(e)
    }

    /// One stable socket at `path` in the domain's run directory, root:<API
    /// group> 0660 like the API socket.
    fn bind_endpoint(
        &self,
        def: &Definition,
        path: &Path,
    ) -> Result<crate::instance::endpoint::Endpoint, AgentError> {
        use crate::instance::{endpoint, paths};
        let start_err = |source: crate::instance::InstanceError| AgentError::Start {
            name: def.name.clone(),
            source,
        };
        let bound = endpoint::bound_path(path);
        if bound.as_os_str().len() > paths::MAX_SOCKET_PATH {
            return Err(start_err(crate::instance::InstanceError::PathTooLong {
                path: bound,
                limit: paths::MAX_SOCKET_PATH,
            }));
        }
        self.create_domain_run_dir(&def.name)?;
        let gid = nix::unistd::Group::from_name(&self.cfg.api_group)
            .ok()
            .flatten()
            .map(|g| g.gid.as_raw());
        endpoint::Endpoint::bind(path, 0o660, gid).map_err(|e| start_err(e.into()))
    }

    /// The domain's run directory (stable sockets, tap steering): 0711
    /// when QEMU runs as a user (it reaches its instance directory), 0700
    /// otherwise; an existing one is kept.
    pub(super) fn create_domain_run_dir(&self, name: &str) -> Result<(), AgentError> {
        let dir = crate::instance::paths::domain_run_dir(&self.cfg.run_dir, name);
        let mode = if self.qemu_user.is_some() {
            0o711
        } else {
            0o700
        };
        crate::fsutil::create_dir(&dir, mode).map_err(|source| AgentError::Io {
            what: format!("creating {}", dir.display()),
            source,
        })
    }

    /// Notice the instance's exit (pidfd), whoever caused it, and record
    /// why: the last SHUTDOWN event's reason if QEMU sent one.
    pub(super) fn watch(self: &Arc<Self>, dom: &Arc<Domain>, inst: &Arc<Instance>) {
        let reason = Arc::new(std::sync::Mutex::new(None::<String>));
        let mut events = inst.qmp.subscribe();
        let r2 = reason.clone();
        tokio::spawn(async move {
            loop {
                let ev = match events.recv().await {
                    Ok(ev) => ev,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => break,
                };
                if ev.name == "SHUTDOWN" {
                    let why = ev.data["reason"].as_str().unwrap_or("unknown").to_string();
                    *r2.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
                }
            }
        });
        let agent = self.clone();
        let dom = dom.clone();
        let inst = inst.clone();
        tokio::spawn(async move {
            inst.wait_exit().await;
            let why = reason.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let reason = inst.exit_intent().unwrap_or_else(|| match why.as_deref() {
                Some("guest-shutdown") => "guest shut down".to_string(),
                Some("guest-reset") => "guest reset (QEMU ran with -no-reboot)".to_string(),
                Some("host-qmp-quit") => "QEMU was told to quit".to_string(),
                Some("host-signal") => "QEMU was terminated by a signal".to_string(),
                Some(other) => format!("QEMU shut down ({other})"),
                None => format!(
                    "QEMU process {} died unexpectedly; last log: {}",
                    inst.pid(),
                    instance::log_tail(&inst.record.paths.log)
                ),
            });
            agent.finish_instance(&dom, inst.domid(), reason).await;
        });
    }

    /// Mark the domain shut off if `domid` is still its running instance;
    /// clean the instance's paths and the status file. Idempotent.
    async fn finish_instance(&self, dom: &Domain, domid: u64, reason: String) -> bool {
        let mut st = dom.state.lock().await;
        match &st.run {
            Run::Running(i) if i.domid() == domid => {
                instance::cleanup_paths(&i.record.paths);
                self.remove_run_files(&dom.name);
                tracing::info!(domain = %dom.name, domid, %reason, "instance ended");
                st.run = Run::ShutOff { reason };
                dom.console.end();
                true
            }
            _ => false,
        }
    }

    async fn stop(
        self: &Arc<Self>,
        name: &str,
        timeout: Duration,
    ) -> Result<api::Stopped, AgentError> {
        let dom = self.lookup(name)?;
        let inst = {
            let st = dom.state.lock().await;
            st.check_no_job(&dom.name)?;
            match &st.run {
                Run::Running(i) => {
                    // Under the lock: a migrate that comes next sees it.
                    i.set_exit_intent("shut down on request");
                    i.clone()
                }
                Run::Unreachable { .. } => {
                    return Err(AgentError::InvalidState(format!(
                    "domain {} cannot be asked to shut down (not reachable over QMP); use destroy",
                    dom.name
                )))
                }
                Run::ShutOff { .. } | Run::Crashed { .. } => {
                    return Err(AgentError::InvalidState(format!(
                        "domain {} is not running",
                        dom.name
                    )))
                }
            }
        };

        let powerdown = inst
            .qmp
            .execute(qapi::qmp::system_powerdown {})
            .await
            .map_err(|source| AgentError::Qmp {
                what: "requesting ACPI power-down".into(),
                source,
            });
        if let Err(e) = powerdown {
            inst.clear_exit_intent();
            return Err(e);
        }
        let forced = tokio::time::timeout(timeout, inst.wait_exit())
            .await
            .is_err();
        let reason = if forced {
            format!(
                "forced off: guest did not power down within {} s",
                timeout.as_secs()
            )
        } else {
            "shut down on request".to_string()
        };
        if forced {
            tracing::info!(domain = %dom.name, secs = timeout.as_secs(), "guest did not power down in time; forcing off");
            inst.set_exit_intent(reason.clone());
            self.terminate_and_finish(&dom, &inst, reason).await?;
        } else {
            self.finish_instance(&dom, inst.domid(), reason).await;
        }
        Ok(api::Stopped {
            name: dom.name.clone(),
            forced,
        })
    }

    async fn destroy(self: &Arc<Self>, name: &str) -> Result<api::Destroyed, AgentError> {
        let dom = self.lookup(name)?;
        let inst = {
            let mut st = dom.state.lock().await;
            st.check_no_job(&dom.name)?;
            match &st.run {
                Run::Running(i) => {
                    i.set_exit_intent("destroyed");
                    i.clone()
                }
                Run::Crashed { .. } => {
                    // The operator's acknowledgement: the kept job file (the
                    // record of the crash) goes, and start may boot it again.
                    self.end_unadopted(&dom.name, None).await?;
                    self.end_adoption(&dom.name);
                    tracing::warn!(domain = %dom.name, "crash acknowledged by destroy");
                    st.run = Run::ShutOff {
                        reason: "destroyed after a crash during migration".into(),
                    };
                    return Ok(api::Destroyed {
                        name: dom.name.clone(),
                    });
                }
                Run::Unreachable { record, .. } => {
                    let record = record.clone();
                    self.end_unadopted(&dom.name, record).await?;
                    self.end_adoption(&dom.name);
                    st.run = Run::ShutOff {
                        reason: "destroyed".into(),
                    };
                    return Ok(api::Destroyed {
                        name: dom.name.clone(),
                    });
                }
                Run::ShutOff { .. } => {
                    return Err(AgentError::InvalidState(format!(
                        "domain {} is not running",
                        dom.name
                    )))
                }
            }
        };

        self.terminate_and_finish(&dom, &inst, "destroyed".into())
            .await?;
        Ok(api::Destroyed {
            name: dom.name.clone(),
        })
    }

    /// `destroy` of a domain the agent holds no instance of (unreachable,
    /// crashed): kill its recorded process and any QEMU in its instance
    /// dirs, then remove the status file and a kept job file. The job file
    /// must go: left behind, the next agent start would act on instances
    /// that are gone (mark the domain crashed again, or sweep a guest started
    /// since).
    async fn end_unadopted(
        &self,
        name: &str,
        record: Option<Box<crate::instance::InstanceRecord>>,
    ) -> Result<(), AgentError> {
        self.kill_unreachable(name, record).await;
        self.remove_run_files(name);
        let job = crate::migration::phase::job_path(&crate::instance::paths::domain_run_dir(
            &self.cfg.run_dir,
            name,
        ));
        crate::migration::phase::JobFile::remove(&job).map_err(|source| AgentError::Io {
            what: format!("removing {}", job.display()),
            source,
        })
    }

    /// End `inst` (quit, SIGKILL after the grace) and record it ended.
    async fn terminate_and_finish(
        &self,
        dom: &Domain,
        inst: &Instance,
        reason: String,
    ) -> Result<(), AgentError> {
        inst.terminate(DESTROY_GRACE)
            .await
            .map_err(|source| AgentError::Stop {
                name: dom.name.clone(),
                source,
            })?;
        self.finish_instance(dom, inst.domid(), reason).await;
        Ok(())
    }

    /// Per running domain: is its QEMU stale, and why (procfs; see
    /// `upgrade::stale`).
    async fn stale(self: &Arc<Self>) -> Result<Vec<api::StaleEntry>, AgentError> {
        let mut out = Vec::new();
        let doms = self.table().list();
        for d in doms {
            let rec = match &d.state.lock().await.run {
                Run::Running(i) => i.record.clone(),
                _ => continue,
            };
            let recorded: Vec<_> = rec.loaded.iter().chain(&rec.firmware).cloned().collect();
            let reasons = crate::upgrade::stale::check(rec.process.pid, &recorded);
            let (reasons, error) = match reasons {
                Ok(r) => (r, None),
                Err(e) => (vec![], Some(error_chain(&e))),
            };
            let stale = reasons.iter().any(|r| !r.kind.needs_restart());
            let restart_required = reasons.iter().any(|r| r.kind.needs_restart());
            out.push(api::StaleEntry {
                name: d.name.clone(),
                domid: rec.domid,
                pid: rec.process.pid,
                emulator: rec.emulator,
                qemu_version: rec.qemu_version.to_string(),
                stale,
                restart_required,
                reasons: reasons
                    .iter()
                    .map(|r| api::StaleReasonInfo {
                        kind: r.kind.as_str().into(),
                        path: r.path.clone(),
                        text: r.to_string(),
                        restart_required: r.kind.needs_restart(),
                    })
                    .collect(),
                error,
            });
        }
        Ok(out)
    }

    async fn list(self: &Arc<Self>) -> Result<Vec<api::ListEntry>, AgentError> {
        let doms = self.table().list();
        let mut out = Vec::with_capacity(doms.len());
        for d in doms {
            let st = d.state.lock().await;
            let (state, domid, pid) = match &st.run {
                Run::Running(i) => (run_state(i).await, Some(i.domid()), Some(i.pid())),
                Run::ShutOff { .. } => ("shut-off".to_string(), None, None),
                Run::Crashed { .. } => ("crashed".to_string(), None, None),
                Run::Unreachable { record, .. } => (
                    "unreachable".to_string(),
                    record.as_ref().map(|r| r.domid),
                    record.as_ref().map(|r| r.process.pid),
                ),
            };
            out.push(api::ListEntry {
                name: d.name.clone(),
                uuid: d.uuid,
                state,
                domid,
                pid,
            });
        }
        Ok(out)
    }

    async fn info(self: &Arc<Self>, name: &str) -> Result<api::DomainInfo, AgentError> {
        let dom = self.lookup(name)?;
        let st = dom.state.lock().await;
        let def = &st.def;
        let console_log = self.console_log(&dom.name);
        let mut v = api::DomainInfo {
            name: dom.name.clone(),
            uuid: dom.uuid,
            state: "shut-off".into(),
            reason: None,
            domid: None,
            pid: None,
            emulator: def.emulator.clone(),
            qemu_version: None,
            machine: def.machine.clone(),
            accel: def.accel.as_str().into(),
            vcpus: def.vcpus,
            cpu: def.cpu.clone(),
            memory_mib: def.memory_mib,
            hugepages: def.hugepages.map(|h| h.as_str().to_string()),
            firmware: (def.firmware == crate::domain::definition::Firmware::Uefi).then(|| {
                api::FirmwareInfo {
                    kind: def.firmware.as_str().into(),
                    code: def.firmware_code.clone().unwrap_or_default(),
                    nvram_template: def.nvram_template.clone().unwrap_or_default(),
                    nvram: self.nvram_path(&dom.name),
                    secure_boot: def.secure_boot,
                }
            }),
            disks: def
                .disks
                .iter()
                .map(|d| api::DiskInfo {
                    path: d.path.clone(),
                    format: d.format.as_str().into(),
                    readonly: d.readonly,
                    cache: d.cache.as_str().into(),
                    aio: d.aio.as_str().into(),
                })
                .collect(),
            nics: def
                .nics
                .iter()
                .map(|n| api::NicInfo {
                    mac: n.mac.clone(),
                    tap: n.tap.clone(),
                    bridge: n.bridge.clone(),
                })
                .collect(),
            selinux: api::SelinuxInfo {
                mcs: self
                    .mcs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&dom.name)
                    .map(|p| p.to_string()),
                applied: crate::instance::selinux::enabled(),
            },
            console_log: console_log.clone(),
            job: st.job.as_deref().map(super::job_info),
            paths: None,
            running: None,
        };
        match &st.run {
            Run::Running(i) => {
                let r = &i.record;
                v.state = run_state(i).await;
                v.domid = Some(r.domid);
                v.pid = Some(r.process.pid);
                v.emulator = r.emulator.clone();
                v.qemu_version = Some(r.qemu_version.to_string());
                v.machine = r.machine.clone();
                v.accel = r.accel.as_str().into();
                v.paths = Some(api::InfoPaths {
                    dir: r.paths.dir.clone(),
                    qmp: r.paths.qmp.clone(),
                    pid: r.paths.pid.clone(),
                    log: r.paths.log.clone(),
                    console: console_log,
                });
                v.running = Some(api::RunningInfo {
                    exe: r.process.exe.clone(),
                    qemu_package: r.qemu_version.package.clone(),
                    started_at: r.started_at,
                    user: r.user.clone(),
                });
            }
            Run::Unreachable { record, reason } => {
                v.state = "unreachable".into();
                v.reason = Some(reason.clone());
                v.domid = record.as_ref().map(|r| r.domid);
                v.pid = record.as_ref().map(|r| r.process.pid);
                v.qemu_version = record.as_ref().map(|r| r.qemu_version.to_string());
            }
            Run::Crashed { reason } => {
                v.state = "crashed".into();
                v.reason = Some(reason.clone());
            }
            Run::ShutOff { reason } => {
                v.reason = Some(reason.clone());
            }
        }
        Ok(v)
    }

    pub(super) async fn console_subscribe(
        self: &Arc<Self>,
        name: &str,
    ) -> Result<tokio::sync::broadcast::Receiver<bytes::Bytes>, AgentError> {
        let dom = self.lookup(name)?;
        let st = dom.state.lock().await;
        match &st.run {
            Run::Running(_) => Ok(dom.console.subscribe()),
            Run::ShutOff { .. } | Run::Unreachable { .. } | Run::Crashed { .. } => {
                Err(AgentError::InvalidState(format!(
                    "domain {} is not running; its past output is in {}",
                    dom.name,
                    path_str(&self.console_log(&dom.name))
                )))
            }
        }
    }
}

/// A result as it goes on the wire.
fn answer<T: serde::Serialize>(result: &T) -> Result<Value, AgentError> {
    api::encode(result).map_err(AgentError::Encode)
}

/// `running`, `paused`, ... from QEMU; `unknown` if QMP does not answer.
async fn run_state(i: &Instance) -> String {
    match tokio::time::timeout(Duration::from_secs(2), i.qmp.status()).await {
        Ok(Ok((true, _))) => "running".into(),
        Ok(Ok((false, s))) if s == "paused" || s == "prelaunch" => "paused".into(),
        Ok(Ok((false, s))) => s,
        Ok(Err(e)) => format!("unknown ({})", error_chain(&e)),
        Err(_) => "unknown (QMP timeout)".into(),
    }
}
