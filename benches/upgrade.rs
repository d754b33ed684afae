//! Upgrade-run benchmark (`make bench-upgrade` / `cargo bench --bench
//! upgrade`): N running guests (default 8 x 1 GiB, the test guest, TCG) on
//! a QEMU binary that is then replaced on disk as dpkg does; prints the wall
//! time of `qlive upgrade --stale` with --parallel 1 and with --parallel 2,
//! and per-domain migration times, on the same guests in one run.
//!
//! Env: QLIVE_BENCH_GUESTS (default 8), QLIVE_BENCH_MIB (default 1024).

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

fn replace_like_dpkg(path: &Path) {
    let tmp = path.with_extension("dpkg-new");
    std::fs::copy(SYSTEM_QEMU, &tmp).expect("copy");
    std::fs::rename(&tmp, path).expect("rename");
}

fn run(rig: &Rig, parallel: usize, n: usize) -> (f64, Vec<f64>) {
    let t0 = Instant::now();
    let o = rig.qlive(&[
        "upgrade",
        "--stale",
        "--parallel",
        &parallel.to_string(),
        "--json",
    ]);
    let wall = t0.elapsed().as_secs_f64() * 1e3;
    assert!(
        o.status.success(),
        "upgrade failed: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.last().expect("summary")["summary"]["succeeded"], n);
    let per: Vec<f64> = lines[..n]
        .iter()
        .map(|l| l["total_ms"].as_f64().unwrap_or(f64::NAN))
        .collect();
    (wall, per)
}

fn main() {
    let n: usize = std::env::var("QLIVE_BENCH_GUESTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let mib: u64 = std::env::var("QLIVE_BENCH_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1024);
    let rig = Rig::new_in(Path::new("/dev/shm"));
    let prefix = rig.dir.path().join("prefix");
    std::fs::create_dir_all(prefix.join("bin")).expect("prefix");
    std::os::unix::fs::symlink("/usr/share", prefix.join("share")).expect("share");
    std::os::unix::fs::symlink("/usr/lib", prefix.join("lib")).expect("lib");
    let emu = prefix.join("bin/qemu");
    std::fs::copy(SYSTEM_QEMU, &emu).expect("copy qemu");
    let names: Vec<String> = (0..n).map(|i| format!("g{i}")).collect();
    for name in &names {
        rig.define_guest(
            name,
            mib,
            json!({"emulator": emu, "cmdline": "console=ttyS0 quiet panic=-1 no_timer_check qlive.pattern_mib=16"}),
        );
        rig.ok(&["start", name]);
    }
    for name in &names {
        rig.wait_heartbeat_past(name, 100, Duration::from_secs(300));
    }
    eprintln!("[bench] {n} guests running");
    let mut rows = vec![];
    for parallel in [1usize, 2] {
        replace_like_dpkg(&emu);
        let (wall, per) = run(&rig, parallel, n);
        rows.push((parallel, wall, per));
    }
    for name in &names {
        let hb = rig.heartbeat(name);
        rig.wait_heartbeat_past(name, hb.last + 100, Duration::from_secs(60))
            .assert_intact(name);
    }
    println!("qlive upgrade benchmark: {n} running {} GiB guests (TCG), QEMU binary replaced as dpkg does,", mib / 1024);
    println!("then `qlive upgrade --stale --parallel P`; wall time of the whole run, and per-domain migration time");
    println!(
        "  {:<10} {:>10} {:>14} {:>14}",
        "parallel", "wall ms", "per-domain p50", "per-domain max"
    );
    for (p, wall, per) in &rows {
        let mut s = per.clone();
        s.sort_by(|a, b| a.total_cmp(b));
        println!(
            "  {:<10} {:>10.0} {:>14.0} {:>14.0}",
            p,
            wall,
            s[s.len() / 2],
            s[s.len() - 1]
        );
    }
    for name in &names {
        rig.ok(&["destroy", name]);
    }
}
