//! The host-wide domid counter. A domid is never reused: the next value is
//! persisted (atomic write + fsync) *before* the id is handed out, so a crash
//! can skip ids but never repeat one.

use crate::fsutil;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum DomidError {
    #[error("reading domid counter {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("domid counter {path} is corrupt ({content:?}); left untouched")]
    Corrupt { path: PathBuf, content: String },
    #[error("persisting domid counter {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

pub struct DomidAllocator {
    path: PathBuf,
    next: Mutex<u64>,
}

impl DomidAllocator {
    pub fn open(state_dir: &Path) -> Result<DomidAllocator, DomidError> {
        let path = state_dir.join("next-domid");
        let next = match std::fs::read_to_string(&path) {
            Ok(s) => s.trim().parse::<u64>().map_err(|_| DomidError::Corrupt {
                path: path.clone(),
                content: s.chars().take(40).collect(),
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => 1,
            Err(source) => return Err(DomidError::Read { path, source }),
        };
        Ok(DomidAllocator {
            path,
            next: Mutex::new(next.max(1)),
        })
    }

    /// Make sure the counter is past `seen` (an id found on disk at startup).
    pub fn observe(&self, seen: u64) -> Result<(), DomidError> {
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        if seen >= *next {
            self.persist(seen + 1)?;
            *next = seen + 1;
        }
        Ok(())
    }

    pub fn allocate(&self) -> Result<u64, DomidError> {
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let id = *next;
        self.persist(id + 1)?;
        *next = id + 1;
        Ok(id)
    }

    fn persist(&self, value: u64) -> Result<(), DomidError> {
        fsutil::write_atomic(&self.path, format!("{value}\n").as_bytes(), 0o600).map_err(|source| {
            DomidError::Write {
                path: self.path.clone(),
                source,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_reused_across_reopen() {
        let d = tempfile::tempdir().unwrap();
        let a = DomidAllocator::open(d.path()).unwrap();
        assert_eq!(a.allocate().unwrap(), 1);
        assert_eq!(a.allocate().unwrap(), 2);
        drop(a);
        let b = DomidAllocator::open(d.path()).unwrap();
        assert_eq!(b.allocate().unwrap(), 3);
        b.observe(10).unwrap();
        assert_eq!(b.allocate().unwrap(), 11);
    }

    #[test]
    fn corrupt_counter_refused_untouched() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("next-domid"), "garbage").unwrap();
        assert!(matches!(
            DomidAllocator::open(d.path()),
            Err(DomidError::Corrupt { .. })
        ));
        assert_eq!(
            std::fs::read_to_string(d.path().join("next-domid")).unwrap(),
            "garbage"
        );
    }
}
