//! Stale detection: does a running QEMU still run the files it started
//! with? Per process, from procfs:
//! - its executable was deleted, or its path now holds another file;
//! - a file it maps (shared libraries, QEMU modules) was deleted, replaced
//!   (the path holds another inode) or modified in place after it started;
//! - a firmware file it loaded at start (recorded from `info roms`,
//!   resolved in the emulator's data directories) was replaced or removed.
//!
//! A package upgrade replaces files by rename, so the old inode shows as
//! `(deleted)` in `/proc/PID/exe` and `/proc/PID/maps`.

use crate::instance::files::{mtime_ns, FileId, DELETED};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum StaleError {
    #[error("reading /proc/{pid}/{what}")]
    Proc {
        pid: i32,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum StaleKind {
    ExeDeleted,
    ExeReplaced,
    LibraryDeleted,
    LibraryReplaced,
    LibraryModified,
    FirmwareDeleted,
    FirmwareReplaced,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
pub struct StaleReason {
    pub kind: StaleKind,
    pub path: PathBuf,
}

impl StaleKind {
    /// The name on the wire (`stale` results), as serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            StaleKind::ExeDeleted => "exe-deleted",
            StaleKind::ExeReplaced => "exe-replaced",
            StaleKind::LibraryDeleted => "library-deleted",
            StaleKind::LibraryReplaced => "library-replaced",
            StaleKind::LibraryModified => "library-modified",
            StaleKind::FirmwareDeleted => "firmware-deleted",
            StaleKind::FirmwareReplaced => "firmware-replaced",
        }
    }

    /// Does only a cold restart of the domain (stop, start) refresh this?
    /// Firmware is guest memory: the ROM and flash images travel in the
    /// migration stream, so the destination runs the source's copy, and a
    /// guest reset does not reload them; a live upgrade cannot help.
    pub fn needs_restart(self) -> bool {
        matches!(
            self,
            StaleKind::FirmwareDeleted | StaleKind::FirmwareReplaced
        )
    }

    pub const ALL: [StaleKind; 7] = [
        StaleKind::ExeDeleted,
        StaleKind::ExeReplaced,
        StaleKind::LibraryDeleted,
        StaleKind::LibraryReplaced,
        StaleKind::LibraryModified,
        StaleKind::FirmwareDeleted,
        StaleKind::FirmwareReplaced,
    ];
}

impl std::fmt::Display for StaleReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.kind {
            StaleKind::ExeDeleted => "executable deleted",
            StaleKind::ExeReplaced => "executable replaced",
            StaleKind::LibraryDeleted => "mapped file deleted",
            StaleKind::LibraryReplaced => "mapped file replaced",
            StaleKind::LibraryModified => "mapped file modified since start",
            StaleKind::FirmwareDeleted => "firmware deleted",
            StaleKind::FirmwareReplaced => "firmware replaced",
        };
        write!(f, "{what}: {}", self.path.display())
    }
}

/// Why process `pid` is stale (empty: it runs what is on disk now).
/// `recorded`: files the instance loaded at start (mapped files and
/// firmware) with their identity then; a recorded file whose identity
/// changed is stale even if it was modified in place.
pub fn check(pid: i32, recorded: &[FileId]) -> Result<Vec<StaleReason>, StaleError> {
    let mut out = BTreeSet::new();
    let exe_link =
        std::fs::read_link(format!("/proc/{pid}/exe")).map_err(|source| StaleError::Proc {
            pid,
            what: "exe",
            source,
        })?;
    let exe_str = exe_link.to_string_lossy().into_owned();
    let exe_path = PathBuf::from(exe_str.strip_suffix(DELETED).unwrap_or(&exe_str));
    if exe_str.ends_with(DELETED) {
        let kind = if exe_path.exists() {
            StaleKind::ExeReplaced
        } else {
            StaleKind::ExeDeleted
        };
        out.insert(StaleReason {
            kind,
            path: exe_path.clone(),
        });
    } else if let (Ok(now), Ok(running)) = (
        std::fs::metadata(&exe_path),
        std::fs::metadata(format!("/proc/{pid}/exe")),
    ) {
        if (now.dev(), now.ino()) != (running.dev(), running.ino()) {
            out.insert(StaleReason {
                kind: StaleKind::ExeReplaced,
                path: exe_path.clone(),
            });
        }
    }

    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(|source| {
        StaleError::Proc {
            pid,
            what: "maps",
            source,
        }
    })?;
    let mut seen = BTreeSet::new();
    for line in maps.lines() {
        // addr perms offset dev inode pathname
        let mut f = line.splitn(6, char::is_whitespace);
        let (_, _, _, _, inode, path) =
            (f.next(), f.next(), f.next(), f.next(), f.next(), f.next());
        let Some(path) = path.map(str::trim_start).filter(|p| p.starts_with('/')) else {
            continue;
        };
        let deleted = path.ends_with(DELETED);
        let p = PathBuf::from(path.strip_suffix(DELETED).unwrap_or(path));
        if path.starts_with("/dev/") || path.starts_with("/memfd:") || !seen.insert(p.clone()) {
            continue;
        }
        if p == exe_path {
            continue;
        }
        if deleted {
            let kind = if p.exists() {
                StaleKind::LibraryReplaced
            } else {
                StaleKind::LibraryDeleted
            };
            out.insert(StaleReason { kind, path: p });
            continue;
        }
        let Ok(m) = std::fs::metadata(&p) else {
            out.insert(StaleReason {
                kind: StaleKind::LibraryDeleted,
                path: p,
            });
            continue;
        };
        let mapped_ino: u64 = inode.and_then(|i| i.parse().ok()).unwrap_or(0);
        if mapped_ino != 0 && m.ino() != mapped_ino {
            out.insert(StaleReason {
                kind: StaleKind::LibraryReplaced,
                path: p,
            });
        } else if let Some(r) = recorded.iter().find(|r| r.path == p) {
            if (m.dev(), m.ino()) == (r.dev, r.ino) && mtime_ns(&m) != r.mtime_ns {
                out.insert(StaleReason {
                    kind: StaleKind::LibraryModified,
                    path: p,
                });
            }
        }
    }

    // Recorded files the process does not map (firmware it read at start).
    for r in recorded
        .iter()
        .filter(|r| !seen.contains(&r.path) && r.path != exe_path)
    {
        match FileId::of(&r.path) {
            Err(_) => {
                out.insert(StaleReason {
                    kind: StaleKind::FirmwareDeleted,
                    path: r.path.clone(),
                });
            }
            Ok(now) if (now.dev, now.ino, now.mtime_ns) != (r.dev, r.ino, r.mtime_ns) => {
                out.insert(StaleReason {
                    kind: StaleKind::FirmwareReplaced,
                    path: r.path.clone(),
                });
            }
            Ok(_) => {}
        }
    }
    Ok(out.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::files::test_support::{wait_mapped, Kill};
    use crate::instance::files::{mapped_files, resolve_firmware};
    use std::path::Path;
    use std::process::Command;

    #[test]
    fn kind_names_are_the_serialized_ones() {
        for k in StaleKind::ALL {
            assert_eq!(serde_json::json!(k), serde_json::json!(k.as_str()));
        }
    }

    fn replace(path: &Path) {
        // as a package manager does: write a new file, rename over the old
        let tmp = path.with_extension("dpkg-new");
        std::fs::copy(path, &tmp).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    #[test]
    fn fresh_process_is_not_stale() {
        let c = Kill(Command::new("sleep").arg("30").spawn().unwrap());
        wait_mapped(c.0.id(), "libc");
        assert_eq!(check(c.0.id() as i32, &[]).unwrap(), vec![]);
    }

    #[test]
    fn replaced_and_deleted_executable() {
        let d = tempfile::tempdir().unwrap();
        let exe = d.path().join("sl");
        std::fs::copy("/bin/sleep", &exe).unwrap();
        let c = Kill(Command::new(&exe).arg("30").spawn().unwrap());
        wait_mapped(c.0.id(), "/sl");
        replace(&exe);
        let r = check(c.0.id() as i32, &[]).unwrap();
        assert_eq!(
            r,
            vec![StaleReason {
                kind: StaleKind::ExeReplaced,
                path: exe.clone()
            }]
        );
        std::fs::remove_file(&exe).unwrap();
        let r = check(c.0.id() as i32, &[]).unwrap();
        assert_eq!(
            r,
            vec![StaleReason {
                kind: StaleKind::ExeDeleted,
                path: exe
            }]
        );
    }

    #[test]
    fn replaced_and_modified_library() {
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
        assert_eq!(check(c.0.id() as i32, &[]).unwrap(), vec![]);
        replace(&lib);
        let r = check(c.0.id() as i32, &[]).unwrap();
        assert_eq!(
            r,
            vec![StaleReason {
                kind: StaleKind::LibraryReplaced,
                path: lib.clone()
            }]
        );

        // modified in place (same inode, newer mtime)
        let lib2 = d.path().join("libz2.so.1");
        std::fs::copy("/usr/lib/x86_64-linux-gnu/libz.so.1", &lib2).unwrap();
        let c2 = Kill(
            Command::new("sleep")
                .arg("30")
                .env("LD_PRELOAD", &lib2)
                .spawn()
                .unwrap(),
        );
        wait_mapped(c2.0.id(), "libz2.so.1");
        let recorded = mapped_files(c2.0.id() as i32).unwrap();
        assert!(recorded.iter().any(|f| f.path == lib2), "{recorded:?}");
        assert_eq!(check(c2.0.id() as i32, &recorded).unwrap(), vec![]);
        let f = std::fs::OpenOptions::new()
            .append(true)
            .open(&lib2)
            .unwrap();
        f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5))
            .unwrap();
        let r = check(c2.0.id() as i32, &recorded).unwrap();
        assert_eq!(
            r,
            vec![StaleReason {
                kind: StaleKind::LibraryModified,
                path: lib2
            }]
        );
    }

    #[test]
    fn firmware_identity() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("bios-256k.bin"), b"old").unwrap();
        let roms = "fw=genroms/kvmvapic.bin size=0x002400 name=\"kvmvapic.bin\"\r\naddr=00000000fffc0000 size=0x040000 mem=rom name=\"bios-256k.bin\"\r\n/rom@etc/acpi/tables size=0x200000 name=\"etc/acpi/tables\"\r\naddr=0 size=0x1 mem=ram name=\"/k ELF program header segment 0\"";
        let fw = resolve_firmware(
            roms,
            &[PathBuf::from("/nonexistent"), d.path().to_path_buf()],
        );
        assert_eq!(fw.len(), 1, "{fw:?}");
        assert!(fw[0].path.ends_with("bios-256k.bin"));
        let c = Kill(Command::new("sleep").arg("30").spawn().unwrap());
        assert_eq!(check(c.0.id() as i32, &fw).unwrap(), vec![]);
        std::fs::write(d.path().join("bios-256k.bin.new"), b"new").unwrap();
        std::fs::rename(
            d.path().join("bios-256k.bin.new"),
            d.path().join("bios-256k.bin"),
        )
        .unwrap();
        let r = check(c.0.id() as i32, &fw).unwrap();
        assert_eq!(r[0].kind, StaleKind::FirmwareReplaced);
    }
}
