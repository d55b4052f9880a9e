//! [`Client`]: one connection to the daemon (one session); [`Reservation`]: a runtime block that
//! is released when dropped.

use std::fmt;
use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use portres_core::{ErrorCode, Mode, Operation, PortRange, Protocol, Refusal, Token};
use portres_proto::{
    ApplyInfo, AttachInfo, ErrorBody, Hello, HelloReply, LostToken, Reply, ReplyBody, ReplyFrame,
    Request, RequestFrame, ReservationInfo, ReservationRef, ShowFilter, ShowInfo, SocketInfo,
    SocketRef, SocketType, StatusInfo, Welcome, WhoInfo,
};
pub use portres_sys::hold::SocketKind;

use crate::Error;
use crate::paths::{self, Scope};

struct Conn {
    stream: UnixStream,
    next_id: u64,
    /// Bytes read past the last frame.
    pending: Vec<u8>,
    /// Requests sent without waiting for their replies ([`Client::release_later`]): the daemon
    /// answers in order, so these replies come first and are skipped. Their tokens.
    unanswered: Vec<u64>,
    /// Descriptors received and not yet given out with their frame (one `recvmsg` may read a
    /// skipped reply and the next frame with its descriptor).
    fds: Vec<OwnedFd>,
    /// The daemon's handshake on this connection.
    welcome: Welcome,
    /// Runtime reservations acquired on this session, to re-attach after a daemon restart.
    tokens: std::collections::BTreeSet<u64>,
    /// The daemon closed this connection (it stopped, restarted or died).
    gone: bool,
    /// Times the connection was made again after the daemon came back.
    reconnects: u64,
    /// Tokens a re-attach reported lost, with why.
    lost: Vec<LostToken>,
    /// A reconnect waited its whole limit and failed: later ones try once, without waiting.
    gave_up: bool,
    /// The last request was written and its answer never came (the daemon went away in
    /// between): it may have been carried out.
    unanswered_request: bool,
}

impl Conn {
    /// Whether the daemon has closed this connection (noted in `gone`). A closed connection
    /// reads as end of file: nothing unasked is ever sent, so readable with no frame pending
    /// means closed.
    fn closed(&mut self) -> bool {
        if !self.gone && self.pending.is_empty() && portres_sys::fdpass::peer_closed(&self.stream) {
            self.gone = true;
        }
        self.gone
    }

    fn new(stream: UnixStream, welcome: Welcome) -> Conn {
        Conn {
            stream,
            next_id: 1,
            pending: Vec::new(),
            unanswered: Vec::new(),
            fds: Vec::new(),
            welcome,
            tokens: std::collections::BTreeSet::new(),
            gone: false,
            reconnects: 0,
            lost: Vec::new(),
            gave_up: false,
            unanswered_request: false,
        }
    }
}

/// How long a client waits for a daemon that went away (a restart, an upgrade) to come back:
/// `PORTRES_RECONNECT_SECS`, default 30; 0 fails at once.
pub fn reconnect_limit() -> std::time::Duration {
    let secs = std::env::var("PORTRES_RECONNECT_SECS")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(30);
    std::time::Duration::from_secs(secs)
}

/// At most this many releases are left unanswered; the next one waits for their replies
/// (so neither side's socket buffer ever fills).
const MAX_UNANSWERED: usize = 64;

struct Inner {
    conn: Mutex<Conn>,
    socket: PathBuf,
    /// The daemon users this client trusts (checked again on every reconnect).
    trusted: Vec<u32>,
    /// The handshake of the first connection.
    welcome: Welcome,
    /// How long to wait for a daemon that went away, in milliseconds.
    reconnect_ms: std::sync::atomic::AtomicU64,
}

/// A session with the daemon. Cheap to clone (clones share the connection); the session, and
/// every runtime reservation made on it, ends when the last clone and the last [`Reservation`]
/// are dropped, or when the process exits.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("socket", &self.inner.socket)
            .field("daemon_pid", &self.inner.welcome.pid)
            .finish()
    }
}

/// What to create with [`Client::create_persistent`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersistentSpec {
    /// TCP or UDP.
    pub protocol: Protocol,
    /// First port (1-65535).
    pub start: u32,
    /// Number of ports.
    pub count: u32,
    /// Default [`Mode::Exclude`].
    pub mode: Mode,
    /// User names or numeric uids who may consume it besides administrators.
    pub allow_users: Vec<String>,
    /// Group names or numeric gids who may consume it.
    pub allow_groups: Vec<String>,
    /// The `ip netns` name of the network namespace it is for (a file of `/run/netns`);
    /// `None`: the daemon's own namespace.
    pub netns: Option<String>,
    /// A reservation of the whole cluster (a daemon in cluster mode): granted only when every
    /// live member can enforce it.
    pub cluster: bool,
    /// Why it exists (shown by `show` and `who`; at most 512 bytes).
    pub description: Option<String>,
}

impl PersistentSpec {
    /// An `exclude` reservation of `[start, start + count)` with an empty access list.
    pub fn new(protocol: Protocol, start: u32, count: u32) -> Self {
        PersistentSpec {
            protocol,
            start,
            count,
            mode: Mode::Exclude,
            allow_users: Vec::new(),
            allow_groups: Vec::new(),
            netns: None,
            cluster: false,
            description: None,
        }
    }
}

fn parse_ref(r: ReservationRef) -> Result<(Token, Protocol, PortRange, Mode), Error> {
    let bad = |what: &str| Error::Transport(format!("the daemon sent an invalid {what}"));
    let token = r
        .token
        .parse::<u64>()
        .ok()
        .and_then(Token::new)
        .ok_or_else(|| bad("token"))?;
    let protocol = r.protocol.parse().map_err(|_| bad("protocol"))?;
    let range = PortRange::new(r.start.into(), r.count.into()).map_err(|_| bad("range"))?;
    let mode = r.mode.parse().map_err(|_| bad("mode"))?;
    Ok((token, protocol, range, mode))
}

impl Client {
    /// Connects to the default daemon (docs/behaviour.md §7): `PORTRES_SOCKET` if set; else, for
    /// root, the system socket; else the system socket if a daemon answers there, and the user's
    /// own socket otherwise. When nobody answers, a user-mode daemon is started in the background
    /// (unless `PORTRES_AUTOSTART=0`) and the call waits until it is ready.
    pub fn connect() -> Result<Client, Error> {
        let scope = Scope::for_current_user();
        if let Some(socket) = paths::socket_override() {
            return Self::connect_or_start(&socket, scope);
        }
        if scope == Scope::User {
            let system = paths::default_socket(Scope::System);
            if let Ok(c) = Self::connect_to(&system) {
                return Ok(c);
            }
        }
        Self::connect_or_start(&paths::default_socket(scope), scope)
    }

    /// Connects to the daemon at `socket`, starting one there if none answers and autostart is on.
    pub fn connect_or_start(socket: &Path, scope: Scope) -> Result<Client, Error> {
        match Self::connect_to(socket) {
            Err(Error::Connect { source, .. })
                if paths::autostart_enabled()
                    && matches!(
                        source.kind(),
                        ErrorKind::NotFound | ErrorKind::ConnectionRefused
                    ) =>
            {
                crate::autostart::start_daemon(socket, &paths::state_dir(scope))?;
                let client = Self::connect_to(socket)?;
                crate::autostart::say_what_is_enforced(&client);
                Ok(client)
            }
            other => other,
        }
    }

    /// Connects to the daemon at `socket`; never starts one. Trusts only a socket in a
    /// directory of root, the caller or `PORTRES_DAEMON_USER` that nobody else may write, and
    /// only a daemon running as one of them (see [`crate::trust`]).
    pub fn connect_to(socket: &Path) -> Result<Client, Error> {
        Self::connect_trusting(socket, &crate::trust::trusted_uids())
    }

    /// [`Client::connect_to`] trusting exactly the daemon users `uids` (e.g. root reaching a
    /// per-user daemon of another user on purpose).
    pub fn connect_trusting(socket: &Path, uids: &[u32]) -> Result<Client, Error> {
        let (stream, welcome) = open(socket, uids)?;
        Ok(Client {
            inner: Arc::new(Inner {
                conn: Mutex::new(Conn::new(stream, welcome.clone())),
                socket: socket.into(),
                trusted: uids.to_vec(),
                welcome,
                reconnect_ms: std::sync::atomic::AtomicU64::new(
                    reconnect_limit().as_millis() as u64
                ),
            }),
        })
    }

    /// The socket this client is connected to.
    pub fn socket(&self) -> &Path {
        &self.inner.socket
    }

    /// The daemon's process id and versions, from the first handshake (see
    /// [`Client::daemon_now`] after a restart).
    pub fn daemon(&self) -> &Welcome {
        &self.inner.welcome
    }

    /// The handshake of the connection in use now (another daemon's after a restart).
    pub fn daemon_now(&self) -> Welcome {
        self.lock().welcome.clone()
    }

    /// How many times the connection was made again after the daemon went away.
    pub fn reconnects(&self) -> u64 {
        self.lock().reconnects
    }

    /// Runtime reservations of this client that a re-attach after a daemon restart reported
    /// lost (the daemon could not carry them over), with why. Empty in the normal case.
    pub fn lost(&self) -> Vec<LostToken> {
        self.lock().lost.clone()
    }

    /// Sets how long this client waits for a daemon that went away to come back (default:
    /// [`reconnect_limit`]); zero fails at once.
    pub fn set_reconnect_limit(&self, limit: std::time::Duration) {
        self.inner.reconnect_ms.store(
            limit.as_millis() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// How long this client waits for a daemon that went away to come back.
    pub fn reconnect_limit(&self) -> std::time::Duration {
        std::time::Duration::from_millis(
            self.inner
                .reconnect_ms
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Conn> {
        self.inner.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the connection; if the daemon went away meanwhile (a restart), waits for it
    /// to come back ([`reconnect_limit`]), re-attaches this session's runtime reservations, and
    /// runs `f` once more on the new connection: always when the request never reached the
    /// daemon, and when it did but its answer was lost only if `repeatable` (doing it twice is
    /// harmless). Otherwise the error says the request may have been carried out.
    fn on_conn<T>(
        &self,
        repeatable: bool,
        mut f: impl FnMut(&mut Conn) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let mut conn = self.lock();
        if conn.gone {
            self.reconnect(&mut conn)?;
            return f(&mut conn);
        }
        match f(&mut conn) {
            Err(e) if conn.gone && !self.reconnect_limit().is_zero() => {
                let in_flight = conn.unanswered_request;
                self.reconnect(&mut conn)?;
                if in_flight && !repeatable {
                    return Err(Error::Restarted {
                        socket: self.inner.socket.clone(),
                        why: format!(
                            "the daemon went away while this request was in flight ({e}), and \
                             came back; the request may or may not have been carried out, so it \
                             was not sent again: check with `portres show` (a runtime block \
                             granted then stays reserved to this process until it exits)"
                        ),
                        reserved: true,
                    });
                }
                f(&mut conn)
            }
            other => other,
        }
    }

    /// Connects again after the daemon went away, waiting up to [`reconnect_limit`] for it to
    /// come back, and re-attaches this session's runtime reservations (the daemon checks that
    /// this process owns them). Releases sent with [`Client::release_later`] that were never
    /// answered are sent again.
    fn reconnect(&self, conn: &mut Conn) -> Result<AttachInfo, Error> {
        // After a reconnect that failed, one attempt each time (no waiting again per call).
        let limit = if conn.gave_up {
            std::time::Duration::ZERO
        } else {
            self.reconnect_limit()
        };
        let started = std::time::Instant::now();
        let mut delay = std::time::Duration::from_millis(5);
        let restarted = |why: String, reserved: bool| Error::Restarted {
            socket: self.inner.socket.clone(),
            why,
            reserved,
        };
        let (stream, welcome) = loop {
            match open(&self.inner.socket, &self.inner.trusted) {
                Ok(x) => break x,
                Err(e @ Error::Untrusted { .. }) => return Err(e),
                Err(Error::MalformedRequest(d)) => {
                    return Err(restarted(
                        format!(
                            "the daemon came back but refused this client: {}; the runtime \
                         reservations of this process stay reserved until it exits, but this \
                         client cannot use or release them",
                            d.message
                        ),
                        true,
                    ));
                }
                Err(e) if started.elapsed() >= limit => {
                    conn.gave_up = true;
                    return Err(restarted(
                        format!(
                            "the daemon went away and did not come back within {} s \
                         (PORTRES_RECONNECT_SECS): {e}; the runtime reservations of this \
                         session are no longer guaranteed",
                            limit.as_secs()
                        ),
                        false,
                    ));
                }
                Err(_) => {
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(std::time::Duration::from_millis(200));
                }
            }
        };
        let tokens: Vec<u64> = conn.tokens.iter().copied().collect();
        let releases = std::mem::take(&mut conn.unanswered);
        let mut fresh = Conn::new(stream, welcome);
        fresh.reconnects = conn.reconnects + 1;
        fresh.tokens = conn.tokens.clone();
        fresh.lost = std::mem::take(&mut conn.lost);
        *conn = fresh;
        let mut info = AttachInfo::default();
        if !tokens.is_empty() {
            if conn.welcome.version < 2 {
                return Err(restarted(
                    "the daemon came back as a version that cannot re-attach runtime \
                     reservations (protocol version 1); those of this process stay reserved \
                     until it exits, but this client cannot use or release them"
                        .into(),
                    true,
                ));
            }
            let request = Request::Attach {
                tokens: tokens.iter().map(u64::to_string).collect(),
            };
            let (_, reply, _) = exchange(conn, request)?;
            info = match reply.body {
                ReplyBody::Ok(Reply::Attached(info)) => info,
                ReplyBody::Error(e) => return Err(Error::from_body(e)),
                _ => return Err(Error::Transport("an unexpected answer to attach".into())),
            };
            for l in &info.lost {
                if let Ok(t) = l.token.parse::<u64>() {
                    conn.tokens.remove(&t);
                }
            }
            conn.lost.extend(info.lost.iter().cloned());
        }
        // Releases sent without waiting whose answer never came: sent again (the daemon lets
        // the process that acquired a block release it from any connection).
        for token in releases {
            conn.tokens.remove(&token);
            let _ = exchange(
                conn,
                Request::Release {
                    token: token.to_string(),
                },
            );
        }
        Ok(info)
    }

    /// Blocks until the daemon closes this client's connection (it stopped, restarted or died).
    /// For a client that sends nothing meanwhile, e.g. one that holds a reservation while a
    /// command runs; then [`Client::reattach`] connects again.
    pub fn wait_disconnected(&self) -> Result<(), Error> {
        let dup = {
            let conn = self.lock();
            if conn.gone {
                return Ok(());
            }
            conn.stream
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| Error::Transport(e.to_string()))?
        };
        portres_sys::fdpass::wait_hangup(&dup).map_err(|e| Error::Transport(e.to_string()))
    }

    /// Whether the daemon has closed the connection in use now (it stopped, restarted or died).
    pub fn daemon_gone(&self) -> bool {
        self.lock().closed()
    }

    /// If the daemon closed the connection, connects again (waiting up to [`reconnect_limit`])
    /// and re-attaches this session's runtime reservations; returns what the re-attach kept
    /// and lost, or `None` when the connection was fine (or was made again meanwhile).
    pub fn reattach(&self) -> Result<Option<AttachInfo>, Error> {
        let mut conn = self.lock();
        if !conn.closed() {
            return Ok(None);
        }
        self.reconnect(&mut conn).map(Some)
    }

    /// The daemon's metrics, in the Prometheus text exposition format.
    pub fn metrics(&self) -> Result<String, Error> {
        match self.call(Request::Metrics)? {
            Reply::Metrics(m) => Ok(m.text),
            other => Err(unexpected(&other)),
        }
    }

    /// Declarative reservations (administrators): the difference between the files of the
    /// daemon's `reservations_dir` and the persistent reservations that came from them; applied
    /// (all or nothing) unless `dry_run`, and with `expect` only if it is still the difference
    /// whose `digest` that was.
    pub fn apply(&self, dry_run: bool, expect: Option<&str>) -> Result<ApplyInfo, Error> {
        let request = Request::Apply {
            dry_run,
            expect: expect.map(str::to_string),
        };
        match self.call(request)? {
            Reply::Applied(a) => Ok(a),
            other => Err(unexpected(&other)),
        }
    }

    /// Stops the daemon (administrators): `release` releases every runtime reservation and
    /// restores the kernel's settings; otherwise they are kept for the next daemon.
    pub fn shutdown(&self, release: bool) -> Result<(), Error> {
        let mut conn = self.lock();
        let (_, reply, _) = exchange(&mut conn, Request::Shutdown { release })?;
        match reply.body {
            ReplyBody::Ok(Reply::Done) => Ok(()),
            ReplyBody::Ok(other) => Err(unexpected(&other)),
            ReplyBody::Error(e) => Err(Error::from_body(e)),
            _ => Err(Error::Transport("an unexpected answer to shutdown".into())),
        }
    }

    /// Makes this process's tree the owner of binds into `token`'s block under the deny layer
    /// (`own_tree`): the daemon moves this process into a cgroup of its own, below its current
    /// one, and from then on this process and every process it starts may bind the block's
    /// ports by number while every other process is refused. Returns the cgroup's path (below
    /// the cgroup2 root). Fails with [`Error::InvalidArgument`] when the daemon's deny layer is
    /// off (then nobody is refused such a bind in `exclude` mode, as without portres), and for
    /// a token that is not a runtime reservation of this connection.
    pub fn own_tree(&self, token: Token) -> Result<String, Error> {
        match self.call(Request::OwnTree {
            token: token.to_string(),
        })? {
            Reply::OwnedTree(info) => Ok(info.cgroup),
            other => Err(unexpected(&other)),
        }
    }

    fn call(&self, request: Request) -> Result<Reply, Error> {
        self.call_with_fds(request).map(|(reply, _)| reply)
    }

    /// Sends a request and reads its reply with any descriptors that came with it.
    fn call_with_fds(&self, request: Request) -> Result<(Reply, Vec<OwnedFd>), Error> {
        let repeatable = matches!(
            request,
            Request::Status
                | Request::Show { .. }
                | Request::Who { .. }
                | Request::LookupPersistent { .. }
                | Request::Associate { .. }
                | Request::Release { .. }
        );
        let (_, reply, fds) = self.on_conn(repeatable, |conn| exchange(conn, request.clone()))?;
        match reply.body {
            ReplyBody::Ok(r) => Ok((r, fds)),
            ReplyBody::Error(e) => Err(Error::from_body(e)),
            ReplyBody::Items(_) | ReplyBody::End(_) => Err(Error::Transport(
                "the daemon streamed a reply that was not asked to stream".into(),
            )),
        }
    }

    /// `SIO_ASSOCIATE_PORT_RESERVATION` and bind: a socket of `kind` bound to `port` of the
    /// reservation `token` (0: the lowest free port of the block) on `address` (default: every
    /// address, IPv4 and IPv6). Works for runtime tokens of this process and persistent tokens
    /// the caller may use. For a held block the port never becomes free in between: no other
    /// process can take it.
    pub fn associate(
        &self,
        token: Token,
        kind: SocketKind,
        address: Option<IpAddr>,
        port: u16,
    ) -> Result<(OwnedFd, u16), Error> {
        self.associate_with(token, kind, address, port, None)
    }

    /// [`Client::associate`] with `IPV6_V6ONLY` chosen for an IPv6 address (`None`: dual-stack
    /// for `::`).
    pub fn associate_with(
        &self,
        token: Token,
        kind: SocketKind,
        address: Option<IpAddr>,
        port: u16,
        v6only: Option<bool>,
    ) -> Result<(OwnedFd, u16), Error> {
        let (socket, backlog) = match kind {
            SocketKind::Listener { backlog } => (SocketType::Listener, Some(backlog)),
            SocketKind::Stream => (SocketType::Stream, None),
            SocketKind::Datagram => (SocketType::Datagram, None),
        };
        let (reply, mut fds) = self.call_with_fds(Request::Associate {
            token: token.to_string(),
            socket,
            port,
            address: address.map(|a| a.to_string()),
            backlog,
            v6only,
        })?;
        match reply {
            Reply::Socket(SocketRef { port, .. }) if fds.len() == 1 => {
                Ok((fds.pop().expect("one"), port))
            }
            Reply::Socket(_) => Err(Error::Transport(format!(
                "the daemon sent {} descriptors with a socket reply, expected 1",
                fds.len()
            ))),
            other => Err(unexpected(&other)),
        }
    }

    fn expect_reservation(&self, request: Request) -> Result<ReservationRef, Error> {
        match self.call(request)? {
            Reply::Reservation(r) => Ok(r),
            other => Err(unexpected(&other)),
        }
    }

    /// Acquires any `count` contiguous free ports of the dynamic range (a wildcard reservation).
    pub fn acquire(&self, protocol: Protocol, count: u32) -> Result<Reservation, Error> {
        self.acquire_with(protocol, 0, count, Mode::Hold)
    }

    /// Acquires the specific block `[start, start + count)`.
    pub fn acquire_at(
        &self,
        protocol: Protocol,
        start: u32,
        count: u32,
    ) -> Result<Reservation, Error> {
        self.acquire_with(protocol, start, count, Mode::Hold)
    }

    /// Acquires a block with full control: `start` 0 means wildcard.
    pub fn acquire_with(
        &self,
        protocol: Protocol,
        start: u32,
        count: u32,
        mode: Mode,
    ) -> Result<Reservation, Error> {
        self.acquire_request(protocol, start, count, mode, false)
    }

    /// Cluster mode: acquires a block that is free on every live member of the daemon's
    /// cluster (`start` 0: any such block of the dynamic range). It is held here as any runtime
    /// block, and kept free on every other member until it is released, this client's
    /// connection ends, or this host's daemon is gone for longer than the cluster's
    /// `lease_ttl_secs`.
    pub fn acquire_in_cluster(
        &self,
        protocol: Protocol,
        start: u32,
        count: u32,
        mode: Mode,
    ) -> Result<Reservation, Error> {
        self.acquire_request(protocol, start, count, mode, true)
    }

    fn acquire_request(
        &self,
        protocol: Protocol,
        start: u32,
        count: u32,
        mode: Mode,
        cluster: bool,
    ) -> Result<Reservation, Error> {
        let (start, count) = block_fields(Operation::AcquireRuntime, protocol, start, count)?;
        let r = self.expect_reservation(Request::Acquire {
            protocol,
            start,
            count,
            mode: Some(mode),
            cluster,
        })?;
        let (token, protocol, range, mode) = parse_ref(r)?;
        self.lock().tokens.insert(token.get());
        Ok(Reservation {
            client: self.clone(),
            token,
            protocol,
            range,
            mode,
            live: true,
        })
    }

    /// Releases a runtime reservation by token (it must be this process's).
    pub fn release(&self, token: u64) -> Result<(), Error> {
        let before = self.lock().reconnects;
        let result = self.call(Request::Release {
            token: token.to_string(),
        });
        let mut conn = self.lock();
        // Lost across a restart, or released by a first try whose answer the restart lost.
        let was_lost =
            conn.lost.iter().any(|l| l.token == token.to_string()) || conn.reconnects != before;
        match result {
            Ok(Reply::Done) => {
                conn.tokens.remove(&token);
                Ok(())
            }
            // Lost across a daemon restart: it is not reserved any more, which is what a
            // release asks for.
            Err(Error::InvalidArgument(_)) if was_lost => Ok(()),
            Ok(other) => Err(unexpected(&other)),
            Err(e) => Err(e),
        }
    }

    /// Sends the release of the runtime reservation `token` without waiting for the daemon's
    /// answer: one round trip saved. The daemon handles requests in order, so every later
    /// request of this client sees the block released; until the daemon has read it (normally
    /// within one round trip) another process may still find the block reserved, and a held
    /// port still bound. Failures are not reported (use [`Client::release`] to see them).
    pub fn release_later(&self, token: u64) -> Result<(), Error> {
        self.on_conn(true, |conn| {
            if conn.unanswered.len() >= MAX_UNANSWERED {
                skip_unanswered(conn)?;
            }
            let id = conn.next_id;
            conn.next_id += 1;
            let request = Request::Release {
                token: token.to_string(),
            };
            send_request(conn, &RequestFrame { id, request })?;
            conn.unanswered.push(token);
            conn.tokens.remove(&token);
            Ok(())
        })
    }

    /// Creates a persistent reservation (administrators only); returns its token.
    pub fn create_persistent(&self, spec: &PersistentSpec) -> Result<Token, Error> {
        let (start, count) = block_fields(
            Operation::CreatePersistent,
            spec.protocol,
            spec.start,
            spec.count,
        )?;
        let r = self.expect_reservation(Request::CreatePersistent {
            protocol: spec.protocol,
            start,
            count,
            mode: Some(spec.mode),
            allow_users: spec.allow_users.clone(),
            allow_groups: spec.allow_groups.clone(),
            netns: spec.netns.clone(),
            cluster: spec.cluster,
            description: spec.description.clone(),
        })?;
        Ok(parse_ref(r)?.0)
    }

    /// The token of the persistent reservation with exactly this start and count.
    pub fn lookup_persistent(
        &self,
        protocol: Protocol,
        start: u32,
        count: u32,
    ) -> Result<Token, Error> {
        self.lookup_persistent_in(None, protocol, start, count)
    }

    /// [`Client::lookup_persistent`] in the network namespace named `netns` (`ip netns`
    /// name; `None`: the daemon's own).
    pub fn lookup_persistent_in(
        &self,
        netns: Option<&str>,
        protocol: Protocol,
        start: u32,
        count: u32,
    ) -> Result<Token, Error> {
        let (start, count) = block_fields(Operation::LookupPersistent, protocol, start, count)?;
        let r = self.expect_reservation(Request::LookupPersistent {
            protocol,
            start,
            count,
            netns: netns.map(str::to_string),
        })?;
        Ok(parse_ref(r)?.0)
    }

    /// Deletes the persistent reservation with exactly this start and count (administrators).
    pub fn delete_persistent(
        &self,
        protocol: Protocol,
        start: u32,
        count: u32,
    ) -> Result<(), Error> {
        self.delete_persistent_in(None, protocol, start, count)
    }

    /// [`Client::delete_persistent`] in the network namespace named `netns` (`ip netns`
    /// name; `None`: the daemon's own).
    pub fn delete_persistent_in(
        &self,
        netns: Option<&str>,
        protocol: Protocol,
        start: u32,
        count: u32,
    ) -> Result<(), Error> {
        let (start, count) = block_fields(Operation::DeletePersistent, protocol, start, count)?;
        match self.call(Request::DeletePersistent {
            protocol,
            start,
            count,
            netns: netns.map(str::to_string),
        })? {
            Reply::Done => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// The daemon's status.
    pub fn status(&self) -> Result<StatusInfo, Error> {
        match self.call(Request::Status)? {
            Reply::Status(s) => Ok(s),
            other => Err(unexpected(&other)),
        }
    }

    /// Cluster mode: this member, the members and what each failed to enforce.
    pub fn cluster_status(&self) -> Result<portres_proto::ClusterInfo, Error> {
        match self.call(Request::ClusterStatus)? {
            Reply::Cluster(c) => Ok(c),
            other => Err(unexpected(&other)),
        }
    }

    /// Who has `port`: the reservation covering it and every live socket on it (in the
    /// daemon's network namespace), with their processes.
    pub fn who(&self, protocol: Protocol, port: u32) -> Result<WhoInfo, Error> {
        let port = port_field(port)?;
        let request = Request::Who {
            protocol,
            port,
            all: false,
            stream: false,
        };
        match self.call(request)? {
            Reply::Who(w) => Ok(w),
            other => Err(unexpected(&other)),
        }
    }

    /// Who has `port`, with every socket on it: the head (reservation, summary) first, then
    /// `each` socket as it arrives (a port may have hundreds of thousands; they are streamed,
    /// never held whole). Returns the head; its `sockets` is empty.
    pub fn who_all(
        &self,
        protocol: Protocol,
        port: u32,
        mut on_head: impl FnMut(&WhoInfo) -> std::io::Result<()>,
        mut each: impl FnMut(SocketInfo) -> std::io::Result<()>,
    ) -> Result<WhoInfo, Error> {
        let port = port_field(port)?;
        let request = Request::Who {
            protocol,
            port,
            all: true,
            stream: true,
        };
        let head = self.call_streamed(
            request,
            |reply| match reply {
                Reply::Who(w) => on_head(w).map_err(output_error),
                other => Err(unexpected(other)),
            },
            |s: SocketInfo| each(s).map_err(output_error),
        )?;
        match head {
            Reply::Who(w) => Ok(w),
            other => Err(unexpected(&other)),
        }
    }

    /// Every reservation (streamed from the daemon and collected; see [`Client::show_each`]).
    pub fn show(&self) -> Result<ShowInfo, Error> {
        let mut rows = Vec::new();
        let mut head = self.show_each(&ShowFilter::default(), |r| {
            rows.push(r);
            Ok(())
        })?;
        head.reservations = rows;
        head.more = false;
        Ok(head)
    }

    /// The reservations that pass `filter`, given to `each` as they arrive (a table of any
    /// size). Returns the head: its `total` counts them, its `reservations` is empty.
    pub fn show_each(
        &self,
        filter: &ShowFilter,
        mut each: impl FnMut(ReservationInfo) -> std::io::Result<()>,
    ) -> Result<ShowInfo, Error> {
        let request = Request::Show {
            stream: true,
            filter: filter.clone(),
        };
        let head = self.call_streamed(
            request,
            |reply| match reply {
                Reply::Show(_) => Ok(()),
                other => Err(unexpected(other)),
            },
            |r: ReservationInfo| each(r).map_err(output_error),
        )?;
        match head {
            Reply::Show(s) => Ok(s),
            other => Err(unexpected(&other)),
        }
    }

    /// Sends a request whose reply may stream and returns the head (the `ok` frame), after
    /// `on_head` has seen it and `each` every row (decoded as `T`) when it announced rows. If
    /// `each` fails, the rest of the stream is read and dropped (the connection stays usable)
    /// and the first error is returned; if `on_head` fails, the connection is shut.
    fn call_streamed<T: serde::de::DeserializeOwned>(
        &self,
        request: Request,
        on_head: impl FnOnce(&Reply) -> Result<(), Error>,
        mut each: impl FnMut(T) -> Result<(), Error>,
    ) -> Result<Reply, Error> {
        let mut conn = self.lock();
        if conn.gone {
            self.reconnect(&mut conn)?;
        }
        let (id, head, _) = match exchange(&mut conn, request.clone()) {
            Err(_) if conn.gone && !self.reconnect_limit().is_zero() => {
                self.reconnect(&mut conn)?;
                exchange(&mut conn, request)?
            }
            other => other?,
        };
        let head = match head.body {
            ReplyBody::Ok(r) => r,
            ReplyBody::Error(e) => return Err(Error::from_body(e)),
            _ => {
                let _ = conn.stream.shutdown(std::net::Shutdown::Both);
                return Err(Error::Transport("a stream began without its head".into()));
            }
        };
        let more = match &head {
            Reply::Show(s) => s.more,
            Reply::Who(w) => w.more,
            _ => false,
        };
        if let Err(e) = on_head(&head) {
            // Rows may follow: the connection cannot be reused unless they are read.
            if more {
                let _ = conn.stream.shutdown(std::net::Shutdown::Both);
            }
            return Err(e);
        }
        if !more {
            return Ok(head);
        }
        let mut failed = None;
        loop {
            let part = read_frame_with_fds(&mut conn).and_then(|(body, _)| {
                Ok(portres_proto::decode::<portres_proto::StreamPart<T>>(
                    &body,
                )?)
            });
            let part = match part {
                Ok(p) if p.id == id => p,
                Ok(p) => {
                    let _ = conn.stream.shutdown(std::net::Shutdown::Both);
                    return Err(Error::Transport(format!(
                        "a frame of reply {} inside the stream of request {id}",
                        p.id
                    )));
                }
                Err(e) => {
                    let _ = conn.stream.shutdown(std::net::Shutdown::Both);
                    return Err(e);
                }
            };
            if let Some(rows) = part.items {
                for row in rows {
                    if failed.is_none()
                        && let Err(e) = each(row)
                    {
                        failed = Some(e);
                    }
                }
            } else if part.end.is_some() {
                break;
            } else if let Some(e) = part.error {
                return Err(Error::from_body(e));
            } else {
                let _ = conn.stream.shutdown(std::net::Shutdown::Both);
                return Err(Error::Transport("an unknown frame inside a stream".into()));
            }
        }
        failed.map_or(Ok(head), Err)
    }
}

/// Connects to the daemon at `socket`, checks that it is trusted (see [`crate::trust`]), and
/// shakes hands.
fn open(socket: &Path, uids: &[u32]) -> Result<(UnixStream, Welcome), Error> {
    let untrusted = |why: String| Error::Untrusted {
        path: socket.into(),
        why,
    };
    let checked = crate::trust::check_socket_dir(socket, uids).or_else(|_| {
        // A directory that does not exist yet holds no impostor: that is "no daemon".
        if socket.parent().is_some_and(|d| !d.exists()) {
            return Err(None);
        }
        // It may have been made between the check and now (another client starting the
        // daemon): the second look decides.
        crate::trust::check_socket_dir(socket, uids).map_err(Some)
    });
    match checked {
        Ok(()) => {}
        Err(None) => {
            return Err(Error::Connect {
                path: socket.into(),
                source: std::io::Error::from(ErrorKind::NotFound),
            });
        }
        Err(Some(why)) => return Err(untrusted(why)),
    }
    let mut stream = UnixStream::connect(socket).map_err(|source| Error::Connect {
        path: socket.into(),
        source,
    })?;
    let peer = portres_sys::creds::peer_cred(&stream).map_err(|e| {
        untrusted(format!(
            "cannot read the credentials of the process behind {}: {e}",
            socket.display()
        ))
    })?;
    if !uids.contains(&peer.uid) {
        return Err(untrusted(format!(
            "refusing the daemon at {}: it runs as {} (pid {}), not as {}; it may be another \
             user's program impersonating the daemon, and nothing was sent to it. If that \
             user runs your daemon on purpose, set PORTRES_DAEMON_USER={}",
            socket.display(),
            crate::trust::who_is(peer.uid),
            peer.pid,
            uids.iter()
                .map(|&u| crate::trust::who_is(u))
                .collect::<Vec<_>>()
                .join(" or "),
            peer.uid
        )));
    }
    let client_name = format!("portres-client {}", env!("CARGO_PKG_VERSION"));
    portres_proto::write_frame(&mut stream, &Hello::new(client_name))?;
    let reply: HelloReply = portres_proto::decode(&portres_proto::read_frame(&mut stream)?)?;
    match reply {
        HelloReply::Welcome(w) => Ok((stream, w)),
        HelloReply::Error(e) => Err(Error::from_body(e)),
    }
}

/// Whether an I/O error means the daemon closed the connection.
fn is_closed(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::BrokenPipe | ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof
    )
}

/// Writes a request frame, noting a closed connection.
fn send_request(conn: &mut Conn, frame: &RequestFrame) -> Result<(), Error> {
    match portres_proto::write_frame(&mut conn.stream, frame) {
        Ok(()) => Ok(()),
        Err(portres_proto::FrameError::Io(e)) if is_closed(&e) => {
            conn.gone = true;
            Err(portres_proto::FrameError::Closed.into())
        }
        Err(e) => Err(e.into()),
    }
}

/// Sends `request` with a fresh id and reads the first frame of its reply with any
/// descriptors that came with it (after the replies of [`Client::release_later`] still owed).
/// A reply to another request means the connection is out of step: it is shut.
fn exchange(conn: &mut Conn, request: Request) -> Result<(u64, ReplyFrame, Vec<OwnedFd>), Error> {
    let id = conn.next_id;
    conn.next_id += 1;
    conn.unanswered_request = false;
    send_request(conn, &RequestFrame { id, request })?;
    conn.unanswered_request = true;
    skip_unanswered(conn)?;
    let (body, fds) = read_frame_with_fds(conn)?;
    let reply: ReplyFrame = portres_proto::decode(&body)?;
    conn.unanswered_request = false;
    if reply.id != id && reply.id != 0 {
        let _ = conn.stream.shutdown(std::net::Shutdown::Both);
        return Err(Error::Transport(format!(
            "reply {} does not answer request {id}",
            reply.id
        )));
    }
    Ok((id, reply, fds))
}

/// Reads and drops the replies to requests sent by [`Client::release_later`]. Release replies
/// carry no descriptors: any that came with them belong to the frames after, and are kept. If
/// this fails, the connection is shut down: which reply answers what is no longer known.
fn skip_unanswered(conn: &mut Conn) -> Result<(), Error> {
    while !conn.unanswered.is_empty() {
        match read_frame_with_fds(conn) {
            Ok((_, fds)) => {
                conn.fds = fds;
                conn.unanswered.remove(0);
            }
            Err(e) => {
                let _ = conn.stream.shutdown(std::net::Shutdown::Both);
                return Err(e);
            }
        }
    }
    Ok(())
}

/// Reads one frame, collecting descriptors attached to it (`SCM_RIGHTS` on its first byte).
/// Bytes are read as they come (a whole small reply in one `recvmsg`); what belongs to a later
/// frame stays in `pending`.
fn read_frame_with_fds(conn: &mut Conn) -> Result<(Vec<u8>, Vec<OwnedFd>), Error> {
    loop {
        if conn.pending.len() >= 4 {
            let header = conn.pending[..4].try_into().expect("4 bytes");
            let len = portres_proto::frame::body_len(header)?;
            if conn.pending.len() >= 4 + len {
                let body = conn.pending[4..4 + len].to_vec();
                conn.pending.drain(..4 + len);
                return Ok((body, std::mem::take(&mut conn.fds)));
            }
        }
        let mut buf = [0u8; 16 * 1024];
        match portres_sys::fdpass::recv_with_fds(&conn.stream, &mut buf) {
            Ok((0, _)) if conn.pending.is_empty() => {
                conn.gone = true;
                return Err(portres_proto::FrameError::Closed.into());
            }
            Ok((0, _)) => {
                conn.gone = true;
                return Err(Error::Transport("the daemon cut a reply short".into()));
            }
            Err(e) if is_closed(&e) => {
                conn.gone = true;
                return Err(portres_proto::FrameError::Closed.into());
            }
            Ok((n, more)) => {
                conn.pending.extend_from_slice(&buf[..n]);
                conn.fds.extend(more);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::Transport(e.to_string())),
        }
    }
}

/// A TCP socket bound to a reserved port, not yet connected: [`TcpSocket::connect`] makes it a
/// `TcpStream` whose source port is the reserved one.
#[derive(Debug)]
pub struct TcpSocket {
    fd: OwnedFd,
}

impl TcpSocket {
    /// `connect(2)` to `to`; the connection's source port is the reserved port.
    pub fn connect(self, to: SocketAddr) -> std::io::Result<TcpStream> {
        portres_sys::hold::connect(&self.fd, to)?;
        Ok(TcpStream::from(self.fd))
    }

    /// The bound local address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        portres_sys::hold::local_addr(&self.fd)
    }
}

impl AsFd for TcpSocket {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for TcpSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl From<TcpSocket> for OwnedFd {
    fn from(s: TcpSocket) -> OwnedFd {
        s.fd
    }
}

fn unexpected(reply: &Reply) -> Error {
    Error::Transport(format!("the daemon sent an unexpected reply: {reply:?}"))
}

/// A runtime reservation. Dropping it releases it; it also ends when its session ends (the
/// process exits or is killed).
#[derive(Debug)]
pub struct Reservation {
    client: Client,
    token: Token,
    protocol: Protocol,
    range: PortRange,
    mode: Mode,
    live: bool,
}

impl Reservation {
    /// Its token.
    pub fn token(&self) -> Token {
        self.token
    }

    /// Its protocol.
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// Its block.
    pub fn range(&self) -> PortRange {
        self.range
    }

    /// The first port of the block.
    pub fn port(&self) -> u16 {
        self.range.start()
    }

    /// Its mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The session it belongs to.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// A TCP listener on `port` of the block (0: the lowest free one), on every address (IPv4
    /// and IPv6), backlog 128.
    pub fn listen(&self, port: u16) -> Result<TcpListener, Error> {
        self.listen_on(None, port, 128)
    }

    /// A TCP listener on `address` (e.g. `127.0.0.1` for loopback only; `None` for every address).
    pub fn listen_on(
        &self,
        address: Option<IpAddr>,
        port: u16,
        backlog: i32,
    ) -> Result<TcpListener, Error> {
        let (fd, _) =
            self.client
                .associate(self.token, SocketKind::Listener { backlog }, address, port)?;
        Ok(TcpListener::from(fd))
    }

    /// A TCP socket bound to `port` of the block, ready to `connect()` from it.
    pub fn tcp_socket(&self, address: Option<IpAddr>, port: u16) -> Result<TcpSocket, Error> {
        let (fd, _) = self
            .client
            .associate(self.token, SocketKind::Stream, address, port)?;
        Ok(TcpSocket { fd })
    }

    /// A UDP socket bound to `port` of the block.
    pub fn udp_socket(&self, address: Option<IpAddr>, port: u16) -> Result<UdpSocket, Error> {
        let (fd, _) = self
            .client
            .associate(self.token, SocketKind::Datagram, address, port)?;
        Ok(UdpSocket::from(fd))
    }

    /// Releases it now, reporting failure (dropping releases and ignores failure).
    pub fn release(mut self) -> Result<(), Error> {
        self.live = false;
        self.client.release(self.token.get())
    }

    /// Releases it without waiting for the daemon's answer ([`Client::release_later`]): later
    /// requests of this client see it released; other processes may see it reserved (and a
    /// held port bound) for up to about one round trip more.
    pub fn release_later(mut self) -> Result<(), Error> {
        self.live = false;
        self.client.release_later(self.token.get())
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.live {
            // If this fails the connection is gone, and the daemon ended the session already.
            let _ = self.client.release(self.token.get());
        }
    }
}

/// A refusal made by the client itself, before anything is sent (a value the protocol cannot
/// carry), in the same form as the daemon's.
fn local_refusal(op: Operation, message: String) -> Error {
    // Windows reports a bad argument of the persistent functions as ERROR_INVALID_PARAMETER.
    let code = match op {
        Operation::CreatePersistent | Operation::LookupPersistent | Operation::DeletePersistent => {
            ErrorCode::InvalidParameter
        }
        _ => ErrorCode::InvalidArgument,
    };
    let r = Refusal::new(op, code, message);
    Error::from_body(ErrorBody {
        code: r.code.as_str().into(),
        windows_code: r.windows_code,
        message: r.message,
        conflict: None,
    })
}

/// A port as the protocol carries it (0 to 65535).
fn port_field(port: u32) -> Result<u16, Error> {
    u16::try_from(port).map_err(|_| {
        local_refusal(
            Operation::Other,
            format!("{port} is not a port; give a number from 1 to 65535"),
        )
    })
}

/// A failure to write out what the daemon sent.
fn output_error(e: std::io::Error) -> Error {
    Error::Output(e.to_string())
}

/// A block's start (0 to 65535) and count (1 to 65535) as the protocol carries them.
fn block_fields(
    op: Operation,
    protocol: Protocol,
    start: u32,
    count: u32,
) -> Result<(u16, u16), Error> {
    let start = u16::try_from(start).map_err(|_| {
        local_refusal(
            op,
            format!(
                "cannot reserve {protocol} ports from {start}: it is not a port; give a start \
                 from 1 to 65535, or 0 for any block"
            ),
        )
    })?;
    match u16::try_from(count) {
        Ok(c) if c > 0 => Ok((start, c)),
        _ => Err(local_refusal(
            op,
            format!(
                "cannot reserve {count} {protocol} ports: a block has 1 to 65535 ports; ask for \
                 a count in that range"
            ),
        )),
    }
}
