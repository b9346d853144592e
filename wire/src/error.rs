//! The typed error of every binary payload decoder.

use crate::reading::ReadingError;

/// Why a binary payload (sensor frame, MQTT batch, MQTT ack) was rejected.
///
/// Decoders return this for any byte sequence they do not accept; they never
/// panic. The variants are coarse on purpose: callers count and log them, and
/// the ingest server stores `to_string()` in its dead-letter table.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The payload had no bytes at all (not even the version byte).
    #[error("empty payload")]
    Empty,
    /// The first byte names a format this build does not know.
    #[error("unknown format version {found} (this build speaks {expected})")]
    UnknownVersion {
        /// The version byte found.
        found: u8,
        /// The version this build writes and reads.
        expected: u8,
    },
    /// The payload is larger than the caller (or [`crate::MAX_PAYLOAD_BYTES`]) allows.
    #[error("payload of {len} bytes exceeds the limit of {max} bytes")]
    Oversize {
        /// Payload length in bytes.
        len: usize,
        /// The limit that applied.
        max: usize,
    },
    /// The payload ended before the value did.
    #[error("payload truncated")]
    Truncated,
    /// Bytes left over after a complete value: a framing or version mix-up.
    #[error("{0} trailing bytes after the payload")]
    TrailingBytes(usize),
    /// The bytes are not a well-formed value (bad UTF-8, absurd length, ...).
    #[error("malformed payload: {0}")]
    Malformed(String),
    /// A reading inside the payload is structurally fine but not valid.
    #[error("reading {index}: {source}")]
    InvalidReading {
        /// Position of the reading in the payload.
        index: usize,
        /// What is wrong with it.
        source: ReadingError,
    },
    /// A compressed batch body does not decompress to its stated length
    /// (corrupt, or larger than [`crate::MAX_PAYLOAD_BYTES`]).
    #[error("bad compressed body: {0}")]
    Compression(String),
    /// A batch or ack header is inconsistent (range, counts, client id).
    #[error("invalid header: {0}")]
    InvalidHeader(String),
}

impl DecodeError {
    /// A short, stable, low-cardinality name for metrics labels.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::UnknownVersion { .. } => "unknown_version",
            Self::Oversize { .. } => "oversize",
            Self::Truncated => "truncated",
            Self::TrailingBytes(_) => "trailing_bytes",
            Self::Malformed(_) => "malformed",
            Self::InvalidReading { .. } => "invalid_reading",
            Self::InvalidHeader(_) => "invalid_header",
            Self::Compression(_) => "bad_compression",
        }
    }
}

impl From<bincode::error::DecodeError> for DecodeError {
    fn from(error: bincode::error::DecodeError) -> Self {
        match error {
            bincode::error::DecodeError::UnexpectedEnd { .. } => Self::Truncated,
            // A length larger than the claim limit can only be honoured by a
            // payload larger than the limit, so the input is short of it.
            bincode::error::DecodeError::LimitExceeded => Self::Truncated,
            other => Self::Malformed(other.to_string()),
        }
    }
}

/// Checks the version byte and the size cap, returning the body after the
/// version byte.
pub(crate) fn split_version(payload: &[u8], version: u8, max: usize) -> Result<&[u8], DecodeError> {
    let max = max.min(crate::MAX_PAYLOAD_BYTES);
    if payload.len() > max {
        return Err(DecodeError::Oversize { len: payload.len(), max });
    }
    match payload.split_first() {
        None => Err(DecodeError::Empty),
        Some((&found, body)) if found == version => Ok(body),
        Some((&found, _)) => Err(DecodeError::UnknownVersion { found, expected: version }),
    }
}

/// Decodes exactly one bincode value borrowing from `body` (its strings
/// point into it), rejecting trailing bytes.
pub(crate) fn borrow_decode_exact<'a, T: bincode::BorrowDecode<'a, ()>>(body: &'a [u8]) -> Result<T, DecodeError> {
    let (value, used) = bincode::borrow_decode_from_slice(body, crate::bincode_config())?;
    match body.len() - used {
        0 => Ok(value),
        extra => Err(DecodeError::TrailingBytes(extra)),
    }
}

/// Decodes exactly one bincode value from `body`, rejecting trailing bytes.
pub(crate) fn decode_exact<T: bincode::Decode<()>>(body: &[u8]) -> Result<T, DecodeError> {
    let (value, used) = bincode::decode_from_slice(body, crate::bincode_config())?;
    match body.len() - used {
        0 => Ok(value),
        extra => Err(DecodeError::TrailingBytes(extra)),
    }
}
