//! Adopting a QEMU that qlive did not start: the first step, learning its
//! configuration and refusing what qlive cannot reproduce. The migration
//! is `crate::agent::adopt`'s (docs/adopting.md).
//!
//! [`inspect`] connects to the foreign QEMU's QMP socket (QEMU serves one
//! client at a time: a busy socket is an error, not a wait), finds its pid
//! from the socket's peer credentials, reads `/proc/PID` and issues only
//! query commands, then disconnects. [`learn::learn`] turns what it saw into
//! a [`Definition`] and the [`AdoptFacts`] a migration needs, or refuses,
//! naming everything it cannot reproduce at once. [`check_definition`]
//! compares a definition the user gives with the learned one.

pub mod learn;
pub mod opts;

use crate::domain::definition::{Definition, Firmware};
use crate::qmp::{Qmp, QmpError};
use learn::{BlockView, PciFunction, ProcView, QmpView, QomDevice};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a QMP socket may stay silent before it counts as busy (QEMU
/// greets at once unless another client holds the monitor).
pub const GREETING_TIMEOUT: Duration = Duration::from_secs(3);
/// Per query command.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error("connecting to the QMP socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the QMP socket {path} is busy: QEMU serves one client at a time and another one is connected (no greeting within {secs} s); disconnect it and retry")]
    Busy { path: PathBuf, secs: u64 },
    #[error("reading the peer credentials of the QMP socket {path}")]
    PeerCred {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("QEMU pid {pid} is the instance of qlive's domain {domain}: it is qlive's already")]
    OwnInstance { pid: i32, domain: String },
    #[error("QMP handshake on {path}")]
    Handshake {
        path: PathBuf,
        #[source]
        source: QmpError,
    },
    #[error("reading /proc/{pid}/{what}")]
    Proc {
        pid: i32,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("QMP query {command} of QEMU pid {pid}")]
    Query {
        command: String,
        pid: i32,
        #[source]
        source: QmpError,
    },
    #[error("the answer to QMP query {command} of QEMU pid {pid} is not what QEMU sends: {what}")]
    Answer {
        command: String,
        pid: i32,
        what: String,
    },
}

/// One thing qlive cannot reproduce: what (an option, a device, a
/// backend) and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub what: String,
    pub why: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.what, self.why)
    }
}

/// `cannot adopt: A (why); B (why)`.
pub fn refusal_message(r: &[Refusal]) -> String {
    let parts: Vec<String> = r.iter().map(|r| r.to_string()).collect();
    format!("cannot adopt: {}", parts.join("; "))
}

/// Guest RAM as the foreign QEMU has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamFacts {
    /// The RAM block's name in the migration stream: `pc.ram` for plain
    /// `-m`, else the memory backend's id. The destination's backend must
    /// have this id.
    pub block: String,
    /// The backend's QOM type (`memory-backend-ram` for plain `-m`).
    pub backend: String,
    pub shared: bool,
    pub file_backed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_path: Option<String>,
    pub size_bytes: u64,
}

/// How the foreign QEMU holds a NIC's tap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "by")]
pub enum TapSource {
    /// It opened the tap by name (`ifname=`); `fd` is that open queue.
    Ifname { fd: i32 },
    /// It was given the fd (`fd=N`).
    Fd { fd: i32 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicFacts {
    /// The device's QOM path.
    pub device: String,
    pub netdev: String,
    pub tap: String,
    pub source: TapSource,
    pub pci_slot: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskFacts {
    pub device: String,
    /// The drive id or top node name the device uses.
    pub backend: String,
    pub pci_slot: i64,
}

/// What a migration into qlive needs beyond the definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdoptFacts {
    pub pid: i32,
    pub qemu_version: String,
    pub qemu_package: String,
    /// QEMU's run state (`running` or `paused`).
    pub status: String,
    pub ram: RamFacts,
    pub disks: Vec<DiskFacts>,
    pub nics: Vec<NicFacts>,
    /// `-L` data directories (kept in `extra_args` too).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data_dirs: Vec<String>,
    /// What changes for the host or at the guest's next boot, not under it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// A learned configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Learned {
    pub definition: Definition,
    pub facts: AdoptFacts,
}

/// What [`inspect`] found: who answered, and the verdict.
#[derive(Debug, Clone)]
pub struct Inspection {
    pub pid: i32,
    pub qemu_version: String,
    pub verdict: Result<Learned, Vec<Refusal>>,
}

/// Connect to the QMP socket at `qmp`, learn the QEMU behind it as a
/// definition named `name`, disconnect. `own` maps the pids of qlive's own
/// instances to their domains: such a QEMU is not adopted (checked before
/// the handshake, from the socket's peer credentials).
pub async fn inspect(
    name: &str,
    qmp: &Path,
    own: &BTreeMap<i32, String>,
) -> Result<Inspection, AdoptError> {
    let stream = tokio::net::UnixStream::connect(qmp)
        .await
        .map_err(|source| {
            if source.kind() == io::ErrorKind::WouldBlock {
                AdoptError::Busy {
                    path: qmp.into(),
                    secs: 0,
                }
            } else {
                AdoptError::Connect {
                    path: qmp.into(),
                    source,
                }
            }
        })?;
    let pid = {
        use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
        getsockopt(&stream, PeerCredentials)
            .map_err(|source| AdoptError::PeerCred {
                path: qmp.into(),
                source,
            })?
            .pid()
    };
    if let Some(domain) = own.get(&pid) {
        return Err(AdoptError::OwnInstance {
            pid,
            domain: domain.clone(),
        });
    }
    tracing::info!(pid, socket = %qmp.display(), "inspecting a foreign QEMU for adoption");
    let (r, w) = stream.into_split();
    let conn = match tokio::time::timeout(GREETING_TIMEOUT, Qmp::handshake(r, w)).await {
        Err(_) => {
            return Err(AdoptError::Busy {
                path: qmp.into(),
                secs: GREETING_TIMEOUT.as_secs(),
            })
        }
        Ok(Err(source)) => {
            return Err(AdoptError::Handshake {
                path: qmp.into(),
                source,
            })
        }
        Ok(Ok(c)) => c,
    };
    let view = query(&conn, pid).await;
    // Disconnect before anything else: the monitor is the user's again.
    drop(conn);
    let view = view?;
    let proc_ = read_proc(pid)?;
    let verdict = learn::learn(name, &proc_, &view, qmp);
    match &verdict {
        Ok(_) => tracing::info!(pid, "foreign QEMU learned"),
        Err(r) => tracing::info!(
            pid,
            refusals = r.len(),
            "foreign QEMU refused: {}",
            refusal_message(r)
        ),
    }
    Ok(Inspection {
        pid,
        qemu_version: view.version.clone(),
        verdict,
    })
}

fn read_proc(pid: i32) -> Result<ProcView, AdoptError> {
    let base = PathBuf::from(format!("/proc/{pid}"));
    let err = |what: &'static str| move |source| AdoptError::Proc { pid, what, source };
    let raw = std::fs::read(base.join("cmdline")).map_err(err("cmdline"))?;
    let mut argv: Vec<String> = raw
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    if raw.last() == Some(&0) {
        argv.pop();
    }
    if !argv.is_empty() {
        argv.remove(0);
    }
    let exe = std::fs::read_link(base.join("exe")).map_err(err("exe"))?;
    let daemonized = argv.iter().any(|a| a == "-daemonize" || a == "--daemonize");
    let cwd = if daemonized {
        None
    } else {
        std::fs::read_link(base.join("cwd")).ok()
    };
    let mut taps = BTreeMap::new();
    for e in std::fs::read_dir(base.join("fd")).map_err(err("fd"))? {
        let Ok(e) = e else { continue };
        let Ok(fd) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if std::fs::read_link(e.path()).ok().as_deref() != Some(Path::new("/dev/net/tun")) {
            continue;
        }
        let info = std::fs::read_to_string(base.join(format!("fdinfo/{fd}"))).unwrap_or_default();
        if let Some(n) = info.lines().find_map(|l| l.strip_prefix("iff:")) {
            taps.insert(fd, n.trim().to_string());
        }
    }
    let user_config = ["/etc/qemu/qemu.conf", "/etc/qemu/target-x86_64.conf"]
        .iter()
        .map(PathBuf::from)
        .filter(|p| p.exists())
        .collect();
    Ok(ProcView {
        pid,
        exe,
        argv,
        cwd,
        taps,
        user_config,
    })
}

async fn run(
    conn: &Qmp,
    pid: i32,
    command: &str,
    args: Option<Value>,
) -> Result<Value, AdoptError> {
    conn.execute_raw_timeout(command, args, QUERY_TIMEOUT)
        .await
        .map_err(|source| AdoptError::Query {
            command: command.into(),
            pid,
            source,
        })
}

fn bad(command: &str, pid: i32, what: impl Into<String>) -> AdoptError {
    AdoptError::Answer {
        command: command.into(),
        pid,
        what: what.into(),
    }
}

/// The query commands, and only those.
async fn query(conn: &Qmp, pid: i32) -> Result<QmpView, AdoptError> {
    let mut v = QmpView::default();
    let ver = run(conn, pid, "query-version", None).await?;
    let q = &ver["qemu"];
    v.version = format!(
        "{}.{}.{}",
        q["major"].as_i64().unwrap_or(0),
        q["minor"].as_i64().unwrap_or(0),
        q["micro"].as_i64().unwrap_or(0)
    );
    v.package = ver["package"].as_str().unwrap_or("").trim().to_string();
    let mt = run(
        conn,
        pid,
        "qom-get",
        Some(json!({"path": "/machine", "property": "type"})),
    )
    .await?;
    v.machine_type = mt
        .as_str()
        .ok_or_else(|| bad("qom-get /machine type", pid, "not a string"))?
        .to_string();
    let st = run(conn, pid, "query-status", None).await?;
    v.status = st["status"].as_str().unwrap_or("unknown").to_string();
    let kvm = run(conn, pid, "query-kvm", None).await?;
    v.kvm_enabled = kvm["enabled"].as_bool().unwrap_or(false);
    let cpus = run(conn, pid, "query-cpus-fast", None).await?;
    for c in cpus
        .as_array()
        .ok_or_else(|| bad("query-cpus-fast", pid, "not a list"))?
    {
        let p = &c["props"];
        let id = |k: &str| p[k].as_i64();
        v.cpus.push([
            id("socket-id"),
            id("die-id"),
            id("cluster-id"),
            id("core-id"),
            id("thread-id"),
        ]);
    }
    let mem = run(conn, pid, "query-memdev", None).await?;
    for m in mem
        .as_array()
        .ok_or_else(|| bad("query-memdev", pid, "not a list"))?
    {
        v.memdevs.push((
            m["id"].as_str().unwrap_or("").to_string(),
            m["size"].as_u64().unwrap_or(0),
            m["share"].as_bool().unwrap_or(false),
        ));
    }
    v.objects = children(conn, pid, "/objects").await?;
    for (base, named) in [
        ("/machine/peripheral", true),
        ("/machine/peripheral-anon", false),
    ] {
        for (child, ty) in children(conn, pid, base).await? {
            let path = format!("{base}/{child}");
            let mut d = QomDevice {
                id: named.then(|| child.clone()),
                type_name: ty.clone(),
                ..Default::default()
            };
            let get = |prop: &'static str| {
                let path = path.clone();
                async move {
                    conn.execute_raw_timeout(
                        "qom-get",
                        Some(json!({"path": path, "property": prop})),
                        QUERY_TIMEOUT,
                    )
                    .await
                    .ok()
                }
            };
            d.addr = get("addr").await.and_then(|a| a.as_i64());
            if ty == "virtio-net-pci" {
                for prop in ["mac", "romfile", "netdev"] {
                    if let Some(val) = get(prop).await {
                        d.props.insert(prop.to_string(), val);
                    }
                }
            }
            d.path = path;
            v.devices.push(d);
        }
    }
    // Anonymous devices in creation order (device[0], device[1], ...).
    v.devices.sort_by_key(|d| {
        let n = d
            .path
            .rsplit_once("device[")
            .and_then(|(_, n)| n.trim_end_matches(']').parse::<u64>().ok());
        (d.id.is_some(), n)
    });
    let blocks = run(conn, pid, "query-block", None).await?;
    for b in blocks
        .as_array()
        .ok_or_else(|| bad("query-block", pid, "not a list"))?
    {
        let ins = &b["inserted"];
        v.blocks.push(BlockView {
            device: b["device"].as_str().unwrap_or("").to_string(),
            qdev: b["qdev"].as_str().map(str::to_string),
            node_name: ins["node-name"].as_str().map(str::to_string),
            file: ins["file"].as_str().map(str::to_string),
            drv: ins["drv"].as_str().map(str::to_string),
            ro: ins["ro"].as_bool().unwrap_or(false),
            direct: ins["cache"]["direct"].as_bool().unwrap_or(false),
        });
    }
    let pci = run(conn, pid, "query-pci", None).await?;
    for bus in pci
        .as_array()
        .ok_or_else(|| bad("query-pci", pid, "not a list"))?
    {
        for d in bus["devices"].as_array().into_iter().flatten() {
            v.pci.push(PciFunction {
                bus: d["bus"].as_i64().unwrap_or(-1),
                slot: d["slot"].as_i64().unwrap_or(-1),
                function: d["function"].as_i64().unwrap_or(-1),
                vendor: d["id"]["vendor"].as_i64().unwrap_or(-1),
                device: d["id"]["device"].as_i64().unwrap_or(-1),
                desc: d["class_info"]["desc"].as_str().unwrap_or("").to_string(),
                rom: d["regions"]
                    .as_array()
                    .is_some_and(|r| r.iter().any(|r| r["bar"].as_i64() == Some(6))),
            });
            if d.get("pci_bridge").is_some() {
                return Err(bad(
                    "query-pci",
                    pid,
                    "a PCI bridge (its buses are not read)",
                ));
            }
        }
    }
    let cds = run(conn, pid, "query-chardev", None).await?;
    for c in cds
        .as_array()
        .ok_or_else(|| bad("query-chardev", pid, "not a list"))?
    {
        v.chardevs.push((
            c["label"].as_str().unwrap_or("").to_string(),
            c["filename"].as_str().unwrap_or("").to_string(),
        ));
    }
    let disp = run(conn, pid, "query-display-options", None).await?;
    v.display = disp["type"].as_str().unwrap_or("unknown").to_string();
    Ok(v)
}

/// The children of a QOM container: (name, type) for `child<TYPE>` ones.
async fn children(conn: &Qmp, pid: i32, path: &str) -> Result<Vec<(String, String)>, AdoptError> {
    let list = run(conn, pid, "qom-list", Some(json!({"path": path}))).await?;
    let mut out = Vec::new();
    for p in list
        .as_array()
        .ok_or_else(|| bad("qom-list", pid, "not a list"))?
    {
        let ty = p["type"].as_str().unwrap_or("");
        if let Some(t) = ty.strip_prefix("child<").and_then(|t| t.strip_suffix('>')) {
            out.push((p["name"].as_str().unwrap_or("").to_string(), t.to_string()));
        }
    }
    Ok(out)
}

/// Where a definition the user gave differs from what was learned: one
/// line per field, naming both values.
pub fn check_definition(given: &Definition, learned: &Definition) -> Vec<String> {
    let mut m = Vec::new();
    let mut cmp = |field: &str, g: String, l: String| {
        if g != l {
            m.push(format!(
                "{field}: the definition says {g}, the guest has {l}"
            ));
        }
    };
    cmp("name", given.name.clone(), learned.name.clone());
    if given.machine != learned.machine {
        let why = if crate::domain::definition::is_machine_alias(&given.machine) {
            " (an alias qlive would pin to its emulator's newest type)"
        } else {
            ""
        };
        m.push(format!(
            "machine: the definition says {}{why}, the guest runs {}",
            given.machine, learned.machine
        ));
    }
    let mut cmp = |field: &str, g: String, l: String| {
        if g != l {
            m.push(format!(
                "{field}: the definition says {g}, the guest has {l}"
            ));
        }
    };
    if let Some(u) = learned.uuid {
        cmp(
            "uuid",
            format!("{:?}", given.uuid),
            format!("{:?}", Some(u)),
        );
    }
    if given.accel != crate::domain::definition::Accel::Auto {
        cmp(
            "accel",
            given.accel.as_str().into(),
            learned.accel.as_str().into(),
        );
    }
    cmp("vcpus", given.vcpus.to_string(), learned.vcpus.to_string());
    cmp(
        "topology",
        format!("{:?}", given.topology),
        format!("{:?}", learned.topology),
    );
    cmp(
        "memory_mib",
        given.memory_mib.to_string(),
        learned.memory_mib.to_string(),
    );
    cmp(
        "cpu",
        format!("{:?}", given.cpu),
        format!("{:?}", learned.cpu),
    );
    cmp(
        "hugepages",
        format!("{:?}", given.hugepages.map(|h| h.as_str())),
        "None".into(),
    );
    cmp(
        "firmware",
        given.firmware.as_str().into(),
        learned.firmware.as_str().into(),
    );
    if given.firmware == Firmware::Uefi {
        cmp(
            "firmware_code",
            format!("{:?}", given.firmware_code),
            format!("{:?}", learned.firmware_code),
        );
        cmp(
            "secure_boot",
            given.secure_boot.to_string(),
            learned.secure_boot.to_string(),
        );
    }
    cmp(
        "kernel",
        format!("{:?}", given.kernel),
        format!("{:?}", learned.kernel),
    );
    cmp(
        "initrd",
        format!("{:?}", given.initrd),
        format!("{:?}", learned.initrd),
    );
    cmp(
        "cmdline",
        format!("{:?}", given.cmdline),
        format!("{:?}", learned.cmdline),
    );
    cmp("guest_agent", given.guest_agent.to_string(), "false".into());
    cmp("vnc", given.vnc.to_string(), "false".into());
    cmp(
        "extra_args",
        format!("{:?}", given.extra_args),
        format!("{:?}", learned.extra_args),
    );
    cmp(
        "disks (count)",
        given.disks.len().to_string(),
        learned.disks.len().to_string(),
    );
    for (i, (g, l)) in given.disks.iter().zip(&learned.disks).enumerate() {
        cmp(
            &format!("disks[{i}].path"),
            g.path.display().to_string(),
            l.path.display().to_string(),
        );
        cmp(
            &format!("disks[{i}].format"),
            g.format.as_str().into(),
            l.format.as_str().into(),
        );
        cmp(
            &format!("disks[{i}].readonly"),
            g.readonly.to_string(),
            l.readonly.to_string(),
        );
        cmp(
            &format!("disks[{i}].cache"),
            g.cache.as_str().into(),
            l.cache.as_str().into(),
        );
        cmp(
            &format!("disks[{i}].aio"),
            g.aio.as_str().into(),
            l.aio.as_str().into(),
        );
    }
    cmp(
        "nics (count)",
        given.nics.len().to_string(),
        learned.nics.len().to_string(),
    );
    for (i, (g, l)) in given.nics.iter().zip(&learned.nics).enumerate() {
        match &g.mac {
            Some(mac) if mac.eq_ignore_ascii_case(l.mac()) => {}
            Some(mac) => cmp(&format!("nics[{i}].mac"), mac.clone(), l.mac().into()),
            None => cmp(
                &format!("nics[{i}].mac"),
                "none (qlive would generate one)".into(),
                l.mac().into(),
            ),
        }
        // The guest moves onto a tap of qlive's (agent::adopt): the tap's
        // name is the host's choice, the bridge is what the guest's
        // network depends on.
        match (&l.tap, &g.tap) {
            (Some(lt), Some(t)) => cmp(&format!("nics[{i}].tap"), t.clone(), lt.clone()),
            (Some(lt), None) => cmp(
                &format!("nics[{i}].tap"),
                "none (qlive would name one)".into(),
                lt.clone(),
            ),
            (None, _) => {}
        }
        cmp(
            &format!("nics[{i}].bridge"),
            g.bridge.clone().unwrap_or_else(|| "none".into()),
            l.bridge.clone().unwrap_or_else(|| "none".into()),
        );
        cmp(
            &format!("nics[{i}].queues"),
            g.queues().to_string(),
            "1".into(),
        );
    }
    m
}
