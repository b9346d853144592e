//! Echo mode's bound on what lives only in the broker. Pure state, no I/O.
//!
//! In echo mode a batch is deleted from the outbox when its echo arrives,
//! before any ingest server stored it: until the ingest ack comes, the
//! broker's queue is its only copy. [`EchoAhead`] remembers those batches
//! until an ingest ack covers them, and the publisher stops publishing while
//! they exceed the configured readings or bytes, so a lagging centre makes
//! the durable outbox grow instead of the broker's memory. A batch that gets
//! no ack within the timeout stops counting (the broker may have lost it, or
//! the acks went to a connection that is gone); the publisher counts and
//! logs those.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
struct Echoed {
    last_seq: u64,
    readings: u64,
    bytes: u64,
    at: Instant,
}

/// Batches echoed and not yet acked by an ingest server, keyed by first seq.
#[derive(Debug)]
pub struct EchoAhead {
    entries: BTreeMap<u64, Echoed>,
    readings: u64,
    bytes: u64,
    max_readings: u64,
    max_bytes: u64,
}

impl EchoAhead {
    /// A bound of `max_readings` and `max_bytes` (0: no limit on that one).
    #[must_use]
    pub fn new(max_readings: u64, max_bytes: u64) -> Self {
        Self { entries: BTreeMap::new(), readings: 0, bytes: 0, max_readings, max_bytes }
    }

    /// New limits (a configuration reload); what is tracked stays.
    pub fn set_limits(&mut self, max_readings: u64, max_bytes: u64) {
        self.max_readings = max_readings;
        self.max_bytes = max_bytes;
    }

    /// Readings echoed and not acked.
    #[must_use]
    pub fn readings(&self) -> u64 {
        self.readings
    }

    /// Whether another batch may be published.
    #[must_use]
    pub fn has_room(&self) -> bool {
        (self.max_readings == 0 || self.readings < self.max_readings)
            && (self.max_bytes == 0 || self.bytes < self.max_bytes)
    }

    /// Records the echo of `first..=last`.
    pub fn echoed(&mut self, first: u64, last: u64, readings: u64, bytes: u64, at: Instant) {
        if let Some(old) = self.entries.insert(first, Echoed { last_seq: last, readings, bytes, at }) {
            self.readings -= old.readings;
            self.bytes -= old.bytes;
        }
        self.readings += readings;
        self.bytes += bytes;
    }

    /// An ingest ack (stored or rejected) of `first..=last`: forgets every
    /// batch fully inside it; returns their readings.
    pub fn acked(&mut self, first: u64, last: u64) -> u64 {
        let keys: Vec<u64> =
            self.entries.range(first..=last).filter(|(_, e)| e.last_seq <= last).map(|(&k, _)| k).collect();
        self.remove(keys)
    }

    /// Forgets batches echoed before `now - timeout`; returns their readings.
    pub fn expire(&mut self, now: Instant, timeout: Duration) -> u64 {
        let keys: Vec<u64> =
            self.entries.iter().filter(|(_, e)| now.duration_since(e.at) >= timeout).map(|(&k, _)| k).collect();
        self.remove(keys)
    }

    fn remove(&mut self, keys: Vec<u64>) -> u64 {
        let mut readings = 0;
        for e in keys.into_iter().filter_map(|k| self.entries.remove(&k)) {
            self.readings -= e.readings;
            self.bytes -= e.bytes;
            readings += e.readings;
        }
        readings
    }
}

#[cfg(test)]
mod tests {
    use super::EchoAhead;
    use std::time::{Duration, Instant};

    #[test]
    fn the_bound_closes_at_its_limit_and_opens_on_acks() {
        let now = Instant::now();
        let mut a = EchoAhead::new(250, 0);
        a.echoed(1, 100, 100, 1000, now);
        a.echoed(101, 200, 100, 1000, now);
        assert!(a.has_room());
        a.echoed(201, 300, 100, 1000, now);
        assert!(!a.has_room(), "300 readings ahead, limit 250");
        assert_eq!(a.acked(101, 200), 100);
        assert!(a.has_room());
        assert_eq!(a.acked(1, 50), 0, "half a batch acks nothing");
        assert_eq!(a.acked(1, 300), 200);
        assert_eq!(a.readings(), 0);
    }

    #[test]
    fn bytes_bound_too_and_zero_means_no_limit() {
        let now = Instant::now();
        let mut a = EchoAhead::new(0, 1500);
        a.echoed(1, 10, 10, 1000, now);
        assert!(a.has_room());
        a.echoed(11, 20, 10, 1000, now);
        assert!(!a.has_room());
        let mut unlimited = EchoAhead::new(0, 0);
        unlimited.echoed(1, 1_000_000, 1_000_000, 1 << 30, now);
        assert!(unlimited.has_room());
    }

    #[test]
    fn old_echoes_expire_and_a_repeated_echo_counts_once() {
        let now = Instant::now();
        let mut a = EchoAhead::new(1000, 0);
        a.echoed(1, 100, 100, 0, now);
        a.echoed(1, 100, 100, 0, now);
        assert_eq!(a.readings(), 100);
        a.echoed(101, 200, 100, 0, now + Duration::from_secs(30));
        assert_eq!(a.expire(now + Duration::from_secs(60), Duration::from_secs(60)), 100);
        assert_eq!(a.readings(), 100);
    }
}
