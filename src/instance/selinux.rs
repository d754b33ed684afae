//! Applying a domain's SELinux labels to an instance (sVirt style), when
//! SELinux is enabled on the host (selinuxfs mounted).
//!
//! Before the spawn, the agent labels what the instance will use with the
//! domain's MCS pair (`domain::mcs`): the guest-RAM memfd (an inherited fd
//! QEMU may not use would be replaced by /dev/null at exec), the instance
//! directory and its log, the disk images and the console log. Between
//! fork and exec it sets the exec context, so QEMU starts as
//! `svirt_t:s0:cA,cB`. The types are those of selinux/qlive.te and the
//! reference policy (docs/selinux.md).

use crate::domain::mcs::McsPair;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;

pub const PROCESS_CONTEXT: &str = "system_u:system_r:svirt_t";
pub const IMAGE_CONTEXT: &str = "system_u:object_r:svirt_image_t";
pub const CONSOLE_CONTEXT: &str = "system_u:object_r:qlive_console_log_t";
const XATTR: &[u8] = b"security.selinux\0";

/// Is SELinux enabled on this host (selinuxfs mounted)?
pub fn enabled() -> bool {
    Path::new("/sys/fs/selinux/enforce").exists()
}

/// The labels of one domain.
#[derive(Debug, Clone)]
pub struct Labels {
    pub pair: McsPair,
    /// NUL-terminated, written in the child between fork and exec.
    pub process: CString,
    pub image: String,
    pub console: String,
}

impl Labels {
    pub fn new(pair: McsPair) -> Labels {
        let level = pair.level();
        Labels {
            pair,
            // The context contains no NUL: built from constants and digits.
            process: CString::new(format!("{PROCESS_CONTEXT}:{level}")).unwrap_or_default(),
            image: format!("{IMAGE_CONTEXT}:{level}"),
            console: format!("{CONSOLE_CONTEXT}:{level}"),
        }
    }
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Label a file (not following a final symlink).
pub fn label_path(path: &Path, context: &str) -> io::Result<()> {
    let p = CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    // SAFETY: valid NUL-terminated strings and a buffer of the given size.
    check(unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            XATTR.as_ptr().cast(),
            context.as_ptr().cast(),
            context.len(),
            0,
        )
    })
}

/// Label an open file (the memfd).
pub fn label_fd(fd: BorrowedFd<'_>, context: &str) -> io::Result<()> {
    // SAFETY: valid fd, NUL-terminated name, buffer of the given size.
    check(unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            XATTR.as_ptr().cast(),
            context.as_ptr().cast(),
            context.len(),
            0,
        )
    })
}

/// In the child, between fork and exec: the context the exec enters.
/// Async-signal-safe (open, write, close).
pub fn set_exec_context(context: &CString) -> io::Result<()> {
    // SAFETY: constant path; the fd is closed below.
    let fd = unsafe {
        libc::open(
            c"/proc/thread-self/attr/exec".as_ptr(),
            libc::O_WRONLY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let b = context.as_bytes();
    // SAFETY: writing a valid buffer to the fd opened above.
    let n = unsafe { libc::write(fd, b.as_ptr().cast(), b.len()) };
    let err = io::Error::last_os_error();
    // SAFETY: closing the fd opened above.
    unsafe { libc::close(fd) };
    if n != b.len() as isize {
        return Err(err);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contexts_carry_the_domain_pair() {
        let l = Labels::new("c12,c345".parse().unwrap());
        assert_eq!(
            l.process.to_str().unwrap(),
            "system_u:system_r:svirt_t:s0:c12,c345"
        );
        assert_eq!(l.image, "system_u:object_r:svirt_image_t:s0:c12,c345");
        assert_eq!(
            l.console,
            "system_u:object_r:qlive_console_log_t:s0:c12,c345"
        );
    }
}
