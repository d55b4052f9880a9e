//! `net.ipv4.ip_local_reserved_ports`: the ports the kernel never hands out automatically
//! (bind(0), connect() autobind) in this network namespace, for TCP, UDP, IPv4 and IPv6.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use portres_core::PortSet;

const PATH: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// The sysctl file, opened once (in the opener's network namespace) and read and written at
/// offset 0 with `pread(2)`/`pwrite(2)`.
#[derive(Debug)]
pub struct ReservedPorts {
    file: File,
    buf: Vec<u8>,
}

impl ReservedPorts {
    /// Opens the file for reading and, when `write` is set, writing (needs CAP_NET_ADMIN).
    pub fn open(write: bool) -> io::Result<ReservedPorts> {
        Ok(ReservedPorts {
            file: File::options().read(true).write(write).open(PATH)?,
            buf: vec![0u8; 8 * 1024],
        })
    }

    /// Reads the set. It must come in one read at offset 0: a read at a non-zero offset returns
    /// end-of-file, so a short buffer would silently truncate the list. The kernel allocates
    /// (and zeroes) a buffer as large as the one asked for, so the read starts small and is
    /// repeated with a larger buffer only when the text filled it (at most ~190 KB: every other
    /// port).
    pub fn read(&mut self) -> io::Result<PortSet> {
        let n = loop {
            let n = self.file.read_at(&mut self.buf, 0)?;
            if n < self.buf.len() || self.buf.len() >= 1 << 20 {
                break n;
            }
            let bigger = self.buf.len() * 4;
            self.buf.resize(bigger, 0);
        };
        let text = String::from_utf8_lossy(&self.buf[..n]);
        text.trim()
            .parse()
            .map_err(|e: String| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Replaces the set. The kernel consumes at most about 4 KiB per write and ORs writes at a
    /// non-zero offset into the set, so the text goes at offset 0 and short writes continue at
    /// their offset. An empty set is written as `"\n"` (an empty write changes nothing).
    pub fn write(&mut self, set: &PortSet) -> io::Result<()> {
        let mut text = set.to_string();
        text.push('\n');
        let bytes = text.as_bytes();
        let mut off = 0;
        while off < bytes.len() {
            match self.file.write_at(&bytes[off..], off as u64) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => off += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Reads the set once (see [`ReservedPorts::read`]).
pub fn read() -> io::Result<PortSet> {
    ReservedPorts::open(false)?.read()
}
