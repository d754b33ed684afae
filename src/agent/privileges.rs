//! Least privilege: the capabilities the agent keeps, and the drop of all
//! others at start, before any runtime thread exists (capability sets are
//! per thread; threads created later inherit the reduced sets).
//!
//! Hooks are exec'd by the agent as root and get at most the bounding set
//! below. QEMU gets less: as the QEMU user (`--qemu-user`) none at all, as
//! root only CAP_DAC_OVERRIDE; it also runs with no_new_privs, a seccomp
//! rule of qlive's and QEMU's own `-sandbox on` (`instance::sandbox`,
//! `instance::runas`, `instance::cmdline`). `systemd/qlive.service`
//! sets the same CapabilityBoundingSet; a unit test keeps the two equal.

use caps::{CapSet, Capability};

/// What the agent keeps, and why. (QEMU inherits this set as its bound.)
pub const KEEP: &[(Capability, &str)] = &[
    (
        Capability::CAP_NET_ADMIN,
        "create taps (TUNSETIFF), add them to bridges, set their link up",
    ),
    (
        Capability::CAP_BPF,
        "load the taps' steering programs (TUNSETSTEERINGEBPF), which move a guest's frames to the migration's destination",
    ),
    (
        Capability::CAP_NET_RAW,
        "send frames a failed migration's destination never read back to the guest (a packet socket on the tap)",
    ),
    (
        Capability::CAP_SYS_PTRACE,
        "pidfd_getfd of a running QEMU's tap fds and /proc/PID/fd, maps, exe of QEMUs after an agent restart; the tap guard reads the argument of a QEMU's TUNSETQUEUE (process_vm_readv)",
    ),
    (
        Capability::CAP_KILL,
        "signal QEMU processes through their pidfds",
    ),
    (
        Capability::CAP_DAC_OVERRIDE,
        "a root QEMU and the disk preflight open images, kernels and firmware whoever owns them; the agent reads and removes a QEMU user's instance directory",
    ),
    (
        Capability::CAP_FOWNER,
        "label files the agent does not own for SELinux (disk images, security.selinux)",
    ),
    (
        Capability::CAP_CHOWN,
        "give the API socket to the API group, and an instance directory to the QEMU user",
    ),
    (
        Capability::CAP_SETUID,
        "start QEMU as the unprivileged QEMU user (--qemu-user), between fork and exec",
    ),
    (
        Capability::CAP_SETGID,
        "set that user's groups (e.g. kvm) for QEMU, between fork and exec",
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("reading capability set {set}: {message}")]
    Read { set: &'static str, message: String },
    #[error(
        "cannot drop {cap} from the bounding set: CAP_SETPCAP is not in the effective set; \
         run the agent as root or set CapabilityBoundingSet in its unit"
    )]
    NoSetpcap { cap: String },
    #[error("dropping capabilities ({what}): {message}")]
    Drop { what: String, message: String },
}

pub fn keep_set() -> caps::CapsHashSet {
    KEEP.iter().map(|(c, _)| *c).collect()
}

/// Drop every capability not in [`KEEP`] from the bounding, permitted,
/// effective, inheritable and ambient sets of the calling thread. Call
/// while the process is single-threaded. Returns what is kept.
pub fn drop_all_but_kept() -> Result<caps::CapsHashSet, PrivilegeError> {
    let read = |set: CapSet, name: &'static str| {
        caps::read(None, set).map_err(|e| PrivilegeError::Read {
            set: name,
            message: e.to_string(),
        })
    };
    let keep = keep_set();
    let bounding = read(CapSet::Bounding, "bounding")?;
    let effective = read(CapSet::Effective, "effective")?;
    for cap in bounding.difference(&keep) {
        if !effective.contains(&Capability::CAP_SETPCAP) {
            return Err(PrivilegeError::NoSetpcap {
                cap: cap.to_string(),
            });
        }
        caps::drop(None, CapSet::Bounding, *cap).map_err(|e| PrivilegeError::Drop {
            what: format!("bounding {cap}"),
            message: e.to_string(),
        })?;
    }
    let permitted = read(CapSet::Permitted, "permitted")?;
    let kept: caps::CapsHashSet = permitted.intersection(&keep).copied().collect();
    let fail = |what: &str| {
        let what = what.to_string();
        move |e: caps::errors::CapsError| PrivilegeError::Drop {
            what,
            message: e.to_string(),
        }
    };
    caps::clear(None, CapSet::Ambient).map_err(fail("ambient"))?;
    caps::clear(None, CapSet::Inheritable).map_err(fail("inheritable"))?;
    caps::set(None, CapSet::Effective, &kept).map_err(fail("effective"))?;
    caps::set(None, CapSet::Permitted, &kept).map_err(fail("permitted"))?;
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The unit's CapabilityBoundingSet is the agent's list.
    #[test]
    fn unit_bounding_set_matches_the_kept_list() {
        let unit = include_str!("../../systemd/qlive.service");
        let line = unit
            .lines()
            .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
            .expect("qlive.service has CapabilityBoundingSet=");
        let mut in_unit: Vec<String> = line.split_whitespace().map(String::from).collect();
        let mut ours: Vec<String> = KEEP.iter().map(|(c, _)| c.to_string()).collect();
        in_unit.sort();
        ours.sort();
        assert_eq!(in_unit, ours);
    }
}
