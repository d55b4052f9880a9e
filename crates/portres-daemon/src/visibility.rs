//! Who has a port (SPEC §5): live sockets from the kernel's socket table (`sock_diag`), mapped to
//! processes through `/proc`, described in words for `who`, `show` and conflict messages.

use std::collections::HashSet;

use portres_core::Protocol;
use portres_proto::SocketInfo;
use portres_sys::sockdiag::{self, SocketEntry};

/// A socket and the processes holding it.
pub(crate) struct Seen {
    pub entry: SocketEntry,
    pub pids: Vec<u32>,
}

/// Every live socket on `port`, with its processes; and how many processes could not be
/// examined (when the daemon lacks the privilege).
pub(crate) fn sockets_on(protocol: Protocol, port: u16) -> (Vec<Seen>, usize) {
    let entries = sockdiag::sockets_on_ports(protocol, port, port).unwrap_or_default();
    let inodes: HashSet<u64> = entries
        .iter()
        .map(|e| e.inode)
        .filter(|&i| i != 0)
        .collect();
    let (owners, hidden) = portres_sys::procfs::socket_owners(&inodes);
    let seen = entries
        .into_iter()
        .map(|entry| {
            let pids = owners.get(&entry.inode).cloned().unwrap_or_default();
            Seen { entry, pids }
        })
        .collect();
    (seen, hidden)
}

fn user(uid: u32) -> String {
    portres_sys::creds::user_name(uid).unwrap_or_else(|| format!("uid {uid}"))
}

/// "nginx (pid 4121, user www-data), listening on [::]:8080"; `role` names portres's own
/// sockets.
pub(crate) fn describe(s: &Seen, role: Option<&str>) -> String {
    let e = &s.entry;
    let what = match e.state_name() {
        "listening" => format!("listening on {}", e.local),
        "bound" => format!("bound to {}", e.local),
        "connected" => format!("connected from {} to {}", e.local, e.remote),
        "time-wait" => {
            return format!(
                "a connection in TIME_WAIT from {} to {} (no process holds it; the kernel frees \
                 it within 60 s)",
                e.local, e.remote
            );
        }
        other => format!("{other} on {}", e.local),
    };
    let who = match s.pids.first() {
        Some(&pid) => {
            let name = portres_sys::procfs::process_name(pid).unwrap_or_else(|| "?".into());
            let puid = portres_sys::procfs::process_uid(pid).unwrap_or(e.uid);
            let more = match s.pids.len() {
                1 => String::new(),
                n => format!(" and {} more processes", n - 1),
            };
            format!("{name} (pid {pid}, user {}){more}", user(puid))
        }
        None => format!(
            "a socket of {} whose process the daemon cannot see",
            user(e.uid)
        ),
    };
    match role {
        Some(role) => format!("{role}, {what}"),
        None => format!("{who}, {what}"),
    }
}

/// The first socket on `port` in words, for conflict messages: sockets with a visible process
/// first, TIME_WAIT last.
pub(crate) fn describe_holder(protocol: Protocol, port: u16) -> Option<String> {
    let (mut seen, _) = sockets_on(protocol, port);
    seen.sort_by_key(|s| (s.entry.state_name() == "time-wait", s.pids.is_empty()));
    seen.first().map(|s| describe(s, None))
}

/// The wire form of a socket.
pub(crate) fn socket_info(s: &Seen, role: Option<&str>) -> SocketInfo {
    let e = &s.entry;
    let pid = s.pids.first().copied();
    SocketInfo {
        state: e.state_name().into(),
        local: e.local.to_string(),
        remote: (!e.remote.ip().is_unspecified() || e.remote.port() != 0)
            .then(|| e.remote.to_string()),
        uid: e.uid,
        user: portres_sys::creds::user_name(e.uid),
        inode: e.inode,
        pid,
        pids: s.pids.clone(),
        command: pid.and_then(portres_sys::process::command_line),
        role: role.map(str::to_string),
        description: describe(s, role),
    }
}
