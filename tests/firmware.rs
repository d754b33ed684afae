//! UEFI firmware (`"firmware": "uefi"`) with real OVMF: the per-domain
//! NVRAM is created from the template at the first start, is the same file
//! across migrations 7.2 <-> 10.0 and an agent restart, and is removed at
//! undefine; a replaced code image is reported as needing a restart (the
//! guest runs the image it booted with: the migration carries it), is not
//! selected by `qlive upgrade --stale`, and clears after a cold restart.
//! Booting a real OS through OVMF from its own disk, with EFI variables
//! kept across reboots, is the Debian guest's scenario (tests/debian_guest.rs).
//!
//! The test guest's kernel is an ELF vmlinux for QEMU's PVH entry, which
//! OVMF cannot boot: here OVMF runs, finds nothing to boot and waits in its
//! boot manager, which is enough to exercise the flash devices.

mod common;

use common::*;
use serde_json::{json, Value};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

fn stale(rig: &Rig, name: &str) -> Value {
    let all: Value = serde_json::from_str(&rig.ok(&["stale", "--json"])).expect("stale json");
    all.as_array()
        .and_then(|a| a.iter().find(|d| d["name"] == name).cloned())
        .unwrap_or_else(|| panic!("{name} not in stale: {all}"))
}

/// OVMF writes to the serial console once it reaches its boot manager.
fn wait_console(rig: &Rig, name: &str, needle: &str, timeout: Duration) {
    let t0 = Instant::now();
    loop {
        let text =
            String::from_utf8_lossy(&std::fs::read(rig.console_log(name)).unwrap_or_default())
                .into_owned();
        if text.contains(needle) {
            return;
        }
        assert!(
            t0.elapsed() < timeout,
            "{name}: no {needle:?} on the console within {timeout:?}: {}",
            tail(&text, 10)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Replace `path` by a rename, as a package upgrade does: same size, one
/// changed byte, new inode.
fn replace_by_rename(path: &Path) {
    let mut data = std::fs::read(path).expect("read image");
    data[0x100] ^= 0xff;
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, &data).expect("write image");
    std::fs::rename(&tmp, path).expect("rename image");
}

#[test]
fn uefi_nvram_is_the_domains_own_and_replaced_firmware_needs_a_restart() {
    if !Path::new(OVMF_CODE).exists() {
        panic!("{OVMF_CODE} missing: scripts/deps.sh installs Debian's ovmf package");
    }
    let mut rig = Rig::new();
    let code = rig.dir.path().join("CODE.fd");
    let template = rig.dir.path().join("VARS.fd");
    std::fs::copy(OVMF_CODE, &code).expect("copy code");
    std::fs::copy(OVMF_VARS, &template).expect("copy vars");

    // Missing images are refused at define, naming the field.
    for (field, bad) in [
        ("firmware_code", "/nonexistent/CODE.fd"),
        ("nvram_template", "/nonexistent/VARS.fd"),
    ] {
        let f = rig.dir.path().join("bad.json");
        std::fs::write(
            &f,
            json!({"name": "bad", "emulator": "/usr/bin/qemu-system-x86_64", "memory_mib": 128,
                   "firmware": "uefi", field: bad})
            .to_string(),
        )
        .unwrap();
        let (code, err) = rig.fails(&["define", f.to_str().unwrap()]);
        assert_eq!(code, 1, "{err}");
        assert!(
            err.contains(&format!("`{field}`")) && err.contains(bad),
            "{err}"
        );
    }
    assert!(!rig.state.join("domains/bad.json").exists());

    rig.define_guest(
        "fw",
        128,
        json!({"firmware": "uefi", "firmware_code": code, "nvram_template": template}),
    );
    let info = rig.info("fw");
    assert_eq!(info["firmware"]["type"], "uefi", "{info}");
    let nvram = rig.state.join("nvram/fw.fd");
    assert_eq!(info["firmware"]["nvram"], json!(nvram), "{info}");
    assert_eq!(info["firmware"]["code"], json!(code), "{info}");
    assert!(
        !nvram.exists(),
        "the NVRAM is created at the first start, not at define"
    );

    rig.ok(&["start", "fw"]);
    let meta = std::fs::metadata(&nvram).expect("NVRAM created at start");
    assert_eq!(meta.len(), std::fs::metadata(&template).unwrap().len());
    assert_eq!(meta.mode() & 0o777, 0o600);
    let ino = meta.ino();
    wait_console(&rig, "fw", "BdsDxe", Duration::from_secs(120));
    assert!(stale(&rig, "fw")["reasons"].as_array().unwrap().is_empty());

    // The NVRAM template is replaced: the domain keeps its own NVRAM.
    replace_by_rename(&template);
    // A migration to 10.0 and back, and an agent restart: the same file.
    let new = new_qemu();
    let new = new.to_str().unwrap();
    rig.migrate("fw", &["--emulator", new]);
    rig.kill_agent();
    rig.start_agent();
    rig.migrate("fw", &["--emulator", "/usr/bin/qemu-system-x86_64"]);
    assert_eq!(std::fs::metadata(&nvram).unwrap().ino(), ino);
    assert_eq!(rig.info("fw")["state"], "running");

    // The code image is replaced too, under the running guest.
    replace_by_rename(&code);
    let s = stale(&rig, "fw");
    assert_eq!(s["stale"], false, "{s}");
    assert_eq!(s["restart_required"], true, "{s}");
    let kinds: Vec<(String, bool)> = s["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["path"].as_str().unwrap().to_string(),
                r["restart_required"] == true,
            )
        })
        .collect();
    for p in [&code, &template] {
        assert!(
            kinds.contains(&(p.to_string_lossy().into_owned(), true)),
            "{} not reported: {s}",
            p.display()
        );
    }
    // A migration does not load the new image: still reported after one,
    // and `upgrade --stale` leaves the domain alone.
    rig.migrate("fw", &[]);
    let s = stale(&rig, "fw");
    assert_eq!(s["restart_required"], true, "after a migration: {s}");
    let human = rig.ok(&["stale"]);
    assert!(
        human.contains("fw: RESTART REQUIRED") && human.contains("(restart required)"),
        "{human}"
    );
    let o = rig.qlive(&["upgrade", "--stale", "--json"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{out} {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        !out.contains("\"name\":\"fw\""),
        "upgrade --stale selected fw: {out}"
    );

    // A cold restart loads what is on disk now.
    rig.ok(&["destroy", "fw"]);
    rig.ok(&["start", "fw"]);
    assert_eq!(
        std::fs::metadata(&nvram).unwrap().ino(),
        ino,
        "kept across a cold restart"
    );
    let s = stale(&rig, "fw");
    assert_eq!(
        (s["stale"].clone(), s["restart_required"].clone()),
        (json!(false), json!(false)),
        "{s}"
    );

    rig.ok(&["destroy", "fw"]);
    rig.ok(&["undefine", "fw"]);
    assert!(!nvram.exists(), "undefine removes the NVRAM");
    assert!(rig.qemu_pids().is_empty());
}

/// Secure Boot: Debian's SMM build of OVMF with Microsoft's keys, the
/// defaults `define` pins; it runs under TCG (SMM on q35) and migrates.
#[test]
fn secure_boot_pins_the_smm_build_and_migrates() {
    let rig = Rig::new();
    rig.define_guest("sb", 128, json!({"firmware": "uefi", "secure_boot": true}));
    let info = rig.info("sb");
    assert_eq!(
        info["firmware"]["code"], "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd",
        "{info}"
    );
    assert_eq!(
        info["firmware"]["nvram_template"], "/usr/share/OVMF/OVMF_VARS_4M.ms.fd",
        "{info}"
    );
    assert_eq!(info["firmware"]["secure_boot"], true, "{info}");
    rig.ok(&["start", "sb"]);
    wait_console(&rig, "sb", "BdsDxe", Duration::from_secs(120));
    let new = new_qemu();
    rig.migrate("sb", &["--emulator", new.to_str().unwrap()]);
    rig.migrate("sb", &["--emulator", "/usr/bin/qemu-system-x86_64"]);
    assert_eq!(rig.info("sb")["state"], "running");
    rig.ok(&["destroy", "sb"]);
    rig.ok(&["undefine", "sb"]);
    assert!(rig.qemu_pids().is_empty());
}
