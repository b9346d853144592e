//! The reading: one sensor value at one instant, and what makes it valid.

use bincode::{Decode, Encode};

/// Earliest accepted timestamp: 2000-01-01T00:00:00Z in Unix microseconds.
/// Anything earlier is a sensor with an unset clock, not a measurement.
pub const MIN_TS_MICROS: i64 = 946_684_800_000_000;
/// Latest accepted timestamp: 2100-01-01T00:00:00Z in Unix microseconds.
/// The agent applies a tighter "not in the future" check of its own.
pub const MAX_TS_MICROS: i64 = 4_102_444_800_000_000;
/// Longest sensor name in bytes. Sensor names become ClickHouse keys and
/// dashboard labels, so they are kept short.
pub const MAX_SENSOR_LEN: usize = 128;

/// One measurement. Its identity, together with the device's `client_id`, is
/// `(client_id, sensor, ts)`: the same reading stored twice counts once.
///
/// Encoded by bincode in field order: `sensor` (u64 LE length + UTF-8 bytes),
/// `ts` (i64 LE), `value` (f64 LE, IEEE 754 bits).
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct Reading {
    /// Sensor name, unique per device, e.g. `temperature-0`.
    pub sensor: String,
    /// Time of the measurement, Unix microseconds (UTC).
    pub ts: i64,
    /// The measured value; must be finite.
    pub value: f64,
}

/// Why a structurally well-formed reading is rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReadingError {
    /// NaN or an infinity: not a measurement, and it breaks every aggregate.
    #[error("value is not finite")]
    NonFiniteValue,
    /// Outside 2000-01-01 ..= 2100-01-01.
    #[error("timestamp {0} µs is outside 2000..2100")]
    TimestampOutOfRange(i64),
    /// Empty sensor name.
    #[error("empty sensor name")]
    EmptySensor,
    /// Sensor name longer than [`MAX_SENSOR_LEN`] bytes.
    #[error("sensor name of {0} bytes is longer than {MAX_SENSOR_LEN}")]
    SensorTooLong(usize),
    /// Sensor name with control characters (would corrupt logs and labels).
    #[error("sensor name contains control characters")]
    SensorControlChars,
}

impl ReadingError {
    /// A short, stable, low-cardinality name for metrics labels.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NonFiniteValue => "non_finite",
            Self::TimestampOutOfRange(_) => "timestamp_range",
            Self::EmptySensor | Self::SensorTooLong(_) | Self::SensorControlChars => "sensor_name",
        }
    }
}

impl Reading {
    /// Creates a reading without validating it; see [`Reading::validate`].
    pub fn new(sensor: impl Into<String>, ts: i64, value: f64) -> Self {
        Self { sensor: sensor.into(), ts, value }
    }

    /// Checks the rules every stored reading obeys.
    ///
    /// # Errors
    /// The first rule the reading breaks.
    pub fn validate(&self) -> Result<(), ReadingError> {
        validate_measurement(self.ts, self.value)?;
        validate_sensor(&self.sensor)
    }

    /// Bytes this reading takes in a bincode payload (used to bound batches).
    #[must_use]
    pub fn encoded_len(&self) -> usize {
        8 + self.sensor.len() + 8 + 8
    }
}

/// Current wall-clock time in Unix microseconds: the unit of [`Reading::ts`].
#[must_use]
pub fn now_micros() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(now.as_micros()).unwrap_or(i64::MAX)
}

/// The rules of [`Reading::validate`] for the value and the timestamp,
/// checked in that order, before the sensor name.
///
/// # Errors
/// A value that is not finite, or a timestamp outside 2000..2100.
pub fn validate_measurement(ts: i64, value: f64) -> Result<(), ReadingError> {
    if !value.is_finite() {
        return Err(ReadingError::NonFiniteValue);
    }
    if !(MIN_TS_MICROS..=MAX_TS_MICROS).contains(&ts) {
        return Err(ReadingError::TimestampOutOfRange(ts));
    }
    Ok(())
}

/// Checks a sensor name against the rules of [`Reading::validate`].
///
/// # Errors
/// Empty, too long, or containing control characters.
pub fn validate_sensor(sensor: &str) -> Result<(), ReadingError> {
    if sensor.is_empty() {
        return Err(ReadingError::EmptySensor);
    }
    if sensor.len() > MAX_SENSOR_LEN {
        return Err(ReadingError::SensorTooLong(sensor.len()));
    }
    if sensor.chars().any(char::is_control) {
        return Err(ReadingError::SensorControlChars);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TS: i64 = 1_700_000_000_000_000;

    #[test]
    fn a_plain_reading_is_valid() {
        assert_eq!(Reading::new("temperature-0", TS, 21.5).validate(), Ok(()));
    }

    #[test]
    fn nan_and_infinities_are_rejected() {
        for v in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert_eq!(Reading::new("t", TS, v).validate(), Err(ReadingError::NonFiniteValue));
        }
    }

    #[test]
    fn timestamps_outside_2000_to_2100_are_rejected() {
        for ts in [0, -1, MIN_TS_MICROS - 1, MAX_TS_MICROS + 1, i64::MAX, i64::MIN] {
            assert_eq!(Reading::new("t", ts, 1.0).validate(), Err(ReadingError::TimestampOutOfRange(ts)));
        }
        assert_eq!(Reading::new("t", MIN_TS_MICROS, 1.0).validate(), Ok(()));
        assert_eq!(Reading::new("t", MAX_TS_MICROS, 1.0).validate(), Ok(()));
    }

    #[test]
    fn bad_sensor_names_are_rejected() {
        assert_eq!(Reading::new("", TS, 1.0).validate(), Err(ReadingError::EmptySensor));
        let long = "x".repeat(MAX_SENSOR_LEN + 1);
        assert_eq!(Reading::new(long, TS, 1.0).validate(), Err(ReadingError::SensorTooLong(MAX_SENSOR_LEN + 1)));
        assert_eq!(Reading::new("a\nb", TS, 1.0).validate(), Err(ReadingError::SensorControlChars));
    }

    #[test]
    fn encoded_len_matches_bincode() {
        let r = Reading::new("pressure-3", TS, 1013.25);
        let bytes = bincode::encode_to_vec(&r, crate::bincode_config()).unwrap();
        assert_eq!(bytes.len(), r.encoded_len());
    }
}
