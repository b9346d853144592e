//! Stores one [`Job`] in ClickHouse: dead letters, agent statuses, new
//! readings, then the rollup markers of the minutes they touched, then the
//! stored ranges. Each request is retried ([`Store::retry`]) while the
//! error is retriable; a permanent error on readings turns the job's batch
//! messages into dead letters.
//!
//! # Order, and the crash window
//! readings → `rollup_queue` markers → `ingested_ranges` → (acker) PUBACK →
//! ingest ack. A crash after the readings insert but before the ranges
//! insert leaves readings in ClickHouse that the dedup state does not know.
//! The broker redelivers the unacked message; it is inserted again; the raw
//! table's identity `(client_id, sensor, ts)` makes the copies one
//! (ReplacingMergeTree on merge; `FINAL`/`GROUP BY` identity in every query
//! and in the rollup), and that second insert writes the markers. Because
//! the ranges row is written only after the markers, a range that is
//! "stored" always has its minutes queued for the rollup ([`crate::rollup`]
//! folds them in later, off this path). Nothing here waits for the rollup.

use std::collections::BTreeSet;
use std::sync::{Arc, PoisonError};
use std::time::Instant;

use clickhouse::Row;
use serde::{Deserialize, Serialize};
use tokio::sync::OwnedSemaphorePermit;

use crate::body::{self, Body};
use crate::deadletter::{unix_seconds, DeadLetter, DeadLetterRow};
use crate::dedup::DedupState;
use crate::job::{Job, Outcome};
use crate::metrics::reason;
use crate::rollup::{self, MarkerRow, Touched};
use crate::store::{Store, StoreError};

/// The `ingested_ranges` row.
#[derive(Debug, Row, Serialize)]
struct RangeRow<'a> {
    client_id: &'a str,
    epoch: u64,
    first_seq: u64,
    last_seq: u64,
    inserted_at: u32,
}

/// A stored range as loaded at start.
#[derive(Debug, Row, Deserialize)]
pub struct StoredRange {
    /// The device.
    pub client_id: String,
    /// Its outbox incarnation.
    pub epoch: u64,
    /// First seq, inclusive.
    pub first_seq: u64,
    /// Last seq, inclusive.
    pub last_seq: u64,
}

/// The `agent_status` row. The optional fields are `Nullable` columns
/// (`NULL`: the agent did not send the field; see
/// [`crate::schema::ADDED_STATUS_COLUMNS`]).
#[derive(Debug, Row, Serialize)]
struct StatusRow<'a> {
    client_id: &'a str,
    ts: i64,
    outbox_rows: u64,
    outbox_bytes: u64,
    oldest_age_s: f64,
    received_per_s: f64,
    confirmed_per_s: f64,
    connected: u8,
    received_at: u32,
    drain_per_s: Option<f64>,
    drain_eta_s: Option<f64>,
    bytes_per_reading: Option<f64>,
    ingest_present: Option<u8>,
    echo_held_batches: Option<u64>,
    echo_ahead_readings: Option<u64>,
    last_command_id: Option<&'a str>,
    last_command_name: Option<&'a str>,
    last_command_ok: Option<u8>,
    last_command_ts_ms: Option<i64>,
    last_command_summary: Option<&'a str>,
}

/// The ClickHouse writer shared by all insert tasks.
#[derive(Debug)]
pub struct Writer {
    store: Store,
    owner: String,
    ledger: rollup::SharedLedger,
}

impl Writer {
    /// A writer through `store`; rollup markers name `owner` (this server's
    /// MQTT client id), whose rollup task consumes them; `ledger` (shared
    /// with that task) spares markers for minutes already marked.
    #[must_use]
    pub fn new(store: Store, owner: &str, ledger: rollup::SharedLedger) -> Self {
        Self { store, owner: owner.to_owned(), ledger }
    }

    /// One INSERT of the new readings of `parts` (indices into the job's),
    /// or of those whose day is in `days` (see [`partition_groups`]).
    async fn insert_readings_once(
        &self,
        job: &Job,
        parts: &[usize],
        days: Option<&BTreeSet<i64>>,
    ) -> Result<(), clickhouse::error::Error> {
        let mut body = Body::new(job, parts, |ts| days.is_none_or(|d| d.contains(&day_of(ts))));
        let sql = format!("INSERT INTO {}({}) FORMAT RowBinary", self.store.tables().readings, body::COLUMNS);
        let mut insert = self.store.client().insert_formatted_with(sql);
        while let Some(chunk) = body.next_chunk() {
            insert.send(chunk).await?;
        }
        insert.end().await
    }

    async fn insert_markers_once(&self, markers: &[MarkerRow]) -> Result<(), clickhouse::error::Error> {
        let mut insert = self.store.client().insert_unescaped::<MarkerRow>(&self.store.tables().rollup_queue).await?;
        for m in markers {
            insert.write(m).await?;
        }
        insert.end().await
    }

    async fn insert_ranges_once(&self, job: &Job) -> Result<(), clickhouse::error::Error> {
        let now = unix_seconds();
        let mut insert =
            self.store.client().insert_unescaped::<RangeRow<'_>>(&self.store.tables().ingested_ranges).await?;
        for part in &job.parts {
            for &(lo, hi) in &part.fresh {
                insert
                    .write(&RangeRow {
                        client_id: &part.batch.client_id,
                        epoch: part.batch.epoch,
                        first_seq: lo,
                        last_seq: hi,
                        inserted_at: now,
                    })
                    .await?;
            }
        }
        insert.end().await
    }

    async fn insert_dead_letters_once(&self, dead: &[DeadLetter]) -> Result<(), clickhouse::error::Error> {
        let mut insert =
            self.store.client().insert_unescaped::<DeadLetterRow<'_>>(&self.store.tables().ingest_errors).await?;
        for d in dead {
            insert.write(&DeadLetterRow::from(d)).await?;
        }
        insert.end().await
    }

    async fn insert_statuses_once(&self, job: &Job) -> Result<(), clickhouse::error::Error> {
        let mut insert =
            self.store.client().insert_unescaped::<StatusRow<'_>>(&self.store.tables().agent_status).await?;
        for (status, received_at) in &job.statuses {
            let last = status.last_command.as_ref();
            insert
                .write(&StatusRow {
                    client_id: &status.client_id,
                    ts: status.ts,
                    outbox_rows: status.outbox_rows,
                    outbox_bytes: status.outbox_bytes,
                    oldest_age_s: finite(status.oldest_age_s),
                    received_per_s: finite(status.received_per_s),
                    confirmed_per_s: finite(status.confirmed_per_s),
                    connected: u8::from(status.connected),
                    received_at: *received_at,
                    drain_per_s: status.drain_per_s.filter(|v| v.is_finite()),
                    drain_eta_s: status.drain_eta_s.filter(|v| v.is_finite()),
                    bytes_per_reading: status.bytes_per_reading.filter(|v| v.is_finite()),
                    ingest_present: status.ingest_present.map(u8::from),
                    echo_held_batches: status.echo_held_batches,
                    echo_ahead_readings: status.echo_ahead_readings,
                    last_command_id: last.map(|c| clip(&c.id, LAST_COMMAND_TEXT_MAX)),
                    last_command_name: last.map(|c| clip(&c.name, LAST_COMMAND_TEXT_MAX)),
                    last_command_ok: last.map(|c| u8::from(c.ok)),
                    last_command_ts_ms: last.map(|c| c.ts_ms),
                    last_command_summary: last.map(|c| clip(&c.summary, LAST_COMMAND_TEXT_MAX)),
                })
                .await?;
        }
        insert.end().await
    }

    async fn store_dead_letters(&self, dead: &[DeadLetter]) -> Result<(), StoreError> {
        if dead.is_empty() {
            return Ok(());
        }
        match self.store.retry("ingest_errors", || self.insert_dead_letters_once(dead)).await {
            Ok(()) => {
                for d in dead {
                    self.store.metrics().dead_letters.get_or_create(&reason(d.reason)).inc();
                }
                Ok(())
            }
            Err(StoreError::Permanent(error) | StoreError::Exhausted { error, .. }) => {
                // Nowhere left to put them: log every one, then let them be acked.
                for d in dead {
                    tracing::error!(topic = %d.topic, reason = d.reason, %error, bytes = d.payload.len(),
                        "dead letter could not be stored; dropped");
                }
                Ok(())
            }
            Err(StoreError::Stopped) => Err(StoreError::Stopped),
        }
    }

    /// Stores everything in `job`; see the module docs for the order.
    /// `permit` (a slot of `max_inflight_inserts`) is released as soon as the
    /// readings are in: the next job's readings INSERT overlaps this job's
    /// small marker and range inserts.
    pub async fn store(self: Arc<Self>, mut job: Job, permit: OwnedSemaphorePermit) -> Outcome {
        let started = Instant::now();
        let abandoned = |job| Outcome { job, stored: false, abandoned: true };
        if self.store_dead_letters(&job.dead).await.is_err() {
            return abandoned(job);
        }
        if !job.statuses.is_empty() {
            match self.store.retry("agent_status", || self.insert_statuses_once(&job)).await {
                Ok(()) => {}
                Err(StoreError::Permanent(error) | StoreError::Exhausted { error, .. }) => {
                    tracing::error!(%error, count = job.statuses.len(), "agent statuses could not be stored; dropped");
                }
                Err(StoreError::Stopped) => return abandoned(job),
            }
        }
        if job.rows == 0 {
            return Outcome { job, stored: true, abandoned: false };
        }
        // One pass over the new readings: their minutes (rollup markers)
        // also give the daily partitions the insert touches.
        let all: Vec<usize> = (0..job.parts.len()).collect();
        let mut touched = Touched::of(&job);
        match self.insert_readings(&job, &all, &touched.days()).await {
            Ok(()) => {}
            Err(StoreError::Permanent(error) | StoreError::Exhausted { error, .. }) => {
                match self.isolate(&mut job, error).await {
                    Ok(()) => touched = Touched::of(&job),
                    Err(_) => return abandoned(job),
                }
            }
            Err(StoreError::Stopped) => return abandoned(job),
        }
        drop(permit);
        self.store.metrics().inserted_readings.inc_by(job.rows as u64);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        self.store.metrics().last_insert_timestamp_seconds.set(now.map_or(0.0, |d| d.as_secs_f64()));
        // Asked only now that the readings are in: see MarkLedger.
        let asked = tokio::time::Instant::now();
        let need = self.ledger.lock().unwrap_or_else(PoisonError::into_inner).to_mark(&touched, asked);
        let m = self.store.metrics();
        m.rollup_markers.inc_by(need.len() as u64);
        m.rollup_markers_spared.inc_by((touched.len() - need.len()) as u64);
        if !need.is_empty() {
            let markers = rollup::markers(&need, &self.owner, fastrand::u64(..));
            match self.store.retry("rollup_queue", || self.insert_markers_once(&markers)).await {
                Ok(()) => self.ledger.lock().unwrap_or_else(PoisonError::into_inner).marked(&need, asked),
                Err(StoreError::Permanent(error) | StoreError::Exhausted { error, .. }) => {
                    // Not acked: the broker redelivers the messages and the
                    // markers are tried again then.
                    self.store.metrics().rollup_errors.inc();
                    tracing::error!(%error, "rollup markers could not be stored; batch left for redelivery");
                    return abandoned(job);
                }
                Err(StoreError::Stopped) => return abandoned(job),
            }
        }
        let ranges = if job.parts.is_empty() {
            Ok(()) // every part was rejected
        } else {
            self.store.retry("ingested_ranges", || self.insert_ranges_once(&job)).await
        };
        match ranges {
            Ok(()) => {}
            Err(StoreError::Permanent(error) | StoreError::Exhausted { error, .. }) => {
                // Readings are stored; only the dedup memory of a restart is
                // weaker (replays get inserted again and collapse by identity).
                tracing::error!(%error, "stored ranges could not be recorded");
            }
            Err(StoreError::Stopped) => return abandoned(job),
        }
        self.store.metrics().insert_duration.observe(started.elapsed().as_secs_f64());
        Outcome { job, stored: true, abandoned: false }
    }

    /// The job's new readings, in one INSERT, or in one per group of at
    /// most [`MAX_PARTITIONS_PER_INSERT`] days when they span more (a device
    /// with a bad clock, a replayed months-long backlog): current ClickHouse
    /// refuses an INSERT touching more than 100 partitions
    /// (`max_partitions_per_insert_block`, Code 252), which would otherwise
    /// stall every client's readings behind that job. A retry repeats a
    /// group whole; readings already in from an earlier group collapse by
    /// identity.
    async fn insert_readings(&self, job: &Job, parts: &[usize], days: &BTreeSet<i64>) -> Result<(), StoreError> {
        self.insert_readings_within(job, parts, days, false).await
    }

    /// [`Writer::insert_readings`]; `piece` (a part of a job being bisected)
    /// gives up at the first refusal instead of spending the retry budget.
    async fn insert_readings_within(
        &self,
        job: &Job,
        parts: &[usize],
        days: &BTreeSet<i64>,
        piece: bool,
    ) -> Result<(), StoreError> {
        let groups = if days.len() <= MAX_PARTITIONS_PER_INSERT { vec![] } else { partition_groups(days) };
        if !groups.is_empty() {
            tracing::info!(days = days.len(), inserts = groups.len(), "readings span many daily partitions; split");
        }
        if groups.is_empty() {
            return self.insert_group(job, parts, None, piece).await;
        }
        for group in &groups {
            self.insert_group(job, parts, Some(group), piece).await?;
        }
        self.store.metrics().split_inserts.inc();
        Ok(())
    }

    async fn insert_group(
        &self,
        job: &Job,
        parts: &[usize],
        group: Option<&BTreeSet<i64>>,
        piece: bool,
    ) -> Result<(), StoreError> {
        let attempt = || self.insert_readings_once(job, parts, group);
        if piece {
            self.store.retry_until_refused("readings", attempt).await
        } else {
            self.store.retry_budgeted("readings", attempt).await
        }
    }

    /// After the job's readings insert failed for good (`error`): bisects
    /// the job's parts, storing every half ClickHouse takes, down to single
    /// messages. A single message is rejected when ClickHouse refuses it
    /// with a known data error, or refuses it past the retry budget while it
    /// accepts a probe insert (so the refusal is about this data, not an
    /// outage: then it is retried like any outage). Rejected parts leave the
    /// job: their messages are dead-lettered with the error, their ranges go
    /// to [`Job::rejected`] (released, and reported to the agent), and the
    /// rest of the job carries on as stored.
    ///
    /// # Errors
    /// [`StoreError::Stopped`], or a dead letter that could not be stored.
    async fn isolate(&self, job: &mut Job, error: clickhouse::error::Error) -> Result<(), StoreError> {
        let m = self.store.metrics().clone();
        m.insert_isolations.inc();
        tracing::warn!(%error, messages = job.parts.len(), "ClickHouse refuses this job's readings; bisecting it to the messages it refuses");
        let mut rejected: Vec<(usize, String)> = Vec::new();
        let mut failed: Vec<(Vec<usize>, clickhouse::error::Error)> = vec![((0..job.parts.len()).collect(), error)];
        while let Some((parts, error)) = failed.pop() {
            if let [only] = parts[..] {
                if let Some(reason) = self.refused_alone(job, only, error).await? {
                    rejected.push((only, reason));
                }
                continue;
            }
            let (left, right) = parts.split_at(parts.len() / 2);
            for half in [left, right] {
                match self.insert_readings_within(job, half, &days_of(job, half), true).await {
                    Ok(()) => {}
                    Err(StoreError::Permanent(e) | StoreError::Exhausted { error: e, .. }) => {
                        failed.push((half.to_vec(), e));
                    }
                    Err(StoreError::Stopped) => return Err(StoreError::Stopped),
                }
            }
        }
        rejected.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
        let mut dead = Vec::with_capacity(rejected.len());
        for (i, reason) in rejected {
            let part = job.parts.remove(i);
            let publish = &job.messages[part.message].publish;
            tracing::error!(topic = %publish.topic, client_id = %part.batch.client_id, first_seq = part.batch.first_seq,
                last_seq = part.batch.last_seq, error = %reason, "ClickHouse refuses this message's readings; dead-lettered, reported to the agent as rejected");
            dead.push(DeadLetter::now(
                &publish.topic,
                &part.batch.client_id,
                "insert_rejected",
                reason,
                publish.payload.clone(),
            ));
            let readings = part.fresh.iter().map(|(lo, hi)| (hi - lo + 1) as usize).sum::<usize>();
            job.rows -= readings;
            m.rejected_readings.inc_by(readings as u64);
            let client = part.batch.client_id;
            job.rejected.extend(part.fresh.iter().map(|&(lo, hi)| (client.clone(), part.batch.epoch, lo, hi)));
        }
        m.rejected_messages.inc_by(dead.len() as u64);
        self.store_dead_letters(&dead).await?;
        job.dead.extend(dead);
        Ok(())
    }

    /// Part `only` failed alone with `error`. Returns the reason to reject
    /// it, or `None` once it is stored (an outage passed).
    async fn refused_alone(
        &self,
        job: &Job,
        only: usize,
        mut error: clickhouse::error::Error,
    ) -> Result<Option<String>, StoreError> {
        loop {
            if crate::store::classify(&error) == crate::store::ErrorClass::Permanent {
                return Ok(Some(error.to_string()));
            }
            if self.probe().await {
                return Ok(Some(error.to_string()));
            }
            tracing::warn!(%error, "ClickHouse refuses a probe insert too: an outage, not this message; retrying it");
            self.store.pause(self.store.retry_max()).await?;
            match self.insert_readings(job, &[only], &days_of(job, &[only])).await {
                Ok(()) => return Ok(None),
                Err(StoreError::Permanent(e) | StoreError::Exhausted { error: e, .. }) => error = e,
                Err(StoreError::Stopped) => return Err(StoreError::Stopped),
            }
        }
    }

    /// Whether ClickHouse takes an insert at all: one `rollup_queue` row with
    /// `pending = 0` (no effect: passes read markers whose sum is positive,
    /// and the row vanishes when the queue's parts merge).
    async fn probe(&self) -> bool {
        let probe = MarkerRow::probe(&self.owner, fastrand::u64(..));
        self.insert_markers_once(&[probe]).await.is_ok()
    }

    /// The dedup state at start: every range stored within the last
    /// `horizon_days`, streamed into it (never all rows in memory at once).
    ///
    /// # Errors
    /// See [`Store::retry`].
    pub async fn load_ranges(&self, horizon_days: u32) -> Result<DedupState, StoreError> {
        let sql = format!(
            "SELECT client_id, epoch, first_seq, last_seq FROM {} WHERE inserted_at >= now() - toIntervalDay(?)",
            self.store.tables().ingested_ranges
        );
        let now = u64::from(unix_seconds());
        self.store
            .retry("ingested_ranges", || async {
                let mut state = DedupState::new();
                let mut cursor = self.store.client().query(&sql).bind(horizon_days).fetch::<StoredRange>()?;
                while let Some(r) = cursor.next().await? {
                    state.load_stored(&r.client_id, r.epoch, r.first_seq, r.last_seq);
                    state.touch(&r.client_id, r.epoch, now);
                }
                Ok(state)
            })
            .await
    }

    /// Drops the monthly partitions of `ingested_ranges` that lie wholly
    /// before the dedup horizon (works on 18.16, which has no TTL). Returns
    /// the partitions dropped.
    ///
    /// # Errors
    /// See [`Store::retry`].
    pub async fn drop_expired_ranges(&self, horizon_days: u32) -> Result<Vec<String>, StoreError> {
        let tables = self.store.tables();
        // Cluster form: the partitions of the replicated tables on every
        // node, dropped ON CLUSTER (once per shard; a shard without the
        // partition drops nothing).
        let (parts, table, target) = match &tables.cluster {
            Some(cluster) => (
                format!("cluster('{cluster}', system, parts)"),
                "ingested_ranges_local",
                format!("{}{}", tables.local("ingested_ranges"), tables.on_cluster_clause()),
            ),
            None => ("system.parts".to_owned(), "ingested_ranges", tables.ingested_ranges.clone()),
        };
        let sql = format!(
            "SELECT DISTINCT partition FROM {parts} WHERE database = ? AND table = '{table}' \
             AND active AND partition < toString(toYYYYMM(now() - toIntervalDay(?))) ORDER BY partition"
        );
        let expired: Vec<String> = self
            .store
            .retry("ingested_ranges", || {
                self.store.client().query(&sql).bind(tables.database.as_str()).bind(horizon_days).fetch_all::<String>()
            })
            .await?;
        // Partition ids of toYYYYMM are digits; anything else is not ours to drop.
        let expired: Vec<String> = expired.into_iter().filter(|p| p.bytes().all(|b| b.is_ascii_digit())).collect();
        for partition in &expired {
            let drop = format!("ALTER TABLE {target} DROP PARTITION {partition}");
            self.store.retry("ingested_ranges", || self.store.client().query(&drop).execute()).await?;
            tracing::info!(partition, horizon_days, "stored ranges older than the dedup horizon dropped");
        }
        Ok(expired)
    }
}

/// Most daily partitions of `readings` one INSERT may touch: below current
/// ClickHouse's default `max_partitions_per_insert_block` (100), with room
/// for a server whose time zone shifts a UTC day across two local ones.
pub const MAX_PARTITIONS_PER_INSERT: usize = 64;

/// The UTC day of a reading time (µs): the partition it lands in.
#[must_use]
pub fn day_of(ts_us: i64) -> i64 {
    ts_us.div_euclid(86_400_000_000)
}

/// The days of the new readings of `parts`.
fn days_of(job: &Job, parts: &[usize]) -> BTreeSet<i64> {
    parts.iter().flat_map(|&i| job.parts[i].fresh_readings()).map(|(_, r)| day_of(r.ts)).collect()
}

/// `days` cut into groups of at most [`MAX_PARTITIONS_PER_INSERT`].
#[must_use]
pub fn partition_groups(days: &BTreeSet<i64>) -> Vec<BTreeSet<i64>> {
    let sorted: Vec<i64> = days.iter().copied().collect();
    sorted.chunks(MAX_PARTITIONS_PER_INSERT).map(|c| c.iter().copied().collect()).collect()
}

/// The longest id, name or summary of an agent's last command stored, in
/// characters (agents send summaries of about 200; a longer text is cut, so
/// a device cannot fill the status table with one message).
pub const LAST_COMMAND_TEXT_MAX: usize = 256;

/// `text` cut to at most `max` characters (on a character boundary).
fn clip(text: &str, max: usize) -> &str {
    text.char_indices().nth(max).map_or(text, |(at, _)| &text[..at])
}

fn finite(v: f64) -> f64 {
    if v.is_finite() {
        v
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_command_texts_are_cut_on_a_character_boundary() {
        assert_eq!(clip("ok", 256), "ok");
        assert_eq!(clip("äöü", 3), "äöü");
        assert_eq!(clip("äöü", 2), "äö");
        assert_eq!(clip(&"é".repeat(300), LAST_COMMAND_TEXT_MAX).chars().count(), LAST_COMMAND_TEXT_MAX);
    }

    #[test]
    fn readings_spanning_many_days_are_cut_into_inserts_of_at_most_64_partitions() {
        let days: BTreeSet<i64> = (0..300).map(|d| d * 2).collect();
        let groups = partition_groups(&days);
        assert_eq!(groups.len(), 5);
        assert!(groups.iter().all(|g| g.len() <= MAX_PARTITIONS_PER_INSERT));
        let joined: BTreeSet<i64> = groups.into_iter().flatten().collect();
        assert_eq!(joined, days, "every day in exactly one group");
    }

    #[test]
    fn days_are_utc_days_including_before_midnight() {
        assert_eq!(day_of(0), 0);
        assert_eq!(day_of(86_399_999_999), 0);
        assert_eq!(day_of(86_400_000_000), 1);
        assert_eq!(day_of(1_700_000_000_000_000), 19_675);
    }
}
