//! The in-flight window: batches published and not yet confirmed. Pure
//! state, no I/O, so its rules are unit-tested without a broker.
//!
//! Confirmations name exact seq ranges. A confirmation removes the batches
//! it is made of (one, or several adjacent ones merged), whatever order
//! batches were published or confirmed in, and only those batches' rows are
//! deleted (a range that is not exactly such a run of batches in flight
//! deletes nothing);
//! a batch only partly covered (re-cut after a restart) stays until it times
//! out and is published again, which is safe: duplicates are removed by
//! identity downstream, while a missed batch would be a loss.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// One published batch.
#[derive(Debug, Clone)]
pub struct Inflight {
    /// Last seq (the key is the first).
    pub last_seq: u64,
    /// Readings in the batch.
    pub readings: u64,
    /// The encoded payload, kept for republishing.
    pub payload: Vec<u8>,
    /// Last (re)publication.
    pub sent_at: Instant,
    /// Publications so far.
    pub attempts: u32,
    /// Echoed while no ingest server was announced: not republished on
    /// timeout (the broker has it), published again when one is announced.
    pub held: bool,
    /// The client refused the last publication (its request queue was
    /// full, or it was reconnecting): due at the next tick, whatever the
    /// backoff, and that publication does not count as an attempt.
    pub unsent: bool,
}

/// Batches in flight, keyed by first seq.
#[derive(Debug, Default)]
pub struct Window {
    capacity: usize,
    batches: BTreeMap<u64, Inflight>,
}

impl Window {
    /// A window of at most `capacity` batches.
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        Self { capacity: capacity.max(1), batches: BTreeMap::new() }
    }

    /// Whether another batch may be published.
    #[must_use]
    pub fn has_room(&self) -> bool {
        self.batches.len() < self.capacity
    }

    /// Batches in flight.
    #[must_use]
    pub fn len(&self) -> usize {
        self.batches.len()
    }

    /// Whether nothing is in flight.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    /// Records a publication of `first_seq..=batch.last_seq`.
    pub fn insert(&mut self, first_seq: u64, batch: Inflight) {
        self.batches.insert(first_seq, batch);
    }

    /// Removes and returns the batches whose ranges, laid end to end, are
    /// exactly `first..=last`: one batch in flight, or several adjacent ones
    /// (the ingest server merges adjacent stored ranges into one). Anything
    /// else (part of a batch, a gap, seqs not in flight, a range reaching
    /// beyond them) removes nothing: a confirmation is trusted only when it
    /// names what this agent published and still waits for.
    pub fn confirm(&mut self, first: u64, last: u64) -> Vec<(u64, Inflight)> {
        let mut next = first;
        let mut keys = Vec::new();
        for (&k, b) in self.batches.range(first..=last) {
            if k != next || b.last_seq > last {
                return Vec::new();
            }
            keys.push(k);
            next = b.last_seq.saturating_add(1);
        }
        if keys.is_empty() || next.checked_sub(1) != Some(last) {
            return Vec::new();
        }
        keys.into_iter().filter_map(|k| self.batches.remove(&k).map(|b| (k, b))).collect()
    }

    /// The batch published as exactly `first..=last`, if it is in flight.
    #[must_use]
    pub fn exact(&self, first: u64, last: u64) -> Option<&Inflight> {
        self.batches.get(&first).filter(|b| b.last_seq == last)
    }

    /// First seqs of batches due to be published again (held batches
    /// excepted: see [`Inflight::held`]): refused by the client (see
    /// [`Inflight::unsent`]), or unconfirmed for `timeout` after
    /// their first publication, then for twice as long after each further
    /// one, at most [`MAX_BACKOFF`] times `timeout`. A confirmation that is
    /// merely slow (an ingest group down, a lagging ClickHouse) then costs
    /// the broker a few copies per batch, not one every `timeout` per agent.
    #[must_use]
    pub fn overdue(&self, now: Instant, timeout: Duration) -> Vec<u64> {
        self.batches
            .iter()
            .filter(|(_, b)| {
                !b.held
                    && (b.unsent || now.saturating_duration_since(b.sent_at) >= republish_after(timeout, b.attempts))
            })
            .map(|(&k, _)| k)
            .collect()
    }

    /// Marks the batch published as exactly `first..=last` held; `true` if
    /// it was in flight and not held yet.
    pub fn hold(&mut self, first: u64, last: u64) -> bool {
        match self.batches.get_mut(&first).filter(|b| b.last_seq == last && !b.held) {
            Some(batch) => {
                batch.held = true;
                true
            }
            None => false,
        }
    }

    /// Held batches.
    #[must_use]
    pub fn held(&self) -> usize {
        self.batches.values().filter(|b| b.held).count()
    }

    /// The batch starting at `first_seq`, to republish it.
    pub fn get_mut(&mut self, first_seq: u64) -> Option<&mut Inflight> {
        self.batches.get_mut(&first_seq)
    }

    /// Forgets everything (a new connection replays from the outbox).
    pub fn clear(&mut self) {
        self.batches.clear();
    }
}

/// The longest wait between two publications of one batch, in multiples of
/// the confirm timeout.
pub const MAX_BACKOFF: u32 = 16;

/// How long after its last publication a batch published `attempts` times
/// is due again: `timeout`, doubling per attempt, at most `MAX_BACKOFF`
/// times `timeout`.
#[must_use]
pub fn republish_after(timeout: Duration, attempts: u32) -> Duration {
    let factor = 1u32.checked_shl(attempts.saturating_sub(1)).unwrap_or(MAX_BACKOFF).min(MAX_BACKOFF);
    timeout.saturating_mul(factor)
}

/// The pace of the backlog replay: a token bucket of `rate` readings per
/// second holding at most one second of them (0: no limit).
#[derive(Debug, Clone)]
pub struct Pace {
    rate: u64,
    tokens: f64,
    at: Instant,
}

impl Pace {
    /// A pace of `rate` readings per second (0: unlimited), full.
    #[must_use]
    pub fn new(rate: u64, now: Instant) -> Self {
        Self { rate, tokens: rate as f64, at: now }
    }

    /// Whether a batch may go now (it may overdraw the bucket: the debt is
    /// paid before the next one goes).
    pub fn ready(&mut self, now: Instant) -> bool {
        if self.rate == 0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate as f64).min(self.rate as f64);
        self.at = now;
        self.tokens > 0.0
    }

    /// `readings` went out.
    pub fn spend(&mut self, readings: u64) {
        if self.rate > 0 {
            self.tokens -= readings as f64;
        }
    }
}

/// How many of `sizes` (encoded reading sizes, in seq order) go into the
/// next batch: at least one, at most `max_readings`, and no more than
/// `max_bytes` of readings unless a single reading is larger.
#[must_use]
pub fn cut(sizes: impl Iterator<Item = usize>, max_readings: usize, max_bytes: usize) -> usize {
    let mut n = 0;
    let mut bytes = 0;
    for size in sizes.take(max_readings.max(1)) {
        if n > 0 && bytes + size > max_bytes {
            break;
        }
        bytes += size;
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(last_seq: u64) -> Inflight {
        Inflight {
            last_seq,
            readings: 1,
            payload: Vec::new(),
            sent_at: Instant::now(),
            attempts: 1,
            held: false,
            unsent: false,
        }
    }

    #[test]
    fn a_confirmation_removes_exactly_the_batches_it_covers() {
        let mut w = Window::new(8);
        w.insert(1, batch(10));
        w.insert(11, batch(20));
        w.insert(21, batch(30));
        let removed: Vec<u64> = w.confirm(11, 20).into_iter().map(|(k, _)| k).collect();
        assert_eq!(removed, vec![11]);
        assert_eq!(w.len(), 2);
    }

    #[test]
    fn confirmations_in_any_order_are_honoured() {
        let mut w = Window::new(8);
        w.insert(1, batch(10));
        w.insert(11, batch(20));
        assert_eq!(w.confirm(11, 20).len(), 1);
        assert_eq!(w.confirm(1, 10).len(), 1);
        assert!(w.is_empty());
    }

    #[test]
    fn only_a_batch_in_flight_with_exactly_that_range_is_found() {
        let mut w = Window::new(8);
        w.insert(1, batch(10));
        w.insert(11, batch(20));
        assert_eq!(w.exact(11, 20).map(|b| b.last_seq), Some(20));
        assert!(w.exact(11, 19).is_none(), "a part of a batch");
        assert!(w.exact(1, 20).is_none(), "two batches");
        assert!(w.exact(21, 30).is_none(), "never published");
        let _ = w.confirm(11, 20);
        assert!(w.exact(11, 20).is_none(), "already confirmed");
    }

    #[test]
    fn a_held_batch_is_never_overdue_and_still_confirmable() {
        let mut w = Window::new(8);
        w.insert(1, batch(10));
        w.insert(11, batch(20));
        let later = Instant::now() + Duration::from_secs(60);
        assert!(w.hold(11, 20));
        assert!(!w.hold(11, 20), "already held");
        assert!(!w.hold(11, 19), "not a batch");
        assert_eq!(w.held(), 1);
        assert_eq!(w.overdue(later, Duration::from_secs(5)), vec![1]);
        assert_eq!(w.confirm(11, 20).len(), 1);
        assert_eq!(w.held(), 0);
    }

    #[test]
    fn republishing_backs_off_doubling_up_to_a_limit() {
        let t = Duration::from_secs(5);
        let waits: Vec<u64> = (1..=7).map(|a| super::republish_after(t, a).as_secs()).collect();
        assert_eq!(waits, vec![5, 10, 20, 40, 80, 80, 80]);
        assert_eq!(super::republish_after(t, u32::MAX), t * super::MAX_BACKOFF);
        let mut w = Window::new(8);
        let t0 = Instant::now();
        w.insert(1, Inflight { attempts: 3, sent_at: t0, ..batch(10) });
        assert!(w.overdue(t0 + Duration::from_secs(19), t).is_empty(), "third publication: 20 s");
        assert_eq!(w.overdue(t0 + Duration::from_secs(20), t), vec![1]);
    }

    #[test]
    fn the_pace_lets_rate_readings_per_second_through() {
        let t0 = Instant::now();
        let mut pace = super::Pace::new(1000, t0);
        let mut sent = 0;
        for ms in 0..=3000u64 {
            let now = t0 + Duration::from_millis(ms);
            while pace.ready(now) {
                pace.spend(100);
                sent += 100;
            }
        }
        // A full bucket (1,000) plus 1,000 per second for 3 s, give or take a batch.
        assert!((3900..=4100).contains(&sent), "{sent}");
        let mut free = super::Pace::new(0, t0);
        free.spend(1 << 40);
        assert!(free.ready(t0), "0 means no limit");
    }

    #[test]
    fn a_partly_covering_confirmation_keeps_the_batch() {
        let mut w = Window::new(8);
        w.insert(1, batch(10));
        assert!(w.confirm(1, 5).is_empty());
        assert!(w.confirm(5, 20).is_empty());
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn adjacent_batches_merged_into_one_range_are_confirmed_together() {
        let mut w = Window::new(8);
        w.insert(1, batch(10));
        w.insert(11, batch(20));
        w.insert(21, batch(30));
        assert_eq!(w.confirm(1, 20).len(), 2);
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn a_range_wider_than_the_batches_in_flight_confirms_nothing() {
        let mut w = Window::new(8);
        w.insert(1, batch(10));
        w.insert(11, batch(20));
        w.insert(31, batch(40));
        assert!(w.confirm(1, 1 << 40).is_empty(), "a forged ack of every seq");
        assert!(w.confirm(1, 100).is_empty(), "reaches beyond the batches");
        assert!(w.confirm(0, 20).is_empty(), "starts before them");
        assert!(w.confirm(11, 40).is_empty(), "a gap (21..=30 is not in flight)");
        assert_eq!(w.len(), 3);
    }

    #[test]
    fn a_cumulative_style_confirmation_of_a_later_batch_does_not_confirm_an_earlier_one() {
        let mut w = Window::new(8);
        w.insert(1, batch(10));
        w.insert(11, batch(20));
        w.confirm(11, 20);
        assert!(w.get_mut(1).is_some(), "batch 1..=10 must stay until its own confirmation");
    }

    #[test]
    fn overdue_batches_are_found_by_age() {
        let mut w = Window::new(8);
        let old = Instant::now().checked_sub(Duration::from_secs(10)).unwrap();
        w.insert(1, Inflight { sent_at: old, ..batch(10) });
        w.insert(11, batch(20));
        assert_eq!(w.overdue(Instant::now(), Duration::from_secs(5)), vec![1]);
    }

    #[test]
    fn the_window_has_a_capacity() {
        let mut w = Window::new(2);
        w.insert(1, batch(1));
        assert!(w.has_room());
        w.insert(2, batch(2));
        assert!(!w.has_room());
    }

    #[test]
    fn batches_are_cut_by_count_and_bytes() {
        assert_eq!(cut([10; 100].into_iter(), 30, 1000), 30);
        assert_eq!(cut([10; 100].into_iter(), 1000, 95), 9);
        assert_eq!(cut([500].into_iter(), 10, 100), 1, "one oversize reading still goes alone");
        assert_eq!(cut(std::iter::empty(), 10, 100), 0);
    }
}
