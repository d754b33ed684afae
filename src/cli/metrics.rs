//! `qlive metrics`: the agent's state in the Prometheus text format, for
//! node_exporter's textfile collector (qlive-metrics.timer) or any scraper
//! that reads a file. Three read-only calls (`list`, `stale`, `metrics`)
//! make one exposition; docs/operations.md lists every family.
//!
//! The output is always a valid exposition: when the agent cannot be
//! reached it is `qlive_agent_up 0` alone (and the exit code is 2), so a
//! file left from an earlier run never goes on claiming the agent is up.

use crate::api::client::{self, ClientError};
use crate::api::{ListEntry, Metrics, Request, StaleEntry};
use crate::fsutil;
use crate::metrics::prom::{Exposition, Kind};
use crate::metrics::MigrationResult;
use std::collections::BTreeMap;
use std::path::Path;

/// States counted in `qlive_domains` even when no domain is in them, so
/// their series do not come and go.
const STATES: &[&str] = &[
    "running",
    "paused",
    "shut-off",
    "unreachable",
    "crashed",
    "unknown",
];

/// Print the exposition, or write it to `output` (atomically, 0644).
pub async fn run(socket: &Path, output: Option<&Path>) -> i32 {
    let (text, code) = match gather(socket).await {
        Ok((list, stale, m)) => (render(&list, &stale, &m), 0),
        Err(e) => {
            eprintln!("qlive metrics: {}", crate::error::chain(&e));
            (render_down(), 2)
        }
    };
    match output {
        None => print!("{text}"),
        Some(path) => {
            if let Err(e) = fsutil::write_atomic(path, text.as_bytes(), 0o644) {
                eprintln!("qlive metrics: writing {}: {e}", path.display());
                return 2;
            }
        }
    }
    code
}

async fn gather(socket: &Path) -> Result<(Vec<ListEntry>, Vec<StaleEntry>, Metrics), ClientError> {
    let list = client::call_as(socket, &Request::List {}).await?;
    let stale = client::call_as(socket, &Request::Stale {}).await?;
    let m = client::call_as(socket, &Request::Metrics {}).await?;
    Ok((list, stale, m))
}

fn up(e: &mut Exposition, v: f64) {
    e.family(
        "qlive_agent_up",
        Kind::Gauge,
        "Whether qlive metrics could read the agent's state (1) or not (0).",
    )
    .sample("qlive_agent_up", &[], v);
}

fn render_down() -> String {
    let mut e = Exposition::new();
    up(&mut e, 0.0);
    e.finish()
}

/// `running`, a QEMU run state, `shut-off`, ...; `unknown (<why>)` is
/// counted as `unknown`.
fn state_label(state: &str) -> &str {
    if state.starts_with("unknown") {
        "unknown"
    } else {
        state
    }
}

pub fn render(list: &[ListEntry], stale: &[StaleEntry], m: &Metrics) -> String {
    let mut e = Exposition::new();
    up(&mut e, 1.0);
    e.family(
        "qlive_agent_start_time_seconds",
        Kind::Gauge,
        "When the running agent process started, in Unix time.",
    )
    .sample(
        "qlive_agent_start_time_seconds",
        &[],
        m.agent_started_at_s as f64,
    );
    e.family(
        "qlive_metrics_start_time_seconds",
        Kind::Gauge,
        "Since when the migration counters count, in Unix time (they persist across agent restarts).",
    )
    .sample(
        "qlive_metrics_start_time_seconds",
        &[],
        m.tally.since_s as f64,
    );

    let mut by_state: BTreeMap<&str, u64> = STATES.iter().map(|s| (*s, 0)).collect();
    for d in list {
        *by_state.entry(state_label(&d.state)).or_default() += 1;
    }
    e.family("qlive_domains", Kind::Gauge, "Defined domains by state.");
    for (state, n) in &by_state {
        e.sample("qlive_domains", &[("state", state)], *n as f64);
    }
    let versions: BTreeMap<&str, &str> = stale
        .iter()
        .map(|s| (s.name.as_str(), s.qemu_version.as_str()))
        .collect();
    e.family(
        "qlive_domain_info",
        Kind::Gauge,
        "One series per defined domain: its state and the QEMU version it runs (empty when not running).",
    );
    for d in list {
        let v = versions.get(d.name.as_str()).copied().unwrap_or("");
        e.sample(
            "qlive_domain_info",
            &[
                ("domain", &d.name),
                ("state", state_label(&d.state)),
                ("qemu_version", v),
            ],
            1.0,
        );
    }

    e.family(
        "qlive_domain_stale",
        Kind::Gauge,
        "Whether a running domain's QEMU runs on files replaced or deleted on disk since it started, which a live upgrade refreshes (qlive stale).",
    );
    for s in stale.iter().filter(|s| s.error.is_none()) {
        e.sample(
            "qlive_domain_stale",
            &[("domain", &s.name)],
            if s.stale { 1.0 } else { 0.0 },
        );
    }
    e.family(
        "qlive_domain_restart_required",
        Kind::Gauge,
        "Whether a running domain runs firmware replaced on disk since it booted, which only a cold restart (stop, start) loads (qlive stale).",
    );
    for s in stale.iter().filter(|s| s.error.is_none()) {
        e.sample(
            "qlive_domain_restart_required",
            &[("domain", &s.name)],
            if s.restart_required { 1.0 } else { 0.0 },
        );
    }
    e.family(
        "qlive_domain_stale_reason",
        Kind::Gauge,
        "Why a domain is stale: one series per changed file (kind as in qlive stale --json).",
    );
    for s in stale {
        for r in &s.reasons {
            let path = r.path.to_string_lossy();
            e.sample(
                "qlive_domain_stale_reason",
                &[("domain", &s.name), ("kind", &r.kind), ("path", &path)],
                1.0,
            );
        }
    }
    e.family(
        "qlive_domain_stale_check_failed",
        Kind::Gauge,
        "Running domains whose stale check failed (qlive upgrade --stale does not select them).",
    );
    for s in stale.iter().filter(|s| s.error.is_some()) {
        e.sample(
            "qlive_domain_stale_check_failed",
            &[("domain", &s.name)],
            1.0,
        );
    }

    e.family(
        "qlive_migrations_total",
        Kind::Counter,
        "Migrations the agent ran, by result: succeeded, failed (the guest kept running on its source), crashed, unreachable, lost.",
    );
    for r in MigrationResult::ALL {
        e.sample(
            "qlive_migrations_total",
            &[("result", r.as_str())],
            m.tally.migrations.get(r) as f64,
        );
    }
    e.histogram(
        "qlive_migration_duration_seconds",
        "Wall time of successful migrations, request to answer.",
        &m.tally.duration_seconds,
    );
    e.histogram(
        "qlive_migration_qemu_downtime_seconds",
        "QEMU's downtime (guest paused) of successful migrations.",
        &m.tally.qemu_downtime_seconds,
    );

    if let Some(u) = &m.tally.last_upgrade {
        e.family(
            "qlive_upgrade_last_run_timestamp_seconds",
            Kind::Gauge,
            "When the last qlive upgrade run (not a dry run) ended, in Unix time.",
        )
        .sample(
            "qlive_upgrade_last_run_timestamp_seconds",
            &[],
            u.finished_at_s as f64,
        );
        e.family(
            "qlive_upgrade_last_run_success",
            Kind::Gauge,
            "Whether the last upgrade run moved every selected domain and checked every running one.",
        )
        .sample(
            "qlive_upgrade_last_run_success",
            &[],
            if u.ok() { 1.0 } else { 0.0 },
        );
        e.family(
            "qlive_upgrade_last_run_domains",
            Kind::Gauge,
            "Domains in the last upgrade run: selected, succeeded, failed (still on their old QEMU), unchecked.",
        );
        for (result, n) in [
            ("selected", u.selected),
            ("succeeded", u.succeeded),
            ("failed", u.failed),
            ("unchecked", u.unchecked.len() as u64),
        ] {
            e.sample(
                "qlive_upgrade_last_run_domains",
                &[("result", result)],
                n as f64,
            );
        }
        e.family(
            "qlive_upgrade_last_run_failed_domain",
            Kind::Gauge,
            "The domains the last upgrade run could not move; they still run on their old QEMU.",
        );
        for d in &u.failed_domains {
            e.sample(
                "qlive_upgrade_last_run_failed_domain",
                &[("domain", d)],
                1.0,
            );
        }
        e.family(
            "qlive_upgrade_last_run_duration_seconds",
            Kind::Gauge,
            "Wall time of the last upgrade run.",
        )
        .sample(
            "qlive_upgrade_last_run_duration_seconds",
            &[],
            u.wall_ms as f64 / 1000.0,
        );
    }
    e.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::StaleReasonInfo;
    use crate::metrics::{LastUpgrade, Tally};
    use uuid::Uuid;

    fn entry(name: &str, state: &str) -> ListEntry {
        ListEntry {
            name: name.into(),
            uuid: Uuid::nil(),
            state: state.into(),
            domid: None,
            pid: None,
        }
    }

    fn stale(name: &str, reasons: Vec<StaleReasonInfo>, error: Option<&str>) -> StaleEntry {
        StaleEntry {
            name: name.into(),
            domid: 1,
            pid: 2,
            emulator: "/usr/bin/qemu-system-x86_64".into(),
            qemu_version: "7.2.22".into(),
            stale: reasons.iter().any(|r| !r.restart_required),
            restart_required: reasons.iter().any(|r| r.restart_required),
            reasons,
            error: error.map(String::from),
        }
    }

    #[test]
    fn every_part_is_there() {
        let list = vec![
            entry("a", "running"),
            entry("b", "running"),
            entry("c", "shut-off"),
            entry("d", "unknown (QMP did not answer)"),
        ];
        let st = vec![
            stale(
                "a",
                vec![StaleReasonInfo {
                    kind: "exe-replaced".into(),
                    path: "/usr/bin/qemu-system-x86_64".into(),
                    text: "executable replaced: /usr/bin/qemu-system-x86_64".into(),
                    restart_required: false,
                }],
                None,
            ),
            stale("b", vec![], Some("reading /proc/2/maps: gone")),
        ];
        let mut tally = Tally::new(100);
        tally.migration(MigrationResult::Succeeded, 0.3, Some(0.004));
        tally.migration(MigrationResult::Failed, 1.0, None);
        tally.last_upgrade = Some(LastUpgrade {
            finished_at_s: 200,
            selected: 2,
            succeeded: 1,
            failed: 1,
            failed_domains: vec!["b".into()],
            unchecked: vec![],
            wall_ms: 1500,
        });
        let m = Metrics {
            agent_started_at_s: 150,
            tally,
        };
        let t = render(&list, &st, &m);
        for want in [
            "qlive_agent_up 1\n",
            "qlive_agent_start_time_seconds 150\n",
            "qlive_domains{state=\"running\"} 2\n",
            "qlive_domains{state=\"crashed\"} 0\n",
            "qlive_domains{state=\"unknown\"} 1\n",
            "qlive_domain_info{domain=\"a\",state=\"running\",qemu_version=\"7.2.22\"} 1\n",
            "qlive_domain_info{domain=\"c\",state=\"shut-off\",qemu_version=\"\"} 1\n",
            "qlive_domain_stale{domain=\"a\"} 1\n",
            "qlive_domain_restart_required{domain=\"a\"} 0\n",
            "qlive_domain_stale_reason{domain=\"a\",kind=\"exe-replaced\",path=\"/usr/bin/qemu-system-x86_64\"} 1\n",
            "qlive_domain_stale_check_failed{domain=\"b\"} 1\n",
            "qlive_migrations_total{result=\"succeeded\"} 1\n",
            "qlive_migrations_total{result=\"failed\"} 1\n",
            "qlive_migrations_total{result=\"lost\"} 0\n",
            "qlive_migration_duration_seconds_count 1\n",
            "qlive_migration_qemu_downtime_seconds_bucket{le=\"0.005\"} 1\n",
            "qlive_upgrade_last_run_success 0\n",
            "qlive_upgrade_last_run_domains{result=\"failed\"} 1\n",
            "qlive_upgrade_last_run_failed_domain{domain=\"b\"} 1\n",
            "qlive_upgrade_last_run_duration_seconds 1.5\n",
        ] {
            assert!(t.contains(want), "missing {want:?} in\n{t}");
        }
        assert!(!t.contains("qlive_domain_stale{domain=\"b\"}"), "{t}");
    }

    #[test]
    fn no_upgrade_run_no_upgrade_families() {
        let m = Metrics {
            agent_started_at_s: 1,
            tally: Tally::new(1),
        };
        let t = render(&[], &[], &m);
        assert!(!t.contains("qlive_upgrade_last_run"), "{t}");
        assert!(t.contains("qlive_migrations_total{result=\"succeeded\"} 0\n"));
    }

    #[test]
    fn down_is_a_valid_exposition() {
        assert_eq!(
            render_down(),
            "# HELP qlive_agent_up Whether qlive metrics could read the agent's state (1) or not (0).\n\
             # TYPE qlive_agent_up gauge\nqlive_agent_up 0\n"
        );
    }
}
