//! Live restore: the keeper, a small process that holds a copy of everything the daemon must not
//! lose when it stops or dies, so that a successor carries on with no port ever unprotected.
//!
//! # Why a keeper process
//! A placeholder socket keeps its port only while some process has it open, and the daemon's
//! copies close when it exits, however it exits. systemd's descriptor store (`FDSTORE=1`) would
//! keep them, but only under systemd; a handover at exit alone would lose them all on `kill -9`.
//! So the daemon starts one keeper per socket (`portres keeper`, in a session of its own) and
//! sends it every reservation's record at once, a pidfd of each owner, a duplicate of a held
//! block's placeholders once the block has lived `COPY_AFTER` (and of all of them when it
//! stops for a restart), and a copy of its end of each helper process's link. A daemon that
//! stops on SIGTERM, or dies, leaves the keeper holding them; the next daemon connects to it
//! (`SOCKET.keeper`, beside the daemon's socket, on the runtime filesystem), receives the records
//! and descriptors, and carries on from them. State lives only in the keeper's memory: after a
//! reboot there is nothing to restore. Kernel cost: a second descriptor for each placeholder
//! (the socket itself is shared, not copied), one pidfd per session that holds runtime
//! reservations, one descriptor per helper.
//!
//! # Messages
//! A Unix stream of frames (a 4-byte length, a 2-byte count of descriptors, one JSON `Msg`),
//! descriptors as `SCM_RIGHTS` on a frame's first byte. Writing to it wakes nobody: the keeper
//! reads it every 100 ms while changes come, and when woken through a separate `SOCK_SEQPACKET`
//! kick pair (a barrier, a dump, a full buffer) or when the daemon hangs up. The daemon sends
//! `put` (a record, maybe with placeholders), `fds` (placeholders of a block already put),
//! `handed`/`returned` for sockets handed out from a block, `moved` when a client re-attaches
//! reservations to a new session, `owner` (+ the pidfd) and `owner_gone`, `helper` (+ the link),
//! `drop`, and `barrier` (answered on the kick pair once everything before it is done: a
//! released port is free only once the keeper's copies are closed too). `dump` asks for
//! everything: the keeper answers with `batch` frames of the same messages, then `end`.
//! `release` closes everything and ends the keeper (a stop meant as a stop). The keeper serves
//! one daemon at a time, of its own uid only; when that daemon goes, it waits
//! [`Config::live_restore_secs`] for a successor, and then releases everything as a stop would
//! (restoring `ip_local_reserved_ports` from the daemon's journal) and exits. Fields are only
//! ever added, so a keeper started by an older binary serves a newer daemon.
//!
//! [`Config::live_restore_secs`]: crate::Config

/// A line on standard error: with its journal priority first (`<3>` error, `<4>` warning,
/// `<6>` info: `sd-daemon(3)`) when standard error is the journal, as the daemon's own lines.
macro_rules! say {
    ($priority:expr, $($arg:tt)*) => {{
        if portres_sys::activation::stderr_is_journal() {
            eprintln!("<{}>{}", $priority, format_args!($($arg)*));
        } else {
            eprintln!($($arg)*);
        }
    }};
}

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
    /// The helper processes holding its placeholders instead of the daemon (the keeper has a
    /// copy of the daemon's end of their links).
    #[serde(default)]
    pub helpers: Vec<usize>,
}

impl Kept {
    pub(crate) fn of(r: &Reservation, helpers: Vec<usize>) -> Kept {
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
            helpers,
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
#[serde(rename_all = "snake_case")]
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
        tokens: Vec<u64>,
        session: u64,
    },
    Drop {
        token: u64,
    },
    /// A placeholder-holding helper process: the daemon's end of its link comes with it.
    Helper {
        index: usize,
        pid: u32,
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
    /// Several messages in one frame (a dump), each with how many of the frame's descriptors
    /// are its own, in order.
    Batch {
        parts: Vec<(Msg, u16)>,
    },
    Dump,
    /// The first message of a link: the keeper's end of the kick pair comes with it.
    Kick,
    /// The end of a dump, with the keeper's pid.
    End {
        #[serde(default)]
        pid: Option<u32>,
    },
    Release,
}

/// A frame: the JSON's length (u32, little-endian), the number of descriptors that came with
/// it (u16; they travel as `SCM_RIGHTS` on its first byte), the JSON.
fn frame(m: &Msg, nfds: usize) -> Vec<u8> {
    let json = serde_json::to_vec(m).expect("keeper messages serialise");
    let mut f = Vec::with_capacity(6 + json.len());
    f.extend_from_slice(&(json.len() as u32).to_le_bytes());
    f.extend_from_slice(&(nfds as u16).to_le_bytes());
    f.extend_from_slice(&json);
    f
}

/// Writes one frame on a non-blocking stream, its descriptors with the first byte. When the
/// stream is full (the keeper has not read for a while), `kick` wakes the keeper to read, and
/// the write waits for room, up to [`KEEPER_TIMEOUT`].
fn send(sock: &OwnedFd, m: &Msg, fds: &[BorrowedFd<'_>], kick: Option<&OwnedFd>) -> io::Result<()> {
    let bytes = frame(m, fds.len());
    let mut done = 0;
    let mut fds = fds;
    while done < bytes.len() {
        match fdpass::send_with_fds(sock, &bytes[done..], fds) {
            Ok(n) => {
                done += n;
                fds = &[];
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if let Some(k) = kick {
                    // Full: the keeper has kicks to read already.
                    let _ = fdpass::send_with_fds(k, KICK, &[]);
                }
                if !fdpass::wait_writable(sock, KEEPER_TIMEOUT)? {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no room to write for {} s", KEEPER_TIMEOUT.as_secs()),
                    ));
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Frames read from a non-blocking stream, with the descriptors that came with them.
#[derive(Default)]
struct Reader {
    buf: Vec<u8>,
    fds: std::collections::VecDeque<OwnedFd>,
}

impl Reader {
    /// Reads everything there is now; `Ok(false)` once the peer has closed.
    fn fill(&mut self, sock: &OwnedFd) -> io::Result<bool> {
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match fdpass::recv_with_fds(sock, &mut chunk) {
                Ok((0, _)) => return Ok(false),
                Ok((n, fds)) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    self.fds.extend(fds);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
                Err(e) => return Err(e),
            }
        }
    }

    /// The next whole frame, if one has arrived. Descriptors arrive no later than the first
    /// byte of their frame, and frames are taken in order, so each takes the next ones.
    fn next(&mut self) -> io::Result<Option<(Msg, Vec<OwnedFd>)>> {
        if self.buf.len() < 6 {
            return Ok(None);
        }
        let len = u32::from_le_bytes(self.buf[..4].try_into().expect("4 bytes")) as usize;
        let nfds = usize::from(u16::from_le_bytes(
            self.buf[4..6].try_into().expect("2 bytes"),
        ));
        if self.buf.len() < 6 + len {
            return Ok(None);
        }
        let m: Msg = serde_json::from_slice(&self.buf[6..6 + len])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        self.buf.drain(..6 + len);
        if self.fds.len() < nfds {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a frame announced descriptors that did not come",
            ));
        }
        Ok(Some((m, self.fds.drain(..nfds).collect())))
    }
}

/// The kick byte (daemon to keeper): read the stream now (what to do is in the stream).
const KICK: &[u8] = b"k";
/// Answer (keeper to daemon): everything up to the barrier is done.
const ACK: u8 = b'a';

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
    /// Helper processes: index, pid, the daemon's end of the link.
    pub helpers: Vec<(usize, u32, OwnedFd)>,
}

/// The daemon's side of the link to its keeper.
pub(crate) struct Link {
    /// The message stream (non-blocking). The keeper reads it when woken by `kick`, or every
    /// [`DRAIN_EVERY`]: writing to it wakes nobody, so keeping the keeper up to date costs the
    /// daemon one `sendmsg` per change and no context switch.
    data: OwnedFd,
    /// A `SOCK_SEQPACKET` pair shared with the keeper: a byte wakes it; it answers barriers.
    kick: OwnedFd,
    pid: Option<u32>,
    path: PathBuf,
    /// Why the link failed, once it has (live restore is then off until a restart).
    failed: Option<String>,
    /// The keeper's pidfd (to end it if the link fails).
    pidfd: Option<OwnedFd>,
    /// Sessions whose owner (pid and pidfd) the keeper has.
    owners: HashMap<u64, OwnedFd>,
    /// Drops sent since the last barrier, of blocks with placeholders.
    unsynced: bool,
    /// Held blocks whose placeholders the keeper has not been given yet, oldest first.
    pending: std::collections::VecDeque<(std::time::Instant, u64)>,
    /// Held blocks whose placeholders the keeper has a copy of.
    copied: std::collections::HashSet<u64>,
}

/// A held block's placeholders go to the keeper once it has lived this long (and all of them
/// when the daemon stops for a restart). A block released sooner never costs the keeper
/// anything, nor its release a round trip to it; a `kill -9` within this time of a grant loses
/// that block's placeholders (the next daemon binds them again, or names the block lost).
pub(crate) const COPY_AFTER: Duration = Duration::from_millis(100);

/// How long the daemon waits for its keeper before declaring it failed.
const KEEPER_TIMEOUT: Duration = Duration::from_secs(2);

/// How often the keeper reads its stream when nobody wakes it, while changes keep coming: it
/// files them away in batches, so that little is left to read when the daemon goes (a restart
/// waits for it). Unread messages cost nothing but buffer space (charged to the daemon's send
/// buffer; when it is full the daemon wakes the keeper).
const DRAIN_EVERY: Duration = Duration::from_millis(100);

/// How long the keeper sleeps when the last read found nothing (a safety net only).
const IDLE_DRAIN_EVERY: Duration = Duration::from_secs(10);

/// Room for messages between the keeper's reads (the kernel caps it at `net.core.wmem_max`;
/// when it is full, the daemon wakes the keeper).
const STREAM_BUFFER: usize = 4 << 20;

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
        activated: bool,
    ) -> io::Result<Option<(Link, Option<Replay>)>> {
        let path = keeper_path(socket);
        match fdpass::stream_connect(&path) {
            Ok(data) => {
                let peer = portres_sys::creds::peer_cred(&data)?;
                let me = portres_sys::creds::effective_uid();
                if peer.uid != me {
                    return Err(io::Error::other(format!(
                        "the keeper at {} runs as uid {}, not as the daemon's uid {me}; \
                         refusing it (remove the file if it is stale)",
                        path.display(),
                        peer.uid
                    )));
                }
                let mut link = Link::over(data, path, None)?;
                let replay = link.dump()?;
                Ok(Some((link, Some(replay))))
            }
            // No keeper (a stale file is removed).
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) =>
            {
                let _ = std::fs::remove_file(&path);
                if !spawn {
                    return Ok(None);
                }
                let listener = fdpass::stream_listen(&path)?;
                let mut cmd = std::process::Command::new(std::env::current_exe()?);
                cmd.arg("keeper")
                    .arg("--grace-secs")
                    .arg(grace_secs.to_string())
                    .arg("--state-dir")
                    .arg(state_dir)
                    .args(activated.then_some("--activated"))
                    .stdin(std::process::Stdio::from(listener))
                    .stdout(std::process::Stdio::null());
                portres_sys::process::new_session(&mut cmd);
                // Not waited for: it is meant to outlive us (the handle is dropped, which
                // neither waits nor kills).
                let pid = cmd.spawn()?.id();
                let data = fdpass::stream_connect(&path)?;
                Ok(Some((Link::over(data, path, Some(pid))?, None)))
            }
            Err(e) => Err(e),
        }
    }

    /// Sets up a link over a connected stream: non-blocking, a large send buffer, and the kick
    /// pair (the keeper's end goes in the first message).
    fn over(data: OwnedFd, path: PathBuf, pid: Option<u32>) -> io::Result<Link> {
        fdpass::set_nonblocking(&data)?;
        let _ = fdpass::set_send_buffer(&data, STREAM_BUFFER);
        let (kick, theirs) = fdpass::seqpacket_pair()?;
        // A kick that finds the pair full is not needed: the keeper has kicks to read.
        fdpass::set_nonblocking(&kick)?;
        send(&data, &Msg::Kick, &[theirs.as_fd()], None)?;
        Ok(Link {
            data,
            kick,
            pid,
            pidfd: pid.and_then(|p| portres_sys::process::pidfd_open(p).ok()),
            path,
            failed: None,
            owners: HashMap::new(),
            unsynced: false,
            pending: std::collections::VecDeque::new(),
            copied: std::collections::HashSet::new(),
        })
    }

    fn wake(&self, what: &[u8]) -> io::Result<()> {
        match fdpass::send_with_fds(&self.kick, what, &[]) {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
            _ => Ok(()),
        }
    }

    fn dump(&mut self) -> io::Result<Replay> {
        send(&self.data, &Msg::Dump, &[], Some(&self.kick))?;
        self.wake(KICK)?;
        // The dump is the keeper's state as messages: applied to an empty keeper, it is that
        // state again.
        let mut copy = Keeper::default();
        let mut reader = Reader::default();
        loop {
            let open = reader.fill(&self.data)?;
            while let Some((m, fds)) = reader.next()? {
                match m {
                    Msg::End { pid } => {
                        if let Some(p) = pid {
                            self.pid = Some(p);
                            // It is connected to us and waiting: its pid is not reused yet.
                            self.pidfd = portres_sys::process::pidfd_open(p).ok();
                        }
                        return Ok(copy.into_replay());
                    }
                    other => copy.apply(other, fds),
                }
            }
            // Closed without `end`: the dump is incomplete (an error, never a spin).
            if !open {
                return Err(io::Error::other(
                    "the keeper closed the link during the dump",
                ));
            }
            if !fdpass::wait_readable(&self.data, Some(Duration::from_secs(10)))? {
                return Err(io::Error::other("the keeper did not answer within 10 s"));
            }
        }
    }

    /// The keeper's pid (known when this daemon started it, or from its dump).
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
        if let Err(e) = send(&self.data, m, fds, Some(&self.kick)) {
            self.fail(format!("sending to the keeper failed: {e}"));
        }
    }

    fn fail(&mut self, why: String) {
        tracing::error!(
            "live restore is off until the daemon restarts: {why}; runtime reservations will \
             not survive a restart"
        );
        self.failed = Some(why);
        // A keeper that no longer hears from us could still hold copies of placeholders of
        // blocks released from now on (the ports would stay bound), and hand stale blocks to a
        // successor: it is ended (SIGKILL through its pidfd, so never another process), and
        // waited for.
        if let Some(pidfd) = &self.pidfd
            && let Err(e) = portres_sys::process::pidfd_kill(pidfd)
        {
            tracing::error!(error = %e, "cannot end the keeper");
        }
        self.wait_gone();
    }

    /// Waits (bounded) until the keeper has exited, so that its copies of the placeholders are
    /// closed; removes its rendezvous socket.
    fn wait_gone(&self) {
        if let Some(pidfd) = &self.pidfd {
            let _ = fdpass::wait_readable(pidfd, Some(KEEPER_TIMEOUT));
        }
        let _ = std::fs::remove_file(&self.path);
    }

    /// A new or changed reservation, with its placeholders if the daemon holds them: now if
    /// `copy_now`, otherwise once the block has lived [`COPY_AFTER`] ([`Link::copy_due`]).
    pub(crate) fn put(
        &mut self,
        r: &Reservation,
        fds: Option<&[OwnedFd]>,
        helpers: Vec<usize>,
        copy_now: bool,
    ) {
        if self.failed.is_some() {
            return;
        }
        let token = r.token.get();
        let fds = fds.filter(|f| !f.is_empty());
        let borrowed: &[OwnedFd] = match fds {
            Some(f) if copy_now => f,
            _ => &[],
        };
        let mut batch = Batcher::default();
        let sent = batch
            .add_put(&self.data, Kept::of(r, helpers), borrowed, Some(&self.kick))
            .and_then(|()| batch.flush(&self.data, Some(&self.kick)));
        if let Err(e) = sent {
            return self.fail(format!("sending to the keeper failed: {e}"));
        }
        if fds.is_some() {
            if copy_now {
                self.copied.insert(token);
            } else {
                self.pending.push_back((std::time::Instant::now(), token));
            }
        }
    }

    /// A helper process the daemon started: the keeper keeps a copy of the daemon's end of its
    /// link, so it outlives the daemon (with its placeholders) until the keeper lets go.
    pub(crate) fn helper(&mut self, index: usize, pid: u32, link: &OwnedFd) {
        self.send(&Msg::Helper { index, pid }, &[link.as_fd()]);
    }

    /// Whether held blocks wait for their placeholders to go to the keeper.
    pub(crate) fn copies_pending(&self) -> bool {
        self.failed.is_none() && !self.pending.is_empty()
    }

    /// Gives the keeper the placeholders of the held blocks that have lived `older_than` (all
    /// of them if `None`); `placeholders` finds a block's (none: it ended meanwhile).
    pub(crate) fn copy_due<'a>(
        &mut self,
        older_than: Option<Duration>,
        placeholders: impl Fn(u64) -> Option<&'a [OwnedFd]>,
    ) {
        let now = std::time::Instant::now();
        // Many blocks' placeholders in one frame (up to MAX_FDS descriptors): few writes, and
        // few reads for the keeper.
        let mut batch = Batcher::default();
        while let Some(&(at, token)) = self.pending.front() {
            if older_than.is_some_and(|age| now.duration_since(at) < age) {
                break;
            }
            self.pending.pop_front();
            if self.failed.is_some() {
                continue;
            }
            let Some(fds) = placeholders(token) else {
                continue;
            };
            if let Err(e) = batch.add_fds(&self.data, token, fds, Some(&self.kick)) {
                return self.fail(format!("sending to the keeper failed: {e}"));
            }
            self.copied.insert(token);
        }
        if let Err(e) = batch.flush(&self.data, Some(&self.kick)) {
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

    pub(crate) fn moved(&mut self, tokens: Vec<u64>, session: u64) {
        self.send(&Msg::Moved { tokens, session }, &[]);
    }

    /// A reservation ended. If the keeper has copies of its placeholders, its ports are free
    /// only once the keeper has closed them too ([`Link::sync`] waits for that).
    pub(crate) fn drop_token(&mut self, token: u64) {
        self.send(&Msg::Drop { token }, &[]);
        self.unsynced |= self.copied.remove(&token);
    }

    /// The keeper has copies of `token`'s placeholders (carried over from a predecessor).
    pub(crate) fn mark_copied(&mut self, token: u64) {
        self.copied.insert(token);
    }

    /// The next [`Link::sync`] waits for the keeper (it may hold copies of what was dropped).
    pub(crate) fn expect_sync(&mut self) {
        self.unsynced = true;
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
        if let Err(e) = self.wake(KICK) {
            return self.fail(format!("waking the keeper failed: {e}"));
        }
        let mut ack = [0u8; 16];
        loop {
            match fdpass::wait_readable(&self.kick, Some(KEEPER_TIMEOUT)) {
                Ok(true) => match fdpass::recv_with_fds(&self.kick, &mut ack) {
                    Ok((n, _)) if n > 0 && ack[..n].contains(&ACK) => return,
                    Ok((0, _)) => return self.fail("the keeper exited".into()),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return self.fail(format!("reading the keeper's answer failed: {e}")),
                },
                Ok(false) => {
                    return self.fail(format!(
                        "the keeper did not answer within {} s",
                        KEEPER_TIMEOUT.as_secs()
                    ));
                }
                Err(e) => return self.fail(format!("waiting for the keeper failed: {e}")),
            }
        }
    }

    /// A stop meant as a stop: the keeper closes everything and exits.
    pub(crate) fn release(self) {
        let _ = send(&self.data, &Msg::Release, &[], Some(&self.kick));
        let _ = self.wake(KICK);
        self.wait_gone();
    }
}

// ---------------------------------------------------------------------------------------------
// The keeper process.

struct Held {
    record: Kept,
    fds: Vec<OwnedFd>,
    handed: BTreeMap<u16, HandedRec>,
}

#[derive(Default)]
struct Keeper {
    held: HashMap<u64, Held>,
    owners: HashMap<u64, (u32, u64, OwnedFd)>,
    helpers: BTreeMap<usize, (u32, OwnedFd)>,
}

impl Keeper {
    fn into_replay(self) -> Replay {
        Replay {
            records: self
                .held
                .into_values()
                .map(|h| (h.record, h.fds, h.handed.into_values().collect()))
                .collect(),
            owners: self.owners,
            helpers: self
                .helpers
                .into_iter()
                .map(|(i, (pid, fd))| (i, pid, fd))
                .collect(),
        }
    }

    fn apply(&mut self, m: Msg, fds: Vec<OwnedFd>) {
        match m {
            Msg::Batch { parts } => {
                let mut fds = fds.into_iter();
                for (part, n) in parts {
                    let own: Vec<OwnedFd> = fds.by_ref().take(usize::from(n)).collect();
                    self.apply(part, own);
                }
            }
            Msg::Put { record } => {
                let handed = self
                    .held
                    .remove(&record.token)
                    .map(|h| h.handed)
                    .unwrap_or_default();
                self.held.insert(
                    record.token,
                    Held {
                        record,
                        fds,
                        handed,
                    },
                );
            }
            // Always after the block's `put` (and never after its `drop`).
            Msg::Fds { token } => {
                if let Some(h) = self.held.get_mut(&token) {
                    h.fds.extend(fds);
                }
            }
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
            Msg::Moved { tokens, session } => {
                for token in tokens {
                    if let Some(h) = self.held.get_mut(&token) {
                        h.record.session = session;
                    }
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
            Msg::Helper { index, pid } => {
                if let Some(fd) = fds.into_iter().next() {
                    self.helpers.insert(index, (pid, fd));
                }
            }
            _ => {}
        }
    }

    /// Sends everything it holds, as batches of messages (a few large writes rather than one
    /// per record), then `end`.
    fn dump(&self, sock: &OwnedFd) -> io::Result<()> {
        let mut batch = Batcher::default();
        for h in self.held.values() {
            let record = &h.record;
            batch.add_put(sock, record.clone(), &h.fds, None)?;
            for handed in h.handed.values() {
                let m = Msg::Handed {
                    token: record.token,
                    handed: handed.clone(),
                };
                batch.add(sock, m, &[], None)?;
            }
        }
        for (&session, (pid, start_time, fd)) in &self.owners {
            let m = Msg::Owner {
                session,
                pid: *pid,
                start_time: *start_time,
            };
            batch.add(sock, m, std::slice::from_ref(fd), None)?;
        }
        for (&index, (pid, fd)) in &self.helpers {
            batch.add(
                sock,
                Msg::Helper { index, pid: *pid },
                std::slice::from_ref(fd),
                None,
            )?;
        }
        batch.flush(sock, None)?;
        let end = Msg::End {
            pid: Some(std::process::id()),
        };
        send(sock, &end, &[], None)
    }

    /// Serves one daemon until it goes (`Ok(false)`) or asks for release (`Ok(true)`). The
    /// stream is read when the daemon wakes us (a barrier, a dump, a full stream) and every
    /// [`DRAIN_EVERY`] otherwise; the daemon going away (the stream hung up) wakes us too.
    fn serve(&mut self, data: &OwnedFd) -> io::Result<bool> {
        fdpass::set_nonblocking(data)?;
        let mut reader = Reader::default();
        // The first message brings the kick pair's other end. A daemon may have written
        // everything and gone before we read a byte: what was read is handled all the same.
        let mut open = true;
        let kick = loop {
            if let Some((m, fds)) = reader.next()? {
                match (m, fds.into_iter().next()) {
                    (Msg::Kick, Some(k)) => {
                        fdpass::set_nonblocking(&k)?;
                        break k;
                    }
                    _ => {
                        return Err(io::Error::other(
                            "the link did not begin with its kick pair",
                        ));
                    }
                }
            }
            if !open || !fdpass::wait_readable(data, Some(KEEPER_TIMEOUT))? {
                return Ok(false);
            }
            open = reader.fill(data)?;
        };
        let mut busy = true;
        loop {
            while let Some((m, fds)) = reader.next()? {
                match m {
                    Msg::Dump => self.dump(data)?,
                    Msg::Barrier => loop {
                        match fdpass::send_with_fds(&kick, &[ACK], &[]) {
                            Ok(_) => break,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                fdpass::wait_writable(&kick, KEEPER_TIMEOUT)?;
                            }
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) => return Err(e),
                        }
                    },
                    Msg::Release => return Ok(true),
                    other => self.apply(other, fds),
                }
            }
            if !open {
                return Ok(false);
            }
            let pause = if busy { DRAIN_EVERY } else { IDLE_DRAIN_EVERY };
            let (woken, _) = fdpass::wait_wake_or_hangup(&kick, data, pause)?;
            if woken {
                // The kick bytes themselves say nothing the stream does not: read them all.
                let mut bytes = [0u8; 16];
                while let Ok((n, _)) = fdpass::recv_with_fds(&kick, &mut bytes) {
                    if n == 0 {
                        break;
                    }
                }
            }
            let before = reader.buf.len();
            open = reader.fill(data)?;
            busy = reader.buf.len() > before;
        }
    }
}

/// Messages gathered into [`Msg::Batch`] frames of at most [`MAX_FDS`] descriptors and about
/// 256 KiB.
#[derive(Default)]
struct Batcher<'a> {
    parts: Vec<(Msg, u16)>,
    fds: Vec<BorrowedFd<'a>>,
    bytes: usize,
}

impl<'a> Batcher<'a> {
    fn add(
        &mut self,
        sock: &OwnedFd,
        m: Msg,
        fds: &'a [OwnedFd],
        kick: Option<&OwnedFd>,
    ) -> io::Result<()> {
        if self.fds.len() + fds.len() > MAX_FDS || self.bytes > 256 * 1024 {
            self.flush(sock, kick)?;
        }
        self.bytes += 128;
        self.fds.extend(fds.iter().map(|f| f.as_fd()));
        self.parts.push((m, fds.len() as u16));
        Ok(())
    }

    /// A record with its placeholders: `put` with the first [`MAX_FDS`], `fds` with the rest.
    fn add_put(
        &mut self,
        sock: &OwnedFd,
        record: Kept,
        fds: &'a [OwnedFd],
        kick: Option<&OwnedFd>,
    ) -> io::Result<()> {
        let token = record.token;
        let first = fds.len().min(MAX_FDS);
        self.add(sock, Msg::Put { record }, &fds[..first], kick)?;
        self.add_fds(sock, token, &fds[first..], kick)
    }

    /// Placeholders of a block already put, in parts of at most [`MAX_FDS`].
    fn add_fds(
        &mut self,
        sock: &OwnedFd,
        token: u64,
        fds: &'a [OwnedFd],
        kick: Option<&OwnedFd>,
    ) -> io::Result<()> {
        for chunk in fds.chunks(MAX_FDS) {
            self.add(sock, Msg::Fds { token }, chunk, kick)?;
        }
        Ok(())
    }

    /// Sends what was gathered: one message as itself, several as a batch.
    fn flush(&mut self, sock: &OwnedFd, kick: Option<&OwnedFd>) -> io::Result<()> {
        let mut parts = std::mem::take(&mut self.parts);
        let fds = std::mem::take(&mut self.fds);
        self.bytes = 0;
        match parts.len() {
            0 => Ok(()),
            1 => send(sock, &parts.pop().expect("one").0, &fds, kick),
            _ => send(sock, &Msg::Batch { parts }, &fds, kick),
        }
    }
}

/// What became of the wait for a daemon.
enum Successor {
    /// One connected.
    Came,
    /// None within the time.
    None,
    /// One serves the daemon's socket without having come to us.
    Elsewhere,
}

/// Waits up to `wait` for a daemon to connect to `listener`, looking every second whether a
/// daemon answers on `daemon_socket` meanwhile (a successor that did not find us).
fn wait_for_successor(
    listener: &OwnedFd,
    wait: Option<Duration>,
    daemon_socket: Option<&Path>,
) -> io::Result<Successor> {
    let deadline = wait.map(|w| std::time::Instant::now() + w);
    loop {
        let left = deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()));
        if left.is_some_and(|l| l.is_zero()) {
            return Ok(Successor::None);
        }
        let step = left.map_or(Duration::from_secs(1), |l| l.min(Duration::from_secs(1)));
        if fdpass::wait_readable(listener, Some(step))? {
            return Ok(Successor::Came);
        }
        if daemon_socket.is_some_and(|p| std::os::unix::net::UnixStream::connect(p).is_ok()) {
            // Connected only to see: it hangs up at once (the daemon logs a closed session).
            return Ok(Successor::Elsewhere);
        }
    }
}

/// `portres keeper`: serves the daemon(s) of one socket on the listening socket passed as
/// standard input, holding what they send; see the module documentation.
/// `activated`: the daemon's socket is the service manager's (socket activation), which
/// accepts connections with or without a daemon: the keeper never connects to it to see
/// whether a daemon serves it (a connection would also start one).
pub fn serve_stdin(grace: Duration, state_dir: &Path, activated: bool) -> io::Result<()> {
    portres_sys::hold::raise_nofile_limit();
    let listener = io::stdin().as_fd().try_clone_to_owned()?;
    // Standard input itself is the listener: point it at /dev/null so the only copy is ours.
    let _ = portres_sys::process::stdin_to_dev_null();
    let me = portres_sys::creds::effective_uid();
    let mut keeper = Keeper::default();
    let path = portres_sys::fdpass::bound_path(&listener).ok();
    // The daemon's socket: the keeper's path without ".keeper".
    let daemon_socket = path.as_ref().and_then(|p| {
        let s = p.to_str()?.strip_suffix(".keeper")?;
        Some(PathBuf::from(s))
    });
    let mut first = true;
    loop {
        // The daemon that started us connects at once; a successor has `grace` to come.
        let wait = if first {
            Some(Duration::from_secs(30).max(grace))
        } else {
            Some(grace)
        };
        let probe = daemon_socket.as_deref().filter(|_| !activated);
        match wait_for_successor(&listener, wait, probe)? {
            Successor::Came => {}
            Successor::None => break,
            Successor::Elsewhere => {
                // A daemon serves the socket and did not come to us (it could not find us, e.g.
                // its runtime directory was emptied): it owns the sysctl now; let go quietly.
                say!(
                    6,
                    "portres keeper (pid {}): a daemon serves the socket without this keeper; \
                     releasing its copies and exiting",
                    std::process::id()
                );
                return Ok(());
            }
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
                    .filter(|h| !h.record.persistent)
                    .count();
                say!(
                    4,
                    "portres keeper (pid {}): the daemon went away; keeping {runtime} runtime \
                     reservations for a successor for up to {} s",
                    std::process::id(),
                    grace.as_secs()
                );
            }
            Err(e) => say!(
                3,
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
    let mut ours = portres_core::PortSet::new();
    for h in keeper.held.values() {
        if let Ok(range) =
            portres_core::PortRange::new(u32::from(h.record.start), u32::from(h.record.count))
        {
            ours.insert_range(range);
        }
    }
    drop(keeper);
    // Socket activation: the socket cannot tell whether a daemon runs. Under the socket's lock
    // (a starting daemon holds it until it accepts), a daemon that runs holds its store open,
    // and redb keeps an flock on it: then that daemon owns the sysctl and the pins (it started
    // without reaching this keeper), and nothing is taken from it.
    let _locked = match (&daemon_socket, activated) {
        (Some(socket), true) => match crate::deny::lock_socket(socket) {
            Ok(lock) => {
                if crate::store::in_use(state_dir) {
                    say!(
                        6,
                        "portres keeper (pid {}): a daemon runs with this state directory \
                         without this keeper; releasing its copies and leaving the sysctl and \
                         the deny layer to it",
                        std::process::id()
                    );
                    return Ok(());
                }
                Some(lock)
            }
            Err(e) => {
                say!(3, "portres keeper: cannot take the socket's lock: {e}");
                None
            }
        },
        _ => None,
    };
    let restored = crate::enforce::restore_sysctl_from_journal(state_dir, &ours);
    // The deny layer's pinned programs and map go too, as at a stop that releases everything.
    // Under the socket's lock: a daemon starting now takes the pins over instead.
    let cleaned = match &daemon_socket {
        Some(_) if activated => crate::deny::cleanup(state_dir).map(Some),
        Some(socket) => crate::deny::cleanup_unless_served(socket, state_dir),
        None => crate::deny::cleanup(state_dir).map(Some),
    };
    let denied = match cleaned {
        Ok(c) => c.is_some_and(|c| c.pin_dir.is_some()),
        Err(e) => {
            say!(
                3,
                "portres keeper: removing the deny layer's pins failed: {e}"
            );
            false
        }
    };
    say!(
        4,
        "portres keeper (pid {}): no daemon came back within {} s; released {n} reservations{}{}",
        std::process::id(),
        grace.as_secs(),
        if restored {
            " and restored ip_local_reserved_ports"
        } else {
            ""
        },
        if denied {
            "; removed the deny layer's programs and map"
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
                helpers: vec![],
            },
        };
        let back: Msg = serde_json::from_slice(&frame(&m, 0)[6..]).unwrap();
        assert_eq!(back, m);
        // Unknown fields from a newer daemon are ignored.
        let newer: Msg = serde_json::from_str(r#"{"drop":{"token":9,"why":"x"}}"#).unwrap();
        assert_eq!(newer, Msg::Drop { token: 9 });
    }

    #[test]
    fn a_keeper_keeps_what_it_is_sent_and_hands_it_back() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let (a, b) = (OwnedFd::from(a), OwnedFd::from(b));
        let t = std::thread::spawn(move || {
            let mut k = Keeper::default();
            k.serve(&b).unwrap()
        });
        let mut link = Link::over(a, PathBuf::from("/nonexistent"), None).unwrap();
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
            helpers: vec![],
        };
        // More messages than a socket queue holds unread by default: the stream buffers them
        // (or the link wakes the keeper when it is full).
        for token in 2..3000 {
            link.send(
                &Msg::Put {
                    record: Kept { token, ..r.clone() },
                },
                &[],
            );
            link.unsynced = true;
            link.drop_token(token);
        }
        let mut batch = Batcher::default();
        batch
            .add_put(
                &link.data,
                r.clone(),
                std::slice::from_ref(&x),
                Some(&link.kick),
            )
            .unwrap();
        batch.flush(&link.data, Some(&link.kick)).unwrap();
        link.sync();
        assert!(link.failed.is_none(), "{:?}", link.failed);
        let replay = link.dump().unwrap();
        assert_eq!(replay.records.len(), 1);
        assert_eq!(replay.records[0].0, r);
        assert_eq!(replay.records[0].1.len(), 1);
        link.release();
        assert!(t.join().unwrap());
    }

    #[test]
    fn frames_are_read_in_order_with_their_descriptors() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let (a, b) = (OwnedFd::from(a), OwnedFd::from(b));
        fdpass::set_nonblocking(&b).unwrap();
        let (x, y) = fdpass::seqpacket_pair().unwrap();
        send(&a, &Msg::Drop { token: 1 }, &[], None).unwrap();
        send(
            &a,
            &Msg::Owner {
                session: 2,
                pid: 3,
                start_time: 4,
            },
            &[x.as_fd(), y.as_fd()],
            None,
        )
        .unwrap();
        send(&a, &Msg::Barrier, &[], None).unwrap();
        let mut reader = Reader::default();
        assert!(reader.fill(&b).unwrap());
        let got: Vec<(Msg, usize)> = std::iter::from_fn(|| reader.next().unwrap())
            .map(|(m, f)| (m, f.len()))
            .collect();
        assert_eq!(
            got,
            vec![
                (Msg::Drop { token: 1 }, 0),
                (
                    Msg::Owner {
                        session: 2,
                        pid: 3,
                        start_time: 4
                    },
                    2
                ),
                (Msg::Barrier, 0)
            ]
        );
        drop(a);
        assert!(!reader.fill(&b).unwrap(), "end of stream");
    }
}
