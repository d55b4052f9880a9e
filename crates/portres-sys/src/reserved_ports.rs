//! `net.ipv4.ip_local_reserved_ports`: the ports the kernel never hands out automatically
//! (bind(0), connect() autobind) in this network namespace, for TCP, UDP, IPv4 and IPv6.

use std::fs::File;
use std::io::{self, Read, Write};

use portres_core::PortSet;

const PATH: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// Reads the set. The file must be read in one `read(2)`: a read at a non-zero offset returns
/// end-of-file, so a short buffer would silently truncate the list.
pub fn read() -> io::Result<PortSet> {
    let mut f = File::open(PATH)?;
    let mut buf = vec![0u8; 512 * 1024];
    let n = f.read(&mut buf)?;
    let text = String::from_utf8_lossy(&buf[..n]);
    text.trim()
        .parse()
        .map_err(|e: String| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Replaces the set (needs CAP_NET_ADMIN over the namespace). The whole text goes through one
/// open file description: the kernel consumes at most about 4 KiB per `write(2)` and ORs later
/// writes at a non-zero offset into the set, so looping on short writes completes it. An empty
/// set is written as `"\n"` (an empty write changes nothing).
pub fn write(set: &PortSet) -> io::Result<()> {
    let mut text = set.to_string();
    text.push('\n');
    let mut f = File::options().write(true).open(PATH)?;
    f.write_all(text.as_bytes())
}
