//! Migration capabilities and parameters as data: which side each applies
//! to and why. The driver applies the table; nothing else sets them.

use crate::qmp::{Qmp, QmpError};
use serde_json::{json, Value};

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
pub const CAPABILITIES: &[(&str, Side, bool, &str)] = &[
    (
        "events",
        Side::Both,
        true,
        "MIGRATION events drive the phases; without it QEMU sends none",
    ),
    (
        "x-ignore-shared",
        Side::Both,
        true,
        "guest RAM is a shared file both sides map: send device state only. Must match on both sides or the destination refuses the stream",
    ),
];

/// Capabilities the target must offer (checked in the preflight).
pub fn required_capabilities() -> impl Iterator<Item = &'static str> {
    CAPABILITIES.iter().filter(|c| c.2).map(|c| c.0)
}

/// Apply the capability table for `side` in one command.
pub async fn apply(qmp: &Qmp, side: Side) -> Result<(), QmpError> {
    let caps: Vec<Value> = CAPABILITIES
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
        qmp.execute_raw(
            "migrate-set-parameters",
            Some(json!({ "max-bandwidth": bw })),
        )
        .await?;
    }
    Ok(())
}
