//! Placeholder sockets that keep ports bound, and the sockets handed out from a reservation.
//!
//! The design (lab notes §7, re-measured by `tests/it/needs_root/enforcement.rs`): every port of
//! a held block has one placeholder of the block's protocol, bound to the dual-stack wildcard
//! `[::]:P` (`IPV6_V6ONLY=0`), never listening, with `SO_REUSEPORT`, created while the thread's
//! filesystem uid is a dedicated *holder uid* that no process runs as. The kernel lets a socket
//! join a port's `SO_REUSEPORT` group only if it was created by the same uid, so no process can
//! bind the port — on any address, either family, with or without `SO_REUSEADDR`/`SO_REUSEPORT`,
//! `SO_BINDTODEVICE` or `IP_FREEBIND` — and autobind (`bind(port 0)`, `connect()`) skips it.
//! A socket handed to a client is created the same way (holder uid, `SO_REUSEPORT`) and bound
//! beside the placeholder, so the port is never unbound: no window, and nothing to reclaim (not
//! even TIME_WAIT) when the client closes it.
//!
//! UDP placeholders take a reference to two eBPF programs the daemon loaded once
//! ([`crate::bpf::SocketPrograms`]): a socket filter that drops everything that reaches the
//! placeholder, and a reuseport program that steers datagrams to the group's second member (the
//! handed-out socket), falling back to the placeholder (which drops) when there is none. Nothing
//! is compiled per socket. Without them (a daemon that may not load eBPF) a UDP placeholder
//! carries no program and the smallest receive buffer the kernel allows (`SO_RCVBUF`), so what
//! reaches it is bounded to about one datagram; see [`UdpPrograms`].
//!
//! Without the privilege to change the filesystem uid (a per-user daemon), sockets belong to the
//! daemon's own uid, and other processes of that same user setting `SO_REUSEPORT` can share held
//! ports: a documented limit of user mode.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};

use crate::bpf::SocketPrograms;
use portres_core::Protocol;
use rustix::net::{AddressFamily, SocketFlags, SocketType, bind, listen, socket_with, sockopt};

/// `setfsuid(2)` for the calling thread only; returns the previous filesystem uid.
fn set_fsuid(uid: u32) -> u32 {
    // SAFETY: setfsuid takes a plain integer, touches no memory, and affects only this thread.
    unsafe { libc::setfsuid(uid) as u32 }
}

/// Whether this process may switch its filesystem uid (needs CAP_SETUID): tries and undoes it.
pub fn can_use_holder_uid(holder_uid: u32) -> bool {
    let before = set_fsuid(holder_uid);
    // setfsuid reports the previous value; calling it again with an invalid id reads the current.
    let now = set_fsuid(u32::MAX);
    set_fsuid(before);
    now == holder_uid
}

/// Creates a socket, under the holder uid when one is given.
fn new_socket(
    family: AddressFamily,
    ty: SocketType,
    holder_uid: Option<u32>,
) -> io::Result<OwnedFd> {
    let prev = holder_uid.map(set_fsuid);
    let fd = socket_with(family, ty, SocketFlags::CLOEXEC, None);
    if let Some(prev) = prev {
        set_fsuid(prev);
    }
    Ok(fd?)
}

fn sock_type(protocol: Protocol) -> SocketType {
    match protocol {
        Protocol::Tcp => SocketType::STREAM,
        Protocol::Udp => SocketType::DGRAM,
    }
}

/// Placeholders for every port of `range` (all or nothing), switching the filesystem uid once
/// for the whole block. On failure, the port that failed and why.
pub fn placeholders(
    protocol: Protocol,
    range: portres_core::PortRange,
    holder_uid: Option<u32>,
    udp: UdpPrograms<'_>,
) -> Result<Vec<OwnedFd>, (u16, io::Error)> {
    let prev = holder_uid.map(set_fsuid);
    let mut fds = Vec::with_capacity(usize::from(range.count()));
    let mut failed = None;
    for port in range.ports() {
        match placeholder(protocol, port, None, udp) {
            Ok(fd) => fds.push(fd),
            Err(e) => {
                failed = Some((port, e));
                break;
            }
        }
    }
    if let Some(prev) = prev {
        set_fsuid(prev);
    }
    match failed {
        Some(f) => Err(f),
        None => Ok(fds),
    }
}

/// A placeholder holding `port` for `protocol`: `socket()` under the holder uid,
/// `SO_REUSEPORT`, `bind([::]:port)` dual-stack (or `0.0.0.0:port` when IPv6 is unavailable),
/// never `listen()`; UDP gets the shared drop filter and steering program (see [`UdpPrograms`]).
pub fn placeholder(
    protocol: Protocol,
    port: u16,
    holder_uid: Option<u32>,
    udp: UdpPrograms<'_>,
) -> io::Result<OwnedFd> {
    let prepared = prepare_placeholder(protocol, holder_uid)?;
    bind_placeholder(prepared, port, udp)
}

/// The programs UDP placeholders share: the daemon's loaded [`SocketPrograms`], or `None` when
/// it could not load them (then a UDP placeholder gets no program and a minimal receive buffer).
pub type UdpPrograms<'a> = Option<&'a SocketPrograms>;

/// A placeholder socket made ahead of time, not bound yet (see [`prepare_placeholder`]).
#[derive(Debug)]
pub struct Prepared {
    fd: OwnedFd,
    protocol: Protocol,
    v6: bool,
}

/// The first half of [`placeholder`]: `socket()` under the holder uid, dual-stack
/// (`IPV6_V6ONLY=0`, or IPv4 when IPv6 is unavailable) and `SO_REUSEPORT`. A daemon keeps a few
/// ready so that holding a small block costs only the `bind`.
pub fn prepare_placeholder(protocol: Protocol, holder_uid: Option<u32>) -> io::Result<Prepared> {
    let ty = sock_type(protocol);
    let (fd, v6) = match new_socket(AddressFamily::INET6, ty, holder_uid) {
        Ok(fd) => {
            sockopt::set_ipv6_v6only(&fd, false)?;
            (fd, true)
        }
        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
            (new_socket(AddressFamily::INET, ty, holder_uid)?, false)
        }
        Err(e) => return Err(e),
    };
    sockopt::set_socket_reuseport(&fd, true)?;
    Ok(Prepared { fd, protocol, v6 })
}

/// A prepared socket bound as a handed-out socket of a held port: `bind([::]:port)` (the
/// dual-stack wildcard), and `listen()` for listeners. The same socket [`handover_socket`] makes
/// for the wildcard address of a held block, minus the system calls done ahead of time.
pub fn bind_prepared_for_handover(p: Prepared, kind: SocketKind, port: u16) -> io::Result<OwnedFd> {
    let ip = if p.v6 {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    };
    bind(&p.fd, &SocketAddr::new(ip, port))?;
    if let SocketKind::Listener { backlog } = kind {
        listen(&p.fd, backlog)?;
    }
    Ok(p.fd)
}

/// `count` sockets as [`prepare_placeholder`] makes them, under one switch of the filesystem uid
/// (each switch prepares and commits new credentials, which costs more than the socket).
/// Returns those made before any failure, and the failure.
pub fn prepare_placeholders(
    protocol: Protocol,
    holder_uid: Option<u32>,
    count: usize,
) -> (Vec<Prepared>, Option<io::Error>) {
    let prev = holder_uid.map(set_fsuid);
    let mut out = Vec::with_capacity(count);
    let mut failed = None;
    for _ in 0..count {
        match prepare_placeholder(protocol, None) {
            Ok(p) => out.push(p),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    if let Some(prev) = prev {
        set_fsuid(prev);
    }
    (out, failed)
}

/// Whether a prepared socket is IPv6 (dual-stack) rather than IPv4.
pub fn prepared_is_v6(p: &Prepared) -> bool {
    p.v6
}

/// The second half of [`placeholder`]: `bind` to the wildcard address on `port`; UDP gets the
/// shared drop filter and steering program, or without them the smallest receive buffer.
pub fn bind_placeholder(p: Prepared, port: u16, udp: UdpPrograms<'_>) -> io::Result<OwnedFd> {
    let ip = if p.v6 {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    };
    bind(&p.fd, &SocketAddr::new(ip, port))?;
    if p.protocol == Protocol::Udp {
        match udp {
            Some(progs) => progs.attach(&p.fd)?,
            // The kernel raises 0 to its minimum (SOCK_MIN_RCVBUF, about 4.5 KiB).
            None => sockopt::set_socket_recv_buffer_size(&p.fd, 0)?,
        }
    }
    Ok(p.fd)
}

/// What kind of socket a client asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketKind {
    /// TCP, listening with this backlog.
    Listener {
        /// `listen(2)` backlog.
        backlog: i32,
    },
    /// TCP, bound, ready for `connect()` from the port.
    Stream,
    /// UDP, bound.
    Datagram,
}

impl SocketKind {
    /// The protocol of the socket.
    pub fn protocol(self) -> Protocol {
        match self {
            SocketKind::Listener { .. } | SocketKind::Stream => Protocol::Tcp,
            SocketKind::Datagram => Protocol::Udp,
        }
    }
}

/// A socket for a client: `socket()` (under the holder uid if given), `SO_REUSEPORT` when the
/// port is held by a placeholder, `IPV6_V6ONLY` as asked (dual-stack by default when `addr` is
/// `::`), `bind(addr:port)`, `listen()` for listeners.
pub fn handover_socket(
    kind: SocketKind,
    addr: IpAddr,
    port: u16,
    reuseport: bool,
    holder_uid: Option<u32>,
    v6only: Option<bool>,
) -> io::Result<OwnedFd> {
    let family = match addr {
        IpAddr::V4(_) => AddressFamily::INET,
        IpAddr::V6(_) => AddressFamily::INET6,
    };
    let fd = new_socket(family, sock_type(kind.protocol()), holder_uid)?;
    if addr.is_ipv6() {
        match v6only {
            Some(v) => sockopt::set_ipv6_v6only(&fd, v)?,
            None if addr.is_unspecified() => sockopt::set_ipv6_v6only(&fd, false)?,
            None => {}
        }
    }
    if reuseport {
        sockopt::set_socket_reuseport(&fd, true)?;
    }
    bind(&fd, &SocketAddr::new(addr, port))?;
    if let SocketKind::Listener { backlog } = kind {
        listen(&fd, backlog)?;
    }
    Ok(fd)
}

/// `fstat(2)`: the socket's inode number (what `sock_diag` and `/proc/PID/fd` report).
pub fn inode(fd: impl AsFd) -> io::Result<u64> {
    Ok(rustix::fs::fstat(fd)?.st_ino)
}

/// `getsockname(2)`: the local address of a socket.
pub fn local_addr(fd: impl AsFd) -> io::Result<SocketAddr> {
    let addr = rustix::net::getsockname(fd)?;
    SocketAddr::try_from(addr).map_err(|_| io::Error::other("not an inet socket"))
}

/// `connect(2)`.
pub fn connect(fd: impl AsFd, to: SocketAddr) -> io::Result<()> {
    rustix::net::connect(fd, &to)?;
    Ok(())
}

/// Open-file limits: raises the soft `RLIMIT_NOFILE` to the hard limit (`setrlimit(2)`) and
/// returns the new soft limit.
pub fn raise_nofile_limit() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current != lim.maximum {
        lim.current = lim.maximum;
        let _ = setrlimit(Resource::Nofile, lim);
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// The soft `RLIMIT_NOFILE`.
pub fn nofile_limit() -> u64 {
    rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX)
}
