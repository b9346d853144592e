//! The binary sensor stream: length-delimited frames in both directions.
//!
//! Sensor → agent: each frame is a 4-byte little-endian length, then a payload
//! of [`SENSOR_FRAME_VERSION`] followed by the bincode encoding of the frame's
//! readings (`u64` count, then each [`Reading`]).
//!
//! Agent → sensor: ack frames with the same framing, payload
//! [`ACK_FRAME_VERSION`] + `u64` LE: the cumulative number of frames of this
//! connection whose readings are committed to the outbox. A sensor keeps every
//! frame past that count and resends them after a reconnect.

use std::io;

use bytes::{Buf, BufMut, BytesMut};
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

use crate::error::{decode_exact, split_version};
use crate::{DecodeError, Reading};

/// Version byte of a sensor frame payload.
pub const SENSOR_FRAME_VERSION: u8 = 1;
/// Version byte of an ack frame payload.
pub const ACK_FRAME_VERSION: u8 = 1;
/// Default largest sensor frame payload: 1 MiB.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 1 << 20;
/// Bytes of the length prefix in front of every frame.
pub const LENGTH_PREFIX_BYTES: usize = 4;
const ACK_PAYLOAD_BYTES: usize = 9;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The socket failed.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// The length prefix announces more than the configured maximum. The
    /// stream cannot be resynchronised after this: close the connection.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    Oversize {
        /// Announced payload length.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The stream ended in the middle of a frame.
    #[error("connection closed in the middle of a frame ({buffered} bytes buffered)")]
    Truncated {
        /// Bytes of the unfinished frame that had arrived.
        buffered: usize,
    },
    /// The frame arrived whole but its payload is not valid.
    #[error("bad frame payload: {0}")]
    Payload(#[from] DecodeError),
}

impl FrameError {
    /// A short, stable name for metrics labels.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Io(_) => "io",
            Self::Oversize { .. } => "oversize",
            Self::Truncated { .. } => "truncated",
            Self::Payload(e) => e.kind(),
        }
    }
}

fn length_codec(max: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(LENGTH_PREFIX_BYTES)
        .little_endian()
        .max_frame_length(max)
        .new_codec()
}

/// Wraps [`LengthDelimitedCodec`] so that an oversize length prefix is
/// reported with its length before a single payload byte is buffered, and an
/// EOF inside a frame is a typed error.
#[derive(Debug)]
struct Framing {
    inner: LengthDelimitedCodec,
    max: usize,
    /// The inner codec has consumed a length prefix and waits for its payload
    /// (it keeps that state internally; the prefix is no longer in `src`).
    awaiting_payload: bool,
}

impl Framing {
    fn new(max: usize) -> Self {
        Self { inner: length_codec(max), max, awaiting_payload: false }
    }

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, FrameError> {
        if !self.awaiting_payload && src.len() >= LENGTH_PREFIX_BYTES {
            let len = (&src[..LENGTH_PREFIX_BYTES]).get_u32_le() as usize;
            if len > self.max {
                return Err(FrameError::Oversize { len, max: self.max });
            }
        }
        let had_prefix = src.len() >= LENGTH_PREFIX_BYTES;
        let frame = self.inner.decode(src)?;
        self.awaiting_payload = frame.is_none() && (self.awaiting_payload || had_prefix);
        Ok(frame)
    }

    fn check_eof(&self, src: &BytesMut) -> Result<(), FrameError> {
        if src.is_empty() && !self.awaiting_payload {
            Ok(())
        } else {
            let prefix = if self.awaiting_payload { LENGTH_PREFIX_BYTES } else { 0 };
            Err(FrameError::Truncated { buffered: src.len() + prefix })
        }
    }
}

/// Appends the payload of one sensor frame (version byte + readings) to `dst`.
pub fn encode_readings_payload(readings: &[Reading], dst: &mut BytesMut) {
    dst.reserve(1 + 8 + readings.iter().map(Reading::encoded_len).sum::<usize>());
    dst.put_u8(SENSOR_FRAME_VERSION);
    let mut writer = dst.writer();
    // Invariant: writing to a BytesMut cannot fail and readings have no
    // fallible Encode impl, so bincode cannot return an error here.
    bincode::encode_into_std_write(readings, &mut writer, crate::bincode_config())
        .expect("encoding readings into memory cannot fail");
}

/// Decodes the payload of one sensor frame. Readings are *not* validated:
/// the agent rejects invalid readings one by one with [`Reading::validate`]
/// and keeps the valid ones of the same frame.
///
/// # Errors
/// Empty, oversize (`max`), unknown version, truncated or malformed payloads.
pub fn decode_readings_payload(payload: &[u8], max: usize) -> Result<Vec<Reading>, DecodeError> {
    let body = split_version(payload, SENSOR_FRAME_VERSION, max)?;
    crate::bounds::readings(body)?;
    decode_exact(body)
}

/// Codec for the sensor → agent direction: decodes frames into readings
/// (agent side) and encodes slices of readings (sensor side).
#[derive(Debug)]
pub struct SensorFrameCodec {
    framing: Framing,
    max: usize,
}

impl SensorFrameCodec {
    /// A codec that refuses payloads larger than `max_frame_bytes`.
    #[must_use]
    pub fn new(max_frame_bytes: usize) -> Self {
        let max = max_frame_bytes.min(crate::MAX_PAYLOAD_BYTES);
        Self { framing: Framing::new(max), max }
    }

    /// The payload limit of this codec.
    #[must_use]
    pub fn max_frame_bytes(&self) -> usize {
        self.max
    }
}

impl Default for SensorFrameCodec {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME_BYTES)
    }
}

impl Decoder for SensorFrameCodec {
    type Item = Vec<Reading>;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, FrameError> {
        match self.framing.decode(src)? {
            Some(payload) => Ok(Some(decode_readings_payload(&payload, self.max)?)),
            None => Ok(None),
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, FrameError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None => self.framing.check_eof(src).map(|()| None),
        }
    }
}

impl Encoder<&[Reading]> for SensorFrameCodec {
    type Error = FrameError;

    fn encode(&mut self, readings: &[Reading], dst: &mut BytesMut) -> Result<(), FrameError> {
        let start = dst.len();
        dst.put_u32_le(0);
        encode_readings_payload(readings, dst);
        let len = dst.len() - start - LENGTH_PREFIX_BYTES;
        if len > self.max {
            dst.truncate(start);
            return Err(FrameError::Oversize { len, max: self.max });
        }
        // Invariant: len <= max <= MAX_PAYLOAD_BYTES < u32::MAX.
        let prefix = u32::try_from(len).expect("frame length bounded by MAX_PAYLOAD_BYTES");
        dst[start..start + LENGTH_PREFIX_BYTES].copy_from_slice(&prefix.to_le_bytes());
        Ok(())
    }
}

/// Codec for the agent → sensor direction: cumulative committed-frame counts.
#[derive(Debug)]
pub struct AckFrameCodec {
    framing: Framing,
}

impl Default for AckFrameCodec {
    fn default() -> Self {
        Self { framing: Framing::new(ACK_PAYLOAD_BYTES) }
    }
}

impl AckFrameCodec {
    /// Decodes one ack payload (version byte + `u64` LE count).
    ///
    /// # Errors
    /// Empty, unknown version, truncated or overlong payloads.
    pub fn decode_payload(payload: &[u8]) -> Result<u64, DecodeError> {
        let body = split_version(payload, ACK_FRAME_VERSION, ACK_PAYLOAD_BYTES)?;
        match <[u8; 8]>::try_from(body) {
            Ok(bytes) => Ok(u64::from_le_bytes(bytes)),
            Err(_) if body.len() < 8 => Err(DecodeError::Truncated),
            Err(_) => Err(DecodeError::TrailingBytes(body.len() - 8)),
        }
    }
}

impl Decoder for AckFrameCodec {
    type Item = u64;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<u64>, FrameError> {
        match self.framing.decode(src)? {
            Some(payload) => Ok(Some(Self::decode_payload(&payload)?)),
            None => Ok(None),
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<u64>, FrameError> {
        match self.decode(src)? {
            Some(ack) => Ok(Some(ack)),
            None => self.framing.check_eof(src).map(|()| None),
        }
    }
}

impl Encoder<u64> for AckFrameCodec {
    type Error = FrameError;

    fn encode(&mut self, committed_frames: u64, dst: &mut BytesMut) -> Result<(), FrameError> {
        dst.reserve(LENGTH_PREFIX_BYTES + ACK_PAYLOAD_BYTES);
        dst.put_u32_le(ACK_PAYLOAD_BYTES as u32);
        dst.put_u8(ACK_FRAME_VERSION);
        dst.put_u64_le(committed_frames);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readings() -> Vec<Reading> {
        vec![
            Reading::new("temperature-0", 1_700_000_000_000_000, 21.5),
            Reading::new("temperature-1", 1_700_000_000_000_001, -3.25),
        ]
    }

    #[test]
    fn frames_round_trip_through_the_codec() {
        let mut codec = SensorFrameCodec::default();
        let mut buf = BytesMut::new();
        codec.encode(&readings()[..], &mut buf).unwrap();
        codec.encode(&readings()[..1], &mut buf).unwrap();
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(readings()));
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(readings()[..1].to_vec()));
        assert_eq!(codec.decode(&mut buf).unwrap(), None);
    }

    #[test]
    fn a_partial_frame_waits_for_more_bytes() {
        let mut codec = SensorFrameCodec::default();
        let mut full = BytesMut::new();
        codec.encode(&readings()[..], &mut full).unwrap();
        let mut part = BytesMut::from(&full[..full.len() - 3]);
        assert_eq!(codec.decode(&mut part).unwrap(), None);
        part.extend_from_slice(&full[full.len() - 3..]);
        assert_eq!(codec.decode(&mut part).unwrap(), Some(readings()));
    }

    #[test]
    fn eof_inside_a_frame_is_an_error_and_clean_eof_is_none() {
        let mut codec = SensorFrameCodec::default();
        let mut full = BytesMut::new();
        codec.encode(&readings()[..], &mut full).unwrap();
        let mut part = BytesMut::from(&full[..5]);
        assert!(matches!(codec.decode_eof(&mut part), Err(FrameError::Truncated { buffered: 5 })));
        assert!(matches!(SensorFrameCodec::default().decode_eof(&mut BytesMut::new()), Ok(None)));
    }

    #[test]
    fn payload_bytes_that_look_like_a_huge_prefix_are_not_mistaken_for_one() {
        // A frame whose payload starts (after the version byte) with 0xff..:
        // while its prefix has been consumed and the payload is incomplete,
        // the buffered payload must not be read as a length prefix.
        let mut codec = SensorFrameCodec::new(64);
        let r = vec![Reading::new("\u{ff}\u{ff}", 1_700_000_000_000_000, 1.0)];
        let mut full = BytesMut::new();
        codec.encode(&r[..], &mut full).unwrap();
        let mut buf = BytesMut::from(&full[..6]);
        assert_eq!(codec.decode(&mut buf).unwrap(), None);
        buf.extend_from_slice(&[0xff; 0][..]);
        buf.extend_from_slice(&full[6..full.len() - 1]);
        assert_eq!(codec.decode(&mut buf).unwrap(), None);
        buf.extend_from_slice(&full[full.len() - 1..]);
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(r));
    }

    #[test]
    fn an_oversize_length_prefix_is_refused_before_buffering() {
        let mut codec = SensorFrameCodec::new(1024);
        let mut buf = BytesMut::new();
        buf.put_u32_le(u32::MAX); // a 4 GiB frame announced, nothing behind it
        assert!(
            matches!(codec.decode(&mut buf), Err(FrameError::Oversize { len, max: 1024 }) if len == u32::MAX as usize)
        );
    }

    #[test]
    fn encoding_more_than_the_limit_fails_and_leaves_the_buffer_unchanged() {
        let mut codec = SensorFrameCodec::new(16);
        let mut buf = BytesMut::from(&b"xy"[..]);
        assert!(matches!(codec.encode(&readings()[..], &mut buf), Err(FrameError::Oversize { .. })));
        assert_eq!(&buf[..], b"xy");
    }

    #[test]
    fn an_unknown_version_is_a_payload_error() {
        let mut codec = SensorFrameCodec::default();
        let mut buf = BytesMut::new();
        buf.put_u32_le(9);
        buf.put_u8(2);
        buf.put_u64_le(0);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(FrameError::Payload(DecodeError::UnknownVersion { found: 2, expected: 1 }))
        ));
    }

    #[test]
    fn acks_round_trip() {
        let mut codec = AckFrameCodec::default();
        let mut buf = BytesMut::new();
        codec.encode(7, &mut buf).unwrap();
        codec.encode(u64::MAX, &mut buf).unwrap();
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(7));
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(u64::MAX));
    }

    #[test]
    fn ack_payload_errors_are_typed() {
        assert_eq!(AckFrameCodec::decode_payload(&[]), Err(DecodeError::Empty));
        assert_eq!(AckFrameCodec::decode_payload(&[1, 0, 0]), Err(DecodeError::Truncated));
        assert_eq!(
            AckFrameCodec::decode_payload(&[9, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(DecodeError::UnknownVersion { found: 9, expected: 1 })
        );
        assert!(matches!(AckFrameCodec::decode_payload(&[1; 10]), Err(DecodeError::Oversize { .. })));
    }
}
