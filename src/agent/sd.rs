//! systemd integration: socket activation, readiness and status
//! notifications, the watchdog. All of it is inert when the agent does not
//! run under systemd (no LISTEN_FDS, no NOTIFY_SOCKET, no WATCHDOG_USEC).

use std::os::fd::FromRawFd;
use std::time::Duration;
use systemd::daemon::{self, Listening, SocketType};

fn notify(pairs: &[(&str, &str)]) {
    if let Err(e) = daemon::notify(pairs.iter()) {
        tracing::debug!(error = %e, "sd_notify");
    }
}

pub fn ready(status: &str) {
    notify(&[(daemon::STATE_READY, "1"), (daemon::STATE_STATUS, status)]);
}

pub fn status(status: &str) {
    notify(&[(daemon::STATE_STATUS, status)]);
}

pub fn stopping() {
    notify(&[
        (daemon::STATE_STOPPING, "1"),
        (daemon::STATE_STATUS, "stopping; guests keep running"),
    ]);
}

/// The API socket passed by systemd (qlive.socket), if any: the first
/// LISTEN_FDS fd that is a listening unix stream socket.
pub fn activated_listener() -> Option<std::os::unix::net::UnixListener> {
    let fds = daemon::listen_fds().ok()?;
    for fd in fds.iter() {
        let is_unix = daemon::is_socket_unix(
            fd,
            Some(SocketType::Stream),
            Listening::IsListening,
            None::<&str>,
        );
        if matches!(is_unix, Ok(true)) {
            // SAFETY: systemd passed us this fd; we take ownership once.
            let l = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
            // Passed fds come without FD_CLOEXEC: keep it out of hooks and
            // probe children.
            let _ = nix::fcntl::fcntl(
                fd,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            );
            return Some(l);
        }
        tracing::warn!(
            fd,
            "ignoring a passed fd that is not a listening unix stream socket"
        );
    }
    None
}

/// Ping the watchdog at half its period for as long as the runtime runs
/// tasks: a wedged runtime stops the pings and systemd restarts the agent
/// (guests keep running: KillMode=process).
pub fn spawn_watchdog() {
    let usec = daemon::watchdog_enabled().unwrap_or(0);
    if usec == 0 {
        return;
    }
    let period = Duration::from_micros(usec / 2);
    tracing::info!(
        period_ms = period.as_millis() as u64,
        "systemd watchdog enabled"
    );
    tokio::spawn(async move {
        let mut t = tokio::time::interval(period);
        loop {
            t.tick().await;
            notify(&[(daemon::STATE_WATCHDOG, "1")]);
        }
    });
}
