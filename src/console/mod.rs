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
use tokio::sync::broadcast;

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

    /// Connect to an instance's console socket and forward everything read
    /// to the hub until EOF (the instance exited). Returns once connected so
    /// the caller can `cont` knowing no early output goes unseen.
    pub async fn attach(&self, socket: &Path) -> std::io::Result<tokio::task::JoinHandle<()>> {
        let mut last = None;
        for _ in 0..50 {
            match tokio::net::UnixStream::connect(socket).await {
                Ok(mut s) => {
                    let tx = self.tx.clone();
                    return Ok(tokio::spawn(async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            match s.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    let _ = tx.send(Bytes::copy_from_slice(&buf[..n]));
                                }
                            }
                        }
                    }));
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
