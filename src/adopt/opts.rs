//! QEMU's option syntax, as read back from `/proc/PID/cmdline`: the split of
//! argv into options and their arguments ([`split_argv`]), and QemuOpts
//! values (`key=value,key=value`, a comma doubled to escape it, an implied
//! first key, `-device`/`-object`/`-blockdev` also as JSON) ([`parse_opts`]).
//! Pure: no I/O, unit-tested.

use serde_json::Value;
use std::collections::BTreeMap;

/// Options QEMU's option table gives an argument. An option not in this
/// list nor in [`NO_ARG`] is unknown here: refused, and its argument
/// cannot be told from the next option, so the split guesses (a next
/// token not starting with `-` is taken as its argument).
const WITH_ARG: &[&str] = &[
    "machine",
    "M",
    "m",
    "smp",
    "cpu",
    "accel",
    "kernel",
    "initrd",
    "append",
    "drive",
    "blockdev",
    "device",
    "netdev",
    "nic",
    "net",
    "object",
    "serial",
    "chardev",
    "display",
    "vnc",
    "bios",
    "qmp",
    "qmp-pretty",
    "mon",
    "monitor",
    "name",
    "uuid",
    "pidfile",
    "L",
    "global",
    "boot",
    "rtc",
    "k",
    "vga",
    "chroot",
    "runas",
    "run-with",
    "sandbox",
    "D",
    "d",
    "trace",
    "add-fd",
    "incoming",
    "fsdev",
    "virtfs",
    "usbdevice",
    "numa",
    "mem-path",
    "hda",
    "hdb",
    "hdc",
    "hdd",
    "cdrom",
    "fda",
    "fdb",
    "mtdblock",
    "sd",
    "pflash",
    "parallel",
    "audiodev",
    "audio",
    "spice",
    "smbios",
    "acpitable",
    "fw_cfg",
    "icount",
    "watchdog-action",
    "action",
    "option-rom",
    "loadvm",
    "readconfig",
    "writeconfig",
    "set",
    "msg",
    "semihosting-config",
    "tpmdev",
    "iscsi",
    "plugin",
    "compat",
    "overcommit",
    "dfilter",
    "seed",
    "gdb",
    "debugcon",
    "echr",
    "xen-domid",
    "xen-attach",
    "g",
    "rotate",
    "portrait",
    "qtest",
    "qtest-log",
];

/// Options without an argument.
const NO_ARG: &[&str] = &[
    "nographic",
    "nodefaults",
    "enable-kvm",
    "S",
    "daemonize",
    "no-reboot",
    "no-shutdown",
    "no-user-config",
    "no-hpet",
    "no-acpi",
    "snapshot",
    "s",
    "usb",
    "full-screen",
    "no-fd-bootchk",
    "no-frame",
    "alt-grab",
    "ctrl-grab",
    "no-quit",
    "win2k-hack",
    "old-param",
    "preconfig",
    "mem-prealloc",
    "enable-sync-profile",
    "only-migratable",
    "nodefconfig",
    "version",
    "help",
    "h",
    "curses",
    "xen-domid-restrict",
];

/// One option of the command line: `name` without its dashes (`-device`
/// and `--device` are one), `arg` its argument, `at` its position in argv
/// (1 is the first after the program name), `known` false for an option
/// neither table has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CmdOpt {
    pub name: String,
    pub arg: Option<String>,
    pub at: usize,
    pub known: bool,
}

impl CmdOpt {
    /// How it is named in a refusal: `-netdev user,id=n1`.
    pub fn shown(&self) -> String {
        match &self.arg {
            Some(a) => format!("-{} {}", self.name, shorten(a)),
            None => format!("-{}", self.name),
        }
    }
}

/// At most 120 characters of `s` (refusals name options, not whole paths).
pub fn shorten(s: &str) -> String {
    match s.char_indices().nth(120) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

/// What [`split_argv`] could not read as an option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SplitProblem {
    /// A bare argument (QEMU takes it as the first hard disk image).
    Positional { at: usize, arg: String },
    /// An option that needs an argument, at the end of argv.
    MissingArg { at: usize, name: String },
}

/// Split argv (without the program name) into options, in order.
pub fn split_argv(args: &[String]) -> (Vec<CmdOpt>, Vec<SplitProblem>) {
    let mut opts = Vec::new();
    let mut problems = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        let at = i + 1;
        let Some(stripped) = a.strip_prefix('-').filter(|s| !s.is_empty()) else {
            problems.push(SplitProblem::Positional { at, arg: a.clone() });
            i += 1;
            continue;
        };
        // QEMU takes `--opt` as `-opt`.
        let name = stripped.strip_prefix('-').unwrap_or(stripped).to_string();
        let with_arg = WITH_ARG.contains(&name.as_str());
        let known = with_arg || NO_ARG.contains(&name.as_str());
        let takes = if known {
            with_arg
        } else {
            args.get(i + 1).is_some_and(|n| !n.starts_with('-'))
        };
        if takes {
            match args.get(i + 1) {
                Some(v) => {
                    opts.push(CmdOpt {
                        name,
                        arg: Some(v.clone()),
                        at,
                        known,
                    });
                    i += 2;
                }
                None => {
                    problems.push(SplitProblem::MissingArg { at, name });
                    i += 1;
                }
            }
        } else {
            opts.push(CmdOpt {
                name,
                arg: None,
                at,
                known,
            });
            i += 1;
        }
    }
    (opts, problems)
}

/// The keys and values of one option argument, in QemuOpts or JSON syntax.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Props {
    map: BTreeMap<String, String>,
}

impl Props {
    /// Remove `key` and return its value: the learner takes every key it
    /// understands, and what is left over is refused.
    pub fn take(&mut self, key: &str) -> Option<String> {
        self.map.remove(key)
    }
    pub fn get(&self, key: &str) -> Option<&str> {
        self.map.get(key).map(String::as_str)
    }
    /// `on`/`off` (and QEMU's other spellings of a bool); `Err` with the
    /// value when it is none of them.
    pub fn take_bool(&mut self, key: &str) -> Result<Option<bool>, String> {
        match self.take(key) {
            None => Ok(None),
            Some(v) => match v.as_str() {
                "on" | "yes" | "true" | "y" => Ok(Some(true)),
                "off" | "no" | "false" | "n" => Ok(Some(false)),
                _ => Err(format!("{key}={v}")),
            },
        }
    }
    /// What was not taken, as `key=value` strings.
    pub fn leftover(&self) -> Vec<String> {
        self.map.iter().map(|(k, v)| format!("{k}={v}")).collect()
    }
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Parse one option argument. `implied` is the key a first element
/// without `=` stands for (`-netdev tap,...`: `type`; `-device x`:
/// `driver`). A key without `=` elsewhere means `key=on`. A doubled comma
/// is a comma in the value. A key given twice is refused (QemuOpts keeps
/// the last for most options and merges for some: not guessed here). An
/// argument starting with `{` is JSON (nested objects become dotted keys,
/// as QEMU's keyval syntax writes them).
pub fn parse_opts(arg: &str, implied: Option<&str>) -> Result<Props, String> {
    let mut map = BTreeMap::new();
    if arg.trim_start().starts_with('{') {
        let v: Value = serde_json::from_str(arg).map_err(|e| format!("invalid JSON: {e}"))?;
        // JSON names the implied key itself (`driver`, `qom-type`).
        flatten("", &v, &mut map)?;
        return Ok(Props { map });
    }
    let mut parts: Vec<String> = Vec::new();
    let mut cur = String::new();
    let mut chars = arg.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                parts.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    for (i, p) in parts.into_iter().enumerate() {
        let (k, v) = match p.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None if i == 0 && implied.is_some() => {
                (implied.unwrap_or_default().to_string(), p.clone())
            }
            None if p.is_empty() => {
                return Err("an empty element (a stray comma?)".into());
            }
            None => (p.clone(), "on".to_string()),
        };
        if k.is_empty() {
            return Err(format!("an element without a key: {p:?}"));
        }
        if map.insert(k.clone(), v).is_some() {
            return Err(format!("key {k} given twice"));
        }
    }
    Ok(Props { map })
}

fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, String>) -> Result<(), String> {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out)?;
            }
            Ok(())
        }
        Value::String(s) => {
            out.insert(prefix.to_string(), s.clone());
            Ok(())
        }
        Value::Bool(b) => {
            out.insert(prefix.to_string(), if *b { "on" } else { "off" }.into());
            Ok(())
        }
        Value::Number(n) => {
            out.insert(prefix.to_string(), n.to_string());
            Ok(())
        }
        Value::Null | Value::Array(_) => Err(format!("{prefix}: a null or a list is not learned")),
    }
}

/// A QEMU size (`-m 256`, `size=1G`): the number in bytes. A plain number
/// is `default_unit` (MiB for `-m`, bytes for `size=`); suffixes K, M, G,
/// T (either case, an optional `B` or `iB` after them is not QEMU's syntax
/// and is refused).
pub fn parse_size(s: &str, default_unit: u64) -> Option<u64> {
    let (num, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => (&s[..i], &s[i..]),
        None => (s, ""),
    };
    if num.is_empty() {
        return None;
    }
    let n: u64 = num.parse().ok()?;
    let mul: u64 = match unit {
        "" => default_unit,
        "b" | "B" => 1,
        "k" | "K" => 1 << 10,
        "m" | "M" => 1 << 20,
        "g" | "G" => 1 << 30,
        "t" | "T" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mul)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn doubled_commas_are_commas_in_the_value() {
        let mut p = parse_opts("file=/srv/a,,b.qcow2,format=qcow2,if=none,id=d0", None).unwrap();
        assert_eq!(p.take("file").as_deref(), Some("/srv/a,b.qcow2"));
        assert_eq!(p.take("format").as_deref(), Some("qcow2"));
        // a value ending in an escaped comma, then another key
        let mut p = parse_opts("socket,id=c,,x,,,path=/p", Some("backend")).unwrap();
        assert_eq!(p.take("backend").as_deref(), Some("socket"));
        assert_eq!(p.take("id").as_deref(), Some("c,x,"));
        assert_eq!(p.take("path").as_deref(), Some("/p"));
        assert!(p.is_empty());
    }

    #[test]
    fn implied_key_bare_flags_and_duplicates() {
        let mut p = parse_opts("tap,id=n0,vhost", Some("type")).unwrap();
        assert_eq!(p.take("type").as_deref(), Some("tap"));
        assert_eq!(p.take_bool("vhost"), Ok(Some(true)));
        assert_eq!(p.leftover(), vec!["id=n0".to_string()]);
        // without an implied key a bare first element is a flag
        let p = parse_opts("readonly,file=/x", None).unwrap();
        assert_eq!(p.get("readonly"), Some("on"));
        assert!(parse_opts("a=1,a=2", None).unwrap_err().contains("twice"));
        assert!(parse_opts("a=1,,", None).is_ok());
        assert!(parse_opts("a=1,", None).is_err());
        let mut p = parse_opts("x,mq=maybe", Some("driver")).unwrap();
        assert_eq!(p.take_bool("mq"), Err("mq=maybe".into()));
    }

    #[test]
    fn json_arguments_become_dotted_keys() {
        let p = parse_opts(
            r#"{"driver":"file","node-name":"f0","filename":"/a","cache":{"direct":false},"read-only":true}"#,
            Some("driver"),
        )
        .unwrap();
        assert_eq!(p.get("driver"), Some("file"));
        assert_eq!(p.get("cache.direct"), Some("off"));
        assert_eq!(p.get("read-only"), Some("on"));
        assert!(parse_opts(r#"{"a":[1]}"#, None).is_err());
    }

    #[test]
    fn argv_split_keeps_order_and_flags_unknown_options() {
        let (opts, problems) = split_argv(&argv(&[
            "-machine",
            "q35",
            "--m",
            "256",
            "-nographic",
            "disk.img",
            "-device",
            "virtio-blk-pci,drive=d0",
            "-device",
            "virtio-net-pci,netdev=n0",
            "-frobnicate",
            "x",
            "-enable-frob",
            "-kernel",
        ]));
        let names: Vec<&str> = opts.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "machine",
                "m",
                "nographic",
                "device",
                "device",
                "frobnicate",
                "enable-frob"
            ]
        );
        // -device order is argv order
        assert_eq!(opts[3].arg.as_deref(), Some("virtio-blk-pci,drive=d0"));
        assert_eq!(opts[4].arg.as_deref(), Some("virtio-net-pci,netdev=n0"));
        assert!(opts[..5].iter().all(|o| o.known));
        assert!(!opts[5].known && opts[5].arg.as_deref() == Some("x"));
        assert!(!opts[6].known && opts[6].arg.is_none());
        assert_eq!(
            problems,
            [
                SplitProblem::Positional {
                    at: 6,
                    arg: "disk.img".into()
                },
                SplitProblem::MissingArg {
                    at: 14,
                    name: "kernel".into()
                }
            ]
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256", 1 << 20), Some(256 << 20));
        assert_eq!(parse_size("1G", 1 << 20), Some(1 << 30));
        assert_eq!(parse_size("268435456", 1), Some(256 << 20));
        assert_eq!(parse_size("512M", 1), Some(512 << 20));
        assert_eq!(parse_size("1GiB", 1), None);
        assert_eq!(parse_size("", 1), None);
        assert_eq!(parse_size("M", 1), None);
    }
}
