//! `qlive adopt --dry-run` against QEMUs started by hand, as a user would,
//! on QEMU 7.2 and 10.0: the learned definition (machine pinned, memory,
//! disk, NIC MAC and tap, RAM block `pc.ram`), a definition checked
//! against it, a QEMU with hardware qlive cannot reproduce refused naming
//! each piece, and every foreign QEMU still running untouched afterwards
//! (same pid, `query-status` running). The QEMUs are killed at the end by
//! a guard, also when the test fails.

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A QEMU started by hand in the rig's network namespace; killed on drop.
struct Foreign {
    child: Child,
    qmp: PathBuf,
}

impl Drop for Foreign {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Foreign {
    fn start(rig: &Rig, emulator: &Path, tag: &str, devices: &[String]) -> Foreign {
        Foreign::start_with(
            rig,
            emulator,
            tag,
            devices,
            "console=ttyS0 quiet panic=-1 no_timer_check",
            256,
        )
    }

    fn start_with(
        rig: &Rig,
        emulator: &Path,
        tag: &str,
        devices: &[String],
        append: &str,
        memory_mib: u64,
    ) -> Foreign {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let g = guest_image();
        let dir = rig.dir.path();
        let qmp = dir.join(format!("{tag}.qmp"));
        let mut cmd = Command::new(emulator);
        cmd.args(["-accel", "tcg", "-machine", "q35", "-smp", "1"])
            .arg("-m")
            .arg(memory_mib.to_string())
            .arg("-kernel")
            .arg(&g.kernel)
            .arg("-initrd")
            .arg(&g.initrd)
            .args(["-append", append])
            .args(["-nographic", "-nodefaults", "-serial"])
            .arg(format!(
                "file:{}",
                dir.join(format!("{tag}.console")).display()
            ))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .args(devices)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join(format!("{tag}.stderr"))).expect("stderr file"));
        let fd = rig.netns().as_raw_fd();
        // SAFETY: setns is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut f = Foreign {
            child: cmd.spawn().expect("spawn QEMU"),
            qmp,
        };
        let t0 = Instant::now();
        while !f.qmp.exists() {
            if let Ok(Some(st)) = f.child.try_wait() {
                panic!(
                    "QEMU {tag} exited ({st}): {}",
                    std::fs::read_to_string(dir.join(format!("{tag}.stderr"))).unwrap_or_default()
                );
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "no QMP socket for {tag}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        f
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Still the same process, and its guest still runs.
    fn assert_untouched(&mut self) {
        assert!(
            matches!(self.child.try_wait(), Ok(None)),
            "the foreign QEMU {} exited",
            self.pid()
        );
        let s = UnixStream::connect(&self.qmp).expect("connect QMP");
        s.set_read_timeout(Some(Duration::from_secs(10))).ok();
        let mut w = s.try_clone().expect("clone");
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).expect("greeting");
        let mut reply = |cmd: &str| -> Value {
            writeln!(w, "{}", json!({"execute": cmd})).expect("write");
            loop {
                let mut l = String::new();
                r.read_line(&mut l).expect("read");
                let v: Value = serde_json::from_str(&l).expect("json");
                if v.get("event").is_none() {
                    return v;
                }
            }
        };
        reply("qmp_capabilities");
        let st = reply("query-status");
        assert_eq!(st["return"]["status"], "running", "{st}");
    }
}

fn image(rig: &Rig, name: &str) -> PathBuf {
    let p = rig.dir.path().join(name);
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&p)
        .arg("64M")
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    p
}

fn adopt(rig: &Rig, name: &str, qmp: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["adopt", name, "--qmp", qmp.to_str().expect("utf8")];
    args.extend_from_slice(extra);
    rig.qlive(&args)
}

/// The adoptable QEMU: a disk and a NIC on a tap (no option ROM: qlive's
/// NICs have none, see docs/adopting.md).
fn plain_devices(img: &Path, tap: &str, mac: &str) -> Vec<String> {
    [
        "-drive".to_string(),
        format!("file={},format=qcow2,if=none,id=d0", img.display()),
        "-device".into(),
        "virtio-blk-pci,drive=d0".into(),
        "-netdev".into(),
        format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
        "-device".into(),
        format!("virtio-net-pci,netdev=n0,mac={mac},romfile="),
    ]
    .to_vec()
}

#[test]
fn adopt_dry_run_learns_plain_qemus_and_refuses_what_qlive_cannot_reproduce() {
    let rig = Rig::new_netns();
    let new = new_qemu();
    let cases = [
        (
            PathBuf::from(SYSTEM_QEMU),
            "7.2",
            "old",
            "tapold0",
            "52:54:00:a1:00:01",
        ),
        (new.clone(), "10.0", "new", "tapnew0", "52:54:00:a1:00:02"),
    ];
    // All QEMUs at once: the guests boot in parallel with the checks.
    let mut foreign: Vec<Foreign> = cases
        .iter()
        .map(|(emu, _, tag, tap, mac)| {
            let img = image(&rig, &format!("{tag}.qcow2"));
            Foreign::start(&rig, emu, tag, &plain_devices(&img, tap, mac))
        })
        .collect();
    let odd_img = image(&rig, "odd.qcow2");
    let odd_devices: Vec<String> = [
        "-drive",
        &format!("file={},format=qcow2,if=none,id=d0", odd_img.display()),
        "-device",
        "virtio-blk-pci,drive=d0",
        "-netdev",
        "user,id=u0",
        "-device",
        "virtio-net-pci,netdev=u0",
        "-device",
        "usb-ehci",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut odd = Foreign::start(&rig, Path::new(SYSTEM_QEMU), "odd", &odd_devices);
    // The foreign taps are ports of a bridge: an adopted guest moves onto
    // a tap of qlive's on the same bridge.
    bridge(&rig, &["tapold0", "tapnew0"]);

    for ((emu, version, tag, tap, mac), f) in cases.iter().zip(foreign.iter_mut()) {
        let name = format!("vm-{tag}");
        let out = adopt(&rig, &name, &f.qmp, &["--dry-run", "--json"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "QEMU {version}: {}\n{stdout}\nagent log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            tail(&rig.agent_log_text(), 20)
        );
        let plan: Value = serde_json::from_str(&stdout).expect("adopt --json");
        assert_eq!(plan["ok"], true, "{plan}");
        assert_eq!(plan["pid"], f.pid(), "{plan}");
        assert!(
            plan["qemu_version"]
                .as_str()
                .unwrap_or("")
                .starts_with(version),
            "{plan}"
        );
        let d = &plan["definition"];
        assert_eq!(d["name"], name.as_str());
        assert_eq!(d["machine"], format!("pc-q35-{version}"), "{d}");
        assert_eq!(d["memory_mib"], 256);
        assert_eq!(d["vcpus"], 1);
        assert_eq!(d["accel"], "tcg");
        assert_eq!(d["kernel"], json!(guest_image().kernel));
        assert_eq!(
            d["disks"][0]["path"],
            json!(rig.dir.path().join(format!("{tag}.qcow2")))
        );
        assert_eq!(d["disks"][0]["format"], "qcow2");
        assert_eq!(d["nics"], json!([{"mac": mac, "bridge": "br0"}]), "{d}");
        // emulator: the binary that runs (the 10.0 wrapper execs it)
        let exe = std::fs::read_link(format!("/proc/{}/exe", f.pid())).expect("exe");
        assert_eq!(d["emulator"], json!(exe));
        if emu != Path::new(SYSTEM_QEMU) {
            // the wrapper's -L data directories are kept
            assert_eq!(d["extra_args"][0], "-L", "{d}");
        }
        let facts = &plan["facts"];
        assert_eq!(facts["ram"]["block"], "pc.ram", "{facts}");
        assert_eq!(facts["ram"]["shared"], false);
        assert_eq!(facts["nics"][0]["tap"], *tap);
        assert_eq!(facts["nics"][0]["source"]["by"], "ifname", "{facts}");

        // Without --json: the definition itself, which define would take.
        let out = adopt(&rig, &name, &f.qmp, &["--dry-run"]);
        assert!(out.status.success());
        let printed: Value = serde_json::from_slice(&out.stdout).expect("definition JSON");
        assert_eq!(&printed, d);

        // --definition: the learned one matches; a changed one is named.
        let file = rig.dir.path().join(format!("{tag}.json"));
        std::fs::write(&file, d.to_string()).expect("write");
        let out = adopt(
            &rig,
            &name,
            &f.qmp,
            &["--dry-run", "--definition", file.to_str().unwrap()],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut changed = d.clone();
        changed["memory_mib"] = 512.into();
        changed["machine"] = "q35".into();
        changed["nics"][0]["mac"] = "52:54:00:ff:ff:ff".into();
        std::fs::write(&file, changed.to_string()).expect("write");
        let out = adopt(
            &rig,
            &name,
            &f.qmp,
            &["--dry-run", "--definition", file.to_str().unwrap()],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        for want in [
            "memory_mib: the definition says 512",
            "machine: the definition says q35",
            "nics[0].mac",
        ] {
            assert!(err.contains(want), "{want}: {err}");
        }

        // Adopting with a definition that does not match: refused before
        // anything is stored or migrated.
        let out = adopt(
            &rig,
            &name,
            &f.qmp,
            &["--definition", file.to_str().unwrap()],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains("the definition does not match the guest")
                && err.contains("nothing was changed"),
            "{err}"
        );
    }

    let out = adopt(&rig, "vm-odd", &odd.qmp, &["--dry-run"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    for want in [
        "cannot adopt:",
        "-device usb-ehci (device not in qlive's definition format)",
        "-netdev user (only tap backends)",
        "option ROM",
    ] {
        assert!(err.contains(want), "{want}: {err}");
    }
    assert!(out.stdout.is_empty(), "a refusal prints no definition");
    // The same without --dry-run: the same refusal, nothing migrated.
    let out = adopt(&rig, "vm-odd", &odd.qmp, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("-netdev user (only tap backends)") && err.contains("nothing was changed"),
        "{err}"
    );

    // Nothing was defined, and every foreign QEMU runs on untouched.
    assert_eq!(rig.ok(&["list", "--json"]).trim(), "[]");
    for f in foreign.iter_mut().chain(std::iter::once(&mut odd)) {
        f.assert_untouched();
    }
}

#[test]
fn a_busy_qmp_socket_is_an_error_not_a_wait() {
    let rig = Rig::new_netns();
    let img = image(&rig, "busy.qcow2");
    let mut f = Foreign::start(
        &rig,
        Path::new(SYSTEM_QEMU),
        "busy",
        &plain_devices(&img, "tapbusy0", "52:54:00:a1:00:03"),
    );
    let mut holder = UnixStream::connect(&f.qmp).expect("connect");
    let mut greeting = [0u8; 64];
    std::io::Read::read(&mut holder, &mut greeting).expect("greeting");
    let t0 = Instant::now();
    let out = adopt(&rig, "vm-busy", &f.qmp, &["--dry-run"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("is busy: QEMU serves one client at a time"),
        "{err}"
    );
    assert!(t0.elapsed() < Duration::from_secs(10));
    drop(holder);
    f.assert_untouched();
}

/// `br0` in the rig's namespace, up, with `ports` as its ports.
fn bridge(rig: &Rig, ports: &[&str]) {
    rig.in_netns("ip", &["link", "add", "br0", "type", "bridge"]);
    rig.in_netns(
        "ip",
        &["addr", "add", &format!("{HOST_IP}/24"), "dev", "br0"],
    );
    rig.in_netns("ip", &["link", "set", "br0", "up"]);
    for p in ports {
        rig.in_netns("ip", &["link", "set", p, "master", "br0"]);
        rig.in_netns("ip", &["link", "set", p, "up"]);
    }
}

const HOST_IP: &str = "10.0.9.1";
const GUEST_IP: &str = "10.0.9.2";
const UDP_PORT: u16 = 7777;

fn guest_cmdline(extra: &str) -> String {
    let modules = std::fs::read_to_string(repo_root().join("target/guest/modules.txt"))
        .expect("target/guest/modules.txt: run `make guest`");
    format!(
        "console=ttyS0 quiet panic=-1 no_timer_check qlive.modules={} qlive.disk=/dev/vda \
         qlive.disk_rate=200 qlive.net=1 qlive.ip={GUEST_IP}/24 qlive.udp_port={UDP_PORT} {extra}",
        modules.trim()
    )
}

/// Datagrams `0..n` from the rig's namespace to the guest's echo port,
/// each sent again every 200 ms until it is echoed; how many were echoed
/// within `timeout`. It checks that the guest's network works, not a loss
/// count: a TCG guest on a loaded host drops datagrams now and then
/// (tests/devices.rs counts losses, alone on the machine).
fn udp_echoes(rig: &Rig, n: u32, timeout: Duration) -> u32 {
    let ns = rig.netns().try_clone().expect("dup netns");
    std::thread::spawn(move || {
        enter_netns(&ns);
        let s = std::net::UdpSocket::bind((HOST_IP, 0)).expect("bind");
        s.set_read_timeout(Some(Duration::from_millis(20))).ok();
        let t0 = Instant::now();
        let mut got = std::collections::BTreeSet::new();
        let mut buf = [0u8; 64];
        let mut last_round: Option<Instant> = None;
        let mut rounds = 0u32;
        while t0.elapsed() < timeout && (got.len() as u32) < n {
            if last_round.is_none_or(|t| t.elapsed() >= Duration::from_millis(200)) {
                for i in (0..n).filter(|i| !got.contains(i)) {
                    let _ = s.send_to(&i.to_le_bytes(), (GUEST_IP, UDP_PORT));
                }
                last_round = Some(Instant::now());
                rounds += 1;
            }
            if let Ok(k) = s.recv(&mut buf) {
                if k >= 4 {
                    got.insert(u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]));
                }
            }
        }
        if rounds > 1 {
            eprintln!(
                "UDP: {} of {n} echoed after {rounds} rounds in {:?}",
                got.len(),
                t0.elapsed()
            );
        }
        got.len() as u32
    })
    .join()
    .expect("udp thread")
}

/// Wait until `path` has a line starting with `prefix`.
fn wait_line(path: &Path, prefix: &str, timeout: Duration) -> String {
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| l.starts_with(prefix)) {
            return l.to_string();
        }
        assert!(
            t0.elapsed() < timeout,
            "no {prefix:?} line in {} within {timeout:?}: {}",
            path.display(),
            tail(&text, 5)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Adoption proper, as a user would do it: a QEMU started by hand with a
/// disk, a NIC on a bridged tap and a serial console, adopted into qlive
/// (guest RAM copied into the agent's memfd, the guest moved onto a tap of
/// qlive's on the same bridge), then upgraded the usual shared-memory way.
/// `postcopy` is the policy; `dirty` the guest's dirtying rate (MiB/s).
/// `onto`: adopt onto this binary (a definition naming it is given), not
/// the one that runs. `bandwidth`: the test-only cap on the copy (bytes/s),
/// so that a dirtying guest cannot converge and post-copy must start.
#[allow(clippy::too_many_arguments)]
fn adopt_and_upgrade(
    bandwidth: Option<u64>,
    emulator: &Path,
    onto: Option<&Path>,
    then: &Path,
    postcopy: &str,
    dirty: u64,
    expect_postcopy: bool,
) {
    let mut rig = Rig::new_netns();
    if let Some(bw) = bandwidth {
        rig.kill_agent();
        rig.start_agent_with(&[("QLIVE_TEST_MAX_BANDWIDTH", &bw.to_string())]);
    }
    rig.in_netns("ip", &["link", "set", "lo", "up"]);
    let img = image(&rig, "disk.qcow2");
    let mac = "52:54:00:ad:00:01";
    let devices = plain_devices(&img, "tapfor0", mac);
    let append = guest_cmdline(&format!(
        "qlive.pattern_mib=128 qlive.dirty_mib_per_s={dirty}"
    ));
    let mut f = Foreign::start_with(&rig, emulator, "vm", &devices, &append, 256);
    bridge(&rig, &["tapfor0"]);
    let foreign_log = rig.dir.path().join("vm.console");
    wait_line(&foreign_log, "NET UP", Duration::from_secs(90));
    wait_line(&foreign_log, "DISK 1", Duration::from_secs(30));
    assert_eq!(
        udp_echoes(&rig, 50, Duration::from_secs(20)),
        50,
        "echo before"
    );
    let foreign_pid = f.pid();

    let mut args = vec!["--postcopy", postcopy, "--json"];
    let file = rig.dir.path().join("given.json");
    if let Some(onto) = onto {
        let out = adopt(&rig, "vm", &f.qmp, &["--dry-run", "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let plan: Value = serde_json::from_slice(&out.stdout).expect("plan");
        let mut def = plan["definition"].clone();
        def["emulator"] = json!(onto);
        std::fs::write(&file, def.to_string()).expect("write");
        args.extend(["--definition", file.to_str().expect("utf8")]);
    }
    let out = adopt(&rig, "vm", &f.qmp, &args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "adopt: {}\n{stdout}\nagent log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        tail(&rig.agent_log_text(), 30)
    );
    let r: Value = serde_json::from_str(stdout.trim()).expect("adopt --json");
    eprintln!("ADOPTED {postcopy} dirty={dirty}: {r}");
    for l in rig.agent_log_text().lines() {
        if l.contains("copy progress") || l.contains("post-copy") || l.contains("capabilit") {
            eprintln!("AGENT {l}");
        }
    }
    assert_eq!(r["result"], "success", "{r}");
    assert_eq!(r["from"]["pid"], foreign_pid, "{r}");
    assert_eq!(r["postcopy"], expect_postcopy, "{r}");
    if expect_postcopy {
        // Never before the first full pre-copy pass; auto only once a
        // pass after it did not halve the dirty memory.
        let first = if postcopy == "auto" { 3 } else { 2 };
        assert!(r["precopy_passes"].as_u64().unwrap_or(0) >= first, "{r}");
    }
    if let Some(onto) = onto {
        assert_eq!(r["to"]["emulator"], json!(onto), "{r}");
    }
    // Guest RAM was copied: at least the pattern went over the socket.
    assert!(r["bytes_sent"].as_u64().unwrap_or(0) > 64 << 20, "{r}");
    // The foreign QEMU quit after Confirm.
    let t0 = Instant::now();
    while !matches!(f.child.try_wait(), Ok(Some(_))) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "foreign QEMU still runs"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // An ordinary qlive domain now: its RAM is the agent's memfd, its
    // NIC a tap of qlive's on br0.
    let info = rig.info("vm");
    assert_eq!(info["state"], "running", "{info}");
    let pid = info["pid"].as_i64().expect("pid") as i32;
    assert_eq!(rig.qemu_pids(), vec![pid]);
    let ram = std::fs::read_link(format!("/proc/{pid}/fd/3")).expect("fd 3");
    assert!(
        ram.to_string_lossy().starts_with("/memfd:qlive-ram:vm"),
        "{ram:?}"
    );
    let stored: Value = serde_json::from_str(
        &std::fs::read_to_string(rig.state.join("domains/vm.json")).expect("stored definition"),
    )
    .expect("json");
    let def = &stored["definition"];
    assert_eq!(def["nics"][0]["mac"], mac, "{def}");
    assert_eq!(def["nics"][0]["bridge"], "br0", "{def}");
    let tap = def["nics"][0]["tap"].as_str().expect("tap").to_string();
    let link = rig.in_netns("ip", &["-o", "link", "show", &tap]);
    assert!(link.contains("master br0"), "{link}");
    assert_eq!(
        udp_echoes(&rig, 50, Duration::from_secs(20)),
        50,
        "echo after adoption"
    );

    // The usual shared-memory upgrade works right after.
    let hb = rig.wait_heartbeat_past("vm", 0, Duration::from_secs(10));
    let m = rig.migrate("vm", &["--emulator", then.to_str().expect("utf8")]);
    eprintln!("UPGRADED: {m}");
    assert!(m.get("postcopy").is_none(), "{m}");
    assert!(
        m["bytes_sent"].as_u64().unwrap_or(u64::MAX) < 16 << 20,
        "a shared-memory migration sends device state only: {m}"
    );
    rig.wait_heartbeat_past("vm", hb.last + 500, Duration::from_secs(30));
    assert_eq!(
        udp_echoes(&rig, 50, Duration::from_secs(20)),
        50,
        "echo after the upgrade"
    );

    // The guest's output is one stream across the two consoles: every
    // heartbeat once, in order, and the memory pattern never failed.
    let mut all = std::fs::read(&foreign_log).expect("foreign console");
    all.extend(std::fs::read(rig.console_log("vm")).expect("qlive console"));
    let hb = Heartbeat::parse(&all);
    hb.assert_intact("foreign console, then qlive's");
    let text = String::from_utf8_lossy(&all).into_owned();
    let errors: Vec<&str> = text.lines().filter(|l| l.contains("GUEST-ERROR")).collect();
    assert!(errors.is_empty(), "{errors:?}");

    // Every disk write the guest acknowledged is on the disk.
    let acked = acked_writes(&text);
    rig.ok(&["destroy", "vm"]);
    rig.ok(&["undefine", "vm"]);
    let g = guest_image();
    let verify = json!({
        "name": "verify",
        "emulator": SYSTEM_QEMU,
        "accel": "tcg",
        "memory_mib": 256,
        "kernel": g.kernel,
        "initrd": g.initrd,
        "cmdline": guest_cmdline("qlive.disk_mode=verify"),
        "disks": [{"path": img, "format": "qcow2", "readonly": true}],
    });
    let file = rig.dir.path().join("verify.json");
    std::fs::write(&file, verify.to_string()).expect("write");
    rig.ok(&["define", file.to_str().expect("utf8")]);
    rig.ok(&["start", "verify"]);
    let line = wait_line(
        &rig.console_log("verify"),
        "DISKVERIFY",
        Duration::from_secs(120),
    );
    rig.ok(&["destroy", "verify"]);
    eprintln!("DISKSTATS acknowledged={acked} {line}");
    assert!(acked > 100, "too few writes to mean anything: {acked}");
    assert_eq!(kv(&line, "bad"), 0, "{line}");
    assert!(
        kv(&line, "maxseq") >= acked,
        "write {acked} missing: {line}"
    );
}

/// QEMU 7.2 adopted straight onto 10.0 (a definition naming it is given;
/// the emulator is not compared), by the default policy: its idle guest's
/// pre-copy converges. Then upgraded back to 7.2. The guests that dirty
/// memory are 10.0's: under TCG, QEMU before 9.0 loses dirty bits of pages
/// the vCPU writes while pre-copy syncs the bitmap (plain QEMU alike,
/// docs/benchmarks.md), so a busy 7.2 guest may arrive damaged.
#[test]
fn a_hand_started_qemu_7_2_is_adopted_onto_10_0_and_upgraded_back() {
    let new = new_qemu();
    adopt_and_upgrade(
        None,
        Path::new(SYSTEM_QEMU),
        Some(&new),
        Path::new(SYSTEM_QEMU),
        "auto",
        0,
        false,
    );
}

/// QEMU 10.0 whose guest dirties 256 MiB/s with the copy capped at 32
/// MiB/s: pre-copy cannot converge, and `always` post-copies after the
/// first full pass.
#[test]
fn a_hand_started_qemu_10_0_is_adopted_by_post_copy_after_one_pass() {
    let new = new_qemu();
    adopt_and_upgrade(Some(32 << 20), &new, None, &new, "always", 256, true);
}

/// The same guest with the default `auto`: post-copy once a pass after
/// the first did not halve the dirty memory.
#[test]
fn a_non_converging_guest_is_adopted_by_post_copy_under_auto() {
    let new = new_qemu();
    adopt_and_upgrade(Some(32 << 20), &new, None, &new, "auto", 256, true);
}

/// An idle 10.0 guest under the default `auto`: pre-copy converges.
#[test]
fn a_hand_started_qemu_10_0_is_adopted_by_pre_copy_and_upgraded() {
    let new = new_qemu();
    adopt_and_upgrade(None, &new, None, &new, "auto", 0, false);
}

/// A foreign QEMU with a disk, a NIC on br0 and a console file, its guest
/// dirtying `dirty` MiB/s, started in the rig's namespace and booted.
fn boot_foreign(rig: &Rig, emulator: &Path, dirty: u64) -> (Foreign, PathBuf) {
    rig.in_netns("ip", &["link", "set", "lo", "up"]);
    let img = image(rig, "disk.qcow2");
    let devices = plain_devices(&img, "tapfor0", "52:54:00:ad:00:02");
    let append = guest_cmdline(&format!(
        "qlive.pattern_mib=128 qlive.dirty_mib_per_s={dirty}"
    ));
    let f = Foreign::start_with(rig, emulator, "vm", &devices, &append, 256);
    bridge(rig, &["tapfor0"]);
    let log = rig.dir.path().join("vm.console");
    wait_line(&log, "NET UP", Duration::from_secs(90));
    wait_line(&log, "DISK 1", Duration::from_secs(30));
    (f, log)
}

fn adopt_bg(rig: &Rig, qmp: &Path, args: &[&str]) -> std::thread::JoinHandle<std::process::Output> {
    let mut cmd = Command::new(qlive_bin());
    cmd.args(["adopt", "vm", "--qmp"])
        .arg(qmp)
        .args(args)
        .env("QLIVE_SOCKET", &rig.socket);
    std::thread::spawn(move || cmd.output().expect("run qlive adopt"))
}

/// The recovery decision the restarted agent logged for `vm`.
fn recovery_decision(rig: &Rig) -> String {
    rig.agent_log_text()
        .lines()
        .rfind(|l| l.contains("recovering interrupted migration"))
        .unwrap_or("")
        .to_string()
}

/// The agent SIGKILLed while an adoption copies RAM by pre-copy: the
/// restarted agent cancels the migration on the foreign QEMU, kills the
/// destination and forgets the domain. The guest runs on in the QEMU that
/// was never qlive's, with its network, console and migration state as
/// before.
#[test]
fn an_agent_killed_during_an_adoptions_pre_copy_leaves_the_foreign_qemu_running() {
    let mut rig = Rig::new_netns();
    rig.kill_agent();
    rig.start_agent_with(&[("QLIVE_TEST_MAX_BANDWIDTH", &(16u64 << 20).to_string())]);
    let (mut f, log) = boot_foreign(&rig, Path::new(SYSTEM_QEMU), 0);
    let bg = adopt_bg(&rig, &f.qmp, &["--postcopy", "never"]);
    rig.wait_job_phase("vm", "perform", Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(rig.qemu_pids().len() == 1, "the destination runs");
    rig.kill_agent();
    let out = bg.join().expect("adopt thread");
    assert!(!out.status.success());

    rig.start_agent();
    let decision = recovery_decision(&rig);
    assert!(decision.contains("KeepSource"), "{decision}");
    assert_eq!(
        rig.ok(&["list", "--json"]).trim(),
        "[]",
        "the domain is forgotten"
    );
    assert!(rig.qemu_pids().is_empty(), "the destination is gone");
    assert!(!rig.state.join("domains/vm.json").exists());
    assert!(!rig.run.join("domains/vm").exists());
    f.assert_untouched();
    // Its migration was cancelled, not left running.
    let hb = Heartbeat::parse(&std::fs::read(&log).expect("console")).last;
    assert_eq!(udp_echoes(&rig, 50, Duration::from_secs(20)), 50, "echo");
    let t0 = Instant::now();
    while Heartbeat::parse(&std::fs::read(&log).expect("console")).last < hb + 500 {
        assert!(t0.elapsed() < Duration::from_secs(30), "the guest stopped");
        std::thread::sleep(Duration::from_millis(50));
    }
    let all = Heartbeat::parse(&std::fs::read(&log).expect("console"));
    all.assert_intact("the foreign QEMU's console");
    // A second adoption of the same QEMU then works.
    let out = adopt(
        &rig,
        "vm",
        &f.qmp,
        &["--postcopy", "never", "--timeout", "120"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(rig.info("vm")["state"], "running");
}

/// The agent SIGKILLed once post-copy has started (QEMU 10.0, which can
/// be a post-copy destination; `point`: before the
/// destination got `cont`, or after, while pages still flow): the
/// restarted agent resumes the destination if it is paused, waits until
/// the source sent every page, and switches. The guest's heartbeat and
/// memory pattern are whole across both consoles.
fn agent_killed_in_post_copy(point: &str) {
    let mut rig = Rig::new_netns();
    rig.kill_agent();
    rig.start_agent_with(&[
        ("QLIVE_TEST_MAX_BANDWIDTH", &(32u64 << 20).to_string()),
        ("QLIVE_TEST_PAUSE_AT", point),
    ]);
    let (mut f, log) = boot_foreign(&rig, &new_qemu(), 256);
    let bg = adopt_bg(&rig, &f.qmp, &["--postcopy", "always"]);
    rig.wait_test_paused("vm", Duration::from_secs(120));
    rig.kill_agent();
    assert!(!bg.join().expect("adopt thread").status.success());

    rig.start_agent();
    let decision = recovery_decision(&rig);
    eprintln!("RECOVERED at {point}: {decision}");
    assert!(
        decision.contains("FinishPostcopy") || decision.contains("SwitchToDestination"),
        "{decision}"
    );
    let info = rig.info("vm");
    assert_eq!(info["state"], "running", "{info}");
    assert_ne!(info["pid"], f.pid());
    assert_eq!(rig.qemu_pids().len(), 1);
    let t0 = Instant::now();
    while !matches!(f.child.try_wait(), Ok(Some(_))) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "foreign QEMU still runs"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!rig.run.join("domains/vm/adopting.json").exists());
    let hb = rig.wait_heartbeat_past("vm", 0, Duration::from_secs(30));
    rig.wait_heartbeat_past("vm", hb.last + 500, Duration::from_secs(30));
    assert_eq!(udp_echoes(&rig, 50, Duration::from_secs(20)), 50, "echo");
    let mut all = std::fs::read(&log).expect("foreign console");
    all.extend(std::fs::read(rig.console_log("vm")).expect("qlive console"));
    Heartbeat::parse(&all).assert_intact("across the recovered post-copy");
    let errors: Vec<String> = String::from_utf8_lossy(&all)
        .lines()
        .filter(|l| l.contains("GUEST-ERROR"))
        .map(String::from)
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
}

#[test]
fn an_agent_killed_before_the_post_copy_destination_runs_is_recovered_onto_it() {
    agent_killed_in_post_copy("perform:after");
}

#[test]
fn an_agent_killed_while_post_copy_pages_flow_is_recovered_onto_the_destination() {
    agent_killed_in_post_copy("finish:postcopy");
}

/// Post-copy under way, and the foreign QEMU (which still holds the pages
/// the guest has not touched since) dies with the agent: the guest's
/// memory is whole nowhere. The domain is crashed, its QEMU killed, never
/// resumed, until the operator acknowledges it.
#[test]
fn a_source_lost_during_post_copy_makes_the_domain_crashed() {
    let mut rig = Rig::new_netns();
    rig.kill_agent();
    rig.start_agent_with(&[
        ("QLIVE_TEST_MAX_BANDWIDTH", &(16u64 << 20).to_string()),
        ("QLIVE_TEST_PAUSE_AT", "finish:postcopy"),
    ]);
    let (mut f, _log) = boot_foreign(&rig, &new_qemu(), 256);
    let bg = adopt_bg(&rig, &f.qmp, &["--postcopy", "always"]);
    rig.wait_test_paused("vm", Duration::from_secs(120));
    rig.kill_agent();
    assert!(!bg.join().expect("adopt thread").status.success());
    let _ = f.child.kill();
    let _ = f.child.wait();

    rig.start_agent();
    let decision = recovery_decision(&rig);
    eprintln!("RECOVERED with the source gone: {decision}");
    assert!(decision.contains("Crashed"), "{decision}");
    let info = rig.info("vm");
    assert_eq!(info["state"], "crashed", "{info}");
    assert!(rig.qemu_pids().is_empty(), "the destination was killed");
    let (code, err) = rig.fails(&["start", "vm"]);
    assert_ne!(code, 0);
    assert!(err.contains("crashed during a migration"), "{err}");
    rig.ok(&["destroy", "vm"]);
    assert_eq!(rig.info("vm")["state"], "shut-off");
}

/// A QEMU 7.2 destination cannot do post-copy under qlive (userfaultfd
/// needs CAP_SYS_PTRACE there): `always` fails before the switchover,
/// naming why, and leaves the foreign QEMU running and nothing defined;
/// `auto` falls back to pre-copy and adopts.
#[test]
fn a_destination_without_post_copy_refuses_always_and_auto_falls_back() {
    let rig = Rig::new_netns();
    let (mut f, _log) = boot_foreign(&rig, Path::new(SYSTEM_QEMU), 0);
    let out = adopt(&rig, "vm", &f.qmp, &["--postcopy", "always"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("the destination QEMU cannot do post-copy")
            && err.contains("use --postcopy auto or never"),
        "{err}"
    );
    assert_eq!(rig.ok(&["list", "--json"]).trim(), "[]");
    assert!(rig.qemu_pids().is_empty());
    f.assert_untouched();

    let out = adopt(&rig, "vm", &f.qmp, &["--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(r["postcopy"], false, "{r}");
    assert!(
        rig.agent_log_text()
            .contains("the destination cannot do post-copy"),
        "no fallback logged"
    );
    assert_eq!(rig.info("vm")["state"], "running");
}
