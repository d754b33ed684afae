//! The domain definition: what the user writes in `FILE.json`.
//!
//! Parsing is strict: unknown fields are rejected, and every error names the
//! field (`disks[1].format: unknown variant ...`). [`Definition::parse`] is the
//! only way in; it runs the semantic checks of [`Definition::validate`] too,
//! so a `Definition` value in the program is always a valid one.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use uuid::Uuid;

/// Largest definition file accepted (the real ones are a few hundred bytes).
pub const MAX_DEFINITION_BYTES: usize = 64 * 1024;
pub const MIN_MEMORY_MIB: u64 = 16;
pub const MAX_MEMORY_MIB: u64 = 4 * 1024 * 1024;
pub const MAX_VCPUS: u32 = 255;
pub const MAX_DISKS: usize = 16;
pub const MAX_NICS: usize = 8;
/// Linux interface names are at most IFNAMSIZ-1 bytes.
pub const MAX_IFNAME: usize = 15;
pub const MAX_CMDLINE: usize = 4096;
pub const MAX_EXTRA_ARGS: usize = 64;

/// QEMU options that qlive itself controls; `extra_args` may not contain them
/// because they would break the instance model (paths, fds, migration).
pub const RESERVED_QEMU_OPTIONS: &[&str] = &[
    "-incoming",
    "-daemonize",
    "-pidfile",
    "-qmp",
    "-qmp-pretty",
    "-monitor",
    "-mon",
    "-serial",
    "-m",
    "-M",
    "-machine",
    "-name",
    "-uuid",
    "-S",
    "-runas",
    "-run-with",
    "-chroot",
    "-sandbox",
    "-accel",
    "-enable-kvm",
    "-kernel",
    "-initrd",
    "-append",
    "-nodefaults",
    "-mem-path",
    "-mem-prealloc",
    "-no-shutdown",
    "-readconfig",
    "-writeconfig",
    "-set",
    "-smp",
    "-cpu",
    "-add-fd",
    "-loadvm",
];

#[derive(Debug, thiserror::Error)]
pub enum DefinitionError {
    #[error("definition is {size} bytes, over the {limit}-byte limit")]
    TooLarge { size: usize, limit: usize },
    #[error("invalid definition: {path}: {message}")]
    Parse { path: String, message: String },
    #[error("invalid definition: field `{field}`: {reason}")]
    Invalid { field: String, reason: String },
}

impl DefinitionError {
    fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        DefinitionError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
    /// KVM when a guest really runs under it on this host, TCG otherwise.
    #[default]
    Auto,
}

impl Accel {
    /// The name in a definition (and in `info`).
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
            Accel::Auto => "auto",
        }
    }
}

/// Huge page size for guest RAM (`hugepages`): a hugetlb memfd of pages of
/// this size instead of a plain one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    #[serde(rename = "2M")]
    Size2M,
    #[serde(rename = "1G")]
    Size1G,
}

impl HugePages {
    pub fn as_str(self) -> &'static str {
        match self {
            HugePages::Size2M => "2M",
            HugePages::Size1G => "1G",
        }
    }

    pub fn bytes(self) -> u64 {
        match self {
            HugePages::Size2M => 2 << 20,
            HugePages::Size1G => 1 << 30,
        }
    }

    /// The pool's directory under `/sys/kernel/mm/hugepages/`.
    pub fn sysfs_name(self) -> &'static str {
        match self {
            HugePages::Size2M => "hugepages-2048kB",
            HugePages::Size1G => "hugepages-1048576kB",
        }
    }
}

/// The guest's firmware (`firmware`). `bios` is QEMU's default (SeaBIOS
/// on x86); `uefi` is OVMF from two pflash devices: the code read-only, and
/// the domain's own NVRAM (EFI variables), created from a template.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    #[default]
    Bios,
    Uefi,
}

impl Firmware {
    pub fn as_str(self) -> &'static str {
        match self {
            Firmware::Bios => "bios",
            Firmware::Uefi => "uefi",
        }
    }

    fn is_bios(&self) -> bool {
        *self == Firmware::Bios
    }
}

/// Debian's `ovmf` package (4 MiB flash layout): the code and VARS
/// template `define` pins when a UEFI definition names none.
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// The same with Secure Boot: code built with SMM, and a VARS template
/// with Microsoft's keys enrolled (Secure Boot on).
pub const OVMF_CODE_SECBOOT: &str = "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd";
pub const OVMF_VARS_SECBOOT: &str = "/usr/share/OVMF/OVMF_VARS_4M.ms.fd";

/// How the vCPUs are laid out (guest ABI): `sockets * cores * threads`
/// must be `vcpus`. Without it QEMU picks the layout, by the rules of the
/// pinned machine type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    pub sockets: u32,
    pub cores: u32,
    pub threads: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

impl DiskFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DiskCache {
    /// Host page cache on, guest flushes honoured. Safe on one host: both
    /// instances share the same page cache.
    #[default]
    Writeback,
    /// O_DIRECT; the image's filesystem must support it (tmpfs does not).
    None,
    Writethrough,
    Directsync,
}

impl DiskCache {
    /// The name in a definition (and in `info`).
    pub fn as_str(self) -> &'static str {
        match self {
            DiskCache::Writeback => "writeback",
            DiskCache::None => "none",
            DiskCache::Writethrough => "writethrough",
            DiskCache::Directsync => "directsync",
        }
    }

    /// (cache.direct, guest-visible volatile write cache) as QEMU's legacy
    /// `cache=` modes map them. Flushes are always honoured (no `unsafe`).
    pub fn flags(self) -> (bool, bool) {
        match self {
            DiskCache::Writeback => (false, true),
            DiskCache::None => (true, true),
            DiskCache::Writethrough => (false, false),
            DiskCache::Directsync => (true, false),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DiskAio {
    #[default]
    Threads,
    Native,
    #[serde(rename = "io_uring")]
    IoUring,
}

impl DiskAio {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskAio::Threads => "threads",
            DiskAio::Native => "native",
            DiskAio::IoUring => "io_uring",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    /// Absolute path of the image file.
    pub path: PathBuf,
    pub format: DiskFormat,
    #[serde(default)]
    pub readonly: bool,
    #[serde(default)]
    pub cache: DiskCache,
    #[serde(default)]
    pub aio: DiskAio,
}

/// A network card: virtio-net on a tap device the agent opens and owns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nic {
    /// Guest-visible MAC address (guest ABI): generated at define when
    /// absent (`52:54:00:xx:xx:xx`), then stored and never changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Host tap device name. Created by the agent at start (or attached,
    /// if an admin created it persistent); generated at define when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// Bridge the agent attaches the tap to at start; none = the host's
    /// own setup (hooks, networkd) takes care of the tap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    /// Queue pairs of the virtio-net device (multi-queue when above 1):
    /// guest ABI, 1 to [`MAX_QUEUES`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queues: Option<u16>,
}

/// The most queue pairs a NIC may have (its tap holds twice as many
/// queues, crate::instance::tap).
pub const MAX_QUEUES: u16 = 8;

impl Nic {
    /// Queue pairs (1 unless set).
    pub fn queues(&self) -> u16 {
        self.queues.unwrap_or(1)
    }
    /// The MAC (always set once the definition was stored).
    pub fn mac(&self) -> &str {
        self.mac.as_deref().unwrap_or("")
    }
    pub fn tap(&self) -> &str {
        self.tap.as_deref().unwrap_or("")
    }
}

/// `[A-Za-z0-9_.-]{1,15}`, not `.`/`..`: a usable Linux interface name.
pub fn valid_ifname(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= MAX_IFNAME
        && n != "."
        && n != ".."
        && n.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// `xx:xx:xx:xx:xx:xx` (hex, either case), unicast and not all zero.
pub fn parse_mac(m: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = m.split(':');
    for b in out.iter_mut() {
        let p = parts.next()?;
        // from_str_radix alone would take "+1".
        if p.len() != 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    if parts.next().is_some() || out[0] & 1 != 0 || out == [0; 6] {
        return None;
    }
    Some(out)
}

fn default_machine() -> String {
    "q35".to_string()
}
fn default_vcpus() -> u32 {
    1
}

/// A validated domain definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Definition {
    pub name: String,
    /// Generated when absent; never changes afterwards (guest ABI).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<Uuid>,
    /// Absolute path of the QEMU system emulator.
    pub emulator: PathBuf,
    /// `q35`/`pc` (resolved and pinned on first start) or a versioned type.
    #[serde(default = "default_machine")]
    pub machine: String,
    #[serde(default)]
    pub accel: Accel,
    /// QEMU CPU model (`-cpu`); QEMU's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<Topology>,
    pub memory_mib: u64,
    /// Guest RAM on huge pages of this size (`2M` or `1G`) from the host's
    /// pool; `memory_mib` must be a multiple of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugepages: Option<HugePages>,
    /// `bios` (default) or `uefi`.
    #[serde(default, skip_serializing_if = "Firmware::is_bios")]
    pub firmware: Firmware,
    /// UEFI code image, read-only (pflash 0). Pinned at define:
    /// [`OVMF_CODE`] (or [`OVMF_CODE_SECBOOT`]) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware_code: Option<PathBuf>,
    /// The VARS image the domain's NVRAM is created from, once, at its
    /// first start. Pinned at define like `firmware_code`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nvram_template: Option<PathBuf>,
    /// Secure Boot: SMM on, the flash writable only from SMM.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub secure_boot: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<Disk>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<Nic>,
    /// A virtio-serial channel `org.qemu.guest_agent.0` for the guest's
    /// qemu-guest-agent, served at the stable `<run>/domains/<name>/guest-agent.sock`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub guest_agent: bool,
    /// A VGA display and a VNC server at the stable
    /// `<run>/domains/<name>/vnc.sock`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub vnc: bool,
    /// Escape hatch: extra QEMU arguments appended verbatim. Not validated
    /// beyond refusing the options qlive controls; the user owns the result.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_args: Vec<String>,
}

/// Is `name` a valid domain name: `[A-Za-z0-9][A-Za-z0-9_.-]{0,63}`.
/// Such a name is safe as a single path component (no `/`, never `.`/`..`).
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_alphanumeric()
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// `pc-q35-7.2`, `pc-i440fx-10.0`: a versioned machine type qlive can pin.
pub fn is_versioned_machine(m: &str) -> bool {
    let rest = m
        .strip_prefix("pc-q35-")
        .or_else(|| m.strip_prefix("pc-i440fx-"));
    match rest {
        Some(v) => {
            let mut parts = v.split('.');
            let ok = |p: Option<&str>| {
                p.is_some_and(|p| {
                    !p.is_empty() && p.len() <= 3 && p.bytes().all(|c| c.is_ascii_digit())
                })
            };
            ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
        }
        None => false,
    }
}

/// The machine type aliases qlive accepts and resolves on first start.
pub fn is_machine_alias(m: &str) -> bool {
    matches!(m, "q35" | "pc")
}

fn check_abs_path(field: &str, p: &Path) -> Result<(), DefinitionError> {
    let s = p.as_os_str().as_encoded_bytes();
    if !p.is_absolute() {
        return Err(DefinitionError::invalid(
            field,
            format!("must be an absolute path (got {:?})", p),
        ));
    }
    if s.contains(&0) || s.len() > 4096 {
        return Err(DefinitionError::invalid(
            field,
            "path contains NUL or is longer than 4096 bytes",
        ));
    }
    if p.components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(DefinitionError::invalid(
            field,
            format!("must not contain `..` (got {:?})", p),
        ));
    }
    Ok(())
}

impl Definition {
    /// Parse and validate a definition from JSON bytes.
    pub fn parse(bytes: &[u8]) -> Result<Definition, DefinitionError> {
        if bytes.len() > MAX_DEFINITION_BYTES {
            return Err(DefinitionError::TooLarge {
                size: bytes.len(),
                limit: MAX_DEFINITION_BYTES,
            });
        }
        Definition::decode(&mut serde_json::Deserializer::from_slice(bytes))
    }

    /// A definition the agent stored: as strict as a new one (same types,
    /// same [`Definition::validate`]) but without the input size limit, as
    /// the agent may have grown it since (UUID, pinned machine type, a new
    /// emulator path after a migration) and a file it wrote must load again.
    pub fn from_stored(v: &serde_json::Value) -> Result<Definition, DefinitionError> {
        Definition::decode(v)
    }

    /// Deserialize with the failing field's path in the error, then check.
    fn decode<'de, D: serde::Deserializer<'de>>(de: D) -> Result<Definition, DefinitionError> {
        let def: Definition = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            DefinitionError::Parse {
                path: if path == "." {
                    "(document)".into()
                } else {
                    path
                },
                message: e.into_inner().to_string(),
            }
        })?;
        def.validate()?;
        Ok(def)
    }

    /// Parse from an already decoded JSON value (the API carries it so).
    pub fn from_value(v: &serde_json::Value) -> Result<Definition, DefinitionError> {
        let bytes = serde_json::to_vec(v).map_err(|e| DefinitionError::Parse {
            path: "(document)".into(),
            message: e.to_string(),
        })?;
        Definition::parse(&bytes)
    }

    /// Semantic checks beyond the types.
    pub fn validate(&self) -> Result<(), DefinitionError> {
        if !valid_name(&self.name) {
            return Err(DefinitionError::invalid(
                "name",
                format!(
                    "must match [A-Za-z0-9][A-Za-z0-9_.-]{{0,63}} (got {:?})",
                    self.name
                ),
            ));
        }
        if self.uuid.is_some_and(|u| u.is_nil()) {
            return Err(DefinitionError::invalid("uuid", "must not be the nil UUID"));
        }
        check_abs_path("emulator", &self.emulator)?;
        if !(is_machine_alias(&self.machine) || is_versioned_machine(&self.machine)) {
            return Err(DefinitionError::invalid(
                "machine",
                format!(
                    "must be `q35`, `pc` or a versioned type such as `pc-q35-7.2` (got {:?})",
                    self.machine
                ),
            ));
        }
        if let Some(cpu) = &self.cpu {
            let ok = !cpu.is_empty()
                && cpu.len() <= 256
                && cpu
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"_.,=+-".contains(&c));
            if !ok {
                return Err(DefinitionError::invalid(
                    "cpu",
                    format!("must be a QEMU CPU model like `max` or `host,+x2apic` (got {cpu:?})"),
                ));
            }
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(DefinitionError::invalid(
                "vcpus",
                format!("must be between 1 and {MAX_VCPUS} (got {})", self.vcpus),
            ));
        }
        if let Some(t) = self.topology {
            let product = u64::from(t.sockets) * u64::from(t.cores) * u64::from(t.threads);
            if t.sockets == 0 || t.cores == 0 || t.threads == 0 || product != u64::from(self.vcpus)
            {
                return Err(DefinitionError::invalid(
                    "topology",
                    format!(
                        "sockets * cores * threads must be `vcpus` ({}), each at least 1 (got {} * {} * {})",
                        self.vcpus, t.sockets, t.cores, t.threads
                    ),
                ));
            }
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(DefinitionError::invalid(
                "memory_mib",
                format!(
                    "must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB} (got {})",
                    self.memory_mib
                ),
            ));
        }
        if let Some(h) = self.hugepages {
            let page_mib = h.bytes() >> 20;
            if self.memory_mib % page_mib != 0 {
                return Err(DefinitionError::invalid(
                    "memory_mib",
                    format!(
                        "must be a multiple of the {} huge page ({page_mib} MiB) with `hugepages` (got {})",
                        h.as_str(),
                        self.memory_mib
                    ),
                ));
            }
        }
        self.validate_firmware()?;
        if let Some(k) = &self.kernel {
            check_abs_path("kernel", k)?;
        }
        if let Some(i) = &self.initrd {
            check_abs_path("initrd", i)?;
            if self.kernel.is_none() {
                return Err(DefinitionError::invalid("initrd", "requires `kernel`"));
            }
        }
        if let Some(c) = &self.cmdline {
            if self.kernel.is_none() {
                return Err(DefinitionError::invalid("cmdline", "requires `kernel`"));
            }
            if c.len() > MAX_CMDLINE || c.contains('\0') {
                return Err(DefinitionError::invalid(
                    "cmdline",
                    format!("must be at most {MAX_CMDLINE} bytes without NUL"),
                ));
            }
        }
        if self.disks.len() > MAX_DISKS {
            return Err(DefinitionError::invalid(
                "disks",
                format!("at most {MAX_DISKS} disks (got {})", self.disks.len()),
            ));
        }
        for (i, d) in self.disks.iter().enumerate() {
            check_abs_path(&format!("disks[{i}].path"), &d.path)?;
            if d.aio == DiskAio::Native && !d.cache.flags().0 {
                return Err(DefinitionError::invalid(
                    format!("disks[{i}].aio"),
                    "`native` needs O_DIRECT: use cache `none` or `directsync`",
                ));
            }
            if let Some(j) = self.disks[..i].iter().position(|o| o.path == d.path) {
                return Err(DefinitionError::invalid(
                    format!("disks[{i}].path"),
                    format!("same image as disks[{j}]"),
                ));
            }
        }
        if self.nics.len() > MAX_NICS {
            return Err(DefinitionError::invalid(
                "nics",
                format!("at most {MAX_NICS} NICs (got {})", self.nics.len()),
            ));
        }
        for (i, n) in self.nics.iter().enumerate() {
            if let Some(m) = &n.mac {
                if parse_mac(m).is_none() {
                    return Err(DefinitionError::invalid(
                        format!("nics[{i}].mac"),
                        format!("must be a unicast MAC like 52:54:00:12:34:56 (got {m:?})"),
                    ));
                }
                if let Some(j) = self.nics[..i].iter().position(|o| {
                    o.mac.as_deref().map(str::to_ascii_lowercase) == Some(m.to_ascii_lowercase())
                }) {
                    return Err(DefinitionError::invalid(
                        format!("nics[{i}].mac"),
                        format!("same MAC as nics[{j}]"),
                    ));
                }
            }
            for (what, v) in [("tap", &n.tap), ("bridge", &n.bridge)] {
                if let Some(v) = v {
                    if !valid_ifname(v) {
                        return Err(DefinitionError::invalid(
                            format!("nics[{i}].{what}"),
                            format!("must be an interface name of 1 to {MAX_IFNAME} characters from [A-Za-z0-9_.-] (got {v:?})"),
                        ));
                    }
                }
            }
            if let Some(q) = n.queues {
                if !(1..=MAX_QUEUES).contains(&q) {
                    return Err(DefinitionError::invalid(
                        format!("nics[{i}].queues"),
                        format!("must be 1 to {MAX_QUEUES} (got {q})"),
                    ));
                }
            }
            if let Some(t) = &n.tap {
                if let Some(j) = self.nics[..i]
                    .iter()
                    .position(|o| o.tap.as_ref() == Some(t))
                {
                    return Err(DefinitionError::invalid(
                        format!("nics[{i}].tap"),
                        format!("same tap as nics[{j}]"),
                    ));
                }
            }
        }
        if self.extra_args.len() > MAX_EXTRA_ARGS {
            return Err(DefinitionError::invalid(
                "extra_args",
                format!("at most {MAX_EXTRA_ARGS} arguments"),
            ));
        }
        for (i, a) in self.extra_args.iter().enumerate() {
            if a.contains('\0') || a.len() > 4096 {
                return Err(DefinitionError::invalid(
                    format!("extra_args[{i}]"),
                    "contains NUL or is longer than 4096 bytes",
                ));
            }
            // QEMU accepts both -opt and --opt.
            let opt = a
                .strip_prefix('-')
                .map(|s| format!("-{}", s.trim_start_matches('-')));
            let opt = opt.as_deref().map(|o| o.split('=').next().unwrap_or(o));
            if let Some(o) = opt {
                if RESERVED_QEMU_OPTIONS.contains(&o) {
                    return Err(DefinitionError::invalid(
                        format!("extra_args[{i}]"),
                        format!("`{o}` is controlled by qlive and may not be overridden"),
                    ));
                }
                // A host endpoint each QEMU would bind for itself: the
                // destination cannot, the exiting source unlinks it.
                let value = a
                    .split_once('=')
                    .map(|(_, v)| v)
                    .or(self.extra_args.get(i + 1).map(String::as_str));
                if o == "-vnc" || (o == "-display" && value.is_some_and(|v| v.starts_with("vnc"))) {
                    return Err(DefinitionError::invalid(
                        format!("extra_args[{i}]"),
                        "a VNC server QEMU binds itself breaks at the first migration; \
                         set `vnc: true` (docs/devices.md, escape hatches)",
                    ));
                }
                if o == "-drive" && value.is_some_and(|v| v.split(',').any(|p| p == "if=pflash"))
                    || o == "-pflash"
                {
                    return Err(DefinitionError::invalid(
                        format!("extra_args[{i}]"),
                        "pflash drives are how qlive gives UEFI its code and NVRAM; set \
                         `firmware: \"uefi\"` (and `firmware_code`, `nvram_template`) so the \
                         NVRAM is the domain's own and stale detection sees the code \
                         (docs/devices.md, escape hatches)",
                    ));
                }
                if o == "-bios" && self.firmware == Firmware::Uefi {
                    return Err(DefinitionError::invalid(
                        format!("extra_args[{i}]"),
                        "`-bios` conflicts with `firmware: \"uefi\"`; name the image in `firmware_code`",
                    ));
                }
                if o == "-chardev" && value.is_some_and(|v| v.split(',').next() == Some("socket")) {
                    return Err(DefinitionError::invalid(
                        format!("extra_args[{i}]"),
                        "a socket chardev is bound by each QEMU and breaks at the first \
                         migration; for the guest agent set `guest_agent: true` \
                         (docs/devices.md, escape hatches)",
                    ));
                }
            }
        }
        Ok(())
    }

    fn validate_firmware(&self) -> Result<(), DefinitionError> {
        if self.firmware == Firmware::Bios {
            for (field, set) in [
                ("firmware_code", self.firmware_code.is_some()),
                ("nvram_template", self.nvram_template.is_some()),
                ("secure_boot", self.secure_boot),
            ] {
                if set {
                    return Err(DefinitionError::invalid(
                        field,
                        "requires `firmware: \"uefi\"`",
                    ));
                }
            }
            return Ok(());
        }
        if let Some(p) = &self.firmware_code {
            check_abs_path("firmware_code", p)?;
        }
        if let Some(p) = &self.nvram_template {
            check_abs_path("nvram_template", p)?;
        }
        let q35 = self.machine == "q35" || self.machine.starts_with("pc-q35-");
        if self.secure_boot && !q35 {
            return Err(DefinitionError::invalid(
                "secure_boot",
                format!(
                    "needs SMM, which OVMF supports on q35 machines only (got machine {:?})",
                    self.machine
                ),
            ));
        }
        Ok(())
    }

    /// Pin the firmware images of a UEFI definition (at define): the
    /// distribution's OVMF when none is named, so that what a domain boots
    /// does not change with qlive's defaults.
    pub fn assign_firmware_defaults(&mut self) {
        if self.firmware != Firmware::Uefi {
            return;
        }
        let (code, vars) = if self.secure_boot {
            (OVMF_CODE_SECBOOT, OVMF_VARS_SECBOOT)
        } else {
            (OVMF_CODE, OVMF_VARS)
        };
        self.firmware_code
            .get_or_insert_with(|| PathBuf::from(code));
        self.nvram_template
            .get_or_insert_with(|| PathBuf::from(vars));
    }

    /// Fill in what define generates: MACs and tap names. `uuid` must be
    /// set first (tap names derive from it, so they are stable and unique
    /// per domain).
    pub fn assign_nic_defaults(&mut self, rand: impl Fn() -> [u8; 3]) {
        // The last 10 hex digits: random in v4 and v7 UUIDs alike (the
        // first ones are a timestamp in v7).
        let tag = self
            .uuid
            .map(|u| u.simple().to_string()[22..].to_string())
            .unwrap_or_default();
        let mut taken: Vec<String> = self
            .nics
            .iter()
            .filter_map(|n| n.mac.as_deref().map(str::to_ascii_lowercase))
            .collect();
        let mut taps: Vec<String> = self.nics.iter().filter_map(|n| n.tap.clone()).collect();
        for (i, n) in self.nics.iter_mut().enumerate() {
            // `qlv<tag>n<i>`, or the next free index if the user named
            // another NIC's tap so (the definition stays valid).
            let mut k = i;
            while n.tap.is_none() {
                let t = format!("qlv{tag}n{k}");
                if !taps.contains(&t) && t.len() <= MAX_IFNAME {
                    taps.push(t.clone());
                    n.tap = Some(t);
                }
                k += 1;
                if k > i + MAX_NICS + 1 {
                    // Cannot happen with <= MAX_NICS NICs; stay valid anyway.
                    let t = format!("qlv{}", &tag[..tag.len().min(8)]);
                    n.tap = Some(format!("{t}x{i}"));
                }
            }
            while n.mac.is_none() {
                let r = rand();
                let m = format!("52:54:00:{:02x}:{:02x}:{:02x}", r[0], r[1], r[2]);
                if !taken.contains(&m) {
                    taken.push(m.clone());
                    n.mac = Some(m);
                }
            }
        }
    }

    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib * 1024 * 1024
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> serde_json::Value {
        serde_json::json!({
            "name": "vm1",
            "emulator": "/usr/bin/qemu-system-x86_64",
            "memory_mib": 256,
        })
    }

    /// `info` shows these names with `as_str`; they must be the stored ones.
    #[test]
    fn as_str_is_the_serialized_name() {
        let name = |v: serde_json::Value| v.as_str().unwrap_or_default().to_string();
        for a in [Accel::Kvm, Accel::Tcg, Accel::Auto] {
            assert_eq!(name(serde_json::json!(a)), a.as_str());
        }
        for f in [DiskFormat::Raw, DiskFormat::Qcow2] {
            assert_eq!(name(serde_json::json!(f)), f.as_str());
        }
        for c in [
            DiskCache::Writeback,
            DiskCache::None,
            DiskCache::Writethrough,
            DiskCache::Directsync,
        ] {
            assert_eq!(name(serde_json::json!(c)), c.as_str());
        }
        for a in [DiskAio::Threads, DiskAio::Native, DiskAio::IoUring] {
            assert_eq!(name(serde_json::json!(a)), a.as_str());
        }
        for h in [HugePages::Size2M, HugePages::Size1G] {
            assert_eq!(name(serde_json::json!(h)), h.as_str());
        }
        for f in [Firmware::Bios, Firmware::Uefi] {
            assert_eq!(name(serde_json::json!(f)), f.as_str());
        }
    }

    #[test]
    fn topology_must_multiply_to_vcpus() {
        let mut v = base();
        v["vcpus"] = 4.into();
        v["topology"] = serde_json::json!({"sockets": 1, "cores": 2, "threads": 2});
        let d = Definition::from_value(&v).unwrap();
        assert_eq!(d.topology.map(|t| t.cores), Some(2));
        v["topology"] = serde_json::json!({"sockets": 2, "cores": 2, "threads": 2});
        let e = err(v.clone());
        assert!(e.contains("`topology`") && e.contains("(4)"), "{e}");
        v["topology"] = serde_json::json!({"sockets": 4, "cores": 1, "threads": 0});
        assert!(err(v.clone()).contains("`topology`"));
        v["topology"] = serde_json::json!({"sockets": 4, "cores": 1});
        assert!(err(v).contains("topology"));
    }

    #[test]
    fn uefi_defaults_are_pinned_and_bios_fields_refused() {
        let d = Definition::from_value(&base()).unwrap();
        assert_eq!(d.firmware, Firmware::Bios);
        assert!(serde_json::to_value(&d).unwrap().get("firmware").is_none());
        for (field, value) in [
            ("firmware_code", serde_json::json!("/fw/code.fd")),
            ("nvram_template", serde_json::json!("/fw/vars.fd")),
            ("secure_boot", serde_json::json!(true)),
        ] {
            let mut v = base();
            v[field] = value;
            let e = err(v);
            assert!(
                e.contains(&format!("`{field}`")) && e.contains("uefi"),
                "{e}"
            );
        }
        let mut v = base();
        v["firmware"] = "uefi".into();
        let mut d = Definition::from_value(&v).unwrap();
        d.assign_firmware_defaults();
        assert_eq!(d.firmware_code.as_deref(), Some(Path::new(OVMF_CODE)));
        assert_eq!(d.nvram_template.as_deref(), Some(Path::new(OVMF_VARS)));
        // stored and loaded again as pinned
        let again = Definition::from_stored(&serde_json::to_value(&d).unwrap()).unwrap();
        assert_eq!(again, d);
        v["secure_boot"] = true.into();
        let mut d = Definition::from_value(&v).unwrap();
        d.assign_firmware_defaults();
        assert_eq!(
            d.firmware_code.as_deref(),
            Some(Path::new(OVMF_CODE_SECBOOT))
        );
        assert_eq!(
            d.nvram_template.as_deref(),
            Some(Path::new(OVMF_VARS_SECBOOT))
        );
        // a named image is kept
        v["firmware_code"] = "/opt/fw/CODE.fd".into();
        let mut d = Definition::from_value(&v).unwrap();
        d.assign_firmware_defaults();
        assert_eq!(
            d.firmware_code.as_deref(),
            Some(Path::new("/opt/fw/CODE.fd"))
        );
        v["firmware_code"] = "fw/CODE.fd".into();
        assert!(err(v.clone()).contains("`firmware_code`: must be an absolute path"));
        v["firmware_code"] = "/opt/fw/CODE.fd".into();
        v["machine"] = "pc".into();
        let e = err(v.clone());
        assert!(e.contains("`secure_boot`") && e.contains("q35"), "{e}");
        v["secure_boot"] = false.into();
        assert!(Definition::from_value(&v).is_ok());
        v["firmware"] = "coreboot".into();
        assert!(err(v).contains("firmware"));
    }

    #[test]
    fn pflash_escape_hatches_are_refused_naming_firmware() {
        for args in [
            vec![
                "-drive",
                "if=pflash,format=raw,unit=0,readonly=on,file=/c.fd",
            ],
            vec!["--drive", "file=/v.fd,if=pflash,format=raw,unit=1"],
            vec!["-pflash", "/c.fd"],
        ] {
            let mut v = base();
            v["extra_args"] = serde_json::json!(args);
            let e = err(v);
            assert!(e.contains("extra_args[0]") && e.contains("firmware"), "{e}");
        }
        // other drives stay the user's business
        let mut v = base();
        v["extra_args"] = serde_json::json!(["-drive", "if=none,id=x,file=/d.img"]);
        assert!(Definition::from_value(&v).is_ok());
        // -bios only with the BIOS it replaces
        v["extra_args"] = serde_json::json!(["-bios", "/b.bin"]);
        assert!(Definition::from_value(&v).is_ok());
        v["firmware"] = "uefi".into();
        assert!(err(v).contains("`-bios` conflicts"));
    }

    #[test]
    fn guest_agent_is_stored_only_when_on() {
        let d = Definition::from_value(&base()).unwrap();
        assert!(!d.guest_agent);
        assert!(serde_json::to_value(&d)
            .unwrap()
            .get("guest_agent")
            .is_none());
        let mut v = base();
        v["guest_agent"] = true.into();
        let d = Definition::from_value(&v).unwrap();
        assert_eq!(serde_json::to_value(&d).unwrap()["guest_agent"], true);
    }

    #[test]
    fn hugepages_need_whole_pages() {
        let mut v = base();
        v["hugepages"] = "2M".into();
        assert_eq!(
            Definition::from_value(&v).unwrap().hugepages,
            Some(HugePages::Size2M)
        );
        v["memory_mib"] = 257.into();
        let e = err(v.clone());
        assert!(e.contains("`memory_mib`") && e.contains("2 MiB"), "{e}");
        v["memory_mib"] = 512.into();
        v["hugepages"] = "1G".into();
        let e = err(v.clone());
        assert!(e.contains("1024 MiB"), "{e}");
        v["hugepages"] = "4K".into();
        let e = err(v);
        assert!(e.contains("hugepages"), "{e}");
    }

    fn err(v: serde_json::Value) -> String {
        Definition::from_value(&v).unwrap_err().to_string()
    }

    #[test]
    fn minimal_definition_gets_defaults() {
        let d = Definition::from_value(&base()).unwrap();
        assert_eq!(d.machine, "q35");
        assert_eq!(d.accel, Accel::Auto);
        assert_eq!(d.vcpus, 1);
        assert!(d.uuid.is_none());
    }

    #[test]
    fn unknown_field_is_named() {
        let mut v = base();
        v["memroy_mib"] = 3.into();
        let e = err(v);
        assert!(e.contains("memroy_mib"), "{e}");
    }

    #[test]
    fn nested_type_error_names_path() {
        let mut v = base();
        v["disks"] = serde_json::json!([{"path": "/a.img", "format": "vmdk"}]);
        let e = err(v);
        assert!(e.contains("disks[0].format"), "{e}");
    }

    #[test]
    fn bad_values_name_their_field() {
        for (field, val) in [
            ("name", serde_json::json!("../etc")),
            ("name", serde_json::json!("")),
            ("name", serde_json::json!("a/b")),
            ("emulator", serde_json::json!("qemu")),
            ("machine", serde_json::json!("virt")),
            ("vcpus", serde_json::json!(0)),
            ("memory_mib", serde_json::json!(1)),
            ("cpu", serde_json::json!("max;rm")),
        ] {
            let mut v = base();
            v[field] = val;
            let e = err(v);
            assert!(e.contains(&format!("`{field}`")), "{field}: {e}");
        }
    }

    #[test]
    fn socket_chardevs_are_refused_naming_the_field_to_use() {
        for args in [
            serde_json::json!(["-chardev", "socket,id=qga0,path=/tmp/qga.sock,server=on"]),
            serde_json::json!(["-device", "x", "--chardev=socket,id=a,host=::,port=4444"]),
        ] {
            let mut v = base();
            v["extra_args"] = args.clone();
            let e = err(v);
            assert!(e.contains("guest_agent"), "{args}: {e}");
        }
        let mut v = base();
        v["extra_args"] = serde_json::json!(["-chardev", "file,id=log,path=/tmp/x.log"]);
        Definition::from_value(&v).unwrap();
        for args in [
            serde_json::json!(["-vnc", "unix:/tmp/v.sock"]),
            serde_json::json!(["-display", "vnc=:1"]),
        ] {
            let mut v = base();
            v["extra_args"] = args.clone();
            let e = err(v);
            assert!(e.contains("`vnc: true`"), "{args}: {e}");
        }
    }

    #[test]
    fn reserved_extra_args_refused() {
        let mut v = base();
        v["extra_args"] = serde_json::json!(["-device", "virtio-rng-pci", "--incoming", "x"]);
        let e = err(v);
        assert!(
            e.contains("extra_args[2]") && e.contains("-incoming"),
            "{e}"
        );
    }

    #[test]
    fn oversized_refused() {
        let big = vec![b' '; MAX_DEFINITION_BYTES + 1];
        assert!(matches!(
            Definition::parse(&big),
            Err(DefinitionError::TooLarge { .. })
        ));
    }

    #[test]
    fn names() {
        assert!(valid_name("a"));
        assert!(valid_name("web-01.prod_x"));
        assert!(!valid_name("-a"));
        assert!(!valid_name(".."));
        assert!(!valid_name(&"a".repeat(65)));
        assert!(valid_name(&"a".repeat(64)));
    }

    #[test]
    fn nics_validated_and_defaults_assigned() {
        let mut v = base();
        v["nics"] = serde_json::json!([{"mac": "53:54:00:00:00:01"}]);
        assert!(err(v).contains("nics[0].mac"));
        let mut v = base();
        v["nics"] = serde_json::json!([{"tap": "a/b"}]);
        assert!(err(v).contains("nics[0].tap"));
        let mut v = base();
        v["nics"] = serde_json::json!([{"tap": "t0"}, {"tap": "t0"}]);
        assert!(err(v).contains("same tap as nics[0]"));
        let mut v = base();
        v["nics"] = serde_json::json!([{"bridge": "waytoolongbridge0"}]);
        assert!(err(v).contains("nics[0].bridge"));
        for q in [0, 9, 300] {
            let mut v = base();
            v["nics"] = serde_json::json!([{"queues": q}]);
            assert!(err(v).contains("nics[0].queues"), "queues {q}");
        }
        let mut v = base();
        v["nics"] = serde_json::json!([{"mac": "52:54:00:AA:00:01"}, {}, {}]);
        let mut d = Definition::from_value(&v).unwrap();
        d.uuid = Some(Uuid::parse_str("1a2b3c4d-0000-4000-8000-000000000000").unwrap());
        let seq = std::cell::Cell::new(0u8);
        // a generator that first repeats the user's MAC: must be skipped
        d.assign_nic_defaults(|| {
            seq.set(seq.get() + 1);
            if seq.get() == 1 {
                [0xaa, 0, 1]
            } else {
                [seq.get(), 0, 0]
            }
        });
        assert_eq!(d.nics[0].mac(), "52:54:00:AA:00:01");
        assert_eq!(d.nics[1].mac(), "52:54:00:02:00:00");
        assert_eq!(d.nics[2].mac(), "52:54:00:03:00:00");
        assert_eq!(d.nics[1].tap(), "qlv0000000000n1");
        d.validate().unwrap();
        assert_eq!(
            parse_mac("52:54:00:aa:00:01"),
            Some([0x52, 0x54, 0, 0xaa, 0, 1])
        );
        assert_eq!(parse_mac("00:00:00:00:00:00"), None);
        assert_eq!(parse_mac("52:54:00:aa:00"), None);
        assert_eq!(parse_mac("52:54:00:+1:00:02"), None);
        assert_eq!(parse_mac("52:54:00:aa:00:01:02"), None);
    }

    #[test]
    fn machines() {
        assert!(is_versioned_machine("pc-q35-7.2"));
        assert!(is_versioned_machine("pc-i440fx-10.0"));
        assert!(!is_versioned_machine("pc-q35-7"));
        assert!(!is_versioned_machine("pc-q35-7.2.1"));
        assert!(!is_versioned_machine("q35"));
    }
}
