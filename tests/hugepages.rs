//! Guest RAM on huge pages (`"hugepages": "2M"`): a hugetlb memfd the
//! agent owns, mapped by every instance. The test reserves 2 MiB pages
//! with `vm.nr_hugepages` and gives them back (also when it fails), boots
//! a guest on them, migrates it 7.2 -> 10.0 -> 10.0 across an agent
//! restart, and checks the pool after each step: the guest holds exactly
//! its pages, a migration takes none of its own, and a destroy gives them
//! all back. A start the pool cannot serve is refused, naming the numbers.

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
    println!("{}", figures.join("\n"));

    for name in ["huge", "plain"] {
        rig.ok(&["destroy", name]);
    }
    assert_eq!(pages_taken(), taken0, "every page back in the pool");
}
