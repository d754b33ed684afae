//! The three ways a migration ends, each written once and used both by the
//! live path ([`super::engine::migrate`]) and by recovery
//! ([`super::engine::recover`]):
//!
//! - [`keep_source`]: the destination dies first, then the source runs as it
//!   did before the job;
//! - [`switch_to_destination`]: the source dies (or is stopped) first, then
//!   the destination runs and becomes the domain's instance (the swap);
//! - [`crash`]: the destination may have run and is gone: nothing may run
//!   the guest again until an operator acknowledges it.
//!
//! Each keeps the safety invariant: the instance that is to run is resumed
//! only once the other is proven dead or stopped.

use super::engine::Host;
use super::hooks::{self, HookEnv};
use crate::instance::paths::InstancePaths;
use crate::instance::{self, Instance, InstanceRecord};
use std::sync::Arc;
use std::time::Duration;

/// How long a killed QEMU gets to be reaped.
pub const KILL_WAIT: Duration = Duration::from_secs(10);
/// How long a source that lost gets to quit before SIGKILL.
pub const QUIT_GRACE: Duration = Duration::from_secs(5);

/// What the losing destination left: its process, or only its slot.
pub struct Destination<'a> {
    pub instance: Option<Arc<Instance>>,
    pub paths: Option<&'a InstancePaths>,
    /// Prepare hooks may have run: `release` is owed.
    pub hooks: Option<HookEnv>,
}

/// Keep the source. The destination leaves the remote table and dies
/// (killed through its pidfd, or through its pidfile when it was spawned
/// but never recorded), its paths go, the release hooks run, and the
/// source is resumed if it ran when the job began. `cancel_migration`: an
/// outgoing migration may still be in flight on the source.
pub async fn keep_source<H: Host>(
    host: &H,
    src: &Arc<Instance>,
    dst: Destination<'_>,
    src_was_running: bool,
    cancel_migration: bool,
) {
    let name = host.name();
    if cancel_migration {
        super::cancel_outgoing(&src.qmp).await;
    }
    host.take_remote();
    if let Some(d) = &dst.instance {
        d.kill("migration failed: source kept", KILL_WAIT).await;
    }
    if let Some(p) = dst.paths {
        instance::kill_unrecorded(name, &p.dir).await;
        instance::cleanup_paths(p);
    }
    // Nobody else reads the taps now: their frames go to the source
    // again, with what the destination's queues held.
    src.take_traffic();
    if let Some(env) = &dst.hooks {
        hooks::release(host.hooks_dir(), env).await;
    }
    // The destination is dead: resuming the source is safe.
    if src_was_running {
        match src.qmp.status().await {
            Ok((false, status)) => {
                tracing::info!(domain = %name, %status, "resuming the source");
                src.set_tap_owner(true);
                if let Err(e) = src.qmp.cont().await {
                    tracing::error!(
                        domain = %name,
                        "resuming the source: {}",
                        crate::error::chain(&e)
                    );
                }
            }
            Ok((true, _)) => {}
            Err(e) => tracing::error!(domain = %name, "source status: {}", crate::error::chain(&e)),
        }
    }
    host.commit(src).await;
}

/// The source that loses a switch: held, or only recorded (it died).
pub enum Source<'a> {
    Held(Arc<Instance>),
    Gone(&'a InstanceRecord),
}

/// How the switch is made.
pub enum Switch {
    /// The live path: the destination runs already (`cont` was sent after
    /// the source was proven stopped). The swap comes first, then the source
    /// is asked to quit.
    Live,
    /// Recovery: the source is killed first (SIGKILL, waited for), so it is
    /// dead before the destination runs; then the destination is resumed
    /// unless it runs, and committed.
    Recovery,
}

/// Switch to the destination; see [`Switch`]. `false`: the destination
/// died before it could be committed; it may have run the guest, so the
/// domain was made crashed ([`crash`]) and the caller records it.
pub async fn switch_to_destination<H: Host>(
    host: &H,
    src: Source<'_>,
    dst: &Arc<Instance>,
    how: Switch,
) -> bool {
    let name = host.name();
    let why = format!("migrated to domid {}", dst.domid());
    if let Switch::Recovery = how {
        match &src {
            Source::Held(s) => s.kill(why.clone(), KILL_WAIT).await,
            Source::Gone(rec) => instance::cleanup_paths(&rec.paths),
        }
        // The source is dead: frames to the destination, with what the
        // source's queues still held.
        dst.take_traffic();
        match dst.qmp.status().await {
            Ok((true, _)) => {}
            Ok((false, status)) => {
                tracing::info!(domain = %name, %status, "resuming the destination");
                dst.set_tap_owner(true);
                if let Err(e) = dst.qmp.cont().await {
                    tracing::error!(
                        domain = %name,
                        "resuming the destination: {}",
                        crate::error::chain(&e)
                    );
                }
            }
            Err(e) => tracing::error!(
                domain = %name,
                "destination status: {}",
                crate::error::chain(&e)
            ),
        }
    }
    if !host.commit(dst).await {
        let instances = match src {
            Source::Held(s) => vec![s],
            Source::Gone(_) => vec![],
        };
        crash(
            host,
            instances,
            vec![&dst.record.paths],
            None,
            "the destination QEMU died right after it was resumed".into(),
        )
        .await;
        return false;
    }
    match src {
        Source::Held(s) => {
            s.set_exit_intent(why);
            if let Err(e) = s.terminate(QUIT_GRACE).await {
                tracing::error!(
                    domain = %name,
                    "quitting the source: {}",
                    crate::error::chain(&e)
                );
            }
        }
        Source::Gone(rec) => instance::cleanup_paths(&rec.paths),
    }
    // Normally empty: the source's queues drained before `migrate`; a
    // frame a guest that stopped reading left there goes to the new one.
    dst.take_traffic();
    true
}

/// The destination may have run the guest and is gone or unusable: kill
/// every instance (the source's device state is older than the guest's
/// memory, so resuming it would corrupt the guest), release the hooks and
/// report the domain crashed with the reason. The job file stays, recording
/// the crash, until an operator runs `qlive destroy`.
pub async fn crash<H: Host>(
    host: &H,
    instances: Vec<Arc<Instance>>,
    paths: Vec<&InstancePaths>,
    hooks: Option<HookEnv>,
    reason: String,
) {
    let name = host.name();
    tracing::error!(domain = %name, %reason, "guest crashed during migration; it is not run again until `qlive destroy {name}`");
    host.take_remote();
    for i in instances {
        i.kill("crashed during migration", KILL_WAIT).await;
    }
    for p in paths {
        instance::kill_unrecorded(name, &p.dir).await;
        instance::cleanup_paths(p);
    }
    if let Some(env) = &hooks {
        hooks::release(host.hooks_dir(), env).await;
    }
    host.crashed(reason).await;
}
