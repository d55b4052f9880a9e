//! The kernel's socket table through netlink `sock_diag` (`NETLINK_SOCK_DIAG`,
//! `SOCK_DIAG_BY_FAMILY`, `inet_diag_req_v2`), filtered in the kernel by local port.
//!
//! Unlike `ss` from older iproute2, the request asks for every TCP state including
//! `TCP_BOUND_INACTIVE` (13, Linux 6.5), so sockets that are bound but neither listening nor
//! connected (placeholders, connect-ready sockets) are seen too. Works unprivileged.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use portres_core::Protocol;
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType, recv, send};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// The older `inet_diag_req` request for TCP, which dumps both families in one walk of the
/// kernel's hash tables (`inet_diag_dump_compat` sets `AF_UNSPEC`).
const TCPDIAG_GETSOCK: u16 = 18;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const INET_DIAG_REQ_BYTECODE: u16 = 1;
const INET_DIAG_BC_S_GE: u8 = 2;
const INET_DIAG_BC_S_LE: u8 = 3;

/// One socket of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketEntry {
    /// TCP or UDP.
    pub protocol: Protocol,
    /// Kernel state (`TCP_LISTEN` = 10, `TCP_ESTABLISHED` = 1, `TCP_TIME_WAIT` = 6, ...).
    pub state: u8,
    /// Local address and port.
    pub local: SocketAddr,
    /// Remote address and port (unspecified when not connected).
    pub remote: SocketAddr,
    /// Owner uid (the creator's filesystem uid).
    pub uid: u32,
    /// Inode number (0 for TIME_WAIT and request sockets).
    pub inode: u64,
}

impl SocketEntry {
    /// The state in words: `listening`, `connected`, `bound`, `time-wait`, ...
    pub fn state_name(&self) -> &'static str {
        match (self.protocol, self.state) {
            (Protocol::Udp, 1) => "connected",
            (Protocol::Udp, _) => "bound",
            (Protocol::Tcp, 1) => "connected",
            (Protocol::Tcp, 2) => "syn-sent",
            (Protocol::Tcp, 3) => "syn-recv",
            (Protocol::Tcp, 4 | 5 | 8 | 9 | 11) => "closing",
            (Protocol::Tcp, 6) => "time-wait",
            (Protocol::Tcp, 7 | 13) => "bound",
            (Protocol::Tcp, 10) => "listening",
            (Protocol::Tcp, 12) => "syn-recv",
            _ => "unknown",
        }
    }
}

fn push_u16(buf: &mut Vec<u8>, v: u16) {
    buf.extend_from_slice(&v.to_ne_bytes());
}
fn push_u32(buf: &mut Vec<u8>, v: u32) {
    buf.extend_from_slice(&v.to_ne_bytes());
}

/// `idiag_states` for every state, `TCP_BOUND_INACTIVE` included.
pub const ALL_STATES: u32 = u32::MAX;
/// `idiag_states` for listening sockets only (the kernel then walks only its listening hash).
pub const LISTENING: u32 = 1 << 10;

/// `nlmsghdr` (length patched by [`finish`]) and `inet_diag_req_v2` up to its `inet_diag_sockid`.
fn header(family: u8, protocol: Protocol, flags: u16, seq: u32, states: u32) -> Vec<u8> {
    let mut msg = Vec::with_capacity(96);
    push_u32(&mut msg, 0);
    push_u16(&mut msg, SOCK_DIAG_BY_FAMILY);
    push_u16(&mut msg, flags);
    push_u32(&mut msg, seq);
    push_u32(&mut msg, 0);
    msg.push(family);
    msg.push(match protocol {
        Protocol::Tcp => libc::IPPROTO_TCP as u8,
        Protocol::Udp => libc::IPPROTO_UDP as u8,
    });
    msg.push(0);
    msg.push(0);
    push_u32(&mut msg, states);
    msg
}

fn finish(mut msg: Vec<u8>) -> Vec<u8> {
    let len = msg.len() as u32;
    msg[..4].copy_from_slice(&len.to_ne_bytes());
    msg
}

/// The `INET_DIAG_REQ_BYTECODE` attribute for `sport >= first && sport <= last`. Each
/// comparison is an op and a port op of 4 bytes; "no" jumps past the end (reject), "yes" goes
/// to the next comparison.
fn push_port_filter(msg: &mut Vec<u8>, first: u16, last: u16) {
    let ops: [(u8, u8, u16); 4] = [
        (INET_DIAG_BC_S_GE, 8, 20),
        (0, 0, first),
        (INET_DIAG_BC_S_LE, 8, 12),
        (0, 0, last),
    ];
    push_u16(msg, 4 + 16);
    push_u16(msg, INET_DIAG_REQ_BYTECODE);
    for (code, yes, no) in ops {
        msg.push(code);
        msg.push(yes);
        push_u16(msg, no);
    }
}

fn request(
    family: u8,
    protocol: Protocol,
    first: u16,
    last: u16,
    states: u32,
    seq: u32,
) -> Vec<u8> {
    let mut msg = header(family, protocol, NLM_F_REQUEST | NLM_F_DUMP, seq, states);
    // A zeroed inet_diag_sockid: every socket, filtered by the bytecode below.
    msg.extend_from_slice(&[0u8; 48]);
    push_port_filter(&mut msg, first, last);
    finish(msg)
}

/// A `TCPDIAG_GETSOCK` dump request (`inet_diag_req`: family 0, the zeroed sockid, states,
/// `idiag_dbs`) with the same bytecode as [`request`]: IPv4 and IPv6 in one walk.
fn compat_tcp_request(first: u16, last: u16, states: u32, seq: u32) -> Vec<u8> {
    let mut msg = Vec::with_capacity(96);
    push_u32(&mut msg, 0);
    push_u16(&mut msg, TCPDIAG_GETSOCK);
    push_u16(&mut msg, NLM_F_REQUEST | NLM_F_DUMP);
    push_u32(&mut msg, seq);
    push_u32(&mut msg, 0);
    msg.extend_from_slice(&[0u8; 4]);
    msg.extend_from_slice(&[0u8; 48]);
    push_u32(&mut msg, states);
    push_u32(&mut msg, 0);
    push_port_filter(&mut msg, first, last);
    finish(msg)
}

/// The request for the one socket the kernel would pick for a TCP connection from nowhere
/// (`[::]:0`) to `local` (`inet_diag_find_one_icsk`: a hash lookup, not a dump): a listener on
/// `local`, if any. `inet_diag_sockid` holds ports big-endian, then source and destination
/// addresses (16 bytes each), the interface and a cookie (none: ~0).
fn find_request(local: SocketAddr, seq: u32) -> Vec<u8> {
    let family = match local {
        SocketAddr::V4(_) => libc::AF_INET as u8,
        SocketAddr::V6(_) => libc::AF_INET6 as u8,
    };
    let mut msg = header(family, Protocol::Tcp, NLM_F_REQUEST, seq, LISTENING);
    msg.extend_from_slice(&local.port().to_be_bytes());
    msg.extend_from_slice(&[0, 0]);
    let mut src = [0u8; 16];
    match local.ip() {
        IpAddr::V4(a) => src[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => src.copy_from_slice(&a.octets()),
    }
    msg.extend_from_slice(&src);
    msg.extend_from_slice(&[0u8; 16]);
    push_u32(&mut msg, 0);
    push_u32(&mut msg, u32::MAX);
    push_u32(&mut msg, u32::MAX);
    finish(msg)
}

fn addr(family: u8, raw: &[u8], port_be: [u8; 2]) -> SocketAddr {
    let port = u16::from_be_bytes(port_be);
    let ip = if i32::from(family) == libc::AF_INET {
        IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
    } else {
        let mut b = [0u8; 16];
        b.copy_from_slice(&raw[..16]);
        IpAddr::V6(Ipv6Addr::from(b))
    };
    SocketAddr::new(ip, port)
}

/// A netlink socket and receive buffer kept per thread, so a query costs a `sendto` and a
/// `recvfrom` rather than a new socket each time. Replies are matched by sequence number; after
/// any error the socket is dropped (it may hold the rest of a reply) and the next query opens
/// a fresh one, and so does a thread that has entered another network namespace since (a
/// netlink socket answers for the namespace it was made in).
struct Channel {
    fd: std::os::fd::OwnedFd,
    netns: Option<crate::netns::NetNsId>,
    seq: u32,
    buf: Vec<u8>,
}

thread_local! {
    static CHANNEL: std::cell::RefCell<Option<Channel>> = const { std::cell::RefCell::new(None) };
}

/// Sends the request made by `make` (given a sequence number) and reads its replies into `out`
/// until the end of the dump (or the single reply of a lookup, when `single`).
fn query(
    make: impl FnOnce(u32) -> Vec<u8>,
    protocol: Protocol,
    single: bool,
    out: &mut Vec<SocketEntry>,
) -> io::Result<()> {
    CHANNEL.with_borrow_mut(|slot| {
        let here = crate::netns::entered();
        if slot.as_ref().is_some_and(|ch| ch.netns != here) {
            *slot = None;
        }
        if slot.is_none() {
            let fd = rustix::net::socket_with(
                AddressFamily::NETLINK,
                SocketType::RAW,
                SocketFlags::CLOEXEC,
                Some(rustix::net::netlink::SOCK_DIAG),
            )?;
            *slot = Some(Channel {
                fd,
                netns: here,
                seq: 0,
                buf: vec![0u8; 64 * 1024],
            });
        }
        let ch = slot.as_mut().expect("just set");
        ch.seq = ch.seq.wrapping_add(1);
        let res = send(&ch.fd, &make(ch.seq), SendFlags::empty())
            .map_err(io::Error::from)
            .and_then(|_| read_replies(&ch.fd, &mut ch.buf, ch.seq, protocol, single, out));
        // ENOENT is a complete answer (no such socket, or no such family); anything else may
        // leave part of a reply queued.
        if res
            .as_ref()
            .is_err_and(|e| e.raw_os_error() != Some(libc::ENOENT))
        {
            *slot = None;
        }
        res
    })
}

fn dump(
    family: u8,
    protocol: Protocol,
    first: u16,
    last: u16,
    states: u32,
    out: &mut Vec<SocketEntry>,
) -> io::Result<()> {
    query(
        |seq| request(family, protocol, first, last, states, seq),
        protocol,
        false,
        out,
    )
}

fn read_replies(
    fd: &std::os::fd::OwnedFd,
    buf: &mut [u8],
    seq: u32,
    protocol: Protocol,
    single: bool,
    out: &mut Vec<SocketEntry>,
) -> io::Result<()> {
    loop {
        let (n, _) = recv(fd, &mut *buf, RecvFlags::empty())?;
        let mut off = 0;
        while off + 16 <= n {
            let h = &buf[off..];
            let len = u32::from_ne_bytes(h[0..4].try_into().unwrap()) as usize;
            let ty = u16::from_ne_bytes(h[4..6].try_into().unwrap());
            if len < 16 || off + len > n {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "truncated netlink message",
                ));
            }
            if u32::from_ne_bytes(h[8..12].try_into().unwrap()) != seq {
                // Left over from an earlier query.
                off += (len + 3) & !3;
                continue;
            }
            match ty {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {
                    let errno = i32::from_ne_bytes(h[16..20].try_into().unwrap());
                    return if errno == 0 {
                        Ok(())
                    } else {
                        Err(io::Error::from_raw_os_error(-errno))
                    };
                }
                SOCK_DIAG_BY_FAMILY | TCPDIAG_GETSOCK if len >= 16 + 72 => {
                    let m = &h[16..];
                    // inet_diag_msg: family, state, timer, retrans, sockid (48), expires,
                    // rqueue, wqueue, uid, inode.
                    let sid = &m[4..52];
                    out.push(SocketEntry {
                        protocol,
                        state: m[1],
                        local: addr(m[0], &sid[4..20], [sid[0], sid[1]]),
                        remote: addr(m[0], &sid[20..36], [sid[2], sid[3]]),
                        uid: u32::from_ne_bytes(m[64..68].try_into().unwrap()),
                        inode: u64::from(u32::from_ne_bytes(m[68..72].try_into().unwrap())),
                    });
                    if single {
                        return Ok(());
                    }
                }
                _ => {}
            }
            off += (len + 3) & !3;
        }
    }
}

/// Whether this kernel's TCP dumps include sockets that are bound but neither listening nor
/// connected (`TCP_BOUND_INACTIVE`, Linux 6.7): from `uname(2)`'s release, read once.
pub fn dumps_bound_only_sockets() -> bool {
    static YES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *YES.get_or_init(|| {
        let uname = rustix::system::uname();
        let release = uname.release().to_string_lossy();
        let mut parts = release
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|p| p.parse::<u32>().ok());
        let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        (major, minor) >= (6, 7)
    })
}

/// Every socket of `protocol` in this network namespace whose local port is in
/// `first..=last`, IPv4 and IPv6.
pub fn sockets_on_ports(protocol: Protocol, first: u16, last: u16) -> io::Result<Vec<SocketEntry>> {
    sockets_on_ports_of(protocol, first, last, true, true, ALL_STATES)
}

/// Like [`sockets_on_ports`], asking only the families and TCP states wanted (each family is one
/// dump; fewer states mean fewer kernel hash tables walked, e.g. [`LISTENING`]).
pub fn sockets_on_ports_of(
    protocol: Protocol,
    first: u16,
    last: u16,
    v4: bool,
    v6: bool,
    states: u32,
) -> io::Result<Vec<SocketEntry>> {
    let mut out = Vec::new();
    // Every TCP socket of both families: one walk of the kernel's tables instead of two.
    if protocol == Protocol::Tcp && v4 && v6 {
        match query(
            |seq| compat_tcp_request(first, last, states, seq),
            protocol,
            false,
            &mut out,
        ) {
            Ok(()) => return Ok(out),
            // A kernel without the older request: ask per family.
            Err(_) => out.clear(),
        }
    }
    if v4 {
        dump(libc::AF_INET as u8, protocol, first, last, states, &mut out)?;
    }
    if v6 {
        match dump(
            libc::AF_INET6 as u8,
            protocol,
            first,
            last,
            states,
            &mut out,
        ) {
            // No IPv6 in this kernel: nothing to list there.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            other => other?,
        }
    }
    Ok(out)
}

/// The TCP listener on exactly `local` (address and port), found by a hash lookup in the
/// kernel's listening table rather than a dump: what a connection from nowhere to `local` would
/// reach (with `SO_REUSEPORT` groups, one of the group's listeners). `None` when nothing listens
/// there. Sockets bound to a device are not found (the lookup asks for no interface).
pub fn tcp_listener_at(local: SocketAddr) -> io::Result<Option<SocketEntry>> {
    let mut out = Vec::with_capacity(1);
    match query(
        |seq| find_request(local, seq),
        Protocol::Tcp,
        true,
        &mut out,
    ) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
        Ok(()) => Ok(out.pop()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn needs_root_finds_a_listener_and_a_udp_socket_by_port() {
        if crate::testutil::run_as_namespace_root() {
            return;
        }
        // Binds ports, so it runs on a thread in a private network namespace.
        std::thread::spawn(finds_sockets).join().unwrap();
    }

    fn finds_sockets() {
        crate::process::enter_private_net_namespace()
            .expect("needs root (CAP_SYS_ADMIN) for a private network namespace");
        let l = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let ino = crate::hold::inode(l.as_fd()).unwrap();
        let found = sockets_on_ports(Protocol::Tcp, port, port).unwrap();
        let me = found.iter().find(|s| s.inode == ino).expect("our listener");
        assert_eq!((me.state_name(), me.local.port()), ("listening", port));
        assert!(found.iter().all(|s| s.local.port() == port), "{found:?}");

        let u = std::net::UdpSocket::bind("[::]:0").unwrap();
        let uport = u.local_addr().unwrap().port();
        let uino = crate::hold::inode(u.as_fd()).unwrap();
        let found = sockets_on_ports(Protocol::Udp, uport, uport).unwrap();
        assert!(
            found
                .iter()
                .any(|s| s.inode == uino && s.state_name() == "bound"),
            "{found:?}"
        );
    }

    #[test]
    fn needs_root_one_tcp_dump_sees_both_families() {
        if crate::testutil::run_as_namespace_root() {
            return;
        }
        std::thread::spawn(|| {
            crate::process::enter_private_net_namespace()
                .expect("needs root (CAP_SYS_ADMIN) for a private network namespace");
            let v4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = v4.local_addr().unwrap().port();
            let v6 = v6_only_listener(port);
            let found = sockets_on_ports(Protocol::Tcp, port, port).unwrap();
            let mut families: Vec<bool> = found.iter().map(|e| e.local.is_ipv6()).collect();
            families.sort();
            assert_eq!(families, vec![false, true], "{found:?}");
            // The per-family path agrees.
            let v4_only =
                sockets_on_ports_of(Protocol::Tcp, port, port, true, false, ALL_STATES).unwrap();
            assert_eq!(v4_only.len(), 1);
            drop(v6);
        })
        .join()
        .unwrap();
    }

    /// A listener on `[::]:port`, IPv6 only (so it coexists with 127.0.0.1:port).
    fn v6_only_listener(port: u16) -> std::os::fd::OwnedFd {
        use rustix::net::{AddressFamily, SocketType, bind, listen, socket, sockopt};
        let fd = socket(AddressFamily::INET6, SocketType::STREAM, None).unwrap();
        sockopt::set_ipv6_v6only(&fd, true).unwrap();
        let any = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port);
        bind(&fd, &any).unwrap();
        listen(&fd, 8).unwrap();
        fd
    }

    #[test]
    fn needs_root_finds_a_listener_by_lookup() {
        if crate::testutil::run_as_namespace_root() {
            return;
        }
        std::thread::spawn(finds_listener_by_lookup).join().unwrap();
    }

    fn finds_listener_by_lookup() {
        crate::process::enter_private_net_namespace()
            .expect("needs root (CAP_SYS_ADMIN) for a private network namespace");
        for any in ["0.0.0.0:0", "[::]:0", "127.0.0.1:0", "[::ffff:127.0.0.1]:0"] {
            let l = std::net::TcpListener::bind(any).unwrap();
            let local = l.local_addr().unwrap();
            let ino = crate::hold::inode(l.as_fd()).unwrap();
            let found = tcp_listener_at(local).unwrap().expect("our listener");
            assert_eq!((found.inode, found.local), (ino, local));
            // A bound socket that does not listen is not found; nor is a closed one.
            drop(l);
            assert_eq!(tcp_listener_at(local).unwrap(), None, "{any}");
            let family = match local {
                SocketAddr::V4(_) => AddressFamily::INET,
                SocketAddr::V6(_) => AddressFamily::INET6,
            };
            let s = rustix::net::socket(family, SocketType::STREAM, None).unwrap();
            rustix::net::bind(&s, &local).unwrap();
            assert_eq!(tcp_listener_at(local).unwrap(), None, "{any}");
            // The channel is still good after those ENOENTs, and dumps still work beside it.
            rustix::net::listen(&s, 1).unwrap();
            assert!(tcp_listener_at(local).unwrap().is_some());
            let all = sockets_on_ports(Protocol::Tcp, local.port(), local.port()).unwrap();
            assert_eq!(all.len(), 1, "{all:?}");
        }
    }
}
