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

/// A rig whose agent pauses migrations at `at`, with the guest `rec`
/// running: returns the rig, its heartbeat and its info.
fn paused_rig(at: &str) -> (Rig, Heartbeat, Value) {
    let mut rig = Rig::new();
    rig.kill_agent();
    rig.start_agent_with(&[("QLIVE_TEST_PAUSE_AT", at)]);
    rig.define_guest("rec", 256, json!({}));
    rig.ok(&["start", "rec"]);
    let hb = rig.wait_heartbeat_past("rec", 200, Duration::from_secs(60));
    let before = rig.info("rec");
    (rig, hb, before)
}

/// Migrate `rec` until the agent pauses (at its `QLIVE_TEST_PAUSE_AT`);
/// returns the job file and the client's thread.
fn migrate_until_paused(rig: &Rig) -> (Value, std::thread::JoinHandle<std::process::Output>) {
    let mig = rig.migrate_bg("rec", &[]);
    rig.wait_test_paused("rec", Duration::from_secs(30));
    let job: Value =
        serde_json::from_slice(&std::fs::read(rig.run.join("domains/rec/job.json")).unwrap())
            .unwrap();
    (job, mig)
}

fn kill_in_phase(at: &str, winner: Winner, decision: &str) {
    let (mut rig, hb, before) = paused_rig(at);
    let name = "rec";
    let (job, mig) = migrate_until_paused(&rig);
    let target_domid = job
        .get("dst")
        .map(|d| d["domid"].clone())
        .or_else(|| job.get("dst_domid").cloned());
    rig.kill_agent();
    let o = mig.join().unwrap();
    assert!(!o.status.success(), "the client lost its agent");

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

/// Is `pid` a live process (not gone, not a zombie waiting for a reaper)?
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, r)| !r.starts_with('Z')))
        .unwrap_or(false)
}

/// Pause the migration at `at`, SIGKILL the agent, SIGKILL the destination
/// QEMU too, and start a plain agent. Returns the rig, the domain's info
/// before, and its info after recovery.
fn kill_agent_and_destination(at: &str) -> (Rig, Value, Value) {
    let (mut rig, _, before) = paused_rig(at);
    let (job, mig) = migrate_until_paused(&rig);
    let dst_pid = job["dst"]["process"]["pid"].as_i64().expect("dst pid") as i32;
    rig.kill_agent();
    let _ = mig.join().unwrap();
    // SAFETY: kill(2) on the destination QEMU this test's agent started.
    assert_eq!(unsafe { libc::kill(dst_pid, libc::SIGKILL) }, 0);
    let t0 = Instant::now();
    while alive(dst_pid) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "destination did not die"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    rig.start_agent();
    let after = rig.info("rec");
    (rig, before, after)
}

/// The unsafe rule of old: `cont` was sent to the destination (it may have
/// run the guest, writing to the shared RAM), the agent died, then the
/// destination died. Resuming the source would run the guest on device
/// state older than its memory. The domain is crashed instead, nothing runs
/// it, and it stays so across agent restarts until `destroy`.
fn destination_may_have_run_is_crashed(at: &str) {
    let (mut rig, before, after) = kill_agent_and_destination(at);
    let name = "rec";
    assert_eq!(after["state"], "crashed", "{at}: {after}");
    assert!(
        after["reason"].as_str().unwrap_or("").contains("cont"),
        "{at}: the reason names why: {after}"
    );
    assert_eq!(
        rig.qemu_pids(),
        Vec::<i32>::new(),
        "{at}: no instance runs the guest"
    );
    let src_pid = before["pid"].as_i64().unwrap() as i32;
    assert!(!alive(src_pid), "{at}: the source is gone, never resumed");
    let job = rig.run.join(format!("domains/{name}/job.json"));
    assert!(
        job.exists(),
        "{at}: the crash stays recorded until acknowledged"
    );
    let (code, err) = rig.fails(&["start", name]);
    assert_eq!(code, 1);
    assert!(
        err.contains("crashed") && err.contains("qlive destroy rec"),
        "{at}: start names the way out: {err}"
    );
    // An agent restart does not forget it.
    rig.restart_agent();
    assert_eq!(rig.info(name)["state"], "crashed");
    assert_eq!(rig.qemu_pids(), Vec::<i32>::new());
    // The operator's acknowledgement, then a cold boot from the disks.
    rig.ok(&["destroy", name]);
    assert!(
        !job.exists(),
        "{at}: destroy removes the record of the crash"
    );
    assert_eq!(rig.info(name)["state"], "shut-off");
    rig.ok(&["start", name]);
    assert_eq!(rig.info(name)["state"], "running");
    rig.ok(&["destroy", name]);
}

#[test]
fn destination_killed_after_cont_is_crashed_not_resumed_on_the_source() {
    destination_may_have_run_is_crashed("finish:after");
}

#[test]
fn destination_killed_after_the_intent_to_cont_is_crashed() {
    // The intent is on disk, `cont` not yet sent: recovery cannot tell, so
    // it takes the safe reading.
    destination_may_have_run_is_crashed("finish:resume");
}

#[test]
fn destination_killed_before_any_cont_keeps_the_source() {
    let (rig, before, after) = kill_agent_and_destination("finish:before");
    let name = "rec";
    assert_eq!(after["state"], "running", "{after}");
    assert_eq!(after["domid"], before["domid"], "the source is kept");
    assert_eq!(after["pid"], before["pid"]);
    let pid = after["pid"].as_i64().unwrap() as i32;
    assert_eq!(rig.qemu_pids(), vec![pid]);
    let hb = rig.heartbeat(name);
    rig.wait_heartbeat_past(name, hb.last + 300, Duration::from_secs(30))
        .assert_intact("source resumed");
    rig.ok(&["destroy", name]);
}

/// The emulator probe (and any helper the agent starts) dies with the
/// agent: only guests' QEMUs outlive it.
#[test]
fn probe_dies_with_the_agent() {
    let mut rig = Rig::new();
    let fake = rig.dir.path().join("slow-qemu");
    let pidfile = rig.dir.path().join("slow-qemu.pid");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\necho $$ > {}\nexec sleep 600\n",
            pidfile.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    rig.define_guest("p", 64, json!({"emulator": fake}));
    let start = {
        let mut cmd = std::process::Command::new(qlive_bin());
        cmd.args(["start", "p"]).env("QLIVE_SOCKET", &rig.socket);
        std::thread::spawn(move || cmd.output())
    };
    let t0 = Instant::now();
    let pid = loop {
        if let Some(p) = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            break p;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "probe never ran");
        std::thread::sleep(Duration::from_millis(10));
    };
    // Never leave the fake behind, even when the assertion below fails.
    struct KillOnDrop(i32);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            // SAFETY: kill(2) of the fake probe this test started.
            unsafe { libc::kill(self.0, libc::SIGKILL) };
        }
    }
    let _guard = KillOnDrop(pid);
    assert!(alive(pid));
    rig.kill_agent();
    let _ = start.join();
    let t0 = Instant::now();
    while alive(pid) {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the probe (pid {pid}) outlived the agent"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
