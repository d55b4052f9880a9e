//! Network namespaces: every client is served in its own port space.
//!
//! A network namespace is a port space of its own (its own bound sockets, its own
//! `ip_local_port_range` and `ip_local_reserved_ports`). The daemon learns each client's from the
//! kernel when the connection opens (the peer's pid from `SO_PEERCRED`, then
//! `/proc/PID/ns/net`, compared by device and inode) and serves the session there: each
//! namespace has a [`State`] of its own (table and enforcer), created when its first client
//! connects — with the dynamic range read in that namespace — and dropped when its last session
//! ends (its runtime reservations end with the sessions), which closes the namespace descriptor
//! the daemon kept. The daemon's own namespace (`home`) is always there; persistent
//! reservations and the keeper (live restore) belong to it.
//!
//! Work for another namespace runs on a thread that has entered it (`setns(2)`, about 1 µs
//! there and back): a [`SpaceGuard`] enters the session's namespace when it is made (under the
//! state lock) and returns to the daemon's own when dropped, so every socket the enforcer makes
//! meanwhile (placeholders, handed-out sockets, bind probes, `sock_diag`) is created in the
//! right namespace, and keeps it for life. A thread that cannot return aborts the daemon rather
//! than serve anyone in the wrong port space.
//!
//! Where the daemon cannot enter a client's namespace (no CAP_SYS_ADMIN over it: a per-user
//! daemon), the connection is refused with a message saying so, never served elsewhere. With
//! `namespaces = "daemon"` (configuration) every client is served in the daemon's namespace.

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, MutexGuard};

use portres_core::{Owner, SessionId, Table, TableConfig};
use portres_proto::{NamespaceStatus, NetnsInfo};
use portres_sys::netns::{NetNs, NetNsId};

use crate::store::Store;
use crate::{Config, State};

/// Most namespaces served at once besides the daemon's own (each costs a table, an enforcer
/// with its sysctl descriptor, a bitmap of 64 KiB and a few prepared sockets).
pub(crate) const MAX_NAMESPACES: usize = 1024;

/// Most namespaces first served for one user who is not an administrator (anyone may make
/// network namespaces with `unshare -Urn`: one user must not take every slot).
pub(crate) const MAX_NAMESPACES_PER_USER: usize = 64;

/// The namespaces served, each with its table and enforcer.
pub(crate) struct Spaces {
    /// The daemon's own namespace.
    pub(crate) home: State,
    home_ns: Arc<NetNs>,
    others: HashMap<NetNsId, Other>,
    /// The namespace of each session served outside the daemon's own.
    session_ns: HashMap<SessionId, NetNsId>,
    /// Whether clients are served in their own namespaces (`namespaces = "client"`).
    per_client: bool,
    /// The daemon's state directory (named namespaces' stores are under `netns/`).
    state_dir: std::path::PathBuf,
    /// The named namespaces whose stored reservations are loaded, by name (one whose
    /// `/run/netns` file was removed since stays reachable by its name while it is served).
    named: HashMap<String, Named>,
    /// What could not be loaded or enforced of named namespaces' reservations, for `status`.
    pub(crate) problems: Vec<String>,
}

/// A named namespace's persistent reservations: their store (`STATE/netns/NAME`) and the
/// namespace they are loaded in.
struct Named {
    store: Arc<Store>,
    key: NetNsId,
}

/// Why a named namespace cannot be used.
pub(crate) enum NamedError {
    /// Nothing was ever reserved for it.
    NotFound(String),
    /// A bad name, a namespace that does not exist or cannot be served.
    Invalid(String),
}

/// The first client of a namespace, for `show`, `status` and the per-user limit.
struct FirstClient {
    pid: u32,
    uid: u32,
    command: Option<String>,
}

/// Another namespace, served while it has sessions.
pub(crate) struct Other {
    state: State,
    ns: Arc<NetNs>,
    sessions: usize,
    /// The first client served there (a process that lives in it), for `show` and `status`.
    pid: u32,
    /// That client's uid (counted against [`MAX_NAMESPACES_PER_USER`]).
    uid: u32,
    command: Option<String>,
}

/// Moves the calling thread back into the daemon's own namespace, or ends the daemon: a thread
/// left elsewhere would make the daemon's sockets in a client's port space.
fn return_home(home: &NetNs) {
    if let Err(e) = home.enter() {
        tracing::error!(error = %e, "cannot return to the daemon's own network namespace; aborting");
        std::process::abort();
    }
}

impl Spaces {
    /// The daemon's own namespace is the one the calling thread is in.
    pub(crate) fn new(
        home: State,
        config: &Config,
        state_dir: &std::path::Path,
    ) -> std::io::Result<Spaces> {
        Ok(Spaces {
            home,
            home_ns: Arc::new(NetNs::current()?),
            others: HashMap::new(),
            session_ns: HashMap::new(),
            per_client: config.per_client_namespaces && !config.deny.all_namespaces,
            named: HashMap::new(),
            problems: Vec::new(),
            state_dir: state_dir.to_path_buf(),
        })
    }

    /// Opens session `id` of process `pid` in its network namespace (creating that
    /// namespace's table and enforcer if it is the first session there). Refuses, saying why,
    /// when the namespace cannot be served.
    pub(crate) fn open_session(
        &mut self,
        id: SessionId,
        owner: Owner,
        pid: u32,
        admin: bool,
        config: &Config,
        pidfd: Option<&std::os::fd::OwnedFd>,
    ) -> Result<(), String> {
        if !self.per_client {
            self.home.table.open_session(id, owner);
            return Ok(());
        }
        if pid == 0 {
            return Err(
                "the daemon cannot see the client's process (it is in a pid namespace the \
                 daemon cannot see into), so it cannot tell which network namespace (port \
                 space) to serve it in; run the client where the daemon can see it, or give \
                 the daemon `namespaces = \"daemon\"` to serve every client in its own"
                    .into(),
            );
        }
        let ns = NetNs::of_pid(pid).map_err(|e| {
            let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
                format!(
                    " (the daemon runs as uid {} and may not look at a process of uid {}: a \
                     per-user daemon serves its own user)",
                    portres_sys::creds::effective_uid(),
                    owner.uid
                )
            } else {
                String::new()
            };
            format!(
                "the daemon cannot read /proc/{pid}/ns/net (the client's network namespace): \
                 {e}{hint}; it cannot tell which port space to serve the client in, so it \
                 serves nothing; use a daemon of your own user or the system daemon, or give \
                 this daemon `namespaces = \"daemon\"` to serve every client in its own \
                 namespace"
            )
        })?;
        // The pid named the client when it connected; a pidfd taken then (SO_PEERPIDFD) that
        // has not exited proves the namespace just read is still that process's.
        if pidfd.is_some_and(portres_sys::process::pidfd_exited) {
            return Err(format!(
                "the client (pid {pid}) exited before the daemon could tell its network \
                 namespace"
            ));
        }
        let key = ns.id();
        if key == self.home_ns.id() {
            self.home.table.open_session(id, owner);
            return Ok(());
        }
        if !self.others.contains_key(&key) {
            let theirs = self.others.values().filter(|o| o.uid == owner.uid).count();
            if !admin && theirs >= MAX_NAMESPACES_PER_USER {
                return Err(format!(
                    "uid {} already has {theirs} network namespaces served by this daemon, the \
                     most for a user who is not an administrator; end sessions in some of them \
                     first",
                    owner.uid
                ));
            }
            // A named namespace with stored reservations keeps its sysctl journal with them,
            // and they apply from now on.
            let name = self.stored_name_of(key);
            let journal = name.as_deref().map(|n| named_store_dir(&self.state_dir, n));
            let first = FirstClient {
                pid,
                uid: owner.uid,
                command: owner.command.clone(),
            };
            self.serve(ns, config, journal.as_deref(), first)?;
            if let Some(name) = name
                && let Err(why) = self.attach_store(&name, key)
            {
                self.problems
                    .push(format!("network namespace {name}: not enforced: {why}"));
            }
        }
        let other = self.others.get_mut(&key).expect("inserted");
        other.sessions += 1;
        other.state.table.open_session(id, owner);
        self.session_ns.insert(id, key);
        Ok(())
    }

    /// The `ip netns` name of namespace `key`, if reservations were ever made for that name
    /// (its store exists) and they are not loaded yet.
    fn stored_name_of(&self, key: NetNsId) -> Option<String> {
        portres_sys::netns::named()
            .into_iter()
            .find(|(name, id)| {
                *id == key
                    && !self.named.contains_key(name)
                    && named_store_dir(&self.state_dir, name).is_dir()
            })
            .map(|(name, _)| name)
    }

    /// Serves namespace `ns` from now on: its table and enforcer, made inside it.
    fn serve(
        &mut self,
        ns: NetNs,
        config: &Config,
        journal_dir: Option<&std::path::Path>,
        first: FirstClient,
    ) -> Result<NetNsId, String> {
        if self.others.len() >= MAX_NAMESPACES {
            return Err(format!(
                "the daemon already serves {MAX_NAMESPACES} other network namespaces, its most; \
                 try again when some have ended"
            ));
        }
        let key = ns.id();
        let state = self.build_in(&ns, config, journal_dir)?;
        tracing::info!(
            netns = key.ino,
            pid = first.pid,
            "serving a new network namespace (net:[{}])",
            key.ino
        );
        self.others.insert(
            key,
            Other {
                state,
                ns: Arc::new(ns),
                sessions: 0,
                pid: first.pid,
                uid: first.uid,
                command: first.command,
            },
        );
        Ok(key)
    }

    /// A table and enforcer made inside `ns`.
    fn build_in(
        &mut self,
        ns: &NetNs,
        config: &Config,
        journal_dir: Option<&std::path::Path>,
    ) -> Result<State, String> {
        if let Err(e) = ns.enter() {
            let why = if e.raw_os_error() == Some(1) {
                format!(
                    "the daemon (uid {}) may not enter it: entering a network namespace needs \
                     CAP_SYS_ADMIN over it, which a per-user daemon does not have; use the \
                     system daemon (root), or run the client in the daemon's own namespace",
                    portres_sys::creds::effective_uid()
                )
            } else {
                format!("setns(2) failed: {e}")
            };
            return Err(format!(
                "the client is in network namespace net:[{}], another port space than the \
                 daemon's (net:[{}]), and {why}; nothing was reserved",
                ns.id().ino,
                self.home_ns.id().ino
            ));
        }
        let dynamic_range = match config.dynamic_range {
            Some(r) => Ok(r),
            None => portres_sys::ports::ip_local_port_range(),
        };
        let enforcer = self.home.enforcer.for_this_namespace(journal_dir);
        return_home(&self.home_ns);
        let dynamic_range = dynamic_range.map_err(|e| {
            format!(
                "cannot read the dynamic port range of the client's network namespace \
                 net:[{}]: {e}",
                ns.id().ino
            )
        })?;
        Ok(State {
            table: Table::new(TableConfig {
                dynamic_range,
                runtime_quota: config.runtime_quota,
            }),
            enforcer,
            keeper: None,
        })
    }

    /// After session `id` ended (its reservations retired): a namespace left with no session
    /// and no reservation is dropped, closing everything the daemon kept there.
    pub(crate) fn session_closed(&mut self, id: SessionId) {
        let Some(key) = self.session_ns.remove(&id) else {
            return;
        };
        let Some(other) = self.others.get_mut(&key) else {
            return;
        };
        other.sessions -= 1;
        self.drop_if_idle(Some(key));
    }

    /// Drops namespace `at` if it has no session and no reservation (e.g. its last persistent
    /// reservation was deleted).
    pub(crate) fn drop_if_idle(&mut self, at: Option<NetNsId>) {
        let Some(key) = at else { return };
        let Some(other) = self.others.get(&key) else {
            return;
        };
        if other.sessions == 0 && other.state.table.is_empty() {
            let mut other = self.others.remove(&key).expect("present");
            // Its store is let go too (read again if it is used again).
            self.named.retain(|_, n| n.key != key);
            // Its released blocks leave its sysctl now (through the descriptor opened there).
            other.state.enforcer.shutdown();
            tracing::info!(
                netns = key.ino,
                "network namespace net:[{}] has no session left: no longer served",
                key.ino
            );
        }
    }

    /// The namespace named `name` (`ip netns`: `/run/netns/NAME`), served from now on if it was
    /// not (its persistent reservations, kept in `STATE/netns/NAME`, loaded into its table);
    /// with `create`, its store is created if it has none. Refused, saying why, for a name
    /// that is not a network namespace, or is the daemon's own.
    pub(crate) fn named(
        &mut self,
        name: &str,
        create: bool,
        config: &Config,
    ) -> Result<(NetNsId, Arc<Store>), NamedError> {
        check_name(name).map_err(NamedError::Invalid)?;
        if config.deny.all_namespaces {
            return Err(NamedError::Invalid(
                "the deny layer is keyed without namespaces (deny_all_namespaces = true): a \
                 reservation for one namespace would hold in all of them; turn that off to \
                 reserve per namespace"
                    .into(),
            ));
        }
        let path = std::path::Path::new("/run/netns").join(name);
        let dir = named_store_dir(&self.state_dir, name);
        if !create && !dir.exists() {
            return Err(NamedError::NotFound(format!(
                "none was ever made for network namespace {:?}",
                portres_core::printable(name)
            )));
        }
        let ns = match NetNs::open(&path) {
            Ok(ns) => ns,
            // `ip netns del` removed the name; the daemon's reservations keep the namespace
            // alive until they are deleted.
            Err(_) if self.named.contains_key(name) => {
                let n = &self.named[name];
                return Ok((n.key, n.store.clone()));
            }
            Err(e) => {
                let kept = if dir.exists() {
                    format!(
                        "; the persistent reservations made for it are kept in {} and apply \
                         again once it exists (on first use, or at the daemon's next start)",
                        dir.display()
                    )
                } else {
                    String::new()
                };
                return Err(NamedError::Invalid(format!(
                    "there is no network namespace named {name:?} ({}: {e}); create it with `ip \
                     netns add {name}`{kept}",
                    path.display()
                )));
            }
        };
        let key = ns.id();
        if key == self.home_ns.id() {
            return Err(NamedError::Invalid(format!(
                "{} is the daemon's own network namespace: leave out the namespace name",
                path.display()
            )));
        }
        // Before its enforcer, which keeps its sysctl journal there.
        std::fs::create_dir_all(&dir)
            .map_err(|e| NamedError::Invalid(format!("cannot create {}: {e}", dir.display())))?;
        if !self.others.contains_key(&key) {
            let first = FirstClient {
                pid: 0,
                uid: 0,
                command: None,
            };
            self.serve(ns, config, Some(&dir), first).map_err(|why| {
                NamedError::Invalid(
                    why.replace("the client is in", &format!("{} is", path.display())),
                )
            })?;
        }
        let store = self.attach_store(name, key).map_err(|why| {
            self.drop_if_idle(Some(key));
            NamedError::Invalid(why)
        })?;
        Ok((key, store))
    }

    /// Makes `name`'s stored reservations hold in namespace `key` (served already): its store
    /// opened and its records loaded the first time; moved there from another namespace when
    /// the name has been given to a new one (`ip netns del` then `add` while the daemon ran).
    fn attach_store(&mut self, name: &str, key: NetNsId) -> Result<Arc<Store>, String> {
        if let Some(n) = self.named.get(name) {
            let (old, store) = (n.key, n.store.clone());
            if old != key {
                self.move_persistent(old, key, name);
                self.named.get_mut(name).expect("present").key = key;
            }
            return Ok(store);
        }
        let dir = named_store_dir(&self.state_dir, name);
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let (store, records) = Store::open(&dir).map_err(|e| e.to_string())?;
        let store = Arc::new(store);
        self.load_records(key, name, &store, records);
        self.named.insert(
            name.to_string(),
            Named {
                store: store.clone(),
                key,
            },
        );
        Ok(store)
    }

    /// Moves every persistent reservation of namespace `from` to `to` (the name `name` was
    /// given to another namespace); `from` is dropped if nothing else keeps it.
    fn move_persistent(&mut self, from: NetNsId, to: NetNsId, name: &str) {
        if !self.others.contains_key(&from) {
            return;
        }
        let moved: Vec<portres_core::Reservation> = self.with(Some(from), |st| {
            let tokens: Vec<portres_core::Token> = st
                .table
                .reservations()
                .filter(|r| r.is_persistent())
                .map(|r| r.token)
                .collect();
            let mut out = Vec::new();
            for t in tokens {
                if let Some(r) = st.table.remove_persistent(t) {
                    st.retire(&r);
                    out.push(r);
                }
            }
            st.enforcer.flush_exclude();
            out
        });
        self.drop_if_idle(Some(from));
        tracing::warn!(
            "network namespace {name} is now net:[{}] (it was net:[{}]): its {} persistent \
             reservations move there",
            to.ino,
            from.ino,
            moved.len()
        );
        self.with(Some(to), |st| {
            for r in moved {
                if st.table.restore_persistent(r.clone()).is_ok() {
                    st.enforcer.admit_persistent(&r);
                    st.keep(&r, true);
                }
            }
            st.enforcer.sync_exclude();
        });
    }

    /// Puts the records read from `name`'s store into namespace `key`'s table and kernel.
    fn load_records(
        &mut self,
        key: NetNsId,
        name: &str,
        store: &Store,
        records: Vec<crate::store::StoredReservation>,
    ) {
        let before = format!("network namespace {name}:");
        self.problems.retain(|p| !p.starts_with(&before));
        let mut problems = Vec::new();
        self.with(Some(key), |st| {
            for rec in &records {
                let r = match rec.to_reservation() {
                    Ok(r) => r,
                    Err(why) => {
                        problems.push(format!(
                            "{}: record {}: {why}",
                            store.path().display(),
                            rec.token
                        ));
                        continue;
                    }
                };
                if let Err(e) = st.table.restore_persistent(r.clone()) {
                    problems.push(format!("{}: {}", store.path().display(), e.message));
                    continue;
                }
                st.enforcer.admit_persistent(&r);
                st.keep(&r, true);
            }
            st.enforcer.sync_exclude();
        });
        if !records.is_empty() {
            tracing::info!(
                netns = key.ino,
                "network namespace {name} (net:[{}]): {} persistent reservations enforced",
                key.ino,
                records.len() - problems.len()
            );
        }
        for p in &problems {
            tracing::error!("network namespace {name}: {p}");
        }
        self.problems
            .extend(problems.into_iter().map(|p| format!("{before} {p}")));
    }

    /// At start: every named namespace with a store in `STATE/netns` is served, its
    /// reservations enforced; what cannot be is logged and listed in `status`.
    pub(crate) fn load_named(&mut self, config: &Config) {
        let Ok(dir) = std::fs::read_dir(self.state_dir.join("netns")) else {
            return;
        };
        for e in dir.flatten() {
            let Some(name) = e.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if let Err(NamedError::Invalid(why) | NamedError::NotFound(why)) =
                self.named(&name, false, config)
            {
                tracing::warn!(
                    "persistent reservations of network namespace {name} are not enforced: {why}"
                );
                self.problems
                    .push(format!("network namespace {name}: not enforced: {why}"));
            }
        }
    }

    /// The namespace session `id` is served in (`None`: the daemon's own).
    pub(crate) fn of_session(&self, id: SessionId) -> Option<NetNsId> {
        self.session_ns.get(&id).copied()
    }

    /// The namespace descriptor of `at` (`None`: the daemon's own), to enter from another
    /// thread.
    pub(crate) fn netns(&self, at: Option<NetNsId>) -> Arc<NetNs> {
        at.and_then(|k| self.others.get(&k))
            .map_or_else(|| self.home_ns.clone(), |o| o.ns.clone())
    }

    /// The daemon's own namespace's descriptor.
    pub(crate) fn home_netns(&self) -> Arc<NetNs> {
        self.home_ns.clone()
    }

    /// The state of `at`.
    pub(crate) fn get(&self, at: Option<NetNsId>) -> &State {
        match at {
            Some(k) => &self.others[&k].state,
            None => &self.home,
        }
    }

    fn get_mut(&mut self, at: Option<NetNsId>) -> &mut State {
        match at {
            Some(k) => &mut self.others.get_mut(&k).expect("served").state,
            None => &mut self.home,
        }
    }

    /// Runs `f` on every namespace's state, inside that namespace.
    pub(crate) fn each(&mut self, mut f: impl FnMut(&mut State)) {
        f(&mut self.home);
        for o in self.others.values_mut() {
            enter(&o.ns);
            f(&mut o.state);
            return_home(&self.home_ns);
        }
    }

    /// Runs `f` on `at`'s state, inside that namespace.
    pub(crate) fn with<T>(&mut self, at: Option<NetNsId>, f: impl FnOnce(&mut State) -> T) -> T {
        let Some(k) = at else {
            return f(&mut self.home);
        };
        let o = self.others.get_mut(&k).expect("served");
        enter(&o.ns);
        let out = f(&mut o.state);
        return_home(&self.home_ns);
        out
    }

    /// Every namespace's state (no namespace entered: for reading).
    pub(crate) fn all(&self) -> impl Iterator<Item = &State> {
        std::iter::once(&self.home).chain(self.others.values().map(|o| &o.state))
    }

    /// Sessions open in every namespace.
    pub(crate) fn session_count(&self) -> usize {
        self.all().map(|s| s.table.session_count()).sum()
    }

    /// The namespaces served (the daemon's own first), in `status`.
    pub(crate) fn status(&self) -> Vec<NamespaceStatus> {
        let names = portres_sys::netns::named();
        let mut v: Vec<NamespaceStatus> = std::iter::once(None)
            .chain(self.others.keys().copied().map(Some))
            .map(|at| {
                let t = &self.get(at).table;
                NamespaceStatus {
                    netns: self.info_with(at, &names),
                    sessions: t.session_count() as u64,
                    reservations: t.len() as u64,
                    ports_reserved: t.counts().ports_reserved,
                }
            })
            .collect();
        v[1..].sort_by_key(|n| n.netns.inode);
        v
    }

    /// How `at` is named in replies.
    pub(crate) fn info(&self, at: Option<NetNsId>) -> NetnsInfo {
        self.info_with(at, &portres_sys::netns::named())
    }

    fn info_with(&self, at: Option<NetNsId>, names: &[(String, NetNsId)]) -> NetnsInfo {
        let id = at.unwrap_or(self.home_ns.id());
        let other = at.and_then(|k| self.others.get(&k));
        NetnsInfo {
            inode: id.ino,
            daemon: at.is_none(),
            name: names
                .iter()
                .find(|(_, n)| *n == id)
                .map(|(name, _)| name.clone()),
            pid: other.map(|o| o.pid).filter(|&p| p != 0),
            command: other
                .and_then(|o| o.command.clone())
                .map(crate::visibility::cap_command),
        }
    }

    /// Every served namespace (`None`: the daemon's own first).
    pub(crate) fn keys(&self) -> Vec<Option<NetNsId>> {
        std::iter::once(None)
            .chain(self.others.keys().copied().map(Some))
            .collect()
    }

    /// `"client"` or `"daemon"`.
    pub(crate) fn mode(&self) -> &'static str {
        if self.per_client { "client" } else { "daemon" }
    }

    /// At a stop: every other namespace's enforcer restores its sysctl (their blocks end with
    /// the daemon: live restore carries only the daemon's own namespace's).
    pub(crate) fn shutdown_others(&mut self) {
        for (key, mut o) in self.others.drain() {
            let n = o.state.table.len();
            // Out of the deny layer's map too (it outlives the daemon when live restore is on);
            // a named namespace's persistent ones are put back by the next start.
            let all: Vec<portres_core::Reservation> =
                o.state.table.reservations().cloned().collect();
            for r in &all {
                o.state.enforcer.retire(r);
            }
            if n > 0 {
                tracing::info!(
                    netns = key.ino,
                    "stopping: {n} reservations in network namespace net:[{}] end",
                    key.ino
                );
            }
            o.state.enforcer.shutdown();
        }
        self.session_ns.clear();
    }
}

/// Where the persistent reservations of namespace `name` are kept.
fn named_store_dir(state_dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    state_dir.join("netns").join(name)
}

/// An `ip netns` name portres accepts: letters, digits, `-`, `_`, `.`, not starting with `.`,
/// at most 64 bytes (it names a directory of the state directory).
fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{:?} is not a network namespace name portres accepts: use letters, digits, '-', \
             '_' and '.' (not first), at most 64 characters",
            portres_core::printable(name)
        ))
    }
}

fn enter(ns: &NetNs) {
    if let Err(e) = ns.enter() {
        // It was entered when the namespace was first served, with the same privileges.
        panic!("cannot enter network namespace net:[{}]: {e}", ns.id().ino);
    }
}

/// The state of one namespace under the state lock, with the calling thread inside that
/// namespace while it lives (see the module documentation).
pub(crate) struct SpaceGuard<'a> {
    spaces: MutexGuard<'a, Spaces>,
    at: Option<NetNsId>,
}

impl<'a> SpaceGuard<'a> {
    /// Enters `at` (`None`: the daemon's own namespace, nothing to enter).
    pub(crate) fn new(spaces: MutexGuard<'a, Spaces>, at: Option<NetNsId>) -> SpaceGuard<'a> {
        if let Some(k) = at {
            enter(&spaces.others[&k].ns);
        }
        SpaceGuard { spaces, at }
    }

    /// The namespace this guard is in.
    pub(crate) fn at(&self) -> Option<NetNsId> {
        self.at
    }

    /// All the namespaces (e.g. for `status`).
    pub(crate) fn spaces(&self) -> &Spaces {
        &self.spaces
    }
}

impl Deref for SpaceGuard<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        self.spaces.get(self.at)
    }
}

impl DerefMut for SpaceGuard<'_> {
    fn deref_mut(&mut self) -> &mut State {
        let at = self.at;
        self.spaces.get_mut(at)
    }
}

impl Drop for SpaceGuard<'_> {
    fn drop(&mut self) {
        if self.at.is_some() {
            return_home(&self.spaces.home_ns);
        }
    }
}

/// Runs `f` on the calling thread inside `ns` (a thread of the blocking pool, e.g. for `who`'s
/// `sock_diag` dump), then returns it to the daemon's own namespace `home` (also when `f`
/// panics: pool threads are reused).
pub(crate) fn run_in<T>(ns: &NetNs, home: &NetNs, f: impl FnOnce() -> T) -> T {
    struct Back<'a>(&'a NetNs);
    impl Drop for Back<'_> {
        fn drop(&mut self) {
            return_home(self.0);
        }
    }
    if ns.id() == home.id() {
        return f();
    }
    enter(ns);
    let _back = Back(home);
    f()
}

#[cfg(test)]
mod tests {
    use super::check_name;

    #[test]
    fn namespace_names_that_could_leave_the_state_directory_are_refused() {
        for good in ["a", "ci-runner_7", "x.y", &"n".repeat(64)] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            ".hidden",
            "sp ace",
            "é",
            &"n".repeat(65),
        ] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
