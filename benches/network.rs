//! Network benchmark (`make bench-network`, or `cargo bench --bench
//! network`): host <-> guest TCP throughput through three taps, and the TCP
//! stall and retransmits a streaming connection sees across migrations.
//!
//! Every variant boots the same test guest (tests/guest, its TCP service
//! `qlive.tcp_port`: `SINK` and `SOURCE`), 2 vCPUs, the same memory,
//! `pc-q35-7.2`, TCG, on a bridge `br0` (10.0.0.1) in a private network
//! namespace, the guest at 10.0.0.2:
//!
//! (a) `qlive`: through a real qlive agent (`"nics": [{"bridge": "br0"}]`,
//!     the agent's tap: vnet header and the tap guard);
//! (b) `floor`: a plain QEMU 7.2 started by this benchmark with a tap it
//!     creates, `vnet_hdr=on,vhost=off`: vnet header and offloads;
//! (c) `novnet`: the same plain QEMU with `vnet_hdr=off` (qlive before the
//!     tap guard: no offloads).
//!
//! All three are booted first; then REPS rounds, each running every
//! variant once, one at a time, the order rotated per round (the load of a
//! shared host drifts alike for all): host -> guest (the host writes to `SINK` for
//! WARMUP + SECS seconds) and guest -> host (the host reads and checks the
//! pattern of `SOURCE`); the rate is the bytes moved in the SECS seconds after
//! the warm-up. It prints the median MB/s (10^6 bytes) per direction, the
//! ratio to the floor, the retransmits of the sending side, and the tap's
//! state (vnet header, tx checksumming, TSO) as the kernel has it.
//!
//! Then, on (a) only (`stall`): one connection each way at a steady RATE
//! bytes/s while MIGRATIONS `qlive migrate`s alternate between QEMU 10.0
//! (target/qemu-new) and 7.2. Per migration: the longest gap in the guest ->
//! host bytes the host received and in the host -> guest bytes the guest
//! acknowledged (`tcpi_bytes_acked` of the host socket), each in the window
//! from the `migrate` request to 1 s after its answer; the guest's pause
//! (largest heartbeat gap on the console log); QEMU's downtime; and the
//! retransmits in that window (host -> guest: `tcpi_total_retrans` of the
//! host socket; guest -> host: what the guest reports, `TCP INFO` lines).
//!
//! Env: QLIVE_BENCH_SECS (5), QLIVE_BENCH_WARMUP (1), QLIVE_BENCH_REPS (3),
//! QLIVE_BENCH_MIGRATIONS (10), QLIVE_BENCH_STREAM_RATE (bytes/s, 4000000),
//! QLIVE_BENCH_MIB (guest memory, 512), QLIVE_BENCH_VARIANTS
//! (`qlive,floor,novnet,stall`), QLIVE_GUEST_DIR (the test guest, default
//! target/guest; it must have the TCP service).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/common/hbwatch.rs"]
mod hbwatch;

use common::*;
use hbwatch::HbWatch;
use serde_json::{json, Value};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const GUEST_IP: &str = "10.0.0.2";
const HOST_IP: &str = "10.0.0.1";
const TCP_PORT: u16 = 5201;
const NAME: &str = "netbench";
/// The guest's SOURCE pattern (tests/guest/init.c): word i of a 1 MiB table
/// is splitmix64(SEED + i), little-endian; byte o is table[o % 1 MiB].
const PAT_BYTES: usize = 1 << 20;
const PAT_SEED: u64 = 0x51ec_0000;

struct Config {
    secs: f64,
    warmup: f64,
    reps: usize,
    migrations: usize,
    rate: u64,
    mib: u64,
    variants: Vec<String>,
    guest_dir: PathBuf,
}

fn env_or<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(d)
}

impl Config {
    fn from_env() -> Config {
        Config {
            secs: env_or("QLIVE_BENCH_SECS", 5.0),
            warmup: env_or("QLIVE_BENCH_WARMUP", 1.0),
            reps: env_or("QLIVE_BENCH_REPS", 3),
            migrations: env_or("QLIVE_BENCH_MIGRATIONS", 10),
            rate: env_or("QLIVE_BENCH_STREAM_RATE", 4_000_000),
            mib: env_or("QLIVE_BENCH_MIB", 512),
            variants: std::env::var("QLIVE_BENCH_VARIANTS")
                .unwrap_or_else(|_| "qlive,floor,novnet,stall".into())
                .split(',')
                .map(|s| s.trim().to_string())
                .collect(),
            guest_dir: std::env::var_os("QLIVE_GUEST_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| repo_root().join("target/guest")),
        }
    }

    fn has(&self, v: &str) -> bool {
        self.variants.iter().any(|x| x == v)
    }

    fn cmdline(&self) -> String {
        let modules = std::fs::read_to_string(self.guest_dir.join("modules.txt"))
            .unwrap_or_else(|e| panic!("{}/modules.txt: {e}", self.guest_dir.display()));
        format!(
            "console=ttyS0 quiet panic=-1 no_timer_check qlive.pattern_mib=0 qlive.modules={} \
             qlive.net=1 qlive.ip={GUEST_IP}/24 qlive.tcp_port={TCP_PORT}",
            modules.trim()
        )
    }
}

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

// ------------------------------------------------------------ the namespace

fn setup_bridge(ns: &OwnedFd) {
    run_in_netns(ns, "ip", &["link", "set", "lo", "up"]);
    run_in_netns(ns, "ip", &["link", "add", "br0", "type", "bridge"]);
    run_in_netns(
        ns,
        "ip",
        &["addr", "add", &format!("{HOST_IP}/24"), "dev", "br0"],
    );
    run_in_netns(ns, "ip", &["link", "set", "br0", "up"]);
}

/// A TCP connection to the guest made from inside `ns` (a socket belongs
/// to the namespace it was created in; it can be used from any thread).
fn connect_in(ns: &OwnedFd) -> TcpStream {
    let ns = ns.try_clone().expect("dup netns");
    std::thread::spawn(move || {
        enter_netns(&ns);
        let addr: SocketAddr = format!("{GUEST_IP}:{TCP_PORT}").parse().expect("addr");
        let t0 = Instant::now();
        loop {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                Ok(s) => return s,
                Err(e) if t0.elapsed() < Duration::from_secs(30) => {
                    eprintln!("[bench] connect {addr}: {e}, retrying");
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => panic!("connect {addr}: {e}"),
            }
        }
    })
    .join()
    .expect("connect thread")
}

// ------------------------------------------------------------- the console

/// Wait for a line starting with `prefix` in `log`, looking only at what
/// was written from byte `from` on.
fn wait_line(log: &Path, from: u64, prefix: &str, timeout: Duration) -> String {
    let t0 = Instant::now();
    loop {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(log) {
            let _ = f.seek(SeekFrom::Start(from));
            let mut b = Vec::new();
            let _ = f.read_to_end(&mut b);
            text = String::from_utf8_lossy(&b).into_owned();
        }
        // Only complete lines.
        let complete = &text[..text.rfind('\n').map(|i| i + 1).unwrap_or(0)];
        if let Some(l) = complete.lines().find(|l| l.starts_with(prefix)) {
            return l.to_string();
        }
        assert!(
            !complete.contains("GUEST-ERROR"),
            "guest error: {}",
            tail(complete, 10)
        );
        assert!(
            t0.elapsed() < timeout,
            "no `{prefix}` in {} within {timeout:?}: {}",
            log.display(),
            tail(complete, 5)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn log_len(log: &Path) -> u64 {
    std::fs::metadata(log).map(|m| m.len()).unwrap_or(0)
}

fn kv(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

// ------------------------------------------------------ TCP_INFO, the tap

/// The fields of the kernel's `struct tcp_info` this benchmark reads (the
/// libc crate's struct stops before `tcpi_bytes_acked`).
#[derive(Clone, Copy, Default, PartialEq)]
struct TcpInfo {
    total_retrans: u32,
    bytes_acked: u64,
    bytes_retrans: u64,
    /// Duplicate segments the peer reported (D-SACK): retransmits of data
    /// it had received, i.e. spurious ones.
    dsack_dups: u32,
}

fn tcp_info(s: &TcpStream) -> TcpInfo {
    let mut b = [0u8; 256];
    let mut len = b.len() as libc::socklen_t;
    // SAFETY: getsockopt into a buffer of `len` bytes.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            b.as_mut_ptr().cast(),
            &mut len,
        )
    };
    assert!(r == 0 && len >= 220, "TCP_INFO: {r}, {len} bytes");
    // Offsets in include/uapi/linux/tcp.h (Linux 5.x/6.x): 8 bytes of u8
    // fields, then u32s: tcpi_total_retrans is the 24th; tcpi_bytes_acked
    // the third u64 after it; tcpi_bytes_retrans and tcpi_dsack_dups
    // further on.
    let u32_at = |o: usize| u32::from_ne_bytes(b[o..o + 4].try_into().expect("4"));
    let u64_at = |o: usize| u64::from_ne_bytes(b[o..o + 8].try_into().expect("8"));
    TcpInfo {
        total_retrans: u32_at(100),
        bytes_acked: u64_at(120),
        bytes_retrans: u64_at(208),
        dsack_dups: u32_at(216),
    }
}

/// What the kernel says about a tap: QEMU's fd for it (vnet header flag and
/// length) and the device's tx checksumming and TSO (ethtool's ioctls).
fn tap_state(ns: &OwnedFd, pid: i32, tap: &str) -> String {
    const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
    const TUNGETVNETHDRSZ: libc::c_ulong = 0x8004_54d7;
    const IFF_VNET_HDR: i16 = 0x4000;
    let mut vnet = "?".to_string();
    // SAFETY: pidfd_open/pidfd_getfd on a live pid; TUNGETIFF into a
    // 40-byte ifreq; results checked, fds closed.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0) as i32;
        assert!(pidfd >= 0, "pidfd_open {pid}");
        for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if std::fs::read_link(e.path()).ok().as_deref() != Some(Path::new("/dev/net/tun")) {
                continue;
            }
            let Some(n) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let fd = libc::syscall(libc::SYS_pidfd_getfd, pidfd, n, 0) as i32;
            if fd < 0 {
                continue;
            }
            let mut ifr = [0u8; 40];
            let mut len: libc::c_int = 0;
            if libc::ioctl(fd, TUNGETIFF, ifr.as_mut_ptr()) == 0 {
                let name = String::from_utf8_lossy(&ifr[..16])
                    .trim_end_matches('\0')
                    .to_string();
                let flags = i16::from_ne_bytes([ifr[16], ifr[17]]);
                if name == tap {
                    vnet = if flags & IFF_VNET_HDR == 0 {
                        "off".into()
                    } else if libc::ioctl(fd, TUNGETVNETHDRSZ, &mut len) == 0 {
                        format!("on ({len} B)")
                    } else {
                        "on".into()
                    };
                }
            }
            libc::close(fd);
        }
        libc::close(pidfd);
    }
    let onoff = |b: bool| if b { "on" } else { "off" };
    let (csum, tso) = tap_csum_tso(ns, tap);
    let (csum, tso) = (onoff(csum), onoff(tso));
    format!("vnet_hdr {vnet}, tx-checksumming {csum}, tcp-segmentation-offload {tso}")
}

// ------------------------------------------------------------- the pattern

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn pattern() -> Arc<Vec<u8>> {
    let mut v = Vec::with_capacity(PAT_BYTES);
    for i in 0..(PAT_BYTES / 8) as u64 {
        v.extend_from_slice(&splitmix64(PAT_SEED + i).to_le_bytes());
    }
    Arc::new(v)
}

/// Checks a SOURCE stream as it arrives.
struct Verifier {
    pat: Arc<Vec<u8>>,
    off: u64,
}

impl Verifier {
    fn check(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let at = (self.off % PAT_BYTES as u64) as usize;
            let n = data.len().min(PAT_BYTES - at);
            assert!(
                data[..n] == self.pat[at..at + n],
                "guest -> host stream corrupt near byte {}",
                self.off
            );
            self.off += n as u64;
            data = &data[n..];
        }
    }
}

// ------------------------------------------------------------ the variants

/// A guest to measure: its namespace, console log, QEMU pid and tap.
struct Target {
    ns: OwnedFd,
    console: PathBuf,
    pid: i32,
    tap: String,
}

/// (b) and (c): a plain QEMU this benchmark starts, in its own namespace.
struct Plain {
    _dir: tempfile::TempDir,
    child: Child,
    target: Target,
}

impl Drop for Plain {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The namespace (and the tap and bridge in it) goes with the last
        // process in it and `target.ns`.
    }
}

impl Plain {
    fn start(cfg: &Config, vnet_hdr: bool) -> Plain {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::Builder::new()
            .prefix("qln")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let ns = new_netns();
        setup_bridge(&ns);
        let tap = "qbtap0";
        run_in_netns(&ns, "ip", &["tuntap", "add", "dev", tap, "mode", "tap"]);
        run_in_netns(&ns, "ip", &["link", "set", tap, "master", "br0"]);
        run_in_netns(&ns, "ip", &["link", "set", tap, "up"]);
        let console = dir.path().join("console.log");
        std::fs::write(&console, b"").expect("console log");
        let g = guest_image();
        let vnet = if vnet_hdr { "on" } else { "off" };
        let out = std::fs::File::create(dir.path().join("qemu.out")).expect("qemu.out");
        let mut cmd = Command::new(SYSTEM_QEMU);
        cmd.args(["-name", &format!("guest={NAME}-plain")])
            .args(["-machine", "pc-q35-7.2", "-accel", "tcg", "-smp", "2"])
            .args(["-m", &format!("{}M", cfg.mib)])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .args([
                "-chardev",
                &format!("file,id=con,path={},append=on", console.display()),
                "-serial",
                "chardev:con",
            ])
            .arg("-kernel")
            .arg(&g.kernel)
            .arg("-initrd")
            .arg(&g.initrd)
            .args(["-append", &cfg.cmdline()])
            .args([
                "-netdev",
                &format!(
                    "tap,id=n0,ifname={tap},script=no,downscript=no,vnet_hdr={vnet},vhost=off"
                ),
                "-device",
                "virtio-net-pci,netdev=n0,id=net0,mac=52:54:00:42:00:02,romfile=",
            ])
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup"))
            .stderr(out);
        let fd = ns.as_raw_fd();
        // SAFETY: setns and prctl are async-signal-safe. PDEATHSIG: QEMU
        // dies with this benchmark's main thread, even on SIGKILL.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn qemu");
        let pid = child.id() as i32;
        Plain {
            _dir: dir,
            child,
            target: Target {
                ns,
                console,
                pid,
                tap: tap.into(),
            },
        }
    }
}

/// (a): the guest through a real agent.
fn start_qlive(cfg: &Config) -> (Rig, Target) {
    let rig = Rig::new_netns();
    setup_bridge(rig.netns());
    rig.define_guest(
        NAME,
        cfg.mib,
        json!({"vcpus": 2, "cmdline": cfg.cmdline(), "nics": [{"bridge": "br0"}]}),
    );
    let p = rig.state.join(format!("domains/{NAME}.json"));
    let v: Value = serde_json::from_slice(&std::fs::read(&p).expect("stored definition"))
        .expect("stored definition json");
    let def = v.get("definition").cloned().unwrap_or(v);
    let tap = def["nics"][0]["tap"].as_str().expect("tap").to_string();
    rig.ok(&["start", NAME]);
    let pid = rig.info(NAME)["pid"].as_i64().expect("pid") as i32;
    let target = Target {
        ns: rig.netns().try_clone().expect("dup netns"),
        console: rig.console_log(NAME),
        pid,
        tap,
    };
    (rig, target)
}

fn wait_ready(t: &Target) {
    wait_line(&t.console, 0, "TCP UP", Duration::from_secs(90));
    // The first seconds after boot are rough under TCG.
    std::thread::sleep(Duration::from_secs(2));
}

// ------------------------------------------------------------ throughput

#[derive(Default)]
struct Tput {
    up: Vec<f64>,
    down: Vec<f64>,
    up_retrans: Vec<u64>,
    down_retrans: Vec<u64>,
    tap: String,
}

/// Host -> guest: write to SINK; MB/s over `secs` after `warmup`, and the
/// host socket's retransmits.
fn measure_up(t: &Target, cfg: &Config) -> (f64, u64) {
    let mut s = connect_in(&t.ns);
    s.write_all(b"SINK\n").expect("SINK");
    let buf = vec![0x5au8; 64 * 1024];
    let t0 = Instant::now();
    let (warm, end) = (
        t0 + Duration::from_secs_f64(cfg.warmup),
        t0 + Duration::from_secs_f64(cfg.warmup + cfg.secs),
    );
    let mut total = 0u64;
    let mut mark: Option<(Instant, u64)> = None;
    let last = loop {
        s.write_all(&buf).expect("write to SINK");
        total += buf.len() as u64;
        let now = Instant::now();
        if mark.is_none() && now >= warm {
            mark = Some((now, total));
        }
        if now >= end {
            break (now, total);
        }
    };
    let retrans = tcp_info(&s).total_retrans as u64;
    s.shutdown(Shutdown::Write).expect("shutdown");
    s.set_read_timeout(Some(Duration::from_secs(60))).ok();
    let mut reply = String::new();
    s.read_to_string(&mut reply).expect("SINK reply");
    assert_eq!(
        kv(reply.trim(), "bytes"),
        total,
        "the guest's SINK count ({reply:?})"
    );
    let (tw, bw) = mark.expect("warm-up mark");
    let rate = (last.1 - bw) as f64 / last.0.duration_since(tw).as_secs_f64() / 1e6;
    (rate, retrans)
}

/// Guest -> host: read and check SOURCE; MB/s over `secs` after `warmup`,
/// and the guest's retransmits (its `TCP END SOURCE` line).
fn measure_down(t: &Target, cfg: &Config, pat: &Arc<Vec<u8>>) -> (f64, u64) {
    let from = log_len(&t.console);
    let mut s = connect_in(&t.ns);
    let port = s.local_addr().expect("local addr").port();
    s.write_all(b"SOURCE\n").expect("SOURCE");
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let mut v = Verifier {
        pat: pat.clone(),
        off: 0,
    };
    let mut buf = vec![0u8; 256 * 1024];
    let t0 = Instant::now();
    let (warm, end) = (
        t0 + Duration::from_secs_f64(cfg.warmup),
        t0 + Duration::from_secs_f64(cfg.warmup + cfg.secs),
    );
    let mut mark: Option<(Instant, u64)> = None;
    let last = loop {
        let n = s.read(&mut buf).expect("read SOURCE");
        assert!(n > 0, "SOURCE ended early");
        v.check(&buf[..n]);
        let now = Instant::now();
        if mark.is_none() && now >= warm {
            mark = Some((now, v.off));
        }
        if now >= end {
            break (now, v.off);
        }
    };
    drop(s);
    let line = wait_line(
        &t.console,
        from,
        &format!("TCP END SOURCE port={port} "),
        Duration::from_secs(30),
    );
    let (tw, bw) = mark.expect("warm-up mark");
    let rate = (last.1 - bw) as f64 / last.0.duration_since(tw).as_secs_f64() / 1e6;
    (rate, kv(&line, "retrans"))
}

/// One run of a variant: host -> guest, then guest -> host.
fn throughput_run(
    label: &str,
    run: usize,
    t: &Target,
    cfg: &Config,
    pat: &Arc<Vec<u8>>,
    r: &mut Tput,
) {
    let (up, ur) = measure_up(t, cfg);
    std::thread::sleep(Duration::from_millis(500));
    let (down, dr) = measure_down(t, cfg, pat);
    std::thread::sleep(Duration::from_millis(500));
    eprintln!(
        "[bench] {label} run {run}: host->guest {up:.1} MB/s (retrans {ur}), guest->host {down:.1} MB/s (retrans {dr})"
    );
    r.up.push(up);
    r.down.push(down);
    r.up_retrans.push(ur);
    r.down_retrans.push(dr);
}

// ------------------------------------------------------------------ stall

/// Host -> guest at a steady rate; records every change of the bytes the
/// guest acknowledged, and of the retransmit count.
struct UpStream {
    stop: Arc<AtomicBool>,
    /// The host socket's TCP_INFO whenever it changed.
    samples: Arc<Mutex<Vec<(Instant, TcpInfo)>>>,
    handle: std::thread::JoinHandle<u64>,
}

impl UpStream {
    fn start(t: &Target, rate: u64) -> UpStream {
        let mut s = connect_in(&t.ns);
        s.write_all(b"SINK\n").expect("SINK");
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::with_capacity(1 << 16)));
        let (stop2, samples2) = (stop.clone(), samples.clone());
        let handle = std::thread::spawn(move || {
            let chunk = vec![0xa5u8; (rate / 1000).max(1) as usize];
            let t0 = Instant::now();
            let mut k = 0u64;
            let mut total = 0u64;
            let mut last: Option<TcpInfo> = None;
            while !stop2.load(Ordering::Relaxed) {
                // One chunk per millisecond, absolute deadlines.
                s.write_all(&chunk).expect("stream write");
                total += chunk.len() as u64;
                k += 1;
                let deadline = t0 + Duration::from_millis(k);
                loop {
                    let i = tcp_info(&s);
                    if last != Some(i) {
                        last = Some(i);
                        samples2.lock().expect("samples").push((Instant::now(), i));
                    }
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    std::thread::sleep((deadline - now).min(Duration::from_micros(250)));
                }
            }
            s.shutdown(Shutdown::Write).expect("shutdown");
            s.set_read_timeout(Some(Duration::from_secs(60))).ok();
            let mut reply = String::new();
            s.read_to_string(&mut reply).expect("SINK reply");
            assert_eq!(kv(reply.trim(), "bytes"), total, "stream SINK count");
            total
        });
        UpStream {
            stop,
            samples,
            handle,
        }
    }
}

/// Guest -> host at a steady rate (`SOURCE RATE`); records every arrival.
struct DownStream {
    stop: Arc<AtomicBool>,
    arrivals: Arc<Mutex<Vec<(Instant, u64)>>>,
    ctl: TcpStream,
    handle: std::thread::JoinHandle<u64>,
}

impl DownStream {
    fn start(t: &Target, rate: u64, pat: &Arc<Vec<u8>>) -> DownStream {
        let mut s = connect_in(&t.ns);
        writeln!(s, "SOURCE {rate}").expect("SOURCE");
        s.set_read_timeout(Some(Duration::from_millis(100))).ok();
        let ctl = s.try_clone().expect("dup stream");
        let stop = Arc::new(AtomicBool::new(false));
        let arrivals = Arc::new(Mutex::new(Vec::with_capacity(1 << 16)));
        let (stop2, arr2) = (stop.clone(), arrivals.clone());
        let mut v = Verifier {
            pat: pat.clone(),
            off: 0,
        };
        let handle = std::thread::spawn(move || {
            let mut buf = vec![0u8; 256 * 1024];
            while !stop2.load(Ordering::Relaxed) {
                match s.read(&mut buf) {
                    Ok(0) => panic!("stream SOURCE ended"),
                    Ok(n) => {
                        v.check(&buf[..n]);
                        arr2.lock().expect("arrivals").push((Instant::now(), v.off));
                    }
                    Err(e)
                        if e.kind() == std::io::ErrorKind::WouldBlock
                            || e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(e) => panic!("stream read: {e}"),
                }
            }
            v.off
        });
        DownStream {
            stop,
            arrivals,
            ctl,
            handle,
        }
    }

    /// Ask the guest for its retransmit count on this connection.
    fn guest_retrans(&mut self, console: &Path, tag: &str) -> u64 {
        let from = log_len(console);
        writeln!(self.ctl, "INFO {tag}").expect("INFO");
        let l = wait_line(
            console,
            from,
            &format!("TCP INFO {tag} "),
            Duration::from_secs(20),
        );
        kv(&l, "retrans")
    }
}

/// The largest gap between consecutive times in `ts` (sorted) that ends in
/// [from, to], counting from the last time before `from`.
fn max_gap(ts: &[Instant], from: Instant, to: Instant) -> f64 {
    let start = ts.partition_point(|t| *t < from).saturating_sub(1);
    let end = ts.partition_point(|t| *t <= to);
    ts[start..end]
        .windows(2)
        .map(|w| w[1].duration_since(w[0]).as_secs_f64() * 1e3)
        .fold(0.0, f64::max)
}

struct StallRow {
    to: String,
    down_gap: f64,
    up_gap: f64,
    pause: f64,
    downtime: f64,
    up_retrans: u64,
    up_dsack: u64,
    up_retrans_bytes: u64,
    down_retrans: u64,
    idle_down: f64,
    idle_up: f64,
}

fn stall(rig: &Rig, t: &Target, cfg: &Config, pat: &Arc<Vec<u8>>) -> Vec<StallRow> {
    let new_qemu = new_qemu();
    let emulators = [new_qemu.to_string_lossy().into_owned(), SYSTEM_QEMU.into()];
    let watch = HbWatch::start(&t.console).expect("watch console");
    let up = UpStream::start(t, cfg.rate);
    let mut down = DownStream::start(t, cfg.rate, pat);
    std::thread::sleep(Duration::from_secs(2));
    let mut windows = vec![];
    for i in 0..cfg.migrations {
        let emu = &emulators[i % 2];
        let g0 = down.guest_retrans(&t.console, &format!("b{i}"));
        std::thread::sleep(Duration::from_millis(700));
        let m0 = Instant::now();
        let r = rig.migrate(NAME, &["--emulator", emu]);
        let m1 = Instant::now();
        std::thread::sleep(Duration::from_secs(1));
        let w1 = m1 + Duration::from_secs(1);
        let g1 = down.guest_retrans(&t.console, &format!("a{i}"));
        let to = r["to"]["qemu_version"]
            .as_str()
            .unwrap_or("?")
            .split('.')
            .take(2)
            .collect::<Vec<_>>()
            .join(".");
        let from = r["from"]["qemu_version"]
            .as_str()
            .unwrap_or("?")
            .split('.')
            .take(2)
            .collect::<Vec<_>>()
            .join(".");
        let pause = watch.max_gap(m0, w1).map(|g| g.ms).unwrap_or(f64::NAN);
        let downtime = r["qemu_downtime_ms"].as_f64().unwrap_or(f64::NAN);
        eprintln!(
            "[bench] migration {} ({from} -> {to}): downtime {downtime} ms, pause {pause:.1} ms, guest retrans {}",
            i + 1,
            g1 - g0
        );
        windows.push((format!("{from} -> {to}"), m0, w1, pause, downtime, g1 - g0));
    }
    std::thread::sleep(Duration::from_millis(500));
    up.stop.store(true, Ordering::Relaxed);
    down.stop.store(true, Ordering::Relaxed);
    let up_total = up.handle.join().expect("up stream");
    let down_total = down.handle.join().expect("down stream");
    drop(down.ctl);
    eprintln!("[bench] streams: host->guest {up_total} B (all counted by the guest), guest->host {down_total} B (pattern intact)");
    let ups = up.samples.lock().expect("samples").clone();
    let acked: Vec<Instant> = {
        let mut v = vec![];
        let mut last = u64::MAX;
        for &(t, i) in &ups {
            if i.bytes_acked != last {
                v.push(t);
                last = i.bytes_acked;
            }
        }
        v
    };
    let info_at = |t: Instant| -> TcpInfo {
        let i = ups.partition_point(|s| s.0 <= t);
        if i == 0 {
            TcpInfo::default()
        } else {
            ups[i - 1].1
        }
    };
    let arr: Vec<Instant> = down
        .arrivals
        .lock()
        .expect("arrivals")
        .iter()
        .map(|a| a.0)
        .collect();
    windows
        .into_iter()
        .map(|(to, m0, w1, pause, downtime, gr)| {
            let idle0 = m0 - Duration::from_millis(600);
            let (a, b) = (info_at(m0), info_at(w1));
            StallRow {
                to,
                down_gap: max_gap(&arr, m0, w1),
                up_gap: max_gap(&acked, m0, w1),
                pause,
                downtime,
                up_retrans: u64::from(b.total_retrans - a.total_retrans),
                up_dsack: u64::from(b.dsack_dups - a.dsack_dups),
                up_retrans_bytes: b.bytes_retrans - a.bytes_retrans,
                down_retrans: gr,
                idle_down: max_gap(&arr, idle0, m0),
                idle_up: max_gap(&acked, idle0, m0),
            }
        })
        .collect()
}

// -------------------------------------------------------------------- main

fn main() {
    let cfg = Config::from_env();
    assert!(
        cfg.guest_dir.join("initrd.img").is_file(),
        "no test guest in {}: run `make guest` (or set QLIVE_GUEST_DIR)",
        cfg.guest_dir.display()
    );
    // The rig reads the guest from QLIVE_GUEST_DIR too.
    std::env::set_var("QLIVE_GUEST_DIR", &cfg.guest_dir);
    let pat = pattern();
    let mut stalls: Vec<StallRow> = vec![];
    // All guests are booted first and the runs interleaved, one variant at
    // a time, the order rotated every round: on a shared 2-core host the
    // load drifts, and it then drifts for every variant alike. The idle
    // guests cost the same to each.
    let qlive = (cfg.has("qlive") || cfg.has("stall")).then(|| {
        eprintln!("[bench] qlive: booting through the agent");
        start_qlive(&cfg)
    });
    let mut plains = vec![];
    for (v, vnet) in [("floor", true), ("novnet", false)] {
        if cfg.has(v) {
            eprintln!("[bench] {v}: plain QEMU 7.2, vnet_hdr={vnet}");
            plains.push((v, Plain::start(&cfg, vnet)));
        }
    }
    let mut targets: Vec<(&str, &Target)> = vec![];
    if let Some((_, t)) = &qlive {
        if cfg.has("qlive") {
            targets.push(("qlive", t));
        }
        wait_ready(t);
    }
    for (v, p) in &plains {
        wait_ready(&p.target);
        targets.push((v, &p.target));
    }
    let mut results: Vec<(&str, Tput)> = targets
        .iter()
        .map(|(v, t)| {
            let tap = tap_state(&t.ns, t.pid, &t.tap);
            eprintln!("[bench] {v}: tap {}: {tap}", t.tap);
            (
                *v,
                Tput {
                    tap,
                    ..Default::default()
                },
            )
        })
        .collect();
    for run in 0..cfg.reps {
        for k in 0..targets.len() {
            let i = (k + run) % targets.len();
            let (v, t) = targets[i];
            throughput_run(v, run + 1, t, &cfg, &pat, &mut results[i].1);
        }
    }
    drop(targets);
    drop(plains);
    if let Some((rig, t)) = &qlive {
        if cfg.has("stall") && cfg.migrations > 0 {
            stalls = stall(rig, t, &cfg, &pat);
        }
        rig.ok(&["destroy", NAME]);
    }

    println!();
    println!(
        "qlive network benchmark: host <-> guest TCP, TCG, 2 vCPUs, {} MiB, pc-q35-7.2, QEMU 7.2; \
         {} runs of {} s after {} s warm-up, interleaved; median MB/s (10^6 B/s)",
        cfg.mib, cfg.reps, cfg.secs, cfg.warmup
    );
    let floor = results.iter().find(|r| r.0 == "floor").map(|r| &r.1);
    let label = |v: &str| match v {
        "qlive" => "qlive (agent tap)",
        "floor" => "plain QEMU, vnet_hdr=on (floor)",
        _ => "plain QEMU, vnet_hdr=off",
    };
    println!(
        "  {:<32} {:>12} {:>7} {:>12} {:>7} {:>10} {:>10}",
        "variant", "host->guest", "/floor", "guest->host", "/floor", "retrans up", "retrans dn"
    );
    for (v, r) in &results {
        let (u, d) = (median(&r.up), median(&r.down));
        let (fu, fd) = floor
            .map(|f| (u / median(&f.up), d / median(&f.down)))
            .unwrap_or((f64::NAN, f64::NAN));
        println!(
            "  {:<32} {:>12.1} {:>7.2} {:>12.1} {:>7.2} {:>10} {:>10}",
            label(v),
            u,
            fu,
            d,
            fd,
            r.up_retrans.iter().sum::<u64>(),
            r.down_retrans.iter().sum::<u64>()
        );
    }
    println!("  runs (MB/s):");
    for (v, r) in &results {
        let f = |x: &[f64]| {
            x.iter()
                .map(|v| format!("{v:.1}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        println!(
            "    {:<30} host->guest {}; guest->host {}",
            label(v),
            f(&r.up),
            f(&r.down)
        );
    }
    println!("  tap state after boot (the kernel's view):");
    for (v, r) in &results {
        println!("    {:<30} {}", label(v), r.tap);
    }
    if let (Some(q), Some(f)) = (results.iter().find(|r| r.0 == "qlive").map(|r| &r.1), floor) {
        let (ru, rd) = (
            median(&q.up) / median(&f.up),
            median(&q.down) / median(&f.down),
        );
        println!(
            "  qlive / floor: host->guest {ru:.2}, guest->host {rd:.2} (goal >= 0.95): {}",
            if ru >= 0.95 && rd >= 0.95 {
                "met"
            } else {
                "NOT met"
            }
        );
    }
    if !stalls.is_empty() {
        println!();
        println!(
            "streaming across {} migrations (qlive): {} B/s each way; gaps in ms, \
             window from the migrate request to 1 s after its answer",
            stalls.len(),
            cfg.rate
        );
        println!(
            "  {:>2} {:<13} {:>8} {:>8} {:>7} {:>8} {:>7} {:>8} {:>7} {:>7} {:>7} {:>7}",
            "#",
            "QEMU",
            "stall dn",
            "stall up",
            "pause",
            "downtime",
            "retr up",
            "B retr",
            "dsack",
            "retr dn",
            "idle dn",
            "idle up"
        );
        for (i, s) in stalls.iter().enumerate() {
            println!(
                "  {:>2} {:<13} {:>8.1} {:>8.1} {:>7.1} {:>8.0} {:>7} {:>8} {:>7} {:>7} {:>7.1} {:>7.1}",
                i + 1,
                s.to,
                s.down_gap,
                s.up_gap,
                s.pause,
                s.downtime,
                s.up_retrans,
                s.up_retrans_bytes,
                s.up_dsack,
                s.down_retrans,
                s.idle_down,
                s.idle_up
            );
        }
        println!(
            "  stall dn/up: longest gap in guest->host bytes received / host->guest bytes acknowledged; \
             pause: longest heartbeat gap; retr up, B retr, dsack: host socket's retransmitted segments, \
             bytes, and duplicates the guest reported (D-SACK: spurious retransmits); retr dn: the guest's \
             retransmits; idle: longest gap in the 600 ms before the request"
        );
        let col = |f: fn(&StallRow) -> f64| stalls.iter().map(f).collect::<Vec<f64>>();
        let max = |v: Vec<f64>| v.into_iter().fold(f64::NAN, f64::max);
        let (dn, upg, pause) = (col(|s| s.down_gap), col(|s| s.up_gap), col(|s| s.pause));
        let (ru, rd, dup): (u64, u64, u64) = (
            stalls.iter().map(|s| s.up_retrans).sum(),
            stalls.iter().map(|s| s.down_retrans).sum(),
            stalls.iter().map(|s| s.up_dsack).sum(),
        );
        println!(
            "  stall guest->host: median {:.1}, max {:.1} ms; host->guest (acks): median {:.1}, max {:.1} ms; guest pause: median {:.1}, max {:.1} ms",
            median(&dn),
            max(dn.clone()),
            median(&upg),
            max(upg.clone()),
            median(&pause),
            max(pause.clone())
        );
        println!(
            "  retransmits during the migrations: host->guest {ru} (host socket; {dup} reported as duplicates by the guest), \
             guest->host {rd} (guest socket); goal: none for a lost frame (host->guest not spurious: {}): {}",
            ru.saturating_sub(dup),
            if ru.saturating_sub(dup) + rd == 0 {
                "met"
            } else {
                "NOT met"
            }
        );
    }
}
