//! The portres daemon: accepts client sessions on a Unix socket, authorises every request from
//! the peer's kernel credentials, applies it to the reservation table (`portres-core`), and keeps
//! persistent reservations in a durable store.
//!
//! Like mini-redis, [`Daemon::run`] takes a listener that is already bound, and a shutdown future,
//! so tests and the binary decide where it listens and when it stops.
//!
//! # Layout
//! - [`config`]: the TOML configuration (administrators, quota, dynamic range).
//! - [`store`]: the redb store of persistent reservations, checked when opened.
//! - [`journal`]: the append-only journal beside it, from which a damaged store is restored.
//! - `server`: the accept loop, sessions, framing.
//! - `handlers`: one function per request, from wire message to table operation and back.
//! - `stream`: streamed replies (rows made on the blocking pool, packed into frames).
//! - `visibility`: who has a port (sockets, processes), in words.
//! - [`holder`]: placeholder-holding helper processes for blocks beyond the descriptor budget.
//! - [`deny`]: the deny layer: cgroup bind programs and their map of reserved ports.
//! - `enforce`: the kernel side (docs/behaviour.md §3): placeholders, `ip_local_reserved_ports`,
//!   handover.
//! - [`keeper`]: live restore, the process that keeps runtime reservations across restarts.
//! - `namespaces`: a table and enforcer per network namespace, each client served in its own.
//! - [`portserver`]: Google's portserver protocol (portpicker's `PORTSERVER_ADDRESS`).
//! - `cluster` (feature `cluster`): cluster mode on etcd, each member mirroring the cluster's
//!   reservations into its own table.
//! - `restore`: carrying a predecessor's reservations on at start, and watching their owners.

#[cfg(feature = "cluster")]
mod cluster;
pub mod config;
mod declared;
pub mod deny;
mod enforce;
mod handlers;
pub mod holder;
pub mod journal;
pub mod keeper;
mod metrics;
mod namespaces;
pub mod portserver;
mod restore;
mod server;
pub mod store;
mod stream;
mod visibility;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use portres_core::{PortRange, Table, TableConfig};

pub use config::{Config, ConfigError};
pub use store::{Store, StoreError};

/// Where the daemon lives and in which scope (for status and logs).
#[derive(Debug, Clone)]
pub struct Placement {
    /// `"system"` (root, socket open to every local user) or `"user"` (private to one user).
    pub scope: String,
    /// The socket it listens on.
    pub socket: PathBuf,
    /// The socket was passed by the service manager (socket activation): it accepts
    /// connections whether or not a daemon runs, so "does something answer on it" says nothing
    /// about a daemon (the keeper does not ask it).
    pub activated: bool,
    /// Its state directory (store, log).
    pub state_dir: PathBuf,
}

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The store failed to open or load.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The dynamic range could not be read and none was configured.
    #[error(
        "cannot read the kernel's dynamic port range (/proc/sys/net/ipv4/ip_local_port_range): \
         {0}; set dynamic_range in the configuration"
    )]
    DynamicRange(std::io::Error),
    /// The daemon's own network namespace could not be opened (`/proc/thread-self/ns/net`).
    #[error("cannot open the daemon's network namespace (/proc/thread-self/ns/net): {0}")]
    Namespace(std::io::Error),
    /// The store holds something the table refuses (overlapping or duplicate records).
    #[error("store {path}: {why}")]
    Inconsistent {
        /// The database file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// `[cluster]` is configured but this build has no cluster mode.
    #[error(
        "the configuration has [cluster], but this portres was built without cluster mode; \
         build it with `cargo build --release --features cluster` (needs protoc), or remove \
         [cluster]"
    )]
    NoClusterMode,
}

/// One network namespace's table and the kernel's enforcement of it, changed together; and
/// (the daemon's own namespace) the keeper's copy.
pub(crate) struct State {
    pub(crate) table: Table,
    pub(crate) enforcer: enforce::Enforcer,
    /// The link to the keeper (live restore), if it is on.
    pub(crate) keeper: Option<keeper::Link>,
}

impl State {
    /// Tells the keeper about a new or changed reservation; its placeholders go with it if
    /// `copy_now`, else once it has lived `keeper::COPY_AFTER` (a runtime grant: most short-lived
    /// blocks never cost the keeper anything).
    /// Also names its owner in the deny layer's map.
    pub(crate) fn keep(&mut self, r: &portres_core::Reservation, copy_now: bool) {
        self.enforcer.set_owner(r);
        let Some(k) = &mut self.keeper else { return };
        if let (Some(session), Some(pid)) = (r.session(), r.owner.pid) {
            k.owner(session, pid);
        }
        for (index, pid, link) in self.enforcer.take_new_helpers() {
            k.helper(index, pid, &link);
        }
        k.put(
            r,
            self.enforcer.placeholders(r.token),
            self.enforcer.helper_indices(r.token),
            copy_now,
        );
    }

    /// Gives the keeper the placeholders of the held blocks older than `older_than` (all of
    /// them if `None`).
    pub(crate) fn copy_to_keeper(&mut self, older_than: Option<std::time::Duration>) {
        let State {
            enforcer, keeper, ..
        } = self;
        if let Some(k) = keeper {
            k.copy_due(older_than, |t| {
                portres_core::Token::new(t).and_then(|t| enforcer.placeholders(t))
            });
        }
    }

    /// A reservation ended: its placeholders close here and in the keeper, and it leaves the
    /// exclude layer. Call [`State::sync_keeper`] before replying, so that the ports are free.
    pub(crate) fn retire(&mut self, r: &portres_core::Reservation) {
        self.enforcer.retire(r);
        if let Some(k) = &mut self.keeper {
            k.drop_token(r.token.get());
        }
    }

    /// Waits until the keeper has closed its copies of the placeholders retired so far.
    pub(crate) fn sync_keeper(&mut self) {
        if let Some(k) = &mut self.keeper {
            k.sync();
        }
    }
}

/// State shared by every session.
struct Shared {
    /// A `std` mutex: it is never held across an `.await`, and every operation under it is
    /// short (the store is written outside it; the one exception is `apply`, rare, which keeps
    /// it through its store write so that nothing sees a change that may still be undone). Lock it through [`Shared::space`] and
    /// [`Shared::home`], which enter the namespace served.
    state: Mutex<namespaces::Spaces>,
    /// The store; written from the blocking pool, one writer at a time (see `persist_lock`).
    store: Arc<Store>,
    /// Serialises persistent create/delete so the store and the table change in the same order.
    persist_lock: tokio::sync::Mutex<()>,
    config: Config,
    placement: Placement,
    dynamic_source: String,
    started: Instant,
    own_uid: u32,
    /// Most sessions open at once since the heap was last trimmed.
    session_peak: std::sync::atomic::AtomicUsize,
    /// A write of released blocks to `ip_local_reserved_ports` is scheduled.
    flush_scheduled: std::sync::atomic::AtomicBool,
    /// Writing newly held blocks to the sysctl and refilling the prepared placeholder sockets
    /// is scheduled (to run right after the replies being written).
    soon_scheduled: std::sync::atomic::AtomicBool,
    /// Test hooks from the environment (see [`Checks`]).
    checks: Checks,
    /// Signalled when a session ends (a descriptor came free).
    session_ended: tokio::sync::Notify,
    /// Times accepting paused for lack of descriptors.
    accept_paused: std::sync::atomic::AtomicU64,
    /// What was restored at start (for `status`).
    restore: Mutex<portres_proto::RestoreInfo>,
    /// Owners of the sessions carried over from a predecessor, to watch (taken by `run`).
    restored_owners: Mutex<Vec<(portres_core::SessionId, std::os::fd::OwnedFd)>>,
    /// Copying aged placeholders to the keeper is scheduled.
    copy_scheduled: std::sync::atomic::AtomicBool,
    /// Signalled by a `shutdown` request.
    stop: tokio::sync::Notify,
    /// The `shutdown` request asked to release everything.
    release_on_stop: std::sync::atomic::AtomicBool,
    /// A `shutdown` request was granted (the daemon stops once it is answered).
    stop_requested: std::sync::atomic::AtomicBool,
    /// The processes the portserver endpoint granted ports to.
    grantees: portserver::Grantees,
    /// The portserver endpoint, when one was asked for.
    portserver: Option<portserver::Endpoint>,
    /// What went wrong at the last application of the reservation files, if anything.
    declared_problem: Mutex<Option<String>>,
    /// The metrics endpoint: where it is served, or why it is not.
    metrics_endpoint: Option<Result<String, String>>,
    /// Cluster mode's link to the cluster, when `[cluster]` is configured.
    #[cfg(feature = "cluster")]
    cluster: Option<Arc<cluster::Cluster>>,
}

impl Shared {
    /// The state of the namespace session `session` is served in, under the lock, with this
    /// thread inside that namespace until the guard drops. No `spawn_blocking` while it
    /// lives (a new pool thread would start in that namespace).
    fn space(&self, session: portres_core::SessionId) -> namespaces::SpaceGuard<'_> {
        let all = self.state.lock().unwrap();
        let at = all.of_session(session);
        namespaces::SpaceGuard::new(all, at)
    }

    /// The state of namespace `at` (`None`: the daemon's own), entered until the guard drops.
    /// `at` must be served (e.g. it holds the reservation being worked on).
    fn space_at(&self, at: Option<portres_sys::netns::NetNsId>) -> namespaces::SpaceGuard<'_> {
        namespaces::SpaceGuard::new(self.state.lock().unwrap(), at)
    }

    /// The daemon's own namespace's state (persistent reservations, the keeper).
    fn home(&self) -> namespaces::SpaceGuard<'_> {
        namespaces::SpaceGuard::new(self.state.lock().unwrap(), None)
    }

    /// Records (or clears) the problem of the last application of the reservation files.
    fn set_declared_problem(&self, why: Option<String>) {
        *self.declared_problem.lock().unwrap() = why;
    }

    /// Every namespace's state.
    fn spaces(&self) -> std::sync::MutexGuard<'_, namespaces::Spaces> {
        self.state.lock().unwrap()
    }
}

/// Checks and fault injection for tests, from the environment, read once at start:
/// `PORTRES_CHECK_INVARIANTS=1` checks the table's invariants after every request (a violation
/// panics, which ends the daemon); `PORTRES_FAILPOINT` is a comma-separated list of
/// `panic-on:OP` (panic when a request `OP`, e.g. `status`, arrives, to test what a panic does),
/// `no-ebpf` (hold UDP as a daemon that may not load eBPF does), `protocol:N` (speak only
/// protocol version N, as a daemon of another version would) and `keeper-copy-after:MS` (copy
/// held blocks' placeholders to the keeper after MS milliseconds instead of
/// `keeper::COPY_AFTER`), and `apply-store-fails` (an `apply`'s store write fails, to test that
/// it is undone). Not for production.
#[derive(Debug)]
pub(crate) struct Checks {
    pub(crate) invariants: bool,
    pub(crate) panic_on: Option<String>,
    /// Protocol versions served.
    pub(crate) versions: std::ops::RangeInclusive<u32>,
    /// How old a held block is when its placeholders go to the keeper.
    pub(crate) copy_after: std::time::Duration,
    /// An `apply`'s store write fails.
    pub(crate) apply_store_fails: bool,
}

impl Checks {
    fn from_env() -> Checks {
        let failpoints = std::env::var("PORTRES_FAILPOINT").unwrap_or_default();
        let value = |name: &str| {
            failpoints
                .split(',')
                .find_map(|f| f.strip_prefix(name)?.strip_prefix(':'))
                .map(str::to_string)
        };
        Checks {
            invariants: std::env::var("PORTRES_CHECK_INVARIANTS").is_ok_and(|v| v == "1"),
            panic_on: value("panic-on"),
            versions: value("protocol")
                .and_then(|n| n.parse::<u32>().ok())
                .map_or(portres_proto::MIN_VERSION..=portres_proto::VERSION, |n| {
                    n..=n
                }),
            copy_after: value("keeper-copy-after")
                .and_then(|ms| ms.parse::<u64>().ok())
                .map_or(keeper::COPY_AFTER, std::time::Duration::from_millis),
            apply_store_fails: failpoints.split(',').any(|f| f == "apply-store-fails"),
        }
    }
}

/// A daemon ready to serve: configuration read, store opened, persistent reservations loaded.
pub struct Daemon {
    shared: Arc<Shared>,
    /// The portserver socket, bound ([`Daemon::serve_portserver`]).
    portserver: Option<std::os::unix::net::UnixListener>,
    /// The metrics endpoint's socket, bound ([`Daemon::serve_metrics`]).
    metrics: Option<std::net::TcpListener>,
}

impl Daemon {
    /// Opens the store in `placement.state_dir` and loads the table.
    pub fn open(config: Config, placement: Placement) -> Result<Daemon, StartError> {
        let (dynamic_range, dynamic_source): (PortRange, String) = match config.dynamic_range {
            Some(r) => (r, "configuration".into()),
            None => (
                portres_sys::ports::ip_local_port_range().map_err(StartError::DynamicRange)?,
                "kernel (net.ipv4.ip_local_port_range)".into(),
            ),
        };
        #[cfg(not(feature = "cluster"))]
        if config.cluster.is_some() {
            return Err(StartError::NoClusterMode);
        }
        #[cfg(feature = "cluster")]
        let cluster = config
            .cluster
            .clone()
            .map(|c| Arc::new(cluster::Cluster::new(c, &placement.state_dir)));
        let (store, records) = Store::open(&placement.state_dir)?;
        let mut state = State {
            table: Table::new(TableConfig {
                dynamic_range,
                runtime_quota: config.runtime_quota,
            }),
            enforcer: enforce::Enforcer::new(&placement.state_dir, config.holder_uid, config.deny),
            keeper: None,
        };
        let restored = restore::at_start(&mut state, &config, &placement, &store, records)?;
        tracing::info!(
            reservations = state.table.len(),
            runtime_restored = restored.info.kept,
            dynamic_range = %dynamic_range,
            store = %store.path().display(),
            "table loaded"
        );
        server::sessions_from(restored.next_session);
        let mut spaces = namespaces::Spaces::new(state, &config, &placement.state_dir)
            .map_err(StartError::Namespace)?;
        // Persistent reservations of named namespaces (`persistent add --netns NAME`).
        spaces.load_named(&config);
        Ok(Daemon {
            shared: Arc::new(Shared {
                state: Mutex::new(spaces),
                store: Arc::new(store),
                persist_lock: tokio::sync::Mutex::new(()),
                config,
                placement,
                dynamic_source,
                started: Instant::now(),
                own_uid: portres_sys::creds::effective_uid(),
                session_peak: std::sync::atomic::AtomicUsize::new(0),
                flush_scheduled: std::sync::atomic::AtomicBool::new(false),
                soon_scheduled: std::sync::atomic::AtomicBool::new(false),
                checks: Checks::from_env(),
                session_ended: tokio::sync::Notify::new(),
                accept_paused: std::sync::atomic::AtomicU64::new(0),
                restore: Mutex::new(restored.info),
                restored_owners: Mutex::new(restored.owners),
                copy_scheduled: std::sync::atomic::AtomicBool::new(false),
                stop: tokio::sync::Notify::new(),
                release_on_stop: std::sync::atomic::AtomicBool::new(false),
                stop_requested: std::sync::atomic::AtomicBool::new(false),
                grantees: portserver::Grantees::default(),
                portserver: None,
                declared_problem: Mutex::new(None),
                metrics_endpoint: None,
                #[cfg(feature = "cluster")]
                cluster,
            }),
            portserver: None,
            metrics: None,
        })
        .inspect(|d| {
            // The files of reservations_dir, as `portres apply --yes` would.
            declared::apply_at_start(&d.shared);
        })
    }

    /// Also serves the Prometheus metrics at `/metrics` on `listener` while it runs.
    pub fn serve_metrics(&mut self, listener: std::net::TcpListener) {
        let at = listener
            .local_addr()
            .map_or_else(|_| "?".into(), |a| format!("http://{a}/metrics"));
        self.metrics = Some(listener);
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.metrics_endpoint = Some(Ok(at));
        }
    }

    /// The metrics endpoint could not be served: `status` says `why`.
    pub fn metrics_problem(&mut self, why: &str) {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.metrics_endpoint = Some(Err(why.to_string()));
        }
    }

    /// Also answers Google's portserver protocol on `listener` (bound with
    /// [`portserver::bind`]) while it runs.
    /// `address` is what `status` shows.
    pub fn serve_portserver(&mut self, listener: std::os::unix::net::UnixListener, address: &str) {
        self.portserver = Some(listener);
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.portserver = Some(portserver::Endpoint::Serving(address.to_string()));
        }
    }

    /// The portserver endpoint could not be served: `status` says `why`.
    pub fn portserver_problem(&mut self, why: &str) {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.portserver = Some(portserver::Endpoint::Failed(why.to_string()));
        }
    }

    /// Serves `listener` until `shutdown` completes or a `shutdown` request arrives. Then, with
    /// live restore on (and no request to release), the runtime reservations stay with the
    /// keeper for the next daemon, and `ip_local_reserved_ports` stays as it is; otherwise
    /// every runtime reservation ends and the sysctl is restored.
    pub async fn run(
        self,
        listener: tokio::net::UnixListener,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let shared = self.shared.clone();
        restore::watch_restored_owners(&shared);
        #[cfg(feature = "cluster")]
        cluster::start(&shared);
        if let Some(l) = self.metrics {
            match l
                .set_nonblocking(true)
                .and_then(|()| tokio::net::TcpListener::from_std(l))
            {
                Ok(l) => {
                    tokio::spawn(metrics::serve_http(shared.clone(), l));
                }
                Err(e) => tracing::error!(error = %e, "metrics: cannot serve its socket"),
            }
        }
        if let Some(l) = self.portserver {
            match tokio::net::UnixListener::from_std(l) {
                Ok(l) => {
                    tokio::spawn(portserver::serve(
                        shared.clone(),
                        l,
                        std::future::pending::<()>(),
                    ));
                }
                Err(e) => tracing::error!(error = %e, "portserver: cannot serve its socket"),
            }
        }
        let stop = async {
            tokio::select! {
                _ = shutdown => {}
                _ = shared.stop.notified() => {}
            }
        };
        server::serve(shared.clone(), listener, stop).await;
        let release = shared
            .release_on_stop
            .load(std::sync::atomic::Ordering::Acquire);
        #[cfg(feature = "cluster")]
        if let Some(c) = &shared.cluster {
            // The sessions' cluster blocks stay only for a successor that will carry them on.
            let keeping = !release
                && shared.config.live_restore_secs > 0
                && shared
                    .spaces()
                    .home
                    .keeper
                    .as_ref()
                    .is_some_and(|k| k.problem().is_none());
            c.leave(!keeping).await;
        }
        let mut all = shared.spaces();
        // Other namespaces' blocks end with the daemon (live restore carries the daemon's own).
        all.shutdown_others();
        let st = &mut all.home;
        let keeping = !release
            && shared.config.live_restore_secs > 0
            && st.keeper.as_ref().is_some_and(|k| k.problem().is_none());
        if keeping {
            // Every placeholder goes to the keeper now: none is unbound in between. Then the link
            // closes at once (sessions still open hold `Shared` until the process exits), so the
            // keeper is free to serve a successor that starts meanwhile.
            st.copy_to_keeper(None);
            let keeper_pid = st.keeper.as_ref().and_then(|k| k.pid());
            drop(st.keeper.take());
            let runtime = st
                .table
                .reservations()
                .filter(|r| !r.is_persistent())
                .count();
            tracing::info!(
                "stopping for a restart: {runtime} runtime reservations stay with the keeper \
                 (pid {}) for the next daemon, for up to {} s, and ip_local_reserved_ports is \
                 left as it is; `portres daemon --stop` releases them instead",
                keeper_pid.unwrap_or(0),
                shared.config.live_restore_secs
            );
        } else {
            st.enforcer.shutdown();
            if let Some(k) = st.keeper.take() {
                k.release();
            }
            tracing::info!("stopping: every runtime reservation released");
        }
    }
}
