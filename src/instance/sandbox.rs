//! Confinement applied to every QEMU instance between fork and exec.
//!
//! One seccomp rule of qlive's own, stacked under QEMU's `-sandbox on`:
//! `ioctl(_, TUNSETOFFLOAD, _)` fails with EINVAL. The taps qlive passes
//! carry no vnet header (see `instance::tap`), so offloads can never be
//! used on them; but a starting QEMU 10 *probes* for USO by switching
//! checksum offload on for a moment on the shared tap, while the running
//! instance still owns the guest's traffic. Frames the host hands the tap
//! in that window carry partial checksums the guest drops: measured as
//! bursts of 10 to 50 lost datagrams per migration to 10.0 under load.
//! Failing the ioctl makes QEMU's probes answer "no offload", which is the
//! truth for these taps, and leaves the device untouched.

use std::io;

const TUNSETOFFLOAD: u32 = 0x4004_54d0;
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;

const BPF_LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const BPF_JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const BPF_RET_K: u16 = 0x06; // BPF_RET | BPF_K
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;

// offsets in struct seccomp_data
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const OFF_ARG1_LO: u32 = 24;

const fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

const fn jeq(k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: BPF_JEQ_K,
        jt,
        jf,
        k,
    }
}

/// The filter program (built before fork: no allocation in the child).
pub struct OffloadGuard {
    prog: [libc::sock_filter; 8],
}

impl OffloadGuard {
    pub fn new() -> OffloadGuard {
        OffloadGuard {
            prog: [
                stmt(BPF_LD_W_ABS, OFF_ARCH),
                jeq(AUDIT_ARCH_X86_64, 0, 5), // other arch: allow
                stmt(BPF_LD_W_ABS, OFF_NR),
                jeq(libc::SYS_ioctl as u32, 0, 3),
                stmt(BPF_LD_W_ABS, OFF_ARG1_LO),
                jeq(TUNSETOFFLOAD, 0, 1),
                stmt(BPF_RET_K, SECCOMP_RET_ERRNO | libc::EINVAL as u32),
                stmt(BPF_RET_K, SECCOMP_RET_ALLOW),
            ],
        }
    }

    /// Install in the calling process. Async-signal-safe (one prctl).
    pub fn install(&self) -> io::Result<()> {
        let fprog = libc::sock_fprog {
            len: self.prog.len() as u16,
            filter: self.prog.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: a valid, fully initialised filter program that outlives
        // the call (the kernel copies it).
        let r = unsafe {
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &fprog as *const libc::sock_fprog,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

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

impl Default for OffloadGuard {
    fn default() -> Self {
        OffloadGuard::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    #[test]
    fn tunsetoffload_fails_and_the_rest_works() {
        // In a child process, so the test runner stays unfiltered.
        let guard = OffloadGuard::new();
        let mut cmd = std::process::Command::new("python3");
        cmd.args([
            "-c",
            "import fcntl,os,errno\n\
             fd=os.open('/dev/null',os.O_RDONLY)\n\
             try:\n  fcntl.ioctl(fd,0x400454d0,0)\n  print('allowed')\n\
             except OSError as e:\n  print('EINVAL' if e.errno==errno.EINVAL else e)\n\
             try:\n  fcntl.ioctl(fd,0x5401,b'x'*64)\nexcept OSError as e:\n  print('other', e.errno)\n",
        ]);
        // SAFETY: install is one prctl, async-signal-safe.
        unsafe {
            cmd.pre_exec(move || guard.install());
        }
        let out = cmd.output().expect("python3");
        let s = String::from_utf8_lossy(&out.stdout);
        assert!(s.starts_with("EINVAL"), "{s}");
        // TCGETS on /dev/null fails with ENOTTY (25), not the filter's EINVAL.
        assert!(s.contains("other 25"), "{s}");
    }
}
