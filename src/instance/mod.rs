//! One QEMU instance: spawn, adopt after an agent restart, stop, clean up.
//!
//! QEMU runs with `-daemonize`: when the spawn returns, QEMU has created its
//! sockets and pidfile, and it is no child of the agent, so it outlives the
//! agent's exit, SIGKILL and restart. The agent keeps, per instance, a pidfd
//! (exit notification without pid-reuse races), a QMP connection, and the
//! guest RAM memfd it passed in at fd [`memory::GUEST_RAM_FD`].

pub mod cmdline;
pub mod domid;
pub mod endpoint;
pub mod files;
pub mod firmware;
pub mod kvm;
pub mod memory;
pub mod paths;
pub mod probe;
pub mod process;
pub mod runas;
pub mod sandbox;
pub mod selinux;
pub mod steering;
pub mod tap;
pub mod tapguard;

use crate::domain::Definition;
use crate::fsutil;
use crate::qmp::{QemuVersion, Qmp, QmpError};
use cmdline::{EffectiveAccel, StartMode};
use endpoint::{Endpoint, EndpointError, Endpoints};
use memory::{GuestRam, GUEST_RAM_FD};
use paths::InstancePaths;
use process::{Pidfd, ProcessError, ProcessIdentity};
use serde::{Deserialize, Serialize};
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tap::{Tap, TapError};

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("the record of domid {domid} is not a foreign QEMU's")]
    NotForeign { domid: u64 },
    #[error("socket path {path} is over the {limit}-byte limit of unix sockets; use a shorter --run-dir")]
    PathTooLong { path: PathBuf, limit: usize },
    #[error("creating instance directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("launching {emulator}")]
    Launch {
        emulator: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("QEMU {emulator} failed to start ({status}): {log}")]
    Start {
        emulator: PathBuf,
        status: String,
        log: String,
    },
    #[error("reading pidfile {path}")]
    Pidfile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("tracking QEMU process")]
    Process(#[from] ProcessError),
    #[error("connecting QMP of instance {domid}")]
    Qmp {
        domid: u64,
        #[source]
        source: QmpError,
    },
    #[error("guest RAM")]
    Memory(#[from] memory::MemoryError),
    #[error("network")]
    Tap(#[from] TapError),
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    #[error("tap guard")]
    TapGuard(#[source] tapguard::TapGuardError),
    #[error(
        "nics[{nic}].queues is {defined} but the running guest's tap has {running}: \
         the queue count is fixed for a run of the domain; stop and start it to apply"
    )]
    QueuesChanged {
        nic: usize,
        running: u16,
        defined: u16,
    },
    #[error("steering the taps' frames")]
    Steering(#[source] steering::SteeringError),
    #[error("UEFI firmware")]
    Firmware(#[source] firmware::FirmwareError),
    #[error("SELinux: labelling {what} {context}")]
    Label {
        what: String,
        context: String,
        #[source]
        source: io::Error,
    },
}

/// Which file a disk path named when an instance opened it: preflight
/// refuses to move a guest whose image path now names another file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskId {
    pub path: PathBuf,
    pub dev: u64,
    pub ino: u64,
}

impl DiskId {
    pub fn of(path: &Path) -> io::Result<DiskId> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        Ok(DiskId {
            path: path.to_path_buf(),
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

/// What the agent persists about a running instance (in the domain's
/// runtime status file) to re-adopt it after a restart.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InstanceRecord {
    pub domid: u64,
    pub process: ProcessIdentity,
    pub emulator: PathBuf,
    pub qemu_version: QemuVersion,
    pub machine: String,
    pub accel: EffectiveAccel,
    pub paths: InstancePaths,
    pub ram_inode: u64,
    /// Unix time (seconds) the instance was started.
    pub started_at: u64,
    /// Files the instance loaded at start (mapped libraries and modules,
    /// firmware from `info roms`), with their identity then: what stale
    /// detection compares against.
    #[serde(default)]
    pub loaded: Vec<files::FileId>,
    /// The firmware the guest runs (ROMs from `info roms`, the UEFI code
    /// and VARS template), with its identity when the domain cold-booted:
    /// a migration carries the images in guest memory and the destination
    /// inherits this list, and a guest reset does not reload them. Records
    /// of an older qlive have the ROMs in `loaded` instead.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub firmware: Vec<files::FileId>,
    /// Tap names, NIC `i`'s first queue at fd `FIRST_TAP_FD + i` in the
    /// process (the others: `cmdline::tap_fd_numbers`).
    #[serde(default)]
    pub taps: Vec<String>,
    /// Queue pairs per NIC, each tap holding two sets of them
    /// (`instance::tap`). Empty: an older qlive's single-queue taps.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tap_queues: Vec<u16>,
    /// The set of each tap's queues this instance reads.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub tap_set: u8,
    /// The disk images as the instance opened them.
    #[serde(default)]
    pub disks: Vec<DiskId>,
    /// The guest agent's stable socket, whose listening fd the instance
    /// holds at `cmdline::guest_agent_fd`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_agent: Option<PathBuf>,
    /// The VNC stable socket, whose listening fd the instance holds at
    /// `cmdline::vnc_fd`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vnc: Option<PathBuf>,
    /// The user QEMU runs as, when not root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The instance runs under the tap guard, whose listener it holds at
    /// `cmdline::tapguard_fd` (instance::tapguard). An older qlive's
    /// instances do not.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tap_guard: bool,
    /// What the kernel answered the offload probes on the domain's taps
    /// when the agent opened them (the guard answers a destination's
    /// probes with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap_offloads: Option<tap::TapOffloads>,
    /// The guest RAM block's name in the migration stream (the memory
    /// backend's id): `cmdline::RAM_ID` unless the domain was adopted from
    /// a QEMU that named it otherwise (`pc.ram`). Every destination
    /// inherits it: blocks are matched by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram_block: Option<String>,
    /// A QEMU that qlive did not start, being adopted (the source of the
    /// adoption's migration): its own QMP socket; it holds none of the
    /// domain's memfd, taps or sockets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub foreign: Option<Foreign>,
}

/// How the agent reaches a foreign QEMU (see [`InstanceRecord::foreign`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Foreign {
    pub qmp: PathBuf,
}

impl InstanceRecord {
    /// The RAM block's name (see [`InstanceRecord::ram_block`]).
    pub fn ram_block(&self) -> &str {
        self.ram_block.as_deref().unwrap_or(cmdline::RAM_ID)
    }
}

fn is_zero(v: &u8) -> bool {
    *v == 0
}

/// A live instance held by the agent.
pub struct Instance {
    pub record: InstanceRecord,
    pub qmp: Arc<Qmp>,
    pub pidfd: Arc<Pidfd>,
    /// The domain's guest RAM; None only for a foreign QEMU being adopted
    /// (its RAM is its own, and the adoption copies it).
    pub ram: Option<Arc<GuestRam>>,
    /// The domain's taps, shared with every instance like `ram`.
    pub taps: Arc<Vec<Tap>>,
    /// The domain's stable sockets, shared the same way.
    pub endpoints: Arc<Endpoints>,
    /// Who may reconfigure the taps (None: no NICs, or an instance of an
    /// older qlive).
    pub tap_guard: Option<Arc<tapguard::TapGuard>>,
    /// Why the agent itself is ending this instance (stop, destroy), so
    /// whoever notices the exit first records the right reason.
    exit_intent: std::sync::Mutex<Option<String>>,
}

/// Everything needed to start one instance.
pub struct SpawnSpec<'a> {
    pub def: &'a Definition,
    pub domid: u64,
    pub machine: &'a str,
    pub accel: EffectiveAccel,
    pub paths: InstancePaths,
    pub console_log: &'a Path,
    pub mode: StartMode,
    pub ram: Arc<GuestRam>,
    pub taps: Arc<Vec<Tap>>,
    /// The set of the taps' queues the instance reads: 0 for a boot, the
    /// one its source does not read for a destination.
    pub tap_set: u8,
    pub endpoints: Arc<Endpoints>,
    /// The domain's SELinux labels; None when SELinux is not enabled.
    pub labels: Option<selinux::Labels>,
    /// Run QEMU as this user; None: as root (the agent's user).
    pub run_as: Option<&'a runas::QemuUser>,
    /// The emulator's firmware search path (from the probe), to resolve the
    /// firmware files the instance loads.
    pub data_dirs: &'a [PathBuf],
    /// The domain's NVRAM (`firmware: "uefi"`), created by the caller.
    pub nvram: Option<&'a Path>,
    /// The firmware the guest runs, when it is not this instance's own:
    /// a migration's destination gets the source's record (the flash and
    /// ROM contents come with the migration stream). None: a cold boot,
    /// record what this QEMU loads.
    pub inherit_firmware: Option<Vec<files::FileId>>,
    /// The RAM block's name (see [`InstanceRecord::ram_block`]); None:
    /// `cmdline::RAM_ID`.
    pub ram_block: Option<String>,
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Occupy every free fd number an instance inherits at (guest RAM, taps,
/// console log) with /dev/null (close-on-exec), for the life of the
/// process. Otherwise a pipe std creates just before a fork (to report a
/// failed exec) could get one of those numbers, and placing an fd there in
/// the child would replace it: an error record could then land in a tap,
/// the console log or guest RAM. Call once at start, before other threads.
pub fn reserve_inherited_fd_numbers() -> io::Result<()> {
    // guest RAM, the taps, the console log, the guest agent's and VNC's
    // sockets, the NVRAM, the tap guard's listener
    // and every tap queue beyond the first of each NIC
    let last = cmdline::last_inherited_fd();
    for n in GUEST_RAM_FD..=last {
        // SAFETY: F_GETFD only probes whether `n` is open.
        if unsafe { libc::fcntl(n, libc::F_GETFD) } >= 0 {
            continue;
        }
        // SAFETY: open/dup3/close on fds this function owns; `n` is free.
        unsafe {
            let fd = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            if fd != n {
                let r = libc::dup3(fd, n, libc::O_CLOEXEC);
                libc::close(fd);
                if r < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
        }
    }
    Ok(())
}

/// Last lines of a QEMU log, for error messages.
pub fn log_tail(path: &Path) -> String {
    let s = read_small_regular(path, 1 << 20).unwrap_or_default();
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = &lines[lines.len().saturating_sub(5)..];
    if tail.is_empty() {
        "(no output)".into()
    } else {
        tail.join(" | ")
    }
}

/// Start QEMU paused (`-S`). The caller records the
/// instance, then sends `cont` (or migrates into it). On any error nothing
/// is left: the process is killed and the instance directory removed.
pub async fn spawn(spec: SpawnSpec<'_>) -> Result<Instance, InstanceError> {
    let paths = spec.paths.clone();
    if let Some(p) = paths.too_long_socket() {
        return Err(InstanceError::PathTooLong {
            path: p.to_path_buf(),
            limit: paths::MAX_SOCKET_PATH,
        });
    }
    // An unprivileged QEMU must be able to pass through the domain's run
    // directory to its own instance directory, which it owns.
    let parent_mode = if spec.run_as.is_some() { 0o711 } else { 0o700 };
    if let Some(parent) = paths.dir.parent() {
        fsutil::create_dir(parent, parent_mode).map_err(|source| InstanceError::CreateDir {
            path: parent.to_path_buf(),
            source,
        })?;
        if spec.run_as.is_some() {
            // `<run>/domains/<name>` and `<run>/domains` (which an agent
            // without a QEMU user created 0700).
            use std::os::unix::fs::PermissionsExt;
            for dir in [Some(parent), parent.parent()].into_iter().flatten() {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).map_err(
                    |source| InstanceError::CreateDir {
                        path: dir.to_path_buf(),
                        source,
                    },
                )?;
            }
        }
    }
    std::fs::DirBuilder::new()
        .create(&paths.dir)
        .map_err(|source| InstanceError::CreateDir {
            path: paths.dir.clone(),
            source,
        })?;
    if let Some(u) = spec.run_as {
        if let Err(e) = nix::unistd::chown(
            &paths.dir,
            Some(nix::unistd::Uid::from_raw(u.uid)),
            Some(nix::unistd::Gid::from_raw(u.gid)),
        ) {
            cleanup_paths(&paths);
            return Err(InstanceError::CreateDir {
                path: paths.dir.clone(),
                source: e.into(),
            });
        }
    }
    let result = spawn_in_dir(&spec).await;
    if result.is_err() {
        cleanup_paths(&paths);
    }
    result
}

async fn spawn_in_dir(spec: &SpawnSpec<'_>) -> Result<Instance, InstanceError> {
    let paths = &spec.paths;
    let emulator = spec.def.emulator.clone();
    let ram_id = spec.ram_block.as_deref().unwrap_or(cmdline::RAM_ID);
    let args = cmdline::build(spec.def, spec.machine, spec.accel, paths, spec.mode, ram_id);
    // The console log, opened here and passed (see cmdline): never through
    // a link, never a FIFO or device.
    let console = fsutil::open_log_nofollow(spec.console_log, false).map_err(|e| {
        InstanceError::CreateDir {
            path: spec.console_log.to_path_buf(),
            source: io::Error::other(e),
        }
    })?;
    // The directory is fresh (and may belong to the QEMU user): create the
    // log exclusively, never through a link, never blocking on a FIFO.
    use std::os::unix::fs::OpenOptionsExt;
    let log = std::fs::OpenOptions::new()
        .create_new(true)
        .append(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(&paths.log)
        .map_err(|source| InstanceError::CreateDir {
            path: paths.log.clone(),
            source,
        })?;
    let log2 = log.try_clone().map_err(|source| InstanceError::CreateDir {
        path: paths.log.clone(),
        source,
    })?;
    // (fd in the agent, fd number in QEMU): guest RAM, then the taps'
    // queues, the set it reads first.
    let mut fds: Vec<(i32, i32)> = vec![(spec.ram.raw_fd(), GUEST_RAM_FD)];
    let layout: Vec<u16> = spec.taps.iter().map(|t| t.queues()).collect();
    let mut queue_fds: Vec<(i32, usize, u16)> = Vec::new();
    for (i, t) in spec.taps.iter().enumerate() {
        let want = spec.def.nics.get(i).map_or(1, |n| n.queues());
        if t.queues() != want && !(t.queues() == 0 && want == 1) {
            return Err(InstanceError::QueuesChanged {
                nic: i,
                running: t.queues(),
                defined: want,
            });
        }
        let (own, other) = cmdline::tap_fd_numbers(&layout, i);
        for (j, &n) in own.iter().enumerate() {
            queue_fds.push((n, i, j as u16));
        }
        use std::os::fd::AsRawFd;
        for (f, n) in t
            .fds_for(spec.tap_set)
            .iter()
            .zip(own.iter().chain(other.iter()))
        {
            fds.push((f.as_raw_fd(), *n));
        }
    }
    {
        use std::os::fd::AsRawFd;
        fds.push((console.as_raw_fd(), cmdline::console_fd(spec.def)));
    }
    if spec.def.guest_agent {
        let Some(ga) = &spec.endpoints.guest_agent else {
            return Err(InstanceError::Endpoint(EndpointError::NotSocket {
                path: PathBuf::from("(the guest agent's socket was not created)"),
            }));
        };
        fds.push((ga.raw_fd(), cmdline::guest_agent_fd(spec.def)));
    }
    if spec.def.vnc {
        let Some(v) = &spec.endpoints.vnc else {
            return Err(InstanceError::Endpoint(EndpointError::NotSocket {
                path: PathBuf::from("(the VNC socket was not created)"),
            }));
        };
        fds.push((v.raw_fd(), cmdline::vnc_fd(spec.def)));
    }
    // The NVRAM, opened here like the console log (cmdline::nvram_fd).
    let nvram = match (spec.def.firmware, spec.nvram) {
        (crate::domain::definition::Firmware::Uefi, Some(p)) => {
            Some(firmware::open_nvram(p).map_err(InstanceError::Firmware)?)
        }
        (crate::domain::definition::Firmware::Uefi, None) => {
            return Err(InstanceError::Firmware(firmware::FirmwareError::NoNvram))
        }
        _ => None,
    };
    if let Some(f) = &nvram {
        use std::os::fd::AsRawFd;
        fds.push((f.as_raw_fd(), cmdline::nvram_fd(spec.def)));
    }
    let run_as = spec.run_as.cloned();
    if let Some(l) = &spec.labels {
        apply_labels(spec, l)?;
    }
    let exec_context = spec.labels.as_ref().map(|l| l.process.clone());
    // The tap guard's filter, for an instance with NICs; it owns the guest
    // from the start when it boots it, not when it waits for a migration.
    let tap_filter = (!spec.taps.is_empty()).then(tapguard::Filter::new);
    let guarded = tap_filter.is_some();
    let guard_queues = tapguard::Queues {
        taps: Arc::downgrade(&spec.taps),
        set: spec.tap_set,
        fds: queue_fds,
    };
    let tap_offloads = spec.taps.first().map(|t| t.offloads());
    let tapguard_fd = cmdline::tapguard_fd(spec.def);
    let qemu_caps = sandbox::QemuCaps::new();
    // guest RAM, the taps' queues, the console log, the guest agent's and
    // VNC's sockets and the NVRAM must fit the fixed array in pre_exec
    const MOVED: usize = 192;
    if fds.len() > MOVED {
        return Err(InstanceError::Launch {
            emulator: emulator.clone(),
            source: io::Error::other(format!("{} inherited fds, at most {MOVED}", fds.len())),
        });
    }
    let mut cmd = std::process::Command::new(&emulator);
    cmd.args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log2)
        .current_dir("/");
    // SAFETY: only async-signal-safe calls (fcntl/dup2) between fork and
    // exec, on a Vec allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            // First move every source out of the target range (close-on-
            // exec copies), so no dup2 overwrites a source not yet placed.
            let mut tmp = [0i32; MOVED];
            for (k, (src, _)) in fds.iter().enumerate().take(tmp.len()) {
                let t = libc::fcntl(*src, libc::F_DUPFD_CLOEXEC, 64);
                if t < 0 {
                    return Err(io::Error::last_os_error());
                }
                tmp[k] = t;
            }
            for (k, (_, dst)) in fds.iter().enumerate().take(tmp.len()) {
                // dup2 clears close-on-exec on the target.
                if libc::dup2(tmp[k], *dst) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            // no_new_privs: the seccomp rule needs it (or CAP_SYS_ADMIN,
            // which the agent does not keep), and QEMU never gains more
            // than the agent's bound through exec.
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // Unprivileged user (all capabilities go with the uid), or
            // root keeping CAP_DAC_OVERRIDE only.
            match &run_as {
                Some(u) => u.switch()?,
                None => qemu_caps.install()?,
            }
            if let Some(f) = &tap_filter {
                f.install(tapguard_fd)?;
            }
            if let Some(ctx) = &exec_context {
                selinux::set_exec_context(ctx)?;
            }
            Ok(())
        });
    }
    tracing::debug!(emulator = %emulator.display(), ?args, "spawning QEMU");
    // -daemonize: the process we start exits once QEMU is initialised.
    // Its initialisation issues the tap ioctls the guard answers, so the
    // guard serves the listener before we wait (the exec'd process holds
    // it at `tapguard_fd` from the moment spawn returns).
    let owner = spec.mode == StartMode::Boot;
    let launched = tokio::task::spawn_blocking(move || {
        let mut child = cmd.spawn()?;
        let guard = if guarded {
            let got = Pidfd::open(child.id() as i32)
                .map_err(io::Error::other)
                .and_then(|p| {
                    tapguard::TapGuard::recover(
                        &p,
                        tapguard_fd,
                        owner,
                        tap_offloads.unwrap_or_default(),
                        Some(guard_queues),
                    )
                    .map_err(io::Error::other)
                });
            match got {
                Ok(g) => Some(g),
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(e);
                }
            }
        } else {
            None
        };
        child.wait().map(|st| (st, guard))
    })
    .await
    .map_err(|e| InstanceError::Launch {
        emulator: emulator.clone(),
        source: io::Error::other(e),
    })?
    .map_err(|source| InstanceError::Launch {
        emulator: emulator.clone(),
        source,
    });
    let (status, tap_guard) = match launched {
        Ok(l) => l,
        Err(e) => {
            // A daemon forked before the guard failed waits for answers
            // nobody gives: find it by its command line.
            kill_unrecorded(&spec.def.name, &paths.dir).await;
            return Err(e);
        }
    };
    let tap_guard = tap_guard.map(Arc::new);
    if !status.success() {
        // A daemonized child may exist if QEMU failed late; kill it.
        if let Ok(pid) = read_pidfile(&paths.pid) {
            if let Ok(p) = Pidfd::open(pid) {
                if is_our_qemu(pid, spec).is_ok() {
                    let _ = p.kill_and_wait(Duration::from_secs(5)).await;
                }
            }
        }
        return Err(InstanceError::Start {
            emulator,
            status: status.to_string(),
            log: log_tail(&paths.log),
        });
    }
    let pid = read_pidfile(&paths.pid).map_err(|source| InstanceError::Pidfile {
        path: paths.pid.clone(),
        source,
    })?;
    let pidfd = Pidfd::open(pid)?;
    // The pidfile is in a directory QEMU (maybe another user) can write:
    // trust the pid only for the process started here.
    if let Err(why) = is_our_qemu(pid, spec) {
        return Err(InstanceError::Start {
            emulator,
            status: format!("pidfile names pid {pid}, {why}; nothing was signalled"),
            log: log_tail(&paths.log),
        });
    }
    let finish = async {
        let process = ProcessIdentity::read(pid)?;
        let qmp = Qmp::connect(&paths.qmp)
            .await
            .map_err(|source| InstanceError::Qmp {
                domid: spec.domid,
                source,
            })?;
        let loaded = files::mapped_files(pid).unwrap_or_default();
        let firmware = match &spec.inherit_firmware {
            Some(f) => f.clone(),
            None => {
                let mut f = rom_files(&qmp, spec.data_dirs).await;
                f.extend(firmware::boot_images(spec.def));
                f
            }
        };
        let disks = spec
            .def
            .disks
            .iter()
            .filter_map(|d| match DiskId::of(&d.path) {
                Ok(id) => Some(id),
                Err(e) => {
                    tracing::warn!(disk = %d.path.display(), error = %e, "cannot record the disk's identity");
                    None
                }
            })
            .collect();
        let record = InstanceRecord {
            domid: spec.domid,
            process,
            emulator: spec.def.emulator.clone(),
            qemu_version: qmp.version().clone(),
            machine: spec.machine.to_string(),
            accel: spec.accel,
            paths: paths.clone(),
            ram_inode: spec.ram.inode(),
            started_at: now_unix(),
            loaded,
            firmware,
            taps: spec.taps.iter().map(|t| t.name().to_string()).collect(),
            tap_queues: if layout.contains(&0) {
                vec![]
            } else {
                layout.clone()
            },
            tap_set: spec.tap_set,
            disks,
            guest_agent: spec
                .endpoints
                .guest_agent
                .as_ref()
                .filter(|_| spec.def.guest_agent)
                .map(|e| e.path().to_path_buf()),
            vnc: spec
                .endpoints
                .vnc
                .as_ref()
                .filter(|_| spec.def.vnc)
                .map(|e| e.path().to_path_buf()),
            user: spec.run_as.map(|u| u.name.clone()),
            tap_guard: tap_guard.is_some(),
            tap_offloads,
            ram_block: spec.ram_block.clone(),
            foreign: None,
        };
        Ok::<_, InstanceError>((record, qmp))
    };
    match finish.await {
        Ok((record, qmp)) => Ok(Instance {
            record,
            qmp: Arc::new(qmp),
            pidfd: Arc::new(pidfd),
            ram: Some(spec.ram.clone()),
            taps: spec.taps.clone(),
            endpoints: spec.endpoints.clone(),
            tap_guard,
            exit_intent: Default::default(),
        }),
        Err(e) => {
            let _ = pidfd.kill_and_wait(Duration::from_secs(5)).await;
            Err(e)
        }
    }
}

impl Instance {
    /// The set of the taps' queues this instance reads.
    pub fn tap_set(&self) -> u8 {
        self.record.tap_set & 1
    }

    /// From now on the taps hand every frame to this instance's queues (a
    /// migration's destination, before `migrate`); then wait, at most
    /// `timeout` per tap, until the other set's queues are empty: the
    /// source, still running, has read every frame it was given, so none
    /// is left in a QEMU that is about to stop. `Ok(false)`: a queue still
    /// held frames after the timeout (its guest stopped reading).
    pub async fn receive_from_now(&self, timeout: Duration) -> Result<bool, InstanceError> {
        let set = self.tap_set();
        for t in self.taps.iter() {
            t.steer_to(set).map_err(InstanceError::Steering)?;
        }
        let mut drained = true;
        for t in self.taps.iter() {
            if !t.drain(set ^ 1, timeout).await {
                tracing::warn!(tap = t.name(), "the source's queues did not drain");
                drained = false;
            }
        }
        Ok(drained)
    }

    /// This instance keeps (or takes) the guest and no other QEMU reads
    /// the taps: frames go to its queues, and what the other set's
    /// queues still hold (frames a failed destination never read, or a
    /// dead source left) is sent through the tap again, to it.
    pub fn take_traffic(&self) {
        let set = self.tap_set();
        for t in self.taps.iter() {
            if let Err(e) = t.steer_to(set) {
                tracing::error!(
                    tap = t.name(),
                    "steering frames back: {}",
                    crate::error::chain(&e)
                );
            }
            let (sent, dropped) = t.redeliver(set ^ 1);
            if sent + dropped > 0 {
                tracing::info!(
                    tap = t.name(),
                    sent,
                    dropped,
                    "frames the other instance's queues held, delivered again"
                );
            }
        }
    }

    /// Let this instance reconfigure the domain's taps (it is about to run
    /// the guest), or not (another one does). No-op without a guard.
    pub fn set_tap_owner(&self, owner: bool) {
        if let Some(g) = &self.tap_guard {
            g.set_owner(owner);
        }
    }

    /// The firmware the guest runs, for a migration's destination to
    /// inherit. A record of an older qlive has it in `loaded`, among the
    /// mapped files: the recorded files this process does not map.
    pub fn running_firmware(&self) -> Vec<files::FileId> {
        if !self.record.firmware.is_empty() {
            return self.record.firmware.clone();
        }
        let mapped: Vec<PathBuf> = files::mapped_files(self.record.process.pid)
            .unwrap_or_default()
            .into_iter()
            .map(|f| f.path)
            .collect();
        self.record
            .loaded
            .iter()
            .filter(|f| !mapped.contains(&f.path) && f.path != self.record.emulator)
            .cloned()
            .collect()
    }
}

/// Is `pid` the QEMU this spawn started: running as the expected user,
/// with this instance's own QMP socket path on its command line?
fn is_our_qemu(pid: i32, spec: &SpawnSpec<'_>) -> Result<(), String> {
    let proc = procfs::process::Process::new(pid).map_err(|e| format!("unreadable: {e}"))?;
    let uid = proc.uid().map_err(|e| format!("unreadable: {e}"))?;
    let want = spec
        .run_as
        .map(|u| u.uid)
        .unwrap_or_else(|| nix::unistd::geteuid().as_raw());
    if uid != want {
        return Err(format!("which runs as uid {uid}, not {want}"));
    }
    if !runs_instance(pid, &spec.paths) {
        return Err("which is not the QEMU of this instance".to_string());
    }
    Ok(())
}

/// Does process `pid` have this instance's own QMP socket on its command
/// line, i.e. is it the QEMU of these paths (and no other process a
/// pidfile might name)?
pub fn runs_instance(pid: i32, paths: &InstancePaths) -> bool {
    let qmp = format!("path={}", cmdline::qemu_opt_escape(&paths.qmp));
    // Every instance is started with -daemonize: a process that only
    // mentions the path (a `grep` for it) is not one.
    procfs::process::Process::new(pid)
        .and_then(|p| p.cmdline())
        .is_ok_and(|args| {
            args.iter().any(|a| a == "-daemonize") && args.iter().any(|a| a.contains(&qmp))
        })
}

/// Label what the instance will use with the domain's MCS pair.
fn apply_labels(spec: &SpawnSpec<'_>, l: &selinux::Labels) -> Result<(), InstanceError> {
    let fail = |what: String, context: &str| {
        let context = context.to_string();
        move |source| InstanceError::Label {
            what,
            context,
            source,
        }
    };
    use std::os::fd::AsFd;
    selinux::label_fd(spec.ram.as_fd(), &l.image)
        .map_err(fail("the guest-RAM memfd".into(), &l.image))?;
    for p in [&spec.paths.dir, &spec.paths.log] {
        selinux::label_path(p, &l.image).map_err(fail(p.display().to_string(), &l.image))?;
    }
    for d in &spec.def.disks {
        selinux::label_path(&d.path, &l.image)
            .map_err(fail(d.path.display().to_string(), &l.image))?;
    }
    if let Some(nv) = spec.nvram.filter(|p| p.exists()) {
        selinux::label_path(nv, &l.image).map_err(fail(nv.display().to_string(), &l.image))?;
    }
    if spec.console_log.exists() {
        selinux::label_path(spec.console_log, &l.console)
            .map_err(fail(spec.console_log.display().to_string(), &l.console))?;
    }
    Ok(())
}

/// The firmware ROMs a new QEMU read (`info roms`, resolved in its data
/// directories).
async fn rom_files(qmp: &Qmp, data_dirs: &[PathBuf]) -> Vec<files::FileId> {
    let mut loaded: Vec<files::FileId> = Vec::new();
    let roms = qmp
        .execute_raw(
            "human-monitor-command",
            Some(serde_json::json!({"command-line": "info roms"})),
        )
        .await;
    if let Ok(serde_json::Value::String(text)) = roms {
        for f in files::resolve_firmware(&text, data_dirs) {
            if !loaded.iter().any(|x| x.path == f.path) {
                loaded.push(f);
            }
        }
    }
    loaded
}

/// Read a file QEMU wrote in its (possibly user-owned) instance
/// directory: never through a symlink, never a FIFO, at most `limit` bytes
/// (the tail if longer).
fn read_small_regular(path: &Path, limit: u64) -> io::Result<String> {
    use std::io::{Read, Seek};
    let mut f = fsutil::open_regular_nofollow(path).map_err(io::Error::other)?;
    let len = f.metadata()?.len();
    if len > limit {
        f.seek(io::SeekFrom::Start(len - limit))?;
    }
    let mut buf = Vec::new();
    f.take(limit).read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

pub fn read_pidfile(path: &Path) -> io::Result<i32> {
    let s = read_small_regular(path, 64)?;
    s.trim()
        .parse::<i32>()
        .ok()
        .filter(|p| *p > 1)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad pidfile content {s:?}"),
            )
        })
}

/// Re-adopt an instance recorded before an agent restart: the pidfd is
/// opened first and the start time checked, so a reused pid is rejected.
/// `owner`: whether it ran the guest when the agent stopped, as far as the
/// caller knows (see the tap guard below).
pub async fn adopt(record: InstanceRecord, owner: bool) -> Result<Instance, InstanceError> {
    if record.foreign.is_some() {
        return adopt_foreign(record, Arc::default(), Arc::default()).await;
    }
    let pidfd = Pidfd::adopt(&record.process)?;
    let ram = GuestRam::recover(record.process.pid, record.ram_inode)?;
    // An older qlive's record has no queue layout: one single-queue tap
    // per NIC.
    let layout: Vec<u16> = if record.tap_queues.len() == record.taps.len() {
        record.tap_queues.clone()
    } else {
        vec![0; record.taps.len()]
    };
    let domain_dir = record.paths.dir.parent().map(Path::to_path_buf);
    let set = record.tap_set & 1;
    let mut queue_fds: Vec<(i32, usize, u16)> = Vec::new();
    let taps = record
        .taps
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let (own, other) = cmdline::tap_fd_numbers(&layout, i);
            for (j, &n) in own.iter().enumerate() {
                queue_fds.push((n, i, j as u16));
            }
            // Tap::recover wants set 0 first.
            let fds: Vec<i32> = if set == 0 {
                own.iter().chain(other.iter()).copied().collect()
            } else {
                other.iter().chain(own.iter()).copied().collect()
            };
            Tap::recover(
                &pidfd,
                &fds,
                layout[i],
                name,
                record.tap_offloads.unwrap_or_default(),
                domain_dir.as_deref().map(|d| tap::steering_file(d, i)),
                set,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let taps = Arc::new(taps);
    // The stable sockets' fd numbers follow the console log's, which
    // follows the taps' first queues: one per recorded tap.
    let nics = record.taps.len();
    let recover = |path: &Option<PathBuf>, fd: i32| {
        path.as_ref()
            .map(|p| Endpoint::recover(&pidfd, fd, p))
            .transpose()
    };
    let guest_agent = recover(&record.guest_agent, cmdline::guest_agent_fd_for(nics))?;
    let vnc = recover(&record.vnc, cmdline::vnc_fd_for(nics))?;
    // The guard's listener is served before QMP is connected: a QEMU that
    // issued a guarded ioctl while no agent ran (a destination loading the
    // device's state) waits in it with its main loop, and would never
    // greet on QMP. It answers for `owner` (the caller's guess: the
    // instance that ran the guest when the agent stopped) until the
    // vCPUs' state is known; then the instance whose vCPUs run owns the
    // taps, and a stopped one (a migration's destination or stopped
    // source) becomes the owner when it is resumed (`set_tap_owner`).
    let tap_guard = if record.tap_guard {
        Some(Arc::new(
            tapguard::TapGuard::recover(
                &pidfd,
                cmdline::tapguard_fd_for(nics),
                owner,
                record.tap_offloads.unwrap_or_default(),
                Some(tapguard::Queues {
                    taps: Arc::downgrade(&taps),
                    set,
                    fds: queue_fds,
                }),
            )
            .map_err(InstanceError::TapGuard)?,
        ))
    } else {
        None
    };
    let qmp = Qmp::connect(&record.paths.qmp)
        .await
        .map_err(|source| InstanceError::Qmp {
            domid: record.domid,
            source,
        })?;
    if let Some(g) = &tap_guard {
        g.set_owner(matches!(qmp.status().await, Ok((true, _))));
    }
    Ok(Instance {
        record,
        qmp: Arc::new(qmp),
        pidfd: Arc::new(pidfd),
        ram: Some(Arc::new(ram)),
        taps,
        endpoints: Arc::new(Endpoints { guest_agent, vnc }),
        tap_guard,
        exit_intent: Default::default(),
    })
}

/// A foreign QEMU (one qlive did not start) as the source of its adoption:
/// its process (pidfd, start time checked) and its own QMP socket. `taps`
/// and `endpoints` are the ones the agent made for the domain, which the
/// destination will get; the foreign QEMU holds none of them (recovery
/// passes empty ones: the destination holds them by then).
pub async fn adopt_foreign(
    record: InstanceRecord,
    taps: Arc<Vec<Tap>>,
    endpoints: Arc<Endpoints>,
) -> Result<Instance, InstanceError> {
    let Some(foreign) = &record.foreign else {
        return Err(InstanceError::NotForeign {
            domid: record.domid,
        });
    };
    let pidfd = Pidfd::adopt(&record.process)?;
    let qmp = Qmp::connect(&foreign.qmp)
        .await
        .map_err(|source| InstanceError::Qmp {
            domid: record.domid,
            source,
        })?;
    let mut record = record;
    record.qemu_version = qmp.version().clone();
    Ok(Instance {
        record,
        qmp: Arc::new(qmp),
        pidfd: Arc::new(pidfd),
        ram: None,
        taps,
        endpoints,
        tap_guard: None,
        exit_intent: Default::default(),
    })
}

/// Kill every QEMU of the instance directory `dir`: a QEMU spawned but never
/// recorded (killed agent, failed spawn). The pidfile names the daemon once
/// it is written; before that (the agent was killed while QEMU was still
/// starting), the process is found by its command line, which names the
/// directory's QMP socket (unique: a domid is never reused). Scanned until
/// none is left, so a daemon forked meanwhile is caught too.
pub async fn kill_unrecorded(domain: &str, dir: &Path) {
    let paths = InstancePaths::in_dir(dir);
    let mut pids: Vec<i32> = read_pidfile(&paths.pid).into_iter().collect();
    let mut killed: Vec<i32> = Vec::new();
    for _round in 0..5 {
        let scan_paths = paths.clone();
        let found = tokio::task::spawn_blocking(move || processes_of(&scan_paths))
            .await
            .unwrap_or_default();
        pids.extend(found);
        pids.sort_unstable();
        pids.dedup();
        pids.retain(|p| !killed.contains(p));
        if pids.is_empty() {
            return;
        }
        for pid in pids.drain(..) {
            killed.push(pid);
            // pidfd first: the process checked is the process killed.
            let Ok(pfd) = Pidfd::open(pid) else { continue };
            if !runs_instance(pid, &paths) {
                continue;
            }
            tracing::warn!(domain = %domain, dir = %dir.display(), pid, "killing QEMU of this domain");
            let _ = pfd.kill_and_wait(Duration::from_secs(10)).await;
        }
    }
}

/// Processes of this instance: in the agent's own mount namespace (another
/// qlive's run dir may have the same paths), not in uninterruptible sleep
/// (reading the command line of a process stuck with its memory map locked
/// blocks), whose command line is a qlive QEMU's naming this instance's QMP
/// socket ([`runs_instance`]).
fn processes_of(paths: &InstancePaths) -> Vec<i32> {
    let Ok(all) = procfs::process::all_processes() else {
        return vec![];
    };
    let own_ns = std::fs::read_link("/proc/self/ns/mnt").ok();
    let me = std::process::id() as i32;
    all.flatten()
        .map(|p| p.pid())
        .filter(|&pid| pid != me)
        .filter(|&pid| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok() == own_ns)
        .filter(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| s.rsplit_once(") ").map(|(_, r)| !r.starts_with('D')))
                .unwrap_or(false)
        })
        .filter(|&pid| runs_instance(pid, paths))
        .collect()
}

/// Remove an instance's directory (sockets, pidfile, log).
pub fn cleanup_paths(paths: &InstancePaths) {
    if let Err(e) = fsutil::remove_dir_all_if_exists(&paths.dir) {
        tracing::warn!(dir = %paths.dir.display(), error = %e, "removing instance directory");
    }
}

impl Instance {
    pub fn domid(&self) -> u64 {
        self.record.domid
    }

    pub fn pid(&self) -> i32 {
        self.record.process.pid
    }

    /// Record why the agent is about to end this instance.
    pub fn set_exit_intent(&self, why: impl Into<String>) {
        *self.exit_intent.lock().unwrap_or_else(|e| e.into_inner()) = Some(why.into());
    }

    /// The agent's attempt to end the instance failed: it lives on.
    pub fn clear_exit_intent(&self) {
        *self.exit_intent.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    pub fn exit_intent(&self) -> Option<String> {
        self.exit_intent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// SIGKILL now (never ran the guest, or must not run it any more), wait
    /// for the exit, remove the paths. `why` becomes the recorded reason.
    pub async fn kill(&self, why: impl Into<String>, timeout: Duration) {
        self.set_exit_intent(why);
        if let Err(e) = self.pidfd.kill_and_wait(timeout).await {
            tracing::error!(pid = self.pid(), error = %e, "killing QEMU");
        }
        cleanup_paths(&self.record.paths);
    }

    /// Ask QEMU to quit, SIGKILL if it has not exited within `grace`, and
    /// wait for the exit. Paths are removed afterwards.
    pub async fn terminate(&self, grace: Duration) -> Result<(), InstanceError> {
        if !self.pidfd.exited() {
            let _ = tokio::time::timeout(grace, self.qmp.quit()).await;
            if tokio::time::timeout(grace, self.pidfd.wait_exit())
                .await
                .is_err()
            {
                tracing::warn!(pid = self.pid(), "QEMU did not quit; sending SIGKILL");
                self.pidfd.kill_and_wait(Duration::from_secs(10)).await?;
            }
        }
        cleanup_paths(&self.record.paths);
        Ok(())
    }

    /// Wait for the QEMU process to exit.
    pub async fn wait_exit(&self) {
        let _ = self.pidfd.wait_exit().await;
    }
}
