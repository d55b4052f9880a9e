//! The durable store of persistent reservations: one redb file, `portres.redb`, in the state
//! directory.
//!
//! Why redb (over SQLite): pure Rust (no C build), ACID with an fsync on every commit (the default
//! `Durability::Immediate`), a single file, typed ordered tables, and upstream crash-consistency
//! and fuzz tests. The table is small and kept in memory by the daemon as the source of truth;
//! the store is written through on every persistent create and delete, before the reply.
//!
//! Layout: table `reservations` maps `(protocol, start)` to a JSON-encoded [`StoredReservation`];
//! table `meta` holds `schema_version` ([`SCHEMA_VERSION`]). A file with a newer schema is refused
//! rather than misread.

use std::path::{Path, PathBuf};

use portres_core::{Acl, Kind, Mode, Owner, PortRange, Protocol, Reservation, Token};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

const RESERVATIONS: TableDefinition<(u8, u16), &[u8]> = TableDefinition::new("reservations");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// The on-disk schema this build writes and reads.
pub const SCHEMA_VERSION: u64 = 1;

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// redb failed (I/O, corruption, the file is locked by another daemon, ...).
    #[error("store {path}: {source}")]
    Db {
        /// The database file.
        path: PathBuf,
        /// What redb said.
        #[source]
        source: redb::Error,
    },
    /// The file was written by a newer portres.
    #[error(
        "store {path} has schema version {found}, but this portres reads version {SCHEMA_VERSION}; \
         run the portres that wrote it, or move the file away to start empty"
    )]
    Schema {
        /// The database file.
        path: PathBuf,
        /// The version found.
        found: u64,
    },
    /// A record could not be decoded.
    #[error("store {path}: record for {key} is unreadable: {why}")]
    Record {
        /// The database file.
        path: PathBuf,
        /// Which record.
        key: String,
        /// Why.
        why: String,
    },
}

/// A persistent reservation as stored. Versioned by [`SCHEMA_VERSION`]; new fields must have
/// defaults so older files stay readable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredReservation {
    /// The token (stable across restarts).
    pub token: u64,
    /// `"tcp"` or `"udp"`.
    pub protocol: String,
    /// First port.
    pub start: u16,
    /// Number of ports.
    pub count: u16,
    /// `"hold"` or `"exclude"`.
    pub mode: String,
    /// Uids allowed to consume it.
    #[serde(default)]
    pub allow_users: Vec<u32>,
    /// Gids allowed to consume it.
    #[serde(default)]
    pub allow_groups: Vec<u32>,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
    /// Uid of the administrator who created it.
    pub creator_uid: u32,
    /// Command line that created it.
    #[serde(default)]
    pub creator_command: Option<String>,
}

impl StoredReservation {
    /// The record for a persistent reservation of the table.
    pub fn from_reservation(r: &Reservation) -> Self {
        let acl = match &r.kind {
            Kind::Persistent { acl } => acl.clone(),
            Kind::Runtime { .. } => Acl::default(),
        };
        StoredReservation {
            token: r.token.get(),
            protocol: r.protocol.as_str().into(),
            start: r.range.start(),
            count: r.range.count(),
            mode: r.mode.as_str().into(),
            allow_users: acl.users,
            allow_groups: acl.groups,
            created: r.created,
            creator_uid: r.owner.uid,
            creator_command: r.owner.command.clone(),
        }
    }

    /// Back into a table reservation.
    pub fn to_reservation(&self) -> Result<Reservation, String> {
        let token = Token::new(self.token).ok_or("token is 0")?;
        let protocol: Protocol = self.protocol.parse()?;
        let range =
            PortRange::new(self.start.into(), self.count.into()).map_err(|e| e.to_string())?;
        let mode: Mode = self.mode.parse()?;
        Ok(Reservation::persistent(
            token,
            protocol,
            range,
            mode,
            Acl {
                users: self.allow_users.clone(),
                groups: self.allow_groups.clone(),
            },
            Owner {
                pid: None,
                uid: self.creator_uid,
                command: self.creator_command.clone(),
            },
            self.created,
        ))
    }
}

fn proto_key(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
    }
}

/// The open store.
#[derive(Debug)]
pub struct Store {
    db: Database,
    path: PathBuf,
}

impl Store {
    /// Opens (or creates) `portres.redb` in `state_dir`, checking the schema version.
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        let path = state_dir.join("portres.redb");
        let err = |e: redb::Error| StoreError::Db {
            path: path.clone(),
            source: e,
        };
        let db = Database::create(&path).map_err(|e| err(e.into()))?;
        let txn = db.begin_write().map_err(|e| err(e.into()))?;
        let found = {
            let mut meta = txn.open_table(META).map_err(|e| err(e.into()))?;
            txn.open_table(RESERVATIONS).map_err(|e| err(e.into()))?;
            let found = meta
                .get("schema_version")
                .map_err(|e| err(e.into()))?
                .map(|v| v.value());
            if found.is_none() {
                meta.insert("schema_version", SCHEMA_VERSION)
                    .map_err(|e| err(e.into()))?;
            }
            found
        };
        txn.commit().map_err(|e| err(e.into()))?;
        match found {
            Some(v) if v > SCHEMA_VERSION => Err(StoreError::Schema { path, found: v }),
            _ => Ok(Store { db, path }),
        }
    }

    fn err(&self, e: impl Into<redb::Error>) -> StoreError {
        StoreError::Db {
            path: self.path.clone(),
            source: e.into(),
        }
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every stored reservation.
    pub fn load(&self) -> Result<Vec<StoredReservation>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(RESERVATIONS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| self.err(e))? {
            let (k, v) = entry.map_err(|e| self.err(e))?;
            let rec: StoredReservation =
                serde_json::from_slice(v.value()).map_err(|e| StoreError::Record {
                    path: self.path.clone(),
                    key: format!("{:?}", k.value()),
                    why: e.to_string(),
                })?;
            out.push(rec);
        }
        Ok(out)
    }

    /// Writes one reservation durably (returns after the commit's fsync).
    pub fn put(&self, rec: &StoredReservation) -> Result<(), StoreError> {
        self.put_all(std::slice::from_ref(rec))
    }

    /// Writes reservations in one durable transaction (all or none), e.g. for an import.
    pub fn put_all(&self, recs: &[StoredReservation]) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut t = txn.open_table(RESERVATIONS).map_err(|e| self.err(e))?;
            for rec in recs {
                let protocol: Protocol =
                    rec.protocol.parse().map_err(|why| StoreError::Record {
                        path: self.path.clone(),
                        key: rec.token.to_string(),
                        why,
                    })?;
                let bytes = serde_json::to_vec(rec).expect("plain struct serialises");
                t.insert((proto_key(protocol), rec.start), bytes.as_slice())
                    .map_err(|e| self.err(e))?;
            }
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// Deletes the reservation starting at `start` durably. Returns whether it was there.
    pub fn delete(&self, protocol: Protocol, start: u16) -> Result<bool, StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        let existed = {
            let mut t = txn.open_table(RESERVATIONS).map_err(|e| self.err(e))?;
            t.remove((proto_key(protocol), start))
                .map_err(|e| self.err(e))?
                .is_some()
        };
        txn.commit().map_err(|e| self.err(e))?;
        Ok(existed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(token: u64, start: u16) -> StoredReservation {
        StoredReservation {
            token,
            protocol: "udp".into(),
            start,
            count: 3,
            mode: "exclude".into(),
            allow_users: vec![1000],
            allow_groups: vec![],
            created: 5,
            creator_uid: 0,
            creator_command: Some("portres persistent add".into()),
        }
    }

    #[test]
    fn survives_reopen_and_checks_schema() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            s.put(&rec(11, 5000)).unwrap();
            s.put(&rec(12, 6000)).unwrap();
            assert!(s.delete(Protocol::Udp, 6000).unwrap());
            assert!(!s.delete(Protocol::Tcp, 5000).unwrap());
        }
        let s = Store::open(dir.path()).unwrap();
        let all = s.load().unwrap();
        assert_eq!(all, vec![rec(11, 5000)]);
        let r = all[0].to_reservation().unwrap();
        assert_eq!(StoredReservation::from_reservation(&r), rec(11, 5000));
        drop(s);

        // A newer schema is refused, not misread.
        let db = Database::create(dir.path().join("portres.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(META)
            .unwrap()
            .insert("schema_version", 99)
            .unwrap();
        txn.commit().unwrap();
        drop(db);
        let e = Store::open(dir.path()).unwrap_err();
        assert!(matches!(e, StoreError::Schema { found: 99, .. }), "{e}");
    }
}
