//! Protocols, port ranges, tokens and modes: small values whose invariants live in their types.

use std::fmt;
use std::num::NonZeroU64;
use std::str::FromStr;

/// The transport a reservation is for. TCP and UDP port spaces are independent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// TCP (and MPTCP, which shares its port table).
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// Both protocols, in display order.
    pub const ALL: [Protocol; 2] = [Protocol::Tcp, Protocol::Udp];

    /// `"tcp"` or `"udp"`, as on the wire, in JSON and in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }

    /// Index into per-protocol arrays.
    pub fn index(self) -> usize {
        match self {
            Protocol::Tcp => 0,
            Protocol::Udp => 1,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tcp" | "TCP" => Ok(Protocol::Tcp),
            "udp" | "UDP" => Ok(Protocol::Udp),
            other => Err(format!(
                "unknown protocol {other:?} (expected \"tcp\" or \"udp\")"
            )),
        }
    }
}

/// A non-empty block of ports `[start, start + count)` inside `1..=65535`.
///
/// Port 0 is never part of a range: it means "any port" to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    start: u16,
    count: u16,
}

/// Why numbers do not make a [`PortRange`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRange {
    /// The count was zero.
    #[error("the count is 0; a reservation holds at least one port")]
    ZeroCount,
    /// The start was port 0.
    #[error("the start port is 0, which is not a port")]
    ZeroStart,
    /// The block runs past port 65535.
    #[error("ports {start}..{start}+{count} run past port 65535")]
    PastEnd {
        /// Requested first port.
        start: u32,
        /// Requested count.
        count: u32,
    },
}

impl PortRange {
    /// Checks `start > 0`, `count > 0` and `start + count - 1 <= 65535`.
    pub fn new(start: u32, count: u32) -> Result<Self, InvalidRange> {
        if count == 0 {
            return Err(InvalidRange::ZeroCount);
        }
        if start == 0 {
            return Err(InvalidRange::ZeroStart);
        }
        let past_end = InvalidRange::PastEnd { start, count };
        if u64::from(start) + u64::from(count) - 1 > 65535 {
            return Err(past_end);
        }
        // Both fit: start >= 1 and start + count - 1 <= 65535.
        match (u16::try_from(start), u16::try_from(count)) {
            (Ok(start), Ok(count)) => Ok(PortRange { start, count }),
            _ => Err(past_end),
        }
    }

    /// The inclusive range `first..=last`.
    pub fn inclusive(first: u16, last: u16) -> Result<Self, InvalidRange> {
        if last < first {
            return Err(InvalidRange::ZeroCount);
        }
        Self::new(u32::from(first), u32::from(last) - u32::from(first) + 1)
    }

    /// First port of the block.
    pub fn start(self) -> u16 {
        self.start
    }

    /// Number of ports in the block.
    pub fn count(self) -> u16 {
        self.count
    }

    /// The block as aligned power-of-two pieces, each `(first port, fixed high bits)`: the port
    /// prefixes a longest-prefix-match table needs to cover exactly this block (the deny
    /// layer's map). At most 30 pieces for any block (two per bit length but the longest), so a
    /// block costs the kernel the same few entries whatever its size.
    pub fn prefixes(self) -> Vec<(u16, u8)> {
        let mut out = Vec::new();
        let mut at = u32::from(self.start);
        let end = self.end();
        while at < end {
            // The largest aligned piece starting at `at` that stays inside the block.
            let mut size = 1u32 << at.trailing_zeros().min(16);
            while at + size > end {
                size >>= 1;
            }
            out.push((at as u16, 16 - size.trailing_zeros() as u8));
            at += size;
        }
        out
    }

    /// Last port of the block (inclusive).
    pub fn last(self) -> u16 {
        (u32::from(self.start) + u32::from(self.count) - 1) as u16
    }

    /// One past the last port, as a `u32` (can be 65536).
    pub fn end(self) -> u32 {
        u32::from(self.start) + u32::from(self.count)
    }

    /// Whether `port` is in the block.
    pub fn contains(self, port: u16) -> bool {
        port >= self.start && port <= self.last()
    }

    /// Whether the two blocks share a port.
    pub fn overlaps(self, other: PortRange) -> bool {
        self.start <= other.last() && other.start <= self.last()
    }

    /// The ports, in order.
    pub fn ports(self) -> impl Iterator<Item = u16> {
        self.start..=self.last()
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.count == 1 {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.last())
        }
    }
}

impl FromStr for PortRange {
    type Err = String;
    /// Parses `"P"` or `"FIRST-LAST"` (the format of `ip_local_port_range` with a dash).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parse = |p: &str| {
            p.trim()
                .parse::<u16>()
                .map_err(|_| format!("{p:?} is not a port number (1-65535)"))
        };
        let (first, last) = match s.split_once(['-', ' ', '\t']) {
            Some((a, b)) => (parse(a)?, parse(b)?),
            None => {
                let p = parse(s)?;
                (p, p)
            }
        };
        PortRange::inclusive(first, last).map_err(|e| format!("{s:?}: {e}"))
    }
}

/// The opaque, unguessable, non-zero 64-bit name of a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Token(NonZeroU64);

impl Token {
    /// `None` for 0, which means "invalid token" (`INVALID_PORT_RESERVATION_TOKEN`).
    pub fn new(value: u64) -> Option<Token> {
        NonZeroU64::new(value).map(Token)
    }

    /// The number.
    pub fn get(self) -> u64 {
        self.0.get()
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// How the kernel is asked to keep a block (docs/behaviour.md §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Only sockets handed out by portres may use the block.
    Hold,
    /// The kernel never hands the ports out automatically; a program told its port binds it.
    Exclude,
}

impl Mode {
    /// `"hold"` or `"exclude"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Hold => "hold",
            Mode::Exclude => "exclude",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "hold" => Ok(Mode::Hold),
            "exclude" => Ok(Mode::Exclude),
            other => Err(format!(
                "unknown mode {other:?} (expected \"hold\" or \"exclude\")"
            )),
        }
    }
}
