//! The SQL behind `/api/`, for both schema flavours, and its row types.
//!
//! Every builder returns a [`Query`] whose user-supplied values were attached
//! with `.bind()` (escaped by the client library), never formatted into the
//! text; only table names (validated at start) and fixed fragments are.
//! `Query::sql_display` shows the final text, which the tests run on current
//! ClickHouse (chdb) as well as on 18.16.
//!
//! Raw readings are deduplicated by identity (`GROUP BY client_id, sensor,
//! ts`), the rollup and the statuses are read with `FINAL`.

use clickhouse::query::Query;
use clickhouse::{Client, Row};
use serde::Deserialize;

use crate::schema::{Flavor, Tables};

/// How far back `/api/clients` looks for clients in the rollup, seconds.
pub const CLIENT_LOOKBACK_S: i64 = 7 * 24 * 3600;
/// Most rows `/api/series` returns (sensors × minutes).
pub const MAX_SERIES_ROWS: u32 = 50_000;
/// The windows of `/api/averages`, minutes.
pub const AVERAGE_WINDOWS: [u32; 3] = [1, 5, 30];

/// "`ts` at or after a bound µs value", with partition pruning on 18.16
/// (whose partitions are by the materialized `dt`). Bind with [`bind_since`].
fn since_sql(flavor: Flavor) -> &'static str {
    match flavor {
        Flavor::Legacy => "ts >= toInt64(?) AND dt >= toDateTime(intDiv(toInt64(?), 1000000))",
        Flavor::Current => "ts >= fromUnixTimestamp64Micro(toInt64(?), 'UTC')",
    }
}

fn bind_since(query: Query, flavor: Flavor, us: i64) -> Query {
    match flavor {
        Flavor::Legacy => query.bind(us).bind(us),
        Flavor::Current => query.bind(us),
    }
}

/// `expr` (a `ts` value) as Int64 microseconds.
fn micros(flavor: Flavor, expr: &str) -> String {
    match flavor {
        Flavor::Legacy => expr.to_owned(),
        Flavor::Current => format!("toUnixTimestamp64Micro({expr})"),
    }
}

/// A client seen in the rollup.
#[derive(Debug, Row, Deserialize)]
pub struct RollupClient {
    /// The device.
    pub client_id: String,
    /// Its sensors.
    pub sensors: Vec<String>,
    /// Its latest minute with data, Unix seconds.
    pub last_minute: u32,
}

/// Clients with data in the rollup during the last [`CLIENT_LOOKBACK_S`].
pub fn rollup_clients(client: &Client, tables: &Tables, now_s: i64, limit: u32) -> Query {
    // No FINAL needed: every version of a row has the same key, and only keys are read.
    let sql = format!(
        "SELECT client_id, groupUniqArray(sensor) AS sensors, toUInt32(max(minute)) AS last_minute
FROM {t} WHERE minute >= toDateTime(?) GROUP BY client_id ORDER BY client_id LIMIT ?",
        t = tables.readings_1m
    );
    client.query(&sql).bind(now_s - CLIENT_LOOKBACK_S).bind(limit)
}

/// A client's readings in the rate window.
#[derive(Debug, Row, Deserialize)]
pub struct RecentClient {
    /// The device.
    pub client_id: String,
    /// Distinct readings with a time from the window's start on.
    pub recent: u64,
    /// Its latest minute with readings in the window, Unix seconds.
    pub last_minute: u32,
}

/// Per client with readings from minute `from_s` on: how many (distinct),
/// and the latest minute. Folded minutes come from `readings_1m`, only
/// minutes not folded yet from raw rows ([`crate::rollup::live_rows_sql`]),
/// so the cost follows the clients and the unfolded minutes, not the
/// fleet's rate times the window.
pub fn recent_clients(client: &Client, tables: &Tables, flavor: Flavor, from_s: i64) -> Query {
    let sql = format!(
        "SELECT client_id, toUInt64(sum(count)) AS recent, toUInt32(max(minute)) AS last_minute
FROM ({live})
GROUP BY client_id",
        live = crate::rollup::live_rows_sql(tables, flavor, Some(from_s), false),
    );
    client.query(&sql)
}

/// The latest status of an agent.
#[derive(Debug, Row, Deserialize)]
pub struct StatusRow {
    /// The device.
    pub client_id: String,
    /// When the agent took it, µs.
    pub ts: i64,
    /// Rows waiting in its outbox.
    pub outbox_rows: u64,
    /// Their approximate bytes.
    pub outbox_bytes: u64,
    /// Age of the oldest outbox row, s.
    pub oldest_age_s: f64,
    /// Readings from sensors per second.
    pub received_per_s: f64,
    /// Readings confirmed per second.
    pub confirmed_per_s: f64,
    /// 1 when connected to the broker.
    pub connected: u8,
    /// When the ingest server stored it, Unix seconds.
    pub received_at: u32,
    /// Net outbox rows leaving per second lately (negative: growing); `None`
    /// when the agent did not send it (here and below: older agents, or a
    /// row stored before the column existed).
    pub drain_per_s: Option<f64>,
    /// Seconds until its outbox is empty at that rate; `None` also while it
    /// is not shrinking.
    pub drain_eta_s: Option<f64>,
    /// Payload bytes on the wire per reading published.
    pub bytes_per_reading: Option<f64>,
    /// Echo mode: 1 when an ingest server announces a durable subscription.
    pub ingest_present: Option<u8>,
    /// Echo mode: batches echoed while none was announced, held in the outbox.
    pub echo_held_batches: Option<u64>,
    /// Echo mode: readings echoed, not yet acked by an ingest server.
    pub echo_ahead_readings: Option<u64>,
    /// The last remote command the agent answered: its id (this and the next
    /// four `None` before its first command, and from older agents).
    pub last_command_id: Option<String>,
    /// Its name.
    pub last_command_name: Option<String>,
    /// 1 when it was carried out.
    pub last_command_ok: Option<u8>,
    /// When it was answered, Unix ms.
    pub last_command_ts_ms: Option<i64>,
    /// `ok`, or the error kind and message.
    pub last_command_summary: Option<String>,
}

/// The latest status of every agent.
pub fn statuses(client: &Client, tables: &Tables, limit: u32) -> Query {
    let sql = format!(
        "SELECT client_id, ts, outbox_rows, outbox_bytes, oldest_age_s, received_per_s, confirmed_per_s, connected,
       toUInt32(received_at) AS received, drain_per_s, drain_eta_s, bytes_per_reading, ingest_present,
       echo_held_batches, echo_ahead_readings, last_command_id, last_command_name, last_command_ok,
       last_command_ts_ms, last_command_summary
FROM {t} FINAL ORDER BY client_id LIMIT ?",
        t = tables.agent_status
    );
    client.query(&sql).bind(limit)
}

/// One minute of the rollup.
#[derive(Debug, Row, Deserialize)]
pub struct MinuteRow {
    /// The sensor.
    pub sensor: String,
    /// Start of the minute, Unix seconds.
    pub minute: u32,
    /// Readings in it.
    pub count: u64,
    /// Their mean.
    pub avg: f64,
    /// Their minimum.
    pub min: f64,
    /// Their maximum.
    pub max: f64,
}

/// The minutes of `client_id` from `from_s` on whose rollup is pending
/// (open, or late readings not folded in yet): answered from raw rows.
pub fn pending_minutes(client: &Client, tables: &Tables, client_id: &str, from_s: i64) -> Query {
    let sql = format!(
        "SELECT DISTINCT toUInt32(minute) FROM ({pending}) ORDER BY 1",
        pending = crate::rollup::pending_pairs_sql(tables, "client_id = ? AND minute >= toDateTime(?)")
    );
    client.query(&sql).bind(client_id).bind(from_s)
}

/// The exact 1-minute series of `client_id` (one sensor or all) from
/// `from_s` on: folded-in minutes from the rollup, `pending` ones from raw
/// rows (see [`crate::rollup::live_series_sql`]).
pub fn series(
    client: &Client,
    tables: &Tables,
    flavor: Flavor,
    client_id: &str,
    sensor: Option<&str>,
    from_s: i64,
    pending: &[u32],
) -> Query {
    let sql = crate::rollup::live_series_sql(tables, flavor, sensor.is_some(), pending.len());
    crate::rollup::bind_live_series(client.query(&sql), flavor, client_id, sensor, from_s, pending, MAX_SERIES_ROWS)
}

/// Rolling averages of one sensor.
#[derive(Debug, Row, Deserialize)]
pub struct AverageRow {
    /// The sensor.
    pub sensor: String,
    /// Readings and their sum in the shortest window.
    pub c1: u64,
    /// See `c1`.
    pub s1: f64,
    /// Readings and their sum in the middle window.
    pub c5: u64,
    /// See `c5`.
    pub s5: f64,
    /// Readings and their sum in the longest window.
    pub c30: u64,
    /// See `c30`.
    pub s30: f64,
    /// Its latest minute with readings, Unix seconds.
    pub last_minute: u32,
}

/// The start (Unix seconds) of the window of `minutes` whole minutes that
/// ends with the minute of `now_us`: the averages count whole minutes, so
/// that folded ones come from the rollup.
#[must_use]
pub fn window_start(now_us: i64, minutes: u32) -> i64 {
    (now_us.div_euclid(1_000_000) - i64::from(minutes) * 60).div_euclid(60) * 60
}

/// Counts and sums of one client's readings per sensor over the
/// [`AVERAGE_WINDOWS`] (whole minutes, see [`window_start`]), from the
/// rollup (raw rows only for minutes not folded yet).
pub fn averages(
    client: &Client,
    tables: &Tables,
    flavor: Flavor,
    client_id: &str,
    sensor: Option<&str>,
    now_us: i64,
) -> Query {
    let [w1, w5, w30] = AVERAGE_WINDOWS.map(|m| window_start(now_us, m));
    // Integers of ours: inlined; the client and sensor are bound.
    let sql = format!(
        "SELECT sensor, toUInt64(sumIf(count, minute >= toDateTime({w1}))) AS c1, sumIf(sum, minute >= toDateTime({w1})) AS s1,
       toUInt64(sumIf(count, minute >= toDateTime({w5}))) AS c5, sumIf(sum, minute >= toDateTime({w5})) AS s5,
       toUInt64(sum(count)) AS c30, sum(sum) AS s30, toUInt32(max(minute)) AS last_minute
FROM ({live})
WHERE 1{s}
GROUP BY sensor ORDER BY sensor",
        live = crate::rollup::live_rows_sql(tables, flavor, Some(w30), true),
        s = if sensor.is_some() { " AND sensor = ?" } else { "" },
    );
    let mut query = client.query(&sql);
    for _ in 0..crate::rollup::LIVE_ROWS_CLIENT_BINDS {
        query = query.bind(client_id);
    }
    if let Some(sensor) = sensor {
        query = query.bind(sensor);
    }
    query
}

/// The latest reading of one sensor.
#[derive(Debug, Row, Deserialize)]
pub struct LatestRow {
    /// The sensor.
    pub sensor: String,
    /// Its value.
    pub last: f64,
    /// Its time, µs.
    pub last_ts: i64,
}

/// The latest reading per sensor of one client, from raw rows since
/// `from_us` (the earliest of the sensors' last minutes: usually the
/// current one, so the read is a minute of one client).
pub fn latest(
    client: &Client,
    tables: &Tables,
    flavor: Flavor,
    client_id: &str,
    sensor: Option<&str>,
    from_us: i64,
) -> Query {
    let sql = format!(
        "SELECT sensor, argMax(value, ts) AS last, {last_ts} AS last_ts FROM {t}
WHERE client_id = ?{s} AND {since}
GROUP BY sensor ORDER BY sensor",
        last_ts = micros(flavor, "max(ts)"),
        t = tables.readings,
        s = if sensor.is_some() { " AND sensor = ?" } else { "" },
        since = since_sql(flavor),
    );
    let mut query = client.query(&sql).bind(client_id);
    if let Some(sensor) = sensor {
        query = query.bind(sensor);
    }
    bind_since(query, flavor, from_us)
}

/// A dead letter, without its payload (only size and first bytes).
#[derive(Debug, Row, Deserialize)]
pub struct ErrorRow {
    /// Unix seconds.
    pub received_at: u32,
    /// MQTT topic.
    pub topic: String,
    /// Client id from the topic.
    pub client_id: String,
    /// Fixed reason name.
    pub reason: String,
    /// The error text.
    pub error: String,
    /// Payload size.
    pub payload_bytes: u64,
    /// First 32 payload bytes, hex.
    pub payload_head: String,
}

/// The latest `limit` dead letters (of one client or all).
pub fn recent_errors(client: &Client, tables: &Tables, client_id: Option<&str>, limit: u32) -> Query {
    let sql = format!(
        "SELECT toUInt32(received_at) AS r, topic, client_id, reason, error, toUInt64(length(payload)) AS bytes,
       hex(substring(payload, 1, 32)) AS head
FROM {t}{w} ORDER BY received_at DESC LIMIT ?",
        t = tables.ingest_errors,
        w = if client_id.is_some() { " WHERE client_id = ?" } else { "" },
    );
    let mut query = client.query(&sql);
    if let Some(client_id) = client_id {
        query = query.bind(client_id);
    }
    query.bind(limit)
}

/// Dead letters per reason.
#[derive(Debug, Row, Deserialize)]
pub struct ReasonCount {
    /// Fixed reason name.
    pub reason: String,
    /// How many.
    pub count: u64,
}

/// Dead letters per reason (of one client or all).
pub fn error_counts(client: &Client, tables: &Tables, client_id: Option<&str>) -> Query {
    let sql = format!(
        "SELECT reason, count() AS n FROM {t}{w} GROUP BY reason ORDER BY reason",
        t = tables.ingest_errors,
        w = if client_id.is_some() { " WHERE client_id = ?" } else { "" },
    );
    let query = client.query(&sql);
    match client_id {
        Some(client_id) => query.bind(client_id),
        None => query,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(q: &Query) -> String {
        q.sql_display().to_string()
    }

    #[test]
    fn hostile_values_are_escaped_literals_not_sql() {
        let c = Client::default();
        let t = Tables::new("db");
        let q = series(&c, &t, Flavor::Legacy, "dev", Some("' OR 1=1 --"), 0, &[]);
        assert!(text(&q).contains(r"sensor = '\' OR 1=1 --'"), "{}", text(&q));
        let q = series(&c, &t, Flavor::Legacy, "dev", Some("a?b`c\\"), 0, &[60]);
        assert!(text(&q).contains(r"sensor = 'a?b\`c\\' AND minute"), "{}", text(&q));
    }

    #[test]
    fn every_placeholder_is_bound_in_both_flavours() {
        let c = Client::default();
        let t = Tables::new("db");
        for flavor in [Flavor::Legacy, Flavor::Current] {
            for q in [
                rollup_clients(&c, &t, 1_700_000_000, 10),
                recent_clients(&c, &t, flavor, 1),
                statuses(&c, &t, 10),
                series(&c, &t, flavor, "a", None, 5, &[]),
                series(&c, &t, flavor, "a", Some("s"), 5, &[60, 120]),
                pending_minutes(&c, &t, "a", 5),
                averages(&c, &t, flavor, "a", None, 1_700_000_000_000_000),
                averages(&c, &t, flavor, "a", Some("s"), 1_700_000_000_000_000),
                latest(&c, &t, flavor, "a", Some("s"), 1_700_000_000_000_000),
                recent_errors(&c, &t, None, 5),
                recent_errors(&c, &t, Some("a"), 5),
                error_counts(&c, &t, Some("a")),
            ] {
                let sql = text(&q);
                assert!(!sql.contains('?'), "unbound placeholder in {sql}");
            }
        }
    }

    #[test]
    fn windows_are_whole_minutes_ending_with_the_given_instant() {
        // 1_700_000_000 s is 20 s into its minute.
        let now = 1_700_000_000_000_000;
        assert_eq!(window_start(now, 1), 1_700_000_000 - 20 - 60);
        assert_eq!(window_start(now, 5), 1_700_000_000 - 20 - 300);
        assert_eq!(window_start(now, 30), 1_700_000_000 - 20 - 1800);
        let sql = text(&averages(&Client::default(), &Tables::new("db"), Flavor::Legacy, "a", None, now));
        assert!(sql.contains(&format!("sumIf(count, minute >= toDateTime({}))) AS c1", 1_699_999_920)), "{sql}");
        assert!(sql.contains(&format!("minute >= toDateTime({})", 1_699_998_180)), "the 30-minute window: {sql}");
        assert!(!sql.contains('?'), "every placeholder bound: {sql}");
    }
}
