//! Live restore: the keeper, a small process that holds a copy of everything the daemon must not
//! lose when it stops or dies, so that a successor carries on with no port ever unprotected.
//!
//! # Why a keeper process
//! A placeholder socket keeps its port only while some process has it open, and the daemon's
//! copies close when it exits, however it exits. systemd's descriptor store (`FDSTORE=1`) would
//! keep them, but only under systemd; a handover at exit would lose them on `kill -9`. So the
//! daemon starts one keeper per socket (`portres keeper`, in a session of its own) and sends it
//! a duplicate of every placeholder the moment it binds one, with the reservation's record and a
//! pidfd of its owner. A daemon that stops on SIGTERM, or dies, leaves the keeper holding them;
//! the next daemon connects to it (`SOCKET.keeper`, beside the daemon's socket, on the runtime
//! filesystem), receives the records and descriptors, and carries on from them. State lives only
//! in the keeper's memory: after a reboot there is nothing to restore. Kernel cost: a second
//! descriptor for each placeholder (the socket itself is shared, not copied) and one pidfd per
//! session that holds runtime reservations.
//!
//! # Messages
//! One JSON [`Msg`] per `SOCK_SEQPACKET` message, with descriptors as `SCM_RIGHTS`. The daemon
//! sends `put` (+ up to [`MAX_FDS`] placeholders; `fds` messages carry the rest of a large
//! block), `handed`/`returned` for sockets handed out from a block, `moved` when a client
//! re-attaches a reservation to a new session, `owner` (+ the pidfd) and `owner_gone`, `drop`,
//! and `barrier` (answered `ack` once everything before it is done: a released port is free
//! only once the keeper's copy is closed too). `dump` asks for everything: the keeper answers
//! with the same `put`/`fds`/`handed`/`owner` messages, then `end`. `release` closes everything
//! and ends the keeper (a stop meant as a stop). The keeper serves one daemon at a time, of its
//! own uid only; when that daemon goes, it waits [`Config::live_restore_secs`] for a successor,
//! and then releases everything as a stop would (restoring `ip_local_reserved_ports` from the
//! daemon's journal) and exits. Fields are only ever added, so a keeper started by an older
//! binary serves a newer daemon.
//!
//! [`Config::live_restore_secs`]: crate::Config

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use portres_core::{Mode, Protocol, Reservation};
use portres_sys::fdpass::{self, MAX_FDS};
use serde::{Deserialize, Serialize};

/// One reservation as the keeper keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Kept {
    pub token: u64,
    pub protocol: String,
    pub start: u16,
    pub count: u16,
    pub mode: String,
    pub persistent: bool,
    /// The session that owns it (runtime).
    #[serde(default)]
    pub session: u64,
    #[serde(default)]
    pub pid: Option<u32>,
    pub uid: u32,
    #[serde(default)]
    pub command: Option<String>,
    pub created: u64,
    /// Its placeholders are held by helper processes, not passed to the keeper.
    #[serde(default)]
    pub in_helpers: bool,
}

impl Kept {
    pub(crate) fn of(r: &Reservation, in_helpers: bool) -> Kept {
        Kept {
            token: r.token.get(),
            protocol: r.protocol.as_str().into(),
            start: r.range.start(),
            count: r.range.count(),
            mode: r.mode.as_str().into(),
            persistent: r.is_persistent(),
            session: r.session().unwrap_or(0),
            pid: r.owner.pid,
            uid: r.owner.uid,
            command: r.owner.command.clone(),
            created: r.created,
            in_helpers,
        }
    }

    pub(crate) fn protocol(&self) -> Option<Protocol> {
        self.protocol.parse().ok()
    }

    pub(crate) fn mode(&self) -> Option<Mode> {
        self.mode.parse().ok()
    }

    /// `FIRST-LAST/PROTOCOL (token T, pid P)`, for logs.
    pub(crate) fn name(&self) -> String {
        let last = u32::from(self.start) + u32::from(self.count).max(1) - 1;
        let who = match (self.persistent, self.pid) {
            (true, _) => "persistent".to_string(),
            (false, Some(pid)) => format!("pid {pid}"),
            (false, None) => "no pid".to_string(),
        };
        format!(
            "{}-{last}/{} ({}, token {}, {who})",
            self.start, self.protocol, self.mode, self.token
        )
    }
}

/// A socket handed out from a block, as the keeper keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct HandedRec {
    pub port: u16,
    pub inode: u64,
    pub addr: String,
    pub listener: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "m", rename_all = "snake_case")]
pub(crate) enum Msg {
    Put {
        record: Kept,
    },
    Fds {
        token: u64,
    },
    Handed {
        token: u64,
        handed: HandedRec,
    },
    Returned {
        token: u64,
        port: u16,
    },
    Moved {
        token: u64,
        session: u64,
    },
    Drop {
        token: u64,
    },
    Owner {
        session: u64,
        pid: u32,
        start_time: u64,
    },
    OwnerGone {
        session: u64,
    },
    Barrier,
    Ack,
    Dump,
    /// The end of a dump, with the keeper's pid.
    End {
        #[serde(default)]
        pid: Option<u32>,
    },
    Release,
}

fn encode(m: &Msg) -> Vec<u8> {
    serde_json::to_vec(m).expect("keeper messages serialise")
}

fn recv(sock: &OwnedFd, buf: &mut [u8]) -> io::Result<Option<(Msg, Vec<OwnedFd>)>> {
    loop {
        match fdpass::recv_with_fds(sock, buf) {
            Ok((0, _)) => return Ok(None),
            Ok((n, fds)) => {
                return serde_json::from_slice(&buf[..n])
                    .map(|m| Some((m, fds)))
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn send(sock: &OwnedFd, m: &Msg, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let bytes = encode(m);
    loop {
        match fdpass::send_with_fds(sock, &bytes, fds) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Sends a record and its placeholders (in chunks of [`MAX_FDS`]).
fn send_put(sock: &OwnedFd, record: Kept, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let token = record.token;
    let mut chunks = fds.chunks(MAX_FDS);
    send(sock, &Msg::Put { record }, chunks.next().unwrap_or(&[]))?;
    for chunk in chunks {
        send(sock, &Msg::Fds { token }, chunk)?;
    }
    Ok(())
}

/// The rendezvous socket of the keeper of the daemon listening on `socket`.
pub(crate) fn keeper_path(socket: &Path) -> PathBuf {
    let mut p = socket.as_os_str().to_owned();
    p.push(".keeper");
    p.into()
}

/// What a predecessor's keeper handed over at start.
#[derive(Default)]
pub(crate) struct Replay {
    pub records: Vec<(Kept, Vec<OwnedFd>, Vec<HandedRec>)>,
    /// Owners: session → (pid, start time, pidfd).
    pub owners: HashMap<u64, (u32, u64, OwnedFd)>,
}

/// The daemon's side of the link to its keeper.
pub(crate) struct Link {
    sock: OwnedFd,
    pid: Option<u32>,
    path: PathBuf,
    /// Why the link failed, once it has (live restore is then off until a restart).
    failed: Option<String>,
    /// Sessions whose owner (pid and pidfd) the keeper has.
    owners: HashMap<u64, OwnedFd>,
    /// Drops sent since the last barrier, of blocks with placeholders.
    unsynced: bool,
}

/// How long the daemon waits for its keeper before declaring it failed.
const KEEPER_TIMEOUT: Duration = Duration::from_secs(2);

impl Link {
    /// Connects to the keeper of `socket`, or starts one if `spawn`. Returns the link and, when
    /// a keeper was already there (a predecessor's), what it holds; `None` when there was no
    /// keeper and none was to be started.
    #[allow(clippy::type_complexity)]
    pub(crate) fn start(
        socket: &Path,
        state_dir: &Path,
        grace_secs: u64,
        spawn: bool,
    ) -> io::Result<Option<(Link, Option<Replay>)>> {
        let path = keeper_path(socket);
        match fdpass::seqpacket_connect(&path) {
            Ok(sock) => {
                let peer = portres_sys::creds::peer_cred(&sock)?;
                let me = portres_sys::creds::effective_uid();
                if peer.uid != me {
                    return Err(io::Error::other(format!(
                        "the keeper at {} runs as uid {}, not as the daemon's uid {me}; \
                         refusing it (remove the file if it is stale)",
                        path.display(),
                        peer.uid
                    )));
                }
                fdpass::set_send_timeout(&sock, KEEPER_TIMEOUT)?;
                let mut link = Link {
                    sock,
                    pid: Some(peer.pid),
                    path,
                    failed: None,
                    owners: HashMap::new(),
                    unsynced: false,
                };
                let replay = link.dump()?;
                Ok(Some((link, Some(replay))))
            }
            Err(e)
                if !spawn
                    && matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) =>
            {
                let _ = std::fs::remove_file(&path);
                Ok(None)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) =>
            {
                let _ = std::fs::remove_file(&path);
                let listener = fdpass::seqpacket_listen(&path)?;
                let mut cmd = std::process::Command::new(std::env::current_exe()?);
                cmd.arg("keeper")
                    .arg("--grace-secs")
                    .arg(grace_secs.to_string())
                    .arg("--state-dir")
                    .arg(state_dir)
                    .stdin(std::process::Stdio::from(listener))
                    .stdout(std::process::Stdio::null());
                portres_sys::process::new_session(&mut cmd);
                let child = cmd.spawn()?;
                let pid = child.id();
                // Not waited for: it outlives us. Its exit status is collected by init.
                std::mem::forget(child);
                let sock = fdpass::seqpacket_connect(&path)?;
                fdpass::set_send_timeout(&sock, KEEPER_TIMEOUT)?;
                Ok(Some((
                    Link {
                        sock,
                        pid: Some(pid),
                        path,
                        failed: None,
                        owners: HashMap::new(),
                        unsynced: false,
                    },
                    None,
                )))
            }
            Err(e) => Err(e),
        }
    }

    fn dump(&mut self) -> io::Result<Replay> {
        send(&self.sock, &Msg::Dump, &[])?;
        let mut replay = Replay::default();
        let mut index: HashMap<u64, usize> = HashMap::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if !fdpass::wait_readable(&self.sock, Some(Duration::from_secs(10)))? {
                return Err(io::Error::other("the keeper did not answer within 10 s"));
            }
            let Some((m, fds)) = recv(&self.sock, &mut buf)? else {
                return Err(io::Error::other(
                    "the keeper closed the link during the dump",
                ));
            };
            match m {
                Msg::Put { record } => {
                    index.insert(record.token, replay.records.len());
                    replay.records.push((record, fds, Vec::new()));
                }
                Msg::Fds { token } => {
                    if let Some(&i) = index.get(&token) {
                        replay.records[i].1.extend(fds);
                    }
                }
                Msg::Handed { token, handed } => {
                    if let Some(&i) = index.get(&token) {
                        replay.records[i].2.push(handed);
                    }
                }
                Msg::Owner {
                    session,
                    pid,
                    start_time,
                } => {
                    if let Some(fd) = fds.into_iter().next() {
                        replay.owners.insert(session, (pid, start_time, fd));
                    }
                }
                Msg::End { pid } => {
                    if pid.is_some() {
                        self.pid = pid;
                    }
                    return Ok(replay);
                }
                _ => {}
            }
        }
    }

    /// The keeper's pid (known when this daemon started it or could read its credentials).
    pub(crate) fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// Why live restore is off, if the link failed.
    pub(crate) fn problem(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    fn send(&mut self, m: &Msg, fds: &[BorrowedFd<'_>]) {
        if self.failed.is_some() {
            return;
        }
        if let Err(e) = send(&self.sock, m, fds) {
            self.fail(format!("sending to the keeper failed: {e}"));
        }
    }

    fn fail(&mut self, why: String) {
        tracing::error!(
            "live restore is off until the daemon restarts: {why}; runtime reservations will \
             not survive a restart"
        );
        self.failed = Some(why);
    }

    /// A new or changed reservation (with its placeholders, if the daemon holds them).
    pub(crate) fn put(&mut self, r: &Reservation, fds: Option<&[OwnedFd]>, in_helpers: bool) {
        if self.failed.is_some() {
            return;
        }
        let borrowed: Vec<BorrowedFd<'_>> =
            fds.unwrap_or_default().iter().map(|f| f.as_fd()).collect();
        if let Err(e) = send_put(&self.sock, Kept::of(r, in_helpers), &borrowed) {
            self.fail(format!("sending to the keeper failed: {e}"));
        }
    }

    /// Makes sure the keeper has the owner of session `session` (the peer `pid`).
    pub(crate) fn owner(&mut self, session: u64, pid: u32) {
        if self.failed.is_some() || self.owners.contains_key(&session) {
            return;
        }
        let Ok(pidfd) = portres_sys::process::pidfd_open(pid) else {
            return;
        };
        let start_time = portres_sys::process::start_time(pid).unwrap_or(0);
        self.send(
            &Msg::Owner {
                session,
                pid,
                start_time,
            },
            &[pidfd.as_fd()],
        );
        self.owners.insert(session, pidfd);
    }

    /// Adopts an owner restored from the keeper (it has the pidfd already).
    pub(crate) fn adopt_owner(&mut self, session: u64, pidfd: OwnedFd) {
        self.owners.insert(session, pidfd);
    }

    /// The pidfd of session `session`'s owner, if the keeper has it.
    pub(crate) fn owner_pidfd(&self, session: u64) -> Option<BorrowedFd<'_>> {
        self.owners.get(&session).map(|f| f.as_fd())
    }

    /// Sessions whose owner the keeper has.
    pub(crate) fn owner_sessions(&self) -> Vec<u64> {
        self.owners.keys().copied().collect()
    }

    pub(crate) fn owner_gone(&mut self, session: u64) {
        if self.owners.remove(&session).is_some() {
            self.send(&Msg::OwnerGone { session }, &[]);
        }
    }

    pub(crate) fn handed(&mut self, token: u64, handed: HandedRec) {
        self.send(&Msg::Handed { token, handed }, &[]);
    }

    pub(crate) fn returned(&mut self, token: u64, port: u16) {
        self.send(&Msg::Returned { token, port }, &[]);
    }

    pub(crate) fn moved(&mut self, token: u64, session: u64) {
        self.send(&Msg::Moved { token, session }, &[]);
    }

    /// A reservation ended. `held`: it had placeholders, so its ports are free only once the
    /// keeper has closed its copies too ([`Link::sync`] waits for that).
    pub(crate) fn drop_token(&mut self, token: u64, held: bool) {
        self.send(&Msg::Drop { token }, &[]);
        self.unsynced |= held;
    }

    /// Waits until the keeper has done everything sent so far, if a dropped block had
    /// placeholders (one round trip; nothing when there is nothing to wait for).
    pub(crate) fn sync(&mut self) {
        if !std::mem::take(&mut self.unsynced) || self.failed.is_some() {
            return;
        }
        self.send(&Msg::Barrier, &[]);
        if self.failed.is_some() {
            return;
        }
        let mut buf = [0u8; 64];
        match fdpass::wait_readable(&self.sock, Some(KEEPER_TIMEOUT)) {
            Ok(true) => match recv(&self.sock, &mut buf) {
                Ok(Some((Msg::Ack, _))) => {}
                Ok(other) => self.fail(format!(
                    "the keeper answered a barrier with {:?}",
                    other.map(|(m, _)| m)
                )),
                Err(e) => self.fail(format!("reading the keeper's answer failed: {e}")),
            },
            Ok(false) => self.fail(format!(
                "the keeper did not answer within {} s",
                KEEPER_TIMEOUT.as_secs()
            )),
            Err(e) => self.fail(format!("waiting for the keeper failed: {e}")),
        }
    }

    /// A stop meant as a stop: the keeper closes everything and exits.
    pub(crate) fn release(self) {
        let _ = send(&self.sock, &Msg::Release, &[]);
        // Its end closes when it exits: wait for that (bounded), so that when we return, its
        // copies of the placeholders are closed.
        let _ = fdpass::wait_readable(&self.sock, Some(KEEPER_TIMEOUT));
        let _ = std::fs::remove_file(&self.path);
    }
}

// ---------------------------------------------------------------------------------------------
// The keeper process.

#[derive(Default)]
struct Held {
    record: Option<Kept>,
    fds: Vec<OwnedFd>,
    handed: BTreeMap<u16, HandedRec>,
}

#[derive(Default)]
struct Keeper {
    held: HashMap<u64, Held>,
    owners: HashMap<u64, (u32, u64, OwnedFd)>,
}

impl Keeper {
    fn apply(&mut self, m: Msg, fds: Vec<OwnedFd>) {
        match m {
            Msg::Put { record } => {
                let h = self.held.entry(record.token).or_default();
                h.record = Some(record);
                h.fds = fds;
            }
            Msg::Fds { token } => self.held.entry(token).or_default().fds.extend(fds),
            Msg::Handed { token, handed } => {
                if let Some(h) = self.held.get_mut(&token) {
                    h.handed.insert(handed.port, handed);
                }
            }
            Msg::Returned { token, port } => {
                if let Some(h) = self.held.get_mut(&token) {
                    h.handed.remove(&port);
                }
            }
            Msg::Moved { token, session } => {
                if let Some(r) = self.held.get_mut(&token).and_then(|h| h.record.as_mut()) {
                    r.session = session;
                }
            }
            Msg::Drop { token } => drop(self.held.remove(&token)),
            Msg::Owner {
                session,
                pid,
                start_time,
            } => {
                if let Some(fd) = fds.into_iter().next() {
                    self.owners.insert(session, (pid, start_time, fd));
                }
            }
            Msg::OwnerGone { session } => drop(self.owners.remove(&session)),
            _ => {}
        }
    }

    fn dump(&self, sock: &OwnedFd) -> io::Result<()> {
        for h in self.held.values() {
            let Some(record) = &h.record else { continue };
            let fds: Vec<BorrowedFd<'_>> = h.fds.iter().map(|f| f.as_fd()).collect();
            send_put(sock, record.clone(), &fds)?;
            for handed in h.handed.values() {
                send(
                    sock,
                    &Msg::Handed {
                        token: record.token,
                        handed: handed.clone(),
                    },
                    &[],
                )?;
            }
        }
        for (&session, (pid, start_time, fd)) in &self.owners {
            send(
                sock,
                &Msg::Owner {
                    session,
                    pid: *pid,
                    start_time: *start_time,
                },
                &[fd.as_fd()],
            )?;
        }
        send(
            sock,
            &Msg::End {
                pid: Some(std::process::id()),
            },
            &[],
        )
    }

    /// Serves one daemon until it goes (`Ok(false)`) or asks for release (`Ok(true)`).
    fn serve(&mut self, sock: &OwnedFd) -> io::Result<bool> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let Some((m, fds)) = recv(sock, &mut buf)? else {
                return Ok(false);
            };
            match m {
                Msg::Dump => self.dump(sock)?,
                Msg::Barrier => send(sock, &Msg::Ack, &[])?,
                Msg::Release => return Ok(true),
                other => self.apply(other, fds),
            }
        }
    }
}

/// `portres keeper`: serves the daemon(s) of one socket on the listening socket passed as
/// standard input, holding what they send; see the module documentation.
pub fn serve_stdin(grace: Duration, state_dir: &Path) -> io::Result<()> {
    portres_sys::hold::raise_nofile_limit();
    let listener = io::stdin().as_fd().try_clone_to_owned()?;
    // Standard input itself is the listener: point it at /dev/null so the only copy is ours.
    let _ = portres_sys::process::stdin_to_dev_null();
    let me = portres_sys::creds::effective_uid();
    let mut keeper = Keeper::default();
    let path = portres_sys::fdpass::bound_path(&listener).ok();
    let mut first = true;
    loop {
        // The daemon that started us connects at once; a successor has `grace` to come.
        let wait = if first {
            Some(Duration::from_secs(30).max(grace))
        } else {
            Some(grace)
        };
        if !fdpass::wait_readable(&listener, wait)? {
            break;
        }
        let sock = match fdpass::accept(&listener) {
            Ok(s) => s,
            Err(_) => continue,
        };
        match portres_sys::creds::peer_cred(&sock) {
            Ok(c) if c.uid == me => {}
            _ => continue,
        }
        first = false;
        match keeper.serve(&sock) {
            Ok(true) => {
                // Released on purpose by a stopping daemon, which restores the sysctl itself.
                return Ok(());
            }
            Ok(false) => {
                let runtime = keeper
                    .held
                    .values()
                    .filter(|h| h.record.as_ref().is_some_and(|r| !r.persistent))
                    .count();
                eprintln!(
                    "portres keeper (pid {}): the daemon went away; keeping {runtime} runtime \
                     reservations for a successor for up to {} s",
                    std::process::id(),
                    grace.as_secs()
                );
            }
            Err(e) => eprintln!(
                "portres keeper (pid {}): the link to the daemon failed: {e}; waiting for a \
                 successor",
                std::process::id()
            ),
        }
    }
    // Nobody came back in time: release everything, as a stop would.
    if let Some(p) = &path {
        let _ = std::fs::remove_file(p);
    }
    let n = keeper.held.len();
    drop(keeper);
    let restored = crate::enforce::restore_sysctl_from_journal(state_dir);
    eprintln!(
        "portres keeper (pid {}): no daemon came back within {} s; released {n} reservations{}",
        std::process::id(),
        grace.as_secs(),
        if restored {
            " and restored ip_local_reserved_ports"
        } else {
            ""
        }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let m = Msg::Put {
            record: Kept {
                token: 7,
                protocol: "tcp".into(),
                start: 5000,
                count: 2,
                mode: "hold".into(),
                persistent: false,
                session: 3,
                pid: Some(42),
                uid: 1000,
                command: Some("x".into()),
                created: 1,
                in_helpers: false,
            },
        };
        let back: Msg = serde_json::from_slice(&encode(&m)).unwrap();
        assert_eq!(back, m);
        // Unknown fields from a newer daemon are ignored.
        let newer: Msg = serde_json::from_str(r#"{"m":"drop","token":9,"why":"x"}"#).unwrap();
        assert_eq!(newer, Msg::Drop { token: 9 });
    }

    #[test]
    fn a_keeper_keeps_what_it_is_sent_and_hands_it_back() {
        let (a, b) = fdpass::seqpacket_pair().unwrap();
        let t = std::thread::spawn(move || {
            let mut k = Keeper::default();
            k.serve(&b).unwrap()
        });
        let (x, _y) = fdpass::seqpacket_pair().unwrap();
        let r = Kept {
            token: 1,
            protocol: "udp".into(),
            start: 7000,
            count: 1,
            mode: "hold".into(),
            persistent: false,
            session: 5,
            pid: Some(1),
            uid: 0,
            command: None,
            created: 0,
            in_helpers: false,
        };
        send_put(&a, r.clone(), &[x.as_fd()]).unwrap();
        send(
            &a,
            &Msg::Put {
                record: Kept {
                    token: 2,
                    ..r.clone()
                },
            },
            &[],
        )
        .unwrap();
        send(&a, &Msg::Drop { token: 2 }, &[]).unwrap();
        let mut link = Link {
            sock: a,
            pid: None,
            path: PathBuf::from("/nonexistent"),
            failed: None,
            owners: HashMap::new(),
            unsynced: true,
        };
        link.sync();
        assert!(link.failed.is_none());
        let replay = link.dump().unwrap();
        assert_eq!(replay.records.len(), 1);
        assert_eq!(replay.records[0].0, r);
        assert_eq!(replay.records[0].1.len(), 1);
        send(&link.sock, &Msg::Release, &[]).unwrap();
        assert!(t.join().unwrap());
    }
}
