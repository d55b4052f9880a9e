//! One function per request: wire message in, table operation, wire reply out.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv6Addr};
use std::os::fd::OwnedFd;
use std::time::{SystemTime, UNIX_EPOCH};

use portres_core::{
    Acl, Caller, Conflict, ErrorCode, Holder, Kind, Mode, Operation, Owner, Protocol, Refusal,
    Reservation, Token, TokenSource,
};
use portres_proto::{
    ConflictInfo, Counts, HandedOutInfo, NetnsInfo, OwnerInfo, Reply, Request, ReservationInfo,
    ReservationRef, ShowFilter, ShowInfo, SocketInfo, SocketRef, SocketType, StatusInfo, WhoInfo,
};
use std::sync::Arc;

use crate::visibility::Names;
use portres_sys::hold::SocketKind;

use crate::store::StoredReservation;
use crate::{Shared, State};

/// Tokens from `getrandom(2)`, drawn 32 at a time (one system call per 32 tokens).
pub(crate) struct OsRandom;
impl TokenSource for OsRandom {
    fn random_u64(&mut self) -> u64 {
        thread_local! {
            static POOL: std::cell::RefCell<Vec<u64>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        POOL.with_borrow_mut(|pool| {
            if pool.is_empty() {
                // getrandom only fails before the pool is initialised on very early boot, or on
                // EINTR; retrying is the right answer for both.
                loop {
                    if let Ok(v) = portres_sys::process::random_u64s(32) {
                        *pool = v;
                        break;
                    }
                }
            }
            pool.pop().expect("refilled")
        })
    }
}

pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn reservation_ref(r: &Reservation) -> Reply {
    Reply::Reservation(ReservationRef {
        token: r.token.to_string(),
        protocol: r.protocol.as_str().into(),
        start: r.range.start(),
        count: r.range.count(),
        mode: r.mode.as_str().into(),
    })
}

fn owner_info(o: &Owner) -> OwnerInfo {
    OwnerInfo {
        pid: o.pid,
        uid: o.uid,
        user: portres_sys::creds::user_name(o.uid),
        command: o.command.clone(),
    }
}

pub(crate) fn conflict_info(c: &Conflict) -> ConflictInfo {
    let (holder_kind, owner) = match &c.holder {
        Holder::Reservation { owner, .. } => ("reservation", Some(owner_info(owner))),
        Holder::Socket { .. } => ("socket", None),
    };
    ConflictInfo {
        protocol: c.protocol.as_str().into(),
        port: c.port,
        holder_kind: holder_kind.into(),
        holder: c.holder_text(),
        owner,
    }
}

fn resolve_acl(users: &[String], groups: &[String]) -> Result<Acl, Refusal> {
    let op = Operation::CreatePersistent;
    let bad = |what: &str, name: &str| {
        Refusal::new(
            op,
            ErrorCode::InvalidParameter,
            format!(
                "cannot create the persistent reservation: there is no {what} named {name:?} on \
                 this machine; give an existing name or a numeric id"
            ),
        )
    };
    Ok(Acl {
        users: users
            .iter()
            .map(|u| portres_sys::creds::resolve_user(u).ok_or_else(|| bad("user", u)))
            .collect::<Result<_, _>>()?,
        groups: groups
            .iter()
            .map(|g| portres_sys::creds::resolve_group(g).ok_or_else(|| bad("group", g)))
            .collect::<Result<_, _>>()?,
    })
}

fn internal(op: Operation, what: &str, e: impl std::fmt::Display) -> Refusal {
    Refusal::new(
        op,
        ErrorCode::Internal,
        format!(
            "{what} failed inside the daemon: {e}; nothing was changed; see the daemon's log, and \
             retry once the cause is fixed"
        ),
    )
}

type Handled = Result<(Reply, Option<OwnedFd>), Refusal>;

/// What a request is answered with.
pub(crate) enum Answer {
    /// One reply frame, with a descriptor for `associate`.
    One(Reply, Option<OwnedFd>),
    /// A streamed reply: the head, then rows as they are made.
    Stream(Reply, crate::stream::Rows),
}

pub(crate) async fn handle(
    shared: &Arc<Shared>,
    caller: &Caller,
    request: Request,
) -> Result<Answer, Refusal> {
    match request {
        Request::Who {
            protocol: p,
            port,
            all,
            stream,
        } => who(shared, caller, p, port, all, stream).await,
        Request::Show { stream, filter } => show(shared, caller, stream, &filter).await,
        other => {
            let (reply, fd) = handle_one(shared, caller, other).await?;
            Ok(Answer::One(reply, fd))
        }
    }
}

async fn handle_one(shared: &Shared, caller: &Caller, request: Request) -> Handled {
    match request {
        Request::Acquire {
            protocol: p,
            start,
            count,
            mode: m,
            cluster,
        } => {
            let m = m.unwrap_or(Mode::Hold);
            let (start, count) = (u32::from(start), u32::from(count));
            if cluster {
                let r = acquire_in_cluster(shared, caller, p, start, count, m).await?;
                return Ok((reservation_ref(&r), None));
            }
            acquire_here(shared, caller, p, start, count, m).map(|r| (reservation_ref(&r), None))
        }
        Request::Release { token } => {
            let op = Operation::ReleaseRuntime;
            let t = parse_token(op, &token)?;
            let result = {
                let mut st = shared.space(caller.session);
                let result = st.table.release(caller, t);
                if let Ok(r) = &result {
                    st.retire(r);
                    st.sync_keeper();
                }
                result
            };
            #[cfg(feature = "cluster")]
            if result.is_ok()
                && let Some(c) = &shared.cluster
                && let Some(t) = portres_core::Token::new(t)
            {
                c.released(t).await;
            }
            log_outcome(caller, "release", &result);
            result.map(|_| (Reply::Done, None))
        }
        Request::Associate {
            token,
            socket,
            port,
            address,
            backlog,
            v6only,
        } => associate(
            shared, caller, &token, socket, port, address, backlog, v6only,
        ),
        Request::CreatePersistent {
            protocol: p,
            start,
            count,
            mode: m,
            allow_users,
            allow_groups,
            netns,
            cluster,
            description,
        } => {
            let op = Operation::CreatePersistent;
            let m = m.unwrap_or(Mode::Exclude);
            let (start, count) = (u32::from(start), u32::from(count));
            let acl = resolve_acl(&allow_users, &allow_groups)?;
            let description = checked_description(op, description)?;
            if cluster {
                let r =
                    create_in_cluster(shared, caller, p, start, count, m, acl, description, netns)
                        .await?;
                return Ok((reservation_ref(&r), None));
            }
            let _serial = shared.persist_lock.lock().await;
            let (at, store) = persistent_target(shared, caller, op, netns.as_deref())?;
            let command = portres_sys::process::command_line(caller.pid);
            let created = {
                let mut st = shared.space_at(at);
                let State {
                    table, enforcer, ..
                } = &mut *st;
                table.create_persistent(
                    caller,
                    p,
                    start,
                    count,
                    m,
                    acl,
                    command,
                    now(),
                    &mut OsRandom,
                    enforcer,
                )
            };
            let mut r = match created {
                Ok(r) => r,
                Err(refusal) => {
                    shared.spaces().drop_if_idle(at);
                    return Err(refusal);
                }
            };
            if let (Some(d), Kind::Persistent { acl, .. }) = (description, &r.kind) {
                let origin = portres_core::Origin {
                    description: Some(d),
                    ..Default::default()
                };
                let acl = acl.clone();
                if let Some(after) = shared
                    .space_at(at)
                    .table
                    .relabel_persistent(r.token, acl, origin)
                {
                    r = after;
                }
            }
            // The reservation is in the table (so nobody else can take the block meanwhile);
            // the reply waits for the store's fsync, and a failed write takes it out again.
            let rec = StoredReservation::from_reservation(&r);
            let written = tokio::task::spawn_blocking(move || store.put(&rec))
                .await
                .map_err(|e| e.to_string())
                .and_then(|w| w.map_err(|e| e.to_string()));
            if let Err(e) = written {
                {
                    let mut st = shared.space_at(at);
                    st.table.cancel(r.token);
                    st.retire(&r);
                    st.sync_keeper();
                }
                shared.spaces().drop_if_idle(at);
                tracing::error!(error = %e, "store write failed");
                return Err(Refusal::new(
                    op,
                    ErrorCode::Internal,
                    format!(
                        "cannot create persistent reservation {}/{}: {e}; nothing was changed",
                        r.range, r.protocol
                    ),
                ));
            }
            shared.space_at(at).keep(&r, true);
            tracing::info!(
                pid = caller.pid, uid = caller.uid, token = %r.token,
                "created persistent reservation {}/{} ({}){}", r.range, r.protocol, r.mode,
                netns.as_deref().map_or(String::new(), |n| format!(" in network namespace {n}"))
            );
            if at.is_none() {
                compact_journal_if_due(shared).await;
            }
            Ok((reservation_ref(&r), None))
        }
        Request::LookupPersistent {
            protocol: p,
            start,
            count,
            netns,
        } => {
            let op = Operation::LookupPersistent;
            let (at, _) = persistent_target(shared, caller, op, netns.as_deref())?;
            let found = shared
                .space_at(at)
                .table
                .lookup_persistent(p, u32::from(start), u32::from(count))
                .map(|r| (reservation_ref(r), None));
            // A namespace served only for this answer is let go again.
            shared.spaces().drop_if_idle(at);
            found
        }
        Request::DeletePersistent {
            protocol: p,
            start,
            count,
            netns,
        } => {
            let op = Operation::DeletePersistent;
            let (start, count) = (u32::from(start), u32::from(count));
            let _serial = shared.persist_lock.lock().await;
            let (at, store) = persistent_target(shared, caller, op, netns.as_deref())?;
            let found = shared
                .space_at(at)
                .table
                .check_delete_persistent(caller, p, start, count)
                .map(|r| (r.token, r.range));
            if found.is_err() {
                shared.spaces().drop_if_idle(at);
            }
            let (token, range) = found?;
            // A cluster reservation goes through the cluster (this member lets it go as every
            // member does, which takes the lock).
            let _serial = if at.is_none() && cluster_mirror(shared, token) {
                drop(_serial);
                if delete_in_cluster(shared, token, range, p).await? {
                    return Ok((Reply::Done, None));
                }
                shared.persist_lock.lock().await
            } else {
                _serial
            };
            // Off the disk first: a crash after this and before the reply leaves it deleted,
            // never half-deleted.
            let removed = tokio::task::spawn_blocking(move || store.delete(p, range.start()))
                .await
                .map_err(|e| e.to_string())
                .and_then(|w| w.map_err(|e| e.to_string()));
            if let Err(e) = removed {
                tracing::error!(error = %e, "store delete failed");
                return Err(Refusal::new(
                    op,
                    ErrorCode::Internal,
                    format!(
                        "cannot delete persistent reservation {range}/{p}: {e}; nothing was \
                         changed"
                    ),
                ));
            }
            {
                let mut st = shared.space_at(at);
                if let Some(r) = st.table.remove_persistent(token) {
                    st.retire(&r);
                    st.sync_keeper();
                }
            }
            shared.spaces().drop_if_idle(at);
            tracing::info!(
                pid = caller.pid, uid = caller.uid, token = %token,
                "deleted persistent reservation {range}/{p}{}",
                netns.as_deref().map_or(String::new(), |n| format!(" in network namespace {n}"))
            );
            if at.is_none() {
                compact_journal_if_due(shared).await;
            }
            Ok((Reply::Done, None))
        }
        Request::Status => Ok((Reply::Status(status(shared, caller)), None)),
        Request::ClusterStatus => cluster_status(shared).await,
        Request::Metrics => Ok((
            Reply::Metrics(portres_proto::MetricsInfo {
                text: crate::metrics::render(shared),
            }),
            None,
        )),
        Request::Apply { dry_run, expect } => {
            let info = crate::declared::apply(shared, caller, dry_run, expect.as_deref()).await?;
            Ok((Reply::Applied(info), None))
        }
        Request::Attach { tokens } => Ok((Reply::Attached(attach(shared, caller, &tokens)), None)),
        Request::OwnTree { token } => own_tree(shared, caller, &token),
        Request::Shutdown { release } => {
            if !caller.admin {
                return Err(Refusal::new(
                    Operation::Other,
                    ErrorCode::AccessDenied,
                    format!(
                        "cannot stop the daemon: uid {} is not an administrator of it (root, the \
                         daemon's own user, or admin_users/admin_groups in its configuration)",
                        caller.uid
                    ),
                ));
            }
            use std::sync::atomic::Ordering;
            shared.release_on_stop.store(release, Ordering::Release);
            shared.stop_requested.store(true, Ordering::Release);
            tracing::info!(
                pid = caller.pid,
                uid = caller.uid,
                release,
                "stop requested{}",
                if release {
                    ": every runtime reservation will be released"
                } else {
                    ""
                }
            );
            Ok((Reply::Done, None))
        }
        // Answered by `handle` (they may stream).
        Request::Who { .. } | Request::Show { .. } => Err(internal(
            Operation::Other,
            "dispatching the request",
            "who/show reached the single-reply path",
        )),
    }
}

/// The namespace and store a persistent request acts on: the daemon's own (`netns` is
/// `None`), or the `ip netns` namespace named (served from now on if it was not).
fn persistent_target(
    shared: &Shared,
    caller: &Caller,
    op: Operation,
    netns: Option<&str>,
) -> Result<(Option<portres_sys::netns::NetNsId>, Arc<crate::Store>), Refusal> {
    let lookup = op == Operation::LookupPersistent;
    let Some(name) = netns else {
        if !lookup {
            outside_home(shared, caller, op)?;
        }
        return Ok((None, shared.store.clone()));
    };
    let what = match op {
        Operation::CreatePersistent => "create",
        Operation::DeletePersistent => "delete",
        _ => "look up",
    };
    if !lookup && !caller.admin {
        return Err(Refusal::new(
            op,
            ErrorCode::AccessDenied,
            format!(
                "cannot {what} a persistent reservation: uid {} is not an administrator of this \
                 daemon",
                caller.uid
            ),
        ));
    }
    let create = op == Operation::CreatePersistent;
    shared
        .spaces()
        .named(name, create, &shared.config)
        .map(|(k, store)| (Some(k), store))
        .map_err(|e| match e {
            crate::namespaces::NamedError::NotFound(why) => Refusal::new(
                op,
                ErrorCode::NotFound,
                format!("cannot {what} the persistent reservation: {why}"),
            ),
            crate::namespaces::NamedError::Invalid(why) => Refusal::new(
                op,
                ErrorCode::InvalidParameter,
                format!("cannot {what} a persistent reservation in network namespace: {why}"),
            ),
        })
}

/// A user's runtime quota covers every namespace together (each table counts only its own):
/// refuses `count` more ports for `caller` when its ports in the other namespaces and in this
/// one would exceed it.
fn quota_across_namespaces(
    st: &crate::namespaces::SpaceGuard<'_>,
    caller: &Caller,
    count: u32,
) -> Result<(), Refusal> {
    if caller.admin {
        return Ok(());
    }
    let all = st.spaces();
    let total: u32 = all
        .all()
        .map(|s| s.table.runtime_ports_of(caller.uid))
        .sum();
    let here = st.table.runtime_ports_of(caller.uid);
    let quota = st.table.config().runtime_quota;
    if total > here && total.saturating_add(count) > quota {
        return Err(Refusal::new(
            Operation::AcquireRuntime,
            ErrorCode::QuotaExceeded,
            format!(
                "cannot reserve {count} more ports: uid {} holds {total} runtime ports across the \
                 network namespaces this daemon serves ({} in others), and the quota is {quota} \
                 for all of them together; release reservations it no longer needs, or ask an \
                 administrator to raise runtime_quota_ports",
                caller.uid,
                total - here
            ),
        ));
    }
    Ok(())
}

/// A portserver grant (`portserver.rs`): one TCP port in `exclude` mode for `caller` (the
/// grantee's session), from the dynamic range, or from `range` searched from `cursor` on.
pub(crate) fn portserver_acquire(
    shared: &Shared,
    caller: &Caller,
    range: Option<portres_core::PortRange>,
    cursor: &std::sync::atomic::AtomicU32,
) -> Result<Reservation, Refusal> {
    use std::sync::atomic::Ordering;
    let mut st = shared.space(caller.session);
    quota_across_namespaces(&st, caller, 1)?;
    let State {
        table, enforcer, ..
    } = &mut *st;
    let result = match range {
        None => table.acquire(
            caller,
            Protocol::Tcp,
            0,
            1,
            Mode::Exclude,
            now(),
            &mut OsRandom,
            enforcer,
        ),
        Some(range) => {
            // A bounded search (a grant must not hold the state lock for a scan of a whole
            // busy range): at most this many ports, from where the last grant stopped.
            const ATTEMPTS: u32 = 64;
            let n = u32::from(range.count());
            let from = cursor.load(Ordering::Relaxed);
            let mut last = None;
            let mut found = None;
            for i in 0..n.min(ATTEMPTS) {
                let port = u32::from(range.start()) + (from + i) % n;
                match table.acquire(
                    caller,
                    Protocol::Tcp,
                    port,
                    1,
                    Mode::Exclude,
                    now(),
                    &mut OsRandom,
                    enforcer,
                ) {
                    Ok(r) => {
                        cursor.store((from + i + 1) % n, Ordering::Relaxed);
                        found = Some(r);
                        break;
                    }
                    Err(e) if e.code == ErrorCode::QuotaExceeded => {
                        last = Some(e);
                        break;
                    }
                    Err(e) => last = Some(e),
                }
            }
            if found.is_none() {
                cursor.store((from + n.min(ATTEMPTS)) % n, Ordering::Relaxed);
            }
            found.ok_or_else(|| {
                last.unwrap_or_else(|| {
                    internal(Operation::AcquireRuntime, "portserver", "empty range")
                })
            })
        }
    };
    if let Ok(r) = &result {
        st.keep(r, false);
    }
    log_outcome(caller, "portserver grant", &result);
    result
}

/// Persistent reservations live in the daemon's own network namespace: a caller served in
/// another one is refused a change to them (it would change another port space than its own).
pub(crate) fn outside_home(shared: &Shared, caller: &Caller, op: Operation) -> Result<(), Refusal> {
    let all = shared.spaces();
    let Some(at) = all.of_session(caller.session) else {
        return Ok(());
    };
    let (mine, home) = (all.info(Some(at)).inode, all.info(None).inode);
    Err(Refusal::new(
        op,
        ErrorCode::InvalidParameter,
        format!(
            "persistent reservations live in the daemon's own network namespace (net:[{home}]), \
             and this client is in another one (net:[{mine}], its own port space): nothing was \
             changed; run the command in the daemon's namespace (e.g. `nsenter --net=/proc/{}/ns/net \
             portres ...`), or use a runtime reservation here",
            std::process::id()
        ),
    ))
}

/// Rewrites the store's journal as a snapshot when it has grown well past the table (on the
/// blocking pool; the caller holds `persist_lock`, so no write interleaves).
pub(crate) async fn compact_journal_if_due(shared: &Shared) {
    let live: Vec<StoredReservation> = {
        let st = shared.home();
        let n = st
            .table
            .reservations()
            .filter(|r| r.is_persistent())
            .count();
        if !shared.store.journal_wants_compaction(n) {
            return;
        }
        st.table
            .reservations()
            .filter(|r| r.is_persistent())
            .map(StoredReservation::from_reservation)
            .collect()
    };
    let store = shared.store.clone();
    let _ = tokio::task::spawn_blocking(move || store.compact_journal(&live)).await;
}

fn parse_token(op: Operation, s: &str) -> Result<u64, Refusal> {
    s.trim().parse::<u64>().map_err(|_| {
        Refusal::new(
            op,
            ErrorCode::InvalidArgument,
            format!("{s:?} is not a token (tokens are decimal numbers from 1 to 2^64-1)"),
        )
    })
}

/// Logs a grant (refusals are logged for every request in one place, in server.rs).
fn log_outcome(caller: &Caller, what: &str, result: &Result<Reservation, Refusal>) {
    if let Ok(r) = result {
        tracing::info!(
            pid = caller.pid, uid = caller.uid, token = %r.token,
            "{what}: {}/{} ({})", r.range, r.protocol, r.mode
        );
    }
}

fn status(shared: &Shared, caller: &Caller) -> StatusInfo {
    let st = shared.space(caller.session);
    let table = &st.table;
    let all = st.spaces();
    let home = &all.home;
    let t = table.counts();
    let mut counts = Counts {
        sessions: table.session_count() as u64,
        runtime_hold: t.runtime_hold,
        runtime_exclude: t.runtime_exclude,
        persistent_hold: t.persistent_hold,
        persistent_exclude: t.persistent_exclude,
        runtime: t.runtime_hold + t.runtime_exclude,
        persistent: t.persistent_hold + t.persistent_exclude,
        ports_reserved: t.ports_reserved,
        ports_handed_out: t.ports_handed_out,
        ..Counts::default()
    };
    counts.ports_held = st.enforcer.held_ports();
    counts.accept_paused = shared
        .accept_paused
        .load(std::sync::atomic::Ordering::Relaxed);
    counts.open_files_limit = portres_sys::hold::nofile_limit();
    StatusInfo {
        daemon_version: env!("CARGO_PKG_VERSION").into(),
        protocol_version: portres_proto::VERSION,
        pid: std::process::id(),
        uptime_secs: shared.started.elapsed().as_secs(),
        scope: shared.placement.scope.clone(),
        socket: shared.placement.socket.display().to_string(),
        state_dir: shared.placement.state_dir.display().to_string(),
        dynamic_range: table.config().dynamic_range.to_string(),
        dynamic_range_source: shared.dynamic_source.clone(),
        runtime_quota_ports: table.config().runtime_quota,
        layers: st.enforcer.layers(all.session_count()),
        deny: st.enforcer.deny_info(),
        counts,
        restore: Some({
            let mut info = shared.restore.lock().unwrap().clone();
            info.keeper_pid = home.keeper.as_ref().and_then(|k| k.pid());
            if let Some(p) = home.keeper.as_ref().and_then(|k| k.problem()) {
                info.problem = Some(p.to_string());
            } else if home.keeper.is_none() && info.problem.is_none() && info.live_restore_secs > 0
            {
                info.problem = Some("no keeper (see the daemon's log)".into());
            }
            info
        }),
        netns: Some(all.info(st.at())),
        // Other namespaces' first clients (pid, command) are for administrators.
        namespaces: if caller.admin {
            all.status()
        } else {
            all.status()
                .into_iter()
                .map(|mut n| {
                    n.netns.pid = None;
                    n.netns.command = None;
                    n
                })
                .collect()
        },
        namespace_mode: Some(all.mode().into()),
        namespace_problems: all.problems.clone(),
        portserver: shared
            .portserver
            .as_ref()
            .map(|e| e.describe(shared.config.portserver_range)),
        declared: shared.config.reservations_dir.as_ref().map(|dir| {
            portres_proto::DeclaredStatus {
                dir: dir.display().to_string(),
                reservations: home
                    .table
                    .reservations()
                    .filter(|r| r.origin().is_some_and(|o| o.file.is_some()))
                    .count() as u64,
                problem: shared.declared_problem.lock().unwrap().clone(),
            }
        }),
        metrics: shared.metrics_endpoint.as_ref().map(|e| match e {
            Ok(at) => at.clone(),
            Err(why) => format!("NOT SERVED: {why}"),
        }),
    }
}

/// [`Request::OwnTree`]: the caller's process tree becomes the owner of binds into one of its
/// session's runtime blocks (a cgroup of its own; `deny.rs`).
fn own_tree(shared: &Shared, caller: &Caller, token: &str) -> Handled {
    let op = Operation::Other;
    let t = parse_token(op, token)?;
    let mut st = shared.space(caller.session);
    let Some(r) = Token::new(t)
        .and_then(|t| st.table.get(t))
        .filter(|r| r.session() == Some(caller.session))
        .cloned()
    else {
        return Err(Refusal::new(
            op,
            ErrorCode::NotFound,
            format!(
                "cannot give reservation {token} to the caller's process tree: no runtime reservation of this connection has that token"
            ),
        ));
    };
    match st.enforcer.own_by_cgroup(&r, caller.pid) {
        Ok(cgroup) => {
            tracing::info!(
                pid = caller.pid,
                token = %r.token,
                %cgroup,
                "{}/{} owned by the process tree in cgroup {cgroup}",
                r.range,
                r.protocol
            );
            Ok((
                Reply::OwnedTree(portres_proto::OwnedTreeInfo { cgroup }),
                None,
            ))
        }
        Err(why) => Err(Refusal::new(
            op,
            if st.enforcer.deny_active() {
                ErrorCode::Internal
            } else {
                ErrorCode::InvalidArgument
            },
            format!(
                "cannot give {}/{} to the process tree of pid {}: {why}",
                r.range, r.protocol, caller.pid
            ),
        )),
    }
}

/// `attach`: moves the caller's runtime reservations carried over from a previous daemon (or
/// from another connection of the same process) into the caller's session.
fn attach(shared: &Shared, caller: &Caller, tokens: &[String]) -> portres_proto::AttachInfo {
    let mut info = portres_proto::AttachInfo::default();
    let mut st = shared.space(caller.session);
    let mut emptied = Vec::new();
    let mut moved = Vec::new();
    for t in tokens {
        let lost = |why: String| portres_proto::LostToken {
            token: t.clone(),
            why,
        };
        let Some(tk) = t.trim().parse::<u64>().ok().and_then(Token::new) else {
            info.lost.push(lost(format!(
                "{t:?} is not a token (tokens are decimal numbers from 1 to 2^64-1)"
            )));
            continue;
        };
        let Some(r) = st.table.get(tk) else {
            info.lost.push(lost(
                "no live reservation has this token: it ended, or was not carried over the \
                 daemon's restart (`portres status` and the daemon's log say which were kept)"
                    .into(),
            ));
            continue;
        };
        if r.is_persistent() {
            info.kept.push(t.clone());
            continue;
        }
        if r.owner.pid != Some(caller.pid) {
            info.lost.push(lost(format!(
                "it belongs to {}, and only the process that acquired a runtime reservation may \
                 re-attach it",
                r.owner
            )));
            continue;
        }
        let from = r.session().expect("runtime");
        if from == caller.session {
            info.kept.push(t.clone());
            continue;
        }
        // The pid matches; a carried-over session's owner is watched by pidfd, so a pid reused
        // by another process is told apart even before the watcher has run.
        if crate::restore::owner_exited(&st, from) {
            info.lost.push(lost(
                "its owner exited (this process has the same pid but is another process)".into(),
            ));
            continue;
        }
        st.table.move_to_session(tk, caller.session);
        #[cfg(feature = "cluster")]
        if let Some(c) = &shared.cluster {
            c.attached(tk, caller.session);
        }
        moved.push(tk.get());
        if st.table.session_len(from) == 0 {
            emptied.push(from);
        }
        info.kept.push(t.clone());
    }
    if let Some(k) = st.keeper.as_mut().filter(|_| !moved.is_empty()) {
        k.owner(caller.session, caller.pid);
        k.moved(moved, caller.session);
    }
    for s in emptied {
        if st.table.session_len(s) == 0 {
            st.table.end_session(s);
            if let Some(k) = &mut st.keeper {
                k.owner_gone(s);
            }
        }
    }
    if !info.kept.is_empty() || !info.lost.is_empty() {
        tracing::info!(
            pid = caller.pid,
            uid = caller.uid,
            session = caller.session,
            kept = info.kept.len(),
            lost = info.lost.len(),
            "re-attached runtime reservations"
        );
    }
    info
}

/// Handed-out ports listed per row (all are counted in `handed_out_count`).
const MAX_HANDED_OUT_LISTED: usize = 2048;
/// Handed-out ports listed with their process per row.
const MAX_HANDED_OUT_TO_LISTED: usize = 128;

/// Per reservation, read under the state lock for replies made outside it: the inodes of the
/// sockets it handed out, by (token, port), and (deny layer on) who may bind its ports.
#[derive(Default)]
struct RowExtras {
    handed: HashMap<(Token, u16), u64>,
    binds: HashMap<Token, String>,
    /// Cluster reservations: their place in the cluster and each member's state of them.
    cluster: HashMap<Token, portres_proto::ClusterEntryInfo>,
}

impl RowExtras {
    fn extend(&mut self, other: RowExtras) {
        self.handed.extend(other.handed);
        self.binds.extend(other.binds);
        self.cluster.extend(other.cluster);
    }

    /// Adds the cluster's view of the cluster reservations among `rs` (read outside the state
    /// lock).
    fn add_cluster<'a>(&mut self, shared: &Shared, rs: impl Iterator<Item = &'a Reservation>) {
        for r in rs {
            // A runtime block of this member's that is held in the cluster.
            #[cfg(feature = "cluster")]
            if let Some(info) = shared
                .cluster
                .as_ref()
                .and_then(|cl| cl.runtime_info(r.token))
            {
                self.cluster.insert(r.token, info);
                continue;
            }
            let Some(c) = r.origin().and_then(|o| o.cluster.as_ref()) else {
                continue;
            };
            #[cfg(feature = "cluster")]
            let info = match &shared.cluster {
                Some(cl) => cl.entry_info(c),
                None => cluster_entry_alone(c),
            };
            #[cfg(not(feature = "cluster"))]
            let info = {
                let _ = shared;
                cluster_entry_alone(c)
            };
            self.cluster.insert(r.token, info);
        }
    }
}

/// A cluster reservation's place, without the members' states (no link to the cluster).
fn cluster_entry_alone(c: &portres_core::ClusterOrigin) -> portres_proto::ClusterEntryInfo {
    portres_proto::ClusterEntryInfo {
        key: c.key.clone(),
        node: c.node.clone(),
        runtime: c.runtime,
        file: None,
        members: Vec::new(),
    }
}

fn row_extras<'a>(st: &State, rs: impl Iterator<Item = &'a Reservation>) -> RowExtras {
    let mut m = RowExtras::default();
    for r in rs {
        if let Some(b) = st.enforcer.deny_owner(r.token) {
            m.binds.insert(r.token, b);
        }
        for &p in r.handed_out() {
            if let Some(ino) = st.enforcer.handed_inode(r.token, p) {
                m.handed.insert((r.token, p), ino);
            }
        }
    }
    m
}

/// The wire form of a reservation, for `caller` (tokens only to administrators and owners).
/// `holders` maps handed-out socket inodes to processes.
fn reservation_info(
    r: &Reservation,
    caller: &Caller,
    extras: &RowExtras,
    holders: &HashMap<u64, Vec<u32>>,
    names: &mut Names,
) -> ReservationInfo {
    let list = |ids: &[u32], f: &mut dyn FnMut(u32) -> Option<String>| -> Vec<String> {
        ids.iter()
            .map(|&i| f(i).unwrap_or_else(|| i.to_string()))
            .collect()
    };
    let (allow_users, allow_groups) = match &r.kind {
        Kind::Persistent { acl, .. } => (
            list(&acl.users, &mut |u| names.user_name(u)),
            list(&acl.groups, &mut portres_sys::creds::group_name),
        ),
        Kind::Runtime { .. } => (Vec::new(), Vec::new()),
    };
    let handed_out_to = r
        .handed_out()
        .iter()
        .take(MAX_HANDED_OUT_TO_LISTED)
        .map(|&port| {
            let pid = extras
                .handed
                .get(&(r.token, port))
                .and_then(|ino| holders.get(ino))
                .and_then(|pids| pids.first().copied());
            HandedOutInfo {
                port,
                pid,
                command: pid.and_then(|p| names.command(p)),
            }
        })
        .collect();
    ReservationInfo {
        protocol: r.protocol.as_str().into(),
        start: r.range.start(),
        count: r.range.count(),
        kind: r.kind_str().into(),
        mode: r.mode.as_str().into(),
        token: (caller.admin || caller.uid == r.owner.uid).then(|| r.token.to_string()),
        owner: OwnerInfo {
            pid: r.owner.pid,
            uid: r.owner.uid,
            user: names.user_name(r.owner.uid),
            command: r.owner.command.clone().map(crate::visibility::cap_command),
        },
        created: r.created,
        handed_out: r
            .handed_out()
            .iter()
            .take(MAX_HANDED_OUT_LISTED)
            .copied()
            .collect(),
        handed_out_to,
        handed_out_count: r.handed_out().len() as u32,
        allow_users,
        allow_groups,
        source: r.origin().map(|o| {
            if o.cluster.is_some() {
                "cluster"
            } else if o.file.is_some() {
                "file"
            } else {
                "api"
            }
            .to_string()
        }),
        scope: if extras.cluster.contains_key(&r.token)
            || r.origin().is_some_and(|o| o.cluster.is_some())
        {
            "cluster"
        } else {
            "host"
        }
        .into(),
        cluster: extras.cluster.get(&r.token).cloned(),
        file: r
            .origin()
            .and_then(|o| o.file.clone())
            .or_else(|| extras.cluster.get(&r.token).and_then(|c| c.file.clone())),
        description: r.origin().and_then(|o| o.description.clone()),
        binds: extras.binds.get(&r.token).cloned(),
        netns: None,
    }
}

/// Processes holding the handed-out sockets (`/proc` is read only when there are some).
fn handout_holders(extras: &RowExtras) -> HashMap<u64, Vec<u32>> {
    let inodes: HashSet<u64> = extras.handed.values().copied().collect();
    portres_sys::procfs::socket_owners(&inodes).0
}

fn invalid_filter(why: String) -> Refusal {
    Refusal::new(Operation::Other, ErrorCode::InvalidArgument, why)
}

/// The reservations `filter` lets through.
fn show_filter(filter: &ShowFilter) -> Result<impl Fn(&Reservation) -> bool + use<>, Refusal> {
    let protocol: Option<Protocol> = filter
        .protocol
        .as_deref()
        .map(|p| {
            p.parse()
                .map_err(|e: String| invalid_filter(format!("show: {e}")))
        })
        .transpose()?;
    let ports = match filter.ports {
        Some((a, b)) if a > b => {
            return Err(invalid_filter(format!(
                "show: the port range {a}-{b} is empty; give FIRST-LAST with FIRST <= LAST"
            )));
        }
        other => other,
    };
    let persistent = match filter.kind.as_deref() {
        None => None,
        Some("runtime") => Some(false),
        Some("persistent") => Some(true),
        Some(other) => {
            return Err(invalid_filter(format!(
                "show: unknown kind {other:?}; give \"runtime\" or \"persistent\""
            )));
        }
    };
    let uid = match filter.user.as_deref() {
        None => None,
        Some(u) => Some(portres_sys::creds::resolve_user(u).ok_or_else(|| {
            invalid_filter(format!(
                "show: there is no user named {u:?} on this machine; give a name or a uid"
            ))
        })?),
    };
    Ok(move |r: &Reservation| {
        protocol.is_none_or(|p| r.protocol == p)
            && ports.is_none_or(|(a, b)| r.range.start() <= b && r.range.last() >= a)
            && persistent.is_none_or(|p| r.is_persistent() == p)
            && uid.is_none_or(|u| r.owner.uid == u)
    })
}

async fn show(
    shared: &Arc<Shared>,
    caller: &Caller,
    stream: bool,
    filter: &ShowFilter,
) -> Result<Answer, Refusal> {
    let keep = show_filter(filter)?;
    if filter.all_namespaces && !caller.admin {
        return Err(Refusal::new(
            Operation::Other,
            ErrorCode::AccessDenied,
            format!(
                "show --all-namespaces lists every network namespace's reservations, for \
                 administrators; uid {} is not one (without it, show lists the caller's own \
                 namespace)",
                caller.uid
            ),
        ));
    }
    let (rows, extras) = {
        let mut all = shared.spaces();
        let wanted = if filter.all_namespaces {
            all.keys()
        } else {
            vec![all.of_session(caller.session)]
        };
        let mut rows: Vec<(Reservation, Arc<NetnsInfo>)> = Vec::new();
        let mut extras = RowExtras::default();
        for at in wanted {
            let netns = Arc::new(all.info(at));
            all.with(at, |st| {
                reclaim_all(st);
                let first = rows.len();
                rows.extend(
                    st.table
                        .reservations()
                        .filter(|r| keep(r))
                        .map(|r| (r.clone(), netns.clone())),
                );
                extras.extend(row_extras(st, rows[first..].iter().map(|(r, _)| r)));
            });
        }
        (rows, extras)
    };
    let mut extras = extras;
    extras.add_cluster(shared, rows.iter().map(|(r, _)| r));
    let caller = caller.clone();
    if !stream {
        let reservations = tokio::task::spawn_blocking(move || {
            let holders = handout_holders(&extras);
            let mut names = Names::default();
            rows.iter()
                .map(|(r, ns)| {
                    let mut info = reservation_info(r, &caller, &extras, &holders, &mut names);
                    info.netns = Some((**ns).clone());
                    info
                })
                .collect()
        })
        .await
        .map_err(|e| internal(Operation::Other, "show", e))?;
        return Ok(Answer::One(
            Reply::Show(ShowInfo {
                reservations,
                more: false,
                total: None,
            }),
            None,
        ));
    }
    let head = Reply::Show(ShowInfo {
        reservations: Vec::new(),
        more: true,
        total: Some(rows.len() as u64),
    });
    let items = crate::stream::spawn_rows(move || {
        let holders = handout_holders(&extras);
        let mut names = Names::default();
        rows.into_iter().map(move |(r, ns)| {
            let mut info = reservation_info(&r, &caller, &extras, &holders, &mut names);
            info.netns = Some((*ns).clone());
            info
        })
    });
    Ok(Answer::Stream(head, items))
}

/// Sockets listed by `who` without `all`: those that are not connections, at most this many.
const WHO_LISTED: usize = 100;

async fn who(
    shared: &Arc<Shared>,
    caller: &Caller,
    p: Protocol,
    port: u16,
    all: bool,
    stream: bool,
) -> Result<Answer, Refusal> {
    let port = Some(port).filter(|&p| p != 0).ok_or_else(|| {
        Refusal::new(
            Operation::Other,
            ErrorCode::InvalidArgument,
            format!("{port} is not a port; give a number from 1 to 65535"),
        )
    })?;
    let (covering, placeholder, handed_here, extras, ns, home, netns) = {
        let mut st = shared.space(caller.session);
        let ns = st.spaces().netns(st.at());
        let home = st.spaces().home_netns();
        let netns = st.spaces().info(st.at());
        if let Some(t) = st.table.covering(p, port).map(|r| r.token) {
            reclaim(&mut st, t);
        }
        let covering = st.table.covering(p, port).cloned();
        let (placeholder, handed_here) = match &covering {
            Some(r) => (
                st.enforcer.placeholder_inode(r, port),
                st.enforcer.handed_inode(r.token, port),
            ),
            None => (None, None),
        };
        let extras = row_extras(&st, covering.iter());
        (covering, placeholder, handed_here, extras, ns, home, netns)
    };
    let mut extras = extras;
    extras.add_cluster(shared, covering.iter());
    let caller = caller.clone();
    let role_of = move |inode: u64| {
        if Some(inode) == placeholder {
            Some("portres placeholder (hold layer)")
        } else if Some(inode) == handed_here {
            Some("handed out by portres")
        } else {
            None
        }
    };
    let info = move |names: &mut Names, s: &crate::visibility::Seen| {
        let role = role_of(s.entry.inode);
        let mut info = names.socket_info(s, role);
        if role == Some("handed out by portres") {
            // Described by the process that has it, not by the role.
            info.description = format!("{} (handed out by portres)", names.describe(s, None));
        }
        info
    };
    // The kernel's view on the blocking pool, outside the lock (it reads /proc: a busy port has
    // thousands of sockets, and other clients are served meanwhile); one pass over /proc finds
    // the processes of the port's sockets and of the block's handed-out ones.
    let (head, seen) = tokio::task::spawn_blocking(move || {
        let mut names = Names::default();
        let handed_set: HashSet<u64> = extras.handed.values().copied().collect();
        // The caller's namespace's sockets: sock_diag answers for the namespace it is asked in.
        let (seen, holders, hidden) = crate::namespaces::run_in(&ns, &home, || {
            crate::visibility::sockets_on_with(p, port, &handed_set)
        });
        let reservation = covering.as_ref().map(|r| {
            let mut info = reservation_info(r, &caller, &extras, &holders, &mut names);
            info.netns = Some(netns);
            info
        });
        let mut summary = crate::visibility::summarise(&seen, &mut names);
        let listed: Vec<SocketInfo> = if all {
            if stream {
                Vec::new()
            } else {
                seen.iter().map(|s| info(&mut names, s)).collect()
            }
        } else {
            seen.iter()
                .filter(|s| matches!(s.entry.state_name(), "listening" | "bound"))
                .take(WHO_LISTED)
                .map(|s| info(&mut names, s))
                .collect()
        };
        summary.not_listed = if all && stream {
            0
        } else {
            seen.len() as u64 - listed.len() as u64
        };
        let unseen = seen
            .iter()
            .filter(|s| s.entry.inode != 0 && s.pids.is_empty())
            .count();
        let not_visible = (unseen > 0 && hidden > 0).then(|| {
            format!(
                "{unseen} sockets belong to processes the daemon cannot see ({hidden} processes \
                 were not readable: the daemon runs as uid {}; run the system daemon as root to \
                 see every process)",
                portres_sys::creds::effective_uid()
            )
        });
        let head = WhoInfo {
            protocol: p.as_str().into(),
            port,
            reservation,
            sockets: listed,
            summary: Some(summary),
            more: all && stream,
            not_visible,
        };
        (head, seen)
    })
    .await
    .map_err(|e| internal(Operation::Other, "who", e))?;
    if !(all && stream) {
        return Ok(Answer::One(Reply::Who(head), None));
    }
    let items = crate::stream::spawn_rows(move || {
        let mut names = Names::default();
        seen.into_iter().map(move |s| info(&mut names, &s))
    });
    Ok(Answer::Stream(Reply::Who(head), items))
}

/// Returns to their blocks the ports whose handed-out sockets have closed.
fn reclaim(st: &mut State, token: Token) {
    let Some(r) = st.table.get(token) else { return };
    for port in st.enforcer.closed_handouts(r) {
        st.table.return_port(token, port);
        if let Some(k) = &mut st.keeper {
            k.returned(token.get(), port);
        }
    }
}

fn reclaim_all(st: &mut State) {
    let tokens: Vec<Token> = st
        .table
        .reservations()
        .filter(|r| !r.handed_out().is_empty())
        .map(|r| r.token)
        .collect();
    for t in tokens {
        reclaim(st, t);
    }
}

/// `SIO_ASSOCIATE_PORT_RESERVATION` + bind: a socket on a port of the block, for the caller.
#[allow(clippy::too_many_arguments)]
fn associate(
    shared: &Shared,
    caller: &Caller,
    token: &str,
    socket: SocketType,
    port: u16,
    address: Option<String>,
    backlog: Option<i32>,
    v6only: Option<bool>,
) -> Handled {
    let op = Operation::Associate;
    let invalid = |m: String| Refusal::new(op, ErrorCode::InvalidArgument, m);
    let t = parse_token(op, token)?;
    let kind = match socket {
        SocketType::Listener => SocketKind::Listener {
            backlog: backlog.unwrap_or(128).clamp(1, 65535),
        },
        SocketType::Stream => SocketKind::Stream,
        SocketType::Datagram => SocketKind::Datagram,
    };
    let addr: IpAddr = match &address {
        None => Ipv6Addr::UNSPECIFIED.into(),
        Some(a) => a.parse().map_err(|_| {
            invalid(format!(
                "{a:?} is not an IP address; give a local address such as 127.0.0.1 or ::1, or \
                 none for every address"
            ))
        })?,
    };
    let mut st = shared.space(caller.session);
    // Ports whose sockets closed go back to the block first, so "lowest free port" is true.
    if let Some(r) = Token::new(t).and_then(|tk| st.table.get(tk))
        && (port == 0 && !r.handed_out().is_empty() || r.handed_out().contains(&port))
    {
        let tk = r.token;
        reclaim(&mut st, tk);
    }
    let chosen = st.table.associate(caller, t, kind.protocol(), port)?;
    let tk = Token::new(t).expect("associate succeeded");
    let r = st.table.get(tk).expect("live").clone();
    match st.enforcer.hand_over(&r, chosen, kind, addr, v6only) {
        Ok((fd, bound)) => {
            if let Some(rec) = st.enforcer.handed_rec(tk, chosen)
                && let Some(k) = &mut st.keeper
            {
                k.handed(tk.get(), rec);
            }
            let local = bound.to_string();
            tracing::info!(
                pid = caller.pid, uid = caller.uid, token = %tk,
                "handed out {socket} socket on [{local}]:{chosen}/{}", r.protocol
            );
            Ok((
                Reply::Socket(SocketRef {
                    port: chosen,
                    address: local,
                    fds: 1,
                }),
                Some(fd),
            ))
        }
        Err(e) => {
            st.table.return_port(tk, chosen);
            let refusal = match e.raw_os_error() {
                Some(98) => {
                    let c = Conflict {
                        protocol: r.protocol,
                        port: chosen,
                        holder: Holder::Socket {
                            description: crate::visibility::describe_holder(r.protocol, chosen),
                        },
                    };
                    Refusal::new(
                        op,
                        ErrorCode::AddressInUse,
                        format!(
                            "cannot bind port {chosen}/{} from reservation {tk}: {c} (blocks in \
                             exclude mode are not held, so a program may bind their ports \
                             itself); close that socket, or use a hold-mode reservation",
                            r.protocol
                        ),
                    )
                    .with_conflict(c)
                }
                Some(105) => Refusal::new(
                    op,
                    ErrorCode::NoBufferSpace,
                    format!(
                        "cannot hand out a UDP socket on port {chosen} of reservation {tk}: this \
                         daemon cannot load eBPF, so each UDP socket handed out beside a \
                         placeholder needs a classic BPF program of its own, and {} are in use \
                         (the limit keeps the kernel's BPF allocator safe); release UDP blocks, \
                         bind a specific address instead of the wildcard, or use the system \
                         daemon (root), which shares one program for all",
                        crate::enforce::MAX_CLASSIC_STEERING
                    ),
                ),
                Some(99) => invalid(format!(
                    "cannot bind port {chosen} on {addr}: it is not an address of this machine \
                     (in the daemon's network namespace); give a local address, or none"
                )),
                _ => Refusal::new(
                    op,
                    ErrorCode::Internal,
                    format!(
                        "cannot bind port {chosen}/{} on {addr} from reservation {tk}: {e}; see \
                         the daemon's log",
                        r.protocol
                    ),
                ),
            };
            Err(refusal)
        }
    }
}

/// A persistent reservation's `description`: at most as long as in the reservation files.
fn checked_description(op: Operation, d: Option<String>) -> Result<Option<String>, Refusal> {
    match d {
        Some(d) if d.len() > crate::declared::MAX_DESCRIPTION => Err(Refusal::new(
            op,
            ErrorCode::InvalidParameter,
            format!(
                "description is {} bytes long; at most {}: say why in a sentence",
                d.len(),
                crate::declared::MAX_DESCRIPTION
            ),
        )),
        Some(d) if d.trim().is_empty() => Ok(None),
        d => Ok(d),
    }
}

#[cfg(not(feature = "cluster"))]
fn no_cluster(op: Operation) -> Refusal {
    Refusal::new(
        op,
        ErrorCode::InvalidArgument,
        "this portres daemon was built without cluster mode (the `cluster` feature); nothing \
         was changed"
            .to_string(),
    )
}

#[cfg(feature = "cluster")]
fn cluster_of(shared: &Shared, op: Operation) -> Result<Arc<crate::cluster::Cluster>, Refusal> {
    shared.cluster.clone().ok_or_else(|| {
        Refusal::new(
            op,
            ErrorCode::InvalidArgument,
            "this daemon is not in cluster mode: its configuration has no [cluster] (etcd \
             endpoints and this member's name); nothing was changed"
                .to_string(),
        )
    })
}

/// A runtime reservation of this host (`acquire`).
pub(crate) fn acquire_here(
    shared: &Shared,
    caller: &Caller,
    p: Protocol,
    start: u32,
    count: u32,
    m: Mode,
) -> Result<Reservation, Refusal> {
    let mut st = shared.space(caller.session);
    quota_across_namespaces(&st, caller, count)?;
    let State {
        table, enforcer, ..
    } = &mut *st;
    let result = table.acquire(caller, p, start, count, m, now(), &mut OsRandom, enforcer);
    if let Ok(r) = &result {
        st.keep(r, false);
    }
    log_outcome(caller, "acquire", &result);
    result
}

/// Releases runtime reservation `r` of `caller`'s session (a cluster acquire that did not go
/// through).
#[cfg(feature = "cluster")]
pub(crate) fn release_here(shared: &Shared, caller: &Caller, r: &Reservation) {
    let mut st = shared.space(caller.session);
    if let Ok(r) = st.table.release(caller, r.token.get()) {
        st.retire(&r);
        st.sync_keeper();
    }
}

/// `acquire` with `cluster`: a block free on every live member.
async fn acquire_in_cluster(
    shared: &Shared,
    caller: &Caller,
    p: Protocol,
    start: u32,
    count: u32,
    m: Mode,
) -> Result<Reservation, Refusal> {
    let op = Operation::AcquireRuntime;
    #[cfg(not(feature = "cluster"))]
    {
        let _ = (shared, caller, p, start, count, m);
        Err(no_cluster(op))
    }
    #[cfg(feature = "cluster")]
    {
        let c = cluster_of(shared, op)?;
        outside_home(shared, caller, op)?;
        crate::cluster::acquire(shared, &c, caller, p, start, count, m).await
    }
}

/// `persistent add --cluster`.
#[allow(clippy::too_many_arguments)]
async fn create_in_cluster(
    shared: &Shared,
    caller: &Caller,
    p: Protocol,
    start: u32,
    count: u32,
    m: Mode,
    acl: Acl,
    description: Option<String>,
    netns: Option<String>,
) -> Result<Reservation, Refusal> {
    let op = Operation::CreatePersistent;
    #[cfg(not(feature = "cluster"))]
    {
        let _ = (shared, caller, p, start, count, m, acl, description, netns);
        Err(no_cluster(op))
    }
    #[cfg(feature = "cluster")]
    {
        let c = cluster_of(shared, op)?;
        if netns.is_some() {
            return Err(Refusal::new(
                op,
                ErrorCode::InvalidArgument,
                "a cluster reservation is in each member's own port space: --netns does not go \
                 with --cluster"
                    .to_string(),
            ));
        }
        outside_home(shared, caller, op)?;
        let range = portres_core::PortRange::new(start, count)
            .ok()
            .filter(|r| r.start() > 0)
            .ok_or_else(|| {
                Refusal::new(
                    op,
                    ErrorCode::InvalidParameter,
                    format!(
                        "cannot create cluster reservation of {count} ports from {start}: not a \
                         block of ports 1 to 65535"
                    ),
                )
            })?;
        let entry = crate::cluster::ClusterEntry {
            protocol: p.as_str().into(),
            start: range.start(),
            count: range.count(),
            mode: m.as_str().into(),
            allow_users: acl.users,
            allow_groups: acl.groups,
            description,
            node: c.cfg.node.clone(),
            runtime: false,
            created: now(),
            creator_uid: caller.uid,
            creator_command: portres_sys::process::command_line(caller.pid),
            file: None,
        };
        crate::cluster::create(shared, &c, caller, entry).await
    }
}

/// Whether `token` is a cluster reservation mirrored here.
fn cluster_mirror(shared: &Shared, token: Token) -> bool {
    shared
        .home()
        .table
        .get(token)
        .is_some_and(|r| r.origin().is_some_and(|o| o.cluster.is_some()))
}

/// `persistent delete` of a cluster reservation (mirrored here): deleted from the cluster
/// (true). When this daemon is not in cluster mode (it left the cluster), false: it is deleted
/// here as a host reservation.
async fn delete_in_cluster(
    shared: &Shared,
    token: portres_core::Token,
    range: portres_core::PortRange,
    p: Protocol,
) -> Result<bool, Refusal> {
    let origin = shared
        .home()
        .table
        .get(token)
        .and_then(|r| r.origin().and_then(|o| o.cluster.clone()));
    let Some(origin) = origin else {
        return Ok(false);
    };
    #[cfg(not(feature = "cluster"))]
    {
        let _ = (origin, range, p);
        Ok(false)
    }
    #[cfg(feature = "cluster")]
    {
        let op = Operation::DeletePersistent;
        let Some(c) = shared.cluster.clone() else {
            return Ok(false);
        };
        if origin.runtime {
            return Err(Refusal::new(
                op,
                ErrorCode::AccessDenied,
                format!(
                    "cannot delete {range}/{p}: it is a runtime block of a session on member {}, \
                     kept free here; it ends with that session (or {} s after that member is \
                     gone)",
                    origin.node, c.cfg.lease_ttl_secs
                ),
            ));
        }
        crate::cluster::delete(&c, &origin.key, &format!("{range}/{p}")).await?;
        Ok(true)
    }
}

/// `portres cluster status`.
async fn cluster_status(shared: &Shared) -> Handled {
    #[cfg(not(feature = "cluster"))]
    {
        let _ = shared;
        Err(no_cluster(Operation::Other))
    }
    #[cfg(feature = "cluster")]
    {
        let c = cluster_of(shared, Operation::Other)?;
        Ok((Reply::Cluster(c.status().await), None))
    }
}
