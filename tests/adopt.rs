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
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let g = guest_image();
        let dir = rig.dir.path();
        let qmp = dir.join(format!("{tag}.qmp"));
        let mut cmd = Command::new(emulator);
        cmd.args(["-accel", "tcg", "-machine", "q35", "-m", "256", "-smp", "1"])
            .arg("-kernel")
            .arg(&g.kernel)
            .arg("-initrd")
            .arg(&g.initrd)
            .args(["-append", "console=ttyS0 quiet panic=-1 no_timer_check"])
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
        assert_eq!(d["nics"], json!([{"mac": mac, "tap": tap}]), "{d}");
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

        // Without --dry-run: not there yet, and said so.
        let out = adopt(&rig, &name, &f.qmp, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains(
                "not implemented yet: adoption migrates the guest; only --dry-run is available"
            ),
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
