//! [`Table`]: every live reservation, every session, and the operations of docs/behaviour.md §2.
//!
//! Invariants (property-tested in `src/tests.rs`):
//! - no two live blocks of one protocol share a port;
//! - a refused operation leaves the table exactly as it was;
//! - ending a session, or releasing a token, frees exactly the blocks it held;
//! - the free-gap index always equals the dynamic range minus the live blocks.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use crate::gaps::FreeGaps;
use crate::outcome::{Conflict, ErrorCode, Holder, Operation, Refusal};
use crate::range::{Mode, PortRange, Protocol, Token};

/// Identifies one client connection to the daemon.
pub type SessionId = u64;

/// Who made a reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// Process id; `None` for persistent reservations, which outlive their creator.
    pub pid: Option<u32>,
    /// User id.
    pub uid: u32,
    /// Command line of the process, when it could be read.
    pub command: Option<String>,
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.pid {
            Some(pid) => write!(f, "pid {pid} (uid {}", self.uid)?,
            None => write!(f, "an administrator (uid {}", self.uid)?,
        }
        if let Some(cmd) = &self.command {
            write!(f, ", `{}`", crate::printable(cmd))?;
        }
        f.write_str(")")
    }
}

/// The peer of a request, as the kernel reports it (never as the client claims).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The connection the request came on.
    pub session: SessionId,
    /// Process id (`SO_PEERCRED`).
    pub pid: u32,
    /// User id (`SO_PEERCRED`).
    pub uid: u32,
    /// Primary and supplementary group ids (`SO_PEERCRED`, `SO_PEERGROUPS`).
    pub gids: Vec<u32>,
    /// Whether the daemon's policy makes this caller an administrator.
    pub admin: bool,
}

/// Users and groups, besides administrators, who may consume a persistent reservation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    /// User ids.
    pub users: Vec<u32>,
    /// Group ids.
    pub groups: Vec<u32>,
}

impl Acl {
    fn allows(&self, caller: &Caller) -> bool {
        caller.admin
            || self.users.contains(&caller.uid)
            || caller.gids.iter().any(|g| self.groups.contains(g))
    }
}

/// Runtime or persistent, with what each kind carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Lives as long as its session.
    Runtime {
        /// The session that acquired it.
        session: SessionId,
    },
    /// Lives until deleted; survives restarts.
    Persistent {
        /// Who else may consume it.
        acl: Acl,
        /// Where it came from (a file, or a request) and why it exists.
        origin: Origin,
    },
}

/// Where a persistent reservation came from, and why it exists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origin {
    /// The file that declares it (`reservations_dir`, managed by `apply`); `None`: created by
    /// a request, which `apply` never touches.
    pub file: Option<String>,
    /// Why it exists, in the administrator's words.
    pub description: Option<String>,
    /// A reservation of the cluster (kept in etcd, mirrored here); `None`: this host's own.
    pub cluster: Option<ClusterOrigin>,
}

/// A cluster reservation mirrored into a member's table: where it lives in the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterOrigin {
    /// Its key in etcd.
    pub key: String,
    /// The member that created it (a runtime block: the member whose session holds it).
    pub node: String,
    /// A runtime block of another member's session (kept free here, as an exclude block, while
    /// its lease lives); otherwise a cluster persistent reservation.
    pub runtime: bool,
}

/// One live reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// Its token.
    pub token: Token,
    /// Its protocol.
    pub protocol: Protocol,
    /// Its block.
    pub range: PortRange,
    /// Runtime or persistent.
    pub kind: Kind,
    /// How it is enforced.
    pub mode: Mode,
    /// Who made it.
    pub owner: Owner,
    /// When, in seconds since the Unix epoch.
    pub created: u64,
    handed_out: BTreeSet<u16>,
}

impl Reservation {
    /// A persistent reservation as read back from the store (see [`Table::restore_persistent`]).
    pub fn persistent(
        token: Token,
        protocol: Protocol,
        range: PortRange,
        mode: Mode,
        acl: Acl,
        owner: Owner,
        created: u64,
    ) -> Self {
        Reservation {
            token,
            protocol,
            range,
            kind: Kind::Persistent {
                acl,
                origin: Origin::default(),
            },
            mode,
            owner,
            created,
            handed_out: BTreeSet::new(),
        }
    }

    /// A runtime reservation carried over from a previous daemon (see
    /// [`Table::restore_runtime`]), with the ports it had handed out.
    #[allow(clippy::too_many_arguments)]
    pub fn runtime(
        token: Token,
        protocol: Protocol,
        range: PortRange,
        mode: Mode,
        session: SessionId,
        owner: Owner,
        created: u64,
        handed_out: impl IntoIterator<Item = u16>,
    ) -> Self {
        Reservation {
            token,
            protocol,
            range,
            kind: Kind::Runtime { session },
            mode,
            owner,
            created,
            handed_out: handed_out
                .into_iter()
                .filter(|p| range.contains(*p))
                .collect(),
        }
    }

    /// The session of a runtime reservation.
    pub fn session(&self) -> Option<SessionId> {
        match self.kind {
            Kind::Runtime { session } => Some(session),
            Kind::Persistent { .. } => None,
        }
    }

    /// Where a persistent reservation came from (`None` for a runtime one).
    pub fn origin(&self) -> Option<&Origin> {
        match &self.kind {
            Kind::Persistent { origin, .. } => Some(origin),
            Kind::Runtime { .. } => None,
        }
    }

    /// Whether it is persistent.
    pub fn is_persistent(&self) -> bool {
        matches!(self.kind, Kind::Persistent { .. })
    }

    /// `"runtime"` or `"persistent"`.
    pub fn kind_str(&self) -> &'static str {
        if self.is_persistent() {
            "persistent"
        } else {
            "runtime"
        }
    }

    /// Ports of the block now handed out to sockets.
    pub fn handed_out(&self) -> &BTreeSet<u16> {
        &self.handed_out
    }

    /// What holds its ports, as a conflict names it.
    pub fn holder(&self) -> Holder {
        Holder::Reservation {
            range: self.range,
            persistent: self.is_persistent(),
            owner: self.owner.clone(),
        }
    }
}

/// Settings of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableConfig {
    /// Where wildcard blocks come from (by default the kernel's `ip_local_port_range`).
    pub dynamic_range: PortRange,
    /// Most runtime ports one non-admin user may hold at once.
    pub runtime_quota: u32,
}

/// What the table holds, counted as it changes (so `status` costs the same at any size).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableCounts {
    /// Runtime reservations in `hold` mode.
    pub runtime_hold: u64,
    /// Runtime reservations in `exclude` mode.
    pub runtime_exclude: u64,
    /// Persistent reservations in `hold` mode.
    pub persistent_hold: u64,
    /// Persistent reservations in `exclude` mode.
    pub persistent_exclude: u64,
    /// Ports in every block.
    pub ports_reserved: u64,
    /// Ports handed out to sockets.
    pub ports_handed_out: u64,
}

impl TableCounts {
    fn slot(&mut self, r: &Reservation) -> &mut u64 {
        match (r.is_persistent(), r.mode) {
            (true, Mode::Hold) => &mut self.persistent_hold,
            (true, Mode::Exclude) => &mut self.persistent_exclude,
            (false, Mode::Hold) => &mut self.runtime_hold,
            (false, Mode::Exclude) => &mut self.runtime_exclude,
        }
    }

    fn add(&mut self, r: &Reservation) {
        *self.slot(r) += 1;
        self.ports_reserved += u64::from(r.range.count());
        self.ports_handed_out += r.handed_out.len() as u64;
    }

    fn sub(&mut self, r: &Reservation) {
        *self.slot(r) -= 1;
        self.ports_reserved -= u64::from(r.range.count());
        self.ports_handed_out -= r.handed_out.len() as u64;
    }
}

/// A source of random 64-bit numbers for tokens (the daemon uses the OS random source).
pub trait TokenSource {
    /// A fresh random number.
    fn random_u64(&mut self) -> u64;
}

/// A port found in use by a socket outside portres.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketInUse {
    /// The port.
    pub port: u16,
    /// Its holder, when known (e.g. `"nginx (pid 4121)"`).
    pub description: Option<String>,
}

/// Why the kernel side could not take a block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimError {
    /// A port of the block is used by a socket outside portres.
    InUse(SocketInUse),
    /// Something else failed (e.g. no descriptors left to hold the block): refuse with this.
    Failed {
        /// Outcome to report.
        code: ErrorCode,
        /// Why, for people (the core prefixes what was asked).
        why: String,
    },
}

/// The kernel side of granting a block (the daemon's enforcement): makes `range` the block of
/// `token`, or says why not and leaves nothing behind. The table calls it once per candidate
/// block, after its own checks and just before recording the grant, so the kernel can exclude
/// the block from automatic port selection *before* checking that it is free (no window in
/// which autobind can land inside), and a wildcard acquire moves on to the next candidate when
/// a port turns out to be in use.
pub trait PortClaim {
    /// Takes `range` for `token` in `mode`.
    fn claim(
        &mut self,
        token: Token,
        protocol: Protocol,
        range: PortRange,
        mode: Mode,
    ) -> Result<(), ClaimError>;
}

#[derive(Debug, Clone)]
struct Session {
    owner: Owner,
    tokens: BTreeSet<Token>,
}

/// The reservation table.
#[derive(Debug, Clone)]
pub struct Table {
    config: TableConfig,
    reservations: HashMap<Token, Reservation>,
    /// Per protocol: start port → token, for overlap checks and ordered listing.
    index: [BTreeMap<u16, Token>; 2],
    /// Per protocol: free gaps of the dynamic range.
    free: [FreeGaps; 2],
    sessions: HashMap<SessionId, Session>,
    runtime_ports: HashMap<u32, u32>,
    counts: TableCounts,
}

/// Candidate blocks a wildcard acquire probes before giving up.
const WILDCARD_ATTEMPTS: usize = 64;

impl Table {
    /// An empty table.
    pub fn new(config: TableConfig) -> Self {
        let gaps = FreeGaps::new(config.dynamic_range);
        Table {
            config,
            reservations: HashMap::new(),
            index: [BTreeMap::new(), BTreeMap::new()],
            free: [gaps.clone(), gaps],
            sessions: HashMap::new(),
            runtime_ports: HashMap::new(),
            counts: TableCounts::default(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &TableConfig {
        &self.config
    }

    /// What the table holds (kept up to date as it changes: no walk over the table).
    pub fn counts(&self) -> TableCounts {
        self.counts
    }

    /// Registers a new connection.
    pub fn open_session(&mut self, id: SessionId, owner: Owner) {
        self.sessions.insert(
            id,
            Session {
                owner,
                tokens: BTreeSet::new(),
            },
        );
    }

    /// Ends a connection: every runtime reservation it acquired ends with it. Returns them.
    pub fn end_session(&mut self, id: SessionId) -> Vec<Reservation> {
        let Some(session) = self.sessions.remove(&id) else {
            return Vec::new();
        };
        session
            .tokens
            .into_iter()
            .filter_map(|t| self.remove(t))
            .collect()
    }

    /// Puts back a runtime reservation carried over from a previous daemon, into its session
    /// (which must be open: see [`Table::open_session`]). Refused, changing nothing, if the
    /// token is taken, the block overlaps a live one or the session is not open.
    pub fn restore_runtime(&mut self, r: Reservation) -> Result<(), Refusal> {
        let op = Operation::AcquireRuntime;
        let refuse = |why: String| Refusal::new(op, ErrorCode::Internal, why);
        let Some(session) = r.session() else {
            return Err(refuse(format!(
                "reservation {} is not a runtime one",
                r.token
            )));
        };
        if self.reservations.contains_key(&r.token) {
            return Err(refuse(format!("token {} is in use", r.token)));
        }
        if !self.sessions.contains_key(&session) {
            return Err(refuse(format!("session {session} is not open")));
        }
        if let Some(o) = self.first_overlap(r.protocol, r.range) {
            return Err(refuse(format!(
                "{}/{} overlaps {} reservation {}/{}",
                r.range,
                r.protocol,
                o.kind_str(),
                o.range,
                o.protocol
            )));
        }
        self.insert(r);
        Ok(())
    }

    /// Moves the runtime reservation `token` into session `to` (which must be open): it ends
    /// with that session from now on. Returns the session it left, or `None` (and changes
    /// nothing) if there is no such runtime reservation or `to` is not open.
    pub fn move_to_session(&mut self, token: Token, to: SessionId) -> Option<SessionId> {
        if !self.sessions.contains_key(&to) {
            return None;
        }
        let r = self.reservations.get_mut(&token)?;
        let Kind::Runtime { session } = &mut r.kind else {
            return None;
        };
        let from = std::mem::replace(session, to);
        if let Some(s) = self.sessions.get_mut(&from) {
            s.tokens.remove(&token);
        }
        self.sessions
            .get_mut(&to)
            .expect("checked")
            .tokens
            .insert(token);
        Some(from)
    }

    /// Number of runtime reservations of session `id` (0 if it is not open).
    pub fn session_len(&self, id: SessionId) -> usize {
        self.sessions.get(&id).map_or(0, |s| s.tokens.len())
    }

    /// Records `port` of `token`'s block as handed out (a socket carried over from a previous
    /// daemon). Returns whether the port is in the block.
    pub fn mark_handed(&mut self, token: Token, port: u16) -> bool {
        match self
            .reservations
            .get_mut(&token)
            .filter(|r| r.range.contains(port))
        {
            Some(r) => {
                if r.handed_out.insert(port) {
                    self.counts.ports_handed_out += 1;
                }
                true
            }
            None => false,
        }
    }

    /// Number of open sessions.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// The reservation with this token.
    pub fn get(&self, token: Token) -> Option<&Reservation> {
        self.reservations.get(&token)
    }

    /// Every reservation, sorted by protocol then start port.
    pub fn reservations(&self) -> impl Iterator<Item = &Reservation> {
        self.index
            .iter()
            .flat_map(|m| m.values())
            .map(|t| &self.reservations[t])
    }

    /// Number of live reservations.
    pub fn len(&self) -> usize {
        self.reservations.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.reservations.is_empty()
    }

    /// The reservation covering `port`, if any.
    pub fn covering(&self, protocol: Protocol, port: u16) -> Option<&Reservation> {
        let (_, t) = self.index[protocol.index()].range(..=port).next_back()?;
        let r = &self.reservations[t];
        r.range.contains(port).then_some(r)
    }

    /// Runtime ports `uid` holds now.
    pub fn runtime_ports_of(&self, uid: u32) -> u32 {
        self.runtime_ports.get(&uid).copied().unwrap_or(0)
    }

    /// Free ports of the dynamic range for `protocol`, and the largest free block.
    pub fn dynamic_free(&self, protocol: Protocol) -> (u32, u32) {
        let g = &self.free[protocol.index()];
        (g.free_ports(), g.largest())
    }

    /// Every reservation of `protocol` that shares a port with `range`, in port order.
    pub fn overlapping(
        &self,
        protocol: Protocol,
        range: PortRange,
    ) -> impl Iterator<Item = &Reservation> {
        let index = &self.index[protocol.index()];
        let before = index.range(..range.start()).next_back().map(|(_, t)| t);
        let inside = index.range(range.start()..=range.last()).map(|(_, t)| t);
        before
            .into_iter()
            .chain(inside)
            .map(|t| &self.reservations[t])
            .filter(move |r| r.range.overlaps(range))
    }

    fn first_overlap(&self, protocol: Protocol, range: PortRange) -> Option<&Reservation> {
        let (_, t) = self.index[protocol.index()]
            .range(..=range.last())
            .next_back()?;
        let r = &self.reservations[t];
        r.range.overlaps(range).then_some(r)
    }

    fn fresh_token(&self, tokens: &mut dyn TokenSource) -> Token {
        loop {
            if let Some(t) = Token::new(tokens.random_u64())
                && !self.reservations.contains_key(&t)
            {
                return t;
            }
        }
    }

    fn insert(&mut self, r: Reservation) {
        self.counts.add(&r);
        let p = r.protocol.index();
        self.free[p].take(r.range);
        self.index[p].insert(r.range.start(), r.token);
        if let Kind::Runtime { session } = r.kind {
            *self.runtime_ports.entry(r.owner.uid).or_default() += u32::from(r.range.count());
            if let Some(s) = self.sessions.get_mut(&session) {
                s.tokens.insert(r.token);
            }
        }
        self.reservations.insert(r.token, r);
    }

    fn remove(&mut self, token: Token) -> Option<Reservation> {
        let r = self.reservations.remove(&token)?;
        self.counts.sub(&r);
        let p = r.protocol.index();
        self.index[p].remove(&r.range.start());
        self.free[p].give_back(r.range);
        if let Kind::Runtime { session } = r.kind {
            if let Some(n) = self.runtime_ports.get_mut(&r.owner.uid) {
                *n -= u32::from(r.range.count());
                if *n == 0 {
                    self.runtime_ports.remove(&r.owner.uid);
                }
            }
            if let Some(s) = self.sessions.get_mut(&session) {
                s.tokens.remove(&token);
            }
        }
        Some(r)
    }

    /// Takes a specific block: the table's overlap check, then the kernel's claim. A conflict is
    /// refused with `conflict_code`; `asked` describes the request for the message.
    #[allow(clippy::too_many_arguments)]
    fn take_specific(
        &self,
        op: Operation,
        conflict_code: ErrorCode,
        asked: &str,
        token: Token,
        protocol: Protocol,
        range: PortRange,
        mode: Mode,
        claim: &mut dyn PortClaim,
    ) -> Result<(), Refusal> {
        let conflict = if let Some(r) = self.first_overlap(protocol, range) {
            Conflict {
                protocol,
                port: r.range.start().max(range.start()),
                holder: r.holder(),
            }
        } else {
            match claim.claim(token, protocol, range, mode) {
                Ok(()) => return Ok(()),
                Err(ClaimError::InUse(s)) => Conflict {
                    protocol,
                    port: s.port,
                    holder: Holder::Socket {
                        description: s.description,
                    },
                },
                Err(ClaimError::Failed { code, why }) => {
                    return Err(Refusal::new(op, code, format!("{asked}: {why}")));
                }
            }
        };
        Err(Refusal::new(
            op,
            conflict_code,
            format!(
                "{asked}: {conflict}; choose a block that does not overlap it, or free the port first"
            ),
        )
        .with_conflict(conflict))
    }

    /// `SIO_ACQUIRE_PORT_RESERVATION`: a runtime block for `caller`'s session. `start == 0` asks
    /// for any `count` contiguous free ports of the dynamic range.
    #[allow(clippy::too_many_arguments)]
    pub fn acquire(
        &mut self,
        caller: &Caller,
        protocol: Protocol,
        start: u32,
        count: u32,
        mode: Mode,
        now: u64,
        tokens: &mut dyn TokenSource,
        claim: &mut dyn PortClaim,
    ) -> Result<Reservation, Refusal> {
        let op = Operation::AcquireRuntime;
        if count == 0 {
            return Err(Refusal::new(
                op,
                ErrorCode::InvalidArgument,
                format!(
                    "cannot reserve {protocol} ports: the count is 0; ask for at least one port"
                ),
            ));
        }
        let Ok(count16) = u16::try_from(count) else {
            return Err(Refusal::new(
                op,
                ErrorCode::InvalidArgument,
                format!(
                    "cannot reserve {count} {protocol} ports: a block has at most 65535 ports; \
                     ask for fewer"
                ),
            ));
        };
        if u64::from(start) + u64::from(count) - 1 > 65535 {
            return Err(Refusal::new(
                op,
                ErrorCode::InvalidArgument,
                format!(
                    "cannot reserve {count} {protocol} ports from {start}: the block would end at \
                     port {}, past 65535; choose a lower start or a smaller count",
                    u64::from(start) + u64::from(count) - 1
                ),
            ));
        }
        let Some(session) = self.sessions.get(&caller.session) else {
            return Err(Refusal::new(
                op,
                ErrorCode::Internal,
                "the session is not registered with the table",
            ));
        };
        let owner = session.owner.clone();
        if !caller.admin {
            let used = self.runtime_ports_of(caller.uid);
            if used + count > self.config.runtime_quota {
                return Err(Refusal::new(
                    op,
                    ErrorCode::QuotaExceeded,
                    format!(
                        "cannot reserve {count} {protocol} ports for uid {}: it holds {used} \
                         runtime ports already and its quota is {}; release reservations it no \
                         longer needs, or ask an administrator to raise runtime_quota_ports in \
                         the daemon's configuration",
                        caller.uid, self.config.runtime_quota
                    ),
                ));
            }
        }
        let token = self.fresh_token(tokens);
        let range = if start == 0 {
            self.pick_wildcard(token, protocol, count16, mode, claim)?
        } else {
            let range = PortRange::new(start, count).expect("checked above");
            let asked = format!("cannot reserve {range}/{protocol}");
            self.take_specific(
                op,
                ErrorCode::AddressInUse,
                &asked,
                token,
                protocol,
                range,
                mode,
                claim,
            )?;
            range
        };
        let r = Reservation {
            token,
            protocol,
            range,
            kind: Kind::Runtime {
                session: caller.session,
            },
            mode,
            owner,
            created: now,
            handed_out: BTreeSet::new(),
        };
        self.insert(r.clone());
        Ok(r)
    }

    fn pick_wildcard(
        &self,
        token: Token,
        protocol: Protocol,
        count: u16,
        mode: Mode,
        claim: &mut dyn PortClaim,
    ) -> Result<PortRange, Refusal> {
        let gaps = &self.free[protocol.index()];
        let mut attempts = 0;
        let mut busy = 0;
        for (gap_start, gap_len) in gaps.candidates(count) {
            let gap_end = u32::from(gap_start) + gap_len;
            let mut s = u32::from(gap_start);
            while s + u32::from(count) <= gap_end && attempts < WILDCARD_ATTEMPTS {
                attempts += 1;
                let r = PortRange::new(s, u32::from(count)).expect("inside the dynamic range");
                match claim.claim(token, protocol, r, mode) {
                    Ok(()) => return Ok(r),
                    Err(ClaimError::InUse(used)) => {
                        busy += 1;
                        s = u32::from(used.port) + 1;
                    }
                    Err(ClaimError::Failed { code, why }) => {
                        return Err(Refusal::new(
                            Operation::AcquireRuntime,
                            code,
                            format!("cannot reserve {count} {protocol} ports: {why}"),
                        ));
                    }
                }
            }
            if attempts >= WILDCARD_ATTEMPTS {
                break;
            }
        }
        let (free, largest) = self.dynamic_free(protocol);
        let why = if busy > 0 {
            format!(
                "{busy} candidate blocks had ports bound by other sockets, and {} ports are free \
                 in the table (largest free block {largest})",
                free
            )
        } else {
            format!("{free} ports are free there and the largest free block has {largest}")
        };
        Err(Refusal::new(
            Operation::AcquireRuntime,
            ErrorCode::NoBufferSpace,
            format!(
                "cannot reserve {count} contiguous {protocol} ports: no free block of that size \
                 is left in the dynamic range {} ({why}); ask for fewer ports, release some, or \
                 widen dynamic_range in the daemon's configuration",
                self.config.dynamic_range
            ),
        ))
    }

    /// `SIO_RELEASE_PORT_RESERVATION`: ends a runtime reservation of the caller's process.
    pub fn release(&mut self, caller: &Caller, token: u64) -> Result<Reservation, Refusal> {
        let op = Operation::ReleaseRuntime;
        let r = Token::new(token)
            .and_then(|t| self.reservations.get(&t))
            .ok_or_else(|| {
                Refusal::new(
                    op,
                    ErrorCode::InvalidArgument,
                    format!(
                        "cannot release reservation {token}: no live reservation has that token \
                         (it was never issued, or it ended already)"
                    ),
                )
            })?;
        if r.is_persistent() {
            return Err(Refusal::new(
                op,
                ErrorCode::InvalidArgument,
                format!(
                    "cannot release reservation {token}: it is the persistent reservation {}/{}; \
                     delete persistent reservations by start and count (portres persistent delete)",
                    r.range, r.protocol
                ),
            ));
        }
        if r.owner.pid != Some(caller.pid) {
            return Err(Refusal::new(
                op,
                ErrorCode::AccessDenied,
                format!(
                    "cannot release reservation {token}: it belongs to {}, and only the process \
                     that acquired a runtime reservation may release it",
                    r.owner
                ),
            ));
        }
        let t = r.token;
        Ok(self.remove(t).expect("present"))
    }

    /// `SIO_ASSOCIATE_PORT_RESERVATION` bookkeeping: hands out `port` (0: the lowest free port)
    /// of the block of `token` and records it as in use until [`Table::return_port`].
    pub fn associate(
        &mut self,
        caller: &Caller,
        token: u64,
        protocol: Protocol,
        port: u16,
    ) -> Result<u16, Refusal> {
        let op = Operation::Associate;
        let invalid = |why: String| Refusal::new(op, ErrorCode::InvalidArgument, why);
        let r = Token::new(token)
            .and_then(|t| self.reservations.get_mut(&t))
            .ok_or_else(|| {
                invalid(format!(
                    "cannot bind from reservation {token}: no live reservation has that token \
                     (it was never issued, or it ended)"
                ))
            })?;
        if r.protocol != protocol {
            return Err(invalid(format!(
                "cannot bind a {protocol} socket from reservation {token}: it reserves {} ports; \
                 use a {} socket",
                r.protocol, r.protocol
            )));
        }
        let allowed = match &r.kind {
            Kind::Runtime { .. } => r.owner.pid == Some(caller.pid),
            Kind::Persistent { acl, .. } => acl.allows(caller),
        };
        if !allowed {
            let why = if r.is_persistent() {
                "only administrators and the users and groups on its access list may use it"
            } else {
                "only the process that acquired a runtime reservation may use it"
            };
            return Err(Refusal::new(
                op,
                ErrorCode::AccessDenied,
                format!(
                    "cannot bind from reservation {token} ({}/{}): it belongs to {}, and {why}",
                    r.range, r.protocol, r.owner
                ),
            ));
        }
        let chosen = if port == 0 {
            r.range
                .ports()
                .find(|p| !r.handed_out.contains(p))
                .ok_or_else(|| {
                    Refusal::new(
                        op,
                        ErrorCode::AddressInUse,
                        format!(
                            "cannot bind from reservation {token}: all {} ports of {}/{} are \
                             handed out; close a socket bound from it or reserve more ports",
                            r.range.count(),
                            r.range,
                            r.protocol
                        ),
                    )
                })?
        } else if !r.range.contains(port) {
            return Err(invalid(format!(
                "cannot bind port {port} from reservation {token}: the port is outside its block \
                 {}/{}; ask for a port inside it, or 0 for any free one",
                r.range, r.protocol
            )));
        } else if r.handed_out.contains(&port) {
            return Err(Refusal::new(
                op,
                ErrorCode::AddressInUse,
                format!(
                    "cannot bind port {port}/{} from reservation {token}: it is handed out to \
                     another socket already; ask for 0 to get a free port of the block",
                    r.protocol
                ),
            ));
        } else {
            port
        };
        r.handed_out.insert(chosen);
        self.counts.ports_handed_out += 1;
        Ok(chosen)
    }

    /// The socket bound to `port` from `token` closed: the port returns to its block.
    /// Returns whether it was handed out.
    pub fn return_port(&mut self, token: Token, port: u16) -> bool {
        let returned = self
            .reservations
            .get_mut(&token)
            .is_some_and(|r| r.handed_out.remove(&port));
        if returned {
            self.counts.ports_handed_out -= 1;
        }
        returned
    }

    /// `CreatePersistent{Tcp,Udp}PortReservation`.
    #[allow(clippy::too_many_arguments)]
    pub fn create_persistent(
        &mut self,
        caller: &Caller,
        protocol: Protocol,
        start: u32,
        count: u32,
        mode: Mode,
        acl: Acl,
        command: Option<String>,
        now: u64,
        tokens: &mut dyn TokenSource,
        claim: &mut dyn PortClaim,
    ) -> Result<Reservation, Refusal> {
        let op = Operation::CreatePersistent;
        let range = persistent_range(op, protocol, start, count)?;
        require_admin(
            op,
            caller,
            &format!("create persistent reservation {range}/{protocol}"),
        )?;
        let token = self.fresh_token(tokens);
        let asked = format!("cannot create persistent reservation {range}/{protocol}");
        self.take_specific(
            op,
            ErrorCode::SharingViolation,
            &asked,
            token,
            protocol,
            range,
            mode,
            claim,
        )?;
        let r = Reservation {
            token,
            protocol,
            range,
            kind: Kind::Persistent {
                acl,
                origin: Origin::default(),
            },
            mode,
            owner: Owner {
                pid: None,
                uid: caller.uid,
                command,
            },
            created: now,
            handed_out: BTreeSet::new(),
        };
        self.insert(r.clone());
        Ok(r)
    }

    /// Puts a persistent reservation made elsewhere (`apply`, from a file) into the table,
    /// enforced by `claim`: refused, changing nothing, if it overlaps another reservation, its
    /// token is taken, or a port is in use.
    pub fn place_persistent(
        &mut self,
        r: Reservation,
        claim: &mut dyn PortClaim,
    ) -> Result<Reservation, Refusal> {
        let op = Operation::CreatePersistent;
        if !r.is_persistent() || self.reservations.contains_key(&r.token) {
            return Err(Refusal::new(
                op,
                ErrorCode::Internal,
                format!("reservation {} is not a new persistent one", r.token),
            ));
        }
        let asked = format!(
            "cannot create persistent reservation {}/{}",
            r.range, r.protocol
        );
        self.take_specific(
            op,
            ErrorCode::SharingViolation,
            &asked,
            r.token,
            r.protocol,
            r.range,
            r.mode,
            claim,
        )?;
        self.insert(r.clone());
        Ok(r)
    }

    /// Changes who may consume a persistent reservation and where it came from, in place (its
    /// block, mode and enforcement stay as they are). Returns it as it is now.
    pub fn relabel_persistent(
        &mut self,
        token: Token,
        new_acl: Acl,
        new_origin: Origin,
    ) -> Option<Reservation> {
        let r = self.reservations.get_mut(&token)?;
        match &mut r.kind {
            Kind::Persistent { acl, origin } => {
                *acl = new_acl;
                *origin = new_origin;
            }
            Kind::Runtime { .. } => return None,
        }
        Some(r.clone())
    }

    /// A token no reservation has (for a reservation made with [`Table::place_persistent`]).
    pub fn new_token(&self, tokens: &mut dyn TokenSource) -> Token {
        self.fresh_token(tokens)
    }

    /// Puts back a persistent reservation read from the store at start-up. Refuses overlaps
    /// and duplicate tokens (which a sound store never holds).
    pub fn restore_persistent(&mut self, r: Reservation) -> Result<(), Refusal> {
        let op = Operation::CreatePersistent;
        if !r.is_persistent() || self.reservations.contains_key(&r.token) {
            return Err(Refusal::new(
                op,
                ErrorCode::Internal,
                format!("stored reservation {} is not a new persistent one", r.token),
            ));
        }
        if let Some(o) = self.first_overlap(r.protocol, r.range) {
            return Err(Refusal::new(
                op,
                ErrorCode::SharingViolation,
                format!(
                    "stored reservation {}/{} overlaps {}/{}",
                    r.range, r.protocol, o.range, o.protocol
                ),
            ));
        }
        let mut r = r;
        r.handed_out.clear();
        self.insert(r);
        Ok(())
    }

    fn find_persistent(
        &self,
        op: Operation,
        protocol: Protocol,
        range: PortRange,
    ) -> Result<&Reservation, Refusal> {
        self.index[protocol.index()]
            .get(&range.start())
            .map(|t| &self.reservations[t])
            .filter(|r| r.range == range && r.is_persistent())
            .ok_or_else(|| {
                let near = match self.first_overlap(protocol, range) {
                    Some(o) => format!(
                        " ({} reservation {}/{} overlaps it; lookup and delete need the exact \
                         start and count)",
                        o.kind_str(),
                        o.range,
                        o.protocol
                    ),
                    None => String::new(),
                };
                Refusal::new(
                    op,
                    ErrorCode::NotFound,
                    format!(
                        "no persistent reservation has exactly start {} and count {} for \
                         {protocol}{near}; `portres show` lists them all",
                        range.start(),
                        range.count()
                    ),
                )
            })
    }

    /// `LookupPersistent{Tcp,Udp}PortReservation`: anyone may look up.
    pub fn lookup_persistent(
        &self,
        protocol: Protocol,
        start: u32,
        count: u32,
    ) -> Result<&Reservation, Refusal> {
        let op = Operation::LookupPersistent;
        let range = persistent_range(op, protocol, start, count)?;
        self.find_persistent(op, protocol, range)
    }

    /// The checks of `DeletePersistent{Tcp,Udp}PortReservation`, without removing: the daemon
    /// deletes from the store first, then calls [`Table::remove_persistent`].
    pub fn check_delete_persistent(
        &self,
        caller: &Caller,
        protocol: Protocol,
        start: u32,
        count: u32,
    ) -> Result<&Reservation, Refusal> {
        let op = Operation::DeletePersistent;
        let range = persistent_range(op, protocol, start, count)?;
        require_admin(
            op,
            caller,
            &format!("delete persistent reservation {range}/{protocol}"),
        )?;
        self.find_persistent(op, protocol, range)
    }

    /// Takes back a reservation this table just granted (runtime or persistent), when enforcing
    /// it in the kernel or storing it failed. Returns it.
    pub fn cancel(&mut self, token: Token) -> Option<Reservation> {
        self.remove(token)
    }

    /// Removes a persistent reservation (after it left the store).
    pub fn remove_persistent(&mut self, token: Token) -> Option<Reservation> {
        if self.reservations.get(&token)?.is_persistent() {
            self.remove(token)
        } else {
            None
        }
    }

    /// Test hook: checks every invariant, panicking with a description on the first broken one.
    pub fn check_invariants(&self) {
        for idx in &self.index {
            let mut prev_end = 0u32;
            for (&s, t) in idx {
                let r = &self.reservations[t];
                assert_eq!(r.range.start(), s, "index start matches");
                assert!(u32::from(s) >= prev_end, "blocks overlap at {s}");
                prev_end = r.range.end();
            }
        }
        assert_eq!(
            self.index[0].len() + self.index[1].len(),
            self.reservations.len(),
            "index covers every reservation"
        );
        for p in Protocol::ALL {
            let dynr = self.config.dynamic_range;
            let reserved: u32 = self
                .reservations()
                .filter(|r| r.protocol == p)
                .map(|r| {
                    let s = u32::from(r.range.start()).max(u32::from(dynr.start()));
                    let e = r.range.end().min(dynr.end());
                    e.saturating_sub(s)
                })
                .sum();
            assert_eq!(
                self.free[p.index()].free_ports() + reserved,
                u32::from(dynr.count()),
                "free gaps plus reserved ports equal the dynamic range"
            );
        }
        let mut recount = TableCounts::default();
        for r in self.reservations.values() {
            recount.add(r);
        }
        assert_eq!(recount, self.counts, "the counts match the table");
        let mut per_uid: HashMap<u32, u32> = HashMap::new();
        for r in self.reservations.values() {
            if let Kind::Runtime { session } = r.kind {
                *per_uid.entry(r.owner.uid).or_default() += u32::from(r.range.count());
                assert!(
                    self.sessions
                        .get(&session)
                        .is_some_and(|s| s.tokens.contains(&r.token)),
                    "runtime reservation belongs to a live session"
                );
            }
        }
        assert_eq!(per_uid, self.runtime_ports, "quota accounting");
    }
}

/// Refuses `op` with `AccessDenied` unless `caller` is an administrator; `what` is the request.
fn require_admin(op: Operation, caller: &Caller, what: &str) -> Result<(), Refusal> {
    if caller.admin {
        return Ok(());
    }
    Err(Refusal::new(
        op,
        ErrorCode::AccessDenied,
        format!(
            "cannot {what}: uid {uid} is not an administrator of this daemon; run it as root, or \
             ask for uid {uid} to be added to admin_users in the daemon's configuration",
            uid = caller.uid
        ),
    ))
}

fn persistent_range(
    op: Operation,
    protocol: Protocol,
    start: u32,
    count: u32,
) -> Result<PortRange, Refusal> {
    PortRange::new(start, count).map_err(|e| {
        Refusal::new(
            op,
            ErrorCode::InvalidParameter,
            format!(
                "invalid persistent {protocol} range (start {start}, count {count}): {e}; a \
                 persistent reservation needs a start of 1-65535 and a count of at least 1 that \
                 stays within port 65535"
            ),
        )
    })
}
