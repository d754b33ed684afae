//! The real Debian 12 guest (`tests/guest/debian/`, `make debian-guest`)
//! under qlive: UEFI (`"firmware": "uefi"`) with the domain's own NVRAM,
//! 512 MiB on 2 MiB huge pages, a virtio-blk root disk, a virtio-net NIC
//! on a bridge in the rig's network namespace, qemu-guest-agent and a VNC
//! console.
//!
//! One scenario: boot, then seven migrations between QEMU 7.2 and 10.0
//! while a TCP connection from the host side streams the guest's counter
//! pattern and every byte is checked: one migration refused by a
//! required-feature hook (the guest stays on its QEMU), one agent SIGKILL
//! between migrations (re-adoption) and one in the middle of a migration
//! (recovery switches to the destination). After every step the guest
//! agent answers (`guest-ping`, `guest-get-osinfo` says Debian 12), VNC
//! greets, the EFI variable written at the first boot reads back through
//! `guest-exec`, and the stream flows with no bad byte. Then a guest
//! reboot (the NVRAM kept: `QLIVE-EFIVAR value=V` on the second boot, the
//! network back), a clean ACPI shutdown, `e2fsck` of the root file system,
//! undefine, and nothing left behind.
//!
//! It prints the boot time, one line per migration (guest-visible TCP
//! stall, guest-agent round trip, QEMU's downtime) and a summary. The
//! guest agent's round trip is given twice: through qlive's API (one
//! connection per command) and on one open connection to the socket.

mod common;

use common::hugepages::{pages_taken, Reserved};
use common::*;
use serde_json::{json, Value};
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const NAME: &str = "deb";
const HOST_CIDR: &str = "10.0.0.1/24";
const MEMORY_MIB: u64 = 512;
/// Boot to the ready marker under TCG, OVMF included: 26-39 s on the
/// 2-core machine, minutes when it is overloaded (the README's table).
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// The image `make debian-guest` builds (or `$QLIVE_DEBIAN_GUEST_DIR`) and
/// its `disk.json`.
fn debian_image() -> (PathBuf, Value) {
    let dir = std::env::var_os("QLIVE_DEBIAN_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/debian-guest"));
    let meta = dir.join("disk.json");
    let disk = dir.join("disk.raw");
    assert!(
        meta.is_file() && disk.is_file(),
        "Debian guest missing in {}: run `make debian-guest`",
        dir.display()
    );
    let meta: Value =
        serde_json::from_slice(&std::fs::read(&meta).expect("disk.json")).expect("disk.json");
    (disk, meta)
}

/// Byte `n` of the guest's stream: byte `n % 8` of LE64(`n / 8`).
fn stream_byte(n: u64) -> u8 {
    ((n / 8) >> (8 * (n % 8))) as u8
}

/// What a stream reader saw, when it ended.
#[derive(Debug)]
struct StreamEnd {
    bytes: u64,
    bad: u64,
    first_bad: Option<u64>,
    /// Why the reader stopped: `stopped` when asked to, else the error.
    why: String,
}

/// A TCP connection from the namespace's host side to the guest's stream
/// service, read in a thread: every byte checked against the pattern,
/// the arrival time of every read recorded.
struct Stream {
    t0: Instant,
    stop: Arc<AtomicBool>,
    bytes: Arc<AtomicU64>,
    bad: Arc<AtomicU64>,
    ended: Arc<AtomicBool>,
    /// (time since t0, stream offset after the read) per read.
    arrivals: Arc<Mutex<Vec<(Duration, u64)>>>,
    handle: Option<std::thread::JoinHandle<StreamEnd>>,
}

impl Stream {
    fn open(rig: &Rig, addr: SocketAddr) -> Stream {
        let ns = rig.netns().try_clone().expect("dup netns fd");
        let t0 = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let bytes = Arc::new(AtomicU64::new(0));
        let bad = Arc::new(AtomicU64::new(0));
        let ended = Arc::new(AtomicBool::new(false));
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let (c_stop, c_bytes, c_bad, c_ended, c_arr) = (
            stop.clone(),
            bytes.clone(),
            bad.clone(),
            ended.clone(),
            arrivals.clone(),
        );
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = std::thread::spawn(move || {
            enter_netns(&ns);
            let end = |n, bad, first_bad, why: String| {
                c_ended.store(true, Ordering::SeqCst);
                StreamEnd {
                    bytes: n,
                    bad,
                    first_bad,
                    why,
                }
            };
            let mut s = match TcpStream::connect_timeout(&addr, Duration::from_secs(10)) {
                Ok(s) => {
                    let _ = tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return end(0, 0, None, format!("connect: {e}"));
                }
            };
            s.set_read_timeout(Some(Duration::from_millis(100)))
                .expect("read timeout");
            let mut buf = vec![0u8; 64 * 1024];
            let (mut n, mut nbad, mut first_bad) = (0u64, 0u64, None);
            loop {
                if c_stop.load(Ordering::SeqCst) {
                    return end(n, nbad, first_bad, "stopped".into());
                }
                match s.read(&mut buf) {
                    Ok(0) => return end(n, nbad, first_bad, "EOF from the guest".into()),
                    Ok(k) => {
                        for (i, b) in buf[..k].iter().enumerate() {
                            let off = n + i as u64;
                            if *b != stream_byte(off) {
                                nbad += 1;
                                first_bad.get_or_insert(off);
                            }
                        }
                        n += k as u64;
                        c_bytes.store(n, Ordering::SeqCst);
                        c_bad.store(nbad, Ordering::SeqCst);
                        c_arr.lock().unwrap().push((t0.elapsed(), n));
                    }
                    Err(e)
                        if e.kind() == std::io::ErrorKind::WouldBlock
                            || e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return end(n, nbad, first_bad, format!("read: {e}")),
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(15)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("connecting to the guest's stream at {addr}: {e}"),
            Err(e) => panic!("connecting to the guest's stream at {addr}: {e}"),
        }
        Stream {
            t0,
            stop,
            bytes,
            bad,
            ended,
            arrivals,
            handle: Some(handle),
        }
    }

    fn now(&self) -> Duration {
        self.t0.elapsed()
    }

    /// Wait until `more` bytes beyond what has arrived now came in, all of
    /// them right; panics with the reader's end otherwise.
    fn assert_flowing(&mut self, more: u64, timeout: Duration, when: &str) {
        let want = self.bytes.load(Ordering::SeqCst) + more;
        let t0 = Instant::now();
        while self.bytes.load(Ordering::SeqCst) < want {
            if self.ended.load(Ordering::SeqCst) {
                let e = self.handle.take().map(|h| h.join().expect("stream thread"));
                panic!("{when}: the TCP stream ended: {e:?}");
            }
            assert!(
                t0.elapsed() < timeout,
                "{when}: the TCP stream stalled at {} bytes (wanted {want} within {timeout:?})",
                self.bytes.load(Ordering::SeqCst)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let bad = self.bad.load(Ordering::SeqCst);
        assert_eq!(bad, 0, "{when}: {bad} bad bytes in the TCP stream");
    }

    /// The longest time between two consecutive reads that overlaps
    /// `[from, to]` (times since the stream opened).
    fn largest_gap(&self, from: Duration, to: Duration) -> Duration {
        let a = self.arrivals.lock().unwrap();
        a.windows(2)
            .filter(|w| w[1].0 >= from && w[0].0 <= to)
            .map(|w| w[1].0 - w[0].0)
            .max()
            .unwrap_or_default()
    }

    fn finish(mut self) -> StreamEnd {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .take()
            .expect("stream thread")
            .join()
            .expect("stream thread")
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Standard base64 (the guest agent's `out-data`).
fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {s:?}"),
        }
    };
    let mut out = Vec::new();
    for chunk in s.trim_end_matches('=').as_bytes().chunks(4) {
        let mut acc = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            acc |= val(*c) << (18 - 6 * i);
        }
        out.extend_from_slice(&acc.to_be_bytes()[1..chunk.len()]);
    }
    out
}

/// The console log's lines, without CR.
fn console_lines(rig: &Rig) -> Vec<String> {
    String::from_utf8_lossy(&std::fs::read(rig.console_log(NAME)).unwrap_or_default())
        .lines()
        .map(|l| l.trim_end_matches('\r').to_string())
        .collect()
}

/// Wait until the console has `count` lines starting with `prefix`;
/// returns them. Fails at once on `QLIVE-GUEST-ERROR`.
fn wait_marker(rig: &Rig, prefix: &str, count: usize, timeout: Duration) -> Vec<String> {
    let t0 = Instant::now();
    loop {
        let lines = console_lines(rig);
        if let Some(e) = lines.iter().find(|l| l.contains("QLIVE-GUEST-ERROR")) {
            panic!(
                "guest error on the console: {e}\n{}",
                lines_tail(&lines, 20)
            );
        }
        let found: Vec<String> = lines
            .iter()
            .filter(|l| l.starts_with(prefix))
            .cloned()
            .collect();
        if found.len() >= count {
            return found;
        }
        assert!(
            t0.elapsed() < timeout,
            "no {count}. `{prefix}` on the console within {timeout:?}:\n{}",
            lines_tail(&lines, 20)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn lines_tail(lines: &[String], n: usize) -> String {
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `key=value` from a marker line.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

/// One guest agent command through `qlive guest-agent`; its `return`.
fn qga(rig: &Rig, cmd: Value) -> Value {
    let out = rig.ok(&["guest-agent", NAME, &cmd.to_string(), "--timeout", "30"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("guest-agent {cmd}: {e}: {out:?}"))
}

/// Median round trip of `guest-ping` through the agent's API (no CLI
/// process start in the figure), over 5 calls.
fn qga_rtt(rig: &Rig) -> Duration {
    let mut v: Vec<Duration> = (0..5)
        .map(|_| {
            let t = Instant::now();
            let r = rig.try_call(&json!({"op": "guest-agent", "name": NAME,
                                         "command": {"execute": "guest-ping"}}));
            assert!(r.is_ok(), "guest-ping: {r:?}");
            t.elapsed()
        })
        .collect();
    v.sort();
    v[2]
}

/// Median round trip of `guest-ping` on one open connection to the guest
/// agent's socket (after `guest-sync-delimited`), over 5 calls: the guest
/// agent and QEMU alone, without qlive's connection per command.
fn qga_rtt_open(rig: &Rig) -> Duration {
    use std::io::{BufRead, BufReader, Write};
    let p = rig.run.join(format!("domains/{NAME}/guest-agent.sock"));
    let s = std::os::unix::net::UnixStream::connect(&p).expect("guest agent socket");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let id = u64::from(std::process::id());
    writeln!(
        w,
        "{}",
        json!({"execute": "guest-sync-delimited", "arguments": {"id": id}})
    )
    .unwrap();
    let mut junk = Vec::new();
    r.read_until(0xff, &mut junk).expect("sync delimiter");
    loop {
        let mut l = String::new();
        r.read_line(&mut l).expect("sync answer");
        if l.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(l.trim()).expect("sync answer json");
        if v["return"] == id {
            break;
        }
    }
    let mut v: Vec<Duration> = (0..5)
        .map(|_| {
            let t = Instant::now();
            writeln!(w, "{}", json!({"execute": "guest-ping"})).unwrap();
            let mut l = String::new();
            r.read_line(&mut l).expect("guest-ping answer");
            assert_eq!(l.trim(), r#"{"return": {}}"#);
            t.elapsed()
        })
        .collect();
    v.sort();
    v[2]
}

/// Run `path args...` in the guest (`guest-exec`, `guest-exec-status`);
/// its stdout.
fn guest_exec(rig: &Rig, path: &str, args: &[&str]) -> Vec<u8> {
    let r = qga(
        rig,
        json!({"execute": "guest-exec",
               "arguments": {"path": path, "arg": args, "capture-output": true}}),
    );
    let pid = r["pid"]
        .as_i64()
        .unwrap_or_else(|| panic!("guest-exec: {r}"));
    let t0 = Instant::now();
    loop {
        let st = qga(
            rig,
            json!({"execute": "guest-exec-status", "arguments": {"pid": pid}}),
        );
        if st["exited"] == true {
            assert_eq!(st["exitcode"], 0, "{path} {args:?} in the guest: {st}");
            return base64_decode(st["out-data"].as_str().unwrap_or(""));
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{path} {args:?} in the guest did not exit: {st}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A VNC client at the stable path gets QEMU's RFB greeting.
fn assert_vnc(rig: &Rig, when: &str) {
    rig.assert_rfb_greeting(NAME, Duration::from_secs(20), when);
}

/// What the scenario knows of the guest it checks after every step.
struct Guest {
    efivar_path: String,
    efivar_value: String,
    taken0: u64,
    pages: u64,
}

impl Guest {
    /// Everything that must hold after each step; returns the guest agent's
    /// round trips.
    fn check(&self, rig: &Rig, stream: &mut Stream, when: &str) -> Rtt {
        let info = rig.info(NAME);
        assert_eq!(info["state"], "running", "{when}: {info}");
        assert_eq!(info["job"], Value::Null, "{when}: {info}");
        let pid = info["pid"].as_i64().expect("pid") as i32;
        assert_eq!(rig.qemu_pids(), vec![pid], "{when}: exactly one QEMU");
        assert_eq!(
            pages_taken() - self.taken0,
            self.pages,
            "{when}: the guest holds its huge pages, no second set"
        );

        let ping = qga(rig, json!({"execute": "guest-ping"}));
        assert_eq!(ping, json!({}), "{when}: guest-ping");
        let os = qga(rig, json!({"execute": "guest-get-osinfo"}));
        assert_eq!(os["id"], "debian", "{when}: {os}");
        assert_eq!(os["version-id"], "12", "{when}: {os}");
        let rtt = Rtt {
            api: qga_rtt(rig),
            open: qga_rtt_open(rig),
        };

        assert_vnc(rig, when);

        let var = guest_exec(rig, "/bin/cat", &[&self.efivar_path]);
        // efivarfs: the 4-byte attributes, then the data.
        assert!(var.len() >= 4, "{when}: EFI variable {var:?}");
        assert_eq!(
            u32::from_le_bytes(var[..4].try_into().unwrap()),
            7,
            "{when}: EFI variable attributes"
        );
        assert_eq!(
            String::from_utf8_lossy(&var[4..]),
            self.efivar_value,
            "{when}: EFI variable"
        );

        // 100 KiB/s: 50 KiB more is half a second of streaming.
        stream.assert_flowing(50 * 1024, Duration::from_secs(20), when);
        rtt
    }
}

/// On a panic, print the tails of the agent log and of the console (the
/// rig's temp dir is removed right after).
struct DumpOnPanic {
    agent_log: PathBuf,
    console_log: PathBuf,
}

impl Drop for DumpOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let read = |p: &Path| {
                String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned()
            };
            eprintln!(
                "debian: agent log tail:\n{}\ndebian: console tail:\n{}",
                tail(&read(&self.agent_log), 80),
                tail(&read(&self.console_log), 30)
            );
        }
    }
}

/// The guest agent's round trip: through qlive's API (a connection per
/// command) and on one open connection.
#[derive(Clone, Copy, Default)]
struct Rtt {
    api: Duration,
    open: Duration,
}

impl std::fmt::Display for Rtt {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(
            f,
            "QGA RTT {:>5.1} ms (qlive API; {:.1} ms on an open connection)",
            self.api.as_secs_f64() * 1000.0,
            self.open.as_secs_f64() * 1000.0
        )
    }
}

/// One line of the per-migration table.
struct Figure {
    what: String,
    outcome: String,
    stall: Duration,
    rtt: Rtt,
    downtime_ms: Option<u64>,
    total_ms: Option<f64>,
}

impl Figure {
    fn line(&self) -> String {
        let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        format!(
            "debian: migration {:<18} {:<44} TCP stall {:>5.0} ms, {}, QEMU downtime {} ms, total {} ms",
            self.what,
            self.outcome,
            self.stall.as_secs_f64() * 1000.0,
            self.rtt,
            opt(self.downtime_ms.map(|d| d.to_string())),
            opt(self.total_ms.map(|t| format!("{t:.0}"))),
        )
    }
}

/// `major.minor` of a `qemu_version` in `info`.
fn major_minor(info: &Value) -> String {
    let v = info["qemu_version"].as_str().unwrap_or("?");
    v.split('.').take(2).collect::<Vec<_>>().join(".")
}

fn version(rig: &Rig) -> String {
    major_minor(&rig.info(NAME))
}

/// A successful `qlive migrate` to `target`; the figure (without RTT).
fn migrate_ok(rig: &Rig, stream: &Stream, target: &Path, what: &str) -> Figure {
    let before = rig.info(NAME);
    let from = version(rig);
    let t = stream.now();
    let r = rig.migrate(NAME, &["--emulator", target.to_str().expect("utf8")]);
    let t_end = stream.now();
    assert_eq!(r["result"], "success", "{r}");
    let after = rig.info(NAME);
    assert!(
        after["domid"].as_u64() > before["domid"].as_u64() && after["pid"] != before["pid"],
        "{what}: not on a new instance: {before} -> {after}"
    );
    assert_eq!(after["emulator"], json!(target), "{after}");
    Figure {
        what: format!("{what} ({from} -> {})", version(rig)),
        outcome: "ok".into(),
        stall: stream.largest_gap(t, t_end),
        rtt: Rtt::default(),
        downtime_ms: r["qemu_downtime_ms"].as_u64(),
        total_ms: r["total_ms"].as_f64(),
    }
}

#[test]
fn debian_guest_on_uefi_hugepages_through_migrations_restarts_and_a_reboot() {
    let t_test = Instant::now();
    let (image, meta) = debian_image();
    let new = new_qemu();
    let old = PathBuf::from(SYSTEM_QEMU);

    // 512 MiB of guest RAM is 256 pages of 2 MiB, on top of what the pool
    // had; given back when the guard drops, also on a panic. Declared
    // before the rig, so it drops after the rig killed QEMU and the agent.
    let pages = MEMORY_MIB / 2;
    let _pool = Reserved::pages(pages);
    let mut rig = Rig::new_netns();
    let _dump = DumpOnPanic {
        agent_log: rig.agent_log(),
        console_log: rig.console_log(NAME),
    };
    let taken0 = pages_taken();
    rig.in_netns("ip", &["link", "set", "lo", "up"]);
    rig.in_netns("ip", &["link", "add", "br0", "type", "bridge"]);
    rig.in_netns("ip", &["addr", "add", HOST_CIDR, "dev", "br0"]);
    rig.in_netns("ip", &["link", "set", "br0", "up"]);

    // The guest's own copy of the disk (qlive makes its NVRAM).
    let disk = rig.dir.path().join("disk.raw");
    let cp = std::process::Command::new("cp")
        .arg("--sparse=always")
        .arg(&image)
        .arg(&disk)
        .output()
        .expect("cp");
    assert!(cp.status.success(), "cp: {cp:?}");
    let code = meta["firmware"]["code"].as_str().expect("firmware code");
    let template = meta["firmware"]["vars_template"]
        .as_str()
        .expect("vars template");
    let root_offset = meta["partitions"]["root"]["offset"]
        .as_u64()
        .expect("root offset");
    let port = meta["stream"]["port"].as_u64().expect("stream port") as u16;
    let guest_ip = meta["network"]["guest_ip"]
        .as_str()
        .expect("guest ip")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let addr: SocketAddr = format!("{guest_ip}:{port}").parse().expect("addr");
    let efivar_path = format!(
        "/sys/firmware/efi/efivars/{}-{}",
        meta["efivar"]["name"].as_str().expect("efivar name"),
        meta["efivar"]["guid"].as_str().expect("efivar guid")
    );
    // A value of this run only: `[A-Za-z0-9._:-]{1,64}`.
    let efivar_value = format!(
        "qlive-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    );

    let def = json!({
        "name": NAME,
        "emulator": SYSTEM_QEMU,
        "accel": "tcg",
        "memory_mib": MEMORY_MIB,
        "hugepages": "2M",
        "guest_agent": true,
        "vnc": true,
        "disks": [{"path": disk, "format": "raw"}],
        "nics": [{"bridge": "br0"}],
        "firmware": "uefi",
        "firmware_code": code,
        "nvram_template": template,
        // The guest writes its test EFI variable at its first boot.
        "extra_args": ["-fw_cfg", format!("name=opt/qlive/efivar,string={efivar_value}")],
    });
    let f = rig.dir.path().join("deb.json");
    std::fs::write(&f, def.to_string()).expect("write the definition");
    rig.ok(&["define", f.to_str().expect("utf8")]);
    let info = rig.info(NAME);
    eprintln!("debian: defined: {info}");
    assert_eq!(info["hugepages"], "2M", "{info}");
    assert_eq!(info["memory_mib"], MEMORY_MIB, "{info}");
    assert_eq!(info["firmware"]["type"], "uefi", "{info}");
    assert_eq!(info["firmware"]["code"], code, "{info}");
    // The domain's own NVRAM, created from the template at the first start.
    let vars = rig.state.join(format!("nvram/{NAME}.fd"));
    assert_eq!(info["firmware"]["nvram"], json!(vars), "{info}");

    // Boot.
    let t_start = Instant::now();
    rig.ok(&["start", NAME]);
    let ready = wait_marker(&rig, "QLIVE-GUEST-READY", 1, BOOT_TIMEOUT);
    let boot_time = t_start.elapsed();
    eprintln!(
        "debian: boot to ready {:.1} s (guest uptime {} s): {}",
        boot_time.as_secs_f64(),
        field(&ready[0], "uptime"),
        ready[0]
    );
    assert_eq!(field(&ready[0], "boot"), "1", "a fresh copy's first boot");
    assert_eq!(field(&ready[0], "qga"), "1", "{}", ready[0]);
    assert_eq!(
        field(&ready[0], "ip"),
        meta["network"]["guest_ip"].as_str().unwrap()
    );
    let lines = console_lines(&rig);
    assert!(
        lines.iter().any(|l| l == "QLIVE-EFIVAR none"),
        "no test variable before the first write: {}",
        lines_tail(&lines, 30)
    );
    assert!(
        lines
            .iter()
            .any(|l| l == &format!("QLIVE-EFIVAR-WRITTEN value={efivar_value}")),
        "the test variable was not written: {}",
        lines_tail(&lines, 30)
    );
    assert_eq!(version(&rig), "7.2", "started on the system QEMU");

    let guest = Guest {
        efivar_path,
        efivar_value: efivar_value.clone(),
        taken0,
        pages,
    };
    let mut stream = Stream::open(&rig, addr);
    let rtt0 = guest.check(&rig, &mut stream, "after boot");
    eprintln!("debian: after boot: {rtt0}");

    let mut figures: Vec<Figure> = Vec::new();
    let mut report = |f: Figure| {
        eprintln!("{}", f.line());
        figures.push(f);
    };

    // 1, 2: 7.2 -> 10.0 -> 7.2.
    for (i, target) in [(1, &new), (2, &old)] {
        let mut f = migrate_ok(&rig, &stream, target, &format!("{i}"));
        f.rtt = guest.check(&rig, &mut stream, &format!("after migration {i}"));
        report(f);
    }

    // 3: a required-feature hook refuses the destination: the migration
    // fails before switchover and the guest stays where it is.
    rig.add_hook(
        "50-feature",
        "[ \"$2\" = prepare ] && { echo 'feature qlive-test-x missing on this host' >&2; exit 1; }; exit 0",
    );
    let before = rig.info(NAME);
    let t = stream.now();
    let (code, err) = rig.fails(&["migrate", NAME, "--emulator", new.to_str().unwrap()]);
    let t_end = stream.now();
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("50-feature") && err.contains("feature qlive-test-x missing"),
        "{err}"
    );
    let after = rig.info(NAME);
    assert_eq!(after["domid"], before["domid"], "the source kept: {after}");
    assert_eq!(after["pid"], before["pid"], "the source kept: {after}");
    assert_eq!(after["emulator"], SYSTEM_QEMU, "{after}");
    assert_eq!(
        Rig::ls(&rig.run.join(format!("domains/{NAME}")))
            .iter()
            .filter(|e| e.parse::<u64>().is_ok())
            .cloned()
            .collect::<Vec<_>>(),
        vec![before["domid"].to_string()],
        "only the source's instance directory"
    );
    std::fs::remove_file(rig.hooks.join("50-feature")).expect("remove the hook");
    let rtt = guest.check(&rig, &mut stream, "after the refused migration");
    report(Figure {
        what: format!("3 ({} -> 10.0)", version(&rig)),
        outcome: "refused by a prepare hook, source kept".into(),
        stall: stream.largest_gap(t, t_end),
        rtt,
        downtime_ms: None,
        total_ms: None,
    });

    // 4: 7.2 -> 10.0.
    let mut f = migrate_ok(&rig, &stream, &new, "4");
    f.rtt = guest.check(&rig, &mut stream, "after migration 4");
    report(f);

    // An agent SIGKILL between migrations: the next agent (this one
    // pauses migrations at Finish, for step 5) re-adopts the guest.
    let before = rig.info(NAME);
    let t = stream.now();
    rig.kill_agent();
    rig.start_agent_with(&[("QLIVE_TEST_PAUSE_AT", "finish:before")]);
    let t_end = stream.now();
    let after = rig.info(NAME);
    assert_eq!(after["pid"], before["pid"], "re-adopted: {after}");
    assert_eq!(after["domid"], before["domid"], "re-adopted: {after}");
    let rtt = guest.check(&rig, &mut stream, "after an agent SIGKILL");
    let readopt_stall = stream.largest_gap(t, t_end);
    eprintln!(
        "debian: agent SIGKILL + restart between migrations: re-adopted pid {}, TCP stall {:.0} ms, {rtt}",
        after["pid"],
        readopt_stall.as_secs_f64() * 1000.0,
    );

    // 5: 10.0 -> 7.2, the agent SIGKILLed in the middle (Finish, before
    // the destination's `cont`); the next agent switches to the
    // destination.
    let before = rig.info(NAME);
    let t = stream.now();
    let mig = rig.migrate_bg(NAME, &["--emulator", SYSTEM_QEMU]);
    rig.wait_test_paused(NAME, Duration::from_secs(120));
    let job: Value = serde_json::from_slice(
        &std::fs::read(rig.run.join(format!("domains/{NAME}/job.json"))).expect("job.json"),
    )
    .expect("job.json");
    let dst_domid = job
        .get("dst")
        .map(|d| d["domid"].clone())
        .or_else(|| job.get("dst_domid").cloned())
        .unwrap_or_else(|| panic!("no destination in job.json: {job}"));
    rig.kill_agent();
    let o = mig.join().expect("migrate thread");
    assert!(!o.status.success(), "the client lost its agent");
    rig.start_agent();
    let t_end = stream.now();
    let log = rig.agent_log_text();
    let line = log
        .lines()
        .rfind(|l| l.contains("recovering interrupted migration"))
        .unwrap_or_else(|| panic!("recovery did not run: {}", tail(&log, 20)));
    assert!(
        line.contains("SwitchToDestination { cont_dst: true }"),
        "{line}"
    );
    let after = rig.info(NAME);
    assert_eq!(after["domid"], dst_domid, "the destination kept: {after}");
    assert_ne!(after["pid"], before["pid"], "{after}");
    assert_eq!(after["emulator"], SYSTEM_QEMU, "{after}");
    let rtt = guest.check(&rig, &mut stream, "after the agent died mid-migration");
    report(Figure {
        what: format!("5 ({} -> {})", major_minor(&before), version(&rig)),
        outcome: "agent SIGKILLed in Finish, recovered to dst".into(),
        stall: stream.largest_gap(t, t_end),
        rtt,
        downtime_ms: None,
        total_ms: None,
    });

    // 6, 7: 7.2 -> 10.0 -> 7.2 under the recovered agent.
    for (i, target) in [(6, &new), (7, &old)] {
        let mut f = migrate_ok(&rig, &stream, target, &format!("{i}"));
        f.rtt = guest.check(&rig, &mut stream, &format!("after migration {i}"));
        report(f);
    }
    let streamed = stream.finish();
    assert_eq!(streamed.why, "stopped", "{streamed:?}");
    assert_eq!(
        streamed.bad, 0,
        "bad bytes from offset {:?}: {streamed:?}",
        streamed.first_bad
    );

    // A guest reboot on the same QEMU: OVMF reads the NVRAM back (the
    // variable is there, not written again), the network comes back.
    let pid = rig.info(NAME)["pid"].clone();
    let n_lines = console_lines(&rig).len();
    let t_reboot = Instant::now();
    let r = qga(
        &rig,
        json!({"execute": "guest-shutdown", "arguments": {"mode": "reboot"}}),
    );
    assert_eq!(r, Value::Null);
    let ready = wait_marker(&rig, "QLIVE-GUEST-READY", 2, BOOT_TIMEOUT);
    let reboot_time = t_reboot.elapsed();
    eprintln!(
        "debian: reboot to ready {:.1} s: {}",
        reboot_time.as_secs_f64(),
        ready[1]
    );
    assert_eq!(field(&ready[1], "boot"), "2", "{}", ready[1]);
    assert_eq!(rig.info(NAME)["pid"], pid, "rebooted in the same QEMU");
    let second_boot: Vec<String> = console_lines(&rig)[n_lines..].to_vec();
    assert!(
        second_boot.iter().any(|l| l == "QLIVE-GUEST-REBOOT"),
        "no clean shutdown before the reboot: {}",
        lines_tail(&second_boot, 30)
    );
    assert!(
        second_boot
            .iter()
            .any(|l| l == &format!("QLIVE-EFIVAR value={efivar_value}")),
        "the NVRAM lost the variable: {}",
        lines_tail(&second_boot, 30)
    );
    assert!(
        !second_boot
            .iter()
            .any(|l| l.starts_with("QLIVE-EFIVAR-WRITTEN")),
        "the variable was written again: {}",
        lines_tail(&second_boot, 30)
    );
    let mut stream2 = Stream::open(&rig, addr);
    let rtt_reboot = guest.check(&rig, &mut stream2, "after the reboot");
    stream2.assert_flowing(200 * 1024, Duration::from_secs(20), "after the reboot");
    let streamed2 = stream2.finish();
    assert_eq!(streamed2.bad, 0, "{streamed2:?}");

    // A clean ACPI shutdown, then the file system.
    let t_stop = Instant::now();
    let out = rig.ok(&["stop", NAME]);
    let stop_time = t_stop.elapsed();
    assert_eq!(out.trim(), format!("{NAME} shut down"), "not a clean stop");
    let lines = console_lines(&rig);
    assert!(
        lines.iter().any(|l| l == "QLIVE-GUEST-POWEROFF"),
        "no clean poweroff: {}",
        lines_tail(&lines, 20)
    );
    let info = rig.info(NAME);
    assert_eq!(info["state"], "shut-off", "{info}");
    assert_eq!(info["reason"], "shut down on request", "{info}");
    assert_eq!(pages_taken(), taken0, "every huge page back in the pool");
    let fsck = std::process::Command::new("e2fsck")
        .arg("-fn")
        .arg(format!("{}?offset={root_offset}", disk.display()))
        .output()
        .expect("e2fsck");
    let fsck_out = String::from_utf8_lossy(&fsck.stdout).into_owned();
    assert!(
        fsck.status.success(),
        "e2fsck: {}\n{fsck_out}{}",
        fsck.status,
        String::from_utf8_lossy(&fsck.stderr)
    );
    // The variable is in the domain's NVRAM file: its UTF-16LE name, then
    // the value.
    let name16: Vec<u8> = meta["efivar"]["name"]
        .as_str()
        .unwrap()
        .encode_utf16()
        .flat_map(|u| u.to_le_bytes())
        .collect();
    let varsfile = std::fs::read(&vars).expect("VARS file");
    let at = varsfile
        .windows(name16.len())
        .position(|w| w == name16.as_slice())
        .expect("the variable's name in the NVRAM file");
    assert!(
        varsfile[at..]
            .windows(efivar_value.len())
            .take(256)
            .any(|w| w == efivar_value.as_bytes()),
        "the variable's value after its name in the NVRAM file"
    );

    rig.ok(&["undefine", NAME]);
    let (code, err) = rig.fails(&["info", NAME]);
    assert_eq!(code, 1, "{err}");
    assert!(rig.qemu_pids().is_empty(), "a QEMU is left");
    assert!(!vars.exists(), "the NVRAM is removed at undefine");
    let left: Vec<String> = Rig::ls(&rig.run.join(format!("domains/{NAME}")));
    assert!(left.is_empty(), "left in the run dir: {left:?}");
    let links = rig.in_netns("ip", &["-o", "link", "show"]);
    assert!(!links.contains("qlv"), "a tap is left: {links}");

    let total = t_test.elapsed();
    let max_stall = figures.iter().map(|f| f.stall).max().unwrap_or_default();
    eprintln!(
        "debian: summary: boot {:.1} s, {} migration steps ({} completed), 2 agent SIGKILLs, \
         max TCP stall {:.0} ms, {} + {} stream bytes verified (0 bad), reboot to ready {:.1} s, \
         after the reboot {}, stop {:.1} s, e2fsck clean: {}",
        boot_time.as_secs_f64(),
        figures.len(),
        figures
            .iter()
            .filter(|f| f.outcome != "refused by a prepare hook, source kept")
            .count(),
        max_stall.as_secs_f64() * 1000.0,
        streamed.bytes,
        streamed2.bytes,
        reboot_time.as_secs_f64(),
        rtt_reboot,
        stop_time.as_secs_f64(),
        fsck_out.lines().last().unwrap_or("").trim(),
    );
    eprintln!("debian: total {:.1} s", total.as_secs_f64());
}
