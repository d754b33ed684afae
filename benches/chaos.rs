//! Chaos benchmark (`make bench-chaos`, or `cargo bench --bench chaos`):
//! SIGKILL the agent at random instants during live migrations, restart it,
//! and check after every recovery that each domain has exactly one QEMU and
//! nothing of the interrupted migration is left behind.
//!
//! One run:
//!
//! 1. A rig as in `benches/migration.rs` (`Rig::new_in("/dev/shm")`: the real
//!    `qlive` binary on a tmpfs run dir) with a tracing `prepare`/`release`
//!    hook, and `CHAOS_GUESTS` test guests (default 3 x 256 MiB, TCG).
//! 2. Calibration: with a freshly started agent each time (as every chaos
//!    round has: empty probe cache), migrate k = 1..=N guests at once,
//!    `CALIBRATION_ROUNDS` times each; the median wall time of the last
//!    `CALIBRATION_ROUNDS` rounds is the kill window for k guests. One more
//!    round per k before every `RECALIBRATE_EVERY` kills follows the host's
//!    load.
//! 3. `CHAOS_KILLS` rounds (default 100): start `qlive migrate NAME --json
//!    --emulator E` for a random set of k guests (E alternates between the
//!    system QEMU 7.2 and `target/qemu-new`'s 10.0), wait a uniform random
//!    delay within the window for k, poll the `job` op of each (the request
//!    `qlive job NAME --json` sends), SIGKILL the agent, read each
//!    `job.json`; one round in `CHAOS_QEMU_KILL_ONE_IN` (default 8) also
//!    SIGKILLs one QEMU of one migrating guest (source or destination, at
//!    random, pid from its pidfile). Then start the agent and check (see
//!    `Chaos::check`). A guest recovery legitimately lost (only after a QEMU
//!    kill) is restarted; a leftover process is counted, then killed.
//! 4. A tally table; the exit status is 1 if any violation was seen.
//!
//! Every random choice comes from one seeded PRNG (splitmix64); the seed is
//! printed and `CHAOS_SEED` repeats the choices (the instants a kill lands at
//! still depend on timing). Env: CHAOS_KILLS, CHAOS_SEED (decimal or 0x hex),
//! CHAOS_GUESTS (1-3), CHAOS_MIB, CHAOS_QEMU_KILL_ONE_IN (0: never),
//! CHAOS_WINDOW_MS (a fixed kill window, no calibration), CHAOS_KEEP_LOGS
//! (keep the agent and console logs under target/chaos/SEED/ even when the
//! run passes; a failing run always keeps them).

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::net::UnixStream;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CALIBRATION_ROUNDS: usize = 3;
/// One more calibration round per k before every this many kills.
const RECALIBRATE_EVERY: usize = 20;

/// Set by SIGINT/SIGTERM: stop after the current round, report, clean up.
static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Set while a panic is expected and handled (a failed agent start).
static QUIET_PANIC: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::SeqCst);
}
/// Heartbeats a running guest must print after a recovery.
const HB_ADVANCE: u64 = 100;
const HB_TIMEOUT: Duration = Duration::from_secs(30);
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

// ------------------------------------------------------------------ PRNG

/// splitmix64: small, seedable, good enough to pick instants and victims.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn one_in(&mut self, n: u64) -> bool {
        n != 0 && self.below(n) == 0
    }
}

/// A seed from the clock and the pid, mixed, when none is given.
fn time_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    Rng(t ^ ((std::process::id() as u64) << 32)).next()
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(s) if !s.trim().is_empty() => {
            let s = s.trim();
            let v = match s.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16),
                None => s.parse(),
            };
            v.unwrap_or_else(|_| panic!("{name}={s:?} is not a number"))
        }
        _ => default,
    }
}

// --------------------------------------------------------------- /proc

struct Proc {
    pid: i32,
    /// NULs as spaces.
    cmdline: String,
    environ: Vec<String>,
}

/// Every process with a command line (kernel threads and zombies have none).
fn procs() -> Vec<Proc> {
    let mut out = vec![];
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let mut raw = Vec::new();
        if std::fs::File::open(e.path().join("cmdline"))
            .and_then(|mut f| f.read_to_end(&mut raw))
            .is_err()
            || raw.is_empty()
        {
            continue;
        }
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        let environ = std::fs::read(e.path().join("environ"))
            .map(|b| {
                String::from_utf8_lossy(&b)
                    .split('\0')
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default();
        out.push(Proc {
            pid,
            cmdline,
            environ,
        });
    }
    out
}

fn alive(pid: i32) -> bool {
    // A zombie is dead for our purposes (its parent has not reaped it yet).
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(") ")
            .map(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

fn sigkill_and_wait(pid: i32) {
    // SAFETY: kill(2) on a pid this benchmark identified as its own.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let t0 = Instant::now();
    while alive(pid) && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\x1b' && it.peek() == Some(&'[') {
            it.next();
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

// ------------------------------------------------------------- console

/// Follows a console log incrementally: heartbeat sequence, breaks,
/// CORRUPT lines, boots (`QLIVE-GUEST READY`).
struct Console {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
    last: Option<u64>,
    boots: u64,
    corrupt: Vec<String>,
    breaks: Vec<String>,
}

impl Console {
    fn new(path: PathBuf) -> Console {
        Console {
            path,
            offset: 0,
            partial: vec![],
            last: None,
            boots: 0,
            corrupt: vec![],
            breaks: vec![],
        }
    }

    /// Read what was appended since the last poll.
    fn poll(&mut self) {
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return;
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut buf = Vec::new();
        if f.read_to_end(&mut buf).is_err() {
            return;
        }
        self.offset += buf.len() as u64;
        self.partial.extend_from_slice(&buf);
        let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') else {
            return;
        };
        let complete: Vec<u8> = self.partial.drain(..=end).collect();
        let text = String::from_utf8_lossy(&complete).into_owned();
        for l in text.split('\n') {
            let l = l.trim_end_matches('\r');
            if l.contains("CORRUPT") {
                self.corrupt.push(l.to_string());
            }
            if l.contains("QLIVE-GUEST READY") {
                self.boots += 1;
                self.last = None;
                continue;
            }
            if let Some(n) = l.strip_prefix("HB ").and_then(|n| n.parse::<u64>().ok()) {
                if let Some(p) = self.last {
                    if n != p + 1 {
                        self.breaks.push(format!("HB {p} followed by HB {n}"));
                    }
                }
                self.last = Some(n);
            } else if l.contains("HB ") && !l.ends_with("READY") {
                self.breaks
                    .push(format!("mangled line after HB {:?}: {l:?}", self.last));
            }
        }
    }
}

// --------------------------------------------------------------- tally

/// Where a kill landed for one migrating guest, and what recovery made of it.
struct Sample {
    domain: String,
    /// `job` op answer just before the kill.
    polled: String,
    /// `job.json` right after the kill.
    persisted: String,
    /// What the `qlive migrate` client said.
    client: String,
    /// `Some("source")` / `Some("destination")` if that QEMU was SIGKILLed.
    qemu_killed: Option<&'static str>,
    /// Decision from the agent log line `recovering interrupted migration`.
    decision: String,
    outcome: &'static str,
}

#[derive(Default)]
struct Tally {
    samples: Vec<Sample>,
    violations: BTreeMap<&'static str, usize>,
    details: Vec<String>,
    kills: usize,
    qemu_kills: usize,
    restarted: usize,
    /// Heartbeat breaks seen after a round with a QEMU kill (not a violation:
    /// a killed QEMU may leave a torn line, a resumed source old state).
    qemu_kill_breaks: usize,
    recovery_ms: Vec<f64>,
    hooks_prepare: usize,
    hooks_release: usize,
    aborted: Option<String>,
}

/// QEMU run states of a guest that is gone for good: counted as crashed.
const CRASHED_STATES: &[&str] = &["guest-panicked", "internal-error", "io-error", "shutdown"];

const VIOLATION_KINDS: &[&str] = &[
    "more than one QEMU of a domain",
    "running domain's QEMU not found",
    "shut-off domain with a QEMU alive",
    "guest lost on an agent-only kill",
    "domain unreachable",
    "guest not running after recovery",
    "CORRUPT on the console",
    "heartbeat break on an agent-only kill",
    "heartbeat not advancing",
    "leftover instance directory",
    "leftover job.json",
    "leftover other file",
    "job still reported",
    "leftover -machine none probe",
    "leftover hook process",
    "leftover other agent child",
    "agent RAM fd count != running domains",
    "agent did not come up",
];

impl Tally {
    fn violation(&mut self, kind: &'static str, ctx: &str, detail: String) {
        debug_assert!(VIOLATION_KINDS.contains(&kind), "{kind}");
        *self.violations.entry(kind).or_default() += 1;
        let line = format!("VIOLATION [{ctx}] {kind}: {detail}");
        eprintln!("{line}");
        self.details.push(line);
    }

    fn total_violations(&self) -> usize {
        self.violations.values().sum()
    }
}

fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[((p / 100.0) * (s.len() - 1) as f64).round() as usize]
}

// --------------------------------------------------------------- chaos

struct Guest {
    name: String,
    console: Console,
}

struct Chaos {
    rig: Rig,
    rng: Rng,
    seed: u64,
    guests: Vec<Guest>,
    emulators: Vec<PathBuf>,
    hook_trace: PathBuf,
    hook_trace_offset: u64,
    agent_log_offset: u64,
    tally: Tally,
    /// Leftover paths already reported (each is counted once).
    seen_leftovers: BTreeSet<PathBuf>,
    /// Wall time of each calibration round, per k (index k-1).
    walls: Vec<Vec<f64>>,
    /// `phases_ms` of every calibration migration.
    phases: BTreeMap<String, Vec<f64>>,
    /// CHAOS_WINDOW_MS: a fixed window, no calibration.
    window_override: Option<f64>,
}

impl Drop for Chaos {
    fn drop(&mut self) {
        // The agent first (it spawns probes and hooks), then everything it
        // left that carries this rig's environment; Rig's own Drop then kills
        // the QEMUs and removes the temp dir.
        self.rig.kill_agent();
        for p in self.agent_children() {
            // SAFETY: a process started by this rig's agent (its environment
            // names this rig's run dir).
            unsafe { libc::kill(p.pid, libc::SIGKILL) };
        }
    }
}

/// One raw API request with a short timeout (used next to a kill).
fn call(socket: &Path, req: &Value, timeout: Duration) -> Result<Value, String> {
    let mut s = UnixStream::connect(socket).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(timeout)).ok();
    s.set_write_timeout(Some(timeout)).ok();
    writeln!(s, "{req}").map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_str(&line).map_err(|e| e.to_string())?;
    if v["ok"] == true {
        Ok(v["result"].clone())
    } else {
        Err(v["error"]["message"]
            .as_str()
            .unwrap_or("error")
            .to_string())
    }
}

fn read_json(p: &Path) -> Option<Value> {
    serde_json::from_slice(&std::fs::read(p).ok()?).ok()
}

struct Migration {
    guest: usize,
    child: Child,
    src_domid: u64,
}

impl Chaos {
    fn run_dir_of(&self, name: &str) -> PathBuf {
        self.rig.run.join("domains").join(name)
    }

    fn env_marker(&self) -> String {
        format!("QLIVE_RUN_DIR={}", self.rig.run.display())
    }

    /// Processes other than the agent and the QEMU instances that carry this
    /// rig's environment: probes, hooks and whatever else the agent spawned.
    fn agent_children(&self) -> Vec<Proc> {
        let marker = self.env_marker();
        let domains = format!("{}/domains/", self.rig.run.display());
        let agent = self.rig.agent_pid().map(|p| p as i32);
        procs()
            .into_iter()
            .filter(|p| Some(p.pid) != agent)
            .filter(|p| p.environ.contains(&marker))
            .filter(|p| !p.cmdline.contains(&domains))
            .collect()
    }

    /// QEMU processes of one domain: their command line names its run dir.
    fn qemus_of(&self, name: &str) -> Vec<Proc> {
        let needle = format!("{}/", self.run_dir_of(name).display());
        procs()
            .into_iter()
            .filter(|p| p.cmdline.contains(&needle))
            .collect()
    }

    fn list(&self) -> BTreeMap<String, Value> {
        let out = self.rig.ok(&["list", "--json"]);
        let v: Value = serde_json::from_str(&out).expect("list json");
        v.as_array()
            .expect("list array")
            .iter()
            .map(|d| (d["name"].as_str().unwrap_or("").to_string(), d.clone()))
            .collect()
    }

    /// What a migration of guest `g` needs, looked up before the clock
    /// starts: (guest, target emulator, source domid).
    fn plan(&self, g: usize) -> (usize, PathBuf, u64) {
        let info = self.rig.info(&self.guests[g].name);
        let cur = PathBuf::from(info["emulator"].as_str().unwrap_or(SYSTEM_QEMU));
        // The other emulator, or the same one if only the system QEMU exists.
        let target = self
            .emulators
            .iter()
            .find(|e| **e != cur)
            .cloned()
            .unwrap_or(cur);
        (g, target, info["domid"].as_u64().unwrap_or(0))
    }

    /// `qlive migrate NAME --json --emulator TARGET` in the background.
    fn start_migration(&self, plan: &(usize, PathBuf, u64)) -> Migration {
        let (g, target, src_domid) = plan;
        let child = Command::new(qlive_bin())
            .args(["migrate", &self.guests[*g].name, "--json", "--emulator"])
            .arg(target)
            .env("QLIVE_SOCKET", &self.rig.socket)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn qlive migrate");
        Migration {
            guest: *g,
            child,
            src_domid: *src_domid,
        }
    }

    /// (exit success, stdout, stderr) of a migrate client; waits for it.
    fn finish_client(m: &mut Migration) -> (bool, Value, String) {
        let st = m.child.wait().expect("wait qlive migrate");
        let mut out = String::new();
        let mut err = String::new();
        if let Some(mut o) = m.child.stdout.take() {
            let _ = o.read_to_string(&mut out);
        }
        if let Some(mut e) = m.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        let v = serde_json::from_str(out.trim()).unwrap_or(Value::Null);
        (st.success(), v, err.trim().to_string())
    }

    /// Start the agent; `Err` with its log tail if it does not come up.
    fn start_agent(&mut self) -> Result<f64, String> {
        let t0 = Instant::now();
        // A failed start is counted, not a crash: keep its panic quiet.
        QUIET_PANIC.store(true, std::sync::atomic::Ordering::SeqCst);
        let r = catch_unwind(AssertUnwindSafe(|| self.rig.start_agent()));
        QUIET_PANIC.store(false, std::sync::atomic::Ordering::SeqCst);
        match r {
            Ok(()) => Ok(t0.elapsed().as_secs_f64() * 1e3),
            Err(_) => {
                // Reap the agent that exited (or never answered).
                self.rig.kill_agent();
                Err(strip_ansi(&tail(&self.rig.agent_log_text(), 6)))
            }
        }
    }

    /// Processes holding `<run>/agent.lock` open (the flock goes with the
    /// open file, so any of them keeps a new agent out).
    fn lock_holders(&self) -> Vec<(i32, String)> {
        let lock = self.rig.run.join("agent.lock");
        let mut out = vec![];
        for p in procs() {
            let holds = std::fs::read_dir(format!("/proc/{}/fd", p.pid))
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == lock));
            if holds {
                let stat = std::fs::read_to_string(format!("/proc/{}/stat", p.pid))
                    .ok()
                    .and_then(|s| {
                        s.rsplit_once(") ")
                            .map(|(_, r)| r.chars().take(1).collect::<String>())
                    })
                    .unwrap_or_default();
                let wchan =
                    std::fs::read_to_string(format!("/proc/{}/wchan", p.pid)).unwrap_or_default();
                let ppid = std::fs::read_to_string(format!("/proc/{}/stat", p.pid))
                    .ok()
                    .and_then(|s| {
                        s.rsplit_once(") ")
                            .and_then(|(_, r)| r.split(' ').nth(1).map(String::from))
                    })
                    .unwrap_or_default();
                out.push((
                    p.pid,
                    format!(
                        "pid {} (ppid {ppid}, state {stat}, wchan {wchan}, {} agent env): {}",
                        p.pid,
                        if p.environ.contains(&self.env_marker()) {
                            "with"
                        } else {
                            "without"
                        },
                        p.cmdline.trim()
                    ),
                ));
            }
        }
        out
    }

    /// Agent log lines written since the last call.
    fn new_agent_log(&mut self) -> String {
        let text = self.rig.agent_log_text();
        let start = (self.agent_log_offset as usize).min(text.len());
        self.agent_log_offset = text.len() as u64;
        strip_ansi(&text[start..])
    }

    fn count_hooks(&mut self) {
        let Ok(mut f) = std::fs::File::open(&self.hook_trace) else {
            return;
        };
        let _ = f.seek(SeekFrom::Start(self.hook_trace_offset));
        let mut s = String::new();
        let _ = f.read_to_string(&mut s);
        self.hook_trace_offset += s.len() as u64;
        for l in s.lines() {
            if l.contains(" prepare ") {
                self.tally.hooks_prepare += 1;
            } else if l.contains(" release ") {
                self.tally.hooks_release += 1;
            }
        }
    }

    fn wait_heartbeat(&mut self, g: usize, past: u64, timeout: Duration) -> bool {
        let t0 = Instant::now();
        loop {
            self.guests[g].console.poll();
            if self.guests[g].console.last.is_some_and(|l| l > past) {
                return true;
            }
            if t0.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Boot a guest (fresh or after a loss) and wait for heartbeats.
    fn boot(&mut self, g: usize) {
        let name = self.guests[g].name.clone();
        self.rig.ok(&["start", &name]);
        let t0 = Instant::now();
        let boots = self.guests[g].console.boots;
        loop {
            self.guests[g].console.poll();
            let c = &self.guests[g].console;
            if c.boots > boots && c.last.is_some_and(|l| l > HB_ADVANCE) {
                break;
            }
            assert!(
                t0.elapsed() < BOOT_TIMEOUT,
                "{name} did not boot within {BOOT_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Bring a domain that recovery lost (or left broken) back to running.
    fn restore(&mut self, g: usize, state: &str) {
        let name = self.guests[g].name.clone();
        if state != "shut-off" {
            let _ = self.rig.qlive(&["destroy", &name]);
        }
        // `destroy` leaves job.json (migration.md, Known limitations).
        let _ = std::fs::remove_file(self.run_dir_of(&name).join("job.json"));
        self.boot(g);
        self.tally.restarted += 1;
    }

    /// Every check after a recovery. `migrating`: guest index -> sample
    /// index (the rounds's migrating guests); `before`: domid and pid of each
    /// guest before the round; `qemu_killed`: whether a QEMU was killed.
    fn check(
        &mut self,
        ctx: &str,
        migrating: &BTreeMap<usize, usize>,
        before: &[(u64, i64)],
        qemu_killed: bool,
    ) {
        let list = self.list();
        let agent = self.rig.agent_pid().map(|p| p as i32);
        let mut running = 0;
        let mut to_restore = vec![];
        for (g, &(bdomid, bpid)) in before.iter().enumerate() {
            let name = self.guests[g].name.clone();
            let d = list.get(&name).cloned().unwrap_or(Value::Null);
            let state = d["state"].as_str().unwrap_or("?").to_string();
            let domid = d["domid"].as_u64();
            let pid = d["pid"].as_i64();
            let qemus = self.qemus_of(&name);
            if qemus.len() > 1 {
                let pids: Vec<i32> = qemus.iter().map(|p| p.pid).collect();
                self.tally.violation(
                    "more than one QEMU of a domain",
                    ctx,
                    format!("{name}: {} QEMUs {pids:?} (state {state})", qemus.len()),
                );
            }
            match state.as_str() {
                "running" => {
                    running += 1;
                    if !qemus.iter().any(|p| Some(p.pid as i64) == pid) {
                        self.tally.violation(
                            "running domain's QEMU not found",
                            ctx,
                            format!(
                                "{name}: list says pid {pid:?}, found {:?}",
                                qemus.iter().map(|p| p.pid).collect::<Vec<_>>()
                            ),
                        );
                    } else {
                        // Counted above; end the extra ones (unknown to the
                        // agent) so that the run goes on from one instance.
                        for q in qemus.iter().filter(|p| Some(p.pid as i64) != pid) {
                            eprintln!(
                                "[chaos] {ctx}: killing extra QEMU of {name}: pid {}: {}",
                                q.pid,
                                q.cmdline.trim()
                            );
                            sigkill_and_wait(q.pid);
                        }
                    }
                }
                "shut-off" if !qemus.is_empty() => {
                    self.tally.violation(
                        "shut-off domain with a QEMU alive",
                        ctx,
                        format!(
                            "{name}: {:?}",
                            qemus.iter().map(|p| p.pid).collect::<Vec<_>>()
                        ),
                    );
                    for q in &qemus {
                        sigkill_and_wait(q.pid);
                    }
                }
                "unreachable" => {
                    let info = self.rig.info(&name);
                    self.tally.violation(
                        "domain unreachable",
                        ctx,
                        format!("{name}: {}", info["reason"]),
                    );
                }
                _ => {}
            }
            let info = self.rig.info(&name);
            if !info["job"].is_null() {
                self.tally.violation(
                    "job still reported",
                    ctx,
                    format!("{name}: {}", info["job"]),
                );
            }

            // Paths: only the running domid and status.json.
            let dir = self.run_dir_of(&name);
            for e in Rig::ls(&dir) {
                let keep = state == "running"
                    && (e == "status.json"
                        || Some(e.as_str()) == domid.map(|d| d.to_string()).as_deref());
                if keep {
                    continue;
                }
                let p = dir.join(&e);
                if !self.seen_leftovers.insert(p.clone()) {
                    continue;
                }
                let kind = if e == "job.json" {
                    "leftover job.json"
                } else if e.parse::<u64>().is_ok() {
                    "leftover instance directory"
                } else {
                    "leftover other file"
                };
                let what = if state == "running" {
                    format!("running on domid {domid:?}")
                } else {
                    format!("state {state}")
                };
                self.tally
                    .violation(kind, ctx, format!("{} ({name} {what})", p.display()));
            }

            // The console: no CORRUPT ever; no break on an agent-only kill.
            let (c0, b0, boots0) = {
                let c = &self.guests[g].console;
                (c.corrupt.len(), c.breaks.len(), c.boots)
            };
            self.guests[g].console.poll();
            let c = &self.guests[g].console;
            let new_corrupt: Vec<String> = c.corrupt[c0..].to_vec();
            let new_breaks: Vec<String> = c.breaks[b0..].to_vec();
            let rebooted = c.boots > boots0;
            let last = c.last.unwrap_or(0);
            if !new_corrupt.is_empty() {
                self.tally.violation(
                    "CORRUPT on the console",
                    ctx,
                    format!("{name}: {:?}", &new_corrupt[..new_corrupt.len().min(3)]),
                );
            }
            if !new_breaks.is_empty() {
                if qemu_killed {
                    self.tally.qemu_kill_breaks += new_breaks.len();
                    eprintln!("[chaos] {ctx}: {name}: heartbeat break after the QEMU kill: {new_breaks:?}");
                } else {
                    self.tally.violation(
                        "heartbeat break on an agent-only kill",
                        ctx,
                        format!("{name}: {:?}", &new_breaks[..new_breaks.len().min(3)]),
                    );
                }
            }

            // Which instance runs the guest now.
            let outcome = match state.as_str() {
                "running" if rebooted => "crashed",
                "running" if domid == Some(bdomid) => "kept source",
                "running" => "switched to destination",
                "shut-off" => "shut off",
                "unreachable" => "unreachable",
                s if CRASHED_STATES.contains(&s) => "crashed",
                _ => "not running",
            };
            let same_instance = state == "running" && domid == Some(bdomid) && pid == Some(bpid);
            if let Some(&si) = migrating.get(&g) {
                self.tally.samples[si].outcome = outcome;
            } else if !qemu_killed && !same_instance {
                self.tally.violation(
                    "guest lost on an agent-only kill",
                    ctx,
                    format!("{name} (not migrating): was domid {bdomid} pid {bpid}, now {state} {domid:?} {pid:?}"),
                );
            }
            let lost = outcome != "kept source" && outcome != "switched to destination";
            if lost && !qemu_killed && migrating.contains_key(&g) {
                self.tally.violation(
                    "guest lost on an agent-only kill",
                    ctx,
                    format!(
                        "{name}: {outcome} (state {state}): {}",
                        self.rig.info(&name)["reason"]
                    ),
                );
            }

            // A running guest's heartbeat must go on.
            if state == "running" && !rebooted {
                if !self.wait_heartbeat(g, last + HB_ADVANCE, HB_TIMEOUT) {
                    self.tally.violation(
                        "heartbeat not advancing",
                        ctx,
                        format!("{name}: stuck at HB {:?}", self.guests[g].console.last),
                    );
                    to_restore.push((g, "stalled".to_string()));
                }
            } else if state != "running" {
                if !matches!(state.as_str(), "shut-off" | "unreachable")
                    && !CRASHED_STATES.contains(&state.as_str())
                {
                    self.tally.violation(
                        "guest not running after recovery",
                        ctx,
                        format!("{name}: state {state}"),
                    );
                }
                to_restore.push((g, state.clone()));
            }
        }

        // The agent holds one RAM memfd per running domain.
        if let Some(a) = agent {
            let fds = std::fs::read_dir(format!("/proc/{a}/fd"))
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter(|l| l.to_string_lossy().contains("memfd:qlive-ram"))
                .count();
            if fds != running {
                self.tally.violation(
                    "agent RAM fd count != running domains",
                    ctx,
                    format!("{fds} memfds, {running} running domains"),
                );
            }
        }

        // Nothing else of the agent's may run now: no probe, no hook.
        for p in self.agent_children() {
            let kind = if p.cmdline.contains("-machine none") {
                "leftover -machine none probe"
            } else if p.environ.iter().any(|e| e.starts_with("QLIVE_PHASE=")) {
                "leftover hook process"
            } else {
                "leftover other agent child"
            };
            self.tally
                .violation(kind, ctx, format!("pid {}: {}", p.pid, p.cmdline.trim()));
            // Counted once: remove it so the run goes on from a clean host.
            sigkill_and_wait(p.pid);
        }

        for (g, state) in to_restore {
            eprintln!(
                "[chaos] {ctx}: restarting {} ({state})",
                self.guests[g].name
            );
            self.restore(g, &state);
        }
        self.count_hooks();
    }

    fn snapshot(&self) -> Vec<(u64, i64)> {
        let list = self.list();
        self.guests
            .iter()
            .map(|g| {
                let d = &list[&g.name];
                (
                    d["domid"].as_u64().unwrap_or(0),
                    d["pid"].as_i64().unwrap_or(0),
                )
            })
            .collect()
    }

    fn pick(&mut self, k: usize) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..self.guests.len()).collect();
        for i in (1..idx.len()).rev() {
            let j = self.rng.below(i as u64 + 1) as usize;
            idx.swap(i, j);
        }
        idx.truncate(k);
        idx.sort();
        idx
    }

    /// One calibration round: k concurrent migrations, all to succeed, on
    /// a freshly started agent (as every chaos round has: empty probe cache).
    fn calibration_round(&mut self, k: usize, ctx: &str) {
        self.rig.kill_agent();
        self.start_agent().expect("agent restart for calibration");
        let set = self.pick(k);
        let plans: Vec<_> = set.iter().map(|&g| self.plan(g)).collect();
        let t0 = Instant::now();
        let mut ms: Vec<Migration> = plans.iter().map(|p| self.start_migration(p)).collect();
        for m in &mut ms {
            let (ok, res, err) = Self::finish_client(m);
            assert!(
                ok,
                "calibration migration of {} failed: {err}",
                self.guests[m.guest].name
            );
            for (ph, v) in res["phases_ms"].as_object().into_iter().flatten() {
                self.phases
                    .entry(ph.clone())
                    .or_default()
                    .push(v.as_f64().unwrap_or(f64::NAN));
            }
        }
        self.walls[k - 1].push(t0.elapsed().as_secs_f64() * 1e3);
        // The migrations succeeded: check against the identities they
        // produced (no guest counts as migrating).
        let after = self.snapshot();
        self.check(ctx, &BTreeMap::new(), &after, false);
    }

    /// `rounds` calibration rounds for each k = 1..=N.
    fn calibrate(&mut self, rounds: usize, label: &str) {
        for k in 1..=self.guests.len() {
            for r in 0..rounds {
                self.calibration_round(k, &format!("calibration {label} k={k} #{r}"));
            }
        }
        eprintln!(
            "[chaos] calibration {label}: windows {}; phases_ms p50: {}",
            fmt_windows(&self.windows()),
            self.phase_summary()
        );
    }

    /// Kill window per k: the median wall time of the last
    /// CALIBRATION_ROUNDS calibration rounds with k concurrent migrations.
    fn windows(&self) -> Vec<f64> {
        if let Some(w) = self.window_override {
            return vec![w; self.guests.len()];
        }
        self.walls
            .iter()
            .map(|v| pct(&v[v.len().saturating_sub(CALIBRATION_ROUNDS)..], 50.0))
            .collect()
    }

    fn phase_summary(&self) -> String {
        ["begin", "prepare", "perform", "finish", "confirm"]
            .iter()
            .map(|p| {
                format!(
                    "{p} {:.0}",
                    pct(self.phases.get(*p).map(|v| &v[..]).unwrap_or(&[]), 50.0)
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn round(
        &mut self,
        kill_no: usize,
        windows: &[f64],
        qemu_kill_one_in: u64,
    ) -> Result<(), String> {
        let n = self.guests.len();
        let k = 1 + self.rng.below(n as u64) as usize;
        let set = self.pick(k);
        let window = windows[k - 1];
        let delay = Duration::from_secs_f64(self.rng.unit() * window / 1e3);
        let qemu_kill = self.rng.one_in(qemu_kill_one_in);
        let qemu_kill_pick = self.rng.next();
        let before = self.snapshot();
        let ctx = format!("kill {kill_no}, seed {:#x}", self.seed);
        let plans: Vec<_> = set.iter().map(|&g| self.plan(g)).collect();

        let t0 = Instant::now();
        let mut ms: Vec<Migration> = plans.iter().map(|p| self.start_migration(p)).collect();
        let spawn_ms = t0.elapsed().as_secs_f64() * 1e3;
        if let Some(rest) = delay.checked_sub(t0.elapsed()) {
            std::thread::sleep(rest);
        }
        // Poll each job just before the kill.
        let mut polled = vec![];
        for m in &mut ms {
            let name = &self.guests[m.guest].name;
            let p = if let Ok(Some(_)) = m.child.try_wait() {
                "done (client returned)".to_string()
            } else {
                match call(
                    &self.rig.socket,
                    &json!({"op": "job", "name": name}),
                    Duration::from_millis(500),
                ) {
                    Ok(Value::Null) => "no job".to_string(),
                    Ok(j) => j["phase"].as_str().unwrap_or("?").to_string(),
                    Err(e) => format!("job op failed: {e}"),
                }
            };
            polled.push(p);
        }
        let at_ms = t0.elapsed().as_secs_f64() * 1e3;
        self.rig.kill_agent();
        self.tally.kills += 1;

        // What the job files say, and what the clients said.
        let mut sample_idx = BTreeMap::new();
        for (i, m) in ms.iter_mut().enumerate() {
            let name = self.guests[m.guest].name.clone();
            let job = read_json(&self.run_dir_of(&name).join("job.json"));
            let persisted = match &job {
                None => "none".to_string(),
                Some(j) => {
                    let ph = j["phase"].as_str().unwrap_or("?");
                    match j["outcome"].as_str() {
                        Some(o) => format!("{ph} ({o})"),
                        None => ph.to_string(),
                    }
                }
            };
            let (ok, res, err) = Self::finish_client(m);
            let client = if ok {
                format!("success -> domid {}", res["to"]["domid"])
            } else if err.contains("migrating domain") {
                "failed".to_string()
            } else {
                "lost its agent".to_string()
            };
            sample_idx.insert(m.guest, self.tally.samples.len());
            self.tally.samples.push(Sample {
                domain: name,
                polled: polled[i].clone(),
                persisted,
                client,
                qemu_killed: None,
                decision: "-".to_string(),
                outcome: "?",
            });
        }

        // One round in N: kill one QEMU of one migrating guest as well.
        let mut qemu_note = String::new();
        if qemu_kill {
            let i = (qemu_kill_pick % ms.len() as u64) as usize;
            let name = self.guests[ms[i].guest].name.clone();
            let dir = self.run_dir_of(&name);
            let mut cands: Vec<(&'static str, u64, i32)> = vec![];
            for e in Rig::ls(&dir) {
                let Ok(domid) = e.parse::<u64>() else {
                    continue;
                };
                let idir = dir.join(&e);
                // The pidfile, if the process there names this directory
                // (else whatever QEMU does: one that has not written it yet).
                let needle = format!("{}/", idir.display());
                let pid = std::fs::read_to_string(idir.join("pid"))
                    .ok()
                    .and_then(|s| s.trim().parse::<i32>().ok())
                    .filter(|&p| {
                        std::fs::read(format!("/proc/{p}/cmdline"))
                            .map(|c| String::from_utf8_lossy(&c).contains(&needle))
                            .unwrap_or(false)
                    })
                    .or_else(|| {
                        procs()
                            .into_iter()
                            .find(|p| p.cmdline.contains(&needle))
                            .map(|p| p.pid)
                    });
                if let Some(pid) = pid.filter(|&p| alive(p)) {
                    let role = if domid == ms[i].src_domid {
                        "source"
                    } else {
                        "destination"
                    };
                    cands.push((role, domid, pid));
                }
            }
            if !cands.is_empty() {
                let (role, domid, pid) =
                    cands[((qemu_kill_pick >> 32) % cands.len() as u64) as usize];
                sigkill_and_wait(pid);
                self.tally.qemu_kills += 1;
                self.tally.samples[sample_idx[&ms[i].guest]].qemu_killed = Some(role);
                qemu_note = format!(", SIGKILLed {name}'s {role} QEMU (domid {domid}, pid {pid})");
            }
        }
        let qemu_killed = !qemu_note.is_empty();

        let rec = match self.start_agent() {
            Ok(ms) => ms,
            Err(log) => {
                let holders = self.lock_holders();
                self.tally.violation(
                    "agent did not come up",
                    &ctx,
                    format!(
                        "agent log tail:\n{log}\nholding {}/agent.lock now: {}",
                        self.rig.run.display(),
                        if holders.is_empty() {
                            "nobody (the holder was short-lived)".to_string()
                        } else {
                            format!("{:?}", holders.iter().map(|h| &h.1).collect::<Vec<_>>())
                        }
                    ),
                );
                // Counted; now take the holders (this rig's agent's
                // leftovers only) away and try once more.
                let marker = self.env_marker();
                for (pid, _) in &holders {
                    let ours = procs()
                        .iter()
                        .any(|p| p.pid == *pid && p.environ.contains(&marker));
                    if ours {
                        sigkill_and_wait(*pid);
                    }
                }
                match self.start_agent() {
                    Ok(ms) => ms,
                    Err(log) => {
                        return Err(format!(
                            "the agent did not come up after a kill, twice: {log}"
                        ))
                    }
                }
            }
        };
        self.tally.recovery_ms.push(rec);
        let log = self.new_agent_log();
        for l in log
            .lines()
            .filter(|l| l.contains("recovering interrupted migration"))
        {
            let dom = l
                .split_whitespace()
                .find_map(|w| w.strip_prefix("domain="))
                .unwrap_or("");
            let decision = l
                .split_once("decision=")
                .map(|(_, d)| d.trim().to_string())
                .unwrap_or_else(|| "?".to_string());
            if let Some(g) = self.guests.iter().position(|g| g.name == dom) {
                if let Some(&si) = sample_idx.get(&g) {
                    self.tally.samples[si].decision = decision;
                }
            }
        }
        let summary: Vec<String> = sample_idx
            .values()
            .map(|&si| {
                let s = &self.tally.samples[si];
                format!(
                    "{} polled {} / persisted {}",
                    s.domain, s.polled, s.persisted
                )
            })
            .collect();
        eprintln!(
            "[chaos] kill {kill_no}: {k} migrating, spawned in {spawn_ms:.0} ms, killed at {at_ms:.0} ms of {window:.0}: {}{qemu_note}; agent back in {rec:.0} ms",
            summary.join("; ")
        );
        self.check(&ctx, &sample_idx, &before, qemu_killed);
        Ok(())
    }
}

// ---------------------------------------------------------------- report

fn fmt_windows(w: &[f64]) -> String {
    w.iter()
        .enumerate()
        .map(|(i, w)| format!("k={} {w:.0} ms", i + 1))
        .collect::<Vec<_>>()
        .join(", ")
}

fn print_tally(t: &Tally, seed: u64, cfg: &str, windows: &str, phases: &str, secs: f64) {
    let w = 26;
    println!();
    println!("chaos: seed {seed:#x}; {cfg}; {secs:.0} s");
    println!("kill windows (median wall of k concurrent migrations): {windows}");
    println!("calibration migrations, phases_ms p50: {phases}");
    println!(
        "agent kills: {} ({} agent only, {} with a QEMU SIGKILLed too); migrations interrupted: {}",
        t.kills,
        t.kills - t.qemu_kills,
        t.qemu_kills,
        t.samples.len()
    );
    println!(
        "agent back (start to first answer, recovery included): p50 {:.0} ms, max {:.0} ms",
        pct(&t.recovery_ms, 50.0),
        pct(&t.recovery_ms, 100.0)
    );
    println!(
        "hook calls: prepare {}, release {}",
        t.hooks_prepare, t.hooks_release
    );

    let phases = [
        "no job",
        "begin",
        "prepare",
        "perform",
        "finish",
        "confirm",
        "done (client returned)",
    ];
    println!();
    println!("where the kills landed (per interrupted migration)");
    println!("{:<w$} {:>8}", "job phase polled before the kill", "count");
    for p in phases {
        let c = t.samples.iter().filter(|s| s.polled == p).count();
        println!("{p:<w$} {c:>8}");
    }
    let other = t
        .samples
        .iter()
        .filter(|s| !phases.contains(&s.polled.as_str()))
        .count();
    if other > 0 {
        println!("{:<w$} {other:>8}", "other");
    }

    let outcomes = [
        "kept source",
        "switched to destination",
        "shut off",
        "crashed",
        "unreachable",
        "not running",
    ];
    let mut persisted: Vec<String> = t.samples.iter().map(|s| s.persisted.clone()).collect();
    let order = |p: &str| {
        ["none", "begin", "prepare", "perform", "finish", "confirm"]
            .iter()
            .position(|x| p.starts_with(x))
            .unwrap_or(9)
    };
    persisted.sort_by(|a, b| order(a).cmp(&order(b)).then(a.cmp(b)));
    persisted.dedup();
    for (title, filter) in [
        ("agent killed alone", None),
        ("agent killed, then the source QEMU", Some("source")),
        (
            "agent killed, then the destination QEMU",
            Some("destination"),
        ),
    ] {
        let rows: Vec<&Sample> = t
            .samples
            .iter()
            .filter(|s| s.qemu_killed == filter)
            .collect();
        if rows.is_empty() {
            continue;
        }
        println!();
        println!("outcome by job.json phase at the kill: {title}");
        print!("{:<w$}", "persisted phase");
        for o in outcomes {
            print!(" {o:>12}");
        }
        println!();
        for p in &persisted {
            let r: Vec<&&Sample> = rows.iter().filter(|s| &s.persisted == p).collect();
            if r.is_empty() {
                continue;
            }
            print!("{p:<w$}");
            for o in outcomes {
                print!(" {:>12}", r.iter().filter(|s| s.outcome == o).count());
            }
            println!();
        }
    }

    let mut decisions: BTreeMap<&str, usize> = BTreeMap::new();
    for s in &t.samples {
        *decisions.entry(s.decision.as_str()).or_default() += 1;
    }
    println!();
    println!("recovery decisions (agent log; '-': no job file, plain re-adoption)");
    for (d, c) in &decisions {
        println!("  {c:>5}  {d}");
    }
    let mut clients: BTreeMap<String, usize> = BTreeMap::new();
    for s in &t.samples {
        let c = if s.client.starts_with("success") {
            "success"
        } else {
            s.client.as_str()
        };
        *clients.entry(c.to_string()).or_default() += 1;
    }
    println!(
        "migrate clients: {}",
        clients
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "guests restarted after a loss: {}; heartbeat breaks after a QEMU kill (not counted): {}",
        t.restarted, t.qemu_kill_breaks
    );

    println!();
    println!("{:<48} {:>6}", "violation", "count");
    for k in VIOLATION_KINDS {
        println!("{k:<48} {:>6}", t.violations.get(k).copied().unwrap_or(0));
    }
    println!("{:<48} {:>6}", "total", t.total_violations());
    if let Some(a) = &t.aborted {
        println!();
        println!("RUN ABORTED: {a}");
    }
    if !t.details.is_empty() {
        println!();
        for d in t.details.iter().take(40) {
            println!("{d}");
        }
        if t.details.len() > 40 {
            println!("... and {} more", t.details.len() - 40);
        }
    }
}

fn main() {
    let kills = env_u64("CHAOS_KILLS", 100) as usize;
    let seed = std::env::var("CHAOS_SEED")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .map(|_| env_u64("CHAOS_SEED", 0))
        .unwrap_or_else(time_seed);
    let n = env_u64("CHAOS_GUESTS", 3).clamp(1, 3) as usize;
    let mib = env_u64("CHAOS_MIB", 256);
    let qemu_kill_one_in = env_u64("CHAOS_QEMU_KILL_ONE_IN", 8);
    // A fixed kill window instead of the calibrated one (e.g. a short one
    // to aim at Begin and the probe).
    let window_override = std::env::var("CHAOS_WINDOW_MS")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .map(|_| env_u64("CHAOS_WINDOW_MS", 0));
    println!("chaos: seed {seed:#x} (repeat the choices with CHAOS_SEED={seed:#x})");

    let new_qemu = std::env::var_os("QLIVE_NEW_QEMU")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/qemu-new/bin/qemu-system-x86_64"));
    let mut emulators = vec![PathBuf::from(SYSTEM_QEMU)];
    if new_qemu.is_file() {
        emulators.push(new_qemu);
    } else {
        eprintln!(
            "[chaos] {} missing (make qemu-new): migrating 7.2 -> 7.2 only",
            new_qemu.display()
        );
    }
    let cfg = format!(
        "{n} guests x {mib} MiB (TCG), emulators {}, QEMU kill 1 in {qemu_kill_one_in}",
        emulators
            .iter()
            .map(|e| e.display().to_string())
            .collect::<Vec<_>>()
            .join(" <-> ")
    );
    eprintln!("[chaos] {cfg}, {kills} kills");

    // Rig panics quote the whole agent log; print only the start of a
    // panic message (the log is kept under target/chaos/ on failure).
    std::panic::set_hook(Box::new(|info| {
        if QUIET_PANIC.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        let short: String = strip_ansi(&msg)
            .lines()
            .take(12)
            .collect::<Vec<_>>()
            .join("\n");
        let loc = info.location().map(|l| l.to_string()).unwrap_or_default();
        eprintln!("[chaos] panic at {loc}: {short}");
    }));
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGTERM,
            on_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
    let t_start = Instant::now();
    let rig = Rig::new_in(Path::new("/dev/shm"));
    let hook_trace = rig.dir.path().join("hooks.trace");
    rig.add_hook(
        "10-trace",
        &format!(
            "echo \"$(date +%s.%N) $2 $QLIVE_DOMAIN $QLIVE_SRC_DOMID $QLIVE_DST_DOMID\" >> {}",
            hook_trace.display()
        ),
    );
    let guests: Vec<Guest> = (1..=n)
        .map(|i| {
            let name = format!("c{i}");
            Guest {
                console: Console::new(rig.console_log(&name)),
                name,
            }
        })
        .collect();
    let mut chaos = Chaos {
        rig,
        rng: Rng(seed),
        seed,
        guests,
        emulators,
        hook_trace,
        hook_trace_offset: 0,
        agent_log_offset: 0,
        tally: Tally::default(),
        seen_leftovers: BTreeSet::new(),
        walls: vec![vec![]; n],
        phases: BTreeMap::new(),
        window_override: window_override.map(|w| w as f64),
    };
    let mut first_windows = vec![];
    let res = catch_unwind(AssertUnwindSafe(|| {
        for g in 0..chaos.guests.len() {
            let name = chaos.guests[g].name.clone();
            chaos.rig.define_guest(&name, mib, json!({}));
            chaos.rig.ok(&["start", &name]);
        }
        for g in 0..chaos.guests.len() {
            let name = chaos.guests[g].name.clone();
            let t0 = Instant::now();
            while !chaos.wait_heartbeat(g, HB_ADVANCE, Duration::from_secs(1)) {
                assert!(t0.elapsed() < BOOT_TIMEOUT, "{name} did not boot");
            }
        }
        eprintln!("[chaos] {n} guests running");
        chaos.agent_log_offset = chaos.rig.agent_log_text().len() as u64;
        if chaos.window_override.is_none() {
            chaos.calibrate(CALIBRATION_ROUNDS, "at start");
        }
        first_windows = chaos.windows();
        for kill in 1..=kills {
            if kill > 1 && kill % RECALIBRATE_EVERY == 1 && chaos.window_override.is_none() {
                // The host's load drifts: one more round per k, and the
                // windows follow the last CALIBRATION_ROUNDS.
                chaos.calibrate(1, &format!("before kill {kill}"));
            }
            let windows = chaos.windows();
            if STOP.load(std::sync::atomic::Ordering::SeqCst) {
                chaos.tally.aborted = Some(format!("stopped by a signal after {} kills", kill - 1));
                break;
            }
            if let Err(e) = chaos.round(kill, &windows, qemu_kill_one_in) {
                chaos.tally.aborted = Some(e);
                break;
            }
        }
    }));
    if let Err(p) = res {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into());
        let short: Vec<String> = strip_ansi(&msg).lines().take(5).map(String::from).collect();
        chaos.tally.aborted = Some(format!("panicked: {}", short.join("\n")));
    }
    let windows = format!(
        "{} at the start, {} at the end",
        fmt_windows(&first_windows),
        fmt_windows(&chaos.windows())
    );
    print_tally(
        &chaos.tally,
        seed,
        &cfg,
        &windows,
        &chaos.phase_summary(),
        t_start.elapsed().as_secs_f64(),
    );
    let failed = chaos.tally.total_violations() > 0 || chaos.tally.aborted.is_some();
    if failed || std::env::var_os("CHAOS_KEEP_LOGS").is_some() {
        // Keep the evidence: the rig's temp dir goes with the rig.
        let keep = repo_root().join(format!("target/chaos/{seed:#x}"));
        let _ = std::fs::create_dir_all(&keep);
        let _ = std::fs::copy(chaos.rig.agent_log(), keep.join("agent.log"));
        for g in &chaos.guests {
            let _ = std::fs::copy(
                &g.console.path,
                keep.join(format!("{}.console.log", g.name)),
            );
        }
        let _ = std::fs::write(
            keep.join("violations.txt"),
            chaos.tally.details.join("\n") + "\n",
        );
        println!(
            "agent log, console logs and violations kept in {}",
            keep.display()
        );
    }
    drop(chaos);
    std::process::exit(if failed { 1 } else { 0 });
}
