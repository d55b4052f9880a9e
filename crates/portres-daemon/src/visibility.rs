//! Who has a port (docs/behaviour.md §7): live sockets from the kernel's socket table
//! (`sock_diag`), mapped to processes through `/proc`, described in words for `who`, `show` and
//! conflict messages.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use portres_core::Protocol;
use portres_proto::{Counted, SocketInfo, WhoSummary};
use portres_sys::sockdiag::{self, SocketEntry};

/// A socket and the processes holding it.
pub(crate) struct Seen {
    pub entry: SocketEntry,
    pub pids: Vec<u32>,
}

/// Every live socket on `port`, with its processes; and how many processes could not be
/// examined (when the daemon lacks the privilege).
pub(crate) fn sockets_on(protocol: Protocol, port: u16) -> (Vec<Seen>, usize) {
    let (seen, _, hidden) = sockets_on_with(protocol, port, &HashSet::new());
    (seen, hidden)
}

/// [`sockets_on`], looking up the processes of the sockets `also` in the same pass over
/// `/proc` (e.g. those handed out from the reservation covering the port): returns their
/// owners beside.
pub(crate) fn sockets_on_with(
    protocol: Protocol,
    port: u16,
    also: &HashSet<u64>,
) -> (Vec<Seen>, HashMap<u64, Vec<u32>>, usize) {
    let entries = sockdiag::sockets_on_ports(protocol, port, port).unwrap_or_default();
    let mut inodes: HashSet<u64> = entries
        .iter()
        .map(|e| e.inode)
        .filter(|&i| i != 0)
        .collect();
    inodes.extend(also);
    let (owners, hidden) = portres_sys::procfs::socket_owners(&inodes);
    let seen = entries
        .into_iter()
        .map(|entry| {
            let pids = owners.get(&entry.inode).cloned().unwrap_or_default();
            Seen { entry, pids }
        })
        .collect();
    (seen, owners, hidden)
}

/// Longest command line reported for a process, in bytes (longer ones end in `…`).
const MAX_COMMAND: usize = 1024;

/// Names of processes and users, looked up once per answer (a busy port has thousands of
/// sockets of a few processes).
#[derive(Default)]
pub(crate) struct Names {
    users: HashMap<u32, String>,
    procs: HashMap<u32, Option<(String, u32)>>,
    commands: HashMap<u32, Option<String>>,
}

impl Names {
    /// A user's name, or `uid N`.
    pub(crate) fn user(&mut self, uid: u32) -> String {
        self.users
            .entry(uid)
            .or_insert_with(|| {
                portres_sys::creds::user_name(uid).unwrap_or_else(|| format!("uid {uid}"))
            })
            .clone()
    }

    /// A user's name, when it resolves.
    pub(crate) fn user_name(&mut self, uid: u32) -> Option<String> {
        let n = self.user(uid);
        (n != format!("uid {uid}")).then_some(n)
    }

    /// A process's command line, at most [`MAX_COMMAND`] bytes.
    pub(crate) fn command(&mut self, pid: u32) -> Option<String> {
        self.commands
            .entry(pid)
            .or_insert_with(|| portres_sys::process::command_line(pid).map(cap_command))
            .clone()
    }

    fn process(&mut self, pid: u32) -> Option<(String, u32)> {
        self.procs
            .entry(pid)
            .or_insert_with(|| {
                // A process chooses its own name: printable only (it reaches terminals and logs).
                let name =
                    portres_core::printable(&portres_sys::procfs::process_name(pid)?).into_owned();
                Some((name, portres_sys::procfs::process_uid(pid)?))
            })
            .clone()
    }

    /// "nginx (pid 4121, user www-data)", for the process holding a socket.
    pub(crate) fn holder(&mut self, s: &Seen) -> String {
        match s.pids.first() {
            Some(&pid) => {
                let (name, puid) = self
                    .process(pid)
                    .unwrap_or_else(|| ("?".into(), s.entry.uid));
                let more = match s.pids.len() {
                    1 => String::new(),
                    n => format!(" and {} more processes", n - 1),
                };
                format!("{name} (pid {pid}, user {}){more}", self.user(puid))
            }
            None if s.entry.state_name() == "time-wait" => "no process (TIME_WAIT)".into(),
            None => format!(
                "a socket of {} whose process the daemon cannot see",
                self.user(s.entry.uid)
            ),
        }
    }

    /// "nginx (pid 4121, user www-data), listening on [::]:8080"; `role` names portres's own
    /// sockets.
    pub(crate) fn describe(&mut self, s: &Seen, role: Option<&str>) -> String {
        let e = &s.entry;
        let what = match e.state_name() {
            "listening" => format!("listening on {}", e.local),
            "bound" => format!("bound to {}", e.local),
            "connected" => format!("connected from {} to {}", e.local, e.remote),
            "time-wait" => {
                return format!(
                    "a connection in TIME_WAIT from {} to {} (no process holds it; the kernel \
                     frees it within 60 s)",
                    e.local, e.remote
                );
            }
            other => format!("{other} on {}", e.local),
        };
        match role {
            Some(role) => format!("{role}, {what}"),
            None => format!("{}, {what}", self.holder(s)),
        }
    }

    /// The wire form of a socket.
    pub(crate) fn socket_info(&mut self, s: &Seen, role: Option<&str>) -> SocketInfo {
        let e = &s.entry;
        let pid = s.pids.first().copied();
        SocketInfo {
            state: e.state_name().into(),
            local: e.local.to_string(),
            remote: (!e.remote.ip().is_unspecified() || e.remote.port() != 0)
                .then(|| e.remote.to_string()),
            uid: e.uid,
            user: self.user_name(e.uid),
            inode: e.inode,
            pid,
            pids: s.pids.clone(),
            command: pid.and_then(|p| self.command(p)),
            role: role.map(str::to_string),
            description: self.describe(s, role),
        }
    }
}

/// A command line cut to [`MAX_COMMAND`] bytes.
pub(crate) fn cap_command(mut c: String) -> String {
    if c.len() > MAX_COMMAND {
        let mut keep = MAX_COMMAND;
        while !c.is_char_boundary(keep) {
            keep -= 1;
        }
        c.truncate(keep);
        c.push('…');
    }
    c
}

/// [`Names::describe`] with fresh names.
pub(crate) fn describe(s: &Seen, role: Option<&str>) -> String {
    Names::default().describe(s, role)
}

/// The first socket on `port` in words, for conflict messages: sockets with a visible process
/// first, TIME_WAIT last. One line, however many sockets the port has.
pub(crate) fn describe_holder(protocol: Protocol, port: u16) -> Option<String> {
    let (mut seen, _) = sockets_on(protocol, port);
    seen.sort_by_key(|s| (s.entry.state_name() == "time-wait", s.pids.is_empty()));
    let more = match seen.len() {
        0 | 1 => String::new(),
        n => format!(" (and {} more sockets on the port)", n - 1),
    };
    seen.first().map(|s| describe(s, None) + &more)
}

/// Every socket on a port, counted: by state, process, user and remote address.
pub(crate) fn summarise(seen: &[Seen], names: &mut Names) -> WhoSummary {
    let mut by_state: HashMap<&'static str, u64> = HashMap::new();
    let mut by_process: HashMap<String, u64> = HashMap::new();
    let mut by_user: HashMap<u32, u64> = HashMap::new();
    let mut remotes: HashMap<IpAddr, u64> = HashMap::new();
    for s in seen {
        *by_state.entry(s.entry.state_name()).or_default() += 1;
        *by_process.entry(names.holder(s)).or_default() += 1;
        *by_user.entry(s.entry.uid).or_default() += 1;
        if !s.entry.remote.ip().is_unspecified() {
            *remotes.entry(s.entry.remote.ip()).or_default() += 1;
        }
    }
    fn top<K>(m: HashMap<K, u64>, mut name: impl FnMut(K) -> String, n: usize) -> Vec<Counted> {
        let mut v: Vec<Counted> = m
            .into_iter()
            .map(|(k, count)| Counted {
                name: name(k),
                count,
            })
            .collect();
        v.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.name.cmp(&b.name)));
        v.truncate(n);
        v
    }
    WhoSummary {
        sockets: seen.len() as u64,
        by_state: top(by_state, str::to_string, usize::MAX),
        by_process: top(by_process, |k| k, 10),
        by_user: top(by_user, |u| names.user(u), 10),
        top_remotes: top(remotes, |ip| ip.to_string(), 10),
        not_listed: 0,
    }
}
