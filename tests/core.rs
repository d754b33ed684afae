//! Core lifecycle against a real agent and real QEMU (TCG): define, start,
//! info/list, console, stop, destroy, undefine; the agent killed and
//! restarted under running guests; QEMU dying under the agent.

mod common;

use common::*;
use serde_json::json;
use std::time::Duration;

const BOOT: Duration = Duration::from_secs(60);

#[test]
fn lifecycle_define_start_info_stop_destroy_undefine() {
    let rig = Rig::new();
    rig.define_guest("life", 256, json!({}));
    // defined, not running
    let i = rig.info("life");
    assert_eq!(i["state"], "shut-off");
    assert_eq!(i["job"], serde_json::Value::Null);
    assert_eq!(i["machine"], "q35", "alias kept until first start");

    rig.ok(&["start", "life"]);
    let i = rig.info("life");
    for k in [
        "name",
        "uuid",
        "state",
        "domid",
        "pid",
        "emulator",
        "qemu_version",
        "machine",
        "memory_mib",
        "paths",
        "job",
    ] {
        assert!(i.get(k).is_some(), "info lacks {k}: {i}");
    }
    assert_eq!(i["state"], "running");
    assert_eq!(i["memory_mib"], 256);
    assert!(
        i["qemu_version"].as_str().unwrap().starts_with("7.2"),
        "{i}"
    );
    let machine = i["machine"].as_str().unwrap().to_string();
    assert!(
        machine.starts_with("pc-q35-"),
        "machine pinned to a versioned type: {machine}"
    );
    // pinned in the stored definition too
    let stored = std::fs::read_to_string(rig.state.join("domains/life.json")).unwrap();
    assert!(stored.contains(&machine), "{stored}");
    let domid = i["domid"].as_u64().unwrap();
    let pid = i["pid"].as_i64().unwrap() as i32;
    let qmp = std::path::PathBuf::from(i["paths"]["qmp"].as_str().unwrap());
    assert!(
        qmp.starts_with(rig.run.join(format!("domains/life/{domid}"))),
        "{}",
        qmp.display()
    );
    assert!(qmp.exists());
    // the guest's RAM is a memfd the agent also holds
    let agent_pid = rig.agent_pid().unwrap();
    assert!(
        holds_memfd(agent_pid as i32, "qlive-ram:life"),
        "agent holds the guest RAM memfd"
    );
    assert!(
        holds_memfd(pid, "qlive-ram:life"),
        "QEMU maps the guest RAM memfd"
    );

    rig.wait_heartbeat_past("life", 200, BOOT)
        .assert_intact("life after boot");

    let list: serde_json::Value = serde_json::from_str(&rig.ok(&["list", "--json"])).unwrap();
    assert_eq!(list[0]["name"], "life");
    assert_eq!(list[0]["state"], "running");

    // console streams live output
    let mut child = std::process::Command::new(qlive_bin())
        .args(["console", "life"])
        .env("QLIVE_SOCKET", &rig.socket)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    // Read in a thread (a blocking read must never hang the test: a killed
    // test leaves its QEMUs behind); it ends when the stream ends.
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let g2 = got.clone();
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            g2.lock().unwrap().extend_from_slice(&buf[..n]);
        }
        let _ = child.wait();
    });
    let t0 = std::time::Instant::now();
    while !String::from_utf8_lossy(&got.lock().unwrap()).contains("\nHB ") {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "console streamed no heartbeat"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // undefine refused while running
    let (code, err) = rig.fails(&["undefine", "life"]);
    assert_eq!(code, 1);
    assert!(err.contains("running"), "{err}");
    // start refused while running
    let (_, err) = rig.fails(&["start", "life"]);
    assert!(err.contains("already running"), "{err}");

    // stop: the test guest ignores ACPI, so it is forced off after the timeout
    let out = rig.ok(&["stop", "life", "--timeout", "1"]);
    assert!(out.contains("forced off"), "{out}");
    let t0 = std::time::Instant::now();
    while !reader.is_finished() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "console client not ended by stop"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let i = rig.info("life");
    assert_eq!(i["state"], "shut-off");
    assert!(
        i["reason"].as_str().unwrap().contains("did not power down"),
        "{i}"
    );
    assert!(
        Rig::ls(&rig.run.join("domains/life")).is_empty(),
        "instance paths removed"
    );
    assert!(rig.qemu_pids().is_empty());

    // second start: new domid, pinned machine, still the same UUID
    rig.ok(&["start", "life"]);
    let j = rig.info("life");
    assert!(j["domid"].as_u64().unwrap() > domid, "domid never reused");
    assert_eq!(j["uuid"], i["uuid"]);
    assert_eq!(j["machine"].as_str().unwrap(), machine);
    rig.ok(&["destroy", "life"]);
    let i = rig.info("life");
    assert_eq!(i["state"], "shut-off");
    assert_eq!(i["reason"], "destroyed");
    assert!(rig.qemu_pids().is_empty());

    rig.ok(&["undefine", "life"]);
    let (code, err) = rig.fails(&["info", "life"]);
    assert_eq!(code, 1);
    assert!(err.contains("not found"), "{err}");
    assert!(!rig.state.join("domains/life.json").exists());
    assert!(!rig.console_log("life").exists());
}

fn holds_memfd(pid: i32, name: &str) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .any(|l| l.to_string_lossy().contains(&format!("/memfd:{name}")))
}

#[test]
fn agent_sigkill_and_restart_readopts_running_guest() {
    let mut rig = Rig::new();
    rig.define_guest("keep", 256, json!({}));
    rig.ok(&["start", "keep"]);
    let before = rig.info("keep");
    let hb = rig.wait_heartbeat_past("keep", 100, BOOT);

    rig.kill_agent();
    // The guest runs on without the agent, and its log keeps filling.
    let hb2 = rig.wait_heartbeat_past("keep", hb.last + 500, Duration::from_secs(30));
    assert_eq!(
        rig.qemu_pids(),
        vec![before["pid"].as_i64().unwrap() as i32]
    );

    rig.start_agent();
    let after = rig.info("keep");
    assert_eq!(after["state"], "running");
    assert_eq!(after["domid"], before["domid"]);
    assert_eq!(after["pid"], before["pid"]);
    let agent_pid = rig.agent_pid().unwrap() as i32;
    assert!(
        holds_memfd(agent_pid, "qlive-ram:keep"),
        "memfd recovered from QEMU"
    );
    assert!(rig.agent_log_text().contains("re-adopted running instance"));

    // Twice, to be sure a re-adopted instance can be re-adopted again.
    rig.restart_agent();
    assert_eq!(rig.info("keep")["pid"], before["pid"]);

    // QMP works after re-adoption: destroy goes through it.
    let hb3 = rig.wait_heartbeat_past("keep", hb2.last + 500, Duration::from_secs(30));
    hb3.assert_intact("heartbeat across two agent restarts");
    rig.ok(&["destroy", "keep"]);
    assert!(rig.qemu_pids().is_empty());
}

#[test]
fn qemu_dying_under_the_agent_is_noticed() {
    let rig = Rig::new();
    rig.define_guest("dies", 256, json!({}));
    rig.ok(&["start", "dies"]);
    let i = rig.info("dies");
    let pid = i["pid"].as_i64().unwrap() as i32;
    // SAFETY: killing the QEMU this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let t0 = std::time::Instant::now();
    loop {
        let i = rig.info("dies");
        if i["state"] == "shut-off" {
            let reason = i["reason"].as_str().unwrap();
            assert!(
                reason.contains("died unexpectedly") && reason.contains(&pid.to_string()),
                "{reason}"
            );
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "death not noticed: {i}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        Rig::ls(&rig.run.join("domains/dies")).is_empty(),
        "paths cleaned"
    );
    // and it can be started again
    rig.ok(&["start", "dies"]);
    rig.ok(&["destroy", "dies"]);
}

#[test]
fn qemu_dying_while_agent_down_is_reported_at_restart() {
    let mut rig = Rig::new();
    rig.define_guest("gone", 256, json!({}));
    rig.ok(&["start", "gone"]);
    let pid = rig.info("gone")["pid"].as_i64().unwrap() as i32;
    rig.kill_agent();
    // SAFETY: killing the QEMU this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let t0 = std::time::Instant::now();
    while std::path::Path::new(&format!("/proc/{pid}")).exists()
        && t0.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    rig.start_agent();
    let i = rig.info("gone");
    assert_eq!(i["state"], "shut-off");
    assert!(
        i["reason"]
            .as_str()
            .unwrap()
            .contains("was not running when the agent started"),
        "{i}"
    );
    assert!(
        Rig::ls(&rig.run.join("domains/gone")).is_empty(),
        "paths cleaned: {:?}",
        Rig::ls(&rig.run.join("domains/gone"))
    );
}

#[test]
fn reused_pid_is_not_adopted_nor_killed() {
    let mut rig = Rig::new();
    rig.define_guest("reuse", 256, json!({}));
    rig.ok(&["start", "reuse"]);
    let pid = rig.info("reuse")["pid"].as_i64().unwrap() as i32;
    rig.kill_agent();
    // SAFETY: killing the QEMU this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    // An unrelated process now sits at the recorded pid (simulated by
    // pointing the record at one, with the recorded start time kept).
    let mut other = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    let status = rig.run.join("domains/reuse/status.json");
    let mut doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&status).unwrap()).unwrap();
    doc["instance"]["process"]["pid"] = json!(other.id());
    std::fs::write(&status, doc.to_string()).unwrap();
    rig.start_agent();
    let i = rig.info("reuse");
    assert_eq!(i["state"], "shut-off");
    assert!(i["reason"].as_str().unwrap().contains("reused"), "{i}");
    assert!(
        other.try_wait().unwrap().is_none(),
        "the unrelated process must not be killed"
    );
    let _ = other.kill();
    let _ = other.wait();
}

#[test]
fn two_agents_cannot_share_a_run_dir() {
    let rig = Rig::new();
    let o = std::process::Command::new(qlive_bin())
        .arg("agent")
        .env("QLIVE_STATE_DIR", &rig.state)
        .env("QLIVE_RUN_DIR", &rig.run)
        .env("QLIVE_SOCKET", rig.dir.path().join("other.sock"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("another qlive agent is running"));
    // the first still serves
    rig.ok(&["list"]);
}

#[test]
fn unreadable_status_leaves_the_running_guest_alone() {
    let mut rig = Rig::new();
    rig.define_guest("opaque", 256, json!({}));
    rig.ok(&["start", "opaque"]);
    let pid = rig.info("opaque")["pid"].as_i64().unwrap() as i32;
    rig.kill_agent();
    std::fs::write(rig.run.join("domains/opaque/status.json"), "{garbage").unwrap();
    rig.start_agent();
    let i = rig.info("opaque");
    assert_eq!(i["state"], "unreachable", "{i}");
    assert!(
        i["reason"].as_str().unwrap().contains("status unreadable"),
        "{i}"
    );
    // not killed, not orphaned: start is refused, the QEMU still runs
    assert_eq!(rig.qemu_pids(), vec![pid]);
    let (_, err) = rig.fails(&["start", "opaque"]);
    assert!(
        err.contains("may still run") && err.contains("destroy"),
        "{err}"
    );
    // destroy finds and kills it
    rig.ok(&["destroy", "opaque"]);
    assert!(rig.qemu_pids().is_empty());
    assert_eq!(rig.info("opaque")["state"], "shut-off");
    rig.ok(&["start", "opaque"]);
    rig.ok(&["destroy", "opaque"]);
}
