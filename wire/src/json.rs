//! The text sensor stream: one JSON object per line, so that `nc`, `socat` or
//! a three-line script in any language can feed the agent.
//!
//! ```text
//! {"sensor":"temperature-0","ts":1700000000000000,"value":21.5}
//! {"sensor":"temperature-0","ts":"2023-11-14T22:13:20.000001Z","value":21.6}
//! ```
//!
//! `ts` is Unix microseconds as an integer, or an RFC 3339 string. The agent
//! answers each committed line count with `{"acked":N}` (cumulative lines).
//! Framing (newline, maximum line length) is tokio-util's `LinesCodec`.

use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::Reading;

/// Why a JSON line was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JsonError {
    /// Not a JSON object with the expected fields and types.
    #[error("malformed JSON reading: {0}")]
    Malformed(String),
    /// `ts` was a string but not RFC 3339.
    #[error("timestamp {0:?} is not RFC 3339")]
    BadTimestamp(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonReading {
    sensor: String,
    ts: JsonTs,
    value: f64,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum JsonTs {
    Micros(i64),
    Text(String),
}

#[derive(Serialize)]
struct JsonReadingOut<'a> {
    sensor: &'a str,
    ts: i64,
    value: f64,
}

/// The agent's acknowledgement line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct JsonAck {
    /// Cumulative number of lines of this connection committed to the outbox.
    pub acked: u64,
}

/// Parses one line (without its newline). The reading is *not* validated;
/// see [`Reading::validate`].
///
/// # Errors
/// [`JsonError`] for anything but one object `{sensor, ts, value}`.
pub fn parse_line(line: &str) -> Result<Reading, JsonError> {
    let raw: JsonReading =
        serde_json::from_str(line.trim_end_matches('\r')).map_err(|e| JsonError::Malformed(e.to_string()))?;
    let ts = match raw.ts {
        JsonTs::Micros(ts) => ts,
        JsonTs::Text(text) => parse_rfc3339_micros(&text).ok_or(JsonError::BadTimestamp(text))?,
    };
    Ok(Reading { sensor: raw.sensor, ts, value: raw.value })
}

fn parse_rfc3339_micros(text: &str) -> Option<i64> {
    let at = OffsetDateTime::parse(text, &Rfc3339).ok()?;
    i64::try_from(at.unix_timestamp_nanos().div_euclid(1000)).ok()
}

/// Appends `reading` as one JSON line (with `\n`) to `out`. Non-finite values
/// cannot be written in JSON and come out as `null`, which the agent rejects.
pub fn write_line(reading: &Reading, out: &mut Vec<u8>) {
    let line = JsonReadingOut { sensor: &reading.sensor, ts: reading.ts, value: reading.value };
    // Invariant: serialising plain data into a Vec cannot fail.
    serde_json::to_writer(&mut *out, &line).expect("serialising into memory cannot fail");
    out.push(b'\n');
}

/// The ack line for `acked` cumulative lines, without the newline.
#[must_use]
pub fn ack_line(acked: u64) -> String {
    format!("{{\"acked\":{acked}}}")
}

/// Parses an ack line.
///
/// # Errors
/// [`JsonError::Malformed`] for anything else.
pub fn parse_ack_line(line: &str) -> Result<u64, JsonError> {
    serde_json::from_str::<JsonAck>(line.trim_end_matches('\r'))
        .map(|a| a.acked)
        .map_err(|e| JsonError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_and_rfc3339_timestamps_parse_to_the_same_micros() {
        let a = parse_line(r#"{"sensor":"t","ts":1700000000000001,"value":21.5}"#).unwrap();
        let b = parse_line(r#"{"sensor":"t","ts":"2023-11-14T22:13:20.000001Z","value":21.5}"#).unwrap();
        let c = parse_line(r#"{"sensor":"t","ts":"2023-11-14T23:13:20.000001+01:00","value":21.5}"#).unwrap();
        assert_eq!(a, Reading::new("t", 1_700_000_000_000_001, 21.5));
        assert_eq!(a, b);
        assert_eq!(a, c);
    }

    #[test]
    fn lines_round_trip() {
        let r = Reading::new("pressure-2", 1_700_000_000_123_456, 1013.25);
        let mut out = Vec::new();
        write_line(&r, &mut out);
        assert_eq!(out.last(), Some(&b'\n'));
        let line = std::str::from_utf8(&out[..out.len() - 1]).unwrap();
        assert_eq!(parse_line(line), Ok(r));
    }

    #[test]
    fn malformed_lines_are_typed_errors() {
        for bad in [
            "",
            "{",
            "[]",
            r#"{"sensor":"t","ts":1}"#,
            r#"{"sensor":"t","ts":1,"value":"x"}"#,
            r#"{"sensor":"t","ts":1,"value":1,"extra":2}"#,
            r#"{"sensor":"t","ts":1.5,"value":1}"#,
            r#"{"sensor":"t","ts":1,"value":NaN}"#,
        ] {
            assert!(matches!(parse_line(bad), Err(JsonError::Malformed(_))), "{bad:?}");
        }
        assert!(matches!(parse_line(r#"{"sensor":"t","ts":"yesterday","value":1}"#), Err(JsonError::BadTimestamp(_))));
    }

    #[test]
    fn non_finite_values_cannot_sneak_through_json() {
        let mut out = Vec::new();
        write_line(&Reading::new("t", 1_700_000_000_000_000, f64::NAN), &mut out);
        let line = std::str::from_utf8(&out).unwrap().trim_end();
        assert!(parse_line(line).is_err());
        // An overflowing literal is an error in serde_json, not infinity.
        assert!(parse_line(r#"{"sensor":"t","ts":1700000000000000,"value":1e999}"#).is_err());
    }

    #[test]
    fn ack_lines_round_trip() {
        assert_eq!(parse_ack_line(&ack_line(12)), Ok(12));
    }
}
