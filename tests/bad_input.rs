//! Hostile or broken input: the agent answers with an error that names the
//! problem, keeps serving, and leaves no guest, definition or file harmed.

mod common;

use common::*;
use serde_json::json;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;

fn agent_fds(rig: &Rig) -> Vec<String> {
    let pid = rig.agent_pid().unwrap();
    let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|l| l.to_string_lossy().into_owned())
        .filter(|l| {
            !l.starts_with("socket:") && !l.starts_with("anon_inode:") && !l.starts_with("pipe:")
        })
        .collect();
    v.sort();
    v
}

#[test]
fn malformed_and_oversized_requests_get_errors_and_agent_keeps_serving() {
    let rig = Rig::new();
    let s = UnixStream::connect(&rig.socket).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut answer = |w: &mut UnixStream, line: &[u8]| -> serde_json::Value {
        w.write_all(line).unwrap();
        let mut a = String::new();
        r.read_line(&mut a).unwrap();
        serde_json::from_str(&a).unwrap()
    };
    for bad in [
        &b"{not json\n"[..],
        b"[1,2]\n",
        b"{\"op\":\"format-disk\"}\n",
        b"{\"op\":\"start\"}\n",
        b"\xff\xfe\n",
    ] {
        let a = answer(&mut w, bad);
        assert_eq!(a["ok"], false, "{a}");
        assert_eq!(a["error"]["kind"], "bad-request", "{a}");
        assert!(
            a["error"]["message"]
                .as_str()
                .unwrap()
                .contains("malformed request"),
            "{a}"
        );
    }
    // an upgrade summary that is not one, or a dry run's: refused, and
    // the metrics keep no last run
    for bad in [
        json!({"op": "record-upgrade", "summary": {"selected": -1}}),
        json!({"op": "record-upgrade", "summary": {"dry_run": true, "failed": 0,
            "failed_domains": [], "parallel": 1, "selected": 0, "succeeded": 0,
            "unchecked": [], "wall_ms": 1}}),
    ] {
        let err = rig.try_call(&bad).unwrap_err();
        assert_eq!(err["kind"], "bad-request", "{bad}: {err}");
    }
    let m = rig.try_call(&json!({"op": "metrics"})).unwrap();
    assert_eq!(m["tally"]["last_upgrade"], serde_json::Value::Null, "{m}");

    // same connection still works
    let a = answer(&mut w, b"{\"op\":\"ping\"}\n");
    assert_eq!(a["ok"], true);

    // 2 MiB line: refused, connection closed, agent still serves others
    let mut s2 = UnixStream::connect(&rig.socket).unwrap();
    let mut big = vec![b'x'; 2 << 20];
    big.push(b'\n');
    let _ = s2.write_all(&big);
    let mut a = String::new();
    BufReader::new(s2).read_line(&mut a).unwrap();
    let a: serde_json::Value = serde_json::from_str(&a).unwrap();
    assert_eq!(a["error"]["kind"], "too-large", "{a}");
    assert!(
        a["error"]["message"].as_str().unwrap().contains("1048576"),
        "{a}"
    );

    // a client that sends half a line and vanishes
    let mut s3 = UnixStream::connect(&rig.socket).unwrap();
    s3.write_all(b"{\"op\":\"li").unwrap();
    drop(s3);
    assert!(rig.try_call(&json!({"op": "list"})).is_ok());
}

#[test]
fn invalid_definitions_are_refused_with_the_field_named() {
    let rig = Rig::new();
    let def = |v: serde_json::Value| {
        let f = rig.dir.path().join("bad.json");
        std::fs::write(&f, v.to_string()).unwrap();
        rig.fails(&["define", f.to_str().unwrap()])
    };
    let base = json!({"name": "ok", "emulator": SYSTEM_QEMU, "memory_mib": 64});
    let with = |k: &str, v: serde_json::Value| {
        let mut b = base.clone();
        b[k] = v;
        b
    };
    for (v, needle) in [
        (with("name", json!("../../etc/passwd")), "`name`"),
        (with("name", json!("a/b")), "`name`"),
        (with("memroy_mib", json!(64)), "memroy_mib"),
        (with("memory_mib", json!("lots")), "memory_mib"),
        (with("memory_mib", json!(1)), "`memory_mib`"),
        (with("emulator", json!("/nonexistent/qemu")), "`emulator`"),
        (with("emulator", json!("relative/qemu")), "`emulator`"),
        (
            with("disks", json!([{"path": "/x.img", "format": "vmdk"}])),
            "disks[0].format",
        ),
        (
            with("extra_args", json!(["-incoming", "tcp:0:1"])),
            "extra_args[0]",
        ),
        (with("uuid", json!("not-a-uuid")), "uuid"),
    ] {
        let (code, err) = def(v.clone());
        assert_eq!(code, 1, "{v}: {err}");
        assert!(err.contains(needle), "{v}: expected {needle} in {err}");
    }
    // not JSON at all: the client says so, naming the file
    let f = rig.dir.path().join("garbage.json");
    std::fs::write(&f, "name = vm").unwrap();
    let (code, err) = rig.fails(&["define", f.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(
        err.contains("garbage.json") && err.contains("not valid JSON"),
        "{err}"
    );
    // nothing was stored
    assert!(Rig::ls(&rig.state.join("domains")).is_empty());

    // duplicates
    rig.define_guest("dup", 64, json!({}));
    let uuid = rig.info("dup")["uuid"].as_str().unwrap().to_string();
    let f = rig.dir.path().join("dup2.json");
    std::fs::write(
        &f,
        json!({"name": "dup", "emulator": SYSTEM_QEMU, "memory_mib": 64}).to_string(),
    )
    .unwrap();
    let (_, err) = rig.fails(&["define", f.to_str().unwrap()]);
    assert!(err.contains("already exists"), "{err}");
    std::fs::write(
        &f,
        json!({"name": "other", "uuid": uuid, "emulator": SYSTEM_QEMU, "memory_mib": 64})
            .to_string(),
    )
    .unwrap();
    let (_, err) = rig.fails(&["define", f.to_str().unwrap()]);
    assert!(err.contains("already used by domain \"dup\""), "{err}");
    // traversal in a name on other calls
    let e = rig
        .try_call(&json!({"op": "start", "name": "../dup"}))
        .unwrap_err();
    assert_eq!(e["kind"], "not-found", "{e}");
}

#[test]
fn missing_emulator_at_start_leaves_nothing_behind() {
    let rig = Rig::new();
    let emu = rig.dir.path().join("qemu-copy");
    std::fs::copy(SYSTEM_QEMU, &emu).unwrap();
    rig.define_guest("noemu", 128, json!({"emulator": emu}));
    std::fs::remove_file(&emu).unwrap();
    let fds_before = agent_fds(&rig);
    let (code, err) = rig.fails(&["start", "noemu"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("does not exist") && err.contains("qemu-copy"),
        "{err}"
    );
    assert!(rig.qemu_pids().is_empty());
    assert!(Rig::ls(&rig.run.join("domains/noemu")).is_empty());
    assert_eq!(agent_fds(&rig), fds_before, "no fd leaked");
    assert_eq!(rig.info("noemu")["state"], "shut-off");
    // the stored definition is untouched
    let stored = std::fs::read_to_string(rig.state.join("domains/noemu.json")).unwrap();
    assert!(stored.contains("qemu-copy"));
}

#[test]
fn emulator_that_fails_half_way_leaves_nothing_behind() {
    let rig = Rig::new();
    // QEMU itself refuses the command line after the probe succeeded
    rig.define_guest(
        "baddev",
        128,
        json!({"extra_args": ["-device", "no-such-device-model"]}),
    );
    let fds_before = agent_fds(&rig);
    let (code, err) = rig.fails(&["start", "baddev"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("failed to start") && err.contains("no-such-device-model"),
        "{err}"
    );
    assert!(rig.qemu_pids().is_empty());
    assert!(
        Rig::ls(&rig.run.join("domains/baddev")).is_empty(),
        "{:?}",
        Rig::ls(&rig.run.join("domains/baddev"))
    );
    assert_eq!(agent_fds(&rig), fds_before, "no fd leaked");

    // an "emulator" that is not QEMU at all
    let fake = rig.dir.path().join("fake-qemu");
    std::fs::write(&fake, "#!/bin/sh\necho 'this is not qemu' >&2\nexit 3\n").unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    rig.define_guest("fake", 128, json!({"emulator": fake}));
    let (_, err) = rig.fails(&["start", "fake"]);
    assert!(
        err.contains("did not answer QMP") && err.contains("this is not qemu"),
        "{err}"
    );
    assert!(Rig::ls(&rig.run.join("domains/fake")).is_empty());
}

#[test]
fn corrupt_stored_definition_is_refused_and_untouched() {
    let mut rig = Rig::new();
    rig.define_guest("fine", 64, json!({}));
    rig.kill_agent();
    let bad = rig.state.join("domains/broken.json");
    std::fs::write(
        &bad,
        "{\"format\":\"qlive-domain\",\"version\":1,\"definition\":{\"name\":",
    )
    .unwrap();
    let newer = rig.state.join("domains/newer.json");
    let newer_doc = json!({"format": "qlive-domain", "version": 7, "definition": {}}).to_string();
    std::fs::write(&newer, &newer_doc).unwrap();
    rig.start_agent();
    let list = rig.ok(&["list"]);
    assert!(list.contains("fine") && !list.contains("broken"), "{list}");
    let log = rig.agent_log_text();
    assert!(
        log.contains("broken.json") && log.contains("corrupt"),
        "{log}"
    );
    assert!(
        log.contains("newer.json") && log.contains("version 7"),
        "{log}"
    );
    // a define with that name does not overwrite the file
    let f = rig.dir.path().join("b.json");
    std::fs::write(
        &f,
        json!({"name": "broken", "emulator": SYSTEM_QEMU, "memory_mib": 64}).to_string(),
    )
    .unwrap();
    let (_, err) = rig.fails(&["define", f.to_str().unwrap()]);
    assert!(err.contains("could not be loaded"), "{err}");
    assert!(std::fs::read_to_string(&bad)
        .unwrap()
        .ends_with("\"name\":"));
    assert_eq!(std::fs::read_to_string(&newer).unwrap(), newer_doc);
}

/// A timeout too large to add to a clock is refused before anything
/// starts; the guest and its instance are untouched.
#[test]
fn a_huge_timeout_is_refused_before_the_migration_starts() {
    let rig = Rig::new();
    rig.define_guest("t", 128, json!({}));
    rig.ok(&["start", "t"]);
    let before = rig.info("t");
    for op in [
        json!({"op": "migrate", "name": "t", "timeout_s": u64::MAX}),
        json!({"op": "stop", "name": "t", "timeout_s": u64::MAX}),
    ] {
        let err = rig.try_call(&op).expect_err("refused");
        assert_eq!(err["kind"], "bad-request", "{err}");
        assert!(
            err["message"].as_str().unwrap_or("").contains("timeout_s"),
            "{err}"
        );
    }
    let after = rig.info("t");
    assert_eq!(after["state"], "running");
    assert_eq!(after["pid"], before["pid"]);
    assert_eq!(after["job"], serde_json::Value::Null);
    assert_eq!(
        Rig::ls(&rig.run.join("domains/t")).len(),
        2,
        "one instance dir and status.json"
    );
    rig.ok(&["destroy", "t"]);
}
