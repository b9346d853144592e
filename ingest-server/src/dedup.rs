//! Exact-membership deduplication of outbox seq ranges.
//!
//! # Invariants
//! - A reading is identified for deduplication by `(client_id, epoch, seq)`;
//!   the ingest server remembers *exactly* which of those it stored, as
//!   disjoint, non-adjacent inclusive intervals per `(client_id, epoch)`.
//!   There is no high-water mark anywhere: a batch whose first delivery
//!   arrives after a later batch of the same client is not covered by
//!   anything and is stored.
//! - `DedupState::claimed` ⊇ `DedupState::stored`: a range is *claimed*
//!   when a pending or in-flight insert will store it and *stored* once that
//!   insert succeeded. Claims stop a second copy from being inserted while the
//!   first is still in flight; a claim is released if its insert fails
//!   permanently (its messages then go to the dead-letter table).
//! - What the server acks on `<prefix>/ack/<client_id>` is always computed
//!   against `stored`, so an ack never names a seq that is not in ClickHouse.
//!
//! Everything here is plain data, tested without a runtime.

use std::collections::HashMap;

/// A set of `u64`s kept as disjoint, non-adjacent inclusive intervals: a
/// thin face over `rangemap::RangeInclusiveSet` (which coalesces adjacent
/// ranges) with the operations the dedup state needs. The crate replaced a
/// hand-written `BTreeMap` set: on the hot path (which seqs of a batch are
/// new, insert them, which are stored) it measured 178 ns per delivery
/// against 245 ns (`cargo run --release -p ingest-server --example
/// interval_sets`, 2.2M deliveries over 10,000 streams, 2-core machine).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IntervalSet {
    runs: rangemap::RangeInclusiveSet<u64>,
}

impl IntervalSet {
    /// An empty set.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of disjoint intervals (memory use is proportional to it).
    #[must_use]
    pub fn intervals(&self) -> usize {
        self.runs.len()
    }

    /// The intervals, in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.runs.iter().map(|r| (*r.start(), *r.end()))
    }

    /// Whether every value of `lo..=hi` is in the set.
    #[must_use]
    pub fn covers(&self, lo: u64, hi: u64) -> bool {
        self.runs.get(&lo).is_some_and(|r| *r.end() >= hi)
    }

    /// The parts of `lo..=hi` that are *not* in the set, in order.
    #[must_use]
    pub fn uncovered(&self, lo: u64, hi: u64) -> Vec<(u64, u64)> {
        debug_assert!(lo <= hi);
        self.runs.gaps(&(lo..=hi)).map(|g| (*g.start(), *g.end())).collect()
    }

    /// The parts of `lo..=hi` that *are* in the set, in order.
    #[must_use]
    pub fn intersection(&self, lo: u64, hi: u64) -> Vec<(u64, u64)> {
        self.runs.overlapping(lo..=hi).map(|r| ((*r.start()).max(lo), (*r.end()).min(hi))).collect()
    }

    /// Adds `lo..=hi`, merging with overlapping and adjacent intervals.
    pub fn insert(&mut self, lo: u64, hi: u64) {
        debug_assert!(lo <= hi);
        self.runs.insert(lo..=hi);
    }

    /// Removes `lo..=hi`, splitting intervals as needed.
    pub fn remove(&mut self, lo: u64, hi: u64) {
        debug_assert!(lo <= hi);
        self.runs.remove(lo..=hi);
    }
}

/// Key of one outbox incarnation: `(client_id, epoch)`.
pub type StreamKey = (String, u64);

/// What the server stored and what its pending inserts are about to store.
///
/// # Horizon
/// The state is bounded in time: streams unused for the dedup horizon are
/// forgotten ([`DedupState::evict_idle`]), and only ranges stored within it
/// are loaded at start. A replay older than that is inserted again; the raw
/// table's identity `(client_id, sensor, ts)` still counts it once, and the
/// rollup refolds its minutes from deduplicated rows.
#[derive(Debug, Default)]
pub struct DedupState {
    claimed: HashMap<StreamKey, IntervalSet>,
    stored: HashMap<StreamKey, IntervalSet>,
    /// Last use of each stream, in the caller's clock (seconds).
    used: HashMap<StreamKey, u64>,
}

impl DedupState {
    /// An empty state.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a range loaded from the stored-ranges table at start.
    pub fn load_stored(&mut self, client_id: &str, epoch: u64, lo: u64, hi: u64) {
        let key = (client_id.to_owned(), epoch);
        self.claimed.entry(key.clone()).or_default().insert(lo, hi);
        self.stored.entry(key).or_default().insert(lo, hi);
    }

    /// Claims the parts of `lo..=hi` nobody has stored or claimed yet and
    /// returns them (empty: the whole range is a duplicate).
    pub fn claim(&mut self, client_id: &str, epoch: u64, lo: u64, hi: u64) -> Vec<(u64, u64)> {
        let set = self.claimed.entry((client_id.to_owned(), epoch)).or_default();
        let fresh = set.uncovered(lo, hi);
        for &(a, b) in &fresh {
            set.insert(a, b);
        }
        fresh
    }

    /// Releases claims whose insert failed permanently.
    pub fn release(&mut self, client_id: &str, epoch: u64, lo: u64, hi: u64) {
        if let Some(set) = self.claimed.get_mut(&(client_id.to_owned(), epoch)) {
            set.remove(lo, hi);
            // Anything stored stays claimed.
            if let Some(stored) = self.stored.get(&(client_id.to_owned(), epoch)) {
                for (a, b) in stored.intersection(lo, hi) {
                    set.insert(a, b);
                }
            }
        }
    }

    /// Marks a range as stored (its insert succeeded).
    pub fn mark_stored(&mut self, client_id: &str, epoch: u64, lo: u64, hi: u64) {
        let key = (client_id.to_owned(), epoch);
        self.claimed.entry(key.clone()).or_default().insert(lo, hi);
        self.stored.entry(key).or_default().insert(lo, hi);
    }

    /// The parts of `lo..=hi` that are stored: what an ack may name.
    #[must_use]
    pub fn stored_within(&self, client_id: &str, epoch: u64, lo: u64, hi: u64) -> Vec<(u64, u64)> {
        self.stored.get(&(client_id.to_owned(), epoch)).map(|s| s.intersection(lo, hi)).unwrap_or_default()
    }

    /// Notes that a stream was used at `now_s` (a claim or a load).
    pub fn touch(&mut self, client_id: &str, epoch: u64, now_s: u64) {
        self.used.insert((client_id.to_owned(), epoch), now_s);
    }

    /// Forgets the streams last used more than `horizon_s` before `now_s`
    /// that have no claim beyond what is stored (no insert in flight).
    /// Returns how many were forgotten.
    pub fn evict_idle(&mut self, now_s: u64, horizon_s: u64) -> usize {
        let idle: Vec<StreamKey> = self
            .claimed
            .keys()
            .filter(|k| self.used.get(*k).is_none_or(|&t| now_s.saturating_sub(t) > horizon_s))
            .filter(|k| self.claimed.get(*k) == self.stored.get(*k))
            .cloned()
            .collect();
        for k in &idle {
            self.claimed.remove(k);
            self.stored.remove(k);
            self.used.remove(k);
        }
        idle.len()
    }

    /// Number of `(client_id, epoch)` streams and of stored intervals.
    #[must_use]
    pub fn size(&self) -> (usize, usize) {
        (self.stored.len(), self.stored.values().map(IntervalSet::intervals).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(runs: &[(u64, u64)]) -> IntervalSet {
        let mut s = IntervalSet::new();
        for &(a, b) in runs {
            s.insert(a, b);
        }
        s
    }

    #[test]
    fn idle_streams_are_forgotten_after_the_horizon_but_not_with_a_claim_in_flight() {
        let mut d = DedupState::new();
        d.mark_stored("a", 1, 1, 10);
        d.touch("a", 1, 100);
        assert_eq!(d.claim("b", 1, 1, 10), vec![(1, 10)]);
        d.touch("b", 1, 100);
        assert_eq!(d.evict_idle(150, 60), 0, "both used within the horizon");
        assert_eq!(d.evict_idle(200, 60), 1, "a is idle; b has an insert in flight");
        assert_eq!(d.claim("a", 1, 1, 10), vec![(1, 10)], "a forgotten: a replay is inserted again");
        assert_eq!(d.claim("b", 1, 1, 10), vec![], "b's claim still holds");
    }

    #[test]
    fn adjacent_and_overlapping_inserts_merge_into_one_interval() {
        let s = set(&[(1, 10), (11, 20), (15, 30), (40, 50), (31, 39)]);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![(1, 50)]);
    }

    #[test]
    fn disjoint_inserts_stay_apart_in_order() {
        let s = set(&[(100, 200), (1, 10), (50, 60)]);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![(1, 10), (50, 60), (100, 200)]);
    }

    #[test]
    fn an_insert_spanning_several_intervals_swallows_them() {
        let s = set(&[(1, 2), (5, 6), (9, 10), (0, 20)]);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![(0, 20)]);
    }

    #[test]
    fn uncovered_returns_the_gaps_exactly() {
        let s = set(&[(10, 19), (30, 39)]);
        assert_eq!(s.uncovered(0, 50), vec![(0, 9), (20, 29), (40, 50)]);
        assert_eq!(s.uncovered(10, 19), vec![]);
        assert_eq!(s.uncovered(15, 35), vec![(20, 29)]);
        assert_eq!(s.uncovered(20, 29), vec![(20, 29)]);
        assert_eq!(s.uncovered(39, 40), vec![(40, 40)]);
    }

    #[test]
    fn a_later_batch_does_not_cover_an_earlier_missing_one() {
        // No high-water mark: storing 2001..=3000 says nothing about 1001..=2000.
        let s = set(&[(1, 1000), (2001, 3000)]);
        assert!(!s.covers(1001, 2000));
        assert_eq!(s.uncovered(1001, 2000), vec![(1001, 2000)]);
        assert!(s.covers(2001, 3000));
        assert!(s.covers(1, 1000));
        assert!(!s.covers(1, 3000));
    }

    #[test]
    fn intersection_is_the_complement_of_uncovered() {
        let s = set(&[(10, 19), (30, 39)]);
        assert_eq!(s.intersection(0, 50), vec![(10, 19), (30, 39)]);
        assert_eq!(s.intersection(15, 32), vec![(15, 19), (30, 32)]);
        assert_eq!(s.intersection(20, 29), vec![]);
    }

    #[test]
    fn remove_splits_intervals() {
        let mut s = set(&[(1, 100)]);
        s.remove(10, 19);
        s.remove(50, 200);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![(1, 9), (20, 49)]);
        s.remove(0, 5);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![(6, 9), (20, 49)]);
    }

    #[test]
    fn extremes_of_u64_do_not_overflow() {
        let mut s = set(&[(u64::MAX - 5, u64::MAX)]);
        assert!(s.covers(u64::MAX, u64::MAX));
        assert_eq!(s.uncovered(u64::MAX - 10, u64::MAX), vec![(u64::MAX - 10, u64::MAX - 6)]);
        s.insert(0, 0);
        s.remove(u64::MAX, u64::MAX);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![(0, 0), (u64::MAX - 5, u64::MAX - 1)]);
    }

    #[test]
    fn a_second_claim_of_the_same_range_is_a_duplicate() {
        let mut d = DedupState::new();
        assert_eq!(d.claim("a", 1, 1, 100), vec![(1, 100)]);
        assert_eq!(d.claim("a", 1, 1, 100), vec![]);
        assert_eq!(d.claim("a", 1, 50, 150), vec![(101, 150)]);
        // Another epoch or client is another stream.
        assert_eq!(d.claim("a", 2, 1, 100), vec![(1, 100)]);
        assert_eq!(d.claim("b", 1, 1, 100), vec![(1, 100)]);
    }

    #[test]
    fn acks_name_only_stored_ranges_not_claimed_ones() {
        let mut d = DedupState::new();
        let _ = d.claim("a", 1, 1, 100);
        assert_eq!(d.stored_within("a", 1, 1, 100), vec![]);
        d.mark_stored("a", 1, 1, 60);
        assert_eq!(d.stored_within("a", 1, 1, 100), vec![(1, 60)]);
    }

    #[test]
    fn a_released_claim_can_be_claimed_again_but_stored_parts_cannot() {
        let mut d = DedupState::new();
        d.load_stored("a", 1, 1, 10);
        assert_eq!(d.claim("a", 1, 1, 20), vec![(11, 20)]);
        d.release("a", 1, 1, 20);
        assert_eq!(d.claim("a", 1, 1, 20), vec![(11, 20)]);
        assert_eq!(d.size(), (1, 1));
    }
}
