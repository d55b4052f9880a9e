//! Placeholder-holding helper processes, for hold blocks larger than the daemon's own descriptor
//! budget (each placeholder is one open file, and the open-file hard limit may be lower than the
//! ports to hold).
//!
//! A helper is `portres holder`, started by the daemon with one end of a `SOCK_SEQPACKET` pair
//! as its standard input. The daemon creates placeholders in chunks, passes each chunk with
//! `SCM_RIGHTS` and closes its own copies; the helper keeps them until told to drop the block.
//! Messages (daemon to helper): 9 bytes, an op (`1` hold, `2` drop) and the token (u64, little
//! endian), with the descriptors on hold messages. The helper answers each with one byte (`1`).
//! A helper exits when the daemon's end closes, and with it its placeholders. With live restore
//! the keeper holds a copy of that end from the helper's start, so a helper outlives a daemon
//! that stops or dies, and the next daemon takes it over (`Helpers::adopt`); it exits when the
//! keeper lets go too.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::process::{Command, Stdio};

use portres_core::Token;

const HOLD: u8 = 1;
const DROP: u8 = 2;
/// Descriptors per message.
pub(crate) const CHUNK: usize = 200;

struct Helper {
    /// Its pid (never waited for: it may outlive us, kept alive by the keeper).
    pid: u32,
    sock: OwnedFd,
    held: u64,
}

fn message(op: u8, token: Token) -> [u8; 9] {
    let mut m = [0u8; 9];
    m[0] = op;
    m[1..].copy_from_slice(&token.get().to_le_bytes());
    m
}

impl Helper {
    fn spawn() -> io::Result<Helper> {
        let (ours, theirs) = portres_sys::fdpass::seqpacket_pair()?;
        let child = Command::new(std::env::current_exe()?)
            .arg("holder")
            .stdin(Stdio::from(theirs))
            .stdout(Stdio::null())
            .spawn()?;
        Ok(Helper {
            pid: child.id(),
            sock: ours,
            held: 0,
        })
    }

    fn call(&self, msg: &[u8; 9], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        portres_sys::fdpass::send_with_fds(&self.sock, msg, fds)?;
        let mut ack = [0u8; 1];
        match portres_sys::fdpass::recv_with_fds(&self.sock, &mut ack)? {
            (1, _) if ack[0] == 1 => Ok(()),
            _ => Err(io::Error::other(format!(
                "placeholder helper (pid {}) stopped answering",
                self.pid
            ))),
        }
    }
}

/// The helpers of a daemon, and which hold which blocks.
#[derive(Default)]
pub(crate) struct Helpers {
    /// By index; `None` where a taken-over daemon's helper was missing.
    helpers: Vec<Option<Helper>>,
    /// Per block: the helpers holding part of it.
    blocks: HashMap<Token, Vec<usize>>,
    /// Helpers started since [`Helpers::take_new`] was last asked (for the keeper).
    new: Vec<usize>,
}

impl Helpers {
    /// Passes `fds` (placeholders of `token`'s block) to a helper with room for them, starting
    /// one if needed; `capacity` is how many descriptors one helper may hold.
    pub(crate) fn hold(&mut self, token: Token, fds: &[OwnedFd], capacity: u64) -> io::Result<()> {
        let n = fds.len() as u64;
        let room = self
            .helpers
            .iter()
            .position(|h| h.as_ref().is_some_and(|h| h.held + n <= capacity));
        let at = match room {
            Some(i) => i,
            None => {
                self.helpers.push(Some(Helper::spawn()?));
                self.new.push(self.helpers.len() - 1);
                self.helpers.len() - 1
            }
        };
        let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
        let h = self.helpers[at].as_mut().expect("chosen");
        h.call(&message(HOLD, token), &borrowed)?;
        h.held += n;
        let owners = self.blocks.entry(token).or_default();
        if !owners.contains(&at) {
            owners.push(at);
        }
        Ok(())
    }

    /// Closes every placeholder of `token`'s block held by helpers (`count` ports), waiting for
    /// each helper to confirm.
    pub(crate) fn drop_block(&mut self, token: Token, count: u64) {
        let Some(owners) = self.blocks.remove(&token) else {
            return;
        };
        for i in owners {
            let Some(h) = self.helpers.get(i).and_then(Option::as_ref) else {
                continue;
            };
            if let Err(e) = h.call(&message(DROP, token), &[]) {
                tracing::error!(error = %e, "dropping a held block in a helper failed");
            }
        }
        // Capacity bookkeeping is approximate across helpers: spread the count back.
        let mut left = count;
        for h in self.helpers.iter_mut().flatten() {
            let take = left.min(h.held);
            h.held -= take;
            left -= take;
        }
    }

    /// Whether `token`'s block is held by helpers.
    pub(crate) fn holds(&self, token: Token) -> bool {
        self.blocks.contains_key(&token)
    }

    /// Number of helper processes and ports they hold.
    pub(crate) fn summary(&self) -> (usize, u64) {
        let live = self.helpers.iter().flatten();
        (live.clone().count(), live.map(|h| h.held).sum())
    }

    /// The helpers holding part of `token`'s block.
    pub(crate) fn indices(&self, token: Token) -> Vec<usize> {
        self.blocks.get(&token).cloned().unwrap_or_default()
    }

    /// Helpers started since the last call: index, pid and a copy of our end of its link.
    pub(crate) fn take_new(&mut self) -> Vec<(usize, u32, OwnedFd)> {
        std::mem::take(&mut self.new)
            .into_iter()
            .filter_map(|i| {
                let h = self.helpers.get(i)?.as_ref()?;
                Some((i, h.pid, h.sock.try_clone().ok()?))
            })
            .collect()
    }

    /// Takes over helper `index` (pid `pid`) of a previous daemon, through `sock`.
    pub(crate) fn adopt(&mut self, index: usize, pid: u32, sock: OwnedFd) {
        if self.helpers.len() <= index {
            self.helpers.resize_with(index + 1, || None);
        }
        self.helpers[index] = Some(Helper { pid, sock, held: 0 });
    }

    /// Records that the taken-over helpers `indices` hold `token`'s block of `count` ports;
    /// false (nothing recorded) if one of them was not taken over.
    pub(crate) fn adopt_block(&mut self, token: Token, indices: &[usize], count: u64) -> bool {
        if indices.is_empty()
            || !indices
                .iter()
                .all(|&i| self.helpers.get(i).is_some_and(Option::is_some))
        {
            return false;
        }
        // Capacity bookkeeping is approximate across helpers: spread the count.
        let share = count / indices.len() as u64 + 1;
        for &i in indices {
            if let Some(h) = self.helpers[i].as_mut() {
                h.held += share;
            }
        }
        self.blocks.insert(token, indices.to_vec());
        true
    }

    /// Tells the helpers `indices` (taken over) to let go of `token`'s block.
    pub(crate) fn drop_adopted(&mut self, token: Token, indices: &[usize]) {
        self.blocks.insert(token, indices.to_vec());
        self.drop_block(token, 0);
    }
}

/// `portres holder`: keeps the placeholders the daemon passes on standard input until told to
/// drop them; exits when the daemon's end closes.
pub fn serve_stdin() -> io::Result<()> {
    portres_sys::hold::raise_nofile_limit();
    let sock = io::stdin().as_fd().try_clone_to_owned()?;
    let mut held: HashMap<u64, Vec<OwnedFd>> = HashMap::new();
    loop {
        let mut buf = [0u8; 16];
        let (n, fds) = portres_sys::fdpass::recv_with_fds(&sock, &mut buf)?;
        if n == 0 {
            return Ok(());
        }
        if n == 9 {
            let token = u64::from_le_bytes(buf[1..9].try_into().expect("8 bytes"));
            match buf[0] {
                HOLD => held.entry(token).or_default().extend(fds),
                DROP => drop(held.remove(&token)),
                _ => {}
            }
        }
        portres_sys::fdpass::send_with_fds(&sock, &[1], &[])?;
    }
}
