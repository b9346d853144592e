//! The MQTT payload the ingest server publishes on `/telemetry/ack/<client_id>`
//! after an insert: the exact seq ranges it stored.
//!
//! Layout: [`ACK_VERSION`], then bincode of `ranges` (u64 LE count, then per
//! range `epoch`, `first_seq`, `last_seq`, each u64 LE).
//!
//! Ranges are exact on purpose. A cumulative "everything up to seq N" would
//! confirm a batch that was lost while a later one was stored, and the agent
//! would delete rows nobody has.

use bincode::{Decode, Encode};

use crate::error::{decode_exact, split_version};
use crate::DecodeError;

/// Version byte of an ack payload.
pub const ACK_VERSION: u8 = 1;

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

/// Ranges of one client's outbox that are stored in ClickHouse.
#[derive(Debug, Clone, PartialEq, Eq, Default, Encode, Decode)]
pub struct IngestAck {
    /// Stored ranges; each with `first_seq <= last_seq`.
    pub ranges: Vec<SeqRange>,
}

impl IngestAck {
    /// Encodes the ack.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + 8 + 24 * self.ranges.len());
        out.push(ACK_VERSION);
        // Invariant: encoding plain data into a Vec cannot fail.
        bincode::encode_into_std_write(self, &mut out, crate::bincode_config())
            .expect("encoding into memory cannot fail");
        out
    }

    /// Decodes and validates an ack.
    ///
    /// # Errors
    /// Any [`DecodeError`]; a range with `first_seq > last_seq` is
    /// [`DecodeError::InvalidHeader`].
    pub fn decode(payload: &[u8], max: usize) -> Result<Self, DecodeError> {
        let body = split_version(payload, ACK_VERSION, max)?;
        crate::bounds::seq_ranges(body)?;
        let ack: Self = decode_exact(body)?;
        if let Some(bad) = ack.ranges.iter().find(|r| r.is_empty()) {
            return Err(DecodeError::InvalidHeader(format!("range {}..={} is inverted", bad.first_seq, bad.last_seq)));
        }
        Ok(ack)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_round_trip() {
        let ack = IngestAck {
            ranges: vec![
                SeqRange { epoch: 1, first_seq: 1, last_seq: 1000 },
                SeqRange { epoch: 1, first_seq: 3001, last_seq: 4000 },
            ],
        };
        assert_eq!(IngestAck::decode(&ack.encode(), 1 << 20), Ok(ack));
    }

    #[test]
    fn inverted_ranges_are_rejected() {
        let ack = IngestAck { ranges: vec![SeqRange { epoch: 1, first_seq: 5, last_seq: 4 }] };
        assert!(matches!(IngestAck::decode(&ack.encode(), 1 << 20), Err(DecodeError::InvalidHeader(_))));
    }

    #[test]
    fn a_forged_huge_count_is_an_error_not_an_allocation() {
        let mut bytes = vec![ACK_VERSION];
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(IngestAck::decode(&bytes, 1 << 20).is_err());
    }
}
