//! The Ansible collection `qlive.fleet` (ansible/) end to end: a real
//! `ansible-playbook` (the pinned ansible-core of `ansible/test/setup.sh`)
//! runs the example rolling-upgrade playbook against four inventory hosts.
//! Each host is a qlive agent of its own (one `Rig`: its own state, run dir,
//! hooks and socket) reached with `ansible_connection=local` and its own
//! `qlive_socket`. Every guest is made stale as a package upgrade does (a
//! copied QEMU binary replaced by rename), one host refuses every migration
//! with a `prepare` hook, and the play must behave as `serial` and
//! `max_fail_percentage` say; after the hook is removed, a rerun finishes.

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The virtualenv `ansible/test/setup.sh` installs (`make test` runs it).
fn venv() -> PathBuf {
    let v = std::env::var_os("QLIVE_ANSIBLE_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/ansible-venv"));
    assert!(
        v.join("bin/ansible-playbook").is_file(),
        "ansible-core missing in {}: run ansible/test/setup.sh",
        v.display()
    );
    v
}

/// An installed-looking QEMU prefix in the rig (as in tests/upgrade.rs).
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

struct Host {
    name: &'static str,
    rig: Rig,
    guests: Vec<String>,
}

impl Host {
    fn stale(&self) -> BTreeMap<String, bool> {
        let v: Value = serde_json::from_str(&self.rig.ok(&["stale", "--json"])).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|d| (d["name"].as_str().unwrap().to_string(), d["stale"] == true))
            .collect()
    }

    fn pids(&self) -> BTreeMap<String, Value> {
        self.guests
            .iter()
            .map(|g| {
                let i = self.rig.info(g);
                assert_eq!(i["state"], "running", "{}: {g}: {i}", self.name);
                (g.clone(), i["pid"].clone())
            })
            .collect()
    }
}

/// One host's line of the PLAY RECAP.
#[derive(Debug, Clone, Default)]
struct Recap {
    ok: u32,
    changed: u32,
    failed: u32,
    unreachable: u32,
}

struct Run {
    code: Option<i32>,
    stdout: String,
    /// The hosts of each `serial` batch, in order (one `PLAY [...]` header
    /// per batch in the default callback's output).
    batches: Vec<Vec<String>>,
    recap: BTreeMap<String, Recap>,
    /// The tree callback's last result per host.
    last: BTreeMap<String, Value>,
    secs: f64,
}

fn host_of(line: &str) -> Option<String> {
    for p in [
        "ok: [",
        "changed: [",
        "fatal: [",
        "failed: [",
        "skipping: [",
    ] {
        if let Some(rest) = line.strip_prefix(p) {
            return rest.split(']').next().map(str::to_string);
        }
    }
    None
}

fn parse(stdout: &str) -> (Vec<Vec<String>>, BTreeMap<String, Recap>) {
    let mut batches: Vec<Vec<String>> = vec![];
    let mut recap = BTreeMap::new();
    let mut in_recap = false;
    for line in stdout.lines() {
        if line.starts_with("PLAY RECAP") {
            in_recap = true;
        } else if line.starts_with("PLAY [") {
            batches.push(vec![]);
        } else if in_recap {
            let Some((name, counts)) = line.split_once(" : ") else {
                continue;
            };
            let mut r = Recap::default();
            for kv in counts.split_whitespace() {
                let Some((k, v)) = kv.split_once('=') else {
                    continue;
                };
                let v: u32 = v.parse().unwrap_or(0);
                match k {
                    "ok" => r.ok = v,
                    "changed" => r.changed = v,
                    "failed" => r.failed = v,
                    "unreachable" => r.unreachable = v,
                    _ => {}
                }
            }
            recap.insert(name.trim().to_string(), r);
        } else if let (Some(h), Some(b)) = (host_of(line), batches.last_mut()) {
            if !b.contains(&h) {
                b.push(h);
            }
        }
    }
    (batches, recap)
}

/// `venv/bin/PROG` with the environment every run here gets: the collection
/// from the checkout, no configuration but this, a tree callback writing
/// each host's last result into `tree`.
fn ansible_cmd(prog: &str, work: &Path, tree: &Path) -> Command {
    let v = venv();
    let tmp = work.join("ansible-tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let mut cmd = Command::new(v.join("bin").join(prog));
    cmd.current_dir(work) // no ansible.cfg of the checkout or the user
        .env("ANSIBLE_CONFIG", work.join("none.cfg"))
        .env("ANSIBLE_COLLECTIONS_PATH", repo_root().join("ansible"))
        .env("ANSIBLE_STDOUT_CALLBACK", "default")
        .env("ANSIBLE_LOAD_CALLBACK_PLUGINS", "1")
        .env("ANSIBLE_CALLBACKS_ENABLED", "ansible.builtin.tree")
        .env("ANSIBLE_CALLBACK_TREE_DIR", tree)
        .env("ANSIBLE_NOCOLOR", "1")
        .env("ANSIBLE_RETRY_FILES_ENABLED", "0")
        .env("ANSIBLE_PIPELINING", "1")
        .env("ANSIBLE_LOCAL_TEMP", &tmp)
        .env("ANSIBLE_REMOTE_TEMP", &tmp)
        .env("ANSIBLE_HOME", work.join("ansible-home"))
        // the modules must take the socket from the inventory, not from here
        .env_remove("QLIVE_SOCKET")
        .env(
            "PATH",
            format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", v.join("bin").display()),
        )
        .stdin(Stdio::null());
    cmd
}

fn tree_results(tree: &Path) -> BTreeMap<String, Value> {
    let mut last = BTreeMap::new();
    for h in Rig::ls(tree) {
        let text = std::fs::read_to_string(tree.join(&h)).unwrap();
        last.insert(h, serde_json::from_str(&text).unwrap_or(Value::Null));
    }
    last
}

/// `ansible hypervisors -m MODULE ARGS...` (ad hoc): exit code and each host's result.
fn adhoc(
    work: &Path,
    tag: &str,
    inventory: &Path,
    args: &[&str],
) -> (Option<i32>, BTreeMap<String, Value>) {
    let tree = work.join(format!("tree-{tag}"));
    let out = ansible_cmd("ansible", work, &tree)
        .arg("-i")
        .arg(inventory)
        .arg("hypervisors")
        .args(args)
        .output()
        .expect("run ansible");
    eprintln!(
        "==== ansible {args:?}: exit {:?}\n{}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), tree_results(&tree))
}

/// Run `ansible-playbook -i inventory playbook` and parse what it printed.
fn playbook(work: &Path, tag: &str, inventory: &Path, playbook: &Path) -> Run {
    let tree = work.join(format!("tree-{tag}"));
    let t0 = Instant::now();
    let out = ansible_cmd("ansible-playbook", work, &tree)
        .arg("-i")
        .arg(inventory)
        .arg(playbook)
        .output()
        .expect("run ansible-playbook");
    let secs = t0.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "==== ansible-playbook ({tag}): exit {:?} in {secs:.1} s\n{stdout}\n{stderr}",
        out.status.code()
    );
    let (batches, recap) = parse(&stdout);
    let last = tree_results(&tree);
    Run {
        code: out.status.code(),
        stdout,
        batches,
        recap,
        last,
        secs,
    }
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn rolling_upgrade_canary_first_a_refusing_host_and_a_rerun() {
    let t_start = Instant::now();
    let _ = venv();
    // hv2 refuses every migration: it has two guests, the others one.
    let layout: [(&str, &[&str]); 4] = [
        ("hv1", &["hv1a"]),
        ("hv2", &["hv2a", "hv2b"]),
        ("hv3", &["hv3a"]),
        ("hv4", &["hv4a"]),
    ];
    let mut hosts = vec![];
    let mut emus = vec![];
    for (name, guests) in layout {
        let rig = Rig::new();
        let emu = qemu_prefix(&rig);
        for g in guests {
            rig.define_guest(
                g,
                128,
                json!({"emulator": emu, "cmdline": "console=ttyS0 quiet panic=-1 no_timer_check qlive.pattern_mib=8"}),
            );
            rig.ok(&["start", g]);
        }
        emus.push(emu);
        hosts.push(Host {
            name,
            rig,
            guests: names(guests),
        });
    }
    for h in &hosts {
        for g in &h.guests {
            h.rig.wait_heartbeat_past(g, 100, Duration::from_secs(120));
        }
    }
    eprintln!(
        "5 guests on 4 agents up after {:.1} s",
        t_start.elapsed().as_secs_f64()
    );

    // "upgrade the package" on every host: every guest is now stale
    for (h, emu) in hosts.iter().zip(&emus) {
        replace_like_dpkg(emu, SYSTEM_QEMU);
        let s = h.stale();
        assert_eq!(s.len(), h.guests.len(), "{}: {s:?}", h.name);
        assert!(s.values().all(|&st| st), "{}: all stale: {s:?}", h.name);
    }
    let hv2 = &hosts[1];
    hv2.rig.add_hook(
        "50-port",
        "[ \"$2\" = prepare ] && { echo \"no port on this host for $1\" >&2; exit 1; }; exit 0",
    );
    let before: Vec<BTreeMap<String, Value>> = hosts.iter().map(Host::pids).collect();

    // the inventory: each host local, with its own agent's socket
    let work = tempfile::Builder::new().prefix("qlans").tempdir().unwrap();
    let mut inv_hosts = serde_json::Map::new();
    for h in &hosts {
        inv_hosts.insert(
            h.name.to_string(),
            json!({"ansible_connection": "local", "qlive_socket": h.rig.socket}),
        );
    }
    let inventory = work.path().join("hosts.yml");
    std::fs::write(
        &inventory,
        json!({"all": {
            "vars": {
                "ansible_python_interpreter": "{{ ansible_playbook_python }}",
                "qlive_bin": qlive_bin(),
                // the test must not upgrade this machine's packages
                "qlive_upgrade_packages": false,
            },
            "children": {"hypervisors": {"hosts": inv_hosts}},
        }})
        .to_string(),
    )
    .unwrap();
    let example = repo_root().join("ansible/examples/rolling-upgrade.yml");
    let text = std::fs::read_to_string(&example).unwrap();
    assert!(text.contains("max_fail_percentage: 50\n"), "{text}");

    // ---- the modules alone, ad hoc: facts, and upgrade in check mode (--dry-run)
    // (ad hoc there is no role: the binary and the host's socket are module options)
    let exe = format!(
        "executable={} socket={{{{ qlive_socket }}}}",
        qlive_bin().display()
    );
    let (code, facts) = adhoc(
        work.path(),
        "facts",
        &inventory,
        &["-m", "qlive.fleet.facts", "-a", &exe],
    );
    assert_eq!(code, Some(0));
    for h in &hosts {
        let q = &facts[h.name]["ansible_facts"]["qlive"];
        assert_eq!(q["socket"], json!(h.rig.socket), "{q}");
        assert_eq!(q["stale"], json!(h.guests), "{q}");
        assert_eq!(q["running"], json!(h.guests), "{q}");
        assert_eq!(q["unknown"], json!([]), "{q}");
        for (d, g) in q["domains"].as_array().unwrap().iter().zip(&h.guests) {
            assert_eq!(d["name"], json!(g), "{d}");
            assert_eq!(d["state"], "running", "{d}");
            assert_eq!(d["stale"], true, "{d}");
            assert_eq!(d["reasons"][0]["kind"], "exe-replaced", "{d}");
            assert!(
                d["qemu_version"].as_str().unwrap().starts_with("7.2."),
                "{d}"
            );
            assert_eq!(
                q["qemu_versions"][d["qemu_version"].as_str().unwrap()],
                json!(h.guests)
            );
        }
    }
    let (code, dry) = adhoc(
        work.path(),
        "check",
        &inventory,
        &[
            "-m",
            "qlive.fleet.upgrade",
            "-a",
            &format!("{exe} parallel=2"),
            "--check",
        ],
    );
    assert_eq!(
        code,
        Some(0),
        "every preflight passes (hooks do not run in one)"
    );
    for (i, h) in hosts.iter().enumerate() {
        let d = &dry[h.name];
        assert_eq!(d["changed"], true, "{d}");
        assert_eq!(d["moved"], json!(h.guests), "{d}");
        assert_eq!(d["summary"]["dry_run"], true, "{d}");
        assert_eq!(d["summary"]["parallel"], 2, "{d}");
        assert_eq!(h.pids(), before[i], "{}: check mode moved nothing", h.name);
    }

    // ---- run 1: hv2 fails, half of its batch: not MORE than 50 %, the rollout goes on
    let r = playbook(work.path(), "1", &inventory, &example);
    assert_eq!(
        r.code,
        Some(2),
        "ansible-playbook exits 2 when a host failed"
    );
    assert_eq!(
        r.batches,
        vec![names(&["hv1"]), names(&["hv2", "hv3"]), names(&["hv4"])],
        "canary first, then 50 % (2 of 4) at a time"
    );
    for h in ["hv1", "hv3", "hv4"] {
        let rc = &r.recap[h];
        assert_eq!((rc.failed, rc.unreachable), (0, 0), "{h}: {rc:?}");
        assert!(rc.changed >= 1, "{h} moved its guests: {rc:?}");
    }
    assert_eq!(r.recap["hv2"].failed, 1, "{:?}", r.recap["hv2"]);
    let fail = &r.last["hv2"];
    // (the tree callback keeps the module result without its `failed` flag)
    assert_eq!(fail["rc"], 1, "{fail}");
    assert_eq!(fail["failed_domains"], json!(["hv2a", "hv2b"]), "{fail}");
    assert_eq!(fail["summary"]["failed"], 2, "{fail}");
    let msg = fail["msg"].as_str().unwrap();
    assert!(
        msg.contains("2 of 2 domain(s) could not be moved and keep running on their old QEMU")
            && msg.contains("hv2a (")
            && msg.contains("hv2b (")
            && msg.contains("no port on this host for hv2a"),
        "{msg}"
    );
    assert!(
        r.stdout.contains("no port on this host for hv2b"),
        "the report says why"
    );
    for (i, h) in hosts.iter().enumerate() {
        let now = h.pids();
        let stale = h.stale();
        for g in &h.guests {
            if h.name == "hv2" {
                assert_eq!(now[g], before[i][g], "{g} still on its old QEMU");
                assert!(stale[g], "{g} still stale");
            } else {
                assert_ne!(now[g], before[i][g], "{g} moved");
                assert!(!stale[g], "{g} current");
            }
        }
    }
    let after1: Vec<BTreeMap<String, Value>> = hosts.iter().map(Host::pids).collect();

    // ---- run 2: the same with max_fail_percentage 49: hv2's failure is now more
    // than allowed, the play stops after the batch and hv4 is never reached
    let strict = work.path().join("strict.yml");
    std::fs::write(
        &strict,
        text.replace("max_fail_percentage: 50\n", "max_fail_percentage: 49\n"),
    )
    .unwrap();
    let r2 = playbook(work.path(), "2", &inventory, &strict);
    assert_eq!(r2.code, Some(2));
    assert_eq!(
        r2.batches,
        vec![names(&["hv1"]), names(&["hv2", "hv3"])],
        "the rollout stops after the batch"
    );
    assert!(!r2.recap.contains_key("hv4"), "{:?}", r2.recap);
    assert!(r2.stdout.contains("NO MORE HOSTS LEFT"));
    assert_eq!(r2.recap["hv2"].failed, 1);
    assert_eq!(r2.recap["hv1"].changed, 0, "nothing left to move on hv1");
    for (i, h) in hosts.iter().enumerate() {
        assert_eq!(h.pids(), after1[i], "{}: nothing moved", h.name);
    }

    // ---- run 3: the cause is fixed; the rerun moves hv2's guests, touches no other
    std::fs::remove_file(hv2.rig.hooks.join("50-port")).unwrap();
    let r3 = playbook(work.path(), "3", &inventory, &example);
    assert_eq!(r3.code, Some(0), "all hosts succeed");
    assert_eq!(
        r3.batches,
        vec![names(&["hv1"]), names(&["hv2", "hv3"]), names(&["hv4"])]
    );
    for h in ["hv1", "hv2", "hv3", "hv4"] {
        let rc = &r3.recap[h];
        assert_eq!((rc.failed, rc.unreachable), (0, 0), "{h}: {rc:?}");
        assert_eq!(rc.changed, u32::from(h == "hv2"), "{h}: {rc:?}");
    }
    let report = r3.last["hv2"]["msg"].as_str().unwrap_or_default();
    assert!(
        report.starts_with("moved 2 guest(s): hv2a, hv2b; QEMU versions running: "),
        "{report}"
    );
    for (i, h) in hosts.iter().enumerate() {
        let now = h.pids();
        assert!(h.stale().values().all(|&s| !s), "{}: nothing stale", h.name);
        for g in &h.guests {
            if h.name == "hv2" {
                assert_ne!(now[g], after1[i][g], "{g} moved");
            } else {
                assert_eq!(now[g], after1[i][g], "{g} untouched by the rerun");
            }
            let hb = h.rig.heartbeat(g);
            h.rig
                .wait_heartbeat_past(g, hb.last + 100, Duration::from_secs(60))
                .assert_intact(g);
        }
        assert_eq!(
            h.rig.qemu_pids().len(),
            h.guests.len(),
            "one QEMU per guest"
        );
    }
    eprintln!(
        "playbook runs: {:.1} s, {:.1} s, {:.1} s; whole test {:.1} s",
        r.secs,
        r2.secs,
        r3.secs,
        t_start.elapsed().as_secs_f64()
    );
    for h in &hosts {
        for g in &h.guests {
            h.rig.ok(&["destroy", g]);
        }
    }
}
