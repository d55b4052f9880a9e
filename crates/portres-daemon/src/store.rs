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

/// Whether a daemon has the store of `state_dir` open now (redb holds an `flock` on the file
/// while it is open): tried without waiting, and let go at once.
pub fn in_use(state_dir: &Path) -> bool {
    match std::fs::File::open(state_dir.join("portres.redb")) {
        Ok(f) => matches!(portres_sys::process::try_lock_exclusive(&f), Ok(false)),
        Err(_) => false,
    }
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file is damaged; the daemon does not start on it.
    #[error(
        "store {path} is damaged: {why}. The daemon did not start. {}",
        restore_hint(journal, *journal_records, *journal_bad, state_dir)
    )]
    Damaged {
        /// The database file.
        path: PathBuf,
        /// What is wrong.
        why: String,
        /// The journal beside it.
        journal: PathBuf,
        /// Reservations the journal holds (None: unreadable or missing).
        journal_records: Option<usize>,
        /// Journal lines that cannot be used.
        journal_bad: usize,
        /// The state directory.
        state_dir: PathBuf,
    },
    /// Another process (a running daemon) has the file open.
    #[error(
        "store {path} is in use by another process (a portres daemon is running on this state \
         directory); stop it first"
    )]
    Locked {
        /// The database file.
        path: PathBuf,
    },
    /// Reading or writing a file failed (permissions, a full disk), not damage.
    #[error("{}", io_message(path, why))]
    Io {
        /// The file.
        path: PathBuf,
        /// What the system said.
        why: String,
    },
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
    /// The file of `reservations_dir` that declares it (`apply`); absent: made by a request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// Why it exists (from its file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// A cluster reservation's key in etcd (this is the member's local copy of it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_key: Option<String>,
    /// The member that created the cluster reservation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_node: Option<String>,
    /// A runtime block of another member, kept free here.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cluster_runtime: bool,
}

impl StoredReservation {
    /// The record for a persistent reservation of the table.
    pub fn from_reservation(r: &Reservation) -> Self {
        let (acl, origin) = match &r.kind {
            Kind::Persistent { acl, origin } => (acl.clone(), origin.clone()),
            Kind::Runtime { .. } => (Acl::default(), portres_core::Origin::default()),
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
            file: origin.file,
            description: origin.description,
            cluster_runtime: origin.cluster.as_ref().is_some_and(|c| c.runtime),
            cluster_node: origin.cluster.as_ref().map(|c| c.node.clone()),
            cluster_key: origin.cluster.map(|c| c.key),
        }
    }

    /// Back into a table reservation.
    pub fn to_reservation(&self) -> Result<Reservation, String> {
        let token = Token::new(self.token).ok_or("token is 0")?;
        let protocol: Protocol = self.protocol.parse()?;
        let range =
            PortRange::new(self.start.into(), self.count.into()).map_err(|e| e.to_string())?;
        let mode: Mode = self.mode.parse()?;
        let mut r = Reservation::persistent(
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
        );
        if let Kind::Persistent { origin, .. } = &mut r.kind {
            origin.file = self.file.clone();
            origin.description = self.description.clone();
            origin.cluster = self
                .cluster_key
                .clone()
                .map(|key| portres_core::ClusterOrigin {
                    key,
                    node: self.cluster_node.clone().unwrap_or_default(),
                    runtime: self.cluster_runtime,
                });
        }
        Ok(r)
    }
}

fn restore_hint(journal: &Path, records: Option<usize>, bad: usize, state_dir: &Path) -> String {
    match records {
        Some(n) => format!(
            "The journal {} holds {n} reservations{}: run `portres store restore --state-dir {}` \
             (with the daemon stopped) to rebuild the store from it (the damaged file is kept \
             beside it), then start the daemon again",
            journal.display(),
            if bad > 0 {
                format!(" ({bad} of its lines are unreadable and will be reported)")
            } else {
                String::new()
            },
            state_dir.display()
        ),
        None => format!(
            "There is no readable journal ({}) to restore from: move the damaged file away to \
             start with no persistent reservations, and create them again",
            journal.display()
        ),
    }
}

fn io_message(path: &Path, why: &str) -> String {
    if why.contains("No space left") || why.contains("os error 28") {
        format!(
            "cannot write {}: the filesystem is full ({why}); free space on it and retry",
            path.display()
        )
    } else {
        format!("cannot use {}: {why}", path.display())
    }
}

fn proto_key(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
    }
}

thread_local! {
    /// Set while the store library runs on a file that may be damaged: a panic there is caught
    /// and reported as damage (see [`panic_expected`]).
    static PANIC_EXPECTED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether a panic on this thread is expected and caught (the daemon's abort-on-panic hook lets
/// it unwind): redb panics on some damaged files instead of returning an error.
pub fn panic_expected() -> bool {
    PANIC_EXPECTED.get()
}

/// Runs `f`, turning a panic into an error message.
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    PANIC_EXPECTED.set(true);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    PANIC_EXPECTED.set(false);
    r.map_err(|p| {
        let what = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown".into());
        format!("the store library failed on it ({what})")
    })
}

/// Opens the redb file, checks its integrity and reads every record; any failure (an error, a
/// repaired file, or a panic inside redb) is a description of the damage.
fn open_checked(path: &Path) -> Result<Opened, OpenFailure> {
    let opened = guarded(|| -> Result<_, OpenFailure> {
        let mut db = Database::create(path).map_err(|e| classify(e.into()))?;
        if !db.check_integrity().map_err(|e| classify(e.into()))? {
            return Err(OpenFailure::Damaged(
                "its integrity check failed (redb repaired what it could, and records may be \
                 missing)"
                    .into(),
            ));
        }
        // Read the schema; write only a new file's (a start writes nothing to a good store, so
        // the daemon can start on a full disk).
        let found = {
            let txn = db.begin_read().map_err(|e| classify(e.into()))?;
            match txn.open_table(META) {
                Ok(meta) => meta
                    .get("schema_version")
                    .map_err(|e| classify(e.into()))?
                    .map(|v| v.value()),
                Err(redb::TableError::TableDoesNotExist(_)) => None,
                Err(e) => return Err(classify(e.into())),
            }
        };
        if found.is_none() {
            let txn = db.begin_write().map_err(|e| classify(e.into()))?;
            {
                let mut meta = txn.open_table(META).map_err(|e| classify(e.into()))?;
                txn.open_table(RESERVATIONS)
                    .map_err(|e| classify(e.into()))?;
                meta.insert("schema_version", SCHEMA_VERSION)
                    .map_err(|e| classify(e.into()))?;
            }
            txn.commit().map_err(|e| classify(e.into()))?;
        }
        if let Some(v) = found.filter(|&v| v > SCHEMA_VERSION) {
            return Err(OpenFailure::Schema(v));
        }
        let (records, digest) = load_all(&db).map_err(OpenFailure::Damaged)?;
        let recorded = (|| {
            let txn = db.begin_read().ok()?;
            let meta = txn.open_table(META).ok()?;
            let bytes = meta.get(JOURNAL_BYTES).ok()??.value();
            let digest = meta.get(RECORDS_DIGEST).ok()??.value();
            Some((bytes, digest))
        })();
        Ok(Opened {
            db,
            records,
            fresh: found.is_none(),
            digest,
            recorded,
        })
    });
    match opened {
        Ok(r) => r,
        Err(why) => Err(OpenFailure::Damaged(why)),
    }
}

enum OpenFailure {
    /// Another process has the file open (a daemon is running).
    Locked,
    /// A newer schema.
    Schema(u64),
    /// I/O (permissions, a full disk): not damage.
    Io(String),
    /// The file is damaged.
    Damaged(String),
}

fn classify(e: redb::Error) -> OpenFailure {
    match e {
        redb::Error::DatabaseAlreadyOpen => OpenFailure::Locked,
        // A file that is not (or no longer) a redb database reads as InvalidData or a short read.
        redb::Error::Io(io)
            if !matches!(
                io.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
            ) =>
        {
            OpenFailure::Io(io.to_string())
        }
        other => OpenFailure::Damaged(other.to_string()),
    }
}

/// Every record, and the digest of the set (see [`record_digest`]).
fn load_all(db: &Database) -> Result<(Vec<StoredReservation>, u64), String> {
    let txn = db.begin_read().map_err(|e| e.to_string())?;
    let table = txn.open_table(RESERVATIONS).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let mut digest = 0u64;
    for entry in table.iter().map_err(|e| e.to_string())? {
        let (k, v) = entry.map_err(|e| e.to_string())?;
        digest = digest.wrapping_add(record_digest(v.value()));
        let rec: StoredReservation = serde_json::from_slice(v.value())
            .map_err(|e| format!("the record for {:?} is unreadable: {e}", k.value()))?;
        out.push(rec);
    }
    Ok((out, digest))
}

/// A stored record's share of the set's digest: the digest of a set is the (wrapping) sum of
/// its records', so a change adds and takes away shares without reading the others.
fn record_digest(bytes: &[u8]) -> u64 {
    u64::from(crc32fast::hash(bytes)) | ((bytes.len() as u64) << 32)
}

/// The `meta` keys of what the store recorded with its last change: the journal's length and
/// the digest of the records. Equal to what a start finds, they say that the store and the
/// journal moved together and nothing went missing since, so the journal need not be read.
const JOURNAL_BYTES: &str = "journal_bytes";
const RECORDS_DIGEST: &str = "records_digest";

/// What a start needs of an opened store.
struct Opened {
    db: Database,
    records: Vec<StoredReservation>,
    /// No schema was recorded: the file was missing, empty or truncated to nothing.
    fresh: bool,
    /// The digest of the records read.
    digest: u64,
    /// `(journal_bytes, records_digest)` as recorded with the last change.
    recorded: Option<(u64, u64)>,
}

/// What `portres store restore` did.
#[derive(Debug)]
pub struct RestoreReport {
    /// Reservations the new store holds.
    pub restored: Vec<StoredReservation>,
    /// Journal lines that could not be used (what they were about, when it can be told).
    pub lost: Vec<crate::journal::BadLine>,
    /// Where the old store file was moved, if there was one.
    pub kept_damaged: Option<PathBuf>,
}

/// The open store: the redb file and its journal.
#[derive(Debug)]
pub struct Store {
    /// `None` after a failed write until it could be reopened (redb refuses every later write
    /// after an I/O error until the file is reopened).
    db: std::sync::Mutex<Option<Database>>,
    journal: std::sync::Mutex<crate::journal::Journal>,
    path: PathBuf,
}

impl Store {
    /// Opens (or creates) `portres.redb` in `state_dir`: checks its integrity and schema,
    /// reads every record (returned beside the store) and checks them against the journal,
    /// which it brings up to date.
    pub fn open(state_dir: &Path) -> Result<(Store, Vec<StoredReservation>), StoreError> {
        let path = state_dir.join("portres.redb");
        let journal_path = state_dir.join(crate::journal::FILE);
        let damaged = |why: String, replayed: &crate::journal::Replay| StoreError::Damaged {
            path: path.clone(),
            why,
            journal: journal_path.clone(),
            journal_records: journal_path.exists().then_some(replayed.records.len()),
            journal_bad: replayed.bad.len(),
            state_dir: state_dir.into(),
        };
        let Opened {
            db,
            records,
            fresh,
            digest,
            recorded,
        } = match open_checked(&path) {
            Ok(x) => x,
            Err(OpenFailure::Locked) => return Err(StoreError::Locked { path }),
            Err(OpenFailure::Schema(found)) => return Err(StoreError::Schema { path, found }),
            Err(OpenFailure::Io(why)) => return Err(StoreError::Io { path, why }),
            Err(OpenFailure::Damaged(why)) => {
                let replayed = crate::journal::replay(&journal_path).unwrap_or_default();
                return Err(damaged(why, &replayed));
            }
        };
        let io = |e: std::io::Error| StoreError::Io {
            path: journal_path.clone(),
            why: e.to_string(),
        };
        // In step (the common start): the journal has the length, and the records the digest,
        // that the store recorded with its last change. Nothing to compare; the journal is not
        // read.
        let journal_len = std::fs::metadata(&journal_path).map(|m| m.len()).ok();
        if !fresh
            && let (Some(len), Some((bytes, recorded_digest))) = (journal_len, recorded)
            && len == bytes
            && digest == recorded_digest
        {
            let journal =
                crate::journal::Journal::open_existing(state_dir, records.len()).map_err(io)?;
            return Ok((Store::assemble(db, journal, path), records));
        }
        let replayed = crate::journal::replay(&journal_path).unwrap_or_default();
        // The journal and the store that was just checked must agree. A store that lacks
        // reservations its journal holds lost them (redb repairs some damage silently, e.g.
        // after a crash; or the file is missing or empty): refuse, and keep the journal, so
        // `portres store restore` can bring them back. The exceptions: the journal's last line
        // being a creation that a store with a history lacks, or the journal's last batch (one
        // change of many lines) being past the length the store recorded: a crash between the
        // two writes, never acknowledged. A journal that lacks some of the store's (damaged, or
        // from an older version) is rewritten from the store.
        let in_store: std::collections::BTreeSet<(String, u16)> = records
            .iter()
            .map(|r| (r.protocol.clone(), r.start))
            .collect();
        let unacknowledged = replayed.last_put.as_ref().filter(|_| !fresh);
        // A store that recorded the journal's length at its last commit acknowledged exactly
        // the lines up to there: everything after (one change of many lines, e.g. an `apply`,
        // cut by a crash before the commit) was never acknowledged, and only the lines up to
        // there must all be in the store.
        // Only when that tail is one batch (one change): a store that went back further (an
        // old copy restored, lost commits) lacks acknowledged changes, and is refused below.
        let acknowledged = match recorded {
            Some((bytes, _))
                if !fresh
                    && journal_len.is_some_and(|l| l > bytes)
                    && crate::journal::tail_is_one_batch(&journal_path, bytes) =>
            {
                Some(crate::journal::replay_upto(&journal_path, Some(bytes)).unwrap_or_default())
            }
            _ => None,
        };
        let missing: Vec<&(String, u16)> = match &acknowledged {
            Some(ack) => ack
                .records
                .keys()
                .filter(|k| !in_store.contains(*k))
                .collect(),
            None => replayed
                .records
                .keys()
                .filter(|k| !in_store.contains(*k) && unacknowledged != Some(*k))
                .collect(),
        };
        if !missing.is_empty() {
            if fresh {
                // Opening it wrote a schema into it: take it away again, so the next start is
                // refused the same way instead of taking the file for one with a history.
                drop(db);
                let _ = std::fs::remove_file(&path);
            }
            let names: Vec<String> = missing
                .iter()
                .take(20)
                .map(|(p, s)| format!("{s}/{p}"))
                .collect();
            return Err(damaged(
                format!(
                    "it lacks {} reservations that its journal holds ({}{})",
                    missing.len(),
                    names.join(", "),
                    if missing.len() > 20 { ", ..." } else { "" }
                ),
                &replayed,
            ));
        }
        if let Some(ack) = &acknowledged {
            let dropped = replayed.lines.saturating_sub(ack.lines);
            tracing::warn!(
                "the journal's last {dropped} lines are past the store's last commit: a change \
                 that was never acknowledged (the daemon stopped between the two writes); \
                 dropped, the store is as it was before it"
            );
        } else if let Some((p, s)) = unacknowledged
            && !in_store.contains(&(p.clone(), *s))
        {
            tracing::warn!(
                "the journal's last creation, {s}/{p}, is not in the store: it was never \
                 acknowledged (the daemon stopped between the two writes); dropped"
            );
        }
        let agree = replayed.bad.is_empty()
            && replayed.records.len() == records.len()
            && records
                .iter()
                .all(|r| replayed.records.get(&(r.protocol.clone(), r.start)) == Some(r));
        let journal = if agree && journal_path.exists() {
            crate::journal::Journal::open_existing(state_dir, replayed.lines)
        } else {
            if journal_path.exists() {
                tracing::warn!(
                    journal = %journal_path.display(),
                    store = records.len(),
                    journal_records = replayed.records.len(),
                    unreadable_lines = replayed.bad.len(),
                    "the journal differed from the store; rewritten from the store"
                );
            }
            crate::journal::Journal::create(state_dir, &records)
        }
        .map_err(io)?;
        let bytes = journal.bytes();
        let store = Store::assemble(db, journal, path);
        // In step from now on: the next start need not read the journal.
        store.write(|txn| store.record(txn, bytes, Some(digest)))?;
        Ok((store, records))
    }

    fn assemble(db: Database, journal: crate::journal::Journal, path: PathBuf) -> Store {
        Store {
            db: std::sync::Mutex::new(Some(db)),
            journal: std::sync::Mutex::new(journal),
            path,
        }
    }

    /// Records, within the transaction of a change, the journal's length and the records'
    /// digest (`None`: unchanged) as of this change (see [`JOURNAL_BYTES`]).
    fn record(
        &self,
        txn: &redb::WriteTransaction,
        journal_bytes: u64,
        digest: Option<u64>,
    ) -> Result<(), StoreError> {
        let mut meta = txn.open_table(META).map_err(|e| self.err(e))?;
        meta.insert(JOURNAL_BYTES, journal_bytes)
            .map_err(|e| self.err(e))?;
        if let Some(d) = digest {
            meta.insert(RECORDS_DIGEST, d).map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// The records' digest as recorded (0 for none), within a transaction.
    fn recorded_digest(&self, txn: &redb::WriteTransaction) -> Result<u64, StoreError> {
        let meta = txn.open_table(META).map_err(|e| self.err(e))?;
        Ok(meta
            .get(RECORDS_DIGEST)
            .map_err(|e| self.err(e))?
            .map_or(0, |v| v.value()))
    }

    fn err(&self, e: impl Into<redb::Error>) -> StoreError {
        let e: redb::Error = e.into();
        match e {
            redb::Error::Io(io) => StoreError::Io {
                path: self.path.clone(),
                why: io.to_string(),
            },
            other => StoreError::Db {
                path: self.path.clone(),
                source: other,
            },
        }
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs a write transaction, reopening the file first if an earlier write failed.
    fn write(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut slot = self.db.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            let reopened = guarded(|| Database::create(&self.path));
            match reopened {
                Ok(Ok(db)) => *slot = Some(db),
                Ok(Err(e)) => return Err(self.err(e)),
                Err(why) => {
                    return Err(StoreError::Io {
                        path: self.path.clone(),
                        why,
                    });
                }
            }
        }
        let db = slot.as_ref().expect("opened above");
        let started = std::time::Instant::now();
        let result = db.begin_write().map_err(|e| self.err(e)).and_then(|txn| {
            f(&txn)?;
            txn.commit().map_err(|e| self.err(e))
        });
        crate::metrics::store_write(started.elapsed());
        if result.is_err() {
            // redb refuses every write after an I/O error until the file is reopened.
            *slot = None;
        }
        result
    }

    /// Writes one reservation durably: the journal, then the store (returns after both
    /// fsyncs).
    pub fn put(&self, rec: &StoredReservation) -> Result<(), StoreError> {
        self.put_all(std::slice::from_ref(rec))
    }

    /// Writes reservations in one durable transaction (all or none), e.g. for an import.
    pub fn put_all(&self, recs: &[StoredReservation]) -> Result<(), StoreError> {
        self.replace(&[], recs)
    }

    /// Removes the records at `remove` (protocol, start) and writes `put`, in one durable
    /// transaction (all or none): `apply`'s change of the reservations declared in files.
    pub fn replace(
        &self,
        remove: &[(Protocol, u16)],
        put: &[StoredReservation],
    ) -> Result<(), StoreError> {
        let before: Vec<StoredReservation> = remove
            .iter()
            .map(|&(p, start)| self.get(p, start))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .flatten()
            .collect();
        let mut journal = self.journal.lock().unwrap_or_else(|p| p.into_inner());
        let undo = |journal: &mut crate::journal::Journal| {
            for r in put {
                let _ = journal.del(&r.protocol, r.start);
            }
            for r in &before {
                let _ = journal.put(r);
            }
        };
        // One write and one fdatasync for the whole change (an apply may hold thousands).
        let dels: Vec<(&str, u16)> = remove.iter().map(|&(p, s)| (p.as_str(), s)).collect();
        if let Err(e) = journal.append_all(&dels, put) {
            return Err(StoreError::Io {
                path: journal.path().into(),
                why: e.to_string(),
            });
        }
        let journal_bytes = journal.bytes();
        let written = self.write(|txn| {
            let mut digest = self.recorded_digest(txn)?;
            {
                let mut t = txn.open_table(RESERVATIONS).map_err(|e| self.err(e))?;
                for &(p, start) in remove {
                    if let Some(old) = t.remove((proto_key(p), start)).map_err(|e| self.err(e))? {
                        digest = digest.wrapping_sub(record_digest(old.value()));
                    }
                }
                for rec in put {
                    let protocol: Protocol =
                        rec.protocol.parse().map_err(|why| StoreError::Record {
                            path: self.path.clone(),
                            key: rec.token.to_string(),
                            why,
                        })?;
                    let bytes = serde_json::to_vec(rec).expect("plain struct serialises");
                    digest = digest.wrapping_add(record_digest(&bytes));
                    if let Some(old) = t
                        .insert((proto_key(protocol), rec.start), bytes.as_slice())
                        .map_err(|e| self.err(e))?
                    {
                        digest = digest.wrapping_sub(record_digest(old.value()));
                    }
                }
            }
            self.record(txn, journal_bytes, Some(digest))
        });
        if written.is_err() {
            undo(&mut journal);
        }
        written
    }

    /// The stored record at `(protocol, start)`, if any.
    fn get(&self, protocol: Protocol, start: u16) -> Result<Option<StoredReservation>, StoreError> {
        let slot = self.db.lock().unwrap_or_else(|p| p.into_inner());
        let Some(db) = slot.as_ref() else {
            return Ok(None);
        };
        let txn = db.begin_read().map_err(|e| self.err(e))?;
        let t = txn.open_table(RESERVATIONS).map_err(|e| self.err(e))?;
        let v = t
            .get((proto_key(protocol), start))
            .map_err(|e| self.err(e))?;
        Ok(v.and_then(|v| serde_json::from_slice(v.value()).ok()))
    }

    /// Deletes the reservation starting at `start` durably. Returns whether it was there.
    pub fn delete(&self, protocol: Protocol, start: u16) -> Result<bool, StoreError> {
        // What is there now, so the journal can be put back if the store's write fails.
        let before = self.get(protocol, start)?;
        let mut journal = self.journal.lock().unwrap_or_else(|p| p.into_inner());
        journal
            .del(protocol.as_str(), start)
            .map_err(|e| StoreError::Io {
                path: journal.path().into(),
                why: e.to_string(),
            })?;
        let mut existed = false;
        let journal_bytes = journal.bytes();
        let written = self.write(|txn| {
            let mut digest = self.recorded_digest(txn)?;
            {
                let mut t = txn.open_table(RESERVATIONS).map_err(|e| self.err(e))?;
                if let Some(old) = t
                    .remove((proto_key(protocol), start))
                    .map_err(|e| self.err(e))?
                {
                    digest = digest.wrapping_sub(record_digest(old.value()));
                    existed = true;
                }
            }
            self.record(txn, journal_bytes, Some(digest))
        });
        match written {
            Ok(()) => Ok(existed),
            Err(e) => {
                // Still in the store: back into the journal.
                if let Some(r) = &before {
                    let _ = journal.put(r);
                }
                Err(e)
            }
        }
    }

    /// Whether the journal has grown well past `live` reservations.
    pub fn journal_wants_compaction(&self, live: usize) -> bool {
        let journal = self.journal.lock().unwrap_or_else(|p| p.into_inner());
        journal.wants_compaction(live)
    }

    /// Rewrites the journal as a snapshot of `live` (the persistent reservations of the
    /// table) when it has grown well past it.
    pub fn compact_journal(&self, live: &[StoredReservation]) {
        let mut journal = self.journal.lock().unwrap_or_else(|p| p.into_inner());
        let state_dir = journal
            .path()
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        if journal.wants_compaction(live.len()) {
            match crate::journal::Journal::create(&state_dir, live) {
                Ok(j) => {
                    let bytes = j.bytes();
                    *journal = j;
                    // In step again (else the next start reads the whole journal once).
                    let _ = self.write(|txn| self.record(txn, bytes, None));
                }
                Err(e) => tracing::warn!(error = %e, "cannot compact the journal"),
            }
        }
    }

    /// Rebuilds the store in `state_dir` from its journal (`portres store restore`): the old
    /// file, damaged or not, is kept beside it as `portres.redb.damaged-SECONDS`. Refused while
    /// a daemon has the store open.
    pub fn restore(state_dir: &Path) -> Result<RestoreReport, StoreError> {
        let path = state_dir.join("portres.redb");
        let journal_path = state_dir.join(crate::journal::FILE);
        // A running daemon holds the file's lock (probe only an existing file: opening a
        // missing one would create it).
        if path.exists()
            && let Err(OpenFailure::Locked) = open_checked(&path).map(drop)
        {
            return Err(StoreError::Locked { path });
        }
        let replayed = crate::journal::replay(&journal_path).map_err(|e| StoreError::Io {
            path: journal_path.clone(),
            why: e.to_string(),
        })?;
        if !journal_path.exists() {
            return Err(StoreError::Io {
                path: journal_path,
                why: "there is no journal to restore from".into(),
            });
        }
        let kept_damaged = if path.exists() {
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let mut aside = state_dir.join(format!("portres.redb.damaged-{secs}"));
            let mut n = 1;
            while aside.exists() {
                aside = state_dir.join(format!("portres.redb.damaged-{secs}-{n}"));
                n += 1;
            }
            std::fs::rename(&path, &aside).map_err(|e| StoreError::Io {
                path: path.clone(),
                why: e.to_string(),
            })?;
            Some(aside)
        } else {
            None
        };
        let restored: Vec<StoredReservation> = replayed.records.into_values().collect();
        // A fresh file with the records in one transaction; the journal is rewritten only
        // after that commit (a crash in between leaves the journal as it was).
        let io = |e: redb::Error| StoreError::Io {
            path: path.clone(),
            why: e.to_string(),
        };
        let db = Database::create(&path).map_err(|e| io(e.into()))?;
        let txn = db.begin_write().map_err(|e| io(e.into()))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| io(e.into()))?;
            meta.insert("schema_version", SCHEMA_VERSION)
                .map_err(|e| io(e.into()))?;
            let mut t = txn.open_table(RESERVATIONS).map_err(|e| io(e.into()))?;
            for rec in &restored {
                let protocol: Protocol =
                    rec.protocol.parse().map_err(|why| StoreError::Record {
                        path: path.clone(),
                        key: rec.token.to_string(),
                        why,
                    })?;
                let bytes = serde_json::to_vec(rec).expect("plain struct serialises");
                t.insert((proto_key(protocol), rec.start), bytes.as_slice())
                    .map_err(|e| io(e.into()))?;
            }
        }
        txn.commit().map_err(|e| io(e.into()))?;
        drop(db);
        crate::journal::Journal::create(state_dir, &restored).map_err(|e| StoreError::Io {
            path: journal_path,
            why: e.to_string(),
        })?;
        Ok(RestoreReport {
            restored,
            lost: replayed.bad,
            kept_damaged,
        })
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
            file: None,
            description: None,
            cluster_key: None,
            cluster_node: None,
            cluster_runtime: false,
        }
    }

    #[test]
    fn the_journal_is_compacted_and_follows_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Store::open(dir.path()).unwrap();
        for i in 0..520u16 {
            s.put(&rec(u64::from(i) + 1, 1000 + i)).unwrap();
            assert!(s.delete(Protocol::Udp, 1000 + i).unwrap());
        }
        s.put(&rec(9, 9)).unwrap();
        assert!(s.journal_wants_compaction(1));
        s.compact_journal(&[rec(9, 9)]);
        assert!(!s.journal_wants_compaction(1));
        let journal = dir.path().join(crate::journal::FILE);
        let replayed = crate::journal::replay(&journal).unwrap();
        assert_eq!(replayed.records.len(), 1);
        assert_eq!(
            std::fs::read_to_string(&journal).unwrap().lines().count(),
            1
        );
        drop(s);
        // A missing store with a journal that holds reservations is refused, not started empty.
        std::fs::remove_file(dir.path().join("portres.redb")).unwrap();
        let e = Store::open(dir.path()).unwrap_err();
        assert!(matches!(e, StoreError::Damaged { .. }), "{e}");
        let e2 = Store::open(dir.path()).unwrap_err();
        assert!(
            matches!(e2, StoreError::Damaged { .. }),
            "refused again: {e2}"
        );
        let report = Store::restore(dir.path()).unwrap();
        assert_eq!(report.restored, vec![rec(9, 9)]);
        assert_eq!(Store::open(dir.path()).unwrap().1, vec![rec(9, 9)]);
    }

    #[test]
    fn a_change_of_many_lines_cut_before_the_commit_is_dropped_whole() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (s, _) = Store::open(dir.path()).unwrap();
            s.put(&rec(1, 100)).unwrap();
            s.put(&rec(2, 200)).unwrap();
        }
        // An apply's journal lines (a deletion and three creations) written, and the daemon
        // gone before the store committed them: never acknowledged, so the store opens as it
        // was, and the journal follows it again.
        {
            let mut j = crate::journal::Journal::open_existing(dir.path(), 2).unwrap();
            j.append_all(&[("tcp", 100)], &[rec(3, 300), rec(4, 400), rec(5, 500)])
                .unwrap();
        }
        let (s, records) = Store::open(dir.path()).unwrap();
        let mut starts: Vec<u16> = records.iter().map(|r| r.start).collect();
        starts.sort_unstable();
        assert_eq!(starts, vec![100, 200]);
        drop(s);
        let (_, records) = Store::open(dir.path()).unwrap();
        assert_eq!(records.len(), 2, "in step again");
    }

    #[test]
    fn a_store_gone_back_to_an_older_commit_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("portres.redb");
        let old = dir.path().join("old.redb");
        {
            let (s, _) = Store::open(dir.path()).unwrap();
            s.put(&rec(1, 100)).unwrap();
            drop(s);
            std::fs::copy(&db, &old).unwrap();
            let (s, _) = Store::open(dir.path()).unwrap();
            s.put(&rec(2, 200)).unwrap();
            s.put(&rec(3, 300)).unwrap();
        }
        // The older file back (a backup restored): 200 was acknowledged and is not in it. Only
        // the journal's last creation (300) may be missing: refused, naming 200.
        std::fs::copy(&old, &db).unwrap();
        let e = Store::open(dir.path()).unwrap_err();
        assert!(
            matches!(e, StoreError::Damaged { .. }) && e.to_string().contains("200/"),
            "{e}"
        );
    }

    #[test]
    fn a_store_that_lost_what_its_journal_holds_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (s, _) = Store::open(dir.path()).unwrap();
            for i in 1..=3u16 {
                s.put(&rec(u64::from(i), 100 * i)).unwrap();
            }
        }
        // A crash between the journal and the store: the journal's last creation alone is not
        // in the store. That one was never acknowledged: the store opens, without it.
        {
            let mut j = crate::journal::Journal::open_existing(dir.path(), 3).unwrap();
            j.put(&rec(4, 400)).unwrap();
        }
        let (s, records) = Store::open(dir.path()).unwrap();
        assert_eq!(records.len(), 3);
        drop(s);
        // The store loses one behind the journal's back (what a silent repair does): refused,
        // naming it, and the journal is kept for the restore.
        {
            let db = Database::create(dir.path().join("portres.redb")).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(RESERVATIONS)
                .unwrap()
                .remove((17u8, 200u16))
                .unwrap();
            txn.commit().unwrap();
        }
        let e = Store::open(dir.path()).unwrap_err();
        assert!(e.to_string().contains("200/udp"), "{e}");
        let e = Store::open(dir.path()).unwrap_err();
        assert!(
            matches!(e, StoreError::Damaged { .. }),
            "still refused: {e}"
        );
        let report = Store::restore(dir.path()).unwrap();
        assert_eq!(report.restored.len(), 3);
        assert!(report.kept_damaged.is_some());
        assert_eq!(Store::open(dir.path()).unwrap().1.len(), 3);
    }

    #[test]
    fn survives_reopen_and_checks_schema() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (s, _) = Store::open(dir.path()).unwrap();
            s.put(&rec(11, 5000)).unwrap();
            s.put(&rec(12, 6000)).unwrap();
            assert!(s.delete(Protocol::Udp, 6000).unwrap());
            assert!(!s.delete(Protocol::Tcp, 5000).unwrap());
        }
        let (s, all) = Store::open(dir.path()).unwrap();
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
