//! The journal of persistent changes: an append-only text file beside the redb store,
//! `persistent.journal`, from which `portres store restore` rebuilds a damaged store.
//!
//! Each line is `CRC32 JSON`: the CRC-32 (hex) of the JSON, then `{"put": record}` or
//! `{"del": {"protocol", "start"}}`. Every change is appended and `fdatasync`ed before the store
//! commits it, so the journal holds every acknowledged reservation. A torn last line (a crash in
//! the middle of an append) fails its checksum and is reported, never misread. The file is
//! rewritten as a snapshot (one `put` per live reservation: temp file, fsync, rename) when it
//! has grown well past the table, and at every start, from the store that was just checked.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::store::StoredReservation;

/// The journal's file name in the state directory.
pub const FILE: &str = "persistent.journal";

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Entry {
    Put(Box<StoredReservation>),
    Del {
        protocol: String,
        start: u16,
    },
    /// The next `lines` lines are one change (an `apply`), committed to the store at once:
    /// after a crash between the journal and the store, that whole change (and only it) may be
    /// missing from the store.
    Batch {
        lines: usize,
    },
}

/// The open journal, appended to.
#[derive(Debug)]
pub(crate) struct Journal {
    path: PathBuf,
    file: File,
    lines: usize,
    /// The file's length: recorded in the store with each change (see `store.rs`).
    bytes: u64,
}

/// A line of the journal that could not be used, and what can be told of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadLine {
    /// 1-based line number.
    pub line: usize,
    /// Why, and what the line seems to name (a port, when it can be read).
    pub why: String,
}

/// What the journal says: the live reservations by (protocol, start), and unusable lines.
#[derive(Debug, Default)]
pub struct Replay {
    /// Live reservations.
    pub records: BTreeMap<(String, u16), StoredReservation>,
    /// Lines that failed their checksum or did not parse.
    pub bad: Vec<BadLine>,
    /// The key of the last line, when it was a creation: the one change that may be in the
    /// journal and not in the store after a crash between the two writes (never acknowledged).
    pub last_put: Option<(String, u16)>,
    /// Non-empty lines read.
    pub lines: usize,
}

fn line_for(entry: &Entry) -> Vec<u8> {
    let json = serde_json::to_vec(entry).expect("plain data serialises");
    let mut line = format!("{:08x} ", crc32fast::hash(&json)).into_bytes();
    line.extend_from_slice(&json);
    line.push(b'\n');
    line
}

/// What a damaged line seems to be about, for the report.
fn guess(text: &str) -> String {
    let field = |name: &str| {
        let at = text.find(&format!("\"{name}\":"))? + name.len() + 3;
        let rest = &text[at..];
        let end = rest.find([',', '}'])?;
        Some(rest[..end].trim_matches('"').to_string())
    };
    match (field("protocol"), field("start")) {
        (Some(p), Some(s)) => format!(" (it seems to name {s}/{p})"),
        _ => String::new(),
    }
}

/// Reads the journal at `path` (a missing file is an empty journal).
pub fn replay(path: &Path) -> io::Result<Replay> {
    replay_upto(path, None)
}

/// Whether the journal from byte `from` on is one batch and nothing else: a `Batch` line
/// (checksum good) and at most as many lines after it as it announces (fewer, or a torn last
/// one, when a crash cut the write). That is the only change a store that recorded `from` as
/// the journal's length at its last commit may lack.
pub fn tail_is_one_batch(path: &Path, from: u64) -> bool {
    let Ok(bytes) = std::fs::read(path) else {
        return false;
    };
    let Some(tail) = usize::try_from(from).ok().and_then(|f| bytes.get(f..)) else {
        return false;
    };
    let mut lines = tail.split(|&b| b == b'\n').filter(|l| !l.is_empty());
    let announced = lines.next().and_then(|first| {
        let (crc, rest) = first.split_first_chunk::<8>()?;
        let json = rest.strip_prefix(b" ")?;
        let crc = u32::from_str_radix(std::str::from_utf8(crc).ok()?, 16).ok()?;
        if crc32fast::hash(json) != crc {
            return None;
        }
        match serde_json::from_slice::<Entry>(json).ok()? {
            Entry::Batch { lines } => Some(lines),
            _ => None,
        }
    });
    announced.is_some_and(|n| lines.count() <= n)
}

/// [`replay`] of the journal's first `limit` bytes only (all of it for `None`): what the store
/// acknowledged when it recorded that length.
pub fn replay_upto(path: &Path, limit: Option<u64>) -> io::Result<Replay> {
    let mut bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Replay::default()),
        Err(e) => return Err(e),
    };
    if let Some(limit) = limit {
        bytes.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    }
    let mut out = Replay::default();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        if raw.is_empty() {
            continue;
        }
        out.lines += 1;
        let text = String::from_utf8_lossy(raw);
        let parsed = raw
            .split_first_chunk::<8>()
            .and_then(|(crc, rest)| Some((crc, rest.strip_prefix(b" ")?)))
            .and_then(|(crc, json)| {
                let crc = u32::from_str_radix(std::str::from_utf8(crc).ok()?, 16).ok()?;
                Some((crc, json))
            });
        let Some((crc, json)) = parsed else {
            out.bad.push(BadLine {
                line: i + 1,
                why: format!("not a journal line{}", guess(&text)),
            });
            continue;
        };
        if crc32fast::hash(json) != crc {
            out.bad.push(BadLine {
                line: i + 1,
                why: format!(
                    "checksum mismatch (damaged, or torn by a crash while written){}",
                    guess(&text)
                ),
            });
            continue;
        }
        match serde_json::from_slice::<Entry>(json) {
            Ok(Entry::Put(r)) => {
                out.last_put = Some((r.protocol.clone(), r.start));
                out.records.insert((r.protocol.clone(), r.start), *r);
            }
            Ok(Entry::Del { protocol, start }) => {
                out.last_put = None;
                out.records.remove(&(protocol, start));
            }
            Ok(Entry::Batch { .. }) => out.last_put = None,
            Err(e) => out.bad.push(BadLine {
                line: i + 1,
                why: format!("unreadable entry: {e}{}", guess(&text)),
            }),
        }
    }
    Ok(out)
}

impl Journal {
    /// Opens the journal in `state_dir` for appending as it is (it already matches the store);
    /// `lines` is what it is taken to hold, for [`Journal::wants_compaction`].
    pub(crate) fn open_existing(state_dir: &Path, lines: usize) -> io::Result<Journal> {
        let path = state_dir.join(FILE);
        let file = OpenOptions::new().append(true).open(&path)?;
        let bytes = file.metadata()?.len();
        Ok(Journal {
            path,
            file,
            lines,
            bytes,
        })
    }

    /// Rewrites the journal in `state_dir` as a snapshot of `records` and opens it for
    /// appending.
    pub(crate) fn create(state_dir: &Path, records: &[StoredReservation]) -> io::Result<Journal> {
        let path = state_dir.join(FILE);
        let tmp = state_dir.join(format!("{FILE}.tmp"));
        let bytes = {
            let mut f = File::create(&tmp)?;
            let mut buf = Vec::new();
            for r in records {
                buf.extend_from_slice(&line_for(&Entry::Put(Box::new(r.clone()))));
            }
            f.write_all(&buf)?;
            f.sync_all()?;
            buf.len() as u64
        };
        std::fs::rename(&tmp, &path)?;
        File::open(state_dir)?.sync_all()?;
        let file = OpenOptions::new().append(true).open(&path)?;
        Ok(Journal {
            path,
            file,
            lines: records.len(),
            bytes,
        })
    }

    fn append(&mut self, entry: &Entry) -> io::Result<()> {
        self.write_lines(&line_for(entry), 1)
    }

    /// Writes `n` whole lines and `fdatasync`s them; on failure cuts the file back, so no
    /// partial line is left behind (a full disk may have taken half of one).
    fn write_lines(&mut self, lines: &[u8], n: usize) -> io::Result<()> {
        let len = self.bytes;
        if let Err(e) = self
            .file
            .write_all(lines)
            .and_then(|()| self.file.sync_data())
        {
            let _ = self.file.set_len(len);
            return Err(e);
        }
        self.lines += n;
        self.bytes += lines.len() as u64;
        Ok(())
    }

    /// The file's length.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Appends deletions and puts in one write and one `fdatasync` (all or none: a failed write
    /// is cut off again).
    pub(crate) fn append_all(
        &mut self,
        del: &[(&str, u16)],
        put: &[StoredReservation],
    ) -> io::Result<()> {
        let mut lines = Vec::new();
        let mut n = 0;
        if del.len() + put.len() > 1 {
            lines.extend(line_for(&Entry::Batch {
                lines: del.len() + put.len(),
            }));
            n += 1;
        }
        for &(protocol, start) in del {
            lines.extend(line_for(&Entry::Del {
                protocol: protocol.into(),
                start,
            }));
            n += 1;
        }
        for r in put {
            lines.extend(line_for(&Entry::Put(Box::new(r.clone()))));
            n += 1;
        }
        self.write_lines(&lines, n)
    }

    /// Appends a created reservation (durably, before the store commits it).
    pub(crate) fn put(&mut self, r: &StoredReservation) -> io::Result<()> {
        self.append(&Entry::Put(Box::new(r.clone())))
    }

    /// Appends a deletion.
    pub(crate) fn del(&mut self, protocol: &str, start: u16) -> io::Result<()> {
        self.append(&Entry::Del {
            protocol: protocol.into(),
            start,
        })
    }

    /// Whether the journal has grown well past `live` records (then [`Journal::create`]
    /// rewrites it).
    pub(crate) fn wants_compaction(&self, live: usize) -> bool {
        self.lines > 2 * live + 1024
    }

    /// The file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(start: u16) -> StoredReservation {
        StoredReservation {
            token: u64::from(start),
            protocol: "tcp".into(),
            start,
            count: 1,
            mode: "exclude".into(),
            allow_users: vec![],
            allow_groups: vec![],
            created: 1,
            creator_uid: 0,
            creator_command: None,
            file: None,
            description: None,
            cluster_key: None,
            cluster_node: None,
            cluster_runtime: false,
        }
    }

    #[test]
    fn replays_puts_and_deletes_and_reports_damage() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::create(dir.path(), &[rec(10)]).unwrap();
        j.put(&rec(20)).unwrap();
        j.put(&rec(30)).unwrap();
        j.del("tcp", 20).unwrap();
        let r = replay(j.path()).unwrap();
        assert_eq!(r.records.len(), 2);
        assert!(r.bad.is_empty());
        // Flip a byte inside the line of 30, and tear a last line.
        let mut bytes = std::fs::read(j.path()).unwrap();
        let at = bytes
            .windows(11)
            .position(|w| w == b"\"start\":30,")
            .unwrap();
        bytes[at + 9] = b'4';
        bytes.extend_from_slice(b"0123abcd {\"put\":{\"to");
        std::fs::write(j.path(), &bytes).unwrap();
        let r = replay(j.path()).unwrap();
        assert_eq!(
            r.records.keys().cloned().collect::<Vec<_>>(),
            vec![("tcp".into(), 10)]
        );
        assert_eq!(r.bad.len(), 2, "{:?}", r.bad);
        assert!(r.bad[0].why.contains("34/tcp"), "{:?}", r.bad);
    }
}
