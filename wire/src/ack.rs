//! The MQTT payload the ingest server publishes on `/telemetry/ack/<client_id>`
//! after an insert: the exact seq ranges it stored, and those it rejected.
//!
//! Layout: [`ACK_VERSION`], then bincode of `ranges` (u64 LE count, then per
//! range `epoch`, `first_seq`, `last_seq`, each u64 LE). When some ranges
//! were rejected (ClickHouse refused exactly those readings; they are in
//! `ingest_errors`), [`ACK_VERSION_REJECTED`] instead, then `ranges`, then
//! `rejected` in the same layout. A server sends version 1 whenever nothing
//! was rejected, so agents that know only version 1 keep working.
//!
//! Ranges are exact on purpose. A cumulative "everything up to seq N" would
//! confirm a batch that was lost while a later one was stored, and the agent
//! would delete rows nobody has.

use bincode::{Decode, Encode};

use crate::error::{decode_exact, split_version};
use crate::DecodeError;

/// Version byte of an ack payload that rejects nothing.
pub const ACK_VERSION: u8 = 1;

/// Version byte of an ack payload that also names rejected ranges.
pub const ACK_VERSION_REJECTED: u8 = 2;

/// An inclusive range of one outbox incarnation's seqs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Encode, Decode)]
pub struct SeqRange {
    /// The outbox incarnation.
    pub epoch: u64,
    /// First seq, inclusive.
    pub first_seq: u64,
    /// Last seq, inclusive.
    pub last_seq: u64,
}

impl SeqRange {
    /// Number of seqs in the range.
    #[must_use]
    pub fn len(&self) -> u64 {
        self.last_seq.saturating_sub(self.first_seq).saturating_add(1)
    }

    /// Never true for a valid range; present for clippy's `len_without_is_empty`.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.last_seq < self.first_seq
    }
}

/// Ranges of one client's outbox that are stored in ClickHouse, and ranges
/// the server will never store (dead-lettered: the agent may delete them,
/// counting them as rejected, and must stop republishing them).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IngestAck {
    /// Stored ranges; each with `first_seq <= last_seq`.
    pub ranges: Vec<SeqRange>,
    /// Rejected ranges; each with `first_seq <= last_seq`.
    pub rejected: Vec<SeqRange>,
}

impl IngestAck {
    /// An ack of stored ranges only.
    #[must_use]
    pub fn stored(ranges: Vec<SeqRange>) -> Self {
        Self { ranges, rejected: Vec::new() }
    }

    /// Encodes the ack (version 1 when nothing is rejected).
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + 16 + 24 * (self.ranges.len() + self.rejected.len()));
        if self.rejected.is_empty() {
            out.push(ACK_VERSION);
            encode_ranges(&self.ranges, &mut out);
        } else {
            out.push(ACK_VERSION_REJECTED);
            encode_ranges(&self.ranges, &mut out);
            encode_ranges(&self.rejected, &mut out);
        }
        out
    }

    /// Decodes and validates an ack of either version.
    ///
    /// # Errors
    /// Any [`DecodeError`]; a range with `first_seq > last_seq` is
    /// [`DecodeError::InvalidHeader`].
    pub fn decode(payload: &[u8], max: usize) -> Result<Self, DecodeError> {
        let with_rejected = payload.first() == Some(&ACK_VERSION_REJECTED);
        let version = if with_rejected { ACK_VERSION_REJECTED } else { ACK_VERSION };
        let body = split_version(payload, version, max)?;
        crate::bounds::seq_ranges(body)?;
        let ack = if with_rejected {
            let (ranges, rejected): (Vec<SeqRange>, Vec<SeqRange>) = decode_exact(body)?;
            Self { ranges, rejected }
        } else {
            Self::stored(decode_exact(body)?)
        };
        if let Some(bad) = ack.ranges.iter().chain(&ack.rejected).find(|r| r.is_empty()) {
            return Err(DecodeError::InvalidHeader(format!("range {}..={} is inverted", bad.first_seq, bad.last_seq)));
        }
        Ok(ack)
    }
}

fn encode_ranges(ranges: &[SeqRange], out: &mut Vec<u8>) {
    // Invariant: encoding plain data into a Vec cannot fail.
    bincode::encode_into_std_write(ranges, out, crate::bincode_config()).expect("encoding into memory cannot fail");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_round_trip() {
        let ack = IngestAck::stored(vec![
            SeqRange { epoch: 1, first_seq: 1, last_seq: 1000 },
            SeqRange { epoch: 1, first_seq: 3001, last_seq: 4000 },
        ]);
        assert_eq!(ack.encode()[0], ACK_VERSION, "nothing rejected: version 1, as older agents expect");
        assert_eq!(IngestAck::decode(&ack.encode(), 1 << 20), Ok(ack));
    }

    #[test]
    fn acks_with_rejected_ranges_round_trip_as_version_2() {
        let ack = IngestAck {
            ranges: vec![SeqRange { epoch: 1, first_seq: 1, last_seq: 10 }],
            rejected: vec![SeqRange { epoch: 1, first_seq: 11, last_seq: 20 }],
        };
        let bytes = ack.encode();
        assert_eq!(bytes[0], ACK_VERSION_REJECTED);
        assert_eq!(bytes.len(), 1 + 8 + 24 + 8 + 24);
        assert_eq!(IngestAck::decode(&bytes, 1 << 20), Ok(ack));
        let inverted = IngestAck { ranges: vec![], rejected: vec![SeqRange { epoch: 1, first_seq: 9, last_seq: 2 }] };
        assert!(matches!(IngestAck::decode(&inverted.encode(), 1 << 20), Err(DecodeError::InvalidHeader(_))));
        assert!(IngestAck::decode(&[ACK_VERSION_REJECTED, 0, 0, 0, 0, 0, 0, 0, 0], 1 << 20).is_err(), "truncated");
    }

    #[test]
    fn inverted_ranges_are_rejected() {
        let ack = IngestAck::stored(vec![SeqRange { epoch: 1, first_seq: 5, last_seq: 4 }]);
        assert!(matches!(IngestAck::decode(&ack.encode(), 1 << 20), Err(DecodeError::InvalidHeader(_))));
    }

    #[test]
    fn a_forged_huge_count_is_an_error_not_an_allocation() {
        let mut bytes = vec![ACK_VERSION];
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(IngestAck::decode(&bytes, 1 << 20).is_err());
    }
}
