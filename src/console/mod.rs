//! The console. Every instance's serial port is a QEMU socket chardev
//! (`console.sock`, per instance) with QEMU's own `logfile=` pointing at one
//! per-domain log under the state dir (`<state>/console/<name>.log`,
//! `logappend=on`): each instance appends to it in turn, and QEMU writes it
//! whether or not anyone is connected, so the log stays whole while the
//! agent is down and across instances.
//!
//! For live viewing the agent connects to the instance's socket and fans the
//! bytes out to `qlive console` clients through a [`ConsoleHub`].

use bytes::Bytes;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::sync::{broadcast, watch};

pub fn log_path(state_dir: &Path, name: &str) -> PathBuf {
    state_dir.join("console").join(format!("{name}.log"))
}

/// Fan-out of one domain's live console bytes.
#[derive(Clone)]
pub struct ConsoleHub {
    tx: broadcast::Sender<Bytes>,
}

impl Default for ConsoleHub {
    fn default() -> Self {
        let (tx, _) = broadcast::channel(4096);
        ConsoleHub { tx }
    }
}

impl ConsoleHub {
    pub fn subscribe(&self) -> broadcast::Receiver<Bytes> {
        self.tx.subscribe()
    }

    /// The domain stopped: end every client's stream (an empty chunk is the
    /// end marker; readers never send empty chunks).
    pub fn end(&self) {
        let _ = self.tx.send(Bytes::new());
    }

    /// Connect to an instance's console socket and forward everything read
    /// to the hub until EOF (the instance exited). Returns once connected, so
    /// the caller can `cont` knowing no early output goes unseen.
    ///
    /// `after`: the reader of the instance this one replaces (migration).
    /// Bytes from the new instance are held back until the old reader hit
    /// EOF, so the stream has the old instance's last bytes first and no
    /// byte is reordered, lost or doubled at the hand-over.
    pub async fn attach(
        &self,
        socket: &Path,
        after: Option<ConsoleReader>,
    ) -> std::io::Result<ConsoleReader> {
        let mut last = None;
        for _ in 0..50 {
            match tokio::net::UnixStream::connect(socket).await {
                Ok(s) => {
                    let (done_tx, done_rx) = watch::channel(false);
                    tokio::spawn(forward(s, self.tx.clone(), after, done_tx));
                    return Ok(ConsoleReader { done: done_rx });
                }
                Err(e) => {
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("console connect failed")))
    }
}

/// Handle on a console reader task: tells when it reached EOF.
#[derive(Clone)]
pub struct ConsoleReader {
    done: watch::Receiver<bool>,
}

impl ConsoleReader {
    pub async fn wait_done(mut self) {
        let _ = self.done.wait_for(|d| *d).await;
    }

    pub fn is_done(&self) -> bool {
        *self.done.borrow()
    }
}

async fn forward(
    mut s: tokio::net::UnixStream,
    tx: broadcast::Sender<Bytes>,
    after: Option<ConsoleReader>,
    done: watch::Sender<bool>,
) {
    let mut held: Vec<u8> = Vec::new();
    let mut waiting = after.clone().filter(|a| !a.is_done());
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let read = match waiting.clone() {
            Some(prev) => tokio::select! {
                biased;
                _ = prev.wait_done() => {
                    waiting = None;
                    if !held.is_empty() {
                        let _ = tx.send(Bytes::from(std::mem::take(&mut held)));
                    }
                    continue;
                }
                r = s.read(&mut buf) => r,
            },
            None => s.read(&mut buf).await,
        };
        match read {
            Ok(0) | Err(_) => break,
            Ok(n) if waiting.is_some() => held.extend_from_slice(&buf[..n]),
            Ok(n) => {
                let _ = tx.send(Bytes::copy_from_slice(&buf[..n]));
            }
        }
    }
    let _ = done.send(true);
}
