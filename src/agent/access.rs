//! Who may use the API: the peer of each connection, by SO_PEERCRED and
//! SO_PEERGROUPS (the kernel's word, not the client's).
//!
//! Root (and the agent's own uid) may call anything; so may members of
//! the API group (`qlive` by default, created by sysusers.d), by primary
//! or supplementary group. Everybody else gets a `permission-denied`
//! error for every request and nothing is done. The socket's own mode
//! (0660 root:qlive) already keeps others out; this check holds even when
//! an admin loosens it.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("reading the peer's credentials (SO_PEERCRED)")]
    PeerCred(#[source] io::Error),
    #[error("reading the peer's groups (SO_PEERGROUPS)")]
    PeerGroups(#[source] io::Error),
}

/// The peer of a unix socket connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

impl Peer {
    pub fn of(fd: BorrowedFd<'_>) -> Result<Peer, AccessError> {
        let mut cred = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `cred`.
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                &mut cred as *mut libc::ucred as *mut libc::c_void,
                &mut len,
            )
        };
        if r != 0 {
            return Err(AccessError::PeerCred(io::Error::last_os_error()));
        }
        Ok(Peer {
            pid: cred.pid,
            uid: cred.uid,
            gid: cred.gid,
            groups: peer_groups(fd)?,
        })
    }
}

fn peer_groups(fd: BorrowedFd<'_>) -> Result<Vec<u32>, AccessError> {
    let mut buf: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (buf.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `buf`.
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                buf.as_mut_ptr() as *mut libc::c_void,
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<libc::gid_t>();
        if r == 0 {
            buf.truncate(n);
            return Ok(buf);
        }
        let e = io::Error::last_os_error();
        // ERANGE: `len` now says how much is needed (NGROUPS_MAX bounds it).
        if e.raw_os_error() == Some(libc::ERANGE) && n > buf.len() && n <= 65536 {
            buf.resize(n, 0);
            continue;
        }
        return Err(AccessError::PeerGroups(e));
    }
}

/// The access policy.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The API group's name and gid (None: the group does not exist, only
    /// root may call).
    pub group: Option<(String, u32)>,
    pub group_name: String,
    pub agent_uid: u32,
}

impl Policy {
    pub fn new(group_name: &str) -> Policy {
        let group = nix::unistd::Group::from_name(group_name)
            .ok()
            .flatten()
            .map(|g| (g.name, g.gid.as_raw()));
        Policy {
            group,
            group_name: group_name.to_string(),
            agent_uid: nix::unistd::geteuid().as_raw(),
        }
    }

    /// `Err(why)` names the peer and what it lacks.
    pub fn check(&self, p: &Peer) -> Result<(), String> {
        if p.uid == 0 || p.uid == self.agent_uid {
            return Ok(());
        }
        if let Some((_, gid)) = &self.group {
            if p.gid == *gid || p.groups.contains(gid) {
                return Ok(());
            }
        }
        Err(format!(
            "permission denied: uid {} (pid {}) is neither root nor a member of group {}{}",
            p.uid,
            p.pid,
            self.group_name,
            if self.group.is_none() {
                " (which does not exist on this host)"
            } else {
                ""
            }
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32, groups: &[u32]) -> Peer {
        Peer {
            pid: 42,
            uid,
            gid,
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn root_group_members_and_nobody_else() {
        let p = Policy {
            group: Some(("qlive".into(), 990)),
            group_name: "qlive".into(),
            agent_uid: 0,
        };
        assert!(p.check(&peer(0, 0, &[])).is_ok());
        assert!(p.check(&peer(1000, 990, &[])).is_ok());
        assert!(p.check(&peer(1000, 1000, &[27, 990])).is_ok());
        let e = p.check(&peer(1000, 1000, &[27])).unwrap_err();
        assert!(e.contains("uid 1000") && e.contains("group qlive"), "{e}");
        let none = Policy {
            group: None,
            ..p.clone()
        };
        let e = none.check(&peer(1000, 990, &[990])).unwrap_err();
        assert!(e.contains("does not exist"), "{e}");
    }

    #[test]
    fn peer_of_a_socketpair_is_us() {
        use std::os::fd::AsFd;
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let p = Peer::of(a.as_fd()).unwrap();
        assert_eq!(p.uid, nix::unistd::geteuid().as_raw());
        assert_eq!(p.pid, std::process::id() as i32);
    }
}
