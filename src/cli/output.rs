//! Human output of client subcommands (`--json` prints the agent's JSON).

use serde_json::Value;

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub fn json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

pub fn defined(v: &Value) {
    println!("defined {} (uuid {})", s(&v["name"]), s(&v["uuid"]));
}

pub fn started(v: &Value) {
    println!(
        "started {} (domid {}, pid {}, machine {}, accel {})",
        s(&v["name"]),
        s(&v["domid"]),
        s(&v["pid"]),
        s(&v["machine"]),
        s(&v["accel"])
    );
}

pub fn stopped(v: &Value) {
    if v["forced"].as_bool() == Some(true) {
        println!("{} forced off (did not power down in time)", s(&v["name"]));
    } else {
        println!("{} shut down", s(&v["name"]));
    }
}

pub fn done(what: &'static str) -> fn(&Value) {
    match what {
        "undefined" => |v| println!("undefined {}", s(&v["name"])),
        _ => |v| println!("destroyed {}", s(&v["name"])),
    }
}

pub fn list(v: &Value) {
    println!("{:<24} {:<10} {:>8} {:>8}", "NAME", "STATE", "DOMID", "PID");
    for d in v.as_array().into_iter().flatten() {
        println!(
            "{:<24} {:<10} {:>8} {:>8}",
            s(&d["name"]),
            s(&d["state"]),
            s(&d["domid"]),
            s(&d["pid"])
        );
    }
}

pub fn info(v: &Value) {
    for k in [
        "name",
        "uuid",
        "state",
        "reason",
        "domid",
        "pid",
        "emulator",
        "qemu_version",
        "machine",
        "accel",
        "vcpus",
        "memory_mib",
        "console_log",
        "job",
    ] {
        if !v[k].is_null() || k == "job" {
            println!("{:<14} {}", format!("{k}:"), s(&v[k]));
        }
    }
    if !v["user"].is_null() {
        println!("{:<14} {}", "qemu user:", s(&v["user"]));
    }
    for (i, d) in v["disks"].as_array().into_iter().flatten().enumerate() {
        println!(
            "{:<14} {} ({}, cache {}, aio {}{})",
            format!("disk{i}:"),
            s(&d["path"]),
            s(&d["format"]),
            d["cache"].as_str().unwrap_or("writeback"),
            d["aio"].as_str().unwrap_or("threads"),
            if d["readonly"] == true {
                ", read-only"
            } else {
                ""
            }
        );
    }
    for (i, n) in v["nics"].as_array().into_iter().flatten().enumerate() {
        println!(
            "{:<14} mac {} tap {}{}",
            format!("net{i}:"),
            s(&n["mac"]),
            s(&n["tap"]),
            n["bridge"]
                .as_str()
                .map(|b| format!(" bridge {b}"))
                .unwrap_or_default()
        );
    }
    if let Some(m) = v["selinux"]["mcs"].as_str() {
        let applied = if v["selinux"]["applied"] == true {
            "applied"
        } else {
            "recorded; SELinux not enabled here"
        };
        println!("{:<14} s0:{m} ({applied})", "selinux mcs:");
    }
    if let Some(p) = v["paths"].as_object() {
        for (k, p) in p {
            println!("{:<14} {}", format!("path.{k}:"), s(p));
        }
    }
}

pub fn json_line(v: &Value) {
    println!("{v}");
}

pub fn migrated(v: &Value) {
    println!(
        "migrated {}: domid {} (pid {}, QEMU {}) -> domid {} (pid {}, QEMU {})",
        s(&v["name"]),
        s(&v["from"]["domid"]),
        s(&v["from"]["pid"]),
        s(&v["from"]["qemu_version"]),
        s(&v["to"]["domid"]),
        s(&v["to"]["pid"]),
        s(&v["to"]["qemu_version"]),
    );
    println!(
        "  QEMU downtime {} ms, {} bytes sent, total {} ms",
        s(&v["qemu_downtime_ms"]),
        s(&v["bytes_sent"]),
        s(&v["total_ms"])
    );
}

pub fn job(v: &Value) {
    if v.is_null() {
        println!("no job");
        return;
    }
    println!(
        "{} phase {} elapsed {} ms bytes {} target domid {} pid {}",
        s(&v["kind"]),
        s(&v["phase"]),
        s(&v["elapsed_ms"]),
        s(&v["bytes"]),
        s(&v["target"]["domid"]),
        s(&v["target"]["pid"])
    );
}

pub fn aborted(v: &Value) {
    println!(
        "aborting the migration of {} (phase {})",
        s(&v["name"]),
        s(&v["phase"])
    );
}

pub fn stale(v: &Value) {
    let doms = v.as_array().cloned().unwrap_or_default();
    if doms.is_empty() {
        println!("no running domains");
    }
    for d in doms {
        if d["stale"] == true {
            println!(
                "{}: STALE (QEMU {}, pid {})",
                s(&d["name"]),
                s(&d["qemu_version"]),
                s(&d["pid"])
            );
            for r in d["reasons"].as_array().into_iter().flatten() {
                println!("    {}", s(&r["text"]));
            }
        } else if !d["error"].is_null() {
            println!("{}: unknown ({})", s(&d["name"]), s(&d["error"]));
        } else {
            println!(
                "{}: current (QEMU {}, pid {})",
                s(&d["name"]),
                s(&d["qemu_version"]),
                s(&d["pid"])
            );
        }
    }
}
