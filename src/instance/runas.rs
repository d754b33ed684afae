//! Running QEMU as an unprivileged user (`--qemu-user`, the package's
//! `qlive-qemu`).
//!
//! The agent switches the child to the user between fork and exec
//! (setgroups, setgid, setuid: the same on every QEMU version, unlike
//! `-runas` and `-run-with user=`), after placing the fds QEMU inherits.
//! What QEMU needs it gets as fds (guest RAM, taps, the console log) or in
//! a directory the agent hands to the user (the instance directory for its
//! sockets and pidfile). What it still opens by path (disk images, kernel,
//! initrd) must be accessible to the user: the agent checks that at start
//! and in the migration preflight and names the file and the missing
//! permission, rather than changing ownership of the user's files.

use std::ffi::CString;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum RunAsError {
    #[error("QEMU user {0:?} does not exist on this host")]
    NoSuchUser(String),
    #[error("looking up QEMU user {name:?}: {message}")]
    Lookup { name: String, message: String },
    #[error("QEMU user {0:?} is root; leave --qemu-user unset to run QEMU as root")]
    Root(String),
}

/// A resolved user: what the child needs, computed before the fork.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (e.g. kvm), from the group database.
    pub groups: Vec<u32>,
}

impl QemuUser {
    pub fn resolve(name: &str) -> Result<QemuUser, RunAsError> {
        let lookup = |e: nix::Error| RunAsError::Lookup {
            name: name.into(),
            message: e.to_string(),
        };
        let u = nix::unistd::User::from_name(name)
            .map_err(lookup)?
            .ok_or_else(|| RunAsError::NoSuchUser(name.into()))?;
        if u.uid.is_root() {
            return Err(RunAsError::Root(name.into()));
        }
        let cname = CString::new(name).map_err(|e| RunAsError::Lookup {
            name: name.into(),
            message: e.to_string(),
        })?;
        let groups = nix::unistd::getgrouplist(&cname, u.gid)
            .map_err(lookup)?
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        Ok(QemuUser {
            name: name.into(),
            uid: u.uid.as_raw(),
            gid: u.gid.as_raw(),
            groups,
        })
    }

    /// In the child between fork and exec. Async-signal-safe: three
    /// syscalls on data prepared before the fork. All capabilities go with
    /// the uid change.
    pub fn switch(&self) -> io::Result<()> {
        // SAFETY: plain syscalls; `groups` outlives the call.
        unsafe {
            if libc::setgroups(self.groups.len(), self.groups.as_ptr()) != 0
                || libc::setgid(self.gid) != 0
                || libc::setuid(self.uid) != 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }

    /// Mode bits that apply to this user for a file (owner, group, other).
    fn bits(&self, md: &std::fs::Metadata) -> u32 {
        let m = md.mode();
        if md.uid() == self.uid {
            (m >> 6) & 7
        } else if self.in_group(md.gid()) {
            (m >> 3) & 7
        } else {
            m & 7
        }
    }

    /// `Err(reason)` if the user cannot open `path` for reading (and
    /// writing if `write`), by the permission bits of the file and of every
    /// directory above it. ACLs are not evaluated.
    pub fn check_access(&self, path: &Path, write: bool) -> Result<(), String> {
        let mut dir = path.parent();
        while let Some(d) = dir {
            let md = std::fs::metadata(d).map_err(|e| format!("{}: {e}", d.display()))?;
            if self.bits(&md) & 1 == 0 {
                return Err(format!(
                    "user {} cannot enter directory {} (mode {:o}, owner {}:{})",
                    self.name,
                    d.display(),
                    md.mode() & 0o7777,
                    md.uid(),
                    md.gid()
                ));
            }
            dir = d.parent();
        }
        let md = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let need = if write { 6 } else { 4 };
        if self.bits(&md) & need != need {
            return Err(format!(
                "user {} may not {} {} (mode {:o}, owner {}:{})",
                self.name,
                if write { "read and write" } else { "read" },
                path.display(),
                md.mode() & 0o7777,
                md.uid(),
                md.gid()
            ));
        }
        Ok(())
    }
}

/// Every file of `def` QEMU opens by path, checked for `user`.
pub fn check_definition(
    user: &QemuUser,
    def: &crate::domain::Definition,
) -> Result<(), (String, String)> {
    for (field, p) in [
        ("kernel", &def.kernel),
        ("initrd", &def.initrd),
        ("firmware_code", &def.firmware_code),
    ] {
        if let Some(p) = p {
            user.check_access(p, false)
                .map_err(|r| (field.to_string(), r))?;
        }
    }
    for (i, d) in def.disks.iter().enumerate() {
        user.check_access(&d.path, !d.readonly)
            .map_err(|r| (format!("disks[{i}].path"), r))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn permission_bits_and_directories_decide() {
        let nobody = QemuUser {
            name: "nobody".into(),
            uid: 65534,
            gid: 65534,
            groups: vec![65534],
        };
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let f = dir.path().join("img");
        std::fs::write(&f, b"x").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        // /tmp and / are enterable; the file is world-readable, not writable.
        nobody.check_access(&f, false).unwrap();
        let e = nobody.check_access(&f, true).unwrap_err();
        assert!(
            e.contains("may not read and write") && e.contains("img"),
            "{e}"
        );
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let e = nobody.check_access(&f, false).unwrap_err();
        assert!(e.contains("cannot enter directory"), "{e}");
        // Group membership counts.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o710)).unwrap();
        let gid = std::fs::metadata(dir.path()).unwrap().gid();
        let member = QemuUser {
            groups: vec![65534, gid],
            ..nobody.clone()
        };
        member.check_access(&f, false).unwrap();
    }

    #[test]
    fn root_and_unknown_users_refused() {
        assert!(matches!(
            QemuUser::resolve("root"),
            Err(RunAsError::Root(_))
        ));
        assert!(matches!(
            QemuUser::resolve("no-such-user-qlive"),
            Err(RunAsError::NoSuchUser(_))
        ));
        let n = QemuUser::resolve("nobody").unwrap();
        assert_eq!(n.uid, 65534);
    }
}
