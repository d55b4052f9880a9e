//! Cluster mode on etcd v3 (feature `cluster`, `[cluster]` in the configuration; the design and
//! its failure cases are in ARCHITECTURE.md, "Cluster mode").
//!
//! Every member keeps enforcing locally with its own kernel layers: a cluster reservation is
//! mirrored into the member's table as a persistent reservation whose `Origin.cluster` names its
//! key (and into its store, so it holds across restarts and while etcd is unreachable). The keys,
//! under the prefix (default `/portres/`):
//!
//! - `members/NODE`: a member's record (pid, heartbeat, applied revision, failures), attached
//!   to its lease: it disappears `lease_ttl_secs` after the member stops renewing it.
//! - `reservations/PROTO/START`: a cluster reservation (JSON, [`ClusterEntry`]); a runtime one is
//!   attached to its session's lease.
//! - `alloc`: touched by every create in the same transaction, compared by mod revision (no
//!   lost update between concurrent creators).
//! - `proposals/ID` and `verdicts/ID/NODE`: a create asks every live member first; both live
//!   under the proposal's short lease.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, PutOptions, Txn,
    TxnOp, TxnOpResponse, WatchOptions,
};
use portres_core::{
    Acl, Caller, ClusterOrigin, ErrorCode, Mode, Operation, Owner, PortRange, Protocol, Refusal,
    Reservation, SessionId, Token,
};
use portres_proto::{
    ClusterEntryInfo, ClusterFailureInfo, ClusterInfo, ClusterMemberInfo, ClusterMemberState,
};
use serde::{Deserialize, Serialize};

use crate::Shared;
use crate::config::ClusterConfig;
use crate::declared::{self, Entry, Plan};

/// Runs one etcd call (`$call`, evaluated anew for each try), each try bounded by the request
/// timeout; a failed try is made again (the client may have sent it to a member that just
/// died) until twice the request timeout has passed. Every call made through here can be made
/// twice: puts and reads are idempotent, and the transactions compare first. A `Refusal`
/// naming the endpoints when it still fails.
macro_rules! etcd_call {
    ($cluster:expr, $op:expr, $what:expr, $client:ident => $call:expr) => {{
        let cluster: &Cluster = &$cluster;
        let limit = cluster.cfg.request_timeout;
        let began = std::time::Instant::now();
        loop {
            let (why, again) = match tokio::time::timeout(limit, $call).await {
                Ok(Ok(v)) => break Ok(v),
                Ok(Err(e)) => (e.to_string(), retryable(&e)),
                Err(_) => (format!("no answer within {} ms", limit.as_millis()), true),
            };
            if !again {
                break Err(cluster.refused_by_etcd($op, $what, &why));
            }
            if !cluster.try_again(began, $what, &why) {
                break Err(cluster.unreachable($op, $what, &why));
            }
            tokio::time::sleep(limit / 20).await;
            // The member's link may have moved to another endpoint meanwhile.
            if let Ok(c) = cluster.client($op, $what) {
                $client = c;
            }
        }
    }};
}

/// Whether an etcd call that failed so may succeed if made again (on another endpoint, or
/// once a leader is elected): transport failures and the statuses of an unavailable member.
fn retryable(e: &etcd_client::Error) -> bool {
    use tonic::Code;
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(s) => match s.code() {
            Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled => true,
            // A connection that broke under the call (h2, transport) is reported so too.
            Code::Internal => {
                let m = s.message().to_ascii_lowercase();
                m.contains("h2") || m.contains("transport") || m.contains("connection")
            }
            _ => false,
        },
        _ => false,
    }
}

/// A cluster reservation as kept in etcd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ClusterEntry {
    pub(crate) protocol: String,
    pub(crate) start: u16,
    pub(crate) count: u16,
    pub(crate) mode: String,
    #[serde(default)]
    pub(crate) allow_users: Vec<u32>,
    #[serde(default)]
    pub(crate) allow_groups: Vec<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) description: Option<String>,
    /// The member that created it (a runtime block: whose session holds it).
    pub(crate) node: String,
    /// A runtime block (attached to its session's lease).
    #[serde(default)]
    pub(crate) runtime: bool,
    pub(crate) created: u64,
    pub(crate) creator_uid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) creator_command: Option<String>,
    /// The reservation file that declares it (`cluster = true`; managed by `portres apply`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) file: Option<String>,
}

impl ClusterEntry {
    fn range(&self) -> Option<(Protocol, PortRange)> {
        let p: Protocol = self.protocol.parse().ok()?;
        let r = PortRange::new(self.start.into(), self.count.into()).ok()?;
        Some((p, r))
    }

    /// As a member enforces it: another member's runtime block is kept free (exclude, for
    /// administrators only); a persistent one as it says.
    fn to_entry(&self, key: &str) -> Option<Entry> {
        let (protocol, range) = self.range()?;
        let mode: Mode = if self.runtime {
            Mode::Exclude
        } else {
            self.mode.parse().ok()?
        };
        let acl = if self.runtime {
            Acl::default()
        } else {
            self.acl()
        };
        Some(Entry {
            file: format!("cluster reservation {key}"),
            line: 0,
            cluster: Some(ClusterOrigin {
                key: key.to_string(),
                node: self.node.clone(),
                runtime: self.runtime,
            }),
            protocol,
            range,
            mode,
            acl,
            description: self.description.clone(),
            in_cluster: true,
        })
    }

    fn acl(&self) -> Acl {
        declared::normalised(Acl {
            users: self.allow_users.clone(),
            groups: self.allow_groups.clone(),
        })
    }

    /// Whether it is reservation-file entry `e` as `e` says it (block, mode, access list,
    /// description, file).
    fn declares(&self, e: &Entry) -> bool {
        !self.runtime
            && self.protocol == e.protocol.as_str()
            && self.start == e.range.start()
            && self.count == e.range.count()
            && self.mode == e.mode.as_str()
            && self.acl() == e.acl
            && self.description == e.description
            && self.file.as_deref() == Some(e.file.as_str())
    }

    /// As the reservation files' difference shows it.
    fn diff_words(&self) -> String {
        let mode: Mode = self.mode.parse().unwrap_or(Mode::Exclude);
        declared::words(
            mode,
            &self.acl(),
            self.description.as_deref(),
            self.file.as_deref(),
        )
    }

    fn words(&self) -> String {
        format!(
            "{}/{} ({}, created on {})",
            PortRange::new(self.start.into(), self.count.into()).map_or_else(
                |_| format!("{}+{}", self.start, self.count),
                |r| r.to_string()
            ),
            self.protocol,
            if self.runtime {
                "runtime"
            } else {
                self.mode.as_str()
            },
            self.node
        )
    }
}

/// A member's record under `members/NODE`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct MemberRecord {
    node: String,
    pid: u32,
    heartbeat_ms: u64,
    revision: i64,
    #[serde(default)]
    failures: Vec<ClusterFailureInfo>,
}

/// A member's answer to a proposal.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Verdict {
    ok: bool,
    #[serde(default)]
    why: Option<String>,
}

/// This member's view of the cluster's reservations, as of `revision`; kept between restarts
/// as `STATE/cluster.json`, to resume watching from there.
#[derive(Debug, Default, Serialize, Deserialize)]
struct View {
    /// Events up to here are applied.
    revision: i64,
    /// `alloc`'s mod revision as of `revision`.
    alloc_revision: i64,
    /// Cluster reservations by key, with their mod revision.
    entries: BTreeMap<String, (ClusterEntry, i64)>,
    /// The lease of each runtime block's key (to renew its own after a restart).
    #[serde(default)]
    leases: BTreeMap<String, i64>,
    /// The etcd cluster's id and the key prefix the revisions are of (another etcd, or
    /// another prefix, is listed in full).
    #[serde(default)]
    etcd_cluster: u64,
    #[serde(default)]
    prefix: String,
}

impl View {
    /// Takes in reservation `key` as etcd has it.
    fn put(&mut self, key: &str, kv: &KeyValue) -> Result<(), serde_json::Error> {
        let e = serde_json::from_slice::<ClusterEntry>(kv.value())?;
        if kv.lease() != 0 {
            self.leases.insert(key.to_string(), kv.lease());
        }
        self.entries.insert(key.to_string(), (e, kv.mod_revision()));
        Ok(())
    }
}

#[derive(Default)]
struct Inner {
    client: Option<Client>,
    connected: bool,
    error: Option<String>,
    /// The cluster's revision, as etcd last said.
    cluster_revision: i64,
    view: View,
    members: BTreeMap<String, MemberRecord>,
    /// Cluster reservations this member failed to enforce, by key.
    failures: BTreeMap<String, ClusterFailureInfo>,
    /// The snapshot is behind the view.
    dirty: bool,
    /// The member's lease while linked (revoked when the daemon stops).
    member_lease: i64,
    /// Where the history replayed at the last join ends.
    caught_up_at: i64,
    /// Proposals seen in that replay, not ended: answered once it is over.
    replayed: BTreeMap<String, (ClusterEntry, i64)>,
    /// The revision of the snapshot on disk, and when it was written.
    saved: i64,
    saved_at: Option<std::time::Instant>,
}

/// What the metrics show of the cluster.
pub(crate) struct ClusterCounts {
    pub(crate) connected: bool,
    pub(crate) members: usize,
    pub(crate) reservations: usize,
    pub(crate) failures: usize,
    pub(crate) revision: i64,
    pub(crate) applied: i64,
}

/// This member's link to the cluster.
pub(crate) struct Cluster {
    pub(crate) cfg: ClusterConfig,
    inner: Mutex<Inner>,
    /// The revision applied locally, for creators waiting until they enforce what they made.
    applied: tokio::sync::watch::Sender<i64>,
    snapshot_path: PathBuf,
    /// The endpoint to connect to next (an index into `cfg.endpoints`, modulo its length).
    endpoint: std::sync::atomic::AtomicUsize,
    /// This member's sessions' runtime blocks in the cluster.
    runtime: Mutex<RuntimeBlocks>,
    /// The reservation files' cluster entries were added (at the first join).
    declared_added: std::sync::atomic::AtomicBool,
    /// The link's task (aborted when the daemon stops).
    task: Mutex<Option<tokio::task::AbortHandle>>,
}

/// The runtime blocks this member granted, each with its session and the lease its key is
/// attached to; the leases this member renews (with their renewing task); and the lease a
/// session's next block gets.
#[derive(Default)]
struct RuntimeBlocks {
    blocks: std::collections::HashMap<Token, Block>,
    leases: std::collections::HashMap<i64, tokio::task::AbortHandle>,
    session_lease: std::collections::HashMap<SessionId, i64>,
}

/// One runtime block of this member's in the cluster.
#[derive(Debug, Clone)]
struct Block {
    session: SessionId,
    key: String,
    lease: i64,
}

/// Least time between two snapshot writes caused by changes (the heartbeat writes the rest).
const SNAPSHOT_EVERY: Duration = Duration::from_millis(200);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn refusal(op: Operation, code: ErrorCode, message: String) -> Refusal {
    Refusal::new(op, code, message)
}

impl Cluster {
    /// This member, with what it kept of the cluster at its last run.
    pub(crate) fn new(cfg: ClusterConfig, state_dir: &std::path::Path) -> Cluster {
        let snapshot_path = state_dir.join("cluster.json");
        let view: View = std::fs::read(&snapshot_path)
            .ok()
            .and_then(|b| serde_json::from_slice::<View>(&b).ok())
            // Another prefix is another cluster: its revisions say nothing here.
            .filter(|v| v.prefix == cfg.prefix)
            .unwrap_or_else(|| View {
                prefix: cfg.prefix.clone(),
                ..View::default()
            });
        let (applied, _) = tokio::sync::watch::channel(view.revision);
        let inner = Inner {
            saved: view.revision,
            view,
            error: Some("not connected yet".into()),
            ..Inner::default()
        };
        Cluster {
            cfg,
            inner: Mutex::new(inner),
            applied,
            snapshot_path,
            endpoint: std::sync::atomic::AtomicUsize::new(0),
            runtime: Mutex::new(RuntimeBlocks::default()),
            declared_added: std::sync::atomic::AtomicBool::new(false),
            task: Mutex::new(None),
        }
    }

    fn key(&self, what: &str) -> String {
        format!("{}{what}", self.cfg.prefix)
    }

    pub(crate) fn reservation_key(&self, protocol: Protocol, start: u16) -> String {
        self.key(&format!("reservations/{}/{start:05}", protocol.as_str()))
    }

    fn endpoints(&self) -> String {
        self.cfg.endpoints.join(", ")
    }

    /// The error of a cluster operation that cannot reach etcd.
    fn unreachable(&self, op: Operation, what: &str, why: &str) -> Refusal {
        refusal(
            op,
            ErrorCode::Internal,
            format!(
                "{what}: etcd is unreachable at {} ({why}); nothing was changed; host-local \
                 operations keep working and the cluster reservations already made stay \
                 enforced here; `portres cluster status` shows the link",
                self.endpoints()
            ),
        )
    }

    /// An etcd call refused for a reason trying again would not change (e.g. a lease that
    /// expired meanwhile, permissions).
    fn refused_by_etcd(&self, op: Operation, what: &str, why: &str) -> Refusal {
        refusal(
            op,
            ErrorCode::Internal,
            format!("{what}: etcd refused it: {why}; nothing was changed"),
        )
    }

    /// A connected client, or why not.
    fn client(&self, op: Operation, what: &str) -> Result<Client, Refusal> {
        let inner = self.inner.lock().unwrap();
        match (&inner.client, inner.connected) {
            (Some(c), true) => Ok(c.clone()),
            _ => Err(self.unreachable(op, what, inner.error.as_deref().unwrap_or("not connected"))),
        }
    }

    /// A connected client, waiting up to twice the request timeout for the link (it may be
    /// moving to another endpoint, which may be electing a leader), or why not.
    async fn linked_client(&self, op: Operation, what: &str) -> Result<Client, Refusal> {
        let began = std::time::Instant::now();
        loop {
            match self.client(op, what) {
                Ok(c) => return Ok(c),
                Err(e) if began.elapsed() >= self.cfg.request_timeout * 2 => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// How often leases are renewed and the member's record written: a third of the lease's
    /// time to live.
    fn beat(&self) -> Duration {
        Duration::from_millis((self.cfg.lease_ttl_secs * 1000 / 3).max(300))
    }

    /// Whether a failed try of an etcd call that began at `began` may be made again (twice
    /// the request timeout in all).
    fn try_again(&self, began: std::time::Instant, what: &str, why: &str) -> bool {
        let limit = self.cfg.request_timeout;
        if began.elapsed() + limit / 4 >= limit * 2 {
            return false;
        }
        tracing::debug!("cluster: {what}: {why}; trying again");
        true
    }

    /// The cluster reservations this member enforces: all but its own sessions' runtime blocks.
    fn wanted(&self) -> Vec<Entry> {
        let inner = self.inner.lock().unwrap();
        inner
            .view
            .entries
            .iter()
            .filter(|(_, (e, _))| !(e.runtime && e.node == self.cfg.node))
            .filter_map(|(k, (e, _))| e.to_entry(k))
            .collect()
    }

    /// The cluster reservation overlapping `range`, if any.
    fn overlapping(&self, protocol: Protocol, range: PortRange) -> Option<(String, ClusterEntry)> {
        let inner = self.inner.lock().unwrap();
        inner
            .view
            .entries
            .iter()
            .find(|(_, (e, _))| {
                e.range()
                    .is_some_and(|(p, r)| p == protocol && r.overlaps(range))
            })
            .map(|(k, (e, _))| (k.clone(), e.clone()))
    }

    /// For `show`: a runtime block of this member's that is held in the cluster.
    pub(crate) fn runtime_info(&self, token: Token) -> Option<ClusterEntryInfo> {
        let key = self.runtime.lock().unwrap().blocks.get(&token)?.key.clone();
        Some(self.entry_info(&ClusterOrigin {
            key,
            node: self.cfg.node.clone(),
            runtime: true,
        }))
    }

    /// Deletes `key` if it is still attached to `lease` (another block may have the key by
    /// now, if this one's lease ran out meanwhile); `what` for the log.
    async fn delete_runtime_key(&self, key: &str, lease: i64, what: &str) -> Option<i64> {
        let Ok(mut client) = self.client(Operation::ReleaseRuntime, what) else {
            // Its lease ends with its session, or with this daemon.
            return None;
        };
        let txn = Txn::new()
            .when([Compare::lease(key, CompareOp::Equal, lease)])
            .and_then([TxnOp::delete(key, None)]);
        let done: Result<_, Refusal> = etcd_call!(
            self,
            Operation::ReleaseRuntime,
            what,
            client => client.txn(txn.clone())
        );
        match done {
            Ok(r) => r.header().map(|h| h.revision()),
            Err(e) => {
                tracing::warn!(
                    "cluster: cannot delete {key}: {}; it goes with its lease",
                    e.message
                );
                None
            }
        }
    }

    /// A runtime block of this member was released: out of the cluster before the reply (the
    /// same block may be asked for again at once).
    pub(crate) async fn released(self: &Arc<Self>, token: Token) {
        let Some(b) = self.runtime.lock().unwrap().blocks.remove(&token) else {
            return;
        };
        // Out of this member's view too before the reply.
        if let Some(rev) = self.delete_runtime_key(&b.key, b.lease, "release").await {
            self.wait_applied(rev).await;
        }
        self.forget_unused_lease(b.lease);
    }

    /// A block moved to another session (`attach` after a restart): it ends with that one.
    pub(crate) fn attached(&self, token: Token, session: SessionId) {
        if let Some(b) = self.runtime.lock().unwrap().blocks.get_mut(&token) {
            b.session = session;
        }
    }

    /// Revokes `lease` if no block of this member uses it any more and no session will give
    /// it to its next block.
    fn forget_unused_lease(&self, lease: i64) {
        let task = {
            let mut rt = self.runtime.lock().unwrap();
            let used = rt.blocks.values().any(|b| b.lease == lease)
                || rt.session_lease.values().any(|&l| l == lease);
            if used {
                return;
            }
            rt.leases.remove(&lease)
        };
        let Some(task) = task else { return };
        task.abort();
        // Without a link it is simply not renewed any more: it expires after lease_ttl_secs.
        if let Ok(client) = self.client(Operation::ReleaseRuntime, "release") {
            drop(RevokeOnDrop(client, lease));
        }
    }

    /// A session ended: its blocks leave the cluster (their lease is revoked, or, when a block
    /// that moved to another session shares it, their keys are deleted). `now_of` says which
    /// session a block belongs to now, for blocks an `attach` moved without telling.
    pub(crate) fn session_ended(
        self: &Arc<Self>,
        session: SessionId,
        now_of: impl Fn(Token) -> Option<SessionId>,
    ) {
        let (ended, leases) = {
            let mut rt = self.runtime.lock().unwrap();
            let mut ended = Vec::new();
            for (token, b) in rt.blocks.iter_mut() {
                if b.session != session {
                    continue;
                }
                match now_of(*token) {
                    Some(now) if now != session => b.session = now,
                    _ => ended.push(*token),
                }
            }
            let ended: Vec<Block> = ended
                .into_iter()
                .filter_map(|t| rt.blocks.remove(&t))
                .collect();
            let mut leases: Vec<i64> = ended.iter().map(|b| b.lease).collect();
            leases.extend(rt.session_lease.remove(&session));
            leases.sort_unstable();
            leases.dedup();
            (ended, leases)
        };
        if ended.is_empty() && leases.is_empty() {
            return;
        }
        // Keys of a lease that lives on (shared with a moved block) are deleted one by one.
        let shared_leases: Vec<i64> = {
            let rt = self.runtime.lock().unwrap();
            leases
                .iter()
                .copied()
                .filter(|l| rt.blocks.values().any(|b| b.lease == *l))
                .collect()
        };
        for b in ended
            .into_iter()
            .filter(|b| shared_leases.contains(&b.lease))
        {
            let cluster = self.clone();
            tokio::spawn(async move {
                cluster
                    .delete_runtime_key(&b.key, b.lease, "session end")
                    .await
            });
        }
        for l in leases {
            self.forget_unused_lease(l);
        }
    }

    /// The lease of `session`'s next runtime block: granted at its first, then renewed by a
    /// task of its own (over whichever connection the member has) while blocks use it.
    async fn session_lease(
        self: &Arc<Self>,
        session: SessionId,
        client: &mut Client,
        op: Operation,
        what: &str,
    ) -> Result<i64, Refusal> {
        {
            let rt = self.runtime.lock().unwrap();
            if let Some(l) = rt.session_lease.get(&session)
                && rt.leases.contains_key(l)
            {
                return Ok(*l);
            }
        }
        let ttl = self.cfg.lease_ttl_secs as i64;
        let mut client = client.clone();
        let lease = etcd_call!(self, op, what, client => client.lease_grant(ttl, None))?.id();
        let cluster = self.clone();
        let task = tokio::spawn(async move { cluster.keep_lease_alive(lease).await });
        let mut rt = self.runtime.lock().unwrap();
        rt.leases.insert(lease, task.abort_handle());
        rt.session_lease.insert(session, lease);
        Ok(lease)
    }

    /// Renews `lease` every third of its time to live, over the member's current connection,
    /// until aborted (no block uses it) or the lease is gone: then its blocks are no longer
    /// in the cluster, and are forgotten.
    async fn keep_lease_alive(self: Arc<Self>, lease: i64) {
        let beat = self.beat();
        loop {
            let Ok(mut client) = self.client(Operation::Other, "lease") else {
                tokio::time::sleep(beat / 4).await;
                continue;
            };
            let Ok(Ok((mut keeper, mut stream))) =
                tokio::time::timeout(self.cfg.request_timeout, client.lease_keep_alive(lease))
                    .await
            else {
                tokio::time::sleep(beat / 4).await;
                continue;
            };
            loop {
                if keeper.keep_alive().await.is_err() {
                    break;
                }
                match tokio::time::timeout(self.cfg.request_timeout, stream.message()).await {
                    Ok(Ok(Some(r))) if r.ttl() > 0 => {}
                    Ok(Ok(Some(_))) => {
                        let lost = {
                            let mut rt = self.runtime.lock().unwrap();
                            rt.leases.remove(&lease);
                            rt.session_lease.retain(|_, l| *l != lease);
                            let before = rt.blocks.len();
                            rt.blocks.retain(|_, b| b.lease != lease);
                            before - rt.blocks.len()
                        };
                        tracing::error!(
                            "cluster: lease {lease:x} of {lost} runtime blocks expired (this \
                             member was out of touch for longer than {} s): the other members \
                             no longer keep those blocks free; they stay held here",
                            self.cfg.lease_ttl_secs
                        );
                        return;
                    }
                    _ => break,
                }
                tokio::time::sleep(beat).await;
            }
        }
    }

    /// The daemon stops: its snapshot is written, and its membership revoked at once (creates
    /// on other members need not wait for it to expire); with `release`, its sessions' runtime
    /// blocks leave the cluster too (otherwise a successor carries them on and renews them).
    pub(crate) async fn leave(&self, release: bool) {
        // The link's task first: it would register the member again once its lease is gone.
        if let Some(task) = self.task.lock().unwrap().take() {
            task.abort();
        }
        self.inner.lock().unwrap().dirty = true;
        self.write_snapshot(false);
        let (client, member) = {
            let inner = self.inner.lock().unwrap();
            (inner.client.clone(), inner.member_lease)
        };
        let Some(client) = client else { return };
        let mut leases = vec![member];
        if release {
            let rt = self.runtime.lock().unwrap();
            leases.extend(rt.leases.keys().copied());
        }
        // All at once, within one deadline: a stop never waits long for etcd.
        let revokes: Vec<_> = leases
            .into_iter()
            .filter(|&l| l != 0)
            .map(|l| {
                let mut c = client.clone();
                tokio::spawn(async move {
                    let _ = c.lease_revoke(l).await;
                })
            })
            .collect();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            for r in revokes {
                let _ = r.await;
            }
        })
        .await;
        tracing::info!("cluster: member {} left the cluster", self.cfg.node);
    }

    /// For the metrics: counts only.
    pub(crate) fn metrics(&self) -> ClusterCounts {
        let inner = self.inner.lock().unwrap();
        ClusterCounts {
            connected: inner.connected,
            members: inner.members.len(),
            reservations: inner.view.entries.len(),
            failures: inner.failures.len(),
            revision: inner.cluster_revision,
            applied: inner.view.revision,
        }
    }

    /// For `show`: the place of a cluster reservation and each live member's state of it.
    pub(crate) fn entry_info(&self, origin: &ClusterOrigin) -> ClusterEntryInfo {
        let inner = self.inner.lock().unwrap();
        let made_at = inner
            .view
            .entries
            .get(&origin.key)
            .map_or(0, |(_, rev)| *rev);
        let members = inner
            .members
            .values()
            .map(|m| ClusterMemberState {
                node: m.node.clone(),
                state: if let Some(f) = m.failures.iter().find(|f| f.key == origin.key) {
                    format!("failed: {}", f.why)
                } else if m.revision < made_at {
                    "pending".into()
                } else {
                    "enforced".into()
                },
            })
            .collect();
        ClusterEntryInfo {
            key: origin.key.clone(),
            node: origin.node.clone(),
            runtime: origin.runtime,
            file: inner
                .view
                .entries
                .get(&origin.key)
                .and_then(|(e, _)| e.file.clone()),
            members,
        }
    }

    fn record(&self) -> MemberRecord {
        let inner = self.inner.lock().unwrap();
        MemberRecord {
            node: self.cfg.node.clone(),
            pid: std::process::id(),
            heartbeat_ms: now_ms(),
            revision: inner.view.revision,
            failures: inner.failures.values().cloned().collect(),
        }
    }

    fn set_down(&self, why: String) {
        let mut inner = self.inner.lock().unwrap();
        if inner.connected {
            tracing::error!(
                "cluster: lost etcd at {}: {why}; cluster reservations stay enforced; \
                 reconnecting",
                self.endpoints()
            );
        }
        inner.connected = false;
        inner.client = None;
        inner.error = Some(why);
    }

    /// Writes the snapshot if it is behind; with `soon`, only if the last write is at least
    /// [`SNAPSHOT_EVERY`] old (a burst of changes is written once).
    fn write_snapshot(&self, soon: bool) {
        let (bytes, revision) = {
            let mut inner = self.inner.lock().unwrap();
            if !inner.dirty
                || (soon && inner.saved_at.is_some_and(|t| t.elapsed() < SNAPSHOT_EVERY))
            {
                return;
            }
            inner.dirty = false;
            inner.saved_at = Some(std::time::Instant::now());
            (serde_json::to_vec(&inner.view), inner.view.revision)
        };
        let Ok(bytes) = bytes else { return };
        let tmp = self.snapshot_path.with_extension("json.tmp");
        if let Err(e) =
            std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, &self.snapshot_path))
        {
            tracing::warn!(error = %e, "cluster: cannot write {}", self.snapshot_path.display());
            return;
        }
        self.inner.lock().unwrap().saved = revision;
    }

    /// `portres cluster status`.
    pub(crate) async fn status(&self) -> ClusterInfo {
        let mut info = {
            let inner = self.inner.lock().unwrap();
            ClusterInfo {
                node: self.cfg.node.clone(),
                endpoints: self.cfg.endpoints.clone(),
                prefix: self.cfg.prefix.clone(),
                connected: inner.connected,
                error: inner.error.clone(),
                revision: inner.cluster_revision,
                applied_revision: inner.view.revision,
                saved_revision: inner.saved,
                reservations: inner.view.entries.len() as u64,
                members: Vec::new(),
            }
        };
        // The members as etcd has them now; else as this member last saw them.
        let op = Operation::Other;
        let mut fetched = None;
        if let Ok(mut c) = self.client(op, "cluster status") {
            let key = self.key("members/");
            let got: Result<_, Refusal> = etcd_call!(
                self,
                op,
                "cluster status",
                c => c.get(key.clone(), Some(GetOptions::new().with_prefix()))
            );
            match got {
                Ok(r) => {
                    if let Some(h) = r.header() {
                        info.revision = h.revision();
                    }
                    fetched = Some(
                        r.kvs()
                            .iter()
                            .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
                            .collect::<Vec<MemberRecord>>(),
                    );
                }
                Err(e) => info.error = Some(e.message),
            }
        }
        let members = fetched.unwrap_or_else(|| {
            let inner = self.inner.lock().unwrap();
            inner.members.values().cloned().collect()
        });
        let now = now_ms();
        info.members = members
            .into_iter()
            .map(|m| ClusterMemberInfo {
                heartbeat_age_ms: now.saturating_sub(m.heartbeat_ms),
                behind: (info.revision - m.revision).max(0),
                node: m.node,
                pid: m.pid,
                heartbeat_ms: m.heartbeat_ms,
                revision: m.revision,
                failures: m.failures,
            })
            .collect();
        info
    }

    /// Waits (at most the request timeout) until this member has applied `revision`.
    async fn wait_applied(&self, revision: i64) -> bool {
        let mut rx = self.applied.subscribe();
        tokio::time::timeout(self.cfg.request_timeout, rx.wait_for(|&r| r >= revision))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// Starts the member's link to the cluster (reconnecting for ever).
pub(crate) fn start(shared: &Arc<Shared>) {
    let Some(cluster) = shared.cluster.clone() else {
        return;
    };
    let shared = shared.clone();
    let c = cluster.clone();
    let task = tokio::spawn(async move {
        let cluster = c;
        let mut backoff = Duration::from_millis(200);
        loop {
            let why = match serve(&shared, &cluster).await {
                Ok(()) => return,
                Err(why) => why,
            };
            // A link that was up starts over with a short pause.
            if cluster.inner.lock().unwrap().connected {
                backoff = Duration::from_millis(100);
            }
            cluster.set_down(why);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    });
    *cluster.task.lock().unwrap() = Some(task.abort_handle());
}

fn options(cfg: &ClusterConfig) -> Result<ConnectOptions, String> {
    let mut o = ConnectOptions::new()
        .with_connect_timeout(cfg.request_timeout)
        .with_timeout(cfg.request_timeout)
        .with_keep_alive(Duration::from_secs(1), cfg.request_timeout)
        .with_keep_alive_while_idle(true);
    if cfg.ca_file.is_some() || cfg.cert_file.is_some() {
        let mut tls = etcd_client::TlsOptions::new();
        if let Some(ca) = &cfg.ca_file {
            let pem = std::fs::read(ca).map_err(|e| format!("ca_file {}: {e}", ca.display()))?;
            tls = tls.ca_certificate(etcd_client::Certificate::from_pem(pem));
        }
        if let (Some(c), Some(k)) = (&cfg.cert_file, &cfg.key_file) {
            let cert = std::fs::read(c).map_err(|e| format!("cert_file {}: {e}", c.display()))?;
            let key = std::fs::read(k).map_err(|e| format!("key_file {}: {e}", k.display()))?;
            tls = tls.identity(etcd_client::Identity::from_pem(cert, key));
        }
        o = o.with_tls(tls);
    }
    Ok(o)
}

async fn timed<T>(
    cluster: &Cluster,
    what: &str,
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(cluster.cfg.request_timeout, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!(
            "{what}: no answer within {} ms",
            cluster.cfg.request_timeout.as_millis()
        )),
    }
}

/// One connection's life: register, catch up, then watch, answer proposals and heartbeat until
/// something fails.
async fn serve(shared: &Arc<Shared>, cluster: &Arc<Cluster>) -> Result<(), String> {
    let cfg = &cluster.cfg;
    let opts = options(cfg)?;
    // One endpoint at a time, the next one after a failure: the client's own balancing kept
    // sending requests to a member that had died (measured: broken pipes for seconds).
    let n = cluster.endpoint.load(std::sync::atomic::Ordering::Relaxed);
    let endpoint = cfg.endpoints[n % cfg.endpoints.len()].clone();
    let failed = |why: String| {
        cluster
            .endpoint
            .store(n.wrapping_add(1), std::sync::atomic::Ordering::Relaxed);
        format!("{endpoint}: {why}")
    };
    let client = timed(
        cluster,
        "connect",
        Client::connect([endpoint.clone()], Some(opts)),
    )
    .await
    .map_err(failed)?;
    serve_on(shared, cluster, client, &endpoint)
        .await
        .map_err(failed)
}

async fn serve_on(
    shared: &Arc<Shared>,
    cluster: &Arc<Cluster>,
    mut client: Client,
    endpoint: &str,
) -> Result<(), String> {
    let cfg = &cluster.cfg;
    let granted = timed(
        cluster,
        "lease grant",
        client.lease_grant(cfg.lease_ttl_secs as i64, None),
    )
    .await?;
    let lease = granted.id();
    let (now_at, cluster_id) = granted
        .header()
        .map_or((0, 0), |h| (h.revision(), h.cluster_id()));
    let (mut keeper, mut keepalive) =
        timed(cluster, "lease keep-alive", client.lease_keep_alive(lease)).await?;
    let member_key = cluster.key(&format!("members/{}", cfg.node));
    // Catch up: from the revision kept at the last run if that is still in etcd's history
    // (and the snapshot is of this etcd cluster), else a full list at one revision.
    let mut from = {
        let inner = cluster.inner.lock().unwrap();
        (inner.view.revision > 0
            && inner.view.revision <= now_at
            && (inner.view.etcd_cluster == 0 || inner.view.etcd_cluster == cluster_id))
            .then_some(inner.view.revision + 1)
    };
    if let Some(r) = from {
        let alloc = cluster.key("alloc");
        let probe = timed(
            cluster,
            "history",
            client.get(alloc, Some(GetOptions::new().with_revision(r - 1))),
        )
        .await;
        let alloc_then =
            |g: &etcd_client::GetResponse| g.kvs().first().map_or(0, KeyValue::mod_revision);
        let known = cluster.inner.lock().unwrap().view.alloc_revision;
        match probe {
            // The history differs from what this member saw (an etcd restored from a backup).
            Ok(g) if alloc_then(&g) != known => {
                tracing::info!(
                    "cluster: etcd's history at revision {} is not what this member saw: \
                     listing everything",
                    r - 1
                );
                from = None;
            }
            Ok(_) => tracing::info!(
                "cluster: resuming from revision {r} (applied up to {})",
                r - 1
            ),
            Err(e) if e.contains("compacted") => {
                tracing::info!(
                    "cluster: revision {} is compacted: listing everything",
                    r - 1
                );
                from = None;
            }
            Err(e) => return Err(e),
        }
    }
    let start = match from {
        Some(r) => r,
        None => full_list(cluster, &mut client).await? + 1,
    };
    cluster.inner.lock().unwrap().view.etcd_cluster = cluster_id;
    // Registered once caught up and before watching: a proposal made after this member is
    // listed is always in its watch.
    put_record(cluster, &mut client, &member_key, lease).await?;
    let mut watch = timed(
        cluster,
        "watch",
        client.watch(
            cluster.cfg.prefix.clone(),
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(start)
                    .with_progress_notify(),
            ),
        ),
    )
    .await?;
    let first = timed(cluster, "watch", watch.message())
        .await?
        .ok_or("watch closed")?;
    if first.canceled() {
        return Err(watch_cancelled(cluster, &first));
    }
    // Where the replay of history ends: asked for, the answer is a progress notice at the
    // revision by which every older event was sent.
    let caught_up_at = first.header().map_or(now_at, |h| h.revision());
    cluster.inner.lock().unwrap().caught_up_at = caught_up_at;
    timed(cluster, "watch", watch.request_progress()).await?;
    {
        let mut inner = cluster.inner.lock().unwrap();
        inner.client = Some(client.clone());
        inner.connected = true;
        inner.error = None;
        inner.member_lease = lease;
    }
    tracing::info!(
        "cluster: member {} joined at {endpoint} (lease {lease:x}, ttl {} s)",
        cfg.node,
        cfg.lease_ttl_secs
    );
    reconcile(shared, cluster).await;
    // Once caught up: this member's runtime blocks from before a restart, and (first join
    // only) the reservation files' cluster entries the cluster lacks.
    {
        let (shared, cluster) = (shared.clone(), cluster.clone());
        tokio::spawn(async move {
            if !cluster.wait_applied(caught_up_at).await {
                tracing::warn!(
                    "cluster: not caught up with revision {caught_up_at} after {} ms; \
                     adopting runtime blocks with what is known",
                    cluster.cfg.request_timeout.as_millis()
                );
            }
            adopt_runtime(&shared, &cluster).await;
            if !cluster
                .declared_added
                .load(std::sync::atomic::Ordering::Acquire)
                && add_declared(&shared).await
            {
                cluster
                    .declared_added
                    .store(true, std::sync::atomic::Ordering::Release);
            }
        });
    }
    // The heartbeat on a task of its own: a reconcile waiting for the persistent lock (an
    // `apply`, a create) never delays the lease's renewal.
    let beat = cluster.beat();
    let heart = {
        let (cluster, mut client) = (cluster.clone(), client.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(beat);
            tick.tick().await;
            loop {
                tokio::select! {
                    ka = keepalive.message() => match ka {
                        Ok(Some(r)) if r.ttl() > 0 => {}
                        Ok(_) => return format!("member lease {lease:x} expired"),
                        Err(e) => return format!("lease keep-alive: {e}"),
                    },
                    _ = tick.tick() => {
                        if let Err(e) =
                            timed(&cluster, "lease keep-alive", keeper.keep_alive()).await
                        {
                            return e;
                        }
                        if let Err(e) = put_record(&cluster, &mut client, &member_key, lease).await
                        {
                            return e;
                        }
                        cluster.write_snapshot(false);
                    }
                }
            }
        })
    };
    let _stop_heart = AbortOnDrop(heart.abort_handle());
    let mut heart = heart;
    let mut retry = tokio::time::interval(beat);
    retry.tick().await;
    loop {
        tokio::select! {
            msg = watch.message() => {
                let msg = msg.map_err(|e| format!("watch: {e}"))?.ok_or("watch closed")?;
                if msg.canceled() {
                    return Err(watch_cancelled(cluster, &msg));
                }
                let (changed, proposals) = handle_watch(cluster, &msg);
                if changed {
                    reconcile(shared, cluster).await;
                    cluster.write_snapshot(true);
                }
                for (id, entry, lease) in proposals {
                    answer(shared, cluster, &client, id, entry, lease);
                }
            }
            why = &mut heart => {
                return Err(why.unwrap_or_else(|e| format!("heartbeat task: {e}")));
            }
            _ = retry.tick() => {
                // What could not be enforced is tried again (the port may be free now).
                let retry = !cluster.inner.lock().unwrap().failures.is_empty();
                if retry {
                    reconcile(shared, cluster).await;
                }
            }
        }
    }
}

/// Why the watch was cancelled; behind a compaction, the next connection lists everything.
fn watch_cancelled(cluster: &Cluster, msg: &etcd_client::WatchResponse) -> String {
    if msg.compact_revision() > 0 {
        tracing::info!(
            "cluster: the revision watched from is compacted (to {}): listing everything",
            msg.compact_revision()
        );
        cluster.inner.lock().unwrap().view.revision = 0;
    }
    format!("watch cancelled: {}", msg.cancel_reason())
}

/// The answers to a transaction's reads, in order.
fn gets(r: etcd_client::TxnResponse) -> Vec<etcd_client::GetResponse> {
    r.op_responses()
        .into_iter()
        .filter_map(|o| match o {
            TxnOpResponse::Get(g) => Some(g),
            _ => None,
        })
        .collect()
}

/// Revokes a lease when dropped (on a task: drop cannot wait), within 2 s.
struct RevokeOnDrop(Client, i64);

impl Drop for RevokeOnDrop {
    fn drop(&mut self) {
        let (mut client, lease) = (self.0.clone(), self.1);
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(2), client.lease_revoke(lease)).await;
        });
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn put_record(
    cluster: &Cluster,
    client: &mut Client,
    key: &str,
    lease: i64,
) -> Result<(), String> {
    let rec = serde_json::to_vec(&cluster.record()).map_err(|e| e.to_string())?;
    let r = timed(
        cluster,
        "heartbeat",
        client.put(key, rec, Some(PutOptions::new().with_lease(lease))),
    )
    .await?;
    if let Some(h) = r.header() {
        cluster.inner.lock().unwrap().cluster_revision = h.revision();
    }
    Ok(())
}

/// Lists every cluster reservation, member and `alloc` at one revision and makes them this
/// member's view; returns that revision.
async fn full_list(cluster: &Cluster, client: &mut Client) -> Result<i64, String> {
    let txn = Txn::new().and_then([
        TxnOp::get(
            cluster.key("reservations/"),
            Some(GetOptions::new().with_prefix()),
        ),
        TxnOp::get(
            cluster.key("members/"),
            Some(GetOptions::new().with_prefix()),
        ),
        TxnOp::get(cluster.key("alloc"), None),
    ]);
    let r = timed(cluster, "list", client.txn(txn)).await?;
    let revision = r.header().map_or(0, |h| h.revision());
    let mut gets = gets(r).into_iter();
    let (res, mem, alloc) = (gets.next(), gets.next(), gets.next());
    let mut view = View {
        revision,
        prefix: cluster.cfg.prefix.clone(),
        ..View::default()
    };
    for kv in res.iter().flat_map(|g| g.kvs()) {
        if let Ok(k) = kv.key_str() {
            let _ = view.put(k, kv);
        }
    }
    let members = mem
        .iter()
        .flat_map(|g| g.kvs())
        .filter_map(|kv| serde_json::from_slice::<MemberRecord>(kv.value()).ok())
        .map(|m| (m.node.clone(), m))
        .collect();
    view.alloc_revision = alloc
        .and_then(|g| g.kvs().first().map(KeyValue::mod_revision))
        .unwrap_or(0);
    let mut inner = cluster.inner.lock().unwrap();
    inner.view = view;
    inner.members = members;
    inner.cluster_revision = revision;
    inner.dirty = true;
    // The table follows at the join (`reconcile`).
    Ok(revision)
}

/// Proposals to answer: (id, the block asked for, its lease).
type Proposals = Vec<(String, ClusterEntry, i64)>;

/// Takes in one watch message. Returns whether the cluster reservations changed, and the
/// proposals to answer (once the change is applied: a verdict is about the table as the cluster
/// has it); proposals seen while history is replayed wait until the replay is over.
fn handle_watch(cluster: &Cluster, msg: &etcd_client::WatchResponse) -> (bool, Proposals) {
    let prefix = &cluster.cfg.prefix;
    let mut changed = false;
    // A message without events that is not the watch's creation is a progress notice: every
    // event up to its header's revision was sent. Otherwise the events say how far it is.
    let mut last = if msg.events().is_empty() && !msg.created() {
        msg.header().map_or(0, |h| h.revision())
    } else {
        0
    };
    let mut proposals = Vec::new();
    {
        let mut inner = cluster.inner.lock().unwrap();
        for ev in msg.events() {
            let Some(kv) = ev.kv() else { continue };
            let Ok(key) = kv.key_str() else { continue };
            let Some(rest) = key.strip_prefix(prefix.as_str()) else {
                continue;
            };
            last = last.max(kv.mod_revision());
            let put = ev.event_type() == EventType::Put;
            if rest.starts_with("reservations/") {
                changed = true;
                inner.dirty = true;
                if put {
                    if let Err(e) = inner.view.put(key, kv) {
                        tracing::warn!("cluster: {key} is not a reservation: {e}");
                    }
                } else {
                    inner.view.entries.remove(key);
                    inner.view.leases.remove(key);
                    inner.failures.remove(key);
                }
            } else if rest == "alloc" {
                inner.view.alloc_revision = if put { kv.mod_revision() } else { 0 };
            } else if let Some(node) = rest.strip_prefix("members/") {
                if put {
                    if let Ok(m) = serde_json::from_slice::<MemberRecord>(kv.value()) {
                        inner.members.insert(node.to_string(), m);
                    }
                } else {
                    inner.members.remove(node);
                }
            } else if let Some(id) = rest.strip_prefix("proposals/") {
                if !put {
                    // Ended (its lease revoked): nothing to answer any more.
                    inner.replayed.remove(id);
                    proposals.retain(|(p, _, _)| p != id);
                } else if let Ok(e) = serde_json::from_slice::<ClusterEntry>(kv.value()) {
                    if kv.mod_revision() < inner.caught_up_at {
                        // History being replayed: answered once the replay is over, if it
                        // has not ended by then.
                        inner.replayed.insert(id.to_string(), (e, kv.lease()));
                    } else {
                        proposals.push((id.to_string(), e, kv.lease()));
                    }
                }
            }
        }
        inner.view.revision = inner.view.revision.max(last);
        inner.cluster_revision = inner.cluster_revision.max(last);
        // The replay is over: what it brought that has not ended is answered now.
        if inner.view.revision >= inner.caught_up_at && !inner.replayed.is_empty() {
            let replayed = std::mem::take(&mut inner.replayed);
            proposals.extend(replayed.into_iter().map(|(id, (e, l))| (id, e, l)));
        }
    }
    if !changed {
        let applied = cluster.inner.lock().unwrap().view.revision;
        cluster.applied.send_replace(applied);
    }
    (changed, proposals)
}

/// Answers proposal `id` (on a task of its own).
fn answer(
    shared: &Arc<Shared>,
    cluster: &Arc<Cluster>,
    client: &Client,
    id: String,
    entry: ClusterEntry,
    lease: i64,
) {
    let (shared, cluster, mut client) = (shared.clone(), cluster.clone(), client.clone());
    tokio::spawn(async move {
        let verdict = verdict(&shared, &cluster, &entry).await;
        let key = cluster.key(&format!("verdicts/{id}/{}", cluster.cfg.node));
        let body = serde_json::to_vec(&verdict).unwrap_or_default();
        let opts = (lease != 0).then(|| PutOptions::new().with_lease(lease));
        if let Err(e) = timed(&cluster, "verdict", client.put(key, body, opts)).await {
            // A proposal that ended meanwhile (its lease is gone).
            if e.contains("lease not found") {
                tracing::debug!("cluster: proposal {id} has ended");
            } else {
                tracing::warn!("cluster: cannot answer proposal {id}: {e}");
            }
        }
    });
}

/// Whether this member could enforce `entry` now: no reservation of its own overlaps it and no
/// socket has one of its ports (the check of the reservation files, `declared::obstacle`). The
/// creator's own runtime block is its own to check.
async fn verdict(shared: &Arc<Shared>, cluster: &Cluster, entry: &ClusterEntry) -> Verdict {
    let why = if entry.runtime && entry.node == cluster.cfg.node {
        None
    } else if let Some((protocol, range)) = entry.range() {
        let shared = shared.clone();
        tokio::task::spawn_blocking(move || {
            let st = shared.home();
            declared::obstacle(&st, protocol, range, |_| false).map(|o| o.to_string())
        })
        .await
        .unwrap_or_else(|e| Some(format!("the check failed: {e}")))
    } else {
        Some("the proposal is not a valid block".into())
    };
    Verdict {
        ok: why.is_none(),
        why,
    }
}

/// Makes this member's table hold the cluster reservations: the difference in one change if it
/// goes through, otherwise one reservation at a time, each that cannot be enforced (a port in
/// use here, a reservation of this host in the way) recorded as a failure and tried again at
/// each heartbeat.
async fn reconcile(shared: &Arc<Shared>, cluster: &Arc<Cluster>) {
    let wanted = cluster.wanted();
    let _serial = shared.persist_lock.lock().await;
    let s = shared.clone();
    let failures = tokio::task::spawn_blocking(move || reconcile_now(&s, &wanted))
        .await
        .unwrap_or_default();
    // Mirrors are written through the journal too: it is compacted as after any change.
    crate::handlers::compact_journal_if_due(shared).await;
    // Other members see the failures in this member's record at its next heartbeat.
    let applied = {
        let mut inner = cluster.inner.lock().unwrap();
        for (key, f) in &failures {
            if !inner.failures.contains_key(key) {
                tracing::error!(
                    "cluster: cannot enforce cluster reservation {key} here: {}",
                    f.why
                );
            }
        }
        inner.failures = failures;
        inner.view.revision
    };
    cluster.applied.send_replace(applied);
}

fn reconcile_now(shared: &Shared, wanted: &[Entry]) -> BTreeMap<String, ClusterFailureInfo> {
    let is_cluster = |o: &portres_core::Origin| o.cluster.is_some();
    let p = {
        let st = shared.home();
        declared::plan_of(wanted, st.table.reservations(), is_cluster)
    };
    let mut failures = BTreeMap::new();
    if p.is_empty() {
        return failures;
    }
    let owner = Owner {
        pid: None,
        uid: shared.own_uid,
        command: Some("portres daemon (cluster)".into()),
    };
    if declared::execute(shared, p, owner.clone()).is_ok() {
        return failures;
    }
    // One at a time: removals first, then changes and additions.
    let p = {
        let st = shared.home();
        declared::plan_of(wanted, st.table.reservations(), is_cluster)
    };
    let mut one = |plan: Plan, e: Option<&Entry>| {
        if let Err(refused) = declared::execute(shared, plan, owner.clone())
            && let Some(e) = e
        {
            let key = e
                .cluster
                .as_ref()
                .map(|c| c.key.clone())
                .unwrap_or_default();
            let f = ClusterFailureInfo {
                key: key.clone(),
                protocol: e.protocol.as_str().into(),
                start: e.range.start(),
                count: e.range.count(),
                why: refused.message,
            };
            failures.insert(key, f);
        }
    };
    for r in p.remove {
        let plan = Plan {
            remove: vec![r],
            ..Plan::default()
        };
        one(plan, None);
    }
    for (r, e) in p.change {
        let plan = Plan {
            change: vec![(r, e.clone())],
            ..Plan::default()
        };
        one(plan, Some(&e));
    }
    for e in p.add {
        let plan = Plan {
            add: vec![e.clone()],
            ..Plan::default()
        };
        one(plan, Some(&e));
    }
    failures
}

/// `portres persistent add --cluster`: asks every live member, then commits in one
/// transaction compared against `alloc`; replies once this member enforces it.
pub(crate) async fn create(
    shared: &Shared,
    cluster: &Arc<Cluster>,
    caller: &Caller,
    entry: ClusterEntry,
) -> Result<Reservation, Refusal> {
    let op = Operation::CreatePersistent;
    let Some((protocol, range)) = entry.range() else {
        return Err(refusal(
            op,
            ErrorCode::InvalidParameter,
            "not a valid block".into(),
        ));
    };
    let what = format!("cannot create cluster reservation {range}/{protocol}");
    if !caller.admin {
        return Err(refusal(
            op,
            ErrorCode::AccessDenied,
            format!(
                "{what}: uid {} is not an administrator of this daemon",
                caller.uid
            ),
        ));
    }
    let client = cluster.linked_client(op, &what).await?;
    let key = cluster.reservation_key(protocol, range.start());
    let rev = propose_and_commit(cluster, &client, op, &what, &entry, None).await?;
    tracing::info!(
        pid = caller.pid,
        uid = caller.uid,
        "cluster: created cluster reservation {range}/{protocol} ({key}) at revision {rev}"
    );
    // Reply once this member enforces it.
    let t = std::time::Instant::now();
    cluster.wait_applied(rev).await;
    tracing::debug!(
        "cluster: {key}: enforced here {:?} after the commit",
        t.elapsed()
    );
    let st = shared.home();
    let found = st
        .table
        .lookup_persistent(protocol, range.start().into(), range.count().into())
        .ok()
        .filter(|r| {
            r.origin()
                .and_then(|o| o.cluster.as_ref())
                .is_some_and(|c| c.key == key)
        })
        .cloned();
    drop(st);
    found.ok_or_else(|| {
        let why = cluster
            .inner
            .lock()
            .unwrap()
            .failures
            .get(&key)
            .map_or_else(|| "not applied yet".to_string(), |f| f.why.clone());
        refusal(
            op,
            ErrorCode::Internal,
            format!(
                "cluster reservation {range}/{protocol} was created in the cluster ({key}) but is \
                 not enforced on this member: {why}; `portres cluster status` shows each \
                 member's state"
            ),
        )
    })
}

/// The create protocol (docs/cluster.md, "How it works"): refuses an overlap with a cluster
/// reservation, asks every live member for its verdict, then commits `entry` in one
/// transaction compared against `alloc` (attached to `lease`: a runtime block). Returns the
/// commit's revision.
async fn propose_and_commit(
    cluster: &Arc<Cluster>,
    client: &Client,
    op: Operation,
    what: &str,
    entry: &ClusterEntry,
    lease_of_key: Option<i64>,
) -> Result<i64, Refusal> {
    let mut client = client.clone();
    let Some((protocol, range)) = entry.range() else {
        return Err(refusal(
            op,
            ErrorCode::InvalidParameter,
            "not a valid block".into(),
        ));
    };
    let key = cluster.reservation_key(protocol, range.start());
    let overlap = |cluster: &Cluster| -> Result<(), Refusal> {
        if let Some((k, e)) = cluster.overlapping(protocol, range) {
            return Err(refusal(
                op,
                ErrorCode::SharingViolation,
                format!(
                    "{what}: it overlaps cluster reservation {} ({k}); delete that one first, \
                     or choose other ports; nothing was changed",
                    e.words()
                ),
            ));
        }
        Ok(())
    };
    overlap(cluster)?;
    let began = std::time::Instant::now();
    // Ask every live member (this one included) whether it could enforce the block now: the
    // proposal's lease, the live members and the watch of the answers at once.
    let ttl = (cluster.cfg.verdict_timeout.as_secs() + 5) as i64;
    let id = format!(
        "{:016x}",
        portres_core::TokenSource::random_u64(&mut crate::handlers::OsRandom)
    );
    let members_key = cluster.key("members/");
    let verdicts_prefix = cluster.key(&format!("verdicts/{id}/"));
    let (mut c1, mut c2, mut c3) = (client.clone(), client.clone(), client.clone());
    let (granted, asked, watched) = tokio::join!(
        async { etcd_call!(cluster, op, what, c1 => c1.lease_grant(ttl, None)) },
        async {
            etcd_call!(
                cluster,
                op,
                what,
                c2 => c2.get(members_key.clone(), Some(GetOptions::new().with_prefix()))
            )
        },
        async {
            etcd_call!(
                cluster,
                op,
                what,
                c3 => c3.watch(verdicts_prefix.clone(), Some(WatchOptions::new().with_prefix()))
            )
        },
    );
    // The proposal and its verdicts go with their lease, however this ends (after the reply).
    let proposal = RevokeOnDrop(client.clone(), granted?.id());
    let lease = proposal.1;
    let members: Vec<MemberRecord> = asked?
        .kvs()
        .iter()
        .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
        .collect();
    let mut stream = watched?;
    // The watch exists before the proposal: no verdict can come before it.
    match tokio::time::timeout(cluster.cfg.request_timeout, stream.message()).await {
        Ok(Ok(Some(m))) if m.created() => {}
        other => {
            let why = match other {
                Ok(Err(e)) => e.to_string(),
                _ => "the watch of the verdicts was not created".to_string(),
            };
            return Err(cluster.unreachable(op, what, &why));
        }
    }
    let body = serde_json::to_vec(&entry).unwrap_or_default();
    let proposal_key = cluster.key(&format!("proposals/{id}"));
    etcd_call!(
        cluster,
        op,
        what,
        client => client.put(
            proposal_key.clone(),
            body.clone(),
            Some(PutOptions::new().with_lease(lease))
        )
    )?;
    let mut answers: BTreeMap<String, Verdict> = BTreeMap::new();
    let _ = tokio::time::timeout(cluster.cfg.verdict_timeout, async {
        while members.iter().any(|m| !answers.contains_key(&m.node)) {
            match stream.message().await {
                Ok(Some(msg)) => {
                    for ev in msg.events() {
                        let Some(kv) = ev.kv() else { continue };
                        let (Ok(k), Ok(v)) =
                            (kv.key_str(), serde_json::from_slice::<Verdict>(kv.value()))
                        else {
                            continue;
                        };
                        if let Some(node) = k.strip_prefix(verdicts_prefix.as_str()) {
                            answers.insert(node.to_string(), v);
                        }
                    }
                }
                _ => break,
            }
        }
    })
    .await;
    let verdicts_after = began.elapsed();
    for m in &members {
        match answers.get(&m.node) {
            Some(Verdict { ok: true, .. }) => {}
            Some(Verdict { why, .. }) => {
                return Err(refusal(
                    op,
                    ErrorCode::SharingViolation,
                    format!(
                        "{what}: member {} refuses: {}; nothing was changed",
                        m.node,
                        why.as_deref().unwrap_or("no reason given")
                    ),
                ));
            }
            None => {
                return Err(refusal(
                    op,
                    ErrorCode::Internal,
                    format!(
                        "{what}: member {} did not answer within {} ms (its last heartbeat \
                         was {} ms ago; a member that is cut off is dropped {} s after its \
                         last heartbeat); nothing was changed",
                        m.node,
                        cluster.cfg.verdict_timeout.as_millis(),
                        now_ms().saturating_sub(m.heartbeat_ms),
                        cluster.cfg.lease_ttl_secs
                    ),
                ));
            }
        }
    }
    // Commit: one transaction, valid only if no create happened since this member's view.
    let mut committed = None;
    for _ in 0..20 {
        overlap(cluster)?;
        let seen = cluster.inner.lock().unwrap().view.alloc_revision;
        let alloc = cluster.key("alloc");
        let txn = Txn::new()
            .when([
                Compare::mod_revision(alloc.clone(), CompareOp::Equal, seen),
                Compare::create_revision(key.clone(), CompareOp::Equal, 0),
            ])
            .and_then([
                TxnOp::put(alloc.clone(), id.clone(), None),
                TxnOp::put(
                    key.clone(),
                    body.clone(),
                    lease_of_key.map(|l| PutOptions::new().with_lease(l)),
                ),
            ])
            // What made the compare fail.
            .or_else([TxnOp::get(alloc, None), TxnOp::get(key.clone(), None)]);
        let r = etcd_call!(cluster, op, what, client => client.txn(txn.clone()))?;
        let rev = r.header().map_or(0, |h| h.revision());
        if r.succeeded() {
            committed = Some(rev);
            break;
        }
        // Another create won (or an earlier try of this one, whose answer was lost): catch up
        // with `alloc` as etcd has it now (a key of this prefix, so the watch brings it), then
        // check again.
        let mut now = gets(r).into_iter();
        let (now_alloc, now_key) = (now.next(), now.next());
        if let Some(kv) = now_key.as_ref().and_then(|g| g.kvs().first())
            && kv.lease() == lease_of_key.unwrap_or(0)
            && serde_json::from_slice::<ClusterEntry>(kv.value()).is_ok_and(|e| e == *entry)
        {
            committed = Some(kv.mod_revision());
            break;
        }
        let alloc_at = now_alloc
            .as_ref()
            .and_then(|g| g.kvs().first().map(KeyValue::mod_revision))
            .unwrap_or(0);
        // Never further than the watch: the overlap check must see every commit up to the
        // `alloc` revision it compares.
        cluster.wait_applied(alloc_at).await;
    }
    tracing::debug!(
        "cluster: {key}: verdicts after {:?}, committed after {:?}",
        verdicts_after,
        began.elapsed()
    );
    committed.ok_or_else(|| {
        refusal(
            op,
            ErrorCode::Internal,
            format!("{what}: too many concurrent creates; nothing was changed; try again"),
        )
    })
}

/// After joining: this member's runtime blocks that the cluster holds from before a restart.
/// A block live restore carried on (the same block is a runtime reservation of the table) gets
/// its lease renewed again, for its session; one whose session is gone leaves the cluster.
async fn adopt_runtime(shared: &Arc<Shared>, cluster: &Arc<Cluster>) {
    let own: Vec<(String, ClusterEntry, i64)> = {
        let inner = cluster.inner.lock().unwrap();
        let rt = cluster.runtime.lock().unwrap();
        let tracked: std::collections::HashSet<&String> =
            rt.blocks.values().map(|b| &b.key).collect();
        inner
            .view
            .entries
            .iter()
            .filter(|(k, (e, _))| e.runtime && e.node == cluster.cfg.node && !tracked.contains(k))
            .filter_map(|(k, (e, _))| Some((k.clone(), e.clone(), *inner.view.leases.get(k)?)))
            .collect()
    };
    for (key, e, lease) in own {
        let Some((protocol, range)) = e.range() else {
            continue;
        };
        let held = shared
            .home()
            .table
            .overlapping(protocol, range)
            // The very block: same ports, made at the same second by the same user.
            .find(|r| {
                r.range == range
                    && !r.is_persistent()
                    && r.created == e.created
                    && r.owner.uid == e.creator_uid
            })
            .and_then(|r| Some((r.token, r.session()?)));
        match held {
            Some((token, session)) => {
                let mut rt = cluster.runtime.lock().unwrap();
                rt.blocks.insert(
                    token,
                    Block {
                        session,
                        key: key.clone(),
                        lease,
                    },
                );
                if let std::collections::hash_map::Entry::Vacant(v) = rt.leases.entry(lease) {
                    let c = cluster.clone();
                    let task = tokio::spawn(async move { c.keep_lease_alive(lease).await });
                    v.insert(task.abort_handle());
                }
                tracing::info!(
                    "cluster: runtime block {range}/{protocol} ({key}) carried on from before \
                     the restart: its lease is renewed again"
                );
            }
            None => {
                cluster
                    .delete_runtime_key(&key, lease, "release after a restart")
                    .await;
                tracing::info!(
                    "cluster: runtime block {range}/{protocol} ({key}) ended with its session \
                     while this daemon was away: released"
                );
            }
        }
    }
}

/// `acquire` in the cluster (`portres run --cluster`): a block of this member's table (held
/// here as any runtime block of the session), then the create protocol for it as a runtime
/// entry attached to the session's lease. A wildcard block some member refuses is given back
/// at once (it would count against the caller's quota) and another random one tried, up to
/// [`WILDCARD_TRIES`] in all.
pub(crate) async fn acquire(
    shared: &Shared,
    cluster: &Arc<Cluster>,
    caller: &Caller,
    protocol: Protocol,
    start: u32,
    count: u32,
    mode: Mode,
) -> Result<Reservation, Refusal> {
    let op = Operation::AcquireRuntime;
    let what = if start == 0 {
        format!("cannot reserve {count} ports/{protocol} in the cluster")
    } else {
        format!("cannot reserve {count} ports/{protocol} from {start} in the cluster")
    };
    let mut client = cluster.linked_client(op, &what).await?;
    let mut lease = cluster
        .session_lease(caller.session, &mut client, op, &what)
        .await?;
    let mut lease_renewed = false;
    // A wildcard block starts at a random port of the dynamic range: members acquiring at
    // the same time would otherwise all pick the same lowest free block and refuse each other.
    let dynamic = shared.home().table.config().dynamic_range;
    let mut last = None;
    for tries in 1..=WILDCARD_TRIES {
        let at = if start == 0 {
            let room = u32::from(dynamic.count()).saturating_sub(count);
            let offset = (portres_core::TokenSource::random_u64(&mut crate::handlers::OsRandom)
                % u64::from(room + 1)) as u32;
            u32::from(dynamic.start()) + offset
        } else {
            start
        };
        let r = match crate::handlers::acquire_here(shared, caller, protocol, at, count, mode) {
            Ok(r) => r,
            // Taken here: another random block.
            Err(e)
                if start == 0 && e.code != ErrorCode::QuotaExceeded && tries < WILDCARD_TRIES =>
            {
                last = Some(e);
                continue;
            }
            Err(e) => return Err(e),
        };
        let entry = ClusterEntry {
            protocol: protocol.as_str().into(),
            start: r.range.start(),
            count: r.range.count(),
            mode: mode.as_str().into(),
            allow_users: Vec::new(),
            allow_groups: Vec::new(),
            description: None,
            node: cluster.cfg.node.clone(),
            runtime: true,
            created: r.created,
            creator_uid: caller.uid,
            creator_command: r.owner.command.clone(),
            file: None,
        };
        let key = cluster.reservation_key(protocol, r.range.start());
        // Known before the commit, so that the block is the session's from its first event.
        cluster.runtime.lock().unwrap().blocks.insert(
            r.token,
            Block {
                session: caller.session,
                key: key.clone(),
                lease,
            },
        );
        let e = match propose_and_commit(cluster, &client, op, &what, &entry, Some(lease)).await {
            Ok(rev) => {
                tracing::info!(
                    pid = caller.pid, uid = caller.uid, token = %r.token,
                    "cluster: runtime block {}/{protocol} ({key}) granted at revision {rev}",
                    r.range
                );
                return Ok(r);
            }
            Err(e) => e,
        };
        cluster.runtime.lock().unwrap().blocks.remove(&r.token);
        crate::handlers::release_here(shared, caller, &r);
        // The session's lease ran out while this member was out of touch (its renewing task
        // notices a little later): once, with a new one.
        if e.message.contains("requested lease not found") && !lease_renewed {
            lease_renewed = true;
            {
                let mut rt = cluster.runtime.lock().unwrap();
                if let Some(task) = rt.leases.remove(&lease) {
                    task.abort();
                }
                rt.session_lease.retain(|_, l| *l != lease);
            }
            lease = cluster
                .session_lease(caller.session, &mut client, op, &what)
                .await?;
        } else if start != 0 || e.code != ErrorCode::SharingViolation {
            return Err(e);
        }
        last = Some(e);
    }
    Err(last.unwrap_or_else(|| {
        refusal(
            op,
            ErrorCode::Internal,
            format!("{what}: no block was tried"),
        )
    }))
}

/// Wildcard blocks tried before a cluster acquire gives up.
const WILDCARD_TRIES: usize = 32;

/// `portres persistent delete` of a cluster reservation: deleted from the cluster; every
/// member (this one before the reply) lets it go.
pub(crate) async fn delete(cluster: &Arc<Cluster>, key: &str, words: &str) -> Result<(), Refusal> {
    let op = Operation::DeletePersistent;
    let what = format!("cannot delete cluster reservation {words}");
    let mut client = cluster.linked_client(op, &what).await?;
    // Only the reservation this member knows under that key (not one made since).
    let Some(seen) = cluster
        .inner
        .lock()
        .unwrap()
        .view
        .entries
        .get(key)
        .map(|(_, rev)| *rev)
    else {
        return Err(refusal(
            op,
            ErrorCode::NotFound,
            format!("{what}: the cluster has no {key} (already deleted)"),
        ));
    };
    let txn = Txn::new()
        .when([Compare::mod_revision(key, CompareOp::Equal, seen)])
        .and_then([TxnOp::delete(key, None)])
        .or_else([TxnOp::get(key, None)]);
    let r = etcd_call!(cluster, op, &what, client => client.txn(txn.clone()))?;
    let rev = r.header().map_or(0, |h| h.revision());
    if !r.succeeded() {
        let gone = gets(r).iter().any(|g| g.kvs().is_empty());
        if gone {
            // Deleted meanwhile (or by an earlier try of this request whose answer was lost):
            // what was asked for is done.
            tracing::info!("cluster: {key} was already deleted");
            cluster.wait_applied(rev).await;
            return Ok(());
        }
        return Err(refusal(
            op,
            ErrorCode::SharingViolation,
            format!(
                "{what}: it was changed in the cluster meanwhile; nothing was deleted; look at \
                 `portres show` and try again"
            ),
        ));
    }
    tracing::info!("cluster: deleted cluster reservation {words} ({key})");
    if !cluster.wait_applied(rev).await {
        tracing::warn!(
            "cluster: {key} is deleted from the cluster, but this member has not let it go yet \
             (its watch is behind); it will"
        );
    }
    Ok(())
}

/// The difference between the entries with `cluster = true` and the cluster reservations that
/// came from files, as this member sees the cluster.
pub(crate) struct FilesPlan {
    add: Vec<Entry>,
    /// (key, its mod revision, now, wanted)
    change: Vec<(String, i64, ClusterEntry, Entry)>,
    /// (key, its mod revision, now)
    remove: Vec<(String, i64, ClusterEntry)>,
}

/// A file's entry as a cluster reservation.
fn file_entry(cluster: &Cluster, e: &Entry, uid: u32) -> ClusterEntry {
    ClusterEntry {
        protocol: e.protocol.as_str().into(),
        start: e.range.start(),
        count: e.range.count(),
        mode: e.mode.as_str().into(),
        allow_users: e.acl.users.clone(),
        allow_groups: e.acl.groups.clone(),
        description: e.description.clone(),
        node: cluster.cfg.node.clone(),
        runtime: false,
        created: crate::handlers::now(),
        creator_uid: uid,
        creator_command: Some(format!("portres apply ({})", e.file)),
        file: Some(e.file.clone()),
    }
}

/// `apply`'s cluster part: what the entries with `cluster = true` change (`only_add`: only the
/// additions).
pub(crate) fn files_part(
    cluster: &Arc<Cluster>,
    entries: &[Entry],
    only_add: bool,
) -> declared::ClusterPart {
    let have: BTreeMap<(String, u16, u16), (String, i64, ClusterEntry)> = {
        let inner = cluster.inner.lock().unwrap();
        inner
            .view
            .entries
            .iter()
            .filter(|(_, (e, _))| e.file.is_some() && !e.runtime)
            .map(|(k, (e, rev))| {
                (
                    (e.protocol.clone(), e.start, e.count),
                    (k.clone(), *rev, e.clone()),
                )
            })
            .collect()
    };
    let mut have = have;
    let mut plan = FilesPlan {
        add: Vec::new(),
        change: Vec::new(),
        remove: Vec::new(),
    };
    let mut part = declared::ClusterPart::default();
    for e in entries {
        match have.remove(&(
            e.protocol.as_str().to_string(),
            e.range.start(),
            e.range.count(),
        )) {
            None => plan.add.push(e.clone()),
            Some((key, rev, now)) => {
                if now.declares(e) {
                    part.unchanged += 1;
                } else if !only_add {
                    plan.change.push((key, rev, now, e.clone()));
                }
            }
        }
    }
    if !only_add {
        plan.remove = have.into_values().collect();
    }
    let change = |action, e: Option<&Entry>, now: Option<&ClusterEntry>| {
        let (protocol, start, count, file, line) = match (e, now) {
            (Some(e), _) => (
                e.protocol.as_str().to_string(),
                e.range.start(),
                e.range.count(),
                e.file.clone(),
                Some(e.line),
            ),
            (None, Some(n)) => (
                n.protocol.clone(),
                n.start,
                n.count,
                n.file.clone().unwrap_or_default(),
                None,
            ),
            (None, None) => unreachable!("a change has an entry or a reservation"),
        };
        portres_proto::ApplyChange {
            action,
            protocol,
            start,
            count,
            file,
            line,
            before: now.map(ClusterEntry::diff_words),
            after: e.map(|e| declared::entry_words(e, false)),
            scope: Some("cluster".into()),
        }
    };
    use portres_proto::ChangeAction;
    for e in &plan.add {
        part.changes.push(change(ChangeAction::Add, Some(e), None));
    }
    for (_, _, now, e) in &plan.change {
        part.changes
            .push(change(ChangeAction::Change, Some(e), Some(now)));
    }
    for (_, _, now) in &plan.remove {
        part.changes
            .push(change(ChangeAction::Remove, None, Some(now)));
    }
    part.added = plan.add.len() as u64;
    part.changed = plan.change.len() as u64;
    part.removed = plan.remove.len() as u64;
    part.work = Some((cluster.clone(), plan));
    part
}

/// Makes `plan`'s changes in the cluster, one at a time (an addition through the create
/// protocol, so every live member must be able to enforce it); returns those that failed.
pub(crate) async fn apply_files(
    shared: &Shared,
    cluster: &Arc<Cluster>,
    plan: FilesPlan,
) -> Vec<String> {
    let mut errors = Vec::new();
    if plan.add.is_empty() && plan.change.is_empty() && plan.remove.is_empty() {
        return errors;
    }
    let op = Operation::CreatePersistent;
    let what = "cannot apply the cluster entries of the reservation files";
    let mut client = match cluster.linked_client(op, what).await {
        Ok(c) => c,
        Err(e) => return vec![e.message],
    };
    let mut last = 0;
    // `then` on `key` if it is still at revision `rev`: the commit's revision, or None if it
    // changed meanwhile.
    let mut at_revision = async |key: &str, rev: i64, then: TxnOp| {
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, rev)])
            .and_then([then]);
        let r = etcd_call!(cluster, op, what, client => client.txn(txn.clone()))?;
        Ok::<_, Refusal>(
            r.succeeded()
                .then(|| r.header().map_or(0, |h| h.revision())),
        )
    };
    for (key, rev, now) in &plan.remove {
        match at_revision(key, *rev, TxnOp::delete(key.clone(), None)).await {
            Ok(Some(r)) => last = last.max(r),
            Ok(None) => errors.push(format!(
                "{}: cluster reservation {} changed meanwhile; not removed",
                now.file.as_deref().unwrap_or("?"),
                now.words()
            )),
            Err(e) => errors.push(e.message),
        }
    }
    for (key, rev, _, e) in &plan.change {
        let mut wanted = file_entry(cluster, e, shared.own_uid);
        if let Some((now, _)) = cluster.inner.lock().unwrap().view.entries.get(key) {
            (wanted.node, wanted.created) = (now.node.clone(), now.created);
        }
        let body = serde_json::to_vec(&wanted).unwrap_or_default();
        match at_revision(key, *rev, TxnOp::put(key.clone(), body, None)).await {
            Ok(Some(r)) => last = last.max(r),
            Ok(None) => errors.push(format!(
                "{}: cluster reservation {key} changed meanwhile; not changed",
                e.at()
            )),
            Err(err) => errors.push(format!("{}: {}", e.at(), err.message)),
        }
    }
    for e in &plan.add {
        let entry = file_entry(cluster, e, shared.own_uid);
        let what = format!(
            "{}: cannot create cluster reservation {}/{}",
            e.at(),
            e.range,
            e.protocol
        );
        match propose_and_commit(cluster, &client, op, &what, &entry, None).await {
            Ok(rev) => last = last.max(rev),
            // Another member applying the same files made it first.
            Err(_) if declared_by_another(cluster, e) => {}
            Err(err) => errors.push(err.message),
        }
    }
    if !cluster.wait_applied(last).await {
        errors.push(format!(
            "the cluster has the changes (revision {last}), but this member does not enforce \
             them yet (its watch is behind); `portres cluster status` shows it"
        ));
    }
    for e in &errors {
        tracing::error!("reservation files: {e}");
    }
    errors
}

/// Whether the cluster has a reservation from files exactly as `e` declares it.
fn declared_by_another(cluster: &Cluster, e: &Entry) -> bool {
    let inner = cluster.inner.lock().unwrap();
    inner.view.entries.values().any(|(c, _)| c.declares(e))
}

/// Once a member has joined: the entries of its reservation files with `cluster = true` that
/// the cluster lacks are created (only added: another member's files may be newer; `portres
/// apply` makes the whole difference).
async fn add_declared(shared: &Arc<Shared>) -> bool {
    let Some(dir) = shared.config.reservations_dir.clone() else {
        return true;
    };
    let owner = shared.own_uid;
    // A bad file is reported by the host's part (and `status`); tried again at the next join.
    let Ok(Ok(found)) = tokio::task::spawn_blocking(move || declared::read_dir(&dir, owner)).await
    else {
        return false;
    };
    let Some(declared) = found else {
        return true;
    };
    let entries: Vec<Entry> = declared
        .entries
        .into_iter()
        .filter(|e| e.in_cluster)
        .collect();
    if entries.is_empty() {
        return true;
    }
    match declared::cluster_part(shared, &entries, true) {
        Ok(part) if part.added > 0 => declared::run_cluster_part(shared, part).await.is_empty(),
        Ok(_) => true,
        Err(e) => {
            shared.set_declared_problem(Some(e.message));
            true
        }
    }
}
