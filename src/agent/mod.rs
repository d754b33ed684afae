//! The daemon: owns the domain table, the definition store and every
//! instance's fds; serves the API socket; re-adopts running QEMUs on start.
//!
//! Concurrency model: the table is a short-held `std::sync::Mutex` (lookups,
//! inserts); each domain has its own `tokio::sync::Mutex<DomainState>` held
//! across a mutating operation on that domain, so operations on different
//! domains never wait for each other. Long waits (a guest's ACPI shutdown)
//! are done without the domain lock.

pub mod access;
mod adopt;
mod migrate;
mod ops;
pub mod privileges;
mod recover;
mod sd;
mod server;
mod vnc;

use crate::api::{ApiError, ErrorKind};
use crate::console::ConsoleHub;
use crate::domain::{Definition, DefinitionError, DomainTable, Store, StoreError, TableError};
use crate::fsutil;
use crate::instance::domid::{DomidAllocator, DomidError};
use crate::instance::probe::{ProbeCache, ProbeError};
use crate::instance::{Instance, InstanceError, InstanceRecord};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use uuid::Uuid;

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Definition(#[from] DefinitionError),
    #[error(transparent)]
    Table(#[from] TableError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Domid(#[from] DomidError),
    #[error(transparent)]
    Mcs(#[from] crate::domain::mcs::McsError),
    #[error(transparent)]
    Probe(#[from] ProbeError),
    #[error("starting domain {name}")]
    Start {
        name: String,
        #[source]
        source: InstanceError,
    },
    #[error("{0}")]
    InvalidState(String),
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("the guest agent of domain {name}")]
    GuestAgent {
        name: String,
        #[source]
        source: crate::qga::QgaError,
    },
    #[error("stopping domain {name}")]
    Stop {
        name: String,
        #[source]
        source: InstanceError,
    },
    #[error("migrating domain {name}")]
    Migration {
        name: String,
        #[source]
        source: crate::migration::MigrationError,
    },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{what}")]
    Qmp {
        what: String,
        #[source]
        source: crate::qmp::QmpError,
    },
    #[error("another qlive agent is running (lock {0} is held)")]
    AlreadyRunning(PathBuf),
    #[error("inspecting the QEMU to adopt as {name}")]
    Adopt {
        name: String,
        #[source]
        source: Box<crate::adopt::AdoptError>,
    },
    /// A result that JSON cannot carry (a path that is not UTF-8).
    #[error("encoding the answer")]
    Encode(#[source] serde_json::Error),
}

impl AgentError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            AgentError::Definition(_) => ErrorKind::InvalidDefinition,
            AgentError::Table(TableError::NotFound(_)) => ErrorKind::NotFound,
            AgentError::Table(TableError::RemoteTaken(_)) => ErrorKind::Busy,
            AgentError::Table(_) => ErrorKind::AlreadyExists,
            AgentError::Start {
                source:
                    InstanceError::Memory(crate::instance::memory::MemoryError::NotEnoughHugePages {
                        ..
                    }),
                ..
            } => ErrorKind::InsufficientResources,
            AgentError::Probe(_) | AgentError::Start { .. } => ErrorKind::Emulator,
            AgentError::InvalidState(_) => ErrorKind::InvalidState,
            AgentError::Busy(_) => ErrorKind::Busy,
            AgentError::BadRequest(_) => ErrorKind::BadRequest,
            AgentError::GuestAgent {
                source: crate::qga::QgaError::BadCommand(_),
                ..
            } => ErrorKind::BadRequest,
            AgentError::GuestAgent { .. } => ErrorKind::GuestAgent,
            AgentError::Migration { .. } => ErrorKind::MigrationFailed,
            AgentError::Adopt { source, .. } => match source.as_ref() {
                crate::adopt::AdoptError::Busy { .. } => ErrorKind::Busy,
                crate::adopt::AdoptError::OwnInstance { .. } => ErrorKind::InvalidState,
                _ => ErrorKind::Emulator,
            },
            AgentError::Store(StoreError::BadName(_)) => ErrorKind::BadRequest,
            _ => ErrorKind::Internal,
        }
    }

    pub fn to_api(&self) -> ApiError {
        ApiError::new(self.kind(), crate::error::chain(self))
    }
}

/// What a domain is doing.
pub enum Run {
    ShutOff {
        reason: String,
    },
    Running(Arc<Instance>),
    /// A QEMU of this domain may still run, but the agent could not take it
    /// over (QMP did not answer, guest RAM not recoverable, status file
    /// unreadable). It is left alone: `start` is refused (a second QEMU on
    /// the same disks would corrupt them) and `destroy` kills it.
    Unreachable {
        record: Option<Box<InstanceRecord>>,
        reason: String,
    },
    /// The destination of a migration may have run the guest and is gone
    /// (migration::resolve::crash): every instance was killed, and none may
    /// run the guest again until an operator acknowledges it with
    /// `destroy` (which removes the kept job file); `start` then boots it
    /// from its disks.
    Crashed {
        reason: String,
    },
}

pub struct DomainState {
    pub def: Definition,
    pub run: Run,
    /// A migration job holds the domain: other mutating calls are refused.
    pub job: Option<Arc<crate::migration::job::Job>>,
    /// Set by undefine under the lock: a handle still held elsewhere must
    /// not act on a domain that no longer exists.
    pub removed: bool,
}

pub struct Domain {
    pub name: String,
    pub uuid: Uuid,
    pub state: tokio::sync::Mutex<DomainState>,
    pub console: ConsoleHub,
    /// Follows the domain's console log for live clients.
    console_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Domain {
    pub fn new(def: Definition, uuid: Uuid, reason: &str) -> Domain {
        Domain {
            name: def.name.clone(),
            uuid,
            state: tokio::sync::Mutex::new(DomainState {
                def,
                run: Run::ShutOff {
                    reason: reason.into(),
                },
                job: None,
                removed: false,
            }),
            console: ConsoleHub::default(),
            console_task: Mutex::new(None),
        }
    }

    /// Start following the console log (once per domain, for its life).
    pub fn follow_console(&self, log: &Path) {
        match self.console.follow(log) {
            Ok(t) => {
                if let Some(old) = self
                    .console_task
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .replace(t)
                {
                    old.abort();
                }
            }
            Err(e) => {
                tracing::warn!(domain = %self.name, error = %crate::error::chain(&e), "live console unavailable")
            }
        }
    }

    pub fn stop_console(&self) {
        if let Some(t) = self
            .console_task
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            t.abort();
        }
    }
}

impl DomainState {
    /// Refuse a mutating call while a job holds the domain.
    pub fn check_no_job(&self, name: &str) -> Result<(), AgentError> {
        match &self.job {
            Some(j) => Err(AgentError::Busy(j.busy_message(name))),
            None => Ok(()),
        }
    }
}

pub struct Agent {
    pub cfg: Config,
    store: Store,
    domids: DomidAllocator,
    table: Mutex<DomainTable<Arc<Domain>, Arc<Instance>>>,
    probes: ProbeCache,
    /// SELinux MCS pair per domain (domain::mcs).
    mcs: Mutex<crate::domain::mcs::McsTable>,
    /// The resolved `qemu_user`.
    pub(crate) qemu_user: Option<crate::instance::runas::QemuUser>,
    /// What `metrics` reports (crate::metrics), kept in `<state>/metrics.json`.
    tally: Mutex<crate::metrics::TallyStore>,
    /// When this agent process opened its state (Unix seconds).
    started_at_s: u64,
    _lock: nix::fcntl::Flock<std::fs::File>,
}

/// Now, in Unix seconds (0 if the clock is before 1970).
fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(serde::Serialize, serde::Deserialize)]
struct StatusFile {
    format: String,
    version: u32,
    instance: InstanceRecord,
}

const STATUS_FORMAT: &str = "qlive-status";
const STATUS_VERSION: u32 = 1;

impl Agent {
    /// Create directories, take the agent lock, load definitions and
    /// re-adopt running instances.
    pub async fn open(cfg: Config) -> Result<Arc<Agent>, AgentError> {
        for (dir, mode) in [(&cfg.state_dir, 0o700), (&cfg.run_dir, 0o755)] {
            fsutil::create_dir(dir, mode).map_err(|source| AgentError::Io {
                what: format!("creating {}", dir.display()),
                source,
            })?;
        }
        let lock_path = cfg.run_dir.join("agent.lock");
        let lock_file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| AgentError::Io {
                what: format!("opening {}", lock_path.display()),
                source,
            })?;
        let lock = take_agent_lock(lock_file, &lock_path).await?;
        let store = Store::open(&cfg.state_dir)?;
        let domids = DomidAllocator::open(&cfg.state_dir)?;
        let mcs = crate::domain::mcs::McsTable::open(&cfg.state_dir)?;
        let qemu_user = match &cfg.qemu_user {
            Some(name) => Some(
                crate::instance::runas::QemuUser::resolve(name).map_err(|e| AgentError::Io {
                    what: e.to_string(),
                    source: io::Error::other("--qemu-user"),
                })?,
            ),
            None => None,
        };
        fsutil::create_dir(&cfg.state_dir.join("console"), 0o700).map_err(|source| {
            AgentError::Io {
                what: "creating console log directory".into(),
                source,
            }
        })?;
        let started_at_s = now_unix();
        let (tally, tally_err) = crate::metrics::TallyStore::open(&cfg.state_dir, started_at_s);
        if let Some(e) = tally_err {
            tracing::warn!(error = %crate::error::chain(&e), "metrics: counting starts again from zero");
        }
        let agent = Arc::new(Agent {
            cfg,
            store,
            domids,
            table: Mutex::new(DomainTable::default()),
            probes: ProbeCache::default(),
            mcs: Mutex::new(mcs),
            qemu_user,
            tally: Mutex::new(tally),
            started_at_s,
            _lock: lock,
        });
        recover::recover(&agent).await?;
        Ok(agent)
    }

    /// Change the tally and write it; a failed write is logged (metrics
    /// never fail an operation) and retried with the next change.
    fn count(&self, f: impl FnOnce(&mut crate::metrics::Tally)) {
        let mut t = self.tally.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut t.tally);
        if let Err(e) = t.save() {
            tracing::warn!(error = %crate::error::chain(&e), "metrics not saved");
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, DomainTable<Arc<Domain>, Arc<Instance>>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn lookup(&self, name: &str) -> Result<Arc<Domain>, AgentError> {
        Ok(self.table().lookup(name)?)
    }

    fn status_path(&self, name: &str) -> PathBuf {
        crate::instance::paths::domain_run_dir(&self.cfg.run_dir, name).join("status.json")
    }

    fn console_log(&self, name: &str) -> PathBuf {
        crate::console::log_path(&self.cfg.state_dir, name)
    }

    fn nvram_path(&self, name: &str) -> PathBuf {
        crate::instance::firmware::nvram_path(&self.cfg.state_dir, name)
    }

    /// A UEFI domain's NVRAM, created from its template at the first start
    /// (crate::instance::firmware); None for a BIOS domain.
    fn prepare_nvram(&self, def: &Definition) -> Result<Option<PathBuf>, AgentError> {
        use crate::instance::firmware::{ensure_nvram, FirmwareError};
        if def.firmware != crate::domain::definition::Firmware::Uefi {
            return Ok(None);
        }
        let path = self.nvram_path(&def.name);
        let template = def
            .nvram_template
            .as_deref()
            .unwrap_or(Path::new(crate::domain::definition::OVMF_VARS));
        match ensure_nvram(&path, template) {
            Ok(true) => {
                tracing::info!(domain = %def.name, nvram = %path.display(), template = %template.display(), "NVRAM created from its template")
            }
            Ok(false) => {}
            Err(FirmwareError::Open {
                field,
                path,
                source,
            }) => {
                return Err(DefinitionError::Invalid {
                    field: field.into(),
                    reason: format!("{}: {}", path.display(), crate::error::chain(&source)),
                }
                .into())
            }
            Err(e) => {
                return Err(AgentError::Start {
                    name: def.name.clone(),
                    source: crate::instance::InstanceError::Firmware(e),
                })
            }
        }
        Ok(Some(path))
    }

    fn write_status(&self, name: &str, rec: &InstanceRecord) -> Result<(), AgentError> {
        let path = self.status_path(name);
        let doc = StatusFile {
            format: STATUS_FORMAT.into(),
            version: STATUS_VERSION,
            instance: rec.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&doc).map_err(|e| AgentError::Io {
            what: "encoding status".into(),
            source: io::Error::other(e),
        })?;
        fsutil::write_atomic(&path, &bytes, 0o600).map_err(|source| AgentError::Io {
            what: format!("writing {}", path.display()),
            source,
        })
    }

    fn read_status(&self, name: &str) -> Result<Option<InstanceRecord>, AgentError> {
        let path = self.status_path(name);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(AgentError::Io {
                    what: format!("reading {}", path.display()),
                    source,
                })
            }
        };
        let doc: StatusFile = serde_json::from_slice(&bytes).map_err(|e| AgentError::Io {
            what: format!("status file {} is corrupt", path.display()),
            source: io::Error::other(e),
        })?;
        if doc.format != STATUS_FORMAT || doc.version > STATUS_VERSION {
            return Err(AgentError::Io {
                what: format!(
                    "status file {} has format {:?} version {}, not understood by this qlive",
                    path.display(),
                    doc.format,
                    doc.version
                ),
                source: io::Error::from(io::ErrorKind::InvalidData),
            });
        }
        Ok(Some(doc.instance))
    }

    /// The domain's run is over (no instance of it runs): remove its status
    /// file and its stable sockets (crate::instance::endpoint).
    fn remove_run_files(&self, name: &str) {
        let p = self.status_path(name);
        if let Err(e) = fsutil::remove_file_if_exists(&p) {
            tracing::warn!(path = %p.display(), error = %e, "removing status file");
        }
        for p in [
            crate::instance::paths::guest_agent_socket(&self.cfg.run_dir, name),
            crate::instance::paths::vnc_socket(&self.cfg.run_dir, name),
        ] {
            crate::instance::endpoint::unlink_socket(&p);
        }
    }

    pub fn domain_count(&self) -> usize {
        self.table().list().len()
    }

    /// One line for systemd's STATUS= and the startup log.
    pub async fn summary(&self) -> String {
        let doms = self.table().list();
        let (mut running, mut jobs, mut crashed) = (0, 0, 0);
        for d in &doms {
            let st = d.state.lock().await;
            match st.run {
                Run::Running(_) => running += 1,
                Run::Crashed { .. } => crashed += 1,
                Run::ShutOff { .. } | Run::Unreachable { .. } => {}
            }
            if st.job.is_some() {
                jobs += 1;
            }
        }
        let mut line = format!(
            "{} domains, {running} running, {jobs} migrating",
            doms.len()
        );
        if crashed > 0 {
            line.push_str(&format!(", {crashed} crashed (see qlive list)"));
        }
        line
    }
}

impl Agent {
    /// The domain's MCS pair, allocated (and persisted) if it has none.
    pub(crate) fn mcs_pair(
        &self,
        name: &str,
    ) -> Result<crate::domain::mcs::McsPair, crate::domain::mcs::McsError> {
        let mut t = self.mcs.lock().unwrap_or_else(|e| e.into_inner());
        t.ensure(name, random_u32)
    }

    /// The labels an instance of the domain gets: None without SELinux.
    pub(crate) fn selinux_labels(
        &self,
        name: &str,
    ) -> Result<Option<crate::instance::selinux::Labels>, crate::domain::mcs::McsError> {
        if !crate::instance::selinux::enabled() {
            return Ok(None);
        }
        Ok(Some(crate::instance::selinux::Labels::new(
            self.mcs_pair(name)?,
        )))
    }

    /// Can the QEMU user open every file the definition names by path?
    pub(crate) fn check_qemu_access(&self, def: &Definition) -> Result<(), DefinitionError> {
        let Some(u) = &self.qemu_user else {
            return Ok(());
        };
        crate::instance::runas::check_definition(u, def).map_err(|(field, reason)| {
            DefinitionError::Invalid {
                field,
                reason: format!("QEMU runs as {}: {reason}", u.name),
            }
        })
    }

    pub(crate) fn release_mcs(&self, name: &str) {
        let mut t = self.mcs.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = t.release(name) {
            tracing::warn!(domain = name, error = %crate::error::chain(&e), "releasing the MCS pair");
        }
    }
}

/// Take the agent lock, waiting up to 2 s for it. A flock belongs to the
/// open file, which a child of a killed agent still shares between its fork
/// and its exec (a probe or a QEMU being spawned): for those milliseconds the
/// lock looks held though no agent runs. A second agent holds it for good.
async fn take_agent_lock(
    mut file: std::fs::File,
    path: &Path,
) -> Result<nix::fcntl::Flock<std::fs::File>, AgentError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((f, nix::errno::Errno::EWOULDBLOCK)) if std::time::Instant::now() < deadline => {
                file = f;
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                return Err(AgentError::AlreadyRunning(path.to_path_buf()))
            }
            Err((_, errno)) => {
                return Err(AgentError::Io {
                    what: format!("locking {}", path.display()),
                    source: std::io::Error::from(errno),
                })
            }
        }
    }
}

/// Random bits (the OS generator, through uuid's v4), for generated MACs
/// and MCS pairs.
pub(crate) fn random_u32() -> u32 {
    let b = *uuid::Uuid::new_v4().as_bytes();
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Run the agent until SIGTERM/SIGINT. Guests keep running after it exits.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let agent = Agent::open(cfg)
        .await
        .map_err(|e| anyhow::anyhow!(crate::error::chain(&e)))?;
    let activated = sd::activated_listener();
    let socket_activated = activated.is_some();
    let listener = match activated {
        Some(l) => {
            l.set_nonblocking(true)?;
            tracing::info!("using the API socket passed by systemd");
            tokio::net::UnixListener::from_std(l)?
        }
        None => server::bind(&agent.cfg.socket, &agent.cfg.api_group)?,
    };

    let summary = agent.summary().await;
    tracing::info!(socket = %agent.cfg.socket.display(), %summary, "qlive agent ready");
    sd::ready(&summary);
    sd::spawn_watchdog();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let status_agent = agent.clone();
    tokio::spawn(async move {
        let mut t = tokio::time::interval(std::time::Duration::from_secs(10));
        loop {
            t.tick().await;
            sd::status(&status_agent.summary().await);
        }
    });
    tokio::select! {
        r = server::serve(agent.clone(), listener) => r?,
        _ = term.recv() => tracing::info!("SIGTERM: agent stopping; guests keep running"),
        _ = int.recv() => tracing::info!("SIGINT: agent stopping; guests keep running"),
    }
    sd::stopping();
    // A socket systemd owns stays (the next agent inherits it).
    if !socket_activated {
        let _ = std::fs::remove_file(&agent.cfg.socket);
    }
    Ok(())
}

/// The API's view of a migration job (`job`, `info.job`).
pub(crate) fn job_info(j: &crate::migration::job::Job) -> crate::api::JobInfo {
    crate::api::JobInfo {
        kind: j.kind.to_string(),
        phase: j.phase().as_str().to_string(),
        elapsed_ms: j.started.elapsed().as_millis() as u64,
        started_at: j.started_at,
        bytes: j.bytes(),
        past_switchover: j.past_switchover(),
        target: j.target().map(|t| crate::api::JobTarget {
            domid: t.domid,
            pid: t.pid,
            emulator: t.emulator,
        }),
    }
}

pub(crate) fn path_str(p: &Path) -> String {
    p.display().to_string()
}
