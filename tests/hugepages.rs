//! Guest RAM on huge pages (`"hugepages": "2M"`): a hugetlb memfd the
//! agent owns, mapped by every instance. The test reserves 2 MiB pages
//! with `vm.nr_hugepages` and gives them back (also when it fails), boots
//! a guest on them, migrates it 7.2 -> 10.0 -> 10.0 across an agent
//! restart, and checks the pool after each step: the guest holds exactly
//! its pages, a migration takes none of its own, and a destroy gives them
//! all back. A start the pool cannot serve is refused, naming the numbers.
//! A running guest then moves onto huge pages and off them again by a
//! copy migration (`migrate --copy-memory --hugepages`).

mod common;

use common::hugepages::{pages_taken, Reserved};
use common::*;
use serde_json::{json, Value};
use std::time::Duration;

fn downtime(r: &Value) -> String {
    format!(
        "QEMU downtime {} ms, {} bytes sent, completion to cont {} us, total {} ms",
        r["qemu_downtime_ms"], r["bytes_sent"], r["completion_to_cont_us"], r["total_ms"]
    )
}

#[test]
fn guest_ram_on_2m_pages_crosses_migrations_and_restarts() {
    let mut rig = Rig::new();
    // 256 MiB of guest RAM is 128 pages; 8 spare, too few for a second guest.
    let _pool = Reserved::pages(136);
    let taken0 = pages_taken();
    rig.define_guest("huge", 256, json!({"hugepages": "2M"}));
    rig.define_guest("plain", 256, json!({}));
    rig.ok(&["start", "huge"]);
    rig.ok(&["start", "plain"]);
    assert_eq!(pages_taken() - taken0, 128, "the guest holds its 128 pages");
    let info = rig.info("huge");
    assert_eq!(info["hugepages"], "2M", "{info}");
    assert_eq!(rig.info("plain").get("hugepages"), None);
    rig.wait_heartbeat_past("huge", 100, Duration::from_secs(90));
    rig.wait_heartbeat_past("plain", 100, Duration::from_secs(90));

    // A second huge-page guest the pool cannot serve: refused before any
    // QEMU starts, and the running one is untouched.
    rig.define_guest("big", 256, json!({"hugepages": "2M"}));
    let qemus = rig.qemu_pids();
    let err = rig
        .try_call(&json!({"op": "start", "name": "big"}))
        .unwrap_err();
    assert_eq!(err["kind"], "insufficient-resources", "{err}");
    let msg = err["message"].as_str().unwrap_or("");
    assert!(
        msg.contains("needs 128 pages of 2M") && msg.contains("vm.nr_hugepages"),
        "{msg}"
    );
    assert_eq!(rig.qemu_pids(), qemus);
    assert_eq!(rig.info("big")["state"], "shut-off");
    // 1 GiB pages: this host's pool has none reserved.
    rig.define_guest("giant", 1024, json!({"hugepages": "1G"}));
    let err = rig
        .try_call(&json!({"op": "start", "name": "giant"}))
        .unwrap_err();
    assert_eq!(err["kind"], "insufficient-resources", "{err}");
    assert!(
        err["message"]
            .as_str()
            .unwrap_or("")
            .contains("pages of 1G"),
        "{err}"
    );

    // Migrations: the same pages, no second set. The plain guest moves in
    // the same run, for comparison.
    let new = new_qemu();
    let new = new.to_str().expect("utf8");
    let mut figures = Vec::new();
    for (step, args) in [
        ("7.2 -> 10.0", vec!["--emulator", new]),
        ("10.0 -> 10.0", vec![]),
    ] {
        for name in ["huge", "plain"] {
            let hb = rig.heartbeat(name).last;
            let r = rig.migrate(name, &args);
            assert_eq!(r["result"], "success", "{r}");
            figures.push(format!("{name} {step}: {}", downtime(&r)));
            assert_eq!(pages_taken() - taken0, 128, "after {name} {step}");
            rig.wait_heartbeat_past(name, hb + 200, Duration::from_secs(60))
                .assert_intact(name);
        }
    }

    // An agent restart re-adopts the guest on its hugetlb memfd; the next
    // migration still shares it.
    let pid = rig.info("huge")["pid"].clone();
    rig.restart_agent();
    assert_eq!(rig.info("huge")["pid"], pid);
    assert_eq!(rig.info("huge")["state"], "running");
    let hb = rig.heartbeat("huge").last;
    let r = rig.migrate("huge", &[]);
    figures.push(format!("huge after agent restart: {}", downtime(&r)));
    assert_eq!(pages_taken() - taken0, 128);
    rig.wait_heartbeat_past("huge", hb + 200, Duration::from_secs(60))
        .assert_intact("huge after restart");

    // A running guest changes its backing by a copy migration
    // (`--copy-memory --hugepages`): first refused (the pool holds 8 spare
    // pages, the guest needs 128) before anything moves...
    let plain_pid = rig.info("plain")["pid"].clone();
    let (code, err) = rig.fails(&["migrate", "plain", "--copy-memory", "--hugepages", "2M"]);
    assert_ne!(code, 0);
    assert!(err.contains("needs 128 pages of 2M"), "{err}");
    assert_eq!(rig.info("plain")["pid"], plain_pid, "the guest was moved");
    assert_eq!(pages_taken() - taken0, 128);
    let (code, err) = rig.fails(&["migrate", "plain", "--copy-memory", "--hugepages", "3M"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("hugepages \"3M\" is not one of 2M, 1G, none"),
        "{err}"
    );
    let (code, err) = rig.fails(&[
        "migrate",
        "plain",
        "--copy-memory",
        "--hugepages",
        "2M",
        "--postcopy",
        "always",
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("post-copy cannot move guest RAM onto pages of another size (4K to 2M)"),
        "{err}"
    );
    // ...then, with the huge guest's pages free again, onto 2 MiB pages,
    // through a shared-memory migration on them, and off them again.
    rig.ok(&["destroy", "huge"]);
    assert_eq!(pages_taken(), taken0);
    for (backing, args, pages) in [
        ("2M", vec!["--copy-memory", "--hugepages", "2M"], 128),
        ("2M", vec![], 128),
        ("none", vec!["--copy-memory", "--hugepages", "none"], 0),
    ] {
        let hb = rig.heartbeat("plain").last;
        let r = rig.migrate("plain", &args);
        figures.push(format!("plain onto {backing} {args:?}: {}", downtime(&r)));
        assert_eq!(r.get("postcopy").is_some(), !args.is_empty(), "{r}");
        assert_eq!(pages_taken() - taken0, pages, "plain {backing} {args:?}");
        let info = rig.info("plain");
        assert_eq!(
            info.get("hugepages")
                .and_then(Value::as_str)
                .unwrap_or("none"),
            backing,
            "{info}"
        );
        rig.wait_heartbeat_past("plain", hb + 200, Duration::from_secs(60))
            .assert_intact("plain after a copy onto another backing");
    }
    // The definition keeps the backing: a cold boot gets it too.
    let stored: Value = serde_json::from_str(
        &std::fs::read_to_string(rig.state.join("domains/plain.json")).expect("stored"),
    )
    .expect("json");
    assert_eq!(stored["definition"].get("hugepages"), None, "{stored}");
    println!("{}", figures.join("\n"));

    rig.ok(&["destroy", "plain"]);
    assert_eq!(pages_taken(), taken0, "every page back in the pool");
}
