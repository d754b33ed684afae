//! The definition store: one JSON file per domain under
//! `<state>/domains/<name>.json`, written atomically (temp + fsync + rename).
//!
//! Each file carries a format tag and version. A file that does not parse, or
//! was written by a newer qlive (higher version), is refused with an error
//! naming it and is never overwritten: the user decides what to do with it.
//! So is anything at `<name>.json` that is not a regular file: a symlink is
//! never followed (it could point anywhere, e.g. out of the state dir), a
//! FIFO or device never opened for reading.

use crate::domain::definition::{valid_name, Definition, DefinitionError};
use crate::fsutil;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

pub const FORMAT: &str = "qlive-domain";
pub const VERSION: u32 = 1;
/// Largest stored domain file read. The agent writes them from definitions
/// of at most [`MAX_DEFINITION_BYTES`](crate::domain::definition::MAX_DEFINITION_BYTES)
/// (pretty-printed, plus what the agent adds: UUID, pinned machine, a new
/// emulator path), far below this.
pub const MAX_STORED_BYTES: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("creating store directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("removing {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("stored domain {path} is corrupt ({reason}); left untouched")]
    Corrupt { path: PathBuf, reason: String },
    #[error("stored domain {path} has format version {found}, newer than this qlive understands ({VERSION}); left untouched")]
    TooNew { path: PathBuf, found: u32 },
    #[error("stored domain {path} holds an invalid definition; left untouched")]
    Invalid {
        path: PathBuf,
        #[source]
        source: DefinitionError,
    },
    #[error("invalid domain name {0:?}")]
    BadName(String),
    #[error("stored domain {path} is {kind}, not a regular file; refused (not followed), left untouched")]
    NotRegularFile { path: PathBuf, kind: &'static str },
    #[error("store directory {path} is {kind}, not a directory; refused")]
    NotADirectory { path: PathBuf, kind: &'static str },
}

#[derive(Serialize, Deserialize)]
struct StoredDomain {
    format: String,
    version: u32,
    definition: serde_json::Value,
}

pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Open (creating if needed) the store under `state_dir`.
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        let dir = state_dir.join("domains");
        fsutil::create_dir(&dir, 0o700).map_err(|source| StoreError::CreateDir {
            path: dir.clone(),
            source,
        })?;
        // A symlink here would move every save and remove elsewhere.
        let meta = dir.symlink_metadata().map_err(|source| StoreError::Read {
            path: dir.clone(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(StoreError::NotADirectory {
                kind: fsutil::file_kind(meta.file_type()),
                path: dir,
            });
        }
        Ok(Store { dir })
    }

    pub fn path_of(&self, name: &str) -> Result<PathBuf, StoreError> {
        if !valid_name(name) {
            return Err(StoreError::BadName(name.to_string()));
        }
        Ok(self.dir.join(format!("{name}.json")))
    }

    /// Does a file exist for `name` (readable or not)?
    pub fn exists(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.path_of(name)?.symlink_metadata().is_ok())
    }

    pub fn save(&self, def: &Definition) -> Result<(), StoreError> {
        let path = self.path_of(&def.name)?;
        let doc = StoredDomain {
            format: FORMAT.into(),
            version: VERSION,
            definition: serde_json::to_value(def).map_err(|e| StoreError::Write {
                path: path.clone(),
                source: io::Error::other(e),
            })?,
        };
        let mut bytes = serde_json::to_vec_pretty(&doc).map_err(|e| StoreError::Write {
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        bytes.push(b'\n');
        fsutil::write_atomic(&path, &bytes, 0o600)
            .map_err(|source| StoreError::Write { path, source })
    }

    pub fn load(&self, name: &str) -> Result<Definition, StoreError> {
        let path = self.path_of(name)?;
        Self::load_path(&path)
    }

    fn load_path(path: &Path) -> Result<Definition, StoreError> {
        let file = fsutil::open_regular_nofollow(path).map_err(|e| match e {
            fsutil::NotRegularError::NotRegular { path, kind } => {
                StoreError::NotRegularFile { path, kind }
            }
            fsutil::NotRegularError::Io { path, source } => StoreError::Read { path, source },
        })?;
        let mut bytes = Vec::new();
        file.take(MAX_STORED_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|source| StoreError::Read {
                path: path.to_path_buf(),
                source,
            })?;
        if bytes.len() as u64 > MAX_STORED_BYTES {
            return Err(StoreError::Corrupt {
                path: path.to_path_buf(),
                reason: format!("over {MAX_STORED_BYTES} bytes"),
            });
        }
        let doc: StoredDomain =
            serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        if doc.format != FORMAT {
            return Err(StoreError::Corrupt {
                path: path.to_path_buf(),
                reason: format!("format tag is {:?}, expected {FORMAT:?}", doc.format),
            });
        }
        if doc.version > VERSION {
            return Err(StoreError::TooNew {
                path: path.to_path_buf(),
                found: doc.version,
            });
        }
        let def =
            Definition::from_stored(&doc.definition).map_err(|source| StoreError::Invalid {
                path: path.to_path_buf(),
                source,
            })?;
        let expected = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default();
        if def.name != expected {
            return Err(StoreError::Corrupt {
                path: path.to_path_buf(),
                reason: format!("holds domain {:?}, not {expected:?}", def.name),
            });
        }
        Ok(def)
    }

    /// Load every stored definition. Unreadable ones come back as errors
    /// (the caller logs them); they do not stop the others from loading.
    pub fn load_all(&self) -> Result<Vec<Result<Definition, StoreError>>, StoreError> {
        let rd = fs::read_dir(&self.dir).map_err(|source| StoreError::Read {
            path: self.dir.clone(),
            source,
        })?;
        let mut out = Vec::new();
        for ent in rd {
            let ent = ent.map_err(|source| StoreError::Read {
                path: self.dir.clone(),
                source,
            })?;
            let p = ent.path();
            let Some(stem) = p
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
            else {
                continue;
            };
            if stem.starts_with('.') {
                continue; // an interrupted write's temp file
            }
            if !valid_name(stem) {
                out.push(Err(StoreError::Corrupt {
                    path: p.clone(),
                    reason: "file name is not a valid domain name".into(),
                }));
                continue;
            }
            out.push(Self::load_path(&p));
        }
        // Loaded ones by name, then the errors.
        out.sort_by(|a, b| {
            let key = |r: &Result<Definition, StoreError>| match r {
                Ok(d) => (0, d.name.clone()),
                Err(_) => (1, String::new()),
            };
            key(a).cmp(&key(b))
        });
        Ok(out)
    }

    pub fn remove(&self, name: &str) -> Result<(), StoreError> {
        let path = self.path_of(name)?;
        fsutil::remove_file_if_exists(&path).map_err(|source| StoreError::Remove {
            path: path.clone(),
            source,
        })?;
        fsutil::sync_dir(&self.dir).map_err(|source| StoreError::Remove { path, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(name: &str) -> Definition {
        Definition::from_value(&serde_json::json!({
            "name": name, "emulator": "/usr/bin/qemu-system-x86_64", "memory_mib": 128,
            "uuid": uuid::Uuid::new_v4(),
        }))
        .unwrap()
    }

    #[test]
    fn roundtrip() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let a = def("a");
        s.save(&a).unwrap();
        assert_eq!(s.load("a").unwrap(), a);
        let all = s.load_all().unwrap();
        assert_eq!(all.len(), 1);
        s.remove("a").unwrap();
        assert!(!s.exists("a").unwrap());
    }

    #[test]
    fn corrupt_and_newer_are_refused_and_untouched() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let p = s.path_of("bad").unwrap();
        fs::write(&p, b"{not json").unwrap();
        assert!(matches!(s.load("bad"), Err(StoreError::Corrupt { .. })));
        assert_eq!(fs::read(&p).unwrap(), b"{not json");

        let p2 = s.path_of("future").unwrap();
        let doc = serde_json::json!({"format": FORMAT, "version": 99, "definition": {}});
        fs::write(&p2, doc.to_string()).unwrap();
        let e = s.load("future").unwrap_err();
        assert!(matches!(e, StoreError::TooNew { found: 99, .. }), "{e}");
        assert_eq!(fs::read_to_string(&p2).unwrap(), doc.to_string());
    }

    #[test]
    fn symlink_is_refused_and_its_target_untouched() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        // a valid stored domain outside the state dir, linked in
        let other = Store::open(outside.path()).unwrap();
        other.save(&def("evil")).unwrap();
        let target = other.path_of("evil").unwrap();
        let before = fs::read(&target).unwrap();
        let link = s.path_of("evil").unwrap();
        std::os::unix::fs::symlink(&target, &link).unwrap();

        let e = s.load("evil").unwrap_err();
        assert!(
            matches!(
                e,
                StoreError::NotRegularFile {
                    kind: "a symbolic link",
                    ..
                }
            ),
            "{e}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains("evil.json") && msg.contains("symbolic link"),
            "{msg}"
        );
        let all = s.load_all().unwrap();
        assert!(matches!(all[..], [Err(StoreError::NotRegularFile { .. })]));
        assert!(s.exists("evil").unwrap());

        // save replaces the link itself; remove unlinks it: target untouched
        s.save(&def("evil")).unwrap();
        assert!(fs::symlink_metadata(&link).unwrap().is_file());
        assert_eq!(fs::read(&target).unwrap(), before);
        fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink(&target, &link).unwrap();
        s.remove("evil").unwrap();
        assert!(fs::symlink_metadata(&link).is_err());
        assert_eq!(fs::read(&target).unwrap(), before);
    }

    #[test]
    fn fifo_and_directory_are_refused_without_blocking() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let fifo = s.path_of("fifo").unwrap();
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = s.load("fifo").unwrap_err();
        assert!(
            matches!(e, StoreError::NotRegularFile { kind: "a FIFO", .. }),
            "{e}"
        );
        fs::create_dir(s.path_of("dir").unwrap()).unwrap();
        let e = s.load("dir").unwrap_err();
        assert!(
            matches!(
                e,
                StoreError::NotRegularFile {
                    kind: "a directory",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn symlinked_domains_dir_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), d.path().join("domains")).unwrap();
        let e = Store::open(d.path()).err().unwrap();
        assert!(matches!(e, StoreError::NotADirectory { .. }), "{e}");
    }

    #[test]
    fn oversized_file_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let p = s.path_of("big").unwrap();
        fs::write(&p, vec![b' '; MAX_STORED_BYTES as usize + 1]).unwrap();
        let e = s.load("big").unwrap_err();
        assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
    }

    /// A definition accepted at the input size limit grows when the agent
    /// fills in defaults, a UUID and (after a migration) a new emulator
    /// path; the file it saved must load again.
    #[test]
    fn definition_grown_past_input_limit_loads_again() {
        use crate::domain::definition::MAX_DEFINITION_BYTES;
        let disks: Vec<_> = (0..crate::domain::definition::MAX_DISKS)
            .map(|i| serde_json::json!({"path": format!("/{i:02}{}", "d".repeat(3900)), "format": "raw"}))
            .collect();
        let v = serde_json::json!({
            "name": "big", "emulator": "/usr/bin/qemu-system-x86_64", "memory_mib": 128,
            "disks": disks,
        });
        let mut d = Definition::from_value(&v).unwrap();
        assert!(serde_json::to_vec(&v).unwrap().len() <= MAX_DEFINITION_BYTES);
        d.uuid = Some(uuid::Uuid::new_v4());
        d.emulator = PathBuf::from(format!("/{}", "e".repeat(4000)));
        assert!(serde_json::to_vec(&d).unwrap().len() > MAX_DEFINITION_BYTES);
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.save(&d).unwrap();
        assert_eq!(s.load("big").unwrap(), d);
    }

    #[test]
    fn traversal_names_refused() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        for n in ["../x", "a/b", "", ".hidden"] {
            assert!(matches!(s.path_of(n), Err(StoreError::BadName(_))), "{n}");
        }
    }
}
