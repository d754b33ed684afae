//! Adoption benchmark (`make bench-adopt`, or `cargo bench --bench adopt`):
//! `qlive adopt` taking over a QEMU that qlive did not start, by a live
//! migration that copies the guest's RAM into qlive's memfd (no
//! x-ignore-shared), with and without post-copy.
//!
//! Guests, each started by hand as a user would (tests/adopt.rs does the
//! same): `-accel tcg -machine q35 -smp 1 -nodefaults -nographic`, the test
//! guest (tests/guest), `-serial file:`, `-qmp unix:`, no NIC, no disk:
//!
//! - `idle`: 512 MiB, `qlive.pattern_mib=64`, no dirtying;
//! - `busy`: 2 GiB, `qlive.pattern_mib=512` (QLIVE_BENCH_ADOPT_BUSY_PATTERN_MIB)
//!   `qlive.dirty_mib_per_s=1000` (QLIVE_BENCH_ADOPT_DIRTY_MIB)
//!   `qlive.slice_us=800` (QLIVE_BENCH_ADOPT_SLICE_US): the guest's work
//!   budget raised from 200 µs per heartbeat so that it dirties about
//!   800 MiB/s under TCG here instead of about 270. `qlive.stats=1`: the
//!   rate it reached is printed from its `STAT` lines.
//!
//! The foreign QEMU is 10.0 (target/qemu-new; QLIVE_BENCH_ADOPT_QEMU=7.2
//! or a path for another). Not 7.2: under TCG, QEMU before 9.0 loses
//! dirty bits of pages the vCPU writes while pre-copy syncs its bitmap
//! (fixed upstream by 03bfc2188f "physmem: Fix migration dirty bitmap
//! coherency with TCG memory access"), so a busy guest copied out of a 7.2
//! source, by qlive or by plain QEMU alike, now and then arrives with stale
//! pages and oopses. KVM tracks dirty pages itself and is not affected.
//!
//! qlive lifts QEMU's bandwidth cap for a copy. QLIVE_BENCH_ADOPT_BANDWIDTH
//! (bytes/s) puts one back on pre-copy (the agent's test knob
//! QLIVE_TEST_MAX_BANDWIDTH; post-copy stays uncapped), e.g. 134217728 for
//! QEMU's own default of 128 MiB/s, under which the busy guest's pre-copy
//! does not converge.
//!
//! Modes (`qlive adopt NAME --qmp SOCKET --postcopy M --timeout T --json`
//! through a real agent):
//!
//! - `never`: pre-copy only;
//! - `always`: post-copy after the first full pre-copy pass;
//! - `immediately`: post-copy right away (the agent runs with
//!   `QLIVE_TEST_POSTCOPY_AT_START=1`, plus `--postcopy always`): the
//!   baseline the design notes compare against;
//! - `auto`: the default;
//! - `floor` (not in the default list): not qlive; the benchmark migrates
//!   the same guest itself, plain QEMU to a plain QEMU started with
//!   `-incoming`, pre-copy, the bandwidth as qlive sets it: what QEMU
//!   alone takes, and a check of the pause measurement without the agent.
//!
//! Every run gets a fresh foreign QEMU (adoption consumes it) and the same
//! bound T (QLIVE_BENCH_ADOPT_TIMEOUT_S, default 200) as `--timeout`. A
//! pre-copy that does not converge within T fails with a timeout: that is
//! a result row ("did not converge"), checked to have left the guest
//! running on the old QEMU, not a failure of the benchmark.
//!
//! Guest-visible pause: the guest's serial output goes to the foreign
//! QEMU's `-serial file:` until the switchover and to qlive's console log
//! (`<state>/console/<name>.log`) afterwards. One inotify thread follows
//! both files and timestamps each heartbeat line on arrival; the pause is
//! the arrival of the first heartbeat in qlive's log (with a sequence
//! number past the foreign file's last) minus the arrival of the last one
//! in the foreign file. `maxgap` is the largest gap between heartbeat
//! arrivals over the whole adoption (both files, in sequence order): it
//! also shows the guest slowed by pre-copy dirty tracking or stalled on
//! post-copy page faults after the switchover. Both files are scanned for
//! `CORRUPT` and `GUEST-ERROR` lines, kernel oopses and panics, and the
//! new one for the guest booting again: a memory pattern error after a
//! copy migration is a real bug and is printed loudly.
//!
//! After each run the domain is destroyed and undefined and the foreign
//! QEMU killed if it still lives (guards, also when the benchmark fails).
//!
//! Env: QLIVE_BENCH_RUNS (3), QLIVE_BENCH_ADOPT_GUESTS ("idle,busy"),
//! QLIVE_BENCH_ADOPT_MODES ("never,always,immediately,auto"; also
//! "floor"), QLIVE_BENCH_ADOPT_TIMEOUT_S (200), QLIVE_BENCH_ADOPT_DIRTY_MIB
//! (1000), QLIVE_BENCH_ADOPT_SLICE_US (800),
//! QLIVE_BENCH_ADOPT_BUSY_PATTERN_MIB (512), QLIVE_BENCH_ADOPT_BANDWIDTH
//! (0: none), QLIVE_BENCH_ADOPT_QEMU ("10.0", "7.2" or a path),
//! QLIVE_GUEST_DIR (the test guest, default target/guest), QLIVE_NEW_QEMU.

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The agent's test knob: start post-copy right away, before any pass.
const POSTCOPY_AT_START_ENV: &str = "QLIVE_TEST_POSTCOPY_AT_START";
/// The agent's test knob: cap the source's (pre-copy) bandwidth.
const MAX_BANDWIDTH_ENV: &str = "QLIVE_TEST_MAX_BANDWIDTH";
/// `floor` without a cap: the rate qlive sets for a copy (64 GiB/s, which
/// no local socket reaches).
const UNCAPPED: u64 = 64 << 30;

fn env_or<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(d)
}

fn env_list(k: &str, d: &str) -> Vec<String> {
    std::env::var(k)
        .unwrap_or_else(|_| d.into())
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

struct Config {
    runs: usize,
    guests: Vec<Guest>,
    modes: Vec<Mode>,
    timeout_s: u64,
    dirty_mib: u64,
    slice_us: u64,
    busy_pattern_mib: u64,
    /// Cap on the pre-copy bandwidth (bytes/s), 0: none. qlive lifts
    /// QEMU's cap for a copy; the agent's test knob puts one back.
    bandwidth: u64,
    /// The foreign QEMU (and the floor's destination).
    emulator: PathBuf,
}

impl Config {
    fn from_env() -> Config {
        let guests = env_list("QLIVE_BENCH_ADOPT_GUESTS", "idle,busy")
            .iter()
            .map(|g| Guest::parse(g).unwrap_or_else(|| panic!("unknown guest {g:?} (idle, busy)")))
            .collect();
        let modes = env_list("QLIVE_BENCH_ADOPT_MODES", "never,always,immediately,auto")
            .iter()
            .map(|m| {
                Mode::parse(m).unwrap_or_else(|| {
                    panic!("unknown mode {m:?} (never, always, immediately, auto, floor)")
                })
            })
            .collect();
        Config {
            runs: env_or("QLIVE_BENCH_RUNS", 3).max(1),
            guests,
            modes,
            timeout_s: env_or("QLIVE_BENCH_ADOPT_TIMEOUT_S", 200),
            dirty_mib: env_or("QLIVE_BENCH_ADOPT_DIRTY_MIB", 1000),
            slice_us: env_or("QLIVE_BENCH_ADOPT_SLICE_US", 800),
            busy_pattern_mib: env_or("QLIVE_BENCH_ADOPT_BUSY_PATTERN_MIB", 512),
            bandwidth: env_or("QLIVE_BENCH_ADOPT_BANDWIDTH", 0),
            emulator: match std::env::var("QLIVE_BENCH_ADOPT_QEMU").as_deref() {
                Ok("7.2") => PathBuf::from(SYSTEM_QEMU),
                Ok("10.0") | Err(_) => new_qemu(),
                Ok(p) => PathBuf::from(p),
            },
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Guest {
    Idle,
    Busy,
}

impl Guest {
    fn parse(s: &str) -> Option<Guest> {
        match s {
            "idle" => Some(Guest::Idle),
            "busy" => Some(Guest::Busy),
            _ => None,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Guest::Idle => "idle",
            Guest::Busy => "busy",
        }
    }

    fn memory_mib(self) -> u64 {
        match self {
            Guest::Idle => 512,
            Guest::Busy => 2048,
        }
    }

    fn append(self, cfg: &Config) -> String {
        let base = "console=ttyS0 quiet panic=-1 no_timer_check";
        match self {
            Guest::Idle => format!("{base} qlive.pattern_mib=64"),
            Guest::Busy => format!(
                "{base} qlive.pattern_mib={} qlive.dirty_mib_per_s={} qlive.slice_us={} qlive.stats=1",
                cfg.busy_pattern_mib, cfg.dirty_mib, cfg.slice_us
            ),
        }
    }

    fn describe(self, cfg: &Config) -> String {
        match self {
            Guest::Idle => "512 MiB, pattern 64 MiB, no dirtying".into(),
            Guest::Busy => format!(
                "2 GiB, pattern {} MiB, qlive.dirty_mib_per_s={} qlive.slice_us={}",
                cfg.busy_pattern_mib, cfg.dirty_mib, cfg.slice_us
            ),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Never,
    Always,
    Immediately,
    Auto,
    /// Not qlive: the benchmark's own plain QEMU copy migration.
    Floor,
}

impl Mode {
    fn parse(s: &str) -> Option<Mode> {
        match s {
            "never" => Some(Mode::Never),
            "always" => Some(Mode::Always),
            "immediately" => Some(Mode::Immediately),
            "auto" => Some(Mode::Auto),
            "floor" => Some(Mode::Floor),
            _ => None,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Mode::Never => "never",
            Mode::Always => "always",
            Mode::Immediately => "immediately",
            Mode::Auto => "auto",
            Mode::Floor => "floor",
        }
    }

    /// The `--postcopy` argument.
    fn postcopy_arg(self) -> &'static str {
        match self {
            Mode::Never => "never",
            Mode::Always | Mode::Immediately => "always",
            Mode::Auto | Mode::Floor => "auto",
        }
    }

    /// The agent's environment for this mode.
    fn agent_env(self, cfg: &Config) -> Vec<(&'static str, String)> {
        let mut env = vec![];
        if self == Mode::Immediately {
            env.push((POSTCOPY_AT_START_ENV, "1".to_string()));
        }
        if cfg.bandwidth > 0 {
            env.push((MAX_BANDWIDTH_ENV, cfg.bandwidth.to_string()));
        }
        env
    }
}

// ---------------------------------------------------------- the foreign QEMU

/// A QEMU started by hand, as a user would; killed on drop if still alive.
struct Foreign {
    child: Child,
    qmp: PathBuf,
    console: PathBuf,
    stderr: PathBuf,
}

impl Drop for Foreign {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Foreign {
    fn start(dir: &Path, tag: &str, guest: Guest, cfg: &Config) -> Foreign {
        Foreign::spawn(dir, tag, guest, cfg, None)
    }

    /// With `incoming`: a plain destination QEMU (`-incoming unix:PATH`)
    /// for the benchmark's own migration (mode `floor`).
    fn spawn(
        dir: &Path,
        tag: &str,
        guest: Guest,
        cfg: &Config,
        incoming: Option<&Path>,
    ) -> Foreign {
        let g = guest_image();
        let qmp = dir.join(format!("{tag}.qmp"));
        let console = dir.join(format!("{tag}.console"));
        let stderr = dir.join(format!("{tag}.stderr"));
        let mut cmd = Command::new(&cfg.emulator);
        cmd.args(["-accel", "tcg", "-machine", "q35", "-smp", "1", "-m"])
            .arg(guest.memory_mib().to_string())
            .arg("-kernel")
            .arg(&g.kernel)
            .arg("-initrd")
            .arg(&g.initrd)
            .arg("-append")
            .arg(guest.append(cfg))
            .args(["-nographic", "-nodefaults", "-serial"])
            .arg(format!("file:{}", console.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"));
        if let Some(sock) = incoming {
            cmd.arg("-incoming").arg(format!("unix:{}", sock.display()));
        }
        let mut f = Foreign {
            child: cmd.spawn().expect("spawn QEMU"),
            qmp,
            console,
            stderr,
        };
        let t0 = Instant::now();
        while !f.qmp.exists() {
            if let Ok(Some(st)) = f.child.try_wait() {
                panic!("QEMU {tag} exited ({st}): {}", f.stderr_text());
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "no QMP socket for {tag}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        f
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn console_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.console).unwrap_or_default()).into_owned()
    }

    /// Wait until `needle` is on the guest's console.
    fn wait_console(&mut self, needle: &str, timeout: Duration) -> Result<(), String> {
        let t0 = Instant::now();
        while !self.console_text().contains(needle) {
            if !self.alive() {
                return Err(format!("QEMU exited: {}", self.stderr_text()));
            }
            if t0.elapsed() > timeout {
                return Err(format!("{needle:?} not on the console within {timeout:?}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// `query-status` over the QMP socket (the agent must have let go of it).
    fn status(&self) -> Result<String, String> {
        let mut q = QmpConn::connect(&self.qmp)?;
        let st = q.execute("query-status", None)?;
        st["status"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| st.to_string())
    }

    /// The guest's dirtying rate (MiB/s) from its last few `STAT` lines.
    fn dirty_rate_mib_s(&self) -> Option<f64> {
        let text = self.console_text();
        let v: Vec<f64> = text
            .lines()
            .filter(|l| l.starts_with("STAT "))
            .filter_map(|l| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix("dirtied="))
                    .and_then(|n| n.parse::<f64>().ok())
            })
            .collect();
        let last = &v[v.len().saturating_sub(3)..];
        (!last.is_empty() && last.iter().any(|d| *d > 0.0))
            .then(|| median(last) * 4096.0 / (1024.0 * 1024.0))
    }
}

/// A minimal blocking QMP client (one command at a time, events skipped).
struct QmpConn {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl QmpConn {
    fn connect(path: &Path) -> Result<QmpConn, String> {
        let s = UnixStream::connect(path).map_err(|e| format!("connect QMP: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok();
        let w = s.try_clone().map_err(|e| e.to_string())?;
        let mut q = QmpConn {
            w,
            r: BufReader::new(s),
        };
        let mut line = String::new();
        q.r.read_line(&mut line)
            .map_err(|e| format!("no QMP greeting: {e}"))?;
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    /// The command's `return`, or its error as text.
    fn execute(&mut self, cmd: &str, args: Option<Value>) -> Result<Value, String> {
        let mut req = json!({ "execute": cmd });
        if let Some(a) = args {
            req["arguments"] = a;
        }
        writeln!(self.w, "{req}").map_err(|e| format!("{cmd}: {e}"))?;
        loop {
            let mut l = String::new();
            if self
                .r
                .read_line(&mut l)
                .map_err(|e| format!("{cmd}: {e}"))?
                == 0
            {
                return Err(format!("{cmd}: QMP closed"));
            }
            let v: Value = serde_json::from_str(&l).map_err(|e| format!("{cmd}: {e}"))?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(e) = v.get("error") {
                return Err(format!("{cmd}: {e}"));
            }
            return Ok(v["return"].clone());
        }
    }
}

// ------------------------------------------- heartbeats across the two files

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Src {
    /// The foreign QEMU's `-serial file:`.
    Foreign,
    /// qlive's console log of the adopted domain.
    Qlive,
}

#[derive(Clone, Copy, Debug)]
struct Arrival {
    t: Instant,
    src: Src,
    seq: u64,
}

/// Follows the foreign console file and qlive's console log (which need
/// not exist yet) with one inotify thread, timestamping every heartbeat
/// line on arrival. The foreign file is followed from its current end,
/// qlive's log from its start.
struct SplitWatch {
    stop: Arc<AtomicBool>,
    arrivals: Arc<Mutex<Vec<Arrival>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Follow {
    src: Src,
    path: PathBuf,
    file: Option<std::fs::File>,
    partial: Vec<u8>,
}

impl Follow {
    /// Read what is new; heartbeat lines become arrivals at `now`.
    fn drain(&mut self, now: Instant, buf: &mut [u8], out: &mut Vec<Arrival>) {
        if self.file.is_none() {
            self.file = std::fs::File::open(&self.path).ok();
        }
        let Some(f) = self.file.as_mut() else {
            return;
        };
        loop {
            match f.read(buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => self.partial.extend_from_slice(&buf[..n]),
            }
        }
        while let Some(i) = self.partial.iter().position(|c| *c == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=i).collect();
            if let Some(seq) = std::str::from_utf8(&line)
                .ok()
                .and_then(|l| l.trim_end().strip_prefix("HB "))
                .and_then(|n| n.parse::<u64>().ok())
            {
                out.push(Arrival {
                    t: now,
                    src: self.src,
                    seq,
                });
            }
        }
    }
}

fn inotify_watch(ifd: &OwnedFd, path: &Path, mask: u32) -> std::io::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(std::io::Error::other)?;
    // SAFETY: valid fd and NUL-terminated path.
    if unsafe { libc::inotify_add_watch(ifd.as_raw_fd(), c.as_ptr(), mask) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl SplitWatch {
    fn start(foreign: &Path, qlive_log: &Path) -> std::io::Result<SplitWatch> {
        let mut ffile = std::fs::File::open(foreign)?;
        ffile.seek(SeekFrom::End(0))?;
        // SAFETY: plain syscall; the fd is owned right away.
        let ifd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
        if ifd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: inotify_init1 returned a new fd.
        let ifd = unsafe { OwnedFd::from_raw_fd(ifd) };
        inotify_watch(&ifd, foreign, libc::IN_MODIFY)?;
        // qlive's log may not exist yet: watch its directory (the agent
        // creates <state>/console at startup), which reports both the
        // file's creation and writes to it.
        let dir = qlive_log.parent().unwrap_or(Path::new("/"));
        inotify_watch(&ifd, dir, libc::IN_CREATE | libc::IN_MODIFY)?;
        let mut follows = [
            Follow {
                src: Src::Foreign,
                path: foreign.to_path_buf(),
                file: Some(ffile),
                partial: vec![],
            },
            Follow {
                src: Src::Qlive,
                path: qlive_log.to_path_buf(),
                file: None,
                partial: vec![],
            },
        ];
        let stop = Arc::new(AtomicBool::new(false));
        let arrivals = Arc::new(Mutex::new(Vec::with_capacity(1 << 18)));
        let (s2, a2) = (stop.clone(), arrivals.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            let mut ev = [0u8; 4096];
            let mut got = Vec::new();
            while !s2.load(Ordering::Relaxed) {
                let mut pfd = libc::pollfd {
                    fd: ifd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd. A timeout also reads both files
                // (cheap at EOF), in case an event was missed.
                unsafe { libc::poll(&mut pfd, 1, 5) };
                let now = Instant::now();
                // SAFETY: reading events into a local buffer.
                while unsafe { libc::read(ifd.as_raw_fd(), ev.as_mut_ptr().cast(), ev.len()) } > 0 {
                }
                for f in follows.iter_mut() {
                    f.drain(now, &mut buf, &mut got);
                }
                if !got.is_empty() {
                    a2.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .append(&mut got);
                }
            }
        });
        Ok(SplitWatch {
            stop,
            arrivals,
            thread: Some(thread),
        })
    }

    fn snapshot(&self) -> Vec<Arrival> {
        self.arrivals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn last(&self, src: Src) -> Option<Arrival> {
        self.arrivals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .rev()
            .find(|a| a.src == src)
            .copied()
    }

    /// Wait until a heartbeat from `src` newer than `seq` has arrived.
    fn wait_past(&self, src: Src, seq: u64, timeout: Duration) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if self.last(src).is_some_and(|a| a.seq > seq) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }
}

impl Drop for SplitWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The switchover gap: the first heartbeat in qlive's log past the last
/// one in the foreign file, minus that last one (ms); and the largest gap
/// between heartbeat arrivals from `from` on, across both files in
/// sequence order (ms).
fn gaps(arr: &[Arrival], from: Instant) -> (Option<f64>, Option<f64>) {
    let ms = |a: Instant, b: Instant| b.duration_since(a).as_secs_f64() * 1e3;
    let last_f = arr.iter().rev().find(|a| a.src == Src::Foreign).copied();
    let first_q = last_f.and_then(|lf| {
        arr.iter()
            .find(|a| a.src == Src::Qlive && a.seq > lf.seq)
            .copied()
    });
    let pause = match (last_f, first_q) {
        (Some(f), Some(q)) => Some(ms(f.t, q.t)),
        _ => None,
    };
    // The guest's one stream: the foreign file's heartbeats, then qlive's
    // past them (lines the agent may have copied over are not new).
    let cut = last_f.map_or(0, |f| f.seq);
    let stream: Vec<Instant> = arr
        .iter()
        .filter(|a| a.src == Src::Foreign || a.seq > cut)
        .map(|a| a.t)
        .collect();
    let start = stream.iter().rposition(|t| *t < from).unwrap_or(0);
    let maxgap = stream[start..]
        .windows(2)
        .map(|w| ms(w[0], w[1]))
        .max_by(|a, b| a.total_cmp(b));
    (pause, maxgap)
}

/// Lines that mean the guest saw something wrong: its own checks
/// (`CORRUPT`, `GUEST-ERROR`) and the kernel's (a panic, an oops).
fn guest_errors(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| {
            [
                "CORRUPT",
                "GUEST-ERROR",
                "Kernel panic",
                "BUG:",
                "Oops",
                "general protection",
            ]
            .iter()
            .any(|w| l.contains(w))
        })
        .map(str::to_string)
        .collect()
}

/// The guest booted again on the new QEMU (its init's banner, or the
/// heartbeat starting over): the adopted guest did not survive.
fn restarted(new_log: &str) -> Option<String> {
    let ready = new_log.contains("QLIVE-GUEST READY");
    let first = new_log.lines().find_map(|l| {
        l.trim_end()
            .strip_prefix("HB ")
            .and_then(|n| n.parse::<u64>().ok())
    });
    (ready || first == Some(1)).then(|| {
        let head: Vec<&str> = new_log
            .lines()
            .filter(|l| !l.starts_with("HB ") && !l.starts_with("STAT "))
            .take(12)
            .collect();
        format!(
            "THE GUEST BOOTED AGAIN on the new QEMU (banner: {ready}, first heartbeat: {}); its other lines: {head:?}",
            first.map_or("none".into(), |n| format!("HB {n}"))
        )
    })
}

// ---------------------------------------------------------------- one run

/// Destroys and undefines the adopted domain, whatever happened.
struct DomainGuard<'a> {
    rig: &'a Rig,
    name: String,
}

impl Drop for DomainGuard<'_> {
    fn drop(&mut self) {
        let _ = self.rig.qlive(&["destroy", &self.name]);
        let _ = self.rig.qlive(&["undefine", &self.name]);
    }
}

enum Outcome {
    /// `qlive adopt` succeeded: its --json answer.
    Adopted(Value),
    /// It failed with a timeout; whether the guest still runs on the old
    /// QEMU (and why not).
    TimedOut {
        msg: String,
        kept: Result<(), String>,
    },
    /// Any other failure: the exact error.
    Failed(String),
}

struct Run {
    outcome: Outcome,
    /// Wall time of the `qlive adopt` call (ms).
    wall_ms: f64,
    pause_ms: Option<f64>,
    maxgap_ms: Option<f64>,
    /// CORRUPT / GUEST-ERROR lines, prefixed by the file they came from.
    errors: Vec<String>,
    notes: Vec<String>,
}

impl Run {
    fn json(&self) -> Option<&Value> {
        match &self.outcome {
            Outcome::Adopted(v) => Some(v),
            _ => None,
        }
    }

    fn num(&self, k: &str) -> Option<f64> {
        self.json().and_then(|v| v.get(k)).and_then(Value::as_f64)
    }

    fn within(&self, bound_s: u64) -> bool {
        self.json().is_some()
            && self.num("total_ms").unwrap_or(self.wall_ms) <= bound_s as f64 * 1e3
    }
}

/// A cancelled pre-copy (`migration timed out after N s and was
/// cancelled`), not a post-copy that failed to finish.
fn is_timeout(msg: &str) -> bool {
    let m = msg.to_lowercase();
    m.contains("timed out")
        || m.contains("timeout")
        || m.contains("time out")
        || m.contains("did not converge")
}

/// `qlive adopt`, with a wall-clock guard well past the bound it was given.
fn run_adopt(rig: &Rig, args: &[String], guard: Duration) -> (std::process::Output, f64) {
    let mut child = Command::new(qlive_bin())
        .args(args)
        .env("QLIVE_SOCKET", &rig.socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run qlive adopt");
    // Read the pipes meanwhile so a long answer cannot block the CLI.
    let mut out_pipe = child.stdout.take().expect("stdout");
    let mut err_pipe = child.stderr.take().expect("stderr");
    let out_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = out_pipe.read_to_end(&mut b);
        b
    });
    let err_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = err_pipe.read_to_end(&mut b);
        b
    });
    let t0 = Instant::now();
    let mut killed = false;
    let status = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break st;
        }
        if !killed && t0.elapsed() > guard {
            eprintln!("[bench]   qlive adopt still running after {guard:?}: killing the CLI");
            let _ = child.kill();
            killed = true;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let wall_ms = t0.elapsed().as_secs_f64() * 1e3;
    let stdout = out_t.join().unwrap_or_default();
    let mut stderr = err_t.join().unwrap_or_default();
    if killed {
        stderr.extend_from_slice(
            format!("(the benchmark killed the CLI after {guard:?} without an answer)").as_bytes(),
        );
    }
    (
        std::process::Output {
            status,
            stdout,
            stderr,
        },
        wall_ms,
    )
}

/// The first JSON object on stdout (the CLI prints one, pretty-printed).
fn parse_json(stdout: &[u8]) -> Option<Value> {
    let s = String::from_utf8_lossy(stdout);
    let i = s.find('{')?;
    serde_json::from_str(&s[i..]).ok()
}

/// Boot a foreign guest and wait until it is in its steady state.
fn boot(rig: &Rig, tag: &str, guest: Guest, cfg: &Config) -> Result<Foreign, String> {
    let mut f = Foreign::start(rig.dir.path(), tag, guest, cfg);
    f.wait_console("PATTERN READY", Duration::from_secs(180))
        .map_err(|e| format!("{tag}: {e}"))?;
    // Let the dirtier reach its rate (STAT lines come once a second).
    std::thread::sleep(Duration::from_millis(if guest == Guest::Busy {
        3500
    } else {
        1000
    }));
    Ok(f)
}

/// `qlive adopt --dry-run --json` of a guest: what qlive would store, or
/// why it refuses.
fn dry_run(rig: &Rig, name: &str, f: &Foreign) -> Result<String, String> {
    let out = rig.qlive(&[
        "adopt",
        name,
        "--qmp",
        f.qmp.to_str().expect("utf8"),
        "--dry-run",
        "--json",
    ]);
    let plan = parse_json(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "exit {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            plan.map(|p| format!(" {p}")).unwrap_or_default()
        ));
    }
    let p = plan.ok_or("no JSON on stdout")?;
    let d = &p["definition"];
    Ok(format!(
        "machine {}, {} MiB, RAM block {} ({}), QEMU {}",
        d["machine"].as_str().unwrap_or("-"),
        d["memory_mib"],
        p["facts"]["ram"]["block"].as_str().unwrap_or("-"),
        p["facts"]["ram"]["backend"].as_str().unwrap_or("-"),
        p["qemu_version"].as_str().unwrap_or("-"),
    ))
}

/// The guest must still run on the old QEMU after a cancelled copy:
/// the process lives, QMP says `running`, heartbeats still arrive.
fn kept_running(f: &mut Foreign, watch: &SplitWatch) -> Result<(), String> {
    if !f.alive() {
        return Err(format!("the foreign QEMU {} is gone", f.pid()));
    }
    let st = f.status()?;
    if st != "running" {
        return Err(format!("the foreign QEMU is {st}, not running"));
    }
    let seq = watch.last(Src::Foreign).map_or(0, |a| a.seq);
    if !watch.wait_past(Src::Foreign, seq, Duration::from_secs(5)) {
        return Err("no heartbeat from the foreign QEMU after the timeout".into());
    }
    Ok(())
}

/// `qlive adopt NAME --qmp S --postcopy M --timeout T --json`.
fn adopt(
    rig: &Rig,
    name: &str,
    f: &mut Foreign,
    watch: &SplitWatch,
    mode: Mode,
    cfg: &Config,
) -> (Outcome, f64) {
    let args: Vec<String> = [
        "adopt",
        name,
        "--qmp",
        f.qmp.to_str().expect("utf8"),
        "--postcopy",
        mode.postcopy_arg(),
        "--timeout",
        &cfg.timeout_s.to_string(),
        "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (out, wall_ms) = run_adopt(
        rig,
        &args,
        Duration::from_secs(cfg.timeout_s + cfg.timeout_s / 2 + 60),
    );
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let code = out
        .status
        .code()
        .map_or(format!("{}", out.status), |c| format!("exit {c}"));
    let outcome = if out.status.success() {
        match parse_json(&out.stdout) {
            Some(v) => Outcome::Adopted(v),
            None => Outcome::Failed(format!(
                "exit 0 but no JSON on stdout: {:?} {stderr}",
                String::from_utf8_lossy(&out.stdout)
            )),
        }
    } else if is_timeout(&stderr) {
        Outcome::TimedOut {
            msg: format!("{code}: {stderr}"),
            kept: kept_running(f, watch),
        }
    } else {
        Outcome::Failed(format!("{code}: {stderr}"))
    };
    (outcome, wall_ms)
}

/// Mode `floor`: the same copy migration driven by the benchmark over QMP,
/// plain QEMU to plain QEMU (`-incoming`, private RAM, QEMU's default
/// parameters), no agent: what QEMU alone takes for this guest. The answer
/// has the fields of qlive's.
fn floor(f: &mut Foreign, sock: &Path, watch: &SplitWatch, cfg: &Config) -> (Outcome, f64) {
    let t0 = Instant::now();
    let bound = Duration::from_secs(cfg.timeout_s);
    let r = (|| -> Result<Result<Value, String>, String> {
        // The destination listens once it has started.
        while !sock.exists() {
            if t0.elapsed() > Duration::from_secs(20) {
                return Err(format!("no {} from the destination QEMU", sock.display()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let t0 = Instant::now();
        let mut q = QmpConn::connect(&f.qmp)?;
        // As qlive does for a copy: no cap, or the run's.
        let bw = if cfg.bandwidth > 0 {
            cfg.bandwidth
        } else {
            UNCAPPED
        };
        q.execute(
            "migrate-set-parameters",
            Some(json!({ "max-bandwidth": bw })),
        )?;
        q.execute(
            "migrate",
            Some(json!({ "uri": format!("unix:{}", sock.display()) })),
        )?;
        loop {
            std::thread::sleep(Duration::from_millis(50));
            let m = q.execute("query-migrate", None)?;
            match m["status"].as_str() {
                Some("completed") => {
                    return Ok(Ok(json!({
                        "result": "success",
                        "total_ms": m["total-time"],
                        "qemu_downtime_ms": m["downtime"],
                        "qemu_total_ms": m["total-time"],
                        "bytes_sent": m["ram"]["transferred"],
                        "precopy_passes": m["ram"]["dirty-sync-count"],
                        "postcopy": false,
                    })))
                }
                Some(st @ ("failed" | "cancelled")) => {
                    return Err(format!("QEMU's migration {st}: {m}"))
                }
                _ => {}
            }
            if t0.elapsed() > bound {
                q.execute("migrate_cancel", None)?;
                let t1 = Instant::now();
                while q.execute("query-migrate", None)?["status"] != "cancelled"
                    && t1.elapsed() < Duration::from_secs(30)
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
                return Ok(Err(format!(
                    "did not converge in {} s (pass {}, {} bytes sent): migrate_cancel",
                    cfg.timeout_s, m["ram"]["dirty-sync-count"], m["ram"]["transferred"]
                )));
            }
        }
    })();
    let wall_ms = t0.elapsed().as_secs_f64() * 1e3;
    let outcome = match r {
        Ok(Ok(v)) => Outcome::Adopted(v),
        Ok(Err(msg)) => Outcome::TimedOut {
            msg,
            kept: kept_running(f, watch),
        },
        Err(e) => Outcome::Failed(e),
    };
    (outcome, wall_ms)
}

fn one_run(rig: &Rig, guest: Guest, mode: Mode, i: usize, cfg: &Config) -> Run {
    let tag = format!("{}-{}-{i}", guest.label(), mode.label());
    let name = format!("adopt-{tag}");
    let failed = |e: String| Run {
        outcome: Outcome::Failed(e),
        wall_ms: f64::NAN,
        pause_ms: None,
        maxgap_ms: None,
        errors: vec![],
        notes: vec![],
    };
    let mut f = match boot(rig, &tag, guest, cfg) {
        Ok(f) => f,
        Err(e) => return failed(format!("the foreign guest did not boot: {e}")),
    };
    let mut notes = vec![];
    if guest == Guest::Busy {
        match f.dirty_rate_mib_s() {
            Some(r) => notes.push(format!("the guest dirtied {r:.0} MiB/s before adoption")),
            None => notes.push("no dirtying seen in the guest's STAT lines".into()),
        }
    }
    let _domain = DomainGuard {
        rig,
        name: name.clone(),
    };
    // floor: the destination is a plain QEMU waiting for the stream; its
    // serial file plays qlive's console log.
    let sock = rig.dir.path().join(format!("{tag}.migrate"));
    let dest = (mode == Mode::Floor).then(|| {
        Foreign::spawn(
            rig.dir.path(),
            &format!("{tag}-dest"),
            guest,
            cfg,
            Some(&sock),
        )
    });
    let log = match &dest {
        Some(d) => d.console.clone(),
        None => rig.console_log(&name),
    };
    let agent_log_at = rig.agent_log_text().len();
    let watch = SplitWatch::start(&f.console, &log).expect("watch the consoles");
    assert!(
        watch.wait_past(Src::Foreign, 0, Duration::from_secs(10)),
        "{tag}: no heartbeat from the foreign guest"
    );
    let t0 = Instant::now();
    let (outcome, wall_ms) = match mode {
        Mode::Floor => floor(&mut f, &sock, &watch, cfg),
        _ => adopt(rig, &name, &mut f, &watch, mode, cfg),
    };
    let mut dead = None;
    if let Outcome::Adopted(_) = &outcome {
        // The guest runs on the new QEMU: heartbeats in its log.
        let seq = watch.last(Src::Qlive).map_or(0, |a| a.seq);
        if !watch.wait_past(Src::Qlive, seq, Duration::from_secs(10)) {
            dead = Some(format!(
                "NO HEARTBEAT in the new console log {} within 10 s of the adoption: the guest does not run",
                log.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(300));
        if mode != Mode::Floor && f.alive() {
            notes.push(format!(
                "the foreign QEMU {} still runs after the adoption (status {})",
                f.pid(),
                f.status().unwrap_or_else(|e| e)
            ));
        }
    }
    let arr = watch.snapshot();
    drop(watch);
    if matches!(outcome, Outcome::Adopted(_)) {
        let rel = |t: Instant| t.saturating_duration_since(t0).as_secs_f64() * 1e3;
        let fl = arr.iter().rev().find(|a| a.src == Src::Foreign);
        let q: Vec<&Arrival> = arr.iter().filter(|a| a.src == Src::Qlive).collect();
        if fl.is_none() || q.iter().all(|a| fl.is_some_and(|f| a.seq <= f.seq)) {
            notes.push(format!(
                "no switchover seen: last foreign heartbeat {}; new log: {} heartbeats{}",
                fl.map_or("none".into(), |f| format!(
                    "HB {} at +{:.0} ms",
                    f.seq,
                    rel(f.t)
                )),
                q.len(),
                match (q.first(), q.last()) {
                    (Some(a), Some(b)) => format!(
                        ", HB {} at +{:.0} ms .. HB {} at +{:.0} ms",
                        a.seq,
                        rel(a.t),
                        b.seq,
                        rel(b.t)
                    ),
                    _ => String::new(),
                }
            ));
        }
    }
    // The pause exists only for a switchover; the largest gap also for a
    // timeout (what the guest suffered meanwhile), not for a failure.
    let (mut pause_ms, mut maxgap_ms) = gaps(&arr, t0);
    match outcome {
        Outcome::Adopted(_) => {}
        Outcome::TimedOut { .. } => pause_ms = None,
        Outcome::Failed(_) => (pause_ms, maxgap_ms) = (None, None),
    }
    let mut errors: Vec<String> = guest_errors(&f.console_text())
        .into_iter()
        .map(|l| format!("foreign console: {l}"))
        .collect();
    let qtext = String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default()).into_owned();
    errors.extend(
        guest_errors(&qtext)
            .into_iter()
            .map(|l| format!("new console: {l}")),
    );
    errors.extend(restarted(&qtext));
    errors.extend(dead);
    // A failure's context (a timeout is an expected outcome).
    if matches!(outcome, Outcome::Failed(_)) && mode != Mode::Floor {
        let text = rig.agent_log_text();
        let new = strip_ansi(text.get(agent_log_at..).unwrap_or(""));
        if !new.trim().is_empty() {
            notes.push(format!("agent log meanwhile:\n{}", tail(&new, 12)));
        }
    }
    Run {
        outcome,
        wall_ms,
        pause_ms,
        maxgap_ms,
        errors,
        notes,
    }
}

/// The agent's log without colour escapes.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\x1b' && it.peek() == Some(&'[') {
            for d in it.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

// ---------------------------------------------------------------- figures

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
}

/// "median/max" of the values present, "-" if none.
fn med_max(v: &[Option<f64>], prec: usize) -> String {
    let v: Vec<f64> = v.iter().flatten().copied().collect();
    if v.is_empty() {
        return "-".into();
    }
    format!("{:.*}/{:.*}", prec, median(&v), prec, max(&v))
}

fn med(v: &[Option<f64>], prec: usize) -> String {
    let v: Vec<f64> = v.iter().flatten().copied().collect();
    if v.is_empty() {
        return "-".into();
    }
    format!("{:.*}", prec, median(&v))
}

struct Cell {
    guest: Guest,
    mode: Mode,
    runs: Vec<Run>,
}

impl Cell {
    fn col(&self, f: impl Fn(&Run) -> Option<f64>) -> Vec<Option<f64>> {
        self.runs.iter().map(f).collect()
    }

    fn postcopy(&self) -> String {
        let v: Vec<Option<bool>> = self
            .runs
            .iter()
            .filter_map(|r| r.json())
            .map(|j| j.get("postcopy").and_then(Value::as_bool))
            .collect();
        if v.is_empty() {
            return "-".into();
        }
        let yes = v.iter().filter(|b| **b == Some(true)).count();
        let no = v.iter().filter(|b| **b == Some(false)).count();
        match (yes, no) {
            (y, 0) if y == v.len() => "yes".into(),
            (0, n) if n == v.len() => "no".into(),
            (0, 0) => "-".into(),
            (y, _) => format!("{y}/{} yes", v.len()),
        }
    }

    fn result(&self, bound_s: u64) -> String {
        let n = self.runs.len();
        let ok = self.runs.iter().filter(|r| r.within(bound_s)).count();
        let adopted = self.runs.iter().filter(|r| r.json().is_some()).count();
        let timed_out: Vec<&Run> = self
            .runs
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::TimedOut { .. }))
            .collect();
        let failed = self
            .runs
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::Failed(_)))
            .count();
        let mut parts = vec![];
        if adopted > 0 {
            parts.push(format!("{ok}/{n} completed within {bound_s} s"));
            if adopted > ok {
                parts.push(format!("{} adopted past the bound", adopted - ok));
            }
        }
        if !timed_out.is_empty() {
            let kept = timed_out
                .iter()
                .filter(|r| matches!(r.outcome, Outcome::TimedOut { kept: Ok(()), .. }))
                .count();
            let how = if kept == timed_out.len() {
                "cancelled, guest kept running on the old QEMU".to_string()
            } else {
                format!(
                    "cancelled; the guest kept running on the old QEMU in only {kept} of {}",
                    timed_out.len()
                )
            };
            parts.push(format!(
                "{}/{n} did not converge in {bound_s} s ({how})",
                timed_out.len()
            ));
        }
        if failed > 0 {
            parts.push(format!("{failed}/{n} FAILED"));
        }
        let bad = self.runs.iter().filter(|r| !r.errors.is_empty()).count();
        if bad > 0 {
            parts.push(format!("{bad}/{n} GUEST ERRORS (below)"));
        }
        parts.join("; ")
    }
}

fn print_table(cells: &[Cell], cfg: &Config, dry: &[(Guest, String)]) {
    println!();
    println!(
        "qlive adopt benchmark: {} run(s) per row, TCG, 1 vCPU, bound {} s (--timeout), pre-copy bandwidth {}",
        cfg.runs,
        cfg.timeout_s,
        if cfg.bandwidth > 0 {
            format!("capped at {} MiB/s", cfg.bandwidth >> 20)
        } else {
            "not capped (qlive's)".into()
        }
    );
    println!("  foreign QEMU: {}", cfg.emulator.display());
    for g in &cfg.guests {
        println!("  {}: {}", g.label(), g.describe(cfg));
        if let Some((_, d)) = dry.iter().find(|(x, _)| x == g) {
            println!("        dry run: {d}");
        }
    }
    println!("  times in ms, median/max; pause = first heartbeat in qlive's log - last in the foreign file;");
    println!(
        "  maxgap = largest heartbeat gap during the adoption (both files); downtime = QEMU's;"
    );
    println!(
        "  total = qlive's total_ms (the CLI's wall time if missing); passes = pre-copy passes"
    );
    println!(
        "  {:<5} {:<11} {:>15} {:>13} {:>13} {:>9} {:>12} {:>8} {:>6}  result",
        "guest", "mode", "total", "pause", "maxgap", "downtime", "bytes", "postcopy", "passes"
    );
    for c in cells {
        println!(
            "  {:<5} {:<11} {:>15} {:>13} {:>13} {:>9} {:>12} {:>8} {:>6}  {}",
            c.guest.label(),
            c.mode.label(),
            med_max(
                &c.col(|r| r.json().map(|_| r.num("total_ms").unwrap_or(r.wall_ms))),
                0
            ),
            med_max(&c.col(|r| r.pause_ms), 1),
            med_max(&c.col(|r| r.maxgap_ms), 1),
            med(&c.col(|r| r.num("qemu_downtime_ms")), 0),
            med(&c.col(|r| r.num("bytes_sent")), 0),
            c.postcopy(),
            med(&c.col(|r| r.num("precopy_passes")), 0),
            c.result(cfg.timeout_s),
        );
    }
    println!();
    // The goals.
    let find = |g: Guest, m: Mode| cells.iter().find(|c| c.guest == g && c.mode == m);
    for g in &cfg.guests {
        let bounded: Vec<&str> = cfg
            .modes
            .iter()
            .filter(|m| !matches!(m, Mode::Never | Mode::Floor))
            .filter_map(|m| find(*g, *m))
            .filter(|c| c.runs.iter().all(|r| r.within(cfg.timeout_s)))
            .map(|c| c.mode.label())
            .collect();
        println!(
            "  {}: every run adopted within {} s with --postcopy: {}",
            g.label(),
            cfg.timeout_s,
            if bounded.is_empty() {
                "in no mode".to_string()
            } else {
                bounded.join(", ")
            }
        );
        if let (Some(a), Some(i)) = (find(*g, Mode::Always), find(*g, Mode::Immediately)) {
            let pm = |c: &Cell, f: &dyn Fn(&Run) -> Option<f64>| {
                let v: Vec<f64> = c.runs.iter().filter_map(f).collect();
                median(&v)
            };
            let (pa, pi) = (pm(a, &|r| r.pause_ms), pm(i, &|r| r.pause_ms));
            let (ga, gi) = (pm(a, &|r| r.maxgap_ms), pm(i, &|r| r.maxgap_ms));
            let verdict = if pa.is_nan() || pi.is_nan() {
                "no figures"
            } else if pa < pi {
                "met"
            } else {
                "NOT met"
            };
            println!(
                "  {}: post-copy after one pass pauses less than post-copy immediately: {pa:.1} vs {pi:.1} ms median pause ({verdict}); maxgap {ga:.1} vs {gi:.1} ms",
                g.label()
            );
        }
    }
    // Errors and notes, after the table.
    let mut loud = false;
    for c in cells {
        for (i, r) in c.runs.iter().enumerate() {
            let what = format!("{} / {} run {}", c.guest.label(), c.mode.label(), i + 1);
            for e in &r.errors {
                if !loud {
                    println!();
                    println!("  !!! THE GUEST REPORTED ERRORS: a guest damaged by a copy migration is a bug (qlive's, or QEMU's: compare mode floor) !!!");
                    loud = true;
                }
                println!("  !!! {what}: {e}");
            }
        }
    }
    println!();
    for c in cells {
        for (i, r) in c.runs.iter().enumerate() {
            let what = format!("{} / {} run {}", c.guest.label(), c.mode.label(), i + 1);
            match &r.outcome {
                Outcome::Adopted(_) => {}
                Outcome::TimedOut { msg, kept } => {
                    println!("  {what}: timed out after {:.0} ms: {msg}", r.wall_ms);
                    if let Err(e) = kept {
                        println!("  {what}: !!! but the guest is not running on the old QEMU: {e}");
                    }
                }
                Outcome::Failed(e) => println!("  {what}: FAILED: {e}"),
            }
            for n in &r.notes {
                println!("  {what}: {n}");
            }
        }
    }
}

fn main() {
    let cfg = Config::from_env();
    // Run dir and state on tmpfs, as /run is; one agent, restarted when a
    // mode needs another environment.
    let mut rig = Rig::new_in(Path::new("/dev/shm"));
    // The agent starts without the run's bandwidth cap: restart it with
    // the first mode's environment.
    let mut env: Option<Vec<(&str, String)>> = None;
    let mut cells = vec![];
    let mut dry = vec![];
    for &guest in &cfg.guests {
        // The dry run first: it works without the migration, and says why
        // a guest would be refused.
        {
            let tag = format!("{}-dry", guest.label());
            match boot(&rig, &tag, guest, &cfg) {
                Ok(f) => match dry_run(&rig, &format!("adopt-{tag}"), &f) {
                    Ok(s) => {
                        eprintln!("[bench] {} guest, dry run: {s}", guest.label());
                        dry.push((guest, s));
                    }
                    Err(e) => {
                        eprintln!(
                            "[bench] {} guest, dry run REFUSED or failed: {e}",
                            guest.label()
                        );
                        continue;
                    }
                },
                Err(e) => {
                    eprintln!("[bench] {} guest did not boot: {e}", guest.label());
                    continue;
                }
            }
        }
        for &mode in &cfg.modes {
            let want = mode.agent_env(&cfg);
            if mode != Mode::Floor && env.as_ref() != Some(&want) {
                rig.kill_agent();
                let e: Vec<(&str, &str)> = want.iter().map(|(k, v)| (*k, v.as_str())).collect();
                rig.start_agent_with(&e);
                env = Some(want);
            }
            let mut runs = vec![];
            for i in 1..=cfg.runs {
                eprintln!(
                    "[bench] {} guest, mode {}: run {i}/{}",
                    guest.label(),
                    mode.label(),
                    cfg.runs
                );
                let r = one_run(&rig, guest, mode, i, &cfg);
                let summary = match &r.outcome {
                    Outcome::Adopted(v) => format!(
                        "adopted in {:.0} ms, pause {}, postcopy {}, passes {}, downtime {}, phases_ms {}",
                        r.wall_ms,
                        r.pause_ms.map_or("-".into(), |p| format!("{p:.1} ms")),
                        v.get("postcopy").map_or("-".into(), |p| p.to_string()),
                        v.get("precopy_passes").map_or("-".into(), |p| p.to_string()),
                        v.get("qemu_downtime_ms").map_or("-".into(), |p| p.to_string()),
                        v.get("phases_ms").map_or("-".into(), |p| p.to_string()),
                    ),
                    Outcome::TimedOut { msg, .. } => {
                        format!("timed out after {:.0} ms: {msg}", r.wall_ms)
                    }
                    Outcome::Failed(e) => format!("FAILED: {e}"),
                };
                eprintln!("[bench]   {}", summary.lines().next().unwrap_or(""));
                for e in &r.errors {
                    eprintln!("[bench]   !!! GUEST ERROR: {e}");
                }
                runs.push(r);
            }
            cells.push(Cell { guest, mode, runs });
        }
    }
    print_table(&cells, &cfg, &dry);
}
