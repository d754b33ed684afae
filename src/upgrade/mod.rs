//! Hypervisor upgrade runs: which running instances are stale (their QEMU
//! binary, a mapped library or a loaded firmware file changed on disk since
//! they started), and the batch that live-migrates them to the new files.

pub mod run;
pub mod stale;
