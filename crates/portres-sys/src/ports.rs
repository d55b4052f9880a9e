//! The kernel's dynamic port range, and whether ports are bound right now.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};

use portres_core::{PortRange, Protocol};
use rustix::net::{AddressFamily, SocketFlags, SocketType, bind, socket_with, sockopt};

/// Reads `/proc/sys/net/ipv4/ip_local_port_range` (this network namespace's ephemeral range,
/// which applies to TCP, UDP, IPv4 and IPv6).
pub fn ip_local_port_range() -> io::Result<PortRange> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")?;
    text.trim()
        .parse()
        .map_err(|e: String| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn sock_type(protocol: Protocol) -> SocketType {
    match protocol {
        Protocol::Tcp => SocketType::STREAM,
        Protocol::Udp => SocketType::DGRAM,
    }
}

/// Whether `port` is bound by some socket, found by trying to bind it: `socket(AF_INET6)` with
/// `IPV6_V6ONLY=0` and no reuse flags, `bind([::]:port)`, then close. That bind conflicts with
/// every other bind of the port on any address and family (and with TIME_WAIT leftovers), so
/// `EADDRINUSE` means "in use". When IPv6 is unavailable, `0.0.0.0` is tried instead.
/// Other errors (e.g. `EACCES` for a port below 1024 without privilege) mean "unknown" and are
/// reported as not in use.
pub fn port_in_use(protocol: Protocol, port: u16) -> bool {
    let flags = SocketFlags::CLOEXEC;
    let result = match socket_with(AddressFamily::INET6, sock_type(protocol), flags, None) {
        Ok(fd) => sockopt::set_ipv6_v6only(&fd, false)
            .and_then(|()| bind(&fd, &SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0))),
        Err(_) => socket_with(AddressFamily::INET, sock_type(protocol), flags, None)
            .and_then(|fd| bind(&fd, &SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))),
    };
    result == Err(rustix::io::Errno::ADDRINUSE)
}

/// The first port of `range` that [`port_in_use`] finds bound.
pub fn first_port_in_use(protocol: Protocol, range: PortRange) -> Option<u16> {
    range.ports().find(|&p| port_in_use(protocol, p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_dynamic_range() {
        let r = ip_local_port_range().unwrap();
        assert!(r.count() > 0);
    }
}
