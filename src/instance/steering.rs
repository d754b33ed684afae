//! Which of a multi-queue tap's queues the kernel hands each frame to: a
//! steering eBPF program (`TUNSETSTEERINGEBPF`) the agent builds and
//! attaches itself.
//!
//! A domain's tap has two sets of queues (`instance::tap`): the instance
//! that runs the guest reads one set, a migration's destination the other.
//! The program sends every frame to the running instance's set, spread
//! over the queues its guest enabled by a hash of the IPv4 addresses and
//! ports (other frames to the set's first queue). Before `migrate` the
//! agent attaches a program naming the destination's set, so the source's
//! queues drain while its guest still runs and nothing more reaches them:
//! no frame is left in a QEMU that is about to stop.
//!
//! The program is a handful of classic socket-filter instructions with the
//! queue numbers as immediates: no map, nothing to find again after an
//! agent restart (the tap keeps the attached program; a new one replaces
//! it atomically).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// `_IOR('T', 224, int)`.
pub const TUNSETSTEERINGEBPF: u32 = 0x8004_54e0;

const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum SteeringError {
    #[error("loading the tap's steering program (bpf BPF_PROG_LOAD): {log}")]
    Load {
        log: String,
        #[source]
        source: io::Error,
    },
    #[error("attaching the steering program to the tap (TUNSETSTEERINGEBPF)")]
    Attach(#[source] io::Error),
}

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | (dst & 0x0f),
        off,
        imm,
    }
}

// Opcodes (linux/bpf.h, linux/bpf_common.h).
const MOV64_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
const MOV64_X: u8 = 0xbf; // BPF_ALU64 | BPF_MOV | BPF_X
const XOR64_X: u8 = 0xaf; // BPF_ALU64 | BPF_XOR | BPF_X
const RSH64_K: u8 = 0x77; // BPF_ALU64 | BPF_RSH | BPF_K
const MOD32_K: u8 = 0x94; // BPF_ALU | BPF_MOD | BPF_K
const ADD64_K: u8 = 0x07; // BPF_ALU64 | BPF_ADD | BPF_K
const LDX_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
const LD_ABS_H: u8 = 0x28; // BPF_LD | BPF_ABS | BPF_H (network order in, host order out)
const LD_ABS_W: u8 = 0x20; // BPF_LD | BPF_ABS | BPF_W
const JLT_K: u8 = 0xa5; // BPF_JMP | BPF_JLT | BPF_K
const JNE_K: u8 = 0x55; // BPF_JMP | BPF_JNE | BPF_K
const EXIT: u8 = 0x95;

/// Ethernet + IPv4 header without options + the two ports.
const MIN_IPV4_L4: i32 = 14 + 20 + 4;

/// The program for queues `first .. first + count`: every frame to one of
/// them (the kernel takes the result modulo its number of queues, so it
/// must name an attached queue).
pub fn program(first: u16, count: u16) -> Vec<Insn> {
    let first = i32::from(first);
    if count <= 1 {
        return vec![insn(MOV64_K, 0, 0, 0, first), insn(EXIT, 0, 0, 0, 0)];
    }
    let tail = [insn(MOV64_K, 0, 0, 0, first), insn(EXIT, 0, 0, 0, 0)];
    let body = [
        insn(MOV64_X, 6, 1, 0, 0),          // r6 = skb (LD_ABS reads it)
        insn(LDX_W, 0, 6, 0, 0),            // r0 = skb->len
        insn(JLT_K, 0, 0, 14, MIN_IPV4_L4), // too short: the first queue
        insn(LD_ABS_H, 0, 0, 0, 12),        // ethertype
        insn(JNE_K, 0, 0, 12, 0x0800),      // not IPv4: the first queue
        insn(LD_ABS_W, 0, 0, 0, 26),        // saddr
        insn(MOV64_X, 7, 0, 0, 0),
        insn(LD_ABS_W, 0, 0, 0, 30), // daddr
        insn(XOR64_X, 7, 0, 0, 0),
        insn(LD_ABS_W, 0, 0, 0, 34), // ports (with options: other bytes, still per flow)
        insn(XOR64_X, 7, 0, 0, 0),
        insn(MOV64_X, 0, 7, 0, 0),
        insn(RSH64_K, 0, 0, 0, 16),
        insn(XOR64_X, 0, 7, 0, 0),
        insn(MOD32_K, 0, 0, 0, i32::from(count)),
        insn(ADD64_K, 0, 0, 0, first),
        insn(EXIT, 0, 0, 0, 0),
    ];
    body.into_iter().chain(tail).collect()
}

/// `union bpf_attr` for BPF_PROG_LOAD, up to `prog_name`.
#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
}

fn load(prog: &[Insn]) -> Result<OwnedFd, SteeringError> {
    let mut log = vec![0u8; 4096];
    let mut name = [0u8; 16];
    name[..11].copy_from_slice(b"qlive_steer");
    let attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_SOCKET_FILTER,
        insn_cnt: prog.len() as u32,
        insns: prog.as_ptr() as u64,
        license: c"GPL".as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        kern_version: 0,
        prog_flags: 0,
        prog_name: name,
    };
    // SAFETY: bpf(2) reads `attr` and the buffers it points to, all alive
    // for the call; it returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const ProgLoadAttr,
            std::mem::size_of::<ProgLoadAttr>() as u32,
        )
    };
    if fd < 0 {
        let source = io::Error::last_os_error();
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        return Err(SteeringError::Load {
            log: String::from_utf8_lossy(&log[..end]).trim().to_string(),
            source,
        });
    }
    // SAFETY: a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Steer every frame of the tap behind `tap` (any of its queues' fds) to
/// queues `first .. first + count`.
pub fn steer(tap: BorrowedFd<'_>, first: u16, count: u16) -> Result<(), SteeringError> {
    let prog = load(&program(first, count))?;
    let raw: libc::c_int = prog.as_raw_fd();
    // SAFETY: TUNSETSTEERINGEBPF reads one int (the program fd); the tap
    // takes its own reference, ours is closed on return.
    if unsafe { libc::ioctl(tap.as_raw_fd(), TUNSETSTEERINGEBPF as _, &raw) } < 0 {
        return Err(SteeringError::Attach(io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's verifier accepts both shapes (needs CAP_BPF, as the
    /// agent has).
    #[test]
    fn the_verifier_accepts_the_programs() {
        for (first, count) in [(0, 1), (3, 1), (0, 4), (8, 8)] {
            match load(&program(first, count)) {
                Ok(_) => {}
                Err(SteeringError::Load { source, .. })
                    if source.raw_os_error() == Some(libc::EPERM) =>
                {
                    eprintln!("skipped: no CAP_BPF");
                    return;
                }
                Err(e) => panic!("{first}+{count}: {}", crate::error::chain(&e)),
            }
        }
    }

    #[test]
    fn jumps_land_on_the_first_queue_path() {
        let p = program(2, 3);
        // both early exits jump to the tail `r0 = first; exit`
        let tail = p.len() - 2;
        for (i, ins) in p.iter().enumerate() {
            if ins.code == JLT_K || ins.code == JNE_K {
                assert_eq!(i as i64 + 1 + i64::from(ins.off), tail as i64, "insn {i}");
            }
        }
        assert_eq!(p[tail].imm, 2);
    }
}
