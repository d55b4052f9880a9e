//! The free-space index of the dynamic range, for wildcard acquires in O(log n).
//!
//! Free ports of the dynamic range are kept as maximal gaps, indexed twice: by start (to split and
//! merge on reserve/release) and by (length, start) (to find the smallest gap that fits, best-fit,
//! which keeps large gaps whole for large requests).

use std::collections::{BTreeMap, BTreeSet};

use crate::range::PortRange;

/// Free gaps `[start, start + len)` of one protocol's dynamic range.
#[derive(Debug, Clone)]
pub struct FreeGaps {
    lo: u32,
    hi: u32, // exclusive
    by_start: BTreeMap<u32, u32>,
    by_len: BTreeSet<(u32, u32)>,
}

impl FreeGaps {
    /// All of `range` free.
    pub fn new(range: PortRange) -> Self {
        let mut g = FreeGaps {
            lo: u32::from(range.start()),
            hi: range.end(),
            by_start: BTreeMap::new(),
            by_len: BTreeSet::new(),
        };
        g.insert(g.lo, g.hi - g.lo);
        g
    }

    fn insert(&mut self, start: u32, len: u32) {
        if len > 0 {
            self.by_start.insert(start, len);
            self.by_len.insert((len, start));
        }
    }

    fn remove(&mut self, start: u32) -> u32 {
        let len = self.by_start.remove(&start).expect("gap exists");
        self.by_len.remove(&(len, start));
        len
    }

    fn clip(&self, r: PortRange) -> Option<(u32, u32)> {
        let s = u32::from(r.start()).max(self.lo);
        let e = r.end().min(self.hi);
        (s < e).then_some((s, e))
    }

    /// Marks `r` as taken. The part of `r` inside the dynamic range must be free.
    pub fn take(&mut self, r: PortRange) {
        let Some((s, e)) = self.clip(r) else { return };
        let (&gs, &gl) = self
            .by_start
            .range(..=s)
            .next_back()
            .expect("taken block lies in a free gap");
        debug_assert!(gs + gl >= e, "taken block lies in one free gap");
        self.remove(gs);
        self.insert(gs, s - gs);
        self.insert(e, gs + gl - e);
    }

    /// Marks `r` as free again, merging it with its neighbours.
    pub fn give_back(&mut self, r: PortRange) {
        let Some((mut s, mut e)) = self.clip(r) else {
            return;
        };
        if let Some((&ps, &pl)) = self.by_start.range(..s).next_back()
            && ps + pl == s
        {
            self.remove(ps);
            s = ps;
        }
        if let Some(&nl) = self.by_start.get(&e) {
            self.remove(e);
            e += nl;
        }
        self.insert(s, e - s);
    }

    /// Candidate starts for a block of `count` ports: best-fit gaps first (smallest that fits,
    /// then lowest), each yielding its first port. `skip_to` lets the caller move past a port
    /// found in use inside a gap.
    pub fn candidates(&self, count: u16) -> impl Iterator<Item = (u16, u32)> + '_ {
        self.by_len
            .range((u32::from(count), 0)..)
            .map(|&(len, start)| (start as u16, len))
    }

    /// Number of free ports in the dynamic range.
    pub fn free_ports(&self) -> u32 {
        self.by_start.values().sum()
    }

    /// Number of gaps (for tests and benchmarks).
    pub fn gap_count(&self) -> usize {
        self.by_start.len()
    }

    /// The dynamic range this index covers.
    pub fn range(&self) -> PortRange {
        PortRange::new(self.lo, self.hi - self.lo).expect("valid by construction")
    }
}

impl FreeGaps {
    /// Length of the largest free gap.
    pub fn largest(&self) -> u32 {
        self.by_len.last().map_or(0, |&(len, _)| len)
    }
}
