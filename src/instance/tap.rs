//! Tap devices for the domain's NICs, opened and owned by the agent.
//!
//! Like the guest-RAM memfd, each tap is opened once per domain run and
//! handed to every QEMU instance at fixed fd numbers
//! (`cmdline::tap_fd_numbers`). The device is therefore never closed or
//! recreated during a migration.
//!
//! A tap is multi-queue (`IFF_MULTI_QUEUE`) with two sets of queues, one
//! per QEMU of a migration ([`Tap`]); the agent's steering program
//! (`instance::steering`) hands frames to the running instance's set,
//! and to the destination's from right before `migrate`, once the
//! source's queues are drained: a stopping QEMU finds no frame to take.
//!
//! The tap is opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`: QEMU
//! finds the flag on the fd and uses a vnet header, so the guest gets
//! checksum offload, TSO and UFO/USO between host and guest. The header
//! length and the offloads are properties of the *device*, shared by
//! every instance; which instance may change them is the tap guard's
//! business (`instance::tapguard`), which also answers QEMU's queue and
//! steering ioctls. Before any QEMU runs, the agent asks the kernel which
//! offloads it accepts ([`TapOffloads`], the answers the guard gives a
//! destination's probes) and leaves none on. A name that does not exist
//! is created (and goes away when the last fd closes, i.e. when the
//! domain stops); a persistent tap an admin created must be multi-queue
//! and free, and is attached as is.
//!
//! After an agent restart the queues are taken back from the running QEMU
//! with `pidfd_getfd` (opening `/proc/PID/fd/N` would open `/dev/net/tun`
//! anew, not the attached queue) and their interface name checked.

use crate::instance::process::Pidfd;
use crate::instance::steering::{self, SteeringError};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The fd number of the first NIC's tap inside every QEMU instance (guest
/// RAM is 3); NIC `i`'s first queue is at `FIRST_TAP_FD + i`.
pub const FIRST_TAP_FD: i32 = 4;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const TUNGETVNETHDRSZ: libc::c_ulong = 0x8004_54d7;
const VIRTIO_NET_HDR_LEN: usize = 10;
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
    #[error(
        "tap {name} exists and is not multi-queue; qlive needs two queues per NIC to move \
         the guest's traffic between QEMUs without losing a frame: recreate it with \
         `ip tuntap add dev {name} mode tap multi_queue vnet_hdr` (or let qlive create it)"
    )]
    NotMultiQueue { name: String },
    #[error("steering tap {name}'s frames")]
    Steering {
        name: String,
        #[source]
        source: SteeringError,
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

/// The most queues a NIC may have (per instance; the tap has twice as
/// many, see [`Tap`]).
pub const MAX_QUEUES: u16 = crate::domain::definition::MAX_QUEUES;

/// Which queues the kernel hands frames to, and which each instance's
/// QEMU reads (what it enabled through `TUNSETQUEUE`, which the tap guard
/// answers without running).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Steer {
    /// The set whose queues receive.
    set: u8,
    /// Per set: bit `j` = queue `j` of the set is read by its QEMU.
    enabled: [u32; 2],
}

/// One tap device, held open by the agent.
///
/// A tap opened by this qlive is multi-queue (`IFF_MULTI_QUEUE`) with two
/// *sets* of `queues` queues: `fds[0..queues]` are set 0, the rest set 1.
/// The instance that boots the guest reads set 0; each migration's
/// destination reads the set its source does not, so the two QEMUs of a
/// migration never share a queue, and the steering program
/// (`instance::steering`) decides which set receives. Every instance holds
/// all the fds (the queues of the other set at fd numbers QEMU does not
/// use), so no queue is ever detached while the domain runs and queue
/// numbers never move. An instance of an older qlive has one single-queue
/// fd per NIC (`queues == 0` here): no steering.
#[derive(Debug)]
pub struct Tap {
    name: String,
    queues: u16,
    fds: Vec<OwnedFd>,
    offloads: TapOffloads,
    steer: std::sync::Mutex<Steer>,
    /// Where `steer` is kept for the next agent (the domain's run
    /// directory); None for a legacy tap.
    state: Option<PathBuf>,
}

fn open_queue(name: &str, multi_queue: bool) -> Result<(OwnedFd, String), TapError> {
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
    let mq = if multi_queue { IFF_MULTI_QUEUE } else { 0 };
    let mut req = IfReqFlags {
        name: ifname_bytes(name),
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | mq,
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
    Ok((fd, name_of(&req.name)))
}

/// What the kernel says of an existing tun device (rtnetlink
/// `RTM_GETLINK`, the `IFLA_TUN_*` attributes `ip -d link` shows).
#[derive(Debug, Clone, PartialEq, Eq)]
struct TunInfo {
    multi_queue: bool,
    /// Attached queues.
    queues: u32,
    /// The ifindex of the bridge (or other master) the device is a port of.
    master: Option<u32>,
    /// The link kind (`IFLA_INFO_KIND`: `tun`, `bridge`, `bond`, ...).
    kind: Option<String>,
}

const RTM_GETLINK: u16 = 18;
const RTM_NEWLINK: u16 = 16;
const NLMSG_ERROR: u16 = 2;
const IFLA_IFNAME: u16 = 3;
const IFLA_MASTER: u16 = 10;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const IFLA_TUN_MULTI_QUEUE: u16 = 7;
const IFLA_TUN_NUM_QUEUES: u16 = 8;

/// The netlink attributes in `b`: (type without flags, payload).
fn attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([b[0], b[1]]));
        let ty = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff;
        if len < 4 || len > b.len() {
            break;
        }
        out.push((ty, &b[4..len]));
        b = &b[((len + 3) & !3).min(b.len())..];
    }
    out
}

/// `None`: no interface `name` in this network namespace; `Some` with
/// `queues` 0 and not multi-queue for a device that is not a tun.
fn tun_info(name: &str) -> io::Result<Option<TunInfo>> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let s = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if s < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd we own.
    let s = unsafe { OwnedFd::from_raw_fd(s) };
    // nlmsghdr (16) + ifinfomsg (16) + IFLA_IFNAME
    let name_attr_len = 4 + name.len() + 1;
    let total = 32 + ((name_attr_len + 3) & !3);
    let mut req = vec![0u8; total];
    req[0..4].copy_from_slice(&(total as u32).to_ne_bytes());
    req[4..6].copy_from_slice(&RTM_GETLINK.to_ne_bytes());
    req[6..8].copy_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    req[32..34].copy_from_slice(&(name_attr_len as u16).to_ne_bytes());
    req[34..36].copy_from_slice(&IFLA_IFNAME.to_ne_bytes());
    req[36..36 + name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: send(2) of a buffer we own to the kernel (no address).
    if unsafe { libc::send(s.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 32768];
    // SAFETY: recv(2) into a buffer we own.
    let n = unsafe { libc::recv(s.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let b = &buf[..n as usize];
    if b.len() < 16 {
        return Err(io::Error::other("short netlink answer"));
    }
    let ty = u16::from_ne_bytes([b[4], b[5]]);
    if ty == NLMSG_ERROR {
        let errno = b
            .get(16..20)
            .map(|e| -i32::from_ne_bytes([e[0], e[1], e[2], e[3]]))
            .unwrap_or(libc::EIO);
        if errno == libc::ENODEV {
            return Ok(None);
        }
        return Err(io::Error::from_raw_os_error(errno));
    }
    if ty != RTM_NEWLINK || b.len() < 32 {
        return Err(io::Error::other("unexpected netlink answer"));
    }
    let len = (u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize).min(b.len());
    let mut info = TunInfo {
        multi_queue: false,
        queues: 0,
        master: None,
        kind: None,
    };
    for (t, v) in attrs(&b[32..len]) {
        if let (IFLA_MASTER, [a, b, c, d]) = (t, v) {
            info.master = Some(u32::from_ne_bytes([*a, *b, *c, *d]));
        }
        if t != IFLA_LINKINFO {
            continue;
        }
        let li = attrs(v);
        if let Some((_, k)) = li.iter().find(|(t, _)| *t == IFLA_INFO_KIND) {
            let k = k.split(|b| *b == 0).next().unwrap_or_default();
            info.kind = Some(String::from_utf8_lossy(k).into_owned());
        }
        let is_tun = info.kind.as_deref() == Some("tun");
        for (t, d) in li {
            if t != IFLA_INFO_DATA || !is_tun {
                continue;
            }
            for (t, v) in attrs(d) {
                match (t, v) {
                    (IFLA_TUN_MULTI_QUEUE, [m, ..]) => info.multi_queue = *m != 0,
                    (IFLA_TUN_NUM_QUEUES, [a, b, c, d]) => {
                        info.queues = u32::from_ne_bytes([*a, *b, *c, *d])
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(Some(info))
}

/// The bridge interface `name` is a port of, in the agent's network
/// namespace (rtnetlink: sysfs may show another namespace's devices).
/// `Ok(None)`: not a port of anything; an error when there is no such
/// interface.
pub fn bridge_of(name: &str) -> io::Result<Option<String>> {
    let Some(info) = tun_info(name)? else {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no interface {name}"),
        ));
    };
    let Some(index) = info.master else {
        return Ok(None);
    };
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: if_indextoname writes at most IF_NAMESIZE bytes into buf.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: on success buf holds a NUL-terminated name.
    let master = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    // A bond, a VRF or Open vSwitch's datapath is a master too.
    let kind = tun_info(&master)?.and_then(|m| m.kind);
    if kind.as_deref() != Some("bridge") {
        return Err(io::Error::other(format!(
            "its master {master} is a {}, not a Linux bridge",
            kind.as_deref().unwrap_or("device of unknown kind")
        )));
    }
    Ok(Some(master))
}

/// Does tap `name` exist with queues attached (by this agent's previous
/// run of the domain whose last fds are being closed, or by another
/// process)?
pub fn attached(name: &str) -> bool {
    matches!(tun_info(name), Ok(Some(i)) if i.queues > 0)
}

impl Tap {
    /// Create (or attach to) tap `name` with two sets of `queues` queues,
    /// bring its link up, enslave it to `bridge` if given, and steer its
    /// frames to set 0 (the booting instance's). `state`: the file that
    /// keeps the steering for an agent restart.
    pub fn open(
        name: &str,
        bridge: Option<&str>,
        queues: u16,
        state: PathBuf,
    ) -> Result<Tap, TapError> {
        let queues = queues.clamp(1, MAX_QUEUES);
        // A persistent tap an admin created: it must be multi-queue, and
        // free (a multi-queue tap takes more than one fd, so "in use" is
        // another process's queue attached, not EBUSY).
        match tun_info(name) {
            Ok(Some(i)) if !i.multi_queue => {
                return Err(TapError::NotMultiQueue { name: name.into() })
            }
            Ok(Some(i)) if i.queues > 0 => return Err(TapError::Busy { name: name.into() }),
            Ok(_) => {}
            Err(e) => tracing::warn!(tap = name, "cannot read the tap's queues (rtnetlink): {e}"),
        }
        let (first, name) = open_queue(name, true)?;
        let mut fds = vec![first];
        for _ in 1..2 * queues {
            fds.push(open_queue(&name, true)?.0);
        }
        let set_offload = |flags: libc::c_ulong| {
            // SAFETY: TUNSETOFFLOAD takes an integer argument.
            unsafe { libc::ioctl(fds[0].as_raw_fd(), TUNSETOFFLOAD, flags) == 0 }
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
                name,
                source: io::Error::last_os_error(),
            });
        }
        let tap = Tap {
            name,
            queues,
            fds,
            offloads,
            // The booting QEMU reads its set; until its guest enables more
            // queue pairs only the first queue receives.
            steer: std::sync::Mutex::new(Steer {
                set: 0,
                enabled: [1, 1],
            }),
            state: Some(state),
        };
        tap.apply(&tap.lock())
            .map_err(|source| TapError::Steering {
                name: tap.name.clone(),
                source,
            })?;
        tracing::debug!(tap = %tap.name, queues, ?offloads, "tap opened with a vnet header, two sets of queues");
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

    /// Take the tap back from a running QEMU (agent restart): its queues
    /// at `fds` (set 0 first; one fd for an older qlive's single-queue
    /// tap, `queues == 0`), `offloads` as recorded when it was opened
    /// (probing again would switch offloads on under the running guest).
    pub fn recover(
        pidfd: &Pidfd,
        fds: &[i32],
        queues: u16,
        expected: &str,
        offloads: TapOffloads,
        state: Option<PathBuf>,
        default_set: u8,
    ) -> Result<Tap, TapError> {
        let pid = pidfd.pid();
        let mut owned = Vec::with_capacity(fds.len());
        for &fd in fds {
            let f = pidfd
                .get_fd(fd)
                .map_err(|source| TapError::Recover { pid, fd, source })?;
            let mut req = IfReqFlags {
                name: [0; libc::IFNAMSIZ],
                flags: 0,
                _pad: [0; 22],
            };
            // SAFETY: TUNGETIFF writes one struct ifreq; fails on a non-tun fd.
            if unsafe { libc::ioctl(f.as_raw_fd(), TUNGETIFF, &mut req) } < 0 {
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
            owned.push(f);
        }
        // Without the record, only each set's first queue (always read).
        let steer = state
            .as_deref()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| serde_json::from_slice::<Steer>(&b).ok())
            .unwrap_or(Steer {
                set: default_set & 1,
                enabled: [1, 1],
            });
        Ok(Tap {
            name: expected.into(),
            queues,
            fds: owned,
            offloads,
            steer: std::sync::Mutex::new(steer),
            state: state.filter(|_| queues > 0),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn offloads(&self) -> TapOffloads {
        self.offloads
    }

    /// Queues per set; 0: an older qlive's single-queue tap.
    pub fn queues(&self) -> u16 {
        self.queues
    }

    /// The fds an instance reading set `set` gets, in the order
    /// `cmdline::tap_fd_numbers` places them: its own queues, then the
    /// other set's.
    pub fn fds_for(&self, set: u8) -> Vec<BorrowedFd<'_>> {
        if self.queues == 0 {
            return self.fds.iter().map(|f| f.as_fd()).collect();
        }
        let n = usize::from(self.queues);
        let (own, other) = if set == 0 {
            (0..n, n..2 * n)
        } else {
            (n..2 * n, 0..n)
        };
        own.chain(other).map(|k| self.fds[k].as_fd()).collect()
    }

    /// The set the kernel hands frames to now.
    pub fn steered_set(&self) -> u8 {
        self.lock().set
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Steer> {
        self.steer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Load and attach the program for steering `st` (the caller holds
    /// the lock, so two changes never cross), and keep it for the next
    /// agent.
    fn apply(&self, st: &Steer) -> Result<(), SteeringError> {
        if self.queues == 0 {
            return Ok(());
        }
        let mask = st.enabled[usize::from(st.set & 1)];
        // The queues QEMU reads are a prefix (virtio-net enables pairs
        // 0..n); the first always.
        let count = (mask.trailing_ones() as u16).clamp(1, self.queues);
        steering::steer(
            self.fds[0].as_fd(),
            u16::from(st.set & 1) * self.queues,
            count,
        )?;
        if let Some(p) = &self.state {
            if let Ok(b) = serde_json::to_vec(st) {
                if let Err(e) = crate::fsutil::write_atomic(p, &b, 0o600) {
                    tracing::warn!(tap = %self.name, "keeping the tap's steering in {}: {e}", p.display());
                }
            }
        }
        Ok(())
    }

    /// A destination that will read set `set` is being started: it will
    /// read the queues its source reads (the guest's number of queue
    /// pairs comes with the migration; QEMU disables the others as it
    /// loads the device, and says so).
    pub fn reset_set(&self, set: u8) {
        if self.queues == 0 {
            return;
        }
        let mut st = self.lock();
        st.enabled[usize::from(set & 1)] = st.enabled[usize::from((set & 1) ^ 1)];
    }

    /// Hand every frame from now on to set `set`.
    pub fn steer_to(&self, set: u8) -> Result<(), SteeringError> {
        if self.queues == 0 {
            return Ok(());
        }
        let mut st = self.lock();
        st.set = set & 1;
        self.apply(&st)
    }

    /// The QEMU reading set `set` enabled (`true`) or disabled queue
    /// `queue` of it (its `TUNSETQUEUE`, which the guard does not run).
    /// A disabled queue's frames are dropped, as the kernel does on a
    /// detach.
    pub fn set_queue_enabled(&self, set: u8, queue: u16, enabled: bool) {
        if self.queues == 0 || queue >= self.queues {
            return;
        }
        {
            let mut st = self.lock();
            let m = &mut st.enabled[usize::from(set & 1)];
            if enabled {
                *m |= 1 << queue;
            } else {
                *m &= !(1 << queue);
            }
            if st.set == set & 1 {
                if let Err(e) = self.apply(&st) {
                    tracing::error!(tap = %self.name, "steering after a queue change: {}", crate::error::chain(&e));
                }
            }
        }
        if !enabled {
            // Frames the queue still holds go to the queues that are read.
            let k = usize::from(set & 1) * usize::from(self.queues) + usize::from(queue);
            let frames = self.take_frames(&[k]);
            if !frames.is_empty() {
                let sent = resend(&self.name, self.fds[0].as_fd(), &frames).unwrap_or(0);
                tracing::debug!(tap = %self.name, set, queue, frames = frames.len(), sent, "frames of a disabled queue sent again");
            }
        }
    }

    /// Indexes into `fds` of set `set`'s queues its QEMU reads.
    fn read_queues(&self, set: u8) -> Vec<usize> {
        let n = usize::from(self.queues);
        let mask = self.lock().enabled[usize::from(set & 1)];
        (0..n)
            .filter(|j| mask & (1 << j) != 0 || *j == 0)
            .map(|j| usize::from(set & 1) * n + j)
            .collect()
    }

    /// Wait until set `set`'s queues are empty (its QEMU has read every
    /// frame they held; nothing new arrives once the frames are steered
    /// elsewhere), at most `timeout`. `false`: still frames after it.
    pub async fn drain(&self, set: u8, timeout: Duration) -> bool {
        if self.queues == 0 {
            return true;
        }
        let queues = self.read_queues(set);
        let until = Instant::now() + timeout;
        // A frame the kernel steered just before the switch may still be
        // on its way to the queue: empty twice, a millisecond apart.
        let mut empty_once = false;
        loop {
            let empty = queues.iter().all(|&k| !readable(self.fds[k].as_fd()));
            if empty && empty_once {
                return true;
            }
            empty_once = empty;
            if Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Deliver again what set `set`'s queues hold (a destination that
    /// never ran read none of it): each frame is read off the queue and
    /// sent through the tap once more, to whichever set is steered now.
    /// Call only when no QEMU reads `set`. Returns (re-sent, dropped).
    pub fn redeliver(&self, set: u8) -> (usize, usize) {
        if self.queues == 0 {
            return (0, 0);
        }
        let n = usize::from(self.queues);
        let all: Vec<usize> = (0..n).map(|j| usize::from(set & 1) * n + j).collect();
        let frames = self.take_frames(&all);
        if frames.is_empty() {
            return (0, 0);
        }
        match resend(&self.name, self.fds[0].as_fd(), &frames) {
            Ok(sent) => (sent, frames.len() - sent),
            Err(e) => {
                tracing::error!(tap = %self.name, frames = frames.len(), "re-sending the frames a destination left: {e}");
                (0, frames.len())
            }
        }
    }

    /// Read every frame (vnet header included) the queues `which` hold.
    fn take_frames(&self, which: &[usize]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for &k in which {
            let fd = self.fds[k].as_fd();
            while readable(fd) {
                let mut buf = vec![0u8; 65536 + 64];
                // SAFETY: read(2) into a buffer we own.
                let r = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if r <= 0 {
                    break;
                }
                buf.truncate(r as usize);
                out.push(buf);
            }
        }
        out
    }
}

/// Where NIC `nic`'s tap keeps its steering, in the domain's run
/// directory.
pub fn steering_file(domain_run_dir: &Path, nic: usize) -> PathBuf {
    domain_run_dir.join(format!("nic{nic}.steering"))
}

fn readable(fd: BorrowedFd<'_>) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    unsafe { libc::poll(&mut p, 1, 0) == 1 && p.revents & libc::POLLIN != 0 }
}

/// Send `frames` (as read from a queue: the tap's vnet header, then the
/// Ethernet frame) through tap `name` towards the guest again, through a
/// packet socket with a vnet header (GSO frames stay whole).
fn resend(name: &str, tap: BorrowedFd<'_>, frames: &[Vec<u8>]) -> io::Result<usize> {
    let mut hdr_len: libc::c_int = 0;
    // SAFETY: TUNGETVNETHDRSZ writes one int.
    if unsafe { libc::ioctl(tap.as_raw_fd(), TUNGETVNETHDRSZ, &mut hdr_len) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let hdr_len = usize::try_from(hdr_len).unwrap_or(VIRTIO_NET_HDR_LEN);
    let cname = std::ffi::CString::new(name).map_err(io::Error::other)?;
    // SAFETY: a valid NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let s = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd we own.
    let s = unsafe { OwnedFd::from_raw_fd(s) };
    let one: libc::c_int = 1;
    // SAFETY: PACKET_VNET_HDR takes an int.
    if unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_VNET_HDR,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zeroed plain data, then filled.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_ifindex = index as i32;
    sll.sll_halen = 6;
    let mut sent = 0;
    for f in frames {
        if f.len() < hdr_len + 14 {
            continue;
        }
        // The socket's header is the 10-byte struct virtio_net_hdr; the
        // tap's may be 12 (num_buffers last).
        let mut pkt = Vec::with_capacity(VIRTIO_NET_HDR_LEN + f.len() - hdr_len);
        pkt.extend_from_slice(&f[..VIRTIO_NET_HDR_LEN.min(hdr_len)]);
        pkt.resize(VIRTIO_NET_HDR_LEN, 0);
        pkt.extend_from_slice(&f[hdr_len..]);
        sll.sll_addr[..6].copy_from_slice(&f[hdr_len..hdr_len + 6]);
        // SAFETY: sendto(2) of a buffer we own to a filled sockaddr_ll.
        let r = unsafe {
            libc::sendto(
                s.as_raw_fd(),
                pkt.as_ptr().cast(),
                pkt.len(),
                0,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r >= 0 {
            sent += 1;
        }
    }
    Ok(sent)
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fds[0].as_fd()
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
