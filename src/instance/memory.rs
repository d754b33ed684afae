//! Guest RAM: a memfd owned by the agent, sized once and sealed against
//! shrinking and growing, mapped by every QEMU instance of the domain as
//! `memory-backend-file,mem-path=/proc/self/fd/N,share=on`.
//!
//! QEMU's `x-ignore-shared` skips a RAM block only when it is a shared,
//! named file; `/proc/self/fd/N` is one, a `memory-backend-memfd` is not.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

/// The fd number guest RAM has inside every QEMU instance.
pub const GUEST_RAM_FD: i32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("creating guest RAM memfd of {bytes} bytes")]
    Create {
        bytes: u64,
        #[source]
        source: io::Error,
    },
    #[error("sealing guest RAM memfd")]
    Seal(#[source] io::Error),
    #[error("recovering guest RAM from {path}")]
    Recover {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not this domain's guest RAM (inode {found}, expected {expected})")]
    WrongFile {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
}

/// The agent's handle on a domain's guest RAM.
#[derive(Debug)]
pub struct GuestRam {
    file: File,
    bytes: u64,
}

impl GuestRam {
    /// Create and seal a new memfd named after the domain.
    pub fn create(name: &str, bytes: u64) -> Result<GuestRam, MemoryError> {
        let mfd = memfd::MemfdOptions::default()
            .allow_sealing(true)
            .close_on_exec(true)
            .create(format!("qlive-ram:{name}"))
            .map_err(|e| MemoryError::Create {
                bytes,
                source: io::Error::other(e),
            })?;
        mfd.as_file()
            .set_len(bytes)
            .map_err(|source| MemoryError::Create { bytes, source })?;
        let seals = [
            memfd::FileSeal::SealShrink,
            memfd::FileSeal::SealGrow,
            memfd::FileSeal::SealSeal,
        ]
        .into_iter()
        .collect::<memfd::SealsHashSet>();
        mfd.add_seals(&seals)
            .map_err(|e| MemoryError::Seal(io::Error::other(e)))?;
        Ok(GuestRam {
            file: mfd.into_file(),
            bytes,
        })
    }

    /// Re-open the memfd a running QEMU holds at [`GUEST_RAM_FD`], after an
    /// agent restart. The inode must be the one recorded at start.
    pub fn recover(pid: i32, expected_ino: u64) -> Result<GuestRam, MemoryError> {
        let path = PathBuf::from(format!("/proc/{pid}/fd/{GUEST_RAM_FD}"));
        let file = File::options()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|source| MemoryError::Recover {
                path: path.clone(),
                source,
            })?;
        let md = file.metadata().map_err(|source| MemoryError::Recover {
            path: path.clone(),
            source,
        })?;
        if md.ino() != expected_ino {
            return Err(MemoryError::WrongFile {
                path,
                found: md.ino(),
                expected: expected_ino,
            });
        }
        Ok(GuestRam {
            file,
            bytes: md.len(),
        })
    }

    pub fn inode(&self) -> u64 {
        self.file.metadata().map(|m| m.ino()).unwrap_or(0)
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn raw_fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    pub fn try_clone_fd(&self) -> io::Result<OwnedFd> {
        self.file.as_fd().try_clone_to_owned()
    }
}

impl AsFd for GuestRam {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_against_resize() {
        let r = GuestRam::create("t", 4 << 20).unwrap();
        assert_eq!(r.file.metadata().unwrap().len(), 4 << 20);
        assert!(r.file.set_len(8 << 20).is_err(), "grow must be refused");
        assert!(r.file.set_len(1 << 20).is_err(), "shrink must be refused");
    }
}
