//! `hbgap LOG -- CMD ARGS...`: follow a guest's console log, run CMD, and
//! print the largest gap between heartbeat arrivals while CMD ran (the pause
//! the guest showed the outside world). Used by `scripts/demo.sh`.

#[path = "../tests/common/hbwatch.rs"]
mod hbwatch;

use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(sep) = args.iter().position(|a| a == "--") else {
        eprintln!("usage: hbgap LOG -- CMD ARGS...");
        std::process::exit(2);
    };
    if sep != 2 || sep + 1 >= args.len() {
        eprintln!("usage: hbgap LOG -- CMD ARGS...");
        std::process::exit(2);
    }
    let watch = match hbwatch::HbWatch::start(std::path::Path::new(&args[1])) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("hbgap: {}: {e}", args[1]);
            std::process::exit(2);
        }
    };
    // a heartbeat before, so the gap has a left edge
    if !watch.wait_past(0, Duration::from_secs(10)) {
        eprintln!("hbgap: no heartbeat on {}", args[1]);
        std::process::exit(2);
    }
    let t0 = Instant::now();
    let status = std::process::Command::new(&args[sep + 1])
        .args(&args[sep + 2..])
        .status();
    let t1 = Instant::now();
    let seq = watch.last_seq().unwrap_or(0);
    let resumed = watch.wait_past(seq, Duration::from_secs(10));
    match (status, watch.max_gap(t0, t1 + Duration::from_millis(100))) {
        (Ok(s), Some(g)) if s.success() && resumed => {
            println!(
                "guest-visible pause: {:.1} ms (largest gap between heartbeats HB {} -> HB {})",
                g.ms, g.before, g.after
            );
        }
        (Ok(s), _) => {
            eprintln!("hbgap: command exited {s} (heartbeat resumed: {resumed})");
            std::process::exit(1);
        }
        (Err(e), _) => {
            eprintln!("hbgap: {}: {e}", args[sep + 1]);
            std::process::exit(2);
        }
    }
}
