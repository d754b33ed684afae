//! The domain table: the *active* table maps name and UUID to the domain the
//! world sees; the *remote* (shadow) table holds instances being migrated in,
//! keyed by the same name, invisible to `list`/`info` until the swap.
//!
//! The table is generic over what it stores so that it can be tested on its
//! own; the agent stores `Arc<Domain>` in the active table and the incoming
//! instance in the remote one.

use std::collections::{BTreeMap, HashMap};
use uuid::Uuid;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TableError {
    #[error("domain {0:?} already exists")]
    NameTaken(String),
    #[error("UUID {uuid} is already used by domain {by:?}")]
    UuidTaken { uuid: Uuid, by: String },
    #[error("domain {0:?} not found")]
    NotFound(String),
    #[error("domain {0:?} already has an incoming instance in the remote table")]
    RemoteTaken(String),
}

struct Entry<A> {
    uuid: Uuid,
    value: A,
}

pub struct DomainTable<A, R> {
    active: BTreeMap<String, Entry<A>>,
    by_uuid: HashMap<Uuid, String>,
    remote: BTreeMap<String, R>,
}

impl<A, R> Default for DomainTable<A, R> {
    fn default() -> Self {
        DomainTable {
            active: BTreeMap::new(),
            by_uuid: HashMap::new(),
            remote: BTreeMap::new(),
        }
    }
}

impl<A: Clone, R> DomainTable<A, R> {
    /// Add a domain; both its name and its UUID must be unused.
    pub fn insert(&mut self, name: &str, uuid: Uuid, value: A) -> Result<(), TableError> {
        if self.active.contains_key(name) {
            return Err(TableError::NameTaken(name.to_string()));
        }
        if let Some(by) = self.by_uuid.get(&uuid) {
            return Err(TableError::UuidTaken {
                uuid,
                by: by.clone(),
            });
        }
        self.by_uuid.insert(uuid, name.to_string());
        self.active.insert(name.to_string(), Entry { uuid, value });
        Ok(())
    }

    /// Would `insert` succeed? (Checked before side effects like writing the
    /// store, so that a refused define leaves nothing behind.)
    pub fn check_free(&self, name: &str, uuid: Uuid) -> Result<(), TableError> {
        if self.active.contains_key(name) {
            return Err(TableError::NameTaken(name.to_string()));
        }
        if let Some(by) = self.by_uuid.get(&uuid) {
            return Err(TableError::UuidTaken {
                uuid,
                by: by.clone(),
            });
        }
        Ok(())
    }

    pub fn get(&self, name: &str) -> Result<A, TableError> {
        self.active
            .get(name)
            .map(|e| e.value.clone())
            .ok_or_else(|| TableError::NotFound(name.to_string()))
    }

    /// Look a domain up by name or by UUID (as `virsh` does).
    pub fn lookup(&self, name_or_uuid: &str) -> Result<A, TableError> {
        if let Ok(v) = self.get(name_or_uuid) {
            return Ok(v);
        }
        Uuid::parse_str(name_or_uuid)
            .ok()
            .and_then(|u| self.by_uuid.get(&u))
            .and_then(|n| self.active.get(n))
            .map(|e| e.value.clone())
            .ok_or_else(|| TableError::NotFound(name_or_uuid.to_string()))
    }

    pub fn remove(&mut self, name: &str) -> Result<A, TableError> {
        if self.remote.contains_key(name) {
            return Err(TableError::RemoteTaken(name.to_string()));
        }
        let e = self
            .active
            .remove(name)
            .ok_or_else(|| TableError::NotFound(name.to_string()))?;
        self.by_uuid.remove(&e.uuid);
        Ok(e.value)
    }

    /// All active domains, sorted by name.
    pub fn list(&self) -> Vec<A> {
        self.active.values().map(|e| e.value.clone()).collect()
    }

    /// Put an incoming instance of an existing domain in the remote table.
    pub fn insert_remote(&mut self, name: &str, value: R) -> Result<(), TableError> {
        if !self.active.contains_key(name) {
            return Err(TableError::NotFound(name.to_string()));
        }
        if self.remote.contains_key(name) {
            return Err(TableError::RemoteTaken(name.to_string()));
        }
        self.remote.insert(name.to_string(), value);
        Ok(())
    }

    pub fn remote(&self, name: &str) -> Option<&R> {
        self.remote.get(name)
    }

    /// Take the incoming instance out of the remote table: on failure to
    /// discard it, on success to install it as the domain's instance (the
    /// swap, done by the caller under the domain's lock).
    pub fn take_remote(&mut self, name: &str) -> Option<R> {
        self.remote.remove(name)
    }

    pub fn remote_len(&self) -> usize {
        self.remote.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_and_uuid_unique() {
        let mut t: DomainTable<u32, u32> = DomainTable::default();
        let u1 = Uuid::new_v4();
        t.insert("a", u1, 1).unwrap();
        assert_eq!(
            t.insert("a", Uuid::new_v4(), 2),
            Err(TableError::NameTaken("a".into()))
        );
        assert!(matches!(
            t.insert("b", u1, 2),
            Err(TableError::UuidTaken { .. })
        ));
        assert_eq!(t.lookup(&u1.to_string()).unwrap(), 1);
        assert_eq!(t.remove("a").unwrap(), 1);
        t.insert("b", u1, 2).unwrap();
    }

    #[test]
    fn remote_is_shadow() {
        let mut t: DomainTable<u32, &str> = DomainTable::default();
        assert_eq!(
            t.insert_remote("a", "x"),
            Err(TableError::NotFound("a".into()))
        );
        t.insert("a", Uuid::new_v4(), 1).unwrap();
        t.insert_remote("a", "incoming").unwrap();
        assert_eq!(
            t.insert_remote("a", "y"),
            Err(TableError::RemoteTaken("a".into()))
        );
        // list/get keep answering about the active entry
        assert_eq!(t.list(), vec![1]);
        assert_eq!(t.get("a").unwrap(), 1);
        // a domain with an incoming instance cannot be removed
        assert!(t.remove("a").is_err());
        assert_eq!(t.take_remote("a"), Some("incoming"));
        assert_eq!(t.remote_len(), 0);
    }
}
