//! Length checks that run *before* bincode decodes a payload.
//!
//! bincode sizes a `String` or a `Vec` from its length prefix and allocates
//! that much before reading the elements; its only guard is the claim limit
//! ([`crate::codec`]: 64 MiB). So a 20-byte payload whose string length says
//! 40 MB made the decoder allocate 40 MB, and one whose reading count says
//! 2^21 made it reserve 2^21 readings, only to fail on the missing bytes
//! (found by the `sensor_frames` fuzz target: `fuzz/`, docs/reliability.md).
//! Pages were not touched, so resident memory barely moved, but a few
//! hundred such frames at once reserve tens of GiB and abort the process
//! under strict overcommit or an address-space limit.
//!
//! # Invariant
//! Every length prefix is checked against the bytes that are actually left:
//! a string of `n` bytes needs `n` more bytes, a sequence of `n` items needs
//! `n` times the smallest encoding of one item. After these checks nothing a
//! decoder allocates exceeds a small multiple of its input.

use crate::DecodeError;

/// Smallest encoding of one reading: sensor length (8) + ts (8) + value (8).
pub(crate) const MIN_READING_BYTES: u64 = 24;
/// Encoding of one `SeqRange`: epoch, first_seq, last_seq.
const SEQ_RANGE_BYTES: u64 = 24;

struct Cursor<'a> {
    rest: &'a [u8],
}

impl Cursor<'_> {
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let (head, rest) = self.rest.split_first_chunk::<8>().ok_or(DecodeError::Truncated)?;
        self.rest = rest;
        Ok(u64::from_le_bytes(*head))
    }

    fn skip(&mut self, n: u64) -> Result<(), DecodeError> {
        let n = usize::try_from(n).map_err(|_| DecodeError::Truncated)?;
        self.rest = self.rest.get(n..).ok_or(DecodeError::Truncated)?;
        Ok(())
    }

    fn len_prefix(&mut self, item_bytes: u64) -> Result<u64, DecodeError> {
        let n = self.u64()?;
        if n.saturating_mul(item_bytes) > self.rest.len() as u64 {
            return Err(DecodeError::Truncated);
        }
        Ok(n)
    }

    fn string(&mut self) -> Result<(), DecodeError> {
        let n = self.len_prefix(1)?;
        self.skip(n)
    }

    fn readings(&mut self) -> Result<(), DecodeError> {
        for _ in 0..self.len_prefix(MIN_READING_BYTES)? {
            self.string()?;
            self.skip(16)?;
        }
        Ok(())
    }
}

/// The body of a sensor frame: `Vec<Reading>`.
pub(crate) fn readings(body: &[u8]) -> Result<(), DecodeError> {
    Cursor { rest: body }.readings()
}

/// The body of a batch: client id, epoch, first/last seq, `Vec<Reading>`.
pub(crate) fn batch(body: &[u8]) -> Result<(), DecodeError> {
    let mut c = Cursor { rest: body };
    c.string()?;
    c.skip(24)?;
    c.readings()
}

/// The start of a batch body: the client id string.
pub(crate) fn batch_header(body: &[u8]) -> Result<(), DecodeError> {
    Cursor { rest: body }.string()
}

/// The body of an ingest ack: `Vec<SeqRange>`.
pub(crate) fn seq_ranges(body: &[u8]) -> Result<(), DecodeError> {
    Cursor { rest: body }.len_prefix(SEQ_RANGE_BYTES).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_length_beyond_the_input_is_refused_before_decoding() {
        let mut body = 40_000_000u64.to_le_bytes().to_vec();
        body.extend_from_slice(b"abc");
        assert_eq!(batch_header(&body), Err(DecodeError::Truncated));
        let mut frame = 1u64.to_le_bytes().to_vec();
        frame.extend_from_slice(&body);
        assert_eq!(readings(&frame), Err(DecodeError::Truncated));
        assert_eq!(readings(&(1u64 << 21).to_le_bytes()), Err(DecodeError::Truncated));
        assert_eq!(seq_ranges(&u64::MAX.to_le_bytes()), Err(DecodeError::Truncated));
    }

    #[test]
    fn lengths_that_fit_pass() {
        let mut frame = 1u64.to_le_bytes().to_vec();
        frame.extend_from_slice(&2u64.to_le_bytes());
        frame.extend_from_slice(b"t0");
        frame.extend_from_slice(&[0; 16]);
        assert_eq!(readings(&frame), Ok(()));
    }
}
