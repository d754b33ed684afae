//! The `adopt` op: take over a running QEMU that qlive did not start
//! (docs/adopting.md). The agent connects to the foreign QEMU's QMP
//! socket, learns it with query commands only and disconnects
//! (`crate::adopt::inspect`). A dry run stops there and keeps nothing.
//!
//! Otherwise the learned (or given) definition is stored and the guest is
//! migrated into a qlive instance by the one migration engine, with guest
//! RAM copied into a new memfd (`Memory::Copy`, post-copy as asked). The
//! foreign QEMU is the migration's source: an `Instance` without RAM of
//! qlive's, reached on its own QMP socket. It quits only after Confirm. A
//! failure before the switchover leaves it running untouched and removes
//! the definition again.
//!
//! `<run>/domains/<name>/adopting.json` marks an adoption in progress,
//! from before the definition is stored until the domain is qlive's or
//! forgotten: `start` refuses the domain meanwhile (its guest runs in the
//! foreign QEMU), and a restarted agent settles it ([`Agent::settle_adoption`]).

use super::migrate::DomainHost;
use super::{Agent, AgentError, Domain, Run};
use crate::adopt::{self, refusal_message, Refusal};
use crate::api;
use crate::domain::definition::{valid_name, Accel};
use crate::domain::{Definition, TableError};
use crate::instance::cmdline::EffectiveAccel;
use crate::instance::paths::{domain_run_dir, InstancePaths};
use crate::instance::process::{Pidfd, ProcessIdentity};
use crate::instance::{self, DiskId, Foreign, InstanceRecord};
use crate::migration::engine::{self, Request};
use crate::migration::job::Job;
use crate::migration::params::{Memory, Postcopy};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How to adopt.
pub struct How {
    pub dry_run: bool,
    pub postcopy: Postcopy,
    /// Bounds the copy's pre-copy (the migration's `timeout_s`).
    pub timeout: Duration,
}

/// The marker of an adoption in progress.
#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    /// The foreign QEMU.
    process: ProcessIdentity,
    qmp: PathBuf,
}

fn marker_path(run_dir: &Path, name: &str) -> PathBuf {
    domain_run_dir(run_dir, name).join("adopting.json")
}

/// Give each NIC a tap of qlive's own on the bridge the foreign QEMU's tap
/// is a port of. The foreign tap is single-queue and held by the foreign
/// QEMU (and goes away with it); qlive's taps are multi-queue with two
/// sets of queues (docs/devices.md). The guest's MAC stays; the bridge
/// learns the new port from the destination's announcement after the
/// switchover. A tap that is no bridge's port (a routed tap, with the
/// host's addresses on it) is refused: its addresses and routes cannot
/// move to another device under the guest.
pub fn onto_qlive_taps(def: &mut Definition) -> Result<(), Vec<Refusal>> {
    let mut refused = Vec::new();
    for (i, n) in def.nics.iter_mut().enumerate() {
        let tap = n.tap().to_string();
        match crate::instance::tap::bridge_of(&tap) {
            Ok(Some(br)) => {
                n.bridge = Some(br);
                n.tap = None;
            }
            Ok(None) => refused.push(Refusal {
                what: format!("nics[{i}]: tap {tap}"),
                why: "not a bridge port: the guest moves onto a tap of qlive's on the same \
                      bridge, and a routed tap's addresses cannot follow it"
                    .into(),
            }),
            Err(e) => refused.push(Refusal {
                what: format!("nics[{i}]: tap {tap}"),
                why: format!("cannot read its bridge: {e}"),
            }),
        }
    }
    if refused.is_empty() {
        Ok(())
    } else {
        Err(refused)
    }
}

impl Agent {
    pub(super) async fn adopt(
        self: &Arc<Self>,
        name: &str,
        qmp: &Path,
        definition: Option<&Value>,
        how: How,
    ) -> Result<Value, AgentError> {
        let dry_run = how.dry_run;
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
        if self.lookup(name).is_ok() || self.adopting(name) {
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
            Ok(mut learned) => {
                if let Err(r) = onto_qlive_taps(&mut learned.definition) {
                    plan.refused = r.iter().map(|r| r.to_string()).collect();
                    return self.refused(plan, dry_run);
                }
                let def = match &given {
                    Some(g) => {
                        plan.mismatches = adopt::check_definition(g, &learned.definition);
                        g
                    }
                    None => &learned.definition,
                };
                plan.ok = plan.mismatches.is_empty();
                plan.definition = Some(serde_json::to_value(def).map_err(AgentError::Encode)?);
                plan.facts = Some(learned.facts.clone());
                if !dry_run && plan.ok {
                    // The block name goes on every later QEMU command line
                    // (`-object memory-backend-file,id=…`): QEMU's own id
                    // syntax only, so it cannot carry options.
                    let block = &learned.facts.ram.block;
                    let well_formed = block.len() <= 128
                        && block.starts_with(|c: char| c.is_ascii_alphabetic())
                        && block
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
                    if !well_formed {
                        plan.refused.push(
                            Refusal {
                                what: format!("RAM block {block:?}"),
                                why: "not an id QEMU's option syntax can carry".into(),
                            }
                            .to_string(),
                        );
                        return self.refused(plan, dry_run);
                    }
                    if def.firmware == crate::domain::definition::Firmware::Uefi {
                        plan.refused.push(
                            Refusal {
                                what: "firmware uefi".into(),
                                why: "the guest's UEFI variables live in the foreign QEMU's \
                                      VARS file, which adoption does not carry over yet"
                                    .into(),
                            }
                            .to_string(),
                        );
                        return self.refused(plan, dry_run);
                    }
                    let def = def.clone();
                    let m = self.adopt_into(def, qmp, &learned, &how).await?;
                    return api::encode(&m).map_err(AgentError::Encode);
                }
            }
        }
        self.refused(plan, dry_run)
    }

    /// The plan as a dry run's answer, or, for an adoption, the error
    /// naming what was refused or does not match.
    fn refused(&self, plan: api::AdoptPlan, dry_run: bool) -> Result<Value, AgentError> {
        if dry_run {
            return api::encode(&plan).map_err(AgentError::Encode);
        }
        let what = if !plan.refused.is_empty() {
            format!("cannot adopt: {}", plan.refused.join("; "))
        } else {
            format!(
                "the definition does not match the guest: {}",
                plan.mismatches.join("; ")
            )
        };
        Err(AgentError::InvalidState(format!(
            "adopting QEMU pid {} as {}: {what}; nothing was changed",
            plan.pid, plan.name
        )))
    }

    /// Is an adoption of `name` in progress?
    pub(super) fn adopting(&self, name: &str) -> bool {
        marker_path(&self.cfg.run_dir, name).exists()
    }

    /// Store `def`, then migrate the foreign QEMU's guest into a qlive
    /// instance with RAM copied.
    async fn adopt_into(
        self: &Arc<Self>,
        def: Definition,
        qmp: &Path,
        learned: &adopt::Learned,
        how: &How,
    ) -> Result<api::Migrated, AgentError> {
        let facts = &learned.facts;
        let started = Instant::now();
        let name = def.name.clone();
        let process = ProcessIdentity::read(facts.pid).map_err(|e| AgentError::Io {
            what: format!("reading the foreign QEMU pid {}", facts.pid),
            source: std::io::Error::other(crate::error::chain(&e)),
        })?;
        self.create_domain_run_dir(&name)?;
        let marker = Marker {
            process: process.clone(),
            qmp: qmp.to_path_buf(),
        };
        let marker_file = marker_path(&self.cfg.run_dir, &name);
        let bytes = serde_json::to_vec_pretty(&marker).map_err(AgentError::Encode)?;
        // Created exclusively: a concurrent adoption under the same name
        // owns the one that exists (and only its owner removes it).
        let created = {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&marker_file)
                .and_then(|mut f| f.write_all(&bytes).and_then(|()| f.sync_all()))
        };
        match created {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(TableError::NameTaken(name).into())
            }
            Err(source) => {
                let _ = crate::fsutil::remove_file_if_exists(&marker_file);
                return Err(AgentError::Io {
                    what: format!("writing {}", marker_file.display()),
                    source,
                });
            }
        }
        let dom = match self.define_definition(def) {
            Ok(d) => d,
            Err(e) => {
                let _ = crate::fsutil::remove_file_if_exists(&marker_file);
                return Err(e);
            }
        };
        let prepared = self.foreign_source(&dom, process, qmp, learned).await;
        let src = match prepared {
            Ok(s) => Arc::new(s),
            Err(e) => {
                self.forget_adoption(&dom).await;
                return Err(e);
            }
        };
        let (job, def) = {
            let mut st = dom.state.lock().await;
            let job = Arc::new(Job::adoption(super::now_unix()));
            job.set_source_qmp(src.qmp.clone());
            st.job = Some(job.clone());
            st.run = Run::Running(src.clone());
            (job, st.def.clone())
        };
        let host = DomainHost {
            agent: self.clone(),
            dom: dom.clone(),
        };
        let req = Request {
            job,
            src: src.clone(),
            target: def.emulator.clone(),
            def,
            timeout: how.timeout,
            started,
            memory: Memory::Copy {
                postcopy: how.postcopy,
            },
        };
        tracing::info!(domain = %name, pid = src.pid(), postcopy = how.postcopy.as_str(), "adopting");
        for n in &facts.notes {
            tracing::warn!(domain = %name, "adoption note: {n}");
        }
        let res = tokio::spawn(async move { engine::migrate(&host, req).await }).await;
        let mut st = dom.state.lock().await;
        st.job = None;
        let ours = matches!(&st.run, Run::Running(i) if i.record.foreign.is_none());
        if let Err(e) = &res {
            // The engine itself failed mid-way (a bug): which QEMU has the
            // guest is not known. As for any migration (agent::migrate),
            // recovery decides at the next agent start, from the kept job
            // file; nothing is settled or forgotten now.
            let job = crate::migration::phase::job_path(&domain_run_dir(&self.cfg.run_dir, &name));
            if job.exists() {
                self.table().take_remote(&name);
                st.run = Run::Unreachable {
                    record: Some(Box::new(src.record.clone())),
                    reason: format!(
                        "the adoption task failed ({e}); restart the agent to recover the migration"
                    ),
                };
                return Err(AgentError::Io {
                    what: "adoption task".into(),
                    source: std::io::Error::other(e.to_string()),
                });
            }
        }
        drop(st);
        match res {
            Ok(Ok(report)) if ours => {
                let _ = crate::fsutil::remove_file_if_exists(&marker_file);
                tracing::info!(domain = %name, "adopted");
                Ok(super::migrate::migrated(report))
            }
            other => {
                self.settle_adoption(&dom).await;
                let source = match other {
                    Ok(Err(e)) => e,
                    Ok(Ok(_)) => crate::migration::MigrationError::Failed {
                        status: "failed".into(),
                        detail: "the adopted instance is not the domain's".into(),
                    },
                    Err(e) => crate::migration::MigrationError::Failed {
                        status: "failed".into(),
                        detail: format!("the migration task failed: {e}"),
                    },
                };
                Err(AgentError::Migration { name, source })
            }
        }
    }

    /// The foreign QEMU as the adoption's source, holding the domain's new
    /// taps and sockets for the destination.
    async fn foreign_source(
        self: &Arc<Self>,
        dom: &Arc<Domain>,
        process: ProcessIdentity,
        qmp: &Path,
        learned: &adopt::Learned,
    ) -> Result<instance::Instance, AgentError> {
        let def = dom.state.lock().await.def.clone();
        // What runs, as learned (a given definition may name another
        // binary, or `auto`).
        let running = &learned.definition;
        let taps = self.open_taps(&dom.name, &def).await?;
        let endpoints = self.bind_endpoints(&def)?;
        let domid = self.domids.allocate()?;
        let accel = match running.accel {
            Accel::Kvm => EffectiveAccel::Kvm,
            Accel::Tcg | Accel::Auto => EffectiveAccel::Tcg,
        };
        let record = InstanceRecord {
            domid,
            process,
            emulator: running.emulator.clone(),
            // Replaced by what its QMP greeting says.
            qemu_version: Default::default(),
            machine: def.machine.clone(),
            accel,
            paths: InstancePaths::new(&self.cfg.run_dir, &dom.name, domid),
            ram_inode: 0,
            started_at: super::now_unix(),
            loaded: Vec::new(),
            firmware: Vec::new(),
            taps: Vec::new(),
            tap_queues: Vec::new(),
            tap_set: 0,
            disks: def
                .disks
                .iter()
                .filter_map(|d| DiskId::of(&d.path).ok())
                .collect(),
            guest_agent: None,
            vnc: None,
            user: None,
            tap_guard: false,
            tap_offloads: None,
            ram_block: Some(learned.facts.ram.block.clone()),
            foreign: Some(Foreign {
                qmp: qmp.to_path_buf(),
            }),
        };
        instance::adopt_foreign(record, Arc::new(taps), Arc::new(endpoints))
            .await
            .map_err(|source| AgentError::Start {
                name: dom.name.clone(),
                source,
            })
    }

    /// After an adoption that did not make the domain qlive's, or at agent
    /// start with its marker found: a domain whose guest still runs in the
    /// foreign QEMU (the adoption failed before the switchover, or never
    /// began) is forgotten again, its definition removed; one whose
    /// foreign QEMU is gone stays defined, shut off; a crashed one stays
    /// crashed; an unreachable one keeps the marker for the next start.
    pub(super) async fn settle_adoption(self: &Arc<Self>, dom: &Arc<Domain>) {
        let marker_file = marker_path(&self.cfg.run_dir, &dom.name);
        let marker: Option<Marker> = std::fs::read(&marker_file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let mut st = dom.state.lock().await;
        match &st.run {
            Run::Running(i) if i.record.foreign.is_none() => {}
            Run::Unreachable { .. } => return,
            Run::Crashed { .. } => {}
            Run::Running(_) | Run::ShutOff { .. } => {
                let foreign_alive = marker
                    .as_ref()
                    .is_some_and(|m| Pidfd::adopt(&m.process).is_ok_and(|p| !p.exited()));
                if foreign_alive || marker.is_none() {
                    // The guest is the foreign QEMU's, as before.
                    st.run = Run::ShutOff {
                        reason: "adoption failed".into(),
                    };
                    if let Err(e) = self.forget(dom.as_ref(), &mut st) {
                        tracing::error!(domain = %dom.name, "forgetting the failed adoption: {}", crate::error::chain(&e));
                    }
                    tracing::info!(domain = %dom.name, "adoption undone: the guest runs on in its own QEMU");
                    return;
                }
            }
        }
        let _ = crate::fsutil::remove_file_if_exists(&marker_file);
    }

    /// An adoption's marker goes with the adoption: `destroy` of an
    /// unreachable or crashed adopted domain ends it.
    pub(super) fn end_adoption(&self, name: &str) {
        let _ = crate::fsutil::remove_file_if_exists(&marker_path(&self.cfg.run_dir, name));
    }

    /// At agent start: markers of adoptions whose definition was never
    /// stored (the agent died between the two). Their foreign QEMU was
    /// never touched; the marker only blocks the name.
    pub(super) fn remove_orphan_adoptions(&self) {
        let dir = self.cfg.run_dir.join("domains");
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if self.lookup(&name).is_err() && marker_path(&self.cfg.run_dir, &name).exists() {
                tracing::info!(domain = %name, "an adoption that never stored its definition: its marker is removed");
                let _ = crate::fsutil::remove_dir_all_if_exists(&domain_run_dir(
                    &self.cfg.run_dir,
                    &name,
                ));
            }
        }
    }

    /// Undo an adoption that failed before its migration began.
    async fn forget_adoption(self: &Arc<Self>, dom: &Arc<Domain>) {
        let mut st = dom.state.lock().await;
        if let Err(e) = self.forget(dom.as_ref(), &mut st) {
            tracing::error!(domain = %dom.name, "forgetting the failed adoption: {}", crate::error::chain(&e));
        }
    }
}
