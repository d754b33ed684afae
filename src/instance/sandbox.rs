//! Confinement applied to every QEMU instance between fork and exec: the
//! capabilities QEMU keeps. (Its seccomp filters are QEMU's own
//! `-sandbox on` and the tap guard's, `instance::tapguard`.)

use std::io;

/// The capabilities QEMU keeps: CAP_DAC_OVERRIDE only (it opens disk
/// images, kernels and firmware by path, whoever owns them). Set in the
/// child just before exec; under no_new_privs the exec cannot add any, so
/// a compromised QEMU cannot trace the agent, signal other processes or
/// reconfigure the network with the agent's capabilities.
pub struct QemuCaps {
    header: [u32; 2],
    data: [u32; 6],
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
const CAP_DAC_OVERRIDE_BIT: u32 = 1 << 1;

impl QemuCaps {
    pub fn new() -> QemuCaps {
        // Never ask for more than the agent holds (capset would refuse).
        let held = caps::has_cap(
            None,
            caps::CapSet::Permitted,
            caps::Capability::CAP_DAC_OVERRIDE,
        )
        .unwrap_or(false);
        let bit = if held { CAP_DAC_OVERRIDE_BIT } else { 0 };
        QemuCaps {
            header: [LINUX_CAPABILITY_VERSION_3, 0],
            // {effective, permitted, inheritable} x 2 words
            data: [bit, bit, 0, 0, 0, 0],
        }
    }

    /// capset(2) on the calling thread. Async-signal-safe.
    pub fn install(&self) -> io::Result<()> {
        // SAFETY: header and data are the v3 layouts capset expects and
        // live for the call.
        let r =
            unsafe { libc::syscall(libc::SYS_capset, self.header.as_ptr(), self.data.as_ptr()) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Default for QemuCaps {
    fn default() -> Self {
        QemuCaps::new()
    }
}
