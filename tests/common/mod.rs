//! Shared rig for integration tests and benchmarks: a real `qlive agent`
//! process on temp dirs, driving real QEMU (TCG) with the project's test
//! guest. Everything a rig starts is killed and removed in `Drop`, also when
//! the test fails.
#![allow(dead_code)]

pub mod hugepages;

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const SYSTEM_QEMU: &str = "/usr/bin/qemu-system-x86_64";

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn qlive_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_qlive"))
}

/// The test guest built by `tests/guest/build.sh` (`make guest`).
/// The newer QEMU (10.0 from bookworm-backports) unpacked by
/// `tests/rig/fetch-new-qemu.sh` (`make qemu-new`).
pub fn new_qemu() -> PathBuf {
    let p = std::env::var_os("QLIVE_NEW_QEMU")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/qemu-new/bin/qemu-system-x86_64"));
    assert!(
        p.is_file(),
        "newer QEMU missing at {}: run `make qemu-new`",
        p.display()
    );
    p
}

pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

pub fn guest_image() -> GuestImage {
    let dir = std::env::var_os("QLIVE_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/guest"));
    let kernel = dir.join("vmlinux");
    let initrd = dir.join("initrd.img");
    assert!(
        kernel.is_file() && initrd.is_file(),
        "test guest missing in {}: run `make guest` (tests/guest/build.sh)",
        dir.display()
    );
    GuestImage { kernel, initrd }
}

/// The man pages `examples/gen-assets.rs` writes (`make assets`) and the
/// packages install: `qlive.1.gz`, and `qlive-SUB.1.gz` for every subcommand
/// of the CLI as it is now (hidden ones and `help` have none).
pub fn man_pages() -> Vec<String> {
    use clap::CommandFactory;
    let cli = qlive::cli::Cli::command();
    let mut pages = vec!["qlive.1.gz".to_string()];
    pages.extend(
        cli.get_subcommands()
            .filter(|s| !s.is_hide_set() && s.get_name() != "help")
            .map(|s| format!("qlive-{}.1.gz", s.get_name())),
    );
    pages
}

/// The units in `systemd/` (`*.service`, `*.socket`, `*.timer`): the
/// packages must install every one.
pub fn repo_units() -> Vec<String> {
    let mut units: Vec<String> = std::fs::read_dir(repo_root().join("systemd"))
        .expect("reading systemd/")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            [".service", ".socket", ".timer"]
                .iter()
                .any(|x| n.ends_with(x))
        })
        .collect();
    units.sort();
    units
}

pub struct Rig {
    pub dir: tempfile::TempDir,
    pub state: PathBuf,
    pub run: PathBuf,
    pub socket: PathBuf,
    pub hooks: PathBuf,
    agent: Option<Child>,
    /// A private network namespace the agent (and so QEMU and its taps)
    /// runs in; it disappears with its last process and this fd.
    netns: Option<std::os::fd::OwnedFd>,
}

/// A new network namespace, held by an fd (no name under /run/netns that
/// could leak when a test dies). Created on a scratch thread, as unshare
/// moves only the calling thread.
pub fn new_netns() -> std::os::fd::OwnedFd {
    std::thread::spawn(|| {
        // SAFETY: unshare on this short-lived thread only.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            panic!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
        }
        std::fs::File::open("/proc/thread-self/ns/net")
            .expect("open netns")
            .into()
    })
    .join()
    .expect("netns thread")
}

/// Move the calling thread into `ns`.
pub fn enter_netns(ns: &std::os::fd::OwnedFd) {
    use std::os::fd::AsRawFd;
    // SAFETY: setns on a namespace fd we hold.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        panic!("setns: {}", std::io::Error::last_os_error());
    }
}

impl Rig {
    /// A fresh agent on fresh temp dirs.
    pub fn new() -> Rig {
        // Short base path: unix socket paths are limited to 107 bytes.
        Rig::new_in(Path::new("/tmp"))
    }

    /// A fresh agent on fresh temp dirs under `base` (benchmarks use a
    /// tmpfs, as /run is in production).
    pub fn new_in(base: &Path) -> Rig {
        Rig::build(base, false)
    }

    /// A rig whose agent runs in a private network namespace.
    pub fn new_netns() -> Rig {
        Rig::build(Path::new("/tmp"), true)
    }

    fn build(base: &Path, netns: bool) -> Rig {
        let dir = tempfile::Builder::new()
            .prefix("ql")
            .tempdir_in(base)
            .expect("tempdir");
        let state = dir.path().join("state");
        let run = dir.path().join("run");
        let socket = run.join("qlive.sock");
        let hooks = dir.path().join("hooks");
        std::fs::create_dir_all(&hooks).expect("hooks dir");
        let mut rig = Rig {
            dir,
            state,
            run,
            socket,
            hooks,
            agent: None,
            netns: netns.then(new_netns),
        };
        rig.start_agent();
        rig
    }

    /// Add an executable hook script.
    pub fn add_hook(&self, name: &str, body: &str) {
        let p = self.hooks.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("hook");
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
    }

    pub fn agent_log(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    pub fn start_agent(&mut self) {
        self.start_agent_with(&[]);
    }

    /// Start the agent with extra environment (test-only knobs).
    pub fn start_agent_with(&mut self, env: &[(&str, &str)]) {
        assert!(self.agent.is_none(), "agent already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.agent_log())
            .expect("agent log");
        let mut cmd = Command::new(qlive_bin());
        if let Some(ns) = &self.netns {
            use std::os::fd::AsRawFd;
            use std::os::unix::process::CommandExt;
            let fd = ns.as_raw_fd();
            // SAFETY: setns is async-signal-safe.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd
            .arg("agent")
            .envs(env.iter().copied())
            .env("QLIVE_HOOKS_DIR", &self.hooks)
            .env("QLIVE_STATE_DIR", &self.state)
            .env("QLIVE_RUN_DIR", &self.run)
            .env("QLIVE_SOCKET", &self.socket)
            .env("QLIVE_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn agent");
        self.agent = Some(child);
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(30) {
            if self.try_call(&json!({"op": "ping"})).is_ok() {
                return;
            }
            if let Some(c) = self.agent.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("agent exited at startup ({st}): {}", self.agent_log_text());
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "agent did not answer within 30 s: {}",
            self.agent_log_text()
        );
    }

    pub fn netns(&self) -> &std::os::fd::OwnedFd {
        self.netns.as_ref().expect("rig has no network namespace")
    }

    /// Run a command (`ip ...`) in the rig's network namespace; panics
    /// with its stderr if it fails.
    pub fn in_netns(&self, prog: &str, args: &[&str]) -> String {
        run_in_netns(self.netns(), prog, args)
    }

    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(|c| c.id())
    }

    pub fn agent_log_text(&self) -> String {
        std::fs::read_to_string(self.agent_log()).unwrap_or_default()
    }

    /// SIGKILL the agent (QEMUs keep running).
    pub fn kill_agent(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Wait until the agent's migration task of `name` stopped at its
    /// `QLIVE_TEST_PAUSE_AT` point (it writes `test-paused` first), and
    /// remove the marker.
    pub fn wait_test_paused(&self, name: &str, timeout: Duration) {
        let marker = self.run.join(format!("domains/{name}/test-paused"));
        let t0 = Instant::now();
        while !marker.exists() {
            assert!(
                t0.elapsed() < timeout,
                "{name}: the migration never paused: {}",
                tail(&self.agent_log_text(), 20)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = std::fs::remove_file(&marker);
    }

    /// A VNC client of `name`'s stable socket gets QEMU's RFB greeting
    /// within `timeout`.
    pub fn assert_rfb_greeting(&self, name: &str, timeout: Duration, when: &str) {
        let p = self.run.join(format!("domains/{name}/vnc.sock"));
        let mut s = UnixStream::connect(&p).unwrap_or_else(|e| panic!("{when}: vnc connect: {e}"));
        s.set_read_timeout(Some(timeout)).expect("read timeout");
        let mut g = [0u8; 12];
        s.read_exact(&mut g)
            .unwrap_or_else(|e| panic!("{when}: no RFB greeting: {e}"));
        assert!(g.starts_with(b"RFB 003."), "{when}: {g:?}");
    }

    /// `qlive migrate NAME --json [args]` in a background thread.
    pub fn migrate_bg(&self, name: &str, args: &[&str]) -> std::thread::JoinHandle<Output> {
        let mut cmd = Command::new(qlive_bin());
        cmd.args(["migrate", name, "--json"])
            .args(args)
            .env("QLIVE_SOCKET", &self.socket);
        std::thread::spawn(move || cmd.output().expect("run qlive migrate"))
    }

    /// Wait until the domain's job reports `phase` (polling `qlive job`).
    pub fn wait_job_phase(&self, name: &str, phase: &str, timeout: Duration) -> Value {
        let t0 = Instant::now();
        loop {
            if let Ok(j) = self.try_call(&json!({"op": "job", "name": name})) {
                if j["phase"] == phase {
                    return j;
                }
            }
            assert!(
                t0.elapsed() < timeout,
                "job of {name} never reached {phase}: {}",
                tail(&self.agent_log_text(), 20)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Migrate (foreground) and return the parsed --json result.
    pub fn migrate(&self, name: &str, args: &[&str]) -> Value {
        let mut a = vec!["migrate", name, "--json"];
        a.extend_from_slice(args);
        serde_json::from_str(&self.ok(&a)).expect("migrate json")
    }

    pub fn restart_agent(&mut self) {
        self.kill_agent();
        self.start_agent();
    }

    /// Run the CLI against this rig's agent.
    pub fn qlive(&self, args: &[&str]) -> Output {
        Command::new(qlive_bin())
            .args(args)
            .env("QLIVE_SOCKET", &self.socket)
            .stdin(Stdio::null())
            .output()
            .expect("run qlive")
    }

    /// Run the CLI, assert success, return stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.qlive(args);
        assert!(
            o.status.success(),
            "qlive {args:?} failed ({}): {}\nagent log:\n{}",
            o.status,
            String::from_utf8_lossy(&o.stderr),
            tail(&self.agent_log_text(), 30)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Run the CLI, assert failure, return (exit code, stderr).
    pub fn fails(&self, args: &[&str]) -> (i32, String) {
        let o = self.qlive(args);
        assert!(!o.status.success(), "qlive {args:?} unexpectedly succeeded");
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }

    /// One raw API request on a fresh connection.
    pub fn try_call(&self, req: &Value) -> Result<Value, Value> {
        let mut s = UnixStream::connect(&self.socket).map_err(|e| json!(e.to_string()))?;
        s.set_read_timeout(Some(Duration::from_secs(120))).ok();
        writeln!(s, "{req}").map_err(|e| json!(e.to_string()))?;
        let mut line = String::new();
        BufReader::new(s)
            .read_line(&mut line)
            .map_err(|e| json!(e.to_string()))?;
        let v: Value = serde_json::from_str(&line).map_err(|e| json!(e.to_string()))?;
        if v["ok"] == true {
            Ok(v["result"].clone())
        } else {
            Err(v["error"].clone())
        }
    }

    pub fn info(&self, name: &str) -> Value {
        serde_json::from_str(&self.ok(&["info", name, "--json"])).expect("info json")
    }

    /// Define the test guest under `name`; `extra` fields override.
    pub fn define_guest(&self, name: &str, memory_mib: u64, extra: Value) {
        let g = guest_image();
        let mut def = json!({
            "name": name,
            "emulator": SYSTEM_QEMU,
            "accel": "tcg",
            "memory_mib": memory_mib,
            "kernel": g.kernel,
            "initrd": g.initrd,
            "cmdline": "console=ttyS0 quiet panic=-1 no_timer_check qlive.pattern_mib=32",
        });
        if let (Some(d), Some(e)) = (def.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                d.insert(k.clone(), v.clone());
            }
        }
        let f = self.dir.path().join(format!("{name}.json"));
        std::fs::write(&f, def.to_string()).expect("write def");
        self.ok(&["define", f.to_str().expect("utf8")]);
    }

    pub fn console_log(&self, name: &str) -> PathBuf {
        self.state.join("console").join(format!("{name}.log"))
    }

    pub fn heartbeat(&self, name: &str) -> Heartbeat {
        Heartbeat::parse(&std::fs::read(self.console_log(name)).unwrap_or_default())
    }

    /// Wait until the guest's heartbeat passes `seq`.
    pub fn wait_heartbeat_past(&self, name: &str, seq: u64, timeout: Duration) -> Heartbeat {
        let t0 = Instant::now();
        loop {
            let hb = self.heartbeat(name);
            if hb.last > seq {
                return hb;
            }
            assert!(
                t0.elapsed() < timeout,
                "{name}: heartbeat did not pass {seq} within {timeout:?} (last {}); console tail: {:?}",
                hb.last,
                tail(&String::from_utf8_lossy(&std::fs::read(self.console_log(name)).unwrap_or_default()), 5)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Pids of QEMU processes whose command line mentions this rig's dir.
    pub fn qemu_pids(&self) -> Vec<i32> {
        let needle = self.dir.path().to_string_lossy().into_owned();
        let mut out = vec![];
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let mut cmd = Vec::new();
            if std::fs::File::open(e.path().join("cmdline"))
                .and_then(|mut f| f.read_to_end(&mut cmd))
                .is_err()
            {
                continue;
            }
            let cmd = String::from_utf8_lossy(&cmd);
            // every qlive instance has `-name guest=...`; the emulator path
            // may be anything (a copied binary in a test prefix)
            if cmd.contains("guest=") && cmd.contains("-daemonize") && cmd.contains(&needle) {
                out.push(pid);
            }
        }
        out
    }

    /// Entries of a directory (empty if it does not exist).
    pub fn ls(p: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(p)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.kill_agent();
        for pid in self.qemu_pids() {
            // SAFETY: kill(2) with a pid we found running our command line.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let t0 = Instant::now();
        while !self.qemu_pids().is_empty() && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The last `DISK <seq>` (acknowledged write) the guest printed in `text`.
pub fn acked_writes(text: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.strip_prefix("DISK "))
        .filter_map(|s| s.trim().parse::<u64>().ok())
        .max()
        .unwrap_or(0)
}

/// The number after `key=` in a guest's report line.
pub fn kv(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// What the guest's heartbeat on the console says.
#[derive(Debug, Default, Clone)]
pub struct Heartbeat {
    pub first: u64,
    pub last: u64,
    pub count: u64,
    /// Places where a line is not `HB <prev+1>` after heartbeats began:
    /// a lost, duplicated or mangled byte shows up here.
    pub breaks: Vec<String>,
    pub corrupt: Vec<String>,
    pub ready_count: usize,
}

impl Heartbeat {
    pub fn parse(bytes: &[u8]) -> Heartbeat {
        let text = String::from_utf8_lossy(bytes);
        let mut hb = Heartbeat::default();
        let mut lines: Vec<&str> = text.split('\n').collect();
        // The last piece may be a line still being written.
        lines.pop();
        for l in lines {
            let l = l.trim_end_matches('\r');
            if l.contains("CORRUPT") {
                hb.corrupt.push(l.to_string());
            }
            if l.contains("QLIVE-GUEST READY") {
                hb.ready_count += 1;
            }
            if let Some(n) = l.strip_prefix("HB ").and_then(|n| n.parse::<u64>().ok()) {
                if hb.count == 0 {
                    hb.first = n;
                } else if n != hb.last + 1 {
                    hb.breaks.push(format!("HB {} followed by HB {n}", hb.last));
                }
                hb.last = n;
                hb.count += 1;
            } else if l.contains("HB ") && !l.ends_with("READY") {
                // Two lines run together, or a torn line: bytes lost or doubled.
                hb.breaks
                    .push(format!("mangled line after HB {}: {l:?}", hb.last));
            }
        }
        hb
    }

    /// Assert a whole, uncorrupted stream that began with heartbeat 1.
    pub fn assert_intact(&self, what: &str) {
        assert!(self.count > 0, "{what}: no heartbeat at all");
        assert!(
            self.corrupt.is_empty(),
            "{what}: guest memory CORRUPT: {:?}",
            self.corrupt
        );
        assert!(
            self.breaks.is_empty(),
            "{what}: heartbeat stream broken: {:?}",
            &self.breaks[..self.breaks.len().min(5)]
        );
    }
}

/// Run `prog` in network namespace `ns`; its stdout, or a panic with its
/// stderr if it fails.
pub fn run_in_netns(ns: &std::os::fd::OwnedFd, prog: &str, args: &[&str]) -> String {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let fd = ns.as_raw_fd();
    let mut cmd = Command::new(prog);
    cmd.args(args);
    // SAFETY: setns is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().expect("run in netns");
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Tap `tap`'s tx checksumming and TSO as the kernel has them (ethtool's
/// ioctls, in namespace `ns`: the machine has no `ethtool`).
pub fn tap_csum_tso(ns: &std::os::fd::OwnedFd, tap: &str) -> (bool, bool) {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GTXCSUM: u32 = 0x16;
    const ETHTOOL_GTSO: u32 = 0x1e;
    let ns = ns.try_clone().expect("netns");
    let name = tap.to_string();
    std::thread::spawn(move || {
        enter_netns(&ns);
        #[repr(C)]
        struct Ifreq {
            name: [u8; 16],
            data: *mut u32,
            _pad: [u8; 16],
        }
        let get = |cmd: u32| {
            let mut v: [u32; 2] = [cmd, 0];
            let mut req = Ifreq {
                name: [0; 16],
                data: v.as_mut_ptr(),
                _pad: [0; 16],
            };
            req.name[..name.len()].copy_from_slice(name.as_bytes());
            // SAFETY: an AF_INET socket and one ifreq pointing at a live
            // ethtool_value.
            unsafe {
                let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
                let r = libc::ioctl(s, SIOCETHTOOL, &mut req);
                libc::close(s);
                assert_eq!(
                    r,
                    0,
                    "SIOCETHTOOL {cmd:#x} {name}: {}",
                    std::io::Error::last_os_error()
                );
            }
            v[1] != 0
        };
        (get(ETHTOOL_GTXCSUM), get(ETHTOOL_GTSO))
    })
    .join()
    .expect("ethtool thread")
}
