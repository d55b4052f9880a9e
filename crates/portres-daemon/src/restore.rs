//! Live restore at start: the reservations a predecessor's keeper hands over are sorted into
//! those carried on (their owner still lives, the block is still enforceable) and those dropped,
//! each named in the log; then the owners of the carried-on sessions are watched, so a holder
//! that exited while no daemon ran, or exits later, is released.
//!
//! Order matters for "never unprotected": the dropped blocks' copies in the keeper are closed
//! first (so binding afresh cannot collide with them), then every block is put back, each hold
//! block with the placeholders handed over, and `ip_local_reserved_ports` is written once at the
//! end with every carried-on block in it (it never left the sysctl: the predecessor did not
//! restore it).

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use portres_core::{Owner, PortRange, Reservation, SessionId, Token};
use portres_proto::RestoreInfo;

use crate::keeper::{self, HandedRec, Kept};
use crate::store::StoredReservation;
use crate::{Config, Placement, Shared, StartError, State, Store};

/// What [`at_start`] carried over.
pub(crate) struct Restored {
    pub(crate) info: RestoreInfo,
    /// The owners of the sessions carried over, to watch.
    pub(crate) owners: Vec<(SessionId, OwnedFd)>,
    /// Session ids from here on are new.
    pub(crate) next_session: u64,
}

type Entry = (Kept, Vec<OwnedFd>, Vec<HandedRec>);

/// Loads the persistent reservations of the store and whatever a predecessor's keeper holds into
/// `state`, and connects `state` to a keeper (the predecessor's, or a new one).
pub(crate) fn at_start(
    state: &mut State,
    config: &Config,
    placement: &Placement,
    store: &Store,
    records: Vec<StoredReservation>,
) -> Result<Restored, StartError> {
    let mut info = RestoreInfo {
        live_restore_secs: config.live_restore_secs,
        ..RestoreInfo::default()
    };
    let spawn = config.live_restore_secs > 0;
    let started = std::time::Instant::now();
    let (mut link, mut replay) = match keeper::Link::start(
        &placement.socket,
        &placement.state_dir,
        config.live_restore_secs,
        spawn,
        placement.activated,
    ) {
        Ok(Some((link, replay))) => {
            info.restored = replay.is_some();
            tracing::debug!(
                ms = started.elapsed().as_millis() as u64,
                records = replay.as_ref().map_or(0, |r| r.records.len()),
                "keeper reached"
            );
            (Some(link), replay.unwrap_or_default())
        }
        Ok(None) => (None, keeper::Replay::default()),
        Err(e) => {
            let why = format!("cannot start or reach the keeper: {e}");
            tracing::error!("live restore is off: {why}");
            info.problem = Some(why);
            (None, keeper::Replay::default())
        }
    };

    // Helper processes that held large blocks for the predecessor (the keeper kept them alive).
    state
        .enforcer
        .adopt_helpers(std::mem::take(&mut replay.helpers));

    // Sort what the keeper had.
    let stored: HashMap<u64, &StoredReservation> = records.iter().map(|r| (r.token, r)).collect();
    let mut persistent: HashMap<u64, Entry> = HashMap::new();
    let mut runtime: Vec<Entry> = Vec::new();
    let mut dropped: Vec<(u64, bool, Vec<usize>)> = Vec::new();
    for (k, fds, handed) in std::mem::take(&mut replay.records) {
        if k.persistent {
            let same = stored.get(&k.token).is_some_and(|s| {
                s.protocol == k.protocol
                    && s.start == k.start
                    && s.count == k.count
                    && s.mode == k.mode
            });
            if same {
                persistent.insert(k.token, (k, fds, handed));
            } else {
                dropped.push((k.token, !fds.is_empty(), k.helpers.clone()));
            }
            continue;
        }
        let alive = replay
            .owners
            .get(&k.session)
            .is_some_and(|(_, _, fd)| !portres_sys::process::pidfd_exited(fd));
        if alive && k.protocol().is_some() && k.mode().is_some() && k.count > 0 {
            runtime.push((k, fds, handed));
        } else {
            let why = if alive {
                "its record could not be read".to_string()
            } else {
                "its owner exited while no daemon was running".to_string()
            };
            tracing::info!("dropped runtime reservation {}: {why}", k.name());
            info.dropped.push(format!("{}: {why}", k.name()));
            dropped.push((k.token, !fds.is_empty(), k.helpers.clone()));
        }
    }
    if let Some(l) = &mut link {
        for (session, (_, _, pidfd)) in std::mem::take(&mut replay.owners) {
            l.adopt_owner(session, pidfd);
        }
        for (token, held, helpers) in &dropped {
            l.drop_token(*token);
            if *held {
                l.expect_sync();
            }
            if let Some(t) = Token::new(*token).filter(|_| !helpers.is_empty()) {
                state.enforcer.drop_adopted_block(t, helpers);
            }
        }
        // The dropped blocks' copies are closed before anything is bound afresh.
        l.sync();
    }
    state.keeper = link;

    // Persistent blocks from the store: with the placeholders handed over where the keeper
    // had them.
    for rec in records {
        let r = rec
            .to_reservation()
            .map_err(|why| StartError::Inconsistent {
                path: store.path().into(),
                why: format!("record {}: {why}", rec.token),
            })?;
        state
            .table
            .restore_persistent(r.clone())
            .map_err(|e| StartError::Inconsistent {
                path: store.path().into(),
                why: e.message,
            })?;
        match persistent.remove(&r.token.get()) {
            Some((k, fds, handed)) => {
                match carry_on(state, &mut info, &r, fds, &k.helpers) {
                    Ok(()) => {}
                    Err(why) => {
                        tracing::warn!(
                            token = %r.token,
                            "persistent reservation {}/{}: {why}", r.range, r.protocol
                        );
                        info.lost
                            .push(format!("persistent {}/{}: {why}", r.range, r.protocol));
                        state.enforcer.admit_at_start(&r);
                        state.keep(&r, true);
                    }
                }
                adopt_handed(state, &r, &handed);
            }
            None => {
                state.enforcer.admit_at_start(&r);
                // The keeper knows every block (what to take out of the sysctl if no daemon
                // comes back), and has a held one's placeholders.
                state.keep(&r, true);
            }
        }
    }

    // Runtime blocks whose owner lives.
    let mut sessions: HashSet<SessionId> = HashSet::new();
    let mut next_session = 1;
    for (k, fds, handed) in runtime {
        next_session = next_session.max(k.session + 1);
        let (Some(protocol), Some(mode), Some(token), Ok(range)) = (
            k.protocol(),
            k.mode(),
            Token::new(k.token),
            PortRange::new(u32::from(k.start), u32::from(k.count)),
        ) else {
            continue;
        };
        let owner = Owner {
            pid: k.pid,
            uid: k.uid,
            command: k.command.clone(),
        };
        if sessions.insert(k.session) {
            state.table.open_session(k.session, owner.clone());
        }
        let r = Reservation::runtime(
            token,
            protocol,
            range,
            mode,
            k.session,
            owner,
            k.created,
            handed.iter().map(|h| h.port),
        );
        let lost = |state: &mut State, info: &mut RestoreInfo, why: String| {
            tracing::warn!("lost runtime reservation {}: {why}", k.name());
            info.lost.push(format!("{}: {why}", k.name()));
            if let Some(l) = &mut state.keeper {
                l.drop_token(k.token);
                l.expect_sync();
            }
            // Helpers taken over that still hold it let go too.
            if let Some(t) = Token::new(k.token).filter(|_| !k.helpers.is_empty()) {
                state.enforcer.drop_adopted_block(t, &k.helpers);
            }
        };
        if let Err(e) = state.table.restore_runtime(r.clone()) {
            lost(state, &mut info, e.message);
            continue;
        }
        if let Err(why) = carry_on(state, &mut info, &r, fds, &k.helpers) {
            state.table.cancel(r.token);
            lost(state, &mut info, why);
            continue;
        }
        adopt_handed(state, &r, &handed);
        info.kept += 1;
        tracing::info!("kept runtime reservation {}", k.name());
    }

    // Sessions left with nothing, and owners nobody needs, are forgotten.
    let mut owners = Vec::new();
    if let Some(l) = &mut state.keeper {
        for &s in &sessions {
            if state.table.session_len(s) == 0 {
                state.table.end_session(s);
            }
        }
        let known: Vec<SessionId> = l.owner_sessions();
        for s in known {
            if state.table.session_len(s) == 0 {
                l.owner_gone(s);
            } else if let Some(fd) = l.owner_pidfd(s).and_then(|f| f.try_clone_to_owned().ok()) {
                owners.push((s, fd));
            }
        }
        l.sync();
        info.keeper_pid = l.pid();
    }
    if !spawn {
        // Live restore is off: a keeper left by an earlier configuration was carried on from,
        // and is now let go.
        if let Some(l) = state.keeper.take() {
            l.release();
        }
        info.keeper_pid = None;
    }
    state.enforcer.finish_start(&state.table);
    if info.restored {
        tracing::info!(
            kept = info.kept,
            dropped = info.dropped.len(),
            lost = info.lost.len(),
            placeholders_kept = info.placeholders_kept,
            ms = started.elapsed().as_millis() as u64,
            "carried on from the previous daemon's keeper"
        );
    }
    Ok(Restored {
        info,
        owners,
        next_session,
    })
}

/// Puts back the kernel side of a block carried over (`Enforcer::adopt`): placeholders handed
/// over are counted and known to be the keeper's copies too; placeholders bound afresh go to the
/// keeper. On failure nothing of it is left in the kernel.
fn carry_on(
    state: &mut State,
    info: &mut RestoreInfo,
    r: &Reservation,
    fds: Vec<OwnedFd>,
    helpers: &[usize],
) -> Result<(), String> {
    if state.enforcer.adopt(r, fds, helpers)? {
        info.placeholders_kept += u64::from(r.range.count());
        if let Some(l) = &mut state.keeper {
            l.mark_copied(r.token.get());
        }
    } else if r.mode == portres_core::Mode::Hold {
        state.keep(r, true);
    }
    Ok(())
}

/// The sockets a predecessor handed out from `r`'s block, in the table and the enforcer.
fn adopt_handed(state: &mut State, r: &Reservation, handed: &[HandedRec]) {
    for h in handed {
        if state.table.mark_handed(r.token, h.port) {
            state.enforcer.adopt_handed(r, h.port, h);
        }
    }
}

/// Watches the owners of the sessions carried over (their pidfds become readable when they
/// exit): each session ends, and its reservations with it, when its owner exits. One thread
/// waits on all of them in `poll(2)` (the set only shrinks: sessions carried over are known at
/// start), and hands each exit to the runtime.
pub(crate) fn watch_restored_owners(shared: &Arc<Shared>) {
    let mut owners = std::mem::take(&mut *shared.restored_owners.lock().unwrap());
    if owners.is_empty() {
        return;
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<SessionId>();
    let spawned = std::thread::Builder::new()
        .name("owner-watch".into())
        .spawn(move || {
            while !owners.is_empty() {
                let fds: Vec<_> = owners.iter().map(|(_, fd)| fd.as_fd()).collect();
                let exited = match portres_sys::process::wait_pidfds(&fds) {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot watch carried-over owners");
                        return;
                    }
                };
                drop(fds);
                for &i in exited.iter().rev() {
                    let (session, _) = owners.swap_remove(i);
                    if tx.send(session).is_err() {
                        return;
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the thread watching carried-over owners");
        return;
    }
    let shared = shared.clone();
    tokio::spawn(async move {
        while let Some(session) = rx.recv().await {
            crate::server::finish_session(
                &shared,
                session,
                None,
                "its owner exited (a session carried over from the previous daemon)",
            );
        }
    });
}

/// Whether the owner of carried-over session `session` has exited (false when unknown).
pub(crate) fn owner_exited(state: &State, session: SessionId) -> bool {
    state
        .keeper
        .as_ref()
        .and_then(|k| k.owner_pidfd(session))
        .is_some_and(|fd| portres_sys::process::pidfd_exited(fd.as_fd()))
}
