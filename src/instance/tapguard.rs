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
    prog: [libc::sock_filter; 9],
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
                jeq(AUDIT_ARCH_X86_64, 0, 6), // other arch: allow
                stmt(BPF_LD_W_ABS, OFF_NR),
                jeq(libc::SYS_ioctl as u32, 0, 4),
                stmt(BPF_LD_W_ABS, OFF_ARG1_LO),
                jeq(TUNSETVNETHDRSZ, 1, 0),
                jeq(TUNSETOFFLOAD, 0, 1),
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

/// The policy, pure: `cmd` and `arg` of an ioctl from an instance that
/// does or does not own the guest.
pub fn decide(owner: bool, cmd: u32, arg: u64, offloads: Offloads) -> Answer {
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
    ) -> Result<TapGuard, TapGuardError> {
        let g = TapGuard {
            owner: Arc::new(AtomicBool::new(owner)),
            stop: Arc::new(AtomicBool::new(false)),
            answered: Arc::new(Default::default()),
        };
        let (own, stop, answered) = (g.owner.clone(), g.stop.clone(), g.answered.clone());
        std::thread::Builder::new()
            .name("qlive-tapguard".into())
            .spawn(move || serve(listener, own, stop, answered, offloads))
            .map_err(TapGuardError::Thread)?;
        Ok(g)
    }

    /// Take the listener back from a running QEMU (agent restart).
    pub fn recover(
        pidfd: &crate::instance::process::Pidfd,
        fd: i32,
        owner: bool,
        offloads: Offloads,
    ) -> Result<TapGuard, TapGuardError> {
        let listener = pidfd.get_fd(fd).map_err(|source| TapGuardError::Recover {
            pid: pidfd.pid(),
            fd,
            source,
        })?;
        TapGuard::start(listener, owner, offloads)
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
        let is_owner = owner.load(Ordering::SeqCst);
        let answer = decide(is_owner, cmd, arg, offloads);
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
        assert_eq!(decide(true, TUNSETVNETHDRSZ, 0, all), Answer::Continue);
        assert_eq!(decide(true, TUNSETOFFLOAD, 0x7f, old), Answer::Continue);
        assert_eq!(decide(false, TUNSETVNETHDRSZ, 0, all), Answer::Fake(0));
        assert_eq!(decide(false, TUNSETOFFLOAD, 0, old), Answer::Fake(0));
        // probes answered as the kernel would
        assert_eq!(
            decide(false, TUNSETOFFLOAD, 0x1 | TUN_F_UFO, old),
            Answer::Fake(0)
        );
        assert_eq!(
            decide(false, TUNSETOFFLOAD, 0x1 | TUN_F_USO4 | TUN_F_USO6, old),
            Answer::Fake(libc::EINVAL)
        );
        assert_eq!(
            decide(false, TUNSETOFFLOAD, 0x1 | TUN_F_USO4, all),
            Answer::Fake(0)
        );
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
        let g = TapGuard::recover(&pidfd, 20, owner, Offloads::default()).expect("listener");
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
    }
}
