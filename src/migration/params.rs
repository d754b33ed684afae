//! Migration capabilities and parameters as data: which side each applies
//! to and why. The driver applies the table; nothing else sets them.

use crate::qmp::{Qmp, QmpError};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// How guest RAM reaches the destination.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Memory {
    /// Both QEMUs map the domain's memfd: `x-ignore-shared`, device state
    /// only (every upgrade).
    #[default]
    Shared,
    /// The destination gets RAM of its own (a new memfd) and QEMU copies
    /// guest RAM into it: adopting a foreign QEMU, or `migrate
    /// --copy-memory` onto another backing.
    Copy { postcopy: Postcopy },
}

impl Memory {
    pub fn is_shared(&self) -> bool {
        *self == Memory::Shared
    }
    /// Post-copy may be started (its capability is set on both sides).
    pub fn postcopy(&self) -> bool {
        matches!(self, Memory::Copy { postcopy } if *postcopy != Postcopy::Never)
    }
}

/// When a copy migration switches to post-copy (see [`super::copy`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Postcopy {
    /// After the first full pre-copy pass, once pre-copy is seen not to
    /// converge.
    #[default]
    Auto,
    /// Right after the first full pre-copy pass.
    Always,
    /// Pre-copy only.
    Never,
}

impl Postcopy {
    pub fn as_str(self) -> &'static str {
        match self {
            Postcopy::Auto => "auto",
            Postcopy::Always => "always",
            Postcopy::Never => "never",
        }
    }
}

impl std::str::FromStr for Postcopy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Postcopy::Auto),
            "always" => Ok(Postcopy::Always),
            "never" => Ok(Postcopy::Never),
            _ => Err(format!(
                "post-copy policy {s:?} is not one of auto, always, never"
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Destination,
    Both,
}

impl Side {
    pub fn applies_to(self, side: Side) -> bool {
        self == Side::Both || self == side
    }
}

/// (capability, side, state, why)
pub type Capability = (&'static str, Side, bool, &'static str);

const EVENTS: Capability = (
    "events",
    Side::Both,
    true,
    "MIGRATION events drive the phases; without it QEMU sends none",
);

/// The shared-memory migration's table.
pub const CAPABILITIES: &[Capability] = &[
    EVENTS,
    (
        "x-ignore-shared",
        Side::Both,
        true,
        "guest RAM is a shared file both sides map: send device state only. Must match on both sides or the destination refuses the stream",
    ),
    (
        "postcopy-ram",
        Side::Both,
        false,
        "a QEMU that was a copy migration's destination keeps the capability, and QEMU refuses it with x-ignore-shared; nothing is post-copied from shared RAM",
    ),
];

/// The capabilities a migration with `memory` sets. A copy's: RAM is not
/// shared, so `x-ignore-shared` is off (explicitly: a source may have had
/// it on), and `postcopy-ram` is on when the policy allows post-copy (on
/// both sides, or the destination refuses the stream's post-copy
/// commands), off otherwise.
pub fn capabilities(memory: Memory) -> Vec<Capability> {
    match memory {
        Memory::Shared => CAPABILITIES.to_vec(),
        Memory::Copy { .. } => vec![
            EVENTS,
            (
                "x-ignore-shared",
                Side::Both,
                false,
                "the destination's RAM is its own: every page is sent",
            ),
            (
                "postcopy-ram",
                Side::Both,
                memory.postcopy(),
                "post-copy may be started once pre-copy made one full pass; must match on both sides",
            ),
        ],
    }
}

/// Capabilities the target must offer (checked in the preflight).
pub fn required_capabilities() -> impl Iterator<Item = &'static str> {
    CAPABILITIES.iter().filter(|c| c.2).map(|c| c.0)
}

/// Apply the capability table of `memory` for `side` in one command.
pub async fn apply(qmp: &Qmp, side: Side, memory: Memory) -> Result<(), QmpError> {
    let caps: Vec<Value> = capabilities(memory)
        .iter()
        .filter(|c| c.1.applies_to(side))
        .map(|c| json!({"capability": c.0, "state": c.2}))
        .collect();
    qmp.execute_raw(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": caps })),
    )
    .await
    .map(|_| ())
}

/// A copy migration sends all of guest RAM over a local socket: lift
/// QEMU's bandwidth cap (32 MiB/s by default in 7.2) for pre-copy and
/// post-copy alike. The value is a rate no local socket reaches.
pub const COPY_BANDWIDTH: u64 = 64 << 30;

pub async fn apply_copy_parameters(src: &Qmp) -> Result<(), QmpError> {
    src.execute_raw(
        "migrate-set-parameters",
        Some(json!({
            "max-bandwidth": COPY_BANDWIDTH,
            "max-postcopy-bandwidth": 0,
        })),
    )
    .await
    .map(|_| ())
}

/// Test-only: cap the source's bandwidth so a migration lasts long enough
/// to be aborted or have its destination killed mid-flight.
pub const TEST_MAX_BANDWIDTH_ENV: &str = "QLIVE_TEST_MAX_BANDWIDTH";

pub async fn apply_test_parameters(qmp: &Qmp) -> Result<(), QmpError> {
    if let Some(bw) = std::env::var(TEST_MAX_BANDWIDTH_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        tracing::warn!(
            bytes_per_s = bw,
            "test-only migration bandwidth cap in effect"
        );
        // Post-copy's background transfer too, so a test can find it
        // under way.
        qmp.execute_raw(
            "migrate-set-parameters",
            Some(json!({ "max-bandwidth": bw, "max-postcopy-bandwidth": bw })),
        )
        .await?;
    }
    Ok(())
}
