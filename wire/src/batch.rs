//! The MQTT payload an agent publishes: a contiguous range of outbox rows.
//!
//! Layout: [`BATCH_VERSION`], then bincode of `client_id` (u64 LE length +
//! UTF-8), `epoch` (u64 LE), `first_seq` (u64 LE), `last_seq` (u64 LE),
//! `readings` (u64 LE count + readings).
//!
//! Compressed ([`BATCH_VERSION_ZSTD`], for constrained links): the version
//! byte, the length of the version-1 body as u64 LE, then one zstd frame of
//! that body. Readers accept both; the decompressed body is bounded by
//! [`crate::MAX_PAYLOAD_BYTES`] whatever the frame claims.
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
/// Version byte of a zstd-compressed batch payload.
pub const BATCH_VERSION_ZSTD: u8 = 2;
/// The zstd level agents compress with: most of the ratio for little CPU.
pub const ZSTD_LEVEL: i32 = 3;
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

/// Appends `[BATCH_VERSION_ZSTD][len u64 LE][zstd frame]` of a version-1
/// `body` (without its version byte) to `dst`.
fn compress_body(body: &[u8], dst: &mut Vec<u8>) {
    dst.push(BATCH_VERSION_ZSTD);
    dst.extend_from_slice(&(body.len() as u64).to_le_bytes());
    // Invariant: compressing memory into memory only fails on allocation.
    let frame = zstd::bulk::compress(body, ZSTD_LEVEL).expect("zstd compression of memory");
    dst.extend_from_slice(&frame);
}

/// The stated body length and the frame of a compressed body.
fn compressed_parts(body: &[u8]) -> Result<(usize, &[u8]), DecodeError> {
    let (len, frame) = body.split_first_chunk::<8>().ok_or(DecodeError::Truncated)?;
    let len = u64::from_le_bytes(*len);
    match usize::try_from(len) {
        Ok(len) if len <= crate::MAX_PAYLOAD_BYTES => Ok((len, frame)),
        _ => Err(DecodeError::Oversize {
            len: usize::try_from(len).unwrap_or(usize::MAX),
            max: crate::MAX_PAYLOAD_BYTES,
        }),
    }
}

/// The version-1 body inside a compressed one: exactly its stated length,
/// never more than [`crate::MAX_PAYLOAD_BYTES`] (a small frame cannot
/// inflate into a large allocation).
fn decompress_body(body: &[u8]) -> Result<Vec<u8>, DecodeError> {
    let (len, frame) = compressed_parts(body)?;
    let out = zstd::bulk::decompress(frame, len).map_err(|e| DecodeError::Compression(e.to_string()))?;
    if out.len() != len {
        return Err(DecodeError::Compression(format!("{} bytes decompressed, {len} stated", out.len())));
    }
    Ok(out)
}

/// Runs `decode` on the version-1 body of a batch payload (decompressed if
/// it is [`BATCH_VERSION_ZSTD`]) once its lengths are checked
/// ([`crate::bounds`]).
pub(crate) fn with_body<T>(
    payload: &[u8],
    max: usize,
    decode: impl FnOnce(&[u8]) -> Result<T, DecodeError>,
) -> Result<T, DecodeError> {
    let decompressed;
    let body = match payload.first() {
        Some(&BATCH_VERSION_ZSTD) => {
            decompressed = decompress_body(split_version(payload, BATCH_VERSION_ZSTD, max)?)?;
            &decompressed[..]
        }
        _ => split_version(payload, BATCH_VERSION, max)?,
    };
    crate::bounds::batch(body)?;
    decode(body)
}

/// The header rules of a batch: a valid client id, at least one reading,
/// and exactly one reading per seq of `first_seq..=last_seq`.
pub(crate) fn validate_header(
    client_id: &str,
    first_seq: u64,
    last_seq: u64,
    readings: usize,
) -> Result<(), DecodeError> {
    validate_client_id(client_id)?;
    if readings == 0 {
        return Err(DecodeError::InvalidHeader("batch has no readings".into()));
    }
    let span = last_seq.checked_sub(first_seq).and_then(|d| d.checked_add(1));
    if span != Some(readings as u64) {
        return Err(DecodeError::InvalidHeader(format!(
            "seq range {first_seq}..={last_seq} does not match {readings} readings"
        )));
    }
    Ok(())
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

    /// Encodes a batch from borrowed parts into `dst`, zstd-compressed
    /// ([`BATCH_VERSION_ZSTD`]); `scratch` holds the uncompressed body
    /// (reused between calls).
    pub fn encode_parts_zstd(
        client_id: &str,
        epoch: u64,
        first_seq: u64,
        readings: &[Reading],
        scratch: &mut Vec<u8>,
        dst: &mut Vec<u8>,
    ) {
        scratch.clear();
        Self::encode_parts(client_id, epoch, first_seq, readings, scratch);
        compress_body(&scratch[1..], dst);
    }

    /// Encodes this batch zstd-compressed ([`BATCH_VERSION_ZSTD`]).
    #[must_use]
    pub fn encode_zstd(&self) -> Vec<u8> {
        let plain = self.encode();
        let mut out = Vec::new();
        compress_body(&plain[1..], &mut out);
        out
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
        with_body(payload, max, |body| {
            let batch: Self = decode_exact(body)?;
            batch.validate()?;
            Ok(batch)
        })
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
        let h: Header = if payload.first() == Some(&BATCH_VERSION_ZSTD) {
            // Only the header's bytes are decompressed (at most 96).
            let (_, frame) = compressed_parts(split_version(payload, BATCH_VERSION_ZSTD, max)?)?;
            let reader =
                zstd::stream::read::Decoder::new(frame).map_err(|e| DecodeError::Compression(e.to_string()))?;
            let mut prefix = Vec::with_capacity(8 + MAX_CLIENT_ID_LEN + 24);
            std::io::Read::read_to_end(&mut std::io::Read::take(reader, prefix.capacity() as u64), &mut prefix)
                .map_err(|e| DecodeError::Compression(e.to_string()))?;
            crate::bounds::batch_header(&prefix)?;
            bincode::decode_from_slice(&prefix, crate::bincode_config())?.0
        } else {
            let body = split_version(payload, BATCH_VERSION, max)?;
            crate::bounds::batch_header(body)?;
            bincode::decode_from_slice(body, crate::bincode_config())?.0
        };
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
        validate_header(&self.client_id, self.first_seq, self.last_seq, self.readings.len())?;
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
    fn a_compressed_batch_decodes_like_the_plain_one_and_is_smaller() {
        let readings: Vec<Reading> =
            (0..1000).map(|i| Reading::new("temperature-1", 1_700_000_000_000_000 + i * 100_000, 20.0)).collect();
        let b = Batch { client_id: "dev-1".into(), epoch: 42, first_seq: 1, last_seq: 1000, readings };
        let (mut scratch, mut zstd) = (Vec::new(), Vec::new());
        Batch::encode_parts_zstd(&b.client_id, b.epoch, b.first_seq, &b.readings, &mut scratch, &mut zstd);
        assert_eq!(zstd, b.encode_zstd());
        assert_eq!(zstd[0], BATCH_VERSION_ZSTD);
        assert!(zstd.len() * 5 < b.encode().len(), "{} vs {} bytes", zstd.len(), b.encode().len());
        assert_eq!(Batch::decode(&zstd, 1 << 20), Ok(b.clone()));
        assert_eq!(Batch::decode_header(&zstd, 1 << 20), Ok(("dev-1".to_owned(), b.range())));
    }

    #[test]
    fn a_corrupt_or_lying_compressed_batch_is_refused_not_inflated() {
        let b = batch();
        let good = b.encode_zstd();
        // Truncated frame.
        assert!(Batch::decode(&good[..good.len() - 3], 1 << 20).is_err());
        // A stated length other than the frame's content.
        let mut lying = good.clone();
        lying[1..9].copy_from_slice(&5u64.to_le_bytes());
        assert!(matches!(Batch::decode(&lying, 1 << 20), Err(DecodeError::Compression(_))));
        // A stated length beyond the payload limit: refused before decompressing.
        let mut huge = good.clone();
        huge[1..9].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(matches!(Batch::decode(&huge, 1 << 20), Err(DecodeError::Oversize { .. })));
        // A bomb: 16 MiB + 1 of zeros in a small frame, stated honestly.
        let mut bomb = vec![BATCH_VERSION_ZSTD];
        let body = vec![0u8; crate::MAX_PAYLOAD_BYTES + 1];
        bomb.extend_from_slice(&(body.len() as u64).to_le_bytes());
        bomb.extend_from_slice(&zstd::bulk::compress(&body, 3).unwrap());
        assert!(bomb.len() < 4096);
        assert!(matches!(Batch::decode(&bomb, 1 << 20), Err(DecodeError::Oversize { .. })));
        assert!(Batch::decode_header(&[BATCH_VERSION_ZSTD, 1, 2], 1 << 20).is_err());
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
