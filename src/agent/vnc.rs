//! The VNC console's stable socket: the agent accepts on it and hands each
//! connection to the domain's running instance (QMP `getfd` with the
//! connection as SCM_RIGHTS, then `add_client protocol=vnc`). QEMU runs
//! `-vnc none`: it never binds a path, so no migration, failed or not, and
//! no agent restart changes where a client connects. During a migration
//! connections go to the source; the source's clients end at switchover
//! and reconnect to the destination at the same path. The instance holds
//! the listening fd too (`cmdline::vnc_fd`), so connections queue while the
//! agent restarts, and the new agent takes it back (crate::instance::endpoint).

use super::{Agent, Domain, Run};
use crate::instance::endpoint::Endpoints;
use crate::instance::Instance;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

impl Agent {
    /// Serve the domain's VNC socket for this run (once per run: at start
    /// and at re-adoption). The task ends when the run's endpoints are
    /// dropped (every instance of the run is gone).
    pub(super) fn serve_vnc(self: &Arc<Self>, dom: &Arc<Domain>, inst: &Arc<Instance>) {
        let Some(ep) = &inst.endpoints.vnc else {
            return;
        };
        let listener = match ep
            .as_fd()
            .try_clone_to_owned()
            .map(std::os::unix::net::UnixListener::from)
            .and_then(|l| {
                l.set_nonblocking(true)?;
                tokio::net::UnixListener::from_std(l)
            }) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(domain = %dom.name, error = %e, "VNC socket not served");
                return;
            }
        };
        let endpoints: Weak<Endpoints> = Arc::downgrade(&inst.endpoints);
        let dom = dom.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    r = listener.accept() => match r {
                        Ok((conn, _)) => hand_over(&dom, conn).await,
                        Err(e) => {
                            tracing::warn!(domain = %dom.name, error = %e, "VNC accept");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    },
                    _ = tick.tick() => {
                        if endpoints.strong_count() == 0 {
                            break;
                        }
                    }
                }
            }
        });
    }
}

/// Give one accepted connection to the running instance; dropped (the
/// client sees it close) when none runs or QEMU refuses it.
async fn hand_over(dom: &Domain, conn: tokio::net::UnixStream) {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let inst = match &dom.state.lock().await.run {
        Run::Running(i) => i.clone(),
        _ => return,
    };
    let fdname = format!("qlive-vnc-{}", SEQ.fetch_add(1, Ordering::Relaxed));
    let res = async {
        inst.qmp.getfd(&fdname, conn.as_fd()).await?;
        inst.qmp
            .execute_raw(
                "add_client",
                Some(serde_json::json!({"protocol": "vnc", "fdname": fdname, "skipauth": true})),
            )
            .await
    }
    .await;
    if let Err(e) = res {
        tracing::warn!(domain = %dom.name, domid = inst.domid(), error = %crate::error::chain(&e), "VNC client not handed over");
    }
}
