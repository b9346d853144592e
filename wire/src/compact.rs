//! A batch decoded for storage: each distinct sensor name held once.
//!
//! The ingest server decodes every reading it stores. As a [`Batch`] that is
//! one `String` allocation (and free) per reading, for names a device
//! repeats in every reading: a 1000-reading batch of 4 sensors allocated
//! 1000 names to hold 4. Allocation, bincode's per-string decode and the
//! name checks were about a third of the server's own CPU by `perf`
//! (`scripts/bench ingest`, docs/benchmarks.md). [`CompactBatch`] borrows
//! the names from the payload while it decodes and keeps one `String` per
//! distinct name, checked once; each reading refers to its name by index.
//!
//! It accepts exactly the payloads [`Batch::decode`] accepts, with the same
//! error (the same bincode decode with borrowed strings, the same rules in
//! the same order; a property test compares both on arbitrary input).

use std::collections::HashMap;

use bincode::BorrowDecode;

use crate::batch::{validate_header, with_body};
use crate::error::borrow_decode_exact;
use crate::reading::{validate_measurement, validate_sensor};
use crate::{Batch, DecodeError, Reading, SeqRange};

/// One reading of a [`CompactBatch`]: its name is `sensors[sensor]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Index of the sensor name in [`CompactBatch::sensors`].
    pub sensor: u32,
    /// Time of the measurement, Unix microseconds (UTC).
    pub ts: i64,
    /// The measured value (finite).
    pub value: f64,
}

/// A validated batch with its sensor names held once (see the module doc).
#[derive(Debug, Clone, PartialEq)]
pub struct CompactBatch {
    /// The device.
    pub client_id: String,
    /// The device's outbox incarnation.
    pub epoch: u64,
    /// Seq of `readings[0]`.
    pub first_seq: u64,
    /// Seq of the last reading.
    pub last_seq: u64,
    /// The distinct sensor names, in order of first appearance.
    pub sensors: Vec<String>,
    /// The readings, in seq order.
    pub readings: Vec<Sample>,
}

/// The wire layout of [`Batch`] with borrowed strings (same field order).
#[derive(BorrowDecode)]
struct BorrowedBatch<'a> {
    client_id: &'a str,
    epoch: u64,
    first_seq: u64,
    last_seq: u64,
    readings: Vec<BorrowedReading<'a>>,
}

/// The wire layout of [`Reading`] with a borrowed name.
#[derive(BorrowDecode)]
struct BorrowedReading<'a> {
    sensor: &'a str,
    ts: i64,
    value: f64,
}

/// Names seen so far: a scan while there are few (a device has a handful
/// of sensors), a hash map beyond that (a forged batch of 10^5 distinct
/// names must not cost a quadratic scan).
struct Names<'a> {
    list: Vec<&'a str>,
    index: HashMap<&'a str, u32>,
}

/// Names kept in the scanned list before the map takes over.
const SCAN_NAMES: usize = 16;

impl<'a> Names<'a> {
    // Invariant: ids fit u32: the list holds at most one name per reading.
    fn find(&self, name: &str) -> Option<u32> {
        if self.list.len() <= SCAN_NAMES {
            self.list.iter().position(|n| *n == name).map(|i| i as u32)
        } else {
            self.index.get(name).copied()
        }
    }

    fn add(&mut self, name: &'a str) -> u32 {
        let id = self.list.len() as u32;
        self.list.push(name);
        if self.list.len() > SCAN_NAMES {
            if self.index.is_empty() {
                self.index.extend(self.list.iter().enumerate().map(|(i, n)| (*n, i as u32)));
            } else {
                self.index.insert(name, id);
            }
        }
        id
    }
}

impl CompactBatch {
    /// Decodes and fully validates a batch payload, as [`Batch::decode`].
    ///
    /// # Errors
    /// The [`DecodeError`] [`Batch::decode`] returns for the same payload.
    pub fn decode(payload: &[u8], max: usize) -> Result<Self, DecodeError> {
        with_body(payload, max, |body| {
            let b: BorrowedBatch<'_> = borrow_decode_exact(body)?;
            validate_header(b.client_id, b.first_seq, b.last_seq, b.readings.len())?;
            let mut names = Names { list: Vec::new(), index: HashMap::new() };
            let mut readings = Vec::with_capacity(b.readings.len());
            for (index, r) in b.readings.iter().enumerate() {
                let invalid = |source| DecodeError::InvalidReading { index, source };
                validate_measurement(r.ts, r.value).map_err(invalid)?;
                let sensor = match names.find(r.sensor) {
                    Some(id) => id,
                    None => {
                        validate_sensor(r.sensor).map_err(invalid)?;
                        names.add(r.sensor)
                    }
                };
                readings.push(Sample { sensor, ts: r.ts, value: r.value });
            }
            Ok(Self {
                client_id: b.client_id.to_owned(),
                epoch: b.epoch,
                first_seq: b.first_seq,
                last_seq: b.last_seq,
                sensors: names.list.into_iter().map(str::to_owned).collect(),
                readings,
            })
        })
    }

    /// The name of `sample`'s sensor.
    #[must_use]
    pub fn sensor(&self, sample: &Sample) -> &str {
        &self.sensors[sample.sensor as usize]
    }

    /// The seq range this batch covers.
    #[must_use]
    pub fn range(&self) -> SeqRange {
        SeqRange { epoch: self.epoch, first_seq: self.first_seq, last_seq: self.last_seq }
    }
}

impl From<CompactBatch> for Batch {
    fn from(c: CompactBatch) -> Self {
        let readings = c.readings.iter().map(|s| Reading::new(c.sensor(s), s.ts, s.value)).collect();
        Self { client_id: c.client_id, epoch: c.epoch, first_seq: c.first_seq, last_seq: c.last_seq, readings }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TS: i64 = 1_700_000_000_000_000;

    fn batch(names: &[&str]) -> Batch {
        let readings: Vec<Reading> =
            names.iter().enumerate().map(|(i, n)| Reading::new(*n, TS + i as i64, i as f64)).collect();
        Batch { client_id: "dev-1".into(), epoch: 7, first_seq: 100, last_seq: 99 + readings.len() as u64, readings }
    }

    #[test]
    fn names_are_held_once_in_order_of_appearance() {
        let b = batch(&["t", "p", "t", "h", "p", "t"]);
        let c = CompactBatch::decode(&b.encode(), 1 << 20).unwrap();
        assert_eq!(c.sensors, ["t", "p", "h"]);
        assert_eq!(c.readings.iter().map(|s| s.sensor).collect::<Vec<_>>(), [0, 1, 0, 2, 1, 0]);
        assert_eq!(Batch::from(c), b);
    }

    #[test]
    fn many_distinct_names_go_through_the_map_and_keep_their_indices() {
        let names: Vec<String> = (0..100).map(|i| format!("s{i}")).collect();
        let mut order: Vec<&str> = names.iter().map(String::as_str).collect();
        order.extend(names.iter().rev().map(String::as_str));
        let b = batch(&order);
        let c = CompactBatch::decode(&b.encode_zstd(), 1 << 20).unwrap();
        assert_eq!(c.sensors, names);
        assert_eq!(c.readings[199].sensor, 0);
        assert_eq!(Batch::from(c), b);
    }

    #[test]
    fn a_bad_name_fails_at_its_first_reading_after_that_readings_value() {
        // Reading 2: a bad value and a bad (new) name: the value is named, as Batch::decode does.
        let mut b = batch(&["t", "t", "bad\u{7}", "bad\u{7}"]);
        b.readings[2].value = f64::NAN;
        let payload = b.encode();
        assert_eq!(CompactBatch::decode(&payload, 1 << 20).unwrap_err(), Batch::decode(&payload, 1 << 20).unwrap_err());
        b.readings[2].value = 1.0;
        let payload = b.encode();
        let err = CompactBatch::decode(&payload, 1 << 20).unwrap_err();
        assert!(matches!(err, DecodeError::InvalidReading { index: 2, .. }), "{err:?}");
        assert_eq!(err, Batch::decode(&payload, 1 << 20).unwrap_err());
    }
}
