//! Local live migration: the engine that runs the five phases
//! ([`engine::migrate`]) and finishes interrupted ones ([`engine::recover`]),
//! its live state ([`state`]), the persisted phases ([`phase`]), the
//! preflight, the capability table, the required-feature hooks, the
//! recovery rules ([`recovery`]) and the two ways a migration ends
//! ([`resolve`]: keep the source, switch to the destination), shared by the
//! live path and recovery. The agent reaches the engine through
//! [`engine::Host`] and keeps the job lock, the API and the error mapping.
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

pub mod copy;
pub mod devices;
pub mod engine;
pub mod hooks;
pub mod job;
pub mod params;
pub mod phase;
pub mod preflight;
pub mod recovery;
pub mod resolve;
pub mod state;

use crate::domain::mcs::McsError;
use crate::domain::TableError;
use crate::fsutil::NotRegularError;
use crate::instance::domid::DomidError;
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
    #[error("preflight of target emulator {emulator}")]
    Preflight {
        emulator: PathBuf,
        #[source]
        source: preflight::PreflightError,
    },
    #[error("allocating the destination's domid")]
    AllocateDomid(#[source] DomidError),
    #[error("the domain's SELinux labels")]
    Labels(#[source] McsError),
    #[error("the console log {path}")]
    ConsoleLog {
        path: PathBuf,
        #[source]
        source: NotRegularError,
    },
    #[error("the source (domid {domid}) has no RAM of qlive's to share: a foreign QEMU's guest can only be copied")]
    NoSharedRam { domid: u64 },
    #[error("starting the destination QEMU")]
    SpawnDestination(#[source] InstanceError),
    #[error("steering the taps' frames to the destination")]
    Steering(#[source] InstanceError),
    #[error("the destination opened other disks than the source")]
    DisksDiffer(#[source] devices::DiskMismatch),
    #[error("the domain's incoming slot is taken")]
    RemoteTaken(#[source] TableError),
    #[error("{what}")]
    Qmp {
        what: &'static str,
        #[source]
        source: QmpError,
    },
    #[error("required-feature hook {hook} failed in phase {phase}: {detail}")]
    Hook {
        hook: String,
        phase: String,
        detail: String,
    },
    #[error("the destination QEMU cannot do post-copy (it needs userfaultfd: QEMU 8.1 and later open /dev/userfaultfd; older ones need vm.unprivileged_userfaultfd=1, as qlive's QEMUs lack CAP_SYS_PTRACE); use --postcopy auto or never")]
    PostcopyUnavailable(#[source] QmpError),
    #[error("migration {status}: {detail}")]
    Failed { status: String, detail: String },
    #[error("migration aborted by request")]
    Aborted,
    #[error("migration timed out after {secs} s and was cancelled")]
    Timeout { secs: u64 },
    #[error("refusing to resume the destination: the source still runs vCPUs (status {status})")]
    SourceRunning { status: String },
    #[error("the destination QEMU may have run the guest and then failed ({detail}); the source's device state is older than the guest's memory, so neither instance may run it again")]
    Crashed { detail: String },
    #[error("the destination QEMU did not answer `cont` ({detail})")]
    ContUnanswered { detail: String },
    #[error("migration step {step} is not allowed in state {from}")]
    Transition {
        from: &'static str,
        step: &'static str,
    },
    #[error("persisting migration phase to {path}")]
    Persist {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
