//! Per-instance paths. Every QEMU process is an *instance* with a host-wide,
//! never-reused `domid`; all of its files live under
//! `<run>/domains/<name>/<domid>/`, so two instances of one domain (source
//! and destination of a migration) never clash.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// sun_path is 108 bytes including the terminating NUL.
pub const MAX_SOCKET_PATH: usize = 107;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstancePaths {
    pub dir: PathBuf,
    pub qmp: PathBuf,
    pub migrate: PathBuf,
    pub pid: PathBuf,
    pub log: PathBuf,
}

impl InstancePaths {
    pub fn new(run_dir: &Path, name: &str, domid: u64) -> InstancePaths {
        InstancePaths::in_dir(&domain_run_dir(run_dir, name).join(domid.to_string()))
    }

    /// The paths of the instance whose directory is `dir`.
    pub fn in_dir(dir: &Path) -> InstancePaths {
        let dir = dir.to_path_buf();
        InstancePaths {
            qmp: dir.join("qmp.sock"),
            migrate: dir.join("migrate.sock"),
            pid: dir.join("pid"),
            log: dir.join("qemu.log"),
            dir,
        }
    }

    /// The socket path that is longest, if it is over the kernel's limit.
    pub fn too_long_socket(&self) -> Option<&Path> {
        [&self.qmp, &self.migrate]
            .into_iter()
            .find(|p| p.as_os_str().len() > MAX_SOCKET_PATH)
            .map(|p| p.as_path())
    }
}

/// `<run>/domains/<name>`: holds the instance dirs and the domain's status.
pub fn domain_run_dir(run_dir: &Path, name: &str) -> PathBuf {
    run_dir.join("domains").join(name)
}

/// `<run>/domains/<name>/vnc.sock`: the domain's VNC server, at the same
/// path for the whole run (the agent hands each connection to QEMU).
pub fn vnc_socket(run_dir: &Path, name: &str) -> PathBuf {
    domain_run_dir(run_dir, name).join("vnc.sock")
}

/// `<run>/domains/<name>/guest-agent.sock`: the domain's guest agent, at
/// the same path for the whole run (crate::instance::endpoint).
pub fn guest_agent_socket(run_dir: &Path, name: &str) -> PathBuf {
    domain_run_dir(run_dir, name).join("guest-agent.sock")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_instances_never_share_a_path() {
        let a = InstancePaths::new(Path::new("/run/qlive"), "vm", 7);
        let b = InstancePaths::new(Path::new("/run/qlive"), "vm", 8);
        let pa = [&a.dir, &a.qmp, &a.migrate, &a.pid, &a.log];
        let pb = [&b.dir, &b.qmp, &b.migrate, &b.pid, &b.log];
        for x in pa {
            assert!(!pb.contains(&x));
        }
    }

    #[test]
    fn default_run_dir_fits_longest_name() {
        let name = "a".repeat(64);
        let p = InstancePaths::new(Path::new("/run/qlive"), &name, 999_999_999);
        assert!(p.too_long_socket().is_none());
    }
}
