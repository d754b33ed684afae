//! The in-memory migration job: the lock that refuses other mutating calls
//! on the domain, the phase shown by `qlive job`, the abort switch.

use super::phase::PhaseName;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, serde::Serialize)]
pub struct TargetInfo {
    pub domid: u64,
    pub pid: Option<i32>,
    pub emulator: std::path::PathBuf,
}

pub struct Job {
    pub kind: &'static str,
    pub started: Instant,
    pub started_at: u64,
    phase: Mutex<PhaseName>,
    target: Mutex<Option<TargetInfo>>,
    pub cancel: CancellationToken,
    /// Set once the source reported `completed`: from here on the guest
    /// belongs to the destination and abort is refused.
    past_switchover: AtomicBool,
    bytes: AtomicU64,
    /// The source's QMP, for live statistics during Perform.
    src_qmp: Mutex<Option<std::sync::Arc<crate::qmp::Qmp>>>,
}

impl Job {
    pub fn migration_out(started_at: u64) -> Job {
        Job::of_kind("migration-out", started_at)
    }

    /// Adopting a foreign QEMU: the same migration, RAM copied.
    pub fn adoption(started_at: u64) -> Job {
        Job::of_kind("adoption", started_at)
    }

    fn of_kind(kind: &'static str, started_at: u64) -> Job {
        Job {
            kind,
            started: Instant::now(),
            started_at,
            phase: Mutex::new(PhaseName::Begin),
            target: Mutex::new(None),
            cancel: CancellationToken::new(),
            past_switchover: AtomicBool::new(false),
            bytes: AtomicU64::new(0),
            src_qmp: Mutex::new(None),
        }
    }

    pub fn phase(&self) -> PhaseName {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_phase(&self, p: PhaseName) {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = p;
    }

    pub fn set_target(&self, t: TargetInfo) {
        *self.target.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
    }

    pub fn target(&self) -> Option<TargetInfo> {
        self.target
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn mark_switchover(&self) {
        self.past_switchover.store(true, Ordering::SeqCst);
    }

    pub fn past_switchover(&self) -> bool {
        self.past_switchover.load(Ordering::SeqCst)
    }

    pub fn set_bytes(&self, b: u64) {
        self.bytes.store(b, Ordering::Relaxed);
    }

    pub fn set_source_qmp(&self, q: std::sync::Arc<crate::qmp::Qmp>) {
        *self.src_qmp.lock().unwrap_or_else(|e| e.into_inner()) = Some(q);
    }

    /// Refresh `bytes` from the source while the migration streams.
    pub async fn refresh_bytes(&self) {
        if self.phase() != PhaseName::Perform {
            return;
        }
        let q = self
            .src_qmp
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(q) = q {
            let r = tokio::time::timeout(
                std::time::Duration::from_secs(2),
                q.execute_raw("query-migrate", None),
            )
            .await;
            if let Ok(Ok(v)) = r {
                if let Some(b) = v["ram"]["transferred"].as_u64() {
                    self.set_bytes(b);
                }
            }
        }
    }

    /// The error text other mutating calls get while this job runs.
    pub fn busy_message(&self, domain: &str) -> String {
        format!(
            "domain {domain} has {} {} job in phase {} (running for {} ms); wait for it or `qlive abort {domain}`",
            if self.kind.starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" },
            self.kind,
            self.phase(),
            self.started.elapsed().as_millis()
        )
    }

    /// QEMU's `ram.transferred` on the source, as last read.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}
