//! Dead letters: messages the server cannot store as readings, kept verbatim
//! in `ingest_errors` (topic, received time, reason, error text, raw bytes).
//!
//! A dead letter is PUBACKed only after its row is inserted, like a reading,
//! so that a bad message never blocks the session and is never lost without
//! trace. Reasons are a small fixed set (see [`crate::metrics::DEAD_LETTER_REASONS`]).

use bytes::Bytes;
use clickhouse::Row;
use serde::Serialize;

/// Most payload bytes kept in a dead letter. Anyone who can publish on a
/// client topic can send a 256 MiB message; storing it whole would let
/// garbage fill ClickHouse. The first 64 KiB are plenty to diagnose it, and
/// the error text records the full size.
pub const MAX_DEAD_LETTER_PAYLOAD: usize = 64 << 10;

/// One message for `ingest_errors`.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// When it was received, Unix seconds.
    pub received_at: u32,
    /// The topic it arrived on.
    pub topic: String,
    /// The topic's last level (the claimed client id), if any.
    pub client_id: String,
    /// Short reason (metric label).
    pub reason: &'static str,
    /// Human-readable error.
    pub error: String,
    /// The payload as received.
    pub payload: Bytes,
}

impl DeadLetter {
    /// A dead letter for a message received now; payloads beyond
    /// [`MAX_DEAD_LETTER_PAYLOAD`] are truncated (and say so in `error`).
    #[must_use]
    pub fn now(topic: &str, client_id: &str, reason: &'static str, error: String, payload: Bytes) -> Self {
        let (error, payload) = if payload.len() > MAX_DEAD_LETTER_PAYLOAD {
            let note = format!("{error} (payload of {} bytes, first {MAX_DEAD_LETTER_PAYLOAD} kept)", payload.len());
            (note, payload.slice(..MAX_DEAD_LETTER_PAYLOAD))
        } else {
            (error, payload)
        };
        Self {
            received_at: unix_seconds(),
            topic: topic.to_owned(),
            client_id: client_id.to_owned(),
            reason,
            error,
            payload,
        }
    }
}

/// Current Unix time in whole seconds (as ClickHouse `DateTime`).
#[must_use]
pub fn unix_seconds() -> u32 {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    u32::try_from(secs).unwrap_or(u32::MAX)
}

/// Raw bytes written as a ClickHouse `String` (RowBinary: length + bytes).
#[derive(Debug)]
pub(crate) struct RawBytes<'a>(pub &'a [u8]);

impl Serialize for RawBytes<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.0)
    }
}

/// The `ingest_errors` row.
#[derive(Debug, Row, Serialize)]
pub(crate) struct DeadLetterRow<'a> {
    pub received_at: u32,
    pub topic: &'a str,
    pub client_id: &'a str,
    pub reason: &'a str,
    pub error: &'a str,
    pub payload: RawBytes<'a>,
}

impl<'a> From<&'a DeadLetter> for DeadLetterRow<'a> {
    fn from(d: &'a DeadLetter) -> Self {
        Self {
            received_at: d.received_at,
            topic: &d.topic,
            client_id: &d.client_id,
            reason: d.reason,
            error: &d.error,
            payload: RawBytes(&d.payload),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_payload_is_truncated_and_its_size_recorded() {
        let d = DeadLetter::now("/t/client/x", "x", "oversize", "too big".into(), Bytes::from(vec![7u8; 3 << 20]));
        assert_eq!(d.payload.len(), MAX_DEAD_LETTER_PAYLOAD);
        assert!(d.error.contains("3145728 bytes"), "{}", d.error);
    }

    #[test]
    fn a_small_payload_is_kept_verbatim() {
        let d = DeadLetter::now("/t/client/x", "x", "empty", "e".into(), Bytes::from_static(b"abc"));
        assert_eq!(&d.payload[..], b"abc");
        assert_eq!(d.error, "e");
    }
}
