//! The tap guard: the agent decides which QEMU may reconfigure the domain's
//! taps (seccomp user notification on `TUNSETVNETHDRSZ` and
//! `TUNSETOFFLOAD`).
//!
//! A tap's vnet header length and its offloads belong to the *device*, not
//! to the fd, and every QEMU instance of a domain gets the same tap. A
//! starting QEMU resets both (10-byte header, no offloads, then probes by
//! switching offloads on) in its tap backend's initialisation, long before
//! switchover, while the running instance still carries the guest's
//! traffic with a 12-byte header and the offloads the guest negotiated.
//! Without the guard every frame in both directions would be misframed
//! until the switchover (measured before: 1191 of 5413 datagrams lost over
//! ten migrations).
//!
//! So every instance runs under one more seccomp filter, installed between
//! fork and exec: those two ioctls notify the agent instead of running.
//! The agent lets them through (`CONTINUE`) for the instance that owns the
//! guest, and answers them itself for a destination that does not yet:
//! "done" for the header length, and for offloads what the kernel would
//! answer (the probes' results, taken by the agent when it opened the tap,
//! [`crate::instance::tap::TapOffloads`]), without touching the device. By
//! the time the destination owns the guest it has loaded the guest's
//! virtio-net state and asked for exactly the header and offloads the
//! source set: the device is already so. Ownership moves right before
//! `cont` (`Instance::set_tap_owner`).
//!
//! The listener fd is also kept by QEMU, at a fixed fd number
//! (`cmdline::tapguard_fd`), so it survives the agent: a restarted agent
//! takes it back with `pidfd_getfd`. While no agent serves it, an ioctl
//! that needs an answer waits (QEMU's main loop with it); QEMU issues them
//! only when the guest (re)negotiates its NIC features.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// `_IOW('T', 216, int)`.
pub const TUNSETVNETHDRSZ: u32 = 0x4004_54d8;
/// `_IOW('T', 208, unsigned int)`.
pub const TUNSETOFFLOAD: u32 = 0x4004_54d0;
/// `_IOW('T', 217, int)`: attach or detach the fd's queue.
pub const TUNSETQUEUE: u32 = 0x4004_54d9;
/// `_IOR('T', 224, int)`.
pub const TUNSETSTEERINGEBPF: u32 = crate::instance::steering::TUNSETSTEERINGEBPF;
const IFF_ATTACH_QUEUE: i16 = 0x0200;
const IFF_DETACH_QUEUE: i16 = 0x0400;
/// `ifr_flags` in `struct ifreq`.
const IFR_FLAGS_OFFSET: u64 = 16;
pub const TUN_F_UFO: u64 = 0x10;
pub const TUN_F_USO4: u64 = 0x20;
pub const TUN_F_USO6: u64 = 0x40;

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const BPF_LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const BPF_JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const BPF_RET_K: u16 = 0x06; // BPF_RET | BPF_K
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const SECCOMP_RET_USER_NOTIF: u32 = 0x7fc0_0000;
// offsets in struct seccomp_data
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const OFF_ARG1_LO: u32 = 24;

const fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

const fn jeq(k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: BPF_JEQ_K,
        jt,
        jf,
        k,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TapGuardError {
    #[error("taking the tap guard's listener (fd {fd}) from QEMU pid {pid}")]
    Recover {
        pid: i32,
        fd: i32,
        #[source]
        source: io::Error,
    },
    #[error("starting the tap guard's thread")]
    Thread(#[source] io::Error),
}

/// The filter program (built before fork: no allocation in the child).
pub struct Filter {
    prog: [libc::sock_filter; 11],
}

impl Default for Filter {
    fn default() -> Self {
        Filter::new()
    }
}

impl Filter {
    pub fn new() -> Filter {
        Filter {
            prog: [
                stmt(BPF_LD_W_ABS, OFF_ARCH),
                jeq(AUDIT_ARCH_X86_64, 0, 8), // other arch: allow
                stmt(BPF_LD_W_ABS, OFF_NR),
                jeq(libc::SYS_ioctl as u32, 0, 6),
                stmt(BPF_LD_W_ABS, OFF_ARG1_LO),
                jeq(TUNSETVNETHDRSZ, 3, 0),
                jeq(TUNSETOFFLOAD, 2, 0),
                jeq(TUNSETQUEUE, 1, 0),
                jeq(TUNSETSTEERINGEBPF, 0, 1),
                stmt(BPF_RET_K, SECCOMP_RET_USER_NOTIF),
                stmt(BPF_RET_K, SECCOMP_RET_ALLOW),
            ],
        }
    }

    /// Install in the calling process (between fork and exec: only
    /// syscalls) and leave the listener at fd `at`, inherited by the exec.
    pub fn install(&self, at: i32) -> io::Result<()> {
        let fprog = libc::sock_fprog {
            len: self.prog.len() as u16,
            filter: self.prog.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: a valid, fully initialised program that outlives the
        // call (the kernel copies it); seccomp(2) returns the listener.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                libc::SECCOMP_FILTER_FLAG_NEW_LISTENER
                    | libc::SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV,
                &fprog as *const libc::sock_fprog,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = fd as i32;
        if fd != at {
            // SAFETY: dup2/close on fds this process owns; dup2 leaves
            // `at` without close-on-exec.
            unsafe {
                if libc::dup2(fd, at) < 0 {
                    return Err(io::Error::last_os_error());
                }
                libc::close(fd);
            }
        } else {
            // SAFETY: F_SETFD on our own fd.
            unsafe { libc::fcntl(at, libc::F_SETFD, 0) };
        }
        Ok(())
    }
}

/// What the kernel answers the offload probes QEMU makes (taken by the
/// agent on the tap before any QEMU ran).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Offloads {
    pub ufo: bool,
    pub uso: bool,
}

impl Offloads {
    /// Would the kernel accept `TUNSETOFFLOAD(flags)` on this tap?
    pub fn accepts(&self, flags: u64) -> bool {
        (self.ufo || flags & TUN_F_UFO == 0) && (self.uso || flags & (TUN_F_USO4 | TUN_F_USO6) == 0)
    }
}

/// How the agent answers one notified ioctl.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Run it (the instance owns the guest).
    Continue,
    /// Return this errno (0: success) without running it.
    Fake(i32),
}

/// What an ioctl's argument points to, read from QEMU's memory for the
/// calls whose argument is a pointer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pointee {
    /// Not read (the argument is a value).
    None,
    /// `ifr_flags` of the `struct ifreq` (`TUNSETQUEUE`).
    Flags(i16),
    /// The int (`TUNSETSTEERINGEBPF`: a program fd, -1 to detach).
    Int(i32),
    /// Could not be read.
    Unreadable,
}

/// The policy, pure: `cmd` and `arg` of an ioctl from an instance that
/// does or does not own the guest, and what `arg` points to.
///
/// - The header length and offloads run for the owner only (above).
/// - `TUNSETQUEUE` never runs: a detach would drop the queue's frames and
///   renumber the tap's queues under the other instance. The agent
///   records which queues the QEMU reads and steers frames to them
///   ([`crate::instance::tap::Tap::set_queue_enabled`]).
/// - `TUNSETSTEERINGEBPF` never runs: the tap's program is the agent's.
///   QEMU detaches "its" program (-1) at every device reset and load:
///   "done". Its own RSS program is refused (`EINVAL`), and QEMU falls
///   back to its software RSS, which distributes frames itself.
pub fn decide(owner: bool, cmd: u32, arg: u64, offloads: Offloads, pointee: Pointee) -> Answer {
    match (cmd, pointee) {
        (TUNSETQUEUE, _) => return Answer::Fake(0),
        (TUNSETSTEERINGEBPF, Pointee::Int(-1)) => return Answer::Fake(0),
        (TUNSETSTEERINGEBPF, _) => return Answer::Fake(libc::EINVAL),
        _ => {}
    }
    if owner {
        return Answer::Continue;
    }
    match cmd {
        TUNSETOFFLOAD if !offloads.accepts(arg) => Answer::Fake(libc::EINVAL),
        TUNSETOFFLOAD | TUNSETVNETHDRSZ => Answer::Fake(0),
        // Not a call the filter notifies: let the kernel decide.
        _ => Answer::Continue,
    }
}

/// A `TUNSETQUEUE` call's meaning: `Some(true)` attach, `Some(false)`
/// detach.
pub fn queue_change(pointee: Pointee) -> Option<bool> {
    match pointee {
        Pointee::Flags(f) if f & IFF_ATTACH_QUEUE != 0 => Some(true),
        Pointee::Flags(f) if f & IFF_DETACH_QUEUE != 0 => Some(false),
        _ => None,
    }
}

/// The queues an instance reads, for following its `TUNSETQUEUE` calls.
pub struct Queues {
    /// Weak: the taps close when the domain's last instance is dropped,
    /// not when this thread notices its QEMU is gone (a `start` right
    /// after a `destroy` would find the tap in use).
    pub taps: std::sync::Weak<Vec<crate::instance::tap::Tap>>,
    /// The set of each tap the instance reads.
    pub set: u8,
    /// (fd number in QEMU, NIC, queue in the set).
    pub fds: Vec<(i32, usize, u16)>,
}

impl Queues {
    fn changed(&self, fd: i32, enabled: bool) {
        if let Some(&(_, nic, queue)) = self.fds.iter().find(|(f, _, _)| *f == fd) {
            if let Some(t) = self.taps.upgrade().as_ref().and_then(|t| t.get(nic)) {
                t.set_queue_enabled(self.set, queue, enabled);
            }
        }
    }
}

/// Read `T` at `addr` in process `pid` (the notifying thread).
fn read_remote<T: Copy + Default>(pid: u32, addr: u64) -> Option<T> {
    let mut v = T::default();
    let local = libc::iovec {
        iov_base: (&mut v as *mut T).cast(),
        iov_len: std::mem::size_of::<T>(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: std::mem::size_of::<T>(),
    };
    // SAFETY: process_vm_readv writes at most size_of::<T>() bytes into
    // `v`, a plain integer.
    let n = unsafe { libc::process_vm_readv(pid as i32, &local, 1, &remote, 1, 0) };
    (n == std::mem::size_of::<T>() as isize).then_some(v)
}

/// The agent's side of one instance's filter: a thread answering its
/// notifications until the QEMU exits (the listener then reports hang-up)
/// or the guard is dropped.
pub struct TapGuard {
    owner: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    answered: Arc<std::sync::atomic::AtomicU64>,
}

impl TapGuard {
    pub fn start(
        listener: OwnedFd,
        owner: bool,
        offloads: Offloads,
        queues: Option<Queues>,
    ) -> Result<TapGuard, TapGuardError> {
        let g = TapGuard {
            owner: Arc::new(AtomicBool::new(owner)),
            stop: Arc::new(AtomicBool::new(false)),
            answered: Arc::new(Default::default()),
        };
        let (own, stop, answered) = (g.owner.clone(), g.stop.clone(), g.answered.clone());
        std::thread::Builder::new()
            .name("qlive-tapguard".into())
            .spawn(move || serve(listener, own, stop, answered, offloads, queues))
            .map_err(TapGuardError::Thread)?;
        Ok(g)
    }

    /// Take the listener back from a running QEMU (agent restart).
    pub fn recover(
        pidfd: &crate::instance::process::Pidfd,
        fd: i32,
        owner: bool,
        offloads: Offloads,
        queues: Option<Queues>,
    ) -> Result<TapGuard, TapGuardError> {
        let listener = pidfd.get_fd(fd).map_err(|source| TapGuardError::Recover {
            pid: pidfd.pid(),
            fd,
            source,
        })?;
        TapGuard::start(listener, owner, offloads, queues)
    }

    pub fn set_owner(&self, owner: bool) {
        self.owner.store(owner, Ordering::SeqCst);
    }

    pub fn is_owner(&self) -> bool {
        self.owner.load(Ordering::SeqCst)
    }

    /// Notifications answered so far (for tests and logs).
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }
}

impl Drop for TapGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn serve(
    listener: OwnedFd,
    owner: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    answered: Arc<std::sync::atomic::AtomicU64>,
    offloads: Offloads,
    queues: Option<Queues>,
) {
    let fd = listener.as_raw_fd();
    while !stop.load(Ordering::SeqCst) {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, 200) };
        if n < 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            break;
        }
        if n == 0 {
            continue;
        }
        if p.revents & libc::POLLIN == 0 {
            // POLLHUP: no process is left under the filter.
            break;
        }
        // SAFETY: zeroed plain-data structs of the kernel's layout; the
        // ioctls fill and read them.
        let mut req: libc::seccomp_notif = unsafe { std::mem::zeroed() };
        if unsafe { libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_RECV, &mut req) } != 0 {
            // ENOENT: the caller was killed before we received it.
            continue;
        }
        let cmd = req.data.args[1] as u32;
        let arg = req.data.args[2];
        let pointee = match cmd {
            TUNSETQUEUE => read_remote::<i16>(req.pid, arg.wrapping_add(IFR_FLAGS_OFFSET))
                .map_or(Pointee::Unreadable, Pointee::Flags),
            TUNSETSTEERINGEBPF => {
                read_remote::<i32>(req.pid, arg).map_or(Pointee::Unreadable, Pointee::Int)
            }
            _ => Pointee::None,
        };
        if pointee != Pointee::None {
            // What was read belongs to this call only if the caller still
            // waits in it (not killed, its memory not another process's).
            let mut id = req.id;
            if unsafe { libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_ID_VALID, &mut id) } != 0 {
                continue;
            }
        }
        if cmd == TUNSETQUEUE {
            match (queue_change(pointee), &queues) {
                (Some(enabled), Some(q)) => q.changed(req.data.args[0] as i32, enabled),
                (None, _) => tracing::warn!(
                    pid = req.pid,
                    ?pointee,
                    "TUNSETQUEUE neither attaches nor detaches"
                ),
                _ => {}
            }
        }
        let is_owner = owner.load(Ordering::SeqCst);
        let answer = decide(is_owner, cmd, arg, offloads, pointee);
        let mut resp: libc::seccomp_notif_resp = unsafe { std::mem::zeroed() };
        resp.id = req.id;
        match answer {
            Answer::Continue => resp.flags = libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32,
            Answer::Fake(errno) => resp.error = -errno,
        }
        if unsafe { libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_SEND, &mut resp) } == 0 {
            answered.fetch_add(1, Ordering::Relaxed);
        }
        tracing::debug!(
            pid = req.pid,
            cmd = format_args!("{cmd:#x}"),
            arg,
            owner = is_owner,
            ?answer,
            "tap ioctl"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_owner_reconfigures_the_tap() {
        let all = Offloads {
            ufo: true,
            uso: true,
        };
        let old = Offloads {
            ufo: true,
            uso: false,
        };
        let d = |owner, cmd, arg, off| decide(owner, cmd, arg, off, Pointee::None);
        assert_eq!(d(true, TUNSETVNETHDRSZ, 0, all), Answer::Continue);
        assert_eq!(d(true, TUNSETOFFLOAD, 0x7f, old), Answer::Continue);
        assert_eq!(d(false, TUNSETVNETHDRSZ, 0, all), Answer::Fake(0));
        assert_eq!(d(false, TUNSETOFFLOAD, 0, old), Answer::Fake(0));
        // probes answered as the kernel would
        assert_eq!(
            d(false, TUNSETOFFLOAD, 0x1 | TUN_F_UFO, old),
            Answer::Fake(0)
        );
        assert_eq!(
            d(false, TUNSETOFFLOAD, 0x1 | TUN_F_USO4 | TUN_F_USO6, old),
            Answer::Fake(libc::EINVAL)
        );
        assert_eq!(
            d(false, TUNSETOFFLOAD, 0x1 | TUN_F_USO4, all),
            Answer::Fake(0)
        );
    }

    #[test]
    fn queues_and_steering_stay_the_agents() {
        let all = Offloads::default();
        for owner in [true, false] {
            let q = |f| decide(owner, TUNSETQUEUE, 0, all, Pointee::Flags(f));
            assert_eq!(q(IFF_ATTACH_QUEUE), Answer::Fake(0));
            assert_eq!(q(IFF_DETACH_QUEUE), Answer::Fake(0));
            let e = |p| decide(owner, TUNSETSTEERINGEBPF, 0, all, p);
            assert_eq!(e(Pointee::Int(-1)), Answer::Fake(0));
            assert_eq!(e(Pointee::Int(12)), Answer::Fake(libc::EINVAL));
            assert_eq!(e(Pointee::Unreadable), Answer::Fake(libc::EINVAL));
        }
        assert_eq!(queue_change(Pointee::Flags(IFF_ATTACH_QUEUE)), Some(true));
        assert_eq!(queue_change(Pointee::Flags(IFF_DETACH_QUEUE)), Some(false));
        assert_eq!(queue_change(Pointee::Unreadable), None);
    }

    /// Run `script` in python3 under a real filter, the guard answering
    /// as `owner`: its output and the notifications answered.
    fn under_filter(script: &str, owner: bool) -> (String, u64) {
        use std::os::unix::process::CommandExt;
        let filter = Filter::new();
        let mut cmd = std::process::Command::new("python3");
        cmd.args(["-c", script]);
        // SAFETY: prctl and seccomp only, async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                filter.install(20)
            });
        }
        cmd.stdout(std::process::Stdio::piped());
        let child = cmd.spawn().expect("python3");
        let pidfd = crate::instance::process::Pidfd::open(child.id() as i32).expect("pidfd");
        let g = TapGuard::recover(&pidfd, 20, owner, Offloads::default(), None).expect("listener");
        let out = child.wait_with_output().expect("wait");
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            g.answered(),
        )
    }

    /// A real filter in a child: the notified ioctls wait for the agent's
    /// answer, a faked one returns without running, other ioctls run.
    #[test]
    fn notified_ioctls_are_answered_by_the_guard() {
        // Not the owner: both faked as done, /dev/null never sees them.
        let (out, answered) = under_filter(
            "import fcntl,os\n\
             fd=os.open('/dev/null',os.O_RDONLY)\n\
             for c in (0x400454d8,0x400454d0):\n\
             \x20 try:\n    fcntl.ioctl(fd,c,0); print('ok')\n\
             \x20 except OSError as e: print('errno', e.errno)\n\
             try:\n  fcntl.ioctl(fd,0x5401,b'x'*64)\nexcept OSError as e:\n  print('other', e.errno)\n",
            false,
        );
        assert_eq!(out, "ok\nok\nother 25\n", "{out}");
        assert_eq!(answered, 2);
        // The owner: run by the kernel (/dev/null: ENOTTY).
        let (out, _) = under_filter(
            "import fcntl,os\nfd=os.open('/dev/null',os.O_RDONLY)\n\
             try:\n  fcntl.ioctl(fd,0x400454d8,0); print('ok')\n\
             except OSError as e: print('errno', e.errno)\n",
            true,
        );
        assert_eq!(out, "errno 25\n");
        // Queue and steering calls, owner or not: read from the caller's
        // memory and answered, never run.
        let (out, answered) = under_filter(
            "import fcntl,os,struct\nfd=os.open('/dev/null',os.O_RDONLY)\n\
             ifr=bytes(16)+struct.pack('h',0x400)+bytes(22)\n\
             for c,a in ((0x400454d9,ifr),(0x800454e0,struct.pack('i',-1)),(0x800454e0,struct.pack('i',7))):\n\
             \x20 try:\n    fcntl.ioctl(fd,c,a); print('ok')\n\
             \x20 except OSError as e: print('errno', e.errno)\n",
            true,
        );
        assert_eq!(out, "ok\nok\nerrno 22\n", "{out}");
        assert_eq!(answered, 3);
    }
}
