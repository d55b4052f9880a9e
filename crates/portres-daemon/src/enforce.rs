//! Kernel enforcement (docs/behaviour.md §3): the hold layer (placeholder sockets), the exclude
//! layer (`net.ipv4.ip_local_reserved_ports`), and the sockets handed out from reservations.
//!
//! Everything here runs under the state mutex together with the table, so the kernel's view and
//! the table change together: a block is in the table only if its placeholders are bound. The
//! sysctl holds an `exclude` block before the reply that grants it, a small `hold` block right
//! after (see the [`PortClaim`] impl); released blocks leave it with the next write.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

use portres_core::{
    ClaimError, ErrorCode, Mode, PortClaim, PortRange, PortSet, Protocol, Reservation, SocketInUse,
    Token,
};
use portres_proto::LayerInfo;
use portres_sys::hold::{self, SocketKind};
use portres_sys::reserved_ports;

/// Prepared placeholder sockets kept per protocol.
const POOL_SIZE: usize = 8;

/// Without the shared eBPF programs (a daemon that may not load them), each socket handed out
/// beside a UDP placeholder needs a classic steering program of its own, compiled by the kernel
/// for that port's group: at most this many at once, so that releasing blocks never frees
/// programs in bulk (the kernel's BPF allocator wedges on tens of thousands freed together).
pub(crate) const MAX_CLASSIC_STEERING: usize = 256;

/// Why holding a block failed.
#[derive(Debug)]
pub(crate) enum HoldError {
    /// A port could not be bound: someone else has it (or the kernel refused).
    Port { port: u16, error: io::Error },
    /// The daemon ran out of descriptors.
    NoDescriptors { held: u64, limit: u64 },
}

fn in_use(protocol: Protocol, port: u16) -> ClaimError {
    ClaimError::InUse(SocketInUse {
        port,
        description: crate::visibility::describe_holder(protocol, port),
    })
}

/// This boot and the calling thread's network namespace, as the journal records them:
/// `BOOT_ID NETNS_INODE`.
fn sysctl_identity() -> String {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let netns = std::fs::metadata("/proc/thread-self/ns/net").map_or(0, |m| {
        use std::os::unix::fs::MetadataExt;
        m.ino()
    });
    format!("{} {netns}", boot.trim())
}

/// Takes the blocks `ours` out of `ip_local_reserved_ports`, except ports the journal in
/// `state_dir` says were there before portres (for the keeper, when no daemon came back to carry
/// on; entries others added meanwhile stay). Returns whether it did.
pub(crate) fn restore_sysctl_from_journal(state_dir: &std::path::Path, ours: &PortSet) -> bool {
    let journal = state_dir.join("reserved_ports.before");
    let Ok(text) = std::fs::read_to_string(&journal) else {
        return false;
    };
    let before = match text.split_once('\n') {
        Some((id, value)) if id == sysctl_identity() => value.trim().parse::<PortSet>().ok(),
        _ => None,
    };
    let Some(before) = before else { return false };
    let written = reserved_ports::ReservedPorts::open(true).and_then(|mut f| {
        let current = f.read()?;
        f.write(&current.difference(&ours.difference(&before)))
    });
    if written.is_ok() {
        let _ = std::fs::remove_file(&journal);
    }
    written.is_ok()
}

/// The exclude layer's bookkeeping.
struct Exclude {
    /// Why it is off, if it is.
    off: Option<String>,
    /// Blocks per port (TCP and UDP blocks may share a port number; the sysctl does not care).
    count: Vec<u8>,
    /// Ports in any block.
    ours: PortSet,
    /// Ports this daemon added to the sysctl (not there before): removed again at shutdown.
    added: PortSet,
    /// The value before we started, kept on disk while we run, so that after a crash the next
    /// daemon can tell its predecessor's entries from everybody else's (the daemon's own
    /// namespace only: another namespace's blocks end with the daemon, see `namespaces.rs`).
    journal: Option<PathBuf>,
    /// The sysctl file, kept open.
    file: Option<reserved_ports::ReservedPorts>,
    /// Blocks were removed from `ours` since the last write.
    dirty: bool,
    /// Held blocks were added to `ours` since the last write.
    unwritten: bool,
}

impl Exclude {
    /// The calling thread's namespace's sysctl; `state_dir` holds the journal (the daemon's own
    /// namespace, a named one's store directory), `None` for a namespace without one (a
    /// container's: its entries end with it).
    fn open(state_dir: Option<&std::path::Path>) -> Exclude {
        let journal = state_dir.map(|d| d.join("reserved_ports.before"));
        let mut x = Exclude {
            off: None,
            count: vec![0; 65536],
            ours: PortSet::new(),
            added: PortSet::new(),
            journal,
            file: None,
            dirty: false,
            unwritten: false,
        };
        let current = match reserved_ports::read() {
            Ok(c) => c,
            Err(e) => {
                x.off = Some(format!(
                    "cannot read /proc/sys/net/ipv4/ip_local_reserved_ports: {e}"
                ));
                return x;
            }
        };
        let file = match reserved_ports::ReservedPorts::open(true) {
            Ok(f) => f,
            Err(e) => {
                x.off = Some(format!(
                    "cannot write /proc/sys/net/ipv4/ip_local_reserved_ports: {e} (it needs \
                     CAP_NET_ADMIN in the daemon's network namespace: run the daemon as root)"
                ));
                return x;
            }
        };
        // A journal left behind means the previous daemon stopped without restoring: on
        // SIGTERM with live restore (its successor carries its blocks on), or because it died.
        // Its entries are the difference, and the journal holds the value to go back to. It
        // counts only for the same boot and network namespace (after a reboot the sysctl starts
        // afresh). Nothing is written now: the first write, after the persistent blocks and
        // those carried over were added (`finish_start`), removes the predecessor's entries
        // that nobody holds any more and keeps the rest, so a carried-over block never leaves
        // the sysctl, not even for a moment.
        let Some(journal) = x.journal.clone() else {
            // Another namespace: everything there now is somebody else's.
            x.file = Some(file);
            return x;
        };
        let here = sysctl_identity();
        let before = match std::fs::read_to_string(&journal) {
            Ok(text) => match text.split_once('\n') {
                Some((id, value)) if id == here => match value.trim().parse::<PortSet>() {
                    Ok(prev) => {
                        tracing::info!(
                            "ip_local_reserved_ports as it was before portres: {:?} (from {}); \
                             the previous daemon's entries are kept only for blocks carried over",
                            prev.to_string(),
                            journal.display()
                        );
                        prev
                    }
                    Err(_) => current.clone(),
                },
                _ => current.clone(),
            },
            Err(_) => current.clone(),
        };
        x.added = current.difference(&before);
        if let Err(e) = std::fs::write(&journal, format!("{here}\n{before}\n")) {
            tracing::warn!(error = %e, "cannot write {}", journal.display());
        }
        x.file = Some(file);
        x
    }

    fn add(&mut self, r: PortRange) {
        for p in r.ports() {
            let c = &mut self.count[usize::from(p)];
            *c += 1;
            if *c == 1 {
                self.ours.insert(p);
            }
        }
    }

    fn remove(&mut self, r: PortRange) {
        let mut gone = PortSet::new();
        for p in r.ports() {
            let c = &mut self.count[usize::from(p)];
            *c = c.saturating_sub(1);
            if *c == 0 {
                gone.insert(p);
            }
        }
        self.ours = self.ours.difference(&gone);
    }

    /// Mirrors our blocks into the sysctl, keeping everyone else's entries (read fresh each
    /// time, so entries added while we run survive too).
    fn sync(&mut self) {
        self.dirty = false;
        self.unwritten = false;
        let Some(file) = self.file.as_mut().filter(|_| self.off.is_none()) else {
            return;
        };
        let result = file.read().and_then(|current| {
            let foreign = current.difference(&self.added);
            let desired = foreign.union(&self.ours);
            if desired != current {
                file.write(&desired)?;
            }
            self.added = self.ours.difference(&foreign);
            Ok(())
        });
        if let Err(e) = result {
            tracing::error!(error = %e, "cannot update ip_local_reserved_ports; exclude layer off");
            self.off = Some(format!("updating ip_local_reserved_ports failed: {e}"));
        }
    }

    fn restore(&mut self) {
        let Some(file) = self.file.as_mut().filter(|_| self.off.is_none()) else {
            return;
        };
        match file
            .read()
            .and_then(|c| file.write(&c.difference(&self.added)))
        {
            Ok(()) => {
                if let Some(j) = &self.journal {
                    let _ = std::fs::remove_file(j);
                }
                tracing::info!("ip_local_reserved_ports restored");
            }
            Err(e) => tracing::error!(error = %e, "cannot restore ip_local_reserved_ports"),
        }
    }
}

/// A socket handed out from a block: its inode, the address it was bound to, and whether it was
/// handed out listening.
#[derive(Debug, Clone, Copy)]
struct Handed {
    inode: u64,
    addr: IpAddr,
    listener: bool,
}

/// What the enforcers of every namespace share: the daemon's settings and kernel objects.
struct Common {
    holder_uid: Option<u32>,
    own_uid: u32,
    nofile: u64,
    udp_programs: Arc<Result<portres_sys::bpf::SocketPrograms, String>>,
    holder_warning: Option<String>,
    deny: crate::deny::SharedDeny,
    all_held: Arc<std::sync::atomic::AtomicU64>,
}

/// The enforcement state of one network namespace (the daemon's own, or a client's).
pub(crate) struct Enforcer {
    /// The uid placeholders and handed-out sockets are created under (root only).
    holder_uid: Option<u32>,
    own_uid: u32,
    holds: HashMap<Token, Vec<OwnedFd>>,
    /// Placeholder sockets made ahead of time, per protocol.
    pool: [Vec<hold::Prepared>; 2],
    /// Blocks held by helper processes, and their placeholders' inodes.
    helpers: crate::holder::Helpers,
    remote_inodes: HashMap<Token, Vec<u64>>,
    held_remote: u64,
    held_ports: u64,
    /// Placeholders and prepared sockets the daemon process holds itself, in every namespace
    /// it serves (they share its open-file limit).
    all_held: Arc<std::sync::atomic::AtomicU64>,
    /// This enforcer's prepared sockets as last counted in `all_held`.
    pool_counted: u64,
    /// Blocks that could not be held at start-up, and why.
    unheld: HashMap<Token, String>,
    /// Each handed-out socket, by (token, port).
    handed: HashMap<(Token, u16), Handed>,
    /// Inode of each socket handed out from a block that has ended, by (protocol, port).
    orphans: HashMap<(Protocol, u16), u64>,
    exclude: Exclude,
    /// Blocks already written to the exclude layer by [`Enforcer::prewrite_exclude`] (a batch of
    /// claims: `apply`), with how many claims may still take each without another write.
    prewritten: Option<HashMap<PortRange, u32>>,
    nofile: u64,
    /// The eBPF programs every UDP placeholder shares (in every namespace), or why they could
    /// not be loaded.
    udp_programs: Arc<Result<portres_sys::bpf::SocketPrograms, String>>,
    /// Without them: the UDP ports of live blocks whose reuseport group carries a classic
    /// steering program (at most [`MAX_CLASSIC_STEERING`]).
    classic_steered: std::collections::HashSet<(Token, u16)>,
    /// Whether placeholders are IPv6 dual-stack sockets (false: IPv4, no IPv6 here).
    placeholders_v6: bool,
    /// Why the holder uid is not as private as it must be (a passwd entry, a process).
    holder_warning: Option<String>,
    /// The deny layer (cgroup bind programs), or why it is off; one for every namespace (its
    /// map is keyed by namespace). When it is on, `hold` blocks have no placeholders: its map
    /// keeps every bind out but the daemon's own.
    deny: crate::deny::SharedDeny,
    /// This enforcer's network namespace cookie (its deny-layer map entries' key).
    netns_cookie: u64,
    /// Whether it serves the daemon's own namespace (which owns the deny layer and the
    /// sysctl journal).
    home: bool,
    /// Placeholders carried over from a predecessor that the deny layer replaces: closed once
    /// the map covers their blocks ([`Enforcer::finish_start`]).
    replaced_at_start: Vec<OwnedFd>,
}

impl Enforcer {
    pub(crate) fn new(
        state_dir: &std::path::Path,
        holder_uid: u32,
        deny: crate::deny::DenySettings,
    ) -> Enforcer {
        let nofile = hold::raise_nofile_limit();
        let own_uid = portres_sys::creds::effective_uid();
        let holder_uid = hold::can_use_holder_uid(holder_uid).then_some(holder_uid);
        let holder_warning = holder_uid.and_then(|h| {
            let why = portres_sys::creds::uid_in_use(h)?;
            let w = format!(
                "WARNING: holder uid {h} must belong to nobody, but {why}: processes of that uid \
                 can share held ports; set holder_uid to an unused uid in the configuration"
            );
            tracing::warn!("{w}");
            Some(w)
        });
        let deny = crate::deny::DenyLayer::load(state_dir, deny).inspect_err(|why| {
            tracing::info!("deny layer off: {why}");
            // An earlier daemon's pinned programs would go on refusing binds (with a dead
            // daemon's pid in them, its own placeholders' binds too): they go.
            if own_uid == 0 {
                match crate::deny::cleanup(state_dir) {
                    Ok(c) if c.pin_dir.is_some() => tracing::warn!(
                        "removed the deny layer an earlier daemon left pinned in {}",
                        c.pin_dir.as_ref().map_or(String::new(), |p| p.display().to_string())
                    ),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "removing an earlier daemon's deny layer failed")
                    }
                }
            }
        });
        let common = Common {
            holder_uid,
            own_uid,
            nofile,
            udp_programs: Arc::new(load_udp_programs()),
            holder_warning,
            deny: Arc::new(std::sync::Mutex::new(deny)),
            all_held: Arc::default(),
        };
        Enforcer::with(common, Exclude::open(Some(state_dir)), true)
    }

    /// An enforcer for the network namespace the calling thread is in (it must have entered
    /// it: the sysctl is opened and the cookie read there), sharing this one's deny layer, UDP
    /// programs, descriptor count and settings. `journal_dir` keeps its
    /// `ip_local_reserved_ports` journal (a named namespace's store directory), so a successor
    /// after a crash tells this daemon's entries from others'.
    pub(crate) fn for_this_namespace(&self, journal_dir: Option<&std::path::Path>) -> Enforcer {
        let common = Common {
            holder_uid: self.holder_uid,
            own_uid: self.own_uid,
            nofile: self.nofile,
            udp_programs: self.udp_programs.clone(),
            holder_warning: self.holder_warning.clone(),
            deny: self.deny.clone(),
            all_held: self.all_held.clone(),
        };
        Enforcer::with(common, Exclude::open(journal_dir), false)
    }

    /// An enforcer holding nothing yet, in the calling thread's network namespace.
    fn with(common: Common, exclude: Exclude, home: bool) -> Enforcer {
        Enforcer {
            holder_uid: common.holder_uid,
            own_uid: common.own_uid,
            holds: HashMap::new(),
            pool: [Vec::new(), Vec::new()],
            helpers: crate::holder::Helpers::default(),
            remote_inodes: HashMap::new(),
            held_remote: 0,
            held_ports: 0,
            all_held: common.all_held,
            pool_counted: 0,
            unheld: HashMap::new(),
            handed: HashMap::new(),
            orphans: HashMap::new(),
            exclude,
            prewritten: None,
            nofile: common.nofile,
            udp_programs: common.udp_programs,
            classic_steered: std::collections::HashSet::new(),
            placeholders_v6: hold::prepare_placeholder(Protocol::Udp, None)
                .is_ok_and(|p| hold::prepared_is_v6(&p)),
            holder_warning: common.holder_warning,
            netns_cookie: portres_sys::deny::netns_cookie().unwrap_or(0),
            home,
            deny: common.deny,
            replaced_at_start: Vec::new(),
        }
    }

    /// Whether the deny layer is on (then `hold` blocks have no placeholders).
    pub(crate) fn deny_active(&self) -> bool {
        self.deny.lock().unwrap().is_ok()
    }

    /// The deny layer's claim of a block: into the map (nobody but the daemon may bind it from
    /// now on) and into `ip_local_reserved_ports` (autobind, unseen by bind hooks), then the
    /// check that no socket has any of its ports. On failure nothing is left behind.
    fn claim_denied(
        &mut self,
        token: Token,
        protocol: Protocol,
        range: PortRange,
        mode: Mode,
    ) -> Result<(), ClaimError> {
        let claimed = self
            .deny
            .lock()
            .unwrap()
            .as_mut()
            .expect("checked by the caller")
            .claim(token, protocol, range, self.netns_cookie);
        if let Err(e) = claimed {
            return Err(ClaimError::Failed {
                code: ErrorCode::Internal,
                why: format!("writing the deny layer's map failed: {e}; see the daemon's log"),
            });
        }
        self.exclude_first(range);
        let orphan = if mode == Mode::Hold {
            self.live_orphan(protocol, range)
        } else {
            None
        };
        let busy = orphan.or_else(|| first_socket_on(protocol, range));
        match busy {
            None => Ok(()),
            Some(port) => {
                if let Ok(d) = &mut *self.deny.lock().unwrap() {
                    d.retire(token);
                }
                self.exclude.remove(range);
                self.exclude.sync();
                Err(in_use(protocol, port))
            }
        }
    }

    /// The programs UDP placeholders share, when loaded.
    fn udp(&self) -> hold::UdpPrograms<'_> {
        (*self.udp_programs).as_ref().ok()
    }

    /// Binds the placeholders of a `hold` block, all or nothing.
    fn hold(
        &mut self,
        token: Token,
        protocol: Protocol,
        range: PortRange,
    ) -> Result<(), HoldError> {
        // Beyond the daemon's own descriptor budget, helper processes hold the block.
        if self.all_held() + u64::from(range.count()) > self.local_budget() {
            return self.hold_in_helpers(token, protocol, range);
        }
        // Small blocks take sockets prepared ahead of time: only the bind is left.
        let pool = &mut self.pool[protocol.index()];
        if usize::from(range.count()) <= pool.len() {
            let mut fds = Vec::with_capacity(usize::from(range.count()));
            for port in range.ports() {
                let prepared = pool.pop().expect("counted");
                match hold::bind_placeholder(prepared, port, (*self.udp_programs).as_ref().ok()) {
                    Ok(fd) => fds.push(fd),
                    Err(error) => {
                        self.count_pool();
                        return Err(HoldError::Port { port, error });
                    }
                }
            }
            self.count_pool();
            self.count_held(fds.len() as i64);
            self.holds.insert(token, fds);
            return Ok(());
        }
        // One filesystem-uid switch for the whole block.
        let fds = match hold::placeholders(protocol, range, self.holder_uid, self.udp()) {
            Ok(fds) => fds,
            // EMFILE, ENFILE: out of descriptors.
            Err((_, e)) if matches!(e.raw_os_error(), Some(24 | 23)) => {
                return Err(HoldError::NoDescriptors {
                    held: self.held_ports,
                    limit: self.nofile,
                });
            }
            Err((port, error)) => return Err(HoldError::Port { port, error }),
        };
        self.count_held(fds.len() as i64);
        self.holds.insert(token, fds);
        Ok(())
    }

    /// Whether the prepared-socket pools want refilling (at half: one uid switch then makes
    /// several sockets), and descriptors are plentiful enough to keep them: each is a
    /// descriptor that a session might need when the open-file limit is close.
    pub(crate) fn pool_wanted(&self, sessions: usize) -> bool {
        self.pool.iter().any(|p| p.len() < POOL_SIZE / 2)
            && self.descriptors_in_use(sessions) + 2 * POOL_SIZE as u64 + 64 <= self.nofile
    }

    /// An estimate of the descriptors in use (counting /proc/self/fd would cost a directory
    /// read): one per session and per held port, plus a few dozen of the daemon's own.
    fn descriptors_in_use(&self, sessions: usize) -> u64 {
        self.all_held() + sessions as u64 + 64
    }

    /// Prepares sockets for the pools (one filesystem-uid switch), when [`Enforcer::pool_wanted`]:
    /// run after a reply is sent, so the next small hold costs only a bind.
    pub(crate) fn refill_pool(&mut self, sessions: usize) {
        if !self.pool_wanted(sessions) {
            return;
        }
        for protocol in Protocol::ALL {
            let pool = &mut self.pool[protocol.index()];
            if pool.len() >= POOL_SIZE / 2 {
                continue;
            }
            let (made, failed) =
                hold::prepare_placeholders(protocol, self.holder_uid, POOL_SIZE - pool.len());
            pool.extend(made);
            if let Some(e) = failed {
                tracing::warn!(error = %e, "cannot prepare placeholder sockets");
                break;
            }
        }
        self.count_pool();
    }

    /// Brings `all_held` up to date with this enforcer's prepared sockets (after the pools
    /// changed).
    fn count_pool(&mut self) {
        let now = (self.pool[0].len() + self.pool[1].len()) as u64;
        self.all_held.fetch_add(
            now.wrapping_sub(self.pool_counted),
            std::sync::atomic::Ordering::Relaxed,
        );
        self.pool_counted = now;
    }

    /// Placeholders the daemon keeps itself: its open-file limit minus room for sessions,
    /// handed-out sockets in flight and its own files.
    fn local_budget(&self) -> u64 {
        self.nofile.saturating_sub(4096)
    }

    /// Holds a block in helper processes: placeholders are made in chunks, passed on and closed
    /// here, so the daemon never has more than a chunk open.
    fn hold_in_helpers(
        &mut self,
        token: Token,
        protocol: Protocol,
        range: PortRange,
    ) -> Result<(), HoldError> {
        let capacity = self.nofile.saturating_sub(64);
        let mut inodes = Vec::with_capacity(usize::from(range.count()));
        let mut start = u32::from(range.start());
        while start < range.end() {
            let n = (range.end() - start).min(crate::holder::CHUNK as u32);
            let chunk = PortRange::new(start, n).expect("inside the block");
            let fds = match hold::placeholders(protocol, chunk, self.holder_uid, self.udp()) {
                Ok(fds) => fds,
                Err((port, error)) => {
                    self.helpers
                        .drop_block(token, u64::from(start - u32::from(range.start())));
                    return Err(HoldError::Port { port, error });
                }
            };
            inodes.extend(fds.iter().map(|f| hold::inode(f.as_fd()).unwrap_or(0)));
            if let Err(e) = self.helpers.hold(token, &fds, capacity) {
                tracing::error!(error = %e, "passing placeholders to a helper failed");
                self.helpers
                    .drop_block(token, u64::from(start - u32::from(range.start())));
                return Err(HoldError::Port {
                    port: chunk.start(),
                    error: e,
                });
            }
            start += n;
        }
        self.held_remote += u64::from(range.count());
        self.remote_inodes.insert(token, inodes);
        Ok(())
    }

    /// The first port of `range` used by a socket portres handed out from a block that has
    /// since ended (placeholders of the holder uid could join it unnoticed). Dead ones are
    /// forgotten.
    fn live_orphan(&mut self, protocol: Protocol, range: PortRange) -> Option<u16> {
        let mine: Vec<(u16, u64)> = self
            .orphans
            .iter()
            .filter(|((p, port), _)| *p == protocol && range.contains(*port))
            .map(|((_, port), ino)| (*port, *ino))
            .collect();
        if mine.is_empty() {
            return None;
        }
        let live = portres_sys::sockdiag::sockets_on_ports(protocol, range.start(), range.last())
            .unwrap_or_default();
        let mut first = None;
        for (port, ino) in mine {
            if live.iter().any(|s| s.inode == ino) {
                first = Some(first.map_or(port, |f: u16| f.min(port)));
            } else {
                self.orphans.remove(&(protocol, port));
            }
        }
        first
    }
}

/// Blocks up to this many ports are checked free by binding each port; larger ones by one
/// `sock_diag` dump (which walks the kernel's socket hash tables: a fixed cost of a few
/// milliseconds for TCP, whatever the block's size).
const PROBE_UP_TO: u16 = 512;

/// The first port of `range` some socket has (bound, listening, connected or in TIME_WAIT).
fn first_socket_on(protocol: Protocol, range: PortRange) -> Option<u16> {
    // A TCP socket bound but not yet listening is in `sock_diag` dumps only from Linux 6.7
    // (TCP_BOUND_INACTIVE); before that, every port is probed.
    if range.count() <= PROBE_UP_TO
        || (protocol == Protocol::Tcp && !portres_sys::sockdiag::dumps_bound_only_sockets())
    {
        return portres_sys::ports::first_port_in_use(protocol, range);
    }
    match portres_sys::sockdiag::sockets_on_ports(protocol, range.start(), range.last()) {
        Ok(sockets) => sockets.iter().map(|s| s.local.port()).min(),
        Err(e) => {
            tracing::warn!(error = %e, "sock_diag failed; probing each port instead");
            portres_sys::ports::first_port_in_use(protocol, range)
        }
    }
}

impl Enforcer {
    /// Adds `range` to the exclude layer and writes the sysctl, before a claim probes its ports
    /// (so no ephemeral port is handed out from it meanwhile); a block written already by
    /// [`Enforcer::prewrite_exclude`] needs neither.
    fn exclude_first(&mut self, range: PortRange) {
        if let Some(left) = self.prewritten.as_mut().and_then(|p| p.get_mut(&range))
            && *left > 0
        {
            *left -= 1;
            return;
        }
        self.exclude.add(range);
        self.exclude.sync();
    }

    /// Whether a claim of `range` in `mode` writes the exclude layer before it probes.
    pub(crate) fn excludes_first(&self, mode: Mode, range: PortRange) -> bool {
        self.deny_active() || mode == Mode::Exclude || range.count() > EXCLUDE_FIRST_ABOVE
    }

    /// Many claims at once (`apply`): writes all of `blocks` (those that
    /// [`Enforcer::excludes_first`]) to the sysctl in one write, so each claim needs none (one
    /// write per claim rewrites the whole sysctl: quadratic in the number of blocks). Call
    /// [`Enforcer::end_prewrite`] after the last claim.
    pub(crate) fn prewrite_exclude(&mut self, blocks: impl IntoIterator<Item = PortRange>) {
        let mut pending: HashMap<PortRange, u32> = HashMap::new();
        for r in blocks {
            self.exclude.add(r);
            *pending.entry(r).or_default() += 1;
        }
        if !pending.is_empty() {
            self.exclude.sync();
        }
        self.prewritten = Some(pending);
    }

    /// Takes the blocks no claim took out of the exclude layer again (one write).
    pub(crate) fn end_prewrite(&mut self) {
        let Some(pending) = self.prewritten.take() else {
            return;
        };
        let mut any = false;
        for (r, n) in pending {
            for _ in 0..n {
                self.exclude.remove(r);
                any = true;
            }
        }
        if any {
            self.exclude.sync();
        }
    }

    /// The first port of `range` some socket has, in this enforcer's namespace (the caller's
    /// thread is in it: under a `SpaceGuard`), without claiming anything.
    pub(crate) fn first_in_use(&self, protocol: Protocol, range: PortRange) -> Option<u16> {
        first_socket_on(protocol, range)
    }
}

/// Hold blocks larger than this are written to `ip_local_reserved_ports` before their
/// placeholders are bound, like exclude blocks: binding them takes long enough (≈ 4 µs a port)
/// for outgoing connections to pick ports inside them meanwhile.
const EXCLUDE_FIRST_ABOVE: u16 = 64;

impl Drop for Enforcer {
    /// Another namespace's enforcer going: its descriptors leave the daemon's count.
    fn drop(&mut self) {
        self.all_held.fetch_sub(
            self.held_ports + self.pool_counted,
            std::sync::atomic::Ordering::Relaxed,
        );
    }
}

/// The enforcer is the table's kernel side of granting a block. An `exclude` block goes first
/// into the exclude layer (so autobind cannot land in it from now on), then is checked free by
/// bind probes: nothing but the sysctl keeps autobind out of it, so it is written before the
/// reply. A `hold` block is checked free by binding its placeholders, which from then on keep
/// every bind out, autobind included; a small one's sysctl entry (which outlasts the daemon) is
/// written right after the reply, with those of every other grant answered meanwhile, a large
/// one's first (see [`EXCLUDE_FIRST_ABOVE`]). On failure nothing is left behind.
/// Loads the eBPF programs UDP placeholders share (once per daemon).
fn load_udp_programs() -> Result<portres_sys::bpf::SocketPrograms, String> {
    // Tests force the fallback whether or not this machine lets the daemon load eBPF.
    if std::env::var("PORTRES_FAILPOINT").is_ok_and(|v| v.split(',').any(|f| f == "no-ebpf")) {
        return Err("eBPF turned off by PORTRES_FAILPOINT=no-ebpf".into());
    }
    portres_sys::bpf::SocketPrograms::load().map_err(|e| {
        let why = if e.kind() == io::ErrorKind::PermissionDenied {
            "loading eBPF needs CAP_BPF (kernel.unprivileged_bpf_disabled is set)".to_string()
        } else {
            format!("bpf(BPF_PROG_LOAD) failed: {e}")
        };
        tracing::info!("UDP placeholders without shared eBPF programs: {why}");
        why
    })
}

impl PortClaim for Enforcer {
    fn claim(
        &mut self,
        token: Token,
        protocol: Protocol,
        range: PortRange,
        mode: Mode,
    ) -> Result<(), ClaimError> {
        if self.deny_active() {
            return self.claim_denied(token, protocol, range, mode);
        }
        let first = mode == Mode::Exclude || range.count() > EXCLUDE_FIRST_ABOVE;
        if first {
            self.exclude_first(range);
        }
        let result = match mode {
            Mode::Hold => match self.live_orphan(protocol, range) {
                Some(port) => Err(in_use(protocol, port)),
                None => self.hold(token, protocol, range).map_err(|e| match e {
                    HoldError::Port { port, error } if error.raw_os_error() == Some(98) => {
                        in_use(protocol, port)
                    }
                    HoldError::Port { port, error } => ClaimError::Failed {
                        code: ErrorCode::Internal,
                        why: format!("holding port {port} failed: {error}; see the daemon's log"),
                    },
                    HoldError::NoDescriptors { held, limit } => ClaimError::Failed {
                        code: ErrorCode::NoBufferSpace,
                        why: format!(
                            "holding it needs one open file per port, and the daemon holds {held} \
                             ports already with an open-file limit of {limit}; ask for an \
                             exclude-mode block (not held; the kernel still never hands its ports \
                             out), release blocks, or raise the daemon's LimitNOFILE"
                        ),
                    },
                }),
            },
            Mode::Exclude => match portres_sys::ports::first_port_in_use(protocol, range) {
                Some(port) => Err(in_use(protocol, port)),
                None => Ok(()),
            },
        };
        match (first, &result) {
            (false, Ok(())) => {
                self.exclude.add(range);
                self.exclude.unwritten = true;
            }
            (true, Err(_)) => {
                self.exclude.remove(range);
                self.exclude.sync();
            }
            _ => {}
        }
        result
    }
}

impl Enforcer {
    /// Puts a persistent block back at start-up: a block that cannot be held is kept (the
    /// exclude layer still covers it) and reported.
    /// The exclude layer is written once by [`Enforcer::finish_start`].
    pub(crate) fn admit_at_start(&mut self, r: &Reservation) {
        self.exclude.add(r.range);
        if r.mode != Mode::Hold || self.deny_active() {
            // Under the deny layer the map holds it (written by `finish_start`).
            return;
        }
        let result = match self.live_orphan(r.protocol, r.range) {
            Some(port) => Err(format!("port {port} is in use")),
            None => self
                .hold(r.token, r.protocol, r.range)
                .map_err(|e| match e {
                    HoldError::Port { port, error } => {
                        format!("port {port} could not be held: {error}")
                    }
                    HoldError::NoDescriptors { limit, .. } => {
                        format!("the open-file limit ({limit}) is reached")
                    }
                }),
        };
        if let Err(why) = result {
            tracing::warn!(
                token = %r.token,
                "persistent reservation {}/{} is not held: {why}", r.range, r.protocol
            );
            self.unheld.insert(r.token, why);
        }
    }

    /// Puts a persistent block of a named namespace in place (at the daemon's start or when the
    /// namespace is first used): as [`Enforcer::admit_at_start`], and into the deny layer's map
    /// at once (the daemon's own namespace's blocks go there when `finish_start` reconciles
    /// the map). Write the exclude layer with [`Enforcer::sync_exclude`] after the last.
    pub(crate) fn admit_persistent(&mut self, r: &Reservation) {
        self.admit_at_start(r);
        if let Ok(d) = &mut *self.deny.lock().unwrap()
            && let Err(e) = d.claim(r.token, r.protocol, r.range, self.netns_cookie)
        {
            tracing::error!(error = %e, "deny layer: cannot add {}/{}", r.range, r.protocol);
        }
    }

    /// Writes `ip_local_reserved_ports` now.
    pub(crate) fn sync_exclude(&mut self) {
        self.exclude.sync();
    }

    /// Puts back a block carried over from a previous daemon (live restore): into the exclude
    /// layer, and, for a hold block, with the placeholders the keeper handed over (never
    /// unbound in between). If they are missing (the keeper did not have them: the block was
    /// held by helper processes, or the keeper was new), they are bound afresh; an error says
    /// why that failed, and then nothing is left behind.
    pub(crate) fn adopt(
        &mut self,
        r: &Reservation,
        fds: Vec<OwnedFd>,
        helpers: &[usize],
    ) -> Result<bool, String> {
        if self.deny_active() {
            // The map holds it from `finish_start` on; until then, the predecessor's
            // placeholders (if any) and its pinned map do.
            self.replaced_at_start.extend(fds);
            if !helpers.is_empty() {
                self.helpers.drop_adopted(r.token, helpers);
            }
            self.exclude.add(r.range);
            // No placeholders are kept (the keeper lets go of any copies it has).
            return Ok(false);
        }
        if r.mode == Mode::Hold
            && fds.is_empty()
            && self
                .helpers
                .adopt_block(r.token, helpers, u64::from(r.range.count()))
        {
            // Held all along by helpers taken over with the keeper.
            self.held_remote += u64::from(r.range.count());
            self.exclude.add(r.range);
            return Ok(true);
        }
        if !helpers.is_empty() {
            // Some of its helpers were not taken over: those that were let go of their part,
            // and the block is bound afresh below.
            self.helpers.drop_adopted(r.token, helpers);
        }
        if r.mode == Mode::Hold {
            if fds.len() == usize::from(r.range.count())
                && self.all_held() + fds.len() as u64 <= self.local_budget()
            {
                self.count_held(fds.len() as i64);
                self.holds.insert(r.token, fds);
            } else {
                drop(fds);
                match self.hold(r.token, r.protocol, r.range) {
                    Ok(()) => {}
                    Err(HoldError::Port { port, error }) => {
                        return Err(if error.raw_os_error() == Some(98) {
                            format!(
                                "its placeholders were not carried over, and port {port} was \
                                 taken meanwhile by {}",
                                crate::visibility::describe_holder(r.protocol, port)
                                    .unwrap_or_else(|| "another socket".into())
                            )
                        } else {
                            format!(
                                "its placeholders were not carried over, and binding port \
                                 {port} again failed: {error}"
                            )
                        });
                    }
                    Err(HoldError::NoDescriptors { limit, .. }) => {
                        return Err(format!(
                            "its placeholders were not carried over, and the open-file limit \
                             ({limit}) is reached"
                        ));
                    }
                }
                self.exclude.add(r.range);
                return Ok(false);
            }
        }
        self.exclude.add(r.range);
        Ok(r.mode == Mode::Hold)
    }

    /// Records a socket handed out from `r`'s block by a previous daemon (live restore).
    pub(crate) fn adopt_handed(
        &mut self,
        r: &Reservation,
        port: u16,
        h: &crate::keeper::HandedRec,
    ) {
        let Ok(addr) = h.addr.parse::<IpAddr>() else {
            return;
        };
        self.handed.insert(
            (r.token, port),
            Handed {
                inode: h.inode,
                addr,
                listener: h.listener,
            },
        );
        // Without the shared eBPF programs, a held UDP block's wildcard socket carries a classic
        // steering program: count it against the limit again.
        if r.protocol == Protocol::Udp && self.udp().is_none() && addr.is_unspecified() {
            self.classic_steered.insert((r.token, port));
        }
    }

    /// The keeper's record of the socket handed out on `port` of `token`'s block.
    pub(crate) fn handed_rec(&self, token: Token, port: u16) -> Option<crate::keeper::HandedRec> {
        self.handed
            .get(&(token, port))
            .map(|h| crate::keeper::HandedRec {
                port,
                inode: h.inode,
                addr: h.addr.to_string(),
                listener: h.listener,
            })
    }

    /// The placeholders the daemon itself holds for `token`'s block, if any.
    pub(crate) fn placeholders(&self, token: Token) -> Option<&[OwnedFd]> {
        self.holds.get(&token).map(Vec::as_slice)
    }

    /// The helper processes holding `token`'s block (none: the daemon holds it, or nobody).
    pub(crate) fn helper_indices(&self, token: Token) -> Vec<usize> {
        self.helpers.indices(token)
    }

    /// Helpers started since the last call (index, pid, a copy of the link), for the keeper.
    pub(crate) fn take_new_helpers(&mut self) -> Vec<(usize, u32, OwnedFd)> {
        self.helpers.take_new()
    }

    /// Takes over a previous daemon's helper processes (live restore).
    pub(crate) fn adopt_helpers(&mut self, helpers: Vec<(usize, u32, OwnedFd)>) {
        for (index, pid, sock) in helpers {
            self.helpers.adopt(index, pid, sock);
        }
    }

    /// Tells taken-over helpers to let go of a block that is not carried on.
    pub(crate) fn drop_adopted_block(&mut self, token: Token, indices: &[usize]) {
        self.helpers.drop_adopted(token, indices);
    }

    /// Writes the exclude layer once after the persistent blocks were put back.
    pub(crate) fn finish_start(&mut self, table: &portres_core::Table) {
        self.exclude.sync();
        let reconciled = match &mut *self.deny.lock().unwrap() {
            Ok(d) => d.reconcile(table, self.netns_cookie),
            Err(_) => Ok(()),
        };
        if let Err(e) = reconciled {
            tracing::error!(error = %e, "deny layer: reconciling the map failed; layer off");
            let layer = std::mem::replace(
                &mut *self.deny.lock().unwrap(),
                Err(format!("reconciling its map with the table failed: {e}")),
            );
            // Hold blocks go back to placeholders (bound while the carried-over ones, if any,
            // still hold them), then the half-written layer is removed.
            for r in table.reservations().filter(|r| r.mode == Mode::Hold) {
                if let Err(e) = self.hold(r.token, r.protocol, r.range) {
                    let why = match e {
                        HoldError::Port { port, error } => {
                            format!("port {port} could not be held: {error}")
                        }
                        HoldError::NoDescriptors { limit, .. } => {
                            format!("the open-file limit ({limit}) is reached")
                        }
                    };
                    tracing::warn!(token = %r.token, "{}/{} is not held: {why}", r.range, r.protocol);
                    self.unheld.insert(r.token, why);
                }
            }
            if let Ok(layer) = layer {
                layer.remove();
            }
        }
        self.replaced_at_start.clear();
    }

    /// Names a granted or changed reservation's owner in the deny layer's map.
    pub(crate) fn set_owner(&mut self, r: &Reservation) {
        if let Ok(d) = &mut *self.deny.lock().unwrap() {
            d.set_owner(r);
        }
    }

    /// Gives a runtime block to a cgroup of its own with process `pid` in it (`portres run`).
    pub(crate) fn own_by_cgroup(&mut self, r: &Reservation, pid: u32) -> Result<String, String> {
        match &mut *self.deny.lock().unwrap() {
            Ok(d) => d.own_by_cgroup(r, pid),
            Err(why) => Err(format!("the deny layer is off: {why}")),
        }
    }

    /// Who may bind a block's ports by number, in words (deny layer on), for `who` and `show`.
    pub(crate) fn deny_owner(&self, token: Token) -> Option<String> {
        self.deny
            .lock()
            .unwrap()
            .as_ref()
            .ok()?
            .describe_owner(token)
    }

    /// The deny layer's state for `status`.
    pub(crate) fn deny_info(&self) -> Option<portres_proto::DenyInfo> {
        self.deny.lock().unwrap().as_ref().ok().map(|d| d.info())
    }

    /// Whether run cgroups of ended blocks wait to be removed.
    pub(crate) fn cgroups_pending(&self) -> bool {
        self.deny
            .lock()
            .unwrap()
            .as_ref()
            .is_ok_and(|d| d.cgroups_pending())
    }

    /// A block ended: its placeholders close (handed-out sockets keep their ports until they
    /// close), and it leaves the exclude layer.
    pub(crate) fn retire(&mut self, r: &Reservation) {
        if let Some(fds) = self.holds.remove(&r.token) {
            self.count_held(-(fds.len() as i64));
        }
        if self.helpers.holds(r.token) {
            self.helpers.drop_block(r.token, u64::from(r.range.count()));
            self.held_remote -= u64::from(r.range.count());
            self.remote_inodes.remove(&r.token);
        }
        self.unheld.remove(&r.token);
        if let Ok(d) = &mut *self.deny.lock().unwrap() {
            d.retire(r.token);
        }
        if r.protocol == Protocol::Udp {
            self.classic_steered.retain(|(t, _)| *t != r.token);
        }
        // Sockets handed out from it keep their ports until they close: remember them, so no
        // new block is granted over them in the meantime.
        let protocol = r.protocol;
        let orphans = &mut self.orphans;
        self.handed.retain(|(t, port), h| {
            if *t == r.token {
                orphans.insert((protocol, *port), h.inode);
                false
            } else {
                true
            }
        });
        // The entries leave the sysctl with the next write (the next grant's, or the flush the
        // server schedules within a few milliseconds): a released port staying excluded from
        // automatic selection a little longer harms nobody, and a grant then costs one sysctl
        // write instead of two.
        self.exclude.remove(r.range);
        self.exclude.dirty = true;
    }

    /// Whether released blocks still wait to leave `ip_local_reserved_ports`.
    pub(crate) fn exclude_dirty(&self) -> bool {
        self.exclude.dirty
    }

    /// Whether held blocks granted since the last write still wait to enter
    /// `ip_local_reserved_ports` (see [`Enforcer::write_granted`]).
    pub(crate) fn exclude_unwritten(&self) -> bool {
        self.exclude.unwritten
    }

    /// Writes `ip_local_reserved_ports` if held blocks were granted since the last write: run
    /// right after the replies ready at the same time, so one write covers them all.
    pub(crate) fn write_granted(&mut self) {
        if self.exclude.unwritten {
            self.exclude.sync();
        }
    }

    /// Writes `ip_local_reserved_ports` now (see [`Enforcer::retire`]).
    pub(crate) fn flush_exclude(&mut self) {
        if self.exclude.dirty {
            self.exclude.sync();
        }
        if let Ok(d) = &mut *self.deny.lock().unwrap() {
            d.remove_empty_cgroups();
        }
    }

    /// A socket bound to `addr:port` of `r`'s block for a client, and the address it is bound to
    /// (the IPv4 wildcard when IPv6 is unavailable). Held blocks hand out a socket
    /// that joins the placeholder's group, so the port never becomes free.
    pub(crate) fn hand_over(
        &mut self,
        r: &Reservation,
        port: u16,
        kind: SocketKind,
        addr: IpAddr,
        v6only: Option<bool>,
    ) -> io::Result<(OwnedFd, IpAddr)> {
        let held = self.holds.contains_key(&r.token) || self.helpers.holds(r.token);
        let owner = if held { self.holder_uid } else { None };
        // Without the shared eBPF programs, a UDP socket that joins the placeholder's reuseport
        // group (the wildcard of the placeholder's family) needs a classic steering program:
        // a bounded number of them.
        let steer_classic = held
            && kind.protocol() == Protocol::Udp
            && self.udp().is_none()
            && addr.is_unspecified()
            && (if addr.is_ipv6() {
                self.placeholders_v6 && v6only != Some(true)
            } else {
                !self.placeholders_v6
            });
        if steer_classic
            && !self.classic_steered.contains(&(r.token, port))
            && self.classic_steered.len() >= MAX_CLASSIC_STEERING
        {
            // ENOBUFS: handlers.rs explains the limit.
            return Err(io::Error::from_raw_os_error(105));
        }
        // The common case (every address, dual-stack, of a held block) takes a prepared socket.
        let pool = &mut self.pool[kind.protocol().index()];
        let (fd, bound) = if held
            && addr == IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED)
            && v6only != Some(true)
            && let Some(p) = pool.pop().filter(hold::prepared_is_v6)
        {
            self.count_pool();
            (hold::bind_prepared_for_handover(p, kind, port)?, addr)
        } else {
            match hold::handover_socket(kind, addr, port, held, owner, v6only) {
                Err(e) if e.raw_os_error() == Some(97) && addr.is_unspecified() => {
                    // EAFNOSUPPORT: no IPv6 here; the IPv4 wildcard is the whole machine.
                    let v4 = IpAddr::from([0, 0, 0, 0]);
                    (
                        hold::handover_socket(kind, v4, port, held, owner, None)?,
                        v4,
                    )
                }
                other => (other?, addr),
            }
        };
        if steer_classic {
            portres_sys::bpf::attach_classic_steering(&fd)?;
            self.classic_steered.insert((r.token, port));
        }
        self.record_handed(r.token, port, &fd, kind, bound);
        Ok((fd, bound))
    }

    fn record_handed(
        &mut self,
        token: Token,
        port: u16,
        fd: &OwnedFd,
        kind: SocketKind,
        addr: IpAddr,
    ) {
        if let Ok(inode) = hold::inode(fd.as_fd()) {
            let listener = matches!(kind, SocketKind::Listener { .. });
            self.handed.insert(
                (token, port),
                Handed {
                    inode,
                    addr,
                    listener,
                },
            );
        }
    }

    /// Ports of `r` recorded as handed out whose socket is gone (closed by every holder).
    pub(crate) fn closed_handouts(&mut self, r: &Reservation) -> Vec<u16> {
        if r.handed_out().is_empty() {
            return Vec::new();
        }
        // A listener that stopped listening counts as closed, and its port comes back to the
        // block. A few TCP listeners all still listening are confirmed by a hash lookup each;
        // otherwise one dump per family the handed-out sockets have, of only the kernel's
        // listening hash when all were handed out listening.
        if self.listeners_still_listening(r) {
            return Vec::new();
        }
        let (v4, v6, all_listening) = r
            .handed_out()
            .iter()
            .filter_map(|p| self.handed.get(&(r.token, *p)))
            .fold((false, false, true), |(v4, v6, l), h| {
                (
                    v4 || !h.addr.is_ipv6(),
                    v6 || h.addr.is_ipv6(),
                    l && h.listener,
                )
            });
        let states = if all_listening && r.protocol == Protocol::Tcp {
            portres_sys::sockdiag::LISTENING
        } else {
            portres_sys::sockdiag::ALL_STATES
        };
        let live = match portres_sys::sockdiag::sockets_on_ports_of(
            r.protocol,
            r.range.start(),
            r.range.last(),
            v4,
            v6,
            states,
        ) {
            Ok(s) => s,
            // Cannot see: assume they are all still in use.
            Err(e) => {
                tracing::warn!(error = %e, "sock_diag failed; handed-out ports stay marked");
                return Vec::new();
            }
        };
        let gone: Vec<u16> = r
            .handed_out()
            .iter()
            .copied()
            .filter(|p| match self.handed.get(&(r.token, *p)) {
                Some(h) => !live.iter().any(|s| s.inode == h.inode),
                None => true,
            })
            .collect();
        for p in &gone {
            self.handed.remove(&(r.token, *p));
        }
        gone
    }

    /// Whether `r` handed out at most a few sockets, all TCP listeners, and a lookup finds every
    /// one of them still listening (then none closed). `false` sends the caller to the dump: a
    /// lookup that finds nothing is no proof that the listener closed, because the kernel's
    /// lookup skips listeners bound to a device (`SO_BINDTODEVICE`, which the client may set
    /// after the handover) and obeys `sk_lookup` BPF programs; nor is one that finds another
    /// socket.
    fn listeners_still_listening(&self, r: &Reservation) -> bool {
        const MAX_LOOKUPS: usize = 4;
        r.protocol == Protocol::Tcp
            && r.handed_out().len() <= MAX_LOOKUPS
            && r.handed_out().iter().all(|&port| {
                self.handed
                    .get(&(r.token, port))
                    .filter(|h| h.listener)
                    .is_some_and(|h| {
                        let at = std::net::SocketAddr::new(h.addr, port);
                        matches!(
                            portres_sys::sockdiag::tcp_listener_at(at),
                            Ok(Some(s)) if s.inode == h.inode
                        )
                    })
            })
    }

    /// Inode of the placeholder holding `port` of `token`'s block, if held.
    pub(crate) fn placeholder_inode(&self, r: &Reservation, port: u16) -> Option<u64> {
        let i = usize::from(port.checked_sub(r.range.start())?);
        if let Some(inodes) = self.remote_inodes.get(&r.token) {
            return inodes.get(i).copied();
        }
        let fd = self.holds.get(&r.token)?.get(i)?;
        hold::inode(fd.as_fd()).ok()
    }

    /// Inode of the socket handed out on `port` of `token`'s block, if any.
    pub(crate) fn handed_inode(&self, token: Token, port: u16) -> Option<u64> {
        self.handed.get(&(token, port)).map(|h| h.inode)
    }

    /// Restores the sysctl (at shutdown).
    /// Restores the sysctl and removes the deny layer (at a stop that releases everything).
    /// Another namespace's enforcer only restores its sysctl (the layer is the daemon's).
    pub(crate) fn shutdown(&mut self) {
        self.exclude.restore();
        if !self.home {
            return;
        }
        let deny = std::mem::replace(&mut *self.deny.lock().unwrap(), Err("stopped".into()));
        if let Ok(d) = deny {
            d.remove();
        }
    }

    /// Ports held by placeholders now (in the daemon and in helpers).
    /// Placeholders held by the daemon process itself, in every namespace.
    fn all_held(&self) -> u64 {
        self.all_held.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// `n` more (or fewer) placeholders held by the daemon itself.
    fn count_held(&mut self, n: i64) {
        self.held_ports = self.held_ports.wrapping_add_signed(n);
        self.all_held
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
    }

    pub(crate) fn held_ports(&self) -> u64 {
        self.held_ports + self.held_remote
    }

    /// Status of each layer, with the reason.
    pub(crate) fn layers(&self, sessions: usize) -> Vec<LayerInfo> {
        let hold = if self.deny_active() {
            LayerInfo {
                name: "hold".into(),
                active: true,
                reason: format!(
                    "held blocks need no placeholders while the deny layer is on: its map keeps \
                     every bind but the daemon's own out of them (0 open files per port); {} \
                     ports held by placeholders",
                    self.held_ports + self.held_remote
                ),
            }
        } else {
            self.placeholder_layer(sessions)
        };
        let exclude = match &self.exclude.off {
            None => LayerInfo {
                name: "exclude".into(),
                active: true,
                reason: format!(
                    "{} reserved ports mirrored into net.ipv4.ip_local_reserved_ports: the kernel \
                     never hands them out as ephemeral ports",
                    self.exclude.ours.len()
                ),
            },
            Some(why) => LayerInfo {
                name: "exclude".into(),
                active: false,
                reason: why.clone(),
            },
        };
        let deny = match &*self.deny.lock().unwrap() {
            Ok(d) => LayerInfo {
                name: "deny".into(),
                active: true,
                reason: d.reason(),
            },
            Err(why) => LayerInfo {
                name: "deny".into(),
                active: false,
                reason: format!(
                    "{why}; a process that binds a reserved exclude-mode port by number gets it, \
                     and held ports are protected by placeholders (hold layer)"
                ),
            },
        };
        vec![hold, exclude, deny]
    }

    /// The hold layer's line when placeholders hold the blocks (the deny layer off).
    fn placeholder_layer(&self, sessions: usize) -> LayerInfo {
        let used = self.descriptors_in_use(sessions);
        let room = self.nofile.saturating_sub(used);
        let (helpers, in_helpers) = self.helpers.summary();
        let limits = if helpers == 0 {
            format!(
                "{} ports held; the daemon can hold about {room} more itself (open-file limit \
                 {}), and larger blocks go to helper processes",
                self.held_ports, self.nofile
            )
        } else {
            format!(
                "{} ports held, {in_helpers} of them by {helpers} helper processes (open-file \
                 limit {} each)",
                self.held_ports + self.held_remote,
                self.nofile
            )
        };
        let unheld = if self.unheld.is_empty() {
            String::new()
        } else {
            format!(
                "; {} persistent blocks could not be held (see the log)",
                self.unheld.len()
            )
        };
        let udp = match &*self.udp_programs {
            Ok(_) => "; UDP placeholders share two eBPF programs loaded once (drop, and steering \
                      to a handed-out socket): no program per port"
                .to_string(),
            Err(why) => format!(
                "; UDP placeholders carry no BPF program ({why}): each has the smallest receive \
                 buffer, and each UDP socket handed out beside one gets a classic steering \
                 program of its own, at most {MAX_CLASSIC_STEERING} at once ({} now)",
                self.classic_steered.len()
            ),
        };
        match self.holder_uid {
            Some(h) => LayerInfo {
                name: "hold".into(),
                active: true,
                reason: format!(
                    "{}placeholders owned by holder uid {h}: no other process can bind a held \
                     port or be given one automatically; {limits}{unheld}{udp}",
                    self.holder_warning
                        .as_ref()
                        .map_or(String::new(), |w| format!("{w}. "))
                ),
            },
            None => LayerInfo {
                name: "hold".into(),
                active: true,
                reason: format!(
                    "placeholders owned by uid {} (a per-user daemon cannot use a holder uid): \
                     other users cannot bind held ports, but processes of uid {} that set \
                     SO_REUSEPORT can share them; run the system daemon as root to close \
                     this; {limits}{unheld}{udp}",
                    self.own_uid, self.own_uid
                ),
            },
        }
    }
}
