//! Which blocks a delta holds: disjoint, coalesced `[start, end)` ranges of
//! block numbers. A delta's set is rebuilt from its file's allocated extents
//! when it is opened, so it is never stored and cannot disagree with the
//! data.

use std::collections::BTreeMap;

#[derive(Debug, Default, Clone, PartialEq)]
pub struct BlockSet {
    /// start -> end, disjoint and never touching (touching ranges merge).
    ranges: BTreeMap<u64, u64>,
}

impl BlockSet {
    /// Whether block `b` is in the set, and the first block after `b`
    /// (up to `limit`) where that answer may change.
    pub fn run_at(&self, b: u64, limit: u64) -> (bool, u64) {
        if let Some((_, &end)) = self.ranges.range(..=b).next_back() {
            if end > b {
                return (true, end.min(limit));
            }
        }
        let next = self
            .ranges
            .range(b + 1..)
            .next()
            .map_or(limit, |(&s, _)| s.min(limit));
        (false, next)
    }

    pub fn contains(&self, b: u64) -> bool {
        self.run_at(b, b + 1).0
    }

    /// Adds `[start, end)`, merging with what it overlaps or touches.
    pub fn insert(&mut self, mut start: u64, mut end: u64) {
        if start >= end {
            return;
        }
        if let Some((&s, &e)) = self.ranges.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
            }
        }
        let absorbed: Vec<(u64, u64)> = self
            .ranges
            .range(start..=end)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in absorbed {
            self.ranges.remove(&s);
            end = end.max(e);
        }
        self.ranges.insert(start, end);
    }

    /// Blocks in the set.
    pub fn len(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| e - s).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().map(|(&s, &e)| (s, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inserts_merge_and_runs_answer_to_the_next_change() {
        let mut s = BlockSet::default();
        s.insert(10, 20);
        s.insert(30, 40);
        assert_eq!(s.run_at(0, 100), (false, 10));
        assert_eq!(s.run_at(15, 100), (true, 20));
        assert_eq!(s.run_at(20, 100), (false, 30));
        assert_eq!(s.run_at(45, 100), (false, 100));
        assert_eq!(s.run_at(35, 38), (true, 38));
        s.insert(20, 30); // touches both: one range
        assert_eq!(s.ranges().collect::<Vec<_>>(), vec![(10, 40)]);
        s.insert(5, 12);
        s.insert(39, 50);
        s.insert(60, 61);
        assert_eq!(s.ranges().collect::<Vec<_>>(), vec![(5, 50), (60, 61)]);
        assert_eq!(s.len(), 46);
        s.insert(0, 100);
        assert_eq!(s.ranges().collect::<Vec<_>>(), vec![(0, 100)]);
        assert!(s.contains(99) && !s.contains(100));
    }
}
