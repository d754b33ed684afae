//! Output of client subcommands: human text, from each result decoded into
//! its `api` type, or with `--json` the agent's JSON as it arrived (so a
//! field a newer agent added is not lost).

use crate::api::client::{decode_result, ClientError};
use crate::api::{
    Aborting, Defined, Destroyed, DomainInfo, JobInfo, ListEntry, Migrated, Request, StaleEntry,
    Started, Stopped, Undefined,
};
use serde_json::Value;
use std::fmt::Display;

/// How a subcommand shows its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Show {
    /// The result, pretty-printed JSON.
    Json,
    /// The result, one line of JSON.
    JsonLine,
    Defined,
    Undefined,
    Started,
    Stopped,
    Destroyed,
    List,
    Info,
    Migrated,
    Job,
    Aborted,
    Stale,
    /// The guest agent's `return` value, pretty-printed JSON.
    GuestAgent,
}

impl Show {
    /// Print `result`, the answer to `req`. A result that does not decode
    /// into its type is [`ClientError::BadAnswer`] (nothing printed).
    pub fn print(self, req: &Request, result: Value) -> Result<(), ClientError> {
        print!("{}", self.render(req, result)?);
        Ok(())
    }

    /// What [`print`](Self::print) prints.
    pub fn render(self, req: &Request, result: Value) -> Result<String, ClientError> {
        Ok(match self {
            Show::Json => {
                let pretty = serde_json::to_string_pretty(&result).unwrap_or_default();
                format!("{pretty}\n")
            }
            Show::JsonLine => format!("{result}\n"),
            Show::Defined => defined(&decode_result(req, result)?),
            Show::Undefined => {
                let r: Undefined = decode_result(req, result)?;
                format!("undefined {}\n", r.name)
            }
            Show::Started => started(&decode_result(req, result)?),
            Show::Stopped => stopped(&decode_result(req, result)?),
            Show::Destroyed => {
                let r: Destroyed = decode_result(req, result)?;
                format!("destroyed {}\n", r.name)
            }
            Show::List => list(&decode_result::<Vec<ListEntry>>(req, result)?),
            Show::Info => info(&decode_result(req, result)?),
            Show::Migrated => migrated(&decode_result(req, result)?),
            Show::Job => job(decode_result::<Option<JobInfo>>(req, result)?.as_ref()),
            Show::Aborted => aborted(&decode_result(req, result)?),
            Show::Stale => stale(&decode_result::<Vec<StaleEntry>>(req, result)?),
            Show::GuestAgent => {
                let r: crate::api::GuestAgentAnswer = decode_result(req, result)?;
                let pretty = serde_json::to_string_pretty(&r.answer).unwrap_or_default();
                format!("{pretty}\n")
            }
        })
    }
}

/// `println!` into a string.
macro_rules! out {
    ($o:expr, $($arg:tt)*) => {{
        $o.push_str(&format!($($arg)*));
        $o.push('\n');
    }};
}

/// A value that may be missing: `-` then.
fn opt<T: Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

/// A float as JSON writes it (`5.0`, not `5`).
fn float(f: f64) -> String {
    opt(serde_json::Number::from_f64(f))
}

fn defined(r: &Defined) -> String {
    let mut o = String::new();
    out!(o, "defined {} (uuid {})", r.name, r.uuid);
    o
}

fn started(r: &Started) -> String {
    let mut o = String::new();
    out!(
        o,
        "started {} (domid {}, pid {}, machine {}, accel {})",
        r.name,
        r.domid,
        r.pid,
        r.machine,
        r.accel
    );
    o
}

fn stopped(r: &Stopped) -> String {
    let mut o = String::new();
    if r.forced {
        out!(o, "{} forced off (did not power down in time)", r.name);
    } else {
        out!(o, "{} shut down", r.name);
    }
    o
}

fn list(doms: &[ListEntry]) -> String {
    let mut o = String::new();
    out!(
        o,
        "{:<24} {:<10} {:>8} {:>8}",
        "NAME",
        "STATE",
        "DOMID",
        "PID"
    );
    for d in doms {
        out!(
            o,
            "{:<24} {:<10} {:>8} {:>8}",
            d.name,
            d.state,
            opt(d.domid),
            opt(d.pid)
        );
    }
    o
}

fn info(v: &DomainInfo) -> String {
    let mut o = String::new();
    let job = v.job.as_ref().map(|j| {
        crate::api::encode(j)
            .map(|j| j.to_string())
            .unwrap_or_else(|e| format!("({e})"))
    });
    let fields: [(&str, Option<String>); 17] = [
        ("name", Some(v.name.clone())),
        ("uuid", Some(v.uuid.to_string())),
        ("state", Some(v.state.clone())),
        ("reason", v.reason.clone()),
        ("domid", v.domid.map(|d| d.to_string())),
        ("pid", v.pid.map(|p| p.to_string())),
        ("emulator", Some(v.emulator.display().to_string())),
        ("qemu_version", v.qemu_version.clone()),
        ("machine", Some(v.machine.clone())),
        ("accel", Some(v.accel.clone())),
        ("vcpus", Some(v.vcpus.to_string())),
        ("cpu", v.cpu.clone()),
        ("memory_mib", Some(v.memory_mib.to_string())),
        ("hugepages", v.hugepages.clone()),
        (
            "firmware",
            v.firmware.as_ref().map(|f| {
                format!(
                    "{}{} (code {}, NVRAM {})",
                    f.kind,
                    if f.secure_boot { ", Secure Boot" } else { "" },
                    f.code.display(),
                    f.nvram.display()
                )
            }),
        ),
        ("console_log", Some(v.console_log.display().to_string())),
        ("job", Some(opt(job))),
    ];
    for (k, value) in fields {
        if let Some(value) = value {
            out!(o, "{:<14} {value}", format!("{k}:"));
        }
    }
    if let Some(user) = v.running.as_ref().and_then(|r| r.user.as_deref()) {
        out!(o, "{:<14} {user}", "qemu user:");
    }
    for (i, d) in v.disks.iter().enumerate() {
        out!(
            o,
            "{:<14} {} ({}, cache {}, aio {}{})",
            format!("disk{i}:"),
            d.path.display(),
            d.format,
            d.cache,
            d.aio,
            if d.readonly { ", read-only" } else { "" }
        );
    }
    for (i, n) in v.nics.iter().enumerate() {
        out!(
            o,
            "{:<14} mac {} tap {}{}",
            format!("net{i}:"),
            opt(n.mac.as_deref()),
            opt(n.tap.as_deref()),
            n.bridge
                .as_deref()
                .map(|b| format!(" bridge {b}"))
                .unwrap_or_default()
        );
    }
    if let Some(m) = &v.selinux.mcs {
        let applied = if v.selinux.applied {
            "applied"
        } else {
            "recorded; SELinux not enabled here"
        };
        out!(o, "{:<14} s0:{m} ({applied})", "selinux mcs:");
    }
    if let Some(p) = &v.paths {
        for (k, p) in [
            ("console", &p.console),
            ("dir", &p.dir),
            ("log", &p.log),
            ("pid", &p.pid),
            ("qmp", &p.qmp),
        ] {
            out!(o, "{:<14} {}", format!("path.{k}:"), p.display());
        }
    }
    o
}

fn migrated(r: &Migrated) -> String {
    let mut o = String::new();
    let (from, to) = (&r.stats.from, &r.stats.to);
    out!(
        o,
        "migrated {}: domid {} (pid {}, QEMU {}) -> domid {} (pid {}, QEMU {})",
        r.name,
        from.domid,
        from.pid,
        from.qemu_version,
        to.domid,
        to.pid,
        to.qemu_version,
    );
    out!(
        o,
        "  QEMU downtime {} ms, {} bytes sent, total {} ms",
        opt(r.stats.qemu_downtime_ms),
        opt(r.stats.bytes_sent),
        float(r.stats.total_ms)
    );
    o
}

fn job(j: Option<&JobInfo>) -> String {
    let mut o = String::new();
    let Some(j) = j else {
        out!(o, "no job");
        return o;
    };
    out!(
        o,
        "{} phase {} elapsed {} ms bytes {} target domid {} pid {}",
        j.kind,
        j.phase,
        j.elapsed_ms,
        j.bytes,
        opt(j.target.as_ref().map(|t| t.domid)),
        opt(j.target.as_ref().and_then(|t| t.pid))
    );
    o
}

fn aborted(r: &Aborting) -> String {
    let mut o = String::new();
    out!(
        o,
        "aborting the migration of {} (phase {})",
        r.name,
        r.phase
    );
    o
}

fn stale(doms: &[StaleEntry]) -> String {
    let mut o = String::new();
    if doms.is_empty() {
        out!(o, "no running domains");
    }
    for d in doms {
        if d.stale || d.restart_required {
            let what = match (d.stale, d.restart_required) {
                (true, true) => "STALE, RESTART REQUIRED",
                (true, false) => "STALE",
                _ => "RESTART REQUIRED",
            };
            out!(
                o,
                "{}: {what} (QEMU {}, pid {})",
                d.name,
                d.qemu_version,
                d.pid
            );
            for r in &d.reasons {
                let note = if r.restart_required {
                    " (restart required)"
                } else {
                    ""
                };
                out!(o, "    {}{note}", r.text);
            }
            if d.restart_required {
                out!(
                    o,
                    "    the guest runs the firmware it booted with: a migration carries it and a \
                     guest reboot keeps it; `qlive stop` and `qlive start` load the new image"
                );
            }
        } else if let Some(e) = &d.error {
            out!(o, "{}: unknown ({e})", d.name);
        } else {
            out!(
                o,
                "{}: current (QEMU {}, pid {})",
                d.name,
                d.qemu_version,
                d.pid
            );
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(show: Show, v: Value) -> String {
        show.render(&Request::List {}, v).unwrap()
    }

    /// The human forms are what they were when they read JSON keys.
    #[test]
    fn human_output() {
        let info_v = json!({
            "accel": "tcg", "console_log": "/c/vm1.log",
            "disks": [{"aio": "native", "cache": "none", "format": "raw", "path": "/d", "readonly": true}],
            "domid": 1, "emulator": "/usr/bin/qemu", "exe": "/usr/bin/qemu", "job": null,
            "machine": "pc-q35-7.2", "memory_mib": 256, "name": "vm1",
            "nics": [{"mac": "52:54:00:3e:91:0c"}, {"bridge": "br0", "mac": "52:54:00:3e:91:0d", "tap": "t1"}],
            "paths": {"console": "/c/vm1.log", "dir": "/r/1", "log": "/r/1/qemu.log", "pid": "/r/1/pid", "qmp": "/r/1/qmp.sock"},
            "pid": 30296, "qemu_package": "", "qemu_version": "7.2.22", "reason": null,
            "selinux": {"applied": false, "mcs": "c12,c345"}, "started_at": 1, "state": "running",
            "user": "qemu", "uuid": "d89d3627-2b0c-4fd8-b2c9-5c27d86e14ca", "vcpus": 1});
        assert_eq!(
            render(Show::Info, info_v),
            "name:          vm1
uuid:          d89d3627-2b0c-4fd8-b2c9-5c27d86e14ca
state:         running
domid:         1
pid:           30296
emulator:      /usr/bin/qemu
qemu_version:  7.2.22
machine:       pc-q35-7.2
accel:         tcg
vcpus:         1
memory_mib:    256
console_log:   /c/vm1.log
job:           -
qemu user:     qemu
disk0:         /d (raw, cache none, aio native, read-only)
net0:          mac 52:54:00:3e:91:0c tap -
net1:          mac 52:54:00:3e:91:0d tap t1 bridge br0
selinux mcs:   s0:c12,c345 (recorded; SELinux not enabled here)
path.console:  /c/vm1.log
path.dir:      /r/1
path.log:      /r/1/qemu.log
path.pid:      /r/1/pid
path.qmp:      /r/1/qmp.sock
"
        );
        let side =
            |d: u64| json!({"domid": d, "emulator": "/q", "pid": 7, "qemu_version": "7.2.22"});
        let mig = json!({"bytes_sent": null, "completion_to_cont_us": 6705, "from": side(1),
            "name": "vm1", "phases_ms": {"begin": 2.237, "confirm": null, "finish": null, "perform": null,
            "prepare": null}, "qemu_downtime_ms": 1, "qemu_total_ms": 3, "result": "success",
            "to": side(2), "total_ms": 5.0});
        assert_eq!(
            render(Show::Migrated, mig),
            "migrated vm1: domid 1 (pid 7, QEMU 7.2.22) -> domid 2 (pid 7, QEMU 7.2.22)
  QEMU downtime 1 ms, - bytes sent, total 5.0 ms
"
        );
        let job_v = json!({"bytes": 0, "elapsed_ms": 3549, "kind": "migration-out",
            "past_switchover": false, "phase": "perform", "started_at": 1,
            "target": {"domid": 9, "emulator": "/q", "pid": null}});
        assert_eq!(
            render(Show::Job, job_v),
            "migration-out phase perform elapsed 3549 ms bytes 0 target domid 9 pid -\n"
        );
        assert_eq!(render(Show::Job, Value::Null), "no job\n");
        let list_v = json!([{"domid": null, "name": "a", "pid": null, "state": "shut-off",
            "uuid": "d89d3627-2b0c-4fd8-b2c9-5c27d86e14ca"}]);
        assert_eq!(
            render(Show::List, list_v),
            "NAME                     STATE         DOMID      PID
a                        shut-off          -        -
"
        );
    }

    /// `--json` prints the answer as it came, fields unknown to this
    /// client included; a human form needs a result of the right shape.
    #[test]
    fn json_is_the_answer_and_bad_shapes_are_bad_answers() {
        let v = json!({"name": "a", "uuid": "d89d3627-2b0c-4fd8-b2c9-5c27d86e14ca", "new": 1});
        assert_eq!(render(Show::JsonLine, v.clone()), format!("{v}\n"));
        assert_eq!(
            render(Show::Defined, v),
            "defined a (uuid d89d3627-2b0c-4fd8-b2c9-5c27d86e14ca)\n"
        );
        let e = Show::List
            .render(&Request::List {}, json!({"name": "a"}))
            .unwrap_err();
        assert!(matches!(e, ClientError::BadAnswer(_)), "{e}");
        assert!(e.to_string().contains("list result"), "{e}");
    }
}
