//! Migration benchmark (`make bench-migration`, or `cargo bench --bench
//! migration`). For each guest size (default 1 GiB and 8 GiB) it runs, in
//! one process on this host:
//!
//! (a) `qlive migrate` through a real agent (run dir on tmpfs, as /run is);
//! (b) the floor: the same migration driven directly over QMP by this
//!     benchmark (same memfd + x-ignore-shared, no agent, no persistence);
//! (c) the conventional path: a full-copy migration with private guest RAM
//!     and no x-ignore-shared.
//!
//! (d) `qlive migrate` of the same guest with its RAM on 2 MiB huge pages
//!     (`"hugepages": "2M"`; the benchmark reserves the pages with
//!     vm.nr_hugepages and gives them back), with the pages it holds;
//!
//! and prints, per variant, the guest-visible pause (largest gap between
//! heartbeat arrivals on the console log, p50/p99), QEMU's reported
//! downtime, total time and bytes sent. The pause is measured the same way
//! for all three: inotify on the console log QEMU appends to.
//!
//! Env: QLIVE_BENCH_RUNS (default 20), QLIVE_BENCH_SIZES (MiB, default
//! "1024,8192"), QLIVE_BENCH_VARIANTS (default "qlive,floor,full,huge").

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/common/hbwatch.rs"]
mod hbwatch;

use common::*;
use hbwatch::HbWatch;
use qlive::domain::Definition;
use qlive::instance::cmdline::{self, EffectiveAccel, StartMode};
use qlive::instance::memory::GuestRam;
use qlive::instance::paths::InstancePaths;
use qlive::instance::{self as inst, Instance, SpawnSpec};
use qlive::migration::params::{self, Memory, Side};
use qlive::qmp::Qmp;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PATTERN_MIB: u64 = 64;

#[derive(Default)]
struct Samples {
    pause_ms: Vec<f64>,
    downtime_ms: Vec<f64>,
    total_ms: Vec<f64>,
    bytes: Vec<f64>,
    cont_us: Vec<f64>,
    /// Huge pages the guest held (variant d).
    pages: Option<u64>,
}

fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let i = ((p / 100.0) * (s.len() - 1) as f64).round() as usize;
    s[i]
}

fn cmdline() -> String {
    format!("console=ttyS0 quiet panic=-1 no_timer_check qlive.pattern_mib={PATTERN_MIB}")
}

fn wait_for(log: &Path, needle: &str, timeout: Duration) {
    let t0 = Instant::now();
    while !String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).contains(needle) {
        assert!(
            t0.elapsed() < timeout,
            "{needle} never appeared in {}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn check_log(log: &Path, what: &str) {
    let hb = Heartbeat::parse(&std::fs::read(log).unwrap_or_default());
    hb.assert_intact(what);
}

// ---------------------------------------------------------------- (a) qlive

fn bench_qlive(mib: u64, runs: usize, huge: bool) -> Samples {
    use common::hugepages::{pages_taken, Reserved};
    let rig = Rig::new_in(Path::new("/dev/shm"));
    let name = "bench";
    let _pool = huge.then(|| Reserved::pages(mib / 2));
    let taken0 = pages_taken();
    let mut def = json!({"cmdline": cmdline()});
    if huge {
        def["hugepages"] = "2M".into();
    }
    rig.define_guest(name, mib, def);
    rig.ok(&["start", name]);
    let pages = huge.then(|| pages_taken() - taken0);
    let log = rig.console_log(name);
    wait_for(&log, "PATTERN READY", Duration::from_secs(120));
    let watch = HbWatch::start(&log).expect("watch");
    assert!(watch.wait_past(0, Duration::from_secs(10)));
    let mut s = Samples::default();
    for _ in 0..runs {
        std::thread::sleep(Duration::from_millis(300));
        let t0 = Instant::now();
        let r = rig.migrate(name, &[]);
        let t1 = Instant::now();
        let seq = watch.last_seq().unwrap_or(0);
        assert!(
            watch.wait_past(seq, Duration::from_secs(10)),
            "guest resumed"
        );
        let gap = watch
            .max_gap(t0, t1 + Duration::from_millis(50))
            .expect("gap");
        s.pause_ms.push(gap.ms);
        s.downtime_ms
            .push(r["qemu_downtime_ms"].as_f64().unwrap_or(f64::NAN));
        s.total_ms.push(r["total_ms"].as_f64().unwrap_or(f64::NAN));
        s.bytes.push(r["bytes_sent"].as_f64().unwrap_or(f64::NAN));
        s.cont_us
            .push(r["completion_to_cont_us"].as_f64().unwrap_or(f64::NAN));
    }
    check_log(&log, "qlive runs");
    if let Some(p) = pages {
        assert_eq!(
            pages_taken() - taken0,
            p,
            "the guest's pages after the runs"
        );
        s.pages = Some(p);
    }
    rig.ok(&["destroy", name]);
    s
}

// ------------------------------------------------- (b) floor and (c) full copy

struct Direct {
    dir: tempfile::TempDir,
    def: Definition,
    log: PathBuf,
    next_domid: u64,
    pids: Vec<i32>,
}

impl Drop for Direct {
    fn drop(&mut self) {
        for p in &self.pids {
            // SAFETY: kill(2) on QEMUs this benchmark started.
            unsafe { libc::kill(*p, libc::SIGKILL) };
        }
    }
}

impl Direct {
    fn new(mib: u64) -> Direct {
        let dir = tempfile::Builder::new()
            .prefix("qb")
            .tempdir_in("/dev/shm")
            .expect("tempdir");
        let g = guest_image();
        let def = Definition::from_value(&json!({
            "name": "bench", "emulator": SYSTEM_QEMU, "accel": "tcg", "memory_mib": mib,
            "uuid": uuid::Uuid::new_v4(), "machine": "pc-q35-7.2",
            "kernel": g.kernel, "initrd": g.initrd, "cmdline": cmdline(),
        }))
        .expect("definition");
        let log = dir.path().join("console.log");
        std::fs::write(&log, b"").expect("log");
        Direct {
            dir,
            def,
            log,
            next_domid: 1,
            pids: vec![],
        }
    }

    fn paths(&mut self) -> (u64, InstancePaths) {
        let d = self.next_domid;
        self.next_domid += 1;
        (
            d,
            InstancePaths::new(&self.dir.path().join("run"), "bench", d),
        )
    }

    /// Shared-memory instance, exactly as qlive spawns it.
    async fn spawn_shared(&mut self, ram: &Arc<GuestRam>, mode: StartMode) -> Arc<Instance> {
        let (domid, paths) = self.paths();
        let i = inst::spawn(SpawnSpec {
            def: &self.def,
            domid,
            machine: "pc-q35-7.2",
            accel: EffectiveAccel::Tcg,
            paths,
            console_log: &self.log,
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
        })
        .await
        .expect("spawn");
        self.pids.push(i.pid());
        Arc::new(i)
    }

    /// Private-RAM instance: the conventional, full-copy configuration.
    async fn spawn_private(&mut self, mode: StartMode) -> (Arc<Qmp>, i32) {
        let (_, paths) = self.paths();
        std::fs::create_dir_all(&paths.dir).expect("dir");
        let args = cmdline::build(
            &self.def,
            "pc-q35-7.2",
            EffectiveAccel::Tcg,
            &paths,
            mode,
            cmdline::RAM_ID,
        );
        let mut raw: Vec<String> = args
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        // No agent here to pass the console fd: log to the file by path.
        if let Some(i) = raw.iter().position(|a| a == "-add-fd") {
            raw.drain(i..i + 2);
        }
        let log = self.log.display().to_string();
        let args: Vec<String> = raw
            .into_iter()
            .map(|a| {
                if a.starts_with(&format!("file,id={}", cmdline::CONSOLE_CHARDEV)) {
                    return format!("file,id={},path={log},append=on", cmdline::CONSOLE_CHARDEV);
                }
                a
            })
            .map(|a| {
                if a.starts_with("memory-backend-file,") {
                    format!(
                        "memory-backend-ram,id={},size={}M",
                        cmdline::RAM_ID,
                        self.def.memory_mib
                    )
                } else {
                    a
                }
            })
            .collect();
        let st = std::process::Command::new(SYSTEM_QEMU)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .status()
            .expect("spawn qemu");
        assert!(st.success(), "private-RAM QEMU failed to start");
        let pid = inst::read_pidfile(&paths.pid).expect("pidfile");
        self.pids.push(pid);
        (Arc::new(Qmp::connect(&paths.qmp).await.expect("qmp")), pid)
    }
}

async fn wait_migration(q: &Qmp, ev: &mut tokio::sync::broadcast::Receiver<qlive::qmp::QmpEvent>) {
    let _ = q;
    loop {
        let e = tokio::time::timeout(Duration::from_secs(600), ev.recv())
            .await
            .expect("MIGRATION event in time")
            .expect("event stream");
        if e.name == "MIGRATION" {
            match e.data["status"].as_str() {
                Some("completed") => return,
                Some(s @ ("failed" | "cancelled")) => panic!("migration {s}"),
                _ => {}
            }
        }
    }
}

/// One migration driven directly over QMP; returns (t_migrate, t_cont,
/// query-migrate of the source).
async fn direct_migrate(
    src: &Qmp,
    dst: &Qmp,
    migrate_sock: &Path,
    shared: bool,
) -> (Instant, Instant, Value) {
    if shared {
        params::apply(src, Side::Source, Memory::Shared)
            .await
            .expect("caps");
        params::apply(dst, Side::Destination, Memory::Shared)
            .await
            .expect("caps");
    } else {
        for q in [src, dst] {
            q.execute_raw(
                "migrate-set-capabilities",
                Some(json!({"capabilities": [{"capability": "events", "state": true}]})),
            )
            .await
            .expect("caps");
        }
    }
    let mut dst_ev = dst.subscribe();
    let mut src_ev = src.subscribe();
    let uri = format!("unix:{}", migrate_sock.display());
    dst.execute_raw("migrate-incoming", Some(json!({ "uri": uri })))
        .await
        .expect("migrate-incoming");
    let t0 = Instant::now();
    src.execute_raw("migrate", Some(json!({ "uri": uri })))
        .await
        .expect("migrate");
    wait_migration(src, &mut src_ev).await;
    let t_completed = Instant::now();
    wait_migration(dst, &mut dst_ev).await;
    dst.cont().await.expect("cont");
    let t_cont = Instant::now();
    let mut stats = json!({
        "completion_to_cont_us": t_cont.duration_since(t_completed).as_micros() as u64
    });
    let q = src
        .execute_raw("query-migrate", None)
        .await
        .unwrap_or(Value::Null);
    stats["downtime"] = q["downtime"].clone();
    stats["ram"] = q["ram"].clone();
    src.quit().await.expect("quit");
    (t0, t_cont, stats)
}

fn record(s: &mut Samples, watch: &HbWatch, t0: Instant, t_cont: Instant, stats: &Value) {
    let seq = watch.last_seq().unwrap_or(0);
    assert!(
        watch.wait_past(seq, Duration::from_secs(10)),
        "guest resumed"
    );
    let gap = watch
        .max_gap(t0, t_cont + Duration::from_millis(50))
        .expect("gap");
    s.pause_ms.push(gap.ms);
    s.downtime_ms
        .push(stats["downtime"].as_f64().unwrap_or(f64::NAN));
    s.total_ms
        .push(t_cont.duration_since(t0).as_secs_f64() * 1e3);
    s.bytes
        .push(stats["ram"]["transferred"].as_f64().unwrap_or(f64::NAN));
    s.cont_us
        .push(stats["completion_to_cont_us"].as_f64().unwrap_or(f64::NAN));
}

async fn bench_floor(mib: u64, runs: usize) -> Samples {
    let mut d = Direct::new(mib);
    let ram = Arc::new(GuestRam::create("bench", mib << 20, None).expect("memfd"));
    let mut src = d.spawn_shared(&ram, StartMode::Boot).await;
    src.qmp.cont().await.expect("cont");
    let log = d.log.clone();
    tokio::task::spawn_blocking(move || wait_for(&log, "PATTERN READY", Duration::from_secs(120)))
        .await
        .expect("wait");
    let watch = HbWatch::start(&d.log).expect("watch");
    let mut s = Samples::default();
    for _ in 0..runs {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let dst = d.spawn_shared(&ram, StartMode::Incoming).await;
        let (t0, t_cont, stats) =
            direct_migrate(&src.qmp, &dst.qmp, &dst.record.paths.migrate, true).await;
        src.wait_exit().await;
        inst::cleanup_paths(&src.record.paths);
        let w = &watch;
        tokio::task::block_in_place(|| record(&mut s, w, t0, t_cont, &stats));
        src = dst;
    }
    check_log(&d.log, "floor runs");
    let _ = src.terminate(Duration::from_secs(5)).await;
    s
}

async fn bench_full(mib: u64, runs: usize) -> Samples {
    let mut d = Direct::new(mib);
    let (mut src, mut src_pid) = d.spawn_private(StartMode::Boot).await;
    src.cont().await.expect("cont");
    let log = d.log.clone();
    tokio::task::spawn_blocking(move || wait_for(&log, "PATTERN READY", Duration::from_secs(120)))
        .await
        .expect("wait");
    let watch = HbWatch::start(&d.log).expect("watch");
    let mut s = Samples::default();
    for _ in 0..runs {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let domid = d.next_domid;
        let (dst, dst_pid) = d.spawn_private(StartMode::Incoming).await;
        let sock = InstancePaths::new(&d.dir.path().join("run"), "bench", domid).migrate;
        let (t0, t_cont, stats) = direct_migrate(&src, &dst, &sock, false).await;
        if let Ok(p) = qlive::instance::process::Pidfd::open(src_pid) {
            let _ = p.wait_exit().await;
        }
        let w = &watch;
        tokio::task::block_in_place(|| record(&mut s, w, t0, t_cont, &stats));
        src = dst;
        src_pid = dst_pid;
    }
    check_log(&d.log, "full-copy runs");
    let _ = src.quit().await;
    s
}

fn row(label: &str, s: &Samples) {
    println!(
        "  {label:<22} {:>8.1} {:>8.1} {:>10.1} {:>10.1} {:>12.0}",
        pct(&s.pause_ms, 50.0),
        pct(&s.pause_ms, 99.0),
        pct(&s.downtime_ms, 50.0),
        pct(&s.total_ms, 50.0),
        pct(&s.bytes, 50.0),
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let runs: usize = std::env::var("QLIVE_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let sizes: Vec<u64> = std::env::var("QLIVE_BENCH_SIZES")
        .unwrap_or_else(|_| "1024,8192".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let variants =
        std::env::var("QLIVE_BENCH_VARIANTS").unwrap_or_else(|_| "qlive,floor,full".into());
    let mut results: Vec<(u64, &str, Samples)> = vec![];
    for &mib in &sizes {
        for v in ["qlive", "floor", "full", "huge"] {
            if !variants.split(',').any(|x| x == v) {
                continue;
            }
            eprintln!("[bench] {mib} MiB guest: {v}, {runs} migrations");
            let s = match v {
                "qlive" => tokio::task::block_in_place(|| bench_qlive(mib, runs, false)),
                "huge" => tokio::task::block_in_place(|| bench_qlive(mib, runs, true)),
                "floor" => bench_floor(mib, runs).await,
                _ => bench_full(mib, runs).await,
            };
            results.push((mib, v, s));
        }
    }
    println!();
    println!(
        "qlive migration benchmark: {runs} migrations per row, TCG, same host, QEMU 7.2 -> 7.2"
    );
    println!("guest-visible pause = largest gap between heartbeat arrivals on the console log");
    println!(
        "  {:<22} {:>8} {:>8} {:>10} {:>10} {:>12}",
        "guest / variant", "pause50", "pause99", "downtime50", "total50", "bytes50"
    );
    println!(
        "  {:<22} {:>8} {:>8} {:>10} {:>10} {:>12}",
        "", "ms", "ms", "ms", "ms", "B"
    );
    for (mib, v, s) in &results {
        let label = match *v {
            "qlive" => "qlive migrate",
            "floor" => "direct QMP (floor)",
            "huge" => "qlive, 2M pages",
            _ => "full copy",
        };
        row(&format!("{} GiB {label}", mib / 1024), s);
    }
    println!();
    let get = |mib: u64, v: &str| {
        results
            .iter()
            .find(|r| r.0 == mib && r.1 == v)
            .map(|r| &r.2)
    };
    for &mib in &sizes {
        if let (Some(q), Some(f)) = (get(mib, "qlive"), get(mib, "floor")) {
            let ratio = pct(&q.pause_ms, 50.0) / pct(&f.pause_ms, 50.0);
            println!(
                "  {} GiB: qlive p50 pause / floor p50 pause = {ratio:.2} (target <= 1.15): {}",
                mib / 1024,
                if ratio <= 1.15 { "met" } else { "NOT met" }
            );
        }
        // From the source's completion event to cont, the destination
        // finishes loading device state and QEMU resumes: the floor pays
        // that too. What qlive adds is the difference.
        if let (Some(q), Some(f)) = (get(mib, "qlive"), get(mib, "floor")) {
            let (q50, q99) = (pct(&q.cont_us, 50.0) / 1e3, pct(&q.cont_us, 99.0) / 1e3);
            let (f50, f99) = (pct(&f.cont_us, 50.0) / 1e3, pct(&f.cont_us, 99.0) / 1e3);
            let (add50, add99) = (q50 - f50, q99 - f99);
            println!(
                "  {} GiB: completion event -> cont: qlive p50 {q50:.2} p99 {q99:.2} ms, floor p50 {f50:.2} p99 {f99:.2} ms; qlive adds p50 {add50:.2} ms, p99 {add99:.2} ms (target < 5 ms): {}",
                mib / 1024,
                if add50 < 5.0 && add99 < 5.0 { "met" } else { "NOT met" }
            );
        }
        if let (Some(q), Some(h)) = (get(mib, "qlive"), get(mib, "huge")) {
            println!(
                "  {} GiB: 2M pages: the guest held {} pages; p50 pause {:.1} ms vs {:.1} ms on a plain memfd ({:.2}x), p99 {:.1} vs {:.1} ms",
                mib / 1024,
                h.pages.unwrap_or(0),
                pct(&h.pause_ms, 50.0),
                pct(&q.pause_ms, 50.0),
                pct(&h.pause_ms, 50.0) / pct(&q.pause_ms, 50.0),
                pct(&h.pause_ms, 99.0),
                pct(&q.pause_ms, 99.0),
            );
        }
    }
    if let (Some(&small), Some(&large)) = (sizes.first(), sizes.last()) {
        if small != large {
            if let (Some(a), Some(b)) = (get(small, "qlive"), get(large, "qlive")) {
                let r = pct(&b.pause_ms, 50.0) / pct(&a.pause_ms, 50.0);
                println!(
                    "  qlive p50 pause {} GiB / {} GiB = {r:.2} (target within 10%): {}",
                    large / 1024,
                    small / 1024,
                    if (r - 1.0).abs() <= 0.10 {
                        "met"
                    } else {
                        "NOT met"
                    }
                );
            }
        }
    }
}
