//! The migration phases as persisted: each variant carries exactly the data
//! valid in that phase, and a step consumes the old phase to produce the
//! next. The job file (`<run>/domains/<name>/job.json`) is written
//! atomically before the phase acts, so a restarted agent knows what may
//! have happened (see [`super::recovery`]).

use crate::fsutil;
use crate::instance::paths::InstancePaths;
use crate::instance::InstanceRecord;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const FORMAT: &str = "qlive-migration-job";
pub const VERSION: u32 = 1;

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
    Perform {
        src: InstanceRecord,
        dst: InstanceRecord,
    },
    /// The incoming side completed; `cont` may have been sent to dst.
    Finish {
        src: InstanceRecord,
        dst: InstanceRecord,
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
    },
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

    /// Begin -> Prepare.
    pub fn prepare(self, dst_domid: u64, dst_paths: InstancePaths) -> Phase {
        Phase::Prepare {
            src: self.src().clone(),
            dst_domid,
            dst_paths,
        }
    }

    /// Prepare -> Perform, once the destination is recorded.
    pub fn perform(self, dst: InstanceRecord) -> Phase {
        Phase::Perform {
            src: self.src().clone(),
            dst,
        }
    }

    /// Perform -> Finish.
    pub fn finish(self) -> Phase {
        match self {
            Phase::Perform { src, dst } | Phase::Finish { src, dst } => Phase::Finish { src, dst },
            other => other,
        }
    }

    /// Any phase -> Confirm with the outcome.
    pub fn confirm(self, outcome: Outcome) -> Phase {
        let (src, dst, dst_paths, dst_domid) = match self {
            Phase::Begin { src } => (src, None, None, None),
            Phase::Prepare {
                src,
                dst_paths,
                dst_domid,
            } => (src, None, Some(dst_paths), Some(dst_domid)),
            Phase::Perform { src, dst } | Phase::Finish { src, dst } => {
                let (p, d) = (dst.paths.clone(), dst.domid);
                (src, Some(dst), Some(p), Some(d))
            }
            Phase::Confirm {
                src,
                dst,
                dst_paths,
                dst_domid,
                ..
            } => (src, dst, dst_paths, dst_domid),
        };
        Phase::Confirm {
            src,
            dst,
            dst_paths,
            dst_domid,
            outcome,
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
