//! The guest agent's and VNC's stable sockets (`"guest_agent": true`,
//! `"vnc": true`) on the test
//! guest, which has the virtio-serial port but no qemu-guest-agent: the
//! path is there, connectable, and served by the running instance through
//! a successful migration, a failed one and an agent SIGKILL, and removed
//! when the run ends; a VNC client gets QEMU's RFB greeting at every step;
//! `qlive guest-agent` reports the silent guest clearly.
//! The answers of a real qemu-guest-agent are checked with the Debian guest
//! (docs/devices.md, "The guest agent").

mod common;

use common::*;
use serde_json::json;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::time::Duration;

fn socket(rig: &Rig) -> std::path::PathBuf {
    rig.run.join("domains/ga/guest-agent.sock")
}

/// A VNC client at the stable path gets QEMU's RFB greeting.
fn assert_vnc(rig: &Rig, when: &str) {
    rig.assert_rfb_greeting("ga", Duration::from_secs(10), when);
}

/// The path is a socket, 0660, and `connect` reaches a listener.
fn assert_served(rig: &Rig, when: &str) {
    let p = socket(rig);
    let m =
        std::fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{when}: {}: {e}", p.display()));
    assert!(m.file_type().is_socket(), "{when}: not a socket");
    assert_eq!(m.permissions().mode() & 0o777, 0o660, "{when}");
    std::os::unix::net::UnixStream::connect(&p).unwrap_or_else(|e| panic!("{when}: connect: {e}"));
}

#[test]
fn the_guest_agent_socket_stays_through_migrations_failures_and_restarts() {
    let mut rig = Rig::new();
    rig.define_guest("ga", 256, json!({"guest_agent": true, "vnc": true}));
    rig.ok(&["start", "ga"]);
    rig.wait_heartbeat_past("ga", 100, Duration::from_secs(90));
    assert_served(&rig, "after start");
    assert_vnc(&rig, "after start");

    // no qemu-guest-agent in this guest: a clear error, within the timeout
    let t = std::time::Instant::now();
    let (code, err) = rig.fails(&[
        "guest-agent",
        "ga",
        r#"{"execute":"guest-ping"}"#,
        "--timeout",
        "2",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("did not answer within 2 s"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(10));
    let (code, err) = rig.fails(&["guest-agent", "ga", "not json"]);
    assert_eq!(code, 2, "{err}");

    let new = new_qemu();
    let r = rig.migrate("ga", &["--emulator", new.to_str().expect("utf8")]);
    assert_eq!(r["result"], "success", "{r}");
    assert_served(&rig, "after 7.2 -> 10.0");
    assert_vnc(&rig, "after 7.2 -> 10.0");

    rig.add_hook(
        "50-refuse",
        "[ \"$2\" = prepare ] && { echo 'not here' >&2; exit 1; }; exit 0",
    );
    let (code, err) = rig.fails(&["migrate", "ga"]);
    assert_eq!(code, 1, "{err}");
    assert_served(&rig, "after a failed migration");
    assert_vnc(&rig, "after a failed migration");
    std::fs::remove_file(rig.hooks.join("50-refuse")).unwrap();

    let pid = rig.info("ga")["pid"].clone();
    rig.kill_agent();
    assert_served(&rig, "while the agent is down");
    // a VNC client connecting now waits in the backlog, and is served by
    // the next agent
    let mut waiting =
        std::os::unix::net::UnixStream::connect(rig.run.join("domains/ga/vnc.sock")).unwrap();
    rig.start_agent();
    {
        use std::io::Read;
        waiting
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut g = [0u8; 12];
        waiting
            .read_exact(&mut g)
            .expect("RFB greeting after the restart");
        assert!(g.starts_with(b"RFB 003."), "{g:?}");
    }
    assert_eq!(rig.info("ga")["pid"], pid, "re-adopted");
    let r = rig.migrate("ga", &["--emulator", SYSTEM_QEMU]);
    assert_eq!(r["result"], "success", "{r}");
    assert_served(&rig, "after an agent SIGKILL and 10.0 -> 7.2");
    assert_vnc(&rig, "after an agent SIGKILL and 10.0 -> 7.2");
    let hb = rig.heartbeat("ga").last;
    rig.wait_heartbeat_past("ga", hb + 100, Duration::from_secs(30))
        .assert_intact("ga");

    rig.ok(&["destroy", "ga"]);
    assert!(!socket(&rig).exists(), "removed with the run");
    assert!(!rig.run.join("domains/ga/vnc.sock").exists());
    let d = rig.try_call(
        &json!({"op": "guest-agent", "name": "ga", "command": {"execute": "guest-ping"}}),
    );
    assert_eq!(d.unwrap_err()["kind"], "invalid-state");

    // the escape hatch an upgrade would break is refused, naming the field
    let f = rig.dir.path().join("raw.json");
    std::fs::write(
        &f,
        json!({"name": "raw", "emulator": SYSTEM_QEMU, "memory_mib": 64,
               "extra_args": ["-chardev", "socket,id=qga0,path=/tmp/qga.sock,server=on,wait=off"]})
        .to_string(),
    )
    .unwrap();
    let (code, err) = rig.fails(&["define", f.to_str().expect("utf8")]);
    assert_eq!(code, 1);
    assert!(err.contains("guest_agent: true"), "{err}");
}

/// An agent SIGKILLed in the middle of a migration: the next agent's
/// recovery finishes it (to the destination, from Finish) or rolls it back
/// (to the source, from Prepare), and serves the stable sockets again for
/// the instance that runs. (The VNC accept loop is the agent's own: it
/// must be restarted for a recovered migration as for a re-adopted domain.)
#[test]
fn the_sockets_are_served_after_a_migration_the_agent_died_in() {
    for (at, runs_on) in [
        ("finish:before", "destination"),
        ("prepare:after", "source"),
    ] {
        let mut rig = Rig::new();
        rig.kill_agent();
        rig.start_agent_with(&[("QLIVE_TEST_PAUSE_AT", at)]);
        rig.define_guest("ga", 256, json!({"guest_agent": true, "vnc": true}));
        rig.ok(&["start", "ga"]);
        rig.wait_heartbeat_past("ga", 100, Duration::from_secs(90));
        let src = rig.info("ga")["domid"].clone();
        let mig = rig.migrate_bg("ga", &[]);
        rig.wait_test_paused("ga", Duration::from_secs(30));
        rig.kill_agent();
        let _ = mig.join();
        rig.start_agent();
        let info = rig.info("ga");
        assert_eq!(info["state"], "running", "{at}: {info}");
        assert_eq!(
            info["domid"] == src,
            runs_on == "source",
            "{at}: runs on the {runs_on}: {info}"
        );
        assert_served(&rig, &format!("{at}: after recovery to the {runs_on}"));
        assert_vnc(&rig, &format!("{at}: after recovery to the {runs_on}"));
        let hb = rig.heartbeat("ga").last;
        rig.wait_heartbeat_past("ga", hb + 100, Duration::from_secs(30))
            .assert_intact("ga");
        rig.ok(&["destroy", "ga"]);
    }
}
