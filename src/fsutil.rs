//! Small filesystem helpers shared by the store, the domid counter and the
//! runtime status files: every write that must survive a crash goes through
//! [`write_atomic`].

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Write `data` to `path` so that a reader (or a crash at any instant) sees
/// either the old content or the new, never a mix: write a temp file in the
/// same directory, fsync it, rename it over `path`, fsync the directory.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no parent"))?;
    let file_name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    // One temp name per call (concurrent writers of one path in this
    // process never share one), created exclusively: O_EXCL never follows
    // a symlink nor truncates a file (or a hard link) that is already there.
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(
        ".{}.tmp.{}.{}",
        file_name.to_string_lossy(),
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let create = || {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
    };
    let mut f = match create() {
        // left over by an earlier process with our pid: unlink (never
        // follows) and retry once
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            fs::remove_file(&tmp)?;
            create()?
        }
        r => r?,
    };
    // rename() replaces `path` itself, never what a symlink there points to.
    let result = (|| {
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Why a path that must be a regular file is refused: what it is instead.
#[derive(Debug, thiserror::Error)]
pub enum NotRegularError {
    #[error("{path} is {kind}, not a regular file")]
    NotRegular {
        path: std::path::PathBuf,
        kind: &'static str,
    },
    #[error("{path}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What a file type is, for messages ("a symbolic link", "a directory", ...).
pub fn file_kind(ft: fs::FileType) -> &'static str {
    if ft.is_symlink() {
        "a symbolic link"
    } else if ft.is_dir() {
        "a directory"
    } else if ft.is_file() {
        "a regular file"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else {
        "of an unknown type"
    }
}

/// Open an existing file for reading only if `path` itself is a regular
/// file: a symlink in the last component is not followed (O_NOFOLLOW) and a
/// FIFO, device, socket or directory is refused (checked on the opened fd,
/// so it cannot be swapped in between; O_NONBLOCK so a FIFO cannot block
/// the open).
pub fn open_regular_nofollow(path: &Path) -> Result<File, NotRegularError> {
    open_regular_with(path, OpenOptions::new().read(true))
}

/// [`open_regular_nofollow`] for reading and writing (an existing file).
pub fn open_rw_nofollow(path: &Path) -> Result<File, NotRegularError> {
    open_regular_with(path, OpenOptions::new().read(true).write(true))
}

/// [`open_regular_nofollow`] for a log: created (mode 0600) if absent,
/// opened for appending (and reading, for a follower).
pub fn open_log_nofollow(path: &Path, read: bool) -> Result<File, NotRegularError> {
    open_regular_with(
        path,
        OpenOptions::new()
            .read(read)
            .append(true)
            .create(true)
            .mode(0o600),
    )
}

fn open_regular_with(path: &Path, opts: &mut OpenOptions) -> Result<File, NotRegularError> {
    let io_err = |source| NotRegularError::Io {
        path: path.to_path_buf(),
        source,
    };
    let f = match opts
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(match path.symlink_metadata() {
                Ok(m) if m.file_type().is_symlink() => NotRegularError::NotRegular {
                    path: path.to_path_buf(),
                    kind: "a symbolic link",
                },
                _ => io_err(e),
            })
        }
        Err(e) => return Err(io_err(e)),
    };
    let ft = f.metadata().map_err(io_err)?.file_type();
    if !ft.is_file() {
        return Err(NotRegularError::NotRegular {
            path: path.to_path_buf(),
            kind: file_kind(ft),
        });
    }
    Ok(f)
}

/// Is `path` absent or a regular file (not a symlink, FIFO, device, ...)?
/// For a path some other process (QEMU) will open and write, so that a
/// symlink planted there cannot redirect the write.
pub fn ensure_regular_or_absent(path: &Path) -> Result<(), NotRegularError> {
    match path.symlink_metadata() {
        Ok(m) if m.file_type().is_file() => Ok(()),
        Ok(m) => Err(NotRegularError::NotRegular {
            path: path.to_path_buf(),
            kind: file_kind(m.file_type()),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(NotRegularError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// fsync a directory so that a rename or unlink in it is durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Create a directory (and parents) with the given mode for the last
/// component; an existing directory is accepted as is.
pub fn create_dir(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
}

/// Remove a file, treating "already gone" as success.
pub fn remove_file_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// Remove a directory tree, treating "already gone" as success.
pub fn remove_dir_all_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.json");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "temp file left behind");
    }

    #[test]
    fn atomic_write_replaces_a_symlink_not_its_target() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("victim");
        fs::write(&target, b"keep").unwrap();
        let p = dir.path().join("x.json");
        std::os::unix::fs::symlink(&target, &p).unwrap();
        write_atomic(&p, b"new", 0o600).unwrap();
        assert!(fs::symlink_metadata(&p).unwrap().is_file());
        assert_eq!(fs::read(&p).unwrap(), b"new");
        assert_eq!(fs::read(&target).unwrap(), b"keep");
    }

    #[test]
    fn regular_file_checks_refuse_symlinks_and_fifos() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        fs::write(&f, b"x").unwrap();
        assert!(open_regular_nofollow(&f).is_ok());
        assert!(ensure_regular_or_absent(&f).is_ok());
        assert!(ensure_regular_or_absent(&dir.path().join("absent")).is_ok());
        let l = dir.path().join("l");
        std::os::unix::fs::symlink(&f, &l).unwrap();
        let fifo = dir.path().join("p");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        for (p, kind) in [(&l, "a symbolic link"), (&fifo, "a FIFO")] {
            for e in [
                open_regular_nofollow(p).unwrap_err(),
                ensure_regular_or_absent(p).unwrap_err(),
            ] {
                assert!(
                    matches!(e, NotRegularError::NotRegular { kind: k, .. } if k == kind),
                    "{e}"
                );
                assert!(e.to_string().contains(kind), "{e}");
            }
        }
    }
}
