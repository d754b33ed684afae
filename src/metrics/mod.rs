//! What the agent counts for `qlive metrics`: migrations by result, their
//! duration and QEMU downtime (histograms), and the last upgrade run.
//!
//! The tally is kept in `<state>/metrics.json`, written atomically after
//! every change, so counters survive an agent restart (a self-upgrade of
//! qlive restarts the agent) and the last upgrade run is still reported
//! days later. Metrics never stop the agent: a file that cannot be read is
//! renamed aside (`metrics.json.corrupt`) and counting starts again from
//! zero; a failed write is logged and retried at the next change.
//!
//! The same types are the `metrics` call's answer (`api::Metrics`), so
//! they accept unknown fields (a newer agent may add some); the file itself
//! is checked by its format and version.
//!
//! The text format itself is in [`prom`]; the client (`cli::metrics`)
//! puts the tally together with the domain list and the stale check.

pub mod prom;

use crate::fsutil;
use serde::{Deserialize, Serialize};
use std::io;
use std::path::{Path, PathBuf};

/// Upper bounds (s) of the migration duration buckets: a migration on
/// shared memory takes tens of milliseconds to seconds under TCG; one that
/// copies RAM, minutes.
pub const DURATION_BOUNDS_S: &[f64] = &[
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];
/// Upper bounds (s) of QEMU's downtime buckets: milliseconds is the norm.
pub const DOWNTIME_BOUNDS_S: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is corrupt or from a newer qlive")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("moving the unreadable {path} aside")]
    MoveAside {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A histogram with fixed bucket bounds: `counts[i]` observations fell in
/// `(bounds[i-1], bounds[i]]` (not cumulative); those above the last bound
/// are only in `count`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    pub bounds: Vec<f64>,
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    pub fn new(bounds: &[f64]) -> Histogram {
        Histogram {
            bounds: bounds.to_vec(),
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            self.counts[i] += 1;
        }
        self.sum += v;
        self.count += 1;
    }

    /// Loaded from a file: the bounds are this build's, the counts fit them.
    fn is_for(&self, bounds: &[f64]) -> bool {
        self.bounds == bounds
            && self.counts.len() == bounds.len()
            && self.counts.iter().sum::<u64>() <= self.count
    }
}

/// How a migration the agent ran ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationResult {
    /// The guest runs on the new QEMU.
    Succeeded,
    /// The guest still runs on its source (refused by the preflight, a
    /// hook, QEMU, an abort or the timeout).
    Failed,
    /// The destination may have run the guest and is gone: the domain is
    /// `crashed` (docs/migration.md, "Crashed domains").
    Crashed,
    /// Which instance runs the guest is not known: the domain is
    /// `unreachable` until the next agent start recovers it.
    Unreachable,
    /// The guest stopped: its QEMU exited during the migration and no
    /// instance runs it (the domain is `shut-off`).
    Lost,
}

impl MigrationResult {
    pub const ALL: [MigrationResult; 5] = [
        MigrationResult::Succeeded,
        MigrationResult::Failed,
        MigrationResult::Crashed,
        MigrationResult::Unreachable,
        MigrationResult::Lost,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MigrationResult::Succeeded => "succeeded",
            MigrationResult::Failed => "failed",
            MigrationResult::Crashed => "crashed",
            MigrationResult::Unreachable => "unreachable",
            MigrationResult::Lost => "lost",
        }
    }
}

/// Migrations by result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationCounts {
    pub succeeded: u64,
    pub failed: u64,
    pub crashed: u64,
    pub unreachable: u64,
    pub lost: u64,
}

impl MigrationCounts {
    pub fn get(&self, r: MigrationResult) -> u64 {
        match r {
            MigrationResult::Succeeded => self.succeeded,
            MigrationResult::Failed => self.failed,
            MigrationResult::Crashed => self.crashed,
            MigrationResult::Unreachable => self.unreachable,
            MigrationResult::Lost => self.lost,
        }
    }

    fn bump(&mut self, r: MigrationResult) {
        let c = match r {
            MigrationResult::Succeeded => &mut self.succeeded,
            MigrationResult::Failed => &mut self.failed,
            MigrationResult::Crashed => &mut self.crashed,
            MigrationResult::Unreachable => &mut self.unreachable,
            MigrationResult::Lost => &mut self.lost,
        };
        *c += 1;
    }
}

/// The last `qlive upgrade` run that was not a dry run, as its client
/// reported it when it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastUpgrade {
    /// When the agent was told (Unix seconds).
    pub finished_at_s: u64,
    pub selected: u64,
    pub succeeded: u64,
    pub failed: u64,
    /// Sorted by name.
    pub failed_domains: Vec<String>,
    /// Running domains whose stale check failed, so were not selected.
    pub unchecked: Vec<String>,
    pub wall_ms: u64,
}

impl LastUpgrade {
    /// Every selected domain moved and none went unchecked.
    pub fn ok(&self) -> bool {
        self.failed == 0 && self.unchecked.is_empty()
    }
}

/// Everything counted since the tally began.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    /// When counting began (Unix seconds): the counters' start.
    pub since_s: u64,
    pub migrations: MigrationCounts,
    /// Wall time of each successful migration, request to answer.
    pub duration_seconds: Histogram,
    /// QEMU's own `downtime` of each successful migration.
    pub qemu_downtime_seconds: Histogram,
    pub last_upgrade: Option<LastUpgrade>,
}

impl Tally {
    pub fn new(since_s: u64) -> Tally {
        Tally {
            since_s,
            migrations: MigrationCounts::default(),
            duration_seconds: Histogram::new(DURATION_BOUNDS_S),
            qemu_downtime_seconds: Histogram::new(DOWNTIME_BOUNDS_S),
            last_upgrade: None,
        }
    }

    /// Count one migration; a successful one also gives its wall time and
    /// QEMU's downtime (when QEMU reported it).
    pub fn migration(&mut self, r: MigrationResult, wall_s: f64, downtime_s: Option<f64>) {
        self.migrations.bump(r);
        if r == MigrationResult::Succeeded {
            self.duration_seconds.observe(wall_s);
            if let Some(d) = downtime_s {
                self.qemu_downtime_seconds.observe(d);
            }
        }
    }
}

const FORMAT: &str = "qlive-metrics";
const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TallyFile {
    format: String,
    version: u32,
    tally: Tally,
}

/// The tally and the file it is kept in.
#[derive(Debug)]
pub struct TallyStore {
    path: PathBuf,
    pub tally: Tally,
}

impl TallyStore {
    pub fn path_in(state_dir: &Path) -> PathBuf {
        state_dir.join("metrics.json")
    }

    /// Load `<state>/metrics.json`, or start a new tally (at `now_s`) when
    /// there is none. An unreadable file is moved aside and reported in the
    /// second value: the agent logs it and goes on.
    pub fn open(state_dir: &Path, now_s: u64) -> (TallyStore, Option<MetricsError>) {
        let path = Self::path_in(state_dir);
        let fresh = |path: PathBuf| TallyStore {
            path,
            tally: Tally::new(now_s),
        };
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return (fresh(path), None),
            Err(source) => {
                return (
                    fresh(path.clone()),
                    Some(MetricsError::Read { path, source }),
                )
            }
        };
        match parse(&bytes) {
            Ok(tally) => (TallyStore { path, tally }, None),
            Err(source) => {
                let aside = path.with_extension("json.corrupt");
                let err = match std::fs::rename(&path, &aside) {
                    Ok(()) => MetricsError::Corrupt {
                        path: path.clone(),
                        source,
                    },
                    Err(source) => MetricsError::MoveAside {
                        path: path.clone(),
                        source,
                    },
                };
                (fresh(path), Some(err))
            }
        }
    }

    /// Write the tally (after a change).
    pub fn save(&self) -> Result<(), MetricsError> {
        let file = TallyFile {
            format: FORMAT.into(),
            version: VERSION,
            tally: self.tally.clone(),
        };
        let mut data = serde_json::to_vec_pretty(&file).map_err(|e| MetricsError::Write {
            path: self.path.clone(),
            source: io::Error::other(e),
        })?;
        data.push(b'\n');
        fsutil::write_atomic(&self.path, &data, 0o600).map_err(|source| MetricsError::Write {
            path: self.path.clone(),
            source,
        })
    }
}

fn parse(bytes: &[u8]) -> Result<Tally, serde_json::Error> {
    use serde::de::Error;
    let f: TallyFile = serde_json::from_slice(bytes)?;
    if f.format != FORMAT || f.version != VERSION {
        return Err(serde_json::Error::custom(format!(
            "format {:?} version {}, want {FORMAT:?} version {VERSION}",
            f.format, f.version
        )));
    }
    let t = f.tally;
    if !t.duration_seconds.is_for(DURATION_BOUNDS_S)
        || !t.qemu_downtime_seconds.is_for(DOWNTIME_BOUNDS_S)
    {
        return Err(serde_json::Error::custom(
            "histogram buckets differ from this qlive's",
        ));
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets() {
        let mut h = Histogram::new(&[1.0, 2.0]);
        for v in [0.5, 1.0, 1.5, 2.5] {
            h.observe(v);
        }
        assert_eq!(h.counts, vec![2, 1]);
        assert_eq!(h.count, 4);
        assert_eq!(h.sum, 5.5);
    }

    #[test]
    fn only_successes_are_timed() {
        let mut t = Tally::new(1);
        t.migration(MigrationResult::Succeeded, 0.2, Some(0.004));
        t.migration(MigrationResult::Succeeded, 0.3, None);
        t.migration(MigrationResult::Failed, 9.0, Some(1.0));
        t.migration(MigrationResult::Crashed, 9.0, None);
        assert_eq!(t.migrations.succeeded, 2);
        assert_eq!(t.migrations.failed, 1);
        assert_eq!(t.migrations.crashed, 1);
        assert_eq!(t.duration_seconds.count, 2);
        assert_eq!(t.qemu_downtime_seconds.count, 1);
    }

    #[test]
    fn survives_a_reopen() {
        let d = tempfile::tempdir().unwrap();
        let (mut s, err) = TallyStore::open(d.path(), 7);
        assert!(err.is_none());
        s.tally
            .migration(MigrationResult::Succeeded, 0.1, Some(0.002));
        s.tally.last_upgrade = Some(LastUpgrade {
            finished_at_s: 9,
            selected: 2,
            succeeded: 1,
            failed: 1,
            failed_domains: vec!["b".into()],
            unchecked: vec![],
            wall_ms: 1234,
        });
        s.save().unwrap();
        let (s2, err) = TallyStore::open(d.path(), 100);
        assert!(err.is_none());
        assert_eq!(s2.tally, s.tally);
        assert_eq!(s2.tally.since_s, 7);
    }

    #[test]
    fn a_corrupt_file_is_moved_aside_and_counting_restarts() {
        let d = tempfile::tempdir().unwrap();
        let p = TallyStore::path_in(d.path());
        std::fs::write(&p, b"{\"format\":\"qlive-metrics\"").unwrap();
        let (s, err) = TallyStore::open(d.path(), 5);
        assert!(matches!(err, Some(MetricsError::Corrupt { .. })), "{err:?}");
        assert_eq!(s.tally, Tally::new(5));
        assert_eq!(
            std::fs::read(d.path().join("metrics.json.corrupt")).unwrap(),
            b"{\"format\":\"qlive-metrics\""
        );
        assert!(!p.exists());
    }

    #[test]
    fn other_buckets_are_refused() {
        let mut t = Tally::new(1);
        t.duration_seconds = Histogram::new(&[1.0]);
        let f = TallyFile {
            format: FORMAT.into(),
            version: VERSION,
            tally: t,
        };
        let err = parse(&serde_json::to_vec(&f).unwrap()).unwrap_err();
        assert!(err.to_string().contains("buckets"), "{err}");
    }
}
