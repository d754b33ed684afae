//! The host's pool of 2 MiB huge pages, for tests and benchmarks that put
//! guest RAM on them: reserve pages for a test's life and give them back.
#![allow(dead_code)]

pub const POOL: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";
pub const NR: &str = "/proc/sys/vm/nr_hugepages";

pub fn read_u64(p: &str) -> u64 {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{p}: {e}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{p}: {e}"))
}

/// 2 MiB pages taken from the pool: in use plus promised to mappings.
pub fn pages_taken() -> u64 {
    read_u64(&format!("{POOL}/nr_hugepages")) - read_u64(&format!("{POOL}/free_hugepages"))
        + read_u64(&format!("{POOL}/resv_hugepages"))
}

/// `n` more 2 MiB pages in the pool for the test's life; the old size is
/// put back on drop (the pages of a destroyed guest are free again by then).
pub struct Reserved {
    before: u64,
}

impl Reserved {
    pub fn pages(n: u64) -> Reserved {
        let before = read_u64(NR);
        std::fs::write(NR, format!("{}\n", before + n)).expect("write vm.nr_hugepages");
        let got = read_u64(NR);
        let r = Reserved { before };
        assert!(
            got >= before + n,
            "the kernel gave {} of {n} huge pages (memory too fragmented?)",
            got - before
        );
        r
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        let _ = std::fs::write(NR, format!("{}\n", self.before));
    }
}
