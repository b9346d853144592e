//! The exact 1-minute rollup `readings_1m`, kept off the insert path.
//!
//! # How a minute gets (and stays) exact
//! 1. **Mark.** After a job's readings are inserted, and before its stored
//!    ranges are recorded (so before anything is acked), the writer inserts
//!    one *marker* per `(client_id, minute)` the job touched into
//!    `rollup_queue`: `(client_id, minute, token, owner, pending = +1)`,
//!    `token` random per job, `marked_at` stamped by ClickHouse. The queue is a
//!    `SummingMergeTree` over `pending`, keyed by `(client_id, minute,
//!    token)`. A crash between the readings and the marker leaves the
//!    message unacked and its ranges unrecorded: the broker redelivers it,
//!    it is inserted again (the raw table's identity collapses the copies)
//!    and marked then. So every stored reading has a marker written after it.
//! 2. **Close.** The [`Roller`] (one per ingest server) reads the pending
//!    markers (`sum(pending) > 0`) of minutes that are *closed*: started at
//!    least `rollup_after_secs` ago (or implausibly far in the future, a bad
//!    device clock), written by this server or orphaned (unconsumed for
//!    `rollup_orphan_secs` by ClickHouse's clock, e.g. written by a server
//!    that is gone), of minutes *quiet* for `rollup_quiet_secs` (no newer
//!    marker of any client: a backlog reaching a closed minute batch after
//!    batch is folded once, not once per pass; [`MAX_QUIET_WAIT_SECS`]
//!    bounds the wait). It folds those minutes, all sensors, in a few bulk
//!    statements ([`plan`]): each reads the raw rows *without* `FINAL`, per `(client, sensor,
//!    minute)` the aggregates and the number of distinct identities
//!    ([`fold_sql`]). A group whose rows hold every identity once is
//!    exactly what `FINAL` would return, and is written as read; the
//!    minutes of a group holding a copy not yet merged away are recomputed
//!    from the deduplicated rows ([`recompute_sql`], `FINAL`: a merge of
//!    the parts' sorted streams, row by row on one thread: 1.5 to 2.5
//!    times the cost of the fold's read). Then the pass inserts
//!    `pending = -observed` for exactly the markers it read. A marker is read
//!    only after its readings were inserted, so the fold saw them; a
//!    marker written after the read keeps its minute pending for the next
//!    pass. Two servers consuming the same marker drive its sum below zero,
//!    which still reads as "done" (tokens are never reused).
//! 3. **Version without clocks.** `readings_1m` is a
//!    `ReplacingMergeTree(version)` with `version = count`: the raw table
//!    only gains identities, so a recompute that saw more readings of a
//!    minute counts more, and two recomputes with the same count saw the
//!    same identities and agree. The most complete row wins on merge and
//!    under `FINAL`, whichever server wrote it and whatever its clock says.
//! 4. **Open minutes at query time.** A minute with pending markers (still
//!    open, or late readings not yet folded in) is answered from raw rows;
//!    every other minute from `readings_1m` ([`live_series_sql`], and the
//!    `readings_1m_live` view for Grafana). Late readings hours old simply
//!    re-mark their minute, which is recomputed at the next pass.
//!
//! 5. **On a cluster, only from a replica that has the readings.** Reads
//!    go to one replica per shard; replication copies a part to the others
//!    a moment after its insert, and much later to a replica that was down
//!    or cannot fetch. A minute folded from such a replica would be short
//!    for good (its marker consumed). So with `clickhouse_cluster` a pass
//!    first waits [`Timing::settle`] after recording its bounds (a job that
//!    skipped its marker relying on an earlier one inserted its readings
//!    before that), reads only markers at least as old by ClickHouse's
//!    clock (their readings were inserted before them), and recomputes with
//!    `max_replica_delay_for_distributed_queries = 1` and no fallback to
//!    stale replicas: a replica more than a second behind is skipped, and
//!    if every replica of a shard is, the pass fails and is retried, its
//!    markers still pending. Every reading it must fold was inserted at
//!    least `settle` seconds before the recompute, which any replica at most
//!    a second behind has.
//!
//! Cost: each minute is recomputed about once after it closes (plus once
//! per late arrival), reading its raw rows once: per reading, independent
//! of the number of clients and of rows per minute. The server's clock
//! decides only *when* a minute is folded in, never *what* it holds; the
//! adoption of another server's markers compares ClickHouse's clock with
//! itself.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use clickhouse::Row;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::job::Job;
use crate::metrics::Metrics;
use crate::schema::{Flavor, Tables};
use crate::store::{Store, StoreError};

/// One minute in microseconds.
pub const MINUTE_US: i64 = 60_000_000;
/// Minutes this far ahead of the server's clock are closed at once: no
/// honest device writes there, and waiting would keep them pending for years.
const FUTURE_CLOSE_SECS: i64 = 3600;
/// Most clients bound into one recompute statement.
const MAX_CLIENTS_PER_STATEMENT: usize = 1000;
/// Longest run of minutes in one recompute statement (a day: at most two
/// monthly partitions of `readings_1m` per insert).
const MAX_RUN_MINUTES: i64 = 1440;
/// Pending minutes of the same clients at most this far apart share a
/// statement, which then also recomputes the minutes between them. A
/// device with a bad clock or a sparse replayed backlog has a pending
/// minute every few minutes over months: one statement per minute was
/// 5,800 statements and over a minute per pass on 18.16
/// (`scripts/chaos --scenario bad-clock-device`); per day it is about 100.
/// Recomputing a folded minute rewrites the row it has (or, if readings
/// arrived since, a more complete one: `version = count`), so covering it
/// costs a read, never a wrong count.
const MAX_GAP_SECS: u32 = 3600;

/// The `(client_id, minute start in Unix seconds)` pairs a job's new
/// readings fall in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Touched(BTreeSet<(String, u32)>);

impl Touched {
    /// The minutes of the new readings in `job`.
    #[must_use]
    pub fn of(job: &Job) -> Self {
        let mut set = BTreeSet::new();
        for part in &job.parts {
            let mut minutes = BTreeSet::new();
            // The last minute inserted, as [start, end) in µs: consecutive
            // readings mostly share a minute, so most cost two comparisons.
            let mut last = (0, 0);
            for (_, reading) in part.fresh_readings() {
                if !(last.0..last.1).contains(&reading.ts) {
                    let minute = minute_of(reading.ts);
                    minutes.insert(minute);
                    let start = i64::from(minute) * 1_000_000;
                    last = (start, start + MINUTE_US);
                }
            }
            set.extend(minutes.into_iter().map(|m| (part.batch.client_id.clone(), m)));
        }
        Self(set)
    }

    /// The pairs, sorted.
    pub fn iter(&self) -> impl Iterator<Item = &(String, u32)> {
        self.0.iter()
    }

    /// Number of pairs.
    #[must_use]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether nothing was touched.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The UTC days of the touched minutes (the daily partitions of
    /// `readings` that the readings behind them land in).
    #[must_use]
    pub fn days(&self) -> BTreeSet<i64> {
        self.0.iter().map(|(_, minute)| i64::from(*minute).div_euclid(86_400)).collect()
    }
}

/// The minute of a reading time (µs) as Unix seconds. Readings are between
/// 2000 and 2100 (checked at decode), well inside `u32`.
#[must_use]
pub fn minute_of(ts_us: i64) -> u32 {
    let seconds = ts_us.div_euclid(MINUTE_US) * 60;
    u32::try_from(seconds.clamp(0, i64::from(u32::MAX))).unwrap_or(0)
}

/// A `rollup_queue` row as a pass reads it, and as it writes the
/// consumption back (`pending = -observed`, everything else copied).
#[derive(Debug, Clone, Row, Serialize, Deserialize, PartialEq, Eq)]
pub struct QueueRow {
    /// The device.
    pub client_id: String,
    /// Start of the minute, Unix seconds.
    pub minute: u32,
    /// Random per marking job: consumption cancels exactly this marker.
    pub token: u64,
    /// The server that wrote the marker (its MQTT client id).
    pub owner: String,
    /// When the marker was written, by ClickHouse's clock (the column's
    /// `DEFAULT now()`): only decides adoption by other servers, which
    /// compare it with the same clock, never with their own.
    pub marked_at: u32,
    /// +1 per marker; minus what a pass observed when it consumes.
    pub pending: i64,
}

/// A marker as the writer inserts it (`marked_at` is left to ClickHouse).
#[derive(Debug, Clone, Row, Serialize, PartialEq, Eq)]
pub struct MarkerRow {
    /// The device.
    pub client_id: String,
    /// Start of the minute, Unix seconds.
    pub minute: u32,
    /// Random per marking job.
    pub token: u64,
    /// The server that wrote it.
    pub owner: String,
    /// +1 (0 for a probe).
    pub pending: i64,
}

impl MarkerRow {
    /// A row that changes nothing (`pending = 0`, no client, minute 0),
    /// written only to learn whether ClickHouse takes inserts at all.
    #[must_use]
    pub fn probe(owner: &str, token: u64) -> Self {
        Self { client_id: String::new(), minute: 0, token, owner: owner.to_owned(), pending: 0 }
    }
}

/// Marker rows for `touched`, owned by `owner`.
#[must_use]
pub fn markers(touched: &Touched, owner: &str, token: u64) -> Vec<MarkerRow> {
    touched
        .iter()
        .map(|(client_id, minute)| MarkerRow {
            client_id: client_id.clone(),
            minute: *minute,
            token,
            owner: owner.to_owned(),
            pending: 1,
        })
        .collect()
}

/// Which `(client, minute)` pairs already have a durable marker of this
/// server that no pass can have read yet, so that a later job touching the
/// same minute need not write another: without it, 10,000 clients with one
/// batch a second write 10,000 markers a second; with it, about one per
/// client and minute.
///
/// A job may skip its marker for `(c, m)` only if all of these hold:
/// - a marker for `(c, m)` of this server was written completely before
///   (and this job's readings are already inserted: the writer asks after
///   its readings insert), so whichever pass reads that marker reads it
///   after this job's readings were in and its recompute covers them;
/// - no pass of this server so far may read minute `m`: every pass records
///   its bounds here *before* its read ([`MarkLedger::begin_pass`]), and
///   `covered_before <= m < future_from` for all of them;
/// - no other server may adopt that marker yet: adoption needs it to be
///   `rollup_orphan_secs` old by ClickHouse's clock; the entry is trusted
///   for half that, measured on this server's monotonic clock from before
///   the marker insert started.
///
/// A restart starts empty (every minute is marked again). Entries a pass
/// has covered, or that aged out, are dropped at the next pass.
#[derive(Debug)]
pub struct MarkLedger {
    marked: std::collections::HashMap<(String, u32), tokio::time::Instant>,
    covered_before: i64,
    future_from: i64,
    trust: Duration,
}

impl MarkLedger {
    /// An empty ledger trusting entries for half of `orphan_secs`.
    #[must_use]
    pub fn new(orphan_secs: u64) -> Self {
        Self {
            marked: std::collections::HashMap::new(),
            covered_before: i64::MIN,
            future_from: i64::MAX,
            trust: Duration::from_secs(orphan_secs / 2),
        }
    }

    /// A pass is about to read markers of minutes `< closed_before` and
    /// `>= future_from` (Unix seconds).
    pub fn begin_pass(&mut self, closed_before: i64, future_from: i64, now: tokio::time::Instant) {
        self.covered_before = self.covered_before.max(closed_before);
        self.future_from = self.future_from.min(future_from);
        let (covered, future, trust) = (self.covered_before, self.future_from, self.trust);
        self.marked.retain(|(_, m), at| {
            let m = i64::from(*m);
            covered <= m && m < future && now.duration_since(*at) < trust
        });
    }

    /// The pairs of `touched` that need a marker, asked at `now`.
    #[must_use]
    pub fn to_mark(&self, touched: &Touched, now: tokio::time::Instant) -> Touched {
        Touched(
            touched
                .iter()
                .filter(|pair| {
                    let m = i64::from(pair.1);
                    let trusted = self.marked.get(*pair).is_some_and(|at| now.duration_since(*at) < self.trust);
                    !(trusted && self.covered_before <= m && m < self.future_from)
                })
                .cloned()
                .collect(),
        )
    }

    /// Markers for `pairs` were written completely; their insert started at `started`.
    pub fn marked(&mut self, pairs: &Touched, started: tokio::time::Instant) {
        for pair in pairs.iter() {
            self.marked.insert(pair.clone(), started);
        }
    }

    /// Entries held (memory: one per open client minute).
    #[must_use]
    pub fn len(&self) -> usize {
        self.marked.len()
    }

    /// Whether no entry is held.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.marked.is_empty()
    }
}

/// The ledger shared by the writer tasks and the roller of one server.
pub type SharedLedger = Arc<std::sync::Mutex<MarkLedger>>;

/// The subquery of pending `(client_id, minute)` pairs (each marker whose
/// sum is positive), restricted by `filter` (SQL over the queue's columns).
#[must_use]
pub fn pending_pairs_sql(tables: &Tables, filter: &str) -> String {
    format!(
        "SELECT client_id, minute FROM {q} WHERE {filter} GROUP BY client_id, minute, token HAVING sum(pending) > 0",
        q = tables.rollup_queue
    )
}

/// The pass's read: pending markers of closed minutes that this server
/// owns or that are orphaned (by ClickHouse's clock, the one that stamped
/// them), of minutes that had no new marker for `quiet` seconds (or waited
/// [`MAX_QUIET_WAIT_SECS`]), each marker at least `settle` seconds old.
///
/// A minute is quiet for all its clients at once, not client by client: a
/// burst or a fleet's replay reaches a minute for every client within a
/// second or two, and ClickHouse's seconds split them into those quiet at
/// one pass and those quiet at the next; the next pass then read the
/// minute's granules again for the rest (`scripts/bench ingest`, 1 ms
/// readings: 16.4M rows read to fold 10M in two passes, `query_log`). A
/// client still writing a closed minute delays the others' fold of it by
/// at most [`MAX_QUIET_WAIT_SECS`]; until then they are answered from raw
/// rows, exactly.
/// Binds: owner, orphan age (s), closed before (s), closed from (s), quiet
/// (s), settle (s), limit.
#[must_use]
pub fn pending_markers_sql(tables: &Tables) -> String {
    format!(
        "SELECT t.1 AS client_id, m, t.2 AS token, t.3 AS o, t.4 AS at, t.5 AS p
FROM (
    SELECT m, groupArray((client_id, token, o, at, p)) AS ts
    FROM (
        SELECT client_id, toUInt32(minute) AS m, token, any(owner) AS o, toUInt32(any(marked_at)) AS at,
            sum(pending) AS p
        FROM {q}
        WHERE (owner = ? OR marked_at < subtractSeconds(now(), ?)) AND (minute < toDateTime(?) OR minute >= toDateTime(?))
        GROUP BY client_id, minute, token
        HAVING p > 0
    )
    GROUP BY m
    HAVING max(at) <= toUInt32(now()) - ? OR min(at) <= toUInt32(now()) - {MAX_QUIET_WAIT_SECS}
)
ARRAY JOIN ts AS t
WHERE at <= toUInt32(now()) - ?
ORDER BY m
LIMIT ?",
        q = tables.rollup_queue
    )
}

/// A raw-time window `[from, to)` in µs over `ts`, with partition pruning
/// on 18.16 (partitioned by the materialized `dt`). Four binds (Legacy) or
/// two (Current): see [`bind_window`].
fn window_sql(flavor: Flavor) -> &'static str {
    match flavor {
        Flavor::Legacy => {
            "ts >= toInt64(?) AND ts < toInt64(?) \
             AND dt >= toDateTime(intDiv(toInt64(?), 1000000)) AND dt < toDateTime(intDiv(toInt64(?), 1000000) + 1)"
        }
        Flavor::Current => {
            "ts >= fromUnixTimestamp64Micro(toInt64(?), 'UTC') AND ts < fromUnixTimestamp64Micro(toInt64(?), 'UTC')"
        }
    }
}

fn bind_window(query: clickhouse::query::Query, flavor: Flavor, from_us: i64, to_us: i64) -> clickhouse::query::Query {
    match flavor {
        Flavor::Legacy => query.bind(from_us).bind(to_us).bind(from_us).bind(to_us),
        Flavor::Current => query.bind(from_us).bind(to_us),
    }
}

/// The fold's read of a run: for every `(client, sensor, minute)` of
/// `clients` clients over a run of whole minutes, the aggregates of every
/// raw row the read sees, *without* `FINAL`, and how many distinct reading
/// times (identities) those rows hold. Where the two counts agree, no
/// identity is there twice, so the rows are exactly what `FINAL` would
/// return from the same parts and the aggregates are exact; a group with a
/// copy not yet merged away (a redelivery after a crash, two servers, a
/// device repeating a timestamp) is recomputed by [`recompute_sql`].
/// `FINAL` merges the parts row by row on one thread: 2.83 CPU s for 10M
/// rows in 50 fresh parts on 18.16, against 1.15 s for this read (the
/// `uniqExact` included; 0.80 s without it). The set counts each time as
/// its offset in the minute ([`Flavor::micros_in_minute`], 4 bytes instead
/// of 8): with 50,000 readings per sensor and minute the sets outgrow the
/// caches, and the read cost 1.65–1.77 s instead of 2.2 s (`FINAL` 2.5–2.8
/// s). Columns as [`RollupRow`], the distinct times in `version`.
/// Binds: each client id, then the window (see `window_sql`).
#[must_use]
pub fn fold_sql(tables: &Tables, flavor: Flavor, clients: usize) -> String {
    let list = vec!["?"; clients].join(", ");
    format!(
        "SELECT client_id, sensor, toUInt32({minute}) AS minute, count() AS count, sum(value) AS sum,
       avg(value) AS avg, min(value) AS min, max(value) AS max, uniqExact({offset}) AS version
FROM {readings}
WHERE client_id IN ({list}) AND {window}
GROUP BY client_id, sensor, minute",
        readings = tables.readings,
        minute = flavor.minute_of_ts(),
        offset = flavor.micros_in_minute(),
        window = window_sql(flavor),
    )
}

/// A `readings_1m` row, as the fold reads it from [`fold_sql`] and, when
/// [`RollupRow::is_exact`], writes it unchanged.
#[derive(Debug, Clone, Row, Serialize, Deserialize, PartialEq)]
pub struct RollupRow {
    /// The device.
    pub client_id: String,
    /// The sensor.
    pub sensor: String,
    /// Start of the minute, Unix seconds.
    pub minute: u32,
    /// Raw rows read, copies included (readings, once exact).
    pub count: u64,
    /// Sum of their values.
    pub sum: f64,
    /// Their mean.
    pub avg: f64,
    /// Their least value.
    pub min: f64,
    /// Their greatest value.
    pub max: f64,
    /// As written, `count`: the most complete recompute wins (point 3
    /// above). As read, the distinct reading times among the rows: equal
    /// to `count` exactly when no identity was read twice, and then already
    /// the version to write.
    pub version: u64,
}

impl RollupRow {
    /// Whether the rows read held every identity once, so the row is
    /// exact as read; otherwise recompute the minute under `FINAL`.
    #[must_use]
    pub fn is_exact(&self) -> bool {
        self.count == self.version
    }
}

/// The recompute, under `FINAL`, of every sensor of `clients` clients over
/// a run of whole minutes: for the minutes whose raw rows [`fold_sql`]
/// found an identity in twice. Binds: each client id, then the window (see
/// `window_sql`).
#[must_use]
pub fn recompute_sql(tables: &Tables, flavor: Flavor, clients: usize) -> String {
    let list = vec!["?"; clients].join(", ");
    format!(
        "INSERT INTO {rollup} (client_id, sensor, minute, count, sum, avg, min, max, version)
SELECT client_id, sensor, {minute} AS m, count() AS c, sum(value) AS s, avg(value) AS a, min(value) AS mn,
       max(value) AS mx, toUInt64(count()) AS v
FROM {readings} FINAL
WHERE client_id IN ({list}) AND {window}
GROUP BY client_id, sensor, m",
        rollup = tables.readings_1m,
        readings = tables.readings,
        minute = flavor.minute_of_ts(),
        window = window_sql(flavor),
    )
}

/// One recompute statement's work: these clients over `[from, to)` minutes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// The devices (sorted, at most `MAX_CLIENTS_PER_STATEMENT` (1000)).
    pub clients: Vec<String>,
    /// First minute, Unix seconds.
    pub from: u32,
    /// End (exclusive), Unix seconds.
    pub to: u32,
}

/// A run being planned: its clients, window and pending client-minutes.
struct Span {
    clients: BTreeSet<String>,
    from: u32,
    to: u32,
    pending: usize,
}

impl Span {
    /// Whether minute `minute` (after this run) with `clients` pending joins it.
    fn takes(&self, minute: u32, clients: &BTreeSet<String>) -> bool {
        if i64::from(minute + 60 - self.from) > MAX_RUN_MINUTES * 60 {
            return false;
        }
        if self.clients == *clients {
            return minute - self.to <= MAX_GAP_SECS;
        }
        if minute != self.to {
            return false;
        }
        let union = self.clients.len() + clients.iter().filter(|c| !self.clients.contains(*c)).count();
        let minutes = ((minute + 60 - self.from) / 60) as usize;
        2 * (self.pending + clients.len()) >= union * minutes
    }

    fn extend(&mut self, minute: u32, clients: BTreeSet<String>) {
        self.pending += clients.len();
        self.clients.extend(clients);
        self.to = minute + 60;
    }
}

/// Groups pending `(client, minute)` pairs into recompute statements, each
/// reading only its own window, of at most a day:
/// - minutes with the same set of clients at most `MAX_GAP_SECS` (an hour) apart
///   form one run (a replayed backlog of one device becomes one statement
///   per day);
/// - the next minute joins a run with other clients if the run stays at
///   least half pending: at most twice the pending client-minutes are
///   recomputed. Minutes become quiet client by client, so a pass often
///   holds a minute for 39 clients, the next for 20, the next for 10; one
///   statement per such set read every one of those clients' granules
///   again (8,192 rows, at 10 readings/s per sensor several minutes of a
///   client): `scripts/bench ingest --ingest-count 10000000` read 26M rows
///   to fold 10M, 17M in statements of a single minute.
///
/// The runs cover every pair; the rest they cover are minutes of their
/// clients, recomputed harmlessly (`version = count`).
#[must_use]
pub fn plan(pairs: impl IntoIterator<Item = (String, u32)>) -> Vec<Run> {
    let mut by_minute: BTreeMap<u32, BTreeSet<String>> = BTreeMap::new();
    for (client, minute) in pairs {
        by_minute.entry(minute).or_default().insert(client);
    }
    let mut runs: Vec<Span> = Vec::new();
    for (minute, clients) in by_minute {
        match runs.last_mut() {
            Some(run) if run.takes(minute, &clients) => run.extend(minute, clients),
            _ => runs.push(Span { pending: clients.len(), clients, from: minute, to: minute + 60 }),
        }
    }
    let mut out = Vec::new();
    for Span { clients, from, to, .. } in runs {
        let clients: Vec<String> = clients.into_iter().collect();
        for chunk in clients.chunks(MAX_CLIENTS_PER_STATEMENT) {
            out.push(Run { clients: chunk.to_vec(), from, to });
        }
    }
    out
}

/// The live rollup of one client: `readings_1m` for folded-in minutes, raw
/// rows for the minutes in `pending` (those are excluded from the rollup
/// side, so no minute is counted twice). Binds, in order: see
/// [`bind_live_series`].
#[must_use]
pub fn live_series_sql(tables: &Tables, flavor: Flavor, sensor: bool, pending: usize) -> String {
    let s = if sensor { " AND sensor = ?" } else { "" };
    let minutes = if pending == 0 { "toDateTime(0)".to_owned() } else { vec!["toDateTime(?)"; pending].join(", ") };
    format!(
        "SELECT sensor, toUInt32(minute) AS m, count, avg, min, max FROM (
    SELECT sensor, minute, count, avg, min, max FROM {rollup} FINAL
    WHERE client_id = ?{s} AND minute >= toDateTime(?) AND minute NOT IN ({minutes})
    UNION ALL
    SELECT sensor, {minute} AS minute, count() AS count, avg(value) AS avg, min(value) AS min, max(value) AS max
    FROM {readings} FINAL
    WHERE client_id = ?{s} AND {window}
    GROUP BY sensor, minute
    HAVING minute IN ({minutes})
) ORDER BY sensor, m LIMIT ?",
        rollup = tables.readings_1m,
        readings = tables.readings,
        minute = flavor.minute_of_ts(),
        window = window_sql(flavor),
    )
}

/// Binds [`live_series_sql`]: `pending` minutes (Unix seconds, those at or
/// after `from_s`), then the limit.
pub fn bind_live_series(
    mut query: clickhouse::query::Query,
    flavor: Flavor,
    client_id: &str,
    sensor: Option<&str>,
    from_s: i64,
    pending: &[u32],
    limit: u32,
) -> clickhouse::query::Query {
    query = query.bind(client_id);
    if let Some(sensor) = sensor {
        query = query.bind(sensor);
    }
    query = query.bind(from_s);
    for m in pending {
        query = query.bind(*m);
    }
    query = query.bind(client_id);
    if let Some(sensor) = sensor {
        query = query.bind(sensor);
    }
    let (lo, hi) = match (pending.iter().min(), pending.iter().max()) {
        (Some(lo), Some(hi)) => (i64::from(*lo) * 1_000_000, (i64::from(*hi) + 60) * 1_000_000),
        _ => (0, 0), // empty window: the raw side reads nothing
    };
    query = bind_window(query, flavor, lo, hi);
    for m in pending {
        query = query.bind(*m);
    }
    query.bind(limit)
}

/// Placeholders for the client id in [`live_rows_sql`] with `one_client`:
/// the rollup side's filter and the pending set's three reads.
pub const LIVE_ROWS_CLIENT_BINDS: usize = 4;

/// A name in the `readings_1m_live` definition that only the current
/// definition has: [`crate::schema::ensure`] replaces a view without it
/// (a view holds no data).
pub const LIVE_VIEW_MARK: &str = "raw_wins";

/// The `readings_1m_live` view: every minute of every client, exact, for
/// Grafana and ad-hoc SQL.
///
/// The pending set is read once, by the raw side (`HAVING (client_id,
/// minute) IN pending`), and the rollup side is not filtered by it: where
/// both sides have a `(client_id, sensor, minute)`, the raw side wins. A
/// minute pending when the set was read is answered from its raw rows, all
/// of them (readings are inserted before their marker); any other minute
/// from `readings_1m FINAL`, whose parts the query chose before it read the
/// set. A pass consumes a marker only [`CONSUME_DELAY`] after writing the
/// minute's rollup, so a minute the set no longer holds was written seconds
/// before the query started. (Two reads of the set, one per side, let a
/// minute consumed between them be answered from neither side: the CI
/// flake that led here.) The raw side's pruning (clients and the oldest
/// pending minute: further reads of the queue) can only drop a minute
/// marked during the query, which then shows its previous rollup, as if
/// the query ran before the new readings arrived.
///
/// Legacy (18.16) joins the raw side (built completely before the left
/// side is read) onto the rollup; 18.16 pushes no `WHERE` into a view
/// either way. Current ClickHouse pushes a `WHERE` on the key columns
/// through `UNION ALL` and `GROUP BY` but not into a `FULL JOIN`
/// (measured in chdb: 48 ms vs 1.1 s for one client over 13M rollup rows),
/// so there the sides are a `UNION ALL` and `argMax(…, src)` picks.
#[must_use]
pub fn live_view_sql(tables: &Tables, flavor: Flavor) -> String {
    format!(
        "CREATE VIEW IF NOT EXISTS {view} AS\n{body}",
        view = tables.readings_1m_live,
        body = live_rows_sql(tables, flavor, None, false)
    )
}

/// The rows of `readings_1m_live` (see [`live_view_sql`] for why this
/// form), for minutes from `from_s` on (Unix seconds, a whole minute) when
/// given, and of one client when `one_client` (then bind its id
/// [`LIVE_ROWS_CLIENT_BINDS`] times, before any later placeholder): both
/// sides are filtered in the query itself, so their cost follows the window
/// and the client whether or not ClickHouse pushes a `WHERE` into a view.
/// Columns: `client_id, sensor, minute, count, sum, avg, min, max`.
#[must_use]
pub fn live_rows_sql(tables: &Tables, flavor: Flavor, from_s: Option<i64>, one_client: bool) -> String {
    let mut filters = Vec::new();
    if let Some(from) = from_s {
        // An integer of ours, not caller input: safe to inline.
        filters.push(format!("minute >= toDateTime({from})"));
    }
    if one_client {
        filters.push("client_id = ?".to_owned());
    }
    let (rollup_filter, pending_filter) = if filters.is_empty() {
        (String::new(), "1".to_owned())
    } else {
        (format!("\n    WHERE {}", filters.join(" AND ")), filters.join(" AND "))
    };
    let pending = pending_pairs_sql(tables, &pending_filter);
    let oldest = match flavor {
        Flavor::Legacy => format!("ts >= (SELECT toInt64(min(toUInt32(minute))) * 1000000 FROM ({pending}))"),
        Flavor::Current => {
            format!("ts >= (SELECT toDateTime64(min(minute), 6, 'UTC') FROM ({pending}))")
        }
    };
    // The raw side's aggregates named `{prefix}count`…, then `extra`.
    let raw = |prefix: &str, extra: &str| {
        format!(
            "SELECT client_id, sensor, {minute} AS minute, count() AS {prefix}count, sum(value) AS {prefix}sum,
           avg(value) AS {prefix}avg, min(value) AS {prefix}min, max(value) AS {prefix}max{extra}
    FROM {readings} FINAL
    WHERE client_id {gin} (SELECT client_id FROM ({pending})) AND {oldest}
    GROUP BY client_id, sensor, minute
    HAVING (client_id, minute) {gin} ({pending})",
            readings = tables.readings,
            minute = flavor.minute_of_ts(),
            gin = tables.in_subquery(),
        )
    };
    let folded = |extra: &str| {
        format!(
            "SELECT client_id, sensor, minute, count AS f_count, sum AS f_sum, avg AS f_avg, min AS f_min,
           max AS f_max{extra}
    FROM {rollup} FINAL{rollup_filter}",
            rollup = tables.readings_1m
        )
    };
    let columns = ["count", "sum", "avg", "min", "max"];
    let body = match flavor {
        Flavor::Legacy => {
            let pick: Vec<String> = columns.iter().map(|c| format!("if(r_count > 0, r_{c}, f_{c}) AS {c}")).collect();
            format!(
                "SELECT client_id, sensor, minute, {pick}
FROM ({folded}) AS folded
ALL FULL OUTER JOIN ({raw}) AS {LIVE_VIEW_MARK} USING (client_id, sensor, minute)",
                pick = pick.join(", "),
                folded = folded(""),
                raw = raw("r_", ""),
            )
        }
        Flavor::Current => {
            let pick: Vec<String> =
                columns.iter().enumerate().map(|(i, c)| format!("tupleElement(p, {}) AS {c}", i + 1)).collect();
            format!(
                "SELECT client_id, sensor, minute, {pick} FROM (
    SELECT client_id, sensor, minute, argMax((f_count, f_sum, f_avg, f_min, f_max), src) AS p FROM (
    {folded}
    UNION ALL
    {raw}
    ) AS {LIVE_VIEW_MARK}
    GROUP BY client_id, sensor, minute
)",
                pick = pick.join(", "),
                folded = folded(", 0 AS src"),
                raw = raw("f_", ", 1 AS src"),
            )
        }
    };
    body
}

/// Timing of the rollup passes.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Time between passes.
    pub interval: Duration,
    /// A minute is folded in once this many seconds passed since its start.
    pub after_secs: u64,
    /// Other servers' markers are adopted once this old.
    pub orphan_secs: u64,
    /// Time between a pass's rollup insert and its consumption of the
    /// markers ([`CONSUME_DELAY`] in production).
    pub consume_delay: Duration,
    /// On a cluster, how old the readings a pass folds in must be (see
    /// point 5 above; `cluster_replica_settle_secs`); zero on a single
    /// server, where reads and inserts meet in one place.
    pub settle: Duration,
    /// A minute is folded once it had no new marker for this long
    /// (`rollup_quiet_secs`; see [`MAX_QUIET_WAIT_SECS`]).
    pub quiet: Duration,
}

/// A minute that keeps getting markers (readings of a closed minute
/// arriving batch after batch, as a replayed backlog does) is folded once
/// its oldest pending marker is this old, quiet or not: late readings are
/// in `readings_1m` within about a minute whatever their pace.
pub const MAX_QUIET_WAIT_SECS: u64 = 60;

/// The fold's `uniqExact` holds every reading time of its run in memory
/// (20 to 50 bytes per row read on 18.16): beyond this much ClickHouse
/// spills the aggregation to disk (measured to work on 18.16) rather than
/// refusing a long run with a memory limit.
const FOLD_SPILL_BYTES: &str = "1000000000";

/// The most a replica may lag (seconds, by ClickHouse's account of its
/// replication queue) and still serve a recompute's reads on a cluster.
const MAX_REPLICA_DELAY_SECS: &str = "1";

/// How long a pass waits between writing a minute's rollup and consuming
/// its markers. A query of `readings_1m_live` chooses the rollup's parts
/// when its pipeline is built and reads the pending set just after
/// ([`live_view_sql`]); a minute consumed in between would show a rollup
/// older than the pass's. The delay makes that need a gap of seconds
/// inside one query's start-up instead of milliseconds. A stop during the
/// wait leaves the markers pending: the minute is folded again, harmlessly.
pub const CONSUME_DELAY: Duration = Duration::from_secs(2);

/// Folds closed minutes into `readings_1m`, one pass per interval.
#[derive(Debug)]
pub struct Roller {
    store: Store,
    owner: String,
    timing: Timing,
    batch: u32,
    ledger: SharedLedger,
}

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Markers consumed.
    pub markers: usize,
    /// `(client, minute)` pairs recomputed.
    pub minutes: usize,
    /// Recompute statements run.
    pub statements: usize,
}

impl Roller {
    /// A roller writing through `store`, consuming markers of `owner`,
    /// telling `ledger` what each pass may read.
    #[must_use]
    pub fn new(store: Store, owner: &str, timing: Timing, ledger: SharedLedger) -> Self {
        Self { store, owner: owner.to_owned(), timing, batch: 100_000, ledger }
    }

    fn metrics(&self) -> &Arc<Metrics> {
        self.store.metrics()
    }

    /// Runs passes until `stop`. Markers are durable: whatever a stop
    /// interrupts is found again by the next pass, here or on a peer.
    pub async fn run(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.timing.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.pass(i64::from(crate::deadletter::unix_seconds())).await {
                Ok(report) if report.markers > 0 => {
                    tracing::debug!(
                        markers = report.markers,
                        minutes = report.minutes,
                        statements = report.statements,
                        "rollup pass"
                    );
                }
                Ok(_) => {}
                Err(StoreError::Stopped) => return,
                Err(StoreError::Permanent(error) | StoreError::Exhausted { error, .. }) => {
                    self.metrics().rollup_errors.inc();
                    tracing::error!(%error, "rollup pass failed permanently; its minutes stay pending (answered from raw rows) and are retried next pass");
                }
            }
        }
    }

    /// One pass at server time `now_s`: read pending closed markers, recompute
    /// their minutes, consume the markers. Repeats while a full batch was read.
    ///
    /// # Errors
    /// A permanent ClickHouse error, or the stop token while retrying.
    pub async fn pass(&self, now_s: i64) -> Result<PassReport, StoreError> {
        let mut total = PassReport::default();
        loop {
            let report = self.pass_once(now_s).await?;
            total.markers += report.markers;
            total.minutes += report.minutes;
            total.statements += report.statements;
            if report.markers < self.batch as usize {
                return Ok(total);
            }
        }
    }

    async fn pass_once(&self, now_s: i64) -> Result<PassReport, StoreError> {
        let (client, tables, flavor) = (self.store.client(), self.store.tables(), self.store.flavor());
        let sql = pending_markers_sql(tables);
        let closed_before = now_s - i64::try_from(self.timing.after_secs).unwrap_or(i64::MAX / 2);
        let future_from = now_s + FUTURE_CLOSE_SECS;
        // Before the read: from here on no job may rely on a marker this read can take.
        self.ledger.lock().unwrap_or_else(std::sync::PoisonError::into_inner).begin_pass(
            closed_before.max(0),
            future_from,
            tokio::time::Instant::now(),
        );
        if !self.timing.settle.is_zero() {
            self.store.pause(self.timing.settle).await?;
        }
        let markers: Vec<QueueRow> = self
            .store
            .retry("rollup_queue", || {
                client
                    .query(&sql)
                    .bind(self.owner.as_str())
                    .bind(self.timing.orphan_secs)
                    .bind(closed_before.max(0))
                    .bind(future_from)
                    .bind(self.timing.quiet.as_secs())
                    .bind(self.timing.settle.as_secs())
                    .bind(self.batch)
                    .fetch_all::<QueueRow>()
            })
            .await?;
        let m = self.metrics();
        m.rollup_passes.inc();
        if markers.is_empty() {
            m.rollup_backlog_seconds.set(0);
            return Ok(PassReport::default());
        }
        // Approximate (ClickHouse's clock against this server's): for alerting only.
        let oldest = markers.iter().map(|r| i64::from(r.marked_at)).min().unwrap_or(now_s);
        m.rollup_backlog_seconds.set((now_s - oldest).max(0));
        let pairs: BTreeSet<(String, u32)> = markers.iter().map(|r| (r.client_id.clone(), r.minute)).collect();
        let runs = plan(pairs.iter().cloned());
        let mut duplicated = BTreeSet::new();
        for run in &runs {
            duplicated.extend(self.fold(run).await?);
        }
        // The minutes whose raw rows held a copy: again, deduplicated.
        let rechecks = plan(duplicated.iter().cloned());
        for run in &rechecks {
            let sql = recompute_sql(tables, flavor, run.clients.len());
            self.store.retry("readings_1m", || self.run_query(&sql, run).execute()).await?;
        }
        m.rollup_duplicate_minutes.inc_by(duplicated.len() as u64);
        // Only now: every marker read was covered by a fold (and, for a
        // copy, a recompute) that ran after it, and readers that chose the
        // rollup's parts before it have read the pending set (see
        // CONSUME_DELAY).
        self.store.pause(self.timing.consume_delay).await?;
        self.store
            .retry("rollup_queue", || async {
                let mut insert = client.insert_unescaped::<QueueRow>(&tables.rollup_queue).await?;
                for r in &markers {
                    insert.write(&QueueRow { pending: -r.pending, ..r.clone() }).await?;
                }
                insert.end().await
            })
            .await?;
        m.rollup_minutes.inc_by(pairs.len() as u64);
        Ok(PassReport { markers: markers.len(), minutes: pairs.len(), statements: runs.len() + rechecks.len() })
    }

    /// `sql` (a [`fold_sql`] or [`recompute_sql`]) bound to `run`, with the
    /// cluster's read settings (point 5 above).
    fn run_query(&self, sql: &str, run: &Run) -> clickhouse::query::Query {
        let mut query = self.store.client().query(sql);
        if self.store.tables().cluster.is_some() {
            query = query
                .with_setting("max_replica_delay_for_distributed_queries", MAX_REPLICA_DELAY_SECS)
                .with_setting("fallback_to_stale_replicas_for_distributed_queries", "0");
        }
        for c in &run.clients {
            query = query.bind(c.as_str());
        }
        let (from_us, to_us) = (i64::from(run.from) * 1_000_000, i64::from(run.to) * 1_000_000);
        bind_window(query, self.store.flavor(), from_us, to_us)
    }

    /// Folds `run` ([`fold_sql`]): writes the exact groups to `readings_1m`
    /// as they are read and returns the `(client, minute)` pairs of the
    /// others. A retry reads and writes the run again; rows written twice
    /// are the same row (`version = count`).
    async fn fold(&self, run: &Run) -> Result<BTreeSet<(String, u32)>, StoreError> {
        let (client, tables) = (self.store.client(), self.store.tables());
        let sql = fold_sql(tables, self.store.flavor(), run.clients.len());
        self.store
            .retry("readings_1m", || async {
                let mut groups = self
                    .run_query(&sql, run)
                    .with_setting("max_bytes_before_external_group_by", FOLD_SPILL_BYTES)
                    .fetch::<RollupRow>()?;
                let mut insert = None;
                let mut duplicated = BTreeSet::new();
                while let Some(row) = groups.next().await? {
                    if !row.is_exact() {
                        duplicated.insert((row.client_id, row.minute));
                        continue;
                    }
                    if insert.is_none() {
                        insert = Some(client.insert_unescaped::<RollupRow>(&tables.readings_1m).await?);
                    }
                    if let Some(insert) = insert.as_mut() {
                        insert.write(&row).await?;
                    }
                }
                if let Some(insert) = insert {
                    insert.end().await?;
                }
                Ok(duplicated)
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, u32)]) -> Vec<(String, u32)> {
        list.iter().map(|(c, m)| ((*c).to_owned(), *m)).collect()
    }

    fn covered(runs: &[Run]) -> BTreeSet<(String, u32)> {
        let mut out = BTreeSet::new();
        for r in runs {
            for c in &r.clients {
                for m in (r.from..r.to).step_by(60) {
                    out.insert((c.clone(), m));
                }
            }
        }
        out
    }

    #[test]
    fn one_closed_minute_of_many_clients_is_one_statement() {
        let many: Vec<(String, u32)> = (0..500).map(|i| (format!("c{i}"), 600)).collect();
        let runs = plan(many.clone());
        assert_eq!(runs.len(), 1);
        assert_eq!((runs[0].from, runs[0].to), (600, 660));
        assert_eq!(covered(&runs), many.into_iter().collect());
    }

    #[test]
    fn a_replayed_backlog_of_one_client_is_one_run_per_day() {
        let backlog: Vec<(String, u32)> = (0..3000).map(|i| ("late".to_owned(), 60 * i)).collect();
        let runs = plan(backlog.clone());
        assert_eq!(runs.len(), 3, "{runs:?}");
        assert!(runs.iter().all(|r| i64::from(r.to - r.from) <= MAX_RUN_MINUTES * 60));
        assert_eq!(covered(&runs), backlog.into_iter().collect());
    }

    #[test]
    fn runs_cover_the_pending_pairs_and_only_short_gaps_of_the_same_clients() {
        let p = pairs(&[("a", 0), ("a", 60), ("b", 60), ("a", 120), ("b", 600), ("c", 600)]);
        let runs = plan(p.clone());
        let expected = [(vec!["a", "b"], 0, 180), (vec!["b", "c"], 600, 660)];
        let got: Vec<(Vec<&str>, u32, u32)> =
            runs.iter().map(|r| (r.clients.iter().map(String::as_str).collect(), r.from, r.to)).collect();
        assert_eq!(got, expected, "adjacent minutes of other clients join while half pending; a gap does not");
        assert!(covered(&runs).is_superset(&p.into_iter().collect()));
        // One client, a minute every 18 minutes for 3 days: one run per day,
        // covering the minutes between; a gap over an hour is not covered.
        let sparse: Vec<(String, u32)> = (0..240).map(|i| ("bad".to_owned(), i * 18 * 60)).collect();
        let runs = plan(sparse.clone());
        assert!(runs.len() <= 4, "{} runs", runs.len());
        let cover = covered(&runs);
        assert!(sparse.iter().all(|p| cover.contains(p)));
        assert!(runs.iter().all(|r| i64::from(r.to - r.from) <= MAX_RUN_MINUTES * 60));
        let far = plan(pairs(&[("a", 0), ("a", 60 + MAX_GAP_SECS + 60)]));
        assert_eq!(far.len(), 2, "{far:?}");
    }

    #[test]
    fn minutes_quiet_for_fewer_and_fewer_clients_are_one_statement() {
        // What a pass of the 10 Hz ingest bench holds: 7 minutes of all 50
        // clients, then the next three for 39, 20 and 10 of them.
        let mut p: Vec<(String, u32)> = Vec::new();
        for (minute, clients) in [(0, 50), (60, 50), (120, 50), (180, 50), (240, 50), (300, 50), (360, 50)]
            .into_iter()
            .chain([(420, 39), (480, 20), (540, 10)])
        {
            p.extend((0..clients).map(|c| (format!("c{c:02}"), minute)));
        }
        let runs = plan(p.clone());
        assert_eq!(runs.len(), 1, "{runs:?}");
        assert_eq!((runs[0].from, runs[0].to, runs[0].clients.len()), (0, 600, 50));
        assert!(covered(&runs).is_superset(&p.into_iter().collect()));
    }

    #[test]
    fn a_long_backlog_does_not_drag_other_clients_minutes_along() {
        // One device replays 600 minutes; 1000 others have one closed minute
        // inside that span. Joining them would recompute 600 minutes of
        // 1000 clients for 1,600 pending client-minutes.
        let mut p: Vec<(String, u32)> = (0..600).map(|i| ("late".to_owned(), 60 * i)).collect();
        p.extend((0..1000).map(|c| (format!("c{c:04}"), 60 * 300)));
        let runs = plan(p.clone());
        let cover = covered(&runs);
        assert!(cover.is_superset(&p.iter().cloned().collect()));
        assert!(cover.len() <= 2 * p.len(), "{} client-minutes recomputed for {} pending", cover.len(), p.len());
        assert!(runs.iter().filter(|r| r.clients.len() > 1).all(|r| r.to - r.from <= 120), "{runs:?}");
    }

    #[test]
    fn many_clients_are_split_into_bounded_statements() {
        let many: Vec<(String, u32)> = (0..2500).map(|i| (format!("c{i:05}"), 60)).collect();
        let runs = plan(many.clone());
        assert_eq!(runs.len(), 3);
        assert!(runs.iter().all(|r| r.clients.len() <= MAX_CLIENTS_PER_STATEMENT));
        assert_eq!(covered(&runs), many.into_iter().collect());
    }

    #[test]
    fn a_jobs_touched_minutes_are_those_of_its_fresh_readings() {
        use telemetry_wire::Reading;
        // Minutes 0, 1, back to 0, then 5 (not fresh) and 2; client b in minute 1 only.
        let ts = [10, 59_999_999, 60_000_000, 30, 300_000_000, 120_000_000];
        let base = 1_700_000_040_000_000; // a minute boundary
        let part = |client: &str, ts: &[i64], fresh: Vec<(u64, u64)>| {
            let readings: Vec<Reading> = ts.iter().map(|t| Reading::new("s", base + t, 1.0)).collect();
            crate::job::BatchPart::for_test(client, 1, 1, readings, fresh)
        };
        let mut job = Job::default();
        job.parts.push(part("a", &ts, vec![(1, 4), (6, 6)]));
        job.parts.push(part("b", &[60_000_001], vec![(1, 1)]));
        let m = |k: u32| 1_700_000_040 + 60 * k;
        assert_eq!(Touched::of(&job), touched(&[("a", m(0)), ("a", m(1)), ("a", m(2)), ("b", m(1))]));
    }

    #[test]
    fn the_days_of_touched_minutes_are_the_readings_partitions() {
        let t = touched(&[("a", 86_340), ("a", 86_400), ("b", 86_400 * 5 + 60)]);
        assert_eq!(t.days(), [0, 1, 5].into_iter().collect());
        assert_eq!(crate::writer::day_of(i64::from(86_340u32) * 1_000_000 + 59_999_999), 0);
    }

    #[test]
    fn minutes_are_floored_including_before_a_minute_boundary() {
        assert_eq!(minute_of(0), 0);
        assert_eq!(minute_of(59_999_999), 0);
        assert_eq!(minute_of(60_000_000), 60);
        assert_eq!(minute_of(1_700_000_123_456_789), 1_700_000_100);
    }

    fn touched(list: &[(&str, u32)]) -> Touched {
        Touched(pairs(list).into_iter().collect())
    }

    #[test]
    fn a_minute_marked_before_is_not_marked_again_until_a_pass_may_read_it() {
        let t0 = tokio::time::Instant::now();
        let mut ledger = MarkLedger::new(300);
        ledger.begin_pass(600, 10_000, t0); // minutes < 600 are readable
        let job = touched(&[("a", 600), ("b", 660)]);
        assert_eq!(ledger.to_mark(&job, t0), job, "nothing marked yet");
        ledger.marked(&job, t0);
        assert!(ledger.to_mark(&job, t0).is_empty(), "durable unread markers cover a later job");
        // A pass that may read minute 600 (but not 660) starts.
        ledger.begin_pass(660, 10_000, t0);
        assert_eq!(ledger.to_mark(&job, t0), touched(&[("a", 600)]));
        assert_eq!(ledger.len(), 1, "the covered entry is dropped");
    }

    #[test]
    fn an_entry_is_trusted_only_for_half_the_orphan_age() {
        let t0 = tokio::time::Instant::now();
        let mut ledger = MarkLedger::new(300);
        let job = touched(&[("a", 600)]);
        ledger.marked(&job, t0);
        assert!(ledger.to_mark(&job, t0 + Duration::from_secs(149)).is_empty());
        assert_eq!(ledger.to_mark(&job, t0 + Duration::from_secs(150)), job, "a peer may adopt it soon");
        ledger.begin_pass(0, 10_000, t0 + Duration::from_secs(150));
        assert!(ledger.is_empty());
    }

    #[test]
    fn far_future_minutes_are_always_marked_and_bounds_never_loosen() {
        let t0 = tokio::time::Instant::now();
        let mut ledger = MarkLedger::new(300);
        ledger.begin_pass(660, 5000, t0);
        // A later pass with an earlier clock (stepped back) does not make minute 600 unread again.
        ledger.begin_pass(0, 9000, t0);
        let job = touched(&[("a", 600), ("a", 6000)]);
        ledger.marked(&job, t0);
        assert_eq!(ledger.to_mark(&job, t0), job, "600 was readable once, 6000 is beyond the future bound");
    }

    #[test]
    fn a_group_is_written_as_read_only_if_its_rows_hold_each_identity_once() {
        // As read: `version` holds the distinct identities.
        let group = |count, identities| RollupRow {
            client_id: "c".into(),
            sensor: "s".into(),
            minute: 60,
            count,
            sum: 6.0,
            avg: 2.0,
            min: 1.0,
            max: 3.0,
            version: identities,
        };
        let row = group(3, 3);
        assert!(row.is_exact(), "no copy");
        assert_eq!((row.client_id.as_str(), row.sensor.as_str(), row.minute), ("c", "s", 60));
        assert_eq!((row.count, row.sum, row.avg, row.min, row.max, row.version), (3, 6.0, 2.0, 1.0, 3.0, 3));
        assert!(!group(3, 2).is_exact(), "a copy: the sums count it twice");
    }

    #[test]
    fn statements_have_one_placeholder_per_bind() {
        let t = Tables::new("db");
        assert_eq!(fold_sql(&t, Flavor::Legacy, 3).matches('?').count(), 3 + 4);
        assert_eq!(fold_sql(&t, Flavor::Current, 2).matches('?').count(), 2 + 2);
        assert_eq!(recompute_sql(&t, Flavor::Legacy, 3).matches('?').count(), 3 + 4);
        assert_eq!(recompute_sql(&t, Flavor::Current, 2).matches('?').count(), 2 + 2);
        // client, sensor, from, 2 pending; client, sensor, window, 2 pending; limit
        assert_eq!(
            live_series_sql(&t, Flavor::Legacy, true, 2).matches('?').count(),
            1 + 1 + 1 + 2 + 1 + 1 + 4 + 2 + 1
        );
        assert_eq!(live_series_sql(&t, Flavor::Current, false, 0).matches('?').count(), 1 + 1 + 1 + 2 + 1);
        assert_eq!(pending_markers_sql(&t).matches('?').count(), 7);
    }
}
