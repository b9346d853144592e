//! Query-string parsing and validation for `/api/`: pure functions, no I/O.
//!
//! # Invariants
//! - Every parameter is checked before any query is built: client ids by the
//!   wire's rule ([`validate_client_id`]), sensor names by
//!   [`validate_sensor`], numbers as plain decimal digits within fixed bounds.
//! - Unknown and repeated parameters are refused (a typo must not silently
//!   fall back to a default), as is percent-encoding that is not UTF-8.
//! - Validated values still reach ClickHouse only through `.bind()`: a sensor
//!   name such as `' OR 1=1 --` is a legal name and must match nothing.

use std::collections::BTreeMap;

use telemetry_wire::batch::validate_client_id;
use telemetry_wire::reading::validate_sensor;

/// Longest query string accepted, bytes.
pub const MAX_QUERY_BYTES: usize = 2048;
/// Default and bounds of `minutes` (`/api/series`).
pub const MINUTES: Bounds = Bounds { name: "minutes", default: 60, min: 1, max: 1440 };
/// Default and bounds of `limit` (`/api/errors`).
pub const ERRORS_LIMIT: Bounds = Bounds { name: "limit", default: 20, min: 1, max: 1000 };
/// Default and bounds of `limit` (`/api/clients`).
pub const CLIENTS_LIMIT: Bounds = Bounds { name: "limit", default: 1000, min: 1, max: 10_000 };
/// Default and bounds of `window_s` (`/api/clients`: the readings/s window).
pub const RATE_WINDOW: Bounds = Bounds { name: "window_s", default: 60, min: 1, max: 3600 };

/// A bad request: the reason goes back to the caller as JSON with HTTP 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadRequest(pub String);

fn bad(reason: impl Into<String>) -> BadRequest {
    BadRequest(reason.into())
}

/// Bounds of an integer parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// The parameter's name.
    pub name: &'static str,
    /// Used when the parameter is absent.
    pub default: u32,
    /// Smallest accepted value.
    pub min: u32,
    /// Largest accepted value.
    pub max: u32,
}

/// The decoded parameters of one request.
#[derive(Debug, Default)]
pub struct Params(BTreeMap<String, String>);

impl Params {
    /// Decodes `raw` (the part after `?`, if any), accepting only `allowed` names.
    ///
    /// # Errors
    /// Too long, bad percent-encoding, not UTF-8, an unknown or repeated name.
    pub fn parse(raw: Option<&str>, allowed: &[&str]) -> Result<Self, BadRequest> {
        let raw = raw.unwrap_or("");
        if raw.len() > MAX_QUERY_BYTES {
            return Err(bad(format!("query string longer than {MAX_QUERY_BYTES} bytes")));
        }
        let mut map = BTreeMap::new();
        for pair in raw.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let name = decode(name)?;
            let value = decode(value)?;
            if !allowed.contains(&name.as_str()) {
                let name: String = name.chars().take(40).collect();
                return Err(bad(format!("unknown parameter {name:?}; allowed: {}", allowed.join(", "))));
            }
            if map.insert(name.clone(), value).is_some() {
                return Err(bad(format!("parameter {name:?} given more than once")));
            }
        }
        Ok(Self(map))
    }

    /// A required, valid client id.
    ///
    /// # Errors
    /// Missing or not `[A-Za-z0-9_.-]{1,64}`.
    pub fn client_id(&self) -> Result<String, BadRequest> {
        self.optional_client_id()?.ok_or_else(|| bad("parameter \"client_id\" is required"))
    }

    /// An optional, valid client id.
    ///
    /// # Errors
    /// Present but not `[A-Za-z0-9_.-]{1,64}`.
    pub fn optional_client_id(&self) -> Result<Option<String>, BadRequest> {
        match self.0.get("client_id") {
            None => Ok(None),
            Some(v) => validate_client_id(v).map(|()| Some(v.clone())).map_err(|e| bad(format!("client_id: {e}"))),
        }
    }

    /// An optional, valid sensor name.
    ///
    /// # Errors
    /// Present but empty, longer than 128 bytes or with control characters.
    pub fn optional_sensor(&self) -> Result<Option<String>, BadRequest> {
        match self.0.get("sensor") {
            None => Ok(None),
            Some(v) => validate_sensor(v).map(|()| Some(v.clone())).map_err(|e| bad(format!("sensor: {e}"))),
        }
    }

    /// An integer within `bounds`, or its default when absent.
    ///
    /// # Errors
    /// Not plain decimal digits, or out of bounds.
    pub fn int(&self, bounds: Bounds) -> Result<u32, BadRequest> {
        let Some(v) = self.0.get(bounds.name) else { return Ok(bounds.default) };
        let Bounds { name, min, max, .. } = bounds;
        let out_of_range = || bad(format!("{name} must be an integer from {min} to {max}"));
        // Digits only: no sign, spaces, exponent or fraction; ten digits fit a u64.
        if v.is_empty() || v.len() > 10 || !v.bytes().all(|b| b.is_ascii_digit()) {
            return Err(out_of_range());
        }
        let n: u64 = v.parse().map_err(|_| out_of_range())?;
        if n < u64::from(min) || n > u64::from(max) {
            return Err(out_of_range());
        }
        // Invariant: n <= max, a u32.
        Ok(n as u32)
    }
}

/// Percent-decodes one `application/x-www-form-urlencoded` component.
///
/// # Errors
/// Bad percent-encoding, or bytes that are not UTF-8.
pub fn decode(component: &str) -> Result<String, BadRequest> {
    let bytes = component.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
                    // Invariant: two hex digits make at most 255.
                    (Some(hi), Some(lo)) => out.push((hi * 16 + lo) as u8),
                    _ => return Err(bad("bad percent-encoding in the query string")),
                }
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| bad("query string is not UTF-8 after percent-decoding"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: &[&str] = &["client_id", "sensor", "minutes", "limit"];

    fn parse(raw: &str) -> Result<Params, BadRequest> {
        Params::parse(Some(raw), ALL)
    }

    #[test]
    fn plain_parameters_are_decoded() {
        let p = parse("client_id=edge-01&sensor=temp%20in+hall&minutes=30").unwrap();
        assert_eq!(p.client_id().unwrap(), "edge-01");
        assert_eq!(p.optional_sensor().unwrap().as_deref(), Some("temp in hall"));
        assert_eq!(p.int(MINUTES).unwrap(), 30);
    }

    #[test]
    fn absent_parameters_take_their_defaults() {
        let p = Params::parse(None, ALL).unwrap();
        assert_eq!(p.int(MINUTES).unwrap(), 60);
        assert_eq!(p.optional_sensor().unwrap(), None);
        assert_eq!(p.client_id().unwrap_err().0, "parameter \"client_id\" is required");
    }

    #[test]
    fn injection_attempts_in_client_ids_are_refused() {
        for id in ["' OR 1=1 --", "a`b", "a'b", "dev%00", "dev;DROP", "dév", "👀", "a b", "", &"x".repeat(65)] {
            let raw = format!("client_id={}", id.replace('%', "%25").replace(' ', "%20"));
            let p = parse(&raw).unwrap();
            assert!(p.client_id().is_err(), "{id:?} accepted");
        }
    }

    #[test]
    fn sensor_names_follow_the_wire_rules() {
        // Quotes and unicode are legal names (bound, never spliced)...
        for ok in ["' OR 1=1 --", "température", "a`b", "a?b", "a\\'b"] {
            let raw = format!("sensor={}", ok.replace('%', "%25"));
            assert_eq!(parse(&raw).unwrap().optional_sensor().unwrap().as_deref(), Some(ok), "{ok:?}");
        }
        // ...empty, control characters and oversize are not.
        for raw in ["sensor=", "sensor=a%0Ab", "sensor=a%00b"] {
            assert!(parse(raw).unwrap().optional_sensor().is_err(), "{raw}");
        }
        assert!(parse(&format!("sensor={}", "s".repeat(129))).unwrap().optional_sensor().is_err());
    }

    #[test]
    fn numbers_must_be_plain_digits_within_bounds() {
        for bad_value in ["-5", "0", "1441", "+5", " 5", "5 ", "1e3", "3.5", "0x10", "99999999999999999999", "", "٣"] {
            let raw = format!("minutes={}", bad_value.replace(' ', "%20").replace('+', "%2B"));
            let err = parse(&raw).unwrap().int(MINUTES).unwrap_err();
            assert_eq!(err.0, "minutes must be an integer from 1 to 1440", "{bad_value:?}");
        }
        assert_eq!(parse("minutes=1440").unwrap().int(MINUTES).unwrap(), 1440);
        assert_eq!(parse("minutes=0001").unwrap().int(MINUTES).unwrap(), 1);
    }

    #[test]
    fn unknown_repeated_and_malformed_parameters_are_refused() {
        assert!(parse("client=a").unwrap_err().0.starts_with("unknown parameter \"client\""));
        assert!(parse("minutes=5&minutes=6").unwrap_err().0.contains("more than once"));
        assert!(parse("sensor=%zz").is_err());
        assert!(parse("sensor=%4").is_err());
        assert!(parse("sensor=%ff%fe").unwrap_err().0.contains("UTF-8"));
        assert!(parse(&"a".repeat(MAX_QUERY_BYTES + 1)).unwrap_err().0.contains("longer than"));
    }
}
