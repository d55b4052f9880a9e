//! Declarative reservations: persistent reservations kept in files (`reservations_dir`, by
//! default `reservations.d` beside the configuration file: `/etc/portres/reservations.d` for the
//! system daemon), applied at start and by `portres apply`.
//!
//! ```toml
//! # /etc/portres/reservations.d/web.toml
//! [[reservation]]
//! protocol = "tcp"            # default "tcp"
//! ports = "9000-9009"         # or 8443, or "8443"
//! mode = "exclude"            # default "exclude"; or "hold"
//! users = ["www-data"]        # who may consume it (names or ids)
//! groups = ["web"]
//! description = "the web tier's backends"
//! ```
//!
//! The files are the truth for the reservations that came from them (marked with their file),
//! and only for those: reservations made by requests are never touched. A difference is applied
//! all or nothing (table, kernel layers and store), and any bad file changes nothing at all.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use portres_core::{
    Acl, Caller, ClusterOrigin, ErrorCode, Kind, Mode, Operation, Origin, Owner, PortRange,
    Protocol, Refusal, Reservation, Token,
};
use portres_proto::{ApplyChange, ApplyInfo, ChangeAction};
use serde::Deserialize;

use crate::Shared;
use crate::store::StoredReservation;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    #[serde(default)]
    reservation: Vec<toml::Spanned<EntryDoc>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryDoc {
    protocol: Option<String>,
    ports: PortsDoc,
    mode: Option<String>,
    #[serde(default)]
    users: Vec<IdDoc>,
    #[serde(default)]
    groups: Vec<IdDoc>,
    description: Option<String>,
    cluster: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PortsDoc {
    Number(i64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum IdDoc {
    Number(u32),
    Name(String),
}

/// One entry of one file, checked; or one cluster reservation (`cluster`), whose `file` says
/// where it is in the cluster and whose `line` is 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) file: String,
    pub(crate) line: u32,
    pub(crate) cluster: Option<ClusterOrigin>,
    pub(crate) protocol: Protocol,
    pub(crate) range: PortRange,
    pub(crate) mode: Mode,
    pub(crate) acl: Acl,
    pub(crate) description: Option<String>,
    /// `cluster = true`: a reservation of the whole cluster (cluster mode), not of this host.
    pub(crate) in_cluster: bool,
}

impl Entry {
    pub(crate) fn at(&self) -> String {
        if self.line == 0 {
            self.file.clone()
        } else {
            format!("{}:{}", self.file, self.line)
        }
    }

    /// The origin a reservation made from it carries.
    pub(crate) fn origin(&self) -> Origin {
        match &self.cluster {
            Some(c) => Origin {
                file: None,
                description: self.description.clone(),
                cluster: Some(c.clone()),
            },
            None => Origin {
                file: Some(self.file.clone()),
                description: self.description.clone(),
                cluster: None,
            },
        }
    }
}

/// The files of a directory, read and checked.
#[derive(Debug, Default)]
pub(crate) struct Declared {
    pub(crate) files: Vec<String>,
    pub(crate) entries: Vec<Entry>,
}

/// Bytes of changes listed in one `apply` reply (a frame holds 64 KiB).
const LISTED_BYTES: usize = 40 * 1024;

/// Files named in one `apply` reply (the rest are counted in the changes).
const MAX_FILES_LISTED: usize = 100;

/// Longest `description`, in bytes (it is shown by `show` and `who`, and stored).
pub(crate) const MAX_DESCRIPTION: usize = 512;

/// Line numbers of byte offsets of one text (computed once: a file may hold thousands of
/// entries).
struct Lines(Vec<usize>);

impl Lines {
    fn of(text: &str) -> Lines {
        Lines(text.match_indices('\n').map(|(i, _)| i).collect())
    }

    /// The 1-based line of byte `offset`.
    fn line(&self, offset: usize) -> u32 {
        self.0.partition_point(|&nl| nl < offset) as u32 + 1
    }
}

/// Whoever can write a reservation file declares persistent reservations: the directory and
/// each file must belong to `owner` (the daemon's user) or root, and be writable by their
/// owner alone.
fn check_owner(path: &Path, owner: u32) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mode = meta.mode() & 0o7777;
    if (meta.uid() != owner && meta.uid() != 0) || mode & 0o022 != 0 {
        let who =
            portres_sys::creds::user_name(meta.uid()).unwrap_or_else(|| meta.uid().to_string());
        let me = portres_sys::creds::user_name(owner).unwrap_or_else(|| owner.to_string());
        return Err(format!(
            "{}: owned by {who} with mode {mode:04o}, so a user other than the daemon's could \
             declare persistent reservations through it; make it {me}'s and writable by its \
             owner alone (chown {me} {}; chmod go-w {})",
            path.display(),
            path.display(),
            path.display()
        ));
    }
    Ok(())
}

/// Reads every `*.toml` file of `dir` (in name order; hidden files skipped), each (and the
/// directory) checked to be `owner`'s or root's and writable by its owner alone. `Ok(None)`:
/// the directory does not exist. An error names the file, the line and what to do.
pub(crate) fn read_dir(dir: &Path, owner: u32) -> Result<Option<Declared>, String> {
    let listing = match std::fs::read_dir(dir) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read directory {}: {e}", dir.display())),
    };
    check_owner(dir, owner)?;
    let mut paths: Vec<PathBuf> = listing
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|x| x == "toml")
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    paths.sort();
    let mut out = Declared::default();
    for path in paths {
        check_owner(&path, owner)?;
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("{}: cannot read it: {e}", path.display()))?;
        let name = path.display().to_string();
        out.entries.extend(parse_file(&name, &text)?);
        out.files.push(name);
    }
    check_overlaps(&out.entries)?;
    Ok(Some(out))
}

/// The entries of one file (`name` is for messages).
pub(crate) fn parse_file(name: &str, text: &str) -> Result<Vec<Entry>, String> {
    let lines = Lines::of(text);
    let doc: FileDoc = toml::from_str(text).map_err(|e| {
        let line = e.span().map_or(1, |s| lines.line(s.start));
        format!(
            "{name}:{line}: {}; each entry is a [[reservation]] table with ports, and optionally \
             protocol, mode, users, groups and description",
            e.message().trim()
        )
    })?;
    let mut entries = Vec::new();
    for spanned in doc.reservation {
        let line = lines.line(spanned.span().start);
        let at = format!("{name}:{line}");
        let e = spanned.into_inner();
        let protocol: Protocol = e
            .protocol
            .as_deref()
            .unwrap_or("tcp")
            .parse()
            .map_err(|why| format!("{at}: protocol: {why}"))?;
        let range = match &e.ports {
            PortsDoc::Number(n) => u32::try_from(*n)
                .ok()
                .and_then(|n| PortRange::new(n, 1).ok())
                .ok_or_else(|| format!("{at}: ports = {n}: not a port number; give 1 to 65535"))?,
            PortsDoc::Text(t) => t.parse::<PortRange>().map_err(|why| {
                format!(
                    "{at}: ports = {t:?}: {why}; write a port (\"8443\") or a block (\"9000-9009\")"
                )
            })?,
        };
        let mode: Mode = e
            .mode
            .as_deref()
            .unwrap_or("exclude")
            .parse()
            .map_err(|why| format!("{at}: mode: {why}"))?;
        let users = e
            .users
            .iter()
            .map(|u| match u {
                IdDoc::Number(n) => Ok(*n),
                IdDoc::Name(s) => portres_sys::creds::resolve_user(s).ok_or_else(|| {
                    format!(
                        "{at}: users: there is no user named {s:?} on this machine; give an \
                         existing name or a numeric uid"
                    )
                }),
            })
            .collect::<Result<Vec<u32>, String>>()?;
        let groups = e
            .groups
            .iter()
            .map(|g| match g {
                IdDoc::Number(n) => Ok(*n),
                IdDoc::Name(s) => portres_sys::creds::resolve_group(s).ok_or_else(|| {
                    format!(
                        "{at}: groups: there is no group named {s:?} on this machine; give an \
                         existing name or a numeric gid"
                    )
                }),
            })
            .collect::<Result<Vec<u32>, String>>()?;
        if let Some(d) = &e.description
            && d.len() > MAX_DESCRIPTION
        {
            return Err(format!(
                "{at}: description is {} bytes long; at most {MAX_DESCRIPTION}: say why in a \
                 sentence, and keep the rest in a comment",
                d.len()
            ));
        }
        entries.push(Entry {
            file: name.to_string(),
            line,
            cluster: None,
            protocol,
            range,
            mode,
            acl: normalised(Acl { users, groups }),
            description: e.description.filter(|d| !d.trim().is_empty()),
            in_cluster: e.cluster.unwrap_or(false),
        });
    }
    Ok(entries)
}

pub(crate) fn normalised(mut acl: Acl) -> Acl {
    acl.users.sort_unstable();
    acl.users.dedup();
    acl.groups.sort_unstable();
    acl.groups.dedup();
    acl
}

/// Two entries (of any files) for overlapping blocks of one protocol: an error naming both.
fn check_overlaps(entries: &[Entry]) -> Result<(), String> {
    let mut sorted: Vec<&Entry> = entries.iter().collect();
    sorted.sort_by_key(|e| (e.protocol, e.range.start()));
    for pair in sorted.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if a.protocol == b.protocol && a.range.overlaps(b.range) {
            return Err(format!(
                "{}: ports {} ({}) overlap ports {} declared at {}; a port belongs to one \
                 reservation: merge the two entries or make them disjoint",
                b.at(),
                b.range,
                b.protocol,
                a.range,
                a.at()
            ));
        }
    }
    Ok(())
}

/// What applying the files would do to the reservations that came from files.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    /// Entries with no reservation yet.
    pub(crate) add: Vec<Entry>,
    /// Reservations (from files) whose entry is gone.
    pub(crate) remove: Vec<Reservation>,
    /// Reservations (from files) whose entry says something else: (now, wanted).
    pub(crate) change: Vec<(Reservation, Entry)>,
    /// Entries already as they say.
    pub(crate) unchanged: u64,
}

impl Plan {
    pub(crate) fn is_empty(&self) -> bool {
        self.add.is_empty() && self.remove.is_empty() && self.change.is_empty()
    }
}

fn acl_of(r: &Reservation) -> (Acl, Origin) {
    match &r.kind {
        Kind::Persistent { acl, origin } => (normalised(acl.clone()), origin.clone()),
        Kind::Runtime { .. } => (Acl::default(), Origin::default()),
    }
}

/// Compares the entries with `current` (the table's persistent reservations that came from
/// files), keyed by protocol and block.
pub(crate) fn plan<'a>(entries: &[Entry], current: impl Iterator<Item = &'a Reservation>) -> Plan {
    plan_of(entries, current, |o| o.file.is_some())
}

/// Compares `entries` with the reservations of `current` whose origin is `managed` (and only
/// those), keyed by protocol and block.
pub(crate) fn plan_of<'a>(
    entries: &[Entry],
    current: impl Iterator<Item = &'a Reservation>,
    managed: impl Fn(&Origin) -> bool,
) -> Plan {
    let mut have: HashMap<(Protocol, u16, u16), &Reservation> = current
        .filter(|r| r.origin().is_some_and(&managed))
        .map(|r| ((r.protocol, r.range.start(), r.range.count()), r))
        .collect();
    let mut p = Plan::default();
    for e in entries {
        match have.remove(&(e.protocol, e.range.start(), e.range.count())) {
            None => p.add.push(e.clone()),
            Some(r) => {
                let (acl, origin) = acl_of(r);
                if r.mode == e.mode && acl == e.acl && origin == e.origin() {
                    p.unchanged += 1;
                } else {
                    p.change.push((r.clone(), e.clone()));
                }
            }
        }
    }
    let mut gone: Vec<Reservation> = have.into_values().cloned().collect();
    gone.sort_by_key(|r| (r.protocol, r.range.start()));
    p.remove = gone;
    p
}

/// An entry or a reservation in words, for the difference shown.
pub(crate) fn words(
    mode: Mode,
    acl: &Acl,
    description: Option<&str>,
    file: Option<&str>,
) -> String {
    let mut s = format!("{mode}");
    let names = |ids: &[u32], f: &dyn Fn(u32) -> Option<String>| -> String {
        ids.iter()
            .map(|&i| f(i).unwrap_or_else(|| i.to_string()))
            .collect::<Vec<_>>()
            .join(",")
    };
    if !acl.users.is_empty() {
        s += &format!(
            ", users {}",
            names(&acl.users, &portres_sys::creds::user_name)
        );
    }
    if !acl.groups.is_empty() {
        s += &format!(
            ", groups {}",
            names(&acl.groups, &portres_sys::creds::group_name)
        );
    }
    if let Some(d) = description {
        s += &format!(", {d:?}");
    }
    if let Some(f) = file {
        s += &format!(", from {f}");
    }
    s
}

/// An entry in words; with its file when `with_file` (a change that moves it between files).
pub(crate) fn entry_words(e: &Entry, with_file: bool) -> String {
    let file = with_file.then_some(e.file.as_str());
    words(e.mode, &e.acl, e.description.as_deref(), file)
}

fn reservation_words(r: &Reservation, with_file: bool) -> String {
    let (acl, origin) = acl_of(r);
    let file = origin.file.as_deref().filter(|_| with_file);
    words(r.mode, &acl, origin.description.as_deref(), file)
}

/// The difference as the wire carries it, and its digest.
fn changes(p: &Plan, cluster: Vec<ApplyChange>) -> (Vec<ApplyChange>, String) {
    let mut out = cluster;
    for e in &p.add {
        out.push(ApplyChange {
            action: ChangeAction::Add,
            protocol: e.protocol.as_str().into(),
            start: e.range.start(),
            count: e.range.count(),
            file: e.file.clone(),
            line: Some(e.line),
            before: None,
            after: Some(entry_words(e, false)),
            scope: None,
        });
    }
    for (r, e) in &p.change {
        let moved = r.origin().and_then(|o| o.file.as_deref()) != Some(e.file.as_str());
        out.push(ApplyChange {
            action: ChangeAction::Change,
            protocol: e.protocol.as_str().into(),
            start: e.range.start(),
            count: e.range.count(),
            file: e.file.clone(),
            line: Some(e.line),
            before: Some(reservation_words(r, moved)),
            after: Some(entry_words(e, moved)),
            scope: None,
        });
    }
    for r in &p.remove {
        out.push(ApplyChange {
            action: ChangeAction::Remove,
            protocol: r.protocol.as_str().into(),
            start: r.range.start(),
            count: r.range.count(),
            file: r.origin().and_then(|o| o.file.clone()).unwrap_or_default(),
            line: None,
            before: Some(reservation_words(r, false)),
            after: None,
            scope: None,
        });
    }
    out.sort_by(|a, b| (&a.protocol, a.start).cmp(&(&b.protocol, b.start)));
    // Lines do not count: moving an entry within its file changes nothing.
    let mut key = String::new();
    for c in &out {
        key += &format!(
            "{:?} {} {} {} {} {:?} {:?} {:?};",
            c.action, c.protocol, c.start, c.count, c.file, c.before, c.after, c.scope
        );
    }
    let digest = format!("{:08x}", crc32fast::hash(key.as_bytes()));
    (out, digest)
}

fn refusal(code: ErrorCode, message: String) -> Refusal {
    Refusal::new(Operation::CreatePersistent, code, message)
}

/// `portres apply`: reads the files, compares, and (unless `dry_run`) applies the difference,
/// all or nothing.
pub(crate) async fn apply(
    shared: &Shared,
    caller: &Caller,
    dry_run: bool,
    expect: Option<&str>,
) -> Result<ApplyInfo, Refusal> {
    if !caller.admin {
        return Err(refusal(
            ErrorCode::AccessDenied,
            format!(
                "cannot apply the reservation files: uid {} is not an administrator of this \
                 daemon",
                caller.uid
            ),
        ));
    }
    let Some(dir) = shared.config.reservations_dir.clone() else {
        return Err(refusal(
            ErrorCode::InvalidParameter,
            "this daemon has no reservations_dir (set it in its configuration)".into(),
        ));
    };
    // The files declare the daemon's own namespace's reservations, as `persistent add` does.
    crate::handlers::outside_home(shared, caller, Operation::CreatePersistent)?;
    let _serial = shared.persist_lock.lock().await;
    let read_dir_at = dir.clone();
    let owner = shared.own_uid;
    let declared = tokio::task::spawn_blocking(move || read_dir(&read_dir_at, owner))
        .await
        .map_err(|e| refusal(ErrorCode::Internal, e.to_string()))?
        .map_err(|why| {
            shared.set_declared_problem(Some(why.clone()));
            refusal(
                ErrorCode::InvalidParameter,
                format!("{why}; nothing was changed"),
            )
        })?
        .unwrap_or_default();
    let (host_entries, cluster_entries): (Vec<Entry>, Vec<Entry>) = declared
        .entries
        .iter()
        .cloned()
        .partition(|e| !e.in_cluster);
    let p = {
        let st = shared.home();
        let p = plan(&host_entries, st.table.reservations());
        precheck(&st, &p)?;
        p
    };
    let part = cluster_part(shared, &cluster_entries, false)?;
    if p.is_empty() && part.is_empty() {
        // The files are readable and the daemon holds what they say: no problem left.
        shared.set_declared_problem(None);
    }
    let (mut list, digest) = changes(&p, part.changes.clone());
    // One frame holds the reply: the first changes, up to about 40 KiB of them, and the
    // counts of all (the digest covers all).
    let total = list.len();
    let mut bytes = 0;
    let listed = list
        .iter()
        .take_while(|c| {
            bytes += serde_json::to_vec(c).map_or(0, |v| v.len());
            bytes <= LISTED_BYTES
        })
        .count();
    list.truncate(listed);
    let mut files = declared.files.clone();
    files.truncate(MAX_FILES_LISTED);
    let mut info = ApplyInfo {
        dir: dir.display().to_string(),
        files,
        changes: list,
        added: p.add.len() as u64 + part.added,
        changed: p.change.len() as u64 + part.changed,
        removed: p.remove.len() as u64 + part.removed,
        not_listed: (total - listed) as u64,
        unchanged: p.unchanged + part.unchanged,
        digest: digest.clone(),
        applied: false,
        cluster_errors: Vec::new(),
    };
    if dry_run {
        return Ok(info);
    }
    if let Some(want) = expect
        && want != digest
    {
        return Err(refusal(
            ErrorCode::SharingViolation,
            format!(
                "the reservation files or the daemon's reservations changed since the difference \
                 was shown (it was {want}, it is now {digest}); nothing was changed; run `portres \
                 apply` again to see the new difference"
            ),
        ));
    }
    if !p.is_empty() {
        let owner = Owner {
            pid: None,
            uid: caller.uid,
            command: portres_sys::process::command_line(caller.pid),
        };
        execute(shared, p, owner)?;
        crate::handlers::compact_journal_if_due(shared).await;
    }
    // The cluster's part after this host's, without the lock: every member (this one too)
    // takes it to apply what the cluster commits.
    drop(_serial);
    info.cluster_errors = run_cluster_part(shared, part).await;
    if info.cluster_errors.is_empty() {
        shared.set_declared_problem(None);
    }
    info.applied = true;
    Ok(info)
}

/// The cluster's part of an apply: the entries with `cluster = true` against the cluster
/// reservations that came from files (each member's files are meant to be the same).
#[derive(Default)]
pub(crate) struct ClusterPart {
    pub(crate) changes: Vec<ApplyChange>,
    pub(crate) added: u64,
    pub(crate) changed: u64,
    pub(crate) removed: u64,
    pub(crate) unchanged: u64,
    #[cfg(feature = "cluster")]
    pub(crate) work: Option<(
        std::sync::Arc<crate::cluster::Cluster>,
        crate::cluster::FilesPlan,
    )>,
}

impl ClusterPart {
    fn is_empty(&self) -> bool {
        self.added + self.changed + self.removed == 0
    }
}

/// What the cluster entries would change (`only_add`: additions only, as at start, when a
/// member's files may be older than the others').
pub(crate) fn cluster_part(
    shared: &Shared,
    entries: &[Entry],
    only_add: bool,
) -> Result<ClusterPart, Refusal> {
    #[cfg(not(feature = "cluster"))]
    {
        let _ = (shared, only_add);
        match entries.first() {
            None => Ok(ClusterPart::default()),
            Some(e) => Err(refusal(
                ErrorCode::InvalidParameter,
                format!(
                    "{}: cluster = true, but this portres was built without cluster mode (the \
                     `cluster` feature); nothing was changed",
                    e.at()
                ),
            )),
        }
    }
    #[cfg(feature = "cluster")]
    match &shared.cluster {
        Some(c) => Ok(crate::cluster::files_part(c, entries, only_add)),
        None => match entries.first() {
            None => Ok(ClusterPart::default()),
            Some(e) => Err(refusal(
                ErrorCode::InvalidParameter,
                format!(
                    "{}: cluster = true, but this daemon is not in cluster mode (no [cluster] in \
                     its configuration); nothing was changed",
                    e.at()
                ),
            )),
        },
    }
}

/// Makes the cluster's part of an apply; returns the changes that failed, in words (and
/// records them as the reservation files' problem, for `status`).
pub(crate) async fn run_cluster_part(shared: &Shared, part: ClusterPart) -> Vec<String> {
    #[cfg(feature = "cluster")]
    if let Some((c, plan)) = part.work {
        let errors = crate::cluster::apply_files(shared, &c, plan).await;
        if !errors.is_empty() {
            shared.set_declared_problem(Some(format!(
                "cluster entries not applied: {}",
                errors.join("; ")
            )));
        }
        return errors;
    }
    let _ = (shared, part);
    Vec::new()
}

/// What applying `p` would run into, found without changing anything (so `--check` reports it
/// too): a new entry overlapping a reservation that stays (made by a request, or a runtime
/// one), or a port of it that a socket has.
pub(crate) fn precheck(st: &crate::State, p: &Plan) -> Result<(), Refusal> {
    let going: std::collections::HashSet<Token> = p
        .remove
        .iter()
        .chain(p.change.iter().map(|(r, _)| r))
        .map(|r| r.token)
        .collect();
    for e in &p.add {
        let asked = format!(
            "{}: cannot create persistent reservation {}/{}",
            e.at(),
            e.range,
            e.protocol
        );
        match obstacle(st, e.protocol, e.range, |t| going.contains(&t)) {
            None => {}
            Some(Obstacle::Reservation(conflict)) => {
                return Err(refusal(
                    ErrorCode::SharingViolation,
                    format!(
                        "{asked}: {conflict}; change the entry, or delete that reservation \
                         first; nothing was changed"
                    ),
                )
                .with_conflict(conflict));
            }
            Some(socket) => {
                return Err(refusal(
                    ErrorCode::SharingViolation,
                    format!(
                        "{asked}: {socket}; stop what has it, or change the entry; nothing was \
                         changed"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// What keeps a block from being reserved in this namespace's table and kernel.
pub(crate) enum Obstacle {
    /// A reservation overlaps it.
    Reservation(portres_core::Conflict),
    /// A socket has one of its ports (who has it, in `who`'s words).
    Socket {
        protocol: Protocol,
        port: u16,
        by: String,
    },
}

impl std::fmt::Display for Obstacle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Obstacle::Reservation(c) => write!(f, "{c}"),
            Obstacle::Socket { protocol, port, by } => {
                write!(f, "port {port}/{protocol} is in use by {by}")
            }
        }
    }
}

/// The first obstacle to reserving `range`: a reservation overlapping it (but those `going`
/// says are about to go), else a socket on one of its ports not covered by a reservation (the
/// ports of reservations that go are theirs until then: their placeholders may hold them).
pub(crate) fn obstacle(
    st: &crate::State,
    protocol: Protocol,
    range: PortRange,
    going: impl Fn(Token) -> bool,
) -> Option<Obstacle> {
    if let Some(r) = st
        .table
        .overlapping(protocol, range)
        .find(|r| !going(r.token))
    {
        return Some(Obstacle::Reservation(portres_core::Conflict {
            protocol,
            port: r.range.start().max(range.start()),
            holder: r.holder(),
        }));
    }
    let covered: Vec<PortRange> = st
        .table
        .overlapping(protocol, range)
        .map(|r| r.range)
        .collect();
    uncovered(range, &covered).into_iter().find_map(|part| {
        let port = st.enforcer.first_in_use(protocol, part)?;
        let by = crate::visibility::describe_holder(protocol, port)
            .unwrap_or_else(|| format!("a socket (`portres who {port}` names it)"));
        Some(Obstacle::Socket { protocol, port, by })
    })
}

/// The parts of `range` that no block of `covered` (sorted, disjoint: a table's) covers.
fn uncovered(range: PortRange, covered: &[PortRange]) -> Vec<PortRange> {
    let mut out = Vec::new();
    let last = u32::from(range.last());
    let mut next = u32::from(range.start());
    for c in covered {
        let (cs, cl) = (u32::from(c.start()), u32::from(c.last()));
        if cs > next {
            let end = (cs - 1).min(last);
            if let Ok(r) = PortRange::new(next, end + 1 - next) {
                out.push(r);
            }
        }
        next = next.max(cl + 1);
    }
    if next <= last
        && let Ok(r) = PortRange::new(next, last + 1 - next)
    {
        out.push(r);
    }
    out
}

/// What [`execute`] changed in the table, to write to the store or to undo.
#[derive(Default)]
struct Done {
    /// Out of the table and the kernel (removed entries, and changed ones whose mode changed).
    removed: Vec<Reservation>,
    /// Into the table and the kernel (new entries, and changed ones whose mode changed).
    placed: Vec<Reservation>,
    /// Changed in place (access list, description, file): (before, after).
    relabeled: Vec<(Reservation, Reservation)>,
}

/// Applies `p` to the daemon's own namespace, under the state lock from first to last, so
/// that nobody sees (or takes the ports of) a change that may still be undone: out of the table
/// and the kernel first, then the new ones in (each claimed: a port in use or taken by another
/// reservation refuses the whole apply and everything is put back), metadata changed in place,
/// then the store in one transaction, written on this thread (an apply is rare: other requests
/// wait for its fdatasync, a few milliseconds, rather than race it). A failed write is undone.
pub(crate) fn execute(shared: &Shared, p: Plan, owner: Owner) -> Result<(), Refusal> {
    let mut st = shared.home();
    let done = change_table(&mut st, &p, &owner)?;
    let remove: Vec<(Protocol, u16)> = done
        .removed
        .iter()
        .map(|r| (r.protocol, r.range.start()))
        .collect();
    let put: Vec<StoredReservation> = done
        .placed
        .iter()
        .chain(done.relabeled.iter().map(|(_, r)| r))
        .map(StoredReservation::from_reservation)
        .collect();
    let written = if shared.checks.apply_store_fails {
        Err(crate::StoreError::Io {
            path: shared.store.path().into(),
            why: "PORTRES_FAILPOINT=apply-store-fails".into(),
        })
    } else {
        shared.store.replace(&remove, &put)
    };
    if let Err(e) = written {
        undo(&mut st, &done);
        drop(st);
        tracing::error!(error = %e, "store write failed; the reservation files were not applied");
        return Err(refusal(
            ErrorCode::Internal,
            format!("cannot apply the reservation files: {e}; nothing was changed"),
        ));
    }
    for r in done
        .placed
        .iter()
        .chain(done.relabeled.iter().map(|(_, r)| r))
    {
        st.keep(r, true);
    }
    drop(st);
    for r in &done.removed {
        if !done.placed.iter().any(|n| n.token == r.token) {
            tracing::info!(
                token = %r.token,
                "removed persistent reservation {}/{} (its entry left {})",
                r.range,
                r.protocol,
                origin_words(r)
            );
        }
    }
    for r in done
        .placed
        .iter()
        .chain(done.relabeled.iter().map(|(_, r)| r))
    {
        tracing::info!(
            token = %r.token,
            "applied persistent reservation {}/{} ({}) from {}",
            r.range,
            r.protocol,
            r.mode,
            origin_words(r)
        );
    }
    Ok(())
}

/// Where a reservation came from, for the log: its file, or its key in the cluster.
fn origin_words(r: &Reservation) -> String {
    match r.origin() {
        Some(Origin { file: Some(f), .. }) => f.clone(),
        Some(Origin {
            cluster: Some(c), ..
        }) => format!("the cluster ({})", c.key),
        _ => "?".into(),
    }
}

/// A persistent reservation as entry `e` declares it.
fn declared_reservation(e: &Entry, token: Token, owner: &Owner, now: u64) -> Reservation {
    let mut r = Reservation::persistent(
        token,
        e.protocol,
        e.range,
        e.mode,
        e.acl.clone(),
        owner.clone(),
        now,
    );
    if let Kind::Persistent { origin, .. } = &mut r.kind {
        *origin = e.origin();
    }
    r
}

fn change_table(
    st: &mut crate::namespaces::SpaceGuard<'_>,
    p: &Plan,
    owner: &Owner,
) -> Result<Done, Refusal> {
    let mut done = Done::default();
    let now = crate::handlers::now();
    // A change of mode is enforced anew (out, then in again with the same token, as a stored
    // one is at start: its own service may have its ports bound); any other change is made in
    // place, so held ports stay held and handed-out sockets stay theirs.
    let (remade, relabel): (Vec<_>, Vec<_>) = p.change.iter().partition(|(r, e)| r.mode != e.mode);
    // Out first (a remade block may be re-made over the same ports), and the keeper's copies
    // of their placeholders closed before the ports are claimed again.
    for r in p.remove.iter().chain(remade.iter().map(|(r, _)| r)) {
        if let Some(r) = st.table.remove_persistent(r.token) {
            st.retire(&r);
            done.removed.push(r);
        }
    }
    st.sync_keeper();
    // New blocks reach ip_local_reserved_ports in one write before their claims probe them.
    let first: Vec<PortRange> = p
        .add
        .iter()
        .filter(|e| st.enforcer.excludes_first(e.mode, e.range))
        .map(|e| e.range)
        .collect();
    st.enforcer.prewrite_exclude(first);
    let mut failed = None;
    for e in &p.add {
        let token = st.table.new_token(&mut crate::handlers::OsRandom);
        let r = declared_reservation(e, token, owner, now);
        let crate::State {
            table, enforcer, ..
        } = &mut **st;
        match table.place_persistent(r, enforcer) {
            Ok(r) => done.placed.push(r),
            Err(refused) => {
                failed = Some((e, refused));
                break;
            }
        }
    }
    if failed.is_none() {
        for (old, e) in &remade {
            let r = declared_reservation(e, old.token, owner, now);
            match st.table.restore_persistent(r.clone()) {
                Ok(()) => {
                    st.enforcer.admit_persistent(&r);
                    done.placed.push(r);
                }
                Err(refused) => {
                    failed = Some((e, refused));
                    break;
                }
            }
        }
    }
    if failed.is_none() {
        for (old, e) in &relabel {
            let (acl, origin) = (e.acl.clone(), e.origin());
            if let Some(after) = st.table.relabel_persistent(old.token, acl, origin) {
                done.relabeled.push((old.clone(), after));
            }
        }
    }
    st.enforcer.end_prewrite();
    st.enforcer.sync_exclude();
    if let Some((e, refused)) = failed {
        undo(st, &done);
        return Err(Refusal {
            message: format!("{}: {}; nothing was changed", e.at(), refused.message),
            ..refused
        });
    }
    Ok(done)
}

/// Takes out what was placed, puts back what was removed and relabels back what was relabeled
/// (a refused or unwritten apply), under the same lock as the change.
fn undo(st: &mut crate::namespaces::SpaceGuard<'_>, done: &Done) {
    for (before, _) in &done.relabeled {
        if let Kind::Persistent { acl, origin } = &before.kind {
            st.table
                .relabel_persistent(before.token, acl.clone(), origin.clone());
        }
    }
    for r in &done.placed {
        if let Some(r) = st.table.cancel(r.token) {
            st.retire(&r);
        }
    }
    st.sync_keeper();
    for r in &done.removed {
        // Their ports were out of the table only while this thread held the lock: nobody
        // else can have taken them in the table.
        match st.table.restore_persistent(r.clone()) {
            Ok(()) => {
                st.enforcer.admit_persistent(r);
                st.keep(r, true);
            }
            Err(e) => tracing::error!(
                "persistent reservation {}/{} could not be put back after a refused apply: {}; \
                 it is still stored and is enforced again at the next start",
                r.range,
                r.protocol,
                e.message
            ),
        }
    }
    st.enforcer.sync_exclude();
}

/// At start: applies the files of `reservations_dir` (the same as `portres apply --yes`). A
/// bad file changes nothing; the problem is logged and shown by `status`.
pub(crate) fn apply_at_start(shared: &Shared) {
    let Some(dir) = shared.config.reservations_dir.clone() else {
        return;
    };
    let declared = match read_dir(&dir, shared.own_uid) {
        Ok(Some(d)) => d,
        Ok(None) => {
            let st = shared.home();
            let n = st
                .table
                .reservations()
                .filter(|r| r.origin().is_some_and(|o| o.file.is_some()))
                .count();
            if n > 0 {
                let why = format!(
                    "{} does not exist, and {n} persistent reservations came from files there: \
                     they are kept; `portres apply` removes them",
                    dir.display()
                );
                tracing::warn!("reservation files: {why}");
                drop(st);
                shared.set_declared_problem(Some(why));
            }
            return;
        }
        Err(why) => {
            tracing::error!(
                "reservation files NOT APPLIED: {why}; the reservations from files stay as they \
                 were; fix the file and run `portres apply`"
            );
            shared.set_declared_problem(Some(why));
            return;
        }
    };
    let (host, cluster): (Vec<Entry>, Vec<Entry>) = declared
        .entries
        .iter()
        .cloned()
        .partition(|e| !e.in_cluster);
    // Entries with `cluster = true` are the cluster's: added once this member has joined it
    // (`cluster.rs`); here only whether they can be.
    if let Err(e) = cluster_part(shared, &cluster, true) {
        tracing::error!("reservation files: {}", e.message);
        shared.set_declared_problem(Some(e.message));
    }
    let p = {
        let st = shared.home();
        plan(&host, st.table.reservations())
    };
    if p.is_empty() {
        return;
    }
    let owner = Owner {
        pid: None,
        uid: shared.own_uid,
        command: Some(format!("portres daemon (files of {})", dir.display())),
    };
    let (added, changed, removed) = (p.add.len(), p.change.len(), p.remove.len());
    match execute(shared, p, owner) {
        Ok(()) => tracing::info!(
            "reservation files of {} applied: {added} added, {changed} changed, {removed} removed",
            dir.display()
        ),
        Err(e) => {
            tracing::error!("reservation files NOT APPLIED: {}", e.message);
            shared.set_declared_problem(Some(e.message));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_parse_with_their_lines_and_defaults() {
        let text = "# web\n\n[[reservation]]\nports = 8443\ndescription = \"tls\"\n\n\
                    [[reservation]]\nprotocol = \"udp\"\nports = \"9000-9009\"\nmode = \"hold\"\n\
                    users = [0]\n";
        let e = parse_file("web.toml", text).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(
            (e[0].line, e[0].protocol, e[0].mode),
            (3, Protocol::Tcp, Mode::Exclude)
        );
        assert_eq!(e[0].range, PortRange::new(8443, 1).unwrap());
        assert_eq!(e[0].description.as_deref(), Some("tls"));
        assert_eq!(
            (e[1].line, e[1].protocol, e[1].mode),
            (7, Protocol::Udp, Mode::Hold)
        );
        assert_eq!(e[1].range, PortRange::new(9000, 10).unwrap());
        assert_eq!(e[1].acl.users, vec![0]);
    }

    #[test]
    fn bad_entries_name_file_and_line() {
        let cases = [
            (
                "[[reservation]]\nports = 80\ncolour = 1\n",
                "x.toml:3",
                "unknown field",
            ),
            (
                "[[reservation]]\nports = 0\n",
                "x.toml:1",
                "not a port number",
            ),
            (
                "[[reservation]]\nports = 65536\n",
                "x.toml:1",
                "not a port number",
            ),
            (
                "[[reservation]]\nports = \"9-8\"\n",
                "x.toml:1",
                "ports = \"9-8\"",
            ),
            (
                "[[reservation]]\nports = \"65535-65536\"\n",
                "x.toml:1",
                "65536",
            ),
            (
                "[[reservation]]\nports = 80\nmode = \"keep\"\n",
                "x.toml:1",
                "mode",
            ),
            (
                "[[reservation]]\nports = 80\nprotocol = \"sctp\"\n",
                "x.toml:1",
                "protocol",
            ),
            ("[[reservation]]\nmode = \"hold\"\n", "x.toml:1", "ports"),
            (
                "[[reservation]]\nports = 80\nusers = [\"no-such-user-here\"]\n",
                "x.toml:1",
                "no user named",
            ),
            ("[[reservation]\nports = 80\n", "x.toml:1", ""),
            (
                &format!(
                    "[[reservation]]\nports = 80\ndescription = \"{}\"\n",
                    "x".repeat(513)
                ),
                "x.toml:1",
                "at most 512",
            ),
        ];
        for (text, at, what) in cases {
            let e = parse_file("x.toml", text).unwrap_err();
            assert!(e.starts_with(at) && e.contains(what), "{text:?}: {e}");
        }
        // The extremes that are fine.
        let ok = parse_file("x.toml", "[[reservation]]\nports = \"1-65535\"\n").unwrap();
        assert_eq!(ok[0].range.count(), 65535);
        let ok = parse_file("x.toml", "[[reservation]]\nports = 65535\n").unwrap();
        assert_eq!(ok[0].range.start(), 65535);
    }

    #[test]
    fn uncovered_parts() {
        let r = |a: u32, b: u32| PortRange::new(a, b - a + 1).unwrap();
        assert_eq!(uncovered(r(10, 20), &[]), vec![r(10, 20)]);
        assert_eq!(uncovered(r(10, 20), &[r(5, 12)]), vec![r(13, 20)]);
        assert_eq!(
            uncovered(r(10, 20), &[r(12, 13), r(18, 30)]),
            vec![r(10, 11), r(14, 17)]
        );
        assert_eq!(uncovered(r(10, 20), &[r(1, 65535)]), vec![]);
        assert_eq!(uncovered(r(65535, 65535), &[]), vec![r(65535, 65535)]);
        assert_eq!(
            uncovered(r(1, 65535), &[r(2, 65534)]),
            vec![r(1, 1), r(65535, 65535)]
        );
    }

    #[test]
    fn overlapping_entries_name_both() {
        let mut e = parse_file("a.toml", "[[reservation]]\nports = \"9000-9009\"\n").unwrap();
        e.extend(parse_file("b.toml", "[[reservation]]\n\nports = 9009\n").unwrap());
        let err = check_overlaps(&e).unwrap_err();
        assert!(
            err.starts_with("b.toml:1") && err.contains("a.toml:1"),
            "{err}"
        );
        // Another protocol does not overlap.
        let mut e = parse_file("a.toml", "[[reservation]]\nports = 9000\n").unwrap();
        e.extend(
            parse_file(
                "b.toml",
                "[[reservation]]\nports = 9000\nprotocol = \"udp\"\n",
            )
            .unwrap(),
        );
        check_overlaps(&e).unwrap();
        // Adjacent blocks do not overlap.
        let mut e = parse_file("a.toml", "[[reservation]]\nports = \"9000-9009\"\n").unwrap();
        e.extend(parse_file("b.toml", "[[reservation]]\nports = 9010\n").unwrap());
        check_overlaps(&e).unwrap();
    }
}
