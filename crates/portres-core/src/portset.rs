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

    /// Adds every port of `r`.
    pub fn insert_range(&mut self, r: PortRange) {
        r.ports().for_each(|p| self.insert(p));
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

    /// Maximal runs of consecutive ports, in order.
    pub fn runs(&self) -> Vec<(u16, u16)> {
        let mut out = Vec::new();
        let mut start: Option<u32> = None;
        for p in 0..=65536u32 {
            let present = p < 65536 && self.contains(p as u16);
            match (present, start) {
                (true, None) => start = Some(p),
                (false, Some(s)) => {
                    out.push((s as u16, (p - 1) as u16));
                    start = None;
                }
                _ => {}
            }
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
            for p in a..=b {
                set.insert(p);
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
