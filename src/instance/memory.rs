//! Guest RAM: a memfd owned by the agent, sized once and sealed against
//! shrinking and growing, mapped by every QEMU instance of the domain as
//! `memory-backend-file,mem-path=/proc/self/fd/N,share=on`.
//!
//! QEMU's `x-ignore-shared` skips a RAM block only when it is a shared,
//! named file; `/proc/self/fd/N` is one, a `memory-backend-memfd` is not.
//!
//! With `hugepages` the memfd is a hugetlb one (`MFD_HUGETLB` with the page
//! size): QEMU sees a hugetlbfs file behind the path (`fstatfs`) and maps it
//! with that page size. The pages come from the host's pool; they are
//! reserved when QEMU maps the file, so the agent checks the pool first
//! ([`check_huge_pages`]) and refuses a start that could not get them,
//! naming the numbers. Both instances of a migration map the same pages: a
//! migration needs no pages of its own.

use crate::domain::definition::HugePages;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

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
    #[error("hugepages {size}: reading the host's pool {path}")]
    HugePagePool {
        size: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "hugepages {size}: the guest needs {need} pages of {size}, the host has {available} free \
         ({free} free, {reserved} reserved); add pages with `sysctl vm.nr_hugepages` (2M) or \
         at boot (`hugepages=` on the kernel command line)"
    )]
    NotEnoughHugePages {
        size: &'static str,
        need: u64,
        available: u64,
        free: u64,
        reserved: u64,
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
    /// Create and seal a new memfd named after the domain, of huge pages
    /// when `hugepages` is set (check the pool first: [`check_huge_pages`]).
    pub fn create(
        name: &str,
        bytes: u64,
        hugepages: Option<HugePages>,
    ) -> Result<GuestRam, MemoryError> {
        let mfd = memfd::MemfdOptions::default()
            .allow_sealing(true)
            .close_on_exec(true)
            .hugetlb(hugepages.map(|h| match h {
                HugePages::Size2M => memfd::HugetlbSize::Huge2MB,
                HugePages::Size1G => memfd::HugetlbSize::Huge1GB,
            }))
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

/// Refuse when the host's pool of `h` pages has fewer than `bytes` need
/// (free minus reserved: pages promised to mappings not yet touched).
/// QEMU would otherwise fail to map guest RAM, or a guest could get SIGBUS.
pub fn check_huge_pages(h: HugePages, bytes: u64) -> Result<(), MemoryError> {
    check_pool(
        &Path::new("/sys/kernel/mm/hugepages").join(h.sysfs_name()),
        h,
        bytes,
    )
}

fn check_pool(dir: &Path, h: HugePages, bytes: u64) -> Result<(), MemoryError> {
    let read = |f: &str| -> Result<u64, MemoryError> {
        let path = dir.join(f);
        let err = |source| MemoryError::HugePagePool {
            size: h.as_str(),
            path: path.clone(),
            source,
        };
        std::fs::read_to_string(&path)
            .map_err(err)?
            .trim()
            .parse()
            .map_err(|e| err(io::Error::new(io::ErrorKind::InvalidData, e)))
    };
    let (free, reserved) = (read("free_hugepages")?, read("resv_hugepages")?);
    let available = free.saturating_sub(reserved);
    let need = bytes.div_ceil(h.bytes());
    if need > available {
        return Err(MemoryError::NotEnoughHugePages {
            size: h.as_str(),
            need,
            available,
            free,
            reserved,
        });
    }
    Ok(())
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
        let r = GuestRam::create("t", 4 << 20, None).unwrap();
        assert_eq!(r.file.metadata().unwrap().len(), 4 << 20);
        assert!(r.file.set_len(8 << 20).is_err(), "grow must be refused");
        assert!(r.file.set_len(1 << 20).is_err(), "shrink must be refused");
    }

    #[test]
    fn pool_check_counts_free_minus_reserved() {
        let d = tempfile::tempdir().unwrap();
        let pool = |free: u64, resv: u64| {
            std::fs::write(d.path().join("free_hugepages"), format!("{free}\n")).unwrap();
            std::fs::write(d.path().join("resv_hugepages"), format!("{resv}\n")).unwrap();
        };
        pool(130, 2);
        check_pool(d.path(), HugePages::Size2M, 256 << 20).unwrap();
        pool(130, 3);
        let e = check_pool(d.path(), HugePages::Size2M, 256 << 20).unwrap_err();
        assert!(
            matches!(
                e,
                MemoryError::NotEnoughHugePages {
                    need: 128,
                    available: 127,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("vm.nr_hugepages"), "{e}");
        std::fs::remove_file(d.path().join("resv_hugepages")).unwrap();
        let e = check_pool(d.path(), HugePages::Size1G, 1 << 30).unwrap_err();
        assert!(matches!(e, MemoryError::HugePagePool { .. }), "{e}");
    }
}
