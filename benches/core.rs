//! Core benchmark (`make bench` / `cargo bench --bench core`): prints
//! - the time from `qlive start` to the guest's first heartbeat on the
//!   console (1 GiB test guest, TCG), over several starts;
//! - the agent's resident memory at idle with 3 running 1 GiB domains.
//!
//! Real agent, real QEMU, the project's test guest: the same rig as the
//! integration tests.

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use serde_json::json;
use std::time::{Duration, Instant};

fn rss_kib(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn first_heartbeat_after_start(rig: &Rig, name: &str) -> (Duration, Duration) {
    let log = rig.console_log(name);
    let t0 = Instant::now();
    rig.ok(&["start", name]);
    let started = t0.elapsed();
    loop {
        let b = std::fs::read(&log).unwrap_or_default();
        if String::from_utf8_lossy(&b).contains("\nHB ") {
            return (started, t0.elapsed());
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "no heartbeat");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn stats(mut v: Vec<f64>) -> String {
    v.sort_by(|a, b| a.total_cmp(b));
    format!(
        "min {:.0}  median {:.0}  max {:.0}",
        v[0],
        v[v.len() / 2],
        v[v.len() - 1]
    )
}

fn main() {
    let runs: usize = std::env::var("QLIVE_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let rig = Rig::new();
    rig.define_guest("b0", 1024, json!({}));
    let (mut cmd_ms, mut hb_ms) = (vec![], vec![]);
    for _ in 0..runs {
        let _ = std::fs::remove_file(rig.console_log("b0"));
        let (cmd, hb) = first_heartbeat_after_start(&rig, "b0");
        cmd_ms.push(cmd.as_secs_f64() * 1e3);
        hb_ms.push(hb.as_secs_f64() * 1e3);
        rig.ok(&["destroy", "b0"]);
    }
    println!("qlive core benchmark (1 GiB test guest, TCG, {runs} starts)");
    println!(
        "  `qlive start` returns after (ms):       {}",
        stats(cmd_ms)
    );
    println!("  `qlive start` -> first heartbeat (ms):  {}", stats(hb_ms));

    let pid = rig.agent_pid().expect("agent pid");
    let (idle0, _) = rss_kib(pid);
    for n in ["b0", "b1", "b2"] {
        if n != "b0" {
            rig.define_guest(n, 1024, json!({}));
        }
        rig.ok(&["start", n]);
    }
    for n in ["b0", "b1", "b2"] {
        rig.wait_heartbeat_past(n, 100, Duration::from_secs(120));
    }
    std::thread::sleep(Duration::from_secs(3));
    let (rss, hwm) = rss_kib(pid);
    println!("  agent RSS, 0 domains running:            {idle0} KiB");
    println!("  agent RSS, 3 x 1 GiB domains running:    {rss} KiB (peak {hwm} KiB)");
    println!("  (guest RAM lives in memfds shared with QEMU; the agent does not map it)");
    for n in ["b0", "b1", "b2"] {
        rig.ok(&["destroy", n]);
    }
}
