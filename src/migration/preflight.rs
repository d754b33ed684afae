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
    #[error("QEMU {version} does not have the domain's CPU model {model}")]
    CpuModelMissing { version: String, model: String },
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
    check_cpu(info, def)?;
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

/// The target has the domain's (pinned) CPU model.
fn check_cpu(info: &EmulatorInfo, def: &Definition) -> Result<(), PreflightError> {
    if let Some(cpu) = &def.cpu {
        let model = cpu.split(',').next().unwrap_or(cpu);
        if !info.cpu_models.iter().any(|c| c.name == model) {
            return Err(PreflightError::CpuModelMissing {
                version: info.version.to_string(),
                model: model.to_string(),
            });
        }
    }
    Ok(())
}

/// What an operator should know about a migration to `info` that passes:
/// a CPU model that is not the same CPU in every QEMU version (`host`,
/// `max`; QEMU's `migration-safe: false`).
pub fn notes(info: &EmulatorInfo, def: &Definition) -> Vec<String> {
    let mut notes = Vec::new();
    if let Some(cpu) = def
        .cpu
        .as_deref()
        .filter(|c| info.cpu_is_version_dependent(c))
    {
        notes.push(format!(
            "cpu `{cpu}` is not the same CPU in every QEMU version: QEMU {} may show the guest \
             other CPU features than the QEMU it runs on; the guest keeps using what it found \
             at boot (a named model such as `EPYC` is portable)",
            info.version
        ));
    }
    notes
}

/// What a passed preflight hands on: the target's probe.
pub type Passed = Arc<EmulatorInfo>;

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> EmulatorInfo {
        serde_json::from_value(serde_json::json!({
            "path": "/q", "version": {"major": 10, "minor": 0, "micro": 2, "package": ""},
            "machines": [], "migration_capabilities": [],
            "cpu_models": [
                {"name": "EPYC", "alias-of": "EPYC-v1", "migration-safe": true},
                {"name": "EPYC-v1", "migration-safe": true},
                {"name": "max", "migration-safe": false},
            ],
        }))
        .unwrap()
    }

    fn def(cpu: Option<&str>) -> Definition {
        let mut v = serde_json::json!({"name": "a", "emulator": "/q", "memory_mib": 64});
        if let Some(c) = cpu {
            v["cpu"] = c.into();
        }
        Definition::from_value(&v).unwrap()
    }

    #[test]
    fn cpu_model_must_exist_on_the_target() {
        check_cpu(&info(), &def(Some("EPYC-v1,+x2apic"))).unwrap();
        check_cpu(&info(), &def(None)).unwrap();
        let e = check_cpu(&info(), &def(Some("EPYC-v4"))).unwrap_err();
        assert_eq!(
            e.to_string(),
            "QEMU 10.0.2 does not have the domain's CPU model EPYC-v4"
        );
    }

    #[test]
    fn version_dependent_models_get_a_note() {
        assert_eq!(notes(&info(), &def(Some("max"))).len(), 1);
        assert!(notes(&info(), &def(Some("EPYC-v1"))).is_empty());
        assert!(notes(&info(), &def(None)).is_empty());
    }

    #[test]
    fn unversioned_models_resolve_and_keep_their_flags() {
        let i = info();
        assert_eq!(i.resolve_cpu("EPYC").unwrap(), "EPYC-v1");
        assert_eq!(i.resolve_cpu("EPYC,+x2apic").unwrap(), "EPYC-v1,+x2apic");
        assert_eq!(i.resolve_cpu("max").unwrap(), "max");
        assert!(i.resolve_cpu("Pentium-9000").is_err());
    }
}
