//! The Postgres outbox: every reading is a row here before anything else
//! happens to it, and stays until its batch is confirmed.
//!
//! # Invariants
//! - `seq` is assigned by the agent from `outbox_meta.next_seq`, advanced in
//!   the *same transaction* that inserts the rows (`COPY … BINARY`: about
//!   twice the rows per CPU second of an `INSERT … SELECT unnest(…)`). Seqs are therefore never
//!   reused within an epoch (even after every row was deleted and the agent
//!   restarted), each commit's seqs are contiguous, and the seq → reading
//!   mapping the publisher holds in memory is exactly the one in the table.
//! - The insert is guarded by the expected `next_seq`: a second agent writing
//!   the same outbox, or a retry of a commit that did go through, is detected
//!   instead of duplicating seqs.
//! - `epoch` is random and new at every agent start (every row, old or new,
//!   is published under the running agent's epoch). An outbox restored from
//!   an older backup, a reverted disk snapshot or a lagging replica that took
//!   over while the agent was down holds a `next_seq` the agent already gave
//!   out; under a new epoch the ingest server still sees every new reading as
//!   new (a reading that was stored under the old epoch and is published
//!   again is a duplicate by its identity, which ClickHouse removes). A
//!   rollback while the agent runs is caught by the guarded insert (the
//!   table's `next_seq` is behind the agent's), and the table is moved
//!   forward instead of reusing seqs (see `committer`).
//! - Every session runs with `synchronous_commit = on`, whatever the server's
//!   default: a sensor is acked only after its rows are durable.
//!
//! A connection that fails is dropped and re-established on the next call;
//! callers retry with backoff.

use std::pin::pin;
use std::str::FromStr;

use telemetry_wire::Reading;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, NoTls, Statement};

use crate::config::Secret;

/// Why an outbox operation failed.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// Postgres refused or the connection failed (retriable).
    #[error("postgres: {}", describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// The connection string is unusable (permanent).
    #[error("bad postgres connection string: {0}")]
    BadUrl(String),
    /// `next_seq` moved under us: another writer, or a retried commit that
    /// had succeeded. The caller re-reads `next_seq` and decides.
    #[error("outbox next_seq is {found}, expected {expected}: another agent writes this outbox?")]
    SeqConflict {
        /// What we expected.
        expected: u64,
        /// What the table holds.
        found: u64,
    },
}

/// tokio-postgres prints only "db error"; the server's message is in the source.
fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => match std::error::Error::source(error) {
            Some(source) => format!("{error}: {source}"),
            None => error.to_string(),
        },
    }
}

fn ddl(s: &str) -> String {
    format!(
        "CREATE SCHEMA IF NOT EXISTS {s};
         CREATE TABLE IF NOT EXISTS {s}.outbox_meta (
             id int PRIMARY KEY CHECK (id = 1),
             epoch bigint NOT NULL,
             next_seq bigint NOT NULL,
             schema_version int NOT NULL,
             created_at timestamptz NOT NULL DEFAULT now());
         CREATE TABLE IF NOT EXISTS {s}.outbox (
             seq bigint PRIMARY KEY,
             sensor text NOT NULL,
             ts bigint NOT NULL,
             value double precision NOT NULL,
             enqueued_at timestamptz NOT NULL DEFAULT now());"
    )
}

/// What the outbox holds at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxState {
    /// The outbox incarnation.
    pub epoch: u64,
    /// The seq the next reading gets.
    pub next_seq: u64,
    /// Rows waiting.
    pub rows: u64,
    /// Bytes of reading data waiting.
    pub bytes: u64,
}

/// Bytes a row counts against the quota: the sensor name plus ts, value and seq.
#[must_use]
pub fn row_bytes(reading: &Reading) -> u64 {
    reading.sensor.len() as u64 + 24
}

struct Prepared {
    /// The guard: moves `next_seq` from $1 to $2, or touches no row.
    advance: Statement,
    /// The rows, in binary.
    copy: Statement,
    load: Statement,
    delete: Statement,
}

/// One connection to the outbox, re-established on demand.
pub struct Outbox {
    config: tokio_postgres::Config,
    schema: String,
    conn: Option<(Client, Prepared)>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox").field("schema", &self.schema).field("connected", &self.conn.is_some()).finish()
    }
}

impl Outbox {
    /// An outbox handle; connects lazily.
    ///
    /// # Errors
    /// [`OutboxError::BadUrl`] for an unparsable connection string.
    pub fn new(url: &str, password: &Secret, schema: &str) -> Result<Self, OutboxError> {
        let mut config = tokio_postgres::Config::from_str(url).map_err(|e| OutboxError::BadUrl(e.to_string()))?;
        if !password.is_empty() {
            config.password(password.expose());
        }
        config.application_name("edge-agent");
        config.connect_timeout(std::time::Duration::from_secs(5));
        Ok(Self { config, schema: schema.to_owned(), conn: None })
    }

    async fn client(&mut self) -> Result<&mut (Client, Prepared), OutboxError> {
        if self.conn.as_ref().is_some_and(|(c, _)| c.is_closed()) {
            self.conn = None;
        }
        if self.conn.is_none() {
            let (client, connection) = self.config.connect(NoTls).await?;
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(%error, "postgres connection ended");
                }
            });
            let s = &self.schema;
            // A sensor is acked after the commit returns: the commit must be
            // on disk then, whatever the server's (or a DBA's) default.
            client.batch_execute("SET synchronous_commit = on").await?;
            // Idempotent; statements below need the tables to exist.
            client.batch_execute(&ddl(s)).await?;
            let advance = client
                .prepare(&format!("UPDATE {s}.outbox_meta SET next_seq = $2 WHERE id = 1 AND next_seq = $1"))
                .await?;
            let copy =
                client.prepare(&format!("COPY {s}.outbox (seq, sensor, ts, value) FROM STDIN (FORMAT binary)")).await?;
            let load = client
                .prepare(&format!("SELECT seq, sensor, ts, value FROM {s}.outbox WHERE seq > $1 ORDER BY seq LIMIT $2"))
                .await?;
            let delete = client
                .prepare(&format!(
                    "WITH d AS (DELETE FROM {s}.outbox o USING unnest($1::int8[], $2::int8[]) AS r(lo, hi) \
                     WHERE o.seq BETWEEN r.lo AND r.hi RETURNING octet_length(o.sensor) AS l) \
                     SELECT count(*)::int8, coalesce(sum(l), 0)::int8 FROM d"
                ))
                .await?;
            self.conn = Some((client, Prepared { advance, copy, load, delete }));
        }
        // Invariant: set just above when it was None.
        Ok(self.conn.as_mut().expect("connection established above"))
    }

    /// Forgets the connection after an error so the next call reconnects.
    pub fn reset(&mut self) {
        self.conn = None;
    }

    /// Creates the schema if needed, starts a new random epoch (see the
    /// module docs: no `(epoch, seq)` is ever reused, even by an outbox
    /// rolled back while the agent was down) and reports what the outbox
    /// holds.
    ///
    /// # Errors
    /// Postgres errors.
    pub async fn migrate(&mut self) -> Result<OutboxState, OutboxError> {
        let s = self.schema.clone();
        let (client, _) = self.client().await?;
        // The epoch is a random u64 stored bit-for-bit in a bigint.
        let epoch = fastrand::u64(..) as i64;
        let meta = client
            .query_one(
                &format!(
                    "INSERT INTO {s}.outbox_meta (id, epoch, next_seq, schema_version) VALUES (1, $1, 1, 1) \
                     ON CONFLICT (id) DO UPDATE SET epoch = EXCLUDED.epoch RETURNING epoch, next_seq"
                ),
                &[&epoch],
            )
            .await?;
        let (rows, bytes) = self.size().await?;
        Ok(OutboxState { epoch: meta.get::<_, i64>(0) as u64, next_seq: meta.get::<_, i64>(1) as u64, rows, bytes })
    }

    /// (rows, bytes of reading data) in the outbox, counted.
    ///
    /// # Errors
    /// Postgres errors.
    pub async fn size(&mut self) -> Result<(u64, u64), OutboxError> {
        let s = self.schema.clone();
        let (client, _) = self.client().await?;
        let rows = client
            .query_one(
                &format!("SELECT count(*)::int8, coalesce(sum(octet_length(sensor)), 0)::int8 FROM {s}.outbox"),
                &[],
            )
            .await?;
        let (count, name_bytes): (i64, i64) = (rows.get(0), rows.get(1));
        Ok((count as u64, (name_bytes + 24 * count) as u64))
    }

    /// The seq the next insert must start at, as the table says.
    ///
    /// # Errors
    /// Postgres errors.
    pub async fn next_seq(&mut self) -> Result<u64, OutboxError> {
        let s = self.schema.clone();
        let (client, _) = self.client().await?;
        let row = client.query_one(&format!("SELECT next_seq FROM {s}.outbox_meta WHERE id = 1"), &[]).await?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    /// Moves `next_seq` from `found` forward to `to` (after a rollback: see
    /// the module docs); `false` when it was not `found` any more.
    ///
    /// # Errors
    /// Postgres errors.
    pub async fn advance_next_seq(&mut self, found: u64, to: u64) -> Result<bool, OutboxError> {
        let s = self.schema.clone();
        let (client, _) = self.client().await?;
        let moved = client
            .execute(
                &format!("UPDATE {s}.outbox_meta SET next_seq = $2 WHERE id = 1 AND next_seq = $1"),
                &[&(found as i64), &(to as i64)],
            )
            .await?;
        Ok(moved == 1)
    }

    /// Inserts `readings` as seqs `first_seq..` in one transaction,
    /// advancing `next_seq` past them.
    ///
    /// The guard goes first: it takes the meta row's lock, so a second
    /// writer waits there and then finds `next_seq` moved, before any row
    /// is written.
    ///
    /// # Errors
    /// Postgres errors, or [`OutboxError::SeqConflict`] when `next_seq` is not
    /// `first_seq`.
    pub async fn insert(&mut self, first_seq: u64, readings: &[Reading]) -> Result<(), OutboxError> {
        if readings.is_empty() {
            return Ok(());
        }
        let first = first_seq as i64;
        let end = first + readings.len() as i64;
        let (client, st) = self.client().await?;
        let tx = client.transaction().await?;
        if tx.execute(&st.advance, &[&first, &end]).await? == 0 {
            // Dropping the transaction rolls it back.
            drop(tx);
            let found = self.next_seq().await?;
            return Err(OutboxError::SeqConflict { expected: first_seq, found });
        }
        let sink = tx.copy_in(&st.copy).await?;
        let mut writer = pin!(BinaryCopyInWriter::new(sink, &[Type::INT8, Type::TEXT, Type::INT8, Type::FLOAT8]));
        for (seq, r) in (first..).zip(readings) {
            writer.as_mut().write(&[&seq, &r.sensor.as_str(), &r.ts, &r.value]).await?;
        }
        writer.finish().await?;
        tx.commit().await?;
        Ok(())
    }

    /// Up to `limit` rows with seq greater than `after`, oldest first.
    ///
    /// # Errors
    /// Postgres errors.
    pub async fn load(&mut self, after: u64, limit: usize) -> Result<Vec<(u64, Reading)>, OutboxError> {
        let (client, st) = self.client().await?;
        let rows = client.query(&st.load, &[&(after as i64), &(limit as i64)]).await?;
        Ok(rows
            .iter()
            .map(|r| {
                let seq: i64 = r.get(0);
                (seq as u64, Reading { sensor: r.get(1), ts: r.get(2), value: r.get(3) })
            })
            .collect())
    }

    /// Deletes the rows of every inclusive range; returns (rows, bytes) deleted.
    ///
    /// # Errors
    /// Postgres errors.
    pub async fn delete_ranges(&mut self, ranges: &[(u64, u64)]) -> Result<(u64, u64), OutboxError> {
        let lo: Vec<i64> = ranges.iter().map(|r| r.0 as i64).collect();
        let hi: Vec<i64> = ranges.iter().map(|r| r.1 as i64).collect();
        let (client, st) = self.client().await?;
        let row = client.query_one(&st.delete, &[&lo, &hi]).await?;
        let (count, name_bytes): (i64, i64) = (row.get(0), row.get(1));
        Ok((count as u64, (name_bytes + 24 * count) as u64))
    }

    /// Deletes the `n` oldest rows (quota policy drop-oldest); returns
    /// (rows, bytes) deleted.
    ///
    /// # Errors
    /// Postgres errors.
    pub async fn drop_oldest(&mut self, n: u64) -> Result<(u64, u64), OutboxError> {
        let s = self.schema.clone();
        let (client, _) = self.client().await?;
        let row = client
            .query_one(
                &format!(
                    "WITH d AS (DELETE FROM {s}.outbox WHERE seq IN \
                     (SELECT seq FROM {s}.outbox ORDER BY seq LIMIT $1) RETURNING octet_length(sensor) AS l) \
                     SELECT count(*)::int8, coalesce(sum(l), 0)::int8 FROM d"
                ),
                &[&(n as i64)],
            )
            .await?;
        let (count, name_bytes): (i64, i64) = (row.get(0), row.get(1));
        Ok((count as u64, (name_bytes + 24 * count) as u64))
    }

    /// Age in seconds of the oldest row (0 when empty).
    ///
    /// # Errors
    /// Postgres errors.
    pub async fn oldest_age_secs(&mut self) -> Result<f64, OutboxError> {
        let s = self.schema.clone();
        let (client, _) = self.client().await?;
        let row = client
            .query_opt(
                &format!("SELECT extract(epoch FROM now() - enqueued_at)::float8 FROM {s}.outbox ORDER BY seq LIMIT 1"),
                &[],
            )
            .await?;
        Ok(row.map_or(0.0, |r| r.get::<_, f64>(0).max(0.0)))
    }
}
