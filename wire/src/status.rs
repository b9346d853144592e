//! The retained status message an agent publishes on
//! `/telemetry/status/<client_id>` every few seconds, so dashboards can show
//! each device's outbox backlog. JSON, because it is small, infrequent and
//! read by people with `mosquitto_sub` as often as by the ingest server.

use serde::{Deserialize, Serialize};

/// Version written in [`AgentStatus::version`].
pub const STATUS_VERSION: u32 = 1;

/// One agent's state at one instant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
