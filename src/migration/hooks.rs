//! Required-feature hooks: executables in the hooks directory (default
//! `/etc/qlive/hooks.d`), run in name order on the destination side.
//!
//! - phase `prepare`: after the destination QEMU exists, before any guest
//!   state moves. A non-zero exit (or a 30 s timeout) fails the migration
//!   before switchover; the source never stops.
//! - phase `release`: after a failed migration, to undo what `prepare` set
//!   up (every hook is called, failures are logged, not fatal).
//!
//! Called as `HOOK <domain> <phase>` with the environment QLIVE_DOMAIN,
//! QLIVE_PHASE, QLIVE_SRC_DOMID, QLIVE_DST_DOMID, QLIVE_DST_PID,
//! QLIVE_EMULATOR, and for the network: QLIVE_TAPS (tap names, space
//! separated, in NIC order) and QLIVE_NICS (`id,tap,mac,bridge` per NIC,
//! space separated; bridge empty when the NIC names none). The taps are the
//! very devices the guest uses now: the destination inherits them.

use super::MigrationError;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const HOOK_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct HookEnv {
    pub domain: String,
    pub src_domid: u64,
    pub dst_domid: u64,
    pub dst_pid: Option<i32>,
    pub emulator: PathBuf,
    pub nics: Vec<HookNic>,
}

/// One NIC as hooks see it.
#[derive(Debug, Clone)]
pub struct HookNic {
    pub id: String,
    pub tap: String,
    pub mac: String,
    pub bridge: String,
}

/// The hook view of a definition's NICs (`net0`, `net1`, ...).
pub fn nics_of(def: &crate::domain::Definition) -> Vec<HookNic> {
    def.nics
        .iter()
        .enumerate()
        .map(|(i, n)| HookNic {
            id: format!("net{i}"),
            tap: n.tap().to_string(),
            mac: n.mac().to_string(),
            bridge: n.bridge.clone().unwrap_or_default(),
        })
        .collect()
}

impl HookEnv {
    fn taps(&self) -> String {
        let v: Vec<&str> = self.nics.iter().map(|n| n.tap.as_str()).collect();
        v.join(" ")
    }

    fn nics(&self) -> String {
        let v: Vec<String> = self
            .nics
            .iter()
            .map(|n| format!("{},{},{},{}", n.id, n.tap, n.mac, n.bridge))
            .collect();
        v.join(" ")
    }
}

/// Executable regular files in `dir`, sorted by name (none if no dir).
pub fn list(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            !p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'))
                && std::fs::metadata(p)
                    .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .collect();
    v.sort();
    v
}

async fn run_one(hook: &Path, phase: &str, env: &HookEnv) -> Result<(), MigrationError> {
    let name = hook.display().to_string();
    let fail = |detail: String| MigrationError::Hook {
        hook: name.clone(),
        phase: phase.to_string(),
        detail,
    };
    let mut cmd = tokio::process::Command::new(hook);
    crate::instance::process::die_with_agent(&mut cmd);
    cmd.arg(&env.domain)
        .arg(phase)
        .env("QLIVE_DOMAIN", &env.domain)
        .env("QLIVE_PHASE", phase)
        .env("QLIVE_SRC_DOMID", env.src_domid.to_string())
        .env("QLIVE_DST_DOMID", env.dst_domid.to_string())
        .env(
            "QLIVE_DST_PID",
            env.dst_pid.map(|p| p.to_string()).unwrap_or_default(),
        )
        .env("QLIVE_EMULATOR", &env.emulator)
        .env("QLIVE_TAPS", env.taps())
        .env("QLIVE_NICS", env.nics())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(HOOK_TIMEOUT, cmd.output())
        .await
        .map_err(|_| fail(format!("no exit within {} s", HOOK_TIMEOUT.as_secs())))?
        .map_err(|e| fail(format!("could not run: {e}")))?;
    if out.status.success() {
        tracing::info!(hook = %name, phase, domain = %env.domain, "hook ok");
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        Err(fail(format!(
            "{}{}",
            out.status,
            if last.is_empty() {
                String::new()
            } else {
                format!(": {last}")
            }
        )))
    }
}

/// `prepare`: the first failure stops and fails the migration.
pub async fn prepare(dir: &Path, env: &HookEnv) -> Result<(), MigrationError> {
    for h in list(dir) {
        run_one(&h, "prepare", env).await?;
    }
    Ok(())
}

/// `release`: every hook runs; failures are logged.
pub async fn release(dir: &Path, env: &HookEnv) {
    for h in list(dir) {
        if let Err(e) = run_one(&h, "release", env).await {
            tracing::warn!(error = %e, "release hook failed");
        }
    }
}
