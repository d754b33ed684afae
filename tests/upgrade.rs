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

/// `qlive metrics`, checked by `promtool check metrics` (Debian's
/// prometheus package), as `series -> value` (`name{labels}` as printed).
fn metrics(rig: &Rig) -> std::collections::BTreeMap<String, f64> {
    let text = rig.ok(&["metrics"]);
    promtool_check(&text);
    parse_exposition(&text)
}

fn promtool_check(text: &str) {
    use std::io::Write;
    let mut p = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; make deps installs it)");
    p.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let o = p.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn parse_exposition(text: &str) -> std::collections::BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, v) = l.rsplit_once(' ').unwrap_or_else(|| panic!("{l}"));
            (
                series.to_string(),
                v.parse().unwrap_or_else(|_| panic!("{l}")),
            )
        })
        .collect()
}

fn json_lines(out: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

#[test]
fn upgrade_stale_in_parallel_continues_past_a_failure() {
    let mut rig = Rig::new();
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

    let m = metrics(&rig);
    assert_eq!(m["qlive_agent_up"], 1.0);
    assert_eq!(m[r#"qlive_domains{state="running"}"#], 3.0);
    for n in ["a", "b", "c"] {
        assert_eq!(m[&format!(r#"qlive_domain_stale{{domain="{n}"}}"#)], 1.0);
        let why = format!(
            r#"qlive_domain_stale_reason{{domain="{n}",kind="exe-replaced",path="{}"}}"#,
            emu.display()
        );
        assert_eq!(m.get(&why), Some(&1.0), "{why} in {m:?}");
    }
    assert_eq!(m[r#"qlive_migrations_total{result="succeeded"}"#], 0.0);
    assert!(!m.keys().any(|k| k.starts_with("qlive_upgrade_last_run")));

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

    // the metrics tell the same story: the dry run was no upgrade run
    let m = metrics(&rig);
    assert_eq!(m[r#"qlive_migrations_total{result="succeeded"}"#], 2.0);
    assert_eq!(m[r#"qlive_migrations_total{result="failed"}"#], 1.0);
    assert_eq!(m["qlive_migration_duration_seconds_count"], 2.0);
    assert_eq!(m["qlive_migration_qemu_downtime_seconds_count"], 2.0);
    assert!(
        m["qlive_migration_qemu_downtime_seconds_sum"] < 2.0,
        "{m:?}"
    );
    assert_eq!(m["qlive_upgrade_last_run_success"], 0.0);
    assert_eq!(
        m[r#"qlive_upgrade_last_run_domains{result="selected"}"#],
        3.0
    );
    assert_eq!(m[r#"qlive_upgrade_last_run_domains{result="failed"}"#], 1.0);
    assert_eq!(
        m[r#"qlive_upgrade_last_run_failed_domain{domain="c"}"#],
        1.0
    );
    assert_eq!(m[r#"qlive_domain_stale{domain="a"}"#], 0.0);
    assert_eq!(m[r#"qlive_domain_stale{domain="c"}"#], 1.0);

    // counters and the last run survive an agent restart
    let started = m["qlive_agent_start_time_seconds"];
    let since = m["qlive_metrics_start_time_seconds"];
    std::thread::sleep(Duration::from_millis(1100));
    rig.restart_agent();
    let m = metrics(&rig);
    assert!(m["qlive_agent_start_time_seconds"] > started, "{m:?}");
    assert_eq!(m["qlive_metrics_start_time_seconds"], since);
    assert_eq!(m[r#"qlive_migrations_total{result="succeeded"}"#], 2.0);
    assert_eq!(m["qlive_upgrade_last_run_success"], 0.0);

    // the hook is fixed: the next run moves c and exits 0
    std::fs::remove_file(rig.hooks.join("50-port")).unwrap();
    let out = rig.ok(&["upgrade", "--stale"]);
    assert!(out.contains("1/1 upgraded"), "{out}");
    assert!(stale(&rig).iter().all(|d| d["stale"] == false));
    let m = metrics(&rig);
    assert_eq!(m[r#"qlive_migrations_total{result="succeeded"}"#], 3.0);
    assert_eq!(m["qlive_upgrade_last_run_success"], 1.0);
    assert_eq!(
        m[r#"qlive_upgrade_last_run_domains{result="selected"}"#],
        1.0
    );
    assert!(!m
        .keys()
        .any(|k| k.starts_with("qlive_upgrade_last_run_failed_domain{")));

    // the textfile the timer writes; with the agent down it says so
    let prom = rig.dir.path().join("qlive.prom");
    rig.ok(&["metrics", "--output", prom.to_str().unwrap()]);
    let text = std::fs::read_to_string(&prom).unwrap();
    promtool_check(&text);
    assert_eq!(parse_exposition(&text)["qlive_agent_up"], 1.0);
    rig.kill_agent();
    let (code, err) = rig.fails(&["metrics", "--output", prom.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    let text = std::fs::read_to_string(&prom).unwrap();
    promtool_check(&text);
    assert_eq!(
        parse_exposition(&text),
        [("qlive_agent_up".to_string(), 0.0)].into()
    );
    rig.start_agent();
    for n in ["a", "b", "c"] {
        rig.ok(&["destroy", n]);
    }
}
