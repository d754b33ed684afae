//! Stable per-domain sockets: host-side endpoints a client reaches at one
//! path for the whole run of the domain, whichever QEMU instance serves it.
//!
//! A QEMU that binds a socket path itself (`-chardev socket,path=…`) breaks
//! the path at the first migration: the destination binds it anew (or
//! fails to), the source unlinks it when it exits, and a destination killed
//! by a failed migration leaves a path nobody listens on. So the agent binds
//! the listening socket once per run of the domain, like the tap, and every
//! instance inherits the same listening fd at a fixed number
//! (`-chardev socket,fd=N,server=on`): the path and the socket behind it
//! never change. Connections wait in the backlog whenever no instance is
//! accepting (an instance starting, the agent restarting). After an agent
//! restart the fd is taken back from the running QEMU (`pidfd_getfd`) and
//! checked: a listening unix socket bound to the recorded path.
//!
//! One QEMU habit needs a second name. When QEMU closes a listening unix
//! socket (at exit), it unlinks the path the socket is bound to, as
//! `getsockname` reports it, even for a socket it was given as an fd: the
//! source of a successful migration would remove the path on its way out.
//! So the socket is bound at a private name beside the public one
//! (`.guest-agent.sock` for `guest-agent.sock`) and the public path is a
//! hard link to the same socket. QEMU removes only the private name; the
//! public path stays, and `connect` on it reaches the same socket.
//!
//! A connection itself belongs to the QEMU that accepted it: it ends when
//! that instance exits (the source, at a successful migration), and the
//! client connects again to the same path.

use crate::instance::process::Pidfd;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Pending connections kept while no instance accepts.
const BACKLOG: i32 = 16;

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotSocket { path: PathBuf },
    #[error("removing the old socket {path}")]
    RemoveOld {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("linking {path} to the socket")]
    Link {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("binding {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("taking fd {fd} back from QEMU pid {pid}")]
    Recover {
        pid: i32,
        fd: i32,
        #[source]
        source: io::Error,
    },
    #[error("fd {fd} of QEMU pid {pid} is {found}, not the listening socket {expected}")]
    WrongSocket {
        pid: i32,
        fd: i32,
        found: String,
        expected: PathBuf,
    },
}

/// A listening unix socket at a stable path, owned by the agent.
#[derive(Debug)]
pub struct Endpoint {
    path: PathBuf,
    fd: OwnedFd,
}

/// The private name a public socket path is bound at: `.NAME` beside it.
pub fn bound_path(public: &Path) -> PathBuf {
    let name = public
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    public.with_file_name(format!(".{name}"))
}

/// Remove a socket left at `path` by an earlier run; refuse anything else.
fn remove_old_socket(path: &Path) -> Result<(), EndpointError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|source| EndpointError::RemoveOld {
                path: path.to_path_buf(),
                source,
            })
        }
        Ok(_) => Err(EndpointError::NotSocket {
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(EndpointError::RemoveOld {
            path: path.to_path_buf(),
            source,
        }),
    }
}

impl Endpoint {
    /// Bind and listen at `path` (mode `mode`, group `gid` if given): bound
    /// at [`bound_path`], `path` a hard link to it. A socket left at either
    /// name by an earlier run is replaced; anything else is refused
    /// untouched.
    pub fn bind(path: &Path, mode: u32, gid: Option<u32>) -> Result<Endpoint, EndpointError> {
        let bound = bound_path(path);
        remove_old_socket(path)?;
        remove_old_socket(&bound)?;
        let bind_err = |source| EndpointError::Bind {
            path: bound.clone(),
            source,
        };
        let listener = std::os::unix::net::UnixListener::bind(&bound).map_err(bind_err)?;
        let fd: OwnedFd = listener.into();
        let ep = Endpoint {
            path: path.to_path_buf(),
            fd,
        };
        // std listens with a backlog of 128; set ours (a smaller queue is
        // enough for a guest agent or a VNC console).
        // SAFETY: listen on a socket fd this function owns.
        if unsafe { libc::listen(ep.fd.as_raw_fd(), BACKLOG) } < 0 {
            let e = io::Error::last_os_error();
            ep.unlink();
            return Err(bind_err(e));
        }
        let chmod = std::fs::set_permissions(&bound, std::fs::Permissions::from_mode(mode))
            .and_then(|()| match gid {
                Some(g) => std::os::unix::fs::chown(&bound, None, Some(g)),
                None => Ok(()),
            });
        if let Err(e) = chmod {
            ep.unlink();
            return Err(bind_err(e));
        }
        if let Err(source) = std::fs::hard_link(&bound, path) {
            ep.unlink();
            return Err(EndpointError::Link {
                path: path.to_path_buf(),
                source,
            });
        }
        Ok(ep)
    }

    /// Take the listening socket back from a running QEMU, where it is fd
    /// `fd`, after an agent restart; `public` is its stable path.
    pub fn recover(pidfd: &Pidfd, fd: i32, public: &Path) -> Result<Endpoint, EndpointError> {
        let expected = &bound_path(public);
        let pid = pidfd.pid();
        let owned =
            pidfd
                .get_fd(fd)
                .map_err(|source| EndpointError::Recover { pid, fd, source })?;
        let wrong = |found: String| EndpointError::WrongSocket {
            pid,
            fd,
            found,
            expected: expected.to_path_buf(),
        };
        let addr = nix::sys::socket::getsockname::<nix::sys::socket::UnixAddr>(owned.as_raw_fd())
            .map_err(|e| wrong(format!("not a unix socket ({e})")))?;
        let bound = addr.path().map(Path::to_path_buf);
        if bound.as_deref() != Some(expected) {
            return Err(wrong(format!("bound to {bound:?}")));
        }
        let listening = nix::sys::socket::getsockopt(&owned, nix::sys::socket::sockopt::AcceptConn)
            .map_err(|e| wrong(format!("unreadable ({e})")))?;
        if !listening {
            return Err(wrong("a socket that does not listen".into()));
        }
        Ok(Endpoint {
            path: public.to_path_buf(),
            fd: owned,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// Remove both names when the domain's run ends (the socket itself
    /// closes with the last fd).
    pub fn unlink(&self) {
        unlink_socket(&self.path);
    }
}

/// Remove a stable socket path and its private name, where they are
/// sockets (a run that ended; nothing else is touched).
pub fn unlink_socket(public: &Path) {
    for p in [public.to_path_buf(), bound_path(public)] {
        if let Ok(m) = std::fs::symlink_metadata(&p) {
            if m.file_type().is_socket() {
                let _ = std::fs::remove_file(&p);
            }
        }
    }
}

impl AsFd for Endpoint {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The domain's stable sockets for one run, shared by every instance like
/// guest RAM and the taps.
#[derive(Debug, Default)]
pub struct Endpoints {
    /// `guest_agent`: QEMU's chardev for the virtio-serial port
    /// `org.qemu.guest_agent.0` serves this listening socket.
    pub guest_agent: Option<Endpoint>,
    /// `vnc`: the agent accepts here and hands each connection to the
    /// running instance (`add_client`); QEMU only holds the fd.
    pub vnc: Option<Endpoint>,
}

impl Endpoints {
    pub fn unlink(&self) {
        for e in [&self.guest_agent, &self.vnc].into_iter().flatten() {
            e.unlink();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_replaces_a_socket_but_nothing_else() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ga.sock");
        let e = Endpoint::bind(&p, 0o660, None).unwrap();
        assert!(std::os::unix::net::UnixStream::connect(&p).is_ok());
        drop(e);
        // a stale socket from an earlier run is replaced
        let e = Endpoint::bind(&p, 0o600, None).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // the public name outlives the bound one (QEMU unlinks that)
        std::fs::remove_file(bound_path(&p)).unwrap();
        assert!(std::os::unix::net::UnixStream::connect(&p).is_ok());
        e.unlink();
        assert!(!p.exists());
        std::fs::write(&p, b"data").unwrap();
        let err = Endpoint::bind(&p, 0o600, None).unwrap_err();
        assert!(matches!(err, EndpointError::NotSocket { .. }), "{err}");
        assert_eq!(std::fs::read(&p).unwrap(), b"data");
    }
}
