//! Probing an emulator binary: does it run, which version is it, which
//! machine types and migration capabilities does it have. Used to pin the
//! machine type on first start and (by migration) as the target preflight.
//!
//! The probe runs `EMULATOR -machine none -S -qmp stdio` and talks QMP over
//! its stdio. Results are cached per (path, device, inode, mtime), so a
//! binary replaced by a package upgrade is probed again.

use crate::qmp::{QemuVersion, Qmp};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("emulator {path} does not exist")]
    Missing { path: PathBuf },
    #[error("emulator {path} is not an executable file")]
    NotExecutable { path: PathBuf },
    #[error("running emulator {path}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("emulator {path} did not answer QMP: {reason}; stderr: {stderr}")]
    NoQmp {
        path: PathBuf,
        reason: String,
        stderr: String,
    },
    #[error("emulator {path} does not support machine type {machine:?}")]
    NoMachine { path: PathBuf, machine: String },
    #[error("emulator {path} does not know CPU model {model:?} (field `cpu`)")]
    NoCpuModel { path: PathBuf, model: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineType {
    pub name: String,
    #[serde(default)]
    pub alias: Option<String>,
}

/// One entry of `query-cpu-definitions`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CpuModel {
    pub name: String,
    /// The versioned model an unversioned name stands for (`EPYC` ->
    /// `EPYC-v1` on the pc machine types).
    #[serde(default, rename = "alias-of")]
    pub alias_of: Option<String>,
    /// QEMU's own word: the model's CPUID is fixed, the same in every
    /// QEMU version (false for `host` and `max`).
    #[serde(default, rename = "migration-safe")]
    pub migration_safe: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EmulatorInfo {
    pub path: PathBuf,
    pub version: QemuVersion,
    pub machines: Vec<MachineType>,
    pub migration_capabilities: Vec<String>,
    /// Where this binary looks for firmware (`-L help`), in search order.
    #[serde(default)]
    pub data_dirs: Vec<PathBuf>,
    /// The CPU models it has (`query-cpu-definitions`).
    #[serde(default)]
    pub cpu_models: Vec<CpuModel>,
}

impl EmulatorInfo {
    /// Resolve an alias (`q35`) to the versioned type it stands for, or
    /// check that a versioned type is supported.
    pub fn resolve_machine(&self, m: &str) -> Result<String, ProbeError> {
        if let Some(t) = self.machines.iter().find(|t| t.alias.as_deref() == Some(m)) {
            return Ok(t.name.clone());
        }
        if self.machines.iter().any(|t| t.name == m) {
            return Ok(m.to_string());
        }
        Err(ProbeError::NoMachine {
            path: self.path.clone(),
            machine: m.to_string(),
        })
    }

    /// Resolve the model of a `cpu` value (`EPYC` or `EPYC,+x2apic`) to the
    /// versioned model it stands for, keeping the flags: CPU models are
    /// guest ABI, like machine types, and pinned on first start. `host`,
    /// `max` and versioned models stay as they are. A model this binary
    /// does not have is refused.
    pub fn resolve_cpu(&self, cpu: &str) -> Result<String, ProbeError> {
        let (model, flags) = match cpu.split_once(',') {
            Some((m, f)) => (m, Some(f)),
            None => (cpu, None),
        };
        let Some(m) = self.cpu_models.iter().find(|c| c.name == model) else {
            return Err(ProbeError::NoCpuModel {
                path: self.path.clone(),
                model: model.to_string(),
            });
        };
        let pinned = m.alias_of.as_deref().unwrap_or(model);
        Ok(match flags {
            Some(f) => format!("{pinned},{f}"),
            None => pinned.to_string(),
        })
    }

    /// The model of a `cpu` value is not the same CPU in every QEMU
    /// version (`host`, `max`): QEMU says `migration-safe: false`.
    pub fn cpu_is_version_dependent(&self, cpu: &str) -> bool {
        let model = cpu.split(',').next().unwrap_or(cpu);
        self.cpu_models
            .iter()
            .any(|c| c.name == model && c.migration_safe == Some(false))
    }

    pub fn has_migration_capability(&self, cap: &str) -> bool {
        self.migration_capabilities.iter().any(|c| c == cap)
    }
}

/// Check the emulator path before running it, for a clear error.
pub fn check_executable(path: &Path) -> Result<std::fs::Metadata, ProbeError> {
    let md = std::fs::metadata(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => ProbeError::Missing {
            path: path.to_path_buf(),
        },
        _ => ProbeError::Spawn {
            path: path.to_path_buf(),
            source: e,
        },
    })?;
    if !md.is_file() || md.permissions().mode() & 0o111 == 0 {
        return Err(ProbeError::NotExecutable {
            path: path.to_path_buf(),
        });
    }
    Ok(md)
}

/// Probe an emulator (uncached).
pub async fn probe(path: &Path) -> Result<EmulatorInfo, ProbeError> {
    check_executable(path)?;
    let mut cmd = tokio::process::Command::new(path);
    crate::instance::process::die_with_agent(&mut cmd);
    let mut child = cmd
        .args([
            "-machine",
            "none",
            "-accel",
            "tcg",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-S",
            "-qmp",
            "stdio",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| ProbeError::Spawn {
            path: path.to_path_buf(),
            source,
        })?;
    let (Some(stdin), Some(stdout), Some(mut stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return Err(ProbeError::Spawn {
            path: path.to_path_buf(),
            source: io::Error::other("no stdio pipes"),
        });
    };
    let talk = async {
        let qmp = Qmp::handshake(stdout, stdin).await?;
        let machines = qmp.execute_raw("query-machines", None).await?;
        let caps = qmp.execute_raw("query-migrate-capabilities", None).await?;
        let cpus = qmp.execute_raw("query-cpu-definitions", None).await?;
        let _ = qmp.quit().await;
        Ok::<_, crate::qmp::QmpError>((qmp.version().clone(), machines, caps, cpus))
    };
    let res = tokio::time::timeout(Duration::from_secs(30), talk).await;
    let no_qmp = |reason: String, stderr: String| ProbeError::NoQmp {
        path: path.to_path_buf(),
        reason,
        stderr,
    };
    let (version, machines, caps, cpus) = match res {
        Ok(Ok(v)) => v,
        other => {
            let _ = child.start_kill();
            let mut buf = Vec::new();
            use tokio::io::AsyncReadExt;
            let _ =
                tokio::time::timeout(Duration::from_secs(2), stderr.read_to_end(&mut buf)).await;
            let reason = match other {
                Err(_) => "timed out after 30 s".to_string(),
                Ok(Err(e)) => e.to_string(),
                Ok(Ok(_)) => unreachable!(),
            };
            return Err(no_qmp(
                reason,
                String::from_utf8_lossy(&buf)
                    .trim()
                    .chars()
                    .take(2000)
                    .collect(),
            ));
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    let machines: Vec<MachineType> = serde_json::from_value(machines).unwrap_or_default();
    let migration_capabilities = caps
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c["capability"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let cpu_models: Vec<CpuModel> = serde_json::from_value(cpus).unwrap_or_default();
    let data_dirs = data_dirs(path).await;
    Ok(EmulatorInfo {
        path: path.to_path_buf(),
        version,
        machines,
        migration_capabilities,
        data_dirs,
        cpu_models,
    })
}

/// (path, device, inode, mtime s, mtime ns): changes when the binary does.
type FileKey = (PathBuf, u64, u64, i64, i64);

/// `EMULATOR -L help`: the firmware search path (a wrapper script's own
/// `-L` options come first, as QEMU uses them).
async fn data_dirs(path: &Path) -> Vec<PathBuf> {
    let mut cmd = tokio::process::Command::new(path);
    crate::instance::process::die_with_agent(&mut cmd);
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        cmd.args(["-L", "help"])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await;
    match out {
        Ok(Ok(o)) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with('/'))
            .map(|l| std::fs::canonicalize(l).unwrap_or_else(|_| PathBuf::from(l)))
            .collect(),
        _ => Vec::new(),
    }
}

/// Probe results cached by file identity.
#[derive(Default)]
pub struct ProbeCache {
    cache: Mutex<HashMap<FileKey, Arc<EmulatorInfo>>>,
}

impl ProbeCache {
    pub async fn get(&self, path: &Path) -> Result<Arc<EmulatorInfo>, ProbeError> {
        let md = check_executable(path)?;
        let key = (
            path.to_path_buf(),
            md.dev(),
            md.ino(),
            md.mtime(),
            md.mtime_nsec(),
        );
        if let Some(hit) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(hit.clone());
        }
        let info = Arc::new(probe(path).await?);
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, info.clone());
        Ok(info)
    }
}
