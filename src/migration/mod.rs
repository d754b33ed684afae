//! Local live migration: the job, the persisted phases, the migration
//! capabilities table, the required-feature hooks, and the startup recovery
//! rules. The agent (`agent::migrate`) drives the five phases with these
//! pieces and does the table swap.
//!
//! ```text
//!  client        agent (source side)                 agent (destination side)
//!    | migrate       |                                       |
//!    |-------------->| Begin: job lock, persist              |
//!    |               |-------------------------------------->| Prepare: preflight target,
//!    |               |                                       |  new domid + paths, spawn
//!    |               |                                       |  QEMU -S -incoming defer
//!    |               |                                       |  (same memfd), caps, hooks,
//!    |               |                                       |  migrate-incoming, remote table
//!    |               | Perform: migrate (unix socket),       |
//!    |               |  wait MIGRATION event (no polling)    |
//!    |               |-------------------------------------->| Finish: incoming completed,
//!    |               |                                       |  prove source stopped, cont
//!    |               | Confirm: swap tables, quit source,    |
//!    |<--------------|  remove old paths, drop job           |
//! ```
//! Each phase is persisted (atomic write + fsync) before it acts; see
//! [`recovery`] for what a restarted agent does with each.

pub mod devices;
pub mod hooks;
pub mod job;
pub mod params;
pub mod phase;
pub mod recovery;

use crate::instance::InstanceError;
use crate::qmp::QmpError;
use std::path::PathBuf;

/// `migrate_cancel` on the source, then wait (bounded) for its MIGRATION
/// event saying the migration ended, so that it runs again (or can be
/// resumed). Returns at once if no migration is in flight.
pub async fn cancel_outgoing(src: &crate::qmp::Qmp) {
    let mut events = src.subscribe();
    if let Err(e) = src.execute(qapi::qmp::migrate_cancel {}).await {
        tracing::warn!(error = %e, "migrate_cancel");
    }
    let status = src.execute_raw("query-migrate", None).await.ok();
    if !recovery::migrating(status.as_ref().and_then(|v| v["status"].as_str())) {
        return;
    }
    let settled = async {
        while let Ok(ev) = events.recv().await {
            if ev.name == "MIGRATION" && !recovery::migrating(ev.data["status"].as_str()) {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), settled).await;
}

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("preflight of target emulator {emulator}: {reason}")]
    Preflight { emulator: PathBuf, reason: String },
    #[error("starting the destination QEMU")]
    SpawnDestination(#[source] InstanceError),
    #[error("{what}")]
    Qmp {
        what: String,
        #[source]
        source: QmpError,
    },
    #[error("required-feature hook {hook} failed in phase {phase}: {detail}")]
    Hook {
        hook: String,
        phase: String,
        detail: String,
    },
    #[error("migration {status}: {detail}")]
    Failed { status: String, detail: String },
    #[error("migration aborted by request")]
    Aborted,
    #[error("migration timed out after {secs} s and was cancelled")]
    Timeout { secs: u64 },
    #[error("refusing to resume the destination: {0}")]
    Unsafe(String),
    #[error("the domain's incoming slot is taken: {0}")]
    RemoteTaken(String),

    #[error("persisting migration phase to {path}")]
    Persist {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
