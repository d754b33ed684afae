//! From what a foreign QEMU shows (its argv from `/proc/PID/cmdline`, and
//! its answers to QMP queries, gathered by [`super::inspect`]) to a qlive
//! [`Definition`] plus the facts a migration into qlive needs, or every
//! refusal at once. Pure: no I/O, unit-tested with hand-made views.
//!
//! The rule is: what is not positively understood is refused, never
//! dropped. The command line says how each device was configured; QMP says
//! what QEMU really has (the exact machine type, the devices in QOM and on
//! the PCI bus, the block nodes, chardevs, memory backends), and each of
//! those must be accounted for by an option this module understood.

use super::opts::{parse_opts, parse_size, shorten, split_argv, CmdOpt, Props, SplitProblem};
use super::{AdoptFacts, DiskFacts, Learned, NicFacts, RamFacts, Refusal, TapSource};
use crate::domain::definition::{is_versioned_machine, Definition};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What `/proc/PID` shows of the foreign QEMU.
#[derive(Debug, Clone, Default)]
pub struct ProcView {
    pub pid: i32,
    /// `/proc/PID/exe`.
    pub exe: PathBuf,
    /// `/proc/PID/cmdline`, without argv[0].
    pub argv: Vec<String>,
    /// `/proc/PID/cwd`, against which relative paths on its command line
    /// were opened (None: not known, so relative paths are refused).
    pub cwd: Option<PathBuf>,
    /// The process's tap fds (`/dev/net/tun`): fd number to interface
    /// name (`iff:` in `/proc/PID/fdinfo/N`).
    pub taps: BTreeMap<i32, String>,
    /// QEMU's user config files that exist on this host (read at start
    /// unless `-no-user-config`).
    pub user_config: Vec<PathBuf>,
}

/// One QOM device the user created (`/machine/peripheral/ID` or
/// `/machine/peripheral-anon/device[N]`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QomDevice {
    pub path: String,
    /// The qdev id (`/machine/peripheral/<id>`), None when anonymous.
    pub id: Option<String>,
    pub type_name: String,
    /// PCI devfn (`addr`), for PCI devices.
    pub addr: Option<i64>,
    /// Properties read with `qom-get` (`mac`, `romfile`, `drive`, `netdev`).
    pub props: BTreeMap<String, Value>,
}

/// One function on a PCI bus (`query-pci`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PciFunction {
    pub bus: i64,
    pub slot: i64,
    pub function: i64,
    pub vendor: i64,
    pub device: i64,
    pub desc: String,
    /// An option ROM BAR (bar 6).
    pub rom: bool,
}

impl PciFunction {
    fn addr(&self) -> String {
        format!("{:02x}:{:02x}.{:x}", self.bus, self.slot, self.function)
    }
}

/// One block backend (`query-block`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BlockView {
    /// The BlockBackend name (`-drive id=`); empty for `-blockdev`.
    pub device: String,
    /// The QOM path of the device it is attached to.
    pub qdev: Option<String>,
    /// Top node name, when a medium is inserted.
    pub node_name: Option<String>,
    pub file: Option<String>,
    pub drv: Option<String>,
    pub ro: bool,
    pub direct: bool,
}

/// What the foreign QEMU answered over QMP.
#[derive(Debug, Clone, Default)]
pub struct QmpView {
    pub version: String,
    pub package: String,
    /// `qom-get /machine type`, e.g. `pc-q35-7.2-machine`.
    pub machine_type: String,
    pub status: String,
    pub kvm_enabled: bool,
    /// (socket, die, cluster, core, thread) of each vCPU; None when absent.
    pub cpus: Vec<[Option<i64>; 5]>,
    /// `query-memdev`: (id, size, share).
    pub memdevs: Vec<(String, u64, bool)>,
    /// `/objects` children: (name, type).
    pub objects: Vec<(String, String)>,
    pub devices: Vec<QomDevice>,
    pub blocks: Vec<BlockView>,
    pub pci: Vec<PciFunction>,
    /// `query-chardev`: (label, filename).
    pub chardevs: Vec<(String, String)>,
    /// `query-display-options` type.
    pub display: String,
}

/// PCI functions of the chipset itself, by machine family: (slot,
/// function, vendor, device). Anything else on the bus came from an
/// option and must be one the learner understood.
const Q35_CHIPSET: &[(i64, i64, i64, i64)] = &[
    (0, 0, 0x8086, 0x29c0),
    (0x1f, 0, 0x8086, 0x2918),
    (0x1f, 2, 0x8086, 0x2922),
    (0x1f, 3, 0x8086, 0x2930),
];
const I440FX_CHIPSET: &[(i64, i64, i64, i64)] = &[
    (0, 0, 0x8086, 0x1237),
    (1, 0, 0x8086, 0x7000),
    (1, 1, 0x8086, 0x7010),
    (1, 3, 0x8086, 0x7113),
];

/// Options that only concern the host side of the process (its name,
/// pidfile, logging, daemonizing, start paused): a qlive instance has its
/// own; the guest sees none of them.
const HOST_ONLY: &[&str] = &[
    "name",
    "pidfile",
    "daemonize",
    "D",
    "msg",
    "S",
    "no-user-config",
    "sandbox",
    "no-shutdown",
];

/// One NIC's or disk's device as learned from the command line.
#[derive(Debug, Clone)]
struct DevSpec {
    kind: DevKind,
    id: Option<String>,
    shown: String,
}

#[derive(Debug, Clone)]
enum DevKind {
    Blk {
        backend: String,
        write_cache: Option<bool>,
        bootindex: Option<String>,
    },
    Net {
        netdev: String,
        mac: Option<String>,
        romfile: Option<String>,
    },
}

#[derive(Debug, Clone, Default)]
struct DriveSpec {
    id: String,
    file: Option<String>,
    format: Option<String>,
    readonly: bool,
    cache: Option<String>,
    aio: Option<String>,
    shown: String,
}

#[derive(Debug, Clone, Default)]
struct NodeSpec {
    driver: String,
    /// file node: its filename; format node: its `file` child's name.
    child: String,
    readonly: bool,
    direct: Option<bool>,
    aio: Option<String>,
    shown: String,
}

#[derive(Debug, Clone, Default)]
struct TapSpec {
    ifname: Option<String>,
    fd: Option<i32>,
    shown: String,
}

#[derive(Debug, Clone, Default)]
struct BackendSpec {
    qom_type: String,
    size: Option<u64>,
    share: bool,
    mem_path: Option<String>,
    shown: String,
}

#[derive(Debug, Clone, Default)]
struct ChardevSpec {
    backend: String,
    path: Option<String>,
    shown: String,
}

/// Everything the command line said, gathered before it is assembled.
#[derive(Debug, Default)]
struct Cmdline {
    machine: Props,
    machine_shown: Vec<String>,
    memory: Option<u64>,
    smp: Option<(u32, Option<[u32; 3]>)>,
    cpu: Option<String>,
    accel: Option<&'static str>,
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    append: Option<String>,
    uuid: Option<String>,
    bios: Option<PathBuf>,
    pflash: BTreeMap<u32, (String, bool, String)>,
    secure_flash: bool,
    drives: Vec<DriveSpec>,
    nodes: BTreeMap<String, NodeSpec>,
    devices: Vec<DevSpec>,
    taps: BTreeMap<String, TapSpec>,
    backends: BTreeMap<String, BackendSpec>,
    serial: Vec<String>,
    chardevs: BTreeMap<String, ChardevSpec>,
    /// Chardev ids of control monitors (`-mon chardev=X,mode=control`),
    /// and the socket paths of `-qmp unix:PATH`.
    monitor_chardevs: Vec<(String, String)>,
    qmp_paths: Vec<(String, String)>,
    nodefaults: bool,
    no_user_config: bool,
    display_none: bool,
    data_dirs: Vec<String>,
    no_reboot: bool,
}

struct Learner<'a> {
    proc_: &'a ProcView,
    qmp_socket: &'a Path,
    refused: Vec<Refusal>,
    notes: Vec<String>,
}

impl Learner<'_> {
    fn refuse(&mut self, what: impl Into<String>, why: impl Into<String>) {
        self.refused.push(Refusal {
            what: what.into(),
            why: why.into(),
        });
    }

    /// Refuse every key of `p` the learner did not take.
    fn leftover(&mut self, shown: &str, p: &Props) {
        for kv in p.leftover() {
            self.refuse(
                format!("{shown}: {kv}"),
                "an option qlive's definition format cannot reproduce",
            );
        }
    }

    fn opts(&mut self, o: &CmdOpt, implied: Option<&str>) -> Option<Props> {
        let arg = o.arg.as_deref().unwrap_or("");
        match parse_opts(arg, implied) {
            Ok(p) => Some(p),
            Err(e) => {
                self.refuse(o.shown(), format!("unreadable: {e}"));
                None
            }
        }
    }

    /// An absolute path, or one relative to the process's working
    /// directory when that is known.
    fn path(&mut self, shown: &str, p: &str) -> Option<PathBuf> {
        let pb = PathBuf::from(p);
        if pb.is_absolute() {
            return Some(pb);
        }
        match &self.proc_.cwd {
            Some(cwd) => Some(cwd.join(pb)),
            None => {
                self.refuse(
                    shown.to_string(),
                    format!(
                        "relative path {p:?}, and the directory QEMU resolved it in is not known (-daemonize changes it)"
                    ),
                );
                None
            }
        }
    }
}

/// Learn the foreign QEMU's configuration as a definition named `name`.
pub fn learn(
    name: &str,
    proc_: &ProcView,
    q: &QmpView,
    qmp_socket: &Path,
) -> Result<Learned, Vec<Refusal>> {
    let mut l = Learner {
        proc_,
        qmp_socket,
        refused: Vec::new(),
        notes: Vec::new(),
    };
    let c = read_cmdline(&mut l);
    let learned = assemble(&mut l, &c, q, name);
    if !l.refused.is_empty() {
        return Err(l.refused);
    }
    match learned {
        Some(x) => Ok(x),
        None => Err(vec![Refusal {
            what: "the learned configuration".into(),
            why: "incomplete (a bug: no refusal says why)".into(),
        }]),
    }
}

fn read_cmdline(l: &mut Learner<'_>) -> Cmdline {
    let (opts, problems) = split_argv(&l.proc_.argv);
    for p in problems {
        match p {
            SplitProblem::Positional { at, arg } => l.refuse(
                format!("argument {at} {:?}", shorten(&arg)),
                "a bare image path (QEMU's -hda shorthand: an IDE disk)",
            ),
            SplitProblem::MissingArg { at, name } => l.refuse(
                format!("-{name} (argument {at})"),
                "its argument is missing",
            ),
        }
    }
    let mut c = Cmdline::default();
    for o in &opts {
        let shown = o.shown();
        let arg = o.arg.clone().unwrap_or_default();
        if !o.known {
            l.refuse(shown, "an option qlive does not know");
            continue;
        }
        match o.name.as_str() {
            n if HOST_ONLY.contains(&n) => {}
            "machine" | "M" => {
                let Some(p) = l.opts(o, Some("type")) else {
                    continue;
                };
                if c.machine_shown.is_empty() {
                    c.machine = p;
                } else {
                    l.refuse(shown.clone(), "a second -machine option (QEMU merges them; write one)");
                }
                c.machine_shown.push(shown);
            }
            "m" => {
                let Some(mut p) = l.opts(o, Some("size")) else {
                    continue;
                };
                match p.take("size").map(|s| (parse_size(&s, 1 << 20), s)) {
                    Some((Some(b), _)) => c.memory = Some(b),
                    Some((None, s)) => l.refuse(shown.clone(), format!("size {s:?} unreadable")),
                    None => {}
                }
                l.leftover(&shown, &p);
            }
            "smp" => {
                let Some(mut p) = l.opts(o, Some("cpus")) else {
                    continue;
                };
                let num = |p: &mut Props, k: &str, l: &mut Learner<'_>| -> Option<u32> {
                    let v = p.take(k)?;
                    match v.parse::<u32>() {
                        Ok(n) => Some(n),
                        Err(_) => {
                            l.refuse(format!("{shown}: {k}={v}"), "not a number");
                            None
                        }
                    }
                };
                let cpus = num(&mut p, "cpus", l);
                let maxcpus = num(&mut p, "maxcpus", l);
                let s = num(&mut p, "sockets", l);
                let co = num(&mut p, "cores", l);
                let t = num(&mut p, "threads", l);
                for k in ["dies", "clusters"] {
                    if let Some(n) = num(&mut p, k, l) {
                        if n != 1 {
                            l.refuse(
                                format!("{shown}: {k}={n}"),
                                "qlive's topology is sockets, cores and threads",
                            );
                        }
                    }
                }
                l.leftover(&shown, &p);
                let cpus = cpus.or_else(|| match (s, co, t) {
                    (Some(s), Some(co), Some(t)) => Some(s * co * t),
                    _ => None,
                });
                let Some(cpus) = cpus else {
                    l.refuse(shown, "the vCPU count is not given");
                    continue;
                };
                if maxcpus.is_some_and(|m| m != cpus) {
                    l.refuse(
                        format!("{shown}: maxcpus"),
                        "CPU hotplug (maxcpus above cpus) is not in qlive's definition format",
                    );
                }
                let topo = (s.is_some() || co.is_some() || t.is_some()).then(|| {
                    // QEMU fills in what is missing; the real layout is
                    // taken from query-cpus-fast in assemble.
                    [s.unwrap_or(0), co.unwrap_or(0), t.unwrap_or(0)]
                });
                c.smp = Some((cpus, topo));
            }
            "cpu" => c.cpu = Some(arg),
            "accel" => {
                let Some(mut p) = l.opts(o, Some("accel")) else {
                    continue;
                };
                match p.take("accel").as_deref() {
                    Some("tcg") => c.accel = Some("tcg"),
                    Some("kvm") => c.accel = Some("kvm"),
                    other => l.refuse(
                        shown.clone(),
                        format!("accelerator {other:?}: qlive runs kvm or tcg"),
                    ),
                }
                l.leftover(&shown, &p);
            }
            "enable-kvm" => c.accel = Some("kvm"),
            "kernel" => c.kernel = l.path(&shown, &arg),
            "initrd" => c.initrd = l.path(&shown, &arg),
            "append" => c.append = Some(arg),
            "uuid" => c.uuid = Some(arg),
            "bios" => c.bios = l.path(&shown, &arg),
            "L" => c.data_dirs.push(arg),
            "no-reboot" => c.no_reboot = true,
            "nodefaults" => c.nodefaults = true,
            "nographic" => c.display_none = true,
            "display" => {
                let Some(mut p) = l.opts(o, Some("type")) else {
                    continue;
                };
                if p.take("type").as_deref() == Some("none") {
                    c.display_none = true;
                } else {
                    l.refuse(
                        shown.clone(),
                        "a display QEMU opens itself (qlive runs -display none; its VNC is `vnc: true`, not learned yet)",
                    );
                }
                l.leftover(&shown, &p);
            }
            "vnc" => l.refuse(
                shown,
                "a VNC server QEMU binds itself (qlive's is `vnc: true` with an agent-owned socket; not learned yet)",
            ),
            "global" => {
                if arg == "driver=cfi.pflash01,property=secure,value=on" {
                    c.secure_flash = true;
                } else {
                    l.refuse(shown, "a global device property qlive does not set");
                }
            }
            "drive" => read_drive(l, &mut c, o),
            "blockdev" => {
                let Some(mut p) = l.opts(o, None) else {
                    continue;
                };
                let driver = p.take("driver").unwrap_or_default();
                let Some(node) = p.take("node-name") else {
                    l.refuse(shown, "a block node without node-name");
                    continue;
                };
                let child = match driver.as_str() {
                    "file" => p.take("filename"),
                    "raw" | "qcow2" => p.take("file"),
                    _ => {
                        l.refuse(
                            shown,
                            format!("block driver {driver:?}: qlive's disks are raw or qcow2 images in files"),
                        );
                        continue;
                    }
                };
                let Some(child) = child else {
                    l.refuse(shown, "a block node without its file");
                    continue;
                };
                let readonly = p.take_bool("read-only").unwrap_or_else(|kv| {
                    l.refuse(format!("{shown}: {kv}"), "unreadable");
                    None
                });
                let direct = p.take_bool("cache.direct").unwrap_or_else(|kv| {
                    l.refuse(format!("{shown}: {kv}"), "unreadable");
                    None
                });
                if let Ok(Some(true)) = p.take_bool("cache.no-flush") {
                    l.refuse(
                        format!("{shown}: cache.no-flush=on"),
                        "qlive always honours flushes",
                    );
                }
                let aio = if driver == "file" { p.take("aio") } else { None };
                l.leftover(&shown, &p);
                c.nodes.insert(
                    node,
                    NodeSpec {
                        driver,
                        child,
                        readonly: readonly.unwrap_or(false),
                        direct,
                        aio,
                        shown,
                    },
                );
            }
            "device" => {
                let Some(mut p) = l.opts(o, Some("driver")) else {
                    continue;
                };
                let driver = p.take("driver").unwrap_or_default();
                let id = p.take("id");
                let kind = match driver.as_str() {
                    "virtio-blk-pci" => {
                        let Some(backend) = p.take("drive") else {
                            l.refuse(shown, "a virtio-blk-pci without drive=");
                            continue;
                        };
                        let write_cache = match p.take("write-cache").as_deref() {
                            None | Some("auto") => None,
                            Some("on") => Some(true),
                            Some("off") => Some(false),
                            Some(v) => {
                                l.refuse(format!("{shown}: write-cache={v}"), "unreadable");
                                None
                            }
                        };
                        DevKind::Blk {
                            backend,
                            write_cache,
                            bootindex: p.take("bootindex"),
                        }
                    }
                    "virtio-net-pci" => {
                        let Some(netdev) = p.take("netdev") else {
                            l.refuse(shown, "a virtio-net-pci without netdev=");
                            continue;
                        };
                        DevKind::Net {
                            netdev,
                            mac: p.take("mac"),
                            romfile: p.take("romfile"),
                        }
                    }
                    _ => {
                        l.refuse(
                            format!("-device {}", shorten(&driver)),
                            "device not in qlive's definition format",
                        );
                        continue;
                    }
                };
                l.leftover(&shown, &p);
                c.devices.push(DevSpec { kind, id, shown });
            }
            "netdev" => {
                let Some(mut p) = l.opts(o, Some("type")) else {
                    continue;
                };
                let ty = p.take("type").unwrap_or_default();
                let id = p.take("id").unwrap_or_default();
                if ty != "tap" {
                    l.refuse(format!("-netdev {ty}"), "only tap backends");
                    continue;
                }
                let ifname = p.take("ifname");
                let fd = p.take("fd");
                let script = p.take("script");
                let downscript = p.take("downscript");
                let vhost = p.take_bool("vhost").unwrap_or(Some(true));
                if vhost == Some(true) {
                    l.refuse(format!("{shown}: vhost"), "vhost-net (qlive's taps run vhost=off)");
                }
                if let Some(q) = p.take("queues") {
                    if q != "1" {
                        l.refuse(format!("{shown}: queues={q}"), "a multi-queue tap (not learned yet)");
                    }
                }
                if p.get("fds").is_some() {
                    l.refuse(format!("{shown}: fds"), "a multi-queue tap (not learned yet)");
                    p.take("fds");
                }
                let fd = match fd.map(|f| f.parse::<i32>()) {
                    Some(Ok(f)) => Some(f),
                    Some(Err(_)) => {
                        l.refuse(format!("{shown}: fd"), "not an fd number (a named fd of the monitor?)");
                        None
                    }
                    None => None,
                };
                if fd.is_none() {
                    // QEMU runs the down script when it exits, which the
                    // end of an adoption makes it do while the tap goes
                    // on carrying the guest.
                    if downscript.as_deref() != Some("no") {
                        l.refuse(
                            format!("{shown}: downscript"),
                            "QEMU runs a down script on its tap when it exits, as it would after adoption while qlive keeps the tap (start it with downscript=no)",
                        );
                    }
                    if script.as_deref() != Some("no") {
                        l.notes.push(format!(
                            "{}: QEMU ran an up script when it started; qlive runs none",
                            shorten(&shown)
                        ));
                    }
                }
                l.leftover(&shown, &p);
                c.taps.insert(id, TapSpec { ifname, fd, shown });
            }
            "object" => {
                let Some(mut p) = l.opts(o, Some("qom-type")) else {
                    continue;
                };
                let ty = p.take("qom-type").unwrap_or_default();
                let id = p.take("id").unwrap_or_default();
                if !matches!(
                    ty.as_str(),
                    "memory-backend-ram" | "memory-backend-file" | "memory-backend-memfd"
                ) {
                    l.refuse(format!("-object {ty},id={id}"), "an object qlive does not create");
                    continue;
                }
                let size = p.take("size").and_then(|s| parse_size(&s, 1));
                let share = p.take_bool("share").unwrap_or(None).unwrap_or(false);
                let mem_path = p.take("mem-path");
                for k in ["merge", "dump", "prealloc", "reserve"] {
                    // Host-side page handling, not guest-visible.
                    p.take(k);
                }
                l.leftover(&shown, &p);
                c.backends.insert(
                    id,
                    BackendSpec {
                        qom_type: ty,
                        size,
                        share,
                        mem_path,
                        shown,
                    },
                );
            }
            "serial" => c.serial.push(arg),
            "chardev" => {
                let Some(mut p) = l.opts(o, Some("backend")) else {
                    continue;
                };
                let backend = p.take("backend").unwrap_or_default();
                let id = p.take("id").unwrap_or_default();
                let path = p.take("path");
                // The rest is host-side socket and log handling.
                c.chardevs.insert(
                    id.clone(),
                    ChardevSpec {
                        shown: format!("-chardev {backend},id={id}"),
                        backend,
                        path,
                    },
                );
            }
            "mon" => {
                let Some(mut p) = l.opts(o, Some("chardev")) else {
                    continue;
                };
                let cd = p.take("chardev").unwrap_or_default();
                let mode = p.take("mode").unwrap_or_else(|| "readline".into());
                p.take("pretty");
                if mode != "control" {
                    l.refuse(shown.clone(), "a human monitor (HMP)");
                }
                l.leftover(&shown, &p);
                c.monitor_chardevs.push((cd, shown));
            }
            "qmp" | "qmp-pretty" => match arg.strip_prefix("unix:") {
                Some(rest) => {
                    let path = rest.split(',').next().unwrap_or("").to_string();
                    c.qmp_paths.push((path, shown));
                }
                None => l.refuse(shown, "a QMP monitor not on a unix socket"),
            },
            "monitor" if arg == "none" => {}
            "monitor" => l.refuse(shown, "a human monitor (HMP)"),
            _ => l.refuse(shown, "not learned by qlive adopt"),
        }
    }
    c.no_user_config = opts.iter().any(|o| o.name == "no-user-config");
    c
}

fn read_drive(l: &mut Learner<'_>, c: &mut Cmdline, o: &CmdOpt) {
    let shown = o.shown();
    let Some(mut p) = l.opts(o, None) else {
        return;
    };
    let iface = p.take("if").unwrap_or_else(|| "ide".into());
    let file = p.take("file");
    let format = p.take("format");
    let readonly = match p.take_bool("readonly") {
        Ok(r) => r.unwrap_or(false),
        Err(kv) => {
            l.refuse(format!("{shown}: {kv}"), "unreadable");
            false
        }
    };
    if let Some(m) = p.take("media") {
        if m != "disk" {
            l.refuse(format!("{shown}: media={m}"), "only disks");
        }
    }
    match iface.as_str() {
        "pflash" => {
            let unit = p
                .take("unit")
                .and_then(|u| u.parse::<u32>().ok())
                .unwrap_or(c.pflash.len() as u32);
            if format.as_deref() != Some("raw") {
                l.refuse(
                    format!("{shown}: format"),
                    "a pflash image qlive opens as raw",
                );
            }
            let Some(file) = file.and_then(|f| l.path(&shown, &f)) else {
                l.refuse(shown, "a pflash drive without a file");
                return;
            };
            l.leftover(&shown, &p);
            c.pflash
                .insert(unit, (file.to_string_lossy().into_owned(), readonly, shown));
        }
        "none" => {
            let Some(id) = p.take("id") else {
                l.refuse(shown, "a drive without id= that no device can name");
                return;
            };
            let file = match file {
                Some(f) => l.path(&shown, &f).map(|p| p.to_string_lossy().into_owned()),
                None => {
                    l.refuse(shown.clone(), "a drive without an image");
                    None
                }
            };
            let cache = p.take("cache");
            let aio = p.take("aio");
            l.leftover(&shown, &p);
            c.drives.push(DriveSpec {
                id,
                file,
                format,
                readonly,
                cache,
                aio,
                shown,
            });
        }
        other => l.refuse(
            format!("-drive if={other}"),
            "qlive's disks are virtio-blk-pci devices on if=none drives or -blockdev nodes",
        ),
    }
}

/// (the `disks[]` entry, facts) of the backend a virtio-blk-pci names.
fn disk_of(
    l: &mut Learner<'_>,
    c: &Cmdline,
    q: &QmpView,
    dev: &DevSpec,
    backend: &str,
    write_cache: Option<bool>,
) -> Option<Value> {
    // (path, format, readonly, direct, aio, legacy cache mode)
    let (path, format, readonly, direct, aio, cache_mode) =
        if let Some(d) = c.drives.iter().find(|d| d.id == backend) {
            let format = d.format.clone().or_else(|| {
                q.blocks
                    .iter()
                    .find(|b| b.device == d.id)
                    .and_then(|b| b.drv.clone())
            });
            (
                d.file.clone()?,
                format,
                d.readonly,
                None,
                d.aio.clone(),
                Some(d.cache.clone().unwrap_or_else(|| "writeback".into())),
            )
        } else if let Some(fmt) = c.nodes.get(backend) {
            let Some(file) = c.nodes.get(&fmt.child).filter(|n| n.driver == "file") else {
                l.refuse(
                    fmt.shown.clone(),
                    "a format node whose file is not a `file` node given with -blockdev",
                );
                return None;
            };
            if fmt.driver == "file" {
                l.refuse(
                    dev.shown.clone(),
                    "a disk without a format node (raw or qcow2)",
                );
                return None;
            }
            if fmt.readonly != file.readonly
                || fmt.direct.unwrap_or(false) != file.direct.unwrap_or(false)
            {
                l.refuse(
                    fmt.shown.clone(),
                    "its format and file nodes differ in read-only or cache.direct",
                );
            }
            let path = l.path(&file.shown, &file.child)?;
            (
                path.to_string_lossy().into_owned(),
                Some(fmt.driver.clone()),
                fmt.readonly,
                Some(file.direct.unwrap_or(false)),
                file.aio.clone(),
                None,
            )
        } else {
            l.refuse(
                dev.shown.clone(),
                format!("drive {backend:?} is not on the command line"),
            );
            return None;
        };
    let format = match format.as_deref() {
        Some(f @ ("raw" | "qcow2")) => f.to_string(),
        other => {
            l.refuse(
                dev.shown.clone(),
                format!("image format {other:?}: qlive's disks are raw or qcow2"),
            );
            return None;
        }
    };
    // qlive's cache modes are QEMU's legacy ones: (direct, write cache).
    let cache = match cache_mode {
        Some(m) => {
            let flags = match m.as_str() {
                "writeback" => (false, true),
                "none" => (true, true),
                "writethrough" => (false, false),
                "directsync" => (true, false),
                _ => {
                    l.refuse(
                        dev.shown.clone(),
                        format!("cache={m} (flushes ignored or unknown)"),
                    );
                    return None;
                }
            };
            if write_cache.is_some_and(|w| w != flags.1) {
                l.refuse(
                    dev.shown.clone(),
                    format!("write-cache differs from what cache={m} gives the guest"),
                );
            }
            m
        }
        None => match (direct.unwrap_or(false), write_cache.unwrap_or(true)) {
            (false, true) => "writeback".into(),
            (true, true) => "none".into(),
            (false, false) => "writethrough".into(),
            (true, false) => "directsync".into(),
        },
    };
    let aio = aio.unwrap_or_else(|| "threads".into());
    if !matches!(aio.as_str(), "threads" | "native" | "io_uring") {
        l.refuse(dev.shown.clone(), format!("aio={aio}"));
    }
    // What QEMU has open must be what the command line says.
    let qdev_of = |b: &&BlockView| b.device == backend || b.node_name.as_deref() == Some(backend);
    match q.blocks.iter().find(qdev_of) {
        Some(b) => {
            let file_ok = b.file.as_deref() == Some(path.as_str());
            let drv_ok = b.drv.as_deref() == Some(format.as_str());
            if !file_ok || !drv_ok || b.ro != readonly {
                l.refuse(
                    dev.shown.clone(),
                    format!(
                        "QEMU has {:?} ({:?}, read-only {}) open, not what the command line says (changed over QMP?)",
                        b.file, b.drv, b.ro
                    ),
                );
            }
        }
        None => l.refuse(
            dev.shown.clone(),
            "QEMU reports no such block backend (removed over QMP?)",
        ),
    }
    Some(json!({
        "path": path, "format": format, "readonly": readonly, "cache": cache, "aio": aio,
    }))
}

fn assemble(l: &mut Learner<'_>, c: &Cmdline, q: &QmpView, name: &str) -> Option<Learned> {
    if !c.nodefaults {
        l.refuse(
            "no -nodefaults",
            "QEMU added its default devices (a VGA, a serial and a parallel port, a CD-ROM, a NIC, a monitor), which qlive does not create",
        );
    }
    if !c.no_user_config {
        for f in &l.proc_.user_config {
            l.refuse(
                format!("no -no-user-config, and {} exists", f.display()),
                "QEMU read options from it that are not on its command line",
            );
        }
    }
    if !matches!(q.status.as_str(), "running" | "paused") {
        l.refuse(
            format!("guest state {:?}", q.status),
            "only a running or paused guest is adopted",
        );
    }
    // Machine: the exact versioned type, from QOM.
    let mut machine_props = c.machine.clone();
    machine_props.take("type");
    let backend_id = machine_props.take("memory-backend");
    let accel_prop = machine_props.take("accel");
    let smm = machine_props.take("smm");
    for kv in machine_props.leftover() {
        l.refuse(
            format!("-machine {kv}"),
            "a machine option qlive's definition format cannot reproduce",
        );
    }
    let machine = q
        .machine_type
        .strip_suffix("-machine")
        .unwrap_or(&q.machine_type)
        .to_string();
    if !is_versioned_machine(&machine) {
        l.refuse(
            format!("machine {machine}"),
            "qlive runs versioned pc-q35-X.Y and pc-i440fx-X.Y machines",
        );
    }
    let q35 = machine.starts_with("pc-q35-");
    // Accelerator: what QEMU runs, checked against what was asked.
    // QEMU before 9.0 (upstream 03bfc2188f, "physmem: Fix migration dirty
    // bitmap coherency with TCG memory access") could lose a TCG guest's
    // writes to the dirty bitmap: plain QEMU 7.2 -> 7.2 damages busy
    // guests as well (make bench-adopt's floor).
    let tcg_loses_dirty_bits = |v: &str| {
        v.split('.')
            .next()
            .and_then(|m| m.parse::<u32>().ok())
            .is_some_and(|major| major < 9)
    };
    let accel = if q.kvm_enabled { "kvm" } else { "tcg" };
    if accel == "tcg" && tcg_loses_dirty_bits(&q.version) {
        l.notes.push(format!(
            "QEMU {} under TCG loses dirty bits of pages the guest writes while pre-copy syncs \
             the bitmap (a QEMU bug, fixed in 9.0): a guest that writes much memory during the \
             adoption may arrive damaged; under KVM the kernel tracks dirty pages",
            q.version
        ));
    }
    let asked = c.accel.map(str::to_string).or(accel_prop);
    if let Some(a) = &asked {
        if a != accel {
            l.refuse(format!("accelerator {a}"), format!("QEMU runs {accel}"));
        }
    }
    // vCPUs.
    let vcpus = q.cpus.len() as u32;
    let mut topology = None;
    match c.smp {
        Some((n, _)) if n != vcpus => l.refuse(
            format!("-smp {n}"),
            format!("QEMU reports {vcpus} vCPUs (hot-plugged or unplugged?)"),
        ),
        Some((_, Some(_))) => {
            let count = |i: usize| {
                q.cpus
                    .iter()
                    .filter_map(|c| c[i])
                    .max()
                    .map(|m| m as u32 + 1)
                    .unwrap_or(1)
            };
            let (s, d, cl, co, t) = (count(0), count(1), count(2), count(3), count(4));
            if d != 1 || cl != 1 || s * co * t != vcpus {
                l.refuse(
                    "-smp topology",
                    "QEMU's vCPU layout is not sockets x cores x threads",
                );
            } else {
                topology = Some(json!({"sockets": s, "cores": co, "threads": t}));
            }
        }
        _ => {}
    }
    if vcpus == 0 {
        l.refuse("query-cpus-fast", "QEMU reports no vCPUs");
    }
    // Guest RAM: the backend, the RAM block's name, and its size.
    let (ram, memory_bytes) = match &backend_id {
        Some(id) => match c.backends.get(id) {
            Some(b) => {
                let file_backed = b.qom_type == "memory-backend-file";
                let size = b.size.unwrap_or(0);
                (
                    RamFacts {
                        block: id.clone(),
                        backend: b.qom_type.clone(),
                        shared: b.share,
                        file_backed,
                        mem_path: b.mem_path.clone(),
                        size_bytes: size,
                    },
                    size,
                )
            }
            None => {
                l.refuse(
                    format!("-machine memory-backend={id}"),
                    "the backend is not on the command line (added over QMP?)",
                );
                return None;
            }
        },
        None => {
            let size = c.memory.unwrap_or(128 << 20);
            (
                RamFacts {
                    block: "pc.ram".into(),
                    backend: "memory-backend-ram".into(),
                    shared: false,
                    file_backed: false,
                    mem_path: None,
                    size_bytes: size,
                },
                size,
            )
        }
    };
    for (id, b) in &c.backends {
        if Some(id) != backend_id.as_ref() {
            l.refuse(
                b.shown.clone(),
                "a memory backend that is not the guest's RAM (NUMA, hotplug)",
            );
        }
    }
    if c.memory.is_some_and(|m| m != memory_bytes) {
        l.refuse("-m", "differs from the size of the memory backend");
    }
    match q.memdevs.as_slice() {
        [(id, size, share)] if *id == ram.block => {
            if *size != memory_bytes || *share != ram.shared {
                l.refuse(
                    format!("memory backend {id}"),
                    format!(
                        "QEMU reports {size} bytes, shared {share}, not what the command line says"
                    ),
                );
            }
        }
        other => {
            for (id, ..) in other.iter().filter(|(id, ..)| *id != ram.block) {
                l.refuse(
                    format!("memory backend {id}"),
                    "a memory backend that is not the guest's RAM",
                );
            }
            if !other.iter().any(|(id, ..)| *id == ram.block) {
                l.refuse(
                    format!("RAM block {}", ram.block),
                    "QEMU reports no such memory backend",
                );
            }
        }
    }
    for (obj, ty) in &q.objects {
        if *obj != ram.block {
            l.refuse(
                format!("object {obj} ({ty})"),
                "an object qlive does not create",
            );
        }
    }
    if memory_bytes % (1 << 20) != 0 {
        l.refuse("guest RAM", "not a whole number of MiB");
    }
    // Firmware.
    let mut firmware = json!({});
    match (c.pflash.get(&0), c.pflash.get(&1), c.pflash.len()) {
        (None, None, 0) => {}
        (Some((code, true, _)), Some((vars, false, _)), 2) => {
            if c.bios.is_some() {
                l.refuse("-bios", "together with pflash firmware");
            }
            firmware = json!({"firmware": "uefi", "firmware_code": code, "nvram_template": vars});
            let secure = c.secure_flash && smm.as_deref() == Some("on");
            if secure {
                firmware["secure_boot"] = true.into();
            } else if c.secure_flash {
                l.refuse(
                    "-global driver=cfi.pflash01,property=secure,value=on",
                    "without smm=on",
                );
            }
            l.notes.push(format!(
                "UEFI: the guest's variables are in {vars}; qlive gives each domain its own NVRAM, created from nvram_template at the first start, so the adoption must start it from this file"
            ));
        }
        _ => {
            for (_, _, shown) in c.pflash.values() {
                l.refuse(
                    shown.clone(),
                    "qlive's UEFI is a read-only code image at unit 0 and a writable VARS image at unit 1",
                );
            }
        }
    }
    if let Some(s) = &smm {
        if !(s == "on" && firmware.get("secure_boot").is_some()) {
            l.refuse(
                format!("-machine smm={s}"),
                "qlive sets smm only for Secure Boot",
            );
        }
    }
    let uefi = firmware.get("firmware").is_some();
    if c.secure_flash && !uefi {
        l.refuse(
            "-global driver=cfi.pflash01,property=secure,value=on",
            "without UEFI pflash drives",
        );
    }
    // Serial console: exactly one, COM1.
    let mut chardevs_used: Vec<String> = Vec::new();
    match c.serial.as_slice() {
        [] => l.refuse("no -serial", "qlive gives every guest a serial port (COM1)"),
        [s] => {
            if s == "none" {
                l.refuse(
                    "-serial none",
                    "qlive gives every guest a serial port (COM1)",
                );
            } else if let Some(id) = s.strip_prefix("chardev:") {
                if c.chardevs.contains_key(id) {
                    chardevs_used.push(id.to_string());
                } else {
                    l.refuse(
                        format!("-serial {s}"),
                        "its chardev is not on the command line",
                    );
                }
                l.notes.push(format!(
                    "the serial console (-serial {s}) goes to qlive's console log after adoption"
                ));
            } else {
                l.notes.push(format!(
                    "the serial console (-serial {}) goes to qlive's console log after adoption",
                    shorten(s)
                ));
            }
        }
        [_, rest @ ..] => {
            for s in rest {
                l.refuse(
                    format!("-serial {}", shorten(s)),
                    "a second serial port (qlive has one)",
                );
            }
        }
    }
    // Monitors: the QMP socket this inspection is connected to, no other.
    let sock = l.qmp_socket;
    let ours = |p: &str| Path::new(p) == sock;
    let mut monitors = 0;
    for (path, shown) in &c.qmp_paths {
        if ours(path) {
            monitors += 1;
        } else {
            l.refuse(shown.clone(), "a second monitor");
        }
    }
    for (cd, shown) in &c.monitor_chardevs {
        match c.chardevs.get(cd) {
            Some(ch) if ch.backend == "socket" && ch.path.as_deref().is_some_and(ours) => {
                monitors += 1;
                chardevs_used.push(cd.clone());
            }
            Some(ch) => {
                chardevs_used.push(cd.clone());
                l.refuse(format!("{} ({shown})", ch.shown), "a second monitor");
            }
            None => l.refuse(shown.clone(), "its chardev is not on the command line"),
        }
    }
    if monitors != 1 {
        l.refuse(
            format!("the QMP socket {}", l.qmp_socket.display()),
            "not named by a -qmp or -mon option on the command line",
        );
    }
    for (id, ch) in &c.chardevs {
        if !chardevs_used.contains(id) {
            l.refuse(
                ch.shown.clone(),
                "a chardev no serial port or monitor of qlive's uses",
            );
        }
    }
    // What QEMU has: every chardev label from the options above.
    let known_labels: Vec<String> = chardevs_used
        .iter()
        .cloned()
        .chain(["serial0".to_string()])
        .chain((0..c.qmp_paths.len()).map(|i| format!("compat_monitor{i}")))
        .collect();
    for (label, filename) in &q.chardevs {
        if !known_labels.contains(label) {
            l.refuse(
                format!("chardev {label} ({})", shorten(filename)),
                "not on the command line (added over QMP?)",
            );
        }
    }
    if !c.display_none || q.display != "none" {
        l.refuse(
            format!("display {:?}", q.display),
            "qlive runs -display none (give QEMU -nographic or -display none)",
        );
    }
    // Devices, in the order qlive creates them: disks, then NICs.
    let mut disks = Vec::new();
    let mut disk_facts = Vec::new();
    let mut nics = Vec::new();
    let mut nic_facts = Vec::new();
    let mut seen_net = None::<String>;
    let anon: Vec<&QomDevice> = q.devices.iter().filter(|d| d.id.is_none()).collect();
    let mut anon_i = 0;
    // qlive's command line: every disk, then every NIC, each in the next
    // free slot after the chipset's.
    let first_slot: i64 = if q35 { 1 } else { 2 };
    let n_disks = c
        .devices
        .iter()
        .filter(|d| matches!(d.kind, DevKind::Blk { .. }))
        .count() as i64;
    let (mut disk_i, mut nic_i) = (0i64, 0i64);
    let mut used_drives: Vec<&str> = Vec::new();
    for dev in &c.devices {
        let qom = match &dev.id {
            Some(id) => q.devices.iter().find(|d| d.id.as_deref() == Some(id)),
            None => {
                let d = anon.get(anon_i).copied();
                anon_i += 1;
                d
            }
        };
        let Some(qom) = qom else {
            l.refuse(dev.shown.clone(), "QEMU has no such device (unplugged?)");
            continue;
        };
        let ty = match dev.kind {
            DevKind::Blk { .. } => "virtio-blk-pci",
            DevKind::Net { .. } => "virtio-net-pci",
        };
        if qom.type_name != ty {
            l.refuse(
                dev.shown.clone(),
                format!("QEMU has a {} at {} instead", qom.type_name, qom.path),
            );
            continue;
        }
        // The PCI slot qlive's command line would give it.
        let expected_slot = match dev.kind {
            DevKind::Blk { .. } => {
                disk_i += 1;
                first_slot + disk_i - 1
            }
            DevKind::Net { .. } => {
                nic_i += 1;
                first_slot + n_disks + nic_i - 1
            }
        };
        match qom.addr {
            Some(a) if a == expected_slot << 3 => {}
            Some(a) => l.refuse(
                dev.shown.clone(),
                format!(
                    "at PCI 00:{:02x}.{:x}, where qlive would place it at 00:{expected_slot:02x}.0 (qlive places disks first, then NICs, from the first free slot)",
                    a >> 3,
                    a & 7
                ),
            ),
            None => l.refuse(dev.shown.clone(), "QEMU reports no PCI address for it"),
        }
        match &dev.kind {
            DevKind::Blk {
                backend,
                write_cache,
                bootindex,
            } => {
                if let Some(n) = &seen_net {
                    l.refuse(
                        dev.shown.clone(),
                        format!("after {n}: qlive places every disk before every NIC, so the guest would see its devices at other PCI addresses"),
                    );
                }
                let i = disks.len();
                let want_boot = uefi.then(|| i.to_string());
                if bootindex.as_ref() != want_boot.as_ref() {
                    l.refuse(
                        dev.shown.clone(),
                        format!(
                            "bootindex {bootindex:?}: qlive gives disk i bootindex i under UEFI and none under BIOS"
                        ),
                    );
                }
                used_drives.push(backend);
                if let Some(fmt) = c.nodes.get(backend.as_str()) {
                    used_drives.push(&fmt.child);
                }
                if let Some(d) = disk_of(l, c, q, dev, backend, *write_cache) {
                    disks.push(d);
                    disk_facts.push(DiskFacts {
                        device: qom.path.clone(),
                        backend: backend.clone(),
                        pci_slot: expected_slot,
                    });
                }
            }
            DevKind::Net {
                netdev,
                mac,
                romfile,
            } => {
                seen_net.get_or_insert_with(|| dev.shown.clone());
                let qmac = qom
                    .props
                    .get("mac")
                    .and_then(Value::as_str)
                    .map(str::to_string);
                let qrom = qom
                    .props
                    .get("romfile")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                if romfile.as_deref() != Some("") || !qrom.is_empty() {
                    l.refuse(
                        format!("{}: option ROM {:?}", dev.shown, qrom),
                        "qlive's NICs have no option ROM (romfile=): a ROM is a RAM block the guest has and qlive's would not",
                    );
                }
                let Some(qmac) = qmac else {
                    l.refuse(dev.shown.clone(), "QEMU reports no MAC for it");
                    continue;
                };
                if mac.as_ref().is_some_and(|m| !m.eq_ignore_ascii_case(&qmac)) {
                    l.refuse(dev.shown.clone(), format!("QEMU reports MAC {qmac}"));
                }
                let Some(tap) = c.taps.get(netdev) else {
                    l.refuse(
                        dev.shown.clone(),
                        format!("netdev {netdev:?} is not a tap on the command line"),
                    );
                    continue;
                };
                let (name, source) = match (&tap.ifname, tap.fd) {
                    (_, Some(fd)) => match l.proc_.taps.get(&fd) {
                        Some(n) => (n.clone(), TapSource::Fd { fd }),
                        None => {
                            l.refuse(tap.shown.clone(), format!("fd {fd} of QEMU is not a tap"));
                            continue;
                        }
                    },
                    (Some(n), None) => {
                        let fds: Vec<i32> = l
                            .proc_
                            .taps
                            .iter()
                            .filter(|(_, t)| *t == n)
                            .map(|(fd, _)| *fd)
                            .collect();
                        match fds.as_slice() {
                            [fd] => (n.clone(), TapSource::Ifname { fd: *fd }),
                            _ => {
                                l.refuse(
                                    tap.shown.clone(),
                                    format!("QEMU holds {} fds of tap {n}, not one", fds.len()),
                                );
                                continue;
                            }
                        }
                    }
                    (None, None) => {
                        l.refuse(
                            tap.shown.clone(),
                            "a tap without ifname= or fd= (QEMU named it)",
                        );
                        continue;
                    }
                };
                nics.push(json!({"mac": qmac, "tap": name}));
                nic_facts.push(NicFacts {
                    device: qom.path.clone(),
                    netdev: netdev.clone(),
                    tap: name,
                    source,
                    pci_slot: expected_slot,
                });
            }
        }
    }
    for d in &c.drives {
        if !used_drives.contains(&d.id.as_str()) {
            l.refuse(d.shown.clone(), "a drive no virtio-blk-pci device uses");
        }
    }
    for (n, node) in &c.nodes {
        if !used_drives.contains(&n.as_str()) {
            l.refuse(
                node.shown.clone(),
                "a block node no virtio-blk-pci device uses",
            );
        }
    }
    for (id, t) in &c.taps {
        if !c
            .devices
            .iter()
            .any(|d| matches!(&d.kind, DevKind::Net { netdev, .. } if netdev == id))
        {
            l.refuse(t.shown.clone(), "a netdev no virtio-net-pci device uses");
        }
    }
    // QOM: every user device is one of those above.
    let learned_ids: Vec<&str> = c.devices.iter().filter_map(|d| d.id.as_deref()).collect();
    let anon_learned = c.devices.iter().filter(|d| d.id.is_none()).count();
    for d in &q.devices {
        let known = match &d.id {
            Some(id) => learned_ids.contains(&id.as_str()),
            None => anon
                .iter()
                .position(|a| a.path == d.path)
                .is_some_and(|i| i < anon_learned),
        };
        if !known && !l.refused.iter().any(|r| r.what.contains(&d.type_name)) {
            l.refuse(
                format!("device {} ({})", d.path, d.type_name),
                "not learned from the command line (added over QMP, or refused above)",
            );
        }
    }
    // PCI: nothing but the chipset and the devices above.
    let chipset = if q35 { Q35_CHIPSET } else { I440FX_CHIPSET };
    let first = if q35 { 1 } else { 2 };
    for f in &q.pci {
        let is_chipset = f.bus == 0
            && chipset
                .iter()
                .any(|&(s, fun, v, d)| (s, fun, v, d) == (f.slot, f.function, f.vendor, f.device));
        let ours = f.bus == 0
            && f.function == 0
            && (first..first + c.devices.len() as i64).contains(&f.slot);
        if !is_chipset && !ours {
            l.refuse(
                format!(
                    "PCI {} {} ({:04x}:{:04x})",
                    f.addr(),
                    f.desc,
                    f.vendor,
                    f.device
                ),
                "a PCI device qlive would not create",
            );
        }
        if ours && f.rom && !l.refused.iter().any(|r| r.what.contains("option ROM")) {
            l.refuse(
                format!("PCI {} option ROM", f.addr()),
                "qlive's devices have no option ROM",
            );
        }
    }
    // Block backends: the disks and pflash drives above, nothing else.
    for b in &q.blocks {
        let known = used_drives.contains(&b.device.as_str())
            || b.node_name
                .as_deref()
                .is_some_and(|n| used_drives.contains(&n))
            || (uefi && (b.device == "pflash0" || b.device == "pflash1"));
        if !known {
            l.refuse(
                format!(
                    "block device {:?} ({})",
                    b.device,
                    b.file.as_deref().unwrap_or("no medium")
                ),
                "not a disk learned from the command line",
            );
        }
    }
    if let Some(u) = &c.uuid {
        if uuid::Uuid::parse_str(u).is_err() {
            l.refuse(format!("-uuid {u}"), "unreadable");
        }
    } else {
        l.notes.push(
            "no -uuid: the guest's SMBIOS UUID is all zeros; qlive gives the domain a UUID, which the guest sees from its next boot".into(),
        );
    }
    let mut extra_args: Vec<String> = Vec::new();
    for d in &c.data_dirs {
        extra_args.extend(["-L".to_string(), d.clone()]);
    }
    if let Some(b) = &c.bios {
        extra_args.extend(["-bios".to_string(), b.to_string_lossy().into_owned()]);
    }
    if c.no_reboot {
        extra_args.push("-no-reboot".into());
    }
    if !l.refused.is_empty() {
        return None;
    }
    let mut def = json!({
        "name": name,
        "emulator": l.proc_.exe,
        "machine": machine,
        "accel": accel,
        "vcpus": vcpus,
        "memory_mib": memory_bytes >> 20,
    });
    let obj = def.as_object_mut()?;
    let mut put = |k: &str, v: Value| {
        obj.insert(k.to_string(), v);
    };
    if let Some(u) = &c.uuid {
        put("uuid", json!(u));
    }
    if let Some(cpu) = &c.cpu {
        put("cpu", json!(cpu));
    }
    if let Some(t) = topology {
        put("topology", t);
    }
    if let Some(k) = &c.kernel {
        put("kernel", json!(k));
    }
    if let Some(i) = &c.initrd {
        put("initrd", json!(i));
    }
    if let Some(a) = &c.append {
        put("cmdline", json!(a));
    }
    if !disks.is_empty() {
        put("disks", Value::Array(disks));
    }
    if !nics.is_empty() {
        put("nics", Value::Array(nics));
    }
    if !extra_args.is_empty() {
        put("extra_args", json!(extra_args));
    }
    if let Some(f) = firmware.as_object() {
        for (k, v) in f {
            put(k, v.clone());
        }
    }
    let definition = match Definition::from_stored(&def) {
        Ok(d) => d,
        Err(e) => {
            l.refuse("the learned definition", crate::error::chain(&e));
            return None;
        }
    };
    Some(Learned {
        definition,
        facts: AdoptFacts {
            pid: l.proc_.pid,
            qemu_version: q.version.clone(),
            qemu_package: q.package.clone(),
            status: q.status.clone(),
            ram,
            disks: disk_facts,
            nics: nic_facts,
            data_dirs: c.data_dirs.clone(),
            notes: std::mem::take(&mut l.notes),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOCK: &str = "/run/vm/qmp.sock";

    fn argv(s: &str) -> Vec<String> {
        // Test command lines: space-separated, `~` stands for a space
        // inside one argument.
        s.split_whitespace().map(|a| a.replace('~', " ")).collect()
    }

    fn plain() -> String {
        format!(
            "-accel tcg -machine q35 -m 256 -smp 1 -kernel /g/vmlinux -initrd /g/initrd.img \
             -append console=ttyS0~quiet -nographic -nodefaults -serial file:/g/console.log \
             -qmp unix:{SOCK},server=on,wait=off \
             -drive file=/g/disk,,0.qcow2,format=qcow2,if=none,id=d0 -device virtio-blk-pci,drive=d0 \
             -netdev tap,id=n0,ifname=tap0,script=no,downscript=no \
             -device virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56,romfile="
        )
    }

    fn proc_(args: &str) -> ProcView {
        ProcView {
            pid: 42,
            exe: "/usr/bin/qemu-system-x86_64".into(),
            argv: argv(args),
            cwd: Some("/".into()),
            taps: [(8, "tap0".to_string())].into(),
            user_config: vec![],
        }
    }

    fn dev(n: usize, ty: &str, slot: i64) -> QomDevice {
        let mut props = BTreeMap::new();
        if ty == "virtio-net-pci" {
            props.insert("mac".to_string(), json!("52:54:00:12:34:56"));
            props.insert("romfile".to_string(), json!(""));
        }
        QomDevice {
            path: format!("/machine/peripheral-anon/device[{n}]"),
            id: None,
            type_name: ty.into(),
            addr: Some(slot << 3),
            props,
        }
    }

    fn pci(slot: i64, function: i64, vendor: i64, device: i64) -> PciFunction {
        PciFunction {
            bus: 0,
            slot,
            function,
            vendor,
            device,
            desc: "x".into(),
            rom: false,
        }
    }

    /// What QEMU 7.2 answers for [`plain`] (recorded from a real one).
    fn view() -> QmpView {
        let mut pcis: Vec<PciFunction> = Q35_CHIPSET
            .iter()
            .map(|&(s, f, v, d)| pci(s, f, v, d))
            .collect();
        pcis.push(pci(1, 0, 0x1af4, 0x1001));
        pcis.push(pci(2, 0, 0x1af4, 0x1000));
        QmpView {
            version: "7.2.22".into(),
            package: "Debian 1:7.2+dfsg-7+deb12u18+b3".into(),
            machine_type: "pc-q35-7.2-machine".into(),
            status: "running".into(),
            kvm_enabled: false,
            cpus: vec![[Some(0), None, None, Some(0), Some(0)]],
            memdevs: vec![("pc.ram".into(), 256 << 20, false)],
            objects: vec![("pc.ram".into(), "memory-backend-ram".into())],
            devices: vec![dev(0, "virtio-blk-pci", 1), dev(1, "virtio-net-pci", 2)],
            blocks: vec![BlockView {
                device: "d0".into(),
                qdev: Some("/machine/peripheral-anon/device[0]/virtio-backend".into()),
                node_name: Some("#block133".into()),
                file: Some("/g/disk,0.qcow2".into()),
                drv: Some("qcow2".into()),
                ro: false,
                direct: false,
            }],
            pci: pcis,
            chardevs: vec![
                ("compat_monitor0".into(), format!("unix:{SOCK},server=on")),
                ("serial0".into(), "file".into()),
            ],
            display: "none".into(),
        }
    }

    fn refusals(args: &str, q: &QmpView) -> String {
        let e = learn("vm1", &proc_(args), q, Path::new(SOCK)).unwrap_err();
        super::super::refusal_message(&e)
    }

    #[test]
    fn a_plain_command_line_is_learned_with_the_machine_pinned() {
        let l = learn("vm1", &proc_(&plain()), &view(), Path::new(SOCK)).unwrap();
        let d = &l.definition;
        assert_eq!(d.machine, "pc-q35-7.2");
        assert_eq!(d.memory_mib, 256);
        assert_eq!(d.vcpus, 1);
        assert_eq!(d.cmdline.as_deref(), Some("console=ttyS0 quiet"));
        // `,,` in the image path is one comma
        assert_eq!(d.disks[0].path, Path::new("/g/disk,0.qcow2"));
        assert_eq!(d.nics[0].mac(), "52:54:00:12:34:56");
        assert_eq!(d.nics[0].tap(), "tap0");
        assert_eq!(l.facts.ram.block, "pc.ram");
        assert!(!l.facts.ram.shared);
        assert_eq!(l.facts.nics[0].source, TapSource::Ifname { fd: 8 });
        assert!(d.uuid.is_none() && l.facts.notes.iter().any(|n| n.contains("-uuid")));
        // 7.2 under TCG: the dirty-bitmap bug is named.
        assert!(
            l.facts
                .notes
                .iter()
                .any(|n| n.contains("QEMU 7.2.22 under TCG loses dirty bits")),
            "{:?}",
            l.facts.notes
        );
        let mut v = view();
        v.version = "10.0.2".into();
        v.machine_type = "pc-q35-7.2-machine".into();
        let l = learn("vm1", &proc_(&plain()), &v, Path::new(SOCK)).unwrap();
        assert!(!l.facts.notes.iter().any(|n| n.contains("dirty bits")));
    }

    #[test]
    fn everything_not_understood_is_refused_at_once() {
        let args = format!(
            "{} -device usb-tablet -netdev user,id=n1 -chardev socket,id=mon1,path=/tmp/m,server=on \
             -mon chardev=mon1,mode=control -frobnicate 3 -rtc base=localtime",
            plain()
        );
        let e = refusals(&args, &view());
        for want in [
            "-device usb-tablet (device not in qlive's definition format)",
            "-netdev user (only tap backends)",
            "-chardev socket,id=mon1",
            "a second monitor",
            "-frobnicate 3 (an option qlive does not know)",
            "-rtc base=localtime",
        ] {
            assert!(e.contains(want), "{want}: {e}");
        }
        // QOM and PCI that no option explains are refused too
        let mut q = view();
        q.devices.push(QomDevice {
            path: "/machine/peripheral/rng0".into(),
            id: Some("rng0".into()),
            type_name: "virtio-rng-pci".into(),
            addr: Some(3 << 3),
            props: BTreeMap::new(),
        });
        q.pci.push(pci(3, 0, 0x1af4, 0x1005));
        let e = refusals(&plain(), &q);
        assert!(
            e.contains("device /machine/peripheral/rng0 (virtio-rng-pci)"),
            "{e}"
        );
        assert!(e.contains("PCI 00:03.0"), "{e}");
    }

    #[test]
    fn a_nic_before_a_disk_is_refused_for_its_pci_address() {
        let args = plain()
            .replace(" -device virtio-blk-pci,drive=d0", "")
            .replace("romfile=", "romfile= -device virtio-blk-pci,drive=d0");
        let mut q = view();
        q.devices = vec![dev(0, "virtio-net-pci", 1), dev(1, "virtio-blk-pci", 2)];
        let e = refusals(&args, &q);
        assert!(
            e.contains("qlive places every disk before every NIC"),
            "{e}"
        );
        assert!(
            e.contains("at PCI 00:01.0, where qlive would place it at 00:02.0"),
            "{e}"
        );
    }

    #[test]
    fn defaults_roms_and_hardware_the_format_lacks_are_refused() {
        let e = refusals(&plain().replace("-nodefaults", ""), &view());
        assert!(e.contains("no -nodefaults"), "{e}");
        let e = refusals(&plain().replace(",romfile=", ""), &view());
        assert!(e.contains("option ROM"), "{e}");
        let e = refusals(
            &plain().replace("downscript=no", "downscript=/etc/down"),
            &view(),
        );
        assert!(e.contains("downscript"), "{e}");
        let e = refusals(&plain().replace("-smp 1", "-smp 1,maxcpus=4"), &view());
        assert!(e.contains("CPU hotplug"), "{e}");
        let mut q = view();
        q.machine_type = "microvm-machine".into();
        assert!(refusals(&plain(), &q).contains("machine microvm"));
        // the disk QEMU has open is not the one on the command line
        let mut q = view();
        q.blocks[0].file = Some("/other.qcow2".into());
        assert!(refusals(&plain(), &q).contains("not what the command line says"));
        // a positional image
        let e = refusals(&format!("{} /g/hd.img", plain()), &view());
        assert!(e.contains("a bare image path"), "{e}");
    }

    #[test]
    fn a_memory_backend_names_the_ram_block() {
        let args = plain().replace(
            "-machine q35 -m 256",
            "-machine q35,memory-backend=mem0 -m 256 -object memory-backend-file,id=mem0,size=256M,mem-path=/dev/shm/g,share=on",
        );
        let mut q = view();
        q.memdevs = vec![("mem0".into(), 256 << 20, true)];
        q.objects = vec![("mem0".into(), "memory-backend-file".into())];
        let l = learn("vm1", &proc_(&args), &q, Path::new(SOCK)).unwrap();
        assert_eq!(l.facts.ram.block, "mem0");
        assert!(l.facts.ram.shared && l.facts.ram.file_backed);
    }

    #[test]
    fn a_given_definition_is_checked_field_by_field() {
        let l = learn("vm1", &proc_(&plain()), &view(), Path::new(SOCK)).unwrap();
        assert!(super::super::check_definition(&l.definition, &l.definition).is_empty());
        let given = Definition::from_value(&json!({
            "name": "vm1", "emulator": "/usr/bin/qemu-system-x86_64", "machine": "q35",
            "memory_mib": 512, "kernel": "/g/vmlinux", "initrd": "/g/initrd.img",
            "cmdline": "console=ttyS0 quiet",
            "disks": [{"path": "/g/disk,0.qcow2", "format": "raw"}],
            "nics": [{"mac": "52:54:00:12:34:99", "tap": "tap0"}],
        }))
        .unwrap();
        let m = super::super::check_definition(&given, &l.definition).join("\n");
        for want in [
            "machine: the definition says q35 (an alias",
            "memory_mib: the definition says 512, the guest has 256",
            "disks[0].format: the definition says raw, the guest has qcow2",
            "nics[0].mac: the definition says 52:54:00:12:34:99, the guest has 52:54:00:12:34:56",
        ] {
            assert!(m.contains(want), "{want}: {m}");
        }
        assert_eq!(m.lines().count(), 4, "{m}");
    }
}
