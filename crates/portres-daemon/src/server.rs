//! The accept loop and one task per session: handshake, then request frames until the peer goes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use portres_core::{Caller, ErrorCode, Operation, Owner, Refusal};
use portres_proto::frame::body_len;
use portres_proto::{
    ErrorBody, FrameError, Hello, HelloReply, ReplyBody, ReplyFrame, RequestFrame, Welcome,
};
use std::os::fd::{AsFd, OwnedFd};

use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::UnixStream;

use crate::Shared;
use crate::handlers::{self, Answer};

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// A fresh session id.
pub(crate) fn new_session_id() -> u64 {
    NEXT_SESSION.fetch_add(1, Ordering::Relaxed)
}

/// Whether uid `uid` with groups `gids` administers this daemon: root, the daemon's own user,
/// `admin_users`, `admin_groups`.
pub(crate) fn is_admin(shared: &Shared, uid: u32, gids: &[u32]) -> bool {
    uid == 0
        || uid == shared.own_uid
        || shared.config.admin_uids.contains(&uid)
        || gids.iter().any(|g| shared.config.admin_gids.contains(g))
}

/// New sessions get ids from `next` on (above those carried over from a predecessor).
pub(crate) fn sessions_from(next: u64) {
    NEXT_SESSION.fetch_max(next, Ordering::Relaxed);
}

pub(crate) async fn serve(
    shared: Arc<Shared>,
    listener: tokio::net::UnixListener,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut paused = false;
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    if paused {
                        paused = false;
                        tracing::info!("accepting connections again");
                    }
                    let shared = shared.clone();
                    tokio::spawn(async move { session(shared, stream).await });
                }
                // EMFILE, ENFILE: out of descriptors. New clients wait in the listen queue (they
                // are delayed, not refused) until a session ends or a second passes; the
                // sessions we have are served meanwhile. No busy loop.
                Err(e) if matches!(e.raw_os_error(), Some(24 | 23)) => {
                    if !paused {
                        paused = true;
                        shared.accept_paused.fetch_add(1, Ordering::Relaxed);
                        let sessions = shared.spaces().session_count();
                        tracing::warn!(
                            error = %e,
                            sessions,
                            open_files_limit = portres_sys::hold::nofile_limit(),
                            "out of descriptors: not accepting new connections until a session \
                             ends (they wait in the listen queue); raise LimitNOFILE, or release \
                             hold blocks (each held port is a descriptor)"
                        );
                    }
                    tokio::select! {
                        _ = &mut shutdown => break,
                        _ = shared.session_ended.notified() => {}
                        _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                    }
                }
                Err(e) => {
                    // ENOBUFS, ENOMEM, ...: back off a little rather than spin and flood the log.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
        }
    }
    tracing::info!("shutting down");
}

/// Reads one frame body. Bytes are read as they come (a whole small frame in one `read`) into
/// `pending`, which keeps what belongs to the next frame.
async fn read_frame(s: &mut UnixStream, pending: &mut Vec<u8>) -> Result<Vec<u8>, FrameError> {
    loop {
        if pending.len() >= 4 {
            let len = body_len(pending[..4].try_into().expect("4 bytes"))?;
            if pending.len() >= 4 + len {
                let body = pending[4..4 + len].to_vec();
                pending.drain(..4 + len);
                return Ok(body);
            }
        }
        // Straight into `pending` (no buffer in the session's future: idle sessions stay small).
        pending.reserve(512);
        match s.read_buf(pending).await? {
            0 if pending.is_empty() => return Err(FrameError::Closed),
            0 => return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()),
            _ => {}
        }
    }
}

async fn write_msg(s: &mut UnixStream, msg: &impl serde::Serialize) -> std::io::Result<()> {
    let bytes = portres_proto::encode(msg).map_err(std::io::Error::other)?;
    s.write_all(&bytes).await
}

/// Writes bytes, giving up when the client reads none of them for `limit`: a client that
/// stops reading its replies is dropped, and only its own session waits meanwhile. A reply
/// that fits the socket buffer (nearly all) is written at once, with no timer armed.
async fn write_within(
    s: &mut UnixStream,
    bytes: &[u8],
    limit: std::time::Duration,
) -> Result<(), String> {
    let mut done = 0;
    while done < bytes.len() {
        match s.try_write(&bytes[done..]) {
            Ok(0) => return Err("the client closed the connection".into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                match tokio::time::timeout(limit, s.writable()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(e.to_string()),
                    Err(_) => {
                        return Err(format!(
                            "the client read none of its reply for {} ms (reply_timeout_ms); \
                             dropped",
                            limit.as_millis()
                        ));
                    }
                }
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(())
}

/// One reply frame; a reply larger than a frame becomes an error reply that says so (never a
/// dropped connection).
fn encode_reply(id: u64, body: ReplyBody) -> Vec<u8> {
    let reply = ReplyFrame { id, body };
    match portres_proto::encode(&reply) {
        Ok(bytes) => bytes,
        Err(FrameError::TooLarge { len }) => {
            let err = error_body(&Refusal::new(
                Operation::Other,
                ErrorCode::NoBufferSpace,
                format!(
                    "the answer is {len} bytes, more than one frame holds ({} bytes), and this \
                     client did not ask for a streamed reply (\"stream\": true, see \
                     docs/protocol.md); use a portres client of this daemon's version, or narrow \
                     the request (show's filters, who without all)",
                    portres_proto::MAX_FRAME
                ),
            ));
            portres_proto::encode(&ReplyFrame {
                id,
                body: ReplyBody::Error(err),
            })
            .expect("a short error fits a frame")
        }
        Err(e) => {
            let err = error_body(&Refusal::new(
                Operation::Other,
                ErrorCode::Internal,
                format!("the daemon could not encode its answer: {e}; see the daemon's log"),
            ));
            portres_proto::encode(&ReplyFrame {
                id,
                body: ReplyBody::Error(err),
            })
            .expect("a short error fits a frame")
        }
    }
}

/// Writes a streamed reply: the head, each chunk of rows as an `items` frame, then `end`.
async fn write_stream(
    s: &mut UnixStream,
    id: u64,
    head: portres_proto::Reply,
    mut rows: crate::stream::Rows,
    limit: std::time::Duration,
) -> Result<(), String> {
    // A head that cannot be encoded is answered with an error alone (no rows follow it).
    let head = ReplyFrame {
        id,
        body: ReplyBody::Ok(head),
    };
    match portres_proto::encode(&head) {
        Ok(bytes) => write_within(s, &bytes, limit).await?,
        Err(_) => return write_within(s, &encode_reply(id, head.body), limit).await,
    }
    let mut count = 0u64;
    while let Some(chunk) = rows.next().await {
        match chunk {
            Ok(chunk) => {
                let prefix = format!("{{\"id\":{id},\"items\":");
                let len = prefix.len() + chunk.array.len() + 1;
                let mut frame = Vec::with_capacity(4 + len);
                frame.extend_from_slice(&(len as u32).to_le_bytes());
                frame.extend_from_slice(prefix.as_bytes());
                frame.extend_from_slice(&chunk.array);
                frame.push(b'}');
                write_within(s, &frame, limit).await?;
                count += chunk.rows;
            }
            Err(e) => return write_within(s, &encode_reply(id, ReplyBody::Error(e)), limit).await,
        }
    }
    let end = ReplyBody::End(portres_proto::StreamEnd { count });
    write_within(s, &encode_reply(id, end), limit).await
}

/// Writes a frame with a descriptor attached to its first byte (`SCM_RIGHTS`).
async fn write_msg_with_fd(
    s: &mut UnixStream,
    msg: &impl serde::Serialize,
    fd: &OwnedFd,
) -> std::io::Result<()> {
    let bytes = portres_proto::encode(msg).map_err(std::io::Error::other)?;
    let sent = loop {
        s.writable().await?;
        match s.try_io(Interest::WRITABLE, || {
            portres_sys::fdpass::send_with_fds(&*s, &bytes, &[fd.as_fd()])
        }) {
            Ok(n) => break n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    };
    s.write_all(&bytes[sent..]).await
}

/// Released blocks leave `ip_local_reserved_ports` within this long, when no grant writes it first.
const EXCLUDE_FLUSH_DELAY: std::time::Duration = std::time::Duration::from_millis(10);

/// Schedules the enforcer's deferred work (one look at the state per request): right after the
/// current reply (and those of every other session ready at the same time), writing newly held
/// blocks to `ip_local_reserved_ports` and refilling the prepared placeholder sockets; a little
/// later, writing released blocks out of it.
pub(crate) fn schedule_background_work(shared: &Arc<Shared>) {
    let (soon, dirty, copies) = {
        let all = shared.spaces();
        let sessions = all.session_count();
        (
            all.all()
                .any(|st| st.enforcer.pool_wanted(sessions) || st.enforcer.exclude_unwritten()),
            all.all()
                .any(|st| st.enforcer.exclude_dirty() || st.enforcer.cgroups_pending()),
            all.home.keeper.as_ref().is_some_and(|k| k.copies_pending()),
        )
    };
    if copies && !shared.copy_scheduled.swap(true, Ordering::AcqRel) {
        let shared = shared.clone();
        tokio::spawn(async move {
            // Held blocks that live on get their placeholders copied to the keeper, a batch
            // every `COPY_AFTER` while there are any.
            let age = shared.checks.copy_after;
            loop {
                tokio::time::sleep(age).await;
                let mut st = shared.home();
                st.copy_to_keeper(Some(age));
                if !st.keeper.as_ref().is_some_and(|k| k.copies_pending()) {
                    shared.copy_scheduled.store(false, Ordering::Release);
                    return;
                }
            }
        });
    }
    if soon && !shared.soon_scheduled.swap(true, Ordering::AcqRel) {
        let shared = shared.clone();
        tokio::spawn(async move {
            shared.soon_scheduled.store(false, Ordering::Release);
            let mut all = shared.spaces();
            let sessions = all.session_count();
            all.each(|st| {
                st.enforcer.write_granted();
                st.enforcer.refill_pool(sessions);
            });
        });
    }
    if dirty && !shared.flush_scheduled.swap(true, Ordering::AcqRel) {
        let shared = shared.clone();
        tokio::spawn(async move {
            tokio::time::sleep(EXCLUDE_FLUSH_DELAY).await;
            shared.flush_scheduled.store(false, Ordering::Release);
            shared.spaces().each(|st| st.enforcer.flush_exclude());
        });
    }
}

pub(crate) fn error_body(r: &Refusal) -> ErrorBody {
    ErrorBody {
        code: r.code.as_str().into(),
        windows_code: r.windows_code,
        message: r.message.clone(),
        conflict: r.conflict.as_ref().map(handlers::conflict_info),
    }
}

fn malformed(why: impl std::fmt::Display) -> ErrorBody {
    error_body(&Refusal::new(
        Operation::Other,
        ErrorCode::MalformedRequest,
        format!("the daemon could not read the request: {why}; the connection is closed"),
    ))
}

async fn session(shared: Arc<Shared>, mut stream: UnixStream) {
    let cred = match portres_sys::creds::peer_cred(&stream) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read peer credentials; dropping connection");
            return;
        }
    };
    let mut gids = portres_sys::creds::peer_groups(&stream).unwrap_or_default();
    gids.push(cred.gid);
    let admin = is_admin(&shared, cred.uid, &gids);
    crate::metrics::session_accepted();
    let id = new_session_id();
    let caller = Caller {
        session: id,
        pid: cred.pid,
        uid: cred.uid,
        gids,
        admin,
    };
    let owner = Owner {
        pid: Some(cred.pid),
        uid: cred.uid,
        command: portres_sys::process::command_line(cred.pid),
    };
    tracing::debug!(
        session = id,
        pid = cred.pid,
        uid = cred.uid,
        admin,
        "session opened"
    );
    // Only needed to read the client's namespace safely (see `Spaces::open_session`).
    let pidfd = shared
        .config
        .per_client_namespaces
        .then(|| portres_sys::creds::peer_pidfd(&stream).ok())
        .flatten();
    let (opened, open) = {
        let mut all = shared.spaces();
        let opened = all.open_session(id, owner, cred.pid, admin, &shared.config, pidfd.as_ref());
        (opened, all.session_count())
    };
    shared.session_peak.fetch_max(open, Ordering::Relaxed);
    if let Err(why) = opened {
        tracing::warn!(pid = cred.pid, uid = cred.uid, "connection refused: {why}");
        let refusal = Refusal::new(Operation::Other, ErrorCode::AccessDenied, why);
        refuse_after_hello(&mut stream, error_body(&refusal)).await;
        return;
    }

    let why = match converse(&shared, &caller, &mut stream).await {
        Ok(()) => "closed by the client".to_string(),
        Err(why) => why,
    };
    // Drop the stream first: its descriptor is what a paused accept waits for.
    drop(stream);
    finish_session(&shared, id, Some((cred.pid, cred.uid)), &why);
}

/// Ends session `id` (its connection closed, or, for a session carried over from a
/// predecessor, its owner exited): its runtime reservations end, here and in the keeper.
pub(crate) fn finish_session(shared: &Arc<Shared>, id: u64, peer: Option<(u32, u32)>, why: &str) {
    let mut state = shared.space(id);
    let ended = state.table.end_session(id);
    let (pid, uid) = peer.unwrap_or_default();
    tracing::info!(
        session = id,
        pid,
        uid,
        reservations_ended = ended.len(),
        "session ended: {why}"
    );
    // When most sessions of a burst have gone, give their memory back to the system.
    let open = state.spaces().session_count();
    let peak = shared.session_peak.load(Ordering::Relaxed);
    if peak >= 64 && open * 4 < peak {
        shared.session_peak.store(open, Ordering::Relaxed);
        portres_sys::process::trim_heap();
    }
    for r in &ended {
        state.retire(r);
        tracing::info!(
            session = id, pid = r.owner.pid.unwrap_or(0), uid = r.owner.uid, token = %r.token,
            "runtime reservation {}/{} ended with its session", r.range, r.protocol
        );
    }
    if let Some(k) = &mut state.keeper {
        k.owner_gone(id);
    }
    state.sync_keeper();
    drop(state);
    #[cfg(feature = "cluster")]
    if let Some(c) = &shared.cluster {
        let all = shared.spaces();
        c.session_ended(id, |t| all.home.table.get(t).and_then(|r| r.session()));
    }
    shared.spaces().session_closed(id);
    shared.session_ended.notify_waiters();
    schedule_background_work(shared);
}

/// Reads the client's handshake and answers it with `err` (a connection the daemon cannot
/// serve), so the client reports why.
async fn refuse_after_hello(s: &mut UnixStream, err: ErrorBody) {
    let mut pending = Vec::new();
    if read_frame(s, &mut pending).await.is_ok() {
        let _ = write_msg(s, &HelloReply::Error(err)).await;
    }
}

/// Runs the handshake and the request loop; returns why the session ended.
async fn converse(shared: &Arc<Shared>, caller: &Caller, s: &mut UnixStream) -> Result<(), String> {
    let mut pending = Vec::new();
    let hello = match read_frame(s, &mut pending).await {
        Ok(body) => portres_proto::decode::<Hello>(&body).map_err(|e| e.to_string()),
        Err(FrameError::Closed) => return Ok(()),
        Err(e) => Err(e.to_string()),
    };
    let refuse = match &hello {
        Err(why) => Some(malformed(format!("bad handshake: {why}"))),
        Ok(h) if h.protocol != portres_proto::PROTOCOL_NAME => Some(malformed(format!(
            "the handshake names protocol {:?}, not {:?}",
            h.protocol,
            portres_proto::PROTOCOL_NAME
        ))),
        Ok(h) if !shared.checks.versions.contains(&h.version) => Some(malformed(format!(
            "the client speaks protocol version {}, this daemon (portres {}) speaks versions \
             {} to {}; use a client of the daemon's version, or run the daemon of the client's \
             version",
            h.version,
            env!("CARGO_PKG_VERSION"),
            shared.checks.versions.start(),
            shared.checks.versions.end()
        ))),
        Ok(_) => None,
    };
    if let Some(err) = refuse {
        let why = err.message.clone();
        let _ = write_msg(s, &HelloReply::Error(err)).await;
        return Err(why);
    }
    let version = hello.as_ref().map_or(portres_proto::VERSION, |h| h.version);
    let welcome = HelloReply::Welcome(Welcome {
        protocol: portres_proto::PROTOCOL_NAME.into(),
        version,
        daemon_version: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id(),
    });
    write_msg(s, &welcome).await.map_err(|e| e.to_string())?;

    loop {
        let body = match read_frame(s, &mut pending).await {
            Ok(b) => b,
            Err(FrameError::Closed) => return Ok(()),
            Err(e @ FrameError::TooLarge { .. }) => {
                let reply = ReplyFrame {
                    id: 0,
                    body: ReplyBody::Error(malformed(&e)),
                };
                let _ = write_msg(s, &reply).await;
                return Err(e.to_string());
            }
            Err(e) => return Err(e.to_string()),
        };
        let frame: RequestFrame = match portres_proto::decode(&body) {
            Ok(f) => f,
            Err(e) => {
                // Echo the id when the frame is JSON with an id, so the client can match it.
                let id = serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v.get("id")?.as_u64())
                    .unwrap_or(0);
                let reply = ReplyFrame {
                    id,
                    body: ReplyBody::Error(malformed(&e)),
                };
                let _ = write_msg(s, &reply).await;
                return Err(format!("malformed request: {e}"));
            }
        };
        let op = frame.request.op_name();
        if shared.checks.panic_on.as_deref() == Some(op) {
            panic!("PORTRES_FAILPOINT: panic on {op}, as asked");
        }
        let started = std::time::Instant::now();
        let handled = handlers::handle(shared, caller, frame.request).await;
        let outcome = match &handled {
            Ok(_) => "ok",
            Err(r) => r.code.as_str(),
        };
        crate::metrics::request(op, outcome, started.elapsed());
        if shared.checks.invariants {
            for st in shared.spaces().all() {
                st.table.check_invariants();
            }
        }
        schedule_background_work(shared);
        let limit = shared.config.reply_timeout;
        match handled {
            Ok(Answer::One(reply, Some(fd))) => {
                let reply = ReplyFrame {
                    id: frame.id,
                    body: ReplyBody::Ok(reply),
                };
                write_msg_with_fd(s, &reply, &fd)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok(Answer::One(reply, None)) => {
                write_within(s, &encode_reply(frame.id, ReplyBody::Ok(reply)), limit).await?;
            }
            Ok(Answer::Stream(head, rows)) => {
                write_stream(s, frame.id, head, rows, limit).await?;
            }
            Err(refusal) => {
                tracing::info!(
                    pid = caller.pid,
                    uid = caller.uid,
                    code = refusal.code.as_str(),
                    "refused {op}: {}",
                    refusal.message
                );
                let body = ReplyBody::Error(error_body(&refusal));
                write_within(s, &encode_reply(frame.id, body), limit).await?;
            }
        }
        // A granted shutdown stops the daemon once its answer is written.
        if op == "shutdown" && shared.stop_requested.load(Ordering::Acquire) {
            shared.stop.notify_one();
        }
    }
}
