//! The QEMU command line of an instance, built from the definition, the
//! instance's paths and the fds it inherits. Pure: no I/O, unit-tested.
//!
//! Every instance of a domain gets the same guest-visible configuration (the
//! pinned machine type, the same RAM backend at the same fd); only paths and
//! `-incoming` differ between the source and destination of a migration.

use crate::domain::definition::{Definition, Disk, Firmware};
use crate::instance::memory::GUEST_RAM_FD;
use crate::instance::paths::InstancePaths;
use serde_json::json;
use std::ffi::OsString;
use std::path::Path;

/// The accelerator actually used (after resolving `auto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EffectiveAccel {
    Kvm,
    Tcg,
}

impl EffectiveAccel {
    pub fn as_str(self) -> &'static str {
        match self {
            EffectiveAccel::Kvm => "kvm",
            EffectiveAccel::Tcg => "tcg",
        }
    }
}

/// How the instance starts: a fresh boot, or waiting for an incoming
/// migration (`-incoming defer`, then `migrate-incoming` over QMP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartMode {
    Boot,
    Incoming,
}

pub const RAM_ID: &str = "qlive-ram";
pub const QMP_CHARDEV: &str = "qlive-qmp";
pub const CONSOLE_CHARDEV: &str = "qlive-console";
/// The fd set the console log fd is added to (`-add-fd`).
pub const CONSOLE_FDSET: u32 = 1;

/// The fd number of the console log inside QEMU: after guest RAM (3) and
/// one tap per NIC (4..).
pub fn console_fd(def: &Definition) -> i32 {
    console_fd_for(def.nics.len())
}

/// [`console_fd`] of an instance with `nics` NICs (one tap each).
pub fn console_fd_for(nics: usize) -> i32 {
    crate::instance::tap::FIRST_TAP_FD + nics as i32
}

/// The fd number of the guest agent's listening socket inside QEMU, after
/// the console log (crate::instance::endpoint).
pub fn guest_agent_fd(def: &Definition) -> i32 {
    guest_agent_fd_for(def.nics.len())
}

pub fn guest_agent_fd_for(nics: usize) -> i32 {
    console_fd_for(nics) + 1
}

pub const GUEST_AGENT_CHARDEV: &str = "qlive-guest-agent";

/// The fd number of the VNC listening socket inside QEMU. QEMU does not
/// use it (the agent accepts and hands connections over with `add_client`);
/// it holds it so the socket outlives an agent restart.
pub fn vnc_fd(def: &Definition) -> i32 {
    vnc_fd_for(def.nics.len())
}

pub fn vnc_fd_for(nics: usize) -> i32 {
    console_fd_for(nics) + 2
}

/// The fd number of the domain's NVRAM (UEFI variables) inside QEMU, after
/// the VNC socket; the agent opens the file (crate::instance::firmware).
pub fn nvram_fd(def: &Definition) -> i32 {
    console_fd_for(def.nics.len()) + 3
}

/// The fd number of the tap guard's seccomp listener inside QEMU
/// (instance::tapguard), after the NVRAM. QEMU does not use it: it holds
/// it so that the listener outlives an agent restart.
pub fn tapguard_fd(def: &Definition) -> i32 {
    tapguard_fd_for(def.nics.len())
}

pub fn tapguard_fd_for(nics: usize) -> i32 {
    console_fd_for(nics) + 4
}

/// The fd numbers of NIC `nic`'s tap queues inside QEMU, for NICs with
/// `queues[i]` queue pairs each (0: an older qlive's single-queue tap):
/// first the queues the instance reads, queue 0 at `FIRST_TAP_FD + nic`
/// and the others after the tap guard's listener, then the other set's
/// queues (`instance::tap`), which it holds but never reads.
pub fn tap_fd_numbers(queues: &[u16], nic: usize) -> (Vec<i32>, Vec<i32>) {
    let extra = |q: u16| if q == 0 { 0 } else { 2 * i32::from(q) - 1 };
    let q = queues.get(nic).copied().unwrap_or(0);
    let base =
        tapguard_fd_for(queues.len()) + 1 + queues.iter().take(nic).map(|&q| extra(q)).sum::<i32>();
    let first = crate::instance::tap::FIRST_TAP_FD + nic as i32;
    if q == 0 {
        return (vec![first], vec![]);
    }
    let n = i32::from(q);
    let own = std::iter::once(first).chain(base..base + n - 1).collect();
    let other = (base + n - 1..base + 2 * n - 1).collect();
    (own, other)
}

/// The highest fd number an instance inherits (with the most NICs and
/// queues a definition allows).
pub fn last_inherited_fd() -> i32 {
    let max = [crate::instance::tap::MAX_QUEUES; crate::domain::definition::MAX_NICS];
    let (_, other) = tap_fd_numbers(&max, max.len() - 1);
    other.last().copied().unwrap_or(tapguard_fd_for(max.len()))
}

/// The fd set the NVRAM fd is added to (`-add-fd`).
pub const NVRAM_FDSET: u32 = 2;
pub const FW_CODE_NODE: &str = "qlive-fw-code";
pub const NVRAM_NODE: &str = "qlive-nvram";

/// QemuOpts values escape a comma by doubling it.
pub fn qemu_opt_escape(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

/// Build argv (without argv[0]) for `def` running as an instance with
/// `paths`. `machine` is the pinned (versioned) machine type.
pub fn build(
    def: &Definition,
    machine: &str,
    accel: EffectiveAccel,
    paths: &InstancePaths,
    mode: StartMode,
    ram_id: &str,
) -> Vec<OsString> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |s: &[&str]| a.extend(s.iter().map(|x| x.to_string()));
    push(&["-name", &format!("guest={},debug-threads=on", def.name)]);
    if let Some(u) = def.uuid {
        push(&["-uuid", &u.to_string()]);
    }
    let mut machine_opts = format!("{machine},memory-backend={ram_id}");
    if def.firmware == Firmware::Uefi {
        machine_opts.push_str(&format!(",pflash0={FW_CODE_NODE},pflash1={NVRAM_NODE}"));
        if def.secure_boot {
            machine_opts.push_str(",smm=on");
        }
    }
    push(&["-machine", &machine_opts]);
    push(&["-accel", accel.as_str()]);
    if let Some(cpu) = &def.cpu {
        push(&["-cpu", cpu]);
    }
    let smp = match def.topology {
        Some(t) => format!(
            "{},sockets={},cores={},threads={}",
            def.vcpus, t.sockets, t.cores, t.threads
        ),
        None => def.vcpus.to_string(),
    };
    push(&["-smp", &smp]);
    push(&["-m", &format!("{}M", def.memory_mib)]);
    push(&[
        "-object",
        &format!(
            "memory-backend-file,id={ram_id},size={}M,mem-path=/proc/self/fd/{GUEST_RAM_FD},share=on",
            def.memory_mib
        ),
    ]);
    push(&["-nodefaults", "-no-user-config", "-display", "none"]);
    // QEMU's own seccomp sandbox: no obsolete syscalls, no scheduler or
    // affinity changes; migration needs neither. Not spawn=deny nor
    // elevateprivileges=deny: the filter is in place before -daemonize,
    // which forks and calls setsid (both refused there, QEMU exits 1).
    // Privileges are bounded anyway: no_new_privs and the agent's
    // capability bound (agent::privileges).
    push(&["-sandbox", "on,obsolete=deny,resourcecontrol=deny"]);
    push(&[
        "-chardev",
        &format!(
            "socket,id={QMP_CHARDEV},path={},server=on,wait=off",
            qemu_opt_escape(&paths.qmp)
        ),
        "-mon",
        &format!("chardev={QMP_CHARDEV},mode=control"),
    ]);
    // The console: one per-domain log every instance appends to in turn
    // (see crate::console for why not a socket chardev). The agent opens it
    // (O_APPEND, never through a symlink) and passes the fd: QEMU, maybe
    // running as an unprivileged user, needs no access to the state dir.
    push(&[
        "-add-fd",
        &format!("fd={},set={CONSOLE_FDSET}", console_fd(def)),
        "-chardev",
        &format!("file,id={CONSOLE_CHARDEV},path=/dev/fdset/{CONSOLE_FDSET},append=on"),
        "-serial",
        &format!("chardev:{CONSOLE_CHARDEV}"),
    ]);
    if def.firmware == Firmware::Uefi {
        a.extend(uefi_args(def));
    }
    let mut push = |s: &[&str]| a.extend(s.iter().map(|x| x.to_string()));
    if def.guest_agent {
        // The agent's listening socket, inherited: QEMU accepts on it but
        // never binds or unlinks the path.
        push(&[
            "-device",
            "virtio-serial-pci,id=qlive-serial0",
            "-chardev",
            &format!(
                "socket,id={GUEST_AGENT_CHARDEV},fd={},server=on,wait=off",
                guest_agent_fd(def)
            ),
            "-device",
            &format!(
                "virtserialport,bus=qlive-serial0.0,chardev={GUEST_AGENT_CHARDEV},name=org.qemu.guest_agent.0"
            ),
        ]);
    }
    if def.vnc {
        // No listener of QEMU's own: the agent owns the socket and adds
        // each client over QMP (`add_client`).
        push(&["-device", "VGA,id=qlive-vga0", "-vnc", "none"]);
    }
    if let Some(k) = &def.kernel {
        push(&["-kernel", &k.to_string_lossy()]);
    }
    if let Some(i) = &def.initrd {
        push(&["-initrd", &i.to_string_lossy()]);
    }
    if let Some(c) = &def.cmdline {
        push(&["-append", c]);
    }
    for (i, d) in def.disks.iter().enumerate() {
        for arg in disk_args(i, d, def.firmware == Firmware::Uefi) {
            a.push(arg);
        }
    }
    let queues: Vec<u16> = def.nics.iter().map(|n| n.queues()).collect();
    for (i, n) in def.nics.iter().enumerate() {
        // The tap's queues are the agent's fds, inherited at fixed
        // numbers: QEMU never opens or configures the device by name. No
        // option ROM: qlive boots kernels and disks, and a ROM whose size
        // changes between QEMU builds would make the migration stream
        // incompatible. The vnet header comes from the tap's flags
        // (crate::instance::tap); the tap guard decides which instance may
        // reconfigure it.
        let (own, _) = tap_fd_numbers(&queues, i);
        let fds = match own.as_slice() {
            [one] => format!("fd={one}"),
            many => format!(
                "fds={}",
                many.iter()
                    .map(|f| f.to_string())
                    .collect::<Vec<_>>()
                    .join(":")
            ),
        };
        a.push("-netdev".into());
        a.push(format!("tap,id=qlive-net{i},{fds},vhost=off"));
        // Multi-queue: one MSI-X vector per virtqueue, plus config and
        // control (what libvirt gives: 2 * queues + 2).
        let mq = match n.queues() {
            1 => String::new(),
            q => format!(",mq=on,vectors={}", 2 * u32::from(q) + 2),
        };
        a.push("-device".into());
        a.push(format!(
            "virtio-net-pci,netdev=qlive-net{i},id=net{i},mac={},romfile={mq}",
            n.mac()
        ));
    }
    let mut push = |s: &[&str]| a.extend(s.iter().map(|x| x.to_string()));
    push(&["-pidfile", &paths.pid.to_string_lossy(), "-daemonize", "-S"]);
    if mode == StartMode::Incoming {
        push(&["-incoming", "defer"]);
    }
    a.extend(def.extra_args.iter().cloned());
    a.into_iter().map(OsString::from).collect()
}

/// UEFI: the code image read-only by path (pflash 0) and the domain's
/// NVRAM through the fd the agent passes (pflash 1), raw format nodes the
/// machine's `pflash0`/`pflash1` name. Both instances of a migration open
/// the same two files; the flash contents travel in the migration stream
/// (QEMU registers them as RAM), and the NVRAM file is written back by the
/// instance that runs.
fn uefi_args(def: &Definition) -> Vec<String> {
    let code = def
        .firmware_code
        .as_deref()
        .unwrap_or(Path::new(crate::domain::definition::OVMF_CODE));
    let nodes = [
        json!({"driver": "file", "node-name": format!("{FW_CODE_NODE}-file"),
               "filename": code.to_string_lossy(), "read-only": true}),
        json!({"driver": "raw", "node-name": FW_CODE_NODE,
               "file": format!("{FW_CODE_NODE}-file"), "read-only": true}),
        json!({"driver": "file", "node-name": format!("{NVRAM_NODE}-file"),
               "filename": format!("/dev/fdset/{NVRAM_FDSET}"), "read-only": false}),
        json!({"driver": "raw", "node-name": NVRAM_NODE,
               "file": format!("{NVRAM_NODE}-file"), "read-only": false}),
    ];
    let mut a = vec![
        "-add-fd".to_string(),
        format!("fd={},set={NVRAM_FDSET}", nvram_fd(def)),
    ];
    for n in nodes {
        a.push("-blockdev".into());
        a.push(n.to_string());
    }
    if def.secure_boot {
        // The flash is writable from SMM only: the guest OS cannot write
        // the variables behind the firmware's back.
        a.extend([
            "-global".into(),
            "driver=cfi.pflash01,property=secure,value=on".into(),
        ]);
    }
    a
}

/// -blockdev (JSON syntax: no comma escaping) for the file and format nodes,
/// and the virtio-blk device. Under UEFI each disk gets its index as boot
/// index, so OVMF boots the first disk and tries nothing before it.
fn disk_args(i: usize, d: &Disk, bootindex: bool) -> Vec<String> {
    let (direct, write_cache) = d.cache.flags();
    let file = json!({
        "driver": "file",
        "node-name": format!("qlive-file{i}"),
        "filename": d.path.to_string_lossy(),
        "aio": d.aio.as_str(),
        "cache": {"direct": direct, "no-flush": false},
        "read-only": d.readonly,
    });
    let fmt = json!({
        "driver": d.format.as_str(),
        "node-name": format!("qlive-disk{i}"),
        "file": format!("qlive-file{i}"),
        "cache": {"direct": direct, "no-flush": false},
        "read-only": d.readonly,
    });
    vec![
        "-blockdev".into(),
        file.to_string(),
        "-blockdev".into(),
        fmt.to_string(),
        "-device".into(),
        format!(
            "virtio-blk-pci,drive=qlive-disk{i},id=disk{i},write-cache={}{}",
            if write_cache { "on" } else { "off" },
            if bootindex {
                format!(",bootindex={i}")
            } else {
                String::new()
            }
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def() -> Definition {
        Definition::from_value(&serde_json::json!({
            "name": "vm", "emulator": "/usr/bin/qemu-system-x86_64", "memory_mib": 512,
            "kernel": "/k", "cmdline": "console=ttyS0",
            "disks": [{"path": "/img,with,commas.qcow2", "format": "qcow2"}],
            "nics": [{"mac": "52:54:00:00:00:01", "tap": "t0"}, {"mac": "52:54:00:00:00:02", "tap": "t1"}],
            "extra_args": ["-device", "virtio-rng-pci"],
        }))
        .unwrap()
    }

    fn s(v: &[OsString]) -> Vec<String> {
        v.iter().map(|x| x.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn ram_is_the_shared_fd_and_paths_are_per_instance() {
        let p = InstancePaths::new(Path::new("/run/q"), "vm", 5);
        let a = s(&build(
            &def(),
            "pc-q35-7.2",
            EffectiveAccel::Tcg,
            &p,
            StartMode::Boot,
            RAM_ID,
        ));
        let j = a.join(" ");
        assert!(j.contains("mem-path=/proc/self/fd/3,share=on"), "{j}");
        assert!(
            j.contains("-machine pc-q35-7.2,memory-backend=qlive-ram"),
            "{j}"
        );
        assert!(j.contains("path=/run/q/domains/vm/5/qmp.sock"), "{j}");
        assert!(j.contains("-daemonize -S"), "{j}");
        assert!(!j.contains("-incoming"));
        // extra args come last, verbatim
        assert_eq!(&a[a.len() - 2..], ["-device", "virtio-rng-pci"]);
        // taps are inherited fds after guest RAM, in NIC order
        assert!(j.contains("-netdev tap,id=qlive-net0,fd=4,vhost=off -device virtio-net-pci,netdev=qlive-net0,id=net0,mac=52:54:00:00:00:01,romfile="), "{j}");
        assert!(j.contains("tap,id=qlive-net1,fd=5,"), "{j}");
        // the JSON blockdev keeps the comma path intact
        assert!(j.contains(r#""filename":"/img,with,commas.qcow2""#), "{j}");
    }

    #[test]
    fn multi_queue_nics_read_their_set_and_hold_the_other() {
        // two NICs: taps 4 and 5, console 6, ..., tap guard 10; the
        // queues beyond the first after it, NIC by NIC
        assert_eq!(tapguard_fd_for(2), 10);
        assert_eq!(tap_fd_numbers(&[1, 3], 0), (vec![4], vec![11]));
        assert_eq!(
            tap_fd_numbers(&[1, 3], 1),
            (vec![5, 12, 13], vec![14, 15, 16])
        );
        // an older qlive's single-queue taps: nothing more
        assert_eq!(tap_fd_numbers(&[0, 0], 1), (vec![5], vec![]));
        let mut d = def();
        d.nics[1].queues = Some(3);
        let j = boot_line(&d);
        assert!(j.contains("tap,id=qlive-net0,fd=4,vhost=off "), "{j}");
        assert!(
            j.contains("tap,id=qlive-net1,fds=5:12:13,vhost=off -device virtio-net-pci,netdev=qlive-net1,id=net1,mac=52:54:00:00:00:02,romfile=,mq=on,vectors=8"),
            "{j}"
        );
        assert!(last_inherited_fd() > tapguard_fd_for(8));
        assert!(last_inherited_fd() < 200);
    }

    /// The command line of a fresh boot of `d`, joined.
    fn boot_line(d: &Definition) -> String {
        let p = InstancePaths::new(Path::new("/run/q"), "vm", 5);
        s(&build(
            d,
            "pc-q35-7.2",
            EffectiveAccel::Tcg,
            &p,
            StartMode::Boot,
            RAM_ID,
        ))
        .join(" ")
    }

    #[test]
    fn uefi_is_two_pflash_nodes_with_the_nvram_by_fd() {
        let mut d = def();
        let bios = boot_line(&d);
        assert!(
            !bios.contains("pflash") && !bios.contains("bootindex"),
            "{bios}"
        );
        d.firmware = Firmware::Uefi;
        d.firmware_code = Some("/fw/CODE,1.fd".into());
        let j = boot_line(&d);
        assert!(
            j.contains("-machine pc-q35-7.2,memory-backend=qlive-ram,pflash0=qlive-fw-code,pflash1=qlive-nvram "),
            "{j}"
        );
        // two NICs: taps 4 and 5, console 6, guest agent 7, VNC 8, NVRAM 9
        assert_eq!(nvram_fd(&d), 9);
        assert!(j.contains("-add-fd fd=9,set=2 "), "{j}");
        assert!(
            j.contains(
                r#""filename":"/fw/CODE,1.fd","node-name":"qlive-fw-code-file","read-only":true"#
            ),
            "{j}"
        );
        assert!(j.contains(r#""filename":"/dev/fdset/2""#), "{j}");
        assert!(j.contains("write-cache=on,bootindex=0"), "{j}");
        assert!(!j.contains("smm") && !j.contains("secure"), "{j}");
        d.secure_boot = true;
        let j = boot_line(&d);
        assert!(j.contains("pflash1=qlive-nvram,smm=on "), "{j}");
        assert!(
            j.contains("-global driver=cfi.pflash01,property=secure,value=on"),
            "{j}"
        );
    }

    #[test]
    fn topology_goes_on_smp() {
        let j = boot_line;
        let mut d = def();
        assert!(j(&d).contains("-smp 1 "), "{}", j(&d));
        d.vcpus = 4;
        d.topology = Some(crate::domain::definition::Topology {
            sockets: 2,
            cores: 2,
            threads: 1,
        });
        assert!(
            j(&d).contains("-smp 4,sockets=2,cores=2,threads=1 "),
            "{}",
            j(&d)
        );
    }

    #[test]
    fn incoming_differs_only_in_paths_and_incoming() {
        let p1 = InstancePaths::new(Path::new("/run/q"), "vm", 5);
        let p2 = InstancePaths::new(Path::new("/run/q"), "vm", 6);
        let a = s(&build(
            &def(),
            "pc-q35-7.2",
            EffectiveAccel::Tcg,
            &p1,
            StartMode::Boot,
            RAM_ID,
        ));
        let b = s(&build(
            &def(),
            "pc-q35-7.2",
            EffectiveAccel::Tcg,
            &p2,
            StartMode::Incoming,
            RAM_ID,
        ));
        let b_wo: Vec<_> = b
            .iter()
            .filter(|x| *x != "-incoming" && *x != "defer")
            .cloned()
            .collect();
        assert_eq!(a.len(), b_wo.len());
        let diff: Vec<_> = a.iter().zip(&b_wo).filter(|(x, y)| x != y).collect();
        assert!(
            diff.iter().all(|(x, _)| x.contains("/run/q/domains/vm/5/")),
            "{diff:?}"
        );
    }

    #[test]
    fn an_adopted_domain_keeps_its_ram_block_name() {
        let p = InstancePaths::new(Path::new("/run/q"), "vm", 5);
        let j = s(&build(
            &def(),
            "pc-q35-7.2",
            EffectiveAccel::Tcg,
            &p,
            StartMode::Incoming,
            "pc.ram",
        ))
        .join(" ");
        assert!(
            j.contains("-machine pc-q35-7.2,memory-backend=pc.ram"),
            "{j}"
        );
        assert!(j.contains("memory-backend-file,id=pc.ram,"), "{j}");
    }

    #[test]
    fn commas_in_paths_are_escaped() {
        let p = InstancePaths::new(Path::new("/run/a,b"), "vm", 1);
        let j = s(&build(
            &def(),
            "pc-q35-7.2",
            EffectiveAccel::Tcg,
            &p,
            StartMode::Boot,
            RAM_ID,
        ))
        .join(" ");
        assert!(j.contains("path=/run/a,,b/domains/vm/1/qmp.sock"), "{j}");
    }
}
