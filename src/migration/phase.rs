//! The migration phases as persisted: each variant carries exactly the data
//! valid in that phase. The engine never edits a phase: it derives one from
//! its live state ([`super::state::State::persisted`]). The job file (`<run>/domains/<name>/job.json`) is written
//! atomically before the phase acts, so a restarted agent knows what may
//! have happened (see [`super::recovery`]).

use super::params::Memory;
use crate::fsutil;
use crate::instance::paths::InstancePaths;
use crate::instance::InstanceRecord;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const FORMAT: &str = "qlive-migration-job";
/// 2: `Finish` records whether `cont` may have been sent to the
/// destination, and `Confirm` can record a crash. A version-1 `Finish` is
/// read as "may have been sent" (the safe reading).
pub const VERSION: u32 = 3;
/// 3: a copy migration (`memory`, `postcopy`), which an agent that only
/// knows shared memory must not recover. Shared-memory jobs are still
/// written as 2, so an older agent can finish them.
pub const VERSION_SHARED: u32 = 2;

/// The version a job of `memory` is written as.
pub fn version_for(memory: Memory) -> u32 {
    if memory.is_shared() {
        VERSION_SHARED
    } else {
        VERSION
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PhaseName {
    Begin,
    Prepare,
    Perform,
    Finish,
    Confirm,
}

impl PhaseName {
    pub fn as_str(self) -> &'static str {
        match self {
            PhaseName::Begin => "begin",
            PhaseName::Prepare => "prepare",
            PhaseName::Perform => "perform",
            PhaseName::Finish => "finish",
            PhaseName::Confirm => "confirm",
        }
    }

    pub const ALL: [PhaseName; 5] = [
        PhaseName::Begin,
        PhaseName::Prepare,
        PhaseName::Perform,
        PhaseName::Finish,
        PhaseName::Confirm,
    ];
}

impl std::fmt::Display for PhaseName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a migration ended, as recorded in Confirm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// The destination runs the guest: quit the source, swap.
    Success,
    /// The source keeps (or resumes) the guest: kill the destination.
    Failure,
    /// The destination may have run the guest and is gone: neither
    /// instance may run it again. The domain is reported crashed until an
    /// operator acknowledges it (`qlive destroy`).
    Crashed,
}

fn may_have_resumed() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "kebab-case")]
pub enum Phase {
    /// The job is taken; nothing outside the agent has changed.
    Begin { src: InstanceRecord },
    /// A destination with this domid and these paths may exist (spawned
    /// with `-incoming defer`); it never ran guest code.
    Prepare {
        src: InstanceRecord,
        dst_domid: u64,
        dst_paths: InstancePaths,
    },
    /// `migrate` may have been sent; the source may have stopped.
    /// `postcopy`: `migrate-start-postcopy` may have been sent (written
    /// before it is): from then on guest RAM may be split between the two.
    Perform {
        src: InstanceRecord,
        dst: InstanceRecord,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        postcopy: bool,
    },
    /// The source completed. `resume_sent`: `cont` may have been sent to
    /// the destination (written before it is sent), so the destination may
    /// have run the guest.
    Finish {
        src: InstanceRecord,
        dst: InstanceRecord,
        #[serde(default = "may_have_resumed")]
        resume_sent: bool,
        /// The switchover was post-copy's: the destination fetches the pages
        /// it lacks from the source until the source reports `completed`.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        postcopy: bool,
    },
    /// Decided: clean up the losing side, swap on success.
    Confirm {
        src: InstanceRecord,
        dst: Option<InstanceRecord>,
        dst_paths: Option<InstancePaths>,
        /// The destination's domid, once one was allocated.
        #[serde(default)]
        dst_domid: Option<u64>,
        outcome: Outcome,
        /// Why, for a crash.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
}

/// What a persisted phase names, whatever the phase.
pub struct Parts<'a> {
    pub src: &'a InstanceRecord,
    pub dst: Option<&'a InstanceRecord>,
    pub dst_paths: Option<&'a InstancePaths>,
    pub dst_domid: Option<u64>,
}

impl Phase {
    pub fn name(&self) -> PhaseName {
        match self {
            Phase::Begin { .. } => PhaseName::Begin,
            Phase::Prepare { .. } => PhaseName::Prepare,
            Phase::Perform { .. } => PhaseName::Perform,
            Phase::Finish { .. } => PhaseName::Finish,
            Phase::Confirm { .. } => PhaseName::Confirm,
        }
    }

    pub fn src(&self) -> &InstanceRecord {
        match self {
            Phase::Begin { src }
            | Phase::Prepare { src, .. }
            | Phase::Perform { src, .. }
            | Phase::Finish { src, .. }
            | Phase::Confirm { src, .. } => src,
        }
    }

    pub fn parts(&self) -> Parts<'_> {
        match self {
            Phase::Begin { src } => Parts {
                src,
                dst: None,
                dst_paths: None,
                dst_domid: None,
            },
            Phase::Prepare {
                src,
                dst_domid,
                dst_paths,
            } => Parts {
                src,
                dst: None,
                dst_paths: Some(dst_paths),
                dst_domid: Some(*dst_domid),
            },
            Phase::Perform { src, dst, .. } | Phase::Finish { src, dst, .. } => Parts {
                src,
                dst: Some(dst),
                dst_paths: Some(&dst.paths),
                dst_domid: Some(dst.domid),
            },
            Phase::Confirm {
                src,
                dst,
                dst_paths,
                dst_domid,
                ..
            } => Parts {
                src,
                dst: dst.as_ref(),
                dst_paths: dst_paths.as_ref(),
                dst_domid: *dst_domid,
            },
        }
    }

    /// Post-copy may have started (Perform or Finish say so).
    pub fn postcopy(&self) -> bool {
        matches!(
            self,
            Phase::Perform { postcopy: true, .. } | Phase::Finish { postcopy: true, .. }
        )
    }

    /// Record that post-copy may have started (Perform and Finish only).
    pub fn set_postcopy(&mut self, v: bool) {
        if let Phase::Perform { postcopy, .. } | Phase::Finish { postcopy, .. } = self {
            *postcopy = v;
        }
    }

    /// Confirm, from the phase the decision was taken in.
    pub fn confirm(&self, outcome: Outcome, reason: Option<String>) -> Phase {
        let p = self.parts();
        Phase::Confirm {
            src: p.src.clone(),
            dst: p.dst.cloned(),
            dst_paths: p.dst_paths.cloned(),
            dst_domid: p.dst_domid,
            outcome,
            reason,
        }
    }
}

/// The job file: the phase plus what recovery needs beyond it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobFile {
    pub format: String,
    pub version: u32,
    pub domain: String,
    pub target_emulator: PathBuf,
    /// Whether the source's vCPUs ran when the job began: a failed
    /// migration restores exactly that.
    pub src_was_running: bool,
    pub started_at: u64,
    /// How guest RAM moves: shared (absent in the file) or copied.
    #[serde(default, skip_serializing_if = "Memory::is_shared")]
    pub memory: Memory,
    #[serde(flatten)]
    pub phase: Phase,
}

pub fn job_path(domain_run_dir: &Path) -> PathBuf {
    domain_run_dir.join("job.json")
}

impl JobFile {
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        fsutil::write_atomic(path, &bytes, 0o600)
    }

    pub fn load(path: &Path) -> std::io::Result<Option<JobFile>> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let j: JobFile = serde_json::from_slice(&bytes)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        if j.format != FORMAT || j.version > VERSION {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{} is format {:?} version {}, not understood",
                    path.display(),
                    j.format,
                    j.version
                ),
            ));
        }
        Ok(Some(j))
    }

    pub fn remove(path: &Path) -> std::io::Result<()> {
        fsutil::remove_file_if_exists(path)?;
        if let Some(d) = path.parent() {
            fsutil::sync_dir(d)?;
        }
        Ok(())
    }
}
