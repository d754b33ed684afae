//! The API socket: accept connections, read request lines (bounded), hand
//! each request to [`super::ops`], write the response line.

use super::Agent;
use crate::api::{self, ApiError, ErrorKind, Request, Response, MAX_REQUEST_BYTES};
use futures::StreamExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio_util::codec::{AnyDelimiterCodec, AnyDelimiterCodecError, FramedRead};

pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
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
    Ok(l)
}

pub async fn serve(agent: Arc<Agent>, listener: UnixListener) -> anyhow::Result<()> {
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
        tokio::spawn(async move {
            if let Err(e) = connection(agent, stream).await {
                tracing::debug!(error = %e, "API connection ended with error");
            }
        });
    }
}

async fn write_response(
    w: &mut tokio::net::unix::OwnedWriteHalf,
    r: &Response,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(r).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await
}

async fn connection(agent: Arc<Agent>, stream: UnixStream) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    // Bytes, not String: invalid UTF-8 is a bad request, not a dead connection.
    let codec =
        AnyDelimiterCodec::new_with_max_length(b"\n".to_vec(), Vec::new(), MAX_REQUEST_BYTES);
    let mut lines = FramedRead::new(r, codec);
    while let Some(line) = lines.next().await {
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
                    write_response(
                        &mut w,
                        &Response::ok(serde_json::json!({"streaming": true})),
                    )
                    .await?;
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
                tracing::info!(op, "request failed: {}", super::error_chain(&e));
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
            Ok(b) => w.write_all(&b).await?,
            Err(RecvError::Lagged(n)) => {
                tracing::debug!(missed = n, "console client too slow; skipped chunks");
            }
            Err(RecvError::Closed) => return Ok(()),
        }
    }
}
