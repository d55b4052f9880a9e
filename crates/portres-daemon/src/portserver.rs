//! Google's portserver protocol, as `portpicker.pick_unused_port()` speaks it when
//! `PORTSERVER_ADDRESS` is set: the client connects to a Unix stream socket, writes a pid in
//! decimal and a newline, and reads a port number and a newline; an empty reply (the connection
//! closed with nothing written) when no port can be given.
//!
//! Each grant is a runtime reservation of one TCP port in `exclude` mode (the process binds it
//! itself; `ip_local_reserved_ports` keeps the kernel from handing it out, for TCP and UDP
//! alike) owned by the named process: a session of its own per pid, with that process's uid
//! (counted in that user's quota), command and network namespace, visible in `show` and `who`
//! like any other. The session ends, and its ports with it, when the process exits: the daemon
//! waits on a pidfd of it (readable once it has exited), never polls. A pid that does not exist
//! gets the empty reply; so does a caller (`SO_PEERCRED`) naming a process of another uid,
//! unless it is an administrator.
//!
//! The address is spelled as portpicker spells it: `@name` for an abstract Unix socket (in the
//! daemon's network namespace), anything else a path.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use portres_core::{Caller, Owner, PortRange, SessionId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Shared;

/// portpicker's default address.
pub const DEFAULT_ADDRESS: &str = "@unittest-portserver";

/// Longest request line read (a pid and a newline).
const MAX_REQUEST: usize = 32;

/// How long a client may take to send its line.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Most portserver connections served at once (each is a task and a descriptor); more wait in
/// the listen queue.
const MAX_CONNECTIONS: usize = 256;

/// Binds the portserver socket at `address` (`@name`: abstract; otherwise a path, replacing a
/// stale socket file nobody answers on).
pub fn bind(address: &str) -> std::io::Result<std::os::unix::net::UnixListener> {
    use std::os::linux::net::SocketAddrExt;
    let listener = match address.strip_prefix('@') {
        Some(name) => {
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            std::os::unix::net::UnixListener::bind_addr(&addr)?
        }
        None => {
            let path = std::path::Path::new(address);
            if path.exists() && std::os::unix::net::UnixStream::connect(path).is_err() {
                std::fs::remove_file(path)?;
            }
            let l = std::os::unix::net::UnixListener::bind(path)?;
            // Anyone may ask (each request is checked against its caller's uid).
            std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o666))?;
            l
        }
    };
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// The sessions of the processes ports were granted to, by pid.
#[derive(Default)]
pub(crate) struct Grantees {
    by_pid: Mutex<HashMap<u32, Grantee>>,
    /// Where the next search of `portserver_range` starts.
    cursor: std::sync::atomic::AtomicU32,
}

struct Grantee {
    session: SessionId,
    /// The process's start time, telling a reused pid apart.
    started: Option<u64>,
    /// Its uid when the session was opened (a process that changed uid gets a new session).
    uid: u32,
    /// The task waiting for it to exit.
    watcher: tokio::task::AbortHandle,
}

/// Serves the portserver socket until `shutdown`.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    listener: tokio::net::UnixListener,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut warned = false;
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    warned = false;
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        answer(shared, stream).await;
                        drop(slot);
                    });
                }
                Err(e) => {
                    if !warned {
                        tracing::warn!(error = %e, "portserver: accept failed; retrying");
                        warned = true;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// One request: read the pid, grant a port or close without a word.
async fn answer(shared: Arc<Shared>, mut stream: tokio::net::UnixStream) {
    let Ok(peer) = portres_sys::creds::peer_cred(&stream) else {
        return;
    };
    let mut caller_gids = portres_sys::creds::peer_groups(&stream).unwrap_or_default();
    caller_gids.push(peer.gid);
    // A per-user daemon's portserver is its user's alone (an abstract socket is open to all).
    if shared.placement.scope == "user" && peer.uid != shared.own_uid {
        tracing::info!(
            uid = peer.uid,
            "portserver: refused a caller of another uid (a per-user daemon serves its user)"
        );
        return;
    }
    let mut buf = Vec::with_capacity(MAX_REQUEST);
    let read = tokio::time::timeout(REQUEST_TIMEOUT, async {
        while !buf.contains(&b'\n') && buf.len() < MAX_REQUEST {
            let mut chunk = [0u8; MAX_REQUEST];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n.min(MAX_REQUEST - buf.len())]);
        }
        std::io::Result::Ok(())
    })
    .await;
    if !matches!(read, Ok(Ok(()))) {
        return;
    }
    let pid = std::str::from_utf8(&buf)
        .ok()
        .and_then(|s| s.split('\n').next())
        .and_then(|s| s.trim().parse::<u32>().ok())
        .filter(|&p| p > 0);
    let Some(pid) = pid else {
        tracing::info!(
            pid = peer.pid,
            uid = peer.uid,
            "portserver: unreadable request, empty reply"
        );
        return;
    };
    // A caller in another pid namespace writes the pid it sees, which names another process
    // here: only its own pid is accepted from it, and taken as the daemon sees it.
    let pid = match pid_namespace_pids(peer.pid) {
        Some(nspids) if nspids.len() > 1 => {
            if nspids.last() == Some(&pid) {
                peer.pid
            } else {
                tracing::info!(
                    pid = peer.pid,
                    uid = peer.uid,
                    for_pid = pid,
                    "portserver: no port (empty reply): the caller is in another pid namespace \
                     and may only name itself"
                );
                return;
            }
        }
        _ => pid,
    };
    match grant(&shared, peer.uid, &caller_gids, pid) {
        Ok(port) => {
            let _ = stream.write_all(format!("{port}\n").as_bytes()).await;
        }
        Err(why) => {
            tracing::info!(
                pid = peer.pid,
                uid = peer.uid,
                for_pid = pid,
                "portserver: no port (empty reply): {why}"
            );
        }
    }
    crate::server::schedule_background_work(&shared);
}

/// Process `pid`'s pids in each pid namespace it is in, outermost (the daemon's, when the
/// daemon is in the initial one) first: the `NSpid:` line of `/proc/PID/status`.
fn pid_namespace_pids(pid: u32) -> Option<Vec<u32>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
    line.split_whitespace().map(|p| p.parse().ok()).collect()
}

/// The effective uid and the groups (primary and supplementary) of process `pid`
/// (`/proc/PID/status`).
fn creds_of(pid: u32) -> Option<(u32, Vec<u32>)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name));
    let uid = field("Uid:")?.split_whitespace().nth(1)?.parse().ok()?;
    let mut gids: Vec<u32> = field("Groups:")
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|g| g.parse().ok())
        .collect();
    if let Some(g) = field("Gid:").and_then(|l| l.split_whitespace().nth(1)?.parse().ok()) {
        gids.push(g);
    }
    Some((uid, gids))
}

/// A port for process `pid`, asked by a caller of uid `caller_uid` and groups `caller_gids`.
fn grant(
    shared: &Arc<Shared>,
    caller_uid: u32,
    caller_gids: &[u32],
    pid: u32,
) -> Result<u16, String> {
    let pidfd =
        portres_sys::process::pidfd_open(pid).map_err(|e| format!("no process {pid} ({e})"))?;
    let (uid, gids) = creds_of(pid).ok_or_else(|| format!("cannot read /proc/{pid}/status"))?;
    let caller_admin = crate::server::is_admin(shared, caller_uid, caller_gids);
    if uid != caller_uid && !caller_admin {
        return Err(format!(
            "uid {caller_uid} named process {pid} of uid {uid}: only an administrator may pin \
             ports to another user's process"
        ));
    }
    let admin = crate::server::is_admin(shared, uid, &gids);
    let (session, fresh) = session_for(shared, pid, uid, admin, pidfd)?;
    // The grant is the named process's: its uid's quota (none for an administrator's).
    let caller = Caller {
        session,
        pid,
        uid,
        gids,
        admin,
    };
    let range = shared.config.portserver_range;
    match crate::handlers::portserver_acquire(shared, &caller, range, &shared.grantees.cursor) {
        Ok(r) => Ok(r.range.start()),
        Err(refusal) => {
            // A session opened for this request alone goes again: a refused request leaves
            // nothing behind (no pidfd, no watcher).
            if fresh {
                let removed = {
                    let mut by_pid = shared.grantees.by_pid.lock().unwrap();
                    match by_pid.get(&pid) {
                        Some(g) if g.session == session => by_pid.remove(&pid),
                        _ => None,
                    }
                };
                if let Some(g) = removed {
                    g.watcher.abort();
                    crate::server::finish_session(
                        shared,
                        session,
                        Some((pid, uid)),
                        "portserver: its only request was refused",
                    );
                }
            }
            Err(refusal.message)
        }
    }
}

/// The session of `pid`'s grants, opened (and watched) on its first grant.
/// Returns it and whether it was opened now.
fn session_for(
    shared: &Arc<Shared>,
    pid: u32,
    uid: u32,
    admin: bool,
    pidfd: OwnedFd,
) -> Result<(SessionId, bool), String> {
    let started = portres_sys::process::start_time(pid);
    let mut by_pid = shared.grantees.by_pid.lock().unwrap();
    if let Some(g) = by_pid.get(&pid)
        && g.started == started
        && g.uid == uid
    {
        return Ok((g.session, false));
    }
    let session = crate::server::new_session_id();
    let owner = Owner {
        pid: Some(pid),
        uid,
        command: portres_sys::process::command_line(pid),
    };
    shared
        .spaces()
        .open_session(session, owner, pid, admin, &shared.config, Some(&pidfd))?;
    tracing::info!(
        pid,
        uid,
        session,
        "portserver: first request for process {pid}"
    );
    // Its ports end when it exits: a pidfd becomes readable then.
    let watched = shared.clone();
    let watcher = tokio::spawn(async move {
        let shared = watched;
        // `register` is the unsafe successor of `new`; this crate has no unsafe code, and an
        // `OwnedFd` moved in stays open and the same for the AsyncFd's whole life, which is
        // all either asks.
        #[allow(deprecated)]
        let watched = tokio::io::unix::AsyncFd::new(pidfd);
        match watched {
            Ok(fd) => {
                let _ = fd.readable().await;
            }
            Err(e) => {
                tracing::error!(error = %e, pid, "portserver: cannot watch the process; its ports end now");
            }
        }
        {
            let mut by_pid = shared.grantees.by_pid.lock().unwrap();
            if by_pid.get(&pid).is_some_and(|g| g.session == session) {
                by_pid.remove(&pid);
            }
        }
        crate::server::finish_session(
            &shared,
            session,
            Some((pid, uid)),
            "portserver: the process its ports were granted to exited",
        );
    });
    // A previous session of that pid (the process changed uid) ends with the process, through
    // its own watcher.
    by_pid.insert(
        pid,
        Grantee {
            session,
            started,
            uid,
            watcher: watcher.abort_handle(),
        },
    );
    Ok((session, true))
}

/// The endpoint as asked for in the configuration or on the command line.
pub(crate) enum Endpoint {
    /// Answering at this address.
    Serving(String),
    /// Not served, and why.
    Failed(String),
}

impl Endpoint {
    /// In words, with the range grants come from (for `status`).
    pub(crate) fn describe(&self, range: Option<PortRange>) -> String {
        match (self, range) {
            (Endpoint::Failed(why), _) => why.clone(),
            (Endpoint::Serving(address), Some(r)) => format!("{address} (ports {r})"),
            (Endpoint::Serving(address), None) => format!("{address} (the dynamic range)"),
        }
    }
}
