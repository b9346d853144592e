//! The retained status message an agent publishes on
//! `/telemetry/status/<client_id>` every few seconds, so dashboards can show
//! each device's outbox backlog. JSON, because it is small, infrequent and
//! read by people with `mosquitto_sub` as often as by the ingest server.

use serde::{Deserialize, Serialize};

/// Version written in [`AgentStatus::version`].
pub const STATUS_VERSION: u32 = 1;

/// One agent's state at one instant (`Default`: all zero, the optional
/// fields absent, for building one field by field).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// Format version, [`STATUS_VERSION`].
    pub version: u32,
    /// The device.
    pub client_id: String,
    /// When this status was taken, Unix microseconds.
    pub ts: i64,
    /// Rows waiting in the outbox (not yet confirmed).
    pub outbox_rows: u64,
    /// Approximate bytes of those rows.
    pub outbox_bytes: u64,
    /// Age of the oldest outbox row in seconds (0 when empty).
    pub oldest_age_s: f64,
    /// Readings received from sensors per second, over the last interval.
    pub received_per_s: f64,
    /// Readings confirmed (echo or ingest ack) per second, last interval.
    pub confirmed_per_s: f64,
    /// Whether the agent is connected to the broker.
    pub connected: bool,
    /// Net rows per second leaving the outbox lately (negative: growing),
    /// smoothed. Absent from older agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_per_s: Option<f64>,
    /// Seconds until the outbox is empty at that rate (0 when empty; absent
    /// while it is not shrinking, and from older agents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_eta_s: Option<f64>,
    /// Payload bytes on the wire per reading published so far (absent from
    /// older agents and before the first publish).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_per_reading: Option<f64>,
    /// Echo mode only: whether an ingest server announces a durable
    /// subscription (echoes delete only then). Absent in ingest mode and
    /// from older agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingest_present: Option<bool>,
    /// Echo mode only: batches echoed while no ingest server was announced,
    /// kept in the outbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub echo_held_batches: Option<u64>,
    /// Echo mode only: readings echoed and not yet acked by an ingest server
    /// (held only by the broker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub echo_ahead_readings: Option<u64>,
    /// The last remote command this agent answered (absent before the first
    /// one since it started, and from older agents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_command: Option<LastCommand>,
}

/// A remote command an agent answered, as its status shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastCommand {
    /// The command's id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Whether it was carried out.
    pub ok: bool,
    /// When it was answered, Unix milliseconds.
    pub ts_ms: i64,
    /// One line: `ok`, or the error kind and message.
    pub summary: String,
}

impl AgentStatus {
    /// Encodes as JSON.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        // Invariant: plain data with finite floats serialises; non-finite
        // floats become null rather than failing.
        serde_json::to_vec(self).expect("serialising into memory cannot fail")
    }

    /// Decodes from JSON.
    ///
    /// # Errors
    /// Malformed JSON or missing fields.
    pub fn decode(payload: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::AgentStatus;

    const OLD: &str = r#"{"version":1,"client_id":"dev-1","ts":1700000000000000,"outbox_rows":1200,
        "outbox_bytes":48000,"oldest_age_s":0.8,"received_per_s":1000.0,"confirmed_per_s":998.0,"connected":true}"#;

    #[test]
    fn a_status_without_the_echo_fields_decodes_and_encodes_unchanged() {
        let status = AgentStatus::decode(OLD.as_bytes()).expect("decodes");
        assert_eq!((status.ingest_present, status.echo_held_batches, status.echo_ahead_readings), (None, None, None));
        let text = String::from_utf8(status.encode()).expect("utf-8");
        assert!(!text.contains("ingest_present") && !text.contains("echo_"), "{text}");
    }

    #[test]
    fn the_echo_fields_round_trip() {
        let mut status = AgentStatus::decode(OLD.as_bytes()).expect("decodes");
        status.ingest_present = Some(false);
        status.echo_held_batches = Some(3);
        status.echo_ahead_readings = Some(6000);
        let text = String::from_utf8(status.encode()).expect("utf-8");
        assert!(text.contains(r#""ingest_present":false"#), "{text}");
        assert_eq!(AgentStatus::decode(text.as_bytes()).expect("decodes"), status);
    }
}
