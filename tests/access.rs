//! API access control and connection limits, against a real agent:
//! a real unprivileged user (`nobody`) with and without the API group,
//! idle and stuck clients, the connection limit, and a migration that
//! goes through while clients misbehave.

mod common;

use common::*;
use serde_json::json;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const NOBODY: u32 = 65534;
const NOGROUP: u32 = 65534;
/// Debian's `users` group stands in for the API group.
const API_GROUP: &str = "users";
const API_GID: u32 = 100;

/// Run `qlive ARGS` as uid `nobody` with primary group `gid` and
/// supplementary `groups`.
fn qlive_as(rig: &Rig, gid: u32, groups: &[u32], args: &[&str]) -> Output {
    let groups: Vec<libc::gid_t> = groups.to_vec();
    let mut cmd = Command::new(qlive_bin());
    cmd.args(args)
        .env("QLIVE_SOCKET", &rig.socket)
        .stdin(Stdio::null());
    // SAFETY: setgroups/setgid/setuid are async-signal-safe; `groups` was
    // allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(NOBODY) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().expect("run qlive as nobody")
}

/// A `/proc/PID/status` field.
fn status_field(pid: u32, key: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

fn kept_mask() -> u64 {
    qlive::agent::privileges::KEEP
        .iter()
        .map(|(c, _)| 1u64 << c.index())
        .fold(0, |a, b| a | b)
}

fn cap_mask(pid: u32, key: &str) -> u64 {
    u64::from_str_radix(&status_field(pid, key), 16).expect("hex caps")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A rig whose agent uses `users` as the API group, with small limits,
/// and whose directories `nobody` may traverse to reach the socket.
fn rig(env: &[(&str, &str)]) -> Rig {
    let mut rig = Rig::new();
    rig.kill_agent();
    let mut e = vec![("QLIVE_API_GROUP", API_GROUP)];
    e.extend_from_slice(env);
    rig.start_agent_with(&e);
    for d in [rig.dir.path(), rig.run.as_path()] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o711)).expect("chmod");
    }
    rig
}

#[test]
fn only_root_and_the_api_group_may_call() {
    let rig = rig(&[]);
    // The agent runs with exactly the documented capabilities.
    let agent = rig.agent_pid().expect("agent pid");
    for set in ["CapBnd", "CapPrm", "CapEff"] {
        assert_eq!(cap_mask(agent, set), kept_mask(), "agent {set}");
    }
    assert_eq!(cap_mask(agent, "CapInh"), 0);
    assert_eq!(cap_mask(agent, "CapAmb"), 0);
    rig.define_guest("keep", 128, json!({}));
    // Each domain gets its own SELinux MCS pair, recorded in the state dir
    // and released at undefine (applied only where SELinux is enabled).
    rig.define_guest("other", 128, json!({}));
    let pair = |n: &str| rig.info(n)["selinux"]["mcs"].as_str().map(String::from);
    let (a, b) = (pair("keep").expect("pair"), pair("other").expect("pair"));
    assert!(a.starts_with('c') && a.contains(",c"), "{a}");
    assert_ne!(a, b);
    rig.ok(&["undefine", "other"]);
    let mcs = std::fs::read_to_string(rig.state.join("mcs.json")).expect("mcs.json");
    assert!(mcs.contains(&a) && !mcs.contains(&b), "{mcs}");
    let st = std::fs::metadata(&rig.socket).expect("socket");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(st.mode() & 0o777, 0o660, "socket mode");
    assert_eq!(st.gid(), API_GID, "socket group");

    // Not in the group: the socket's mode keeps nobody out, with a clear
    // message from the client.
    let o = qlive_as(&rig, NOGROUP, &[], &["list"]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("permission denied connecting"),
        "{}",
        text(&o)
    );

    // In the group, as primary or supplementary group: allowed.
    let o = qlive_as(&rig, API_GID, &[], &["list"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("keep"), "{}", text(&o));
    let o = qlive_as(&rig, NOGROUP, &[API_GID], &["info", "keep"]);
    assert!(o.status.success(), "{}", text(&o));

    // An admin loosens the socket: the agent's own check still refuses,
    // names the user, and does nothing.
    std::fs::set_permissions(&rig.socket, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    for args in [&["undefine", "keep"][..], &["list"][..]] {
        let o = qlive_as(&rig, NOGROUP, &[], args);
        assert!(!o.status.success(), "{args:?} allowed: {}", text(&o));
        let t = text(&o);
        assert!(
            t.contains("permission denied: uid 65534") && t.contains("group users"),
            "{t}"
        );
    }
    assert_eq!(rig.info("keep")["state"], "shut-off");
    assert!(rig.agent_log_text().contains("API access refused"));
}

fn connect(rig: &Rig) -> UnixStream {
    let s = UnixStream::connect(&rig.socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    s
}

fn call(s: &mut UnixStream, req: &serde_json::Value) -> serde_json::Value {
    writeln!(s, "{req}").expect("write");
    let mut line = String::new();
    BufReader::new(s.try_clone().expect("clone"))
        .read_line(&mut line)
        .expect("read");
    serde_json::from_str(&line).expect("json answer")
}

#[test]
fn stuck_clients_and_the_connection_limit_do_not_block_others_or_a_migration() {
    let rig = rig(&[
        ("QLIVE_MAX_CONNECTIONS", "4"),
        ("QLIVE_IDLE_TIMEOUT_S", "8"),
    ]);
    rig.define_guest("mig", 256, json!({}));
    rig.ok(&["start", "mig"]);
    rig.wait_heartbeat_past("mig", 500, Duration::from_secs(60));
    // QEMU: no more than the agent's bound, no_new_privs, seccomp filters
    // (QEMU's -sandbox; this guest has no NIC, so no tap guard: that one
    // is checked by tests/devices.rs).
    let qemu = rig.info("mig")["pid"].as_u64().expect("pid") as u32;
    // QEMU itself keeps only CAP_DAC_OVERRIDE (bit 1).
    assert_eq!(cap_mask(qemu, "CapEff"), 1 << 1);
    assert_eq!(cap_mask(qemu, "CapPrm"), 1 << 1);
    assert_eq!(cap_mask(qemu, "CapBnd") & !kept_mask(), 0);
    assert_eq!(status_field(qemu, "NoNewPrivs"), "1");
    assert_eq!(status_field(qemu, "Seccomp"), "2");
    let filters: u32 = status_field(qemu, "Seccomp_filters").parse().unwrap_or(0);
    assert!(filters >= 1, "seccomp filters: {filters}");

    // Client 1 sends half a request and stalls; client 2 floods requests
    // and never reads an answer.
    let mut half = connect(&rig);
    half.write_all(br#"{"op":"li"#).expect("write");
    let mut flood = connect(&rig);
    flood.set_nonblocking(true).expect("nonblocking");
    let line = format!("{}\n", json!({"op": "list"}));
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(2) {
        if flood.write_all(line.as_bytes()).is_err() {
            break; // the socket buffer is full: the agent is blocked on us
        }
    }

    // Others are served at once, and a migration goes through.
    let t0 = Instant::now();
    rig.ok(&["list"]);
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "list waited {:?}",
        t0.elapsed()
    );
    let r = rig.migrate("mig", &[]);
    assert_eq!(r["result"], "success", "{r}");

    // Two more connections fill the limit of 4; the fifth is told why.
    let _c3 = connect(&rig);
    let _c4 = connect(&rig);
    std::thread::sleep(Duration::from_millis(200));
    let mut c5 = connect(&rig);
    let v = call(&mut c5, &json!({"op": "list"}));
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["error"]["kind"], "busy", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("limit 4"),
        "{v}"
    );

    // The idle ones are closed after the idle timeout (8 s: long enough
    // that the stalled client still counts when the fifth connects, even
    // on a loaded machine where the flood and the migration take seconds),
    // the stuck
    // writer after the write timeout (10 s); then there is room again.
    let mut buf = [0u8; 16];
    half.set_read_timeout(Some(Duration::from_secs(15))).ok();
    let t0 = Instant::now();
    let n = half
        .read(&mut buf)
        .expect("idle connection closed, not timed out");
    assert_eq!(n, 0, "expected EOF");
    let waited = t0.elapsed();
    assert!(waited < Duration::from_secs(12), "closed after {waited:?}");
    let t0 = Instant::now();
    loop {
        let mut c = connect(&rig);
        let v = call(&mut c, &json!({"op": "ping"}));
        if v["ok"] == true {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "no room again: {v}");
        std::thread::sleep(Duration::from_millis(500));
    }
    rig.heartbeat("mig")
        .assert_intact("while clients misbehaved");
    rig.ok(&["destroy", "mig"]);
}

#[test]
fn qemu_runs_as_an_unprivileged_user_and_migrates() {
    let mut rig = Rig::new();
    rig.kill_agent();
    rig.start_agent_with(&[("QLIVE_QEMU_USER", "nobody")]);
    std::fs::set_permissions(rig.dir.path(), std::fs::Permissions::from_mode(0o711))
        .expect("chmod");
    let img = rig.dir.path().join("disk.raw");
    std::fs::write(&img, vec![0u8; 1 << 20]).expect("image");
    nix::unistd::chown(
        &img,
        Some(nix::unistd::Uid::from_raw(NOBODY)),
        Some(nix::unistd::Gid::from_raw(NOGROUP)),
    )
    .expect("chown");
    rig.define_guest(
        "unpriv",
        256,
        json!({"disks": [{"path": img, "format": "raw"}]}),
    );
    rig.ok(&["start", "unpriv"]);
    rig.wait_heartbeat_past("unpriv", 300, Duration::from_secs(60));
    let uid_of = |pid: u32| {
        status_field(pid, "Uid")
            .split_whitespace()
            .map(String::from)
            .collect::<Vec<_>>()
    };
    let qemu = rig.info("unpriv")["pid"].as_u64().expect("pid") as u32;
    assert_eq!(uid_of(qemu), ["65534"; 4], "real, effective, saved, fs uid");
    assert_eq!(cap_mask(qemu, "CapEff"), 0);
    assert_eq!(status_field(qemu, "NoNewPrivs"), "1");

    let r = rig.migrate(
        "unpriv",
        &["--emulator", new_qemu().to_str().expect("utf8")],
    );
    assert_eq!(r["result"], "success", "{r}");
    let qemu2 = rig.info("unpriv")["pid"].as_u64().expect("pid") as u32;
    assert_ne!(qemu, qemu2);
    assert_eq!(uid_of(qemu2), ["65534"; 4]);
    let hb = rig.wait_heartbeat_past(
        "unpriv",
        rig.heartbeat("unpriv").last + 200,
        Duration::from_secs(30),
    );
    hb.assert_intact("after migrating an unprivileged QEMU");

    // A disk the user may not write is refused at start, naming both.
    let locked = rig.dir.path().join("locked.raw");
    std::fs::write(&locked, vec![0u8; 1 << 20]).expect("image");
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    rig.define_guest(
        "locked",
        128,
        json!({"disks": [{"path": locked, "format": "raw"}]}),
    );
    let (_, err) = rig.fails(&["start", "locked"]);
    assert!(
        err.contains("disks[0].path") && err.contains("nobody may not read and write"),
        "{err}"
    );
    assert_eq!(rig.info("locked")["state"], "shut-off");
    rig.ok(&["destroy", "unpriv"]);
}
