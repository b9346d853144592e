//! The 1-minute rollup `readings_1m` (count, sum, avg, min, max per client,
//! sensor and minute), recomputed from deduplicated raw data.
//!
//! # Why it stays exact
//! After every readings insert, the writer recomputes *whole* minutes — every
//! sensor of each `(client_id, minute)` the insert touched — from `readings`
//! grouped by the reading identity `(client_id, sensor, ts)`, so a reading
//! stored twice counts once. The rollup is a ReplacingMergeTree whose
//! `version` is the recompute's start time in microseconds: the latest
//! recompute of a minute wins, and it read every insert that finished before
//! it started. With several ingest servers two recomputes of one minute may
//! race (each started before the other's insert was visible, or clocks
//! differ); the [`settle`] task recomputes touched minutes once more
//! `rollup_settle_secs` later, when those inserts are long finished. Queries
//! read the rollup with `FINAL`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use clickhouse::Client;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::batcher::Job;
use crate::metrics::Metrics;
use crate::schema::{Flavor, Tables};

const MINUTE_US: i64 = 60_000_000;
/// Most `(client, minute run)` conditions in one recompute statement.
const MAX_TERMS: usize = 200;

/// The `(client_id, minute start µs)` pairs some inserts touched.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Touched(BTreeSet<(String, i64)>);

impl Touched {
    /// The minutes of the new readings in `job`.
    #[must_use]
    pub fn of(job: &Job) -> Self {
        let mut set = BTreeSet::new();
        for part in &job.parts {
            let mut minutes = BTreeSet::new();
            for &(lo, hi) in &part.fresh {
                for seq in lo..=hi {
                    // Invariant: fresh ranges lie within the batch (see Batch::decode).
                    let ts = part.batch.readings[(seq - part.batch.first_seq) as usize].ts;
                    minutes.insert(ts.div_euclid(MINUTE_US) * MINUTE_US);
                }
            }
            set.extend(minutes.into_iter().map(|m| (part.batch.client_id.clone(), m)));
        }
        Self(set)
    }

    /// Adds another set.
    pub fn extend(&mut self, other: Touched) {
        self.0.extend(other.0);
    }

    /// Whether nothing was touched.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Runs of consecutive minutes per client: `(client_id, from µs, to µs exclusive)`.
    #[must_use]
    pub fn runs(&self) -> Vec<(String, i64, i64)> {
        let mut out: Vec<(String, i64, i64)> = Vec::new();
        for (client, minute) in &self.0 {
            match out.last_mut() {
                Some((c, _, to)) if c == client && *to == *minute => *to = minute + MINUTE_US,
                _ => out.push((client.clone(), *minute, minute + MINUTE_US)),
            }
        }
        out
    }
}

/// The rollup's version for a recompute starting now: Unix microseconds.
#[must_use]
pub fn version_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The recompute statement for `terms` runs (one `?` for the version, then
/// three per run: client, from, to).
#[must_use]
pub fn recompute_sql(tables: &Tables, flavor: Flavor, terms: usize) -> String {
    let ts = flavor.ts_param();
    let cond = format!("(client_id = ? AND ts >= {ts} AND ts < {ts})");
    let filter = vec![cond; terms].join(" OR ");
    format!(
        "INSERT INTO {rollup} (client_id, sensor, minute, count, sum, avg, min, max, version)
SELECT client_id, sensor, {minute} AS m, count() AS c, sum(value) AS s, avg(value) AS a, min(value) AS mn,
       max(value) AS mx, toUInt64(?) AS v
FROM (
    SELECT client_id, sensor, ts, any(value) AS value
    FROM {readings}
    WHERE {filter}
    GROUP BY client_id, sensor, ts
)
GROUP BY client_id, sensor, m",
        rollup = tables.readings_1m,
        readings = tables.readings,
        minute = flavor.minute_of_ts(),
    )
}

/// Recomputes every touched minute.
///
/// # Errors
/// The first failing statement.
pub async fn recompute(
    client: &Client,
    tables: &Tables,
    flavor: Flavor,
    touched: &Touched,
    version: u64,
) -> Result<(), clickhouse::error::Error> {
    for chunk in touched.runs().chunks(MAX_TERMS) {
        let sql = recompute_sql(tables, flavor, chunk.len());
        // The version placeholder comes first in the text (SELECT before WHERE).
        let mut query = client.query(&sql).bind(version);
        for (client_id, from, to) in chunk {
            query = query.bind(client_id.as_str()).bind(*from).bind(*to);
        }
        query.execute().await?;
    }
    Ok(())
}

/// Recomputes touched minutes a second time, `settle` after they were
/// touched (between one and two periods later), until `stop`.
pub async fn settle(
    writer: Arc<crate::writer::Writer>,
    mut rx: mpsc::Receiver<Touched>,
    period: Duration,
    stop: CancellationToken,
    metrics: Arc<Metrics>,
) {
    let mut collecting = Touched::default();
    let mut waiting = Touched::default();
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            touched = rx.recv() => match touched {
                Some(t) => collecting.extend(t),
                None => return,
            },
            _ = tick.tick() => {
                if !waiting.is_empty() {
                    let version = version_now();
                    let result = writer
                        .retry("readings_1m", || {
                            recompute(writer.client(), writer.tables(), writer.flavor(), &waiting, version)
                        })
                        .await;
                    if let Err(error) = result {
                        metrics.rollup_errors.inc();
                        tracing::warn!(%error, "second rollup pass failed");
                    }
                }
                waiting = std::mem::take(&mut collecting);
            }
        }
    }
}

/// Groups runs per client (used in tests and docs).
#[must_use]
pub fn runs_by_client(touched: &Touched) -> BTreeMap<String, Vec<(i64, i64)>> {
    let mut out: BTreeMap<String, Vec<(i64, i64)>> = BTreeMap::new();
    for (c, a, b) in touched.runs() {
        out.entry(c).or_default().push((a, b));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_minutes_of_a_client_form_one_run() {
        let m = MINUTE_US;
        let t = Touched(
            [("a".to_owned(), 0), ("a".to_owned(), m), ("a".to_owned(), 3 * m), ("b".to_owned(), m)]
                .into_iter()
                .collect(),
        );
        let runs = runs_by_client(&t);
        assert_eq!(runs["a"], vec![(0, 2 * m), (3 * m, 4 * m)]);
        assert_eq!(runs["b"], vec![(m, 2 * m)]);
    }

    #[test]
    fn the_statement_has_one_placeholder_per_bind() {
        let sql = recompute_sql(&Tables::new("db"), Flavor::Legacy, 3);
        assert_eq!(sql.matches('?').count(), 1 + 3 * 3);
        let sql = recompute_sql(&Tables::new("db"), Flavor::Current, 2);
        assert_eq!(sql.matches('?').count(), 1 + 2 * 3);
        assert!(sql.contains("fromUnixTimestamp64Micro"));
    }
}
