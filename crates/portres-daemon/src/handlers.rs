//! One function per request: wire message in, table operation, wire reply out.

use std::time::{SystemTime, UNIX_EPOCH};

use portres_core::{
    Acl, Caller, Conflict, ErrorCode, Holder, Kind, Mode, Operation, Owner, PortProbe, PortRange,
    Protocol, Refusal, Reservation, SocketInUse, TokenSource,
};
use portres_proto::{
    ConflictInfo, Counts, LayerInfo, OwnerInfo, Reply, Request, ReservationInfo, ReservationRef,
    ShowInfo, StatusInfo,
};

use crate::Shared;
use crate::store::StoredReservation;

/// Tokens from `getrandom(2)`.
struct OsRandom;
impl TokenSource for OsRandom {
    fn random_u64(&mut self) -> u64 {
        // getrandom only fails before the pool is initialised on very early boot, or on EINTR;
        // retrying is the right answer for both.
        loop {
            if let Ok(v) = portres_sys::process::random_u64() {
                return v;
            }
        }
    }
}

/// Asks the kernel by trying to bind each port (see `portres_sys::ports::port_in_use`).
struct KernelProbe;
impl PortProbe for KernelProbe {
    fn first_in_use(&mut self, protocol: Protocol, range: PortRange) -> Option<SocketInUse> {
        portres_sys::ports::first_port_in_use(protocol, range).map(|port| SocketInUse {
            port,
            description: None,
        })
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn protocol(op: Operation, s: &str) -> Result<Protocol, Refusal> {
    s.parse().map_err(|e: String| {
        Refusal::new(
            op,
            ErrorCode::InvalidArgument,
            format!("{e}; the request is refused"),
        )
    })
}

fn mode(op: Operation, s: Option<&str>, default: Mode) -> Result<Mode, Refusal> {
    match s {
        None => Ok(default),
        Some(m) => m.parse().map_err(|e: String| {
            Refusal::new(
                op,
                ErrorCode::InvalidArgument,
                format!("{e}; the request is refused"),
            )
        }),
    }
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

pub(crate) async fn handle(
    shared: &Shared,
    caller: &Caller,
    request: Request,
) -> Result<Reply, Refusal> {
    match request {
        Request::Acquire {
            protocol: p,
            start,
            count,
            mode: m,
        } => {
            let op = Operation::AcquireRuntime;
            let p = protocol(op, &p)?;
            let m = mode(op, m.as_deref(), Mode::Hold)?;
            let result = shared.table.lock().unwrap().acquire(
                caller,
                p,
                start,
                count,
                m,
                now(),
                &mut OsRandom,
                &mut KernelProbe,
            );
            log_outcome(caller, "acquire", &result);
            result.map(|r| reservation_ref(&r))
        }
        Request::Release { token } => {
            let op = Operation::ReleaseRuntime;
            let t = parse_token(op, &token)?;
            let result = shared.table.lock().unwrap().release(caller, t);
            log_outcome(caller, "release", &result);
            result.map(|_| Reply::Done)
        }
        Request::CreatePersistent {
            protocol: p,
            start,
            count,
            mode: m,
            allow_users,
            allow_groups,
        } => {
            let op = Operation::CreatePersistent;
            let p = protocol(op, &p)?;
            let m = mode(op, m.as_deref(), Mode::Exclude)?;
            let acl = resolve_acl(&allow_users, &allow_groups)?;
            let _serial = shared.persist_lock.lock().await;
            let command = portres_sys::process::command_line(caller.pid);
            let created = shared.table.lock().unwrap().create_persistent(
                caller,
                p,
                start,
                count,
                m,
                acl,
                command,
                now(),
                &mut OsRandom,
                &mut KernelProbe,
            );
            let r = match created {
                Ok(r) => r,
                Err(e) => {
                    log_outcome::<()>(caller, "create persistent", &Err(e.clone()));
                    return Err(e);
                }
            };
            // The reservation is in the table (so nobody else can take the block meanwhile);
            // the reply waits for the store's fsync, and a failed write takes it out again.
            let store = shared.store.clone();
            let rec = StoredReservation::from_reservation(&r);
            let written = tokio::task::spawn_blocking(move || store.put(&rec))
                .await
                .map_err(|e| e.to_string())
                .and_then(|w| w.map_err(|e| e.to_string()));
            if let Err(e) = written {
                shared.table.lock().unwrap().remove_persistent(r.token);
                tracing::error!(error = %e, "store write failed");
                return Err(internal(op, "writing the store", e));
            }
            tracing::info!(
                pid = caller.pid, uid = caller.uid, token = %r.token,
                "created persistent reservation {}/{} ({})", r.range, r.protocol, r.mode
            );
            Ok(reservation_ref(&r))
        }
        Request::LookupPersistent {
            protocol: p,
            start,
            count,
        } => {
            let p = protocol(Operation::LookupPersistent, &p)?;
            let table = shared.table.lock().unwrap();
            table
                .lookup_persistent(p, start, count)
                .map(reservation_ref)
        }
        Request::DeletePersistent {
            protocol: p,
            start,
            count,
        } => {
            let op = Operation::DeletePersistent;
            let p = protocol(op, &p)?;
            let _serial = shared.persist_lock.lock().await;
            let found = shared
                .table
                .lock()
                .unwrap()
                .check_delete_persistent(caller, p, start, count)
                .map(|r| (r.token, r.range));
            let (token, range) = match found {
                Ok(x) => x,
                Err(e) => {
                    log_outcome::<()>(caller, "delete persistent", &Err(e.clone()));
                    return Err(e);
                }
            };
            // Off the disk first: a crash after this and before the reply leaves it deleted,
            // never half-deleted.
            let store = shared.store.clone();
            let removed = tokio::task::spawn_blocking(move || store.delete(p, range.start()))
                .await
                .map_err(|e| e.to_string())
                .and_then(|w| w.map_err(|e| e.to_string()));
            if let Err(e) = removed {
                tracing::error!(error = %e, "store delete failed");
                return Err(internal(op, "writing the store", e));
            }
            shared.table.lock().unwrap().remove_persistent(token);
            tracing::info!(
                pid = caller.pid, uid = caller.uid, token = %token,
                "deleted persistent reservation {range}/{p}"
            );
            Ok(Reply::Done)
        }
        Request::Status => Ok(Reply::Status(status(shared))),
        Request::Show => Ok(Reply::Show(show(shared, caller))),
    }
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

fn log_outcome<T>(caller: &Caller, what: &str, result: &Result<T, Refusal>)
where
    T: LogGrant,
{
    match result {
        Ok(v) => v.log(caller, what),
        Err(e) => tracing::info!(
            pid = caller.pid,
            uid = caller.uid,
            code = e.code.as_str(),
            "denied {what}: {}",
            e.message
        ),
    }
}

trait LogGrant {
    fn log(&self, caller: &Caller, what: &str);
}
impl LogGrant for () {
    fn log(&self, _: &Caller, _: &str) {}
}
impl LogGrant for Reservation {
    fn log(&self, caller: &Caller, what: &str) {
        tracing::info!(
            pid = caller.pid, uid = caller.uid, token = %self.token,
            "{what}: {}/{} ({})", self.range, self.protocol, self.mode
        );
    }
}

fn status(shared: &Shared) -> StatusInfo {
    let table = shared.table.lock().unwrap();
    let mut counts = Counts {
        sessions: table.session_count() as u64,
        ..Counts::default()
    };
    for r in table.reservations() {
        if r.is_persistent() {
            counts.persistent += 1;
        } else {
            counts.runtime += 1;
        }
        counts.ports_reserved += u64::from(r.range.count());
    }
    let not_yet = "not implemented in this version: reservations are recorded and checked \
                   against ports in use, but the kernel does not yet keep other programs off them";
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
        layers: ["hold", "exclude", "deny"]
            .into_iter()
            .map(|name| LayerInfo {
                name: name.into(),
                active: false,
                reason: not_yet.into(),
            })
            .collect(),
        counts,
    }
}

fn show(shared: &Shared, caller: &Caller) -> ShowInfo {
    let table = shared.table.lock().unwrap();
    let names = |ids: &[u32], f: fn(u32) -> Option<String>| {
        ids.iter()
            .map(|&i| f(i).unwrap_or_else(|| i.to_string()))
            .collect()
    };
    ShowInfo {
        reservations: table
            .reservations()
            .map(|r| {
                let (allow_users, allow_groups) = match &r.kind {
                    Kind::Persistent { acl } => (
                        names(&acl.users, portres_sys::creds::user_name),
                        names(&acl.groups, portres_sys::creds::group_name),
                    ),
                    Kind::Runtime { .. } => (Vec::new(), Vec::new()),
                };
                ReservationInfo {
                    protocol: r.protocol.as_str().into(),
                    start: r.range.start(),
                    count: r.range.count(),
                    kind: r.kind_str().into(),
                    mode: r.mode.as_str().into(),
                    token: (caller.admin || caller.uid == r.owner.uid).then(|| r.token.to_string()),
                    owner: owner_info(&r.owner),
                    created: r.created,
                    handed_out: r.handed_out().iter().copied().collect(),
                    allow_users,
                    allow_groups,
                }
            })
            .collect(),
    }
}
