//! Messages: the handshake, requests, replies and errors, as they are serialised.
//!
//! Conventions: field names are `snake_case`; tokens are decimal strings (a u64 does not fit a
//! JSON number in every language); optional fields may be absent; unknown fields are ignored, so
//! a newer peer may add fields without breaking an older one.

use portres_core::{Mode, Protocol};
use serde::{Deserialize, Serialize};

use crate::fields;

/// First frame from the client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Always [`crate::PROTOCOL_NAME`].
    pub protocol: String,
    /// The protocol version the client speaks.
    pub version: u32,
    /// Free text naming the client (for logs).
    #[serde(default)]
    pub client: Option<String>,
}

impl Hello {
    /// The hello of this build.
    pub fn new(client: impl Into<String>) -> Self {
        Hello {
            protocol: crate::PROTOCOL_NAME.into(),
            version: crate::VERSION,
            client: Some(client.into()),
        }
    }
}

/// The daemon's answer to a good [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// Always [`crate::PROTOCOL_NAME`].
    pub protocol: String,
    /// The protocol version the daemon will speak on this connection.
    pub version: u32,
    /// The daemon's program version.
    pub daemon_version: String,
    /// The daemon's process id.
    pub pid: u32,
}

/// The answer to a [`Hello`]: welcome, or an error after which the daemon closes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HelloReply {
    /// Accepted.
    Welcome(Welcome),
    /// Refused (wrong protocol name or version).
    Error(ErrorBody),
}

/// A request and its id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestFrame {
    /// Chosen by the client; repeated in the reply.
    pub id: u64,
    /// What is asked.
    #[serde(flatten)]
    pub request: Request,
}

/// Every request, tagged by `"op"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Acquire a runtime reservation (`start` 0: wildcard).
    Acquire {
        /// `"tcp"` or `"udp"`.
        #[serde(with = "fields::protocol")]
        protocol: Protocol,
        /// First port (0 to 65535), or 0 for any block.
        #[serde(deserialize_with = "fields::port")]
        start: u16,
        /// Number of ports (1 to 65535).
        #[serde(deserialize_with = "fields::count")]
        count: u16,
        /// `"hold"` (default) or `"exclude"`.
        #[serde(default, with = "fields::mode")]
        mode: Option<Mode>,
        /// A block free on every live member of the cluster (cluster mode), kept free on each
        /// while this session lives. Protocol version 2.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        cluster: bool,
    },
    /// Release a runtime reservation of this process.
    Release {
        /// Its token.
        token: String,
    },
    /// Create a persistent reservation (administrators).
    CreatePersistent {
        /// `"tcp"` or `"udp"`.
        #[serde(with = "fields::protocol")]
        protocol: Protocol,
        /// First port (0 to 65535; 0 is refused with a clear error).
        #[serde(deserialize_with = "fields::port")]
        start: u16,
        /// Number of ports (1 to 65535).
        #[serde(deserialize_with = "fields::count")]
        count: u16,
        /// `"exclude"` (default) or `"hold"`.
        #[serde(default, with = "fields::mode")]
        mode: Option<Mode>,
        /// User names or numeric uids who may consume it.
        #[serde(default)]
        allow_users: Vec<String>,
        /// Group names or numeric gids who may consume it.
        #[serde(default)]
        allow_groups: Vec<String>,
        /// The `ip netns` name (a file of `/run/netns`) of the network namespace it belongs to;
        /// default: the daemon's own.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        netns: Option<String>,
        /// A reservation of the whole cluster (cluster mode): granted only when every live
        /// member can enforce it, and enforced by each. Protocol version 2.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        cluster: bool,
        /// Why it exists (shown by `show` and `who`; at most 512 bytes).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        description: Option<String>,
    },
    /// Find the token of the persistent reservation with exactly this start and count.
    LookupPersistent {
        /// `"tcp"` or `"udp"`.
        #[serde(with = "fields::protocol")]
        protocol: Protocol,
        /// First port (0 to 65535).
        #[serde(deserialize_with = "fields::port")]
        start: u16,
        /// Number of ports (1 to 65535).
        #[serde(deserialize_with = "fields::count")]
        count: u16,
        /// The `ip netns` name (a file of `/run/netns`) of the network namespace it belongs to;
        /// default: the daemon's own.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        netns: Option<String>,
    },
    /// Delete the persistent reservation with exactly this start and count (administrators).
    DeletePersistent {
        /// `"tcp"` or `"udp"`.
        #[serde(with = "fields::protocol")]
        protocol: Protocol,
        /// First port (0 to 65535).
        #[serde(deserialize_with = "fields::port")]
        start: u16,
        /// Number of ports (1 to 65535).
        #[serde(deserialize_with = "fields::count")]
        count: u16,
        /// The `ip netns` name (a file of `/run/netns`) of the network namespace it belongs to;
        /// default: the daemon's own.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        netns: Option<String>,
    },
    /// A socket bound to a port of a reservation, passed back with `SCM_RIGHTS`.
    Associate {
        /// The reservation's token.
        token: String,
        /// `"listener"` (TCP, listening), `"stream"` (TCP, ready for `connect()`) or
        /// `"datagram"` (UDP).
        socket: SocketType,
        /// A port of the block, or 0 for the lowest free one.
        #[serde(default, deserialize_with = "fields::port")]
        port: u16,
        /// Local address to bind; default `"::"` (every address, IPv4 and IPv6).
        #[serde(default)]
        address: Option<String>,
        /// `listen()` backlog for listeners (1 to 65535); default 128.
        #[serde(default, deserialize_with = "fields::backlog")]
        backlog: Option<i32>,
        /// For an IPv6 address: `IPV6_V6ONLY`. Default: dual-stack for `::`, else unset.
        #[serde(default)]
        v6only: Option<bool>,
    },
    /// Who has a port: the reservation covering it and every live socket on it.
    Who {
        /// `"tcp"` or `"udp"`.
        #[serde(with = "fields::protocol")]
        protocol: Protocol,
        /// The port (1 to 65535; 0 is refused with a clear error).
        #[serde(deserialize_with = "fields::port")]
        port: u16,
        /// Every socket, not only the listeners and the summary of connections.
        #[serde(default)]
        all: bool,
        /// The client reads a streamed reply (see [`ReplyBody::Items`]).
        #[serde(default)]
        stream: bool,
    },
    /// Daemon version, uptime, enforcement layers and counts.
    Status,
    /// Cluster mode: this member, the members of the cluster and what each failed to enforce.
    /// Protocol version 2.
    ClusterStatus,
    /// Every reservation (that passes the filters).
    Show {
        /// The client reads a streamed reply (see [`ReplyBody::Items`]).
        #[serde(default)]
        stream: bool,
        /// Only reservations that pass these.
        #[serde(default, flatten)]
        filter: ShowFilter,
    },
    /// Re-attach, after a daemon restart, runtime reservations this process acquired on an
    /// earlier connection: they move to this connection's session (and end with it). Each token
    /// is kept (the daemon restored it and the caller is its owner) or reported lost, with why.
    /// Protocol version 2.
    Attach {
        /// The tokens.
        tokens: Vec<String>,
    },
    /// Stop the daemon (administrators). `release`: release every runtime reservation and
    /// restore the kernel's settings, as a stop meant as a stop; otherwise the runtime
    /// reservations are kept for a successor, as on SIGTERM. Protocol version 2.
    Shutdown {
        /// Release everything rather than keep it for a successor.
        #[serde(default)]
        release: bool,
    },
    /// Make the caller's process tree the owner of a runtime reservation of its session under
    /// the deny layer: the daemon moves the caller into a cgroup of its own (below its current
    /// one), and every process it starts from then on may bind the block's ports by number,
    /// while everyone else is refused (`portres run`). Refused with `InvalidArgument` when the
    /// deny layer is off.
    OwnTree {
        /// The reservation's token.
        token: String,
    },
    /// The daemon's metrics, in the Prometheus text exposition format (anyone may ask: counts
    /// only). Protocol version 2.
    Metrics,
    /// Declarative reservations (administrators): read the files of the daemon's
    /// `reservations_dir` and compare them with the persistent reservations that came from
    /// files. `dry_run`: only report the difference. Otherwise apply it, all or nothing; with
    /// `expect`, only if the difference is still the one whose `digest` was shown (the files
    /// did not change since). Protocol version 2.
    Apply {
        /// Report only.
        #[serde(default)]
        dry_run: bool,
        /// The `digest` of the difference the caller confirmed.
        #[serde(default)]
        expect: Option<String>,
    },
}

/// Filters of [`Request::Show`]; an absent field passes everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShowFilter {
    /// Only this protocol (`"tcp"` or `"udp"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// Only blocks that overlap `first..=last`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<(u16, u16)>,
    /// Only `"runtime"` or `"persistent"` reservations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Only reservations made by this user (name or uid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Every network namespace the daemon serves, not only the caller's (administrators).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all_namespaces: bool,
}

/// The kind of socket an [`Request::Associate`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SocketType {
    /// TCP, listening.
    Listener,
    /// TCP, bound, ready for `connect()`.
    Stream,
    /// UDP, bound.
    Datagram,
}

impl SocketType {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            SocketType::Listener => "listener",
            SocketType::Stream => "stream",
            SocketType::Datagram => "datagram",
        }
    }
}

impl std::fmt::Display for SocketType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Request {
    /// The `op` name, for logs.
    pub fn op_name(&self) -> &'static str {
        match self {
            Request::Acquire { .. } => "acquire",
            Request::Release { .. } => "release",
            Request::CreatePersistent { .. } => "create_persistent",
            Request::LookupPersistent { .. } => "lookup_persistent",
            Request::DeletePersistent { .. } => "delete_persistent",
            Request::Associate { .. } => "associate",
            Request::Who { .. } => "who",
            Request::Status => "status",
            Request::ClusterStatus => "cluster_status",
            Request::Show { .. } => "show",
            Request::Attach { .. } => "attach",
            Request::Shutdown { .. } => "shutdown",
            Request::OwnTree { .. } => "own_tree",
            Request::Metrics => "metrics",
            Request::Apply { .. } => "apply",
        }
    }
}

/// A reply and the id of its request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyFrame {
    /// The request's id (0 when the request could not be read).
    pub id: u64,
    /// The outcome.
    #[serde(flatten)]
    pub body: ReplyBody,
}

/// Success or failure; or a part of a streamed reply.
///
/// A streamed reply (asked for with `"stream": true`) is the `ok` frame first, marked
/// `"more": true`, then any number of `items` frames (each a JSON array of rows of the kind the
/// `ok` frame announces, at most one frame long), then one `end` frame with the number of items
/// sent, or an `error` frame if the daemon could not finish. Nothing else is sent on the
/// connection meanwhile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(clippy::large_enum_variant)] // replies are built one at a time; boxing buys nothing
pub enum ReplyBody {
    /// Success.
    Ok(Reply),
    /// Failure.
    Error(ErrorBody),
    /// Rows of a streamed reply.
    Items(Vec<serde_json::Value>),
    /// The end of a streamed reply.
    End(StreamEnd),
}

/// A frame after the head of a streamed reply, with its rows decoded as `T` (what a client
/// reads; the daemon writes [`ReplyBody::Items`] and [`ReplyBody::End`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StreamPart<T> {
    /// The request's id.
    pub id: u64,
    /// Rows.
    #[serde(default = "Option::default")]
    pub items: Option<Vec<T>>,
    /// The end.
    #[serde(default)]
    pub end: Option<StreamEnd>,
    /// The daemon could not finish.
    #[serde(default)]
    pub error: Option<ErrorBody>,
}

/// The last frame of a streamed reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamEnd {
    /// Rows sent in `items` frames.
    pub count: u64,
}

/// Successful replies, tagged by `"reply"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// A reservation was made or found (acquire, create, lookup).
    Reservation(ReservationRef),
    /// Done, nothing to report (release, delete).
    Done,
    /// A socket was bound from a reservation; it travels as `SCM_RIGHTS` on this frame.
    Socket(SocketRef),
    /// Answer to [`Request::Status`].
    Status(StatusInfo),
    /// Answer to [`Request::Show`].
    Show(ShowInfo),
    /// Answer to [`Request::Who`].
    Who(WhoInfo),
    /// Answer to [`Request::Attach`].
    Attached(AttachInfo),
    /// Answer to [`Request::OwnTree`].
    OwnedTree(OwnedTreeInfo),
    /// Answer to [`Request::Metrics`].
    Metrics(MetricsInfo),
    /// Answer to [`Request::Apply`].
    Applied(ApplyInfo),
    /// Answer to [`Request::ClusterStatus`].
    Cluster(ClusterInfo),
}

/// Answer to [`Request::ClusterStatus`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    /// This member's name.
    pub node: String,
    /// The etcd client URLs.
    pub endpoints: Vec<String>,
    /// The key prefix.
    pub prefix: String,
    /// Whether this member is connected to etcd and registered.
    pub connected: bool,
    /// Why not, or the last error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The cluster's revision, as etcd last said.
    pub revision: i64,
    /// The revision this member has applied.
    pub applied_revision: i64,
    /// The revision of what this member keeps on disk for its next start (it resumes
    /// watching from there).
    #[serde(default)]
    pub saved_revision: i64,
    /// Cluster reservations (persistent and runtime) this member knows.
    pub reservations: u64,
    /// The live members (registered under a lease), this one included.
    pub members: Vec<ClusterMemberInfo>,
}

/// One member, as it last reported itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMemberInfo {
    /// Its name.
    pub node: String,
    /// Its daemon's pid (on its host).
    pub pid: u32,
    /// Its last heartbeat, milliseconds since the Unix epoch.
    pub heartbeat_ms: u64,
    /// How long ago that was, in milliseconds (by this member's clock).
    pub heartbeat_age_ms: u64,
    /// The revision it had applied at its last heartbeat.
    pub revision: i64,
    /// How many revisions that is behind the cluster's.
    pub behind: i64,
    /// Cluster reservations it failed to enforce, with why.
    pub failures: Vec<ClusterFailureInfo>,
}

/// A cluster reservation a member could not enforce.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterFailureInfo {
    /// The reservation's key.
    pub key: String,
    /// `"tcp"` or `"udp"`.
    pub protocol: String,
    /// First port.
    pub start: u16,
    /// Number of ports.
    pub count: u16,
    /// Why.
    pub why: String,
}

/// A cluster reservation's place in the cluster (in [`ReservationInfo`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterEntryInfo {
    /// Its key in etcd.
    pub key: String,
    /// The member that created it (a runtime block: whose session holds it).
    pub node: String,
    /// A runtime block of another member, kept free here.
    #[serde(default)]
    pub runtime: bool,
    /// The reservation file that declares it (`cluster = true` entries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// Each live member's state of it: `"enforced"` or `"failed: WHY"`.
    #[serde(default)]
    pub members: Vec<ClusterMemberState>,
}

/// One member's state of a cluster reservation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMemberState {
    /// The member.
    pub node: String,
    /// `"enforced"`, or `"failed: WHY"`.
    pub state: String,
}

/// Answer to [`Request::Metrics`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricsInfo {
    /// The exposition, in the Prometheus (OpenMetrics) text format.
    pub text: String,
}

/// Answer to [`Request::Apply`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyInfo {
    /// The directory read.
    pub dir: String,
    /// The files read (`*.toml`, in name order).
    pub files: Vec<String>,
    /// What differs between the files and the daemon (empty: nothing to do), in port order;
    /// only the first ones when there are more than one reply holds (see `not_listed`).
    pub changes: Vec<ApplyChange>,
    /// How many changes add, change and remove a reservation, listed or not.
    #[serde(default)]
    pub added: u64,
    /// See `added`.
    #[serde(default)]
    pub changed: u64,
    /// See `added`.
    #[serde(default)]
    pub removed: u64,
    /// Changes left out of `changes` to keep the reply within one frame.
    #[serde(default)]
    pub not_listed: u64,
    /// Reservations from files that are already as the files say.
    pub unchanged: u64,
    /// Identifies this difference, for applying exactly what was shown.
    pub digest: String,
    /// Whether the difference was applied (false for a dry run).
    pub applied: bool,
    /// Changes of cluster reservations (entries with `cluster = true`) that could not be made,
    /// each with its file and why (this host's part was applied, all or nothing, before them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cluster_errors: Vec<String>,
}

/// One difference between the files and the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyChange {
    /// Added, removed or changed.
    pub action: ChangeAction,
    /// `"tcp"` or `"udp"`.
    pub protocol: String,
    /// First port.
    pub start: u16,
    /// Number of ports.
    pub count: u16,
    /// The file of the entry (for a removal: the file it came from).
    pub file: String,
    /// The entry's line in its file (none for a removal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
    /// What the daemon has now (removed, changed), in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<String>,
    /// What the files ask for (added, changed), in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// `"cluster"` for an entry with `cluster = true` (a reservation of the whole cluster);
    /// absent for this host's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
}

/// The kind of an [`ApplyChange`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeAction {
    /// In the files, not in the daemon.
    Add,
    /// In the daemon (from a file), no longer in the files.
    Remove,
    /// In both, with another mode, access list, description or file.
    Change,
}

/// Answer to [`Request::OwnTree`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnedTreeInfo {
    /// The cgroup the caller now runs in (path below the cgroup2 root).
    pub cgroup: String,
}

/// What [`Request::Attach`] did with each token.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachInfo {
    /// Tokens now owned by this connection's session.
    pub kept: Vec<String>,
    /// Tokens that are not, and why.
    pub lost: Vec<LostToken>,
}

/// A token [`Request::Attach`] could not re-attach.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostToken {
    /// The token.
    pub token: String,
    /// Why, in words.
    pub why: String,
}

/// What the daemon restored when it started (`status`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreInfo {
    /// Seconds a stopped daemon's runtime reservations are kept for its successor (0: off).
    pub live_restore_secs: u64,
    /// The keeper process holding them across restarts, if live restore is on.
    #[serde(default)]
    pub keeper_pid: Option<u32>,
    /// Why live restore is not working, if it is not.
    #[serde(default)]
    pub problem: Option<String>,
    /// Whether this daemon took over from a predecessor's keeper at start.
    pub restored: bool,
    /// Runtime reservations restored at start.
    pub kept: u64,
    /// Runtime reservations dropped at start (their owner exited), by name.
    pub dropped: Vec<String>,
    /// Reservations whose enforcement could not be carried over, by name, with why.
    pub lost: Vec<String>,
    /// Hold blocks whose placeholders were handed over (never unbound).
    pub placeholders_kept: u64,
}

/// One live socket on a port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketInfo {
    /// `listening`, `bound`, `connected`, `time-wait`, ...
    pub state: String,
    /// Local address, e.g. `[::]:8080`.
    pub local: String,
    /// Remote address, for connected sockets.
    #[serde(default)]
    pub remote: Option<String>,
    /// Owner uid of the socket.
    pub uid: u32,
    /// Its user name.
    #[serde(default)]
    pub user: Option<String>,
    /// Socket inode (0 for TIME_WAIT).
    pub inode: u64,
    /// The (first) process holding it; null when none or not visible.
    pub pid: Option<u32>,
    /// Every process holding it.
    #[serde(default)]
    pub pids: Vec<u32>,
    /// Command line of `pid`.
    #[serde(default)]
    pub command: Option<String>,
    /// What portres knows of it: `"placeholder"` (hold layer) or `"handed out"`.
    #[serde(default)]
    pub role: Option<String>,
    /// The socket in words, as in conflict messages.
    pub description: String,
}

/// Answer to [`Request::Who`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhoInfo {
    /// `"tcp"` or `"udp"`.
    pub protocol: String,
    /// The port.
    pub port: u16,
    /// The reservation covering it, if any.
    pub reservation: Option<ReservationInfo>,
    /// Live sockets on it, in the daemon's network namespace: every one with `all`; otherwise
    /// those that are not connections (listeners, bound sockets), at most 100. In a streamed
    /// reply they follow as `items`.
    pub sockets: Vec<SocketInfo>,
    /// Every socket on the port, counted and summarised.
    #[serde(default)]
    pub summary: Option<WhoSummary>,
    /// `items` frames follow (a streamed reply).
    #[serde(default)]
    pub more: bool,
    /// What the daemon could not see, if anything (e.g. processes of other users when it is not
    /// root).
    #[serde(default)]
    pub not_visible: Option<String>,
}

/// Every socket on a port, summarised: what `who` says without `--all`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhoSummary {
    /// Sockets in all.
    pub sockets: u64,
    /// Count per state (`listening`, `connected`, `time-wait`, ...), largest first.
    pub by_state: Vec<Counted>,
    /// Count per process (`"nginx (pid 4121, user www-data)"`), largest first, at most 10.
    pub by_process: Vec<Counted>,
    /// Count per user, largest first, at most 10.
    pub by_user: Vec<Counted>,
    /// Connections per remote address (without port), largest first, at most 10.
    pub top_remotes: Vec<Counted>,
    /// Sockets not listed in `sockets` (without `all`).
    pub not_listed: u64,
}

/// A name and how many.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counted {
    /// What is counted.
    pub name: String,
    /// How many.
    pub count: u64,
}

/// A handed-out port of a reservation and the process holding its socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandedOutInfo {
    /// The port.
    pub port: u16,
    /// The (first) process holding the socket, when visible.
    pub pid: Option<u32>,
    /// Its command line.
    #[serde(default)]
    pub command: Option<String>,
}

/// A reservation's identity: token, protocol, block, mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservationRef {
    /// Decimal token.
    pub token: String,
    /// `"tcp"` or `"udp"`.
    pub protocol: String,
    /// First port.
    pub start: u16,
    /// Number of ports.
    pub count: u16,
    /// `"hold"` or `"exclude"`.
    pub mode: String,
}

/// The socket of an [`Request::Associate`] reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketRef {
    /// The port it is bound to.
    pub port: u16,
    /// The local address it is bound to.
    pub address: String,
    /// Descriptors attached to this frame (1).
    pub fds: u32,
}

/// A failure: the stable outcome name, the Windows code and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Outcome name (docs/behaviour.md §2), e.g. `"AddressInUse"`.
    pub code: String,
    /// The Windows code for the operation, e.g. 10048.
    pub windows_code: u32,
    /// What was asked, why it failed and what to do.
    pub message: String,
    /// For conflicts: the first conflicting port and its holder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conflict: Option<ConflictInfo>,
}

/// The first conflicting port of a refused request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConflictInfo {
    /// `"tcp"` or `"udp"`.
    pub protocol: String,
    /// The port.
    pub port: u16,
    /// `"reservation"` or `"socket"`.
    pub holder_kind: String,
    /// The holder in words.
    pub holder: String,
    /// The holder's owner, for reservations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<OwnerInfo>,
}

/// Who made a reservation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerInfo {
    /// Process id; null for persistent reservations.
    pub pid: Option<u32>,
    /// User id.
    pub uid: u32,
    /// User name, when it resolves.
    #[serde(default)]
    pub user: Option<String>,
    /// Command line, when known.
    #[serde(default)]
    pub command: Option<String>,
}

/// One row of [`ShowInfo`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservationInfo {
    /// `"tcp"` or `"udp"`.
    pub protocol: String,
    /// First port.
    pub start: u16,
    /// Number of ports.
    pub count: u16,
    /// `"runtime"` or `"persistent"`.
    pub kind: String,
    /// `"hold"` or `"exclude"`.
    pub mode: String,
    /// Decimal token; only shown to administrators and the reservation's owner.
    #[serde(default)]
    pub token: Option<String>,
    /// Who made it.
    pub owner: OwnerInfo,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// Ports of the block handed out to sockets (the first 2,048; `handed_out_count` has all).
    #[serde(default)]
    pub handed_out: Vec<u16>,
    /// The same, with the process holding each socket (the first 128).
    #[serde(default)]
    pub handed_out_to: Vec<HandedOutInfo>,
    /// How many ports of the block are handed out.
    #[serde(default)]
    pub handed_out_count: u32,
    /// Users allowed to consume it (persistent only).
    #[serde(default)]
    pub allow_users: Vec<String>,
    /// Groups allowed to consume it (persistent only).
    #[serde(default)]
    pub allow_groups: Vec<String>,
    /// Who may bind its ports by number, when the deny layer is on (e.g. "only processes in
    /// cgroup /user.slice/portres-run-123 may bind it").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binds: Option<String>,
    /// The network namespace (port space) the reservation is in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<NetnsInfo>,
    /// Where a persistent reservation came from: `"file"` (declared in a file of
    /// `reservations_dir`, managed by `portres apply`) or `"api"` (created by a request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The file that declares it (`source` `"file"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// Why it exists, as its file says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// `"host"` (this host's own) or `"cluster"` (a reservation of the whole cluster, enforced
    /// here as on every member).
    #[serde(default = "host_scope")]
    pub scope: String,
    /// Where a cluster reservation lives in the cluster, and each member's state of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterEntryInfo>,
}

fn host_scope() -> String {
    "host".into()
}

/// A network namespace the daemon serves (in [`ReservationInfo`] and [`StatusInfo`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetnsInfo {
    /// Its inode (`ls -l /proc/PID/ns/net` shows `net:[INODE]`).
    pub inode: u64,
    /// Whether it is the daemon's own namespace (persistent reservations live there).
    pub daemon: bool,
    /// Its `ip netns` name (a file of `/run/netns`), if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// A process that lives in it (the first client served there): pid and command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// That process's command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
}

/// One network namespace the daemon serves, in [`StatusInfo`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceStatus {
    /// Which.
    pub netns: NetnsInfo,
    /// Sessions served in it.
    pub sessions: u64,
    /// Reservations in it.
    pub reservations: u64,
    /// Ports those reservations cover.
    pub ports_reserved: u64,
}

/// Answer to [`Request::Show`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShowInfo {
    /// Sorted by protocol, then start port. In a streamed reply, empty: the rows follow as
    /// `items`.
    pub reservations: Vec<ReservationInfo>,
    /// `items` frames follow (a streamed reply).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub more: bool,
    /// Rows that pass the filters (in a streamed reply, announced here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
}

/// One enforcement layer of docs/behaviour.md §3.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerInfo {
    /// `"hold"`, `"exclude"` or `"deny"`.
    pub name: String,
    /// Whether it is in force.
    pub active: bool,
    /// Why (not).
    pub reason: String,
}

/// Counts reported by status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Open client connections.
    pub sessions: u64,
    /// Live runtime reservations.
    pub runtime: u64,
    /// Persistent reservations.
    pub persistent: u64,
    /// Runtime reservations in hold mode.
    #[serde(default)]
    pub runtime_hold: u64,
    /// Runtime reservations in exclude mode.
    #[serde(default)]
    pub runtime_exclude: u64,
    /// Persistent reservations in hold mode.
    #[serde(default)]
    pub persistent_hold: u64,
    /// Persistent reservations in exclude mode.
    #[serde(default)]
    pub persistent_exclude: u64,
    /// Ports in all blocks.
    pub ports_reserved: u64,
    /// Ports kept bound by placeholders (hold layer).
    #[serde(default)]
    pub ports_held: u64,
    /// Ports handed out to sockets.
    #[serde(default)]
    pub ports_handed_out: u64,
    /// Times the daemon stopped accepting connections because it ran out of descriptors
    /// (new clients then wait in the listen queue until a session ends).
    #[serde(default)]
    pub accept_paused: u64,
    /// The daemon's open-file limit.
    #[serde(default)]
    pub open_files_limit: u64,
}

/// Answer to [`Request::Status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    /// The daemon's program version.
    pub daemon_version: String,
    /// Protocol version in use.
    pub protocol_version: u32,
    /// The daemon's pid.
    pub pid: u32,
    /// Seconds since it started.
    pub uptime_secs: u64,
    /// `"system"` or `"user"`.
    pub scope: String,
    /// Its socket path.
    pub socket: String,
    /// Its state directory.
    pub state_dir: String,
    /// Where wildcard blocks come from, `"FIRST-LAST"`.
    pub dynamic_range: String,
    /// Where the dynamic range came from.
    pub dynamic_range_source: String,
    /// Runtime ports a non-admin user may hold.
    pub runtime_quota_ports: u32,
    /// Enforcement layers.
    pub layers: Vec<LayerInfo>,
    /// Counts.
    pub counts: Counts,
    /// Live restore: the keeper, and what was restored at start.
    #[serde(default)]
    pub restore: Option<RestoreInfo>,
    /// The deny layer, when it is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny: Option<DenyInfo>,
    /// The network namespace the caller is served in (its counts, dynamic range and layers
    /// are that namespace's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<NetnsInfo>,
    /// Every network namespace the daemon serves (the daemon's own first); `namespaces` says
    /// whether clients are served in their own (`"client"`) or all in the daemon's
    /// (`"daemon"`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<NamespaceStatus>,
    /// `"client"` or `"daemon"` (see [`StatusInfo::namespaces`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_mode: Option<String>,
    /// Persistent reservations of named network namespaces that could not be loaded or are
    /// not enforced (e.g. the namespace does not exist), each with the reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespace_problems: Vec<String>,
    /// Where the daemon also answers Google's portserver protocol, and from which ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub portserver: Option<String>,
    /// Declarative reservations: their directory, how many, and the last problem.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub declared: Option<DeclaredStatus>,
    /// The metrics endpoint: `"http://ADDR/metrics"`, or `"NOT SERVED: why"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
}

/// Declarative reservations (in [`StatusInfo`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeclaredStatus {
    /// The directory of reservation files.
    pub dir: String,
    /// Persistent reservations that came from its files.
    pub reservations: u64,
    /// What went wrong at the last application of the files (at start or `apply`), if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// The deny layer's kernel objects (in [`StatusInfo`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DenyInfo {
    /// The bind4 and bind6 programs' kernel ids.
    pub program_ids: Vec<u32>,
    /// Their links' ids (attached at the cgroup2 root).
    pub link_ids: Vec<u32>,
    /// The ports map's id.
    pub map_id: u32,
    /// Entries in the ports map (each block is at most 30).
    pub map_entries: u64,
    /// Blocks in it.
    pub blocks: u64,
    /// Where the programs and maps are pinned in bpffs.
    pub pin_dir: String,
    /// The cgroup2 root the programs are attached to.
    pub cgroup_root: String,
    /// The errno a refused bind fails with.
    pub errno: String,
    /// Whether it is keyed without network namespaces.
    pub all_namespaces: bool,
}
