//! The results of the API operations, one type per answer, shared by the
//! agent (which builds and serializes them) and the client (which decodes
//! them and reads their fields). Also the JSON lines of `qlive upgrade
//! --json`, which the client writes. docs/protocol.md documents every
//! shape; the field names and shapes here are that contract.
//!
//! Rules, so the wire format stays what it is and older clients keep
//! working against newer agents:
//!
//! - A result is sent as a JSON value, so its object keys come out sorted
//!   ([`encode`]); the order of the fields here means nothing on the wire.
//! - Unknown fields are ignored when decoding (no `deny_unknown_fields`: a
//!   newer agent may add fields), and an absent `Option` field decodes as
//!   `None`.
//! - Values of a set that may grow (states, phases, kinds, accelerators,
//!   disk formats) are strings, not enums, so a value an older client does
//!   not know still decodes.
//! - A field that is `null` when it has no value is a plain `Option`; a
//!   field that is absent when it has no value says so with
//!   `skip_serializing_if`.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::PathBuf;
use uuid::Uuid;

/// A result as it goes on the wire: a JSON value, whose object keys
/// serde_json keeps sorted. Fails only for a value JSON cannot carry (a
/// path that is not UTF-8).
pub fn encode<T: Serialize>(result: &T) -> Result<Value, serde_json::Error> {
    serde_json::to_value(result)
}

/// Read a result (or an upgrade line) into its type.
pub fn decode<T: DeserializeOwned>(result: Value) -> Result<T, serde_json::Error> {
    serde_json::from_value(result)
}

/// `ping`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pong {
    /// The agent's version (`CARGO_PKG_VERSION`).
    pub version: String,
}

/// `define`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Defined {
    pub name: String,
    pub uuid: Uuid,
}

/// `undefine`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Undefined {
    pub name: String,
}

/// `start`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Started {
    pub name: String,
    pub domid: u64,
    pub pid: i32,
    /// The pinned machine type, e.g. `pc-q35-7.2`.
    pub machine: String,
    /// The effective accelerator: `kvm` or `tcg`.
    pub accel: String,
}

/// `stop`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stopped {
    pub name: String,
    /// The guest did not power down in time and was forced off.
    pub forced: bool,
}

/// `destroy`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Destroyed {
    pub name: String,
}

/// `list`: one entry per domain, sorted by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListEntry {
    pub name: String,
    pub uuid: Uuid,
    /// `running`, `paused`, another QEMU run state, `unknown (<why>)`,
    /// `shut-off` or `unreachable`.
    pub state: String,
    pub domid: Option<u64>,
    pub pid: Option<i32>,
}

/// `info`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DomainInfo {
    pub name: String,
    pub uuid: Uuid,
    /// As in [`ListEntry::state`].
    pub state: String,
    /// Why a domain that is not running is not; `null` while it runs.
    pub reason: Option<String>,
    pub domid: Option<u64>,
    pub pid: Option<i32>,
    /// The running instance's emulator, else the definition's.
    pub emulator: PathBuf,
    /// `major.minor.micro` of the running (or recorded) QEMU.
    pub qemu_version: Option<String>,
    /// The running instance's machine type, else the definition's (maybe
    /// still an alias).
    pub machine: String,
    /// Running: `kvm` or `tcg`; otherwise the definition's (maybe `auto`).
    pub accel: String,
    pub vcpus: u32,
    /// The definition's CPU model (pinned to its versioned name at the
    /// first start); absent for QEMU's default model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    pub memory_mib: u64,
    /// `2M` or `1G` when guest RAM is on huge pages; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugepages: Option<String>,
    /// The UEFI firmware; absent for a BIOS domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<FirmwareInfo>,
    pub disks: Vec<DiskInfo>,
    pub nics: Vec<NicInfo>,
    pub selinux: SelinuxInfo,
    pub console_log: PathBuf,
    /// The migration job holding the domain, if any.
    pub job: Option<JobInfo>,
    /// The running instance's paths; `null` when not running.
    pub paths: Option<InfoPaths>,
    /// Present only while the domain runs.
    #[serde(flatten)]
    pub running: Option<RunningInfo>,
}

/// The `info` fields present only while the domain runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunningInfo {
    /// `/proc/PID/exe` as read when the instance was started or adopted.
    pub exe: PathBuf,
    /// QEMU's package string, e.g. `Debian 1:7.2+dfsg-7+deb12u18+b3`.
    pub qemu_package: String,
    /// Unix seconds.
    pub started_at: u64,
    /// The user QEMU runs as; `null` for root.
    pub user: Option<String>,
}

/// `info.paths`: the running instance's files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InfoPaths {
    pub dir: PathBuf,
    pub qmp: PathBuf,
    pub pid: PathBuf,
    pub log: PathBuf,
    /// The domain's console log (the same as `console_log`).
    pub console: PathBuf,
}

/// `info.disks[]`: a disk as stored (defaults filled in).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskInfo {
    pub path: PathBuf,
    /// `raw` or `qcow2`.
    pub format: String,
    pub readonly: bool,
    /// `writeback`, `none`, `writethrough` or `directsync`.
    pub cache: String,
    /// `threads`, `native` or `io_uring`.
    pub aio: String,
}

/// `info.firmware`: a UEFI domain's flash images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FirmwareInfo {
    /// `uefi`.
    #[serde(rename = "type")]
    pub kind: String,
    pub code: PathBuf,
    pub nvram_template: PathBuf,
    /// The domain's own NVRAM (created at its first start).
    pub nvram: PathBuf,
    pub secure_boot: bool,
}

/// `info.nics[]`: a NIC as stored; a field without a value is absent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NicInfo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
}

/// `info.selinux`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SelinuxInfo {
    /// The domain's MCS category pair (`cA,cB`), if it has one.
    pub mcs: Option<String>,
    /// selinuxfs is mounted: the next instance is labelled with the pair.
    pub applied: bool,
}

/// `console`'s one answer line; raw console bytes follow it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Streaming {
    pub streaming: bool,
}

/// `job` (`null` when there is none) and `info.job`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobInfo {
    /// `migration-out`.
    pub kind: String,
    /// `begin`, `prepare`, `perform`, `finish` or `confirm`.
    pub phase: String,
    pub elapsed_ms: u64,
    /// Unix seconds.
    pub started_at: u64,
    /// QEMU's `ram.transferred` on the source.
    pub bytes: u64,
    /// The source reported `completed`: abort is refused from here on.
    pub past_switchover: bool,
    /// The destination; `null` until it is spawned.
    pub target: Option<JobTarget>,
}

/// `job.target`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobTarget {
    pub domid: u64,
    pub pid: Option<i32>,
    pub emulator: PathBuf,
}

/// `abort`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Aborting {
    pub name: String,
    /// The phase the migration was in.
    pub phase: String,
    pub aborting: bool,
}

/// `stale`: one entry per running domain, sorted by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StaleEntry {
    pub name: String,
    pub domid: u64,
    pub pid: i32,
    /// The emulator the instance was started from.
    pub emulator: PathBuf,
    pub qemu_version: String,
    /// A live upgrade would move the guest onto files it does not run
    /// yet: some reason does not need a restart.
    pub stale: bool,
    /// Some reason only a cold restart (stop, start) resolves: replaced
    /// firmware, which the guest keeps running across migrations and
    /// reboots. `qlive upgrade --stale` does not select for it.
    #[serde(default)]
    pub restart_required: bool,
    pub reasons: Vec<StaleReasonInfo>,
    /// Why the check failed; then `stale` is false and `reasons` empty.
    pub error: Option<String>,
}

/// `stale[].reasons[]`: one changed file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StaleReasonInfo {
    /// `exe-deleted`, `exe-replaced`, `library-deleted`, ...
    pub kind: String,
    pub path: PathBuf,
    /// What `qlive stale` prints.
    pub text: String,
    /// Only a cold restart resolves it (firmware).
    #[serde(default)]
    pub restart_required: bool,
}

/// `preflight`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preflight {
    pub name: String,
    pub domid: u64,
    /// The running instance.
    pub from: EmulatorVersion,
    /// The target; `qemu_version` only if its probe succeeded.
    pub to: EmulatorVersion,
    /// The target passes the preflight.
    pub ok: bool,
    /// Why it does not (`null` when `ok`).
    pub reason: Option<String>,
    /// What to know about a migration that passes (a CPU model that
    /// differs between QEMU versions); absent when there is nothing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// `adopt` with `dry_run`: what qlive learned of a foreign QEMU, or why
/// it refuses it. A refusal is a successful call with `ok: false`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdoptPlan {
    pub name: String,
    /// The foreign QEMU's pid (from the QMP socket's peer credentials).
    pub pid: i32,
    pub qemu_version: String,
    pub dry_run: bool,
    /// Learned, and (with a definition given) matching it.
    pub ok: bool,
    /// The definition qlive would store (the given one, when it matches);
    /// `null` when refused.
    pub definition: Option<Value>,
    /// What the migration needs beyond the definition (RAM block, taps,
    /// notes); `null` when refused.
    pub facts: Option<crate::adopt::AdoptFacts>,
    /// What qlive cannot reproduce, each `what (why)`.
    pub refused: Vec<String>,
    /// Where the given definition differs from the guest.
    pub mismatches: Vec<String>,
}

/// `preflight.from` and `.to`: an emulator and its QEMU version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmulatorVersion {
    pub emulator: PathBuf,
    pub qemu_version: Option<String>,
}

/// `migrate`: a migration that succeeded (a failure is an error answer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Migrated {
    pub result: MigrateResult,
    pub name: String,
    #[serde(flatten)]
    pub stats: MigrationStats,
}

/// `migrate.result`: always `success`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MigrateResult {
    Success,
}

/// What a migration did: the `migrate` result without `result` and
/// `name`, shared with the upgrade line of a migrated domain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationStats {
    pub from: InstanceSide,
    pub to: InstanceSide,
    pub phases_ms: PhasesMs,
    /// QEMU's `downtime` from the source's `query-migrate` (ms); `null` if
    /// that query failed.
    pub qemu_downtime_ms: Option<u64>,
    /// QEMU's `total-time` (ms), from the same query.
    pub qemu_total_ms: Option<u64>,
    /// `ram.transferred`, from the same query.
    pub bytes_sent: Option<u64>,
    /// From the source's `completed` event to the destination's `cont`
    /// reply.
    pub completion_to_cont_us: u64,
    /// From the request's arrival to the end of Confirm, rounded to µs.
    pub total_ms: f64,
    /// A copy migration (adoption, `--copy-memory`): whether it switched
    /// over by post-copy. Absent for shared-memory migrations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy: Option<bool>,
    /// A copy migration's pre-copy passes (QEMU's dirty-sync-count when
    /// post-copy started or the copy completed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precopy_passes: Option<u64>,
}

/// `migrate.from` and `.to`: the source and destination instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceSide {
    pub domid: u64,
    pub pid: i32,
    pub emulator: PathBuf,
    pub qemu_version: String,
}

/// `migrate.phases_ms`: wall time per phase in ms, rounded to µs; `null`
/// for a phase that did not run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PhasesMs {
    pub begin: Option<f64>,
    pub prepare: Option<f64>,
    pub perform: Option<f64>,
    pub finish: Option<f64>,
    pub confirm: Option<f64>,
}

/// `qlive upgrade --json`: the line printed when one domain is done.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpgradeLine {
    /// The domain as it was selected (a name, or what was given).
    pub name: String,
    #[serde(flatten)]
    pub outcome: UpgradeOutcome,
    /// The domain's call as the client saw it, from getting a slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wall_ms: Option<u64>,
}

/// `result` of an upgrade line, and the fields that come with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "lowercase")]
pub enum UpgradeOutcome {
    /// Migrated: the fields of the `migrate` result.
    Success(MigrationStats),
    /// Dry run: the preflight passed.
    Ok {
        from: EmulatorVersion,
        to: EmulatorVersion,
    },
    /// The migration (or, in a dry run, the preflight) failed; `from` and
    /// `to` are there for a preflight that answered.
    Failed {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<EmulatorVersion>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<EmulatorVersion>,
        error: String,
    },
}

impl UpgradeOutcome {
    /// The domain moved (or, in a dry run, would).
    pub fn succeeded(&self) -> bool {
        !matches!(self, UpgradeOutcome::Failed { .. })
    }
}

/// `qlive upgrade --json`: the last line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpgradeSummaryLine {
    pub summary: UpgradeSummary,
}

/// The run as a whole.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpgradeSummary {
    pub selected: usize,
    pub succeeded: usize,
    pub failed: usize,
    /// Sorted by name.
    pub failed_domains: Vec<String>,
    /// With `--stale`: running domains whose check failed, not selected.
    #[serde(default)]
    pub unchecked: Vec<String>,
    pub dry_run: bool,
    pub parallel: usize,
    /// The whole run.
    pub wall_ms: u64,
}

/// `metrics`: the agent's tally (see [`crate::metrics`]) and when this
/// agent process started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Unix seconds.
    pub agent_started_at_s: u64,
    pub tally: crate::metrics::Tally,
}

/// `guest-agent`: the guest agent's `return` value (`null` for a command
/// that does not answer, such as `guest-shutdown`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestAgentAnswer {
    pub name: String,
    #[serde(rename = "return")]
    pub answer: Value,
}

/// `record-upgrade`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recorded {
    pub recorded: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Every `{"ok":true,"result":...}` example in docs/protocol.md, with the
    /// type of its result: it decodes, and encoding it again gives the same
    /// JSON, so the documented shapes and these types agree.
    #[test]
    fn documented_results_roundtrip() {
        let doc = include_str!("../../docs/protocol.md");
        // An example shown on several lines ends at the first line that
        // completes it, or at the end of its code block.
        let mut examples: Vec<String> = Vec::new();
        let mut open: Option<String> = None;
        for l in doc.lines() {
            if let Some(mut buf) = open.take() {
                if l.starts_with("```") || l.trim().is_empty() {
                    examples.push(buf);
                    continue;
                }
                buf.push_str(l.trim());
                if serde_json::from_str::<Value>(&buf).is_ok() {
                    examples.push(buf);
                } else {
                    open = Some(buf);
                }
            } else if l.starts_with(r#"{"ok":true,"result":"#) {
                if serde_json::from_str::<Value>(l).is_ok() {
                    examples.push(l.to_string());
                } else {
                    open = Some(l.to_string());
                }
            }
        }
        examples.extend(open);
        let mut by_shape = std::collections::BTreeMap::<&str, usize>::new();
        for ex in &examples {
            if ex.contains('…') || ex.contains("<value>") {
                continue; // elided, or the form of every answer
            }
            let v: Value = serde_json::from_str(ex).unwrap_or_else(|e| panic!("{ex}: {e}"));
            let r = v["result"].clone();
            let shape = check_roundtrip(&r).unwrap_or_else(|e| panic!("{ex}: {e}"));
            *by_shape.entry(shape).or_default() += 1;
        }
        let summary = doc
            .lines()
            .find(|l| l.starts_with(r#"{"summary":"#))
            .expect("an upgrade summary example");
        let v: Value = serde_json::from_str(summary).unwrap();
        let back = encode(&decode::<UpgradeSummaryLine>(v.clone()).unwrap()).unwrap();
        assert_eq!(back, v);
        for shape in [
            "ping",
            "define",
            "start",
            "stop",
            "name",
            "list",
            "info",
            "console",
            "migrate",
            "job",
            "abort",
            "stale",
            "preflight",
            "metrics",
            "record-upgrade",
            "guest-agent",
            "adopt",
        ] {
            assert!(
                by_shape.contains_key(shape),
                "no example of {shape}: {by_shape:?}"
            );
        }
    }

    /// Decode `r` as the result it looks like and encode it again.
    fn check_roundtrip(r: &Value) -> Result<&'static str, String> {
        fn again<T: Serialize + DeserializeOwned>(r: &Value) -> Result<(), String> {
            let t: T = decode(r.clone()).map_err(|e| e.to_string())?;
            let back = encode(&t).map_err(|e| e.to_string())?;
            if &back == r {
                Ok(())
            } else {
                Err(format!("re-encoded as {back}"))
            }
        }
        let has = |k: &str| r.get(k).is_some();
        let shape = if r.is_array() {
            if r[0].get("reasons").is_some() {
                again::<Vec<StaleEntry>>(r)?;
                "stale"
            } else {
                again::<Vec<ListEntry>>(r)?;
                "list"
            }
        } else if has("tally") {
            again::<Metrics>(r)?;
            "metrics"
        } else if has("return") {
            again::<GuestAgentAnswer>(r)?;
            "guest-agent"
        } else if has("recorded") {
            again::<Recorded>(r)?;
            "record-upgrade"
        } else if has("version") {
            again::<Pong>(r)?;
            "ping"
        } else if has("streaming") {
            again::<Streaming>(r)?;
            "console"
        } else if has("aborting") {
            again::<Aborting>(r)?;
            "abort"
        } else if has("past_switchover") {
            again::<JobInfo>(r)?;
            "job"
        } else if has("phases_ms") {
            again::<Migrated>(r)?;
            "migrate"
        } else if has("refused") {
            again::<AdoptPlan>(r)?;
            "adopt"
        } else if has("ok") {
            again::<Preflight>(r)?;
            "preflight"
        } else if has("vcpus") {
            again::<DomainInfo>(r)?;
            "info"
        } else if has("accel") {
            again::<Started>(r)?;
            "start"
        } else if has("forced") {
            again::<Stopped>(r)?;
            "stop"
        } else if has("uuid") {
            again::<Defined>(r)?;
            "define"
        } else {
            again::<Undefined>(r)?;
            again::<Destroyed>(r)?;
            "name"
        };
        Ok(shape)
    }

    #[test]
    fn info_running_fields_only_while_running() {
        let mut off = DomainInfo {
            name: "vm1".into(),
            uuid: Uuid::nil(),
            state: "shut-off".into(),
            reason: Some("defined".into()),
            domid: None,
            pid: None,
            emulator: "/usr/bin/qemu".into(),
            qemu_version: None,
            machine: "q35".into(),
            accel: "auto".into(),
            vcpus: 1,
            cpu: None,
            memory_mib: 256,
            hugepages: None,
            firmware: None,
            disks: vec![],
            nics: vec![NicInfo {
                mac: Some("52:54:00:00:00:01".into()),
                tap: None,
                bridge: None,
            }],
            selinux: SelinuxInfo {
                mcs: None,
                applied: false,
            },
            console_log: "/c.log".into(),
            job: None,
            paths: None,
            running: None,
        };
        let v = encode(&off).unwrap();
        for k in ["exe", "qemu_package", "started_at", "user"] {
            assert!(v.get(k).is_none(), "{k} in {v}");
        }
        for k in ["reason", "domid", "pid", "qemu_version", "job", "paths"] {
            assert_eq!(
                v[k],
                if k == "reason" {
                    json!("defined")
                } else {
                    Value::Null
                }
            );
        }
        assert_eq!(v["nics"], json!([{"mac": "52:54:00:00:00:01"}]));
        assert_eq!(decode::<DomainInfo>(v).unwrap(), off);

        off.running = Some(RunningInfo {
            exe: "/usr/bin/qemu".into(),
            qemu_package: String::new(),
            started_at: 1,
            user: None,
        });
        let v = encode(&off).unwrap();
        // `user` is null for root, but present.
        assert_eq!(v.get("user"), Some(&Value::Null));
        assert_eq!(v["started_at"], 1);
        assert_eq!(decode::<DomainInfo>(v).unwrap(), off);
    }

    #[test]
    fn decoding_tolerates_new_fields_and_values() {
        let v = json!([{"name": "a", "uuid": Uuid::nil(), "state": "hibernating",
            "domid": null, "pid": null, "colour": "blue"}]);
        let l: Vec<ListEntry> = decode(v).unwrap();
        assert_eq!(l[0].state, "hibernating");
        let v = json!({"kind": "migration-in", "phase": "warp", "elapsed_ms": 1,
            "started_at": 2, "bytes": 3, "past_switchover": false, "target": null, "eta": 5});
        assert_eq!(decode::<JobInfo>(v).unwrap().phase, "warp");
    }

    #[test]
    fn upgrade_lines_keep_their_shapes() {
        let side = |v: &str| EmulatorVersion {
            emulator: "/usr/bin/qemu".into(),
            qemu_version: Some(v.into()),
        };
        let ok = UpgradeLine {
            name: "a".into(),
            outcome: UpgradeOutcome::Ok {
                from: side("7.2.22"),
                to: side("10.0.2"),
            },
            wall_ms: Some(12),
        };
        let v = encode(&ok).unwrap();
        assert_eq!(
            v,
            json!({"name": "a", "result": "ok", "wall_ms": 12,
                "from": {"emulator": "/usr/bin/qemu", "qemu_version": "7.2.22"},
                "to": {"emulator": "/usr/bin/qemu", "qemu_version": "10.0.2"}})
        );
        assert_eq!(decode::<UpgradeLine>(v).unwrap(), ok);

        let failed = UpgradeLine {
            name: "c".into(),
            outcome: UpgradeOutcome::Failed {
                from: None,
                to: None,
                error: "boom".into(),
            },
            wall_ms: None,
        };
        let v = encode(&failed).unwrap();
        assert_eq!(v, json!({"name": "c", "result": "failed", "error": "boom"}));
        assert_eq!(decode::<UpgradeLine>(v).unwrap(), failed);
        assert!(!failed.outcome.succeeded());

        let inst = |domid| InstanceSide {
            domid,
            pid: 7,
            emulator: "/usr/bin/qemu".into(),
            qemu_version: "7.2.22".into(),
        };
        let stats = MigrationStats {
            from: inst(1),
            to: inst(2),
            phases_ms: PhasesMs {
                begin: Some(2.237),
                ..PhasesMs::default()
            },
            qemu_downtime_ms: Some(1),
            qemu_total_ms: None,
            bytes_sent: Some(210100),
            completion_to_cont_us: 6705,
            total_ms: 118.628,
            postcopy: None,
            precopy_passes: None,
        };
        let answer = Migrated {
            result: MigrateResult::Success,
            name: "b".into(),
            stats: stats.clone(),
        };
        let mut expected = encode(&answer).unwrap();
        expected["wall_ms"] = json!(130);
        let line = UpgradeLine {
            name: "b".into(),
            outcome: UpgradeOutcome::Success(stats),
            wall_ms: Some(130),
        };
        // A migrated domain's line is the migrate result plus wall_ms.
        assert_eq!(encode(&line).unwrap(), expected);
        assert_eq!(decode::<UpgradeLine>(expected).unwrap(), line);
        assert_eq!(
            encode(&answer).unwrap()["phases_ms"],
            json!({"begin": 2.237, "prepare": null, "perform": null, "finish": null, "confirm": null})
        );
    }

    #[test]
    fn summary_shape() {
        let s = UpgradeSummaryLine {
            summary: UpgradeSummary {
                selected: 3,
                succeeded: 2,
                failed: 1,
                failed_domains: vec!["c".into()],
                unchecked: vec![],
                dry_run: false,
                parallel: 2,
                wall_ms: 2315,
            },
        };
        assert_eq!(
            encode(&s).unwrap().to_string(),
            r#"{"summary":{"dry_run":false,"failed":1,"failed_domains":["c"],"parallel":2,"selected":3,"succeeded":2,"unchecked":[],"wall_ms":2315}}"#
        );
    }
}
