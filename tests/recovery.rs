//! The agent SIGKILLed in each migration phase and restarted: recovery by
//! the rules of `migration::recovery`. Afterwards exactly one instance runs
//! the guest, the heartbeat continues with no break and no CORRUPT, the
//! other instance's process and paths are gone, and no job is left.
//!
//! `QLIVE_TEST_PAUSE_AT=<phase>:<before|after>` stops the agent's
//! migration task at that point (it writes `test-paused` first); the test
//! then kills the agent with SIGKILL and starts a plain one.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

#[derive(Debug, PartialEq)]
enum Winner {
    Source,
    Destination,
}

fn kill_in_phase(at: &str, winner: Winner, decision: &str) {
    let mut rig = Rig::new();
    let name = "rec";
    rig.kill_agent();
    rig.start_agent_with(&[("QLIVE_TEST_PAUSE_AT", at)]);
    rig.define_guest(name, 256, json!({}));
    rig.ok(&["start", name]);
    let hb = rig.wait_heartbeat_past(name, 200, Duration::from_secs(60));
    let before = rig.info(name);

    let mig = rig.migrate_bg(name, &[]);
    let marker = rig.run.join(format!("domains/{name}/test-paused"));
    let t0 = Instant::now();
    while !marker.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "never paused at {at}: {}",
            tail(&rig.agent_log_text(), 20)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let job: Value = serde_json::from_slice(
        &std::fs::read(rig.run.join(format!("domains/{name}/job.json"))).unwrap(),
    )
    .unwrap();
    let target_domid = job
        .get("dst")
        .map(|d| d["domid"].clone())
        .or_else(|| job.get("dst_domid").cloned());
    rig.kill_agent();
    let o = mig.join().unwrap();
    assert!(!o.status.success(), "the client lost its agent");
    let _ = std::fs::remove_file(&marker);

    rig.start_agent();
    let log = rig.agent_log_text();
    let line = log
        .lines()
        .find(|l| l.contains("recovering interrupted migration"))
        .unwrap_or_else(|| panic!("{at}: recovery did not run: {}", tail(&log, 20)));
    assert!(
        line.contains(decision),
        "{at}: expected {decision} in {line}"
    );
    let after = rig.info(name);
    assert_eq!(after["state"], "running", "{after}");
    assert_eq!(after["job"], Value::Null);
    match winner {
        Winner::Source => {
            assert_eq!(after["domid"], before["domid"], "{at}: source kept");
            assert_eq!(after["pid"], before["pid"]);
        }
        Winner::Destination => {
            assert_eq!(
                Some(after["domid"].clone()),
                target_domid,
                "{at}: destination kept"
            );
            assert_ne!(after["pid"], before["pid"]);
        }
    }
    let pid = after["pid"].as_i64().unwrap() as i32;
    assert_eq!(rig.qemu_pids(), vec![pid], "{at}: exactly one instance");
    assert_eq!(
        Rig::ls(&rig.run.join(format!("domains/{name}"))),
        vec![after["domid"].to_string(), "status.json".to_string()],
        "{at}: the other instance's paths and the job file are gone"
    );
    let agent = rig.agent_pid().unwrap();
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{agent}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|l| l.to_string_lossy().into_owned())
        .filter(|l| l.contains("memfd:qlive-ram"))
        .collect();
    assert_eq!(fds.len(), 1, "{at}: one guest RAM fd held: {fds:?}");

    let hb2 = rig.wait_heartbeat_past(name, hb.last + 500, Duration::from_secs(30));
    hb2.assert_intact(at);
    // and the domain is fully usable again
    let r = rig.migrate(name, &[]);
    assert_eq!(r["result"], "success");
    rig.wait_heartbeat_past(name, hb2.last + 200, Duration::from_secs(30))
        .assert_intact(at);
    rig.ok(&["destroy", name]);
}

#[test]
fn killed_in_begin() {
    kill_in_phase(
        "begin:after",
        Winner::Source,
        "KeepSource { cancel_migration: false }",
    );
}

#[test]
fn killed_in_prepare() {
    kill_in_phase(
        "prepare:after",
        Winner::Source,
        "KeepSource { cancel_migration: false }",
    );
}

#[test]
fn killed_in_perform_before_migrate() {
    kill_in_phase(
        "perform:before",
        Winner::Source,
        "KeepSource { cancel_migration: false }",
    );
}

#[test]
fn killed_in_perform_after_completion() {
    kill_in_phase(
        "perform:after",
        Winner::Destination,
        "SwitchToDestination { cont_dst: true }",
    );
}

#[test]
fn killed_in_finish_before_cont() {
    kill_in_phase(
        "finish:before",
        Winner::Destination,
        "SwitchToDestination { cont_dst: true }",
    );
}

#[test]
fn killed_in_finish_after_cont() {
    kill_in_phase(
        "finish:after",
        Winner::Destination,
        "SwitchToDestination { cont_dst: false }",
    );
}

#[test]
fn killed_in_confirm() {
    kill_in_phase(
        "confirm:before",
        Winner::Destination,
        "SwitchToDestination { cont_dst: false }",
    );
}
