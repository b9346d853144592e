//! Stores one [`Job`] in ClickHouse: dead letters, agent statuses, new
//! readings, then the rollup for the minutes they touched, then the stored
//! ranges. Each request is retried with exponential backoff and jitter while
//! the error is retriable; a permanent error on readings turns the job's
//! batch messages into dead letters.
//!
//! # Order, and the crash window
//! readings → rollup → `ingested_ranges` → (acker) PUBACK → ingest ack.
//! A crash after the readings insert but before the ranges insert leaves
//! readings in ClickHouse that the dedup state does not know. The broker
//! redelivers the unacked message; it is inserted again; the raw table's
//! identity `(client_id, sensor, ts)` makes the copies one (ReplacingMergeTree
//! on merge; `FINAL`/`GROUP BY` identity in every query and in the rollup),
//! and the rollup for those minutes is recomputed from deduplicated raw data
//! by that second insert. Because the ranges row is written only after the
//! rollup, a range that is "stored" always has its minutes rolled up.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use clickhouse::{Client, Row};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::batcher::Job;
use crate::config::Config;
use crate::deadletter::{unix_seconds, DeadLetter, DeadLetterRow};
use crate::metrics::{reason, Metrics, TableLabel};
use crate::rollup::{self, Touched};
use crate::schema::{Flavor, Tables};

/// How a ClickHouse error is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Network trouble, overload, timeouts, a server restarting: back off and retry.
    Retriable,
    /// The data or the statement is wrong: retrying cannot help.
    Permanent,
}

/// Error codes (ClickHouse's `Code: N`) that mean "this data is wrong".
const PERMANENT_CODES: &[u32] = &[
    6,   // CANNOT_PARSE_TEXT
    16,  // NO_SUCH_COLUMN_IN_TABLE
    26,  // CANNOT_PARSE_QUOTED_STRING
    27,  // CANNOT_PARSE_INPUT_ASSERTION_FAILED
    33,  // CANNOT_READ_ALL_DATA
    38,  // CANNOT_PARSE_DATE
    41,  // CANNOT_PARSE_DATETIME
    43,  // ILLEGAL_TYPE_OF_ARGUMENT
    53,  // TYPE_MISMATCH
    62,  // SYNTAX_ERROR
    69,  // ARGUMENT_OUT_OF_BOUND
    70,  // CANNOT_CONVERT_TYPE
    72,  // CANNOT_PARSE_NUMBER
    117, // INCORRECT_DATA
    131, // TOO_LARGE_STRING_SIZE
];

/// The `Code: N` of a server error message, if any.
#[must_use]
pub fn error_code(message: &str) -> Option<u32> {
    let rest = &message[message.find("Code: ")? + 6..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Sorts a `clickhouse` crate error into retriable or permanent.
#[must_use]
pub fn classify(error: &clickhouse::error::Error) -> ErrorClass {
    use clickhouse::error::Error as E;
    match error {
        E::Network(_) | E::TimedOut => ErrorClass::Retriable,
        E::BadResponse(message) => match error_code(message) {
            Some(code) if PERMANENT_CODES.contains(&code) => ErrorClass::Permanent,
            // Unknown codes, overload (241, 252, 202), missing table while an
            // operator fixes it, HTTP 5xx without a code: retry.
            _ => ErrorClass::Retriable,
        },
        // Serialisation and client-side data problems.
        E::InvalidParams(_)
        | E::SequenceMustHaveLength
        | E::DeserializeAnyNotSupported
        | E::NotEnoughData
        | E::InvalidUtf8Encoding(_)
        | E::InvalidTagEncoding(_)
        | E::Custom(_)
        | E::SchemaMismatch(_)
        | E::Unsupported(_) => ErrorClass::Permanent,
        _ => ErrorClass::Retriable,
    }
}

/// Why storing gave up.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A permanent error: the data cannot be stored as it is.
    #[error("permanent ClickHouse error: {0}")]
    Permanent(clickhouse::error::Error),
    /// Shutdown's deadline passed while retrying.
    #[error("stopped while retrying")]
    Stopped,
}

/// The `readings` row; `ts` is Int64 µs (legacy) or DateTime64(6) (current),
/// the same 8 bytes in RowBinary.
#[derive(Debug, Row, Serialize)]
pub(crate) struct ReadingRow<'a> {
    pub client_id: &'a str,
    pub sensor: &'a str,
    pub ts: i64,
    pub value: f64,
    pub epoch: u64,
    pub seq: u64,
}

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

/// The `agent_status` row.
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
}

/// What happened to a job.
#[derive(Debug)]
pub struct Outcome {
    /// The job, returned for acking.
    pub job: Job,
    /// Whether its new readings (if any) are stored (and rolled up, and their
    /// ranges recorded).
    pub stored: bool,
    /// Shutdown's deadline passed: nothing of this job may be acked.
    pub abandoned: bool,
}

/// The ClickHouse writer shared by all insert tasks.
#[derive(Debug)]
pub struct Writer {
    client: Client,
    tables: Tables,
    flavor: Flavor,
    metrics: Arc<Metrics>,
    retry_min: Duration,
    retry_max: Duration,
    timeout: Duration,
    hard_stop: CancellationToken,
}

/// A ClickHouse client for `config` (no database set: every name is qualified).
#[must_use]
pub fn client(config: &Config) -> Client {
    let mut client =
        Client::default().with_url(&config.clickhouse_url).with_user(&config.clickhouse_user).with_validation(false);
    if !config.clickhouse_password.is_empty() {
        client = client.with_password(config.clickhouse_password.expose());
    }
    client
}

impl Writer {
    /// A writer for `tables` in `flavor`.
    #[must_use]
    pub fn new(config: &Config, flavor: Flavor, metrics: Arc<Metrics>, hard_stop: CancellationToken) -> Self {
        Self {
            client: client(config),
            tables: Tables::new(&config.clickhouse_database),
            flavor,
            metrics,
            retry_min: Duration::from_millis(config.retry_min_ms),
            retry_max: Duration::from_millis(config.retry_max_ms),
            timeout: Duration::from_secs(config.insert_timeout_secs.max(1)),
            hard_stop,
        }
    }

    /// The tables written.
    #[must_use]
    pub fn tables(&self) -> &Tables {
        &self.tables
    }

    /// The SQL flavour.
    #[must_use]
    pub fn flavor(&self) -> Flavor {
        self.flavor
    }

    /// The ClickHouse client.
    #[must_use]
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Runs `attempt` until it succeeds, fails permanently, or the hard stop.
    ///
    /// # Errors
    /// [`StoreError::Permanent`] or [`StoreError::Stopped`].
    pub async fn retry<T, F, Fut>(&self, table: &'static str, mut attempt: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, clickhouse::error::Error>>,
    {
        let mut delays = backon::ExponentialBuilder::default()
            .with_min_delay(self.retry_min)
            .with_max_delay(self.retry_max)
            .with_jitter()
            .without_max_times()
            .build();
        let mut attempts = 0u32;
        loop {
            if self.hard_stop.is_cancelled() {
                return Err(StoreError::Stopped);
            }
            let result = match tokio::time::timeout(self.timeout, attempt()).await {
                Ok(result) => result,
                Err(_) => Err(clickhouse::error::Error::TimedOut),
            };
            let error = match result {
                Ok(value) => {
                    if attempts > 0 {
                        tracing::info!(table, attempts, "ClickHouse request succeeded after retries");
                    }
                    return Ok(value);
                }
                Err(error) => error,
            };
            if classify(&error) == ErrorClass::Permanent {
                tracing::error!(table, %error, "permanent ClickHouse error");
                return Err(StoreError::Permanent(error));
            }
            attempts += 1;
            self.metrics.insert_retries.get_or_create(&TableLabel { table: table.to_owned() }).inc();
            let delay = delays.next().unwrap_or(self.retry_max);
            tracing::warn!(table, attempts, %error, retry_in_ms = delay.as_millis() as u64, "ClickHouse request failed; retrying");
            tokio::select! {
                () = self.hard_stop.cancelled() => return Err(StoreError::Stopped),
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn insert_readings_once(&self, job: &Job) -> Result<(), clickhouse::error::Error> {
        let mut insert = self.client.insert_unescaped::<ReadingRow<'_>>(&self.tables.readings).await?;
        for part in &job.parts {
            let batch = &part.batch;
            for &(lo, hi) in &part.fresh {
                for seq in lo..=hi {
                    // Invariant: Batch::decode checked readings.len() == last - first + 1,
                    // and fresh ranges lie within first_seq..=last_seq.
                    let reading = &batch.readings[(seq - batch.first_seq) as usize];
                    insert
                        .write(&ReadingRow {
                            client_id: &batch.client_id,
                            sensor: &reading.sensor,
                            ts: reading.ts,
                            value: reading.value,
                            epoch: batch.epoch,
                            seq,
                        })
                        .await?;
                }
            }
        }
        insert.end().await
    }

    async fn insert_ranges_once(&self, job: &Job) -> Result<(), clickhouse::error::Error> {
        let now = unix_seconds();
        let mut insert = self.client.insert_unescaped::<RangeRow<'_>>(&self.tables.ingested_ranges).await?;
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
        let mut insert = self.client.insert_unescaped::<DeadLetterRow<'_>>(&self.tables.ingest_errors).await?;
        for d in dead {
            insert.write(&DeadLetterRow::from(d)).await?;
        }
        insert.end().await
    }

    async fn insert_statuses_once(&self, job: &Job) -> Result<(), clickhouse::error::Error> {
        let mut insert = self.client.insert_unescaped::<StatusRow<'_>>(&self.tables.agent_status).await?;
        for (status, received_at) in &job.statuses {
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
                })
                .await?;
        }
        insert.end().await
    }

    async fn store_dead_letters(&self, dead: &[DeadLetter]) -> Result<(), StoreError> {
        if dead.is_empty() {
            return Ok(());
        }
        match self.retry("ingest_errors", || self.insert_dead_letters_once(dead)).await {
            Ok(()) => {
                for d in dead {
                    self.metrics.dead_letters.get_or_create(&reason(d.reason)).inc();
                }
                Ok(())
            }
            Err(StoreError::Permanent(error)) => {
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
    pub async fn store(self: Arc<Self>, mut job: Job) -> Outcome {
        let started = Instant::now();
        let abandoned = |job| Outcome { job, stored: false, abandoned: true };
        if self.store_dead_letters(&job.dead).await.is_err() {
            return abandoned(job);
        }
        if !job.statuses.is_empty() {
            match self.retry("agent_status", || self.insert_statuses_once(&job)).await {
                Ok(()) => {}
                Err(StoreError::Permanent(error)) => {
                    tracing::error!(%error, count = job.statuses.len(), "agent statuses could not be stored; dropped");
                }
                Err(StoreError::Stopped) => return abandoned(job),
            }
        }
        if job.rows == 0 {
            return Outcome { job, stored: true, abandoned: false };
        }
        match self.retry("readings", || self.insert_readings_once(&job)).await {
            Ok(()) => {}
            Err(StoreError::Permanent(error)) => {
                let text = error.to_string();
                let dead: Vec<DeadLetter> = job
                    .parts
                    .iter()
                    .map(|p| {
                        let publish = &job.messages[p.message];
                        DeadLetter::now(
                            &publish.topic,
                            &p.batch.client_id,
                            "insert_permanent",
                            text.clone(),
                            publish.payload.clone(),
                        )
                    })
                    .collect();
                if self.store_dead_letters(&dead).await.is_err() {
                    return abandoned(job);
                }
                job.dead.extend(dead);
                return Outcome { job, stored: false, abandoned: false };
            }
            Err(StoreError::Stopped) => return abandoned(job),
        }
        self.metrics.inserted_readings.inc_by(job.rows as u64);
        let touched = Touched::of(&job);
        let version = rollup::version_now();
        match self
            .retry("readings_1m", || rollup::recompute(&self.client, &self.tables, self.flavor, &touched, version))
            .await
        {
            Ok(()) => {}
            Err(StoreError::Permanent(error)) => {
                self.metrics.rollup_errors.inc();
                tracing::error!(%error, "rollup recompute failed; raw data is stored, the minutes stay stale");
            }
            Err(StoreError::Stopped) => return abandoned(job),
        }
        match self.retry("ingested_ranges", || self.insert_ranges_once(&job)).await {
            Ok(()) => {}
            Err(StoreError::Permanent(error)) => {
                // Readings are stored; only the dedup memory of a restart is
                // weaker (replays get inserted again and collapse by identity).
                tracing::error!(%error, "stored ranges could not be recorded");
            }
            Err(StoreError::Stopped) => return abandoned(job),
        }
        job.touched = Some(touched);
        self.metrics.insert_duration.observe(started.elapsed().as_secs_f64());
        Outcome { job, stored: true, abandoned: false }
    }

    /// Every stored range, for the dedup state at start.
    ///
    /// # Errors
    /// See [`Writer::retry`].
    pub async fn load_ranges(&self) -> Result<Vec<StoredRange>, StoreError> {
        let sql = format!("SELECT client_id, epoch, first_seq, last_seq FROM {}", self.tables.ingested_ranges);
        self.retry("ingested_ranges", || self.client.query(&sql).fetch_all::<StoredRange>()).await
    }
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
    fn codes_are_parsed_from_both_message_styles() {
        assert_eq!(error_code("Code: 60, e.displayText() = DB::Exception: Table x doesn't exist"), Some(60));
        assert_eq!(error_code("Code: 27. DB::Exception: Cannot parse input"), Some(27));
        assert_eq!(error_code("bad gateway"), None);
    }

    #[test]
    fn data_errors_are_permanent_and_outages_retriable() {
        use clickhouse::error::Error as E;
        assert_eq!(classify(&E::BadResponse("Code: 27. DB::Exception: Cannot parse".into())), ErrorClass::Permanent);
        assert_eq!(classify(&E::BadResponse("Code: 241. Memory limit exceeded".into())), ErrorClass::Retriable);
        assert_eq!(classify(&E::BadResponse("Code: 60. Table does not exist".into())), ErrorClass::Retriable);
        assert_eq!(classify(&E::TimedOut), ErrorClass::Retriable);
        assert_eq!(classify(&E::NotEnoughData), ErrorClass::Permanent);
    }
}
