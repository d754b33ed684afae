//! The identity of the files a QEMU process loaded, from procfs: what an
//! instance records at start (`InstanceRecord::loaded`) and what stale
//! detection (`upgrade::stale::check`) compares the files on disk against.
//!
//! - [`FileId`]: path, device, inode and mtime of a file;
//! - [`mapped_files`]: the files a process maps (`/proc/PID/maps`);
//! - [`resolve_firmware`]: the firmware files QEMU read at start (names
//!   from `info roms`, found in the emulator's data directories).
//!
//! Nothing here knows about instances: it sits below `instance` (and
//! beside `upgrade::stale`) in the layering (docs/architecture.md).

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Suffix procfs gives a mapped file or an executable whose inode is no
/// longer at its path.
pub const DELETED: &str = " (deleted)";

#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("reading /proc/{pid}/{what}")]
    Proc {
        pid: i32,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Identity of a file as it was when an instance loaded it (persisted in
/// the status file: the field names are on-disk format).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileId {
    pub path: PathBuf,
    pub dev: u64,
    pub ino: u64,
    pub mtime_ns: i64,
}

impl FileId {
    pub fn of(path: &Path) -> std::io::Result<FileId> {
        let m = std::fs::metadata(path)?;
        Ok(FileId {
            path: path.to_path_buf(),
            dev: m.dev(),
            ino: m.ino(),
            mtime_ns: mtime_ns(&m),
        })
    }
}

/// A file's modification time in nanoseconds since the epoch.
pub fn mtime_ns(m: &std::fs::Metadata) -> i64 {
    m.mtime() * 1_000_000_000 + m.mtime_nsec()
}

/// Identities of the files `pid` maps now (recorded at instance start, so a
/// later in-place modification is seen without trusting any clock).
pub fn mapped_files(pid: i32) -> Result<Vec<FileId>, FilesError> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(|source| {
        FilesError::Proc {
            pid,
            what: "maps",
            source,
        }
    })?;
    let mut seen = BTreeSet::new();
    Ok(maps
        .lines()
        .filter_map(|l| l.splitn(6, char::is_whitespace).nth(5).map(str::trim_start))
        .filter(|p| p.starts_with('/') && !p.starts_with("/dev/") && !p.ends_with(DELETED))
        .filter(|p| seen.insert(p.to_string()))
        .filter_map(|p| FileId::of(Path::new(p)).ok())
        .collect())
}

/// Firmware names from `info roms` that are plain files (no path), resolved
/// to the first data directory holding them (QEMU's own search order).
pub fn resolve_firmware(info_roms: &str, data_dirs: &[PathBuf]) -> Vec<FileId> {
    let mut names = BTreeSet::new();
    for line in info_roms.lines() {
        if let Some(rest) = line.split("name=\"").nth(1) {
            let name = rest.trim_end().trim_end_matches('"');
            if !name.is_empty() && !name.contains('/') && !name.contains(' ') {
                names.insert(name.to_string());
            }
        }
    }
    names
        .into_iter()
        .filter_map(|n| data_dirs.iter().map(|d| d.join(&n)).find(|p| p.is_file()))
        .filter_map(|p| FileId::of(&p).ok())
        .collect()
}

/// Helpers for the tests of file identities here and in `upgrade::stale`.
#[cfg(test)]
pub(crate) mod test_support {
    use std::process::Child;

    /// A child process killed (and reaped) when dropped.
    pub struct Kill(pub Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// Wait (up to 2 s) until `pid` maps a file whose path contains `needle`.
    pub fn wait_mapped(pid: u32, needle: &str) {
        for _ in 0..200 {
            if std::fs::read_to_string(format!("/proc/{pid}/maps"))
                .unwrap_or_default()
                .contains(needle)
            {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("{needle} never mapped");
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::{wait_mapped, Kill};
    use super::*;
    use std::process::Command;

    #[test]
    fn file_id_follows_replace_and_modify() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, b"one").unwrap();
        let a = FileId::of(&p).unwrap();
        assert_eq!(a.path, p);
        // Modified in place: same inode, newer mtime.
        let f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5))
            .unwrap();
        let b = FileId::of(&p).unwrap();
        assert_eq!((a.dev, a.ino), (b.dev, b.ino));
        assert_ne!(a.mtime_ns, b.mtime_ns);
        // Replaced by rename, as a package manager does: another inode.
        std::fs::write(d.path().join("f.new"), b"two").unwrap();
        std::fs::rename(d.path().join("f.new"), &p).unwrap();
        assert_ne!(FileId::of(&p).unwrap().ino, a.ino);
        assert!(FileId::of(&d.path().join("absent")).is_err());
    }

    #[test]
    fn mapped_files_lists_a_preloaded_library_once() {
        let d = tempfile::tempdir().unwrap();
        let lib = d.path().join("libz.so.1");
        std::fs::copy("/usr/lib/x86_64-linux-gnu/libz.so.1", &lib).unwrap();
        let c = Kill(
            Command::new("sleep")
                .arg("30")
                .env("LD_PRELOAD", &lib)
                .spawn()
                .unwrap(),
        );
        wait_mapped(c.0.id(), "libz.so.1");
        let files = mapped_files(c.0.id() as i32).unwrap();
        let ours: Vec<_> = files.iter().filter(|f| f.path == lib).collect();
        assert_eq!(ours.len(), 1, "{files:?}");
        assert_eq!(*ours[0], FileId::of(&lib).unwrap());
        assert!(files.iter().all(|f| !f.path.starts_with("/dev/")));
        let e = mapped_files(i32::MAX).unwrap_err();
        assert!(e.to_string().contains("/maps"), "{e}");
    }

    #[test]
    fn firmware_names_resolve_in_data_dir_order() {
        let d1 = tempfile::tempdir().unwrap();
        let d2 = tempfile::tempdir().unwrap();
        std::fs::write(d1.path().join("bios-256k.bin"), b"first").unwrap();
        std::fs::write(d2.path().join("bios-256k.bin"), b"second").unwrap();
        std::fs::write(d2.path().join("kvmvapic.bin"), b"vapic").unwrap();
        let roms = "fw=genroms/kvmvapic.bin size=0x002400 name=\"kvmvapic.bin\"\r\naddr=00000000fffc0000 size=0x040000 mem=rom name=\"bios-256k.bin\"\r\n/rom@etc/acpi/tables size=0x200000 name=\"etc/acpi/tables\"\r\naddr=0 size=0x1 mem=ram name=\"/k ELF program header segment 0\"";
        let fw = resolve_firmware(
            roms,
            &[
                PathBuf::from("/nonexistent"),
                d1.path().to_path_buf(),
                d2.path().to_path_buf(),
            ],
        );
        let paths: Vec<_> = fw.iter().map(|f| f.path.clone()).collect();
        assert_eq!(
            paths,
            vec![
                d1.path().join("bios-256k.bin"),
                d2.path().join("kvmvapic.bin")
            ]
        );
    }
}
