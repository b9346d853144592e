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
//!
//! An uncompressed payload is first read in one pass by hand (`parse`),
//! which accepts only what passes every one of those rules and otherwise
//! gives up; the careful path (length checks, bincode, then the rules) then
//! finds the exact error. The careful path walked each reading three times
//! (the length checks, bincode's decode, the rules) and checked each name's
//! UTF-8 again at every reading: 22% of the ingest server's CPU (`perf`,
//! `scripts/bench ingest`).

use std::collections::HashMap;

use bincode::BorrowDecode;

use crate::batch::{validate_header, with_body, BATCH_VERSION};
use crate::bounds::MIN_READING_BYTES;
use crate::error::{borrow_decode_exact, split_version};
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
    index: HashMap<&'a [u8], u32>,
}

/// Names kept in the scanned list before the map takes over.
const SCAN_NAMES: usize = 16;

impl<'a> Names<'a> {
    // Invariant: ids fit u32: the list holds at most one name per reading.
    fn new() -> Self {
        Self { list: Vec::new(), index: HashMap::new() }
    }

    // A name is found by its bytes: one seen before was checked then.
    fn find(&self, name: &[u8]) -> Option<u32> {
        if self.list.len() <= SCAN_NAMES {
            self.list.iter().position(|n| n.as_bytes() == name).map(|i| i as u32)
        } else {
            self.index.get(name).copied()
        }
    }

    fn add(&mut self, name: &'a str) -> u32 {
        let id = self.list.len() as u32;
        self.list.push(name);
        if self.list.len() > SCAN_NAMES {
            if self.index.is_empty() {
                self.index.extend(self.list.iter().enumerate().map(|(i, n)| (n.as_bytes(), i as u32)));
            } else {
                self.index.insert(name.as_bytes(), id);
            }
        }
        id
    }

    fn into_owned(self) -> Vec<String> {
        self.list.into_iter().map(str::to_owned).collect()
    }
}

/// The bytes of a body not read yet.
struct Rest<'a>(&'a [u8]);

impl<'a> Rest<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    fn u64(&mut self) -> Option<u64> {
        let (head, rest) = self.0.split_first_chunk::<8>()?;
        self.0 = rest;
        Some(u64::from_le_bytes(*head))
    }

    /// A string's bytes (u64 length, then the bytes; UTF-8 not checked).
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.u64()?).ok()?;
        self.take(n)
    }
}

/// One pass over an uncompressed batch body (the layout of [`Batch`]):
/// the batch if the payload passes every rule [`CompactBatch::decode`]
/// applies (then with the same result), `None` otherwise.
///
/// Why the result is the same: it reads the same fixed-width fields
/// (bincode's legacy configuration), checks each name's UTF-8 at its first
/// appearance (a later one has the same bytes), refuses trailing bytes,
/// and applies the same header, measurement and name rules. bincode's
/// claim limit ([`crate::bincode_config`], 64 MiB) cannot refuse a payload
/// of at most [`crate::MAX_PAYLOAD_BYTES`] (16 MiB): a decode claims 32
/// bytes per reading of at least 24 encoded bytes plus the strings' bytes,
/// under 40 MiB.
fn parse(body: &[u8]) -> Option<CompactBatch> {
    let mut rest = Rest(body);
    let client_id = std::str::from_utf8(rest.bytes()?).ok()?;
    let (epoch, first_seq, last_seq) = (rest.u64()?, rest.u64()?, rest.u64()?);
    let n = usize::try_from(rest.u64()?).ok()?;
    if n as u64 > rest.0.len() as u64 / MIN_READING_BYTES {
        return None;
    }
    validate_header(client_id, first_seq, last_seq, n).ok()?;
    let mut names = Names::new();
    let mut readings = Vec::with_capacity(n);
    for _ in 0..n {
        let name = rest.bytes()?;
        let ts = i64::from_le_bytes(rest.u64()?.to_le_bytes());
        let value = f64::from_bits(rest.u64()?);
        validate_measurement(ts, value).ok()?;
        let sensor = match names.find(name) {
            Some(id) => id,
            None => {
                let name = std::str::from_utf8(name).ok()?;
                validate_sensor(name).ok()?;
                names.add(name)
            }
        };
        readings.push(Sample { sensor, ts, value });
    }
    if !rest.0.is_empty() {
        return None;
    }
    Some(CompactBatch {
        client_id: client_id.to_owned(),
        epoch,
        first_seq,
        last_seq,
        sensors: names.into_owned(),
        readings,
    })
}

impl CompactBatch {
    /// Decodes and fully validates a batch payload, as [`Batch::decode`].
    ///
    /// # Errors
    /// The [`DecodeError`] [`Batch::decode`] returns for the same payload.
    pub fn decode(payload: &[u8], max: usize) -> Result<Self, DecodeError> {
        match split_version(payload, BATCH_VERSION, max).ok().and_then(parse) {
            Some(batch) => Ok(batch),
            None => Self::decode_carefully(payload, max),
        }
    }

    /// [`CompactBatch::decode`] by the length checks, bincode, then the
    /// rules: the exact error of a payload [`parse`] gives up on.
    fn decode_carefully(payload: &[u8], max: usize) -> Result<Self, DecodeError> {
        with_body(payload, max, |body| {
            let b: BorrowedBatch<'_> = borrow_decode_exact(body)?;
            validate_header(b.client_id, b.first_seq, b.last_seq, b.readings.len())?;
            let mut names = Names::new();
            let mut readings = Vec::with_capacity(b.readings.len());
            for (index, r) in b.readings.iter().enumerate() {
                let invalid = |source| DecodeError::InvalidReading { index, source };
                validate_measurement(r.ts, r.value).map_err(invalid)?;
                let sensor = match names.find(r.sensor.as_bytes()) {
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
                sensors: names.into_owned(),
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
    fn the_one_pass_reader_takes_what_the_careful_path_takes_and_nothing_else() {
        let many: Vec<String> = (0..40).map(|i| format!("s{i}")).collect();
        let mut valid = vec![batch(&["t", "p", "t", "h"]), batch(&many.iter().map(String::as_str).collect::<Vec<_>>())];
        let back: Vec<Reading> = valid[1].readings.iter().rev().cloned().collect();
        valid[1].readings.extend(back);
        valid[1].last_seq += 40;
        let mut cases: Vec<Vec<u8>> = Vec::new();
        for b in &valid {
            let payload = b.encode();
            let body = &payload[1..];
            let careful = CompactBatch::decode_carefully(&payload, 1 << 20).expect("valid");
            assert_eq!(parse(body), Some(careful), "the same batch either way");
            let mut trailing = payload.clone();
            trailing.push(0);
            cases.push(trailing);
            cases.extend((0..payload.len()).step_by(7).map(|cut| payload[..cut].to_vec()));
        }
        let bad = |edit: &dyn Fn(&mut Batch)| {
            let mut b = batch(&["t", "p", "t", "h"]);
            edit(&mut b);
            b.encode()
        };
        cases.push(bad(&|b| b.readings[2].value = f64::NAN));
        cases.push(bad(&|b| b.readings[3].ts = 0));
        cases.push(bad(&|b| b.readings[3].sensor = "bad\u{7}".into()));
        cases.push(bad(&|b| b.client_id = "no spaces".into()));
        cases.push(bad(&|b| b.last_seq += 1));
        // Not UTF-8: the fourth reading's name, then the client id ("h" and "d" are unique bytes).
        let mut utf8 = batch(&["t", "p", "t", "h"]).encode();
        let at = utf8.iter().rposition(|&c| c == b'h').unwrap();
        utf8[at] = 0xff;
        cases.push(utf8);
        let mut utf8 = batch(&["t"]).encode();
        let at = utf8.iter().position(|&c| c == b'd').unwrap();
        utf8[at] = 0xff;
        cases.push(utf8);
        // A reading count beyond the bytes left.
        let mut count = batch(&["t"]).encode();
        let at = 1 + 8 + "dev-1".len() + 24;
        count[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        cases.push(count);
        for payload in &cases {
            let careful = CompactBatch::decode_carefully(payload, 1 << 20);
            assert!(careful.is_err(), "a refused case");
            assert_eq!(parse(&payload[1.min(payload.len())..]), None, "the one pass gives up too: {careful:?}");
            assert_eq!(CompactBatch::decode(payload, 1 << 20), careful);
        }
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
