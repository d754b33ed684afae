//! Process identity and lifetime for QEMU processes that are not (or no
//! longer) the agent's children: pidfds, start times, exe paths.
//!
//! A pid alone is not an identity (pids are reused), so an instance is
//! identified by (pid, start time in clock ticks since boot). Every adopt
//! opens a pidfd *first* and then checks the start time, so the process
//! checked is the process held.

use serde::{Deserialize, Serialize};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use tokio::io::unix::AsyncFd;

/// Make a helper the agent starts (an emulator probe, a hook) die with the
/// agent: SIGKILL when the agent goes away (`PR_SET_PDEATHSIG`), checked
/// once more after arming in case the agent died between fork and prctl.
/// Only guests' QEMUs may outlive the agent; they are started without this.
///
/// The signal follows the *thread* that forked: helpers are spawned from
/// the runtime's worker threads, which live as long as the agent.
pub fn die_with_agent(cmd: &mut tokio::process::Command) {
    let agent = std::process::id() as libc::pid_t;
    // SAFETY: prctl, getppid and _exit are async-signal-safe; nothing is
    // allocated between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != agent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("process {pid} does not exist")]
    Gone { pid: i32 },
    #[error("opening pidfd for process {pid}")]
    Pidfd {
        pid: i32,
        #[source]
        source: io::Error,
    },
    #[error("reading /proc/{pid}")]
    Proc {
        pid: i32,
        #[source]
        source: io::Error,
    },
    #[error("pid {pid} was reused: start time {found} differs from recorded {expected}")]
    Reused { pid: i32, expected: u64, found: u64 },
    #[error("signalling process {pid}")]
    Signal {
        pid: i32,
        #[source]
        source: io::Error,
    },
}

/// What identifies a running process across agent restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessIdentity {
    pub pid: i32,
    /// Field 22 of /proc/PID/stat, clock ticks after boot.
    pub start_time: u64,
    /// readlink /proc/PID/exe at adoption time.
    pub exe: PathBuf,
}

impl ProcessIdentity {
    pub fn read(pid: i32) -> Result<ProcessIdentity, ProcessError> {
        let p = procfs::process::Process::new(pid).map_err(|e| proc_err(pid, e))?;
        let stat = p.stat().map_err(|e| proc_err(pid, e))?;
        let exe = p.exe().map_err(|e| proc_err(pid, e))?;
        Ok(ProcessIdentity {
            pid,
            start_time: stat.starttime,
            exe,
        })
    }
}

fn proc_err(pid: i32, e: procfs::ProcError) -> ProcessError {
    match e {
        procfs::ProcError::NotFound(_) => ProcessError::Gone { pid },
        other => ProcessError::Proc {
            pid,
            source: io::Error::other(other.to_string()),
        },
    }
}

/// A pidfd: a handle on one process that cannot be confused by pid reuse.
#[derive(Debug)]
pub struct Pidfd {
    pid: i32,
    fd: OwnedFd,
}

impl Pidfd {
    pub fn open(pid: i32) -> Result<Pidfd, ProcessError> {
        // SAFETY: plain syscall with integer arguments.
        let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ESRCH) {
                return Err(ProcessError::Gone { pid });
            }
            return Err(ProcessError::Pidfd { pid, source: e });
        }
        // SAFETY: the syscall returned a new fd that we now own.
        let fd = unsafe { OwnedFd::from_raw_fd(r as i32) };
        Ok(Pidfd { pid, fd })
    }

    /// Open a pidfd for `who` and check that it is still that process.
    pub fn adopt(who: &ProcessIdentity) -> Result<Pidfd, ProcessError> {
        let pidfd = Pidfd::open(who.pid)?;
        let now = ProcessIdentity::read(who.pid)?;
        if now.start_time != who.start_time {
            return Err(ProcessError::Reused {
                pid: who.pid,
                expected: who.start_time,
                found: now.start_time,
            });
        }
        Ok(pidfd)
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Send a signal to exactly this process (no-op if it already exited).
    pub fn signal(&self, sig: i32) -> Result<(), ProcessError> {
        // SAFETY: plain syscall on an fd we own.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ESRCH) {
                return Ok(());
            }
            return Err(ProcessError::Signal {
                pid: self.pid,
                source: e,
            });
        }
        Ok(())
    }

    /// Duplicate the process's fd `fd` into the agent (`pidfd_getfd`): the
    /// same open file, not a re-open by path.
    pub fn get_fd(&self, fd: i32) -> io::Result<OwnedFd> {
        // SAFETY: plain syscall on an fd we own; flags must be 0.
        let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, self.fd.as_raw_fd(), fd, 0) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the syscall returned a new (close-on-exec) fd we own.
        Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
    }

    /// Has the process exited? (Non-blocking.)
    pub fn exited(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let r = unsafe { libc::poll(&mut pfd, 1, 0) };
        r > 0 && (pfd.revents & libc::POLLIN) != 0
    }

    /// Wait until the process exits. Also reaps it if it happens to be our
    /// child (it never is for daemonized QEMU, but a failed spawn can be).
    pub async fn wait_exit(&self) -> io::Result<()> {
        let dup = self.fd.try_clone()?;
        // SAFETY: `dup` is an OwnedFd moved into the AsyncFd, which keeps it
        // open (and its number unchanged) until the AsyncFd is dropped.
        let afd = unsafe { AsyncFd::register_with_interest(dup, tokio::io::Interest::READABLE) }
            .map_err(io::Error::from)?;
        let _guard = afd.readable().await?;
        reap(self.pid);
        Ok(())
    }

    /// SIGKILL and wait, bounded by `timeout`.
    pub async fn kill_and_wait(&self, timeout: std::time::Duration) -> Result<(), ProcessError> {
        self.signal(libc::SIGKILL)?;
        match tokio::time::timeout(timeout, self.wait_exit()).await {
            Ok(_) => Ok(()),
            Err(_) => Err(ProcessError::Signal {
                pid: self.pid,
                source: io::Error::new(io::ErrorKind::TimedOut, "still alive after SIGKILL"),
            }),
        }
    }
}

fn reap(pid: i32) {
    let mut status = 0;
    // SAFETY: waitpid on a specific pid with WNOHANG; ECHILD if not ours.
    unsafe {
        libc::waitpid(pid, &mut status, libc::WNOHANG);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pidfd_sees_exit_and_detects_reuse() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let id = ProcessIdentity::read(pid).unwrap();
        assert!(id.exe.ends_with("sleep"));
        let pfd = Pidfd::adopt(&id).unwrap();
        assert!(!pfd.exited());
        let wrong = ProcessIdentity {
            start_time: id.start_time + 1,
            ..id.clone()
        };
        assert!(matches!(
            Pidfd::adopt(&wrong),
            Err(ProcessError::Reused { .. })
        ));
        pfd.kill_and_wait(std::time::Duration::from_secs(5))
            .await
            .unwrap();
        assert!(pfd.exited());
        let _ = child.wait();
        assert!(matches!(
            ProcessIdentity::read(pid),
            Err(ProcessError::Gone { .. })
        ));
    }
}
