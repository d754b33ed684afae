//! Disks and NICs across a migration: what the preflight checks.
//!
//! Both instances open the same image files. QEMU's own protection is
//! kept whole: image locking stays on, and the destination, started with
//! `-incoming`, holds its images inactive (no write permission, no write
//! lock) until the migration completes, after the source has flushed and
//! inactivated them. qlive adds only checks QEMU cannot make on its own,
//! before anything starts:
//!
//! - the path still exists and names a regular file or block device;
//! - it names the *same* file the running instance opened (device and
//!   inode recorded at start): an image replaced or restored under a
//!   running guest would otherwise become its disk mid-flight;
//! - it can be opened for reading, and for writing unless read-only (a
//!   filesystem remounted read-only fails here, not after switchover);
//! - with `cache: none`/`directsync`, the filesystem accepts `O_DIRECT`.
//!
//! NICs need no check: the destination inherits the agent's tap fds.

use crate::domain::Definition;
use crate::instance::DiskId;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};

/// The destination opened the same files as the source (checked after it
/// started, before any state moves: closes the window between preflight
/// and the destination's open).
pub fn same_disks(src: &[DiskId], dst: &[DiskId]) -> Result<(), DiskMismatch> {
    for s in src {
        match dst.iter().find(|d| d.path == s.path) {
            Some(d) if (d.dev, d.ino) == (s.dev, s.ino) => {}
            _ => {
                return Err(DiskMismatch {
                    path: s.path.clone(),
                })
            }
        }
    }
    Ok(())
}

/// [`same_disks`] found a disk the destination opened differently.
#[derive(Debug, thiserror::Error)]
#[error("disk {}: the new instance did not open the file the running one has", path.display())]
pub struct DiskMismatch {
    pub path: std::path::PathBuf,
}

/// `Err(reason)` names the disk and what is wrong with it.
pub fn preflight_disks(def: &Definition, opened: &[DiskId]) -> Result<(), String> {
    for (i, d) in def.disks.iter().enumerate() {
        let what = format!("disks[{i}] {}", d.path.display());
        let md = std::fs::metadata(&d.path)
            .map_err(|e| format!("{what}: not found for the new instance to open: {e}"))?;
        let ft = md.file_type();
        if !(ft.is_file() || ft.is_block_device()) {
            return Err(format!("{what}: not a regular file or block device"));
        }
        if let Some(o) = opened.iter().find(|o| o.path == d.path) {
            if (o.dev, o.ino) != (md.dev(), md.ino()) {
                return Err(format!(
                    "{what}: the path now names a different file than the running instance opened \
                     (inode {} on device {:#x}, was {} on {:#x}); moving the guest would switch its disk",
                    md.ino(),
                    md.dev(),
                    o.ino,
                    o.dev
                ));
            }
        }
        let (direct, _) = d.cache.flags();
        let mut opts = std::fs::OpenOptions::new();
        opts.read(true).write(!d.readonly);
        if direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        opts.open(&d.path).map_err(|e| {
            format!(
                "{what}: cannot be opened for {}{}: {e}",
                if d.readonly { "reading" } else { "writing" },
                if direct {
                    " with O_DIRECT (cache mode)"
                } else {
                    ""
                }
            )
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def_with(path: &std::path::Path, cache: &str) -> Definition {
        Definition::from_value(&serde_json::json!({
            "name": "vm", "emulator": "/usr/bin/qemu-system-x86_64", "memory_mib": 64,
            "disks": [{"path": path, "format": "raw", "cache": cache}],
        }))
        .unwrap()
    }

    #[test]
    fn missing_replaced_and_directory_refused() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("a.img");
        std::fs::write(&img, vec![0u8; 4096]).unwrap();
        let def = def_with(&img, "writeback");
        let id = DiskId::of(&img).unwrap();
        preflight_disks(&def, std::slice::from_ref(&id)).unwrap();

        // Replaced by a copy: same path, another inode.
        let copy = dir.path().join("b.img");
        std::fs::copy(&img, &copy).unwrap();
        std::fs::rename(&copy, &img).unwrap();
        let e = preflight_disks(&def, std::slice::from_ref(&id)).unwrap_err();
        assert!(
            e.contains("disks[0]") && e.contains("different file"),
            "{e}"
        );

        std::fs::remove_file(&img).unwrap();
        let e = preflight_disks(&def, &[]).unwrap_err();
        assert!(e.contains("not found") && e.contains("a.img"), "{e}");

        std::fs::create_dir(&img).unwrap();
        let e = preflight_disks(&def, &[]).unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
    }
}
