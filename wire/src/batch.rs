//! The MQTT payload an agent publishes: a contiguous range of outbox rows.
//!
//! Layout: [`BATCH_VERSION`], then bincode of `client_id` (u64 LE length +
//! UTF-8), `epoch` (u64 LE), `first_seq` (u64 LE), `last_seq` (u64 LE),
//! `readings` (u64 LE count + readings).
//!
//! A batch covers the outbox rows `first_seq..=last_seq` with no gaps, so the
//! reading at index `i` has seq `first_seq + i`. The agent cuts a batch where
//! the outbox has a gap (a rolled-back insert burns sequence numbers); that
//! keeps every reading's `(epoch, seq)` recoverable without sending it.

use bincode::{Decode, Encode};

use crate::error::{decode_exact, split_version};
use crate::{DecodeError, Reading};

/// Version byte of a batch payload.
pub const BATCH_VERSION: u8 = 1;
/// Longest client id in bytes.
pub const MAX_CLIENT_ID_LEN: usize = 64;

/// A range of one device's outbox rows, as published over MQTT.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct Batch {
    /// The device; must equal the last topic level it was published on.
    pub client_id: String,
    /// Random id of the device's outbox incarnation (see `docs/wire-format.md`).
    pub epoch: u64,
    /// Seq of `readings[0]`.
    pub first_seq: u64,
    /// Seq of the last reading; `last_seq - first_seq + 1 == readings.len()`.
    pub last_seq: u64,
    /// The readings, in seq order.
    pub readings: Vec<Reading>,
}

/// Borrowed form used to encode without cloning the agent's rows. Field
/// order must match [`Batch`]: a unit test checks both encode alike.
#[derive(Encode)]
struct BatchRef<'a> {
    client_id: &'a str,
    epoch: u64,
    first_seq: u64,
    last_seq: u64,
    readings: &'a [Reading],
}

/// Checks that a client id is usable as an MQTT topic level and a database
/// key: 1 to [`MAX_CLIENT_ID_LEN`] bytes of `[A-Za-z0-9_.-]`.
///
/// # Errors
/// [`DecodeError::InvalidHeader`] naming the problem.
pub fn validate_client_id(client_id: &str) -> Result<(), DecodeError> {
    if client_id.is_empty() || client_id.len() > MAX_CLIENT_ID_LEN {
        return Err(DecodeError::InvalidHeader(format!(
            "client id must be 1 to {MAX_CLIENT_ID_LEN} bytes, got {}",
            client_id.len()
        )));
    }
    if !client_id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')) {
        return Err(DecodeError::InvalidHeader("client id may only contain [A-Za-z0-9_.-]".into()));
    }
    Ok(())
}

impl Batch {
    /// Encodes a batch from borrowed parts (the agent's hot path) into `dst`.
    pub fn encode_parts(client_id: &str, epoch: u64, first_seq: u64, readings: &[Reading], dst: &mut Vec<u8>) {
        let last_seq = first_seq + readings.len() as u64 - 1;
        dst.reserve(1 + 8 + client_id.len() + 24 + 8 + readings.iter().map(Reading::encoded_len).sum::<usize>());
        dst.push(BATCH_VERSION);
        let batch = BatchRef { client_id, epoch, first_seq, last_seq, readings };
        // Invariant: encoding plain data into a Vec cannot fail.
        bincode::encode_into_std_write(batch, dst, crate::bincode_config()).expect("encoding into memory cannot fail");
    }

    /// Encodes this batch.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.push(BATCH_VERSION);
        // Invariant: encoding plain data into a Vec cannot fail.
        bincode::encode_into_std_write(self, &mut out, crate::bincode_config())
            .expect("encoding into memory cannot fail");
        out
    }

    /// Decodes and fully validates a batch: header consistency, client id
    /// and every reading.
    ///
    /// # Errors
    /// Any [`DecodeError`]; the payload must not exceed `max` bytes.
    pub fn decode(payload: &[u8], max: usize) -> Result<Self, DecodeError> {
        let body = split_version(payload, BATCH_VERSION, max)?;
        crate::bounds::batch(body)?;
        let batch: Self = decode_exact(body)?;
        batch.validate()?;
        Ok(batch)
    }

    /// Reads only the header of a batch payload: `(client_id, range)`.
    ///
    /// The agent matches echoes of its own batches by header; decoding every
    /// reading again would cost as much as the publish did. The header is
    /// checked (version, client id, range order); the readings are not.
    ///
    /// # Errors
    /// Any [`DecodeError`] about the version or the header fields.
    pub fn decode_header(payload: &[u8], max: usize) -> Result<(String, crate::SeqRange), DecodeError> {
        #[derive(Decode)]
        struct Header {
            client_id: String,
            epoch: u64,
            first_seq: u64,
            last_seq: u64,
        }
        let body = split_version(payload, BATCH_VERSION, max)?;
        crate::bounds::batch_header(body)?;
        let (h, _): (Header, usize) = bincode::decode_from_slice(body, crate::bincode_config())?;
        validate_client_id(&h.client_id)?;
        if h.first_seq > h.last_seq {
            return Err(DecodeError::InvalidHeader(format!("seq range {}..={} is inverted", h.first_seq, h.last_seq)));
        }
        Ok((h.client_id, crate::SeqRange { epoch: h.epoch, first_seq: h.first_seq, last_seq: h.last_seq }))
    }

    /// Checks the invariants [`Batch::decode`] guarantees.
    ///
    /// # Errors
    /// The first broken invariant.
    pub fn validate(&self) -> Result<(), DecodeError> {
        validate_client_id(&self.client_id)?;
        if self.readings.is_empty() {
            return Err(DecodeError::InvalidHeader("batch has no readings".into()));
        }
        let span = self.last_seq.checked_sub(self.first_seq).and_then(|d| d.checked_add(1));
        if span != Some(self.readings.len() as u64) {
            return Err(DecodeError::InvalidHeader(format!(
                "seq range {}..={} does not match {} readings",
                self.first_seq,
                self.last_seq,
                self.readings.len()
            )));
        }
        for (index, reading) in self.readings.iter().enumerate() {
            reading.validate().map_err(|source| DecodeError::InvalidReading { index, source })?;
        }
        Ok(())
    }

    /// The seq range this batch covers.
    #[must_use]
    pub fn range(&self) -> crate::SeqRange {
        crate::SeqRange { epoch: self.epoch, first_seq: self.first_seq, last_seq: self.last_seq }
    }

    /// Readings paired with their outbox seq.
    pub fn readings_with_seq(&self) -> impl Iterator<Item = (u64, &Reading)> {
        (self.first_seq..).zip(self.readings.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> Batch {
        Batch {
            client_id: "dev-1".into(),
            epoch: 42,
            first_seq: 10,
            last_seq: 11,
            readings: vec![
                Reading::new("t", 1_700_000_000_000_000, 1.0),
                Reading::new("t", 1_700_000_000_000_001, 2.0),
            ],
        }
    }

    #[test]
    fn borrowed_and_owned_encodings_are_identical() {
        let b = batch();
        let mut parts = Vec::new();
        Batch::encode_parts(&b.client_id, b.epoch, b.first_seq, &b.readings, &mut parts);
        assert_eq!(parts, b.encode());
        assert_eq!(Batch::decode(&parts, 1 << 20), Ok(b));
    }

    #[test]
    fn a_range_that_does_not_match_the_readings_is_rejected() {
        let mut b = batch();
        b.last_seq = 12;
        assert!(matches!(Batch::decode(&b.encode(), 1 << 20), Err(DecodeError::InvalidHeader(_))));
        b.first_seq = 13; // first > last
        assert!(matches!(Batch::decode(&b.encode(), 1 << 20), Err(DecodeError::InvalidHeader(_))));
    }

    #[test]
    fn the_header_alone_can_be_read() {
        let b = batch();
        assert_eq!(Batch::decode_header(&b.encode(), 1 << 20), Ok(("dev-1".to_owned(), b.range())));
        assert_eq!(Batch::decode_header(&b.encode()[..20], 1 << 20), Err(DecodeError::Truncated));
    }

    #[test]
    fn an_empty_batch_is_rejected() {
        let mut b = batch();
        b.readings.clear();
        b.last_seq = b.first_seq;
        assert!(matches!(Batch::decode(&b.encode(), 1 << 20), Err(DecodeError::InvalidHeader(_))));
    }

    #[test]
    fn a_nan_reading_rejects_the_batch() {
        let mut b = batch();
        b.readings[1].value = f64::NAN;
        assert!(matches!(Batch::decode(&b.encode(), 1 << 20), Err(DecodeError::InvalidReading { index: 1, .. })));
        b.readings[1].value = f64::NEG_INFINITY;
        assert!(matches!(Batch::decode(&b.encode(), 1 << 20), Err(DecodeError::InvalidReading { index: 1, .. })));
    }

    #[test]
    fn client_ids_must_be_topic_safe() {
        for bad in ["", "a/b", "a+b", "#", "a b", &"x".repeat(65)] {
            assert!(validate_client_id(bad).is_err(), "{bad:?}");
        }
        assert!(validate_client_id("edge-01.site_a").is_ok());
    }

    #[test]
    fn truncated_and_oversize_batches_are_rejected() {
        let bytes = batch().encode();
        for cut in 1..bytes.len() {
            assert_eq!(Batch::decode(&bytes[..cut], 1 << 20), Err(DecodeError::Truncated), "cut at {cut}");
        }
        assert!(matches!(Batch::decode(&bytes, 10), Err(DecodeError::Oversize { .. })));
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(Batch::decode(&long, 1 << 20), Err(DecodeError::TrailingBytes(1)));
    }
}
