//! The `adopt` op: learn a running QEMU that qlive did not start (only the
//! dry run: the migration into qlive is not implemented yet). The agent
//! connects to the foreign QEMU's QMP socket, issues query commands only,
//! disconnects, and keeps nothing: no domain is defined, no state written.

use super::{Agent, AgentError, Run};
use crate::adopt::{self, refusal_message};
use crate::api;
use crate::domain::definition::valid_name;
use crate::domain::{Definition, TableError};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// What `adopt` without `dry_run` answers, until the migration exists.
pub const NOT_IMPLEMENTED: &str =
    "not implemented yet: adoption migrates the guest; only --dry-run is available";

impl Agent {
    pub(super) async fn adopt(
        self: &Arc<Self>,
        name: &str,
        qmp: &Path,
        definition: Option<&Value>,
        dry_run: bool,
    ) -> Result<api::AdoptPlan, AgentError> {
        if !dry_run {
            return Err(AgentError::BadRequest(NOT_IMPLEMENTED.into()));
        }
        if !valid_name(name) {
            return Err(AgentError::BadRequest(format!(
                "domain name {name:?} must match [A-Za-z0-9][A-Za-z0-9_.-]{{0,63}}"
            )));
        }
        if !qmp.is_absolute() {
            return Err(AgentError::BadRequest(format!(
                "the QMP socket must be an absolute path (got {qmp:?})"
            )));
        }
        if self.lookup(name).is_ok() {
            return Err(TableError::NameTaken(name.into()).into());
        }
        let given = definition.map(Definition::from_value).transpose()?;
        // qlive's own QEMUs are not foreign.
        let mut own = BTreeMap::new();
        let doms = self.table().list();
        for d in doms {
            if let Run::Running(i) = &d.state.lock().await.run {
                own.insert(i.pid(), d.name.clone());
            }
        }
        let found = adopt::inspect(name, qmp, &own)
            .await
            .map_err(|source| AgentError::Adopt {
                name: name.into(),
                source: Box::new(source),
            })?;
        let mut plan = api::AdoptPlan {
            name: name.into(),
            pid: found.pid,
            qemu_version: found.qemu_version,
            dry_run,
            ok: false,
            definition: None,
            facts: None,
            refused: Vec::new(),
            mismatches: Vec::new(),
        };
        match found.verdict {
            Err(refusals) => {
                tracing::info!(
                    domain = name,
                    pid = plan.pid,
                    "{}",
                    refusal_message(&refusals)
                );
                plan.refused = refusals.iter().map(|r| r.to_string()).collect();
            }
            Ok(learned) => {
                let def = match &given {
                    Some(g) => {
                        plan.mismatches = adopt::check_definition(g, &learned.definition);
                        g
                    }
                    None => &learned.definition,
                };
                plan.ok = plan.mismatches.is_empty();
                plan.definition = Some(serde_json::to_value(def).map_err(AgentError::Encode)?);
                plan.facts = Some(learned.facts);
            }
        }
        Ok(plan)
    }
}
