//! Every counter the agent keeps, in a Prometheus registry.
//!
//! Names render as `telemetry_agent_<name>_total` (counters) or
//! `telemetry_agent_<name>` (gauges). Labels come from small fixed sets (a
//! rejection reason), never from a sensor or a client id.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// A rejection reason label (values from `kind()` of the wire errors).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    /// Short, stable reason name.
    pub reason: &'static str,
}

/// The agent's metrics. Cloning shares the same counters.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Readings received from sensors (valid or not).
    pub readings_received: Counter,
    /// Readings rejected (NaN, absurd timestamp, bad sensor name), by reason.
    pub readings_rejected: Family<Reason, Counter>,
    /// Frames / lines that closed their connection (malformed, oversize), by reason.
    pub frames_rejected: Family<Reason, Counter>,
    /// Readings committed to the outbox.
    pub readings_committed: Counter,
    /// Outbox transactions committed.
    pub commits: Counter,
    /// Readings whose frame was acked to the sensor (after commit).
    pub readings_acked: Counter,
    /// Readings published to the broker (first publication of a row in a session).
    pub readings_published: Counter,
    /// Batches published (every publication, republish included).
    pub batches_published: Counter,
    /// Readings confirmed by their echo.
    pub readings_echoed: Counter,
    /// Readings confirmed by an ingest ack.
    pub readings_ingest_acked: Counter,
    /// Readings the ingest server rejected for good (dead-lettered there):
    /// deleted here, never stored in ClickHouse.
    pub readings_rejected_by_ingest: Counter,
    /// Batches published again after their confirm timeout.
    pub batches_republished: Counter,
    /// Readings published again after a reconnect (replay from the outbox).
    pub readings_replayed: Counter,
    /// Outbox rows deleted after confirmation.
    pub rows_deleted: Counter,
    /// Outbox rows dropped at quota (drop-oldest policy).
    pub rows_dropped: Counter,
    /// Times sensors were held back because the outbox was full.
    pub quota_backpressure: Counter,
    /// MQTT (re)connections.
    pub mqtt_connects: Counter,
    /// MQTT connection errors (each followed by a backoff).
    pub mqtt_errors: Counter,
    /// Postgres errors (each followed by a retry).
    pub postgres_errors: Counter,
    /// Confirmations that deleted nothing, by reason: `other_epoch` (of an
    /// earlier start), `not_in_flight` (no batch published and unconfirmed
    /// has exactly this range: a late or duplicate confirmation, or a forged
    /// one), `payload_mismatch` (an echo whose bytes are not the batch's).
    pub confirmations_rejected: Family<Reason, Counter>,
    /// Outbox rollbacks seen at run time (the table's `next_seq` behind the
    /// seqs this agent already gave out: a restored backup, a failover to a
    /// lagging replica). The table is moved forward; no seq is reused.
    pub outbox_rollbacks: Counter,
    /// 1 while an ingest server announces a durable subscription (echo mode
    /// deletes on echo only then).
    pub ingest_present: Gauge,
    /// Batches echoed while no ingest server was announced: kept in the
    /// outbox, published again when one is.
    pub echo_held_batches: Gauge,
    /// Readings echoed (deleted here) and not yet acked by an ingest server:
    /// what lives only in the broker (bounded by `echo_ahead_max_*`).
    pub echo_ahead_readings: Gauge,
    /// Echoed readings that got no ingest ack within `echo_ahead_timeout_secs`.
    pub echo_ahead_expired_readings: Counter,
    /// Reads of rows back from the outbox by the publisher (replay after a
    /// (re)connect, or rows it skipped while behind); never an idle poll.
    pub outbox_reads: Counter,
    /// Age of the oldest outbox row, seconds (0 when empty; updated with
    /// each status message).
    pub outbox_oldest_age_seconds: Gauge,
    /// Seconds until the outbox is empty at its recent net drain rate (0
    /// when empty, -1 while it is not shrinking; updated with each status).
    pub outbox_drain_eta_seconds: Gauge,
    /// Payload bytes of published batches (republished included): over
    /// `readings_published`, the bytes on the wire per reading.
    pub bytes_published: Counter,
    /// Rows in the outbox.
    pub outbox_rows: Gauge,
    /// Bytes of reading data in the outbox.
    pub outbox_bytes: Gauge,
    /// Open sensor connections.
    pub connections: Gauge,
    /// Batches in flight.
    pub inflight_batches: Gauge,
    /// 1 while connected to the broker.
    pub mqtt_connected: Gauge,
    /// Seconds from receiving a frame to acking it to the sensor.
    pub ack_latency_seconds: Histogram,
    /// Seconds per outbox commit.
    pub commit_seconds: Histogram,
    /// Remote commands carried out, by command name.
    pub commands_run: Family<Command, Counter>,
    /// Remote commands not carried out, by reason (an error kind, `expired`
    /// or `busy`).
    pub commands_rejected: Family<Reason, Counter>,
    /// Remote commands answered again from memory (a redelivered id).
    pub commands_repeated: Counter,
    /// 1 while sensor intake is paused by a remote command.
    pub intake_paused: Gauge,
}

/// A remote command's name label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Command {
    /// `status`, `flush`, …
    pub command: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            readings_received: Counter::default(),
            readings_rejected: Family::default(),
            frames_rejected: Family::default(),
            readings_committed: Counter::default(),
            commits: Counter::default(),
            readings_acked: Counter::default(),
            readings_published: Counter::default(),
            batches_published: Counter::default(),
            readings_echoed: Counter::default(),
            readings_ingest_acked: Counter::default(),
            readings_rejected_by_ingest: Counter::default(),
            batches_republished: Counter::default(),
            readings_replayed: Counter::default(),
            rows_deleted: Counter::default(),
            rows_dropped: Counter::default(),
            quota_backpressure: Counter::default(),
            mqtt_connects: Counter::default(),
            mqtt_errors: Counter::default(),
            postgres_errors: Counter::default(),
            confirmations_rejected: Family::default(),
            outbox_rollbacks: Counter::default(),
            ingest_present: Gauge::default(),
            echo_held_batches: Gauge::default(),
            echo_ahead_readings: Gauge::default(),
            echo_ahead_expired_readings: Counter::default(),
            outbox_reads: Counter::default(),
            outbox_oldest_age_seconds: Gauge::default(),
            outbox_drain_eta_seconds: Gauge::default(),
            bytes_published: Counter::default(),
            outbox_rows: Gauge::default(),
            outbox_bytes: Gauge::default(),
            connections: Gauge::default(),
            inflight_batches: Gauge::default(),
            mqtt_connected: Gauge::default(),
            ack_latency_seconds: Histogram::new(exponential_buckets(0.0001, 1.5, 30)),
            commit_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            commands_run: Family::default(),
            commands_rejected: Family::default(),
            commands_repeated: Counter::default(),
            intake_paused: Gauge::default(),
        }
    }
}

impl Metrics {
    /// A registry with every metric, prefixed `telemetry_agent`.
    #[must_use]
    pub fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("telemetry_agent");
        let m = self.clone();
        r.register("readings_received", "Readings received from sensors", m.readings_received);
        r.register("readings_rejected", "Readings rejected as invalid", m.readings_rejected);
        r.register("frames_rejected", "Malformed or oversize frames (connection closed)", m.frames_rejected);
        r.register("readings_committed", "Readings committed to the outbox", m.readings_committed);
        r.register("commits", "Outbox transactions", m.commits);
        r.register("readings_acked", "Readings acked to sensors after commit", m.readings_acked);
        r.register("readings_published", "Readings published", m.readings_published);
        r.register("batches_published", "Batch publications, republishes included", m.batches_published);
        r.register("readings_echoed", "Readings confirmed by echo", m.readings_echoed);
        r.register("readings_ingest_acked", "Readings confirmed by ingest ack", m.readings_ingest_acked);
        r.register(
            "readings_rejected_by_ingest",
            "Readings the ingest server rejected for good (in its ingest_errors); deleted from the outbox",
            m.readings_rejected_by_ingest,
        );
        r.register("batches_republished", "Batches republished after confirm timeout", m.batches_republished);
        r.register("readings_replayed", "Readings replayed from the outbox after a reconnect", m.readings_replayed);
        r.register("rows_deleted", "Outbox rows deleted after confirmation", m.rows_deleted);
        r.register("rows_dropped", "Outbox rows dropped at quota", m.rows_dropped);
        r.register("quota_backpressure", "Times sensors were held back at quota", m.quota_backpressure);
        r.register("mqtt_connects", "MQTT connections", m.mqtt_connects);
        r.register("mqtt_errors", "MQTT connection errors", m.mqtt_errors);
        r.register("postgres_errors", "Postgres errors", m.postgres_errors);
        r.register(
            "confirmations_rejected",
            "Confirmations that deleted nothing (other epoch, not in flight, echo bytes differ)",
            m.confirmations_rejected,
        );
        r.register(
            "outbox_rollbacks",
            "Outbox rollbacks detected (next_seq moved back; moved forward again)",
            m.outbox_rollbacks,
        );
        r.register("ingest_present", "1 while an ingest server announces a durable subscription", m.ingest_present);
        r.register("echo_held_batches", "Echoed batches kept for want of an ingest server", m.echo_held_batches);
        r.register("echo_ahead_readings", "Readings echoed, not yet acked by an ingest server", m.echo_ahead_readings);
        r.register(
            "echo_ahead_expired_readings",
            "Echoed readings never acked by an ingest server within the timeout",
            m.echo_ahead_expired_readings,
        );
        r.register("outbox_reads", "Reads of rows back from the outbox (replay, catch-up)", m.outbox_reads);
        r.register("outbox_oldest_age_seconds", "Age of the oldest outbox row", m.outbox_oldest_age_seconds);
        r.register(
            "outbox_drain_eta_seconds",
            "Seconds until the outbox is empty at its net drain rate (-1: not shrinking)",
            m.outbox_drain_eta_seconds,
        );
        r.register("bytes_published", "Payload bytes of published batches", m.bytes_published);
        r.register("outbox_rows", "Rows in the outbox", m.outbox_rows);
        r.register("outbox_bytes", "Bytes of reading data in the outbox", m.outbox_bytes);
        r.register("connections", "Open sensor connections", m.connections);
        r.register("inflight_batches", "Batches awaiting confirmation", m.inflight_batches);
        r.register("mqtt_connected", "1 while connected to the broker", m.mqtt_connected);
        r.register("ack_latency_seconds", "Frame receive to sensor ack", m.ack_latency_seconds);
        r.register("commit_seconds", "Outbox commit duration", m.commit_seconds);
        r.register("commands_run", "Remote commands carried out", m.commands_run);
        r.register(
            "commands_rejected",
            "Remote commands not carried out (malformed, too_large, unknown_command, bad_arguments, failed, expired, busy)",
            m.commands_rejected,
        );
        r.register("commands_repeated", "Remote commands answered again (redelivered id)", m.commands_repeated);
        r.register("intake_paused", "1 while sensor intake is paused by a remote command", m.intake_paused);
        r
    }

    /// The Prometheus text exposition of every metric.
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Invariant: writing to a String cannot fail.
        prometheus_client::encoding::text::encode(&mut out, &self.registry()).expect("encoding to a String");
        out
    }
}

/// Sum of a labelled counter family over the given reasons (for tests).
#[must_use]
pub fn family_total(family: &Family<Reason, Counter>, reasons: &[&'static str]) -> u64 {
    reasons.iter().map(|&reason| family.get_or_create(&Reason { reason }).get()).sum()
}
