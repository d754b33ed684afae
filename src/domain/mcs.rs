//! SELinux MCS categories: one pair per domain, chosen by the agent.
//!
//! sVirt confines each QEMU by giving it, and everything it may touch
//! (guest-RAM memfd, instance directory, disk images, console log), one
//! pair of MCS categories. Both instances of a domain during a migration
//! map the same memfd and open the same images, so the pair belongs to the
//! *domain*, not the instance: allocated at define, recorded in
//! `<state>/mcs.json`, reused by every instance, released at undefine.
//! Two domains never hold the same pair.
//!
//! The pair is allocated whether or not SELinux is enabled, so a host that
//! turns it on later needs no migration of state. It is only *applied*
//! (labels, exec context) when selinuxfs is mounted; see
//! `instance::selinux` and docs/selinux.md.

use crate::fsutil;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

/// Categories c0..c1023, as in the reference policy's MCS range.
pub const CATEGORIES: u16 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum McsError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is corrupt or from a newer qlive: {message}; left untouched")]
    Corrupt { path: PathBuf, message: String },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no free MCS category pair left")]
    Exhausted,
}

/// Two distinct categories, `a < b`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct McsPair {
    a: u16,
    b: u16,
}

impl McsPair {
    pub fn new(x: u16, y: u16) -> Option<McsPair> {
        if x == y || x >= CATEGORIES || y >= CATEGORIES {
            return None;
        }
        Some(McsPair {
            a: x.min(y),
            b: x.max(y),
        })
    }

    /// `s0:cA,cB`
    pub fn level(&self) -> String {
        format!("s0:c{},c{}", self.a, self.b)
    }
}

impl std::fmt::Display for McsPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "c{},c{}", self.a, self.b)
    }
}

impl std::str::FromStr for McsPair {
    type Err = String;
    fn from_str(s: &str) -> Result<McsPair, String> {
        let bad = || format!("not an MCS pair like c12,c345: {s:?}");
        let (x, y) = s.split_once(',').ok_or_else(bad)?;
        let num = |p: &str| {
            p.strip_prefix('c')
                .and_then(|n| n.parse::<u16>().ok())
                .ok_or_else(bad)
        };
        McsPair::new(num(x)?, num(y)?).ok_or_else(bad)
    }
}

impl Serialize for McsPair {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for McsPair {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

const FORMAT: &str = "qlive-mcs";
const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct McsFile {
    format: String,
    version: u32,
    domains: BTreeMap<String, McsPair>,
}

/// The persisted domain -> pair table.
#[derive(Debug)]
pub struct McsTable {
    path: PathBuf,
    domains: BTreeMap<String, McsPair>,
}

impl McsTable {
    pub fn open(state_dir: &Path) -> Result<McsTable, McsError> {
        let path = state_dir.join("mcs.json");
        let domains = match std::fs::read(&path) {
            Ok(bytes) => {
                let f: McsFile = serde_json::from_slice(&bytes).map_err(|e| McsError::Corrupt {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
                if f.format != FORMAT || f.version > VERSION {
                    return Err(McsError::Corrupt {
                        path,
                        message: format!("format {} version {}", f.format, f.version),
                    });
                }
                let mut seen = std::collections::HashSet::new();
                for (name, p) in &f.domains {
                    if !seen.insert(*p) {
                        return Err(McsError::Corrupt {
                            path,
                            message: format!("pair {p} of {name} is given twice"),
                        });
                    }
                }
                f.domains
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => return Err(McsError::Read { path, source }),
        };
        Ok(McsTable { path, domains })
    }

    pub fn get(&self, name: &str) -> Option<McsPair> {
        self.domains.get(name).copied()
    }

    /// The domain's pair, allocating (and persisting) one if it has none.
    /// `rand` yields random numbers; the pair is the first free one drawn.
    pub fn ensure(
        &mut self,
        name: &str,
        mut rand: impl FnMut() -> u32,
    ) -> Result<McsPair, McsError> {
        if let Some(p) = self.get(name) {
            return Ok(p);
        }
        let used: std::collections::HashSet<McsPair> = self.domains.values().copied().collect();
        // ~523k pairs: random draws find a free one at once in practice;
        // a linear scan settles the (theoretical) full case.
        let drawn = (0..64).find_map(|_| {
            let r = rand();
            McsPair::new((r % 1024) as u16, ((r >> 10) % 1024) as u16).filter(|p| !used.contains(p))
        });
        let pair = match drawn {
            Some(p) => p,
            None => (0..CATEGORIES)
                .flat_map(|a| (a + 1..CATEGORIES).map(move |b| (a, b)))
                .filter_map(|(a, b)| McsPair::new(a, b))
                .find(|p| !used.contains(p))
                .ok_or(McsError::Exhausted)?,
        };
        self.domains.insert(name.to_string(), pair);
        if let Err(e) = self.save() {
            self.domains.remove(name);
            return Err(e);
        }
        Ok(pair)
    }

    pub fn release(&mut self, name: &str) -> Result<(), McsError> {
        if self.domains.remove(name).is_some() {
            self.save()?;
        }
        Ok(())
    }

    fn save(&self) -> Result<(), McsError> {
        let f = McsFile {
            format: FORMAT.into(),
            version: VERSION,
            domains: self.domains.clone(),
        };
        let mut bytes = serde_json::to_vec_pretty(&f).map_err(|e| McsError::Write {
            path: self.path.clone(),
            source: io::Error::other(e),
        })?;
        bytes.push(b'\n');
        fsutil::write_atomic(&self.path, &bytes, 0o600).map_err(|source| McsError::Write {
            path: self.path.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_are_per_domain_unique_persisted_and_released() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = McsTable::open(dir.path()).unwrap();
        // A generator that keeps repeating: the second domain must not get
        // the first one's pair.
        let mut n = 0u32;
        let a = t
            .ensure("a", || {
                n += 1;
                5 | (7 << 10)
            })
            .unwrap();
        let b = t.ensure("b", || 5 | (7 << 10)).unwrap();
        assert_eq!(a.to_string(), "c5,c7");
        assert_ne!(a, b);
        // Stable: asking again gives the same pair, also after a reopen.
        assert_eq!(t.ensure("a", || 99).unwrap(), a);
        let mut t2 = McsTable::open(dir.path()).unwrap();
        assert_eq!(t2.get("a"), Some(a));
        assert_eq!(t2.get("b"), Some(b));
        t2.release("a").unwrap();
        assert_eq!(McsTable::open(dir.path()).unwrap().get("a"), None);
        assert_eq!(a.level(), "s0:c5,c7");
    }

    #[test]
    fn bad_pairs_and_files_refused() {
        assert!("c3,c3".parse::<McsPair>().is_err());
        assert!("c1,c1024".parse::<McsPair>().is_err());
        assert!("c1;c2".parse::<McsPair>().is_err());
        assert_eq!("c9,c2".parse::<McsPair>().unwrap().to_string(), "c2,c9");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("mcs.json");
        let dup = r#"{"format":"qlive-mcs","version":1,"domains":{"a":"c1,c2","b":"c1,c2"}}"#;
        std::fs::write(&p, dup).unwrap();
        let e = McsTable::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("given twice"), "{e}");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), dup, "left untouched");
        std::fs::write(&p, r#"{"format":"qlive-mcs","version":9,"domains":{}}"#).unwrap();
        assert!(McsTable::open(dir.path()).is_err());
    }
}
