//! Is KVM really usable here? `/dev/kvm` existing is not enough: some hosts
//! (nested or paravirtual flavours) expose it but cannot run an ordinary
//! guest. `accel: auto` picks KVM only when this check passes: it creates a
//! VM with one vCPU in real mode whose only instruction is `hlt`, runs it,
//! and expects a HLT exit; and KVM must pass through the baseline CPU
//! features the host CPU has (SSE3, SSSE3, SSE4.1/4.2, POPCNT, CX16): a
//! KVM that hides them (seen on a paravirtual flavour where the vCPU runs a
//! `hlt` but a Linux kernel hangs early in boot) is not one ordinary guests
//! can use.

use std::sync::OnceLock;

#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("opening /dev/kvm: {0}")]
    Open(String),
    #[error("running a test vCPU: {0}")]
    Run(String),
    #[error("test vCPU exited with {0} instead of HLT")]
    UnexpectedExit(String),
    #[error("KVM hides CPU features the host has: {0}")]
    FilteredCpuid(String),
}

/// CPUID leaf 1 ECX bits of the x86-64-v2 baseline.
const BASELINE_ECX: &[(u32, &str)] = &[
    (0, "sse3"),
    (9, "ssse3"),
    (13, "cx16"),
    (19, "sse4.1"),
    (20, "sse4.2"),
    (23, "popcnt"),
];

fn check_cpuid(kvm: &kvm_ioctls::Kvm) -> Result<(), KvmError> {
    let supported = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| KvmError::Run(e.to_string()))?;
    let kvm_ecx = supported
        .as_slice()
        .iter()
        .find(|e| e.function == 1)
        .map(|e| e.ecx)
        .unwrap_or(0);
    let host_ecx = std::arch::x86_64::__cpuid(1).ecx;
    let hidden: Vec<&str> = BASELINE_ECX
        .iter()
        .filter(|(bit, _)| host_ecx & (1 << bit) != 0 && kvm_ecx & (1 << bit) == 0)
        .map(|(_, n)| *n)
        .collect();
    if hidden.is_empty() {
        Ok(())
    } else {
        Err(KvmError::FilteredCpuid(hidden.join(", ")))
    }
}

/// Cached for the life of the process.
pub fn kvm_usable() -> bool {
    static USABLE: OnceLock<bool> = OnceLock::new();
    *USABLE.get_or_init(|| match probe() {
        Ok(()) => {
            tracing::info!("KVM runs guests on this host; accel auto = kvm");
            true
        }
        Err(e) => {
            tracing::info!(reason = %e, "KVM not usable on this host; accel auto = tcg");
            false
        }
    })
}

fn probe() -> Result<(), KvmError> {
    use kvm_bindings::kvm_userspace_memory_region;
    use kvm_ioctls::{Kvm, VcpuExit};

    let kvm = Kvm::new().map_err(|e| KvmError::Open(e.to_string()))?;
    check_cpuid(&kvm)?;
    let vm = kvm.create_vm().map_err(|e| KvmError::Run(e.to_string()))?;
    const MEM: usize = 0x1000;
    const GUEST_ADDR: u64 = 0x1000;
    // SAFETY: anonymous private mapping, checked below.
    let host = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            MEM,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if host == libc::MAP_FAILED {
        return Err(KvmError::Run("mmap failed".into()));
    }
    struct Unmap(*mut libc::c_void);
    impl Drop for Unmap {
        fn drop(&mut self) {
            // SAFETY: the mapping made above, unmapped once.
            unsafe { libc::munmap(self.0, MEM) };
        }
    }
    let _unmap = Unmap(host);
    // SAFETY: host points at MEM writable bytes.
    unsafe { *(host as *mut u8) = 0xf4 }; // hlt
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: GUEST_ADDR,
        memory_size: MEM as u64,
        userspace_addr: host as u64,
        flags: 0,
    };
    // SAFETY: the region stays mapped for the VM's life (dropped after it).
    unsafe { vm.set_user_memory_region(region) }.map_err(|e| KvmError::Run(e.to_string()))?;
    let mut vcpu = vm
        .create_vcpu(0)
        .map_err(|e| KvmError::Run(e.to_string()))?;
    let mut sregs = vcpu.get_sregs().map_err(|e| KvmError::Run(e.to_string()))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs)
        .map_err(|e| KvmError::Run(e.to_string()))?;
    let mut regs = vcpu.get_regs().map_err(|e| KvmError::Run(e.to_string()))?;
    regs.rip = GUEST_ADDR;
    regs.rflags = 2;
    vcpu.set_regs(&regs)
        .map_err(|e| KvmError::Run(e.to_string()))?;
    match vcpu.run() {
        Ok(VcpuExit::Hlt) => Ok(()),
        Ok(other) => Err(KvmError::UnexpectedExit(format!("{other:?}"))),
        Err(e) => Err(KvmError::Run(e.to_string())),
    }
}
