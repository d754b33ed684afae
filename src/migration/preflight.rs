//! Can a target emulator run this domain as a migration destination? The
//! binary exists and answers QMP, provides the pinned machine type and every
//! capability of the table, every disk is still the file the source opened,
//! and the QEMU user can open what the definition names. Nothing is started;
//! a refusal names its reason before anything changes.

use super::params;
use crate::domain::{Definition, DefinitionError};
use crate::instance::probe::{EmulatorInfo, ProbeError};
use crate::instance::InstanceRecord;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error("probing it")]
    Probe(#[source] ProbeError),
    #[error("QEMU {version} does not provide the domain's pinned machine type {machine}")]
    MachineMissing { version: String, machine: String },
    #[error("QEMU {version} lacks migration capability {capability}")]
    CapabilityMissing {
        version: String,
        capability: &'static str,
    },
    #[error("{0}")]
    Disks(String),
    #[error("the QEMU user's access to the definition's files")]
    QemuAccess(#[source] DefinitionError),
}

/// The checks on a probed target, in order; the first failure is returned.
pub fn check(
    info: &EmulatorInfo,
    def: &Definition,
    src: &InstanceRecord,
) -> Result<(), PreflightError> {
    if !info.machines.iter().any(|m| m.name == def.machine) {
        return Err(PreflightError::MachineMissing {
            version: info.version.to_string(),
            machine: def.machine.clone(),
        });
    }
    for capability in params::required_capabilities() {
        if !info.has_migration_capability(capability) {
            return Err(PreflightError::CapabilityMissing {
                version: info.version.to_string(),
                capability,
            });
        }
    }
    super::devices::preflight_disks(def, &src.disks).map_err(PreflightError::Disks)
}

/// What a passed preflight hands on: the target's probe.
pub type Passed = Arc<EmulatorInfo>;
