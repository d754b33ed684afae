//! UEFI firmware files of a domain (`firmware: "uefi"`): its NVRAM, the
//! per-domain copy of the VARS template that holds the guest's EFI
//! variables, and the identity of the firmware images a guest boots with.
//!
//! The NVRAM lives in the state dir (`<state>/nvram/<name>.fd`, 0600), is
//! created from `nvram_template` once (at the domain's first start), kept
//! across migrations, agent restarts and guest reboots, and removed at
//! undefine. QEMU never opens it by path: the agent opens it for every
//! instance and passes the fd (`cmdline::nvram_fd`), so a QEMU running as
//! an unprivileged user needs no access to the state dir.

use crate::fsutil;
use crate::instance::files::FileId;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Largest VARS template accepted (OVMF's are 128 KiB to 4 MiB).
pub const MAX_TEMPLATE_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    #[error("field `{field}`: {path}")]
    Open {
        field: &'static str,
        path: PathBuf,
        #[source]
        source: fsutil::NotRegularError,
    },
    #[error("field `nvram_template`: {path} is {size} bytes, over the {limit}-byte limit")]
    TemplateTooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("reading the NVRAM template {path}")]
    ReadTemplate {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("creating the domain's NVRAM {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("a UEFI instance was spawned without the domain's NVRAM")]
    NoNvram,
    #[error("the domain's NVRAM {path}")]
    Nvram {
        path: PathBuf,
        #[source]
        source: fsutil::NotRegularError,
    },
}

/// `<state>/nvram`.
pub fn nvram_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("nvram")
}

/// `<state>/nvram/<name>.fd` (`name` is a valid domain name: one path
/// component).
pub fn nvram_path(state_dir: &Path, name: &str) -> PathBuf {
    nvram_dir(state_dir).join(format!("{name}.fd"))
}

/// Can the agent read `path` as a regular file (no symlink at the end)?
/// `field` names the definition field in the error.
pub fn check_readable(field: &'static str, path: &Path) -> Result<(), FirmwareError> {
    fsutil::open_regular_nofollow(path)
        .map(drop)
        .map_err(|source| FirmwareError::Open {
            field,
            path: path.to_path_buf(),
            source,
        })
}

/// Create the domain's NVRAM from `template` unless it exists. Returns
/// whether it was created. An existing NVRAM is never touched: it holds
/// the guest's variables. The copy is atomic (a crash leaves no half file).
pub fn ensure_nvram(nvram: &Path, template: &Path) -> Result<bool, FirmwareError> {
    fsutil::ensure_regular_or_absent(nvram).map_err(|source| FirmwareError::Nvram {
        path: nvram.to_path_buf(),
        source,
    })?;
    if nvram.exists() {
        return Ok(false);
    }
    let mut f = fsutil::open_regular_nofollow(template).map_err(|source| FirmwareError::Open {
        field: "nvram_template",
        path: template.to_path_buf(),
        source,
    })?;
    let read_err = |source| FirmwareError::ReadTemplate {
        path: template.to_path_buf(),
        source,
    };
    let size = f.metadata().map_err(read_err)?.len();
    if size > MAX_TEMPLATE_BYTES {
        return Err(FirmwareError::TemplateTooLarge {
            path: template.to_path_buf(),
            size,
            limit: MAX_TEMPLATE_BYTES,
        });
    }
    let mut data = Vec::with_capacity(size as usize);
    (&mut f)
        .take(MAX_TEMPLATE_BYTES)
        .read_to_end(&mut data)
        .map_err(read_err)?;
    let create_err = |source| FirmwareError::Create {
        path: nvram.to_path_buf(),
        source,
    };
    if let Some(dir) = nvram.parent() {
        fsutil::create_dir(dir, 0o700).map_err(create_err)?;
    }
    fsutil::write_atomic(nvram, &data, 0o600).map_err(create_err)?;
    Ok(true)
}

/// Open the domain's NVRAM read-write for an instance (never through a
/// symlink, only a regular file).
pub fn open_nvram(nvram: &Path) -> Result<File, FirmwareError> {
    fsutil::open_rw_nofollow(nvram).map_err(|source| FirmwareError::Nvram {
        path: nvram.to_path_buf(),
        source,
    })
}

/// The firmware images a domain boots with (UEFI code and VARS template),
/// with their identity now: recorded at a cold boot, carried over by every
/// migration (the flash contents travel in the migration stream), compared
/// by stale detection.
pub fn boot_images(def: &crate::domain::Definition) -> Vec<FileId> {
    [def.firmware_code.as_deref(), def.nvram_template.as_deref()]
        .into_iter()
        .flatten()
        .filter_map(|p| FileId::of(p).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvram_is_created_once_and_then_kept() {
        let d = tempfile::tempdir().unwrap();
        let template = d.path().join("VARS.fd");
        std::fs::write(&template, b"template-1").unwrap();
        let nv = nvram_path(&d.path().join("state"), "vm1");
        assert!(ensure_nvram(&nv, &template).unwrap());
        assert_eq!(std::fs::read(&nv).unwrap(), b"template-1");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&nv).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // the guest wrote a variable; a new template changes nothing
        std::fs::write(&nv, b"guest-vars").unwrap();
        std::fs::write(&template, b"template-2").unwrap();
        assert!(!ensure_nvram(&nv, &template).unwrap());
        assert_eq!(std::fs::read(&nv).unwrap(), b"guest-vars");
        let mut f = open_nvram(&nv).unwrap();
        use std::io::Write;
        f.write_all(b"G").unwrap();
    }

    #[test]
    fn a_symlink_or_a_missing_template_is_refused_naming_it() {
        let d = tempfile::tempdir().unwrap();
        let nv = d.path().join("nvram/vm1.fd");
        let e = ensure_nvram(&nv, &d.path().join("missing.fd")).unwrap_err();
        let chain = crate::error::chain(&e);
        assert!(
            chain.contains("`nvram_template`") && chain.contains("missing.fd"),
            "{chain}"
        );
        assert!(!nv.exists());
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::fs::create_dir_all(nv.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&victim, &nv).unwrap();
        let t = d.path().join("t.fd");
        std::fs::write(&t, b"x").unwrap();
        let e = crate::error::chain(&ensure_nvram(&nv, &t).unwrap_err());
        assert!(e.contains("symbolic link"), "{e}");
        assert!(crate::error::chain(&open_nvram(&nv).unwrap_err()).contains("symbolic link"));
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    }
}
