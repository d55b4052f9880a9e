//! [`PortSet`]: a set of ports as a 65,536-bit bitmap, with the text form of
//! `net.ipv4.ip_local_reserved_ports` (`"1000,2000-2010"`).

use std::fmt;
use std::str::FromStr;

use crate::range::PortRange;

/// A set of port numbers (0-65535).
#[derive(Clone, PartialEq, Eq)]
pub struct PortSet {
    words: Box<[u64; 1024]>,
}

impl Default for PortSet {
    fn default() -> Self {
        PortSet {
            words: Box::new([0; 1024]),
        }
    }
}

impl fmt::Debug for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PortSet({self})")
    }
}

impl PortSet {
    /// The empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `port` is in the set.
    pub fn contains(&self, port: u16) -> bool {
        self.words[usize::from(port) / 64] & (1 << (port % 64)) != 0
    }

    /// Adds one port.
    pub fn insert(&mut self, port: u16) {
        self.words[usize::from(port) / 64] |= 1 << (port % 64);
    }

    /// Adds every port of `r` (a word at a time).
    pub fn insert_range(&mut self, r: PortRange) {
        let (mut p, end) = (u32::from(r.start()), r.end());
        while p < end {
            let (word, bit) = ((p / 64) as usize, p % 64);
            let n = (64 - bit).min(end - p);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            self.words[word] |= mask;
            p += n;
        }
    }

    /// Removes every port of `r`.
    pub fn remove_range(&mut self, r: PortRange) {
        for p in r.ports() {
            self.words[usize::from(p) / 64] &= !(1 << (p % 64));
        }
    }

    /// `self ∪ other`.
    pub fn union(&self, other: &PortSet) -> PortSet {
        let mut out = self.clone();
        for (a, b) in out.words.iter_mut().zip(other.words.iter()) {
            *a |= b;
        }
        out
    }

    /// `self \ other`.
    pub fn difference(&self, other: &PortSet) -> PortSet {
        let mut out = self.clone();
        for (a, b) in out.words.iter_mut().zip(other.words.iter()) {
            *a &= !b;
        }
        out
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// Number of ports in the set.
    pub fn len(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Maximal runs of consecutive ports, in order. Skips empty and full 64-port words whole,
    /// so a sparse set costs about 1,024 word reads.
    pub fn runs(&self) -> Vec<(u16, u16)> {
        let mut out = Vec::new();
        let mut start: Option<u32> = None;
        for (i, &w) in self.words.iter().enumerate() {
            let base = (i as u32) * 64;
            match (w, start) {
                (0, None) | (u64::MAX, Some(_)) => continue,
                (0, Some(s)) => {
                    out.push((s as u16, (base - 1) as u16));
                    start = None;
                    continue;
                }
                _ => {}
            }
            for bit in 0..64u32 {
                let present = w & (1 << bit) != 0;
                match (present, start) {
                    (true, None) => start = Some(base + bit),
                    (false, Some(s)) => {
                        out.push((s as u16, (base + bit - 1) as u16));
                        start = None;
                    }
                    _ => {}
                }
            }
        }
        if let Some(s) = start {
            out.push((s as u16, 65535));
        }
        out
    }
}

impl fmt::Display for PortSet {
    /// The kernel's format: comma-separated ports and `first-last` runs, empty for none.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (a, b)) in self.runs().into_iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if a == b {
                write!(f, "{a}")?;
            } else {
                write!(f, "{a}-{b}")?;
            }
        }
        Ok(())
    }
}

impl FromStr for PortSet {
    type Err = String;
    /// Parses the kernel's format (whitespace around entries is ignored; empty is the empty set).
    fn from_str(s: &str) -> Result<Self, String> {
        let mut set = PortSet::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let parse = |x: &str| {
                x.trim()
                    .parse::<u16>()
                    .map_err(|_| format!("{item:?} is not a port or a range of ports"))
            };
            let (a, b) = match item.split_once('-') {
                Some((a, b)) => (parse(a)?, parse(b)?),
                None => (parse(item)?, parse(item)?),
            };
            if b < a {
                return Err(format!("{item:?} is an empty range"));
            }
            if a == 0 {
                set.insert(0);
            }
            if b >= 1 {
                set.insert_range(PortRange::inclusive(a.max(1), b).expect("1 <= a <= b"));
            }
        }
        Ok(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_text_round_trips_and_normalises() {
        let s: PortSet = "30000,20000-20010,20005-20020,20021".parse().unwrap();
        assert_eq!(s.to_string(), "20000-20021,30000");
        assert_eq!(s.len(), 23);
        assert_eq!("".parse::<PortSet>().unwrap().to_string(), "");
        assert_eq!("0-65535".parse::<PortSet>().unwrap().len(), 65536);
        assert_eq!("0".parse::<PortSet>().unwrap().to_string(), "0");
        assert_eq!("0-65535".parse::<PortSet>().unwrap().to_string(), "0-65535");
        assert_eq!(
            "63-129,65535".parse::<PortSet>().unwrap().to_string(),
            "63-129,65535"
        );
        assert_eq!("64-127".parse::<PortSet>().unwrap().runs(), vec![(64, 127)]);
        assert!("70000".parse::<PortSet>().is_err());
        let a: PortSet = "1-10".parse().unwrap();
        let b: PortSet = "5-20".parse().unwrap();
        assert_eq!(a.union(&b).to_string(), "1-20");
        assert_eq!(a.difference(&b).to_string(), "1-4");
        let mut c = PortSet::new();
        c.insert_range(PortRange::new(65530, 6).unwrap());
        assert_eq!(c.to_string(), "65530-65535");
        c.remove_range(PortRange::new(65531, 2).unwrap());
        assert_eq!(c.to_string(), "65530,65533-65535");
    }
}
