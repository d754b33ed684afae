//! The console. Every instance's serial port is a QEMU file chardev
//! appending to one per-domain log under the state dir
//! (`-chardev file,path=<state>/console/<name>.log,append=on`). Each
//! instance of the domain appends to it in turn (the source's vCPUs stop
//! before the destination's start), so the log is whole across migrations
//! and while the agent is down, and nothing the agent does (or fails to do)
//! can stall the guest's serial port.
//!
//! Why not a socket chardev with `logfile=`: QEMU's chardev layer logs a
//! byte whose socket write returned EAGAIN as if the write had failed for
//! good, then the serial device retries it and it is logged again: a
//! doubled byte in the log whenever the reading client stalls for ~30 ms
//! (confirmed with strace on QEMU 7.2; 10.0 has the same code; see
//! docs/architecture.md).
//!
//! For live viewing the agent follows the file (inotify) and fans new
//! bytes out to `qlive console` clients through a [`ConsoleHub`].

use bytes::Bytes;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use tokio::io::unix::AsyncFd;
use tokio::sync::broadcast;

pub fn log_path(state_dir: &Path, name: &str) -> PathBuf {
    state_dir.join("console").join(format!("{name}.log"))
}

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("opening console log {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("watching console log {path}")]
    Watch {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
}

/// An inotify instance as tokio wants it (AsRawFd).
struct Watch(Inotify);

impl std::os::fd::AsRawFd for Watch {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd;
        self.0.as_fd().as_raw_fd()
    }
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
    /// end marker; the follower never sends empty chunks).
    pub fn end(&self) {
        let _ = self.tx.send(Bytes::new());
    }

    /// Follow `log` from its current end, forwarding what QEMU appends.
    /// Creates the file if needed. The task runs until aborted.
    pub fn follow(&self, log: &Path) -> Result<tokio::task::JoinHandle<()>, ConsoleError> {
        let path = log.to_path_buf();
        // Never through a symlink (nor a FIFO): the log lives in the agent's
        // state dir, and a link there must not make the agent create or
        // read a file elsewhere.
        let mut file =
            crate::fsutil::open_log_nofollow(&path, true).map_err(|e| ConsoleError::Open {
                path: path.clone(),
                source: std::io::Error::other(e),
            })?;
        let ino =
            Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).map_err(|source| {
                ConsoleError::Watch {
                    path: path.clone(),
                    source,
                }
            })?;
        ino.add_watch(&path, AddWatchFlags::IN_MODIFY)
            .map_err(|source| ConsoleError::Watch {
                path: path.clone(),
                source,
            })?;
        let mut pos = file
            .seek(SeekFrom::End(0))
            .map_err(|source| ConsoleError::Open {
                path: path.clone(),
                source,
            })?;
        // SAFETY: the Inotify (an OwnedFd inside) moves into the AsyncFd and
        // stays open, same number, until the AsyncFd is dropped.
        let afd =
            unsafe { AsyncFd::register_with_interest(Watch(ino), tokio::io::Interest::READABLE) }
                .map_err(|e| ConsoleError::Open {
                path: path.clone(),
                source: e.into(),
            })?;
        let tx = self.tx.clone();
        Ok(tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let Ok(mut guard) = afd.readable().await else {
                    break;
                };
                // Drain the events; the file is what matters.
                while afd.get_ref().0.read_events().is_ok_and(|e| !e.is_empty()) {}
                guard.clear_ready();
                loop {
                    match file.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            pos += n as u64;
                            let _ = tx.send(Bytes::copy_from_slice(&buf[..n]));
                        }
                        Err(e) => {
                            tracing::warn!(path = %path.display(), error = %e, "reading console log");
                            break;
                        }
                    }
                }
                // Truncated under us (by hand): start over from its end.
                if std::fs::metadata(&path).is_ok_and(|m| m.len() < pos) {
                    pos = file.seek(SeekFrom::End(0)).unwrap_or(0);
                }
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[tokio::test]
    async fn follows_appends_from_two_writers_in_order() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.log");
        std::fs::write(&p, b"before\n").unwrap();
        let hub = ConsoleHub::default();
        let mut rx = hub.subscribe();
        let task = hub.follow(&p).unwrap();
        // two "instances" appending in turn, as QEMU's append=on does
        for (i, chunk) in [&b"HB 1\nHB "[..], b"2\nHB 3\n"].iter().enumerate() {
            let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
            f.write_all(chunk).unwrap();
            drop(f);
            let _ = i;
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let mut got = Vec::new();
        while got.len() < 14 {
            let b = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
                .await
                .unwrap()
                .unwrap();
            got.extend_from_slice(&b);
        }
        assert_eq!(
            got, b"HB 1\nHB 2\nHB 3\n",
            "only new bytes, each once, in order"
        );
        task.abort();
    }
}
