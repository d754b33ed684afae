//! A client of the guest's qemu-guest-agent, through the domain's stable
//! socket (crate::instance::endpoint): one command per connection.
//!
//! The channel carries whatever an earlier client left unread, so every
//! call first synchronises with `guest-sync-delimited`: the guest agent
//! answers with a 0xFF byte (which makes it drop any partial input) and
//! then the id sent; lines before that are stale and skipped. Then the
//! command goes out and its one answer line comes back. The commands that
//! never answer when they succeed (`guest-shutdown`, the `guest-suspend-*`
//! family) return `null` once sent.
//!
//! QEMU serves one client of the socket at a time; a second one waits in
//! the listen backlog until the first disconnects, and times out here if
//! that takes too long.

use serde_json::Value;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// The longest answer line read (`guest-file-read` answers carry base64).
const MAX_LINE: usize = 16 << 20;

/// Commands the guest agent does not answer when they succeed.
const NO_ANSWER: &[&str] = &[
    "guest-shutdown",
    "guest-suspend-disk",
    "guest-suspend-ram",
    "guest-suspend-hybrid",
];

#[derive(Debug, thiserror::Error)]
pub enum QgaError {
    #[error("the command must be an object with a string `execute` (got {0})")]
    BadCommand(String),
    #[error("connecting to the guest agent's socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("talking to the guest agent")]
    Io(#[source] io::Error),
    #[error(
        "the guest agent did not answer within {secs} s (is qemu-guest-agent running in the \
         guest? another client may hold its socket)"
    )]
    Timeout { secs: u64 },
    #[error("the guest agent's channel closed before it answered")]
    Closed,
    #[error("the guest agent sent an answer over {MAX_LINE} bytes")]
    TooLong,
    #[error("the guest agent sent something that is not JSON: {line:?}")]
    Decode {
        line: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the guest agent refused the command: {class}: {desc}")]
    Guest { class: String, desc: String },
}

/// Send `command` (`{"execute": …, "arguments": …}`) to the guest agent at
/// `socket` and return its `return` value, all within `timeout`.
pub async fn execute(socket: &Path, command: &Value, timeout: Duration) -> Result<Value, QgaError> {
    let name = command
        .get("execute")
        .and_then(Value::as_str)
        .filter(|_| command.is_object())
        .ok_or_else(|| QgaError::BadCommand(short(command)))?
        .to_string();
    let secs = timeout.as_secs();
    tokio::time::timeout(timeout, talk(socket, command, &name))
        .await
        .map_err(|_| QgaError::Timeout { secs })?
}

async fn talk(socket: &Path, command: &Value, name: &str) -> Result<Value, QgaError> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|source| QgaError::Connect {
            path: socket.to_path_buf(),
            source,
        })?;
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let id = u64::from(std::process::id()) << 32 | u64::from(rand_u32());
    let sync = serde_json::json!({"execute": "guest-sync-delimited", "arguments": {"id": id}});
    send(&mut wr, &sync).await?;
    // Up to the delimiter, then the line that carries our id.
    let mut skipped = Vec::new();
    rd.read_until(0xff, &mut skipped)
        .await
        .map_err(QgaError::Io)?;
    if skipped.last() != Some(&0xff) {
        return Err(QgaError::Closed);
    }
    loop {
        let v = read_answer(&mut rd).await?;
        if v.get("return").and_then(Value::as_u64) == Some(id) {
            break;
        }
    }
    send(&mut wr, command).await?;
    if NO_ANSWER.contains(&name) {
        return Ok(Value::Null);
    }
    let v = read_answer(&mut rd).await?;
    if let Some(r) = v.get("return") {
        return Ok(r.clone());
    }
    let err = v.get("error").cloned().unwrap_or(Value::Null);
    Err(QgaError::Guest {
        class: err["class"].as_str().unwrap_or("?").to_string(),
        desc: err["desc"].as_str().unwrap_or("?").to_string(),
    })
}

async fn send(wr: &mut tokio::net::unix::OwnedWriteHalf, v: &Value) -> Result<(), QgaError> {
    let mut line = v.to_string().into_bytes();
    line.push(b'\n');
    wr.write_all(&line).await.map_err(QgaError::Io)
}

/// One JSON line; blank lines and stray delimiters are skipped.
async fn read_answer<R: tokio::io::AsyncBufRead + Unpin>(rd: &mut R) -> Result<Value, QgaError> {
    loop {
        let mut line = Vec::new();
        let n = rd
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .await
            .map_err(QgaError::Io)?;
        if n == 0 {
            return Err(QgaError::Closed);
        }
        if line.len() > MAX_LINE {
            return Err(QgaError::TooLong);
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_matches(|c: char| c.is_whitespace() || c == '\u{fffd}');
        if text.is_empty() {
            continue;
        }
        return serde_json::from_str(text).map_err(|source| QgaError::Decode {
            line: text.chars().take(200).collect(),
            source,
        });
    }
}

fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    // uuid's v4 generator is the crate's one randomness source already.
    b.copy_from_slice(&uuid::Uuid::new_v4().as_bytes()[..4]);
    u32::from_le_bytes(b)
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 80 {
        format!("{}…", s.chars().take(80).collect::<String>())
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A guest agent stand-in on a socket pair: what a real qemu-ga does
    /// with the sync, after stale output an earlier client left.
    async fn peer(answer: &'static str) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ga.sock");
        let l = tokio::net::UnixListener::bind(&p).unwrap();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let (rd, mut wr) = s.into_split();
            let mut rd = BufReader::new(rd);
            let mut line = String::new();
            rd.read_line(&mut line).await.unwrap();
            let v: Value = serde_json::from_str(&line).unwrap();
            let id = v["arguments"]["id"].clone();
            wr.write_all(b"{\"return\": {\"stale\": 1}}\n\xff")
                .await
                .unwrap();
            wr.write_all(format!("{{\"return\": {id}}}\n").as_bytes())
                .await
                .unwrap();
            line.clear();
            rd.read_line(&mut line).await.unwrap();
            wr.write_all(answer.as_bytes()).await.unwrap();
        });
        (d, p)
    }

    #[tokio::test]
    async fn syncs_past_stale_output_then_answers() {
        let (_d, p) = peer("{\"return\": {\"version\": \"7.2\"}}\n").await;
        let r = execute(
            &p,
            &serde_json::json!({"execute": "guest-info"}),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(r["version"], "7.2");
    }

    #[tokio::test]
    async fn a_guest_error_is_reported() {
        let (_d, p) =
            peer("{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"no such command\"}}\n")
                .await;
        let e = execute(
            &p,
            &serde_json::json!({"execute": "guest-nope"}),
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "the guest agent refused the command: CommandNotFound: no such command"
        );
    }

    #[tokio::test]
    async fn silence_times_out_and_bad_commands_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ga.sock");
        let _l = tokio::net::UnixListener::bind(&p).unwrap();
        let e = execute(
            &p,
            &serde_json::json!({"execute": "guest-ping"}),
            Duration::from_millis(200),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, QgaError::Timeout { .. }), "{e}");
        let e = execute(
            &p,
            &serde_json::json!(["guest-ping"]),
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, QgaError::BadCommand(_)), "{e}");
    }
}
