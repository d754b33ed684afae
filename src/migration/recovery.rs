//! What a restarted agent does with a migration it was killed in the middle
//! of (modelled on libvirt's qemuProcessRecoverMigration). A pure decision
//! from the persisted phase and what is observed now; the agent executes it.
//!
//! | persisted phase | observed | decision |
//! |---|---|---|
//! | Begin | - | keep source (drop job) |
//! | Prepare | - | keep source; kill destination, clean its paths |
//! | Perform | source says `completed` | as Finish |
//! | Perform | otherwise | keep source: cancel the migration, kill destination, make sure the source runs |
//! | Finish | destination running | switch to destination (Confirm) |
//! | Finish | destination completed but paused, source not running | `cont` destination, switch |
//! | Finish, `cont` never sent | destination gone | keep source: `cont` source |
//! | Finish, `cont` may have been sent | destination alive, source not running | `cont` destination, switch |
//! | Finish, `cont` may have been sent | destination alive, source running | leave alone (unreachable) |
//! | Finish, `cont` may have been sent | destination gone | crashed: kill both, never resume the source |
//! | Finish or Confirm (success) | the source runs again although the destination was reached | leave alone (unreachable) |
//! | Confirm (success) | destination alive | switch: kill source, swap, clean |
//! | Confirm (success) | destination gone | crashed |
//! | Confirm (failure) | - | keep source |
//! | Confirm (crashed) | - | crashed (until `qlive destroy`) |
//!
//! A copy migration (adoption, `--copy-memory`) before post-copy follows the
//! same table: each QEMU has RAM of its own, and the destination's is
//! whole only once the source completed. Once post-copy may have started
//! (Perform or Finish persisted with `postcopy`), guest RAM may be split
//! between the two QEMUs: the destination holds what the guest touched
//! since, the source the rest. Then ([`decide_postcopy`]):
//!
//! | observed | decision |
//! |---|---|
//! | source completed (every page sent), destination alive, source not running | switch to destination (`cont` it if paused) |
//! | both alive, source in post-copy (`postcopy-active`/`-paused`/`-recover`), not running | finish post-copy: `cont` the destination if paused, wait for the source's `completed`, then switch |
//! | destination gone, `cont` never sent | keep source: its RAM and device state are whole and the destination never ran |
//! | source still `active` (post-copy not begun), `cont` never sent | keep source, cancelling the migration |
//! | either gone otherwise | crashed: the guest's memory is no longer whole anywhere |
//! | source running | leave alone |
//!
//! An instance that is alive but does not answer `query-status` stops the
//! recovery before this table (the executor leaves the domain unreachable):
//! "not known to run" is never taken for "stopped".
//!
//! Safety: at most one instance ever runs vCPUs. The destination is resumed
//! only when the source is proven stopped or dead; the source only when the
//! destination is dead (the executor kills it first) *and* provably never
//! ran: once the destination may have run, the guest's memory is newer than
//! the source's device state, and resuming the source would corrupt it.

use super::phase::{Outcome, PhaseName};

/// Facts gathered from the two processes at recovery time.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub src_alive: bool,
    /// The source's vCPUs run (query-status).
    pub src_running: bool,
    /// The source's query-migrate status (`completed`, `active`, ...).
    pub src_migration: Option<String>,
    pub dst_alive: bool,
    pub dst_running: bool,
    /// The destination's query-migrate status for the incoming side.
    pub dst_migration: Option<String>,
    /// The persisted Finish says `cont` may have been sent to the
    /// destination.
    pub resume_sent: bool,
    /// The persisted phase says post-copy may have started.
    pub postcopy: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The source stays the domain's instance. Kill the destination first;
    /// cancel an active outgoing migration; resume the source if it ran
    /// before the job.
    KeepSource { cancel_migration: bool },
    /// The destination becomes the domain's instance; kill the source.
    /// `cont_dst`: the destination is paused and must be resumed (allowed
    /// because the source is proven stopped or dead).
    SwitchToDestination { cont_dst: bool },
    /// Post-copy is under way between two live QEMUs: resume the
    /// destination if `cont_dst` (the source is stopped), wait until the
    /// source has sent every page, then switch to the destination.
    FinishPostcopy { cont_dst: bool },
    /// Nothing can run the guest any more (both gone before the destination
    /// ran): the domain is shut off, with this reason.
    Lost(String),
    /// The destination may have run the guest and is gone: kill every
    /// instance, report the domain crashed with this reason, run nothing.
    Crashed(String),
    /// What was observed contradicts the job file: touch nothing, keep the
    /// job file, report the domain unreachable with this reason.
    LeaveAlone(String),
}

/// Is this a `query-migrate` status of a migration still in flight?
pub fn migrating(s: Option<&str>) -> bool {
    matches!(
        s,
        Some("setup" | "active" | "pre-switchover" | "device" | "wait-unplug" | "cancelling")
    )
}

/// A `query-migrate` status of a migration in post-copy.
pub fn in_postcopy(s: Option<&str>) -> bool {
    matches!(
        s,
        Some("postcopy-active" | "postcopy-paused" | "postcopy-recover")
    )
}

pub fn decide(phase: PhaseName, outcome: Option<Outcome>, o: &Observed) -> Decision {
    if o.postcopy && matches!(phase, PhaseName::Perform | PhaseName::Finish) {
        return decide_postcopy(o);
    }
    match phase {
        PhaseName::Begin | PhaseName::Prepare => keep_source(o, false),
        PhaseName::Perform => {
            if o.src_migration.as_deref() == Some("completed")
                || (!o.src_alive && o.dst_migration.as_deref() == Some("completed"))
            {
                decide(PhaseName::Finish, None, o)
            } else {
                keep_source(o, migrating(o.src_migration.as_deref()))
            }
        }
        PhaseName::Finish => {
            if o.dst_alive && o.dst_running && o.src_running {
                both_running()
            } else if o.dst_alive && o.dst_running {
                Decision::SwitchToDestination { cont_dst: false }
            } else if o.dst_alive
                && !o.src_running
                && (o.dst_migration.as_deref() == Some("completed") || o.resume_sent)
            {
                // The intent is written only once the destination reported
                // the state loaded and the source was proven stopped.
                Decision::SwitchToDestination { cont_dst: true }
            } else if o.resume_sent && o.dst_alive {
                Decision::LeaveAlone(
                    "the destination may have run the guest, but the source runs vCPUs now; \
                     neither is resumed or killed on a guess"
                        .into(),
                )
            } else if o.resume_sent {
                Decision::Crashed(
                    "the destination QEMU was sent `cont` (it may have run the guest) and is gone; \
                     the source's device state is older than the guest's memory"
                        .into(),
                )
            } else {
                keep_source(o, false)
            }
        }
        PhaseName::Confirm => match outcome {
            Some(Outcome::Success) => {
                if o.dst_alive && o.src_running {
                    // The source runs again: the destination's device state
                    // is older than the memory now, and the source's is not
                    // known to be whole. Nobody is resumed or killed.
                    both_running()
                } else if o.dst_alive {
                    Decision::SwitchToDestination {
                        cont_dst: !o.dst_running && !o.src_running,
                    }
                } else {
                    Decision::Crashed(
                        "the destination ran the guest and then died during Confirm".into(),
                    )
                }
            }
            Some(Outcome::Crashed) => {
                Decision::Crashed("the guest crashed during a migration".into())
            }
            Some(Outcome::Failure) | None => keep_source(o, false),
        },
    }
}

/// Perform or Finish after post-copy may have started; see the module's
/// second table.
pub fn decide_postcopy(o: &Observed) -> Decision {
    let src_done = o.src_migration.as_deref() == Some("completed");
    let dst_done = o.dst_migration.as_deref() == Some("completed");
    let dst_may_have_run = o.resume_sent || o.dst_running;
    if o.src_alive && o.src_running {
        // The source runs: post-copy never began (its vCPUs stop before
        // it does), or someone resumed it.
        return if dst_may_have_run {
            both_running()
        } else {
            Decision::KeepSource {
                cancel_migration: migrating(o.src_migration.as_deref())
                    || in_postcopy(o.src_migration.as_deref()),
            }
        };
    }
    // A broken stream between two live QEMUs before the destination ran:
    // the source is whole, the destination may never get its pages.
    if o.src_alive
        && !dst_may_have_run
        && matches!(
            o.src_migration.as_deref(),
            Some("postcopy-paused" | "postcopy-recover")
        )
    {
        return Decision::KeepSource {
            cancel_migration: true,
        };
    }
    if o.dst_alive && (src_done || (!o.src_alive && dst_done)) {
        return Decision::SwitchToDestination {
            cont_dst: !o.dst_running,
        };
    }
    if o.dst_alive && o.src_alive && in_postcopy(o.src_migration.as_deref()) {
        return Decision::FinishPostcopy {
            cont_dst: !o.dst_running,
        };
    }
    if !o.resume_sent && !o.dst_running && o.src_alive {
        // The destination never ran: the source's RAM and device state are
        // whole (post-copy only sends pages, it takes none away).
        return Decision::KeepSource {
            cancel_migration: migrating(o.src_migration.as_deref())
                || in_postcopy(o.src_migration.as_deref()),
        };
    }
    Decision::Crashed(
        "post-copy had started and a QEMU is gone: the guest's memory was split between the \
         two and is not whole in either"
            .into(),
    )
}

fn both_running() -> Decision {
    Decision::LeaveAlone(
        "the source runs vCPUs although the migration reached the destination; \
         neither is resumed or killed on a guess"
            .into(),
    )
}

fn keep_source(o: &Observed, cancel_migration: bool) -> Decision {
    if o.src_alive {
        Decision::KeepSource { cancel_migration }
    } else {
        Decision::Lost(
            "the source QEMU died during the migration and the destination had not taken over"
                .into(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs() -> Observed {
        Observed {
            src_alive: true,
            src_running: true,
            ..Default::default()
        }
    }

    fn postcopy(src: Option<&str>, dst: Option<&str>) -> Observed {
        Observed {
            src_running: false,
            src_migration: src.map(String::from),
            dst_alive: true,
            dst_migration: dst.map(String::from),
            postcopy: true,
            ..obs()
        }
    }

    #[test]
    fn post_copy_under_way_is_finished() {
        for phase in [PhaseName::Perform, PhaseName::Finish] {
            let o = postcopy(Some("postcopy-active"), Some("postcopy-active"));
            assert_eq!(
                decide(phase, None, &o),
                Decision::FinishPostcopy { cont_dst: true }
            );
            let o = Observed {
                dst_running: true,
                resume_sent: true,
                ..o
            };
            assert_eq!(
                decide(phase, None, &o),
                Decision::FinishPostcopy { cont_dst: false }
            );
        }
    }

    #[test]
    fn post_copy_completed_switches() {
        let o = postcopy(Some("completed"), Some("completed"));
        assert_eq!(
            decide(PhaseName::Finish, None, &o),
            Decision::SwitchToDestination { cont_dst: true }
        );
        let o = Observed {
            src_alive: false,
            src_migration: None,
            ..postcopy(None, Some("completed"))
        };
        assert_eq!(
            decide(PhaseName::Finish, None, &o),
            Decision::SwitchToDestination { cont_dst: true }
        );
    }

    #[test]
    fn post_copy_with_a_qemu_gone_is_a_crash_unless_the_destination_never_ran() {
        // The source died: pages are missing for good.
        let o = Observed {
            src_alive: false,
            src_migration: None,
            resume_sent: true,
            dst_running: true,
            ..postcopy(None, Some("postcopy-active"))
        };
        assert!(matches!(
            decide(PhaseName::Finish, None, &o),
            Decision::Crashed(_)
        ));
        // The destination died after `cont` may have reached it.
        let o = Observed {
            dst_alive: false,
            dst_migration: None,
            resume_sent: true,
            ..postcopy(Some("postcopy-paused"), None)
        };
        assert!(matches!(
            decide(PhaseName::Finish, None, &o),
            Decision::Crashed(_)
        ));
        // The destination died before it ever ran: the source is whole.
        let o = Observed {
            dst_alive: false,
            dst_migration: None,
            ..postcopy(Some("postcopy-paused"), None)
        };
        assert_eq!(
            decide(PhaseName::Finish, None, &o),
            Decision::KeepSource {
                cancel_migration: true
            }
        );
    }

    #[test]
    fn post_copy_intent_before_it_began_keeps_the_source() {
        let o = postcopy(Some("active"), Some("active"));
        assert_eq!(
            decide(PhaseName::Perform, None, &o),
            Decision::KeepSource {
                cancel_migration: true
            }
        );
        // Killed between the intent and migrate-start-postcopy: the
        // source still runs its guest in pre-copy.
        let o = Observed {
            src_running: true,
            ..postcopy(Some("active"), Some("active"))
        };
        assert_eq!(
            decide(PhaseName::Perform, None, &o),
            Decision::KeepSource {
                cancel_migration: true
            }
        );
        // Running after the destination may have run: nobody is touched.
        let o = Observed {
            src_running: true,
            resume_sent: true,
            ..postcopy(Some("postcopy-active"), Some("postcopy-active"))
        };
        assert!(matches!(
            decide(PhaseName::Finish, None, &o),
            Decision::LeaveAlone(_)
        ));
    }

    #[test]
    fn a_broken_post_copy_stream_before_the_destination_ran_keeps_the_source() {
        let o = postcopy(Some("postcopy-paused"), Some("postcopy-paused"));
        assert_eq!(
            decide(PhaseName::Finish, None, &o),
            Decision::KeepSource {
                cancel_migration: true
            }
        );
    }

    #[test]
    fn early_phases_keep_source() {
        for p in [PhaseName::Begin, PhaseName::Prepare] {
            assert_eq!(
                decide(p, None, &obs()),
                Decision::KeepSource {
                    cancel_migration: false
                }
            );
        }
    }

    #[test]
    fn perform_completed_goes_on_as_finish() {
        let o = Observed {
            src_running: false,
            src_migration: Some("completed".into()),
            dst_alive: true,
            dst_migration: Some("completed".into()),
            ..obs()
        };
        assert_eq!(
            decide(PhaseName::Perform, None, &o),
            Decision::SwitchToDestination { cont_dst: true }
        );
    }

    #[test]
    fn perform_active_is_cancelled() {
        let o = Observed {
            src_migration: Some("active".into()),
            dst_alive: true,
            dst_migration: Some("active".into()),
            ..obs()
        };
        assert_eq!(
            decide(PhaseName::Perform, None, &o),
            Decision::KeepSource {
                cancel_migration: true
            }
        );
    }

    #[test]
    fn finish_never_resumes_dst_while_src_runs() {
        let o = Observed {
            src_running: true,
            dst_alive: true,
            dst_migration: Some("completed".into()),
            ..obs()
        };
        assert_eq!(
            decide(PhaseName::Finish, None, &o),
            Decision::KeepSource {
                cancel_migration: false
            }
        );
    }

    #[test]
    fn finish_dst_running_confirms() {
        let o = Observed {
            src_running: false,
            dst_alive: true,
            dst_running: true,
            ..obs()
        };
        assert_eq!(
            decide(PhaseName::Finish, None, &o),
            Decision::SwitchToDestination { cont_dst: false }
        );
    }

    #[test]
    fn finish_dst_gone_before_cont_resumes_src() {
        let o = Observed {
            src_running: false,
            src_migration: Some("completed".into()),
            ..obs()
        };
        assert_eq!(
            decide(PhaseName::Finish, None, &o),
            Decision::KeepSource {
                cancel_migration: false
            }
        );
    }

    #[test]
    fn finish_dst_gone_after_cont_intent_is_crashed_never_resumed() {
        let o = Observed {
            src_running: false,
            src_migration: Some("completed".into()),
            resume_sent: true,
            ..obs()
        };
        assert!(matches!(
            decide(PhaseName::Finish, None, &o),
            Decision::Crashed(_)
        ));
        // A destination that is still there is resumed, even when its
        // migration status no longer says completed: the intent proves it was.
        let alive = Observed {
            dst_alive: true,
            ..o.clone()
        };
        assert_eq!(
            decide(PhaseName::Finish, None, &alive),
            Decision::SwitchToDestination { cont_dst: true }
        );
        // Never killed on a guess: a source that runs again contradicts the
        // intent, and nothing is touched.
        let contradiction = Observed {
            src_running: true,
            ..alive
        };
        assert!(matches!(
            decide(PhaseName::Finish, None, &contradiction),
            Decision::LeaveAlone(_)
        ));
    }

    #[test]
    fn confirm_success_dst_dead_is_crashed_not_resumed() {
        let o = Observed {
            src_running: false,
            ..obs()
        };
        assert!(matches!(
            decide(PhaseName::Confirm, Some(Outcome::Success), &o),
            Decision::Crashed(_)
        ));
    }

    #[test]
    fn a_source_running_again_is_never_overruled() {
        let o = Observed {
            src_running: true,
            dst_alive: true,
            ..obs()
        };
        assert!(matches!(
            decide(PhaseName::Confirm, Some(Outcome::Success), &o),
            Decision::LeaveAlone(_)
        ));
        let both = Observed {
            dst_running: true,
            ..o
        };
        assert!(matches!(
            decide(PhaseName::Finish, None, &both),
            Decision::LeaveAlone(_)
        ));
    }

    #[test]
    fn a_recorded_crash_stays_crashed() {
        assert!(matches!(
            decide(PhaseName::Confirm, Some(Outcome::Crashed), &obs()),
            Decision::Crashed(_)
        ));
    }

    #[test]
    fn both_gone_is_lost() {
        let o = Observed::default();
        for p in PhaseName::ALL {
            let d = decide(p, Some(Outcome::Failure), &o);
            assert!(matches!(d, Decision::Lost(_)), "{p}: {d:?}");
        }
    }
}
