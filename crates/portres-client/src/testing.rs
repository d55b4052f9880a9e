//! Ports for tests, reserved rather than probed.
//!
//! `portpicker`-style helpers find a free port, let it go, and hope nobody takes it before the
//! code under test binds it; under `cargo test` (threads) and `cargo nextest` (one process per
//! test) they collide. These helpers reserve instead: the port stays reserved for as long as the
//! value lives, and is released when it is dropped or when the test process dies (the daemon
//! ends a session's reservations when its connection closes).
//!
//! - [`tcp_listener`]: a listening `TcpListener` on a held port (every address, IPv4 and IPv6);
//!   pass it to the server under test, or its port to a client.
//! - [`udp_socket`]: a `UdpSocket` bound to a held port.
//! - [`ports`]: `n` consecutive ports for code that binds by number itself (an `exclude` block:
//!   the kernel never hands its ports out as ephemeral ports, and no other portres client gets
//!   them).
//!
//! All of them connect once per process (the connection is shared) with [`Client::connect`]:
//! `PORTRES_SOCKET`, the system daemon, or a per-user daemon started on demand. There is no
//! silent fallback to probing: when no daemon can be reached or started, the error says why and
//! what to do.
//!
//! ```no_run
//! use std::io::{Read, Write};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A server under test, on a port nobody else can take.
//! let listener = portres_client::testing::tcp_listener()?;
//! let port = listener.port();
//! let server = std::thread::spawn(move || {
//!     let (mut conn, _) = listener.accept().unwrap();
//!     conn.write_all(b"hello").unwrap();
//! });
//! let mut reply = String::new();
//! std::net::TcpStream::connect(("127.0.0.1", port))?.read_to_string(&mut reply)?;
//! assert_eq!(reply, "hello");
//! server.join().unwrap();
//!
//! // Three consecutive ports for a program that binds them by number itself.
//! let block = portres_client::testing::ports(3)?;
//! assert_eq!(block.len(), 3);
//! assert_eq!(block[1], block[0] + 1);
//! let _bound = std::net::TcpListener::bind(("127.0.0.1", block[2]))?;
//! # Ok(())
//! # }
//! ```
//!
//! This example is `examples/testing.rs` of this crate; the integration suite runs it against
//! a real daemon in a private network namespace (`needs_root::testing_helpers`). (A doc test
//! cannot: it would start a daemon on the machine's own ports.)

use std::net::{TcpListener, UdpSocket};
use std::ops::Deref;
use std::sync::Mutex;

use crate::{Client, Mode, Protocol, Reservation};

/// Why a helper failed: the library's [`crate::Error`], shown with its whole message by
/// `Debug` too, since that is what a test that returns `Result` (or calls `unwrap`) prints.
pub struct Error(pub crate::Error);

impl Error {
    /// The library's error (its code, Windows code, details).
    pub fn into_inner(self) -> crate::Error {
        self.0
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "portres_client::testing: {}", self.0)
    }
}

impl std::fmt::Debug for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

impl From<crate::Error> for Error {
    fn from(e: crate::Error) -> Error {
        Error(e)
    }
}

/// The process's connection, made on first use.
static CLIENT: Mutex<Option<Client>> = Mutex::new(None);

/// The shared connection, made on first use. After a daemon restart it reconnects by itself
/// and re-attaches this process's reservations (never a second daemon elsewhere).
pub fn client() -> Result<Client, Error> {
    let mut c = CLIENT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(existing) = c.as_ref() {
        return Ok(existing.clone());
    }
    let fresh = Client::connect().map_err(Error)?;
    *c = Some(fresh.clone());
    Ok(fresh)
}

/// A socket on a reserved (held) port; the reservation ends when it is dropped. Derefs to the
/// socket.
#[derive(Debug)]
pub struct Reserved<S> {
    socket: S,
    reservation: Reservation,
}

/// A listening TCP socket on a held port ([`tcp_listener`]).
pub type ReservedListener = Reserved<TcpListener>;

/// A UDP socket on a held port ([`udp_socket`]).
pub type ReservedUdpSocket = Reserved<UdpSocket>;

impl<S> Reserved<S> {
    /// The port.
    pub fn port(&self) -> u16 {
        self.reservation.port()
    }

    /// The socket, keeping the reservation until the returned pair is dropped.
    pub fn into_parts(self) -> (S, Reservation) {
        (self.socket, self.reservation)
    }
}

impl<S> Deref for Reserved<S> {
    type Target = S;
    fn deref(&self) -> &S {
        &self.socket
    }
}

/// Consecutive reserved ports for code that binds them by number (an `exclude` block); they
/// are released when this is dropped. Derefs to the ports, in order.
#[derive(Debug)]
pub struct ReservedPorts {
    ports: Vec<u16>,
    reservation: Reservation,
}

impl ReservedPorts {
    /// The reservation (its token, range, mode).
    pub fn reservation(&self) -> &Reservation {
        &self.reservation
    }
}

impl Deref for ReservedPorts {
    type Target = [u16];
    fn deref(&self) -> &[u16] {
        &self.ports
    }
}

/// A TCP listener (backlog 128, every address) on a free port of the dynamic range, held by
/// portres for as long as the value lives.
pub fn tcp_listener() -> Result<ReservedListener, Error> {
    let reservation = client()?.acquire_with(Protocol::Tcp, 0, 1, Mode::Hold)?;
    let socket = reservation.listen(reservation.port())?;
    Ok(Reserved {
        socket,
        reservation,
    })
}

/// A UDP socket (every address) on a free port of the dynamic range, held by portres for as
/// long as the value lives.
pub fn udp_socket() -> Result<ReservedUdpSocket, Error> {
    let reservation = client()?.acquire_with(Protocol::Udp, 0, 1, Mode::Hold)?;
    let socket = reservation.udp_socket(None, reservation.port())?;
    Ok(Reserved {
        socket,
        reservation,
    })
}

/// `n` consecutive TCP ports (an `exclude` block) for code under test that binds them by
/// number itself.
pub fn ports(n: u32) -> Result<ReservedPorts, Error> {
    let reservation = client()?.acquire_with(Protocol::Tcp, 0, n, Mode::Exclude)?;
    Ok(ReservedPorts {
        ports: reservation.range().ports().collect(),
        reservation,
    })
}
