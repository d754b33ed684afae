//! Follow a domain's console log and timestamp each heartbeat line as it
//! arrives (inotify on the file QEMU appends to), to measure the pause a
//! guest shows the outside world: the largest gap between two heartbeat
//! arrivals. The log is written by whichever QEMU runs the guest, so the
//! measurement is the same for qlive, a hand-driven migration or a full
//! copy, and independent of the agent's console relay.
#![allow(dead_code)]

use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct HbWatch {
    stop: Arc<AtomicBool>,
    arrivals: Arc<Mutex<Vec<(Instant, u64)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The largest gap in a window, and the heartbeats on either side.
#[derive(Debug, Clone, Copy)]
pub struct Gap {
    pub ms: f64,
    pub before: u64,
    pub after: u64,
}

impl HbWatch {
    /// Start following `log` from its current end.
    pub fn start(log: &Path) -> std::io::Result<HbWatch> {
        let path: PathBuf = log.to_path_buf();
        let mut file = std::fs::File::open(&path)?;
        file.seek(SeekFrom::End(0))?;
        // SAFETY: plain syscalls; the fd is owned right away.
        let ifd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
        if ifd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: inotify_init1 returned a new fd.
        let ifd = unsafe { OwnedFd::from_raw_fd(ifd) };
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(std::io::Error::other)?;
        // SAFETY: valid fd and NUL-terminated path.
        if unsafe { libc::inotify_add_watch(ifd.as_raw_fd(), c.as_ptr(), libc::IN_MODIFY) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stop = Arc::new(AtomicBool::new(false));
        let arrivals = Arc::new(Mutex::new(Vec::with_capacity(1 << 16)));
        let (s2, a2) = (stop.clone(), arrivals.clone());
        let thread = std::thread::spawn(move || {
            let mut partial = Vec::new();
            let mut buf = vec![0u8; 1 << 16];
            let mut ev = [0u8; 4096];
            while !s2.load(Ordering::Relaxed) {
                let mut pfd = libc::pollfd {
                    fd: ifd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                let r = unsafe { libc::poll(&mut pfd, 1, 50) };
                if r <= 0 {
                    continue;
                }
                let now = Instant::now();
                // SAFETY: reading events into a local buffer.
                while unsafe { libc::read(ifd.as_raw_fd(), ev.as_mut_ptr().cast(), ev.len()) } > 0 {
                }
                loop {
                    let n = file.read(&mut buf).unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    partial.extend_from_slice(&buf[..n]);
                }
                let mut got = Vec::new();
                while let Some(i) = partial.iter().position(|c| *c == b'\n') {
                    let line: Vec<u8> = partial.drain(..=i).collect();
                    if let Some(n) = std::str::from_utf8(&line)
                        .ok()
                        .and_then(|l| l.trim_end().strip_prefix("HB "))
                        .and_then(|n| n.parse::<u64>().ok())
                    {
                        got.push((now, n));
                    }
                }
                if !got.is_empty() {
                    a2.lock().unwrap_or_else(|e| e.into_inner()).extend(got);
                }
            }
        });
        Ok(HbWatch {
            stop,
            arrivals,
            thread: Some(thread),
        })
    }

    pub fn last_seq(&self) -> Option<u64> {
        self.arrivals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last()
            .map(|a| a.1)
    }

    /// Wait until a heartbeat newer than `seq` has arrived.
    pub fn wait_past(&self, seq: u64, timeout: Duration) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if self.last_seq().is_some_and(|s| s > seq) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    /// Largest gap between consecutive heartbeat arrivals in [from, to].
    pub fn max_gap(&self, from: Instant, to: Instant) -> Option<Gap> {
        let a = self.arrivals.lock().unwrap_or_else(|e| e.into_inner());
        // include the last arrival before `from` so a gap spanning it counts
        let start = a.iter().rposition(|(t, _)| *t < from).unwrap_or(0);
        let mut best: Option<Gap> = None;
        for w in a[start..].windows(2) {
            if w[0].0 > to {
                break;
            }
            let ms = w[1].0.duration_since(w[0].0).as_secs_f64() * 1e3;
            if best.is_none_or(|b| ms > b.ms) {
                best = Some(Gap {
                    ms,
                    before: w[0].1,
                    after: w[1].1,
                });
            }
        }
        best
    }
}

impl Drop for HbWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
