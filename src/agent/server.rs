//! The API socket: accept connections, check the peer ([`super::access`]),
//! read request lines (bounded), hand each request to [`super::ops`], write
//! the response line.
//!
//! Limits, so no client can hurt another or a running migration: request
//! size ([`MAX_REQUEST_BYTES`]), open connections (`max_connections`; one
//! more is answered `busy` and closed), idle time between requests
//! (`idle_timeout`), and [`WRITE_TIMEOUT`] for a client that stops reading
//! its answers. Every connection is its own task, and no lock is held while
//! waiting on a client.

use super::Agent;
use crate::api::{self, ApiError, ErrorKind, Request, Response, MAX_REQUEST_BYTES};
use futures::StreamExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio_util::codec::{AnyDelimiterCodec, AnyDelimiterCodecError, FramedRead};

/// A client that does not take its answer within this time is dropped.
pub const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub fn bind(path: &Path, group: &str) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        crate::fsutil::create_dir(dir, 0o755)?;
    }
    // A socket file left here is stale unless something answers on it
    // (another agent with another run dir but this socket path).
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        anyhow::bail!(
            "another process is serving {}; refusing to take it over",
            path.display()
        );
    }
    crate::fsutil::remove_file_if_exists(path)?;
    let l = UnixListener::bind(path)
        .map_err(|e| anyhow::anyhow!("binding API socket {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    // root:GROUP, as the socket unit does it.
    if let Ok(Some(g)) = nix::unistd::Group::from_name(group) {
        if let Err(e) = nix::unistd::chown(path, None, Some(g.gid)) {
            tracing::warn!(socket = %path.display(), group, error = %e, "cannot give the API socket to its group");
        }
    }
    Ok(l)
}

pub async fn serve(agent: Arc<Agent>, listener: UnixListener) -> anyhow::Result<()> {
    let policy = Arc::new(super::access::Policy::new(&agent.cfg.api_group));
    let slots = Arc::new(tokio::sync::Semaphore::new(agent.cfg.max_connections));
    // Refusals take a moment each (see `refuse`); bound them too, and
    // beyond that close at once.
    let refusals = Arc::new(tokio::sync::Semaphore::new(agent.cfg.max_connections));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: log, back off, keep serving.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let agent = agent.clone();
        // Who is it? Checked before a connection slot is taken, so callers
        // without access cannot crowd out those with it.
        let peer = {
            use std::os::fd::AsFd;
            super::access::Peer::of(stream.as_fd())
        };
        let denied = match &peer {
            Ok(p) => policy.check(p).err(),
            Err(e) => Some(format!("permission denied: {}", crate::error::chain(e))),
        };
        let refusal = if let Some(why) = denied {
            tracing::warn!(peer = ?peer.ok(), "API access refused: {why}");
            Some(ApiError::new(ErrorKind::PermissionDenied, why))
        } else {
            None
        };
        let slot = match refusal {
            Some(e) => Err(e),
            None => slots.clone().try_acquire_owned().map_err(|_| {
                let limit = agent.cfg.max_connections;
                tracing::warn!(limit, "API connection refused: too many open connections");
                ApiError::new(
                    ErrorKind::Busy,
                    format!("too many open connections to the agent (limit {limit}); try again"),
                )
            }),
        };
        let slot = match slot {
            Ok(s) => s,
            Err(e) => {
                // Answered by a bounded set of tasks; beyond that, closed.
                if let Ok(r) = refusals.clone().try_acquire_owned() {
                    tokio::spawn(async move {
                        let _r = r;
                        refuse(stream, e).await
                    });
                }
                continue;
            }
        };
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = connection(agent, stream).await {
                tracing::debug!(error = %e, "API connection ended with error");
            }
        });
    }
}

/// The request lines of a connection, as bytes (invalid UTF-8 is a bad
/// request, not a dead connection), at most [`MAX_REQUEST_BYTES`] each.
fn request_lines(
    r: tokio::net::unix::OwnedReadHalf,
) -> FramedRead<tokio::net::unix::OwnedReadHalf, AnyDelimiterCodec> {
    let codec =
        AnyDelimiterCodec::new_with_max_length(b"\n".to_vec(), Vec::new(), MAX_REQUEST_BYTES);
    FramedRead::new(r, codec)
}

/// Answer a connection that may not be served with `e`: read (and drop)
/// its first request, briefly, so the client is not cut off mid-write,
/// then answer and close. Nothing is executed.
async fn refuse(stream: UnixStream, e: ApiError) {
    let (r, mut w) = stream.into_split();
    let mut lines = request_lines(r);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), lines.next()).await;
    let _ = write_response(&mut w, &Response::err(e)).await;
}

async fn write_response(
    w: &mut tokio::net::unix::OwnedWriteHalf,
    r: &Response,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(r).map_err(std::io::Error::other)?;
    line.push(b'\n');
    tokio::time::timeout(WRITE_TIMEOUT, w.write_all(&line))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "client did not read its answer",
            )
        })?
}

async fn connection(agent: Arc<Agent>, stream: UnixStream) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut lines = request_lines(r);
    let idle = agent.cfg.idle_timeout;
    loop {
        let line = match tokio::time::timeout(idle, lines.next()).await {
            Ok(Some(l)) => l,
            Ok(None) => break,
            Err(_) => {
                tracing::debug!(secs = idle.as_secs(), "API connection idle; closing");
                break;
            }
        };
        let line = match line {
            Ok(l) => l,
            Err(AnyDelimiterCodecError::MaxChunkLengthExceeded) => {
                let e = ApiError::new(
                    ErrorKind::TooLarge,
                    format!("request too large: over the {MAX_REQUEST_BYTES}-byte limit"),
                );
                tracing::warn!("API request over {MAX_REQUEST_BYTES} bytes refused");
                write_response(&mut w, &Response::err(e)).await?;
                return Ok(());
            }
            Err(AnyDelimiterCodecError::Io(e)) => return Err(e),
        };
        let line = match std::str::from_utf8(&line) {
            Ok(l) => l.trim_end_matches('\r'),
            Err(e) => {
                let e = ApiError::new(
                    ErrorKind::BadRequest,
                    format!("malformed request: not UTF-8 ({e})"),
                );
                write_response(&mut w, &Response::err(e)).await?;
                continue;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        let req = match api::parse_request(line) {
            Ok(r) => r,
            Err(e) => {
                write_response(&mut w, &Response::err(e)).await?;
                continue;
            }
        };
        if let Request::Console { name } = &req {
            // Streaming call: answer, then hand the connection over.
            match agent.console_subscribe(name).await {
                Ok(rx) => {
                    let answer = Response::answer(&api::Streaming { streaming: true });
                    write_response(&mut w, &answer).await?;
                    if !answer.ok {
                        continue;
                    }
                    return stream_console(rx, w).await;
                }
                Err(e) => {
                    write_response(&mut w, &Response::err(e.to_api())).await?;
                    continue;
                }
            }
        }
        let op = req.op();
        let resp = match agent.handle(req).await {
            Ok(v) => Response::ok(v),
            Err(e) => {
                tracing::info!(op, "request failed: {}", crate::error::chain(&e));
                Response::err(e.to_api())
            }
        };
        write_response(&mut w, &resp).await?;
    }
    Ok(())
}

async fn stream_console(
    mut rx: tokio::sync::broadcast::Receiver<bytes::Bytes>,
    mut w: tokio::net::unix::OwnedWriteHalf,
) -> std::io::Result<()> {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        match rx.recv().await {
            Ok(b) if b.is_empty() => return Ok(()),
            Ok(b) => tokio::time::timeout(WRITE_TIMEOUT, w.write_all(&b))
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "console reader stuck")
                })??,
            Err(RecvError::Lagged(n)) => {
                tracing::debug!(missed = n, "console client too slow; skipped chunks");
            }
            Err(RecvError::Closed) => return Ok(()),
        }
    }
}
