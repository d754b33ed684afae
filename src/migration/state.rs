//! The live state of one migration: one enum whose variants own what is
//! valid in them (the destination instance, its event stream, the instant
//! the source completed). The persisted [`Phase`] is derived from it, so the
//! job file cannot disagree with what the engine holds. A step consumes the
//! old state and returns the next; a step from the wrong state is an error
//! (the analogue of libvirt's `qemuMigrationCheckPhase`), never a silent
//! no-op.

// A failed step hands back the whole state (it owns what the failure path
// must clean up); that happens at most once per migration, so its size
// costs nothing worth a box.
#![allow(clippy::result_large_err)]

use super::phase::{Phase, PhaseName};
use super::MigrationError;
use crate::instance::paths::InstancePaths;
use crate::instance::{Instance, InstanceRecord};
use crate::qmp::QmpEvent;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::broadcast;

/// A step that could not be taken: the state it left (which owns what the
/// failure path must clean up) and why.
pub struct Failed {
    pub state: State,
    pub error: MigrationError,
}

impl Failed {
    pub fn new(state: State, error: MigrationError) -> Failed {
        Failed { state, error }
    }
}

impl std::fmt::Debug for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Failed({}: {:?})", self.state.label(), self.error)
    }
}

pub enum State {
    /// The job is taken; nothing outside the agent has changed.
    Begun,
    /// A domid and its paths are allocated; a destination may be spawning.
    Preparing { domid: u64, paths: InstancePaths },
    /// The destination runs paused (`-incoming defer`) and sits in the
    /// remote table.
    Spawned { dst: Arc<Instance> },
    /// The prepare hooks run (or ran): `release` is owed from here on.
    Hooking { dst: Arc<Instance> },
    /// The destination listens for the incoming state.
    Prepared {
        dst: Arc<Instance>,
        events: broadcast::Receiver<QmpEvent>,
    },
    /// `migrate` may have been sent: the source may stop at any moment.
    Performing {
        dst: Arc<Instance>,
        events: broadcast::Receiver<QmpEvent>,
    },
    /// The source reported `completed`: past switchover, abort is refused.
    /// `cont` has not been sent to the destination.
    Completed {
        dst: Arc<Instance>,
        events: broadcast::Receiver<QmpEvent>,
        at: Instant,
    },
    /// The intent to `cont` the destination is on disk: from here on the
    /// destination may have run the guest, and the source must never run
    /// it again.
    Resuming {
        dst: Arc<Instance>,
        completed_at: Instant,
    },
    /// The destination runs the guest.
    Resumed { dst: Arc<Instance> },
}

impl State {
    /// The name shown in errors and logs.
    pub fn label(&self) -> &'static str {
        match self {
            State::Begun => "begun",
            State::Preparing { .. } => "preparing",
            State::Spawned { .. } => "spawned",
            State::Hooking { .. } => "hooking",
            State::Prepared { .. } => "prepared",
            State::Performing { .. } => "performing",
            State::Completed { .. } => "completed",
            State::Resuming { .. } => "resuming",
            State::Resumed { .. } => "resumed",
        }
    }

    /// The protocol phase this state belongs to.
    pub fn phase_name(&self) -> PhaseName {
        match self {
            State::Begun => PhaseName::Begin,
            State::Preparing { .. }
            | State::Spawned { .. }
            | State::Hooking { .. }
            | State::Prepared { .. } => PhaseName::Prepare,
            State::Performing { .. } => PhaseName::Perform,
            State::Completed { .. } | State::Resuming { .. } | State::Resumed { .. } => {
                PhaseName::Finish
            }
        }
    }

    /// What is persisted for this state: what a restarted agent must know.
    pub fn persisted(&self, src: &InstanceRecord) -> Phase {
        let src = src.clone();
        match self {
            State::Begun => Phase::Begin { src },
            State::Preparing { domid, paths } => Phase::Prepare {
                src,
                dst_domid: *domid,
                dst_paths: paths.clone(),
            },
            State::Spawned { dst } | State::Hooking { dst } | State::Prepared { dst, .. } => {
                Phase::Prepare {
                    src,
                    dst_domid: dst.domid(),
                    dst_paths: dst.record.paths.clone(),
                }
            }
            State::Performing { dst, .. } => Phase::Perform {
                src,
                dst: dst.record.clone(),
                postcopy: false,
            },
            State::Completed { dst, .. } => Phase::Finish {
                src,
                dst: dst.record.clone(),
                resume_sent: false,
                postcopy: false,
            },
            State::Resuming { dst, .. } | State::Resumed { dst } => Phase::Finish {
                src,
                dst: dst.record.clone(),
                resume_sent: true,
                postcopy: false,
            },
        }
    }

    /// The destination instance, once spawned.
    pub fn dst(&self) -> Option<&Arc<Instance>> {
        match self {
            State::Begun | State::Preparing { .. } => None,
            State::Spawned { dst }
            | State::Hooking { dst }
            | State::Prepared { dst, .. }
            | State::Performing { dst, .. }
            | State::Completed { dst, .. }
            | State::Resuming { dst, .. }
            | State::Resumed { dst } => Some(dst),
        }
    }

    /// The destination's domid and paths, once allocated.
    pub fn dst_slot(&self) -> Option<(u64, &InstancePaths)> {
        match self {
            State::Begun => None,
            State::Preparing { domid, paths } => Some((*domid, paths)),
            _ => self.dst().map(|d| (d.domid(), &d.record.paths)),
        }
    }

    /// May the destination have run guest code? Once true, the source's
    /// device state is older than the shared RAM: resuming it corrupts the
    /// guest.
    pub fn destination_may_have_run(&self) -> bool {
        matches!(self, State::Resuming { .. } | State::Resumed { .. })
    }

    /// Could prepare hooks have run (so `release` is owed)?
    pub fn hooks_may_have_run(&self) -> bool {
        !matches!(
            self,
            State::Begun | State::Preparing { .. } | State::Spawned { .. }
        )
    }

    fn wrong(self, step: &'static str) -> Failed {
        let error = MigrationError::Transition {
            from: self.label(),
            step,
        };
        Failed { state: self, error }
    }

    /// Begun -> Preparing.
    pub fn allocate(self, domid: u64, paths: InstancePaths) -> Result<State, Failed> {
        match self {
            State::Begun => Ok(State::Preparing { domid, paths }),
            other => Err(other.wrong("allocate")),
        }
    }

    /// Preparing -> Spawned: the destination exists under the allocated domid.
    pub fn spawned(self, dst: Arc<Instance>) -> Result<State, Failed> {
        match self {
            State::Preparing { domid, .. } if domid == dst.domid() => Ok(State::Spawned { dst }),
            other => Err(other.wrong("spawned")),
        }
    }

    /// Spawned -> Hooking.
    pub fn hooks(self) -> Result<State, Failed> {
        match self {
            State::Spawned { dst } => Ok(State::Hooking { dst }),
            other => Err(other.wrong("hooks")),
        }
    }

    /// Hooking -> Prepared.
    pub fn listening(self, events: broadcast::Receiver<QmpEvent>) -> Result<State, Failed> {
        match self {
            State::Hooking { dst } => Ok(State::Prepared { dst, events }),
            other => Err(other.wrong("listening")),
        }
    }

    /// Prepared -> Performing.
    pub fn perform(self) -> Result<State, Failed> {
        match self {
            State::Prepared { dst, events } => Ok(State::Performing { dst, events }),
            other => Err(other.wrong("perform")),
        }
    }

    /// Performing -> Completed.
    pub fn completed(self, at: Instant) -> Result<State, Failed> {
        match self {
            State::Performing { dst, events } => Ok(State::Completed { dst, events, at }),
            other => Err(other.wrong("completed")),
        }
    }

    /// Completed -> Resuming: hands out the destination's event stream,
    /// which the wait for the incoming side consumed.
    pub fn resuming(self) -> Result<State, Failed> {
        match self {
            State::Completed { dst, at, .. } => Ok(State::Resuming {
                dst,
                completed_at: at,
            }),
            other => Err(other.wrong("resuming")),
        }
    }

    /// The parts of Completed, for the step that consumes them.
    #[allow(clippy::type_complexity)]
    pub fn into_completed(
        self,
    ) -> Result<(Arc<Instance>, broadcast::Receiver<QmpEvent>, Instant), Failed> {
        match self {
            State::Completed { dst, events, at } => Ok((dst, events, at)),
            other => Err(other.wrong("finish")),
        }
    }

    /// Resuming -> Resumed.
    pub fn resumed(self) -> Result<State, Failed> {
        match self {
            State::Resuming { dst, .. } => Ok(State::Resumed { dst }),
            other => Err(other.wrong("resumed")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths() -> InstancePaths {
        InstancePaths::new(std::path::Path::new("/run/q"), "vm", 7)
    }

    #[test]
    fn early_states_persist_what_recovery_needs() {
        let st = State::Begun.allocate(7, paths()).unwrap();
        assert_eq!(st.phase_name(), PhaseName::Prepare);
        assert_eq!(st.dst_slot().map(|(d, _)| d), Some(7));
        assert!(!st.hooks_may_have_run());
        assert!(!st.destination_may_have_run());
    }

    #[test]
    fn wrong_transitions_are_errors() {
        let e = State::Begun.perform().err().map(|f| f.error.to_string());
        assert_eq!(
            e.as_deref(),
            Some("migration step perform is not allowed in state begun")
        );
        assert!(State::Begun.resuming().is_err());
        assert!(State::Begun.completed(Instant::now()).is_err());
        let st = State::Begun.allocate(7, paths()).unwrap();
        let f = st.allocate(8, paths()).err();
        assert!(matches!(
            f.as_ref().map(|f| &f.error),
            Some(MigrationError::Transition {
                from: "preparing",
                step: "allocate"
            })
        ));
        // The state comes back with the error: its cleanup is not lost.
        assert_eq!(f.map(|f| f.state.label()), Some("preparing"));
    }
}
