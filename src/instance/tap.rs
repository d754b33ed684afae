//! Tap devices for the domain's NICs, opened and owned by the agent.
//!
//! Like the guest-RAM memfd, each tap fd is created once per domain run and
//! handed to every QEMU instance at a fixed fd number (`-netdev
//! tap,fd=N`). The device is therefore never closed or recreated during a
//! migration: frames that arrive while both QEMUs are paused wait in the
//! tap's queue (its txqueuelen) and the new instance reads them.
//!
//! The tap is opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`: QEMU
//! finds the flag on the fd and uses a vnet header, so the guest gets
//! checksum offload, TSO and UFO/USO between host and guest. The header
//! length and the offloads are properties of the *device*, shared by
//! every instance; which instance may change them is the tap guard's
//! business (`instance::tapguard`). Before any QEMU runs, the agent asks
//! the kernel which offloads it accepts ([`TapOffloads`], the answers the
//! guard gives a destination's probes) and leaves none on. A name that
//! does not exist is created (and goes away when the last fd closes, i.e.
//! when the domain stops); a persistent tap an admin created is attached
//! as is.
//!
//! After an agent restart the fd is taken back from the running QEMU with
//! `pidfd_getfd` (opening `/proc/PID/fd/N` would open `/dev/net/tun` anew,
//! not the attached queue) and its interface name checked.

use crate::instance::process::Pidfd;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// The fd number of the first NIC's tap inside every QEMU instance (guest
/// RAM is 3); NIC `i` is at `FIRST_TAP_FD + i`.
pub const FIRST_TAP_FD: i32 = 4;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUN_F_CSUM: libc::c_ulong = 0x01;
const SIOCBRADDIF: libc::c_ulong = 0x89a2;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("opening /dev/net/tun")]
    OpenTun(#[source] io::Error),
    #[error("tap {name} is in use by another process (a tap can be attached once)")]
    Busy { name: String },
    #[error("creating or attaching tap {name}")]
    SetIff {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("bringing tap {name} up")]
    LinkUp {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("attaching tap {name} to bridge {bridge}")]
    Bridge {
        name: String,
        bridge: String,
        #[source]
        source: io::Error,
    },
    #[error("taking tap fd {fd} back from QEMU pid {pid}")]
    Recover {
        pid: i32,
        fd: i32,
        #[source]
        source: io::Error,
    },
    #[error("fd {fd} of QEMU pid {pid} is tap {found:?}, expected {expected:?}")]
    WrongTap {
        pid: i32,
        fd: i32,
        found: String,
        expected: String,
    },
}

#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

#[repr(C)]
struct IfReqIndex {
    name: [u8; libc::IFNAMSIZ],
    index: libc::c_int,
    _pad: [u8; 20],
}

fn ifname_bytes(name: &str) -> [u8; libc::IFNAMSIZ] {
    let mut b = [0u8; libc::IFNAMSIZ];
    let n = name.len().min(libc::IFNAMSIZ - 1);
    b[..n].copy_from_slice(&name.as_bytes()[..n]);
    b
}

fn name_of(b: &[u8; libc::IFNAMSIZ]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// Which offload probes the kernel accepts on the domain's taps.
pub type TapOffloads = crate::instance::tapguard::Offloads;

/// One tap device, held open by the agent.
#[derive(Debug)]
pub struct Tap {
    name: String,
    fd: OwnedFd,
    offloads: TapOffloads,
}

impl Tap {
    /// Create (or attach to) tap `name`, bring its link up, and enslave it
    /// to `bridge` if given.
    pub fn open(name: &str, bridge: Option<&str>) -> Result<Tap, TapError> {
        // SAFETY: open(2) with a constant path; the result is checked.
        let raw = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
            )
        };
        if raw < 0 {
            return Err(TapError::OpenTun(io::Error::last_os_error()));
        }
        // SAFETY: a new fd we now own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut req = IfReqFlags {
            name: ifname_bytes(name),
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        // SAFETY: TUNSETIFF reads and writes one struct ifreq.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EBUSY) {
                return Err(TapError::Busy { name: name.into() });
            }
            return Err(TapError::SetIff {
                name: name.into(),
                source: e,
            });
        }
        let tap = Tap {
            name: name_of(&req.name),
            fd,
            offloads: TapOffloads::default(),
        };
        let set_offload = |flags: libc::c_ulong| {
            // SAFETY: TUNSETOFFLOAD takes an integer argument.
            unsafe { libc::ioctl(tap.fd.as_raw_fd(), TUNSETOFFLOAD, flags) == 0 }
        };
        // The probes QEMU makes, answered by the kernel now, before any
        // guest traffic; then no offloads until the first QEMU's guest
        // negotiates its own (a persistent tap may carry some from an
        // earlier user).
        let offloads = TapOffloads {
            ufo: set_offload(TUN_F_CSUM | crate::instance::tapguard::TUN_F_UFO as libc::c_ulong),
            uso: set_offload(
                TUN_F_CSUM
                    | (crate::instance::tapguard::TUN_F_USO4
                        | crate::instance::tapguard::TUN_F_USO6)
                        as libc::c_ulong,
            ),
        };
        if !set_offload(0) {
            return Err(TapError::SetIff {
                name: tap.name.clone(),
                source: io::Error::last_os_error(),
            });
        }
        tracing::debug!(tap = %tap.name, ?offloads, "tap opened with a vnet header");
        let tap = Tap { offloads, ..tap };
        let ctl = ctl_socket().map_err(|source| TapError::LinkUp {
            name: tap.name.clone(),
            source,
        })?;
        if let Some(br) = bridge {
            bridge_add(&ctl, br, &tap.name).map_err(|source| TapError::Bridge {
                name: tap.name.clone(),
                bridge: br.into(),
                source,
            })?;
        }
        link_up(&ctl, &tap.name).map_err(|source| TapError::LinkUp {
            name: tap.name.clone(),
            source,
        })?;
        Ok(tap)
    }

    /// Take the tap at fd `fd` of a running QEMU back (agent restart);
    /// `offloads` as recorded when it was opened (probing again would
    /// switch offloads on under the running guest).
    pub fn recover(
        pidfd: &Pidfd,
        fd: i32,
        expected: &str,
        offloads: TapOffloads,
    ) -> Result<Tap, TapError> {
        let pid = pidfd.pid();
        let owned = pidfd
            .get_fd(fd)
            .map_err(|source| TapError::Recover { pid, fd, source })?;
        let mut req = IfReqFlags {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        // SAFETY: TUNGETIFF writes one struct ifreq; fails on a non-tun fd.
        if unsafe { libc::ioctl(owned.as_raw_fd(), TUNGETIFF, &mut req) } < 0 {
            return Err(TapError::Recover {
                pid,
                fd,
                source: io::Error::last_os_error(),
            });
        }
        let found = name_of(&req.name);
        if found != expected {
            return Err(TapError::WrongTap {
                pid,
                fd,
                found,
                expected: expected.into(),
            });
        }
        Ok(Tap {
            name: found,
            fd: owned,
            offloads,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn offloads(&self) -> TapOffloads {
        self.offloads
    }

    pub fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn ctl_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(s) })
}

fn link_up(s: &OwnedFd, name: &str) -> io::Result<()> {
    let mut req = IfReqFlags {
        name: ifname_bytes(name),
        flags: 0,
        _pad: [0; 22],
    };
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read/write one struct ifreq.
    unsafe {
        if libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(io::Error::last_os_error());
        }
        req.flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn bridge_add(s: &OwnedFd, bridge: &str, port: &str) -> io::Result<()> {
    let cport = std::ffi::CString::new(port).map_err(io::Error::other)?;
    // SAFETY: a valid NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(cport.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    let req = IfReqIndex {
        name: ifname_bytes(bridge),
        index: index as libc::c_int,
        _pad: [0; 20],
    };
    // SAFETY: SIOCBRADDIF reads one struct ifreq (name + ifindex).
    if unsafe { libc::ioctl(s.as_raw_fd(), SIOCBRADDIF, &req) } < 0 {
        let e = io::Error::last_os_error();
        // Already some bridge's port (a persistent tap)? Fine if it is this
        // bridge's; any other failure stands.
        let master = std::fs::read_link(format!("/sys/class/net/{port}/master")).ok();
        let ours = master
            .as_deref()
            .and_then(|m| m.file_name())
            .is_some_and(|m| m == bridge);
        if !ours {
            return Err(e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_layout_matches_the_kernel() {
        assert_eq!(std::mem::size_of::<IfReqFlags>(), 40);
        assert_eq!(std::mem::size_of::<IfReqIndex>(), 40);
        assert_eq!(name_of(&ifname_bytes("tap0")), "tap0");
        assert_eq!(name_of(&ifname_bytes(&"x".repeat(20))).len(), 15);
    }
}
