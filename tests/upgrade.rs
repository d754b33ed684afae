//! `qlive stale` and `qlive upgrade` against real QEMU: the guests' QEMU
//! binary is replaced on disk as a package upgrade does (new file renamed
//! over the old), then an upgrade run moves them.

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// An installed-looking QEMU prefix in the rig: bin/qemu (a copy of the
/// system binary) with share/ and lib/ where QEMU looks for firmware and
/// modules relative to its own path.
fn qemu_prefix(rig: &Rig) -> PathBuf {
    let p = rig.dir.path().join("prefix");
    std::fs::create_dir_all(p.join("bin")).unwrap();
    std::os::unix::fs::symlink("/usr/share", p.join("share")).unwrap();
    std::os::unix::fs::symlink("/usr/lib", p.join("lib")).unwrap();
    std::fs::copy(SYSTEM_QEMU, p.join("bin/qemu")).unwrap();
    p.join("bin/qemu")
}

/// What dpkg does: write the new file beside, rename it over the old.
fn replace_like_dpkg(path: &Path, with: &str) {
    let tmp = path.with_extension("dpkg-new");
    std::fs::copy(with, &tmp).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn stale(rig: &Rig) -> Vec<Value> {
    serde_json::from_str::<Value>(&rig.ok(&["stale", "--json"]))
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn json_lines(out: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

#[test]
fn upgrade_stale_in_parallel_continues_past_a_failure() {
    let rig = Rig::new();
    let emu = qemu_prefix(&rig);
    for n in ["a", "b", "c"] {
        rig.define_guest(n, 256, json!({"emulator": emu, "cmdline": "console=ttyS0 quiet panic=-1 no_timer_check qlive.pattern_mib=16"}));
        rig.ok(&["start", n]);
    }
    let mut before = std::collections::HashMap::new();
    for n in ["a", "b", "c"] {
        rig.wait_heartbeat_past(n, 100, Duration::from_secs(90));
        before.insert(n, rig.info(n));
    }
    assert!(
        stale(&rig).iter().all(|d| d["stale"] == false),
        "{:?}",
        stale(&rig)
    );
    // nothing selected: usage error
    let (code, err) = rig.fails(&["upgrade"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--stale"), "{err}");

    replace_like_dpkg(&emu, SYSTEM_QEMU);
    let s = stale(&rig);
    assert_eq!(s.len(), 3);
    for d in &s {
        assert_eq!(d["stale"], true, "{d}");
        assert_eq!(d["reasons"][0]["kind"], "exe-replaced", "{d}");
        assert_eq!(d["reasons"][0]["path"], emu.to_str().unwrap(), "{d}");
    }
    let text = rig.ok(&["stale"]);
    assert!(
        text.contains("STALE") && text.contains("executable replaced"),
        "{text}"
    );

    // dry run: preflight only, nothing moves
    let o = rig.qlive(&["upgrade", "--stale", "--dry-run", "--json"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let lines = json_lines(&o.stdout);
    assert_eq!(lines.len(), 4);
    assert!(lines[..3].iter().all(|l| l["result"] == "ok"), "{lines:?}");
    for n in ["a", "b", "c"] {
        assert_eq!(
            rig.info(n)["pid"],
            before[n]["pid"],
            "dry run moved nothing"
        );
    }

    // c's network setup fails on the destination: its migration fails
    // before switchover, the others go through
    rig.add_hook(
        "50-port",
        "[ \"$1\" = c ] && [ \"$2\" = prepare ] && { echo 'no port for c' >&2; exit 1; }; exit 0",
    );
    let o = rig.qlive(&["upgrade", "--stale", "--parallel", "2", "--json"]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "exit 1: some failed; {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let lines = json_lines(&o.stdout);
    assert_eq!(lines.len(), 4, "{lines:?}");
    let summary = &lines[3]["summary"];
    assert_eq!(summary["selected"], 3);
    assert_eq!(summary["succeeded"], 2);
    assert_eq!(summary["failed"], 1);
    assert_eq!(summary["failed_domains"], json!(["c"]));
    assert_eq!(summary["parallel"], 2);
    for l in &lines[..3] {
        let n = l["name"].as_str().unwrap();
        if n == "c" {
            assert_eq!(l["result"], "failed");
            assert!(
                l["error"].as_str().unwrap().contains("no port for c"),
                "{l}"
            );
        } else {
            assert_eq!(l["result"], "success", "{l}");
            assert_eq!(l["from"]["pid"], before[n]["pid"]);
        }
    }
    for n in ["a", "b"] {
        let i = rig.info(n);
        assert_ne!(i["pid"], before[n]["pid"], "{n} moved");
    }
    let c = rig.info("c");
    assert_eq!(c["state"], "running");
    assert_eq!(c["pid"], before["c"]["pid"], "c still on its old QEMU");
    let s = stale(&rig);
    for d in &s {
        assert_eq!(d["stale"], d["name"] == "c", "{d}");
    }
    for n in ["a", "b", "c"] {
        let hb = rig.heartbeat(n);
        rig.wait_heartbeat_past(n, hb.last + 200, Duration::from_secs(30))
            .assert_intact(n);
    }
    assert_eq!(rig.qemu_pids().len(), 3, "exactly one instance per domain");

    // the hook is fixed: the next run moves c and exits 0
    std::fs::remove_file(rig.hooks.join("50-port")).unwrap();
    let out = rig.ok(&["upgrade", "--stale"]);
    assert!(out.contains("1/1 upgraded"), "{out}");
    assert!(stale(&rig).iter().all(|d| d["stale"] == false));
    for n in ["a", "b", "c"] {
        rig.ok(&["destroy", n]);
    }
}
