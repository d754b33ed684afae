//! When a copy migration (guest RAM sent, not shared) switches to
//! post-copy. Pre-copy sends all of RAM once (the first pass), then, pass
//! after pass, what the guest dirtied meanwhile, until the rest fits in
//! QEMU's downtime limit. A guest that dirties memory faster than a pass
//! sends it never gets there. Post-copy stops the source, moves the device
//! state, runs the guest on the destination and has it fetch the pages it
//! still lacks from the source.
//!
//! Post-copy is never started before the first full pass: the pages the
//! guest does not touch then all arrive by pre-copy, and the guest on the
//! destination faults only on what it dirtied since (libvirt's advice; the
//! original report: downtime 3.5 s -> under 1 s for a streaming guest).
//!
//! The rule reads QEMU's `query-migrate` (`ram.dirty-sync-count`: 1 during
//! the first pass, k+1 once pass k is done; `ram.remaining`) every
//! [`POLL`]:
//!
//! | policy | starts post-copy |
//! |---|---|
//! | `never` | never |
//! | `always` | once the first pass is done (sync count 2) |
//! | `auto` | once a pass after the first leaves more than half of what the pass before it left ([`NOT_CONVERGING`]), or at the end of pass [`AUTO_MAX_PASSES`] |
//!
//! What a pass "left" is the largest `remaining` seen right after its
//! sync: the memory dirtied while it ran. A guest whose dirty set halves
//! pass over pass converges by itself, and pre-copy is left to finish.

use super::params::Postcopy;
use std::time::Duration;

/// How often the source's progress is read while post-copy may start.
pub const POLL: Duration = Duration::from_millis(100);
/// `auto`: a pass that does not at least halve the dirty memory of the one
/// before is not converging.
pub const NOT_CONVERGING: f64 = 0.5;
/// `auto`: post-copy after this many passes at the latest (the first pass
/// included).
pub const AUTO_MAX_PASSES: u64 = 5;
/// Test only: start post-copy at once, before the first pass is done
/// (the baseline `make bench-adopt` compares against; never a policy).
pub const TEST_AT_START_ENV: &str = "QLIVE_TEST_POSTCOPY_AT_START";

/// The source's progress, from one `query-migrate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// `ram.dirty-sync-count`.
    pub syncs: u64,
    /// `ram.remaining`, bytes.
    pub remaining: u64,
}

impl Progress {
    pub fn of(v: &serde_json::Value) -> Option<Progress> {
        Some(Progress {
            syncs: v["ram"]["dirty-sync-count"].as_u64()?,
            remaining: v["ram"]["remaining"].as_u64()?,
        })
    }
}

/// The rule, fed with progress as it is read.
#[derive(Debug, Clone)]
pub struct Rule {
    policy: Postcopy,
    at_start: bool,
    /// The largest `remaining` seen per sync count (index: count - 2);
    /// None for a pass no reading fell in.
    left: Vec<Option<u64>>,
}

impl Rule {
    pub fn new(policy: Postcopy) -> Rule {
        Rule {
            policy,
            at_start: policy != Postcopy::Never && std::env::var_os(TEST_AT_START_ENV).is_some(),
            left: Vec::new(),
        }
    }

    /// Whether the rule will ever start post-copy.
    pub fn armed(&self) -> bool {
        self.policy != Postcopy::Never
    }

    /// Feed one reading; `true`: start post-copy now.
    pub fn observe(&mut self, p: Progress) -> bool {
        if self.at_start {
            return true;
        }
        if p.syncs < 2 {
            return false;
        }
        let k = (p.syncs - 2) as usize;
        if self.left.len() <= k {
            self.left.resize(k + 1, None);
        }
        self.left[k] = Some(self.left[k].unwrap_or(0).max(p.remaining));
        match self.policy {
            Postcopy::Never => false,
            Postcopy::Always => true,
            Postcopy::Auto => {
                if p.syncs > AUTO_MAX_PASSES {
                    return true;
                }
                // Pass k+1 (k >= 1) left left[k]; the pass before left
                // left[k-1]. Only two passes both read are compared: a
                // pass between two readings tells nothing.
                match (k.checked_sub(1).and_then(|j| self.left[j]), self.left[k]) {
                    (Some(before), Some(now)) => now as f64 > NOT_CONVERGING * before as f64,
                    _ => false,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(syncs: u64, remaining: u64) -> Progress {
        Progress { syncs, remaining }
    }

    #[test]
    fn nothing_starts_during_the_first_pass() {
        for pol in [Postcopy::Auto, Postcopy::Always, Postcopy::Never] {
            let mut r = Rule::new(pol);
            assert!(!r.observe(p(1, 1 << 30)), "{pol:?}");
        }
    }

    #[test]
    fn always_starts_after_the_first_pass_and_never_never() {
        let mut r = Rule::new(Postcopy::Always);
        assert!(r.observe(p(2, 512 << 20)));
        let mut r = Rule::new(Postcopy::Never);
        for s in 1..20 {
            assert!(!r.observe(p(s, 512 << 20)));
        }
        assert!(!r.armed());
    }

    #[test]
    fn auto_waits_while_passes_halve_the_dirty_memory() {
        let mut r = Rule::new(Postcopy::Auto);
        assert!(!r.observe(p(2, 400 << 20)));
        assert!(!r.observe(p(2, 100 << 20)));
        // Pass 2 left 150 MiB of pass 1's 400: converging.
        assert!(!r.observe(p(3, 150 << 20)));
        // Pass 3 left 100 of 150: not converging.
        assert!(r.observe(p(4, 100 << 20)));
    }

    #[test]
    fn auto_starts_when_a_pass_does_not_shrink_the_dirty_set() {
        let mut r = Rule::new(Postcopy::Auto);
        assert!(!r.observe(p(2, 512 << 20)));
        assert!(r.observe(p(3, 510 << 20)));
    }

    #[test]
    fn auto_compares_only_passes_it_read() {
        let mut r = Rule::new(Postcopy::Auto);
        assert!(!r.observe(p(1, 200 << 20)));
        // Pass 1 ended between two readings: nothing to compare with.
        assert!(!r.observe(p(3, 168 << 20)));
        assert!(!r.observe(p(4, 10 << 20)));
    }

    #[test]
    fn auto_gives_up_on_pre_copy_after_the_last_pass() {
        let mut r = Rule::new(Postcopy::Auto);
        let mut left = 1u64 << 30;
        for s in 2..=AUTO_MAX_PASSES {
            left /= 3;
            assert!(!r.observe(p(s, left)), "pass {s}");
        }
        assert!(r.observe(p(AUTO_MAX_PASSES + 1, 1)));
    }

    #[test]
    fn progress_reads_query_migrate() {
        let v = serde_json::json!({"status": "active",
            "ram": {"dirty-sync-count": 3, "remaining": 4096}});
        assert_eq!(Progress::of(&v), Some(p(3, 4096)));
        assert_eq!(Progress::of(&serde_json::json!({"status": "setup"})), None);
    }
}
