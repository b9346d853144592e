//! Counters, gauges and histograms of the ingest server, in a
//! `prometheus-client` registry. Every handle is public so tests read the
//! values directly; [`Metrics::render`] gives the Prometheus text format for
//! `/metrics`. All names start with `telemetry_ingest_`; labels come from small
//! fixed sets (never a client id).

use std::fmt;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Label set of [`Metrics::dead_letters`]: why a message was dead-lettered.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// A short fixed name, e.g. `truncated`, `client_id_mismatch`, `insert_rejected`.
    pub reason: String,
}

/// Label set of [`Metrics::received_messages`]: what kind of topic.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// `batch`, `status` or `other`.
    pub kind: String,
}

/// Label set of [`Metrics::insert_retries`]: which table's insert was retried.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabel {
    /// Table name without database.
    pub table: String,
}

/// Every metric of the ingest server.
pub struct Metrics {
    registry: Registry,
    /// MQTT messages received, by kind.
    pub received_messages: Family<KindLabel, Counter>,
    /// Readings received in decoded batches (duplicates included).
    pub received_readings: Counter,
    /// Readings inserted into `readings`.
    pub inserted_readings: Counter,
    /// Readings skipped because their `(client_id, epoch, seq)` was stored or claimed.
    pub duplicate_readings: Counter,
    /// Batch messages all of whose readings were duplicates.
    pub duplicate_messages: Counter,
    /// Messages written to `ingest_errors`, by reason.
    pub dead_letters: Family<ReasonLabel, Counter>,
    /// Failed ClickHouse requests that were retried, by table.
    pub insert_retries: Family<TableLabel, Counter>,
    /// Rollup passes or markers that failed permanently (raw data unaffected).
    pub rollup_errors: Counter,
    /// Streams forgotten by the dedup memory after the horizon.
    pub dedup_streams_evicted: Counter,
    /// Jobs whose readings were split into several INSERTs (too many daily partitions).
    pub split_inserts: Counter,
    /// `/api/` requests refused because `api_max_concurrent` were being answered.
    pub api_busy: Counter,
    /// Jobs bisected because ClickHouse refused their readings for good.
    pub insert_isolations: Counter,
    /// Messages isolated by bisection and rejected (dead-lettered, reported to agents).
    pub rejected_messages: Counter,
    /// New readings in those messages.
    pub rejected_readings: Counter,
    /// Rollup passes run.
    pub rollup_passes: Counter,
    /// Rollup markers written.
    pub rollup_markers: Counter,
    /// Rollup markers not needed: an unread marker of this server covered the minute.
    pub rollup_markers_spared: Counter,
    /// `(client, minute)` pairs folded into `readings_1m`.
    pub rollup_minutes: Counter,
    /// `(client, minute)` pairs whose raw rows held an identity twice (a
    /// copy not yet merged away) when a pass folded them: recomputed under
    /// `FINAL`.
    pub rollup_duplicate_minutes: Counter,
    /// Age of the oldest marker the last pass found pending, seconds (0: none).
    pub rollup_backlog_seconds: Gauge,
    /// Unix time (seconds, fractional) at which the last readings INSERT
    /// returned; 0 until the first. Freshness for an alert that also fires
    /// when nothing is received, and the exact end of a burst for
    /// `scripts/bench` (a counter polled every 50 ms overshoots it).
    pub last_insert_timestamp_seconds: Gauge<f64, AtomicU64>,
    /// Insert tasks that failed (panicked); their claims were released.
    pub insert_task_failures: Counter,
    /// Stored messages not PUBACKed because their connection was gone.
    pub stale_pubacks: Counter,
    /// Reconnects where the broker had lost this server's session.
    pub mqtt_sessions_lost: Counter,
    /// Messages received from the broker, not yet taken by the batcher.
    pub inbound_queue: Gauge,
    /// 1 while the oldest insert has not completed for `insert_timeout_secs`
    /// (ClickHouse slow or down; `/healthz` answers 503 meanwhile).
    pub insert_stalled: Gauge,
    /// Times an insert took longer than `insert_timeout_secs` to complete.
    pub insert_stalls: Counter,
    /// MQTT messages PUBACKed.
    pub acked_messages: Counter,
    /// Ingest acks published on `<prefix>/ack/<client_id>`.
    pub acks_published: Counter,
    /// MQTT connection errors (each followed by a reconnect with backoff).
    pub mqtt_connection_errors: Counter,
    /// Batches (inserts) completed.
    pub batches: Counter,
    /// Time to store one batch (readings, rollup markers, ranges), seconds.
    pub insert_duration: Histogram,
    /// New readings per flushed batch.
    pub batch_rows: Histogram,
    /// MQTT messages received but not yet PUBACKed (pending + in flight).
    pub unacked_messages: Gauge,
    /// Inserts in flight.
    pub inflight_inserts: Gauge,
    /// 1 while the broker has confirmed this connection's subscriptions.
    pub subscribed: Gauge,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    #[must_use]
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("telemetry_ingest");
        let m = Self {
            received_messages: Family::default(),
            received_readings: Counter::default(),
            inserted_readings: Counter::default(),
            duplicate_readings: Counter::default(),
            duplicate_messages: Counter::default(),
            dead_letters: Family::default(),
            insert_retries: Family::default(),
            rollup_errors: Counter::default(),
            split_inserts: Counter::default(),
            insert_isolations: Counter::default(),
            api_busy: Counter::default(),
            rejected_messages: Counter::default(),
            rejected_readings: Counter::default(),
            dedup_streams_evicted: Counter::default(),
            rollup_passes: Counter::default(),
            rollup_markers: Counter::default(),
            rollup_markers_spared: Counter::default(),
            rollup_minutes: Counter::default(),
            rollup_duplicate_minutes: Counter::default(),
            rollup_backlog_seconds: Gauge::default(),
            last_insert_timestamp_seconds: Gauge::default(),
            insert_task_failures: Counter::default(),
            stale_pubacks: Counter::default(),
            mqtt_sessions_lost: Counter::default(),
            inbound_queue: Gauge::default(),
            insert_stalled: Gauge::default(),
            insert_stalls: Counter::default(),
            acked_messages: Counter::default(),
            acks_published: Counter::default(),
            mqtt_connection_errors: Counter::default(),
            batches: Counter::default(),
            insert_duration: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            batch_rows: Histogram::new(exponential_buckets(1.0, 4.0, 10)),
            unacked_messages: Gauge::default(),
            inflight_inserts: Gauge::default(),
            subscribed: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register("received_messages", "MQTT messages received, by topic kind", m.received_messages.clone());
        registry.register("received_readings", "Readings received in decoded batches", m.received_readings.clone());
        registry.register("inserted_readings", "Readings inserted into ClickHouse", m.inserted_readings.clone());
        registry.register(
            "duplicate_readings",
            "Readings dropped as duplicates by exact seq membership",
            m.duplicate_readings.clone(),
        );
        registry.register(
            "duplicate_messages",
            "Batch messages dropped entirely as duplicates",
            m.duplicate_messages.clone(),
        );
        registry.register("dead_letters", "Messages written to ingest_errors, by reason", m.dead_letters.clone());
        registry.register("insert_retries", "ClickHouse requests retried, by table", m.insert_retries.clone());
        registry.register("rollup_errors", "Rollup passes or markers that failed permanently", m.rollup_errors.clone());
        registry.register(
            "dedup_streams_evicted",
            "Streams forgotten by the dedup memory after the horizon",
            m.dedup_streams_evicted.clone(),
        );
        registry.register(
            "split_inserts",
            "Jobs whose readings were split into several INSERTs to bound the partitions each touches",
            m.split_inserts.clone(),
        );
        registry.register(
            "api_busy",
            "/api/ requests refused (503 busy) because api_max_concurrent were being answered",
            m.api_busy.clone(),
        );
        registry.register(
            "insert_isolations",
            "Jobs bisected because ClickHouse refused their readings for good",
            m.insert_isolations.clone(),
        );
        registry.register(
            "rejected_messages",
            "Messages whose readings ClickHouse refuses alone: dead-lettered and reported to their agents as rejected",
            m.rejected_messages.clone(),
        );
        registry.register(
            "rejected_readings",
            "New readings in rejected messages (dead-lettered, reported to their agents as rejected)",
            m.rejected_readings.clone(),
        );
        registry.register("rollup_passes", "Rollup passes run", m.rollup_passes.clone());
        registry.register("rollup_markers", "Rollup markers written", m.rollup_markers.clone());
        registry.register(
            "rollup_markers_spared",
            "Rollup markers not written because an unread marker already covered the minute",
            m.rollup_markers_spared.clone(),
        );
        registry.register("rollup_minutes", "Client minutes folded into readings_1m", m.rollup_minutes.clone());
        registry.register(
            "rollup_duplicate_minutes",
            "Client minutes whose raw rows held a not yet merged copy of a reading when folded (recomputed under FINAL)",
            m.rollup_duplicate_minutes.clone(),
        );
        registry.register(
            "rollup_backlog_seconds",
            "Age of the oldest pending rollup marker at the last pass",
            m.rollup_backlog_seconds.clone(),
        );
        registry.register(
            "last_insert_timestamp_seconds",
            "Unix time the last readings INSERT returned (0: none since start)",
            m.last_insert_timestamp_seconds.clone(),
        );
        registry.register(
            "insert_task_failures",
            "Insert tasks that failed; their claims were released",
            m.insert_task_failures.clone(),
        );
        registry.register(
            "stale_pubacks",
            "Stored messages not PUBACKed because their connection was gone (redelivered, acked as duplicates)",
            m.stale_pubacks.clone(),
        );
        registry.register(
            "mqtt_sessions_lost",
            "Reconnects that found no broker session",
            m.mqtt_sessions_lost.clone(),
        );
        registry.register("inbound_queue", "Messages received, not yet taken by the batcher", m.inbound_queue.clone());
        registry.register(
            "insert_stalled",
            "1 while the oldest insert has not completed for insert_timeout_secs",
            m.insert_stalled.clone(),
        );
        registry.register(
            "insert_stalls",
            "Inserts that took longer than insert_timeout_secs",
            m.insert_stalls.clone(),
        );
        registry.register("acked_messages", "MQTT messages PUBACKed after their insert", m.acked_messages.clone());
        registry.register("acks_published", "Ingest acks published to agents", m.acks_published.clone());
        registry.register("mqtt_connection_errors", "MQTT connection errors", m.mqtt_connection_errors.clone());
        registry.register("batches", "Batches completed (inserted and acked)", m.batches.clone());
        registry.register_with_unit(
            "insert_duration",
            "Time to store one batch",
            prometheus_client::registry::Unit::Seconds,
            m.insert_duration.clone(),
        );
        registry.register("batch_rows", "New readings per batch", m.batch_rows.clone());
        registry.register("unacked_messages", "MQTT messages held un-PUBACKed", m.unacked_messages.clone());
        registry.register("inflight_inserts", "Batches being inserted", m.inflight_inserts.clone());
        registry.register("subscribed", "1 while the broker confirmed the subscriptions", m.subscribed.clone());
        Self { registry, ..m }
    }

    /// Total dead letters over all reasons.
    #[must_use]
    pub fn dead_letters_total(&self) -> u64 {
        DEAD_LETTER_REASONS.iter().map(|r| self.dead_letters.get_or_create(&reason(r)).get()).sum()
    }

    /// Total insert retries over the main tables.
    #[must_use]
    pub fn insert_retries_total(&self) -> u64 {
        ["readings", "readings_1m", "rollup_queue", "ingested_ranges", "ingest_errors", "agent_status"]
            .iter()
            .map(|t| self.insert_retries.get_or_create(&TableLabel { table: (*t).to_owned() }).get())
            .sum()
    }

    /// The registry in the Prometheus text exposition format.
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Invariant: encoding into a String only fails if fmt::Write fails,
        // which String's implementation never does.
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// Every reason label [`Metrics::dead_letters`] uses.
pub const DEAD_LETTER_REASONS: &[&str] = &[
    "empty",
    "unknown_version",
    "oversize",
    "truncated",
    "trailing_bytes",
    "malformed",
    "invalid_reading",
    "invalid_header",
    "client_id_mismatch",
    "unknown_topic",
    "bad_status",
    "insert_rejected",
    "other",
];

/// The label for `r`.
#[must_use]
pub fn reason(r: &str) -> ReasonLabel {
    let r = if DEAD_LETTER_REASONS.contains(&r) { r } else { "other" };
    ReasonLabel { reason: r.to_owned() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendered_text_uses_the_namespace_and_total_suffix() {
        let m = Metrics::new();
        m.inserted_readings.inc_by(3);
        m.dead_letters.get_or_create(&reason("truncated")).inc();
        let text = m.render();
        assert!(text.contains("telemetry_ingest_inserted_readings_total 3"), "{text}");
        assert!(text.contains("telemetry_ingest_dead_letters_total{reason=\"truncated\"} 1"), "{text}");
        assert!(text.contains("telemetry_ingest_insert_duration_seconds_bucket"), "{text}");
        assert_eq!(m.dead_letters_total(), 1);
    }

    #[test]
    fn unknown_reasons_fold_into_other() {
        assert_eq!(reason("something new").reason, "other");
    }
}
