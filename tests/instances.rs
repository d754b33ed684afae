//! Two QEMU instances of one domain side by side, the second waiting for an
//! incoming migration: every path, socket and file is its own, and both map
//! the one guest RAM memfd. Library-level, with real QEMU.

mod common;

use common::*;
use qlive::domain::Definition;
use qlive::instance::cmdline::{EffectiveAccel, StartMode};
use qlive::instance::memory::GuestRam;
use qlive::instance::paths::InstancePaths;
use qlive::instance::{spawn, SpawnSpec};
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_of_one_domain_do_not_clash() {
    qlive::instance::reserve_inherited_fd_numbers().expect("reserve fd numbers");
    let dir = tempfile::Builder::new()
        .prefix("ql")
        .tempdir_in("/tmp")
        .unwrap();
    let g = guest_image();
    let def = Definition::from_value(&serde_json::json!({
        "name": "twin", "emulator": SYSTEM_QEMU, "accel": "tcg", "memory_mib": 128,
        "uuid": uuid::Uuid::new_v4(),
        "kernel": g.kernel, "initrd": g.initrd, "cmdline": "console=ttyS0 quiet",
    }))
    .unwrap();
    let run = dir.path().join("run");
    let log = dir.path().join("console.log");
    let ram = Arc::new(GuestRam::create("twin", def.memory_bytes(), None).unwrap());
    let spec = |domid, mode| SpawnSpec {
        def: &def,
        domid,
        machine: "pc-q35-7.2",
        accel: EffectiveAccel::Tcg,
        paths: InstancePaths::new(&run, "twin", domid),
        console_log: &log,
        mode,
        ram: ram.clone(),
        taps: Default::default(),
        tap_set: 0,
        endpoints: Default::default(),
        labels: None,
        run_as: None,
        data_dirs: &[],
        nvram: None,
        inherit_firmware: None,
        ram_block: None,
    };
    // Kills both QEMUs even if an assertion below panics.
    struct Guard(Vec<i32>);
    impl Drop for Guard {
        fn drop(&mut self) {
            for pid in &self.0 {
                // SAFETY: kill(2) on QEMUs this test started.
                unsafe { libc::kill(*pid, libc::SIGKILL) };
            }
        }
    }
    let mut guard = Guard(vec![]);
    let a = spawn(spec(1, StartMode::Boot)).await.unwrap();
    guard.0.push(a.pid());
    let b = spawn(spec(2, StartMode::Incoming)).await.unwrap();
    guard.0.push(b.pid());
    let check = async {
        let (pa, pb) = (&a.record.paths, &b.record.paths);
        let all_a = [&pa.dir, &pa.qmp, &pa.pid, &pa.log];
        let all_b = [&pb.dir, &pb.qmp, &pb.pid, &pb.log];
        for (x, y) in all_a.iter().zip(all_b.iter()) {
            assert_ne!(x, y);
            assert!(
                x.exists() && y.exists(),
                "{} / {}",
                x.display(),
                y.display()
            );
        }
        assert_ne!(a.pid(), b.pid());
        // both QMP sockets answer, each for its own process
        let (_, sa) = a.qmp.status().await.unwrap();
        let (_, sb) = b.qmp.status().await.unwrap();
        assert_eq!(sa, "prelaunch");
        assert_eq!(sb, "inmigrate");
        // both map the same memfd (same inode), held at fd 3
        let ino = |pid: i32| {
            std::fs::metadata(format!("/proc/{pid}/fd/3"))
                .unwrap()
                .ino()
        };
        assert_eq!(ino(a.pid()), ram.inode());
        assert_eq!(ino(b.pid()), ram.inode());
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", b.pid())).unwrap();
        assert!(
            maps.contains("memfd:qlive-ram:twin"),
            "destination maps guest RAM"
        );
    };
    let r = tokio::time::timeout(Duration::from_secs(60), check).await;
    a.terminate(Duration::from_secs(5)).await.unwrap();
    b.terminate(Duration::from_secs(5)).await.unwrap();
    r.unwrap();
    assert!(!a.record.paths.dir.exists() && !b.record.paths.dir.exists());
}
