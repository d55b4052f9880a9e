//! Per-socket state of the C ABI: runtime reservations acquired on a socket (each on its own
//! session, so that closing the socket ends exactly them) and associations waiting for a bind.

use std::collections::HashMap;
use std::ffi::c_int;
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};

use portres_client::{Client, Error, Mode, Protocol, Reservation, SocketKind, Token};

#[derive(Default)]
struct SocketState {
    acquired: Vec<Reservation>,
    associated: Option<Token>,
}

#[derive(Default)]
struct State {
    sockets: HashMap<c_int, SocketState>,
    /// A session for association and for releasing tokens this library did not acquire.
    shared: Option<Client>,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

fn state() -> MutexGuard<'static, Option<State>> {
    STATE.lock().unwrap_or_else(|p| p.into_inner())
}

fn with<T>(f: impl FnOnce(&mut State) -> T) -> T {
    let mut g = state();
    f(g.get_or_insert_with(State::default))
}

fn shared(st: &mut State) -> Result<Client, Error> {
    if let Some(c) = &st.shared {
        return Ok(c.clone());
    }
    let c = Client::connect()?;
    st.shared = Some(c.clone());
    Ok(c)
}

/// `SIO_ACQUIRE_PORT_RESERVATION` on `s`: a new session holds the block until `s` is closed,
/// the token is released, or the process exits.
pub(crate) fn acquire(
    s: c_int,
    protocol: Protocol,
    start: u16,
    count: u16,
) -> Result<(Token, u16, u16), Error> {
    // Connect outside the lock: it may start a daemon.
    let client = Client::connect()?;
    let r = client.acquire_with(protocol, start.into(), count.into(), Mode::Hold)?;
    let out = (r.token(), r.range().start(), r.range().count());
    with(|st| st.sockets.entry(s).or_default().acquired.push(r));
    Ok(out)
}

/// `SIO_ASSOCIATE_PORT_RESERVATION`: `s` will bind from `token`. The token is checked at bind,
/// where the daemon decides (as Windows reports errors of a later bind).
pub(crate) fn associate(s: c_int, token: Token) {
    with(|st| st.sockets.entry(s).or_default().associated = Some(token));
}

/// The token `s` is associated with.
pub(crate) fn association(s: c_int) -> Option<Token> {
    with(|st| st.sockets.get(&s).and_then(|x| x.associated))
}

/// `SIO_RELEASE_PORT_RESERVATION`.
pub(crate) fn release(token: Token) -> Result<(), Error> {
    let found = with(|st| {
        st.sockets.values_mut().find_map(|x| {
            let i = x.acquired.iter().position(|r| r.token() == token)?;
            Some(x.acquired.remove(i))
        })
    });
    match found {
        Some(r) => r.release(),
        // Not acquired here: the daemon says whose it is (AccessDenied) or that it is unknown.
        None => {
            let client = with(shared)?;
            client.release(token.get())
        }
    }
}

/// Binds `s` from its associated reservation: the daemon hands over a socket bound to the port,
/// which replaces `s` under the same number.
pub(crate) fn bind_associated(
    s: c_int,
    token: Token,
    protocol: Protocol,
    ip: IpAddr,
    port: u16,
    v6only: Option<bool>,
) -> Result<(), c_int> {
    let kind = match protocol {
        Protocol::Tcp => SocketKind::Stream,
        Protocol::Udp => SocketKind::Datagram,
    };
    let client = with(shared).map_err(|e| crate::winsock_code(&e))?;
    let (fd, _) = client
        .associate_with(token, kind, Some(ip), port, v6only)
        .map_err(|e| crate::winsock_code(&e))?;
    portres_sys::rawfd::replace_socket(s, fd).map_err(|e| crate::errno_code(&e))
}

/// `s` is being closed: its reservations end, its association is forgotten.
pub(crate) fn forget(s: c_int) {
    let gone = with(|st| st.sockets.remove(&s));
    drop(gone); // releases outside the lock
}
